"""Moves of a client's opens and other users' fresh CREATEs, racing at
the cap of opens, never leave rksmbd holding more than its cap (re-review
rr46a F1, after its attack script). Run under `prlimit --nofile=512`
(cap CAP, each user's share SHARE_OF_USER), users USER, eve and f0..f3,
all of password PASSWORD.

Usage: moves_and_creates_at_the_cap.py HOST PORT SHARE USER PASSWORD CAP SHARE_OF_USER N

USER holds N persistent opens on connection A; f0.. fill the rest of the
cap; eve's CREATE is refused. A's TCP connection is reset and at once
N connections of A's client GUID each send a DH2C of one open (sent
again while told STATUS_FILE_NOT_AVAILABLE), while four connections of
eve's CREATE fresh files without pause. However the race goes, the opens
held in the end (those moved, eve's, the fillers') are at most CAP.
Before, each move let past the cap and landing after its slot was taken
forced one more, and CREATEs of several connections at once each passed
the last slot: 1 to 4 over.

Prints PASS, or exits non-zero.
"""

import sys
import threading
import time
import uuid

from raw_channel import (
    FILE_NOT_AVAILABLE,
    SUCCESS,
    check,
    dh2c,
    file_id,
    final,
    patient_share_as,
    persistent_create,
    reset,
    signed_close,
    signed_create,
)

CAP, SHARE_OF_USER, N = (int(x) for x in sys.argv[6:9])
EVE_CONNECTIONS = 4


client = uuid.uuid4()
a = patient_share_as(sys.argv[4], client)
held = []
for i in range(N):
    g = uuid.uuid4()
    st, m = final(a[0], persistent_create(*a, f"p{i}", g, 5))
    check(st == SUCCESS, f"persistent open p{i} (got {st:#010x})")
    held.append((f"p{i}", g, file_id(m)))
left, u = CAP - N, 0
fillers = []  # kept: a connection dropped closes its opens
while left > 0:
    f = patient_share_as(f"f{u}", uuid.uuid4())
    fillers.append(f)
    for i in range(min(SHARE_OF_USER, left)):
        st, _ = final(f[0], signed_create(*f, f"f{u}_{i}", 7, 5))
        check(st == SUCCESS, f"f{u}'s open {i + 1} (got {st:#010x})")
    left -= min(SHARE_OF_USER, left)
    u += 1
movers = [patient_share_as(sys.argv[4], client) for _ in range(N)]
eves = [patient_share_as("eve", uuid.uuid4()) for _ in range(EVE_CONNECTIONS)]
st, _ = final(eves[0][0], signed_create(*eves[0], "x", 7, 5))
check(st != SUCCESS, f"at the cap, eve's CREATE is refused (got {st:#010x})")

granted = []
stop = threading.Event()
lock = threading.Lock()


def create_without_pause(n, conn):
    k = 0
    while not stop.is_set():
        st, _ = final(conn[0], signed_create(*conn, f"e{n}_{k}", 7, 5))
        k += 1
        if st == SUCCESS:
            with lock:
                granted.append(n)


threads = [threading.Thread(target=create_without_pause, args=(n, c)) for n, c in enumerate(eves)]
reset(a[0].s)
for t in threads:
    t.start()
for b, (name, g, fid) in zip(movers, held):
    b[0].send(dh2c(b, name, g, fid))
moved = {}
for i, (b, (name, g, fid)) in enumerate(zip(movers, held)):
    st, m = final(b[0], None)
    until = time.monotonic() + 15
    while st == FILE_NOT_AVAILABLE and time.monotonic() < until:
        time.sleep(0.05)
        st, m = final(b[0], dh2c(b, name, g, fid))
    if st == SUCCESS:
        moved[i] = file_id(m)
stop.set()
for t in threads:
    t.join()
total = CAP - N + len(moved) + len(granted)
print(f"moved {len(moved)}/{N}, eve granted {len(granted)}: {total} opens (cap {CAP})", flush=True)
check(total <= CAP, f"the opens held stay within the cap ({total} of {CAP})")
# Eve's opens go with her connections: the opens not moved then move
# (as soon as the slots are back), and all are closed.
for e in eves:
    reset(e[0].s)
for i, (b, (name, g, fid)) in enumerate(zip(movers, held)):
    until = time.monotonic() + 15
    while i not in moved:
        st, m = final(b[0], dh2c(b, name, g, fid))
        if st == SUCCESS:
            moved[i] = file_id(m)
        else:
            check(time.monotonic() < until, f"{name} moves once eve is gone (got {st:#010x})")
            time.sleep(0.05)
    signed_close(*b, moved[i])
print("PASS", flush=True)
