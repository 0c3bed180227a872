"""A DH2C at once after the TCP drop of a connection holding several
persistent opens, on a slow disk (rksmbd, smbprotocol).

Usage: reconnect_behind_slow_detaches.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose fsyncs the driver slows (400 ms each). Opens
five files persistent on one connection, drops its TCP connection without
closing them, and from a new connection (same client GUID, no
PreviousSessionId) sends a DH2C of the last one at once. rksmbd's old
connection detaches its opens one by one, each a filterd commit, so the
last is let go only after a second or more: the DH2C must wait for it and
succeed. Before, it waited 1 s and failed STATUS_OBJECT_NAME_NOT_FOUND,
which is final for the client. Prints PASS; exits non-zero on any failure.
"""

import time
import uuid

from smbprotocol.open import CreateDisposition

from smbtest import args, check, connect, open_rw, persistent_context, reconnect_v2

SERVER = args()
OPENS = 5

client_guid = uuid.uuid4()
conn, tree = connect(*SERVER, client_guid=client_guid)
opens = []
for i in range(OPENS):
    g = uuid.uuid4()
    name = f"slow-detach-{i}.txt"
    f = open_rw(tree, name, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(g)])
    f.write(b"data %d" % i, 0)
    opens.append((name, f.file_id, g))
print(f"opened {OPENS} persistent", flush=True)

t0 = time.monotonic()
conn.disconnect(close=False)
again, tree2 = connect(*SERVER, client_guid=client_guid)
name, fid, g = opens[-1]
f, st = reconnect_v2(tree2, name, fid, g)
took = time.monotonic() - t0
check(f is not None, f"the DH2C of the last open, {took:.2f} s after the drop (status {st:#x})")
check(f.read(0, 6) == b"data %d" % (OPENS - 1), "it reads what was written")
f.close()
print("PASS", flush=True)
