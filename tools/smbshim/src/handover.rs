//! Opens changing hands: a session's end letting its opens go (detached
//! or closed in filterd) and a replayed CREATE or a RECONNECT taking one
//! over ([`Handovers`]).
//!
//! The two must not interleave on one open. A detach that lands after a
//! takeover leaves smbshim serving a handle filterd has disconnected; a
//! takeover that comes before the detach finds the handle still attached
//! (a RECONNECT not found, final for the client). Opens of others must
//! not wait though: a teardown's detaches are a filterd commit each, and
//! under one lock shared by everyone a client that lost its connection
//! held every other client's replays and reconnects for the sum of them
//! (review: 9.7 s behind ten persistent opens on a disk with 1 s fsyncs).
//! So each open is claimed alone, and only a takeover of an open being
//! let go waits, for that open.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libfilter::model::ResumeKey;

/// What names an open to a teardown and a takeover: its resume key (a
/// RECONNECT names it; a replayed CREATE learns it only from filterd) and
/// its client's create GUID (a replay names it), (client GUID, create GUID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ident {
    pub key: Option<ResumeKey>,
    pub guid: Option<(uuid::Uuid, uuid::Uuid)>,
}

/// A multiset of idents, indexed by each of their names.
#[derive(Default)]
struct Held {
    keys: HashMap<ResumeKey, usize>,
    guids: HashMap<(uuid::Uuid, uuid::Uuid), usize>,
}

fn count_in<K: Hash + Eq>(m: &mut HashMap<K, usize>, k: Option<K>, add: bool) {
    let Some(k) = k else { return };
    if add {
        *m.entry(k).or_default() += 1;
    } else if let Some(n) = m.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            m.remove(&k);
        }
    }
}

impl Held {
    fn add(&mut self, id: Ident) {
        count_in(&mut self.keys, id.key, true);
        count_in(&mut self.guids, id.guid, true);
    }

    fn remove(&mut self, id: Ident) {
        count_in(&mut self.keys, id.key, false);
        count_in(&mut self.guids, id.guid, false);
    }

    /// Whether an ident held shares a name with `id`.
    fn matches(&self, id: Ident) -> bool {
        id.key.is_some_and(|k| self.keys.contains_key(&k))
            || id.guid.is_some_and(|g| self.guids.contains_key(&g))
    }
}

#[derive(Default)]
struct State {
    letting_go: Held,
    taking_over: Held,
}

/// The opens being let go and being taken over now.
#[derive(Default)]
pub struct Handovers {
    state: Mutex<State>,
    changed: Condvar,
}

impl Handovers {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks open `id` as being let go until the guard drops. Called as
    /// the open leaves smbshim's table, under the table's lock: a
    /// takeover that starts after it waits for the let-go; one in flight
    /// then is waited for by the let-go ([`LettingGo::wait_takeovers`]).
    pub fn letting_go(&self, id: Ident) -> LettingGo<'_> {
        self.lock().letting_go.add(id);
        LettingGo { h: self, id }
    }

    /// Starts a takeover of open `id` once no let-go or other takeover of
    /// it is in flight, until the guard drops; `None` if that has not
    /// come after `wait`. Other opens' let-gos are not waited for.
    pub fn take_over(&self, id: Ident, wait: Duration) -> Option<TakingOver<'_>> {
        let deadline = Instant::now() + wait;
        let mut s = self.lock();
        while s.letting_go.matches(id) || s.taking_over.matches(id) {
            let left = deadline.checked_duration_since(Instant::now())?;
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.taking_over.add(id);
        Some(TakingOver { h: self, id })
    }

    fn release(&self, id: Ident, letting_go: bool) {
        let mut s = self.lock();
        if letting_go {
            s.letting_go.remove(id);
        } else {
            s.taking_over.remove(id);
        }
        drop(s);
        self.changed.notify_all();
    }
}

/// An open being let go ([`Handovers::letting_go`]).
pub struct LettingGo<'a> {
    h: &'a Handovers,
    id: Ident,
}

impl LettingGo<'_> {
    /// Waits until no takeover of the open is in flight. Not bounded
    /// here: a takeover's filterd calls are, and a takeover waits for
    /// nothing else once started.
    pub fn wait_takeovers(&self) {
        let mut s = self.h.lock();
        while s.taking_over.matches(self.id) {
            s = self.h.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for LettingGo<'_> {
    fn drop(&mut self) {
        self.h.release(self.id, true);
    }
}

/// A takeover in flight ([`Handovers::take_over`]).
pub struct TakingOver<'a> {
    h: &'a Handovers,
    id: Ident,
}

impl Drop for TakingOver<'_> {
    fn drop(&mut self) {
        self.h.release(self.id, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> ResumeKey {
        ResumeKey(uuid::Uuid::from_u64_pair(0, n))
    }

    fn ident(k: u64, g: Option<u128>) -> Ident {
        let client = uuid::Uuid::from_u128(1);
        Ident {
            key: Some(key(k)),
            guid: g.map(|g| (client, uuid::Uuid::from_u128(g))),
        }
    }

    /// Another open's let-go is not waited for; the open's own is, up to
    /// the wait, by its key or by its create GUID.
    #[test]
    fn a_takeover_waits_for_its_own_opens_let_go_only() {
        let h = Handovers::default();
        let going = h.letting_go(ident(1, Some(10)));
        let t0 = Instant::now();
        assert!(h
            .take_over(ident(2, Some(20)), Duration::from_secs(5))
            .is_some());
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert!(h
            .take_over(ident(1, None), Duration::from_millis(50))
            .is_none());
        let by_guid = Ident {
            key: None,
            guid: ident(3, Some(10)).guid,
        };
        assert!(h.take_over(by_guid, Duration::from_millis(50)).is_none());
        std::thread::scope(|s| {
            let t = s.spawn(|| h.take_over(by_guid, Duration::from_secs(10)).is_some());
            std::thread::sleep(Duration::from_millis(50));
            drop(going);
            assert!(t.join().unwrap_or(false), "taken over once let go");
        });
    }

    /// A let-go waits for a takeover of its open in flight, not for one
    /// of another.
    #[test]
    fn a_let_go_waits_for_a_takeover_of_its_open_in_flight() {
        let h = Handovers::default();
        let other = h.take_over(ident(2, None), Duration::ZERO);
        let taking = h.take_over(ident(1, None), Duration::ZERO);
        assert!(other.is_some() && taking.is_some());
        // Two takeovers of one open do not run at once.
        assert!(h.take_over(ident(1, None), Duration::ZERO).is_none());
        let going = h.letting_go(ident(1, Some(10)));
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                going.wait_takeovers();
                Instant::now()
            });
            std::thread::sleep(Duration::from_millis(100));
            let released = Instant::now();
            drop(taking);
            let waited_until = t.join().unwrap_or(released);
            assert!(waited_until >= released);
        });
    }
}
