"""A CREATE of a file whose persistent overwrite waits for filterd's intent
waits for the overwrite and is answered over the emptied file, its lease
with nothing to break (rksmbd, smbprotocol; re-review rr45c N1, rr45a F2).

Usage: parked_overwrite_lease.py HOST PORT SHARE USER PASSWORD FILTERD_LOG

filterd runs with its first commit stalled (commit.before:1:sleepMS, ten
seconds); parked.txt holds ten bytes. Client A sends a CREATE that
overwrites parked.txt asking only GENERIC_READ, with a persistent handle:
filterd parks it on its intent, whose commit stalls. Once filterd's log
says so, client B opens the file for reading, sharing all, asking an RH
lease; filterd logs it held off while A is still unanswered (so it came
inside the window). B's CREATE waits for A's overwrite (rksmbd retries
it as pending): it is answered only after the stall has run for seconds, with
end of file 0 (the overwrite made) and RH, and no lease break follows.
Before, B was answered at once, end of file 10, and its RH had to be
broken once the overwrite landed, which a filterd crash between the
intent and the completion skipped. Prints PASS; exits non-zero on any
failure.
"""

import queue
import sys
import threading
import time
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
stalled = time.monotonic()
check(answered.empty(), "A's overwrite waits for its intent")
key = uuid.uuid4().bytes
b_answered = queue.Queue()


def leased_open():
    try:
        # (Oplock level 0xFF: SMB2_OPLOCK_LEVEL_LEASE.)
        got = create_file(b_tree, NAME, READ, SHARE_ALL, contexts=[lease_context(key, RH)], oplock_level=0xFF)
        b_answered.put((got, time.monotonic()))
    except Exception as e:  # noqa: BLE001 -- reported by the main thread
        b_answered.put((e, time.monotonic()))


threading.Thread(target=leased_open, daemon=True).start()
wait_stalled(LOG, "open held off by a pending change of its file")
check(answered.empty(), "B's CREATE is held off while A's overwrite waits for its intent")
got, at = b_answered.get(timeout=30)
check(isinstance(got, tuple), f"B's CREATE succeeds ({got!r})")
b_open, resp = got
waited = at - stalled
leases = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
check(leases and leases[0]["lease_state"].get_value() == RH, "B holds RH")
check(b_open.end_of_file == 0, f"B sees the file emptied (end of file {b_open.end_of_file})")
# The stall is 10 s: answered at once (before), B took milliseconds.
check(waited > 3, f"B's CREATE waited for A's overwrite ({waited:.1f} s)")
a = answered.get(timeout=30)
check(a == "ok", f"A's overwrite succeeds ({a})")
try:
    r = breaks.get(timeout=3)
    check(False, f"no lease break is due ({r})")
except queue.Empty:
    pass
print("PASS", flush=True)
