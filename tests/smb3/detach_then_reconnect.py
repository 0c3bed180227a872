"""A connection drop whose Detach filterd did not answer in time, then a
DH2C of the handle (rksmbd, smbprotocol).

Usage: detach_then_reconnect.py HOST PORT SHARE USER PASSWORD

Opens dr.txt persistent (create GUID C), writes, prints "ready" and waits
for a line. Drops the TCP connection without closing (rksmbd detaches the
handle in filterd). If the line was "probe" (the driver SIGSTOPped
filterd, rksmbd's call timeout is short), a CREATE of probe.txt from a
new connection must fail: rksmbd gave up on filterd, and on the Detach it
sent before. Prints "dropped" and waits (the driver lets filterd go on, or
restarts it). From a new connection (same client GUID) a DH2C of the
handle must succeed, write and read, and close; then another client opens
dr.txt sharing nothing. Prints PASS; exits non-zero on any failure.
"""

import sys
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition

from smbtest import args, check, connect, open_exclusive, open_rw, pause, persistent_context, reconnect_v2_retrying

SERVER = args()
NAME = "dr.txt"

client_guid, create_guid = uuid.uuid4(), uuid.uuid4()
conn, tree = connect(*SERVER, client_guid=client_guid)
f = open_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(create_guid)])
f.write(b"before", 0)
fid = f.file_id
print("ready", flush=True)
probe = sys.stdin.readline().strip() == "probe"
conn.disconnect(close=False)

again, again_tree = connect(*SERVER, client_guid=client_guid)
if probe:
    try:
        open_rw(again_tree, "probe.txt", CreateDisposition.FILE_OVERWRITE_IF)
        check(False, "a CREATE while filterd is stopped fails")
    except SMBResponseException as e:
        check(True, f"a CREATE while filterd is stopped fails ({e.status:#010x})")
pause("dropped")

# STATUS_FILE_NOT_AVAILABLE is the retry status (rksmbd waits 5 s for the
# old connection to let the open go, longer under load): sent again, as a
# client does, for up to 20 s. Any other failure is final.
g, st, _took = reconnect_v2_retrying(again_tree, NAME, fid, create_guid, bound=20, pace=0.2)
check(g is not None, f"the DH2C after a drop whose detach was not answered succeeds (got {st:#010x})")
g.write(b"after!", 0)
check(g.read(0, 6) == b"after!", "the reconnected handle writes and reads")
g.close()
open_exclusive(SERVER, NAME, b"after!")
again.disconnect()
print("PASS", flush=True)
