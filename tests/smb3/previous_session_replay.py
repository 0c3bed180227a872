"""A CREATE replayed after a new session ended the old one (rksmbd).

Usage: previous_session_replay.py HOST PORT SHARE USER PASSWORD

A client opens `prev.txt` on a persistent handle; its reply is taken as
lost, and the client's connection stays open but silent (half open, as
after a network blip the server has not noticed). The client connects
again and sets up a session with PreviousSessionId naming the old one
(MS-SMB2 3.3.5.5.3: the old session ends, its durable opens are kept for
a reconnect), then replays the CREATE (SMB2_FLAGS_REPLAY_OPERATION, the
same create GUID): it gets the same open, writes through it and closes
it. Before, the old connection still held the create GUID in rksmbd and
the replay was STATUS_FILE_NOT_AVAILABLE for good, its handle left
attached with no open behind it. Prints PASS, or exits non-zero.
"""

import uuid

from smbprotocol import session as smb_session
from smbprotocol.open import CreateDisposition

from smbtest import SHARE_ALL, args, check, connect, create_rw, persistent_context, sent_as_replay

HOST, PORT, SHARE, USER, PASSWORD = args()
CLIENT_GUID = uuid.uuid4()
CREATE_GUID = uuid.uuid4()


def with_previous_session(previous, call):
    """Runs `call`, every SESSION_SETUP it sends naming `previous` as
    PreviousSessionId (smbprotocol has no way to ask for it)."""
    made = smb_session.SMB2SessionSetupRequest

    def naming():
        req = made()
        req["previous_session_id"] = previous
        return req

    smb_session.SMB2SessionSetupRequest = naming
    try:
        return call()
    finally:
        smb_session.SMB2SessionSetupRequest = made


def create(tree):
    """The persistent open of prev.txt, sharing all."""
    f, _ = create_rw(tree, "prev.txt", CreateDisposition.FILE_OPEN_IF, [persistent_context(CREATE_GUID)], share=SHARE_ALL)
    return f


def main():
    old_conn, old_tree = connect(HOST, PORT, SHARE, USER, PASSWORD, CLIENT_GUID)
    first = create(old_tree)
    old_session = old_tree.session.session_id
    # The old connection stays open and says nothing more.
    conn, tree = with_previous_session(
        old_session, lambda: connect(HOST, PORT, SHARE, USER, PASSWORD, CLIENT_GUID)
    )
    again = sent_as_replay(lambda: create(tree))
    check(again.file_id[:8] == first.file_id[:8], "the replay gets the same persistent open")
    again.write(b"replayed\n", 0)
    check(again.read(0, 9) == b"replayed\n", "it reads back what it wrote")
    again.close()
    conn.disconnect()
    old_conn.disconnect(close=False)
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
