//! The Unix socket: accepting peers, reading their frames, writing replies.
//!
//! The listener thread accepts, checks `SO_PEERCRED`, and hands each new
//! socket to the engine thread. The engine thread itself reads every
//! connection through a [`Poller`] (epoll): a request is decoded and handled
//! on the thread that owns the state, without a hop through another thread —
//! one context switch per request instead of two. Other threads (listener,
//! committer, main) talk to the engine through an [`EngineTx`], a bounded
//! channel plus an eventfd that wakes the poller.
//!
//! Replies are written by whichever thread holds the reply (the engine for
//! non-durable work, the committer after an fsync) through the connection's
//! [`ConnWriter`]; a SEQPACKET send is atomic, so concurrent writers never
//! interleave.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use crossbeam_channel::{Receiver, Sender};
use libfilter::proto::{self, ErrorCode, HelloReply, ServerFrame, WireError, MAX_FRAME};
use libfilter::sys::{self, Packet, PacketBatch};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    bind, connect, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily, Backlog,
    SockFlag, SockType, UnixAddr,
};

use nix::sys::time::TimeVal;

use crate::closer::Closer;
use crate::command::{Command, ConnId, Peer};
use crate::outbox::{self, ConnWriter};

/// Most packets read from one connection per poll round (fairness).
const MAX_PACKETS_PER_ROUND: usize = 32;
/// The epoll token of the wake-up eventfd.
const WAKE_TOKEN: u64 = 0;
/// Most times one wait asks epoll again at once after `EINTR`.
const MAX_EINTR_RETRIES: usize = 64;

/// How other threads reach the engine: a bounded channel and a wake-up.
#[derive(Clone)]
pub struct EngineTx {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
}

impl EngineTx {
    /// Queues a command and wakes the engine. Fails when the engine is gone.
    pub fn send(&self, c: Command) -> Result<(), ()> {
        self.tx.send(c).map_err(|_| ())?;
        wake(&self.wake);
        Ok(())
    }

    /// A sender over channel `(tx, rx)`, whose commands the test reads
    /// from the receiver (a bounded channel holds the sender in `send`
    /// until the test reads).
    #[cfg(test)]
    pub(crate) fn for_test(
        (tx, rx): (Sender<Command>, crossbeam_channel::Receiver<Command>),
    ) -> (EngineTx, crossbeam_channel::Receiver<Command>) {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .expect("an eventfd");
        (
            EngineTx {
                tx,
                wake: Arc::new(wake),
            },
            rx,
        )
    }

    /// Queues a command if the queue has room, never waiting: `Err(Some)`
    /// gives it back (boxed) when the queue is full, `Err(None)` when the
    /// engine is gone (the command dropped).
    pub fn try_send(&self, c: Command) -> Result<(), Option<Box<Command>>> {
        match self.tx.try_send(c) {
            Ok(()) => {
                wake(&self.wake);
                Ok(())
            }
            Err(crossbeam_channel::TrySendError::Full(c)) => Err(Some(Box::new(c))),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(None),
        }
    }
}

/// Wakes the engine's poller. The eventfd is watched edge-triggered, so
/// every write is a new event and the poller never reads it back (a
/// system call less per wake-up, issue 16); only a counter that would
/// overflow (never, in practice: 2^64 - 2 writes) is reset first.
fn wake(fd: &EventFd) {
    if let Err(nix::errno::Errno::EAGAIN) = fd.write(1) {
        let _ = fd.read();
        let _ = fd.write(1);
    }
}

struct PollConn {
    sock: Arc<OwnedFd>,
    writer: Arc<ConnWriter>,
    peer: Peer,
    greeted: bool,
}

/// Longest a connection may stay without its hello before it is closed.
pub const HELLO_WAIT: Duration = Duration::from_secs(5);

/// Most connections that have not said hello yet at once: one more
/// closes the oldest of them (told why). With `--max-connections` counting
/// only connections that said hello (the engine's), a peer of the socket's
/// group could otherwise hold any number open silently — each a socket
/// and a writer in filterd — until descriptors ran out for everyone's
/// opens (review, session 29). Closing the oldest, not refusing the new
/// one, keeps a flood from shutting out a frontend that says hello at
/// once.
pub const MAX_UNGREETED: usize = 1024;

/// Most connections one process may have waiting for their hello: one
/// more of its own is refused at once. Room for a frontend or a bench that
/// opens many connections at once (each says hello at once, but the
/// engine takes in a burst of accepted connections before it reads their
/// hellos).
pub const MAX_UNGREETED_PER_PEER: usize = 256;

/// The engine's view of every connection's receive side.
pub struct Poller {
    epoll: Epoll,
    /// Kept open while the poller watches it (never read: edge-triggered).
    _wake: Arc<EventFd>,
    rx: Receiver<Command>,
    conns: HashMap<ConnId, PollConn>,
    batch: PacketBatch,
    events: Vec<EpollEvent>,
    flusher: Arc<outbox::Flusher>,
    /// What every connection's queue holds unread, shared out by user.
    pool: Arc<outbox::Pool>,
    /// Connections accepted, oldest first, with when: those still without
    /// a hello at `HELLO_WAIT` are closed.
    ungreeted: std::collections::VecDeque<(std::time::Instant, ConnId)>,
    /// Bytes each connection had queued when a deadline came due
    /// ([`Poller::note_arrived`]), still to be read before the engine
    /// enforces it; a connection leaves once that much is read, its socket
    /// is drained, or it is closed.
    arrived: HashMap<ConnId, u64>,
    /// Closes what peers sent and the connections dropped, where the
    /// kernel does not refuse descriptors sent to filterd.
    closer: Arc<Closer>,
}

impl Drop for Poller {
    /// At shutdown (the engine returns): every connection still open is let
    /// go through the closer, as one dropped while serving is. Closed here,
    /// one with a descriptor queued on it held the engine thread, and
    /// main's join of it, for as long as the descriptor's sender liked
    /// (review rr38d). Accepted connections still queued for the engine go
    /// there too when the channel drops them ([`crate::closer::Unserved`]).
    fn drop(&mut self) {
        for (_, c) in self.conns.drain() {
            self.closer.close_socket(c.sock);
        }
    }
}

/// What one poll round found.
pub enum Ready {
    /// Commands queued by other threads.
    Commands,
    /// A connection has data (or hung up).
    Conn(ConnId),
}

impl Poller {
    /// A poller and the sender other threads use to reach the engine.
    pub fn new(capacity: usize, closer: Arc<Closer>) -> anyhow::Result<(Poller, EngineTx)> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        // Edge-triggered: each write is an event of its own; nothing reads
        // the counter back ([`wake`]).
        epoll.add(
            wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, WAKE_TOKEN),
        )?;
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        Ok((
            Poller {
                epoll,
                _wake: wake.clone(),
                rx,
                conns: HashMap::new(),
                batch: PacketBatch::new(sys::MAX_BATCH, MAX_FRAME + 1),
                events: vec![EpollEvent::empty(); 256],
                flusher: outbox::Flusher::start()?,
                pool: outbox::Pool::for_this_process(),
                ungreeted: std::collections::VecDeque::new(),
                arrived: HashMap::new(),
                closer,
            },
            EngineTx { tx, wake },
        ))
    }

    /// What every connection's queue holds unread.
    pub fn pool(&self) -> Arc<outbox::Pool> {
        self.pool.clone()
    }

    /// Waits up to `timeout` for work (less when a connection's hello is
    /// due sooner).
    pub fn wait(&mut self, timeout: Duration) -> Vec<Ready> {
        let timeout = match self.ungreeted.front() {
            Some((at, _)) => timeout.min(
                (*at + HELLO_WAIT).saturating_duration_since(std::time::Instant::now())
                    + Duration::from_millis(1),
            ),
            None => timeout,
        };
        let mut ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut retries = 0;
        let n = loop {
            match self.epoll.wait(&mut self.events, EpollTimeout::from(ms)) {
                Ok(n) => break n,
                // Interrupted — also by a stop and SIGCONT with no handler
                // (signal(7)): what is ready is asked for again at once.
                // Taken for "nothing", the engine enforced the deadlines of
                // replies that had come in time before reading them
                // (review rvclock).
                Err(nix::errno::Errno::EINTR) if retries < MAX_EINTR_RETRIES => {
                    retries += 1;
                    ms = 0;
                }
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed");
                    break 0;
                }
            }
        };
        let mut out = Vec::with_capacity(n + 1);
        for ev in self.events.iter().take(n) {
            if ev.data() == WAKE_TOKEN {
                out.push(Ready::Commands);
            } else {
                out.push(Ready::Conn(ConnId(ev.data())));
            }
        }
        // Commands may have been queued without a wake-up being seen yet.
        if !self.rx.is_empty() && !out.iter().any(|r| matches!(r, Ready::Commands)) {
            out.push(Ready::Commands);
        }
        out
    }

    /// Queued commands from other threads.
    pub fn commands(&self) -> impl Iterator<Item = Command> + '_ {
        self.rx.try_iter()
    }

    /// Notes what every connection has queued now (`FIONREAD`): a
    /// deadline came due, and what had arrived by then is read before it
    /// is enforced ([`Poller::arrived_unread`]). What comes later does not
    /// count, so a peer that keeps sending holds no deadline off longer
    /// than it takes to read what it had sent. True when anything was
    /// queued.
    pub fn note_arrived(&mut self) -> bool {
        self.arrived = self
            .conns
            .iter()
            .filter_map(|(id, c)| {
                let n = sys::queued_bytes(c.sock.as_fd()).ok()?;
                u64::try_from(n).ok().filter(|n| *n > 0).map(|n| (*id, n))
            })
            .collect();
        !self.arrived.is_empty()
    }

    /// What to read before the noted deadline is enforced: the
    /// connections whose input noted by [`Poller::note_arrived`] is not
    /// all read yet (and queued commands, which a read may depend on).
    pub fn arrived_unread(&self) -> Vec<Ready> {
        let mut out: Vec<Ready> = self.arrived.keys().map(|c| Ready::Conn(*c)).collect();
        if !out.is_empty() && !self.rx.is_empty() {
            out.insert(0, Ready::Commands);
        }
        out
    }

    /// Forgets what [`Poller::note_arrived`] noted (read or not).
    pub fn forget_arrived(&mut self) {
        self.arrived.clear();
    }

    /// Starts reading a newly accepted connection — unless its process has
    /// [`MAX_UNGREETED_PER_PEER`] waiting for their hello already (then it
    /// is refused); past [`MAX_UNGREETED`] in all, the oldest waiting one
    /// is closed.
    pub fn add(&mut self, conn: ConnId, sock: OwnedFd, peer: Peer) {
        let waiting: Vec<(ConnId, i32)> = self
            .ungreeted
            .iter()
            .filter_map(|(_, c)| {
                self.conns
                    .get(c)
                    .filter(|x| !x.greeted)
                    .map(|x| (*c, x.peer.pid))
            })
            .collect();
        if waiting.iter().filter(|(_, pid)| *pid == peer.pid).count() >= MAX_UNGREETED_PER_PEER {
            tracing::warn!(
                pid = peer.pid,
                "a process has {MAX_UNGREETED_PER_PEER} connections waiting to say hello: refusing another"
            );
            let refusal = ServerFrame::Reply {
                id: None,
                result: Err(WireError::new(
                    ErrorCode::LimitReached,
                    format!("{MAX_UNGREETED_PER_PEER} connections of this process are waiting to say hello"),
                )),
            };
            if let Ok(bytes) = proto::encode(&refusal) {
                let _ = sys::send_packet_nonblocking(sock.as_fd(), &bytes, None);
            }
            // Dropped unread: what its peer queued is closed elsewhere.
            self.closer.close_socket(Arc::new(sock));
            return;
        }
        if waiting.len() >= MAX_UNGREETED {
            if let Some((oldest, _)) = waiting.first() {
                self.close_waiting(
                    *oldest,
                    "too many connections waiting to say hello",
                    &mut Vec::new(),
                );
            }
        }
        self.ungreeted.push_back((std::time::Instant::now(), conn));
        let sock = Arc::new(sock);
        if let Err(e) = self
            .epoll
            .add(sock.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, conn.0))
        {
            tracing::error!(error = %e, "cannot watch a new connection");
            self.closer.close_socket(sock);
            return;
        }
        let writer = ConnWriter::new(
            sock.clone(),
            Some(self.flusher.clone()),
            &self.pool,
            outbox::PeerOf {
                conn: conn.0,
                pid: peer.pid,
                uid: peer.uid,
            },
        );
        self.conns.insert(
            conn,
            PollConn {
                sock,
                writer,
                peer,
                greeted: false,
            },
        );
    }

    /// Closes connections that have not said hello within
    /// [`HELLO_WAIT`] (told why), and forgets those that did.
    pub fn close_silent(&mut self, out: &mut Vec<Command>) {
        let now = std::time::Instant::now();
        while let Some(&(at, conn)) = self.ungreeted.front() {
            let waiting = self.conns.get(&conn).is_some_and(|c| !c.greeted);
            if waiting && now < at + HELLO_WAIT {
                break;
            }
            self.ungreeted.pop_front();
            if !waiting {
                continue;
            }
            // Its hello came but is not read yet (the engine was busy past
            // the deadline, or this round did not poll it): read next round.
            let unread = self
                .conns
                .get(&conn)
                .is_some_and(|c| sys::queued_bytes(c.sock.as_fd()).is_ok_and(|n| n > 0));
            if unread {
                self.ungreeted.push_back((now, conn));
                continue;
            }
            self.close_waiting(conn, &format!("no hello within {HELLO_WAIT:?}"), out);
        }
    }

    /// Closes `conn`, which has not said hello, telling it `why`.
    fn close_waiting(&mut self, conn: ConnId, why: &str, out: &mut Vec<Command>) {
        if let Some(c) = self.conns.get(&conn) {
            tracing::warn!(pid = c.peer.pid, "{why}: connection closed");
            reject(
                &c.writer,
                None,
                WireError::new(ErrorCode::ProtocolViolation, why.to_owned()),
            );
            c.writer.kill();
        }
        self.close(conn, out);
    }

    fn remove(&mut self, conn: ConnId) {
        self.arrived.remove(&conn);
        if let Some(c) = self.conns.remove(&conn) {
            let _ = self.epoll.delete(c.sock.as_fd());
            self.closer.close_socket(c.sock);
        }
    }

    /// Reads what `conn` sent (without blocking) into commands for the engine.
    /// Malformed frames are answered here; EOF becomes [`Command::Closed`].
    ///
    /// Packets come in batches of one `recvmmsg` each (up to
    /// [`MAX_PACKETS_PER_ROUND`] in all): a batch with room to spare means
    /// the socket is drained, so a lone request costs one receive call, not
    /// a second one that finds the socket empty (issue 16).
    pub fn read(&mut self, conn: ConnId, out: &mut Vec<Command>) {
        let mut batch = std::mem::take(&mut self.batch);
        let (bytes, drained) = self.read_batches(conn, &mut batch, out);
        self.batch = batch;
        // Input noted for a deadline: done with once read (or drained).
        if let Some(left) = self.arrived.get_mut(&conn) {
            *left = left.saturating_sub(bytes);
            if *left == 0 || drained {
                self.arrived.remove(&conn);
            }
        }
    }

    /// One round of `conn`'s packets: how many bytes they were, and
    /// whether the socket is drained (or closed).
    fn read_batches(
        &mut self,
        conn: ConnId,
        batch: &mut PacketBatch,
        out: &mut Vec<Command>,
    ) -> (u64, bool) {
        let mut left = MAX_PACKETS_PER_ROUND;
        let mut read = 0u64;
        while left > 0 {
            let Some(c) = self.conns.get(&conn) else {
                return (read, true);
            };
            let n = match batch.recv_nonblocking(c.sock.as_fd()) {
                Ok(n) => n,
                Err(_) => {
                    self.close(conn, out);
                    return (read, true);
                }
            };
            // Peers never send filterd descriptors (one that does is
            // closed below); where the kernel lets them through, they are
            // closed on the closer thread, never here.
            self.closer.close_fds(batch.take_descriptors());
            for i in 0..n {
                let Some((packet, bytes)) = batch.get(i) else {
                    break;
                };
                if batch.carried_descriptors(i) {
                    self.refuse_descriptors(conn, out);
                    return (read, true);
                }
                read += match packet {
                    Packet::Data { len, .. } => u64::try_from(*len).unwrap_or(u64::MAX),
                    // At least this much was queued for it.
                    Packet::Truncated => u64::try_from(MAX_FRAME + 1).unwrap_or(u64::MAX),
                    Packet::Eof => 0,
                };
                if !self.on_packet(conn, packet, bytes, out) {
                    return (read, true);
                }
            }
            if n < batch.slots() {
                return (read, true);
            }
            left = left.saturating_sub(n);
        }
        (read, false)
    }

    /// Closes `conn`, which sent descriptors: filterd asks its peers for
    /// none, and a peer that sends some anyway is broken or hostile.
    fn refuse_descriptors(&mut self, conn: ConnId, out: &mut Vec<Command>) {
        if let Some(c) = self.conns.get(&conn) {
            tracing::warn!(
                pid = c.peer.pid,
                "a peer sent descriptors: connection closed"
            );
            reject(
                &c.writer,
                None,
                WireError::new(
                    ErrorCode::ProtocolViolation,
                    "filterd takes no descriptors from its peers".to_owned(),
                ),
            );
            c.writer.kill();
        }
        out.push(Command::BadFrame);
        self.close(conn, out);
    }

    /// Handles one packet of `conn`; false when the connection was closed.
    fn on_packet(
        &mut self,
        conn: ConnId,
        packet: &Packet,
        bytes: &[u8],
        out: &mut Vec<Command>,
    ) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        match packet {
            Packet::Data { .. } => {}
            Packet::Truncated => {
                reject(
                    &c.writer,
                    None,
                    WireError::new(
                        ErrorCode::BadFrame,
                        format!("frame exceeds {MAX_FRAME} bytes"),
                    ),
                );
                out.push(Command::BadFrame);
                if !c.greeted {
                    self.close(conn, out);
                    return false;
                }
                return true;
            }
            Packet::Eof => {
                self.close(conn, out);
                return false;
            }
        }
        if !c.greeted {
            match proto::decode_hello(bytes) {
                Ok(h) if h.version == proto::PROTO_VERSION => {
                    c.greeted = true;
                    out.push(Command::Hello {
                        conn,
                        hello: h,
                        peer: c.peer,
                        writer: c.writer.clone(),
                    });
                    return true;
                }
                Ok(h) => {
                    reject(
                        &c.writer,
                        None,
                        WireError::new(
                            ErrorCode::UnsupportedVersion,
                            format!(
                                "protocol version {} not supported; this filterd speaks {}",
                                h.version,
                                proto::PROTO_VERSION
                            ),
                        ),
                    );
                }
                Err(e) => reject(&c.writer, None, e),
            }
            out.push(Command::BadFrame);
            self.close(conn, out);
            return false;
        }
        match proto::decode_request(bytes) {
            Ok(frame) => out.push(Command::Request { conn, frame }),
            Err((id, e)) => {
                tracing::warn!(conn = conn.0, error = %e, "malformed request");
                reject(&c.writer, id, e);
                out.push(Command::BadFrame);
            }
        }
        true
    }

    /// Answers a hello the engine decided on; a refusal closes the connection.
    pub fn answer_hello(
        &mut self,
        conn: ConnId,
        r: Result<HelloReply, WireError>,
        out: &mut Vec<Command>,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        match r {
            Ok(h) => {
                let encoding = proto::Encoding::from_features(h.features);
                // Before the hello reply goes: no later reply may miss it.
                c.writer.set_features(h.features);
                if !c.writer.send_frame(&ServerFrame::Hello(h), None) {
                    self.close(conn, out);
                    return;
                }
                c.writer.set_encoding(encoding);
            }
            Err(e) => {
                reject(&c.writer, None, e);
                c.writer.kill();
                // Never registered with the engine: just forget it.
                self.remove(conn);
            }
        }
    }

    fn close(&mut self, conn: ConnId, out: &mut Vec<Command>) {
        let greeted = self.conns.get(&conn).is_some_and(|c| c.greeted);
        self.remove(conn);
        if greeted {
            out.push(Command::Closed { conn });
        }
    }
}

/// Refuses a socket path filterd cannot take: anything but a socket found
/// there, or a socket a running filterd answers on; true when a stale
/// socket is there (`listen_at` replaces it). main.rs checks this before
/// it opens the store too, so a start refused for its `--socket` never
/// counts as a crash (the next start logged clean_previous_shutdown false
/// and a new epoch; review L7).
pub fn check_socket_path(path: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(found) = std::fs::symlink_metadata(path) else {
        return Ok(false);
    };
    if !found.file_type().is_socket() {
        bail!("{} exists and is not a socket", path.display());
    }
    let probe = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    if connect(probe.as_raw_fd(), &addr).is_ok() {
        bail!("socket {} is in use by a running filterd", path.display());
    }
    Ok(true)
}

/// Creates the listening socket at `path`: refuses to steal a live socket,
/// replaces a stale one, refuses anything else found there (a file given as
/// `--socket` by mistake was replaced by the socket, review rvacl), sets
/// mode 0660. The second value says whether the kernel refuses
/// descriptors sent to filterd ([`sys::refuse_descriptors`], set before
/// `listen` so that every accepted connection has it): a descriptor a
/// peer sent would be closed by a thread of filterd, and its close can
/// block as long as the sender likes (a TCP socket whose peer never
/// reads, lingering; review rvunsafe).
pub fn listen_at(path: &Path) -> anyhow::Result<(OwnedFd, bool)> {
    if check_socket_path(path)? {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path).with_context(|| format!("socket path {}", path.display()))?;
    bind(fd.as_raw_fd(), &addr).with_context(|| format!("binding {}", path.display()))?;
    set_socket_mode(path)?;
    let refused = sys::refuse_descriptors(fd.as_fd())
        .with_context(|| format!("refusing descriptors on {}", path.display()))?;
    listen(&fd, Backlog::new(128)?)?;
    Ok((fd, refused))
}

/// Sets the just-bound socket at `path` to mode 0660, never through a
/// symbolic link (review rr48c L1: a path swapped for a link between
/// `bind` and a `chmod` by path made filterd chmod the link's target). The
/// socket's directory is one no other user may write, or sticky
/// (`statedir::trusted_socket_path`), so nobody else can put anything at the
/// path; the path is opened `O_PATH|O_NOFOLLOW` all the same, checked to
/// be a socket, and changed through that descriptor.
fn set_socket_mode(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let at = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("socket {}", path.display()))?;
    if !at.metadata()?.file_type().is_socket() {
        bail!("{} is no longer the socket filterd bound", path.display());
    }
    // chmod through /proc/self/fd: fchmod refuses an O_PATH descriptor,
    // and the magic link names the inode itself.
    let by_fd = format!("/proc/self/fd/{}", at.as_raw_fd());
    std::fs::set_permissions(&by_fd, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of socket {}", path.display()))
}

/// Whether a peer may attach: root, our own user, or a member of the
/// socket's group `sock_gid` — as its primary group or one of its
/// supplementary groups `groups` ([`peer_groups`]). The 0660 mode already
/// limits who can connect; this is the check that holds when the mode is
/// wider.
fn peer_allowed(
    peer: &Peer,
    groups: impl FnOnce() -> Option<Vec<u32>>,
    sock_gid: u32,
) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid == 0 || peer.uid == me || peer.gid == sock_gid {
        return Ok(());
    }
    if groups().is_some_and(|g| g.contains(&sock_gid)) {
        return Ok(());
    }
    let name = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(sock_gid))
        .ok()
        .flatten()
        .map_or_else(String::new, |g| format!(" {}", g.name));
    Err(format!(
        "uid {} is not filterd's user and not in the socket's group (gid {sock_gid}{name}); access refused",
        peer.uid
    ))
}

/// The supplementary groups of the peer on `sock`, as the kernel recorded
/// them at its connect (`SO_PEERGROUPS`); where the kernel lacks that
/// option, those of process `pid` (`Groups:` of its status, which a
/// process that reused the pid could answer). `None`: unknown (an
/// unreadable status: the peer already exited), which refuses a peer
/// that is not otherwise admitted.
fn peer_groups(sock: std::os::fd::BorrowedFd<'_>, pid: i32) -> Option<Vec<u32>> {
    match sys::peer_groups(sock) {
        Ok(Some(g)) => return Some(g),
        Ok(None) => {}
        Err(_) => return None,
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        line.split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

/// The socket file at its path: (device, inode, group).
fn socket_file(path: &Path) -> Option<(u64, u64, u32)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.gid()))
}

/// The group whose members may attach: the socket file's group, read
/// again at every accept so that an operator's `chgrp` of the socket
/// counts from the next connection on (review rvacl: it was read once at
/// start). `made`: the socket file this daemon bound; when the path no
/// longer names it (removed, or another daemon's socket now), the group
/// last read stays.
fn socket_group(path: &Path, made: Option<(u64, u64)>, last: &mut u32) -> u32 {
    if let Some((dev, ino, gid)) = socket_file(path) {
        if made == Some((dev, ino)) {
            *last = gid;
        }
    }
    *last
}

/// Refused peers waiting for their refusal frame; beyond this many, a
/// refused peer is simply closed.
const MAX_REFUSALS_QUEUED: usize = 64;

/// Answers refused peers on a thread of its own, so a peer that never
/// sends its hello cannot hold up the accept loop: reads the hello (up to
/// a second), then sends the refusal as the hello's reply and closes. The
/// hello is read first because closing a socket with unread data resets
/// the peer's connection, and the refusal would be lost.
/// Descriptors the hello carried, and the connection, are closed by the
/// `closer`.
fn spawn_refuser(closer: Arc<Closer>) -> Option<Sender<(OwnedFd, String)>> {
    let (tx, rx) = crossbeam_channel::bounded::<(OwnedFd, String)>(MAX_REFUSALS_QUEUED);
    std::thread::Builder::new()
        .name("refuser".into())
        .spawn(move || {
            let mut batch = PacketBatch::new(1, MAX_FRAME + 1);
            for (sock, why) in rx {
                let _ = setsockopt(&sock, sockopt::SendTimeout, &TimeVal::new(1, 0));
                let mut ready = [nix::poll::PollFd::new(
                    sock.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                if nix::poll::poll(&mut ready, nix::poll::PollTimeout::from(1000u16))
                    .is_ok_and(|n| n > 0)
                {
                    let _ = batch.recv_nonblocking(sock.as_fd());
                    closer.close_fds(batch.take_descriptors());
                }
                let frame = ServerFrame::Reply {
                    id: None,
                    result: Err(WireError::new(ErrorCode::NotPermitted, why)),
                };
                if let Ok(bytes) = proto::encode(&frame) {
                    let _ = sys::send_packet(sock.as_fd(), &bytes, None);
                }
                closer.close_socket(Arc::new(sock));
            }
        })
        .ok()
        .map(|_| tx)
}

/// Whether `accept4` failing with `e` passes: the listener is sound and a
/// later accept may succeed. Before (review rvx), an ENOMEM or ENOBUFS
/// ended the listener while filterd lived on, nobody able to attach.
fn accept_error_passes(e: nix::errno::Errno) -> bool {
    use nix::errno::Errno;
    matches!(
        e,
        Errno::EMFILE
            | Errno::ENFILE
            | Errno::ENOMEM
            | Errno::ENOBUFS
            | Errno::EPROTO
            | Errno::EPERM
            | Errno::EAGAIN
    )
}

/// Accepts connections forever and hands them to the engine.
/// Connections it drops go to `closer`.
pub fn accept_loop(listener: OwnedFd, socket_path: PathBuf, engine: EngineTx, closer: Arc<Closer>) {
    let next_id = AtomicU64::new(1);
    let made = socket_file(&socket_path);
    let mut sock_gid = made.map_or(0, |(_, _, gid)| gid);
    let made = made.map(|(dev, ino, _)| (dev, ino));
    let refuser = spawn_refuser(closer.clone());
    let mut said_at: Option<std::time::Instant> = None;
    loop {
        let accepted = sys::accept(listener.as_fd(), SockFlag::SOCK_CLOEXEC)
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)));
        let sock = match accepted {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => continue,
            Err(e) if accept_error_passes(e) => {
                // Out of descriptors or kernel memory: the next connection
                // waits queued until there is room again. Said once every
                // 10 s.
                if said_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::error!(error = %e, "accept failed; not accepting for 100 ms");
                    said_at = Some(std::time::Instant::now());
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => {
                // The listener itself is broken: a daemon nobody can attach
                // to (no frontend back after a restart, no filterctl) would
                // go on holding the state dir, which no standby then takes
                // over. Exits as a crash would: recovery and replays cover
                // it.
                tracing::error!(error = %e, "accept failed: the listener cannot serve; exiting");
                std::process::exit(71);
            }
        };
        let peer = match getsockopt(&sock, sockopt::PeerCredentials) {
            Ok(c) => Peer {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no peer credentials; refusing");
                closer.close_socket(Arc::new(sock));
                continue;
            }
        };
        let sock_gid = socket_group(&socket_path, made, &mut sock_gid);
        if let Err(why) = peer_allowed(&peer, || peer_groups(sock.as_fd(), peer.pid), sock_gid) {
            tracing::warn!(
                pid = peer.pid,
                uid = peer.uid,
                gid = peer.gid,
                socket_gid = sock_gid,
                "peer not allowed (user/group); refusing"
            );
            let unsent = match &refuser {
                Some(r) => r.try_send((sock, why)).err().map(|e| e.into_inner().0),
                None => Some(sock),
            };
            if let Some(sock) = unsent {
                closer.close_socket(Arc::new(sock));
            }
            continue;
        }
        let conn = ConnId(next_id.fetch_add(1, Ordering::Relaxed));
        // Unserved: should the engine be gone, the command comes back and
        // is dropped here, and the socket goes through the closer.
        let sock = crate::closer::Unserved::new(sock, closer.clone());
        if engine.send(Command::Accepted { conn, sock, peer }).is_err() {
            return;
        }
    }
}

fn reject(writer: &ConnWriter, id: Option<u64>, err: WireError) {
    writer.send_frame(
        &ServerFrame::Reply {
            id,
            result: Err(err),
        },
        None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::socketpair;

    /// The socket's mode is set on the socket, never through a symbolic
    /// link put at its path (review rr48c L1: a `chmod` by path followed
    /// one to its target); a socket at the path gets 0660.
    #[test]
    fn the_socket_mode_is_never_set_through_a_link() {
        let dir = std::env::temp_dir().join(format!("rkf-sockmode-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let target = dir.join("target");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("filterd.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(set_socket_mode(&link).is_err());
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the link's target was changed");
        std::fs::remove_file(&link).unwrap();
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(&link).unwrap()).unwrap();
        set_socket_mode(&link).unwrap();
        let mode = std::fs::symlink_metadata(&link)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o660);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A peer's groups are the ones the kernel took at its connect
    /// (`SO_PEERGROUPS`), not those of whatever process has its pid now
    /// (review rvacl: `/proc/PID/status`, racing pid reuse): a pid that
    /// names no process still gives them.
    #[test]
    fn peer_groups_come_from_the_socket_not_the_pid() {
        let (ours, _theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .expect("getgroups")
            .iter()
            .map(|g| g.as_raw())
            .collect();
        want.sort_unstable();
        let mut got = peer_groups(ours.as_fd(), i32::MAX).expect("the peer's groups");
        got.sort_unstable();
        assert_eq!(got, want);
    }

    /// A socket pair, `filterd`'s end first.
    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("a socket pair")
    }

    /// Review rvunsafe, on a kernel that lets descriptors through to
    /// filterd (no `SO_PASSRIGHTS`; a socket pair here): a hello carrying
    /// a lingering TCP socket was closed on the engine thread, which
    /// waited as long as the socket lingered. Now the connection is
    /// closed as broken, told why, and the descriptor is closed on the
    /// closer thread while the engine reads on.
    #[test]
    fn a_peer_that_sends_a_descriptor_is_closed_and_its_close_waits_for_nobody() {
        let (mut poller, _tx) =
            Poller::new(16, Closer::start().expect("a closer")).expect("a poller");
        let (ours, theirs) = pair();
        let peer = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        poller.add(ConnId(1), ours, peer);
        let (lingering, reader) = libfilter::testing::lingering_socket();
        sys::send_packet(
            theirs.as_fd(),
            br#"{"version":1,"role":{"kind":"control"}}"#,
            Some(lingering.as_fd()),
        )
        .expect("sent");
        // In flight: filterd will hold the last reference.
        drop(lingering);
        let mut cmds = Vec::new();
        let reader = crate::closer::unless_blocked(reader, || poller.read(ConnId(1), &mut cmds));
        assert!(reader.is_some(), "the engine waited for the close");
        assert!(cmds.iter().any(|c| matches!(c, Command::BadFrame)));
        assert!(!cmds.iter().any(|c| matches!(c, Command::Hello { .. })));
        let mut buf = vec![0u8; MAX_FRAME + 1];
        match sys::recv_packet(theirs.as_fd(), &mut buf) {
            Ok(Packet::Data { len, .. }) => {
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                assert!(text.contains("no descriptors"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            sys::recv_packet(theirs.as_fd(), &mut buf),
            Ok(Packet::Eof)
        ));
    }

    /// Review rvunsafe: a connection refused without being read (its
    /// process has [`MAX_UNGREETED_PER_PEER`] waiting for their hello)
    /// was closed on the engine thread with a lingering TCP socket queued
    /// on it, and the kernel's close of that socket held the engine. Now
    /// the closer thread closes what was queued.
    #[test]
    fn a_refused_connection_with_a_descriptor_queued_is_closed_off_the_engine() {
        let (mut poller, _tx) =
            Poller::new(16, Closer::start().expect("a closer")).expect("a poller");
        let peer = Peer {
            pid: 7,
            uid: 0,
            gid: 0,
        };
        let mut waiting = Vec::new();
        for i in 0..MAX_UNGREETED_PER_PEER {
            let (ours, theirs) = pair();
            poller.add(ConnId(u64::try_from(i).expect("an id") + 1), ours, peer);
            waiting.push(theirs);
        }
        let (ours, theirs) = pair();
        let (lingering, reader) = libfilter::testing::lingering_socket();
        sys::send_packet(theirs.as_fd(), b"never read", Some(lingering.as_fd())).expect("sent");
        drop(lingering);
        let reader =
            crate::closer::unless_blocked(reader, || poller.add(ConnId(100_000), ours, peer));
        assert!(reader.is_some(), "the engine waited for the close");
        let mut buf = vec![0u8; MAX_FRAME + 1];
        match sys::recv_packet(theirs.as_fd(), &mut buf) {
            Ok(Packet::Data { len, .. }) => {
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                assert!(text.contains("limit_reached"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Review rr38d, on a kernel that lets descriptors through to filterd:
    /// at shutdown the engine dropped its poller, closing every connection
    /// still open and every accepted one still queued for it on the engine
    /// thread; one with a lingering TCP socket queued unread held the
    /// engine, and main's join of it (no clean shutdown, the state dir's
    /// lock kept). Now both go through the closer.
    #[test]
    fn a_poller_dropped_with_a_descriptor_queued_closes_off_the_engine() {
        let peer = Peer {
            pid: 7,
            uid: 0,
            gid: 0,
        };
        // A connection being served.
        let closer = Closer::start().expect("a closer");
        let (mut poller, tx) = Poller::new(16, closer).expect("a poller");
        let (ours, theirs) = pair();
        poller.add(ConnId(1), ours, peer);
        let (lingering, reader) = libfilter::testing::lingering_socket();
        sys::send_packet(theirs.as_fd(), b"never read", Some(lingering.as_fd())).expect("sent");
        drop(lingering);
        let reader = crate::closer::unless_blocked(reader, || drop((poller, tx)));
        assert!(reader.is_some(), "dropping a served connection waited");
        // One accepted, still queued for the engine.
        let closer = Closer::start().expect("a closer");
        let (poller, tx) = Poller::new(16, closer.clone()).expect("a poller");
        let (ours, theirs) = pair();
        let (lingering, reader) = libfilter::testing::lingering_socket();
        sys::send_packet(theirs.as_fd(), b"never read", Some(lingering.as_fd())).expect("sent");
        drop(lingering);
        let sock = crate::closer::Unserved::new(ours, closer);
        assert!(tx
            .send(Command::Accepted {
                conn: ConnId(2),
                sock,
                peer,
            })
            .is_ok());
        let reader = crate::closer::unless_blocked(reader, || drop((poller, tx)));
        assert!(reader.is_some(), "dropping an accepted connection waited");
        // One accepted after the engine is gone (the listener's send fails).
        let closer = Closer::start().expect("a closer");
        let (poller, tx) = Poller::new(16, closer.clone()).expect("a poller");
        drop(poller);
        let (ours, theirs) = pair();
        let (lingering, reader) = libfilter::testing::lingering_socket();
        sys::send_packet(theirs.as_fd(), b"never read", Some(lingering.as_fd())).expect("sent");
        drop(lingering);
        let sock = crate::closer::Unserved::new(ours, closer);
        let reader = crate::closer::unless_blocked(reader, || {
            let sent = tx.send(Command::Accepted {
                conn: ConnId(3),
                sock,
                peer,
            });
            assert!(sent.is_err(), "the engine is gone");
        });
        assert!(
            reader.is_some(),
            "an accepted connection the engine never took waited"
        );
    }

    /// Sends requests on `sock` without waiting until `n` are sent or the
    /// socket is full; how many were sent.
    fn send_requests(sock: &OwnedFd, n: usize) -> usize {
        (0..n)
            .take_while(|i| {
                let req = format!(r#"{{"id":{i},"op":"stats"}}"#);
                sys::send_packet_nonblocking(sock.as_fd(), req.as_bytes(), None).is_ok()
            })
            .count()
    }

    /// Review rvclock: before a deadline is enforced, what had arrived
    /// when it was found due is read, past the per-round cap; what comes
    /// later is not waited for, so a peer that keeps sending cannot hold
    /// the deadline off.
    #[test]
    fn input_noted_for_a_deadline_is_read_and_later_input_is_not_waited_for() {
        let (mut poller, _tx) =
            Poller::new(16, Closer::start().expect("a closer")).expect("a poller");
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("a socket pair");
        let conn = ConnId(1);
        let peer = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        poller.add(conn, ours, peer);
        sys::send_packet(
            theirs.as_fd(),
            br#"{"version":1,"role":{"kind":"control"}}"#,
            None,
        )
        .expect("hello");
        let noted = 3 * MAX_PACKETS_PER_ROUND;
        assert_eq!(send_requests(&theirs, noted), noted);
        assert!(poller.note_arrived());
        // More comes after the deadline was found due.
        let later = send_requests(&theirs, 10_000);
        assert!(later > MAX_PACKETS_PER_ROUND, "room for only {later} more");
        let mut cmds = Vec::new();
        let mut rounds = 0;
        loop {
            let ready = poller.arrived_unread();
            if ready.is_empty() {
                break;
            }
            for r in ready {
                if let Ready::Conn(c) = r {
                    poller.read(c, &mut cmds);
                }
            }
            rounds += 1;
            assert!(rounds <= 4, "still reading after {rounds} rounds");
        }
        let requests = cmds
            .iter()
            .filter(|c| matches!(c, Command::Request { .. }))
            .count();
        assert!(
            requests >= noted,
            "{requests} of the {noted} noted requests read"
        );
        assert!(
            requests <= noted + MAX_PACKETS_PER_ROUND,
            "{requests} read: the later ones were waited for"
        );
        poller.forget_arrived();
        assert!(poller.arrived_unread().is_empty());
    }
}
