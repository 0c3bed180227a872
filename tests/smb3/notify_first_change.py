"""A waiting CHANGE_NOTIFY is answered with the first change alone, as
Windows and Samba answer it, but with a rename's old and new names
together; what follows is the next request's answer, at once (rksmbd;
raw SMB 3.0.2).

Usage: notify_first_change.py HOST PORT SHARE USER PASSWORD ROOT

ROOT is the export's directory on the host: the changes are made there
by this process, each pair within a few microseconds, so that inotify
queues both before rksmbd reads either. Before, a waiting request was
answered with every change rksmbd had read by the time its thread ran
(smbtorture smb2.notify.valid-req under load: "num_changes 2 should be
1"). Prints one line per step; exits non-zero on any failure.
"""

import os
import struct
import sys
import uuid

from raw_channel import CREATE, SUCCESS, Raw, check, cmac_sign, connect_share, create_body

ROOT = sys.argv[6]
CHANGE_NOTIFY, PENDING = 0xF, 0x103
ADDED, RENAMED_OLD, RENAMED_NEW = 1, 4, 5
ROUNDS = 10


def changes(r):
    """The FILE_NOTIFY_INFORMATION entries of a final response."""
    off, length = struct.unpack_from("<HI", r, 64 + 2)
    data, out, at = r[off : off + length], [], 0
    while at + 12 <= len(data):
        nxt, action, n = struct.unpack_from("<III", data, at)
        out.append((action, data[at + 12 : at + 12 + n].decode("utf-16-le")))
        if nxt == 0:
            break
        at += nxt
    return out


def main():
    h = Raw(uuid.uuid4())
    sid, key, tid = connect_share(h)
    d = os.path.join(ROOT, "nfc")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "a.txt"), "w").close()
    body = create_body("nfc", access=0x1, attributes=0x10, disposition=3, options=0x1)
    st, r = h.call(cmac_sign(key, h.header(CREATE, sid, tid=tid) + body))
    check(st == SUCCESS, "opened directory nfc")
    did = r[128:144]
    h.s.settimeout(20)

    def notify():
        """Sends a CHANGE_NOTIFY for file names on nfc; its first answer."""
        pdu = h.header(CHANGE_NOTIFY, sid, tid=tid) + struct.pack("<HHI16sII", 32, 0, 4096, did, 1, 0)
        st, r = h.call(cmac_sign(key, pdu))
        return st, r

    def waits():
        """A CHANGE_NOTIFY that waits (interim response), then nothing
        else is in flight."""
        st, _ = notify()
        check(st == PENDING, f"the CHANGE_NOTIFY waits (got {st:#010x})")

    def final():
        r = h.recv()
        st = struct.unpack_from("<I", r, 8)[0]
        check(st == SUCCESS, f"it is answered with changes (got {st:#010x})")
        return changes(r)

    names = ["a.txt", "b.txt"]
    for i in range(ROUNDS):
        old, new = names[i % 2], names[(i + 1) % 2]
        waits()
        os.rename(os.path.join(d, old), os.path.join(d, new))
        got = final()
        want = [(RENAMED_OLD, old), (RENAMED_NEW, new)]
        check(got == want, f"round {i}: a rename answers both names together (got {got}, want {want})")
        first, second = f"x{i}.txt", f"y{i}.txt"
        waits()
        open(os.path.join(d, first), "w").close()
        open(os.path.join(d, second), "w").close()
        got = final()
        check(got == [(ADDED, first)], f"round {i}: the waiting request gets the first create alone (got {got})")
        st, r = notify()
        check(st == SUCCESS, f"round {i}: the next request is answered at once (got {st:#010x})")
        got = changes(r)
        check(got == [(ADDED, second)], f"round {i}: with the second create (got {got})")
    print(f"{ROUNDS} rounds: renames answered whole, creates one per answer", flush=True)
    print("PASS", flush=True)
    os._exit(0)


main()
