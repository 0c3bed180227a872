"""A blocking lock waits without stalling its connection (rksmbd, smbprotocol).

Usage: blocking_lock.py HOST PORT SHARE USER PASSWORD

Client A locks bytes 0..10 of lock.txt. Client B, on its own connection,
asks for the same range without FAIL_IMMEDIATELY: the answer is an
interim STATUS_PENDING; B's connection meanwhile serves a WRITE; A
unlocks from its connection, and B's lock is granted (the final
response). Prints one line per step; exits non-zero on any failure.
"""

import sys
import uuid

from smbprotocol.connection import Connection
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    LockFlags,
    Open,
    ShareAccess,
    SMB2LockElement,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
STATUS_PENDING = 0x103


def connect():
    conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=True)
    conn.connect()
    session = Session(conn, USER, PASSWORD, require_encryption=False)
    session.connect()
    tree = TreeConnect(session, rf"\\{HOST}\{SHARE}")
    tree.connect()
    return conn, session, tree


def open_file(tree):
    f = Open(tree, "lock.txt")
    f.create(
        ImpersonationLevel.Impersonation,
        FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
        CreateDisposition.FILE_OPEN_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
    )
    return f


def element(flags):
    e = SMB2LockElement()
    e["offset"] = 0
    e["length"] = 10
    e["flags"] = flags
    return e


def async_id(hdr):
    # smbprotocol parses every response header in its sync form.
    return hdr["reserved"].get_value() | hdr["tree_id"].get_value() << 32


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


conn_a, _, tree_a = connect()
conn_b, session_b, tree_b = connect()
fa = open_file(tree_a)
fb = open_file(tree_b)
fa.lock([element(LockFlags.SMB2_LOCKFLAG_EXCLUSIVE_LOCK | LockFlags.SMB2_LOCKFLAG_FAIL_IMMEDIATELY)])
print("ok: A holds 0..10", flush=True)

msg, _ = fb.lock([element(LockFlags.SMB2_LOCKFLAG_EXCLUSIVE_LOCK)], send=False)
request = conn_b.send(msg, session_b.session_id, tree_b.tree_connect_id)
# (Read the interim response in place: receive(wait=False) would forget
# the request, and the final response with it.)
check(request.response_event.wait(timeout=30), "B gets an answer at once")
with request.response_event_lock:
    interim = request.response
check(interim["status"].get_value() == STATUS_PENDING, "B's blocking lock is pending")
check(interim["flags"].get_value() & 0x2 != 0, "the interim response is async")

fb.write(b"written while the lock waits", 100)
print("ok: B's connection serves a WRITE meanwhile", flush=True)

fa.lock([element(LockFlags.SMB2_LOCKFLAG_UNLOCK)])
print("ok: A unlocked", flush=True)
final = conn_b.receive(request, wait=True, timeout=30)
check(final["status"].get_value() == 0, "B's lock is granted")
check(async_id(final) == async_id(interim) != 0, "with the interim's AsyncId")

fb.close()
fa.close()
conn_a.disconnect()
conn_b.disconnect()
print("PASS", flush=True)
