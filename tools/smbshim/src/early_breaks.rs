//! Lease breaks that reach smbshim before the open holding their lease is
//! stored in its open table.
//!
//! filterd sends a break only after the reply that granted the lease, on
//! the same connection — but the reply goes to the thread whose CREATE (or
//! RECONNECT) asked, and the break to the member's event thread
//! (`forward_breaks`), which may look for the lease's open before that
//! thread has stored it. Such a break found no open and was dropped: the
//! breaking request waited the whole break timeout, and the client kept
//! a lease it no longer held (re-review rr38h). Now a break that finds no
//! open is parked here while a call that makes an open is in flight on
//! the member ([`EarlyBreaks::begin`]), taken by the first open stored
//! under its lease key on its file ([`EarlyBreaks::take`]), and dropped
//! once every call that was in flight when it came has ended without
//! storing one — that open was refused, or let go or closed (filterd ends
//! the break of a lease no attached open holds any more at once: its
//! `settle_unackable_break` and `lease_key_released`), so nothing waits
//! for an ack of it. As nfsshim's `Opening` does for its OPENs; smbshim
//! parks by call rather than by key, since a replayed CREATE need not
//! name the lease its original holds.
//!
//! Bounded: a call in flight holds an open slot (`open_slot`), and the
//! parked breaks are at most [`PARKED_MAX`] — past that the oldest goes
//! (as before the fix, it waits out the break timeout in filterd).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;

use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::model::FileId;

/// Most breaks parked per member at once.
pub(crate) const PARKED_MAX: usize = 1024;

/// A lease break as filterd sent it (`Event::LeaseBreak`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Break {
    pub lease_key: LeaseKey,
    pub current_state: LeaseState,
    pub new_state: LeaseState,
    pub epoch: u16,
    pub ack_required: bool,
    pub file: Option<FileId>,
}

/// One member's parked breaks and its calls in flight that make opens.
#[derive(Default)]
pub(crate) struct EarlyBreaks(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    /// The number the next call gets.
    next: u64,
    /// The calls in flight, by number.
    in_flight: BTreeSet<u64>,
    /// Oldest first, each with `next` as it came: only calls numbered
    /// below it can have been granted its lease.
    parked: VecDeque<(u64, Break)>,
}

impl Inner {
    /// Drops the parked breaks no call in flight can claim any more.
    fn drop_unclaimable(&mut self) {
        let oldest = self.in_flight.first().copied().unwrap_or(u64::MAX);
        while self.parked.front().is_some_and(|(seen, _)| *seen <= oldest) {
            self.parked.pop_front();
        }
    }
}

/// A call that makes an open, in flight from [`EarlyBreaks::begin`] until
/// dropped (after its open is stored, or it failed).
pub(crate) struct Making<'a> {
    early: &'a EarlyBreaks,
    n: u64,
}

impl Drop for Making<'_> {
    fn drop(&mut self) {
        if let Ok(mut i) = self.early.0.lock() {
            i.in_flight.remove(&self.n);
            i.drop_unclaimable();
        }
    }
}

impl EarlyBreaks {
    /// A call that may make an open starts (before its request is sent).
    pub(crate) fn begin(&self) -> Making<'_> {
        let n = self.0.lock().map_or(u64::MAX, |mut i| {
            let n = i.next;
            i.next = i.next.wrapping_add(1);
            i.in_flight.insert(n);
            n
        });
        Making { early: self, n }
    }

    /// Parks `b`, which found no open, for a call in flight; false (not
    /// parked) when none is. Called under the open table's lock, as
    /// [`EarlyBreaks::take`] is.
    pub(crate) fn park(&self, b: Break) -> bool {
        let Ok(mut i) = self.0.lock() else {
            return false;
        };
        if i.in_flight.is_empty() {
            return false;
        }
        if i.parked.len() >= PARKED_MAX {
            if let Some((_, old)) = i.parked.pop_front() {
                eprintln!(
                    "smbshim: over {PARKED_MAX} lease breaks wait for opens: the break of lease {} dropped",
                    old.lease_key
                );
            }
        }
        let seen = i.next;
        i.parked.push_back((seen, b));
        true
    }

    /// The parked breaks of lease `key` on `file` (an open under it was
    /// just stored), oldest first; they are no longer parked.
    pub(crate) fn take(&self, key: LeaseKey, file: FileId) -> Vec<Break> {
        let Ok(mut i) = self.0.lock() else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        i.parked.retain(|(_, b)| {
            let mine = b.lease_key == key && b.file.is_none_or(|f| f == file);
            if mine {
                taken.push(*b);
            }
            !mine
        });
        taken
    }

    /// Forgets every parked break: filterd restarted, and no break of
    /// before is in progress there.
    pub(crate) fn clear(&self) {
        if let Ok(mut i) = self.0.lock() {
            i.parked.clear();
        }
    }

    /// How many breaks are parked (tests).
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.0.lock().map_or(0, |i| i.parked.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brk(key: LeaseKey, file: Option<FileId>) -> Break {
        Break {
            lease_key: key,
            current_state: LeaseState::parse("RWH").unwrap_or(LeaseState::NONE),
            new_state: LeaseState::NONE,
            epoch: 2,
            ack_required: true,
            file,
        }
    }

    fn key() -> LeaseKey {
        LeaseKey(uuid::Uuid::new_v4())
    }

    /// Nothing is parked with no call in flight, and a break goes once
    /// every call in flight when it came has ended — not with a later
    /// call still in flight, which cannot have been granted its lease.
    #[test]
    fn a_break_is_parked_only_for_the_calls_in_flight_when_it_came() {
        let e = EarlyBreaks::default();
        assert!(!e.park(brk(key(), None)));
        let first = e.begin();
        assert!(e.park(brk(key(), None)));
        let later = e.begin();
        assert_eq!(e.parked(), 1);
        drop(first);
        assert_eq!(e.parked(), 0, "the call it waited for failed");
        // One parked for both calls stays while either is in flight.
        let again = e.begin();
        assert!(e.park(brk(key(), None)));
        drop(later);
        assert_eq!(e.parked(), 1);
        drop(again);
        assert_eq!(e.parked(), 0);
    }

    /// A stored open takes the breaks of its lease key on its file (or
    /// of no file named), once; others stay parked.
    #[test]
    fn an_open_takes_the_breaks_of_its_lease_on_its_file() {
        let e = EarlyBreaks::default();
        let _m = e.begin();
        let (k, other) = (key(), key());
        let (f, g) = (FileId { dev: 1, ino: 2 }, FileId { dev: 1, ino: 3 });
        for b in [
            brk(k, Some(f)),
            brk(k, Some(g)),
            brk(other, Some(f)),
            brk(k, None),
        ] {
            assert!(e.park(b));
        }
        assert_eq!(e.take(k, f), vec![brk(k, Some(f)), brk(k, None)]);
        assert!(e.take(k, f).is_empty(), "taken once");
        assert_eq!(e.parked(), 2);
        e.clear();
        assert_eq!(e.parked(), 0);
    }

    /// However many breaks come while a call is in flight, at most
    /// [`PARKED_MAX`] are held, the latest.
    #[test]
    fn the_parked_breaks_are_bounded() {
        let e = EarlyBreaks::default();
        let _m = e.begin();
        let last = key();
        for _ in 0..PARKED_MAX + 10 {
            assert!(e.park(brk(key(), None)));
        }
        assert!(e.park(brk(last, None)));
        assert_eq!(e.parked(), PARKED_MAX);
        assert_eq!(e.take(last, FileId { dev: 0, ino: 0 }).len(), 1);
    }
}
