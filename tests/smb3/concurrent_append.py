"""End-of-file WRITEs from two clients at once (rksmbd, smbprotocol).

Usage: concurrent_append.py HOST PORT SHARE USER PASSWORD [COUNT]

Two connections, each in a thread of its own, open append.bin (made
empty by the driver) for appending and send COUNT (default 300) WRITEs
at offset 0xFFFFFFFFFFFFFFFF (MS-FSA 2.1.5.4: the end of file), each of a
record of its own: 8 bytes, the writer's letter and the record's number.
Every WRITE must succeed; the file is read back and must hold all
2 * COUNT records, each whole, none overwritten. The driver checks the
file's size and records too. Prints PASS; exits non-zero on any failure.
"""

import sys
import threading

from smbprotocol.open import FilePipePrinterAccessMask, ShareAccess

from smbtest import check, connect, create_file

AT_END = 0xFFFFFFFFFFFFFFFF
SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE
count = int(sys.argv[6]) if len(sys.argv) > 6 else 300
failures = []


def opened(tree, access):
    return create_file(tree, "append.bin", access, SHARE_ALL)[0]


def record(letter, i):
    return f"{letter}{i:07d}".encode()


def append(letter, f, go):
    go.wait()
    try:
        for i in range(count):
            f.write(record(letter, i), AT_END)
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        failures.append(f"{letter}: {e!r}")


writers = []
for letter in "ab":
    conn, tree = connect(*sys.argv[1:6])
    access = FilePipePrinterAccessMask.FILE_APPEND_DATA | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES
    writers.append((letter, conn, opened(tree, access)))
go = threading.Event()
threads = [threading.Thread(target=append, args=(letter, f, go)) for letter, _, f in writers]
for t in threads:
    t.start()
go.set()
for t in threads:
    t.join()
check(not failures, f"every end-of-file WRITE succeeded {failures}")
conn, tree = connect(*sys.argv[1:6])
reader = opened(tree, FilePipePrinterAccessMask.GENERIC_READ)
data = b""
while len(data) < 2 * count * 8 + 1:
    try:
        chunk = reader.read(len(data), 65536, wait=True)
    except Exception:  # noqa: BLE001 - STATUS_END_OF_FILE ends it
        break
    if not chunk:
        break
    data += chunk
records = {data[i : i + 8] for i in range(0, len(data), 8)}
want = {record(letter, i) for letter in "ab" for i in range(count)}
check(len(data) == 2 * count * 8, f"the file holds {2 * count * 8} bytes ({len(data)})")
check(records == want, f"the file holds every record, whole ({len(want - records)} missing)")
reader.close()
for _, c, f in writers:
    f.close()
    c.disconnect()
conn.disconnect()
print("PASS", flush=True)
