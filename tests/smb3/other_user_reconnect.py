"""A durable open under a lease is reconnected by its own user only
(rksmbd; MS-SMB2 3.3.5.9.12: Open.DurableOwner must be the session's
user, else STATUS_ACCESS_DENIED).

Usage: other_user_reconnect.py HOST PORT SHARE USER PASSWORD OTHER OTHER_PASSWORD

USER opens secret.txt read/write, persistent, with an RWH lease, writes
and drops TCP. OTHER logs on over a connection that negotiated USER's
client GUID (it goes in clear in every NEGOTIATE) and sends a DH2C with
USER's create GUID, FileId and lease key: refused ACCESS_DENIED; so is
OTHER's replay of USER's CREATE (replay flag, DH2Q with the create GUID).
USER then reconnects the open and finds its data untouched; prints PASS.
"""

import sys
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, RequestedOplockLevel

from smbtest import connect, create_rw, lease_context, persistent_context, reconnect_v2, sent_as_replay

ACCESS_DENIED = 0xC0000022
LEASE = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE


def main():
    host, port, share, user, pw, other, other_pw = sys.argv[1:8]
    port = int(port)
    guid, create_guid, lease_key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4().bytes
    conn, tree = connect(host, port, share, user, pw, client_guid=guid)
    f, _ = create_rw(tree, "secret.txt", CreateDisposition.FILE_OVERWRITE_IF,
                     [lease_context(lease_key), persistent_context(create_guid)], LEASE)
    f.write(b"owner's secret\n", 0)
    fid = f.file_id
    conn.disconnect(close=False)

    conn2, tree2 = connect(host, port, share, other, other_pw, client_guid=guid)
    g, st = reconnect_v2(tree2, "secret.txt", fid, create_guid, [lease_context(lease_key)], LEASE)
    if g is not None:
        g.write(b"INTRUDER", 0)
        sys.exit(f"{other} reconnected {user}'s open and wrote through it")
    if st != ACCESS_DENIED:
        sys.exit(f"{other}'s reconnect: status {st:#010x}, expected ACCESS_DENIED")
    # Nor by replaying USER's CREATE (the replay flag and a DH2Q naming
    # the create GUID), which finds the open by the same client GUID and
    # create GUID (review D-1).
    try:
        sent_as_replay(lambda: create_rw(
            tree2, "secret.txt", CreateDisposition.FILE_OPEN_IF,
            [lease_context(lease_key), persistent_context(create_guid)], LEASE))
        sys.exit(f"{other} got {user}'s open by replaying its CREATE")
    except SMBResponseException as e:
        if e.status != ACCESS_DENIED:
            sys.exit(f"{other}'s replayed CREATE: status {e.status:#010x}, expected ACCESS_DENIED")
    conn2.disconnect()

    conn3, tree3 = connect(host, port, share, user, pw, client_guid=guid)
    h, st = reconnect_v2(tree3, "secret.txt", fid, create_guid, [lease_context(lease_key)], LEASE)
    if h is None:
        sys.exit(f"{user}'s own reconnect after the refusal: status {st:#010x}")
    data = h.read(0, 15)
    if data != b"owner's secret\n":
        sys.exit(f"{user} reads {data!r}")
    h.close()
    conn3.disconnect()
    print("PASS")


if __name__ == "__main__":
    main()
