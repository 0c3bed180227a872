"""A connection that stops reading while its CHANGE_NOTIFY waits gets the
changes it missed as one STATUS_NOTIFY_ENUM_DIR, not a queue without
bound, and slows nobody (rksmbd; raw SMB 3.0.2 plus smbprotocol).

Usage: notify_overflow.py HOST PORT SHARE USER PASSWORD EXPORT_DIR

The export has a directory watched/. Connection Y (smbprotocol) writes a
1 MiB file. Connection X (raw, signed) sets up a session, opens
watched/ and sends a CHANGE_NOTIFY on it (answered STATUS_PENDING), then
READS reads of the file, and reads nothing more: its thread, serving the
reads first, blocks writing their answers. Then:

1. FILES files are made in watched/ (in EXPORT_DIR directly: more than
   the 1,024 events rksmbd queues for one connection), and Y makes
   SMB_FILES more there, each CREATE+CLOSE answered within a few seconds.
2. X reads again: its READs are answered, then its CHANGE_NOTIFY with
   STATUS_NOTIFY_ENUM_DIR (the events past the bound were folded into an
   overflow). Without the bound, every name fits the CHANGE_NOTIFY's
   64 KiB and it is answered STATUS_SUCCESS with the first of them.

All of it within the socket's 30 s write timeout (X would be closed).
Prints one line per step; exits non-zero on any failure.
"""

import os
import socket
import sys
import struct
import time
import uuid


from raw_channel import (
    SUCCESS,
    CREATE,
    Raw,
    charge_for,
    check,
    cmac_sign,
    connect_share,
    create_body,
    open_file,
    session,
    wait_until_writer_blocked,
)

CHANGE_NOTIFY, READ = 0xF, 8
PENDING, NOTIFY_ENUM_DIR = 0x103, 0x10C
FLAG_ASYNC = 0x2
SIZE = 1 << 20
READS = 24
FILES = 1100
SMB_FILES = 50
ROOT = sys.argv[6]
PROMPT = 5


def main():
    y, _, ytree = session(uuid.uuid4())
    big = open_file(ytree, "big.bin")
    big.write(b"n" * SIZE, 0)
    big.close()

    x = Raw(uuid.uuid4())
    sid, key, tid = connect_share(x)

    def call(cmd, body):
        return x.call(cmac_sign(key, x.header(cmd, sid, tid=tid) + body))

    # FILE_LIST_DIRECTORY | SYNCHRONIZE, a directory, FILE_OPEN.
    st, r = call(CREATE, create_body("watched", access=0x100001, attributes=0x10, disposition=1, options=1))
    check(st == SUCCESS, f"X opened watched/ (got {st:#010x})")
    dir_id = r[64 + 64 : 64 + 80]
    st, r = call(CREATE, create_body("big.bin"))
    check(st == SUCCESS, "X opened big.bin")
    file_id = r[64 + 64 : 64 + 80]
    # FILE_NOTIFY_CHANGE_FILE_NAME, 64 KiB of output.
    st, r = call(CHANGE_NOTIFY, struct.pack("<HHI16sII", 32, 0, 65536, dir_id, 1, 0))
    check(st == PENDING, f"X's CHANGE_NOTIFY went async (got {st:#010x})")
    notify_id = struct.unpack_from("<Q", r, 32)[0]

    x.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    read = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, SIZE, 0, file_id, 0, 0, 0, 0, 0) + b"\0"
    for _ in range(READS):
        x.send(cmac_sign(key, x.header(READ, sid, tid=tid, charge=charge_for(SIZE)) + read))
    print(f"X sent {READS} READs of 1 MiB and reads nothing", flush=True)
    # X's thread is blocked writing READ answers before any file is made:
    # else, between two answers, it would complete the CHANGE_NOTIFY with
    # the first few names, before the bound is reached (a CI run saw that).
    wait_until_writer_blocked(x.s)

    # 1. FILES files appear in watched/ (made in the export directly: fast
    # enough to stay within X's write timeout on a loaded machine), and
    # Y, making SMB_FILES more, is not slowed by X.
    for i in range(FILES):
        open(os.path.join(ROOT, "watched", f"f{i}"), "w").close()
    slowest = 0.0
    for i in range(SMB_FILES):
        t = time.monotonic()
        open_file(ytree, rf"watched\y{i}").close()
        slowest = max(slowest, time.monotonic() - t)
        if slowest >= PROMPT:
            check(False, f"Y's CREATE+CLOSE #{i} answered within {PROMPT}s")
    check(True, f"{FILES} files made; Y's {SMB_FILES} CREATE+CLOSEs answered meanwhile (slowest {slowest:.2f}s)")

    # 2. X reads again: its READs, then the CHANGE_NOTIFY's end.
    x.s.settimeout(30)
    reads = 0
    while True:
        r = x.recv()
        st, flags = struct.unpack_from("<I", r, 8)[0], struct.unpack_from("<I", r, 16)[0]
        cmd = struct.unpack_from("<H", r, 12)[0]
        if cmd == READ:
            if st != SUCCESS:
                check(False, f"X's READ answered (got {st:#010x})")
            reads += 1
            continue
        check(cmd == CHANGE_NOTIFY and flags & FLAG_ASYNC, f"X got its CHANGE_NOTIFY's final response (command {cmd})")
        check(struct.unpack_from("<Q", r, 32)[0] == notify_id, "with its AsyncId")
        check(
            st == NOTIFY_ENUM_DIR,
            f"X's CHANGE_NOTIFY ended STATUS_NOTIFY_ENUM_DIR after {reads} READs (got {st:#010x})",
        )
        break
    y.disconnect()
    print("PASS", flush=True)


main()
