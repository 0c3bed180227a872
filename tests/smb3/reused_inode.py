"""A persistent handle whose file is replaced, under the same inode number,
while filterd restarts (rksmbd, smbprotocol).

Usage: reused_inode.py HOST PORT SHARE USER PASSWORD

Client A opens old.txt with a DH2Q persistent context and an RWH lease
(v2), sharing read only, and drops its TCP connection ("dropped"). The
driver kills filterd, restarts it, removes old.txt and makes a new file
with its inode number, and writes the new file's name on stdin. Then:
client B opens the new file sharing nothing (A's handle, sharing read
only, must not refuse it); A's DH2C of
old.txt is refused (its file is gone: never the new file); A's open of
the new file is a sharing violation (B's); after B closes, A opens the
new file under its old lease key, with RWH, and reads what the file
holds now.
Prints one line per step and PASS; exits non-zero on any failure.
"""

import time
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, RequestedOplockLevel, ShareAccess

from smbtest import RWH, args, check, connect, create_rw, lease_context, persistent_context, reconnect_v2

SERVER = args()
LEASE = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE


def lease_state(resp):
    leases = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
    return leases[0]["lease_state"].get_value() if leases else None


a_guid = uuid.uuid4()
create_guid = uuid.uuid4()
a_lease = uuid.uuid4().bytes

conn, tree = connect(*SERVER, client_guid=a_guid)
f, resp = create_rw(
    tree,
    "old.txt",
    CreateDisposition.FILE_OVERWRITE_IF,
    [persistent_context(create_guid), lease_context(a_lease)],
    LEASE,
)
check(lease_state(resp) == RWH, "A holds an RWH lease on old.txt")
f.write(b"old", 0)
file_id = f.file_id
conn.disconnect(close=False)
print("dropped", flush=True)
NEW = input().strip()

b_conn, b_tree = connect(*SERVER)
# filterd was just restarted: until rksmbd has reattached, a CREATE is
# STATUS_FILE_NOT_AVAILABLE (retry later), as for any client.
deadline = time.monotonic() + 20
while True:
    try:
        g, _ = create_rw(b_tree, NEW, CreateDisposition.FILE_OPEN, share=0)
        break
    except SMBResponseException as e:
        if e.status != 0xC0000467 or time.monotonic() > deadline:
            raise
        time.sleep(0.05)
check(True, "B opens the new file sharing nothing")

conn2, tree2 = connect(*SERVER, client_guid=a_guid)
_, st = reconnect_v2(tree2, "old.txt", file_id, create_guid, [lease_context(a_lease)], LEASE)
check(st != 0, f"A's DH2C of old.txt is refused ({st:#x})")
try:
    create_rw(tree2, NEW, CreateDisposition.FILE_OPEN, [lease_context(a_lease)], LEASE)
    st = 0
except SMBResponseException as e:
    st = e.status
check(st == 0xC0000043, f"A's open of the new file is B's sharing violation ({st:#x})")
check(g.read(0, 9) == b"unrelated", "B reads the new file")
g.close()
b_conn.disconnect()
f2, resp = create_rw(tree2, NEW, CreateDisposition.FILE_OPEN, [lease_context(a_lease)], LEASE, ShareAccess.FILE_SHARE_READ)
check(lease_state(resp) == RWH, "A opens the new file under its old lease key, with RWH")
check(f2.read(0, 9) == b"unrelated", "A reads the new file's data")
f2.close()
conn2.disconnect()
print("PASS", flush=True)
