"""FileBasic changes made durable (rksmbd, smbprotocol).

Usage: metadata_sync.py HOST PORT SHARE USER PASSWORD

  flushed.bin  a plain open: SET_INFO FileBasic (a write time and the
               HIDDEN attribute), then FLUSH
  through.bin  an open with FILE_WRITE_THROUGH: SET_INFO FileBasic alone
  d            a directory opened with FILE_ADD_FILE: FLUSH
  m\stat.bin   in directory m (made by the driver), made, then opened
               with FILE_WRITE_ATTRIBUTES and SYNCHRONIZE alone (a stat
               open, as Windows and cifs set times) and
               FILE_WRITE_THROUGH: SET_INFO FileBasic

The driver traces rksmbd's system calls and checks that the FLUSH
fsyncs flushed.bin (fdatasync leaves times and xattrs out), that
through.bin's SET_INFO fsyncs it before its answer, and that the
directory's FLUSH fsyncs it, and that stat.bin's SET_INFO syncs its
filesystem (syncfs of m, never sync) before its answer. Prints PASS;
exits non-zero on any failure.
"""

from smbprotocol.file_info import FileBasicInformation
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    DirectoryAccessMask,
    FilePipePrinterAccessMask,
    ShareAccess,
)

from smbtest import args, check, connect, create_file, create_rw, open_dir, set_info_status

HIDDEN = 0x2
# 2020-01-01T00:00:00Z as a FILETIME.
WRITE_TIME = 132223104000000000

conn, tree = connect(*args())


def set_basic(name, options=0):
    """Opens `name` (made or emptied), sets its write time and HIDDEN;
    the open."""
    f, _ = create_rw(tree, name, CreateDisposition.FILE_OVERWRITE_IF, options=options)
    info = FileBasicInformation()
    info["last_write_time"] = WRITE_TIME
    info["file_attributes"] = HIDDEN
    st = set_info_status(tree, f, info)
    check(st == 0, f"{name}'s FileBasic is set ({st:#x})")
    return f


f = set_basic("flushed.bin")
f.flush()
print("ok: flushed.bin flushed", flush=True)
f.close()
set_basic("through.bin", options=CreateOptions.FILE_WRITE_THROUGH).close()
d = open_dir(tree, "d", DirectoryAccessMask.FILE_LIST_DIRECTORY | DirectoryAccessMask.FILE_ADD_FILE)
d.flush()
print("ok: d flushed", flush=True)
d.close()
create_rw(tree, "m\\stat.bin", CreateDisposition.FILE_OVERWRITE_IF)[0].close()
f = create_file(
    tree,
    "m\\stat.bin",
    FilePipePrinterAccessMask.FILE_WRITE_ATTRIBUTES | FilePipePrinterAccessMask.SYNCHRONIZE,
    ShareAccess.FILE_SHARE_READ,
    options=CreateOptions.FILE_WRITE_THROUGH,
)[0]
info = FileBasicInformation()
info["last_write_time"] = WRITE_TIME
st = set_info_status(tree, f, info)
check(st == 0, f"stat.bin's FileBasic is set through a stat open ({st:#x})")
f.close()
print("PASS", flush=True)
