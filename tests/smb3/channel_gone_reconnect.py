"""A client that drops both connections of a multichannel session while
a CREATE sent on the channel waits, at the session's home, for a lease
break acknowledgment reconnects its persistent open at once, and the home
connection lets go of everything it held (rksmbd, raw SMB 3.0.2 and
smbprotocol).

Usage: channel_gone_reconnect.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose break timeout is 30 s or more. Connection A
logs on and opens persist.txt persistent and leased.txt with an RWH
lease; connection B binds the session and sends a CREATE of leased.txt
followed by an ECHO in one compound: forwarded to A, the CREATE breaks
A's lease and waits there for the acknowledgment, serving A's socket
(`Connection::pump`). The client closes both sockets instead. From a new
connection (same client GUID) a DH2C of persist.txt must then succeed
within 15 s, STATUS_FILE_NOT_AVAILABLE (retry) tried again 0.1 s apart.
Before (re-review rr41h F1), B, waiting at A for its CREATE's answer,
still counted as a channel the client could answer on: the CREATE waited
out the break timeout and the DH2C was STATUS_OBJECT_NAME_NOT_FOUND after
1 s, final for the client. And (F2) once the CREATE ended, A's thread —
its socket ended by the pump — waited for its channels' PDUs forever:
it never let its opens go (every DH2C was told to retry, leased.txt
stayed open in filterd) and the thread never ended. Prints "reconnected"
and waits for a line (the driver checks filterd holds persist.txt
alone), closes the open, prints PASS; exits non-zero on any failure.
"""

import struct
import sys
import uuid

from raw_channel import CREATE, ECHO, SUCCESS, bind, check, cmac_sign, create_body, final, leased_create, patient_share, persistent_create, Raw
from smbtest import connect, pause, reconnect_v2_retrying

SERVER = (sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])

guid = uuid.uuid4()
a, sid, key_a, tid = patient_share(guid)
b = Raw(guid)
b.s.settimeout(30)
key_b = bind(b, sid, key_a)
cg = uuid.uuid4()
st, m = final(a, persistent_create(a, sid, key_a, tid, "persist.txt", cg, 5))
check(st == SUCCESS, f"persist.txt opened persistent ({st:#010x})")
fid = m[128:144]
st, _ = final(a, leased_create(a, sid, key_a, tid, "leased.txt", b"A" * 16, 7))
check(st == SUCCESS, f"leased.txt opened with an RWH lease ({st:#010x})")
# On the channel, not the last of its compound: the CREATE waits at the
# home for the acknowledgment, serving the home's socket.
body = create_body("leased.txt")
first = 64 + len(body)
first += -first % 8
create = cmac_sign(key_b, b.header(CREATE, sid, next_command=first, tid=tid) + body + b"\0" * (first - 64 - len(body)))
echo = cmac_sign(key_b, b.header(ECHO, sid) + struct.pack("<HH", 4, 0))
b.send(create + echo)
m = a.recv()
check(struct.unpack_from("<H", m, 12)[0] == 0x12, "the lease break comes on the home connection")
a.s.close()
b.s.close()

_conn2, tree2 = connect(*SERVER, client_guid=guid)
f, st, took = reconnect_v2_retrying(tree2, "persist.txt", fid, cg)
check(f is not None, f"the DH2C succeeds at once ({st:#010x}, {took:.2f} s)")
check(took < 15, f"and well before the break timeout ({took:.2f} s)")
pause("reconnected")
f.close()
print("PASS", flush=True)
