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
//! A commit that fails fails *everything not yet durable*: the committer
//! tells the engine ([`Command::CommitFailed`]), the engine restores its
//! state from the store (which holds exactly what is durable) and answers
//! [`Pipeline::rolled_back`] with the last sequence it abandoned; the
//! committer then fails every reply waiting for an abandoned sequence and
//! drops those batches unwritten. Nothing built on state that never became
//! durable is ever committed or acknowledged.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::conn::EngineTx;
use libfilter::proto::{ErrorCode, ServerFrame, WireError};
use libfilter::store::{Store, StoreError, StoreOp};
use tracing::{error, warn};

use crate::conn::ConnWriter;
use crate::engine::Command;
use crate::failpoint;
use libfilter::model::IntentId;

/// Longest a pending commit waits for more requests to join it.
const MAX_GATHER: Duration = Duration::from_millis(1);

/// A reply held back until the state it shows is durable.
pub struct Deferred {
    /// Where it goes.
    pub writer: Arc<ConnWriter>,
    /// The request id (to turn it into an error if the commit fails).
    pub id: u64,
    /// The encoded success frame.
    pub bytes: Vec<u8>,
    /// A descriptor to pass along (a dup, closed after sending).
    pub fd: Option<OwnedFd>,
}

impl Deferred {
    fn send(&self) {
        self.writer
            .send(&self.bytes, self.fd.as_ref().map(|f| f.as_fd()));
    }

    fn fail(&self, code: ErrorCode, message: &str) {
        let frame = ServerFrame::Reply {
            id: Some(self.id),
            result: Err(WireError::new(
                code,
                format!("state store commit failed: {message}"),
            )),
        };
        self.writer.send_frame(&frame, None);
    }
}

/// One numbered batch for the committer.
pub struct CommitJob {
    /// Its commit sequence (ascending, never reused).
    pub seq: u64,
    /// Store operations, in order.
    pub ops: Vec<StoreOp>,
    /// Files and directories whose changes these operations record: made
    /// durable (fsync) before the transaction commits.
    pub sync: Vec<OwnedFd>,
    /// Requests whose replies wait for this batch (for the gathering rule).
    pub requests: usize,
    /// Intents in this batch whose parked requests continue once durable.
    pub notify: Vec<IntentId>,
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
    /// Everything up to here was abandoned by a failed commit.
    discarded: u64,
    /// A failure the engine has not rolled back yet: (through, code, message).
    failing: Option<(u64, ErrorCode, String)>,
    stop: bool,
}

/// What the engine and the committer share: the batch queue, the replies
/// waiting for durability, and the highest durable sequence.
#[derive(Default)]
pub struct Pipeline {
    shared: Mutex<Shared>,
    wake: Condvar,
    committed: AtomicU64,
}

impl Pipeline {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A poisoned lock means a thread panicked; the daemon aborts on
        // panic, so this only unwraps the guard.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The highest sequence whose commit is on disk.
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
        if seq <= self.committed() {
            reply.send();
            return;
        }
        let mut s = self.lock();
        if seq <= self.committed() {
            drop(s);
            reply.send();
        } else if seq <= s.discarded {
            drop(s);
            reply.fail(ErrorCode::Internal, "an earlier commit failed");
        } else {
            s.waiting.entry(seq).or_default().push(reply);
        }
    }

    /// The engine rolled back everything up to and including `through`:
    /// the committer fails what waited for it and drops those batches.
    pub fn rolled_back(&self, through: u64) {
        let mut s = self.lock();
        s.discarded = s.discarded.max(through);
        drop(s);
        self.wake.notify_all();
    }

    /// Stops the committer once the queue is empty.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }
}

/// Runs until [`Pipeline::stop`] with an empty queue.
pub fn run(
    store: Arc<Store>,
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
        let discarded = s.discarded;
        let jobs: Vec<CommitJob> = std::mem::take(&mut s.jobs)
            .into_iter()
            .filter(|j| j.seq > discarded)
            .collect();
        drop(s);
        let Some(through) = jobs.iter().map(|j| j.seq).max() else {
            continue;
        };
        let started = Instant::now();
        let mut ops = Vec::new();
        let mut sync = Vec::new();
        let mut notify = Vec::new();
        let mut requests = 0;
        for j in jobs {
            ops.extend(j.ops);
            sync.extend(j.sync);
            notify.extend(j.notify);
            requests += j.requests;
        }
        failpoint::hit("commit.before");
        let result = sync_all(&sync, &counters).and_then(|()| store.apply(&ops));
        drop(sync);
        match result {
            Ok(()) => {
                last_commit = started.elapsed();
                last_requests = requests;
                counters.commits.fetch_add(1, Ordering::Relaxed);
                counters.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
                failpoint::hit("commit.after");
                let ready = {
                    let mut s = pipe.lock();
                    pipe.committed.store(through, Ordering::Release);
                    let later = s.waiting.split_off(&(through + 1));
                    std::mem::replace(&mut s.waiting, later)
                };
                if !notify.is_empty() {
                    let _ = engine.send(Command::IntentsDurable(notify));
                }
                for r in ready.into_values().flatten() {
                    failpoint::hit("reply.before_send");
                    r.send();
                }
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let code = match e {
                    StoreError::Full | StoreError::MapFull => ErrorCode::DiskFull,
                    _ => ErrorCode::Internal,
                };
                let message = e.to_string();
                error!(error = %e, ops = ops.len(), through, "commit failed; rolling back everything not yet durable");
                pipe.lock().failing = Some((through, code, message.clone()));
                if engine
                    .send(Command::CommitFailed {
                        through,
                        code,
                        message: message.clone(),
                    })
                    .is_err()
                {
                    return;
                }
                // Nothing is committed until the engine has undone what the
                // failed batches did: later batches may build on it.
                let mut s = pipe.lock();
                while s.discarded < through && !s.stop {
                    s = pipe.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                let discarded = s.discarded;
                let later = s.waiting.split_off(&(discarded + 1));
                let failed = std::mem::replace(&mut s.waiting, later);
                s.jobs.retain(|j| j.seq > discarded);
                s.failing = None;
                drop(s);
                for r in failed.into_values().flatten() {
                    r.fail(code, &message);
                }
            }
        }
    }
}

/// Makes the filesystem changes a commit records durable before it.
fn sync_all(fds: &[OwnedFd], counters: &CommitCounters) -> Result<(), StoreError> {
    for fd in fds {
        if let Err(e) = nix::unistd::fsync(fd.as_fd()) {
            warn!(error = %e, "fsync of a changed file or directory failed");
            return Err(StoreError::from(heed::Error::Io(std::io::Error::from(e))));
        }
        counters.fs_syncs.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
