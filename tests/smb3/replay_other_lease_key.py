"""A CREATE replayed on another connection under another lease key is
refused (rksmbd, smbprotocol; MS-SMB2 3.3.5.9.10; review rvfailover).

Usage: replay_other_lease_key.py HOST PORT SHARE USER PASSWORD

A persistent open of rk.txt under lease key K1 (RWH); the client drops
its TCP connection and, on a new one, replays the CREATE (replay flag,
the same create GUID) asking for lease key K2: STATUS_ACCESS_DENIED, as
the same replay on the original's connection is (before: success, the
response naming K2 while filterd's lease stayed K1's). The open is left
disconnected: the replay under K1 returns it, with its data. Prints
PASS; exits non-zero on any failure.
"""

import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, RequestedOplockLevel

from smbtest import args, check, connect, create_rw, lease_context, persistent_context, sent_as_replay

SERVER = args()
ACCESS_DENIED = 0xC0000022
LEASE = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE

client_guid, create_guid = uuid.uuid4(), uuid.uuid4()
k1, k2 = uuid.uuid4().bytes, uuid.uuid4().bytes


def replay(tree, key):
    """The CREATE replayed on `tree` under lease key `key`: (the Open, the
    lease key and state answered) or (None, the status it failed with)."""
    try:
        f, resp = sent_as_replay(lambda: create_rw(
            tree, "rk.txt", CreateDisposition.FILE_OVERWRITE_IF,
            [lease_context(key), persistent_context(create_guid)], LEASE))
    except SMBResponseException as e:
        return None, e.status
    leases = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
    return f, [(r["lease_key"].get_value(), r["lease_state"].get_value()) for r in leases]


conn, tree = connect(*SERVER, client_guid=client_guid)
f, _ = create_rw(tree, "rk.txt", CreateDisposition.FILE_OVERWRITE_IF,
                 [lease_context(k1), persistent_context(create_guid)], LEASE)
f.write(b"original", 0)
conn.disconnect(close=False)

conn, tree = connect(*SERVER, client_guid=client_guid)
g, got = replay(tree, k2)
check(g is None and got == ACCESS_DENIED, f"the replay under another lease key is refused ({got})")
g, got = replay(tree, k1)
check(g is not None, f"the replay under the open's own key gets it ({got})")
check(len(got) == 1 and got[0][1] != 0, f"with its lease ({got})")
check(g.read(0, 8) == b"original", "it is the original open")
g.close()
conn.disconnect()
print("PASS", flush=True)
