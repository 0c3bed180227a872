"""A file pending delete is not listed, nor opened (rksmbd, smbprotocol).

Usage: delete_pending_listing.py HOST PORT SHARE USER PASSWORD

Opens pending.txt (sharing delete), opens it a second time with
FILE_DELETE_ON_CLOSE and closes that open: the file is now pending delete,
kept by the first open. A QUERY_DIRECTORY of the share root must not list
it (as Windows and Samba do; smbtorture's deltree loops forever
otherwise), while kept.txt is listed; an open of it is
STATUS_DELETE_PENDING. Then gone.txt is written, marked delete pending by
SET_INFO FileDispositionInformation and closed, as Windows Explorer
deletes: it is gone (the test checks that rksmbd keeps no descriptor of
it). Prints PASS, or exits non-zero.
"""

import sys
import uuid

from smbprotocol.connection import Connection
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.file_info import FileDispositionInformation, FileInformationClass
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect
from smbtest import open_dir, set_info_status

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
STATUS_DELETE_PENDING = 0xC0000056
SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


def open_file(tree, name, access, options):
    f = Open(tree, name)
    f.create(
        ImpersonationLevel.Impersonation,
        access,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        SHARE_ALL,
        CreateDisposition.FILE_OPEN_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE | options,
    )
    return f


def listing(tree):
    d = open_dir(tree, "")
    entries = d.query_directory("*", FileInformationClass.FILE_NAMES_INFORMATION)
    d.close()
    return sorted(e["file_name"].get_value().decode("utf-16-le") for e in entries)


def main():
    conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=True)
    conn.connect()
    session = Session(conn, USER, PASSWORD, require_encryption=False)
    session.connect()
    tree = TreeConnect(session, rf"\\{HOST}\{SHARE}")
    tree.connect()
    rw = FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE
    kept = open_file(tree, "kept.txt", rw, 0)
    kept.close()
    keeper = open_file(tree, "pending.txt", rw, 0)
    deleter = open_file(tree, "pending.txt", FilePipePrinterAccessMask.DELETE, CreateOptions.FILE_DELETE_ON_CLOSE)
    deleter.close()
    names = listing(tree)
    print("listed while pending:", names)
    if "pending.txt" in names or "kept.txt" not in names:
        sys.exit("a file pending delete is listed (or another file is not)")
    try:
        open_file(tree, "pending.txt", rw, 0)
        sys.exit("a file pending delete opened")
    except SMBResponseException as e:
        print("open while pending:", hex(e.status))
        if e.status != STATUS_DELETE_PENDING:
            sys.exit("not STATUS_DELETE_PENDING")
    keeper.close()
    names = listing(tree)
    print("listed after the last close:", names)
    if "pending.txt" in names:
        sys.exit("the file pending delete outlived its last open")
    gone = open_file(tree, "gone.txt", rw | FilePipePrinterAccessMask.DELETE, 0)
    gone.write(b"x" * 65536, 0)
    disposition = FileDispositionInformation()
    disposition["delete_pending"] = True
    status = set_info_status(tree, gone, disposition)
    if status != 0:
        sys.exit(f"SET_INFO FileDispositionInformation: {status:#x}")
    gone.close()
    names = listing(tree)
    print("listed after the disposition's close:", names)
    if "gone.txt" in names:
        sys.exit("the file deleted by disposition outlived its close")
    print("PASS")


if __name__ == "__main__":
    main()
