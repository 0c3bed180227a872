"""A TREE_DISCONNECT whose close filterd could not commit is not
acknowledged (rksmbd, smbprotocol).

Usage: failed_tree_disconnect.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose second commit fails (the first records the
persistent open, the second is its close). Opens kept.txt persistent and
sends TREE_DISCONNECT: it must fail with STATUS_INSUFFICIENT_RESOURCES,
the tree and the open staying. Prints "refused" and waits for a line on
stdin (the driver checks that filterd still lists the handle). The FileId
still writes and reads; a second TREE_DISCONNECT succeeds. Prints "done" and waits for a
line (the driver checks filterd lists nothing). Prints PASS; exits
non-zero on any failure.
"""

import sys
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)

from smbtest import args, check, connect, persistent_context

SERVER = args()
STATUS_INSUFFICIENT_RESOURCES = 0xC000009A
DATA = b"written before the failed TREE_DISCONNECT\n"


conn, tree = connect(*SERVER)
f = Open(tree, "kept.txt")
f.create(
    ImpersonationLevel.Impersonation,
    FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
    FileAttributes.FILE_ATTRIBUTE_NORMAL,
    ShareAccess.FILE_SHARE_READ,
    CreateDisposition.FILE_OVERWRITE_IF,
    CreateOptions.FILE_NON_DIRECTORY_FILE,
    create_contexts=[persistent_context(uuid.uuid4())],
)
print("opened", flush=True)
try:
    tree.disconnect()
    check(False, "the TREE_DISCONNECT whose close failed is refused")
except SMBResponseException as e:
    check(e.status == STATUS_INSUFFICIENT_RESOURCES, f"the TREE_DISCONNECT whose close failed is refused ({e.status:#x})")
print("refused", flush=True)
sys.stdin.readline()

# The session, its tree and the open are still the client's.
f.write(DATA, 0)
check(f.read(0, len(DATA)) == DATA, "the FileId still writes and reads")
tree.disconnect()
check(True, "the second TREE_DISCONNECT succeeds")
print("done", flush=True)
sys.stdin.readline()
conn.disconnect(close=False)
print("PASS", flush=True)
