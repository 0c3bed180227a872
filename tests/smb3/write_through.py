"""Write-through WRITEs (rksmbd, smbprotocol).

Usage: write_through.py HOST PORT SHARE USER PASSWORD

Writes one line each into four files, each through an open of its own:
  plain.bin       a plain open, a plain WRITE
  flagged.bin     a plain open, a WRITE with SMB2_WRITEFLAG_WRITE_THROUGH
  option.bin      an open with FILE_WRITE_THROUGH, a plain WRITE
  persistent.bin  a persistent open (DH2Q), a plain WRITE
and closes each. The driver traces rksmbd's system calls and checks which
WRITE was synced before its answer. Prints PASS; exits non-zero on any
failure.
"""

import uuid

from smbprotocol.create_contexts import DurableHandleFlags
from smbprotocol.open import CreateDisposition, CreateOptions

from smbtest import args, check, connect, create_rw, persistent_context

conn, tree = connect(*args())


def write_into(name, options=0, contexts=(), write_through=False):
    """Opens `name` (made or emptied), writes "NAME written\\n" and closes
    it: the create contexts of the CREATE's response."""
    f, resp = create_rw(tree, name, CreateDisposition.FILE_OVERWRITE_IF, contexts, options=options)
    f.write(f"{name} written\n".encode(), 0, write_through=write_through)
    f.close()
    print(f"ok: {name} written", flush=True)
    return resp


write_into("plain.bin")
write_into("flagged.bin", write_through=True)
write_into("option.bin", options=CreateOptions.FILE_WRITE_THROUGH)
resp = write_into("persistent.bin", contexts=[persistent_context(uuid.uuid4())])
durable = [r for r in resp if hasattr(r, "fields") and "timeout" in r.fields and "flags" in r.fields]
check(
    len(durable) == 1 and durable[0]["flags"].has_flag(DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT),
    "persistent.bin's open was granted persistent",
)
conn.disconnect()
print("PASS", flush=True)
