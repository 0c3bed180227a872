//! How a durable or persistent open was made — the SMB access mask it was
//! granted and whether it is write-through — kept with filterd's handle,
//! for its DH2C/DHnC reconnects and the replays of its CREATE.
//!
//! filterd's handle record holds only the open's rights, whose one write
//! right stands for FILE_WRITE_DATA and FILE_APPEND_DATA alike: without
//! more, a reconnected append-only open could overwrite and resize the
//! file. So the open's handle scope holds one record ([`MADE_OP_ID`])
//! saying how it was made, written before the CREATE is answered. A
//! handle-scope record lives exactly as long as the handle: filterd drops
//! it with the handle however that goes (closed by anyone, expired,
//! purged, taken over), stores it with a persistent handle (so it
//! survives a filterd restart as the handle does), and it is found after
//! an rksmbd restart. Before, an in-process registry by create GUID kept
//! it: lost when rksmbd restarted, and left behind by every handle its
//! client did not close itself.
//!
//! The record is written only when it says more than filterd's rights:
//! an open whose mask is theirs ([`mask_of_rights`]) and that is not
//! write-through beyond its durability costs no extra filterd call. An
//! open without the record (made so, or made by an rksmbd before the
//! record existed) is reconnected with the mask of filterd's rights, and
//! write-through as the reconnect's create options say.

use libfilter::client::{ClientError, FilterClient};
use libfilter::model::{ReplayScope, ResumeKey, Rights};

use crate::files::DELETE;

/// The op id of the record in the handle's scope: its only one, and the
/// last to go should others ever share the scope (oldest op ids go first).
pub const MADE_OP_ID: u64 = u64::MAX;

/// The op id of the other record a durable handle's scope may hold: the
/// identity of its last end-of-file WRITE (`crate::files::kept_append`),
/// replaced by each. Older than the [`MADE_OP_ID`] record, never evicted by
/// it: both are kept with [`KEEP`].
pub const APPEND_OP_ID: u64 = u64::MAX - 1;

/// How many records a handle's scope keeps: [`MADE_OP_ID`]'s and
/// [`APPEND_OP_ID`]'s (with 1, each would evict the other).
pub const KEEP: u32 = 2;

/// What the record's text starts with (a version: a later format gets
/// another tag, and this rksmbd reads it as no record).
const TAG: &str = "rksmbd-made/1";

/// How a durable open was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Made {
    /// Made with FILE_WRITE_THROUGH.
    pub write_through: bool,
    /// The SMB access mask it was granted.
    pub granted: u32,
}

impl Made {
    /// The record's text.
    pub fn encode(&self) -> String {
        format!(
            "{TAG} granted={:#010x} write_through={}",
            self.granted,
            u8::from(self.write_through)
        )
    }

    /// The record read back; None for anything else (no panic on any text).
    pub fn decode(text: &str) -> Option<Made> {
        let mut parts = text.split(' ');
        if parts.next()? != TAG {
            return None;
        }
        let granted = parts.next()?.strip_prefix("granted=0x")?;
        let granted = u32::from_str_radix(granted, 16).ok()?;
        let write_through = match parts.next()? {
            "write_through=0" => false,
            "write_through=1" => true,
            _ => return None,
        };
        parts.next().is_none().then_some(Made {
            write_through,
            granted,
        })
    }

    /// Whether a handle with `rights` (persistent or not) needs the record:
    /// without it a reconnect would get more access than the open was
    /// granted, or lose its write-through (a persistent open is
    /// write-through anyway).
    pub fn needs_record(&self, rights: Rights, persistent: bool) -> bool {
        let missing = mask_of_rights(rights) & !self.granted & !READ_METADATA;
        missing != 0 || (self.write_through && !persistent)
    }

    /// What a reconnect of a handle with `rights` gets: this open within
    /// filterd's rights (never more than either).
    pub fn within(&self, rights: Rights) -> Made {
        // Only the bits filterd's rights stand for are clipped: FILE_EXECUTE
        // (which a READ right stands for), WRITE_DAC and the like stay as
        // granted (re-review rr-last36: an execute-only open's reconnect
        // lost FILE_EXECUTE and was refused its READs).
        let modelled = mask_of_rights(Rights::ALL) | FILE_EXECUTE;
        let mut allowed = mask_of_rights(rights) | !modelled;
        if rights.contains(Rights::READ) {
            allowed |= FILE_EXECUTE;
        }
        Made {
            write_through: self.write_through,
            granted: self.granted & allowed,
        }
    }
}

/// FILE_EXECUTE (MS-SMB2 2.2.13.1.1).
const FILE_EXECUTE: u32 = 0x0000_0020;

/// FILE_READ_EA, FILE_READ_ATTRIBUTES, READ_CONTROL and SYNCHRONIZE: an
/// open granted less than filterd's rights only by these needs no record
/// (re-review rr-mask36: GENERIC_WRITE alone lacks FILE_READ_ATTRIBUTES,
/// and every Linux O_WRONLY open of a persistent handle paid a second
/// commit for it); reconnected without one, it may read its file's
/// attributes, EAs and security descriptor, nothing more.
const READ_METADATA: u32 = 0x0000_0008 | 0x0000_0080 | 0x0002_0000 | 0x0010_0000;

/// What a reconnect of a handle whose record this rksmbd cannot read (one
/// a later rksmbd wrote) is granted, within filterd's rights: read, append
/// and metadata, write-through — the narrowest open a client may still
/// use, never FILE_WRITE_DATA the record may have withheld (re-review
/// rr-mask36: read as no record, an append-only open became writable).
const UNREADABLE: Made = Made {
    write_through: true,
    granted: 0x0012_0089 | 0x0000_0004,
};

/// An access mask for filterd rights: what an open without the record is
/// reconnected with.
pub fn mask_of_rights(r: Rights) -> u32 {
    let mut m = 0x0012_0080; // read attributes, read control, synchronize
    if r.contains(Rights::READ) {
        m |= 0x0012_0089;
    }
    if r.contains(Rights::WRITE) {
        m |= 0x0012_0116;
    }
    if r.contains(Rights::DELETE) {
        m |= DELETE;
    }
    m
}

/// Keeps `made` with handle `key` (attached to this rksmbd): durable with
/// a persistent handle before this returns.
pub fn keep(client: &FilterClient, key: ResumeKey, made: Made) -> Result<(), ClientError> {
    client.record_reply(ReplayScope::Handle(key), MADE_OP_ID, made.encode(), KEEP)
}

/// How handle `key` (attached to this rksmbd) was made, if its scope
/// says (None: no record; [`UNREADABLE`] for one this rksmbd cannot read).
pub fn of(client: &FilterClient, key: ResumeKey) -> Result<Option<Made>, ClientError> {
    let record = client.lookup_reply(ReplayScope::Handle(key), MADE_OP_ID)?;
    Ok(record.map(|r| read_or_narrowest(key, &r.reply)))
}

/// The record `text` of handle `key`, or [`UNREADABLE`] when it does not
/// read.
fn read_or_narrowest(key: ResumeKey, text: &str) -> Made {
    Made::decode(text).unwrap_or_else(|| {
        tracing::warn!(resume_key = %key, "a handle's record of how it was made is not read: reconnected read and append only");
        UNREADABLE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_record_reads_back_and_nothing_else_does() {
        for made in [
            Made {
                write_through: true,
                granted: 0x84,
            },
            Made {
                write_through: false,
                granted: u32::MAX,
            },
        ] {
            assert_eq!(Made::decode(&made.encode()), Some(made));
        }
        for bad in [
            "",
            "rksmbd-made/1",
            "rksmbd-made/2 granted=0x00000084 write_through=1",
            "rksmbd-made/1 granted=0x00000084 write_through=2",
            "rksmbd-made/1 granted=0x100000000 write_through=1",
            "rksmbd-made/1 granted=84 write_through=1",
            "rksmbd-made/1 granted=0x00000084 write_through=1 more",
        ] {
            assert_eq!(Made::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_record_that_does_not_read_reconnects_read_and_append_only() {
        let key = ResumeKey::new_random();
        let later = "rksmbd-made/2 granted=0x00000084 write_through=0 more";
        let m = read_or_narrowest(key, later).within(Rights::READ.union(Rights::WRITE));
        assert_eq!(m.granted & 0x2, 0, "FILE_WRITE_DATA granted: {m:?}");
        assert_ne!(m.granted & 0x4, 0, "no append: {m:?}");
        assert!(m.write_through);
        let append = Made {
            write_through: false,
            granted: 0x84,
        };
        assert_eq!(read_or_narrowest(key, &append.encode()), append);
    }

    #[test]
    fn only_an_open_beyond_filterds_rights_needs_the_record() {
        let rw = Rights::READ.union(Rights::WRITE);
        let made = |granted, write_through| Made {
            write_through,
            granted,
        };
        // GENERIC_READ | GENERIC_WRITE: filterd's rights say it all.
        assert!(!made(0x0012_019F, false).needs_record(rw, false));
        // GENERIC_WRITE alone (Linux O_WRONLY), FILE_READ_DATA alone: short
        // of filterd's rights only by metadata reads.
        assert!(!made(0x0012_0116, false).needs_record(Rights::WRITE, false));
        assert!(!made(0x0000_0001, false).needs_record(Rights::READ, false));
        // Append-only with read attributes, as Windows asks.
        assert!(made(0x0012_0184, false).needs_record(Rights::WRITE, false));
        // Append-only: filterd's write right would give FILE_WRITE_DATA.
        assert!(made(0x84, false).needs_record(Rights::WRITE, false));
        // Write-through, unless persistent (always write-through).
        assert!(made(0x0012_019F, true).needs_record(rw, false));
        assert!(!made(0x0012_019F, true).needs_record(rw, true));
        assert_eq!(
            made(0x001F_01FF, false).within(Rights::WRITE).granted,
            0x001E_01D6
        );
        // An execute-only open (FILE_GENERIC_EXECUTE) keeps FILE_EXECUTE.
        assert_eq!(
            made(0x0012_00A0, false).within(Rights::READ).granted,
            0x0012_00A0
        );
    }
}
