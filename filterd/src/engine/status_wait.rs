//! `status` while commits are pending (review rvslowetcd finding 3).
//!
//! A status reply shows every handle, so it waits for every commit
//! pending when it arrives (`depends_on_all`): it never shows state whose
//! commit may still fail. With the store stalled (etcd without quorum,
//! all members stopped) that wait lasted until the lease check gave up,
//! and `filterctl status` timed out exactly when an operator needed it.
//! Now the wait is bounded ([`STATUS_COMMIT_WAIT_MS`]): past it the parked
//! reply is taken back ([`crate::committer::Pipeline::withdraw`]) and the
//! request answered with durable counts — of the last moment nothing was
//! pending, or, under a load that always has commits pending, taken at a
//! moment whose commits have all resolved since (attack45b N2) — and
//! [`CommitWait`] saying so: how long commits have been pending, how
//! many replies wait behind them, how old the counts are.
//!
//! The listings `handles`, `files` and `locks` are bounded alike when the
//! request asks for it (`durable_ok`: filterctl's listings; re-review
//! rr43a F1 — a frontend's or library caller's listing waits for every
//! pending commit, as before, since it acts on the list being complete).
//! Past the bound they list only what is durable now: everything but the
//! files a pending commit changes, with all their handles and locks
//! ([`Engine::pending_changes`]; no stale copy of each record is kept, so
//! their durable state is not known apart from the pending one), which
//! are left out and counted in their [`CommitWait`]. The bound is the
//! listing's, not each page's (rr43a F4): a page that arrives once commits
//! have been pending for the bound with none resolving
//! ([`StatusWaits::stuck_since_ms`]) is answered at the end of its round,
//! so a long listing during a stall takes about the bound, not the bound
//! per page; and so is a `durable_ok` page on a connection an earlier
//! page was answered on with what is durable, while a commit given out by
//! then is still pending (rr43d G3: a slow store whose commits still
//! resolve). `frontends` counts each instance's stored handles, which
//! pending commits change; past the bound, asked with `durable_ok`
//! (filterctl's), it is answered with the rows
//! taken with the durable counts, as `status` is — at a round's edge with
//! nothing pending, or with commits pending and kept once those resolve —
//! and [`CommitWait`] saying how old they are (`counts_age_ms`). Before,
//! it was refused (`Busy`) past the bound, and under a load that always
//! has a commit pending, one resolving every second or so, it was refused
//! every time. The rows are taken only while someone looks at `frontends`
//! (a pass over every handle): the first `frontends` of a stalled store
//! finds none and is refused (`Busy`, saying why), never left hanging.
//! Without `durable_ok` (an older filterctl, a library caller, none of
//! which reads `commit_wait`) it is refused past the bound, as before, and
//! takes no rows (re-review rr47a F2: they got older rows unmarked). A
//! bounded wait takes back its
//! own parked reply by a token the engine gave it, never by the request
//! id, which is the peer's (rr43a F6, rr44a F1).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use libfilter::model::{FileId, ResumeKey};
use libfilter::proto::{
    CommitWait, ErrorCode, FrontendView, LockCursor, Reply, Request, ServerFrame, StatusInfo,
    WireError,
};

use super::{err, mono_ms, ConnId, Engine};
use crate::outbox::ConnWriter;

/// How long a `status` waits for the commits pending at its arrival
/// before it answers with what is durable.
pub(super) const STATUS_COMMIT_WAIT_MS: u64 = 1000;

/// How often, at most, the durable counts are taken again (a pass over
/// every handle) after commits, and while none came (non-persistent
/// handles change without one).
const COUNTS_REFRESH_MS: u64 = 250;
const COUNTS_IDLE_REFRESH_MS: u64 = 1000;

/// For how long after a `status` the durable counts are kept fresh: a
/// pass over every handle is engine time (1–5 ms at 100k handles), spent
/// only while someone is looking (re-review rr42d: it ran every 250 ms
/// under load whether or not anyone ever asked). Before the first
/// status, and after this long without one, they are taken once more at
/// most, and their age says how old they are.
const COUNTS_WATCHED_MS: u64 = 60_000;

/// What `status` counts, taken at the end of an engine round with nothing
/// pending.
#[derive(Clone)]
struct DurableCounts {
    connected: u64,
    disconnected: u64,
    lost: u64,
    frontends: u64,
    /// The `frontends` rows, taken while someone looks at `frontends`
    /// ([`StatusWaits::frontends_watched_until_ms`]; `None` otherwise).
    rows: Option<Arc<Vec<FrontendView>>>,
    /// When (monotonic ms).
    at_ms: u64,
    /// The newest commit sequence then.
    last_seq: u64,
}

/// A request whose wait for pending commits is bounded: `status` and the
/// listings.
#[derive(Clone, Copy)]
pub(super) enum Bounded {
    Status,
    /// With `durable_ok`, answered with the rows taken with the durable
    /// counts past the bound, refused if none were; without, refused.
    Frontends {
        durable_ok: bool,
    },
    /// Answered with what is durable past the bound.
    Listing(Listing),
}

/// A listing page answered from durable state past its bound.
#[derive(Clone, Copy)]
pub(super) enum Listing {
    Handles {
        after: Option<ResumeKey>,
    },
    Files {
        after: Option<FileId>,
        holders_after: Option<ResumeKey>,
    },
    Locks {
        after: Option<FileId>,
        locks_after: Option<LockCursor>,
    },
}

impl Bounded {
    /// `req`'s bounded wait, if it has one: a listing only if it takes
    /// durable state (`durable_ok`); without, it waits for every commit
    /// pending at it.
    pub(super) fn of(req: &Request) -> Option<Bounded> {
        Some(match *req {
            Request::Status => Bounded::Status,
            Request::Frontends { durable_ok } => Bounded::Frontends { durable_ok },
            Request::Handles {
                after,
                durable_ok: true,
            } => Bounded::Listing(Listing::Handles { after }),
            Request::Files {
                after,
                holders_after,
                durable_ok: true,
            } => Bounded::Listing(Listing::Files {
                after,
                holders_after,
            }),
            Request::Locks {
                after,
                locks_after,
                durable_ok: true,
            } => Bounded::Listing(Listing::Locks { after, locks_after }),
            _ => return None,
        })
    }
}

/// A status or listing parked behind pending commits.
pub(super) struct Waiting {
    pub(super) writer: Arc<ConnWriter>,
    pub(super) conn: ConnId,
    pub(super) id: u64,
    /// Its parked reply's mark ([`crate::committer::Deferred::token`]).
    pub(super) token: u64,
    pub(super) seq: u64,
    pub(super) arrived_ms: u64,
    pub(super) what: Bounded,
}

/// The engine's state for bounded status and listing waits.
#[derive(Default)]
pub(super) struct StatusWaits {
    waiting: Vec<Waiting>,
    counts: Option<DurableCounts>,
    /// Counts taken while commits were pending, with the newest sequence
    /// given out then: durable once that sequence resolves, and then
    /// `counts` (attack45b N2: under a load that never leaves nothing
    /// pending — a slow disk with creates always in flight — the counts
    /// were never taken again, and `status` past its bound showed counts
    /// 20 s old, missing every handle acknowledged since). Dropped when a
    /// commit fails ([`Engine::roll_back`] undoes what they counted).
    candidate: Option<DurableCounts>,
    /// Since when commits have been pending without a break (monotonic ms).
    pending_since_ms: Option<u64>,
    /// Since when commits have been pending with none resolving
    /// (monotonic ms): the later of `pending_since_ms` and the last round
    /// that saw the committed sequence move. Under a steady load commits
    /// are always pending but keep resolving: this stays recent there, and
    /// grows only while the store is stalled or slow.
    stuck_since_ms: Option<u64>,
    /// The committed sequence `stuck_since_ms` was taken at.
    stuck_at_seq: u64,
    /// Connections a listing page was answered on with what is durable,
    /// and the newest sequence given out then. Until it resolves the store
    /// has not caught up with what was pending when that page was
    /// answered, and later `durable_ok` listing pages on the connection
    /// are answered at once (re-review rr43d G3: a slow store whose
    /// commits still resolve, one every second or so, kept
    /// `stuck_since_ms` recent, and each page waited a bound of its own).
    /// An entry goes once its sequence resolves or its connection closes.
    behind: HashMap<ConnId, u64>,
    /// The last token given to a bounded wait.
    last_token: u64,
    /// Until when the counts are kept fresh ([`COUNTS_WATCHED_MS`] after
    /// the last status or `frontends`; monotonic ms).
    watched_until_ms: u64,
    /// Until when the `frontends` rows are taken with them
    /// ([`COUNTS_WATCHED_MS`] after the last `frontends`; monotonic ms).
    frontends_watched_until_ms: u64,
}

impl StatusWaits {
    /// A new bounded wait's token.
    pub(super) fn next_token(&mut self) -> u64 {
        self.last_token = self.last_token.wrapping_add(1);
        self.last_token
    }

    /// A commit failed and what it did was undone: counts taken since it
    /// was given out counted that.
    pub(super) fn rolled_back(&mut self) {
        self.candidate = None;
    }

    /// Connection `conn` closed.
    pub(super) fn closed(&mut self, conn: ConnId) {
        self.behind.remove(&conn);
    }

    /// The waits of `tokens`, their replies taken back to be run again
    /// (`rebuild`): forgotten, in one pass. The arrival of each (monotonic
    /// ms, by token), which the wait of its run again keeps.
    pub(super) fn forget(&mut self, tokens: &HashSet<u64>) -> HashMap<u64, u64> {
        let mut arrived = HashMap::new();
        self.waiting.retain(|w| {
            let gone = tokens.contains(&w.token);
            if gone {
                arrived.insert(w.token, w.arrived_ms);
            }
            !gone
        });
        arrived
    }

    /// The wait begun last, if the request just run began one (a view run
    /// again, `rebuild`), arrived at `arrived_ms`: its bound runs from
    /// the request's first arrival, not from its run again.
    pub(super) fn arrived_at(&mut self, arrived_ms: u64) {
        let last = self.last_token;
        if let Some(w) = self.waiting.last_mut().filter(|w| w.token == last) {
            w.arrived_ms = w.arrived_ms.min(arrived_ms);
        }
    }
}

impl Engine {
    /// The counts `status` shows: handles by connection state, frontends.
    pub(super) fn status_counts(&self) -> (u64, u64, u64, u64) {
        let (mut connected, mut disconnected, mut lost) = (0u64, 0u64, 0u64);
        for h in self.handles.values() {
            match h.rec.conn {
                super::ConnState::Connected => connected += 1,
                super::ConnState::Disconnected { .. } => disconnected += 1,
                super::ConnState::Lost => lost += 1,
            }
        }
        (connected, disconnected, lost, self.instances.len() as u64)
    }

    /// A status or listing request was answered: if its reply is parked
    /// behind pending commits, it is answered at the latest
    /// [`STATUS_COMMIT_WAIT_MS`] from now.
    /// A status or `frontends` answered at once refreshes the durable
    /// counts (what it showed is durable).
    pub(super) fn bound_commit_wait(
        &mut self,
        conn: ConnId,
        writer: &Arc<ConnWriter>,
        id: u64,
        what: Bounded,
        token: u64,
    ) {
        // A `frontends` that takes no durable rows has no use for them.
        let rows = matches!(what, Bounded::Frontends { durable_ok: true });
        let status = rows || matches!(what, Bounded::Status);
        if status {
            self.status_waits.watched_until_ms = mono_ms().saturating_add(COUNTS_WATCHED_MS);
        }
        if rows {
            self.status_waits.frontends_watched_until_ms =
                mono_ms().saturating_add(COUNTS_WATCHED_MS);
        }
        self.note_stuck(mono_ms());
        if let Some(seq) = self.request_waits_for() {
            self.status_waits.waiting.push(Waiting {
                writer: writer.clone(),
                conn,
                id,
                token,
                seq,
                arrived_ms: mono_ms(),
                what,
            });
        } else if status {
            self.note_durable_counts(mono_ms(), true);
        }
    }

    /// Takes the durable counts if nothing is pending and they are due
    /// (`force`: whenever nothing is pending). Called as each engine round
    /// starts and ends.
    pub(super) fn note_durable_counts(&mut self, now: u64, force: bool) {
        self.note_stuck(now);
        let last = self.last_seq();
        let watched = now < self.status_waits.watched_until_ms;
        if !self.nothing_pending() {
            if self.status_waits.pending_since_ms.is_none() {
                self.status_waits.pending_since_ms = Some(now);
            }
            self.note_candidate_counts(now, last, watched);
            return;
        }
        self.status_waits.pending_since_ms = None;
        self.status_waits.candidate = None;
        let rows = self.frontends_watched(now);
        let due = self.status_waits.counts.as_ref().is_none_or(|c| {
            let age = now.saturating_sub(c.at_ms);
            (rows && c.rows.is_none())
                || watched
                    && ((c.last_seq != last && age >= COUNTS_REFRESH_MS)
                        || age >= COUNTS_IDLE_REFRESH_MS)
        });
        if force || due {
            self.status_waits.counts = Some(self.counts_now(now, last));
        }
    }

    /// With commits pending: the candidate counts become the durable ones
    /// once what was given out when they were taken has resolved (a failed
    /// commit dropped them first), and, while someone looks at `status`
    /// and the durable counts are due, new ones are taken, to be durable
    /// once `last` resolves. So under a steady load the counts lag by a
    /// commit's latency, not for as long as the load lasts.
    ///
    /// The same for the `frontends` rows while someone looks at
    /// `frontends`: a candidate taken without them gives way to one with
    /// them.
    fn note_candidate_counts(&mut self, now: u64, last: u64, watched: bool) {
        let committed = self.pipe.committed();
        let rows = self.frontends_watched(now);
        let w = &mut self.status_waits;
        if w.candidate
            .as_ref()
            .is_some_and(|c| c.last_seq <= committed)
        {
            w.counts = w.candidate.take();
        }
        if rows && w.candidate.as_ref().is_some_and(|c| c.rows.is_none()) {
            w.candidate = None;
        }
        let due = w.counts.as_ref().is_none_or(|c| {
            now.saturating_sub(c.at_ms) >= COUNTS_REFRESH_MS || (rows && c.rows.is_none())
        });
        if watched && due && w.candidate.is_none() {
            self.status_waits.candidate = Some(self.counts_now(now, last));
        }
    }

    /// Whether someone looked at `frontends` lately: its rows are then
    /// taken with the durable counts.
    fn frontends_watched(&self, now: u64) -> bool {
        now < self.status_waits.frontends_watched_until_ms
    }

    /// The counts of the handles in memory now, `last` the newest
    /// sequence given out.
    fn counts_now(&self, now: u64, last: u64) -> DurableCounts {
        let (connected, disconnected, lost, frontends) = self.status_counts();
        DurableCounts {
            connected,
            disconnected,
            lost,
            frontends,
            rows: self
                .frontends_watched(now)
                .then(|| Arc::new(self.frontends())),
            at_ms: now,
            last_seq: last,
        }
    }

    /// Keeps [`StatusWaits::stuck_since_ms`]: since when commits have
    /// been pending with none resolving, as of `now`.
    fn note_stuck(&mut self, now: u64) {
        if self.nothing_pending() {
            self.status_waits.stuck_since_ms = None;
            self.status_waits.behind.clear();
            return;
        }
        let committed = self.pipe.committed();
        let w = &mut self.status_waits;
        if w.stuck_since_ms.is_none() || w.stuck_at_seq != committed {
            w.stuck_since_ms = Some(now);
            w.stuck_at_seq = committed;
        }
    }

    /// When `w`'s wait ends (monotonic ms): its bound after it arrived —
    /// a listing's sooner, the bound after commits got stuck, when that
    /// was before it arrived (an earlier page already waited for them),
    /// and at once when an earlier page on its connection was answered
    /// with what is durable and what was pending then still is.
    fn due_ms(&self, w: &Waiting) -> u64 {
        let behind = self.status_waits.behind.get(&w.conn);
        if matches!(w.what, Bounded::Listing(_))
            && behind.is_some_and(|&seq| seq > self.pipe.committed())
        {
            return w.arrived_ms;
        }
        let from = match (w.what, self.status_waits.stuck_since_ms) {
            (Bounded::Listing(_), Some(stuck)) => stuck.min(w.arrived_ms),
            _ => w.arrived_ms,
        };
        from.saturating_add(STATUS_COMMIT_WAIT_MS)
    }

    /// When the first bounded status wait ends (monotonic ms).
    pub(super) fn next_status_due(&self) -> Option<u64> {
        self.status_waits
            .waiting
            .iter()
            .map(|w| self.due_ms(w))
            .min()
    }

    /// At the end of each engine round: takes the durable counts when
    /// nothing is pending, and answers the status and listing requests
    /// whose bound passed with what is durable.
    pub(super) fn status_waits_due(&mut self, now: u64) {
        self.note_durable_counts(now, false);
        if self.status_waits.waiting.is_empty() {
            return;
        }
        let committed = self.pipe.committed();
        self.status_waits.behind.retain(|_, seq| *seq > committed);
        let waiting = std::mem::take(&mut self.status_waits.waiting);
        for w in waiting {
            if w.seq <= committed {
                // Resolved: the pipeline sent the reply (or failed it).
                continue;
            }
            if now < self.due_ms(&w) {
                self.status_waits.waiting.push(w);
                continue;
            }
            if self.pipe.withdraw(w.seq, &w.writer, w.token).is_some() {
                // Answered: nothing to run again (rr45g F1).
                self.views.remove(w.token);
                self.answer_durably(&w, now);
            }
        }
    }

    /// Answers `w` with what is durable now, its wait over: past its
    /// bound, or (`rebuild`) its commits failed again while others are
    /// pending. A listing's connection is then behind what is pending.
    pub(super) fn answer_durably(&mut self, w: &Waiting, now: u64) {
        if matches!(w.what, Bounded::Listing(_)) {
            let newest = self.last_seq().max(w.seq);
            self.status_waits.behind.insert(w.conn, newest);
        }
        let result = self.durable_answer(w, now);
        let frame = ServerFrame::Reply {
            id: Some(w.id),
            result,
        };
        w.writer.send_frame(&frame, None);
    }

    /// The answer to `w`, whose bound passed: what is durable, and what
    /// it did not wait for.
    fn durable_answer(&self, w: &Waiting, now: u64) -> Result<Reply, WireError> {
        let wait = self.commit_wait(now, now.saturating_sub(w.arrived_ms));
        match w.what {
            Bounded::Status => Ok(Reply::Status(self.durable_status(wait))),
            Bounded::Listing(l) => Ok(self.durable_listing(w.conn, l, wait)),
            Bounded::Frontends { durable_ok: true } => self.durable_frontends(wait),
            Bounded::Frontends { durable_ok: false } => Err(err(
                ErrorCode::Busy,
                format!(
                    "commits have been pending for {} ms (the store is stalled or slow): \
                     the frontends listing counts stored handles, which they change, and \
                     is not answered from durable state unless asked with `durable_ok`; \
                     `status` shows the durable frontend count",
                    wait.pending_for_ms
                ),
            )),
        }
    }

    /// Whether `frontends` rows were taken with the durable counts: a
    /// `frontends` answered with what is durable gets them.
    pub(super) fn durable_frontends_taken(&self) -> bool {
        self.status_waits
            .counts
            .as_ref()
            .is_some_and(|c| c.rows.is_some())
    }

    /// `frontends` with the rows taken with the durable counts, and what
    /// it did not wait for (`counts_age_ms`: how old the rows are);
    /// refused when none were taken (commits pending, none resolving,
    /// since the first `frontends`).
    fn durable_frontends(&self, wait: CommitWait) -> Result<Reply, WireError> {
        let Some(rows) = self
            .status_waits
            .counts
            .as_ref()
            .and_then(|c| c.rows.clone())
        else {
            return Err(err(
                ErrorCode::Busy,
                format!(
                    "commits have been pending for {} ms (the store is stalled or slow): \
                     the frontends listing counts stored handles, which they change, and \
                     its durable state was not taken yet (it is from the first `frontends` \
                     on, once commits resolve); `status` shows the durable frontend count",
                    wait.pending_for_ms
                ),
            ));
        };
        let mut reply = super::frontends_reply(rows.as_ref().clone());
        if let Reply::Frontends { commit_wait, .. } = &mut reply {
            *commit_wait = Some(wait);
        }
        Ok(reply)
    }

    /// A listing page of what is durable now: the files and handles
    /// pending commits change left out, and counted in `wait`.
    fn durable_listing(&self, conn: ConnId, listing: Listing, mut wait: CommitWait) -> Reply {
        let durable = self.pending_changes();
        let in_memory = self.handles.values().filter(|h| durable.changes(&h.rec));
        let removed = durable
            .keys
            .iter()
            .filter(|k| !self.handles.contains_key(k));
        // The rows listed are durable as of now.
        wait.counts_age_ms = Some(0);
        wait.handles_left_out = Some((in_memory.count() + removed.count()) as u64);
        wait.files_left_out = Some(durable.files.len() as u64);
        let mut reply = match listing {
            Listing::Handles { after } => self.handles_page(after, Some(&durable)),
            Listing::Files {
                after,
                holders_after,
            } => self.files_page(conn, after, holders_after, Some(&durable)),
            Listing::Locks { after, locks_after } => {
                self.locks_page(conn, after, locks_after, Some(&durable))
            }
        };
        if let Reply::Handles { commit_wait, .. }
        | Reply::Files { commit_wait, .. }
        | Reply::Locks { commit_wait, .. } = &mut reply
        {
            *commit_wait = Some(wait);
        }
        reply
    }

    /// What an answer that did not wait for the pending commits says of
    /// them (`counts_age_ms`: of `status`'s durable counts).
    fn commit_wait(&self, now: u64, waited_ms: u64) -> CommitWait {
        CommitWait {
            waited_ms,
            pending_for_ms: self
                .status_waits
                .pending_since_ms
                .map_or(0, |t| now.saturating_sub(t)),
            replies_awaiting_commit: self.pipe.replies_waiting() as u64,
            counts_age_ms: self
                .status_waits
                .counts
                .as_ref()
                .map(|c| now.saturating_sub(c.at_ms)),
            handles_left_out: None,
            files_left_out: None,
        }
    }

    /// `status` with the durable counts and what it did not wait for.
    fn durable_status(&self, wait: CommitWait) -> StatusInfo {
        let mut s = self.status();
        let c = self.status_waits.counts.as_ref();
        s.handles_connected = c.map_or(0, |c| c.connected);
        s.handles_disconnected = c.map_or(0, |c| c.disconnected);
        s.handles_lost = c.map_or(0, |c| c.lost);
        s.frontends = c.map_or(0, |c| c.frontends);
        s.commit_wait = Some(wait);
        s
    }
}
