"""A persistent handle opened through a bound channel survives its
session's home connection being reset, and is reconnected (DH2C) from a
new connection once the session's channels are gone (rksmbd
multichannel, issue 14; smbprotocol plus raw SMB 3.0.2).

Usage: channel_durable.py HOST PORT SHARE USER PASSWORD

Connection A (smbprotocol, SMB 3.0.2) sets up session S1; connection B
(raw, same client GUID) binds it and opens channel.txt with a DH2Q
persistent context and an RWH lease, and writes through it. Then:

1. B's blocking LOCK on a second file waits (STATUS_PENDING) on B's
   other open of it; A is reset (RST). B still serves: its unlock lets
   the waiting LOCK in (final response on B), and it reads the data back
   through its handle (the home thread goes on serving the session's
   channels).
2. While B lives, a DH2C of the handle from a new connection C is
   refused (the open is still connected) and B's handle still reads.
3. B is reset too. A DH2C from a new connection D resumes the handle
   (polled: the home thread notices B's end) and reads the data.

Prints one line per step; exits non-zero on any failure.
"""

import socket
import struct
import time
import uuid

from smbprotocol.create_contexts import (
    CreateContextName,
    DurableHandleFlags,
    SMB2CreateDurableHandleRequestV2,
)
from smbprotocol.open import RequestedOplockLevel

from raw_channel import CREATE, SUCCESS, Raw, bind, check, cmac_sign, context, create_body, lease_context, reset, session
from smbtest import reconnect_v2

READ, WRITE, CLOSE, LOCK = 8, 0x9, 6, 0xA
EXCLUSIVE, UNLOCK, FAIL_IMMEDIATELY = 2, 4, 0x10
PENDING, FLAG_ASYNC = 0x103, 0x2
NAME = "channel.txt"
DATA = b"written through a channel\n"


def raw_create(b, key, sid, tid, contexts):
    """A CREATE on raw connection `b` of NAME, read and write, sharing
    read, OVERWRITE_IF, with a lease and `contexts`."""
    n = NAME.encode("utf-16-le")
    blobs = []
    for i, c in enumerate(contexts):
        blob = c.pack()
        if i + 1 < len(contexts):
            blob += b"\0" * (-len(blob) % 8)
            blob = struct.pack("<I", len(blob)) + blob[4:]
        blobs.append(blob)
    ctx = b"".join(blobs)
    fixed_end = 64 + 56 + len(n)
    pad = -fixed_end % 8
    body = struct.pack(
        "<HBBIQQIIIIIHHII", 57, 0, 0xFF, 2, 0, 0, 0xC0000000, 0x80, 1, 5, 0x40, 64 + 56, len(n), fixed_end + pad, len(ctx)
    )
    return b.call(cmac_sign(key, b.header(CREATE, sid, tid=tid) + body + n + b"\0" * pad + ctx))


def raw_read(b, key, sid, tid, fid):
    body = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, len(DATA), 0, fid, 0, 0, 0, 0, 0) + b"\0"
    st, r = b.call(cmac_sign(key, b.header(READ, sid, tid=tid) + body))
    off, length = struct.unpack_from("<BxI", r, 64 + 2)
    return st, r[off : off + length]


def reconnect(guid, fid, create_guid, lease_key):
    """A DH2C of the handle from a new connection: the open, or the
    status it was refused with."""
    conn, s, tree = session(guid)
    lease = [lease_context(lease_key)]
    f, st = reconnect_v2(tree, NAME, fid, create_guid, lease, RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE)
    if f is None:
        conn.disconnect()
        return None, st, None
    return f, SUCCESS, conn


def main():
    guid, create_guid, lease_key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4().bytes
    a, s1, tree = session(guid)
    sid, tid = s1.session_id, tree.tree_connect_id
    b = Raw(guid)
    key = bind(b, sid, s1.signing_key)
    dh2q = SMB2CreateDurableHandleRequestV2()
    dh2q["timeout"] = 60000
    dh2q["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
    dh2q["create_guid"] = create_guid
    st, r = raw_create(
        b, key, sid, tid, [context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q), lease_context(lease_key)]
    )
    check(st == SUCCESS, f"B's DH2Q CREATE succeeded (got {st:#010x})")
    fid = r[64 + 64 : 64 + 80]
    check(b"DH2Q" in r[64 + 88 :], "a durable handle granted")
    wbody = struct.pack("<HHIQ16sIIHHI", 49, 64 + 48, len(DATA), 0, fid, 0, 0, 0, 0, 0) + DATA
    st, _ = b.call(cmac_sign(key, b.header(WRITE, sid, tid=tid) + wbody))
    check(st == SUCCESS, "B wrote through the handle")

    # A blocking LOCK of B waits (STATUS_PENDING) on B's other open.
    opens = []
    for _ in range(2):
        st, r = b.call(cmac_sign(key, b.header(CREATE, sid, tid=tid) + create_body("lock.txt")))
        check(st == SUCCESS, f"B opened lock.txt (got {st:#010x})")
        opens.append(r[64 + 64 : 64 + 80])

    def lock(fid, flags):
        return cmac_sign(key, b.header(LOCK, sid, tid=tid) + struct.pack("<HHI16sQQII", 48, 1, 0, fid, 0, 10, flags, 0))

    st, _ = b.call(lock(opens[0], EXCLUSIVE | FAIL_IMMEDIATELY))
    check(st == SUCCESS, "B's first open locked bytes 0-9")
    b.send(lock(opens[1], EXCLUSIVE))
    r = b.recv()
    check(struct.unpack_from("<I", r, 8)[0] == PENDING, "B's blocking LOCK on its second open pends")

    # 1. The home is reset; the channel goes on, its waiting LOCK too.
    reset(a.transport._sock)
    b.send(lock(opens[0], UNLOCK))
    got = sorted(
        (struct.unpack_from("<I", r, 16)[0] & FLAG_ASYNC, struct.unpack_from("<I", r, 8)[0])
        for r in (b.recv(), b.recv())
    )
    check(got == [(0, SUCCESS), (FLAG_ASYNC, SUCCESS)], f"after A's reset B's unlock lets its waiting LOCK in ({got})")
    for o in opens:
        st, _ = b.call(cmac_sign(key, b.header(CLOSE, sid, tid=tid) + struct.pack("<HHI16s", 24, 0, 0, o)))
        check(st == SUCCESS, "B closed an open of lock.txt")
    st, data = raw_read(b, key, sid, tid, fid)
    check(st == SUCCESS and data == DATA, f"B reads through the handle after A's reset (got {st:#010x})")

    # 2. A reconnect while the channel lives is refused.
    f, st, conn = reconnect(guid, fid, create_guid, lease_key)
    check(f is None, f"C's DH2C refused while B lives (got {st:#010x})")
    st, data = raw_read(b, key, sid, tid, fid)
    check(st == SUCCESS and data == DATA, f"B still reads after C's attempt (got {st:#010x})")

    # 3. The channel is reset too: the handle is resumed elsewhere.
    reset(b.s)
    deadline = time.monotonic() + 15
    while True:
        f, st, conn = reconnect(guid, fid, create_guid, lease_key)
        if f is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # the polling interval
    check(f is not None, f"D's DH2C resumed the handle once B is gone (last {st:#010x})")
    check(f.read(0, len(DATA)) == DATA, "D reads the data")
    f.close()
    conn.disconnect()
    print("PASS", flush=True)


main()
