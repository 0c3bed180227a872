"""What the smbprotocol scripts here share (import it from a script in this
directory: Python puts the script's directory on the path).

New scripts use these rather than copying them; the older scripts still
carry their own copies. Not durable_reconnect.py: rkdemo embeds that one
alone (include_str!) and runs it from elsewhere.
"""

import sys
import time
import uuid
from collections import OrderedDict

from smbprotocol import connection
from smbprotocol.connection import Connection
from smbprotocol.create_contexts import (
    CreateContextName,
    DurableHandleFlags,
    LeaseState,
    SMB2CreateAppInstanceId,
    SMB2CreateContextRequest,
    SMB2CreateDurableHandleReconnectV2,
    SMB2CreateDurableHandleRequestV2,
    SMB2CreateRequestLeaseV2,
)
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.file_info import FileDispositionInformation, FileEndOfFileInformation, InfoType
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    DirectoryAccessMask,
    SMB2CloseRequest,
    SMB2LockElement,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    SMB2SetInfoRequest,
    SMB2SetInfoResponse,
    ShareAccess,
)
from smbprotocol.header import Smb2Flags
from smbprotocol.structure import IntField, Structure
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

RWH = LeaseState.SMB2_LEASE_READ_CACHING | LeaseState.SMB2_LEASE_WRITE_CACHING | LeaseState.SMB2_LEASE_HANDLE_CACHING


def args():
    """HOST PORT SHARE USER PASSWORD from the command line."""
    return sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


def pause(line):
    """Prints `line` for the driver, waits for its line on stdin and
    returns it (stripped)."""
    print(line, flush=True)
    return sys.stdin.readline().strip()


def check(cond, what):
    """Prints "ok: WHAT", or "FAILED: WHAT" and exits 1."""
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def wait_stalled(log, line, timeout=20):
    """Waits until filterd's log `log` holds `line` (a failpoint's
    "failpoint NAME: stalling"); fails after `timeout` seconds."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        with open(log, errors="replace") as f:
            if line in f.read():
                return
        time.sleep(0.02)
    check(False, f"filterd's log says {line!r} within {timeout} s")


def connect(host, port, share, user, password, client_guid=None):
    """A signed SMB 3 connection, a session and a tree connect of `share`."""
    conn = Connection(client_guid or uuid.uuid4(), host, port, require_signing=True)
    conn.connect()
    session = Session(conn, user, password, require_encryption=False)
    session.connect()
    tree = TreeConnect(session, rf"\\{host}\{share}")
    tree.connect()
    return conn, tree


SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


def open_dir(tree, name, access=DirectoryAccessMask.FILE_LIST_DIRECTORY, disposition=CreateDisposition.FILE_OPEN):
    """An open of directory `name`, sharing all."""
    d = Open(tree, name)
    d.create(
        ImpersonationLevel.Impersonation,
        access,
        FileAttributes.FILE_ATTRIBUTE_DIRECTORY,
        SHARE_ALL,
        disposition,
        CreateOptions.FILE_DIRECTORY_FILE,
    )
    return d


def context(name, data):
    c = SMB2CreateContextRequest()
    c["buffer_name"] = name
    c["buffer_data"] = data
    return c


def lease_context(key, state=RWH):
    """A lease (v2) create context asking for `state`."""
    lease = SMB2CreateRequestLeaseV2()
    lease["lease_key"] = key
    lease["lease_state"] = state
    lease["parent_lease_key"] = b"\x00" * 16
    lease["epoch"] = b"\x00\x00"
    return context(CreateContextName.SMB2_CREATE_REQUEST_LEASE_V2, lease)


def persistent_context(create_guid, timeout_ms=60000):
    """A DH2Q create context asking for a persistent handle."""
    dh2q = SMB2CreateDurableHandleRequestV2()
    dh2q["timeout"] = timeout_ms
    dh2q["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
    dh2q["create_guid"] = create_guid
    return context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q)


def durable_v2(create_guid):
    """A DH2Q create context asking for a durable (not persistent) open."""
    dh2q = SMB2CreateDurableHandleRequestV2()
    dh2q["timeout"] = 60000
    dh2q["create_guid"] = create_guid
    return context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q)


def reconnect_context(file_id, create_guid, persistent=True):
    """A DH2C create context of open `file_id` (create GUID `create_guid`),
    persistent unless `persistent` is False."""
    dh2c = SMB2CreateDurableHandleReconnectV2()
    dh2c["file_id"] = file_id
    dh2c["create_guid"] = create_guid
    dh2c["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT if persistent else 0
    return context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_RECONNECT_V2, dh2c)


def reconnect_v2(tree, name, file_id, create_guid, contexts=(), oplock_level=0, persistent=True):
    """A DH2C (persistent, unless `persistent` is False: no
    SMB2_DHANDLE_FLAG_PERSISTENT) of open `file_id` (create GUID
    `create_guid`) of file `name` on `tree`, with `contexts` besides: (the
    Open, 0), or (None, the status it failed with)."""
    try:
        f, _ = create_rw(
            tree,
            name,
            CreateDisposition.FILE_OPEN,
            [reconnect_context(file_id, create_guid, persistent), *contexts],
            oplock_level,
        )
    except SMBResponseException as e:
        return None, e.status
    return f, 0


def reconnect_v2_retrying(tree, name, file_id, create_guid, bound=15.0, pace=0.1, **kw):
    """[`reconnect_v2`] (with its keyword arguments `kw`), sent again
    every `pace` s while it is told STATUS_FILE_NOT_AVAILABLE (the retry
    status), as a client does, for up to `bound` s: (the Open or None, the
    last status, the seconds it took)."""
    t0 = time.monotonic()
    while True:
        f, st = reconnect_v2(tree, name, file_id, create_guid, **kw)
        took = time.monotonic() - t0
        if f is not None or st != 0xC0000467 or took > bound:
            return f, st, took
        time.sleep(pace)


def close_refused(conn, tree, file_id):
    """A CLOSE of `file_id` on `tree` (of `conn`) that may fail: its
    status."""
    req = SMB2CloseRequest()
    req["file_id"] = file_id
    try:
        conn.receive(conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id))
        return 0
    except SMBResponseException as e:
        return e.status


def serving(tree, within=30):
    """Waits until rksmbd serves again (a CREATE of probe.txt on `tree`
    succeeds: it has reattached to a restarted filterd)."""
    deadline = time.monotonic() + within
    while True:
        try:
            open_rw(tree, "probe.txt", CreateDisposition.FILE_OVERWRITE_IF).close()
            return
        except SMBResponseException as e:
            if time.monotonic() > deadline:
                check(False, f"rksmbd serves again ({e.status:#010x})")
            time.sleep(0.05)


def open_rw(tree, name, disposition, contexts=(), oplock_level=0):
    """An open of file `name` for reading and writing, sharing reading."""
    return create_rw(tree, name, disposition, contexts, oplock_level)[0]


def create_file(tree, name, access, share, disposition=CreateDisposition.FILE_OPEN, options=0, contexts=(), oplock_level=0, send=True):
    """An open of file `name` with `access`, sharing `share`, with the
    create options `options` besides FILE_NON_DIRECTORY_FILE and the
    create contexts `contexts`: the Open and the create contexts of the
    response (`send` False: the Open and the request sent, its answer
    not waited for)."""
    f = Open(tree, name)
    resp = f.create(
        ImpersonationLevel.Impersonation,
        access,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        share,
        disposition,
        CreateOptions.FILE_NON_DIRECTORY_FILE | options,
        create_contexts=list(contexts),
        oplock_level=oplock_level,
        send=send,
    )
    if not send:
        return f, tree.session.connection.send(resp[0], tree.session.session_id, tree.tree_connect_id)
    return f, resp or []


def create_rw(tree, name, disposition, contexts=(), oplock_level=0, share=ShareAccess.FILE_SHARE_READ, extra=0, options=0):
    """An open of file `name` for reading and writing (and the access
    rights `extra`, with the create options `options`), sharing `share`:
    the Open and the create contexts of the response."""
    access = FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE | extra
    return create_file(tree, name, access, share, disposition, options, contexts, oplock_level)


def open_exclusive(server, name, data):
    """Another client opens file `name` sharing nothing (nothing of an
    old handle is left to refuse it) and reads `data` at its start."""
    other, other_tree = connect(*server)
    exclusive, _ = create_rw(other_tree, name, CreateDisposition.FILE_OPEN, share=0)
    check(exclusive.read(0, len(data)) == data, "another client opens the file sharing nothing, the data written")
    exclusive.close()
    other.disconnect()


def status_of(call):
    """The NTSTATUS `call` failed with, or 0."""
    try:
        call()
        return 0
    except SMBResponseException as e:
        return e.status


def lock_in_sequence(f, offset, length, flags, index, number, wait=True):
    """One LOCK element on open `f` with LockSequenceIndex `index` and
    LockSequenceNumber `number` (raises SMBResponseException on failure;
    `wait` False: returns the sent request instead of waiting for it).
    smbprotocol's Open.lock packs the sequence as Number << 28 | Index;
    MS-SMB2 2.2.26 puts the Number in the low 4 bits and the Index in the
    28 above, so the request's field is set here."""
    e = SMB2LockElement()
    e["offset"] = offset
    e["length"] = length
    e["flags"] = flags
    req, receive = f.lock([e], send=False)
    req["lock_sequence"] = (index << 4) | number
    session = f.tree_connect.session
    sent = f.connection.send(req, session.session_id, f.tree_connect.tree_connect_id)
    if not wait:
        return sent
    receive(sent)


def sent_as_replay(call):
    """Runs `call`, every request it sends flagged
    SMB2_FLAGS_REPLAY_OPERATION (smbprotocol has no way to ask for it: the
    flag must be in the header before the header is signed)."""
    made = connection.SMB2HeaderRequest

    def replayed():
        header = made()
        header["flags"].set_flag(Smb2Flags.SMB2_FLAGS_REPLAY_OPERATIONS)
        return header

    connection.SMB2HeaderRequest = replayed
    try:
        return call()
    finally:
        connection.SMB2HeaderRequest = made


def send_set_info(tree, op, info):
    """Sends SET_INFO of `info` (a smbprotocol file information structure)
    on open `op` without waiting: the request, for `receive`."""
    req = SMB2SetInfoRequest()
    req["info_type"] = info.INFO_TYPE
    req["file_info_class"] = info.INFO_CLASS
    req["file_id"] = op.file_id
    req["buffer"] = info
    return tree.session.connection.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id)


def set_info_status(tree, op, info):
    """Sends SET_INFO of `info` on open `op`; returns the status (0 on
    success)."""
    conn = tree.session.connection
    sent = send_set_info(tree, op, info)
    try:
        SMB2SetInfoResponse().unpack(conn.receive(sent)["data"].get_value())
        return 0
    except SMBResponseException as e:
        return e.status


def open_app_instance(tree, name, app, disposition=CreateDisposition.FILE_OPEN_IF, share=ShareAccess.FILE_SHARE_READ, extra=0):
    """A persistent open (new create GUID) of file `name` for reading and
    writing (and the access rights `extra`), sharing `share`, under
    AppInstanceId `app` (16 bytes)."""
    a = SMB2CreateAppInstanceId()
    a["app_instance_id"] = app
    contexts = [
        persistent_context(uuid.uuid4()),
        context(CreateContextName.SMB2_CREATE_APP_INSTANCE_ID, a),
    ]
    return create_rw(tree, name, disposition, contexts, share=share, extra=extra)[0]


def delete_pending_gives_up(tree, f):
    """A delete-pending SET_INFO on open `f` sent while the driver stopped
    filterd: it must fail with STATUS_FILE_NOT_AVAILABLE (the call and the
    query of its outcome gave up). Prints "gave up" and waits for a line."""
    info = FileDispositionInformation()
    info["delete_pending"] = True
    st = set_info_status(tree, f, info)
    check(st == 0xC0000467, f"the delete-pending SET_INFO failed with FILE_NOT_AVAILABLE (got {st:#010x})")
    pause("gave up")


class FileAllocationInformation(Structure):
    """[MS-FSCC] 2.4.4 FileAllocationInformation (smbprotocol has none)."""

    INFO_TYPE = InfoType.SMB2_0_INFO_FILE
    INFO_CLASS = 19

    def __init__(self):
        self.fields = OrderedDict([("allocation_size", IntField(size=8))])
        super().__init__()


def end_of_file(tree, f, size):
    """SET_INFO FileEndOfFile `size` on open `f`: the status (0 on success)."""
    info = FileEndOfFileInformation()
    info["end_of_file"] = size
    return set_info_status(tree, f, info)


def allocation(tree, f, size):
    """SET_INFO FileAllocation `size` on open `f`: the status (0 on success)."""
    info = FileAllocationInformation()
    info["allocation_size"] = size
    return set_info_status(tree, f, info)


def write_status(f, data, offset):
    """WRITE of `data` at `offset` on open `f`: the status (0 on success)."""
    try:
        f.write(data, offset)
        return 0
    except SMBResponseException as e:
        return e.status


def refused_within(tree, f, what):
    """Open `f` (append-only: no FILE_WRITE_DATA) is refused a WRITE at
    offset 0, FileEndOfFile and FileAllocation, each
    STATUS_ACCESS_DENIED; `what` names it in the checks."""
    denied = 0xC0000022
    st = write_status(f, b"XX", 0)
    check(st == denied, f"{what}: a WRITE at offset 0 is STATUS_ACCESS_DENIED ({st:#x})")
    st = end_of_file(tree, f, 1)
    check(st == denied, f"{what}: the end of file is STATUS_ACCESS_DENIED ({st:#x})")
    st = allocation(tree, f, 1)
    check(st == denied, f"{what}: the allocation is STATUS_ACCESS_DENIED ({st:#x})")
