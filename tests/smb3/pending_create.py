"""A CREATE that waits for a lease break goes async (rksmbd, smbprotocol).

Usage: pending_create.py HOST PORT SHARE USER PASSWORD [timeout]

Client A opens pending.txt with an RWH lease and does not acknowledge the
break that follows. Client B, on its own connection, opens the file: the
answer is an interim STATUS_PENDING with an AsyncId, B's connection
meanwhile serves another CREATE, and B's CANCEL ends the open with
STATUS_CANCELLED (MS-SMB2 3.3.5.16) under that AsyncId. B opens again
(pending again); A acknowledges the break (RH), and B's open completes
with STATUS_SUCCESS. Prints one line per step; exits non-zero on any
failure.

With "timeout" (filterd started with a short --break-timeout-ms), A never
acknowledges: B's open completes once filterd's break timeout has taken
A's whole lease (MS-SMB2 3.3.2.5: none, not the RH the break asked for),
A's late acknowledgment is STATUS_UNSUCCESSFUL, an open under A's key
asking for nothing reports the lease as none, and A was sent no second
notification for the lowering.

With "churn", while B's open is pending a client C on a third connection
opens and closes churn.txt for 2 s (every close is something that may end
a break, to rksmbd), then B cancels; the test counts the opens filterd
refused meanwhile (each retry of B's pending open is one).

smbprotocol has no API for server-initiated messages: A's lease break
(message id 0xFFFFFFFFFFFFFFFF) is caught by a table that makes a pending
request for that id whenever one arrives.
"""

import queue
import sys
import uuid

from smbprotocol.connection import Connection
from smbprotocol.create_contexts import (
    CreateContextName,
    LeaseState,
    SMB2CreateContextRequest,
    SMB2CreateRequestLease,
)
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    RequestedOplockLevel,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

from server_messages import LeaseBreakAck, Requests

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
TIMEOUT = sys.argv[6:] == ["timeout"]
CHURN = sys.argv[6:] == ["churn"]
R, H, W = 1, 2, 4
STATUS_PENDING = 0x103
STATUS_CANCELLED = 0xC0000120
STATUS_UNSUCCESSFUL = 0xC0000001
ALL_SHARE = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def connect():
    conn = Connection(uuid.uuid4(), HOST, PORT, require_signing=True)
    conn.connect()
    session = Session(conn, USER, PASSWORD, require_encryption=False)
    session.connect()
    tree = TreeConnect(session, rf"\\{HOST}\{SHARE}")
    tree.connect()
    return conn, session, tree


def create_args():
    return (
        ImpersonationLevel.Impersonation,
        FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        ALL_SHARE,
        CreateDisposition.FILE_OPEN_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
    )


def send_create(conn, session, tree, name):
    """Sends a CREATE without a lease; returns the request and its interim
    (or only) response, read in place (receive(wait=False) would forget
    the request, and the final response with it)."""
    f = Open(tree, name)
    msg, _ = f.create(*create_args(), send=False)
    request = conn.send(msg, session.session_id, tree.tree_connect_id)
    check(request.response_event.wait(timeout=30), f"B gets an answer to its open of {name} at once")
    with request.response_event_lock:
        first = request.response
        if first["status"].get_value() == STATUS_PENDING:
            request.response_event.clear()
    return request, first


def async_id(hdr):
    # smbprotocol parses every response header in its sync form.
    return hdr["reserved"].get_value() | hdr["tree_id"].get_value() << 32


def final(request):
    check(request.response_event.wait(timeout=30), "the final response arrives")
    with request.response_event_lock:
        return request.response


def open_leased(tree, key, state):
    """Opens pending.txt under lease `key` asking for `state`; returns the
    open and the lease state granted."""
    lease = SMB2CreateRequestLease()
    lease["lease_key"] = key
    lease["lease_state"] = state
    ctx = SMB2CreateContextRequest()
    ctx["buffer_name"] = CreateContextName.SMB2_CREATE_REQUEST_LEASE
    ctx["buffer_data"] = lease
    f = Open(tree, "pending.txt")
    resp = f.create(*create_args(), create_contexts=[ctx], oplock_level=RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE)
    leases = [r for r in resp or [] if hasattr(r, "fields") and "lease_state" in r.fields]
    check(len(leases) == 1, "the open answers with a lease context")
    return f, leases[0]["lease_state"].get_value()


conn_a, session_a, tree_a = connect()
arrived = queue.Queue()
conn_a.outstanding_requests = Requests(conn_a, arrived, conn_a.outstanding_requests)
key = uuid.uuid4().bytes
fa, granted = open_leased(tree_a, key, R | W | H)
check(granted == R | W | H, "A holds an RWH lease")

conn_b, session_b, tree_b = connect()
req1, interim1 = send_create(conn_b, session_b, tree_b, "pending.txt")
check(interim1["status"].get_value() == STATUS_PENDING, "B's open is pending")
check(interim1["flags"].get_value() & 0x2 != 0 and async_id(interim1) != 0, "the interim response is async")

brk = arrived.get(timeout=30)
check(brk.response_event.wait(10), "A gets a lease break")
body = brk.response["data"].get_value()
check(len(body) >= 44 and int.from_bytes(body[0:2], "little") == 44, "a LEASE_BREAK notification")
check(int.from_bytes(body[4:8], "little") & 1 == 1, "it asks for an acknowledgment")
new = int.from_bytes(body[28:32], "little")
check(new == R | H, "it breaks RWH to RH")


def acknowledge(state):
    ack = LeaseBreakAck()
    ack["lease_key"] = key
    ack["lease_state"] = state
    r = conn_a.send(ack, sid=session_a.session_id, tid=tree_a.tree_connect_id)
    check(r.response_event.wait(timeout=30), "A's acknowledgment is answered")
    return r.response["status"].get_value()


if CHURN:
    import time

    conn_c, session_c, tree_c = connect()
    end = time.monotonic() + 2.0
    pairs = 0
    while time.monotonic() < end:
        f = Open(tree_c, "churn.txt")
        f.create(*create_args())
        f.close()
        pairs += 1
    check(pairs > 10, f"C opened and closed churn.txt {pairs} times while B's open was pending")
    req1.cancel()
    done = final(req1)
    check(done["status"].get_value() == STATUS_CANCELLED, "B's pending open is cancelled")
    conn_c.disconnect()
    fa.close()
    conn_a.disconnect()
    conn_b.disconnect()
    print("PASS", flush=True)
    sys.exit(0)

if TIMEOUT:
    done = final(req1)
    check(done["status"].get_value() == 0, "B's open completes at filterd's break timeout")
    check(acknowledge(new) == STATUS_UNSUCCESSFUL, "A's late acknowledgment is STATUS_UNSUCCESSFUL")
    f, granted = open_leased(tree_a, key, 0)
    check(granted == 0, "the timeout took A's whole lease")
    # The timeout tells A nothing (MS-SMB2 3.3.2.5): the one break A saw is
    # the one it never acknowledged. A second notification (RWH to none)
    # would be sent before B's open completed, so it is here by now.
    check(arrived.empty(), "A is sent no notification when the timeout takes its lease")
    f.close()
    fa.close()
    conn_a.disconnect()
    conn_b.disconnect()
    print("PASS", flush=True)
    sys.exit(0)

other, first = send_create(conn_b, session_b, tree_b, "other.txt")
check(first["status"].get_value() == 0, "B's connection serves another CREATE meanwhile")

req1.cancel()
done = final(req1)
check(done["status"].get_value() == STATUS_CANCELLED, "CANCEL ends B's pending open with STATUS_CANCELLED")
check(async_id(done) == async_id(interim1), "under the interim's AsyncId")

req2, interim2 = send_create(conn_b, session_b, tree_b, "pending.txt")
check(interim2["status"].get_value() == STATUS_PENDING, "B's second open is pending (the break still is)")
check(acknowledge(new) == 0, "A acknowledges the break")
done = final(req2)
check(done["status"].get_value() == 0, "B's second open completes once A acknowledged")
check(async_id(done) == async_id(interim2) != async_id(interim1), "under its own AsyncId")

fa.close()
conn_a.disconnect()
conn_b.disconnect()
print("PASS", flush=True)
