"""A signed request of one connection, replayed as it was on another, is
answered STATUS_USER_SESSION_DELETED unsigned (MS-SMB2 3.3.5.2.4; rksmbd;
raw SMB 3.0.2).

Usage: replayed_request.py HOST PORT SHARE USER PASSWORD

USER logs on (the home connection) and sends a signed TREE_CONNECT. Its
bytes, replayed unchanged on fresh connections that never logged on (one
of another client GUID, one of the home's; their message ids brought
level with ECHOs), and on a connection where a binding of the session is
under way (its first leg answered), must each be answered STATUS_USER_SESSION_DELETED with SMB2_FLAGS_SIGNED clear and
a zero signature. (A SESSION_SETUP naming the session is the exception:
its refusal is signed with the session's key, as Windows does and
smbtorture's bind_negative_* want; docs/smb3.md.) Before (review rvcrypto), each answer was signed with the
session's key whenever the request verified under it: a second answer
under the real answer's AES-GMAC nonce (MessageId, response), enough to
recover GHASH's key and forge, and a signing oracle under AES-CMAC. The
home connection still serves the session afterwards.

Prints one line per step and PASS; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import (
    BINDING,
    ECHO,
    FAILURES,
    FLAG_SIGNED,
    MORE_PROCESSING,
    SESSION_SETUP,
    SUCCESS,
    TREE_CONNECT,
    USER_SESSION_DELETED,
    Raw,
    check,
    cmac_sign,
    connect_share,
    ntlm_context,
    tree_connect_body,
)

ECHO_BODY = struct.pack("<HH", 4, 0)


def flags(m):
    return struct.unpack_from("<I", m, 16)[0]


def message_id(m):
    return struct.unpack_from("<Q", m, 24)[0]


def level_with(raw, mid):
    """ECHOs (no session) on `raw` until its next message id is `mid`."""
    while raw.mid < mid:
        st, _ = raw.call(raw.header(ECHO, 0) + ECHO_BODY)
        check(st == SUCCESS, f"ECHO {raw.mid - 1} answered (got {st:#x})")


def replayed(raw, pdu, what):
    """Sends captured `pdu` on `raw` as it was: its answer must be
    USER_SESSION_DELETED, unsigned."""
    level_with(raw, message_id(pdu))
    raw.mid += 1
    st, r = raw.call(pdu)
    check(st == USER_SESSION_DELETED, f"{what}: STATUS_USER_SESSION_DELETED (got {st:#x})", False)
    check(
        flags(r) & FLAG_SIGNED == 0 and r[48:64] == b"\0" * 16,
        f"{what}: answered unsigned (flags {flags(r):#x}, signature {r[48:64].hex()})",
        False,
    )


def main():
    guid = uuid.uuid4()
    h = Raw(guid)
    sid, key, _ = connect_share(h)

    tc = cmac_sign(key, h.header(TREE_CONNECT, sid) + tree_connect_body())
    st, r = h.call(tc)
    check(st == SUCCESS and flags(r) & FLAG_SIGNED, f"home: signed TREE_CONNECT answered signed (got {st:#x})")
    replayed(Raw(uuid.uuid4()), tc, "TREE_CONNECT replayed by another client")
    replayed(Raw(guid), tc, "TREE_CONNECT replayed on a connection of the same client")

    # A binding of the session under way on the replaying connection: its
    # first leg (signed, as a channel sends it) is answered, then the
    # TREE_CONNECT's bytes are replayed there.
    b = Raw(guid)
    token = ntlm_context().step(None)
    leg = struct.pack("<HBBIIHHQ", 25, BINDING, 1, 0, 0, 64 + 24, len(token), 0) + token
    st, _ = b.call(cmac_sign(key, b.header(SESSION_SETUP, sid) + leg))
    check(st == MORE_PROCESSING, f"binding leg 1 answered (got {st:#x})")
    replayed(b, tc, "TREE_CONNECT replayed where a binding is under way")

    st, r = h.call(cmac_sign(key, h.header(ECHO, sid) + ECHO_BODY))
    check(st == SUCCESS and flags(r) & FLAG_SIGNED, f"home: signed ECHO still answered, signed (got {st:#x})")
    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
