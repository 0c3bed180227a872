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
truncates the file. A durable (v2) append-only open, its connection
dropped and reconnected by a DH2C, is still append-only: a WRITE at
offset 0, FileEndOfFile and FileAllocation are STATUS_ACCESS_DENIED. The
file is read back after each step; the driver checks it holds "0123" at
the end. Prints PASS; exits non-zero on any failure.
"""

import uuid

from smbprotocol.create_contexts import CreateContextName, SMB2CreateDurableHandleRequestV2
from smbprotocol.open import CreateDisposition, FilePipePrinterAccessMask, RequestedOplockLevel, ShareAccess

from smbtest import allocation, args, check, connect, context, create_file, create_rw, end_of_file, lease_context, reconnect_v2, refused_within, write_status

ACCESS_DENIED = 0xC0000022
SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


def opened(tree, access, contexts=(), oplock_level=0):
    """An open of size.bin with `access` (and create contexts `contexts`),
    sharing everything."""
    return create_file(tree, "size.bin", access, SHARE_ALL, contexts=contexts, oplock_level=oplock_level)[0]


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

# A reconnect keeps the access the open was made with: filterd's one write
# right stands for FILE_WRITE_DATA too, and the DH2C's own access counts
# for nothing (reconnect_v2 asks for GENERIC_READ | GENERIC_WRITE).
client_guid, create_guid, lease_key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4().bytes
dh2q = SMB2CreateDurableHandleRequestV2()
dh2q["timeout"] = 60000
dh2q["create_guid"] = create_guid
first, first_tree = connect(*args(), client_guid=client_guid)
durable = opened(
    first_tree,
    FilePipePrinterAccessMask.FILE_APPEND_DATA | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
    [context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q), lease_context(lease_key)],
    RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE,
)
fid = durable.file_id
first.disconnect(close=False)
again, again_tree = connect(*args(), client_guid=client_guid)
g, st = reconnect_v2(again_tree, "size.bin", fid, create_guid, [lease_context(lease_key)], RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE)
check(g is not None, f"the durable append-only open reconnected ({st:#x})")
refused_within(again_tree, g, "the reconnected append-only open")
g.close()
reader = opened(tree, FilePipePrinterAccessMask.GENERIC_READ)
holds(b"0123", "after the reconnected open's refused changes")
reader.close()
again.disconnect()
print("PASS", flush=True)
