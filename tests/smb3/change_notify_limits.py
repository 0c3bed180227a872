"""CHANGE_NOTIFY's limits (rksmbd, smbprotocol).

Usage: change_notify_limits.py HOST PORT SHARE USER PASSWORD

The export has directories watched/ and d0 .. d64. 140 connections (more
than fs.inotify.max_user_instances' default of 128) each wait with a
CHANGE_NOTIFY on watched/; a file created there answers every one of them
with its name. A CHANGE_NOTIFY on an open without FILE_LIST_DIRECTORY is
STATUS_ACCESS_DENIED (MS-SMB2 3.3.5.19). One connection may watch 64
directories: its CHANGE_NOTIFY on a 65th is STATUS_INSUFFICIENT_RESOURCES,
and once one of its requests ends, one on the 65th waits again. Prints
PASS, or exits non-zero.
"""

import sys
import uuid

from smbprotocol.change_notify import CompletionFilter, FileSystemWatcher
from smbprotocol.connection import Connection
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    DirectoryAccessMask,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
STATUS_ACCESS_DENIED = 0xC0000022
STATUS_INSUFFICIENT_RESOURCES = 0xC000009A
ALL_SHARE = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE
CONNECTIONS = 140
PER_CONNECTION = 64


def check(ok, what):
    if not ok:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def connect():
    conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=True)
    conn.connect()
    s = Session(conn, USER, PASSWORD, require_encryption=False)
    s.connect()
    tree = TreeConnect(s, rf"\\{HOST}\{SHARE}")
    tree.connect()
    return conn, tree


def open_dir(tree, name, access=DirectoryAccessMask.FILE_LIST_DIRECTORY | DirectoryAccessMask.FILE_READ_ATTRIBUTES):
    d = Open(tree, name)
    d.create(
        ImpersonationLevel.Impersonation,
        access,
        FileAttributes.FILE_ATTRIBUTE_DIRECTORY,
        ALL_SHARE,
        CreateDisposition.FILE_OPEN,
        CreateOptions.FILE_DIRECTORY_FILE,
    )
    return d


def watch(d):
    w = FileSystemWatcher(d)
    w.start(CompletionFilter.FILE_NOTIFY_CHANGE_FILE_NAME)
    return w


def refused_with(w, code):
    try:
        w.wait()
    except SMBResponseException as e:
        return e.status == code
    return False


trees = [connect() for _ in range(CONNECTIONS)]
watchers = [watch(open_dir(tree, "watched")) for _, tree in trees]
check(True, f"{CONNECTIONS} connections wait with a CHANGE_NOTIFY each")
_, tree = trees[0]
f = Open(tree, r"watched\new.txt")
f.create(
    ImpersonationLevel.Impersonation,
    FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
    FileAttributes.FILE_ATTRIBUTE_NORMAL,
    ALL_SHARE,
    CreateDisposition.FILE_CREATE,
    CreateOptions.FILE_NON_DIRECTORY_FILE,
)
f.close()
for i, w in enumerate(watchers):
    try:
        names = [e["file_name"].get_value() for e in w.wait()]
    except SMBResponseException as e:
        sys.exit(f"FAILED: connection {i}'s CHANGE_NOTIFY: {e}")
    if "new.txt" not in names:
        sys.exit(f"FAILED: connection {i} was told {names}")
check(True, "every connection is told of new.txt")

_, tree = trees[1]
w = watch(open_dir(tree, "watched", DirectoryAccessMask.FILE_READ_ATTRIBUTES))
check(refused_with(w, STATUS_ACCESS_DENIED), "no FILE_LIST_DIRECTORY: STATUS_ACCESS_DENIED")

_, tree = trees[2]
dirs = [open_dir(tree, f"d{i}") for i in range(PER_CONNECTION + 1)]
mine = [watch(d) for d in dirs[:PER_CONNECTION]]
w = watch(dirs[PER_CONNECTION])
check(refused_with(w, STATUS_INSUFFICIENT_RESOURCES), f"a {PER_CONNECTION + 1}th directory: STATUS_INSUFFICIENT_RESOURCES")
mine[0].cancel()
# A directory stays watched until its open is closed: what changes in it
# meanwhile is kept for the open's next request (MS-FSA 2.1.5.10).
w = watch(dirs[PER_CONNECTION])
check(refused_with(w, STATUS_INSUFFICIENT_RESOURCES), "a cancelled request's directory stays watched")
dirs[0].close()
w = watch(dirs[PER_CONNECTION])
check(not w.response_event.wait(timeout=0.5), "once one directory's open is closed, the next directory is watched")
w.cancel()

# Each open keeps its own changes, so opens count, not directories: one
# directory opened 65 times is watched through 64 of them at most.
_, tree = trees[3]
same = [open_dir(tree, "watched") for _ in range(PER_CONNECTION + 1)]
kept = [watch(d) for d in same[:PER_CONNECTION]]
w = watch(same[PER_CONNECTION])
check(refused_with(w, STATUS_INSUFFICIENT_RESOURCES), f"a {PER_CONNECTION + 1}th open of one directory: STATUS_INSUFFICIENT_RESOURCES")
print("PASS", flush=True)
