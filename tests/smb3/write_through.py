"""Write-through WRITEs (rksmbd, smbprotocol).

Usage: write_through.py HOST PORT SHARE USER PASSWORD

Writes one line each into four files, each through an open of its own:
  plain.bin       a plain open, a plain WRITE
  flagged.bin     a plain open, a WRITE with SMB2_WRITEFLAG_WRITE_THROUGH
  option.bin      an open with FILE_WRITE_THROUGH, a plain WRITE
  persistent.bin  a persistent open (DH2Q), a plain WRITE
  copied.bin      an open with FILE_WRITE_THROUGH, plain.bin's line
                  copied in by FSCTL_SRV_COPYCHUNK_WRITE
  reconnected.bin a durable (not persistent) open with FILE_WRITE_THROUGH,
                  its connection dropped, reconnected by a DH2C whose
                  CREATE does not repeat the option, a plain WRITE
and closes each. The driver traces rksmbd's system calls and checks which
WRITE was synced before its answer. Prints PASS; exits non-zero on any
failure.
"""

import uuid

from smbprotocol.create_contexts import DurableHandleFlags
from smbprotocol.ioctl import (
    CtlCode,
    IOCTLFlags,
    SMB2IOCTLRequest,
    SMB2IOCTLResponse,
    SMB2SrvCopyChunk,
    SMB2SrvCopyChunkCopy,
    SMB2SrvCopyChunkResponse,
    SMB2SrvRequestResumeKey,
)
from smbprotocol.open import CreateDisposition, CreateOptions

from smbprotocol.create_contexts import CreateContextName, SMB2CreateDurableHandleRequestV2
from smbprotocol.open import RequestedOplockLevel

from smbtest import args, check, connect, context, create_rw, lease_context, persistent_context, reconnect_v2

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


def fsctl(f, code, output_size, input_buffer=b""):
    """FSCTL `code` on open `f`: the response's output buffer."""
    req = SMB2IOCTLRequest()
    req["ctl_code"] = code
    req["file_id"] = f.file_id
    req["max_output_response"] = output_size
    req["flags"] = IOCTLFlags.SMB2_0_IOCTL_IS_FSCTL
    req["buffer"] = input_buffer
    sent = f.connection.send(req, f.tree_connect.session.session_id, f.tree_connect.tree_connect_id)
    resp = SMB2IOCTLResponse()
    resp.unpack(f.connection.receive(sent)["data"].get_value())
    return resp["buffer"].get_value()


src, _ = create_rw(tree, "plain.bin", CreateDisposition.FILE_OPEN)
key = SMB2SrvRequestResumeKey()
key.unpack(fsctl(src, CtlCode.FSCTL_SRV_REQUEST_RESUME_KEY, 32))
dst, _ = create_rw(tree, "copied.bin", CreateDisposition.FILE_OVERWRITE_IF, options=CreateOptions.FILE_WRITE_THROUGH)
chunk = SMB2SrvCopyChunk()
chunk["source_offset"] = 0
chunk["target_offset"] = 0
chunk["length"] = len(b"plain.bin written\n")
copy = SMB2SrvCopyChunkCopy()
copy["source_key"] = key["resume_key"].get_value()
copy["chunks"] = [chunk]
copied = SMB2SrvCopyChunkResponse()
copied.unpack(fsctl(dst, CtlCode.FSCTL_SRV_COPYCHUNK_WRITE, 12, copy))
check(copied["chunks_written"].get_value() == 1, "plain.bin's line copied into copied.bin")
dst.close()
src.close()

# The reconnect's CREATE need not repeat FILE_WRITE_THROUGH (MS-SMB2 takes
# none of its other fields): the open stays write-through.
client_guid, create_guid, lease_key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4().bytes
dh2q = SMB2CreateDurableHandleRequestV2()
dh2q["timeout"] = 60000
dh2q["create_guid"] = create_guid
first, first_tree = connect(*args(), client_guid=client_guid)
f, _ = create_rw(
    first_tree,
    "reconnected.bin",
    CreateDisposition.FILE_OVERWRITE_IF,
    [context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, dh2q), lease_context(lease_key)],
    RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE,
    options=CreateOptions.FILE_WRITE_THROUGH,
)
fid = f.file_id
first.disconnect(close=False)
again, again_tree = connect(*args(), client_guid=client_guid)
g, st = reconnect_v2(
    again_tree, "reconnected.bin", fid, create_guid, [lease_context(lease_key)], RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE
)
check(g is not None, f"the durable write-through open reconnected without the option (got {st:#010x})")
g.write(b"reconnected.bin written\n", 0)
g.close()
print("ok: reconnected.bin written", flush=True)
again.disconnect()
conn.disconnect()
print("PASS", flush=True)
