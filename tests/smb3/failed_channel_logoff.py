"""A LOGOFF sent through a bound channel whose close filterd refuses
changes nothing: the channel stays bound (rksmbd multichannel, raw SMB
3.0.2 channel over an smbprotocol session).

Usage: failed_channel_logoff.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose first close is refused (failpoint
`close.refuse:1:fail`). Connection A (smbprotocol) sets up the session
and opens kept.txt (not durable: LOGOFF closes it); connection B binds the
session and sends LOGOFF: it must fail with STATUS_INSUFFICIENT_RESOURCES.
Prints "refused" and waits for a line on stdin (the driver checks that
filterd still lists the handle). B is still a channel of the session: it
reads the open through it, and A too. A second LOGOFF through B succeeds
and B's next request finds the session gone. Prints "done" and waits for
a line (the driver checks filterd lists nothing). Prints PASS; exits
non-zero on any failure.
"""

import struct
import uuid

from raw_channel import READ, SUCCESS, USER_SESSION_DELETED, Raw, bind, check, cmac_sign, open_file, session
from smbtest import pause

LOGOFF = 2
STATUS_INSUFFICIENT_RESOURCES = 0xC000009A
DATA = b"written before the failed LOGOFF\n"


def logoff(b, key, sid):
    st, _ = b.call(cmac_sign(key, b.header(LOGOFF, sid) + struct.pack("<HH", 4, 0)))
    return st


def raw_read(b, key, sid, tid, fid):
    body = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, len(DATA), 0, fid, 0, 0, 0, 0, 0) + b"\0"
    st, r = b.call(cmac_sign(key, b.header(READ, sid, tid=tid) + body))
    if st != SUCCESS:
        return st, b""
    off, length = struct.unpack_from("<BxI", r, 64 + 2)
    return st, r[off : off + length]


guid = uuid.uuid4()
a, s1, tree = session(guid)
sid, tid = s1.session_id, tree.tree_connect_id
f = open_file(tree, "kept.txt")
f.write(DATA, 0)
b = Raw(guid)
key = bind(b, sid, s1.signing_key)

st = logoff(b, key, sid)
check(st == STATUS_INSUFFICIENT_RESOURCES, f"the LOGOFF through the channel whose close failed is refused ({st:#010x})")
pause("refused")

# Nothing changed: B is still a channel of the session, the open still
# the session's.
st, data = raw_read(b, key, sid, tid, f.file_id)
check(st == SUCCESS and data == DATA, f"the channel still reads the open after the failed LOGOFF ({st:#010x})")
check(f.read(0, len(DATA)) == DATA, "the home reads it too")
st = logoff(b, key, sid)
check(st == SUCCESS, f"the second LOGOFF through the channel succeeds ({st:#010x})")
st, _ = raw_read(b, key, sid, tid, f.file_id)
check(st == USER_SESSION_DELETED, f"then the channel's session is gone ({st:#010x})")
pause("done")
b.s.close()
print("PASS", flush=True)
