"""A persistent open's DH2C must carry SMB2_DHANDLE_FLAG_PERSISTENT
(rksmbd, smbprotocol; MS-SMB2 3.3.5.9.12; review rvfailover: the flag was
parsed and dropped).

Usage: reconnect_persistent_flag.py HOST PORT SHARE USER PASSWORD

A persistent open of pf.txt; the client drops its TCP connection. A DH2C
without the flag fails STATUS_OBJECT_NAME_NOT_FOUND and leaves the handle
disconnected: a DH2C with the flag then gets it back, with its data. A
durable (not persistent) open is reconnected with or without the flag.
Prints PASS; exits non-zero on any failure.
"""

import uuid

from smbprotocol.open import CreateDisposition

from smbprotocol.create_contexts import CreateContextName, SMB2CreateDurableHandleRequestV2

from smbtest import args, check, connect, context, lease_context, open_rw, persistent_context, reconnect_v2

SERVER = args()
OBJECT_NAME_NOT_FOUND = 0xC0000034
LEASE = 0xFF

client_guid, create_guid = uuid.uuid4(), uuid.uuid4()
conn, tree = connect(*SERVER, client_guid=client_guid)
f = open_rw(tree, "pf.txt", CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(create_guid)])
f.write(b"kept", 0)
fid = f.file_id
conn.disconnect(close=False)

conn, tree = connect(*SERVER, client_guid=client_guid)
g, st = reconnect_v2(tree, "pf.txt", fid, create_guid, persistent=False)
check(st == OBJECT_NAME_NOT_FOUND, f"a DH2C without the persistent flag is refused ({st:#x})")
g, st = reconnect_v2(tree, "pf.txt", fid, create_guid)
check(st == 0, f"the handle is still there for a DH2C with the flag ({st:#x})")
check(g.read(0, 4) == b"kept", "it is the open written before")
g.close()
conn.disconnect()

# A durable open, leased (durability needs handle caching), is reconnected
# with the flag or without it.
for flag in (False, True):
    client_guid, create_guid, key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4().bytes
    conn, tree = connect(*SERVER, client_guid=client_guid)
    dh2q = SMB2CreateDurableHandleRequestV2()
    dh2q["timeout"] = 60000
    dh2q["flags"] = 0
    dh2q["create_guid"] = create_guid
    ctxs = [context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q), lease_context(key)]
    f = open_rw(tree, f"d{flag}.txt", CreateDisposition.FILE_OVERWRITE_IF, ctxs, LEASE)
    fid = f.file_id
    conn.disconnect(close=False)
    conn, tree = connect(*SERVER, client_guid=client_guid)
    g, st = reconnect_v2(tree, f"d{flag}.txt", fid, create_guid, [lease_context(key)], LEASE, persistent=flag)
    check(st == 0, f"a durable open's DH2C, persistent flag {flag} ({st:#x})")
    g.close()
    conn.disconnect()
print("PASS", flush=True)
