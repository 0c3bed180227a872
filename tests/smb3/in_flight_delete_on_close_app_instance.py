"""An AppInstanceId takeover while the taken open's delete on close is
in flight (rksmbd, smbprotocol).

Usage: in_flight_delete_on_close_app_instance.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd whose calls wait long enough (5 s) and a filterd
whose engine stalls 1.5 s on the delete on close (a failpoint).

Client A opens app.txt (created, persistent, with DELETE) under an
AppInstanceId and writes to it, sends a delete-pending SET_INFO without
waiting for its answer, prints "sent" and waits (the driver waits until
filterd's engine is in the change). Client B opens app.txt (FILE_OPEN)
under the same AppInstanceId, which closes A's open first, from B's
connection, while A's change is in flight: A was never told its file
goes, so it must be there, with what A wrote, and A's SET_INFO, undone
by that close, is answered STATUS_FILE_CLOSED, not SUCCESS. Prints PASS;
exits non-zero on any failure.
"""

import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.file_info import FileDispositionInformation
from smbprotocol.open import CreateDisposition

from smbtest import SHARE_ALL, args, check, connect, open_app_instance, pause, send_set_info

DELETE = 0x00010000
SERVER = args()
APP = uuid.uuid4().bytes
DATA = b"never told it goes\n"


def open_app(tree, disposition):
    """app.txt opened persistent under AppInstanceId APP, with DELETE."""
    return open_app_instance(tree, "app.txt", APP, disposition, share=SHARE_ALL, extra=DELETE)


def main():
    a, a_tree = connect(*SERVER)
    f = open_app(a_tree, CreateDisposition.FILE_OPEN_IF)
    f.write(DATA, 0)
    info = FileDispositionInformation()
    info["delete_pending"] = True
    sent = send_set_info(a_tree, f, info)
    pause("sent")
    b, b_tree = connect(*SERVER)
    try:
        g = open_app(b_tree, CreateDisposition.FILE_OPEN)
    except SMBResponseException as e:
        check(False, f"the takeover opens the file A was never told goes ({e.status:#x})")
    check(g.read(0, len(DATA)) == DATA, "the file holds what A wrote")
    # A's change was undone by the takeover's close: it is not answered a
    # success (it was, before, for a file kept against what A was told).
    try:
        a_tree.session.connection.receive(sent)
        check(False, "A's delete-pending SET_INFO answered SUCCESS for a change the takeover undid")
    except SMBResponseException as e:
        check(e.status == 0xC0000128, f"A's SET_INFO is STATUS_FILE_CLOSED ({e.status:#x})")
    g.close()
    b.disconnect()
    a.disconnect(close=False)
    print("PASS", flush=True)


main()
