"""A replayed DH2Q after a DH2C on the same connection returns the open
the DH2C reattached (rksmbd, smbprotocol; MS-SMB2 3.3.5.9.10; review
rvnode, finding 7: it got a second volatile FileId for the same handle,
whose CLOSE closed the handle under the first).

Usage: replay_after_reconnect.py HOST PORT SHARE USER PASSWORD

For a persistent leased open and a durable open under a batch oplock: the
open is made and written, the client drops its TCP connection, a DH2C on
a new connection takes the open back, and the DH2Q CREATE is replayed
(SMB2_FLAGS_REPLAY_OPERATION, same create GUID, FILE_OVERWRITE_IF). The
replay answers the DH2C's FileId, persistent and volatile, and changes
nothing (the data is not truncated); one CLOSE of it closes the open, so
the DH2C's FileId is closed too, and another client then opens the file
sharing nothing. Prints PASS; exits non-zero on any failure.
"""

import uuid

from smbprotocol.create_contexts import CreateContextName, SMB2CreateDurableHandleRequestV2
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, ShareAccess

from smbtest import args, check, connect, context, create_rw, lease_context, open_exclusive, persistent_context, reconnect_v2, sent_as_replay

SERVER = args()
FILE_CLOSED = 0xC0000128
LEASE = 0xFF
BATCH = 0x09
SHARE = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE


def durable_context(create_guid):
    """A DH2Q asking for a durable (not persistent) handle."""
    dh2q = SMB2CreateDurableHandleRequestV2()
    dh2q["timeout"] = 60000
    dh2q["flags"] = 0
    dh2q["create_guid"] = create_guid
    return context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q)


def case(name, persistent):
    """Persistent and leased, or durable under a batch oplock."""
    create_guid = uuid.uuid4()
    dh2q = persistent_context(create_guid) if persistent else durable_context(create_guid)
    leased = persistent
    key = uuid.uuid4().bytes
    lease = [lease_context(key)] if leased else []
    level = LEASE if leased else BATCH
    client_guid = uuid.uuid4()
    conn, tree = connect(*SERVER, client_guid=client_guid)
    f, _ = create_rw(tree, name, CreateDisposition.FILE_OVERWRITE_IF, [dh2q, *lease], level, share=SHARE)
    f.write(b"DATA", 0)
    fid = f.file_id
    conn.disconnect(close=False)

    conn, tree = connect(*SERVER, client_guid=client_guid)
    g, st = reconnect_v2(tree, name, fid, create_guid, lease, level, persistent=persistent)
    check(st == 0, f"{name}: the DH2C takes the open back ({st:#x})")
    r, _ = sent_as_replay(lambda: create_rw(tree, name, CreateDisposition.FILE_OVERWRITE_IF, [dh2q, *lease], level, share=SHARE))
    check(r.file_id == g.file_id, f"{name}: the replay answers the DH2C's FileId ({r.file_id.hex()} vs {g.file_id.hex()})")
    check(g.read(0, 4) == b"DATA", f"{name}: the replay changed nothing (not truncated)")
    r.close()
    try:
        g.read(0, 4)
        check(False, f"{name}: the DH2C's FileId is closed with the replay's")
    except SMBResponseException as e:
        check(e.status == FILE_CLOSED, f"{name}: the DH2C's FileId is closed with the replay's ({e.status:#x})")
    conn.disconnect()
    open_exclusive(SERVER, name, b"DATA")


case("rp.txt", persistent=True)
case("rd.txt", persistent=False)
print("PASS", flush=True)
