"""Byte-range locks on a persistent handle, driven line by line (rksmbd, smbprotocol).

Usage: lock_failover.py HOST PORT SHARE USER PASSWORD

Reads commands from stdin, one a line, and answers each with one line:
  open NAME [plain]       connect as a fixed client GUID and open NAME
                          with a DH2Q persistent context (no lease), or
                          with no context at all -> "opened"
  open NAME renamable     the persistent open, with DELETE access too
                          -> "opened"
  open NAME deleting      the same with FILE_DELETE_ON_CLOSE -> "opened",
                          or "refused STATUS"
  open NAME durable MS    the same with a DH2Q durable (not persistent)
                          context asking for a timeout of MS ms and an
                          RWH lease (v2) -> "opened lease STATE timeout T"
                          (what was granted)
  open NAME durable MS rh the same asking for an RH lease
  lock OFF LEN KIND I N   LOCK (KIND excl or shared, FAIL_IMMEDIATELY)
                          with LockSequenceIndex I and Number N (I 0:
                          none) -> "lock STATUS"
  unlock OFF LEN I N      an unlock, the same way -> "unlock STATUS"
  write OFF TEXT          WRITE -> "write STATUS"
  firstwrite OFF TEXT     WRITE through the handle `open` made, on its own
                          connection (kept open by a reconnect)
                          -> "firstwrite STATUS"
  eof SIZE                SET_INFO FileEndOfFileInformation -> "eof STATUS"
  rename NAME             SET_INFO FileRenameInformation to NAME, not
                          replacing -> "rename STATUS"
  drop                    drop the TCP connection without LOGOFF
                          -> "dropped"
  reconnect PORT          connect again (same client GUID) to PORT and
                          resume the handle with DH2C (and the lease, if
                          any) -> "reconnected lease STATE", or
                          "refused STATUS"
  replay PORT             connect again (same client GUID) to PORT and send
                          the open's DH2Q CREATE again, flagged
                          SMB2_FLAGS_REPLAY_OPERATION -> "replayed STATUS
                          same|other" (the persistent FileId half the
                          open had, or another)
  blocking OFF LEN I N    an exclusive LOCK without FAIL_IMMEDIATELY: the
                          interim response -> "blocking STATUS" (0x103:
                          pending; else the final one)
  final                   the pending LOCK's final response (read from the
                          connection it was sent on, kept open by a
                          reconnect) -> "final STATUS"
  cancel                  send a CANCEL of the pending LOCK -> "cancel sent"
  break SECONDS           the next lease break notification rksmbd sent
                          since the open (waiting up to SECONDS) -> "break
                          CURRENT NEW FLAGS" (lease states and flags in
                          hex), or "break none"
  done                    close the handle (again while the answer is
                          STATUS_FILE_NOT_AVAILABLE) -> "PASS", exit
STATUS is the NTSTATUS in hex (0x0 for STATUS_SUCCESS). Any other
failure prints "FAILED: ..." and exits non-zero.

The lock sequence goes into the request as MS-SMB2 2.2.26 has it
(smbtest.lock_in_sequence: smbprotocol packs it the wrong way round).
"""

import queue
import sys
import time
import uuid

from smbprotocol.create_contexts import (
    CreateContextName,
    DurableHandleFlags,
    SMB2CreateDurableHandleReconnectV2,
    SMB2CreateDurableHandleRequestV2,
)
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.file_info import FileEndOfFileInformation, FileRenameInformation
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FilePipePrinterAccessMask,
    LockFlags,
    RequestedOplockLevel,
    ShareAccess,
    SMB2LockElement,
)

from server_messages import Requests
from smbtest import (
    args,
    connect,
    context,
    create_rw,
    lease_context,
    lock_in_sequence,
    persistent_context,
    sent_as_replay,
    set_info_status,
    status_of,
)

HOST, PORT, SHARE, USER, PASSWORD = args()
CLIENT_GUID = uuid.uuid4()
CREATE_GUID = uuid.uuid4()
LEASE_KEY = uuid.uuid4().bytes
FILE_NOT_AVAILABLE = 0xC0000467
STATUS_PENDING = 0x103
RWH, RH = 7, 3
SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


def fail(what):
    print(f"FAILED: {what}", flush=True)
    sys.exit(1)


def create(tree, name, contexts, send=True):
    """An open of `name` for reading and writing (and deleting, when
    `renamable`), sharing everything (under a lease when `contexts` ask
    for one)."""
    leased = any(c["buffer_name"].get_value() == CreateContextName.SMB2_CREATE_REQUEST_LEASE_V2 for c in contexts)
    level = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE if leased else 0
    extra = FilePipePrinterAccessMask.DELETE if renamable or deleting else 0
    options = CreateOptions.FILE_DELETE_ON_CLOSE if deleting else 0
    return create_rw(
        tree, name, CreateDisposition.FILE_OPEN_IF, contexts, level, share=SHARE_ALL, extra=extra, options=options
    )


def rename_to(f, to):
    """SET_INFO FileRenameInformation of open `f` to `to`, not replacing:
    its status."""
    info = FileRenameInformation()
    info["replace_if_exists"] = False
    info["file_name"] = to
    return set_info_status(f.tree_connect, f, info)


def durable_context(timeout_ms):
    """A DH2Q create context asking for a durable, not persistent, handle."""
    dh2q = SMB2CreateDurableHandleRequestV2()
    dh2q["timeout"] = timeout_ms
    dh2q["flags"] = 0
    dh2q["create_guid"] = CREATE_GUID
    return context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q)


def granted(resp, field):
    """The response context carrying `field` (the DH2Q or lease response)."""
    found = [r for r in resp if hasattr(r, "fields") and field in r.fields]
    return found[0] if len(found) == 1 else None


def lease_of(resp):
    lease = granted(resp, "lease_state")
    return lease["lease_state"].get_value() if lease else 0


conn = f = first_f = None
name = None
renamable = deleting = False
opened_with = []
durable = False
pending = pending_conn = None
breaks = queue.Queue()
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    cmd, rest = words[0], words[1:]
    if cmd == "open":
        name = rest[0]
        conn, tree = connect(HOST, PORT, SHARE, USER, PASSWORD, CLIENT_GUID)
        conn.outstanding_requests = Requests(conn, breaks, conn.outstanding_requests)
        plain = rest[1:] == ["plain"]
        renamable = rest[1:] == ["renamable"]
        deleting = rest[1:] == ["deleting"]
        durable = rest[1:2] == ["durable"]
        if plain:
            opened_with = []
        elif durable:
            state = RH if rest[3:] == ["rh"] else RWH
            opened_with = [durable_context(int(rest[2])), lease_context(LEASE_KEY, state)]
        else:
            opened_with = [persistent_context(CREATE_GUID)]
        try:
            f, resp = create(tree, name, opened_with)
        except SMBResponseException as e:
            print(f"refused {e.status:#x}", flush=True)
            continue
        first_f = f
        dh2q = granted(resp, "timeout")
        persistent = dh2q is not None and dh2q["flags"].has_flag(DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT)
        if durable:
            if dh2q is None or persistent:
                fail("a durable, not persistent, handle granted")
            print(f"opened lease {lease_of(resp):#x} timeout {dh2q['timeout'].get_value()}", flush=True)
            continue
        if not plain and not persistent:
            fail("persistent handle granted")
        print("opened", flush=True)
    elif cmd in ("lock", "unlock"):
        off, length = int(rest[0]), int(rest[1])
        if cmd == "lock":
            kind = LockFlags.SMB2_LOCKFLAG_EXCLUSIVE_LOCK if rest[2] == "excl" else LockFlags.SMB2_LOCKFLAG_SHARED_LOCK
            flags = kind | LockFlags.SMB2_LOCKFLAG_FAIL_IMMEDIATELY
            index, number = int(rest[3]), int(rest[4])
        else:
            flags = LockFlags.SMB2_LOCKFLAG_UNLOCK
            index, number = int(rest[2]), int(rest[3])
        st = status_of(lambda: lock_in_sequence(f, off, length, flags, index, number))
        print(f"{cmd} {st:#x}", flush=True)
    elif cmd == "lockfirst":
        # An exclusive FAIL_IMMEDIATELY LOCK without a lock sequence as the
        # first request of a compound (a READ after it): it cannot go async.
        e = SMB2LockElement()
        e["offset"], e["length"] = int(rest[0]), int(rest[1])
        e["flags"] = LockFlags.SMB2_LOCKFLAG_EXCLUSIVE_LOCK | LockFlags.SMB2_LOCKFLAG_FAIL_IMMEDIATELY
        lock_req, _ = f.lock([e], send=False)
        read_req, _ = f.read(0, 1, send=False)
        session = f.tree_connect.session
        sent = f.connection.send_compound([lock_req, read_req], session.session_id, f.tree_connect.tree_connect_id)
        st = status_of(lambda: f.connection.receive(sent[0]))
        status_of(lambda: f.connection.receive(sent[1]))
        print(f"lockfirst {st:#x}", flush=True)
    elif cmd == "blocking":
        off, length, index, number = (int(w) for w in rest[:4])
        pending = lock_in_sequence(f, off, length, LockFlags.SMB2_LOCKFLAG_EXCLUSIVE_LOCK, index, number, wait=False)
        pending_conn = f.connection
        # (Read the interim response in place: receive(wait=False) would
        # forget the request, and the final response with it.)
        if not pending.response_event.wait(timeout=30):
            fail("no answer to the blocking LOCK")
        with pending.response_event_lock:
            st = pending.response["status"].get_value()
        print(f"blocking {st:#x}", flush=True)
    elif cmd == "cancel":
        pending.cancel()
        print("cancel sent", flush=True)
    elif cmd == "final":
        st = status_of(lambda: pending_conn.receive(pending, wait=True, timeout=30))
        print(f"final {st:#x}", flush=True)
    elif cmd == "break":
        try:
            r = breaks.get(timeout=float(rest[0]))
        except queue.Empty:
            print("break none", flush=True)
            continue
        if not r.response_event.wait(10):
            fail("a server-initiated message arrived whole")
        body = r.response["data"].get_value()
        # [MS-SMB2] 2.2.23.2: StructureSize 44, NewEpoch, Flags, LeaseKey,
        # CurrentLeaseState, NewLeaseState, ...
        if len(body) < 44 or int.from_bytes(body[0:2], "little") != 44 or body[8:24] != LEASE_KEY:
            fail(f"a LEASE_BREAK notification of our lease: {body.hex()}")
        current, new = int.from_bytes(body[24:28], "little"), int.from_bytes(body[28:32], "little")
        print(f"break {current:#x} {new:#x} {int.from_bytes(body[4:8], 'little'):#x}", flush=True)
    elif cmd == "write":
        st = status_of(lambda: f.write(rest[1].encode(), int(rest[0])))
        print(f"write {st:#x}", flush=True)
    elif cmd == "firstwrite":
        st = status_of(lambda: first_f.write(rest[1].encode(), int(rest[0])))
        print(f"firstwrite {st:#x}", flush=True)
    elif cmd == "eof":
        info = FileEndOfFileInformation()
        info["end_of_file"] = int(rest[0])
        print(f"eof {set_info_status(f.tree_connect, f, info):#x}", flush=True)
    elif cmd == "rename":
        st = rename_to(f, rest[0])
        if st == 0:
            name = rest[0]
        print(f"rename {st:#x}", flush=True)
    elif cmd == "drop":
        conn.disconnect(close=False)
        print("dropped", flush=True)
    elif cmd == "reconnect":
        file_id = f.file_id
        conn, tree = connect(HOST, int(rest[0]), SHARE, USER, PASSWORD, CLIENT_GUID)
        dh2c = SMB2CreateDurableHandleReconnectV2()
        dh2c["file_id"] = file_id
        dh2c["create_guid"] = CREATE_GUID
        dh2c["flags"] = 0 if durable else DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
        ctxs = [context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_RECONNECT_V2, dh2c)]
        try:
            f, resp = create(tree, name, ctxs + opened_with[1:])
        except SMBResponseException as e:
            print(f"refused {e.status:#x}", flush=True)
            continue
        if f.file_id[:8] != file_id[:8]:
            fail("the same persistent file id")
        print(f"reconnected lease {lease_of(resp):#x}", flush=True)
    elif cmd == "replay":
        file_id = f.file_id
        conn, tree = connect(HOST, int(rest[0]), SHARE, USER, PASSWORD, CLIENT_GUID)
        try:
            f, _ = sent_as_replay(lambda: create(tree, name, opened_with))
        except SMBResponseException as e:
            print(f"replayed {e.status:#x}", flush=True)
            continue
        print(f"replayed 0x0 {'same' if f.file_id[:8] == file_id[:8] else 'other'}", flush=True)
    elif cmd == "done":
        # Again while rksmbd answers the retry status (it is back on a
        # restarted filterd and not yet resynced), as a client does.
        deadline = time.monotonic() + 20
        st = status_of(f.close)
        while st == FILE_NOT_AVAILABLE and time.monotonic() < deadline:
            st = status_of(f.close)
        if st != 0:
            fail(f"close {st:#x}")
        # A close rksmbd could not get filterd to answer across the
        # restart may still be settling (rksmbd closes it again until
        # filterd answers): TREE_DISCONNECT is the retry status until it
        # is made. Again, as a client that keeps the tree does
        # (docs/smb3.md, TREE_DISCONNECT).
        st = status_of(tree.disconnect)
        while st == FILE_NOT_AVAILABLE and time.monotonic() < deadline:
            time.sleep(0.05)
            st = status_of(tree.disconnect)
        if st != 0:
            fail(f"tree disconnect {st:#x}")
        conn.disconnect()
        print("PASS", flush=True)
        sys.exit(0)
    else:
        fail(f"unknown command {cmd}")
fail("stdin ended before done")
