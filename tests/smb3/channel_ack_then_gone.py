"""A lease break acknowledgment sent on a multichannel session's channel
is taken although the channel ends before the session's home serves it
(rksmbd, raw SMB 3.0.2).

Usage: channel_ack_then_gone.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose break timeout is 30 s or more, and an rksmbd
that holds a forwarded acknowledgment until its channel ends
(`RKSMBD_TEST_FORWARDED_ACK_HOLD_MS`). Connection A (client GUID G) logs
on and opens acked.txt with an RWH lease L; connection B (G too) binds
A's session. Client C opens acked.txt: the break of L comes on A (the
oldest connection of G). B acknowledges it: the script prints "channel
port N" (B's local port) and "B acknowledged", and waits for a line (the
driver waits until rksmbd logs that it holds the acknowledgment, at A's
thread). B's socket is then closed: the script prints "B closed" and
waits for a line (the driver waits until rksmbd logs B's socket end).
C's open must then succeed within 10 s, and the break is over: A's own
acknowledgment of it is STATUS_UNSUCCESSFUL (no break in progress).

Before re-review rr42a F2 B's acknowledgment, its channel gone when the
home served it, was refused (STATUS_UNSUCCESSFUL, to nobody): C's open
waited out filterd's break timeout, and A's acknowledgment was the one
taken.
Prints PASS; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import (
    CREATE,
    SUCCESS,
    UNSUCCESSFUL,
    Raw,
    ack,
    ack_pdu,
    break_of,
    check,
    cmac_sign,
    connect_share,
    create_body,
    final,
    leased_on_two_channels,
    signed_close,
)
from smbtest import pause

NAME = "acked.txt"
LKEY = uuid.uuid4().bytes

a, b, sid, key_a, key_b, tid, fid_a = leased_on_two_channels(NAME, LKEY)
c = Raw(uuid.uuid4())
c.s.settimeout(30)
sid_c, key_c, tid_c = connect_share(c)

c.send(cmac_sign(key_c, c.header(CREATE, sid_c, tid=tid_c) + create_body(NAME)))
m = break_of(a, 10, "A (the oldest connection of the client)")
check(m[64 + 8 : 64 + 24] == LKEY, "for lease L")
new_state = struct.unpack_from("<I", m, 64 + 28)[0]
# Not waited for: its answer goes to B's socket, closed by then.
b.send(ack_pdu(b, sid, key_b, LKEY, new_state))
print(f"channel port {b.s.getsockname()[1]}", flush=True)
pause("B acknowledged")
b.s.close()
pause("B closed")

c.s.settimeout(10)
try:
    st, m = final(c, None)
except OSError as e:
    check(False, f"C's open is answered within 10 s, B's acknowledgment taken (nothing: {e!r})")
check(st == SUCCESS, f"C opened {NAME} ({st:#010x})")
st = ack(a, sid, key_a, LKEY, new_state)
check(st == UNSUCCESSFUL, f"A's acknowledgment after B's: STATUS_UNSUCCESSFUL ({st:#010x})")
signed_close(c, sid_c, key_c, tid_c, m[128:144])
signed_close(a, sid, key_a, tid, fid_a)
print("PASS", flush=True)
