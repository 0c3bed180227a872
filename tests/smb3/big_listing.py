"""Listings of a big directory hold a position, not the directory
(rksmbd, smbprotocol).

Usage: big_listing.py HOST PORT SHARE USER PASSWORD PID N K

The share has a directory big/ of N files. K opens of it each start a
listing (one QUERY_DIRECTORY of a few entries); rksmbd (process PID) must
not grow by the directory K times over: before, each listing read and
kept every entry with its metadata at its first QUERY_DIRECTORY (64
listings of 20 000 entries: ~200 MB). Then one listing read on in small
pages lists every name exactly once, `.` and `..` first, and a pattern
lists just what it matches. Prints PASS, or exits non-zero.
"""

import sys

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.file_info import FileDispositionInformation, FileInformationClass
from smbprotocol.open import (
    CreateDisposition,
    DirectoryAccessMask,
    SMB2SetInfoRequest,
    SMB2SetInfoResponse,
)
from smbtest import args, check, connect, open_dir

PID, N, K = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
NO_MORE_FILES = 0x80000006
DIRECTORY_NOT_EMPTY = 0xC0000101
DELETE = 0x00010000
NAMES = FileInformationClass.FILE_NAMES_INFORMATION


def rss_kib():
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def set_delete(conn, tree, d):
    """SET_INFO FileDispositionInformation (delete): its status."""
    info = FileDispositionInformation()
    info["delete_pending"] = True
    req = SMB2SetInfoRequest()
    req["info_type"] = info.INFO_TYPE
    req["file_info_class"] = info.INFO_CLASS
    req["file_id"] = d.file_id
    req["buffer"] = info
    sent = conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id)
    try:
        SMB2SetInfoResponse().unpack(conn.receive(sent)["data"].get_value())
    except SMBResponseException as e:
        return e.status
    return 0


def page(d, pattern, size):
    """The names of one QUERY_DIRECTORY, or None at the end."""
    try:
        entries = d.query_directory(pattern, NAMES, max_output=size)
    except SMBResponseException as e:
        if e.status == NO_MORE_FILES:
            return None
        raise
    return [e["file_name"].get_value().decode("utf-16-le") for e in entries]


def main():
    conn, tree = connect(*args())
    dirs = [open_dir(tree, "big") for _ in range(K)]
    before = rss_kib()
    for d in dirs:
        check(len(page(d, "*", 1024)) > 2, "a listing's first page has entries")
    grown = rss_kib() - before
    print(f"rksmbd grew {grown} KiB with {K} listings of {N} entries started", flush=True)
    check(grown < 32 * 1024, f"{K} listings started: rksmbd grew {grown} KiB (bound 32 MiB)")

    # The first listing read again from the start (RESTART_SCANS), in
    # pages of a few dozen names.
    d = dirs[0]
    want = {f"entry-{i:05}" for i in range(N)} | {".", ".."}
    names = []
    first = True
    while True:
        try:
            entries = d.query_directory("*", NAMES, flags=0x01 if first else 0, max_output=4096)
        except SMBResponseException as e:
            check(e.status == NO_MORE_FILES, f"a listing ends with STATUS_NO_MORE_FILES ({e.status:#x})")
            break
        names += [e["file_name"].get_value().decode("utf-16-le") for e in entries]
        first = False
    check(names[:2] == [".", ".."], f"`.` and `..` come first ({names[:2]})")
    check(len(names) == len(set(names)), f"no name is listed twice ({len(names)} listed, {len(set(names))} names)")
    check(set(names) == want, f"every name is listed ({len(set(names) & want)} of {len(want)}, {len(set(names) - want)} others)")

    p = open_dir(tree, "big")
    got = page(p, "ENTRY-1999?", 65536)
    check(sorted(got) == [f"entry-{i:05}" for i in range(19990, 20000)], f"a pattern lists what it matches ({got})")
    check(page(p, "ENTRY-1999?", 65536) is None, "and then no more")
    p.close()
    for d in dirs:
        d.close()

    # Emptiness is read only as far as the first name: big/ refuses a
    # delete, a new empty directory takes one and is gone after its close.
    d = open_dir(tree, "big", access=DirectoryAccessMask.FILE_LIST_DIRECTORY | DELETE)
    st = set_delete(conn, tree, d)
    check(st == DIRECTORY_NOT_EMPTY, f"deleting big/: STATUS_DIRECTORY_NOT_EMPTY ({st:#x})")
    d.close()
    e = open_dir(tree, "empty", access=DirectoryAccessMask.FILE_LIST_DIRECTORY | DELETE, disposition=CreateDisposition.FILE_CREATE)
    st = set_delete(conn, tree, e)
    check(st == 0, f"deleting an empty directory: STATUS_SUCCESS ({st:#x})")
    e.close()

    # A directory removed in the middle of its listing: the listing ends
    # (it was STATUS_OBJECT_NAME_NOT_FOUND, getdents64's ENOENT).
    g = open_dir(tree, "gone", disposition=CreateDisposition.FILE_CREATE)
    check(page(g, "*", 20) == ["."], "a page with room for `.` alone")
    r = open_dir(tree, "gone", access=DirectoryAccessMask.FILE_LIST_DIRECTORY | DELETE)
    check(set_delete(conn, tree, r) == 0, "gone/ set to be deleted")
    r.close()
    check(page(g, "*", 20) == [".."], "then `..`, after the directory went")
    check(page(g, "*", 20) is None, "then STATUS_NO_MORE_FILES")
    g.close()
    print("PASS", flush=True)


main()
