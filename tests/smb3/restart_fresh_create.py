"""After a filterd restart, another client's CREATE is not granted before
the break of a lease filterd forgot was written (rksmbd; review
rvfailover), a replayed CREATE that is opened anew included (re-review
rr39e F6).

Usage: restart_fresh_create.py HOST PORT SHARE USER PASSWORD

Twice: client A opens a file with an RWH lease through a plain (not
durable) open, which a restarted filterd forgets; client B logs on.
Prints "ready" and waits while the driver kills filterd, starts it again
and waits until rksmbd, reattached, holds the breaks of forgotten leases
(RKSMBD_TEST_FORGOTTEN_BREAKS_DELAY_MS). B then opens the file for
reading and writing: filterd's open gate does not hold rksmbd's own
opens, so rksmbd must — when B's answer comes, A's break to none must be
in A's socket already (before, B was granted at once while A, told
nothing, still cached). The first time B's CREATE is a plain one (f.txt);
the second (g.txt) it carries SMB2_FLAGS_REPLAY_OPERATION and a DH2Q
whose create GUID filterd never heard of, which filterd opens anew
(before, a replay was not held). Prints PASS; exits non-zero on any
failure.
"""

import select
import struct
import sys
import uuid

from raw_channel import CREATE, FLAG_REPLAY, SUCCESS, SignedClient, check, cmac_sign, create_with, final, lease_break_sent, lease_ctx
from smbtest import persistent_context


def round_of(name, replay):
    """One restart: A's leased open of `name`, then B's CREATE of it (a
    replay with an unknown create GUID if `replay`)."""
    a = SignedClient()
    st, m = a.call(CREATE, create_with(name, oplock=0xFF, ctxs=lease_ctx(uuid.uuid4().bytes)))
    check(st == SUCCESS, f"A's leased open of {name} ({st:#x})")
    b = SignedClient()
    print("ready", flush=True)
    sys.stdin.readline()
    ctxs = persistent_context(uuid.uuid4()).pack() if replay else b""
    h = bytearray(b.raw.header(CREATE, b.sid, tid=b.tid))
    if replay:
        struct.pack_into("<I", h, 16, FLAG_REPLAY)
    b.raw.send(cmac_sign(b.key, bytes(h) + create_with(name, disposition=1, ctxs=ctxs)))
    st, _ = final(b.raw, None)
    check(st == SUCCESS, f"B's open of {name} is granted ({st:#x})")
    sent, _, _ = select.select([a.raw.s], [], [], 0)
    check(bool(sent), f"A was sent its break of {name} before B's open was granted")
    m = lease_break_sent(a, 5)
    new = struct.unpack_from("<I", m, 64 + 28)[0]
    check(new == 0, f"a break to none ({new})")
    a.raw.s.close()
    b.raw.s.close()


def main():
    round_of("f.txt", False)
    round_of("g.txt", True)
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
