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

import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition

from smbtest import args, check, connect, open_rw, pause, persistent_context

SERVER = args()
STATUS_INSUFFICIENT_RESOURCES = 0xC000009A
DATA = b"written before the failed TREE_DISCONNECT\n"


conn, tree = connect(*SERVER)
f = open_rw(tree, "kept.txt", CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(uuid.uuid4())])
print("opened", flush=True)
try:
    tree.disconnect()
    check(False, "the TREE_DISCONNECT whose close failed is refused")
except SMBResponseException as e:
    check(e.status == STATUS_INSUFFICIENT_RESOURCES, f"the TREE_DISCONNECT whose close failed is refused ({e.status:#x})")
pause("refused")

# The session, its tree and the open are still the client's.
f.write(DATA, 0)
check(f.read(0, len(DATA)) == DATA, "the FileId still writes and reads")
tree.disconnect()
check(True, "the second TREE_DISCONNECT succeeds")
pause("done")
conn.disconnect(close=False)
print("PASS", flush=True)
