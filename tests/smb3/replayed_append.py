"""An end-of-file WRITE (offset -1) replayed is not appended twice
(rksmbd, smbprotocol; review rvfailover t7).

Usage: replayed_append.py HOST PORT SHARE USER PASSWORD

A persistent open of log.txt writes "HEADER\\n", then "APPEND-1\\n" at
offset -1; the client drops its TCP connection, reconnects the handle
(DH2C) and, as if it never saw the answer, sends that WRITE again with
SMB2_FLAGS_REPLAY_OPERATION: it is answered (9 bytes) and the file holds
one "APPEND-1\\n" (before, two). The same replay again, on the same
connection, changes nothing either. A replay with other bytes is
appended; so is a replay of an append after another WRITE came through
the open, and an identical append sent without the flag.

Then the same for opens without read right (re-review rr39e F1: their
descriptor is write-only, reading the bytes back failed, and every replay
was appended again): a persistent GENERIC_WRITE open of wolog.txt and a
FILE_APPEND_DATA open of aolog.txt each append a line, lose their
connection, reconnect and replay it: not appended again; after another
open appended to the file, a replay is still answered (the bytes are read
back through a read-only reopen). Prints PASS; exits non-zero on any
failure.
"""

import uuid

from smbprotocol.open import CreateDisposition, FilePipePrinterAccessMask, ShareAccess

from smbtest import args, check, connect, create_file, open_rw, persistent_context, reconnect_v2, sent_as_replay

SERVER = args()
NAME = "log.txt"
EOF_OFFSET = 0xFFFFFFFFFFFFFFFF


def contents(f):
    """What the file holds, read through open `f`."""
    return f.read(0, 4096)


client_guid, create_guid = uuid.uuid4(), uuid.uuid4()
conn, tree = connect(*SERVER, client_guid=client_guid)
f = open_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(create_guid)])
f.write(b"HEADER\n", 0)
f.write(b"APPEND-1\n", EOF_OFFSET)
fid = f.file_id
conn.disconnect(close=False)

conn, tree = connect(*SERVER, client_guid=client_guid)
f, st = reconnect_v2(tree, NAME, fid, create_guid)
check(st == 0, f"the DH2C ({st:#x})")
n = sent_as_replay(lambda: f.write(b"APPEND-1\n", EOF_OFFSET))
check(n == 9, f"the replayed append is answered as written ({n})")
check(contents(f) == b"HEADER\nAPPEND-1\n", "the replay after the DH2C is not appended again")
sent_as_replay(lambda: f.write(b"APPEND-1\n", EOF_OFFSET))
check(contents(f) == b"HEADER\nAPPEND-1\n", "nor a replay on the same connection")

sent_as_replay(lambda: f.write(b"APPEND-2\n", EOF_OFFSET))
check(contents(f) == b"HEADER\nAPPEND-1\nAPPEND-2\n", "a replay with other bytes is appended")
f.write(b"HEADER\n", 0)
sent_as_replay(lambda: f.write(b"APPEND-2\n", EOF_OFFSET))
check(
    contents(f) == b"HEADER\nAPPEND-1\nAPPEND-2\nAPPEND-2\n",
    "another WRITE in between: the replay is run again",
)
f.write(b"APPEND-2\n", EOF_OFFSET)
check(
    contents(f) == b"HEADER\nAPPEND-1\nAPPEND-2\nAPPEND-2\nAPPEND-2\n",
    "an identical append without the flag is appended",
)
f.close()
conn.disconnect()

SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE


def reader_sees(tree, name):
    """What file `name` holds, read through an open of its own."""
    r, _ = create_file(tree, name, FilePipePrinterAccessMask.GENERIC_READ, SHARE_ALL)
    data = contents(r)
    r.close()
    return data


for name, access in [
    ("wolog.txt", FilePipePrinterAccessMask.GENERIC_WRITE),
    ("aolog.txt", FilePipePrinterAccessMask.FILE_APPEND_DATA | FilePipePrinterAccessMask.SYNCHRONIZE),
]:
    client_guid, create_guid = uuid.uuid4(), uuid.uuid4()
    conn, tree = connect(*SERVER, client_guid=client_guid)
    w, _ = create_file(tree, name, FilePipePrinterAccessMask.GENERIC_WRITE, SHARE_ALL, CreateDisposition.FILE_OVERWRITE_IF)
    w.write(b"HEADER\n", 0)
    w.close()
    f, _ = create_file(tree, name, access, SHARE_ALL, contexts=[persistent_context(create_guid)])
    f.write(b"LINE-1\n", EOF_OFFSET)
    n = sent_as_replay(lambda: f.write(b"LINE-1\n", EOF_OFFSET))
    check(n == 7, f"{name}: the replayed append is answered as written ({n})")
    check(reader_sees(tree, name) == b"HEADER\nLINE-1\n", f"{name}: a replay on the same connection is not appended")
    fid = f.file_id
    conn.disconnect(close=False)

    conn, tree = connect(*SERVER, client_guid=client_guid)
    f, st = reconnect_v2(tree, name, fid, create_guid)
    check(st == 0, f"{name}: the DH2C ({st:#x})")
    sent_as_replay(lambda: f.write(b"LINE-1\n", EOF_OFFSET))
    check(reader_sees(tree, name) == b"HEADER\nLINE-1\n", f"{name}: the replay after the DH2C is not appended again")
    o, _ = create_file(tree, name, FilePipePrinterAccessMask.GENERIC_WRITE, SHARE_ALL)
    o.write(b"OTHER\n", EOF_OFFSET)
    o.close()
    sent_as_replay(lambda: f.write(b"LINE-1\n", EOF_OFFSET))
    check(
        reader_sees(tree, name) == b"HEADER\nLINE-1\nOTHER\n",
        f"{name}: another open appended since: the bytes are still in place, the replay is not appended",
    )
    f.close()
    conn.disconnect()
print("PASS", flush=True)
