//! Multichannel (MS-SMB2 3.3.5.5.2, session binding): one session served
//! over several TCP connections of the same client.
//!
//! A session stays owned by the connection thread that set it up, its
//! *home*: that thread keeps the session's opens, pending CREATEs and
//! waiting locks, as for any session (see [`crate::server`]). Another
//! connection that binds the session (SESSION_SETUP with
//! SMB2_SESSION_FLAG_BINDING) becomes a *channel*: it authenticates the
//! binding itself, derives its own signing key, and then hands every PDU of
//! the session to the home thread through the home's [`Inbox`], with what
//! the home needs to answer as that channel would ([`Via`]: the channel's
//! signing key, its credits and its socket for the final responses of
//! requests that go async, and what the client said in the channel's
//! NEGOTIATE, for FSCTL_VALIDATE_NEGOTIATE_INFO). The home writes the
//! answer to the channel's socket itself, before it serves anything else
//! (so a final async response cannot overtake its interim one), and
//! tells the channel thread its credits.
//!
//! What the home answers for a channel is confined to it: every message
//! of a forwarded PDU must be of the session bound on that channel (others
//! are STATUS_USER_SESSION_DELETED, NEGOTIATE and SESSION_SETUP too); the
//! channel's key, credits and negotiate state are in force only for that
//! PDU — a PDU of the home's own socket served meanwhile (a forwarded
//! CREATE waiting for a lease break acknowledgment pumps it) runs with the
//! home's own; CANCEL matches only requests of the same connection and
//! session (MessageIds are per connection).
//!
//! A session lives until its last channel goes: when the home's own socket
//! is lost while channels are bound, the home thread keeps serving them
//! (and keeps the session's opens and pending CREATEs) until the last one
//! is gone or the session logs off. Lease breaks already go to the oldest
//! live connection of the client GUID (see [`crate::breaks`]), which is
//! then one of the channels.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::breaks::ConnWriter;
use crate::crypto::{Dialect, SigningAlgorithm};

/// Most PDUs queued for one home thread; a channel whose PDU finds the
/// queue full is answered as if the session were gone.
const MAX_QUEUED: usize = 1024;

/// How a channel asks its home thread to answer a PDU.
pub struct Via {
    /// The channel's connection number (where async final responses go).
    pub conn: u64,
    /// The session bound on the channel: the only one its PDUs may act on.
    pub session: u64,
    /// The channel's socket, for those final responses.
    pub writer: ConnWriter,
    /// The channel's signing algorithm and key.
    pub sign: (SigningAlgorithm, [u8; 16]),
    /// The credits the channel's client holds (updated by the answer).
    pub credits: u32,
    /// What the client said in the channel's own NEGOTIATE (what its
    /// FSCTL_VALIDATE_NEGOTIATE_INFO is checked against).
    pub client: Box<crate::server::ClientNegotiate>,
}

/// A PDU of a bound session, handed from a channel to the home thread.
pub struct Forwarded {
    /// The whole PDU (all messages of a compound).
    pub pdu: Vec<u8>,
    /// Where it came from.
    pub via: Via,
    /// The answer, once the home wrote the response to the channel's
    /// socket: nothing (empty) and the channel's credits after it, or
    /// `None` when the PDU was malformed and the channel must close.
    pub reply: SyncSender<Option<(Vec<u8>, u32)>>,
}

/// The queue of PDUs channels hand to one connection thread, with a
/// socket pair that wakes the thread's poll.
pub struct Inbox {
    queue: Mutex<VecDeque<Forwarded>>,
    wake: UnixStream,
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inbox {
    /// A fresh inbox and the end its owner polls.
    pub fn new() -> std::io::Result<(Arc<Inbox>, UnixStream)> {
        let (wake, rx) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok((
            Arc::new(Inbox {
                queue: Mutex::default(),
                wake,
                closed: AtomicBool::new(false),
            }),
            rx,
        ))
    }

    /// Queues `f` for the home thread; gives it back when the home is gone
    /// or too busy.
    pub fn send(&self, f: Forwarded) -> Result<(), Forwarded> {
        {
            let mut q = lock(&self.queue);
            if self.closed.load(Ordering::Acquire) || q.len() >= MAX_QUEUED {
                return Err(f);
            }
            q.push_back(f);
        }
        self.nudge();
        Ok(())
    }

    /// Wakes the home thread (a channel went away: it may be done).
    pub fn nudge(&self) {
        // A full socket buffer already holds a wake-up.
        let _ = (&self.wake).write(&[1]);
    }

    /// The next queued PDU.
    pub fn take(&self) -> Option<Forwarded> {
        lock(&self.queue).pop_front()
    }

    /// The home thread ends: nothing more is queued, and what is queued is
    /// dropped (its channels answer as for a deleted session).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.queue).clear();
    }
}

/// Empties the wake-up end (non-blocking).
pub fn drain_wakeups(rx: &UnixStream) {
    let mut buf = [0u8; 64];
    while matches!((&*rx).read(&mut buf), Ok(n) if n > 0) {}
}

/// Where a logged-on SMB 3.x session lives, for a connection that binds
/// it.
pub struct Home {
    /// The home connection's inbox.
    pub inbox: Arc<Inbox>,
    /// The home connection's number.
    pub conn: u64,
    /// Its dialect: a binding must have negotiated the same.
    pub dialect: Dialect,
    /// Its client GUID: a binding must come from the same client.
    pub client_guid: uuid::Uuid,
    /// The session's signing algorithm and key, which sign a binding
    /// request.
    pub sign: (SigningAlgorithm, [u8; 16]),
    /// Channels bound besides the home connection.
    channels: AtomicUsize,
    /// Logged off: no more bindings.
    ended: AtomicBool,
}

impl Home {
    /// A session's home.
    pub fn new(
        inbox: Arc<Inbox>,
        conn: u64,
        dialect: Dialect,
        client_guid: uuid::Uuid,
        sign: (SigningAlgorithm, [u8; 16]),
    ) -> Home {
        Home {
            inbox,
            conn,
            dialect,
            client_guid,
            sign,
            channels: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
        }
    }

    /// A channel bound the session.
    pub fn bound(&self) {
        self.channels.fetch_add(1, Ordering::AcqRel);
    }

    /// A channel went away (lost connection, or the session logged off
    /// through it).
    pub fn unbound(&self) {
        let _ = self
            .channels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.inbox.nudge();
    }

    /// Channels bound now.
    pub fn channels(&self) -> usize {
        if self.ended.load(Ordering::Acquire) {
            0
        } else {
            self.channels.load(Ordering::Acquire)
        }
    }

    /// The session logged off: it can no longer be bound and keeps its
    /// home alive no longer.
    pub fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.inbox.nudge();
    }

    /// Whether the session logged off.
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}
