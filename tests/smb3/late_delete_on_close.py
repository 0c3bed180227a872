"""SET_INFO FileDispositionInformation whose filterd call gives up
(rksmbd, smbprotocol).

Usage: late_delete_on_close.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a 1 s call timeout (RKFILTER_CALL_TIMEOUT_MS)
and a filterd that stalls its third SetDeleteOnClose 1.5 s.

1. An open of doc.txt (created, with DELETE) prints "ready" and waits (the
   driver SIGSTOPs filterd); its delete-pending SET_INFO must fail with
   STATUS_FILE_NOT_AVAILABLE (the call and the query of its outcome both
   gave up); prints "gave up" and waits (the driver SIGCONTs filterd, which
   sets the flag late). The client closes without retrying; prints
   "closed" and waits (the driver checks doc.txt is still there).
2. An open of learnt.txt: its delete-pending SET_INFO gives up (filterd
   stalled) but its outcome is learnt: STATUS_SUCCESS; closed, prints
   "closed" (the driver checks learnt.txt is gone).

Prints PASS; exits non-zero on any failure.
"""

from smbprotocol.file_info import FileDispositionInformation
from smbprotocol.open import CreateDisposition

from smbtest import SHARE_ALL, args, check, connect, create_rw, pause, set_info_status

FILE_NOT_AVAILABLE = 0xC0000467
DELETE = 0x00010000


def deletable(tree, name):
    """An open of file `name` (created) with DELETE, sharing all."""
    return create_rw(tree, name, CreateDisposition.FILE_OPEN_IF, share=SHARE_ALL, extra=DELETE)[0]


def delete_pending(tree, f):
    """SET_INFO FileDispositionInformation (delete) on `f`: its status."""
    info = FileDispositionInformation()
    info["delete_pending"] = True
    return set_info_status(tree, f, info)


def main():
    conn, tree = connect(*args())
    f = deletable(tree, "doc.txt")
    pause("ready")
    st = delete_pending(tree, f)
    check(st == FILE_NOT_AVAILABLE, f"the delete-pending SET_INFO failed with FILE_NOT_AVAILABLE (got {st:#010x})")
    pause("gave up")
    f.close()
    pause("closed")

    g = deletable(tree, "learnt.txt")
    st = delete_pending(tree, g)
    check(st == 0, f"the delete-pending SET_INFO learnt set succeeded (got {st:#010x})")
    g.close()
    pause("closed")
    conn.disconnect()
    print("PASS", flush=True)


main()
