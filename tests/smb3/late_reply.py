"""CREATEs that filterd answers after rksmbd's call gave up (raw SMB 3.0.2).

Usage: late_reply.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS).
Before each CREATE the script prints "ready" and waits for a line (the
driver SIGSTOPs filterd); the CREATE must fail with
STATUS_FILE_NOT_AVAILABLE — or, a persistent (DH2Q) one, with
STATUS_SERVER_UNAVAILABLE, which an SMB 3.x client replays (MS-SMB2
3.2.5.7).

1. A plain exclusive CREATE of late.txt; prints "gave up" and waits (the
   driver SIGCONTs filterd and waits for the late open to be closed).
   Then another client opens late.txt exclusively: no orphan refuses it.
2. A persistent (DH2Q) exclusive CREATE with create GUID G; at once its
   replay (SMB2_FLAGS_REPLAY_OPERATION, G), queued behind it in the
   stopped filterd; prints "replaying" (the driver SIGCONTs filterd). The
   replay must get a handle that WRITEs and READs for a while (the
   original's late answer is read meanwhile, and must not close it);
   prints "replayed" and waits (the driver checks the handle is
   attached), then closes it.
3. A durable v1 (DHnQ, batch oplock) exclusive CREATE, whose create
   GUID is rksmbd's own and never replayed; prints "gave up again" and
   waits (the driver SIGCONTs filterd and waits for the late open to be
   closed, not left detached holding the file).
4. A persistent (DH2Q) CREATE with create GUID H, not replayed; prints
   "gave up on H" and waits (the driver SIGCONTs filterd and waits for
   the late open to be left detached, for the replay its client may yet
   send).

Prints PASS; exits non-zero on any failure.
"""

import struct
import time
import uuid

from raw_channel import (
    SUCCESS,
    Raw,
    check,
    connect_share,
    final,
    signed_close,
    signed_create,
    signed_read,
    signed_write,
)
from smbtest import pause, persistent_context

FILE_NOT_AVAILABLE = 0xC0000467
SERVER_UNAVAILABLE = 0xC0000466
BATCH = 0x09


def dhnq():
    """A DHnQ (durable v1) create context."""
    return struct.pack("<IHHHHI4s4s16s", 0, 16, 4, 0, 24, 16, b"DHnQ", b"", b"")


def create(r, sid, key, tid, create_guid=None, replay=False, v1=False):
    """An exclusive (share none) OPEN_IF of late.txt for read and write,
    persistent with `create_guid` if given, durable v1 under a batch
    oplock if `v1`."""
    ctx = b""
    if create_guid is not None:
        ctx = persistent_context(create_guid).pack()
    elif v1:
        ctx = dhnq()
    return signed_create(r, sid, key, tid, "late.txt", ctx=ctx, oplock=BATCH if v1 else 0, replay=replay)


def given_up(r, sid, key, tid, create_guid=None, v1=False):
    pause("ready")
    st, _ = final(r, create(r, sid, key, tid, create_guid, v1=v1))
    want = FILE_NOT_AVAILABLE if create_guid is None else SERVER_UNAVAILABLE
    check(st == want, f"the CREATE filterd answered late failed with {want:#010x} (got {st:#010x})")


def main():
    a = Raw(uuid.uuid4())
    a.s.settimeout(30)
    sid, key, tid = connect_share(a)

    given_up(a, sid, key, tid)
    pause("gave up")
    b = Raw(uuid.uuid4())
    bsid, bkey, btid = connect_share(b)
    st, x = final(b, create(b, bsid, bkey, btid))
    check(st == SUCCESS, f"another client's exclusive CREATE succeeds (got {st:#010x})")
    signed_close(b, bsid, bkey, btid, x[128:144])

    g = uuid.uuid4()
    given_up(a, sid, key, tid, g)
    a.send(create(a, sid, key, tid, g, replay=True))
    print("replaying", flush=True)
    st, x = final(a, None)
    check(st == SUCCESS, f"the replayed persistent CREATE succeeds (got {st:#010x})")
    fid = x[128:144]
    until = time.monotonic() + 1.5
    n = 0
    while time.monotonic() < until:
        data = b"v%03d" % n
        st = signed_write(a, sid, key, tid, fid, data)
        check(st == SUCCESS, f"WRITE {data!r} on the replayed handle (got {st:#010x})")
        st, got = signed_read(a, sid, key, tid, fid, len(data))
        check(st == SUCCESS and got == data, f"READ it back (got {st:#010x})")
        n += 1
        time.sleep(0.1)
    print(f"the replayed handle answered {n} WRITE+READs over 1.5 s", flush=True)
    pause("replayed")
    signed_close(a, sid, key, tid, fid)

    given_up(a, sid, key, tid, v1=True)
    pause("gave up again")

    given_up(a, sid, key, tid, uuid.uuid4())
    pause("gave up on H")
    print("PASS", flush=True)


main()
