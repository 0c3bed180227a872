"""rkbench's real SMB 3 client: smbprotocol against rksmbd or Samba's smbd.

Usage: smb3_bench.py HOST PORT SHARE USER PASSWORD SECONDS CONNS...

Sets up max(CONNS) connections (SMB 3.1.1 as negotiated, signed), each
with its own session, tree and file bench-N.bin (64 KiB, opened for read
and write); then, for each of CREATE+CLOSE, READ 64 KiB and WRITE 64 KiB
and each count in CONNS, runs that many connections' threads for SECONDS
(after a short untimed warm-up) and prints one JSON line:
{"op": ..., "conns": N, "ops": ..., "wall_s": ..., "mean_us": ..., "p99_us": ...}
A CREATE+CLOSE pair counts as one op (an open_if of the connection's own
file, no contexts). The client is Python: at high rates it, not the
server, may be what is measured; the same client runs against both.
"""

import json
import sys
import threading
import time
import uuid

from smbprotocol.connection import Connection
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
SECONDS = float(sys.argv[6])
CONNS = [int(c) for c in sys.argv[7:]]
BLOCK = 64 * 1024
WARM_UP = 5
RW = FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE
SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


def open_file(tree, name):
    f = Open(tree, name)
    f.create(
        ImpersonationLevel.Impersonation,
        RW,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        SHARE_ALL,
        CreateDisposition.FILE_OPEN_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
    )
    return f


class Client:
    def __init__(self, i):
        self.conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=True)
        self.conn.connect()
        self.session = Session(self.conn, USER, PASSWORD, require_encryption=False)
        self.session.connect()
        self.tree = TreeConnect(self.session, rf"\\{HOST}\{SHARE}")
        self.tree.connect()
        self.name = f"bench-{i}.bin"
        self.file = open_file(self.tree, self.name)
        self.file.write(b"\x5a" * BLOCK, 0)

    def op(self, kind):
        if kind == "create_close":
            open_file(self.tree, self.name).close()
        elif kind == "read":
            if len(self.file.read(0, BLOCK)) != BLOCK:
                raise RuntimeError("short read")
        else:
            self.file.write(b"\xa5" * BLOCK, 0)


def measure(clients, kind):
    samples = [[] for _ in clients]
    counts = [0] * len(clients)
    errors = []
    # Everyone warmed up (ready), then the deadline is set, then go.
    ready = threading.Barrier(len(clients) + 1)
    go = threading.Barrier(len(clients) + 1)
    deadline = [0.0]

    def run(k):
        c = clients[k]
        try:
            for _ in range(WARM_UP):
                c.op(kind)
            ready.wait()
            go.wait()
            own = samples[k]
            while True:
                t0 = time.perf_counter_ns()
                if t0 / 1e9 >= deadline[0]:
                    break
                c.op(kind)
                own.append(time.perf_counter_ns() - t0)
            counts[k] = len(own)
        except Exception as e:  # reported below, fails the run
            errors.append(repr(e))
            ready.abort()
            go.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(clients))]
    for t in threads:
        t.start()
    try:
        ready.wait()
        deadline[0] = time.perf_counter_ns() / 1e9 + SECONDS
        go.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{kind} at {len(clients)} connections failed: {errors[0]}")
    ns = sorted(s for own in samples for s in own)
    mean = sum(ns) / len(ns) / 1e3 if ns else 0.0
    p99 = ns[(len(ns) - 1) * 99 // 100] / 1e3 if ns else 0.0
    return {"op": kind, "conns": len(clients), "ops": sum(counts), "wall_s": wall, "mean_us": mean, "p99_us": p99}


def connect_all(n):
    """n clients, set up in parallel (each NTLM session setup waits on the
    server and on its own crypto)."""
    made = [None] * n
    errors = []

    def make(i):
        try:
            made[i] = Client(i)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=make, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"setting up {n} connections failed: {errors[0]}")
    return made


clients = connect_all(max(CONNS))
for kind in ("create_close", "read", "write"):
    for n in CONNS:
        print(json.dumps(measure(clients[:n], kind)), flush=True)
for c in clients:
    c.file.close()
    c.conn.disconnect()
