"""A logon leg held for its turn and dropped unchecked gives its turn
back (rksmbd run with `--logon-queue 1`; raw SMB 3.0.2). Re-review: a
held leg took its turn when it was held; its connection closed, the turn
was gone with no password checked, so a client behind the same address
could push the real user's turns out with attempts it never let be
checked.

Usage: logon_given_back.py HOST PORT SHARE USER PASSWORD

1. Two wrong passwords of USER: its next turn is 1 s after the second.
2. On a new connection a wrong password is sent (held for that turn),
   and the connection closed at once; rksmbd's end is seen closed.
3. The right password on another connection logs on: it takes the turn
   given back, 1 s off at most. Without it the next turn is 2 s off,
   past the queue bound: refused unchecked.

Prints one line per step; exits non-zero on any failure.
"""

import time
import uuid

from raw_channel import FAILURES, MORE_PROCESSING, PASSWORD, PORT, SUCCESS, USER, Raw, auth_leg, check

LOGON_FAILURE = 0xC000006D


def attempt(raw, password):
    """A logon of USER with `password` on `raw`: its final status."""
    st, _, pdu = auth_leg(raw, USER, password)
    if st != MORE_PROCESSING:
        return st
    return raw.call(pdu)[0]


def server_end_open(port):
    """Whether rksmbd still holds its end of the connection from local
    port `port` open (ESTABLISHED or CLOSE_WAIT in /proc/net/tcp{,6})."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, remote, state = line.split()[1:4]
                if int(local.rsplit(":", 1)[1], 16) == PORT and int(remote.rsplit(":", 1)[1], 16) == port:
                    if state in ("01", "08"):
                        return True
    return False


def main():
    r = Raw(uuid.uuid4())
    for n in range(2):
        st = attempt(r, "wrong")
        check(st == LOGON_FAILURE, f"wrong password #{n + 1} is STATUS_LOGON_FAILURE (got {st:#x})", False)

    x = Raw(uuid.uuid4())
    st, _, pdu = auth_leg(x, USER, "wrong")
    check(st == MORE_PROCESSING, f"the dropped attempt gets its challenge (got {st:#x})")
    x.send(pdu)
    port = x.s.getsockname()[1]
    x.s.close()
    deadline = time.monotonic() + 10
    while server_end_open(port) and time.monotonic() < deadline:
        time.sleep(0.01)
    check(not server_end_open(port), "rksmbd closed its end of the dropped attempt's connection")

    st = attempt(Raw(uuid.uuid4()), PASSWORD)
    check(st == SUCCESS, f"the right password takes the turn given back and logs on (got {st:#x})", False)

    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
