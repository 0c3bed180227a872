//! The committer: group commit and the one safe order.
//!
//! The engine hands each poll round's store operations to the [`Pipeline`]
//! as a numbered batch (its *commit sequence*). The committer takes every
//! batch queued while the previous fsync ran, makes durable the filesystem
//! changes they record (one `fsync` per touched file or directory), commits
//! them in one LMDB write transaction (LMDB fsyncs before `commit` returns),
//! and only then releases the replies that wait for those sequences
//! (invariant 1).
//!
//! Replies do not travel with their batch: a reply waits for the highest
//! sequence whose state it *shows* (a create replay waits for the original
//! create's commit even when it changes nothing itself), and the engine
//! parks it here under that sequence. [`Pipeline::reply_after`] sends at
//! once what is durable already.
//!
//! The engine never waits on the committer: [`Pipeline::submit`] appends to
//! a queue that the committer drains whole, so pending batches merge.
//!
//! Every request's store operations form a *group* under a sequence of its
//! own, with the earlier sequences it builds on. A merged commit that fails
//! is retried group by group, so a request that cannot fit fails alone;
//! the committer tells the engine which failed ([`Command::CommitFailed`]),
//! the engine restores its state from the store (which holds exactly what
//! is durable), abandons every pending request that built on a failed one,
//! and answers [`Pipeline::rolled_back`]; the committer then fails every
//! reply waiting for an abandoned sequence and drops those groups unwritten.
//! Nothing built on state that never became durable is ever committed or
//! acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::conn::EngineTx;
use libfilter::proto::{ErrorCode, ServerFrame, WireError};
use libfilter::store::{StateStore, StoreError, StoreOp};
use tracing::{error, warn};

use crate::command::Command;
use crate::failpoint;
use crate::outbox::ConnWriter;
use libfilter::model::IntentId;

/// Longest a pending commit waits for more requests to join it.
const MAX_GATHER: Duration = Duration::from_millis(1);

/// A reply held back until the state it shows is durable.
pub struct Deferred {
    /// Where it goes.
    pub writer: Arc<ConnWriter>,
    /// The request id (to turn it into an error if the commit fails);
    /// none for an event, which is dropped then (what it announced did
    /// not happen).
    pub id: Option<u64>,
    /// The encoded success frame.
    pub bytes: Vec<u8>,
    /// A descriptor to pass along (a dup, closed after sending).
    pub fd: Option<OwnedFd>,
}

impl Deferred {
    pub(crate) fn send(&self) {
        self.writer
            .send(&self.bytes, self.fd.as_ref().map(|f| f.as_fd()));
    }

    pub(crate) fn fail(&self, code: ErrorCode, message: &str) {
        let Some(id) = self.id else {
            return;
        };
        let frame = ServerFrame::Reply {
            id: Some(id),
            result: Err(WireError::new(
                code,
                format!("state store commit failed: {message}"),
            )),
        };
        self.writer.send_frame(&frame, None);
    }
}

/// The store operations of one request (or one internal step), under its
/// commit sequence.
pub struct Group {
    /// Its commit sequence (ascending, never reused).
    pub seq: u64,
    /// Store operations, in order.
    pub ops: Vec<StoreOp>,
    /// Earlier sequences whose state it builds on: if one of them fails,
    /// so does this one.
    pub deps: Vec<u64>,
    /// Intents whose parked requests continue once it is durable.
    pub notify: Vec<IntentId>,
    /// It finishes a change whose intent is durable (the change is made):
    /// it cannot be undone, only finished. If it cannot commit, the daemon
    /// stops as if it had crashed, and recovery finishes it from the intent.
    pub completes_intent: bool,
}

/// One poll round's groups for the committer.
pub struct CommitJob {
    /// The groups, in sequence order.
    pub groups: Vec<Group>,
    /// Files and directories whose changes these groups record: made
    /// durable (fsync) before the transaction commits.
    pub sync: Vec<OwnedFd>,
    /// Requests whose replies wait for this job (for the gathering rule).
    pub requests: usize,
}

/// Counters the committer maintains.
#[derive(Default)]
pub struct CommitCounters {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Operations committed.
    pub ops: AtomicU64,
    /// Transactions that failed (everything pending was rolled back).
    pub failed: AtomicU64,
    /// fsyncs of filesystem changes made before their commit.
    pub fs_syncs: AtomicU64,
}

#[derive(Default)]
struct Shared {
    jobs: Vec<CommitJob>,
    /// Replies by the sequence they wait for.
    waiting: BTreeMap<u64, Vec<Deferred>>,
    /// Sequences abandoned by failed commits (never durable).
    abandoned: BTreeSet<u64>,
    /// The engine's answer to a failure: what it rolled back.
    rolled_back: Option<BTreeSet<u64>>,
    /// The engine waits for this sequence to be resolved
    /// ([`Pipeline::wake_engine_at`]).
    wake_at: Option<u64>,
    stop: bool,
}

/// What the engine and the committer share: the batch queue, the replies
/// waiting for durability, and the highest resolved sequence.
#[derive(Default)]
pub struct Pipeline {
    shared: Mutex<Shared>,
    wake: Condvar,
    /// Every sequence up to here is resolved: durable, or abandoned.
    committed: AtomicU64,
    /// Whether any sequence was ever abandoned (then `reply_after` asks).
    any_abandoned: AtomicBool,
}

impl Pipeline {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A poisoned lock means a thread panicked; the daemon aborts on
        // panic, so this only unwraps the guard.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every sequence up to this one is resolved (durable or abandoned).
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Queues a batch. Never blocks on the committer's work.
    pub fn submit(&self, job: CommitJob) {
        let mut s = self.lock();
        s.jobs.push(job);
        drop(s);
        self.wake.notify_all();
    }

    /// Sends `reply` once sequence `seq` is durable (now, if it is), or
    /// fails it if `seq` was abandoned by a failed commit.
    pub fn reply_after(&self, seq: u64, reply: Deferred) {
        if seq <= self.committed() && !self.any_abandoned.load(Ordering::Acquire) {
            reply.send();
            return;
        }
        let mut s = self.lock();
        if s.abandoned.contains(&seq) {
            drop(s);
            reply.fail(ErrorCode::Internal, "a commit it depends on failed");
        } else if seq <= self.committed() {
            drop(s);
            reply.send();
        } else {
            s.waiting.entry(seq).or_default().push(reply);
        }
    }

    /// The engine's answer to [`Command::CommitFailed`]: it rolled back
    /// the sequences in `abandoned` (the failed ones and every pending one
    /// that built on them); the committer fails what waited for them and
    /// drops their groups.
    pub fn rolled_back(&self, abandoned: BTreeSet<u64>) {
        self.lock().rolled_back = Some(abandoned);
        self.wake.notify_all();
    }

    /// Asks for [`Command::CommitsResolved`] once sequence `seq` is
    /// resolved (durable or abandoned). False when it is already: nothing
    /// will be sent.
    pub fn wake_engine_at(&self, seq: u64) -> bool {
        let mut s = self.lock();
        if seq <= self.committed() {
            return false;
        }
        s.wake_at = Some(s.wake_at.map_or(seq, |w| w.min(seq)));
        true
    }

    /// Whether the engine asked to hear of a sequence resolved by now (and
    /// is told: the request is cleared).
    pub(crate) fn take_engine_wake(&self) -> bool {
        let mut s = self.lock();
        let due = s.wake_at.is_some_and(|w| w <= self.committed());
        if due {
            s.wake_at = None;
        }
        due
    }

    /// Stops the committer once the queue is empty.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }

    /// Everything up to `through` committed: the replies that waited for it.
    pub(crate) fn settle_success(&self, through: u64) -> Vec<Deferred> {
        let mut s = self.lock();
        self.resolve(&mut s, through)
    }

    /// After a failed commit through `through`: waits (when `wait`) for the
    /// engine's rollback, drops the abandoned groups, and hands back the
    /// replies that may go (`.0`) and those that must fail (`.1`).
    pub(crate) fn settle_failure(
        &self,
        through: u64,
        wait: bool,
    ) -> (Vec<Deferred>, Vec<Deferred>) {
        let mut s = self.lock();
        while wait && s.rolled_back.is_none() && !s.stop {
            s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        let abandoned = s.rolled_back.take().unwrap_or_default();
        for j in &mut s.jobs {
            j.groups.retain(|g| !abandoned.contains(&g.seq));
        }
        let mut refused = Vec::new();
        for seq in &abandoned {
            refused.extend(s.waiting.remove(seq).into_iter().flatten());
        }
        s.abandoned.extend(abandoned.iter().copied());
        self.any_abandoned.store(true, Ordering::Release);
        let ready = self.resolve(&mut s, through);
        (ready, refused)
    }

    /// Takes every queued job (what the committer does; tests drive it).
    #[cfg(test)]
    pub(crate) fn take_jobs(&self) -> Vec<CommitJob> {
        std::mem::take(&mut self.lock().jobs)
    }

    /// Marks everything up to `through` resolved and hands back the replies
    /// that waited for it.
    fn resolve(&self, s: &mut Shared, through: u64) -> Vec<Deferred> {
        self.committed.store(through, Ordering::Release);
        let later = s.waiting.split_off(&(through + 1));
        std::mem::replace(&mut s.waiting, later)
            .into_values()
            .flatten()
            .collect()
    }
}

/// Runs until [`Pipeline::stop`] with an empty queue.
pub fn run(
    store: Arc<dyn StateStore>,
    pipe: Arc<Pipeline>,
    engine: EngineTx,
    counters: Arc<CommitCounters>,
) {
    // Clients answered by the last commit usually come straight back; a
    // commit started before they do carries a handful of requests and makes
    // the rest wait a whole extra fsync (a convoy). So, once something is
    // pending, wait until as many requests as the last commit carried have
    // queued, or half the last commit's duration (at most 1 ms) has passed.
    let mut last_requests = 0usize;
    let mut last_commit = Duration::ZERO;
    loop {
        let mut s = pipe.lock();
        while s.jobs.is_empty() && !s.stop {
            s = pipe.wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.jobs.is_empty() {
            return;
        }
        let deadline = Instant::now() + (last_commit / 2).min(MAX_GATHER);
        loop {
            let pending: usize = s.jobs.iter().map(|j| j.requests).sum();
            let now = Instant::now();
            if pending >= last_requests || now >= deadline || s.stop {
                break;
            }
            s = pipe
                .wake
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let jobs = std::mem::take(&mut s.jobs);
        drop(s);
        let mut groups: Vec<Group> = Vec::new();
        let mut sync = Vec::new();
        let mut requests = 0;
        for j in jobs {
            groups.extend(j.groups);
            sync.extend(j.sync);
            requests += j.requests;
        }
        let Some(through) = groups.iter().map(|g| g.seq).max() else {
            continue;
        };
        let started = Instant::now();
        let batches: Vec<&[StoreOp]> = groups.iter().map(|g| g.ops.as_slice()).collect();
        let n_ops: usize = batches.iter().map(|b| b.len()).sum();
        let injected = failpoint::fails("commit.before");
        let result = if injected {
            Err(StoreError::from(heed::Error::Io(std::io::Error::other(
                "failpoint commit.before: failing on purpose",
            ))))
        } else {
            sync_all(&sync, &counters).and_then(|()| store.commit(&batches).map(|_| ()))
        };
        drop(batches);
        drop(sync);
        let (failed, error) = match result {
            Ok(()) => (BTreeSet::new(), None),
            // One request that cannot fit (or fails for any reason) fails
            // alone: each group is tried on its own, in order; a group that
            // builds on a failed one fails with it.
            // An injected failure fails every group of the commit.
            Err(e) if injected => (groups.iter().map(|g| g.seq).collect(), Some(e)),
            Err(e) => {
                fenced(&e);
                (retry_alone(store.as_ref(), &groups), Some(e))
            }
        };
        let notify: Vec<IntentId> = groups
            .iter()
            .filter(|g| !failed.contains(&g.seq))
            .flat_map(|g| g.notify.iter().copied())
            .collect();
        if failed.is_empty() {
            last_commit = started.elapsed();
            last_requests = requests;
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters.ops.fetch_add(n_ops as u64, Ordering::Relaxed);
            failpoint::hit("commit.after");
            let ready = pipe.settle_success(through);
            if !notify.is_empty() {
                let _ = engine.send(Command::IntentsDurable(notify));
            }
            if pipe.take_engine_wake() {
                let _ = engine.send(Command::CommitsResolved);
            }
            for r in ready {
                failpoint::hit("reply.before_send");
                r.send();
            }
            continue;
        }
        counters.failed.fetch_add(1, Ordering::Relaxed);
        if groups
            .iter()
            .any(|g| g.completes_intent && failed.contains(&g.seq))
        {
            // The change is on disk and its intent durable; memory cannot
            // be rolled back to before it. Stop as a crash would: recovery
            // finishes the change, and clients replay as after any crash.
            error!(error = ?error, "the completion of a durable intent cannot commit; stopping so that recovery finishes it");
            std::process::exit(70);
        }
        let (code, message) = match &error {
            Some(StoreError::Full | StoreError::MapFull) => (
                ErrorCode::DiskFull,
                error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
            ),
            Some(e) => (ErrorCode::Internal, e.to_string()),
            None => (ErrorCode::Internal, "commit failed".to_owned()),
        };
        error!(error = %message, failed = failed.len(), of = groups.len(), through, "commit failed; rolling back what it held and what built on it");
        if engine
            .send(Command::CommitFailed {
                failed: failed.iter().copied().collect(),
                through,
                code,
                message: message.clone(),
            })
            .is_err()
        {
            return;
        }
        // Nothing more is committed until the engine has undone what the
        // failed groups did: later ones may build on it.
        let (ready, refused) = pipe.settle_failure(through, true);
        if !notify.is_empty() {
            let _ = engine.send(Command::IntentsDurable(notify));
        }
        if pipe.take_engine_wake() {
            let _ = engine.send(Command::CommitsResolved);
        }
        for r in refused {
            r.fail(code, &message);
        }
        for r in ready {
            r.send();
        }
    }
}

/// After a failed merged commit: each group on its own, in order. Returns
/// the sequences that failed (on their own, or by building on one that did).
fn retry_alone(store: &dyn StateStore, groups: &[Group]) -> BTreeSet<u64> {
    let mut failed = BTreeSet::new();
    if groups.len() == 1 {
        failed.extend(groups.iter().map(|g| g.seq));
        return failed;
    }
    for g in groups {
        if g.deps.iter().any(|d| failed.contains(d)) {
            failed.insert(g.seq);
            continue;
        }
        if let Err(e) = store.commit(&[&g.ops]) {
            fenced(&e);
            warn!(seq = g.seq, error = %e, "a request's commit fails on its own");
            failed.insert(g.seq);
        }
    }
    failed
}

/// Another daemon claimed the table: this one must not acknowledge or
/// change anything more. It exits at once (its clients see the connection
/// drop and reconnect to the owner).
fn fenced(e: &StoreError) {
    if let StoreError::Fenced { .. } | StoreError::LeaseLost { .. } = e {
        error!(error = %e, "fenced: another filterd owns this state; exiting without acknowledging anything more");
        std::process::exit(75);
    }
}

/// Makes the filesystem changes a commit records durable before it.
fn sync_all(fds: &[OwnedFd], counters: &CommitCounters) -> Result<(), StoreError> {
    // One fsync per file or directory, however many changes of the batch
    // touched it.
    let mut seen = std::collections::HashSet::new();
    for fd in fds {
        if let Ok(st) = nix::sys::stat::fstat(fd.as_fd()) {
            if !seen.insert((st.st_dev, st.st_ino)) {
                continue;
            }
        }
        if let Err(e) = nix::unistd::fsync(fd.as_fd()) {
            warn!(error = %e, "fsync of a changed file or directory failed");
            return Err(StoreError::from(heed::Error::Io(std::io::Error::from(e))));
        }
        counters.fs_syncs.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
