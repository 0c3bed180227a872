"""A delete of one name of a hard-linked file leaves the others listed
and opened (review; rksmbd, smbprotocol).

Usage: hardlinked_delete_pending.py HOST PORT SHARE USER PASSWORD

h1 and h2 name the same file (made by the driver). A opens h1; B opens
h1 with delete on close and closes it, leaving the file pending delete;
A closes, and h1 goes. h2, never deleted, is listed and opens. Before,
the pending-delete mark, kept by the file's inode, stayed: h2 was
STATUS_DELETE_PENDING and left out of listings until rksmbd restarted.
Prints PASS, or exits non-zero.
"""

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateOptions

from delete_pending_listing import listing, open_file
from smbtest import args, check, connect

SERVER = args()
READ = 0x80000000
DELETE = 0x00010000 | 0x80


conn_a, tree_a = connect(*SERVER)
conn_b, tree_b = connect(*SERVER)
a = open_file(tree_a, "h1", READ, 0)
b = open_file(tree_b, "h1", DELETE, CreateOptions.FILE_DELETE_ON_CLOSE)
b.close()
a.close()
names = listing(tree_a)
check("h1" not in names, f"h1 deleted ({names})")
check("h2" in names, f"h2, the other name, is listed ({names})")


def opens(tree, name):
    """The status of an open of `name` (0: it opened)."""
    try:
        open_file(tree, name, READ, 0).close()
        return 0
    except SMBResponseException as e:
        return e.status


status = opens(tree_a, "h2")
check(status == 0, f"h2 opens ({hex(status)})")
# h3 and h4 name another file; B deletes h3 alone (a delete-on-close
# open, nobody else's open of the file): rksmbd's close makes the delete,
# and h4 is not hidden (re-review rr-final 1: the mark was made again
# after that close, and h4 was STATUS_DELETE_PENDING until restart).
open_file(tree_b, "h3", DELETE, CreateOptions.FILE_DELETE_ON_CLOSE).close()
names = listing(tree_a)
check("h3" not in names and "h4" in names, f"h3 deleted, h4 listed ({names})")
status = opens(tree_a, "h4")
check(status == 0, f"h4 opens ({hex(status)})")
conn_b.disconnect()
conn_a.disconnect()
print("PASS")
