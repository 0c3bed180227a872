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
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use libfilter::lease::{self, BreakTrigger, LeaseKey, LeaseState};
use libfilter::locks::{BatchError, Lock, LockOp, LockTable};
use libfilter::model::{
    now_ms, ClientId, ConnState, CreateAction, CreateGuid, Disposition, Durability, FileId,
    HandleRecord, HeldLease, HeldLock, InstanceName, Intent, IntentChange, IntentId, LockSequence,
    Protocol, RecordSpec, RelPath, ReplayRecord, ReplayScope, ResumeKey, ScopeName,
    MAX_REPLY_BYTES,
};
use libfilter::proto::{
    self, ErrorCode, Event, FileHolder, FileView, FrontendView, HandleView, Hello, HelloReply,
    LockView, OpenRequest, Opened, Reply, Request, RequestFrame, ResumeRequest, ResumeTarget, Role,
    ServerFrame, Stats, StatusInfo, WireError,
};
use libfilter::share::{self, Holder, HolderState, ShareDecision, ShareMode};
use libfilter::store::{StateStore, StoreOp};
use tracing::{debug, error, info, warn};

use crate::committer::{CommitCounters, Pipeline};
use crate::conn::{ConnWriter, Poller, Ready};
use crate::fsops;

mod durable;
#[cfg(test)]
mod tests;

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
    /// The listener accepted a connection.
    Accepted {
        /// Its id.
        conn: ConnId,
        /// The socket.
        sock: OwnedFd,
        /// Its credentials.
        peer: Peer,
    },
    /// A peer said hello; the engine registers it and the poller answers.
    Hello {
        /// The connection.
        conn: ConnId,
        /// What it said.
        hello: Hello,
        /// Its credentials.
        peer: Peer,
        /// Where its replies go.
        writer: Arc<ConnWriter>,
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
    /// A commit failed: these groups did not commit (the others up to
    /// `through` did); the engine rolls them back with whatever built on
    /// them (the committer waits for
    /// [`crate::committer::Pipeline::rolled_back`]).
    CommitFailed {
        /// The sequences that failed.
        failed: Vec<u64>,
        /// The last sequence of the failed commit.
        through: u64,
        /// What to tell the clients whose requests are undone.
        code: ErrorCode,
        /// Why.
        message: String,
    },
    /// The intents of these parked opens are durable: do their changes.
    IntentsDurable(Vec<IntentId>),
    /// A local process is opening a file on the export (fanotify): decide.
    LocalOpen {
        /// The file.
        file: FileId,
        /// The process.
        pid: i32,
        /// A descriptor of the file (for ignore marks).
        fd: OwnedFd,
        /// The event's id for the answerer.
        id: u64,
        /// Where the verdict goes.
        reply: Sender<crate::local::AnswerMsg>,
    },
    /// Stop: flush, then return.
    Shutdown,
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
    /// How long an open waits for a lease-break acknowledgement.
    pub break_timeout_ms: u64,
    /// Most handles per protocol client.
    pub max_handles_per_client: usize,
    /// Most handles per frontend instance.
    pub max_handles_per_frontend: usize,
    /// Most connections at once.
    pub max_connections: usize,
    /// Most requests waiting for lease-break acknowledgements at once.
    pub max_pending_breaks: usize,
}

struct Conn {
    role: Role,
    /// Optional features granted at hello (`proto::FEATURE_*`).
    features: u64,
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
    /// Its open waits for an intent to be durable (not yet acknowledged).
    parked: bool,
    /// A read-write descriptor of its own (its own open file description)
    /// carrying its byte-range locks as OFD locks; only while it has locks.
    lock_fd: Option<OwnedFd>,
}

/// Most commands drained into one batch.
const MAX_BATCH: usize = 1024;

/// The engine.
pub struct Engine {
    cfg: Config,
    root: OwnedFd,
    epoch: u64,
    started: Instant,
    /// Ordered, so listings page by key.
    handles: BTreeMap<ResumeKey, Handle>,
    by_file: BTreeMap<FileId, Vec<ResumeKey>>,
    by_guid: HashMap<(ClientId, CreateGuid), ResumeKey>,
    /// How many handles use each create GUID (any client).
    guid_clients: HashMap<CreateGuid, u32>,
    conns: HashMap<ConnId, Conn>,
    instances: HashMap<InstanceName, ConnId>,
    expiries: BinaryHeap<Reverse<(u64, ResumeKey, u64)>>,
    stats: Stats,
    commit_counters: Arc<CommitCounters>,
    /// The batch being built, its commit sequence, and what each pending
    /// sequence touched (see `durable.rs`).
    batch: durable::Batch,
    /// Lease breaks waiting for their holder's acknowledgement.
    breaking: HashMap<(FileId, LeaseKey), Breaking>,
    /// Opens waiting for lease breaks before they can be decided.
    waiting: Vec<WaitingOpen>,
    /// Renames and removes waiting for handle-caching breaks.
    waiting_changes: Vec<(FileId, ConnId, u64, Request)>,
    /// Local opens waiting for lease breaks.
    waiting_local: Vec<(FileId, LocalReply, OwnedFd)>,
    /// The fanotify group, when local access is mediated.
    fanotify: Option<Arc<nix::sys::fanotify::Fanotify>>,
    /// What local mediation covers, for status.
    mediation: String,
    /// Local-access counters (the fanotify thread's and ours).
    local_counters: Arc<crate::local::LocalCounters>,
    /// Files whose waiting opens should run again (a break ended).
    retry_files: std::collections::BTreeSet<FileId>,
    /// Byte-range locks by file.
    locks: BTreeMap<FileId, LockTable<ResumeKey>>,
    /// Handles per (protocol, client) and per frontend instance (limits).
    per_client: HashMap<(Protocol, ClientId), usize>,
    per_frontend: HashMap<InstanceName, usize>,
    /// Lock hints: the connections told that a file has locks.
    lock_hints: HashMap<FileId, HashSet<ConnId>>,
    /// Lock hints: a first lock on a file waits until these connections
    /// acknowledged (or the deadline, Unix ms).
    hint_waits: HashMap<FileId, (HashSet<ConnId>, u64)>,
    /// Opens waiting for their intent to be durable before their change.
    parked: HashMap<IntentId, Parked>,
    /// Files with a size change in flight, and how many (see
    /// `durable::content_change_begin`).
    content_changes: HashMap<FileId, u32>,
    /// Files whose frontends may go back to unchecked I/O once this
    /// sequence is durable.
    gone_after: Vec<(u64, FileId)>,
    /// The delete-on-close unlink the last `remove` bracketed, for a CLOSE
    /// to wait on.
    last_unlink: Option<IntentId>,
    /// Recorded replies by scope, mirrored from the `replay` table (and,
    /// for non-persistent handles, only here).
    replays: HashMap<ReplayScope, BTreeMap<u64, ReplayRecord>>,
    /// Where batches go and replies wait for durability.
    pipe: Arc<Pipeline>,
    /// The store, read to undo what a failed commit's requests did.
    store: Arc<dyn StateStore>,
}

/// Where a local open's verdict goes.
struct LocalReply {
    id: u64,
    tx: Sender<crate::local::AnswerMsg>,
}

impl LocalReply {
    fn send(&self, v: crate::local::Verdict) {
        let _ = self.tx.send(crate::local::AnswerMsg::Verdict(self.id, v));
    }
}

/// A lease break in flight.
struct Breaking {
    to: LeaseState,
    deadline_ms: u64,
}

/// An open waiting for lease breaks.
struct WaitingOpen {
    file: FileId,
    conn: ConnId,
    id: u64,
    protocol: Protocol,
    instance: InstanceName,
    req: OpenRequest,
    replay: bool,
}

/// An open parked until its intent is durable.
struct Parked {
    /// Where the answer goes (none: nobody waits, e.g. an expiry's unlink).
    writer: Option<Arc<ConnWriter>>,
    /// The request to answer.
    id: Option<u64>,
    /// The sequence of the batch holding its intent.
    seq: u64,
    key: ResumeKey,
    /// A rename or remove to perform once the intent is durable (none: a
    /// truncating open).
    change: Option<IntentChange>,
}

/// Most replay records a scope keeps, whatever the frontend asks.
const MAX_KEEP: u32 = 4096;
/// Most byte-range locks on one file (all its opens together): a handle's
/// locks travel in its record and a file's in one `Locks` page, both of
/// which must fit a frame.
const MAX_LOCKS_PER_FILE: usize = 256;
/// Most byte-range locks one protocol client holds on one file (all its
/// opens together): a quarter of the file's, so one client cannot lock
/// everyone else out of the file's lock capacity.
const MAX_LOCKS_PER_CLIENT_PER_FILE: usize = 64;

/// Milliseconds on the monotonic clock (since the first call). Every timer
/// — lease breaks, lock hints, expiries — runs on it, so a step of the
/// wall clock neither expires a handle early nor stalls a break; only what
/// must mean something across a restart is stored as wall time.
pub(crate) fn mono_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
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
        pipe: Arc<Pipeline>,
        store: Arc<dyn StateStore>,
        commit_counters: Arc<CommitCounters>,
    ) -> Self {
        Engine {
            cfg,
            root,
            epoch,
            started: Instant::now(),
            handles: BTreeMap::new(),
            by_file: BTreeMap::new(),
            by_guid: HashMap::new(),
            guid_clients: HashMap::new(),
            conns: HashMap::new(),
            instances: HashMap::new(),
            expiries: BinaryHeap::new(),
            stats: Stats::default(),
            commit_counters,
            batch: durable::Batch::default(),
            parked: HashMap::new(),
            content_changes: HashMap::new(),
            gone_after: Vec::new(),
            last_unlink: None,
            locks: BTreeMap::new(),
            breaking: HashMap::new(),
            waiting: Vec::new(),
            waiting_changes: Vec::new(),
            retry_files: Default::default(),
            lock_hints: HashMap::new(),
            per_client: HashMap::new(),
            per_frontend: HashMap::new(),
            hint_waits: HashMap::new(),
            waiting_local: Vec::new(),
            fanotify: None,
            local_counters: Default::default(),
            mediation: "off".to_owned(),
            replays: HashMap::new(),
            pipe,
            store,
        }
    }

    /// Restart recovery: reopens every persistent handle in the store by its
    /// kernel file handle (a renamed file is still found), as disconnected
    /// with a fresh timeout (time the daemon was down does not count). A
    /// handle whose file is gone is kept as *lost* for the operator to see.
    /// Runs before the socket accepts anyone, so no conflicting open can slip
    /// in ahead of restored state (invariant 5).
    pub fn recover(&mut self, store: &dyn StateStore) -> anyhow::Result<()> {
        let t0 = Instant::now();
        // Dangling intents first: finish what a crash interrupted, so the
        // handle records they announce exist before handles are loaded.
        let mut finished = Vec::new();
        let mut sync: Vec<OwnedFd> = Vec::new();
        for i in store.all_intents()? {
            let intent = match i {
                Ok(i) => i,
                Err(e) => {
                    error!(error = %e, "stored intent does not decode; left in place for inspection");
                    continue;
                }
            };
            match intent.change {
                IntentChange::TruncatingOpen { record } => {
                    let done = record
                        .kernel_handle
                        .as_ref()
                        .map(|kh| fsops::truncate_by_handle(self.root.as_fd(), kh, &record.path));
                    match done {
                        Some(Ok(fd)) => {
                            sync.push(fd);
                            info!(resume_key = %record.key, path = %record.path, "recovery finished an interrupted overwrite");
                            self.stats.intents_recovered += 1;
                            finished.push(StoreOp::PutHandle(record));
                        }
                        _ => {
                            warn!(resume_key = %record.key, path = %record.path, "interrupted overwrite abandoned: file gone")
                        }
                    }
                    finished.push(StoreOp::DeleteIntent(intent.id));
                }
                IntentChange::Rename {
                    key,
                    from,
                    to,
                    file,
                    record,
                    kernel_handle,
                    ..
                } => {
                    let root = self.root.as_fd();
                    if fsops::names(root, &to, file, kernel_handle.as_ref()) {
                        info!(resume_key = %key, %from, %to, "recovery finished an interrupted rename");
                        self.stats.intents_recovered += 1;
                        sync.extend(fsops::dir_of(root, &from).ok());
                        sync.extend(fsops::dir_of(root, &to).ok());
                        // The path is the file's: every handle that named
                        // it by the old path follows.
                        for r in store.all_handles()?.into_iter().flatten() {
                            if r.file == file && (r.key == key || r.path == from) {
                                let mut rec = r;
                                rec.path = to.clone();
                                finished.push(StoreOp::PutHandle(Box::new(rec)));
                            }
                        }
                        if let Some(r) = record {
                            finished.push(record_op(r));
                        }
                    } else {
                        warn!(resume_key = %key, %from, %to, "interrupted rename had not happened: dropped (a replay runs it)");
                    }
                    finished.push(StoreOp::DeleteIntent(intent.id));
                }
                IntentChange::SetSize {
                    key,
                    kernel_handle,
                    size,
                    record,
                } => {
                    // Safe to do again: while the change was in flight every
                    // protocol read and write of the file waited for its
                    // completion to commit (`content_changes`), so nothing
                    // acknowledged can have come after the first attempt.
                    let path = store.handle(key).ok().flatten().map(|r| r.path);
                    match fsops::set_size_by_handle(
                        self.root.as_fd(),
                        &kernel_handle,
                        path.as_ref(),
                        size,
                    ) {
                        Ok(fd) => {
                            sync.push(fd);
                            info!(resume_key = %key, size, "recovery finished an interrupted end-of-file change");
                            self.stats.intents_recovered += 1;
                            if let Some(r) = record {
                                finished.push(record_op(r));
                            }
                        }
                        Err(e) => {
                            warn!(resume_key = %key, error = %e, "interrupted end-of-file change abandoned")
                        }
                    }
                    finished.push(StoreOp::DeleteIntent(intent.id));
                }
                IntentChange::Remove {
                    path,
                    file,
                    record,
                    kernel_handle,
                    on_close,
                } => {
                    let root = self.root.as_fd();
                    if !fsops::names(root, &path, file, kernel_handle.as_ref()) {
                        info!(%path, "recovery finished an interrupted remove");
                        self.stats.intents_recovered += 1;
                        sync.extend(fsops::dir_of(root, &path).ok());
                        if let Some(r) = record {
                            finished.push(record_op(r));
                        }
                    } else if on_close {
                        // The handle's deletion committed: finish its
                        // delete-on-close.
                        match fsops::remove(root, &path, file, kernel_handle.as_ref()) {
                            Ok(()) => {
                                info!(%path, "recovery finished an interrupted delete on close");
                                self.stats.intents_recovered += 1;
                                sync.extend(fsops::dir_of(root, &path).ok());
                            }
                            Err(e) => {
                                warn!(%path, error = %e.message, "interrupted delete on close could not be finished")
                            }
                        }
                    } else {
                        warn!(%path, "interrupted remove had not happened: dropped (a replay runs it)");
                    }
                    finished.push(StoreOp::DeleteIntent(intent.id));
                }
            }
        }
        if !finished.is_empty() {
            // What recovery changed on disk is durable before the commit
            // that records it.
            for fd in &sync {
                nix::unistd::fsync(fd.as_fd())
                    .map_err(|e| anyhow::anyhow!("fsync after recovery's changes: {e}"))?;
            }
            store.commit(&[&finished])?;
        }
        for (k, rec) in store.all_replays()? {
            match (libfilter::store::parse_replay_key(&k), rec) {
                (Some((scope, op_id)), Ok(rec)) => {
                    self.replays.entry(scope).or_default().insert(op_id, rec);
                }
                (_, Err(e)) => error!(error = %e, "stored replay record does not decode; ignored"),
                (None, _) => error!("stored replay key does not parse; ignored"),
            }
        }
        let mut updates = Vec::new();
        let now = now_ms();
        let mut corrupt = 0u64;
        for r in store.all_handles()? {
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
                (Some(kh), _) => {
                    match fsops::reopen(self.root.as_fd(), kh, rec.access, &rec.path, rec.file) {
                        Ok(x) => Some(x),
                        // Out of descriptors or memory is our problem, not the
                        // handle's: refuse to start rather than mark it lost.
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM)
                            ) =>
                        {
                            anyhow::bail!(
                            "cannot reopen persistent handles: {e}; raise the descriptor limit (LimitNOFILE=) \
                             — filterd needs one descriptor per handle"
                        );
                        }
                        Err(e) => {
                            warn!(resume_key = %rec.key, path = %rec.path, error = %e, "persistent handle lost: file cannot be reopened");
                            None
                        }
                    }
                }
                (None, _) => None,
            };
            // The reopen proves the file is there; the descriptor itself is
            // closed again and taken anew when the handle is resumed, so a
            // daemon with 100k disconnected handles does not need 100k
            // descriptors. The stored record is left as it is (at recovery
            // every handle is disconnected, whatever it says); only a lost
            // handle is rewritten.
            match reopened {
                Some((_fd, file, _size)) => {
                    if file != rec.file {
                        rec.file = file;
                        updates.push(StoreOp::PutHandle(Box::new(rec.clone())));
                    }
                    rec.conn = ConnState::Disconnected {
                        since_ms: now,
                        expires_ms: now + timeout,
                    };
                    self.stats.recoveries += 1;
                }
                None => {
                    rec.conn = ConnState::Lost;
                    self.stats.recoveries_lost += 1;
                    updates.push(StoreOp::PutHandle(Box::new(rec.clone())));
                }
            };
            let fd = None;
            match rec.conn {
                ConnState::Disconnected { .. } => {
                    self.expiries
                        .push(Reverse((mono_ms() + timeout, rec.key, 0)));
                }
                // A lost handle stays visible until its timeout too, then
                // goes (it protects nothing: its file is gone).
                ConnState::Lost => self
                    .expiries
                    .push(Reverse((mono_ms() + timeout, rec.key, 0))),
                ConnState::Connected => {}
            }
            let key = rec.key;
            let restore = if matches!(rec.conn, ConnState::Disconnected { .. }) {
                rec.locks.clone()
            } else {
                Vec::new()
            };
            let file = rec.file;
            self.insert(Handle {
                rec,
                fd,
                conn: None,
                gen: 0,
                parked: false,
                lock_fd: None,
            });
            // Re-take its byte-range locks, in the filter and as OFD locks,
            // before anyone is served (invariant 5).
            if !restore.is_empty() {
                let t = self.locks.entry(file).or_insert_with(LockTable::new);
                for l in &restore {
                    t.restore(Lock {
                        owner: key,
                        range: l.range,
                        kind: l.kind,
                    });
                }
                if let Err(e) = self.mirror(key, &restore) {
                    warn!(resume_key = %key, error = %e.message, "recovered locks not mirrored as OFD locks");
                }
            }
        }
        if !updates.is_empty() {
            store.commit(&[&updates])?;
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

    /// Runs until [`Command::Shutdown`]: reads every connection through the
    /// poller, handles what it decodes, then expires and flushes the batch.
    pub fn run(mut self, mut poller: Poller) {
        let mut cmds = Vec::new();
        let mut stop = false;
        while !stop {
            for ready in poller.wait(self.next_wakeup()) {
                match ready {
                    Ready::Commands => {
                        let queued: Vec<Command> = poller.commands().take(MAX_BATCH).collect();
                        for c in queued {
                            match c {
                                Command::Accepted { conn, sock, peer } => {
                                    poller.add(conn, sock, peer)
                                }
                                other => stop |= self.handle(other),
                            }
                        }
                    }
                    Ready::Conn(conn) => poller.read(conn, &mut cmds),
                }
                for c in cmds.drain(..) {
                    match c {
                        Command::Hello {
                            conn,
                            hello,
                            peer,
                            writer,
                        } => {
                            let r = self.on_hello(conn, hello, peer, writer);
                            let mut closed = Vec::new();
                            poller.answer_hello(conn, r, &mut closed);
                            for c in closed {
                                self.handle(c);
                            }
                        }
                        other => stop |= self.handle(other),
                    }
                }
            }
            self.expire_due(mono_ms());
            self.process_retries();
            self.flush();
        }
        self.flush();
        info!("engine stopped");
    }

    fn next_wakeup(&self) -> Duration {
        let now = mono_ms();
        let next_expiry = self.expiries.peek().map(|Reverse((t, _, _))| *t);
        let next_break = self.breaking.values().map(|b| b.deadline_ms).min();
        let next_hint = self.hint_waits.values().map(|(_, t)| *t).min();
        match next_expiry
            .into_iter()
            .chain(next_break)
            .chain(next_hint)
            .min()
        {
            Some(t) => Duration::from_millis(t.saturating_sub(now).clamp(1, 1000)),
            None => Duration::from_secs(1),
        }
    }

    /// Returns true to stop.
    fn handle(&mut self, c: Command) -> bool {
        match c {
            // Connection set-up is the poller's; run() routes these.
            Command::Accepted { .. } | Command::Hello { .. } => {}
            Command::Request { conn, frame } => self.on_request(conn, frame),
            Command::Closed { conn } => {
                // Detaching its handles is a step of its own (its group
                // fails or commits by itself).
                self.begin_request();
                self.on_closed(conn)
            }
            Command::BadFrame => self.stats.bad_frames += 1,
            Command::CommitFailed {
                failed,
                through,
                code,
                message,
            } => {
                debug!(through, failed = failed.len(), "commit failed");
                self.roll_back(&failed, through, code, &message);
            }
            Command::LocalOpen {
                file,
                pid,
                fd,
                id,
                reply,
            } => self.on_local_open(file, pid, fd, LocalReply { id, tx: reply }),
            Command::IntentsDurable(ids) => {
                for id in ids {
                    self.finish_parked(id);
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
        if self.conns.len() >= self.cfg.max_connections {
            return Err(err(
                ErrorCode::LimitReached,
                format!(
                    "{} connections are attached already (--max-connections)",
                    self.conns.len()
                ),
            ));
        }
        let granted = match hello.role {
            Role::Frontend { .. } => hello.features & proto::FEATURES,
            Role::Control => 0,
        };
        if let Role::Frontend { protocol, instance } = &hello.role {
            // A replacement may say hello before the dead instance's EOF has
            // been read: if its peer is gone, retire it first.
            if let Some(&old) = self.instances.get(instance) {
                if self.conns.get(&old).is_some_and(|c| c.writer.peer_gone()) {
                    self.on_closed(old);
                }
            }
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
                features: granted,
                writer,
                peer,
                attached_ms: now_ms(),
                handles: HashSet::new(),
            },
        );
        Ok(HelloReply {
            version: proto::PROTO_VERSION,
            features: granted,
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
        for told in self.lock_hints.values_mut() {
            told.remove(&conn);
        }
        for (file, (pending, _)) in self.hint_waits.iter_mut() {
            if pending.remove(&conn) && pending.is_empty() {
                self.retry_files.insert(*file);
            }
        }
        self.hint_waits
            .retain(|_, (pending, _)| !pending.is_empty());
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
        crate::failpoint::hit("engine.request");
        self.run_request(conn, &writer, &role, frame.id, frame.req);
    }

    /// Runs one request and answers it, or parks it to be answered later.
    fn run_request(
        &mut self,
        conn: ConnId,
        writer: &Arc<ConnWriter>,
        role: &Role,
        id: u64,
        req: Request,
    ) {
        self.begin_request();
        // An in-memory-only handle the request may change: its record as it
        // was, to undo if the reply ends up waiting on a commit that fails.
        let before = match &req {
            Request::Lock { key, .. } | Request::SetDeleteOnClose { key, .. } => self
                .handles
                .get(key)
                .filter(|h| !h.rec.durability.is_persistent())
                .map(|h| Box::new(h.rec.clone())),
            _ => None,
        };
        let outcome = self.dispatch(conn, role, id, req);
        if let Some(rec) = before {
            self.undo_if_failed(durable::Undo::Record(rec));
        }
        self.answer(conn, writer, id, outcome);
    }

    /// Sends the reply to request `id` once everything it shows is durable
    /// (at once when nothing it shows is pending). `Ok(None)`: parked,
    /// answered later.
    fn answer(
        &mut self,
        conn: ConnId,
        writer: &Arc<ConnWriter>,
        id: u64,
        outcome: Result<Option<(Reply, Option<ResumeKey>)>, WireError>,
    ) {
        let (result, fd_of) = match outcome {
            Ok(Some((mut reply, fd_of))) => {
                if let Reply::Opened(o) = &mut reply {
                    o.locked = self.hint_open(conn, o.file);
                    if !o.durability.is_persistent() {
                        self.undo_if_failed(durable::Undo::Drop(o.key));
                    }
                }
                (Ok(reply), fd_of)
            }
            Ok(None) => return,
            Err(e) => {
                debug!(code = ?e.code, error = %e.message, "refused");
                (Err(e), None)
            }
        };
        let out = ServerFrame::Reply {
            id: Some(id),
            result,
        };
        let fd = fd_of
            .and_then(|k| self.handles.get(&k))
            .and_then(|h| h.fd.as_ref());
        if self.request_dependency() > self.pipe.committed() {
            let fd = match fd.map(|f| f.try_clone()) {
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => {
                    error!(error = %e, "cannot duplicate descriptor for a deferred reply");
                    None
                }
                None => None,
            };
            self.reply_when_durable(writer, id, &out, fd);
        } else if !writer.send_frame(&out, fd.map(|f| f.as_fd())) {
            // The reply could not be encoded (or sent): never leave a request
            // unanswered.
            writer.send_frame(
                &ServerFrame::Reply {
                    id: Some(id),
                    result: Err(err(ErrorCode::Internal, "reply could not be encoded")),
                },
                None,
            );
        }
    }

    /// Runs one request. Returns the reply and, for opens and resumes, the
    /// handle whose descriptor goes with it.
    /// `Ok(None)`: the request is parked and will be answered later.
    fn dispatch(
        &mut self,
        conn: ConnId,
        role: &Role,
        req_id: u64,
        req: Request,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
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
        // What the reply shows: a listing shows everything, a request on a
        // handle shows its file.
        match &req {
            Request::Status
            | Request::Handles { .. }
            | Request::Handle { .. }
            | Request::Files { .. }
            | Request::Frontends
            | Request::Locks { .. } => self.depends_on_all(),
            Request::Close { key }
            | Request::Detach { key }
            | Request::SetDeleteOnClose { key, .. }
            | Request::Rename { key, .. }
            | Request::SetEndOfFile { key, .. } => {
                if let Some(f) = self.handles.get(key).map(|h| h.rec.file) {
                    self.depends_on_file(f);
                }
            }
            _ => {}
        }
        match req {
            Request::Open(o) => {
                let (protocol, instance) = need_frontend()?;
                self.open(conn, req_id, protocol, instance, o, false)
            }
            Request::ReplayOpen(o) => {
                let (protocol, instance) = need_frontend()?;
                self.open(conn, req_id, protocol, instance, o, true)
            }
            Request::Resume(r) => {
                let (protocol, instance) = need_frontend()?;
                self.resume(conn, protocol, instance, r).map(Some)
            }
            Request::RecordReply {
                scope,
                op_id,
                reply,
                keep,
            } => {
                let (protocol, _) = need_frontend()?;
                let scope = self.own_scope(conn, &protocol, scope)?;
                Ok(Some((self.record_reply(scope, op_id, reply, keep)?, None)))
            }
            Request::LookupReply { scope, op_id } => {
                let (protocol, _) = need_frontend()?;
                let scope = self.own_scope(conn, &protocol, scope)?;
                self.depends_on_scope(&scope);
                Ok(Some((self.lookup_reply(&scope, op_id), None)))
            }
            Request::Lock {
                key,
                locks,
                lock_sequence,
            } => {
                need_frontend()?;
                if let Some(file) = self.hint_first(conn, key, &locks) {
                    let req = Request::Lock {
                        key,
                        locks,
                        lock_sequence,
                    };
                    self.waiting_changes.push((file, conn, req_id, req));
                    return Ok(None);
                }
                Ok(Some((self.lock(conn, key, &locks, lock_sequence)?, None)))
            }
            Request::LockHintAck { file } => {
                need_frontend()?;
                if let Some((pending, _)) = self.hint_waits.get_mut(&file) {
                    pending.remove(&conn);
                    if pending.is_empty() {
                        self.hint_waits.remove(&file);
                        self.retry_files.insert(file);
                    }
                }
                Ok(Some((Reply::Done, None)))
            }
            Request::CheckIo {
                key,
                range,
                write,
                own_protocol_advisory,
            } => {
                let (protocol, _) = need_frontend()?;
                self.stats.io_checks += 1;
                self.attached_to(conn, key)?;
                let file = self.handles.get(&key).map(|h| h.rec.file);
                if let Some(f) = file {
                    if self.content_changes.contains_key(&f) {
                        // A size change is in flight: wait for it.
                        let req = Request::CheckIo {
                            key,
                            range,
                            write,
                            own_protocol_advisory,
                        };
                        self.waiting_changes.push((f, conn, req_id, req));
                        return Ok(None);
                    }
                    self.depends_on_file(f);
                }
                let handles = &self.handles;
                let counts = |o: &ResumeKey| {
                    !own_protocol_advisory
                        || handles.get(o).is_none_or(|h| h.rec.protocol != protocol)
                };
                if let Some(Err(l)) = file
                    .and_then(|f| self.locks.get(&f))
                    .map(|t| t.check_io_counting(&key, range, write, counts))
                {
                    self.stats.io_conflicts += 1;
                    let mut e = err(ErrorCode::LockConflict, "range is locked by another open");
                    e.conflict = file.map(|f| Box::new(self.lock_view(f, &l)));
                    return Err(e);
                }
                Ok(Some((Reply::Done, None)))
            }
            Request::LeaseBreakAck { lease_key, state } => {
                need_frontend()?;
                Ok(Some((self.lease_ack(conn, lease_key, state)?, None)))
            }
            Request::Rename {
                key,
                to,
                replace,
                record,
            } => {
                let (protocol, _) = need_frontend()?;
                self.rename(conn, req_id, &protocol, key, to, replace, record)
            }
            Request::SetEndOfFile { key, size, record } => {
                let (protocol, _) = need_frontend()?;
                self.set_end_of_file(conn, req_id, &protocol, key, size, record)
            }
            Request::SetDeleteOnClose {
                key,
                delete,
                record,
            } => {
                let (protocol, _) = need_frontend()?;
                let record = record
                    .map(|r| self.own_record(conn, &protocol, r))
                    .transpose()?;
                let h = self.attached_with(
                    conn,
                    key,
                    libfilter::model::Rights::DELETE,
                    "delete_on_close needs delete access",
                )?;
                h.rec.delete_on_close = delete;
                if h.rec.durability.is_persistent() {
                    let rec = h.rec.clone();
                    self.batch.push(StoreOp::PutHandle(Box::new(rec)));
                }
                if let Some(r) = record {
                    self.remember_reply(r);
                }
                Ok(Some((Reply::Done, None)))
            }
            Request::Remove { path, record } => {
                let (protocol, _) = need_frontend()?;
                self.remove_path(conn, req_id, &protocol, path, record)
            }
            Request::Locks { after } => {
                let range = match after {
                    Some(f) => self
                        .locks
                        .range((std::ops::Bound::Excluded(f), std::ops::Bound::Unbounded)),
                    None => self.locks.range(..),
                };
                let views: Vec<(FileId, Vec<LockView>)> = range
                    .map(|(f, t)| {
                        (
                            *f,
                            t.locks().iter().map(|l| self.lock_view(*f, l)).collect(),
                        )
                    })
                    .collect();
                let (pages, next) = page(views.into_iter(), |(f, _)| *f);
                let locks = pages.into_iter().flat_map(|(_, v)| v).collect();
                Ok(Some((Reply::Locks { locks, next }, None)))
            }
            Request::ListRecords { scope, after } => {
                // A frontend lists its own protocol's scopes; filterctl
                // names a scope in full ("nfs/clients").
                let scope = match &frontend {
                    Some((protocol, _)) => self.own_scope(conn, protocol, scope)?,
                    None => scope,
                };
                self.depends_on_scope(&scope);
                let mut records = Vec::new();
                let mut next = None;
                let mut bytes = 0usize;
                if let Some(recs) = self.replays.get(&scope) {
                    let from = match after {
                        Some(a) => std::ops::Bound::Excluded(a),
                        None => std::ops::Bound::Unbounded,
                    };
                    for (op, r) in recs.range((from, std::ops::Bound::Unbounded)) {
                        // Stay well inside one frame.
                        if bytes + r.reply.len() > 3 * MAX_REPLY_BYTES && !records.is_empty() {
                            next = records.last().map(|(o, _): &(u64, String)| *o);
                            break;
                        }
                        bytes += r.reply.len() + 32;
                        records.push((*op, r.reply.clone()));
                    }
                }
                Ok(Some((Reply::Records { records, next }, None)))
            }
            Request::WriteRecords { put, delete } => {
                let (protocol, _) = need_frontend()?;
                // Check everything first: all or nothing.
                let put: Vec<RecordSpec> = put
                    .into_iter()
                    .map(|r| self.own_record(conn, &protocol, r))
                    .collect::<Result<_, _>>()?;
                let delete: Vec<(ReplayScope, u64)> = delete
                    .into_iter()
                    .map(|(s, op)| self.own_scope(conn, &protocol, s).map(|s| (s, op)))
                    .collect::<Result<_, _>>()?;
                for (scope, op_id) in delete {
                    let persistent = self.scope_is_persistent(&scope);
                    if let Some(recs) = self.replays.get_mut(&scope) {
                        if recs.remove(&op_id).is_some() && persistent {
                            self.batch.push(StoreOp::DeleteReplay { scope, op_id });
                        }
                    }
                }
                for r in put {
                    self.remember_reply(r);
                }
                Ok(Some((Reply::Done, None)))
            }
            Request::DeleteRecord { scope, op_id } => {
                let (protocol, _) = need_frontend()?;
                let scope = self.own_scope(conn, &protocol, scope)?;
                let persistent = self.scope_is_persistent(&scope);
                if let Some(recs) = self.replays.get_mut(&scope) {
                    if recs.remove(&op_id).is_some() && persistent {
                        self.batch.push(StoreOp::DeleteReplay { scope, op_id });
                    }
                }
                Ok(Some((Reply::Done, None)))
            }
            Request::DropScope { scope } => {
                let (protocol, _) = need_frontend()?;
                let scope = self.own_scope(conn, &protocol, scope)?;
                self.replays.remove(&scope);
                self.batch.push(StoreOp::DeleteReplayScope(scope));
                Ok(Some((Reply::Done, None)))
            }
            Request::Close { key } => {
                need_frontend()?;
                self.attached_to(conn, key)?;
                self.last_unlink = None;
                self.remove(key);
                self.stats.closes += 1;
                // A delete on close: answered once the file is gone.
                if let Some(p) = self
                    .last_unlink
                    .take()
                    .and_then(|u| self.parked.get_mut(&u))
                {
                    p.writer = self.conns.get(&conn).map(|c| c.writer.clone());
                    p.id = Some(req_id);
                    return Ok(None);
                }
                Ok(Some((Reply::Done, None)))
            }
            Request::Detach { key } => {
                need_frontend()?;
                self.attached_to(conn, key)?;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.handles.remove(&key);
                }
                self.detach(key);
                Ok(Some((Reply::Done, None)))
            }
            Request::Status => Ok(Some((Reply::Status(self.status()), None))),
            Request::Handles { after } => {
                let range = match after {
                    Some(k) => self
                        .handles
                        .range((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded)),
                    None => self.handles.range(..),
                };
                let (handles, next) = page(range.map(|(_, h)| view(h)), |v| v.record.key);
                Ok(Some((Reply::Handles { handles, next }, None)))
            }
            Request::Handle { key } => self
                .handles
                .get(&key)
                .map(|h| Some((Reply::Handle(view(h)), None)))
                .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}"))),
            Request::Files { after } => {
                let (files, next) = page(self.files(after), |f| f.file);
                Ok(Some((Reply::Files { files, next }, None)))
            }
            Request::Frontends => Ok(Some((
                Reply::Frontends {
                    frontends: self.frontends(),
                },
                None,
            ))),
            Request::Stats => {
                let mut s = self.stats.clone();
                s.commits = self.commit_counters.commits.load(Ordering::Relaxed);
                s.committed_ops = self.commit_counters.ops.load(Ordering::Relaxed);
                s.local_opens_allowed = self.local_counters.allowed.load(Ordering::Relaxed);
                s.local_opens_denied = self.local_counters.denied.load(Ordering::Relaxed);
                s.local_opens_watchdog = self.local_counters.watchdog.load(Ordering::Relaxed);
                s.local_opens_overloaded = self.local_counters.overloaded.load(Ordering::Relaxed);
                s.fanotify_overflows = self.local_counters.overflows.load(Ordering::Relaxed);
                s.fanotify_read_errors = self.local_counters.read_errors.load(Ordering::Relaxed);
                s.ignore_mark_failures = self.local_counters.mark_failures.load(Ordering::Relaxed);
                Ok(Some((Reply::Stats(s), None)))
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
                Ok(Some((Reply::Done, None)))
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
                Ok(Some((Reply::Purged { count }, None)))
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
        req_id: u64,
        protocol: Protocol,
        instance: InstanceName,
        o: OpenRequest,
        replay: bool,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        let durability = o.durability.normalized(self.cfg.max_durable_timeout_ms);
        if let Some(g) = o.create_guid {
            if let Some(&k) = self.by_guid.get(&(o.client.clone(), g)) {
                if let Some(f) = self.handles.get(&k).map(|h| h.rec.file) {
                    self.depends_on_file(f);
                }
                if !replay {
                    self.stats.opens_refused += 1;
                    return Err(err(
                        ErrorCode::DuplicateCreateGuid,
                        format!("client already has open {k} with create GUID {g}"),
                    ));
                }
                return self.replay_existing(conn, &protocol, instance, k).map(Some);
            }
            // A create GUID in use by another client is a duplicate too
            // (spec/smb-like.md "Create replay").
            if self.guid_clients.get(&g).is_some_and(|n| *n > 0) {
                self.stats.opens_refused += 1;
                return Err(err(
                    ErrorCode::DuplicateCreateGuid,
                    format!("create GUID {g} is in use by another client's open"),
                ));
            }
        }
        // Limits: a client or a frontend that holds too many handles is
        // refused; nobody else is affected.
        let held = self
            .per_client
            .get(&(protocol.clone(), o.client.clone()))
            .copied()
            .unwrap_or(0);
        if held >= self.cfg.max_handles_per_client {
            self.stats.opens_refused += 1;
            return Err(err(
                ErrorCode::LimitReached,
                format!(
                    "client {} holds {held} handles (the limit, --max-handles-per-client)",
                    o.client
                ),
            ));
        }
        if self.per_frontend.get(&instance).copied().unwrap_or(0)
            >= self.cfg.max_handles_per_frontend
        {
            self.stats.opens_refused += 1;
            return Err(err(
                ErrorCode::LimitReached,
                format!("frontend {instance} holds the most handles allowed (--max-handles-per-frontend)"),
            ));
        }
        // A persistent open with a create GUID marks a file it creates, so
        // a replay after a crash recognises it (fsops::open).
        let marker = match (durability, o.create_guid) {
            (Durability::Persistent { .. }, Some(g)) => Some(create_marker(&o.client, &g)),
            _ => None,
        };
        let of = fsops::open(
            self.root.as_fd(),
            &o.path,
            o.access,
            o.disposition,
            marker.as_deref(),
        )
        .inspect_err(|_| {
            self.stats.opens_refused += 1;
        })?;
        crate::failpoint::hit("open.after_fs");
        // Share modes, leases and the file's state decide this open: it
        // must not be answered before a pending change of them is durable.
        self.depends_on_file(of.file);
        let mode = ShareMode {
            access: o.access.rights(),
            share: o.share,
        };
        if self.break_leases_for(of.file, o.lease.map(|l| l.key), mode) {
            if o.no_wait {
                self.stats.opens_refused += 1;
                return Err(err(
                    ErrorCode::Busy,
                    "lease holders must acknowledge a break first; retry",
                ));
            }
            let pending = self.waiting.len() + self.waiting_changes.len();
            if pending >= self.cfg.max_pending_breaks {
                // The breaks were sent; this request does not wait.
                self.stats.opens_refused += 1;
                return Err(err(
                    ErrorCode::LimitReached,
                    format!(
                        "{pending} requests wait for lease breaks already (--max-pending-breaks)"
                    ),
                ));
            }
            // Holders must acknowledge first: wait (the descriptor is
            // dropped; the open runs again from the start).
            self.waiting.push(WaitingOpen {
                file: of.file,
                conn,
                id: req_id,
                protocol,
                instance,
                req: o,
                replay,
            });
            return Ok(None);
        }
        let holders = self.holders_of(of.file);
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
        let truncation = match (of.created, o.disposition) {
            (false, Disposition::Overwrite | Disposition::OverwriteIf) => {
                Some(CreateAction::Overwritten)
            }
            (false, Disposition::Supersede) => Some(CreateAction::Superseded),
            _ => None,
        };
        let create_action = match (of.created, truncation) {
            (true, _) => CreateAction::Created,
            (false, Some(a)) => a,
            (false, None) => CreateAction::Opened,
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
        if of.created && durability.is_persistent() {
            // The new name and inode are durable before the commit that
            // records the handle.
            if let Ok(fd) = of.fd.try_clone() {
                self.batch.sync_fd(fd);
            }
            if let Ok(d) = fsops::dir_of(self.root.as_fd(), &o.path) {
                self.batch.sync_fd(d);
            }
        }
        if let Some(fan) = &self.fanotify {
            // The file has protocol state from now on: local opens of it
            // must reach us again.
            crate::local::unignore(fan, of.fd.as_fd(), &self.local_counters);
        }
        let key = ResumeKey::new_random();
        tracing::Span::current().record("resume_key", tracing::field::display(key));
        let o_lease = o.lease;
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
            locks: Vec::new(),
            lock_sequence: Vec::new(),
            lease: None,
            delete_on_close: false,
        };
        let size = if truncation.is_some() { 0 } else { of.size };
        let opened = Opened {
            key,
            create_action,
            size,
            file: of.file,
            durability,
            lease: None,
            locked: false,
        };
        let park = truncation.is_some() && durability.is_persistent();
        if park {
            // Truncating a persistent open's file is non-idempotent: record
            // the intent durably first; the change and the handle record
            // follow when the committer says it is on disk (finish_parked).
            // The handle is in memory meanwhile, so its share mode already
            // protects the file.
            let change = IntentChange::TruncatingOpen {
                record: Box::new(rec.clone()),
            };
            self.park_intent(conn, req_id, key, change, None);
        } else {
            if truncation.is_some() {
                fsops::truncate(self.root.as_fd(), &rec.path, of.file)?;
            }
            if durability.is_persistent() {
                self.batch.push(StoreOp::PutHandle(Box::new(rec.clone())));
            }
        }
        debug!(resume_key = %key, path = %rec.path, action = %create_action, durability = durability.word(), parked = park, "opened");
        self.insert(Handle {
            rec,
            fd: Some(of.fd),
            conn: Some(conn),
            gen: 0,
            parked: park,
            lock_fd: None,
        });
        if let Some(c) = self.conns.get_mut(&conn) {
            c.handles.insert(key);
        }
        self.stats.opens += 1;
        let mut opened = opened;
        if let Some(lr) = o_lease {
            opened.lease = self.grant_lease(key, lr);
        }
        if park {
            return Ok(None);
        }
        Ok(Some((Reply::Opened(opened), Some(key))))
    }

    /// Continues a parked open whose intent is durable: truncates, then
    /// records the handle and drops the intent in one commit, then replies.
    fn finish_parked(&mut self, id: IntentId) {
        let Some(mut p) = self.parked.remove(&id) else {
            return;
        };
        crate::failpoint::hit("intent.after_commit");
        self.begin_request();
        self.completes_intent();
        if let Some(change) = p.change.take() {
            let result = self.perform(&change, true);
            crate::failpoint::hit("intent.after_fs");
            self.batch.push(StoreOp::DeleteIntent(id));
            let result = result.map(|()| Reply::Done);
            if let (Some(w), Some(rid)) = (&p.writer, p.id) {
                let frame = ServerFrame::Reply {
                    id: Some(rid),
                    result,
                };
                self.reply_when_durable(w, rid, &frame, None);
            }
            return;
        }
        // Lock hints: conservative (no LocksGone will clear it).
        let locked = self
            .handles
            .get(&p.key)
            .and_then(|h| self.locks.get(&h.rec.file))
            .is_some_and(|t| !t.is_empty());
        let Some(h) = self.handles.get_mut(&p.key) else {
            self.batch.push(StoreOp::DeleteIntent(id));
            return;
        };
        let truncated = match &h.rec.kernel_handle {
            Some(kh) => fsops::truncate_by_handle(self.root.as_fd(), kh, &h.rec.path),
            None => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        };
        crate::failpoint::hit("intent.after_fs");
        let file = h.rec.file;
        let result = match truncated {
            Ok(fd) => {
                h.parked = false;
                self.batch.sync_fd(fd);
                let rec = h.rec.clone();
                let opened = Opened {
                    key: p.key,
                    create_action: rec.create_action,
                    size: 0,
                    file: rec.file,
                    durability: rec.durability,
                    lease: rec.lease,
                    locked,
                };
                self.batch.push(StoreOp::PutHandle(Box::new(rec)));
                self.batch.push(StoreOp::DeleteIntent(id));
                self.content_change_done(file);
                Ok(Reply::Opened(opened))
            }
            Err(e) => {
                let path = h.rec.path.clone();
                self.batch.push(StoreOp::DeleteIntent(id));
                self.content_change_done(file);
                self.remove_unrecorded(p.key);
                Err(fsops::map_errno(&e, self.root.as_fd(), &path))
            }
        };
        let fd = match result {
            Ok(_) => self
                .handles
                .get(&p.key)
                .and_then(|h| h.fd.as_ref())
                .and_then(|f| f.try_clone().ok()),
            Err(_) => None,
        };
        if let (Some(w), Some(rid)) = (&p.writer, p.id) {
            let frame = ServerFrame::Reply {
                id: Some(rid),
                result,
            };
            self.reply_when_durable(w, rid, &frame, fd);
        }
    }

    /// A re-sent open whose create GUID names an existing handle: return it
    /// as it is, reattaching it if it is disconnected. Nothing is executed.
    fn replay_existing(
        &mut self,
        conn: ConnId,
        protocol: &Protocol,
        instance: InstanceName,
        key: ResumeKey,
    ) -> Result<(Reply, Option<ResumeKey>), WireError> {
        tracing::Span::current().record("resume_key", tracing::field::display(key));
        let file = self
            .handles
            .get(&key)
            .map(|h| h.rec.file)
            .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
        // The original open may still be committing: its replay shows it.
        self.depends_on_file(file);
        let h = self
            .handles
            .get(&key)
            .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
        if h.rec.protocol != *protocol {
            return Err(err(
                ErrorCode::DuplicateCreateGuid,
                "create GUID in use by another protocol's open",
            ));
        }
        if h.parked {
            return Err(err(
                ErrorCode::FileNotAvailable,
                "the original open is still in progress; retry",
            ));
        }
        let reply = match (h.conn, h.rec.conn) {
            (Some(c), _) if c == conn => {
                let size =
                    h.fd.as_ref()
                        .and_then(|f| fsops::stat(f.as_fd()).ok())
                        .map(|x| x.1)
                        .unwrap_or(0);
                Opened {
                    key,
                    create_action: h.rec.create_action,
                    size,
                    file: h.rec.file,
                    durability: h.rec.durability,
                    lease: h.rec.lease,
                    locked: false,
                }
            }
            (Some(_), _) => {
                return Err(err(
                    ErrorCode::DuplicateCreateGuid,
                    format!(
                        "open {key} with this create GUID is attached to another live connection"
                    ),
                ))
            }
            (None, ConnState::Lost) => {
                return Err(err(
                    ErrorCode::NoSuchHandle,
                    format!("handle {key} lost its file"),
                ))
            }
            (None, _) if h.rec.frontend != instance => {
                return Err(err(
                    ErrorCode::NotOwner,
                    format!(
                        "open {key} belongs to frontend instance {}; attach as that instance to take it over",
                        h.rec.frontend
                    ),
                ))
            }
            (None, _) => self.reattach(conn, instance, key)?,
        };
        self.stats.replays_detected += 1;
        debug!(resume_key = %key, "replayed open returns the original");
        Ok((Reply::Opened(reply), Some(key)))
    }

    fn resume(
        &mut self,
        conn: ConnId,
        protocol: Protocol,
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
        if let Some(f) = self.handles.get(&key).map(|h| h.rec.file) {
            self.depends_on_file(f);
        }
        let h = self
            .handles
            .get(&key)
            .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
        if h.rec.protocol != protocol || h.rec.client != r.client {
            return Err(err(
                ErrorCode::NotOwner,
                format!("handle {key} belongs to another client or protocol"),
            ));
        }
        // Only the instance that owns it resumes it; taking a dead
        // instance's handles over means attaching under its name.
        if h.rec.frontend != instance {
            return Err(err(
                ErrorCode::NotOwner,
                format!(
                    "handle {key} belongs to frontend instance {}; attach as that instance to take it over",
                    h.rec.frontend
                ),
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
        let opened = self.reattach(conn, instance, key)?;
        self.stats.resumes += 1;
        debug!(resume_key = %key, "resumed");
        Ok((Reply::Opened(opened), Some(key)))
    }

    /// Attaches a disconnected handle to `conn`.
    fn reattach(
        &mut self,
        conn: ConnId,
        instance: InstanceName,
        key: ResumeKey,
    ) -> Result<Opened, WireError> {
        let h = self
            .handles
            .get_mut(&key)
            .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
        if h.fd.is_none() {
            // Recovered handles hold no descriptor until resumed.
            let kh = h.rec.kernel_handle.as_ref().ok_or_else(|| {
                err(
                    ErrorCode::NoSuchHandle,
                    format!("handle {key} has no file handle"),
                )
            })?;
            match fsops::reopen(self.root.as_fd(), kh, h.rec.access, &h.rec.path, h.rec.file) {
                Ok((fd, _, _)) => h.fd = Some(fd),
                Err(e) => {
                    h.rec.conn = ConnState::Lost;
                    h.gen += 1;
                    let timeout = u64::from(h.rec.durability.timeout_ms().unwrap_or(0));
                    self.expiries
                        .push(Reverse((mono_ms() + timeout, key, h.gen)));
                    if h.rec.durability.is_persistent() {
                        self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
                    }
                    return Err(err(
                        ErrorCode::NoSuchHandle,
                        format!("handle {key} lost its file: {e}"),
                    ));
                }
            }
        }
        let size = match &h.fd {
            Some(fd) => fsops::stat(fd.as_fd()).map(|(_, s)| s).unwrap_or(0),
            None => 0,
        };
        h.rec.conn = ConnState::Connected;
        if h.rec.frontend != instance {
            // Taken over by another instance: it counts there now.
            if let Some(n) = self.per_frontend.get_mut(&h.rec.frontend) {
                *n = n.saturating_sub(1);
            }
            *self.per_frontend.entry(instance.clone()).or_default() += 1;
        }
        h.rec.frontend = instance;
        h.conn = Some(conn);
        h.gen += 1;
        if h.rec.durability.is_persistent() {
            self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
        }
        let opened = Opened {
            key,
            create_action: h.rec.create_action,
            size,
            file: h.rec.file,
            durability: h.rec.durability,
            lease: h.rec.lease,
            locked: false,
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.handles.insert(key);
        }
        Ok(opened)
    }

    /// The leases on a file by key: their state and their handles.
    fn leases_on(&self, file: FileId) -> Vec<(LeaseKey, LeaseState, Vec<ResumeKey>)> {
        let mut out: Vec<(LeaseKey, LeaseState, Vec<ResumeKey>)> = Vec::new();
        for k in self.by_file.get(&file).into_iter().flatten() {
            let Some(l) = self.handles.get(k).and_then(|h| h.rec.lease) else {
                continue;
            };
            match out.iter_mut().find(|(lk, _, _)| *lk == l.key) {
                Some(e) => e.2.push(*k),
                None => out.push((l.key, l.state, vec![*k])),
            }
        }
        out
    }

    /// Breaks the leases of other keys that an open with `mode` conflicts
    /// with. Holders that are disconnected (or need no ack) are lowered at
    /// once; attached ones get a LEASE_BREAK event. Returns whether the open
    /// must wait for acknowledgements.
    fn break_leases_for(
        &mut self,
        file: FileId,
        requester: Option<LeaseKey>,
        mode: ShareMode,
    ) -> bool {
        self.break_leases(file, requester, |state, keys, this| {
            let writes = mode.access.contains(libfilter::model::Rights::WRITE);
            let handle_conflict = keys.iter().filter_map(|k| this.handles.get(k)).any(|h| {
                share::conflicts(
                    mode,
                    ShareMode {
                        access: h.rec.access.rights(),
                        share: h.rec.share,
                    },
                )
            });
            lease::break_to(
                state,
                BreakTrigger {
                    writes,
                    handle_conflict,
                },
            )
        })
    }

    /// Breaks other keys' handle caching before their file is renamed or
    /// removed. Returns whether the change must wait for acks.
    fn break_leases_for_namespace(&mut self, file: FileId, requester: Option<LeaseKey>) -> bool {
        self.break_leases(file, requester, |state, _, _| {
            lease::break_for_namespace(state)
        })
    }

    /// Breaks every lease of another key on `file` that `target` says must
    /// go down; see `break_leases_for`.
    fn break_leases(
        &mut self,
        file: FileId,
        requester: Option<LeaseKey>,
        target: impl Fn(LeaseState, &[ResumeKey], &Self) -> Option<LeaseState>,
    ) -> bool {
        let mut wait = false;
        for (lk, state, keys) in self.leases_on(file) {
            if Some(lk) == requester {
                continue;
            }
            let Some(to) = target(state, &keys, self) else {
                continue;
            };
            if self.breaking.contains_key(&(file, lk)) {
                wait = true;
                continue;
            }
            let attached: Vec<ConnId> = keys
                .iter()
                .filter_map(|k| self.handles.get(k))
                .filter_map(|h| h.conn)
                .collect();
            let ack = lease::ack_required(state) && !attached.is_empty();
            self.stats.breaks += 1;
            let epoch = self
                .set_lease_state(file, lk, if ack { state } else { to })
                .wrapping_add(u16::from(ack));
            if let Some(c) = attached.first().and_then(|c| self.conns.get(c)) {
                c.writer.send_frame(
                    &ServerFrame::Event(Event::LeaseBreak {
                        lease_key: lk,
                        current_state: state,
                        new_state: to,
                        epoch,
                        ack_required: ack,
                    }),
                    None,
                );
            }
            if ack {
                info!(lease_key = %lk, from = %state, to = %to, "lease break sent; the conflicting open waits for the ack");
                self.breaking.insert(
                    (file, lk),
                    Breaking {
                        to,
                        deadline_ms: mono_ms() + self.cfg.break_timeout_ms,
                    },
                );
                wait = true;
            }
        }
        wait
    }

    /// Sets a lease's state on every handle of its key on the file (durably
    /// for persistent ones); bumps the epoch. A disconnected non-persistent
    /// durable handle that loses H is purged: it could not be reconnected
    /// safely. Returns the new epoch.
    fn set_lease_state(&mut self, file: FileId, lk: LeaseKey, to: LeaseState) -> u16 {
        let keys: Vec<ResumeKey> = self.by_file.get(&file).cloned().unwrap_or_default();
        let mut epoch = 0;
        let mut purge = Vec::new();
        for k in keys {
            let Some(h) = self.handles.get_mut(&k) else {
                continue;
            };
            let Some(l) = h.rec.lease.as_mut() else {
                continue;
            };
            if l.key != lk {
                continue;
            }
            let lost_h = l.state.contains(LeaseState::H) && !to.contains(LeaseState::H);
            if l.state != to {
                l.state = to;
                l.epoch = l.epoch.wrapping_add(1);
            }
            epoch = l.epoch;
            if lost_h && h.conn.is_none() && matches!(h.rec.durability, Durability::Durable { .. })
            {
                purge.push(k);
            } else if h.rec.durability.is_persistent() {
                self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
            }
        }
        for k in purge {
            self.purge(k);
        }
        epoch
    }

    /// Grants (or upgrades) the lease of a new open.
    fn grant_lease(
        &mut self,
        key: ResumeKey,
        lr: libfilter::model::LeaseRequest,
    ) -> Option<HeldLease> {
        let file = self.handles.get(&key)?.rec.file;
        let keys: Vec<ResumeKey> = self.by_file.get(&file).cloned().unwrap_or_default();
        let mut existing: Option<HeldLease> = None;
        let mut others_open = false;
        for k in &keys {
            if *k == key {
                continue;
            }
            match self.handles.get(k).and_then(|h| h.rec.lease) {
                Some(l) if l.key == lr.key => existing = Some(l),
                _ => {
                    if self
                        .handles
                        .get(k)
                        .is_some_and(|h| h.rec.conn != ConnState::Lost)
                    {
                        others_open = true;
                    }
                }
            }
        }
        let granted = lease::grantable(lr.state, others_open);
        let held = match existing {
            Some(e) => {
                let state = lease::grantable(e.state.with(granted), others_open);
                HeldLease {
                    key: lr.key,
                    state,
                    epoch: if state == e.state {
                        e.epoch
                    } else {
                        e.epoch.wrapping_add(1)
                    },
                }
            }
            None => HeldLease {
                key: lr.key,
                state: granted,
                epoch: 1,
            },
        };
        for k in keys {
            let Some(h) = self.handles.get_mut(&k) else {
                continue;
            };
            let same = k == key || h.rec.lease.is_some_and(|l| l.key == lr.key);
            if same && h.rec.lease != Some(held) {
                h.rec.lease = Some(held);
                if h.rec.durability.is_persistent() {
                    self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
                }
            }
        }
        Some(held)
    }

    /// A holder acknowledged a break.
    fn lease_ack(
        &mut self,
        conn: ConnId,
        lk: LeaseKey,
        state: LeaseState,
    ) -> Result<Reply, WireError> {
        let Some((&(file, _), b)) = self.breaking.iter().find(|((_, k), _)| *k == lk) else {
            return self.lease_lower(conn, lk, state);
        };
        if !b.to.contains(state) {
            return Err(err(
                ErrorCode::BadFrame,
                format!("acknowledged state {state} exceeds the break's {}", b.to),
            ));
        }
        let holder_here = self
            .by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .any(|h| h.conn == Some(conn) && h.rec.lease.is_some_and(|l| l.key == lk));
        if !holder_here {
            return Err(err(
                ErrorCode::NotOwner,
                format!("lease {lk} is not held through this connection"),
            ));
        }
        self.breaking.remove(&(file, lk));
        Ok(self.settle_lease(file, lk, state))
    }

    /// Sets a lease to what its holder kept and lets waiting opens retry.
    fn settle_lease(&mut self, file: FileId, lk: LeaseKey, state: LeaseState) -> Reply {
        let epoch = self.set_lease_state(file, lk, state);
        self.retry_files.insert(file);
        Reply::Lease(HeldLease {
            key: lk,
            state,
            epoch,
        })
    }

    /// An ack with no break in progress: the holder gives up part or all of
    /// its lease of its own accord (nfsl/1 DELEGRETURN without a recall),
    /// so a later conflicting open need not break it. Only lowering.
    fn lease_lower(
        &mut self,
        conn: ConnId,
        lk: LeaseKey,
        state: LeaseState,
    ) -> Result<Reply, WireError> {
        let held = self.conns.get(&conn).and_then(|c| {
            c.handles.iter().find_map(|k| {
                let h = self.handles.get(k)?;
                let l = h.rec.lease.filter(|l| l.key == lk)?;
                Some((h.rec.file, l.state))
            })
        });
        let Some((file, current)) = held else {
            return Err(err(
                ErrorCode::NoSuchHandle,
                format!("no break in progress for lease {lk}, nor is it held here"),
            ));
        };
        if !current.contains(state) {
            return Err(err(
                ErrorCode::BadFrame,
                format!("lease {lk} is {current}: {state} is not a lowering"),
            ));
        }
        Ok(self.settle_lease(file, lk, state))
    }

    /// Runs again the waiting opens of every file whose break ended.
    fn process_retries(&mut self) {
        let files = std::mem::take(&mut self.retry_files);
        for f in files {
            self.retry_waiting(f);
        }
    }

    /// Every open of a file, as the share algebra sees it.
    fn holders_of(&self, file: FileId) -> Vec<Holder<ResumeKey>> {
        self.by_file
            .get(&file)
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
            .collect()
    }

    /// Turns local-access mediation on.
    pub fn set_fanotify(
        &mut self,
        fan: Arc<nix::sys::fanotify::Fanotify>,
        counters: Arc<crate::local::LocalCounters>,
        scope: crate::local::MarkScope,
    ) {
        self.mediation = scope.word().to_owned();
        self.fanotify = Some(fan);
        self.local_counters = counters;
    }

    /// Decides a local process's open: it counts as a read that shares
    /// everything (share modes that exclude readers refuse it); conflicting
    /// caching leases are broken first, the open waiting for the acks.
    fn on_local_open(&mut self, file: FileId, pid: i32, fd: OwnedFd, reply: LocalReply) {
        use crate::local::Verdict;
        let holders = self.holders_of(file);
        if holders.is_empty() {
            // No protocol state: ignore this file's opens from now on.
            if let Some(fan) = &self.fanotify {
                crate::local::ignore(fan, &fd, &self.local_counters);
            }
            reply.send(Verdict::Allow);
            return;
        }
        match share::decide(ShareMode::LOCAL_PROCESS, holders) {
            ShareDecision::Violation | ShareDecision::NotAvailable => {
                debug!(pid, %file, "local open refused by a protocol share mode");
                reply.send(Verdict::Deny);
                return;
            }
            ShareDecision::Grant { purge } => {
                for k in purge {
                    self.purge(k);
                }
            }
        }
        if self.break_leases_for(file, None, ShareMode::LOCAL_PROCESS) {
            self.waiting_local.push((file, reply, fd));
            return;
        }
        reply.send(Verdict::Allow);
    }

    /// Runs again the opens of `file` that waited for lease breaks.
    fn retry_waiting(&mut self, file: FileId) {
        let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_changes)
            .into_iter()
            .partition(|(f, _, _, _)| *f == file);
        self.waiting_changes = later;
        for (_, conn, id, req) in ready {
            let Some((writer, role)) = self
                .conns
                .get(&conn)
                .map(|c| (c.writer.clone(), c.role.clone()))
            else {
                continue;
            };
            self.run_request(conn, &writer, &role, id, req);
        }
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_local)
            .into_iter()
            .partition(|(f, _, _)| *f == file);
        self.waiting_local = later;
        for (f, reply, fd) in now {
            self.on_local_open(f, 0, fd, reply);
        }
        let (now, later): (Vec<WaitingOpen>, Vec<WaitingOpen>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.file == file);
        self.waiting = later;
        for w in now {
            let Some(writer) = self.conns.get(&w.conn).map(|c| c.writer.clone()) else {
                continue; // its frontend went away meanwhile
            };
            self.begin_request();
            let outcome = self.open(w.conn, w.id, w.protocol, w.instance, w.req, w.replay);
            self.answer(w.conn, &writer, w.id, outcome);
        }
    }

    /// Connections with lock hints that hold attached handles of `file`.
    fn hinted_conns_of(&self, file: FileId) -> HashSet<ConnId> {
        self.by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k).and_then(|h| h.conn))
            .filter(|c| {
                self.conns
                    .get(c)
                    .is_some_and(|x| x.features & proto::FEATURE_LOCK_HINTS != 0)
            })
            .collect()
    }

    /// Lock hints: a LOCK that would give `file` its first lock waits until
    /// every other frontend with handles of the file has been told (so none
    /// of them reads or writes it unchecked once the lock is granted).
    /// Returns the file when the request must wait.
    fn hint_first(&mut self, conn: ConnId, key: ResumeKey, ops: &[LockOp]) -> Option<FileId> {
        let h = self.handles.get(&key).filter(|h| h.conn == Some(conn))?;
        let file = h.rec.file;
        if !ops.iter().any(|o| !o.unlock) {
            return None;
        }
        if self.hint_waits.contains_key(&file) {
            return Some(file);
        }
        if self.locks.get(&file).is_some_and(|t| !t.is_empty()) {
            return None;
        }
        let told = self.lock_hints.get(&file).cloned().unwrap_or_default();
        let others: HashSet<ConnId> = self
            .hinted_conns_of(file)
            .into_iter()
            .filter(|c| *c != conn && !told.contains(c))
            .collect();
        if others.is_empty() {
            return None;
        }
        for c in &others {
            if let Some(x) = self.conns.get(c) {
                x.writer
                    .send_frame(&ServerFrame::Event(Event::LocksPresent { file }), None);
            }
        }
        self.lock_hints
            .entry(file)
            .or_default()
            .extend(others.iter());
        let deadline = mono_ms() + self.cfg.break_timeout_ms;
        self.hint_waits.insert(file, (others, deadline));
        Some(file)
    }

    /// Lock hints at open and resume: whether `file` has locks; if so, the
    /// connection is among those told (it hears `LocksGone`).
    fn hint_open(&mut self, conn: ConnId, file: FileId) -> bool {
        let locked = self.locks.get(&file).is_some_and(|t| !t.is_empty());
        if !locked {
            return false;
        }
        if self
            .conns
            .get(&conn)
            .is_some_and(|x| x.features & proto::FEATURE_LOCK_HINTS != 0)
        {
            self.lock_hints.entry(file).or_default().insert(conn);
        }
        true
    }

    /// Lock hints: `file` has locks now; tell every hinted frontend with
    /// handles of it that was not told yet (the locker's own included).
    fn locks_present(&mut self, file: FileId) {
        let told = self.lock_hints.get(&file).cloned().unwrap_or_default();
        let conns = self.hinted_conns_of(file);
        for c in conns.difference(&told) {
            if let Some(x) = self.conns.get(c) {
                x.writer
                    .send_frame(&ServerFrame::Event(Event::LocksPresent { file }), None);
            }
        }
        self.lock_hints.entry(file).or_default().extend(conns);
    }

    /// Lock hints: the last lock of `file` went away.
    fn locks_gone(&mut self, file: FileId) {
        for c in self.lock_hints.remove(&file).unwrap_or_default() {
            if let Some(x) = self.conns.get(&c) {
                x.writer
                    .send_frame(&ServerFrame::Event(Event::LocksGone { file }), None);
            }
        }
    }

    fn lock_view(&self, file: FileId, l: &Lock<ResumeKey>) -> LockView {
        LockView {
            file,
            key: l.owner,
            owner: self.handles.get(&l.owner).and_then(|h| h.rec.owner.clone()),
            range: l.range,
            kind: l.kind,
        }
    }

    /// Locks and unlocks byte ranges (spec/smb-like.md "Byte-range locks",
    /// "Lock sequence replay"), mirrors them as OFD locks, and records them
    /// in the handle (durably for persistent handles).
    fn lock(
        &mut self,
        conn: ConnId,
        key: ResumeKey,
        ops: &[LockOp],
        seq: Option<LockSequence>,
    ) -> Result<Reply, WireError> {
        self.attached_to(conn, key)?;
        if let Some(q) = seq {
            if q.number > 15 || q.index > 64 {
                return Err(err(
                    ErrorCode::BadFrame,
                    "lock_sequence: number 0..15, index 0..64",
                ));
            }
        }
        let held_now = |s: &Self, file: FileId| s.locks.get(&file).map_or(0, |t| t.locks().len());
        let file = self
            .handles
            .get(&key)
            .map(|h| h.rec.file)
            .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
        // A lock-sequence replay, a conflict or a grant shows the file's
        // lock state: never before its pending change is durable.
        self.depends_on_file(file);
        let held = held_now(self, file);
        // What this client holds on the file already (all its handles).
        let client_held = {
            let me = self
                .handles
                .get(&key)
                .map(|h| (&h.rec.protocol, &h.rec.client));
            self.locks.get(&file).map_or(0, |t| {
                t.locks()
                    .iter()
                    .filter(|l| {
                        self.handles
                            .get(&l.owner)
                            .map(|o| (&o.rec.protocol, &o.rec.client))
                            == me
                    })
                    .count()
            })
        };
        let Some(h) = self.handles.get_mut(&key) else {
            return Err(err(ErrorCode::NoSuchHandle, format!("no handle {key}")));
        };
        let persistent = h.rec.durability.is_persistent();
        let checked = seq.filter(|q| q.index > 0 && h.rec.durability != Durability::None);
        if let Some(q) = checked {
            if h.rec.lock_sequence.contains(&(q.index, q.number)) {
                self.stats.replays_detected += 1;
                debug!(resume_key = %key, index = q.index, number = q.number, "lock sequence replay: nothing applied");
                return Ok(Reply::Done);
            }
        }
        let adding = ops.iter().filter(|o| !o.unlock).count();
        if adding > 0 && client_held + adding > MAX_LOCKS_PER_CLIENT_PER_FILE {
            // One client cannot take a file's whole lock capacity.
            self.stats.locks_refused += 1;
            return Err(err(
                ErrorCode::LimitReached,
                format!("one client holds at most {MAX_LOCKS_PER_CLIENT_PER_FILE} byte-range locks on a file"),
            ));
        }
        if adding > 0 && held + adding > MAX_LOCKS_PER_FILE {
            self.stats.locks_refused += 1;
            return Err(err(
                ErrorCode::LimitReached,
                format!("a file holds at most {MAX_LOCKS_PER_FILE} byte-range locks"),
            ));
        }
        if let Some(q) = checked {
            // Invalidate the entry before applying: set again only on success.
            h.rec.lock_sequence.retain(|(i, _)| *i != q.index);
        }
        let table = self.locks.entry(file).or_insert_with(LockTable::new);
        let before = table.clone();
        let outcome = table.apply_batch(&key, ops);
        let held: Vec<HeldLock> = table
            .of_owner(&key)
            .map(|l| HeldLock {
                range: l.range,
                kind: l.kind,
            })
            .collect();
        let result = match outcome {
            Err(BatchError::Conflict(l)) => {
                let mut e = err(
                    ErrorCode::LockNotGranted,
                    "a lock of another open (or this one) conflicts",
                );
                e.conflict = Some(Box::new(self.lock_view(file, &l)));
                Err(e)
            }
            Err(BatchError::RangeNotLocked(r)) => Err(err(
                ErrorCode::RangeNotLocked,
                format!(
                    "no lock of this open at offset {} length {}",
                    r.offset, r.length
                ),
            )),
            Ok(()) => match self.mirror(key, &held) {
                Ok(()) => Ok(()),
                Err(e) => {
                    // A local process holds a conflicting fcntl lock: undo.
                    self.stats.local_lock_conflicts += 1;
                    if let Some(t) = self.locks.get_mut(&file) {
                        *t = before.clone();
                    }
                    let held_before: Vec<HeldLock> = before
                        .of_owner(&key)
                        .map(|l| HeldLock {
                            range: l.range,
                            kind: l.kind,
                        })
                        .collect();
                    let _ = self.mirror(key, &held_before);
                    Err(e)
                }
            },
        };
        let Some(h) = self.handles.get_mut(&key) else {
            return Err(err(ErrorCode::NoSuchHandle, format!("no handle {key}")));
        };
        match &result {
            Ok(()) => {
                h.rec.locks = held;
                if let Some(q) = checked {
                    h.rec.lock_sequence.push((q.index, q.number));
                }
                self.stats.locks_granted += 1;
            }
            Err(_) => self.stats.locks_refused += 1,
        }
        if persistent && (result.is_ok() || checked.is_some()) {
            self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
        }
        if self.locks.get(&file).is_some_and(|t| !t.is_empty()) {
            if result.is_ok() {
                self.locks_present(file);
            }
        } else {
            self.locks.remove(&file);
            self.locks_gone(file);
        }
        result.map(|()| Reply::Done)
    }

    /// Takes the handle's locks as OFD locks on its own lock descriptor.
    fn mirror(&mut self, key: ResumeKey, held: &[HeldLock]) -> Result<(), WireError> {
        let root = self.root.as_fd();
        let Some(h) = self.handles.get_mut(&key) else {
            return Ok(());
        };
        if held.is_empty() {
            h.lock_fd = None; // closing our own OFD releases its locks
            return Ok(());
        }
        if h.lock_fd.is_none() {
            if h.rec.kernel_handle.is_none() {
                h.rec.kernel_handle =
                    h.fd.as_ref()
                        .and_then(|f| libfilter::sys::file_handle_of(f.as_fd()).ok());
            }
            let rw = libfilter::model::Access::new(
                libfilter::model::Rights::READ.union(libfilter::model::Rights::WRITE),
            )
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
            match h
                .rec
                .kernel_handle
                .as_ref()
                .map(|kh| fsops::reopen(root, kh, rw, &h.rec.path, h.rec.file))
            {
                Some(Ok((fd, _, _))) => h.lock_fd = Some(fd),
                _ => {
                    warn!(resume_key = %key, "cannot open a lock descriptor: locks are enforced among protocol clients only");
                    return Ok(());
                }
            }
        }
        let Some(fd) = h.lock_fd.as_ref() else {
            return Ok(());
        };
        fsops::mirror_ofd_locks(fd.as_fd(), held).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                err(
                    ErrorCode::LockNotGranted,
                    "a local process holds a conflicting lock",
                )
            } else {
                err(ErrorCode::Internal, format!("OFD lock: {e}"))
            }
        })
    }

    /// Renames the file of an attached handle (spec/smb-like.md "SET_INFO").
    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        conn: ConnId,
        req_id: u64,
        protocol: &Protocol,
        key: ResumeKey,
        to: RelPath,
        replace: bool,
        record: Option<RecordSpec>,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        let h = self.attached_with(
            conn,
            key,
            libfilter::model::Rights::DELETE,
            "rename needs delete access",
        )?;
        let (from, file, persistent) = (
            h.rec.path.clone(),
            h.rec.file,
            h.rec.durability.is_persistent(),
        );
        let kernel_handle = self
            .handles
            .get(&key)
            .and_then(|h| h.rec.kernel_handle.clone());
        self.others_share_delete(file, Some(key))?;
        // Replacing a target is deleting it: every open of the target must
        // share delete, and its handle-caching leases are broken first.
        let target = if replace {
            fsops::file_at_checked(self.root.as_fd(), &to)?.filter(|t| *t != file)
        } else {
            None
        };
        if let Some(t) = target {
            self.depends_on_file(t);
            self.others_share_delete(t, None)?;
        }
        let record = record
            .map(|r| self.own_record(conn, protocol, r))
            .transpose()?;
        let own_lease = self
            .handles
            .get(&key)
            .and_then(|h| h.rec.lease.map(|l| l.key));
        let waits_for = if self.break_leases_for_namespace(file, own_lease) {
            Some(file)
        } else {
            target.filter(|t| self.break_leases_for_namespace(*t, own_lease))
        };
        if let Some(file) = waits_for {
            let req = Request::Rename {
                key,
                to,
                replace,
                record: record.map(|mut r| {
                    r.scope = unscope(protocol, r.scope);
                    r
                }),
            };
            self.waiting_changes.push((file, conn, req_id, req));
            return Ok(None);
        }
        let change = IntentChange::Rename {
            key,
            from,
            to,
            file,
            replace,
            record,
            kernel_handle,
        };
        self.run_change(conn, req_id, key, change, persistent)
    }

    /// A handle attached to `conn` whose access includes `right`.
    fn attached_with(
        &mut self,
        conn: ConnId,
        key: ResumeKey,
        right: libfilter::model::Rights,
        refusal: &str,
    ) -> Result<&mut Handle, WireError> {
        self.attached_to(conn, key)?;
        let h = self
            .handles
            .get_mut(&key)
            .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
        if !h.rec.access.rights().contains(right) {
            return Err(err(ErrorCode::AccessDenied, refusal));
        }
        Ok(h)
    }

    /// Truncates or extends the file of an attached handle.
    fn set_end_of_file(
        &mut self,
        conn: ConnId,
        req_id: u64,
        protocol: &Protocol,
        key: ResumeKey,
        size: u64,
        record: Option<RecordSpec>,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        let h = self.attached_with(
            conn,
            key,
            libfilter::model::Rights::WRITE,
            "end_of_file needs write access",
        )?;
        if h.rec.kernel_handle.is_none() {
            h.rec.kernel_handle =
                h.fd.as_ref()
                    .and_then(|f| libfilter::sys::file_handle_of(f.as_fd()).ok());
        }
        let Some(kernel_handle) = h.rec.kernel_handle.clone() else {
            return Err(err(
                ErrorCode::Unsupported,
                "this filesystem has no file handles",
            ));
        };
        let persistent = h.rec.durability.is_persistent();
        let record = record
            .map(|r| self.own_record(conn, protocol, r))
            .transpose()?;
        let change = IntentChange::SetSize {
            key,
            kernel_handle,
            size,
            record,
        };
        self.run_change(conn, req_id, key, change, persistent)
    }

    /// Removes a file by path (NFS-like REMOVE; delete on close).
    fn remove_path(
        &mut self,
        conn: ConnId,
        req_id: u64,
        protocol: &Protocol,
        path: RelPath,
        record: Option<RecordSpec>,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        let file = fsops::file_at_checked(self.root.as_fd(), &path)?
            .ok_or_else(|| err(ErrorCode::NotFound, format!("{path}: not found")))?;
        self.depends_on_file(file);
        self.others_share_delete(file, None)?;
        let record = record
            .map(|r| self.own_record(conn, protocol, r))
            .transpose()?;
        if self.break_leases_for_namespace(file, None) {
            let req = Request::Remove {
                path,
                record: record.map(|mut r| {
                    r.scope = unscope(protocol, r.scope);
                    r
                }),
            };
            self.waiting_changes.push((file, conn, req_id, req));
            return Ok(None);
        }
        let kernel_handle = fsops::handle_at(self.root.as_fd(), &path);
        let change = IntentChange::Remove {
            path,
            file,
            record,
            kernel_handle,
            on_close: false,
        };
        self.run_change(conn, req_id, ResumeKey(uuid::Uuid::nil()), change, false)
    }

    /// Every open of `file` but `except` must share delete.
    fn others_share_delete(
        &mut self,
        file: FileId,
        except: Option<ResumeKey>,
    ) -> Result<(), WireError> {
        let holders: Vec<Holder<ResumeKey>> = self
            .holders_of(file)
            .into_iter()
            .filter(|h| Some(h.key) != except)
            .collect();
        let mode = ShareMode {
            access: libfilter::model::Rights::DELETE,
            share: libfilter::model::Rights::ALL,
        };
        match share::decide(mode, holders) {
            ShareDecision::Violation => Err(err(
                ErrorCode::SharingViolation,
                "an open of the file does not share delete",
            )),
            ShareDecision::NotAvailable => Err(err(
                ErrorCode::FileNotAvailable,
                "a disconnected persistent open of the file does not share delete",
            )),
            ShareDecision::Grant { purge } => {
                for k in purge {
                    self.purge(k);
                }
                Ok(())
            }
        }
    }

    fn own_record(
        &self,
        conn: ConnId,
        protocol: &Protocol,
        mut r: RecordSpec,
    ) -> Result<RecordSpec, WireError> {
        if r.reply.len() > MAX_REPLY_BYTES {
            return Err(err(
                ErrorCode::BadFrame,
                format!("recorded reply exceeds {MAX_REPLY_BYTES} bytes"),
            ));
        }
        r.scope = self.own_scope(conn, protocol, r.scope)?;
        r.keep = r.keep.clamp(1, MAX_KEEP);
        Ok(r)
    }

    /// Performs a rename or remove: bracketed by an intent (parked until it
    /// is durable) when it must survive a crash, else at once.
    fn run_change(
        &mut self,
        conn: ConnId,
        req_id: u64,
        key: ResumeKey,
        change: IntentChange,
        persistent: bool,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        let needs_intent = persistent
            || match &change {
                IntentChange::Rename { record, .. }
                | IntentChange::Remove { record, .. }
                | IntentChange::SetSize { record, .. } => record.is_some(),
                IntentChange::TruncatingOpen { .. } => false,
            };
        if !needs_intent {
            self.perform(&change, false)?;
            return Ok(Some((Reply::Done, None)));
        }
        self.park_intent(conn, req_id, key, change.clone(), Some(change));
        Ok(None)
    }

    /// Records `change` as an intent in this batch and parks request `req_id`
    /// until the intent is durable (`finish_parked`); `then` is the rename,
    /// remove or size change to perform then (none: a truncating open).
    fn park_intent(
        &mut self,
        conn: ConnId,
        req_id: u64,
        key: ResumeKey,
        change: IntentChange,
        then: Option<IntentChange>,
    ) {
        let content = match &change {
            IntentChange::TruncatingOpen { record } => Some(record.file),
            IntentChange::SetSize { key, .. } => self.handles.get(key).map(|h| h.rec.file),
            IntentChange::Rename { .. } | IntentChange::Remove { .. } => None,
        };
        if let Some(f) = content {
            self.content_change_begin(f);
        }
        let intent = Intent {
            id: IntentId(uuid::Uuid::new_v4()),
            change,
            recorded_ms: now_ms(),
        };
        self.stats.intents += 1;
        self.batch.notify.push(intent.id);
        let writer = self.conns.get(&conn).map(|c| c.writer.clone());
        self.parked.insert(
            intent.id,
            Parked {
                writer,
                id: Some(req_id),
                seq: self.batch.seq(),
                key,
                change: then,
            },
        );
        self.batch.push(StoreOp::PutIntent(Box::new(intent)));
    }

    /// Brackets the delete-on-close of a file whose last persistent handle
    /// is going away: the intent commits with the handle's deletion, the
    /// unlink follows once both are durable (`finish_parked`), then the
    /// intent goes. A CLOSE waiting for it is answered after that.
    fn park_unlink(&mut self, gone: &Handle) {
        let change = IntentChange::Remove {
            path: gone.rec.path.clone(),
            file: gone.rec.file,
            record: None,
            kernel_handle: gone.rec.kernel_handle.clone(),
            on_close: true,
        };
        let intent = Intent {
            id: IntentId(uuid::Uuid::new_v4()),
            change: change.clone(),
            recorded_ms: now_ms(),
        };
        self.stats.intents += 1;
        self.batch.notify.push(intent.id);
        self.parked.insert(
            intent.id,
            Parked {
                writer: None,
                id: None,
                seq: self.batch.seq(),
                key: gone.rec.key,
                change: Some(change),
            },
        );
        self.last_unlink = Some(intent.id);
        self.batch.push(StoreOp::PutIntent(Box::new(intent)));
    }

    /// Does a rename, remove or size change now, updating the handles and
    /// recording the reply in this batch (so in the commit that also drops
    /// the intent). With `durable` (a commit records the change), what it
    /// changed on disk is fsync'd before that commit.
    fn perform(&mut self, change: &IntentChange, durable: bool) -> Result<(), WireError> {
        let root = self.root.as_fd();
        match change {
            IntentChange::Rename {
                key,
                from,
                to,
                file,
                replace,
                record,
                kernel_handle,
            } => {
                fsops::rename(root, from, to, *file, kernel_handle.as_ref(), *replace)?;
                if durable {
                    let dirs = [fsops::dir_of(root, from), fsops::dir_of(root, to)];
                    for d in dirs.into_iter().flatten() {
                        self.batch.sync_fd(d);
                    }
                }
                // The path is the file's: every handle that named it by the
                // old path follows (the renaming one whatever it named).
                let keys: Vec<ResumeKey> = self.by_file.get(file).cloned().unwrap_or_default();
                for k in keys {
                    if let Some(h) = self.handles.get_mut(&k) {
                        if k == *key || h.rec.path == *from {
                            h.rec.path = to.clone();
                            if h.rec.durability.is_persistent() {
                                self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
                            }
                        }
                    }
                }
                if let Some(r) = record {
                    self.remember_reply(r.clone());
                }
                Ok(())
            }
            IntentChange::Remove {
                path,
                file,
                record,
                kernel_handle,
                ..
            } => {
                fsops::remove(root, path, *file, kernel_handle.as_ref())?;
                if durable {
                    if let Ok(d) = fsops::dir_of(root, path) {
                        self.batch.sync_fd(d);
                    }
                }
                if let Some(r) = record {
                    self.remember_reply(r.clone());
                }
                Ok(())
            }
            IntentChange::SetSize {
                key,
                kernel_handle,
                size,
                record,
            } => {
                let path = self.handles.get(key).map(|h| &h.rec.path);
                let done =
                    fsops::set_size_by_handle(root, kernel_handle, path, *size).map_err(|e| {
                        // A size the filesystem cannot hold is the client's
                        // bad parameter; no space is disk full.
                        let code = match e.raw_os_error() {
                            Some(libc::EFBIG) | Some(libc::EINVAL) => ErrorCode::BadFrame,
                            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::DiskFull,
                            _ => ErrorCode::Internal,
                        };
                        err(code, format!("set end of file to {size}: {e}"))
                    });
                if durable {
                    if let Some(f) = self.handles.get(key).map(|h| h.rec.file) {
                        self.content_change_done(f);
                    }
                }
                let fd = done?;
                if durable {
                    self.batch.sync_fd(fd);
                }
                if let Some(r) = record {
                    self.remember_reply(r.clone());
                }
                Ok(())
            }
            IntentChange::TruncatingOpen { .. } => {
                Err(err(ErrorCode::Internal, "not a rename or remove"))
            }
        }
    }

    fn remember_reply(&mut self, r: RecordSpec) {
        let record = ReplayRecord {
            reply: r.reply.clone(),
            recorded_ms: now_ms(),
        };
        let recs = self.replays.entry(r.scope.clone()).or_default();
        recs.insert(r.op_id, record);
        while recs.len() > usize::try_from(r.keep).unwrap_or(usize::MAX) {
            recs.pop_first();
        }
        if self.scope_is_persistent(&r.scope) {
            self.batch.push(record_op(r));
        }
        self.stats.replies_recorded += 1;
    }

    /// Maps a frontend's replay scope into the filter's: a handle must be
    /// attached to this connection; a session is namespaced by protocol.
    fn own_scope(
        &self,
        conn: ConnId,
        protocol: &Protocol,
        scope: ReplayScope,
    ) -> Result<ReplayScope, WireError> {
        match scope {
            ReplayScope::Handle(k) => {
                self.attached_to(conn, k)?;
                Ok(ReplayScope::Handle(k))
            }
            ReplayScope::Session(name) => ScopeName::new(format!("{protocol}/{}", name.as_str()))
                .map(ReplayScope::Session)
                .map_err(|e| err(ErrorCode::BadFrame, e.to_string())),
        }
    }

    /// Whether a scope's records must be on stable storage.
    fn scope_is_persistent(&self, scope: &ReplayScope) -> bool {
        match scope {
            ReplayScope::Handle(k) => self
                .handles
                .get(k)
                .is_some_and(|h| h.rec.durability.is_persistent()),
            ReplayScope::Session(_) => true,
        }
    }

    fn record_reply(
        &mut self,
        scope: ReplayScope,
        op_id: u64,
        reply: String,
        keep: u32,
    ) -> Result<Reply, WireError> {
        if reply.len() > MAX_REPLY_BYTES {
            return Err(err(
                ErrorCode::BadFrame,
                format!("recorded reply exceeds {MAX_REPLY_BYTES} bytes"),
            ));
        }
        let keep = keep.clamp(1, MAX_KEEP);
        let record = ReplayRecord {
            reply,
            recorded_ms: now_ms(),
        };
        let recs = self.replays.entry(scope.clone()).or_default();
        recs.insert(op_id, record.clone());
        while recs.len() > usize::try_from(keep).unwrap_or(usize::MAX) {
            recs.pop_first();
        }
        if self.scope_is_persistent(&scope) {
            self.batch.push(StoreOp::PutReplay {
                scope,
                op_id,
                record,
                keep,
            });
        }
        self.stats.replies_recorded += 1;
        Ok(Reply::Done)
    }

    fn lookup_reply(&mut self, scope: &ReplayScope, op_id: u64) -> Reply {
        let record = self.replays.get(scope).and_then(|m| m.get(&op_id)).cloned();
        if record.is_some() {
            self.stats.replays_detected += 1;
        }
        Reply::Recorded { record }
    }

    fn insert(&mut self, h: Handle) {
        let key = h.rec.key;
        *self
            .per_client
            .entry((h.rec.protocol.clone(), h.rec.client.clone()))
            .or_default() += 1;
        *self.per_frontend.entry(h.rec.frontend.clone()).or_default() += 1;
        self.by_file.entry(h.rec.file).or_default().push(key);
        if let Some(g) = h.rec.create_guid {
            self.by_guid.insert((h.rec.client.clone(), g), key);
            *self.guid_clients.entry(g).or_default() += 1;
        }
        self.handles.insert(key, h);
    }

    /// Removes a handle the store does not hold (rolled back): no store
    /// operation, no filesystem effect (a pending delete-on-close is
    /// dropped with it).
    fn remove_quietly(&mut self, key: ResumeKey) {
        if let Some(h) = self.handles.get_mut(&key) {
            h.rec.durability = Durability::None;
            h.rec.delete_on_close = false;
        }
        self.remove(key);
    }

    /// Removes a handle whose record never reached the store.
    fn remove_unrecorded(&mut self, key: ResumeKey) {
        if let Some(h) = self.handles.get_mut(&key) {
            // Not persistent as far as the store knows: no delete op.
            h.rec.durability = Durability::None;
        }
        self.remove(key);
    }

    /// Removes a handle for good (closing its descriptor); persistent ones
    /// are deleted from the store in this batch.
    fn remove(&mut self, key: ResumeKey) -> Option<HandleRecord> {
        let h = self.handles.remove(&key)?;
        let ck = (h.rec.protocol.clone(), h.rec.client.clone());
        if let Some(n) = self.per_client.get_mut(&ck) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_client.remove(&ck);
            }
        }
        if let Some(n) = self.per_frontend.get_mut(&h.rec.frontend) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_frontend.remove(&h.rec.frontend);
            }
        }
        self.replays.remove(&ReplayScope::Handle(key));
        if let Some(l) = h.rec.lease {
            let still_held = self
                .by_file
                .get(&h.rec.file)
                .into_iter()
                .flatten()
                .filter(|k| **k != key)
                .filter_map(|k| self.handles.get(k))
                .any(|o| o.rec.lease.is_some_and(|x| x.key == l.key));
            if !still_held && self.breaking.remove(&(h.rec.file, l.key)).is_some() {
                self.retry_files.insert(h.rec.file);
            }
        }
        if let Some(t) = self.locks.get_mut(&h.rec.file) {
            t.remove_owner(&key);
            if t.is_empty() {
                self.locks.remove(&h.rec.file);
                self.locks_gone(h.rec.file);
            }
        }
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
            if let Some(n) = self.guid_clients.get_mut(&g) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.guid_clients.remove(&g);
                }
            }
        }
        if let Some(c) = h.conn.and_then(|c| self.conns.get_mut(&c)) {
            c.handles.remove(&key);
        }
        if h.rec.delete_on_close {
            self.delete_pending(&h);
        }
        if h.rec.durability.is_persistent() {
            if h.rec.create_guid.is_some() && h.rec.create_action == CreateAction::Created {
                // Before the delete commits: a crash in between brings the
                // handle back, and replays are then answered from it.
                fsops::clear_marker(
                    self.root.as_fd(),
                    h.fd.as_ref().map(|f| f.as_fd()),
                    h.rec.kernel_handle.as_ref(),
                    &h.rec.path,
                );
            }
            self.batch
                .push(StoreOp::DeleteHandle(Box::new(h.rec.clone())));
            // Until the deletion commits the handle may come back whole.
            let rec = h.rec.clone();
            self.keep_until_durable(h);
            return Some(rec);
        }
        Some(h.rec)
    }

    /// A handle with delete-on-close went away: the file is removed when it
    /// was the last open; else the pending delete passes to the opens that
    /// remain (it is the file's, as on Windows). For a persistent handle the
    /// unlink is bracketed (`park_unlink`): it happens only after the
    /// handle's deletion is durable. A lost handle deletes nothing: its
    /// file is gone, and whatever has its name now is another file.
    fn delete_pending(&mut self, gone: &Handle) {
        let file = gone.rec.file;
        let others: Vec<ResumeKey> = self.by_file.get(&file).cloned().unwrap_or_default();
        if others.is_empty() {
            if gone.rec.conn == ConnState::Lost {
                warn!(path = %gone.rec.path, "a lost handle's delete on close is dropped: its file is gone");
                return;
            }
            if gone.rec.durability.is_persistent() {
                self.park_unlink(gone);
                return;
            }
            let kh = gone.rec.kernel_handle.as_ref();
            match fsops::remove(self.root.as_fd(), &gone.rec.path, file, kh) {
                Ok(()) => {
                    info!(path = %gone.rec.path, "deleted on close");
                }
                Err(e) => {
                    warn!(path = %gone.rec.path, error = %e.message, "delete on close failed")
                }
            }
            return;
        }
        for k in others {
            if let Some(o) = self.handles.get_mut(&k) {
                if !o.rec.delete_on_close {
                    o.rec.delete_on_close = true;
                    if o.rec.durability.is_persistent() {
                        let rec = o.rec.clone();
                        self.batch.push(StoreOp::PutHandle(Box::new(rec)));
                    }
                }
            }
        }
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
        self.expiries
            .push(Reverse((mono_ms() + u64::from(timeout), key, h.gen)));
        if h.rec.durability.is_persistent() {
            self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
        }
        self.stats.disconnects += 1;
        debug!(resume_key = %key, timeout_ms = timeout, "disconnected");
        let (file, lease) = (h.rec.file, h.rec.lease);
        if let Some(l) = lease {
            self.settle_unackable_break(file, l.key);
        }
        true
    }

    /// A break in progress whose lease no attached open holds any more can
    /// never be acknowledged: lower the lease now instead of at the timeout.
    fn settle_unackable_break(&mut self, file: FileId, lk: LeaseKey) {
        if !self.breaking.contains_key(&(file, lk)) {
            return;
        }
        let attached = self
            .by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .any(|o| o.conn.is_some() && o.rec.lease.is_some_and(|x| x.key == lk));
        if attached {
            return;
        }
        if let Some(b) = self.breaking.remove(&(file, lk)) {
            debug!(lease_key = %lk, to = %b.to, "break target disconnected: lowered at once");
            self.set_lease_state(file, lk, b.to);
            self.retry_files.insert(file);
        }
    }

    fn notify_instance(&self, instance: &InstanceName, ev: Event) {
        if let Some(c) = self.instances.get(instance).and_then(|c| self.conns.get(c)) {
            c.writer.send_frame(&ServerFrame::Event(ev), None);
        }
    }

    fn expire(&mut self, key: ResumeKey) {
        if let Some(rec) = self.remove(key) {
            self.stats.expiries += 1;
            info!(resume_key = %key, path = %rec.path, "handle expired");
            self.notify_instance(&rec.frontend, Event::Expired { key });
        }
    }

    fn purge(&mut self, key: ResumeKey) {
        if let Some(rec) = self.remove(key) {
            self.stats.purges += 1;
            info!(resume_key = %key, path = %rec.path, "disconnected durable handle purged by a conflicting open");
            self.notify_instance(&rec.frontend, Event::Purged { key });
        }
    }

    fn expire_due(&mut self, now: u64) {
        self.begin_request();
        let late: Vec<FileId> = self
            .hint_waits
            .iter()
            .filter(|(_, (_, t))| *t <= now)
            .map(|(f, _)| *f)
            .collect();
        for f in late {
            // A frontend that does not acknowledge in time is treated as
            // failed, never bypassed: its connection is dropped (its durable
            // handles detach, its other handles close), so it can do no
            // unchecked I/O on the file; the lock then proceeds.
            if let Some((pending, _)) = self.hint_waits.remove(&f) {
                for c in pending {
                    if let Some(x) = self.conns.get(&c) {
                        warn!(file = ?f, conn = c.0, pid = x.peer.pid, "frontend did not acknowledge a lock hint in time: dropped");
                        self.stats.frontends_dropped += 1;
                        x.writer.kill();
                    }
                    self.on_closed(c);
                }
            }
            self.retry_files.insert(f);
        }
        let due: Vec<(FileId, LeaseKey)> = self
            .breaking
            .iter()
            .filter(|(_, b)| b.deadline_ms <= now)
            .map(|(k, _)| *k)
            .collect();
        for (file, lk) in due {
            if let Some(b) = self.breaking.remove(&(file, lk)) {
                warn!(lease_key = %lk, to = %b.to, "lease break not acknowledged in time: lowered anyway");
                let holder = self
                    .by_file
                    .get(&file)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| self.handles.get(k))
                    .find_map(|h| match (h.rec.lease, h.conn) {
                        (Some(l), Some(c)) if l.key == lk => Some((l.state, c)),
                        _ => None,
                    });
                let epoch = self.set_lease_state(file, lk, b.to);
                // Tell the holder its lease went down without it (an nfsl/1
                // delegation is revoked then).
                if let Some((from, c)) =
                    holder.and_then(|(s, c)| self.conns.get(&c).map(|c| (s, c)))
                {
                    c.writer.send_frame(
                        &ServerFrame::Event(Event::LeaseBreak {
                            lease_key: lk,
                            current_state: from,
                            new_state: b.to,
                            epoch,
                            ack_required: false,
                        }),
                        None,
                    );
                }
                self.retry_files.insert(file);
            }
        }
        while let Some(Reverse((t, key, gen))) = self.expiries.peek().copied() {
            if t > now {
                break;
            }
            self.expiries.pop();
            let due = self.handles.get(&key).is_some_and(|h| {
                h.gen == gen
                    && matches!(h.rec.conn, ConnState::Disconnected { .. } | ConnState::Lost)
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
            mediation: self.mediation.clone(),
            store: self.store.kind().to_owned(),
            schema_version: libfilter::store::SCHEMA_VERSION,
        }
    }

    fn files(&self, after: Option<FileId>) -> impl Iterator<Item = FileView> + '_ {
        let range = match after {
            Some(f) => self
                .by_file
                .range((std::ops::Bound::Excluded(f), std::ops::Bound::Unbounded)),
            None => self.by_file.range(..),
        };
        range.filter_map(|(file, keys)| {
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

/// The create marker of a persistent open: client identity and create GUID.
fn create_marker(client: &ClientId, guid: &CreateGuid) -> Vec<u8> {
    let mut m = guid.0.as_bytes().to_vec();
    m.extend_from_slice(client.as_str().as_bytes());
    m.truncate(1024);
    m
}

/// Takes items while their encoded size fits a page; returns them and, if
/// items remain, the cursor to continue after.
fn page<T: serde::Serialize, C>(
    items: impl Iterator<Item = T>,
    cursor: impl Fn(&T) -> C,
) -> (Vec<T>, Option<C>) {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut items = items.peekable();
    while let Some(item) = items.peek() {
        let n = serde_json::to_vec(item)
            .map(|v| v.len())
            .unwrap_or(proto::PAGE_BYTES);
        if !out.is_empty() && bytes + n > proto::PAGE_BYTES {
            break;
        }
        bytes += n;
        if let Some(item) = items.next() {
            out.push(item);
        }
    }
    let next = if items.peek().is_some() {
        out.last().map(&cursor)
    } else {
        None
    };
    (out, next)
}

/// The store operation that records a reply.
fn record_op(r: RecordSpec) -> StoreOp {
    StoreOp::PutReplay {
        scope: r.scope,
        op_id: r.op_id,
        record: ReplayRecord {
            reply: r.reply,
            recorded_ms: now_ms(),
        },
        keep: r.keep,
    }
}

/// Undoes `own_scope`'s protocol prefix on a session scope, so a parked
/// request can be dispatched again as the frontend sent it.
fn unscope(protocol: &Protocol, scope: ReplayScope) -> ReplayScope {
    match scope {
        ReplayScope::Session(name) => {
            let prefix = format!("{protocol}/");
            match name.as_str().strip_prefix(&prefix).map(ScopeName::new) {
                Some(Ok(n)) => ReplayScope::Session(n),
                _ => ReplayScope::Session(name),
            }
        }
        other => other,
    }
}
