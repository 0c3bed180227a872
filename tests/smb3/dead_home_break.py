"""A lease break of a multichannel session's client reaches its channel
once the session's home connection is gone (rksmbd, raw SMB 3.0.2).

Usage: dead_home_break.py HOST PORT SHARE USER PASSWORD MODE

Run against a filterd whose break timeout is 30 s or more. Connection A
(client GUID G) logs on and opens other.txt with an RWH lease L;
connection B (G too) binds A's session. Another client, C3, holds an RWH
lease on held.txt and never acknowledges its break.

MODE says what A does before its socket ends:
- "idle": nothing (A's thread waits for its next PDU).
- "pumping": A sends a CREATE of held.txt followed by an ECHO in one
  compound: the CREATE breaks C3's lease and waits at A for the
  acknowledgment, reading A's socket (`Connection::pump`). C3 being sent
  its break shows the CREATE is waiting.
- "sent": client C4 opens other.txt, and the break of L comes on A
  (the oldest connection of G); A reads it and does not acknowledge.

Then A's socket is closed. The script prints "home port N" (A's local
port) and "A closed", and waits for a line (the driver polls rksmbd's log
for the line that shows A's socket ended there). In "idle" and "pumping"
C4 then opens other.txt. Either way B must be sent the break of L within
10 s — in "sent" the very notification A was sent (same lease key,
epoch and states) — and B's acknowledgment is STATUS_SUCCESS; C4's open
then succeeds. A second acknowledgment of the same break on B is
STATUS_UNSUCCESSFUL (no break in progress) and changes nothing.

Before re-review rr41o 2, in "pumping" the break was routed to A until
A's CREATE returned (filterd's break timeout for C3): it was lost, B saw
nothing. Before the break already sent was sent again ("sent"), B saw
nothing either: filterd lowered L at its break timeout, untold. And
before a forwarded acknowledgment was checked against the channel's
connection, B's was refused (STATUS_UNSUCCESSFUL) in every mode.
Prints PASS; exits non-zero on any failure.
"""

import struct
import sys
import uuid

from raw_channel import (
    CREATE,
    ECHO,
    SUCCESS,
    UNSUCCESSFUL,
    Raw,
    ack,
    break_of,
    check,
    cmac_sign,
    connect_share,
    create_body,
    final,
    leased_create,
    leased_on_two_channels,
    signed_close,
)
from smbtest import pause

MODE = sys.argv[6]
OTHER = f"other-{MODE}.txt"
HELD = f"held-{MODE}.txt"
LKEY = uuid.uuid4().bytes


a, b, sid, key_a, key_b, tid, fid_a = leased_on_two_channels(OTHER, LKEY)
c3 = Raw(uuid.uuid4())
c3.s.settimeout(30)
sid3, key3, tid3 = connect_share(c3)
st, _ = final(c3, leased_create(c3, sid3, key3, tid3, HELD, b"C" * 16, 7))
check(st == SUCCESS, f"C3 opened {HELD} with an RWH lease ({st:#010x})")
c4 = Raw(uuid.uuid4())
c4.s.settimeout(30)
sid4, key4, tid4 = connect_share(c4)
open_other = cmac_sign(key4, c4.header(CREATE, sid4, tid=tid4) + create_body(OTHER))

sent = None
if MODE == "pumping":
    body = create_body(HELD)
    first = 64 + len(body)
    first += -first % 8
    pad = b"\0" * (first - 64 - len(body))
    create = cmac_sign(key_a, a.header(CREATE, sid, next_command=first, tid=tid) + body + pad)
    echo = cmac_sign(key_a, a.header(ECHO, sid) + struct.pack("<HH", 4, 0))
    a.send(create + echo)
    break_of(c3, 10, "C3 (A's CREATE waits for its acknowledgment)")
elif MODE == "sent":
    c4.send(open_other)
    sent = break_of(a, 10, "A (the oldest connection of the client)")
    check(sent[64 + 8 : 64 + 24] == LKEY, "for lease L")
else:
    check(MODE == "idle", f"mode {MODE!r} is idle, pumping or sent")
print(f"home port {a.s.getsockname()[1]}", flush=True)
a.s.close()
pause("A closed")

if sent is None:
    c4.send(open_other)
m = break_of(b, 10, "B (the live channel)")
check(m[64 + 8 : 64 + 24] == LKEY, "for lease L")
if sent is not None:
    check(m[64:] == sent[64:], "the very break A was sent (epoch, flags, key, states)")
new_state = struct.unpack_from("<I", m, 64 + 28)[0]
st = ack(b, sid, key_b, LKEY, new_state)
check(st == SUCCESS, f"B's acknowledgment: STATUS_SUCCESS ({st:#010x})")
st = ack(b, sid, key_b, LKEY, new_state)
check(st == UNSUCCESSFUL, f"acknowledged again: STATUS_UNSUCCESSFUL ({st:#010x})")
st, m = final(c4, None)
check(st == SUCCESS, f"C4 opened {OTHER} ({st:#010x})")
signed_close(c4, sid4, key4, tid4, m[128:144])
# The open of A's session lives on through B.
signed_close(b, sid, key_b, tid, fid_a)
print("PASS", flush=True)
