"""A file's object id (FSCTL_CREATE_OR_GET_OBJECT_ID) is its own: the
same for every open of it, and not the id of a removed file whose inode
number the filesystem gave it (rksmbd, raw SMB 3.0.2).

Usage: object_ids.py HOST PORT SHARE USER PASSWORD

The script makes old.txt and reads its object id through two opens (the
same id), prints "made", and waits for a line on stdin: the name of a
file the driver made after removing old.txt, under old.txt's inode
number. That file's object id must differ from old.txt's.
Prints one line per step and PASS; exits non-zero on any failure.
"""

import struct
import sys
import uuid

from raw_channel import CLOSE, CREATE, SUCCESS, Raw, check, cmac_sign, connect_share, create_body

IOCTL = 0xB
FSCTL_CREATE_OR_GET_OBJECT_ID = 0x000900C0
IS_FSCTL = 1


def main():
    raw = Raw(uuid.uuid4())
    sid, key, tid = connect_share(raw)

    def call(cmd, body):
        return raw.call(cmac_sign(key, raw.header(cmd, sid, tid=tid) + body))

    def open_(name, disposition):
        st, r = call(CREATE, create_body(name, disposition=disposition))
        check(st == SUCCESS, f"{name} opened (got {st:#010x})")
        return r[64 + 64 : 64 + 80]

    def object_id(fid):
        body = struct.pack("<HHI16sIIIIIIII", 57, 0, FSCTL_CREATE_OR_GET_OBJECT_ID, fid, 0, 0, 0, 0, 0, 64, IS_FSCTL, 0)
        st, r = call(IOCTL, body)
        check(st == SUCCESS, f"FSCTL_CREATE_OR_GET_OBJECT_ID answered (got {st:#010x})")
        off, count = struct.unpack_from("<II", r, 64 + 32)
        check(count == 64, f"a FILE_OBJECTID_BUFFER of 64 bytes ({count})")
        out = r[off : off + count]
        check(out[:16] == out[32:48], "the birth object id is the object id")
        return out[:16]

    def close(fid):
        st, _ = call(CLOSE, struct.pack("<HHI16s", 24, 0, 0, fid))
        check(st == SUCCESS, "closed")

    a = open_("old.txt", 5)
    b = open_("old.txt", 1)
    old = object_id(a)
    check(object_id(b) == old, f"two opens of old.txt: one object id ({old.hex()})")
    close(a)
    close(b)
    print("made", flush=True)

    name = sys.stdin.readline().strip()
    check(name != "", "the driver named the file under old.txt's inode number")
    n = open_(name, 1)
    new = object_id(n)
    check(new != old, f"{name}, under old.txt's inode number: an object id of its own ({new.hex()})")
    close(n)
    print("PASS", flush=True)


main()
