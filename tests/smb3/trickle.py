"""A frame trickled a byte at a time is not waited for past 30 s (rksmbd,
issue 14; raw TCP).

Usage: trickle.py HOST PORT SHARE USER PASSWORD

Sends the NetBIOS header of a 100-byte PDU, then one byte of it every
EVERY seconds. rksmbd must close the connection within LIMIT seconds of
the first byte (a frame must arrive whole within 30 s). Before, the read
timeout restarted with every byte, so a frame trickled forever held its
connection forever.

Prints one line per step; exits non-zero on any failure.
"""

import select
import socket
import struct
import time

from raw_channel import HOST, PORT, check

EVERY = 4
LIMIT = 45


def main():
    s = socket.create_connection((HOST, PORT), timeout=10)
    started = time.monotonic()
    s.sendall(struct.pack(">I", 100))
    closed = False
    while not closed and time.monotonic() - started < LIMIT:
        try:
            s.sendall(b"\0")
        except OSError:
            closed = True
            break
        ready, _, _ = select.select([s], [], [], EVERY)
        if ready:
            try:
                closed = s.recv(1) == b""
            except OSError:
                closed = True
    took = time.monotonic() - started
    check(closed, f"rksmbd closed the trickled frame's connection within {LIMIT}s (after {took:.1f}s)")
    print("PASS", flush=True)


main()
