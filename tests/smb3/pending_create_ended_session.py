"""A pending CREATE whose session another connection ends (rksmbd).

Usage: pending_create_ended_session.py HOST PORT SHARE USER PASSWORD

Client A holds `ended.txt` with an RWH lease, sharing all. Connection K1
(session S1) opens it sharing nothing: the CREATE waits for A's handle
lease (STATUS_PENDING). Connection K2 logs on as the same user naming S1
as PreviousSessionId, which ends S1 (MS-SMB2 3.3.5.5.3). A goes away, so
K1's CREATE could be granted — but its session is gone: it ends with
STATUS_USER_SESSION_DELETED, and so does K1's next request on S1. A third
client then opens the file sharing nothing and gets it. Before, K1's
CREATE was granted on the ended session, its filterd handle tracked by a
session nobody would release again: K1's next request forgot the open
without closing it, and filterd held the handle, its share mode and lease
until rksmbd restarted (every later share-none open was
STATUS_SHARING_VIOLATION). Prints PASS, or exits non-zero.
"""

import struct
import time
import uuid

from raw_channel import (
    CREATE,
    MORE_PROCESSING,
    READ,
    SESSION_SETUP,
    SUCCESS,
    USER_SESSION_DELETED,
    Raw,
    check,
    cmac_sign,
    connect_share,
    create_with,
    lease_ctx,
    ntlm_context,
)

NAME = "ended.txt"
PENDING = 0x103
SHARING_VIOLATION = 0xC0000043


def share_none(name):
    """A CREATE of `name` for read and write (made if missing), sharing
    nothing, no lease."""
    n = name.encode("utf-16-le")
    return struct.pack("<HBBIQQIIIIIHHII", 57, 0, 0, 2, 0, 0, 0xC0000000, 0x80, 0, 3, 0x40, 64 + 56, len(n), 0, 0) + n


def status(msg):
    return struct.unpack_from("<I", msg, 8)[0]


def logon_ending(raw, previous):
    """Logs USER on to `raw` naming `previous` as PreviousSessionId."""
    ctx = ntlm_context()
    token = ctx.step(None)
    body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), previous) + token
    st, r = raw.call(raw.header(SESSION_SETUP, 0) + body)
    check(st == MORE_PROCESSING, f"first logon leg answered ({st:#010x})")
    sid = struct.unpack_from("<Q", r, 40)[0]
    off, length = struct.unpack_from("<HH", r, 64 + 4)
    token = ctx.step(r[off : off + length])
    body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), previous) + token
    st, _ = raw.call(raw.header(SESSION_SETUP, sid) + body)
    check(st == SUCCESS, f"logged on naming the old session as PreviousSessionId ({st:#010x})")


def main():
    a = Raw(uuid.uuid4())
    sa, ka, ta = connect_share(a)
    st, _ = a.call(cmac_sign(ka, a.header(CREATE, sa, tid=ta) + create_with(NAME, oplock=0xFF, ctxs=lease_ctx(uuid.uuid4().bytes))))
    check(st == SUCCESS, f"A holds {NAME} with an RWH lease ({st:#010x})")

    k1 = Raw(uuid.uuid4())
    s1, key1, t1 = connect_share(k1)
    k1.send(cmac_sign(key1, k1.header(CREATE, s1, tid=t1) + share_none(NAME)))
    st = status(k1.recv())
    check(st == PENDING, f"K1's share-none CREATE waits for A's lease ({st:#010x})")

    k2 = Raw(uuid.uuid4())
    logon_ending(k2, s1)
    # A goes: its open closes, and K1's CREATE could be granted.
    a.s.close()
    k1.s.settimeout(30)
    st = status(k1.recv())
    check(st == USER_SESSION_DELETED, f"K1's CREATE on the ended session ends USER_SESSION_DELETED ({st:#010x})")
    rd = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, 1, 0, b"\xff" * 16, 0, 0, 0, 0, 0) + b"\0"
    st, _ = k1.call(cmac_sign(key1, k1.header(READ, s1, tid=t1) + rd))
    check(st == USER_SESSION_DELETED, f"K1's next request on the ended session too ({st:#010x})")
    k1.s.close()

    # A's close and K1's end are taken in by rksmbd's other threads: a
    # sharing violation may be seen for a moment, not for good.
    k3 = Raw(uuid.uuid4())
    s3, key3, t3 = connect_share(k3)
    deadline = time.monotonic() + 10
    while True:
        st, _ = k3.call(cmac_sign(key3, k3.header(CREATE, s3, tid=t3) + share_none(NAME)))
        if st != SHARING_VIOLATION or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    check(st == SUCCESS, f"a third client's share-none open of {NAME} is granted ({st:#010x})")
    k3.s.close()
    k2.s.close()
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
