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
the open, and an identical append sent without the flag. Prints PASS;
exits non-zero on any failure.
"""

import uuid

from smbprotocol.open import CreateDisposition

from smbtest import args, check, connect, open_rw, persistent_context, reconnect_v2, sent_as_replay

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
print("PASS", flush=True)
