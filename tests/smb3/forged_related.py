"""A forged request is refused unsigned wherever it stands in a compound
(MS-SMB2 3.3.5.2.4 comes before 3.3.5.2.7; rksmbd; raw SMB 3.0.2).

Usage: forged_related.py HOST PORT SHARE USER PASSWORD

The share holds big.bin (3 MiB). On one signed connection, each of these
READs carries SMB2_FLAGS_SIGNED and a zero signature:
- alone, flagged related (the first of its PDU);
- related, after a rightly signed CREATE that fails;
- related, after rightly signed READs whose answers passed the compound
  bound (STATUS_INSUFFICIENT_RESOURCES for any READ after them).
Each must be STATUS_ACCESS_DENIED with an unsigned response. Before, the
first answered STATUS_INVALID_PARAMETER, the second the CREATE's status,
the third STATUS_INSUFFICIENT_RESOURCES, every one signed with the
session's key: anyone on the wire got server-signed responses for the
message ids and commands they chose. Then a rightly signed ECHO still
succeeds.

Then a forged CANCEL: one open of big.bin holds an exclusive lock of its
first byte, another's blocking LOCK of it pends (STATUS_PENDING); a
CANCEL of that LOCK (by AsyncId) flagged signed with a garbage signature
must be dropped unanswered: a signed ECHO is answered next (not the LOCK
with STATUS_CANCELLED, as before), and once the holder unlocks the
pending LOCK is granted. Prints one line per step and PASS; exits
non-zero on any failure.
"""

import struct
import sys

from raw_channel import FAILURES, CREATE, ECHO, FLAG_SIGNED, READ, SUCCESS, SignedClient, charge_for, check, cmac_sign, create_body

FLAG_RELATED = 0x4
FLAG_ASYNC = 0x2
LOCK, CANCEL = 0xA, 0xC
LOCK_EXCLUSIVE, LOCK_UNLOCK, LOCK_FAIL_IMMEDIATELY = 0x2, 0x4, 0x10
PENDING = 0x103
ACCESS_DENIED = 0xC0000022
MIB = 1 << 20

c = SignedClient()


def read_body(size, fid=b"\xff" * 16):
    return struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, size, 0, fid, 0, 0, 0, 0, 0) + b"\0"


def forged(msg):
    """`msg` flagged related and signed, its signature left zero."""
    m = bytearray(msg)
    struct.pack_into("<I", m, 16, struct.unpack_from("<I", m, 16)[0] | FLAG_SIGNED | FLAG_RELATED)
    return bytes(m)


def compound(msgs):
    """Sends `msgs` (cmd, body, charge, forge) as one PDU, the rightly
    signed ones signed; the (status, flags, signature) of each answer."""
    pdu = b""
    for i, (cmd, body, charge, forge) in enumerate(msgs):
        last = i + 1 == len(msgs)
        n = 64 + len(body)
        padded = n if last else (n + 7) // 8 * 8
        hdr = c.raw.header(cmd, c.sid, next_command=0 if last else padded, tid=c.tid, charge=charge)
        msg = hdr + body + b"\0" * (padded - n)
        pdu += forged(msg) if forge else cmac_sign(c.key, msg)
    c.raw.send(pdu)
    c.raw.s.settimeout(60)
    r = c.raw.recv()
    answers, off = [], 0
    while True:
        st, flags = struct.unpack_from("<I", r, off + 8)[0], struct.unpack_from("<I", r, off + 16)[0]
        answers.append((st, flags, r[off + 48 : off + 64]))
        nxt = struct.unpack_from("<I", r, off + 20)[0]
        if nxt == 0:
            return answers
        off += nxt


def refused_unsigned(answer, what):
    st, flags, sig = answer
    check(st == ACCESS_DENIED, f"{what}: ACCESS_DENIED (got {st:#010x})", fatal=False)
    check(flags & FLAG_SIGNED == 0 and sig == b"\0" * 16, f"{what}: answered unsigned (flags {flags:#x})", fatal=False)


answers = compound([(READ, read_body(5), 1, True)])
refused_unsigned(answers[0], "a forged first request flagged related")

answers = compound([(CREATE, create_body("missing.bin", disposition=1), 1, False), (READ, read_body(5), 1, True)])
check(answers[0][0] != SUCCESS, f"the CREATE of a missing file failed (got {answers[0][0]:#010x})")
refused_unsigned(answers[1], "a forged related request after a failed CREATE")

st, r = c.call(CREATE, create_body("big.bin", access=0x80000000, disposition=1))
check(st == SUCCESS, f"big.bin opened (got {st:#010x})")
big = r[64 + 64 : 64 + 80]
reads = [(READ, read_body(MIB, big), charge_for(MIB), False)] * 3
answers = compound(reads + [(READ, read_body(5), 1, True)])
check(
    [a[0] for a in answers[:3]].count(SUCCESS) < 3,
    "the compound's READs passed its bound",
)
refused_unsigned(answers[3], "a forged related request past the compound bound")

st, _ = c.call(ECHO, struct.pack("<HH", 4, 0))
check(st == SUCCESS, f"a rightly signed ECHO still succeeds (got {st:#010x})")


def lock_body(fid, flags):
    """A LOCK of byte 0 of `fid` with `flags`."""
    return struct.pack("<HHI16sQQII", 48, 1, 0, fid, 0, 1, flags, 0)


def open_big():
    st, r = c.call(CREATE, create_body("big.bin", disposition=1))
    check(st == SUCCESS, f"big.bin opened for writing (got {st:#010x})")
    return r[64 + 64 : 64 + 80]


holder, waiter = open_big(), open_big()
st, _ = c.call(LOCK, lock_body(holder, LOCK_EXCLUSIVE | LOCK_FAIL_IMMEDIATELY))
check(st == SUCCESS, f"the holder locks byte 0 (got {st:#010x})")
lock_mid = c.raw.mid
c.send(LOCK, lock_body(waiter, LOCK_EXCLUSIVE))
st, r = c.recv()
check(st == PENDING, f"the blocking LOCK pends (got {st:#010x})")
async_id = struct.unpack_from("<Q", r, 32)[0]
cancel = struct.pack(
    "<4sHHIHHIIQQQ16s", b"\xfeSMB", 64, 0, 0, CANCEL, 0, FLAG_ASYNC | FLAG_SIGNED, 0, lock_mid, async_id, c.sid, b"\x5a" * 16
) + struct.pack("<HH", 4, 0)
c.raw.send(cancel)
c.send(ECHO, struct.pack("<HH", 4, 0))
st, r = c.recv()
cmd = struct.unpack_from("<H", r, 12)[0]
check(cmd == ECHO and st == SUCCESS, f"a forged CANCEL is dropped: the ECHO is answered next (got command {cmd:#x}, {st:#010x})")
unlock_mid = c.raw.mid
c.send(LOCK, lock_body(holder, LOCK_UNLOCK))
answers = {}
while len(answers) < 2:
    st, r = c.recv()
    mid = struct.unpack_from("<Q", r, 24)[0]
    if st != PENDING:
        answers[mid] = st
check(answers.get(unlock_mid) == SUCCESS, f"the holder unlocks (got {answers})")
check(answers.get(lock_mid) == SUCCESS, f"the pending LOCK is granted after the unlock (got {answers})")
if FAILURES:
    sys.exit(1)
print("PASS", flush=True)
