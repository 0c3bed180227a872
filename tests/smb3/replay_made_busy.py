"""A replayed persistent CREATE whose look at how its open was made
(filterd's record of it, a LookupReply) is refused Busy — a moment's
refusal, as filterd gives a view while commits of its scope keep failing
— is told to replay, its open left disconnected: never closed. rksmbd
runs with RKSMBD_TEST_REPLAY_MADE_BUSY, which refuses the first such look
so (re-review rr46b F1: the client's open was closed and the CREATE
answered STATUS_FILE_NOT_AVAILABLE, final for a CREATE; the next replay
ran the OVERWRITE_IF afresh and truncated the file).

Usage: replay_made_busy.py HOST PORT SHARE USER PASSWORD

1. Connection A opens p0 persistent (OVERWRITE_IF) and writes to it;
   A's TCP connection is reset.
2. B (A's client GUID) replays the CREATE: STATUS_SERVER_UNAVAILABLE.
3. B replays it again: SUCCESS with the original (persistent) FileId,
   and p0 reads what A wrote.

Prints PASS, or exits non-zero.
"""

import uuid

import raw_channel
from raw_channel import SERVER_UNAVAILABLE, SUCCESS, check, file_id, final, patient_share, persistent_create, persistent_written, reset, signed_close, signed_read

OVERWRITE_IF = 5

client = uuid.uuid4()
a = patient_share(client)
g = uuid.uuid4()
DATA = b"written before the replay" * 50
fid = persistent_written(a, "p0", g, DATA)
reset(a[0].s)
b = patient_share(client)
st, _ = final(b[0], persistent_create(*b, "p0", g, OVERWRITE_IF, replay=True))
check(st == SERVER_UNAVAILABLE, f"the replay refused Busy is told to replay (got {st:#010x})")
st, m = final(b[0], persistent_create(*b, "p0", g, OVERWRITE_IF, replay=True))
check(st == SUCCESS and file_id(m)[:8] == fid[:8], f"the next replay gets the original open (got {st:#010x})")
st, got = signed_read(*b, file_id(m), len(DATA) + 1)
check(got == DATA, f"p0 holds what A wrote (read {st:#010x}, {len(got)} bytes)")
signed_close(*b, file_id(m))
print(f"PASS ({raw_channel.USER})", flush=True)
