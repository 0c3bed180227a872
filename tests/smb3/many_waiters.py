"""Many blocking LOCKs waiting on one connection (rksmbd), driven line by
line: the test counts what their retries cost filterd meanwhile.

Usage: many_waiters.py HOST PORT SHARE USER PASSWORD

Reads commands from stdin, one a line:
  wait N     client H (raw, its own connection) opens f and locks bytes
             0..10*N exclusive; client W (raw, another connection) opens
             f and sends N blocking LOCKs of 10 bytes each inside that
             range, each answered STATUS_PENDING -> "waiting N"
  release    H unlocks its range; W's N LOCKs each get their final
             response, STATUS_SUCCESS, within 3 s -> "granted N", then
             "PASS" and exit
Any failure prints "FAILED: ..." and exits non-zero.
"""

import socket
import struct
import sys
import time

from raw_channel import CREATE, SUCCESS, SignedClient, check, create_body

LOCK = 0xA
EXCLUSIVE, UNLOCK, FAIL_IMMEDIATELY = 2, 4, 0x10
PENDING, FLAG_ASYNC = 0x103, 0x2


def open_f(c):
    st, r = c.call(CREATE, create_body("f"))
    check(st == SUCCESS, f"f opened (got {st:#010x})")
    return r[64 + 64 : 64 + 80]


def lock_body(fid, offset, length, flags):
    return struct.pack("<HHI16sQQII", 48, 1, 0, fid, offset, length, flags, 0)


holder = waiter = None
n = 0
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    if words[0] == "wait":
        n = int(words[1])
        holder, waiter = SignedClient(), SignedClient()
        hf, wf = open_f(holder), open_f(waiter)
        st, _ = holder.call(LOCK, lock_body(hf, 0, 10 * n, EXCLUSIVE | FAIL_IMMEDIATELY))
        check(st == SUCCESS, f"H locked 0..{10 * n} (got {st:#010x})")
        for i in range(n):
            waiter.send(LOCK, lock_body(wf, 10 * i, 10, EXCLUSIVE))
        statuses = [waiter.recv()[0] for _ in range(n)]
        check(statuses == [PENDING] * n, f"W's {n} blocking LOCKs pend")
        print(f"waiting {n}", flush=True)
    elif words[0] == "release":
        st, _ = holder.call(LOCK, lock_body(hf, 0, 10 * n, UNLOCK))
        check(st == SUCCESS, f"H unlocked (got {st:#010x})")
        deadline = time.monotonic() + 3
        finals = []
        try:
            while len(finals) < n:
                waiter.raw.s.settimeout(max(deadline - time.monotonic(), 0.01))
                st, r = waiter.recv()
                finals.append((st, struct.unpack_from("<I", r, 16)[0] & FLAG_ASYNC))
        except (socket.timeout, EOFError):
            pass
        check(finals == [(SUCCESS, FLAG_ASYNC)] * n, f"W's {n} LOCKs granted within 3 s ({len(finals)} answered)")
        print(f"granted {n}", flush=True)
        print("PASS", flush=True)
        break
