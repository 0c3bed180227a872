"""A persistent CREATE answered STATUS_SERVER_UNAVAILABLE whose late open
is left detached, its session logged off, and a replay of its create
GUID from another session while the unanswered-closer holds the GUID
longer than a replay's usual wait (raw SMB 3.0.2).

Usage: late_closer_replay.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS)
and RKSMBD_TEST_CLOSER_CLAIM_DELAY_MS past 5 s.

1. Client A and B (same client GUID) set up sessions; prints "ready" and
   waits (the driver SIGSTOPs filterd). A sends a persistent (DH2Q,
   create GUID G) FILE_CREATE of y.txt, which must fail
   STATUS_SERVER_UNAVAILABLE; prints "gave up" and waits (the driver
   SIGCONTs filterd: the late open is left detached).
2. A LOGOFFs (must succeed): the closer claims G and is held. Prints
   "logged off" and waits (the driver waits for the hook's log line).
3. B replays the CREATE (SMB2_FLAGS_REPLAY_OPERATION, G): filterd hands
   it the late open, and it waits for the closer, whose resume finds the
   open attached and leaves it. It must succeed as the original: create
   action FILE_CREATED. Closed.

Prints PASS; exits non-zero on any failure.
"""

import struct

from raw_channel import SUCCESS, check, final, persistent_create, signed_close, unanswered_then_logged_off

FILE_CREATE = 2
FILE_CREATED = 2


def main():
    (b, bsid, bkey, btid), g = unanswered_then_logged_off("y.txt", FILE_CREATE)

    st, m = final(b, persistent_create(b, bsid, bkey, btid, "y.txt", g, FILE_CREATE, replay=True))
    check(st == SUCCESS, f"a replay of G meeting the closer's claim succeeds (got {st:#010x})")
    action = struct.unpack_from("<I", m, 64 + 4)[0]
    check(action == FILE_CREATED, f"as the original: FILE_CREATED (got {action})")
    signed_close(b, bsid, bkey, btid, m[128:144])
    print("PASS", flush=True)


main()
