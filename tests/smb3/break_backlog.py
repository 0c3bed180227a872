"""Lease breaks to a client that does not read cost rksmbd one writer
thread for that connection, not one per break (review B-2: 4,023
threads for 4,000 breaks), and other clients go on being served.

Usage: break_backlog.py HOST PORT SHARE USER PASSWORD RKSMBD_PID N

A (a small receive buffer) opens N files, each under an RWH lease of its
own, asks for 1 MiB READs it never reads, so its connection's writer
blocks. B opens the N files for reading on connections of its own: each
open breaks one of A's leases. rksmbd's thread count is sampled for a
few seconds; then A goes away, B's opens finish, and a fresh connection
is served. Prints PASS.
"""

import struct
import sys
import threading
import time
import uuid

from raw_channel import CREATE, ECHO, READ, SignedClient, check, lease_ctx
from raw_channel import create_with as create

WRITE = 9
PID, N = int(sys.argv[6]), int(sys.argv[7])


def threads():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def main():
    a = SignedClient(rcvbuf=16 * 1024)
    st, r = a.call(CREATE, create("big.bin"))
    check(st == 0, f"big.bin made ({st:#x})")
    big = r[128:144]
    data = b"x" * (1 << 20)
    body = struct.pack("<HHIQ16sIIIHHI", 49, 64 + 48, len(data), 0, big, 0, 0, 0, 0, 0, 0) + data
    st, _ = a.call(WRITE, body, charge=16)
    check(st == 0, f"1 MiB written ({st:#x})")
    for start in range(0, N, 100):
        count = min(100, N - start)
        for i in range(start, start + count):
            a.send(CREATE, create(f"leased{i}", oplock=0xFF, ctxs=lease_ctx(uuid.uuid4().bytes)))
        for _ in range(count):
            st, _ = a.recv()
            check(st == 0, f"a leased open ({st:#x})")
    base = threads()
    for _ in range(16):
        a.send(READ, struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, 1 << 20, 0, big, 0, 0, 0, 0, 0) + b"\0", charge=16)
    done = []

    def opens(lo, hi):
        b = SignedClient()
        for i in range(lo, hi):
            b.send(CREATE, create(f"leased{i}", access=0x80000000, disposition=1))
        got = 0
        try:
            while got < hi - lo:
                st, r = b.recv()
                if st != 0x103 and struct.unpack_from("<H", r, 12)[0] == CREATE:
                    got += 1
        except Exception as e:
            print(f"B's connection: {e}")
        done.append(got)

    bs = [threading.Thread(target=opens, args=(lo, min(N, lo + 200)), daemon=True) for lo in range(0, N, 200)]
    for t in bs:
        t.start()
    peak = base
    until = time.monotonic() + 5
    while time.monotonic() < until:
        peak = max(peak, threads())
        time.sleep(0.1)
    print(f"rksmbd threads: {base} before the breaks, at most {peak} while {N} were waiting")
    check(peak - base < 64, f"rksmbd's threads stay bounded ({base} -> {peak} for {N} breaks)")
    a.raw.s.close()
    for t in bs:
        t.join(60)
    check(sum(done) == N, f"every one of B's opens answered once A went away ({sum(done)} of {N})")
    c = SignedClient()
    st, _ = c.call(ECHO, struct.pack("<HH", 4, 0))
    check(st == 0, "a fresh connection is served")
    print("PASS")


if __name__ == "__main__":
    main()
