"""One compound of many READs cannot make rksmbd hold a response of any
size (issue 14; smbprotocol plus raw SMB 3.0.2).

Usage: compound_reads.py HOST PORT SHARE USER PASSWORD

Connection A (smbprotocol) sets up session S1 and writes a 1 MiB file; a
raw connection binds S1 as a channel and sends one compound of READS
unrelated READs of the whole file (each message signed). rksmbd answers
every READ in one compound response, but runs only the first ones: once
the response gathers 2 MiB, the later READs answer
STATUS_INSUFFICIENT_RESOURCES, so the whole response stays a few MiB
(before, every READ ran: READS MiB in one response, and past 16 MiB its
NetBIOS length no longer fit). Then the channel and A still serve.

Prints one line per step; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import CLOSE, ECHO, READ, SUCCESS, charge_for, check, cmac_sign, flooding_channels

SIZE = 1 << 20
READS = 8
INSUFFICIENT_RESOURCES = 0xC000009A


def main():
    a, s1, tree, big, chans = flooding_channels(uuid.uuid4(), 1, 0, b"c")
    sid, tid = s1.session_id, tree.tree_connect_id
    raw, key = chans[0]
    body = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, SIZE, 0, big.file_id, 0, 0, 0, 0, 0) + b"\0"
    pdu = b""
    for i in range(READS):
        last = i + 1 == READS
        msg_len = 64 + len(body)
        padded = msg_len if last else (msg_len + 7) // 8 * 8
        msg = raw.header(READ, sid, next_command=0 if last else padded, tid=tid, charge=charge_for(SIZE)) + body
        msg += b"\0" * (padded - msg_len)
        pdu += cmac_sign(key, msg)
    raw.send(pdu)
    raw.s.settimeout(60)
    r = raw.recv()
    check(len(r) < 4 * SIZE, f"the compound's response is {len(r)} bytes (< 4 MiB)")
    statuses, off = [], 0
    while True:
        statuses.append(struct.unpack_from("<I", r, off + 8)[0])
        nxt = struct.unpack_from("<I", r, off + 20)[0]
        if nxt == 0:
            break
        off += nxt
    check(len(statuses) == READS, f"every READ answered ({len(statuses)} of {READS})")
    ok = statuses.count(SUCCESS)
    check(ok >= 1 and statuses[:ok] == [SUCCESS] * ok, f"the first {ok} READs ran")
    check(
        statuses[ok:] == [INSUFFICIENT_RESOURCES] * (READS - ok) and ok < READS,
        f"the other {READS - ok} answered STATUS_INSUFFICIENT_RESOURCES",
    )
    st, _ = raw.call(cmac_sign(key, raw.header(ECHO, sid) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, "the channel still serves (ECHO)")
    check(big.read(0, 4096) == b"c" * 4096, "A still reads the file")

    # A CLOSE past the bound still runs (its answer is a few bytes; refused,
    # it left the open behind: the fourth adversarial review).
    close = struct.pack("<HHI16s", 24, 0, 0, big.file_id)
    msgs = [(READ, body)] * 3 + [(CLOSE, close)]
    pdu = b""
    for i, (cmd, b) in enumerate(msgs):
        last = i + 1 == len(msgs)
        msg_len = 64 + len(b)
        padded = msg_len if last else (msg_len + 7) // 8 * 8
        msg = raw.header(cmd, sid, next_command=0 if last else padded, tid=tid) + b + b"\0" * (padded - msg_len)
        pdu += cmac_sign(key, msg)
    raw.send(pdu)
    r = raw.recv()
    statuses, off = [], 0
    while True:
        statuses.append(struct.unpack_from("<I", r, off + 8)[0])
        nxt = struct.unpack_from("<I", r, off + 20)[0]
        if nxt == 0:
            break
        off += nxt
    check(statuses[-1] == SUCCESS, f"the CLOSE past the bound ran (statuses {[hex(x) for x in statuses]})")
    # smbprotocol still counts big as open: drop the connection as is.
    a.disconnect(False)
    print("PASS", flush=True)

main()
