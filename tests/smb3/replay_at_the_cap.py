"""A replayed CREATE at the open cap returns the original open, and takes
no second slot (run under `prlimit --nofile=LIMIT`, whose cap of opens
is also the user's share: CAP).

Usage: replay_at_the_cap.py HOST PORT SHARE USER PASSWORD CAP

1. Connection A opens CAP files persistent (create GUIDs of its own);
   one more CREATE is STATUS_INSUFFICIENT_RESOURCES.
2. On A, CREATEs of two of them sent again with
   SMB2_FLAGS_REPLAY_OPERATION and the same create GUID each return the
   original FileId. Before, the caps were checked before the replay was
   known: STATUS_INSUFFICIENT_RESOURCES, and the client lost the handle
   it had been granted (invariant 2). Still at the cap afterwards: the
   replays took no slot.
3. A failover: A's TCP connection is reset and at once, from connections
   B and B2 (same client GUID), the first open is reconnected with DH2C
   (on B) and the last one's CREATE replayed (on B2) together, then every
   other open reconnected on B, while A may still hold them (it lets them
   go one by one, a commit each). Each
   returns its original FileId (a DH2C told STATUS_FILE_NOT_AVAILABLE, A
   still letting go, is sent again, as a client does). Before, each was
   refused STATUS_INSUFFICIENT_RESOURCES while A held its descriptor.
4. A CLOSE on B and, sent right behind it on connection C, a replay of
   that open's CREATE: the replay fails, returns the original FileId, or
   — the open closed first, the replay made a fresh open as MS-SMB2 has
   it — returns a new one, within the caps: one more CREATE is refused
   while it is held, CAP opens in all (re-review rr46a F2; the race at
   the cap itself is moves_at_the_cap.py's). And once everything is
   closed exactly CAP fresh opens fit again — no slot leaked, none
   counted twice.

Prints PASS, or exits non-zero.
"""

import sys
import time
import uuid

from raw_channel import (
    FILE_NOT_AVAILABLE,
    INSUFFICIENT_RESOURCES,
    SUCCESS,
    check,
    close_pdu,
    dh2c,
    file_id,
    final,
    patient_share,
    persistent_create,
    reset,
    signed_close,
    signed_create,
)

CAP = int(sys.argv[6])
OVERWRITE_IF = 5


def refused_one_more(conn, what):
    st, _ = final(conn[0], signed_create(*conn, "one_more", 7, OVERWRITE_IF))
    check(st == INSUFFICIENT_RESOURCES, f"{what}: one more CREATE refused (got {st:#010x})")


def replayed(conn, name, guid, fid, what, width=16, answer=None):
    """Replays the CREATE of open `fid` (unless `answer`, the status and
    message of the replay sent already): its FileId (the persistent half,
    `width` 8, on another connection) must come back."""
    st, m = answer or final(conn[0], persistent_create(*conn, name, guid, OVERWRITE_IF, replay=True))
    check(st == SUCCESS, f"{what}: replay of {name} succeeds (got {st:#010x})")
    check(file_id(m)[:width] == fid[:width], f"{what}: replay of {name} returns the original FileId")
    return file_id(m)


def reconnected(conn, name, guid, fid, answer=None):
    """Reconnects open `fid` (`answer`: the status and message of the
    DH2C sent already), again while it is told STATUS_FILE_NOT_AVAILABLE:
    its persistent FileId must come back."""
    until = time.monotonic() + 15
    st, m = answer or final(conn[0], dh2c(conn, name, guid, fid))
    while st == FILE_NOT_AVAILABLE and time.monotonic() < until:
        time.sleep(0.05)
        st, m = final(conn[0], dh2c(conn, name, guid, fid))
    check(st == SUCCESS, f"DH2C of {name} succeeds (got {st:#010x})")
    check(file_id(m)[:8] == fid[:8], f"DH2C of {name} returns the original persistent FileId")
    return file_id(m)


def fill(conn, tag):
    """Opens CAP files on `conn`, and checks the next is refused."""
    fids = []
    for i in range(CAP):
        st, m = final(conn[0], signed_create(*conn, f"{tag}{i}", 7, OVERWRITE_IF))
        check(st == SUCCESS, f"fresh open {i + 1} of {CAP} (got {st:#010x})")
        fids.append(file_id(m))
    refused_one_more(conn, f"{CAP} fresh opens")
    return fids


client = uuid.uuid4()
ra, sa, ka, ta = patient_share(client)
a = (ra, sa, ka, ta)
held = []
for i in range(CAP):
    g = uuid.uuid4()
    st, m = final(ra, persistent_create(*a, f"p{i}", g, OVERWRITE_IF))
    check(st == SUCCESS, f"persistent open {i + 1} (got {st:#010x})")
    held.append((f"p{i}", g, file_id(m)))
refused_one_more(a, f"A holds {CAP} opens")

for name, g, fid in (held[0], held[-1]):
    for _ in range(3):
        replayed(a, name, g, fid, "on A at the cap")
refused_one_more(a, "after the replays")

b, b2 = patient_share(client), patient_share(client)
reset(ra.s)
(n0, g0, f0), (n1, g1, f1) = held[0], held[-1]
b[0].send(dh2c(b, n0, g0, f0))
b2[0].send(persistent_create(*b2, n1, g1, OVERWRITE_IF, replay=True))
moved = [(b, n0, g0, reconnected(b, n0, g0, f0, final(b[0], None)))]
f1 = replayed(b2, n1, g1, f1, "on B2 after A's reset", width=8, answer=final(b2[0], None))
moved.append((b2, n1, g1, f1))
moved += [(b, name, g, reconnected(b, name, g, fid)) for name, g, fid in held[1:-1]]
refused_one_more(b, "the moved opens count once")

c = patient_share(client)
_, name, g, fid = moved[0]
b[0].send(close_pdu(*b, fid))
st_replay, m = final(c[0], persistent_create(*c, name, g, OVERWRITE_IF, replay=True))
st_close, _ = final(b[0], None)
check(st_close == SUCCESS, f"B's CLOSE (got {st_close:#010x})")
print(f"the replay beside the CLOSE: {st_replay:#010x}", flush=True)
if st_replay == SUCCESS and file_id(m) != fid:
    refused_one_more(c, "a replay made a fresh open")
if st_replay == SUCCESS:
    signed_close(*c, file_id(m))
for conn, _, _, fid in moved[1:]:
    signed_close(*conn, fid)
fids = fill(b, "n")
for fid in fids:
    signed_close(*b, fid)
print("PASS", flush=True)
