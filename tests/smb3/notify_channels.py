"""Busy channels do not hold back their home's CHANGE_NOTIFY answer
(rksmbd multichannel, issue 14; raw SMB 3.0.2).

Usage: notify_channels.py HOST PORT SHARE USER PASSWORD ROOT

Connection H sets up session S, writes a 256 KiB file and has a
CHANGE_NOTIFY waiting on directory nd. CHANNELS raw connections bind S
and each keep READS READs of the file in flight, so the home's queue of
forwarded PDUs never empties. A local process then makes a file in nd
(ROOT is the export's directory on the host): the notification must
reach H within PROMPT seconds (before, a ready queue always went before
the notification, which waited until the channels stopped).

Prints one line per step; exits non-zero on any failure.
"""

import os
import struct
import sys
import threading
import time
import uuid

from raw_channel import (
    CREATE,
    READ,
    SUCCESS,
    Raw,
    bind,
    charge_for,
    check,
    cmac_sign,
    connect_share,
    create_body,
)

ROOT = sys.argv[6]
WRITE, CHANGE_NOTIFY, PENDING = 9, 0xF, 0x103
SIZE = 256 * 1024
CHANNELS = 4
READS = 32
PROMPT = 10


def main():
    guid = uuid.uuid4()
    h = Raw(guid)
    sid, key, tid = connect_share(h)
    st, r = h.call(cmac_sign(key, h.header(CREATE, sid, tid=tid) + create_body("big.bin")))
    check(st == SUCCESS, "H opened big.bin")
    fid = r[128:144]
    wr = struct.pack("<HHIQ16sIIHHI", 49, 112, SIZE, 0, fid, 0, 0, 0, 0, 0) + b"q" * SIZE
    st, _ = h.call(cmac_sign(key, h.header(WRITE, sid, tid=tid, charge=charge_for(SIZE)) + wr))
    check(st == SUCCESS, "H wrote 256 KiB")
    body = create_body("nd", access=0x1, attributes=0x10, disposition=3, options=0x1)
    st, r = h.call(cmac_sign(key, h.header(CREATE, sid, tid=tid) + body))
    check(st == SUCCESS, "H opened directory nd")
    did = r[128:144]
    chans = []
    for _ in range(CHANNELS):
        c = Raw(guid)
        chans.append((c, bind(c, sid, key)))

    got = {}

    def home_receive():
        h.s.settimeout(None)
        while True:
            try:
                r = h.recv()
            except Exception:
                return
            cmd, st = struct.unpack_from("<H", r, 12)[0], struct.unpack_from("<I", r, 8)[0]
            if cmd == CHANGE_NOTIFY and st != PENDING:
                got["at"], got["status"] = time.monotonic(), st

    threading.Thread(target=home_receive, daemon=True).start()
    # FILE_NOTIFY_CHANGE_FILE_NAME | DIR_NAME
    h.send(cmac_sign(key, h.header(CHANGE_NOTIFY, sid, tid=tid) + struct.pack("<HHI16sII", 32, 0, 4096, did, 3, 0)))

    stop = threading.Event()
    served = [0]
    read = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, SIZE, 0, fid, 0, 0, 0, 0, 0) + b"\0"

    def busy(c, ckey):
        c.s.settimeout(None)
        try:
            for _ in range(READS):
                c.send(cmac_sign(ckey, c.header(READ, sid, tid=tid, charge=charge_for(SIZE)) + read))
            while not stop.is_set():
                c.recv()
                served[0] += 1
                c.send(cmac_sign(ckey, c.header(READ, sid, tid=tid, charge=charge_for(SIZE)) + read))
        except Exception:
            pass

    for c, ckey in chans:
        threading.Thread(target=busy, args=(c, ckey), daemon=True).start()
    while served[0] < CHANNELS * READS:
        time.sleep(0.01)
    print(f"{CHANNELS} channels each keep {READS} READs of 256 KiB in flight", flush=True)

    made = time.monotonic()
    before = served[0]
    open(os.path.join(ROOT, "nd", "new.txt"), "w").close()
    while "at" not in got and time.monotonic() - made < PROMPT:
        time.sleep(0.01)
    check(
        "at" in got,
        f"H's CHANGE_NOTIFY answered within {PROMPT}s while the channels stay busy "
        f"(channel READs served meanwhile: {served[0] - before})",
    )
    check(got["status"] in (SUCCESS, 0x10C), f"it reports the change (status {got['status']:#x})")
    print(f"answered after {got['at'] - made:.3f}s; channel READs served meanwhile: {served[0] - before}", flush=True)
    stop.set()
    print("PASS", flush=True)
    os._exit(0)


main()
