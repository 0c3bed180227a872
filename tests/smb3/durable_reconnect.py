"""A persistent handle survives a dropped TCP connection (rksmbd, smbprotocol).

Usage: durable_reconnect.py HOST PORT SHARE USER PASSWORD

Opens durable.txt with a DH2Q persistent context and an RWH lease (v2),
writes, drops the TCP connection without LOGOFF and prints "dropped";
then reads a port from stdin (the driver may meanwhile kill and replace
rksmbd, or rksmbd and filterd), checks that another client's conflicting
open through that port is refused, reconnects with the same client GUID
and a DH2C context, and reads the data back through the resumed handle.
Prints one line per step; exits non-zero on any failure.
"""

import sys
import uuid

from smbprotocol.connection import Connection
from smbprotocol.create_contexts import (
    CreateContextName,
    DurableHandleFlags,
    LeaseState,
    SMB2CreateContextRequest,
    SMB2CreateDurableHandleReconnectV2,
    SMB2CreateDurableHandleRequestV2,
    SMB2CreateRequestLeaseV2,
)
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    RequestedOplockLevel,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
DATA = b"persistent data survives the drop\n"
RWH = LeaseState.SMB2_LEASE_READ_CACHING | LeaseState.SMB2_LEASE_WRITE_CACHING | LeaseState.SMB2_LEASE_HANDLE_CACHING


def connect(client_guid):
    conn = Connection(client_guid, HOST, PORT, require_signing=True)
    conn.connect()
    session = Session(conn, USER, PASSWORD, require_encryption=False)
    session.connect()
    tree = TreeConnect(session, rf"\\{HOST}\{SHARE}")
    tree.connect()
    return conn, tree


def context(name, data):
    c = SMB2CreateContextRequest()
    c["buffer_name"] = name
    c["buffer_data"] = data
    return c


def lease_context(key):
    lease = SMB2CreateRequestLeaseV2()
    lease["lease_key"] = key
    lease["lease_state"] = RWH
    lease["parent_lease_key"] = b"\x00" * 16
    lease["epoch"] = b"\x00\x00"
    return context(CreateContextName.SMB2_CREATE_REQUEST_LEASE_V2, lease)


def create(tree, contexts, disposition, access):
    f = Open(tree, "durable.txt")
    resp = f.create(
        ImpersonationLevel.Impersonation,
        access,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        ShareAccess.FILE_SHARE_READ,
        disposition,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
        create_contexts=contexts,
        oplock_level=RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE if contexts else 0,
    )
    return f, resp or []


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


client_guid = uuid.uuid4()
create_guid = uuid.uuid4()
lease_key = uuid.uuid4().bytes

conn, tree = connect(client_guid)
dh2q = SMB2CreateDurableHandleRequestV2()
dh2q["timeout"] = 60000
dh2q["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
dh2q["create_guid"] = create_guid
rw = FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE
f, resp = create(
    tree,
    [context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q), lease_context(lease_key)],
    CreateDisposition.FILE_OVERWRITE_IF,
    rw,
)
durable = [r for r in resp if hasattr(r, "fields") and "timeout" in r.fields and "flags" in r.fields]
check(len(durable) == 1, "DH2Q granted")
check(durable[0]["flags"].has_flag(DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT), "granted persistent")
check(durable[0]["timeout"].get_value() == 60000, "timeout 60000 ms")
leases = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
check(len(leases) == 1 and leases[0]["lease_state"].get_value() != 0, "a lease granted")
check(f.create_action == 2, "file created")
check(f.file_attributes == FileAttributes.FILE_ATTRIBUTE_ARCHIVE, "new file is exactly ARCHIVE")
f.write(DATA, 0)
file_id = f.file_id
conn.disconnect(close=False)
print("dropped the TCP connection", flush=True)
PORT = int(sys.stdin.readline())

# Meanwhile another client may not write the file: the disconnected
# persistent handle still holds it.
other, other_tree = connect(uuid.uuid4())
try:
    create(other_tree, [], CreateDisposition.FILE_OPEN, FilePipePrinterAccessMask.GENERIC_WRITE)
    check(False, "conflicting open refused")
except SMBResponseException as e:
    check(e.status in (0xC0000467, 0xC0000043), f"conflicting open refused ({e.status:#x})")
other.disconnect()

conn2, tree2 = connect(client_guid)
dh2c = SMB2CreateDurableHandleReconnectV2()
dh2c["file_id"] = file_id
dh2c["create_guid"] = create_guid
dh2c["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
f2, resp2 = create(
    tree2,
    [context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_RECONNECT_V2, dh2c), lease_context(lease_key)],
    CreateDisposition.FILE_OPEN,
    rw,
)
check(f2.file_id[:8] == file_id[:8], "same persistent file id")
check(f2.end_of_file == len(DATA), "size kept")
check(f2.read(0, len(DATA)) == DATA, "data read back through the resumed handle")
f2.close()
conn2.disconnect()
print("PASS", flush=True)
