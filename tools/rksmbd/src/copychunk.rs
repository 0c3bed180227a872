//! Server-side copy (MS-SMB2 3.3.5.15.5, 3.3.5.15.6): FSCTL_SRV_REQUEST_RESUME_KEY
//! names an open as a copy source, and FSCTL_SRV_COPYCHUNK /
//! FSCTL_SRV_COPYCHUNK_WRITE copy ranges of it into the open the IOCTL is
//! sent on, without the data crossing the network (Windows' Explorer
//! copies, the Linux client's `copy_file_range`). Every chunk's source
//! range is checked with filterd as a read and its target range as a
//! write, as a READ and a WRITE would be, so byte-range locks of any
//! frontend's clients hold; the target's other read leases are broken as
//! a WRITE breaks them.
//!
//! A resume key names an open of the same connection and session only:
//! it is the open's id and this server's GUID (a client cannot name
//! another session's open, nor guess one of another server).

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use crate::files::{Kind, Open};
use crate::server::Connection;
use crate::wire::{status, Reader, Writer};

/// FILE_READ_DATA, FILE_WRITE_DATA, FILE_EXECUTE.
const FILE_READ_DATA: u32 = 0x1;
const FILE_WRITE_DATA: u32 = 0x2;
const FILE_EXECUTE: u32 = 0x20;

/// The server's limits (3.3.5.15.6's defaults): chunks per request, bytes
/// per chunk, bytes per request.
pub const MAX_CHUNKS: u32 = 256;
pub const MAX_CHUNK_SIZE: u32 = 1 << 20;
pub const MAX_DATA_SIZE: u32 = 16 << 20;

/// The size of an SRV_COPYCHUNK_RESPONSE (2.2.32.1).
const RESPONSE_LEN: u32 = 12;

/// STATUS_INVALID_VIEW_SIZE: a chunk's source range passes the end of
/// the source file.
const INVALID_VIEW_SIZE: u32 = 0xC000_001F;

/// The resume key of open `id` (24 bytes).
fn key_of(c: &Connection, id: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    let (head, tail) = k.split_at_mut(8);
    head.copy_from_slice(&id.to_le_bytes());
    tail.copy_from_slice(&c.sh.server_guid);
    k
}

/// The open a resume key names, if it is one of this connection's in
/// `session`.
fn open_of_key(c: &Connection, key: &[u8; 24], session: u64) -> Option<u64> {
    let id = u64::from_le_bytes(key.get(..8)?.try_into().ok()?);
    (key_of(c, id) == *key && c.opens.get(&id).is_some_and(|o| o.session == session)).then_some(id)
}

/// FSCTL_SRV_REQUEST_RESUME_KEY (2.2.32.3) on open `id`: its resume key,
/// then a context length of 0 (and 4 bytes of context, as Windows and
/// Samba send).
pub fn request_resume_key(c: &Connection, id: u64, max_output: u32) -> Result<Vec<u8>, u32> {
    let o = c.opens.get(&id).ok_or(status::FILE_CLOSED)?;
    let Kind::File { .. } = &o.kind else {
        return Err(status::INVALID_DEVICE_REQUEST);
    };
    if max_output < 32 {
        return Err(status::INVALID_PARAMETER);
    }
    let mut w = Writer::new();
    w.bytes(&key_of(c, id)).u32(0).u32(0);
    Ok(w.0)
}

/// What a COPYCHUNK answers: the SRV_COPYCHUNK_RESPONSE, with its status
/// (a failure still carries one, 3.3.5.15.6).
pub struct Copied {
    pub status: u32,
    pub response: Vec<u8>,
}

fn response(chunks: u32, chunk_bytes: u32, total: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.u32(chunks).u32(chunk_bytes).u32(total);
    w.0
}

/// The limits, as the answer to a request past them.
fn limits() -> Copied {
    Copied {
        status: status::INVALID_PARAMETER,
        response: response(MAX_CHUNKS, MAX_CHUNK_SIZE, MAX_DATA_SIZE),
    }
}

/// One chunk: where it is read, where it is written, how long.
struct Chunk {
    source: u64,
    target: u64,
    len: u32,
}

/// FSCTL_SRV_COPYCHUNK (`write_only` false: the target needs read access
/// too) or FSCTL_SRV_COPYCHUNK_WRITE into open `target`, of session
/// `session`, with the request's `input` (SRV_COPYCHUNK_COPY, 2.2.31.1).
pub fn copy_chunk(
    c: &Connection,
    target: u64,
    session: u64,
    input: &[u8],
    max_output: u32,
    write_only: bool,
) -> Result<Copied, u32> {
    if max_output < RESPONSE_LEN {
        return Err(status::INVALID_PARAMETER);
    }
    let mut r = Reader::new(input);
    let key = r.array::<24>("source key")?;
    let count = r.u32("chunk count")?;
    r.u32("reserved")?;
    let dst = c.opens.get(&target).ok_or(status::FILE_CLOSED)?;
    let needs = if write_only {
        FILE_WRITE_DATA
    } else {
        FILE_WRITE_DATA | FILE_READ_DATA
    };
    if dst.granted & needs != needs {
        return Err(status::ACCESS_DENIED);
    }
    let src_id = open_of_key(c, &key, session).ok_or(status::OBJECT_NAME_NOT_FOUND)?;
    let src = c.opens.get(&src_id).ok_or(status::OBJECT_NAME_NOT_FOUND)?;
    // The source is read as a READ reads: read data or execute access.
    if src.granted & (FILE_READ_DATA | FILE_EXECUTE) == 0 {
        return Err(status::ACCESS_DENIED);
    }
    if count > MAX_CHUNKS {
        return Ok(limits());
    }
    let mut chunks = Vec::new();
    let mut total: u32 = 0;
    for _ in 0..count {
        let source = r.u64("source offset")?;
        let target = r.u64("target offset")?;
        let len = r.u32("length")?;
        r.u32("reserved")?;
        if len == 0 || len > MAX_CHUNK_SIZE {
            return Ok(limits());
        }
        total = match total.checked_add(len) {
            Some(t) if t <= MAX_DATA_SIZE => t,
            _ => return Ok(limits()),
        };
        if !crate::files::io_range_ok(source, len) || !crate::files::io_range_ok(target, len) {
            return Err(status::INVALID_PARAMETER);
        }
        chunks.push(Chunk {
            source,
            target,
            len,
        });
    }
    let (Kind::File { .. }, Kind::File { .. }) = (&src.kind, &dst.kind) else {
        return Err(status::INVALID_DEVICE_REQUEST);
    };
    let mut written: u32 = 0;
    let mut bytes: u32 = 0;
    let mut failed = None;
    for chunk in &chunks {
        if let Err(st) = copy_one(c, src, dst, chunk) {
            // The chunks before it are copied; the answer says how many
            // (3.3.5.15.6).
            failed = Some(st);
            break;
        }
        written += 1;
        bytes += chunk.len;
    }
    // What was copied into a write-through target is on stable storage
    // before the answer, as a WRITE's would be. A failed sync fails the
    // copy, but the answer still counts the chunks written (3.3.5.15.6):
    // they are in the file, only maybe not on stable storage.
    if written > 0 {
        if let Err(st) = crate::files::sync_if_write_through(dst, false) {
            failed = failed.or(Some(st));
        }
    }
    Ok(Copied {
        status: failed.unwrap_or(status::SUCCESS),
        response: response(written, 0, bytes),
    })
}

/// Copies one chunk: reads its source range under a read check, writes
/// its target range under a write check, one after the other (never two
/// checks held at once).
fn copy_one(c: &Connection, src: &Open, dst: &Open, chunk: &Chunk) -> Result<(), u32> {
    let (
        Kind::File {
            key: skey,
            file: sfile,
            fid: sfid,
        },
        Kind::File {
            key: dkey,
            file: dfile,
            fid: dfid,
        },
    ) = (&src.kind, &dst.kind)
    else {
        return Err(status::INVALID_DEVICE_REQUEST);
    };
    let len = u64::from(chunk.len);
    let size = sfile.metadata().map_err(|_| status::INTERNAL_ERROR)?.len();
    if chunk.source.checked_add(len).is_none_or(|end| end > size) {
        return Err(INVALID_VIEW_SIZE);
    }
    let mut buf = vec![0u8; usize::try_from(chunk.len).unwrap_or(0)];
    {
        let _pass = crate::files::check_io(&c.sh, *skey, *sfid, chunk.source, len, false)?;
        sfile
            .read_exact_at(&mut buf, chunk.source)
            .map_err(|_| INVALID_VIEW_SIZE)?;
    }
    let wrote = {
        let _pass = crate::files::check_io(&c.sh, *dkey, *dfid, chunk.target, len, true)?;
        dst.frozen
            .kept_around(dfile.as_fd(), || dfile.write_all_at(&buf, chunk.target))
    };
    // Whether or not the write failed: a failed one may have landed in
    // part (a short pwrite, then ENOSPC or EIO on the next).
    crate::files::break_read_caching(&c.sh, *dkey);
    wrote.map_err(crate::files::io_status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_three_counts() {
        assert_eq!(
            response(1, 0, 4096),
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]
        );
        let l = limits();
        assert_eq!(l.status, status::INVALID_PARAMETER);
        assert_eq!(l.response.len(), 12);
    }
}
