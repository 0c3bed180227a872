"""A logon leg held for its turn leaves its connection's credits alone
(rksmbd; raw SMB 3.0.2). Re-review: the held leg's message id stayed
unused while it waited, pinning the bottom of the credit window; rksmbd
grants ids at most 16,384 past the lowest unused one, so alice's ECHOs
on the same connection ran out of credits 0.12 s after bob's leg was
held and got nothing until it was answered 3 s later.

Usage: logon_held_credits.py HOST PORT SHARE USER PASSWORD

1. USER (alice) logs on; on the same connection bob fails three times.
2. bob's fourth attempt is sent (held for its turn, 1.5 s); alice's
   signed ECHOs, 64 credits each, go on until their message ids are past
   16,448 above bob's: alice never waits for credits while bob's leg is
   held, every ECHO is SUCCESS.
3. bob's leg is answered STATUS_LOGON_FAILURE; alice's connection is
   still served.

Prints one line per step; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import ECHO, FAILURES, MORE_PROCESSING, SESSION_SETUP, SUCCESS, Raw, auth_leg, check, cmac_sign, logon

LOGON_FAILURE = 0xC000006D
# rksmbd's credits::MAX_RANGE, and the charge of each ECHO.
RANGE = 16384
CHARGE = 64


class Counted(Raw):
    """A raw connection that counts the message ids its answers granted."""

    def __init__(self, guid):
        self.end = 1
        super().__init__(guid)

    def recv(self):
        m = Raw.recv(self)
        self.end += struct.unpack_from("<H", m, 14)[0]
        return m


def main():
    r = Counted(uuid.uuid4())
    sid, key = logon(r)
    for n in range(3):
        st, _, pdu = auth_leg(r, "bob", "wrong")
        st = r.call(pdu)[0] if st == MORE_PROCESSING else st
        check(st == LOGON_FAILURE, f"bob's wrong password #{n + 1} is STATUS_LOGON_FAILURE (got {st:#x})", False)
    st, _, pdu = auth_leg(r, "bob", "wrong")
    check(st == MORE_PROCESSING, f"bob's fourth attempt gets its challenge (got {st:#x})")
    held = r.mid
    r.send(pdu)
    bob = None
    echoes, statuses = 0, set()
    while r.mid < held + RANGE + CHARGE:
        if r.mid + CHARGE > r.end:
            check(False, f"alice has credits while bob's leg is held (none after {echoes} ECHOs, ids up to {r.end})")
            break
        r.send(cmac_sign(key, r.header(ECHO, sid, charge=CHARGE) + struct.pack("<HH", 4, 0)))
        m = r.recv()
        if struct.unpack_from("<H", m, 12)[0] == SESSION_SETUP:
            bob = m
            m = r.recv()
        statuses.add(struct.unpack_from("<I", m, 8)[0])
        echoes += 1
    check(statuses <= {SUCCESS}, f"alice's {echoes} ECHOs are SUCCESS ({sorted(map(hex, statuses))})", False)
    if bob is None:
        bob = r.recv()
    st = struct.unpack_from("<I", bob, 8)[0]
    check(st == LOGON_FAILURE, f"bob's leg is answered STATUS_LOGON_FAILURE (got {st:#x})", False)
    check(r.call(cmac_sign(key, r.header(ECHO, sid) + struct.pack("<HH", 4, 0)))[0] == SUCCESS, "alice's connection is still served")

    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
