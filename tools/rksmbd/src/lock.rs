//! LOCK (MS-SMB2 2.2.26, 3.3.5.14): byte-range locks are filterd's
//! (LockFileEx rules, mandatory across every frontend, mirrored as OFD
//! locks for local processes): locks are taken all or nothing, unlocks
//! released in order up to the first that fails (all or nothing, too,
//! with a lock sequence, so a replayed LOCK is recognised whole and
//! changes nothing). Lock sequences are checked for durable, persistent
//! and resilient opens and, since rksmbd advertises multichannel, for
//! every open of an SMB 3 connection; filterd keeps those of durable
//! handles (they outlive rksmbd), rksmbd those of the others.
//!
//! A lock without SMB2_LOCKFLAG_FAIL_IMMEDIATELY that conflicts goes
//! async (3.3.4.2): the client gets an interim STATUS_PENDING response
//! with an AsyncId at once, the connection goes on serving its other
//! requests, and the lock is retried — after an unlock or close on this
//! connection, and on a timer however busy the client is ([`RETRY`],
//! backing off to [`RETRY_MAX`]: a lock held elsewhere, and filterd has
//! no per-unlock event to wait for) —
//! until it is granted (final response, STATUS_SUCCESS), cancelled
//! (CANCEL, 3.3.5.16: STATUS_CANCELLED), or its open is closed
//! (STATUS_RANGE_NOT_LOCKED). A waiting lock holds nothing in filterd:
//! it never blocks filterd's engine or another client, and one whose
//! connection (a channel's too) or rksmbd goes leaves nothing behind.
//! Its replay on another channel takes it over. A filterd outage is
//! no answer to it: it waits through one ([`keeps_waiting`]). Nor to a
//! durable open's LOCK whose first attempt's outcome is unknown: it
//! waits (FAIL_IMMEDIATELY too) until filterd can tell whether it was
//! granted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libfilter::client::ClientError;
use libfilter::locks::{LockOp, LockRange};
use libfilter::model::{LockSequence, ResumeKey};
use libfilter::proto::ErrorCode;

use crate::files::{file_of, open_id, status_on_open};
use crate::server::{AsyncHead, Connection, Outcome, Reply, Request};
use crate::wire::{status, Reader};

const SHARED: u32 = 0x1;
const EXCLUSIVE: u32 = 0x2;
const UNLOCK: u32 = 0x4;
const FAIL_IMMEDIATELY: u32 = 0x10;
/// Most locks one LOCK request may carry.
const MAX_LOCKS: u16 = 64;
/// How soon a waiting lock is first retried, quiet client or busy; the
/// interval then doubles up to [`RETRY_MAX`].
pub const RETRY: Duration = Duration::from_millis(50);
/// The longest interval between retries of a waiting lock on the timer:
/// each is a filterd request (two without a lock sequence), and up to
/// [`MAX_WAITING`] locks wait per connection — at [`RETRY`] for good that
/// was over 10,000 requests a second from one client (review of rksmbd,
/// finding 3). A lock held elsewhere is so granted at most this late;
/// an unlock or close on the waiter's own connection retries at once.
pub const RETRY_MAX: Duration = Duration::from_millis(500);
/// Most locks one connection may have waiting at once.
const MAX_WAITING: usize = 256;
/// The LOCK response body (2.2.27).
const LOCK_RESPONSE: [u8; 4] = [4, 0, 0, 0];

/// A blocking LOCK waiting to be granted, answered with STATUS_PENDING.
pub struct Waiting {
    /// What its final response repeats of the request.
    pub head: AsyncHead,
    /// The open (volatile file id) it locks through.
    pub open: u64,
    key: ResumeKey,
    ops: Vec<LockOp>,
    sequence: Option<LockSequence>,
    /// The lock sequence rksmbd records itself once granted (an open
    /// that is not durable).
    local: Option<LockSequence>,
    /// How many locks like this one (range and kind) its handle held
    /// right before the last attempt (`None`: not known).
    held_before: Option<usize>,
    /// A retry's outcome is unknown (filterd went away, or the call timed
    /// out, after it may have granted and recorded the lock).
    uncertain: bool,
    /// [`WaitingLocks::granted`] of its lock's kind right before the last
    /// attempt: grants seen since then are not its own.
    grants_before: u64,
    /// When it is next retried on the timer.
    due: Instant,
    /// The interval after that retry ([`RETRY`] doubling to
    /// [`RETRY_MAX`]).
    every: Duration,
    /// A FAIL_IMMEDIATELY LOCK, waiting only because its first attempt's
    /// outcome was unknown: a range still held answers it
    /// STATUS_LOCK_NOT_GRANTED.
    immediate: bool,
    /// Its last attempt's outcome is unknown (filterd went away, or the
    /// call timed out): filterd may hold the lock granted.
    unknown: bool,
    /// A CANCEL came while the outcome was unknown: answered CANCELLED
    /// once it is known not granted, SUCCESS if it was (a CANCEL may
    /// lose the race, 3.3.5.16). Answered CANCELLED at once, a lock
    /// filterd had granted stayed held by the handle while its client
    /// took it for cancelled (review).
    cancelled: bool,
}

impl Waiting {
    /// A LOCK that waits for its range (nothing known of its attempts).
    fn new(
        head: AsyncHead,
        open: u64,
        key: ResumeKey,
        ops: Vec<LockOp>,
        sequence: Option<LockSequence>,
        local: Option<LockSequence>,
    ) -> Self {
        Waiting {
            head,
            open,
            key,
            ops,
            sequence,
            local,
            held_before: None,
            uncertain: false,
            grants_before: 0,
            immediate: false,
            unknown: false,
            cancelled: false,
            due: Instant::now() + RETRY,
            every: RETRY,
        }
    }

    /// What is known of a lock filterd may have granted it (its last
    /// attempt's outcome unknown, no lock sequence): `None` when it holds
    /// none for sure, or its client's replay is recognised by its lock
    /// sequence.
    fn unlearnt(&self, granted: &HashMap<LockLike, u64>) -> Option<Unlearnt> {
        let (true, Some(before), Some(like), [op]) = (
            self.uncertain,
            self.held_before,
            lock_like(self.key, &self.ops),
            self.ops.as_slice(),
        ) else {
            return None;
        };
        let seen = granted.get(&like).copied().unwrap_or(0);
        let others = usize::try_from(seen.saturating_sub(self.grants_before)).unwrap_or(usize::MAX);
        Some(Unlearnt {
            op: *op,
            held: before.saturating_add(others),
        })
    }

    /// Whether a LOCK of `ops` on open `open` with lock sequence `q` is
    /// this one's request again.
    fn replayed_by(&self, open: u64, q: LockSequence, ops: &[LockOp]) -> bool {
        self.open == open && self.sequence.or(self.local) == Some(q) && self.ops == ops
    }
}

/// A lock's handle, range and kind (exclusive or not).
type LockLike = (ResumeKey, LockRange, bool);

/// A connection's waiting locks.
#[derive(Default)]
pub struct WaitingLocks {
    list: Vec<Waiting>,
    /// Locks this connection saw granted, by handle, range and kind: a
    /// rise in a handle's count of such locks after an attempt whose
    /// outcome is unknown is that attempt's only beyond these.
    granted: HashMap<LockLike, u64>,
    /// Set by an unlock on this connection: retry after the PDU.
    nudged: bool,
}

impl WaitingLocks {
    /// The heads of the requests waiting here (for a CANCEL naming one
    /// by MessageId 0: `Connection::cancel_named`).
    pub fn heads(&self) -> impl Iterator<Item = &crate::server::AsyncHead> {
        self.list.iter().map(|w| &w.head)
    }

    /// Whether no lock waits.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether an unlock on this connection asked for a retry (cleared).
    pub fn take_nudged(&mut self) -> bool {
        std::mem::take(&mut self.nudged)
    }

    /// How long until the next retry on the timer is due.
    pub fn next_retry_in(&self) -> Duration {
        let now = Instant::now();
        (self.list.iter())
            .map(|w| w.due.saturating_duration_since(now))
            .min()
            .unwrap_or(RETRY)
    }

    /// A lock like `like` was granted on this connection: counted when a
    /// lock like it waits (see [`WaitingLocks::granted`]).
    fn saw_granted(&mut self, like: Option<LockLike>) {
        let Some(l) = like else {
            return;
        };
        if self
            .list
            .iter()
            .any(|w| lock_like(w.key, &w.ops) == Some(l))
        {
            *self.granted.entry(l).or_default() += 1;
        }
    }

    /// Removes the waiting locks `which` selects.
    pub fn remove_where(&mut self, which: impl Fn(&Waiting) -> bool) -> Vec<Waiting> {
        let (gone, kept) = std::mem::take(&mut self.list).into_iter().partition(which);
        self.list = kept;
        gone
    }

    /// Drops every waiting lock: their connection is gone. Those filterd
    /// may have granted are returned, to be settled when their handle is
    /// reconnected ([`settle_reconnected`]); no filterd call is made here,
    /// so a slow filterd does not hold up the release of the connection's
    /// other handles (review g1 of session 31).
    pub fn drop_all(&mut self) -> Vec<(ResumeKey, Unlearnt)> {
        std::mem::take(&mut self.list)
            .into_iter()
            .filter_map(|w| Some((w.key, w.unlearnt(&self.granted)?)))
            .collect()
    }
}

/// A lock that filterd may hold for a handle, granted to a client that
/// went away before it was told: its handle held `held` locks like `op`
/// before. Settled when the handle is reconnected, before its client can
/// lock again ([`settle_reconnected`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlearnt {
    op: LockOp,
    held: usize,
}

/// A LOCK request's elements, decoded.
#[derive(Debug)]
struct Decoded {
    /// The operations: all locks or all unlocks.
    ops: Vec<LockOp>,
    /// A single lock without FAIL_IMMEDIATELY: it may wait.
    blocking: bool,
    /// Unlocks only: the error of the first bad element, after `ops`.
    /// Windows applies unlocks in order up to it (3.3.5.14.1), so the good
    /// ones before it still happen (smbtorture lock.valid-request).
    bad_tail: Option<u32>,
}

/// Whether a range fits in 64 bits (else STATUS_INVALID_LOCK_RANGE).
fn range_ok(offset: u64, length: u64) -> bool {
    length == 0 || offset.checked_add(length - 1).is_some()
}

/// Decodes and checks the lock elements: an unlock request is checked
/// element by element (see [`Decoded::bad_tail`]), a lock request whole.
fn decode(r: &mut Reader<'_>, count: u16) -> Result<Decoded, u32> {
    if count == 0 || count > MAX_LOCKS {
        return Err(status::INVALID_PARAMETER);
    }
    let mut elements = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let offset = r.u64("offset")?;
        let length = r.u64("length")?;
        let flags = r.u32("flags")?;
        r.u32("reserved")?;
        elements.push((LockRange { offset, length }, flags));
    }
    let mut ops = Vec::with_capacity(elements.len());
    if elements.first().is_some_and(|(_, f)| *f == UNLOCK) {
        let mut bad_tail = None;
        for (range, flags) in elements {
            let bad = match (flags == UNLOCK, range_ok(range.offset, range.length)) {
                (false, _) => Some(status::INVALID_PARAMETER),
                (true, false) => Some(status::INVALID_LOCK_RANGE),
                (true, true) => None,
            };
            if let Some(st) = bad {
                if ops.is_empty() {
                    return Err(st);
                }
                bad_tail = Some(st);
                break;
            }
            ops.push(LockOp {
                range,
                exclusive: false,
                unlock: true,
            });
        }
        return Ok(Decoded {
            ops,
            blocking: false,
            bad_tail,
        });
    }
    let mut blocking = false;
    for (range, flags) in elements {
        match flags {
            SHARED | EXCLUSIVE => blocking = true,
            f if f == SHARED | FAIL_IMMEDIATELY || f == EXCLUSIVE | FAIL_IMMEDIATELY => {}
            // A request either unlocks or locks, never both (3.3.5.14.2).
            _ => return Err(status::INVALID_PARAMETER),
        }
        if !range_ok(range.offset, range.length) {
            return Err(status::INVALID_LOCK_RANGE);
        }
        ops.push(LockOp {
            range,
            exclusive: flags & EXCLUSIVE != 0,
            unlock: false,
        });
    }
    // Only a single lock may wait.
    if blocking && count > 1 {
        return Err(status::INVALID_PARAMETER);
    }
    Ok(Decoded {
        ops,
        blocking,
        bad_tail: None,
    })
}

/// LOCK.
pub fn lock(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 48 {
        return Err(status::INVALID_PARAMETER);
    }
    let count = r.u16("lock count")?;
    let seq = r.u32("lock sequence")?;
    r.skip(16, "file id")?;
    let (key, durable) = file_of(c, req, 8, related)?;
    // A FileId whose persistent half is not the open's names no open
    // (`open_id`; smbtorture lock.valid-request).
    let open = open_id(c, req, 8, related)?;
    let Decoded {
        ops,
        blocking,
        bad_tail,
    } = decode(&mut r, count)?;
    // MS-FSA 2.1.5.7: a byte-range lock needs read or write data access
    // (an attribute-only open must not keep others out of their data).
    let data_access = crate::files::FILE_READ_DATA | crate::files::FILE_WRITE_DATA;
    if ops.iter().any(|o| !o.unlock)
        && c.opens
            .get(&open)
            .is_some_and(|o| o.granted & data_access == 0)
    {
        return Err(status::ACCESS_DENIED);
    }
    // Lock sequences count for durable, persistent and resilient opens
    // (resilient ones on SMB 2.1 too), and for every open of a connection
    // we told of multichannel (3.3.5.14): a LOCK whose channel was lost
    // comes again on another channel of the session, the open still the
    // same.
    let resilient = c.opens.get(&open).is_some_and(|o| o.resilient_ms.is_some());
    let multichannel = c
        .dialect()
        .is_some_and(crate::server::advertises_multichannel);
    let index = seq >> 4;
    let checked = durable || resilient || multichannel;
    let sequence = (checked && (1..=64).contains(&index)).then(|| LockSequence {
        number: u8::try_from(seq & 0xF).unwrap_or(0),
        index: u8::try_from(index).unwrap_or(0),
    });
    // An open that is not durable: rksmbd keeps its sequences.
    let local = sequence.filter(|_| !durable);
    if let Some(q) = local {
        let o = c.opens.get_mut(&open).ok_or(status::FILE_CLOSED)?;
        if o.lock_sequences.contains(&(q.index, q.number)) {
            // A replay: nothing applied (3.3.5.14). filterd never sees
            // it: told (`replays_detected`).
            c.sh.replays.bump();
            return Ok(Reply::ok(LOCK_RESPONSE.to_vec()));
        }
        // Invalid until this LOCK succeeds.
        o.lock_sequences.retain(|(i, _)| *i != q.index);
    }
    let filter_sequence = sequence.filter(|_| durable);
    let locking = !ops.first().is_some_and(|o| o.unlock);
    let client = c.sh.filter.client();
    if let Some(q) = sequence.filter(|_| blocking && req.hdr.next_command == 0) {
        if c.waiting.list.iter().any(|w| w.replayed_by(open, q, &ops)) {
            // The LOCK waits already: this is it again, replayed on
            // another channel after the client lost the first. The
            // waiting lock answers this request from now on (the first
            // gets no final response, as on a lost channel); tried as a
            // new lock it would wait behind the first, once granted, for
            // good.
            c.sh.replays.bump();
            let head = c.go_async(&req.hdr);
            let replayed = c.waiting.list.iter_mut();
            for w in replayed.filter(|w| w.replayed_by(open, q, &ops)) {
                w.head = head;
            }
            return Ok(pending());
        }
    }
    // A durable handle's locks outlive filterd: killed after committing a
    // grant and before its reply, filterd comes back with the lock, and
    // the client, told the LOCK failed, would be refused by its own lock
    // when it tried again. With a lock sequence filterd recognises the
    // attempt made again; without one, a count of the handle's locks like
    // this one, taken first, tells afterwards whether it was granted.
    let like = lock_like(key, &ops).filter(|_| durable && filter_sequence.is_none());
    let held_before = like.and_then(|_| like_held(&client, key, &ops).ok());
    let grants_before = like
        .and_then(|l| c.waiting.granted.get(&l))
        .copied()
        .unwrap_or(0);
    if let (Some(st), Some(_)) = (bad_tail, sequence) {
        // With a lock sequence the request stays all or nothing, so that
        // a replay of it is recognised whole.
        return Err(st);
    }
    if !locking && sequence.is_none() {
        // Unlocks one at a time, in order, up to the first that fails
        // (smbtorture lock.multiple-unlock).
        for op in ops {
            client
                .lock(key, vec![op], None)
                .map_err(|e| status_on_open(&e))?;
            c.waiting.nudged = true;
        }
        return match bad_tail {
            Some(st) => Err(st),
            None => Ok(Reply::ok(vec![4, 0, 0, 0])),
        };
    }
    // Counted, and free to go async, its outcome is learnt by the count
    // should the call give up: a late grant is kept (see `lock_attempt`).
    // Otherwise a call that gives up is answered as failed, and libfilter
    // unlocks the late grant (review g1 of session 31).
    let learnt = held_before.is_some() && can_park(c, req);
    let attempt = if learnt {
        client.lock_outcome_learnt(key, ops.clone())
    } else {
        client.lock(key, ops.clone(), filter_sequence)
    };
    match attempt {
        Ok(()) => {
            record_local(c, open, local);
            c.waiting.nudged |= !locking;
            c.waiting.saw_granted(lock_like(key, &ops));
            // (A lock breaks other keys' read caching as a write does:
            // filterd does it as it grants, MS-FSA 2.1.4.12.)
            Ok(Reply::ok(vec![4, 0, 0, 0]))
        }
        // Only the last request of a PDU goes async (3.3.4.2).
        Err(e)
            if blocking
                && e.code() == Some(ErrorCode::LockNotGranted)
                && req.hdr.next_command == 0 =>
        {
            if c.waiting.list.len() >= MAX_WAITING {
                return Err(status::LOCK_NOT_GRANTED);
            }
            Ok(park(c, req, |head| {
                Waiting::new(head, open, key, ops, filter_sequence, local)
            }))
        }
        // The outcome is unknown and can be learnt once filterd answers
        // again: the LOCK is answered then (after an interim
        // STATUS_PENDING, as a blocking one is), with the truth. A
        // request of several locks without a lock sequence cannot be
        // learnt so: it is answered STATUS_FILE_NOT_AVAILABLE, as before.
        Err(e)
            if outcome_unknown(&e)
                && locking
                && (filter_sequence.is_some() || learnt)
                && can_park(c, req) =>
        {
            Ok(park(c, req, |head| Waiting {
                uncertain: held_before.is_some(),
                held_before,
                grants_before,
                immediate: !blocking,
                unknown: true,
                ..Waiting::new(head, open, key, ops, filter_sequence, local)
            }))
        }
        Err(e) => Err(status_on_open(&e)),
    }
}

/// Makes the LOCK `req` wait, as `make` has it: its interim response.
fn park(c: &mut Connection, req: &Request<'_>, make: impl FnOnce(AsyncHead) -> Waiting) -> Reply {
    let head = c.go_async(&req.hdr);
    c.waiting.list.push(make(head));
    pending()
}

/// Whether LOCK `req` may go async: only the last request of a PDU does
/// (3.3.4.2), and at most [`MAX_WAITING`] wait per connection.
fn can_park(c: &Connection, req: &Request<'_>) -> bool {
    req.hdr.next_command == 0 && c.waiting.list.len() < MAX_WAITING
}

/// The interim response of a LOCK that went async (3.3.4.2).
fn pending() -> Reply {
    Reply::with_status(status::PENDING, crate::server::error_body())
}

/// A LOCK with lock sequence `q` that rksmbd keeps (see
/// [`crate::files::Open::lock_sequences`]) was applied: a replay of it now
/// changes nothing.
fn record_local(c: &mut Connection, open: u64, q: Option<LockSequence>) {
    if let (Some(q), Some(o)) = (q, c.opens.get_mut(&open)) {
        o.lock_sequences.retain(|(i, _)| *i != q.index);
        o.lock_sequences.push((q.index, q.number));
    }
}

/// Whether a waiting lock's retry that failed with `e` goes on waiting:
/// the range is still held, or filterd is away for a while (gone and
/// being reattached, recovering, busy). A blocking LOCK has no deadline,
/// so an outage of filterd is no answer to it; the next retry after the
/// reattach is.
fn keeps_waiting(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(
            ErrorCode::LockNotGranted
                | ErrorCode::FileNotAvailable
                | ErrorCode::Busy
                | ErrorCode::Retry
        )
    ) || matches!(e, ClientError::Disconnected | ClientError::Timeout(_))
}

/// Whether waiting lock `w`'s session was ended by another connection.
fn session_ended(c: &Connection, w: &Waiting) -> bool {
    c.opens
        .get(&w.open)
        .and_then(|o| c.sessions.get(&o.session))
        .and_then(|s| s.link.as_ref())
        .is_some_and(|l| l.revoked())
}

/// What [`settle_dropped`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settled {
    /// Nothing was to settle, or it is settled: the handle holds no lock
    /// of the waiter's attempts.
    Done,
    /// filterd did not answer: the handle may hold the lock.
    FilterdAway(Unlearnt),
}

/// Settles waiting lock `w`, which is dropped unanswered (its
/// connection or channel is gone). When its last attempt's outcome is
/// unknown and counted (no lock sequence), filterd may hold the lock
/// for the handle, granted to a client never told so: kept, the
/// client's own LOCK of the range after it reconnects would be refused
/// by it. So its handle's locks like it are counted as for a retry, and
/// one more than before the attempt (beyond grants this connection saw)
/// is unlocked. With a lock sequence the client's replay is answered
/// from filterd's record, and nothing is to settle.
fn settle_dropped(
    client: &libfilter::client::FilterClient,
    w: &Waiting,
    granted: &HashMap<LockLike, u64>,
) -> Settled {
    let Some(u) = w.unlearnt(granted) else {
        return Settled::Done;
    };
    match like_held(client, w.key, &w.ops) {
        Ok(now) if now > u.held => match unlock_unlearnt(client, w.key, &u) {
            // Not sent again blindly: the next count tells.
            Err(e) if outcome_unknown(&e) => Settled::FilterdAway(u),
            _ => Settled::Done,
        },
        Ok(_) => Settled::Done,
        Err(e) if outcome_unknown(&e) => Settled::FilterdAway(u),
        // The handle is gone, and its locks with it.
        Err(_) => Settled::Done,
    }
}

/// Unlocks lock `u` of handle `key`, granted to nobody.
fn unlock_unlearnt(
    client: &libfilter::client::FilterClient,
    key: ResumeKey,
    u: &Unlearnt,
) -> Result<(), ClientError> {
    let unlock = LockOp {
        unlock: true,
        ..u.op
    };
    let done = client.lock(key, vec![unlock], None);
    match &done {
        Ok(()) => tracing::info!(
            resume_key = %key,
            "a lock granted to nobody (its LOCK's client went away before the outcome was known) was unlocked"
        ),
        Err(e) => tracing::warn!(
            resume_key = %key,
            error = %e,
            "could not unlock a lock granted to nobody"
        ),
    }
    done
}

/// Handle `key`, holding `held`, is being reconnected by its client:
/// each of `unlearnt` (locks its client went away before learning the
/// outcome of) that the handle holds is unlocked first, found by one
/// more lock like it than before its attempt. Nothing else can have
/// locked through the handle meanwhile: it was detached.
pub fn settle_reconnected(
    client: &libfilter::client::FilterClient,
    key: ResumeKey,
    held: &[libfilter::model::HeldLock],
    unlearnt: &[Unlearnt],
) {
    let mut unlocked: Vec<LockOp> = Vec::new();
    for u in unlearnt {
        let gone = unlocked.iter().filter(|o| **o == u.op).count();
        if count_like(held, &u.op).saturating_sub(gone) > u.held
            && unlock_unlearnt(client, key, u).is_ok()
        {
            unlocked.push(u.op);
        }
    }
}

/// One attempt of waiting lock `w`. Without a lock sequence but with a
/// count of its handle's locks taken first, a call that gives up is
/// resolved by the next count, so libfilter must not unlock its late
/// success: the count may already have answered the client SUCCESS
/// (review G, session 30).
fn lock_attempt(client: &libfilter::client::FilterClient, w: &Waiting) -> Result<(), ClientError> {
    match (w.sequence, w.held_before) {
        (None, Some(_)) => client.lock_outcome_learnt(w.key, w.ops.clone()),
        _ => client.lock(w.key, w.ops.clone(), w.sequence),
    }
}

/// Whether a call that failed with `e` may have been carried out.
fn outcome_unknown(e: &ClientError) -> bool {
    matches!(e, ClientError::Disconnected | ClientError::Timeout(_))
}

/// How many locks like the single lock of `ops` (range and kind) handle
/// `key` holds, by its record.
fn like_held(
    client: &libfilter::client::FilterClient,
    key: ResumeKey,
    ops: &[LockOp],
) -> Result<usize, ClientError> {
    let unexpected =
        || ClientError::Unexpected("not a single lock, or no handle in the reply".into());
    let [op] = ops else {
        return Err(unexpected());
    };
    match client.call(libfilter::proto::Request::Handle {
        key,
        learning: false,
    })? {
        (libfilter::proto::Reply::Handle(v), _) => Ok(count_like(&v.record.locks, op)),
        _ => Err(unexpected()),
    }
}

/// The handle, range and kind of the single lock of `ops`.
fn lock_like(key: ResumeKey, ops: &[LockOp]) -> Option<LockLike> {
    match ops {
        [op] if !op.unlock => Some((key, op.range, op.exclusive)),
        _ => None,
    }
}

/// How many of `held` have the range and kind of lock `op`.
fn count_like(held: &[libfilter::model::HeldLock], op: &LockOp) -> usize {
    let kind = if op.exclusive {
        libfilter::locks::LockKind::Exclusive
    } else {
        libfilter::locks::LockKind::Shared
    };
    held.iter()
        .filter(|l| l.range == op.range && l.kind == kind)
        .count()
}

/// Retries every waiting lock (an unlock or close on this connection may
/// have let any in); those granted or failed for good are answered (final
/// async response), the others keep waiting.
pub fn retry(c: &mut Connection) {
    attempt(c, true);
}

/// Retries the waiting locks due on the timer (see [`RETRY_MAX`]).
pub fn retry_due(c: &mut Connection) {
    attempt(c, false);
}

/// How long waiting locks wait for a reattach to be applied before they
/// look again ([`attempt`]).
const RESYNC_WAIT: Duration = Duration::from_millis(20);

/// [`retry`] of every waiting lock (`all`) or of those due.
fn attempt(c: &mut Connection, all: bool) {
    if c.waiting.is_empty() {
        return;
    }
    // Back on filterd, a reattach not applied yet may still make opens
    // lost (another rksmbd process reconnected their handles meanwhile):
    // nothing is tried until it is, and the lost ones are forgotten first
    // (their waiting locks end STATUS_FILE_CLOSED below), never granted
    // through a handle that is another connection's now (rvnode finding 3).
    if c.sh.filter.resync_pending() {
        let later = Instant::now() + RESYNC_WAIT;
        for w in c.waiting.list.iter_mut() {
            w.due = w.due.max(later);
        }
        return;
    }
    c.forget_closed_elsewhere();
    let now = Instant::now();
    // A lock whose request's connection is gone (the home's own socket
    // while channels keep the session, or a channel) has nobody to answer:
    // granted now it would be a lock its client was never told of, and a
    // replay of it on another channel would wait behind it for good. It
    // holds nothing, so it is dropped, as `lost` drops a connection's.
    // One whose last attempt's outcome is unknown is dropped once it is
    // settled (see `settle_dropped`); until filterd answers it stays.
    // A lock of a session another connection ended (PreviousSessionId)
    // is dropped too: its handles were detached for the client's new
    // session, which may reconnect them, and a retry granted now would
    // lock through the reconnected handle for a client never told
    // (review g1 of session 31). One filterd may have granted is settled
    // at that reconnect.
    let client = c.sh.filter.client();
    let mut dropped = Vec::new();
    for w in &c.waiting.list {
        if session_ended(c, w) {
            if let Some(u) = w.unlearnt(&c.waiting.granted) {
                c.sh.registry.unlearnt(w.key, u);
            }
            dropped.push(w.head.async_id);
        } else if !c.reaches(w.head.conn)
            && settle_dropped(&client, w, &c.waiting.granted) == Settled::Done
        {
            dropped.push(w.head.async_id);
        }
    }
    c.waiting
        .remove_where(|w| dropped.contains(&w.head.async_id));
    let unsettled: Vec<u64> = c
        .waiting
        .list
        .iter()
        .filter(|w| !c.reaches(w.head.conn))
        .map(|w| w.head.async_id)
        .collect();
    let mut done = Vec::new();
    let mut granted = Vec::new();
    for w in &mut c.waiting.list {
        // An orphan left to settle is never attempted: granted, it would
        // be a lock for nobody.
        if unsettled.contains(&w.head.async_id) {
            continue;
        }
        if !c.opens.contains_key(&w.open) {
            // Gone with its session (ended by another connection, its
            // handles detached): one filterd may have granted is settled
            // at the handle's reconnect (review g4).
            if let Some(u) = w.unlearnt(&c.waiting.granted) {
                c.sh.registry.unlearnt(w.key, u);
            }
            done.push((w.head.async_id, status::FILE_CLOSED));
            continue;
        }
        if !all && w.due > now {
            continue;
        }
        w.due = now + w.every;
        w.every = w.every.saturating_mul(2).min(RETRY_MAX);
        if w.sequence.is_none() {
            // Without a lock sequence filterd cannot tell a replay: a
            // retry granted and recorded just before filterd was killed
            // (its reply lost) would, sent again, conflict with itself
            // for good (review, session 27). So each attempt is preceded
            // by a count of the handle's locks like it, and after an
            // attempt whose outcome is unknown one more means granted.
            let like = lock_like(w.key, &w.ops);
            let seen = like
                .and_then(|l| c.waiting.granted.get(&l))
                .copied()
                .unwrap_or(0);
            let others =
                usize::try_from(seen.saturating_sub(w.grants_before)).unwrap_or(usize::MAX);
            let baseline = match like_held(&client, w.key, &w.ops) {
                Ok(now)
                    if w.uncertain
                        && w.held_before
                            .is_some_and(|b| now > b.saturating_add(others)) =>
                {
                    w.uncertain = false;
                    granted.push((w.open, w.local));
                    done.push((w.head.async_id, status::SUCCESS));
                    if let Some(l) = like {
                        *c.waiting.granted.entry(l).or_default() += 1;
                    }
                    continue;
                }
                Ok(now) => Some(now),
                // filterd away: no attempt now; ask again next time.
                Err(e) if outcome_unknown(&e) => continue,
                // Not known (the handle is gone): the attempt says.
                Err(_) => None,
            };
            w.uncertain = false;
            w.held_before = baseline;
            w.grants_before = seen;
            if w.cancelled && w.unknown {
                // Known now not to be granted: the CANCEL stands.
                done.push((w.head.async_id, status::CANCELLED));
                continue;
            }
        }
        match lock_attempt(&client, w) {
            Ok(()) => {
                granted.push((w.open, w.local));
                done.push((w.head.async_id, status::SUCCESS));
                if let Some(l) = lock_like(w.key, &w.ops) {
                    *c.waiting.granted.entry(l).or_default() += 1;
                }
            }
            Err(e)
                if keeps_waiting(&e)
                    && !(w.immediate && e.code() == Some(ErrorCode::LockNotGranted)) =>
            {
                w.unknown = outcome_unknown(&e);
                w.uncertain = w.sequence.is_none() && w.unknown;
                if w.cancelled && !w.unknown {
                    done.push((w.head.async_id, status::CANCELLED));
                }
            }
            Err(e) => done.push((w.head.async_id, status_on_open(&e))),
        }
    }
    for (open, local) in granted {
        record_local(c, open, local);
    }
    // Kept only for locks like one still waiting (bounded by the list).
    let list = &c.waiting.list;
    c.waiting
        .granted
        .retain(|l, _| list.iter().any(|w| lock_like(w.key, &w.ops) == Some(*l)));
    for (id, st) in done {
        for w in c.waiting.remove_where(|w| w.head.async_id == id) {
            c.finish_async(&w.head, st, &LOCK_RESPONSE);
        }
    }
}

/// CANCEL (3.3.5.16) of a waiting lock, named by AsyncId (an async
/// CANCEL) or MessageId: it ends with STATUS_CANCELLED. A CANCEL that
/// names nothing waiting is ignored (it gets no response either way).
pub fn cancel(c: &mut Connection, req: &Request<'_>) {
    let hdr = &req.hdr;
    let origin = c.origin();
    // One whose last attempt's outcome is unknown waits for the truth.
    for w in c.waiting.list.iter_mut() {
        if w.unknown && w.head.cancelled_by(hdr, origin) {
            w.cancelled = true;
        }
    }
    let gone = c
        .waiting
        .remove_where(|w| !w.unknown && w.head.cancelled_by(hdr, origin));
    for w in gone {
        c.finish_async(&w.head, status::CANCELLED, &LOCK_RESPONSE);
    }
}

/// Open `open` is being closed: its waiting locks end with
/// STATUS_RANGE_NOT_LOCKED (what Windows answers).
pub fn open_closing(c: &mut Connection, open: u64) {
    if c.waiting.is_empty() {
        return;
    }
    for w in c.waiting.remove_where(|w| w.open == open) {
        c.finish_async(&w.head, status::RANGE_NOT_LOCKED, &LOCK_RESPONSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Writer;

    fn element(w: &mut Writer, offset: u64, length: u64, flags: u32) {
        w.u64(offset).u64(length).u32(flags).u32(0);
    }

    /// A waiting lock whose retry's outcome is unknown is taken as granted
    /// when its handle holds one more lock of its range and kind than when
    /// it began to wait — a shared lock beside one the handle had already
    /// counts, one of another kind or range does not.
    #[test]
    fn locks_like_a_waiting_one_are_counted_by_range_and_kind() {
        use libfilter::locks::LockKind;
        use libfilter::model::HeldLock;
        let range = |offset| LockRange { offset, length: 10 };
        let held = |offset, kind| HeldLock {
            range: range(offset),
            kind,
        };
        let op = |exclusive| LockOp {
            range: range(10),
            exclusive,
            unlock: false,
        };
        let table = [
            held(10, LockKind::Shared),
            held(10, LockKind::Shared),
            held(10, LockKind::Exclusive),
            held(20, LockKind::Shared),
        ];
        assert_eq!(count_like(&table, &op(false)), 2);
        assert_eq!(count_like(&table, &op(true)), 1);
        assert_eq!(count_like(&table[3..], &op(true)), 0);
    }

    #[test]
    fn lock_elements_follow_the_rules() {
        let mut w = Writer::new();
        element(&mut w, 0, 10, EXCLUSIVE | FAIL_IMMEDIATELY);
        element(&mut w, 10, 10, SHARED | FAIL_IMMEDIATELY);
        let d = decode(&mut Reader::new(&w.0), 2).unwrap();
        assert_eq!(d.ops.len(), 2);
        assert!(d.ops[0].exclusive && !d.ops[1].exclusive && !d.blocking);

        let mut w = Writer::new();
        element(&mut w, 0, 10, EXCLUSIVE);
        element(&mut w, 10, 10, EXCLUSIVE);
        assert_eq!(
            decode(&mut Reader::new(&w.0), 2).err(),
            Some(status::INVALID_PARAMETER),
            "two blocking locks"
        );
        let mut w = Writer::new();
        element(&mut w, 0, 10, SHARED | FAIL_IMMEDIATELY);
        element(&mut w, 0, 10, UNLOCK);
        assert!(
            decode(&mut Reader::new(&w.0), 2).is_err(),
            "lock and unlock mixed"
        );
        // Unlocks go in order up to the first bad element.
        let mut w = Writer::new();
        element(&mut w, 0, 10, UNLOCK);
        element(&mut w, 0, 10, SHARED | FAIL_IMMEDIATELY);
        let d = decode(&mut Reader::new(&w.0), 2).unwrap();
        assert_eq!(
            (d.ops.len(), d.bad_tail),
            (1, Some(status::INVALID_PARAMETER))
        );
        // Ranges past 64 bits.
        let mut w = Writer::new();
        element(&mut w, u64::MAX, 2, EXCLUSIVE | FAIL_IMMEDIATELY);
        assert_eq!(
            decode(&mut Reader::new(&w.0), 1).err(),
            Some(status::INVALID_LOCK_RANGE)
        );
        let mut w = Writer::new();
        element(&mut w, u64::MAX, 1, EXCLUSIVE | FAIL_IMMEDIATELY);
        assert!(decode(&mut Reader::new(&w.0), 1).is_ok(), "the last byte");
        let mut w = Writer::new();
        element(&mut w, 0, 10, SHARED | EXCLUSIVE);
        assert!(decode(&mut Reader::new(&w.0), 1).is_err());
        assert!(decode(&mut Reader::new(&[]), 0).is_err());
        assert!(decode(&mut Reader::new(&[0; 10]), 1).is_err(), "truncated");
    }
}
