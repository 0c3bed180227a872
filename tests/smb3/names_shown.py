"""Which host names a listing shows, and what an exact name lists (rksmbd).

Usage: names_shown.py HOST PORT SHARE USER PASSWORD

The directory `odd` holds `plain`, a directory `a` with `b` in it, and
names made locally that a client could not name back: `a\\b` (a
backslash: opened by that name, rksmbd reached `a/b`, another file),
`x:y` and one with a control character (listed, but refused
OBJECT_NAME_INVALID when opened): only `a` and `plain` are listed
(review rvnames). The directory `case` holds `foo.txt`,
`FOO.TXT` and `other`: a pattern without wildcards that names an entry
byte for byte lists that entry alone (`del foo.txt` listed both and
deleted both, as Samba does not); one that names none exactly matches
case-blind, as before. Prints PASS, or exits non-zero.
"""

from dos_wildcards import listed
from raw_channel import SignedClient, check


def main():
    client = SignedClient()
    got = listed(client, "*", "odd")
    check(got == ["a", "plain"], f"odd lists {got}")
    for pattern, expected in [
        ("foo.txt", ["foo.txt"]),
        ("FOO.TXT", ["FOO.TXT"]),
        ("Foo.Txt", ["FOO.TXT", "foo.txt"]),
        ("*", ["FOO.TXT", "foo.txt", "other"]),
    ]:
        got = listed(client, pattern, "case")
        check(got == expected, f"{pattern!r} lists {got}")
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
