"""What a client that never logs on may make rksmbd hold (rksmbd; raw
SMB 3.0.2; adversarial review of the pre-authentication surface).

Usage: preauth_limits.py HOST PORT SHARE USER PASSWORD memory PID
       preauth_limits.py HOST PORT SHARE USER PASSWORD deadline SECS

memory (rksmbd's process id PID, default --logon-timeout):
1. A SESSION_SETUP whose security blob is over 16 KiB, and one whose
   NTLMSSP NEGOTIATE is over 1 KiB, are STATUS_INVALID_PARAMETER.
2. One connection may have 4 sessions half made: a fifth first leg is
   STATUS_INSUFFICIENT_RESOURCES; one of the four then logs on.
3. CONNS connections each send LEGS first legs whose NEGOTIATE is 65,000
   bytes, then LEGS with a 1,000-byte one, and stay: rksmbd's VmRSS
   grows by less than GROWTH_MIB. Before, each half-made session kept
   two copies of its NEGOTIATE, 64 of them per connection, and 120 such
   connections took rksmbd from 22 MB to 1 GB.

deadline (rksmbd started with --logon-timeout SECS):
4. A connection with a half-made session, and one that sent nothing, are
   ended about SECS after they connected; a connection logged on at the
   same time is still served. Before, they stayed as long as they liked.

Prints one line per step; exits non-zero on any failure.
"""

import socket
import struct
import sys
import time
import uuid

from raw_channel import (
    FAILURES,
    HOST,
    INVALID_PARAMETER,
    MORE_PROCESSING,
    PORT,
    SESSION_SETUP,
    SUCCESS,
    TREE_CONNECT,
    Raw,
    check,
    cmac_sign,
    connect_share,
    ntlm_context,
    smb3kdf,
    tree_connect_body,
)

INSUFFICIENT_RESOURCES = 0xC000009A
HALF_SESSIONS = 4
CONNS = 64
LEGS = 64
GROWTH_MIB = 100


def ntlm_negotiate(size):
    """A raw NTLMSSP NEGOTIATE of `size` bytes (padded after its fields)."""
    fixed = b"NTLMSSP\0" + struct.pack("<II", 1, 0xE2088297) + b"\0" * 16 + bytes([10, 0, 0x61, 0x4A, 0, 0, 0, 15])
    return fixed + b"\0" * (size - len(fixed))


def first_leg(raw, token):
    """A new session's first SESSION_SETUP leg carrying `token`: its
    status and the response."""
    body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), 0) + token
    return raw.call(raw.header(SESSION_SETUP, 0) + body)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def memory(pid):
    r = Raw(uuid.uuid4())
    st, _ = first_leg(r, ntlm_negotiate(20_000))
    check(
        st == INVALID_PARAMETER, f"a 20,000-byte security blob is STATUS_INVALID_PARAMETER (got {st:#010x})", False
    )
    st, _ = first_leg(r, ntlm_negotiate(2_000))
    check(st == INVALID_PARAMETER, f"a 2,000-byte NTLM NEGOTIATE is STATUS_INVALID_PARAMETER (got {st:#010x})", False)

    half = []
    for _ in range(HALF_SESSIONS):
        ctx = ntlm_context()
        st, m = first_leg(r, ctx.step(None))
        check(st == MORE_PROCESSING, f"a first leg is answered (got {st:#010x})")
        half.append((ctx, m))
    st, _ = first_leg(r, ntlm_context().step(None))
    check(
        st == INSUFFICIENT_RESOURCES,
        f"past {HALF_SESSIONS} half-made sessions a first leg is STATUS_INSUFFICIENT_RESOURCES (got {st:#010x})",
        False,
    )
    ctx, m = half[0]
    sid = struct.unpack_from("<Q", m, 40)[0]
    off, length = struct.unpack_from("<HH", m, 64 + 4)
    token = ctx.step(m[off : off + length])
    body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), 0) + token
    st, _ = r.call(r.header(SESSION_SETUP, sid) + body)
    check(st == SUCCESS, f"one of the half-made sessions logs on (got {st:#010x})")
    key = smb3kdf(ctx.session_key[:16].ljust(16, b"\0"), b"SMB2AESCMAC\x00", b"SmbSign\x00")
    st, _ = r.call(cmac_sign(key, r.header(TREE_CONNECT, sid) + tree_connect_body()))
    check(st == SUCCESS, f"and connects the share (got {st:#010x})")

    before = rss_mib(pid)
    held = []
    for _ in range(CONNS):
        c = Raw(uuid.uuid4())
        for size in (65_000, 1_000):
            for _ in range(LEGS):
                st, _ = first_leg(c, ntlm_negotiate(size))
                if st not in (MORE_PROCESSING, INVALID_PARAMETER, INSUFFICIENT_RESOURCES):
                    check(False, f"a hostile first leg got {st:#010x}")
        held.append(c)
    after = rss_mib(pid)
    check(
        after - before < GROWTH_MIB,
        f"{CONNS} connections × {2 * LEGS} hostile first legs grew rksmbd's RSS by {after - before} MiB "
        f"({before} → {after}), under {GROWTH_MIB}",
        False,
    )
    for c in held:
        c.s.close()


def deadline(secs):
    start = time.monotonic()
    half = Raw(uuid.uuid4())
    st, _ = first_leg(half, ntlm_context().step(None))
    check(st == MORE_PROCESSING, f"a half-made session (got {st:#010x})")
    silent = socket.create_connection((HOST, PORT), timeout=10)
    good = Raw(uuid.uuid4())
    sid, key, _ = connect_share(good)
    for name, sock in (("a half-made session", half.s), ("nothing sent", silent)):
        sock.settimeout(secs + 30)
        try:
            got = sock.recv(1)
        except (ConnectionResetError, socket.timeout) as e:
            got = e
        took = time.monotonic() - start
        check(got in (b"",) or isinstance(got, ConnectionResetError), f"the connection with {name} was ended ({got!r})")
        check(secs - 1 <= took <= secs + 10, f"after {took:.1f} s, its deadline being {secs} s")
    st, _ = good.call(cmac_sign(key, good.header(TREE_CONNECT, sid) + tree_connect_body()))
    check(st == SUCCESS, f"the connection logged on is still served (got {st:#010x})")


def main():
    mode, arg = sys.argv[6], sys.argv[7]
    if mode == "memory":
        memory(int(arg))
    else:
        deadline(float(arg))
    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
