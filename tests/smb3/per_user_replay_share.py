"""A replay flag lets no CREATE past the user's share unless it resumes
the open held elsewhere (review; run under `prlimit --nofile=LIMIT`).

Usage: per_user_replay_share.py HOST PORT SHARE USER PASSWORD SHARE_OF_USER

USER holds a persistent open (create GUID G) on connection A and fills
the rest of its share with directory opens on connection B. On B,
CREATEs sent with SMB2_FLAGS_REPLAY_OPERATION and a DH2Q naming G — of
the directory, and of a new file with a durable (not persistent) DH2Q
and no lease, which filterd is not asked to replay — are each refused
STATUS_INSUFFICIENT_RESOURCES: none resumes A's open. Before, the held
GUID let every one past the share.

With CAP and FILLER (a user of the same password; run where the cap of
opens CAP is more than the user's share): FILLER holds SHARE_OF_USER - 1
directory opens and USER fills only the rest of the cap, short of its
share: the replay-flagged CREATEs are refused for the descriptor cap
(re-review rr46a F4: at a cap equal to the share, that check went
untested).

Usage: per_user_replay_share.py HOST PORT SHARE USER PASSWORD SHARE_OF_USER [CAP FILLER]

Prints PASS, or exits non-zero.
"""

import struct
import sys
import uuid

from smbprotocol.create_contexts import CreateContextName, SMB2CreateDurableHandleRequestV2

import raw_channel
from raw_channel import CREATE, FLAG_REPLAY, SUCCESS, cmac_sign, final, patient_share, persistent_create, signed_close, signed_create
from smbtest import check, context, persistent_context

SHARE_OF_USER = int(sys.argv[6])
CAP, FILLER = (int(sys.argv[7]), sys.argv[8]) if len(sys.argv) > 8 else (None, None)
INSUFFICIENT_RESOURCES = 0xC000009A


def dir_create(r, sid, key, tid, name, ctx=b"", replay=False):
    """A signed CREATE (OPEN) of directory `name` for reading."""
    n = name.encode("utf-16-le")
    end = 64 + 56 + len(n)
    pad = -end % 8 if ctx else 0
    ctx_off = end + pad if ctx else 0
    fixed = (57, 0, 0, 2, 0, 0, 0x1, 0x10, 7, 1, 0x1, 64 + 56, len(n), ctx_off, len(ctx))
    body = struct.pack("<HBBIQQIIIIIHHII", *fixed)
    h = bytearray(r.header(CREATE, sid, tid=tid))
    if replay:
        struct.pack_into("<I", h, 16, FLAG_REPLAY)
    return cmac_sign(key, bytes(h) + body + n + b"\0" * pad + ctx)


def durable_context(create_guid):
    """A DH2Q asking for a durable (not persistent) handle."""
    dh2q = SMB2CreateDurableHandleRequestV2()
    dh2q["timeout"] = 60000
    dh2q["create_guid"] = create_guid
    return context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q)


a, asid, akey, atid = patient_share(uuid.uuid4())
g = uuid.uuid4()
st, m = final(a, persistent_create(a, asid, akey, atid, "held.txt", g, 5))
check(st == SUCCESS, "A's persistent open")
held = m[128:144]
fills = SHARE_OF_USER - 1
if FILLER:
    user, raw_channel.USER = raw_channel.USER, FILLER
    f, fsid, fkey, ftid = patient_share(uuid.uuid4())
    raw_channel.USER = user
    for i in range(SHARE_OF_USER - 1):
        st, _ = final(f, dir_create(f, fsid, fkey, ftid, "d"))
        check(st == SUCCESS, f"{FILLER}'s directory open {i + 1}")
    fills = CAP - SHARE_OF_USER
b, sid, key, tid = patient_share(uuid.uuid4())
for i in range(fills):
    st, _ = final(b, dir_create(b, sid, key, tid, "d"))
    check(st == SUCCESS, f"directory open {i + 1}")
st, _ = final(b, dir_create(b, sid, key, tid, "d"))
check(st == INSUFFICIENT_RESOURCES, f"the user holds its share, or the cap is full ({hex(st)})")

ctx = persistent_context(g).pack()
refused = [final(b, dir_create(b, sid, key, tid, "d", ctx, replay=True))[0] for _ in range(5)]
check(all(s == INSUFFICIENT_RESOURCES for s in refused), f"replay-flagged directory opens refused ({refused})")
ctx = durable_context(g).pack()
refused = [final(b, signed_create(b, sid, key, tid, f"new{i}", 7, 5, ctx, replay=True))[0] for i in range(5)]
check(all(s == INSUFFICIENT_RESOURCES for s in refused), f"replay-flagged fresh file opens refused ({refused})")
signed_close(a, asid, akey, atid, held)
print("PASS")
