"""A bound channel whose client reads slowly keeps its channel and gets
every answer (rksmbd multichannel, issue 14; smbprotocol plus raw SMB
3.0.2).

Usage: slow_channel.py HOST PORT SHARE USER PASSWORD

Connection A (smbprotocol, SMB 3.0.2) sets up session S1 and writes a
1 MiB file. Connection B (raw, same client GUID) binds S1 as a channel,
sends READS reads of the whole file (64 MiB of answers, four times the
channel's outbox bound) and reads them slowly, a few MiB a second: the
answers wait in the outbox past its bound, but the channel's writer keeps
making progress, so rksmbd holds the home back (back-pressure) instead of
ending the channel. Then:

1. B gets every answer, each STATUS_SUCCESS with the whole file.
2. B is still bound: an ECHO on it is answered.
3. A still serves: a CREATE+CLOSE.

Prints one line per step; exits non-zero on any failure.
"""

import socket
import struct
import time
import uuid

from raw_channel import ECHO, SUCCESS, check, cmac_sign, finish, flooding_channels, open_file

SIZE = 1 << 20
READS = 64
# B's reading pace: one answer, then this pause (about 6 MiB/s here).
PAUSE = 0.15


def main():
    a, s1, tree, big, chans = flooding_channels(uuid.uuid4(), 1, READS, b"y")
    sid = s1.session_id
    b, chan_key = chans[0]
    print(f"B sent {READS} READs of 1 MiB and reads them slowly", flush=True)

    # 1. Every answer comes, slowly read.
    b.s.settimeout(30)
    ok = 0
    started = time.monotonic()
    try:
        for _ in range(READS):
            r = b.recv()
            status = struct.unpack_from("<I", r, 8)[0]
            length = struct.unpack_from("<I", r, 64 + 4)[0] if status == SUCCESS else 0
            ok += status == SUCCESS and length == SIZE
            time.sleep(PAUSE)
    except (EOFError, ConnectionResetError, socket.timeout) as e:
        check(False, f"B got every answer (after {ok}: {e!r})")
    took = time.monotonic() - started
    check(ok == READS, f"B got {ok} of {READS} whole answers in {took:.1f}s")

    # 2. B is still bound.
    st, _ = b.call(cmac_sign(chan_key, b.header(ECHO, sid) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, "B's ECHO answered: the channel lives")

    # 3. The home still serves.
    open_file(tree, "a.txt").close()
    check(True, "A's CREATE+CLOSE answered")
    finish(a, s1, tree, big)


main()
