"""A CLOSE whose answer from filterd never came leaves nothing held
(rksmbd, smbprotocol).

Usage: unsettled_close.py HOST PORT SHARE USER PASSWORD

Run against a filterd killed at its second commit (the first records the
persistent open, the second is its close: `commit.before:2:kill`). Opens
unsettled.txt persistent and CLOSEs it: filterd dies under the CLOSE, so
it must not succeed. Prints "refused" and waits for a line on stdin (the
driver restarts filterd and waits until it lists no handle: rksmbd
closed again the handle its reattach resumed). Then another client
opens the file with no sharing. Prints PASS; exits non-zero on any
failure.
"""

import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, ShareAccess, SMB2CloseRequest

from smbtest import args, check, connect, open_rw, pause, persistent_context

SERVER = args()
NAME = "unsettled.txt"

conn, tree = connect(*SERVER)
f = open_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(uuid.uuid4())])
req = SMB2CloseRequest()
req["file_id"] = f.file_id
try:
    conn.receive(conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id))
    check(False, "the CLOSE filterd died under is not a success")
except SMBResponseException as e:
    check(True, f"the CLOSE filterd died under is not a success ({e.status:#x})")
pause("refused")

other, other_tree = connect(*SERVER)
g = open_rw(other_tree, NAME, CreateDisposition.FILE_OPEN)
g.close()
check(True, "another client opens the file")
other.disconnect()
conn.disconnect()
print("PASS", flush=True)
