"""A persistent CREATE under an AppInstanceId that filterd answers after
rksmbd's call gave up, never replayed; the application fails over to
another client (smbprotocol).

Usage: late_app_instance.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS).

1. Client A prints "ready" and waits (the driver SIGSTOPs filterd); opens
   app.txt persistent (DH2Q) under AppInstanceId X, which must fail with
   STATUS_SERVER_UNAVAILABLE; prints "gave up" and waits (the driver
   SIGCONTs filterd and waits for the late open to be left detached).
2. Client B, the application failed over, opens app.txt persistent under
   X with another create GUID: it must succeed at once (MS-SMB2
   3.3.5.9.13: the instance's earlier open is closed first), not be
   refused by the open A never learnt of. Closed.

Prints PASS; exits non-zero on any failure.
"""

import uuid

from smbprotocol.exceptions import SMBResponseException

from smbtest import args, check, connect, open_app_instance, pause

SERVER = args()
APP = uuid.uuid4().bytes


def open_app(tree):
    return open_app_instance(tree, "app.txt", APP)


a, a_tree = connect(*SERVER)
pause("ready")
try:
    open_app(a_tree)
    check(False, "the CREATE filterd answered late fails")
except SMBResponseException as e:
    check(e.status == 0xC0000466, f"the CREATE filterd answered late: STATUS_SERVER_UNAVAILABLE ({e.status:#x})")
pause("gave up")

b, b_tree = connect(*SERVER)
try:
    f = open_app(b_tree)
    check(True, "the failed-over instance's CREATE succeeds")
except SMBResponseException as e:
    check(False, f"the failed-over instance's CREATE succeeds ({e.status:#x})")
f.close()
b.disconnect()
a.disconnect()
print("PASS", flush=True)
