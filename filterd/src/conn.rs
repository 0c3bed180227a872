//! The Unix socket: accepting peers, reading their frames, writing replies.
//!
//! One named reader thread per connection turns packets into [`Command`]s and
//! sends them over the bounded channel to the engine thread, the single owner
//! of state. Nothing here touches state. Replies are written by whichever
//! thread holds the reply (the engine for non-durable work, the committer
//! after an fsync) through the connection's [`ConnWriter`]; a SEQPACKET send is
//! atomic, so concurrent writers never interleave.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, Sender};
use libfilter::proto::{self, ErrorCode, HelloReply, ServerFrame, WireError, MAX_FRAME};
use libfilter::sys::{self, Packet};
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily,
    Backlog, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;

use crate::engine::{Command, ConnId, Peer};

/// A peer that does not read its replies for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The writing half of a connection, shared by the engine and the committer.
pub struct ConnWriter {
    sock: Arc<OwnedFd>,
    dead: AtomicBool,
}

impl ConnWriter {
    /// Sends one frame (with an optional descriptor). A failed send marks the
    /// connection dead and shuts it down, which ends its reader.
    pub fn send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> bool {
        if self.dead.load(Ordering::Acquire) {
            return false;
        }
        match sys::send_packet(self.sock.as_fd(), bytes, fd) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "dropping a peer that cannot take its reply");
                self.kill();
                false
            }
        }
    }

    /// Encodes and sends a frame.
    pub fn send_frame(&self, frame: &ServerFrame, fd: Option<BorrowedFd<'_>>) -> bool {
        match proto::encode(frame) {
            Ok(b) => self.send(&b, fd),
            Err(e) => {
                tracing::error!(error = %e, "could not encode a reply");
                false
            }
        }
    }

    /// Shuts the connection down.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

/// Creates the listening socket at `path`: refuses to steal a live socket,
/// replaces a stale one, sets mode 0660.
pub fn listen_at(path: &Path) -> anyhow::Result<OwnedFd> {
    if path.exists() {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(fd)
}

/// Whether a peer may attach: root, our own user, or a member of the socket's
/// group (the 0660 mode already limits who can connect; this double-checks).
fn peer_allowed(peer: &Peer, sock_gid: u32) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    peer.uid == 0 || peer.uid == me || peer.gid == sock_gid
}

/// Accepts connections forever, one reader thread each.
pub fn accept_loop(listener: OwnedFd, socket_path: PathBuf, engine: Sender<Command>) {
    let next_id = AtomicU64::new(1);
    let sock_gid = std::fs::metadata(&socket_path)
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .unwrap_or(0);
    loop {
        let raw = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => continue,
            Err(nix::errno::Errno::EMFILE) | Err(nix::errno::Errno::ENFILE) => {
                tracing::error!("out of file descriptors; not accepting for 100 ms");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "accept failed; listener stops");
                return;
            }
        };
        let sock = sys::own_accepted(raw);
        let peer = match getsockopt(&sock, sockopt::PeerCredentials) {
            Ok(c) => Peer {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no peer credentials; refusing");
                continue;
            }
        };
        if !peer_allowed(&peer, sock_gid) {
            tracing::warn!(
                pid = peer.pid,
                uid = peer.uid,
                "peer not allowed (uid/gid); refusing"
            );
            continue;
        }
        let _ = setsockopt(
            &sock,
            sockopt::SendTimeout,
            &TimeVal::new(SEND_TIMEOUT.as_secs() as i64, 0),
        );
        let id = ConnId(next_id.fetch_add(1, Ordering::Relaxed));
        let tx = engine.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{}", id.0))
            .spawn(move || read_loop(id, Arc::new(sock), peer, tx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot spawn a connection thread");
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

/// Reads one connection: the hello first, then requests until EOF.
fn read_loop(conn: ConnId, sock: Arc<OwnedFd>, peer: Peer, engine: Sender<Command>) {
    let writer = Arc::new(ConnWriter {
        sock: sock.clone(),
        dead: AtomicBool::new(false),
    });
    let mut buf = vec![0u8; MAX_FRAME + 1];
    // Hello.
    let hello = match sys::recv_packet(sock.as_fd(), &mut buf) {
        Ok(Packet::Data { len, .. }) => proto::decode_hello(buf.get(..len).unwrap_or_default()),
        Ok(Packet::Truncated) => Err(WireError::new(
            ErrorCode::BadFrame,
            format!("hello exceeds {MAX_FRAME} bytes"),
        )),
        Ok(Packet::Eof) | Err(_) => return,
    };
    let hello = match hello {
        Ok(h) if h.version == proto::PROTO_VERSION => h,
        Ok(h) => {
            reject(
                &writer,
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
            let _ = engine.send(Command::BadFrame);
            return;
        }
        Err(e) => {
            reject(&writer, None, e);
            let _ = engine.send(Command::BadFrame);
            return;
        }
    };
    let (reply_tx, reply_rx) = bounded::<Result<HelloReply, WireError>>(1);
    if engine
        .send(Command::Hello {
            conn,
            hello,
            peer,
            writer: writer.clone(),
            reply: reply_tx,
        })
        .is_err()
    {
        return;
    }
    match reply_rx.recv() {
        Ok(Ok(h)) => {
            if !writer.send_frame(&ServerFrame::Hello(h), None) {
                let _ = engine.send(Command::Closed { conn });
                return;
            }
        }
        Ok(Err(e)) => {
            reject(&writer, None, e);
            return;
        }
        Err(_) => return,
    }
    // Requests.
    loop {
        match sys::recv_packet(sock.as_fd(), &mut buf) {
            Ok(Packet::Data { len, fds }) => {
                drop(fds); // peers never send us descriptors
                match proto::decode_request(buf.get(..len).unwrap_or_default()) {
                    Ok(frame) => {
                        if engine.send(Command::Request { conn, frame }).is_err() {
                            break;
                        }
                    }
                    Err((id, e)) => {
                        tracing::warn!(conn = conn.0, error = %e, "malformed request");
                        reject(&writer, id, e);
                        let _ = engine.send(Command::BadFrame);
                    }
                }
            }
            Ok(Packet::Truncated) => {
                reject(
                    &writer,
                    None,
                    WireError::new(
                        ErrorCode::BadFrame,
                        format!("frame exceeds {MAX_FRAME} bytes"),
                    ),
                );
                let _ = engine.send(Command::BadFrame);
            }
            Ok(Packet::Eof) | Err(_) => break,
        }
        if writer.dead.load(Ordering::Acquire) {
            break;
        }
    }
    let _ = engine.send(Command::Closed { conn });
}
