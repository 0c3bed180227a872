"""A write-through WRITE or copy whose sync fails (rksmbd; raw SMB 3.0.2;
the driver makes every fdatasync of rksmbd fail with EIO).

Usage: failed_sync.py HOST PORT SHARE USER PASSWORD

Client A holds an RH lease on leased.bin. Client B opens it too and
WRITEs 5 bytes with SMB2_WRITEFLAG_WRITE_THROUGH: the WRITE fails (its
sync did), yet the data is in the file, so A is sent a lease break of its
read caching. Before, the failed sync returned before the break and A
kept serving stale data. Then B copies those 5 bytes with
FSCTL_SRV_COPYCHUNK_WRITE into copied.bin, opened with FILE_WRITE_THROUGH:
the copy fails, and its answer still counts the one chunk and 5 bytes
written (MS-SMB2 3.3.5.15.6; before, the failed sync's status came with
no SRV_COPYCHUNK_RESPONSE). Prints one line per step and PASS; exits
non-zero on any failure.
"""

import struct
import uuid

from raw_channel import SUCCESS, SignedClient, check, create_body, create_with, fsctl, lease_break_sent, lease_ctx, opened

WRITE = 9
WRITEFLAG_WRITE_THROUGH = 0x1
FSCTL_SRV_REQUEST_RESUME_KEY = 0x00140078
FSCTL_SRV_COPYCHUNK_WRITE = 0x001480F2
FILE_WRITE_THROUGH = 0x2


a = SignedClient()
opened(a, create_with("leased.bin", oplock=0xFF, ctxs=lease_ctx(uuid.uuid4().bytes, state=3)))
b = SignedClient()
fid = opened(b, create_body("leased.bin", disposition=1))
write = struct.pack("<HHIQ16sIIHHI", 49, 64 + 48, 5, 0, fid, 0, 0, 0, 0, WRITEFLAG_WRITE_THROUGH) + b"hello"
st, _ = b.call(WRITE, write)
check(st != SUCCESS, f"the write-through WRITE whose sync failed failed (got {st:#010x})")
m = lease_break_sent(a, 10)
new = struct.unpack_from("<I", m, 64 + 28)[0]
check(new & 1 == 0, f"it breaks read caching (to {new})")

st, out = fsctl(b, fid, FSCTL_SRV_REQUEST_RESUME_KEY, b"", 32)
check(st == SUCCESS and len(out) >= 24, f"the source's resume key (got {st:#010x})")
target = opened(b, create_body("copied.bin", disposition=5, options=0x40 | FILE_WRITE_THROUGH))
chunk = out[:24] + struct.pack("<II", 1, 0) + struct.pack("<QQII", 0, 0, 5, 0)
st, out = fsctl(b, target, FSCTL_SRV_COPYCHUNK_WRITE, chunk, 12)
check(st != SUCCESS, f"the copy into a write-through open whose sync failed failed (got {st:#010x})")
check(
    len(out) == 12 and struct.unpack("<III", out) == (1, 0, 5),
    f"its answer counts one chunk and 5 bytes written (got {out.hex()})",
)
print("PASS", flush=True)
