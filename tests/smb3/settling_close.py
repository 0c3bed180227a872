"""A CLOSE whose answer from filterd never came is not told done while
rksmbd closes its handle again (rksmbd, smbprotocol).

Usage: settling_close.py HOST PORT SHARE USER PASSWORD

Run against a filterd killed at its second commit (the first records the
persistent open, the second is its close: `commit.before:2:kill`). Opens
settling.txt persistent and CLOSEs it: filterd dies under the CLOSE, which
is answered STATUS_FILE_NOT_AVAILABLE. Prints "refused" and waits for a
line on stdin (the driver waits until filterd is dead). CLOSEs the FileId
again: still STATUS_FILE_NOT_AVAILABLE (it was STATUS_FILE_CLOSED: the
client forgot an open whose handle only rksmbd's memory would close).
Prints "still" and waits (the driver restarts filterd). CLOSEs again
until the answer is not STATUS_FILE_NOT_AVAILABLE (30 s): a success.
Prints PASS; exits non-zero on any failure.
"""

import time
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, SMB2CloseRequest

from smbtest import args, check, connect, open_rw, pause, persistent_context

SERVER = args()
NAME = "settling.txt"
FILE_NOT_AVAILABLE = 0xC0000467

conn, tree = connect(*SERVER)
f = open_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(uuid.uuid4())])


def close_status():
    req = SMB2CloseRequest()
    req["file_id"] = f.file_id
    try:
        conn.receive(conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id))
        return 0
    except SMBResponseException as e:
        return e.status


st = close_status()
check(st == FILE_NOT_AVAILABLE, f"the CLOSE filterd died under: retry ({st:#x})")
pause("refused")
st = close_status()
check(st == FILE_NOT_AVAILABLE, f"retried while filterd is down: retry again ({st:#x})")
pause("still")
deadline = time.monotonic() + 30
while st == FILE_NOT_AVAILABLE and time.monotonic() < deadline:
    time.sleep(0.05)
    st = close_status()
check(st == 0, f"retried once filterd is back: closed ({st:#x})")
conn.disconnect()
print("PASS", flush=True)
