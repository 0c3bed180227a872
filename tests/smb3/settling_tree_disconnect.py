"""A TREE_DISCONNECT whose close of a persistent open filterd never
answered is not told done while rksmbd closes the handle again (rksmbd,
smbprotocol).

Usage: settling_tree_disconnect.py HOST PORT SHARE USER PASSWORD

Run against a filterd killed at its second commit (the first records the
persistent open, the second is its close: `commit.before:2:kill`). Opens
tdis.txt persistent and disconnects its tree: filterd dies under the
close, so the TREE_DISCONNECT is STATUS_FILE_NOT_AVAILABLE and the tree
stays (it was a success: the client forgot the tree and the open with it,
whose close only rksmbd's memory would make). Prints "refused" and waits
for a line on stdin (the driver waits until filterd is dead). The retried
TREE_DISCONNECT is STATUS_FILE_NOT_AVAILABLE again, and so is a DH2C of
the open from a new connection of the same client. Prints "still" and
waits (the driver restarts filterd). CLOSEs the FileId through the kept
tree until the answer is not STATUS_FILE_NOT_AVAILABLE (30 s): a success;
then the TREE_DISCONNECT succeeds. Prints PASS; exits non-zero on any
failure.
"""

import time
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, SMB2CloseRequest

from smbtest import args, check, connect, open_rw, pause, persistent_context, reconnect_v2

SERVER = args()
NAME = "tdis.txt"
FILE_NOT_AVAILABLE = 0xC0000467
client = uuid.uuid4()
create_guid = uuid.uuid4()

conn, tree = connect(*SERVER, client_guid=client)
f = open_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(create_guid)])


def tdis_status():
    try:
        tree.disconnect()
        return 0
    except SMBResponseException as e:
        return e.status


def close_status():
    req = SMB2CloseRequest()
    req["file_id"] = f.file_id
    try:
        conn.receive(conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id))
        return 0
    except SMBResponseException as e:
        return e.status


st = tdis_status()
check(st == FILE_NOT_AVAILABLE, f"the TREE_DISCONNECT filterd died under: retry ({st:#010x})")
pause("refused")
st = tdis_status()
check(st == FILE_NOT_AVAILABLE, f"retried while filterd is down: retry again ({st:#010x})")
conn2, tree2 = connect(*SERVER, client_guid=client)
g, st = reconnect_v2(tree2, NAME, f.file_id, create_guid)
check(g is None and st == FILE_NOT_AVAILABLE, f"a reconnect while its close settles: retry ({st:#010x})")
conn2.disconnect()
pause("still")
deadline = time.monotonic() + 30
st = close_status()
while st == FILE_NOT_AVAILABLE and time.monotonic() < deadline:
    time.sleep(0.05)
    st = close_status()
check(st == 0, f"its CLOSE through the kept tree, once filterd is back: closed ({st:#010x})")
st = tdis_status()
check(st == 0, f"then the TREE_DISCONNECT: done ({st:#010x})")
# The open is closed and the tree gone: nothing left to close.
conn.disconnect(close=False)
print("PASS", flush=True)
