"""CREATEs that filterd answers after rksmbd's call gave up (raw SMB 3.0.2).

Usage: late_reply.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS).
Before each CREATE the script prints "ready" and waits for a line (the
driver SIGSTOPs filterd); the CREATE must fail with
STATUS_FILE_NOT_AVAILABLE.

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
3. A persistent (DH2Q) exclusive CREATE with create GUID H, not replayed
   (an SMB client replays only a request that got no answer); prints
   "gave up again" and waits (the driver SIGCONTs filterd and waits for
   the late open to be closed, not left detached holding the file).

Prints PASS; exits non-zero on any failure.
"""

import struct
import time
import uuid

from raw_channel import CLOSE, CREATE, READ, SUCCESS, Raw, check, cmac_sign, connect_share
from smbtest import pause, persistent_context

WRITE = 9
PENDING = 0x00000103
FILE_NOT_AVAILABLE = 0xC0000467
FLAG_REPLAY = 0x20000000
NAME = "late.txt".encode("utf-16-le")


def call(r, pdu):
    """Sends `pdu` (unless None: sent already), skips interim
    STATUS_PENDING answers: the final status and message."""
    if pdu is not None:
        r.send(pdu)
    while True:
        m = r.recv()
        st = struct.unpack_from("<I", m, 8)[0]
        if st != PENDING:
            return st, m


def create(r, sid, key, tid, create_guid=None, replay=False):
    """An exclusive (share none) OPEN_IF of late.txt for read and write,
    persistent with `create_guid` if given."""
    ctx = b""
    if create_guid is not None:
        ctx = persistent_context(create_guid).pack()
    end = 64 + 56 + len(NAME)
    pad = -end % 8 if ctx else 0
    ctx_off = end + pad if ctx else 0
    body = struct.pack(
        "<HBBIQQIIIIIHHII", 57, 0, 0, 2, 0, 0, 0xC0000000, 0x80, 0, 3, 0x40, 64 + 56, len(NAME), ctx_off, len(ctx)
    )
    h = bytearray(r.header(CREATE, sid, tid=tid))
    if replay:
        struct.pack_into("<I", h, 16, FLAG_REPLAY)
    return cmac_sign(key, bytes(h) + body + NAME + b"\0" * pad + ctx)


def close(r, sid, key, tid, fid):
    st, _ = call(r, cmac_sign(key, r.header(CLOSE, sid, tid=tid) + struct.pack("<HHI16s", 24, 0, 0, fid)))
    check(st == SUCCESS, f"CLOSE (got {st:#010x})")


def given_up(r, sid, key, tid, create_guid=None):
    pause("ready")
    st, _ = call(r, create(r, sid, key, tid, create_guid))
    check(st == FILE_NOT_AVAILABLE, f"the CREATE filterd answered late failed (got {st:#010x})")


def main():
    a = Raw(uuid.uuid4())
    a.s.settimeout(30)
    sid, key, tid = connect_share(a)

    given_up(a, sid, key, tid)
    pause("gave up")
    b = Raw(uuid.uuid4())
    bsid, bkey, btid = connect_share(b)
    st, x = call(b, create(b, bsid, bkey, btid))
    check(st == SUCCESS, f"another client's exclusive CREATE succeeds (got {st:#010x})")
    close(b, bsid, bkey, btid, x[128:144])

    g = uuid.uuid4()
    given_up(a, sid, key, tid, g)
    a.send(create(a, sid, key, tid, g, replay=True))
    print("replaying", flush=True)
    st, x = call(a, None)
    check(st == SUCCESS, f"the replayed persistent CREATE succeeds (got {st:#010x})")
    fid = x[128:144]
    until = time.monotonic() + 1.5
    n = 0
    while time.monotonic() < until:
        data = b"v%03d" % n
        wr = struct.pack("<HHIQ16sIIHHI", 49, 112, len(data), 0, fid, 0, 0, 0, 0, 0) + data
        st, _ = call(a, cmac_sign(key, a.header(WRITE, sid, tid=tid) + wr))
        check(st == SUCCESS, f"WRITE {data!r} on the replayed handle (got {st:#010x})")
        rd = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, len(data), 0, fid, 0, 0, 0, 0, 0) + b"\0"
        st, m = call(a, cmac_sign(key, a.header(READ, sid, tid=tid) + rd))
        check(st == SUCCESS and m[80 : 80 + len(data)] == data, f"READ it back (got {st:#010x})")
        n += 1
        time.sleep(0.1)
    print(f"the replayed handle answered {n} WRITE+READs over 1.5 s", flush=True)
    pause("replayed")
    close(a, sid, key, tid, fid)

    given_up(a, sid, key, tid, uuid.uuid4())
    pause("gave up again")
    print("PASS", flush=True)


main()
