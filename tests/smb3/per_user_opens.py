"""One user cannot take rksmbd's whole open cap (review; run under
`prlimit --nofile=LIMIT`).

Usage: per_user_opens.py HOST PORT SHARE USER PASSWORD OTHER OTHER_PASSWORD SHARE_OF_USER

OTHER opens directory `d` (which filterd never sees) over two connections
until a CREATE is refused: the refusal is STATUS_INSUFFICIENT_RESOURCES
after exactly SHARE_OF_USER opens, counted across both connections. USER
then opens a file and the directory: both succeed. Before, the cap was
server-wide: OTHER's directory opens took all of it and USER's CREATEs
were refused. OTHER closes one open and opens again. Prints PASS, or
exits non-zero.
"""

import sys
import uuid

from smbprotocol.connection import Connection, Dialects
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

from raw_channel import check, open_file
from smbtest import open_dir

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
OTHER, OTHER_PASSWORD, SHARE_OF_USER = sys.argv[6], sys.argv[7], int(sys.argv[8])
INSUFFICIENT_RESOURCES = 0xC000009A


def tree_of(user, password):
    conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=False)
    conn.connect(dialect=Dialects.SMB_3_0_2)
    s = Session(conn, user, password, require_encryption=False)
    s.connect()
    tree = TreeConnect(s, rf"\\{HOST}\{SHARE}")
    tree.connect()
    return tree


def open_d(tree):
    return open_dir(tree, "d")


def refusal(what):
    try:
        what()
    except SMBResponseException as e:
        return e.status
    return 0


trees = [tree_of(OTHER, OTHER_PASSWORD), tree_of(OTHER, OTHER_PASSWORD)]
held = []
refused = 0
while len(held) <= SHARE_OF_USER * 2 and not refused:
    tree = trees[len(held) % 2]
    try:
        held.append(open_d(tree))
    except SMBResponseException as e:
        refused = e.status
check(refused == INSUFFICIENT_RESOURCES, f"{OTHER} refused after {len(held)} opens (status {refused:#010x})")
check(len(held) == SHARE_OF_USER, f"{OTHER} held {len(held)} opens over two connections, its share {SHARE_OF_USER}")

mine = tree_of(USER, PASSWORD)
f = open_file(mine, "mine.txt")
check(True, f"{USER}'s CREATE of a file with {OTHER} at its share")
d = open_d(mine)
check(True, f"{USER}'s CREATE of the directory with {OTHER} at its share")
f.close()
d.close()

held.pop().close()
held.append(open_d(trees[0]))
check(True, f"{OTHER} opens again once it closed one")
check(refusal(lambda: held.append(open_d(trees[1]))) == INSUFFICIENT_RESOURCES, f"{OTHER} is at its share again")
for o in held:
    o.close()
print("PASS", flush=True)
