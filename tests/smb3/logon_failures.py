"""Password guessing is slowed and ends connections (rksmbd; raw SMB
3.0.2; adversarial review: 1,500 wrong passwords on one connection in
6.3 s, then the right one logged on).

Usage: logon_failures.py HOST PORT SHARE USER PASSWORD

1. Three wrong passwords of USER on one connection are each
   STATUS_LOGON_FAILURE, the second and third answered only after a
   wait (measured from the previous answer: the server counts from the
   previous failure); then the connection is ended.
2. USER from another address (127.0.0.2) is not slowed: the right
   password logs on faster than the slowed third attempt was answered.
3. A fourth wrong password, on a new connection, waits longer still.
4. The right password on a new connection logs on (after its turn).
5. 12 unknown users are guessed, 3 per connection: each connection is
   ended after its third (rksmbd's log, which the Rust test reads, has
   at most 10 `logon refused` lines for all 16 failures).

Prints one line per step; exits non-zero on any failure.
"""

import time
import uuid

from raw_channel import (
    FAILURES,
    MORE_PROCESSING,
    PASSWORD,
    SUCCESS,
    USER,
    Raw,
    auth_leg,
    check,
    ended,
)

LOGON_FAILURE = 0xC000006D
# rksmbd's wait per failure (logons::STEP), and the allowance for an
# answer's way to the client.
STEP = 0.5
MARGIN = 0.2


def attempt(raw, user, password):
    """One logon of `user` with `password` on `raw`: its final status, how
    long its last leg took and when its answer came (-1: the connection
    ended)."""
    try:
        st, _, pdu = auth_leg(raw, user, password)
        if st != MORE_PROCESSING:
            return st, 0.0, time.monotonic()
        start = time.monotonic()
        st, _ = raw.call(pdu)
        end = time.monotonic()
        return st, end - start, end
    except (OSError, EOFError):
        return -1, 0.0, time.monotonic()


def main():
    # The server waits from each failure it answered: a wait is measured
    # from the answer to the previous attempt (MARGIN for that answer's
    # way to the client on a loaded machine), never against a fixed upper
    # bound, only against the slowed case.
    r = Raw(uuid.uuid4())
    ends = []
    for n in range(3):
        st, t, end = attempt(r, USER, f"wrong{n}")
        check(st == LOGON_FAILURE, f"wrong password #{n + 1} is STATUS_LOGON_FAILURE (got {st:#x}, {t:.2f} s)", False)
        ends.append(end)
    waits = [ends[1] - ends[0], ends[2] - ends[1]]
    check(
        waits[0] >= STEP - MARGIN and waits[1] >= 2 * STEP - MARGIN,
        f"the second and third waited their turns ({waits[0]:.2f}, {waits[1]:.2f} s after the previous answer)",
        False,
    )
    check(ended(r), "after three failures the connection is ended", False)

    st, t, _ = attempt(Raw(uuid.uuid4(), "127.0.0.2"), USER, PASSWORD)
    check(
        st == SUCCESS and t < waits[1],
        f"USER from 127.0.0.2 logs on without waiting (got {st:#x} in {t:.2f} s, slowed: {waits[1]:.2f} s)",
        False,
    )

    st, t, end = attempt(Raw(uuid.uuid4()), USER, "wrong3")
    check(
        st == LOGON_FAILURE and end - ends[2] >= 3 * STEP - MARGIN,
        f"a fourth wrong password waits longer (got {st:#x} {end - ends[2]:.2f} s after the third's answer)",
        False,
    )

    st, t, _ = attempt(Raw(uuid.uuid4()), USER, PASSWORD)
    check(st == SUCCESS and t < 10, f"the right password logs on, after its turn (got {st:#x} in {t:.2f} s)", False)

    for c in range(4):
        r = Raw(uuid.uuid4())
        for n in range(3):
            st, _, _ = attempt(r, f"nobody{c}x{n}", "guess")
            check(st == LOGON_FAILURE, f"unknown user nobody{c}x{n} is STATUS_LOGON_FAILURE (got {st:#x})", False)
        check(ended(r), f"connection #{c} of unknown users is ended after three", False)

    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
