"""Channels that leave their answers unread cannot hold more memory than
rksmbd's --channel-memory bound all together (rksmbd multichannel, issue
14; smbprotocol plus raw SMB 3.0.2). Run against an rksmbd started with
--channel-memory 8.

Usage: channel_memory.py HOST PORT SHARE USER PASSWORD

Connection A (smbprotocol, SMB 3.0.2) sets up session S1 and writes a
1 MiB file. CHANNELS raw connections bind S1 as channels and each send
READS reads of the whole file, fewer than one channel's own outbox bound
(16 MiB) holds, and never read. Together their answers pass the 8 MiB
bound, so rksmbd ends channels (each with answers unread, whose client
read nothing for 5 s) within 30 s; without a bound of all channels
together, none would be ended and rksmbd would hold all their answers.
Then A still serves.

Prints one line per step; exits non-zero on any failure.
"""

import time
import uuid

from raw_channel import check, finish, flooding_channels, open_file, server_side_established

READS = 12
CHANNELS = 4


def main():
    a, s1, tree, big, chans = flooding_channels(uuid.uuid4(), CHANNELS, READS, b"m")
    print(f"{CHANNELS} channels sent {READS} READs of 1 MiB each and read nothing", flush=True)

    ports = [b.s.getsockname()[1] for b, _ in chans]
    deadline = time.monotonic() + 30
    while all(server_side_established(p) for p in ports):
        check(time.monotonic() < deadline, "rksmbd ends a channel past the bound of all channels within 30 s")
        time.sleep(0.1)  # the polling interval
    ended = sum(not server_side_established(p) for p in ports)
    check(True, f"rksmbd ended {ended} of {CHANNELS} channels")

    open_file(tree, "a.txt").close()
    check(True, "A's CREATE+CLOSE answered")
    finish(a, s1, tree, big)


main()
