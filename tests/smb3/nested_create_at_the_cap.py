"""A CREATE served while another CREATE of the same connection waits for
a lease break takes a descriptor slot of its own: not the waiting one's
(re-review rr46d F1). Run under `prlimit --nofile=128` (a cap of CAP
opens, which is also each user's share), users USER, bob and eve, all of
password PASSWORD.

Usage: nested_create_at_the_cap.py HOST PORT SHARE USER PASSWORD CAP

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

CAP = int(sys.argv[6])
OVERWRITE_IF = 5
A_LEASE, EVE_LEASE = uuid.uuid4().bytes, uuid.uuid4().bytes

a = patient_share_as(raw_channel.USER, uuid.uuid4())
st, _ = final(a[0], leased_create(*a, "L", A_LEASE, 7))
check(st == SUCCESS, f"A's leased open of L (got {st:#010x})")
bob = patient_share_as("bob", uuid.uuid4())
for i in range(CAP - 2):
    st, _ = final(bob[0], signed_create(*bob, f"bob{i}", 7, OVERWRITE_IF))
    check(st == SUCCESS, f"bob's open {i + 1} (got {st:#010x})")
eve = patient_share_as("eve", uuid.uuid4())
eve[0].send(waiting_compound(*eve, leased_create(*eve, "L", EVE_LEASE, 7)))
brk = break_of(a[0], 20, "A")
st, _ = final(eve[0], signed_create(*eve, "nested", 7, OVERWRITE_IF))
print(f"eve's CREATE while her compound waits: {st:#010x}", flush=True)
check(st == INSUFFICIENT_RESOURCES, f"served inside the wait, it finds the cap full (got {st:#010x})")
a[0].send(ack_pdu(*a[:3], A_LEASE, struct.unpack_from("<I", brk, 64 + 28)[0]))
st, _ = final(eve[0], None)
check(st == SUCCESS, f"eve's waiting CREATE is granted once A acknowledged (got {st:#010x})")
st, _ = final(bob[0], signed_create(*bob, "bob-more", 7, OVERWRITE_IF))
check(st == INSUFFICIENT_RESOURCES, f"the cap holds: bob's next CREATE is refused (got {st:#010x})")
print("PASS", flush=True)
