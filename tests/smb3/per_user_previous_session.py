"""A DH2C after PreviousSessionId is not refused for the user's share
(re-review; run under `prlimit --nofile=LIMIT`).

Usage: per_user_previous_session.py HOST PORT SHARE USER PASSWORD SHARE_OF_USER

USER holds SHARE_OF_USER persistent opens on connection A, which then
stays connected but silent (its network gone unnoticed). On connection
B, a new session names A's as PreviousSessionId, ending it: its handles
are detached in filterd at once, while A notices only at its next
request. Every DH2C of them on B succeeds; then one more fresh CREATE is
refused STATUS_INSUFFICIENT_RESOURCES (the reconnected opens count
once). Before, A's idle connection still counted the opens, and every
DH2C was refused. Prints PASS, or exits non-zero.
"""

import struct
import sys
import uuid

from raw_channel import (
    SUCCESS,
    check,
    context,
    final,
    patient_share,
    patient_share_after,
    persistent_create,
    signed_close,
    signed_create,
)

SHARE_OF_USER = int(sys.argv[6])
INSUFFICIENT_RESOURCES = 0xC000009A

client = uuid.uuid4()
a, asid, akey, atid = patient_share(client)
held = []
for i in range(SHARE_OF_USER):
    g = uuid.uuid4()
    st, m = final(a, persistent_create(a, asid, akey, atid, f"p{i}", g, 5))
    check(st == SUCCESS, "persistent open")
    held.append((f"p{i}", m[128:144], g))

b, sid, key, tid = patient_share_after(client, asid)

refused, reopened = [], []
for name, fid, g in held:
    dh2c = context(b"DH2C", fid + g.bytes + struct.pack("<I", 2)).pack()
    st, m = final(b, signed_create(b, sid, key, tid, name, 7, 1, dh2c))
    if st == SUCCESS:
        reopened.append(m[128:144])
    else:
        refused.append(hex(st))
check(not refused, f"every DH2C after PreviousSessionId succeeds (refused: {refused[:3]})")
st, _ = final(b, signed_create(b, sid, key, tid, "one_more", 7, 5))
check(st == INSUFFICIENT_RESOURCES, f"the reconnected opens count once: still at its share ({hex(st)})")
for fid in reopened:
    signed_close(b, sid, key, tid, fid)
print("PASS")
