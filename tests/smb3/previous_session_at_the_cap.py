"""The slots of durable opens left for their reconnects are the
reconnects' — after a PreviousSessionId takeover as after a lost
connection — until the opens' timeout, or until filterd closes the
handles (prevsess48). Run under `prlimit --nofile=128` (a cap of CAP
opens, which is also each user's share), users USER and bob (password
PASSWORD), rksmbd logging rksmbd::sessions at debug into LOG.

Usage: previous_session_at_the_cap.py HOST PORT SHARE USER PASSWORD CAP LOG MODE PID

PID is rksmbd's process id: its descriptors are counted in /proc/PID/fd.

1. Connection A (USER) fills the cap with CAP persistent opens; bob's
   CREATE is STATUS_INSUFFICIENT_RESOURCES.
2. MODE `idle`, `reset`, `pump` or `channel`: on connection B, a new session of
   USER names A's as PreviousSessionId, ending it: A's connection, woken,
   detaches its handles, closes their descriptors, and leaves each
   one's slot and count under USER for its reconnect (a line each in
   LOG). `reset` then
   resets A's TCP connection, `idle` leaves it connected and silent.
   `pump` differs from step 1: bob opens L under an RWH lease, A opens
   CAP - 2 files and sends [CREATE L under another lease; ECHO] in one
   compound, which takes the last slot and waits for bob's break
   acknowledgment serving A's connection (`Connection::pump`); B logs
   on while it waits: two DH2Cs of A's opens on B are told to retry
   (STATUS_FILE_NOT_AVAILABLE, after waiting for A), no slot is handed
   over and rksmbd's descriptors do not grow past B's logon
   (re-review rr48d N1: the slots went to the DH2Cs while A's
   descriptors stayed open, over the cap without bound as such endings
   chained). Bob then acknowledges, A's CREATE ends
   (USER_SESSION_DELETED), and bob takes the slot it gave back.
   `channel` is `pump` with a second session of USER on A, bound on a
   connection X (same client GUID) as a channel, and A's TCP connection
   reset after those DH2Cs, before bob acknowledges: A's waiting CREATE
   ends unanswered, which ends A's main loop, and A's thread goes on
   serving X, which stays bound and silent. It settles the ended session
   all the same (re-review rr48d N2: the loop left without settling, and
   the thread waited for a PDU of X, maybe forever, with the descriptors
   open and the DH2Cs told to retry).
   In every mode the ending's hand-over happens once A closes the
   descriptors (a line each in LOG), and a DH2C told to retry before
   is retried, as a client does.
   In every mode A sends nothing more, and rksmbd closes A's
   descriptors within 10 s: woken, A's connection forgets the ended
   session's opens (before, re-review rr48a F1/F2: in `pump` the wait
   used the wake-up up, and A held the descriptors, their slots handed
   over, until its client's next request; nothing counted them). For
   3 s bob tries to take the slots with CREATEs: every one is refused.
   Then every DH2C of A's opens on B succeeds (before: the ending gave
   the counts back to all, the slots went with A's forgetting of its
   opens, and bob's CREATEs took them — or, A idle, the slots stayed
   A's and every DH2C was refused at the cap), rksmbd holds no more
   descriptors than before B logged on (but B's connection's), bob is
   still refused, and once B closes the opens bob's CREATE succeeds.
   MODE `purge`: A's TCP connection is reset, leaving the slots for the
   reconnects (CAP lines in LOG); bob is refused. The script prints
   `lost` and waits for a line on stdin: the driver purges the
   disconnected handles (`filterctl purge --disconnected`). filterd's
   Purged events give the slots back at once, well before the opens'
   60 s timeout: bob's CREATE succeeds within 10 s.

Prints PASS, or exits non-zero.
"""

import os
import struct
import sys
import time
import uuid

import raw_channel
from raw_channel import (
    FILE_NOT_AVAILABLE,
    Raw,
    bind,
    connect_share,
    INSUFFICIENT_RESOURCES,
    SUCCESS,
    USER_SESSION_DELETED,
    ack_pdu,
    break_of,
    check,
    dh2c,
    file_id,
    final,
    granted_for,
    leased_create,
    patient_share,
    patient_share_after,
    patient_share_as,
    persistent_create,
    reset,
    signed_close,
    signed_create,
    until,
    until_granted,
    waiting_compound,
)

CAP, LOG, MODE, PID = int(sys.argv[6]), sys.argv[7], sys.argv[8], int(sys.argv[9])
USER = raw_channel.USER
OVERWRITE_IF = 5
HANDED = "leaves its descriptor slot for its reconnect"
CHANNEL = MODE == "channel"
PUMP = MODE in ("pump", "channel")
# rksmbd's descriptors B's connection may add (its socket, its inbox's
# pair, and room to spare).
SLACK = 6
# A's opens: in `pump`, bob's leased open and A's waiting CREATE take a
# slot each.
N = CAP - 2 if PUMP else CAP
BOB_LEASE, A_LEASE = uuid.uuid4().bytes, uuid.uuid4().bytes


def fds():
    """How many descriptors rksmbd has open."""
    return len(os.listdir(f"/proc/{PID}/fd"))


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
if CHANNEL:
    # A second session of USER on A, bound on X: A's thread serves X's
    # channel once A's socket has ended.
    sid2, key2, _ = connect_share(a[0])
    x = Raw(client)
    x.s.settimeout(30)
    bind(x, sid2, key2)
bob = patient_share_as("bob", uuid.uuid4())
raw_channel.USER = USER
if PUMP:
    st, _ = final(bob[0], leased_create(*bob, "L", BOB_LEASE, 7))
    check(st == SUCCESS, f"bob's leased open of L (got {st:#010x})")
held = []
for i in range(N):
    g = uuid.uuid4()
    st, m = final(a[0], persistent_create(*a, f"p{i}", g, OVERWRITE_IF))
    check(st == SUCCESS, f"USER's persistent open {i + 1} (got {st:#010x})")
    held.append((f"p{i}", file_id(m), g))
if PUMP:
    a[0].send(waiting_compound(*a, leased_create(*a, "L", A_LEASE, 7)))
    brk = break_of(bob[0], 20, "bob")
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
before = fds()
bconn = patient_share_after(client, asid)
b = bconn[0]
if PUMP:
    # A still waits in its CREATE: its descriptors stay open, their slots
    # with them, and a DH2C of its opens is told to retry once it has
    # waited for A (before, re-review rr48d N1: the slots went to the
    # DH2Cs at once, and rksmbd held both descriptors of each open —
    # without bound, session after session).
    logged_on = fds()
    check(logged_on <= before + SLACK, f"B's logon: {logged_on} descriptors held, {before} before B", fatal=False)
    for name, fid, g in held[:2]:
        st, _ = final(b, dh2c(bconn, name, g, fid))
        check(st == FILE_NOT_AVAILABLE, f"a DH2C while A waits is told to retry (got {st:#010x})", fatal=False)
        check(
            fds() <= logged_on,
            f"rksmbd's descriptors do not grow while A waits: {fds()} held, {logged_on} after B's logon",
            fatal=False,
        )
    check(handed() == 0, f"no slot handed over while A waits ({handed()})", fatal=False)
    if CHANNEL:
        # A's request then ends with nobody to answer, X still bound.
        reset(a[0].s)
    bob[0].send(ack_pdu(*bob[:3], BOB_LEASE, struct.unpack_from("<I", brk, 64 + 28)[0]))
    st, _ = final(bob[0], None)
    check(st == SUCCESS, f"bob acknowledged the break (got {st:#010x})")
    if CHANNEL:
        # At the cap again once A's CREATE has ended: the slot it gave back.
        filled = until_granted("bob takes the slot A's CREATE gave back", lambda: bob_creates("bob_fill"), 10)
    else:
        st, _ = final(a[0], None)
        check(st == USER_SESSION_DELETED, f"A's waiting CREATE ends, its session ended (got {st:#010x})")
        # At the cap again: the slot A's CREATE gave back.
        st, m = bob_creates("bob_fill")
        check(st == SUCCESS, f"bob takes the slot A's CREATE gave back (got {st:#010x})")
        filled = file_id(m)
# Not fatal: the checks below say what a missing hand-over costs.
until_end = time.monotonic() + 10
while handed() < N and time.monotonic() < until_end:
    time.sleep(0.02)
check(handed() >= N, f"the ending left the {N} slots for the reconnects", fatal=False)
if MODE == "reset":
    reset(a[0].s)
print(f"rksmbd's descriptors: {before} before B logged on", flush=True)
# Not fatal either: the DH2Cs below succeed all the same.
until_end = time.monotonic() + 10
while fds() > before - N // 2 and time.monotonic() < until_end:
    time.sleep(0.02)
print(f"rksmbd's descriptors once A's were to close: {fds()}", flush=True)
check(
    fds() <= before - N // 2,
    f"rksmbd closed A's {N} descriptors, A silent (held {before} before B, {fds()} now)",
    fatal=False,
)

taken = granted_for(3, lambda n: bob_creates(f"bob{n}"))
check(not taken, f"bob's CREATEs take none of the slots left for the reconnects (took {len(taken)})", fatal=False)

refused, reopened = [], []
# Told to retry (A not settled yet), retried as a client does — for 20 s
# in all: A never settling, each retry waits 5 s for it.
retry_end = time.monotonic() + 20
for name, fid, g in held:
    while True:
        st, m = final(b, dh2c(bconn, name, g, fid))
        if st != FILE_NOT_AVAILABLE or time.monotonic() >= retry_end:
            break
        time.sleep(0.1)
    if st == SUCCESS and file_id(m)[:8] == fid[:8]:
        reopened.append(file_id(m))
    else:
        refused.append(f"{st:#010x}")
check(not refused, f"every DH2C after PreviousSessionId succeeds (refused {len(refused)}: {refused[:3]})", fatal=False)
check(
    fds() <= before + N // 2,
    f"the DH2Cs' descriptors replace A's: {fds()} held, {before} before B",
    fatal=False,
)
st, _ = bob_creates("bob_after")
check(st == INSUFFICIENT_RESOURCES, f"the cap holds: bob's next CREATE is refused (got {st:#010x})", fatal=False)
for fid in reopened:
    signed_close(*bconn, fid)
for fid in taken:
    signed_close(*bob, fid)
if PUMP:
    signed_close(*bob, filled)
st, m = bob_creates("bob_last")
check(st == SUCCESS, f"the opens closed, bob's CREATE takes a slot (got {st:#010x})", fatal=False)
if st == SUCCESS:
    signed_close(*bob, file_id(m))
check(not raw_channel.FAILURES, f"no failures ({raw_channel.FAILURES})")
print("PASS", flush=True)
