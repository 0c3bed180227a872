"""A persistent CREATE answered STATUS_SERVER_UNAVAILABLE whose late
answer left nothing, its session logged off, and a fresh CREATE of the
same create GUID from another session while the unanswered-closer holds
the GUID (raw SMB 3.0.2).

Usage: late_closer_fresh.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS)
and RKSMBD_TEST_CLOSER_CLAIM_DELAY_MS.

1. Client A makes x.txt (closed), and B (same client GUID) sets up a
   session; prints "ready" and waits (the driver SIGSTOPs filterd). A
   sends a persistent (DH2Q, create GUID G) FILE_CREATE of x.txt, which
   must fail STATUS_SERVER_UNAVAILABLE; prints "gave up" and waits (the
   driver SIGCONTs filterd, whose late answer is an error: the file
   exists, nothing is left).
2. A LOGOFFs (must succeed): the closer claims G and is held. Prints
   "logged off" and waits (the driver waits for the hook's log line).
3. B sends a persistent OPEN_IF of x.txt with G, no replay flag: a fresh
   open, which must succeed (it waits for the closer to let go). Closed.

Prints PASS; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import SUCCESS, check, cmac_sign, final, patient_share, persistent_create, signed_close, signed_made
from smbtest import pause

SERVER_UNAVAILABLE = 0xC0000466
FILE_CREATE = 2
OPEN_IF = 3
LOGOFF = 2


def main():
    client, g = uuid.uuid4(), uuid.uuid4()
    a, sid, key, tid = patient_share(client)
    signed_made(a, sid, key, tid, "x.txt")
    b, bsid, bkey, btid = patient_share(client)
    pause("ready")
    st, _ = final(a, persistent_create(a, sid, key, tid, "x.txt", g, FILE_CREATE))
    check(st == SERVER_UNAVAILABLE, f"the CREATE filterd answered late: STATUS_SERVER_UNAVAILABLE (got {st:#010x})")
    pause("gave up")

    st, _ = final(a, cmac_sign(key, a.header(LOGOFF, sid) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, f"A logs off (got {st:#010x})")
    pause("logged off")

    st, m = final(b, persistent_create(b, bsid, bkey, btid, "x.txt", g, OPEN_IF))
    check(st == SUCCESS, f"a fresh CREATE of G meeting the closer's claim succeeds (got {st:#010x})")
    signed_close(b, bsid, bkey, btid, m[128:144])
    print("PASS", flush=True)


main()
