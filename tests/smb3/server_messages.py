"""What smbprotocol lacks for server-initiated messages, shared by the
scripts that need it (cross_protocol.py, pending_create.py).

smbprotocol has no API for them: its receive thread looks every message
id up among the connection's outstanding requests. `Requests` replaces
that table and makes up a pending request for each lease or oplock break
(message id 0xFFFFFFFFFFFFFFFF) as it arrives, queued for the main
thread; `LeaseBreakAck` is the acknowledgment smbprotocol does not
define.
"""

from collections import OrderedDict

from smbprotocol.connection import Request
from smbprotocol.header import Commands, SMB2HeaderRequest
from smbprotocol.structure import BytesField, IntField, Structure

UNSOLICITED = 0xFFFFFFFFFFFFFFFF


class LeaseBreakAck(Structure):
    """[MS-SMB2] 2.2.24.2 Lease Break Acknowledgment."""

    COMMAND = Commands.SMB2_OPLOCK_BREAK

    def __init__(self):
        self.fields = OrderedDict(
            [
                ("structure_size", IntField(size=2, default=36)),
                ("reserved", IntField(size=2)),
                ("flags", IntField(size=4)),
                ("lease_key", BytesField(size=16)),
                ("lease_state", IntField(size=4)),
                ("lease_duration", IntField(size=8)),
            ]
        )
        super().__init__()


class Requests(dict):
    """The connection's outstanding requests, plus one made up for each
    server-initiated message, queued for the main thread."""

    def __init__(self, conn, arrived, existing):
        super().__init__(existing)
        self.conn = conn
        self.arrived = arrived

    def __missing__(self, message_id):
        if message_id != UNSOLICITED:
            raise KeyError(message_id)
        r = Request(SMB2HeaderRequest(), None, self.conn)
        self.arrived.put(r)
        return r
