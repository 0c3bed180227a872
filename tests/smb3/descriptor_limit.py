"""rksmbd's opens stay below its descriptor limit (review wB; run under
`prlimit --nofile=LIMIT`).

Usage: descriptor_limit.py HOST PORT SHARE USER PASSWORD LIMIT

1. Client A opens files until a CREATE is refused: the refusal is
   STATUS_INSUFFICIENT_RESOURCES, after some opens and fewer than LIMIT.
   Before, nothing capped them: the table filled (117 opens under 128)
   and the next CREATEs failed STATUS_INTERNAL_ERROR (EMFILE).
2. With A at the cap, client B connects and logs on; its CREATE is
   refused like A's, and gets an open once A closes one. Before, B's
   connection was closed as it came (no descriptor for its writer).
3. A closes everything and opens again as many as before.

Prints PASS, or exits non-zero.
"""

import sys
import uuid

from raw_channel import check, open_file, session
from smbprotocol.exceptions import SMBResponseException

LIMIT = int(sys.argv[6])
INSUFFICIENT_RESOURCES = 0xC000009A


def open_until_refused(tree, tag):
    held = []
    while len(held) <= LIMIT:
        try:
            held.append(open_file(tree, f"{tag}{len(held)}"))
        except SMBResponseException as e:
            return held, e.status
    return held, None


_, _, a = session(uuid.uuid4())
held, refused = open_until_refused(a, "a")
check(refused == INSUFFICIENT_RESOURCES, f"A refused after {len(held)} opens (status {refused:#010x})")
check(10 < len(held) < LIMIT, f"{len(held)} opens held under a limit of {LIMIT}")

_, _, b = session(uuid.uuid4())
check(True, "B connected and logged on with A at the cap")
try:
    open_file(b, "b0")
    got = 0
except SMBResponseException as e:
    got = e.status
check(got == INSUFFICIENT_RESOURCES, f"B's CREATE with A at the cap (status {got:#010x})")
held.pop().close()
f = open_file(b, "b1")
check(True, "B's CREATE once A closed one")
f.close()

for f in held:
    f.close()
again, refused = open_until_refused(a, "c")
check(refused == INSUFFICIENT_RESOURCES and len(again) == len(held) + 1, f"A again: {len(again)} opens")
for f in again:
    f.close()
print("PASS")
