//! A frontend's descriptor budget: how many descriptors its opens may hold
//! ([`opens_allowed`]) and an exact count of those held ([`Descriptors`]).
//!
//! Each open a frontend holds keeps the descriptor filterd sent with it.
//! When the process's descriptor table is full, a descriptor filterd sends
//! is cut from its message (`MSG_CTRUNC`): the open it belongs to cannot be
//! used. Before review uD that also cost the whole filterd connection (every
//! request of every client failed until a restart); libfilter's client now
//! answers only that request (`ClientError::DescriptorsCut`). The frontends
//! keep their opens below the limit, so that happens only when something
//! else fills the table, and refuse an open past it with their protocol's
//! resource status instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Descriptors kept free beside the opens: the filterd connections, the
/// listener, logs, a descriptor in passing (a reattach resumes one handle
/// at a time), plus up to `max_connections` client sockets (at most a
/// quarter of the limit).
pub const FD_RESERVE: u64 = 64;

/// How many descriptors a frontend's opens may hold given its descriptor
/// limit, raised first to the hard limit: the limit less [`FD_RESERVE`] and
/// `max_connections` client sockets (at most a quarter of the limit). No
/// cap (`usize::MAX`) when the limit cannot be read.
pub fn opens_allowed(max_connections: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return usize::MAX;
    };
    let limit = if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    allowed_under(limit, max_connections)
}

/// [`opens_allowed`] for a descriptor limit of `limit`.
fn allowed_under(limit: u64, max_connections: usize) -> usize {
    let sockets = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .min(limit / 4);
    usize::try_from(limit.saturating_sub(FD_RESERVE.saturating_add(sockets))).unwrap_or(usize::MAX)
}

/// The descriptors a frontend's opens hold, against a cap. Each is counted
/// by a [`DescriptorSlot`] from before it is asked of filterd until it is
/// closed: the slot is taken first ([`Descriptors::reserve`], refused at
/// the cap), then kept beside the descriptor ([`Counted`]), and given back
/// when it is dropped — so no path (a failed open, a dropped state, a
/// replaced descriptor) can leak a count or give one back twice.
#[derive(Debug)]
pub struct Descriptors {
    cap: usize,
    held: AtomicUsize,
}

impl Descriptors {
    /// A budget of `cap` descriptors.
    pub fn new(cap: usize) -> Arc<Descriptors> {
        Arc::new(Descriptors {
            cap,
            held: AtomicUsize::new(0),
        })
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Descriptors held or being asked for now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// A slot for one more descriptor, or `None` at the cap.
    pub fn reserve(self: &Arc<Self>) -> Option<DescriptorSlot> {
        let mut now = self.held.load(Ordering::Acquire);
        loop {
            if now >= self.cap {
                return None;
            }
            match self
                .held
                .compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(DescriptorSlot(self.clone())),
                Err(seen) => now = seen,
            }
        }
    }

    /// A slot even past the cap: for descriptors the frontend must hold
    /// whatever the count (its opens resumed at start-up).
    pub fn force(self: &Arc<Self>) -> DescriptorSlot {
        self.held.fetch_add(1, Ordering::AcqRel);
        DescriptorSlot(self.clone())
    }
}

/// One descriptor counted in [`Descriptors`] until this is dropped.
#[derive(Debug)]
pub struct DescriptorSlot(Arc<Descriptors>);

impl Drop for DescriptorSlot {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A value holding a descriptor (a file), counted while it lives.
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    _slot: DescriptorSlot,
}

impl<T> Counted<T> {
    /// `inner`, counted by `slot`.
    pub fn new(inner: T, slot: DescriptorSlot) -> Counted<T> {
        Counted { inner, _slot: slot }
    }
}

impl<T> std::ops::Deref for Counted<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_and_the_sockets_come_off_the_limit() {
        assert_eq!(allowed_under(256, 8), 256 - 64 - 8);
        // Sockets count at most a quarter of the limit.
        assert_eq!(allowed_under(256, 1024), 256 - 64 - 64);
        assert_eq!(allowed_under(32, 1024), 0);
        assert_eq!(allowed_under(1 << 20, 1024), (1 << 20) - 64 - 1024);
    }

    #[test]
    fn slots_are_refused_at_the_cap_and_given_back_once() {
        let d = Descriptors::new(2);
        let a = d.reserve().expect("first");
        let b = d.reserve().expect("second");
        assert!(d.reserve().is_none(), "at the cap");
        assert_eq!(d.held(), 2);
        let f = Counted::new(7u8, a);
        assert_eq!(*f, 7);
        drop(b);
        assert_eq!(d.held(), 1);
        let forced = d.force();
        let c = d.reserve();
        assert!(c.is_none(), "forced past nothing: 2 held");
        drop(f);
        drop(forced);
        assert_eq!(d.held(), 0, "never below zero, nothing leaked");
        let all: Vec<_> = std::iter::from_fn(|| d.reserve()).take(5).collect();
        assert_eq!(all.len(), 2);
    }
}
