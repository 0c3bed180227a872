"""A delete on close whose outcome stayed unknown, then PreviousSessionId
(rksmbd, smbprotocol).

Usage: late_delete_on_close_previous_session.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a 1 s call timeout (RKFILTER_CALL_TIMEOUT_MS).

A persistent open of doc.txt (created, with DELETE) prints "ready" and
waits (the driver SIGSTOPs filterd); its delete-pending SET_INFO must fail
with STATUS_FILE_NOT_AVAILABLE (the call and the query of its outcome both
gave up); prints "gave up" and waits (the driver SIGCONTs filterd, which
sets the flag late). The client, its old connection silent, sets up a
session with PreviousSessionId naming the old one (MS-SMB2 3.3.5.5.3: its
durable opens are kept for a reconnect), reconnects the open (DH2C) and
closes it; prints "closed" (the driver checks doc.txt is still there: the
client was told its delete on close failed).

Prints PASS; exits non-zero on any failure.
"""

import uuid

from smbprotocol.open import CreateDisposition

from previous_session_replay import with_previous_session
from smbtest import SHARE_ALL, args, check, connect, create_rw, delete_pending_gives_up, pause, persistent_context, reconnect_v2

DELETE = 0x00010000
HOST, PORT, SHARE, USER, PASSWORD = args()
CLIENT_GUID = uuid.uuid4()
CREATE_GUID = uuid.uuid4()


def main():
    old_conn, old_tree = connect(HOST, PORT, SHARE, USER, PASSWORD, CLIENT_GUID)
    f, _ = create_rw(
        old_tree, "doc.txt", CreateDisposition.FILE_OPEN_IF, [persistent_context(CREATE_GUID)], share=SHARE_ALL, extra=DELETE
    )
    pause("ready")
    delete_pending_gives_up(old_tree, f)
    old_session = old_tree.session.session_id
    conn, tree = with_previous_session(old_session, lambda: connect(HOST, PORT, SHARE, USER, PASSWORD, CLIENT_GUID))
    again, st = reconnect_v2(tree, "doc.txt", f.file_id, CREATE_GUID)
    check(again is not None, f"the DH2C on the new session gets the open (got {st:#010x})")
    again.close()
    pause("closed")
    conn.disconnect()
    old_conn.disconnect(close=False)
    print("PASS", flush=True)


main()
