"""A lease break of a disconnected durable or persistent holder waits for
it to come back (rksmbd, smbprotocol; review rvfailover).

Usage: lease_failover.py HOST PORT SHARE USER PASSWORD MODE

Client A opens failover.txt with an RWH lease (v2) and a persistent (or,
for the MODEs ending in -durable, a durable) handle and writes. Client B
(another client GUID) then opens the file for writing, which breaks A's
lease to RH (MS-SMB2 3.3.4.7). MODE says when A's connection goes:

  unsent            A drops before B's open: no break can be sent.
  restart           as unsent, then prints "dropped" and reads a port
                    from stdin (the driver kills and restarts filterd and
                    rksmbd meanwhile: the break is decided anew).
  sent              A is sent the break and drops before acknowledging.
  sent-durable      as sent, with a durable handle.
  deadline          as unsent; A never comes back in time: at the break
                    timeout (the driver starts filterd with a short one)
                    B is let in, and A's DH2C finds its lease lowered to
                    none (persistent: the handle stays).
  deadline-durable  as deadline, with a durable handle: gone then, left
                    without H (its DH2C fails).
  half-open         as sent, but A's old connection stays open (half
                    open, as after a network blip rksmbd has not noticed):
                    A reconnects on a new connection whose SESSION_SETUP
                    names the old session as PreviousSessionId, ending
                    it. The break is sent again on the new connection
                    (re-review rr39h F1: it went to the old one, whose
                    session had ended, and was never acknowledged).
  other-holder      A's durable handle H1 drops; A opens H2 under the
                    same lease key on a new connection, which is sent the
                    break and acknowledges it keeping H: H1 stays, and its
                    DH2C succeeds.

Except for the deadline modes and other-holder, B's open stays pending
until A reconnects (DH2C), is sent the break on its new connection,
writes back its cached data and acknowledges; B then writes, so the file
ends with B's data (before, B was let in at once and A's write-back
overwrote B's acknowledged write). Prints PASS; exits non-zero on any
failure.
"""

import queue
import sys
import threading
import time
import uuid

from server_messages import LeaseBreakAck, Requests
from smbtest import (
    CreateContextName,
    CreateDisposition,
    DurableHandleFlags,
    SMB2CreateDurableHandleReconnectV2,
    SMB2CreateDurableHandleRequestV2,
    SMBResponseException,
    ShareAccess,
    args,
    check,
    connect,
    context,
    create_rw,
    lease_context,
)
from previous_session_replay import with_previous_session

HOST, PORT, SHARE, USER, PASSWORD = args()
MODE = sys.argv[6]
NAME = "failover.txt"
SH = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE
PERSISTENT = not MODE.endswith("-durable") and MODE != "other-holder"
RH = 0x3
A_DATA, A_FLUSH, B_DATA = b"A-DATA-1", b"A-FLUSH!", b"B-WROTE!"


def durable_context(create_guid):
    d = SMB2CreateDurableHandleRequestV2()
    d["timeout"] = 60000
    d["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT if PERSISTENT else 0
    d["create_guid"] = create_guid
    return context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_REQUEST_V2, d)


def reconnect(tree, file_id, create_guid, key):
    """A's DH2C: (the Open, its lease response context), or (None, status)."""
    d = SMB2CreateDurableHandleReconnectV2()
    d["file_id"] = file_id
    d["create_guid"] = create_guid
    d["flags"] = DurableHandleFlags.SMB2_DHANDLE_FLAG_PERSISTENT if PERSISTENT else 0
    try:
        f, resp = create_rw(
            tree,
            NAME,
            CreateDisposition.FILE_OPEN,
            [context(CreateContextName.SMB2_CREATE_DURABLE_HANDLE_RECONNECT_V2, d), lease_context(key)],
            0xFF,
            share=SH,
        )
    except SMBResponseException as e:
        return None, e.status
    leases = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
    return f, leases[0] if leases else None


def a_connection(client_guid):
    """A connection of A's whose lease breaks are queued."""
    conn, tree = connect(HOST, PORT, SHARE, USER, PASSWORD, client_guid)
    breaks = queue.Queue()
    conn.outstanding_requests = Requests(conn, breaks, conn.outstanding_requests)
    return conn, tree, breaks


def next_break(breaks, what):
    """The (current, new) lease state of the next break on `breaks`."""
    try:
        r = breaks.get(timeout=15)
    except queue.Empty:
        check(False, what)
    r.response_event.wait(5)
    body = r.response["data"].get_value()
    got = (int.from_bytes(body[24:28], "little"), int.from_bytes(body[28:32], "little"))
    check(got == (0x7, RH), f"{what}: RWH to RH ({got[0]:#x} to {got[1]:#x})")
    return got


def acknowledge(conn, tree, key, state):
    ack = LeaseBreakAck()
    ack["lease_key"] = key
    ack["lease_state"] = state
    conn.receive(conn.send(ack, sid=tree.session.session_id, tid=tree.tree_connect_id))


class B:
    """Client B's open for writing, in a thread: then it writes B_DATA."""

    def __init__(self):
        self.done = threading.Event()
        self.result = None
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        try:
            _, tree = connect(HOST, PORT, SHARE, USER, PASSWORD)
            t = time.monotonic()
            f, _ = create_rw(tree, NAME, CreateDisposition.FILE_OPEN, share=SH)
            waited = time.monotonic() - t
            f.write(B_DATA, 0)
            f.close()
            self.result = ("ok", waited)
        except SMBResponseException as e:
            self.result = ("failed", e.status)
        finally:
            self.done.set()

    def pending(self, seconds):
        """Whether B's open is still pending after `seconds`."""
        return not self.done.wait(seconds)

    def granted(self, what):
        check(self.done.wait(30) and self.result and self.result[0] == "ok", f"{what} ({self.result})")
        return self.result[1]


a_guid, create_guid, key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4().bytes
conn, tree, breaks = a_connection(a_guid)
f, resp = create_rw(tree, NAME, CreateDisposition.FILE_OVERWRITE_IF, [durable_context(create_guid), lease_context(key)], 0xFF, share=SH)
leases = [r for r in resp if hasattr(r, "fields") and "lease_state" in r.fields]
check(leases and leases[0]["lease_state"].get_value() == 0x7, "A holds RWH")
f.write(A_DATA, 0)
file_id = f.file_id

if MODE == "other-holder":
    conn.disconnect(close=False)
    conn2, tree2, breaks2 = a_connection(a_guid)
    h2_guid = uuid.uuid4()
    h2, _ = create_rw(tree2, NAME, CreateDisposition.FILE_OPEN, [durable_context(h2_guid), lease_context(key)], 0xFF, share=SH)
    b = B()
    next_break(breaks2, "the break goes to H2's connection")
    acknowledge(conn2, tree2, key, RH)
    b.granted("B's open granted once H2 acknowledged")
    h1, lease = reconnect(tree2, file_id, create_guid, key)
    check(h1 is not None, f"H1, disconnected, kept its handle: its lease kept H ({lease})")
    check(lease["lease_state"].get_value() == RH, "H1's lease is RH")
    h1.close()
    h2.close()
    print("PASS", flush=True)
    sys.exit(0)

previous = None
if MODE.startswith("sent") or MODE == "half-open":
    b = B()
    next_break(breaks, "A is sent the break")
    if MODE == "half-open":
        # The old connection stays open, and says nothing more.
        previous, old_conn = tree.session.session_id, conn
    else:
        conn.disconnect(close=False)
    check(b.pending(1.0), "B's open still pending after A dropped without acknowledging")
else:
    conn.disconnect(close=False)
    if MODE == "restart":
        print("dropped", flush=True)
        PORT = int(sys.stdin.readline())
    b = B()
    if MODE.startswith("deadline"):
        waited = b.granted("B's open granted at the break timeout")
        check(waited >= 1.0, f"B waited for the break timeout ({waited:.2f}s)")
        conn, tree, breaks = a_connection(a_guid)
        f2, lease = reconnect(tree, file_id, create_guid, key)
        if PERSISTENT:
            check(f2 is not None, f"A's persistent handle kept ({lease})")
            check(lease["lease_state"].get_value() == 0, "A's lease lowered to none at the timeout")
            check(f2.read(0, 8) == B_DATA, "A reads B's data")
            f2.close()
        else:
            check(f2 is None and lease == 0xC0000034, f"A's durable handle, left without H, is gone ({lease})")
        print("PASS", flush=True)
        sys.exit(0)
    check(b.pending(1.0), "B's open pending while A is away")

if previous is None:
    conn, tree, breaks = a_connection(a_guid)
else:
    conn, tree, breaks = with_previous_session(previous, lambda: a_connection(a_guid))
f2, lease = reconnect(tree, file_id, create_guid, key)
check(f2 is not None, f"A reconnects ({lease})")
check(lease["lease_state"].get_value() == 0x7, "A's lease is still RWH")
next_break(breaks, "A is sent the break on its new connection")
check(b.pending(0.3), "B's open still pending until A acknowledges")
f2.write(A_FLUSH, 0)
check(b.pending(0.0), "B's open still pending after A's write-back")
acknowledge(conn, tree, key, RH)
b.granted("B's open granted once A acknowledged")
check(f2.read(0, 8) == B_DATA, "the file holds B's acknowledged write")
f2.close()
print("PASS", flush=True)
