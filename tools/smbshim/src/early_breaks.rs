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
//! under its lease key on its file by one of the calls in flight when it
//! came ([`EarlyBreaks::take`]: only such a call can have been granted the
//! lease — a later one, say the same client opening the file again under
//! the key after the break ended, holds a lease filterd granted anew, and
//! took a stale break before: re-review rr39b 1), and dropped
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

/// What [`EarlyBreaks::park`] did with a break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parked {
    /// Not parked: no call is in flight.
    Not,
    Yes,
    /// Parked, and the oldest parked break, of this lease, dropped for it
    /// ([`PARKED_MAX`]).
    Dropping(LeaseKey),
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

impl Making<'_> {
    /// The call's number: it may take the breaks parked while it was in
    /// flight ([`EarlyBreaks::take`]).
    pub(crate) fn number(&self) -> u64 {
        self.n
    }
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

    /// Parks `b`, which found no open, for a call in flight. Called under
    /// the open table's lock, as [`EarlyBreaks::take`] is; the caller logs
    /// a break dropped for room once out of it.
    pub(crate) fn park(&self, b: Break) -> Parked {
        let Ok(mut i) = self.0.lock() else {
            return Parked::Not;
        };
        if i.in_flight.is_empty() {
            return Parked::Not;
        }
        let dropped = match i.parked.len() >= PARKED_MAX {
            true => i.parked.pop_front().map(|(_, old)| old.lease_key),
            false => None,
        };
        let seen = i.next;
        i.parked.push_back((seen, b));
        match dropped {
            Some(k) => Parked::Dropping(k),
            None => Parked::Yes,
        }
    }

    /// The parked breaks of lease `key` on `file` that call `call` (its
    /// [`Making::number`]) may have been granted the lease of — those that
    /// came while it was in flight — oldest first; an open under the key
    /// was just stored by it. They are no longer parked.
    pub(crate) fn take(&self, key: LeaseKey, file: FileId, call: u64) -> Vec<Break> {
        let Ok(mut i) = self.0.lock() else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        i.parked.retain(|(seen, b)| {
            let mine = *seen > call && b.lease_key == key && b.file.is_none_or(|f| f == file);
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
        assert_eq!(e.park(brk(key(), None)), Parked::Not);
        let first = e.begin();
        assert_eq!(e.park(brk(key(), None)), Parked::Yes);
        let later = e.begin();
        assert_eq!(e.parked(), 1);
        drop(first);
        assert_eq!(e.parked(), 0, "the call it waited for failed");
        // One parked for both calls stays while either is in flight.
        let again = e.begin();
        assert_eq!(e.park(brk(key(), None)), Parked::Yes);
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
        let m = e.begin();
        let (k, other) = (key(), key());
        let (f, g) = (FileId { dev: 1, ino: 2 }, FileId { dev: 1, ino: 3 });
        for b in [
            brk(k, Some(f)),
            brk(k, Some(g)),
            brk(other, Some(f)),
            brk(k, None),
        ] {
            assert_eq!(e.park(b), Parked::Yes);
        }
        let n = m.number();
        assert_eq!(e.take(k, f, n), vec![brk(k, Some(f)), brk(k, None)]);
        assert!(e.take(k, f, n).is_empty(), "taken once");
        assert_eq!(e.parked(), 2);
        e.clear();
        assert_eq!(e.parked(), 0);
    }

    /// However many breaks come while a call is in flight, at most
    /// [`PARKED_MAX`] are held, the latest.
    #[test]
    fn the_parked_breaks_are_bounded() {
        let e = EarlyBreaks::default();
        let m = e.begin();
        let (first, last) = (key(), key());
        assert_eq!(e.park(brk(first, None)), Parked::Yes);
        for _ in 1..PARKED_MAX {
            assert_eq!(e.park(brk(key(), None)), Parked::Yes);
        }
        assert_eq!(e.park(brk(last, None)), Parked::Dropping(first));
        assert_eq!(e.parked(), PARKED_MAX);
        let f = FileId { dev: 0, ino: 0 };
        assert_eq!(e.take(last, f, m.number()).len(), 1);
        assert!(e.take(first, f, m.number()).is_empty(), "dropped for room");
    }

    /// A break parked before a call began is not that call's: the call
    /// was granted its lease after the break (re-review rr39b 1: a client
    /// that opened a file again under the key took a stale break, of a
    /// lease it no longer held as the break said). Calls in flight when it
    /// came still may take it.
    #[test]
    fn a_break_goes_only_to_a_call_in_flight_when_it_came() {
        let e = EarlyBreaks::default();
        let (k, f) = (key(), FileId { dev: 1, ino: 2 });
        let long = e.begin();
        assert_eq!(e.park(brk(k, Some(f))), Parked::Yes);
        let again = e.begin();
        assert!(e.take(k, f, again.number()).is_empty());
        assert_eq!(e.parked(), 1);
        assert_eq!(e.take(k, f, long.number()), vec![brk(k, Some(f))]);
    }
}
