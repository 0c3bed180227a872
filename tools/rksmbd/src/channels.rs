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
//! NEGOTIATE, for FSCTL_VALIDATE_NEGOTIATE_INFO). The home queues the
//! answer in the channel's [`Outbox`], before it serves anything else (so
//! a final async response, queued later, cannot overtake its interim
//! one), and tells the channel thread the credits it granted
//! ([`Via::granted`]: the channel thread used the PDU's message ids before
//! handing it over, and reads and answers its own socket while it waits
//! for the home — a lease break acknowledgment the home waits for may come
//! on the channel, review rvpanic). The home never writes
//! to a channel's socket: the outbox's own writer thread does, so a
//! channel whose client stops reading stalls only that writer. While the
//! answers it holds pass [`MAX_OUTBOX`] bytes (or all outboxes together
//! [`MAX_OUTBOXES`]) the channel's own thread forwards nothing more
//! (back-pressure on that channel alone, [`Outbox::room`]), and when the
//! writer has finished nothing for [`OUTBOX_STALL`] the channel ends (its
//! socket is shut down; the session and its other channels go on, and the
//! client may bind again, MS-SMB2 3.3.5.5.2).
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
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    /// Where the answers for the channel's socket go (the responses, and
    /// the final responses of requests that went async).
    pub outbox: Arc<Outbox>,
    /// The channel's signing algorithm and key.
    pub sign: (SigningAlgorithm, [u8; 16]),
    /// A copy of the credits the channel's client holds, the PDU's
    /// message ids used (the channel's thread used them): what the
    /// answer's grants are counted on.
    pub credits: Box<crate::credits::Credits>,
    /// Where the home adds the credits its answer grants, before the
    /// answer is queued: the channel's thread adds them to its credits
    /// before it uses any, also while it waits for this answer.
    pub granted: Arc<std::sync::atomic::AtomicU64>,
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
    /// Sent once the home queued the response in the channel's outbox:
    /// true, or false when the PDU was malformed or the channel ended, and
    /// the channel must close.
    pub reply: SyncSender<bool>,
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

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        lock(&self.queue).is_empty()
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

/// Most bytes of answers an [`Outbox`] holds (the one being written
/// included) before its channel forwards nothing more: sixteen of the
/// largest READ answers ([`Outbox::room`]: back-pressure on the channel
/// alone; the channel ends when its writer has finished nothing for
/// [`OUTBOX_STALL`]). A channel whose client stopped reading costs about
/// this much memory.
pub const MAX_OUTBOX: usize = 16 * crate::server::MAX_IO as usize;

/// Most bytes all outboxes of the server hold together, by default
/// (`--channel-memory`, [`set_memory`]): past it, a channel whose outbox
/// is not empty forwards nothing more, as one past [`MAX_OUTBOX`], so
/// channels that read just slowly enough to stay under their own bound
/// cannot add up to more memory than this and one PDU's answers per
/// channel (the adversarial review of issue 14 held 1.6 GiB with 124 such
/// channels).
pub const MAX_OUTBOXES: usize = 256 * crate::server::MAX_IO as usize;

/// The bound of all outboxes together in force ([`MAX_OUTBOXES`]).
static OUTBOXES_BOUND: AtomicUsize = AtomicUsize::new(MAX_OUTBOXES);

/// Sets the bound of all outboxes together, in bytes (rksmbd's
/// `--channel-memory`).
pub fn set_memory(bytes: usize) {
    OUTBOXES_BOUND.store(bytes, Ordering::Relaxed);
}

/// How long a full [`Outbox`]'s writer may go without finishing a PDU
/// (counted from its last finished PDU, or from when the outbox last
/// became non-empty) before its channel is ended: a 1 MiB READ answer
/// needs only 200 KB/s.
pub const OUTBOX_STALL: Duration = Duration::from_secs(5);

/// Bytes held by all outboxes ([`OUTBOXES_BOUND`]).
static OUTBOXES: AtomicUsize = AtomicUsize::new(0);

/// What [`Outbox::room`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Room {
    /// The channel may forward a PDU.
    Free,
    /// Still full after the wait; the writer is making progress.
    Full,
    /// The channel is ended.
    Ended,
}

/// The answers a home thread has for one channel's socket, in order, and
/// the thread that writes them: a stalled channel socket holds up that
/// thread and (through [`Outbox::room`]) the channel's own reader, never
/// the home.
pub struct Outbox {
    state: Mutex<Queued>,
    ready: Condvar,
    /// Signalled when the writer finishes a PDU or the outbox ends.
    drained: Condvar,
    /// The channel's socket, to end it (shut down from any thread, also
    /// while the writer is blocked on it).
    socket: TcpStream,
}

/// What an [`Outbox`] holds.
#[derive(Default)]
struct Queued {
    pdus: VecDeque<Vec<u8>>,
    /// Bytes of `pdus` and of the PDU being written (counted in
    /// [`OUTBOXES`] too until the outbox ends).
    bytes: usize,
    /// Bytes set aside for the answers of PDUs forwarded and not answered
    /// yet ([`Outbox::reserve`]; counted in [`OUTBOXES`] too, also after
    /// the outbox ends, until released).
    reserved: usize,
    /// PDUs written so far (the writer's progress).
    written: u64,
    /// When the writer last finished a PDU, or the outbox last became
    /// non-empty: where [`OUTBOX_STALL`] is counted from.
    progress: Option<Instant>,
    ended: bool,
}

impl Outbox {
    /// The outbox of channel `conn`, whose socket `writer` is, with its
    /// writer thread.
    pub fn start(conn: u64, writer: ConnWriter) -> std::io::Result<Arc<Outbox>> {
        let socket = lock(&writer).try_clone()?;
        let out = Arc::new(Outbox {
            state: Mutex::default(),
            ready: Condvar::new(),
            drained: Condvar::new(),
            socket,
        });
        let o = out.clone();
        std::thread::Builder::new()
            .name(format!("rksmbd-out-{conn}"))
            .spawn(move || o.drain(&writer))?;
        Ok(out)
    }

    /// Queues `pdu` for the channel's socket; false when the channel is
    /// ended. Never waits: the home thread calls it, and the bound is kept
    /// by the channel's own thread, which forwards nothing while the
    /// outbox is full ([`Outbox::room`]); so the outbox holds at most its
    /// bound plus the answers to one forwarded PDU (and final responses
    /// of requests that went async).
    pub fn push(&self, pdu: Vec<u8>) -> bool {
        let mut q = lock(&self.state);
        if q.ended {
            return false;
        }
        if q.bytes == 0 {
            q.progress = Some(Instant::now());
        }
        q.bytes = q.bytes.saturating_add(pdu.len());
        OUTBOXES.fetch_add(pdu.len(), Ordering::Relaxed);
        q.pdus.push_back(pdu);
        self.ready.notify_one();
        true
    }

    /// Sets aside `bytes` for the answers of a PDU the channel forwards,
    /// until [`Outbox::release`]: [`Outbox::room`] counts them as held.
    /// A channel reads its socket while the home answers what it forwarded
    /// (`Connection::await_home`) and may forward again meanwhile; without
    /// the reservation every such PDU found the outbox as empty as the
    /// first did, and a channel could have five PDUs' answers (up to ~15
    /// MiB) on their way past its bound and past the bound of all
    /// outboxes together (re-review rr39c).
    pub fn reserve(&self, bytes: usize) {
        let mut q = lock(&self.state);
        q.reserved = q.reserved.saturating_add(bytes);
        OUTBOXES.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives back what [`Outbox::reserve`] set aside (the answers are
    /// queued, or will never come).
    pub fn release(&self, bytes: usize) {
        let mut q = lock(&self.state);
        let b = bytes.min(q.reserved);
        q.reserved -= b;
        OUTBOXES.fetch_sub(b, Ordering::Relaxed);
        drop(q);
        self.drained.notify_all();
    }

    /// Whether the channel may forward another PDU, waiting at most
    /// `wait` for room. The outbox is full past [`MAX_OUTBOX`], or when it
    /// holds anything while all outboxes hold [`MAX_OUTBOXES`] — what it
    /// holds counting what is reserved for answers on their way; a full
    /// outbox whose writer has finished nothing for [`OUTBOX_STALL`] ends
    /// the channel (its client stopped reading). Called by the channel's
    /// own thread, so a client that reads a channel slowly slows only
    /// that channel, never the session's home.
    pub fn room(&self, wait: Duration) -> Room {
        let mut q = lock(&self.state);
        let until = Instant::now() + wait;
        loop {
            if q.ended {
                return Room::Ended;
            }
            // Its own reservations count against its own bound only:
            // against the bound of all outboxes they would make a channel
            // whose outbox is empty wait for answers of its own that are
            // only released once this wait is over (re-review rr39j 1).
            let full = q.bytes.saturating_add(q.reserved) >= MAX_OUTBOX
                || (q.bytes > 0
                    && OUTBOXES.load(Ordering::Relaxed) >= OUTBOXES_BOUND.load(Ordering::Relaxed));
            if !full {
                return Room::Free;
            }
            let now = Instant::now();
            let stalled = q.progress.unwrap_or(now) + OUTBOX_STALL;
            // Only a writer with something to write can be stalled: an
            // outbox that is full of reservations alone waits for its
            // answers, not for its client.
            if q.bytes > 0 && now >= stalled {
                drop(q);
                tracing::info!("channel's client does not read its answers; ending the channel");
                self.end();
                return Room::Ended;
            }
            if now >= until {
                return Room::Full;
            }
            let seen = (q.written, q.reserved);
            q = self
                .drained
                .wait_timeout_while(q, stalled.max(now).min(until) - now, |q| {
                    !q.ended && (q.written, q.reserved) == seen
                })
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Whether the channel is ended: nothing queued now reaches it.
    pub fn is_ended(&self) -> bool {
        lock(&self.state).ended
    }

    /// Ends the channel: what is queued is dropped, the writer thread
    /// stops, the socket is shut down (the channel thread's read sees it).
    pub fn end(&self) {
        {
            let mut q = lock(&self.state);
            if !q.ended {
                q.ended = true;
                q.pdus.clear();
                OUTBOXES.fetch_sub(q.bytes, Ordering::Relaxed);
                q.bytes = 0;
            }
        }
        self.ready.notify_all();
        self.drained.notify_all();
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// The writer thread: writes the queued PDUs in order until the
    /// outbox ends or a write fails (which ends it).
    fn drain(&self, writer: &ConnWriter) {
        loop {
            let pdu = {
                let mut q = lock(&self.state);
                loop {
                    if q.ended {
                        return;
                    }
                    if let Some(p) = q.pdus.pop_front() {
                        break p;
                    }
                    q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            if !crate::server::write_frame(writer, &pdu) {
                self.end();
                return;
            }
            let mut q = lock(&self.state);
            if q.ended {
                return; // its bytes were given back by end()
            }
            q.bytes = q.bytes.saturating_sub(pdu.len());
            OUTBOXES.fetch_sub(pdu.len(), Ordering::Relaxed);
            q.written = q.written.wrapping_add(1);
            q.progress = Some(Instant::now());
            self.drained.notify_all();
        }
    }
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
    /// Of those, the ones whose socket has not ended: a channel whose
    /// client went away may still wait for the home's answer (and be
    /// counted in `channels` until it is given), but nobody is left there
    /// to acknowledge a break (re-review rr41h F1).
    live: AtomicUsize,
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
            live: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
        }
    }

    /// A channel bound the session.
    pub fn bound(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
        self.channels.fetch_add(1, Ordering::AcqRel);
    }

    /// A channel went away (lost connection, or the session logged off
    /// through it); `socket_live` when its socket had not ended before
    /// (else [`Home::socket_ended`] counted that already).
    pub fn unbound(&self, socket_live: bool) {
        if socket_live {
            let _ = self
                .live
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
        let _ = self
            .channels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.inbox.nudge();
    }

    /// The socket of a bound channel ended (once per channel): the channel
    /// stays counted until it goes ([`Home::unbound`]), but no longer as
    /// one a client may still answer on ([`Home::live_channels`]).
    pub fn socket_ended(&self) {
        let _ = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.inbox.nudge();
    }

    /// Channels bound now whose socket has not ended.
    pub fn live_channels(&self) -> usize {
        if self.ended.load(Ordering::Acquire) {
            0
        } else {
            self.live.load(Ordering::Acquire)
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The outbox of channel `conn`, over a loopback socket (its other end
    /// given back to be kept open).
    fn outbox(conn: u64) -> (Arc<Outbox>, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (theirs, _) = listener.accept().expect("accept");
        let o = Outbox::start(conn, Arc::new(Mutex::new(ours))).expect("outbox");
        (o, theirs)
    }

    /// A PDU forwarded and not yet answered holds its outbox's room as
    /// its queued answers would: a channel reading its socket while the
    /// home answers (`await_home`) cannot forward past its bound.
    #[test]
    fn answers_on_their_way_count_against_the_outbox() {
        let (outbox, _theirs) = outbox(1);
        assert_eq!(outbox.room(Duration::ZERO), Room::Free);
        outbox.reserve(MAX_OUTBOX / 2);
        assert_eq!(outbox.room(Duration::ZERO), Room::Free);
        outbox.reserve(MAX_OUTBOX / 2);
        assert_eq!(outbox.room(Duration::ZERO), Room::Full);
        outbox.release(MAX_OUTBOX / 2);
        assert_eq!(outbox.room(Duration::ZERO), Room::Free);
        outbox.release(MAX_OUTBOX);
        assert_eq!(lock(&outbox.state).reserved, 0);
        outbox.end();
    }

    /// An outbox holding nothing but its reservations waits for its
    /// answers: it is neither full against the bound of all outboxes nor
    /// stalled, however long its writer has had nothing to write (before,
    /// a healthy channel idle for 5 s was ended as one whose client does
    /// not read, re-review rr39j 1).
    #[test]
    fn reservations_alone_neither_fill_nor_stall_an_outbox() {
        let (outbox, _theirs) = outbox(2);
        // Its writer last finished something long ago.
        lock(&outbox.state).progress = Some(Instant::now() - 2 * OUTBOX_STALL);
        // All outboxes together at their bound (the others'), and this
        // one's answers on their way.
        let bound = OUTBOXES_BOUND.load(Ordering::Relaxed);
        OUTBOXES.fetch_add(bound, Ordering::Relaxed);
        outbox.reserve(MAX_OUTBOX / 2);
        let room = outbox.room(Duration::ZERO);
        outbox.release(MAX_OUTBOX / 2);
        OUTBOXES.fetch_sub(bound, Ordering::Relaxed);
        assert_eq!(room, Room::Free);
        outbox.end();
    }
}
