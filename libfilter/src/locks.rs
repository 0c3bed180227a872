//! Byte-range locks with LockFileEx semantics (spec/smb-like.md
//! "Byte-range locks"), shared by every protocol.
//!
//! - A range is `[offset, offset + length)`, its last byte saturating at
//!   `u64::MAX` (NFS-like `length = u64::MAX` means "to end of file"; a
//!   one-byte lock at `u64::MAX` holds that byte). A zero-length range
//!   overlaps nothing and never blocks I/O; as a lock it conflicts only
//!   where LockFileEx says so: lying strictly inside another lock's range
//!   (after its first byte, up to its last), either way round.
//! - An exclusive lock may not overlap any existing lock, the same owner's
//!   included; a shared lock may overlap shared locks, and exclusive locks
//!   held by the same owner.
//! - Locks are a multiset: no merging or splitting; an unlock names exactly
//!   the offset and length of one lock of its owner (its exclusive lock of
//!   that range goes first, else its most recent shared one), else it fails
//!   with [`BatchError::RangeNotLocked`].
//! - A batch is applied in order, all or nothing.
//! - I/O is mandatory among protocol clients: a read over a range another
//!   owner holds exclusively, or a write over a range another owner holds at
//!   all, is refused. An owner's own locks never block its own I/O, except
//!   where the check asks for LockFileEx's rule (SMB-like frontends): there
//!   an owner's own shared lock refuses its own write.
//!
//! Pure: the daemon keeps one [`LockTable`] per file and mirrors the result
//! into OFD locks for local processes.

use serde::{Deserialize, Serialize};

/// A byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LockRange {
    /// First byte.
    pub offset: u64,
    /// Number of bytes (`u64::MAX`: to end of file).
    pub length: u64,
}

impl LockRange {
    /// One past the last byte (saturating).
    pub fn end(self) -> u64 {
        self.offset.saturating_add(self.length)
    }
    /// The last byte (saturating), none for an empty range.
    fn last(self) -> Option<u64> {
        self.length
            .checked_sub(1)
            .map(|l| self.offset.saturating_add(l))
    }
    /// Whether two ranges share a byte. Symmetric; empty ranges share none.
    pub fn overlaps(self, other: LockRange) -> bool {
        match (self.last(), other.last()) {
            (Some(a), Some(b)) => self.offset <= b && other.offset <= a,
            _ => false,
        }
    }
    /// Whether locks over the two ranges meet: they overlap, or one is
    /// empty and lies strictly inside the other (a zero-length lock at a
    /// lock's first byte or just past its last is fine, one within it is
    /// not — Windows, smbtorture's smb2.lock.zerobytelength). Symmetric.
    pub fn lock_overlaps(self, other: LockRange) -> bool {
        let inside = |empty: LockRange, r: LockRange| {
            empty.length == 0
                && r.last()
                    .is_some_and(|last| r.offset < empty.offset && empty.offset <= last)
        };
        self.overlaps(other) || inside(self, other) || inside(other, self)
    }
}

/// Shared (read) or exclusive (write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    /// Others may hold shared locks over it.
    Shared,
    /// Nobody else may hold any lock over it.
    Exclusive,
}

/// One granted lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock<O> {
    /// Who holds it.
    pub owner: O,
    /// What it covers.
    pub range: LockRange,
    /// How.
    pub kind: LockKind,
}

/// One element of a lock request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockOp {
    /// The range.
    #[serde(flatten)]
    pub range: LockRange,
    /// Shared or exclusive (ignored for unlocks).
    pub exclusive: bool,
    /// Unlock instead of lock.
    #[serde(default)]
    pub unlock: bool,
}

/// Why a batch failed; the table is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError<O> {
    /// A lock conflicts with this existing one.
    Conflict(Lock<O>),
    /// An unlock names no lock of the owner.
    RangeNotLocked(LockRange),
}

/// The locks on one file, kept in one order whatever order they were
/// granted, restored or recovered in: by range (offset, then length), then
/// kind, then owner. Which lock a conflict names (the first in that order)
/// is therefore a function of the locks alone — the same before and after a
/// failed commit's undo or a restart, which rebuild tables handle by handle.
/// (Kept in grant order, a rollback once brought two owners' locks back the
/// other way round.)
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LockTable<O> {
    locks: Vec<Lock<O>>,
}

impl<O: Clone + Ord> LockTable<O> {
    /// An empty table.
    pub fn new() -> Self {
        LockTable { locks: Vec::new() }
    }

    /// Adds `lock` at its place in the table's order (after equal ones).
    fn insert(&mut self, lock: Lock<O>) {
        let key = |l: &Lock<O>| (l.range, l.kind);
        let at = self
            .locks
            .partition_point(|l| (key(l), &l.owner) <= (key(&lock), &lock.owner));
        self.locks.insert(at, lock);
    }

    /// The locks, in the table's order (see [`LockTable`]).
    pub fn locks(&self) -> &[Lock<O>] {
        &self.locks
    }

    /// Whether no lock is held.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Whether `owner` may take `kind` over `range` now.
    pub fn check_lock(&self, owner: &O, range: LockRange, kind: LockKind) -> Result<(), Lock<O>> {
        for l in &self.locks {
            if !l.range.lock_overlaps(range) {
                continue;
            }
            let conflict = match kind {
                LockKind::Exclusive => true,
                LockKind::Shared => l.kind == LockKind::Exclusive && l.owner != *owner,
            };
            if conflict {
                return Err(l.clone());
            }
        }
        Ok(())
    }

    /// Applies a batch in order, all or nothing.
    pub fn apply_batch(&mut self, owner: &O, ops: &[LockOp]) -> Result<(), BatchError<O>> {
        let mut next = self.clone();
        for op in ops {
            if op.unlock {
                // The owner's exclusive lock of that range goes first, then
                // its most recent shared one (Windows: smbtorture's
                // smb2.lock.unlock, "exclusive locks should be unlocked
                // before shared").
                let mine = |l: &Lock<O>| l.owner == *owner && l.range == op.range;
                let pos = next
                    .locks
                    .iter()
                    .rposition(|l| mine(l) && l.kind == LockKind::Exclusive)
                    .or_else(|| next.locks.iter().rposition(mine))
                    .ok_or(BatchError::RangeNotLocked(op.range))?;
                next.locks.remove(pos);
            } else {
                let kind = if op.exclusive {
                    LockKind::Exclusive
                } else {
                    LockKind::Shared
                };
                next.check_lock(owner, op.range, kind)
                    .map_err(BatchError::Conflict)?;
                next.insert(Lock {
                    owner: owner.clone(),
                    range: op.range,
                    kind,
                });
            }
        }
        *self = next;
        Ok(())
    }

    /// Whether `owner` may read (or write) `range` past other owners' locks.
    pub fn check_io(&self, owner: &O, range: LockRange, write: bool) -> Result<(), Lock<O>> {
        self.check_io_counting(owner, range, write, false, |_| true)
    }

    /// As [`LockTable::check_io`], where only locks whose owner `counts`
    /// can refuse, and with `own_shared_refuses_write` (LockFileEx) the
    /// owner's own shared lock refuses its own write too (smbtorture's
    /// smb2.lock.rw-shared); its exclusive locks never refuse it.
    pub fn check_io_counting(
        &self,
        owner: &O,
        range: LockRange,
        write: bool,
        own_shared_refuses_write: bool,
        counts: impl Fn(&O) -> bool,
    ) -> Result<(), Lock<O>> {
        for l in &self.locks {
            if !l.range.overlaps(range) || !counts(&l.owner) {
                continue;
            }
            let refuses = match l.owner == *owner {
                true => own_shared_refuses_write && write && l.kind == LockKind::Shared,
                false => write || l.kind == LockKind::Exclusive,
            };
            if refuses {
                return Err(l.clone());
            }
        }
        Ok(())
    }

    /// Drops every lock of `owner` (its open closed); returns how many.
    pub fn remove_owner(&mut self, owner: &O) -> usize {
        let before = self.locks.len();
        self.locks.retain(|l| l.owner != *owner);
        before - self.locks.len()
    }

    /// The locks of one owner.
    pub fn of_owner<'a>(&'a self, owner: &'a O) -> impl Iterator<Item = &'a Lock<O>> + 'a {
        self.locks.iter().filter(move |l| l.owner == *owner)
    }

    /// Adds a lock without checking (restoring persisted state at recovery,
    /// where the set was valid when it was stored).
    pub fn restore(&mut self, lock: Lock<O>) {
        self.insert(lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(offset: u64, length: u64) -> LockRange {
        LockRange { offset, length }
    }
    fn op(offset: u64, length: u64, exclusive: bool, unlock: bool) -> LockOp {
        LockOp {
            range: r(offset, length),
            exclusive,
            unlock,
        }
    }

    #[test]
    fn lockfileex_rules() {
        let mut t = LockTable::new();
        t.apply_batch(&1, &[op(0, 10, true, false)]).unwrap();
        // Exclusive over own exclusive: refused (same open included).
        assert!(t.apply_batch(&1, &[op(5, 10, true, false)]).is_err());
        // Shared over own exclusive: fine; over another's: refused.
        t.apply_batch(&1, &[op(5, 2, false, false)]).unwrap();
        assert!(t.apply_batch(&2, &[op(5, 2, false, false)]).is_err());
        // Shared locks of different owners coexist.
        t.apply_batch(&2, &[op(100, 10, false, false)]).unwrap();
        t.apply_batch(&3, &[op(105, 10, false, false)]).unwrap();
        // Unlock must name an exact range.
        assert_eq!(
            t.apply_batch(&1, &[op(0, 5, false, true)]),
            Err(BatchError::RangeNotLocked(r(0, 5)))
        );
        t.apply_batch(&1, &[op(0, 10, false, true)]).unwrap();
        // Mandatory I/O.
        assert!(
            t.check_io(&9, r(5, 1), false).is_ok(),
            "shared lock lets others read"
        );
        assert!(
            t.check_io(&9, r(5, 1), true).is_err(),
            "any lock stops others writing"
        );
        assert!(
            t.check_io(&1, r(5, 1), true).is_ok(),
            "own locks never block"
        );
        assert!(
            t.check_io_counting(&1, r(5, 1), true, true, |_| true)
                .is_err(),
            "LockFileEx: an own shared lock refuses an own write"
        );
        assert!(
            t.check_io_counting(&1, r(5, 1), false, true, |_| true)
                .is_ok(),
            "but not an own read"
        );
        let mut own = LockTable::new();
        own.apply_batch(&1, &[op(0, 5, true, false)]).unwrap();
        assert!(
            own.check_io_counting(&1, r(0, 5), true, true, |_| true)
                .is_ok(),
            "nor does an own exclusive lock"
        );
        // To end of file.
        t.apply_batch(&4, &[op(1000, u64::MAX, true, false)])
            .unwrap();
        assert!(t.check_io(&9, r(u64::MAX - 1, 1), false).is_err());
        assert!(t.check_io(&9, r(999, 1), true).is_ok());
        // Zero length: fine at a lock's first byte, not inside it.
        t.apply_batch(&5, &[op(1000, 0, true, false)]).unwrap();
        assert!(t.apply_batch(&5, &[op(1005, 0, true, false)]).is_err());
        assert!(
            t.check_io(&9, r(999, 1), true).is_ok(),
            "empty locks block no I/O"
        );
    }

    #[test]
    fn zero_length_and_last_byte_locks_follow_lockfileex() {
        // smbtorture smb2.lock.zerobytelength: {10, 0} held, then ...
        for (off, len, meets) in [
            (10, 0, false),
            (9, 1, false),
            (10, 1, false),
            (11, 1, false),
            (9, 2, true),
            (10, 2, false),
            (9, 3, true),
        ] {
            assert_eq!(r(10, 0).lock_overlaps(r(off, len)), meets, "{off}/{len}");
            assert_eq!(r(off, len).lock_overlaps(r(10, 0)), meets, "{off}/{len}");
        }
        // A one-byte lock at the last offset holds that byte.
        assert!(r(u64::MAX, 1).overlaps(r(u64::MAX, 1)));
        assert!(r(0, u64::MAX).overlaps(r(u64::MAX - 1, 1)));
        assert!(!r(u64::MAX, 0).overlaps(r(u64::MAX, 1)));
    }

    #[test]
    fn unlock_releases_the_exclusive_lock_of_the_range_first() {
        // Shared over own exclusive, then unlock: the shared lock stays,
        // so another owner may share the range again.
        let mut t = LockTable::new();
        t.apply_batch(&1, &[op(45, 5, true, false)]).unwrap();
        t.apply_batch(&1, &[op(45, 5, false, false)]).unwrap();
        t.apply_batch(&1, &[op(45, 5, false, true)]).unwrap();
        assert_eq!(t.locks().len(), 1);
        assert_eq!(t.locks()[0].kind, LockKind::Shared);
        t.apply_batch(&2, &[op(45, 5, false, false)]).unwrap();
        // Zero-length locks alike.
        let mut t = LockTable::new();
        t.apply_batch(&1, &[op(10, 0, true, false), op(10, 0, false, false)])
            .unwrap();
        assert!(t.apply_batch(&2, &[op(5, 10, false, false)]).is_err());
        t.apply_batch(&1, &[op(10, 0, false, true)]).unwrap();
        t.apply_batch(&2, &[op(5, 10, false, false)]).unwrap();
    }

    /// Round 12 (CI, the engine's proptest of a failed commit): a table
    /// rebuilt handle by handle after a rollback held two owners' locks
    /// the other way round, so a conflict named the other lock than before.
    #[test]
    fn a_table_is_the_same_whatever_order_its_locks_came_in() {
        let mut granted = LockTable::new();
        granted.apply_batch(&9, &[op(0, 10, false, false)]).unwrap();
        granted.apply_batch(&4, &[op(5, 10, false, false)]).unwrap();
        granted.apply_batch(&4, &[op(0, 10, false, false)]).unwrap();
        let mut restored = LockTable::new();
        for owner in [4, 9] {
            for l in granted.of_owner(&owner).cloned().collect::<Vec<_>>() {
                restored.restore(l);
            }
        }
        assert_eq!(restored, granted);
        // So a conflict names the same lock either way.
        let exclusive = |t: &LockTable<u8>| t.check_lock(&1, r(0, 20), LockKind::Exclusive);
        assert_eq!(exclusive(&restored), exclusive(&granted));
    }

    #[test]
    fn batches_are_all_or_nothing() {
        let mut t = LockTable::new();
        t.apply_batch(&1, &[op(0, 10, true, false)]).unwrap();
        let before = t.clone();
        let e = t.apply_batch(&2, &[op(20, 5, true, false), op(5, 1, false, false)]);
        assert!(matches!(e, Err(BatchError::Conflict(_))));
        assert_eq!(t, before);
    }

    fn ops() -> impl Strategy<Value = Vec<(u8, LockOp)>> {
        prop::collection::vec(
            (
                0u8..3,
                0u64..64,
                prop_oneof![1u64..16, Just(0u64), Just(u64::MAX)],
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(o, off, len, ex, un)| (o, op(off, len, ex, un))),
            0..24,
        )
    }

    proptest! {
        #[test]
        fn overlap_is_symmetric(a in 0u64..100, b in 0u64..100, c in 0u64..100, d in 0u64..100) {
            prop_assert_eq!(r(a, b).overlaps(r(c, d)), r(c, d).overlaps(r(a, b)));
            prop_assert_eq!(r(a, b).lock_overlaps(r(c, d)), r(c, d).lock_overlaps(r(a, b)));
        }

        #[test]
        fn to_eof_covers_everything_after(off in 0u64..1000, x in 0u64..u64::MAX) {
            let eof = r(off, u64::MAX);
            prop_assert_eq!(eof.overlaps(r(x, 1)), x >= off);
        }

        #[test]
        fn invariants_hold_after_any_history(history in ops()) {
            let mut t: LockTable<u8> = LockTable::new();
            for (owner, o) in history {
                let before = t.clone();
                if t.apply_batch(&owner, &[o]).is_err() {
                    prop_assert_eq!(&t, &before, "a failed batch changes nothing");
                }
            }
            // No exclusive lock overlaps a lock of another owner, nor another
            // exclusive lock of its own.
            for (i, a) in t.locks().iter().enumerate() {
                for (j, b) in t.locks().iter().enumerate() {
                    if i == j || !a.range.overlaps(b.range) { continue; }
                    if a.kind == LockKind::Exclusive {
                        prop_assert!(b.owner == a.owner && b.kind == LockKind::Shared);
                    }
                }
            }
        }

        #[test]
        fn lock_then_unlock_restores(history in ops(), owner in 0u8..3, off in 0u64..64, len in 1u64..16, ex: bool) {
            let mut t: LockTable<u8> = LockTable::new();
            for (o, x) in history { let _ = t.apply_batch(&o, &[x]); }
            let before = t.clone();
            // (A shared lock over the owner's own exclusive one of the same
            // range is not what its unlock removes: the exclusive one goes.)
            let stacked = before
                .of_owner(&owner)
                .any(|l| l.range == r(off, len) && l.kind == LockKind::Exclusive);
            if !stacked && t.apply_batch(&owner, &[op(off, len, ex, false)]).is_ok() {
                t.apply_batch(&owner, &[op(off, len, ex, true)]).unwrap();
                let mut a = before.locks().to_vec();
                let mut b = t.locks().to_vec();
                a.sort_by_key(|l| (l.owner, l.range, l.kind == LockKind::Exclusive));
                b.sort_by_key(|l| (l.owner, l.range, l.kind == LockKind::Exclusive));
                prop_assert_eq!(a, b);
            }
        }

        #[test]
        fn own_locks_never_block_own_io(history in ops(), owner in 0u8..3, off in 0u64..64, len in 1u64..16, w: bool) {
            let mut t: LockTable<u8> = LockTable::new();
            for (o, x) in history { let _ = t.apply_batch(&o, &[x]); }
            t.remove_owner(&((owner + 1) % 3));
            t.remove_owner(&((owner + 2) % 3));
            prop_assert!(t.check_io(&owner, r(off, len), w).is_ok());
        }
    }
}
