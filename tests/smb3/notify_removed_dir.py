"""A CHANGE_NOTIFY on a directory another connection removed (delete on
close) after this open was made is answered STATUS_DELETE_PENDING at once
(rksmbd, smbprotocol).

Usage: notify_removed_dir.py HOST PORT SHARE USER PASSWORD

smbtorture's smb2.notify.rmdir4 races to this: its CHANGE_NOTIFY is sent
without waiting, and the directory is removed through a second connection.
Before, a request that reached rksmbd after the removal waited for ever
(the removal is reported only to watches in place). Prints PASS, or exits
non-zero.
"""

import os
import sys
import threading

from smbprotocol.change_notify import CompletionFilter, FileSystemWatcher
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    DirectoryAccessMask,
    FileAttributes,
    ImpersonationLevel,
    Open,
)

from smbtest import SHARE_ALL, args, connect, open_dir

DELETE_PENDING = 0xC0000056

S = args()
_, t1 = connect(*S)
_, t2 = connect(*S)
access = DirectoryAccessMask.FILE_LIST_DIRECTORY | DirectoryAccessMask.DELETE
h = open_dir(t1, "rmd", access, CreateDisposition.FILE_OPEN_IF)
d = Open(t2, "rmd")
d.create(
    ImpersonationLevel.Impersonation,
    access,
    FileAttributes.FILE_ATTRIBUTE_DIRECTORY,
    SHARE_ALL,
    CreateDisposition.FILE_OPEN,
    CreateOptions.FILE_DIRECTORY_FILE | CreateOptions.FILE_DELETE_ON_CLOSE,
)
d.close()
w = FileSystemWatcher(h)
w.start(CompletionFilter.FILE_NOTIFY_CHANGE_FILE_NAME)
res = {}


def waiter():
    try:
        w.wait()
        res["st"] = 0
    except SMBResponseException as e:
        res["st"] = e.status


t = threading.Thread(target=waiter, daemon=True)
t.start()
t.join(20)
st = res.get("st")
if st != DELETE_PENDING:
    print(f"FAIL: the CHANGE_NOTIFY on the removed directory: {st!r} (want STATUS_DELETE_PENDING)", flush=True)
    os._exit(1)
print("PASS", flush=True)
os._exit(0)
