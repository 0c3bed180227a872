"""Requests that name no open, or one that may not do what they ask, are
refused as MS-SMB2 3.3.5 has it (rksmbd; raw SMB 3.0.2).

Usage: file_id_checks.py HOST PORT SHARE USER PASSWORD

On one signed connection:
- a READ naming a file open's volatile id with another persistent half is
  STATUS_FILE_CLOSED (Open.DurableFileId, 3.3.5.12), and so is a CLOSE of
  a directory open named that way; named rightly, both succeed;
- a FLUSH on an open without write or append access is
  STATUS_ACCESS_DENIED (3.3.5.11); on the read-write open it succeeds;
- a request flagged SMB2_FLAGS_RELATED_OPERATIONS that is the first of
  its PDU is STATUS_INVALID_PARAMETER (3.3.5.2.7.2);
- an OPLOCK_BREAK acknowledgment naming a batch oplock's open with
  another persistent half (another client's CREATE broke it) is
  STATUS_FILE_CLOSED (3.3.5.22.1); named rightly, it succeeds and the
  other CREATE is answered.
Before, the READ succeeded, the FLUSH succeeded, the related request
was STATUS_FILE_CLOSED and the acknowledgment went by the volatile half
alone. Prints one line per step and PASS; exits non-zero
on any failure.
"""

import struct

from raw_channel import (
    CLOSE,
    CREATE,
    INVALID_PARAMETER,
    READ,
    SUCCESS,
    SignedClient,
    check,
    cmac_sign,
    create_body,
    create_with,
    lease_break_sent,
)

FLUSH, WRITE, OPLOCK_BREAK = 7, 9, 0x12
BATCH = 9
FLAG_RELATED = 0x4
FILE_CLOSED = 0xC0000128
ACCESS_DENIED = 0xC0000022
GENERIC_READ = 0x80000000

c = SignedClient()


def call(cmd, body, flags=0):
    """Sends one request with header `flags` (signed after they are set)
    and returns the status of its answer."""
    h = bytearray(c.raw.header(cmd, c.sid, tid=c.tid))
    struct.pack_into("<I", h, 16, flags)
    c.raw.send(cmac_sign(c.key, bytes(h) + body))
    return c.recv()[0]


def read(fid, flags=0):
    """A READ of 5 bytes at 0 from `fid`: its status."""
    return call(READ, struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, 5, 0, fid, 0, 0, 0, 0, 0) + b"\0", flags)


def opened(body):
    st, r = c.call(CREATE, body)
    check(st == SUCCESS, f"opened (got {st:#010x})")
    return r[64 + 64 : 64 + 80]


def other_persistent_half(fid):
    return bytes(b ^ 0x5A for b in fid[:8]) + fid[8:]


rw = opened(create_body("conf.bin", disposition=5))
st = call(WRITE, struct.pack("<HHIQ16sIIHHI", 49, 64 + 48, 5, 0, rw, 0, 0, 0, 0, 0) + b"hello")
check(st == SUCCESS, f"5 bytes written (got {st:#010x})")
st = read(other_persistent_half(rw))
check(st == FILE_CLOSED, f"a READ with another persistent FileId half is FILE_CLOSED (got {st:#010x})")
st = read(rw)
check(st == SUCCESS, f"a READ with the open's FileId succeeds (got {st:#010x})")

ro = opened(create_body("conf.bin", access=GENERIC_READ, disposition=1))
st = call(FLUSH, struct.pack("<HHI16s", 24, 0, 0, ro))
check(st == ACCESS_DENIED, f"a FLUSH on a read-only open is ACCESS_DENIED (got {st:#010x})")
st = call(FLUSH, struct.pack("<HHI16s", 24, 0, 0, rw))
check(st == SUCCESS, f"a FLUSH on the read-write open succeeds (got {st:#010x})")

st = read(b"\xff" * 16, FLAG_RELATED)
check(st == INVALID_PARAMETER, f"a PDU's first request flagged related is INVALID_PARAMETER (got {st:#010x})")

st, r = c.call(CREATE, create_with("oplocked.bin", oplock=BATCH))
check(st == SUCCESS and r[64 + 2] == BATCH, f"a batch oplock granted (got {st:#010x}, level {r[64 + 2]})")
op = r[64 + 64 : 64 + 80]
other = SignedClient()
other.send(CREATE, create_with("oplocked.bin", disposition=1))
m = lease_break_sent(c, 10)
check(m[64 + 8 : 64 + 24] == op, "the break names the oplocked open")
level = m[64 + 2]
st = call(OPLOCK_BREAK, struct.pack("<HBBI16s", 24, level, 0, 0, other_persistent_half(op)))
check(st == FILE_CLOSED, f"an oplock break ack with another persistent half is FILE_CLOSED (got {st:#010x})")
st = call(OPLOCK_BREAK, struct.pack("<HBBI16s", 24, level, 0, 0, op))
check(st == SUCCESS, f"an oplock break ack with the open's FileId succeeds (got {st:#010x})")
while True:
    st, r = other.recv()
    if st != 0x103:
        break
check(st == SUCCESS, f"the other client's CREATE is answered (got {st:#010x})")
st = call(CLOSE, struct.pack("<HHI16s", 24, 0, 0, op))
check(st == SUCCESS, f"closed (got {st:#010x})")

d = opened(create_body("", access=0x1, attributes=0x10, disposition=1, options=0x1))
st = call(CLOSE, struct.pack("<HHI16s", 24, 0, 0, other_persistent_half(d)))
check(st == FILE_CLOSED, f"a CLOSE of a directory open with another persistent half is FILE_CLOSED (got {st:#010x})")
for fid in (d, ro, rw):
    st = call(CLOSE, struct.pack("<HHI16s", 24, 0, 0, fid))
    check(st == SUCCESS, f"closed (got {st:#010x})")
print("PASS", flush=True)
