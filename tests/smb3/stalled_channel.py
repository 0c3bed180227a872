"""Bound channels whose client stops reading do not stall their
session's home connection (rksmbd multichannel, issue 14; smbprotocol plus
raw SMB 3.0.2).

Usage: stalled_channel.py HOST PORT SHARE USER PASSWORD

Connection A (smbprotocol, SMB 3.0.2) sets up session S1 and writes a
1 MiB file. CHANNELS raw connections B (same client GUID) each bind S1
as a channel (see channel_confinement.py), send READS reads of the whole
file and never read their sockets: their answers fill both socket
buffers and the channels' outboxes. Then:

1. A's CREATE+CLOSEs, one after another, are each answered within a few
   seconds (the home thread answers the channels' requests but never
   writes to their sockets, and never waits for them: a channel whose
   outbox is full forwards nothing more) until rksmbd ends every B (its
   writer made no progress for 5 s): rksmbd's end of each B's connection
   leaves ESTABLISHED (/proc/net/tcp), within 40 s. With several channels
   stalled at once, a home that waited for each in turn would miss the
   few seconds (the adversarial review had 99 s with 31 channels).
2. Read now, each B's socket gives less than every answer, then EOF or a
   reset.
3. A still serves: another CREATE+CLOSE, a READ of the file.

Prints one line per step; exits non-zero on any failure.
"""

import socket
import threading
import time
import uuid


from raw_channel import check, finish, flooding_channels, open_file, server_side_established

SIZE = 1 << 20
# 64 MiB of answers: well past the outbox bound (16 MiB) plus what the
# socket buffers of both ends take.
READS = 64
# Channels stalled at once.
CHANNELS = 4
# How long A's requests may take while B is stalled.
PROMPT = 10


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
    a, s1, tree, big, chans = flooding_channels(uuid.uuid4(), CHANNELS, READS, b"z")
    print(f"{CHANNELS} channels sent {READS} READs of 1 MiB each and read nothing", flush=True)

    # 1. The home serves while the channels are stalled, until rksmbd ends
    # them (its end of each channel's connection leaves ESTABLISHED).
    ports = [b.s.getsockname()[1] for b, _ in chans]
    deadline = time.monotonic() + 40
    n, slowest = 0, 0.0
    while any(server_side_established(p) for p in ports):
        if time.monotonic() >= deadline:
            check(False, "rksmbd ends every stalled channel within 40 s")
        started = time.monotonic()
        if not within(PROMPT, lambda: open_file(tree, "a.txt").close()):
            check(False, f"A's CREATE+CLOSE #{n} answered within {PROMPT}s while the channels are stalled")
        slowest = max(slowest, time.monotonic() - started)
        n += 1
        time.sleep(0.05)  # the polling interval
    check(n > 0, f"A's {n} CREATE+CLOSEs answered while the channels were stalled (slowest {slowest:.2f}s)")

    # 2. Each channel is ended: reading it now gives less than every
    # answer, then EOF or a reset.
    for i, (b, _) in enumerate(chans):
        b.s.settimeout(PROMPT)
        got, ended = 0, False
        until = time.monotonic() + 10
        while time.monotonic() < until:
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
        check(ended, f"rksmbd ended channel {i} ({got} bytes of {READS * SIZE} read before its end)")
        check(got < READS * SIZE, f"channel {i} got less than every answer")

    # 3. The home still serves.
    ok = within(PROMPT, lambda: open_file(tree, "a2.txt").close())
    check(ok, "A's CREATE+CLOSE answered after B is gone")
    data = big.read(0, 4096)
    check(data == b"z" * 4096, "A reads the file")
    finish(a, s1, tree, big)


main()
