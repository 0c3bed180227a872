"""The slots of durable opens left for their reconnects are the
reconnects' — after a PreviousSessionId takeover as after a lost
connection — until the opens' timeout, or until filterd closes the
handles (prevsess48). Run under `prlimit --nofile=128` (a cap of CAP
opens, which is also each user's share), users USER and bob (password
PASSWORD), rksmbd logging rksmbd::sessions at debug into LOG.

Usage: previous_session_at_the_cap.py HOST PORT SHARE USER PASSWORD CAP LOG MODE

1. Connection A (USER) fills the cap with CAP persistent opens; bob's
   CREATE is STATUS_INSUFFICIENT_RESOURCES.
2. MODE `idle` or `reset`: on connection B, a new session of USER names
   A's as PreviousSessionId, ending it: its handles are detached in
   filterd, and each one's descriptor slot and count under USER are left
   for its reconnect (CAP lines in LOG). `reset` then resets A's TCP
   connection, `idle` leaves it connected and silent. For 3 s bob tries
   to take the slots with CREATEs: every one is refused. Then every DH2C
   of A's opens on B succeeds (before: the ending gave the counts back
   to all, the slots went with A's forgetting of its opens, and bob's
   CREATEs took them — or, A idle, the slots stayed A's and every DH2C
   was refused at the cap), bob is still refused, and once B closes the
   opens bob's CREATE succeeds.
   MODE `purge`: A's TCP connection is reset, leaving the slots for the
   reconnects (CAP lines in LOG); bob is refused. The script prints
   `lost` and waits for a line on stdin: the driver purges the
   disconnected handles (`filterctl purge --disconnected`). filterd's
   Purged events give the slots back at once, well before the opens'
   60 s timeout: bob's CREATE succeeds within 10 s.

Prints PASS, or exits non-zero.
"""

import sys
import time
import uuid

import raw_channel
from raw_channel import (
    INSUFFICIENT_RESOURCES,
    SUCCESS,
    check,
    dh2c,
    file_id,
    final,
    patient_share,
    patient_share_after,
    patient_share_as,
    persistent_create,
    reset,
    signed_close,
    signed_create,
    until,
    until_granted,
)

CAP, LOG, MODE = int(sys.argv[6]), sys.argv[7], sys.argv[8]
USER = raw_channel.USER
OVERWRITE_IF = 5
HANDED = "leaves its descriptor slot for its reconnect"


def handed():
    """How many slots rksmbd's log says were left for reconnects."""
    with open(LOG, encoding="utf-8", errors="replace") as f:
        return f.read().count(HANDED)


def bob_creates(name):
    """Bob's CREATE of `name`: status and message."""
    return final(bob[0], signed_create(*bob, name, 7, OVERWRITE_IF))


client = uuid.uuid4()
a = patient_share(client)
asid = a[1]
held = []
for i in range(CAP):
    g = uuid.uuid4()
    st, m = final(a[0], persistent_create(*a, f"p{i}", g, OVERWRITE_IF))
    check(st == SUCCESS, f"USER's persistent open {i + 1} (got {st:#010x})")
    held.append((f"p{i}", file_id(m), g))
bob = patient_share_as("bob", uuid.uuid4())
st, _ = bob_creates("bob0")
check(st == INSUFFICIENT_RESOURCES, f"at the cap, bob's CREATE is refused (got {st:#010x})")

if MODE == "purge":
    reset(a[0].s)
    until(f"the {CAP} slots left for the reconnects", lambda: handed() >= CAP)
    st, _ = bob_creates("bob1")
    check(st == INSUFFICIENT_RESOURCES, f"bob's CREATE does not take a slot left for a reconnect (got {st:#010x})")
    print("lost", flush=True)
    sys.stdin.readline()
    got = until_granted("bob's CREATE takes a slot the purge gave back", lambda: bob_creates("bob2"), 10)
    signed_close(*bob, got)
    print("PASS", flush=True)
    sys.exit(0)

# B: a new session of USER naming A's as PreviousSessionId.
raw_channel.USER = USER
bconn = patient_share_after(client, asid)
b = bconn[0]
# Not fatal: the checks below say what a missing hand-over costs.
until_end = time.monotonic() + 10
while handed() < CAP and time.monotonic() < until_end:
    time.sleep(0.02)
check(handed() >= CAP, f"the ending left the {CAP} slots for the reconnects", fatal=False)
if MODE == "reset":
    reset(a[0].s)

taken = []
end = time.monotonic() + 3
n = 0
while time.monotonic() < end:
    n += 1
    st, m = bob_creates(f"bob{n}")
    if st == SUCCESS:
        taken.append(file_id(m))
check(not taken, f"bob's CREATEs take none of the slots left for the reconnects (took {len(taken)})", fatal=False)

refused, reopened = [], []
for name, fid, g in held:
    st, m = final(b, dh2c(bconn, name, g, fid))
    if st == SUCCESS and file_id(m)[:8] == fid[:8]:
        reopened.append(file_id(m))
    else:
        refused.append(f"{st:#010x}")
check(not refused, f"every DH2C after PreviousSessionId succeeds (refused {len(refused)}: {refused[:3]})", fatal=False)
st, _ = bob_creates("bob_after")
check(st == INSUFFICIENT_RESOURCES, f"the cap holds: bob's next CREATE is refused (got {st:#010x})", fatal=False)
for fid in reopened:
    signed_close(*bconn, fid)
for fid in taken:
    signed_close(*bob, fid)
st, m = bob_creates("bob_last")
check(st == SUCCESS, f"the opens closed, bob's CREATE takes a slot (got {st:#010x})", fatal=False)
if st == SUCCESS:
    signed_close(*bob, file_id(m))
check(not raw_channel.FAILURES, f"no failures ({raw_channel.FAILURES})")
print("PASS", flush=True)
