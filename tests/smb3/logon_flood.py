"""A flood of refused logons does not lock the right password out once
it stops (rksmbd run with `--logon-queue 1`; raw SMB 3.0.2). Review: a
logon refused unchecked (its turn more than the queue bound ahead) still
counted as a failure and pushed the next turn on, so one device behind a
shared address (a NAT) retrying a stale password kept the real user's
right password refused for as long as anybody retried.

Usage: logon_flood.py HOST PORT SHARE USER PASSWORD

1. Wrong passwords of USER, one after another for 4 s, most refused
   unchecked (their turns too far off).
2. Then the right password, tried every 0.3 s as a client retrying
   would, logs on within 15 s.

Prints one line per step; exits non-zero on any failure.
"""

import time
import uuid

from raw_channel import FAILURES, MORE_PROCESSING, PASSWORD, SUCCESS, USER, Raw, auth_leg, check

LOGON_FAILURE = 0xC000006D


def attempt(password):
    """One logon of USER with `password` on a new connection: its final
    status."""
    r = Raw(uuid.uuid4())
    try:
        st, _, pdu = auth_leg(r, USER, password)
        if st == MORE_PROCESSING:
            st = r.call(pdu)[0]
        return st
    except (OSError, EOFError):
        return -1
    finally:
        r.s.close()


def main():
    flood_until = time.monotonic() + 4
    statuses = set()
    n = 0
    while time.monotonic() < flood_until:
        statuses.add(attempt(f"stale{n}"))
        n += 1
    check(statuses == {LOGON_FAILURE}, f"{n} wrong passwords are each STATUS_LOGON_FAILURE (got {statuses})")

    start = time.monotonic()
    tries = 0
    while True:
        tries += 1
        st = attempt(PASSWORD)
        took = time.monotonic() - start
        if st == SUCCESS or took > 15:
            break
        time.sleep(0.3)
    check(st == SUCCESS, f"after the flood the right password logs on (try {tries}, {took:.1f} s; got {st:#x})")

    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
