"""A durable reconnect adds no open: it is not refused for the user's share
(review; run under `prlimit --nofile=LIMIT`).

Usage: per_user_reconnects.py HOST PORT SHARE USER PASSWORD SHARE_OF_USER [LOG [TIMEOUT_MS [WITHIN_MS]]]

USER holds SHARE_OF_USER persistent opens on connection A (one more
CREATE is STATUS_INSUFFICIENT_RESOURCES), has connection B ready, resets A
(RST) and at once reconnects every open on B with DH2C: every reconnect
succeeds, though A may not have let its opens go yet (rksmbd counts them
under USER until it does). Before, each was refused
STATUS_INSUFFICIENT_RESOURCES while A still held them. Then one more
fresh CREATE is refused again: the reconnected opens count once. With
LOG (rksmbd's log, its debug lines of rksmbd::sessions in it), the
reconnects wait until A has let every open go, each leaving its slot and
its count under USER for its reconnect: a fresh CREATE of USER's is
refused meanwhile (re-review rr46a F3's fix: a user resetting its
connection keeps no slots past its share), and every reconnect then
takes its open's. With TIMEOUT_MS the opens ask that durable timeout
and none is reconnected: once it has passed, USER's fresh CREATE must
succeed (re-review rr47b F1: the counts left for the reconnects were
given back only when the server's descriptor cap was full, and the user
was refused every CREATE for good). With WITHIN_MS, it must succeed
within that many ms of the opens being left (rksmbd's own deadline,
shortened by RKSMBD_TEST_HANDED_SLOT_MS, well before filterd's timeout:
re-review rr47c F2). Prints PASS, or exits non-zero.
"""

import sys
import time
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition

from raw_channel import reset
from smbtest import args, check, connect, open_rw, persistent_context, reconnect_v2

HOST, PORT, SHARE, USER, PASSWORD = args()
SHARE_OF_USER = int(sys.argv[6])
TIMEOUT_MS = int(sys.argv[8]) if len(sys.argv) > 8 else 60000
WITHIN_MS = int(sys.argv[9]) if len(sys.argv) > 9 else TIMEOUT_MS + 20000
INSUFFICIENT_RESOURCES = 0xC000009A
SERVER = (HOST, PORT, SHARE, USER, PASSWORD)


def refusal(name):
    try:
        open_rw(tree_b, name, CreateDisposition.FILE_OVERWRITE_IF)
    except SMBResponseException as e:
        return e.status
    return 0


conn_a, tree_a = connect(*SERVER)
held = []
for i in range(SHARE_OF_USER):
    guid = uuid.uuid4()
    f = open_rw(tree_a, f"f{i}", CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(guid, TIMEOUT_MS)])
    held.append((f"f{i}", f.file_id, guid))
conn_b, tree_b = connect(*SERVER)
check(refusal("one_more") == INSUFFICIENT_RESOURCES, f"{USER} holds its share, {SHARE_OF_USER} opens")

reset(conn_a.transport._sock)
if len(sys.argv) > 7:
    end = time.monotonic() + 30
    while True:
        with open(sys.argv[7], encoding="utf-8", errors="replace") as log:
            left = log.read().count("leaves its descriptor slot for its reconnect")
        if left >= SHARE_OF_USER:
            break
        check(time.monotonic() < end, f"A's {SHARE_OF_USER} opens left for their reconnects within 30 s ({left})")
        time.sleep(0.02)
    check(refusal("one_more") == INSUFFICIENT_RESOURCES, "the opens left for their reconnects still count under the user's share")
if len(sys.argv) > 8:
    # No reconnect: past the durable timeout the counts are the user's again.
    left_at = time.monotonic()
    while (st := refusal("fresh")) != 0 and time.monotonic() < left_at + WITHIN_MS / 1000:
        time.sleep(0.1)
    check(st == 0, f"a fresh CREATE past the durable timeout succeeds within {WITHIN_MS} ms (got {st:#010x})")
    print(f"ok: the user's fresh CREATE succeeds {time.monotonic() - left_at:.1f} s after its opens were left", flush=True)
    conn_b.disconnect()
    print("PASS", flush=True)
    sys.exit(0)
failed, reopened = [], []
for name, file_id, guid in held:
    f, st = reconnect_v2(tree_b, name, file_id, guid)
    if f is None:
        failed.append((name, hex(st)))
    else:
        reopened.append(f)
check(not failed, f"every reconnect right after the reset succeeds (refused: {failed[:5]})")
check(refusal("one_more") == INSUFFICIENT_RESOURCES, "the reconnected opens count once: still at its share")
for f in reopened:
    f.close()
conn_b.disconnect()
print("PASS", flush=True)
