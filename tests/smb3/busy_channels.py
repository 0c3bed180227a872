"""Channels that keep the home busy do not starve the home's own socket
(rksmbd multichannel, issue 14; smbprotocol plus raw SMB 3.0.2).

Usage: busy_channels.py HOST PORT SHARE USER PASSWORD

Connection A (smbprotocol, SMB 3.0.2) sets up session S1 and writes a
1 MiB file. CHANNELS raw connections bind S1 as channels; each keeps one
READ of the whole file in flight (reads its answer, sends the next), so
the home always has a forwarded PDU queued. Meanwhile A's CREATE+CLOSEs
must each be answered within PROMPT seconds (before, the home served its
channels' queue until it was empty, which with two busy channels it
never was: A waited minutes). Then the channels stop and A still serves.

Prints one line per step; exits non-zero on any failure.
"""

import struct
import threading
import time
import uuid

from raw_channel import READ, SUCCESS, charge_for, check, cmac_sign, finish, flooding_channels, open_file

SIZE = 1 << 20
CHANNELS = 3
PROMPT = 10
PROBES = 5


def main():
    a, s1, tree, big, chans = flooding_channels(uuid.uuid4(), CHANNELS, 1, b"b")
    sid, tid = s1.session_id, tree.tree_connect_id
    body = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, SIZE, 0, big.file_id, 0, 0, 0, 0, 0) + b"\0"
    stop = threading.Event()
    served = [0] * CHANNELS
    bad = []

    def busy(i, raw, key):
        raw.s.settimeout(60)
        while True:
            try:
                r = raw.recv()
            except Exception as e:  # the channel must not fail
                bad.append(f"channel {i}: {e!r}")
                return
            if struct.unpack_from("<I", r, 8)[0] != SUCCESS:
                bad.append(f"channel {i}: READ failed")
                return
            served[i] += 1
            if stop.is_set():
                return
            raw.send(cmac_sign(key, raw.header(READ, sid, tid=tid, charge=charge_for(SIZE)) + body))

    threads = [threading.Thread(target=busy, args=(i, r, k), daemon=True) for i, (r, k) in enumerate(chans)]
    for t in threads:
        t.start()
    print(f"{CHANNELS} channels each keep a READ of 1 MiB in flight", flush=True)

    slowest = 0.0
    for n in range(PROBES):
        done = threading.Event()
        started = time.monotonic()

        def probe():
            open_file(tree, "a.txt").close()
            done.set()

        threading.Thread(target=probe, daemon=True).start()
        if not done.wait(PROMPT):
            check(False, f"A's CREATE+CLOSE #{n} answered within {PROMPT}s (channel READs served meanwhile: {sum(served)})")
        slowest = max(slowest, time.monotonic() - started)
    check(True, f"A's {PROBES} CREATE+CLOSEs answered (slowest {slowest:.2f}s; channel READs served: {sum(served)})")

    stop.set()
    for t in threads:
        t.join(60)
    check(not bad, f"the channels were served throughout ({bad})")
    open_file(tree, "a2.txt").close()
    check(True, "A's CREATE+CLOSE answered after the channels stopped")
    finish(a, s1, tree, big)


main()
