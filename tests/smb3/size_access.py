"""Who may change a file's size or overwrite it (rksmbd, smbprotocol).

Usage: size_access.py HOST PORT SHARE USER PASSWORD

The share holds size.bin, "0123456789". Through an append-only open
(FILE_APPEND_DATA and FILE_READ_ATTRIBUTES, no FILE_WRITE_DATA): a WRITE
at offset 0 is STATUS_ACCESS_DENIED (MS-SMB2 3.3.5.13), and so are
SET_INFO FileEndOfFile and FileAllocation (MS-FSA 2.1.5.15.4, 2.1.5.15.1);
a WRITE at offset 0xFFFFFFFFFFFFFFFF lands at the end of file (MS-FSA
2.1.5.4) and one at the end of file succeeds. Through a GENERIC_READ
open, FileAllocation is STATUS_ACCESS_DENIED. Through a read-write open,
an allocation above the end of file changes nothing and one below it
truncates the file. The file is read back after each step; the driver
checks it holds "0123" at the end. Prints PASS; exits non-zero on any
failure.
"""

from collections import OrderedDict

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.file_info import FileEndOfFileInformation, InfoType
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbprotocol.structure import IntField, Structure

from smbtest import args, check, connect, create_rw, set_info_status

ACCESS_DENIED = 0xC0000022
SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


class FileAllocationInformation(Structure):
    """[MS-FSCC] 2.4.4 FileAllocationInformation (smbprotocol has none)."""

    INFO_TYPE = InfoType.SMB2_0_INFO_FILE
    INFO_CLASS = 19

    def __init__(self):
        self.fields = OrderedDict([("allocation_size", IntField(size=8))])
        super().__init__()


def opened(tree, access):
    """An open of size.bin with `access`, sharing everything."""
    f = Open(tree, "size.bin")
    f.create(
        ImpersonationLevel.Impersonation,
        access,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        SHARE_ALL,
        CreateDisposition.FILE_OPEN,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
    )
    return f


def end_of_file(tree, f, size):
    info = FileEndOfFileInformation()
    info["end_of_file"] = size
    return set_info_status(tree, f, info)


def allocation(tree, f, size):
    info = FileAllocationInformation()
    info["allocation_size"] = size
    return set_info_status(tree, f, info)


def write_status(f, data, offset):
    try:
        f.write(data, offset)
        return 0
    except SMBResponseException as e:
        return e.status


conn, tree = connect(*args())
reader = opened(tree, FilePipePrinterAccessMask.GENERIC_READ)


def holds(data, what):
    check(reader.read(0, 64, wait=True) == data, f"{what}: the file holds {data!r}")


append = opened(tree, FilePipePrinterAccessMask.FILE_APPEND_DATA | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES)
st = write_status(append, b"XX", 0)
check(st == ACCESS_DENIED, f"an append-only WRITE at offset 0 is STATUS_ACCESS_DENIED ({st:#x})")
holds(b"0123456789", "after the refused WRITE")
st = end_of_file(tree, append, 5)
check(st == ACCESS_DENIED, f"an append-only open's end of file is STATUS_ACCESS_DENIED ({st:#x})")
holds(b"0123456789", "after the refused end of file")
st = allocation(tree, append, 5)
check(st == ACCESS_DENIED, f"an append-only open's allocation is STATUS_ACCESS_DENIED ({st:#x})")
holds(b"0123456789", "after the refused allocation")
st = write_status(append, b"ab", 0xFFFFFFFFFFFFFFFF)
check(st == 0, f"an append-only WRITE at offset -1 succeeds ({st:#x})")
holds(b"0123456789ab", "after the WRITE at offset -1")
st = write_status(append, b"cd", 12)
check(st == 0, f"an append-only WRITE at the end of file succeeds ({st:#x})")
holds(b"0123456789abcd", "after the WRITE at the end of file")
append.close()

st = allocation(tree, reader, 3)
check(st == ACCESS_DENIED, f"a GENERIC_READ open's allocation is STATUS_ACCESS_DENIED ({st:#x})")
holds(b"0123456789abcd", "after the refused allocation")

rw, _ = create_rw(tree, "size.bin", CreateDisposition.FILE_OPEN, share=SHARE_ALL)
st = allocation(tree, rw, 100)
check(st == 0, f"an allocation above the end of file succeeds ({st:#x})")
holds(b"0123456789abcd", "after the allocation above the end of file")
st = allocation(tree, rw, 4)
check(st == 0, f"an allocation below the end of file succeeds ({st:#x})")
holds(b"0123", "after the allocation below the end of file")
rw.close()
reader.close()
print("PASS", flush=True)
