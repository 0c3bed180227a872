//! What the other threads tell the engine thread, and the few types they
//! share. The engine owns all state; the listener, the committer, the
//! fanotify reader and the main thread reach it only through these
//! commands (`crate::conn::EngineTx`). This module depends on nothing of
//! theirs, so none of them depends on the engine.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use libfilter::model::{FileId, IntentId};
use libfilter::proto::{ErrorCode, Hello, RequestFrame};

use crate::outbox::ConnWriter;

/// The engine's answer to a local open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it proceed.
    Allow,
    /// Refuse it (the opener gets EPERM).
    Deny,
}

/// Where the engine's verdict on a local open goes (the fanotify answerer).
pub type VerdictSink = Box<dyn FnOnce(Verdict) + Send>;

/// Who answers a local open's permission event, shared by the engine and
/// the reader's answerer (whose watchdog refuses it at its verdict
/// deadline). Writing the answer is deduplicated by the answerer (the
/// first of the engine's verdict and the watchdog's refusal to reach it
/// wins); this decides whether the engine may still *act* for the open —
/// purge handles, break leases, record its opener — so that no open is
/// refused by the watchdog after the engine acted for it, nor acted for
/// after the watchdog refused it:
///
/// - the engine takes the event ([`EventClaim::engine_takes`]) before it
///   decides it, every time it runs it (again), and gives it back
///   ([`EventClaim::engine_lets_go`]) when it parks it having done
///   nothing for it yet (waiting for a commit, the restart gate);
/// - the watchdog refuses only an event the engine does not hold
///   ([`EventClaim::watchdog_refuses`]); one it holds is left to the
///   engine's verdict, which comes when the engine's own wait ends (a
///   lease break's timeout) — refused regardless when the held grace
///   ends (`local::held_grace`: the break timeout + 0.5 s past the
///   deadline). The grace suffices because the engine begins a wait for
///   an event it holds (a break, a step of a break chain, a break again,
///   a commit) only before the event's deadline; past it the engine
///   refuses the event itself instead (`LocalReply::may_wait`, also
///   before acting for it again when it runs again), so every break it
///   waits for ends by the deadline + a break timeout. A commit wait
///   begun before the deadline is not bounded so: a store slower than
///   the grace gets the forced refusal (logged), and the engine, finding
///   the event refused when it runs it again, does nothing for it.
///   Before (review), a
///   break chain, a commit wait or a failed commit's re-break could hold
///   it past the grace, and the forced refusal came as an error.
///
/// Before (review), a local open parked waiting for a commit past its
/// deadline was refused by the watchdog and then run by the engine once
/// the commit resolved: purges and lease breaks for an open that never
/// happened.
#[derive(Clone, Debug)]
pub struct EventClaim(Arc<ClaimInner>);

#[derive(Debug)]
struct ClaimInner {
    state: std::sync::atomic::AtomicU8,
    /// The event's verdict deadline.
    deadline: std::time::Instant,
    /// Tests: the deadline passed ([`EventClaim::pass_deadline`]).
    #[cfg(test)]
    passed: std::sync::atomic::AtomicBool,
}

/// Nobody holds the event: the watchdog may refuse it at its deadline.
const CLAIM_OPEN: u8 = 0;
/// The engine is deciding it: its verdict will come.
const CLAIM_ENGINE: u8 = 1;
/// Refused without the engine (the watchdog, or the engine's own
/// letting go past the deadline): the engine must not act for it.
const CLAIM_REFUSED: u8 = 2;

impl EventClaim {
    /// A fresh claim of an event whose verdict is due by `deadline`.
    pub fn new(deadline: std::time::Instant) -> Self {
        EventClaim(Arc::new(ClaimInner {
            state: std::sync::atomic::AtomicU8::new(CLAIM_OPEN),
            deadline,
            #[cfg(test)]
            passed: Default::default(),
        }))
    }

    fn swap(&self, from: u8, to: u8) -> Result<u8, u8> {
        use std::sync::atomic::Ordering::AcqRel;
        self.0
            .state
            .compare_exchange(from, to, AcqRel, std::sync::atomic::Ordering::Acquire)
    }

    /// The engine is about to decide the event: `false` when it was
    /// refused without it meanwhile, or its deadline passed while nobody
    /// held it (refused now): it must then do nothing for it. One the
    /// engine holds already (it acted for it and runs it again) stays
    /// its own to decide, past the deadline too.
    ///
    /// Before (review), an open parked for a commit that resolved just
    /// past its deadline, before the watchdog woke, was taken and acted
    /// for (purges, a lease break), and then held a second bound.
    pub fn engine_takes(&self) -> bool {
        self.engine_takes_at(std::time::Instant::now())
    }

    /// [`Self::engine_takes`] at `now`: tests take it at a fixed instant,
    /// never depending on being scheduled before a near deadline.
    pub fn engine_takes_at(&self, now: std::time::Instant) -> bool {
        if self.past(now) {
            return match self.swap(CLAIM_OPEN, CLAIM_REFUSED) {
                Ok(_) => false,
                Err(now) => now == CLAIM_ENGINE,
            };
        }
        match self.swap(CLAIM_OPEN, CLAIM_ENGINE) {
            Ok(_) => true,
            Err(now) => now == CLAIM_ENGINE,
        }
    }

    /// The engine parks the event having done nothing for it: the
    /// watchdog may refuse it again. Past its deadline it is refused at
    /// once instead (`false`: the engine drops it, which refuses it).
    pub fn engine_lets_go(&self) -> bool {
        self.lets_go_reading(std::time::Instant::now)
    }

    /// [`Self::engine_lets_go`] reading the clock with `now`. Let go
    /// first, the clock read after: a watchdog looking meanwhile finds
    /// the event nobody's and refuses it. Before (review), the clock was
    /// read first, and a watchdog looking between saw the event held and
    /// left it for a whole grace more.
    fn lets_go_reading(&self, now: impl FnOnce() -> std::time::Instant) -> bool {
        // Already open (never taken) is fine; refused cannot be (the
        // engine held it) unless forced.
        if self.swap(CLAIM_ENGINE, CLAIM_OPEN) == Err(CLAIM_REFUSED) {
            return false;
        }
        if self.past(now()) {
            // Refused now, or by the watchdog meanwhile: refused either way.
            let _ = self.swap(CLAIM_OPEN, CLAIM_REFUSED);
            return false;
        }
        true
    }

    /// Whether the event's verdict deadline has passed (the engine holding
    /// it may then begin no new wait for it: `LocalReply::may_wait`).
    pub fn deadline_passed(&self) -> bool {
        self.past(std::time::Instant::now())
    }

    /// Whether the event's deadline has passed at `now` (or a test moved
    /// the event past it: [`Self::pass_deadline`]).
    fn past(&self, now: std::time::Instant) -> bool {
        #[cfg(test)]
        if self.0.passed.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        now >= self.0.deadline
    }

    /// Tests: the event's deadline has passed from now on, whatever the
    /// clock says — the test advances the event's clock instead of
    /// sleeping past a near deadline (which a loaded machine may overshoot
    /// before the engine took it).
    #[cfg(test)]
    pub fn pass_deadline(&self) {
        self.0
            .passed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The watchdog, at the event's deadline: `true` if it may refuse it
    /// (the engine will never act for it now); `false` while the engine
    /// holds it.
    pub fn watchdog_refuses(&self) -> bool {
        match self.swap(CLAIM_OPEN, CLAIM_REFUSED) {
            Ok(_) => true,
            Err(now) => now == CLAIM_REFUSED,
        }
    }

    /// The watchdog refuses the event whoever holds it (the engine held it
    /// a whole held grace past its deadline): the engine must not act for it
    /// any more.
    pub fn watchdog_forces(&self) {
        self.0
            .state
            .store(CLAIM_REFUSED, std::sync::atomic::Ordering::Release);
    }
}

/// Identifies one accepted connection for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// SO_PEERCRED of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// What connection threads and the committer tell the engine.
pub enum Command {
    /// The listener accepted a connection.
    Accepted {
        /// Its id.
        conn: ConnId,
        /// The socket (let go through the closer if dropped unserved).
        sock: crate::closer::Unserved,
        /// Its credentials.
        peer: Peer,
    },
    /// A peer said hello; the engine registers it and the poller answers.
    Hello {
        /// The connection.
        conn: ConnId,
        /// What it said.
        hello: Hello,
        /// Its credentials.
        peer: Peer,
        /// Where its replies go.
        writer: Arc<ConnWriter>,
    },
    /// A decoded request.
    Request {
        /// The connection.
        conn: ConnId,
        /// The request.
        frame: RequestFrame,
    },
    /// A connection ended.
    Closed {
        /// The connection.
        conn: ConnId,
    },
    /// A connection thread refused a malformed frame (for the counters).
    BadFrame,
    /// A commit failed: these groups did not commit (the others up to
    /// `through` did); the engine rolls them back with whatever built on
    /// them (the committer waits for
    /// [`crate::committer::Pipeline::rolled_back`]).
    CommitFailed {
        /// The sequences that failed.
        failed: Vec<u64>,
        /// The last sequence of the failed commit.
        through: u64,
        /// What to tell the clients whose requests are undone.
        code: ErrorCode,
        /// Why.
        message: String,
    },
    /// The intents of these parked opens are durable: do their changes.
    IntentsDurable(Vec<IntentId>),
    /// A commit the engine asked to hear of is resolved
    /// ([`crate::committer::Pipeline::wake_engine_at`]): requests and
    /// local opens that waited for it may go on.
    CommitsResolved,
    /// A local process is opening a file on the export (fanotify): decide.
    LocalOpen {
        /// The file.
        file: FileId,
        /// The process.
        pid: i32,
        /// The event's own descriptor of the file (for ignore marks),
        /// shared with the reader's answer: it stays open until the event
        /// is answered, so its number names no other event meanwhile.
        fd: std::sync::Arc<OwnedFd>,
        /// Where the verdict goes.
        reply: VerdictSink,
        /// Whether the engine may still act for it (shared with the
        /// reader's watchdog).
        claim: EventClaim,
    },
    /// Stop: flush, then return.
    Shutdown,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's hold and the watchdog's refusal exclude each other:
    /// the watchdog never refuses an open the engine holds (acting for
    /// it), the engine never takes one the watchdog refused, and letting
    /// go past the deadline refuses.
    #[test]
    fn the_engine_and_the_watchdog_never_both_have_an_event() {
        let later = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        let c = EventClaim::new(later);
        assert!(c.engine_takes() && c.engine_takes(), "taken, and again");
        assert!(!c.watchdog_refuses(), "held by the engine");
        assert!(c.engine_lets_go());
        assert!(c.watchdog_refuses() && c.watchdog_refuses());
        assert!(!c.engine_takes(), "refused: the engine may not act");
        // Past its deadline, nobody holding it: refused, not taken (and
        // the watchdog finds it refused).
        let parked = EventClaim::new(std::time::Instant::now());
        assert!(!parked.engine_takes(), "past its deadline: not taken");
        assert!(parked.watchdog_refuses(), "refused");
        // Held across its deadline: still the engine's; let go, refused.
        // Fixed instants: never a sleep past a near deadline, which a
        // loaded machine could overshoot before the first take (review).
        let t0 = std::time::Instant::now();
        let deadline = t0 + std::time::Duration::from_millis(20);
        let late = EventClaim::new(deadline);
        assert!(late.engine_takes_at(t0));
        assert!(
            late.engine_takes_at(deadline),
            "held, past the deadline too"
        );
        assert!(!late.watchdog_refuses());
        assert!(
            !late.lets_go_reading(|| deadline),
            "past its deadline: refused"
        );
        assert!(!late.engine_takes());
        let forced = EventClaim::new(later);
        assert!(forced.engine_takes());
        forced.watchdog_forces();
        assert!(!forced.engine_takes());
    }

    /// A watchdog looking while the engine lets go of an event past its
    /// deadline (here: while it reads the clock) finds it nobody's and
    /// refuses it; the engine then drops it. Before, the engine read the
    /// clock before letting go, and the watchdog saw it held.
    #[test]
    fn a_watchdog_looking_while_the_engine_lets_go_refuses() {
        let c = EventClaim::new(std::time::Instant::now());
        assert!(
            c.swap(CLAIM_OPEN, CLAIM_ENGINE).is_ok(),
            "the engine holds it"
        );
        let mut looked = None;
        let kept = c.lets_go_reading(|| {
            looked = Some(c.watchdog_refuses());
            std::time::Instant::now()
        });
        assert_eq!(looked, Some(true), "the watchdog refused it meanwhile");
        assert!(!kept, "past its deadline: dropped");
        assert!(!c.engine_takes());
    }
}
