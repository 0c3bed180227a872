"""Alice's persistent handles across a takeover by another node (rksmbd, smbprotocol).

Usage: node_takeover.py HOST PORT SHARE USER PASSWORD

HOST PORT is node A's rksmbd. Bob logs on with the same PASSWORD. Reads
commands from stdin, one a line, and answers each with one line:
  open              alice (a fixed client GUID) opens on A, sharing
                    reading and writing: `p` persistent without a lease,
                    writes DATA at 0, locks [0,10) exclusively with lock
                    sequence 1/1 and appends TAIL (offset -1); `l`
                    persistent under an RWH lease -> "opened"
  breakon           bob opens `l` on A for writing, in a thread: alice's
                    lease break notification -> "break CURRENT NEW"
  drop              alice's connection dropped without LOGOFF -> "dropped"
  exclusive PORT    bob opens `p` sharing nothing on PORT -> "exclusive STATUS"
  boblock PORT      bob opens `p` sharing all on PORT and locks [0,10)
                    exclusively, FAIL_IMMEDIATELY -> "boblock OPEN LOCK"
  bobwait PORT      bob opens `l` for writing on PORT, not waiting for the
                    answer -> "bobwait STATUS" (the first answer: 0x103,
                    STATUS_PENDING, when it waits for a lease break)
  bobpeek           whether that open is answered yet -> "bobpeek pending"
                    or "bobpeek STATUS"
  bobfinal          its final answer -> "bobfinal STATUS"
  reconnect PORT    alice connects again (same client GUID) to PORT and
                    resumes both handles with DH2C (`l` under its lease)
                    -> "reconnect same|other same|other LEASE FLAGS" (each
                    handle's persistent FileId half the one A answered, or
                    another; `l`'s lease state and flags), or
                    "reconnect refused STATUS"
  break SECONDS     the next lease break notification on alice's current
                    connection (waiting up to SECONDS) -> "break CURRENT
                    NEW", or "break none"
  ack STATE         alice acknowledges `l`'s break with STATE -> "ack STATUS"
  replaylock        the LOCK of `p` (sequence 1/1) sent again, flagged
                    SMB2_FLAGS_REPLAY_OPERATION -> "replaylock STATUS"
  replayappend      the append of TAIL sent again, flagged as a replay
                    -> "replayappend STATUS"
  read              alice reads `p` -> "read HEX"
  unlock            alice unlocks [0,10) of `p` once -> "unlock STATUS"
  done              alice closes both handles -> "PASS", exit
STATUS is the NTSTATUS in hex (0x0 for STATUS_SUCCESS). Any other
failure prints "FAILED: ..." and exits non-zero.
"""

import queue
import sys
import threading
import uuid

from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    FilePipePrinterAccessMask,
    LockFlags,
    RequestedOplockLevel,
    ShareAccess,
    SMB2LockElement,
)

from server_messages import LeaseBreakAck, Requests
from smbtest import (
    args,
    connect,
    create_file,
    create_rw,
    lease_context,
    lock_in_sequence,
    persistent_context,
    reconnect_context,
    reconnect_v2,
    sent_as_replay,
    status_of,
)

HOST, PORT, SHARE, USER, PASSWORD = args()
CLIENT_GUID = uuid.uuid4()
P_GUID, L_GUID = uuid.uuid4(), uuid.uuid4()
L_KEY = uuid.uuid4().bytes
DATA, TAIL = b"persistent-A-data", b"APPEND"
SHARE_RW = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE
EXCLUSIVE = LockFlags.SMB2_LOCKFLAG_EXCLUSIVE_LOCK | LockFlags.SMB2_LOCKFLAG_FAIL_IMMEDIATELY
APPEND_OFFSET = 0xFFFFFFFFFFFFFFFF
LEASE = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE


def fail(what):
    print(f"FAILED: {what}", flush=True)
    sys.exit(1)


def alice(port):
    """Alice's connection to `port` and its queue of lease breaks."""
    breaks = queue.Queue()
    conn, tree = connect(HOST, port, SHARE, USER, PASSWORD, CLIENT_GUID)
    conn.outstanding_requests = Requests(conn, breaks, conn.outstanding_requests)
    return conn, tree, breaks


def bob(port):
    return connect(HOST, port, SHARE, "bob", PASSWORD)[1]


def next_break(breaks, seconds):
    try:
        r = breaks.get(timeout=seconds)
    except queue.Empty:
        return None
    if not r.response_event.wait(10):
        fail("a server-initiated message arrived whole")
    body = r.response["data"].get_value()
    # [MS-SMB2] 2.2.23.2: StructureSize 44, NewEpoch, Flags, LeaseKey,
    # CurrentLeaseState, NewLeaseState, ...
    if len(body) < 44 or int.from_bytes(body[0:2], "little") != 44 or body[8:24] != L_KEY:
        fail(f"a LEASE_BREAK notification of l's lease: {body.hex()}")
    return int.from_bytes(body[24:28], "little"), int.from_bytes(body[28:32], "little")


def lease_of(resp):
    found = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
    if len(found) != 1:
        return None
    return found[0]["lease_state"].get_value(), found[0]["flags"].get_value()


conn = tree = breaks = None
p = l = None
p_id = l_id = None
bob_open = bob_request = None
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    cmd, rest = words[0], words[1:]
    if cmd == "open":
        conn, tree, breaks = alice(PORT)
        p, _ = create_rw(tree, "p", CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(P_GUID)], share=SHARE_RW)
        p.write(DATA, 0)
        lock_in_sequence(p, 0, 10, EXCLUSIVE, 1, 1)
        p.write(TAIL, APPEND_OFFSET)
        l, resp = create_rw(
            tree, "l", CreateDisposition.FILE_OVERWRITE_IF, [persistent_context(L_GUID), lease_context(L_KEY)], LEASE, share=SHARE_RW
        )
        if lease_of(resp) is None or lease_of(resp)[0] != 0x7:
            fail(f"l under an RWH lease ({lease_of(resp)})")
        p_id, l_id = p.file_id, l.file_id
        print("opened", flush=True)
    elif cmd == "breakon":
        b_tree = bob(PORT)

        def bob_on_a():
            try:
                create_rw(b_tree, "l", CreateDisposition.FILE_OPEN, share=SHARE_RW)
            except Exception:  # noqa: BLE001 - A dies under it
                pass

        threading.Thread(target=bob_on_a, daemon=True).start()
        got = next_break(breaks, 30)
        if got is None:
            fail("no lease break on A")
        print(f"break {got[0]:#x} {got[1]:#x}", flush=True)
    elif cmd == "drop":
        conn.disconnect(close=False)
        print("dropped", flush=True)
    elif cmd == "exclusive":
        b_tree = bob(int(rest[0]))
        st = status_of(lambda: create_rw(b_tree, "p", CreateDisposition.FILE_OPEN, share=0)[0].close())
        b_tree.session.connection.disconnect()
        print(f"exclusive {st:#x}", flush=True)
    elif cmd == "boblock":
        b_tree = bob(int(rest[0]))
        try:
            x, _ = create_rw(b_tree, "p", CreateDisposition.FILE_OPEN, share=SHARE_RW | ShareAccess.FILE_SHARE_DELETE)
        except SMBResponseException as e:
            print(f"boblock {e.status:#x} -", flush=True)
            continue
        st = status_of(lambda: lock_in_sequence(x, 0, 10, EXCLUSIVE, 0, 0))
        x.close()
        b_tree.session.connection.disconnect()
        print(f"boblock 0x0 {st:#x}", flush=True)
    elif cmd == "bobwait":
        b_tree = bob(int(rest[0]))
        rw = FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE
        bob_open, bob_request = create_file(b_tree, "l", rw, SHARE_RW, send=False)
        # (Read the first answer in place: receive(wait=False) would
        # forget the request, and the final answer with it.)
        if not bob_request.response_event.wait(timeout=30):
            fail("no answer to bob's open")
        with bob_request.response_event_lock:
            st = bob_request.response["status"].get_value()
        print(f"bobwait {st:#x}", flush=True)
    elif cmd == "bobpeek":
        with bob_request.response_event_lock:
            st = bob_request.response["status"].get_value()
        print("bobpeek pending" if st == 0x103 else f"bobpeek {st:#x}", flush=True)
    elif cmd == "bobfinal":
        conn_b = bob_open.connection
        st = status_of(lambda: conn_b.receive(bob_request, wait=True, timeout=30))
        print(f"bobfinal {st:#x}", flush=True)
    elif cmd == "reconnect":
        conn, tree, breaks = alice(int(rest[0]))
        p, st = reconnect_v2(tree, "p", p_id, P_GUID)
        if p is None:
            print(f"reconnect refused {st:#x}", flush=True)
            continue
        try:
            l, resp = create_rw(
                tree, "l", CreateDisposition.FILE_OPEN, [reconnect_context(l_id, L_GUID), lease_context(L_KEY)], LEASE, share=SHARE_RW
            )
        except SMBResponseException as e:
            print(f"reconnect refused {e.status:#x}", flush=True)
            continue
        lease = lease_of(resp) or (0, 0)
        same_p = "same" if p.file_id[:8] == p_id[:8] else "other"
        same_l = "same" if l.file_id[:8] == l_id[:8] else "other"
        print(f"reconnect {same_p} {same_l} {lease[0]:#x} {lease[1]:#x}", flush=True)
    elif cmd == "break":
        got = next_break(breaks, float(rest[0]))
        print("break none" if got is None else f"break {got[0]:#x} {got[1]:#x}", flush=True)
    elif cmd == "ack":
        ack = LeaseBreakAck()
        ack["lease_key"] = L_KEY
        ack["lease_state"] = int(rest[0], 0)
        st = status_of(lambda: conn.receive(conn.send(ack, sid=tree.session.session_id, tid=tree.tree_connect_id)))
        print(f"ack {st:#x}", flush=True)
    elif cmd == "replaylock":
        st = status_of(lambda: sent_as_replay(lambda: lock_in_sequence(p, 0, 10, EXCLUSIVE, 1, 1)))
        print(f"replaylock {st:#x}", flush=True)
    elif cmd == "replayappend":
        st = status_of(lambda: sent_as_replay(lambda: p.write(TAIL, APPEND_OFFSET)))
        print(f"replayappend {st:#x}", flush=True)
    elif cmd == "read":
        print(f"read {p.read(0, 4096).hex()}", flush=True)
    elif cmd == "unlock":
        e = SMB2LockElement()
        e["offset"], e["length"], e["flags"] = 0, 10, LockFlags.SMB2_LOCKFLAG_UNLOCK
        print(f"unlock {status_of(lambda: p.lock([e])):#x}", flush=True)
    elif cmd == "done":
        for f in (p, l):
            st = status_of(f.close)
            if st != 0:
                fail(f"close {st:#x}")
        conn.disconnect()
        print("PASS", flush=True)
        sys.exit(0)
    else:
        fail(f"unknown command {cmd}")
fail("stdin ended before done")
