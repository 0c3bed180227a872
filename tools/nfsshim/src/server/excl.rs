//! The ages of the `excl` table's records (exclusive-create verifiers),
//! so that nfsshim, not filterd, decides which go when the table is full.
//!
//! A verifier's record is named by its path's hash (`fnv64`), so that a
//! re-send — on its slot or not, after any restart — finds it by the
//! path alone. filterd keeps at most [`state::KEEP`] records a scope and
//! dropped the lowest op ids beyond that (it drops the oldest recorded
//! since review rvspec, but nfsshim never lets it choose): for this table,
//! the smallest hashes, not the oldest records. Once the table was full (files made
//! by exclusive creates and never removed through nfsshim), a new
//! verifier whose hash was below every stored one was dropped in its own
//! commit, and any client's flood of exclusive creates under names with
//! large hashes dropped every other verifier (review rv-shims 2). Each
//! record now carries its age (`made`, a count), and nfsshim keeps the
//! table within filterd's cap itself: a create that may add a record
//! first deletes the oldest ones, in its own thread and before its open,
//! when the table, the creates under way and the deletes under way would
//! otherwise pass the cap. So the store never holds more than the cap,
//! whatever runs at once (re-review rr-shimfix 1: deletes left to a
//! queue let twelve clients' creates pass it, and filterd's trim took
//! verifiers already answered).

use std::collections::{BTreeSet, HashMap};

use crate::state;

/// The record member that holds a record's age.
pub const MADE: &str = "made";

/// The records nfsshim believes the table holds, by op id, with their
/// ages; the creates under way that may each add one; the deletes under
/// way. The table never holds a record this does not count: a record
/// whose commit's answer was lost counts as written, and one whose
/// delete failed is entered again.
#[derive(Default)]
pub struct Ages {
    by_op: HashMap<u64, u64>,
    by_age: BTreeSet<(u64, u64)>,
    /// Creates under way of records not in `by_op`.
    under_way: usize,
    /// Records being deleted (made room for, or of names being removed
    /// or renamed), with their ages: a create of one waits.
    deleting: HashMap<u64, u64>,
    /// Records being written, with how many creates write each: none is
    /// deleted meanwhile (a delete landing after the write would take
    /// the new verifier).
    creating: HashMap<u64, usize>,
    next: u64,
}

/// A create's claim on the table ([`Ages::begin`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Claim {
    pub op: u64,
    /// The age its record is written with.
    pub made: u64,
    /// Whether it may add a record (its op id was not in the table).
    adds: bool,
}

/// Why a create may not begin now.
#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    /// Its own record is being deleted (it was the oldest): the create
    /// waits for that delete, or its record could go with it.
    Deleting,
}

impl Ages {
    /// A record found in the table (at a restore) with age `made` (0 for
    /// a record of an nfsshim before ages: the oldest).
    pub fn found(&mut self, op: u64, made: u64) {
        self.enter(op, made);
        self.next = self.next.max(made.saturating_add(1));
    }

    /// A create about to write record `op`: its claim, and the records it
    /// must delete first (oldest first, each marked as being deleted:
    /// [`Self::deleted`] for each) so that the table, the creates under
    /// way and the deletes under way stay within `cap`.
    pub fn begin(&mut self, op: u64, cap: usize) -> Result<(Claim, Vec<u64>), Busy> {
        if self.deleting.contains_key(&op) {
            return Err(Busy::Deleting);
        }
        let made = self.next.max(1);
        self.next = made.saturating_add(1);
        let adds = !self.by_op.contains_key(&op);
        if adds {
            self.under_way += 1;
        }
        *self.creating.entry(op).or_default() += 1;
        // Records being deleted count until their delete is done: each
        // create deletes the excess it sees, before its own write.
        let total = self.by_op.len() + self.under_way + self.deleting.len();
        let mut excess = total.saturating_sub(cap.max(1));
        let mut drop = Vec::new();
        while excess > 0 {
            let creating = &self.creating;
            let Some(&(old_made, old)) =
                self.by_age.iter().find(|(_, o)| !creating.contains_key(o))
            else {
                break;
            };
            self.by_age.remove(&(old_made, old));
            self.by_op.remove(&old);
            self.deleting.insert(old, old_made);
            drop.push(old);
            excess -= 1;
        }
        Ok((Claim { op, made, adds }, drop))
    }

    /// The create of `claim` is done: `written` unless its record was
    /// certainly not written (refused, or its file was there).
    pub fn end(&mut self, claim: Claim, written: bool) {
        if claim.adds {
            self.under_way = self.under_way.saturating_sub(1);
        }
        if let Some(n) = self.creating.get_mut(&claim.op) {
            *n -= 1;
            if *n == 0 {
                self.creating.remove(&claim.op);
            }
        }
        if written {
            self.enter(claim.op, claim.made);
        }
    }

    /// Holds record `op` for a name being removed or renamed, before the
    /// change is sent: a create of the name meanwhile waits
    /// ([`Busy::Deleting`]), so the change's delete of the record cannot
    /// take a verifier a create wrote after the change (re-review
    /// rr-share 1). `false` (nothing held, nothing to delete) if a create
    /// writes it now or it is held already — then it is left be: a
    /// create that writes it made the name anew, and a record naming the
    /// old file is told apart by a re-send's identity check anyway — or
    /// if it has no record.
    pub fn hold(&mut self, op: u64) -> bool {
        if self.creating.contains_key(&op) || self.deleting.contains_key(&op) {
            return false;
        }
        // A name without a record holds nothing: there is nothing its
        // change would delete, so a create of it need not wait (held, any
        // peer's REMOVEs of an absent name kept another's create of it in
        // NFS4ERR_DELAY, and counted against the cap: re-review rr-last 1).
        let Some(made) = self.by_op.remove(&op) else {
            return false;
        };
        self.by_age.remove(&(made, op));
        self.deleting.insert(op, made);
        true
    }

    /// Marks record `op` as being deleted ([`Self::hold`]).
    #[cfg(test)]
    pub fn deleting(&mut self, op: u64) -> bool {
        self.hold(op)
    }

    /// The delete of `op` is done (`ok`), or was not made — the record,
    /// if it was there, is there still, entered again with its age.
    pub fn deleted(&mut self, op: u64, ok: bool) {
        if let Some(made) = self.deleting.remove(&op) {
            if !ok && !self.by_op.contains_key(&op) {
                self.enter(op, made);
            }
        }
    }

    /// How many records are entered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_op.len()
    }

    fn enter(&mut self, op: u64, made: u64) {
        if let Some(old) = self.by_op.remove(&op) {
            self.by_age.remove(&(old, op));
        }
        self.by_op.insert(op, made);
        self.by_age.insert((made, op));
    }
}

/// The cap nfsshim keeps the table within: filterd's.
pub fn cap() -> usize {
    usize::try_from(state::KEEP).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The oldest go first, whatever their op ids; deletes under way and
    /// creates under way count against the cap until they are done.
    #[test]
    fn the_table_and_what_is_under_way_stay_within_the_cap() {
        let mut a = Ages::default();
        a.found(10, 0);
        a.found(5, 7);
        a.found(6, 8);
        let (c1, drop) = a.begin(1, 3).expect("begins");
        assert_eq!(drop, vec![10], "the oldest (made 0)");
        // The delete of 10 is under way: a second create deletes the next.
        let (c2, drop) = a.begin(2, 3).expect("begins");
        assert_eq!(drop, vec![5, 6], "10's delete, c1 and c2 count too");
        a.deleted(10, true);
        a.deleted(5, true);
        // A failed delete: the record is there still, entered again.
        a.deleted(6, false);
        assert!(a.by_op.contains_key(&6));
        // Refused: no record, no room kept.
        a.end(c2, false);
        a.end(c1, true);
        assert_eq!(a.len(), 2);
        assert!(a.by_op.contains_key(&1) && !a.by_op.contains_key(&2));
    }

    /// A create of a path whose record is being deleted waits for it; a
    /// path written again takes no more room.
    #[test]
    fn a_record_being_deleted_is_not_written_meanwhile() {
        let mut a = Ages::default();
        a.found(7, 1);
        assert!(a.deleting(7));
        assert_eq!(a.begin(7, 10), Err(Busy::Deleting));
        a.deleted(7, true);
        let (c, drop) = a.begin(7, 10).expect("begins");
        assert!(drop.is_empty() && c.adds);
        a.end(c, true);
        let (c, _) = a.begin(7, 1).expect("begins");
        assert!(!c.adds, "already there");
        a.end(c, true);
        assert_eq!(a.len(), 1);
        assert!(!a.deleting(8), "nothing known of 8");
        // A name without a record is not held: a create of it goes on,
        // and nothing counts against the cap.
        assert!(!a.hold(9));
        let (_, drop) = a.begin(9, 2).expect("begins");
        assert!(drop.is_empty(), "{drop:?}");
    }

    /// A record a create writes is neither trimmed for another create nor
    /// deleted for a removed name while the create is under way.
    #[test]
    fn a_record_being_written_is_not_deleted_meanwhile() {
        let mut a = Ages::default();
        a.found(3, 1);
        a.found(4, 2);
        let (c3, drop) = a.begin(3, 2).expect("begins");
        assert!(drop.is_empty() && !c3.adds);
        let (c5, drop) = a.begin(5, 2).expect("begins");
        assert_eq!(drop, vec![4], "not 3, the oldest, being written");
        assert!(!a.deleting(3), "a removed name's delete leaves it be");
        a.deleted(4, true);
        a.end(c3, true);
        a.end(c5, true);
        assert!(a.deleting(3));
    }
}
