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

import socket
import struct
import sys
import threading
import time
import uuid

from raw_channel import CLOSE, CREATE, ECHO, READ, Raw, check, cmac_sign, connect_share

WRITE = 9
PID, N = int(sys.argv[6]), int(sys.argv[7])


def lease_ctx(key, state=7):
    data = key + struct.pack("<IIQ", state, 0, 0) + b"\0" * 16 + struct.pack("<HH", 0, 0)
    return struct.pack("<IHHHHI", 0, 16, 4, 0, 24, len(data)) + b"RqLs" + b"\0" * 4 + data


def create(name, access=0xC0000000, disposition=5, oplock=0, ctxs=b""):
    n = name.encode("utf-16-le")
    name_off = 64 + 56
    ctx_off = (name_off + len(n) + 7) // 8 * 8 if ctxs else 0
    fixed = struct.pack("<HBBIQQIIIIIHHII", 57, 0, oplock, 2, 0, 0, access, 0x80, 7,
                        disposition, 0x40, name_off, len(n), ctx_off, len(ctxs))
    pad = b"\0" * (ctx_off - name_off - len(n)) if ctxs else b""
    return fixed + n + pad + ctxs


class Client:
    def __init__(self, rcvbuf=None):
        self.raw = Raw(uuid.uuid4())
        if rcvbuf:
            self.raw.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sid, self.key, self.tid = connect_share(self.raw)

    def send(self, cmd, body, charge=1):
        m = self.raw.header(cmd, self.sid, tid=self.tid, charge=charge) + body
        self.raw.send(cmac_sign(self.key, m))

    def recv(self):
        r = self.raw.recv()
        return struct.unpack_from("<I", r, 8)[0], r

    def call(self, cmd, body, charge=1):
        self.send(cmd, body, charge)
        while True:
            st, r = self.recv()
            if st != 0x103 and struct.unpack_from("<Q", r, 24)[0] != 2**64 - 1:
                return st, r


def threads():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def main():
    a = Client(rcvbuf=16 * 1024)
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
        b = Client()
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
    c = Client()
    st, _ = c.call(ECHO, struct.pack("<HH", 4, 0))
    check(st == 0, "a fresh connection is served")
    print("PASS")


if __name__ == "__main__":
    main()
