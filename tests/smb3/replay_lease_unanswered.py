"""The lease a CREATE replayed on its own connection reports when
rksmbd's look at the handle goes unanswered (raw SMB 3.0.2; re-review
rr45b F2).

Usage: replay_lease_unanswered.py HOST PORT SHARE USER PASSWORD

A: persistent open of rl.txt, lease RWH. B: another client opens it for
reading and writing, which breaks A's W; A does not acknowledge, and
filterd's break timeout lowers the lease. On the driver's line A replays
its CREATE (same create GUID, replay flag) on the same connection — the
driver has filterd leave rksmbd's look at the handle unanswered — and
prints "replay STATUS lease STATE".
"""

import struct
import uuid

from raw_channel import (CREATE, SignedClient, break_of, create_with, final, lease_ctx, patient_share,
                         signed_create)
from smbtest import pause, persistent_context


def lease_state(m):
    i = m.find(b"RqLs")
    return None if i < 0 else struct.unpack_from("<I", m, i - 16 + 24 + 16)[0]


lkey, create_guid = uuid.uuid4().bytes, uuid.uuid4()
lease = lease_ctx(lkey, 7)
lease = struct.pack("<I", 80) + lease[4:] + b"\0" * (80 - len(lease))
ctx = lease + persistent_context(create_guid).pack()
a, sid, key, tid = patient_share(uuid.uuid4())
st, m = final(a, signed_create(a, sid, key, tid, "rl.txt", 7, 3, ctx, 0xFF))
print(f"original {st:#x} lease {lease_state(m)}", flush=True)
b = SignedClient()
st, _ = b.call(CREATE, create_with("rl.txt", disposition=1))
print(f"other client opened {st:#x}", flush=True)
brk = break_of(a, 5, "A")
print(f"A was sent a break to {struct.unpack_from('<I', brk, 64 + 28)[0]}", flush=True)
pause("replay?")
st, m = final(a, signed_create(a, sid, key, tid, "rl.txt", 7, 3, ctx, 0xFF, replay=True))
print(f"replay {st:#x} lease {lease_state(m)}", flush=True)
pause("done?")
print("PASS", flush=True)
