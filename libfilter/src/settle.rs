//! Closes whose outcome filterd never told: the call timed out (filterd
//! stalled past the call timeout) or filterd's connection went while it
//! waited. A frontend that forgot such an open (it serves nothing through
//! a handle filterd may have closed) may still leave filterd holding the
//! handle: a stalled filterd closes it late or undoes the close (its
//! commit failed), and a restarted one gets it back, resumed by the
//! [`crate::attach::Attachment`], when the close never committed. Nobody
//! would name it again, and it would keep its share mode, lease, locks and
//! persistent record for as long as the frontend ran. [`Unsettled::run`],
//! on a named thread of the frontend, asks filterd to close each such
//! handle again until filterd answers for it: closed, or not (or no
//! longer) this frontend's. rksmbd and smbshim use it, and kick it
//! ([`Unsettled::kick`]) when they reattach, so the closes go as soon as
//! filterd is back.
//!
//! The settler lives in the frontend's memory: a frontend that dies
//! before filterd answers takes it along. So a frontend does not tell
//! its client such a close is done while it settles (a retried CLOSE is
//! told to retry again): the client keeps the open, and can RECONNECT it
//! through a replacement frontend and CLOSE it there.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::client::ClientError;
use crate::model::ResumeKey;
use crate::proto::ErrorCode;

/// Longest pause between two tries of a handle still unsettled.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Whether an error answering a close leaves the handle possibly held by
/// this frontend: everything but "not this frontend's handle" (a close
/// undone, refused, or never answered).
pub fn may_hold(e: &ClientError) -> bool {
    !matches!(
        e.code(),
        Some(ErrorCode::NoSuchHandle) | Some(ErrorCode::NotOwner)
    )
}

/// Handles whose close is to be asked again. Bounded by the opens the
/// frontend may hold (each open's handle is added at most once).
#[derive(Default)]
pub struct Unsettled {
    keys: Mutex<Keys>,
    /// A key added, or a kick ([`Unsettled::kick`]).
    added: Condvar,
}

#[derive(Default)]
struct Keys {
    /// Each with the delete on close its client was last told, carried by
    /// every try of its close (`Attachment::close_told`).
    keys: Vec<(ResumeKey, Option<bool>)>,
    /// Try again at once, with the backoff restarted.
    kicked: bool,
}

fn lock(m: &Mutex<Keys>) -> MutexGuard<'_, Keys> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Unsettled {
    /// Handle `key` of a forgotten open may still be held: close it.
    pub fn add(&self, key: ResumeKey) {
        self.add_told(key, None);
    }

    /// [`Unsettled::add`] for a handle whose close carries `told`, the
    /// delete on close its client was last told: every try carries it
    /// again. Before (re-review rr-told36), the retry went with filterd's
    /// flag — a failed persistent close puts back the stored one, which may
    /// be an unanswered change's — and the file went with a flag its
    /// client was never told.
    pub fn add_told(&self, key: ResumeKey, told: Option<bool>) {
        tracing::warn!(resume_key = %key, "close outcome unknown: closing it again until filterd answers");
        lock(&self.keys).keys.push((key, told));
        self.added.notify_one();
    }

    /// filterd is back (the frontend reattached): every handle still
    /// unsettled is tried at once, not after the backoff of the outage's
    /// failed tries (up to [`MAX_BACKOFF`]) — a frontend that dies in
    /// that pause takes the close with it (rvchaos 1).
    pub fn kick(&self) {
        lock(&self.keys).kicked = true;
        self.added.notify_one();
    }

    /// Whether handle `key` waits to be closed again: a frontend must not
    /// hand it to a client again (a replayed create finding it), as the
    /// close the client asked for first is still being made.
    pub fn contains(&self, key: ResumeKey) -> bool {
        lock(&self.keys).keys.iter().any(|(k, _)| *k == key)
    }

    /// Handles waiting to be closed again.
    pub fn len(&self) -> usize {
        lock(&self.keys).keys.len()
    }

    /// Whether no handle waits to be closed again.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The settling loop, for a thread of its own that lives as long as
    /// the frontend: closes each added handle with `close` (the frontend's
    /// [`crate::attach::Attachment::close_told`], with the told flag it was
    /// added with) until it answers closed,
    /// `NoSuchHandle` or `NotOwner`, pausing with backoff up to
    /// [`MAX_BACKOFF`] between rounds that left some. A handle stays
    /// [`Unsettled::contains`] until its close was answered so.
    pub fn run(&self, close: impl Fn(ResumeKey, Option<bool>) -> Result<(), ClientError>) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let keys = {
                let mut keys = lock(&self.keys);
                while keys.keys.is_empty() {
                    backoff = Duration::from_millis(10);
                    keys.kicked = false;
                    keys = self
                        .added
                        .wait_timeout(keys, Duration::from_secs(60))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                keys.kicked = false;
                keys.keys.clone()
            };
            let mut settled = Vec::new();
            for (key, told) in keys {
                match close(key, told) {
                    Ok(()) => {
                        tracing::info!(resume_key = %key, "unsettled close made");
                        settled.push(key);
                    }
                    Err(e) if !may_hold(&e) => {
                        tracing::info!(resume_key = %key, "unsettled close: filterd holds nothing of it");
                        settled.push(key);
                    }
                    // Undone, refused, or unknown again: later.
                    Err(e) => {
                        tracing::debug!(resume_key = %key, error = %e, "unsettled close: again later")
                    }
                }
            }
            let mut keys = lock(&self.keys);
            keys.keys.retain(|(k, _)| !settled.contains(k));
            if !keys.keys.is_empty() {
                // Until the backoff passes, or a kick.
                let until = Instant::now() + backoff;
                while !keys.kicked {
                    let now = Instant::now();
                    if now >= until {
                        break;
                    }
                    keys = self
                        .added
                        .wait_timeout(keys, until - now)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                backoff = if keys.kicked {
                    Duration::from_millis(10)
                } else {
                    (backoff * 2).min(MAX_BACKOFF)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every try of an unsettled close carries the delete on close its
    /// client was last told (re-review rr-told36: the retry went with
    /// filterd's flag, which a failed persistent close had put back to an
    /// unanswered change's, and the file went with a flag its client was
    /// never told).
    #[test]
    fn an_unsettled_close_is_tried_with_its_told_flag() {
        let u = std::sync::Arc::new(Unsettled::default());
        let (told_key, plain_key) = (ResumeKey::new_random(), ResumeKey::new_random());
        u.add_told(told_key, Some(false));
        u.add(plain_key);
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = u.clone();
        std::thread::spawn(move || {
            runner.run(|key, told| {
                let _ = tx.send((key, told));
                Ok(())
            })
        });
        let mut tried: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("tried"))
            .collect();
        tried.sort_by_key(|(k, _)| *k == plain_key);
        assert_eq!(tried, vec![(told_key, Some(false)), (plain_key, None)]);
    }

    /// A kick (filterd is back) tries every unsettled handle at once, not
    /// after the backoff the outage's failed tries built up (rvchaos 1: a
    /// frontend that died within that pause took the close with it).
    #[test]
    fn a_kick_tries_again_at_once() {
        let u = std::sync::Arc::new(Unsettled::default());
        u.add(ResumeKey::new_random());
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = u.clone();
        std::thread::spawn(move || {
            runner.run(|_, _| {
                let _ = tx.send(Instant::now());
                Err(ClientError::Disconnected)
            })
        });
        // Tries until the backoff reaches its longest (10 ms doubling to
        // 1 s: the eighth pause).
        for _ in 0..8 {
            rx.recv_timeout(Duration::from_secs(10)).expect("tried");
        }
        let kicked = Instant::now();
        u.kick();
        let next = rx.recv_timeout(Duration::from_secs(10)).expect("tried");
        assert!(
            next.duration_since(kicked) < MAX_BACKOFF / 2,
            "tried {:?} after the kick",
            next.duration_since(kicked)
        );
    }
}
