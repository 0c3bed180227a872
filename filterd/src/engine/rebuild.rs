//! Replies to requests that changed nothing, rebuilt after a failed commit
//! (attack45 F2).
//!
//! A view — `status`, a listing (`handles`, `files`, `locks`,
//! `frontends`), one handle, a recorded reply looked up or listed, a
//! `CheckIo` — changes nothing, but its reply shows state that pending
//! commits hold, so it is parked behind them (invariant 1). When one of
//! those commits fails, the reply shows what the rollback took back and
//! must not go out as it is. Refused with the commit's error as before,
//! an operator's `filterctl status`, `handles`, `files`, `locks`, `leases`
//! and `frontends` exited 1 with `DiskFull` exactly while other clients
//! filled the store, and a frontend's view of a handle or check of a read
//! failed for another client's change: answered as if they had changed
//! something.
//!
//! So the engine keeps each such request while its reply is parked
//! ([`ParkedViews`]). When a commit fails, before the committer settles
//! the failure, it takes back the parked replies that show an abandoned
//! sequence ([`crate::committer::Pipeline::withdraw_all`], by a token of
//! the engine's, never the peer's request id; all in one pass over each
//! sequence's replies), and once the rollback is done runs those requests
//! again on the state as it is now: answered at once if nothing is
//! pending any more (what the engine holds is then durable), or parked
//! again behind what still is — a status or listing still within the
//! bound of its first arrival ([`super::status_wait`]). A request that
//! changed something still fails with its commit.
//!
//! A view is run again once only (re-review rr45g F2: run again on every
//! failure, a complete listing behind commits that kept failing was never
//! answered, and each failure ran every such view again, while a client
//! able to fill the store could keep them failing). Taken back a second
//! time while a commit that may still fail is pending, it is answered
//! without waiting: a status or `durable_ok` listing with what is
//! durable, as past its bound; any other view (a complete listing,
//! `frontends`, `Handle`, `LookupReply`, `ListRecords`, `CheckIo`) is
//! refused `Busy`, saying why, for its caller to retry. So each view costs
//! at most two runs, however many commits fail.
//!
//! A status or listing shows everything pending when it arrived, not only
//! the newest sequence it waits for: it is rebuilt when any sequence up to
//! that one was abandoned (a failed group below a later one that committed
//! left it showing what was rolled back). A view of one file or scope
//! (`Handle`, `LookupReply`, `ListRecords`, `CheckIo`) shows only that
//! file's or scope's sequence, and is rebuilt only when that one was
//! abandoned (re-review rr45g F3: rebuilt otherwise, it showed nothing
//! rolled back, and its run again counted a replay or check twice, the
//! first count standing with its sequence). A `CheckIo` rebuilt was
//! forgotten in flight by the rollback (`Engine::checked_io_abandoned`),
//! which the run again counts anew; it is never rebuilt once its frontend
//! gave up on it (`IoDone`), as no second `IoDone` would come.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use libfilter::proto::{ErrorCode, Request, ServerFrame};

use super::status_wait::{Bounded, Waiting};
use super::{err, mono_ms, ConnId, Engine};
use crate::outbox::ConnWriter;

/// Whether `req` changes nothing, so that a reply of it parked behind a
/// commit that fails is rebuilt rather than refused. `Stats` is answered
/// at once from what is durable, never parked.
pub(super) fn changes_nothing(req: &Request) -> bool {
    matches!(
        req,
        Request::Status
            | Request::Handles { .. }
            | Request::Files { .. }
            | Request::Frontends { .. }
            | Request::Locks { .. }
            | Request::Handle { .. }
            | Request::LookupReply { .. }
            | Request::ListRecords { .. }
            | Request::CheckIo { .. }
    )
}

/// Whether view `req` shows everything pending when it arrived (a status
/// or listing), not only the sequence of its file or scope.
fn shows_all(req: &Request) -> bool {
    !matches!(
        req,
        Request::Handle { .. }
            | Request::LookupReply { .. }
            | Request::ListRecords { .. }
            | Request::CheckIo { .. }
    )
}

/// A request that changed nothing, its reply parked behind sequence `seq`.
pub(super) struct ParkedView {
    conn: ConnId,
    writer: Arc<ConnWriter>,
    id: u64,
    req: Request,
    /// Its parked reply's mark ([`crate::committer::Deferred::token`]).
    token: u64,
    seq: u64,
    /// It is a run again: not run a third time ([`Engine::rebuild_views`]).
    again: bool,
}

/// The requests that changed nothing whose replies are parked, by token
/// (given out in the order they arrived); each goes once its reply is
/// sent or answered another way: its sequence resolved, its bound passed
/// (a status or listing, [`super::status_wait`]), its connection closed,
/// (a `CheckIo`) its `IoDone` came, or it was taken back to run again.
/// Indexed by sequence and by check, so that what runs on every flush and
/// every `IoDone` does not scan them all (re-review rr45g F1: entries
/// answered by their bound stayed, and grew without bound while a commit
/// was stalled).
#[derive(Default)]
pub(super) struct ParkedViews {
    parked: BTreeMap<u64, ParkedView>,
    /// (sequence, token) of each.
    by_seq: BTreeSet<(u64, u64)>,
    /// The tokens of the `CheckIo`s of each (connection, check id).
    checks: HashMap<(ConnId, u64), Vec<u64>>,
    /// The request being run is a view run again.
    running_again: bool,
}

impl ParkedViews {
    fn insert(&mut self, v: ParkedView) {
        self.by_seq.insert((v.seq, v.token));
        if matches!(v.req, Request::CheckIo { .. }) {
            self.checks.entry((v.conn, v.id)).or_default().push(v.token);
        }
        self.parked.insert(v.token, v);
    }

    /// The view of token `token` was answered another way (past its
    /// bound, taken back): forgotten.
    pub(super) fn remove(&mut self, token: u64) -> Option<ParkedView> {
        let v = self.parked.remove(&token)?;
        self.by_seq.remove(&(v.seq, token));
        if matches!(v.req, Request::CheckIo { .. }) {
            if let Some(tokens) = self.checks.get_mut(&(v.conn, v.id)) {
                tokens.retain(|t| *t != token);
                if tokens.is_empty() {
                    self.checks.remove(&(v.conn, v.id));
                }
            }
        }
        Some(v)
    }

    /// Connection `conn` closed: nothing of it is run again.
    pub(super) fn closed(&mut self, conn: ConnId) {
        let gone: Vec<u64> = self
            .parked
            .values()
            .filter(|v| v.conn == conn)
            .map(|v| v.token)
            .collect();
        for token in gone {
            self.remove(token);
        }
    }

    /// The `IoDone` of `CheckIo` `check` of `conn` came: its frontend
    /// gave up waiting, and a run again would count an I/O in flight that
    /// no `IoDone` ends.
    pub(super) fn gave_up(&mut self, conn: ConnId, check: u64) {
        for token in self.checks.remove(&(conn, check)).unwrap_or_default() {
            self.remove(token);
        }
    }

    /// Sequences up to `committed` are resolved: what waited for them went.
    pub(super) fn resolved(&mut self, committed: u64) {
        let kept = self.by_seq.split_off(&(committed.saturating_add(1), 0));
        for (_, token) in std::mem::replace(&mut self.by_seq, kept) {
            self.remove(token);
        }
    }

    /// How many are kept (the unit tests' measure).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        debug_assert_eq!(self.parked.len(), self.by_seq.len());
        self.parked.len()
    }
}

/// A view taken back from the pipeline, to run again after the rollback.
pub(super) struct Withdrawn {
    conn: ConnId,
    id: u64,
    req: Request,
    token: u64,
    /// When a status or listing first arrived (its bound runs from then).
    arrived_ms: Option<u64>,
    /// It was a run again already.
    again: bool,
}

impl Engine {
    /// The current request changed nothing (`changes_nothing`) and was
    /// answered with token `token`: kept while its reply is parked.
    pub(super) fn view_answered(
        &mut self,
        conn: ConnId,
        writer: &Arc<ConnWriter>,
        id: u64,
        req: Request,
        token: u64,
    ) {
        if let Some(seq) = self.request_waits_for() {
            self.views.insert(ParkedView {
                conn,
                writer: writer.clone(),
                id,
                req,
                token,
                seq,
                again: self.views.running_again,
            });
        }
    }

    /// A commit failed and `abandoned` is rolled back: takes back the
    /// parked replies of views that show an abandoned sequence, before the
    /// committer fails what waited for those. Run again with
    /// [`Engine::rebuild_views`] once the rollback is done.
    pub(super) fn withdraw_views(&mut self, abandoned: &BTreeSet<u64>) -> Vec<Withdrawn> {
        let Some(first) = abandoned.first().copied() else {
            return Vec::new();
        };
        let mut hit: Vec<u64> = self
            .views
            .by_seq
            .range((first, 0)..)
            .filter(|&&(seq, token)| {
                self.views
                    .parked
                    .get(&token)
                    .is_some_and(|v| shows_all(&v.req) || abandoned.contains(&seq))
            })
            .map(|&(_, token)| token)
            .collect();
        // In the order they arrived.
        hit.sort_unstable();
        let hit: Vec<ParkedView> = hit
            .into_iter()
            .filter_map(|token| self.views.remove(token))
            .collect();
        // Taken back in one pass over each sequence's replies, and over
        // the bounded waits (rr45g F2).
        let mut wanted: BTreeMap<u64, HashMap<u64, Arc<ConnWriter>>> = BTreeMap::new();
        for v in &hit {
            wanted
                .entry(v.seq)
                .or_default()
                .insert(v.token, v.writer.clone());
        }
        let taken: HashSet<u64> = self
            .pipe
            .withdraw_all(&wanted)
            .iter()
            .filter_map(|d| d.token)
            .collect();
        let mut arrived = self.status_waits.forget(&taken);
        hit.into_iter()
            // Gone already: sent (its sequence resolved meanwhile) or
            // answered past its bound.
            .filter(|v| taken.contains(&v.token))
            .map(|v| Withdrawn {
                conn: v.conn,
                id: v.id,
                arrived_ms: arrived.remove(&v.token),
                req: v.req,
                token: v.token,
                again: v.again,
            })
            .collect()
    }

    /// Runs the views `withdrawn` again, in the order they arrived, on the
    /// state rolled back through `through`: each answered now, or parked
    /// again behind what is still pending. One that was a run again
    /// already is not run a third time while anything pending may still
    /// fail (a sequence above `through`): it is answered without waiting
    /// ([`Engine::answer_run_again`]). So a view is run at most twice,
    /// and is answered after at most two failed commits (re-review rr45g
    /// F2: run again on every failure, a complete listing was never
    /// answered while commits kept failing, and each failure ran every
    /// such view again).
    pub(super) fn rebuild_views(&mut self, withdrawn: Vec<Withdrawn>, through: u64) {
        if !withdrawn.is_empty() {
            tracing::debug!(
                views = withdrawn.len(),
                "views that showed a failed commit are answered again"
            );
        }
        let may_fail = self.last_seq() > through;
        for w in withdrawn {
            if w.again && may_fail {
                self.answer_run_again(w);
                continue;
            }
            self.views.running_again = true;
            self.run_again(w.conn, w.id, w.req);
            self.views.running_again = false;
            if let Some(arrived) = w.arrived_ms {
                self.status_waits.arrived_at(arrived);
            }
        }
    }

    /// Answers `w`, a run again whose commit failed too, without waiting
    /// for what is pending: a status or `durable_ok` listing with what is
    /// durable, as past its bound ([`super::status_wait`]), and so a
    /// `durable_ok` `frontends` when its rows were taken with the durable
    /// counts; any
    /// other view is refused `Busy`, saying why (it has no durable answer:
    /// a complete listing, `frontends` without `durable_ok` or such rows, a view of one
    /// handle, record or check). Nothing of it was run again, so nothing was counted anew
    /// (a `CheckIo`'s I/O was forgotten in flight by the rollback).
    fn answer_run_again(&mut self, w: Withdrawn) {
        let Some(writer) = self.conns.get(&w.conn).map(|c| c.writer.clone()) else {
            return;
        };
        let now = mono_ms();
        let durable = match Bounded::of(&w.req) {
            Some(what @ (Bounded::Status | Bounded::Listing(_))) => Some(what),
            Some(what @ Bounded::Frontends { durable_ok: true })
                if self.durable_frontends_taken() =>
            {
                Some(what)
            }
            _ => None,
        };
        match durable {
            Some(what) => {
                let wait = Waiting {
                    writer,
                    conn: w.conn,
                    id: w.id,
                    token: w.token,
                    seq: 0,
                    arrived_ms: w.arrived_ms.unwrap_or(now),
                    what,
                };
                self.answer_durably(&wait, now);
            }
            None => {
                let e = err(
                    ErrorCode::Busy,
                    format!(
                        "the commits this {} showed failed twice, and others it would wait \
                         for are pending: it is not run a third time; retry",
                        w.req.name()
                    ),
                );
                let frame = ServerFrame::Reply {
                    id: Some(w.id),
                    result: Err(e),
                };
                writer.send_frame(&frame, None);
            }
        }
    }
}
