//! The ages of the `excl` table's records (exclusive-create verifiers),
//! so that nfsshim, not filterd, decides which go when the table is full.
//!
//! A verifier's record is named by its path's hash (`fnv64`), so that a
//! re-send — on its slot or not, after any restart — finds it by the
//! path alone. filterd keeps at most [`state::KEEP`] records a scope and
//! drops the lowest op ids beyond that: for this table, the smallest
//! hashes, not the oldest records. Once the table was full (files made
//! by exclusive creates and never removed through nfsshim), a new
//! verifier whose hash was below every stored one was dropped in its own
//! commit, and any client's flood of exclusive creates under names with
//! large hashes dropped every other verifier (review rv-shims 2). Each
//! record now carries its age (`made`, a count), and nfsshim keeps the
//! table below filterd's cap itself, deleting the oldest records: after
//! a create, down to [`MARGIN`] below the cap (off the request's path);
//! before one, only when the creates under way would otherwise pass the
//! cap. A create that finds its file there (a re-send, or
//! `NFS4ERR_EXIST`) writes no record and takes no room.

use std::collections::{BTreeSet, HashMap};

use crate::state;

/// The record member that holds a record's age.
pub const MADE: &str = "made";

/// Room kept free below the cap after each create, for the creates under
/// way, so that none has to wait for a delete.
pub const MARGIN: usize = 64;

/// The records nfsshim believes the table holds, by op id, with their
/// ages, and the creates under way that may each add one. A record whose
/// fate is unknown (its commit's answer lost) counts as written.
#[derive(Default)]
pub struct Ages {
    by_op: HashMap<u64, u64>,
    by_age: BTreeSet<(u64, u64)>,
    /// Creates under way of records not in `by_op`.
    under_way: usize,
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

impl Ages {
    /// A record found in the table (at a restore) with age `made` (0 for
    /// a record of an nfsshim before ages: the oldest).
    pub fn found(&mut self, op: u64, made: u64) {
        self.enter(op, made);
        self.next = self.next.max(made.saturating_add(1));
    }

    /// A create about to write record `op`: its claim, and the records to
    /// delete before its commit (oldest first) so that the table and the
    /// creates under way stay within `cap`.
    pub fn begin(&mut self, op: u64, cap: usize) -> (Claim, Vec<u64>) {
        let made = self.next.max(1);
        self.next = made.saturating_add(1);
        let adds = !self.by_op.contains_key(&op);
        if adds {
            self.under_way += 1;
        }
        let drop = self.trim(cap, op);
        (Claim { op, made, adds }, drop)
    }

    /// The create of `claim` is done: `written` unless its record was
    /// certainly not written (its file was there). The records to delete
    /// now so that the table is [`MARGIN`] below `cap`.
    pub fn end(&mut self, claim: Claim, written: bool, cap: usize) -> Vec<u64> {
        if claim.adds {
            self.under_way = self.under_way.saturating_sub(1);
        }
        if written {
            self.enter(claim.op, claim.made);
        }
        self.trim(cap.saturating_sub(MARGIN), claim.op)
    }

    /// The record `op` is deleted.
    pub fn forget(&mut self, op: u64) {
        if let Some(made) = self.by_op.remove(&op) {
            self.by_age.remove(&(made, op));
        }
    }

    /// How many records are entered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_op.len()
    }

    /// Drops the oldest records (never `keep`) while the table and the
    /// creates under way are more than `cap`.
    fn trim(&mut self, cap: usize, keep: u64) -> Vec<u64> {
        let mut drop = Vec::new();
        while self.by_op.len() + self.under_way > cap.max(1) {
            let Some(&(made, op)) = self.by_age.iter().find(|(_, op)| *op != keep) else {
                break;
            };
            self.by_age.remove(&(made, op));
            self.by_op.remove(&op);
            drop.push(op);
        }
        drop
    }

    fn enter(&mut self, op: u64, made: u64) {
        self.forget(op);
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

    /// The oldest go first, whatever their op ids; a create whose file was
    /// there takes no room; a path written again is one record.
    #[test]
    fn the_oldest_records_make_room_whatever_their_op_ids() {
        let cap = MARGIN + 3;
        let mut a = Ages::default();
        for op in 100..100 + cap as u64 {
            a.found(op, op);
        }
        a.found(10, 0);
        assert_eq!(a.len(), cap + 1);
        // Before a create, the table and the creates under way fit.
        let (c1, drop) = a.begin(1, cap);
        assert_eq!(drop, vec![10, 100], "the oldest (made 0) first");
        let (c2, drop) = a.begin(2, cap);
        assert_eq!(drop, vec![101]);
        // Its file was there: no record; the oldest go down to the
        // margin below the cap, counting the create still under way.
        assert_eq!(a.end(c2, false, cap).len(), MARGIN - 1);
        assert_eq!(a.len(), 2);
        assert!(!a.by_op.contains_key(&2));
        // Written: entered, within the margin.
        assert!(a.end(c1, true, cap).is_empty());
        assert_eq!(a.len(), 3);
        assert!(a.by_op.contains_key(&1));
        // A path written again takes no more room.
        let (c, drop) = a.begin(1, cap);
        assert!(drop.is_empty() && !c.adds);
        let made = c.made;
        assert!(a.end(c, true, cap).is_empty());
        assert_eq!(a.by_op.get(&1), Some(&made));
        a.forget(1);
        assert!(!a.by_op.contains_key(&1));
    }
}
