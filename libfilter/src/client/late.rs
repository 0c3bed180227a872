//! Answers that come after their call gave up.
//!
//! A call waits [`super::DEFAULT_CALL_TIMEOUT`] (or
//! `RKFILTER_CALL_TIMEOUT_MS`) for filterd; a filterd stalled longer (a
//! slow disk, a long commit, SIGSTOP) still answers later. Its caller told
//! its own client the request failed, so what the late answer reports must
//! not stay in force: an open nobody can name would hold its share mode,
//! lease and record against every other client for as long as the frontend
//! stays attached, and a lock the client was told failed would refuse
//! everyone else's. [`LateAnswers`] remembers, for each call that gave up
//! and whose success would leave such state, what undoes it
//! ([`LateUndo`]); the reader turns a late success into an [`Undo`] that a
//! worker thread runs as an ordinary call (the reader must keep reading).
//!
//! Per request kind (docs/ARCHITECTURE.md "Answers that come after the
//! call gave up"):
//! - a fresh `Open`: the handle is closed (its client was told the open
//!   failed and will never name it) — unless its caller said the client
//!   retries by replaying the open's create GUID
//!   ([`super::FilterClient::open_replayed_by_guid`]: smbshim, and rksmbd
//!   for DH2Q opens) and filterd granted an open that waits for that replay (persistent, or durable
//!   with an H lease): then it is detached as a replay's is, for the
//!   replay must find the handle (a new open would run the CREATE again).
//!   Not once the session the client would replay through has ended for
//!   good ([`SessionEnd`], a LOGOFF in smbshim or rksmbd): nobody replays it then, and
//!   detached it would hold the file until its durable timeout; it is
//!   closed;
//! - a `ReplayOpen` or `Resume`: the handle is detached, as when its client
//!   goes away — a durable or persistent one stays resumable by its create
//!   GUID, another is closed — unless the caller learnt it holds the
//!   handle after all ([`super::FilterClient::keep_attached`]: an
//!   attachment's retried resume refused "attached"), or its session has
//!   ended for good ([`SessionEnd`]), or the caller resumed it only to
//!   close it ([`super::FilterClient::resume_by_guid_to_close`]): closed;
//! - a `Lock` whose caller learns the outcome itself
//!   ([`super::FilterClient::lock_outcome_learnt`]): nothing;
//! - a `Lock` of ranges only, without a lock sequence: the ranges are
//!   unlocked. With a lock sequence the client's replay of it is answered
//!   from the record (exactly once), so the lock stays; a batch that also
//!   unlocks cannot be undone by a call and stays too;
//! - anything else: nothing. Closes and detaches taken back late are
//!   settled by the frontends (`rksmbd::settle`); record writes, renames
//!   and size changes are found again by the client's replay.
//!
//! An undo that fails while the connection lives is sent again
//! ([`worth_retrying`], [`Retries`]) until filterd answers it one way or
//! the other: a close it refused or undid (a failed commit) left the
//! handle attached to this connection, named by nobody, for as long as
//! the connection lived. A lost connection ends the retries: filterd
//! detaches its handles itself.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ClientError;
use crate::proto::ErrorCode;

use crate::locks::LockOp;
use crate::model::ResumeKey;
use crate::proto::{Reply, Request};

/// Most calls that gave up whose answers are remembered. An older one is
/// forgotten (with a warning): its answer, if it ever comes, is dropped as
/// before.
pub(super) const LATE_MAX: usize = 1024;

/// Whether the session a frontend's client would replay a create GUID
/// through has ended for good (a LOGOFF: smbshim's closes every open of
/// the session, durable ones too; rksmbd's closes the late opens of the
/// session's DH2Q CREATEs that got no answer): a late open or replay made for that
/// session is then closed, not detached for a replay that will not come.
/// Cheap to clone: the frontend keeps one per session and hands a clone to
/// each call whose late answer it governs; ending it reaches them all.
///
/// Read when the undo is sent, not when the late answer comes
/// (`FilterClient::take_back_late`, under the connection's reattach
/// order): a session that ends after a detach was decided but before it
/// was sent still gets a close; one that ends after the detach was sent
/// finds the handle disconnected, and a resume by create GUID sent then
/// ([`super::FilterClient::resume_by_guid_to_close`]) reaches filterd
/// after the detach and takes it, to close it. So the frontend that ends
/// the session ([`SessionEnd::end`]) first and then closes the session's
/// timed-out opens by GUID leaves none detached, whichever comes first.
#[derive(Clone, Default)]
pub struct SessionEnd(Arc<AtomicBool>);

impl SessionEnd {
    /// The session has ended for good: late answers made for it from now
    /// on are closed.
    pub fn end(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`SessionEnd::end`] was called.
    pub fn has_ended(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl PartialEq for SessionEnd {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SessionEnd {}

impl std::fmt::Debug for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SessionEnd")
            .field(&self.has_ended())
            .finish()
    }
}

/// What undoes a late success of a call that gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LateUndo {
    /// A fresh open: close the handle it answers with.
    Close,
    /// A replay or resume: detach the handle it answers with.
    Detach,
    /// A replay made for a session ([`super::FilterClient::replay_open_for`]):
    /// detach the handle it answers with, or close it once the session has
    /// ended for good.
    DetachUntil(SessionEnd),
    /// A fresh open with a create GUID whose client replays that GUID
    /// ([`super::FilterClient::open_replayed_by_guid`]): detach the handle
    /// it answers with if the open granted waits disconnected for that
    /// replay ([`waits_for_replay`]) and its session has not ended for
    /// good, else close it.
    DetachIfWaiting(SessionEnd),
    /// A lock whose caller learns itself whether it was granted
    /// ([`super::FilterClient::lock_outcome_learnt`]): a late success is
    /// kept (and logged).
    Keep {
        /// The handle.
        key: ResumeKey,
    },
    /// A lock: unlock these ranges of this handle.
    Unlock {
        /// The handle.
        key: ResumeKey,
        /// The ranges it locked, as unlocks.
        unlocks: Vec<LockOp>,
    },
}

impl LateUndo {
    /// What would undo `req` answered late; `None` when nothing should.
    pub(super) fn of(req: &Request) -> Option<LateUndo> {
        match req {
            Request::Open(_) => Some(LateUndo::Close),
            Request::ReplayOpen(_) | Request::Resume(_) => Some(LateUndo::Detach),
            Request::Lock {
                key,
                locks,
                lock_sequence: None,
                ..
            } if !locks.is_empty() && locks.iter().all(|l| !l.unlock) => Some(LateUndo::Unlock {
                key: *key,
                unlocks: locks
                    .iter()
                    .map(|l| LockOp { unlock: true, ..*l })
                    .collect(),
            }),
            _ => None,
        }
    }

    /// The call that undoes a late answer `reply`, if it reports the
    /// state this undo takes back.
    pub(super) fn undo(self, reply: &Reply) -> Option<Undo> {
        match (self, reply) {
            (LateUndo::Close, Reply::Opened(info)) => Some(Undo::Close(info.key)),
            (LateUndo::Detach, Reply::Opened(info)) => Some(Undo::Detach(info.key)),
            (LateUndo::DetachUntil(end), Reply::Opened(info)) => {
                Some(Undo::DetachUntil(info.key, end))
            }
            (LateUndo::DetachIfWaiting(end), Reply::Opened(info)) if waits_for_replay(info) => {
                Some(Undo::DetachUntil(info.key, end))
            }
            (LateUndo::DetachIfWaiting(_), Reply::Opened(info)) => Some(Undo::Close(info.key)),
            (LateUndo::Unlock { key, unlocks }, Reply::Done) => Some(Undo::Unlock { key, unlocks }),
            (LateUndo::Keep { key }, Reply::Done) => {
                tracing::info!(
                    resume_key = %key,
                    "filterd granted a lock after the call gave up; its caller learns that itself, so the lock stays"
                );
                None
            }
            _ => None,
        }
    }
}

impl LateUndo {
    /// What undoes fresh open `o`, answered late, whose client (told to
    /// try again: SMB's STATUS_FILE_NOT_AVAILABLE to smbshim's smbl
    /// clients, STATUS_SERVER_UNAVAILABLE to rksmbd's) retries by replaying
    /// its create GUID: closed, the GUID would name nothing, and the
    /// replay would run the CREATE again — an overwrite truncating the
    /// file a second time (over another client's acknowledged write), a
    /// create refused as a collision with the file this very CREATE made.
    /// Without a create GUID or durability nothing can be replayed: closed.
    /// So is one answered once `end` has ended: its client's session is
    /// over, and nobody replays it.
    pub(super) fn of_open_replayed(o: &crate::proto::OpenRequest, end: &SessionEnd) -> LateUndo {
        if o.create_guid.is_some() && o.durability != crate::model::Durability::None {
            LateUndo::DetachIfWaiting(end.clone())
        } else {
            LateUndo::Close
        }
    }
}

/// Whether the open `info` reports waits disconnected for its client's
/// replay once detached: persistent, or durable with an H lease — what the
/// frontends serve as durable (smbshim's `let_go`, rksmbd's `durable_of`).
/// A durable open granted without H is served as a plain open; detached,
/// it would only hold the file against everyone until its timeout.
fn waits_for_replay(info: &crate::proto::Opened) -> bool {
    match info.durability {
        crate::model::Durability::Persistent { .. } => true,
        crate::model::Durability::Durable { .. } => info
            .lease
            .is_some_and(|l| l.state.contains(crate::lease::LeaseState::H)),
        crate::model::Durability::None => false,
    }
}

/// A call that takes back what a late answer reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Undo {
    /// Close this handle.
    Close(ResumeKey),
    /// Detach this handle.
    Detach(ResumeKey),
    /// Detach this handle, or close it if the session has ended for good
    /// by the time the undo is sent.
    DetachUntil(ResumeKey, SessionEnd),
    /// Unlock these ranges of this handle.
    Unlock {
        /// The handle.
        key: ResumeKey,
        /// The unlocks.
        unlocks: Vec<LockOp>,
    },
}

impl Undo {
    /// The handle it concerns.
    pub(super) fn key(&self) -> ResumeKey {
        match self {
            Undo::Close(k)
            | Undo::Detach(k)
            | Undo::DetachUntil(k, _)
            | Undo::Unlock { key: k, .. } => *k,
        }
    }
}

/// Whether undo `undo`, failed with `e`, may be made by sending it again
/// on the same, live, connection: filterd refused or undid it for a
/// passing cause (a failed commit, a full disk, a busy or recovering
/// daemon), or — a close or detach — its answer did not come (filterd
/// stalled again; had it made the undo, the retry is answered
/// `NoSuchHandle`, and a handle handed out since is left alone). An
/// unlock whose answer did not come is not sent again: made late, its
/// range may be the client's again by the retry, and the retry would
/// take that lock. Not when filterd answered that nothing is left to
/// undo (`NoSuchHandle`, `NotOwner`, `RangeNotLocked`) or refused the
/// request as such, nor when the connection is gone (filterd detaches
/// its handles itself).
pub(super) fn worth_retrying(undo: &Undo, e: &ClientError) -> bool {
    match e {
        ClientError::Timeout(_) => !matches!(undo, Undo::Unlock { .. }),
        ClientError::Refused(w) => matches!(
            w.code,
            ErrorCode::FileNotAvailable
                | ErrorCode::DiskFull
                | ErrorCode::LimitReached
                | ErrorCode::Busy
                | ErrorCode::Retry
                | ErrorCode::Internal
        ),
        _ => false,
    }
}

/// First pause before an undo that failed is sent again; it doubles up
/// to [`RETRY_MAX_PAUSE`].
const RETRY_FIRST_PAUSE: Duration = Duration::from_millis(20);

/// Longest pause between two tries of one undo.
const RETRY_MAX_PAUSE: Duration = Duration::from_secs(1);

/// Undos that failed and are to be sent again, each when its pause is
/// over; at most [`LATE_MAX`] (one more is dropped with an error).
#[derive(Debug, Default)]
pub(super) struct Retries {
    waiting: VecDeque<(Instant, Duration, Undo)>,
}

impl Retries {
    /// `undo` failed after a pause of `pause` (zero: its first try);
    /// sends it again after twice that, at most [`RETRY_MAX_PAUSE`].
    pub(super) fn again(&mut self, undo: Undo, pause: Duration, now: Instant) {
        if self.waiting.len() >= LATE_MAX {
            tracing::error!(
                ?undo,
                limit = LATE_MAX,
                "too many late answers' undos failing: this one is not tried again"
            );
            return;
        }
        let pause = (pause * 2).clamp(RETRY_FIRST_PAUSE, RETRY_MAX_PAUSE);
        self.waiting.push_back((now + pause, pause, undo));
    }

    /// How long until the next retry is due; `None` when none waits.
    pub(super) fn next_in(&self, now: Instant) -> Option<Duration> {
        self.waiting
            .iter()
            .map(|(at, _, _)| at.saturating_duration_since(now))
            .min()
    }

    /// The retries due at `now`, each with the pause it waited.
    pub(super) fn due(&mut self, now: Instant) -> Vec<(Duration, Undo)> {
        let (due, wait): (VecDeque<_>, VecDeque<_>) =
            self.waiting.drain(..).partition(|(at, _, _)| *at <= now);
        self.waiting = wait;
        due.into_iter().map(|(_, p, u)| (p, u)).collect()
    }
}

/// The calls that gave up, by request id, bounded by [`LATE_MAX`].
#[derive(Debug, Default)]
pub(super) struct LateAnswers {
    undo: HashMap<u64, LateUndo>,
    /// Ids in the order they gave up (some may have been answered since).
    order: VecDeque<u64>,
    /// Handles answered to reattaching calls (replay, resume) while calls
    /// that gave up are remembered, newest last, at most [`LATE_MAX`]: a
    /// late answer naming one of them is left alone, for the replay that
    /// took the handle may have been answered before the late answer came
    /// (a create GUID's fresh open and its replay, queued together in a
    /// stalled filterd).
    handed: VecDeque<ResumeKey>,
}

impl LateAnswers {
    /// Remembers that call `id` gave up; forgets the oldest beyond
    /// [`LATE_MAX`].
    pub(super) fn remember(&mut self, id: u64, undo: LateUndo) {
        self.undo.insert(id, undo);
        self.order.push_back(id);
        while self.order.len() > LATE_MAX {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(u) = self.undo.remove(&old) {
                tracing::warn!(
                    id = old,
                    ?u,
                    limit = LATE_MAX,
                    "too many calls gave up on filterd: a late answer will not be undone"
                );
            }
        }
    }

    /// What undoes the late answer to `id`, if `id` gave up.
    pub(super) fn take(&mut self, id: u64) -> Option<LateUndo> {
        self.undo.remove(&id)
    }

    /// Whether a reattaching call was answered with `key` since a call
    /// that is still remembered gave up; the handed-out handles are
    /// forgotten once no such call is left.
    pub(super) fn handed_out_since(&mut self, key: ResumeKey) -> bool {
        let handed = self.handed.contains(&key);
        if self.undo.is_empty() {
            self.handed.clear();
        }
        handed
    }

    /// A reattaching call was answered with handle `key` (remembered only
    /// while some call that gave up is).
    pub(super) fn handed_out(&mut self, key: ResumeKey) {
        if self.undo.is_empty() {
            return;
        }
        if self.handed.len() >= LATE_MAX {
            self.handed.pop_front();
        }
        self.handed.push_back(key);
    }

    /// Forgets everything (the connection is gone: filterd detaches its
    /// handles itself).
    pub(super) fn clear(&mut self) {
        self.undo.clear();
        self.order.clear();
        self.handed.clear();
    }

    /// How many are remembered.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.undo.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseState;
    use crate::locks::LockRange;
    use crate::model::Durability;

    fn lock(unlock: bool) -> LockOp {
        LockOp {
            range: LockRange {
                offset: 0,
                length: 10,
            },
            exclusive: true,
            unlock,
        }
    }

    fn lock_req(locks: Vec<LockOp>, seq: bool) -> Request {
        Request::Lock {
            key: ResumeKey(uuid::Uuid::from_u128(7)),
            locks,
            lock_sequence: seq.then_some(crate::model::LockSequence {
                number: 1,
                index: 1,
            }),
            lock_owner: None,
        }
    }

    #[test]
    fn a_lock_is_undone_only_without_a_sequence_and_without_unlocks() {
        assert_eq!(
            LateUndo::of(&lock_req(vec![lock(false)], false)),
            Some(LateUndo::Unlock {
                key: ResumeKey(uuid::Uuid::from_u128(7)),
                unlocks: vec![lock(true)]
            })
        );
        assert_eq!(LateUndo::of(&lock_req(vec![lock(false)], true)), None);
        assert_eq!(
            LateUndo::of(&lock_req(vec![lock(false), lock(true)], false)),
            None
        );
        assert_eq!(LateUndo::of(&Request::Status), None);
    }

    fn open_req(durability: Durability, guid: bool) -> crate::proto::OpenRequest {
        use crate::model::{Access, ClientId, CreateGuid, Disposition, RelPath};
        crate::proto::OpenRequest {
            create_guid: guid.then_some(CreateGuid(uuid::Uuid::from_u128(9))),
            ..crate::proto::OpenRequest::new(
                ClientId::new("c").expect("client"),
                RelPath::new("f").expect("path"),
                Access::new(crate::model::Rights::READ).expect("access"),
                crate::model::Rights::ALL,
                Disposition::OverwriteIf,
                durability,
            )
        }
    }

    /// A late answer granting `durability` and a lease of `state`.
    fn opened(durability: Durability, state: Option<LeaseState>) -> Reply {
        Reply::Opened(crate::proto::Opened {
            key: ResumeKey(uuid::Uuid::from_u128(5)),
            create_action: crate::model::CreateAction::Created,
            size: 0,
            file: crate::model::FileId { dev: 1, ino: 2 },
            durability,
            lease: state.map(|state| crate::model::HeldLease {
                key: crate::lease::LeaseKey(uuid::Uuid::from_u128(3)),
                state,
                epoch: 1,
            }),
            locked: false,
        })
    }

    const PERSISTENT: Durability = Durability::Persistent { timeout_ms: 0 };
    const DURABLE: Durability = Durability::Durable { timeout_ms: 0 };

    /// A plain `open` (rksmbd's durable v1 and plain opens: a v1 open's
    /// GUID is rksmbd's own, so no replay can name it) is closed late
    /// whatever it asked for.
    #[test]
    fn a_fresh_open_is_closed_unless_its_caller_opts_in() {
        for (durability, guid) in [
            (Durability::None, true),
            (PERSISTENT, true),
            (DURABLE, true),
        ] {
            let o = Request::Open(open_req(durability, guid));
            assert_eq!(LateUndo::of(&o), Some(LateUndo::Close), "{durability:?}");
        }
    }

    /// An open whose client replays its create GUID
    /// (`open_replayed_by_guid`): detached only if what filterd granted
    /// waits for that replay — persistent, or durable with H — else closed.
    #[test]
    fn an_opted_in_open_is_detached_only_if_granted_waiting() {
        let end = SessionEnd::default();
        let of = |o: &crate::proto::OpenRequest| LateUndo::of_open_replayed(o, &end);
        assert_eq!(of(&open_req(Durability::None, true)), LateUndo::Close);
        assert_eq!(of(&open_req(PERSISTENT, false)), LateUndo::Close);
        assert_eq!(
            of(&open_req(DURABLE, true)),
            LateUndo::DetachIfWaiting(end.clone())
        );
        let key = ResumeKey(uuid::Uuid::from_u128(5));
        let undo =
            |granted, lease| LateUndo::DetachIfWaiting(end.clone()).undo(&opened(granted, lease));
        assert_eq!(
            undo(PERSISTENT, None),
            Some(Undo::DetachUntil(key, end.clone()))
        );
        assert_eq!(
            undo(DURABLE, Some(LeaseState::R.with(LeaseState::H))),
            Some(Undo::DetachUntil(key, end.clone()))
        );
        assert_eq!(undo(DURABLE, Some(LeaseState::R)), Some(Undo::Close(key)));
        // The session's end is read when the undo is sent (`take_back_late`).
        end.end();
        assert_eq!(
            undo(PERSISTENT, None),
            Some(Undo::DetachUntil(key, end.clone()))
        );
        assert!(end.has_ended() && SessionEnd::default() != end);
        assert_eq!(undo(DURABLE, None), Some(Undo::Close(key)));
        assert_eq!(undo(Durability::None, None), Some(Undo::Close(key)));
    }

    #[test]
    fn failed_undos_are_retried_with_a_growing_pause_and_bounded() {
        let t0 = Instant::now();
        let undo = Undo::Close(ResumeKey(uuid::Uuid::from_u128(7)));
        let mut r = Retries::default();
        assert_eq!(r.next_in(t0), None);
        r.again(undo.clone(), Duration::ZERO, t0);
        assert_eq!(r.next_in(t0), Some(RETRY_FIRST_PAUSE));
        assert!(r.due(t0).is_empty(), "not before its pause");
        let due = r.due(t0 + RETRY_FIRST_PAUSE);
        assert_eq!(due, vec![(RETRY_FIRST_PAUSE, undo.clone())]);
        r.again(undo.clone(), Duration::from_millis(800), t0);
        assert_eq!(r.next_in(t0), Some(RETRY_MAX_PAUSE));
        for _ in 0..LATE_MAX + 5 {
            r.again(undo.clone(), Duration::ZERO, t0);
        }
        assert_eq!(r.waiting.len(), LATE_MAX);
    }

    #[test]
    fn only_passing_failures_are_retried() {
        let refused = |code| {
            ClientError::Refused(crate::proto::WireError {
                code,
                message: String::new(),
                conflict: None,
            })
        };
        let close = Undo::Close(ResumeKey(uuid::Uuid::from_u128(7)));
        let unlock = Undo::Unlock {
            key: ResumeKey(uuid::Uuid::from_u128(7)),
            unlocks: vec![lock(true)],
        };
        let timeout = ClientError::Timeout(Duration::ZERO);
        assert!(worth_retrying(&close, &timeout));
        assert!(
            !worth_retrying(&unlock, &timeout),
            "made late, it may take a new lock"
        );
        for u in [&close, &unlock] {
            assert!(worth_retrying(u, &refused(ErrorCode::FileNotAvailable)));
            assert!(worth_retrying(u, &refused(ErrorCode::Internal)));
            assert!(!worth_retrying(u, &refused(ErrorCode::NoSuchHandle)));
            assert!(!worth_retrying(u, &refused(ErrorCode::NotOwner)));
            assert!(!worth_retrying(u, &refused(ErrorCode::RangeNotLocked)));
            assert!(!worth_retrying(u, &ClientError::Disconnected));
        }
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut l = LateAnswers::default();
        for id in 0..(LATE_MAX as u64 + 10) {
            l.remember(id, LateUndo::Close);
        }
        assert_eq!(l.len(), LATE_MAX);
        assert_eq!(l.take(0), None, "the oldest was forgotten");
        assert_eq!(l.take(LATE_MAX as u64 + 9), Some(LateUndo::Close));
        // Answered ids leave the order too, in time.
        for id in 0..(2 * LATE_MAX as u64) {
            l.remember(10_000 + id, LateUndo::Detach);
            l.take(10_000 + id);
        }
        assert_eq!(l.len(), 0);
        assert!(l.order.len() <= LATE_MAX);
    }
}
