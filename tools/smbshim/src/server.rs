//! The smbl/1 server: framing, sessions, opens, and the one place filter
//! errors become smbl/1 statuses ([`status_of`]).

use std::collections::HashMap;
use std::net::{IpAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use libfilter::attach::{Attachment, IoDecision, IoPass};
use libfilter::client::{marking_answers, ClientError, SessionEnd};
use libfilter::closer::Tried;
use libfilter::model::*;
use libfilter::proto::{ErrorCode, OpenRequest};
use libfilter::settle::{may_hold, Unsettled};
use serde_json::{json, Map, Value};
use shimline::datasync::IoFailure;

use crate::closes_made::{ClosesMade, ReplayWatch};
use crate::early_breaks::{Break, EarlyBreaks, Parked, PendingBreak};
use crate::handover::{Handovers, Ident, LettingGo};
use crate::open_table::{ByCreateGuid, OpenTable};
use crate::unanswered::{Closer, ToClose, Unanswered};

/// Longest request line (spec: 4 MiB).
const MAX_LINE: usize = 4 << 20;
/// Op-id records kept per open.
const KEEP_REPLIES: u32 = 1024;
/// Longest line the reader tries to answer itself ([`answer_inline`]).
const INLINE_MAX_LINE: usize = 4096;
/// Requests of one connection queued behind the one being served; one
/// more is answered STATUS_INSUFFICIENT_RESOURCES at once.
const MAX_PIPELINED: usize = 128;
/// How long a replayed CREATE or a RECONNECT waits for a session's end
/// to let its open go (a filterd commit for each of the session's opens
/// before it); then STATUS_FILE_NOT_AVAILABLE, which the client tries
/// again. Only the waiting request's own connection waits with it
/// (rksmbd, whose SMB clients drop a connection whose ECHOs go
/// unanswered, waits 5 s).
const LETTING_GO_WAIT: Duration = Duration::from_secs(20);

/// Named limits on what peers can make smbshim hold (command-line flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most client connections at once.
    pub max_connections: usize,
    /// Most client connections at once from one IP address.
    pub max_connections_per_peer: usize,
    /// Most sessions one connection may set up.
    pub max_sessions_per_connection: usize,
    /// Most opens held (and being made) at once: each holds a descriptor,
    /// and a descriptor filterd sends when none is free is lost with the
    /// filterd connection ([`opens_allowed`]).
    pub max_opens: usize,
    /// Most opens held (and being made) at once by the sessions of one
    /// peer ([`Peer`]): its share of `max_opens` ([`opens_per_peer`] by
    /// default), so one peer cannot take them all from the others.
    pub max_opens_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: shimline::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: shimline::DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_sessions_per_connection: 64,
            max_opens: usize::MAX,
            max_opens_per_peer: usize::MAX,
        }
    }
}

/// How many opens smbshim may hold given its descriptor limit, raised
/// first to the hard limit ([`shimline::descriptors::opens_allowed`]). An
/// open holds the descriptor filterd sent for it; a descriptor sent when
/// the table is full is cut from its message (`MSG_CTRUNC`), and before
/// review uD the filterd connection was then dropped as broken: every
/// client of this smbshim failed with "connection to filterd lost" until a
/// restart (one client holding ~190 opens under a limit of 200). A CREATE
/// or RECONNECT past this is refused with STATUS_INSUFFICIENT_RESOURCES
/// instead.
pub fn opens_allowed(max_connections: usize) -> usize {
    shimline::descriptors::opens_allowed(max_connections)
}

/// The fewest opens a peer may hold by default ([`opens_per_peer`]),
/// unless the whole cap is smaller.
const MIN_OPENS_PER_PEER: usize = 64;

/// The opens one peer may hold by default under a cap of `max_opens`: a
/// quarter of it, or [`MIN_OPENS_PER_PEER`] where that is more (the whole
/// cap if smaller: a tiny limit still serves one peer). Before (review
/// rv-shims 3) the cap was server-wide: under a descriptor limit of 200,
/// one connection's 120 opens refused every other client's CREATE.
pub fn opens_per_peer(max_opens: usize) -> usize {
    (max_opens / 4).max(MIN_OPENS_PER_PEER.min(max_opens))
}

/// Whom an open is counted under for [`Limits::max_opens_per_peer`]: the
/// IP address of the connection its session was set up on — which a peer
/// cannot choose, unlike client GUIDs (one connection may set up 64
/// sessions under any GUIDs it likes) — or that connection itself when
/// its address is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Peer {
    Addr(IpAddr),
    Connection(u64),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Addr(ip) => write!(f, "peer {ip}"),
            Peer::Connection(c) => write!(f, "connection {c}"),
        }
    }
}

/// Opens held and being made, per [`Peer`].
#[derive(Default)]
struct PeerOpens(Mutex<HashMap<Peer, usize>>);

impl PeerOpens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Peer, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more open of `peer`, counted until the slot is dropped; or the
    /// opens it holds when that is `max` already.
    fn reserve(self: &Arc<Self>, peer: Peer, max: usize) -> Result<PeerSlot, usize> {
        let mut m = self.lock();
        let held = m.get(&peer).copied().unwrap_or(0);
        if held >= max {
            return Err(held);
        }
        *m.entry(peer).or_default() += 1;
        Ok(PeerSlot {
            opens: self.clone(),
            peer,
        })
    }
}

/// One open of a peer, counted in [`PeerOpens`] from before it is asked of
/// filterd until it leaves the open table (kept in its [`Open`]), on every
/// path: CLOSE, LOGOFF, the connection's loss (a detached durable open
/// holds no descriptor of smbshim's), a handle filterd forgot.
struct PeerSlot {
    opens: Arc<PeerOpens>,
    peer: Peer,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.opens.lock();
        if let Some(n) = m.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

/// A slot for one more open of session `session`'s peer, or
/// STATUS_INSUFFICIENT_RESOURCES naming the limit when the peer holds its
/// share ([`Limits::max_opens_per_peer`]): only that peer is refused.
fn peer_slot(sh: &Shared, session: u64) -> Result<PeerSlot, Fail> {
    let peer = session_peer(sh, session)?;
    let max = sh.limits.max_opens_per_peer;
    sh.peer_opens.reserve(peer, max).map_err(|held| {
        Fail(
            "STATUS_INSUFFICIENT_RESOURCES",
            format!(
                "{peer} holds {held} opens, its share of smbshim's (--max-opens-per-peer {max}; close some)"
            ),
        )
    })
}

/// Whom session `session`'s opens are counted under.
fn session_peer(sh: &Shared, session: u64) -> Result<Peer, Fail> {
    sh.sessions
        .lock()
        .ok()
        .and_then(|s| s.get(&session).map(|x| x.peer))
        .ok_or_else(|| {
            Fail(
                "STATUS_USER_SESSION_DELETED",
                format!("no session {session}"),
            )
        })
}

/// Whether `peer` holds, in the open table and counted under it, the open
/// of `client`'s create GUID `guid`: a replay of it returns that open,
/// which its own slot counts. Looked up by create GUID, not by a scan of
/// every open under the lock every CREATE and CLOSE takes (re-review
/// rr45g F5).
fn peer_holds(sh: &Shared, peer: Peer, client: uuid::Uuid, guid: uuid::Uuid) -> bool {
    sh.opens.lock().is_ok_and(|o| {
        o.by_create_guid(client, guid)
            .any(|v| v.counted.peer == peer)
    })
}

/// An open being made: counted against [`Limits::max_opens`] until the
/// request is done (by then it is in `Shared::opens`, or was not made).
struct OpenSlot<'a>(&'a AtomicUsize);

impl Drop for OpenSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A slot for one more open, or STATUS_INSUFFICIENT_RESOURCES when the
/// opens held and being made reach [`Limits::max_opens`].
fn open_slot(sh: &Shared) -> Result<OpenSlot<'_>, Fail> {
    let slot = OpenSlot(&sh.opening);
    let making = sh.opening.fetch_add(1, Ordering::AcqRel) + 1;
    let held = sh.opens.lock().map(|o| o.len()).unwrap_or(0);
    if held.saturating_add(making) > sh.limits.max_opens {
        return Err(Fail(
            "STATUS_INSUFFICIENT_RESOURCES",
            format!(
                "smbshim holds {held} opens, as many as its descriptor limit allows (close some)"
            ),
        ));
    }
    Ok(slot)
}

/// A failed request: an smbl/1 status and a message.
struct Fail(&'static str, String);

type Outcome = Result<Map<String, Value>, Fail>;

fn invalid(msg: impl Into<String>) -> Fail {
    Fail("STATUS_INVALID_PARAMETER", msg.into())
}

/// Not a status a client sees: an inline CREATE ([`answer_inline`]) that
/// filterd refused because a lease must be broken first, which the worker
/// then runs again, waiting.
const INLINE_BUSY: &str = "inline CREATE needs a lease break";

/// The one place filter errors become smbl/1 statuses.
fn status_of(e: &ClientError) -> &'static str {
    match e.code() {
        Some(ErrorCode::NotFound) | Some(ErrorCode::NoSuchHandle) => "STATUS_OBJECT_NAME_NOT_FOUND",
        Some(ErrorCode::PathNotFound) => "STATUS_OBJECT_PATH_NOT_FOUND",
        Some(ErrorCode::Collision) => "STATUS_OBJECT_NAME_COLLISION",
        Some(ErrorCode::AccessDenied) | Some(ErrorCode::NotAFile) | Some(ErrorCode::NotOwner) => {
            "STATUS_ACCESS_DENIED"
        }
        Some(ErrorCode::SharingViolation) => "STATUS_SHARING_VIOLATION",
        // Retry later: a lease (a local process's) is being broken.
        Some(ErrorCode::FileNotAvailable) | Some(ErrorCode::Busy) => "STATUS_FILE_NOT_AVAILABLE",
        Some(ErrorCode::DuplicateCreateGuid) => "STATUS_DUPLICATE_OBJECTID",
        Some(ErrorCode::DiskFull) => "STATUS_DISK_FULL",
        Some(ErrorCode::LockNotGranted) => "STATUS_LOCK_NOT_GRANTED",
        Some(ErrorCode::RangeNotLocked) => "STATUS_RANGE_NOT_LOCKED",
        Some(ErrorCode::LockConflict) => "STATUS_FILE_LOCK_CONFLICT",
        Some(ErrorCode::BadFrame) | Some(ErrorCode::LeaseKeyInUse) => "STATUS_INVALID_PARAMETER",
        Some(ErrorCode::Unsupported) => "STATUS_NOT_SUPPORTED",
        // An extension of smbl/1 (docs/smb-like.md): a limit was reached.
        Some(ErrorCode::LimitReached) => "STATUS_INSUFFICIENT_RESOURCES",
        None if matches!(e, ClientError::Disconnected | ClientError::Timeout(_)) => {
            "STATUS_FILE_NOT_AVAILABLE"
        }
        // The open's descriptor did not fit smbshim's table (a plain open
        // was closed in filterd, a replayed one detached): this request
        // alone fails.
        None if matches!(e, ClientError::DescriptorsCut(_)) => "STATUS_INSUFFICIENT_RESOURCES",
        _ => "STATUS_INTERNAL_ERROR",
    }
}

fn filter_fail(e: ClientError) -> Fail {
    Fail(status_of(&e), e.to_string())
}

struct Session {
    client_guid: uuid::Uuid,
    user: String,
    conn: u64,
    /// Whom its opens are counted under ([`PeerSlot`]).
    peer: Peer,
    alive: bool,
    /// Ended by the session's LOGOFF: filterd's late answers to its
    /// CREATEs are closed from then on, not kept detached for a replay
    /// ([`SessionEnd`]).
    end: SessionEnd,
    /// Opens of the session whose CLOSE (or LOGOFF) filterd never
    /// answered: their handles, each with its member, settling there
    /// ([`libfilter::settle`]). Until the settler has filterd's answer a
    /// retried CLOSE of one, and a retried LOGOFF, is told
    /// STATUS_FILE_NOT_AVAILABLE again (rvchaos 1: told closed, the client
    /// forgot the open, and a smbshim that died before filterd came back
    /// took the settler with it — the handle held its share mode and
    /// locks, named by nobody, for its whole durable timeout). The client
    /// keeps its open, so it can RECONNECT it on a replacement smbshim and
    /// CLOSE it there.
    settling: Vec<(ResumeKey, usize)>,
    /// Opens of the session whose close is in flight to filterd: noted as
    /// the open is taken out of the table, before filterd is asked, and
    /// dropped once it answers (or moved to [`Session::settling`] if it
    /// never does). Sessions are named by id from any connection, so a
    /// CLOSE retried on another connection while the first close still
    /// waits for filterd finds the note and is told
    /// STATUS_FILE_NOT_AVAILABLE, a LOGOFF waits for the answer
    /// ([`wait_closes_in_flight`]), and a replayed CREATE that finds the
    /// handle is refused ([`closing_first`]) — before, it found neither the open nor a
    /// note and was told FILE_CLOSED (or SUCCESS, ending the session and
    /// dropping the settling note to come): the client forgot an open
    /// whose close might never be made (re-review rr40f 2).
    closing: Vec<ResumeKey>,
    /// LOGOFFs of the session in progress ([`LoggingOff`]): its end for
    /// another cause meanwhile closes its opens as they asked, rather than
    /// detaching the durable ones ([`end_session`]).
    logging_off: usize,
}

/// Most filterd connections one smbshim keeps (`--filter-connections`).
pub const MAX_FILTER_CONNECTIONS: usize = 16;

/// One of smbshim's filterd connections: an attachment under an instance
/// name of its own ([`member_name`]), with the files it heard have locks.
/// To filterd each member is a frontend like any other (its own handles,
/// lease breaks, lock hints and detach on loss), so what holds between two
/// smbshims holds between two members.
struct Member {
    filter: Attachment,
    /// Files with byte-range locks (lock hints from filterd, and files this
    /// member is locking): only their I/O costs a CheckIo round trip.
    locked_files: Mutex<std::collections::HashSet<FileId>>,
    /// Handles of forgotten opens whose close filterd never answered: the
    /// member's `close-settler` thread closes them again until it does.
    unsettled: Unsettled,
    /// LOGOFFs whose unanswered CREATEs' opens are still to be closed, by
    /// the member's `logoff-closer` thread ([`close_unanswered`]).
    closer: Closer,
    /// Lease breaks that came before their open was stored, and the
    /// CREATEs and RECONNECTs in flight that may store it.
    early: EarlyBreaks,
}

/// The instance name of member `k` of smbshim instance `instance`: member
/// 0 is `instance` itself (so one connection is the smbshim of before),
/// member k > 0 is `instance.k`.
fn member_name(instance: &str, k: usize) -> anyhow::Result<InstanceName> {
    let name = if k == 0 {
        instance.to_owned()
    } else {
        format!("{instance}.{k}")
    };
    InstanceName::new(name.clone()).with_context(|| {
        format!("filterd instance name {name:?} (--instance with its member number)")
    })
}

/// The member serving client `guid` of `n`: the same for every session,
/// connection and smbshim process of that client, as long as `n` stays
/// the same, so a client's replays and RECONNECTs reach the instance that
/// owns its handles. FNV-1a over the GUID's bytes: stable across builds
/// and Rust versions (std's hasher promises neither).
fn member_of(guid: uuid::Uuid, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in guid.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    usize::try_from(h % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
}

struct Open {
    /// The member whose attachment holds the handle.
    member: usize,
    key: ResumeKey,
    file_key: FileId,
    session: u64,
    /// Its client's GUID and the create GUID the open was made with, if
    /// any: what a replayed CREATE names it by ([`Open::ident`]).
    client: uuid::Uuid,
    create_guid: Option<uuid::Uuid>,
    file: Arc<shimline::datasync::SyncedFile>,
    /// What READ and WRITE may do through `file`: the rights filterd
    /// granted the open, narrowed by the descriptor's mode ([`Io`]).
    io: Io,
    durable: Option<Grant>,
    create_action: CreateAction,
    lease: Option<HeldLease>,
    /// Counted under its session's peer's share until it leaves the table.
    counted: PeerSlot,
    /// The delete on close its client was last told it has; None when
    /// smbshim does not know it (a replay found the open in filterd).
    delete_told: Option<bool>,
    /// A change of its delete on close is in flight or went unanswered:
    /// filterd's flag may differ from `delete_told`, which the handle's
    /// close or detach carries ([`set_delete_on_close`]).
    delete_unsure: bool,
    /// The notifications held behind the reply of the call that stored
    /// it (or found it, a replay), while that reply is not yet queued
    /// ([`HeldNotes`]); None for an open without a lease.
    held: Option<Arc<HeldNotes>>,
}

impl ByCreateGuid for Open {
    fn create_guid_of(&self) -> Option<(uuid::Uuid, uuid::Uuid)> {
        self.create_guid.map(|g| (self.client, g))
    }
}

impl Open {
    /// What a teardown and a takeover claim the open by.
    fn ident(&self) -> Ident {
        Ident {
            key: Some(self.key),
            guid: self.create_guid.map(|g| (self.client, g)),
        }
    }
}

struct Shared {
    /// The filterd connections; a client's opens go through
    /// `members[member_of(client_guid)]`.
    members: Vec<Member>,
    /// The client connections, let go of when filterd steps down.
    clients: Arc<shimline::ClientGate>,
    sessions: Mutex<HashMap<u64, Session>>,
    /// Told (with `sessions`) when a close in flight is answered
    /// ([`Session::closing`] loses a key): a LOGOFF waits on it for the
    /// session's closes in flight ([`wait_closes_in_flight`]).
    closes_answered: Condvar,
    /// The create GUIDs of CREATEs in flight or unanswered, each owned by
    /// one session, for its LOGOFF to close. Locked alone or inside the
    /// sessions lock, never the other way.
    unanswered: Mutex<Unanswered>,
    /// The opens by file id ([`OpenTable`]: indexed by create GUID).
    opens: Mutex<OpenTable<Open>>,
    /// Each client connection's writer, for pushed LEASE_BREAKs.
    writers: shimline::Writers,
    /// The opens being let go (a session's end detaching or closing them)
    /// and taken over (a replayed CREATE, a RECONNECT), each claimed
    /// alone: a detach in flight never lands after its open was taken
    /// over, and a takeover of an open being let go waits for it — while
    /// other clients' takeovers do not ([`crate::handover`]).
    handovers: Handovers,
    /// The closes filterd made while a replayed CREATE was in flight,
    /// which must not hand their handles out ([`closing_first`]).
    closes_made: ClosesMade,
    limits: Limits,
    /// Opens being made ([`open_slot`]).
    opening: AtomicUsize,
    /// Each client connection's peer address, while it is served.
    peers: Mutex<HashMap<u64, IpAddr>>,
    /// Opens held and being made, per peer ([`peer_slot`]).
    peer_opens: Arc<PeerOpens>,
    /// The leases (client GUID, lease key) with a break in progress
    /// (MS-SMB2 Lease.Breaking): from a LEASE_BREAK that asks for an ack
    /// until the ack, or a break without one (filterd lowered the lease at
    /// its break timeout). A LEASE_BREAK_ACK of any other lease is
    /// STATUS_UNSUCCESSFUL (3.3.5.22.2), as rksmbd answers. Only a lease
    /// an open in `opens` holds is in it (set and cleared under the opens
    /// lock, [`end_breaks`]): the break of one whose last open went (closed
    /// instead of acknowledged, its session ended, forgotten) or whose
    /// member reattached (filterd restarted) is over. Before, those stayed
    /// for good: the set grew without bound, and let a later unasked ack
    /// through (rr38e 1). Each with the break that started it, which a
    /// CREATE or RECONNECT answered during it sends again behind its reply
    /// ([`resend_break_in_progress`]).
    breaking: Mutex<HashMap<Breaking, Break>>,
}

/// A lease with a break in progress: its client's GUID and its key.
type Breaking = (uuid::Uuid, libfilter::lease::LeaseKey);

/// The lease open `o` holds, named as [`Shared::breaking`] names it.
fn breaking_of(o: &Open) -> Option<Breaking> {
    o.lease.map(|l| (o.client, l.key))
}

/// The leases `gone` (of opens that left `opens`, the table, locked) have
/// no break in progress any more unless another open of the client still
/// holds them.
fn end_breaks(
    sh: &Shared,
    opens: &HashMap<String, Open>,
    gone: impl IntoIterator<Item = Breaking>,
) {
    let Ok(mut b) = sh.breaking.lock() else {
        return;
    };
    for g in gone {
        if b.contains_key(&g) && !opens.values().any(|v| breaking_of(v) == Some(g)) {
            b.remove(&g);
        }
    }
}

/// Attaches to filterd over `connections` connections (instances
/// [`member_name`]), listens, serves forever.
pub fn run(
    filter: &Path,
    listen: &str,
    instance: &str,
    connections: usize,
    limits: Limits,
) -> anyhow::Result<()> {
    let attach = attach_members(filter, instance, connections)?;
    let listener = shimline::announce(listen).with_context(|| format!("listening on {listen}"))?;
    let shared = start(attach, limits)?;
    let cfg = shimline::Listen {
        prefix: "smb",
        id_field: "mid",
        busy_status: "STATUS_INSUFFICIENT_RESOURCES",
        max_connections: limits.max_connections,
        max_connections_per_peer: limits.max_connections_per_peer,
    };
    let gate = shared.clients.clone();
    shimline::accept_forever_gated(listener, cfg, gate, move |conn, stream| {
        serve(shared.clone(), conn, stream)
    });
    Ok(())
}

/// One attachment per member, `connections` in all (1 to
/// [`MAX_FILTER_CONNECTIONS`]).
fn attach_members(
    filter: &Path,
    instance: &str,
    connections: usize,
) -> anyhow::Result<Vec<Attachment>> {
    anyhow::ensure!(
        (1..=MAX_FILTER_CONNECTIONS).contains(&connections),
        "--filter-connections must be 1 to {MAX_FILTER_CONNECTIONS}"
    );
    let names = (0..connections)
        .map(|k| member_name(instance, k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let protocol = Protocol::new("smb")?;
    names
        .into_iter()
        .map(|name| {
            // filterd may still be starting: wait for it a while.
            Attachment::connect_patiently(
                filter,
                protocol.clone(),
                name.clone(),
                // Its `file_id` is the whole resume key; write notices one
                // way (a WRITE never waits for filterd).
                libfilter::proto::FEATURE_LOCK_HINTS
                    | libfilter::proto::FEATURE_TIME_ORDERED_KEYS
                    | libfilter::proto::FEATURE_WRITE_NOTICES
                    | libfilter::proto::FEATURE_STEP_DOWN,
                shimline::cli::filterd_start_wait(),
                &mut shimline::cli::say_waiting_for_filterd(
                    "smbshim",
                    filter,
                    shimline::cli::filterd_start_wait(),
                ),
            )
            .with_context(|| format!("attaching to filterd as {name}"))
        })
        .collect()
}

/// The protocol state over the attachments, with a lease-break forwarder
/// for each.
fn start(attach: Vec<Attachment>, limits: Limits) -> anyhow::Result<Arc<Shared>> {
    let shared = Arc::new(Shared {
        clients: Arc::default(),
        members: attach
            .into_iter()
            .map(|filter| Member {
                filter,
                locked_files: Mutex::new(std::collections::HashSet::new()),
                unsettled: Unsettled::default(),
                closer: Closer::default(),
                early: EarlyBreaks::default(),
            })
            .collect(),
        sessions: Mutex::new(HashMap::new()),
        closes_answered: Condvar::new(),
        unanswered: Mutex::new(Unanswered::default()),
        opens: Mutex::default(),
        writers: shimline::Writers::default(),
        handovers: Handovers::default(),
        closes_made: ClosesMade::default(),
        limits,
        opening: AtomicUsize::new(0),
        peers: Mutex::new(HashMap::new()),
        peer_opens: Arc::default(),
        breaking: Mutex::default(),
    });
    for k in 0..shared.members.len() {
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("lease-breaks-{k}"))
            .spawn(move || forward_breaks(sh, k))?;
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("close-settler-{k}"))
            .spawn(move || {
                if let Some(m) = sh.members.get(k) {
                    // Nothing is claimed across the call (`handovers`; a
                    // stalled filterd would hold replays up): a key
                    // leaves `unsettled` only once its close is answered,
                    // so a replay that finds the handle before then is
                    // refused (`create`), and after it finds none; one
                    // in flight as it is answered is refused by the
                    // close noted made first ([`ClosesMade`]).
                    m.unsettled.run(|key, told| {
                        let closed = m.filter.close_told(key, told);
                        if closed.as_ref().map_or_else(|e| !may_hold(e), |()| true) {
                            sh.closes_made.made(key);
                        }
                        closed
                    });
                }
            })?;
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("logoff-closer-{k}"))
            .spawn(move || {
                if let Some(m) = sh.members.get(k) {
                    m.closer.run(
                        || Some(m.filter.clone()),
                        |t, unanswered| close_unanswered(&sh, m, t, unanswered),
                        |t| forget_unanswered(&sh, t),
                    );
                }
            })?;
    }
    Ok(shared)
}

impl Shared {
    /// Member `k` (always one of [`Shared::members`]: an index this
    /// smbshim computed, never a peer's).
    fn member(&self, k: usize) -> Result<&Member, Fail> {
        self.members.get(k).ok_or_else(|| {
            Fail(
                "STATUS_INTERNAL_ERROR",
                format!("no filterd connection {k}"),
            )
        })
    }

    /// The member serving client `guid`.
    fn member_for(&self, guid: uuid::Uuid) -> Result<(usize, &Member), Fail> {
        let k = member_of(guid, self.members.len());
        Ok((k, self.member(k)?))
    }
}

/// smbshim's request handling without its listener, for fuzzing: lines go
/// straight to the handler, as from one connection.
pub struct Harness(Arc<Shared>);

impl Harness {
    /// Attaches to filterd at `filter` as instance `instance`.
    pub fn attach(filter: &Path, instance: &str) -> anyhow::Result<Harness> {
        let attach = attach_members(filter, instance, 1)?;
        Ok(Harness(start(attach, Limits::default())?))
    }

    /// The reply to one request line.
    pub fn handle(&self, line: &[u8]) -> Value {
        handle_line(&self.0, 1, line, &mut AfterReply::default())
    }

    /// The reply the connection's reader gives `line` itself (its fast
    /// path for CREATE, CLOSE and ECHO, typed lines first), or `None` when
    /// it hands the line to the worker ([`Harness::handle`]).
    pub fn handle_inline(&self, line: &[u8]) -> Option<Value> {
        let reply = answer_inline(&self.0, line, &mut AfterReply::default())?;
        Some(serde_json::to_value(reply).unwrap_or_else(
            |e| serde_json::json!({"status": "UNSERIALIZABLE", "error": e.to_string()}),
        ))
    }
}

/// Lines waiting for a connection's worker, with their budget charges.
type Waiting = std::collections::VecDeque<(Vec<u8>, shimline::Queued)>;

/// Requests of one connection waiting for its worker, each charged to the
/// process's request budget ([`shimline::Outbound::charge_queued`]).
#[derive(Default)]
struct Pipeline {
    /// The waiting lines, whether the pipeline is closed, and whether the
    /// worker is serving a line.
    q: std::sync::Mutex<(Waiting, bool, bool)>,
    ready: std::sync::Condvar,
}

impl Pipeline {
    /// Queues a line; false when [`MAX_PIPELINED`] wait already.
    fn push(&self, line: Vec<u8>, charge: shimline::Queued) -> bool {
        let Ok(mut q) = self.q.lock() else {
            return false;
        };
        if q.0.len() >= MAX_PIPELINED {
            return false;
        }
        q.0.push_back((line, charge));
        self.ready.notify_one();
        true
    }

    /// The next line, waiting for one; None once closed and empty. The
    /// worker is busy from here until its next call.
    fn next(&self) -> Option<Vec<u8>> {
        let mut q = self.q.lock().ok()?;
        q.2 = false;
        loop {
            if let Some((line, _charge)) = q.0.pop_front() {
                q.2 = true;
                return Some(line);
            }
            if q.1 {
                return None;
            }
            q = self.ready.wait(q).ok()?;
        }
    }

    /// Nothing waits and the worker serves nothing: a line handled now is
    /// in order.
    fn idle(&self) -> bool {
        self.q.lock().is_ok_and(|q| q.0.is_empty() && !q.2)
    }

    /// No more lines; `discard` drops those waiting (and their memory).
    fn close(&self, discard: bool) {
        if let Ok(mut q) = self.q.lock() {
            q.1 = true;
            if discard {
                q.0.clear();
            }
        }
        self.ready.notify_all();
    }
}

/// Serves one connection. LEASE_BREAK_ACKs are handled as soon as they
/// are read; every other request goes, in order, to the connection's
/// worker thread, so an ack is never stuck behind a CREATE waiting for it
/// — except a CREATE, CLOSE or ECHO read while the worker is idle, which
/// the reader answers itself when it can without waiting for any
/// acknowledgement ([`answer_inline`]): no thread hop for the common case.
/// Requests waiting there are charged to the request budget: a connection
/// that would pass it is dropped and its waiting requests discarded.
fn serve(sh: Arc<Shared>, conn: u64, stream: Arc<TcpStream>) {
    if let (Ok(a), Ok(mut p)) = (stream.peer_addr(), sh.peers.lock()) {
        p.insert(conn, shimline::peer_key(a.ip()));
    }
    let mut worker: Option<(Arc<Pipeline>, std::thread::JoinHandle<()>)> = None;
    let mut writer = None;
    sh.writers.serve(
        conn,
        stream,
        "mid",
        "STATUS_INVALID_PARAMETER",
        |line, w| {
            if is_lease_break_ack(line) {
                return Some(Reply::Json(handle_line(
                    &sh,
                    conn,
                    line,
                    &mut AfterReply::default(),
                )));
            }
            if worker.as_ref().is_none_or(|(p, _)| p.idle()) {
                let mut after = AfterReply::default();
                if let Some(reply) = answer_inline(&sh, line, &mut after) {
                    return after.behind(reply, w);
                }
            }
            if worker.is_none() {
                let p = Arc::new(Pipeline::default());
                let (shw, ww, pw) = (sh.clone(), w.clone(), p.clone());
                writer = Some(w.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("smb-conn-{conn}-work"))
                    .spawn(move || {
                        while let Some(line) = pw.next() {
                            if ww.over_budget() {
                                continue;
                            }
                            let mut after = AfterReply::default();
                            let reply = handle_line(&shw, conn, &line, &mut after);
                            if !shimline::send(&ww, &reply) {
                                return;
                            }
                            after.send(&ww);
                        }
                    });
                match spawned {
                    Ok(j) => worker = Some((p, j)),
                    Err(_) => return handle_now(&sh, conn, line, w),
                }
            }
            let Some((p, _)) = worker.as_ref() else {
                return handle_now(&sh, conn, line, w);
            };
            let Some(charge) = w.charge_queued(line.len()) else {
                return Some(Reply::Json(busy(line, "over the request budget")));
            };
            if p.push(line.to_vec(), charge) {
                None
            } else {
                Some(Reply::Json(busy(
                    line,
                    &format!("more than {MAX_PIPELINED} requests of this connection are waiting"),
                )))
            }
        },
    );
    // Requests already read finish before the connection's state goes,
    // unless it was dropped for the budget.
    if let Some((p, j)) = worker {
        p.close(writer.as_ref().is_some_and(|w| w.over_budget()));
        let _ = j.join();
    }
    connection_lost(&sh, conn);
    if let Ok(mut p) = sh.peers.lock() {
        p.remove(&conn);
    }
}

/// The LEASE_BREAKs of an open's lease that go behind the reply of the
/// call that stored the open (a CREATE or RECONNECT), held here until that
/// reply is queued: those filterd sent before the open was stored
/// ([`deliver_early_breaks`]) and those [`forward_breaks`] finds the open
/// for after it was stored (re-review rr39b 2: those went out at once,
/// ahead of the reply). filterd sent them behind its own reply: a client
/// that saw a break first would take the reply's lease state over the one
/// broken to. Each is a gate of the break ([`PendingBreak`]): a break of a
/// lease several opens hold goes once every such reply is queued.
struct HeldNotes {
    /// The breaks; None once the reply is queued.
    q: Mutex<Option<Vec<Arc<PendingBreak>>>>,
}

impl HeldNotes {
    /// Holds break `b` behind the reply (a gate more); false once the
    /// reply has been queued.
    fn hold(&self, b: &Arc<PendingBreak>) -> bool {
        match self.q.lock() {
            Ok(mut q) => match q.as_mut() {
                Some(held) => {
                    b.gate();
                    held.push(b.clone());
                    true
                }
                None => false,
            },
            Err(_) => false,
        }
    }

    /// Holds break `b`, whose gate for this reply is already counted
    /// ([`EarlyBreaks::take`]), behind the reply.
    fn hold_counted(&self, b: Arc<PendingBreak>) {
        let b = match self.q.lock() {
            Ok(mut q) => match q.as_mut() {
                Some(held) => {
                    held.push(b);
                    return;
                }
                None => b,
            },
            Err(_) => b,
        };
        b.pass(None);
    }

    /// Whether the reply is not yet queued.
    fn waiting(&self) -> bool {
        self.q.lock().is_ok_and(|q| q.is_some())
    }

    /// The reply is queued on `w` (or did not go, without `w`: its
    /// connection is gone): the breaks held behind it pass this gate,
    /// under the lock, so that a break [`forward_breaks`] sends itself
    /// from now on comes after those that go now. Never blocks:
    /// `shimline::send` queues.
    fn release(&self, w: Option<&shimline::Writer>) {
        let Ok(mut q) = self.q.lock() else {
            return;
        };
        for b in q.take().unwrap_or_default() {
            b.pass(w);
        }
    }
}

/// What goes to a client after the reply to its request: the LEASE_BREAKs
/// held for the open its CREATE or RECONNECT stored ([`HeldNotes`]).
#[derive(Default)]
struct AfterReply(Option<Arc<HeldNotes>>);

impl AfterReply {
    /// The notes of the reply, held until it is queued.
    fn held(&mut self) -> Arc<HeldNotes> {
        self.0
            .get_or_insert_with(|| {
                Arc::new(HeldNotes {
                    q: Mutex::new(Some(Vec::new())),
                })
            })
            .clone()
    }

    /// Sends what waits, behind a reply already sent on `w`.
    fn send(mut self, w: &shimline::Writer) {
        if let Some(h) = self.0.take() {
            h.release(Some(w));
        }
    }

    /// `reply`, for the connection's reader to send — or, with notes
    /// held behind it, sent now on `w` followed by them.
    fn behind(self, reply: Reply, w: &shimline::Writer) -> Option<Reply> {
        if self.0.is_none() {
            return Some(reply);
        }
        if shimline::send(w, &reply) {
            self.send(w);
        }
        None
    }
}

impl Drop for AfterReply {
    /// A reply that did not go: later breaks go at once.
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.release(None);
        }
    }
}

/// The reply to `line`, handled on the connection's reader: sent (and
/// whatever goes behind it) or for the reader to send.
fn handle_now(sh: &Shared, conn: u64, line: &[u8], w: &shimline::Writer) -> Option<Reply> {
    let mut after = AfterReply::default();
    let reply = Reply::Json(handle_line(sh, conn, line, &mut after));
    after.behind(reply, w)
}

/// Whether a line is a LEASE_BREAK_ACK (answered out of order, at once).
fn is_lease_break_ack(line: &[u8]) -> bool {
    mentions(line, b"LEASE_BREAK_ACK")
        && serde_json::from_slice::<Value>(line)
            .is_ok_and(|v| v.get("cmd").and_then(Value::as_str) == Some("LEASE_BREAK_ACK"))
}

/// Whether `word` occurs in `line`: a cheap look before parsing. Only
/// windows starting with the word's first byte are compared (a plain
/// `windows().any(==)` calls memcmp at every byte: ~2% of smbshim's CPU
/// per CREATE+CLOSE, profiled for issue #16).
fn mentions(line: &[u8], word: &[u8]) -> bool {
    let Some((&first, rest)) = word.split_first() else {
        return true;
    };
    line.iter().enumerate().any(|(i, &b)| {
        b == first
            && line
                .get(i + 1..i + word.len())
                .is_some_and(|tail| tail == rest)
    })
}

/// The answer to a request that cannot wait: over [`MAX_PIPELINED`] or
/// over the request budget (`why`).
fn busy(line: &[u8], why: &str) -> Value {
    let mid = serde_json::from_slice::<Value>(line)
        .ok()
        .and_then(|v| v.get("mid").and_then(Value::as_u64));
    json!({"mid": mid, "status": "STATUS_INSUFFICIENT_RESOURCES",
           "error": why})
}

/// The reply to a CREATE, CLOSE or ECHO that the connection's reader can
/// give itself, or `None` to leave the line to the worker. None of these
/// waits for an acknowledgement the connection's own client must send: a
/// CREATE asks filterd not to wait for lease breaks (`no_wait`) and, if
/// one is needed (or filterd is busy or away), goes to the worker, which
/// runs it again from the start and waits there while the reader reads
/// the acks. The caller makes sure nothing of the connection is waiting
/// or being served, so requests stay in order.
fn answer_inline(sh: &Shared, line: &[u8], after: &mut AfterReply) -> Option<Reply> {
    // Other lines (a WRITE's may be megabytes) are not parsed twice.
    let named = |cmd: &[u8]| mentions(line, cmd);
    if line.len() > INLINE_MAX_LINE || !(named(b"CREATE") || named(b"CLOSE") || named(b"ECHO")) {
        return None;
    }
    if let Some(answer) = answer_typed(sh, line, after) {
        return answer;
    }
    let (obj, mid) = shimline::parse_request(line, "mid", "STATUS_INVALID_PARAMETER").ok()?;
    // A mistyped `replay`: the worker words its error.
    if is_replay(&obj).is_err() {
        return None;
    }
    let outcome = match obj.get("cmd").and_then(Value::as_str)? {
        "ECHO" => Ok(Map::new()),
        "CLOSE" => close(sh, &obj),
        // A replay may wait for its open to be let go, or out a filterd
        // restart: the worker serves it, the reader keeps reading acks.
        "CREATE" if is_replay(&obj).unwrap_or(true) => return None,
        "CREATE" => match create(sh, &obj, true, after) {
            Err(Fail(INLINE_BUSY, _)) => return None,
            other => other,
        },
        _ => return None,
    };
    Some(Reply::Json(reply_of(outcome, mid)))
}

/// A request line as [`answer_typed`] decodes it: no JSON tree, strings
/// borrowed from the line. A line this does not fit (a string with an
/// escape, a field of another type, a repeated key) is parsed into an
/// object instead, which also words its error.
#[derive(serde::Deserialize)]
struct InlineLine<'a> {
    mid: u64,
    cmd: &'a str,
    session_id: Option<u64>,
    file_id: Option<&'a str>,
    path: Option<&'a str>,
    #[serde(borrow)]
    access: Option<Vec<&'a str>>,
    #[serde(borrow)]
    share: Option<Vec<&'a str>>,
    disposition: Option<&'a str>,
    #[serde(borrow)]
    lease: Option<LeaseFields<'a>>,
    #[serde(borrow)]
    durable: Option<DurableFields<'a>>,
    replay: Option<bool>,
}

/// [`answer_inline`] without a JSON tree (serde_json's `Value` was most
/// of smbshim's own CPU per CREATE+CLOSE, issue #16): `None` when the
/// line needs parsing into an object (then everything, errors included,
/// goes as before), else what `answer_inline` answers. Gives the same
/// answers as the object path for every line it decodes.
fn answer_typed(sh: &Shared, line: &[u8], after: &mut AfterReply) -> Option<Option<Reply>> {
    // serde would take a JSON array for the struct too; smbl/1 says a
    // request is an object.
    if line.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let l: InlineLine = serde_json::from_slice(line).ok()?;
    let outcome = match (l.cmd, l.session_id) {
        ("ECHO", _) => Ok(Map::new()),
        ("CLOSE", Some(sid)) => {
            let file_id = l.file_id?;
            session_by_id(sh, sid).and_then(|_| {
                test_hold_close();
                close_in(sh, sid, file_id)
            })
        }
        ("CREATE", Some(sid)) => {
            let f = CreateFields {
                path: l.path?,
                access: l.access?,
                share: l.share?,
                disposition: l.disposition?,
                lease: l.lease,
                durable: l.durable,
                replay: l.replay.unwrap_or(false),
            };
            if f.replay {
                // As in answer_inline: the worker serves replays.
                return Some(None);
            }
            match session_by_id(sh, sid).and_then(|s| create_with(sh, s, &f, true, after)) {
                Err(Fail(INLINE_BUSY, _)) => return Some(None),
                Err(f) => Err(f),
                // The reply straight from the typed fields, no Map.
                Ok(body) => {
                    return Some(Some(Reply::Created(Answer {
                        mid: l.mid,
                        status: "STATUS_SUCCESS",
                        body,
                    })))
                }
            }
        }
        // Another command, or one the object path words the error of.
        ("CLOSE" | "CREATE", None) => return None,
        _ => return Some(None),
    };
    Some(Some(Reply::Json(reply_of(outcome, l.mid))))
}

fn handle_line(sh: &Shared, conn: u64, line: &[u8], after: &mut AfterReply) -> Value {
    let (obj, mid) = match shimline::parse_request(line, "mid", "STATUS_INVALID_PARAMETER") {
        Ok(x) => x,
        Err(reply) => return reply,
    };
    let obj = &obj;
    let cmd = obj.get("cmd").and_then(Value::as_str).unwrap_or("");
    let outcome = match cmd {
        // Any request may carry `replay`; a mistyped one changes nothing.
        _ if is_replay(obj).is_err() => is_replay(obj).map(|_| Map::new()),
        "ECHO" => Ok(Map::new()),
        "SESSION_SETUP" => session_setup(sh, conn, obj),
        "CREATE" => create(sh, obj, false, after),
        "RECONNECT" => reconnect(sh, conn, obj, after),
        "READ" => read(sh, obj),
        "WRITE" => write(sh, obj),
        "FLUSH" => flush(sh, obj),
        "CLOSE" => close(sh, obj),
        "LOGOFF" => logoff(sh, obj),
        "LOCK" => lock(sh, obj),
        "SET_INFO" => set_info(sh, obj),
        "LEASE_BREAK_ACK" => lease_break_ack(sh, obj),
        "" => Err(invalid("cmd must be a string")),
        other => Err(Fail(
            "STATUS_NOT_SUPPORTED",
            format!("unknown command {other:?}"),
        )),
    };
    reply_of(outcome, mid)
}

/// The reply line of a request `mid` that came to `outcome`.
fn reply_of(outcome: Outcome, mid: u64) -> Value {
    let mut out = match outcome {
        Ok(m) => {
            let mut m = m;
            m.insert("status".into(), json!("STATUS_SUCCESS"));
            m
        }
        Err(Fail(status, error)) => {
            let mut m = Map::new();
            m.insert("status".into(), json!(status));
            m.insert("error".into(), json!(error));
            m
        }
    };
    out.insert("mid".into(), json!(mid));
    Value::Object(out)
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value, Fail> {
    shimline::field(obj, name).map_err(invalid)
}

fn u64_field(obj: &Map<String, Value>, name: &str) -> Result<u64, Fail> {
    shimline::u64_field(obj, name).map_err(invalid)
}

fn str_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, Fail> {
    shimline::str_field(obj, name).map_err(invalid)
}

fn uuid_field(obj: &Map<String, Value>, name: &str) -> Result<uuid::Uuid, Fail> {
    uuid_of(name, str_field(obj, name)?)
}

/// Field `name`'s string as a UUID.
fn uuid_of(name: &str, s: &str) -> Result<uuid::Uuid, Fail> {
    uuid::Uuid::parse_str(s).map_err(|_| invalid(format!("{name} must be a UUID")))
}

/// A list of strings.
fn words_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Vec<&'a str>, Fail> {
    let arr = field(obj, name)?
        .as_array()
        .ok_or_else(|| invalid(format!("{name} must be a list")))?;
    arr.iter()
        .map(|w| {
            w.as_str()
                .ok_or_else(|| invalid(format!("{name} must list strings")))
        })
        .collect()
}

/// Field `name`'s words as rights.
fn rights_of(name: &str, words: &[&str]) -> Result<Rights, Fail> {
    Rights::from_words(words.iter().copied()).map_err(|e| invalid(format!("{name}: {e}")))
}

/// The optional `replay` flag. One of another type is
/// STATUS_INVALID_PARAMETER, as the spec says of every mistyped field
/// (before, it was read as false: rvspec 5).
fn is_replay(obj: &Map<String, Value>) -> Result<bool, Fail> {
    match obj.get("replay") {
        None | Some(Value::Null) => Ok(false),
        Some(v) => v.as_bool().ok_or_else(|| invalid("replay must be a bool")),
    }
}

/// The session named by the request, which must be alive.
fn session_of(sh: &Shared, obj: &Map<String, Value>) -> Result<(u64, uuid::Uuid, String), Fail> {
    session_by_id(sh, u64_field(obj, "session_id")?)
}

/// Session `id`, which must be alive.
fn session_by_id(sh: &Shared, id: u64) -> Result<(u64, uuid::Uuid, String), Fail> {
    let sessions = sh
        .sessions
        .lock()
        .map_err(|_| Fail("STATUS_INTERNAL_ERROR", "lock".into()))?;
    match sessions.get(&id) {
        Some(s) if s.alive => Ok((id, s.client_guid, s.user.clone())),
        _ => Err(Fail(
            "STATUS_USER_SESSION_DELETED",
            format!("no session {id}"),
        )),
    }
}

/// Whether session `id` is alive (no copy of its fields).
fn session_alive(sh: &Shared, id: u64) -> bool {
    sh.sessions
        .lock()
        .map(|s| s.get(&id).is_some_and(|x| x.alive))
        .unwrap_or(false)
}

fn client_id(guid: uuid::Uuid) -> Result<ClientId, Fail> {
    ClientId::new(guid.to_string()).map_err(|e| invalid(e.to_string()))
}

/// The longest user name SESSION_SETUP takes, in bytes.
const MAX_USER_BYTES: usize = 1024;

fn session_setup(sh: &Shared, conn: u64, obj: &Map<String, Value>) -> Outcome {
    let client_guid = uuid_field(obj, "client_guid")?;
    let user = str_field(obj, "user")?.to_owned();
    // The user is every open's owner in filterd, which refuses one over
    // 4 KiB: a longer name made a session whose every CREATE failed
    // (re-review rr37f).
    if user.len() > MAX_USER_BYTES {
        return Err(invalid(format!(
            "user must be at most {MAX_USER_BYTES} bytes"
        )));
    }
    // A mistyped previous_session_id is refused before anything is torn
    // down (before, one of another type was ignored: rvspec 5).
    let previous = match obj.get("previous_session_id") {
        None | Some(Value::Null) => None,
        Some(_) => Some(u64_field(obj, "previous_session_id")?),
    };
    if let Some(prev) = previous {
        let same = sh
            .sessions
            .lock()
            .ok()
            .and_then(|s| {
                s.get(&prev)
                    .map(|p| p.client_guid == client_guid && p.user == user)
            })
            .unwrap_or(false);
        if same {
            end_session(sh, prev, false);
        }
    }
    let peer = sh
        .peers
        .lock()
        .ok()
        .and_then(|p| p.get(&conn).copied())
        .map_or(Peer::Connection(conn), Peer::Addr);
    let id = {
        let mut s = sh
            .sessions
            .lock()
            .map_err(|_| Fail("STATUS_INTERNAL_ERROR", "lock".into()))?;
        let max = sh.limits.max_sessions_per_connection;
        if s.values().filter(|x| x.conn == conn).count() >= max {
            return Err(Fail(
                "STATUS_INSUFFICIENT_RESOURCES",
                format!("this connection has {max} sessions (--max-sessions-per-connection)"),
            ));
        }
        let id = new_session_id(|id| s.contains_key(&id));
        s.insert(
            id,
            Session {
                client_guid,
                user,
                conn,
                peer,
                alive: true,
                end: SessionEnd::default(),
                settling: Vec::new(),
                closing: Vec::new(),
                logging_off: 0,
            },
        );
        id
    };
    let mut m = Map::new();
    m.insert("session_id".into(), json!(id));
    m.insert("dialect".into(), json!("smbl/1"));
    m.insert(
        "capabilities".into(),
        json!(["durable_v2", "persistent", "leasing", "lock_sequence"]),
    );
    Ok(m)
}

/// Largest session id handed out: 2^53 - 1, the largest integer every
/// JSON reader keeps exactly (a double's mantissa: JavaScript, jq).
const MAX_SESSION_ID: u64 = (1 << 53) - 1;

/// A fresh session id: random, non-zero, at most [`MAX_SESSION_ID`], and
/// not `taken`. A session id is the only thing a request shows for its
/// session — any connection may name it (a client's new connection goes
/// on with its session) — so it must not be guessable: counted from 1,
/// any peer could LOGOFF (or CREATE and LOCK in) every other client's
/// session by naming 1, 2, 3…, closing their persistent opens
/// (review rv-shims 1).
fn new_session_id(taken: impl Fn(u64) -> bool) -> u64 {
    loop {
        let id = uuid::Uuid::new_v4().as_u64_pair().0 & MAX_SESSION_ID;
        if id != 0 && !taken(id) {
            return id;
        }
    }
}

fn disposition(s: &str) -> Result<Disposition, Fail> {
    Ok(match s {
        "open" => Disposition::Open,
        "create" => Disposition::Create,
        "open_if" => Disposition::OpenIf,
        "overwrite" => Disposition::Overwrite,
        "overwrite_if" => Disposition::OverwriteIf,
        "supersede" => Disposition::Supersede,
        other => return Err(invalid(format!("unknown disposition {other:?}"))),
    })
}

/// A CREATE's fields as JSON types, their meaning not yet checked
/// ([`create_with`]): taken from a parsed object ([`CreateFields::of`]) or,
/// on the reader's fast path, decoded straight from the line
/// ([`InlineLine`]).
struct CreateFields<'a> {
    path: &'a str,
    access: Vec<&'a str>,
    share: Vec<&'a str>,
    disposition: &'a str,
    lease: Option<LeaseFields<'a>>,
    durable: Option<DurableFields<'a>>,
    replay: bool,
}

/// CREATE's `lease`.
#[derive(serde::Deserialize)]
struct LeaseFields<'a> {
    key: &'a str,
    state: &'a str,
}

/// CREATE's `durable`.
#[derive(serde::Deserialize)]
struct DurableFields<'a> {
    create_guid: &'a str,
    persistent: bool,
    timeout_ms: u64,
}

impl<'a> CreateFields<'a> {
    /// The fields of a parsed CREATE, or the error naming the first of
    /// the wrong type or missing.
    fn of(obj: &'a Map<String, Value>) -> Result<Self, Fail> {
        let path = str_field(obj, "path")?;
        let access = words_field(obj, "access")?;
        let share = words_field(obj, "share")?;
        let disposition = str_field(obj, "disposition")?;
        let lease = match obj.get("lease") {
            None | Some(Value::Null) => None,
            Some(Value::Object(l)) => Some(LeaseFields {
                key: str_field(l, "key")?,
                state: str_field(l, "state")?,
            }),
            Some(_) => return Err(invalid("lease must be an object")),
        };
        let durable = match obj.get("durable") {
            None | Some(Value::Null) => None,
            Some(Value::Object(d)) => Some(DurableFields {
                create_guid: str_field(d, "create_guid")?,
                persistent: field(d, "persistent")?
                    .as_bool()
                    .ok_or_else(|| invalid("persistent must be a bool"))?,
                timeout_ms: u64_field(d, "timeout_ms")?,
            }),
            Some(_) => return Err(invalid("durable must be an object")),
        };
        Ok(CreateFields {
            path,
            access,
            share,
            disposition,
            lease,
            durable,
            replay: is_replay(obj)?,
        })
    }
}

/// CREATE; with `no_wait`, a needed lease break fails it with
/// STATUS_FILE_NOT_AVAILABLE instead of waiting (the breaks are sent).
fn create(sh: &Shared, obj: &Map<String, Value>, no_wait: bool, after: &mut AfterReply) -> Outcome {
    let session = session_of(sh, obj)?;
    let created = create_with(sh, session, &CreateFields::of(obj)?, no_wait, after)?;
    match serde_json::to_value(created) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Fail("STATUS_INTERNAL_ERROR", "reply encoding".into())),
    }
}

/// CREATE by `session` (its id, client GUID and user) with fields `f`.
fn create_with(
    sh: &Shared,
    (session, client_guid, user): (u64, uuid::Uuid, String),
    f: &CreateFields<'_>,
    no_wait: bool,
    after: &mut AfterReply,
) -> Result<Created, Fail> {
    let path =
        RelPath::new(f.path).map_err(|e| Fail("STATUS_OBJECT_NAME_INVALID", e.to_string()))?;
    let access =
        Access::new(rights_of("access", &f.access)?).map_err(|e| invalid(e.to_string()))?;
    let share = rights_of("share", &f.share)?;
    let disp = disposition(f.disposition)?;
    let lease_req = match &f.lease {
        None => None,
        Some(l) => {
            let key = libfilter::lease::LeaseKey(uuid_of("key", l.key)?);
            // The spec's four spellings only: "H" alone (which SMB has
            // no such lease for) and reordered ones ("WR") were taken
            // before (rvspec 7).
            let state = Some(l.state)
                .filter(|s| matches!(*s, "R" | "RH" | "RW" | "RWH"))
                .and_then(libfilter::lease::LeaseState::parse)
                .ok_or_else(|| invalid("lease state must be R, RH, RW or RWH"))?;
            Some(LeaseRequest {
                key,
                state,
                epoch: 0,
            })
        }
    };
    let wants_h = lease_req.is_some_and(|l| l.state.contains(libfilter::lease::LeaseState::H));
    let (durability, create_guid) = match &f.durable {
        Some(d) => durable_request(d, wants_h)?,
        None => (Durability::None, None),
    };
    let req = OpenRequest {
        create_guid: create_guid.map(CreateGuid),
        owner: Some(user),
        lease: lease_req,
        no_wait,
        ..OpenRequest::new(
            client_id(client_guid)?,
            path,
            access,
            share,
            disp,
            durability,
        )
    };
    let (member, m) = sh.member_for(client_guid)?;
    let replay = f.replay && create_guid.is_some();
    // A replay claims its open by create GUID: one a session's end is
    // letting go is waited for (filterd could otherwise hand it back
    // still attached, and the detach land after), others are not.
    let _takeover = match create_guid.filter(|_| replay) {
        Some(g) => Some(take_over(
            sh,
            Ident {
                key: None,
                guid: Some((client_guid, g)),
            },
        )?),
        None => None,
    };
    // A replay of an open its peer holds returns that open, counted by
    // the open's own slot: it takes no new one (attack45 F3: a peer at
    // its share re-sending an acknowledged CREATE on its live session was
    // refused STATUS_INSUFFICIENT_RESOURCES, not given the original).
    // Any other CREATE is a new open of the peer's and counts; so does a
    // replay that turns out to return another open (checked again where
    // the open is stored).
    let peer = session_peer(sh, session)?;
    let counted = match create_guid.filter(|_| replay) {
        Some(g) if peer_holds(sh, peer, client_guid, g) => None,
        _ => Some(peer_slot(sh, session)?),
    };
    let _slot = open_slot(sh)?;
    let end = session_end(sh, session)?;
    // Remembered while the call is in flight, kept if it goes unanswered:
    // the session's LOGOFF closes what filterd may make of it.
    let in_flight = create_guid.map(|g| InFlight::note(sh, session, client_guid, g));
    // Once filterd has answered it, granting an open under a lease, and
    // until the open is stored (or the CREATE failed), a break of that
    // lease waits for it ([`crate::early_breaks`]).
    let making = m.early.begin(client_guid);
    // From before filterd is asked: a close of the handle it hands back
    // made since then refuses the replay ([`closing_first`]).
    let watch = replay.then(|| sh.closes_made.replay());
    let opened = marking_answers(making.mark(), || {
        if replay {
            m.filter.replay_open_for(req, &end)
        } else {
            // Its client, told STATUS_FILE_NOT_AVAILABLE should filterd
            // answer too late, replays the create GUID: a late durable
            // open waits for that replay (until the session's LOGOFF).
            m.filter.open_replayed_by_guid(req, &end)
        }
    });
    // A fresh CREATE filterd refused made nothing: forgotten. Anything
    // else keeps the GUID until the open is stored below: no answer (the
    // open may be made late), a replay refused (its original may be there,
    // detached: `Retry` while it is made), or an open made and then not
    // handed out (the retry status below, the open detached for the next
    // replay). A GUID kept for nothing costs its LOGOFF one `NoSuchHandle`
    // (review rr-logoff2 1: a replay answered the retry status took the
    // GUID from its session, and no LOGOFF closed the late open).
    let in_flight = match (in_flight, &opened) {
        (Some(f), Err(e))
            if !replay && !matches!(e, ClientError::Timeout(_) | ClientError::Disconnected) =>
        {
            f.answered();
            None
        }
        (f, _) => f,
    };
    let h = opened.map_err(|e| match e.code() {
        // Only an open filterd refused for a lease break goes to the
        // worker: after a timeout or a lost link it may have been made, and
        // running it again would not be exactly once (the client replays).
        Some(ErrorCode::Busy) if no_wait => Fail(INLINE_BUSY, e.to_string()),
        _ => filter_fail(e),
    })?;
    test_hold_store();
    // Refused (like the two refusals below) with the GUID forgotten: the
    // open it names is the original's, whose CLOSE came first; kept, the
    // replaying session's LOGOFF would close it by GUID — after the close
    // was undone, even one waiting detached for its client's RECONNECT
    // (re-review rr41a 3).
    let refused = |fail: Fail, in_flight: Option<InFlight<'_>>| {
        if let Some(f) = in_flight {
            f.answered();
        }
        fail
    };
    let in_flight = match closing_first(sh, m, h.info.key, watch.as_ref()) {
        Ok(()) => in_flight,
        Err(fail) => return Err(refused(fail, in_flight)),
    };
    note_locked(m, &h.info);
    let file_id = h.info.key.to_string();
    let granted = create_guid.and_then(|g| grant_of(&h.info, g));
    // The rights the open holds: a fresh open has what it asked for; a
    // replay may have found an original that asked for other rights, which
    // are the record's (never the replay's request).
    let rights = if replay {
        test_hold_query();
        match handle_view(m, h.info.key, || {
            Fail(
                "STATUS_FILE_NOT_AVAILABLE",
                "the open was closed while it was replayed".into(),
            )
        }) {
            Ok(v) => v.record.access.rights(),
            Err(e) => {
                // Taken over for nothing: let go of it unless the open
                // is stored (the claim keeps other takeovers out).
                let stored = sh.opens.lock().map_or(true, |o| o.contains_key(&file_id));
                if stored {
                    // Its session holds it (and closes it by the table).
                    return Err(refused(e, in_flight));
                }
                // A CLOSE took the open meanwhile (its close in flight,
                // settling or made): that close has the handle, and the
                // GUID names the open it closes; detached here, the
                // handle would be let go from under it (re-review rr41f
                // F3). Refused, the GUID released, as the first check.
                if closing_first(sh, m, h.info.key, watch.as_ref()).is_err() {
                    return Err(refused(e, in_flight));
                }
                // Made by this replay, maybe, and detached now for the
                // next one: the GUID stays, for a LOGOFF to close.
                let key = h.info.key;
                drop(h);
                let_go(m, key, granted.is_some());
                return Err(e);
            }
        }
    } else {
        access.rights()
    };
    if replay {
        test_hold_replay();
    }
    // Whether the session lives is checked under the opens lock, and the
    // open stored before it goes: a session that ended while filterd made
    // the open (a LOGOFF, or a SESSION_SETUP naming it as
    // `previous_session_id`, on another connection) took its opens before
    // this one was stored, and nothing would ever close it (review uE).
    // `end_session` removes the session before it takes the opens lock, so
    // an open stored while the session lived is among those it takes.
    let mut opens = sh
        .opens
        .lock()
        .map_err(|_| Fail("STATUS_INTERNAL_ERROR", "lock".into()))?;
    if !session_alive(sh, session) {
        // Let go as the session's end would have (a replay that found a
        // stored original leaves it to whoever holds it).
        if !opens.contains_key(&file_id) {
            let key = h.info.key;
            let claim = (!replay).then(|| {
                sh.handovers.letting_go(Ident {
                    key: Some(key),
                    guid: create_guid.map(|g| (client_guid, g)),
                })
            });
            drop(opens);
            drop(h);
            let mine = match &claim {
                Some(c) => {
                    c.wait_takeovers();
                    !sh.opens.lock().map_or(true, |o| o.contains_key(&file_id))
                }
                None => true,
            };
            if mine && end.has_ended() {
                // Ended by a LOGOFF, which closes durable opens too.
                close_for_good(m, key, None);
            } else if mine {
                let_go(m, key, granted.is_some());
            }
        }
        return Err(Fail(
            "STATUS_USER_SESSION_DELETED",
            format!("session {session} ended while the open was made"),
        ));
    }
    // A replay that took no slot must return the open its peer holds:
    // any other open (that one closed meanwhile, or held under another
    // peer) is counted now, or refused and let go as one not handed out.
    let counted = match counted {
        Some(c) => Some(c),
        None if opens.get(&file_id).is_some_and(|o| o.counted.peer == peer) => None,
        None => match peer_slot(sh, session) {
            Ok(c) => Some(c),
            Err(fail) if opens.contains_key(&file_id) => return Err(refused(fail, in_flight)),
            Err(fail) => {
                // A CLOSE that took it meanwhile has the handle.
                if closing_first(sh, m, h.info.key, watch.as_ref()).is_err() {
                    return Err(refused(fail, in_flight));
                }
                // Detached for the next replay: the GUID stays, for a
                // LOGOFF to close.
                let key = h.info.key;
                drop(opens);
                drop(h);
                let_go(m, key, granted.is_some());
                return Err(fail);
            }
        },
    };
    if let Some(existing) = opens.get_mut(&file_id) {
        // A replay that found the original open.
        let other_alive = existing.session != session
            && sh
                .sessions
                .lock()
                .ok()
                .and_then(|s| s.get(&existing.session).map(|x| x.alive))
                .unwrap_or(false);
        if other_alive {
            return Err(Fail(
                "STATUS_DUPLICATE_OBJECTID",
                "the open is attached to another live session".into(),
            ));
        }
        existing.session = session;
        // Counted under its new session's peer from now on (a replay
        // that took no slot: its peer's already).
        if let Some(c) = counted {
            existing.counted = c;
        }
    } else {
        // Always a slot here: none only for an open found stored above,
        // under the same lock.
        let Some(counted) = counted else {
            return Err(Fail("STATUS_INTERNAL_ERROR", "open vanished".into()));
        };
        // Checked again under the opens lock, under which a CLOSE takes
        // the open out of the table and notes its close in flight: one
        // that took it since the check above (while filterd answered the
        // handle query) is seen here, in flight or made.
        if let Err(fail) = closing_first(sh, m, h.info.key, watch.as_ref()) {
            return Err(refused(fail, in_flight));
        }
        opens.insert(
            file_id.clone(),
            Open {
                member,
                key: h.info.key,
                file_key: h.info.file,
                session,
                client: client_guid,
                create_guid,
                io: Io::of(&h.fd).within(rights),
                file: Arc::new(std::fs::File::from(h.fd).into()),
                durable: granted,
                create_action: h.info.create_action,
                lease: h.info.lease,
                counted,
                // A fresh open has none; a replay's original may have.
                delete_told: (!replay).then_some(false),
                delete_unsure: false,
                held: None,
            },
        );
    }
    let stored = (file_id.as_str(), h.info.lease);
    let early = deliver_early_breaks(sh, m, &mut opens, stored, making.number(), after);
    if let Some(g) = create_guid.filter(|_| replay) {
        held_by_a_session(sh, client_guid, g);
    }
    // Stored: a LOGOFF closes it with the session's table, not by GUID.
    if let Some(f) = in_flight {
        f.answered();
    }
    let o = opens
        .get(&file_id)
        .ok_or_else(|| Fail("STATUS_INTERNAL_ERROR", "open vanished".into()))?;
    let created = Created {
        create_action: o.create_action.to_string(),
        size: h.info.size,
        durable: o.durable,
        lease: h.info.lease.or(o.lease).map(LeaseShown::of),
        file_id,
    };
    drop(opens);
    early_breaks_fall_back(sh, session, early);
    if after.0.is_some() {
        test_hold_reply();
    }
    Ok(created)
}

/// The marker of session `id`'s end for good ([`SessionEnd`]).
fn session_end(sh: &Shared, id: u64) -> Result<SessionEnd, Fail> {
    sh.sessions
        .lock()
        .ok()
        .and_then(|s| s.get(&id).map(|x| x.end.clone()))
        .ok_or_else(|| Fail("STATUS_USER_SESSION_DELETED", format!("no session {id}")))
}

/// A CREATE's create GUID, remembered by its session while the CREATE's
/// filterd call is in flight and forgotten only when the CREATE is known
/// to have left no open to close ([`InFlight::answered`]: refused fresh,
/// or stored in the open table); dropped otherwise — an error returned
/// anywhere after the call — it stays: filterd may make the open late, or
/// made it and it waits detached, and the session's LOGOFF closes it by
/// GUID ([`close_unanswered`]). Remembered before the call, not after it
/// failed: a LOGOFF (from another connection) while it is in flight takes
/// it too, and finds the open detached or has it closed when its late
/// answer comes ([`SessionEnd`]).
///
/// The GUID is the noting session's alone from then on: a replay of it on
/// another session of the client takes it from the session that sent it
/// before, whose LOGOFF then leaves it (review rr-logoff 1; see
/// [`Unanswered`]).
struct InFlight<'a> {
    sh: &'a Shared,
    session: u64,
    client: uuid::Uuid,
    guid: uuid::Uuid,
}

impl<'a> InFlight<'a> {
    fn note(sh: &'a Shared, session: u64, client: uuid::Uuid, guid: uuid::Uuid) -> InFlight<'a> {
        // Under the sessions lock: a session that ended (`end_session`)
        // is not noted for.
        if let Ok(s) = sh.sessions.lock() {
            if s.contains_key(&session) {
                if let Ok(mut u) = sh.unanswered.lock() {
                    u.note(client, session, guid);
                }
            }
        }
        InFlight {
            sh,
            session,
            client,
            guid,
        }
    }

    /// The CREATE left no open a LOGOFF must close by GUID: forgotten
    /// (if its session still owns it).
    fn answered(self) {
        if let Ok(mut u) = self.sh.unanswered.lock() {
            u.answered(self.client, self.session, self.guid);
        }
    }
}

/// The open of `client`'s create GUID `guid` is held by a session now (a
/// replay or RECONNECT took it): no session's LOGOFF may close it by GUID,
/// even one already logged off whose closer has yet to come to it, and
/// even once the open is detached again (its session's connection lost,
/// the client to RECONNECT it: review rr-logoff 2).
fn held_by_a_session(sh: &Shared, client: uuid::Uuid, guid: uuid::Uuid) {
    if let Ok(mut u) = sh.unanswered.lock() {
        u.taken(client, guid);
    }
}

/// What a CREATE's `durable` asks filterd for: the durability, and the
/// create GUID. The GUID goes with every CREATE that carries `durable`,
/// granted or not: it is what finds the original open for a replay and
/// refuses a duplicate (spec "Create replay"), and a replay may ask for
/// less than the original did, e.g. a lease without H — it must still find
/// the open and run nothing again (a second truncation, review r4 #1).
/// Persistent opens are always durable; a non-persistent one only with an
/// H lease asked for (and granted, [`grant_of`]).
fn durable_request(
    d: &DurableFields<'_>,
    wants_h: bool,
) -> Result<(Durability, Option<uuid::Uuid>), Fail> {
    let guid = uuid_of("create_guid", d.create_guid)?;
    let t = u32::try_from(d.timeout_ms).map_err(|_| invalid("timeout_ms too large"))?;
    let timeout_ms = if t == 0 {
        DEFAULT_DURABLE_TIMEOUT_MS
    } else {
        t.min(300_000)
    };
    let durability = if d.persistent {
        Durability::Persistent { timeout_ms }
    } else if wants_h {
        Durability::Durable { timeout_ms }
    } else {
        Durability::None
    };
    Ok((durability, Some(guid)))
}

/// The durability an open made (or found by a replay) under create GUID
/// `guid` holds, as the reply shows it: the open as it is, not as the
/// request asked. A durable (not persistent) open counts only while its
/// lease has H; without it, it is served as a plain open and closed on
/// disconnect.
fn grant_of(info: &libfilter::proto::Opened, guid: uuid::Uuid) -> Option<Grant> {
    let persistent = match info.durability {
        Durability::Persistent { .. } => true,
        Durability::Durable { .. }
            if info
                .lease
                .is_some_and(|l| l.state.contains(libfilter::lease::LeaseState::H)) =>
        {
            false
        }
        _ => return None,
    };
    Some(Grant {
        create_guid: guid,
        persistent,
        timeout_ms: info.durability.timeout_ms(),
    })
}

/// A successful CREATE's reply fields (`durable` and `lease` null when
/// absent).
#[derive(serde::Serialize)]
struct Created {
    file_id: String,
    create_action: String,
    size: u64,
    durable: Option<Grant>,
    lease: Option<LeaseShown>,
}

/// A granted durable open as replies show it (`durable`), keys in a `Value`
/// map's order so the line is what the map wrote (issue #16: building,
/// cloning and dropping these maps was ~7% of smbshim's instructions per
/// CREATE+CLOSE).
#[derive(Clone, Copy, serde::Serialize)]
struct Grant {
    create_guid: uuid::Uuid,
    persistent: bool,
    timeout_ms: Option<u32>,
}

/// A held lease as replies show it (`lease`), keys in a `Value` map's
/// order.
#[derive(serde::Serialize)]
struct LeaseShown {
    epoch: u16,
    key: libfilter::lease::LeaseKey,
    #[serde(serialize_with = "as_text")]
    state: libfilter::lease::LeaseState,
}

impl LeaseShown {
    fn of(l: HeldLease) -> LeaseShown {
        LeaseShown {
            epoch: l.epoch,
            key: l.key,
            state: l.state,
        }
    }
}

fn as_text<S: serde::Serializer>(v: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A reply line built without a `Value` tree: `mid`, `status` and the
/// fields of `body` (for the reader's typed CREATE, [`answer_typed`]).
#[derive(serde::Serialize)]
struct Answer<T> {
    mid: u64,
    status: &'static str,
    #[serde(flatten)]
    body: T,
}

/// What the connection's reader answers a line with.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Reply {
    Json(Value),
    Created(Answer<Created>),
}

/// The handle `key` as filterd knows it; `missing` if it has none.
fn handle_view(
    m: &Member,
    key: ResumeKey,
    missing: impl FnOnce() -> Fail,
) -> Result<libfilter::proto::HandleView, Fail> {
    match m.filter.client().call(libfilter::proto::Request::Handle {
        key,
        learning: false,
    }) {
        Ok((libfilter::proto::Reply::Handle(v), _)) => Ok(v),
        Ok(_) => Err(Fail(
            "STATUS_INTERNAL_ERROR",
            "filterd answered a handle query with something else".into(),
        )),
        Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => Err(missing()),
        Err(e) => Err(filter_fail(e)),
    }
}

/// Claims open `id` for a takeover ([`Handovers::take_over`]), waiting up
/// to [`LETTING_GO_WAIT`] for a session's end letting it go.
fn take_over(sh: &Shared, id: Ident) -> Result<crate::handover::TakingOver<'_>, Fail> {
    sh.handovers.take_over(id, LETTING_GO_WAIT).ok_or_else(|| {
        Fail(
            "STATUS_FILE_NOT_AVAILABLE",
            "the open is still being let go by its session's end; try again".into(),
        )
    })
}

/// Lets go of handle `key`, attached for an open that was not stored: a
/// `durable` one waits for its reconnect or replay, any other is closed.
/// A failure leaves nothing attached to this member, so nothing is made
/// again (a review asked; `failed_close.rs`
/// `a_replay_whose_handle_query_and_let_go_fail_leaves_the_original_waiting`):
/// filterd never undoes a detach (the frontend forgot the handle), and
/// one never answered still runs, or a restarted filterd has the handle
/// disconnected (the attachment forgot it first); the handle closed is
/// never persistent (those are durable) so its close commits nothing to
/// undo. A durable one is never closed here: its client's replay is to
/// find it, where a new open would run the CREATE again (an overwrite
/// truncating the file a second time).
fn let_go(m: &Member, key: ResumeKey, durable: bool) {
    let r = if durable {
        m.filter.detach(key)
    } else {
        m.filter.close(key)
    };
    if let Err(e) = r {
        eprintln!("smbshim: letting go of handle {key}, of no open: {e}");
    }
}

fn reconnect(sh: &Shared, _conn: u64, obj: &Map<String, Value>, after: &mut AfterReply) -> Outcome {
    let (session, client_guid, user) = session_of(sh, obj)?;
    let end = session_end(sh, session)?;
    let file_id = str_field(obj, "file_id")?.to_owned();
    let guid = uuid_field(obj, "create_guid")?;
    let key: ResumeKey = file_id
        .parse()
        .map_err(|_| Fail("STATUS_OBJECT_NAME_NOT_FOUND", "bad file_id".into()))?;
    let not_found = || {
        Fail(
            "STATUS_OBJECT_NAME_NOT_FOUND",
            "no disconnected durable open with these ids".into(),
        )
    };
    // The member that owns the client's handles (they were opened through
    // it, by this smbshim or a predecessor with the same instance name).
    let (member, m) = sh.member_for(client_guid)?;
    // Claimed for the whole takeover: a session's end letting the open
    // go is waited for (the handle is still attached until its detach),
    // and one that starts meanwhile waits before it detaches.
    let _takeover = take_over(
        sh,
        Ident {
            key: Some(key),
            guid: Some((client_guid, guid)),
        },
    )?;
    // The handle as the filter knows it: same create GUID, same user.
    // Only "no such handle" says there is no open to reconnect; filterd
    // away or stalled is the retry status (not found is final: the client
    // would give up an open that is there).
    let view = handle_view(m, key, not_found)?;
    if view.record.create_guid != Some(CreateGuid(guid))
        || view.record.client.as_str() != client_guid.to_string()
    {
        return Err(not_found());
    }
    if view.record.owner.as_deref() != Some(user.as_str()) {
        return Err(Fail("STATUS_ACCESS_DENIED", "another user's open".into()));
    }
    if let Some(l) = view.record.lease {
        let named = match obj.get("lease_key") {
            None | Some(Value::Null) => None,
            Some(_) => Some(uuid_field(obj, "lease_key")?),
        };
        if named != Some(l.key.0) {
            return Err(Fail(
                "STATUS_OBJECT_NAME_NOT_FOUND",
                "the open holds a lease: lease_key must name it".into(),
            ));
        }
    }
    let counted = peer_slot(sh, session)?;
    let _slot = open_slot(sh)?;
    // As for a CREATE: a break of its lease waits for the open's store.
    let making = m.early.begin(client_guid);
    let client = client_id(client_guid)?;
    let resumed = marking_answers(making.mark(), || m.filter.resume(client, key));
    let h = resumed.map_err(|e| match e.code() {
        Some(ErrorCode::NoSuchHandle) => not_found(),
        // Held by another frontend instance (another smbshim, or a pool
        // member this client is no longer pinned to after a restart with
        // another --filter-connections): smbl/1 says not found, so the
        // client opens anew instead of giving up.
        Some(ErrorCode::NotOwner) => Fail(
            "STATUS_OBJECT_NAME_NOT_FOUND",
            format!("the open is held through another frontend instance ({e})"),
        ),
        _ => filter_fail(e),
    })?;
    note_locked(m, &h.info);
    let durable = Grant {
        create_guid: guid,
        persistent: view.record.durability.is_persistent(),
        timeout_ms: view.record.durability.timeout_ms(),
    };
    let mut opens = sh
        .opens
        .lock()
        .map_err(|_| Fail("STATUS_INTERNAL_ERROR", "lock".into()))?;
    // As in `create_with`: a session that ended meanwhile would never
    // let go of the open; it goes back to waiting for a reconnect.
    if !session_alive(sh, session) {
        drop(opens);
        drop(h.fd);
        if end.has_ended() {
            // By a LOGOFF, which closes durable opens too.
            close_for_good(m, key, None);
        } else {
            let _ = m.filter.detach(key);
        }
        return Err(Fail(
            "STATUS_USER_SESSION_DELETED",
            format!("session {session} ended while the open was reconnected"),
        ));
    }
    held_by_a_session(sh, client_guid, guid);
    opens.insert(
        file_id.clone(),
        Open {
            member,
            key,
            file_key: h.info.file,
            session,
            client: client_guid,
            create_guid: Some(guid),
            // The rights the open was granted, as its record keeps them.
            io: Io::of(&h.fd).within(view.record.access.rights()),
            file: Arc::new(std::fs::File::from(h.fd).into()),
            durable: Some(durable),
            create_action: h.info.create_action,
            lease: h.info.lease,
            counted,
            delete_told: Some(view.record.delete_on_close),
            delete_unsure: false,
            held: None,
        },
    );
    let stored = (file_id.as_str(), h.info.lease);
    let early = deliver_early_breaks(sh, m, &mut opens, stored, making.number(), after);
    drop(opens);
    early_breaks_fall_back(sh, session, early);
    let mut m = Map::new();
    m.insert("file_id".into(), json!(file_id));
    m.insert("size".into(), json!(h.info.size));
    m.insert("durable".into(), json!(durable));
    m.insert("lease".into(), lease_json(h.info.lease));
    Ok(m)
}

/// What a request needs of its open.
struct OpenRef {
    /// The session it was found in: a close takes it only while it is
    /// still that session's ([`close_taken`]).
    session: u64,
    member: usize,
    file_id: String,
    key: ResumeKey,
    file_key: FileId,
    file: Arc<shimline::datasync::SyncedFile>,
    io: Io,
    durable: bool,
    persistent: bool,
}

/// Whether an open may read and write. READ and WRITE check it before any
/// pread/pwrite: a client that writes through an open made without write
/// access (or reads without read) is told STATUS_ACCESS_DENIED, not a disk
/// or server error made of the EBADF the kernel answers (review r4 #2).
/// The open's granted rights decide ([`Io::within`]); the descriptor's
/// mode alone does not, since filterd gives an open without `write` (a
/// delete-only one too) a read-only descriptor: such an open reading would
/// bypass the share modes of opens that did not share `read`.
#[derive(Clone, Copy)]
struct Io {
    read: bool,
    write: bool,
}

impl Io {
    fn of(fd: &impl std::os::fd::AsFd) -> Io {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = fcntl(fd, FcntlArg::F_GETFL).map_or(OFlag::O_PATH, OFlag::from_bits_retain);
        if flags.contains(OFlag::O_PATH) {
            return Io {
                read: false,
                write: false,
            };
        }
        let mode = flags & OFlag::O_ACCMODE;
        Io {
            read: mode == OFlag::O_RDONLY || mode == OFlag::O_RDWR,
            write: mode == OFlag::O_WRONLY || mode == OFlag::O_RDWR,
        }
    }

    /// What the descriptor may do and the open was granted (`rights`: at
    /// create, the request's; after a replay or RECONNECT, the record's).
    fn within(self, rights: Rights) -> Io {
        Io {
            read: self.read && rights.contains(Rights::READ),
            write: self.write && rights.contains(Rights::WRITE),
        }
    }

    /// STATUS_ACCESS_DENIED unless the open may `write` (else read).
    fn allows(self, write: bool) -> Result<(), Fail> {
        match (write, self.write, self.read) {
            (true, true, _) | (false, _, true) => Ok(()),
            (true, false, _) => Err(Fail(
                "STATUS_ACCESS_DENIED",
                "the open was made without write access".into(),
            )),
            (false, _, false) => Err(Fail(
                "STATUS_ACCESS_DENIED",
                "the open was made without read access".into(),
            )),
        }
    }
}

/// STATUS_INVALID_PARAMETER for a READ or WRITE of `length` bytes at
/// `offset` past the largest file offset (bad input, not a disk or server
/// failure).
fn in_file_range(offset: u64, length: u64) -> Result<(), Fail> {
    if shimline::datasync::in_file_range(offset, length) {
        return Ok(());
    }
    Err(invalid(format!(
        "offset {offset} + length {length} is past the largest file offset"
    )))
}

/// The status of a failed pread, pwrite or data sync.
fn io_fail(e: &std::io::Error) -> Fail {
    let status = match IoFailure::of(e) {
        IoFailure::NoSpace => "STATUS_DISK_FULL",
        IoFailure::BadRange => "STATUS_INVALID_PARAMETER",
        IoFailure::Server => "STATUS_INTERNAL_ERROR",
    };
    Fail(status, e.to_string())
}

fn note_locked(m: &Member, info: &libfilter::proto::Opened) {
    if info.locked {
        if let Ok(mut l) = m.locked_files.lock() {
            l.insert(info.file);
        }
    }
}

/// The open named by the request, which must belong to the request's session.
fn open_of(sh: &Shared, obj: &Map<String, Value>) -> Result<OpenRef, Fail> {
    let (session, _, _) = session_of(sh, obj)?;
    open_in(sh, session, str_field(obj, "file_id")?)
}

/// Open `file_id`, which must belong to session `session`.
fn open_in(sh: &Shared, session: u64, file_id: &str) -> Result<OpenRef, Fail> {
    let opens = sh
        .opens
        .lock()
        .map_err(|_| Fail("STATUS_INTERNAL_ERROR", "lock".into()))?;
    match opens.get(file_id) {
        Some(o) if o.session == session => Ok(OpenRef {
            session,
            member: o.member,
            key: o.key,
            file_key: o.file_key,
            file: o.file.clone(),
            io: o.io,
            durable: o.durable.is_some(),
            persistent: o.durable.is_some_and(|d| d.persistent),
            file_id: file_id.to_owned(),
        }),
        _ => Err(Fail(
            "STATUS_FILE_CLOSED",
            format!("no open {file_id} in this session"),
        )),
    }
}

fn read(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    let offset = u64_field(obj, "offset")?;
    let length =
        usize::try_from(u64_field(obj, "length")?).map_err(|_| invalid("length too large"))?;
    if length > MAX_LINE {
        return Err(invalid("length larger than 4 MiB"));
    }
    in_file_range(offset, u64::try_from(length).unwrap_or(u64::MAX))?;
    let o = open_of(sh, obj)?;
    o.io.allows(false)?;
    let file = o.file.clone();
    let pass = check_io(
        sh,
        &o,
        offset,
        u64::try_from(length).unwrap_or(u64::MAX),
        false,
    )?;
    let mut buf = vec![0u8; length];
    let n = file.read_at(&mut buf, offset).map_err(|e| io_fail(&e))?;
    drop(pass);
    buf.truncate(n);
    let mut m = Map::new();
    m.insert(
        "data".into(),
        json!(base64::engine::general_purpose::STANDARD.encode(&buf)),
    );
    m.insert("eof".into(), json!(n < length));
    Ok(m)
}

fn write(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    let offset = u64_field(obj, "offset")?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(str_field(obj, "data")?)
        .map_err(|_| invalid("data must be base64"))?;
    let op_id = op_id_field(obj)?;
    in_file_range(offset, u64::try_from(data.len()).unwrap_or(u64::MAX))?;
    let o = open_of(sh, obj)?;
    o.io.allows(true)?;
    let (key, file, durable) = (o.key, o.file.clone(), o.durable);
    let member = sh.member(o.member)?;
    let scope = ReplayScope::Handle(key);
    if let (Some(op), true, true) = (op_id, durable, is_replay(obj)?) {
        // Run again only when the filter answered that it has no record:
        // a lookup that failed (filterd away, stalled past the call
        // timeout, or refusing) may hide a write that landed and was
        // acknowledged, and running it again would put its bytes back over
        // what was written since.
        match member.filter.client().lookup_reply(scope.clone(), op) {
            Ok(Some(r)) => {
                return match serde_json::from_str(&r.reply) {
                    Ok(Value::Object(m)) => Ok(m),
                    _ => Err(Fail(
                        "STATUS_INTERNAL_ERROR",
                        "the recorded reply is unreadable".into(),
                    )),
                }
            }
            Ok(None) => {}
            Err(e) => return Err(filter_fail(e)),
        }
    }
    let pass = check_io(
        sh,
        &o,
        offset,
        u64::try_from(data.len()).unwrap_or(u64::MAX),
        true,
    )?;
    let wrote = file.write_all_at(&data, offset);
    // Landed: a lock waiting for this frontend's hint or this checked
    // write may be granted now.
    drop(pass);
    // Other clients' read caching goes, also after a failed write (it may
    // have landed in part): MS-FSA 2.1.4.12.
    // Never waits: a notice filterd cannot take now is sent later.
    member.filter.wrote(key);
    wrote.map_err(|e| io_fail(&e))?;
    if o.persistent {
        // On stable storage before the reply (continuous availability).
        sync_written(&file)?;
    }
    let mut m = Map::new();
    m.insert("count".into(), json!(data.len()));
    if let (Some(op), true) = (op_id, durable) {
        member
            .filter
            .client()
            .record_reply(
                scope,
                op,
                Value::Object(m.clone()).to_string(),
                KEEP_REPLIES,
            )
            .map_err(filter_fail)?;
    }
    Ok(m)
}

/// Mandatory locks: may this open read (or write) the range? The I/O must
/// be done while the returned pass is held (see `libfilter::attach`), and
/// the pass dropped right after the pread/pwrite: unchecked when the file
/// has no locks, else checked by filterd (which holds back conflicting
/// locks until the pass is dropped). `None` for an empty range.
fn check_io<'a>(
    sh: &'a Shared,
    o: &OpenRef,
    offset: u64,
    length: u64,
    write: bool,
) -> Result<Option<IoPass<'a>>, Fail> {
    if length == 0 {
        return Ok(None);
    }
    // The open may have been lost meanwhile (a non-durable open is closed
    // by filterd when this frontend is dropped): its file's locks are
    // nothing this smbshim hears of any more.
    let live = || {
        sh.opens
            .lock()
            .map(|m| m.get(&o.file_id).is_some_and(|x| x.key == o.key))
            .unwrap_or(false)
    };
    let m = sh.member(o.member)?;
    match m.filter.decide_io(&m.locked_files, o.file_key, live) {
        // filterd is away (or back, but this smbshim has not re-learned
        // which files have locks yet): a lock may exist that nothing here
        // knows of, so no I/O goes unchecked; the client retries.
        IoDecision::NotReady => return Err(filter_fail(ClientError::Disconnected)),
        IoDecision::Gone => {
            return Err(Fail(
                "STATUS_FILE_CLOSED",
                format!("open {} is gone", o.file_id),
            ))
        }
        IoDecision::Unchecked(gate) => return Ok(Some(IoPass::Unchecked(gate))),
        IoDecision::Check => {}
    }
    let key = o.key;
    let range = libfilter::locks::LockRange { offset, length };
    let pass = m
        .filter
        .client()
        .check_io(key, range, write)
        .map_err(filter_fail)?;
    // The daemon lost since the check: retry (as for NotReady).
    m.filter
        .checked(o.file_key, pass)
        .map(Some)
        .ok_or_else(|| filter_fail(ClientError::Disconnected))
}

fn lock(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    let list = field(obj, "locks")?
        .as_array()
        .ok_or_else(|| invalid("locks must be a list"))?;
    // MS-SMB2 3.3.5.14: a LockCount of 0 is STATUS_INVALID_PARAMETER
    // (before, an empty list succeeded: rvspec 7).
    if list.is_empty() {
        return Err(invalid("locks must not be empty"));
    }
    let mut ops = Vec::with_capacity(list.len());
    for l in list {
        let l = l
            .as_object()
            .ok_or_else(|| invalid("each lock must be an object"))?;
        let b = |name: &str| -> Result<bool, Fail> {
            field(l, name)?
                .as_bool()
                .ok_or_else(|| invalid(format!("{name} must be a bool")))
        };
        let (offset, length) = (u64_field(l, "offset")?, u64_field(l, "length")?);
        let unlock = b("unlock")?;
        // MS-SMB2 3.3.5.14: a range past 2^64 is STATUS_INVALID_LOCK_RANGE
        // (before, it was granted: rvspec 7); one byte at 2^64-1 is fine.
        // Not for an unlock: a lock granted so before (kept by a
        // persistent open) must still come off (rr38e 4); one of a range
        // not locked is STATUS_RANGE_NOT_LOCKED, as any.
        if !unlock && length != 0 && offset.checked_add(length - 1).is_none() {
            return Err(Fail(
                "STATUS_INVALID_LOCK_RANGE",
                format!("offset {offset} + length {length} is past 2^64"),
            ));
        }
        ops.push(libfilter::locks::LockOp {
            range: libfilter::locks::LockRange { offset, length },
            exclusive: b("exclusive")?,
            unlock,
        });
    }
    let seq = match obj.get("lock_sequence") {
        None | Some(Value::Null) => None,
        Some(Value::Object(q)) => {
            let number =
                u8::try_from(u64_field(q, "number")?).map_err(|_| invalid("number 0..15"))?;
            let index = u8::try_from(u64_field(q, "index")?).map_err(|_| invalid("index 1..64"))?;
            if number > 15 || index > 64 {
                return Err(invalid("lock_sequence: number 0..15, index 1..64"));
            }
            Some(LockSequence { number, index })
        }
        Some(_) => return Err(invalid("lock_sequence must be an object")),
    };
    let o = open_of(sh, obj)?;
    let m = sh.member(o.member)?;
    if ops.iter().any(|op| !op.unlock) {
        // Before the lock exists: this member's other clients check their
        // I/O on the file from now on (the other members hear of it from
        // filterd, as other frontends do).
        if let Ok(mut l) = m.locked_files.lock() {
            l.insert(o.file_key);
        }
    }
    let key = o.key;
    m.filter.client().lock(key, ops, seq).map_err(filter_fail)?;
    Ok(Map::new())
}

fn set_info(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    let op_id = op_id_field(obj)?;
    let change = info_change(obj)?;
    let o = open_of(sh, obj)?;
    let (key, durable) = (o.key, o.durable);
    let m = sh.member(o.member)?;
    let scope = ReplayScope::Handle(key);
    if let (Some(op), true, true) = (op_id, durable, is_replay(obj)?) {
        match m.filter.client().lookup_reply(scope.clone(), op) {
            Ok(Some(_)) => {
                // The change was made, with its record, and stands.
                if let InfoChange::DeleteOnClose(d) = &change {
                    note_delete(sh, &o, Some(*d), false);
                }
                return Ok(Map::new());
            }
            Ok(None) => {}
            // The filter refuses the lookup of a change whose outcome it
            // cannot know (it stopped during it and the file changed
            // meanwhile), or its answer did not come (filterd away or
            // stalled past the call timeout): said (the retry status for
            // the latter), never run again over what came after — a second
            // truncate would cut data acknowledged since.
            Err(e) => return Err(filter_fail(e)),
        }
    }
    // The filter records the reply in the same commit as the change.
    let record = match (op_id, durable) {
        (Some(op), true) => Some(RecordSpec {
            scope,
            op_id: op,
            reply: "{}".into(),
            keep: KEEP_REPLIES,
        }),
        _ => None,
    };
    let c = m.filter.client();
    match change {
        InfoChange::Rename { to, replace } => c.rename(key, to, replace, record),
        InfoChange::EndOfFile(size) => c.set_end_of_file(key, size, record),
        InfoChange::DeleteOnClose(d) => return set_delete_on_close(sh, &o, d, record),
    }
    .map_err(filter_fail)?;
    Ok(Map::new())
}

/// SET_INFO `delete_on_close` of open `o`. A call that went unanswered is
/// answered by the flag filterd shows after it
/// (`FilterClient::set_delete_on_close_learnt`): answered
/// STATUS_FILE_NOT_AVAILABLE over a flag filterd set late, a client that
/// closed without retrying had its file deleted (review of session 32).
/// While the change is in flight, and when its outcome is unknown too, the
/// open is marked: its close or detach carries the flag its client was
/// last told, which filterd sets in the same step ([`delete_to_restore`]);
/// a later change answered, or a replay found recorded, settles it. So when what the client was told cannot be
/// learnt (a replay found the open in filterd, and the query of its flag
/// failed), the change is not sent: answered failed, it changes nothing.
/// Before (review of 1624469) it was sent, and when its outcome was
/// unknown too nothing was set back: the close deleted the file of a
/// client told its delete on close failed.
fn set_delete_on_close(
    sh: &Shared,
    o: &OpenRef,
    delete: bool,
    record: Option<RecordSpec>,
) -> Outcome {
    use libfilter::client::DeleteOnCloseOutcome as Learnt;
    let m = sh.member(o.member)?;
    let c = m.filter.client();
    let told = delete_told(sh, &c, o).map_err(filter_fail)?;
    // Marked while the change is in flight: a close or detach of the open
    // meanwhile (another connection's CLOSE, a session's end) carries the
    // told flag, and filterd sets it in the same step, whatever the change
    // did. Marked only once its outcome was learnt unknown (review of
    // 1624469), such a close went with the change's flag. Not against a
    // daemon that takes no told flag on a close (re-review rr-told36):
    // there each close would send a set-back call of its own, parked
    // behind this change for as long as its break waits.
    let marked_now = c.closes_with_told_flag();
    let was_unsure = if marked_now {
        note_delete(sh, o, Some(told), true).unwrap_or(false)
    } else {
        sh.opens
            .lock()
            .ok()
            .and_then(|opens| {
                let x = opens.get(&o.file_id).filter(|x| x.key == o.key)?;
                Some(x.delete_unsure)
            })
            .unwrap_or(false)
    };
    match c.set_delete_on_close_learnt(o.key, delete, record) {
        Learnt::Done => match note_delete(sh, o, Some(delete), false) {
            Some(_) => Ok(Map::new()),
            // Closed (or let go) while the change was in flight, unmarked
            // (a daemon without the told flag, no outcome unknown before):
            // its handle went with filterd's flag, this change's
            // (re-review rr-told36b).
            None if !marked_now && !was_unsure => Ok(Map::new()),
            // Closed (or let go) while the change was in flight: its
            // handle went with the told flag, not this one.
            None => Err(Fail(
                "STATUS_FILE_CLOSED",
                format!("open {} was closed meanwhile", o.file_id),
            )),
        },
        Learnt::Failed(e) => {
            // Nothing changed: unsure only if it was before.
            note_delete(sh, o, Some(told), was_unsure);
            Err(filter_fail(e))
        }
        Learnt::Unknown(e) => {
            note_delete(sh, o, Some(told), true);
            Err(filter_fail(e))
        }
    }
}

/// The delete on close open `o`'s client was last told it has: learnt from
/// filterd when smbshim does not know it (a replay found the open).
fn delete_told(
    sh: &Shared,
    c: &libfilter::client::FilterClient,
    o: &OpenRef,
) -> Result<bool, ClientError> {
    let known = sh
        .opens
        .lock()
        .ok()
        .and_then(|opens| opens.get(&o.file_id).and_then(|x| x.delete_told));
    if let Some(told) = known {
        return Ok(told);
    }
    match c.call(libfilter::proto::Request::Handle {
        key: o.key,
        learning: false,
    })? {
        (libfilter::proto::Reply::Handle(v), _) => Ok(v.record.delete_on_close),
        (other, _) => Err(ClientError::Unexpected(format!(
            "a handle query answered {other:?}"
        ))),
    }
}

/// Notes what open `o`'s client was told of its delete on close, and
/// whether filterd's flag may differ; returns whether it might before,
/// None when the open is no longer in the table.
fn note_delete(sh: &Shared, o: &OpenRef, told: Option<bool>, unsure: bool) -> Option<bool> {
    let mut opens = sh.opens.lock().ok()?;
    let x = opens.get_mut(&o.file_id).filter(|x| x.key == o.key)?;
    x.delete_told = told;
    Some(std::mem::replace(&mut x.delete_unsure, unsure))
}

/// The delete on close `open`'s handle goes with, carried by its close or
/// detach (`FilterClient::close_told`): what its client was last told,
/// when a change is in flight or went unanswered; None (filterd's flag,
/// the told one) otherwise.
fn delete_to_restore(open: &Open) -> Option<bool> {
    open.delete_told.filter(|_| open.delete_unsure)
}

/// What a SET_INFO changes.
enum InfoChange {
    Rename { to: RelPath, replace: bool },
    EndOfFile(u64),
    DeleteOnClose(bool),
}

fn info_change(obj: &Map<String, Value>) -> Result<InfoChange, Fail> {
    let given: Vec<&str> = ["rename", "end_of_file", "delete_on_close"]
        .into_iter()
        .filter(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    if given.len() > 1 {
        // smbl/1 SET_INFO carries one of them; applying some of several
        // would leave the client guessing which.
        return Err(invalid(format!(
            "SET_INFO takes one of rename, delete_on_close, end_of_file, not {}",
            given.join(" and ")
        )));
    }
    if let Some(r) = obj.get("rename") {
        let r = r
            .as_object()
            .ok_or_else(|| invalid("rename must be an object"))?;
        let to = RelPath::new(str_field(r, "to")?)
            .map_err(|e| Fail("STATUS_OBJECT_NAME_INVALID", e.to_string()))?;
        let replace = match r.get("replace") {
            None | Some(Value::Null) => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| invalid("replace must be a bool"))?,
        };
        Ok(InfoChange::Rename { to, replace })
    } else if let Some(size) = obj.get("end_of_file") {
        Ok(InfoChange::EndOfFile(
            size.as_u64()
                .ok_or_else(|| invalid("end_of_file must be a u64"))?,
        ))
    } else if let Some(d) = obj.get("delete_on_close") {
        Ok(InfoChange::DeleteOnClose(d.as_bool().ok_or_else(|| {
            invalid("delete_on_close must be a bool")
        })?))
    } else {
        Err(invalid(
            "SET_INFO needs rename, delete_on_close or end_of_file",
        ))
    }
}

fn op_id_field(obj: &Map<String, Value>) -> Result<Option<u64>, Fail> {
    match obj.get("op_id") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid("op_id must be a u64")),
    }
}

fn flush(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    let o = open_of(sh, obj)?;
    sync_written(&o.file)?;
    Ok(Map::new())
}

/// Syncs what was written to `file` (a FLUSH, a persistent WRITE)
/// ([`sync_fail`]).
fn sync_written(file: &shimline::datasync::SyncedFile) -> Result<(), Fail> {
    file.sync_written().map_err(|e| sync_fail(&e))
}

/// A failed data sync's status: ENOSPC, EDQUOT STATUS_DISK_FULL, as a
/// WRITE's (before, FLUSH made every failure STATUS_INTERNAL_ERROR, rvspec
/// 6c); any other STATUS_INTERNAL_ERROR — EINVAL too, which a sync has no
/// range to blame for. A failure is sticky for the open: a later sync's
/// is STATUS_INTERNAL_ERROR, whatever the first was, so a client that
/// freed space does not hear "disk full" for good (rr38e 2).
fn sync_fail(e: &std::io::Error) -> Fail {
    let status = match IoFailure::of(e) {
        IoFailure::NoSpace if shimline::datasync::EarlierSyncFailed::of(e).is_none() => {
            "STATUS_DISK_FULL"
        }
        _ => "STATUS_INTERNAL_ERROR",
    };
    Fail(status, e.to_string())
}

fn close(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    let (session, _, _) = session_of(sh, obj)?;
    test_hold_close();
    close_in(sh, session, str_field(obj, "file_id")?)
}

/// CLOSE of open `file_id` of live session `session`; one whose close is
/// still settling is told so ([`settling_close`]).
fn close_in(sh: &Shared, session: u64, file_id: &str) -> Outcome {
    match open_in(sh, session, file_id) {
        Ok(o) => close_open(sh, o),
        Err(f) => settling_close(sh, session, file_id).unwrap_or_else(|| {
            // A close undone puts the open back before it drops its note:
            // with no note, the open is back or closed.
            match open_in(sh, session, file_id) {
                Ok(o) => close_open(sh, o),
                Err(_) => Err(f),
            }
        }),
    }
}

/// A retried CLOSE of open `file_id` of `session`, whose close filterd
/// never answered ([`Session::settling`]): STATUS_FILE_NOT_AVAILABLE
/// while its member's settler still closes it again, then success, once
/// (the close the client asked for is made). `None` when no such close
/// is noted. One whose close is still in flight to filterd
/// ([`Session::closing`]) is told STATUS_FILE_NOT_AVAILABLE too.
fn settling_close(sh: &Shared, session: u64, file_id: &str) -> Option<Outcome> {
    let mut sessions = sh.sessions.lock().ok()?;
    let s = sessions.get_mut(&session)?;
    if s.closing.iter().any(|k| k.to_string() == file_id) {
        return Some(Err(close_unsettled()));
    }
    let at = s
        .settling
        .iter()
        .position(|(k, _)| k.to_string() == file_id)?;
    let (key, member) = *s.settling.get(at)?;
    if still_settling(sh, key, member) {
        return Some(Err(close_unsettled()));
    }
    s.settling.swap_remove(at);
    Some(Ok(Map::new()))
}

/// What a CLOSE or LOGOFF is told while a close of it is still settling.
fn close_unsettled() -> Fail {
    Fail(
        "STATUS_FILE_NOT_AVAILABLE",
        "the close is still being made; retry".into(),
    )
}

/// Notes open `key` (of member `member`) of `session`, whose close
/// filterd never answered ([`Session::settling`]). Notes of closes made
/// since go (a retry of one is then `STATUS_FILE_CLOSED`, also closed):
/// the session keeps no more than its closes still settling. Its close's
/// in-flight note ([`Session::closing`]) becomes this one.
fn note_settling(sh: &Shared, session: u64, key: ResumeKey, member: usize) {
    if let Ok(mut sessions) = sh.sessions.lock() {
        if let Some(s) = sessions.get_mut(&session) {
            s.closing.retain(|k| *k != key);
            s.settling.retain(|(k, m)| still_settling(sh, *k, *m));
            s.settling.push((key, member));
        }
    }
    sh.closes_answered.notify_all();
}

/// Drops the in-flight note of open `key`'s close ([`Session::closing`]):
/// filterd answered it.
fn closed_answered(sh: &Shared, session: u64, key: ResumeKey) {
    if let Ok(mut sessions) = sh.sessions.lock() {
        if let Some(s) = sessions.get_mut(&session) {
            s.closing.retain(|k| *k != key);
        }
    }
    sh.closes_answered.notify_all();
}

/// Waits until no close of `session`'s opens is in flight to filterd
/// ([`Session::closing`]: CLOSEs from other connections of the session),
/// or the session is gone, or `until` has come. Only the waiting
/// request's connection waits: the close itself is bounded by filterd's
/// call timeout (then it is settling, [`Session::settling`]), and other
/// clients are served meanwhile.
fn wait_closes_in_flight(sh: &Shared, session: u64, until: Instant) {
    if !closes_in_flight(sh, session) {
        return;
    }
    // Not under the lock: a write to a full stderr pipe may block.
    eprintln!("smbshim: LOGOFF of session {session} waits for its closes in flight");
    let Ok(mut sessions) = sh.sessions.lock() else {
        return;
    };
    while sessions
        .get(&session)
        .is_some_and(|s| !s.closing.is_empty())
    {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            return;
        };
        sessions = match sh.closes_answered.wait_timeout(sessions, left) {
            Ok((s, _)) => s,
            Err(_) => return,
        };
    }
}

/// Whether a close of `session`'s opens is in flight ([`Session::closing`]).
fn closes_in_flight(sh: &Shared, session: u64) -> bool {
    sh.sessions
        .lock()
        .is_ok_and(|s| s.get(&session).is_some_and(|s| !s.closing.is_empty()))
}

/// Whether a close of open `key` is in flight to filterd or settling
/// ([`Session::closing`], [`Session::settling`]) in some session.
fn close_pending_any(sh: &Shared, key: ResumeKey) -> bool {
    sh.sessions.lock().is_ok_and(|sessions| {
        sessions.values().any(|s| {
            s.closing.contains(&key)
                || s.settling
                    .iter()
                    .any(|(k, m)| *k == key && still_settling(sh, *k, *m))
        })
    })
}

/// A replayed CREATE (watching the closes made since it asked filterd,
/// `watch`; `None` for a fresh CREATE, never refused here) that found
/// handle `key` (of member `m`) must not get it back while a CLOSE of its
/// open is in flight to filterd or being made again
/// ([`close_pending_any`], [`Unsettled::contains`]): that CLOSE came
/// first, and the open handed out would be closed under the client. Nor
/// once such a close was made since filterd handed the handle over
/// ([`ReplayWatch::closed_since`]): the open would be served with no
/// handle behind it (no share mode held, its CLOSE `NoSuchHandle`).
/// Told to retry, as a retried CLOSE of it is ([`close_unsettled`]);
/// once the close is made the GUID names no open and the replay runs the
/// CREATE anew (spec, "Create replay"). Before (re-review rr40h), only a
/// close being made again was seen: a replay while the close was still
/// in flight got the open back; and before rr41a 1, so did one whose
/// close was made, its in-flight note gone, while the replay was between
/// filterd's answer and its store.
fn closing_first(
    sh: &Shared,
    m: &Member,
    key: ResumeKey,
    watch: Option<&ReplayWatch<'_>>,
) -> Result<(), Fail> {
    let Some(watch) = watch else {
        return Ok(());
    };
    if m.unsettled.contains(key) || close_pending_any(sh, key) {
        return Err(Fail(
            "STATUS_FILE_NOT_AVAILABLE",
            "the open's CLOSE is still being made; retry".into(),
        ));
    }
    if watch.closed_since(key) {
        return Err(Fail(
            "STATUS_FILE_NOT_AVAILABLE",
            "the open's CLOSE was made as the replay found it; retry (it opens anew)".into(),
        ));
    }
    Ok(())
}

/// Whether member `member`'s settler still closes handle `key`.
fn still_settling(sh: &Shared, key: ResumeKey, member: usize) -> bool {
    sh.members
        .get(member)
        .is_some_and(|m| m.unsettled.contains(key))
}

/// Whether some close of `session`'s opens is still settling
/// ([`Session::settling`]); those settled are forgotten.
fn session_settling(sh: &Shared, session: u64) -> bool {
    let Ok(mut sessions) = sh.sessions.lock() else {
        return false;
    };
    let Some(s) = sessions.get_mut(&session) else {
        return false;
    };
    s.settling.retain(|(k, m)| still_settling(sh, *k, *m));
    !s.settling.is_empty() || !s.closing.is_empty()
}

/// Closes open `o` (found for a CLOSE). Only the request that takes the
/// open out of the table asks filterd, noting the close in flight
/// ([`Session::closing`]) as it takes it: another CLOSE of it at the same
/// time is answered `STATUS_FILE_NOT_AVAILABLE` (retry) until filterd
/// answers the taker — then `STATUS_FILE_CLOSED` if the close was made, as
/// if it came just after (a teardown that took it: `STATUS_FILE_CLOSED`
/// at once). (Both asked once: when the taker's close was
/// undone, the other's could close the handle in filterd before the taker
/// put the open back — an open served with no handle behind it.)
///
/// A close filterd never answered (killed or stalled under it) leaves the
/// open forgotten — nothing is served through a handle filterd may have
/// closed — and the handle to the member's settler, which closes it again
/// until filterd answers ([`libfilter::settle`]): a restarted filterd
/// gets back a close that never committed, and the attachment resumes it,
/// named by no open, holding its share mode and locks for good. The
/// client is told STATUS_FILE_NOT_AVAILABLE, and so is its retried CLOSE
/// until the settler has filterd's answer ([`settling_close`]).
fn close_open(sh: &Shared, o: OpenRef) -> Outcome {
    close_taken(sh, o).map(|()| Map::new()).map_err(|f| f.fail)
}

/// Why [`close_taken`] failed.
struct CloseFailed {
    fail: Fail,
    /// Filterd never answered: the open is forgotten, its handle settling.
    unknown: bool,
    /// Not taken: another request took the open out of the table first
    /// (its close in flight, made, or undone and the open back). Nothing
    /// was asked of filterd.
    not_taken: bool,
}

/// [`close_open`], telling apart a close whose outcome is unknown.
fn close_taken(sh: &Shared, o: OpenRef) -> Result<(), CloseFailed> {
    let known = |fail| CloseFailed {
        fail,
        unknown: false,
        not_taken: false,
    };
    let key = o.key;
    let m = sh.member(o.member).map_err(known)?;
    // Noted in flight under the opens lock as the open is taken: a CLOSE
    // or LOGOFF of it from any connection finds the open or the note.
    //
    // Taken only while it is the session's it was found in: a replayed
    // CREATE on another session of the client moves an open in place,
    // and a CLOSE or LOGOFF of the old session that took it then closed
    // the new session's open under it (re-review rr41l B).
    //
    // An open whose session is gone is not noted (no session to hold
    // the note): `end_session` removes the session before it sweeps its
    // opens (another lock). Taken here in between, it is claimed as the
    // sweep would claim it, so that a replay of it waits ([`Going`]),
    // and closed as the client asked: neither taken (re-review rr41f
    // F1: a replay got it back as its close was made) nor left to the
    // sweep, which detaches a lost connection's durable opens — its
    // CLOSE told STATUS_FILE_CLOSED, the handle held till its durable
    // timeout (rr41l A).
    let mut ending = None;
    let taken = sh.opens.lock().ok().and_then(|mut opens| {
        if opens.get(&o.file_id)?.session != o.session {
            return None;
        }
        let mut sessions = sh.sessions.lock().ok()?;
        let Some(s) = sessions.get_mut(&o.session) else {
            let open = opens.remove(&o.file_id)?;
            // Its break goes with it, as the sweep's would (re-review
            // rr41p 1: the entry stayed, its acks refused, and a stale
            // break could be sent again to a new open of the lease).
            end_breaks(sh, &opens, breaking_of(&open));
            ending = Some(Going::of(sh, o.file_id.clone(), &open));
            return None;
        };
        let taken = opens.remove(&o.file_id)?;
        s.closing.push(key);
        Some(taken)
    });
    if let Some(going) = ending {
        return close_of_ended(sh, going);
    }
    if taken.is_some() {
        test_hold_taken();
    }
    let Some(taken) = taken else {
        // Put back meanwhile (its close undone), or its close still in
        // flight or settling: retry.
        let back = sh.opens.lock().is_ok_and(|opens| {
            opens
                .get(&o.file_id)
                .is_some_and(|v| v.session == o.session)
        });
        let alive = sh.sessions.lock().is_ok_and(|s| s.contains_key(&o.session));
        let status = if !alive {
            // Its session's end has it (or a replay took it over).
            "STATUS_USER_SESSION_DELETED"
        } else if back || close_pending_any(sh, key) {
            "STATUS_FILE_NOT_AVAILABLE"
        } else {
            "STATUS_FILE_CLOSED"
        };
        return Err(CloseFailed {
            not_taken: true,
            ..known(Fail(status, format!("open {} is being closed", o.file_id)))
        });
    };
    // A WRITE of this open (from another connection of the session) may
    // be in its pwrite: it lands before filterd forgets the handle.
    drain(m, o.file_key);
    let told = delete_to_restore(&taken);
    let lease = breaking_of(&taken);
    // After the close: one undone put the open back, its break still on.
    let end_break = || {
        if let Ok(opens) = sh.opens.lock() {
            end_breaks(sh, &opens, lease);
        }
    };
    let session = taken.session;
    if let Err(e) = m.filter.close_told(key, told) {
        let unknown = !e.close_undone() && may_hold(&e);
        if e.close_undone() {
            // Put back before the note goes: a retry finds one of them.
            keep_open(sh, o.file_id, taken);
            closed_answered(sh, session, key);
        } else if unknown {
            // Settling first: a retried CLOSE that finds the note finds
            // the handle settling, until the settler has its answer.
            m.unsettled.add_told(key, told);
            note_settling(sh, session, key, o.member);
        } else {
            // Not this member's handle (any more): nothing to hand out.
            sh.closes_made.made(key);
            closed_answered(sh, session, key);
        }
        end_break();
        return Err(CloseFailed {
            unknown,
            ..known(filter_fail(e))
        });
    }
    // Noted made before the in-flight note goes: a replay that found the
    // handle sees one or the other ([`closing_first`]).
    sh.closes_made.made(key);
    closed_answered(sh, session, key);
    end_break();
    Ok(())
}

/// Puts back an open whose CLOSE filterd did not make: the client was told
/// it failed and may use it or close it again. Not if its session ended
/// meanwhile (its connection's loss, whose teardown did not see the open;
/// a LOGOFF waits for the close, [`Session::closing`]): nobody can name it any more, so it is closed in filterd
/// again as the client asked (detached if that fails too, as a lost
/// connection's durable open is) — left as it was, filterd would hold the
/// handle and its share mode for as long as smbshim stays attached.
///
/// Whether the session lives is asked under the opens lock, as
/// `create_with` does: `end_session` removes the session before it takes
/// the opens lock, so an open put back while the session lived is among
/// those it lets go. One not put back is let go here, claimed as a
/// session's end claims its opens (a replay could find it meanwhile).
fn keep_open(sh: &Shared, file_id: String, open: Open) {
    let going = {
        let Ok(mut opens) = sh.opens.lock() else {
            return;
        };
        let alive = sh
            .sessions
            .lock()
            .is_ok_and(|s| s.contains_key(&open.session));
        if alive {
            opens.insert_if_absent(file_id, open);
            return;
        }
        Going::of(sh, file_id, &open)
    };
    going.let_go(sh, |m, key, told| {
        if let Err(e) = close_ended_handle(m, key, told) {
            eprintln!("smbshim: closing an open whose session ended: {e}");
        }
    });
}

/// Closes in filterd the handle of an open whose session ended: detached
/// if the close is undone, as a lost connection's durable open is;
/// settling if filterd never answered.
fn close_ended_handle(m: &Member, key: ResumeKey, told: Option<bool>) -> Result<(), ClientError> {
    m.filter.close_told(key, told).inspect_err(|e| {
        if e.close_undone() {
            // With the told flag too (re-review rr-told36: the plain
            // detach left the store's flag, maybe an unanswered
            // change's, for a later resume's close or the expiry).
            let _ = m.filter.detach_told(key, told);
        } else if may_hold(e) {
            m.unsettled.add_told(key, told);
        }
    })
}

/// The close a CLOSE or LOGOFF asked of an open whose session ended
/// before it took it ([`close_taken`]), claimed as `going`: made, the
/// request succeeds; failed, it is told so (the handle detached if the
/// close was undone: the client may RECONNECT a durable open). One a
/// replay took over meanwhile is the replay's: not taken.
fn close_of_ended(sh: &Shared, going: Going<'_>) -> Result<(), CloseFailed> {
    let mut outcome = None;
    going.let_go(sh, |m, key, told| {
        let r = close_ended_handle(m, key, told);
        if r.is_ok() {
            sh.closes_made.made(key);
        }
        outcome = Some(r);
    });
    match outcome {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(CloseFailed {
            unknown: !e.close_undone() && may_hold(&e),
            not_taken: false,
            fail: filter_fail(e),
        }),
        None => Err(CloseFailed {
            unknown: false,
            not_taken: true,
            fail: Fail(
                "STATUS_USER_SESSION_DELETED",
                "its session ended; a replay took the open over".into(),
            ),
        }),
    }
}

/// LOGOFF: every open of the session is closed first as a CLOSE would be,
/// so that one filterd refused or undid stays — and the session with it:
/// the LOGOFF then fails (the client may CLOSE it, log off again or drop
/// the connection). A close filterd never answered fails the LOGOFF too,
/// with the session kept (its open is gone, its handle settling): it was
/// not made, and a success would say it was — and so does a LOGOFF
/// again while that close is still settling ([`Session::settling`]), so
/// the client keeps the session's opens to RECONNECT and CLOSE through a
/// replacement smbshim should this one die first. Only then does the
/// session end.
///
/// A CLOSE of one of the session's opens in flight to filterd (sent on
/// another connection of the session, [`Session::closing`]) is waited
/// for, up to [`LETTING_GO_WAIT`] in all, as a replayed CREATE waits for
/// a session's end: made, its open is gone; undone, its open is back
/// and closed here with the others. Past the bound the LOGOFF is
/// `STATUS_FILE_NOT_AVAILABLE`, the session kept. Before (re-review
/// rr40h), it was refused at once, and a client that then dropped its
/// connection without a LOGOFF again left an open whose close was undone
/// disconnected, for its durable timeout. So is a close that takes an
/// open between the LOGOFF's look and its take (another LOGOFF's, a
/// CLOSE's): refused at once before (rr41a 4).
///
/// The session is marked as logging off meanwhile ([`LoggingOff`]): ended
/// under the LOGOFF for another cause, its opens are closed as it asked,
/// and the LOGOFF is `STATUS_USER_SESSION_DELETED`, as one just after.
fn logoff(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    let (session, _, _) = session_of(sh, obj)?;
    let _marked = LoggingOff::mark(sh, session);
    let until = Instant::now() + LETTING_GO_WAIT;
    let (mut failed, mut unknown) = (None, None);
    // A pass that found an open taken by another close (a CLOSE's, a
    // LOGOFF's) lists again: that close may have been undone after the
    // pass looked, its open back, to close here (re-review rr41f F2,
    // rr41l C).
    let mut raced;
    loop {
        raced = false;
        wait_closes_in_flight(sh, session, until);
        let mut mine: Vec<String> = sh
            .opens
            .lock()
            .map(|o| {
                o.iter()
                    .filter(|(_, v)| v.session == session)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        // In one order (the tests name which open comes first).
        mine.sort_unstable();
        test_hold_listed();
        for file_id in mine {
            // Gone since it was listed: closed, or taken by a close in
            // flight from another connection, which may yet be undone.
            let Ok(o) = open_in(sh, session, &file_id) else {
                raced = true;
                continue;
            };
            test_hold_logoff();
            match close_taken(sh, o) {
                Ok(()) => {}
                // Taken between the two by a CLOSE or another LOGOFF:
                // its close is waited for as any other in flight (before,
                // re-review rr41a 4, this LOGOFF was refused at once),
                // and the opens listed again: that close may have been
                // undone meanwhile, its note gone, the open back — to be
                // closed here, its failure this LOGOFF's (before, rr41f
                // F2, the session ended with it closed for good and the
                // LOGOFF told SUCCESS).
                Err(f) if f.not_taken => {
                    raced = true;
                    test_hold_logoff_lost();
                }
                Err(f) if f.unknown => unknown = Some(f.fail),
                Err(f) => failed = Some(f.fail),
            }
        }
        // A CLOSE from another connection that took an open meanwhile:
        // waited for too (undone, its open is back, to close).
        let done =
            unknown.is_some() || failed.is_some() || (!raced && !closes_in_flight(sh, session));
        // Ended meanwhile (its end sweeps what it left): told below.
        let ended = !sh.sessions.lock().is_ok_and(|s| s.contains_key(&session));
        if done || ended || Instant::now() >= until {
            break;
        }
    }
    if let Some(e) = unknown {
        return Err(e);
    }
    // A retried LOGOFF whose closes are still settling (or past the
    // bound, still in flight): not made yet.
    if session_settling(sh, session) {
        return Err(close_unsettled());
    }
    if let Some(e) = failed {
        let kept = sh
            .opens
            .lock()
            .is_ok_and(|o| o.values().any(|v| v.session == session));
        if kept {
            return Err(e);
        }
    }
    // Past the bound with an open another close took not seen again:
    // that close may be undone yet, its open back, and the session's end
    // would close it for good with no failure told (re-review rr41l D).
    // Not made yet, the session kept.
    if raced && sh.sessions.lock().is_ok_and(|s| s.contains_key(&session)) {
        return Err(close_unsettled());
    }
    if end_session(sh, session, true).is_none() {
        // Ended while this LOGOFF waited: by another LOGOFF, its
        // connection's loss or a SESSION_SETUP naming it as previous
        // (which closed its opens, as this LOGOFF asked: [`LoggingOff`]).
        // Told as a LOGOFF just after would be; before (re-review rr41a
        // 2), it was told SUCCESS with the durable opens left detached.
        return Err(Fail(
            "STATUS_USER_SESSION_DELETED",
            format!("session {session} ended while its LOGOFF waited"),
        ));
    }
    Ok(Map::new())
}

/// A LOGOFF of a session in progress ([`Session::logging_off`]), from
/// its start until it answers. A LOGOFF received means the client wants
/// the session's opens closed: should the session end for another cause
/// while the LOGOFF waits for a close in flight (its connection lost, a
/// SESSION_SETUP naming it as `previous_session_id`), its opens are
/// closed as the LOGOFF would have closed them, not left detached holding
/// their share modes for their durable timeout (re-review rr41a 2). A
/// LOGOFF that fails leaves the session as it was: a later loss of its
/// connection detaches its durable opens, for the client to RECONNECT.
struct LoggingOff<'a> {
    sh: &'a Shared,
    session: u64,
}

impl<'a> LoggingOff<'a> {
    fn mark(sh: &'a Shared, session: u64) -> LoggingOff<'a> {
        if let Ok(mut sessions) = sh.sessions.lock() {
            if let Some(s) = sessions.get_mut(&session) {
                s.logging_off += 1;
            }
        }
        LoggingOff { sh, session }
    }
}

impl Drop for LoggingOff<'_> {
    fn drop(&mut self) {
        if let Ok(mut sessions) = self.sh.sessions.lock() {
            if let Some(s) = sessions.get_mut(&self.session) {
                s.logging_off = s.logging_off.saturating_sub(1);
            }
        }
    }
}

/// Closes the open filterd may have made for a CREATE of a logged-off
/// session (`t`) that got no answer in time: libfilter kept it detached
/// for the client's replay of its create GUID, in no session's table, so
/// the LOGOFF's closes missed it and it held its file for its durable
/// timeout. Run by member `m`'s closer thread after the LOGOFF was
/// answered ([`Closer`]).
///
/// The GUID is claimed as a session's end claims its opens (a takeover
/// that starts after waits for the close; one in flight is waited for),
/// then closed only if the session still owns it ([`Unanswered::owns`]):
/// checked after that wait and right before the close, so another
/// session of the client that replayed the GUID since (it owns it now),
/// or got its open (nobody does), is never robbed of it — whatever it did
/// while this LOGOFF waited, and even if its connection dropped since and
/// the open waits detached for its RECONNECT (review rr-logoff 1, 2).
///
/// Whatever its late answer's order: the session's [`SessionEnd`] was
/// ended first, so an answer still to come, or whose detach is not yet
/// sent, is closed by libfilter; a detach already sent reached filterd
/// before this resume, which finds the handle disconnected. A handle
/// attached here (made, its answer not yet read, or its undo to come) is
/// refused `NoSuchHandle` and closed by that undo. A resume that goes
/// unanswered is closed when its answer comes if that answer is an open
/// (a late refusal leaves the handle disconnected), and tried again with
/// backoff ([`Tried::Unanswered`]); a try on the same connection that
/// finds no disconnected handle (`unanswered`: maybe the one that resume
/// attached, whose close may be lost with the connection) does not drop
/// the GUID but waits for a reattach ([`Tried::Reattach`]). A resume that
/// failed for another passing cause
/// (filterd down or restarting, a failed commit, busy) is
/// [`Tried::Again`]: either way the session keeps owning the GUID, and the
/// closer tries it again once the member has reattached (with backoff
/// while it stays attached; before, the GUID was forgotten and the open
/// held its file for its durable timeout).
fn close_unanswered(sh: &Shared, m: &Member, t: &ToClose, unanswered: bool) -> Tried {
    let ToClose {
        session,
        client: client_guid,
        ref user,
        guid,
    } = *t;
    let held = |o: &OpenTable<Open>| o.by_create_guid(client_guid, guid).next().is_some();
    // Claimed under the opens lock, as `Going::of` claims an open.
    let claim = {
        let Ok(opens) = sh.opens.lock() else {
            return Tried::Done;
        };
        (!held(&opens)).then(|| {
            sh.handovers.letting_go(Ident {
                key: None,
                guid: Some((client_guid, guid)),
            })
        })
    };
    if let Some(c) = &claim {
        c.wait_takeovers();
    }
    let stored = sh.opens.lock().map_or(true, |o| held(&o));
    let mine = sh
        .unanswered
        .lock()
        .is_ok_and(|u| u.owns(client_guid, session, guid));
    let client = client_id(client_guid);
    let tried = match (mine && !stored, &claim, client) {
        (true, Some(_), Ok(client)) => {
            match m
                .filter
                .resume_by_guid_to_close(client, CreateGuid(guid), Some(user.clone()))
            {
                Ok(h) => {
                    let key = h.info.key;
                    drop(h);
                    close_for_good(m, key, None);
                    Tried::Done
                }
                // Maybe the handle an unanswered try attached: then only
                // after a reattach (`no_such_handle`).
                Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {
                    libfilter::closer::no_such_handle(unanswered)
                }
                // Unanswered: an open's late answer is closed (libfilter),
                // a refusal's is not: tried again with backoff
                // (`Tried::Unanswered`).
                Err(e) if libfilter::closer::passing(&e) => {
                    eprintln!(
                        "smbshim: closing the open of unanswered CREATE {guid} at LOGOFF: {e}; \
                         tried again once filterd serves"
                    );
                    libfilter::closer::tried_again(&e)
                }
                Err(e) => {
                    eprintln!(
                        "smbshim: closing the open of unanswered CREATE {guid} at LOGOFF: {e}"
                    );
                    Tried::Done
                }
            }
        }
        // Not the session's, held, or no valid client: nothing to close.
        _ => Tried::Done,
    };
    if tried == Tried::Done {
        forget_unanswered(sh, t);
    }
    tried
}

/// The closer is done with `t` (closed, not the session's to close, or
/// given up): the session owns its GUID no more.
fn forget_unanswered(sh: &Shared, t: &ToClose) {
    if let Ok(mut u) = sh.unanswered.lock() {
        u.claim(t.client, t.session, t.guid);
    }
}

/// Closes handle `key`, of an open nobody can name any more; one whose
/// close filterd refused or never answered goes to the member's settler,
/// which closes it again until filterd answers.
fn close_for_good(m: &Member, key: ResumeKey, told: Option<bool>) {
    if let Err(e) = m.filter.close_told(key, told) {
        eprintln!("smbshim: closing handle {key} of an ended session: {e}");
        if may_hold(&e) {
            m.unsettled.add_told(key, told);
        }
    }
}

/// Ends a session: on LOGOFF every open closes; on a lost connection durable
/// opens are detached (kept for their timeout) and the others close —
/// unless a LOGOFF of the session is in progress ([`LoggingOff`]): then
/// it ends as that LOGOFF asked, every open closed.
///
/// The opens leave the table, claimed as being let go, at once; their
/// filterd calls (a commit each) follow with no lock held, one by one.
/// Only a takeover of one of them waits for it, not other clients' (a
/// lock held across them all held every replay and RECONNECT of every
/// client for their sum, review).
///
/// Returns the session ended. Ended as a LOGOFF, its [`SessionEnd`] ends
/// as the session leaves the table (under the sessions lock, so a
/// CREATE's [`InFlight`] GUID either is among those it owns or was never
/// noted and its late answer is closed), and the create GUIDs it owns go
/// to its member's closer thread ([`close_unanswered`]). A session ended
/// otherwise owns none any more: its client replays them. A LOGOFF
/// waiting for the session's closes in flight is told
/// ([`Shared::closes_answered`]).
fn end_session(sh: &Shared, session: u64, logoff: bool) -> Option<Session> {
    let ended = sh.sessions.lock().ok().and_then(|mut s| {
        let ended = s.remove(&session)?;
        let logoff = logoff || ended.logging_off > 0;
        if logoff {
            ended.end.end();
        }
        let guids = match sh.unanswered.lock() {
            Ok(mut u) if logoff => u.logged_off(session),
            Ok(mut u) => {
                u.lost(ended.client_guid, session);
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        Some((ended, logoff, guids))
    });
    sh.closes_answered.notify_all();
    test_hold_end();
    let logoff = ended.as_ref().map_or(logoff, |(_, l, _)| *l);
    let mine: Vec<(Going, bool)> = sh
        .opens
        .lock()
        .map(|mut o| {
            let ids: Vec<String> = o
                .iter()
                .filter(|(_, v)| v.session == session)
                .map(|(k, _)| k.clone())
                .collect();
            let mut leases = Vec::new();
            let going = ids
                .into_iter()
                .filter_map(|id| {
                    let open = o.remove(&id)?;
                    leases.extend(breaking_of(&open));
                    Some((Going::of(sh, id, &open), open.durable.is_some()))
                })
                .collect();
            end_breaks(sh, &o, leases);
            going
        })
        .unwrap_or_default();
    for (going, durable) in mine {
        going.let_go(sh, |m, key, told| {
            if durable && !logoff {
                let _ = m.filter.detach_told(key, told);
            } else {
                close_for_good(m, key, told);
            }
        });
    }
    let (ended, _, guids) = ended?;
    if !guids.is_empty() {
        // Closed by the member's closer thread, not in this request.
        if let Ok((_, m)) = sh.member_for(ended.client_guid) {
            let each = guids.into_iter().map(|guid| ToClose {
                session,
                client: ended.client_guid,
                user: ended.user.clone(),
                guid,
            });
            m.closer.push(each.collect(), None);
        }
    }
    Some(ended)
}

/// An open taken out of the table to be let go in filterd, claimed so
/// ([`Handovers::letting_go`]) until it is.
struct Going<'a> {
    file_id: String,
    key: ResumeKey,
    file_key: FileId,
    member: usize,
    claim: LettingGo<'a>,
    /// The delete on close its close or detach carries
    /// ([`delete_to_restore`]).
    delete_back: Option<bool>,
}

impl<'a> Going<'a> {
    /// Claims `open`, just taken out of the table (the opens lock held,
    /// so that no takeover of it starts unseen between the two).
    fn of(sh: &'a Shared, file_id: String, open: &Open) -> Going<'a> {
        Going {
            file_id,
            key: open.key,
            file_key: open.file_key,
            member: open.member,
            claim: sh.handovers.letting_go(open.ident()),
            delete_back: delete_to_restore(open),
        }
    }

    /// Lets the open go with `how` (its member, its key, the delete on
    /// close its handle goes with) once no takeover
    /// of it is in flight — unless one took it over meanwhile (stored it
    /// again): that one holds it now.
    fn let_go(self, sh: &Shared, how: impl FnOnce(&Member, ResumeKey, Option<bool>)) {
        self.claim.wait_takeovers();
        let taken_over = sh.opens.lock().is_ok_and(|o| o.contains_key(&self.file_id));
        let Ok(m) = sh.member(self.member) else {
            return;
        };
        if !taken_over {
            drain(m, self.file_key);
            how(m, self.key, self.delete_back);
        }
    }
}

/// Waits for the unchecked I/O in flight on `file` (see
/// `Attachment::drain_file`).
fn drain(m: &Member, file: FileId) {
    if !m.filter.drain_file(file) {
        eprintln!("smbshim: an unchecked read or write of a closing open is stuck; closing anyway");
    }
}

fn connection_lost(sh: &Shared, conn: u64) {
    let sessions: Vec<u64> = sh
        .sessions
        .lock()
        .map(|s| {
            s.iter()
                .filter(|(_, v)| v.conn == conn)
                .map(|(k, _)| *k)
                .collect()
        })
        .unwrap_or_default();
    for s in sessions {
        end_session(sh, s, false);
    }
}

fn lease_json(l: Option<HeldLease>) -> Value {
    json!(l.map(LeaseShown::of))
}

fn lease_break_ack(sh: &Shared, obj: &Map<String, Value>) -> Outcome {
    // The lease is the client's: its member holds it.
    let (_, client_guid, _) = session_of(sh, obj)?;
    let (_, m) = sh.member_for(client_guid)?;
    let key = libfilter::lease::LeaseKey(uuid_field(obj, "lease_key")?);
    let state = libfilter::lease::LeaseState::parse(str_field(obj, "state")?)
        .ok_or_else(|| invalid("state must be \"\", R, RH, RW or RWH"))?;
    // No break in progress (none asked for, already acknowledged, or
    // lowered at the break timeout): refused, nothing changed. Before,
    // filterd took it as a lowering of the client's own accord and the
    // epoch grew (rvspec 7).
    // An ack of more than the break leaves lets the entry be: filterd
    // refuses it, and a stale ack (of a copy of an earlier break, sent
    // again behind a reply) must not take a newer break's entry, which
    // the client's real ack then found gone (re-review rr40g 4).
    let in_progress = {
        let mut breaking = sh
            .breaking
            .lock()
            .map_err(|_| Fail("STATUS_INTERNAL_ERROR", "lock".into()))?;
        match breaking.get(&(client_guid, key)) {
            Some(b) if state.without(b.new_state) != libfilter::lease::LeaseState::NONE => Some(*b),
            _ => breaking.remove(&(client_guid, key)),
        }
    };
    let Some(in_progress) = in_progress else {
        return Err(Fail(
            "STATUS_UNSUCCESSFUL",
            format!("no break of lease {key} is in progress"),
        ));
    };
    let reply = m
        .filter
        .client()
        .call(libfilter::proto::Request::LeaseBreakAck {
            lease_key: key,
            state,
            // Clients' lease keys reach filterd as they chose them, and
            // all of a member's clients share its connection: the key
            // alone could name another client's lease there.
            client: Some(client_id(client_guid)?),
        })
        .map_err(|e| {
            // The break may still be in progress: filterd did not answer,
            // could not commit, or refused the state (the client may ack
            // again) — if an open still holds the lease. Not after another
            // refusal (no such lease here any more: rr38e 1).
            let again = libfilter::closer::passing(&e) || e.code() == Some(ErrorCode::BadFrame);
            if again {
                if let Ok(opens) = sh.opens.lock() {
                    let held = opens
                        .values()
                        .any(|v| breaking_of(v) == Some((client_guid, key)));
                    if let (true, Ok(mut b)) = (held, sh.breaking.lock()) {
                        b.entry((client_guid, key)).or_insert(in_progress);
                    }
                }
            }
            filter_fail(e)
        })?;
    let mut m = Map::new();
    if let libfilter::proto::Reply::Lease(l) = reply.0 {
        acked(sh, (client_guid, key), l);
        m.insert("lease".into(), lease_json(Some(l)));
    }
    Ok(m)
}

/// The client acknowledged a break of lease `lease`, and filterd holds
/// `now`: the client may ack less than the break left (MS-SMB2
/// 3.3.5.22.2), and the opens under it hold what it holds — only ever
/// lowered (a later break's event may have come first). Before re-review
/// rr41i 2 they kept the break's state, and the next reattach sent a
/// needless break at the client's own epoch.
fn acked(sh: &Shared, lease: Breaking, now: HeldLease) {
    let Ok(mut o) = sh.opens.lock() else {
        return;
    };
    for x in o.values_mut() {
        if breaking_of(x) != Some(lease) {
            continue;
        }
        // Only at the break's own epoch: an upgrade granted since moved
        // it (re-review rr41n).
        if let Some(l) = x
            .lease
            .as_mut()
            .filter(|l| l.epoch == now.epoch && l.state.contains(now.state))
        {
            (l.state, l.epoch) = (now.state, now.epoch);
        }
    }
}

/// Drops the opens of handles filterd no longer has (later requests on
/// them get STATUS_FILE_CLOSED). Returns the leases that went with them —
/// those no other open of this smbshim still holds, that held any caching
/// — each in its latest state, with the session of an open that held it.
fn forget_opens(sh: &Shared, keys: &[ResumeKey]) -> Vec<(HeldLease, u64)> {
    if keys.is_empty() {
        return Vec::new();
    }
    let keys: std::collections::HashSet<&ResumeKey> = keys.iter().collect();
    let Ok(mut o) = sh.opens.lock() else {
        return Vec::new();
    };
    // A lease is its key on its file: two clients here may hold leases
    // under one key, each on its own file (review: a key still held on
    // another client's file kept this one's break from being sent).
    let mut gone = Vec::new();
    let mut leases = Vec::new();
    o.retain(|_, v| {
        if !keys.contains(&v.key) {
            return true;
        }
        gone.extend(v.lease.map(|l| (l, v.session, v.file_key)));
        leases.extend(breaking_of(v));
        false
    });
    end_breaks(sh, &o, leases);
    // A lease a resumed (persistent) open still holds stays.
    gone.retain(|(l, _, f)| {
        !o.values()
            .any(|v| v.file_key == *f && v.lease.is_some_and(|x| x.key == l.key))
    });
    drop(o);
    // The epoch grows at every change: the latest state is the highest's.
    gone.sort_unstable_by_key(|(l, _, f)| (l.key, *f, std::cmp::Reverse(l.epoch)));
    gone.dedup_by_key(|(l, _, f)| (l.key, *f));
    gone.into_iter()
        .filter(|(l, _, _)| l.state != libfilter::lease::LeaseState::NONE)
        .map(|(l, session, _)| (l, session))
        .collect()
}

/// The writer of the client connection of session `session`, while both
/// live.
fn writer_of(sh: &Shared, session: u64) -> Option<shimline::Writer> {
    let conn = sh.sessions.lock().ok()?.get(&session).map(|x| x.conn)?;
    sh.writers.get(conn)
}

/// Longest the breaks sent at a reattach (of forgotten and of lowered
/// leases, one deadline for all) are waited for before smbshim tells
/// filterd it has resynced: a client that does not read holds up
/// other frontends' opens after a filterd restart this long at most.
const FORGOTTEN_BREAKS_WAIT: Duration = Duration::from_secs(1);

/// A restarted filterd forgot the non-persistent handles of opens whose
/// leases are `gone`: the opens are closed, as on a failure of the server
/// (smb-like.md, Sessions), and their leases with them. A client whose
/// connection lives on would go on caching writes under an RWH lease
/// while another frontend's open is granted, so it is told as rksmbd
/// tells an SMB 3 client: a LEASE_BREAK to `""` (none), its epoch one
/// past the lease's, `ack_required` false — there is no lease left to
/// acknowledge. Its next request on the open gets STATUS_FILE_CLOSED.
/// Returns the breaks, each with the session to send it to.
fn forgotten_breaks(gone: Vec<(HeldLease, u64)>) -> Vec<(Value, u64)> {
    let notes = gone.into_iter().map(|(l, session)| {
        let note = json!({"cmd": "LEASE_BREAK", "lease_key": l.key, "current_state": l.state.to_string(),
                          "new_state": "", "epoch": l.epoch.wrapping_add(1), "ack_required": false});
        (note, session)
    });
    notes.collect()
}

/// A reattach resumed handles whose leases filterd holds now as `leases`
/// says (`None`: none). A lease lowered while this member was detached —
/// at once, its holder disconnected (a restarted filterd whose other
/// frontends' clients opened first; another node owning the table) — was
/// never told to its client, and filterd will not break it again: the
/// client would go on caching writes under RWH while another client's
/// writes went in (review rvping 2). Such a lease is lowered on the opens
/// here and its client sent a LEASE_BREAK from what it holds to what
/// filterd holds, at filterd's epoch, `ack_required` false (no break is in
/// progress to acknowledge). Returns the breaks, each with the session to
/// send it to.
fn lowered_breaks(sh: &Shared, leases: &[(ResumeKey, Option<HeldLease>)]) -> Vec<(Value, u64)> {
    let now: HashMap<ResumeKey, Option<HeldLease>> = leases.iter().copied().collect();
    let mut notes = Vec::new();
    if let Ok(mut o) = sh.opens.lock() {
        let ids: Vec<String> = o.keys().cloned().collect();
        for id in ids {
            let Some((told, file, session, filterd)) = o
                .get(&id)
                .and_then(|x| Some((x.lease?, x.file_key, x.session, *now.get(&x.key)?)))
            else {
                continue;
            };
            let (state, epoch) = match filterd {
                Some(l) if l.key == told.key => (l.state, l.epoch),
                _ => (
                    libfilter::lease::LeaseState::NONE,
                    told.epoch.wrapping_add(1),
                ),
            };
            // What the client was told and filterd holds both: a state
            // filterd holds that the client was not told (it never
            // should) is not granted by a break either (re-review rr41i
            // 5: such was skipped, the client kept what filterd no
            // longer holds).
            let state = told.state.and(state);
            if told.state == state {
                continue;
            }
            // Every open here under the lease (on its file) holds what
            // it was lowered to; the next one finds it told.
            for x in o.values_mut() {
                if let Some(l) = x
                    .lease
                    .as_mut()
                    .filter(|l| l.key == told.key && x.file_key == file)
                {
                    (l.state, l.epoch) = (state, epoch);
                }
            }
            let note = json!({"cmd": "LEASE_BREAK", "lease_key": told.key, "current_state": told.state.to_string(),
                              "new_state": state.to_string(), "epoch": epoch, "ack_required": false});
            eprintln!(
                "smbshim: lease {} lowered while detached ({} -> {}): break sent",
                told.key.0, told.state, state
            );
            notes.push((note, session));
        }
    }
    notes
}

/// Sends each LEASE_BREAK of `notes` to the client of its session, then
/// waits until every one was written to its socket, or for
/// [`FORGOTTEN_BREAKS_WAIT`] (a client that does not read).
fn send_unacked_breaks(sh: &Shared, notes: Vec<(Value, u64)>) {
    let until = Instant::now() + FORGOTTEN_BREAKS_WAIT;
    let mut sent = Vec::new();
    for (note, session) in notes {
        let Some(w) = writer_of(sh, session) else {
            continue;
        };
        if shimline::send(&w, &note) {
            sent.push(w);
        }
    }
    for w in sent {
        if !w.flushed_by(until) {
            eprintln!(
                "smbshim: a lease break sent at the reattach is not written yet: resynced anyway"
            );
            return;
        }
    }
}

/// Pushes member `k`'s lease breaks to the client connection holding the
/// lease, as smbl/1 LEASE_BREAK notifications, and keeps its lock hints.
fn forward_breaks(sh: Arc<Shared>, k: usize) {
    use libfilter::attach::AttachEvent;
    use libfilter::proto::Event;
    let Some(m) = sh.members.get(k) else { return };
    loop {
        let ev = match m.filter.events().recv() {
            Ok(ev) => ev,
            Err(_) => return,
        };
        let brk = match ev {
            AttachEvent::Daemon(brk @ Event::LeaseBreak { .. }) => brk,
            // Gone for good: later requests on them get STATUS_FILE_CLOSED.
            AttachEvent::Daemon(Event::Expired { key } | Event::Purged { key }) => {
                // No break sent for these (as before: an open expires
                // only while disconnected).
                let _ = forget_opens(&sh, &[key]);
                continue;
            }
            AttachEvent::Daemon(Event::LocksPresent { file }) => {
                // Acknowledged once no unchecked WRITE is in flight.
                m.filter.locks_present(&m.locked_files, file);
                continue;
            }
            AttachEvent::Daemon(Event::LocksGone { file }) => {
                if let Ok(mut l) = m.locked_files.lock() {
                    l.remove(&file);
                }
                continue;
            }
            AttachEvent::Reattached {
                generation,
                lost,
                locked,
                leases,
                ..
            } => {
                // No break is in progress in a restarted filterd: this
                // member's clients' acks are refused until the next one,
                // and no break parked for an open goes.
                if let Ok(mut b) = sh.breaking.lock() {
                    b.retain(|(g, _), _| member_of(*g, sh.members.len()) != k);
                }
                m.early.clear();
                // Durable (in-memory) opens do not survive a filterd
                // crash. No unchecked I/O meanwhile.
                let gone = {
                    let _quiet = m.filter.exclusive_io();
                    forget_opens(&sh, &lost)
                };
                // Their leases' breaks go first (and not under the I/O
                // gate: a client that does not read holds up only this):
                // `resynced` below tells filterd, which holds other
                // frontends' opens until then.
                // And the leases filterd lowered while this member was
                // away, before any I/O goes again (checked I/O waits for
                // the resync below). Both go at once, with one deadline:
                // a client that does not read holds the resync up
                // [`FORGOTTEN_BREAKS_WAIT`] at most, not twice that
                // (re-review rr41i 1).
                let mut notes = forgotten_breaks(gone);
                notes.extend(lowered_breaks(&sh, &leases));
                send_unacked_breaks(&sh, notes);
                // What the resumes said about locks, before any I/O goes
                // unchecked again; none meanwhile.
                let _quiet = m.filter.exclusive_io();
                m.filter.relearn_locks(&m.locked_files, locked, generation);
                // filterd is back: the closes it never answered go now,
                // not after the outage's backoff (rvchaos 1).
                m.unsettled.kick();
                if sh.clients.open() {
                    eprintln!("smbshim: filterd serves again: accepting clients again");
                }
                continue;
            }
            AttachEvent::Daemon(Event::SteppingDown) => {
                shimline::stepped_down(&sh.clients, "smbshim");
                continue;
            }
            _ => continue,
        };
        let Event::LeaseBreak {
            lease_key,
            current_state,
            new_state,
            epoch,
            ack_required,
            file,
        } = brk
        else {
            continue;
        };
        let b = Break {
            lease_key,
            current_state,
            new_state,
            epoch,
            ack_required,
            file,
        };
        // The opens under the lease hold what it was broken to (a break
        // of a lease filterd then forgets starts from there). Clients'
        // keys reach filterd as they chose them: two clients here may use
        // one key, each on its own file, and the break is of the lease on
        // `file` only (review: it went to whichever client's open came
        // first, and set that client's lease state too).
        let pending = PendingBreak::new(break_json(&b));
        let mut parked = Parked::Not;
        let mut behind_replies = false;
        let session = sh.opens.lock().ok().and_then(|mut o| {
            let mut session = None;
            for x in o.values_mut() {
                if file.is_some_and(|f| f != x.file_key) {
                    continue;
                }
                if let Some(l) = x.lease.as_mut().filter(|l| l.key == lease_key) {
                    (l.state, l.epoch) = (new_state, epoch);
                    session = session.or(Some((x.session, x.client)));
                    if x.held.as_ref().is_some_and(|h| !h.waiting()) {
                        x.held = None;
                    }
                    // Behind every reply, not yet queued, of a call that
                    // stored an open under the lease (before re-review
                    // rr39f 2, behind the latest only).
                    if let Some(h) = x.held.as_ref() {
                        behind_replies |= h.hold(&pending);
                    }
                }
            }
            // Before the client can see it (its ack finds it), and under
            // the opens lock (an open that goes meanwhile ends it).
            if let Some((_, g)) = session {
                note_break(sh.as_ref(), g, &b);
            }
            // And behind the calls in flight that filterd answered before
            // it, granting an open under it, not stored yet — its only
            // open, or one more (rr38h; rr39f 2) — under the opens lock
            // too. Not behind one unanswered: it may wait in filterd for
            // another break's ack (re-review rr40c F1).
            parked = m.early.park(b, &pending, session.map(|(_, g)| g));
            session.map(|(s, _)| s)
        });
        if let Parked::Dropping(k) = parked {
            eprintln!(
                "smbshim: over {} lease breaks wait for opens: the break of lease {k} stopped waiting",
                crate::early_breaks::PARKED_MAX
            );
        }
        let fate = match (behind_replies, parked, session.is_some()) {
            (true, _, _) => "held behind its reply",
            (_, Parked::Yes | Parked::Dropping(_), _) => "parked",
            (_, _, true) => "sent",
            _ => "dropped",
        };
        test_note_break(&b, fate);
        if let Some(w) = session.and_then(|s| writer_of(&sh, s)) {
            pending.fall_back_to(w);
        }
        // Its arrival: it goes now unless it waits for replies or calls.
        pending.pass(None);
    }
}

/// The lease of client `client` that break `b` is of has a break in
/// progress from now (an ack is asked for) or none ([`Shared::breaking`]).
/// Called under the opens lock.
fn note_break(sh: &Shared, client: uuid::Uuid, b: &Break) {
    if let Ok(mut set) = sh.breaking.lock() {
        match b.ack_required {
            true => set.insert((client, b.lease_key), *b),
            false => set.remove(&(client, b.lease_key)),
        };
    }
}

/// The smbl/1 LEASE_BREAK notification of break `b`.
fn break_json(b: &Break) -> Value {
    json!({"cmd": "LEASE_BREAK", "lease_key": b.lease_key, "current_state": b.current_state.to_string(),
           "new_state": b.new_state.to_string(), "epoch": b.epoch, "ack_required": b.ack_required})
}

/// Open `file_id`, just stored in `opens` (locked) by call `call` of
/// member `m`: the LEASE_BREAKs of its lease are held behind the call's
/// reply until that is queued ([`HeldNotes`]), first those filterd sent
/// before it was stored that waited for the call
/// ([`crate::early_breaks`]), applied to the open as [`forward_breaks`]
/// applies a break. Before, those were dropped (re-review rr38h), or
/// applied to the first open stored under the lease only (rr39f 2).
/// Then the lease's break in progress, if the reply shows the state from
/// before it at its epoch ([`resend_break_in_progress`]); `shown` is the lease
/// filterd's answer gave, which the reply shows. Returns those breaks,
/// for [`early_breaks_fall_back`].
fn deliver_early_breaks(
    sh: &Shared,
    m: &Member,
    opens: &mut OpenTable<Open>,
    (file_id, shown): (&str, Option<HeldLease>),
    call: u64,
    after: &mut AfterReply,
) -> Vec<Arc<PendingBreak>> {
    let Some(o) = opens.get_mut(file_id) else {
        return Vec::new();
    };
    let (client, file) = (o.client, o.file_key);
    let Some(l) = o.lease.as_mut() else {
        return Vec::new();
    };
    let held = after.held();
    let mut taken = Vec::new();
    let mut early = Vec::new();
    for (b, pending) in m.early.take(l.key, file, call) {
        (l.state, l.epoch) = (b.new_state, b.epoch);
        note_break(sh, client, &b);
        held.hold_counted(pending.clone());
        taken.push(pending);
        early.push(b);
    }
    // A reply showing no lease of filterd's shows the open's, lowered.
    if let Some(shown) = shown {
        taken.extend(resend_break_in_progress(
            sh,
            (client, file),
            l,
            (shown, &early),
            &held,
        ));
    }
    o.held = Some(held);
    taken
}

/// The break in progress of lease `l` of `client` on `file`, sent before
/// the reply of a call that stored an open under it (a CREATE filterd
/// answered during that break, a RECONNECT) while that reply shows
/// `shown`, the state from before the break at its epoch: a copy of it is held
/// behind the reply (`held`), and the open holds the state broken to, as
/// [`forward_breaks`] sets. filterd answers a call during a break with
/// the state from before it (MS-SMB2 3.3.5.9.8: the break is still in
/// progress), so a client that took the reply's state over the break's
/// it saw first kept caching what it was told to give up, while its ack
/// lowered the lease (re-review rr40e A). Not a break `early` holds
/// behind the reply already. A second copy of a break is harmless, as
/// filterd's `resend_break_on_attach` says: an ack of a break already
/// acknowledged is refused and changes nothing. Called under the opens
/// lock.
fn resend_break_in_progress(
    sh: &Shared,
    (client, file): (uuid::Uuid, FileId),
    l: &mut HeldLease,
    (shown, early): (HeldLease, &[Break]),
    held: &Arc<HeldNotes>,
) -> Option<Arc<PendingBreak>> {
    let b = *sh.breaking.lock().ok()?.get(&(client, l.key))?;
    // Answered during this very break: filterd shows the state from
    // before it at its epoch (leases.rs: a break bumps the epoch). Not a
    // reply after it (an upgrade since shows a later epoch; an entry
    // left behind by an ack whose answer was lost would otherwise send
    // an old break over a newer grant: re-review rr40g 5).
    let stale = shown.state == b.current_state && shown.epoch == b.epoch;
    if !stale || b.file.is_some_and(|f| f != file) || early.contains(&b) {
        return None;
    }
    (l.state, l.epoch) = (b.new_state, b.epoch);
    let pending = PendingBreak::new(break_json(&b));
    held.hold(&pending);
    test_note_break(&b, "sent again behind a reply");
    // Its arrival: it waits for the reply only.
    pending.pass(None);
    Some(pending)
}

/// Breaks `taken` by an open of session `session` ([`deliver_early_breaks`])
/// go to the session's connection if the reply's cannot take them. Out
/// of the opens lock, as in [`forward_breaks`].
fn early_breaks_fall_back(sh: &Shared, session: u64, taken: Vec<Arc<PendingBreak>>) {
    if taken.is_empty() {
        return;
    }
    if let Some(w) = writer_of(sh, session) {
        for b in taken {
            b.fall_back_to(w.clone());
        }
    }
}

/// The test hook (debug builds): `$SMBSHIM_TEST_HOLD_STORE`, a path — a
/// CREATE filterd answered is not stored until that path exists (60 s at
/// most), and every lease break filterd sends is logged with what became
/// of it, so that a test can have a break come while a CREATE's open is
/// not stored yet (`smb.rs::a_break_before_its_open_is_stored_waits_for_it`).
fn test_hold_path() -> Option<&'static Path> {
    static PATH: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    if !cfg!(debug_assertions) {
        return None;
    }
    PATH.get_or_init(|| std::env::var_os("SMBSHIM_TEST_HOLD_STORE").map(Into::into))
        .as_deref()
}

/// [`test_hold_path`]: waits for the path, if set.
fn test_hold_store() {
    let Some(path) = test_hold_path() else {
        return;
    };
    eprintln!(
        "smbshim: test hook: a CREATE filterd answered waits for {}",
        path.display()
    );
    let until = Instant::now() + Duration::from_secs(60);
    while !path.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// [`test_hold_path`]: while `<path>.hold-reply` exists (60 s at most), a
/// CREATE that stored an open with a lease waits before its reply is
/// queued (`smb.rs::a_break_after_its_open_is_stored_waits_for_its_reply`).
fn test_hold_reply() {
    test_hold_while("hold-reply", "a stored CREATE's reply waits");
}

/// [`test_hold_path`]: while `<path>.hold-replay` exists (60 s at most), a
/// replayed CREATE filterd answered, its handle query made, waits before
/// it is stored, so that a CLOSE of the open can take it meanwhile
/// (`failed_close.rs::smbshim_hands_out_no_open_whose_close_is_in_flight`).
fn test_hold_replay() {
    test_hold_while("hold-replay", "a replayed CREATE waits before its store");
}

/// [`test_hold_path`]: while `<path>.hold-logoff` exists (60 s at most), a
/// LOGOFF that found one of its session's opens waits before it takes it,
/// so that a CLOSE can take it first
/// (`failed_close.rs::smbshim_logoff_waits_for_a_close_that_took_its_open_first`).
fn test_hold_logoff() {
    test_hold_while("hold-logoff", "a LOGOFF found an open, waits");
}

/// [`test_hold_path`]: while `<path>.hold-listed` exists (60 s at most),
/// a LOGOFF that listed its session's opens waits before it looks at the
/// first, so that a CLOSE can take one meanwhile
/// (`failed_close.rs::smbshim_logoff_closes_an_open_a_close_took_after_its_listing`).
fn test_hold_listed() {
    test_hold_while("hold-listed", "a LOGOFF listed its opens, waits");
}

/// [`test_hold_path`]: while `<path>.hold-lost` exists (60 s at most), a
/// LOGOFF that found an open another close took first waits before it
/// looks whether closes are in flight, so that the other close can be
/// undone meanwhile
/// (`failed_close.rs::smbshim_logoff_closes_an_open_whose_racing_close_was_undone`).
fn test_hold_logoff_lost() {
    test_hold_while("hold-lost", "a LOGOFF lost an open to another close, waits");
}

/// [`test_hold_path`]: while `<path>.hold-query` exists (60 s at most), a
/// replayed CREATE past its first check waits before its handle query, so
/// that a CLOSE can take the open and have it closed meanwhile
/// (`failed_close.rs::smbshim_a_replay_whose_handle_query_fails_for_a_close_lets_nothing_go`).
fn test_hold_query() {
    test_hold_while(
        "hold-query",
        "a replayed CREATE waits before its handle query",
    );
}

/// [`test_hold_path`]: while `<path>.hold-close` exists (60 s at most),
/// a CLOSE that found its session waits before it looks for the open;
/// while `<path>.hold-end` exists, a session's end waits between taking
/// the session out and sweeping its opens; while `<path>.hold-taken`
/// exists, a CLOSE or LOGOFF that took an open waits before it asks
/// filterd (`failed_close.rs::smbshim_takes_no_open_of_a_session_being_ended`).
fn test_hold_close() {
    test_hold_while("hold-close", "a CLOSE found its session, waits");
}

/// [`test_hold_close`].
fn test_hold_end() {
    test_hold_while("hold-end", "a session's end took it out, waits");
}

/// [`test_hold_close`].
fn test_hold_taken() {
    test_hold_while("hold-taken", "a close took its open, waits");
}

/// While `<`[`test_hold_path`]`>.<suffix>` exists (60 s at most), waits,
/// logging `what` first.
fn test_hold_while(suffix: &str, what: &str) {
    let Some(path) = test_hold_path() else {
        return;
    };
    let mut hold = path.as_os_str().to_owned();
    hold.push(".");
    hold.push(suffix);
    let hold = std::path::PathBuf::from(hold);
    if !hold.exists() {
        return;
    }
    eprintln!("smbshim: test hook: {what}");
    let until = Instant::now() + Duration::from_secs(60);
    while hold.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// [`test_hold_path`]: logs what became of break `b` (`fate`), if set.
fn test_note_break(b: &Break, fate: &str) {
    if test_hold_path().is_none() {
        return;
    }
    eprintln!(
        "smbshim: test hook: the break of lease {} {fate}",
        b.lease_key
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FLUSH's failed data sync is classed by errno, as WRITE's is:
    /// before, every one was STATUS_INTERNAL_ERROR (ENOSPC too). A sync
    /// has no range: its EINVAL is the server's failure (before,
    /// STATUS_INVALID_PARAMETER). `fdatasync` of a pipe fails with EINVAL.
    #[test]
    fn a_failed_flush_sync_is_classed_by_errno() {
        let (r, _w) = std::io::pipe().unwrap();
        let file = shimline::datasync::SyncedFile::from(std::fs::File::from(
            std::os::fd::OwnedFd::from(r),
        ));
        let Err(Fail(status, _)) = sync_written(&file) else {
            panic!("fdatasync of a pipe succeeded");
        };
        assert_eq!(status, "STATUS_INTERNAL_ERROR");
    }

    /// A sync that runs out of space is STATUS_DISK_FULL; every later sync
    /// of the open fails (sticky) with STATUS_INTERNAL_ERROR, not "disk
    /// full" for good after the client freed space (rr38e 2).
    #[test]
    fn a_full_disk_is_told_once_then_the_sticky_failure() {
        let (r, _w) = std::io::pipe().unwrap();
        let file = shimline::datasync::SyncedFile::from(std::fs::File::from(
            std::os::fd::OwnedFd::from(r),
        ));
        let full = file
            .sync_written_by(|_| Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC)))
            .map_err(|e| sync_fail(&e));
        assert_eq!(full.map_err(|Fail(s, _)| s), Err("STATUS_DISK_FULL"));
        let Err(Fail(status, error)) = sync_written(&file) else {
            panic!("a sync after a failed one succeeded");
        };
        assert_eq!(status, "STATUS_INTERNAL_ERROR", "{error}");
        assert!(error.contains("earlier data sync"), "{error}");
    }

    /// A peer's default share is a quarter of the cap, at least 64 (the
    /// whole cap if smaller); each peer is counted apart until its slots
    /// go.
    #[test]
    fn each_peer_holds_its_share_of_the_opens() {
        assert_eq!(opens_per_peer(184), 64);
        assert_eq!(opens_per_peer(1000), 250);
        assert_eq!(opens_per_peer(32), 32);
        let opens = Arc::new(PeerOpens::default());
        let a = Peer::Addr([127, 0, 0, 1].into());
        let b = Peer::Addr([127, 0, 0, 2].into());
        let held: Vec<_> = (0..2).filter_map(|_| opens.reserve(a, 2).ok()).collect();
        assert_eq!(held.len(), 2);
        assert_eq!(opens.reserve(a, 2).err(), Some(2));
        let other = opens.reserve(b, 2);
        assert!(other.is_ok());
        drop(held);
        assert!(opens.reserve(a, 2).is_ok());
        drop(other);
        assert!(opens.lock().is_empty(), "counts given back");
    }

    /// The typed `durable` and `lease` write what their `Value` maps wrote
    /// (the smb-like spec's lines stay byte for byte what clients saw).
    #[test]
    fn typed_grants_and_leases_are_the_maps_bytes() {
        let g = uuid::Uuid::new_v4();
        for (persistent, timeout_ms) in [(true, Some(60_000)), (false, None)] {
            let typed = Grant {
                create_guid: g,
                persistent,
                timeout_ms,
            };
            assert_eq!(
                serde_json::to_string(&typed).ok(),
                Some(
                    json!({"create_guid": g, "persistent": persistent, "timeout_ms": timeout_ms})
                        .to_string()
                )
            );
        }
        let l = HeldLease {
            key: libfilter::lease::LeaseKey(g),
            state: libfilter::lease::LeaseState::parse("RWH").unwrap_or_default(),
            epoch: 3,
        };
        assert_eq!(
            serde_json::to_string(&LeaseShown::of(l)).ok(),
            Some(json!({"key": l.key, "state": l.state.to_string(), "epoch": l.epoch}).to_string())
        );
        assert_eq!(lease_json(None), Value::Null);
    }
}
