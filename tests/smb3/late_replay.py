"""A persistent CREATE that filterd answers after rksmbd's call gave up,
replayed by its client from a new connection (raw SMB 3.0.2).

Usage: late_replay.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS);
late.txt does not exist.

1. Client A (client GUID C) prints "ready" and waits (the driver SIGSTOPs
   filterd); sends a persistent (DH2Q, create GUID G) OVERWRITE_IF CREATE
   of late.txt sharing all, which must fail with STATUS_SERVER_UNAVAILABLE
   (MS-SMB2 3.2.5.7: an SMB 3.x client replays a request so answered when
   the server offers persistent handles); prints "gave up" and waits (the
   driver SIGCONTs filterd and waits for the late open to be left
   detached).
2. Client B opens late.txt, writes "b's data" over it and closes it.
3. A's connection drops (as a client's whose connection dropped before
   the answer reached it, which replays the CREATE too). A, on a new
   connection of client GUID C and a new session, replays the CREATE
   (SMB2_FLAGS_REPLAY_OPERATION, G): it must succeed with the original's
   create action (FILE_CREATED: run again, it would answer
   FILE_OVERWRITTEN) and the file as B left it — the CREATE did not run
   twice. Prints "replayed" and waits (the driver
   checks the handle is attached and the file), then closes it.

Prints PASS; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import (
    CREATE,
    SUCCESS,
    Raw,
    check,
    cmac_sign,
    connect_share,
    create_body,
    final,
    patient_share,
    persistent_create,
    reset,
    signed_close,
    signed_read,
    signed_write,
)
from smbtest import pause

SERVER_UNAVAILABLE = 0xC0000466
OVERWRITE_IF = 5
FILE_CREATED = 2
B_DATA = b"b's data"


def create(a, sid, key, tid, g, replay=False):
    return persistent_create(a, sid, key, tid, "late.txt", g, OVERWRITE_IF, replay=replay)


def main():
    client = uuid.uuid4()
    a, sid, key, tid = patient_share(client)
    g = uuid.uuid4()

    pause("ready")
    st, _ = final(a, create(a, sid, key, tid, g))
    check(st == SERVER_UNAVAILABLE, f"the CREATE filterd answered late: STATUS_SERVER_UNAVAILABLE (got {st:#010x})")
    pause("gave up")

    b = Raw(uuid.uuid4())
    bsid, bkey, btid = connect_share(b)
    st, m = final(b, cmac_sign(bkey, b.header(CREATE, bsid, tid=btid) + create_body("late.txt", disposition=1)))
    check(st == SUCCESS, f"another client opens late.txt (got {st:#010x})")
    bfid = m[128:144]
    st = signed_write(b, bsid, bkey, btid, bfid, B_DATA)
    check(st == SUCCESS, f"it writes {B_DATA!r} (got {st:#010x})")
    signed_close(b, bsid, bkey, btid, bfid)

    reset(a.s)
    a, sid, key, tid = patient_share(client)
    st, m = final(a, create(a, sid, key, tid, g, replay=True))
    check(st == SUCCESS, f"the replayed CREATE succeeds (got {st:#010x})")
    action = struct.unpack_from("<I", m, 64 + 4)[0]
    check(action == FILE_CREATED, f"with the original's create action, created (got {action})")
    fid = m[128:144]
    _, got = signed_read(a, sid, key, tid, fid, 64)
    check(got == B_DATA, f"the file as the other client left it, not overwritten again (got {got!r})")
    pause("replayed")
    signed_close(a, sid, key, tid, fid)
    print("PASS", flush=True)


main()
