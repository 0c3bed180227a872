//! The state engine: the one thread that owns every handle.
//!
//! Connection threads send [`Command`]s over a bounded channel; the engine
//! drains a batch, runs one exhaustive `match` per command, performs the
//! filesystem effects through its filesystem port ([`fs::Fs`]: beneath the
//! root in the daemon, in memory in the unit tests), and collects the store
//! operations the batch produced. Replies that depend on persistent state are *deferred*:
//! they travel with the batch's store operations to the committer thread
//! ([`crate::committer`]), which commits them in one fsync'd LMDB transaction
//! (merging every batch that queued meanwhile — group commit) and only then
//! sends them (invariant 1). Replies that change nothing persistent are sent at
//! once, so non-durable work never waits on an fsync.
//!
//! Decisions that need no I/O (share modes) come from the pure
//! [`libfilter::share`] algebra.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfilter::lease::{self, BreakTrigger, LeaseKey, LeaseState};
use libfilter::locks::{BatchError, Lock, LockOp, LockTable};
use libfilter::model::{
    now_ms, ClientId, ConnState, CreateAction, CreateGuid, Disposition, Durability, FileId,
    HandleRecord, HeldLease, HeldLock, InstanceName, Intent, IntentChange, IntentId, KernelHandle,
    LockSequence, Protocol, RecordSpec, RelPath, ReplayRecord, ReplayScope, ResumeKey, ScopeName,
    MAX_REPLY_BYTES, OUTCOME_UNKNOWN,
};
use libfilter::proto::{
    self, BreakView, ErrorCode, Event, FileView, FrontendView, HandleView, Hello, HelloReply,
    LockView, OpenRequest, Opened, Reply, Request, RequestFrame, ResumeRequest, ResumeTarget, Role,
    ServerFrame, Stats, StatusInfo, WireError,
};
use libfilter::share::{self, Holder, HolderState, ShareDecision, ShareMode};
use libfilter::store::{ReplayTrim, StateStore, StoreError, StoreOp};
use tracing::{debug, error, info, warn};

use crate::committer::{CommitCounters, Pipeline};
use crate::conn::{Poller, Ready};
use crate::outbox::ConnWriter;
use durable::ToSync;

mod changes;
mod checked_io;
mod durable;
mod expiry;
pub mod fs;
mod handle_shares;
mod leases;
mod listings;
mod local_access;
mod locks;
#[cfg(test)]
mod memfs;
mod opens;
mod rebuild;
mod records;
mod recovery;
mod restart_gate;
mod status_wait;

#[cfg(test)]
mod tests;

pub use crate::command::{Command, ConnId, Peer};

/// Engine settings.
pub struct Config {
    /// Cap on durable timeouts.
    pub max_durable_timeout_ms: u32,
    /// Export root, for status.
    pub root_display: String,
    /// State dir, for status.
    pub state_display: String,
    /// The store as status names it: `lmdb`, or the etcd table's
    /// canonical URL (its owner, fencing revision and lease are in
    /// `StatusInfo::store_detail`).
    pub store_display: String,
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
    /// Descriptors left to handles (the limit less what filterd keeps for
    /// other needs), of which one peer user may hold three quarters
    /// ([`handle_shares`]); `usize::MAX`: no limit known.
    pub handle_room: usize,
    /// Peer users never refused for their share of `handle_room` (root
    /// and filterd's own user).
    pub handle_share_exempt: Vec<u32>,
}

struct Conn {
    /// Shared, so a request takes it without copying its names.
    role: Arc<Role>,
    /// Optional features granted at hello (`proto::FEATURE_*`).
    features: u64,
    writer: Arc<ConnWriter>,
    peer: Peer,
    attached_ms: u64,
    handles: HashSet<ResumeKey>,
    /// The frontend process (its hello's `incarnation`, else one drawn
    /// here for the connection): every handle it attaches is stamped with
    /// it (`HandleRecord::attached_by`). 0 for a control connection.
    incarnation: u64,
}

struct Handle {
    rec: HandleRecord,
    /// The daemon's descriptor (None only for lost handles). Shared, not
    /// duplicated, with the replies that carry it while they wait for a
    /// commit or for a peer that is slow to read: a reply never takes a
    /// descriptor of its own (review rr48c M1: a peer replaying its create
    /// without reading had each queued reply hold a duplicate, and could
    /// fill filterd's descriptor table).
    fd: Option<Arc<OwnedFd>>,
    /// The connection it is attached to.
    conn: Option<ConnId>,
    /// Bumped at every disconnect, so an older expiry timer never reaps a
    /// handle that was resumed and disconnected again since.
    gen: u64,
    /// When its expiry is due on the monotonic clock (`mono_ms`), while
    /// it is disconnected or lost (its last one's, else). An undo puts
    /// this back as it was — never rebuilt from the record's wall-clock
    /// `expires_ms`, which a step of the wall clock would move (review
    /// rvclock: a failed resume's undo after a forward step expired the
    /// handle at once).
    expires_mono: u64,
    /// Its open waits for an intent to be durable (not yet acknowledged).
    parked: bool,
    /// A read-write descriptor of its own (its own open file description)
    /// carrying its byte-range locks as OFD locks; only while it has locks
    /// (and, with none left, until that is durable).
    lock_fd: Option<OwnedFd>,
    /// Its open gave the file its name in this daemon (see
    /// `OpenedFile::linked`): a rollback of the open may unlink it.
    linked: bool,
    /// `rec.through_link` was found by this daemon (at the open, a rename,
    /// or a directory rename's look); not for a recovered handle, whose
    /// record does not store it (`Engine::learn_links_step`).
    link_known: bool,
    /// The commit the last reply showing it (its open, a replay of that,
    /// its resume) waits for: a break of its lease goes out no earlier,
    /// or the frontend hears of a lease it was not granted yet and drops
    /// the break (`Engine::send_break`).
    shown_at: u64,
    /// A break of its lease sent while its open was parked, held until
    /// the open's reply (`Engine::finish_parked`).
    held_break: Option<Event>,
    /// The peer user it counts against ([`handle_shares`]): that of the
    /// connection that opened or last attached it; None for a recovered
    /// handle not resumed since. Changed only by `Engine::attribute`
    /// while it is in the table.
    uid: Option<u32>,
    /// What it counts against `uid` ([`handle_shares::weight`] when last
    /// weighed): given back whole when it leaves or changes hands.
    weighed: usize,
}

impl Handle {
    /// A handle with no descriptor and no connection (recovered, or put
    /// back after a failed close), as `rec` describes it.
    fn detached(rec: HandleRecord) -> Handle {
        Handle {
            rec,
            fd: None,
            conn: None,
            gen: 0,
            expires_mono: 0,
            parked: false,
            lock_fd: None,
            linked: false,
            link_known: false,
            shown_at: 0,
            held_break: None,
            uid: None,
            weighed: 0,
        }
    }
}

/// Most commands drained into one batch.
const MAX_BATCH: usize = 1024;

/// Most lost frontend processes remembered as frontends (see
/// `Engine::frontend_pids`).
const MAX_FRONTENDS_GONE: usize = 64;

/// Requests of each kind — changes (the parked one counted) and learning
/// queries — of one connection about one key parked behind its own parked
/// `SetDeleteOnClose` that are not held to `--max-pending-breaks`
/// (`Engine::park_behind_delete_on_close`): the change, a retry, another
/// and the set-back, each change with at most one learning query. Counted
/// together, a change, its query, a retry and its query already made
/// four, and the set-back was refused under other clients' load, the file
/// deleted (re-review rr-final35).
const FOLLOWERS_EXEMPT: usize = 4;

/// The engine.
pub struct Engine {
    cfg: Config,
    /// Every filesystem effect goes through this port (see `fs`).
    fs: Box<dyn fs::Fs>,
    epoch: u64,
    started: Instant,
    /// Ordered, so listings page by key. Boxed: a B-tree node holds eleven
    /// entries and is often half full, so inline handles (~400 bytes each)
    /// would leave kilobytes idle per node; boxed, an idle slot costs 24.
    handles: BTreeMap<ResumeKey, Box<Handle>>,
    by_file: BTreeMap<FileId, Vec<ResumeKey>>,
    by_guid: HashMap<(ClientId, CreateGuid), ResumeKey>,
    /// The file each client's lease key is held on, and by how many
    /// handles (a lease key names one file of its client's).
    lease_files: HashMap<(ClientId, LeaseKey), (FileId, usize)>,
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
    /// Opens waiting for lease breaks, or for a pending close's commit
    /// (`durable::close_pending`), before they can be decided.
    waiting: Vec<WaitingOpen>,
    /// Renames, removes and size changes waiting for handle-caching
    /// breaks or for a pending close's commit.
    waiting_changes: Vec<(FileId, ConnId, u64, Request)>,
    /// Local opens waiting for lease breaks, or for the commit of their
    /// file's create (`durable::create_pending`): file, the opener's pid
    /// (0: already remembered), verdict, event descriptor.
    waiting_local: Vec<(FileId, i32, LocalReply, Arc<OwnedFd>)>,
    /// Files whose waiting requests and local opens run again once a
    /// sequence is resolved (durable or abandoned), by that sequence.
    commit_waits: BTreeMap<u64, std::collections::BTreeSet<FileId>>,
    /// Deletes on close waiting for another handle's close to commit.
    deferred_deletes: Vec<opens::DeferredDelete>,
    /// Some handle's `through_link` is not known (recovered, or put back
    /// with a record from the store, which does not hold it): found a
    /// chunk per engine step (`Engine::learn_links_step`).
    links_pending: bool,
    /// Directory renames waiting for that (`Engine::rename_directory`).
    waiting_links: Vec<(ConnId, u64, Request)>,
    /// Files a persistent open created in this daemon whose record has
    /// not committed yet, with the sequence that records it: a failed
    /// commit unlinks them again (`Engine::undo_creates`).
    pending_creates: HashMap<FileId, u64>,
    /// Local processes known to hold files with protocol state open (an
    /// entry exists from a file's first protocol open to
    /// [`crate::local_opens::LINGER`] after its last close).
    local_openers: HashMap<FileId, crate::local_opens::LocalOpeners>,
    /// Files whose local opens were plain when last decided here: checked
    /// again and published to the reader before each wait
    /// (`crate::local::Plain`).
    plain_files: Vec<FileId>,
    /// Files whose last handle closed, in order, with when their entry in
    /// `local_openers` may go.
    lingering: std::collections::VecDeque<(std::time::Instant, FileId)>,
    /// Frontend processes lost recently, and when (see
    /// `Engine::frontend_pids`); at most [`MAX_FRONTENDS_GONE`].
    frontends_gone: std::collections::VecDeque<(i32, Option<u64>, std::time::Instant)>,
    /// The fanotify group, when local access is mediated.
    fanotify: Option<Arc<nix::sys::fanotify::Fanotify>>,
    /// Files whose local opens through other mounts reach the engine
    /// (`crate::local::Mediated`).
    mediated: Option<Arc<crate::local::Mediated>>,
    /// The export root as local processes see it (not filterd's clone):
    /// `refuse_paths_crossing_later_mounts`.
    export_root: Option<OwnedFd>,
    /// What local mediation covers, for status.
    mediation: String,
    /// Local-access counters (the fanotify thread's and ours).
    local_counters: Arc<crate::local::LocalCounters>,
    /// Files whose waiting opens should run again (a break ended).
    retry_files: std::collections::BTreeSet<FileId>,
    /// Files on which a break ended by its acknowledgement or its
    /// timeout, and nothing else changed: an open there that waits for
    /// breaks alone runs again only once none of them is in progress
    /// (`Engine::retry_waiting`). Before (review rvcx), every
    /// acknowledgement of n holders' breaks ran it again from scratch.
    break_over_files: std::collections::BTreeSet<FileId>,
    /// How many times a waiting open ran again (the unit tests' measure).
    open_reruns: u64,
    /// The id of the last break begun (`Breaking::id`).
    last_break_id: u64,
    /// Byte-range locks by file.
    locks: BTreeMap<FileId, LockTable<ResumeKey>>,
    /// Handles per (protocol, client) and per frontend instance (limits).
    per_client: HashMap<(Protocol, ClientId), usize>,
    per_frontend: HashMap<InstanceName, usize>,
    /// Descriptors each peer user's handles count as ([`handle_shares`]).
    handle_shares: handle_shares::Shares,
    /// The stored records the last recovery could not read and left in
    /// the store (`status` reports them), as of that recovery: set once
    /// there and not updated when a committed op later deletes one
    /// (`StatusInfo::corrupt_records` says so).
    corrupt: libfilter::proto::CorruptRecords,
    /// Lock hints: the connections told that a file has locks.
    lock_hints: HashMap<FileId, HashSet<ConnId>>,
    /// Lock hints: a first lock on a file waits until these connections
    /// acknowledged and these absent frontends resumed a handle of it (or
    /// the deadline).
    hint_waits: HashMap<FileId, locks::HintWait>,
    /// What the connections' queues hold unread (the poller's, once
    /// [`Engine::run`] has it): `stats` reports it.
    unread_pool: Option<std::sync::Arc<crate::outbox::Pool>>,
    /// Frontend instances with disconnected handles that did not come back
    /// within a lock hint's deadline: first locks stop waiting for them
    /// until they attach again (they learn of locks when they resume).
    hint_gave_up: HashSet<InstanceName>,
    /// Lock hints: the frontend instances that attached with lock hints,
    /// kept in the state dir across restarts.
    frontends_seen: crate::frontends_seen::FrontendsSeen,
    /// The processes `frontends_seen` named when this daemon started, as
    /// they were: which process under each name was attached before the
    /// restart (a hello overwrites the live list).
    seen_before_restart: crate::frontends_seen::FrontendsSeen,
    /// Lock hints after a restart: instances that may have unchecked I/O
    /// in flight from before it and have not said hello since (a first
    /// lock waits for them; see `hint_first`).
    restart_expected: HashSet<InstanceName>,
    /// The open gate after a restart (`restart_gate`): instances seen
    /// before it that have not resynced since.
    restart_unsettled: HashSet<InstanceName>,
    /// When the open gate gives up on them (monotonic ms; set by the first
    /// open that waits).
    restart_gate_deadline: Option<u64>,
    /// Status requests parked behind pending commits, answered with what
    /// is durable once their bound passes (`status_wait`).
    status_waits: status_wait::StatusWaits,
    /// Requests that changed nothing whose replies are parked behind
    /// pending commits: run again if one of those fails (`rebuild`).
    views: rebuild::ParkedViews,
    /// Files of opens waiting at the open gate.
    restart_gate_files: std::collections::BTreeSet<FileId>,
    /// Opens waiting for their intent to be durable before their change.
    parked: HashMap<IntentId, Parked>,
    /// Reads and writes a `CheckIo` let through, until their `IoDone`.
    checked_io: checked_io::CheckedIoTable,
    /// Files with a size change in flight, and how many (see
    /// `durable::content_change_begin`).
    content_changes: HashMap<FileId, u32>,
    /// Handles whose locks are not (yet) mirrored as OFD locks: a local
    /// process held a conflicting lock at recovery. Retried every round.
    unmirrored: std::collections::BTreeSet<ResumeKey>,
    /// Files whose frontends may go back to unchecked I/O once this
    /// sequence is durable.
    gone_after: Vec<(u64, FileId)>,
    /// Handles whose lock descriptor, its locks released, is closed once
    /// this sequence is durable (`locks::Engine::close_lock_fd_after`).
    idle_lock_fds: Vec<(u64, ResumeKey)>,
    /// Files whose change mark (`Fs::mark_change`) is removed once this
    /// sequence — the change's completion — is resolved.
    marks_after: Vec<(u64, KernelHandle, Option<RelPath>, IntentId)>,
    /// Renames made whose completion (their intent's deletion) commits in
    /// this sequence: the sequence, the file, its old and new path. Until
    /// it is resolved a crash leaves the intent for recovery, which finds
    /// the rename made only if the new path still holds the file — a
    /// directory rename above either path waits (review D-4).
    renames_completing: Vec<(u64, FileId, [RelPath; 2])>,
    /// The delete-on-close unlink the last `remove` bracketed, for a CLOSE
    /// to wait on.
    last_unlink: Option<IntentId>,
    /// Handles the request being run expired or purged, settled when it
    /// ends (`durable::Engine::settle_removals`).
    removals: Vec<durable::Removal>,
    /// Recorded replies by scope, mirrored from the `replay` table (and,
    /// for non-persistent handles, only here).
    replays: HashMap<ReplayScope, records::ScopeReplies>,
    /// Where batches go and replies wait for durability.
    pipe: Arc<Pipeline>,
    /// The store, read to undo what a failed commit's requests did.
    store: Arc<dyn StateStore>,
}

/// Where a local open's verdict goes.
struct LocalReply {
    sink: crate::command::VerdictSink,
    /// Whether the engine may still act for the open (shared with the
    /// reader's watchdog).
    claim: crate::command::EventClaim,
    /// The engine acted for it already (purged, broke leases): it keeps
    /// the event until its verdict, never lets the watchdog have it.
    acted: bool,
}

impl LocalReply {
    fn new(sink: crate::command::VerdictSink, claim: crate::command::EventClaim) -> Self {
        LocalReply {
            sink,
            claim,
            acted: false,
        }
    }

    /// A local open's reply with no deadline in sight (tests).
    #[cfg(test)]
    fn for_test(sink: crate::command::VerdictSink) -> Self {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        LocalReply::new(sink, crate::command::EventClaim::new(deadline))
    }

    /// The engine is about to decide the open: `false` when the watchdog
    /// refused it meanwhile (nothing may be done for it).
    fn take(&self) -> bool {
        self.claim.engine_takes()
    }

    /// The engine parks the open: unless it acted for it already, the
    /// watchdog may refuse it at its deadline meanwhile. `false` when its
    /// deadline passed: the caller refuses it at once (dropped, or, acted
    /// for, [`Self::may_wait`]).
    fn park(&self) -> bool {
        match self.acted {
            true => self.may_wait(),
            false => self.claim.engine_lets_go(),
        }
    }

    /// Whether the engine may begin a new wait for the open — a lease
    /// break (again, or the next step of a chain), a commit: always for
    /// one it has not acted for (the watchdog may have it meanwhile); for
    /// one it acted for and holds, only before its verdict deadline, so
    /// that the wait (a break timeout at most) ends within the held grace
    /// (`local::held_grace`: the break timeout + 0.5 s past the deadline).
    /// Past it the engine refuses the open itself, nothing more done for
    /// it — the outcome the watchdog would force at the end of the grace,
    /// decided by the engine. Before (review), a Windows break chain (an
    /// overwrite meeting the lease mid-break), a commit wait or a failed
    /// commit's re-break kept a held open waiting past the grace: refused
    /// by force, as an error, while the engine might act for it.
    fn may_wait(&self) -> bool {
        !self.acted || !self.claim.deadline_passed()
    }

    /// Sends `v`, the engine's share of the event's descriptor `fd` let go
    /// first: the answer then closes the event's file before the opener
    /// goes on (`local::Answer`), so a probe of the file made after it
    /// (the opener's next protocol open) does not find filterd's own
    /// descriptor and take it for a local opener.
    fn send(self, v: crate::command::Verdict, fd: Arc<OwnedFd>) {
        drop(fd);
        (self.sink)(v);
    }
}

/// A lease break in flight.
struct Breaking {
    /// What the break asked the holder to keep.
    to: LeaseState,
    /// The lowest state the opens that met the lease mid-break need
    /// (`to` and below): when the holder acknowledges more than this, the
    /// break goes on (MS-SMB2 3.3.4.7, as Windows and Samba do it:
    /// smbtorture smb2.lease.breaking3).
    required: LeaseState,
    /// Whether an open waits for this break (or for an earlier step of
    /// its chain): while the chain has further steps to go, opens that
    /// need nothing of the lease queue behind it (smb2.lease.breaking3).
    waiters: bool,
    deadline_ms: u64,
    /// Whether its deadline was pushed back once already for a holder
    /// that resumed ([`Engine::resend_break_on_attach`]): only once, or a
    /// holder resuming and dropping again in a loop kept the breaking open
    /// waiting for ever (re-review rr39k A3).
    extended: bool,
    /// Which break this is: a chain's steps keep the id of its first;
    /// a break begun anew, after the last ended, gets another
    /// (`WaitingOpen::breaks`).
    id: u64,
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
    /// The breaks (lease keys on `file`, with the id of each break) it
    /// waits for, when it waits for nothing else; empty, it runs again
    /// at every retry.
    breaks: VecDeque<(LeaseKey, u64)>,
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
    /// The file whose size the change sets (a truncating open, an
    /// end-of-file change), counted in `content_changes` until it is done
    /// or abandoned — kept here, as its handle may be gone by then.
    content: Option<FileId>,
    /// The file a rename with replace takes the target's name from (none:
    /// no file was there, or not such a rename): no open may be granted
    /// it until the rename is made or abandoned (`Engine::deletion_pending`).
    replaces: Option<FileId>,
}

/// Most replay records a scope keeps, whatever the frontend asks.
const MAX_KEEP: u32 = 4096;
/// Most byte-range locks on one file (all its opens together): a handle's
/// locks travel in its record, which must fit a frame. (A file's locks
/// no longer need fit one `Locks` page: with long lock owners they did
/// not, review rvcx; the listing pages inside a file, `listings`.)
const MAX_LOCKS_PER_FILE: usize = 256;
/// Most byte-range locks one protocol client holds on one file (all its
/// opens together): a quarter of the file's, so one client cannot lock
/// everyone else out of the file's lock capacity.
const MAX_LOCKS_PER_CLIENT_PER_FILE: usize = 64;

/// Most read rounds ([`crate::conn`]: up to 32 frames of each connection
/// each) before a deadline that came due is enforced (`read_arrived`):
/// 2048 frames of each connection, more than its socket holds.
const MAX_ARRIVED_ROUNDS: usize = 64;

/// Most connection reads (up to 32 frames each) of one `read_arrived`
/// pass, whatever the number of connections: 64 connections with input
/// queued are read to [`MAX_ARRIVED_ROUNDS`]' depth, more to less (256:
/// 512 frames each); the pass stays bounded (~130k frames, about a
/// second of the engine) however many peers had input queued. At 256
/// reads in all (re-review rr37e) an answer 600 frames deep was enforced
/// over with 16 connections busy.
const MAX_ARRIVED_READS: usize = 4096;

/// The handle a request names, if any: its `key`, or the handle whose
/// replay scope it reads or writes.
fn named_handle(req: &Request) -> Option<ResumeKey> {
    match req {
        // A resume records the handle it resumed itself (by key or by
        // create GUID): recorded twice, the text log showed it twice.
        Request::Close { key, .. }
        | Request::Detach { key, .. }
        | Request::Handle { key, .. }
        | Request::Expire { key, .. }
        | Request::Lock { key, .. }
        | Request::CheckIo { key, .. }
        | Request::BreakReadCaching { key, .. }
        | Request::Wrote { key, .. }
        | Request::Rename { key, .. }
        | Request::SetEndOfFile { key, .. }
        | Request::SetDeleteOnClose { key, .. } => Some(*key),
        Request::RecordReply {
            scope: ReplayScope::Handle(key),
            ..
        }
        | Request::LookupReply {
            scope: ReplayScope::Handle(key),
            ..
        } => Some(*key),
        _ => None,
    }
}

/// Milliseconds on the monotonic clock (since the first call). Every timer
/// — lease breaks, lock hints, expiries — runs on it, so a step of the
/// wall clock neither expires a handle early nor stalls a break; only what
/// must mean something across a restart is stored as wall time.
pub(crate) fn mono_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The reply to request `id` in place of one that could not be encoded
/// (`e`): never leave a request unanswered, and say why (a stored record
/// that fits binary frames may not fit JSON ones).
fn unencodable(id: u64, e: &WireError) -> ServerFrame {
    ServerFrame::Reply {
        id: Some(id),
        result: Err(err(
            ErrorCode::Internal,
            format!("reply could not be encoded: {}", e.message),
        )),
    }
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

impl Engine {
    /// Builds an engine over a filesystem ([`fs::HostFs`]: the export
    /// root's).
    pub fn new(
        cfg: Config,
        fs: Box<dyn fs::Fs>,
        epoch: u64,
        pipe: Arc<Pipeline>,
        store: Arc<dyn StateStore>,
        commit_counters: Arc<CommitCounters>,
    ) -> Self {
        let handle_shares =
            handle_shares::Shares::new(cfg.handle_room, cfg.handle_share_exempt.clone());
        Engine {
            cfg,
            fs,
            epoch,
            started: Instant::now(),
            handles: BTreeMap::new(),
            by_file: BTreeMap::new(),
            by_guid: HashMap::new(),
            lease_files: HashMap::new(),
            guid_clients: HashMap::new(),
            conns: HashMap::new(),
            instances: HashMap::new(),
            expiries: BinaryHeap::new(),
            stats: Stats::default(),
            commit_counters,
            batch: durable::Batch::default(),
            parked: HashMap::new(),
            content_changes: HashMap::new(),
            checked_io: Default::default(),
            unmirrored: Default::default(),
            gone_after: Vec::new(),
            idle_lock_fds: Vec::new(),
            marks_after: Vec::new(),
            renames_completing: Vec::new(),
            last_unlink: None,
            locks: BTreeMap::new(),
            breaking: HashMap::new(),
            waiting: Vec::new(),
            waiting_changes: Vec::new(),
            retry_files: Default::default(),
            break_over_files: Default::default(),
            open_reruns: 0,
            last_break_id: 0,
            lock_hints: HashMap::new(),
            per_client: HashMap::new(),
            per_frontend: HashMap::new(),
            handle_shares,
            corrupt: Default::default(),
            hint_waits: HashMap::new(),
            unread_pool: None,
            hint_gave_up: HashSet::new(),
            frontends_seen: Default::default(),
            seen_before_restart: Default::default(),
            restart_expected: HashSet::new(),
            restart_unsettled: HashSet::new(),
            restart_gate_deadline: None,
            status_waits: Default::default(),
            views: Default::default(),
            restart_gate_files: Default::default(),
            waiting_local: Vec::new(),
            commit_waits: BTreeMap::new(),
            pending_creates: HashMap::new(),
            deferred_deletes: Vec::new(),
            links_pending: false,
            waiting_links: Vec::new(),
            local_openers: HashMap::new(),
            plain_files: Vec::new(),
            lingering: Default::default(),
            frontends_gone: std::collections::VecDeque::new(),
            fanotify: None,
            local_counters: Default::default(),
            mediated: None,
            export_root: None,
            mediation: "off".to_owned(),
            replays: HashMap::new(),
            removals: Vec::new(),
            pipe,
            store,
        }
    }

    /// Runs until [`Command::Shutdown`]: reads every connection through the
    /// poller, handles what it decodes, then expires and flushes the batch.
    pub fn run(mut self, mut poller: Poller) {
        let mut cmds = Vec::new();
        let mut stop = false;
        // However the loop ends (a panic too), the reader allows nothing
        // more by itself.
        let _take_back = crate::local::TakeBackOnDrop(self.mediated.clone());
        self.unread_pool = Some(poller.pool());
        while !stop {
            let ready = poller.wait(self.next_wakeup());
            // What commits resolved meanwhile is durable now: `status`'s
            // counts for a stall (`status_wait`).
            self.note_durable_counts(mono_ms(), false);
            // Before acting on anything: the reader's plain files are
            // taken back, and the openers it allowed are known.
            self.take_back_plain_files();
            stop |= self.serve(&mut poller, ready, &mut cmds);
            // Connections without their hello in time (none of them is
            // the engine's: nothing to tell it).
            poller.close_silent(&mut cmds);
            for c in cmds.drain(..) {
                stop |= self.handle(c);
            }
            let now = mono_ms();
            if !stop && self.next_deadline().is_some_and(|t| t <= now) {
                stop |= self.read_arrived(&mut poller, &mut cmds);
            }
            self.expire_due(now);
            self.process_retries();
            self.flush();
            self.status_waits_due(mono_ms());
            if !stop {
                // Nothing changes from here until the next wake-up.
                self.publish_plain_files();
            }
        }
        self.take_back_plain_files();
        self.flush();
        info!("engine stopped");
    }

    /// Reads and handles what `ready` names: commands of other threads,
    /// connections' frames. Returns true to stop.
    fn serve(&mut self, poller: &mut Poller, ready: Vec<Ready>, cmds: &mut Vec<Command>) -> bool {
        let mut stop = false;
        for ready in ready {
            self.stop_unless_owner();
            match ready {
                Ready::Commands => {
                    let queued: Vec<Command> = poller.commands().take(MAX_BATCH).collect();
                    for c in queued {
                        match c {
                            Command::Accepted { conn, sock, peer } => {
                                if let Some(sock) = sock.take() {
                                    poller.add(conn, sock, peer);
                                }
                            }
                            other => stop |= self.handle(other),
                        }
                    }
                }
                Ready::Conn(conn) => poller.read(conn, cmds),
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
        stop
    }

    /// A deadline came due (a lock hint's or a checked write's
    /// acknowledgement, a lease break's, a disconnected handle's expiry,
    /// the restart gate's): before it is enforced, what peers had sent by
    /// now is read and handled — the acknowledgement, the resume may be
    /// among it. After a stall of the engine (SIGSTOP, a cgroup freeze, a
    /// debugger, a long preemption) replies that came in time wait in the
    /// sockets, possibly behind more than one round's worth of other
    /// frames ([`crate::conn`]'s per-connection cap); enforced first, they
    /// dropped a frontend that had acknowledged in time or expired a
    /// handle whose resume had come (review rvclock). Bounded: only what
    /// was queued when the deadline was found due is waited for (what
    /// comes later is read in later rounds, after it), and at most
    /// [`MAX_ARRIVED_ROUNDS`] rounds and [`MAX_ARRIVED_READS`] connection
    /// reads. What each round handled goes to the committer before the next
    /// is read (re-review rr37c: one peer's deep queue held every other
    /// client's durable reply back for the whole pass). Returns true to
    /// stop.
    fn read_arrived(&mut self, poller: &mut Poller, cmds: &mut Vec<Command>) -> bool {
        let mut stop = false;
        if poller.note_arrived() {
            let mut reads = 0;
            for _ in 0..MAX_ARRIVED_ROUNDS {
                let mut ready = poller.arrived_unread();
                ready.truncate(MAX_ARRIVED_READS.saturating_sub(reads));
                if ready.is_empty() || stop {
                    break;
                }
                reads += ready.len();
                stop |= self.serve(poller, ready, cmds);
                self.process_retries();
                self.flush();
            }
            poller.forget_arrived();
        }
        stop
    }

    /// A shared store's owner whose lease may have run out acts on nothing
    /// more (docs/ARCHITECTURE.md, "etcd"): it exits (75) here. Checked
    /// each time the poll returns and again as each step begins
    /// ([`Engine::begin_request`]), after its request was read: a thread
    /// stopped (SIGSTOP, a long preemption) between the poll's check and
    /// its read must not act on what it read after the lease ran out.
    fn stop_unless_owner(&self) {
        if let Err(e) = self.store.owner_check() {
            step_down(&e);
        }
    }

    /// The earliest deadline `expire_due` enforces, on the monotonic clock.
    fn next_deadline(&self) -> Option<u64> {
        let next_expiry = self.expiries.peek().map(|Reverse((t, _, _))| *t);
        let next_break = self.breaking.values().map(|b| b.deadline_ms).min();
        let next_hint = self.hint_waits.values().map(|w| w.deadline).min();
        let next_io = self.checked_io.next_deadline();
        next_expiry
            .into_iter()
            .chain(next_break)
            .chain(next_hint)
            .chain(next_io)
            .chain(self.restart_gate_deadline)
            .min()
    }

    fn next_wakeup(&self) -> Duration {
        let now = mono_ms();
        match self
            .next_deadline()
            .into_iter()
            // Links still to find: the next chunk at once, between the
            // requests that come meanwhile.
            .chain(self.links_pending.then_some(now))
            .chain(self.next_status_due())
            .min()
        {
            Some(t) if self.links_pending && t <= now => Duration::ZERO,
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
                self.stats.commits_failed += 1;
            }
            Command::LocalOpen {
                file,
                pid,
                fd,
                reply,
                claim,
            } => self.on_local_open(file, pid, fd, LocalReply::new(reply, claim)),
            Command::IntentsDurable(ids) => {
                for id in ids {
                    self.finish_parked(id);
                }
            }
            Command::CommitsResolved => self.commits_resolved(),
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
        // A quarter of the slots stays for other users: one user (a
        // member of the socket's group, say) saying hello on every slot
        // kept every frontend and filterctl out (review rr48c M4).
        let per_user = self.cfg.max_connections - self.cfg.max_connections / 4;
        let of_user = self
            .conns
            .values()
            .filter(|c| c.peer.uid == peer.uid)
            .count();
        if of_user >= per_user {
            return Err(err(
                ErrorCode::LimitReached,
                format!(
                    "user {} holds {of_user} of the {} connections, as many as one user may (three quarters of --max-connections)",
                    peer.uid, self.cfg.max_connections
                ),
            ));
        }
        let granted = match hello.role {
            Role::Frontend { .. } => fenced_io(
                hello.features & proto::FEATURES & !crate::failpoint::withheld_features(),
                self.store.shared(),
            ),
            Role::Control => {
                hello.features & (proto::FEATURE_BINARY_FRAMES | proto::FEATURE_PAGED_WITHIN_FILE)
            }
        };
        if let Role::Frontend {
            protocol, instance, ..
        } = &hello.role
        {
            // A replacement may say hello before the dead instance's EOF has
            // been read: if its peer is gone, retire it first.
            if let Some(&old) = self.instances.get(instance) {
                if self.conns.get(&old).is_some_and(|c| c.writer.peer_gone()) {
                    // Its detaches are a step of their own, as for a
                    // `Closed`: else they joined the last request's group
                    // and failed with it (re-review rr48b L2).
                    self.begin_request();
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
            self.hint_gave_up.remove(instance);
            self.frontend_said_hello(instance, peer.pid, granted);
            self.stats.frontends_attached += 1;
            let orphans = self
                .handles
                .values()
                .filter(|h| h.rec.frontend == *instance && h.conn.is_none())
                .count();
            info!(%protocol, %instance, pid = peer.pid, uid = peer.uid, features = granted, disconnected_handles = orphans, "frontend attached");
        }
        let incarnation = match &hello.role {
            Role::Frontend {
                incarnation: Some(n),
                ..
            } if *n != 0 => *n,
            Role::Frontend { .. } => libfilter::model::new_incarnation(),
            Role::Control => 0,
        };
        self.conns.insert(
            conn,
            Conn {
                incarnation,
                role: Arc::new(hello.role),
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

    /// The frontend process behind `conn` (`Conn::incarnation`; 0 when
    /// it is gone).
    fn incarnation_of(&self, conn: ConnId) -> u64 {
        self.conns.get(&conn).map_or(0, |c| c.incarnation)
    }

    fn on_closed(&mut self, conn: ConnId) {
        self.status_waits.closed(conn);
        self.views.closed(conn);
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Role::Frontend { instance, .. } = &*c.role {
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
            if self.frontends_gone.len() >= MAX_FRONTENDS_GONE {
                self.frontends_gone.pop_front();
            }
            // With its start time: a pid reused by another process within
            // the window is not taken for the frontend.
            self.frontends_gone.push_back((
                c.peer.pid,
                crate::local_opens::start_time(c.peer.pid),
                std::time::Instant::now(),
            ));
        }
        for told in self.lock_hints.values_mut() {
            told.remove(&conn);
        }
        self.checked_io_conn_gone(conn);
        for (file, w) in self.hint_waits.iter_mut() {
            if w.conns.remove(&conn) && w.done() {
                self.retry_files.insert(*file);
            }
        }
        self.hint_waits.retain(|_, w| !w.done());
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
        // The handle a request names, in its span from the start (review
        // rvobs: only opens and resumes carried it; a lock, close or
        // delete on close logged without it, or not at all). An open's is
        // recorded once it is known.
        if let Some(key) = named_handle(&frame.req) {
            span.record("resume_key", tracing::field::display(key));
        }
        let _enter = span.enter();
        crate::failpoint::hit("engine.request");
        self.run_request(conn, &writer, &role, frame.id, frame.req);
        // One line per request (`RUST_LOG=debug`), with its resume key.
        tracing::debug!("handled");
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
        crate::failpoint::hit_request(req.name());
        self.begin_request();
        // An in-memory-only handle the request may change: the part of its
        // record it changes, as it was, to undo if the reply ends up
        // waiting on a commit that fails.
        let before = match &req {
            Request::Lock { key, .. } | Request::SetDeleteOnClose { key, .. } => self
                .handles
                .get(key)
                .filter(|h| !h.rec.durability.is_persistent())
                .and_then(|h| durable::RecordPart::of(&req, &h.rec)),
            _ => None,
        };
        let counted = durable::Granted::counted(&self.stats);
        let bounded = status_wait::Bounded::of(&req);
        // Changing nothing, it is run again rather than refused if a
        // commit its parked reply shows fails (`rebuild`).
        let view = rebuild::changes_nothing(&req).then(|| req.clone());
        let outcome = self.dispatch(conn, role, id, req);
        let answered = !matches!(outcome, Ok(None));
        if let Some(part) = before {
            self.undo_if_failed(durable::Undo::Record(Box::new(part)));
        }
        let granted = durable::Granted::counted(&self.stats).since(counted);
        // Also for a parked request (a close answered once its delete on
        // close is done): what it counted stands or falls with its commit.
        if outcome.is_ok() && granted != durable::Granted::default() {
            self.undo_if_failed(durable::Undo::Counts(granted));
        }
        let token = (bounded.is_some() || view.is_some()).then(|| self.status_waits.next_token());
        self.batch.reply_token = token;
        self.answer(conn, writer, id, outcome);
        self.batch.reply_token = None;
        if let (Some(req), Some(token), true) = (view, token, answered) {
            self.view_answered(conn, writer, id, req, token);
        }
        if let (Some(what), Some(token)) = (bounded, token) {
            self.bound_commit_wait(conn, writer, id, what, token);
        }
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
        let attached = match &outcome {
            Ok(Some((Reply::Opened(o), _))) => Some(o.key),
            _ => None,
        };
        let (result, fd_of) = match outcome {
            Ok(Some((mut reply, fd_of))) => {
                if let Reply::Opened(o) = &mut reply {
                    o.locked = self.hint_open(conn, o.file);
                    // A new non-persistent handle goes if what its reply
                    // waits for fails; a resumed or replayed one stays (its
                    // attachment is put back: `Undo::Attachment`). Before
                    // (review, session 29) every Opened reply filed the
                    // drop: a durable handle whose resume waited for
                    // another handle's failed commit was deleted, and its
                    // file unlinked if its open had created it.
                    if !o.durability.is_persistent() && self.batch.inserted == Some(o.key) {
                        self.undo_if_failed(durable::Undo::Drop(o.key));
                    }
                    let dep = self.request_dependency();
                    if let Some(h) = self.handles.get_mut(&o.key) {
                        h.shown_at = h.shown_at.max(dep);
                    }
                }
                (Ok(reply), fd_of)
            }
            Ok(None) => {
                self.note_waiting(conn, id);
                return;
            }
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
            .and_then(|h| h.fd.clone());
        if self.request_dependency() > self.pipe.committed() {
            // The handle's own descriptor, shared: no duplicate to fail
            // (before, a failed one sent `Opened` without it: rr48e F6).
            self.reply_when_durable(writer, id, &out, fd);
        } else {
            if let Some(p) = self.batch.reply_point.take() {
                crate::failpoint::hit(p);
            }
            match writer.encode(&out) {
                Ok(bytes) => {
                    // A peer that cannot take it is shut down by `send`.
                    writer.send(&bytes, fd.as_ref());
                }
                Err(e) => {
                    error!(error = %e, "could not encode a reply");
                    writer.send_frame(&unencodable(id, &e), None);
                }
            }
        }
        // A holder resumed mid-break learns of the break behind its reply.
        if let Some(key) = attached {
            self.resend_break_on_attach(conn, key, self.batch.rebound == Some(key));
        }
    }

    /// The file of a `SetDeleteOnClose` of `key` sent by `conn` that waits
    /// for lease breaks: a later learning `Handle` query or
    /// `SetDeleteOnClose` of `key` from `conn` waits behind it, so that they
    /// run in the order sent. A
    /// frontend whose change went unanswered learns its outcome by a
    /// `Handle` query (`FilterClient::set_delete_on_close_learnt`); answered
    /// at once, the query showed the flag as it was while the change still
    /// waited, and the change set it after the client was told it failed.
    fn delete_on_close_parked(&self, conn: ConnId, key: ResumeKey) -> Option<FileId> {
        self.waiting_changes.iter().find_map(|(f, c, _, r)| {
            let same = matches!(r, Request::SetDeleteOnClose { key: k, .. } if *k == key);
            (*c == conn && same).then_some(*f)
        })
    }

    /// Requests of `conn` about `key` of the same kind as `req` (changes, or
    /// learning queries) parked behind its parked `SetDeleteOnClose` of
    /// `key` (the change itself counted with the changes).
    fn parked_behind_delete_on_close(&self, conn: ConnId, key: ResumeKey, req: &Request) -> usize {
        let query = matches!(req, Request::Handle { .. });
        self.waiting_changes
            .iter()
            .filter(|(_, c, _, r)| {
                *c == conn
                    && match r {
                        Request::SetDeleteOnClose { key: k, .. } => !query && *k == key,
                        Request::Handle {
                            key: k,
                            learning: true,
                        } => query && *k == key,
                        _ => false,
                    }
            })
            .count()
    }

    /// Parks a learning query or a `SetDeleteOnClose` of `key` behind
    /// `conn`'s own parked change of it (`file`'s). The first few are not
    /// held to `wait_limit` — the learning query and the set-back of a
    /// change parked within the limit: refused, the frontend could not
    /// learn its outcome or set it back (review of 1624469) — but past
    /// [`FOLLOWERS_EXEMPT`] they are: a frontend sending them in a loop
    /// filled the waiting list without bound and had every other client's
    /// waiting request refused (re-review rr-doc3).
    fn park_behind_delete_on_close(
        &mut self,
        file: FileId,
        conn: ConnId,
        req_id: u64,
        req: Request,
    ) -> Result<(), WireError> {
        if let Request::SetDeleteOnClose { key, .. } | Request::Handle { key, .. } = &req {
            if self.parked_behind_delete_on_close(conn, *key, &req) >= FOLLOWERS_EXEMPT {
                self.wait_limit()?;
            }
        }
        self.waiting_changes.push((file, conn, req_id, req));
        Ok(())
    }

    /// A `Close` or `Detach` of `key` by `conn`: that connection's
    /// `SetDeleteOnClose` and learning `Handle` query of `key`, parked
    /// behind lease breaks, are answered an error and dropped. Left parked,
    /// the change ran when the break ended: after a detach and a resume of
    /// the handle on the same connection (a frontend shares one among its
    /// clients, and a DH2C comes back on it), it set the flag of the
    /// resumed handle, whose client had been told it failed or never knew
    /// of it (review of 1624469).
    fn withdraw_parked_delete_on_close(&mut self, conn: ConnId, key: ResumeKey) {
        let (gone, kept) = std::mem::take(&mut self.waiting_changes)
            .into_iter()
            .partition(|(_, c, _, r)| {
                *c == conn
                    && matches!(r, Request::SetDeleteOnClose { key: k, .. }
                        | Request::Handle { key: k, learning: true } if *k == key)
            });
        let gone: Vec<_> = gone;
        self.waiting_changes = kept;
        let Some(w) = self.conns.get(&conn).map(|c| c.writer.clone()) else {
            return;
        };
        for (_, _, id, _) in gone {
            let e = err(ErrorCode::NotFound, "its handle was closed or detached");
            self.answer(conn, &w, id, Err(e));
        }
    }

    /// Refuses a `Close` or `Detach` whose told delete on close is set on
    /// a handle without delete access (as `SetDeleteOnClose` refuses it),
    /// before anything is done.
    fn may_be_told(&self, key: ResumeKey, told: Option<bool>) -> Result<(), WireError> {
        let allowed = self.handles.get(&key).is_none_or(|h| {
            h.rec
                .access
                .rights()
                .contains(libfilter::model::Rights::DELETE)
        });
        if told == Some(true) && !allowed {
            return Err(err(
                ErrorCode::AccessDenied,
                "delete_on_close needs delete access",
            ));
        }
        Ok(())
    }

    /// A `Close` or `Detach` of `key` carrying the delete on close its
    /// client was last told ([`libfilter::proto::FEATURE_CLOSE_DELETE_ON_CLOSE`]):
    /// set in the same step, after the connection's parked change of it
    /// was withdrawn, so the handle goes with the told flag whatever a
    /// change whose outcome its frontend does not know did (review of
    /// 1624469: a release from another connection while the change was in
    /// flight went with the change's flag, and the file its client was
    /// told stays was deleted). A close's removal and a detach's record
    /// carry it into the store.
    fn set_told(&mut self, key: ResumeKey, told: Option<bool>) {
        let Some(told) = told else {
            return;
        };
        if let Some(h) = self.handles.get_mut(&key) {
            h.rec.delete_on_close = told;
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
            Role::Frontend {
                protocol, instance, ..
            } => Some((protocol.clone(), instance.clone())),
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
        // What the reply shows: a listing shows everything (so do the
        // counts in `stats`: shown at once, they counted requests whose
        // commit was still to fail), a request on a handle shows its file. One handle's view shows its record, which
        // only a commit of its file changes: it waited for every pending
        // commit, so rksmbd's count of a handle's locks before a LOCK made
        // a durable open's LOCK wait for other clients' fsyncs (review).
        match &req {
            Request::Status
            | Request::Handles { .. }
            | Request::Files { .. }
            | Request::Frontends { .. }
            | Request::Locks { .. } => self.depends_on_all(),
            Request::Handle { key, .. }
            | Request::Close { key, .. }
            | Request::Detach { key, .. }
            | Request::SetDeleteOnClose { key, .. }
            | Request::Rename { key, .. }
            | Request::SetEndOfFile { key, .. } => self.depends_on_handle(*key),
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
                // A frontend that reports its replays itself looks records
                // up for other reasons too: its lookups are not counted.
                let counted = !self.granted(conn, proto::FEATURE_REPLAY_REPORTS);
                Ok(Some((self.lookup_reply(&scope, op_id, counted)?, None)))
            }
            Request::Lock {
                key,
                locks,
                lock_sequence,
                lock_owner,
            } => {
                need_frontend()?;
                if lock_owner.as_ref().is_some_and(|o| o.len() > 1024) {
                    return Err(err(ErrorCode::BadFrame, "lock_owner: at most 1 KiB"));
                }
                // First the frontends' acknowledgement of a first lock;
                // then the conflicting reads and writes that other handles
                // were let do (`CheckIo`) must be done.
                let hint_waiting = |e: &Self| {
                    e.handles
                        .get(&key)
                        .is_some_and(|h| e.hint_waits.contains_key(&h.rec.file))
                };
                let hint_wait_before = hint_waiting(self);
                let hinted = self.hint_first(conn, key, &locks);
                let waits = hinted.or_else(|| self.lock_conflicts_with_io(key, &locks));
                if let Some(file) = waits {
                    // Parked requests are capped like waiting opens: one
                    // frontend pipelining locks cannot grow the queue
                    // without bound. Checked I/O it waits for gets its
                    // deadline only once it does wait; a hint wait this
                    // lock started goes with its refusal (frontends that do
                    // not acknowledge it are not dropped for a lock that
                    // does not wait).
                    if let Err(e) = self.wait_limit() {
                        if hinted.is_some() && !hint_wait_before {
                            self.hint_waits.remove(&file);
                        }
                        return Err(e);
                    }
                    if hinted.is_none() {
                        self.lock_waits_for_io(key, &locks);
                        debug!(file = ?file, "lock waits for checked I/O in flight");
                        self.stats.locks_waited_for_io += 1;
                    }
                    let req = Request::Lock {
                        key,
                        locks,
                        lock_sequence,
                        lock_owner,
                    };
                    self.waiting_changes.push((file, conn, req_id, req));
                    return Ok(None);
                }
                Ok(Some((
                    self.lock(conn, key, &locks, lock_sequence, lock_owner)?,
                    None,
                )))
            }
            Request::LockHintAck { file } => {
                need_frontend()?;
                if let Some(w) = self.hint_waits.get_mut(&file) {
                    w.conns.remove(&conn);
                    if w.done() {
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
                self.frontend_checks_io(conn);
                self.attached_to(conn, key)?;
                let file = self.handles.get(&key).map(|h| h.rec.file);
                if let Some(f) = file {
                    if self.content_changes.contains_key(&f) || self.lock_waiting_on(f) {
                        // A size change is in flight, or a lock waits for
                        // I/O in flight: wait for it (behind the lock, so
                        // a stream of I/O cannot starve it).
                        self.wait_limit()?;
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
                    // Mandatory (SMB-like) checks follow LockFileEx: the
                    // open's own shared lock refuses its own write.
                    .map(|t| {
                        t.check_io_counting(&key, range, write, !own_protocol_advisory, counts)
                    })
                {
                    self.stats.io_conflicts += 1;
                    let mut e = err(ErrorCode::LockConflict, "range is locked by another open");
                    e.conflict = file.map(|f| Box::new(self.lock_view(f, &l)));
                    return Err(e);
                }
                if let Some(f) = file {
                    self.checked_io_begin(
                        conn,
                        req_id,
                        key,
                        f,
                        range,
                        write,
                        own_protocol_advisory,
                    )?;
                }
                Ok(Some((Reply::Done, None)))
            }
            Request::IoDone { check } => {
                need_frontend()?;
                self.checked_io_done(conn, check);
                // One way: never answered.
                Ok(None)
            }
            Request::Resynced => {
                need_frontend()?;
                self.frontend_resynced(conn);
                // One way: never answered.
                Ok(None)
            }
            Request::ReplaysAnswered { count } => {
                need_frontend()?;
                self.replays_answered(conn, count)?;
                // One way: never answered (a refusal is, as any error).
                Ok(None)
            }
            Request::LeaseBreakAck {
                lease_key,
                state,
                client,
            } => {
                need_frontend()?;
                let reply = self.lease_ack(conn, lease_key, state, client.as_ref())?;
                Ok(Some((reply, None)))
            }
            Request::BreakReadCaching { key } => {
                need_frontend()?;
                self.break_read_caching(conn, key)?;
                Ok(Some((Reply::Done, None)))
            }
            Request::Wrote { key } => {
                need_frontend()?;
                if !self.granted(conn, libfilter::proto::FEATURE_WRITE_NOTICES) {
                    return Err(err(
                        ErrorCode::NotPermitted,
                        "wrote: the hello was not granted write notices (4096)",
                    ));
                }
                self.break_read_caching(conn, key)?;
                // One way: never answered (a refusal is, as any error).
                Ok(None)
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
            Request::RenameDirectory {
                from,
                to,
                replace,
                expect,
            } => {
                need_frontend()?;
                self.rename_directory(conn, req_id, from, to, replace, expect)
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
                // The first few not held to `wait_limit` (`park_behind_delete_on_close`):
                // it is the frontend's set-back of a change parked within
                // the limit, or its client's retry (review of 1624469:
                // refused, the handle went with the parked change's flag).
                if let Some(file) = self.delete_on_close_parked(conn, key) {
                    let req = Request::SetDeleteOnClose {
                        key,
                        delete,
                        record,
                    };
                    self.park_behind_delete_on_close(file, conn, req_id, req)?;
                    return Ok(None);
                }
                let record = record
                    .map(|r| self.own_record(conn, &protocol, r))
                    .transpose()?;
                let h = self.attached_with(
                    conn,
                    key,
                    libfilter::model::Rights::DELETE,
                    "delete_on_close needs delete access",
                )?;
                // A delete pending on an SMB 2/3 file takes other keys'
                // handle caching away first, so their holders close the
                // handles they keep and the file can go (smbtorture
                // smb2.lease.unlink); like a rename, the request waits for
                // their acknowledgements (MS-FSA 2.1.5.14.3), and runs
                // again from the start then.
                let pending_delete = (delete && h.rec.protocol.as_str() == lease::MSFSA_PROTOCOL)
                    .then(|| (h.rec.file, h.rec.lease.map(|l| l.key)));
                if let Some((file, own)) = pending_delete {
                    if self.break_leases_for_namespace(file, own) {
                        let req = Request::SetDeleteOnClose {
                            key,
                            delete,
                            record: record.map(|mut r| {
                                r.scope = unscope(&protocol, r.scope);
                                r
                            }),
                        };
                        self.wait_limit()?;
                        self.waiting_changes.push((file, conn, req_id, req));
                        return Ok(None);
                    }
                }
                let Some(h) = self.handles.get_mut(&key) else {
                    return Err(err(ErrorCode::NoSuchHandle, format!("no handle {key}")));
                };
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
            Request::Locks {
                after, locks_after, ..
            } => Ok(Some((
                self.locks_page(conn, after, locks_after, None),
                None,
            ))),
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
                let (put, delete) = self.own_records(conn, &protocol, put, delete)?;
                self.write_records(put, delete);
                Ok(Some((Reply::Done, None)))
            }
            Request::DeleteRecord { scope, op_id } => {
                let (protocol, _) = need_frontend()?;
                let scope = self.own_scope(conn, &protocol, scope)?;
                let persistent = self.scope_is_persistent(&scope);
                if let Some(recs) = self.replays.get_mut(&scope) {
                    if recs.remove(op_id).is_some() && persistent {
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
            Request::Close {
                key,
                put,
                delete,
                delete_on_close,
            } => {
                let (protocol, _) = need_frontend()?;
                self.attached_to(conn, key)?;
                self.may_be_told(key, delete_on_close)?;
                // A close refused before anything is done, for testing a
                // frontend's answer to a refusal (a non-persistent close
                // commits nothing, so `commit.before` cannot fail it).
                if crate::failpoint::fails("close.refuse") {
                    return Err(err(
                        ErrorCode::FileNotAvailable,
                        "failpoint close.refuse: refusing on purpose",
                    ));
                }
                // The records go into the close's own commit: all checked
                // before anything is done.
                let (put, delete) = self.own_records(conn, &protocol, put, delete)?;
                let recording = !put.is_empty() || !delete.is_empty();
                // Records ride only on a persistent handle's close: that
                // close is undone whole when its commit fails. A
                // non-persistent handle is gone at once (descriptor, share
                // mode, locks, delete on close), so a failed commit of its
                // records could not bring it back.
                let persistent = self
                    .handles
                    .get(&key)
                    .is_some_and(|h| h.rec.durability.is_persistent());
                if recording && !persistent {
                    return Err(err(
                        ErrorCode::BadFrame,
                        "put/delete: records ride only on a persistent handle's close",
                    ));
                }
                // The closed handle's own scope goes with it.
                if put.iter().any(|r| r.scope == ReplayScope::Handle(key)) {
                    return Err(err(
                        ErrorCode::BadFrame,
                        "put: a close cannot record into the closed handle's own scope",
                    ));
                }
                self.withdraw_parked_delete_on_close(conn, key);
                self.set_told(key, delete_on_close);
                // The last open of a file, non-persistent with delete on
                // close, while a persistent handle's close of the file
                // commits: the unlink waits for that commit
                // (`delete_pending`), and so does the CLOSE, run again
                // once it is resolved. Answered at once, the client was
                // told its last open closed while the file was still
                // there (CI, smb_semantics). Past the cap on waiting
                // requests it is answered at once and the unlink follows.
                if let Some((seq, file)) = self.delete_waits_for_close(key) {
                    if self.requests_waiting() < self.cfg.max_pending_breaks {
                        self.wait_for_commit(seq, file);
                        // The told flag is the handle's already.
                        let req = Request::Close {
                            key,
                            put: vec![],
                            delete: vec![],
                            delete_on_close: None,
                        };
                        self.waiting_changes.push((file, conn, req_id, req));
                        return Ok(None);
                    }
                }
                self.last_unlink = None;
                self.remove(key);
                self.stats.closes += 1;
                if persistent {
                    // Put back whole if its deletion does not commit.
                    self.undo_if_this_group_fails(durable::Undo::Uncount(durable::Removed::Close));
                }
                self.write_records(put, delete);
                if recording {
                    // The handle's removal and the records are batched
                    // together, nothing of them is committed yet.
                    crate::failpoint::hit("close.records_batched");
                }
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
            Request::Detach {
                key,
                delete_on_close,
            } => {
                need_frontend()?;
                self.attached_to(conn, key)?;
                self.may_be_told(key, delete_on_close)?;
                self.withdraw_parked_delete_on_close(conn, key);
                // Before the detach, which writes a persistent handle's
                // record: the flag is stored with it.
                self.set_told(key, delete_on_close);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.handles.remove(&key);
                }
                // Not undone if its commit fails (unlike a resume): the
                // frontend has let the handle go (it forgot it, as when its
                // connection is lost, which is not undone either), so
                // attached again it would be named by nobody and refuse
                // its client's resume. So it should not fail for want of
                // room: its record goes as a detach, which may use an
                // eighth of the store's delete reserve
                // (`StoreOp::DetachHandle`; refused there as a plain
                // rewrite, the frontend was told DISK_FULL while the
                // handle stayed disconnected, re-review rr47e F5). Past
                // that eighth, on a filesystem below half its block
                // reserve, or on a store fault it fails still: then it
                // stays disconnected, the frontend is told the error, and
                // the store's record says attached (its told flag
                // unrecorded), which recovery and the next write of it
                // correct.
                self.detach(key);
                Ok(Some((Reply::Done, None)))
            }
            Request::Status => Ok(Some((Reply::Status(self.status()), None))),
            Request::Handles { after, .. } => Ok(Some((self.handles_page(after, None), None))),
            Request::Handle { key, learning } => {
                // Only the query that learns a change's outcome waits: the
                // frontend's other queries of the handle share its
                // connection (review of 1624469). The first few not held to `wait_limit`:
                // refused, the frontend could not learn the outcome of a
                // change that is itself parked within the limit.
                let parked = learning
                    .then(|| self.delete_on_close_parked(conn, key))
                    .flatten();
                if let Some(file) = parked {
                    let req = Request::Handle { key, learning };
                    self.park_behind_delete_on_close(file, conn, req_id, req)?;
                    return Ok(None);
                }
                self.handles
                    .get(&key)
                    .map(|h| Some((Reply::Handle(self.view(h)), None)))
                    .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))
            }
            Request::Files {
                after,
                holders_after,
                ..
            } => Ok(Some((
                self.files_page(conn, after, holders_after, None),
                None,
            ))),
            Request::Frontends { .. } => Ok(Some((frontends_reply(self.frontends()), None))),
            Request::Stats => {
                let mut s = self.durable_stats();
                s.commits = self.commit_counters.commits.load(Ordering::Relaxed);
                s.committed_ops = self.commit_counters.ops.load(Ordering::Relaxed);
                s.local_opens_allowed = self.local_counters.allowed.load(Ordering::Relaxed);
                s.local_opens_allowed_by_reader = self
                    .local_counters
                    .allowed_by_reader
                    .load(Ordering::Relaxed);
                s.local_opens_denied = self.local_counters.denied.load(Ordering::Relaxed);
                s.local_opens_watchdog = self.local_counters.watchdog.load(Ordering::Relaxed);
                s.local_opens_overloaded = self.local_counters.overloaded.load(Ordering::Relaxed);
                s.fanotify_overflows = self.local_counters.overflows.load(Ordering::Relaxed);
                s.fanotify_read_errors = self.local_counters.read_errors.load(Ordering::Relaxed);
                s.ignore_mark_failures = self.local_counters.mark_failures.load(Ordering::Relaxed);
                s.fanotify_waits_for_descriptors = self
                    .local_counters
                    .waits_for_descriptors
                    .load(Ordering::Relaxed);
                s.local_opens_backlogged = self.local_counters.backlogged.load(Ordering::Relaxed);
                s.local_opens_lease_refused =
                    self.local_counters.lease_refused.load(Ordering::Relaxed);
                s.local_opens_denied_by_default = self
                    .local_counters
                    .denied_by_default
                    .load(Ordering::Relaxed);
                let claims = crate::lease_claim::counters();
                s.lease_claims = claims.claimed.load(Ordering::Relaxed);
                s.lease_claims_missed = claims.unclaimed.load(Ordering::Relaxed);
                s.requests_waiting = self.requests_waiting() as u64;
                s.replies_awaiting_commit = self.pipe.replies_waiting() as u64;
                if let Some(p) = &self.unread_pool {
                    s.replies_queued_unread = p.total().fds as u64;
                }
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
                Ok(Some((self.purge_unattached(), None)))
            }
        }
    }

    fn status(&self) -> StatusInfo {
        let (handles_connected, handles_disconnected, handles_lost, frontends) =
            self.status_counts();
        StatusInfo {
            pid: std::process::id(),
            epoch: self.epoch,
            root: self.cfg.root_display.clone(),
            state_dir: self.cfg.state_display.clone(),
            uptime_ms: millis(self.started.elapsed()),
            handles_connected,
            handles_disconnected,
            handles_lost,
            frontends,
            recovering: false,
            fanotify: self.cfg.fanotify,
            mediation: self.mediation.clone(),
            store: self.cfg.store_display.clone(),
            store_detail: self.store.describe(),
            schema_version: libfilter::store::SCHEMA_VERSION,
            corrupt_records: Some(self.corrupt.names.clone()),
            corrupt_records_total: Some(self.corrupt.total),
            commit_wait: None,
            // What the keepalive keeps: never blocks on etcd.
            lease_left_ms: self.store.lease_left().map(millis),
        }
    }

    /// The attached frontends, and the instances the stored handle table
    /// names that are not attached (`attached: false`), each with the
    /// handles the table stores for it (`stored_handles`: its persistent
    /// ones — durable and non-durable handles live in memory only): the
    /// rows offline `filterctl frontends` finds in the store, in its order
    /// (protocol, then instance). Before, every handle counted and the rows
    /// were sorted by instance first, so live and offline differed.
    pub(super) fn frontends(&self) -> Vec<FrontendView> {
        let mut stored: BTreeMap<(&Protocol, &InstanceName), u64> = BTreeMap::new();
        for h in self
            .handles
            .values()
            .filter(|h| h.rec.durability.is_persistent())
        {
            *stored
                .entry((&h.rec.protocol, &h.rec.frontend))
                .or_default() += 1;
        }
        let mut v: Vec<FrontendView> = self
            .conns
            .values()
            .filter_map(|c| match &*c.role {
                Role::Frontend {
                    protocol, instance, ..
                } => Some(FrontendView {
                    protocol: protocol.clone(),
                    instance: instance.clone(),
                    pid: c.peer.pid,
                    uid: c.peer.uid,
                    attached_ms: c.attached_ms,
                    handles: c.handles.len() as u64,
                    attached: true,
                    stored_handles: Some(stored.remove(&(protocol, instance)).unwrap_or(0)),
                }),
                Role::Control => None,
            })
            .collect();
        v.extend(
            stored
                .into_iter()
                .map(|((protocol, instance), n)| FrontendView {
                    protocol: protocol.clone(),
                    instance: instance.clone(),
                    pid: 0,
                    uid: 0,
                    attached_ms: 0,
                    handles: 0,
                    attached: false,
                    stored_handles: Some(n),
                }),
        );
        v.sort_by(|a, b| (&a.protocol, &a.instance).cmp(&(&b.protocol, &b.instance)));
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

impl Engine {
    /// `h` as filterctl shows it, with its lease's break in progress.
    fn view(&self, h: &Handle) -> HandleView {
        let breaking = h
            .rec
            .lease
            .as_ref()
            .and_then(|l| self.breaking.get(&(h.rec.file, l.key)))
            .map(|b| BreakView {
                to: b.to,
                // Set when the break is sent (`send_break`), the only way in.
                ms_left: b.deadline_ms.saturating_sub(mono_ms()),
                waiters: b.waiters,
            });
        HandleView {
            record: h.rec.clone(),
            fd_open: h.fd.is_some(),
            breaking,
        }
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

/// The `Frontends` reply: the rows that fit a page ([`page`]), and how
/// many were left off (`more`), so that a store naming thousands of
/// instances cannot make a reply larger than a frame (which filterd
/// could not send). The listing has no cursor: the rows left off are
/// counted, not paged.
fn frontends_reply(rows: Vec<FrontendView>) -> Reply {
    let all = rows.len();
    let (frontends, _) = page(rows.into_iter(), |_| ());
    let more = (all - frontends.len()) as u64;
    Reply::Frontends {
        frontends,
        more,
        commit_wait: None,
    }
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

/// The store operation that records a reply, for recovery: it writes
/// before it loads the scope into memory, so the store counts the scope
/// to keep its newest `keep` and places the record after the scope's
/// newest ([`ReplayTrim::Keep`]; the engine's own records name what
/// memory dropped, `Engine::put_reply`).
fn record_op(r: RecordSpec) -> StoreOp {
    StoreOp::PutReplay {
        scope: r.scope,
        op_id: r.op_id,
        record: ReplayRecord {
            reply: r.reply,
            recorded_ms: now_ms(),
            // The store places it after the scope's newest.
            seq: None,
        },
        trim: ReplayTrim::Keep(r.keep),
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

/// Stops the daemon as owner of a shared table without acting on anything
/// more: exit status 75 (the frontends see filterd go and reconnect to the
/// new owner). The engine's unit tests see a panic instead.
fn step_down(e: &StoreError) -> ! {
    error!(error = %e, "no longer the owner: stopping without acting on anything more");
    #[cfg(test)]
    panic!("stepped down: {e}");
    #[cfg(not(test))]
    crate::outbox::tell_stepping_down();
    #[cfg(not(test))]
    std::process::exit(75);
}

/// The features granted to a frontend that asked for `asked` (less what
/// this daemon does not know): on a store shared between machines
/// (`shared`), one that asked for [`proto::FEATURE_FENCED_IO`] is granted
/// it and refused [`proto::FEATURE_LOCK_HINTS`], so it checks every read
/// and write with this daemon — which answers none once its lease may
/// have run out, while the descriptors the frontend holds would still
/// write (review rvnode 1). Elsewhere the bit is not granted.
fn fenced_io(asked: u64, shared: bool) -> u64 {
    if shared && asked & proto::FEATURE_FENCED_IO != 0 {
        asked & !proto::FEATURE_LOCK_HINTS
    } else {
        asked & !proto::FEATURE_FENCED_IO
    }
}
