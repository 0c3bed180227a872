"""A CLOSE still settling is not told done through another channel of the
session, nor by a TREE_DISCONNECT of its tree (rksmbd multichannel, raw
SMB 3.0.2 channel over an smbprotocol session).

Usage: settling_close_channel.py HOST PORT SHARE USER PASSWORD

Run against a filterd killed at its second commit (the first records the
persistent open, the second is its close: `commit.before:2:kill`).
Connection A (smbprotocol) sets up the session, opens settling.txt
persistent and CLOSEs it: filterd dies under the CLOSE, which is answered
STATUS_FILE_NOT_AVAILABLE. Prints "refused" and waits for a line on stdin
(the driver waits until filterd is dead). Connection B binds the session.
The FileId's CLOSE retried through B is STATUS_FILE_NOT_AVAILABLE (it was
STATUS_FILE_CLOSED: the client forgot an open whose handle only rksmbd's
memory would close), through A too, and a TREE_DISCONNECT of its tree
through B is STATUS_FILE_NOT_AVAILABLE, the tree staying (it was a
success: the tree, and with it the client's only way to name the open,
went), and so is a LOGOFF through B, the session staying. Prints "still" and waits (the driver restarts filterd). Retries the
CLOSE through B until the answer is not STATUS_FILE_NOT_AVAILABLE (30 s):
a success; then the TREE_DISCONNECT succeeds. Prints PASS; exits non-zero
on any failure.
"""

import struct
import time
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, SMB2CloseRequest

from raw_channel import CLOSE, Raw, bind, check, cmac_sign, final, session
from smbtest import open_rw, pause, persistent_context

FILE_NOT_AVAILABLE = 0xC0000467
LOGOFF = 2
TREE_DISCONNECT = 4

guid = uuid.uuid4()
a, s1, tree = session(guid)
sid, tid = s1.session_id, tree.tree_connect_id
f = open_rw(tree, "settling.txt", CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(uuid.uuid4())])


def close_on_a():
    req = SMB2CloseRequest()
    req["file_id"] = f.file_id
    try:
        a.receive(a.send(req, sid=sid, tid=tid))
        return 0
    except SMBResponseException as e:
        return e.status


def close_on_b():
    body = struct.pack("<HHI16s", 24, 0, 0, f.file_id)
    st, _ = final(b, cmac_sign(key, b.header(CLOSE, sid, tid=tid) + body))
    return st


def tree_disconnect_on(raw):
    st, _ = final(raw, cmac_sign(key, raw.header(TREE_DISCONNECT, sid, tid=tid) + struct.pack("<HH", 4, 0)))
    return st


def logoff_on(raw):
    st, _ = final(raw, cmac_sign(key, raw.header(LOGOFF, sid) + struct.pack("<HH", 4, 0)))
    return st


st = close_on_a()
check(st == FILE_NOT_AVAILABLE, f"the CLOSE filterd died under: retry ({st:#010x})")
pause("refused")
b = Raw(guid)
key = bind(b, sid, s1.signing_key)
st = close_on_b()
check(st == FILE_NOT_AVAILABLE, f"retried through another channel while filterd is down: retry again ({st:#010x})")
st = close_on_a()
check(st == FILE_NOT_AVAILABLE, f"retried through the first channel: retry again ({st:#010x})")
st = tree_disconnect_on(b)
check(st == FILE_NOT_AVAILABLE, f"a TREE_DISCONNECT of its tree while it settles: retry ({st:#010x})")
st = close_on_b()
check(st == FILE_NOT_AVAILABLE, f"the tree stayed: the CLOSE is still a retry ({st:#010x})")
st = logoff_on(b)
check(st == FILE_NOT_AVAILABLE, f"a LOGOFF of its session while it settles: retry ({st:#010x})")
st = close_on_a()
check(st == FILE_NOT_AVAILABLE, f"the session stayed: the CLOSE is still a retry ({st:#010x})")
pause("still")
deadline = time.monotonic() + 30
while st == FILE_NOT_AVAILABLE and time.monotonic() < deadline:
    time.sleep(0.05)
    st = close_on_b()
check(st == 0, f"retried through the other channel once filterd is back: closed ({st:#010x})")
st = close_on_a()
check(st == 0xC0000128, f"then the FileId is closed ({st:#010x})")
st = tree_disconnect_on(b)
check(st == 0, f"then the TREE_DISCONNECT succeeds ({st:#010x})")
b.s.close()
a.disconnect(close=False)
print("PASS", flush=True)
