//! Failed logons: how fast a client may guess passwords, and how much of
//! the log its guesses take.
//!
//! Before, a failed SESSION_SETUP dropped its half-made session and
//! nothing else: one connection tried 1,500 passwords in 6.3 s, then
//! logged on with the right one, and left 1,500 `logon refused` warnings
//! (adversarial review). Now:
//! - a connection is ended after [`MAX_FAILURES_PER_CONNECTION`] failed
//!   logons, refusals unchecked not counted (the third answered
//!   `STATUS_LOGON_FAILURE` first): Windows
//!   clients give up after one, smbclient and Linux cifs retry on a new
//!   connection;
//! - after a failure, the next attempts of the same user from the same
//!   peer address take turns, [`STEP`] × its failures apart (at most
//!   [`MAX_DELAY`]), on whichever connections they come: each waits in
//!   its connection before its password is checked (so the wait tells a
//!   guesser nothing), the connection serving its other sessions
//!   meanwhile, and one further ahead than [`MAX_QUEUE`] (or the
//!   configured bound), or that cannot wait (a binding's), is refused
//!   unchecked — not counted as a failure, so a device retrying behind a shared address does not keep the real
//!   user out once it stops. Other users and other addresses are not
//!   slowed; a logon that succeeds forgets the failures;
//! - at most [`LOG_PER_WINDOW`] refusals a [`LOG_WINDOW`] are logged, the
//!   rest summed up in one line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed logons after which a connection is ended.
pub const MAX_FAILURES_PER_CONNECTION: u32 = 3;
/// The wait one failure adds between attempts of its user and address.
const STEP: Duration = Duration::from_millis(500);
/// The longest wait between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// The furthest ahead an attempt may be queued by default; past it,
/// refused at once.
pub const MAX_QUEUE: Duration = Duration::from_secs(30);
/// How long failures are remembered after the last one.
const FORGET: Duration = Duration::from_secs(15 * 60);
/// Most (address, user) pairs remembered: past it the stale ones go,
/// then the one that failed longest ago.
const MAX_KEYS: usize = 4096;
/// Refused logons logged one by one per [`LOG_WINDOW`].
const LOG_PER_WINDOW: u32 = 10;
/// See [`LOG_PER_WINDOW`].
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// A peer address and a user name (lowercased: names match
/// case-insensitively).
type Key = (Option<IpAddr>, String);

/// Turns given back one (address, user) remembers: more are dropped (the
/// later turns stay where they are, only further off).
const MAX_FREE: usize = 64;

/// The failures of one (address, user).
struct Record {
    failures: u32,
    /// When its next attempt may be checked.
    next: Instant,
    last: Instant,
    /// Turns given back before `next` ([`Failures::give_back`]): handed
    /// out again, earliest first, before a turn at `next`.
    free: Vec<Instant>,
}

/// When an attempt to log on may be checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// Now.
    Now,
    /// At this time (later than now): the turn's, to be given back with
    /// [`Failures::give_back`] if its attempt is dropped unchecked.
    After(Instant),
    /// Never: refused unchecked.
    Refused,
}

/// Failed logons by (peer address, user), and the refusals logged.
pub struct Failures {
    records: Mutex<HashMap<Key, Record>>,
    log: Mutex<LogWindow>,
    /// The furthest ahead an attempt may be queued.
    max_queue: Duration,
}

impl Default for Failures {
    fn default() -> Self {
        Failures::new(MAX_QUEUE)
    }
}

#[derive(Default)]
struct LogWindow {
    start: Option<Instant>,
    logged: u32,
    unlogged: u64,
}

fn key(peer: Option<IpAddr>, user: &str) -> Key {
    (peer, user.to_lowercase())
}

/// The wait after `failures` failures.
fn delay(failures: u32) -> Duration {
    STEP.saturating_mul(failures).min(MAX_DELAY)
}

impl Failures {
    /// No failures yet; attempts queued at most `max_queue` ahead.
    pub fn new(max_queue: Duration) -> Self {
        Failures {
            records: Mutex::default(),
            log: Mutex::default(),
            max_queue,
        }
    }

    /// An attempt of `user` from `peer`: when its password may be
    /// checked. It takes the next turn of its (address, user), if that
    /// has failed lately — unless it is refused (too far off, or not now
    /// for one that cannot wait, `may_wait` false), which changes
    /// nothing.
    pub fn turn(&self, peer: Option<IpAddr>, user: &str, may_wait: bool) -> Turn {
        let now = Instant::now();
        let Ok(mut m) = self.records.lock() else {
            return Turn::Now;
        };
        let k = key(peer, user);
        let Some(r) = m.get_mut(&k) else {
            return Turn::Now;
        };
        if now.saturating_duration_since(r.last) > FORGET {
            m.remove(&k);
            return Turn::Now;
        }
        r.free.retain(|t| *t >= now);
        let given_back = r.free.iter().copied().enumerate().min_by_key(|(_, t)| *t);
        let at = given_back.map_or(r.next.max(now), |(_, t)| t);
        let wait = at.saturating_duration_since(now);
        if wait > self.max_queue || (!may_wait && !wait.is_zero()) {
            return Turn::Refused;
        }
        match given_back {
            Some((i, _)) => {
                r.free.swap_remove(i);
            }
            None => r.next = at + delay(r.failures),
        }
        if wait.is_zero() {
            Turn::Now
        } else {
            Turn::After(at)
        }
    }

    /// The turn at `at` of `user` from `peer` ([`Turn::After`]) was not
    /// used: its attempt was dropped before its password was checked (its
    /// connection went, or its session). The turn is handed out again —
    /// else a client behind the same address could use up the real
    /// user's turns, pushing them past the queue bound, with attempts it
    /// drops unchecked. The last turn handed out moves `next` back;
    /// another is kept to be handed out first.
    pub fn give_back(&self, peer: Option<IpAddr>, user: &str, at: Instant) {
        let Ok(mut m) = self.records.lock() else {
            return;
        };
        let Some(r) = m.get_mut(&key(peer, user)) else {
            return; // forgotten, or a logon succeeded since
        };
        if at >= r.next {
            return; // no longer handed out (failures forgot it)
        }
        if at.checked_add(delay(r.failures)) == Some(r.next) {
            r.next = at;
        } else if r.free.len() < MAX_FREE {
            r.free.push(at);
        }
    }

    /// A logon of `user` from `peer` failed.
    pub fn failed(&self, peer: Option<IpAddr>, user: &str) {
        let now = Instant::now();
        let Ok(mut m) = self.records.lock() else {
            return;
        };
        let k = key(peer, user);
        if !m.contains_key(&k) && m.len() >= MAX_KEYS {
            m.retain(|_, r| now.saturating_duration_since(r.last) <= FORGET);
            if m.len() >= MAX_KEYS {
                let oldest = m.iter().min_by_key(|(_, r)| r.last).map(|(k, _)| k.clone());
                if let Some(o) = oldest {
                    m.remove(&o);
                }
            }
        }
        let r = m.entry(k).or_insert(Record {
            failures: 0,
            next: now,
            last: now,
            free: Vec::new(),
        });
        r.failures = r.failures.saturating_add(1);
        r.last = now;
        r.next = r.next.max(now + delay(r.failures));
    }

    /// A logon of `user` from `peer` succeeded: its failures are forgotten.
    pub fn succeeded(&self, peer: Option<IpAddr>, user: &str) {
        if let Ok(mut m) = self.records.lock() {
            m.remove(&key(peer, user));
        }
    }

    /// Whether a refused logon is logged (and how many before it were
    /// not): at most [`LOG_PER_WINDOW`] a [`LOG_WINDOW`].
    pub fn log_refusal(&self) -> Option<u64> {
        let now = Instant::now();
        let Ok(mut w) = self.log.lock() else {
            return None;
        };
        if w.start
            .is_none_or(|s| now.saturating_duration_since(s) > LOG_WINDOW)
        {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged >= LOG_PER_WINDOW {
            w.unlogged = w.unlogged.saturating_add(1);
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_after_failures_take_turns_and_success_forgets() {
        let f = Failures::default();
        let peer = Some(IpAddr::from([127, 0, 0, 1]));
        assert_eq!(f.turn(peer, "alice", true), Turn::Now);
        f.failed(peer, "Alice");
        let soon = Instant::now() + STEP;
        assert!(matches!(f.turn(peer, "ALICE", true), Turn::After(t) if t <= soon));
        assert!(matches!(f.turn(peer, "alice", true), Turn::After(t) if t > soon));
        assert_eq!(f.turn(peer, "bob", true), Turn::Now);
        assert_eq!(f.turn(None, "alice", true), Turn::Now);
        f.succeeded(peer, "alice");
        assert_eq!(f.turn(peer, "alice", true), Turn::Now);
    }

    #[test]
    fn refused_attempts_take_no_turn() {
        let f = Failures::new(STEP);
        let peer = Some(IpAddr::from([127, 0, 0, 1]));
        f.failed(peer, "alice");
        assert_eq!(f.turn(peer, "alice", false), Turn::Refused);
        assert!(
            matches!(f.turn(peer, "alice", true), Turn::After(t) if t <= Instant::now() + STEP)
        );
        // The next turn is now more than STEP off: refused, and taking
        // none, so the one after it is no further off.
        assert_eq!(f.turn(peer, "alice", true), Turn::Refused);
        assert_eq!(f.turn(peer, "alice", true), Turn::Refused);
        assert!(matches!(f.turn(peer, "alice", false), Turn::Refused));
    }

    /// An attempt dropped unchecked gives its turn back: the next attempt
    /// takes it, never a later one (a client behind the same address
    /// cannot use up the real user's turns).
    #[test]
    fn turns_given_back_are_handed_out_again() {
        let f = Failures::default();
        let peer = Some(IpAddr::from([127, 0, 0, 1]));
        // Turns seconds apart: a test thread held up a while (parallel
        // tests on a loaded machine) finds none of them past.
        let failures = 10;
        for _ in 0..failures {
            f.failed(peer, "bob");
        }
        let step = delay(failures);
        let turn = |f: &Failures| match f.turn(peer, "bob", true) {
            Turn::After(t) => t,
            other => panic!("{other:?}"),
        };
        let (first, second) = (turn(&f), turn(&f));
        assert_eq!(second, first + step);
        // The last turn handed out: the next one is it again.
        f.give_back(peer, "bob", second);
        assert_eq!(turn(&f), second);
        // One before the last: handed out first, then the later ones.
        f.give_back(peer, "bob", first);
        assert_eq!(turn(&f), first);
        assert_eq!(turn(&f), second + step);
    }

    #[test]
    fn refusals_past_the_window_are_counted_not_logged() {
        let f = Failures::default();
        for _ in 0..LOG_PER_WINDOW {
            assert_eq!(f.log_refusal(), Some(0));
        }
        assert_eq!(f.log_refusal(), None);
    }
}
