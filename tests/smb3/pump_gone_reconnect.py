"""A client whose connection ends while a CREATE of it waits for the
acknowledgment of its own lease's break reconnects its persistent open at
once (rksmbd, raw SMB 3.0.2 and smbprotocol).

Usage: pump_gone_reconnect.py HOST PORT SHARE USER PASSWORD HOW

Run against a filterd whose break timeout is 15 s or more. Opens
persist.txt persistent and leased.txt with an RWH lease, then CREATEs
leased.txt again under another lease key, followed by an ECHO in the same
compound: rksmbd breaks the first lease and, while it waits for the
acknowledgment (not going async: the CREATE is not the compound's last
request), serves this connection's next frames (`Connection::pump`).
Instead of the acknowledgment the client ends the connection, as HOW says:
`eof` closes its socket (the common case), `bad` sends a bad NetBIOS
header first. From a new connection (same client GUID) it then sends a
DH2C of persist.txt at once: it must succeed within 10 s. Before, the old
connection's CREATE waited until filterd's break timeout for an
acknowledgment that could no longer come, its opens counted as held by a
live connection, and the DH2C waited 1 s and failed
STATUS_OBJECT_NAME_NOT_FOUND — final for the client. Prints PASS; exits
non-zero on any failure.
"""

import socket
import struct
import sys
import time
import uuid

from raw_channel import ECHO, PENDING, SUCCESS, check, cmac_sign, final, leased_create, patient_share, persistent_create
from smbtest import connect, reconnect_v2

SERVER = (sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
HOW = sys.argv[6]

guid = uuid.uuid4()
r, sid, key, tid = patient_share(guid)
cg = uuid.uuid4()
st, m = final(r, persistent_create(r, sid, key, tid, "persist.txt", cg, 5))
check(st == SUCCESS, f"persist.txt opened persistent ({st:#010x})")
fid = m[128:144]
st, _ = final(r, leased_create(r, sid, key, tid, "leased.txt", b"A" * 16, 7))
check(st == SUCCESS, f"leased.txt opened with an RWH lease ({st:#010x})")
# Not the last of its compound (an ECHO follows), the CREATE does not go
# async: it waits for the acknowledgment serving the connection.
create = leased_create(r, sid, key, tid, "leased.txt", b"B" * 16, 7)
create += b"\0" * (-len(create) % 8)
create = bytearray(create)
struct.pack_into("<I", create, 20, len(create))
create = cmac_sign(key, bytes(create))
echo = cmac_sign(key, r.header(ECHO, sid, tid=tid) + struct.pack("<HH", 4, 0))
r.send(create + echo)
while True:
    m = r.recv()
    cmd, mid = struct.unpack_from("<H", m, 12)[0], struct.unpack_from("<Q", m, 24)[0]
    if (cmd, mid) == (0x12, 2**64 - 1):
        break
    st = struct.unpack_from("<I", m, 8)[0]
    check(st == PENDING, f"only an interim answer before the break ({st:#010x})")
check(True, "the first lease is broken")
if HOW == "bad":
    r.s.sendall(b"\x81\x00\x00\x44")
r.s.shutdown(socket.SHUT_RDWR)
r.s.close()

t0 = time.monotonic()
_conn2, tree2 = connect(*SERVER, client_guid=guid)
f, st = reconnect_v2(tree2, "persist.txt", fid, cg)
took = time.monotonic() - t0
check(f is not None, f"the DH2C at once succeeds ({st:#010x}, {took:.2f} s)")
check(took < 10, f"and before the break timeout ({took:.2f} s)")
f.close()
print("PASS", flush=True)
