"""DH2Cs that do not match a disconnected open leave it as it was
(rksmbd, smbprotocol; MS-SMB2 3.3.5.9.12; re-review rr39e F4: filterd
resumed the open before rksmbd checked the DH2C, and the detach that
followed a mismatch started the open's durable timeout afresh).

Usage: reconnect_mismatch_keeps_expiry.py HOST PORT SHARE USER PASSWORD

A persistent, leased open of kx.txt with a 6 s timeout; the client drops
its TCP connection and prints "disconnected". On the driver's line it
sends DH2Cs of the open that do not match it — without
SMB2_DHANDLE_FLAG_PERSISTENT, under another FileId, under another lease
key, with no lease — each refused STATUS_OBJECT_NAME_NOT_FOUND —, DH2Cs
of the open (matching it otherwise) under another name and under a name
rksmbd cannot parse, each refused STATUS_INVALID_PARAMETER (a leased
open's name must be its own; re-review rr40b F1: filterd resumed the
open before rksmbd compared the names), and the CREATE replayed (replay
flag, same create GUID) under another lease key, refused
STATUS_ACCESS_DENIED (MS-SMB2 3.3.5.9.10), and prints "refused" (the
driver checks filterd's handle: its record and
expiry unchanged, no resume counted, gone at its original expiry). On
the driver's next line a matching DH2C is refused too: the open expired.
Prints PASS; exits non-zero on any failure.
"""

import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition

from smbtest import (
    args,
    check,
    connect,
    create_rw,
    lease_context,
    open_rw,
    pause,
    persistent_context,
    reconnect_v2,
    sent_as_replay,
)

SERVER = args()
OBJECT_NAME_NOT_FOUND = 0xC0000034
ACCESS_DENIED = 0xC0000022
INVALID_PARAMETER = 0xC000000D
LEASE = 0xFF
NAME = "kx.txt"

client_guid, create_guid, key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4().bytes
conn, tree = connect(*SERVER, client_guid=client_guid)
ctxs = [persistent_context(create_guid, 6000), lease_context(key)]
f = open_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, ctxs, LEASE)
fid = f.file_id
conn.disconnect(close=False)
pause("disconnected")

conn, tree = connect(*SERVER, client_guid=client_guid)
other_fid = bytes(b ^ 0x5A for b in fid[:8]) + fid[8:]
lease = [lease_context(key)]
for what, (file_id, contexts, persistent) in {
    "without the persistent flag": (fid, lease, False),
    "under another FileId": (other_fid, lease, True),
    "under another lease key": (fid, [lease_context(uuid.uuid4().bytes)], True),
    "with no lease": (fid, [], True),
}.items():
    g, st = reconnect_v2(tree, NAME, file_id, create_guid, contexts, LEASE, persistent)
    check(st == OBJECT_NAME_NOT_FOUND, f"a DH2C {what} is refused ({st:#x})")
for what, name in {"under another name": "ky.txt", "under a name that does not parse": "k:x.txt"}.items():
    g, st = reconnect_v2(tree, name, fid, create_guid, lease, LEASE)
    check(st == INVALID_PARAMETER, f"a DH2C {what} is refused ({st:#x})")
try:
    sent_as_replay(lambda: create_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [
        lease_context(uuid.uuid4().bytes), persistent_context(create_guid, 6000)], LEASE))
    st = 0
except SMBResponseException as e:
    st = e.status
check(st == ACCESS_DENIED, f"the CREATE replayed under another lease key is refused ({st:#x})")
pause("refused")

g, st = reconnect_v2(tree, NAME, fid, create_guid, lease, LEASE)
check(st == OBJECT_NAME_NOT_FOUND, f"the open expired: a matching DH2C is refused ({st:#x})")
conn.disconnect()
print("PASS", flush=True)
