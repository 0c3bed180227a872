"""A full-size WRITE sent slowly but steadily is served (rksmbd, issue
14; raw SMB 3.0.2).

Usage: slow_write.py HOST PORT SHARE USER PASSWORD

Logs on, opens a file and sends one 1 MiB WRITE at RATE bytes a second
(about 33 s): it must be answered SUCCESS. Before, a frame had 30 s in
all, whatever its length, and a client uploading below ~35 KB/s could
never finish a full-size WRITE (its connection was closed).

Prints one line per step; exits non-zero on any failure.
"""

import struct
import time
import uuid

from raw_channel import CREATE, SUCCESS, Raw, charge_for, check, cmac_sign, connect_share, create_body

WRITE = 9
SIZE = 1 << 20
RATE = 32 * 1024
STEP = 0.25


def main():
    r = Raw(uuid.uuid4())
    sid, key, tid = connect_share(r)
    st, x = r.call(cmac_sign(key, r.header(CREATE, sid, tid=tid) + create_body("slow.bin")))
    check(st == SUCCESS, "opened slow.bin")
    fid = x[128:144]
    body = struct.pack("<HHIQ16sIIHHI", 49, 112, SIZE, 0, fid, 0, 0, 0, 0, 0) + b"s" * SIZE
    pdu = cmac_sign(key, r.header(WRITE, sid, tid=tid, charge=charge_for(SIZE)) + body)
    frame = struct.pack(">I", len(pdu)) + pdu
    started = time.monotonic()
    chunk = int(RATE * STEP)
    sent = 0
    try:
        while sent < len(frame):
            r.s.sendall(frame[sent : sent + chunk])
            sent += chunk
            time.sleep(STEP)
        r.s.settimeout(30)
        st = struct.unpack_from("<I", r.recv(), 8)[0]
    except OSError as e:
        check(False, f"a 1 MiB WRITE sent at {RATE} B/s is served (failed after {time.monotonic() - started:.1f}s: {e!r})")
    check(st == SUCCESS, f"a 1 MiB WRITE sent at {RATE} B/s over {time.monotonic() - started:.1f}s answered SUCCESS (got {st:#010x})")
    r.s.close()
    print("PASS", flush=True)


main()
