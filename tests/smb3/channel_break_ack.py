"""A lease break acknowledgment sent on a bound channel while that channel
waits for its session's home (review rvpanic).

Session S is set up on connection A and bound on B (same client GUID).
Through A the client holds a lease on a file; through B it sends a request
the home answers only once the lease is broken — a rename (SET_INFO,
answered synchronously while the home waits for the acknowledgment), then
a compound CREATE (its CREATE waits synchronously: only the last request of
a compound goes async). The break goes to A, the client's oldest
connection; the client acknowledges it on B (MS-SMB2 lets it use any
channel). B must read and answer its socket while it waits for the home:
an ECHO sent on B meanwhile is answered at once, the acknowledgment
STATUS_SUCCESS, and the request goes through well before filterd's break
timeout. Before, B's thread served only its inbox while it waited: the
ECHO and the acknowledgment lay unread until the break timed out, and the
acknowledgment was then refused.

Usage: channel_break_ack.py HOST PORT SHARE USER PASSWORD WITHIN — WITHIN
the seconds the request may take (below filterd's break timeout).
"""

import struct
import sys
import time
import uuid

WITHIN = float(sys.argv[6])
sys.argv = sys.argv[:6]

from raw_channel import (  # noqa: E402
    CREATE,
    ECHO,
    PENDING,
    SUCCESS,
    Raw,
    bind,
    check,
    cmac_sign,
    connect_share,
    create_body,
    final,
    leased_create,
    signed_close,
)

SET_INFO, OPLOCK_BREAK = 0x11, 0x12
BREAK_ID = 2**64 - 1


def rename(r, sid, key, tid, fid, to):
    t = to.encode("utf-16-le")
    info = struct.pack("<B7sQI", 0, b"\0" * 7, 0, len(t)) + t
    body = struct.pack("<HBBIHHI16s", 33, 1, 10, len(info), 64 + 32, 0, 0, fid) + info
    return cmac_sign(key, r.header(SET_INFO, sid, tid=tid) + body)


def echo(r, sid, key):
    return cmac_sign(key, r.header(ECHO, sid) + struct.pack("<HH", 4, 0))


def lease_ack(r, sid, key, lkey, state):
    body = struct.pack("<HHI16sIQ", 36, 0, 0, lkey, state, 0)
    return cmac_sign(key, r.header(OPLOCK_BREAK, sid) + body)


def cmd_status(m):
    return struct.unpack_from("<H", m, 12)[0], struct.unpack_from("<I", m, 8)[0]


def break_on_a(a, lkey):
    """The lease break notification A is sent: the state to acknowledge."""
    m = a.recv()
    cmd, mid = cmd_status(m)[0], struct.unpack_from("<Q", m, 24)[0]
    check((cmd, mid) == (OPLOCK_BREAK, BREAK_ID), f"A is sent a lease break notification (command {cmd:#x})")
    check(m[64 + 8 : 64 + 24] == lkey, "for A's lease")
    return struct.unpack_from("<I", m, 64 + 28)[0]


def waits_for_an_ack_on_b(a, b, sid, key, lkey, request, waiting, what):
    """Sends `request` (its first command `waiting`) on B, which waits at
    the home for a break of A's lease `lkey`: an ECHO sent on B meanwhile
    must be answered at once, the break acknowledged on B STATUS_SUCCESS,
    and `request` answered STATUS_SUCCESS within WITHIN seconds. Its
    answer."""
    t0 = time.monotonic()
    b.send(request)
    state = break_on_a(a, lkey)
    b.send(echo(b, sid, key))
    cmd, st = cmd_status(b.recv())
    check((cmd, st) == (ECHO, SUCCESS), f"B's ECHO is answered while the {what} waits (got {cmd:#x} {st:#010x})")
    b.send(lease_ack(b, sid, key, lkey, state))
    got = {}
    while OPLOCK_BREAK not in got or waiting not in got:
        m = b.recv()
        cmd, st = cmd_status(m)
        if st == PENDING:
            continue
        got[cmd] = (st, m)
        print(f"B: command {cmd:#x} answered {st:#010x} after {time.monotonic() - t0:.2f} s", flush=True)
    took = time.monotonic() - t0
    st = got[OPLOCK_BREAK][0]
    check(st == SUCCESS, f"the acknowledgment on B is answered STATUS_SUCCESS (got {st:#010x})")
    st = got[waiting][0]
    check(st == SUCCESS, f"the {what} succeeded (got {st:#010x})")
    check(took < WITHIN, f"the {what} was answered in {took:.2f} s (under {WITHIN} s)")
    return got[waiting][1]


def main():
    guid = uuid.uuid4()
    a = Raw(guid)
    a.s.settimeout(90)
    sid, key_a, tid = connect_share(a)
    b = Raw(guid)
    b.s.settimeout(90)
    key_b = bind(b, sid, key_a)

    # 1. A rename forwarded from B, answered while the home waits.
    lkey = uuid.uuid4().bytes
    name = f"renamed{uuid.uuid4().hex[:8]}.txt"
    st, m = final(a, leased_create(a, sid, key_a, tid, name, lkey, 3))
    check(st == SUCCESS, f"A opened {name} with an RH lease (got {st:#010x})")
    fid_a = m[128:144]
    st, m = final(b, cmac_sign(key_b, b.header(CREATE, sid, tid=tid) + create_body(name, access=0x00010080, disposition=1)))
    check(st == SUCCESS, f"B opened it for DELETE, no lease (got {st:#010x})")
    fid_b = m[128:144]
    ren = rename(b, sid, key_b, tid, fid_b, name + ".new")
    waits_for_an_ack_on_b(a, b, sid, key_b, lkey, ren, SET_INFO, "rename")
    signed_close(b, sid, key_b, tid, fid_b)
    signed_close(a, sid, key_a, tid, fid_a)

    # 2. A compound CREATE from B: its CREATE waits at the home.
    lkey = uuid.uuid4().bytes
    name = f"leased{uuid.uuid4().hex[:8]}.txt"
    st, m = final(a, leased_create(a, sid, key_a, tid, name, lkey, 7))
    check(st == SUCCESS, f"A opened {name} with an RWH lease (got {st:#010x})")
    fid_a = m[128:144]
    body = create_body(name)
    first = 64 + len(body)
    first += -first % 8
    create = cmac_sign(key_b, b.header(CREATE, sid, next_command=first, tid=tid) + body + b"\0" * (first - 64 - len(body)))
    m = waits_for_an_ack_on_b(a, b, sid, key_b, lkey, create + echo(b, sid, key_b), CREATE, "compound CREATE")
    signed_close(b, sid, key_b, tid, m[128:144])
    signed_close(a, sid, key_a, tid, fid_a)

    # 3. The channel's credits add up: the home's grants for B's requests
    # are B's. Two ECHOs each charging 6,000 credits pass only if the
    # first one's answer granted them back (B's own answers, the binding's,
    # granted 8,192 at most).
    for i in range(2):
        m = cmac_sign(key_b, b.header(ECHO, sid, charge=6000) + struct.pack("<HH", 4, 0))
        try:
            st, r = final(b, m)
            granted = struct.unpack_from("<H", r, 14)[0]
        except (EOFError, OSError) as e:
            st, granted = repr(e), 0
        check(st == SUCCESS, f"B's ECHO {i + 1} charging 6,000 credits is served (got {st}, {granted} granted)")
    print("PASS", flush=True)


main()
