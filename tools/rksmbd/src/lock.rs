//! LOCK (MS-SMB2 2.2.26, 3.3.5.14): byte-range locks are filterd's
//! (LockFileEx rules, mandatory across every frontend, mirrored as OFD
//! locks for local processes), taken and released all or nothing, with
//! the lock sequence of durable and persistent opens so a replayed LOCK
//! changes nothing.
//!
//! Requests are answered synchronously: a lock without
//! SMB2_LOCKFLAG_FAIL_IMMEDIATELY that conflicts is retried for up to
//! [`BLOCKING_WAIT`] and then refused with STATUS_LOCK_NOT_GRANTED,
//! instead of pending until the conflicting lock goes away.

use std::time::{Duration, Instant};

use libfilter::locks::{LockOp, LockRange};
use libfilter::model::LockSequence;
use libfilter::proto::ErrorCode;

use crate::files::{file_of, status_of};
use crate::server::{Connection, Outcome, Reply, Request};
use crate::wire::{status, Reader};

const SHARED: u32 = 0x1;
const EXCLUSIVE: u32 = 0x2;
const UNLOCK: u32 = 0x4;
const FAIL_IMMEDIATELY: u32 = 0x10;
/// Most locks one LOCK request may carry.
const MAX_LOCKS: u16 = 64;
/// How long a blocking lock is retried before it is refused.
pub const BLOCKING_WAIT: Duration = Duration::from_millis(1000);

/// The decoded lock elements: the operations, and whether the request
/// may wait.
fn decode(r: &mut Reader<'_>, count: u16) -> Result<(Vec<LockOp>, bool), u32> {
    if count == 0 || count > MAX_LOCKS {
        return Err(status::INVALID_PARAMETER);
    }
    let mut ops = Vec::with_capacity(usize::from(count));
    let mut blocking = false;
    let mut unlocking = None;
    for _ in 0..count {
        let offset = r.u64("offset")?;
        let length = r.u64("length")?;
        let flags = r.u32("flags")?;
        r.u32("reserved")?;
        let unlock = match flags {
            UNLOCK => true,
            SHARED | EXCLUSIVE => {
                blocking = true;
                false
            }
            f if f == SHARED | FAIL_IMMEDIATELY || f == EXCLUSIVE | FAIL_IMMEDIATELY => false,
            _ => return Err(status::INVALID_PARAMETER),
        };
        // A request either unlocks or locks, never both (3.3.5.14.1/2).
        if *unlocking.get_or_insert(unlock) != unlock {
            return Err(status::INVALID_PARAMETER);
        }
        ops.push(LockOp {
            range: LockRange { offset, length },
            exclusive: flags & EXCLUSIVE != 0,
            unlock,
        });
    }
    // Only a single lock may wait.
    if blocking && count > 1 {
        return Err(status::INVALID_PARAMETER);
    }
    Ok((ops, blocking))
}

/// LOCK.
pub fn lock(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 48 {
        return Err(status::INVALID_PARAMETER);
    }
    let count = r.u16("lock count")?;
    let seq = r.u32("lock sequence")?;
    r.skip(16, "file id")?;
    let (key, durable) = file_of(c, req, 8, related)?;
    let (ops, blocking) = decode(&mut r, count)?;
    // Lock sequences count for durable and persistent opens (3.3.5.14).
    let index = seq >> 4;
    let sequence = (durable && (1..=64).contains(&index)).then(|| LockSequence {
        number: u8::try_from(seq & 0xF).unwrap_or(0),
        index: u8::try_from(index).unwrap_or(0),
    });
    let client = c.sh.filter.client();
    let deadline = Instant::now() + BLOCKING_WAIT;
    loop {
        match client.lock(key, ops.clone(), sequence) {
            Ok(()) => return Ok(Reply::ok(vec![4, 0, 0, 0])),
            Err(e)
                if blocking
                    && e.code() == Some(ErrorCode::LockNotGranted)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(status_of(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Writer;

    fn element(w: &mut Writer, offset: u64, length: u64, flags: u32) {
        w.u64(offset).u64(length).u32(flags).u32(0);
    }

    #[test]
    fn lock_elements_follow_the_rules() {
        let mut w = Writer::new();
        element(&mut w, 0, 10, EXCLUSIVE | FAIL_IMMEDIATELY);
        element(&mut w, 10, 10, SHARED | FAIL_IMMEDIATELY);
        let (ops, blocking) = decode(&mut Reader::new(&w.0), 2).unwrap();
        assert_eq!(ops.len(), 2);
        assert!(ops[0].exclusive && !ops[1].exclusive && !blocking);

        let mut w = Writer::new();
        element(&mut w, 0, 10, EXCLUSIVE);
        element(&mut w, 10, 10, EXCLUSIVE);
        assert_eq!(
            decode(&mut Reader::new(&w.0), 2).err(),
            Some(status::INVALID_PARAMETER),
            "two blocking locks"
        );
        let mut w = Writer::new();
        element(&mut w, 0, 10, UNLOCK);
        element(&mut w, 0, 10, SHARED | FAIL_IMMEDIATELY);
        assert!(
            decode(&mut Reader::new(&w.0), 2).is_err(),
            "unlock and lock mixed"
        );
        let mut w = Writer::new();
        element(&mut w, 0, 10, SHARED | EXCLUSIVE);
        assert!(decode(&mut Reader::new(&w.0), 1).is_err());
        assert!(decode(&mut Reader::new(&[]), 0).is_err());
        assert!(decode(&mut Reader::new(&[0; 10]), 1).is_err(), "truncated");
    }
}
