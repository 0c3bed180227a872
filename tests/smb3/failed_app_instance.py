"""An AppInstanceId takeover whose close filterd could not commit leaves the
old open to its client (rksmbd, smbprotocol).

Usage: failed_app_instance.py HOST PORT SHARE USER PASSWORD

Run against a filterd whose second commit fails (the first records the
first persistent open, the second is the close of it that the takeover
asks for). Client A opens app.txt persistent under an AppInstanceId;
client B opens it under the same id (another create GUID), which closes
A's open first — that close fails, so B is refused (A's open still holds
the file). Prints "refused" and waits for a line on stdin (the driver
checks that filterd still lists the handle). A's FileId still writes and
reads, and its CLOSE succeeds. Prints "done" and waits for a line (the
driver checks filterd lists nothing). Prints PASS; exits non-zero on any
failure.
"""

import uuid

from smbprotocol.exceptions import SMBResponseException

from smbtest import args, check, connect, open_app_instance, pause

SERVER = args()
APP = uuid.uuid4().bytes
DATA = b"written after the failed takeover\n"


def open_app(tree):
    return open_app_instance(tree, "app.txt", APP)


a, a_tree = connect(*SERVER)
f = open_app(a_tree)
b, b_tree = connect(*SERVER)
try:
    open_app(b_tree)
    check(False, "the takeover whose close failed is refused")
except SMBResponseException as e:
    check(e.status == 0xC0000043, f"the takeover whose close failed is refused ({e.status:#x})")
pause("refused")

# A's open is still A's.
f.write(DATA, 0)
check(f.read(0, len(DATA)) == DATA, "the old FileId still writes and reads")
f.close()
check(True, "its CLOSE succeeds")
pause("done")
b.disconnect()
a.disconnect()
print("PASS", flush=True)
