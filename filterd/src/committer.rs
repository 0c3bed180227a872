//! The committer: group commit and the one safe order.
//!
//! Receives [`CommitJob`]s from the engine, merges every job that queued while
//! the previous fsync ran into one LMDB write transaction, commits it (LMDB
//! fsyncs before `commit` returns), and only then sends the replies that
//! waited for it (invariant 1). The engine keeps serving non-durable requests
//! meanwhile. If a commit fails, the waiting requests get an error instead and
//! the engine rolls back the opens that never became durable.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::conn::EngineTx;
use libfilter::proto::{ErrorCode, ServerFrame, WireError};
use libfilter::store::{Store, StoreError};
use tracing::error;

use crate::engine::{Command, CommitCounters, CommitJob};
use crate::failpoint;

/// Longest a pending commit waits for more requests to join it.
const MAX_GATHER: Duration = Duration::from_millis(1);

/// Runs until the engine drops its sender.
pub fn run(
    store: Arc<Store>,
    rx: Receiver<CommitJob>,
    engine: EngineTx,
    counters: Arc<CommitCounters>,
) {
    // Clients answered by the last commit usually come straight back; a
    // commit started before they do carries a handful of requests and makes
    // the rest wait a whole extra fsync (a convoy). So, once something is
    // pending, wait until as many requests as the last commit carried have
    // queued, or half the last commit's duration (at most 1 ms) has passed.
    let mut last_replies = 0usize;
    let mut last_commit = Duration::ZERO;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + (last_commit / 2).min(MAX_GATHER);
        loop {
            while let Ok(j) = rx.try_recv() {
                jobs.push(j);
            }
            let pending: usize = jobs.iter().map(|j| j.replies.len()).sum();
            let now = Instant::now();
            if pending >= last_replies || now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut ops = Vec::new();
        let mut replies = Vec::new();
        let mut opened = Vec::new();
        let mut notify = Vec::new();
        for j in jobs {
            ops.extend(j.ops);
            replies.extend(j.replies);
            opened.extend(j.opened);
            notify.extend(j.notify);
        }
        failpoint::hit("commit.before");
        match store.apply(&ops) {
            Ok(()) => {
                last_commit = started.elapsed();
                last_replies = replies.len();
                counters.commits.fetch_add(1, Ordering::Relaxed);
                counters.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
                failpoint::hit("commit.after");
                if !notify.is_empty() {
                    let _ = engine.send(Command::IntentsDurable(notify));
                }
                for r in replies {
                    failpoint::hit("reply.before_send");
                    r.writer.send(&r.bytes, r.fd.as_ref().map(|f| f.as_fd()));
                }
            }
            Err(e) => {
                let code = match e {
                    StoreError::Full | StoreError::MapFull => ErrorCode::DiskFull,
                    _ => ErrorCode::Internal,
                };
                error!(error = %e, ops = ops.len(), "commit failed; failing the requests that waited for it");
                for r in replies {
                    let frame = ServerFrame::Reply {
                        id: Some(r.id),
                        result: Err(WireError::new(
                            code,
                            format!("state store commit failed: {e}"),
                        )),
                    };
                    r.writer.send_frame(&frame, None);
                }
                let _ = engine.send(Command::CommitFailed {
                    opened,
                    parked: notify,
                    code,
                    message: e.to_string(),
                });
            }
        }
    }
}
