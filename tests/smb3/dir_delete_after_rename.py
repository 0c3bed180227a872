"""A directory's delete on close removes its own directory, by the name
its opens share now — never another directory at its old name (rksmbd).

Usage: dir_delete_after_rename.py HOST PORT SHARE USER PASSWORD EXPORT_ROOT

Two opens of directory `a` (sharing all). Open 1 renames it to `z`. A
new empty directory `a` is made. Open 2 — whose directory is now `z` —
sets delete on close and closes: `z` is removed, the new `a` stays.
Prints PASS.
"""

import os
import sys

from smbprotocol.file_info import FileDispositionInformation, FileRenameInformation
from smbprotocol.open import CreateDisposition, DirectoryAccessMask

from smbtest import connect, open_dir, set_info_status


def main():
    host, port, share, user, pw, root = sys.argv[1:7]
    conn, tree = connect(host, int(port), share, user, pw)

    def set_info(op, info):
        return set_info_status(tree, op, info)

    acc = DirectoryAccessMask.FILE_LIST_DIRECTORY | DirectoryAccessMask.DELETE
    mk = open_dir(tree, "a", acc, CreateDisposition.FILE_OPEN_IF)
    d1 = open_dir(tree, "a", acc)
    d2 = open_dir(tree, "a", acc)
    mk.close()
    rename = FileRenameInformation()
    rename["replace_if_exists"] = False
    rename["file_name"] = "z"
    st = set_info(d1, rename)
    if st != 0:
        sys.exit(f"rename a -> z: {st:#010x}")
    newa = open_dir(tree, "a", DirectoryAccessMask.FILE_LIST_DIRECTORY, CreateDisposition.FILE_CREATE)
    newa.close()
    disp = FileDispositionInformation()
    disp["delete_pending"] = True
    st = set_info(d2, disp)
    if st != 0:
        sys.exit(f"delete on close through open 2: {st:#010x}")
    d2.close()
    d1.close()
    z, a = os.path.isdir(os.path.join(root, "z")), os.path.isdir(os.path.join(root, "a"))
    if a is False:
        sys.exit("the new directory at the old name was removed")
    if z:
        sys.exit("the directory closed with delete on close (now z) is still there")
    conn.disconnect()
    print("PASS")


if __name__ == "__main__":
    main()
