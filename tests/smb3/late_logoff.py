"""A persistent CREATE that filterd answers after rksmbd's call gave up,
never replayed by its client, which logs off (raw SMB 3.0.2).

Usage: late_logoff.py HOST PORT SHARE USER PASSWORD

Run against an rksmbd with a short call timeout (RKFILTER_CALL_TIMEOUT_MS).

1. Client A prints "ready" and waits (the driver SIGSTOPs filterd); sends
   a persistent (DH2Q) exclusive OPEN_IF CREATE of logoff.txt, which must
   fail with STATUS_SERVER_UNAVAILABLE; prints "gave up" and waits (the
   driver SIGCONTs filterd and waits for the late open to be left
   detached, for a replay; or keeps it stopped).
2. A does not replay it (as smbprotocol, Samba's libsmb or an older
   Linux client): it LOGOFFs, which must succeed; prints "logged off"
   and waits (a driver that kept filterd stopped until now SIGCONTs it
   and waits for the late open to be closed).
3. Client B's exclusive CREATE of logoff.txt must succeed at once: the
   open A never learnt of is gone with A's session, not held for its
   durable timeout. Closed.

Prints PASS; exits non-zero on any failure.
"""

import struct
import uuid

from raw_channel import SUCCESS, check, cmac_sign, final, patient_share, persistent_create, signed_close, signed_create
from smbtest import pause

SERVER_UNAVAILABLE = 0xC0000466
OPEN_IF = 3
LOGOFF = 2


def main():
    a, sid, key, tid = patient_share(uuid.uuid4())
    pause("ready")
    st, _ = final(a, persistent_create(a, sid, key, tid, "logoff.txt", uuid.uuid4(), OPEN_IF, share=0))
    check(st == SERVER_UNAVAILABLE, f"the CREATE filterd answered late: STATUS_SERVER_UNAVAILABLE (got {st:#010x})")
    pause("gave up")

    st, _ = final(a, cmac_sign(key, a.header(LOGOFF, sid) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, f"A logs off (got {st:#010x})")
    pause("logged off")

    b, bsid, bkey, btid = patient_share(uuid.uuid4())
    st, m = final(b, signed_create(b, bsid, bkey, btid, "logoff.txt", 0, OPEN_IF))
    check(st == SUCCESS, f"another client's exclusive CREATE succeeds at once (got {st:#010x})")
    signed_close(b, bsid, bkey, btid, m[128:144])
    print("PASS", flush=True)


main()
