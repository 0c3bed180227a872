"""Durable opens keep their access and write-through across an rksmbd
restart (rksmbd, smbprotocol).

Usage: restart_access.py HOST PORT SHARE USER PASSWORD

The share holds v2.bin, replay.bin, v1.bin and ca.bin, each
"0123456789". Opens, each append-only (FILE_APPEND_DATA and
FILE_READ_ATTRIBUTES, no FILE_WRITE_DATA): v2.bin and replay.bin durable
v2 (DH2Q, RWH lease), v1.bin durable v1 (DHnQ, batch oplock), ca.bin
persistent (DH2Q); and through.bin
(made) durable v2 for reading and writing with FILE_WRITE_THROUGH.
Drops the TCP connection without LOGOFF, prints "dropped" and reads a
line from stdin: "PORT rksmbd" (the driver SIGKILLed rksmbd and started
another) or "PORT both" (filterd too: only the persistent open is left).
Then reconnects each open that is left through PORT (DH2C; DHnC for
v1.bin), asking GENERIC_READ | GENERIC_WRITE and no create options,
which MS-SMB2 ignores: each append-only open is still append-only — a
WRITE at offset 0, FileEndOfFile and FileAllocation are
STATUS_ACCESS_DENIED, a WRITE at offset -1 appends "ab" — and
through.bin gets a plain WRITE (the driver traces whether it was synced
before its answer). replay.bin's CREATE is replayed instead (its create
GUID, SMB2_FLAGS_REPLAY_OPERATION, asking GENERIC_READ | GENERIC_WRITE):
the open it returns is append-only as the original was. Prints PASS;
exits non-zero on any failure.
"""

import sys
import uuid

from smbprotocol.create_contexts import (
    CreateContextName,
    SMB2CreateDurableHandleReconnect,
    SMB2CreateDurableHandleRequest,
)
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition, CreateOptions, FilePipePrinterAccessMask, RequestedOplockLevel

from smbtest import (
    SHARE_ALL,
    args,
    check,
    connect,
    context,
    create_file,
    create_rw,
    durable_v2,
    lease_context,
    persistent_context,
    reconnect_v2,
    refused_within,
    sent_as_replay,
    write_status,
)

APPEND = FilePipePrinterAccessMask.FILE_APPEND_DATA | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES
LEASE = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE
BATCH = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_BATCH


def still_append_only(tree, f, name):
    """Open `f` of `name` is refused every change within the file and
    may append "ab"."""
    refused_within(tree, f, f"{name}'s append-only open")
    st = write_status(f, b"ab", 0xFFFFFFFFFFFFFFFF)
    check(st == 0, f"{name}: a reconnected append-only WRITE at offset -1 succeeds ({st:#x})")
    f.close()


host, port, share, user, password = args()
client_guid = uuid.uuid4()
first, tree = connect(host, port, share, user, password, client_guid=client_guid)

guids = {name: uuid.uuid4() for name in ("v2.bin", "ca.bin", "through.bin", "replay.bin")}
keys = {name: uuid.uuid4().bytes for name in ("v2.bin", "ca.bin", "through.bin", "replay.bin")}
fids = {}
f, resp = create_file(tree, "v2.bin", APPEND, SHARE_ALL, contexts=[durable_v2(guids["v2.bin"]), lease_context(keys["v2.bin"])], oplock_level=LEASE)
check(any("timeout" in getattr(r, "fields", {}) for r in resp), "v2.bin's append-only open is durable")
fids["v2.bin"] = f.file_id
f, resp = create_file(
    tree, "replay.bin", APPEND, SHARE_ALL, contexts=[durable_v2(guids["replay.bin"]), lease_context(keys["replay.bin"])], oplock_level=LEASE
)
check(any("timeout" in getattr(r, "fields", {}) for r in resp), "replay.bin's append-only open is durable")
f, resp = create_file(tree, "ca.bin", APPEND, SHARE_ALL, contexts=[persistent_context(guids["ca.bin"]), lease_context(keys["ca.bin"])], oplock_level=LEASE)
check(any("timeout" in getattr(r, "fields", {}) for r in resp), "ca.bin's append-only open is persistent")
fids["ca.bin"] = f.file_id
f, resp = create_file(
    tree,
    "v1.bin",
    APPEND,
    SHARE_ALL,
    contexts=[context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST, SMB2CreateDurableHandleRequest())],
    oplock_level=BATCH,
)
check(f.oplock_level == BATCH, f"v1.bin's append-only open holds a batch oplock ({f.oplock_level:#x})")
fids["v1.bin"] = f.file_id
f, _ = create_rw(
    tree,
    "through.bin",
    CreateDisposition.FILE_OVERWRITE_IF,
    [durable_v2(guids["through.bin"]), lease_context(keys["through.bin"])],
    LEASE,
    options=CreateOptions.FILE_WRITE_THROUGH,
)
fids["through.bin"] = f.file_id
first.disconnect(close=False)
print("dropped", flush=True)
line = sys.stdin.readline().split()
port, both = int(line[0]), line[1:] == ["both"]

again, tree = connect(host, port, share, user, password, client_guid=client_guid)
left = ["ca.bin"] if both else ["v2.bin", "ca.bin"]
for name in left:
    g, st = reconnect_v2(tree, name, fids[name], guids[name], [lease_context(keys[name])], LEASE)
    check(g is not None, f"{name}: the append-only open reconnected ({st:#x})")
    still_append_only(tree, g, name)
if not both:
    dhnc = SMB2CreateDurableHandleReconnect()
    dhnc["data"] = fids["v1.bin"]
    try:
        g, _ = create_rw(
            tree, "v1.bin", CreateDisposition.FILE_OPEN, [context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_RECONNECT, dhnc)], BATCH
        )
    except SMBResponseException as e:
        check(False, f"v1.bin: the append-only open reconnected by DHnC ({e.status:#x})")
    check(True, "v1.bin: the append-only open reconnected by DHnC")
    still_append_only(tree, g, "v1.bin")
    g, st = reconnect_v2(tree, "through.bin", fids["through.bin"], guids["through.bin"], [lease_context(keys["through.bin"])], LEASE)
    check(g is not None, f"through.bin: the write-through open reconnected without the option ({st:#x})")
    g.write(b"through.bin written\n", 0)
    g.close()
    print("ok: through.bin written", flush=True)
    # A replay of replay.bin's CREATE (its create GUID, the replay flag)
    # returns the open as it was made, whatever access the replay asks.
    try:
        g, _ = sent_as_replay(
            lambda: create_rw(
                tree,
                "replay.bin",
                CreateDisposition.FILE_OPEN,
                [durable_v2(guids["replay.bin"]), lease_context(keys["replay.bin"])],
                LEASE,
                share=SHARE_ALL,
            )
        )
    except SMBResponseException as e:
        check(False, f"replay.bin: the replayed CREATE returned the open ({e.status:#x})")
    check(True, "replay.bin: the replayed CREATE returned the open")
    still_append_only(tree, g, "replay.bin")
again.disconnect()
print("PASS", flush=True)
