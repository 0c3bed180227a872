"""A DH2C whose look at the handle goes unanswered (rksmbd, smbprotocol;
re-review rr45b F1).

Usage: reconnect_view_unanswered.py HOST PORT SHARE USER PASSWORD

Opens durable.txt persistent with an RWH lease (v2), writes, drops the
TCP connection without LOGOFF and prints "dropped". On the driver's
line it sends a DH2C on a new connection with the same client GUID —
the driver has filterd leave rksmbd's look at the handle unanswered —
and prints "first DH2C: STATUS" (exiting at once if it succeeded). On
the driver's next line it sends a second DH2C and prints "second DH2C:
STATUS", then reads the data back through the resumed handle.
"""

import uuid

from smbprotocol.open import CreateDisposition, RequestedOplockLevel

from smbtest import args, check, connect, create_rw, lease_context, pause, persistent_context, reconnect_v2

HOST, PORT, SHARE, USER, PASSWORD = args()
DATA = b"persistent data survives the drop\n"
NAME = "durable.txt"
LEASE = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE


def dh2c(client_guid):
    conn, tree = connect(HOST, PORT, SHARE, USER, PASSWORD, client_guid)
    f, st = reconnect_v2(tree, NAME, file_id, create_guid, [lease_context(lease_key)], LEASE)
    return conn, f, st


client_guid, create_guid, lease_key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4().bytes
conn, tree = connect(HOST, PORT, SHARE, USER, PASSWORD, client_guid)
f, _ = create_rw(
    tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(create_guid), lease_context(lease_key)], LEASE
)
f.write(DATA, 0)
file_id = f.file_id
conn.disconnect(close=False)
pause("dropped")

conn2, f2, st = dh2c(client_guid)
print(f"first DH2C: {'STATUS_SUCCESS' if f2 else hex(st)}", flush=True)
if f2:
    raise SystemExit(0)
conn2.disconnect(close=False)
pause("go on?")
conn3, f3, st = dh2c(client_guid)
print(f"second DH2C: {'STATUS_SUCCESS' if f3 else hex(st)}", flush=True)
check(f3 is not None and f3.read(0, len(DATA)) == DATA, "data read back through the handle")
f3.close()
conn3.disconnect()
print("PASS", flush=True)
