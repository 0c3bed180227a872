//! The closer thread: where filterd closes what a peer could make a close
//! of block on (review rvunsafe).
//!
//! Closing a descriptor a peer sent can block for as long as the sender
//! likes — a TCP socket whose peer never reads, its send buffer full,
//! lingering (`SO_LINGER`) for days; so can closing a connection that has
//! such a descriptor queued unread on it (the kernel closes the queued
//! files in the closing thread). Where the kernel refuses descriptors
//! sent to filterd (`SO_PASSRIGHTS` off on the listening socket, Linux
//! 6.16+) nothing of that can arrive; on older kernels every descriptor a
//! peer sent and every connection filterd drops goes here, so that the
//! engine, the listener and the refuser never wait on a close. The
//! closer shuts a connection's receiving side (its peer can queue no
//! more), closes what is queued on it, then lets it go: whoever drops the
//! socket's last reference then closes an empty one. When its bounded
//! queue is full, what would wait is leaked instead (counted and logged):
//! a descriptor kept open is better than a daemon stalled.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use libfilter::sys::{self, Packet, PacketBatch};

/// Most closes waiting for the closer thread.
pub const QUEUE: usize = 1024;
/// Most batches of queued packets read off one dropped connection (its
/// peer can queue no more once it is shut down: this only bounds the
/// loop).
const MAX_DRAIN_ROUNDS: usize = 4096;

/// What the closer thread closes.
enum Closing {
    /// Descriptors a peer sent.
    Fds(Vec<OwnedFd>),
    /// A connection filterd dropped, with whatever is queued on it.
    Socket(Arc<OwnedFd>),
}

/// The handle other threads close through.
pub struct Closer {
    tx: Sender<Closing>,
    /// The kernel refuses descriptors sent to filterd: a connection
    /// carries none, and is closed where it is dropped.
    kernel_refuses: AtomicBool,
    leaked: AtomicU64,
    said_at: Mutex<Option<Instant>>,
}

impl Closer {
    /// Starts the closer thread.
    pub fn start() -> std::io::Result<Arc<Closer>> {
        let (tx, rx) = crossbeam_channel::bounded::<Closing>(QUEUE);
        std::thread::Builder::new()
            .name("closer".into())
            .spawn(move || {
                let mut batch = PacketBatch::new(sys::MAX_BATCH, 1);
                for c in rx {
                    match c {
                        Closing::Fds(fds) => drop(fds),
                        Closing::Socket(sock) => drain(&sock, &mut batch),
                    }
                }
            })?;
        Ok(Arc::new(Closer {
            tx,
            kernel_refuses: AtomicBool::new(false),
            leaked: AtomicU64::new(0),
            said_at: Mutex::new(None),
        }))
    }

    /// Says whether the kernel refuses descriptors sent to filterd (set
    /// before the first connection is accepted).
    pub fn set_kernel_refuses(&self, refuses: bool) {
        self.kernel_refuses.store(refuses, Ordering::Release);
    }

    /// Closes descriptors a peer sent, on the closer thread.
    pub fn close_fds(&self, fds: Vec<OwnedFd>) {
        if !fds.is_empty() {
            self.hand(Closing::Fds(fds));
        }
    }

    /// Lets a dropped connection go: on the closer thread, unless the
    /// kernel refuses descriptors (none can be queued on it).
    pub fn close_socket(&self, sock: Arc<OwnedFd>) {
        if self.kernel_refuses.load(Ordering::Acquire) {
            return;
        }
        self.hand(Closing::Socket(sock));
    }

    /// Descriptors and connections leaked so far (the queue was full).
    #[cfg(test)]
    pub fn leaked(&self) -> u64 {
        self.leaked.load(Ordering::Relaxed)
    }

    fn hand(&self, c: Closing) {
        let c = match self.tx.try_send(c) {
            Ok(()) => return,
            Err(TrySendError::Full(c) | TrySendError::Disconnected(c)) => c,
        };
        // Kept open for good rather than closed here, where the close
        // could block the calling thread.
        std::mem::forget(c);
        let leaked = self.leaked.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut said) = self.said_at.lock() else {
            return;
        };
        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *said = Some(Instant::now());
            tracing::error!(
                leaked,
                "the closer is {QUEUE} closes behind: leaking a peer's descriptors (or its connection) rather than closing them here"
            );
        }
    }
}

/// A socket accepted but not yet served (on its way to the engine): let
/// go through the closer wherever it is dropped unserved — the listener
/// when the engine is gone, the engine's channel when it goes with
/// commands still queued (review rr38d: those were closed on the engine
/// thread at shutdown, which a descriptor queued on one held for as long
/// as its sender liked, and main's join of the engine with it).
pub struct Unserved {
    sock: Option<OwnedFd>,
    closer: Arc<Closer>,
}

impl Unserved {
    /// `sock`, let go through `closer` unless taken.
    pub fn new(sock: OwnedFd, closer: Arc<Closer>) -> Unserved {
        Unserved {
            sock: Some(sock),
            closer,
        }
    }

    /// The socket, to serve (the taker lets it go through the closer).
    pub fn take(mut self) -> Option<OwnedFd> {
        self.sock.take()
    }
}

impl Drop for Unserved {
    fn drop(&mut self) {
        if let Some(sock) = self.sock.take() {
            self.closer.close_socket(Arc::new(sock));
        }
    }
}

/// Shuts `sock`'s receiving side (its peer's sends fail from now on) and
/// closes the descriptors of every packet queued on it.
fn drain(sock: &OwnedFd, batch: &mut PacketBatch) {
    let _ = nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Read);
    for _ in 0..MAX_DRAIN_ROUNDS {
        let n = batch.recv_nonblocking(sock.as_fd()).unwrap_or(0);
        drop(batch.take_descriptors());
        let ended = (0..n).any(|i| matches!(batch.get(i), Some((Packet::Eof, _))));
        if n < batch.slots() || ended {
            return;
        }
    }
}

/// Runs `f`, which may block closing a lingering socket whose
/// never-reading peer is `reader` ([`libfilter::testing::lingering_socket`]):
/// a watchdog drops `reader` after 10 s, which ends such a close — then
/// the test fails instead of hanging. `reader` back if `f` returned
/// before that.
#[cfg(test)]
pub fn unless_blocked(
    reader: std::net::TcpStream,
    f: impl FnOnce(),
) -> Option<std::net::TcpStream> {
    let (done, wait) = crossbeam_channel::bounded::<()>(1);
    let watchdog = std::thread::spawn(move || {
        wait.recv_timeout(Duration::from_secs(10))
            .is_ok()
            .then_some(reader)
    });
    f();
    let _ = done.send(());
    watchdog.join().expect("the watchdog")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While the closer thread waits on a close that lingers, what is
    /// handed to it queues; past its queue it is leaked (counted), and
    /// nobody handing it anything waits.
    #[test]
    fn a_closer_that_is_stuck_leaks_rather_than_blocks() {
        let closer = Closer::start().expect("a closer");
        let (lingering, reader) = libfilter::testing::lingering_socket();
        let reader = unless_blocked(reader, || {
            closer.close_fds(vec![lingering]);
            for _ in 0..=QUEUE {
                let null = std::fs::File::open("/dev/null").expect("/dev/null");
                closer.close_fds(vec![OwnedFd::from(null)]);
            }
        });
        assert!(reader.is_some(), "handing the closer a close waited");
        assert!(closer.leaked() >= 1, "{}", closer.leaked());
    }
}
