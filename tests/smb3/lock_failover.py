"""Byte-range locks on a persistent handle, driven line by line (rksmbd, smbprotocol).

Usage: lock_failover.py HOST PORT SHARE USER PASSWORD

Reads commands from stdin, one a line, and answers each with one line:
  open NAME [plain]       connect as a fixed client GUID and open NAME
                          with a DH2Q persistent context (no lease), or
                          with no context at all -> "opened"
  lock OFF LEN KIND I N   LOCK (KIND excl or shared, FAIL_IMMEDIATELY)
                          with LockSequenceIndex I and Number N (I 0:
                          none) -> "lock STATUS"
  unlock OFF LEN I N      an unlock, the same way -> "unlock STATUS"
  write OFF TEXT          WRITE -> "write STATUS"
  drop                    drop the TCP connection without LOGOFF
                          -> "dropped"
  reconnect PORT          connect again (same client GUID) to PORT and
                          resume the handle with DH2C -> "reconnected"
  done                    close the handle (again while the answer is
                          STATUS_FILE_NOT_AVAILABLE) -> "PASS", exit
STATUS is the NTSTATUS in hex (0x0 for STATUS_SUCCESS). Any other
failure prints "FAILED: ..." and exits non-zero.

The lock sequence goes into the request as MS-SMB2 2.2.26 has it
(smbtest.lock_in_sequence: smbprotocol packs it the wrong way round).
"""

import sys
import time
import uuid

from smbprotocol.create_contexts import (
    CreateContextName,
    DurableHandleFlags,
    SMB2CreateDurableHandleReconnectV2,
)
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, LockFlags, ShareAccess

from smbtest import args, connect, context, create_rw, lock_in_sequence, persistent_context

HOST, PORT, SHARE, USER, PASSWORD = args()
CLIENT_GUID = uuid.uuid4()
CREATE_GUID = uuid.uuid4()
FILE_NOT_AVAILABLE = 0xC0000467
SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


def fail(what):
    print(f"FAILED: {what}", flush=True)
    sys.exit(1)


def create(tree, name, ctx):
    """An open of `name` for reading and writing, sharing everything."""
    return create_rw(tree, name, CreateDisposition.FILE_OPEN_IF, [ctx] if ctx else [], share=SHARE_ALL)


def status_of(call):
    try:
        call()
        return 0
    except SMBResponseException as e:
        return e.status


conn = f = None
name = None
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    cmd, rest = words[0], words[1:]
    if cmd == "open":
        name = rest[0]
        conn, tree = connect(HOST, PORT, SHARE, USER, PASSWORD, CLIENT_GUID)
        plain = rest[1:] == ["plain"]
        f, resp = create(tree, name, None if plain else persistent_context(CREATE_GUID))
        durable = [r for r in resp if hasattr(r, "fields") and "timeout" in r.fields and "flags" in r.fields]
        persistent = len(durable) == 1 and durable[0]["flags"].has_flag(DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT)
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
    elif cmd == "write":
        st = status_of(lambda: f.write(rest[1].encode(), int(rest[0])))
        print(f"write {st:#x}", flush=True)
    elif cmd == "drop":
        conn.disconnect(close=False)
        print("dropped", flush=True)
    elif cmd == "reconnect":
        file_id = f.file_id
        conn, tree = connect(HOST, int(rest[0]), SHARE, USER, PASSWORD, CLIENT_GUID)
        dh2c = SMB2CreateDurableHandleReconnectV2()
        dh2c["file_id"] = file_id
        dh2c["create_guid"] = CREATE_GUID
        dh2c["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
        try:
            f, _ = create(tree, name, context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_RECONNECT_V2, dh2c))
        except SMBResponseException as e:
            fail(f"DH2C refused ({e.status:#x})")
        if f.file_id[:8] != file_id[:8]:
            fail("the same persistent file id")
        print("reconnected", flush=True)
    elif cmd == "done":
        # Again while rksmbd answers the retry status (it is back on a
        # restarted filterd and not yet resynced), as a client does.
        deadline = time.monotonic() + 20
        st = status_of(f.close)
        while st == FILE_NOT_AVAILABLE and time.monotonic() < deadline:
            st = status_of(f.close)
        if st != 0:
            fail(f"close {st:#x}")
        conn.disconnect()
        print("PASS", flush=True)
        sys.exit(0)
    else:
        fail(f"unknown command {cmd}")
fail("stdin ended before done")
