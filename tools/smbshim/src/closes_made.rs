//! The closes filterd made while a replayed CREATE was in flight
//! ([`ClosesMade`]), so that the replay does not hand out a handle one of
//! them closed.
//!
//! A replayed CREATE asks filterd for its create GUID's open and gets the
//! handle back, then stores it in smbshim's table. A CLOSE of that open
//! can take it out of the table, and have filterd close it, in between:
//! the note of its close in flight ([`crate::server`]'s
//! `Session::closing`) is gone by the time the replay stores the handle,
//! and the replay served an open with no handle behind it (no share mode
//! enforced, its CLOSE `NoSuchHandle`; re-review rr41a 1). So every close
//! filterd answers made of an open taken out of the table with no claim
//! on it (a CLOSE's or a LOGOFF's, and the settler's that follows one
//! never answered) is noted here, with a generation, before its in-flight note goes; a replay reads
//! the generation before it asks filterd ([`ClosesMade::replay`]) and is
//! refused if its handle's close was made since
//! ([`ReplayWatch::closed_since`]). A close made before the replay asked
//! filterd needs no note: filterd then has no such handle to hand back.
//!
//! Bounded: closes are noted only while a replay is in flight, and a note
//! goes once every replay that started before it is done.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use libfilter::model::ResumeKey;

#[derive(Default)]
struct State {
    /// The generation: how many closes were noted.
    made: u64,
    /// The replays in flight, by the generation each started at (how
    /// many started at it).
    replays: BTreeMap<u64, usize>,
    /// Closes made since the oldest replay in flight started: each
    /// handle's latest, with the generation it was noted at.
    closed: HashMap<ResumeKey, u64>,
}

/// The closes filterd made while a replay was in flight.
#[derive(Default)]
pub struct ClosesMade(Mutex<State>);

impl ClosesMade {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// filterd answered that it closed handle `key` (or holds nothing of
    /// it). Call before the close's in-flight note goes.
    pub fn made(&self, key: ResumeKey) {
        let mut s = self.lock();
        if s.replays.is_empty() {
            return;
        }
        s.made += 1;
        let at = s.made;
        s.closed.insert(key, at);
    }

    /// A replay about to ask filterd for its open: watches the closes made
    /// from now until the guard drops.
    pub fn replay(&self) -> ReplayWatch<'_> {
        let mut s = self.lock();
        let from = s.made;
        *s.replays.entry(from).or_default() += 1;
        ReplayWatch { made: self, from }
    }

    /// How many closes are noted (for tests of the bound).
    #[cfg(test)]
    fn noted(&self) -> usize {
        self.lock().closed.len()
    }
}

/// A replay in flight ([`ClosesMade::replay`]).
pub struct ReplayWatch<'a> {
    made: &'a ClosesMade,
    from: u64,
}

impl ReplayWatch<'_> {
    /// Whether filterd made a close of handle `key` since the replay
    /// started: the handle filterd handed it may be closed.
    pub fn closed_since(&self, key: ResumeKey) -> bool {
        self.made
            .lock()
            .closed
            .get(&key)
            .is_some_and(|at| *at > self.from)
    }
}

impl Drop for ReplayWatch<'_> {
    fn drop(&mut self) {
        let mut s = self.made.lock();
        if let Some(n) = s.replays.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                s.replays.remove(&self.from);
            }
        }
        // Notes no replay in flight can have missed are forgotten.
        match s.replays.keys().next().copied() {
            Some(oldest) => s.closed.retain(|_, at| *at > oldest),
            None => s.closed.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> ResumeKey {
        ResumeKey(uuid::Uuid::from_u64_pair(0, n))
    }

    /// A replay sees the closes made since it started, not those before;
    /// with no replay in flight nothing is kept.
    #[test]
    fn a_replay_sees_the_closes_made_since_it_started() {
        let c = ClosesMade::default();
        c.made(key(1));
        assert_eq!(c.noted(), 0, "no replay in flight");
        let early = c.replay();
        c.made(key(2));
        let late = c.replay();
        c.made(key(3));
        assert!(!early.closed_since(key(1)));
        assert!(early.closed_since(key(2)) && early.closed_since(key(3)));
        assert!(!late.closed_since(key(2)) && late.closed_since(key(3)));
        drop(early);
        assert_eq!(c.noted(), 1, "only what the later replay can miss");
        assert!(late.closed_since(key(3)));
        drop(late);
        assert_eq!(c.noted(), 0);
    }

    /// A handle closed twice (the settler's close after a CLOSE's) counts
    /// from its latest close.
    #[test]
    fn the_latest_close_of_a_handle_counts() {
        let c = ClosesMade::default();
        let first = c.replay();
        c.made(key(1));
        let second = c.replay();
        c.made(key(1));
        assert!(first.closed_since(key(1)) && second.closed_since(key(1)));
        drop(first);
        drop(second);
        assert_eq!(c.noted(), 0);
    }
}
