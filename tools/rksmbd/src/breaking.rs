//! Which leases have a break in progress (MS-SMB2 3.3.1.4 Lease.Breaking):
//! from the lease break notification that asks for an acknowledgment
//! until the client acknowledges it, or filterd lowers the lease without
//! it (its break timeout: filterd's event without an acknowledgment ends
//! the break here; the client is not told, MS-SMB2 3.3.2.5).
//!
//! rksmbd answers from it what filterd does not say: a CREATE under a
//! lease key being broken reports SMB2_LEASE_FLAG_BREAK_IN_PROGRESS
//! (2.2.14.2.10), and a lease break acknowledgment with no break in
//! progress is STATUS_UNSUCCESSFUL, one that names a state the break
//! does not allow STATUS_REQUEST_NOT_ACCEPTED (3.3.5.22.2).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use libfilter::lease::LeaseKey;

/// SMB2_LEASE_FLAG_BREAK_IN_PROGRESS in a lease response context.
pub const FLAG_BREAK_IN_PROGRESS: u32 = 0x2;

/// The lease keys with a break in progress, across connections, and a
/// count of what may have let a waiting open in since.
#[derive(Default)]
pub struct BreaksInProgress {
    keys: Mutex<HashSet<LeaseKey>>,
    /// Bumped by every break filterd sends, acknowledgment and close: a
    /// pending CREATE is retried soon after it moves, seldom otherwise
    /// (`create::retry_pending`).
    generation: AtomicU64,
}

impl BreaksInProgress {
    /// Something that may end a break happened (an acknowledgment, a
    /// close, filterd lowering a lease).
    pub fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// The current count (see [`Self::bump`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// filterd sent a break of `key`: in progress while it awaits an
    /// acknowledgment; a break without one ends any that was.
    pub fn noticed(&self, key: LeaseKey, ack_required: bool) {
        self.bump();
        if let Ok(mut k) = self.keys.lock() {
            match ack_required {
                true => k.insert(key),
                false => k.remove(&key),
            };
        }
    }

    /// Whether a break of `key` is in progress.
    pub fn contains(&self, key: &LeaseKey) -> bool {
        self.keys.lock().is_ok_and(|k| k.contains(key))
    }

    /// An acknowledgment of `key` arrives: whether a break was in
    /// progress (it is not any more; [`Self::noticed`] marks the next).
    pub fn take(&self, key: &LeaseKey) -> bool {
        self.bump();
        self.keys.lock().is_ok_and(|mut k| k.remove(key))
    }

    /// An acknowledgment filterd refused: the break is still in progress.
    pub fn restore(&self, key: LeaseKey) {
        if let Ok(mut k) = self.keys.lock() {
            k.insert(key);
        }
    }
}
