//! The nfsl/1 server: framing, client identity and leases, sessions with
//! the exactly-once slot table, open and lock stateids, delegations, and
//! the one place filter errors become nfsl/1 statuses ([`status_of`]).
//!
//! Each client incarnation's state sits behind a lock of its own, held for
//! the whole of one of its requests: a client's requests run one at a time,
//! different clients' requests run concurrently and share filterd's group
//! commits. A small global table routes sessions, handles and leases to
//! their client (lock order: a client's lock, then the global one). Durable
//! changes are written to filterd (state.rs) before the reply is sent.

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use libfilter::attach::{
    resume_refused_for_good, AttachEvent, Attachment, IoDecision, IoPass, RESUME_PATIENCE,
};
use libfilter::client::{ClientError, OpenedHandle};
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::locks::{LockKind, LockOp, LockRange};
use libfilter::model::*;
use libfilter::proto::{ErrorCode, Event, OpenRequest, Request, MAX_OPENED_JSON_BYTES};
use serde_json::{json, Map, Value};

mod excl;
mod wire;
use shimline::descriptors::{Counted, DescriptorSlot, Descriptors};

use crate::state::{self, ClientRec, DelegRec, ExtraHandle, LockRec, OpenRec, SessionRec, SlotRec};

/// How long filterd keeps an nfsl/1 open while no nfsshim is attached.
const HANDLE_TIMEOUT_MS: u32 = 300_000;
/// Slots per session.
const SLOTS: u32 = 16;
/// Largest READ count served.
const MAX_READ: u64 = 1 << 20;
/// "To end of file".
const EOF_LENGTH: u64 = u64::MAX;

/// Named limits on what peers can make nfsshim hold (command-line flags).
/// The durable tables stay within filterd's records per scope
/// ([`state::KEEP`]), so no record is ever evicted behind a client's back.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most client connections at once.
    pub max_connections: usize,
    /// Most client connections at once from one IP address.
    pub max_connections_per_peer: usize,
    /// Most client records (incarnations).
    pub max_clients: usize,
    /// Most client records created from one IP address (and still live).
    pub max_clients_per_peer: usize,
    /// Most sessions per client.
    pub max_sessions_per_client: usize,
    /// Most open states per client.
    pub max_opens_per_client: usize,
    /// Most descriptors the opens may hold at once
    /// ([`shimline::descriptors::opens_allowed`]): an OPEN past it is
    /// answered NFS4ERR_DELAY ([`descriptor_slot`]).
    pub max_descriptors: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: shimline::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: shimline::DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_clients: 1024,
            max_clients_per_peer: 256,
            max_sessions_per_client: 16,
            max_opens_per_client: 4096,
            max_descriptors: usize::MAX,
        }
    }
}

impl Limits {
    /// Clamped to what filterd keeps per scope.
    fn clamped(self) -> Limits {
        let keep = usize::try_from(state::KEEP).unwrap_or(usize::MAX);
        Limits {
            max_clients: self.max_clients.clamp(1, keep),
            max_sessions_per_client: self.max_sessions_per_client.clamp(1, keep),
            max_opens_per_client: self.max_opens_per_client.clamp(1, keep),
            ..self
        }
    }
}

/// Stateid `other`s and clientids remembered as gone, per table: past
/// this the oldest is forgotten (its stateids then answer BAD_STATEID, its
/// clientid STALE_CLIENTID either way).
const MAX_REMEMBERED_GONE: usize = 4096;

/// Keys remembered as gone, at most [`MAX_REMEMBERED_GONE`]: past that the
/// oldest is forgotten. They only choose a more precise error code
/// (EXPIRED rather than BAD_STATEID), so forgetting is safe.
struct Recent<V> {
    order: std::collections::VecDeque<String>,
    map: HashMap<String, V>,
}

impl<V> Default for Recent<V> {
    fn default() -> Self {
        Recent {
            order: Default::default(),
            map: HashMap::new(),
        }
    }
}

impl<V> Recent<V> {
    fn insert(&mut self, k: String, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
        }
        while self.map.len() > MAX_REMEMBERED_GONE {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
    }
    fn get(&self, k: &str) -> Option<&V> {
        self.map.get(k)
    }
    fn contains(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }
    fn remove(&mut self, k: &str) {
        if self.map.remove(k).is_some() {
            self.order.retain(|o| o != k);
        }
    }
}

impl Recent<()> {
    fn add(&mut self, k: String) {
        self.insert(k, ());
    }
}

/// A failed request: an nfsl/1 status and a message.
struct Fail(&'static str, String);

type Outcome = Result<Map<String, Value>, Fail>;

fn inval(msg: impl Into<String>) -> Fail {
    Fail("NFS4ERR_INVAL", msg.into())
}

fn internal(msg: impl Into<String>) -> Fail {
    Fail("NFS4ERR_SERVERFAULT", msg.into())
}

/// The one place filter errors become nfsl/1 statuses.
fn status_of(e: &ClientError) -> &'static str {
    match e.code() {
        Some(ErrorCode::NotFound) | Some(ErrorCode::PathNotFound) => "NFS4ERR_NOENT",
        Some(ErrorCode::Collision) => "NFS4ERR_EXIST",
        Some(ErrorCode::AccessDenied) | Some(ErrorCode::NotAFile) | Some(ErrorCode::NotOwner) => {
            "NFS4ERR_ACCESS"
        }
        Some(ErrorCode::SharingViolation) | Some(ErrorCode::FileNotAvailable) => {
            "NFS4ERR_SHARE_DENIED"
        }
        Some(ErrorCode::NoSuchHandle) => "NFS4ERR_BAD_STATEID",
        Some(ErrorCode::DiskFull) => "NFS4ERR_NOSPC",
        Some(ErrorCode::LockNotGranted) => "NFS4ERR_DENIED",
        Some(ErrorCode::LockConflict) => "NFS4ERR_LOCKED",
        // Nothing was done and a re-send may succeed at once (the name
        // changed under the open: a local process). SHARE_DENIED would be
        // final to a client; DELAY leaves the slot where it was.
        Some(ErrorCode::Busy) | Some(ErrorCode::Retry) => "NFS4ERR_DELAY",
        Some(ErrorCode::BadFrame) => "NFS4ERR_INVAL",
        Some(ErrorCode::Unsupported) => "NFS4ERR_NOTSUPP",
        // An extension of nfsl/1 (docs/nfs-like.md): a limit was reached.
        Some(ErrorCode::LimitReached) => "NFS4ERR_RESOURCE",
        // A descriptor cut from filterd's answer (nfsshim's table full):
        // the open is made in filterd (and detached), maybe with its
        // records: the re-send checks what filterd holds, as after a loss.
        None if matches!(
            e,
            ClientError::Disconnected | ClientError::Timeout(_) | ClientError::DescriptorsCut(_)
        ) =>
        {
            UNREACHABLE
        }
        _ => "NFS4ERR_SERVERFAULT",
    }
}

/// What nfsshim asks filterd for: lock hints, `Retry` told apart from
/// `FileNotAvailable` (a transient race is NFS4ERR_DELAY, a disconnected
/// persistent open holding the file NFS4ERR_SHARE_DENIED), time-ordered
/// resume keys (it takes none apart), an exclusive create's kernel
/// handle filled into its verifier record, and its own count of replays
/// (it answers re-sends from its slot cache, and looks records up for
/// other reasons).
const FEATURES: u64 = libfilter::proto::FEATURE_LOCK_HINTS
    | libfilter::proto::FEATURE_RETRY_CODE
    | libfilter::proto::FEATURE_TIME_ORDERED_KEYS
    | libfilter::proto::FEATURE_OPEN_KERNEL_HANDLE
    | libfilter::proto::FEATURE_REPLAY_REPORTS
    | libfilter::proto::FEATURE_WRITE_NOTICES
    | libfilter::proto::FEATURE_STEP_DOWN;

/// NFS4ERR_DELAY because filterd cannot be reached: the slot does not
/// advance (the client re-sends with the same seqid).
const UNREACHABLE: &str = "NFS4ERR_DELAY ";

fn filter_fail(e: ClientError) -> Fail {
    Fail(status_of(&e), e.to_string())
}

struct Client {
    rec: ClientRec,
    num: u64,
    deadline: Instant,
    /// The address it was created from (counted against
    /// --max-clients-per-peer); none for clients restored after a restart.
    peer: Option<std::net::IpAddr>,
}

struct Slot {
    seqid: u64,
    /// Shared with the reply's writer (`Answer::Shared`).
    reply: Option<Arc<Value>>,
    /// Restored after a restart: non-mutating replies were not kept, so a
    /// seqid above the restored one starts afresh.
    restored: bool,
    /// The seqid of a request answered DELAY because filterd went away
    /// mid-request: its changes may have committed in filterd before the
    /// loss, so its re-send checks what filterd holds, as after a restart.
    retried: Option<u64>,
    /// The digest ([`request_digest`]) of the request whose reply a
    /// restore found recorded (`reply`): a request at that seqid with
    /// another digest is not its re-send and runs afresh (review F1).
    digest: Option<u64>,
    /// What a request answered DELAY (its records did not commit, seqid
    /// `retried`) did in filterd, and its digest: undone should a
    /// different request take that seqid (review F2; a LOCK's ranges).
    delayed: Option<(u64, Vec<Undo>)>,
}

struct Session {
    rec: SessionRec,
    num: u64,
    slots: Vec<Slot>,
}

/// A descriptor an open holds, counted against
/// [`Limits::max_descriptors`] until its last reference goes.
type OpenFile = Counted<shimline::datasync::SyncedFile>;

/// `fd` as an open's file, counted by `slot`.
fn open_file(fd: std::os::fd::OwnedFd, slot: DescriptorSlot) -> Arc<OpenFile> {
    Arc::new(Counted::new(std::fs::File::from(fd).into(), slot))
}

/// A slot for the descriptor an OPEN (or a further lock-owner's handle)
/// will get from filterd, or NFS4ERR_DELAY when the opens hold as many as
/// the descriptor limit allows. Taken before filterd is asked, so a
/// descriptor filterd sends always has room: one sent into a full table is
/// cut from its message (`MSG_CTRUNC`) and the open is not usable. DELAY,
/// the spec's status for "retry later" (its list has no resource status;
/// RESOURCE is this implementation's extension for limits a client can
/// remedy itself): the descriptors are shared by every client and free up
/// as any of them closes; the slot does not advance and nothing is
/// recorded.
fn descriptor_slot(sh: &Shared) -> Result<DescriptorSlot, Fail> {
    sh.fds.reserve().ok_or_else(|| {
        Fail(
            "NFS4ERR_DELAY",
            format!(
                "nfsshim's opens hold {} descriptors, as many as its descriptor limit allows; retry",
                sh.fds.held()
            ),
        )
    })
}

#[derive(Clone)]
struct Open {
    rec: OpenRec,
    num: u64,
    clientid: String,
    /// The open's own handle's descriptor, with its rights.
    file: Arc<OpenFile>,
    rights: Rights,
    /// The descriptors of `rec.extra`, in its order, with their rights.
    extra: Vec<(Rights, Arc<OpenFile>)>,
    file_key: FileId,
}

impl Open {
    /// A descriptor of this open state that may `right` (read or write).
    fn file_for(&self, right: Rights) -> Option<&Arc<OpenFile>> {
        if self.rights.contains(right) {
            return Some(&self.file);
        }
        self.extra
            .iter()
            .find(|(r, _)| r.contains(right))
            .map(|(_, f)| f)
    }

    /// Every descriptor of the open state.
    fn files(&self) -> impl Iterator<Item = &Arc<OpenFile>> {
        std::iter::once(&self.file).chain(self.extra.iter().map(|(_, f)| f))
    }

    /// Every filter handle of the open state: its own, the further ones an
    /// upgrade added, and its further lock-owners'.
    fn keys(&self) -> Vec<ResumeKey> {
        self.rec.keys()
    }
}

/// One client incarnation's state, behind a lock of its own: requests of
/// different clients run (and share filterd's commits) concurrently, while
/// a client's own requests run one at a time.
#[derive(Default)]
struct State {
    /// None once the incarnation was released (reboot, expiry, destroy).
    client: Option<Client>,
    /// Stateid `other`s of this client's state that went away (revoked
    /// delegations, handles filterd dropped).
    expired: Recent<()>,
    /// Open states whose filter handle went away behind the client's back
    /// (expired, purged, or gone at a restart: possibly closed by a CLOSE
    /// whose reply was lost in a filterd crash), and their owners: a CLOSE
    /// of one is answered NFS4_OK. A state closed by a CLOSE is here with
    /// that request's slot and seqid: only that CLOSE re-sent (its reply
    /// not recorded) is answered NFS4_OK again; another CLOSE of it is
    /// NFS4ERR_BAD_STATEID.
    closed: Recent<(String, Option<String>)>,
    sessions: HashMap<String, Session>,
    /// Open states by their `other`.
    opens: HashMap<String, Open>,
    /// Lock and delegation `other`s → their open's `other`.
    aliases: HashMap<String, String>,
    /// An OPEN of this client failed: filterd may hold a handle of it that
    /// no open state names (see [`release_client`]).
    may_hold_strays: bool,
    /// A CLOSEd state's delegation was revoked: its handle and record are
    /// still to go ([`retire_revoked`]).
    revoked_closed: bool,
    /// When [`retire_revoked`] last said a close failed (it says so once a
    /// minute while it keeps failing, not at every 100 ms retry).
    retire_failed_said: Option<Instant>,
    /// The delegation of a CLOSEd state this client was sent CB_RECALL
    /// for to make room for an OPEN at its limit ([`room_for_an_open`]).
    room_recall: Option<RoomRecall>,
    /// Commits in flight or of unknown outcome that close an open state's
    /// handle and record the state naming another one, by the handle they
    /// close ([`Swap`]).
    swaps: HashMap<ResumeKey, Swap>,
    /// Being released (reboot, expiry, destroy), and a step of it in
    /// filterd failed: the release is retried (by the next request naming
    /// the client, or the lease reaper) until it is done, and meanwhile
    /// the client's state serves nothing (see [`release_client`]).
    releasing: bool,
}

/// A recall to make room for an OPEN ([`State::room_recall`]).
struct RoomRecall {
    /// The open state's `other`.
    other: String,
    /// When it was first sent.
    first: Instant,
    /// When it was sent, or last sent again on a new connection of the
    /// client ([`due_recalls`]), but a lease after `first` at the
    /// latest: the delegation is revoked a lease after (so at most two
    /// leases after the first send — a client hopping connections does
    /// not keep it for ever).
    at: Instant,
    /// The connections it went out on.
    reached: Reached,
}

/// An open state as a commit that closes its handle `old` (the key of
/// [`State::swaps`]) records it: the CLOSE that keeps a delegation on a
/// further handle ([`close_keeping_delegation`]), the reopen of a kept
/// delegation's handle in another share group
/// ([`recarry_kept_delegations`]). Noted before the call and dropped when
/// filterd answers it; when filterd goes away after the commit and before
/// its answer, it reports `old` lost at the reattach, and the state
/// becomes this instead of going ([`forget_handle`]): dropped, it lost
/// the delegation and left the handle the record names open with nothing
/// naming it (re-review rr39a D, E).
struct Swap {
    other: String,
    open: Open,
    /// The CLOSE that made it (its re-send is answered NFS4_OK).
    closed_by: Option<String>,
    /// Lock stateids that go with it.
    gone_aliases: Vec<String>,
    /// [`Global::reattaches`] when it was noted: a reattach after, which
    /// did not report `old` lost (it was resumed), shows the commit never
    /// landed, and the note goes ([`prune_swaps`]).
    reattaches: u64,
}

/// Drops the notes of [`State::swaps`] that can no longer apply: their
/// state no longer names their handle, or a reattach (`reattaches`, the
/// count read with the client's forgotten handles, all of them handled
/// now) came after them and resumed their handle. Kept, each held its
/// open's descriptor until the same handle was swapped again (re-review
/// rr39d F4).
fn prune_swaps(st: &mut State, reattaches: u64) {
    let opens = &st.opens;
    st.swaps.retain(|old, sw| {
        sw.reattaches >= reattaches && opens.get(&sw.other).is_some_and(|o| o.keys().contains(old))
    });
}

/// [`Global::reattaches`] now (0 when the lock is poisoned: the note is
/// then dropped at the first reattach seen).
fn reattaches_now(sh: &Shared) -> u64 {
    sh.global().map(|g| g.reattaches).unwrap_or(0)
}

/// Makes open state `sw.other` what swap `sw` of its handle `old`
/// recorded: filterd committed it.
fn apply_swap(sh: &Shared, st: &mut State, old: ResumeKey, sw: Swap) {
    let before = st.opens.get(&sw.other).map(Open::keys).unwrap_or_default();
    let after = sw.open.keys();
    let cid = sw.open.clientid.clone();
    for l in &sw.gone_aliases {
        st.aliases.remove(l);
    }
    if let Some(by) = sw.closed_by {
        st.closed.insert(sw.other.clone(), (cid.clone(), Some(by)));
    }
    // The delegation's lease may be carried by another handle now.
    let held = LeaseHolder::of(&cid, &sw.open.rec);
    st.opens.insert(sw.other, sw.open);
    if let Ok(mut g) = sh.global() {
        if let Some((lease, held)) = held {
            // Only while it is held: a revoked one stays gone.
            if let Some(e) = g.lease_client.get_mut(&lease) {
                *e = held;
            }
        }
        for k in before.iter().chain(&after).chain([&old]) {
            // A CLOSEd state locks nothing.
            g.lock_owner.remove(k);
            if !after.contains(k) {
                g.handle_client.remove(k);
            }
        }
        for k in after {
            g.handle_client.insert(k, cid.clone());
        }
    }
}

/// What routes requests and events to a client, and what outlives it. Held
/// only briefly; a client's lock may be held while taking it, never the
/// other way round.
#[derive(Default)]
struct Global {
    clients: HashMap<String, Arc<Mutex<State>>>,
    by_owner: HashMap<String, String>,
    /// Stateid `other`s of released clients.
    expired: Recent<()>,
    /// Client records being written (counted against --max-clients).
    clients_reserved: usize,
    /// Each connection's peer address.
    conn_peer: HashMap<u64, std::net::IpAddr>,
    /// Client records (live or being written) created from each address.
    clients_per_peer: HashMap<std::net::IpAddr, usize>,
    /// Session → its client.
    session_client: HashMap<String, String>,
    /// Filter handle → its client (filterd's events name handles).
    handle_client: HashMap<ResumeKey, String>,
    /// Filter handle → the lock-owner locking through it (NFS4ERR_DENIED).
    lock_owner: HashMap<ResumeKey, String>,
    /// Delegation lease key → its client and the delegation's `other`
    /// (recalls are sent from here without taking the client's lock), the
    /// handle holding the lease and whether the delegation is a write one
    /// (what filterd is asked about an outstanding recall: [`recall_now`]).
    lease_client: HashMap<uuid::Uuid, LeaseHolder>,
    /// Client → the connection its last request came on (callbacks; a
    /// request on another one sends the outstanding recalls again:
    /// [`due_recalls`]).
    client_conn: HashMap<String, u64>,
    /// Delegations filterd lowered without a recall (nothing to ack), per
    /// client: revoked under its lock, at its next request or the reaper's
    /// next tick ([`settle_revocations`]).
    /// With the file of each (None from a daemon older than the event's
    /// `file`: any file), which [`open_refused`] masks for.
    revoked: HashMap<String, Vec<(uuid::Uuid, Option<FileId>)>>,
    /// The files of revocations settled within the last second, and when:
    /// an OPEN filterd refused by the handle just before it was closed
    /// finds its revocation settled by the time it is answered, and is
    /// DELAY too ([`open_refused`]), not SHARE_DENIED.
    settled: Vec<(Instant, Option<FileId>)>,
    /// Delegation lease keys CB_RECALL was sent for, and what of:
    /// until the delegation ends (its key leaves `lease_client`), filterd
    /// may end the break at its timeout and refuse another open by the
    /// handle, or grant one, before nfsshim hears of the revocation
    /// ([`open_refused`], [`settle_recalls`]).
    recalled: HashMap<uuid::Uuid, Recalled>,
    /// What of each delegation's lease nfsshim acknowledged itself
    /// ([`mark_own_ack`]), kept apart from `recalled` and taken off a
    /// recall's starting state only when it is read ([`recalled_from`]):
    /// an own ack may complete a break before the events thread records
    /// its recall, which must not then count the acked bits as filterd's
    /// lowering (re-review rr39k B1), and the mark's removal or undo must
    /// reach a recall already recorded (re-review rr40a E1). Kept while
    /// the delegation is.
    own_acked: HashMap<uuid::Uuid, LeaseState>,
    /// Lease keys of OPENs in flight that ask for a delegation (not yet in
    /// `lease_client`), with a break filterd sent meanwhile (whether it
    /// needs an answer, and its file): handled once the OPEN is done
    /// ([`Opening`]).
    opening: HashMap<uuid::Uuid, Option<EarlyBreak>>,
    /// Lease keys with a give-back queued ([`Chore::GiveBack`]) and not yet
    /// done: a lease nfsshim knew no delegation of — the lease of an OPEN
    /// try whose answer was lost, which a re-send of that OPEN (the same
    /// request, the same key: `filter_name`) would find again — or one it
    /// revoked. An OPEN under such a key asks for no delegation
    /// ([`Opening::new`]). Kept after a give-back that failed, so that the
    /// re-send gives the lease back itself once its replay holds it again;
    /// with when it failed (None while it is queued or running), so that
    /// the reaper forgets a key no re-send came for within two lease
    /// periods, ten minutes at least, after its give-back failed (its
    /// client's state is released by then, and a re-send refused with it;
    /// re-review rr-deleg36: kept for ever before). A queued one is never
    /// forgotten: its stale ack would take a re-send's fresh delegation
    /// (rr-emfile36).
    giving_back: HashMap<uuid::Uuid, Option<Instant>>,
    /// Handles filterd dropped while their client's request was running,
    /// per client: forgotten at the client's next request.
    forgotten: HashMap<String, Vec<ResumeKey>>,
    /// Reattaches to filterd handled so far (counted once their lost
    /// handles are in `forgotten` or forgotten): a [`Swap`] noted before
    /// one whose handle was not lost in it never committed.
    reattaches: u64,
}

struct Shared {
    filter: Attachment,
    /// The client connections, let go of when filterd steps down.
    clients: Arc<shimline::ClientGate>,
    st: Mutex<Global>,
    next_num: AtomicU64,
    writers: shimline::Writers,
    lease: Duration,
    locked_files: Mutex<HashSet<FileId>>,
    limits: Limits,
    /// This instance's table names.
    tables: state::Tables,
    /// Whether the `instances` registry names this instance yet.
    registered: std::sync::atomic::AtomicBool,
    /// filterd commits the event thread leaves to the chores thread,
    /// each with the [`Shared::reloads`] it was computed at
    /// ([`chore_off_request`]).
    chores: crossbeam_channel::Sender<(u64, Chore)>,
    /// Reloads of the tables begun ([`reload`]): what was computed from
    /// memory before one is stale once it has begun.
    reloads: AtomicU64,
    /// The descriptors the opens hold ([`descriptor_slot`]).
    fds: Arc<Descriptors>,
    /// Re-sends answered here, told to filterd by the reaper.
    replays: libfilter::client::ReplayCounter,
    /// The `excl` table's records and their ages ([`excl`]).
    excl: Mutex<excl::Ages>,
    /// Held (read) by every request and reaper tick, (write) by a reload
    /// of the tables ([`reload`]): a reload never swaps the state under
    /// a request that runs on it.
    serving: std::sync::RwLock<()>,
    /// Another frontend process of this instance may have changed the
    /// tables since they were read (filterd stepped down: another node
    /// owned them; or a reattach found handles another process attached):
    /// what is in memory is stale until [`reload`] has read them again.
    /// Requests are `NFS4ERR_DELAY` meanwhile.
    reload_due: std::sync::atomic::AtomicBool,
    /// filterd said it steps down (another node owns the table) and this
    /// process has not reattached since: requests are `NFS4ERR_DELAY`
    /// until the next reattach, which reads the tables again only if
    /// another process served them meanwhile (`taken`,
    /// [`served_elsewhere`]) — a lease blip after which the same node
    /// claims the table again, nobody else serving, costs no reload.
    stepped_down: std::sync::atomic::AtomicBool,
    /// This process, as [`state::ServerRec`] names it.
    process: u64,
    /// Whether the tables' [`state::ServerRec`] names this process: written
    /// at the start (or a reload) when the tables hold a client, else with
    /// the first client record this process writes, in its commit.
    claimed: std::sync::atomic::AtomicBool,
}

/// A filterd call that forgetting a handle leaves to do. Each is a commit,
/// so the event thread — which sends recalls and acknowledges lock hints
/// for every client — hands them to a thread of their own instead of
/// waiting for an fsync; a request thread does them itself, and hands
/// that thread what it cannot do now ([`do_chores`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chore {
    /// Write an open state's record (`num` in table `scope`, of client
    /// `cid`, naming handles `keys`) as `text`: marked gone
    /// ([`OpenRec::gone`]), before its handles' closes. Only over a record
    /// there ([`chore_call`]).
    MarkGone {
        scope: String,
        cid: String,
        num: u64,
        text: String,
        keys: Vec<ResumeKey>,
    },
    /// Delete an open state's record (of client `cid`), once the closes
    /// of its other handles queued before it (`after`) are done: not if
    /// one of them was left undone ([`ChoreSequence`]).
    DeleteState {
        scope: String,
        cid: String,
        num: u64,
        after: Vec<ResumeKey>,
    },
    /// Close a handle of the open that went (of client `.1`): the one
    /// that went, or another; one filterd holds disconnected is resumed to
    /// be closed ([`close_resuming`]).
    Close(ResumeKey, String),
    /// Give a lease no delegation answers for back ([`give_back`]).
    GiveBack(LeaseKey),
}

impl Chore {
    /// The client of the open state the chore cleans up after, if any.
    fn client(&self) -> Option<&str> {
        match self {
            Chore::MarkGone { cid, .. } | Chore::DeleteState { cid, .. } | Chore::Close(_, cid) => {
                Some(cid)
            }
            Chore::GiveBack(_) => None,
        }
    }

    /// What it does, for the log (not a mark's record text).
    fn what(&self) -> String {
        match self {
            Chore::MarkGone { scope, num, .. } => format!("mark {scope}/{num} gone"),
            Chore::DeleteState { scope, num, .. } => format!("delete {scope}/{num}"),
            Chore::Close(k, cid) => format!("close handle {k} of client {cid}"),
            Chore::GiveBack(k) => format!("give lease {} back", k.0),
        }
    }

    /// Whether this is a delete that waits for the close of `k`.
    fn waits_for(&self, k: ResumeKey) -> bool {
        matches!(self, Chore::DeleteState { after, .. } if after.contains(&k))
    }
}

/// Runs `chores`, computed from memory by a request, on its thread (which
/// pinned its connection, [`handle_line`]). Once one cannot be done now
/// — the connection lost, or filterd busy or not answering — it and every
/// one after it go to the chores thread ([`queue_chore`]), in order: they
/// were dropped before, and a close lost so left a handle attached that
/// nothing named (re-review rrpin2 C). A failure for good is logged; a
/// close failed for good drops its open's delete ([`ChoreSequence`]).
fn do_chores(sh: &Shared, chores: impl IntoIterator<Item = Chore>) {
    for c in run_chores_here(chores, |c| do_chore(sh, c)) {
        queue_chore(sh, c);
    }
}

/// [`do_chores`]' sequencing, with `run` doing one chore: the chores it
/// leaves to the chores thread, in order.
fn run_chores_here(
    chores: impl IntoIterator<Item = Chore>,
    mut run: impl FnMut(&Chore) -> ChoreOutcome,
) -> Vec<Chore> {
    let mut seq = ChoreSequence::default();
    let mut left = chores_in_order(chores, |c| {
        // Nothing is put back here: a delete runs or is dropped.
        if seq.admits(c) == ChoreTurn::Drop {
            return true;
        }
        match run(c) {
            ChoreOutcome::Done => true,
            ChoreOutcome::Failed(e) => {
                eprintln!("nfsshim: cleaning up after a handle that went away: {e}");
                if !closed_anyway(&e) {
                    seq.left_undone(c);
                }
                true
            }
            ChoreOutcome::Lost(e) | ChoreOutcome::Passing(e) => {
                eprintln!(
                    "nfsshim: cleaning up after a handle that went away: {e}; left to the chores thread"
                );
                false
            }
        }
    });
    // The chores thread keeps a sequence of its own: a delete handed over
    // whose close this call left undone is dropped here, not run there
    // after the closes it does make (re-review rr42g R1).
    left.retain(|c| !matches!(c, Chore::DeleteState { .. }) || seq.admits(c) != ChoreTurn::Drop);
    left
}

/// Whether a close that failed with `e` leaves no handle behind: filterd
/// has no such handle (closed already). Not `NotOwner`: the handle is
/// there, not attached to this connection — this instance's own handle
/// left disconnected, say — so its open's record stays for the restore,
/// which resumes and closes it (re-review rr42g R2: counted closed, the
/// delete ran and the handle held its modes and locks, named by nobody,
/// until it expired).
fn closed_anyway(e: &ClientError) -> bool {
    e.code() == Some(ErrorCode::NoSuchHandle)
}

/// Closes handle `key` of client `cid`. One filterd holds disconnected (a
/// close refused `NotOwner`) is resumed, then closed: a handle lost only
/// from the attachment (its resume at a reattach refused past its
/// patience), or left disconnected — else it held its modes, locks or
/// lease for nobody until its timeout, and a restore within it resumed it
/// and brought back the open or delegation its client was told was gone
/// (re-review rr42g R4, R5). A resume refused for good (gone since,
/// attached elsewhere, not this client's) answers the close's refusal:
/// not closed here.
fn close_resuming(f: &impl FilterCalls, cid: &str, key: ResumeKey) -> Result<(), ClientError> {
    close_or_resume(|| f.close(key), || f.resume(cid, key))
}

/// The filterd calls of a client's release ([`release_in_filter`]) and of
/// the chores ([`chore_call`]): filterd's ([`Shared`]), or a test's.
trait FilterCalls {
    fn close(&self, k: ResumeKey) -> Result<(), ClientError>;
    /// Resumes handle `k` of client `cid` (attaches it here).
    fn resume(&self, cid: &str, k: ResumeKey) -> Result<(), ClientError>;
    /// Writes record `num` of table `scope` as `text` ([`state::encode`]).
    fn put(&self, scope: &str, num: u64, text: String) -> Result<(), ClientError>;
    /// Whether table `scope` has record `num`.
    fn exists(&self, scope: &str, num: u64) -> Result<bool, ClientError>;
    fn delete(&self, scope: &str, num: u64) -> Result<(), ClientError>;
    /// [`give_back`].
    fn give_back(&self, k: LeaseKey) -> Result<(), ClientError>;
    /// Client `cid`'s open-state records.
    fn states(&self, cid: &str) -> Result<Vec<(u64, OpenRec)>, ClientError>;
    /// Closes the handles of client `cid` no open state names
    /// ([`close_strays`]).
    fn close_strays_of(&self, cid: &str) -> Result<(), ClientError>;
    /// Drops client `cid`'s open-state table, records and all.
    fn drop_states(&self, cid: &str) -> Result<(), ClientError>;
    /// [`drop_session_records`].
    fn drop_session(&self, s: &Session) -> Result<(), ClientError>;
    /// Deletes client record `num`.
    fn delete_client(&self, num: u64) -> Result<(), ClientError>;
}

impl FilterCalls for Shared {
    fn close(&self, k: ResumeKey) -> Result<(), ClientError> {
        self.filter.close(k)
    }
    fn resume(&self, cid: &str, k: ResumeKey) -> Result<(), ClientError> {
        let client =
            ClientId::new(cid.to_owned()).map_err(|e| ClientError::Unexpected(e.to_string()))?;
        self.filter.resume(client, k).map(drop)
    }
    fn put(&self, scope: &str, num: u64, text: String) -> Result<(), ClientError> {
        state::put_encoded(&self.filter, scope, num, text)
    }
    fn exists(&self, scope: &str, num: u64) -> Result<bool, ClientError> {
        Ok(self
            .filter
            .client()
            .lookup_reply(state::scope(scope)?, num)?
            .is_some())
    }
    fn delete(&self, scope: &str, num: u64) -> Result<(), ClientError> {
        state::delete(&self.filter, scope, num)
    }
    fn give_back(&self, k: LeaseKey) -> Result<(), ClientError> {
        give_back(self, k)
    }
    fn states(&self, cid: &str) -> Result<Vec<(u64, OpenRec)>, ClientError> {
        state::list(&self.filter, &self.tables.states(cid))
    }
    fn close_strays_of(&self, cid: &str) -> Result<(), ClientError> {
        close_strays(self, |h| h.record.client.as_str() == cid)
    }
    fn drop_states(&self, cid: &str) -> Result<(), ClientError> {
        self.filter.client().call(Request::DropScope {
            scope: state::scope(&self.tables.states(cid))?,
        })?;
        Ok(())
    }
    fn drop_session(&self, s: &Session) -> Result<(), ClientError> {
        drop_session_records(self, s)
    }
    fn delete_client(&self, num: u64) -> Result<(), ClientError> {
        state::delete(&self.filter, &self.tables.clients(), num)
    }
}

/// [`close_resuming`] with `close` closing the handle and `resume`
/// resuming it.
fn close_or_resume(
    mut close: impl FnMut() -> Result<(), ClientError>,
    resume: impl FnOnce() -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    match close() {
        Err(e) if e.code() == Some(ErrorCode::NotOwner) => match resume() {
            Ok(()) => close(),
            Err(r) if resume_refused_for_good(&r) => Err(e),
            Err(r) => Err(r),
        },
        r => r,
    }
}

/// Ties an open's record's delete to the closes of its other handles
/// queued before it ([`open_gone_chores`]): a close given up for good, or
/// failed for good other than as [`closed_anyway`], drops the delete, so
/// that the record goes on naming a gone handle and the restore drops the
/// open whole, closing the handle left (re-review rr42c F1: the delete
/// ran anyway, and the handle stayed attached, share modes and locks held
/// for nobody, until its client went); a close put back in the queue
/// ([`ChoreSequence::put_back`]) holds the delete back until it is done
/// or given up. Holds only keys of closes whose delete is still to come:
/// a delete decides only once none of its closes is held back, and takes
/// its keys out then.
#[derive(Debug, Default)]
struct ChoreSequence {
    /// Closes given up or failed.
    undone: HashSet<ResumeKey>,
    /// Closes put back in the queue, to be tried again.
    held: HashSet<ResumeKey>,
}

/// What becomes of a chore whose turn came ([`ChoreSequence::admits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChoreTurn {
    Run,
    /// A delete one of whose closes was left undone: not run (logged).
    Drop,
    /// A delete one of whose closes was put back: put back behind it.
    Wait,
}

impl ChoreSequence {
    /// What becomes of chore `c` now its turn came.
    fn admits(&mut self, c: &Chore) -> ChoreTurn {
        let Chore::DeleteState { after, .. } = c else {
            return ChoreTurn::Run;
        };
        if after.iter().any(|k| self.held.contains(k)) {
            return ChoreTurn::Wait;
        }
        let mut undone = false;
        for k in after {
            undone |= self.undone.remove(k);
        }
        if undone {
            eprintln!(
                "nfsshim: an open's handle left attached: its record is kept for the restore, which closes it"
            );
            ChoreTurn::Drop
        } else {
            ChoreTurn::Run
        }
    }

    /// Chore `c` was given up or failed: a close's delete does not run.
    fn left_undone(&mut self, c: &Chore) {
        if let Chore::Close(k, _) = c {
            self.held.remove(k);
            self.undone.insert(*k);
        }
    }

    /// Chore `c` was done.
    fn done(&mut self, c: &Chore) {
        if let Chore::Close(k, _) = c {
            self.held.remove(k);
        }
    }

    /// Close `c` was put back in the queue: its delete waits.
    fn put_back(&mut self, c: &Chore) {
        if let Chore::Close(k, _) = c {
            self.held.insert(*k);
        }
    }
}

/// Runs `run` on each of `chores` in order until one is not done (`run`
/// false); returns that one and every one after it, in order, to be done
/// later — never one after a chore not done before it: an open's record
/// is deleted only after its other handles' closes ([`open_gone_chores`]).
fn chores_in_order<C>(
    chores: impl IntoIterator<Item = C>,
    mut run: impl FnMut(&C) -> bool,
) -> Vec<C> {
    let mut chores = chores.into_iter();
    for c in chores.by_ref() {
        if !run(&c) {
            return std::iter::once(c).chain(chores).collect();
        }
    }
    Vec::new()
}

/// What became of one chore's filterd call ([`do_chore`]).
#[derive(Debug)]
enum ChoreOutcome {
    Done,
    /// Failed for good ([`ChoreFailure::ForGood`]).
    Failed(ClientError),
    /// Its connection lost ([`ChoreFailure::Lost`]).
    Lost(ClientError),
    /// Failed for a cause that may pass ([`ChoreFailure::Passing`]).
    Passing(ClientError),
}

/// Why a chore's call failed ([`chore_failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChoreFailure {
    /// For good: logged, counted done.
    ForGood,
    /// The connection it was pinned to is lost: tried again once
    /// requests would run again (after the reattach; dropped as stale if
    /// that read the tables again, whose restore does what is left).
    Lost,
    /// filterd busy, interrupted, short of descriptors or memory, its
    /// store full, or not answering in time: tried again a few times, with
    /// backoff, a timeout at most twice in a row ([`chore_retry`]).
    Passing,
}

/// Classifies failure `e` of a chore's call on a thread whose pinned
/// connection is `lost` or not. Once, for both the give-back's mark and
/// the caller (re-review rrpin2 E: each asked whether the connection was
/// dead, and a give-back refused just before it died was marked failed,
/// then tried again). A timeout or a refusal that may pass counted as
/// done before, and the close or give-back was lost for good (re-review
/// rrpin2 D); trying again is safe: a close already made answers
/// no-such-handle (done), a lease already given back is fine.
fn chore_failure(e: &ClientError, lost: bool) -> ChoreFailure {
    if lost || matches!(e, ClientError::Disconnected) {
        ChoreFailure::Lost
    } else if matches!(e, ClientError::Timeout(_)) || reload_error_may_pass(e) {
        ChoreFailure::Passing
    } else {
        ChoreFailure::ForGood
    }
}

/// How long the chores thread waits after its `tries`-th failed try
/// (counted from 1) of a chore that failed for a passing cause
/// ([`ChoreFailure::Passing`]), the last one a timeout or not, before
/// trying it again; None once it has had [`CHORE_TRIES`], or
/// [`CHORE_TIMEOUT_TRIES`] ending in a timeout: given up (logged). Never
/// below [`CHORE_WAIT`]: it never spins.
fn chore_retry(tries: u32, timed_out: bool) -> Option<Duration> {
    let most = if timed_out {
        CHORE_TIMEOUT_TRIES
    } else {
        CHORE_TRIES
    };
    if tries >= most {
        return None;
    }
    Some(CHORE_WAIT.saturating_mul(1 << tries.min(5)))
}

/// How many times the chores thread tries a chore that fails for a
/// passing cause before it gives it up ([`chore_retry`]): five, waiting
/// 100, 200, 400 and 800 ms between them. A chore a request handed over
/// ([`do_chores`]) had one try before them.
const CHORE_TRIES: u32 = 5;

/// How many times the chores thread tries a chore whose last try timed
/// out (each waits out the call's timeout, every chore behind it waiting
/// too): twice, so that a timeout holds the queue up for two call
/// timeouts at most (re-review rr42c F2: five, about ten minutes). A
/// later try of a close that did commit answers no-such-handle anyway.
const CHORE_TIMEOUT_TRIES: u32 = 2;

/// One chore's filterd call, on the calling thread's (pinned) connection.
/// A give-back done is no longer queued ([`Global::giving_back`]); one
/// failed for good is marked failed; one to be tried again is left as it
/// is (still queued: a re-send of its OPEN must not give the lease back
/// itself meanwhile).
fn do_chore(sh: &Shared, c: &Chore) -> ChoreOutcome {
    if let Chore::GiveBack(k) = c {
        test_delay_give_back(*k);
    }
    let r = chore_call(sh, c);
    let outcome = match r {
        Ok(()) => ChoreOutcome::Done,
        Err(e) => {
            let lost = sh.filter.pinned_lost() || sh.filter.client().is_dead();
            match chore_failure(&e, lost) {
                ChoreFailure::ForGood => ChoreOutcome::Failed(e),
                ChoreFailure::Lost => ChoreOutcome::Lost(e),
                ChoreFailure::Passing => ChoreOutcome::Passing(e),
            }
        }
    };
    if let Chore::GiveBack(k) = c {
        match outcome {
            ChoreOutcome::Done => {
                if let Ok(mut g) = sh.global() {
                    g.giving_back.remove(&k.0);
                }
            }
            ChoreOutcome::Failed(_) => give_back_failed(sh, *k),
            ChoreOutcome::Lost(_) | ChoreOutcome::Passing(_) => {}
        }
    }
    outcome
}

/// Chore `c`'s filterd call, through `f` ([`do_chore`]).
fn chore_call(f: &impl FilterCalls, c: &Chore) -> Result<(), ClientError> {
    match c {
        Chore::DeleteState { scope, num, .. } => f.delete(scope, *num),
        // Only over a record there (re-review rr43c F2: an upsert, it made
        // a gone record the open's commit never wrote, naming a handle a
        // later open holds, which the next restore closed). The client's
        // lock held ([`run_unless_overtaken`]), no request of it writes
        // the record between the look and the write.
        Chore::MarkGone {
            scope, num, text, ..
        } => {
            if f.exists(scope, *num)? {
                f.put(scope, *num, text.clone())
            } else {
                Ok(())
            }
        }
        Chore::Close(k, cid) => close_resuming(f, cid, *k),
        Chore::GiveBack(k) => f.give_back(*k),
    }
}

/// A queued give-back of `k` will not be done: kept as one that failed
/// ([`Global::giving_back`]), so that a re-send of its OPEN gives the
/// lease back itself and the reaper forgets it in time.
fn give_back_failed(sh: &Shared, k: LeaseKey) {
    if let Ok(mut g) = sh.global() {
        if let Some(since) = g.giving_back.get_mut(&k.0) {
            *since = Some(Instant::now());
        }
    }
}

/// How the chores thread got on with a chore ([`chore_off_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChoreRun {
    /// Done, or failed for good (logged) but closed anyway
    /// ([`closed_anyway`]).
    Done,
    /// Failed for good otherwise (logged): a close's delete does not run
    /// ([`ChoreSequence`]).
    Failed,
    /// Computed from memory a reload has replaced since: not done (the
    /// reload's restore does from the tables what is still to do).
    Stale,
    /// Not now: filterd gone, a reattach or reload not applied yet, or
    /// the connection lost during the call. Tried again later.
    Later,
    /// Failed for a cause that may pass ([`ChoreFailure::Passing`]), a
    /// timeout or not: tried again with backoff, a few times
    /// ([`chore_retry`]).
    Retry { timed_out: bool },
    /// Its client's lock held by one of its requests (an fsync, I/O, a
    /// filterd call): not run, not a failure. Put back and tried again
    /// after [`CHORE_WAIT`], the chores of other clients running
    /// meanwhile, those of its client behind it ([`run_chore_queue`]);
    /// never given up for this (re-review rr43c F3: the one chores thread
    /// waited for the lock, one client's slow request holding up every
    /// client's give-backs and closes). Its client busy for
    /// [`CHORE_BUSY_BOUND`] ([`BusyClients`]), it waits for the lock
    /// (re-review rr43f F1: a client keeping requests in flight hands its
    /// lock from one to the next, and a try almost never lands; the chore
    /// — a close of a gone handle, still holding share modes and locks
    /// against other clients — was put back for as long as the client
    /// stayed busy). The
    /// trade-off: past the bound, the chores thread stalls behind that
    /// client's current request, every client's chores waiting
    /// meanwhile — its filterd calls are bounded, its file I/O is not (a
    /// hung disk stalls them all; re-review rr43g F1).
    Busy,
}

/// Whether a chore computed at reload count `computed` (of
/// [`Shared::reloads`]) may run now: not if a reload has begun since
/// (`now`, its memory replaced, [`ChoreRun::Stale`]), nor while requests
/// would be `NFS4ERR_DELAY` (`ready` false: [`ChoreRun::Later`]).
fn chore_gate(computed: u64, now: u64, ready: bool) -> Option<ChoreRun> {
    if now != computed {
        Some(ChoreRun::Stale)
    } else if !ready {
        Some(ChoreRun::Later)
    } else {
        None
    }
}

/// Runs chore `c`, computed from memory at reload count `computed`, on
/// the chores thread, as a request runs: under `serving` (read), so that
/// no reload replaces the memory meanwhile, and pinned to the connection
/// its gate found ready, so that a call made once that is lost fails
/// instead of landing on a later connection — after a fail-back, on
/// tables another node's nfsshim changed (deleting a record or closing a
/// handle by what this stale memory said). Not run while requests would
/// be `NFS4ERR_DELAY`; dropped once a reload has begun since it was
/// computed (the restore does from the tables what is still to do: a
/// record whose handle is gone is deleted and the open's other handles
/// closed, a lease no delegation answers for given back; a handle no
/// state names is closed only if its client is gone — a live client's is
/// kept for a re-send of its OPEN ([`close_strays`]), which is why an
/// open's closes are queued before its record's delete,
/// [`open_gone_chores`]); tried again after the reattach when its
/// connection was lost and nothing was read again (the memory is still
/// the tables').
///
/// `wait_for_lock`: waits for its client's lock rather than only trying it
/// ([`run_unless_overtaken`]).
fn chore_off_request(sh: &Shared, computed: u64, c: &Chore, wait_for_lock: bool) -> ChoreRun {
    let _serving = sh.serving.read().unwrap_or_else(|p| p.into_inner());
    let _pin = sh.filter.pin();
    let ready = !sh.reload_due.load(Ordering::Acquire)
        && !sh.stepped_down.load(Ordering::Acquire)
        && sh.filter.io_ready();
    match chore_gate(computed, sh.reloads.load(Ordering::Acquire), ready) {
        Some(ChoreRun::Stale) => {
            if let Chore::GiveBack(k) = c {
                give_back_failed(sh, *k);
            }
            return ChoreRun::Stale;
        }
        Some(run) => return run,
        None => {}
    }
    test_hold_while("chore", "a chore passed its gate");
    let client = c.client().and_then(|cid| sh.client(cid).ok().flatten());
    run_unless_overtaken(
        c,
        client.as_deref(),
        &sh.st,
        wait_for_lock,
        || match do_chore(sh, c) {
            ChoreOutcome::Done => ChoreRun::Done,
            ChoreOutcome::Failed(e) => {
                eprintln!("nfsshim: cleaning up after a handle that went away: {e}");
                if closed_anyway(&e) {
                    ChoreRun::Done
                } else {
                    ChoreRun::Failed
                }
            }
            ChoreOutcome::Lost(_) => ChoreRun::Later,
            ChoreOutcome::Passing(e) => {
                eprintln!("nfsshim: cleaning up after a handle that went away: {e}; trying again");
                ChoreRun::Retry {
                    timed_out: matches!(e, ClientError::Timeout(_)),
                }
            }
        },
    )
}

/// Runs chore `c` with `run` ([`chore_off_request`]) under the lock of its
/// client's state `client` (None: released), so that no request takes
/// back what it acts on between the check and the call — unless
/// [`chore_overtaken`] (by `client` and `g`): done then, not run. The lock
/// is only tried, unless `wait_for_lock` (its client busy for
/// [`CHORE_BUSY_BOUND`] already, [`BusyClients`]): held by a request of
/// the client, the chore is [`ChoreRun::Busy`], not run now.
fn run_unless_overtaken(
    c: &Chore,
    client: Option<&Mutex<State>>,
    g: &Mutex<Global>,
    wait_for_lock: bool,
    run: impl FnOnce() -> ChoreRun,
) -> ChoreRun {
    let st = match client {
        None => None,
        Some(m) if wait_for_lock => Some(m.lock().unwrap_or_else(|p| p.into_inner())),
        Some(m) => match m.try_lock() {
            Ok(st) => Some(st),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => return ChoreRun::Busy,
        },
    };
    {
        let g = g.lock().unwrap_or_else(|p| p.into_inner());
        if chore_overtaken(c, st.as_deref(), &g) {
            eprintln!(
                "nfsshim: not cleaning up after a handle that went away: a later request holds \
                 what it acts on, or its client went: {}",
                c.what()
            );
            return ChoreRun::Done;
        }
    }
    run()
}

/// Whether chore `c`, queued when its open went from memory, is no longer
/// to be done once it runs on the chores thread, its client's state being
/// `st` (None: released since) and `g`'s: a later request took back what it
/// acts on, or its client is gone. A re-sent OPEN at a restored slot
/// reuses its slot record's open-state number and create GUID
/// ([`open_recorded`]), and filterd's replay reattaches the open's handle
/// if it was still there, disconnected: the open is back in memory under
/// that number with that handle, its client answered NFS4_OK. Its queued
/// chores then closed the live open's handle, marked its record gone (the
/// next restore dropped an open its client holds) and deleted the record
/// (re-review rr43b F2; [`open`]'s two-step path takes such an open back,
/// re-review rr43c F1: [`taken_back`]). So a close is skipped while a client's open state
/// holds its handle ([`Global::handle_client`]), a mark or a delete while
/// one holds its number or any handle its record names (re-review rr43c
/// F2: a re-send whose first try's commit did not land opens afresh under
/// another number, reattaching the same handle); a mark too once its
/// client is released or being released — written then, it made a record
/// in a scope dropped, which no restore reads (re-review rr43b F4; the
/// release closes the handles of the record left unmarked,
/// [`release_in_filter`]).
fn chore_overtaken(c: &Chore, st: Option<&State>, g: &Global) -> bool {
    let holds = |num: u64| st.is_some_and(|st| st.opens.values().any(|o| o.num == num));
    let held = |keys: &[ResumeKey]| keys.iter().any(|k| g.handle_client.contains_key(k));
    match c {
        Chore::Close(k, _) => g.handle_client.contains_key(k),
        Chore::MarkGone { num, keys, .. } => {
            st.is_none_or(|st| st.client.is_none() || st.releasing) || holds(*num) || held(keys)
        }
        Chore::DeleteState { num, after, .. } => holds(*num) || held(after),
        Chore::GiveBack(_) => false,
    }
}

/// The chores thread: runs each chore of `todo` ([`chore_off_request`])
/// until the shim is dropped.
fn run_chores(sh: &std::sync::Weak<Shared>, todo: &crossbeam_channel::Receiver<(u64, Chore)>) {
    run_chore_queue(
        todo,
        |computed, c, wait_for_lock| {
            let sh = sh.upgrade()?;
            Some(chore_off_request(&sh, computed, c, wait_for_lock))
        },
        |c| {
            if let (Some(sh), Chore::GiveBack(k)) = (sh.upgrade(), c) {
                give_back_failed(&sh, *k);
            }
        },
        std::thread::sleep,
        Instant::now,
    );
}

/// Where the chores thread takes its next chore from ([`run_chore_queue`]).
trait ChoreSource {
    /// The next chore, waiting for one for `wait` at most (for ever if
    /// None): None if none came in time; Err once no more will come.
    fn next_chore(&mut self, wait: Option<Duration>) -> Result<Option<(u64, Chore)>, ()>;
}

impl ChoreSource for &crossbeam_channel::Receiver<(u64, Chore)> {
    fn next_chore(&mut self, wait: Option<Duration>) -> Result<Option<(u64, Chore)>, ()> {
        match wait {
            None => self.recv().map(Some).map_err(|_| ()),
            Some(d) => match self.recv_timeout(d) {
                Ok(c) => Ok(Some(c)),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(()),
            },
        }
    }
}

/// A chore put back in the chores thread's queue, to run once `due`.
#[derive(Debug)]
struct PutBack {
    due: Instant,
    computed: u64,
    chore: Chore,
    /// Times it was put back.
    rounds: u32,
    /// Its failed tries this round so far: put back for its lock
    /// ([`ChoreRun::Busy`]) between two retries, it goes on from there —
    /// a chore whose retries only try the lock, got only by waiting
    /// (re-review rr44c R3), would otherwise be retried for ever.
    tries: u32,
    /// Put back behind its client's lock ([`ChoreRun::Busy`]), or behind
    /// such a chore of its client: no later chore of the client runs
    /// before it ([`behind_busy`]). Only while it waits for the lock:
    /// cleared once it runs or is put back for another cause (re-review
    /// rr43f F3: a delete put back behind its close kept it, and the
    /// client's later chores waited a whole put-back round behind it).
    parked: bool,
}

/// How long each client has been busy for the chores thread: a spell of
/// tries that found its lock held ([`ChoreRun::Busy`], the chore put
/// back). Each such try adds the time since the client's try before, at
/// most [`CHORE_BUSY_GAP`] (the first adds [`CHORE_WAIT`], the put-back
/// wait it stands for), so that only time the thread spent trying the
/// client counts, not the time it spent elsewhere meanwhile (another
/// chore's retries, a slow filterd call, a wait for another client's lock)
/// — re-review rr43g F2: the clock ran from a chore's first Busy in wall
/// time, and after a stall elsewhere every busy client's chore waited for
/// its lock at its second try. The time is capped, not a restart of the
/// spell: with a gap longer than [`CHORE_BUSY_GAP`] starting the spell
/// again, other clients' chores slower than that between two tries (a
/// slow store) kept a busy client from ever reaching the bound, and its
/// close was put back for the whole backlog (re-review rr44b F3). Once a
/// spell has [`CHORE_BUSY_BOUND`] of busy time, the client's next try
/// waits for its lock ([`BusyClients::waits`]): a client is waited for
/// only once found busy at five tries at least. A try that waited marks
/// the spell `blocked`, and the client's next try only tries the lock
/// again — got, the spell ends (the client was not busy any more,
/// re-review rr44b F2: a try that waited kept the spell, and a client
/// idle since went on being waited for, each chore stalling the thread
/// behind whatever request it next ran into); held, it adds its time and
/// the chore is put back for one [`CHORE_WAIT`], other clients' chores
/// running meanwhile, before its next try waits (re-review rr44b F1: each
/// of a busy client's k chores waited at its first try, back to back,
/// every other client's chores waiting for all k). Its later chores pay
/// the bound once, not each (re-review rr43g F3: the clock was per
/// chore) — unless the thread spends more than [`CHORE_BUSY_GAP`]
/// elsewhere between a try that waited and the client's next try (another
/// client's lock wait, a due retry): the blocked spell has ended by then,
/// and the client's next chore pays the bound again (re-review rr44c R1;
/// put back for [`CHORE_BUSY_BOUND`] of tries again, the thread doing
/// others' work meanwhile). A retry of a chore ([`ChoreRun::Retry`]) asks
/// again too: after a try that waited, it only tries (re-review rr44c R3:
/// each retry waited, back to back). A spell ends at a try that gets the
/// lock without waiting, at a [`ChoreRun::Stale`] one (a reload dropped
/// the chores computed before it), or, blocked, when the client has not
/// been tried for [`CHORE_BUSY_GAP`] since. A spell not blocked always has
/// a chore of its client put back for its lock, whose next try carries it
/// on or ends it. A try that did not get as far as the lock
/// ([`ChoreRun::Later`], tried again at once) leaves the spell as it was.
#[derive(Debug, Default)]
struct BusyClients(HashMap<String, BusySpell>);

/// A client's spell of busy tries ([`BusyClients`]).
#[derive(Debug, Clone, Copy)]
struct BusySpell {
    /// The busy time counted so far.
    busy: Duration,
    /// When the client was last tried.
    last: Instant,
    /// The last try waited for the lock: the next one only tries it.
    blocked: bool,
}

impl BusyClients {
    /// Whether a chore of client `cid` (None: no client's lock) is to wait
    /// for its lock, tried at `now`. Drops the blocked spells ended by a
    /// gap.
    fn waits(&mut self, cid: Option<&str>, now: Instant) -> bool {
        self.0
            .retain(|_, b| !b.blocked || now.saturating_duration_since(b.last) <= CHORE_BUSY_GAP);
        cid.and_then(|cid| self.0.get(cid))
            .is_some_and(|b| !b.blocked && b.busy >= CHORE_BUSY_BOUND)
    }

    /// A chore of client `cid` tried at `now`, waiting for its lock or
    /// not (`waited`), came out `r`.
    fn tried(&mut self, cid: Option<&str>, r: ChoreRun, waited: bool, now: Instant) {
        let Some(cid) = cid else {
            return;
        };
        match (r, self.0.get_mut(cid)) {
            // Not as far as the lock, perhaps (its gate shut), and tried
            // again at once: no news.
            (ChoreRun::Later, _) => {}
            (ChoreRun::Busy, Some(b)) => {
                b.busy += now.saturating_duration_since(b.last).min(CHORE_BUSY_GAP);
                b.last = now;
                b.blocked = false;
            }
            (ChoreRun::Busy, None) => {
                self.0.insert(
                    cid.to_owned(),
                    BusySpell {
                        busy: CHORE_WAIT,
                        last: now,
                        blocked: false,
                    },
                );
            }
            (ChoreRun::Stale, _) => {
                self.0.remove(cid);
            }
            (_, Some(b)) if waited => {
                b.last = now;
                b.blocked = true;
            }
            (_, _) => {
                self.0.remove(cid);
            }
        }
    }
}

/// Whether `back[i]` waits behind a chore of its client put back before
/// it for its client's lock ([`PutBack::parked`]): an open's chores run
/// in order (its mark, its closes, its delete: [`open_gone_chores`]).
fn behind_busy(back: &[PutBack], i: usize) -> bool {
    let Some(cid) = back.get(i).and_then(|b| b.chore.client()) else {
        return false;
    };
    back.iter()
        .take(i)
        .any(|b| b.parked && b.chore.client() == Some(cid))
}

/// [`run_chores`]' sequencing: runs each chore of `todo` with `run` (None
/// once the shim is dropped: returns), trying one again as [`ChoreRun`]
/// says, sleeping with `sleep`, the time `now`, telling `given_up` of one
/// it gives up. `run` is told to wait for the chore's client's lock once
/// the client has been [`ChoreRun::Busy`] for [`CHORE_BUSY_BOUND`] of
/// tries ([`BusyClients`]). A close it would give up is put back at the
/// end of the queue instead, to be tried once more after
/// [`chore_put_back`]'s wait, a few times ([`CHORE_ROUNDS`]), the chores
/// behind it running meanwhile, its open's delete held back behind it;
/// given up at last, or failed for good, its delete is not run
/// ([`ChoreSequence`]).
fn run_chore_queue(
    mut todo: impl ChoreSource,
    mut run: impl FnMut(u64, &Chore, bool) -> Option<ChoreRun>,
    mut given_up: impl FnMut(&Chore),
    mut sleep: impl FnMut(Duration),
    mut now: impl FnMut() -> Instant,
) {
    let mut seq = ChoreSequence::default();
    let mut back: Vec<PutBack> = Vec::new();
    let mut busy = BusyClients::default();
    loop {
        let t = now();
        // The first one due of those put back, in the order put back, not
        // one behind its client's lock; where it was, to go back there.
        let pick = (0..back.len()).find(|&i| back[i].due <= t && !behind_busy(&back, i));
        let (at, item) = match pick {
            Some(i) => (i, back.remove(i)),
            None => {
                let wait = (0..back.len())
                    .filter(|&i| !behind_busy(&back, i))
                    .map(|i| back[i].due.saturating_duration_since(t))
                    .min();
                match todo.next_chore(wait) {
                    Ok(Some((computed, chore))) => {
                        let item = PutBack {
                            due: t,
                            computed,
                            chore,
                            rounds: 0,
                            tries: 0,
                            parked: false,
                        };
                        // Behind a chore of its client put back for its
                        // lock (or behind one behind it): in turn.
                        let cid = item.chore.client();
                        if cid.is_some() && back.iter().any(|b| b.parked && b.chore.client() == cid)
                        {
                            back.push(PutBack {
                                parked: true,
                                ..item
                            });
                            continue;
                        }
                        (back.len(), item)
                    }
                    Ok(None) => continue,
                    Err(()) => return,
                }
            }
        };
        let PutBack {
            computed,
            chore: c,
            rounds,
            tries,
            ..
        } = item;
        match seq.admits(&c) {
            ChoreTurn::Run => {}
            ChoreTurn::Drop => continue,
            ChoreTurn::Wait => {
                // Due with the last of its closes put back, behind them.
                let due = back
                    .iter()
                    .filter(|b| matches!(&b.chore, Chore::Close(k, _) if c.waits_for(*k)))
                    .map(|b| b.due)
                    .max()
                    .unwrap_or_else(|| now() + CHORE_WAIT);
                // Not waiting for its client's lock: the client's later
                // chores do not wait behind it (re-review rr43f F3).
                back.push(PutBack {
                    due,
                    computed,
                    chore: c,
                    rounds,
                    tries,
                    parked: false,
                });
                continue;
            }
        }
        // Put back, it has one try each round: a timeout holds the
        // queue up for one call's timeout at most.
        let mut tries = if rounds > 0 {
            tries.max(CHORE_TRIES - 1)
        } else {
            tries
        };
        loop {
            // Asked again at each retry: after a try that waited for the
            // lock, the retry only tries it (re-review rr44c R3: asked
            // once, each retry of a chore that waited waited again, up to
            // [`CHORE_TRIES`] waits back to back, the other clients'
            // chores held behind them all).
            let wait_for_lock = busy.waits(c.client(), now());
            let Some(r) = run(computed, &c, wait_for_lock) else {
                return;
            };
            busy.tried(c.client(), r, wait_for_lock, now());
            let wait = match r {
                ChoreRun::Done => {
                    seq.done(&c);
                    break;
                }
                ChoreRun::Failed => {
                    seq.left_undone(&c);
                    break;
                }
                ChoreRun::Stale => {
                    eprintln!("nfsshim: a chore computed before the tables were read again is left to their restore");
                    seq.left_undone(&c);
                    break;
                }
                ChoreRun::Later => CHORE_WAIT,
                ChoreRun::Busy => {
                    // Back where it was, its client's later chores behind
                    // it; a close's delete held back meanwhile.
                    seq.put_back(&c);
                    let t = now();
                    back.insert(
                        at.min(back.len()),
                        PutBack {
                            due: t + CHORE_WAIT,
                            computed,
                            chore: c,
                            rounds,
                            tries,
                            parked: true,
                        },
                    );
                    break;
                }
                ChoreRun::Retry { timed_out } => {
                    tries += 1;
                    if rounds > 0 && timed_out {
                        tries = tries.max(CHORE_TIMEOUT_TRIES);
                    }
                    if let Some(wait) = chore_retry(tries, timed_out) {
                        wait
                    } else if let (Chore::Close(..), false, Some(wait)) =
                        (&c, timed_out, chore_put_back(rounds + 1))
                    {
                        // Not one whose last try timed out: each try costs
                        // the call timeout, and the chores behind would
                        // wait it out again at every round (re-review
                        // rr42g R3); given up, its open's record stays for
                        // the restore.
                        eprintln!(
                            "nfsshim: cleaning up after a handle that went away: {c:?} still failing; tried again in {wait:?}"
                        );
                        seq.put_back(&c);
                        back.push(PutBack {
                            due: now() + wait,
                            computed,
                            chore: c,
                            rounds: rounds + 1,
                            tries: 0,
                            parked: false,
                        });
                        break;
                    } else {
                        eprintln!(
                            "nfsshim: cleaning up after a handle that went away: {c:?} still failing; given up"
                        );
                        given_up(&c);
                        seq.left_undone(&c);
                        break;
                    }
                }
            };
            sleep(wait);
        }
    }
}

/// How long a close given up by the chores thread waits at the end of
/// its queue before its `round`-th try there (counted from 1): 2 s, 4 s,
/// 8 s; None after [`CHORE_ROUNDS`] (given up for good). Never below
/// [`CHORE_WAIT`]: it never spins.
fn chore_put_back(round: u32) -> Option<Duration> {
    if round > CHORE_ROUNDS {
        return None;
    }
    Some(
        Duration::from_secs(1)
            .saturating_mul(1 << round.min(4))
            .min(Duration::from_secs(30))
            .max(CHORE_WAIT),
    )
}

/// How many times a close the chores thread would give up is put back at
/// the end of its queue ([`chore_put_back`]).
const CHORE_ROUNDS: u32 = 3;

/// How often the chores thread looks whether a chore held back
/// ([`ChoreRun::Later`]) may run.
const CHORE_WAIT: Duration = Duration::from_millis(50);

/// How long a client's lock is found held ([`ChoreRun::Busy`], its chores
/// put back), counted in its tries' time ([`BusyClients`]), before the
/// chores thread waits for the lock instead.
const CHORE_BUSY_BOUND: Duration = Duration::from_secs(1);

/// The most of the time between two tries of a client's lock that
/// counts as its busy time ([`BusyClients`]): longer, the thread was
/// elsewhere, and only this much of it counts. Five of the put-back waits
/// ([`CHORE_WAIT`]), so that the other clients' chores run between two
/// tries count in full unless slower than that; a quarter of
/// [`CHORE_BUSY_BOUND`], so that however long the thread was elsewhere,
/// reaching the bound takes five busy tries at least. Also how long a
/// spell whose last try waited for the lock lasts without another try of
/// the client.
const CHORE_BUSY_GAP: Duration = Duration::from_millis(250);

impl Shared {
    fn global(&self) -> Result<MutexGuard<'_, Global>, Fail> {
        self.st.lock().map_err(|_| internal("state lock poisoned"))
    }

    /// A client's state, by clientid.
    fn client(&self, cid: &str) -> Result<Option<Arc<Mutex<State>>>, Fail> {
        Ok(self.global()?.clients.get(cid).cloned())
    }

    fn num(&self) -> u64 {
        self.next_num.fetch_add(1, Ordering::Relaxed)
    }
}

fn lock_client(c: &Mutex<State>) -> Result<MutexGuard<'_, State>, Fail> {
    c.lock().map_err(|_| internal("client lock poisoned"))
}

/// Attaches to filterd, restores state, listens, serves forever.
pub fn run(
    filter: &Path,
    listen: &str,
    instance: &str,
    lease_ms: u64,
    limits: Limits,
) -> anyhow::Result<()> {
    let protocol = Protocol::new("nfs")?;
    let instance = InstanceName::new(instance)?;
    let tables = state::Tables::new(&instance);
    let attach = Attachment::connect_patiently(
        filter,
        protocol,
        instance,
        FEATURES,
        shimline::cli::filterd_start_wait(),
        &mut shimline::cli::say_waiting_for_filterd(
            "nfsshim",
            filter,
            shimline::cli::filterd_start_wait(),
        ),
    )
    .context("attaching to filterd")?;
    let shared = start(attach, tables, lease_ms, limits.clamped())?;
    let listener = shimline::announce(listen).with_context(|| format!("listening on {listen}"))?;
    {
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("filter-events".into())
            .spawn(move || events(sh))?;
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("lease-reaper".into())
            .spawn(move || reaper(sh))?;
    }
    let cfg = shimline::Listen {
        prefix: "nfs",
        id_field: "xid",
        busy_status: "NFS4ERR_RESOURCE",
        max_connections: limits.max_connections,
        max_connections_per_peer: limits.max_connections_per_peer,
    };
    let gate = shared.clients.clone();
    shimline::accept_forever_gated(listener, cfg, gate, move |conn, stream| {
        serve(shared.clone(), conn, stream)
    });
    Ok(())
}

/// The protocol state over an attachment, restored from filterd.
fn start(
    attach: Attachment,
    tables: state::Tables,
    lease_ms: u64,
    limits: Limits,
) -> anyhow::Result<Arc<Shared>> {
    let (chores, todo) = crossbeam_channel::unbounded::<(u64, Chore)>();
    let shared = Arc::new(Shared {
        chores,
        filter: attach,
        clients: Arc::default(),
        st: Mutex::new(Global::default()),
        next_num: AtomicU64::new(1),
        writers: shimline::Writers::default(),
        lease: Duration::from_millis(lease_ms),
        locked_files: Mutex::new(HashSet::new()),
        limits,
        tables,
        registered: std::sync::atomic::AtomicBool::new(false),
        fds: Descriptors::new(limits.max_descriptors),
        replays: libfilter::client::ReplayCounter::default(),
        excl: Mutex::new(excl::Ages::default()),
        serving: std::sync::RwLock::new(()),
        reload_due: std::sync::atomic::AtomicBool::new(false),
        stepped_down: std::sync::atomic::AtomicBool::new(false),
        process: libfilter::model::new_incarnation(),
        claimed: std::sync::atomic::AtomicBool::new(false),
        reloads: AtomicU64::new(0),
    });
    let registered = shared
        .tables
        .registered(&shared.filter)
        .context("looking this instance up in the registry")?;
    shared.registered.store(registered, Ordering::Release);
    {
        // Only a weak reference: the thread ends once the shim is dropped
        // (the fuzz harness drops it).
        let sh = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("chores".into())
            .spawn(move || run_chores(&sh, &todo))?;
    }
    restore(&shared).context("restoring nfsl/1 state from filterd")?;
    restore_verifier_ages(&shared).context("reading the exclusive-create table")?;
    // Tables with no client yet: claimed with the first client's commit
    // (no commit more at the start of an nfsshim on empty tables).
    let any_client = !shared
        .global()
        .map(|g| g.clients.is_empty())
        .unwrap_or(true);
    if any_client {
        claim_tables(&shared).context("recording this process as the tables' server")?;
    }
    Ok(shared)
}

/// Records this process as the one serving the tables
/// ([`state::ServerRec`]), durably, before it serves.
fn claim_tables(sh: &Shared) -> Result<(), ClientError> {
    let rec = state::ServerRec {
        process: sh.process,
    };
    state::put(&sh.filter, &sh.tables.server(), state::SERVER_OP, &rec)?;
    sh.claimed.store(true, Ordering::Release);
    Ok(())
}

/// Whether another nfsshim process of this instance read (and so may
/// have changed) the tables since this one did ([`state::ServerRec`]):
/// the other node's, while it owned the shared table. None there: no
/// process wrote a client record since the tables were empty (each
/// claims them with its first, in its commit), so nobody changed them.
/// Not learnt (the look failed, or the record does not decode — written
/// by another version): taken as yes — a reload needlessly done costs
/// time, one left out serves stale state.
fn served_elsewhere(sh: &Shared) -> bool {
    match state::get::<Value>(&sh.filter, &sh.tables.server(), state::SERVER_OP) {
        Ok(Some(v)) => served_by_another(v, sh.process),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Whether the tables' [`state::ServerRec`] `rec` names a process other
/// than `process`; one that does not decode counts as another's (it read
/// as nobody's before).
fn served_by_another(rec: Value, process: u64) -> bool {
    serde_json::from_value::<state::ServerRec>(rec).map_or(true, |r| r.process != process)
}

/// Enters the `excl` table's records with their ages ([`excl`]); a record
/// of an nfsshim before ages counts as the oldest.
fn restore_verifier_ages(sh: &Shared) -> Result<(), ClientError> {
    let recs = state::list::<Value>(&sh.filter, &sh.tables.excl())?;
    let mut ages = sh
        .excl
        .lock()
        .map_err(|_| ClientError::Unexpected("excl lock".into()))?;
    for (op, rec) in recs {
        ages.found(op, rec[excl::MADE].as_u64().unwrap_or(0));
    }
    Ok(())
}

/// nfsshim's request handling without its listener, for fuzzing: lines go
/// straight to the handler, as from one connection.
pub struct Harness(Arc<Shared>);

impl Harness {
    /// Attaches to filterd at `filter` as instance `instance`.
    pub fn attach(filter: &Path, instance: &str) -> anyhow::Result<Harness> {
        let instance = InstanceName::new(instance)?;
        let tables = state::Tables::new(&instance);
        let attach = Attachment::connect_patiently(
            filter,
            Protocol::new("nfs")?,
            instance,
            FEATURES,
            shimline::cli::filterd_start_wait(),
            &mut shimline::cli::say_waiting_for_filterd(
                "nfsshim",
                filter,
                shimline::cli::filterd_start_wait(),
            ),
        )?;
        Ok(Harness(start(attach, tables, 90_000, Limits::default())?))
    }

    /// The reply to one request line.
    pub fn handle(&self, line: &[u8]) -> Value {
        match handle_line(&self.0, 1, line, &mut Vec::new()) {
            Answer::Whole(v) => v,
            Answer::Shared(v, xid) => {
                let mut v = Value::clone(&v);
                if let Value::Object(m) = &mut v {
                    m.insert("xid".into(), json!(xid));
                }
                v
            }
        }
    }
}

/// Loads clients, sessions, slot caches and open states, and resumes the
/// opens' handles. Every lease starts afresh: time nfsshim or filterd was
/// down does not count against it.
fn restore(sh: &Shared) -> Result<(), ClientError> {
    let f = &sh.filter;
    let unexpected = |e: ModelError| ClientError::Unexpected(e.to_string());
    let mut g = sh
        .st
        .lock()
        .map_err(|_| ClientError::Unexpected("lock".into()))?;
    let now = Instant::now();
    let mut max = 0;
    let t = &sh.tables;
    // Open states whose delegation went while nfsshim was down: their
    // records are written again without it once the tables are read.
    let mut deleg_gone: Vec<(String, u64, OpenRec)> = Vec::new();
    // Where filterd has each handle now: a RENAME records the move of the
    // handles in its own commit, the open states' records follow in a
    // later one that a crash can lose (and a re-send answered from the
    // slot record never writes). An open state's name is its handle's.
    let paths: HashMap<ResumeKey, String> = f
        .client()
        .handles()?
        .into_iter()
        .map(|h| (h.record.key, h.record.path.as_str().to_owned()))
        .collect();
    for (num, rec) in state::list::<ClientRec>(f, &t.clients())? {
        max = max.max(num);
        g.by_owner.insert(rec.owner.clone(), rec.clientid.clone());
        let cid = rec.clientid.clone();
        let mut st = State::default();
        for (snum, mut o) in state::list::<OpenRec>(f, &t.states(&cid))? {
            max = max.max(snum);
            o.settle();
            if let Some(p) = paths.get(&o.key) {
                o.path.clone_from(p);
            }
            if o.gone {
                // Gone before, its client told NFS4ERR_EXPIRED, its closes
                // or its delete left undone: dropped whole, however its
                // handles resume (re-review rr42g R4: one lost only from
                // the attachment, still disconnected, brought the open
                // back). Kept while a handle of it may be left, for the
                // next restore or its client's release to close.
                eprintln!(
                    "nfsshim: open {} of client {cid} was gone; closing what is left of it",
                    o.other
                );
                if discard(f, &cid, &o, &[]) {
                    let _ = state::delete(f, &t.states(&cid), snum);
                }
                dropped_at_restore(&mut st, &cid, &o);
                continue;
            }
            let client = ClientId::new(cid.clone()).map_err(unexpected)?;
            match resume_patiently(f, client, o.key, &o.other)? {
                Ok(h) => {
                    let mut extra = Vec::new();
                    let mut attached = vec![o.key];
                    let mut gone = None;
                    // Leases the open's handles hold now (a delegation may
                    // have been revoked while nfsshim was down).
                    let mut leases: Vec<_> = h.info.lease.into_iter().collect();
                    for e in &o.extra {
                        let client = ClientId::new(cid.clone()).map_err(unexpected)?;
                        match resume_patiently(f, client, e.key, &o.other)? {
                            Ok(x) => {
                                attached.push(e.key);
                                leases.extend(x.info.lease);
                                let rights = access_of(&e.access).unwrap_or(Rights::READ);
                                // Held whatever the cap: the client was
                                // granted it.
                                extra.push((rights, open_file(x.fd, sh.fds.force())));
                            }
                            // One that only carried a delegation was
                            // closed with its DELEGRETURN, whose record may
                            // not have been written: nothing of the open's
                            // modes is missing.
                            Err(_) if e.for_deleg => {}
                            Err(err) => gone = Some(err),
                        }
                    }
                    o.extra
                        .retain(|e| !e.for_deleg || attached.contains(&e.key));
                    for k in o.locks.iter().filter_map(|l| l.key) {
                        if gone.is_some() {
                            break;
                        }
                        let client = ClientId::new(cid.clone()).map_err(unexpected)?;
                        match resume_patiently(f, client, k, &o.other)? {
                            Ok(_) => attached.push(k),
                            Err(err) => gone = Some(err),
                        }
                    }
                    if let Some(err) = gone {
                        // The open state is one reservation: without one of
                        // its handles (an upgrade's, a lock-owner's) it is
                        // gone as a whole, never kept with less access or
                        // fewer locks than the client was granted.
                        eprintln!(
                            "nfsshim: a handle of open {} of client {cid} is gone ({err}); dropping the open",
                            o.other
                        );
                        discard(f, &cid, &o, &attached);
                        let _ = state::delete(f, &t.states(&cid), snum);
                        dropped_at_restore(&mut st, &cid, &o);
                        continue;
                    }
                    let held = o.deleg.as_ref().is_some_and(|d| {
                        leases
                            .iter()
                            .any(|l| l.key.0 == d.lease_key && still_delegates(d, l.state))
                    });
                    if !held {
                        if let Some(d) = o.deleg.take() {
                            // Revoked (broken without an answer, or a
                            // write delegation's lowered to read) while
                            // nfsshim was down: the client learns it.
                            eprintln!(
                                "nfsshim: delegation {} of client {cid} was revoked while nfsshim was down",
                                d.other
                            );
                            st.expired.add(d.other.clone());
                            // Unless a DELEGRETURN gave it up and its
                            // records did not reach filterd: that request's
                            // re-send is answered NFS4_OK (review N3).
                            if let Some(by) = d.returning {
                                st.closed.insert(d.other.clone(), (cid.clone(), Some(by)));
                            }
                            if !o.closed {
                                deleg_gone.push((cid.clone(), snum, o.clone()));
                            }
                        }
                    }
                    if o.closed && o.deleg.is_none() {
                        // CLOSEd, kept only for the delegation that went:
                        // the state goes too, its handle closed in the
                        // commit that deletes its record, as any revoked
                        // one's ([`retire_revoked`], which tries again
                        // while that fails). Closed here whatever the
                        // close did, a record deleted left a handle nobody
                        // named (re-review rr39a).
                        st.revoked_closed = true;
                    }
                    // Whatever else the open's handles hold, no delegation
                    // answers for: given back, or every later conflicting
                    // change of the file would wait out the break timeout.
                    // Found from filterd's leases, not nfsshim's records, so
                    // a give-back a crash cut off is done here after all.
                    let deleg_key = o.deleg.as_ref().map(|d| d.lease_key);
                    for l in &leases {
                        if Some(l.key.0) != deleg_key && !l.state.is_none() {
                            if let Err(e) = give_back(sh, l.key) {
                                eprintln!("nfsshim: giving back lease {}: {e}", l.key);
                            }
                        }
                    }
                    note_locked(sh, &h.info);
                    g.handle_client.insert(o.key, cid.clone());
                    for e in &o.extra {
                        g.handle_client.insert(e.key, cid.clone());
                    }
                    for l in &o.locks {
                        st.aliases.insert(l.other.clone(), o.other.clone());
                        let key = l.key.unwrap_or(o.key);
                        g.lock_owner.insert(key, l.owner.clone());
                        if let Some(k) = l.key {
                            g.handle_client.insert(k, cid.clone());
                        }
                    }
                    if let Some(d) = &o.deleg {
                        st.aliases.insert(d.other.clone(), o.other.clone());
                    }
                    if let Some((lease, held)) = LeaseHolder::of(&cid, &o) {
                        g.lease_client.insert(lease, held);
                    }
                    st.opens.insert(
                        o.other.clone(),
                        Open {
                            num: snum,
                            clientid: cid.clone(),
                            file: open_file(h.fd, sh.fds.force()),
                            rights: access_of(o.key_access.as_deref().unwrap_or(&o.access))
                                .unwrap_or(Rights::READ),
                            extra,
                            file_key: h.info.file,
                            rec: o,
                        },
                    );
                }
                Err(e) => {
                    eprintln!(
                        "nfsshim: open {} of client {cid} is gone ({e}); dropping it",
                        o.other
                    );
                    // Its other handles (upgrades, lock-owners) go with it:
                    // left disconnected, they would hold its modes for
                    // their whole timeout.
                    discard(f, &cid, &o, &[]);
                    let _ = state::delete(f, &t.states(&cid), snum);
                    dropped_at_restore(&mut st, &cid, &o);
                }
            }
        }
        st.client = Some(Client {
            rec,
            num,
            deadline: now + sh.lease,
            peer: None,
        });
        g.clients.insert(cid, Arc::new(Mutex::new(st)));
    }
    let cids: Vec<String> = g.clients.keys().cloned().collect();
    let mut sessions = Vec::new();
    for cid in &cids {
        for (num, rec) in state::list::<SessionRec>(f, &t.sessions(cid))? {
            sessions.push((num, rec));
        }
    }
    for (num, rec) in sessions {
        max = max.max(num);
        let mut slots: Vec<Slot> = (0..rec.slots)
            .map(|_| Slot {
                seqid: 0,
                reply: None,
                restored: true,
                retried: None,
                digest: None,
                delayed: None,
            })
            .collect();
        for (i, mut s) in state::list::<SlotRec>(f, &t.slots(&rec.sessionid))? {
            s.settle();
            if let Some(slot) = usize::try_from(i).ok().and_then(|i| slots.get_mut(i)) {
                slot.seqid = s.seqid;
                slot.digest = s.digest;
                slot.reply = Some(Arc::new(s.reply));
            }
        }
        let Some(cl) = g.clients.get(&rec.clientid).cloned() else {
            let _ = state::delete(f, &t.sessions(&rec.clientid), num);
            continue;
        };
        g.session_client
            .insert(rec.sessionid.clone(), rec.clientid.clone());
        let guard = cl.lock();
        if let Ok(mut st) = guard {
            st.sessions
                .insert(rec.sessionid.clone(), Session { rec, num, slots });
        }
    }
    // Never below a number handed out before (a reload: [`reload`]).
    sh.next_num.fetch_max(max + 1, Ordering::Relaxed);
    for (cid, num, rec) in deleg_gone {
        let _ = state::put(f, &t.states(&cid), num, &rec);
    }
    // Handles of this instance that no table names: an OPEN whose filter
    // handle committed but whose state record did not (nfsshim or filterd
    // died in between). One of a client that is gone: nobody can reach
    // it; left alone it would hold its modes for its whole timeout. One
    // of a client restored here is kept for the re-send of that OPEN, as
    // an nfsshim that stayed up keeps it, and goes when the client is
    // released (`may_hold_strays`): closed now, the re-send would open the
    // file again — a truncating OPEN truncating a second time, over data
    // written and acknowledged since.
    let known: HashSet<ResumeKey> = g.handle_client.keys().copied().collect();
    let live: HashSet<String> = g.clients.keys().cloned().collect();
    drop(g);
    let kept = std::cell::RefCell::new(HashSet::new());
    close_strays(sh, |h| {
        if known.contains(&h.record.key) {
            return false;
        }
        let cid = h.record.client.as_str();
        if live.contains(cid) {
            kept.borrow_mut().insert(cid.to_owned());
            return false;
        }
        true
    })?;
    let g = sh
        .st
        .lock()
        .map_err(|_| ClientError::Unexpected("lock".into()))?;
    for cid in kept.into_inner() {
        if let Some(mut st) = g.clients.get(&cid).and_then(|cl| cl.lock().ok()) {
            st.may_hold_strays = true;
        }
    }
    Ok(())
}

/// Closes the filter handles of this instance that `stray` picks: ones no
/// open state in memory names, which filterd keeps disconnected — an OPEN
/// that committed but never got into memory (nfsshim died, filterd went
/// away before answering, or the answer's descriptor was cut) and is kept
/// for its re-send. Nobody else can reach them; left alone they would hold
/// their modes for their whole timeout. Best effort.
fn close_strays(
    sh: &Shared,
    stray: impl Fn(&libfilter::proto::HandleView) -> bool,
) -> Result<(), ClientError> {
    let f = &sh.filter;
    let ours = |h: &libfilter::proto::HandleView| {
        h.record.frontend.as_str() == sh.tables.instance() && h.record.protocol.as_str() == "nfs"
    };
    for h in f.client().handles()?.into_iter().filter(ours) {
        if !stray(&h) {
            continue;
        }
        let key = h.record.key;
        eprintln!("nfsshim: closing handle {key} that no open state names");
        if f.resume(h.record.client.clone(), key).is_ok() {
            let _ = f.close(key);
        }
    }
    Ok(())
}

/// Closes every filter handle of a dropped open state `o` of client `cid`
/// at restore: those in `attached` are attached already, the others are
/// resumed first (a disconnected handle is closed by its instance once
/// reattached). Best effort: a handle that is gone is gone.
/// Resumes `key` (a handle of open state `open`) at the start: `Ok(Ok)`
/// resumed, `Ok(Err)` refused for good
/// ([`libfilter::attach::resume_refused_for_good`]: gone, expired, not
/// this client's) or for a cause waiting does not cure (`Internal`: a
/// reopen that failed otherwise), the refusals the open is dropped for.
/// One that may pass — filterd out of descriptors or memory for the
/// reopen (`LimitReached`, the handle kept), interrupted or busy (`Busy`,
/// `Retry`, `FileNotAvailable`), its store full (`DiskFull`), no answer
/// in time, the connection lost on a start — is tried again with
/// backoff for up to [`RESUME_PATIENCE`] ([`resume_refusal`]); on a
/// lost connection this thread pinned (a reload's), it is `Err` at once;
/// still refused then, or a reply
/// whose descriptor did not fit this process's table (the limit is below
/// the opens to hold), is `Err`: the start fails loudly, and the open
/// its client was granted is kept for the next start. (Every refusal
/// dropped the open before: its handles closed, its record deleted, the
/// client's share reservation and locks lost for one filterd short of
/// descriptors while it reopened files after a restart.)
fn resume_patiently(
    f: &Attachment,
    client: ClientId,
    key: ResumeKey,
    open: &str,
) -> Result<Result<OpenedHandle, ClientError>, ClientError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(10);
    // A resume that timed out may have attached the handle after all:
    // until its late answer is undone (detached), a retry is refused
    // "attached, not disconnected" — not a sign the handle is gone.
    let mut timed_out = false;
    loop {
        test_hold_while("resume", "a restore's resume");
        let e = match f.resume(client.clone(), key) {
            Ok(h) => return Ok(Ok(h)),
            Err(e @ ClientError::DescriptorsCut(_)) => return Err(e),
            Err(e) => e,
        };
        match resume_refusal(&e, timed_out, f.pinned_lost()) {
            ResumeRefusal::ForGood => return Ok(Err(e)),
            ResumeRefusal::Lost => {
                eprintln!(
                    "nfsshim: resume of handle {key} of open {open} failed: the connection it is pinned to is lost ({e}); the open is kept"
                );
                return Err(e);
            }
            ResumeRefusal::Passing => {}
        }
        timed_out |= matches!(e, ClientError::Timeout(_));
        if started.elapsed() >= RESUME_PATIENCE {
            eprintln!(
                "nfsshim: resume of handle {key} of open {open} still refused after {RESUME_PATIENCE:?} ({e}); not starting, the open is kept"
            );
            return Err(e);
        }
        eprintln!(
            "nfsshim: resume of handle {key} of open {open} refused for now ({e}); trying again"
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// What [`resume_patiently`] makes of a refused resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResumeRefusal {
    /// The handle is gone, not this client's, or refused for a cause
    /// waiting does not cure: the open is dropped.
    ForGood,
    /// The connection this thread pinned ([`Attachment::pin`]: a reload's
    /// restore, on the events thread) is lost: every retry would go to
    /// it and fail, so the restore fails now, the open kept — the reload
    /// waits for the next reattach ([`reload_or_wait`]).
    Lost,
    /// May pass: tried again with backoff.
    Passing,
}

/// Classifies refusal `e` of a resume, after an earlier try of it
/// `timed_out`, on a thread whose pinned connection is `pinned_lost`
/// ([`Attachment::pinned_lost`]; false on a thread that pinned nothing).
/// Waited for: filterd out of descriptors or memory, busy, or not
/// answering — and, unpinned (a start), a lost connection: the next one
/// the supervisor stores answers. Pinned, a lost connection never comes
/// back: retried, the reload spun for [`RESUME_PATIENCE`] holding
/// `serving` (write) and exclusive I/O — every request blocked, no client
/// let go, recalls and lock hints waiting (re-review rrpin2 A). Any other
/// refusal (an `Internal` reopen error) would not pass by waiting, and
/// failing the start for it kept every client out, restart after
/// restart, until the handle's timeout (re-review rr-map36): taken for
/// good, as before — unless an earlier try timed out and this says the
/// handle is gone: until that try's late answer is undone, a retry is
/// refused so without the handle being gone.
fn resume_refusal(e: &ClientError, timed_out: bool, pinned_lost: bool) -> ResumeRefusal {
    let ambiguous = timed_out && e.code() == Some(ErrorCode::NoSuchHandle);
    let passing = e.code().is_none()
        || matches!(
            e.code(),
            Some(
                ErrorCode::LimitReached
                    | ErrorCode::Busy
                    | ErrorCode::Retry
                    | ErrorCode::FileNotAvailable
                    | ErrorCode::DiskFull
            )
        );
    if (resume_refused_for_good(e) || !passing) && !ambiguous {
        ResumeRefusal::ForGood
    } else if pinned_lost {
        ResumeRefusal::Lost
    } else {
        ResumeRefusal::Passing
    }
}

/// Whether every handle was closed or found gone.
fn discard(f: &Attachment, cid: &str, o: &OpenRec, attached: &[ResumeKey]) -> bool {
    let mut all = true;
    for k in o.keys() {
        let resumed = if attached.contains(&k) {
            Ok(())
        } else {
            ClientId::new(cid.to_owned())
                .map_err(|e| ClientError::Unexpected(e.to_string()))
                .and_then(|c| f.resume(c, k).map(drop))
        };
        all &= gone_is_fine(resumed.and_then(|()| f.close(k))).is_ok();
    }
    all
}

/// Open state `o` of client `cid`, dropped at a restore: a CLOSE of it is
/// answered NFS4_OK, anything else NFS4ERR_EXPIRED, its delegation's
/// stateid with it (revoked, not unknown).
fn dropped_at_restore(st: &mut State, cid: &str, o: &OpenRec) {
    st.closed.insert(o.other.clone(), (cid.to_owned(), None));
    st.expired.add(o.other.clone());
    if let Some(d) = &o.deleg {
        st.expired.add(d.other.clone());
    }
}

fn note_locked(sh: &Shared, info: &libfilter::proto::Opened) {
    if info.locked {
        if let Ok(mut l) = sh.locked_files.lock() {
            l.insert(info.file);
        }
    }
}

fn serve(sh: Arc<Shared>, conn: u64, stream: Arc<TcpStream>) {
    if let (Ok(peer), Ok(mut g)) = (stream.peer_addr(), sh.global()) {
        g.conn_peer.insert(conn, shimline::peer_key(peer.ip()));
    }
    sh.writers
        .serve(conn, stream, "xid", "NFS4ERR_INVAL", |line, w| {
            let mut behind = Vec::new();
            let answer = handle_line(&sh, conn, line, &mut behind);
            if behind.is_empty() {
                return Some(answer);
            }
            // The recalls due on this connection go behind the answer,
            // on the same writer: in this order (re-review rr41g 2).
            if shimline::send(w, &answer) {
                for other in &behind {
                    shimline::send(w, &cb_recall(other));
                }
            }
            None
        });
    // nfsl/1 state belongs to the client, not the connection: nothing to
    // release when it goes; callbacks go to the client's next connection.
    if let Ok(mut g) = sh.global() {
        g.conn_peer.remove(&conn);
    }
}

/// A reply line: a whole `Value`, or a sequenced op's reply shared with
/// its slot (written with `xid` in its sorted place, as `Value` writes a
/// map's keys; `shared_replies_write_as_the_map_would`).
enum Answer {
    Whole(Value),
    Shared(Arc<Value>, u64),
}

impl serde::Serialize for Answer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let (m, xid) = match self {
            Answer::Whole(v) => return v.serialize(s),
            Answer::Shared(v, xid) => match &**v {
                Value::Object(m) => (m, xid),
                v => return v.serialize(s),
            },
        };
        let mut out = s.serialize_map(Some(m.len() + usize::from(!m.contains_key("xid"))))?;
        let mut xid_written = false;
        for (k, v) in m {
            if !xid_written && k.as_str() >= "xid" {
                out.serialize_entry("xid", xid)?;
                xid_written = true;
                if k == "xid" {
                    continue;
                }
            }
            out.serialize_entry(k, v)?;
        }
        if !xid_written {
            out.serialize_entry("xid", xid)?;
        }
        out.end()
    }
}

/// What `sequenced` answers: a fresh map, or the reply its slot keeps.
enum Sequenced {
    Fresh(Map<String, Value>),
    Shared(Arc<Value>),
}

impl From<Map<String, Value>> for Sequenced {
    fn from(m: Map<String, Value>) -> Sequenced {
        Sequenced::Fresh(m)
    }
}

/// `sequenced`'s answer to request `xid`.
fn answer(s: Sequenced, xid: u64) -> Answer {
    match s {
        Sequenced::Fresh(mut m) => {
            m.insert("xid".into(), json!(xid));
            Answer::Whole(Value::Object(m))
        }
        Sequenced::Shared(v) => Answer::Shared(v, xid),
    }
}

/// The answer to request `line` that came on connection `conn`; the
/// delegations whose CB_RECALL goes behind it are added to `behind`
/// ([`sequenced`]).
fn handle_line(sh: &Shared, conn: u64, line: &[u8], behind: &mut Vec<String>) -> Answer {
    let _serving = sh.serving.read().unwrap_or_else(|p| p.into_inner());
    // Every filterd call of this request goes on the connection the check
    // below found ready: lost meanwhile, they fail (`UNREACHABLE`, DELAY)
    // rather than reach the daemon of a later reattach before it is
    // applied — after a fail-back, on this stale memory (re-review rr41e
    // 1). Taken before the check, so that it is the one checked or older.
    let _pin = sh.filter.pin();
    // Not attached with the latest reattach applied — filterd gone, or
    // back and its `Reattached` not handled yet — or the tables to be read
    // again (another node's nfsshim served them meanwhile), or filterd
    // stepped down: what is in memory may be stale, nothing runs on it
    // (review rvnfsnode 1: a re-sent RENAME ran again). Also while filterd
    // is gone (re-review rr41e 1): after a fail-back nothing tells, before
    // the reattach, that another node served these clients — a session
    // made there was answered NFS4ERR_BADSESSION, a slot it advanced
    // NFS4ERR_SEQ_MISORDERED, and the client's recovery lost its replay
    // cache. DELAY leaves the slot where it was; a request that needs no
    // filterd call (a SEQUENCE alone) waits too, costing nothing: leases
    // do not run out while filterd is away ([`reaper`]).
    if sh.reload_due.load(Ordering::Acquire)
        || sh.stepped_down.load(Ordering::Acquire)
        || !sh.filter.io_ready()
    {
        return not_yet(line);
    }
    if let Some((l, op)) = wire::Line::decode(line) {
        // OPEN and CLOSE without the `Value` map (issue #16; `wire`).
        let (name, body) = match op {
            wire::Op::Open => ("OPEN", Body::Open(&l)),
            wire::Op::Close => ("CLOSE", Body::Close(&l)),
        };
        return answer(sequenced(sh, conn, name, body, behind), l.xid);
    }
    let (obj, xid) = match shimline::parse_request(line, "xid", "NFS4ERR_INVAL") {
        Ok(x) => x,
        Err(reply) => return Answer::Whole(reply),
    };
    let obj = &obj;
    let op = obj.get("op").and_then(Value::as_str).unwrap_or("");
    let mut out = match op {
        "EXCHANGE_ID" => finish(exchange_id(sh, conn, obj)),
        "CREATE_SESSION" => finish(create_session(sh, obj)),
        "DESTROY_CLIENTID" => finish(destroy_clientid(sh, obj)),
        "" => finish(Err(inval("op must be a string"))),
        _ => return answer(sequenced(sh, conn, op, Body::Map(obj), behind), xid),
    };
    out.insert("xid".into(), json!(xid));
    Answer::Whole(Value::Object(out))
}

/// `NFS4ERR_DELAY` to request `line` (its `xid` if it has one): nfsshim
/// is catching up with a reattach to filterd.
fn not_yet(line: &[u8]) -> Answer {
    let xid = serde_json::from_slice::<Value>(line)
        .ok()
        .and_then(|v| v.get("xid").cloned())
        .unwrap_or(Value::Null);
    let mut out = finish(Err(Fail(
        "NFS4ERR_DELAY",
        "nfsshim is catching up with filterd; retry".into(),
    )));
    out.insert("xid".into(), xid);
    Answer::Whole(Value::Object(out))
}

fn finish(o: Outcome) -> Map<String, Value> {
    match o {
        Ok(mut m) => {
            m.insert("status".into(), json!("NFS4_OK"));
            m
        }
        Err(Fail(status, error)) => {
            let mut m = Map::new();
            m.insert("status".into(), json!(status.trim_end()));
            if status == "NFS4ERR_DENIED" {
                // `denied` carries the conflicting lock (see `denied`).
                if let Ok(d @ Value::Object(_)) = serde_json::from_str::<Value>(&error) {
                    m.insert("denied".into(), d);
                    m.insert("error".into(), json!("a conflicting lock is held"));
                    return m;
                }
            }
            m.insert("error".into(), json!(clipped(error)));
            m
        }
    }
}

/// Most bytes of an `error` text in a reply.
const MAX_ERROR_BYTES: usize = 256;

/// `error` cut to [`MAX_ERROR_BYTES`] (at a character's boundary, marked
/// with `…`). The text is for people, and a mutating request's reply is
/// kept on its slot — in nfsshim's memory and as a record in filterd:
/// a text quoting the client's input (a 4 KiB path of control
/// characters, six bytes each in JSON) made every slot's record up to
/// 16 KiB, so a peer's clients could fill filterd's store with them
/// (review rv-shims 4).
fn clipped(error: String) -> String {
    libfilter::proto::clipped(error, MAX_ERROR_BYTES)
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value, Fail> {
    shimline::field(obj, name).map_err(inval)
}

fn u64_field(obj: &Map<String, Value>, name: &str) -> Result<u64, Fail> {
    shimline::u64_field(obj, name).map_err(inval)
}

fn str_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, Fail> {
    shimline::str_field(obj, name).map_err(inval)
}

fn path_field(obj: &Map<String, Value>, name: &str) -> Result<RelPath, Fail> {
    path_of(str_field(obj, name)?, name)
}

fn path_of(text: &str, name: &str) -> Result<RelPath, Fail> {
    RelPath::new(text).map_err(|e| inval(format!("{name}: {e}")))
}

/// A request's body: its `Value` map, or an OPEN or CLOSE decoded typed
/// (`wire`).
#[derive(Clone, Copy)]
enum Body<'a> {
    Map(&'a Map<String, Value>),
    Open(&'a wire::Line<'a>),
    Close(&'a wire::Line<'a>),
}

/// An OPEN's fields as its body gives them: the `Value` map's words each
/// field's missing or mistyped value; a typed line (`wire`) has them right.
trait Fields {
    /// A required string.
    fn str(&self, name: &str) -> Result<&str, Fail>;
    /// An optional string (`null` is absent).
    fn opt_str(&self, name: &str) -> Result<Option<&str>, Fail>;
    fn truncate(&self) -> Result<Option<bool>, Fail>;
    /// `create`'s mode and verifier.
    fn create(&self) -> Result<Option<(&str, Option<&str>)>, Fail>;
}

impl Fields for Map<String, Value> {
    fn str(&self, name: &str) -> Result<&str, Fail> {
        str_field(self, name)
    }
    fn opt_str(&self, name: &str) -> Result<Option<&str>, Fail> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => str_field(self, name).map(Some),
        }
    }
    fn truncate(&self) -> Result<Option<bool>, Fail> {
        match self.get("truncate") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| inval("truncate must be a bool")),
        }
    }
    fn create(&self) -> Result<Option<(&str, Option<&str>)>, Fail> {
        match self.get("create") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(c)) => Ok(Some((c.str("mode")?, c.opt_str("verifier")?))),
            Some(_) => Err(inval("create must be an object")),
        }
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// A UUID derived from `text` (FNV-1a, 128 bits): the same request re-sent
/// on the same slot names the same filter open.
fn derived_uuid(text: &str) -> uuid::Uuid {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in text.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013B);
    }
    uuid::Uuid::from_u128(h)
}

use state::fnv64;

/// The longest owner (EXCHANGE_ID's client owner, OPEN's open-owner,
/// LOCK's lock-owner), in bytes. Owners are stored in nfsshim's records,
/// which filterd holds to 16 KiB each; a longer owner is bad input
/// (NFS4ERR_INVAL) refused before anything is asked of filterd (review N4).
const MAX_OWNER_BYTES: usize = 1024;

/// Most hex digits an exclusive create's verifier may have (the spec's
/// `hex`; NFSv4's verifier4 is 16).
const MAX_CREATE_VERIFIER: usize = 64;

/// `owner` (the request's field `name`) if it is at most
/// [`MAX_OWNER_BYTES`] long.
fn bounded_owner(owner: &str, name: &str) -> Result<String, Fail> {
    if owner.len() > MAX_OWNER_BYTES {
        return Err(inval(format!(
            "{name} must be at most {MAX_OWNER_BYTES} bytes"
        )));
    }
    Ok(owner.to_owned())
}

fn exchange_id(sh: &Shared, conn: u64, obj: &Map<String, Value>) -> Outcome {
    let owner = str_field(obj, "owner")?.to_owned();
    let verifier = str_field(obj, "verifier")?.to_ascii_lowercase();
    if owner.is_empty() || owner.len() > MAX_OWNER_BYTES {
        return Err(inval(format!("owner must be 1..{MAX_OWNER_BYTES} bytes")));
    }
    if verifier.len() != 16 || !verifier.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(inval("verifier must be 16 hex digits"));
    }
    let known = {
        let g = sh.global()?;
        g.by_owner
            .get(&owner)
            .and_then(|cid| g.clients.get(cid).map(|c| (cid.clone(), c.clone())))
    };
    if let Some((cid, cl)) = known {
        let mut st = lock_client(&cl)?;
        if st.releasing {
            // A release left half done: finished first (the incarnation
            // is gone whatever the verifier).
            release_client(sh, &mut st, &cid)?;
        }
        if let Some(c) = st.client.as_mut() {
            if c.rec.verifier == verifier {
                c.deadline = Instant::now() + sh.lease;
                let mut m = Map::new();
                m.insert("clientid".into(), json!(cid));
                m.insert("confirmed".into(), json!(true));
                return Ok(m);
            }
        }
        // A rebooted client: its previous incarnation's state goes.
        if st.client.is_some() {
            release_client(sh, &mut st, &cid)?;
        }
    }
    let peer = {
        // A new client record: within --max-clients (so the table never
        // outgrows what filterd keeps of a scope), and within
        // --max-clients-per-peer (so one host's flood fills only its share).
        let mut g = sh.global()?;
        let max = sh.limits.max_clients;
        if g.clients.len() + g.clients_reserved >= max {
            return Err(Fail(
                "NFS4ERR_RESOURCE",
                format!("{max} clients already (--max-clients)"),
            ));
        }
        let peer = g.conn_peer.get(&conn).copied();
        if let Some(ip) = peer {
            let per = sh.limits.max_clients_per_peer;
            let n = g.clients_per_peer.entry(ip).or_default();
            if *n >= per {
                return Err(Fail(
                    "NFS4ERR_RESOURCE",
                    format!("{per} clients from {ip} already (--max-clients-per-peer)"),
                ));
            }
            *n += 1;
        }
        g.clients_reserved += 1;
        peer
    };
    let rec = ClientRec {
        clientid: new_id("c"),
        owner: owner.clone(),
        verifier,
    };
    let num = sh.num();
    // The first client also registers the instance, and claims the
    // tables for this process ([`claim_tables`]), in the same commit.
    let mut p = state::Pending::default();
    let claim = state::ServerRec {
        process: sh.process,
    };
    let written = p
        .put(&sh.tables.clients(), num, &rec)
        .and_then(|()| match sh.registered.load(Ordering::Acquire) {
            true => Ok(()),
            false => sh.tables.register(&mut p),
        })
        .and_then(|()| match sh.claimed.load(Ordering::Acquire) {
            true => Ok(()),
            false => p.put(&sh.tables.server(), state::SERVER_OP, &claim),
        })
        .and_then(|()| p.flush(&sh.filter));
    if written.is_ok() {
        sh.registered.store(true, Ordering::Release);
        sh.claimed.store(true, Ordering::Release);
    }
    {
        let mut g = sh.global()?;
        g.clients_reserved -= 1;
        if written.is_err() {
            unpeer(&mut g, peer);
        }
    }
    written.map_err(filter_fail)?;
    let cid = rec.clientid.clone();
    let st = State {
        client: Some(Client {
            rec,
            num,
            deadline: Instant::now() + sh.lease,
            peer,
        }),
        ..State::default()
    };
    let mut g = sh.global()?;
    g.by_owner.insert(owner, cid.clone());
    g.clients.insert(cid.clone(), Arc::new(Mutex::new(st)));
    let mut m = Map::new();
    m.insert("clientid".into(), json!(cid));
    m.insert("confirmed".into(), json!(false));
    Ok(m)
}

/// A client record created from `peer` is gone.
fn unpeer(g: &mut Global, peer: Option<std::net::IpAddr>) {
    if let Some(ip) = peer {
        if let Some(n) = g.clients_per_peer.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.clients_per_peer.remove(&ip);
            }
        }
    }
}

fn stale(cid: &str) -> Fail {
    Fail("NFS4ERR_STALE_CLIENTID", format!("no client {cid}"))
}

fn create_session(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    let cid = str_field(obj, "clientid")?.to_owned();
    let cl = sh.client(&cid)?.ok_or_else(|| stale(&cid))?;
    let mut st = lock_client(&cl)?;
    if st.releasing {
        release_client(sh, &mut st, &cid)?;
    }
    let Some(c) = st.client.as_mut() else {
        return Err(stale(&cid));
    };
    c.deadline = Instant::now() + sh.lease;
    let max = sh.limits.max_sessions_per_client;
    if st.sessions.len() >= max {
        return Err(Fail(
            "NFS4ERR_RESOURCE",
            format!("client {cid} has {max} sessions (--max-sessions-per-client)"),
        ));
    }
    let rec = SessionRec {
        sessionid: new_id("s"),
        clientid: cid.clone(),
        slots: SLOTS,
    };
    let num = sh.num();
    state::put(&sh.filter, &sh.tables.sessions(&cid), num, &rec).map_err(filter_fail)?;
    let sid = rec.sessionid.clone();
    let slots = (0..SLOTS)
        .map(|_| Slot {
            seqid: 0,
            reply: None,
            restored: false,
            retried: None,
            digest: None,
            delayed: None,
        })
        .collect();
    st.sessions.insert(sid.clone(), Session { rec, num, slots });
    sh.global()?.session_client.insert(sid.clone(), cid);
    let mut m = Map::new();
    m.insert("sessionid".into(), json!(sid));
    m.insert("slots".into(), json!(SLOTS));
    m.insert(
        "lease_ms".into(),
        json!(u64::try_from(sh.lease.as_millis()).unwrap_or(u64::MAX)),
    );
    Ok(m)
}

fn destroy_clientid(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    let cid = str_field(obj, "clientid")?.to_owned();
    let cl = sh.client(&cid)?.ok_or_else(|| stale(&cid))?;
    let mut st = lock_client(&cl)?;
    if st.client.is_none() {
        return Err(stale(&cid));
    }
    release_client(sh, &mut st, &cid)?;
    Ok(Map::new())
}

/// Releases everything of a client incarnation: its opens (their filter
/// handles closed), locks, delegations, sessions and its record. Its
/// clientid is stale from now on and its stateids expired.
///
/// Every step in filterd comes first, and the client leaves memory only
/// once all of them are done: should one fail (filterd away), the client
/// stays, marked `releasing`, its state serving nothing, and the release
/// runs again (each step is idempotent) when the client's next request or
/// the lease reaper comes — the caller answers the failure (DELAY while
/// filterd is away). Before, every error was ignored and the client
/// dropped: its handles stayed in filterd, attached to nfsshim and named
/// by no state, blocking other clients, and DESTROY_CLIENTID was answered
/// NFS4_OK with nothing durable (review N2).
fn release_client(sh: &Shared, st: &mut State, cid: &str) -> Result<(), Fail> {
    st.releasing = true;
    release_in_filter(sh, st, cid).map_err(filter_fail)?;
    let mut gone_others = Vec::new();
    let mut gone_keys = Vec::new();
    let mut gone_leases = Vec::new();
    for (other, o) in st.opens.drain() {
        gone_keys.extend(o.keys());
        gone_others.push(other);
        for l in &o.rec.locks {
            gone_others.push(l.other.clone());
        }
        if let Some(d) = &o.rec.deleg {
            gone_others.push(d.other.clone());
            gone_leases.push(d.lease_key);
        }
    }
    st.aliases.clear();
    let sessions: Vec<String> = st.sessions.drain().map(|(sid, _)| sid).collect();
    let mut peer = None;
    let owner = st.client.take().map(|c| {
        peer = c.peer;
        c.rec.owner
    });
    st.releasing = false;
    if let Ok(mut g) = sh.global() {
        g.clients.remove(cid);
        if let Some(owner) = owner {
            if g.by_owner.get(&owner).is_some_and(|x| x == cid) {
                g.by_owner.remove(&owner);
            }
        }
        for o in gone_others {
            g.expired.add(o);
        }
        for k in gone_keys {
            g.handle_client.remove(&k);
            g.lock_owner.remove(&k);
        }
        for l in gone_leases {
            g.lease_client.remove(&l);
        }
        for sid in sessions {
            g.session_client.remove(&sid);
        }
        unpeer(&mut g, peer);
        g.client_conn.remove(cid);
        g.revoked.remove(cid);
        g.forgotten.remove(cid);
    }
    Ok(())
}

/// A close's result, a handle filterd no longer has counted as closed.
fn gone_is_fine(r: Result<(), ClientError>) -> Result<(), ClientError> {
    match r {
        Err(e) if e.code() != Some(ErrorCode::NoSuchHandle) => Err(e),
        _ => Ok(()),
    }
}

/// Closes with `close` every handle the open-state records `records` of a
/// client being released name but those whose number is in `held` (its
/// opens in memory, closed already): records kept for the restore
/// ([`release_in_filter`]).
fn close_kept_records(
    records: Vec<(u64, OpenRec)>,
    held: &HashSet<u64>,
    mut close: impl FnMut(ResumeKey) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    for (num, mut rec) in records {
        rec.settle();
        if !held.contains(&num) {
            for k in rec.keys() {
                released_anyway(close(k))?;
            }
        }
    }
    Ok(())
}

/// A release's close of a handle only a kept record names: one filterd no
/// longer has, or holds for another (not resumed here, [`close_resuming`]:
/// attached elsewhere, not this client's), is none of this release's —
/// logged; any other failure fails the release, which runs again.
fn released_anyway(r: Result<(), ClientError>) -> Result<(), ClientError> {
    match r {
        Err(e) if e.code() == Some(ErrorCode::NotOwner) => {
            eprintln!(
                "nfsshim: a handle a released client's kept record names is not ours to close: {e}"
            );
            Ok(())
        }
        r => gone_is_fine(r),
    }
}

/// [`release_client`]'s steps in filterd, each done again harmlessly: the
/// open states' handles closed (one already gone is fine), the client's
/// strays, its open-state, session, slot and client records.
fn release_in_filter(f: &impl FilterCalls, st: &State, cid: &str) -> Result<(), ClientError> {
    for o in st.opens.values() {
        for k in o.keys() {
            gone_is_fine(f.close(k))?;
        }
    }
    // An OPEN of this client that filterd made but that never got into
    // memory (its descriptor cut, or filterd gone before it answered) and
    // was never re-sent: kept detached for the re-send, it goes now too
    // (review wD). Every handle of the client's open states is closed
    // above, so whatever of the client filterd still holds is such a one.
    // Only a client with a failed OPEN can have one: the listing (every
    // handle of the instance) is not paid for each client released.
    if st.may_hold_strays {
        f.close_strays_of(cid)?;
    }
    // Records kept for the restore (an open gone whose record's delete was
    // dropped, a close of one of its handles left undone,
    // [`ChoreSequence`]) name handles no open in memory holds: closed now,
    // before their records go with the scope (re-review rr42g R4: dropped
    // with it, such a handle still attached stayed so, held for nobody,
    // until the next restore).
    let held: HashSet<u64> = st.opens.values().map(|o| o.num).collect();
    close_kept_records(f.states(cid)?, &held, |k| close_resuming(f, cid, k))?;
    f.drop_states(cid)?;
    for s in st.sessions.values() {
        f.drop_session(s)?;
    }
    if let Some(c) = &st.client {
        f.delete_client(c.num)?;
    }
    Ok(())
}

/// A session's records in filterd: its own and its slots'.
fn drop_session_records(sh: &Shared, s: &Session) -> Result<(), ClientError> {
    state::delete(&sh.filter, &sh.tables.sessions(&s.rec.clientid), s.num)?;
    sh.filter.client().call(Request::DropScope {
        scope: state::scope(&sh.tables.slots(&s.rec.sessionid))?,
    })?;
    Ok(())
}

/// DESTROY_SESSION: the session's records go first; the session leaves
/// memory only once they are gone (else the failure is the answer).
fn drop_session(sh: &Shared, st: &mut State, sid: &str) -> Result<(), Fail> {
    if let Some(s) = st.sessions.get(sid) {
        drop_session_records(sh, s).map_err(filter_fail)?;
    }
    st.sessions.remove(sid);
    if let Ok(mut g) = sh.global() {
        g.session_client.remove(sid);
    }
    Ok(())
}

/// The slot a request runs on.
struct SeqArgs {
    sessionid: String,
    slot: usize,
    seqid: u64,
}

/// Runs a request that carries `seq` (the exactly-once slot table),
/// `op`, that came on connection `conn`; the
/// delegations whose CB_RECALL is to go behind its answer are added to
/// `behind` ([`due_recalls`]).
fn sequenced(
    sh: &Shared,
    conn: u64,
    op: &str,
    body: Body<'_>,
    behind: &mut Vec<String>,
) -> Sequenced {
    let seq = match body {
        Body::Map(obj) => parse_seq(obj),
        Body::Open(l) | Body::Close(l) => l.seq(),
    };
    let seq = match seq {
        Ok(s) => s,
        Err(f) => return finish(Err(f)).into(),
    };
    let bad_session = || {
        finish(Err(Fail(
            "NFS4ERR_BADSESSION",
            format!("no session {}", seq.sessionid),
        )))
    };
    let cl = match sh.global() {
        Ok(g) => g
            .session_client
            .get(&seq.sessionid)
            .and_then(|cid| g.clients.get(cid).cloned()),
        Err(f) => return finish(Err(f)).into(),
    };
    let Some(cl) = cl else {
        return bad_session().into();
    };
    let mut st = match lock_client(&cl) {
        Ok(st) => st,
        Err(f) => return finish(Err(f)).into(),
    };
    if st.releasing {
        // A release left half done serves nothing: finished now (then the
        // session is gone) or its failure is the answer (DELAY while
        // filterd is away; the slot does not advance).
        let cid = st.client.as_ref().map(|c| c.rec.clientid.clone());
        if let Some(cid) = cid {
            if let Err(f) = release_client(sh, &mut st, &cid) {
                return finish(Err(f)).into();
            }
        }
    }
    let Some(session) = st.sessions.get(&seq.sessionid) else {
        return finish(Err(Fail(
            "NFS4ERR_BADSESSION",
            format!("no session {}", seq.sessionid),
        )))
        .into();
    };
    let Some(slot) = session.slots.get(seq.slot) else {
        return finish(Err(Fail(
            "NFS4ERR_BADSLOT",
            format!(
                "slot {} out of range (0..{})",
                seq.slot,
                session.slots.len()
            ),
        )))
        .into();
    };
    let cid = session.rec.clientid.clone();
    // (Seqid 0 was never used: on a slot restored without a record it is
    // neither a replay nor the next request — review C-3.)
    let replay_of_restored =
        slot.restored && slot.reply.is_none() && seq.seqid == slot.seqid && seq.seqid != 0;
    // The request's digest, known before it runs where it is compared: a
    // restored slot's reply is the cached answer only to a request with
    // the digest recorded with it. Another request at that seqid is not
    // its re-send (the earlier one may have been answered DELAY, its
    // records committed just before nfsshim died): it runs afresh, and
    // what the earlier one did is undone (review F1).
    let restored_other = seq.seqid == slot.seqid
        && slot.restored
        && slot.reply.is_some()
        && slot.digest.is_some_and(|d| d != digest_of(op, body));
    // The cached reply of a replay, returned exactly, without executing.
    let cached = (seq.seqid == slot.seqid && !replay_of_restored && !restored_other)
        .then(|| {
            slot.reply
                .as_ref()
                .filter(|r| r.is_object())
                .map(Arc::clone)
        })
        .flatten();
    let fresh = seq.seqid == slot.seqid.wrapping_add(1)
        || (slot.restored && seq.seqid > slot.seqid)
        || replay_of_restored
        || restored_other;
    if cached.is_none() && !fresh {
        return finish(Err(Fail(
            "NFS4ERR_SEQ_MISORDERED",
            format!("slot {} is at seqid {}", seq.slot, slot.seqid),
        )))
        .into();
    }
    // After a restart, or when this very request was cut off by filterd
    // going away (its changes may have committed), check what filterd
    // already holds before doing anything again.
    let restored = slot.restored || slot.retried == Some(seq.seqid);
    // A replay too has a valid `seq`: it renews the lease and names the
    // client's connection (the spec; re-review rr41c F1 — a client back
    // on a new connection re-sends first the request whose reply it
    // lost, and a recall outstanding has to reach it then).
    if let Some(c) = st.client.as_mut() {
        c.deadline = Instant::now() + sh.lease;
    }
    // A DELEGRETURN's own delegation is not recalled again with its
    // answer (re-review rr41c F3) — unless it fails for good (below). A
    // replay's is: one that returned it finds it gone.
    let returning = match body {
        Body::Map(obj) if op == "DELEGRETURN" && cached.is_none() => obj
            .get("stateid")
            .and_then(|s| s.get("other"))
            .and_then(Value::as_str),
        _ => None,
    };
    let (forgotten, reattaches) = match sh.global() {
        Ok(mut g) => {
            // A new connection (or the first since a restore): a recall
            // sent to none, or to one since dropped, goes again — behind
            // the answer: a replayed OPEN's names the delegation, which a
            // client may not know before (re-review rr41g 2).
            if g.client_conn.insert(cid.clone(), conn) != Some(conn) {
                behind.extend(due_recalls(&mut g, &mut st, &cid, conn, sh.lease, |o| {
                    returning != Some(o)
                }));
            }
            (
                // Left for the next request that runs.
                if cached.is_some() {
                    Vec::new()
                } else {
                    g.forgotten.remove(&cid).unwrap_or_default()
                },
                g.reattaches,
            )
        }
        Err(f) => return finish(Err(f)).into(),
    };
    if let Some(cached) = cached {
        // A replay filterd never sees, so it is told (`filterctl stats`)
        // — later, by the reaper: not under this lock.
        sh.replays.bump();
        return Sequenced::Shared(cached);
    }
    settle_revocations(sh, &mut st, &cid);
    for key in forgotten {
        let chores = forget_handle(sh, &mut st, key);
        do_chores(sh, chores);
    }
    prune_swaps(&mut st, reattaches);
    let ctx = Ctx {
        sh,
        pending: Default::default(),
        undo: Default::default(),
        cid: &cid,
        seq: &seq,
        restored,
        // The op's own digest is set by OPEN, LOCK, REMOVE and RENAME as
        // they read their fields; read here first only where it is compared
        // before the op runs (a restored or delayed slot), not on every
        // request.
        digest: std::cell::Cell::new(if restored {
            digest_of(op, body)
        } else {
            request_digest(op, &[])
        }),
        undo_refused: Default::default(),
        too_large: Default::default(),
        new_state: Default::default(),
    };
    if restored {
        // Whatever the op: an earlier request at this seqid that is not
        // this one's re-send is undone before this one runs (review F2;
        // before, only an OPEN, REMOVE or RENAME looked).
        if let Err(f) = abandon_earlier(&ctx, &mut st) {
            return finish(Err(f)).into();
        }
    }
    let empty = Map::new();
    let obj = match body {
        Body::Map(obj) => obj,
        // Only OPEN and CLOSE come typed; no other op runs on this.
        Body::Open(_) | Body::Close(_) => &empty,
    };
    let (outcome, mutating) = match op {
        "OPEN" => {
            let outcome = open(&ctx, &mut st, body);
            st.may_hold_strays |= outcome.is_err();
            (outcome, true)
        }
        "READ" => (read(&ctx, &mut st, obj), false),
        "WRITE" => (write(&ctx, &mut st, obj), true),
        "COMMIT" => (commit(&ctx, &mut st, obj), false),
        "LOCK" => (lock(&ctx, &mut st, obj), true),
        "LOCKU" => (locku(&ctx, &mut st, obj), true),
        "CLOSE" => (close(&ctx, &mut st, body), true),
        "DELEGRETURN" => (delegreturn(&ctx, &mut st, obj), true),
        "REMOVE" => {
            let r = remove(&ctx, &mut st, obj);
            (r, true)
        }
        "RENAME" => (rename(&ctx, &mut st, obj), true),
        "RECLAIM_COMPLETE" => (Ok(Map::new()), false),
        "DESTROY_SESSION" => {
            return finish(drop_session(sh, &mut st, &seq.sessionid).map(|()| Map::new())).into();
        }
        other => (
            Err(Fail("NFS4ERR_NOTSUPP", format!("unknown op {other:?}"))),
            false,
        ),
    };
    if let Err(Fail(s, _)) = &outcome {
        if s.trim_end() == "NFS4ERR_DELAY" {
            // What the request changed of its open states was not
            // committed, and the client re-sends: the re-send runs from
            // the open states as they were. (After any other error the
            // answer is final and the changes stay, as what filterd did
            // for them — a handle added, ranges locked — stays too.)
            roll_back(&mut st, &ctx);
            // Every DELAY leaves the slot where it was (filterd away, or a
            // recall outstanding): the client re-sends with the same seqid
            // and the request runs again, so a client never has to tell the
            // two apart. If filterd went away mid-request, the re-send
            // first checks what of it filterd already holds.
            if *s == UNREACHABLE {
                mark_retried(&mut st, &ctx);
            }
            return finish(outcome).into();
        }
    }
    if let (Some(other), Err(_)) = (returning, &outcome) {
        // A DELEGRETURN of a recalled delegation failed for good (a stale
        // seqid, say): the recall left out above goes with its answer,
        // unless this connection had it (re-review rr41g 3).
        if let Ok(mut g) = sh.global() {
            behind.extend(due_recalls(&mut g, &mut st, &cid, conn, sh.lease, |o| {
                o == other
            }));
        }
    }
    if ctx.too_large.get() {
        // A record filterd would refuse: the answer (NFS4ERR_RESOURCE) is
        // final, so what the request did is undone and only its slot reply
        // (and deletions) are written.
        if let Err(delay) = undo_refused(sh, &mut st, &ctx) {
            return delay;
        }
        ctx.pending.borrow_mut().forget_puts();
    }
    let already_recorded = matches!(&outcome, Ok(m) if m.contains_key(RECORDED));
    let mut reply = finish(outcome);
    reply.remove(RECORDED);
    let mut pending = ctx.pending.take();
    if mutating && !already_recorded {
        let rec = SlotRec {
            seqid: seq.seqid,
            reply: Value::Object(reply.clone()),
            opened: None,
            state: ctx.new_state.get(),
            digest: Some(ctx.digest.get()),
        };
        let slot_op = u64::try_from(seq.slot).unwrap_or(0);
        if let Err(e) = pending.put(&sh.tables.slots(&seq.sessionid), slot_op, &rec) {
            return finish(Err(internal(e.to_string()))).into();
        }
    }
    // The request's table changes and its slot reply: one commit, before
    // the reply goes out.
    if let Err(e) = pending.flush(&sh.filter) {
        if e.code() == Some(ErrorCode::BadFrame) {
            // filterd refused the records themselves (one too long that
            // `Ctx::put_state` did not see): they can never be stored, so
            // the answer is final, not DELAY on every re-send. What the
            // request did is undone; its answer is kept on the slot in
            // memory only, as NOSPC's below.
            if let Err(delay) = undo_refused(sh, &mut st, &ctx) {
                return delay;
            }
            reply = finish(Err(Fail(
                "NFS4ERR_RESOURCE",
                format!("recording the reply: {e}"),
            )));
        } else if e.code() != Some(ErrorCode::DiskFull) {
            // Not stored: the open states are as before the request, so a
            // re-send applies its change once (filterd's own side of it, a
            // replayed handle or lock, is found again by the re-send).
            roll_back(&mut st, &ctx);
            // Not durable: do not advance; the client re-sends (and the
            // re-send checks what filterd holds: the request's own changes
            // committed).
            mark_retried(&mut st, &ctx);
            return finish(Err(Fail(UNREACHABLE, format!("recording the reply: {e}")))).into();
        }
        // No room to record it: the request's answer is NOSPC, kept on the
        // slot in memory only (a re-send gets it; nothing more is stored).
        // No re-send runs the request again, so its open states keep what
        // filterd holds for them (a handle added, ranges locked or
        // unlocked): putting them back would leave those untracked.
        else {
            reply = finish(Err(Fail(
                "NFS4ERR_NOSPC",
                format!("recording the reply: {e}"),
            )));
        }
    }
    if let Some(slot) = st
        .sessions
        .get_mut(&seq.sessionid)
        .and_then(|s| s.slots.get_mut(seq.slot))
    {
        slot.seqid = seq.seqid;
        // The slot keeps the reply and the connection writes it: one map
        // for both, no copy (issue #16).
        let reply = Arc::new(Value::Object(reply));
        slot.reply = Some(Arc::clone(&reply));
        slot.restored = false;
        slot.retried = None;
        slot.digest = None;
        slot.delayed = None;
        return Sequenced::Shared(reply);
    }
    reply.into()
}

/// What a request did that is undone when its records are refused.
enum Undo {
    /// A filter handle it added: closed.
    Close(ResumeKey),
    /// A lock-owner's ranges it changed from `back` to `now` on handle
    /// `key`: set back.
    Ranges {
        key: ResumeKey,
        owner: String,
        now: Vec<Held>,
        back: Vec<Held>,
    },
    /// An open state it added (by `other`): dropped.
    DropState(String),
}

/// Undoes what a request whose records filterd refuses (or would) did, in
/// filterd and in memory: its answer is final, so nothing it did may stay
/// that no record names. A step that fails while filterd is away makes
/// the request's answer DELAY instead (the slot not advanced), not a final
/// answer saying "not done" while filterd holds it done (review F4); what
/// was not undone is kept with the slot and undone before a different
/// request at its seqid (`abandon_earlier`). A LOCKU, whose undo could
/// meet a range locked by someone else since, is refused before it
/// unlocks anything.
fn undo_refused(sh: &Shared, st: &mut State, ctx: &Ctx<'_>) -> Result<(), Sequenced> {
    let mut steps = ctx.undo_refused.take();
    let undone = undo_steps(sh, st, &mut steps);
    roll_back(st, ctx);
    if let Err(e) = undone {
        ctx.undo_refused.replace(steps);
        mark_retried(st, ctx);
        // Should the re-send succeed instead, a handle not closed here is
        // named by nothing: the client's release looks for it.
        st.may_hold_strays = true;
        return Err(finish(Err(Fail(
            UNREACHABLE,
            format!("undoing a refused request: {e}"),
        )))
        .into());
    }
    Ok(())
}

/// Undoes `steps`, last first, each leaving `steps` once done: on a
/// failure that a retry may mend (filterd away, DELAY) the ones not done
/// stay and the failure is returned. A step that can never succeed — a
/// range unlocked that another client has locked since — is given up
/// (logged): kept, it would answer every request at the seqid with its
/// failure, and the slot would never move on.
fn undo_steps(sh: &Shared, st: &mut State, steps: &mut Vec<Undo>) -> Result<(), ClientError> {
    while let Some(u) = steps.pop() {
        if let Err(e) = undo_one(sh, st, &u) {
            if status_of(&e).trim_end() == "NFS4ERR_DELAY" {
                steps.push(u);
                return Err(e);
            }
            eprintln!("nfsshim: undoing what an abandoned or refused request did: {e}; given up");
            // A handle not closed is named by nothing: the client's
            // release looks for it.
            st.may_hold_strays = true;
        }
    }
    Ok(())
}

fn undo_one(sh: &Shared, st: &mut State, u: &Undo) -> Result<(), ClientError> {
    match u {
        Undo::Close(key) => {
            match sh.filter.close(*key) {
                Err(e) if e.code() != Some(ErrorCode::NoSuchHandle) => return Err(e),
                _ => {}
            }
            if let Ok(mut g) = sh.global() {
                g.handle_client.remove(key);
                g.lock_owner.remove(key);
            }
        }
        Undo::Ranges {
            key,
            owner,
            now,
            back,
        } => apply_ranges(sh, *key, owner, now, back, false)?,
        Undo::DropState(other) => {
            if let Some(o) = st.opens.remove(other) {
                st.aliases.retain(|_, of| of != other);
                if let (Some(d), Ok(mut g)) = (&o.rec.deleg, sh.global()) {
                    g.lease_client.remove(&d.lease_key);
                }
            }
        }
    }
    Ok(())
}

/// Puts back the open states `ctx` saved before changing them.
fn roll_back(st: &mut State, ctx: &Ctx<'_>) {
    for (other, o) in ctx.undo.take().into_iter().rev() {
        st.opens.insert(other, o);
    }
}

/// The request on `ctx`'s slot was cut off by filterd going away: what it
/// did in filterd is kept with the slot, to undo should a different
/// request take its seqid (`abandon_earlier`).
fn mark_retried(st: &mut State, ctx: &Ctx<'_>) {
    let seq = ctx.seq;
    if let Some(slot) = st
        .sessions
        .get_mut(&seq.sessionid)
        .and_then(|s| s.slots.get_mut(seq.slot))
    {
        if slot.retried != Some(seq.seqid) {
            slot.delayed = None;
        }
        slot.retried = Some(seq.seqid);
        let done = ctx.undo_refused.take();
        let digest = ctx.digest.get();
        match &mut slot.delayed {
            // The same request again: what its tries did, together.
            Some((d, undo)) if *d == digest => undo.extend(done),
            // (A different one abandoned the earlier's already.)
            _ => slot.delayed = Some((digest, done)),
        }
    }
}

/// Marks an outcome whose slot reply filterd recorded in the same commit.
const RECORDED: &str = "__recorded";

fn parse_seq(obj: &Map<String, Value>) -> Result<SeqArgs, Fail> {
    let s = field(obj, "seq")?
        .as_object()
        .ok_or_else(|| inval("seq must be an object"))?;
    Ok(SeqArgs {
        sessionid: str_field(s, "sessionid")?.to_owned(),
        slot: usize::try_from(u64_field(s, "slot")?).map_err(|_| inval("slot too large"))?,
        seqid: u64_field(s, "seqid")?,
    })
}

/// What an operation knows of its request.
struct Ctx<'a> {
    sh: &'a Shared,
    /// Table changes, written with the slot reply in one commit.
    pending: std::cell::RefCell<state::Pending>,
    /// The open states as they were before this request changed them in
    /// memory (`Ctx::save`): put back unless the change commits.
    undo: std::cell::RefCell<Vec<(String, Open)>>,
    /// What the request did in filterd (and the open states it added),
    /// undone when its answer is final but its records can never be
    /// stored ([`undo_refused`]).
    undo_refused: std::cell::RefCell<Vec<Undo>>,
    /// A record of this request's was over filterd's limit
    /// ([`Ctx::put_state`]).
    too_large: std::cell::Cell<bool>,
    cid: &'a str,
    seq: &'a SeqArgs,
    /// The slot was restored after a restart: the request may have been
    /// executed before the crash without its reply being recorded.
    restored: bool,
    /// The request's digest ([`request_digest`]): its op, and the
    /// arguments of an OPEN, LOCK, REMOVE or RENAME (set by the op once it
    /// has read them). Recorded with the slot reply, and part of the names
    /// of the filter state an OPEN or LOCK makes ([`Ctx::request_guid`]).
    digest: std::cell::Cell<u64>,
    /// The open state an OPEN added (not an owner's first, whose records
    /// ride on the filter open): named by the slot record, so that a
    /// different request at this seqid, should the answer be lost, finds
    /// it to undo, also after a restart of nfsshim ([`abandon`]).
    new_state: std::cell::Cell<Option<u64>>,
}

/// A digest of a request: its op and `args` (FNV-1a over each, length
/// first). A request at a seqid whose earlier request's answer was lost
/// (DELAY) is that request's re-send only when the digests are the same;
/// otherwise it is a new request (review N1). Only the client's own
/// requests at its own slot and seqid are compared, so a client that makes
/// two of its requests collide only gets the earlier one's answer.
fn request_digest(op: &str, args: &[&str]) -> u64 {
    let mut text =
        String::with_capacity(op.len() + args.iter().map(|a| a.len() + 8).sum::<usize>());
    for part in std::iter::once(op).chain(args.iter().copied()) {
        text.push_str(&part.len().to_string());
        text.push(':');
        text.push_str(part);
    }
    fnv64(&text)
}

impl Ctx<'_> {
    /// Keeps `other`'s open state as it is now, to put back if the
    /// request's commit fails: call before changing it in memory.
    fn save(&self, st: &State, other: &str) {
        let mut undo = self.undo.borrow_mut();
        if undo.iter().any(|(k, _)| k == other) {
            return;
        }
        if let Some(o) = st.opens.get(other) {
            undo.push((other.to_owned(), o.clone()));
        }
    }
    /// Writes an open state's record with the slot reply. A record over
    /// filterd's limit (many lock-owners of long names, say) is
    /// NFS4ERR_RESOURCE, and the request's answer then: what it did is
    /// undone ([`undo_refused`]), as a record filterd refuses can never be
    /// stored (review N4).
    fn put_state(&self, num: u64, rec: &OpenRec) -> Result<(), Fail> {
        let fits = self
            .pending
            .borrow_mut()
            .put_within(&self.sh.tables.states(self.cid), num, rec, MAX_REPLY_BYTES)
            .map_err(filter_fail)?;
        if !fits {
            self.too_large.set(true);
            return Err(too_large_state());
        }
        Ok(())
    }
    /// [`Ctx::put_state`]'s limit checked before the request changes
    /// anything in filterd: a record that would not fit is the answer
    /// with nothing to undo (review F4).
    fn state_fits(&self, rec: &OpenRec) -> Result<(), Fail> {
        if state::encode(rec).map_err(filter_fail)?.len() > MAX_REPLY_BYTES {
            return Err(too_large_state());
        }
        Ok(())
    }
    /// Undoes `u` should the request's records be refused.
    fn on_refusal(&self, u: Undo) {
        self.undo_refused.borrow_mut().push(u);
    }
    /// Deletes an open state's record with the slot reply.
    fn delete_state(&self, num: u64) {
        self.pending
            .borrow_mut()
            .delete(&self.sh.tables.states(self.cid), num);
    }
    fn client_id(&self) -> Result<ClientId, Fail> {
        ClientId::new(self.cid.to_owned()).map_err(|e| internal(e.to_string()))
    }
    /// A name unique to this request (slot and seqid), stable across re-sends.
    fn request_name(&self, what: &str) -> String {
        use std::fmt::Write as _;
        // `{sessionid}/{slot}/{seqid}/{what}` into one allocation (a
        // `format!` of four arguments grew its buffer twice; issue #16).
        let sessionid = &self.seq.sessionid;
        let mut name = String::with_capacity(sessionid.len() + what.len() + 43);
        name.push_str(sessionid);
        // Writing into a String cannot fail.
        let _ = write!(name, "/{}/{}/", self.seq.slot, self.seq.seqid);
        name.push_str(what);
        name
    }
    /// The filter name (create GUID, lease key) of `what` for this request:
    /// unique to its slot, seqid and digest, so the same request re-sent
    /// names the same filter state and a different one at that seqid never
    /// does (review N1).
    fn request_guid(&self, what: &str) -> uuid::Uuid {
        use std::fmt::Write as _;
        let mut name = self.request_name(what);
        // Writing into a String cannot fail.
        let _ = write!(name, "/{:016x}", self.digest.get());
        derived_uuid(&name)
    }
}

fn too_large_state() -> Fail {
    Fail(
        "NFS4ERR_RESOURCE",
        format!(
            "the open state's record would pass filterd's {MAX_REPLY_BYTES} bytes \
             (fewer or shorter lock-owners, or a shorter path, fit)"
        ),
    )
}

fn share_of(deny: &str) -> Result<Rights, Fail> {
    // NFS-like opens always let others delete and rename.
    Ok(match deny {
        "none" => Rights::ALL,
        "read" => Rights::WRITE.union(Rights::DELETE),
        "write" => Rights::READ.union(Rights::DELETE),
        "both" => Rights::DELETE,
        other => {
            return Err(inval(format!(
                "deny must be none, read, write or both, not {other:?}"
            )))
        }
    })
}

fn access_of(access: &str) -> Result<Rights, Fail> {
    Ok(match access {
        "read" => Rights::READ,
        "write" => Rights::WRITE,
        "both" => Rights::READ.union(Rights::WRITE),
        other => {
            return Err(inval(format!(
                "access must be read, write or both, not {other:?}"
            )))
        }
    })
}

fn union_word(a: &str, b: &str, none: &str) -> String {
    let has = |w: &str, x: &str| w == x || w == "both";
    let r = has(a, "read") || has(b, "read");
    let w = has(a, "write") || has(b, "write");
    match (r, w) {
        (true, true) => "both".into(),
        (true, false) => "read".into(),
        (false, true) => "write".into(),
        (false, false) => none.into(),
    }
}

fn stateid_json(other: &str, seqid: u32) -> Value {
    json!({"other": other, "seqid": seqid})
}

/// An OPEN's checked fields.
struct OpenFields {
    owner: String,
    path: RelPath,
    access_w: String,
    deny_w: String,
    access: Rights,
    share: Rights,
    truncate: bool,
    create: Option<(String, Option<String>)>,
    want: String,
    lease_state: Option<LeaseState>,
}

/// Reads and checks an OPEN's fields, in the order the errors name them.
fn open_fields(obj: &(impl Fields + ?Sized)) -> Result<OpenFields, Fail> {
    let owner = bounded_owner(obj.str("owner")?, "owner")?;
    let path = path_of(obj.str("path")?, "path")?;
    let access_w = obj.str("access")?.to_owned();
    let deny_w = obj.opt_str("deny")?.unwrap_or("none").to_owned();
    let access = access_of(&access_w)?;
    let share = share_of(&deny_w)?;
    let truncate = obj.truncate()?.unwrap_or(false);
    // A truncation writes: an OPEN asking for it without write access is
    // refused, as Linux nfsd refuses it (`nfsd4_truncate`: no
    // OPEN4_SHARE_ACCESS_WRITE, NFS4ERR_INVAL). Before, it was granted as
    // a reader and emptied a file under another owner's deny=write
    // reservation and a read delegation not recalled (attack44 F1, F2).
    if truncate && !access.contains(Rights::WRITE) {
        return Err(inval("truncate needs write access (access write or both)"));
    }
    let create = match obj.create()? {
        None => None,
        Some((mode, verifier)) => {
            let verifier = verifier.map(str::to_ascii_lowercase);
            match mode {
                // The verifier is ignored: not checked either (kept for
                // the request's digest, as before).
                "unchecked" | "guarded" => Some((mode.to_owned(), verifier)),
                "exclusive" => {
                    // The spec's create verifier is `hex` (its 16 digits
                    // are EXCHANGE_ID's field's): any non-empty hex string
                    // up to MAX_CREATE_VERIFIER digits. Before rvspec 7
                    // any string was taken ("zz"); after it, only 16
                    // digits (rr38e 3).
                    let Some(v) = verifier else {
                        return Err(inval("exclusive create needs a verifier"));
                    };
                    if v.is_empty()
                        || v.len() > MAX_CREATE_VERIFIER
                        || !v.bytes().all(|b| b.is_ascii_hexdigit())
                    {
                        return Err(inval(format!(
                            "create's verifier must be 1 to {MAX_CREATE_VERIFIER} hex digits"
                        )));
                    }
                    Some((mode.to_owned(), Some(v)))
                }
                other => return Err(inval(format!("unknown create mode {other:?}"))),
            }
        }
    };
    let want = obj.opt_str("want_delegation")?.unwrap_or("none").to_owned();
    // Delegations are filter leases with H: a recall must be answered
    // (DELEGRETURN) before the conflicting open proceeds, which a bare R
    // lease would not require.
    let lease_state = match want.as_str() {
        "none" => None,
        "read" => Some(LeaseState::R.with(LeaseState::H)),
        "write" => Some(LeaseState::R.with(LeaseState::W).with(LeaseState::H)),
        other => {
            return Err(inval(format!(
                "want_delegation must be none, read or write, not {other:?}"
            )))
        }
    };
    Ok(OpenFields {
        owner,
        path,
        access_w,
        deny_w,
        access,
        share,
        truncate,
        create,
        want,
        lease_state,
    })
}

/// An OPEN's [`request_digest`].
fn open_digest(f: &OpenFields) -> u64 {
    let (mode, verifier) = f
        .create
        .as_ref()
        .map_or(("-", ""), |(m, v)| (m.as_str(), v.as_deref().unwrap_or("")));
    request_digest(
        "OPEN",
        &[
            &f.owner,
            f.path.as_str(),
            &f.access_w,
            &f.deny_w,
            if f.truncate { "truncate" } else { "-" },
            mode,
            verifier,
            &f.want,
        ],
    )
}

/// A LOCK's [`request_digest`].
/// A LOCK's fields, read once by [`digest_of`] and by [`lock`] (so the
/// digest a re-send is compared by is the one the LOCK records).
struct LockFields<'a> {
    owner: String,
    write: bool,
    range: LockRange,
    /// The stateid it names.
    stateid: &'a Value,
}

fn lock_fields(obj: &Map<String, Value>) -> Result<LockFields<'_>, Fail> {
    let owner = bounded_owner(str_field(obj, "owner")?, "owner")?;
    let write = match str_field(obj, "type")? {
        "read" => false,
        "write" => true,
        other => return Err(inval(format!("type must be read or write, not {other:?}"))),
    };
    let range = range_of(obj, false)?;
    let stateid = field(obj, "stateid")?;
    Ok(LockFields {
        owner,
        write,
        range,
        stateid,
    })
}

fn lock_digest(f: &LockFields<'_>) -> u64 {
    request_digest(
        "LOCK",
        &[
            f.stateid.get("other").and_then(Value::as_str).unwrap_or(""),
            &f.owner,
            if f.write { "write" } else { "read" },
            &f.range.offset.to_string(),
            &f.range.length.to_string(),
        ],
    )
}

/// The [`request_digest`] a request's op computes once it has read its
/// fields (the same helpers), known before it runs: to tell a request at a
/// restored or delayed seqid from the earlier one's re-send (review F1,
/// F2). A request whose fields do not read gets its op's bare digest (it
/// fails as bad input whatever it is compared with).
fn digest_of(op: &str, body: Body<'_>) -> u64 {
    let bare = || request_digest(op, &[]);
    let of_map = |obj: &Map<String, Value>| -> Option<u64> {
        match op {
            "OPEN" => open_fields(obj).ok().as_ref().map(open_digest),
            "LOCK" => lock_fields(obj).ok().as_ref().map(lock_digest),
            "REMOVE" => Some(request_digest(
                "REMOVE",
                &[path_field(obj, "path").ok()?.as_str()],
            )),
            "RENAME" => Some(request_digest(
                "RENAME",
                &[
                    path_field(obj, "from").ok()?.as_str(),
                    path_field(obj, "to").ok()?.as_str(),
                ],
            )),
            _ => None,
        }
    };
    match body {
        Body::Map(obj) => of_map(obj).unwrap_or_else(bare),
        Body::Open(l) if op == "OPEN" => {
            open_fields(l).ok().as_ref().map_or_else(bare, open_digest)
        }
        Body::Open(_) | Body::Close(_) => bare(),
    }
}

fn open(ctx: &Ctx<'_>, st: &mut State, body: Body<'_>) -> Outcome {
    let sh = ctx.sh;
    let f = match body {
        Body::Map(obj) => open_fields(obj)?,
        Body::Open(l) => open_fields(l)?,
        Body::Close(_) => return Err(internal("OPEN with a CLOSE body")),
    };
    ctx.digest.set(open_digest(&f));
    let OpenFields {
        owner,
        path,
        access_w,
        deny_w,
        access,
        share,
        truncate,
        create,
        want,
        lease_state,
    } = f;
    // An earlier try of this very OPEN that committed its records (its
    // answer lost); one of another request at this seqid is undone here.
    let earlier = earlier_request(
        ctx,
        st,
        &Asked::Open {
            owner: &owner,
            path: &path,
        },
    )?;
    // The filter names of this OPEN's state: an earlier try recorded by an
    // nfsshim before request digests named it without one.
    let legacy = earlier.as_ref().is_some_and(|e| e.legacy);
    let filter_name = |what: &str| {
        if legacy {
            derived_uuid(&ctx.request_name(what))
        } else {
            ctx.request_guid(what)
        }
    };
    let earlier = earlier.map(|e| e.rec);
    let disposition = match (&create, truncate) {
        (None, false) => Disposition::Open,
        (None, true) => Disposition::Overwrite,
        (Some((m, _)), t) if m == "unchecked" => {
            if t {
                Disposition::OverwriteIf
            } else {
                Disposition::OpenIf
            }
        }
        (Some(_), _) => Disposition::Create,
    };
    let excl_verifier = create
        .as_ref()
        .and_then(|(m, v)| (m == "exclusive").then(|| v.clone()).flatten());
    if deny_w != "none" {
        recarry_kept_delegations(ctx, st, &owner, &path)?;
    }
    let guid = filter_name("open");
    let mut lease = lease_state.map(|state| LeaseRequest {
        key: LeaseKey(filter_name("lease")),
        state,
        epoch: 0,
    });
    // Until this OPEN is done, a break of its lease waits for it.
    let opening = lease
        .as_ref()
        .map(|l| Opening::new(sh, l.key))
        .transpose()?;
    // A give-back of this very key is queued (a break of the lease of an
    // earlier try of this OPEN whose answer was lost): this OPEN asks for
    // no delegation, decided before anything is sent, so the records its
    // open commits say what it answers, on a replay after a restart too.
    // Granted one, the queued ack of none would take its lease away behind
    // it and no recall would ever reach the client (re-review rr-deleg).
    let refused = opening.as_ref().filter(|o| o.given_back).map(|o| o.key);
    if refused.is_some() {
        lease = None;
    }
    let mut req = OpenRequest {
        client: ctx.client_id()?,
        path: path.clone(),
        access: Access::new(access).map_err(|e| inval(e.to_string()))?,
        share,
        disposition,
        // nfsshim enforces client leases itself; the handle's own timeout
        // only bounds how long filterd keeps it while no nfsshim is
        // attached (filterd caps it at --durable-timeout-max-ms).
        durability: Durability::Persistent {
            timeout_ms: HANDLE_TIMEOUT_MS,
        },
        create_guid: Some(CreateGuid(guid)),
        owner: Some(owner.clone()),
        lease,
        no_wait: true,
        // A truncating OPEN waits for the frontends to acknowledge its
        // size-change hint (bounded, no client's answer needed: their
        // event threads send it) rather than be DELAY first (review
        // rvspec n2/n7).
        wait_for_hints: true,
        replay_same_lease: false,
        resume_only: false,
        share_group: Some(owner.clone()),
        stat: false,
        share_exempt: false,
        put: Vec::new(),
    };
    let mut excl_claim = None;
    if let Some(v) = &excl_verifier {
        let claim = VerifierClaim::begin(sh, path.as_str())?;
        let made = claim.made();
        excl_claim = Some(claim);
        // The verifier and the file it made: in the open's own commit, so
        // a create that committed is always found by its re-send (apart,
        // the re-send of a create whose verifier record was lost with
        // filterd, its handle dropped at nfsshim's restore, found the file
        // and no verifier: NFS4ERR_EXIST for the client's own create).
        // filterd fills in `opened`, whose `file` the re-send checks, and
        // `kernel_handle`: another file under the reused inode number has
        // the same `file`, not the same handle (reviews C-1, D-5).
        req.put.push(RecordSpec {
            scope: state::scope(&sh.tables.excl()).map_err(filter_fail)?,
            op_id: fnv64(path.as_str()),
            reply: json!({"path": path.as_str(), "verifier": v, excl::MADE: made,
                          "kernel_handle": null, "opened": null})
            .to_string(),
            keep: state::KEEP,
        });
    }
    let slot = descriptor_slot(sh)?;
    // An owner's first open state, neither exclusive nor truncating: the
    // filter open, the open state and the slot reply in one commit. (An
    // owner with open states may be upgrading one of them, known only by
    // the file id the open returns; an exclusive create records its
    // verifier; a truncating persistent open commits in two steps.)
    if excl_verifier.is_none() && !truncate && !st.opens.values().any(|o| o.rec.owner == owner) {
        let words = Words {
            owner,
            access: access_w,
            deny: deny_w,
            want,
        };
        return open_recorded(ctx, st, req, words, access, slot, earlier, refused);
    }
    // At the open limit, an OPEN that cannot upgrade one of this owner's
    // open states (none of them is of a file at this path) needs room
    // before filterd opens anything: checked after, its DELAY came with
    // the file created or truncated, and its re-send, opening afresh,
    // found the client's own guarded create NFS4ERR_EXIST or truncated
    // again (re-review rr39a C).
    // The file at the path is asked once (not each state's path: one
    // filterd call per open state, under the client's lock, re-review
    // rr39d F2); filterd not telling, the check is left to
    // `open_recorded`'s.
    if st.opens.len() >= sh.limits.max_opens_per_client {
        let upgradable = match file_at(ctx, &path) {
            AtName::File(f) => Some(
                st.opens
                    .values()
                    .any(|o| o.rec.owner == owner && !o.rec.closed && o.file_key == f),
            ),
            AtName::Nothing => Some(false),
            AtName::Unknown => None,
        };
        if upgradable == Some(false) {
            room_for_an_open(sh, st)?;
        }
    }
    // An earlier try of this OPEN that committed as an owner's first open
    // (its descriptor cut, or filterd gone before the answer) left an open
    // state record naming the very handle the replay below returns. This
    // OPEN's state takes that record's number (a new state) or the record
    // goes (the open joins one of the owner's states, or fails): kept, a
    // restore would resume the handle for a state the client never heard
    // of, then drop the one it was answered as gone (review wD).
    let earlier = earlier
        .and_then(|r| Some((r.state?, earlier_id(Some(&r.reply))?)))
        .filter(|(_, other)| !st.opens.contains_key(other));
    if let Some((num, _)) = &earlier {
        ctx.delete_state(*num);
    }
    let mut created_by_resend = false;
    if let Some(c) = &mut excl_claim {
        // From here its record may be written (an answer lost with the
        // connection leaves it so).
        c.written = true;
    }
    let first = sh.filter.replay_open(req.clone());
    if let (Err(e), Some(c)) = (&first, &mut excl_claim) {
        // Refused by filterd (the file there, no directory, no room…):
        // nothing of the open committed, its record neither.
        if e.code().is_some() {
            c.written = false;
        }
    }
    let h = match first {
        Ok(h) => h,
        Err(e) if e.code() == Some(ErrorCode::Collision) && excl_verifier.is_some() => {
            // An exclusive create re-sent: the same verifier, stored for
            // this very file (not merely this path), opens the file as if
            // it had created it.
            let excl = state::scope(&sh.tables.excl()).map_err(filter_fail)?;
            let stored = sh
                .filter
                .client()
                .lookup_reply(excl, fnv64(path.as_str()))
                .ok()
                .flatten()
                .and_then(|r| serde_json::from_str::<Value>(&r.reply).ok());
            let Some(stored) = stored.filter(|v| {
                v["path"] == json!(path.as_str())
                    && v["verifier"].as_str() == excl_verifier.as_deref()
            }) else {
                return Err(Fail("NFS4ERR_EXIST", format!("{path} exists")));
            };
            created_by_resend = true;
            req.disposition = Disposition::Open;
            req.create_guid = Some(CreateGuid(filter_name("open-excl")));
            // The record stays as the create wrote it (this open may find
            // another file under the name).
            req.put.clear();
            let h = sh.filter.replay_open(req).map_err(filter_fail)?;
            // Written with the open: `opened.file`; before, apart: `file`.
            let file = stored.get("file").unwrap_or(&stored["opened"]["file"]);
            // And its kernel handle: another file under the reused inode
            // number has the same `file`, not the same handle (review
            // C-1). Filled in with the open (`kernel_handle`); a record of
            // an earlier nfsshim has it as `handle`, written apart once the
            // create was answered; a filesystem without handles has none.
            let stored_handle = Some(&stored["kernel_handle"])
                .filter(|kh| !kh.is_null())
                .or_else(|| stored.get("handle"));
            let other_handle = stored_handle.is_some_and(|kh| {
                libfilter::sys::file_handle_of(std::os::fd::AsFd::as_fd(&h.fd))
                    .ok()
                    .and_then(|mine| serde_json::to_value(mine).ok())
                    .as_ref()
                    != Some(kh)
            });
            if serde_json::to_value(h.info.file).ok().as_ref() != Some(file) || other_handle {
                // Another file now has that name.
                let _ = sh.filter.close(h.info.key);
                return Err(Fail("NFS4ERR_EXIST", format!("{path} exists")));
            }
            // A re-send recognised here, not by filterd: its lookup is
            // not counted for nfsshim (`FEATURE_REPLAY_REPORTS`).
            sh.replays.bump();
            h
        }
        Err(e) => return Err(open_refused(ctx, &path, e)),
    };
    settle_recalls(sh, h.info.file);
    // The claim ends after the record is written again below (a record
    // rewritten after it ended would be one nfsshim does not count:
    // re-review rr-share 3).
    let excl_made = excl_claim.as_ref().map(VerifierClaim::made);
    if let (Some(v), Some(made), false, CreateAction::Created) = (
        &excl_verifier,
        excl_made,
        created_by_resend,
        h.info.create_action,
    ) {
        if !sh.filter.client().fills_open_kernel_handle() {
            remember_created_handle(sh, &path, (v, made), &h);
        }
    }
    drop(excl_claim);
    note_locked(sh, &h.info);
    let created = created_by_resend || h.info.create_action == CreateAction::Created;
    let size = h.info.size;
    give_back_refused(sh, refused, &h.info);
    let mut deleg_granted = h
        .info
        .lease
        .filter(|l| refused.is_none() && l.state.contains(LeaseState::R));
    // The same owner's open of the same file: one open state, upgraded.
    let existing = st
        .opens
        .iter()
        .find(|(_, o)| {
            o.clientid == ctx.cid
                && o.rec.owner == owner
                && o.file_key == h.info.file
                && !o.rec.closed
        })
        .map(|(k, _)| k.clone());
    // A further handle this OPEN added to an existing open state.
    let mut added = None;
    let other = match existing {
        Some(other) => {
            ctx.save(st, &other);
            let Some(o) = st.opens.get_mut(&other) else {
                return Err(internal("open state vanished"));
            };
            if let (Some(_), Some(l)) = (&o.rec.deleg, h.info.lease) {
                // The open holds its delegation already: one per open
                // state. The lease this OPEN was granted besides goes at
                // once, or it would be a lease nobody recalls.
                if l.key.0 != o.rec.deleg.as_ref().map_or(l.key.0, |d| d.lease_key) {
                    let _ = give_back(sh, l.key);
                    deleg_granted = None;
                }
            }
            if !o.keys().contains(&h.info.key) {
                // RFC 8881 §9.7: the owner's OPENs of one file are one share
                // reservation with the union of their modes. The open's own
                // handle holds its locks and stays; a handle that widens the
                // modes joins it (the filter counts them as one reservation,
                // their share group being this owner), one that does not is
                // closed again, unless it carries a delegation just granted.
                let acc = union_word(&o.rec.access, &access_w, "read");
                let den = union_word(&o.rec.deny, &deny_w, "none");
                if acc == o.rec.access && den == o.rec.deny && deleg_granted.is_none() {
                    let _ = sh.filter.close(h.info.key);
                } else {
                    if o.rec.key_access.is_none() {
                        o.rec.key_access = Some(o.rec.access.clone());
                    }
                    o.rec.extra.push(ExtraHandle {
                        key: h.info.key,
                        access: access_w.clone(),
                        // Kept only for the delegation it carries: it goes
                        // with the delegation (DELEGRETURN).
                        for_deleg: acc == o.rec.access && den == o.rec.deny,
                    });
                    o.extra.push((access, open_file(h.fd, slot)));
                    o.rec.access = acc;
                    o.rec.deny = den;
                    added = Some(h.info.key);
                    ctx.on_refusal(Undo::Close(h.info.key));
                }
                o.rec.seqid = o.rec.seqid.wrapping_add(1);
            }
            other
        }
        None => {
            if let Err(f) = room_for_an_open(sh, st) {
                if f.0 == "NFS4ERR_DELAY" {
                    // Kept for the re-send, which filterd answers with
                    // this very handle (its create GUID is the
                    // request's): what this open did (a create, a
                    // truncation) is not done again. Until then no open
                    // state names it.
                    st.may_hold_strays = true;
                } else {
                    let _ = sh.filter.close(h.info.key);
                }
                return Err(f);
            }
            let (other, num) = match earlier {
                Some((num, other)) => (other, num),
                None => (new_id("O"), ctx.sh.num()),
            };
            ctx.on_refusal(Undo::Close(h.info.key));
            ctx.on_refusal(Undo::DropState(other.clone()));
            ctx.new_state.set(Some(num));
            taken_back(st, [&other]);
            st.opens.insert(
                other.clone(),
                Open {
                    rec: OpenRec {
                        other: other.clone(),
                        seqid: 1,
                        owner: owner.clone(),
                        path: path.as_str().to_owned(),
                        key: h.info.key,
                        access: access_w.clone(),
                        deny: deny_w.clone(),
                        locks: Vec::new(),
                        deleg: None,
                        key_access: None,
                        extra: Vec::new(),
                        opened: None,
                        closed: false,
                        group: None,
                        gone: false,
                    },
                    num,
                    clientid: ctx.cid.to_owned(),
                    file: open_file(h.fd, slot),
                    rights: access,
                    extra: Vec::new(),
                    file_key: h.info.file,
                },
            );
            other
        }
    };
    let Some(o) = st.opens.get_mut(&other) else {
        return Err(internal("open state vanished"));
    };
    let mut deleg_json = Value::Null;
    if let Some(l) = deleg_granted {
        let own = o.rec.key;
        let d = o.rec.deleg.get_or_insert_with(|| DelegRec {
            other: new_id("D"),
            lease_key: l.key.0,
            write: l.state.contains(LeaseState::W),
            returning: None,
            // The handle this OPEN opened carries the lease, with this
            // OPEN's deny mode.
            survives_close: deny_w == "none",
            carrier: (h.info.key != own).then_some(h.info.key),
        });
        deleg_json = json!({"stateid": stateid_json(&d.other, 1),
                            "type": if d.write { "write" } else { "read" }});
    }
    let deleg = o.rec.deleg.as_ref().map(|d| (d.other.clone(), d.lease_key));
    let rec = o.rec.clone();
    let num = o.num;
    if let Some((d, _)) = &deleg {
        st.aliases.insert(d.clone(), other.clone());
    }
    {
        // Route filterd's events about this open (and its delegation) here.
        let mut g = ctx.sh.global()?;
        g.handle_client.insert(rec.key, ctx.cid.to_owned());
        if let Some(k) = added {
            g.handle_client.insert(k, ctx.cid.to_owned());
        }
        if let Some((lease, held)) = LeaseHolder::of(ctx.cid, &rec) {
            g.lease_client.insert(lease, held);
        }
    }
    ctx.put_state(num, &rec)?;
    let mut m = Map::new();
    m.insert("stateid".into(), stateid_json(&other, rec.seqid));
    m.insert("created".into(), json!(created));
    m.insert("size".into(), json!(size));
    m.insert("delegation".into(), deleg_json);
    Ok(m)
}

/// Whether client state `st` may have one more open state
/// (`--max-opens-per-client`). At the limit, a state kept only for the
/// delegation of an open the client CLOSEd ([`OpenRec::closed`]) makes
/// room: its delegation is recalled (CB_RECALL, the OPEN answered
/// NFS4ERR_DELAY, as when another client's open recalls one), and revoked
/// when the client has not returned it a lease period later (the OPEN
/// re-sent then finds room). Only a limit held by open opens is
/// NFS4ERR_RESOURCE. Re-review D2: kept delegations counted against the
/// limit with nothing reclaiming them, so a client could fill it with
/// closed opens' delegations and have every OPEN refused.
fn room_for_an_open(sh: &Shared, st: &mut State) -> Result<(), Fail> {
    let max = sh.limits.max_opens_per_client;
    if st.opens.len() < max {
        st.room_recall = None;
        return Ok(());
    }
    let kept = |st: &State, other: &str| {
        st.opens
            .get(other)
            .filter(|o| o.rec.closed)
            .and_then(|o| o.rec.deleg.as_ref())
            .map(|d| (d.other.clone(), d.lease_key))
    };
    let outstanding = st
        .room_recall
        .as_ref()
        .and_then(|r| Some((r.other.clone(), r.at, kept(st, &r.other)?)));
    if let Some((other, at, (_, lease))) = outstanding {
        if at.elapsed() < sh.lease {
            return Err(Fail(
                "NFS4ERR_DELAY",
                format!("recalling delegation of {other} to make room for this open"),
            ));
        }
        // Not returned in time: revoked.
        eprintln!("nfsshim: revoking the delegation of {other}, recalled for room, not returned");
        if let Ok(mut g) = sh.global() {
            g.lease_client.remove(&lease);
        }
        st.room_recall = None;
        revoke(st, lease);
        retire_revoked(sh, st);
        if st.opens.len() < max {
            return Ok(());
        }
        return Err(Fail(
            "NFS4ERR_DELAY",
            format!("closing the handle of {other}'s revoked delegation"),
        ));
    }
    st.room_recall = None;
    let Some((other, deleg)) = st
        .opens
        .keys()
        .find_map(|k| kept(st, k).map(|(d, _)| (k.clone(), d)))
    else {
        return Err(Fail(
            "NFS4ERR_RESOURCE",
            format!("this client has {max} open states (--max-opens-per-client)"),
        ));
    };
    let cid = st.opens.get(&other).map(|o| o.clientid.clone());
    let writer = cid.and_then(|cid| {
        let g = sh.global().ok()?;
        let c = *g.client_conn.get(&cid)?;
        Some((c, sh.writers.get(c)?))
    });
    if let Some((_, w)) = &writer {
        shimline::send(w, &cb_recall(&deleg));
    }
    let now = Instant::now();
    st.room_recall = Some(RoomRecall {
        other: other.clone(),
        first: now,
        at: now,
        reached: Reached::on(writer.map(|(c, _)| c)),
    });
    Err(Fail(
        "NFS4ERR_DELAY",
        format!("recalling delegation of {other} to make room for this open"),
    ))
}

/// Before an OPEN by `owner` that denies something: a handle this client
/// keeps only to carry the delegation of an open it CLOSEd
/// ([`OpenRec::closed`]) on the same file is reopened in `owner`'s share
/// group, holding the same lease key (so the lease is not broken), and
/// the old one closed in the commit that records the new one; the OPEN
/// then does not meet it. A delegation is its client's: its other
/// open-owners' opens must not conflict with it (RFC 8881 §10.4). Re-review
/// D3: the kept handle, in the closed open's owner's group, made the
/// client's own OPEN under another owner NFS4ERR_SHARE_DENIED. A reopen
/// filterd refuses (another open denies it) leaves the handle as it was.
fn recarry_kept_delegations(
    ctx: &Ctx<'_>,
    st: &mut State,
    owner: &str,
    path: &RelPath,
) -> Result<(), Fail> {
    let sh = ctx.sh;
    let kept: Vec<String> = st
        .opens
        .iter()
        .filter(|(_, o)| {
            o.rec.closed
                && o.rec.deleg.is_some()
                && o.rec.group.as_deref().unwrap_or(&o.rec.owner) != owner
        })
        .map(|(k, _)| k.clone())
        .collect();
    for other in kept {
        let Some(o) = st.opens.get(&other) else {
            continue;
        };
        let Some(d) = o.rec.deleg.clone() else {
            continue;
        };
        let now = current_path(sh, o.rec.key, &o.rec.path);
        if now != path.as_str() {
            continue;
        }
        let slot = descriptor_slot(sh)?;
        let state = if d.write {
            LeaseState::R.with(LeaseState::W).with(LeaseState::H)
        } else {
            LeaseState::R.with(LeaseState::H)
        };
        let opened = sh.filter.replay_open(OpenRequest {
            client: ctx.client_id()?,
            path: RelPath::new(now).map_err(|e| internal(e.to_string()))?,
            access: Access::new(access_of(&o.rec.access)?).map_err(|e| internal(e.to_string()))?,
            share: Rights::ALL,
            disposition: Disposition::Open,
            durability: Durability::Persistent {
                timeout_ms: HANDLE_TIMEOUT_MS,
            },
            // This request's own: its re-send finds the same handle.
            create_guid: Some(CreateGuid(ctx.request_guid(&format!("carrier/{other}")))),
            owner: Some(o.rec.owner.clone()),
            lease: Some(LeaseRequest {
                key: LeaseKey(d.lease_key),
                state,
                epoch: 0,
            }),
            no_wait: true,
            wait_for_hints: true,
            replay_same_lease: false,
            resume_only: false,
            share_group: Some(owner.to_owned()),
            stat: false,
            share_exempt: false,
            put: Vec::new(),
        });
        let h = match opened {
            Ok(h) => h,
            Err(e) if e.code().is_some() => {
                eprintln!(
                    "nfsshim: reopening the handle of delegation {}: {e}",
                    d.other
                );
                continue;
            }
            Err(e) => return Err(filter_fail(e)),
        };
        let carries = h.info.file == o.file_key
            && h.info
                .lease
                .is_some_and(|l| l.key.0 == d.lease_key && still_delegates(&d, l.state));
        if !carries {
            let _ = sh.filter.close(h.info.key);
            continue;
        }
        // filterd may have raised the lease back (no break in progress)
        // above what nfsshim acknowledged of it: that own ack no longer
        // bounds the state a recall began from (re-review rr39l), also
        // that of one recorded since filterd answered ([`recalled_from`]).
        test_delay_raise(d.lease_key);
        if let (Some(l), Ok(mut g)) = (h.info.lease, sh.global()) {
            if g.own_acked
                .get(&d.lease_key)
                .is_some_and(|a| !a.contains(l.state))
            {
                g.own_acked.remove(&d.lease_key);
            }
        }
        let (old, num) = (o.rec.key, o.num);
        let mut rec = o.rec.clone();
        rec.key = h.info.key;
        rec.group = Some(owner.to_owned());
        let mut after = o.clone();
        after.rec = rec.clone();
        after.file = open_file(h.fd, slot);
        let put = vec![RecordSpec {
            scope: state::scope(&sh.tables.states(ctx.cid)).map_err(filter_fail)?,
            op_id: num,
            reply: state::encode(&rec).map_err(filter_fail)?,
            keep: state::KEEP,
        }];
        st.swaps.insert(
            old,
            Swap {
                other: other.clone(),
                open: after,
                closed_by: None,
                gone_aliases: Vec::new(),
                reattaches: reattaches_now(sh),
            },
        );
        // The new handle carries the lease (one per key and file) whatever
        // the commit does, and is the one to ask about it before `old` is
        // closed: a recall asked of `old` closed, its holder not yet moved
        // (`apply_swap`), took the delegation for lowered and revoked it
        // (re-review rr39i 3).
        point_holder(sh, d.lease_key, h.info.key);
        let committed = match sh.filter.close_recording(old, put.clone(), Vec::new()) {
            Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {
                sh.filter.client().write_records(put, Vec::new())
            }
            r => r,
        };
        if let Err(e) = committed {
            if e.code().is_some() {
                // Refused: nothing changed but the new handle.
                point_holder(sh, d.lease_key, old);
                st.swaps.remove(&old);
                let _ = sh.filter.close(h.info.key);
            } else {
                // Unknown: the re-send finds the new handle again, and a
                // reattach that finds `old` closed switches to it. Until
                // then `old` may still carry the lease.
                if let Ok(mut g) = sh.global() {
                    if let Some(h) = g.lease_client.get_mut(&d.lease_key) {
                        h.was = Some(old);
                    }
                }
                st.may_hold_strays = true;
            }
            return Err(filter_fail(e));
        }
        test_delay_swap(old);
        if let Some(sw) = st.swaps.remove(&old) {
            apply_swap(sh, st, old, sw);
        }
    }
    Ok(())
}

/// Tests only (debug builds): `$NFSSHIM_TEST_SWAP_DELAY_MS` holds a kept
/// delegation's move to a new handle between the commit that closed the
/// old one and the state's switch to the new one
/// (`nfs_reservation.rs::a_recall_asked_while_a_kept_delegation_moves_handle_keeps_it`).
fn test_delay_swap(old: ResumeKey) {
    static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    test_delay(
        test_delay_ms(&DELAY, "NFSSHIM_TEST_SWAP_DELAY_MS"),
        format_args!("the move from handle {old}"),
    );
}

/// Tests only (debug builds): `$NFSSHIM_TEST_RAISE_DELAY_MS` holds a kept
/// delegation's reopen in another share group between filterd's answer
/// (the lease raised again) and the own-acknowledgement mark's removal
/// (`nfs_reservation.rs::a_recall_recorded_while_a_raised_lease_is_unmarked_is_lowered`).
fn test_delay_raise(lease: uuid::Uuid) {
    static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    test_delay(
        test_delay_ms(&DELAY, "NFSSHIM_TEST_RAISE_DELAY_MS"),
        format_args!("the raise of lease {lease}"),
    );
}

/// Tests only (debug builds): with `$NFSSHIM_TEST_HOLD` set to a path,
/// waits (60 s at most) while that path with `.` and `suffix` appended
/// exists, first logging that `what` waits (tests wait for the line).
fn test_hold_while(suffix: &str, what: &str) {
    if !cfg!(debug_assertions) {
        return;
    }
    let Some(mut hold) = std::env::var_os("NFSSHIM_TEST_HOLD") else {
        return;
    };
    hold.push(".");
    hold.push(suffix);
    let hold = std::path::PathBuf::from(hold);
    if !hold.exists() {
        return;
    }
    eprintln!("nfsshim: test hook: {what} waits");
    let until = Instant::now() + Duration::from_secs(60);
    while hold.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("nfsshim: test hook: {what} goes on");
}

/// Tests only (debug builds): with `$NFSSHIM_TEST_HOLD` set, logs `what`.
fn test_note(what: &str) {
    if cfg!(debug_assertions) && std::env::var_os("NFSSHIM_TEST_HOLD").is_some() {
        eprintln!("nfsshim: test hook: {what}");
    }
}

/// Tests only (debug builds): the milliseconds environment variable
/// `var` names, read once into `cell`; 0 in release builds.
fn test_delay_ms(cell: &std::sync::OnceLock<u64>, var: &str) -> u64 {
    if !cfg!(debug_assertions) {
        return 0;
    }
    *cell.get_or_init(|| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// Tests only: sleeps `ms` milliseconds, first logging that `what` waits
/// (tests wait for the line).
fn test_delay(ms: u64, what: std::fmt::Arguments) {
    if ms > 0 {
        eprintln!("nfsshim: test hook: {what} waits {ms} ms");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// The handle to ask about delegation lease `lease` becomes `handle`.
fn point_holder(sh: &Shared, lease: uuid::Uuid, handle: ResumeKey) {
    if let Ok(mut g) = sh.global() {
        if let Some(h) = g.lease_client.get_mut(&lease) {
            h.handle = handle;
            h.was = None;
        }
    }
}

/// An OPEN's modes as the client gave them.
struct Words {
    owner: String,
    access: String,
    deny: String,
    want: String,
}

/// An owner's first OPEN (no upgrade possible): the open state's record
/// and the slot reply ride on the filter open (`OpenRequest::put`), marked
/// for filterd to complete with its answer, so they commit with the handle
/// — one commit per OPEN. A restore derives the resume key, `created`,
/// `size` and the delegation from that answer (`OpenRec::settle`,
/// `SlotRec::settle`). `refused`: the OPEN asks for no delegation
/// ([`Opening::given_back`]).
#[allow(clippy::too_many_arguments)]
fn open_recorded(
    ctx: &Ctx<'_>,
    st: &mut State,
    mut req: OpenRequest,
    w: Words,
    access: Rights,
    slot: DescriptorSlot,
    earlier: Option<SlotRec>,
    refused: Option<LeaseKey>,
) -> Outcome {
    let sh = ctx.sh;
    let (path, lease) = (req.path.clone(), req.lease);
    if let Some(reply) = earlier_open_gone(ctx, st, earlier.as_ref())? {
        return Ok(reply);
    }
    room_for_an_open(sh, st)?;
    let slots = sh.tables.slots(&ctx.seq.sessionid);
    let slot_op = u64::try_from(ctx.seq.slot).unwrap_or(0);
    // A re-send after filterd went away mid-OPEN: if the OPEN committed,
    // its records name the open state; write the same ones again.
    let (other, num, deleg_other) = match &earlier {
        Some(r) if r.state.is_some() => (
            earlier_id(Some(&r.reply)).unwrap_or_else(|| new_id("O")),
            r.state.unwrap_or_else(|| sh.num()),
            earlier_id(r.reply.get("delegation")).unwrap_or_else(|| new_id("D")),
        ),
        _ => (new_id("O"), sh.num(), new_id("D")),
    };
    let deleg = lease.map(|l| DelegRec {
        other: deleg_other.clone(),
        lease_key: l.key.0,
        write: w.want == "write",
        returning: None,
        survives_close: w.deny == "none",
        carrier: None,
    });
    let rec = OpenRec {
        other: other.clone(),
        seqid: 1,
        owner: w.owner.clone(),
        path: path.as_str().to_owned(),
        key: ResumeKey(uuid::Uuid::nil()),
        access: w.access.clone(),
        deny: w.deny.clone(),
        locks: Vec::new(),
        deleg,
        key_access: None,
        extra: Vec::new(),
        opened: None,
        closed: false,
        group: None,
        gone: false,
    };
    let deleg_json = |write: bool| {
        json!({"stateid": stateid_json(&deleg_other, 1),
               "type": if write { "write" } else { "read" }})
    };
    let mut reply = Map::new();
    reply.insert("stateid".into(), stateid_json(&other, 1));
    reply.insert("created".into(), json!(false));
    reply.insert("size".into(), json!(0));
    reply.insert(
        "delegation".into(),
        if lease.is_some() {
            deleg_json(w.want == "write")
        } else {
            Value::Null
        },
    );
    let slot_rec = SlotRec {
        seqid: ctx.seq.seqid,
        reply: Value::Object(finish(Ok(reply))),
        opened: None,
        state: Some(num),
        digest: Some(ctx.digest.get()),
    };
    let put = vec![
        RecordSpec {
            scope: state::scope(&sh.tables.states(ctx.cid)).map_err(filter_fail)?,
            op_id: num,
            reply: state::encode_for_open(&rec).map_err(filter_fail)?,
            keep: state::KEEP,
        },
        RecordSpec {
            scope: state::scope(&slots).map_err(filter_fail)?,
            op_id: slot_op,
            reply: state::encode_for_open(&slot_rec).map_err(filter_fail)?,
            keep: state::KEEP,
        },
    ];
    // filterd refuses a record that could pass its limit once filled
    // (BadFrame): the record is the server's, not bad input, so the client
    // hears NFS4ERR_RESOURCE, and nothing is opened or stored.
    let most = put
        .iter()
        .map(|r| r.reply.len().saturating_sub("null".len()) + MAX_OPENED_JSON_BYTES)
        .max()
        .unwrap_or(0);
    if most > MAX_REPLY_BYTES {
        return Err(Fail(
            "NFS4ERR_RESOURCE",
            format!(
                "this open's state would take a record of up to {most} bytes, over \
                 filterd's {MAX_REPLY_BYTES} (a shorter owner or path fits)"
            ),
        ));
    }
    req.put = put;
    let h = sh
        .filter
        .replay_open(req)
        .map_err(|e| open_refused(ctx, &path, e))?;
    settle_recalls(sh, h.info.file);
    note_locked(sh, &h.info);
    give_back_refused(sh, refused, &h.info);
    // Memory as a restore would derive it from the records just committed.
    let mut rec = rec;
    rec.opened = Some(h.info.clone());
    rec.settle();
    let mut slot_rec = slot_rec;
    slot_rec.opened = Some(h.info.clone());
    slot_rec.settle();
    let key = rec.key;
    let deleg = rec.deleg.as_ref().map(|d| (d.other.clone(), d.lease_key));
    let held = LeaseHolder::of(ctx.cid, &rec);
    st.opens.insert(
        other.clone(),
        Open {
            rec,
            num,
            clientid: ctx.cid.to_owned(),
            file: open_file(h.fd, slot),
            rights: access,
            extra: Vec::new(),
            file_key: h.info.file,
        },
    );
    if let Some((d, _)) = &deleg {
        st.aliases.insert(d.clone(), other.clone());
    }
    taken_back(st, [&other, &deleg_other]);
    {
        // Route filterd's events about this open (and its delegation) here.
        let mut g = sh.global()?;
        g.handle_client.insert(key, ctx.cid.to_owned());
        if let Some((lease, held)) = held {
            g.lease_client.insert(lease, held);
        }
    }
    let Value::Object(mut m) = slot_rec.reply else {
        return Err(internal("slot reply is not an object"));
    };
    m.insert(RECORDED.into(), json!(true));
    Ok(m)
}

/// An open state put in memory under stateids `others` an earlier try of
/// its OPEN recorded ([`open_recorded`], and [`open`]'s path that commits
/// in two steps): if its open went from memory since (its record not
/// marked gone yet, [`earlier_open_gone`]; or, on the two-step path, its
/// handle's resume refused past its patience after a flush that failed
/// unreachable, the new open left in memory), the open is taken back and
/// its stateids are the client's again, not expired nor closed
/// (re-review rr43c F1: on the two-step path they stayed expired, every
/// use of the stateid the client was just granted answered
/// NFS4ERR_EXPIRED).
fn taken_back<'a>(st: &mut State, others: impl IntoIterator<Item = &'a String>) {
    for o in others {
        st.expired.remove(o);
        st.closed.remove(o);
    }
}

/// A re-sent OPEN's answer when the open state its earlier try made
/// (`earlier`) went from memory since and its record is marked gone
/// ([`OpenRec::gone`]): its handle lost (only from the attachment, say:
/// its resume refused past its patience, [`forget_open_of`]), the mark
/// written before its closes and its record's delete. The re-send is
/// answered as its earlier try was (the slot's recorded reply: RFC 8881
/// 2.10.6.1, a retry gets the reply cached for its slot and seqid), and
/// the state it names stays lost — its stateids answer NFS4ERR_EXPIRED, as
/// any state the server lost — rather than taken back: filterd's replay
/// would reattach a handle still disconnected under the same create GUID
/// and apply none of the open's records, so the record stayed marked gone
/// and the next restore dropped an open its client holds (re-review
/// rr43b F2). A record not marked yet is taken back (the open back in
/// memory, its queued chores skip what it holds: [`chore_overtaken`]), as
/// is one deleted already (opened afresh under the same number). Only
/// [`open_recorded`] calls it, and no request was found to get there with
/// such an open — a restored slot answers its re-send from the cached
/// reply before any op runs, and such an OPEN that runs again with its
/// slot record (answered DELAY, filterd away mid-request) made an open
/// that never was in memory — so it has no test that reaches it.
/// [`open`]'s two-step path does take such an open back (re-review rr43c
/// F1, [`taken_back`]).
fn earlier_open_gone(
    ctx: &Ctx<'_>,
    st: &State,
    earlier: Option<&SlotRec>,
) -> Result<Option<Map<String, Value>>, Fail> {
    let Some((r, num)) = earlier.and_then(|r| Some((r, r.state?))) else {
        return Ok(None);
    };
    // Only an open remembered as gone (the read is not paid for every
    // re-send of an OPEN answered DELAY, whose open never was in memory).
    if !earlier_id(Some(&r.reply)).is_some_and(|o| {
        !st.opens.contains_key(&o) && (st.expired.contains(&o) || st.closed.contains(&o))
    }) {
        return Ok(None);
    }
    let rec: Option<OpenRec> =
        state::get(&ctx.sh.filter, &ctx.sh.tables.states(ctx.cid), num).map_err(filter_fail)?;
    if !rec.is_some_and(|o| o.gone) {
        return Ok(None);
    }
    let mut r = r.clone();
    r.settle();
    let Value::Object(mut m) = r.reply else {
        return Err(internal("slot reply is not an object"));
    };
    m.insert(RECORDED.into(), json!(true));
    Ok(Some(m))
}

/// What a request that may be an earlier one's re-send asks: compared
/// with the earlier one's slot record when that record has no digest (an
/// nfsshim before [`request_digest`] wrote it).
enum Asked<'a> {
    Open {
        owner: &'a str,
        path: &'a RelPath,
    },
    /// A REMOVE or a RENAME.
    Namespace,
}

/// The slot record of an earlier try of this very request.
struct Earlier {
    rec: SlotRec,
    /// Written by an nfsshim before request digests, which named the
    /// request's filter state without one ([`Ctx::request_name`]).
    legacy: bool,
}

/// The slot record of this very request (same slot, same seqid, same
/// digest) if an earlier try of it committed one — filterd went away
/// mid-request, or the open's descriptor was cut from filterd's answer
/// (its handle detached, its records kept) — and the request runs again
/// (`Ctx::restored`).
///
/// A record at this seqid of a *different* request (the client got DELAY
/// for it, so the slot did not advance, and sent something else at that
/// seqid, as the slot rules let it) is not this request's: what that
/// request left in filterd is undone ([`abandon`]) and this one runs
/// afresh (review N1). A record without a digest is this request's when
/// it is of the same kind: an OPEN's by the same owner of the same path,
/// a REMOVE's or RENAME's plain `NFS4_OK` (which does not say the path).
fn earlier_request(
    ctx: &Ctx<'_>,
    st: &mut State,
    asked: &Asked<'_>,
) -> Result<Option<Earlier>, Fail> {
    if !ctx.restored {
        return Ok(None);
    }
    let Some(rec) = recorded_at_seqid(ctx)? else {
        return Ok(None);
    };
    let same = match rec.digest {
        Some(d) => d == ctx.digest.get(),
        // (One with another digest was abandoned before the request ran:
        // `abandon_earlier`.)
        None => legacy_same(ctx, &rec, asked)?,
    };
    if same {
        let legacy = rec.digest.is_none();
        return Ok(Some(Earlier { rec, legacy }));
    }
    if rec.digest.is_none() {
        abandon(ctx, st, &rec)?;
    }
    Ok(None)
}

/// Before a request runs at a seqid whose earlier request's answer may
/// have been lost (a restored slot, or one answered DELAY): if that earlier
/// request is a different one (another digest), what it left is undone
/// now, whatever op takes its seqid (review F2) — the steps a request
/// answered DELAY kept with the slot (a LOCK's ranges, a handle it added),
/// and an OPEN that committed its records ([`abandon`]). A failure is the
/// request's answer (DELAY while filterd is away; the steps not done stay).
fn abandon_earlier(ctx: &Ctx<'_>, st: &mut State) -> Result<(), Fail> {
    let (seq, digest) = (ctx.seq, ctx.digest.get());
    fn slot<'s>(st: &'s mut State, seq: &SeqArgs) -> Option<&'s mut Slot> {
        st.sessions
            .get_mut(&seq.sessionid)
            .and_then(|s| s.slots.get_mut(seq.slot))
    }
    let delayed = slot(st, seq)
        .filter(|slot| slot.retried == Some(seq.seqid))
        .and_then(|slot| {
            if slot.delayed.as_ref().is_some_and(|(d, _)| *d != digest) {
                slot.delayed.take()
            } else {
                None
            }
        });
    if let Some((d, mut steps)) = delayed {
        if let Err(e) = undo_steps(ctx.sh, st, &mut steps) {
            if let Some(slot) = slot(st, seq) {
                slot.delayed = Some((d, steps));
            }
            return Err(filter_fail(e));
        }
    }
    let rec = recorded_at_seqid(ctx)?.filter(|r| r.digest.is_some_and(|d| d != digest));
    match rec {
        Some(rec) => abandon(ctx, st, &rec),
        None => Ok(()),
    }
}

/// The slot record filterd holds for `ctx`'s slot, if it is of `ctx`'s
/// seqid.
fn recorded_at_seqid(ctx: &Ctx<'_>) -> Result<Option<SlotRec>, Fail> {
    let scope = state::scope(&ctx.sh.tables.slots(&ctx.seq.sessionid)).map_err(filter_fail)?;
    let slot_op = u64::try_from(ctx.seq.slot).unwrap_or(0);
    Ok(ctx
        .sh
        .filter
        .client()
        .lookup_reply(scope, slot_op)
        .map_err(filter_fail)?
        .and_then(|r| serde_json::from_str::<SlotRec>(&r.reply).ok())
        .filter(|r| r.seqid == ctx.seq.seqid))
}

/// Whether a slot record without a digest is of the request `asked`.
fn legacy_same(ctx: &Ctx<'_>, rec: &SlotRec, asked: &Asked<'_>) -> Result<bool, Fail> {
    match asked {
        Asked::Namespace => Ok(rec.state.is_none() && rec.reply == json!({"status": "NFS4_OK"})),
        Asked::Open { owner, path } => {
            let Some(num) = rec.state else {
                return Ok(false);
            };
            let scope = state::scope(&ctx.sh.tables.states(ctx.cid)).map_err(filter_fail)?;
            Ok(ctx
                .sh
                .filter
                .client()
                .lookup_reply(scope, num)
                .map_err(filter_fail)?
                .and_then(|r| serde_json::from_str::<OpenRec>(&r.reply).ok())
                .is_some_and(|o| o.owner == *owner && o.path == path.as_str()))
        }
    }
}

/// Undoes what an abandoned request left in filterd: an OPEN that
/// committed its handle, open state and slot record together
/// ([`open_recorded`]) before its answer was lost. Its handle is closed and
/// its open-state record deleted in one commit, before the request that
/// took its seqid is answered; a failure to do so is that request's
/// answer (DELAY while filterd is away). An open state nfsshim holds in
/// memory is never undone. (An abandoned OPEN whose records never
/// committed left at most a handle no record names, whose create GUID no
/// other request names: it goes when the client is released,
/// `may_hold_strays`.)
fn abandon(ctx: &Ctx<'_>, st: &mut State, rec: &SlotRec) -> Result<(), Fail> {
    let Some(num) = rec.state else {
        return Ok(());
    };
    let f = &ctx.sh.filter;
    let states = ctx.sh.tables.states(ctx.cid);
    if let Some((other, o)) = st.opens.iter().find(|(_, o)| o.num == num) {
        // In memory: restored from the records the OPEN committed (nfsshim
        // restarted since). Dropped too — its share reservation would
        // otherwise last until the client is released (review F1) — if
        // nothing has named it since: the stateid the slot reply gives,
        // not upgraded, no locks. (One the client uses it heard of.)
        let reply_seqid = rec.reply["stateid"]["seqid"].as_u64();
        let unheard = earlier_id(Some(&rec.reply)).as_deref() == Some(other.as_str())
            && reply_seqid == Some(u64::from(o.rec.seqid))
            && o.rec.locks.is_empty();
        if !unheard {
            return Ok(());
        }
        let other = other.clone();
        let (main, extra) = (
            o.rec.key,
            o.rec.extra.iter().map(|e| e.key).collect::<Vec<_>>(),
        );
        for k in &extra {
            gone_is_fine(f.close(*k)).map_err(filter_fail)?;
        }
        let scope = state::scope(&states).map_err(filter_fail)?;
        gone_is_fine(f.close_recording(main, Vec::new(), vec![(scope, num)]))
            .map_err(filter_fail)?;
        state::delete(f, &states, num).map_err(filter_fail)?;
        if let Some(o) = st.opens.remove(&other) {
            st.aliases.retain(|_, of| *of != other);
            if let Ok(mut g) = ctx.sh.global() {
                for k in o.keys() {
                    g.handle_client.remove(&k);
                }
                if let Some(d) = &o.rec.deleg {
                    g.lease_client.remove(&d.lease_key);
                }
            }
        }
        return Ok(());
    }
    if let Some(key) = rec.opened.as_ref().map(|o| o.key) {
        // Detached (its filterd answer never came back): attached first,
        // as only its own instance closes it. (Attached already, or gone,
        // the resume fails and the close says what holds.)
        let _ = f.resume(ctx.client_id()?, key);
        let scope = state::scope(&states).map_err(filter_fail)?;
        match f.close_recording(key, Vec::new(), vec![(scope, num)]) {
            Ok(()) => return Ok(()),
            Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {}
            Err(e) => return Err(filter_fail(e)),
        }
    }
    state::delete(f, &states, num).map_err(filter_fail)
}

/// An exclusive create made its file, and filterd did not fill its kernel
/// handle into the verifier record (a daemon without
/// `FEATURE_OPEN_KERNEL_HANDLE`): the record gains it in a commit of its
/// own, so a re-send tells the file from one created since under the
/// reused inode number. Should that commit be lost, the re-send compares
/// inode numbers only; an older create's write landing after a newer
/// one's record replaces that record (review D-5, why filterd fills it
/// in now).
fn remember_created_handle(
    sh: &Shared,
    path: &RelPath,
    (verifier, made): (&str, u64),
    h: &libfilter::client::OpenedHandle,
) {
    let Ok(kh) = libfilter::sys::file_handle_of(std::os::fd::AsFd::as_fd(&h.fd)) else {
        return;
    };
    let Ok(scope) = state::scope(&sh.tables.excl()) else {
        return;
    };
    let reply = json!({
        "path": path.as_str(),
        "verifier": verifier,
        excl::MADE: made,
        "file": h.info.file,
        "handle": kh,
    });
    let spec = RecordSpec {
        scope,
        op_id: fnv64(path.as_str()),
        reply: reply.to_string(),
        keep: state::KEEP,
    };
    if let Err(e) = sh.filter.client().write_records(vec![spec], Vec::new()) {
        eprintln!("nfsshim: {path}: an exclusive create's file handle was not recorded ({e}): a re-send compares inode numbers only");
    }
}

/// The `other` of the stateid an OPEN's reply (or its delegation) names.
fn earlier_id(v: Option<&Value>) -> Option<String> {
    v.and_then(|v| v["stateid"]["other"].as_str())
        .map(str::to_owned)
}

/// What a stateid names.
enum Named {
    Open(String),
    /// The open's `other` and the lock state's.
    Lock(String, String),
    Deleg(String),
}

/// Resolves a stateid of this client: its open state's `other` and kind.
fn resolve(ctx: &Ctx<'_>, st: &State, v: &Value) -> Result<Named, Fail> {
    let s = v
        .as_object()
        .ok_or_else(|| inval("stateid must be an object"))?;
    let other = str_field(s, "other")?;
    resolve_parts(ctx, st, other, u64_field(s, "seqid")?)
}

/// [`resolve`] of a stateid's `other` and `seqid`.
fn resolve_parts(ctx: &Ctx<'_>, st: &State, other: &str, seqid: u64) -> Result<Named, Fail> {
    let seqid = u32::try_from(seqid).map_err(|_| inval("seqid too large"))?;
    if st.expired.contains(other) {
        return Err(Fail(
            "NFS4ERR_EXPIRED",
            format!("state {other} was released"),
        ));
    }
    let (open_other, named) = match st.aliases.get(other) {
        Some(o) => (o.clone(), None),
        None => (other.to_owned(), Some(Named::Open(other.to_owned()))),
    };
    let Some(o) = st.opens.get(&open_other) else {
        // Another incarnation's (released) state, or none at all.
        if ctx.sh.global()?.expired.contains(other) {
            return Err(Fail(
                "NFS4ERR_EXPIRED",
                format!("state {other} was released"),
            ));
        }
        return Err(Fail("NFS4ERR_BAD_STATEID", format!("no state {other}")));
    };
    if o.clientid != ctx.cid {
        return Err(Fail(
            "NFS4ERR_BAD_STATEID",
            format!("state {other} is another client's"),
        ));
    }
    let (current, named) = match named {
        // CLOSEd, kept only for its delegation.
        Some(_) if o.rec.closed => {
            return Err(Fail("NFS4ERR_BAD_STATEID", format!("{other} is closed")));
        }
        Some(n) => (o.rec.seqid, n),
        None => match (o.rec.locks.iter().find(|l| l.other == other), &o.rec.deleg) {
            (Some(l), _) => (l.seqid, Named::Lock(open_other.clone(), other.to_owned())),
            (_, Some(d)) if d.other == other => (1, Named::Deleg(open_other.clone())),
            _ => return Err(Fail("NFS4ERR_BAD_STATEID", format!("no state {other}"))),
        },
    };
    if seqid != 0 && seqid < current {
        return Err(Fail(
            "NFS4ERR_OLD_STATEID",
            format!("state {other} is at seqid {current}"),
        ));
    }
    if seqid > current {
        return Err(Fail(
            "NFS4ERR_BAD_STATEID",
            format!("state {other} is at seqid {current}"),
        ));
    }
    Ok(named)
}

fn open_other(n: &Named) -> &str {
    match n {
        Named::Open(o) | Named::Lock(o, _) | Named::Deleg(o) => o,
    }
}

/// The filter handle I/O under this stateid is checked as: a lock-owner's
/// own handle, else the open's.
fn io_key(o: &Open, n: &Named) -> ResumeKey {
    match n {
        Named::Lock(_, lo) => o
            .rec
            .locks
            .iter()
            .find(|l| &l.other == lo)
            .and_then(|l| l.key)
            .unwrap_or(o.rec.key),
        _ => o.rec.key,
    }
}

/// Mandatory locks: may this open read (or write) the range? The I/O must
/// be done while the returned pass is held (see `libfilter::attach`), the
/// pass dropped right after the pread/pwrite (before any fdatasync):
/// unchecked when the file has no locks, else checked by filterd (which
/// holds back conflicting locks until the pass is dropped). `None` for an
/// empty range.
fn check_io<'a>(
    ctx: &Ctx<'a>,
    o: &Open,
    key: ResumeKey,
    offset: u64,
    len: u64,
    write: bool,
) -> Result<Option<IoPass<'a>>, Fail> {
    if len == 0 {
        return Ok(None);
    }
    // A handle of the open lost meanwhile (not resumed after a filterd
    // restart, expired) is dropped at this client's next request: its
    // file's locks are nothing this nfsshim hears of any more.
    let live = || {
        let keys = o.keys();
        ctx.sh
            .global()
            .map(|g| {
                !g.forgotten
                    .get(ctx.cid)
                    .is_some_and(|f| f.iter().any(|k| keys.contains(k)))
            })
            .unwrap_or(false)
    };
    match ctx
        .sh
        .filter
        .decide_io(&ctx.sh.locked_files, o.file_key, live)
    {
        // filterd is away (or back, but this nfsshim has not re-learned
        // which files have locks yet): a lock may exist that nothing here
        // knows of, so no I/O goes unchecked; NFS4ERR_DELAY.
        IoDecision::NotReady => return Err(filter_fail(ClientError::Disconnected)),
        IoDecision::Gone => {
            return Err(Fail(
                "NFS4ERR_EXPIRED",
                "the open's filter handle is gone".into(),
            ))
        }
        IoDecision::Unchecked(gate) => return Ok(Some(IoPass::Unchecked(gate))),
        IoDecision::Check => {}
    }
    let pass = ctx
        .sh
        .filter
        .client()
        .check_io_advisory(
            key,
            LockRange {
                offset,
                length: len,
            },
            write,
        )
        .map_err(filter_fail)?;
    // The daemon lost since the check: retry (as for NotReady).
    ctx.sh
        .filter
        .checked(o.file_key, pass)
        .map(Some)
        .ok_or_else(|| filter_fail(ClientError::Disconnected))
}

fn read(ctx: &Ctx<'_>, st: &mut State, obj: &Map<String, Value>) -> Outcome {
    let offset = u64_field(obj, "offset")?;
    let count = u64_field(obj, "count")?.min(MAX_READ);
    in_file_range(offset, count)?;
    let n = resolve(ctx, st, field(obj, "stateid")?)?;
    let o = st
        .opens
        .get(open_other(&n))
        .ok_or_else(|| internal("open vanished"))?;
    if !access_of(&o.rec.access)?.contains(Rights::READ) {
        return Err(Fail("NFS4ERR_ACCESS", "the open does not read".into()));
    }
    let pass = check_io(ctx, o, io_key(o, &n), offset, count, false)?;
    let mut buf = vec![0u8; usize::try_from(count).unwrap_or(0)];
    let file = o
        .file_for(Rights::READ)
        .ok_or_else(|| Fail("NFS4ERR_ACCESS", "the open does not read".into()))?;
    let got = file.read_at(&mut buf, offset).map_err(|e| io_fail(&e))?;
    let eof = shimline::datasync::read_reached_eof(file, offset, got, buf.len());
    drop(pass);
    buf.truncate(got);
    let mut m = Map::new();
    m.insert(
        "data".into(),
        json!(base64::engine::general_purpose::STANDARD.encode(&buf)),
    );
    m.insert("eof".into(), json!(eof));
    Ok(m)
}

fn write(ctx: &Ctx<'_>, st: &mut State, obj: &Map<String, Value>) -> Outcome {
    let offset = u64_field(obj, "offset")?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(str_field(obj, "data")?)
        .map_err(|_| inval("data must be base64"))?;
    in_file_range(offset, u64::try_from(data.len()).unwrap_or(u64::MAX))?;
    let n = resolve(ctx, st, field(obj, "stateid")?)?;
    let o = st
        .opens
        .get(open_other(&n))
        .ok_or_else(|| internal("open vanished"))?;
    if !access_of(&o.rec.access)?.contains(Rights::WRITE) {
        return Err(Fail("NFS4ERR_ACCESS", "the open does not write".into()));
    }
    let file = o
        .file_for(Rights::WRITE)
        .ok_or_else(|| Fail("NFS4ERR_ACCESS", "the open does not write".into()))?;
    let pass = check_io(
        ctx,
        o,
        io_key(o, &n),
        offset,
        u64::try_from(data.len()).unwrap_or(u64::MAX),
        true,
    )?;
    let wrote = file.write_all_at(&data, offset);
    // Landed: a lock waiting for this frontend's hint or this checked
    // write may be granted now.
    drop(pass);
    // Other clients' read caching (an SMB client's R or RH lease) goes,
    // also after a failed write (it may have landed in part).
    let key = io_key(o, &n);
    // Never waits (this holds the client's state): a notice filterd
    // cannot take now is sent later.
    ctx.sh.filter.wrote(key);
    wrote.map_err(|e| io_fail(&e))?;
    // Every nfsl/1 open is a persistent handle: the data is on stable
    // storage before the reply (FILE_SYNC), shared with concurrent writers.
    sync_written(file)?;
    let mut m = Map::new();
    m.insert("count".into(), json!(data.len()));
    Ok(m)
}

/// NFS4ERR_INVAL for a READ or WRITE of `length` bytes at `offset` past
/// the largest file offset (bad input, not a server failure).
fn in_file_range(offset: u64, length: u64) -> Result<(), Fail> {
    if shimline::datasync::in_file_range(offset, length) {
        return Ok(());
    }
    Err(inval(format!(
        "offset {offset} + count {length} is past the largest file offset"
    )))
}

/// The status of a failed pread, pwrite or data sync: only out of space
/// is NFS4ERR_NOSPC.
fn io_fail(e: &std::io::Error) -> Fail {
    let status = match shimline::datasync::IoFailure::of(e) {
        shimline::datasync::IoFailure::NoSpace => "NFS4ERR_NOSPC",
        shimline::datasync::IoFailure::BadRange => "NFS4ERR_INVAL",
        shimline::datasync::IoFailure::Server => "NFS4ERR_SERVERFAULT",
    };
    Fail(status, e.to_string())
}

/// Makes the writes through `file` durable (WRITE, COMMIT); a failed data
/// sync is classed as a failed pread/pwrite is ([`io_fail`]): out of
/// space or quota is NFS4ERR_NOSPC, not the server's fault.
fn sync_written(file: &shimline::datasync::SyncedFile) -> Result<(), Fail> {
    file.sync_written().map_err(|e| io_fail(&e))
}

fn commit(ctx: &Ctx<'_>, st: &mut State, obj: &Map<String, Value>) -> Outcome {
    let n = resolve(ctx, st, field(obj, "stateid")?)?;
    let o = st
        .opens
        .get(open_other(&n))
        .ok_or_else(|| internal("open vanished"))?;
    for f in o.files() {
        sync_written(f)?;
    }
    Ok(Map::new())
}

/// A LOCK's or (`unlock`) LOCKU's range.
fn range_of(obj: &Map<String, Value>, unlock: bool) -> Result<LockRange, Fail> {
    let offset = u64_field(obj, "offset")?;
    let length = u64_field(obj, "length")?;
    if length == 0 {
        return Err(inval("length must not be 0"));
    }
    let length = if length == EOF_LENGTH {
        u64::MAX - offset
    } else if !unlock && offset.checked_add(length - 1).is_none() {
        // RFC 8881 18.10.4: a range past 2^64 (not "to end of file") is
        // NFS4ERR_INVAL; before, it was granted (rvspec 7). Not for a
        // LOCKU: a lock granted so before (kept in the open's record) must
        // still come off as it was named (rr38e 4); its end saturates at
        // 2^64 ([`ranges::without`]).
        return Err(inval("offset + length is past 2^64"));
    } else {
        length
    };
    Ok(LockRange { offset, length })
}

fn lock(ctx: &Ctx<'_>, st: &mut State, obj: &Map<String, Value>) -> Outcome {
    let sh = ctx.sh;
    let f = lock_fields(obj)?;
    ctx.digest.set(lock_digest(&f));
    let LockFields {
        owner,
        write,
        range,
        stateid: named,
    } = f;
    let n = resolve(ctx, st, named)?;
    if matches!(n, Named::Deleg(_)) {
        return Err(Fail(
            "NFS4ERR_BAD_STATEID",
            "a delegation stateid cannot lock".into(),
        ));
    }
    let other = open_other(&n).to_owned();
    let o = st
        .opens
        .get(&other)
        .ok_or_else(|| internal("open vanished"))?;
    let existing = o.rec.locks.iter().position(|l| l.owner == owner);
    let held = (range.offset, range.length, write);
    // The filter handle this lock-owner locks through: the open's for the
    // first lock-owner, a handle of its own for every further one.
    let (key, new_key) = match existing.and_then(|i| o.rec.locks.get(i)) {
        Some(l) => (l.key.unwrap_or(o.rec.key), None),
        None if o.rec.locks.is_empty() => (o.rec.key, None),
        None => {
            // Its descriptor is closed at once, but needs room to arrive.
            let _slot = descriptor_slot(sh)?;
            let h = sh
                .filter
                .replay_open(OpenRequest {
                    client: ctx.client_id()?,
                    path: RelPath::new(current_path(sh, o.rec.key, &o.rec.path))
                        .map_err(|e| internal(e.to_string()))?,
                    access: Access::new(access_of(&o.rec.access)?)
                        .map_err(|e| internal(e.to_string()))?,
                    share: Rights::ALL,
                    disposition: Disposition::Open,
                    durability: Durability::Persistent {
                        timeout_ms: HANDLE_TIMEOUT_MS,
                    },
                    // This request's own (slot, seqid and digest): a
                    // different LOCK at a seqid answered DELAY never gets
                    // the handle an earlier one made (review N1).
                    create_guid: Some(CreateGuid(ctx.request_guid("lock-owner"))),
                    owner: Some(owner.clone()),
                    lease: None,
                    no_wait: true,
                    wait_for_hints: true,
                    replay_same_lease: false,
                    resume_only: false,
                    share_group: Some(o.rec.owner.clone()),
                    stat: false,
                    share_exempt: false,
                    put: Vec::new(),
                })
                .map_err(filter_fail)?;
            if h.info.file != o.file_key {
                // Renamed away between the look-up and the open: not the
                // open's file, so no lock of its may go through it.
                let _ = sh.filter.close(h.info.key);
                return Err(Fail(
                    "NFS4ERR_DELAY",
                    "the open's file was renamed meanwhile".into(),
                ));
            }
            (h.info.key, Some(h.info.key))
        }
    };
    // RFC 8881 §9: a lock-owner's own ranges never conflict with each
    // other: the request replaces whatever of its own it overlaps (an
    // upgrade, a downgrade, a split) and touching ranges of one type merge.
    let before: Vec<Held> = existing
        .and_then(|i| o.rec.locks.get(i))
        .map(|l| l.held.clone())
        .unwrap_or_default();
    let after = ranges::with(&before, held);
    let file_key = o.file_key;
    if let Ok(mut l) = sh.locked_files.lock() {
        l.insert(file_key);
    }
    if let Err(e) = apply_ranges(sh, key, &owner, &before, &after, ctx.restored) {
        if let Some(k) = new_key {
            let _ = sh.filter.close(k);
        }
        if e.code() == Some(ErrorCode::LockNotGranted) {
            return Err(denied(sh, &e, held));
        }
        return Err(filter_fail(e));
    }
    ctx.on_refusal(match new_key {
        // Its locks go with it.
        Some(k) => Undo::Close(k),
        None => Undo::Ranges {
            key,
            owner: owner.clone(),
            now: after.clone(),
            back: before.clone(),
        },
    });
    ctx.save(st, &other);
    let o = st
        .opens
        .get_mut(&other)
        .ok_or_else(|| internal("open vanished"))?;
    let i = match existing {
        Some(i) => i,
        None => {
            o.rec.locks.push(LockRec {
                other: new_id("L"),
                seqid: 0,
                owner,
                key: new_key,
                held: Vec::new(),
            });
            o.rec.locks.len() - 1
        }
    };
    let Some(l) = o.rec.locks.get_mut(i) else {
        return Err(internal("lock state vanished"));
    };
    l.seqid = l.seqid.wrapping_add(1);
    l.held = after;
    let (lock_other, lseq) = (l.other.clone(), l.seqid);
    let (lock_key, lock_owner_name) = (l.key.unwrap_or(o.rec.key), l.owner.clone());
    let rec = o.rec.clone();
    let num = o.num;
    st.aliases.insert(lock_other.clone(), other);
    {
        let mut g = ctx.sh.global()?;
        g.lock_owner.insert(lock_key, lock_owner_name);
        if let Some(k) = new_key {
            g.handle_client.insert(k, ctx.cid.to_owned());
        }
    }
    ctx.put_state(num, &rec)?;
    let mut m = Map::new();
    m.insert("lock_stateid".into(), stateid_json(&lock_other, lseq));
    Ok(m)
}

/// The name filterd has for handle `key`'s file now (it follows every
/// rename, also another client's or a local one), else `known`.
fn current_path(sh: &Shared, key: ResumeKey, known: &str) -> String {
    match sh.filter.client().call(Request::Handle {
        key,
        learning: false,
    }) {
        Ok((libfilter::proto::Reply::Handle(v), _)) => v.record.path.as_str().to_owned(),
        _ => known.to_owned(),
    }
}

/// One held range: (offset, length, write).
type Held = (u64, u64, bool);

/// The filter handle `key`'s locks, as held ranges.
fn filter_locks(sh: &Shared, key: ResumeKey) -> Option<Vec<Held>> {
    match sh.filter.client().call(Request::Handle {
        key,
        learning: false,
    }) {
        Ok((libfilter::proto::Reply::Handle(v), _)) => {
            let mut h: Vec<Held> = v
                .record
                .locks
                .iter()
                .map(|l| {
                    (
                        l.range.offset,
                        l.range.length,
                        l.kind == LockKind::Exclusive,
                    )
                })
                .collect();
            h.sort_unstable();
            Some(h)
        }
        _ => None,
    }
}

/// Moves the filter's locks of `key` from `before` to `after` in one
/// all-or-nothing request: the ranges that go are unlocked first, then the
/// new ones locked, so nothing of the owner's own is in the way. A request
/// executed before a restart (its reply lost) finds `after` in place.
fn apply_ranges(
    sh: &Shared,
    key: ResumeKey,
    lock_owner: &str,
    before: &[Held],
    after: &[Held],
    restored: bool,
) -> Result<(), ClientError> {
    let op = |&(offset, length, write): &Held, unlock| LockOp {
        range: LockRange { offset, length },
        exclusive: write,
        unlock,
    };
    let ops: Vec<LockOp> = before
        .iter()
        .filter(|h| !after.contains(h))
        .map(|h| op(h, true))
        .chain(
            after
                .iter()
                .filter(|h| !before.contains(h))
                .map(|h| op(h, false)),
        )
        .collect();
    if ops.is_empty() {
        return Ok(());
    }
    let in_place = || {
        let mut want = after.to_vec();
        want.sort_unstable();
        filter_locks(sh, key).is_some_and(|have| have == want)
    };
    if restored && in_place() {
        return Ok(());
    }
    // The filter reports the lock-owner in conflicts, also to other
    // nfsshim instances, which do not know this handle.
    match sh.filter.client().lock_as(key, ops, lock_owner.to_owned()) {
        Ok(()) => Ok(()),
        // Re-executed after filterd lost the reply: already applied.
        Err(e)
            if matches!(
                e.code(),
                Some(ErrorCode::LockNotGranted) | Some(ErrorCode::RangeNotLocked)
            ) && in_place() =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The `denied` owner of a conflict filterd names no lock of: a local
/// process's fcntl lock (filterd learns only that the kernel refused its
/// OFD mirror, not whose lock it met).
const LOCAL_LOCK_OWNER: &str = "local process";

/// NFS4ERR_DENIED with the conflicting lock (its holder's lock-owner when
/// it is one of ours). The spec gives every NFS4ERR_DENIED a `denied`: a
/// conflict with a local process's lock, of which filterd reports nothing,
/// names the range `asked` for, a write lock (the one type that conflicts
/// with any request) and [`LOCAL_LOCK_OWNER`]. It came with none, and a
/// client reading `denied` met an error without it.
fn denied(sh: &Shared, e: &ClientError, asked: Held) -> Fail {
    let conflict = match e {
        ClientError::Refused(w) => w.conflict.as_deref(),
        _ => None,
    };
    let detail = match conflict {
        Some(c) => {
            let owner = sh
                .global()
                .ok()
                .and_then(|g| g.lock_owner.get(&c.key).cloned())
                .or_else(|| c.owner.clone())
                .unwrap_or_else(|| format!("handle {}", c.key));
            json!({"offset": c.range.offset, "length": c.range.length,
                   "type": if c.kind == LockKind::Exclusive { "write" } else { "read" },
                   "owner": owner})
        }
        None => {
            let (offset, length, _) = asked;
            json!({"offset": offset, "length": length, "type": "write",
                   "owner": LOCAL_LOCK_OWNER})
        }
    };
    // `finish` moves the details from the message into `denied`.
    Fail("NFS4ERR_DENIED", detail.to_string())
}

fn locku(ctx: &Ctx<'_>, st: &mut State, obj: &Map<String, Value>) -> Outcome {
    let sh = ctx.sh;
    let range = range_of(obj, true)?;
    let n = resolve(ctx, st, field(obj, "lock_stateid")?)?;
    let Named::Lock(other, lock_other) = n else {
        return Err(Fail("NFS4ERR_BAD_STATEID", "not a lock stateid".into()));
    };
    ctx.save(st, &other);
    let o = st
        .opens
        .get_mut(&other)
        .ok_or_else(|| internal("open vanished"))?;
    let open_key = o.rec.key;
    let Some(l) = o.rec.locks.iter_mut().find(|l| l.other == lock_other) else {
        return Err(Fail("NFS4ERR_BAD_STATEID", "no lock state".into()));
    };
    let key = l.key.unwrap_or(open_key);
    // Unlocking part of a range keeps the rest (a split); unlocking what
    // is not locked is fine.
    let after = ranges::without(&l.held, range.offset, range.length);
    // The record's size first: an unlock done in filterd and then refused
    // could be undone only while nobody has locked the range since.
    let (held, seqid) = (std::mem::replace(&mut l.held, after.clone()), l.seqid);
    l.seqid = l.seqid.wrapping_add(1);
    let fits = ctx.state_fits(&o.rec);
    let Some(l) = o.rec.locks.iter_mut().find(|l| l.other == lock_other) else {
        return Err(internal("lock state vanished"));
    };
    (l.held, l.seqid) = (held, seqid);
    fits?;
    apply_ranges(sh, key, &l.owner, &l.held, &after, ctx.restored).map_err(|e| {
        match e.code() {
            // A split that would pass filterd's lock caps: RFC 8881 lets a
            // LOCKU answer that the server does not support this sub-range
            // unlock (18.12.3, NFS4ERR_LOCK_RANGE); NFS4ERR_RESOURCE, the
            // limits' answer elsewhere, is no LOCKU status (review rr41d).
            Some(ErrorCode::LimitReached) => Fail("NFS4ERR_LOCK_RANGE", e.to_string()),
            _ => filter_fail(e),
        }
    })?;
    ctx.on_refusal(Undo::Ranges {
        key,
        owner: l.owner.clone(),
        now: after.clone(),
        back: l.held.clone(),
    });
    l.held = after;
    l.seqid = l.seqid.wrapping_add(1);
    let (lo, ls) = (l.other.clone(), l.seqid);
    let rec = o.rec.clone();
    ctx.put_state(o.num, &rec)?;
    let mut m = Map::new();
    m.insert("lock_stateid".into(), stateid_json(&lo, ls));
    Ok(m)
}

/// A lock-owner's held ranges under RFC 8881 §9 (POSIX) semantics. Held
/// ranges never overlap; touching ranges of one type are merged.
mod ranges {
    use super::Held;

    fn end(h: &Held) -> u64 {
        h.0.saturating_add(h.1)
    }

    /// `held` with [offset, offset+length) taken out (ranges split).
    pub fn without(held: &[Held], offset: u64, length: u64) -> Vec<Held> {
        let cut_end = offset.saturating_add(length);
        let mut out = Vec::with_capacity(held.len() + 1);
        for h in held {
            if end(h) <= offset || h.0 >= cut_end {
                out.push(*h);
                continue;
            }
            if h.0 < offset {
                out.push((h.0, offset - h.0, h.2));
            }
            if end(h) > cut_end {
                out.push((cut_end, end(h) - cut_end, h.2));
            }
        }
        out.sort_unstable();
        out
    }

    /// `held` with `new` locked over whatever it overlaps, merged.
    pub fn with(held: &[Held], new: Held) -> Vec<Held> {
        let mut all = without(held, new.0, new.1);
        all.push(new);
        all.sort_unstable();
        let mut out: Vec<Held> = Vec::with_capacity(all.len());
        for h in all {
            match out.last_mut() {
                Some(last) if last.2 == h.2 && end(last) >= h.0 => {
                    let e = end(last).max(end(&h));
                    last.1 = e - last.0;
                }
                _ => out.push(h),
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn upgrade_split_merge() {
            // Upgrade the middle of a read range: three pieces.
            assert_eq!(
                with(&[(0, 100, false)], (40, 20, true)),
                vec![(0, 40, false), (40, 20, true), (60, 40, false)]
            );
            // Downgrade it back: merged into one.
            let up = with(&[(0, 100, false)], (40, 20, true));
            assert_eq!(with(&up, (40, 20, false)), vec![(0, 100, false)]);
            // Partial unlock keeps the rest.
            assert_eq!(without(&[(0, 100, true)], 0, 50), vec![(50, 50, true)]);
            assert_eq!(without(&[(0, 100, true)], 200, 5), vec![(0, 100, true)]);
            // Touching ranges of one type merge; to end of file works.
            assert_eq!(
                with(&[(0, 10, true)], (10, u64::MAX - 10, true)),
                vec![(0, u64::MAX, true)]
            );
        }
    }
}

fn close(ctx: &Ctx<'_>, st: &mut State, body: Body<'_>) -> Outcome {
    let sh = ctx.sh;
    // The stateid's `other` if it is a string, and how it resolves.
    let (named_other, named) = match body {
        Body::Map(obj) => {
            let named = field(obj, "stateid")?;
            (named.get("other").and_then(Value::as_str), Err(named))
        }
        Body::Close(wire::Line {
            stateid: Some(s), ..
        }) => (Some(&*s.other.0), Ok((&*s.other.0, s.seqid))),
        Body::Open(_) | Body::Close(_) => return Err(internal("CLOSE without a stateid")),
    };
    let closed_other = named_other.filter(|o| {
        st.closed.get(o).is_some_and(|(c, by)| {
            c == ctx.cid && by.as_ref().is_none_or(|r| *r == ctx.request_name("close"))
        })
    });
    if closed_other.is_some() {
        // Closed already by a request whose reply may have been lost.
        return Ok(Map::new());
    }
    let n = match named {
        Err(v) => resolve(ctx, st, v)?,
        Ok((other, seqid)) => resolve_parts(ctx, st, other, seqid)?,
    };
    let Named::Open(other) = n else {
        return Err(Fail("NFS4ERR_BAD_STATEID", "not an open stateid".into()));
    };
    let o = st
        .opens
        .get(&other)
        .ok_or_else(|| internal("open vanished"))?;
    if o.rec.locks.iter().any(|l| !l.held.is_empty()) {
        return Err(Fail("NFS4ERR_LOCKS_HELD", "unlock first".into()));
    }
    let num = o.num;
    // A delegation outlives the open (RFC 8881 §10.4): kept, with the
    // handle carrying its lease, until DELEGRETURN or revocation.
    let carrier = o
        .rec
        .deleg
        .as_ref()
        .filter(|d| d.survives_close)
        .map(|d| d.carrier.unwrap_or(o.rec.key))
        .filter(|k| o.keys().contains(k));
    if let Some(carrier) = carrier {
        return close_keeping_delegation(ctx, st, &other, carrier);
    }
    // The further handles (upgrades, lock-owners) first; then the open's
    // own handle, whose close carries the state's deletion and the slot
    // reply: one commit (a crash leaves the open state whole, with its own
    // handle, or gone with the reply recorded). A re-send after a crash
    // finds the closed handles gone and closes the rest.
    let (key, further) = (o.rec.key, o.keys().split_off(1));
    let mut recorded_with_close = false;
    // A further handle filterd closed leaves the open state at once: if a
    // later close fails, the state stays with what filterd still holds for
    // it, never naming (and writing through) a handle filterd closed. Its
    // record follows with the failed request's reply (a restart finding a
    // handle gone drops the whole state, as it should then).
    let mut trimmed = false;
    let failed = |st: &State, trimmed: bool, e: ClientError| {
        if let (true, Some(o)) = (trimmed, st.opens.get(&other)) {
            ctx.put_state(o.num, &o.rec)?;
        }
        Err(filter_fail(e))
    };
    for k in further {
        match sh.filter.close(k) {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {}
            Err(e) => return failed(st, trimmed, e),
        }
        drop_further_handle(sh, st, &other, k, true)?;
        trimmed = true;
    }
    let put = vec![slot_record(ctx)?];
    let delete = vec![(
        state::scope(&sh.tables.states(ctx.cid)).map_err(filter_fail)?,
        num,
    )];
    match sh.filter.close_recording(key, put, delete) {
        Ok(()) => recorded_with_close = true,
        // Closed already (a re-send after a crash whose close committed
        // without its reply reaching us): the records go the usual way.
        Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {}
        Err(e) => return failed(st, trimmed, e),
    }
    st.closed.insert(
        other.clone(),
        (ctx.cid.to_owned(), Some(ctx.request_name("close"))),
    );
    if let Some(o) = st.opens.remove(&other) {
        let mut g = ctx.sh.global()?;
        for k in o.keys() {
            g.handle_client.remove(&k);
            g.lock_owner.remove(&k);
        }
        for l in &o.rec.locks {
            st.aliases.remove(&l.other);
        }
        if let Some(d) = &o.rec.deleg {
            st.aliases.remove(&d.other);
            g.lease_client.remove(&d.lease_key);
        }
    }
    if recorded_with_close {
        return Ok(recorded());
    }
    ctx.delete_state(num);
    Ok(Map::new())
}

/// CLOSE of open state `other` whose delegation outlives it (RFC 8881
/// §10.4; review rvspec n8/n11: the delegation went with the open, so a
/// conflicting OPEN recalled nothing and the holder's later DELEGRETURN or
/// WRITE under it was NFS4ERR_BAD_STATEID). Every handle of the open but
/// `carrier`, which holds the delegation's lease and denies nothing, is
/// closed, each leaving the state once filterd closed it; then the state,
/// marked closed with `carrier` as its one handle, is recorded with the
/// slot reply in one commit. A crash before that commit leaves a record
/// naming a closed handle: the restore drops the state (the delegation
/// revoked, `NFS4ERR_EXPIRED`) and the CLOSE re-sent is `NFS4_OK`.
fn close_keeping_delegation(
    ctx: &Ctx<'_>,
    st: &mut State,
    other: &str,
    carrier: ResumeKey,
) -> Outcome {
    let sh = ctx.sh;
    let Some(o) = st.opens.get(other) else {
        return Err(internal("open vanished"));
    };
    let own = o.rec.key;
    let further: Vec<ResumeKey> = o
        .keys()
        .into_iter()
        .skip(1)
        .filter(|k| *k != carrier)
        .collect();
    let mut trimmed = false;
    let failed = |st: &State, trimmed: bool, e: ClientError| {
        if let (true, Some(o)) = (trimmed, st.opens.get(other)) {
            ctx.put_state(o.num, &o.rec)?;
        }
        Err(filter_fail(e))
    };
    for k in further {
        match sh.filter.close(k) {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {}
            Err(e) => return failed(st, trimmed, e),
        }
        drop_further_handle(sh, st, other, k, true)?;
        trimmed = true;
    }
    let Some(o) = st.opens.get(other) else {
        return Err(internal("open vanished"));
    };
    // The state as it is once closed, made aside: nothing in memory
    // changes until its record and the slot reply are durable (re-review
    // D1: marked closed first, a commit that failed left it closed in
    // memory only, the re-send answered NFS4_OK from that, and a restart
    // brought the open back).
    let mut o = o.clone();
    if carrier != own {
        // The carrier becomes the state's own handle.
        let Some(i) = o.rec.extra.iter().position(|e| e.key == carrier) else {
            return Err(internal("delegation carrier vanished"));
        };
        let e = o.rec.extra.remove(i);
        if i < o.extra.len() {
            let (rights, file) = o.extra.remove(i);
            o.file = file;
            o.rights = rights;
        }
        o.rec.key = carrier;
        o.rec.access = e.access;
    } else if let Some(a) = o.rec.key_access.take() {
        o.rec.access = a;
    }
    o.rec.key_access = None;
    o.rec.extra.clear();
    o.extra.clear();
    o.rec.deny = "none".into();
    o.rec.closed = true;
    if let Some(d) = &mut o.rec.deleg {
        d.carrier = None;
    }
    let locks: Vec<String> = o.rec.locks.drain(..).map(|l| l.other).collect();
    ctx.state_fits(&o.rec)?;
    let put = vec![
        RecordSpec {
            scope: state::scope(&sh.tables.states(ctx.cid)).map_err(filter_fail)?,
            op_id: o.num,
            reply: state::encode(&o.rec).map_err(filter_fail)?,
            keep: state::KEEP,
        },
        slot_record(ctx)?,
    ];
    st.swaps.insert(
        own,
        Swap {
            other: other.to_owned(),
            open: o,
            closed_by: Some(ctx.request_name("close")),
            gone_aliases: locks,
            reattaches: reattaches_now(sh),
        },
    );
    // One commit: the open's own handle closed (when it does not carry
    // the lease), the state's record marked closed and the slot reply.
    let committed = if carrier == own {
        sh.filter.client().write_records(put, Vec::new())
    } else {
        match sh.filter.close_recording(own, put.clone(), Vec::new()) {
            // Closed already (a re-send after a crash whose close
            // committed without its reply reaching us): the records alone.
            Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {
                sh.filter.client().write_records(put, Vec::new())
            }
            r => r,
        }
    };
    if let Err(e) = committed {
        // Kept while the outcome is unknown and `own` closed by it: the
        // reattach then reports `own` lost ([`Swap`]).
        if e.code().is_some() || carrier == own {
            st.swaps.remove(&own);
        }
        return failed(st, trimmed, e);
    }
    if let Some(sw) = st.swaps.remove(&own) {
        apply_swap(sh, st, own, sw);
    }
    Ok(recorded())
}

/// A further handle `key` of open state `other` (an upgrade's, a
/// delegation carrier's, a lock-owner's) was closed in filterd: the state
/// no longer names it. With `revoking`, a delegation whose carrier it was
/// goes with it (its lease is no longer held), as if revoked.
fn drop_further_handle(
    sh: &Shared,
    st: &mut State,
    other: &str,
    key: ResumeKey,
    revoking: bool,
) -> Result<(), Fail> {
    let Some(o) = st.opens.get_mut(other) else {
        return Ok(());
    };
    let mut carried = false;
    if let Some(i) = o.rec.extra.iter().position(|e| e.key == key) {
        carried = o.rec.extra.remove(i).for_deleg;
        if i < o.extra.len() {
            o.extra.remove(i);
        }
    }
    let mut lock_other = None;
    if let Some(i) = o.rec.locks.iter().position(|l| l.key == Some(key)) {
        lock_other = Some(o.rec.locks.remove(i).other);
    }
    let lease = o
        .rec
        .deleg
        .as_ref()
        .filter(|_| carried && revoking)
        .map(|d| d.lease_key);
    if let Some(l) = lock_other {
        st.aliases.remove(&l);
    }
    let mut g = sh.global()?;
    g.handle_client.remove(&key);
    g.lock_owner.remove(&key);
    if let Some(lease) = lease {
        g.lease_client.remove(&lease);
        drop(g);
        revoke(st, lease);
        retire_revoked(sh, st);
    }
    Ok(())
}

fn delegreturn(ctx: &Ctx<'_>, st: &mut State, obj: &Map<String, Value>) -> Outcome {
    let sh = ctx.sh;
    let named = field(obj, "stateid")?;
    let me = ctx.request_name("delegreturn");
    if named
        .get("other")
        .and_then(Value::as_str)
        .and_then(|o| st.closed.get(o))
        .is_some_and(|(c, by)| c == ctx.cid && by.as_ref() == Some(&me))
    {
        // This very request returned it already; its reply was lost (the
        // record of it did not reach filterd, also across a restart of
        // nfsshim: `DelegRec::returning`): the same answer again. A return
        // of a CLOSEd open's delegation that filterd went away in the
        // middle of, its state still here, is finished first.
        let closed_state = named
            .get("other")
            .and_then(Value::as_str)
            .and_then(|d| st.aliases.get(d))
            .filter(|o| st.opens.get(*o).is_some_and(|o| o.rec.closed))
            .cloned();
        if let Some(other) = closed_state {
            return delegreturn_closed(ctx, st, &other, me);
        }
        return Ok(Map::new());
    }
    let n = resolve(ctx, st, named)?;
    let Named::Deleg(other) = n else {
        return Err(Fail(
            "NFS4ERR_BAD_STATEID",
            "not a delegation stateid".into(),
        ));
    };
    let o = st
        .opens
        .get(&other)
        .ok_or_else(|| internal("open vanished"))?;
    if o.rec.closed {
        // No acknowledgement first: filterd ends the break (and runs
        // again what waited for it) when the lease's one handle closes,
        // which `delegreturn_closed` does in the commit that deletes the
        // state. Given up first, the lease let a waiting open run while
        // the handle, not yet closed, still denied it (re-review rr39a A:
        // an SMB open denying read was STATUS_SHARING_VIOLATION).
        return delegreturn_closed(ctx, st, &other, me);
    }
    if let Some(d) = &o.rec.deleg {
        // First the record says which request gives the lease up: should
        // nfsshim die before this request's records commit, its restore
        // finds the lease gone and tells this return (whose re-send is
        // answered NFS4_OK) from a revocation (NFS4ERR_EXPIRED). Only the
        // record: in memory the delegation is the client's until it goes.
        let mut marked = o.rec.clone();
        if let Some(d) = &mut marked.deleg {
            d.returning = Some(me.clone());
        }
        match state::put(&sh.filter, &sh.tables.states(ctx.cid), o.num, &marked) {
            Ok(()) => {}
            // A record that the mark would take past filterd's limit: the
            // return goes on unmarked (its re-send after a restart of
            // nfsshim is then NFS4ERR_EXPIRED) rather than never.
            Err(e) if e.code() == Some(ErrorCode::BadFrame) => {}
            Err(e) => return Err(filter_fail(e)),
        }
        // Acknowledge a recall (or give the lease up): nothing cached.
        // Unless filterd could not be reached, nothing changes here (the
        // client re-sends; the lease may already be down: fine).
        let mark = mark_own_ack(sh, d.lease_key, LeaseState::NONE);
        if let Err(e) = sh.filter.client().call(Request::LeaseBreakAck {
            lease_key: LeaseKey(d.lease_key),
            state: LeaseState::NONE,
            // nfsshim's lease keys are its own, one per OPEN
            // (`filter_name`): the key alone names the lease.
            client: None,
        }) {
            mark.undo_if_refused(sh, &e);
            if matches!(e, ClientError::Disconnected | ClientError::Timeout(_)) {
                return Err(filter_fail(e));
            }
        }
    }
    // Handles kept only to carry a delegation go with it: closed first,
    // each leaving the state once filterd closed it. One whose close
    // failed (undone, refused, no answer) stays the state's, with the
    // delegation: the DELEGRETURN fails and nothing else changed (before,
    // the error was ignored and the handle stayed in filterd, named by
    // nobody).
    let carriers: Vec<ResumeKey> = match &o.rec.deleg {
        Some(_) => o
            .rec
            .extra
            .iter()
            .filter(|e| e.for_deleg)
            .map(|e| e.key)
            .collect(),
        None => Vec::new(),
    };
    let num = o.num;
    let mut trimmed = false;
    for k in carriers {
        match sh.filter.close(k) {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {}
            Err(e) => {
                if let (true, Some(o)) = (trimmed, st.opens.get(&other)) {
                    ctx.put_state(num, &o.rec)?;
                }
                return Err(filter_fail(e));
            }
        }
        drop_further_handle(sh, st, &other, k, false)?;
        trimmed = true;
    }
    let o = st
        .opens
        .get_mut(&other)
        .ok_or_else(|| internal("open vanished"))?;
    if let Some(d) = o.rec.deleg.take() {
        st.aliases.remove(&d.other);
        st.closed
            .insert(d.other.clone(), (ctx.cid.to_owned(), Some(me)));
        if let Ok(mut g) = sh.global() {
            g.lease_client.remove(&d.lease_key);
        }
    }
    let Some(o) = st.opens.get(&other) else {
        return Err(internal("open vanished"));
    };
    ctx.put_state(o.num, &o.rec)?;
    Ok(Map::new())
}

/// DELEGRETURN of a delegation whose open its client CLOSEd
/// ([`OpenRec::closed`]): the state goes with it, its one handle (the
/// delegation's carrier) closed in the commit that deletes its record and
/// stores the slot reply, so a crash leaves the state whole or gone with
/// the reply recorded.
fn delegreturn_closed(ctx: &Ctx<'_>, st: &mut State, other: &str, me: String) -> Outcome {
    let sh = ctx.sh;
    let Some(o) = st.opens.get(other) else {
        return Err(internal("open vanished"));
    };
    let (key, num) = (o.rec.key, o.num);
    let put = vec![slot_record(ctx)?];
    let delete = vec![(
        state::scope(&sh.tables.states(ctx.cid)).map_err(filter_fail)?,
        num,
    )];
    // Until filterd answers, the outcome is unknown: should it go away
    // after the commit, the reattach finds the handle gone and drops the
    // state, and this very request re-sent is answered NFS4_OK (the check
    // at the top of `delegreturn`), or finishes the return when filterd
    // did not make it.
    let deleg_other = o.rec.deleg.as_ref().map(|d| d.other.clone());
    if let Some(d) = &deleg_other {
        st.closed
            .insert(d.clone(), (ctx.cid.to_owned(), Some(me.clone())));
    }
    let recorded_with_close = match sh.filter.close_recording(key, put, delete) {
        Ok(()) => true,
        // Closed already (a re-send after a crash whose close committed
        // without its reply reaching us): the records go the usual way.
        Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => false,
        Err(e) => {
            if let (Some(d), Some(_)) = (&deleg_other, e.code()) {
                // Refused: nothing changed, the delegation is still held.
                st.closed.remove(d);
            }
            return Err(filter_fail(e));
        }
    };
    if let Some(o) = st.opens.remove(other) {
        let mut g = sh.global()?;
        g.handle_client.remove(&key);
        g.lock_owner.remove(&key);
        if let Some(d) = &o.rec.deleg {
            g.lease_client.remove(&d.lease_key);
            drop(g);
            st.aliases.remove(&d.other);
            st.closed
                .insert(d.other.clone(), (ctx.cid.to_owned(), Some(me)));
        }
    }
    if recorded_with_close {
        return Ok(recorded());
    }
    ctx.delete_state(num);
    Ok(Map::new())
}

/// The slot record REMOVE and RENAME ask filterd to store in the same
/// commit as the change.
fn slot_record(ctx: &Ctx<'_>) -> Result<RecordSpec, Fail> {
    let reply = SlotRec {
        seqid: ctx.seq.seqid,
        reply: json!({"status": "NFS4_OK"}),
        opened: None,
        state: None,
        digest: Some(ctx.digest.get()),
    };
    Ok(RecordSpec {
        scope: state::scope(&ctx.sh.tables.slots(&ctx.seq.sessionid)).map_err(filter_fail)?,
        op_id: u64::try_from(ctx.seq.slot).unwrap_or(0),
        reply: serde_json::to_string(&reply).map_err(|e| internal(e.to_string()))?,
        keep: state::KEEP,
    })
}

fn recorded() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(RECORDED.into(), json!(true));
    m
}

/// Whether filterd already made this REMOVE or RENAME: it records the
/// slot reply in the commit that ends the change, so when filterd went away
/// after that commit (or during it: its recovery finishes the change and
/// records the reply) the re-send on the same slot and seqid finds the
/// record. Doing the change again would find the name gone
/// (`NFS4ERR_NOENT`) where the spec wants the original `NFS4_OK`.
fn changed_before(ctx: &Ctx<'_>, st: &mut State) -> Result<bool, Fail> {
    Ok(earlier_request(ctx, st, &Asked::Namespace)?.is_some())
}

fn remove(ctx: &Ctx<'_>, st: &mut State, obj: &Map<String, Value>) -> Outcome {
    let path = path_field(obj, "path")?;
    ctx.digest.set(request_digest("REMOVE", &[path.as_str()]));
    if changed_before(ctx, st)? {
        // Removed by the earlier try, whose verifier delete may not have
        // run: left be (a record naming the removed file is told apart by
        // a re-send's identity check), never one a create wrote since.
        return Ok(recorded());
    }
    let held = NameChange::hold(ctx.sh, &[path.as_str()]);
    lower_own_delegations(ctx, st, &[&path]);
    match ctx
        .sh
        .filter
        .client()
        .remove(path.clone(), Some(slot_record(ctx)?))
    {
        Ok(()) => {
            held.made();
            Ok(recorded())
        }
        Err(e) => Err(namespace_fail(e)),
    }
}

/// RFC 8881 §10.2: an operation by a delegation's own client does not wait
/// for a recall of that delegation. Before this client removes or renames
/// `paths`, its delegations on them give up H of their filter lease (what
/// a namespace change breaks): a read delegation keeps R, a write one R
/// and W. The delegations themselves stay the client's (a
/// later conflicting open by someone else then revokes rather than recalls
/// them, as for any lease without H). Without this the recall would need
/// this client's lock, which the caller holds, and the request would wait
/// out filterd's break timeout.
///
/// A delegation is on a name when the name reaches its open's file now
/// (filterd's answer, [`file_at`]), not when it is the name the open was
/// made by: a local process, a directory's rename or a rename nfsshim did
/// not make for this client may have moved the file since, and neither
/// nfsshim's name nor filterd's record follows every such move. Only when
/// filterd cannot tell is the open's name compared.
fn lower_own_delegations(ctx: &Ctx<'_>, st: &State, paths: &[&RelPath]) {
    if st.opens.values().all(|o| o.rec.deleg.is_none()) {
        return;
    }
    let targets: Vec<(&RelPath, AtName)> = paths.iter().map(|p| (*p, file_at(ctx, p))).collect();
    for o in st.opens.values() {
        let Some(d) = &o.rec.deleg else { continue };
        let on_it = targets.iter().any(|(p, at)| match at {
            AtName::File(file) => *file == o.file_key,
            AtName::Nothing => false,
            AtName::Unknown => o.rec.path == p.as_str(),
        });
        if !on_it {
            continue;
        }
        // A namespace change breaks only H: a write delegation keeps W
        // with R (acking R alone would give W up too, and a later reader
        // would get in with no recall while this client's cached writes
        // are unwritten).
        let keep = if d.write {
            LeaseState::R.with(LeaseState::W)
        } else {
            LeaseState::R
        };
        let mark = mark_own_ack(ctx.sh, d.lease_key, keep);
        if let Err(e) = ctx.sh.filter.client().call(Request::LeaseBreakAck {
            lease_key: LeaseKey(d.lease_key),
            state: keep,
            // nfsshim's lease keys are its own, one per OPEN
            // (`filter_name`): the key alone names the lease.
            client: None,
        }) {
            mark.undo_if_refused(ctx.sh, &e);
            eprintln!(
                "nfsshim: lowering delegation {} before a namespace change: {e}",
                d.other
            );
        }
    }
}

/// What a name reaches now, as filterd finds it.
enum AtName {
    /// This file.
    File(FileId),
    /// Nothing.
    Nothing,
    /// filterd could not tell (not reached, no descriptor to spare...).
    Unknown,
}

/// The file `path` names now, asked with a stat open (it takes no part in
/// sharing and breaks no lease), closed at once.
fn file_at(ctx: &Ctx<'_>, path: &RelPath) -> AtName {
    let sh = ctx.sh;
    let (Ok(_slot), Ok(client), Ok(access)) = (
        descriptor_slot(sh),
        ctx.client_id(),
        Access::new(Rights::READ),
    ) else {
        return AtName::Unknown;
    };
    let opened = sh.filter.open(OpenRequest {
        no_wait: true,
        stat: true,
        ..OpenRequest::new(
            client,
            path.clone(),
            access,
            Rights::ALL,
            Disposition::Open,
            Durability::None,
        )
    });
    match opened {
        Ok(h) => {
            let _ = sh.filter.close(h.info.key);
            AtName::File(h.info.file)
        }
        Err(e)
            if matches!(
                e.code(),
                Some(ErrorCode::NotFound | ErrorCode::PathNotFound)
            ) =>
        {
            AtName::Nothing
        }
        Err(_) => AtName::Unknown,
    }
}

/// The exclusive-create verifiers of names being removed or renamed:
/// held from before the change is sent ([`excl::Ages::hold`]), so no
/// create of a name writes a verifier meanwhile; deleted once the change
/// is made ([`NameChange::made`]), left as they were if it is not.
struct NameChange<'a> {
    sh: &'a Shared,
    /// The held op ids (each in the table).
    held: Vec<u64>,
}

impl<'a> NameChange<'a> {
    fn hold(sh: &'a Shared, paths: &[&str]) -> Self {
        let held = match sh.excl.lock() {
            Ok(mut a) => paths
                .iter()
                .map(|p| fnv64(p))
                .filter(|op| a.hold(*op))
                .collect(),
            Err(_) => Vec::new(),
        };
        NameChange { sh, held }
    }

    /// The change is made: the names' verifiers go.
    fn made(mut self) {
        for op in std::mem::take(&mut self.held) {
            let ok = state::delete(&self.sh.filter, &self.sh.tables.excl(), op).is_ok();
            deleted_verifier(self.sh, op, ok);
        }
    }
}

impl Drop for NameChange<'_> {
    fn drop(&mut self) {
        for op in std::mem::take(&mut self.held) {
            deleted_verifier(self.sh, op, false);
        }
    }
}

/// The delete of verifier record `op` is done (`ok`) or not made.
fn deleted_verifier(sh: &Shared, op: u64, ok: bool) {
    if let Ok(mut a) = sh.excl.lock() {
        a.deleted(op, ok);
    }
}

/// An exclusive create's claim on the `excl` table ([`excl::Ages`]),
/// ended when dropped: its record entered if `written` (it may have been:
/// set once the open is sent, cleared when filterd refused it).
struct VerifierClaim<'a> {
    sh: &'a Shared,
    claim: Option<excl::Claim>,
    /// Whether the create may have written its record.
    written: bool,
}

impl<'a> VerifierClaim<'a> {
    /// Claims room for the record of an exclusive create of `path`,
    /// first deleting — here, before the open — the oldest records should
    /// the table with what is under way pass filterd's cap, so that
    /// filterd never trims it by op id ([`excl`]). A delete that fails,
    /// or a delete of this very record under way, is `NFS4ERR_DELAY`:
    /// the client re-sends, nothing done.
    fn begin(sh: &'a Shared, path: &str) -> Result<Self, Fail> {
        let begun = sh
            .excl
            .lock()
            .map_err(|_| internal("excl lock"))?
            .begin(fnv64(path), excl::cap());
        let Ok((claim, old)) = begun else {
            return Err(Fail(
                "NFS4ERR_DELAY",
                format!("{path}: its exclusive-create record is being deleted; retry"),
            ));
        };
        let me = VerifierClaim {
            sh,
            claim: Some(claim),
            written: false,
        };
        let mut failed = None;
        for op in old {
            if failed.is_some() {
                // After one failed, the rest are not tried: still there.
                deleted_verifier(sh, op, false);
                continue;
            }
            let r = state::delete(&sh.filter, &sh.tables.excl(), op);
            deleted_verifier(sh, op, r.is_ok());
            failed = r.err();
        }
        if let Some(e) = failed {
            return Err(Fail(
                "NFS4ERR_DELAY",
                format!("making room in the exclusive-create table: {e}; retry"),
            ));
        }
        Ok(me)
    }

    /// The age the record is written with.
    fn made(&self) -> u64 {
        self.claim.as_ref().map_or(0, |c| c.made)
    }
}

impl Drop for VerifierClaim<'_> {
    fn drop(&mut self) {
        if let (Some(claim), Ok(mut ages)) = (self.claim.take(), self.sh.excl.lock()) {
            ages.end(claim, self.written);
        }
    }
}

/// REMOVE / RENAME against an open without delete share: FILE_OPEN.
fn namespace_fail(e: ClientError) -> Fail {
    match e.code() {
        Some(ErrorCode::SharingViolation) | Some(ErrorCode::FileNotAvailable) => {
            Fail("NFS4ERR_FILE_OPEN", e.to_string())
        }
        _ => filter_fail(e),
    }
}

fn rename(ctx: &Ctx<'_>, st: &mut State, obj: &Map<String, Value>) -> Outcome {
    let sh = ctx.sh;
    let from = path_field(obj, "from")?;
    let to = path_field(obj, "to")?;
    let (from_s, to_s) = (from.as_str().to_owned(), to.as_str().to_owned());
    ctx.digest.set(request_digest("RENAME", &[&from_s, &to_s]));
    if !changed_before(ctx, st)? {
        // As REMOVE's: the names' verifiers go with the change made now.
        let held = NameChange::hold(sh, &[&from_s, &to_s]);
        lower_own_delegations(ctx, st, &[&from, &to]);
        rename_in_filter(ctx, from, to)?;
        held.made();
    }
    // This client's opens of the file follow it (its own later REMOVE or
    // RENAME of the new name finds their delegations). Saved first: when
    // their records do not commit, the re-send moves them again and writes
    // them (a restore takes the name from filterd's handle either way).
    let moving: Vec<String> = st
        .opens
        .iter()
        .filter(|(_, o)| o.rec.path == from_s)
        .map(|(other, _)| other.clone())
        .collect();
    for other in moving {
        ctx.save(st, &other);
        if let Some(o) = st.opens.get_mut(&other) {
            o.rec.path.clone_from(&to_s);
            if let Err(f) = ctx.put_state(o.num, &o.rec) {
                // The rename is done and its reply recorded: a record too
                // long to store under the new name keeps the old one (a
                // restore takes an open's name from filterd's handle).
                if !ctx.too_large.replace(false) {
                    return Err(f);
                }
            }
        }
    }
    Ok(recorded())
}

/// RENAME's change in filterd, its slot reply recorded with it.
fn rename_in_filter(ctx: &Ctx<'_>, from: RelPath, to: RelPath) -> Result<(), Fail> {
    let sh = ctx.sh;
    // Renames go through a short-lived handle with delete access: its open
    // is refused when another open does not share delete.
    let h = sh
        .filter
        .open(OpenRequest {
            no_wait: true,
            ..OpenRequest::new(
                ctx.client_id()?,
                from,
                Access::new(Rights::DELETE).map_err(|e| internal(e.to_string()))?,
                Rights::ALL,
                Disposition::Open,
                Durability::None,
            )
        })
        .map_err(namespace_fail)?;
    let r = sh
        .filter
        .client()
        .rename(h.info.key, to, true, Some(slot_record(ctx)?));
    let _ = sh.filter.close(h.info.key);
    r.map_err(namespace_fail)
}

/// Filter events: delegation recalls (CB_RECALL), lock hints, handles gone.
fn events(sh: Arc<Shared>) {
    loop {
        let ev = match sh.filter.events().recv() {
            Ok(ev) => ev,
            Err(_) => return,
        };
        match ev {
            AttachEvent::Daemon(Event::LeaseBreak {
                lease_key,
                current_state,
                ack_required,
                file,
                ..
            }) => {
                test_delay_break(lease_key, ack_required);
                recall(&sh, lease_key, ack_required, file, Some(current_state))
            }
            AttachEvent::Daemon(Event::LocksPresent { file }) => {
                // Acknowledged once no unchecked WRITE is in flight.
                sh.filter.locks_present(&sh.locked_files, file);
            }
            AttachEvent::Daemon(Event::LocksGone { file }) => {
                if let Ok(mut l) = sh.locked_files.lock() {
                    l.remove(&file);
                }
            }
            AttachEvent::Daemon(Event::Expired { key } | Event::Purged { key }) => {
                forget(&sh, &[key]);
            }
            AttachEvent::Reattached {
                generation,
                lost,
                taken,
                locked,
                leases,
                ..
            } => {
                test_note("a reattach is stored; applying it");
                // No request or reaper tick runs on the state meanwhile
                // (taken first: a request may wait for its I/O gate).
                let _serving = sh.serving.write().unwrap_or_else(|p| p.into_inner());
                // No unchecked I/O meanwhile, and none after on what this
                // changes.
                let _quiet = sh.filter.exclusive_io();
                // The reattach's calls (the server record's look, the
                // reload) on one connection: lost meanwhile, the reload
                // fails and waits for the next reattach, rather than go
                // on over a later one whose supervisor attached again
                // what this one detached (the restore's resume of it
                // then refused, and the open dropped).
                let _pin = sh.filter.pin();
                let stepped = sh.stepped_down.swap(false, Ordering::AcqRel);
                if !taken.is_empty() {
                    eprintln!(
                        "nfsshim: {} handle(s) were attached by another nfsshim process of this instance since (its clients moved there): reading the tables again",
                        taken.len()
                    );
                    sh.reload_due.store(true, Ordering::Release);
                }
                if !sh.reload_due.load(Ordering::Acquire) && served_elsewhere(&sh) {
                    eprintln!(
                        "nfsshim: another nfsshim process of this instance served its tables meanwhile: reading them again"
                    );
                    sh.reload_due.store(true, Ordering::Release);
                } else if !sh.reload_due.load(Ordering::Acquire)
                    && lowered_delegations(&sh, &leases)
                {
                    // A delegation whose lease filterd lowered while this
                    // process was detached (a holder disconnected is
                    // lowered untold: another node served, or another
                    // frontend opened the file): the reload's restore
                    // revokes it, as at a start (re-review rr41m 1: with
                    // no reload forced by the step-down any more, it was
                    // kept, its client caching writes nobody would recall).
                    eprintln!(
                        "nfsshim: a delegation's lease was lowered while filterd was away: reading the tables again"
                    );
                    sh.reload_due.store(true, Ordering::Release);
                } else if stepped && !sh.reload_due.load(Ordering::Acquire) {
                    eprintln!(
                        "nfsshim: filterd stepped down, and no other nfsshim process of this instance served the tables since: keeping them"
                    );
                }
                if sh.reload_due.load(Ordering::Acquire) {
                    // What another process of this instance did to the
                    // tables is not in memory: read them again, as at the
                    // start, before any request runs (review rvnfsnode 1).
                    // A handle it took is never forgotten as gone: its
                    // state is that process's record, not to delete.
                    if !reload_or_wait(&sh) {
                        continue;
                    }
                } else {
                    // Only handles that are gone: a taken one (none here,
                    // or the tables were read again above) is not.
                    let gone: Vec<ResumeKey> =
                        lost.into_iter().filter(|k| !taken.contains(k)).collect();
                    forget(&sh, &gone);
                }
                // After its lost handles are forgotten or listed.
                if let Ok(mut g) = sh.global() {
                    g.reattaches += 1;
                }
                // What the resumes said about locks, before any I/O goes
                // unchecked again.
                sh.filter
                    .relearn_locks(&sh.locked_files, locked, generation);
                if sh.clients.open() {
                    eprintln!("nfsshim: filterd serves again: accepting clients again");
                }
            }
            AttachEvent::Daemon(Event::SteppingDown) => {
                // Another node owns the table: its nfsshim may restore and
                // serve these tables meanwhile. Nothing runs until the
                // next reattach, which reads them again if it did (its
                // handles `taken`, or [`served_elsewhere`]) — not when
                // the same node claims the table again, nobody else
                // serving (re-review rr41e 3a).
                sh.stepped_down.store(true, Ordering::Release);
                shimline::stepped_down(&sh.clients, "nfsshim");
            }
            _ => {}
        }
    }
}

/// Whether a delegation held in memory lost what it promises in
/// `leases` (each resumed handle's lease as filterd holds it now): its
/// handle resumed with no lease, another lease, or one lowered below what
/// the delegation promises ([`still_delegates`]).
fn lowered_delegations(
    sh: &Shared,
    leases: &[(ResumeKey, Option<libfilter::model::HeldLease>)],
) -> bool {
    let Ok(g) = sh.global() else {
        return false;
    };
    g.lease_client.iter().any(|(lease, held)| {
        leases.iter().any(|(k, now)| {
            *k == held.handle
                && !now.is_some_and(|l| {
                    l.key.0 == *lease
                        && l.state.contains(LeaseState::R)
                        && (!held.write || l.state.contains(LeaseState::W))
                })
        })
    })
}

/// Reads the tables again ([`reload`]) on a reattach that found them
/// maybe changed by another process of this instance; true when done
/// (`reload_due` cleared). Not done, the client connections are let go
/// and new ones refused (nothing may run on a state half read), and the
/// next reattach tries again — or, filterd still there, nfsshim exits
/// (75): its restart reads the tables as this would have.
fn reload_or_wait(sh: &Shared) -> bool {
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        tries += 1;
        let e = match reload(sh) {
            Ok(()) => {
                sh.reload_due.store(false, Ordering::Release);
                return true;
            }
            Err(e) => e,
        };
        // The connection the events thread pinned: lost (told by the
        // socket before the reader marks it dead), no try on it passes.
        if sh.filter.pinned_lost() || sh.filter.client().is_dead() {
            let n = sh.clients.let_go();
            eprintln!(
                "nfsshim: reading the tables again failed ({e}); filterd went away again: closed {n} client connection(s); trying again at the next reattach"
            );
            return false;
        }
        // One that may pass (filterd busy, short of descriptors, slow to
        // answer) is tried again a few times before the restart, which
        // costs every client its connection (re-review rr41e 3c). Each
        // try starts from the tables: a reload is done again whole.
        if tries < RELOAD_TRIES && reload_error_may_pass(&e) {
            eprintln!(
                "nfsshim: reading the tables again failed ({e}); trying again in {backoff:?}"
            );
            std::thread::sleep(backoff);
            backoff *= 4;
            continue;
        }
        let n = sh.clients.let_go();
        eprintln!(
            "nfsshim: reading the tables again failed ({e}); closed {n} client connection(s); exiting to start afresh"
        );
        std::process::exit(75);
    }
}

/// How many times [`reload_or_wait`] reads the tables before it gives up
/// (filterd still there: exit 75).
const RELOAD_TRIES: u32 = 3;

/// Whether a failed reload (or chore, [`chore_failure`], which counts a
/// timeout as passing too) may pass by waiting: filterd busy,
/// interrupted, short of descriptors or memory, its store full. Not a
/// timeout: a filterd that stopped answering would cost each try the
/// whole call timeout, every request blocked meanwhile (re-review rr41m
/// 3: up to three times 120 s).
fn reload_error_may_pass(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(
            ErrorCode::LimitReached
                | ErrorCode::Busy
                | ErrorCode::Retry
                | ErrorCode::FileNotAvailable
                | ErrorCode::DiskFull
        )
    )
}

/// Whether a refused detach of one of this attachment's handles before a
/// reload leaves the handle as the restore expects it: not attached by
/// this connection (another process attached it since, `NotOwner`; or
/// it is gone, `NoSuchHandle`). Any other refusal leaves it attached
/// here, and the restore's resume of it would be refused "attached, not
/// disconnected" — dropping the open and deleting its record (re-review
/// rr41e 2): the reload fails instead.
fn detach_refusal_harmless(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::NotOwner | ErrorCode::NoSuchHandle)
    )
}

/// Drops everything in memory about clients, sessions, slots, open
/// states and verifiers, and restores it from the tables as at the start
/// ([`restore`]): another nfsshim process of this instance (the other
/// node's, while it owned the shared table) served these clients
/// meanwhile — made clients and sessions, answered slots, opened, closed,
/// renamed — and attached their handles (review rvnfsnode 1: kept, the
/// stale memory answered re-sends with what it had, and the reattach's
/// refusal of every handle deleted every open state's record). The
/// handles this attachment reattached are detached first, so that the
/// restore's resumes — a client's resume, which filterd grants whoever
/// attached the handle last — take them back with the rest. Called by
/// the event thread under `serving` (write) and `exclusive_io`.
fn reload(sh: &Shared) -> Result<(), ClientError> {
    // From here what was computed from memory is stale: a chore queued
    // before is left to the restore ([`chore_off_request`]).
    sh.reloads.fetch_add(1, Ordering::AcqRel);
    let f = &sh.filter;
    let client_conns: HashMap<String, u64>;
    let ours = |h: &libfilter::proto::HandleView| {
        h.record.frontend.as_str() == sh.tables.instance()
            && h.record.protocol.as_str() == "nfs"
            && h.record.conn == ConnState::Connected
    };
    for h in f.client().handles()?.into_iter().filter(ours) {
        // Disconnected, it still holds its modes and locks (and is
        // resumed by the restore below, or closed as a stray). One
        // another process attached since, or gone, is left to the
        // restore as it is; any other refusal fails the reload
        // ([`detach_refusal_harmless`]).
        if let Err(e) = f.detach(h.record.key) {
            if f.client().is_dead() || !detach_refusal_harmless(&e) {
                return Err(e);
            }
            eprintln!(
                "nfsshim: detaching handle {} to read the tables again: {e}",
                h.record.key
            );
        }
    }
    {
        let mut g = sh
            .st
            .lock()
            .map_err(|_| ClientError::Unexpected("lock".into()))?;
        // Kept: what is about connections, not clients; give-backs
        // queued (a stale ack must not take a fresh delegation); the
        // count of reattaches.
        // The connections of clients are kept for the clients the
        // restore brings back (below): a recall must reach one whose
        // TCP connection survived (re-review rr41e 3b).
        client_conns = std::mem::take(&mut g.client_conn);
        let fresh = Global {
            conn_peer: std::mem::take(&mut g.conn_peer),
            giving_back: std::mem::take(&mut g.giving_back),
            clients_reserved: g.clients_reserved,
            reattaches: g.reattaches,
            ..Global::default()
        };
        let stale = std::mem::replace(&mut *g, fresh);
        drop(g);
        // Its open states' descriptors close here.
        drop(stale);
    }
    let read = (|| {
        *sh.excl
            .lock()
            .map_err(|_| ClientError::Unexpected("excl lock".into()))? = excl::Ages::default();
        let registered = sh.tables.registered(f)?;
        sh.registered.store(registered, Ordering::Release);
        restore(sh)
    })();
    if let Err(e) = read {
        // Kept for the next try, which takes them again (re-review
        // rr41m 2: a retried reload found none, and a recall missed a
        // client whose connection survived).
        if let Ok(mut g) = sh.st.lock() {
            for (cid, conn) in client_conns {
                g.client_conn.entry(cid).or_insert(conn);
            }
        }
        return Err(e);
    }
    keep_client_conns(sh, client_conns)?;
    restore_verifier_ages(sh)?;
    claim_tables(sh)?;
    eprintln!("nfsshim: tables read again");
    Ok(())
}

/// Enters `conns` (each client's connection before a [`reload`]) for the
/// clients the restore brought back.
fn keep_client_conns(sh: &Shared, conns: HashMap<String, u64>) -> Result<(), ClientError> {
    let mut g = sh
        .st
        .lock()
        .map_err(|_| ClientError::Unexpected("lock".into()))?;
    let g = &mut *g;
    for (cid, conn) in conns {
        if g.clients.contains_key(&cid) {
            g.client_conn.entry(cid).or_insert(conn);
        }
    }
    Ok(())
}

/// Handles filterd dropped (expired, purged, lost in a restart): their
/// open states go. A client whose request is running is not waited for —
/// the event thread must stay free to send recalls — its handles are
/// forgotten at its next request instead.
fn forget(sh: &Shared, keys: &[ResumeKey]) {
    for key in keys {
        let Ok(Some(cid)) = sh.global().map(|g| g.handle_client.get(key).cloned()) else {
            continue;
        };
        let Ok(Some(cl)) = sh.client(&cid) else {
            continue;
        };
        match cl.try_lock() {
            Ok(mut st) => {
                for c in forget_handle(sh, &mut st, *key) {
                    // Unbounded: one entry per handle that went away.
                    queue_chore(sh, c);
                }
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                if let Ok(mut g) = sh.global() {
                    g.forgotten.entry(cid).or_default().push(*key);
                }
            }
            Err(std::sync::TryLockError::Poisoned(_)) => {}
        };
    }
}

/// Hands chore `c`, computed from memory now, to the chores thread
/// ([`chore_off_request`]).
fn queue_chore(sh: &Shared, c: Chore) {
    let _ = sh.chores.send((sh.reloads.load(Ordering::Acquire), c));
}

/// Drops the open states of one filter handle that went away; returns the
/// filterd calls that go with it (see [`Chore`]).
#[must_use]
fn forget_handle(sh: &Shared, st: &mut State, key: ResumeKey) -> Vec<Chore> {
    if let Some(sw) = st.swaps.remove(&key) {
        if st
            .opens
            .get(&sw.other)
            .is_some_and(|o| o.keys().contains(&key))
        {
            // Closed by a commit whose answer filterd did not send: the
            // state is what that commit recorded.
            apply_swap(sh, st, key, sw);
            return Vec::new();
        }
    }
    let mut g = sh.st.lock().unwrap_or_else(|p| p.into_inner());
    forget_open_of(&sh.tables, st, &mut g, key)
}

/// [`forget_handle`] once no swap note applies: drops what client state
/// `st` and `g` hold of handle `key` — only itself and its delegation
/// when it only carried one ([`drop_deleg_carrier`]), else the open
/// states it is a handle of (its tables `tables`); returns the filterd
/// calls that go with it.
fn forget_open_of(
    tables: &state::Tables,
    st: &mut State,
    g: &mut Global,
    key: ResumeKey,
) -> Vec<Chore> {
    if let Some(chores) = drop_deleg_carrier(st, g, key) {
        return chores;
    }
    let mut chores = Vec::new();
    let gone: Vec<String> = st
        .opens
        .iter()
        .filter(|(_, o)| o.keys().contains(&key))
        .map(|(k, _)| k.clone())
        .collect();
    for other in gone {
        if let Some(o) = st.opens.remove(&other) {
            for l in &o.rec.locks {
                st.aliases.remove(&l.other);
                st.expired.add(l.other.clone());
            }
            if let Some(d) = &o.rec.deleg {
                st.aliases.remove(&d.other);
                st.expired.add(d.other.clone());
            }
            // Its handle is gone (expired, purged, or closed by a CLOSE
            // whose reply was lost in a filterd crash) or lost from the
            // attachment: a CLOSE of it is answered NFS4_OK, anything
            // else NFS4ERR_EXPIRED.
            st.closed.insert(other.clone(), (o.clientid.clone(), None));
            let keys = o.keys();
            let scope = tables.states(&o.clientid);
            let mut rec = o.rec.clone();
            rec.gone = true;
            match state::encode(&rec) {
                Ok(text) => chores.push(Chore::MarkGone {
                    scope: scope.clone(),
                    cid: o.clientid.clone(),
                    num: o.num,
                    text,
                    keys: keys.clone(),
                }),
                Err(e) => eprintln!("nfsshim: marking open {other} gone: {e}"),
            }
            chores.extend(open_gone_chores(scope, &o.clientid, o.num, &keys, key));
            for k in keys {
                g.handle_client.remove(&k);
                g.lock_owner.remove(&k);
            }
        }
        st.expired.add(other);
    }
    chores
}

/// Handle `key` that went away only carried the delegation of an open
/// state still open (a further handle of the open's own modes,
/// `for_deleg`): only it goes, the delegation with it (its lease went
/// with the handle), as the restore does with such a handle it finds gone
/// — the open's modes are all still held (re-review rr42c F3: the whole
/// open went). Its close, resumed if filterd holds it disconnected
/// ([`close_resuming`]): a handle lost only from the attachment (its
/// resume refused past its patience) kept its lease, and a reload within
/// its timeout resumed it and brought back the delegation its client was
/// told was revoked (re-review rr42g R5); closed, the restore finds it
/// gone and revokes the delegation (a gone handle answers no-such-handle:
/// done). None when it was not one: not one while its delegation's lease
/// is being moved to or from it ([`LeaseHolder::was`]), nor of an open
/// kept only for its delegation (CLOSEd): the open goes whole then, as
/// before.
fn drop_deleg_carrier(st: &mut State, g: &mut Global, key: ResumeKey) -> Option<Vec<Chore>> {
    let other = st
        .opens
        .iter()
        .find(|(_, o)| {
            !o.rec.closed
                && o.rec.key != key
                && o.rec.extra.iter().any(|e| e.key == key && e.for_deleg)
                && !o.rec.locks.iter().any(|l| l.key == Some(key))
        })
        .map(|(k, _)| k.clone())?;
    let o = st.opens.get_mut(&other)?;
    // Whether the lease went with the handle: it is the delegation's
    // carrier; else the delegation stays.
    let mut lease = None;
    if let Some(d) = &o.rec.deleg {
        match g.lease_client.get(&d.lease_key) {
            Some(h) if h.was.is_none() && h.handle == key => lease = Some(d.lease_key),
            Some(h) if h.was.is_none() => {}
            _ => return None,
        }
    }
    if let Some(i) = o.rec.extra.iter().position(|e| e.key == key) {
        o.rec.extra.remove(i);
        if i < o.extra.len() {
            o.extra.remove(i);
        }
    }
    let chores = vec![Chore::Close(key, o.clientid.clone())];
    g.handle_client.remove(&key);
    g.lock_owner.remove(&key);
    if let Some(lease) = lease {
        g.lease_client.remove(&lease);
        revoke(st, lease);
    }
    Some(chores)
}

/// The filterd calls an open state of client `cid` whose handle `gone`
/// went away leaves to do: close `gone` itself — gone, its close answers
/// no-such-handle (done); lost only from the attachment (its resume at a
/// reattach refused past its patience), filterd holds it disconnected,
/// and it is resumed and closed ([`close_resuming`]; re-review rr42g R4:
/// left so, a restore within its timeout resumed it and brought the open
/// back, its client told EXPIRED) — and its other handles `keys`
/// (upgrades, lock-owners: the open is one reservation, they go with the
/// one that went), then delete its record (`num` in table `scope`). In
/// this order: whatever is left
/// undone (the connection lost midway, and the tables read again before
/// the rest is done; or the delete committed and its answer lost) leaves
/// the record naming a handle that is gone, which the restore drops
/// whole, closing the open's other handles. The record deleted first, a
/// close left undone kept a handle no record named, which the restore
/// keeps while its client is live (for a re-send of its OPEN,
/// [`close_strays`]): share modes and locks held for nobody until the
/// client went (re-review rrpin2 B). The delete names the closes it
/// waits for: one of them given up or failed, it is not run either
/// ([`ChoreSequence`]).
fn open_gone_chores(
    scope: String,
    cid: &str,
    num: u64,
    keys: &[ResumeKey],
    gone: ResumeKey,
) -> Vec<Chore> {
    let after: Vec<ResumeKey> = std::iter::once(gone)
        .chain(keys.iter().copied().filter(|k| *k != gone))
        .collect();
    let mut chores: Vec<Chore> = after
        .iter()
        .map(|k| Chore::Close(*k, cid.to_owned()))
        .collect();
    chores.push(Chore::DeleteState {
        scope,
        cid: cid.to_owned(),
        num,
        after,
    });
    chores
}

/// Whether a delegation's lease, found `state` at restore, still grants
/// what the delegation promised its client: R for any delegation, and W
/// too for a write delegation. One whose lease lost W while nfsshim was
/// down (another client opened the file meanwhile) is revoked like one
/// that lost R: kept, its client would go on caching writes while others
/// read the file's stale data, and nobody would recall it.
fn still_delegates(d: &DelegRec, state: LeaseState) -> bool {
    state.contains(LeaseState::R) && (!d.write || state.contains(LeaseState::W))
}

/// Gives lease `lease_key` back to filterd whole: an acknowledgement of
/// none, which with no break in progress gives it up of nfsshim's own
/// accord. For a lease no delegation answers for (dropped, revoked, or
/// granted beside one already held): what filterd lowered without an
/// answer is H at least (RH broken by a writer, or at the break timeout),
/// and a lease left behind would make every later rename, delete or
/// conflicting open of its file wait out the whole break timeout for a
/// recall nobody answers. One filterd no longer holds is fine.
fn give_back(sh: &Shared, lease_key: LeaseKey) -> Result<(), ClientError> {
    let r = sh.filter.client().call(Request::LeaseBreakAck {
        lease_key,
        state: LeaseState::NONE,
        // nfsshim's lease keys are its own, one per OPEN (`filter_name`):
        // the key alone names the lease.
        client: None,
    });
    gone_is_fine(r.map(|_| ()))
}

/// An OPEN in flight that asks for a delegation, its lease key entered in
/// [`Global::opening`] until the OPEN is done: a break filterd sends before
/// the delegation is known (its key in `lease_client`) waits for that,
/// then is handled as any ([`recall`]) — or, when the OPEN took no
/// delegation under the key, the lease is given back.
struct Opening<'a> {
    sh: &'a Shared,
    key: LeaseKey,
    /// A give-back of the key was queued and not yet done as the OPEN
    /// started ([`Global::giving_back`]): the OPEN asks for no delegation.
    /// Read under the lock that enters the key in [`Global::opening`]:
    /// [`recall`] queues no give-back of an unknown key in there (a break
    /// of it waits for the OPEN), so the answer holds for the OPEN's whole
    /// life; a revocation's give-back (a key nfsshim knows) ends as the
    /// waiting break would.
    given_back: bool,
}

impl<'a> Opening<'a> {
    fn new(sh: &'a Shared, key: LeaseKey) -> Result<Opening<'a>, Fail> {
        let mut g = sh.global()?;
        g.opening.insert(key.0, None);
        let given_back = g.giving_back.contains_key(&key.0);
        Ok(Opening {
            sh,
            key,
            given_back,
        })
    }
}

/// An OPEN that asked for no delegation because a give-back of its lease
/// key was queued (`refused`, [`Opening::given_back`]) may still have been
/// answered that lease: a replay of its earlier try returns that try's
/// handle as it is. The lease goes back now, the handle attached here
/// again (the queued give-back may have failed on it detached), so that
/// nothing conflicting waits for a recall nobody answers.
fn give_back_refused(sh: &Shared, refused: Option<LeaseKey>, opened: &libfilter::proto::Opened) {
    let Some(key) = refused else {
        return;
    };
    if !opened
        .lease
        .is_some_and(|l| l.key == key && !l.state.is_none())
    {
        return;
    }
    match give_back(sh, key) {
        Ok(()) => {
            // Only a key whose own give-back failed: one still queued
            // would ack away the delegation a later re-send is granted
            // once the key is gone (re-review rr-map36).
            if let Ok(mut g) = sh.global() {
                if g.giving_back
                    .get(&key.0)
                    .is_some_and(|failed| failed.is_some())
                {
                    g.giving_back.remove(&key.0);
                }
            }
        }
        Err(e) => eprintln!("nfsshim: giving back lease {key}: {e}"),
    }
}

/// Tests only (debug builds): `$NFSSHIM_TEST_GIVE_BACK_DELAY_MS` holds a
/// queued give-back (the chores thread) before its ack, so that a re-sent
/// OPEN of the key meets it
/// (`nfs_state.rs::a_resent_open_takes_no_delegation_whose_lease_is_being_given_back`).
fn test_delay_give_back(key: LeaseKey) {
    static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    test_delay(
        test_delay_ms(&DELAY, "NFSSHIM_TEST_GIVE_BACK_DELAY_MS"),
        format_args!("the give-back of lease {key}"),
    );
}

/// Tests only (debug builds): `$NFSSHIM_TEST_REVOCATION_DELAY_MS` holds
/// the events thread before it handles a break without an ack (a
/// revocation), as a busy machine may, so that an OPEN filterd granted
/// meanwhile is answered first
/// (`nfs_reservation.rs::a_read_after_a_granted_conflicting_open_is_expired_however_late_the_revocation_event`);
/// `$NFSSHIM_TEST_RECALL_DELAY_MS` one that needs an ack (a recall), so
/// that nfsshim's own ack completes it first
/// (`nfs_reservation.rs::a_delegation_renamed_by_its_client_before_the_break_event_is_kept`).
fn test_delay_break(key: LeaseKey, ack_required: bool) {
    static RECALL: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static REVOCATION: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let (what, ms) = if ack_required {
        (
            "recall",
            test_delay_ms(&RECALL, "NFSSHIM_TEST_RECALL_DELAY_MS"),
        )
    } else {
        (
            "revocation",
            test_delay_ms(&REVOCATION, "NFSSHIM_TEST_REVOCATION_DELAY_MS"),
        )
    };
    test_delay(ms, format_args!("the {what} of lease {key}"));
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let Ok(mut g) = self.sh.global() else {
            return;
        };
        if let Some(Some(EarlyBreak(ack_required, file, from))) = g.opening.remove(&self.key.0) {
            drop(g);
            recall(self.sh, self.key, ack_required, file, from);
        }
    }
}

/// A delegation's lease must go: CB_RECALL to its client. Without an ack
/// required the filter lowered it already: the delegation is revoked (at
/// the client's next request) and what is left of its lease given back.
/// A lease of no delegation nfsshim knows is given back at once, unless
/// its OPEN is still in flight ([`Opening`]). Never waits for a client's
/// lock, so the event thread is never held up by a client's request in
/// progress; the give-back, a commit, goes to the chores thread. `from`:
/// the lease's state when the break began (the event's `current_state`;
/// None when nfsshim revokes on its own finding).
fn recall(
    sh: &Shared,
    lease_key: LeaseKey,
    ack_required: bool,
    file: Option<FileId>,
    from: Option<LeaseState>,
) {
    let Ok(mut g) = sh.global() else {
        return;
    };
    let Some(LeaseHolder { cid, other, .. }) = g.lease_client.get(&lease_key.0).cloned() else {
        if let Some(early) = g.opening.get_mut(&lease_key.0) {
            let was = early.is_some_and(|EarlyBreak(a, _, _)| a);
            let from = early.and_then(|EarlyBreak(_, _, f)| f).or(from);
            *early = Some(EarlyBreak(was || ack_required, file, from));
            return;
        }
        g.giving_back.insert(lease_key.0, None);
        drop(g);
        queue_chore(sh, Chore::GiveBack(lease_key));
        return;
    };
    if !ack_required {
        g.revoked.entry(cid).or_default().push((lease_key.0, file));
        // A later break of what is left finds no delegation: given back
        // here, it is not recalled from a client that no longer holds it.
        g.lease_client.remove(&lease_key.0);
        g.giving_back.insert(lease_key.0, None);
        drop(g);
        queue_chore(sh, Chore::GiveBack(lease_key));
        return;
    }
    let conn = g.client_conn.get(&cid).copied();
    let writer = conn.and_then(|c| sh.writers.get(c));
    let sent_on = conn.filter(|_| writer.is_some());
    note_recall(&mut g, lease_key.0, file, from, sent_on);
    drop(g);
    if let Some(w) = writer {
        shimline::send(&w, &cb_recall(&other));
    }
}

/// The delegations (stateid `other`s) of client `cid` (its state `st`)
/// recalled and still held for which `due` holds and whose CB_RECALL is
/// still to go on connection `conn`, noted as gone there ([`Reached`]):
/// each in [`Global::recalled`] not yet returned or revoked, and one
/// recalled to make room ([`room_for_an_open`]). The caller sends them on
/// `conn` behind the answer of the request that came on it
/// ([`handle_line`]). They are called for when the client's request comes
/// on another connection than before: the recall went to a connection
/// since dropped, or to none at all (one dropped before the recall, or
/// none yet since a restore) — the holder would not hear of it and lose
/// its delegation, its cached writes with it, at the break timeout while
/// it was back and renewing (review rvnfsnode 2); and after a
/// DELEGRETURN of a recalled one that failed for good (re-review rr41g 3:
/// left out before it ran, it was never sent on that connection). A
/// recall to make room gets a lease from its re-send, up to a lease after
/// its first send ([`RoomRecall::at`]): the holder back late had little of
/// it left (re-review rr41c F4). The client may get a recall twice (the
/// first went out and so does this); it answers each with the same
/// DELEGRETURN, the second one finding it gone. The caller holds the
/// client's lock, then the global one (the lock order).
fn due_recalls(
    g: &mut Global,
    st: &mut State,
    cid: &str,
    conn: u64,
    lease: Duration,
    due: impl Fn(&str) -> bool,
) -> Vec<String> {
    let Global {
        recalled,
        lease_client,
        conn_peer,
        ..
    } = g;
    let live = |c: u64| conn_peer.contains_key(&c);
    let mut others: Vec<String> = recalled
        .iter_mut()
        .filter_map(|(l, r)| Some((lease_client.get(l)?, r)))
        .filter(|(h, _)| h.cid == cid && due(&h.other))
        .filter_map(|(h, r)| r.reached.reach(conn, live).then(|| h.other.clone()))
        .collect();
    let room = st.room_recall.as_ref().and_then(|r| {
        st.opens
            .get(&r.other)
            .filter(|o| o.rec.closed)
            .and_then(|o| o.rec.deleg.as_ref())
            .map(|d| d.other.clone())
    });
    if let (Some(d), Some(r)) = (room, st.room_recall.as_mut()) {
        if due(&d) && r.reached.reach(conn, live) {
            r.at = Instant::now().min(r.first + lease);
            if !others.contains(&d) {
                others.push(d);
            }
        }
    }
    others
}

/// The CB_RECALL of delegation `other`.
fn cb_recall(other: &str) -> Value {
    json!({"op": "CB_RECALL", "stateid": stateid_json(other, 1)})
}

/// Revokes a delegation filterd lowered without a recall. A state its
/// client CLOSEd, kept only for the delegation ([`OpenRec::closed`]), is
/// left with no delegation: [`retire_revoked`] closes its handle and
/// deletes its record.
fn revoke(st: &mut State, lease: uuid::Uuid) {
    for o in st.opens.values_mut() {
        if o.rec.deleg.as_ref().is_some_and(|d| d.lease_key == lease) {
            if let Some(d) = o.rec.deleg.take() {
                st.aliases.remove(&d.other);
                st.expired.add(d.other);
            }
            st.revoked_closed |= o.rec.closed;
        }
    }
}

/// Revokes the delegations of client `cid` that filterd lowered without a
/// recall ([`Global::revoked`]) and retires the CLOSEd states they leave
/// ([`retire_revoked`]); only once every such state is retired are they
/// off the list, so an OPEN of their file meanwhile refused by such a
/// state's handle is answered NFS4ERR_DELAY, not NFS4ERR_SHARE_DENIED
/// ([`open_refused`]; re-review rr39d F3: they came off even when the
/// close failed, and the handle went on denying under SHARE_DENIED). Run
/// at the client's next request and by the reaper (within its tick of
/// the revocation, the client idle or not: re-review rr39a A, the handle
/// of a revoked kept delegation denied other clients' opens until its
/// holder's next request). With nothing to settle it takes the global
/// lock once.
fn settle_revocations(sh: &Shared, st: &mut State, cid: &str) {
    let revoked = match sh.global() {
        Ok(g) => g.revoked.get(cid).cloned().unwrap_or_default(),
        Err(_) => return,
    };
    if revoked.is_empty() && !st.revoked_closed {
        return;
    }
    for (lease, _) in &revoked {
        revoke(st, *lease);
    }
    retire_revoked(sh, st);
    if st.revoked_closed || revoked.is_empty() {
        // A close failed: the revocations stay listed (revoking again
        // finds nothing) until it is done.
        return;
    }
    if let Ok(mut g) = sh.global() {
        if let Some(v) = g.revoked.get_mut(cid) {
            v.retain(|l| !revoked.contains(l));
            if v.is_empty() {
                g.revoked.remove(cid);
            }
        }
        let now = Instant::now();
        g.settled
            .extend(revoked.iter().map(|(_, file)| (now, *file)));
    }
}

/// How long an OPEN refused by a revoked delegation's handle is DELAY
/// after the handle was closed ([`Global::settled`]).
const SETTLED_GRACE: Duration = Duration::from_secs(1);

/// A delegation's lease as nfsshim holds it ([`Global::lease_client`]).
#[derive(Clone)]
struct LeaseHolder {
    /// The client.
    cid: String,
    /// The delegation's stateid `other`.
    other: String,
    /// The filter handle whose lease it is.
    handle: ResumeKey,
    /// A write delegation (its lease must keep W too).
    write: bool,
    /// The handle that carried the lease before a move to `handle` whose
    /// commit's outcome is unknown ([`recarry_kept_delegations`]): asked
    /// when `handle` is gone (the commit did not apply and the new handle
    /// was cleaned up), so that `handle`'s absence is not taken for the
    /// lease's (re-review rr39k B2). None once the move is settled.
    was: Option<ResumeKey>,
}

impl LeaseHolder {
    /// The delegation of open state `rec` of client `cid`, by its lease key.
    fn of(cid: &str, rec: &state::OpenRec) -> Option<(uuid::Uuid, LeaseHolder)> {
        let d = rec.deleg.as_ref()?;
        Some((
            d.lease_key,
            LeaseHolder {
                cid: cid.to_owned(),
                other: d.other.clone(),
                handle: d.carrier.unwrap_or(rec.key),
                write: d.write,
                was: None,
            },
        ))
    }
}

/// A break filterd sent for the lease of an OPEN still in flight
/// ([`Global::opening`]): whether one needed an answer, the file, and the
/// state the first began from ([`recall`]'s arguments).
#[derive(Clone, Copy)]
struct EarlyBreak(bool, Option<FileId>, Option<LeaseState>);

/// A recall sent ([`Global::recalled`]).
#[derive(Clone)]
struct Recalled {
    /// The file (None from a daemon older than the event's `file`: any).
    file: Option<FileId>,
    /// The lease's state when its break began (the event's
    /// `current_state`), as filterd told it: what nfsshim acknowledged
    /// itself is taken off when the recall is read ([`recalled_from`]),
    /// not here (None: not told).
    began: Option<LeaseState>,
    /// The connections the CB_RECALL went out on ([`due_recalls`]).
    reached: Reached,
}

/// The connections (ids) a CB_RECALL went out on that are still live
/// ([`Global::conn_peer`]): a request of its client on another one sends
/// it there ([`due_recalls`]), on one it reached already not again — a
/// client using two connections at once (which the spec allows) is not
/// sent every outstanding recall at each switch (re-review rr41c F2).
/// Those gone are forgotten at each look, so it holds at most one entry
/// per live connection (bounded by --max-connections: a session may be
/// used from any address; gone ones stay until the next look) and a
/// recall goes at most once on each; a fixed window of the last four sent
/// every outstanding recall on every request of a client rotating over
/// five connections (re-review rr41g 1).
#[derive(Clone, Default, Debug)]
struct Reached {
    conns: Vec<u64>,
}

impl Reached {
    /// Sent on `conn` (None: sent nowhere, the client had no connection).
    fn on(conn: Option<u64>) -> Self {
        Self {
            conns: conn.into_iter().collect(),
        }
    }

    /// Whether the recall is still to go on `conn`; if so, noted as gone
    /// there. The connections for which `live` is false are forgotten.
    fn reach(&mut self, conn: u64, live: impl Fn(u64) -> bool) -> bool {
        self.conns.retain(|c| live(*c));
        if self.conns.contains(&conn) {
            return false;
        }
        self.conns.push(conn);
        true
    }
}

/// Notes a recall of `lease` sent ([`Global::recalled`]) on connection
/// `conn` (None: on none), its break begun from `began` as filterd told
/// it: nfsshim's own acks are taken off when it is read
/// ([`recalled_from`]), not here.
fn note_recall(
    g: &mut Global,
    lease: uuid::Uuid,
    file: Option<FileId>,
    began: Option<LeaseState>,
    conn: Option<u64>,
) {
    let reached = Reached::on(conn);
    g.recalled.insert(
        lease,
        Recalled {
            file,
            began,
            reached,
        },
    );
}

/// The state recall `r` of lease `lease` counts as begun from: its
/// break's ([`Recalled::began`]) lowered by what nfsshim acknowledged of
/// the lease itself ([`Global::own_acked`]) as that mark is now. With no
/// break in progress, a lease below it was lowered by filterd at the break
/// timeout, not acknowledged (None: not told; the delegation's own promise
/// is the measure then). Worked out when read, so that the mark's removal
/// (the lease raised again, [`recarry_kept_delegations`]) and its undo
/// ([`OwnAckMark::undo_if_refused`]) reach a recall recorded before them:
/// re-review rr40a E1, the recall kept the mark's state, and an H break
/// handled between filterd's raise of the lease and the mark's removal, or
/// before a refused ack's undo, began from R; its timeout's R lease looked
/// kept and a deny-read OPEN refused by the kept handle was
/// NFS4ERR_SHARE_DENIED.
fn recalled_from(g: &Global, lease: uuid::Uuid, r: &Recalled) -> Option<LeaseState> {
    let acked = g.own_acked.get(&lease).copied();
    r.began.map(|f| acked.map_or(f, |a| f.and(a)))
}

/// nfsshim acknowledges `state` of delegation lease `lease` itself (its
/// DELEGRETURN, its client's own namespace change): the state a recall of
/// it counts as begun from comes down with it ([`recalled_from`]), so
/// that the lowering is not taken for filterd's at the break timeout
/// ([`recall_now`]).
///
/// Marked before the ack is sent (its break event may reach [`recall`]
/// first); what it returns undoes the mark
/// ([`OwnAckMark::undo_if_refused`]) when filterd refuses the ack outright
/// (re-review rr39l).
fn mark_own_ack(sh: &Shared, lease: uuid::Uuid, state: LeaseState) -> OwnAckMark {
    match sh.global() {
        Ok(mut g) => OwnAckMark::new(&mut g, lease, state),
        Err(_) => OwnAckMark { lease, acked: None },
    }
}

/// What [`mark_own_ack`] changed: (before, after).
struct OwnAckMark {
    lease: uuid::Uuid,
    acked: Option<(Option<LeaseState>, LeaseState)>,
}

impl OwnAckMark {
    /// Marks `state` of `lease` acknowledged in `g` ([`mark_own_ack`]).
    fn new(g: &mut Global, lease: uuid::Uuid, state: LeaseState) -> OwnAckMark {
        // Also when no recall is recorded yet: its break event may still
        // be on its way to [`recall`].
        let before = g.own_acked.get(&lease).copied();
        let now = before.map_or(state, |a| a.and(state));
        g.own_acked.insert(lease, now);
        OwnAckMark {
            lease,
            acked: Some((before, now)),
        }
    }

    /// The ack this mark announced did not happen: filterd refused it
    /// with a definite code other than "no longer held" (a lease gone
    /// keeps the mark, harmlessly). Left marked, every later recall of
    /// the lease would take the unacked bits for acknowledged and never
    /// for filterd's lowering at the break timeout (re-review rr39l). A
    /// value changed since (another ack) is left as it is.
    fn undo_if_refused(self, sh: &Shared, e: &ClientError) {
        match e.code() {
            None | Some(ErrorCode::NoSuchHandle) => return,
            Some(_) => {}
        }
        if let Ok(mut g) = sh.global() {
            self.undo(&mut g);
        }
    }

    /// Takes the mark back in `g`, unless another ack changed it since.
    fn undo(self, g: &mut Global) {
        if let Some((before, after)) = self.acked {
            if g.own_acked.get(&self.lease) == Some(&after) {
                match before {
                    Some(b) => g.own_acked.insert(self.lease, b),
                    None => g.own_acked.remove(&self.lease),
                };
            }
        }
    }
}

/// What became of a recalled delegation's lease, as filterd tells now.
#[derive(Debug, PartialEq, Eq)]
enum RecallNow {
    /// Its break is still in progress.
    Breaking,
    /// Lowered (at the break timeout) below what the delegation promised,
    /// or gone.
    Lowered,
    /// Still granting what the delegation promised, no break in progress.
    Kept,
}

/// Asks filterd (one Handle call) about recalled lease `lease` held by
/// `held`, recalled from state `from` ([`recalled_from`]); None when
/// filterd could not tell. With no break in progress, a lease below
/// `from` is lowered: nfsshim acknowledges a recall only by DELEGRETURN
/// (marked, [`mark_own_ack`]), so it was filterd's lowering at the break
/// timeout, whose revocation event may not have been handled yet
/// (re-review rr39i 2: a read delegation's RH break to R timed out to R,
/// which still has R, and counted as kept: another client's OPEN that
/// the handle refused was NFS4ERR_SHARE_DENIED).
fn recall_now(
    sh: &Shared,
    lease: uuid::Uuid,
    held: &LeaseHolder,
    from: Option<LeaseState>,
) -> Option<RecallNow> {
    match sh.filter.client().call(Request::Handle {
        key: held.handle,
        learning: false,
    }) {
        Ok((libfilter::proto::Reply::Handle(v), _)) => {
            if v.breaking.is_some() {
                return Some(RecallNow::Breaking);
            }
            let keeps = v.record.lease.is_some_and(|l| {
                l.key.0 == lease
                    && l.state.contains(LeaseState::R)
                    && (!held.write || l.state.contains(LeaseState::W))
                    && from.is_none_or(|f| l.state.contains(f))
            });
            Some(if keeps {
                RecallNow::Kept
            } else {
                RecallNow::Lowered
            })
        }
        Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => match held.was {
            // A move's handle gone, its commit's outcome unknown: the
            // lease may still be the one before's.
            Some(was) => {
                let before = LeaseHolder {
                    handle: was,
                    was: None,
                    ..held.clone()
                };
                recall_now(sh, lease, &before, from)
            }
            None => Some(RecallNow::Lowered),
        },
        _ => None,
    }
}

/// The recalls outstanding for a delegation of `file` (an entry of an
/// unknown file, from a daemon older than the event's `file`, is of any):
/// lease key, holder and the state recalled from.
fn recalls_of(
    g: &Global,
    file: Option<FileId>,
) -> Vec<(uuid::Uuid, LeaseHolder, Option<LeaseState>)> {
    g.recalled
        .iter()
        .filter(|(_, r)| r.file.is_none() || file.is_none() || r.file == file)
        .filter_map(|(l, r)| {
            let held = g.lease_client.get(l)?.clone();
            Some((*l, held, recalled_from(g, *l, r)))
        })
        .collect()
}

/// An OPEN of `file` was granted while a delegation of it was being
/// recalled: filterd grants it once the break timeout lowered the lease,
/// and queues the revocation's event after that commit, but nfsshim
/// hears of it on its events thread, maybe after this OPEN's answer — and
/// meanwhile the delegation's holder would still be served under it (a
/// READ answered NFS4_OK after a conflicting OPEN was granted: re-review
/// rr39d, the flake of
/// `a_delegation_kept_past_close_is_restored_and_revoked_at_the_recall_timeout`).
/// So before the answer, filterd is asked about each such lease (one
/// Handle call, only then), and one it lowered is revoked here as its
/// event would ([`recall`] without an ack), which the event later finds
/// done. Nothing outstanding: no call.
fn settle_recalls(sh: &Shared, file: FileId) {
    let recalls = match sh.global() {
        Ok(g) if !g.recalled.is_empty() => recalls_of(&g, Some(file)),
        _ => return,
    };
    for (lease, held, from) in recalls {
        if recall_now(sh, lease, &held, from) == Some(RecallNow::Lowered) {
            recall(sh, LeaseKey(lease), false, Some(file), None);
        }
    }
}

/// `e`, filterd's refusal of an OPEN of `path`, as the OPEN's answer: a
/// sharing violation while a delegation of that very file is being
/// recalled (filterd revokes it at its break timeout, and may refuse an
/// open by its handle before nfsshim hears of that), or while a revoked
/// delegation's handle on it is yet to be closed ([`settle_revocations`]),
/// is NFS4ERR_DELAY — the handle goes within the reaper's tick of the
/// revocation, and the re-send is granted — not NFS4ERR_SHARE_DENIED. Only
/// for that file (its id asked of filterd once, only when some recall or
/// revocation is outstanding), and a recall only while filterd says its
/// break is in progress or its lease was lowered (revoked here then):
/// re-review rr39d F1, any sharing violation anywhere was DELAY while any
/// recall or revocation was outstanding, for up to the NFS lease.
fn open_refused(ctx: &Ctx<'_>, path: &RelPath, e: ClientError) -> Fail {
    let sh = ctx.sh;
    if e.code() != Some(ErrorCode::SharingViolation) {
        return filter_fail(e);
    }
    let pending = sh.global().is_ok_and(|g| {
        g.recalled.keys().any(|l| g.lease_client.contains_key(l))
            || g.revoked.values().any(|v| !v.is_empty())
            || g.settled.iter().any(|(at, _)| at.elapsed() < SETTLED_GRACE)
    });
    if !pending {
        return filter_fail(e);
    }
    // Not told which file (filterd could not reach it): as if this one.
    let file = match file_at(ctx, path) {
        AtName::File(f) => Some(f),
        AtName::Nothing => return filter_fail(e),
        AtName::Unknown => None,
    };
    let (recalls, revoked) = match sh.global() {
        Ok(g) => (
            recalls_of(&g, file),
            g.revoked
                .values()
                .flatten()
                .map(|(_, f)| f)
                .chain(
                    g.settled
                        .iter()
                        .filter(|(at, _)| at.elapsed() < SETTLED_GRACE)
                        .map(|(_, f)| f),
                )
                .any(|f| f.is_none() || file.is_none() || *f == file),
        ),
        Err(_) => return filter_fail(e),
    };
    let mut settling = revoked;
    for (lease, held, from) in recalls {
        match recall_now(sh, lease, &held, from) {
            Some(RecallNow::Kept) => {}
            Some(RecallNow::Lowered) => {
                recall(sh, LeaseKey(lease), false, file, None);
                settling = true;
            }
            Some(RecallNow::Breaking) | None => settling = true,
        }
    }
    if settling {
        return Fail(
            "NFS4ERR_DELAY",
            format!("{e}; a delegation of the file is being recalled or its handle closed"),
        );
    }
    filter_fail(e)
}

/// The states a client CLOSEd whose delegation went ([`revoke`]): each
/// one's handle is closed in the commit that deletes its record, and only
/// then does the state leave memory. One whose close fails stays, still
/// naming its handle, and is tried again at the reaper's next tick or the
/// client's next request ([`settle_revocations`]; its release closes it
/// with the others). Re-review
/// D4: the record was deleted whatever the close did, so a handle whose
/// close failed was named by nothing and held its file until its timeout.
fn retire_revoked(sh: &Shared, st: &mut State) {
    if !std::mem::take(&mut st.revoked_closed) {
        return;
    }
    let gone: Vec<(String, ResumeKey, u64, String)> = st
        .opens
        .iter()
        .filter(|(_, o)| o.rec.closed && o.rec.deleg.is_none())
        .map(|(k, o)| (k.clone(), o.rec.key, o.num, o.clientid.clone()))
        .collect();
    for (other, key, num, cid) in gone {
        let retired = state::scope(&sh.tables.states(&cid)).and_then(|scope| {
            match sh
                .filter
                .close_recording(key, Vec::new(), vec![(scope.clone(), num)])
            {
                // Closed already: the record alone.
                Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {
                    sh.filter.client().delete_record(scope, num)
                }
                r => r,
            }
        });
        if let Err(e) = retired {
            if st
                .retire_failed_said
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
            {
                eprintln!(
                    "nfsshim: closing handle {key} of a revoked delegation's closed open: {e}; \
                     trying again (said once a minute)"
                );
                st.retire_failed_said = Some(Instant::now());
            }
            st.revoked_closed = true;
            continue;
        }
        st.opens.remove(&other);
        if let Ok(mut g) = sh.global() {
            g.handle_client.remove(&key);
            g.lock_owner.remove(&key);
        }
    }
    if !st.revoked_closed {
        st.retire_failed_said = None;
    }
}

/// Releases the state of clients whose lease lapsed.
fn reaper(sh: Arc<Shared>) {
    let mut was_ready = true;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        // Never on a state a reload is replacing ([`reload`]).
        let _serving = sh.serving.read().unwrap_or_else(|p| p.into_inner());
        // The tick's filterd calls go on the connection the check below
        // found ready, as a request's do ([`handle_line`]): lost
        // meanwhile, a release fails (and is tried again at a later
        // tick, on memory the reattach read again if it had to) rather
        // than delete, on the daemon of a later reattach — after a
        // fail-back, on tables another node's nfsshim served — the
        // records of a client this stale memory found lapsed, who
        // renewed there.
        let _pin = sh.filter.pin();
        if sh.reload_due.load(Ordering::Acquire) {
            continue;
        }
        // First, and even while filterd is away: it never waits.
        sh.replays.flush(&sh.filter.client());
        if let Ok(mut g) = sh.global() {
            // Ten minutes at least after the give-back failed.
            let keep = (sh.lease * 2).max(Duration::from_secs(600));
            g.giving_back
                .retain(|_, failed| failed.is_none_or(|t| t.elapsed() < keep));
            let g = &mut *g;
            // Kept while the delegation is: filterd's break timeout may be
            // longer than the NFS lease, and until it fires the masking
            // and the inline revocation need the entry (re-review rr39i
            // 5: it went a lease after the recall).
            let held = &g.lease_client;
            g.recalled.retain(|l, _| held.contains_key(l));
            g.own_acked.retain(|l, _| held.contains_key(l));
            g.settled.retain(|(at, _)| at.elapsed() < SETTLED_GRACE);
        }
        let Ok(clients) = sh.global().map(|g| {
            g.clients
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        }) else {
            return;
        };
        // Not while filterd is away or nfsshim has not caught up with its
        // reattach: a release then could not reach filterd (and time
        // filterd was away does not count against a lease).
        if !sh.filter.io_ready() || sh.stepped_down.load(Ordering::Acquire) {
            was_ready = false;
            continue;
        }
        let now = Instant::now();
        if !std::mem::replace(&mut was_ready, true) {
            // Back: every lease runs afresh, as after a restart.
            for (_, cl) in &clients {
                // (One with a request running renews its lease itself.)
                if let Ok(mut st) = cl.try_lock() {
                    if let Some(c) = st.client.as_mut() {
                        c.deadline = c.deadline.max(now + sh.lease);
                    }
                }
            }
        }
        for (cid, cl) in clients {
            // A client with a request running is alive; look next time.
            let Ok(mut st) = cl.try_lock() else { continue };
            // Revoked delegations' handles go now, not at the client's
            // next request: they deny others' opens until then.
            settle_revocations(&sh, &mut st, &cid);
            if st.client.as_ref().is_some_and(|c| c.deadline <= now) {
                if !st.releasing {
                    eprintln!("nfsshim: client {cid} let its lease lapse; releasing its state");
                }
                test_hold_while("release", "a lapsed client's release");
                // Kept, marked, and tried again next time if it fails.
                if let Err(Fail(_, e)) = release_client(&sh, &mut st, &cid) {
                    eprintln!("nfsshim: releasing client {cid}: {e}; trying again");
                }
            }
        }
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;
    use libfilter::proto::WireError;

    /// A data sync that fails (WRITE's, COMMIT's) is classed by errno as
    /// pread and pwrite failures are: COMMIT made every one SERVERFAULT.
    /// `fdatasync` of a pipe fails with EINVAL.
    #[test]
    fn a_failed_data_sync_is_classed_by_errno() {
        let (r, _w) = std::io::pipe().unwrap();
        let file = shimline::datasync::SyncedFile::from(std::fs::File::from(
            std::os::fd::OwnedFd::from(r),
        ));
        let Err(Fail(status, _)) = sync_written(&file) else {
            panic!("fdatasync of a pipe succeeded");
        };
        assert_eq!(status, "NFS4ERR_INVAL");
    }

    pub(super) fn refused(code: ErrorCode) -> ClientError {
        ClientError::Refused(WireError::new(code, "refused"))
    }

    /// A chore the events thread computed from memory runs only while
    /// requests would, and never once a reload has begun since it was
    /// computed: it would act, on the connection of a later reattach, on
    /// what stale memory said (after a fail-back, on tables another
    /// node's nfsshim served); the reload's restore does what is still to
    /// do. Nor is it dropped for waiting: a chore held back runs once
    /// ready on the memory it was computed from.
    #[test]
    fn a_chore_computed_before_a_reload_is_left_to_the_restore() {
        assert_eq!(chore_gate(3, 3, true), None);
        assert_eq!(chore_gate(3, 3, false), Some(ChoreRun::Later));
        assert_eq!(chore_gate(3, 4, true), Some(ChoreRun::Stale));
        assert_eq!(chore_gate(3, 4, false), Some(ChoreRun::Stale));
    }

    /// Re-review rrpin2 C: a request's chores stop at the first one that
    /// cannot be done now, and it and every later one, in order, go to
    /// the chores thread (they were dropped, a close lost with the
    /// connection leaving a handle attached that nothing named).
    #[test]
    fn chores_not_done_now_go_on_in_order() {
        let mut ran = Vec::new();
        let left = chores_in_order([1, 2, 3, 4], |c| {
            ran.push(*c);
            *c != 2
        });
        assert_eq!(ran, vec![1, 2]);
        assert_eq!(left, vec![2, 3, 4]);
        assert!(chores_in_order([1, 2], |_| true).is_empty());
    }

    /// Re-review rrpin2 C, D, E: a chore's failure is classified once: its
    /// connection lost, tried again after the reattach; a timeout or a
    /// refusal that may pass, tried again a few times with backoff (it
    /// counted as done, the close or give-back lost for good); anything
    /// else for good.
    #[test]
    fn a_chore_failed_for_a_passing_cause_is_tried_again() {
        use ChoreFailure::*;
        let timeout = ClientError::Timeout(Duration::from_secs(1));
        assert_eq!(chore_failure(&ClientError::Disconnected, false), Lost);
        assert_eq!(chore_failure(&refused(ErrorCode::Busy), true), Lost);
        assert_eq!(chore_failure(&timeout, true), Lost);
        assert_eq!(chore_failure(&timeout, false), Passing);
        for code in [
            ErrorCode::Busy,
            ErrorCode::Retry,
            ErrorCode::LimitReached,
            ErrorCode::FileNotAvailable,
            ErrorCode::DiskFull,
        ] {
            assert_eq!(chore_failure(&refused(code), false), Passing, "{code:?}");
        }
        for code in [
            ErrorCode::NoSuchHandle,
            ErrorCode::Internal,
            ErrorCode::NotOwner,
        ] {
            assert_eq!(chore_failure(&refused(code), false), ForGood, "{code:?}");
        }
    }

    /// Re-review rrpin2 D: a chore failing for a passing cause is tried
    /// a bounded number of times, waiting longer each time, never less
    /// than the chores thread's poll (it never spins); re-review rr42c
    /// F2: one timing out (each try waits out the call's timeout, the
    /// queue behind it waiting) only twice.
    #[test]
    fn a_chore_is_tried_again_a_bounded_number_of_times_with_backoff() {
        let waits: Vec<Duration> = (1..).map_while(|t| chore_retry(t, false)).collect();
        assert_eq!(waits.len() + 1, CHORE_TRIES as usize);
        assert!(waits.windows(2).all(|w| w[0] < w[1]), "{waits:?}");
        assert!(waits.iter().all(|w| *w >= CHORE_WAIT), "{waits:?}");
        assert_eq!(chore_retry(CHORE_TRIES, false), None);
        assert!(chore_retry(1, true).is_some_and(|w| w >= CHORE_WAIT));
        assert_eq!(chore_retry(2, true), None);
        assert_eq!(CHORE_TIMEOUT_TRIES, 2);
    }

    /// The chores of an open whose handle k0 went, with other handles
    /// `k1` and `k2`, and a chore of another open behind them.
    fn open_gone_queue(k1: ResumeKey, k2: ResumeKey, other: ResumeKey) -> Vec<Chore> {
        let k0 = ResumeKey::new_random();
        let mut q = open_gone_chores("s".into(), "c", 7, &[k0, k1, k2], k0);
        q.push(close(other));
        q
    }

    /// The close of handle `k` of client "c".
    fn close(k: ResumeKey) -> Chore {
        Chore::Close(k, "c".into())
    }

    /// A fake chores queue for [`run_chore_queue`], on a fake clock: each
    /// chore comes in at its time; a wait for the next chore passes the
    /// time waited, or until it comes; one for ever with none left ends
    /// the run.
    struct FakeQueue<'a> {
        todo: std::collections::VecDeque<(Instant, Chore)>,
        clock: &'a std::cell::Cell<Instant>,
    }

    impl ChoreSource for FakeQueue<'_> {
        fn next_chore(&mut self, wait: Option<Duration>) -> Result<Option<(u64, Chore)>, ()> {
            let now = self.clock.get();
            if let Some(&(at, _)) = self.todo.front() {
                if wait.is_none_or(|w| at <= now + w) {
                    self.clock.set(now.max(at));
                    return Ok(self.todo.pop_front().map(|(_, c)| (0, c)));
                }
            }
            let wait = wait.ok_or(())?;
            self.clock.set(now + wait);
            Ok(None)
        }
    }

    /// One try on the fake chores queue ([`run_timed_chores`]): when
    /// (since the start), the chore, whether it waited for its client's
    /// lock, and what came of it.
    pub(super) type TimedTry = (Duration, Chore, bool, ChoreRun);

    /// Runs `todo`, each chore coming in at its time since the start, as
    /// the chores thread does, on a fake clock, each chore's try answered
    /// by `answer` (given the chore, how many times it ran before,
    /// whether to wait for its client's lock, and the time since the
    /// start) with what came of it and the time it took: the tries made,
    /// in order, and the chores given up.
    pub(super) fn run_timed_chores(
        todo: Vec<(Duration, Chore)>,
        mut answer: impl FnMut(&Chore, usize, bool, Duration) -> (ChoreRun, Duration),
    ) -> (Vec<TimedTry>, Vec<Chore>) {
        let start = Instant::now();
        let clock = std::cell::Cell::new(start);
        let mut tries: Vec<TimedTry> = Vec::new();
        let mut given_up = Vec::new();
        run_chore_queue(
            FakeQueue {
                todo: todo.into_iter().map(|(at, c)| (start + at, c)).collect(),
                clock: &clock,
            },
            |_, c, wait_for_lock| {
                let at = clock.get() - start;
                let before = tries.iter().filter(|t| t.1 == *c).count();
                let (r, took) = answer(c, before, wait_for_lock, at);
                clock.set(clock.get() + took);
                tries.push((at, c.clone(), wait_for_lock, r));
                assert!(tries.len() < 1000, "it spins: {tries:?}");
                Some(r)
            },
            |c| given_up.push(c.clone()),
            |d| {
                assert!(d >= CHORE_WAIT, "{d:?}");
                clock.set(clock.get() + d);
            },
            || clock.get(),
        );
        (tries, given_up)
    }

    /// Runs `todo` as the chores thread does, each chore's try answered
    /// by `answer` (given the chore, how many times it ran before, and
    /// whether to wait for its client's lock), at once: the tries made,
    /// in order, and the chores given up.
    pub(super) fn run_fake_chores(
        todo: Vec<Chore>,
        mut answer: impl FnMut(&Chore, usize, bool) -> ChoreRun,
    ) -> (Vec<Chore>, Vec<Chore>) {
        let todo = todo.into_iter().map(|c| (Duration::ZERO, c)).collect();
        let (tries, given_up) = run_timed_chores(todo, |c, before, w, _| {
            (answer(c, before, w), Duration::ZERO)
        });
        (tries.into_iter().map(|t| t.1).collect(), given_up)
    }

    /// Re-review rr42c F1: on the chores thread, a close given up (still
    /// refused after its tries, put back at the end of the queue and
    /// tried again there a few times) or failed for good other than as
    /// closed already drops its open's delete, so that the record goes
    /// on naming a gone handle (the restore closes the handle left) — the
    /// delete ran anyway, and the handle stayed attached for nobody; the
    /// chores behind still run, before the close put back. A close that
    /// finds its handle closed already lets the delete run.
    #[test]
    fn a_close_given_up_on_the_chores_thread_drops_its_opens_delete() {
        let (k1, k2, other) = (
            ResumeKey::new_random(),
            ResumeKey::new_random(),
            ResumeKey::new_random(),
        );
        for (k2_run, delete_runs) in [
            (ChoreRun::Retry { timed_out: false }, false),
            (ChoreRun::Retry { timed_out: true }, false),
            (ChoreRun::Failed, false),
            (ChoreRun::Done, true),
        ] {
            let (ran, given_up) =
                run_fake_chores(open_gone_queue(k1, k2, other), |c, _, _| match c {
                    Chore::Close(k, _) if *k == k2 => k2_run,
                    _ => ChoreRun::Done,
                });
            let deleted = ran.iter().any(|c| matches!(c, Chore::DeleteState { .. }));
            assert_eq!(deleted, delete_runs, "{k2_run:?}: {ran:?}");
            assert!(ran.contains(&close(other)), "{k2_run:?}");
            assert!(ran.contains(&close(k1)), "{k2_run:?}");
            let tries = ran.iter().filter(|c| **c == close(k2)).count();
            match k2_run {
                ChoreRun::Retry { timed_out } => {
                    // A close whose tries timed out is not put back
                    // (re-review rr42g R3): each try costs the call
                    // timeout, which the chores behind would wait out at
                    // every round.
                    let (first, rounds) = if timed_out {
                        (CHORE_TIMEOUT_TRIES, 0)
                    } else {
                        (CHORE_TRIES, CHORE_ROUNDS)
                    };
                    assert_eq!(tries, (first + rounds) as usize, "{k2_run:?}");
                    assert_eq!(given_up, vec![close(k2)]);
                    // The chores behind it did not wait for its rounds.
                    let other_at = ran.iter().position(|c| *c == close(other));
                    assert_eq!(other_at, Some(first as usize + 2), "{ran:?}");
                }
                _ => {
                    assert_eq!(tries, 1, "{k2_run:?}");
                    assert!(given_up.is_empty());
                }
            }
        }
    }

    /// Re-review rr42c F1: a close put back at the end of the chores
    /// queue that is done there lets its open's delete run, after it.
    #[test]
    fn a_close_put_back_and_done_lets_its_opens_delete_run_after_it() {
        let (k1, k2, other) = (
            ResumeKey::new_random(),
            ResumeKey::new_random(),
            ResumeKey::new_random(),
        );
        let (ran, given_up) =
            run_fake_chores(open_gone_queue(k1, k2, other), |c, before, _| match c {
                Chore::Close(k, _) if *k == k2 && before < CHORE_TRIES as usize + 1 => {
                    ChoreRun::Retry { timed_out: false }
                }
                _ => ChoreRun::Done,
            });
        assert!(given_up.is_empty(), "{given_up:?}");
        let last_close = ran.iter().rposition(|c| *c == close(k2));
        let delete = ran
            .iter()
            .position(|c| matches!(c, Chore::DeleteState { .. }));
        assert!(last_close < delete && delete.is_some(), "{ran:?}");
        assert_eq!(
            ran.iter()
                .filter(|c| matches!(c, Chore::DeleteState { .. }))
                .count(),
            1
        );
    }

    /// A close the chores thread gives up is put back a bounded number
    /// of times, waiting longer each time, never less than its poll.
    #[test]
    fn a_close_is_put_back_a_bounded_number_of_times() {
        let waits: Vec<Duration> = (1..).map_while(chore_put_back).collect();
        assert_eq!(waits.len(), CHORE_ROUNDS as usize);
        assert!(waits.windows(2).all(|w| w[0] < w[1]), "{waits:?}");
        assert!(waits.iter().all(|w| *w >= CHORE_WAIT), "{waits:?}");
    }

    /// Re-review rr42c F1, on a request's thread: a close failed for good
    /// other than as closed already (no such handle, not ours) drops its
    /// open's delete; one refused for a passing cause leaves it and the
    /// rest, in order, to the chores thread.
    #[test]
    fn a_close_failed_on_a_requests_thread_drops_its_opens_delete() {
        let (k1, k2, other) = (
            ResumeKey::new_random(),
            ResumeKey::new_random(),
            ResumeKey::new_random(),
        );
        for (code, delete_runs) in [
            (ErrorCode::Internal, false),
            (ErrorCode::NoSuchHandle, true),
            (ErrorCode::NotOwner, false),
        ] {
            let mut ran = Vec::new();
            let left = run_chores_here(open_gone_queue(k1, k2, other), |c| {
                ran.push(c.clone());
                match c {
                    Chore::Close(k, _) if *k == k2 => ChoreOutcome::Failed(refused(code)),
                    _ => ChoreOutcome::Done,
                }
            });
            assert!(left.is_empty(), "{code:?}: {left:?}");
            let deleted = ran.iter().any(|c| matches!(c, Chore::DeleteState { .. }));
            assert_eq!(deleted, delete_runs, "{code:?}: {ran:?}");
            assert_eq!(ran.last(), Some(&close(other)), "{code:?}");
        }
        let q = open_gone_queue(k1, k2, other);
        let left = run_chores_here(q.clone(), |c| match c {
            Chore::Close(k, _) if *k == k2 => ChoreOutcome::Passing(refused(ErrorCode::Busy)),
            _ => ChoreOutcome::Done,
        });
        assert_eq!(left, q[2..].to_vec());
        // k1's close failed for good here, k2's is handed over: the
        // delete goes with it no more (re-review rr42g R1: the chores
        // thread made k2's close and then the delete).
        let left = run_chores_here(q.clone(), |c| match c {
            Chore::Close(k, _) if *k == k1 => ChoreOutcome::Failed(refused(ErrorCode::Internal)),
            Chore::Close(k, _) if *k == k2 => ChoreOutcome::Passing(refused(ErrorCode::Busy)),
            _ => ChoreOutcome::Done,
        });
        assert_eq!(left, vec![close(k2), close(other)], "{left:?}");
    }

    /// Re-review rrpin2 B: an open state whose handle went away closes
    /// its other handles before its record is deleted, so that what a
    /// lost connection leaves undone is a record naming a gone handle
    /// (the restore drops the open whole), never a handle no record names
    /// (kept while its client is live). Re-review rr42g R4: the handle
    /// that went is closed too, first, and the delete waits for it: lost
    /// only from the attachment, filterd held it disconnected, and a
    /// restore within its timeout brought the open back.
    #[test]
    fn an_open_gone_closes_its_handles_before_its_record_goes() {
        let (a, b, c) = (
            ResumeKey::new_random(),
            ResumeKey::new_random(),
            ResumeKey::new_random(),
        );
        let delete = Chore::DeleteState {
            scope: "s".into(),
            cid: "c".into(),
            num: 7,
            after: vec![b, a, c],
        };
        assert_eq!(
            open_gone_chores("s".into(), "c", 7, &[a, b, c], b),
            vec![close(b), close(a), close(c), delete]
        );
        assert_eq!(
            open_gone_chores("s".into(), "c", 7, &[a], a),
            vec![
                close(a),
                Chore::DeleteState {
                    scope: "s".into(),
                    cid: "c".into(),
                    num: 7,
                    after: vec![a]
                }
            ]
        );
    }

    /// Re-review rr42g R4, R5: a close refused as not this connection's
    /// (filterd holds the handle disconnected: lost only from the
    /// attachment) resumes the handle and closes it; a resume refused for
    /// good leaves the close's refusal (not closed: its open's record
    /// stays), one that may pass its own (tried again).
    #[test]
    fn a_close_of_a_disconnected_handle_resumes_it_first() {
        use std::cell::Cell;
        let closes = Cell::new(0);
        let attached = Cell::new(false);
        let close = || {
            closes.set(closes.get() + 1);
            if attached.get() {
                Ok(())
            } else {
                Err(refused(ErrorCode::NotOwner))
            }
        };
        let r = close_or_resume(close, || {
            attached.set(true);
            Ok(())
        });
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(closes.get(), 2);
        attached.set(false);
        let r = close_or_resume(close, || Err(refused(ErrorCode::NoSuchHandle)));
        assert_eq!(r.err().and_then(|e| e.code()), Some(ErrorCode::NotOwner));
        let r = close_or_resume(close, || Err(refused(ErrorCode::Busy)));
        assert_eq!(r.err().and_then(|e| e.code()), Some(ErrorCode::Busy));
        // A close done, or refused otherwise, resumes nothing.
        for answer in [None, Some(ErrorCode::NoSuchHandle)] {
            let r = close_or_resume(
                || answer.map_or(Ok(()), |c| Err(refused(c))),
                || panic!("resumed"),
            );
            assert_eq!(r.err().and_then(|e| e.code()), answer);
        }
    }

    /// Re-review rrpin2 A: a resume on a pinned connection that is lost
    /// (a reload's restore, filterd gone again) fails the restore at once,
    /// the open kept; unpinned (a start) it is waited for, as a refusal
    /// that may pass, and a refusal for good is one whatever the
    /// connection.
    #[test]
    fn a_resume_on_a_lost_pinned_connection_fails_the_restore_at_once() {
        let lost = ClientError::Disconnected;
        assert_eq!(resume_refusal(&lost, false, true), ResumeRefusal::Lost);
        assert_eq!(resume_refusal(&lost, true, true), ResumeRefusal::Lost);
        assert_eq!(resume_refusal(&lost, false, false), ResumeRefusal::Passing);
        let busy = refused(ErrorCode::Busy);
        assert_eq!(resume_refusal(&busy, false, false), ResumeRefusal::Passing);
        assert_eq!(resume_refusal(&busy, false, true), ResumeRefusal::Lost);
        let gone = refused(ErrorCode::NoSuchHandle);
        assert_eq!(resume_refusal(&gone, false, true), ResumeRefusal::ForGood);
        assert_eq!(resume_refusal(&gone, false, false), ResumeRefusal::ForGood);
        assert_eq!(resume_refusal(&gone, true, false), ResumeRefusal::Passing);
        let internal = refused(ErrorCode::Internal);
        assert_eq!(
            resume_refusal(&internal, false, false),
            ResumeRefusal::ForGood
        );
    }

    /// Re-review rr41e 2: a detach before a reload refused for any cause
    /// but "not this connection's" (`NotOwner`) or "gone"
    /// (`NoSuchHandle`) leaves the handle attached here, and the
    /// restore's resume of it would be refused — dropping the open and
    /// deleting its record: such a refusal fails the reload instead.
    #[test]
    fn only_a_detach_refused_as_not_ours_or_gone_lets_a_reload_go_on() {
        assert!(detach_refusal_harmless(&refused(ErrorCode::NotOwner)));
        assert!(detach_refusal_harmless(&refused(ErrorCode::NoSuchHandle)));
        for code in [ErrorCode::Busy, ErrorCode::DiskFull, ErrorCode::Internal] {
            assert!(!detach_refusal_harmless(&refused(code)), "{code:?}");
        }
        assert!(!detach_refusal_harmless(&ClientError::Timeout(
            Duration::from_secs(1)
        )));
    }

    /// Re-review rr41e 4: a server record that does not decode counts as
    /// another process's (read again), not as nobody's.
    #[test]
    fn an_undecodable_server_record_counts_as_another_process() {
        assert!(!served_by_another(json!({"process": 7}), 7));
        assert!(served_by_another(json!({"process": 8}), 7));
        assert!(served_by_another(json!({"proc": 7}), 7));
        assert!(served_by_another(json!("7"), 7));
    }

    /// Re-review rr41e 3c: a reload failed for a cause that may pass is
    /// tried again before nfsshim exits; one that will not, is not.
    #[test]
    fn a_reload_failed_for_a_passing_cause_is_tried_again() {
        assert!(!reload_error_may_pass(&ClientError::Timeout(
            Duration::from_secs(1)
        )));
        assert!(reload_error_may_pass(&refused(ErrorCode::Busy)));
        assert!(reload_error_may_pass(&refused(ErrorCode::LimitReached)));
        assert!(!reload_error_may_pass(&refused(ErrorCode::NotOwner)));
        assert!(!reload_error_may_pass(&ClientError::Disconnected));
    }

    /// A name a local process kept changing under the open is a retry to
    /// filterd and a DELAY to the client (which re-sends on the same
    /// seqid); before, it was SHARE_DENIED, final to a client.
    #[test]
    fn request_digests_tell_requests_apart() {
        let d = super::request_digest;
        assert_eq!(d("REMOVE", &["a"]), d("REMOVE", &["a"]));
        assert_ne!(d("REMOVE", &["a"]), d("REMOVE", &["b"]));
        assert_ne!(d("REMOVE", &["a"]), d("RENAME", &["a"]));
        assert_ne!(d("RENAME", &["ab", "c"]), d("RENAME", &["a", "bc"]));
    }

    #[test]
    fn a_transient_race_is_delay() {
        assert_eq!(status_of(&refused(ErrorCode::Retry)), "NFS4ERR_DELAY");
        // The same on REMOVE and RENAME: not FILE_OPEN.
        let Fail(s, _) = namespace_fail(refused(ErrorCode::Retry));
        assert_eq!(s, "NFS4ERR_DELAY");
        assert_ne!(FEATURES & libfilter::proto::FEATURE_RETRY_CODE, 0);
    }

    /// A disconnected persistent open holding the file is a real
    /// conflict until it is resumed or expires: SHARE_DENIED, and
    /// FILE_OPEN on REMOVE and RENAME, as a live open's share mode.
    #[test]
    fn a_disconnected_persistent_holder_is_share_denied() {
        for code in [ErrorCode::FileNotAvailable, ErrorCode::SharingViolation] {
            assert_eq!(status_of(&refused(code)), "NFS4ERR_SHARE_DENIED");
            let Fail(s, _) = namespace_fail(refused(code));
            assert_eq!(s, "NFS4ERR_FILE_OPEN");
        }
        // A lease being broken stays a DELAY.
        assert_eq!(status_of(&refused(ErrorCode::Busy)), "NFS4ERR_DELAY");
    }
}

#[cfg(test)]
mod swap_tests {
    use super::*;

    fn open(other: &str, key: ResumeKey, fds: &Arc<Descriptors>) -> Open {
        let (r, _w) = std::io::pipe().unwrap();
        Open {
            rec: OpenRec {
                other: other.to_owned(),
                seqid: 1,
                owner: "o".to_owned(),
                path: "f".to_owned(),
                key,
                access: "read".to_owned(),
                deny: "none".to_owned(),
                locks: Vec::new(),
                deleg: None,
                key_access: None,
                extra: Vec::new(),
                opened: None,
                closed: false,
                group: None,
                gone: false,
            },
            num: 1,
            clientid: "c".to_owned(),
            file: open_file(std::os::fd::OwnedFd::from(r), fds.force()),
            rights: Rights::READ,
            extra: Vec::new(),
            file_key: FileId { dev: 1, ino: 1 },
        }
    }

    /// Client "c"'s state holding open "s1" of handle `own` whose
    /// delegation (lease `lease`) handle `carrier` carries, and `g` as it
    /// names them.
    fn carried(
        fds: &Arc<Descriptors>,
        own: ResumeKey,
        carrier: ResumeKey,
        lease: uuid::Uuid,
    ) -> (State, Global) {
        let mut o = open("s1", own, fds);
        o.rec.extra.push(state::ExtraHandle {
            key: carrier,
            access: "read".into(),
            for_deleg: true,
        });
        let (r, _w) = std::io::pipe().unwrap();
        o.extra.push((
            Rights::READ,
            open_file(std::os::fd::OwnedFd::from(r), fds.force()),
        ));
        o.rec.deleg = Some(DelegRec {
            other: "d1".into(),
            lease_key: lease,
            write: false,
            returning: None,
            survives_close: false,
            carrier: Some(carrier),
        });
        let mut st = State::default();
        let mut g = Global::default();
        let (l, holder) = LeaseHolder::of("c", &o.rec).unwrap();
        g.lease_client.insert(l, holder);
        g.handle_client.insert(own, "c".into());
        g.handle_client.insert(carrier, "c".into());
        st.opens.insert("s1".into(), o);
        (st, g)
    }

    /// Re-review rr42c F3: a handle that only carried an open's
    /// delegation (`for_deleg`) that filterd dropped takes only itself
    /// and the delegation it carried with it, as the restore does; the
    /// open stays with its own handle (the whole open went). Re-review
    /// rr42g R5: it is closed (resumed first if filterd holds it
    /// disconnected): lost only from the attachment, it kept its lease,
    /// and a reload brought back the delegation its client was told was
    /// revoked.
    #[test]
    fn a_gone_delegation_carrier_drops_only_itself_and_its_delegation() {
        let fds = Descriptors::new(8);
        let (own, carrier) = (ResumeKey::new_random(), ResumeKey::new_random());
        let lease = uuid::Uuid::new_v4();
        let (mut st, mut g) = carried(&fds, own, carrier, lease);
        // Not the open's own handle.
        assert_eq!(drop_deleg_carrier(&mut st, &mut g, own), None);
        assert_eq!(
            drop_deleg_carrier(&mut st, &mut g, carrier),
            Some(vec![Chore::Close(carrier, "c".into())])
        );
        let o = st.opens.get("s1").expect("the open stays");
        assert_eq!(o.keys(), vec![own]);
        assert!(o.extra.is_empty());
        assert!(o.rec.deleg.is_none(), "its delegation went with its lease");
        assert!(st.expired.contains("d1"));
        assert!(!st.expired.contains("s1"));
        assert!(!g.lease_client.contains_key(&lease));
        assert_eq!(g.handle_client.keys().collect::<Vec<_>>(), vec![&own]);
    }

    /// Forgetting a handle ([`forget_handle`]'s [`forget_open_of`]) that
    /// only carried an open's delegation takes the carrier's path: the
    /// open stays, and only the carrier is closed, no record deleted;
    /// forgetting the open's own handle then drops the open whole: its
    /// record marked gone, its handle closed (resumed if disconnected),
    /// then its record deleted.
    #[test]
    fn forgetting_a_delegation_carrier_keeps_its_open() {
        let fds = Descriptors::new(8);
        let (own, carrier) = (ResumeKey::new_random(), ResumeKey::new_random());
        let (mut st, mut g) = carried(&fds, own, carrier, uuid::Uuid::new_v4());
        let tables = state::Tables::new(&libfilter::model::InstanceName::new("i").unwrap());
        assert_eq!(
            forget_open_of(&tables, &mut st, &mut g, carrier),
            vec![Chore::Close(carrier, "c".into())]
        );
        assert_eq!(st.opens.get("s1").map(Open::keys), Some(vec![own]));
        assert!(st.expired.contains("d1") && !st.expired.contains("s1"));
        let chores = forget_open_of(&tables, &mut st, &mut g, own);
        // Marked gone first (re-review rr42g R4): a restore finding the
        // record drops the open whole, whatever resumes.
        let Some(Chore::MarkGone {
            scope,
            cid,
            num: 1,
            text,
            keys,
        }) = chores.first()
        else {
            panic!("{chores:?}");
        };
        assert_eq!((scope, cid.as_str()), (&tables.states("c"), "c"));
        assert_eq!(keys, &[own]);
        let marked: OpenRec = serde_json::from_str(text).unwrap();
        assert!(marked.gone && marked.other == "s1" && marked.deleg.is_none());
        assert_eq!(
            chores[1..],
            [
                Chore::Close(own, "c".into()),
                Chore::DeleteState {
                    scope: tables.states("c"),
                    cid: "c".into(),
                    num: 1,
                    after: vec![own],
                }
            ]
        );
        assert!(st.opens.is_empty() && st.expired.contains("s1"));
        assert!(g.handle_client.is_empty());
    }

    /// Re-review rr42g R4: releasing a client closes the handles of its
    /// records kept for the restore (no open in memory), before their
    /// records go with its scope: a handle gone, or not this client's to
    /// resume, is fine; any other failure fails the release (run again).
    #[test]
    fn a_release_closes_the_handles_its_kept_records_name() {
        let fds = Descriptors::new(8);
        let (a, b, c) = (
            ResumeKey::new_random(),
            ResumeKey::new_random(),
            ResumeKey::new_random(),
        );
        let mut kept = open("s2", b, &fds).rec;
        kept.locks.push(lock_rec(c));
        let records = vec![(1, open("s1", a, &fds).rec), (2, kept)];
        let held: HashSet<u64> = [1].into();
        for (answer, ok) in [
            (None, true),
            (Some(ErrorCode::NoSuchHandle), true),
            (Some(ErrorCode::NotOwner), true),
            (Some(ErrorCode::Busy), false),
        ] {
            let mut closed = Vec::new();
            let r = close_kept_records(records.clone(), &held, |k| {
                closed.push(k);
                answer.map_or(Ok(()), |code| Err(status_tests::refused(code)))
            });
            assert_eq!(r.is_ok(), ok, "{answer:?}: {r:?}");
            let all = if ok { vec![b, c] } else { vec![b] };
            assert_eq!(closed, all, "{answer:?}");
        }
    }

    /// Re-review rr43b F1: a kept record still in the form its OPEN
    /// committed it (`key` nil, filterd's answer in `opened`) names its
    /// handle only in `opened`: the release closes that handle, not the
    /// nil key (settled first, as the restore does).
    #[test]
    fn a_release_closes_the_handle_of_an_unsettled_kept_record() {
        let fds = Descriptors::new(8);
        let k = ResumeKey::new_random();
        let rec = unsettled(open("s1", ResumeKey(uuid::Uuid::nil()), &fds).rec, k);
        // As filterd stores it and `state::list` reads it back.
        let text = serde_json::to_string(&rec).unwrap();
        let back: OpenRec = serde_json::from_str(&text).unwrap();
        let mut closed = Vec::new();
        let r = close_kept_records(vec![(1, back)], &HashSet::new(), |key| {
            closed.push(key);
            Ok(())
        });
        assert!(r.is_ok());
        assert_eq!(closed, vec![k], "closed {closed:?}, not the handle {k}");
    }

    /// Record `rec` as an OPEN commits it: its key nil, filterd's answer
    /// (handle `k`) in `opened`.
    fn unsettled(mut rec: OpenRec, k: ResumeKey) -> OpenRec {
        rec.key = ResumeKey(uuid::Uuid::nil());
        rec.opened = Some(libfilter::proto::Opened {
            key: k,
            create_action: libfilter::model::CreateAction::Opened,
            size: 0,
            file: libfilter::model::FileId { dev: 1, ino: 2 },
            durability: libfilter::model::Durability::Persistent { timeout_ms: 1 },
            lease: None,
            locked: false,
        });
        rec
    }

    /// A fake filterd for [`FilterCalls`]: the handles attached to this
    /// connection, those held disconnected (a close refused `NotOwner`,
    /// resumed on asking), the records of the client's open-state table,
    /// and the calls made, in order.
    #[derive(Default)]
    struct FakeFilter {
        attached: RefCell<HashSet<ResumeKey>>,
        disconnected: RefCell<HashSet<ResumeKey>>,
        states: Vec<(u64, OpenRec)>,
        calls: RefCell<Vec<String>>,
    }

    use std::cell::RefCell;

    impl FilterCalls for FakeFilter {
        fn close(&self, k: ResumeKey) -> Result<(), ClientError> {
            self.calls.borrow_mut().push(format!("close {k}"));
            if self.attached.borrow_mut().remove(&k) {
                Ok(())
            } else if self.disconnected.borrow().contains(&k) {
                Err(status_tests::refused(ErrorCode::NotOwner))
            } else {
                Err(status_tests::refused(ErrorCode::NoSuchHandle))
            }
        }
        fn resume(&self, _: &str, k: ResumeKey) -> Result<(), ClientError> {
            self.calls.borrow_mut().push(format!("resume {k}"));
            if self.disconnected.borrow_mut().remove(&k) {
                self.attached.borrow_mut().insert(k);
                Ok(())
            } else {
                Err(status_tests::refused(ErrorCode::NoSuchHandle))
            }
        }
        fn put(&self, scope: &str, num: u64, _: String) -> Result<(), ClientError> {
            self.calls.borrow_mut().push(format!("put {scope}/{num}"));
            Ok(())
        }
        fn exists(&self, _: &str, num: u64) -> Result<bool, ClientError> {
            Ok(self.states.iter().any(|(n, _)| *n == num))
        }
        fn delete(&self, scope: &str, num: u64) -> Result<(), ClientError> {
            self.calls
                .borrow_mut()
                .push(format!("delete {scope}/{num}"));
            Ok(())
        }
        fn give_back(&self, k: LeaseKey) -> Result<(), ClientError> {
            self.calls.borrow_mut().push(format!("give back {}", k.0));
            Ok(())
        }
        fn states(&self, _: &str) -> Result<Vec<(u64, OpenRec)>, ClientError> {
            Ok(self.states.clone())
        }
        fn close_strays_of(&self, _: &str) -> Result<(), ClientError> {
            self.calls.borrow_mut().push("close strays".into());
            Ok(())
        }
        fn drop_states(&self, _: &str) -> Result<(), ClientError> {
            self.calls.borrow_mut().push("drop states".into());
            Ok(())
        }
        fn drop_session(&self, _: &Session) -> Result<(), ClientError> {
            Ok(())
        }
        fn delete_client(&self, _: u64) -> Result<(), ClientError> {
            Ok(())
        }
    }

    /// Re-review rr43b F3 (rr42g R4): releasing a client
    /// ([`release_in_filter`]) closes the handles of its records kept for
    /// the restore (no open in memory holds them) — one held disconnected
    /// resumed first, one named only in an unsettled record's `opened`
    /// (F1) — before their table is dropped; the open in memory's as
    /// before.
    #[test]
    fn releasing_a_client_closes_the_handles_of_its_kept_records() {
        let fds = Descriptors::new(8);
        let (live, kept, lock) = (
            ResumeKey::new_random(),
            ResumeKey::new_random(),
            ResumeKey::new_random(),
        );
        let mut st = State::default();
        st.opens.insert("s1".into(), open("s1", live, &fds));
        let mut rec = unsettled(open("s2", kept, &fds).rec, kept);
        rec.locks.push(lock_rec(lock));
        let f = FakeFilter {
            attached: RefCell::new([live, lock].into()),
            disconnected: RefCell::new([kept].into()),
            // The open in memory's record too: not closed twice.
            states: vec![(1, st.opens["s1"].rec.clone()), (2, rec)],
            ..FakeFilter::default()
        };
        release_in_filter(&f, &st, "c").unwrap();
        assert!(f.attached.borrow().is_empty(), "{:?}", f.calls);
        assert!(f.disconnected.borrow().is_empty(), "{:?}", f.calls);
        assert_eq!(
            f.calls.borrow().last().map(String::as_str),
            Some("drop states")
        );
        let closes = f
            .calls
            .borrow()
            .iter()
            .filter(|c| **c == format!("close {live}"))
            .count();
        assert_eq!(closes, 1, "{:?}", f.calls);
    }

    /// Re-review rr43b F3 (rr42g R4, R5): a chore's close
    /// ([`chore_call`], what [`do_chore`] calls) of a handle filterd holds
    /// disconnected resumes it and closes it; one gone is no-such-handle
    /// (closed anyway, [`closed_anyway`]); the open's mark and delete go
    /// to its record.
    #[test]
    fn a_chores_close_of_a_disconnected_handle_resumes_and_closes_it() {
        let (k, gone) = (ResumeKey::new_random(), ResumeKey::new_random());
        let f = FakeFilter {
            disconnected: RefCell::new([k].into()),
            ..FakeFilter::default()
        };
        chore_call(&f, &Chore::Close(k, "c".into())).unwrap();
        assert!(f.disconnected.borrow().is_empty() && f.attached.borrow().is_empty());
        assert_eq!(
            *f.calls.borrow(),
            [
                format!("close {k}"),
                format!("resume {k}"),
                format!("close {k}")
            ]
        );
        let e = chore_call(&f, &Chore::Close(gone, "c".into())).unwrap_err();
        assert!(closed_anyway(&e), "{e}");
        f.calls.borrow_mut().clear();
        // Re-review rr43c F2: a mark only over a record there (an upsert
        // made a gone record the open's commit never wrote).
        let mark = |num| Chore::MarkGone {
            scope: "s".into(),
            cid: "c".into(),
            num,
            text: "{}".into(),
            keys: vec![k],
        };
        let f = FakeFilter {
            states: vec![(3, open("s1", k, &Descriptors::new(1)).rec)],
            ..f
        };
        chore_call(&f, &mark(4)).unwrap();
        chore_call(&f, &mark(3)).unwrap();
        chore_call(
            &f,
            &Chore::DeleteState {
                scope: "s".into(),
                cid: "c".into(),
                num: 3,
                after: Vec::new(),
            },
        )
        .unwrap();
        assert_eq!(*f.calls.borrow(), ["put s/3", "delete s/3"]);
    }

    /// Re-review rr43b F2: an open gone from memory whose record and
    /// handle a later request took back (a re-sent OPEN at a restored
    /// slot reuses its record number, and filterd's replay reattaches its
    /// handle, still disconnected) is back in memory: its queued chores,
    /// run on the chores thread ([`run_unless_overtaken`]), no longer
    /// close its handle, mark its record gone nor delete it. Not taken
    /// back, they run; F4: the mark not once its client is released or
    /// being released (a record in a dropped table, read by no restore).
    #[test]
    fn an_opens_chores_skip_what_a_later_request_took_back() {
        let fds = Descriptors::new(8);
        let (own, carrier) = (ResumeKey::new_random(), ResumeKey::new_random());
        let tables = state::Tables::new(&libfilter::model::InstanceName::new("i").unwrap());
        let run = |chores: &[Chore], st: Option<&Mutex<State>>, g: &Mutex<Global>| {
            let mut done = Vec::new();
            let (tried, given_up) = status_tests::run_fake_chores(chores.to_vec(), |c, _, w| {
                run_unless_overtaken(c, st, g, w, || {
                    done.push(c.clone());
                    ChoreRun::Done
                })
            });
            assert_eq!(tried, chores, "each tried once");
            assert!(given_up.is_empty());
            done
        };
        let forgotten = || {
            let (mut st, mut g) = carried(&fds, own, carrier, uuid::Uuid::new_v4());
            let chores = forget_open_of(&tables, &mut st, &mut g, own);
            assert_eq!(chores.len(), 4, "{chores:?}");
            (st, g, chores)
        };
        // Not taken back: all run.
        let (mut st, g, chores) = forgotten();
        st.client = Some(client_c());
        let (st, g) = (Mutex::new(st), Mutex::new(g));
        assert_eq!(run(&chores, Some(&st), &g), chores);
        // Taken back: the open in memory again, under the same number,
        // with the same handle.
        let (mut st, mut g, chores) = forgotten();
        st.client = Some(client_c());
        st.opens.insert("s1".into(), open("s1", own, &fds));
        g.handle_client.insert(own, "c".into());
        let (st, g) = (Mutex::new(st), Mutex::new(g));
        // Only the close of the handle the re-send did not take back.
        assert_eq!(chores[2], Chore::Close(carrier, "c".into()));
        assert_eq!(run(&chores, Some(&st), &g), chores[2..3]);
        // Under the same number with another handle (its handle closed
        // before the re-send, opened afresh): the closes run.
        let (mut st, mut g, chores) = forgotten();
        let fresh = ResumeKey::new_random();
        st.client = Some(client_c());
        st.opens.insert("s1".into(), open("s1", fresh, &fds));
        g.handle_client.insert(fresh, "c".into());
        let (st, g) = (Mutex::new(st), Mutex::new(g));
        assert_eq!(run(&chores, Some(&st), &g), chores[1..3]);
        // Re-review rr43c F2: under another number with the same handle
        // (a re-send whose first try's commit did not land: a new number,
        // the same create GUID, its handle reattached): no mark (it wrote
        // a gone record naming the live open's handle), no delete, only
        // the close of the handle it did not take back.
        let (mut st, mut g, chores) = forgotten();
        st.client = Some(client_c());
        let mut again = open("s9", own, &fds);
        again.num = 7;
        st.opens.insert("s9".into(), again);
        g.handle_client.insert(own, "c".into());
        let (st, g) = (Mutex::new(st), Mutex::new(g));
        assert_eq!(run(&chores, Some(&st), &g), chores[2..3]);
        // Released (gone from the clients), or being released: no mark.
        let (_, g, chores) = forgotten();
        assert_eq!(run(&chores, None, &Mutex::new(g)), chores[1..]);
        let (mut st, g, chores) = forgotten();
        st.client = Some(client_c());
        st.releasing = true;
        assert_eq!(
            run(&chores, Some(&Mutex::new(st)), &Mutex::new(g)),
            chores[1..]
        );
    }

    /// Holds `m` from a thread of `s` (not the test's own: a chores
    /// thread that waited for the lock then fails rather than hangs)
    /// until told through the sender returned, then `delay` more; 10 s at
    /// most. Returns once held.
    fn hold_from<'s>(
        s: &'s std::thread::Scope<'s, '_>,
        m: &'s Mutex<State>,
        delay: Duration,
    ) -> (
        std::sync::mpsc::Sender<()>,
        std::thread::ScopedJoinHandle<'s, ()>,
    ) {
        let (release, told) = std::sync::mpsc::channel();
        let (held, is_held) = std::sync::mpsc::channel();
        let h = s.spawn(move || {
            let _st = m.lock().unwrap_or_else(|p| p.into_inner());
            let _ = held.send(());
            let _ = told.recv_timeout(Duration::from_secs(10));
            std::thread::sleep(delay);
        });
        is_held.recv().unwrap();
        (release, h)
    }

    /// Chores of an open gone of client "c" (its mark, closes, delete),
    /// then a close of client "d"; the states of "c" and "d".
    fn two_clients_chores() -> (Vec<Chore>, Mutex<State>, Mutex<State>) {
        let (k0, k1, kd) = (
            ResumeKey::new_random(),
            ResumeKey::new_random(),
            ResumeKey::new_random(),
        );
        let mut chores = vec![Chore::MarkGone {
            scope: "s".into(),
            cid: "c".into(),
            num: 7,
            text: "{}".into(),
            keys: vec![k0, k1],
        }];
        chores.extend(open_gone_chores("s".into(), "c", 7, &[k0, k1], k0));
        chores.push(Chore::Close(kd, "d".into()));
        let client = |cid: &str| {
            Mutex::new(State {
                client: Some(Client {
                    rec: ClientRec {
                        clientid: cid.into(),
                        ..client_c().rec
                    },
                    ..client_c()
                }),
                ..State::default()
            })
        };
        (chores, client("c"), client("d"))
    }

    /// Re-review rr43c F3: the chores thread does not wait for a client's
    /// lock ([`run_unless_overtaken`]): a chore of a client one of whose
    /// requests holds it is put back, not given up, the chores of another
    /// client running meanwhile and its own client's later chores staying
    /// behind it (an open's mark, closes, delete in order); once the lock
    /// is free, they run in order.
    #[test]
    fn a_chore_of_a_client_whose_lock_is_held_waits_without_holding_up_others() {
        let (chores, c, d) = two_clients_chores();
        let g = Mutex::new(Global::default());
        let (mut busy, mut done) = (0, Vec::new());
        let (tried, given_up) = std::thread::scope(|s| {
            let mut holder = Some(hold_from(s, &c, Duration::ZERO));
            status_tests::run_fake_chores(chores.clone(), |ch, _, w| {
                let st = if ch.client() == Some("c") { &c } else { &d };
                let r = run_unless_overtaken(ch, Some(st), &g, w, || {
                    done.push(ch.clone());
                    ChoreRun::Done
                });
                if r == ChoreRun::Busy {
                    busy += 1;
                    if let Some((release, h)) = holder.take_if(|_| busy == 3) {
                        let _ = release.send(());
                        h.join().unwrap();
                    }
                }
                r
            })
        });
        assert!(given_up.is_empty(), "{given_up:?}");
        assert_eq!(busy, 3, "{tried:?}");
        // The other client's close first; the held client's in order.
        let mut want = vec![chores[4].clone()];
        want.extend_from_slice(&chores[..4]);
        assert_eq!(done, want);
        // Only the first of the held client's chores was tried meanwhile.
        assert_eq!(
            tried[..4],
            [&chores[0], &chores[4], &chores[0], &chores[0]].map(Clone::clone)
        );
    }

    /// Re-review rr43f F1: a chore whose client's lock stays held (a
    /// client keeping requests in flight hands it from one to the next)
    /// is put back for [`CHORE_BUSY_BOUND`], then the chores thread waits
    /// for the lock, and the chore runs once the holder lets it go — not
    /// put back for as long as the client stays busy.
    #[test]
    fn a_chore_busy_past_its_bound_waits_for_its_clients_lock() {
        let (chores, c, d) = two_clients_chores();
        let g = Mutex::new(Global::default());
        let (mut busy, mut busy_waiting, mut done) = (0, 0, Vec::new());
        let (_, given_up) = std::thread::scope(|s| {
            let mut holder = Some(hold_from(s, &c, Duration::from_millis(100)));
            status_tests::run_fake_chores(chores.clone(), |ch, _, w| {
                let st = if ch.client() == Some("c") { &c } else { &d };
                if w {
                    // Let go 100 ms after: the chore waits for it.
                    if let Some((release, _)) = &holder {
                        let _ = release.send(());
                    }
                }
                let r = run_unless_overtaken(ch, Some(st), &g, w, || {
                    done.push((ch.clone(), w));
                    ChoreRun::Done
                });
                if r == ChoreRun::Busy {
                    busy += 1;
                    busy_waiting += usize::from(w);
                }
                if let (ChoreRun::Done, Some((_, h))) = (r, holder.take_if(|_| w)) {
                    h.join().unwrap();
                }
                r
            })
        });
        assert!(given_up.is_empty(), "{given_up:?}");
        assert_eq!(busy_waiting, 0, "waited for the lock");
        let bound = CHORE_BUSY_BOUND.as_millis() / CHORE_WAIT.as_millis();
        assert_eq!(busy, bound as usize, "put back until the bound");
        // After a try that waited, the client's next one only tries the
        // lock (re-review rr44b F1, F2): let go by then, its later chores
        // run without waiting.
        let mut want = vec![(chores[4].clone(), false), (chores[0].clone(), true)];
        want.extend(chores[1..4].iter().map(|ch| (ch.clone(), false)));
        assert_eq!(done, want);
    }

    /// Runs `todo` on the fake chores queue, client "c"'s lock held at
    /// every try and got by waiting for it ([`ChoreRun::Done`]), another
    /// client's chores answered by `other`: for each of "c"'s chores, in
    /// order, whether each of its tries waited for the lock.
    fn run_busy_client_c(
        todo: Vec<Chore>,
        mut other: impl FnMut(&Chore, usize) -> ChoreRun,
    ) -> Vec<(Chore, Vec<bool>)> {
        let mut tries: Vec<(Chore, Vec<bool>)> = Vec::new();
        let (_, given_up) = status_tests::run_fake_chores(todo, |ch, before, w| {
            if ch.client() != Some("c") {
                return other(ch, before);
            }
            match tries.last_mut() {
                Some((last, ws)) if last == ch => ws.push(w),
                _ => tries.push((ch.clone(), vec![w])),
            }
            if w {
                ChoreRun::Done
            } else {
                ChoreRun::Busy
            }
        });
        assert!(given_up.is_empty(), "{given_up:?}");
        tries
    }

    /// Re-review rr43g F3: the busy clock was per chore, and each chore
    /// of a client whose lock stays held paid [`CHORE_BUSY_BOUND`] again
    /// (an open's k closes took about k seconds). The clock is the
    /// client's ([`BusyClients`]): its first chore is put back until the
    /// bound, then waits for the lock; each later chore of the client, in
    /// order, only tries it first (re-review rr44b F1: other clients'
    /// chores run between two waits), is put back once and waits for it at
    /// its second try.
    #[test]
    fn a_busy_clients_chores_pay_the_bound_once_not_each() {
        let chores: Vec<Chore> = (0..4)
            .map(|_| Chore::Close(ResumeKey::new_random(), "c".into()))
            .collect();
        let tries = run_busy_client_c(chores.clone(), |_, _| ChoreRun::Done);
        let bound = (CHORE_BUSY_BOUND.as_millis() / CHORE_WAIT.as_millis()) as usize;
        let mut first = vec![false; bound];
        first.push(true);
        let mut want = vec![(chores[0].clone(), first)];
        want.extend(chores[1..].iter().map(|ch| (ch.clone(), vec![false, true])));
        assert_eq!(tries, want);
    }

    /// Re-review rr43g F2: the busy clock ran in wall time from a chore's
    /// first Busy, so a chore tried once, the chores thread then busy
    /// elsewhere for [`CHORE_BUSY_BOUND`] or more (here another client's
    /// close retried with backoff, 1.5 s), waited for its client's lock
    /// at its second try. Only the time the client was tried counts: of
    /// the gap, [`CHORE_BUSY_GAP`] at most, and it is put back until the
    /// rest of the bound has passed in tries.
    #[test]
    fn a_clients_busy_clock_stops_while_the_chores_thread_is_elsewhere() {
        let (kc, kd) = (ResumeKey::new_random(), ResumeKey::new_random());
        let d = Chore::Close(kd, "d".into());
        let retries = CHORE_TRIES as usize - 1;
        let mut d_tries = 0;
        let tries = run_busy_client_c(vec![Chore::Close(kc, "c".into()), d], |_, before| {
            d_tries += 1;
            if before < retries {
                ChoreRun::Retry { timed_out: false }
            } else {
                ChoreRun::Done
            }
        });
        assert_eq!(d_tries, retries + 1, "the other client's close ran between");
        let elsewhere: Duration = (1..CHORE_TRIES).filter_map(|t| chore_retry(t, false)).sum();
        assert!(
            elsewhere > CHORE_BUSY_BOUND + CHORE_BUSY_GAP,
            "{elsewhere:?}"
        );
        // Its first try (a put-back wait's worth), its second after the
        // gap (counted as CHORE_BUSY_GAP), then put-back waits to the bound.
        let rest = (CHORE_BUSY_BOUND - CHORE_WAIT - CHORE_BUSY_GAP).as_millis();
        let mut want = vec![false; 2 + (rest / CHORE_WAIT.as_millis()) as usize];
        want.push(true);
        assert_eq!(tries, vec![(Chore::Close(kc, "c".into()), want)]);
    }

    /// A close of client `cid`, of a new handle.
    fn close_of(cid: &str) -> Chore {
        Chore::Close(ResumeKey::new_random(), cid.into())
    }

    /// The time of the first of `tries` of client `cid` that came out
    /// [`ChoreRun::Done`].
    fn done_at(tries: &[status_tests::TimedTry], cid: &str) -> Option<Duration> {
        tries
            .iter()
            .find(|t| t.1.client() == Some(cid) && t.3 == ChoreRun::Done)
            .map(|t| t.0)
    }

    /// Re-review rr44b F1: once a busy client was waited for, each of its
    /// later chores waited for its lock at its first try, back to back,
    /// and another client's chore coming in meanwhile waited for all of
    /// them (30 closes of a client whose lock is always held, each wait
    /// 300 ms: another client's close waited 8.8 s, now 0.1 s). After a
    /// try that waited, the client's next one only tries the lock, is put
    /// back, and the other client's chore runs before it waits again.
    #[test]
    fn another_clients_chore_does_not_wait_for_a_busy_clients_backlog() {
        let wait = Duration::from_millis(300);
        let arrives = Duration::from_millis(1200);
        let mut todo: Vec<(Duration, Chore)> =
            (0..30).map(|_| (Duration::ZERO, close_of("c"))).collect();
        todo.push((arrives, close_of("d")));
        let (tries, given_up) =
            status_tests::run_timed_chores(todo, |ch, _, w, _| match (ch.client(), w) {
                (Some("c"), true) => (ChoreRun::Done, wait),
                (Some("c"), false) => (ChoreRun::Busy, Duration::ZERO),
                _ => (ChoreRun::Done, Duration::from_millis(5)),
            });
        assert!(given_up.is_empty(), "{given_up:?}");
        let d_at = done_at(&tries, "d").expect("d's close ran");
        let c_waits = |to: Duration| {
            tries
                .iter()
                .filter(|t| t.1.client() == Some("c") && t.2 && t.0 < to)
                .count()
        };
        assert_eq!(c_waits(Duration::MAX), 30, "each of c's closes waited once");
        // At most one of c's waits between its coming in and its run.
        assert!(c_waits(d_at) - c_waits(arrives) <= 1, "{tries:?}");
        assert!(d_at <= arrives + wait + CHORE_WAIT, "d ran at {d_at:?}");
    }

    /// Re-review rr44b F3: a gap of more than [`CHORE_BUSY_GAP`] between
    /// two tries of a busy client started its spell again, so while the
    /// chores thread had other clients' chores slower than that between
    /// them (a slow store, here 300 ms each), the client never reached the
    /// bound, and its close (holding share modes against other clients)
    /// was put back for the whole backlog — 13 s behind 40 chores. The gap
    /// counts [`CHORE_BUSY_GAP`] at most: the client is waited for after
    /// five busy tries, its close done within 2 s.
    #[test]
    fn a_busy_client_reaches_its_bound_behind_slow_chores_of_other_clients() {
        let slow = Duration::from_millis(300);
        let mut todo = vec![(Duration::ZERO, close_of("c"))];
        todo.extend((0..40).map(|i| (Duration::ZERO, close_of(&format!("o{i}")))));
        let (tries, given_up) =
            status_tests::run_timed_chores(todo, |ch, _, w, _| match (ch.client(), w) {
                (Some("c"), false) => (ChoreRun::Busy, Duration::ZERO),
                _ => (ChoreRun::Done, slow),
            });
        assert!(given_up.is_empty(), "{given_up:?}");
        let c_busy = tries.iter().filter(|t| t.3 == ChoreRun::Busy).count();
        let least = (CHORE_BUSY_BOUND - CHORE_WAIT)
            .as_millis()
            .div_ceil(CHORE_BUSY_GAP.as_millis());
        assert_eq!(c_busy, 1 + least as usize, "{tries:?}");
        let c_at = done_at(&tries, "c").expect("c's close ran");
        assert!(c_at <= Duration::from_secs(2), "c's close done at {c_at:?}");
    }

    /// Re-review rr44b F2: a try that waited for a client's lock kept its
    /// spell going whether or not the lock was held, so a client busy
    /// once, idle since, its chores coming in less than
    /// [`CHORE_BUSY_GAP`] apart, went on being waited for at every chore's
    /// first try — and the first that ran into a request of the client
    /// stalled the chores thread behind it. Here "c" is busy for 1.5 s,
    /// then idle while its closes come in every 200 ms, then holds its
    /// lock 5 s from 10 s: once the lock was got, its chores only try it,
    /// the one coming in at 10 s too.
    #[test]
    fn a_client_waited_for_once_is_tried_again_once_free() {
        let ms = Duration::from_millis;
        let holds = [ms(0)..ms(1500), ms(10_000)..ms(15_000)];
        let todo = (0..=50).map(|i| (ms(i * 200), close_of("c"))).collect();
        let (tries, given_up) = status_tests::run_timed_chores(todo, |_, _, w, at| {
            match (holds.iter().find(|h| h.contains(&at)), w) {
                (Some(h), true) => (ChoreRun::Done, h.end - at),
                (Some(_), false) => (ChoreRun::Busy, Duration::ZERO),
                (None, _) => (ChoreRun::Done, ms(1)),
            }
        });
        assert!(given_up.is_empty(), "{given_up:?}");
        let waited_idle: Vec<_> = tries
            .iter()
            .filter(|t| t.2 && (ms(1500)..ms(10_000)).contains(&t.0))
            .collect();
        assert!(waited_idle.is_empty(), "{waited_idle:?}");
        let late = tries.iter().find(|t| t.0 >= ms(10_000));
        assert!(late.is_some_and(|t| !t.2), "{late:?}");
    }

    /// A busy client's spell ends when a reload drops its chore put back
    /// for the lock ([`ChoreRun::Stale`]): only a try of that chore would
    /// have carried it on or ended it, and the client's chore computed
    /// after the reload, its lock free, would otherwise wait for the lock
    /// at its first try, however much later it comes.
    #[test]
    fn a_busy_clients_spell_ends_when_a_reload_drops_its_chore() {
        let todo = vec![
            (Duration::ZERO, close_of("c")),
            (Duration::from_secs(5), close_of("c")),
        ];
        let (tries, given_up) = status_tests::run_timed_chores(todo, |_, _, w, at| {
            match (at < Duration::from_secs(5), w) {
                (true, false) => (ChoreRun::Busy, Duration::ZERO),
                (true, true) => (ChoreRun::Stale, Duration::ZERO),
                (false, _) => (ChoreRun::Done, Duration::ZERO),
            }
        });
        assert!(given_up.is_empty(), "{given_up:?}");
        assert!(tries.iter().any(|t| t.3 == ChoreRun::Stale), "{tries:?}");
        let last = tries.last();
        assert!(
            last.is_some_and(|t| t.0 >= Duration::from_secs(5) && !t.2),
            "{tries:?}"
        );
    }

    /// Re-review rr44c R2: a blocked spell (its last try waited for the
    /// lock) ends once the client has not been tried for
    /// [`CHORE_BUSY_GAP`]: "c", busy until waited for, then idle for 2 s,
    /// then busy again, is put back until the bound again, not waited for
    /// at its second try.
    #[test]
    fn a_blocked_spell_ends_after_the_gap_without_a_try() {
        let again = Duration::from_secs(3);
        let (first, second) = (close_of("c"), close_of("c"));
        let todo = vec![(Duration::ZERO, first.clone()), (again, second.clone())];
        let (tries, given_up) = status_tests::run_timed_chores(todo, |_, _, w, _| {
            let r = if w { ChoreRun::Done } else { ChoreRun::Busy };
            (r, Duration::ZERO)
        });
        assert!(given_up.is_empty(), "{given_up:?}");
        let first_done = tries.iter().find(|t| t.1 == first && t.3 == ChoreRun::Done);
        assert!(first_done.is_some_and(|t| t.2 && t.0 < again - Duration::from_secs(1)));
        let bound = (CHORE_BUSY_BOUND.as_millis() / CHORE_WAIT.as_millis()) as usize;
        let ws: Vec<bool> = tries
            .iter()
            .filter(|t| t.1 == second)
            .map(|t| t.2)
            .collect();
        let mut want = vec![false; bound];
        want.push(true);
        assert_eq!(ws, want, "{tries:?}");
    }

    /// Re-review rr44c R3: whether to wait for the lock was asked once
    /// per chore, so a chore that waited for it and failed for a passing
    /// cause ([`ChoreRun::Retry`]) waited again at each retry, back to
    /// back, another client's chore held behind them all. Each retry asks
    /// again: after a try that waited, the next only tries the lock, held
    /// it is put back, and the other client's chore runs first. Its tries
    /// go on counting across those put-backs: a close whose lock is only
    /// got by waiting and whose calls keep failing is still given up.
    #[test]
    fn a_retry_after_a_waited_try_only_tries_the_lock() {
        let c = close_of("c");
        let arrives = CHORE_BUSY_BOUND + CHORE_WAIT;
        let todo = vec![(Duration::ZERO, c.clone()), (arrives, close_of("d"))];
        let (tries, given_up) =
            status_tests::run_timed_chores(todo, |ch, _, w, _| match (ch.client(), w) {
                (Some("c"), true) => (ChoreRun::Retry { timed_out: false }, Duration::ZERO),
                (Some("c"), false) => (ChoreRun::Busy, Duration::ZERO),
                _ => (ChoreRun::Done, Duration::from_millis(5)),
            });
        assert_eq!(given_up, vec![c.clone()]);
        let c_tries: Vec<_> = tries.iter().filter(|t| t.1 == c).collect();
        let twice = c_tries.windows(2).find(|w| w[0].2 && w[1].2);
        assert!(twice.is_none(), "waited twice in a row: {twice:?}");
        let waited = c_tries.iter().filter(|t| t.2).count();
        assert_eq!(waited, (CHORE_TRIES + CHORE_ROUNDS) as usize, "{tries:?}");
        // The other client's close ran before c's second wait.
        let d_at = done_at(&tries, "d").expect("d's close ran");
        let second_wait = c_tries.iter().filter(|t| t.2).nth(1).map(|t| t.0);
        assert!(second_wait.is_some_and(|s| d_at < s), "{tries:?}");
    }

    /// Lock state "l2" of handle `k`.
    fn lock_rec(k: ResumeKey) -> state::LockRec {
        state::LockRec {
            other: "l2".into(),
            seqid: 1,
            owner: "lo".into(),
            key: Some(k),
            held: Vec::new(),
        }
    }

    /// Client "c" in memory.
    fn client_c() -> Client {
        Client {
            rec: ClientRec {
                clientid: "c".into(),
                owner: "o".into(),
                verifier: "v".into(),
            },
            num: 9,
            deadline: Instant::now(),
            peer: None,
        }
    }

    fn note(other: &str, open: Open, reattaches: u64) -> Swap {
        Swap {
            other: other.to_owned(),
            open,
            closed_by: None,
            gone_aliases: Vec::new(),
            reattaches,
        }
    }

    /// Re-review rr39d F4: a swap note whose commit never landed stayed
    /// (holding its open's descriptor) until the same handle was swapped
    /// again. A note goes once its state no longer names its handle, or a
    /// reattach after it resumed the handle; one that may still apply
    /// stays.
    #[test]
    fn swap_notes_that_can_no_longer_apply_go() {
        let fds = Descriptors::new(8);
        let (k1, k2, gone) = (
            ResumeKey::new_random(),
            ResumeKey::new_random(),
            ResumeKey::new_random(),
        );
        let mut st = State::default();
        st.opens.insert("s1".into(), open("s1", k1, &fds));
        st.opens.insert("s2".into(), open("s2", k2, &fds));
        st.swaps.insert(k1, note("s1", open("s1", k1, &fds), 3));
        st.swaps.insert(gone, note("s2", open("s2", k2, &fds), 3));
        st.swaps.insert(k2, note("s3", open("s3", k2, &fds), 3));
        prune_swaps(&mut st, 3);
        assert_eq!(st.swaps.keys().collect::<Vec<_>>(), vec![&k1]);
        prune_swaps(&mut st, 4);
        assert!(st.swaps.is_empty());
        // Their descriptors went with them: the two states' only.
        assert_eq!(fds.held(), 2);
    }
}

#[cfg(test)]
mod recall_tests {
    use super::*;

    /// The state each recall of `file` counts as begun from.
    fn froms(g: &Global, file: FileId) -> Vec<Option<LeaseState>> {
        recalls_of(g, Some(file)).into_iter().map(|r| r.2).collect()
    }

    /// Re-review rr41c F2, rr41g 1: a recall goes on each live
    /// connection once, however many; a connection gone is forgotten.
    #[test]
    fn a_recall_is_due_once_per_live_connection() {
        let mut r = Reached::on(None);
        assert!(r.reach(7, |_| true), "sent nowhere: due on the first");
        assert!(!r.reach(7, |_| true), "not twice");
        let mut r = Reached::on(Some(1));
        assert!(!r.reach(1, |_| true), "sent there");
        for c in 2..=9 {
            assert!(r.reach(c, |_| true), "due on {c}");
        }
        for c in 1..=9 {
            assert!(!r.reach(c, |_| true), "not again on {c}, of nine live");
        }
        assert!(!r.reach(4, |c| c != 3), "4 still reached, 3 gone");
        assert_eq!(r.conns.len(), 8, "one entry per live connection: {r:?}");
        assert!(!r.reach(5, |c| c > 4), "5 live");
        assert_eq!(r.conns, vec![5, 6, 7, 8, 9], "the gone ones forgotten");
    }

    /// Re-review rr40a E1: a recall took the own-acknowledgement mark as
    /// it was when recorded, and the mark's later undo (its ack refused)
    /// or removal (the lease raised again) never reached it. (b): the ack
    /// marked before the break's recall is recorded, then undone: the
    /// recall counts from the state its break began (RH), not the undone
    /// ack's R; and a mark removed after a recall was recorded.
    #[test]
    fn a_recalls_start_follows_the_own_ack_mark_after_it_was_recorded() {
        let rh = LeaseState::R.with(LeaseState::H);
        let (lease, file) = (uuid::Uuid::new_v4(), FileId { dev: 1, ino: 2 });
        let mut g = Global::default();
        g.lease_client.insert(
            lease,
            LeaseHolder {
                cid: "c".to_owned(),
                other: "d".to_owned(),
                handle: ResumeKey::new_random(),
                write: false,
                was: None,
            },
        );
        let mark = OwnAckMark::new(&mut g, lease, LeaseState::R);
        note_recall(&mut g, lease, Some(file), Some(rh), None);
        assert_eq!(froms(&g, file), vec![Some(LeaseState::R)], "acked");
        mark.undo(&mut g);
        assert_eq!(froms(&g, file), vec![Some(rh)], "the ack undone");
        // Marked again, then removed (`recarry_kept_delegations`).
        let _ = OwnAckMark::new(&mut g, lease, LeaseState::R);
        assert_eq!(froms(&g, file), vec![Some(LeaseState::R)], "acked");
        g.own_acked.remove(&lease);
        assert_eq!(froms(&g, file), vec![Some(rh)], "the mark gone");
    }
}
