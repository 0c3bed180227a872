"""A client that keeps its session's home socket full does not hold back
what the session's channels send (rksmbd multichannel, issue 14; raw SMB
3.0.2).

Usage: home_flood.py HOST PORT SHARE USER PASSWORD

Connection H sets up session S and opens a file; connection C binds S as
a channel. H then sends ECHOs as fast as its credits let it (and reads
their answers, so rksmbd never waits to write), keeping its socket
readable the whole time. Meanwhile C's READs, which its home H answers, must each be
answered within PROMPT seconds (before, the home always read its own
socket first and served the channel only once that socket was empty,
which under the flood it never was). Then the flood stops and C is still
served.

Prints one line per step; exits non-zero on any failure.
"""

import struct
import threading
import time
import uuid

from raw_channel import CREATE, ECHO, READ, Raw, bind, check, cmac_sign, connect_share, create_body

PROMPT = 10
PROBES = 5
BATCH = 256
# ECHOs sent and not yet answered at most: well inside rksmbd's 8,192
# credits (a request past the credits granted ends the connection).
IN_FLIGHT = 4096


def main():
    guid = uuid.uuid4()
    h = Raw(guid)
    sid, key, tid = connect_share(h)
    st, r = h.call(cmac_sign(key, h.header(CREATE, sid, tid=tid) + create_body("flood.txt")))
    check(st == 0, "H opened flood.txt")
    fid = r[64 + 64 : 64 + 80]
    c = Raw(guid)
    ckey = bind(c, sid, key)
    c.s.settimeout(PROMPT)
    h.s.settimeout(60)

    stop = threading.Event()
    sent, got, bad = [0], [0], []

    def flood():
        echo = struct.pack("<HH", 4, 0)
        try:
            while not stop.is_set():
                # Within the credits granted, as a client must (each answer,
                # 72 bytes framed, grants what the next ECHO spends and more).
                if sent[0] - got[0] // 72 > IN_FLIGHT:
                    time.sleep(0.001)
                    continue
                h.s.sendall(b"".join(struct.pack(">I", 68) + h.header(ECHO, 0) + echo for _ in range(BATCH)))
                sent[0] += BATCH
        except Exception as e:
            bad.append(f"flood send: {e!r}")

    def drain():
        try:
            while not stop.is_set():
                b = h.s.recv(1 << 20)
                if not b:
                    bad.append("H closed by rksmbd")
                    return
                got[0] += len(b)
        except Exception as e:
            if not stop.is_set():
                bad.append(f"flood receive: {e!r}")

    threads = [threading.Thread(target=f, daemon=True) for f in (flood, drain)]
    for t in threads:
        t.start()
    while got[0] < 1 << 20 and not bad:
        time.sleep(0.01)
    check(not bad, f"H's ECHO flood answered ({bad})")
    print(f"H floods its own socket with ECHOs ({sent[0]} sent so far)", flush=True)

    read = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, 16, 0, fid, 0, 0, 0, 0, 0) + b"\0"
    slowest = 0.0
    for n in range(PROBES):
        started = time.monotonic()
        try:
            c.send(cmac_sign(ckey, c.header(READ, sid, tid=tid) + read))
            c.recv()
        except Exception as e:
            check(False, f"C's READ #{n} answered within {PROMPT}s during the flood ({e!r}; H's ECHOs sent: {sent[0]})")
        slowest = max(slowest, time.monotonic() - started)
    flooding = not bad and not stop.is_set()
    check(flooding, f"C's {PROBES} READs answered during the flood (slowest {slowest:.3f}s) ({bad})")

    stop.set()
    h.s.close()
    for t in threads:
        t.join(30)
    c.send(cmac_sign(ckey, c.header(READ, sid, tid=tid) + read))
    c.recv()
    check(True, "C's READ answered after the flood")
    c.s.close()
    print("PASS", flush=True)


main()
