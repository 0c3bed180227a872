"""A lease key is its client's (rksmbd; MS-SMB2 3.3.1.4: a LeaseTable per
ClientGuid). Two clients (two client GUIDs) open one file under the same
lease key, each asking RWH: the second is another lease, so the first is
sent a break of its write caching (review B-4: the second joined the
first's lease, both held RWH and no break was sent).

Usage: lease_key_other_client.py HOST PORT SHARE USER PASSWORD
Prints PASS.
"""

import struct
import uuid

from raw_channel import CREATE, SignedClient, check, create_with, lease_break_sent, lease_ctx


def main():
    key = uuid.uuid4().bytes
    a = SignedClient()
    st, _ = a.call(CREATE, create_with("f.txt", oplock=0xFF, ctxs=lease_ctx(key)))
    check(st == 0, f"the first client's leased open ({st:#x})")
    b = SignedClient()
    b.send(CREATE, create_with("f.txt", disposition=1, oplock=0xFF, ctxs=lease_ctx(key)))
    m = lease_break_sent(a, 5)
    new = struct.unpack_from("<I", m, 64 + 28)[0]
    check(new & 4 == 0, f"it breaks write caching (to {new})")
    check(m[64 + 8 : 64 + 24] == key, "it names the key as the client chose it")
    a.raw.s.close()
    b.raw.s.close()
    print("PASS")


if __name__ == "__main__":
    main()
