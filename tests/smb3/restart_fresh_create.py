"""After a filterd restart, another client's CREATE is not granted before
the break of a lease filterd forgot was written (rksmbd; review
rvfailover).

Usage: restart_fresh_create.py HOST PORT SHARE USER PASSWORD

Client A opens f.txt with an RWH lease through a plain (not durable)
open, which a restarted filterd forgets; client B logs on. Prints
"ready" and waits while the driver kills filterd, starts it again and
waits until rksmbd, reattached, holds the breaks of forgotten leases
(RKSMBD_TEST_FORGOTTEN_BREAKS_DELAY_MS). B then opens f.txt for reading
and writing: filterd's open gate does not hold rksmbd's own opens, so
rksmbd must — when B's answer comes, A's break to none must be in A's
socket already (before, B was granted at once while A, told nothing,
still cached). Prints PASS; exits non-zero on any failure.
"""

import select
import struct
import sys
import uuid

from raw_channel import CREATE, SUCCESS, SignedClient, check, create_with, final, lease_break_sent, lease_ctx


def main():
    a = SignedClient()
    st, m = a.call(CREATE, create_with("f.txt", oplock=0xFF, ctxs=lease_ctx(uuid.uuid4().bytes)))
    check(st == SUCCESS, f"A's leased open ({st:#x})")
    b = SignedClient()
    print("ready", flush=True)
    sys.stdin.readline()
    b.send(CREATE, create_with("f.txt", disposition=1))
    st, _ = final(b.raw, None)
    check(st == SUCCESS, f"B's open is granted ({st:#x})")
    sent, _, _ = select.select([a.raw.s], [], [], 0)
    check(bool(sent), "A was sent its break before B's open was granted")
    m = lease_break_sent(a, 5)
    new = struct.unpack_from("<I", m, 64 + 28)[0]
    check(new == 0, f"a break to none ({new})")
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
