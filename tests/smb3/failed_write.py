"""A WRITE or copy whose write into the file fails (rksmbd; raw SMB 3.0.2;
the driver makes every pwrite64 of rksmbd fail with EIO).

Usage: failed_write.py HOST PORT SHARE USER PASSWORD

A failed write may have landed in part: a short pwrite wrote some bytes
before the next one failed (ENOSPC, EDQUOT, EIO). So other clients' read
caching must go whenever a write was attempted, failed or not. Client A
holds RH leases on leased.bin and copied.bin. Client B WRITEs 64 KiB into
leased.bin: the WRITE fails, and A is sent a lease break of its read
caching. Then B copies 5 bytes of src.bin (the driver made it) into
copied.bin with FSCTL_SRV_COPYCHUNK_WRITE: the copy fails, and A is sent
a break of copied.bin's lease too. Before, the failed write returned
before the break and A kept serving data the file no longer held. Prints
one line per step and PASS; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import SUCCESS, SignedClient, check, create_body, create_with, fsctl, lease_break_sent, lease_ctx, opened

WRITE = 9
FSCTL_SRV_REQUEST_RESUME_KEY = 0x00140078
FSCTL_SRV_COPYCHUNK_WRITE = 0x001480F2


def read_caching_broken(client, key, what):
    """`client` is sent a break of lease `key` that takes its read caching."""
    m = lease_break_sent(client, 10)
    check(m[64 + 8 : 64 + 24] == key, f"{what}: the break is of its lease")
    new = struct.unpack_from("<I", m, 64 + 28)[0]
    check(new & 1 == 0, f"{what}: it breaks read caching (to {new})")


a = SignedClient()
leased, copied = uuid.uuid4().bytes, uuid.uuid4().bytes
opened(a, create_with("leased.bin", oplock=0xFF, ctxs=lease_ctx(leased, state=3)))
opened(a, create_with("copied.bin", oplock=0xFF, ctxs=lease_ctx(copied, state=3)))
b = SignedClient()
fid = opened(b, create_body("leased.bin", disposition=1))
data = b"x" * 65536
write = struct.pack("<HHIQ16sIIHHI", 49, 64 + 48, len(data), 0, fid, 0, 0, 0, 0, 0) + data
st, _ = b.call(WRITE, write)
check(st != SUCCESS, f"the WRITE whose pwrite failed failed (got {st:#010x})")
read_caching_broken(a, leased, "the failed WRITE")

src = opened(b, create_body("src.bin", disposition=1))
st, out = fsctl(b, src, FSCTL_SRV_REQUEST_RESUME_KEY, b"", 32)
check(st == SUCCESS and len(out) >= 24, f"the source's resume key (got {st:#010x})")
target = opened(b, create_body("copied.bin", disposition=1))
chunk = out[:24] + struct.pack("<II", 1, 0) + struct.pack("<QQII", 0, 0, 5, 0)
st, _ = fsctl(b, target, FSCTL_SRV_COPYCHUNK_WRITE, chunk, 12)
check(st != SUCCESS, f"the copy whose pwrite failed failed (got {st:#010x})")
read_caching_broken(a, copied, "the failed copy")
print("PASS", flush=True)
