"""Peers cannot push others' logons out, and one user cannot take every
connection (rksmbd, issue 14; raw SMB 3.0.2).

Usage: logon_limits.py HOST PORT SHARE USER PASSWORD

0. AT_ONCE connections opened together from one address (rkbench sets
   up 32 so) each log on after all are open. A bound of 16 not logged on
   per address ended the first ones.
1. While a peer on 127.0.0.2 opens connections as fast as it can and
   never logs on, a client on 127.0.0.1 logs on slowly (PAUSE between
   its NEGOTIATE, SESSION_SETUP and TREE_CONNECT, as over a slow
   network), three times: each must get through. Before, rksmbd ended
   the oldest connection not logged on whatever its address, so the
   peer's connections ended the client's logon.
2. USER logs on over PER_USER connections (from two addresses: each has
   its own cap of 256); one more is STATUS_REQUEST_NOT_ACCEPTED at its
   SESSION_SETUP. Before, one user could take every connection.

Prints one line per step; exits non-zero on any failure.
"""

import socket
import threading
import time
import uuid

import raw_channel
from raw_channel import (
    HOST,
    PORT,
    SUCCESS,
    TREE_CONNECT,
    Raw,
    check,
    cmac_sign,
    logon,
    logon_legs,
    tree_connect_body,
)

PAUSE = 0.3
AT_ONCE = 40
PER_USER = 256
REQUEST_NOT_ACCEPTED = 0xC00000D0


def slow_logon():
    r = Raw(uuid.uuid4())
    time.sleep(PAUSE)
    sid, key = logon(r)
    time.sleep(PAUSE)
    st, _ = r.call(cmac_sign(key, r.header(TREE_CONNECT, sid) + tree_connect_body()))
    check(st == SUCCESS, "the slow client connected the share")
    return r


def flood(stop, opened):
    held = []
    while not stop.is_set():
        try:
            held.append(socket.create_connection((HOST, PORT), timeout=5, source_address=("127.0.0.2", 0)))
            opened[0] += 1
        except OSError:
            time.sleep(0.001)
        if len(held) > 2000:
            for s in held[:1000]:
                s.close()
            del held[:1000]
    for s in held:
        s.close()


def main():
    together = [Raw(uuid.uuid4()) for _ in range(AT_ONCE)]
    refused = [st for st in map(logon_status, together) if st != SUCCESS]
    check(not refused, f"{AT_ONCE} connections opened at once from one address all log on (refused: {refused})")
    for r in together:
        r.s.close()

    stop, opened = threading.Event(), [0]
    t = threading.Thread(target=flood, args=(stop, opened), daemon=True)
    t.start()
    while opened[0] < 200:
        time.sleep(0.01)
    for n in range(3):
        before = opened[0]
        try:
            slow_logon().s.close()
        except Exception as e:
            check(False, f"slow logon #{n} got through while 127.0.0.2 opened {opened[0] - before} connections ({e!r})")
        print(f"slow logon #{n} got through while 127.0.0.2 opened {opened[0] - before} connections", flush=True)
    stop.set()
    t.join()

    conns = []
    for i in range(PER_USER):
        r = Raw(uuid.uuid4(), "127.0.0.1" if i % 2 else "127.0.0.3")
        st = logon_status(r)
        if st != SUCCESS:
            check(False, f"logon #{i} of {raw_channel.USER} succeeded (got {st:#010x})")
        conns.append(r)
    print(f"{raw_channel.USER} is logged on over {PER_USER} connections", flush=True)
    st = logon_status(Raw(uuid.uuid4(), "127.0.0.4"))
    check(st == REQUEST_NOT_ACCEPTED, f"one more logon of the same user is STATUS_REQUEST_NOT_ACCEPTED (got {st:#010x})")
    conns.pop().s.close()
    deadline = time.monotonic() + 10
    while (st := logon_status(Raw(uuid.uuid4(), "127.0.0.4"))) != SUCCESS and time.monotonic() < deadline:
        time.sleep(0.05)
    check(st == SUCCESS, f"after one of them ends, the user logs on again (got {st:#010x})")
    for r in conns:
        r.s.close()
    print("PASS", flush=True)


def logon_status(raw):
    """The final status of a logon of USER on `raw` (-1: the connection
    ended)."""
    try:
        return logon_legs(raw)[0]
    except (OSError, EOFError):
        return -1


main()
