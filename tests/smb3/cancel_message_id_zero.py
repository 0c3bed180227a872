"""A synchronous CANCEL with MessageId 0 names the request run just before
it on the same connection and session (rksmbd; raw SMB 3.0.2, AES-CMAC).

Usage: cancel_message_id_zero.py HOST PORT SHARE USER PASSWORD

Samba's client (4.17) sends such a CANCEL for a request it has no interim
response for yet whenever the connection does not sign with AES-GMAC.
Client C (every request signed) opens directory w; client D (its own
connection) makes changes.

1. C sends a CHANGE_NOTIFY and at once a CANCEL with MessageId 0, before
   the interim response: the CHANGE_NOTIFY ends STATUS_CANCELLED.
2. C sends a CHANGE_NOTIFY, waits for its interim response, runs an ECHO,
   then sends a CANCEL with MessageId 0: it names the ECHO, not the
   CHANGE_NOTIFY, which is still waiting and is told of D's change.
3. C sends two CHANGE_NOTIFYs (directories w3 and w2) and a CANCEL with
   MessageId 0: with two waiting it names neither (it was meant for one of
   them, and taking it for the latter cancelled a request nobody
   cancelled: re-review rr39g A1); each is told of its own change.

Before, the CANCEL of step 1 named nothing and the CHANGE_NOTIFY waited on
(smbtorture's smb2.notify tests hung under AES-CMAC and SMB 3.0.2).

Prints one line per step and PASS; exits non-zero on any failure.
"""

import struct

from raw_channel import (
    CANCEL,
    CANCELLED,
    FAILURES,
    PENDING,
    SUCCESS,
    SignedClient,
    check,
    cmac_sign,
    create_body,
    opened,
    signed_made,
)

CHANGE_NOTIFY, ECHO = 0xF, 0xD
FILE_NAME = 0x1


def notify(c, fid):
    c.send(CHANGE_NOTIFY, struct.pack("<HHI16sII", 32, 0, 4096, fid, FILE_NAME, 0))


def cancel_message_id_zero(c):
    cancel = c.raw.header(CANCEL, c.sid, tid=c.tid, mid=0) + struct.pack("<HH", 4, 0)
    c.raw.send(cmac_sign(c.key, cancel))


def final(c, what):
    """The next response on `c` that is not an interim one: its status."""
    while True:
        st, m = c.recv()
        if st != PENDING:
            check(struct.unpack_from("<H", m, 12)[0] == CHANGE_NOTIFY, f"{what}: the CHANGE_NOTIFY's answer", False)
            return st


def main():
    c, d = SignedClient(), SignedClient()
    w = opened(c, create_body("w", access=0x1, attributes=0x10, disposition=3, options=0x1))

    notify(c, w)
    cancel_message_id_zero(c)
    st = final(c, "CANCEL before the interim response")
    check(st == CANCELLED, f"CANCEL with MessageId 0 right after it: STATUS_CANCELLED (got {st:#010x})")

    notify(c, w)
    st, _ = c.recv()
    check(st == PENDING, f"a second CHANGE_NOTIFY waits (got {st:#010x})")
    st, _ = c.call(ECHO, struct.pack("<HH", 4, 0))
    check(st == SUCCESS, f"an ECHO runs after it (got {st:#010x})")
    cancel_message_id_zero(c)
    signed_made(d.raw, d.sid, d.key, d.tid, "w\\made")
    st = final(c, "CANCEL after another request")
    check(st == SUCCESS, f"a CANCEL with MessageId 0 after the ECHO names the ECHO (got {st:#010x})")

    # Two fresh directories: w may still hold changes of step 2 (a create
    # can come as several events), which would answer a request on it at
    # once and leave one waiting.
    w2 = opened(c, create_body("w2", access=0x1, attributes=0x10, disposition=3, options=0x1))
    w3 = opened(c, create_body("w3", access=0x1, attributes=0x10, disposition=3, options=0x1))
    notify(c, w3)
    notify(c, w2)
    cancel_message_id_zero(c)
    # Both wait before D makes its change: D's connection is served by
    # another thread, and a change made before a request placed its watch
    # is not told.
    for _ in range(2):
        st, _ = c.recv()
        check(st == PENDING, f"both CHANGE_NOTIFYs wait (got {st:#010x})")
    signed_made(d.raw, d.sid, d.key, d.tid, "w2\\made")
    st = final(c, "CANCEL after two pipelined requests")
    check(st == SUCCESS, f"a CANCEL with MessageId 0 after two waiting requests names neither: the second is told of its change (got {st:#010x})")
    signed_made(d.raw, d.sid, d.key, d.tid, "w3\\made")
    st = final(c, "the first of two pipelined requests")
    check(st == SUCCESS, f"the first still waits and is told of its change (got {st:#010x})")
    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
