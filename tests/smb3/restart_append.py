"""An end-of-file WRITE (offset -1) in flight when rksmbd is killed is
not appended twice by its replay through the rksmbd that replaces it
(rksmbd, smbprotocol; review rvnode finding 2).

Usage: restart_append.py HOST PORT SHARE USER PASSWORD

Opens, each writes "0123456789" first: ca.txt persistent (read and
write), ao.txt persistent append-only (FILE_APPEND_DATA: a write-only
descriptor), both without a lease, du.txt durable v2 (RWH lease) and
cr.txt persistent (read and write). Each sends "APPEND" at
offset -1 and does not wait for the answer; prints "sent" and reads a
line from stdin: "PORT rksmbd" (the driver saw the three appends land,
SIGKILLed rksmbd and started another) or "PORT both" (filterd too: only
the persistent opens are left). Then reconnects each open left through
PORT (DH2C, retried while STATUS_FILE_NOT_AVAILABLE; cr.txt by a replay
of its CREATE) and, as a client does after a failover, sends the WRITE again
with SMB2_FLAGS_REPLAY_OPERATION (again while STATUS_FILE_NOT_AVAILABLE):
answered as written (6 bytes), not
appended again. An append with other bytes after it is appended. Prints
PASS; exits non-zero on any failure.
"""

import sys
import time
import uuid

from smbprotocol.exceptions import SMBResponseException

from smbprotocol.open import CreateDisposition, FilePipePrinterAccessMask, RequestedOplockLevel

from smbtest import (
    SHARE_ALL,
    args,
    check,
    connect,
    create_file,
    durable_v2,
    lease_context,
    persistent_context,
    reconnect_v2_retrying,
    sent_as_replay,
)

EOF_OFFSET = 0xFFFFFFFFFFFFFFFF
LEASE = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE
RW = FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE
APPEND = FilePipePrinterAccessMask.FILE_APPEND_DATA | FilePipePrinterAccessMask.SYNCHRONIZE


def reader_sees(tree, name):
    """What file `name` holds, read through an open of its own."""
    r, _ = create_file(tree, name, FilePipePrinterAccessMask.GENERIC_READ, SHARE_ALL)
    data = r.read(0, 4096)
    r.close()
    return data


def replayed_append(f, bound=15.0):
    """The "APPEND" WRITE sent again on `f` as a replay, and again every
    0.1 s while it is told STATUS_FILE_NOT_AVAILABLE (filterd slow to
    answer), as a client does, for up to `bound` s: the count written."""
    t0 = time.monotonic()
    while True:
        try:
            return sent_as_replay(lambda: f.write(b"APPEND", EOF_OFFSET))
        except SMBResponseException as e:
            if e.status != 0xC0000467 or time.monotonic() - t0 > bound:
                raise
        time.sleep(0.1)


host, port, share, user, password = args()
client_guid = uuid.uuid4()
first, tree = connect(host, port, share, user, password, client_guid=client_guid)
opens = {}
for name, access, persistent in [("ca.txt", RW, True), ("ao.txt", APPEND, True), ("du.txt", RW, False), ("cr.txt", RW, True)]:
    w, _ = create_file(tree, name, FilePipePrinterAccessMask.GENERIC_WRITE, SHARE_ALL, CreateDisposition.FILE_OVERWRITE_IF)
    w.write(b"0123456789", 0)
    w.close()
    guid, key = uuid.uuid4(), uuid.uuid4().bytes
    # A durable v2 open needs a lease with H; the persistent ones hold
    # none (smbprotocol takes no lease break, and other opens read them).
    contexts = [persistent_context(guid)] if persistent else [durable_v2(guid), lease_context(key)]
    f, resp = create_file(tree, name, access, SHARE_ALL, contexts=contexts, oplock_level=0 if persistent else LEASE)
    check(any("timeout" in getattr(r, "fields", {}) for r in resp), f"{name}: the open is durable")
    opens[name] = (f.file_id, guid, key, persistent)
    # Sent; its answer is never read.
    f.write(b"APPEND", EOF_OFFSET, wait=False)
print("sent", flush=True)
line = sys.stdin.readline().split()
port, both = int(line[0]), line[1:] == ["both"]

again, tree = connect(host, port, share, user, password, client_guid=client_guid)
for name, (fid, guid, key, persistent) in opens.items():
    if both and not persistent:
        continue
    if name == "cr.txt":
        # Its CREATE replayed instead of a DH2C: the open it finds.
        f, _ = sent_as_replay(lambda: create_file(tree, name, RW, SHARE_ALL, contexts=[persistent_context(guid)]))
        check(f.file_id[:8] == fid[:8], f"{name}: the replayed CREATE returned the open (its persistent id)")
    else:
        contexts, oplock_level = ([], 0) if persistent else ([lease_context(key)], LEASE)
        # Retried while told STATUS_FILE_NOT_AVAILABLE, as a client does
        # (filterd slow to answer the new rksmbd's look at the record).
        f, st, _ = reconnect_v2_retrying(
            tree, name, fid, guid, contexts=contexts, oplock_level=oplock_level, persistent=persistent
        )
        check(f is not None, f"{name}: the DH2C ({st:#x})")
    n = replayed_append(f)
    check(n == 6, f"{name}: the replayed append is answered as written ({n})")
    seen = reader_sees(tree, name) if name == "ao.txt" else f.read(0, 4096)
    check(seen == b"0123456789APPEND", f"{name}: the replay after the restart is not appended again ({seen!r})")
    f.write(b"MORE", EOF_OFFSET)
    seen = reader_sees(tree, name) if name == "ao.txt" else f.read(0, 4096)
    check(seen == b"0123456789APPENDMORE", f"{name}: another append is appended ({seen!r})")
    f.close()
again.disconnect()
print("PASS", flush=True)
