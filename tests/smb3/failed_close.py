"""A CLOSE filterd could not commit is not acknowledged (rksmbd, smbprotocol).

Usage: failed_close.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose second commit fails (the first records the
persistent open, the second is its close). Opens closing.txt with a DH2Q
persistent context and an RWH lease, writes, and CLOSEs: the CLOSE must
fail with STATUS_INSUFFICIENT_RESOURCES (filterd undid it). Prints
"close refused" and waits for a line on stdin (the driver checks that
filterd still lists the handle). The FileId still works: a write and a
read through it; a second CLOSE succeeds. Prints "closed" and waits for a
line (the driver checks filterd lists nothing); then another client
opens the file for writing. Prints PASS; exits non-zero on any failure.
"""

import sys
import uuid

from smbprotocol.connection import Connection
from smbprotocol.create_contexts import (
    CreateContextName,
    DurableHandleFlags,
    LeaseState,
    SMB2CreateContextRequest,
    SMB2CreateDurableHandleRequestV2,
    SMB2CreateRequestLeaseV2,
)
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    SMB2CloseRequest,
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

STATUS_INSUFFICIENT_RESOURCES = 0xC000009A
DATA = b"written before the failed close\n"
MORE = b"and after it\n"
RWH = LeaseState.SMB2_LEASE_READ_CACHING | LeaseState.SMB2_LEASE_WRITE_CACHING | LeaseState.SMB2_LEASE_HANDLE_CACHING
RW = FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def connect():
    conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=True)
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


def close(conn, tree, file_id):
    """A CLOSE of `file_id`, sent as is: smbprotocol's Open.close takes an
    open for closed once it sent a CLOSE, whatever the answer (it would not
    send a second one)."""
    req = SMB2CloseRequest()
    req["file_id"] = file_id
    sent = conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id)
    conn.receive(sent)


def persistent_create(tree):
    dh2q = SMB2CreateDurableHandleRequestV2()
    dh2q["timeout"] = 60000
    dh2q["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
    dh2q["create_guid"] = uuid.uuid4()
    lease = SMB2CreateRequestLeaseV2()
    lease["lease_key"] = uuid.uuid4().bytes
    lease["lease_state"] = RWH
    lease["parent_lease_key"] = b"\x00" * 16
    lease["epoch"] = b"\x00\x00"
    f = Open(tree, "closing.txt")
    f.create(
        ImpersonationLevel.Impersonation,
        RW,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        ShareAccess.FILE_SHARE_READ,
        CreateDisposition.FILE_OVERWRITE_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
        create_contexts=[
            context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q),
            context(CreateContextName.SMB2_CREATE_REQUEST_LEASE_V2, lease),
        ],
        oplock_level=RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE,
    )
    return f


conn, tree = connect()
f = persistent_create(tree)
f.write(DATA, 0)
try:
    close(conn, tree, f.file_id)
    check(False, "the CLOSE whose commit failed is refused")
except SMBResponseException as e:
    check(e.status == STATUS_INSUFFICIENT_RESOURCES, f"the CLOSE whose commit failed is refused ({e.status:#x})")
print("close refused", flush=True)
sys.stdin.readline()

# The open is still the client's: its FileId reads and writes.
f.write(MORE, len(DATA))
check(f.read(0, len(DATA) + len(MORE)) == DATA + MORE, "the FileId still writes and reads")
close(conn, tree, f.file_id)
check(True, "the second CLOSE succeeds")
print("closed", flush=True)
sys.stdin.readline()

# Closed for good: another client's write open is granted.
other, other_tree = connect()
g = Open(other_tree, "closing.txt")
g.create(
    ImpersonationLevel.Impersonation,
    RW,
    FileAttributes.FILE_ATTRIBUTE_NORMAL,
    ShareAccess.FILE_SHARE_READ,
    CreateDisposition.FILE_OPEN,
    CreateOptions.FILE_NON_DIRECTORY_FILE,
)
check(g.read(0, 4096) == DATA + MORE, "another client opens the closed file")
g.close()
other.disconnect()
conn.disconnect()
print("PASS", flush=True)
