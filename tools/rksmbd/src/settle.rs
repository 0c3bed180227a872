//! Closes whose outcome filterd never told: the call timed out (filterd
//! stalled past the call timeout) or filterd's connection went while it
//! waited. rksmbd has forgotten such an open (it serves nothing through
//! a handle filterd may have closed), but filterd may still hold the
//! handle: a stalled filterd closes it late or undoes the close (its
//! commit failed), and a restarted one gets it back, resumed by the
//! attachment, when the close never committed. Nobody would name it
//! again, and it would keep its share mode, lease and persistent record
//! for as long as rksmbd ran. Here a named thread asks filterd to close
//! each such handle again until filterd answers for it: closed, or not
//! (or no longer) this frontend's.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use libfilter::model::ResumeKey;
use libfilter::proto::ErrorCode;

use crate::server::Shared;

/// Longest pause between two tries of a handle still unsettled.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Handles whose close is to be asked again. Bounded by the opens rksmbd
/// may hold (each open's handle is added at most once).
#[derive(Default)]
pub struct Unsettled {
    keys: Mutex<Vec<ResumeKey>>,
    added: Condvar,
}

fn lock(m: &Mutex<Vec<ResumeKey>>) -> MutexGuard<'_, Vec<ResumeKey>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether an error answering a close leaves the handle possibly held by
/// this frontend: everything but "not this frontend's handle".
pub fn may_hold(e: &libfilter::client::ClientError) -> bool {
    !matches!(
        e.code(),
        Some(ErrorCode::NoSuchHandle) | Some(ErrorCode::NotOwner)
    )
}

impl Unsettled {
    /// Handle `key` of a forgotten open may still be held: close it.
    pub fn add(&self, key: ResumeKey) {
        tracing::warn!(resume_key = %key, "close outcome unknown: closing it again until filterd answers");
        lock(&self.keys).push(key);
        self.added.notify_one();
    }
}

/// The settling thread: runs for the life of rksmbd.
pub fn run(sh: Arc<Shared>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let keys = {
            let mut keys = lock(&sh.unsettled.keys);
            while keys.is_empty() {
                backoff = Duration::from_millis(10);
                keys = sh
                    .unsettled
                    .added
                    .wait_timeout(keys, Duration::from_secs(60))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            std::mem::take(&mut *keys)
        };
        let mut left = Vec::new();
        for key in keys {
            match sh.filter.close(key) {
                Ok(()) => tracing::info!(resume_key = %key, "unsettled close made"),
                Err(e) if !may_hold(&e) => {
                    tracing::info!(resume_key = %key, "unsettled close: filterd holds nothing of it")
                }
                // Undone, refused, or unknown again: later.
                Err(e) => {
                    tracing::debug!(resume_key = %key, error = %e, "unsettled close: again later");
                    left.push(key);
                }
            }
        }
        if !left.is_empty() {
            lock(&sh.unsettled.keys).extend(left);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
