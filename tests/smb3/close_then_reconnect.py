"""A CLOSE filterd never answered, its connection dropped, then a DH2C of
the handle (rksmbd, smbprotocol).

Usage: close_then_reconnect.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS).
Opens cr.txt persistent (create GUID C), writes, prints "ready" and waits
(the driver SIGSTOPs filterd). Sends a CLOSE of it and drops the TCP
connection without reading the answer: the client never learns whether
the CLOSE was made, which is when MS-SMB2 lets it reconnect the handle.
From a new connection (same client GUID) it sends a DH2C of the handle and
prints "reconnecting" (the driver SIGCONTs filterd while rksmbd's call is
in flight, or after it gave up). The DH2C must fail: the CLOSE was sent
first and wins; whatever rksmbd's close-settler does after, it never
closes a handle the client got back. Prints "reconnect refused STATUS"
and waits (the driver waits until filterd holds no handle). A second DH2C
fails STATUS_OBJECT_NAME_NOT_FOUND (after STATUS_FILE_NOT_AVAILABLE while
rksmbd's settler still notes the close, retried), a CLOSE of the old FileId (a replay
of the CLOSE) STATUS_FILE_CLOSED, and another client opens cr.txt sharing
nothing. Prints PASS; exits non-zero on any failure.
"""

import time
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, SMB2CloseRequest

from smbtest import args, check, connect, open_exclusive, open_rw, pause, persistent_context, reconnect_v2

SERVER = args()
NAME = "cr.txt"
OBJECT_NAME_NOT_FOUND = 0xC0000034
FILE_CLOSED = 0xC0000128
FILE_NOT_AVAILABLE = 0xC0000467


def reconnect(tree, fid, create_guid):
    """A DH2C of the handle on `tree`: 0 (SUCCESS) or the status it failed with."""
    f, st = reconnect_v2(tree, NAME, fid, create_guid)
    if f is not None:
        # Got it back: show whether the handle works before failing.
        try:
            f.write(b"after", 0)
            print("the reconnected handle writes", flush=True)
        except SMBResponseException as e:
            print(f"the reconnected handle's WRITE failed {e.status:#x}", flush=True)
    return st


client_guid, create_guid = uuid.uuid4(), uuid.uuid4()
conn, tree = connect(*SERVER, client_guid=client_guid)
f = open_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(create_guid)])
f.write(b"before", 0)
fid = f.file_id
pause("ready")

req = SMB2CloseRequest()
req["file_id"] = fid
conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id)
conn.disconnect(close=False)

again, again_tree = connect(*SERVER, client_guid=client_guid)
print("reconnecting", flush=True)
st = reconnect(again_tree, fid, create_guid)
check(st != 0, f"the DH2C after an unanswered CLOSE fails (got {st:#010x})")
pause(f"reconnect refused {st:#010x}")

# filterd closed the handle; rksmbd's settler may not have taken its
# settling note down yet, and a DH2C meanwhile is told to retry
# (STATUS_FILE_NOT_AVAILABLE), as a client's retry is: retried (bounded).
deadline = time.monotonic() + 20
while True:
    st = reconnect(again_tree, fid, create_guid)
    if st != FILE_NOT_AVAILABLE or time.monotonic() > deadline:
        break
    time.sleep(0.05)
check(st == OBJECT_NAME_NOT_FOUND, f"a second DH2C finds nothing (got {st:#010x})")
try:
    again.receive(again.send(req, sid=again_tree.session.session_id, tid=again_tree.tree_connect_id))
    check(False, "the CLOSE replayed on the new session is not a success")
except SMBResponseException as e:
    check(e.status == FILE_CLOSED, f"the CLOSE replayed on the new session: FILE_CLOSED (got {e.status:#010x})")

# Nothing of the old handle is left to refuse an open sharing nothing.
open_exclusive(SERVER, NAME, b"before")
again.disconnect()
print("PASS", flush=True)
