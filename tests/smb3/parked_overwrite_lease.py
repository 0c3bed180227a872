"""A lease granted while a persistent overwrite waits for its intent loses
its read caching when the overwrite empties the file (rksmbd,
smbprotocol; re-review rr45a F2).

Usage: parked_overwrite_lease.py HOST PORT SHARE USER PASSWORD FILTERD_LOG

filterd runs with its first commit stalled (commit.before:1:sleepMS);
parked.txt holds ten bytes. Client A sends a CREATE that overwrites
parked.txt asking only GENERIC_READ, with a persistent handle: filterd
parks it on its intent, whose commit stalls. Once filterd's log says so
(A not answered yet), client B opens the file for reading, sharing all,
asking an RH lease, and is granted RH. Once A's overwrite is answered (the
file emptied), B must be sent a lease break from RH to none asking an
acknowledgment (flags 1), as a write breaks it (MS-FSA 2.1.5.15.4).
Before, B kept RH over the emptied file and was sent nothing. Prints
PASS; exits non-zero on any failure.
"""

import queue
import sys
import threading
import uuid

from server_messages import Requests
from smbprotocol.create_contexts import LeaseState
from smbprotocol.open import FilePipePrinterAccessMask
from smbtest import (
    CreateDisposition,
    SHARE_ALL,
    args,
    check,
    connect,
    create_file,
    lease_context,
    persistent_context,
    wait_stalled,
)

HOST, PORT, SHARE, USER, PASSWORD = args()
LOG = sys.argv[6]
NAME = "parked.txt"
READ = FilePipePrinterAccessMask.GENERIC_READ
RH = LeaseState.SMB2_LEASE_READ_CACHING | LeaseState.SMB2_LEASE_HANDLE_CACHING

_, a_tree = connect(HOST, PORT, SHARE, USER, PASSWORD, uuid.uuid4())
b_conn, b_tree = connect(HOST, PORT, SHARE, USER, PASSWORD, uuid.uuid4())
breaks = queue.Queue()
b_conn.outstanding_requests = Requests(b_conn, breaks, b_conn.outstanding_requests)

answered = queue.Queue()


def overwrite():
    try:
        create_file(
            a_tree,
            NAME,
            READ,
            SHARE_ALL,
            CreateDisposition.FILE_OVERWRITE,
            contexts=[persistent_context(uuid.uuid4())],
        )
        answered.put("ok")
    except Exception as e:  # noqa: BLE001 -- reported by the main thread
        answered.put(f"{e!r}")


threading.Thread(target=overwrite, daemon=True).start()
wait_stalled(LOG, "failpoint commit.before: stalling")
check(answered.empty(), "A's overwrite waits for its intent")
key = uuid.uuid4().bytes
# (Oplock level 0xFF: SMB2_OPLOCK_LEVEL_LEASE.)
_, resp = create_file(b_tree, NAME, READ, SHARE_ALL, contexts=[lease_context(key, RH)], oplock_level=0xFF)
leases = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
check(leases and leases[0]["lease_state"].get_value() == RH, "B holds RH")
a = answered.get(timeout=30)
check(a == "ok", f"A's overwrite succeeds ({a})")
try:
    r = breaks.get(timeout=10)
except queue.Empty:
    check(False, "B was sent a lease break once the file was emptied")
r.response_event.wait(5)
body = r.response["data"].get_value()
flags = int.from_bytes(body[4:8], "little")
got = (int.from_bytes(body[24:28], "little"), int.from_bytes(body[28:32], "little"))
check(body[8:24] == key, "the break names B's lease key")
check(got == (RH, 0), f"a break from RH to none ({got[0]:#x} to {got[1]:#x})")
check(flags == 1, f"an acknowledgment asked (flags {flags:#x})")
print("PASS", flush=True)
