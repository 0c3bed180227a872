//! Closes a frontend hands to a thread of its own, tried again after a
//! passing failure ([`Closer`]).
//!
//! smbshim's and rksmbd's LOGOFF close the opens filterd may have made
//! for CREATEs it did not answer in time (opens kept detached for a
//! replay that never came), after the LOGOFF's reply, by create GUID.
//! Such a close that failed because filterd was down or restarting (the
//! connection lost, no answer in time, a retry status) was forgotten:
//! the open lived on detached until its durable timeout, minutes, holding
//! its share modes and lease against every other client. A [`Closer`]
//! keeps it and tries it again once the frontend has reattached to
//! filterd ([`Attachment::reattaches`]), and with backoff while it stays
//! attached, until it is done or, while attached, the longest durable
//! timeout a frontend asks for has passed since its first failure, the
//! latest reattach or its latest unanswered call ([`PATIENCE`]): time
//! detached, or filterd did not answer (its own call's or another's, the
//! one thread waiting in it), does not count, as filterd's
//! recovery gives every handle a fresh timeout. An item whose call went
//! unanswered ([`Tried::Unanswered`]) is tried again with backoff too (a
//! late refusal is undone by nobody), but a later "no such handle" on the
//! same connection does not end it ([`no_such_handle`]): that may be the
//! handle its own unanswered resume attached.
//!
//! First tries come before tries again, and a hand-over's items take
//! turns with the others' (one each in turn): a stalled filterd, or one
//! client's backlog, holds another's closes back by one call at most per
//! item before them, as it did before this retried anything.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::{mpsc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::attach::Attachment;
use crate::client::ClientError;
use crate::proto::ErrorCode;

/// How long an item is tried again at most after its first failure or
/// after the latest reattach since, counted while the frontend is
/// attached: the longest durable timeout smbshim and rksmbd ask for
/// (filterd caps them at its own `--durable-timeout-max-ms`), past which
/// the open is gone anyway. Never given up while detached: a filterd down
/// longer than this (etcd without quorum, a slow recovery) gives every
/// recovered handle a fresh timeout (time down does not count), so the
/// open would outlive an item given up then by its whole timeout.
pub const PATIENCE: Duration = Duration::from_secs(300);

/// Most items waiting to be tried again; the oldest beyond is given up
/// with a warning (its open waits for its durable timeout, as every one
/// did before).
pub const AGAIN_MAX: usize = 4096;

/// First pause before a try again while filterd answers (doubled up to
/// [`MAX_BACKOFF`]; a reattach makes the next try due at once).
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Longest pause between tries again while filterd answers.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How often a closer with items to try again looks whether the frontend
/// has reattached (and how long it waits while detached: it polled every
/// millisecond once an item was due).
const POLL: Duration = Duration::from_millis(250);

/// How one try of an item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tried {
    /// Nothing more to do: closed, found gone, or not this closer's to
    /// close any more.
    Done,
    /// Failed for a passing cause ([`passing`]): try again later.
    Again,
    /// No answer in time ([`ClientError::Timeout`]) on a connection that
    /// may live on: tried again with backoff, as [`Tried::Again`] (a late
    /// answer is undone by libfilter only if it is an open: one that
    /// refuses leaves the handle disconnected, and nothing else would try
    /// it while the connection lives), its time to give up pushed to
    /// [`PATIENCE`] from now (filterd stalled but connected counts as
    /// attached). The item remembers it: a try on the same connection
    /// that finds no disconnected handle says [`Tried::Reattach`]
    /// ([`no_such_handle`]).
    Unanswered,
    /// No disconnected handle found after an earlier try went unanswered
    /// on this connection: maybe the handle that unanswered resume
    /// attached, whose undo (a close) may yet be lost with the
    /// connection. Tried again only once the frontend has reattached
    /// (filterd then detached what that connection attached, and a
    /// resume finds it), or given up past its time.
    Reattach,
}

/// What a try that found no disconnected handle (`NoSuchHandle`) means:
/// done, unless an earlier try of the item went unanswered on the same
/// connection (`unanswered`, as [`Closer::run`] tells `close`).
pub fn no_such_handle(unanswered: bool) -> Tried {
    if unanswered {
        Tried::Reattach
    } else {
        Tried::Done
    }
}

/// How an item whose call failed for a passing cause ([`passing`]) is
/// tried again: [`Tried::Unanswered`] for a timeout, else [`Tried::Again`].
pub fn tried_again(e: &ClientError) -> Tried {
    match e {
        ClientError::Timeout(_) => Tried::Unanswered,
        _ => Tried::Again,
    }
}

/// Whether a take or close failed for a cause that passes: filterd gone
/// or restarting (the connection lost, no answer in time), or answering
/// that it cannot now (busy, a failed commit, retry later).
pub fn passing(e: &ClientError) -> bool {
    match e {
        ClientError::Refused(w) => matches!(
            w.code,
            ErrorCode::FileNotAvailable
                | ErrorCode::Busy
                | ErrorCode::Retry
                | ErrorCode::DiskFull
                | ErrorCode::LimitReached
                | ErrorCode::Internal
        ),
        ClientError::Unexpected(_) => false,
        ClientError::Connect { .. }
        | ClientError::Disconnected
        | ClientError::Timeout(_)
        | ClientError::Io(_)
        | ClientError::DescriptorsCut(_) => true,
    }
}

/// One hand-over's items not yet tried, and who waits for their first
/// tries.
struct Job<T> {
    items: VecDeque<T>,
    done: Option<mpsc::Sender<()>>,
}

/// An item to try again, until `until` (counted while attached).
struct Again<T> {
    item: T,
    until: Instant,
    /// [`Tried::Reattach`]: [`Attachment::reattaches`] right after that
    /// try; tried again only once it has grown past.
    after: Option<u64>,
    /// [`Attachment::reattaches`] right after its latest
    /// [`Tried::Unanswered`] try, if any.
    unanswered: Option<u64>,
}

impl<T> Again<T> {
    /// Whether it may be tried again on `link`.
    fn may_try(&self, link: Link) -> bool {
        link.ready && self.after.is_none_or(|g| link.reattaches > g)
    }

    /// Whether an earlier try went unanswered on `link`'s connection (no
    /// reattach since).
    fn unanswered_on(&self, link: Link) -> bool {
        self.unanswered.is_some_and(|g| link.reattaches <= g)
    }
}

struct Queue<T> {
    /// Hand-overs with items never tried, taking turns.
    jobs: VecDeque<Job<T>>,
    /// Items to try again, oldest first, at most [`AGAIN_MAX`].
    again: VecDeque<Again<T>>,
    /// When the next try again may run.
    due: Instant,
    backoff: Duration,
    /// The frontend's reattaches seen ([`Attachment::reattaches`]).
    seen: u64,
    stopped: bool,
}

/// The frontend's attachment as the closer's thread saw it.
#[derive(Debug, Clone, Copy)]
struct Link {
    /// [`Attachment::reattaches`].
    reattaches: u64,
    /// [`Attachment::io_ready`]: attached, the latest reattach applied.
    ready: bool,
}

/// What the closer's thread does next.
enum Next<T> {
    First(T, Option<mpsc::Sender<()>>),
    Again(Again<T>),
    /// Nothing yet: look again.
    Idle,
}

/// A frontend's queue of closes, run by one thread of its own
/// ([`Closer::run`]).
pub struct Closer<T> {
    queue: Mutex<Queue<T>>,
    ready: Condvar,
}

impl<T> Default for Closer<T> {
    fn default() -> Self {
        Closer {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                again: VecDeque::new(),
                due: Instant::now(),
                backoff: MIN_BACKOFF,
                seen: 0,
                stopped: false,
            }),
            ready: Condvar::new(),
        }
    }
}

impl<T: Debug> Closer<T> {
    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `items` (one hand-over: a LOGOFF's, a takeover's); `done`
    /// is told once each was tried once.
    pub fn push(&self, items: Vec<T>, done: Option<mpsc::Sender<()>>) {
        if items.is_empty() {
            if let Some(d) = done {
                let _ = d.send(());
            }
            return;
        }
        self.lock().jobs.push_back(Job {
            items: items.into(),
            done,
        });
        self.ready.notify_one();
    }

    /// Ends [`Closer::run`] (the frontend is gone).
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.ready.notify_all();
    }

    /// Items waiting to be tried again.
    pub fn waiting(&self) -> usize {
        self.lock().again.len()
    }

    /// The closer thread: tries each item with `close` until
    /// [`Closer::stop`] or `attachment` (the frontend's filterd
    /// attachment) is `None`. An item `close` says [`Tried::Again`] or
    /// [`Tried::Unanswered`] for is tried again once the frontend
    /// reattached, or after a backoff while it stays attached
    /// ([`Tried::Reattach`]: only once it reattached), and handed to
    /// `give_up` past [`PATIENCE`] (counted while attached) or
    /// [`AGAIN_MAX`]. `close` is told whether an earlier try of the item
    /// went unanswered on the connection it is tried on now.
    pub fn run(
        &self,
        attachment: impl Fn() -> Option<Attachment>,
        mut close: impl FnMut(&T, bool) -> Tried,
        mut give_up: impl FnMut(&T),
    ) {
        loop {
            let Some(att) = attachment() else { return };
            let link = Link {
                reattaches: att.reattaches(),
                ready: att.io_ready(),
            };
            drop(att);
            match self.next(link, &mut give_up) {
                None => return,
                Some(Next::Idle) => {}
                Some(Next::First(item, done)) => {
                    let started = Instant::now();
                    let t = close(&item, false);
                    self.spare(t, started.elapsed());
                    let at = reattaches_at(&attachment, link);
                    self.tried(item, t, None, None, at, &mut give_up);
                    if let Some(d) = done {
                        let _ = d.send(());
                    }
                }
                Some(Next::Again(a)) => {
                    let started = Instant::now();
                    let t = close(&a.item, a.unanswered_on(link));
                    self.spare(t, started.elapsed());
                    let at = reattaches_at(&attachment, link);
                    self.tried(a.item, t, Some(a.until), a.unanswered, at, &mut give_up);
                }
            }
        }
    }

    /// The next item to try: a first try before any try again; `None`
    /// once stopped. Waits a while when there is none.
    fn next(&self, link: Link, give_up: &mut impl FnMut(&T)) -> Option<Next<T>> {
        let mut q = self.lock();
        if q.stopped {
            return None;
        }
        let now = Instant::now();
        let reattaches = link.reattaches;
        if reattaches != q.seen {
            // Back on filterd (maybe a restarted one: fresh timeouts).
            q.seen = reattaches;
            q.due = now;
            q.backoff = MIN_BACKOFF;
            for a in q.again.iter_mut() {
                a.until = a.until.max(now + PATIENCE);
            }
        }
        if link.ready {
            // Detached, the time does not count (filterd's recovery gives
            // each handle a fresh timeout): nothing is given up.
            q.again.retain(|a| {
                let keep = a.until > now;
                if !keep {
                    tracing::warn!(item = ?a.item, "a close tried again past its durable timeout: given up");
                    give_up(&a.item);
                }
                keep
            });
        }
        if let Some(mut job) = q.jobs.pop_front() {
            let Some(item) = job.items.pop_front() else {
                return Some(Next::Idle);
            };
            let done = if job.items.is_empty() {
                job.done.take()
            } else {
                // Its next item after the other hand-overs' next ones.
                q.jobs.push_back(job);
                None
            };
            return Some(Next::First(item, done));
        }
        let first = q.again.iter().position(|a| a.may_try(link));
        if let (Some(i), true) = (first, now >= q.due) {
            return q.again.remove(i).map(Next::Again);
        }
        let wait = match first {
            None if q.again.is_empty() => Duration::from_secs(60),
            // Detached, or all waiting for a reattach: look again later.
            None => POLL,
            Some(_) => q
                .due
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(1), POLL),
        };
        drop(
            self.ready
                .wait_timeout(q, wait)
                .unwrap_or_else(|p| p.into_inner()),
        );
        Some(Next::Idle)
    }

    /// A try that ended `t` held the one closer thread `blocked`: if
    /// filterd did not answer it, that time counts against none of the
    /// items waiting meanwhile, whose time to give up moves on by as much
    /// (by that much only: an item that never gets an answer must not keep
    /// the others, answered in between, for ever). Before (review rr-final,
    /// session 34), only the item tried was spared, and those queued behind
    /// a stalled filterd's call timeouts were given up before their next
    /// try.
    fn spare(&self, t: Tried, blocked: Duration) {
        if t == Tried::Unanswered {
            for a in self.lock().again.iter_mut() {
                a.until += blocked;
            }
        }
    }

    /// `item` was tried (`t`); `until` is its time to give up if it was
    /// tried before, `unanswered` its [`Again::unanswered`];
    /// `reattaches` the frontend's right after the try.
    fn tried(
        &self,
        item: T,
        t: Tried,
        until: Option<Instant>,
        unanswered: Option<u64>,
        reattaches: u64,
        give_up: &mut impl FnMut(&T),
    ) {
        let mut q = self.lock();
        let now = Instant::now();
        match t {
            Tried::Done => {
                if until.is_some() {
                    // filterd serves again: the others at once.
                    q.due = now;
                    q.backoff = MIN_BACKOFF;
                }
            }
            Tried::Again | Tried::Unanswered | Tried::Reattach => {
                if t != Tried::Reattach {
                    q.due = now + q.backoff;
                    q.backoff = (q.backoff * 2).min(MAX_BACKOFF);
                }
                let mut until = until.unwrap_or(now + PATIENCE);
                let mut unanswered = unanswered;
                if t == Tried::Unanswered {
                    // Time filterd did not answer in does not count.
                    until = until.max(now + PATIENCE);
                    unanswered = Some(reattaches);
                }
                if q.again.len() >= AGAIN_MAX {
                    if let Some(old) = q.again.pop_front() {
                        tracing::warn!(item = ?old.item, "more than {AGAIN_MAX} closes to try again: the oldest is given up");
                        give_up(&old.item);
                    }
                }
                q.again.push_back(Again {
                    item,
                    until,
                    after: (t == Tried::Reattach).then_some(reattaches),
                    unanswered,
                });
            }
        }
    }
}

/// The frontend's reattaches right after a try (`link`'s if it is gone):
/// read at once, so that a reattach after the failure is one past it.
fn reattaches_at(attachment: &impl Fn() -> Option<Attachment>, link: Link) -> u64 {
    attachment().map_or(link.reattaches, |a| a.reattaches())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOWN: Link = Link {
        reattaches: 0,
        ready: false,
    };
    const BACK: Link = Link {
        reattaches: 1,
        ready: true,
    };

    fn first(c: &Closer<u32>, link: Link) -> (u32, bool) {
        match c.next(link, &mut |_| {}) {
            Some(Next::First(i, done)) => (i, done.is_some()),
            _ => panic!("a first try expected"),
        }
    }

    /// Hand-overs take turns, one item each; `done` goes with a
    /// hand-over's last item.
    #[test]
    fn hand_overs_take_turns() {
        let c = Closer::default();
        let (tx, _rx) = mpsc::channel();
        c.push(vec![1, 2, 3], Some(tx));
        c.push(vec![10], None);
        let order: Vec<_> = (0..4).map(|_| first(&c, DOWN)).collect();
        assert_eq!(order, [(1, false), (10, false), (2, false), (3, true)]);
    }

    /// An item tried in vain is tried again only once the frontend has
    /// reattached, and after every first try waiting; given up past its
    /// time.
    #[test]
    fn tried_again_after_a_reattach_and_after_first_tries() {
        let c = Closer::default();
        c.tried(7, Tried::Again, None, None, 0, &mut |_| {});
        assert!(matches!(c.next(DOWN, &mut |_| {}), Some(Next::Idle)));
        c.push(vec![8], None);
        assert_eq!(first(&c, BACK), (8, false));
        match c.next(BACK, &mut |_| {}) {
            Some(Next::Again(a)) => assert_eq!(a.item, 7),
            _ => panic!("tried again after the reattach"),
        }
        let mut given_up = Vec::new();
        let past = Instant::now();
        c.tried(9, Tried::Again, Some(past), None, 1, &mut |_| {});
        c.tried(11, Tried::Again, None, None, 1, &mut |_| {});
        // 11 is tried again once due (Idle until then); 9 is past its time.
        let next = c.next(BACK, &mut |i| given_up.push(*i));
        assert!(matches!(
            next,
            Some(Next::Idle | Next::Again(Again { item: 11, .. }))
        ));
        assert_eq!(given_up, [9]);
        c.stop();
        assert!(c.next(BACK, &mut |_| {}).is_none());
    }

    /// Detached, nothing is given up however long it stays so (filterd's
    /// recovery gives each handle a fresh timeout): the item is tried
    /// again after the reattach; given up past its time only while
    /// attached.
    #[test]
    fn nothing_is_given_up_while_detached() {
        let c = Closer::default();
        let mut given_up = Vec::new();
        c.tried(9, Tried::Again, Some(Instant::now()), None, 0, &mut |_| {});
        let next = c.next(DOWN, &mut |i| given_up.push(*i));
        assert!(matches!(next, Some(Next::Idle)));
        assert!(given_up.is_empty(), "given up while filterd was down");
        match c.next(BACK, &mut |i| given_up.push(*i)) {
            Some(Next::Again(a)) => assert_eq!(a.item, 9),
            _ => panic!("tried again after the reattach"),
        }
        assert!(given_up.is_empty());
    }

    /// Detached with an item due, the closer looks every [`POLL`], not
    /// every millisecond.
    #[test]
    fn a_detached_closer_waits_a_poll_between_looks() {
        let c = Closer::default();
        c.tried(7, Tried::Again, None, None, 0, &mut |_| {});
        c.lock().due = Instant::now();
        let start = Instant::now();
        let mut looks = 0;
        while start.elapsed() < Duration::from_millis(500) {
            assert!(matches!(c.next(DOWN, &mut |_| {}), Some(Next::Idle)));
            looks += 1;
        }
        assert!(looks <= 4, "{looks} looks in 500 ms");
    }

    /// An item whose call went unanswered is tried again after the
    /// backoff, with no reattach (a late refusal is undone by nobody), and
    /// `close` is told so on the same connection, not after a reattach.
    #[test]
    fn an_unanswered_item_is_tried_again_after_the_backoff() {
        let c = Closer::default();
        c.tried(7, Tried::Unanswered, None, None, 1, &mut |_| {});
        c.lock().due = Instant::now();
        match c.next(BACK, &mut |_| {}) {
            Some(Next::Again(a)) => {
                assert_eq!(a.item, 7);
                assert!(a.unanswered_on(BACK));
                let again = Link {
                    reattaches: 2,
                    ready: true,
                };
                assert!(!a.unanswered_on(again), "a reattach since");
            }
            _ => panic!("tried again after the backoff, without a reattach"),
        }
        let timeout = ClientError::Timeout(Duration::from_secs(1));
        assert_eq!(tried_again(&timeout), Tried::Unanswered);
        assert_eq!(tried_again(&ClientError::Disconnected), Tried::Again);
    }

    /// "No such handle" after an unanswered try on the same connection
    /// does not end the item (maybe the handle that resume attached): it
    /// is tried again only once the frontend has reattached.
    #[test]
    fn no_such_handle_after_an_unanswered_try_waits_for_a_reattach() {
        assert_eq!(no_such_handle(false), Tried::Done);
        let c = Closer::default();
        c.tried(7, Tried::Unanswered, None, None, 1, &mut |_| {});
        c.lock().due = Instant::now();
        let Some(Next::Again(a)) = c.next(BACK, &mut |_| {}) else {
            panic!("tried again after the backoff");
        };
        let t = no_such_handle(a.unanswered_on(BACK));
        c.tried(a.item, t, Some(a.until), a.unanswered, 1, &mut |_| {});
        assert_eq!(c.waiting(), 1, "not done");
        c.lock().due = Instant::now();
        assert!(
            matches!(c.next(BACK, &mut |_| {}), Some(Next::Idle)),
            "not due before a reattach"
        );
        let again = Link {
            reattaches: 2,
            ready: true,
        };
        match c.next(again, &mut |_| {}) {
            Some(Next::Again(a)) => {
                assert_eq!(a.item, 7);
                assert!(!a.unanswered_on(again));
            }
            _ => panic!("tried again after the reattach"),
        }
    }

    /// An unanswered try pushes the item's time to give up to
    /// [`PATIENCE`] from now: a filterd stalled but connected counts as
    /// attached, and the time it did not answer must not count.
    #[test]
    fn an_unanswered_try_does_not_count_against_patience() {
        let c = Closer::default();
        let mut given_up = Vec::new();
        // Attached all along (no reattach to push the time).
        c.lock().seen = BACK.reattaches;
        let past = Instant::now();
        c.tried(7, Tried::Unanswered, Some(past), None, 1, &mut |_| {});
        c.lock().due = Instant::now();
        match c.next(BACK, &mut |i| given_up.push(*i)) {
            Some(Next::Again(a)) => assert_eq!(a.item, 7),
            _ => panic!("tried again, not given up"),
        }
        assert!(
            given_up.is_empty(),
            "given up for time filterd did not answer"
        );
    }

    /// An unanswered try moves every waiting item's time to give up on by
    /// as long as the call held the one closer thread, not only its own:
    /// the others could not be tried meanwhile. By that much only: an
    /// answered try spares nobody, and an item that is never answered does
    /// not keep the others for ever.
    #[test]
    fn an_unanswered_try_spares_the_items_queued_behind_it() {
        let c = Closer::default();
        let mut given_up = Vec::new();
        c.lock().seen = BACK.reattaches;
        let soon = Instant::now() + Duration::from_millis(50);
        c.tried(8, Tried::Again, Some(soon), None, 1, &mut |_| {});
        c.tried(9, Tried::Again, Some(soon), None, 1, &mut |_| {});
        // A call unanswered for 120 s while 8 and 9 waited; one answered.
        c.spare(Tried::Unanswered, Duration::from_secs(120));
        c.spare(Tried::Again, Duration::from_secs(3600));
        let until =
            |c: &Closer<u32>, i| c.lock().again.iter().find(|a| a.item == i).map(|a| a.until);
        assert_eq!(until(&c, 8), Some(soon + Duration::from_secs(120)));
        std::thread::sleep(Duration::from_millis(60));
        c.lock().due = Instant::now();
        match c.next(BACK, &mut |i| given_up.push(*i)) {
            Some(Next::Again(a)) => assert_eq!(a.item, 8),
            _ => panic!("the item queued behind tried again"),
        }
        assert!(
            given_up.is_empty(),
            "given up while the closer waited on another item's call"
        );
        assert_eq!(until(&c, 9), Some(soon + Duration::from_secs(120)));
    }

    #[test]
    fn only_passing_failures_are_tried_again() {
        let refused = |code| ClientError::Refused(crate::proto::WireError::new(code, "x"));
        assert!(passing(&ClientError::Disconnected));
        assert!(passing(&ClientError::Timeout(Duration::from_secs(1))));
        assert!(passing(&refused(ErrorCode::FileNotAvailable)));
        assert!(passing(&refused(ErrorCode::Busy)));
        assert!(!passing(&refused(ErrorCode::NotOwner)));
        assert!(!passing(&refused(ErrorCode::NoSuchHandle)));
    }
}
