//! The client API a frontend (or filterctl) uses to talk to filterd.
//!
//! [`FilterClient::connect`] opens the Unix socket, exchanges hellos, and
//! starts one named reader thread that routes replies to their callers by
//! request id and queues pushed [`Event`]s. Calls are thread-safe and may be
//! issued from many threads at once: they are pipelined on the one connection.
//! An open or resume hands back the file descriptor itself, so reads and
//! writes never pass through the daemon.
//!
//! ```no_run
//! use libfilter::client::FilterClient;
//! use libfilter::model::*;
//! use libfilter::proto::OpenRequest;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let c = FilterClient::connect_frontend("/var/lib/rkfilter/filterd.sock".as_ref(),
//!     Protocol::new("myproto")?, InstanceName::new("myproto-1")?)?;
//! let h = c.open(OpenRequest {
//!     client: ClientId::new("client-42")?,
//!     path: RelPath::new("docs/report.txt")?,
//!     access: Access::new(Rights::READ)?,
//!     share: Rights::READ,
//!     disposition: Disposition::Open,
//!     durability: Durability::Persistent { timeout_ms: 0 },
//!     create_guid: None,
//!     owner: None,
//! })?;
//! // h.fd is the open file: pread/pwrite it directly.
//! c.close(h.info.key)?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use std::os::fd::AsRawFd;

use crate::model::{
    ClientId, CreateGuid, InstanceName, Protocol, ReplayRecord, ReplayScope, ResumeKey,
};
use crate::proto::{
    self, ErrorCode, Event, FileView, HandleView, Hello, HelloReply, OpenRequest, Opened, Reply,
    Request, RequestFrame, ResumeRequest, ResumeTarget, Role, ServerFrame, WireError, MAX_FRAME,
};
use crate::sys::{self, Packet};

/// How long a call waits for its reply before giving up.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to filterd at {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon refused the request.
    #[error("filterd refused the request: {0}")]
    Refused(#[from] WireError),
    /// The connection to the daemon is gone.
    #[error("connection to filterd lost")]
    Disconnected,
    /// No reply within the call timeout.
    #[error("filterd did not answer within {0:?}")]
    Timeout(Duration),
    /// The daemon sent something this library does not understand.
    #[error("unexpected reply from filterd: {0}")]
    Unexpected(String),
    /// Socket I/O failed.
    #[error("socket i/o")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The daemon's error code, when the daemon refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(e) => Some(e.code),
            _ => None,
        }
    }
}

/// An open (or resumed) handle: what the daemon said, and the descriptor.
#[derive(Debug)]
pub struct OpenedHandle {
    /// The daemon's reply.
    pub info: Opened,
    /// The open file. Use pread/pwrite on it.
    pub fd: OwnedFd,
}

type ReplySlot = Sender<(Result<Reply, WireError>, Vec<OwnedFd>)>;

struct Inner {
    sock: OwnedFd,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, ReplySlot>>,
    dead: AtomicBool,
}

/// A connection to filterd. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct FilterClient {
    inner: Arc<Inner>,
    _closer: Arc<Closer>,
    events: Receiver<Event>,
    hello: HelloReply,
    timeout: Duration,
}

fn connect_socket(path: &Path) -> Result<OwnedFd, ClientError> {
    let err = |source: std::io::Error| ClientError::Connect {
        path: path.display().to_string(),
        source,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
    connect(fd.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
    Ok(fd)
}

impl FilterClient {
    /// Attaches as a frontend of `protocol` named `instance`.
    pub fn connect_frontend(
        path: &Path,
        protocol: Protocol,
        instance: InstanceName,
    ) -> Result<Self, ClientError> {
        Self::connect(path, Role::Frontend { protocol, instance })
    }

    /// Attaches as an operator tool.
    pub fn connect_control(path: &Path) -> Result<Self, ClientError> {
        Self::connect(path, Role::Control)
    }

    /// Connects and exchanges hellos.
    pub fn connect(path: &Path, role: Role) -> Result<Self, ClientError> {
        let sock = connect_socket(path)?;
        let hello = proto::encode(&Hello {
            version: proto::PROTO_VERSION,
            features: proto::FEATURES,
            role,
        })?;
        sys::send_packet(sock.as_fd(), &hello, None)?;
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let reply = match sys::recv_packet(sock.as_fd(), &mut buf)? {
            Packet::Data { len, .. } => proto::decode_server(buf.get(..len).unwrap_or_default())?,
            Packet::Eof => return Err(ClientError::Disconnected),
            Packet::Truncated => {
                return Err(ClientError::Unexpected("oversized hello reply".into()))
            }
        };
        let hello = match reply {
            ServerFrame::Hello(h) => h,
            ServerFrame::Reply { result: Err(e), .. } => return Err(ClientError::Refused(e)),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        let inner = Arc::new(Inner {
            sock,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        let (ev_tx, ev_rx) = bounded(1024);
        let reader = inner.clone();
        std::thread::Builder::new()
            .name("filter-client-rx".into())
            .spawn(move || reader_loop(reader, ev_tx, buf))?;
        Ok(FilterClient {
            _closer: Arc::new(Closer(inner.clone())),
            inner,
            events: ev_rx,
            hello,
            timeout: DEFAULT_CALL_TIMEOUT,
        })
    }

    /// The daemon's hello (epoch, pid).
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// Pushed events; [`Event::ConnectionLost`] arrives when the daemon goes away.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Whether the connection is gone.
    pub fn is_dead(&self) -> bool {
        self.inner.dead.load(Ordering::Acquire)
    }

    /// Sets how long calls wait for their reply.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Sends any request and waits for its reply (and descriptors).
    pub fn call(&self, req: Request) -> Result<(Reply, Vec<OwnedFd>), ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = proto::encode(&RequestFrame { id, req })?;
        let (tx, rx) = bounded(1);
        {
            let mut p = self
                .inner
                .pending
                .lock()
                .map_err(|_| ClientError::Disconnected)?;
            if self.inner.dead.load(Ordering::Acquire) {
                return Err(ClientError::Disconnected);
            }
            p.insert(id, tx);
        }
        if let Err(e) = sys::send_packet(self.inner.sock.as_fd(), &bytes, None) {
            self.forget(id);
            return Err(if e.raw_os_error() == Some(libc::EPIPE) {
                ClientError::Disconnected
            } else {
                ClientError::Io(e)
            });
        }
        match rx.recv_timeout(self.timeout) {
            Ok((Ok(reply), fds)) => Ok((reply, fds)),
            Ok((Err(e), _)) => Err(ClientError::Refused(e)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                self.forget(id);
                Err(ClientError::Timeout(self.timeout))
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(ClientError::Disconnected)
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.inner.pending.lock() {
            p.remove(&id);
        }
    }

    fn expect_opened(r: (Reply, Vec<OwnedFd>)) -> Result<OpenedHandle, ClientError> {
        match r {
            (Reply::Opened(info), mut fds) if fds.len() == 1 => match fds.pop() {
                Some(fd) => Ok(OpenedHandle { info, fd }),
                None => Err(ClientError::Unexpected(
                    "open reply without descriptor".into(),
                )),
            },
            (other, fds) => Err(ClientError::Unexpected(format!(
                "{other:?} with {} fds",
                fds.len()
            ))),
        }
    }

    fn expect_done(r: (Reply, Vec<OwnedFd>)) -> Result<(), ClientError> {
        match r.0 {
            Reply::Done => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Opens a file.
    pub fn open(&self, req: OpenRequest) -> Result<OpenedHandle, ClientError> {
        Self::expect_opened(self.call(Request::Open(req))?)
    }

    /// Re-sends an open after a failure: returns the original open if the
    /// client's create GUID names one, else opens.
    pub fn replay_open(&self, req: OpenRequest) -> Result<OpenedHandle, ClientError> {
        Self::expect_opened(self.call(Request::ReplayOpen(req))?)
    }

    /// Records the reply of a mutating request (durable before this returns,
    /// for persistent handles and sessions).
    pub fn record_reply(
        &self,
        scope: ReplayScope,
        op_id: u64,
        reply: String,
        keep: u32,
    ) -> Result<(), ClientError> {
        Self::expect_done(self.call(Request::RecordReply {
            scope,
            op_id,
            reply,
            keep,
        })?)
    }

    /// The recorded reply of an op id.
    pub fn lookup_reply(
        &self,
        scope: ReplayScope,
        op_id: u64,
    ) -> Result<Option<ReplayRecord>, ClientError> {
        match self.call(Request::LookupReply { scope, op_id })?.0 {
            Reply::Recorded { record } => Ok(record),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Every handle, fetching page after page.
    pub fn handles(&self) -> Result<Vec<HandleView>, ClientError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            match self.call(Request::Handles { after })?.0 {
                Reply::Handles { handles, next } => {
                    out.extend(handles);
                    match next {
                        Some(k) => after = Some(k),
                        None => return Ok(out),
                    }
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Every file with handles, fetching page after page.
    pub fn files(&self) -> Result<Vec<FileView>, ClientError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            match self.call(Request::Files { after })?.0 {
                Reply::Files { files, next } => {
                    out.extend(files);
                    match next {
                        Some(f) => after = Some(f),
                        None => return Ok(out),
                    }
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Resumes a disconnected handle by its resume key.
    pub fn resume(&self, client: ClientId, key: ResumeKey) -> Result<OpenedHandle, ClientError> {
        Self::expect_opened(self.call(Request::Resume(ResumeRequest {
            client,
            target: ResumeTarget::Key { key },
        }))?)
    }

    /// Resumes a disconnected handle by the client's create GUID.
    pub fn resume_by_guid(
        &self,
        client: ClientId,
        create_guid: CreateGuid,
    ) -> Result<OpenedHandle, ClientError> {
        Self::expect_opened(self.call(Request::Resume(ResumeRequest {
            client,
            target: ResumeTarget::CreateGuid { create_guid },
        }))?)
    }

    /// Closes a handle for good.
    pub fn close(&self, key: ResumeKey) -> Result<(), ClientError> {
        Self::expect_done(self.call(Request::Close { key })?)
    }

    /// Tells the daemon the handle's client went away.
    pub fn detach(&self, key: ResumeKey) -> Result<(), ClientError> {
        Self::expect_done(self.call(Request::Detach { key })?)
    }
}

fn fail_all(inner: &Inner) {
    inner.dead.store(true, Ordering::Release);
    if let Ok(mut p) = inner.pending.lock() {
        // Dropping the senders wakes every waiter with Disconnected.
        p.clear();
    }
}

fn reader_loop(inner: Arc<Inner>, events: Sender<Event>, mut buf: Vec<u8>) {
    loop {
        let (len, fds) = match sys::recv_packet(inner.sock.as_fd(), &mut buf) {
            Ok(Packet::Data { len, fds }) => (len, fds),
            Ok(Packet::Truncated) => {
                tracing::warn!("filterd sent an oversized frame; dropping the connection");
                break;
            }
            Ok(Packet::Eof) | Err(_) => break,
        };
        let frame = match proto::decode_server(buf.get(..len).unwrap_or_default()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame from filterd");
                continue;
            }
        };
        match frame {
            ServerFrame::Reply {
                id: Some(id),
                result,
            } => {
                let slot = inner.pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(tx) = slot {
                    let _ = tx.send((result, fds));
                }
            }
            ServerFrame::Reply { id: None, result } => {
                tracing::warn!(?result, "filterd rejected a frame it could not attribute");
            }
            ServerFrame::Event(ev) => {
                let _ = events.try_send(ev);
            }
            ServerFrame::Hello(_) => {}
        }
    }
    fail_all(&inner);
    let _ = events.try_send(Event::ConnectionLost);
}

/// Held only by [`FilterClient`] clones (not by the reader thread): when the
/// last clone goes, the socket is shut down, which also ends the reader.
struct Closer(Arc<Inner>);

impl Drop for Closer {
    fn drop(&mut self) {
        let _ =
            nix::sys::socket::shutdown(self.0.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}
