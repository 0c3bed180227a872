"""A channel bound while its session logs off at the home carries no
lease breaks of the session's user (review rr39k A4).

Connections B, A and C of one client GUID, in that order. Session S of
USER is set up on A, and bound on B: rksmbd holds the binding after its
success (RKSMBD_TEST_BINDING_DELAY_MS), and S logs off on A meanwhile.
Session S2 of USER on C takes an RWH lease; another client's open breaks
it. The break must go to C, the oldest connection with a live session of
the lease's user. Before, the binding wrote B down for S after the LOGOFF
had taken S off every connection: B, older, kept carrying USER's breaks
for a session long gone, and C never heard of the break.

Run by a driver (tests/tests/rksmbd.rs): after "binding sent" it waits
for rksmbd's log to show the binding held, then says "go".

Usage: binding_ended_meanwhile.py HOST PORT SHARE USER PASSWORD
"""

import struct
import threading
import uuid

from raw_channel import (
    CREATE,
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
from smbtest import pause

LOGOFF, OPLOCK_BREAK = 0x02, 0x12
BREAK_ID = 2**64 - 1


def main():
    guid = uuid.uuid4()
    b = Raw(guid)
    b.s.settimeout(30)
    a = Raw(guid)
    a.s.settimeout(30)
    sid, key_a, tid = connect_share(a)
    c = Raw(guid)
    c.s.settimeout(30)
    sid2, key_c, tid2 = connect_share(c)

    bound = {}
    t = threading.Thread(target=lambda: bound.update(key=bind(b, sid, key_a)))
    t.start()
    # The binding's second leg is held at rksmbd (RKSMBD_TEST_BINDING_DELAY_MS):
    # the driver waits for rksmbd's log to say so; S logs off within.
    pause("binding sent")
    st, _ = a.call(cmac_sign(key_a, a.header(LOGOFF, sid) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, f"S logged off on A (got {st:#010x})")
    t.join()
    check("key" in bound, "B's binding answered")

    lkey = uuid.uuid4().bytes
    name = f"bound{uuid.uuid4().hex[:8]}.txt"
    st, m = final(c, leased_create(c, sid2, key_c, tid2, name, lkey, 7, disposition=3))
    check(st == SUCCESS, f"C opened {name} with an RWH lease (got {st:#010x})")
    fid_c = m[128:144]

    d = Raw(uuid.uuid4())
    d.s.settimeout(30)
    sid_d, key_d, tid_d = connect_share(d)
    d.send(cmac_sign(key_d, d.header(CREATE, sid_d, tid=tid_d) + create_body(name)))

    c.s.settimeout(8)
    try:
        m = c.recv()
    except OSError as e:
        m = None
        check(False, f"C is sent the break of its lease (nothing within 8 s: {e!r})")
    cmd, mid = struct.unpack_from("<H", m, 12)[0], struct.unpack_from("<Q", m, 24)[0]
    check((cmd, mid) == (OPLOCK_BREAK, BREAK_ID), f"C is sent a lease break notification (command {cmd:#x})")
    check(m[64 + 8 : 64 + 24] == lkey, "for C's lease")
    state = struct.unpack_from("<I", m, 64 + 28)[0]
    c.s.settimeout(30)
    ack = cmac_sign(key_c, c.header(OPLOCK_BREAK, sid2) + struct.pack("<HHI16sIQ", 36, 0, 0, lkey, state, 0))
    st, _ = final(c, ack)
    check(st == SUCCESS, f"C's acknowledgment answered STATUS_SUCCESS (got {st:#010x})")
    st, m = final(d, None)
    check(st == SUCCESS, f"the other client's open went through (got {st:#010x})")
    signed_close(d, sid_d, key_d, tid_d, m[128:144])
    signed_close(c, sid2, key_c, tid2, fid_c)
    print("PASS", flush=True)


main()
