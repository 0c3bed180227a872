"""Connections that never log on do not lock other clients out (rksmbd,
issue 14; raw SMB 3.0.2).

Usage: slow_clients.py HOST PORT SHARE USER PASSWORD

STALLED connections, spread over 127.0.0.2–5, each send the NetBIOS
header of a 1000-byte PDU and 64 bytes of it, then nothing: as many as
rksmbd's caps hold (1,024 in all, 256 per address). Then a client on
127.0.0.1 connects (again if refused, for up to PROMPT seconds), logs on
and opens a file: it must be served. Before, every connection counted
alike towards the caps, so the stalled ones held every slot for as long
as they liked and the client was refused.

Prints one line per step; exits non-zero on any failure.
"""

import resource
import socket
import struct
import time
import uuid

from raw_channel import (
    CLOSE,
    CREATE,
    HOST,
    PORT,
    SUCCESS,
    Raw,
    check,
    cmac_sign,
    connect_share,
    create_body,
)

STALLED = 1024
PROMPT = 15


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = STALLED + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    stalled = []
    for i in range(STALLED):
        try:
            s = socket.create_connection((HOST, PORT), timeout=10, source_address=(f"127.0.0.{2 + i % 4}", 0))
            s.sendall(struct.pack(">I", 1000) + b"\xfeSMB" + b"\0" * 60)
            stalled.append(s)
        except OSError:
            pass
    print(f"{len(stalled)} connections sent half a frame and stalled", flush=True)
    deadline = time.monotonic() + PROMPT
    tries = 0
    while True:
        tries += 1
        try:
            r = Raw(uuid.uuid4(), "127.0.0.1")
            sid, key, tid = connect_share(r)
            st, x = r.call(cmac_sign(key, r.header(CREATE, sid, tid=tid) + create_body("served.txt")))
            check(st == SUCCESS, f"the client opened served.txt (got {st:#010x})")
            fid = x[128:144]
            st, _ = r.call(cmac_sign(key, r.header(CLOSE, sid, tid=tid) + struct.pack("<HHI16s", 24, 0, 0, fid)))
            check(st == SUCCESS, f"the client closed it (got {st:#010x})")
            r.s.close()
            break
        except (OSError, EOFError) as e:
            if time.monotonic() > deadline:
                check(False, f"a client logs on and opens a file within {PROMPT}s ({tries} tries; {e!r})")
            time.sleep(0.2)
    check(True, f"a client logs on and opens a file meanwhile ({tries} tries)")
    for s in stalled:
        s.close()
    print("PASS", flush=True)


main()
