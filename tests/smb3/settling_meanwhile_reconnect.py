"""A reconnect of an open whose CLOSE begins to settle while the
reconnect is under way is told to retry, not that the open is gone
(rksmbd, smbprotocol).

Usage: settling_meanwhile_reconnect.py HOST PORT SHARE USER PASSWORD

Run against a filterd killed at its second commit (the first records the
persistent open, the second is its close: `commit.before:2:kill`), and an
rksmbd whose settling closes are held (`RKSMBD_TEST_SETTLE_DELAY_MS`) and
whose reconnects are held after their check for a settling close
(`RKSMBD_TEST_RECONNECT_HOLD_MS`). Connection A opens settling-meanwhile.txt
persistent; connection B (the same client GUID) sends its DH2C, and the
script prints "reconnecting" and waits for a line (the driver waits until
rksmbd holds the DH2C, its FileId not settling yet). A then CLOSEs the
open: filterd dies under the close, which is answered
STATUS_FILE_NOT_AVAILABLE (its handle settles). The script prints
"refused" and waits for a line (the driver restarts filterd), waits until
rksmbd serves again (a CREATE on A succeeds), prints "serving" and waits
(the driver checks rksmbd still holds the DH2C). The DH2C, let go, finds
filterd refusing the resume (the handle attached to rksmbd): it must be
STATUS_FILE_NOT_AVAILABLE. The script prints "retry" and waits (the
driver checks filterd still holds the handle).

Before re-review rr41h F4 such a DH2C was STATUS_OBJECT_NAME_NOT_FOUND:
only the check before the resume looked for a settling close, and the
client forgot an open whose close was not made.
Prints PASS; exits non-zero on any failure.
"""

import threading
import uuid

from smbprotocol.open import CreateDisposition

from smbtest import args, check, close_refused, connect, open_rw, pause, persistent_context, reconnect_v2, serving

SERVER = args()
NAME = "settling-meanwhile.txt"
FILE_NOT_AVAILABLE = 0xC0000467
client = uuid.uuid4()
create_guid = uuid.uuid4()

conn, tree = connect(*SERVER, client_guid=client)
f = open_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(create_guid)])
conn2, tree2 = connect(*SERVER, client_guid=client)
answer = []
dh2c = threading.Thread(target=lambda: answer.append(reconnect_v2(tree2, NAME, f.file_id, create_guid)))
dh2c.start()
pause("reconnecting")

st = close_refused(conn, tree, f.file_id)
check(st == FILE_NOT_AVAILABLE, f"the CLOSE filterd died under: retry ({st:#010x})")
pause("refused")
serving(tree)
pause("serving")

dh2c.join(60)
check(len(answer) == 1, "the DH2C is answered")
g, st = answer[0]
check(g is None and st == FILE_NOT_AVAILABLE, f"the DH2C held while its close began to settle: retry ({st:#010x})")
pause("retry")
conn2.disconnect()
# Its session's LOGOFF would be refused too while the close settles.
conn.disconnect(close=False)
print("PASS", flush=True)
