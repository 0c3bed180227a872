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
deleted both, as Samba does not); one that names none exactly lists the
first case-blind match alone (re-review rr37f: `del Foo.Txt` still
deleted both). Prints PASS, or exits non-zero.
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
        ("Foo.Txt", None),
        ("*", ["FOO.TXT", "foo.txt", "other"]),
    ]:
        got = listed(client, pattern, "case")
        if expected is None:
            # No entry of that very name: one of the two, not both.
            ok = len(got) == 1 and got[0] in ("FOO.TXT", "foo.txt")
        else:
            ok = got == expected
        check(ok, f"{pattern!r} lists {got}")
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
