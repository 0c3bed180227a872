"""What a bound channel may do at its session's home is confined to it
(rksmbd multichannel, issue 14; smbprotocol plus raw SMB 3.0.2).

Usage: channel_confinement.py HOST PORT SHARE USER PASSWORD

Connection A (smbprotocol, SMB 3.0.2, signing not required) sets up two
sessions of USER, S1 and S2. Connection B (raw, same client GUID) binds S1
as a channel (MS-SMB2 3.3.5.5.2: SESSION_SETUP with
SMB2_SESSION_FLAG_BINDING, every leg signed with S1's key; the channel's
key is derived from the binding's own session key). Then:

1. A compound sent on B whose first message is S1's and whose second is
   an unsigned TREE_CONNECT of S2 (a session B never bound): the second is
   STATUS_USER_SESSION_DELETED, not served for S2.
2. A CHANGE_NOTIFY of S1 pends on A; a CANCEL sent on B with the same
   MessageId (MessageIds are per connection) leaves it pending: a file
   created afterwards completes it with STATUS_SUCCESS, not
   STATUS_CANCELLED.
3. A CREATE sent on B, not the last of its compound (so it waits at the
   home, serving the home's own socket meanwhile), needs A's RWH lease on
   the file broken: A's acknowledgment, signed with S1's key on A, is
   answered STATUS_SUCCESS (it was checked against the channel's key and
   refused), and B's CREATE succeeds.
4. Connection C starts a binding of S1 (first leg flagged and signed) and
   sends the second leg (AUTHENTICATE) unsigned and without the flag: it
   is refused (STATUS_INVALID_PARAMETER), not bound.
5. A compound on B whose first message is a sessionless ECHO (so the PDU
   runs on B) and whose second is a LOGOFF of S1: the LOGOFF is
   STATUS_USER_SESSION_DELETED, and S1 stays bound on B.

Prints one line per step; exits non-zero on any failure (after the
other steps, when the connections still serve).
"""

import queue
import struct
import sys
import uuid

from smbprotocol.change_notify import CompletionFilter, FileSystemWatcher
from smbprotocol.connection import Connection, Dialects
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    DirectoryAccessMask,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
)
from smbprotocol.create_contexts import CreateContextName, SMB2CreateContextRequest, SMB2CreateRequestLease
from smbprotocol.open import RequestedOplockLevel
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

from server_messages import LeaseBreakAck, Requests

from raw_channel import (
    ALL_SHARE,
    BINDING,
    CANCEL,
    CREATE,
    ECHO,
    FAILURES,
    HOST,
    INVALID_PARAMETER,
    MORE_PROCESSING,
    PASSWORD,
    PORT,
    SHARE,
    SUCCESS,
    TREE_CONNECT,
    USER,
    USER_SESSION_DELETED,
    H,
    R,
    Raw,
    W,
    bind,
    check,
    cmac_sign,
    create_body,
    ntlm_context,
    open_file,
    tree_connect_body,
)


def main():
    guid = uuid.uuid4()
    a = Connection(guid, HOST, PORT, require_signing=False)
    a.connect(dialect=Dialects.SMB_3_0_2)
    s1 = Session(a, USER, PASSWORD, require_encryption=False)
    s1.connect()
    s2 = Session(a, USER, PASSWORD, require_encryption=False)
    s2.connect()
    tree = TreeConnect(s1, rf"\\{HOST}\{SHARE}")
    tree.connect()
    arrived = queue.Queue()
    a.outstanding_requests = Requests(a, arrived, a.outstanding_requests)

    b = Raw(guid)
    chan_key = bind(b, s1.session_id, s1.signing_key)
    st, _ = b.call(cmac_sign(chan_key, b.header(ECHO, s1.session_id) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, "an ECHO of S1 signed with the channel key is served on B")

    # 1. A forwarded compound acts on the bound session only.
    echo = cmac_sign(chan_key, b.header(ECHO, s1.session_id, next_command=72) + struct.pack("<HH", 4, 0) + b"\0" * 4)
    tcon = b.header(TREE_CONNECT, s2.session_id) + tree_connect_body()
    b.send(echo + tcon)
    r = b.recv()
    first = struct.unpack_from("<I", r, 20)[0]
    check(first > 0 and len(r) > first, "B answered both messages of the compound")
    st1 = struct.unpack_from("<I", r, 8)[0]
    st2 = struct.unpack_from("<I", r, first + 8)[0]
    check(st1 == SUCCESS, "the compound's S1 ECHO succeeded")
    check(
        st2 == USER_SESSION_DELETED,
        f"the compound's TREE_CONNECT of S2 (not bound on B) is USER_SESSION_DELETED (got {st2:#010x})",
        fatal=False,
    )

    # 2. A CANCEL on B does not reach A's request of the same MessageId.
    d = Open(tree, "watched")
    d.create(
        ImpersonationLevel.Impersonation,
        DirectoryAccessMask.FILE_LIST_DIRECTORY | DirectoryAccessMask.SYNCHRONIZE,
        FileAttributes.FILE_ATTRIBUTE_DIRECTORY,
        ALL_SHARE,
        CreateDisposition.FILE_OPEN_IF,
        CreateOptions.FILE_DIRECTORY_FILE,
    )
    w = FileSystemWatcher(d)
    w.start(CompletionFilter.FILE_NOTIFY_CHANGE_FILE_NAME)
    mid = w._request.message["message_id"].get_value()
    print(f"A's CHANGE_NOTIFY sent (MessageId {mid})", flush=True)
    b.send(b.header(CANCEL, s1.session_id, mid=mid) + struct.pack("<HH", 4, 0))
    # An ECHO on B after the CANCEL: B has handed the CANCEL on by then.
    st, _ = b.call(cmac_sign(chan_key, b.header(ECHO, s1.session_id) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, "B served an ECHO after its CANCEL")
    open_file(tree, r"watched\new.txt").close()
    try:
        w.wait()
        cancelled = w.cancelled
    except Exception as e:  # smbprotocol raises on STATUS_CANCELLED
        print(f"notify ended with {e!r}", flush=True)
        cancelled = True
    check(not cancelled, "A's CHANGE_NOTIFY completed with the change, not cancelled by B's CANCEL", fatal=False)
    d.close()

    # 3. The home's own lease break ack while a channel's CREATE waits.
    lease_key = uuid.uuid4().bytes
    lease = SMB2CreateRequestLease()
    lease["lease_key"] = lease_key
    lease["lease_state"] = R | W | H
    ctx = SMB2CreateContextRequest()
    ctx["buffer_name"] = CreateContextName.SMB2_CREATE_REQUEST_LEASE
    ctx["buffer_data"] = lease
    fa = Open(tree, "leased.txt")
    resp = fa.create(
        ImpersonationLevel.Impersonation,
        FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        ALL_SHARE,
        CreateDisposition.FILE_OVERWRITE_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
        create_contexts=[ctx],
        oplock_level=RequestedOplockLevel.SMB2_OPLOCK_LEVEL_LEASE,
    )
    leases = [r for r in resp or [] if hasattr(r, "fields") and "lease_state" in r.fields]
    check(len(leases) == 1 and leases[0]["lease_state"].get_value() == R | W | H, "A holds an RWH lease")
    body = create_body("leased.txt")
    first = 64 + len(body)
    first += -first % 8
    create = cmac_sign(
        chan_key,
        b.header(CREATE, s1.session_id, next_command=first, tid=tree.tree_connect_id)
        + body
        + b"\0" * (first - 64 - len(body)),
    )
    echo = cmac_sign(chan_key, b.header(ECHO, s1.session_id) + struct.pack("<HH", 4, 0))
    b.send(create + echo)
    brk = arrived.get(timeout=30)
    check(brk.response_event.wait(10), "A gets a lease break")
    new = int.from_bytes(brk.response["data"].get_value()[28:32], "little")
    ack = LeaseBreakAck()
    ack["lease_key"] = lease_key
    ack["lease_state"] = new
    try:
        r = a.send(ack, sid=s1.session_id, tid=tree.tree_connect_id, force_signature=True)
        answered = r.response_event.wait(timeout=10)
        st = r.response["status"].get_value() if answered else None
    except Exception as e:
        print(f"the acknowledgment failed with {e!r}", flush=True)
        st = None
    check(st == SUCCESS, f"A's signed break acknowledgment is answered STATUS_SUCCESS (got {st})", fatal=False)
    r = b.recv()
    st = struct.unpack_from("<I", r, 8)[0]
    check(st == SUCCESS, f"B's CREATE succeeded (got {st:#010x})", fatal=False)
    if st == SUCCESS:
        fid = r[64 + 64 : 64 + 80]
        close = cmac_sign(chan_key, b.header(6, s1.session_id, tid=tree.tree_connect_id) + struct.pack("<HHI", 24, 0, 0) + fid)
        st, _ = b.call(close)
        check(st == SUCCESS, "B closed its open")
    fa.close()

    # 4. A binding's later leg must carry the flag and the signature.
    c = Raw(guid)
    ctx = ntlm_context()
    st, tok = c.setup_leg(s1.session_id, BINDING, ctx.step(None), s1.signing_key)
    check(st == MORE_PROCESSING, "C's binding leg 1 answered")
    st, _ = c.setup_leg(s1.session_id, 0, ctx.step(tok), None)
    check(
        st == INVALID_PARAMETER,
        f"C's unsigned leg 2 without the binding flag is refused (got {st:#010x})",
        fatal=False,
    )

    # 5. A PDU whose first message names no bound session runs on B
    # itself; a LOGOFF of S1 after it in the compound must not end the
    # channel's copy of S1 there (the home never heard of it and waited
    # for the channel for ever, holding its opens).
    echo0 = b.header(ECHO, 0, next_command=72) + struct.pack("<HH", 4, 0) + b"\0" * 4
    logoff = cmac_sign(chan_key, b.header(2, s1.session_id) + struct.pack("<HH", 4, 0))
    b.send(echo0 + logoff)
    r = b.recv()
    first = struct.unpack_from("<I", r, 20)[0]
    check(first > 0 and len(r) > first, "B answered both messages of the ECHO+LOGOFF compound")
    st2 = struct.unpack_from("<I", r, first + 8)[0] if first > 0 and len(r) > first else None
    check(
        st2 == USER_SESSION_DELETED,
        f"the LOGOFF of S1 behind a sessionless ECHO is USER_SESSION_DELETED (got {st2})",
        fatal=False,
    )
    st, _ = b.call(cmac_sign(chan_key, b.header(ECHO, s1.session_id) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, f"S1 is still bound on B: its ECHO is served (got {st:#010x})", fatal=False)

    tree.disconnect()
    s2.disconnect()
    s1.disconnect()
    a.disconnect()
    if FAILURES:
        sys.exit(1)
    print("PASS", flush=True)


main()
