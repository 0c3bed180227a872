"""Password guessing is slowed and ends connections (rksmbd; raw SMB
3.0.2; adversarial review: 1,500 wrong passwords on one connection in
6.3 s, then the right one logged on).

Usage: logon_failures.py HOST PORT SHARE USER PASSWORD

1. Three wrong passwords of USER on one connection are each
   STATUS_LOGON_FAILURE, the second and third answered only after a
   wait; then the connection is ended.
2. USER from another address (127.0.0.2) is not slowed: the right
   password logs on at once.
3. A fourth wrong password, on a new connection, waits longer still.
4. The right password on a new connection logs on (after its turn).
5. 12 unknown users are guessed, 3 per connection: each connection is
   ended after its third (rksmbd's log, which the Rust test reads, has
   at most 10 `logon refused` lines for all 16 failures).

Prints one line per step; exits non-zero on any failure.
"""

import struct
import time
import uuid

import spnego
from raw_channel import (
    FAILURES,
    HOST,
    MORE_PROCESSING,
    PASSWORD,
    SESSION_SETUP,
    SUCCESS,
    USER,
    Raw,
    check,
)

LOGON_FAILURE = 0xC000006D


def attempt(raw, user, password):
    """One logon of `user` with `password` on `raw`: its final status and
    how long its last leg took (-1: the connection ended)."""
    ctx = spnego.client(user, password, service="cifs", hostname=HOST, protocol="negotiate")
    try:
        token = ctx.step(None)
        body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), 0) + token
        st, r = raw.call(raw.header(SESSION_SETUP, 0) + body)
        if st != MORE_PROCESSING:
            return st, 0.0
        sid = struct.unpack_from("<Q", r, 40)[0]
        off, length = struct.unpack_from("<HH", r, 64 + 4)
        token = ctx.step(r[off : off + length])
        body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), 0) + token
        start = time.monotonic()
        st, _ = raw.call(raw.header(SESSION_SETUP, sid) + body)
        return st, time.monotonic() - start
    except (OSError, EOFError):
        return -1, 0.0


def ended(raw):
    """Whether rksmbd ended `raw`'s connection (it reads EOF)."""
    raw.s.settimeout(10)
    try:
        return raw.s.recv(1) == b""
    except ConnectionResetError:
        return True
    except OSError:
        return False


def main():
    r = Raw(uuid.uuid4())
    took = []
    for n in range(3):
        st, t = attempt(r, USER, f"wrong{n}")
        check(st == LOGON_FAILURE, f"wrong password #{n + 1} is STATUS_LOGON_FAILURE (got {st:#x}, {t:.2f} s)", False)
        took.append(t)
    check(took[1] >= 0.3 and took[2] >= 0.7, f"the second and third waited their turns ({took[1]:.2f}, {took[2]:.2f} s)", False)
    check(ended(r), "after three failures the connection is ended", False)

    st, t = attempt(Raw(uuid.uuid4(), "127.0.0.2"), USER, PASSWORD)
    check(st == SUCCESS and t < 0.3, f"USER from 127.0.0.2 logs on at once (got {st:#x} in {t:.2f} s)", False)

    st, t = attempt(Raw(uuid.uuid4()), USER, "wrong3")
    check(st == LOGON_FAILURE and t >= 1.0, f"a fourth wrong password waits longer (got {st:#x} in {t:.2f} s)", False)

    st, t = attempt(Raw(uuid.uuid4()), USER, PASSWORD)
    check(st == SUCCESS and t < 10, f"the right password logs on, after its turn (got {st:#x} in {t:.2f} s)", False)

    for c in range(4):
        r = Raw(uuid.uuid4())
        for n in range(3):
            st, _ = attempt(r, f"nobody{c}x{n}", "guess")
            check(st == LOGON_FAILURE, f"unknown user nobody{c}x{n} is STATUS_LOGON_FAILURE (got {st:#x})", False)
        check(ended(r), f"connection #{c} of unknown users is ended after three", False)

    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
