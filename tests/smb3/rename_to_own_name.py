"""A rename to the name the file has succeeds and changes nothing (rksmbd).

Usage: rename_to_own_name.py HOST PORT SHARE USER PASSWORD

Windows answers such a rename with success, and a client's replay of a
rename whose reply it lost is one (rksmbd runs a replayed SET_INFO again,
MS-SMB2 3.3.5.2.10). Writes same.txt, renames it to its own name (without
replace), then reads it back through the same open. Prints PASS, or exits
non-zero.
"""

import sys
import uuid

from smbprotocol.connection import Connection
from smbprotocol.file_info import FileRenameInformation
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    SMB2SetInfoRequest,
    SMB2SetInfoResponse,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


def main():
    conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=True)
    conn.connect()
    session = Session(conn, USER, PASSWORD, require_encryption=False)
    session.connect()
    tree = TreeConnect(session, rf"\\{HOST}\{SHARE}")
    tree.connect()
    f = Open(tree, "same.txt")
    f.create(
        ImpersonationLevel.Impersonation,
        FilePipePrinterAccessMask.GENERIC_READ
        | FilePipePrinterAccessMask.GENERIC_WRITE
        | FilePipePrinterAccessMask.DELETE,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        ShareAccess.FILE_SHARE_READ,
        CreateDisposition.FILE_OVERWRITE_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
    )
    f.write(b"kept\n", 0)
    rename = FileRenameInformation()
    rename["replace_if_exists"] = False
    rename["file_name"] = "same.txt"
    req = SMB2SetInfoRequest()
    req["info_type"] = rename.INFO_TYPE
    req["file_info_class"] = rename.INFO_CLASS
    req["file_id"] = f.file_id
    req["buffer"] = rename
    sent = conn.send(req, sid=session.session_id, tid=tree.tree_connect_id)
    SMB2SetInfoResponse().unpack(conn.receive(sent)["data"].get_value())
    data = f.read(0, 5)
    f.close()
    if data != b"kept\n":
        sys.exit(f"read back {data!r}")
    print("PASS")


if __name__ == "__main__":
    main()
