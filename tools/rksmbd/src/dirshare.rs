//! Share modes of directory opens. filterd holds regular files only, so
//! rksmbd keeps its directory opens' access and share modes itself, across
//! all its connections, and checks each new directory open against them
//! as MS-FSA 2.1.5.1.2 has it (a sharing violation when one open's access
//! is not shared by the other). A rename checks the directories it
//! changes as Windows does: as an open that adds an entry and shares
//! reading and writing, not delete — so a rename below a directory open
//! with DELETE access, or one that shares no writing, is a sharing
//! violation (smbtorture smb2.rename's share_delete_and_delete_access,
//! no_share_delete_but_delete_access and no_share_delete_no_delete_access).
//!
//! Each open also keeps the path it names its directory by, so that a
//! rename of a directory above it is refused while it is open (as
//! Windows refuses it; filterd refuses it for the files it holds below).
//!
//! One rksmbd process's opens only: another frontend's directory opens
//! (another rksmbd instance, nfsshim) are not seen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::wire::status;

/// FILE_LIST_DIRECTORY (FILE_READ_DATA) and FILE_TRAVERSE (FILE_EXECUTE).
const READS: u32 = 0x1 | 0x20;
/// FILE_ADD_FILE (FILE_WRITE_DATA) and FILE_ADD_SUBDIRECTORY
/// (FILE_APPEND_DATA).
const WRITES: u32 = 0x2 | 0x4;
/// DELETE.
const DELETE: u32 = 0x1_0000;
/// FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_SHARE_DELETE.
const SHARE_READ: u32 = 0x1;
const SHARE_WRITE: u32 = 0x2;
const SHARE_DELETE: u32 = 0x4;

/// What a rename asks of the directories it adds an entry to or removes
/// one from: FILE_ADD_FILE, sharing reading and writing.
const RENAME_ACCESS: u32 = 0x2;
const RENAME_SHARE: u32 = SHARE_READ | SHARE_WRITE;

/// One directory open's modes, and the path it names the directory by
/// (`""`: the share's root).
#[derive(Debug, Clone)]
struct Modes {
    token: u64,
    access: u32,
    share: u32,
    path: String,
}

impl Modes {
    /// An open with no data access nor delete takes no part in sharing
    /// (MS-FSA 2.1.5.1.2.1).
    fn exempt(access: u32) -> bool {
        access & (READS | WRITES | DELETE) == 0
    }

    /// Whether an open with `access` and `share` may stand beside this one.
    fn admits(&self, access: u32, share: u32) -> bool {
        let refused = |have: u32, shared: u32| {
            (have & READS != 0 && shared & SHARE_READ == 0)
                || (have & WRITES != 0 && shared & SHARE_WRITE == 0)
                || (have & DELETE != 0 && shared & SHARE_DELETE == 0)
        };
        !refused(self.access, share) && !refused(access, self.share)
    }
}

/// The directory opens of this process, by device and inode number. An
/// entry lives as long as its open's descriptor (its [`DirShare`] is
/// dropped before the descriptor is closed), so an inode number here is
/// never one reused by another directory.
#[derive(Default)]
pub struct DirShares {
    opens: Mutex<HashMap<(u64, u64), Vec<Modes>>>,
    next: AtomicU64,
}

impl DirShares {
    fn lock(&self) -> MutexGuard<'_, HashMap<(u64, u64), Vec<Modes>>> {
        self.opens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens directory `dir` (device, inode), named by `path`, with
    /// `access` (a granted mask) and `share`: `STATUS_SHARING_VIOLATION`
    /// if an open of it does not admit this one, else the open's place,
    /// held until dropped.
    pub fn take(
        self: &Arc<Self>,
        dir: (u64, u64),
        path: &str,
        access: u32,
        share: u32,
    ) -> Result<DirShare, u32> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let modes = Modes {
            token,
            access,
            share,
            path: path.to_owned(),
        };
        let mut opens = self.lock();
        let refused = !Modes::exempt(access)
            && opens.get(&dir).is_some_and(|held| {
                held.iter()
                    .any(|h| !Modes::exempt(h.access) && !h.admits(access, share))
            });
        if refused {
            return Err(status::SHARING_VIOLATION);
        }
        opens.entry(dir).or_default().push(modes);
        Ok(DirShare {
            shares: Arc::clone(self),
            dir,
            token,
        })
    }

    /// Whether a rename may add or remove an entry of directory `dir`:
    /// `STATUS_SHARING_VIOLATION` when an open of it would refuse an open
    /// for adding a file that shares reading and writing.
    pub fn may_rename_in(&self, dir: (u64, u64)) -> Result<(), u32> {
        let opens = self.lock();
        let refused = opens.get(&dir).is_some_and(|held| {
            held.iter()
                .any(|h| !Modes::exempt(h.access) && !h.admits(RENAME_ACCESS, RENAME_SHARE))
        });
        if refused {
            Err(status::SHARING_VIOLATION)
        } else {
            Ok(())
        }
    }

    /// Whether a directory open names a path below directory `dir` (not
    /// `dir` itself).
    pub fn open_below(&self, dir: &str) -> bool {
        let below = |p: &str| {
            p.strip_prefix(dir)
                .is_some_and(|rest| rest.starts_with('/'))
        };
        self.lock().values().flatten().any(|m| below(&m.path))
    }

    /// The path directory `dir`'s opens name it by (the same for all of
    /// them: a rename through any one moves them all), if it is open.
    pub fn path_of(&self, dir: (u64, u64)) -> Option<String> {
        self.lock()
            .get(&dir)
            .and_then(|held| held.first())
            .map(|m| m.path.clone())
    }

    /// Directory `dir` was renamed to `to`: its opens name it by `to`.
    pub fn renamed(&self, dir: (u64, u64), to: &str) {
        if let Some(held) = self.lock().get_mut(&dir) {
            for m in held {
                to.clone_into(&mut m.path);
            }
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

/// A directory open's place among [`DirShares`]; dropping it lets the
/// directory be opened as if this open were gone.
pub struct DirShare {
    shares: Arc<DirShares>,
    dir: (u64, u64),
    token: u64,
}

impl Drop for DirShare {
    fn drop(&mut self) {
        let mut opens = self.shares.lock();
        if let Some(held) = opens.get_mut(&self.dir) {
            held.retain(|m| m.token != self.token);
            if held.is_empty() {
                opens.remove(&self.dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: (u64, u64) = (1, 2);
    const ALL: u32 = SHARE_READ | SHARE_WRITE | SHARE_DELETE;

    #[test]
    fn opens_that_share_what_the_other_uses_stand_together() {
        let s = Arc::new(DirShares::default());
        let a = s.take(D, "d", READS, SHARE_READ).unwrap();
        let b = s.take(D, "d", 0x1, SHARE_READ).unwrap();
        // A writer is refused by opens that share no writing.
        assert_eq!(
            s.take(D, "d", 0x2, ALL).err(),
            Some(status::SHARING_VIOLATION)
        );
        // An attributes-only open is refused by nobody.
        let c = s.take(D, "d", 0x80, 0).unwrap();
        drop((a, b));
        // Once they go, the writer gets in, and the exempt open refuses
        // nothing.
        let w = s.take(D, "d", 0x2, ALL).unwrap();
        drop((c, w));
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn a_delete_open_refuses_those_that_do_not_share_delete() {
        let s = Arc::new(DirShares::default());
        let d = s.take(D, "d", DELETE, ALL).unwrap();
        assert_eq!(
            s.take(D, "d", 0x1, SHARE_READ | SHARE_WRITE).err(),
            Some(status::SHARING_VIOLATION)
        );
        let other = s.take((1, 3), "e", 0x1, SHARE_READ).unwrap();
        drop((d, other));
        assert_eq!(s.held(), 0);
    }

    /// A rename of a directory is refused while an open names a path
    /// below it; the directory itself, a sibling with the same prefix or
    /// an open that went do not count, and a renamed open counts by its
    /// new name.
    #[test]
    fn opens_below_a_directory_are_found_by_their_paths() {
        let s = Arc::new(DirShares::default());
        let sub = s.take((1, 5), "a/b/c", READS, ALL).unwrap();
        let _a = s.take((1, 4), "a", READS, ALL).unwrap();
        let _sib = s.take((1, 6), "ab/x", READS, ALL).unwrap();
        assert!(s.open_below("a"));
        assert!(s.open_below("a/b"));
        assert!(!s.open_below("a/b/c"));
        assert!(!s.open_below("b"));
        s.renamed((1, 5), "z");
        assert!(!s.open_below("a/b"));
        assert!(s.open_below("ab"));
        assert!(!s.open_below("z"));
        drop(sub);
        assert!(!s.open_below("a/b"));
    }

    /// smbtorture smb2.rename: the parent opened with DELETE, or sharing
    /// nothing, refuses a rename in it; opened without DELETE and sharing
    /// everything, it does not.
    #[test]
    fn a_rename_is_refused_below_a_delete_open_or_one_that_shares_no_write() {
        let s = Arc::new(DirShares::default());
        let rw = READS | WRITES;
        let with_delete = s.take(D, "d", rw | DELETE, ALL).unwrap();
        assert_eq!(s.may_rename_in(D), Err(status::SHARING_VIOLATION));
        drop(with_delete);
        let no_share = s.take(D, "d", rw, 0).unwrap();
        assert_eq!(s.may_rename_in(D), Err(status::SHARING_VIOLATION));
        drop(no_share);
        let fine = s.take(D, "d", rw, ALL).unwrap();
        assert_eq!(s.may_rename_in(D), Ok(()));
        assert_eq!(s.may_rename_in((9, 9)), Ok(()));
        drop(fine);
    }
}
