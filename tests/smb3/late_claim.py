"""A persistent CREATE replayed on a new connection whose claim's second
ask of filterd gives up (raw SMB 3.0.2).

Usage: late_claim.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS)
that holds a replay before its claim (RKSMBD_TEST_REPLAY_CLAIM_DELAY_MS).

1. Client A (client GUID C) makes a persistent (DH2Q, create GUID G)
   OVERWRITE_IF CREATE of claim.txt: it succeeds. Its connection drops.
2. A, on a new connection of C and a new session, prints "replaying" and
   replays the CREATE (SMB2_FLAGS_REPLAY_OPERATION, G); the driver
   SIGSTOPs filterd while rksmbd holds the replay before its claim, so
   the claim's second ask of filterd gives up. The replay must fail with
   STATUS_SERVER_UNAVAILABLE (MS-SMB2 3.2.5.7: the client replays it
   again), not a status that ends it; prints "gave up" and waits (the
   driver SIGCONTs filterd and waits for the handle to be disconnected).
3. A replays it again: it must succeed with the original open's file id.

Prints PASS; exits non-zero on any failure.
"""

import uuid

from raw_channel import SUCCESS, check, final, patient_share, persistent_create, reset, signed_close
from smbtest import pause

SERVER_UNAVAILABLE = 0xC0000466
OVERWRITE_IF = 5


def create(a, sid, key, tid, g, replay=False):
    return persistent_create(a, sid, key, tid, "claim.txt", g, OVERWRITE_IF, replay=replay)


def main():
    client = uuid.uuid4()
    a, sid, key, tid = patient_share(client)
    g = uuid.uuid4()
    st, m = final(a, create(a, sid, key, tid, g))
    check(st == SUCCESS, f"the persistent CREATE (got {st:#010x})")
    persistent = m[128:136]
    reset(a.s)

    a, sid, key, tid = patient_share(client)
    print("replaying", flush=True)
    st, _ = final(a, create(a, sid, key, tid, g, replay=True))
    check(st == SERVER_UNAVAILABLE, f"the replay whose claim gave up: STATUS_SERVER_UNAVAILABLE (got {st:#010x})")
    pause("gave up")

    st, m = final(a, create(a, sid, key, tid, g, replay=True))
    check(st == SUCCESS, f"the next replay succeeds (got {st:#010x})")
    check(m[128:136] == persistent, "with the original open")
    signed_close(a, sid, key, tid, m[128:144])
    print("PASS", flush=True)


main()
