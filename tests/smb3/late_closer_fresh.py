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

import uuid

from raw_channel import SUCCESS, check, final, patient_share, persistent_create, signed_close, signed_made, unanswered_then_logged_off

OPEN_IF = 3


def main():
    # x.txt exists: the late answer to A's FILE_CREATE is an error.
    made, sid, key, tid = patient_share(uuid.uuid4())
    signed_made(made, sid, key, tid, "x.txt")
    (b, bsid, bkey, btid), g = unanswered_then_logged_off("x.txt", 2)

    st, m = final(b, persistent_create(b, bsid, bkey, btid, "x.txt", g, OPEN_IF))
    check(st == SUCCESS, f"a fresh CREATE of G meeting the closer's claim succeeds (got {st:#010x})")
    signed_close(b, bsid, bkey, btid, m[128:144])
    print("PASS", flush=True)


main()
