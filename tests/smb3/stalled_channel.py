"""A bound channel whose client stops reading does not stall its
session's home connection (rksmbd multichannel, issue 14; smbprotocol plus
raw SMB 3.0.2).

Usage: stalled_channel.py HOST PORT SHARE USER PASSWORD

Connection A (smbprotocol, SMB 3.0.2) sets up session S1 and writes a
1 MiB file. Connection B (raw, same client GUID) binds S1 as a channel
(see channel_confinement.py), sends READS reads of the whole file and
never reads its socket: its answers fill both socket buffers. Then:

1. A's CREATE+CLOSEs, one after another, are each answered within a few
   seconds (the home thread answers B's requests but never writes to B's
   socket itself; past the channel's outbox bound it waits at most 5 s
   for B's writer) until rksmbd ends B (its writer made no progress):
   rksmbd's end of B's connection leaves ESTABLISHED (/proc/net/tcp),
   within 40 s.
2. Read now, B's socket gives less than every answer, then EOF or a
   reset.
3. A still serves: another CREATE+CLOSE, a READ of the file.

Prints one line per step; exits non-zero on any failure.
"""

import socket
import struct
import threading
import time
import uuid


from raw_channel import PORT, Raw, bind, check, cmac_sign, open_file, session

READ = 8
SIZE = 1 << 20
# 64 MiB of answers: well past the outbox bound (16 MiB) plus what the
# socket buffers of both ends take.
READS = 64
# How long A's requests may take while B is stalled.
PROMPT = 10


def server_side_established(port):
    """Whether rksmbd's end of the connection from local port `port` is
    still ESTABLISHED (/proc/net/tcp{,6}: state 01)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if int(local.rsplit(":", 1)[1], 16) == PORT and int(remote.rsplit(":", 1)[1], 16) == port:
                    return state == "01"
    return False


def within(seconds, fn):
    """Whether `fn` returns within `seconds` (it runs on a thread that is
    left behind when it does not)."""
    done = threading.Event()

    def run():
        fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def main():
    guid = uuid.uuid4()
    a, s1, tree = session(guid)
    sid, tid = s1.session_id, tree.tree_connect_id
    big = open_file(tree, "big.bin")
    big.write(b"z" * SIZE, 0)

    b = Raw(guid)
    chan_key = bind(b, sid, s1.signing_key)
    b.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    body = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, SIZE, 0, big.file_id, 0, 0, 0, 0, 0) + b"\0"
    for _ in range(READS):
        b.send(cmac_sign(chan_key, b.header(READ, sid, tid=tid) + body))
    print(f"B sent {READS} READs of 1 MiB and reads nothing", flush=True)

    # 1. The home serves while B is stalled, until rksmbd ends B (its
    # end of B's connection leaves ESTABLISHED). The answers B does not
    # read pile up at rksmbd as fast as it makes them: the home would be
    # stuck once they fill the socket buffers.
    b_port = b.s.getsockname()[1]
    deadline = time.monotonic() + 40
    n, slowest = 0, 0.0
    while server_side_established(b_port):
        if time.monotonic() >= deadline:
            check(False, "rksmbd ends B within 40 s")
        started = time.monotonic()
        if not within(PROMPT, lambda: open_file(tree, "a.txt").close()):
            check(False, f"A's CREATE+CLOSE #{n} answered within {PROMPT}s while B is stalled")
        slowest = max(slowest, time.monotonic() - started)
        n += 1
        time.sleep(0.05)  # the polling interval
    check(n > 0, f"A's {n} CREATE+CLOSEs answered while B was stalled (slowest {slowest:.2f}s)")

    # 2. B is ended: reading it now gives less than every answer, then
    # EOF or a reset.
    b.s.settimeout(PROMPT)
    got, ended = 0, False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = b.s.recv(1 << 20)
        except ConnectionResetError:
            ended = True
            break
        except socket.timeout:
            break
        if not chunk:
            ended = True
            break
        got += len(chunk)
    check(ended, f"rksmbd ended B ({got} bytes of {READS * SIZE} read before its end)")
    check(got < READS * SIZE, "B got less than every answer")

    # 3. The home still serves.
    ok = within(PROMPT, lambda: open_file(tree, "a2.txt").close())
    check(ok, "A's CREATE+CLOSE answered after B is gone")
    data = big.read(0, 4096)
    check(data == b"z" * 4096, "A reads the file")
    big.close()
    tree.disconnect()
    s1.disconnect()
    a.disconnect()
    print("PASS", flush=True)


main()
