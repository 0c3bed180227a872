"""A paged listing lists every name that exists throughout exactly once
while other names come and go (rksmbd, smbprotocol).

Usage: listing_churn.py HOST PORT SHARE USER PASSWORD DIR LOCAL STABLE...

Lists DIR of the share in pages of about twenty names; after each page
removes up to twenty names already listed through LOCAL, the same
directory on the host. Every name in STABLE... (prefixes: every name
that starts with one exists throughout) must be listed exactly once.
Before, each QUERY_DIRECTORY read on from its offset through a fresh
open of the directory, and on overlayfs, whose merged directory numbers
its entries per open, names that existed throughout were skipped.
Prints PASS, or exits non-zero.
"""

import collections
import os
import sys

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.file_info import FileInformationClass
from smbtest import args, check, connect, open_dir

DIR, LOCAL, STABLE = sys.argv[6], sys.argv[7], tuple(sys.argv[8:])
NO_MORE_FILES = 0x80000006


def main():
    _, tree = connect(*args())
    stable = sorted(n for n in os.listdir(LOCAL) if n.startswith(STABLE))
    churn = sorted(n for n in os.listdir(LOCAL) if not n.startswith(STABLE))
    check(stable and churn, f"{len(stable)} names stay, {len(churn)} go")
    d = open_dir(tree, DIR)
    names = []
    while True:
        try:
            entries = d.query_directory("*", FileInformationClass.FILE_NAMES_INFORMATION, max_output=512)
        except SMBResponseException as e:
            check(e.status == NO_MORE_FILES, f"the listing ends with STATUS_NO_MORE_FILES ({e.status:#x})")
            break
        names += [e["file_name"].get_value().decode("utf-16-le") for e in entries]
        listed = set(names)
        gone = [n for n in churn if n in listed][:20]
        for n in gone:
            os.unlink(os.path.join(LOCAL, n))
            churn.remove(n)
    d.close()
    count = collections.Counter(names)
    missing = [n for n in stable if count[n] == 0]
    twice = [n for n in stable if count[n] > 1]
    check(not missing, f"every name that stayed is listed ({len(missing)} never, e.g. {missing[:3]})")
    check(not twice, f"none twice ({len(twice)}, e.g. {twice[:3]})")
    print("PASS", flush=True)


main()
