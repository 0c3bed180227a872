"""Raw SMB 3.0.2 pieces shared by the multichannel scripts: signing,
key derivation, a raw connection and a session binding (MS-SMB2
3.3.5.5.2) over it. The scripts take HOST PORT SHARE USER PASSWORD first;
so does this module.
"""

import socket
import struct
import sys
import time
import uuid

import spnego
from cryptography.hazmat.backends import default_backend
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFHMAC, Mode
from smbprotocol.connection import Connection, Dialects
from smbprotocol.create_contexts import (
    CreateContextName,
    LeaseState,
    SMB2CreateContextRequest,
    SMB2CreateRequestLeaseV2,
)
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

HOST, PORT, SHARE, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
NEGOTIATE, SESSION_SETUP, TREE_CONNECT, CREATE, CLOSE, READ, CANCEL, ECHO = 0, 1, 3, 5, 6, 8, 0xC, 0xD
IOCTL = 0xB
WRITE = 9
PENDING = 0x00000103
FLAG_REPLAY = 0x20000000
R, H, W = 1, 2, 4
FLAG_SIGNED = 0x8
BINDING = 0x1
SUCCESS = 0
INSUFFICIENT_RESOURCES = 0xC000009A
FILE_NOT_AVAILABLE = 0xC0000467
SERVER_UNAVAILABLE = 0xC0000466
MORE_PROCESSING = 0xC0000016
INVALID_PARAMETER = 0xC000000D
USER_SESSION_DELETED = 0xC0000203
CANCELLED = 0xC0000120
UNSUCCESSFUL = 0xC0000001
OPLOCK_BREAK = 0x12
BREAK_ID = 2**64 - 1
RWH = LeaseState.SMB2_LEASE_READ_CACHING | LeaseState.SMB2_LEASE_WRITE_CACHING | LeaseState.SMB2_LEASE_HANDLE_CACHING
ALL_SHARE = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE


FAILURES = []


def check(cond, what, fatal=True):
    """Fatal checks end the script; the others are counted (each step's
    verdict is printed, so one run shows every one that fails)."""
    if not cond:
        print(f"FAILED: {what}", flush=True)
        if fatal:
            sys.exit(1)
        FAILURES.append(what)
        return
    print(f"ok: {what}", flush=True)


def cmac_sign(key, msg):
    """The message with SMB2_FLAGS_SIGNED set and its AES-CMAC signature."""
    flags = struct.unpack_from("<I", msg, 16)[0] | FLAG_SIGNED
    m = bytearray(msg)
    struct.pack_into("<I", m, 16, flags)
    m[48:64] = b"\0" * 16
    c = cmac.CMAC(algorithms.AES(key), backend=default_backend())
    c.update(bytes(m))
    m[48:64] = c.finalize()
    return bytes(m)


def smb3kdf(key, label, context):
    return KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=16,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context,
        fixed=None,
        backend=default_backend(),
    ).derive(key)


class Raw:
    """One raw SMB 3.0.2 connection."""

    def __init__(self, guid, source=None):
        src = (source, 0) if source else None
        self.s = socket.create_connection((HOST, PORT), timeout=10, source_address=src)
        self.mid = 0
        body = struct.pack("<HHHHI16sIHH", 36, 1, 1, 0, 0x08, guid.bytes, 0, 0, 0) + struct.pack("<H", 0x302)
        st, _ = self.call(self.header(NEGOTIATE, 0) + body)
        check(st == SUCCESS, "raw connection negotiated SMB 3.0.2")

    def header(self, cmd, sid, next_command=0, tid=0, mid=None, charge=1):
        """A request header with the next `charge` message ids (a
        multi-credit request's CreditCharge, see `charge_for`), asking for
        as many credits as a client may hold, so that floods of large
        READs have the credits they charge."""
        if mid is None:
            mid = self.mid
            self.mid += charge
        return struct.pack(
            "<4sHHIHHIIQIIQ16s", b"\xfeSMB", 64, charge, 0, cmd, 8192, 0, next_command, mid, 0, tid, sid, b"\0" * 16
        )

    def send(self, pdu):
        self.s.sendall(struct.pack(">I", len(pdu)) + pdu)

    def recv(self):
        n = struct.unpack(">I", self.read(4))[0]
        return self.read(n)

    def read(self, n):
        b = b""
        while len(b) < n:
            chunk = self.s.recv(n - len(b))
            if not chunk:
                raise EOFError("connection closed")
            b += chunk
        return b

    def call(self, pdu):
        self.send(pdu)
        r = self.recv()
        return struct.unpack_from("<I", r, 8)[0], r

    def setup_leg(self, sid, flags, token, key):
        body = struct.pack("<HBBIIHHQ", 25, flags, 1, 0, 0, 64 + 24, len(token), 0) + token
        msg = self.header(SESSION_SETUP, sid) + body
        if key is not None:
            msg = cmac_sign(key, msg)
        st, r = self.call(msg)
        off, length = struct.unpack_from("<HH", r, 64 + 4)
        return st, r[off : off + length]


def ended(raw, within=10):
    """Whether the server ended `raw`'s connection (it reads EOF)."""
    raw.s.settimeout(within)
    try:
        return raw.s.recv(1) == b""
    except ConnectionResetError:
        return True
    except OSError:
        return False


def reset(sock):
    """Closes `sock` with an RST (linger 0); shut down for reading first,
    so that a thread blocked reading it (smbprotocol's) lets go of it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RD)
    sock.close()


def ntlm_context():
    return spnego.client(
        USER, PASSWORD, service="cifs", hostname=HOST, options=spnego.NegotiateOptions.session_key, protocol="negotiate"
    )


def bind(raw, sid, key):
    """Binds session `sid` on `raw`; the channel's signing key."""
    ctx = ntlm_context()
    st, tok = raw.setup_leg(sid, BINDING, ctx.step(None), key)
    check(st == MORE_PROCESSING, f"binding leg 1 answered (got {st:#010x})")
    st, tok = raw.setup_leg(sid, BINDING, ctx.step(tok), key)
    check(st == SUCCESS, "binding leg 2 bound the session")
    session_key = ctx.session_key[:16].ljust(16, b"\0")
    return smb3kdf(session_key, b"SMB2AESCMAC\x00", b"SmbSign\x00")


def open_file(tree, name):
    """`name` opened (made, or emptied) for read and write through
    smbprotocol, sharing all."""
    f = Open(tree, name)
    f.create(
        ImpersonationLevel.Impersonation,
        FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
        FileAttributes.FILE_ATTRIBUTE_NORMAL,
        ALL_SHARE,
        CreateDisposition.FILE_OVERWRITE_IF,
        CreateOptions.FILE_NON_DIRECTORY_FILE,
    )
    return f


def final(r, pdu):
    """Sends `pdu` (unless None: sent already) on `r`, skips interim
    STATUS_PENDING answers: the final status and message."""
    if pdu is not None:
        r.send(pdu)
    while True:
        m = r.recv()
        st = struct.unpack_from("<I", m, 8)[0]
        if st != PENDING:
            return st, m


def signed_create(r, sid, key, tid, name, share=0, disposition=3, ctx=b"", oplock=0, replay=False):
    """A signed CREATE of file `name` for read and write (by default an
    exclusive OPEN_IF) with create context chain `ctx`, sent with
    SMB2_FLAGS_REPLAY_OPERATION if `replay`."""
    n = name.encode("utf-16-le")
    end = 64 + 56 + len(n)
    pad = -end % 8 if ctx else 0
    ctx_off = end + pad if ctx else 0
    fixed = (57, 0, oplock, 2, 0, 0, 0xC0000000, 0x80, share, disposition, 0x40, 64 + 56, len(n), ctx_off, len(ctx))
    body = struct.pack("<HBBIQQIIIIIHHII", *fixed)
    h = bytearray(r.header(CREATE, sid, tid=tid))
    if replay:
        struct.pack_into("<I", h, 16, FLAG_REPLAY)
    return cmac_sign(key, bytes(h) + body + n + b"\0" * pad + ctx)


def patient_share(client):
    """A raw connection of client GUID `client` that waits up to 30 s
    for each answer, USER logged on and the share connected: the
    connection, the session id, its signing key and the tree id."""
    r = Raw(client)
    r.s.settimeout(30)
    return (r, *connect_share(r))


def until(what, done, within=20):
    """Polls `done` until it is true (or fails after `within` s)."""
    end = time.monotonic() + within
    while not done():
        check(time.monotonic() < end, f"{what} within {within} s")
        time.sleep(0.02)


def until_granted(what, create, within=20):
    """Tries `create` (a CREATE sent: its status and message) until it
    succeeds (or fails after `within` s): the FileId it got."""
    got = []

    def granted():
        st, m = create()
        if st == SUCCESS:
            got.append(file_id(m))
        return bool(got)

    until(what, granted, within)
    return got[0]


def log_holds(path, line):
    """Whether the log at `path` holds `line`."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return line in f.read()


def granted_for(seconds, create):
    """Tries `create(n)` (a CREATE sent, n counting from 1: its status
    and message) for `seconds`: the FileIds of those that succeeded."""
    got = []
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        st, m = create(n)
        if st == SUCCESS:
            got.append(file_id(m))
    return got


def patient_share_after(client, previous):
    """[`patient_share`] whose session names session `previous` as its
    PreviousSessionId (MS-SMB2 3.3.5.5.3), ending that one if it is
    USER's: the connection, the session id, its signing key and the tree
    id."""
    r = Raw(client)
    r.s.settimeout(30)
    ctx = ntlm_context()

    def leg(sid, tok):
        body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(tok), previous) + tok
        return r.call(r.header(SESSION_SETUP, sid) + body)

    st, m = leg(0, ctx.step(None))
    sid = struct.unpack_from("<Q", m, 40)[0]
    off, ln = struct.unpack_from("<HH", m, 64 + 4)
    st, m = leg(sid, ctx.step(m[off : off + ln]))
    check(st == SUCCESS, f"a new session naming {previous:#x} as PreviousSessionId (got {st:#010x})")
    key = smb3kdf(ctx.session_key[:16].ljust(16, b"\0"), b"SMB2AESCMAC\x00", b"SmbSign\x00")
    st, m = r.call(cmac_sign(key, r.header(TREE_CONNECT, sid) + tree_connect_body()))
    check(st == SUCCESS, f"share connected (got {st:#010x})")
    return r, sid, key, struct.unpack_from("<I", m, 36)[0]


def patient_share_as(user, client):
    """[`patient_share`] with `user` logged on (the password as USER's),
    who stays USER for the logons that follow."""
    global USER
    USER = user
    return patient_share(client)


def persistent_create(r, sid, key, tid, name, create_guid, disposition, replay=False, share=7):
    """A signed persistent (DH2Q, create GUID `create_guid`) CREATE of
    `name` for read and write, sharing `share` (all by default), sent
    with SMB2_FLAGS_REPLAY_OPERATION if `replay`."""
    from smbtest import persistent_context

    ctx = persistent_context(create_guid).pack()
    return signed_create(r, sid, key, tid, name, share, disposition, ctx, replay=replay)


def persistent_written(conn, name, create_guid, data):
    """Opens `name` persistent (OVERWRITE_IF, create GUID `create_guid`)
    on `conn` (a [`patient_share`] tuple) and writes `data` at its start:
    the FileId. Exits on failure."""
    st, m = final(conn[0], persistent_create(*conn, name, create_guid, 5))
    check(st == SUCCESS, f"the persistent open of {name} (got {st:#010x})")
    fid = file_id(m)
    check(signed_write(*conn, fid, data) == SUCCESS, f"the write to {name}")
    return fid


def file_id(m):
    """The FileId of CREATE response `m`."""
    return m[128:144]


def dh2c(conn, name, create_guid, fid):
    """A persistent DH2C of open `fid` (create GUID `create_guid`) on
    `conn` (a [`patient_share`] tuple)."""
    from smbtest import reconnect_context

    return signed_create(*conn, name, 7, 1, reconnect_context(fid, create_guid).pack())


def close_pdu(r, sid, key, tid, fid):
    """A signed CLOSE of `fid`."""
    return cmac_sign(key, r.header(CLOSE, sid, tid=tid) + struct.pack("<HHI16s", 24, 0, 0, fid))


def signed_close(r, sid, key, tid, fid):
    """CLOSEs `fid`, which must succeed."""
    st, _ = final(r, close_pdu(r, sid, key, tid, fid))
    check(st == SUCCESS, f"CLOSE (got {st:#010x})")


def signed_made(r, sid, key, tid, name):
    """Makes file `name` (OPEN_IF, shared) and closes it; exits on failure."""
    st, m = final(r, signed_create(r, sid, key, tid, name, 7, 3))
    check(st == SUCCESS, f"{name} made (got {st:#010x})")
    signed_close(r, sid, key, tid, m[128:144])


def signed_write(r, sid, key, tid, fid, data):
    """WRITEs `data` at offset 0 of `fid`: the status."""
    wr = struct.pack("<HHIQ16sIIHHI", 49, 112, len(data), 0, fid, 0, 0, 0, 0, 0) + data
    return final(r, cmac_sign(key, r.header(WRITE, sid, tid=tid) + wr))[0]


def signed_read(r, sid, key, tid, fid, n):
    """READs up to `n` bytes at offset 0 of `fid`: the status and data."""
    rd = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, n, 0, fid, 0, 0, 0, 0, 0) + b"\0"
    st, m = final(r, cmac_sign(key, r.header(READ, sid, tid=tid) + rd))
    if st != SUCCESS:
        return st, b""
    off, length = struct.unpack_from("<BxI", m, 64 + 2)
    return st, m[off : off + length]


def tree_connect_body():
    path = rf"\\{HOST}\{SHARE}".encode("utf-16-le")
    return struct.pack("<HHHH", 9, 0, 64 + 8, len(path)) + path


def create_body(name, access=0xC0000000, attributes=0x80, disposition=3, options=0x40):
    """A CREATE of `name`, no lease, sharing all: by default a file opened
    (or made) for read and write."""
    n = name.encode("utf-16-le")
    fixed = struct.pack(
        "<HBBIQQIIIIIHHII", 57, 0, 0, 2, 0, 0, access, attributes, 7, disposition, options, 64 + 56, len(n), 0, 0
    )
    return fixed + n


def auth_leg(raw, user, password):
    """Runs the first NTLM leg of a logon of `user` with `password` on
    `raw` and builds its AUTHENTICATE leg, not sent: (status of the first
    leg, session id, the leg's PDU)."""
    ctx = spnego.client(user, password, service="cifs", hostname=HOST, protocol="negotiate")
    token = ctx.step(None)
    body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), 0) + token
    st, r = raw.call(raw.header(SESSION_SETUP, 0) + body)
    if st != MORE_PROCESSING:
        return st, 0, b""
    sid = struct.unpack_from("<Q", r, 40)[0]
    off, length = struct.unpack_from("<HH", r, 64 + 4)
    token = ctx.step(r[off : off + length])
    body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), 0) + token
    return st, sid, raw.header(SESSION_SETUP, sid) + body


def logon_legs(raw):
    """Runs the NTLM legs of a logon of USER on `raw` (not a binding):
    the status of the last leg answered, the session id and the NTLM
    context."""
    ctx = ntlm_context()
    token = ctx.step(None)
    body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), 0) + token
    st, r = raw.call(raw.header(SESSION_SETUP, 0) + body)
    if st != MORE_PROCESSING:
        return st, 0, ctx
    sid = struct.unpack_from("<Q", r, 40)[0]
    off, length = struct.unpack_from("<HH", r, 64 + 4)
    token = ctx.step(r[off : off + length])
    body = struct.pack("<HBBIIHHQ", 25, 0, 1, 0, 0, 64 + 24, len(token), 0) + token
    st, _ = raw.call(raw.header(SESSION_SETUP, sid) + body)
    return st, sid, ctx


def logon(raw):
    """Sets up a session of USER on `raw` (NTLM, not a binding); its id
    and signing key."""
    st, sid, ctx = logon_legs(raw)
    check(st == SUCCESS, f"session set up (got {st:#010x})")
    session_key = ctx.session_key[:16].ljust(16, b"\0")
    return sid, smb3kdf(session_key, b"SMB2AESCMAC\x00", b"SmbSign\x00")


def connect_share(raw):
    """Logs USER on to `raw` and connects the share: the session id, its
    signing key and the tree id."""
    sid, key = logon(raw)
    st, r = raw.call(cmac_sign(key, raw.header(TREE_CONNECT, sid) + tree_connect_body()))
    check(st == SUCCESS, f"share connected (got {st:#010x})")
    return sid, key, struct.unpack_from("<I", r, 36)[0]


def session(guid):
    """An smbprotocol connection of client `guid` (SMB 3.0.2, signing not
    required), a session of USER on it and the share connected: the
    three."""
    conn = Connection(guid, HOST, PORT, require_signing=False)
    conn.connect(dialect=Dialects.SMB_3_0_2)
    s = Session(conn, USER, PASSWORD, require_encryption=False)
    s.connect()
    tree = TreeConnect(s, rf"\\{HOST}\{SHARE}")
    tree.connect()
    return conn, s, tree


def server_side_established(port):
    """Whether rksmbd's end of the connection from local port `port` is
    still ESTABLISHED (/proc/net/tcp{,6}: state 01)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if int(local.rsplit(":", 1)[1], 16) == PORT and int(remote.rsplit(":", 1)[1], 16) == port:
                    return state == "01"
    return False


def server_side_queues(port):
    """The bytes rksmbd's end of the connection from local port `port` has
    queued to send and received but not read yet (/proc/net/tcp{,6}:
    tx_queue, rx_queue), or None."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if int(local.rsplit(":", 1)[1], 16) == PORT and int(remote.rsplit(":", 1)[1], 16) == port:
                    tx, rx = fields[4].split(":")
                    return int(tx, 16), int(rx, 16)
    return None


def server_side_send_queue(port):
    """The bytes rksmbd's end of the connection from local port `port` has
    queued to send (/proc/net/tcp{,6}: tx_queue), or None."""
    q = server_side_queues(port)
    return q and q[0]


def wait_until_writer_blocked(sock, limit=20):
    """Waits until rksmbd's end of `sock` holds bytes it cannot send (its
    connection thread blocked writing to a client that does not read):
    its send queue non-empty and unchanged for half a second."""
    port = sock.getsockname()[1]
    last, since = None, time.monotonic()
    deadline = since + limit
    while time.monotonic() < deadline:
        q = server_side_send_queue(port)
        now = time.monotonic()
        if q != last:
            last, since = q, now
        elif q and now - since > 0.5:
            return
        time.sleep(0.05)
    check(False, f"rksmbd's writer blocked within {limit} s (send queue {last})")


def charge_for(size):
    """The CreditCharge of a READ or WRITE of `size` bytes: a credit per
    64 KiB begun (MS-SMB2 3.1.5.2; rksmbd refuses less, 3.3.5.2.5)."""
    return max(1, (size - 1) // 65536 + 1)


def flooding_channels(guid, count, reads, fill):
    """Session S1 of USER on an smbprotocol connection of client `guid`, a
    1 MiB file big.bin of `fill` bytes opened on it, and `count` raw
    connections bound to S1 as channels (receive buffers kept small), each
    of which has sent `reads` READs of the whole file and read nothing:
    (connection, session, tree, big, [(raw, channel key)])."""
    size = 1 << 20
    conn, s1, tree = session(guid)
    sid, tid = s1.session_id, tree.tree_connect_id
    big = open_file(tree, "big.bin")
    big.write(fill * size, 0)
    chans = []
    body = struct.pack("<HBBIQ16sIIIHH", 49, 0, 0, size, 0, big.file_id, 0, 0, 0, 0, 0) + b"\0"
    for _ in range(count):
        raw = Raw(guid)
        key = bind(raw, sid, s1.signing_key)
        raw.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        chans.append((raw, key))
    for raw, key in chans:
        for _ in range(reads):
            raw.send(cmac_sign(key, raw.header(READ, sid, tid=tid, charge=charge_for(size)) + body))
    return conn, s1, tree, big, chans


def finish(conn, s1, tree, big):
    """Closes what flooding_channels set up and prints PASS."""
    big.close()
    tree.disconnect()
    s1.disconnect()
    conn.disconnect()
    print("PASS", flush=True)


# durable_reconnect.py keeps its own context() and lease_context():
# rkdemo ships that script alone.
def context(name, data):
    c = SMB2CreateContextRequest()
    c["buffer_name"] = name
    c["buffer_data"] = data
    return c


def lease_context(key):
    lease = SMB2CreateRequestLeaseV2()
    lease["lease_key"] = key
    lease["lease_state"] = RWH
    lease["parent_lease_key"] = b"\x00" * 16
    lease["epoch"] = b"\x00\x00"
    return context(CreateContextName.SMB2_CREATE_REQUEST_LEASE_V2, lease)


def lease_ctx(key, state=7):
    """A RqLs create context (a v2 lease request, no parent key) for lease
    `key`."""
    data = key + struct.pack("<IIQ", state, 0, 0) + b"\0" * 16 + struct.pack("<HH", 0, 0)
    return struct.pack("<IHHHHI", 0, 16, 4, 0, 24, len(data)) + b"RqLs" + b"\0" * 4 + data


def break_of(raw, within, what):
    """The lease break notification `raw` is sent within `within` s."""
    raw.s.settimeout(within)
    try:
        m = raw.recv()
    except OSError as e:
        check(False, f"{what} is sent the break within {within} s (nothing: {e!r})")
    cmd, mid = struct.unpack_from("<H", m, 12)[0], struct.unpack_from("<Q", m, 24)[0]
    check((cmd, mid) == (OPLOCK_BREAK, BREAK_ID), f"{what} is sent a lease break notification (command {cmd:#x})")
    raw.s.settimeout(30)
    return m


def ack_pdu(raw, sid, key, lkey, state):
    """A signed acknowledgment of a break of lease `lkey` to `state`."""
    body = struct.pack("<HHI16sIQ", 36, 0, 0, lkey, state, 0)
    return cmac_sign(key, raw.header(OPLOCK_BREAK, sid) + body)


def ack(raw, sid, key, lkey, state):
    """Acknowledges a break of lease `lkey` to `state` on `raw`: the status."""
    st, _ = final(raw, ack_pdu(raw, sid, key, lkey, state))
    return st


def leased_create(r, sid, key, tid, name, lkey, state, disposition=5):
    """A signed CREATE (by default OVERWRITE_IF; read and write, sharing
    all) asking for a lease `lkey` of `state`."""
    n = name.encode("utf-16-le")
    end = 64 + 56 + len(n)
    pad = -end % 8
    ctx = lease_ctx(lkey, state)
    fixed = (57, 0, 0xFF, 2, 0, 0, 0xC0000000, 0x80, 7, disposition, 0x40, 64 + 56, len(n), end + pad, len(ctx))
    body = struct.pack("<HBBIQQIIIIIHHII", *fixed)
    return cmac_sign(key, r.header(CREATE, sid, tid=tid) + body + n + b"\0" * pad + ctx)


def waiting_compound(r, sid, key, tid, create):
    """Signed CREATE `create` followed by an ECHO in one compound: not the
    compound's last request, the CREATE does not go async but waits for
    its lease breaks serving the connection (`Connection::pump`)."""
    create = bytearray(create + b"\0" * (-len(create) % 8))
    struct.pack_into("<I", create, 20, len(create))
    echo = cmac_sign(key, r.header(ECHO, sid, tid=tid) + struct.pack("<HH", 4, 0))
    return cmac_sign(key, bytes(create)) + echo


def leased_on_two_channels(name, lkey):
    """Connection A (a new client GUID) logs on and opens `name` with an
    RWH lease `lkey`; connection B (the same GUID) binds A's session:
    (a, b, sid, key_a, key_b, tid, A's FileId)."""
    g = uuid.uuid4()
    a = Raw(g)
    a.s.settimeout(30)
    sid, key_a, tid = connect_share(a)
    st, m = final(a, leased_create(a, sid, key_a, tid, name, lkey, 7))
    check(st == SUCCESS, f"A opened {name} with an RWH lease ({st:#010x})")
    b = Raw(g)
    b.s.settimeout(30)
    key_b = bind(b, sid, key_a)
    return a, b, sid, key_a, key_b, tid, m[128:144]


def create_with(name, access=0xC0000000, disposition=5, oplock=0, ctxs=b""):
    """A CREATE of `name` sharing all, with an oplock level and create
    contexts (`ctxs`, already laid out)."""
    n = name.encode("utf-16-le")
    name_off = 64 + 56
    ctx_off = (name_off + len(n) + 7) // 8 * 8 if ctxs else 0
    fixed = struct.pack("<HBBIQQIIIIIHHII", 57, 0, oplock, 2, 0, 0, access, 0x80, 7,
                        disposition, 0x40, name_off, len(n), ctx_off, len(ctxs))
    pad = b"\0" * (ctx_off - name_off - len(n)) if ctxs else b""
    return fixed + n + pad + ctxs


def lease_break_sent(client, within):
    """The lease break notification `client` (a SignedClient) is sent
    within `within` seconds; fails the script otherwise."""
    client.raw.s.settimeout(within)
    try:
        _, m = client.recv()
    except (socket.timeout, TimeoutError):
        m = None
    check(m is not None, f"the leaseholder is sent something within {within} s")
    cmd, mid = struct.unpack_from("<H", m, 12)[0], struct.unpack_from("<Q", m, 24)[0]
    check((cmd, mid) == (0x12, 2**64 - 1), f"a lease break notification (command {cmd:#x})")
    return m


def opened(client, body):
    """The file id of the open `client` (a SignedClient) makes with CREATE
    `body`; fails the script if the CREATE fails."""
    st, r = client.call(CREATE, body)
    check(st == SUCCESS, f"opened (got {st:#010x})")
    return r[64 + 64 : 64 + 80]


def fsctl(client, fid, code, data, max_output):
    """FSCTL `code` on `fid` with input `data`: its status and output."""
    body = struct.pack("<HHI16sIIIIIIII", 57, 0, code, fid, 64 + 56, len(data), 0, 0, 0, max_output, 1, 0) + data
    st, r = client.call(IOCTL, body)
    off, n = struct.unpack_from("<II", r, 64 + 32)
    return st, r[off : off + n]


class SignedClient:
    """A raw connection of USER, logged on and connected to SHARE, whose
    requests are signed (`rcvbuf`: a small receive buffer, for a client
    that reads slowly)."""

    def __init__(self, rcvbuf=None):
        self.raw = Raw(uuid.uuid4())
        if rcvbuf:
            self.raw.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sid, self.key, self.tid = connect_share(self.raw)

    def send(self, cmd, body, charge=1):
        m = self.raw.header(cmd, self.sid, tid=self.tid, charge=charge) + body
        self.raw.send(cmac_sign(self.key, m))

    def recv(self):
        r = self.raw.recv()
        return struct.unpack_from("<I", r, 8)[0], r

    def call(self, cmd, body, charge=1):
        self.send(cmd, body, charge)
        while True:
            st, r = self.recv()
            if st != 0x103 and struct.unpack_from("<Q", r, 24)[0] != 2**64 - 1:
                return st, r


def unanswered_then_logged_off(name, disposition):
    """Client A and B (one client GUID) with sessions on the share; prints
    "ready" and waits (the driver stops filterd). A's persistent (DH2Q,
    new create GUID G) CREATE of `name` with `disposition` must be answered
    STATUS_SERVER_UNAVAILABLE; prints "gave up" and waits (the driver lets
    filterd go on). A logs off (must succeed); prints "logged off" and
    waits. Returns B's (connection, session id, key, tree id) and G."""
    client, g = uuid.uuid4(), uuid.uuid4()
    a, sid, key, tid = patient_share(client)
    b = patient_share(client)
    _pause("ready")
    st, _ = final(a, persistent_create(a, sid, key, tid, name, g, disposition))
    check(st == 0xC0000466, f"the CREATE filterd answered late: STATUS_SERVER_UNAVAILABLE (got {st:#010x})")
    _pause("gave up")
    st, _ = final(a, cmac_sign(key, a.header(2, sid) + struct.pack("<HH", 4, 0)))
    check(st == SUCCESS, f"A logs off (got {st:#010x})")
    _pause("logged off")
    return b, g


def _pause(line):
    print(line, flush=True)
    sys.stdin.readline()
