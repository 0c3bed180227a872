"""A LOGOFF of a session with five persistent CREATEs answered
STATUS_SERVER_UNAVAILABLE, sent while filterd is still stalled (raw SMB
3.0.2).

Usage: late_logoff_stalled.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a 1 s call timeout (RKFILTER_CALL_TIMEOUT_MS).

1. Client A prints "ready" and waits (the driver SIGSTOPs filterd); sends
   persistent (DH2Q) exclusive OPEN_IF CREATEs of s0.txt .. s4.txt, each
   of which must fail STATUS_SERVER_UNAVAILABLE.
2. A LOGOFFs, filterd still stopped: it must succeed within 2.5 s. The
   closes of the five late opens wait for filterd; done on the
   connection before the reply they took a call timeout each (5 s).
   Prints "logged off" and waits (the driver SIGCONTs filterd and waits
   until it holds no handle).
3. Client B's exclusive CREATE of each file succeeds (retried for up to
   10 s: filterd's late answers may still be on their way). Closed.

Prints PASS; exits non-zero on any failure.
"""

import struct
import time
import uuid

from raw_channel import SUCCESS, check, cmac_sign, final, patient_share, persistent_create, signed_close, signed_create
from smbtest import pause

SERVER_UNAVAILABLE = 0xC0000466
OPEN_IF = 3
LOGOFF = 2
FILES = [f"s{i}.txt" for i in range(5)]


def main():
    a, sid, key, tid = patient_share(uuid.uuid4())
    pause("ready")
    for name in FILES:
        st, _ = final(a, persistent_create(a, sid, key, tid, name, uuid.uuid4(), OPEN_IF, share=0))
        check(st == SERVER_UNAVAILABLE, f"the CREATE of {name}: STATUS_SERVER_UNAVAILABLE (got {st:#010x})")

    start = time.monotonic()
    st, _ = final(a, cmac_sign(key, a.header(LOGOFF, sid) + struct.pack("<HH", 4, 0)))
    took = time.monotonic() - start
    check(st == SUCCESS, f"A logs off (got {st:#010x})")
    check(took < 2.5, f"the LOGOFF is answered before its closes (took {took:.1f} s)")
    pause("logged off")

    b, bsid, bkey, btid = patient_share(uuid.uuid4())
    for name in FILES:
        deadline = time.monotonic() + 10
        while True:
            st, m = final(b, signed_create(b, bsid, bkey, btid, name, 0, OPEN_IF))
            if st == SUCCESS or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        check(st == SUCCESS, f"another client's exclusive CREATE of {name} (got {st:#010x})")
        if st == SUCCESS:
            signed_close(b, bsid, bkey, btid, m[128:144])
    print("PASS", flush=True)


main()
