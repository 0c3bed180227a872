"""A stat open is served without a readable descriptor (rksmbd).

Usage: stat_open_info.py HOST PORT SHARE USER PASSWORD

filterd gives an attribute-only open (FILE_READ_ATTRIBUTES |
FILE_WRITE_ATTRIBUTES, a "stat open", MS-FSA 2.1.5.1.2) an O_PATH
descriptor. Beside a share-none holder of held.txt, a stat open of it is
granted; every file and filesystem QUERY_INFO class rksmbd serves answers
on it; SET_INFO FileBasicInformation sets the write time and the DOS
attributes through it; FLUSH and READ are ACCESS_DENIED (MS-SMB2
3.3.5.11: a FLUSH needs FILE_WRITE_DATA or FILE_APPEND_DATA); CLOSE
returns the attributes. Prints PASS, or exits non-zero.
"""

import struct
import sys
import uuid

from smbprotocol.connection import Connection
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    SMB2QueryInfoRequest,
    SMB2QueryInfoResponse,
    SMB2SetInfoRequest,
    SMB2SetInfoResponse,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

FILE_READ_ATTRIBUTES = 0x80
FILE_WRITE_ATTRIBUTES = 0x100
STATUS_ACCESS_DENIED = 0xC0000022
# Classes rksmbd serves (tools/rksmbd/src/info.rs), but 9
# (FileNameInformation), which smbprotocol's request cannot name.
FILE_CLASSES = [4, 5, 6, 7, 8, 14, 16, 17, 18, 21, 22, 34, 35]
FS_CLASSES = [1, 3, 4, 5, 7]
# 2026-01-01T00:00:00Z as a FILETIME.
WRITE_TIME = (1_767_225_600 + 11_644_473_600) * 10_000_000
HIDDEN_ARCHIVE = 0x2 | 0x20


def check(ok, what):
    if not ok:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def session():
    conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=True)
    conn.connect()
    s = Session(conn, USER, PASSWORD, require_encryption=False)
    s.connect()
    tree = TreeConnect(s, rf"\\{HOST}\{SHARE}")
    tree.connect()
    return conn, s, tree


def query(conn, s, tree, f, info_type, klass):
    req = SMB2QueryInfoRequest()
    req["info_type"] = info_type
    req["file_info_class"] = klass
    req["output_buffer_length"] = 4096
    req["file_id"] = f.file_id
    sent = conn.send(req, sid=s.session_id, tid=tree.tree_connect_id)
    resp = SMB2QueryInfoResponse()
    resp.unpack(conn.receive(sent)["data"].get_value())
    return resp["buffer"].get_value()


def set_basic(conn, s, tree, f, write_time, attrs):
    buf = struct.pack("<QQQQII", 0, 0, write_time, 0, attrs, 0)
    req = SMB2SetInfoRequest()
    req["info_type"] = 1
    req["file_info_class"] = 4
    req["file_id"] = f.file_id
    req["buffer"] = buf
    sent = conn.send(req, sid=s.session_id, tid=tree.tree_connect_id)
    SMB2SetInfoResponse().unpack(conn.receive(sent)["data"].get_value())


def main():
    a_conn, a_s, a_tree = session()
    holder = Open(a_tree, "held.txt")
    holder.create(
        ImpersonationLevel.Impersonation,
        FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        0,
        CreateDisposition.FILE_OVERWRITE_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
    )
    holder.write(b"secret\n", 0)

    conn, s, tree = session()
    f = Open(tree, "held.txt")
    f.create(
        ImpersonationLevel.Impersonation,
        FILE_READ_ATTRIBUTES | FILE_WRITE_ATTRIBUTES,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE,
        CreateDisposition.FILE_OPEN,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
    )
    check(True, "a stat open beside a share-none holder is granted")
    for klass in FILE_CLASSES:
        data = query(conn, s, tree, f, 1, klass)
        check(len(data) > 0, f"QUERY_INFO file class {klass}")
    for klass in FS_CLASSES:
        data = query(conn, s, tree, f, 2, klass)
        check(len(data) > 0, f"QUERY_INFO filesystem class {klass}")
    std = query(conn, s, tree, f, 1, 5)
    check(struct.unpack_from("<Q", std, 8)[0] == 7, "FileStandardInformation has the size")

    set_basic(conn, s, tree, f, WRITE_TIME, HIDDEN_ARCHIVE)
    basic = query(conn, s, tree, f, 1, 4)
    written = struct.unpack_from("<Q", basic, 16)[0]
    attrs = struct.unpack_from("<I", basic, 32)[0]
    check(written == WRITE_TIME, f"SET_INFO basic set the write time ({written})")
    check(attrs == HIDDEN_ARCHIVE, f"SET_INFO basic set the attributes ({attrs:#x})")

    try:
        f.flush()
        check(False, "FLUSH on a stat open is refused")
    except SMBResponseException as e:
        check(e.status == STATUS_ACCESS_DENIED, f"FLUSH on a stat open is refused ({e.status:#x})")
    try:
        f.read(0, 7)
        check(False, "READ on a stat open is refused")
    except SMBResponseException as e:
        check(e.status == STATUS_ACCESS_DENIED, f"READ on a stat open is refused ({e.status:#x})")

    closed = f.close(get_attributes=True)
    check(closed["end_of_file"].get_value() == 7, "CLOSE returns the attributes")
    check(holder.read(0, 7) == b"secret\n", "the holder is undisturbed")
    holder.close()
    print("PASS")


if __name__ == "__main__":
    main()
