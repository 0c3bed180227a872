//! What filterd sends a peer that is slow to read: a bounded queue per
//! connection, drained by one flusher thread — so a peer that stops reading
//! hurts only itself (invariant 9).
//!
//! A send is tried at once without blocking (`MSG_DONTWAIT`); only when the
//! peer's socket buffer is full does the frame (with a duplicate of any
//! descriptor it carries) go into the connection's queue, and from then on
//! every frame for that peer queues behind it, so order is kept. The
//! flusher waits for the socket to become writable (epoll, one-shot) and
//! drains the queue. A peer whose queue passes [`MAX_QUEUED_BYTES`] or
//! [`MAX_QUEUED_FRAMES`] is dropped: its connection is shut down, which the
//! engine sees as EOF (its durable handles detach). Nothing is ever dropped
//! silently and nobody — neither the engine nor the committer — ever waits
//! on a peer.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use libfilter::proto::{self, ServerFrame};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

/// Most bytes queued for one peer before it is dropped.
pub const MAX_QUEUED_BYTES: usize = 16 << 20;
/// Most frames queued for one peer before it is dropped.
pub const MAX_QUEUED_FRAMES: usize = 65_536;

/// One connection's frames that could not be sent yet.
#[derive(Default)]
pub struct Queue {
    frames: VecDeque<(Vec<u8>, Option<OwnedFd>)>,
    bytes: usize,
    /// Registered with the flusher's epoll already.
    watched: bool,
}

impl Queue {
    /// Whether the frame just queued is the only one (the flusher must be
    /// asked to watch the socket).
    pub fn is_first_queued(&self) -> bool {
        self.frames.len() == 1
    }
}

/// What a send did.
pub enum Sent {
    /// On its way (sent, or queued behind earlier frames).
    Ok,
    /// The peer is gone or over its limit: drop it.
    Drop(String),
}

/// Sends `bytes` (and `fd`) on `sock` now if nothing is queued and the
/// socket takes it, else queues it. `queue` is the connection's queue,
/// locked by the caller for the whole call (so order is kept).
pub fn send_or_queue(
    sock: BorrowedFd<'_>,
    q: &mut Queue,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Sent {
    if q.frames.is_empty() {
        match libfilter::sys::send_packet_nonblocking(sock, bytes, fd) {
            Ok(true) => return Sent::Ok,
            Ok(false) => {}
            Err(e) => return Sent::Drop(format!("send failed: {e}")),
        }
    }
    if q.frames.len() >= MAX_QUEUED_FRAMES || q.bytes + bytes.len() > MAX_QUEUED_BYTES {
        return Sent::Drop(format!(
            "peer does not read: {} frames ({} bytes) queued for it",
            q.frames.len(),
            q.bytes
        ));
    }
    let fd = match fd.map(|f| f.try_clone_to_owned()).transpose() {
        Ok(fd) => fd,
        Err(e) => return Sent::Drop(format!("cannot keep a descriptor for a queued frame: {e}")),
    };
    q.bytes += bytes.len();
    q.frames.push_back((bytes.to_vec(), fd));
    Sent::Ok
}

/// Sends what it can of `q` without blocking. `Ok(true)`: empty now.
fn drain(sock: BorrowedFd<'_>, q: &mut Queue) -> Result<bool, String> {
    while let Some((bytes, fd)) = q.frames.front() {
        match libfilter::sys::send_packet_nonblocking(sock, bytes, fd.as_ref().map(|f| f.as_fd())) {
            Ok(true) => {
                q.bytes = q.bytes.saturating_sub(bytes.len());
                q.frames.pop_front();
            }
            Ok(false) => return Ok(false),
            Err(e) => return Err(format!("send failed: {e}")),
        }
    }
    Ok(true)
}

/// A connection the flusher can drain.
pub trait Flushable: Send + Sync {
    /// Its socket.
    fn socket(&self) -> BorrowedFd<'_>;
    /// Its queue.
    fn queue(&self) -> &Mutex<Queue>;
    /// Drops the peer (it cannot take what it is sent).
    fn drop_peer(&self, why: &str);
}

/// The thread that drains queues as their sockets become writable.
pub struct Flusher {
    epoll: Epoll,
    conns: Mutex<HashMap<u64, Weak<dyn Flushable>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Flusher {
    /// Starts the flusher thread.
    pub fn start() -> anyhow::Result<Arc<Flusher>> {
        let f = Arc::new(Flusher {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            conns: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(1),
        });
        let me = Arc::downgrade(&f);
        std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || run(me))?;
        Ok(f)
    }

    /// A token for a new connection.
    pub fn token(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Asks to be told when `c`'s socket takes more (its queue is not
    /// empty). `q` is its queue, locked by the caller.
    pub fn watch(&self, token: u64, c: Weak<dyn Flushable>, sock: BorrowedFd<'_>, q: &mut Queue) {
        let ev = EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLONESHOT, token);
        let r = if q.watched {
            self.epoll.modify(sock, &mut { ev })
        } else {
            self.conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(token, c);
            q.watched = true;
            self.epoll.add(sock, ev)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, fd = sock.as_raw_fd(), "cannot watch a slow peer's socket");
        }
    }

    /// Forgets a connection that is gone.
    pub fn forget(&self, token: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&token);
    }
}

fn run(me: Weak<Flusher>) {
    let mut events = vec![EpollEvent::empty(); 64];
    loop {
        let Some(f) = me.upgrade() else {
            return;
        };
        let n = f
            .epoll
            .wait(&mut events, EpollTimeout::from(500u16))
            .unwrap_or_default();
        for ev in events.iter().take(n) {
            let token = ev.data();
            let c = f
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&token)
                .and_then(Weak::upgrade);
            let Some(c) = c else {
                f.forget(token);
                continue;
            };
            let mut q = c.queue().lock().unwrap_or_else(|p| p.into_inner());
            match drain(c.socket(), &mut q) {
                Ok(true) => {}
                Ok(false) => {
                    let ev =
                        EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLONESHOT, token);
                    let _ = f.epoll.modify(c.socket(), &mut { ev });
                }
                Err(why) => {
                    q.frames.clear();
                    q.bytes = 0;
                    drop(q);
                    c.drop_peer(&why);
                }
            }
        }
    }
}

/// Every connection's writer, for [`tell_stepping_down`].
static WRITERS: Mutex<Vec<std::sync::Weak<ConnWriter>>> = Mutex::new(Vec::new());

/// Tells every frontend that asked for [`proto::FEATURE_STEP_DOWN`] that
/// this daemon lost the ownership of its table and exits now, so that it
/// lets go of its clients (review rvnode, finding 3): without a word a
/// frontend cannot tell this from a crash on a node that still owns the
/// table, and answers its clients "not available" while it waits for a
/// daemon that will not come back. Best effort and never blocking: the
/// event goes on the peer's queue when its socket is full, and the exit
/// that follows may lose it (the frontend then rides the loss out as
/// before). It acknowledges nothing: no reply goes with it.
pub fn tell_stepping_down() {
    let all: Vec<_> = WRITERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    let mut told = 0usize;
    for w in all {
        if w.features.load(Ordering::Acquire) & proto::FEATURE_STEP_DOWN != 0
            && w.send_frame(&ServerFrame::Event(proto::Event::SteppingDown), None)
        {
            told += 1;
        }
    }
    tracing::warn!(
        frontends = told,
        "told the frontends this daemon steps down"
    );
}

/// The writing half of a connection, shared by the engine and the committer.
/// Never blocks: what the peer's socket does not take now waits in its
/// queue ([`crate::outbox`]); a peer that lets it grow past its limit is
/// dropped.
pub struct ConnWriter {
    sock: Arc<OwnedFd>,
    dead: AtomicBool,
    /// The encoding of frames after the hello (what the hello granted):
    /// 0 JSON, 1 binary, 2 binary with compact hot frames.
    encoding: AtomicU8,
    /// The feature bits the hello granted: an error code newer than
    /// them is sent as the code that meant it before
    /// ([`proto::ServerFrame::granted`]).
    features: AtomicU64,
    queue: Mutex<Queue>,
    flusher: Option<(Arc<Flusher>, u64)>,
    me: std::sync::Weak<ConnWriter>,
    /// Replies and events waiting for a commit before they go (bytes,
    /// frames): charged against the same limits as the queue, so a peer
    /// that pipelines requests during a slow commit cannot grow filterd's
    /// memory (and descriptors: a parked open's) without bound.
    parked: Mutex<(usize, usize)>,
}

impl Flushable for ConnWriter {
    fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
    fn queue(&self) -> &Mutex<Queue> {
        &self.queue
    }
    fn drop_peer(&self, why: &str) {
        tracing::warn!(
            reason = why,
            "dropping a peer that cannot take what it is sent"
        );
        self.kill();
    }
}

impl Drop for ConnWriter {
    fn drop(&mut self) {
        if let Some((f, token)) = &self.flusher {
            f.forget(*token);
        }
    }
}

impl ConnWriter {
    /// A writer for `sock`, whose queue `flusher` drains.
    pub(crate) fn new(sock: Arc<OwnedFd>, flusher: Option<Arc<Flusher>>) -> Arc<ConnWriter> {
        let w = Arc::new_cyclic(|me| ConnWriter {
            sock,
            dead: AtomicBool::new(false),
            encoding: AtomicU8::new(0),
            features: AtomicU64::new(0),
            queue: std::sync::Mutex::new(Queue::default()),
            flusher: flusher.map(|f| {
                let t = f.token();
                (f, t)
            }),
            me: me.clone(),
            parked: Mutex::new((0, 0)),
        });
        let mut all = WRITERS.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&w));
        drop(all);
        w
    }

    /// Counts a frame of `len` bytes waiting for a commit. False (and the
    /// peer dropped) when the peer's parked frames would pass its limits:
    /// the frame is then not to be kept.
    pub fn park(&self, len: usize) -> bool {
        let mut p = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if p.0.saturating_add(len) > MAX_QUEUED_BYTES || p.1 >= MAX_QUEUED_FRAMES {
            drop(p);
            self.drop_peer("its replies waiting for a commit passed the queue's limit");
            return false;
        }
        p.0 += len;
        p.1 += 1;
        true
    }

    /// The bytes and frames parked now.
    #[cfg(test)]
    pub fn parked_now(&self) -> (usize, usize) {
        *self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A frame counted by [`ConnWriter::park`] went (or was dropped).
    pub fn unpark(&self, len: usize) {
        let mut p = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        p.0 = p.0.saturating_sub(len);
        p.1 = p.1.saturating_sub(1);
    }

    /// A writer over a socket of the test's own.
    #[cfg(test)]
    pub fn for_test(sock: OwnedFd) -> Arc<ConnWriter> {
        ConnWriter::new(Arc::new(sock), None)
    }

    /// A writer over one end of a new non-blocking SEQPACKET pair, and
    /// the other end (the peer's, replies land there).
    #[cfg(test)]
    pub fn pair_for_test() -> (Arc<ConnWriter>, OwnedFd) {
        let (ours, peer) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        )
        .expect("a socket pair");
        (ConnWriter::for_test(ours), peer)
    }

    /// Sends one frame (with an optional descriptor), or queues it if the
    /// peer's socket is full. A peer that is gone, or whose queue is over
    /// its limit, is shut down, which the poller sees as EOF.
    pub fn send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> bool {
        if self.dead.load(Ordering::Acquire) {
            return false;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match send_or_queue(self.sock.as_fd(), &mut q, bytes, fd) {
            Sent::Ok => {
                if q.is_first_queued() {
                    if let Some((f, token)) = &self.flusher {
                        let me: std::sync::Weak<dyn Flushable> = self.me.clone();
                        f.watch(*token, me, self.sock.as_fd(), &mut q);
                    }
                }
                true
            }
            Sent::Drop(why) => {
                drop(q);
                tracing::warn!(
                    reason = why,
                    "dropping a peer that cannot take what it is sent"
                );
                self.kill();
                false
            }
        }
    }

    /// The features the hello granted (set before the hello reply is
    /// sent; until then no code newer than the protocol is sent).
    pub fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::Release);
    }

    /// The encoding of this connection's frames from now on (set once
    /// the hello reply, always JSON, has been sent).
    pub fn set_encoding(&self, encoding: proto::Encoding) {
        let e = match encoding {
            proto::Encoding::Json => 0,
            proto::Encoding::Binary => 1,
            // The daemon's frames are the same in both.
            proto::Encoding::Compact | proto::Encoding::CompactRecords => 2,
        };
        self.encoding.store(e, Ordering::Release);
    }

    /// Encodes a frame in this connection's encoding.
    pub fn encode(&self, frame: &ServerFrame) -> Result<Vec<u8>, proto::WireError> {
        let encoding = match self.encoding.load(Ordering::Acquire) {
            0 => proto::Encoding::Json,
            1 => proto::Encoding::Binary,
            _ => proto::Encoding::Compact,
        };
        match frame.granted(self.features.load(Ordering::Acquire)) {
            Some(older) => proto::encode_server(encoding, &older),
            None => proto::encode_server(encoding, frame),
        }
    }

    /// Encodes and sends a frame.
    pub fn send_frame(&self, frame: &ServerFrame, fd: Option<BorrowedFd<'_>>) -> bool {
        match self.encode(frame) {
            Ok(b) => self.send(&b, fd),
            Err(e) => {
                tracing::error!(error = %e, "could not encode a reply");
                false
            }
        }
    }

    /// Whether the peer has hung up (its process died or closed the socket),
    /// even if the poller has not read the EOF yet.
    pub fn peer_gone(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if self.dead.load(Ordering::Acquire) {
            return true;
        }
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            _ => false,
        }
    }

    /// Shuts the connection down.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libfilter::proto::{ErrorCode, WireError, FEATURE_RETRY_CODE};

    /// What the peer reads of a refusal with `code` sent on a connection
    /// granted `features`.
    fn sent_as(features: Option<u64>, code: ErrorCode) -> ErrorCode {
        let (w, peer) = ConnWriter::pair_for_test();
        if let Some(f) = features {
            w.set_features(f);
        }
        let frame = ServerFrame::Reply {
            id: Some(7),
            result: Err(WireError::new(code, "the name changed; retry")),
        };
        assert!(w.send_frame(&frame, None));
        let mut buf = vec![0u8; proto::MAX_FRAME];
        let n = nix::sys::socket::recv(
            peer.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        match proto::decode_server(&buf[..n]).unwrap() {
            ServerFrame::Reply {
                id: Some(7),
                result: Err(e),
            } => {
                assert_eq!(e.message, "the name changed; retry");
                e.code
            }
            other => panic!("not the refusal: {other:?}"),
        }
    }

    /// A frontend that did not ask for `FEATURE_RETRY_CODE` (every one
    /// built before it) reads a transient refusal as the
    /// `FileNotAvailable` it always was: an unknown code would not decode.
    #[test]
    fn a_retry_is_sent_only_to_a_connection_granted_its_feature() {
        assert_eq!(sent_as(None, ErrorCode::Retry), ErrorCode::FileNotAvailable);
        assert_eq!(
            sent_as(Some(proto::FEATURE_LOCK_HINTS), ErrorCode::Retry),
            ErrorCode::FileNotAvailable
        );
        assert_eq!(
            sent_as(Some(FEATURE_RETRY_CODE), ErrorCode::Retry),
            ErrorCode::Retry
        );
        // A disconnected persistent open holding the file stays what it is.
        for f in [None, Some(FEATURE_RETRY_CODE)] {
            assert_eq!(
                sent_as(f, ErrorCode::FileNotAvailable),
                ErrorCode::FileNotAvailable
            );
            assert_eq!(sent_as(f, ErrorCode::Busy), ErrorCode::Busy);
        }
    }
}
