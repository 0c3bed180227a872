"""A session binding that completes in a compound read before its
connection's socket ended is refused, and does not keep the session's
home alive (rksmbd, raw SMB 3.0.2 and smbprotocol).

Usage: late_binding.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose break timeout is 30 s or more. Connection A
(client GUID G) logs on (session S) and opens persist.txt persistent;
another client, C3, holds an RWH lease on held.txt and never
acknowledges its break. Connection X (G too) logs on a session of its
own, runs the first leg of a binding of S, then sends, in one compound, a
CREATE of held.txt and the binding's last leg: the CREATE breaks C3's
lease and waits (C3 being sent the break shows it). X's socket is closed
meanwhile. The script prints "binding port N session S" and "X closed",
and waits for a line (the driver polls rksmbd's log until X's socket
ended there and the binding was decided). A then sends a CREATE of
held.txt followed by an ECHO (the CREATE waits for C3's acknowledgment,
reading A's socket) and closes its socket once rksmbd has read them.
From a new connection of G, a DH2C of persist.txt must succeed within
15 s, STATUS_FILE_NOT_AVAILABLE (retry) tried again 0.1 s apart.

Before re-review rr41o 1, the binding finished after X's socket ended and
counted X as a live channel of A for good: A's CREATE waited out the
break timeout, A's opens were never let go, and every DH2C was told to
retry. Prints PASS; exits non-zero on any failure.
"""

import struct
import sys
import time
import uuid

from raw_channel import (
    BINDING,
    CREATE,
    ECHO,
    MORE_PROCESSING,
    SESSION_SETUP,
    SUCCESS,
    Raw,
    check,
    cmac_sign,
    connect_share,
    create_body,
    final,
    leased_create,
    ntlm_context,
    persistent_create,
    server_side_queues,
)
from smbtest import connect, pause, reconnect_v2_retrying

SERVER = (sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
OPLOCK_BREAK = 0x12


def compound_create_then(raw, sid, key, tid, name, then):
    """A signed CREATE of `name` (no lease) chained to PDU `then`."""
    body = create_body(name)
    first = 64 + len(body)
    first += -first % 8
    pad = b"\0" * (first - 64 - len(body))
    return cmac_sign(key, raw.header(CREATE, sid, next_command=first, tid=tid) + body + pad) + then


guid = uuid.uuid4()
a = Raw(guid)
a.s.settimeout(30)
sid, key_a, tid = connect_share(a)
cg = uuid.uuid4()
st, m = final(a, persistent_create(a, sid, key_a, tid, "persist.txt", cg, 5))
check(st == SUCCESS, f"A opened persist.txt persistent ({st:#010x})")
fid = m[128:144]
c3 = Raw(uuid.uuid4())
c3.s.settimeout(30)
sid3, key3, tid3 = connect_share(c3)
st, _ = final(c3, leased_create(c3, sid3, key3, tid3, "held.txt", b"C" * 16, 7))
check(st == SUCCESS, f"C3 opened held.txt with an RWH lease ({st:#010x})")

x = Raw(guid)
x.s.settimeout(30)
sid_x, key_x, tid_x = connect_share(x)
ctx = ntlm_context()
st, tok = x.setup_leg(sid, BINDING, ctx.step(None), key_a)
check(st == MORE_PROCESSING, f"X's binding of S: first leg answered ({st:#010x})")
tok = ctx.step(tok)
leg = struct.pack("<HBBIIHHQ", 25, BINDING, 1, 0, 0, 64 + 24, len(tok), 0) + tok
setup = cmac_sign(key_a, x.header(SESSION_SETUP, sid) + leg)
x.send(compound_create_then(x, sid_x, key_x, tid_x, "held.txt", setup))
c3.s.settimeout(10)
m = c3.recv()
check(struct.unpack_from("<H", m, 12)[0] == OPLOCK_BREAK, "C3 is sent its break: X's CREATE waits")
print(f"binding port {x.s.getsockname()[1]} session {sid}", flush=True)
x.s.close()
pause("X closed")

echo = cmac_sign(key_a, a.header(ECHO, sid) + struct.pack("<HH", 4, 0))
a.send(compound_create_then(a, sid, key_a, tid, "held.txt", echo))
port = a.s.getsockname()[1]


def unread():
    q = server_side_queues(port)
    return q is None or q[1] != 0


deadline = time.monotonic() + 10
while unread() and time.monotonic() < deadline:
    time.sleep(0.01)
check(not unread(), "rksmbd read A's compound")
a.s.close()

_conn2, tree2 = connect(*SERVER, client_guid=guid)
f, st, took = reconnect_v2_retrying(tree2, "persist.txt", fid, cg)
check(f is not None, f"the DH2C succeeds ({st:#010x}, {took:.2f} s)")
check(took < 15, f"well before the break timeout ({took:.2f} s)")
f.close()
print("PASS", flush=True)
