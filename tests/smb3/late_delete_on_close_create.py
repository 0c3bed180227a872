"""A CREATE with FILE_DELETE_ON_CLOSE whose SetDeleteOnClose filterd
answers after rksmbd's call, and the query of its outcome, gave up
(rksmbd, smbprotocol).

Usage: late_delete_on_close_create.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a 1 s call timeout and a filterd that stalls
its first SetDeleteOnClose 2.5 s. The CREATE of the existing kept.txt must
fail; prints "failed" (the driver checks kept.txt is still there).

Prints PASS; exits non-zero on any failure.
"""

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, CreateOptions

from smbtest import SHARE_ALL, args, check, connect, create_rw

DELETE = 0x00010000


def main():
    conn, tree = connect(*args())
    try:
        create_rw(
            tree,
            "kept.txt",
            CreateDisposition.FILE_OPEN,
            share=SHARE_ALL,
            extra=DELETE,
            options=CreateOptions.FILE_DELETE_ON_CLOSE,
        )
        st = 0
    except SMBResponseException as e:
        st = e.status
    check(st != 0, f"the CREATE whose delete on close gave up failed (got {st:#010x})")
    print("failed", flush=True)
    conn.disconnect()
    print("PASS", flush=True)


main()
