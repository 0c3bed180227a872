"""Malformed but framed requests to a live rksmbd, after a real NEGOTIATE
and SESSION_SETUP (raw SMB 3.0.2): each gets an error status, or — for a
broken compound chain — the connection is dropped; either way nothing is
done, and other clients are still served.

The case that found a defect: a compound whose first message is a valid
CREATE and whose NextCommand leads to a message that is not there. rksmbd
ran the CREATE (the file was made) before it found the chain broken and
dropped the connection, so the client never learned of a file it had
made. Now the whole chain is checked before any of it runs.

HOST PORT SHARE USER PASSWORD LONG_NAMES.
"""

import struct
import sys
import uuid

from raw_channel import CLOSE, CREATE, READ, Raw, check, connect_share, create_body

WRITE, LOCK, IOCTL, QUERY_DIRECTORY, ECHO = 9, 0xA, 0xB, 0xE, 0xD
SUCCESS = 0
INVALID_PARAMETER = 0xC000000D
DISK_FULL = 0xC000007F
FLAG_RELATED = 0x4
NOT_FOUND = 0xC0000034
NO_SUCH_FILE = 0xC000000F
END_OF_FILE = 0xC0000011
EVERY = (uuid.UUID(int=0), uuid.UUID(int=0))


class Client:
    """A raw connection with a session and the share connected."""

    def __init__(self):
        self.raw = Raw(uuid.uuid4())
        self.sid, _, self.tid = connect_share(self.raw)

    def header(self, cmd, next_command=0, flags=0, credit_charge=1, credits=8, mid=None):
        """A request header with the next message ids, as many as its
        credit charge, or `mid`."""
        if mid is None:
            mid = self.raw.mid
            self.raw.mid += max(credit_charge, 1)
        h = bytearray(self.raw.header(cmd, self.sid, next_command, self.tid, mid=mid))
        struct.pack_into("<HIHH", h, 6, credit_charge, 0, cmd, credits)
        struct.pack_into("<I", h, 16, flags)
        return bytes(h)

    def answer(self, pdu):
        """The statuses of the response chain, or None if dropped."""
        self.raw.send(pdu)
        try:
            r = self.raw.recv()
        except (EOFError, OSError):
            return None
        out, at = [], 0
        while True:
            out.append(struct.unpack_from("<I", r, at + 8)[0])
            n = struct.unpack_from("<I", r, at + 20)[0]
            if n == 0:
                return out
            at += n

    def create(self, name, disposition=1, extra=b"", **kw):
        body = create_body(name, disposition=disposition)
        return self.header(CREATE, **kw) + body + extra

    def exists(self, name):
        st = self.answer(self.create(name, disposition=1))
        check(st is not None, f"a CREATE of {name} is answered")
        return st[0] != NOT_FOUND


def pad8(b):
    return b + b"\0" * (-len(b) % 8)


def still_served():
    """Another client logs on, connects the share and echoes."""
    c = Client()
    st = c.answer(c.header(ECHO) + struct.pack("<HH", 4, 0))
    check(st == [SUCCESS], "another client is still served")


def main():
    c = Client()

    # The regression: CREATE (make ghost.txt) chained to nothing.
    first = pad8(c.create("ghost.txt", disposition=2))
    bad = bytearray(first)
    struct.pack_into("<I", bad, 20, len(first))
    for what, tail in [
        ("a NextCommand to the end of the PDU", b""),
        ("a truncated second header", b"\xfeSMB\x40\x00"),
        ("a second message that is not SMB2", b"\x55" * 64),
    ]:
        st = c.answer(bytes(bad) + tail)
        check(st is None, f"{what}: the connection is dropped")
        still_served()
        c = Client()
        check(not c.exists("ghost.txt"), f"{what}: ghost.txt was not made")

    # NextCommand not 8-aligned, short of a header, past the PDU.
    for n in (65, 8, 4096, 0xFFFFFFF8):
        msg = bytearray(pad8(c.create("ghost.txt", disposition=2)) + c.create("a.txt"))
        struct.pack_into("<I", msg, 20, n)
        check(c.answer(bytes(msg)) is None, f"NextCommand {n:#x}: dropped")
        c = Client()
    check(not c.exists("ghost.txt"), "no bad chain made ghost.txt")

    # A related READ and CLOSE after a CREATE that failed: its status.
    create = pad8(c.create("missing.txt", disposition=1))
    read = pad8(c.header(READ, flags=FLAG_RELATED) + struct.pack("<HBBIQQQIIIHH", 49, 0, 0, 16, 0, 2**64 - 1, 2**64 - 1, 0, 0, 0, 0, 0) + b"\0")
    close = c.header(CLOSE, flags=FLAG_RELATED) + struct.pack("<HHIQQ", 24, 0, 0, 2**64 - 1, 2**64 - 1)
    chain = bytearray(create + read + close)
    struct.pack_into("<I", chain, 20, len(create))
    struct.pack_into("<I", chain, len(create) + 20, len(read))
    st = c.answer(bytes(chain))
    check(st == [NOT_FOUND] * 3, f"a chain after a failed CREATE shares its status ({st})")

    # Offsets and lengths far past the message.
    n = "x".encode("utf-16-le")
    huge_name = c.header(CREATE) + struct.pack("<HBBIQQIIIIIHHII", 57, 0, 0, 2, 0, 0, 0x80, 0x80, 7, 2, 0x40, 0xFFFF, 0xFFFF, 0, 0) + n
    huge_ctx = c.header(CREATE) + struct.pack("<HBBIQQIIIIIHHII", 57, 0, 0, 2, 0, 0, 0x80, 0x80, 7, 2, 0x40, 120, len(n), 0xFFFFFFF0, 0xFFFFFFFF) + n
    bad_size = c.header(CREATE) + struct.pack("<H", 0xFFFF) + b"\0" * 60
    # A context list whose Next is far past the end, and one whose Next
    # lands inside the context itself.
    ctx = struct.pack("<IHHHHI", 0xFFFFFFF8, 16, 4, 0, 0, 0) + b"DHnQ" + b"\0" * 4
    ctx_far = c.header(CREATE) + struct.pack("<HBBIQQIIIIIHHII", 57, 0, 0, 2, 0, 0, 0x80, 0x80, 7, 2, 0x40, 120, len(n), 128, len(ctx)) + pad8(n) + ctx
    ctx_in = c.header(CREATE) + ctx_far[64 : 64 + 56 + 8] + struct.pack("<I", 8) + ctx_far[64 + 56 + 8 + 4 :]
    for what, msg in [
        ("a name past the message", huge_name),
        ("contexts past the message", huge_ctx),
        ("StructureSize 0xFFFF", bad_size),
        ("a context Next past the end", ctx_far),
        ("a context Next into itself", ctx_in),
    ]:
        st = c.answer(msg)
        check(st is not None and st[0] != SUCCESS, f"{what}: an error ({st})")
    check(not c.exists("x"), "none of them made x")

    # Zero credits asked, no CreditCharge: answered (and a credit granted).
    st = c.answer(c.header(ECHO, credit_charge=0, credits=0) + struct.pack("<HH", 4, 0))
    check(st == [SUCCESS], f"an ECHO charging nothing asking no credits is answered ({st})")

    # Message ids (3.3.5.2.3): a CreditCharge past the credits granted, an
    # id used already, one never granted, or the same id twice in one
    # compound ends the connection with nothing of the compound run.
    echo = struct.pack("<HH", 4, 0)

    def one_id_twice(d):
        create = pad8(d.create("twice.txt", disposition=2))
        chain = bytearray(create + d.header(ECHO, mid=d.raw.mid - 1) + echo)
        struct.pack_into("<I", chain, 20, len(create))
        return bytes(chain)

    for what, pdu in [
        ("a CreditCharge of 0xFFFF", lambda d: d.header(ECHO, credit_charge=0xFFFF) + echo),
        ("the id of the NEGOTIATE", lambda d: d.header(ECHO, mid=0) + echo),
        ("an id 10 000 past the grants", lambda d: d.header(ECHO, mid=d.raw.mid + 10_000) + echo),
        ("a CREATE and an ECHO with one id", one_id_twice),
    ]:
        d = Client()
        check(d.answer(pdu(d)) is None, f"{what}: the connection is ended")
    check(not c.exists("twice.txt"), "the compound with one id twice made nothing")
    still_served()

    # A file to read, write and lock.
    st = c.answer(c.create("data.bin", disposition=5))
    check(st == [SUCCESS], "data.bin made")
    c.raw.send(c.create("data.bin", disposition=1))
    r = c.raw.recv()
    fid = r[64 + 64 : 64 + 80]
    read = c.header(READ) + struct.pack("<HBBIQ", 49, 0, 0, 0xFFFFFFFF, 0) + fid + struct.pack("<IIIHH", 0, 0, 0, 0, 0) + b"\0"
    st = c.answer(read)
    check(st is not None and st[0] != SUCCESS, f"a READ of 0xFFFFFFFF bytes: an error ({st})")
    write = c.header(WRITE) + struct.pack("<HHIQ", 49, 64 + 48, 0xFFFFFFFF, 0) + fid + struct.pack("<IIHHI", 0, 0, 0, 0, 0) + b"abcd"
    st = c.answer(write)
    check(st is not None and st[0] != SUCCESS, f"a WRITE claiming 0xFFFFFFFF bytes: an error ({st})")
    # Past a signed 64-bit file offset: STATUS_INVALID_PARAMETER (it was
    # STATUS_INTERNAL_ERROR, the kernel's EINVAL).
    for offset in (2**64 - 16, 2**63 - 2):
        write = c.header(WRITE) + struct.pack("<HHIQ", 49, 64 + 48, 4, offset) + fid + struct.pack("<IIHHI", 0, 0, 0, 0, 0) + b"abcd"
        st = c.answer(write)
        check(st == [INVALID_PARAMETER], f"a WRITE at offset {offset:#x}: STATUS_INVALID_PARAMETER ({st})")
        read = c.header(READ) + struct.pack("<HBBIQ", 49, 0, 0, 4, offset) + fid + struct.pack("<IIIHH", 0, 0, 0, 0, 0) + b"\0"
        st = c.answer(read)
        check(st == [INVALID_PARAMETER], f"a READ at offset {offset:#x}: STATUS_INVALID_PARAMETER ({st})")
    # Past the filesystem's largest file (EFBIG on ext4; tmpfs, xfs and
    # btrfs take it): STATUS_DISK_FULL, as Samba answers (it was
    # STATUS_INTERNAL_ERROR; review B-5).
    write = c.header(WRITE) + struct.pack("<HHIQ", 49, 64 + 48, 4, 2**62) + fid + struct.pack("<IIHHI", 0, 0, 0, 0, 0) + b"abcd"
    st = c.answer(write)
    check(st in ([DISK_FULL], [SUCCESS]), f"a WRITE at offset 2^62: STATUS_DISK_FULL, or written ({st})")
    lock = c.header(LOCK) + struct.pack("<HHI", 48, 0xFFFF, 0) + fid + struct.pack("<QQII", 0, 1, 2, 0)
    st = c.answer(lock)
    check(st is not None and st[0] != SUCCESS, f"a LOCK counting 65535 elements, carrying 1: an error ({st})")
    ioctl = c.header(IOCTL) + struct.pack("<HHI", 57, 0, 0x001401D4) + fid + struct.pack("<IIIIIIII", 0xFFFFFFF0, 0xFFFF, 0, 0, 0, 0, 0, 0)
    st = c.answer(ioctl)
    check(st is not None and st[0] != SUCCESS, f"an IOCTL input past the message: an error ({st})")
    check(c.exists("data.bin"), "the connection still serves its opens")

    # A CreditCharge must cover the payload, a credit per 64 KiB begun
    # (3.3.5.2.5): a 70 000-byte WRITE or READ charging one credit (or
    # none) is STATUS_INVALID_PARAMETER and writes nothing; charging two,
    # it goes. Before, rksmbd took any charge.
    big = bytes(range(256)) * 273 + b"\1" * 112
    def write_big(charge):
        h = c.header(WRITE, credit_charge=charge)
        return c.answer(h + struct.pack("<HHIQ", 49, 64 + 48, len(big), 0) + fid + struct.pack("<IIHHI", 0, 0, 0, 0, 0) + big)
    def read_big(charge):
        h = c.header(READ, credit_charge=charge)
        return c.answer(h + struct.pack("<HBBIQ", 49, 0, 0, len(big), 0) + fid + struct.pack("<IIIHH", 0, 0, 0, 0, 0) + b"\0")
    for charge in (0, 1):
        st = write_big(charge)
        check(st == [INVALID_PARAMETER], f"a {len(big)}-byte WRITE charging {charge}: STATUS_INVALID_PARAMETER ({st})")
    check(read_big(2) == [END_OF_FILE], "nothing was written")
    check(write_big(2) == [SUCCESS], f"a {len(big)}-byte WRITE charging 2 goes")
    for charge in (0, 1):
        st = read_big(charge)
        check(st == [INVALID_PARAMETER], f"a {len(big)}-byte READ charging {charge}: STATUS_INVALID_PARAMETER ({st})")
    check(read_big(2) == [SUCCESS], f"a {len(big)}-byte READ charging 2 goes")

    # A QUERY_DIRECTORY pattern of 32 000 characters (16 000 × "a*"): more
    # than 255 fixed characters match no name, so the listing is empty and
    # costs nothing per entry; a short pattern still lists data.bin.
    def open_dir(name):
        c.raw.send(c.header(CREATE) + create_body(name, access=0x00100081, attributes=0, disposition=1, options=0x1) + b"\0")
        r = c.raw.recv()
        check(struct.unpack_from("<I", r, 8)[0] == SUCCESS, f"{name or 'the share root'} opened as a directory")
        return r[64 + 64 : 64 + 80]

    def query_names(fid, pattern, flags):
        """A QUERY_DIRECTORY for FileNamesInformation."""
        n = pattern.encode("utf-16-le")
        fixed = struct.pack("<HBBI", 33, 0x0C, flags, 0) + fid + struct.pack("<HHI", 64 + 32, len(n), 65536)
        return c.header(QUERY_DIRECTORY) + fixed + n

    root = open_dir("")

    def query(pattern):
        return c.answer(query_names(root, pattern, 0x01))

    st = query("a*" * 16_000)
    check(st == [NO_SUCH_FILE], f"a 32 000-character pattern: STATUS_NO_SUCH_FILE ({st})")
    st = query("*" * 32_000 + "DATA.bin")
    check(st == [SUCCESS], f"32 000 stars and a name: it is listed ({st})")

    # Patterns that cost a backtracking matcher pattern × name steps per
    # name, over `long/` (made by the test: LONG_NAMES names of 250 `a`s
    # and a 5-digit number). rksmbd answers them in one pass per name;
    # what they match is checked here, what they cost in the note.
    long_dir = open_dir("long")

    def names(pattern):
        """Every name a listing of long/ with `pattern` shows, a page at a time."""
        out, flags = [], 0x01
        while True:
            c.raw.send(query_names(long_dir, pattern, flags))
            r = c.raw.recv()
            st = struct.unpack_from("<I", r, 8)[0]
            if st in (NO_SUCH_FILE, 0x80000006):  # nothing matched / no more
                return out
            check(st == SUCCESS, f"listing long/ with {pattern[:12]}…: {st:#x}")
            off, length = struct.unpack_from("<HI", r, 64 + 2)
            at, end = off, off + length
            while True:
                nxt, _, nl = struct.unpack_from("<III", r, at)
                out.append(r[at + 12 : at + 12 + nl].decode("utf-16-le"))
                if nxt == 0 or at + nxt >= end:
                    break
                at += nxt
            flags = 0

    count = int(sys.argv[6])
    every = names("*")
    check(len(every) == count + 2, f"long/ lists its {count} names and the dots ({len(every)})")
    check(names("*" + "a" * 127 + "b") == [], "127 a's then b: no name")
    check(names("*" + "A" * 127 + "b*") == [], "127 a's then b anywhere: no name")
    check(names("*" + "a" * 200 + "*00042") == ["a" * 250 + "00042"], "200 a's, anything, 00042: the one name")
    # A `*` at position 63, the last of a machine word of positions.
    check(names("A" * 63 + "*00042") == ["a" * 250 + "00042"], "63 a's, anything, 00042: the one name")
    check(len(names("*" + "?*" * 255)) == count, "255 characters, stars around each: every long name")
    check(names("*" + "?*" * 256) == [], "256 characters: no name")
    still_served()
    print("PASS", flush=True)


main()
