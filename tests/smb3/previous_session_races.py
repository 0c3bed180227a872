"""A session ended by PreviousSessionId while one of its durable opens
is being kept, or being reconnected, still leaves that open's descriptor
slot to the open's next reconnect (re-review rr48a F3, F4). Run under
`prlimit --nofile=128` (a cap of CAP opens, which is also each user's
share), users USER and bob (password PASSWORD), rksmbd logging at info
into LOG.

Usage: previous_session_races.py HOST PORT SHARE USER PASSWORD CAP LOG MODE [HOLD]

Bob fills the cap but one slot with CAP - 1 opens; connection A (USER)
makes a persistent open p0, the last slot.

MODE `tracked` (rksmbd with `RKSMBD_TEST_TRACKED_HOLD_MS`): A's CREATE
of p0 is held once the session tracks the open; meanwhile a session of
USER on connection B names A's as PreviousSessionId, ending it: p0 is
detached and its slot left for its reconnect. Before, the CREATE then
marked the open A's again and dropped the slot left for it: bob's
CREATE took the slot, and B's DH2C of p0 was refused at the cap.

MODE `chain` (rksmbd with `RKSMBD_TEST_RECONNECT_HOLD_MS`): a session on
B names A's; B's DH2C of p0 is held, and meanwhile a session on
connection C names B's, ending it: the DH2C lands on an ended session
(USER_SESSION_DELETED), the open is detached again — and before, the
slot it had taken went to all: bob's CREATE took it, and C's DH2C of p0
was refused at the cap.

Either way, for 2 s bob's CREATEs take no slot, and the last session's
DH2C of p0 succeeds.

MODE `lost` (rksmbd with `RKSMBD_TEST_TRACKED_HOLD_MS` = HOLD, logging
rksmbd::sessions at debug): A's open d0 is durable, not persistent
(DH2Q under a batch oplock: filterd keeps it in memory only). Its
CREATE is held once tracked, and a session of USER on B names A's,
ending it. The script prints `restart` and waits for a line: the driver
kills filterd and starts it again, which drops d0's handle, and waits
for rksmbd's reattach, which finds it lost. A's CREATE then ends and A
releases the ended session. Before (re-review rr48f L1) the reattach did
not reach a session ended but not yet released, and A's release, its
detach refused, handed d0's slot over for a reconnect that could not
come, until d0's 60 s durable timeout: bob's CREATEs were refused. Now
bob takes the slot within 10 s, and no slot is handed over.

Prints PASS, or exits non-zero.
"""

import sys
import uuid

import raw_channel
from raw_channel import (
    CREATE,
    SUCCESS,
    USER_SESSION_DELETED,
    check,
    dh2c,
    file_id,
    final,
    granted_for,
    log_holds,
    patient_share,
    patient_share_after,
    patient_share_as,
    persistent_create,
    signed_close,
    signed_create,
    until,
    until_granted,
)

CAP, LOG, MODE = int(sys.argv[6]), sys.argv[7], sys.argv[8]
USER = raw_channel.USER
OVERWRITE_IF = 5


def bob_creates(name):
    """Bob's CREATE of `name`: status and message."""
    return final(bob[0], signed_create(*bob, name, 7, OVERWRITE_IF))


client = uuid.uuid4()
a = patient_share(client)
bob = patient_share_as("bob", uuid.uuid4())
raw_channel.USER = USER
bobs = []
for i in range(CAP - 1):
    st, m = bob_creates(f"bob{i}")
    check(st == SUCCESS, f"bob's open {i + 1} (got {st:#010x})")
    bobs.append(file_id(m))

g = uuid.uuid4()
if MODE == "lost":
    import struct
    import time

    from smbtest import durable_v2

    HOLD = int(sys.argv[9]) / 1000
    HANDED = "leaves its descriptor slot for its reconnect"
    a[0].send(signed_create(*a, "d0", 7, OVERWRITE_IF, durable_v2(g).pack(), oplock=9))
    until("A's durable open held once tracked", lambda: log_holds(LOG, "test hook: a durable open is held once tracked"))
    held_at = time.monotonic()
    last = patient_share_after(client, a[1])
    print("restart", flush=True)
    sys.stdin.readline()
    # Else the hold ended before the reattach, and the test proved nothing.
    check(time.monotonic() - held_at < HOLD - 1, "rksmbd reattached while A's CREATE was held")
    # A's CREATE's answer (an oplock break of the lost handle may come first).
    while True:
        m = a[0].recv()
        cmd, st = struct.unpack_from("<H", m, 12)[0], struct.unpack_from("<I", m, 8)[0]
        if cmd == CREATE and st != raw_channel.PENDING:
            break
    print(f"A's CREATE of d0 ended: {st:#010x}", flush=True)
    got = until_granted("bob's CREATE takes the slot of A's lost open", lambda: bob_creates("after"), 10)
    with open(LOG, encoding="utf-8", errors="replace") as f:
        handed = f.read().count(HANDED)
    check(handed == 0, f"no slot handed over for a lost handle ({handed})", fatal=False)
    signed_close(*bob, got)
    # Bob's opens died with filterd (not durable): their CLOSEs answer
    # whatever they answer.
    for f in bobs:
        final(bob[0], raw_channel.close_pdu(*bob, f))
    check(not raw_channel.FAILURES, f"no failures ({raw_channel.FAILURES})")
    print("PASS", flush=True)
    sys.exit(0)
if MODE == "tracked":
    a[0].send(persistent_create(*a, "p0", g, OVERWRITE_IF))
    until("A's open held once tracked", lambda: log_holds(LOG, "test hook: a durable open is held once tracked"))
    last = patient_share_after(client, a[1])
    st, m = final(a[0], None)
    check(st == SUCCESS, f"A's CREATE, tracked before the ending, is granted (got {st:#010x})")
    fid = file_id(m)
else:
    st, m = final(a[0], persistent_create(*a, "p0", g, OVERWRITE_IF))
    check(st == SUCCESS, f"A's persistent open (got {st:#010x})")
    fid = file_id(m)
    b = patient_share_after(client, a[1])
    b[0].send(dh2c(b, "p0", g, fid))
    until("B's DH2C held", lambda: log_holds(LOG, "test hook: a reconnect is held after its settling check"))
    last = patient_share_after(client, b[1])
    st, _ = final(b[0], None)
    check(st == USER_SESSION_DELETED, f"B's DH2C lands on its ended session (got {st:#010x})")

taken = granted_for(2, lambda n: bob_creates(f"more{n}"))
check(not taken, f"bob's CREATEs take no slot left for p0's reconnect (took {len(taken)})", fatal=False)
st, m = final(last[0], dh2c(last, "p0", g, fid))
reopened = st == SUCCESS and file_id(m)[:8] == fid[:8]
check(reopened, f"the last session's DH2C of p0 succeeds (got {st:#010x})", fatal=False)
if reopened:
    signed_close(*last, file_id(m))
for f in taken + bobs:
    signed_close(*bob, f)
check(not raw_channel.FAILURES, f"no failures ({raw_channel.FAILURES})")
print("PASS", flush=True)
