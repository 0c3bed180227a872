"""A LOCK replayed on another channel after its own channel dropped is
recognised by its lock sequence, on a plain open too (rksmbd advertises
SMB2_GLOBAL_CAP_MULTI_CHANNEL: MS-SMB2 3.3.5.14 then verifies lock
sequences for every open of an SMB 3.x connection, not only durable,
persistent and resilient ones).

Usage: lock_channel_replay.py HOST PORT SHARE USER PASSWORD

Connection A (smbprotocol, SMB 3.0.2) sets up a session; connection B
(raw, same client GUID) binds it. A opens f (no durability, sharing all)
and locks bytes 0-9 shared (sequence index 1, number 1) and 20-29
exclusive (2/1); then A is reset, as a channel is lost with the LOCK
responses on it. B replays both LOCKs: each succeeds and applies nothing
(the exclusive one is not refused by its own lock; the shared one is
held once: one unlock frees it, a second is STATUS_RANGE_NOT_LOCKED).
Then B unlocks 20-29 (5/1), locks it again (6/1), and replays the
unlock: it succeeds and leaves the range locked (B's next exclusive
lock of it is refused). Exits non-zero on any failure.
"""

import struct
import uuid

from smbprotocol.open import CreateDisposition, LockFlags, ShareAccess

from raw_channel import SUCCESS, Raw, bind, check, cmac_sign, reset, session
from smbtest import create_rw, lock_in_sequence

LOCK = 0xA
SHARED = LockFlags.SMB2_LOCKFLAG_SHARED_LOCK | LockFlags.SMB2_LOCKFLAG_FAIL_IMMEDIATELY
EXCLUSIVE = LockFlags.SMB2_LOCKFLAG_EXCLUSIVE_LOCK | LockFlags.SMB2_LOCKFLAG_FAIL_IMMEDIATELY
UNLOCK = LockFlags.SMB2_LOCKFLAG_UNLOCK
LOCK_NOT_GRANTED = 0xC0000055
RANGE_NOT_LOCKED = 0xC000007E
ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE

guid = uuid.uuid4()
a, s1, tree = session(guid)
sid, tid = s1.session_id, tree.tree_connect_id
b = Raw(guid)
key = bind(b, sid, s1.signing_key)
f, _ = create_rw(tree, "f", CreateDisposition.FILE_OPEN_IF, share=ALL)
lock_in_sequence(f, 0, 10, SHARED, 1, 1)
lock_in_sequence(f, 20, 10, EXCLUSIVE, 2, 1)
print("ok: A locked 0-9 shared (1/1) and 20-29 exclusive (2/1)", flush=True)
fid = f.file_id
reset(a.transport._sock)


def lock_b(offset, length, flags, index, number):
    """A LOCK of one element through channel B: its status."""
    body = struct.pack("<HHI16sQQII", 48, 1, (index << 4) | number, fid, offset, length, flags, 0)
    st, _ = b.call(cmac_sign(key, b.header(LOCK, sid, tid=tid) + body))
    return st


# (offset, length, flags, index, number, status wanted, what it shows)
STEPS = [
    (0, 10, SHARED, 1, 1, SUCCESS, "B's replay of the shared LOCK succeeds"),
    (20, 10, EXCLUSIVE, 2, 1, SUCCESS, "B's replay of the exclusive LOCK is recognised"),
    (0, 10, UNLOCK, 3, 1, SUCCESS, "one unlock of 0-9"),
    (0, 10, UNLOCK, 4, 1, RANGE_NOT_LOCKED, "0-9 was locked once: a second unlock finds nothing"),
    (20, 10, UNLOCK, 5, 1, SUCCESS, "20-29 unlocked"),
    (20, 10, EXCLUSIVE, 6, 1, SUCCESS, "20-29 locked again"),
    (20, 10, UNLOCK, 5, 1, SUCCESS, "the replayed unlock succeeds"),
    (20, 10, EXCLUSIVE, 7, 1, LOCK_NOT_GRANTED, "and left 20-29 locked"),
    (20, 10, UNLOCK, 8, 1, SUCCESS, "20-29 unlocked for good"),
]
for offset, length, flags, index, number, want, what in STEPS:
    st = lock_b(offset, length, flags, index, number)
    check(st == want, f"{what} (got {st:#010x})")
CLOSE = 6
st, _ = b.call(cmac_sign(key, b.header(CLOSE, sid, tid=tid) + struct.pack("<HHI16s", 24, 0, 0, fid)))
check(st == SUCCESS, f"B closed f (got {st:#010x})")
print("PASS", flush=True)
