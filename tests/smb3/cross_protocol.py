"""Persistent handles opened through rksmbd hold against other protocols.

Usage: cross_protocol.py HOST PORT SHARE USER PASSWORD

Opens two files with a DH2Q persistent context and an RWH lease (v2) each,
and writes to both:
  locked.txt  shared with nobody (a local process counts as a reader, so
              only a share mode without READ keeps local writers out);
  shared.txt  shared for reading (local readers come in, and break the
              lease's write caching first).
Prints "opened", then acknowledges every LEASE_BREAK rksmbd sends, printing
"break FILE CURRENT NEW" before the acknowledgement and "acked FILE" after
it, until a line "done" arrives on stdin; then closes both handles and
prints "PASS". Exits non-zero on any failure.

smbprotocol has no API for server-initiated messages (its receive thread
looks every message id up among its outstanding requests): the lease
breaks (message id 0xFFFFFFFFFFFFFFFF) are caught by a table that makes a
pending request for that id whenever one arrives.
"""

import queue
import sys
import threading
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
from smbprotocol.header import Commands
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

from server_messages import LeaseBreakAck, Requests

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
RWH = LeaseState.SMB2_LEASE_READ_CACHING | LeaseState.SMB2_LEASE_WRITE_CACHING | LeaseState.SMB2_LEASE_HANDLE_CACHING


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def caching(state):
    # SMB2_LEASE_READ_CACHING 1, _HANDLE_CACHING 2, _WRITE_CACHING 4
    return "".join(c for bit, c in ((1, "R"), (4, "W"), (2, "H")) if state & bit) or "none"


def context(name, data):
    c = SMB2CreateContextRequest()
    c["buffer_name"] = name
    c["buffer_data"] = data
    return c


def open_persistent(tree, name, share, key):
    dh2q = SMB2CreateDurableHandleRequestV2()
    dh2q["timeout"] = 60000
    dh2q["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
    dh2q["create_guid"] = uuid.uuid4()
    lease = SMB2CreateRequestLeaseV2()
    lease["lease_key"] = key
    lease["lease_state"] = RWH
    lease["parent_lease_key"] = b"\x00" * 16
    lease["epoch"] = b"\x00\x00"
    f = Open(tree, name)
    resp = f.create(
        ImpersonationLevel.Impersonation,
        FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        share,
        CreateDisposition.FILE_OVERWRITE_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
        create_contexts=[
            context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q),
            context(CreateContextName.SMB2_CREATE_REQUEST_LEASE_V2, lease),
        ],
        oplock_level=RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE,
    ) or []
    durable = [r for r in resp if hasattr(r, "fields") and "timeout" in r.fields and "flags" in r.fields]
    check(
        len(durable) == 1 and durable[0]["flags"].has_flag(DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT),
        f"{name}: persistent handle granted",
    )
    leases = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
    check(len(leases) == 1 and leases[0]["lease_state"].get_value() == RWH, f"{name}: RWH lease granted")
    f.write(f"{name} written through rksmbd\n".encode(), 0)
    return f


conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=True)
conn.connect()
session = Session(conn, USER, PASSWORD, require_encryption=False)
session.connect()
tree = TreeConnect(session, rf"\\{HOST}\{SHARE}")
tree.connect()
arrived = queue.Queue()
conn.outstanding_requests = Requests(conn, arrived, conn.outstanding_requests)

keys = {}
handles = []
for name, share in (("locked.txt", 0), ("shared.txt", ShareAccess.FILE_SHARE_READ)):
    key = uuid.uuid4().bytes
    keys[key] = name
    handles.append(open_persistent(tree, name, share, key))
print("opened", flush=True)

done = threading.Event()


def wait_for_done():
    sys.stdin.readline()
    done.set()


threading.Thread(target=wait_for_done, daemon=True).start()
while not done.is_set():
    try:
        r = arrived.get(timeout=0.05)
    except queue.Empty:
        continue
    check(r.response_event.wait(10), "a server-initiated message arrived whole")
    h = r.response
    check(h["command"].get_value() == Commands.SMB2_OPLOCK_BREAK, "it is a break notification")
    body = h["data"].get_value()
    # [MS-SMB2] 2.2.23.2: StructureSize 44, NewEpoch, Flags, LeaseKey,
    # CurrentLeaseState, NewLeaseState, ...
    check(len(body) >= 44 and int.from_bytes(body[0:2], "little") == 44, "a LEASE_BREAK notification")
    flags = int.from_bytes(body[4:8], "little")
    key = body[8:24]
    current = int.from_bytes(body[24:28], "little")
    new = int.from_bytes(body[28:32], "little")
    name = keys.get(key)
    check(name is not None, "the break names one of our lease keys")
    print(f"break {name} {caching(current)} {caching(new)}", flush=True)
    if flags & 1:  # SMB2_NOTIFY_BREAK_LEASE_FLAG_ACK_REQUIRED
        ack = LeaseBreakAck()
        ack["lease_key"] = key
        ack["lease_state"] = new
        req = conn.send(ack, sid=session.session_id, tid=tree.tree_connect_id)
        conn.receive(req)
    print(f"acked {name}", flush=True)

for f in handles:
    f.close()
conn.disconnect()
print("PASS", flush=True)
