"""A delete on close whose outcome stayed unknown, then an AppInstanceId
takeover (rksmbd, smbprotocol).

Usage: late_delete_on_close_app_instance.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a 1 s call timeout (RKFILTER_CALL_TIMEOUT_MS).

Client A opens app.txt (created, persistent, with DELETE) under an
AppInstanceId, writes to it and prints "ready" and waits (the driver
SIGSTOPs filterd); its delete-pending SET_INFO must fail with
STATUS_FILE_NOT_AVAILABLE (the call and the query of its outcome both
gave up); prints "gave up" and waits (the driver SIGCONTs filterd, which
sets the flag late). Client B opens app.txt (FILE_OPEN) under the same
AppInstanceId, which closes A's open first: the file A was told stays
must be there, with what A wrote. Prints PASS; exits non-zero on any
failure.
"""

import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition

from smbtest import SHARE_ALL, args, check, connect, delete_pending_gives_up, open_app_instance, pause

DELETE = 0x00010000
SERVER = args()
APP = uuid.uuid4().bytes
DATA = b"told it stays\n"


def open_app(tree, disposition):
    """app.txt opened persistent under AppInstanceId APP, with DELETE."""
    return open_app_instance(tree, "app.txt", APP, disposition, share=SHARE_ALL, extra=DELETE)


def main():
    a, a_tree = connect(*SERVER)
    f = open_app(a_tree, CreateDisposition.FILE_OPEN_IF)
    f.write(DATA, 0)
    pause("ready")
    delete_pending_gives_up(a_tree, f)
    b, b_tree = connect(*SERVER)
    try:
        g = open_app(b_tree, CreateDisposition.FILE_OPEN)
    except SMBResponseException as e:
        check(False, f"the takeover opens the file A was told stays ({e.status:#x})")
    check(g.read(0, len(DATA)) == DATA, "the file holds what A wrote")
    g.close()
    b.disconnect()
    a.disconnect(close=False)
    print("PASS", flush=True)


main()
