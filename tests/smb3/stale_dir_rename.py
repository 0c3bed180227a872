"""A directory open whose path went stale renames no other directory
(rksmbd).

Usage: stale_dir_rename.py HOST PORT SHARE USER PASSWORD

Opens directory `a` with DELETE access and prints "opened"; waits for a
line on stdin (meanwhile the test renames `a` to `b` and makes a new
`a`, as a local process may); then renames its open to `c` and prints
"status 0x…" with the answer's status; closes; prints PASS.
"""

from smbprotocol.file_info import FileRenameInformation
from smbprotocol.open import DirectoryAccessMask

from smbtest import args, connect, open_dir, pause, set_info_status


def main():
    conn, tree = connect(*args())
    d = open_dir(tree, "a", DirectoryAccessMask.FILE_LIST_DIRECTORY | DirectoryAccessMask.DELETE)
    pause("opened")
    rename = FileRenameInformation()
    rename["replace_if_exists"] = False
    rename["file_name"] = "c"
    status = set_info_status(tree, d, rename)
    print(f"status {status:#010x}", flush=True)
    d.close()
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
