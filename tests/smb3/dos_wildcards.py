"""QUERY_DIRECTORY with the DOS wildcards Win32 sends (rksmbd).

Usage: dos_wildcards.py HOST PORT SHARE USER PASSWORD

The directory `dos` holds foo, foobar, foo.txt, foo1.txt and foo12.txt.
FindFirstFile sends `foo*.*` as `foo<"*` and `foo??.*` as `foo>>"*`;
MS-FSA 2.1.4.4 has `<` match up to the name's last '.', `>` one
character or none before a '.' or the end, `"` a '.' or none at the end:
the first lists all five, the second all but foobar. Before, rksmbd took
`<` `>` `"` as `*` `?` `.` and listed three and two of them. Prints PASS,
or exits non-zero.
"""

import struct

from raw_channel import CLOSE, CREATE, SignedClient, check, create_body

QUERY_DIRECTORY = 0xE
FILE_NAMES_INFORMATION = 12


def listed(client, pattern, directory="dos"):
    """The names (but `.` and `..`) a fresh listing of `directory` gives
    for `pattern`."""
    st, r = client.call(CREATE, create_body(directory, access=0x1, attributes=0x10, disposition=1, options=0x1))
    check(st == 0, f"{directory} opened ({st:#010x})")
    fid = r[64 + 64 : 64 + 80]
    p = pattern.encode("utf-16-le")
    body = struct.pack("<HBBI16sHHI", 33, FILE_NAMES_INFORMATION, 0, 0, fid, 64 + 32, len(p), 65536) + p
    st, r = client.call(QUERY_DIRECTORY, body)
    check(st == 0, f"{pattern!r} listed ({st:#010x})")
    off, length = struct.unpack_from("<HI", r, 64 + 2)
    buf, at, names = r[off : off + length], 0, []
    while True:
        following, _, size = struct.unpack_from("<III", buf, at)
        names.append(buf[at + 12 : at + 12 + size].decode("utf-16-le"))
        if following == 0:
            break
        at += following
    client.call(CLOSE, struct.pack("<HHI16s", 24, 0, 0, fid))
    return sorted(n for n in names if n not in (".", ".."))


def main():
    client = SignedClient()
    every = sorted(["foo", "foobar", "foo.txt", "foo1.txt", "foo12.txt"])
    for win32, pattern, expected in [
        ("foo*.*", 'foo<"*', every),
        ("foo??.*", 'foo>>"*', sorted(["foo", "foo.txt", "foo1.txt", "foo12.txt"])),
        ("*.txt", "<.txt", sorted(["foo.txt", "foo1.txt", "foo12.txt"])),
        ("*", "*", every),
    ]:
        got = listed(client, pattern)
        check(got == expected, f"{win32!r} sent as {pattern!r} lists {got}")
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
