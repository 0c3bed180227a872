"""A reconnect or replay that the caps let past while another connection
held its open, landing after that connection let the open go and another
user's CREATE took the slot it gave back, is refused: not granted past
the descriptor cap (re-review rr46a F1, F2). Run under
`prlimit --nofile=128` (a cap of CAP opens, which is also each user's
share), users USER, bob and eve, all of password PASSWORD.

Usage: moves_at_the_cap.py HOST PORT SHARE USER PASSWORD CAP LOG MODE

LOG is rksmbd's log, MODE `rejoin` (its debug lines of
rksmbd::sessions in LOG), `dh2c` (rksmbd run with
RKSMBD_TEST_MOVE_HOLD_MS, and RKSMBD_TEST_HANDED_SLOT_MS=1 in both dh2c
modes: the slot A's connection leaves for p0's reconnect is given back
at once, as one past its time), `dh2c-landing` (the same, and
RKSMBD_TEST_LETTING_GO_HOLD_MS and RKSMBD_TEST_MOVE_LANDING_HOLD_MS: the
DH2C resumes while A's connection, its handle detached, still holds the
open and its slot, and lands after A let go and eve took the slot —
re-review rr46d F3: checked right after the resume, it was not checked
at all), `replay` (RKSMBD_TEST_REPLAY_CLAIM_DELAY_MS) or `replay-early`
(RKSMBD_TEST_REPLAY_ASK_HOLD_MS: the replay is held before it first asks
filterd, re-review rr46e F1).

1. Connection A opens p0 persistent; bob fills the cap (CAP - 1 opens);
   eve's CREATE is STATUS_INSUFFICIENT_RESOURCES.
2. rejoin: A's TCP connection is reset, and rksmbd's connection lets p0
   go, leaving its slot for p0's reconnect: eve's CREATE is refused
   still, and B's (A's client GUID) DH2C of p0 reconnects it (before:
   the slot was given back to all, eve's CREATE took it and the DH2C
   was refused at the cap — re-review rr46a F3). Once B closes p0,
   eve's CREATE takes the slot.
   dh2c: B (A's client GUID) sends a DH2C of p0 — let past the caps,
   A holding the open — held after its check (the script waits for the
   hook's line in LOG). A's TCP connection is reset, and eve's CREATE
   tried until it takes the slot A gave back. The DH2C must not succeed
   (before: it did, rksmbd one open over its cap for as long as both
   stayed open). Once eve closes, it does, with the original FileId.
   replay: B replays p0's CREATE — let past the caps, A holding the
   open — held before its claim. A CLOSEs p0 and eve's CREATE takes its
   slot. The replay must fail or return the original FileId (before:
   filterd opened the file anew for it, past the cap), and a failed one
   must leave p0's data as A wrote it (before: refused only after
   filterd ran its OVERWRITE_IF anew, p0 was truncated — re-review
   rr46d F2).
   replay-early: the same, the replay held before filterd is first
   asked: A's CLOSE leaves no open to resume, so the replay is a fresh
   open at the cap, refused STATUS_INSUFFICIENT_RESOURCES with p0's data
   as A wrote it (before: filterd ran its OVERWRITE_IF anew, and the
   replay was refused STATUS_FILE_NOT_AVAILABLE all the same, p0
   truncated — re-review rr46e F1).
3. Either way the cap holds: one more CREATE of eve's is refused.

Prints PASS, or exits non-zero.
"""

import sys
import uuid

import raw_channel
from raw_channel import (
    FILE_NOT_AVAILABLE,
    INSUFFICIENT_RESOURCES,
    SUCCESS,
    check,
    dh2c,
    file_id,
    final,
    patient_share_as,
    persistent_create,
    persistent_written,
    reset,
    signed_close,
    signed_create,
    signed_read,
    until,
    until_granted,
)

CAP, LOG, MODE = int(sys.argv[6]), sys.argv[7], sys.argv[8]
DH2C = MODE.startswith("dh2c")
USER = raw_channel.USER
OVERWRITE_IF = 5


def logged(line):
    """Whether rksmbd's log holds `line`."""
    with open(LOG, encoding="utf-8", errors="replace") as f:
        return line in f.read()


def eve_creates(name):
    """Eve's CREATE of `name`: status and message."""
    return final(eve[0], signed_create(*eve, name, 7, OVERWRITE_IF))


client = uuid.uuid4()
a = patient_share_as(USER, client)
g = uuid.uuid4()
DATA = b"written before the replay" * 50
fid = persistent_written(a, "p0", g, DATA)
bob = patient_share_as("bob", uuid.uuid4())
for i in range(CAP - 1):
    st, _ = final(bob[0], signed_create(*bob, f"bob{i}", 7, OVERWRITE_IF))
    check(st == SUCCESS, f"bob's open {i + 1} (got {st:#010x})")
eve = patient_share_as("eve", uuid.uuid4())
st, _ = eve_creates("eve0")
check(st == INSUFFICIENT_RESOURCES, f"at the cap, eve's CREATE is refused (got {st:#010x})")
b = patient_share_as(USER, client)

if MODE == "rejoin":
    reset(a[0].s)
    until("p0's slot left for its reconnect", lambda: logged("leaves its descriptor slot for its reconnect"))
    st, _ = eve_creates("eve1")
    check(st == INSUFFICIENT_RESOURCES, f"eve's CREATE does not take the slot left for p0's reconnect (got {st:#010x})")
    st, m = final(b[0], dh2c(b, "p0", g, fid))
    check(st == SUCCESS and file_id(m)[:8] == fid[:8], f"the DH2C reconnects p0 at the cap (got {st:#010x})")
    st, _ = eve_creates("eve2")
    check(st == INSUFFICIENT_RESOURCES, f"the cap holds: eve's next CREATE is refused (got {st:#010x})")
    signed_close(*b, file_id(m))
    st, m = eve_creates("eve3")
    check(st == SUCCESS, f"p0 closed, eve's CREATE takes its slot (got {st:#010x})")
    signed_close(*eve, file_id(m))
    print("PASS", flush=True)
    sys.exit(0)

if DH2C:
    b[0].send(dh2c(b, "p0", g, fid))
    until("the DH2C held after its caps check", lambda: logged("test hook: a move is held after its caps check"))
    reset(a[0].s)
else:
    b[0].send(persistent_create(*b, "p0", g, OVERWRITE_IF, replay=True))
    hook = {
        "replay": "a replay is held before its claim",
        "replay-early": "a replay past the caps is held before it asks filterd",
    }[MODE]
    until(f"the replay held ({hook})", lambda: logged(f"test hook: {hook}"))
    signed_close(*a, fid)

taken = until_granted("eve's CREATE takes the slot given back", lambda: eve_creates("eve1"))
st, m = final(b[0], None)
print(f"the {MODE} landing at the cap: {st:#010x}", flush=True)
if DH2C:
    check(st == FILE_NOT_AVAILABLE, f"the DH2C landing at the cap is told to retry (got {st:#010x})")
else:
    check(st != SUCCESS or file_id(m) == fid, "the replay fails or returns the original open")
    if MODE == "replay-early":
        check(st == INSUFFICIENT_RESOURCES, f"a replay with no open left to resume is a fresh open, refused at the cap (got {st:#010x})")
    replayed = st == SUCCESS
st, _ = eve_creates("eve2")
check(st == INSUFFICIENT_RESOURCES, f"the cap holds: eve's next CREATE is refused (got {st:#010x})")
signed_close(*eve, taken)
if DH2C:
    st, m = final(b[0], dh2c(b, "p0", g, fid))
    check(st == SUCCESS and file_id(m)[:8] == fid[:8], f"the DH2C again, below the cap, reconnects (got {st:#010x})")
    signed_close(*b, file_id(m))
elif not replayed:
    st, m = final(eve[0], signed_create(*eve, "p0", 7, 1))
    check(st == SUCCESS, f"p0 opened again (got {st:#010x})")
    st, got = signed_read(*eve, file_id(m), len(DATA) + 1)
    check(got == DATA, f"the refused replay left p0's data (read {st:#010x}, {len(got)} bytes)")
    signed_close(*eve, file_id(m))
print("PASS", flush=True)
