"""A connection rksmbd ends while one of its requests waits for a lease
break acknowledgment ends at once, not when that wait does (rksmbd, raw
SMB 3.0.2).

Usage: pump_ended.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose break timeout is 15 s or more. Opens
leased.txt with an RWH lease, then CREATEs it again under another lease
key, followed by an ECHO in the same compound: rksmbd breaks the first
lease and, while it waits for the acknowledgment (not going async: the
CREATE is not the compound's last request), serves this connection's next
frames (`Connection::pump`). Instead of the
acknowledgment the client sends a bad NetBIOS header (a session request,
0x81), which ends the connection:
the client must see its end within 5 s. Before, rksmbd dropped only its
reader's share of the socket; the writer's copies (lease breaks, the
client's other channels) held it open, unregistered in the frontend's
client gate — a let-go (filterd stepping down) missed it too — until the
CREATE's wait was over. Prints PASS; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import PENDING, SUCCESS, check, final, leased_create, patient_share, waiting_compound

r, sid, key, tid = patient_share(uuid.uuid4())
st, _ = final(r, leased_create(r, sid, key, tid, "leased.txt", b"A" * 16, 7))
check(st == SUCCESS, f"leased.txt opened with an RWH lease ({st:#010x})")
# Not the last of its compound (an ECHO follows), the CREATE does not go
# async: it waits for the acknowledgment serving the connection.
create = leased_create(r, sid, key, tid, "leased.txt", b"B" * 16, 7)
r.send(waiting_compound(r, sid, key, tid, create))
while True:
    m = r.recv()
    cmd, mid = struct.unpack_from("<H", m, 12)[0], struct.unpack_from("<Q", m, 24)[0]
    if (cmd, mid) == (0x12, 2**64 - 1):
        break
    st = struct.unpack_from("<I", m, 8)[0]
    check(st == PENDING, f"only an interim answer before the break ({st:#010x})")
check(True, "the first lease is broken")
r.s.sendall(b"\x81\x00\x00\x44")
# What comes before the end may only be the CREATE's interim answer.
r.s.settimeout(5)
try:
    while True:
        m = r.recv()
        st = struct.unpack_from("<I", m, 8)[0]
        check(st == PENDING, f"only an interim answer before the end ({st:#010x})")
except (EOFError, ConnectionResetError):
    check(True, "the connection ends at once, not when the CREATE's wait does")
except OSError as e:
    check(False, f"the connection ends at once, not when the CREATE's wait does ({e!r})")
print("PASS", flush=True)
