"""A blocking LOCK that waits while its channel is lost is not granted
behind its client's back, and its replay on another channel is answered
(rksmbd multichannel: waiting locks live at the session's home).

Usage: lock_channel_pending.py HOST PORT SHARE USER PASSWORD

Each case sets up its own session: connection A (smbprotocol, SMB 3.0.2)
and connection B (raw, same client GUID) bound to it as a channel. A opens
a file twice (no durability, sharing all); the second open (the blocker)
locks bytes 10-19 exclusive; A's first open sends a blocking LOCK of them
(sequence index 1, number 1), which waits.

1. replay: A is reset; B replays the LOCK (SMB2_FLAGS_REPLAY_OPERATION,
   same sequence), which waits too; the blocker unlocks through B and B's
   LOCK is granted within 2 s. The lock is held once: after B unlocks it
   the blocker can lock the range.
2. replay while A lives: as 1, but A is not reset (the client gave up on
   it, rksmbd cannot know): the waiting LOCK answers B's replay, B's LOCK
   is granted within 2 s and held once.
3. no replay: A is reset and nothing is replayed; once the blocker
   unlocks, it can lock the range again — the lost LOCK was not granted
   to nobody.

Prints one line per step; exits non-zero if any fails.
"""

import socket
import struct
import sys
import time
import uuid

from smbprotocol.open import CreateDisposition, LockFlags, ShareAccess

from raw_channel import FAILURES, SUCCESS, Raw, bind, check, cmac_sign, reset, server_side_established, session
from smbtest import create_rw, lock_in_sequence

LOCK = 0xA
EXCLUSIVE_WAIT = LockFlags.SMB2_LOCKFLAG_EXCLUSIVE_LOCK
EXCLUSIVE = EXCLUSIVE_WAIT | LockFlags.SMB2_LOCKFLAG_FAIL_IMMEDIATELY
UNLOCK = LockFlags.SMB2_LOCKFLAG_UNLOCK
PENDING = 0x103
FLAG_ASYNC = 0x2
FLAG_REPLAY = 0x20000000
ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


class Case:
    """A session on A with channel B, file `name` opened twice on A, the
    second open holding bytes 10-19 and the first's blocking LOCK of them
    waiting."""

    def __init__(self, name):
        guid = uuid.uuid4()
        self.a, s1, tree = session(guid)
        self.sid, self.tid = s1.session_id, tree.tree_connect_id
        self.b = Raw(guid)
        self.key = bind(self.b, self.sid, s1.signing_key)
        f, _ = create_rw(tree, name, CreateDisposition.FILE_OPEN_IF, share=ALL)
        blocker, _ = create_rw(tree, name, CreateDisposition.FILE_OPEN_IF, share=ALL)
        self.f, self.blocker = f.file_id, blocker.file_id
        self.a_reset = False
        blocker.write(b"." * 100, 0)
        lock_in_sequence(blocker, 10, 10, EXCLUSIVE, 2, 1)
        lock_in_sequence(f, 10, 10, EXCLUSIVE_WAIT, 1, 1, wait=False)
        # A's requests are answered in order: once this read is, the LOCK
        # before it waits.
        blocker.read(0, 1)
        check(True, f"{name}: A's blocking LOCK (1/1) waits on the blocker")

    def lock_pdu(self, fid, flags, index, number, replay=False):
        """A LOCK of bytes 10-19 through channel B, signed."""
        body = struct.pack("<HHI16sQQII", 48, 1, (index << 4) | number, fid, 10, 10, flags, 0)
        h = bytearray(self.b.header(LOCK, self.sid, tid=self.tid))
        if replay:
            struct.pack_into("<I", h, 16, FLAG_REPLAY)
        return cmac_sign(self.key, bytes(h) + body)

    def call(self, fid, flags, index, number):
        st, _ = self.b.call(self.lock_pdu(fid, flags, index, number))
        return st

    def reset_a(self):
        """Resets A and waits until rksmbd's end of it is gone."""
        port = self.a.transport._sock.getsockname()[1]
        reset(self.a.transport._sock)
        self.a_reset = True
        deadline = time.monotonic() + 10
        while server_side_established(port) and time.monotonic() < deadline:
            time.sleep(0.01)  # the polling interval
        check(not server_side_established(port), "rksmbd saw A reset")

    def replay_granted(self, what):
        """B replays A's LOCK, which waits; the blocker unlocks; B's LOCK
        is granted within 2 s and held once."""
        self.b.send(self.lock_pdu(self.f, EXCLUSIVE_WAIT, 1, 1, replay=True))
        st = struct.unpack_from("<I", self.b.recv(), 8)[0]
        check(st == PENDING, f"{what}: B's replay waits (got {st:#010x})", fatal=False)
        st = self.call(self.blocker, UNLOCK, 3, 1)
        check(st == SUCCESS, f"{what}: the blocker unlocked (got {st:#010x})", fatal=False)
        self.b.s.settimeout(2)
        try:
            r = self.b.recv()
            got = (struct.unpack_from("<I", r, 16)[0] & FLAG_ASYNC, struct.unpack_from("<I", r, 8)[0])
        except (socket.timeout, EOFError) as e:
            got = repr(e)
        self.b.s.settimeout(10)
        check(got == (FLAG_ASYNC, SUCCESS), f"{what}: B's LOCK is granted within 2 s ({got})", fatal=False)
        st = self.call(self.f, UNLOCK, 4, 1)
        check(st == SUCCESS, f"{what}: B unlocks 10-19 (got {st:#010x})", fatal=False)
        self.free(what)

    def free(self, what):
        """10-19 is free: the blocker locks it."""
        st = self.call(self.blocker, EXCLUSIVE, 5, 1)
        check(st == SUCCESS, f"{what}: nothing else holds 10-19, the blocker locks it (got {st:#010x})", fatal=False)

    def end(self):
        if not self.a_reset:
            reset(self.a.transport._sock)
        reset(self.b.s)


c = Case("replay.txt")
c.reset_a()
c.replay_granted("replay after A's reset")
c.end()

c = Case("alive.txt")
c.replay_granted("replay while A lives")
c.end()

c = Case("lost.txt")
c.reset_a()
st = c.call(c.blocker, UNLOCK, 3, 1)
check(st == SUCCESS, f"no replay: the blocker unlocked (got {st:#010x})", fatal=False)
c.free("no replay")
c.end()

if FAILURES:
    sys.exit(1)
print("PASS", flush=True)
