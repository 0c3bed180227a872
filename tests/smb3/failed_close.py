"""A CLOSE filterd could not commit is not acknowledged (rksmbd, smbprotocol).

Usage: failed_close.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose second commit fails (the first records the
persistent open, the second is its close). Opens closing.txt with a DH2Q
persistent context and an RWH lease, writes, and CLOSEs: the CLOSE must
fail with STATUS_INSUFFICIENT_RESOURCES (filterd undid it). Prints
"refused" and waits for a line on stdin (the driver checks that
filterd still lists the handle). The FileId still works: a write and a
read through it; a second CLOSE succeeds. Prints "done" and waits for a
line (the driver checks filterd lists nothing); then another client
opens the file for writing. Prints PASS; exits non-zero on any failure.
"""

import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    RequestedOplockLevel,
    SMB2CloseRequest,
)

from smbtest import args, check, connect, lease_context, open_rw, pause, persistent_context

SERVER = args()
STATUS_INSUFFICIENT_RESOURCES = 0xC000009A
DATA = b"written before the failed close\n"
MORE = b"and after it\n"


def close(conn, tree, file_id):
    """A CLOSE of `file_id`, sent as is: smbprotocol's Open.close takes an
    open for closed once it sent a CLOSE, whatever the answer (it would not
    send a second one)."""
    req = SMB2CloseRequest()
    req["file_id"] = file_id
    sent = conn.send(req, sid=tree.session.session_id, tid=tree.tree_connect_id)
    conn.receive(sent)


def open_closing(tree, disposition, contexts):
    level = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE if contexts else 0
    return open_rw(tree, "closing.txt", disposition, contexts, level)


conn, tree = connect(*SERVER)
f = open_closing(
    tree,
    CreateDisposition.FILE_OVERWRITE_IF,
    [persistent_context(uuid.uuid4()), lease_context(uuid.uuid4().bytes)],
)
f.write(DATA, 0)
try:
    close(conn, tree, f.file_id)
    check(False, "the CLOSE whose commit failed is refused")
except SMBResponseException as e:
    check(e.status == STATUS_INSUFFICIENT_RESOURCES, f"the CLOSE whose commit failed is refused ({e.status:#x})")
pause("refused")

# The open is still the client's: its FileId reads and writes.
f.write(MORE, len(DATA))
check(f.read(0, len(DATA) + len(MORE)) == DATA + MORE, "the FileId still writes and reads")
close(conn, tree, f.file_id)
check(True, "the second CLOSE succeeds")
pause("done")

# Closed for good: another client's write open is granted.
other, other_tree = connect(*SERVER)
g = open_closing(other_tree, CreateDisposition.FILE_OPEN, [])
check(g.read(0, 4096) == DATA + MORE, "another client opens the closed file")
g.close()
other.disconnect()
conn.disconnect()
print("PASS", flush=True)
