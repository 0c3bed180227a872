"""A CREATE of eve's waiting for a lease break (a compound's: it waits
serving its connection, `Connection::pump`) and the caps. Users USER,
bob and eve, all of password PASSWORD.

Usage: nested_create_at_the_cap.py HOST PORT SHARE USER PASSWORD CAP MODE

MODE `nested`, run under `prlimit --nofile=128` (a cap of CAP opens,
which is also each user's share): a CREATE served while another CREATE
of the same connection waits takes a descriptor slot of its own, not the
waiting one's (re-review rr46d F1).

1. A (USER) opens L under an RWH lease; bob opens CAP - 2 files: one
   slot is left.
2. Eve sends [CREATE L under another lease; ECHO] in one compound: the
   CREATE takes the last slot and waits for A's break acknowledgment,
   serving eve's connection meanwhile (`Connection::pump`).
3. Once A is sent the break, eve CREATEs another file: served inside the
   wait, it must be STATUS_INSUFFICIENT_RESOURCES (before: it used the
   waiting CREATE's slot and was granted, and the waiting CREATE, once
   A acknowledged, forced one: CAP + 1 opens).
4. A acknowledges; eve's compound CREATE is granted, and bob's next
   CREATE is refused.

MODE `share`, CAP the user's share (below the descriptor cap): the
waiting CREATE is checked against the user's share again as it waits
(re-review rr46d F4).
1. A opens L under an RWH lease; eve opens CAP - 1 files on connection 1.
2. Eve sends the compound on connection 2; once A is sent the break, eve
   CREATEs one more file on connection 1: granted, her share reached.
3. A acknowledges: the compound's CREATE must be
   STATUS_INSUFFICIENT_RESOURCES (before: granted, eve one open past her
   share, as many as she had connections waiting so).

Prints PASS, or exits non-zero.
"""

import struct
import sys
import uuid

import raw_channel
from raw_channel import (
    INSUFFICIENT_RESOURCES,
    SUCCESS,
    ack_pdu,
    break_of,
    check,
    final,
    leased_create,
    patient_share_as,
    signed_create,
    waiting_compound,
)

CAP, MODE = int(sys.argv[6]), sys.argv[7]
OVERWRITE_IF = 5
A_LEASE, EVE_LEASE = uuid.uuid4().bytes, uuid.uuid4().bytes

a = patient_share_as(raw_channel.USER, uuid.uuid4())
st, _ = final(a[0], leased_create(*a, "L", A_LEASE, 7))
check(st == SUCCESS, f"A's leased open of L (got {st:#010x})")

def fill(conn, who, n):
    """`n` opens of `who` on `conn`."""
    for i in range(n):
        st, _ = final(conn[0], signed_create(*conn, f"{who}{i}", 7, OVERWRITE_IF))
        check(st == SUCCESS, f"{who}'s open {i + 1} (got {st:#010x})")


def acknowledged(brk):
    """A acknowledges break `brk` to the state it names."""
    a[0].send(ack_pdu(*a[:3], A_LEASE, struct.unpack_from("<I", brk, 64 + 28)[0]))


eve = patient_share_as("eve", uuid.uuid4())
if MODE == "nested":
    bob = patient_share_as("bob", uuid.uuid4())
    fill(bob, "bob", CAP - 2)
    waiting = eve
else:
    fill(eve, "eve", CAP - 1)
    waiting = patient_share_as("eve", uuid.uuid4())
waiting[0].send(waiting_compound(*waiting, leased_create(*waiting, "L", EVE_LEASE, 7)))
brk = break_of(a[0], 20, "A")
st, _ = final(eve[0], signed_create(*eve, "more", 7, OVERWRITE_IF))
print(f"eve's CREATE while her compound waits: {st:#010x}", flush=True)
if MODE == "nested":
    check(st == INSUFFICIENT_RESOURCES, f"served inside the wait, it finds the cap full (got {st:#010x})")
    acknowledged(brk)
    st, _ = final(eve[0], None)
    check(st == SUCCESS, f"eve's waiting CREATE is granted once A acknowledged (got {st:#010x})")
    st, _ = final(bob[0], signed_create(*bob, "bob-more", 7, OVERWRITE_IF))
    check(st == INSUFFICIENT_RESOURCES, f"the cap holds: bob's next CREATE is refused (got {st:#010x})")
else:
    check(st == SUCCESS, f"eve's last open within her share (got {st:#010x})")
    acknowledged(brk)
    st, _ = final(waiting[0], None)
    check(st == INSUFFICIENT_RESOURCES, f"the waiting CREATE finds eve's share full (got {st:#010x})")
print("PASS", flush=True)
