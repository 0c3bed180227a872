"""A reconnect of an open whose CLOSE still settles is not told the open
is gone (rksmbd, smbprotocol).

Usage: settling_reconnect.py HOST PORT SHARE USER PASSWORD

Run against a filterd killed at its second commit (the first records the
persistent open, the second is its close: `commit.before:2:kill`), and an
rksmbd whose settling closes are held (`RKSMBD_TEST_SETTLE_DELAY_MS`).
Opens settling.txt persistent and CLOSEs it: filterd dies under the CLOSE,
which is answered STATUS_FILE_NOT_AVAILABLE. Prints "refused" and waits
for a line on stdin (the driver restarts filterd): "new-guid" reconnects
from another client GUID (the open, without a lease, is its user's: a
reconnect resumes it for any client GUID of hers), anything else from the
same one. Waits until rksmbd
serves again (a CREATE of probe.txt succeeds), drops the connection, and
reconnects the open (DH2C) from a new connection and session: it must be
STATUS_FILE_NOT_AVAILABLE while the close settles (it was
STATUS_OBJECT_NAME_NOT_FOUND: the client forgot an open whose handle only
rksmbd's memory would close — filterd refused the resume, as the handle is
attached to rksmbd). Prints "retry" and waits (the driver checks filterd
still holds the handle). Prints PASS; exits non-zero on any failure.
"""

import uuid

from smbprotocol.open import CreateDisposition

from smbtest import args, check, close_refused, connect, open_rw, pause, persistent_context, reconnect_v2, serving

SERVER = args()
NAME = "settling.txt"
FILE_NOT_AVAILABLE = 0xC0000467
client = uuid.uuid4()
create_guid = uuid.uuid4()

conn, tree = connect(*SERVER, client_guid=client)
f = open_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(create_guid)])
file_id = f.file_id

st = close_refused(conn, tree, file_id)
check(st == FILE_NOT_AVAILABLE, f"the CLOSE filterd died under: retry ({st:#010x})")
new_guid = pause("refused") == "new-guid"

serving(tree)
conn.disconnect(close=False)

conn2, tree2 = connect(*SERVER, client_guid=uuid.uuid4() if new_guid else client)
g, st = reconnect_v2(tree2, NAME, file_id, create_guid)
check(g is None and st == FILE_NOT_AVAILABLE, f"the reconnect while its close settles: retry ({st:#010x})")
pause("retry")
conn2.disconnect()
print("PASS", flush=True)
