"""The final response of a request that went async is signed as its
request was (MS-SMB2 3.3.4.1.1, 3.3.4.2; rksmbd; raw SMB 3.0.2, AES-CMAC).

Usage: signed_completions.py HOST PORT SHARE USER PASSWORD

Client C (every request signed) opens directory w and sends CHANGE_NOTIFYs
that go async; client D (its own connection) makes the changes. Each
final response must have SMB2_FLAGS_SIGNED and a signature that verifies
under C's signing key, the interim STATUS_PENDING none:

1. a change: STATUS_SUCCESS;
2. C's CANCEL: STATUS_CANCELLED;
3. C closes the directory: STATUS_NOTIFY_CLEANUP;
4. more changes than the request's output buffer holds:
   STATUS_NOTIFY_ENUM_DIR;
5. a blocking LOCK, granted once the holder unlocks: STATUS_SUCCESS.

Before (review rr38c), every CHANGE_NOTIFY completion was sent unsigned
(a client that requires signing, as Windows 11 does, rejects it: Samba's
smbclient printed NT_STATUS_ACCESS_DENIED).

Prints one line per step and PASS; exits non-zero on any failure.
"""

import struct

from cryptography.hazmat.backends import default_backend
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

from raw_channel import (
    CANCEL,
    CANCELLED,
    CLOSE,
    FAILURES,
    FLAG_SIGNED,
    PENDING,
    SUCCESS,
    SignedClient,
    check,
    cmac_sign,
    create_body,
    opened,
    signed_made,
)

CHANGE_NOTIFY, LOCK = 0xF, 0xA
FLAG_ASYNC = 0x2
NOTIFY_CLEANUP, NOTIFY_ENUM_DIR = 0x0000010B, 0x0000010C
FILE_NAME = 0x1
EXCLUSIVE, FAIL_IMMEDIATELY, UNLOCK = 0x2, 0x10, 0x4


def flags(m):
    return struct.unpack_from("<I", m, 16)[0]


def verifies(key, m):
    """Whether `m` is flagged signed and its AES-CMAC signature is right."""
    z = bytearray(m)
    z[48:64] = b"\0" * 16
    c = cmac.CMAC(algorithms.AES(key), backend=default_backend())
    c.update(bytes(z))
    return flags(m) & FLAG_SIGNED != 0 and c.finalize() == m[48:64]


def went_async(c, what):
    """The interim response of the request just sent: its AsyncId."""
    st, m = c.recv()
    check(st == PENDING and flags(m) & FLAG_ASYNC, f"{what}: went async (got {st:#010x})")
    check(flags(m) & FLAG_SIGNED == 0, f"{what}: the interim response is unsigned", False)
    return struct.unpack_from("<Q", m, 32)[0], struct.unpack_from("<Q", m, 24)[0]


def signed_final(c, want, what):
    """The next message on `c` is a final async response with status
    `want`, signed under `c`'s key."""
    st, m = c.recv()
    check(st == want and flags(m) & FLAG_ASYNC, f"{what}: final response {want:#010x} (got {st:#010x})", False)
    check(verifies(c.key, m), f"{what}: signed, and it verifies (flags {flags(m):#x})", False)


def notify(c, fid, out_len=4096):
    c.send(CHANGE_NOTIFY, struct.pack("<HHI16sII", 32, 0, out_len, fid, FILE_NAME, 0))


def open_dir(c, name):
    return opened(c, create_body(name, access=0x1, attributes=0x10, disposition=3, options=0x1))


def main():
    c, d = SignedClient(), SignedClient()
    w = open_dir(c, "w")

    notify(c, w)
    went_async(c, "CHANGE_NOTIFY")
    signed_made(d.raw, d.sid, d.key, d.tid, "w\\made")
    signed_final(c, SUCCESS, "CHANGE_NOTIFY told of a change")

    notify(c, w)
    _, mid = went_async(c, "CHANGE_NOTIFY")
    cancel = c.raw.header(CANCEL, c.sid, tid=c.tid, mid=mid) + struct.pack("<HH", 4, 0)
    c.raw.send(cmac_sign(c.key, cancel))
    signed_final(c, CANCELLED, "CHANGE_NOTIFY cancelled")

    notify(c, w)
    went_async(c, "CHANGE_NOTIFY")
    c.send(CLOSE, struct.pack("<HHI16s", 24, 0, 0, w))
    signed_final(c, NOTIFY_CLEANUP, "CHANGE_NOTIFY of a closed directory")
    st, _ = c.recv()
    check(st == SUCCESS, f"the directory closed (got {st:#010x})")

    w = open_dir(c, "w")
    notify(c, w, out_len=1)
    went_async(c, "CHANGE_NOTIFY with a 1-byte buffer")
    signed_made(d.raw, d.sid, d.key, d.tid, "w\\more")
    signed_final(c, NOTIFY_ENUM_DIR, "CHANGE_NOTIFY whose changes overflow")

    f, holder = opened(c, create_body("f")), opened(c, create_body("f"))
    lock = lambda fid, fl: struct.pack("<HHI16sQQII", 48, 1, 0, fid, 10, 10, fl, 0)
    st, _ = c.call(LOCK, lock(holder, EXCLUSIVE | FAIL_IMMEDIATELY))
    check(st == SUCCESS, f"the holder locks 10-19 (got {st:#010x})")
    c.send(LOCK, lock(f, EXCLUSIVE))
    went_async(c, "blocking LOCK")
    c.send(LOCK, lock(holder, UNLOCK))
    answers = [c.recv()[1] for _ in range(2)]
    unlocked = [m for m in answers if flags(m) & FLAG_ASYNC == 0]
    granted = [m for m in answers if flags(m) & FLAG_ASYNC]
    check(len(unlocked) == 1 and len(granted) == 1, "the holder's UNLOCK and the waiting LOCK are answered")
    st = struct.unpack_from("<I", granted[0], 8)[0]
    check(st == SUCCESS, f"blocking LOCK: granted (got {st:#010x})", False)
    check(verifies(c.key, granted[0]), f"blocking LOCK: signed, and it verifies (flags {flags(granted[0]):#x})", False)
    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
