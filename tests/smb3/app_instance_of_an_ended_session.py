"""An AppInstanceId takeover closes the old open also when its session
was ended by PreviousSessionId and its old connection, busy in a
request, has not released the session yet (rksmbd with
`RKSMBD_TEST_TRACKED_HOLD_MS` = HOLD, logging at info into LOG).

Usage: app_instance_of_an_ended_session.py HOST PORT SHARE USER PASSWORD LOG HOLD

Connection A opens app.txt exclusively (no sharing) under an
AppInstanceId (DH2Q, not granted durable: no oplock), then makes a
persistent open of hold.txt, which rksmbd holds once its session tracks
it. Meanwhile a session on connection B names A's as its
PreviousSessionId, ending it, and opens app.txt exclusively under the
same AppInstanceId. Before (re-review rr49b, out of scope there) the
takeover looked only at the logged-on sessions: it found nothing to
close, and B met A's open (STATUS_SHARING_VIOLATION) until A's
connection released it. Now B's open is granted at once, while A's
CREATE is still held. B then reconnects hold.txt and closes both.

Prints PASS, or exits non-zero.
"""

import sys
import time
import uuid

from smbprotocol.create_contexts import CreateContextName, SMB2CreateAppInstanceId, SMB2CreateContextRequest

import raw_channel
from raw_channel import (
    CREATE,
    PENDING,
    SUCCESS,
    check,
    dh2c,
    file_id,
    final,
    log_holds,
    patient_share,
    patient_share_after,
    persistent_create,
    signed_close,
    signed_create,
    until,
)
from smbtest import context, durable_v2

LOG, HOLD = sys.argv[6], int(sys.argv[7]) / 1000
OVERWRITE_IF = 5
APP = uuid.uuid4().bytes


def app_create(conn):
    """An exclusive CREATE of app.txt under AppInstanceId APP (a DH2Q
    of a fresh create GUID, no oplock: not granted durable)."""
    a = SMB2CreateAppInstanceId()
    a["app_instance_id"] = APP
    ctxs = [durable_v2(uuid.uuid4()), context(CreateContextName.SMB2_CREATE_APP_INSTANCE_ID, a)]
    ctx = SMB2CreateContextRequest.pack_multiple(ctxs)
    return signed_create(*conn, "app.txt", 0, OVERWRITE_IF, ctx)


client = uuid.uuid4()
a = patient_share(client)
st, m = final(a[0], app_create(a))
check(st == SUCCESS, f"A's open of app.txt under the AppInstanceId (got {st:#010x})")

g = uuid.uuid4()
a[0].send(persistent_create(*a, "hold.txt", g, OVERWRITE_IF))
until("A's open of hold.txt held once tracked", lambda: log_holds(LOG, "test hook: a durable open is held once tracked"))
held_at = time.monotonic()
b = patient_share_after(client, a[1])
st, m = final(b[0], app_create(b))
check(st == SUCCESS, f"B's open of app.txt takes the app instance over (got {st:#010x})")
# Else A's connection had released the session: the test proved nothing.
check(time.monotonic() - held_at < HOLD - 1, "taken over while A's CREATE was held")
app = file_id(m)

# A's CREATE of hold.txt, answered once the hold ends.
a[0].s.settimeout(HOLD + 30)
while True:
    m = a[0].recv()
    cmd, st = int.from_bytes(m[12:14], "little"), int.from_bytes(m[8:12], "little")
    if cmd == CREATE and st != PENDING:
        break
print(f"A's CREATE of hold.txt ended: {st:#010x}", flush=True)
if st == SUCCESS:
    fid = file_id(m)
    st, m = final(b[0], dh2c(b, "hold.txt", g, fid))
    check(st == SUCCESS, f"B's DH2C of hold.txt (got {st:#010x})")
    signed_close(*b, file_id(m))
signed_close(*b, app)
check(not raw_channel.FAILURES, f"no failures ({raw_channel.FAILURES})")
print("PASS", flush=True)
