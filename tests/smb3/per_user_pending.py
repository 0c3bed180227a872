"""CREATEs that waited for a lease break are checked against the user's
share again when granted (review; run under `prlimit --nofile=LIMIT`).

Usage: per_user_pending.py HOST PORT SHARE USER PASSWORD SHARE_OF_USER

Connection A holds pending.txt under an RWH lease and directory `d` open
until USER holds one open short of SHARE_OF_USER. Connection B sends three
CREATEs of pending.txt: each passes the share (none is granted yet) and
goes async, waiting for A's lease break. A acknowledges: one CREATE is
granted, the other two are STATUS_INSUFFICIENT_RESOURCES. Before, all
three were granted, the user past its share.

With CAP and FILLER (a user of the same password; run where the cap of
opens CAP is more than the user's share): once B's CREATEs wait, FILLER
fills the cap with directory opens, and when A acknowledges all three
are STATUS_INSUFFICIENT_RESOURCES, for the descriptor cap. Before
(re-review rr46a F4) one was granted, a slot forced past the cap: only
the user's share was asked again.

Usage: per_user_pending.py HOST PORT SHARE USER PASSWORD SHARE_OF_USER [CAP FILLER]

Prints PASS, or exits non-zero.
"""

import queue
import sys
import time

from smbprotocol import open as smb_open
from smbprotocol.exceptions import SMBResponseException

from server_messages import LeaseBreakAck, Requests
from smbtest import SHARE_ALL, args, check, connect, create_rw, lease_context, open_dir

SERVER = args()
SHARE_OF_USER = int(sys.argv[6])
CAP, FILLER = (int(sys.argv[7]), sys.argv[8]) if len(sys.argv) > 8 else (None, None)
STATUS_PENDING = 0x103
INSUFFICIENT_RESOURCES = 0xC000009A
R, H = 1, 2

conn_a, tree_a = connect(*SERVER)
arrived = queue.Queue()
conn_a.outstanding_requests = Requests(conn_a, arrived, conn_a.outstanding_requests)
key = b"per-user-pending"
fa, _ = create_rw(
    tree_a,
    "pending.txt",
    smb_open.CreateDisposition.FILE_OVERWRITE_IF,
    [lease_context(key)],
    smb_open.RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE,
    share=SHARE_ALL,
)
held = [open_dir(tree_a, "d") for _ in range(SHARE_OF_USER - 2)]

conn_b, tree_b = connect(*SERVER)
session_b = tree_b.session


def send_create():
    """Sends a CREATE of pending.txt; returns the request once its interim
    response (or only one) arrived."""
    f = smb_open.Open(tree_b, "pending.txt")
    msg, _ = f.create(
        smb_open.ImpersonationLevel.Impersonation,
        smb_open.FilePipePrinterAccessMask.GENERIC_READ,
        smb_open.FileAttributes.FILE_ATTRIBUTE_NORMAL,
        SHARE_ALL,
        smb_open.CreateDisposition.FILE_OPEN,
        smb_open.CreateOptions.FILE_NON_DIRECTORY_FILE,
        send=False,
    )
    request = conn_b.send(msg, session_b.session_id, tree_b.tree_connect_id)
    check(request.response_event.wait(timeout=30), "B's CREATE is answered at once")
    with request.response_event_lock:
        status = request.response["status"].get_value()
        if status == STATUS_PENDING:
            request.response_event.clear()
    check(status == STATUS_PENDING, f"B's CREATE waits for the lease break (status {status:#010x})")
    return request


def filler_open(tree):
    """An open of "d" by FILLER. The waiting CREATEs are retried while
    the lease break is pending, each taking a descriptor slot for one round
    trip to filterd: the filler's last open can meet one of those and be
    refused for the cap. Tried again, to a deadline."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return open_dir(tree, "d")
        except SMBResponseException as e:
            if e.status != INSUFFICIENT_RESOURCES or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


waiting = [send_create() for _ in range(3)]
if FILLER:
    # USER holds SHARE_OF_USER - 1 opens: FILLER takes the rest.
    conn_f, tree_f = connect(SERVER[0], SERVER[1], SERVER[2], FILLER, SERVER[4])
    held += [filler_open(tree_f) for _ in range(CAP - SHARE_OF_USER + 1)]
brk = arrived.get(timeout=30)
check(brk.response_event.wait(10), "A gets a lease break")
ack = LeaseBreakAck()
ack["lease_key"] = key
ack["lease_state"] = R | H
r = conn_a.send(ack, sid=tree_a.session.session_id, tid=tree_a.tree_connect_id)
check(r.response_event.wait(timeout=30), "A's acknowledgment is answered")
statuses = []
for request in waiting:
    check(request.response_event.wait(timeout=30), "B's CREATE is answered in the end")
    with request.response_event_lock:
        statuses.append(request.response["status"].get_value())
if FILLER:
    check(
        statuses == [INSUFFICIENT_RESOURCES] * 3,
        f"all three refused at the descriptor cap ({[hex(s) for s in statuses]})",
    )
else:
    check(
        sorted(statuses) == [0, INSUFFICIENT_RESOURCES, INSUFFICIENT_RESOURCES],
        f"one granted, two refused at the user's share ({[hex(s) for s in statuses]})",
    )
for d in held:
    d.close()
fa.close()
conn_a.disconnect()
conn_b.disconnect()
if FILLER:
    conn_f.disconnect()
print("PASS", flush=True)
