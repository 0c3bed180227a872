"""A persistent CREATE replayed on a new connection while the original
still commits gives the client a handle that works (rksmbd, issue 14;
raw SMB 3.0.2).

Usage: replay_in_flight.py HOST PORT SHARE USER PASSWORD FILTERD_LOG

filterd runs with its open path stalled for a few seconds (a failpoint).
Connection A sends a persistent DH2Q CREATE (create GUID G) and is reset
before the answer. Connection B of the same client replays the CREATE
(SMB2_FLAGS_REPLAY_OPERATION, G): it must succeed, and WRITE and READ on
its handle must keep succeeding after A's thread has finished with the
original (before, A's thread detached the open it shared with B, and
B's handle answered STATUS_ACCESS_DENIED). A second replay before any
other request returns the same FileId.

Prints one line per step; exits non-zero on any failure.
"""

import socket
import struct
import sys
import time
import uuid

from raw_channel import (
    CREATE,
    READ,
    SUCCESS,
    Raw,
    check,
    cmac_sign,
    connect_share,
    context,
)
from smbprotocol.create_contexts import CreateContextName, DurableHandleFlags, SMB2CreateDurableHandleRequestV2
from smbtest import wait_stalled

WRITE = 9
FLAG_REPLAY = 0x20000000
NAME = "replayed.txt".encode("utf-16-le")
CREATE_GUID = uuid.uuid4()


def connect(guid):
    r = Raw(guid)
    sid, key, tid = connect_share(r)
    return r, sid, key, tid


def create(r, sid, key, tid, replay):
    d = SMB2CreateDurableHandleRequestV2()
    d["timeout"] = 60000
    d["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
    d["create_guid"] = CREATE_GUID
    ctx = context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, d).pack()
    end = 64 + 56 + len(NAME)
    pad = -end % 8
    # OVERWRITE_IF, read+write, share read.
    body = struct.pack(
        "<HBBIQQIIIIIHHII", 57, 0, 0, 2, 0, 0, 0xC0000000, 0x80, 1, 5, 0x40, 64 + 56, len(NAME), end + pad, len(ctx)
    )
    h = bytearray(r.header(CREATE, sid, tid=tid))
    if replay:
        struct.pack_into("<I", h, 16, FLAG_REPLAY)
    return cmac_sign(key, bytes(h) + body + NAME + b"\0" * pad + ctx)


def main():
    guid = uuid.uuid4()
    a, sid, key, tid = connect(guid)
    a.send(create(a, sid, key, tid, False))
    # Reset A only once filterd stalls in A's open (its log says so): a
    # fixed wait could reset A before its CREATE reached filterd, or with
    # no stall at all, and prove nothing.
    wait_stalled(sys.argv[6], "failpoint open.after_fs: stalling")
    a.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.s.close()
    print("A sent a persistent CREATE and was reset before its answer", flush=True)

    b, sid, key, tid = connect(guid)
    b.s.settimeout(30)
    st, x = b.call(create(b, sid, key, tid, True))
    check(st == SUCCESS, f"B's replayed CREATE succeeded (got {st:#010x})")
    fid = x[128:144]
    st, x = b.call(create(b, sid, key, tid, True))
    check(st == SUCCESS and x[128:144] == fid, f"a second replay returns the same FileId (got {st:#010x})")

    def write_read(data):
        wr = struct.pack("<HHIQ16sIIHHI", 49, 112, len(data), 0, fid, 0, 0, 0, 0, 0) + data
        st, _ = b.call(cmac_sign(key, b.header(WRITE, sid, tid=tid) + wr))
        check(st == SUCCESS, f"WRITE {data!r} on B's handle (got {st:#010x})")
        rd = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, len(data), 0, fid, 0, 0, 0, 0, 0) + b"\0"
        st, x = b.call(cmac_sign(key, b.header(READ, sid, tid=tid) + rd))
        check(st == SUCCESS and x[80 : 80 + len(data)] == data, f"READ it back (got {st:#010x})")

    # A's thread finishes with the original meanwhile: the handle must
    # keep working throughout.
    until = time.monotonic() + 3
    n = 0
    while time.monotonic() < until:
        write_read(b"v%03d" % n)
        n += 1
        time.sleep(0.1)
    print(f"B's handle answered {n} WRITE+READs over 3 s", flush=True)

    b.s.close()
    print("PASS", flush=True)


main()
