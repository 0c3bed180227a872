"""A lease filterd lowered while rksmbd was detached is told to its
client when rksmbd reattaches (rksmbd, smbprotocol; review rvping 2).

Usage: lowered_while_detached.py HOST PORT SHARE USER PASSWORD

Client A opens lowered.txt with an RWH lease (v2) and a persistent
handle and writes. Prints "ready" and waits while the driver stops
rksmbd (SIGSTOP: A's connection stays), kills filterd and starts it
again, and has another frontend's client open the file for writing and
write: filterd lowers A's lease to none (its holder is disconnected and
does not come back by the break timeout). The driver then lets rksmbd go
on, waits until it has reattached (resuming A's handle, untouched, onto
A's connection) and says a line. A then READs: by the time the READ is
answered, A must have been sent a lease break notification asking no
acknowledgment (flags 0) from RWH to none, at an epoch past its grant's
(before, it was sent nothing and went on caching under RWH while the
other client's write went in). Prints PASS; exits non-zero on any
failure.
"""

import queue
import time
import uuid

from server_messages import Requests
from smbtest import (
    CreateDisposition,
    args,
    check,
    connect,
    create_rw,
    lease_context,
    pause,
    persistent_context,
    SHARE_ALL,
    SMBResponseException,
)

HOST, PORT, SHARE, USER, PASSWORD = args()
NAME = "lowered.txt"

conn, tree = connect(HOST, PORT, SHARE, USER, PASSWORD, uuid.uuid4())
breaks = queue.Queue()
conn.outstanding_requests = Requests(conn, breaks, conn.outstanding_requests)
key = uuid.uuid4().bytes
f, resp = create_rw(
    tree,
    NAME,
    CreateDisposition.FILE_OVERWRITE_IF,
    [persistent_context(uuid.uuid4()), lease_context(key)],
    0xFF,
    share=SHARE_ALL,
)
leases = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
check(leases and leases[0]["lease_state"].get_value() == 0x7, "A holds RWH")
granted_epoch = leases[0]["epoch"].get_value()
f.write(b"A-WROTE!", 0)
pause("ready")
# Refused STATUS_FILE_NOT_AVAILABLE (retry) until rksmbd has resynced.
deadline = time.monotonic() + 30
while True:
    try:
        data = f.read(0, 64)
        break
    except SMBResponseException as e:
        check(e.status == 0xC0000467 and time.monotonic() < deadline, f"A's READ ({e.status:#x})")
        time.sleep(0.1)
try:
    r = breaks.get_nowait()
except queue.Empty:
    check(False, f"A was sent a break before its READ was answered (read {data!r})")
r.response_event.wait(5)
body = r.response["data"].get_value()
epoch = int.from_bytes(body[2:4], "little")
flags = int.from_bytes(body[4:8], "little")
got = (int.from_bytes(body[24:28], "little"), int.from_bytes(body[28:32], "little"))
check(body[8:24] == key, "the break names A's lease key")
check(got == (0x7, 0), f"a break from RWH to none ({got[0]:#x} to {got[1]:#x})")
check(flags == 0, f"no acknowledgment asked (flags {flags:#x})")
check(epoch > granted_epoch, f"its epoch {epoch} is past the grant's {granted_epoch}")
check(data == b"BOB-WROTE", f"A reads the other client's data ({data!r})")
f.close()
print("PASS", flush=True)
