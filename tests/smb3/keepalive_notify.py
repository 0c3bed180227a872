"""A NetBIOS keep-alive does not stop the connection's other work
(rksmbd; raw SMB 3.0.2).

Usage: keepalive_notify.py HOST PORT SHARE USER PASSWORD EXPORT_DIR

The export has a directory watched/. A raw signed connection opens it and
sends a CHANGE_NOTIFY (answered STATUS_PENDING), then a NetBIOS session
keep-alive (85 00 00 00) and nothing more. Once rksmbd has read the
keep-alive (its end's receive queue is empty), a file is made in
watched/ (in EXPORT_DIR directly): the CHANGE_NOTIFY is answered within
PROMPT seconds, and an ECHO after it still is. Before, rksmbd went on to
wait for the next frame's header after a keep-alive, serving nothing else
meanwhile, and closed the connection 30 s later. Prints one line per
step; exits non-zero on any failure.
"""

import os
import socket
import struct
import sys
import time
import uuid

from raw_channel import ECHO, SUCCESS, Raw, check, cmac_sign, connect_share, create_body, CREATE, server_side_queues

CHANGE_NOTIFY = 0xF
PENDING = 0x103
ROOT = sys.argv[6]
PROMPT = 5


def main():
    r = Raw(uuid.uuid4())
    sid, key, tid = connect_share(r)
    st, resp = r.call(
        cmac_sign(key, r.header(CREATE, sid, tid=tid) + create_body("watched", access=0x1, attributes=0x10, disposition=1, options=0x1))
    )
    check(st == SUCCESS, f"watched/ opened (got {st:#010x})")
    fid = resp[64 + 64 : 64 + 80]
    # FILE_NOTIFY_CHANGE_FILE_NAME, not watching the tree.
    r.send(cmac_sign(key, r.header(CHANGE_NOTIFY, sid, tid=tid) + struct.pack("<HHI16sII", 32, 0, 4096, fid, 0x1, 0)))
    st = struct.unpack_from("<I", r.recv(), 8)[0]
    check(st == PENDING, f"the CHANGE_NOTIFY waits (got {st:#010x})")
    r.s.sendall(b"\x85\x00\x00\x00")
    port = r.s.getsockname()[1]
    unread = lambda: (server_side_queues(port) or (0, None))[1]
    deadline = time.monotonic() + 10
    while unread() != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    check(unread() == 0, "rksmbd read the keep-alive")
    open(os.path.join(ROOT, "watched", "made"), "w").close()
    r.s.settimeout(PROMPT)
    try:
        st = struct.unpack_from("<I", r.recv(), 8)[0]
    except (socket.timeout, EOFError) as e:
        check(False, f"the CHANGE_NOTIFY answered within {PROMPT} s of the change ({e!r})")
    check(st == SUCCESS, f"the CHANGE_NOTIFY answered within {PROMPT} s of the change (got {st:#010x})")
    st, _ = r.call(cmac_sign(key, r.header(ECHO, sid) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, f"an ECHO after it answered (got {st:#010x})")
    print("PASS", flush=True)


main()
