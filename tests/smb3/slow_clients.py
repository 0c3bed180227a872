"""Connections that never log on do not lock other clients out (rksmbd,
issue 14; smbprotocol).

Usage: slow_clients.py HOST PORT SHARE USER PASSWORD

STALLED connections each send the NetBIOS header of a 1000-byte PDU and
64 bytes of it, then nothing. Then a client connects, logs on and opens
a file: it must be served. Before, every connection counted alike
towards rksmbd's caps (256 per peer address), so the stalled ones held
every slot for as long as they liked and the client was refused.

Prints one line per step; exits non-zero on any failure.
"""

import socket
import struct
import uuid

from raw_channel import HOST, PORT, check, open_file, session

STALLED = 300


def main():
    stalled = []
    for _ in range(STALLED):
        try:
            s = socket.create_connection((HOST, PORT), timeout=10)
            s.sendall(struct.pack(">I", 1000) + b"\xfeSMB" + b"\0" * 60)
            stalled.append(s)
        except OSError:
            pass
    print(f"{len(stalled)} connections sent half a frame and stalled", flush=True)
    try:
        conn, s1, tree = session(uuid.uuid4())
        open_file(tree, "served.txt").close()
    except Exception as e:
        check(False, f"a client logs on and opens a file meanwhile ({e!r})")
    check(True, "a client logs on and opens a file meanwhile")
    tree.disconnect()
    s1.disconnect()
    conn.disconnect()
    for s in stalled:
        s.close()
    print("PASS", flush=True)


main()
