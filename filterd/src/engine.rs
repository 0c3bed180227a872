//! The state engine: the one thread that owns every handle.
//!
//! Connection threads send [`Command`]s over a bounded channel; the engine
//! drains a batch, runs one exhaustive `match` per command, performs the
//! filesystem effects beneath the root, and collects the store operations the
//! batch produced. Replies that depend on persistent state are *deferred*:
//! they travel with the batch's store operations to the committer thread
//! ([`crate::committer`]), which commits them in one fsync'd LMDB transaction
//! (merging every batch that queued meanwhile — group commit) and only then
//! sends them (invariant 1). Replies that change nothing persistent are sent at
//! once, so non-durable work never waits on an fsync.
//!
//! Decisions that need no I/O (share modes) come from the pure
//! [`libfilter::share`] algebra.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use libfilter::model::{
    now_ms, ClientId, ConnState, CreateAction, CreateGuid, Disposition, Durability, FileId,
    HandleRecord, InstanceName, ResumeKey,
};
use libfilter::proto::{
    self, ErrorCode, Event, FileHolder, FileView, FrontendView, HandleView, Hello, HelloReply,
    OpenRequest, Opened, Reply, Request, RequestFrame, ResumeRequest, ResumeTarget, Role,
    ServerFrame, Stats, StatusInfo, WireError,
};
use libfilter::share::{self, Holder, HolderState, ShareDecision, ShareMode};
use libfilter::store::{Store, StoreOp};
use tracing::{debug, error, info, warn};

use crate::conn::ConnWriter;
use crate::fsops;

/// Identifies one accepted connection for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// SO_PEERCRED of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// What connection threads and the committer tell the engine.
pub enum Command {
    /// A peer said hello; the engine registers it and answers on `reply`.
    Hello {
        /// The connection.
        conn: ConnId,
        /// What it said.
        hello: Hello,
        /// Its credentials.
        peer: Peer,
        /// Where its replies go.
        writer: Arc<ConnWriter>,
        /// The answer to the hello.
        reply: Sender<Result<HelloReply, WireError>>,
    },
    /// A decoded request.
    Request {
        /// The connection.
        conn: ConnId,
        /// The request.
        frame: RequestFrame,
    },
    /// A connection ended.
    Closed {
        /// The connection.
        conn: ConnId,
    },
    /// A connection thread refused a malformed frame (for the counters).
    BadFrame,
    /// A commit failed: these persistent opens never became durable and are
    /// rolled back (their clients got an error).
    CommitFailed {
        /// Handles opened in the failed batch.
        opened: Vec<ResumeKey>,
    },
    /// Stop: flush, then return.
    Shutdown,
}

/// A reply held back until its store operations are durable.
pub struct Deferred {
    /// Where it goes.
    pub writer: Arc<ConnWriter>,
    /// The request id (to turn it into an error if the commit fails).
    pub id: u64,
    /// The encoded success frame.
    pub bytes: Vec<u8>,
    /// A descriptor to pass along (a dup the committer may close).
    pub fd: Option<OwnedFd>,
}

/// One batch for the committer.
pub struct CommitJob {
    /// Store operations, in order.
    pub ops: Vec<StoreOp>,
    /// Replies to send once they are durable.
    pub replies: Vec<Deferred>,
    /// Persistent opens in this batch, to roll back if the commit fails.
    pub opened: Vec<ResumeKey>,
}

/// Counters the committer maintains.
#[derive(Default)]
pub struct CommitCounters {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Operations committed.
    pub ops: AtomicU64,
}

/// Engine settings.
pub struct Config {
    /// Cap on durable timeouts.
    pub max_durable_timeout_ms: u32,
    /// Export root, for status.
    pub root_display: String,
    /// State dir, for status.
    pub state_display: String,
    /// Whether fanotify mediation is on.
    pub fanotify: bool,
}

struct Conn {
    role: Role,
    writer: Arc<ConnWriter>,
    peer: Peer,
    attached_ms: u64,
    handles: HashSet<ResumeKey>,
}

struct Handle {
    rec: HandleRecord,
    /// The daemon's descriptor (None only for lost handles).
    fd: Option<OwnedFd>,
    /// The connection it is attached to.
    conn: Option<ConnId>,
    /// Bumped at every disconnect, so an older expiry timer never reaps a
    /// handle that was resumed and disconnected again since.
    gen: u64,
}

/// Most commands drained into one batch.
const MAX_BATCH: usize = 1024;

/// The engine.
pub struct Engine {
    cfg: Config,
    root: OwnedFd,
    epoch: u64,
    started: Instant,
    handles: HashMap<ResumeKey, Handle>,
    by_file: HashMap<FileId, Vec<ResumeKey>>,
    by_guid: HashMap<(ClientId, CreateGuid), ResumeKey>,
    conns: HashMap<ConnId, Conn>,
    instances: HashMap<InstanceName, ConnId>,
    expiries: BinaryHeap<Reverse<(u64, ResumeKey, u64)>>,
    stats: Stats,
    commit_counters: Arc<CommitCounters>,
    ops: Vec<StoreOp>,
    deferred: Vec<Deferred>,
    opened: Vec<ResumeKey>,
    commit_tx: Sender<CommitJob>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

impl Engine {
    /// Builds an engine over the export root's descriptor.
    pub fn new(
        cfg: Config,
        root: OwnedFd,
        epoch: u64,
        commit_tx: Sender<CommitJob>,
        commit_counters: Arc<CommitCounters>,
    ) -> Self {
        Engine {
            cfg,
            root,
            epoch,
            started: Instant::now(),
            handles: HashMap::new(),
            by_file: HashMap::new(),
            by_guid: HashMap::new(),
            conns: HashMap::new(),
            instances: HashMap::new(),
            expiries: BinaryHeap::new(),
            stats: Stats::default(),
            commit_counters,
            ops: Vec::new(),
            deferred: Vec::new(),
            opened: Vec::new(),
            commit_tx,
        }
    }

    /// Restart recovery: reopens every persistent handle in the store by its
    /// kernel file handle (a renamed file is still found), as disconnected
    /// with a fresh timeout (time the daemon was down does not count). A
    /// handle whose file is gone is kept as *lost* for the operator to see.
    /// Runs before the socket accepts anyone, so no conflicting open can slip
    /// in ahead of restored state (invariant 5).
    pub fn recover(&mut self, store: &Store) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let mut updates = Vec::new();
        let now = now_ms();
        let mut corrupt = 0u64;
        for r in store.handles()? {
            let mut rec = match r {
                Ok(rec) => rec,
                Err(e) => {
                    error!(error = %e, "stored handle record does not decode; left in place for inspection");
                    corrupt += 1;
                    continue;
                }
            };
            if !rec.durability.is_persistent() {
                updates.push(StoreOp::DeleteHandle(Box::new(rec)));
                continue;
            }
            let timeout = u64::from(rec.durability.timeout_ms().unwrap_or(0));
            let reopened = match (&rec.kernel_handle, rec.conn) {
                (_, ConnState::Lost) => None,
                (Some(kh), _) => match fsops::reopen(self.root.as_fd(), kh, rec.access) {
                    Ok(x) => Some(x),
                    Err(e) => {
                        warn!(resume_key = %rec.key, path = %rec.path, error = %e, "persistent handle lost: file cannot be reopened");
                        None
                    }
                },
                (None, _) => None,
            };
            let fd = match reopened {
                Some((fd, file, _size)) => {
                    rec.file = file;
                    rec.conn = ConnState::Disconnected {
                        since_ms: now,
                        expires_ms: now + timeout,
                    };
                    self.stats.recoveries += 1;
                    Some(fd)
                }
                None => {
                    rec.conn = ConnState::Lost;
                    self.stats.recoveries_lost += 1;
                    None
                }
            };
            updates.push(StoreOp::PutHandle(Box::new(rec.clone())));
            if let ConnState::Disconnected { expires_ms, .. } = rec.conn {
                self.expiries.push(Reverse((expires_ms, rec.key, 0)));
            }
            self.insert(Handle {
                rec,
                fd,
                conn: None,
                gen: 0,
            });
        }
        if !updates.is_empty() {
            store.apply(&updates)?;
        }
        info!(
            recovered = self.stats.recoveries,
            lost = self.stats.recoveries_lost,
            corrupt,
            elapsed_ms = millis(t0.elapsed()),
            "recovery done"
        );
        Ok(())
    }

    /// Runs until [`Command::Shutdown`] or until every sender is gone.
    pub fn run(mut self, rx: Receiver<Command>) {
        loop {
            let wait = self.next_wakeup();
            let first = match rx.recv_timeout(wait) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut stop = false;
            if let Some(c) = first {
                stop |= self.handle(c);
                let mut n = 1;
                while n < MAX_BATCH && !stop {
                    match rx.try_recv() {
                        Ok(c) => stop |= self.handle(c),
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
            self.expire_due(now_ms());
            self.flush();
            if stop {
                break;
            }
        }
        self.flush();
        info!("engine stopped");
    }

    fn next_wakeup(&self) -> Duration {
        let now = now_ms();
        match self.expiries.peek() {
            Some(Reverse((t, _, _))) => Duration::from_millis(t.saturating_sub(now).clamp(1, 1000)),
            None => Duration::from_secs(1),
        }
    }

    /// Hands the batch's store operations and deferred replies to the committer.
    fn flush(&mut self) {
        if self.ops.is_empty() {
            // Deferred replies exist only with operations; nothing to wait for.
            for d in self.deferred.drain(..) {
                d.writer.send(&d.bytes, d.fd.as_ref().map(|f| f.as_fd()));
            }
            return;
        }
        let job = CommitJob {
            ops: std::mem::take(&mut self.ops),
            replies: std::mem::take(&mut self.deferred),
            opened: std::mem::take(&mut self.opened),
        };
        if self.commit_tx.send(job).is_err() {
            error!("committer is gone; persistent changes cannot be made durable");
        }
    }

    /// Returns true to stop.
    fn handle(&mut self, c: Command) -> bool {
        match c {
            Command::Hello {
                conn,
                hello,
                peer,
                writer,
                reply,
            } => {
                let r = self.on_hello(conn, hello, peer, writer);
                let _ = reply.send(r);
            }
            Command::Request { conn, frame } => self.on_request(conn, frame),
            Command::Closed { conn } => self.on_closed(conn),
            Command::BadFrame => self.stats.bad_frames += 1,
            Command::CommitFailed { opened } => {
                for k in opened {
                    if let Some(h) = self.remove(k) {
                        warn!(resume_key = %k, path = %h.rec.path, "rolled back a persistent open whose commit failed");
                    }
                }
            }
            Command::Shutdown => return true,
        }
        false
    }

    fn on_hello(
        &mut self,
        conn: ConnId,
        hello: Hello,
        peer: Peer,
        writer: Arc<ConnWriter>,
    ) -> Result<HelloReply, WireError> {
        if let Role::Frontend { protocol, instance } = &hello.role {
            if let Some(other) = self.instances.get(instance).and_then(|c| self.conns.get(c)) {
                return Err(err(
                    ErrorCode::InstanceBusy,
                    format!(
                        "frontend instance {instance} is attached already (pid {})",
                        other.peer.pid
                    ),
                ));
            }
            self.instances.insert(instance.clone(), conn);
            self.stats.frontends_attached += 1;
            let orphans = self
                .handles
                .values()
                .filter(|h| h.rec.frontend == *instance && h.conn.is_none())
                .count();
            info!(%protocol, %instance, pid = peer.pid, uid = peer.uid, disconnected_handles = orphans, "frontend attached");
        }
        self.conns.insert(
            conn,
            Conn {
                role: hello.role,
                writer,
                peer,
                attached_ms: now_ms(),
                handles: HashSet::new(),
            },
        );
        Ok(HelloReply {
            version: proto::PROTO_VERSION,
            features: 0,
            epoch: self.epoch,
            pid: std::process::id(),
        })
    }

    fn on_closed(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Role::Frontend { instance, .. } = &c.role {
            if self.instances.get(instance) == Some(&conn) {
                self.instances.remove(instance);
            }
            self.stats.frontends_lost += 1;
            let (mut kept, mut closed) = (0, 0);
            for k in c.handles {
                if self.detach(k) {
                    kept += 1;
                } else {
                    closed += 1;
                }
            }
            info!(%instance, pid = c.peer.pid, disconnected = kept, closed, "frontend lost");
        }
    }

    fn on_request(&mut self, conn: ConnId, frame: RequestFrame) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let writer = c.writer.clone();
        let role = c.role.clone();
        let span = tracing::debug_span!(
            "request",
            conn = conn.0,
            id = frame.id,
            op = frame.req.name(),
            resume_key = tracing::field::Empty
        );
        let _enter = span.enter();
        let ops_before = self.ops.len();
        let (result, fd_of) = match self.dispatch(conn, &role, frame.req) {
            Ok((reply, fd_of)) => (Ok(reply), fd_of),
            Err(e) => {
                debug!(code = ?e.code, error = %e.message, "refused");
                (Err(e), None)
            }
        };
        let out = ServerFrame::Reply {
            id: Some(frame.id),
            result,
        };
        let fd = fd_of
            .and_then(|k| self.handles.get(&k))
            .and_then(|h| h.fd.as_ref());
        if self.ops.len() > ops_before {
            let bytes = match proto::encode(&out) {
                Ok(b) => b,
                Err(e) => {
                    error!(error = %e, "cannot encode reply");
                    return;
                }
            };
            let fd = match fd.map(|f| f.try_clone()) {
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => {
                    error!(error = %e, "cannot duplicate descriptor for a deferred reply");
                    None
                }
                None => None,
            };
            self.deferred.push(Deferred {
                writer,
                id: frame.id,
                bytes,
                fd,
            });
        } else {
            writer.send_frame(&out, fd.map(|f| f.as_fd()));
        }
    }

    /// Runs one request. Returns the reply and, for opens and resumes, the
    /// handle whose descriptor goes with it.
    fn dispatch(
        &mut self,
        conn: ConnId,
        role: &Role,
        req: Request,
    ) -> Result<(Reply, Option<ResumeKey>), WireError> {
        let frontend = match role {
            Role::Frontend { protocol, instance } => Some((protocol.clone(), instance.clone())),
            Role::Control => None,
        };
        let need_frontend = || {
            frontend.clone().ok_or_else(|| {
                err(
                    ErrorCode::NotPermitted,
                    "only a frontend may open, resume, close or detach",
                )
            })
        };
        let need_control = || match role {
            Role::Control => Ok(()),
            Role::Frontend { .. } => Err(err(
                ErrorCode::NotPermitted,
                "only a control connection may expire handles",
            )),
        };
        match req {
            Request::Open(o) => {
                let (protocol, instance) = need_frontend()?;
                self.open(conn, protocol, instance, o)
            }
            Request::Resume(r) => {
                let (protocol, instance) = need_frontend()?;
                self.resume(conn, protocol, instance, r)
            }
            Request::Close { key } => {
                need_frontend()?;
                self.attached_to(conn, key)?;
                self.remove(key);
                self.stats.closes += 1;
                Ok((Reply::Done, None))
            }
            Request::Detach { key } => {
                need_frontend()?;
                self.attached_to(conn, key)?;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.handles.remove(&key);
                }
                self.detach(key);
                Ok((Reply::Done, None))
            }
            Request::Status => Ok((Reply::Status(self.status()), None)),
            Request::Handles => {
                let mut v: Vec<HandleView> = self.handles.values().map(view).collect();
                v.sort_by_key(|h| (h.record.opened_ms, h.record.key));
                Ok((Reply::Handles { handles: v }, None))
            }
            Request::Handle { key } => self
                .handles
                .get(&key)
                .map(|h| (Reply::Handle(view(h)), None))
                .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}"))),
            Request::Files => Ok((
                Reply::Files {
                    files: self.files(),
                },
                None,
            )),
            Request::Frontends => Ok((
                Reply::Frontends {
                    frontends: self.frontends(),
                },
                None,
            )),
            Request::Stats => {
                let mut s = self.stats.clone();
                s.commits = self.commit_counters.commits.load(Ordering::Relaxed);
                s.committed_ops = self.commit_counters.ops.load(Ordering::Relaxed);
                Ok((Reply::Stats(s), None))
            }
            Request::Expire { key } => {
                need_control()?;
                let h = self
                    .handles
                    .get(&key)
                    .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
                if h.conn.is_some() {
                    return Err(err(
                        ErrorCode::NotPermitted,
                        format!("handle {key} is connected; only disconnected or lost handles can be expired"),
                    ));
                }
                self.expire(key);
                Ok((Reply::Done, None))
            }
            Request::PurgeDisconnected => {
                need_control()?;
                let keys: Vec<ResumeKey> = self
                    .handles
                    .values()
                    .filter(|h| h.conn.is_none())
                    .map(|h| h.rec.key)
                    .collect();
                let count = keys.len() as u64;
                for k in keys {
                    self.expire(k);
                }
                Ok((Reply::Purged { count }, None))
            }
        }
    }

    fn attached_to(&self, conn: ConnId, key: ResumeKey) -> Result<(), WireError> {
        match self.handles.get(&key) {
            Some(h) if h.conn == Some(conn) => Ok(()),
            Some(_) => Err(err(
                ErrorCode::NotOwner,
                format!("handle {key} is not attached to this connection"),
            )),
            None => Err(err(ErrorCode::NoSuchHandle, format!("no handle {key}"))),
        }
    }

    fn open(
        &mut self,
        conn: ConnId,
        protocol: libfilter::model::Protocol,
        instance: InstanceName,
        o: OpenRequest,
    ) -> Result<(Reply, Option<ResumeKey>), WireError> {
        let durability = o.durability.normalized(self.cfg.max_durable_timeout_ms);
        if let Some(g) = o.create_guid {
            if let Some(k) = self.by_guid.get(&(o.client.clone(), g)) {
                self.stats.opens_refused += 1;
                return Err(err(
                    ErrorCode::DuplicateCreateGuid,
                    format!("client already has open {k} with create GUID {g}"),
                ));
            }
        }
        let of =
            fsops::open(self.root.as_fd(), &o.path, o.access, o.disposition).inspect_err(|_| {
                self.stats.opens_refused += 1;
            })?;
        crate::failpoint::hit("open.after_fs");
        let mode = ShareMode {
            access: o.access.rights(),
            share: o.share,
        };
        let holders: Vec<Holder<ResumeKey>> = self
            .by_file
            .get(&of.file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .map(|h| Holder {
                key: h.rec.key,
                mode: ShareMode {
                    access: h.rec.access.rights(),
                    share: h.rec.share,
                },
                state: holder_state(h),
            })
            .collect();
        match share::decide(mode, holders) {
            ShareDecision::Violation => {
                self.stats.opens_refused += 1;
                self.stats.sharing_violations += 1;
                return Err(err(
                    ErrorCode::SharingViolation,
                    format!("{}: an open of the file does not share this access", o.path),
                ));
            }
            ShareDecision::NotAvailable => {
                self.stats.opens_refused += 1;
                self.stats.not_available += 1;
                return Err(err(
                    ErrorCode::FileNotAvailable,
                    format!(
                        "{}: held by a disconnected persistent open; retry later",
                        o.path
                    ),
                ));
            }
            ShareDecision::Grant { purge } => {
                for k in purge {
                    self.purge(k);
                }
            }
        }
        let (create_action, size) = if of.created {
            (CreateAction::Created, of.size)
        } else {
            match o.disposition {
                Disposition::Overwrite | Disposition::OverwriteIf => {
                    fsops::truncate(self.root.as_fd(), &o.path, of.file)?;
                    (CreateAction::Overwritten, 0)
                }
                Disposition::Supersede => {
                    fsops::truncate(self.root.as_fd(), &o.path, of.file)?;
                    (CreateAction::Superseded, 0)
                }
                Disposition::Open | Disposition::OpenIf | Disposition::Create => {
                    (CreateAction::Opened, of.size)
                }
            }
        };
        let kernel_handle = match durability {
            Durability::None => None,
            Durability::Durable { .. } => libfilter::sys::file_handle_of(of.fd.as_fd()).ok(),
            Durability::Persistent { .. } => Some(libfilter::sys::file_handle_of(of.fd.as_fd()).map_err(|e| {
                self.stats.opens_refused += 1;
                err(
                    ErrorCode::Unsupported,
                    format!("{}: this filesystem has no file handles ({e}); persistent opens need them", o.path),
                )
            })?),
        };
        let key = ResumeKey::new_random();
        tracing::Span::current().record("resume_key", tracing::field::display(key));
        let rec = HandleRecord {
            key,
            protocol,
            frontend: instance,
            client: o.client,
            create_guid: o.create_guid,
            owner: o.owner,
            path: o.path,
            file: of.file,
            kernel_handle,
            access: o.access,
            share: o.share,
            durability,
            conn: ConnState::Connected,
            create_action,
            opened_ms: now_ms(),
        };
        if durability.is_persistent() {
            self.ops.push(StoreOp::PutHandle(Box::new(rec.clone())));
            self.opened.push(key);
        }
        debug!(resume_key = %key, path = %rec.path, action = %create_action, durability = durability.word(), "opened");
        self.insert(Handle {
            rec,
            fd: Some(of.fd),
            conn: Some(conn),
            gen: 0,
        });
        if let Some(c) = self.conns.get_mut(&conn) {
            c.handles.insert(key);
        }
        self.stats.opens += 1;
        Ok((
            Reply::Opened(Opened {
                key,
                create_action,
                size,
                file: of.file,
                durability,
            }),
            Some(key),
        ))
    }

    fn resume(
        &mut self,
        conn: ConnId,
        protocol: libfilter::model::Protocol,
        instance: InstanceName,
        r: ResumeRequest,
    ) -> Result<(Reply, Option<ResumeKey>), WireError> {
        let key = match r.target {
            ResumeTarget::Key { key } => key,
            ResumeTarget::CreateGuid { create_guid } => *self
                .by_guid
                .get(&(r.client.clone(), create_guid))
                .ok_or_else(|| {
                    err(
                        ErrorCode::NoSuchHandle,
                        format!("no open with create GUID {create_guid}"),
                    )
                })?,
        };
        tracing::Span::current().record("resume_key", tracing::field::display(key));
        let h = self
            .handles
            .get_mut(&key)
            .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
        if h.rec.protocol != protocol || h.rec.client != r.client {
            return Err(err(
                ErrorCode::NotOwner,
                format!("handle {key} belongs to another client or protocol"),
            ));
        }
        match h.rec.conn {
            ConnState::Connected => {
                return Err(err(
                    ErrorCode::NoSuchHandle,
                    format!("handle {key} is attached, not disconnected"),
                ))
            }
            ConnState::Lost => {
                return Err(err(
                    ErrorCode::NoSuchHandle,
                    format!("handle {key} lost its file"),
                ))
            }
            ConnState::Disconnected { .. } => {}
        }
        let size = match &h.fd {
            Some(fd) => fsops::stat(fd.as_fd()).map(|(_, s)| s).unwrap_or(0),
            None => 0,
        };
        h.rec.conn = ConnState::Connected;
        h.rec.frontend = instance;
        h.conn = Some(conn);
        h.gen += 1;
        if h.rec.durability.is_persistent() {
            self.ops.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
        }
        let opened = Opened {
            key,
            create_action: h.rec.create_action,
            size,
            file: h.rec.file,
            durability: h.rec.durability,
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.handles.insert(key);
        }
        self.stats.resumes += 1;
        debug!(resume_key = %key, "resumed");
        Ok((Reply::Opened(opened), Some(key)))
    }

    fn insert(&mut self, h: Handle) {
        let key = h.rec.key;
        self.by_file.entry(h.rec.file).or_default().push(key);
        if let Some(g) = h.rec.create_guid {
            self.by_guid.insert((h.rec.client.clone(), g), key);
        }
        self.handles.insert(key, h);
    }

    /// Removes a handle for good (closing its descriptor); persistent ones
    /// are deleted from the store in this batch.
    fn remove(&mut self, key: ResumeKey) -> Option<Handle> {
        let h = self.handles.remove(&key)?;
        if let Some(v) = self.by_file.get_mut(&h.rec.file) {
            v.retain(|k| *k != key);
            if v.is_empty() {
                self.by_file.remove(&h.rec.file);
            }
        }
        if let Some(g) = h.rec.create_guid {
            let gk = (h.rec.client.clone(), g);
            if self.by_guid.get(&gk) == Some(&key) {
                self.by_guid.remove(&gk);
            }
        }
        if let Some(c) = h.conn.and_then(|c| self.conns.get_mut(&c)) {
            c.handles.remove(&key);
        }
        if h.rec.durability.is_persistent() {
            self.ops
                .push(StoreOp::DeleteHandle(Box::new(h.rec.clone())));
        }
        Some(h)
    }

    /// The handle's client went away: durable and persistent handles become
    /// disconnected with their timeout, others are closed. Returns whether
    /// the handle was kept.
    fn detach(&mut self, key: ResumeKey) -> bool {
        let Some(h) = self.handles.get_mut(&key) else {
            return false;
        };
        let Some(timeout) = h.rec.durability.timeout_ms() else {
            self.remove(key);
            return false;
        };
        let now = now_ms();
        let expires_ms = now + u64::from(timeout);
        h.rec.conn = ConnState::Disconnected {
            since_ms: now,
            expires_ms,
        };
        h.conn = None;
        h.gen += 1;
        self.expiries.push(Reverse((expires_ms, key, h.gen)));
        if h.rec.durability.is_persistent() {
            self.ops.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
        }
        self.stats.disconnects += 1;
        debug!(resume_key = %key, timeout_ms = timeout, "disconnected");
        true
    }

    fn notify_instance(&self, instance: &InstanceName, ev: Event) {
        if let Some(c) = self.instances.get(instance).and_then(|c| self.conns.get(c)) {
            c.writer.send_frame(&ServerFrame::Event(ev), None);
        }
    }

    fn expire(&mut self, key: ResumeKey) {
        if let Some(h) = self.remove(key) {
            self.stats.expiries += 1;
            info!(resume_key = %key, path = %h.rec.path, "handle expired");
            self.notify_instance(&h.rec.frontend, Event::Expired { key });
        }
    }

    fn purge(&mut self, key: ResumeKey) {
        if let Some(h) = self.remove(key) {
            self.stats.purges += 1;
            info!(resume_key = %key, path = %h.rec.path, "disconnected durable handle purged by a conflicting open");
            self.notify_instance(&h.rec.frontend, Event::Purged { key });
        }
    }

    fn expire_due(&mut self, now: u64) {
        while let Some(Reverse((t, key, gen))) = self.expiries.peek().copied() {
            if t > now {
                break;
            }
            self.expiries.pop();
            let due = self.handles.get(&key).is_some_and(|h| {
                h.gen == gen && matches!(h.rec.conn, ConnState::Disconnected { .. })
            });
            if due {
                self.expire(key);
            }
        }
    }

    fn status(&self) -> StatusInfo {
        let count = |f: fn(&ConnState) -> bool| {
            self.handles.values().filter(|h| f(&h.rec.conn)).count() as u64
        };
        StatusInfo {
            pid: std::process::id(),
            epoch: self.epoch,
            root: self.cfg.root_display.clone(),
            state_dir: self.cfg.state_display.clone(),
            uptime_ms: millis(self.started.elapsed()),
            handles_connected: count(|c| matches!(c, ConnState::Connected)),
            handles_disconnected: count(|c| matches!(c, ConnState::Disconnected { .. })),
            handles_lost: count(|c| matches!(c, ConnState::Lost)),
            frontends: self.instances.len() as u64,
            recovering: false,
            fanotify: self.cfg.fanotify,
            schema_version: libfilter::store::SCHEMA_VERSION,
        }
    }

    fn files(&self) -> Vec<FileView> {
        let mut v: Vec<FileView> = self
            .by_file
            .iter()
            .filter_map(|(file, keys)| {
                let hs: Vec<&Handle> = keys.iter().filter_map(|k| self.handles.get(k)).collect();
                let first = hs.first()?;
                Some(FileView {
                    file: *file,
                    path: first.rec.path.clone(),
                    holders: hs
                        .iter()
                        .map(|h| FileHolder {
                            key: h.rec.key,
                            access: h.rec.access,
                            share: h.rec.share,
                            durability: h.rec.durability,
                            conn: h.rec.conn,
                        })
                        .collect(),
                })
            })
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    fn frontends(&self) -> Vec<FrontendView> {
        let mut v: Vec<FrontendView> = self
            .conns
            .values()
            .filter_map(|c| match &c.role {
                Role::Frontend { protocol, instance } => Some(FrontendView {
                    protocol: protocol.clone(),
                    instance: instance.clone(),
                    pid: c.peer.pid,
                    uid: c.peer.uid,
                    attached_ms: c.attached_ms,
                    handles: c.handles.len() as u64,
                }),
                Role::Control => None,
            })
            .collect();
        v.sort_by(|a, b| a.instance.cmp(&b.instance));
        v
    }
}

fn holder_state(h: &Handle) -> HolderState {
    match h.rec.conn {
        ConnState::Connected => HolderState::Live,
        ConnState::Lost => HolderState::Lost,
        ConnState::Disconnected { .. } if h.rec.durability.is_persistent() => {
            HolderState::DisconnectedPersistent
        }
        ConnState::Disconnected { .. } => HolderState::DisconnectedDurable,
    }
}

fn view(h: &Handle) -> HandleView {
    HandleView {
        record: h.rec.clone(),
        fd_open: h.fd.is_some(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
