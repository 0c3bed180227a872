"""The times of SET_INFO FileBasicInformation (rksmbd; MS-FSCC 2.4.7,
MS-FSA 2.1.5.14.2).

Usage: basic_times.py HOST PORT SHARE USER PASSWORD

A write time of 0, -1 or -2 leaves the write time as it is (-2 was taken
for a date in the year 58000, review rvclock); after -1 the open's
WRITEs and end-of-file changes leave it too, after -2 they move it again.
1969-01-01 and 100 ns before 1970 are stored and read back exactly
(times before 1970 were skipped, answered success). A negative time other
than -1 and -2, in any of the four fields, is STATUS_INVALID_PARAMETER
and changes nothing, also not a good time beside it. Prints PASS, or
exits non-zero.
"""

import struct

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    SMB2QueryInfoRequest,
    SMB2QueryInfoResponse,
    SMB2SetInfoRequest,
    SMB2SetInfoResponse,
)

from smbtest import SHARE_ALL, args, check, connect, create_rw, end_of_file

STATUS_INVALID_PARAMETER = 0xC000000D
FREEZE = 0xFFFFFFFFFFFFFFFF
THAW = 0xFFFFFFFFFFFFFFFE
EPOCH = 116_444_736_000_000_000
# 2026-01-01T00:00:00Z, 1969-01-01T00:00:00Z and 100 ns before 1970.
T2026 = EPOCH + 1_767_225_600 * 10_000_000
T1969 = EPOCH - 365 * 86400 * 10_000_000
JUST_BEFORE_1970 = EPOCH - 1


def set_basic(tree, f, access=0, write=0, creation=0, change=0):
    """SET_INFO FileBasicInformation with these FILETIMEs and attributes
    0 (unchanged): the status (0 on success)."""
    req = SMB2SetInfoRequest()
    req["info_type"] = 1
    req["file_info_class"] = 4
    req["file_id"] = f.file_id
    req["buffer"] = struct.pack("<QQQQII", creation, access, write, change, 0, 0)
    conn = tree.session.connection
    sent = conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id)
    try:
        SMB2SetInfoResponse().unpack(conn.receive(sent)["data"].get_value())
        return 0
    except SMBResponseException as e:
        return e.status


def times(tree, f):
    """(access, write) of open `f`, as QUERY_INFO FileBasicInformation
    answers them."""
    req = SMB2QueryInfoRequest()
    req["info_type"] = 1
    req["file_info_class"] = 4
    req["output_buffer_length"] = 4096
    req["file_id"] = f.file_id
    conn = tree.session.connection
    sent = conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id)
    resp = SMB2QueryInfoResponse()
    resp.unpack(conn.receive(sent)["data"].get_value())
    return struct.unpack_from("<QQ", resp["buffer"].get_value(), 8)


def write_time(tree, f):
    return times(tree, f)[1]


def main():
    conn, tree = connect(*args())
    f = create_rw(tree, "times.txt", CreateDisposition.FILE_OVERWRITE_IF, share=SHARE_ALL)[0]
    f.write(b"first", 0)
    check(set_basic(tree, f, write=T2026) == 0, "the write time is set to 2026-01-01")
    check(write_time(tree, f) == T2026, "and read back")

    for value, name in [(THAW, "-2"), (FREEZE, "-1"), (0, "0")]:
        st = set_basic(tree, f, write=value)
        check(st == 0, f"a write time of {name} is accepted ({st:#x})")
        now = write_time(tree, f)
        check(now == T2026, f"a write time of {name} leaves it ({now})")

    # Frozen by the -1 above: this open's changes leave the write time.
    f.write(b"second", 0)
    now = write_time(tree, f)
    check(now == T2026, f"a WRITE after -1 leaves the write time ({now})")
    f.write(b"third", 100)
    check(write_time(tree, f) == T2026, "an extending WRITE after -1 leaves it")
    st = end_of_file(tree, f, 3)
    check(st == 0, f"the end of file is set ({st:#x})")
    check(write_time(tree, f) == T2026, "an end of file set after -1 leaves it")

    # Another open's WRITE still moves it: the freeze is this open's.
    g = create_rw(tree, "times.txt", CreateDisposition.FILE_OPEN, share=SHARE_ALL)[0]
    g.write(b"other", 0)
    moved = write_time(tree, f)
    check(moved != T2026, f"another open's WRITE moves it ({moved})")
    g.close()
    check(set_basic(tree, f, write=T2026) == 0, "the write time is set again")

    check(set_basic(tree, f, write=THAW) == 0, "-2 thaws it")
    f.write(b"fourth", 0)
    now = write_time(tree, f)
    check(now != T2026, f"a WRITE after -2 moves the write time ({now})")

    for t, name in [(T1969, "1969-01-01"), (JUST_BEFORE_1970, "1969-12-31T23:59:59.9999999")]:
        st = set_basic(tree, f, write=t, access=t)
        check(st == 0, f"a write time of {name} is accepted ({st:#x})")
        got = times(tree, f)
        check(got == (t, t), f"{name} is stored and read back ({got})")

    check(set_basic(tree, f, write=T2026, access=T2026) == 0, "2026 again")
    bad = [0x8000000000000000, 0xFFFFFFFFFFFFFFFD]
    for field in ["creation", "access", "write", "change"]:
        for value in bad:
            fields = {"access": T1969, "write": T1969}
            fields[field] = value
            st = set_basic(tree, f, **fields)
            check(
                st == STATUS_INVALID_PARAMETER,
                f"a {field} time of {value:#x} is STATUS_INVALID_PARAMETER ({st:#x})",
            )
            got = times(tree, f)
            check(got == (T2026, T2026), f"and changes no time ({got})")

    f.close()
    conn.disconnect()
    print("PASS")


if __name__ == "__main__":
    main()
