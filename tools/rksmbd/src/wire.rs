//! The SMB2 wire codec: a bounded reader that never panics on peer bytes,
//! a little-endian writer, the 64-byte SMB2 header (MS-SMB2 2.2.1.2), the
//! command codes and the NTSTATUS values rksmbd sends.
//!
//! Every decoder reads through [`Reader`]: each read checks the remaining
//! length and returns [`WireError`] instead of panicking, so a malformed
//! request becomes `STATUS_INVALID_PARAMETER` and the connection keeps
//! being served.

/// A request that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message ends before a field it declares.
    #[error("message truncated reading {0}")]
    Truncated(&'static str),
    /// A field holds a value the protocol does not allow.
    #[error("bad {0}")]
    Bad(&'static str),
}

/// Reads little-endian fields from a byte slice, bounds-checked.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated(what))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(WireError::Truncated(what))?;
        self.pos = end;
        Ok(s)
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: usize, what: &'static str) -> Result<(), WireError> {
        self.bytes(n, what).map(|_| ())
    }

    /// A fixed-size array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let s = self.bytes(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A little-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    /// A little-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A little-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

/// `buf[offset..offset + len]`, or a typed error.
pub fn slice<'a>(
    buf: &'a [u8],
    offset: usize,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], WireError> {
    let end = offset.checked_add(len).ok_or(WireError::Truncated(what))?;
    buf.get(offset..end).ok_or(WireError::Truncated(what))
}

/// A buffer named by an offset from the start of the SMB2 header and a
/// length, as most requests carry them. An empty buffer may have any offset.
pub fn buffer<'a>(
    msg: &'a [u8],
    offset: u32,
    len: u32,
    what: &'static str,
) -> Result<&'a [u8], WireError> {
    if len == 0 {
        return Ok(&[]);
    }
    let off = usize::try_from(offset).map_err(|_| WireError::Bad(what))?;
    let len = usize::try_from(len).map_err(|_| WireError::Bad(what))?;
    slice(msg, off, len, what)
}

/// UTF-16LE bytes to a string (unpaired surrogates refused).
pub fn utf16(bytes: &[u8], what: &'static str) -> Result<String, WireError> {
    if !bytes.len().is_multiple_of(2) {
        return Err(WireError::Bad(what));
    }
    let units = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes(<[u8; 2]>::try_from(c).unwrap_or_default()));
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .map_err(|_| WireError::Bad(what))
}

/// A string as UTF-16LE bytes.
pub fn to_utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Builds little-endian messages.
#[derive(Debug, Default, Clone)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Writer(Vec::new())
    }
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// Appends zero bytes up to a multiple of `n`.
    pub fn align(&mut self, n: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(n) {
            self.0.push(0);
        }
        self
    }
    /// Current length.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Overwrites a u32 at `at` (a position this writer already wrote).
    pub fn put_u32(&mut self, at: usize, v: u32) {
        if let Some(s) = self.0.get_mut(at..at + 4) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    }
    /// Overwrites a u16 at `at`.
    pub fn put_u16(&mut self, at: usize, v: u16) {
        if let Some(s) = self.0.get_mut(at..at + 2) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// A length that fits the 32-bit fields of the protocol (all our buffers
/// are bounded far below 4 GiB).
pub fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A length that fits 16-bit fields; longer values saturate (callers bound
/// names and blobs well below).
pub fn len16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Size of the SMB2 header.
pub const HEADER_LEN: usize = 64;
/// `\xFESMB`.
pub const PROTOCOL_ID: [u8; 4] = [0xFE, b'S', b'M', b'B'];

/// Header flag: a response.
pub const FLAG_RESPONSE: u32 = 0x1;
/// Header flag: an async header.
pub const FLAG_ASYNC: u32 = 0x2;
/// Header flag: related compound operation.
pub const FLAG_RELATED: u32 = 0x4;
/// Header flag: signed.
pub const FLAG_SIGNED: u32 = 0x8;
/// Header flag: a replayed operation.
pub const FLAG_REPLAY: u32 = 0x2000_0000;

/// SMB2 commands (MS-SMB2 2.2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Command {
    Negotiate,
    SessionSetup,
    Logoff,
    TreeConnect,
    TreeDisconnect,
    Create,
    Close,
    Flush,
    Read,
    Write,
    Lock,
    Ioctl,
    Cancel,
    Echo,
    QueryDirectory,
    ChangeNotify,
    QueryInfo,
    SetInfo,
    OplockBreak,
    /// A code this server does not know.
    Unknown(u16),
}

impl Command {
    /// From the wire.
    pub fn from_code(c: u16) -> Self {
        use Command::*;
        match c {
            0 => Negotiate,
            1 => SessionSetup,
            2 => Logoff,
            3 => TreeConnect,
            4 => TreeDisconnect,
            5 => Create,
            6 => Close,
            7 => Flush,
            8 => Read,
            9 => Write,
            0xA => Lock,
            0xB => Ioctl,
            0xC => Cancel,
            0xD => Echo,
            0xE => QueryDirectory,
            0xF => ChangeNotify,
            0x10 => QueryInfo,
            0x11 => SetInfo,
            0x12 => OplockBreak,
            other => Unknown(other),
        }
    }
}

/// The SMB2 header of a request (sync form; an async request keeps its
/// async id in `async_id` and has no tree id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Credit charge.
    pub credit_charge: u16,
    /// Channel sequence (requests) or status (responses).
    pub status: u32,
    /// The command code.
    pub command: u16,
    /// Credits requested.
    pub credits: u16,
    /// Flags.
    pub flags: u32,
    /// Offset of the next compounded message, 0 for the last.
    pub next_command: u32,
    /// Message id.
    pub message_id: u64,
    /// Async id (async form only).
    pub async_id: u64,
    /// Tree id (sync form).
    pub tree_id: u32,
    /// Session id.
    pub session_id: u64,
    /// Signature.
    pub signature: [u8; 16],
}

impl Header {
    /// Decodes the first 64 bytes of `msg`.
    pub fn decode(msg: &[u8]) -> Result<Header, WireError> {
        let mut r = Reader::new(msg);
        if r.array::<4>("protocol id")? != PROTOCOL_ID {
            return Err(WireError::Bad("protocol id"));
        }
        if r.u16("structure size")? != 64 {
            return Err(WireError::Bad("header structure size"));
        }
        let credit_charge = r.u16("credit charge")?;
        let status = r.u32("status")?;
        let command = r.u16("command")?;
        let credits = r.u16("credits")?;
        let flags = r.u32("flags")?;
        let next_command = r.u32("next command")?;
        let message_id = r.u64("message id")?;
        let (async_id, tree_id) = if flags & FLAG_ASYNC != 0 {
            (r.u64("async id")?, 0)
        } else {
            r.u32("process id")?;
            (0, r.u32("tree id")?)
        };
        let session_id = r.u64("session id")?;
        let signature = r.array::<16>("signature")?;
        Ok(Header {
            credit_charge,
            status,
            command,
            credits,
            flags,
            next_command,
            message_id,
            async_id,
            tree_id,
            session_id,
            signature,
        })
    }

    /// Encodes a (sync) header.
    pub fn encode(&self, w: &mut Writer) {
        w.bytes(&PROTOCOL_ID)
            .u16(64)
            .u16(self.credit_charge)
            .u32(self.status)
            .u16(self.command)
            .u16(self.credits)
            .u32(self.flags)
            .u32(self.next_command)
            .u64(self.message_id);
        if self.flags & FLAG_ASYNC != 0 {
            w.u64(self.async_id);
        } else {
            w.u32(0xFEFF).u32(self.tree_id);
        }
        w.u64(self.session_id).bytes(&self.signature);
    }
}

/// What the 4-byte Direct TCP transport header (MS-SMB2 2.1) announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A NetBIOS session keep-alive: nothing follows.
    KeepAlive,
    /// A PDU of this many bytes follows.
    Pdu(usize),
    /// Not a session message, or longer than `max`: the connection ends.
    Bad,
}

/// Reads a transport header: type 0 and a 24-bit length of at most `max`.
pub fn frame(header: [u8; 4], max: usize) -> Frame {
    let [kind, a, b, c] = header;
    let n = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
    match kind {
        0x85 if n == 0 => Frame::KeepAlive,
        0 if n <= max => Frame::Pdu(n),
        _ => Frame::Bad,
    }
}

/// Splits a PDU into its compounded messages (MS-SMB2 3.3.5.2.7), each
/// with its decoded header. Every header and every NextCommand is checked
/// before anything runs, so that a malformed message at the end of a
/// chain leaves the ones before it undone: NextCommand must be 8-aligned,
/// at least a header and within the PDU.
pub fn compound(pdu: &[u8]) -> Result<Vec<(Header, &[u8])>, WireError> {
    let mut out = Vec::new();
    let mut rest = pdu;
    loop {
        let hdr = Header::decode(rest)?;
        let len = match hdr.next_command {
            0 => rest.len(),
            n => {
                let n = usize::try_from(n).map_err(|_| WireError::Bad("next command"))?;
                if n < HEADER_LEN || n > rest.len() || !n.is_multiple_of(8) {
                    return Err(WireError::Bad("next command"));
                }
                n
            }
        };
        let (msg, after) = rest
            .split_at_checked(len)
            .ok_or(WireError::Bad("next command"))?;
        let last = hdr.next_command == 0;
        out.push((hdr, msg));
        if last {
            return Ok(out);
        }
        rest = after;
    }
}

/// NTSTATUS values rksmbd sends (MS-ERREF 2.3).
#[allow(missing_docs)]
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const UNSUCCESSFUL: u32 = 0xC000_0001;
    pub const PENDING: u32 = 0x0000_0103;
    pub const NOTIFY_CLEANUP: u32 = 0x0000_010B;
    pub const NOTIFY_ENUM_DIR: u32 = 0x0000_010C;
    pub const BUFFER_OVERFLOW: u32 = 0x8000_0005;
    pub const NO_MORE_FILES: u32 = 0x8000_0006;
    pub const NOT_IMPLEMENTED: u32 = 0xC000_0002;
    pub const INVALID_INFO_CLASS: u32 = 0xC000_0003;
    pub const INFO_LENGTH_MISMATCH: u32 = 0xC000_0004;
    pub const INVALID_HANDLE: u32 = 0xC000_0008;
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    pub const NO_SUCH_FILE: u32 = 0xC000_000F;
    pub const INVALID_DEVICE_REQUEST: u32 = 0xC000_0010;
    pub const END_OF_FILE: u32 = 0xC000_0011;
    pub const MORE_PROCESSING_REQUIRED: u32 = 0xC000_0016;
    pub const ACCESS_DENIED: u32 = 0xC000_0022;
    pub const BUFFER_TOO_SMALL: u32 = 0xC000_0023;
    pub const OBJECT_NAME_INVALID: u32 = 0xC000_0033;
    pub const OBJECT_NAME_NOT_FOUND: u32 = 0xC000_0034;
    pub const OBJECT_NAME_COLLISION: u32 = 0xC000_0035;
    pub const BAD_IMPERSONATION_LEVEL: u32 = 0xC000_00A5;
    pub const OBJECT_PATH_NOT_FOUND: u32 = 0xC000_003A;
    pub const SHARING_VIOLATION: u32 = 0xC000_0043;
    pub const FILE_LOCK_CONFLICT: u32 = 0xC000_0054;
    pub const LOCK_NOT_GRANTED: u32 = 0xC000_0055;
    pub const DELETE_PENDING: u32 = 0xC000_0056;
    pub const LOGON_FAILURE: u32 = 0xC000_006D;
    pub const RANGE_NOT_LOCKED: u32 = 0xC000_007E;
    pub const DISK_FULL: u32 = 0xC000_007F;
    pub const INSUFFICIENT_RESOURCES: u32 = 0xC000_009A;
    pub const FILE_IS_A_DIRECTORY: u32 = 0xC000_00BA;
    pub const NOT_SUPPORTED: u32 = 0xC000_00BB;
    pub const NETWORK_NAME_DELETED: u32 = 0xC000_00C9;
    pub const REQUEST_NOT_ACCEPTED: u32 = 0xC000_00D0;
    pub const BAD_NETWORK_NAME: u32 = 0xC000_00CC;
    pub const INVALID_OPLOCK_PROTOCOL: u32 = 0xC000_00E3;
    pub const INTERNAL_ERROR: u32 = 0xC000_00E5;
    pub const DIRECTORY_NOT_EMPTY: u32 = 0xC000_0101;
    pub const NOT_A_DIRECTORY: u32 = 0xC000_0103;
    pub const CANCELLED: u32 = 0xC000_0120;
    pub const FILE_CLOSED: u32 = 0xC000_0128;
    pub const FS_DRIVER_REQUIRED: u32 = 0xC000_019C;
    pub const INVALID_LOCK_RANGE: u32 = 0xC000_01A1;
    pub const USER_SESSION_DELETED: u32 = 0xC000_0203;
    pub const DUPLICATE_OBJECTID: u32 = 0xC000_022A;
    pub const FILE_NOT_AVAILABLE: u32 = 0xC000_0467;
    /// STATUS_SERVER_UNAVAILABLE: an SMB 3.x client of a server offering
    /// persistent handles or multichannel replays the request so answered
    /// (MS-SMB2 3.2.5.7).
    pub const SERVER_UNAVAILABLE: u32 = 0xC000_0466;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16("a"), Ok(0x0201));
        assert_eq!(r.u16("b"), Err(WireError::Truncated("b")));
        assert_eq!(r.u8("c"), Ok(3));
        assert!(r.bytes(usize::MAX, "d").is_err());
        assert!(slice(&[0; 4], usize::MAX, 2, "e").is_err());
    }

    #[test]
    fn header_roundtrip_and_garbage() {
        let h = Header {
            credit_charge: 1,
            status: 0,
            command: 5,
            credits: 10,
            flags: FLAG_SIGNED,
            next_command: 0,
            message_id: 7,
            async_id: 0,
            tree_id: 3,
            session_id: 9,
            signature: [4; 16],
        };
        let mut w = Writer::new();
        h.encode(&mut w);
        assert_eq!(w.len(), HEADER_LEN);
        assert_eq!(Header::decode(&w.0), Ok(h));
        for n in 0..HEADER_LEN {
            assert!(Header::decode(&w.0[..n]).is_err());
        }
        assert!(Header::decode(&[0xFF; 64]).is_err());
    }

    #[test]
    fn a_compound_is_framed_whole_or_not_at_all() {
        let msg = |next: u32| {
            let mut w = Writer::new();
            Header {
                credit_charge: 1,
                status: 0,
                command: 0xD,
                credits: 1,
                flags: 0,
                next_command: next,
                message_id: 1,
                async_id: 0,
                tree_id: 0,
                session_id: 0,
                signature: [0; 16],
            }
            .encode(&mut w);
            w.bytes(&[4, 0, 0, 0, 0, 0, 0, 0]);
            w.0
        };
        let two = [msg(72), msg(0)].concat();
        let chain = compound(&two).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!((chain[0].1.len(), chain[1].1.len()), (72, 72));
        // A broken message anywhere in the chain refuses all of it.
        for bad in [
            [msg(72), msg(0)[..40].to_vec()].concat(),
            [msg(72), vec![0x55; 72]].concat(),
            msg(72),
            [msg(68), msg(0)].concat(),
            [msg(8), msg(0)].concat(),
            [msg(u32::MAX - 7), msg(0)].concat(),
        ] {
            assert!(compound(&bad).is_err(), "{bad:02x?}");
        }
    }

    #[test]
    fn utf16_refuses_odd_and_unpaired() {
        assert_eq!(utf16(&to_utf16("a\\b"), "n").as_deref(), Ok("a\\b"));
        assert!(utf16(&[0x61], "n").is_err());
        assert!(utf16(&[0x00, 0xD8], "n").is_err());
    }
}
