"""Failed logons on a connection another user's session shares (rksmbd;
raw SMB 3.0.2; a terminal server's or a cifs `multiuser` mount's
connection carries several users' sessions). Review: three wrong
passwords of bob ended the whole connection, alice's next ECHO found it
gone; and each of bob's attempts waited its turn asleep in the
connection's only thread, alice's signed ECHO held 23.5 s behind it.

Usage: logon_shared_connection.py HOST PORT SHARE USER PASSWORD

1. USER (alice) logs on; on the same connection bob fails five times,
   each STATUS_LOGON_FAILURE: the connection stays, alice's ECHO is
   answered.
2. bob's sixth attempt (it waits its turn, 2.5 s after his fifth
   failure) is sent with alice's signed ECHO right behind it: the ECHO
   is answered first, well before bob's STATUS_LOGON_FAILURE, which
   comes after bob's wait (timed from the fifth failure's answer, as
   rksmbd counts it).
3. On a connection nobody logged on, a third failure sent with an ECHO
   behind it: its STATUS_LOGON_FAILURE arrives, then the connection is
   ended (shut down at once with the ECHO unread, it was reset).

Prints one line per step; exits non-zero on any failure.
"""

import struct
import time
import uuid

from raw_channel import (
    ECHO,
    FAILURES,
    MORE_PROCESSING,
    SESSION_SETUP,
    SUCCESS,
    Raw,
    auth_leg,
    check,
    cmac_sign,
    ended,
    logon,
)

LOGON_FAILURE = 0xC000006D
# rksmbd's wait per failure (logons::STEP).
STEP = 0.5
# bob's failures on alice's connection before the attempt that waits.
BOB_FAILURES = 5


def echo(raw, sid, key):
    """An ECHO of session `sid`, signed with `key` when given."""
    msg = raw.header(ECHO, sid) + struct.pack("<HH", 4, 0)
    return cmac_sign(key, msg) if key else msg


def fail(raw, user):
    """A wrong password of `user` on `raw`: its final status."""
    st, _, pdu = auth_leg(raw, user, "wrong")
    if st != MORE_PROCESSING:
        return st
    return raw.call(pdu)[0]


def answers(raw, n):
    """The next `n` answers on `raw`: (command, status, seconds since
    now) each."""
    start = time.monotonic()
    out = []
    for _ in range(n):
        r = raw.recv()
        out.append((struct.unpack_from("<H", r, 12)[0], struct.unpack_from("<I", r, 8)[0], time.monotonic() - start))
    return out


def main():
    r = Raw(uuid.uuid4())
    sid, key = logon(r)
    # Five failures: bob's next wait (5 x STEP) outlasts, with room, the
    # ECHO and the NEGOTIATE leg sent before it on a loaded machine, so
    # his attempt is still waiting when alice's ECHO comes (re-review
    # rr-rk3b 3: after three, 1.5 s, it could be due already).
    for n in range(BOB_FAILURES):
        st = fail(r, "bob")
        check(st == LOGON_FAILURE, f"bob's wrong password #{n + 1} on alice's connection is STATUS_LOGON_FAILURE (got {st:#x})", False)
    # rksmbd counts bob's next turn from his last failure: BOB_FAILURES x STEP.
    third = time.monotonic()
    try:
        st = r.call(echo(r, sid, key))[0]
    except (OSError, EOFError) as e:
        st = repr(e)
    check(st == SUCCESS, f"after bob's failures alice's connection is served (ECHO: {st})")

    st, _, pdu = auth_leg(r, "bob", "wrong")
    check(st == MORE_PROCESSING, f"bob's next attempt gets its challenge (got {st:#x})")
    r.send(pdu)
    r.send(echo(r, sid, key))
    sent = time.monotonic()
    got = answers(r, 2)
    check(
        [(c, s) for c, s, _ in got] == [(ECHO, SUCCESS), (SESSION_SETUP, LOGON_FAILURE)],
        f"alice's ECHO is answered before bob's waiting attempt ({got})",
        False,
    )
    ((_, _, echo_t), (_, _, bob_t)) = got
    # bob's wait from the receipt of his third failure (0.2 s allowed for
    # its way to us), not from the send: the ECHO and NEGOTIATE leg
    # between them take what they take on a loaded machine.
    bob_t += sent - third
    check(bob_t >= BOB_FAILURES * STEP - 0.2, f"bob's next attempt waited its turn ({bob_t:.2f} s after his last failure)", False)
    check(echo_t < bob_t / 2, f"alice's ECHO was answered well within bob's wait ({echo_t:.2f} s from its send, bob {bob_t:.2f} s)", False)
    check(r.call(echo(r, sid, key))[0] == SUCCESS, "alice's connection is still served")

    c = Raw(uuid.uuid4(), "127.0.0.3")
    for n in range(2):
        st = fail(c, "carol")
        check(st == LOGON_FAILURE, f"carol's wrong password #{n + 1} is STATUS_LOGON_FAILURE (got {st:#x})", False)
    # dave has no turn to wait for: his failure is answered at once, the
    # ECHO sent with it still unread when the connection is ended.
    st, _, pdu = auth_leg(c, "dave", "wrong")
    c.s.sendall(b"".join(struct.pack(">I", len(p)) + p for p in (pdu, echo(c, 0, None))))
    try:
        got = [(cmd, s) for cmd, s, _ in answers(c, 1)]
    except (OSError, EOFError) as e:
        got = repr(e)
    check(got == [(SESSION_SETUP, LOGON_FAILURE)], f"the third failure, pipelined with an ECHO, is answered ({got})", False)
    check(ended(c), "then carol's connection is ended", False)

    check(not FAILURES, f"no step failed ({len(FAILURES)} did)")
    print("PASS", flush=True)


main()
