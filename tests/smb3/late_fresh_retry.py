"""A persistent CREATE answered STATUS_SERVER_UNAVAILABLE whose late
answer left nothing, retried with the same create GUID but without the
replay flag (made fresh), then a LOGOFF and a DH2C (raw SMB 3.0.2).

Usage: late_fresh_retry.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS).

1. Client A makes x.txt (closed), prints "ready" and waits (the driver
   SIGSTOPs filterd); sends a persistent (DH2Q, create GUID G) FILE_CREATE
   of x.txt, which must fail STATUS_SERVER_UNAVAILABLE; prints "gave up"
   and waits (the driver SIGCONTs filterd, whose late answer is an error:
   the file exists, nothing is left).
2. A retries G as an OPEN_IF without SMB2_FLAGS_REPLAY_OPERATION: a fresh
   open, which must succeed. A LOGOFFs (must succeed): the open it was
   told of is detached for a DH2C, not closed as an unanswered CREATE's.
   Prints "logged off" and waits.
3. From a new connection and session (same client GUID), a DH2C of the
   open (G) must succeed. Closed.

Prints PASS; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import SUCCESS, check, cmac_sign, context, final, patient_share, persistent_create, signed_close, signed_create, signed_made
from smbprotocol.create_contexts import CreateContextName, DurableHandleFlags, SMB2CreateDurableHandleReconnectV2
from smbtest import pause

SERVER_UNAVAILABLE = 0xC0000466
FILE_CREATE = 2
OPEN_IF = 3
FILE_OPEN = 1
LOGOFF = 2


def dh2c(fid, create_guid):
    """A DH2C create context of persistent open `fid` (create GUID `create_guid`)."""
    c = SMB2CreateDurableHandleReconnectV2()
    c["file_id"] = fid
    c["create_guid"] = create_guid
    c["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT
    return context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_RECONNECT_V2, c).pack()


def main():
    client, g = uuid.uuid4(), uuid.uuid4()
    a, sid, key, tid = patient_share(client)
    signed_made(a, sid, key, tid, "x.txt")
    pause("ready")
    st, _ = final(a, persistent_create(a, sid, key, tid, "x.txt", g, FILE_CREATE))
    check(st == SERVER_UNAVAILABLE, f"the CREATE filterd answered late: STATUS_SERVER_UNAVAILABLE (got {st:#010x})")
    pause("gave up")

    st, m = final(a, persistent_create(a, sid, key, tid, "x.txt", g, OPEN_IF))
    check(st == SUCCESS, f"the retry of G without the replay flag succeeds (got {st:#010x})")
    fid = m[128:144]
    st, _ = final(a, cmac_sign(key, a.header(LOGOFF, sid) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, f"A logs off (got {st:#010x})")
    pause("logged off")

    b, bsid, bkey, btid = patient_share(client)
    st, m = final(b, signed_create(b, bsid, bkey, btid, "x.txt", 7, FILE_OPEN, dh2c(fid, g)))
    check(st == SUCCESS, f"the DH2C after the LOGOFF gets the open back (got {st:#010x})")
    if st == SUCCESS:
        signed_close(b, bsid, bkey, btid, m[128:144])
    print("PASS", flush=True)


main()
