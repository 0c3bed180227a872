//! CREATE contexts (MS-SMB2 2.2.13.2, 2.2.14.2): decoding the ones
//! rksmbd acts on — durable handle requests and reconnects v1 and v2
//! (DHnQ, DHnC, DH2Q, DH2C), lease requests v1 and v2 (RqLs) and the
//! allocation size (AlSi) — and
//! encoding the response contexts. Unknown contexts are skipped, as the
//! protocol asks.

use crate::wire::{self, status, Reader, WireError, Writer};

/// Most contexts one CREATE may carry.
const MAX_CONTEXTS: usize = 32;

/// DH2Q / DH2C flag: a persistent handle.
pub const DHANDLE_FLAG_PERSISTENT: u32 = 0x2;

/// A durable handle v2 request (DH2Q, 2.2.13.2.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableV2 {
    /// Requested timeout in ms (0: the server's default).
    pub timeout_ms: u32,
    /// The persistent flag.
    pub persistent: bool,
    /// The client's create GUID.
    pub create_guid: uuid::Uuid,
}

/// A durable handle v2 reconnect (DH2C, 2.2.13.2.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectV2 {
    /// The persistent part of the original FileId.
    pub persistent_file_id: u64,
    /// The create GUID of the original open.
    pub create_guid: uuid::Uuid,
    /// The persistent flag.
    pub persistent: bool,
}

/// A lease request (RqLs, 2.2.13.2.8 / 2.2.13.2.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseV {
    /// The client's lease key.
    pub key: [u8; 16],
    /// Requested (or, in a response, granted) lease state bits.
    pub state: u32,
    /// Version 2: the parent lease key and the epoch.
    pub v2: Option<([u8; 16], u16)>,
}

/// The contexts of one CREATE request that rksmbd acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateContexts {
    /// DHnQ present.
    pub durable_v1: bool,
    /// DHnC: the persistent FileId to reconnect.
    pub reconnect_v1: Option<u64>,
    /// DH2Q.
    pub durable_v2: Option<DurableV2>,
    /// DH2C.
    pub reconnect_v2: Option<ReconnectV2>,
    /// RqLs.
    pub lease: Option<LeaseV>,
    /// SMB2_CREATE_APP_INSTANCE_ID (2.2.13.2.13): the AppInstanceId.
    pub app_instance: Option<[u8; 16]>,
    /// SMB2_CREATE_ALLOCATION_SIZE (AlSi, 2.2.13.2.6).
    pub allocation_size: Option<u64>,
    /// SMB2_CREATE_QUERY_MAXIMAL_ACCESS_REQUEST (MxAc, 2.2.13.2.5).
    pub maximal_access: bool,
    /// SMB2_CREATE_QUERY_ON_DISK_ID (QFid, 2.2.13.2.9).
    pub on_disk_id: bool,
    /// SMB2_CREATE_TIMEWARP_TOKEN (TWrp, 2.2.13.2.7): a previous version.
    pub timewarp: bool,
}

/// The name of SMB2_CREATE_APP_INSTANCE_ID, a GUID as bytes.
const APP_INSTANCE_ID: [u8; 16] = [
    0x45, 0xBC, 0xA6, 0x6A, 0xEF, 0xA7, 0xF7, 0x4A, 0x90, 0x08, 0xFA, 0x46, 0x2E, 0x14, 0x4D, 0x74,
];

fn guid(b: [u8; 16]) -> uuid::Uuid {
    uuid::Uuid::from_bytes_le(b)
}

/// Decodes the context chain at `offset`/`len` of `msg`. A chain that
/// mixes durable request and reconnect kinds, or v1 with v2, is
/// STATUS_INVALID_PARAMETER (3.3.5.9.6, 3.3.5.9.7, 3.3.5.9.10,
/// 3.3.5.9.12).
pub fn parse(msg: &[u8], offset: u32, len: u32) -> Result<CreateContexts, u32> {
    let chain = wire::buffer(msg, offset, len, "create contexts")?;
    let mut out = CreateContexts::default();
    let mut at = 0usize;
    for _ in 0..MAX_CONTEXTS {
        let ctx = chain
            .get(at..)
            .ok_or(WireError::Truncated("create context"))?;
        let mut r = Reader::new(ctx);
        let next = usize::try_from(r.u32("next")?).map_err(|_| status::INVALID_PARAMETER)?;
        let name_off = r.u16("name offset")?;
        let name_len = r.u16("name length")?;
        r.u16("reserved")?;
        let data_off = r.u16("data offset")?;
        let data_len = r.u32("data length")?;
        let name = wire::slice(ctx, usize::from(name_off), usize::from(name_len), "name")?;
        let data = wire::buffer(ctx, u32::from(data_off), data_len, "data")?;
        // The name and data lie after the 16-byte header and before the
        // next context: contexts never overlap (a Next of 8 made the
        // next one out of this one's name and data).
        let name_end = usize::from(name_off) + usize::from(name_len);
        let data_end = match data.len() {
            0 => 0,
            n => usize::from(data_off) + n,
        };
        // A name shorter than a tag is no context at all (Windows and
        // Samba refuse it; smbtorture smb2.create.blob).
        if name_off < 16
            || name_len < 4
            || (!data.is_empty() && data_off < 16)
            || (next != 0 && next < name_end.max(data_end).max(16))
        {
            return Err(status::INVALID_PARAMETER);
        }
        let mut d = Reader::new(data);
        match name {
            b"DHnQ" => out.durable_v1 = true,
            b"DHnC" => out.reconnect_v1 = Some(d.u64("file id")?),
            b"DH2Q" => {
                let timeout_ms = d.u32("timeout")?;
                let flags = d.u32("flags")?;
                d.u64("reserved")?;
                out.durable_v2 = Some(DurableV2 {
                    timeout_ms,
                    persistent: flags & DHANDLE_FLAG_PERSISTENT != 0,
                    create_guid: guid(d.array("create guid")?),
                });
            }
            b"DH2C" => {
                let persistent_file_id = d.u64("file id")?;
                d.u64("volatile file id")?;
                let create_guid = guid(d.array("create guid")?);
                let flags = d.u32("flags")?;
                out.reconnect_v2 = Some(ReconnectV2 {
                    persistent_file_id,
                    create_guid,
                    persistent: flags & DHANDLE_FLAG_PERSISTENT != 0,
                });
            }
            b"RqLs" => {
                let key = d.array::<16>("lease key")?;
                let state = d.u32("lease state")?;
                d.u32("lease flags")?;
                d.u64("lease duration")?;
                let v2 = if data.len() >= 52 {
                    let parent = d.array::<16>("parent lease key")?;
                    Some((parent, d.u16("epoch")?))
                } else {
                    None
                };
                out.lease = Some(LeaseV { key, state, v2 });
            }
            b"AlSi" => out.allocation_size = Some(d.u64("allocation size")?),
            b"MxAc" => out.maximal_access = true,
            b"QFid" => out.on_disk_id = true,
            b"TWrp" => out.timewarp = true,
            n if n == APP_INSTANCE_ID => {
                if d.u16("structure size")? != 20 {
                    return Err(status::INVALID_PARAMETER);
                }
                d.u16("reserved")?;
                out.app_instance = Some(d.array("app instance id")?);
            }
            _ => {}
        }
        if next == 0 {
            break;
        }
        if next % 8 != 0 {
            return Err(status::INVALID_PARAMETER);
        }
        at = at.checked_add(next).ok_or(status::INVALID_PARAMETER)?;
    }
    let v1 = out.durable_v1 || out.reconnect_v1.is_some();
    let v2 = out.durable_v2.is_some() || out.reconnect_v2.is_some();
    if (v1 && v2) || (out.durable_v2.is_some() && out.reconnect_v2.is_some()) {
        return Err(status::INVALID_PARAMETER);
    }
    // A DHnQ beside a DHnC is ignored (3.3.5.9.7).
    if out.reconnect_v1.is_some() {
        out.durable_v1 = false;
    }
    Ok(out)
}

/// Builds a response context chain; contexts are 8-byte aligned.
#[derive(Debug, Default)]
pub struct ResponseContexts {
    w: Writer,
    last: Option<usize>,
}

impl ResponseContexts {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a context.
    pub fn push(&mut self, name: &[u8; 4], data: &[u8]) {
        self.w.align(8);
        let start = self.w.len();
        if let Some(prev) = self.last {
            self.w.put_u32(prev, wire::len32(start - prev));
        }
        self.last = Some(start);
        self.w.u32(0).u16(16).u16(4).u16(0);
        self.w.u16(if data.is_empty() { 0 } else { 24 });
        self.w.u32(wire::len32(data.len()));
        self.w.bytes(name).u32(0).bytes(data);
    }

    /// The DH2Q response (2.2.14.2.12).
    pub fn durable_v2(&mut self, timeout_ms: u32, persistent: bool) {
        let mut d = Writer::new();
        d.u32(timeout_ms).u32(if persistent {
            DHANDLE_FLAG_PERSISTENT
        } else {
            0
        });
        self.push(b"DH2Q", &d.0);
    }

    /// The lease response (2.2.14.2.10 / 2.2.14.2.11).
    /// `flags`: SMB2_LEASE_FLAG_BREAK_IN_PROGRESS or none (the parent
    /// key flag of v2 is set here).
    pub fn lease(&mut self, l: &LeaseV, flags: u32) {
        let mut d = Writer::new();
        d.bytes(&l.key).u32(l.state);
        match l.v2 {
            Some((parent, epoch)) => {
                let flags = if parent == [0; 16] {
                    flags
                } else {
                    flags | 0x4
                };
                d.u32(flags).u64(0).bytes(&parent).u16(epoch).u16(0);
            }
            None => {
                d.u32(flags).u64(0);
            }
        }
        self.push(b"RqLs", &d.0);
    }

    /// The encoded chain.
    pub fn into_bytes(self) -> Vec<u8> {
        self.w.0
    }

    /// The chain `bytes` (one this type built) to append to.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let mut last = None;
        let mut at = 0usize;
        while at < bytes.len() {
            last = Some(at);
            let next = bytes
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_le_bytes);
            if next == 0 {
                break;
            }
            at += usize::try_from(next).unwrap_or(usize::MAX / 2);
        }
        ResponseContexts {
            w: Writer(bytes),
            last,
        }
    }

    /// The MxAc response (2.2.14.2.5): the query succeeded, and what the
    /// user may be granted.
    pub fn maximal_access(&mut self, mask: u32) {
        let mut d = Writer::new();
        d.u32(0).u32(mask);
        self.push(b"MxAc", &d.0);
    }

    /// The QFid response (2.2.14.2.9): the file's on-disk id and its
    /// volume's.
    pub fn on_disk_id(&mut self, file: u64, volume: u64) {
        let mut d = Writer::new();
        d.u64(file).u64(volume).bytes(&[0; 16]);
        self.push(b"QFid", &d.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(name: &[u8; 4], data: &[u8], next: u32) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(next)
            .u16(16)
            .u16(4)
            .u16(0)
            .u16(24)
            .u32(wire::len32(data.len()));
        w.bytes(name).u32(0).bytes(data);
        w.align(8);
        w.0
    }

    #[test]
    fn parses_durable_v2_and_lease_and_refuses_mixes() {
        let mut dh2q = Writer::new();
        dh2q.u32(0)
            .u32(DHANDLE_FLAG_PERSISTENT)
            .u64(0)
            .bytes(&[7; 16]);
        let mut rqls = Writer::new();
        rqls.bytes(&[1; 16]).u32(7).u32(0).u64(0);
        let first = ctx(b"DH2Q", &dh2q.0, 0);
        let mut chain = ctx(b"DH2Q", &dh2q.0, wire::len32(first.len()));
        chain.extend_from_slice(&ctx(b"RqLs", &rqls.0, 0));
        let c = parse(&chain, 0, wire::len32(chain.len())).unwrap();
        let d = c.durable_v2.unwrap();
        assert!(d.persistent);
        assert_eq!(d.create_guid, guid([7; 16]));
        assert_eq!(c.lease.unwrap().state, 7);

        let mut mixed = ctx(b"DH2Q", &dh2q.0, wire::len32(first.len()));
        mixed.extend_from_slice(&ctx(b"DHnQ", &[0; 16], 0));
        assert_eq!(
            parse(&mixed, 0, wire::len32(mixed.len())),
            Err(status::INVALID_PARAMETER)
        );
        for n in 0..chain.len() {
            assert!(parse(&chain[..n], 0, wire::len32(n)).is_err(), "{n}");
        }
    }

    #[test]
    fn overlapping_contexts_are_refused() {
        let mut rqls = Writer::new();
        rqls.bytes(&[1; 16]).u32(7).u32(0).u64(0);
        let ok = |next: u32| {
            let mut chain = ctx(b"RqLs", &rqls.0, next);
            chain.extend_from_slice(&ctx(b"DHnQ", &[0; 16], 0));
            parse(&chain, 0, wire::len32(chain.len()))
        };
        // RqLs: 16-byte header, name padded to 24, 32 bytes of data.
        assert!(ok(56).is_ok());
        // A Next into its own header, name or data.
        for next in [8, 16, 24, 48] {
            assert_eq!(ok(next), Err(status::INVALID_PARAMETER), "next {next}");
        }
        // A name or data over the context's own header.
        let mut chain = ctx(b"DHnQ", &[0; 16], 0);
        chain[4..6].copy_from_slice(&8u16.to_le_bytes());
        assert_eq!(
            parse(&chain, 0, wire::len32(chain.len())),
            Err(status::INVALID_PARAMETER)
        );
        let mut chain = ctx(b"DHnQ", &[0; 16], 0);
        chain[10..12].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(
            parse(&chain, 0, wire::len32(chain.len())),
            Err(status::INVALID_PARAMETER)
        );
    }

    #[test]
    fn response_chain_links_contexts() {
        let mut r = ResponseContexts::new();
        r.durable_v2(60_000, true);
        r.lease(
            &LeaseV {
                key: [1; 16],
                state: 7,
                v2: None,
            },
            0,
        );
        let b = r.into_bytes();
        // DH2Q: 16-byte header, name padded to 8, 8 bytes of data.
        assert_eq!(&b[..4], &32u32.to_le_bytes());
        assert_eq!(&b[16..20], b"DH2Q");
        assert_eq!(&b[24..28], &60_000u32.to_le_bytes());
        assert_eq!(&b[32 + 16..32 + 20], b"RqLs");
        assert_eq!(&b[32 + 24..32 + 40], &[1; 16]);
        assert_eq!(b.len(), 32 + 24 + 32);
    }
}
