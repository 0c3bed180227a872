//! The frontend ↔ filterd wire protocol (version 1). The only place message
//! types are defined.
//!
//! Transport: a Unix `SOCK_SEQPACKET` socket; one message = one packet = one
//! UTF-8 JSON document of at most [`MAX_FRAME`] bytes. The first frame each way
//! is a hello ([`Hello`] / [`HelloReply`]) carrying the version and feature
//! bits. After that the peer sends [`RequestFrame`]s, each with an id of its
//! choosing; the daemon answers each with exactly one [`ServerFrame::Reply`]
//! carrying the same id, in any order (requests may be pipelined) — except
//! [`Request::IoDone`], a one-way notice it never answers — and may push
//! [`ServerFrame::Event`]s at any time. A reply to an open or a resume carries
//! the file descriptor as `SCM_RIGHTS` ancillary data.
//!
//! Decoding never panics: an oversized packet, bad JSON, an unknown request or
//! a bad field becomes a typed [`WireError`] reply (with the request id when
//! it could be read) and the connection stays usable.

use serde::{Deserialize, Serialize};

use crate::lease::{LeaseKey, LeaseState};
use crate::locks::{LockKind, LockOp, LockRange};

use crate::model::{
    Access, ClientId, ConnState, CreateAction, CreateGuid, Disposition, Durability, FileId,
    HandleRecord, HeldLease, InstanceName, LeaseRequest, LockSequence, Protocol, RecordSpec,
    RelPath, ReplayRecord, ReplayScope, ResumeKey, ShareAccess,
};

/// The protocol version this library speaks.
pub const PROTO_VERSION: u32 = 1;
/// Feature bits this library understands.
pub const FEATURES: u64 = FEATURE_LOCK_HINTS;
/// Feature: lock hints. The daemon tells the frontend which files of its
/// handles have byte-range locks ([`Event::LocksPresent`], acknowledged with
/// [`Request::LockHintAck`] before the lock that caused it is granted, and
/// [`Event::LocksGone`]; [`Opened::locked`] at open and resume), so the
/// frontend checks I/O with [`Request::CheckIo`] only on those files and
/// reads and writes every other file without a round trip. A frontend that
/// does not ask for it must check every I/O. A frontend that asks for it
/// says hello only with no such unchecked read or write in flight (after a
/// lost connection, it lets those finish first — `crate::attach` does):
/// a restarted daemon makes a first lock wait for the hello of every
/// hinted frontend that was attached before the restart.
pub const FEATURE_LOCK_HINTS: u64 = 1;
/// Largest frame either side sends or accepts, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;
/// Listings are cut into pages of about this many bytes, so every reply
/// fits in a frame.
pub const PAGE_BYTES: usize = 48 * 1024;
/// Most file descriptors one frame may carry.
pub const MAX_FDS: usize = 1;

/// First frame from a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must be [`PROTO_VERSION`].
    pub version: u32,
    /// Feature bits the peer wants; unknown bits are ignored.
    #[serde(default)]
    pub features: u64,
    /// Who is attaching.
    pub role: Role,
}

/// Who is attaching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Role {
    /// A protocol server. A second live connection with the same instance name
    /// is refused; a new one after the old one died takes over its handles.
    Frontend {
        /// The protocol it speaks.
        protocol: Protocol,
        /// Its instance name.
        instance: InstanceName,
    },
    /// An operator tool (filterctl): may inspect and expire, not open.
    Control,
}

/// The daemon's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The daemon's protocol version.
    pub version: u32,
    /// Feature bits granted.
    pub features: u64,
    /// Incremented at every daemon start: a frontend that sees it change knows
    /// the daemon restarted.
    pub epoch: u64,
    /// The daemon's process id.
    pub pid: u32,
}

/// A request with the id its reply will carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Chosen by the peer; echoed in the reply.
    pub id: u64,
    /// The request.
    #[serde(flatten)]
    pub req: Request,
}

/// Every request a peer can make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Request {
    /// Open (or create) a file beneath the export root. Frontend only.
    Open(OpenRequest),
    /// Re-send of an open that may have executed before a failure (smbl/1
    /// `"replay": true`). With a create GUID the client already uses, the
    /// original open is returned — same resume key, same create action —
    /// and nothing is executed again; a disconnected original is reattached.
    /// Otherwise it is an ordinary open. Frontend only.
    ReplayOpen(OpenRequest),
    /// Reattach a disconnected durable or persistent handle. Frontend only.
    Resume(ResumeRequest),
    /// Close a handle for good. Frontend only.
    Close {
        /// The handle.
        key: ResumeKey,
        /// Records written in the close's own commit, as by
        /// [`Request::WriteRecords`] (nfsl/1: the CLOSE's slot reply): the
        /// handle's removal and the records are durable together or not at
        /// all. Checked before anything is done: a bad scope refuses the
        /// close.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        put: Vec<RecordSpec>,
        /// (scope, op id) of records deleted in the same commit (nfsl/1:
        /// the open state).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        delete: Vec<(ReplayScope, u64)>,
    },
    /// The handle's client lost its connection: a durable or persistent handle
    /// becomes disconnected (its timeout starts), another one is closed.
    /// Frontend only.
    Detach {
        /// The handle.
        key: ResumeKey,
    },
    /// Daemon status.
    Status,
    /// Handles, a page at a time (by resume key): those after `after`.
    Handles {
        /// Resume key the previous page ended with (`next` of its reply).
        #[serde(default)]
        after: Option<ResumeKey>,
    },
    /// One handle.
    Handle {
        /// The handle.
        key: ResumeKey,
    },
    /// Open files and their holders, a page at a time (by file id).
    Files {
        /// File id the previous page ended with (`next` of its reply).
        #[serde(default)]
        after: Option<FileId>,
    },
    /// Attached frontends.
    Frontends,
    /// Counters.
    Stats,
    /// Expire a disconnected handle now. Control only.
    Expire {
        /// The handle.
        key: ResumeKey,
    },
    /// Expire every disconnected handle now. Control only.
    PurgeDisconnected,
    /// Record the reply of a mutating request, durably (for persistent
    /// handles and sessions) before the reply to this request. Frontend only.
    RecordReply {
        /// A handle attached to this connection, or a session of this protocol.
        scope: ReplayScope,
        /// The op id (smbl/1 op_id, nfsl/1 slot seqid...).
        op_id: u64,
        /// The frontend's encoded reply, at most 16 KiB.
        reply: String,
        /// Keep at most this many records in the scope (oldest go first).
        keep: u32,
    },
    /// The recorded reply of an op id, if any. Frontend only.
    LookupReply {
        /// The scope.
        scope: ReplayScope,
        /// The op id.
        op_id: u64,
    },
    /// A session scope's records from op id `after` on (exclusive), a page
    /// at a time: frontends keep small durable tables this way (nfsshim's
    /// clients, sessions and states). A frontend names its own protocol's
    /// scopes; a control connection names any scope in full
    /// (`nfs/clients`).
    ListRecords {
        /// The scope.
        scope: ReplayScope,
        /// Start after this op id.
        #[serde(default)]
        after: Option<u64>,
    },
    /// Writes and deletes several records in one commit (a frontend's table
    /// rows together with the reply that reports them). Frontend only.
    WriteRecords {
        /// Records to write.
        #[serde(default)]
        put: Vec<RecordSpec>,
        /// (scope, op id) of records to delete.
        #[serde(default)]
        delete: Vec<(ReplayScope, u64)>,
    },
    /// Delete one record of a session scope. Frontend only.
    DeleteRecord {
        /// The scope.
        scope: ReplayScope,
        /// The op id.
        op_id: u64,
    },
    /// Drop a session scope's records. Frontend only.
    DropScope {
        /// The scope.
        scope: ReplayScope,
    },
    /// Lock and unlock byte ranges of a handle attached to this connection,
    /// in order, all or nothing (spec/smb-like.md "Byte-range locks"); with
    /// a lock sequence, a replay is recognised and applies nothing.
    /// Frontend only.
    Lock {
        /// The handle.
        key: ResumeKey,
        /// The operations.
        locks: Vec<LockOp>,
        /// MS-SMB2 lock sequence, if any.
        #[serde(default)]
        lock_sequence: Option<LockSequence>,
        /// The protocol's lock-owner these locks belong to (NFS-like), at
        /// most 1 KiB: conflicts report it (`LockView::owner`) in place of
        /// the handle's owner. The handle keeps the latest one given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lock_owner: Option<String>,
    },
    /// May the handle read (or write) this range past other owners' locks
    /// (and, unless `own_protocol_advisory`, past its own shared locks for
    /// a write: LockFileEx)? Frontend only.
    CheckIo {
        /// The handle.
        key: ResumeKey,
        /// The range.
        #[serde(flatten)]
        range: LockRange,
        /// A write (else a read).
        write: bool,
        /// Locks held through handles of the caller's own protocol do not
        /// count (nfsl/1 locks are advisory among nfsl/1 clients; only
        /// smbl/1 locks are mandatory for them).
        #[serde(default)]
        own_protocol_advisory: bool,
    },
    /// One-way, never answered: the read or write that the `CheckIo`
    /// request `check` (its frame id) allowed has been done (its
    /// pread/pwrite returned). Until then filterd counts that I/O as in
    /// flight, and a LOCK of another handle whose range it would conflict
    /// with (any lock over a write, an exclusive one over a read) waits
    /// for it — up to the break timeout, after which this frontend is
    /// dropped like one that does not acknowledge a lock hint. Every
    /// passed `CheckIo` must be followed by one (`libfilter`'s
    /// [`crate::client::CheckedIo`] guard sends it when dropped, also when
    /// the check timed out). A `CheckIo` still waiting is withdrawn by it
    /// (answered `Busy`); another id filterd does not know is ignored.
    /// Frontend only.
    IoDone {
        /// The id of the `CheckIo` request frame that passed.
        check: u64,
    },
    /// The holder of a lease acknowledges a break to `state` (at most what
    /// the break asked for). With no break in progress, the holder lowers
    /// its lease of its own accord (`state` at most what it holds; the
    /// lease must be held through this connection). Frontend only.
    LeaseBreakAck {
        /// The lease key.
        lease_key: LeaseKey,
        /// The state kept.
        state: LeaseState,
    },
    /// A write through a handle attached to this connection: other keys'
    /// leases on its file that cache reads only (R, level II oplocks) are
    /// broken to none, without an acknowledgement (MS-FSA 2.1.5.3: a
    /// write breaks level II oplocks and read-only leases). Answered
    /// `Done`. Frontend only.
    BreakReadCaching {
        /// The handle written through.
        key: ResumeKey,
    },
    /// Rename the file of a handle attached to this connection (needs delete
    /// access; every other open must share delete). Non-idempotent: for a
    /// persistent handle or with `record`, bracketed by an intent, and the
    /// frontend's success reply is recorded in the same commit. Frontend only.
    Rename {
        /// The handle.
        key: ResumeKey,
        /// The new path.
        to: RelPath,
        /// Replace an existing target.
        #[serde(default)]
        replace: bool,
        /// Record this reply for replay when it succeeds.
        #[serde(default)]
        record: Option<RecordSpec>,
    },
    /// Set the end of file of a handle attached to this connection (needs
    /// write access): truncate or extend. Bracketed like `Rename`.
    /// Frontend only.
    SetEndOfFile {
        /// The handle.
        key: ResumeKey,
        /// The new size.
        size: u64,
        /// Record this reply for replay when it succeeds.
        #[serde(default)]
        record: Option<RecordSpec>,
    },
    /// Set or clear delete-on-close on a handle attached to this connection
    /// (needs delete access): the file is removed when its last open goes
    /// away. Idempotent; `record` is stored in the same commit. Frontend only.
    SetDeleteOnClose {
        /// The handle.
        key: ResumeKey,
        /// Set (true) or clear (false).
        delete: bool,
        /// Record this reply for replay when it succeeds.
        #[serde(default)]
        record: Option<RecordSpec>,
    },
    /// Lock hints: this frontend checks I/O on `file` from now on (answers
    /// [`Event::LocksPresent`]). Frontend only.
    LockHintAck {
        /// The file.
        file: FileId,
    },
    /// Remove a file by path (every open of it must share delete).
    /// Non-idempotent: with `record`, bracketed by an intent and the reply
    /// recorded in the same commit. Frontend only.
    Remove {
        /// The path.
        path: RelPath,
        /// Record this reply for replay when it succeeds.
        #[serde(default)]
        record: Option<RecordSpec>,
    },
    /// Byte-range locks, a page at a time (by file id).
    Locks {
        /// File id the previous page ended with.
        #[serde(default)]
        after: Option<FileId>,
    },
}

impl Request {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Open(_) => "open",
            Request::ReplayOpen(_) => "replay_open",
            Request::RecordReply { .. } => "record_reply",
            Request::LookupReply { .. } => "lookup_reply",
            Request::DropScope { .. } => "drop_scope",
            Request::ListRecords { .. } => "list_records",
            Request::DeleteRecord { .. } => "delete_record",
            Request::WriteRecords { .. } => "write_records",
            Request::Lock { .. } => "lock",
            Request::CheckIo { .. } => "check_io",
            Request::IoDone { .. } => "io_done",
            Request::Locks { .. } => "locks",
            Request::LeaseBreakAck { .. } => "lease_break_ack",
            Request::BreakReadCaching { .. } => "break_read_caching",
            Request::Rename { .. } => "rename",
            Request::Remove { .. } => "remove",
            Request::LockHintAck { .. } => "lock_hint_ack",
            Request::SetEndOfFile { .. } => "set_end_of_file",
            Request::SetDeleteOnClose { .. } => "set_delete_on_close",
            Request::Resume(_) => "resume",
            Request::Close { .. } => "close",
            Request::Detach { .. } => "detach",
            Request::Status => "status",
            Request::Handles { .. } => "handles",
            Request::Handle { .. } => "handle",
            Request::Files { .. } => "files",
            Request::Frontends => "frontends",
            Request::Stats => "stats",
            Request::Expire { .. } => "expire",
            Request::PurgeDisconnected => "purge_disconnected",
        }
    }
}

/// Open a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// The protocol client that will own the handle.
    pub client: ClientId,
    /// Path beneath the export root.
    pub path: RelPath,
    /// What the open does.
    pub access: Access,
    /// What it lets others do.
    pub share: ShareAccess,
    /// What to do when the file exists or not.
    pub disposition: Disposition,
    /// How long the handle outlives its client.
    pub durability: Durability,
    /// The client's id for this open (durable opens).
    #[serde(default)]
    pub create_guid: Option<CreateGuid>,
    /// Protocol-level owner, if any.
    #[serde(default)]
    pub owner: Option<String>,
    /// A lease (or delegation) wanted with the open.
    #[serde(default)]
    pub lease: Option<LeaseRequest>,
    /// Fail with [`ErrorCode::Busy`] instead of waiting when lease holders
    /// must acknowledge a break first (the breaks are sent all the same):
    /// nfsl/1 answers such opens NFS4ERR_DELAY.
    #[serde(default)]
    pub no_wait: bool,
    /// One share reservation across several handles: this client's handles
    /// with the same group, opened through the same frontend instance (so
    /// no other peer can join them), never conflict with each
    /// other's access or share modes, nor break each other's leases; every
    /// other open sees the union of their modes. nfsl/1 names the open-owner
    /// here, since RFC 8881 §9.7 makes an open-owner's OPENs of one file one
    /// share reservation whose modes are upgraded, never refused by its own
    /// deny. smbl/1 leaves it unset: there, every open's modes count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_group: Option<String>,
    /// An attribute-only open (MS-FSA 2.1.5.1.2, a "stat open": SMB 2/3
    /// opens asking only for attributes, security reads or SYNCHRONIZE).
    /// It takes no part in sharing, breaks no lease and does not count as
    /// another open when leases are granted. Kept in filterd's memory
    /// only: after a reattach or a filterd restart the handle counts as
    /// the reader its access says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stat: bool,
    /// Records written in the open's own commit, as by
    /// [`Request::WriteRecords`] (nfsl/1: the open state and the OPEN's slot
    /// reply), only if the open succeeds: the handle and the records are
    /// durable together or not at all. A record whose text is a JSON object
    /// with an `"opened"` member is completed by filterd: `"opened"` becomes
    /// this open's [`Opened`] (resume key, create action, size, lease
    /// granted), which only filterd knows before the commit. A re-sent open
    /// that returns the original ([`Request::ReplayOpen`]) writes them again,
    /// completed with what it returns. Refused with a persistent open that
    /// truncates (it commits in two steps, see the intents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub put: Vec<RecordSpec>,
}

/// Which handle to resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum ResumeTarget {
    /// By resume key.
    Key {
        /// The handle.
        key: ResumeKey,
    },
    /// By the client's create GUID.
    CreateGuid {
        /// The client's id for the open.
        create_guid: CreateGuid,
    },
}

/// Resume a disconnected handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRequest {
    /// Must be the client that owns the handle (invariant 6).
    pub client: ClientId,
    /// Which handle.
    #[serde(flatten)]
    pub target: ResumeTarget,
}

/// Why a request failed. Typed on the wire; frontends map these onto their
/// protocol's statuses in one place each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded (bad JSON, bad field, too large).
    BadFrame,
    /// The hello named a version this daemon does not speak.
    UnsupportedVersion,
    /// A request was sent before a hello, or a second hello.
    ProtocolViolation,
    /// A request the peer's role may not make.
    NotPermitted,
    /// A frontend with this instance name is attached already.
    InstanceBusy,
    /// The file does not exist.
    NotFound,
    /// A directory on the path does not exist.
    PathNotFound,
    /// The file exists (create).
    Collision,
    /// The path leaves the export root, or permission denied.
    AccessDenied,
    /// The path names a directory or something else that is not a file.
    NotAFile,
    /// A live open's share mode conflicts.
    SharingViolation,
    /// A disconnected persistent open holds the file, or the daemon is
    /// recovering: retry later.
    FileNotAvailable,
    /// No such handle (or not resumable: connected, expired, closed).
    NoSuchHandle,
    /// The client already has an open with this create GUID.
    DuplicateCreateGuid,
    /// The open's lease key is held on another file (a lease key names
    /// one file, MS-SMB2 3.3.5.9.8 / 3.3.5.9.11).
    LeaseKeyInUse,
    /// The request needs something this filesystem or build does not offer.
    Unsupported,
    /// A lock conflicts with another (detail in `conflict`).
    LockNotGranted,
    /// An unlock names no lock of the handle.
    RangeNotLocked,
    /// I/O over a range another handle has locked (detail in `conflict`).
    LockConflict,
    /// The handle belongs to another client or protocol.
    NotOwner,
    /// The state store or the filesystem is full.
    DiskFull,
    /// A limit was reached (handles, frontends).
    LimitReached,
    /// The request would wait for a lease break and asked not to: the break
    /// was sent; retry later.
    Busy,
    /// A fault in the daemon; the message says which.
    Internal,
}

/// A failed request: the code is what peers act on, the message is for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    /// What went wrong.
    pub code: ErrorCode,
    /// Details for a person.
    pub message: String,
    /// The lock in the way, for lock and I/O conflicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<Box<LockView>>,
}

impl WireError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
            conflict: None,
        }
    }
}

/// A granted open or resume. The reply frame carries the descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    /// The handle's resume key.
    pub key: ResumeKey,
    /// What the original open did to the file (also on a resume).
    pub create_action: CreateAction,
    /// File size at open or resume.
    pub size: u64,
    /// The file.
    pub file: FileId,
    /// The durability granted (timeouts normalized).
    pub durability: Durability,
    /// The lease the open holds (possibly less than asked, possibly none).
    #[serde(default)]
    pub lease: Option<HeldLease>,
    /// Lock hints: the file has byte-range locks (I/O must be checked).
    #[serde(default)]
    pub locked: bool,
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Reply {
    /// Open or resume granted; one descriptor attached.
    Opened(Opened),
    /// Done, nothing to report.
    Done,
    /// Daemon status.
    Status(StatusInfo),
    /// Handles.
    Handles {
        /// The handles.
        handles: Vec<HandleView>,
        /// Pass as `after` for the next page; none when this was the last.
        #[serde(default)]
        next: Option<ResumeKey>,
    },
    /// One handle.
    Handle(HandleView),
    /// Files.
    Files {
        /// The files.
        files: Vec<FileView>,
        /// Pass as `after` for the next page; none when this was the last.
        #[serde(default)]
        next: Option<FileId>,
    },
    /// Frontends.
    Frontends {
        /// The frontends.
        frontends: Vec<FrontendView>,
    },
    /// Counters.
    Stats(Stats),
    /// A lease after an acknowledged break.
    Lease(HeldLease),
    /// A recorded reply, or none.
    Recorded {
        /// The record.
        record: Option<ReplayRecord>,
    },
    /// A page of a scope's records, by op id.
    Records {
        /// (op id, reply) pairs in op-id order.
        records: Vec<(u64, String)>,
        /// Where the next page starts, if any.
        next: Option<u64>,
    },
    /// Locks.
    Locks {
        /// The locks.
        locks: Vec<LockView>,
        /// Pass as `after` for the next page.
        #[serde(default)]
        next: Option<FileId>,
    },
    /// How many handles a purge expired.
    Purged {
        /// Handles expired.
        count: u64,
    },
}

/// One frame from the daemon.
// Frames are built, encoded and dropped at once; boxing the reply would only
// add an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "frame")]
pub enum ServerFrame {
    /// Answer to a hello.
    Hello(HelloReply),
    /// Answer to a request (`id` is null when the request's id could not be read).
    Reply {
        /// The request's id.
        id: Option<u64>,
        /// Its outcome.
        result: Result<Reply, WireError>,
    },
    /// Something happened to a handle of this frontend.
    Event(Event),
}

/// Pushed by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// A disconnected handle reached its timeout and was closed.
    Expired {
        /// The handle.
        key: ResumeKey,
    },
    /// A disconnected durable handle was closed so a conflicting open could
    /// proceed.
    Purged {
        /// The handle.
        key: ResumeKey,
    },
    /// A lease of this frontend's must go down to `new_state`: acknowledge
    /// with `LeaseBreakAck` when `ack_required` (the conflicting open waits
    /// up to the break timeout), else it is lowered already.
    LeaseBreak {
        /// The lease key.
        lease_key: LeaseKey,
        /// The state held.
        current_state: LeaseState,
        /// The state to break to.
        new_state: LeaseState,
        /// The lease's epoch after the break.
        epoch: u16,
        /// Whether the holder must acknowledge.
        ack_required: bool,
    },
    /// Lock hints: `file` has byte-range locks now. Acknowledge with
    /// [`Request::LockHintAck`] once I/O on it is checked: the lock that
    /// caused this waits for the acknowledgement (up to 2 s).
    LocksPresent {
        /// The file.
        file: FileId,
    },
    /// Lock hints: `file` has no byte-range locks any more.
    LocksGone {
        /// The file.
        file: FileId,
    },
    /// Client-side only: the connection to the daemon was lost.
    ConnectionLost,
}

/// A handle as filterctl shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleView {
    /// The stored record.
    #[serde(flatten)]
    pub record: HandleRecord,
    /// Whether the daemon holds an open descriptor for it.
    pub fd_open: bool,
}

/// A byte-range lock as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockView {
    /// The file.
    pub file: FileId,
    /// The holding handle.
    pub key: ResumeKey,
    /// The holder's protocol-level owner (NFS-like lock-owner), if any.
    #[serde(default)]
    pub owner: Option<String>,
    /// The range.
    #[serde(flatten)]
    pub range: LockRange,
    /// Shared or exclusive.
    pub kind: LockKind,
    /// Not (yet) taken as an OFD lock: a local process holds a conflicting
    /// one (filterd keeps trying). Local processes do not see it meanwhile.
    #[serde(default)]
    pub unmirrored: bool,
}

/// A file with open handles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileView {
    /// The file.
    pub file: FileId,
    /// A path it was opened by.
    pub path: RelPath,
    /// Its handles.
    pub holders: Vec<FileHolder>,
}

/// A handle on a file, as the share check sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHolder {
    /// The handle.
    pub key: ResumeKey,
    /// Its access.
    pub access: Access,
    /// Its share.
    pub share: ShareAccess,
    /// Its durability.
    pub durability: Durability,
    /// Attached or not.
    pub conn: ConnState,
}

/// An attached frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendView {
    /// Its protocol.
    pub protocol: Protocol,
    /// Its instance name.
    pub instance: InstanceName,
    /// Its process id (SO_PEERCRED).
    pub pid: i32,
    /// Its user id (SO_PEERCRED).
    pub uid: u32,
    /// When it attached, Unix ms.
    pub attached_ms: u64,
    /// Handles it holds.
    pub handles: u64,
}

/// Daemon status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Process id.
    pub pid: u32,
    /// Daemon epoch.
    pub epoch: u64,
    /// Export root.
    pub root: String,
    /// State directory.
    pub state_dir: String,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// Handles by connection state: connected, disconnected, lost.
    pub handles_connected: u64,
    /// Disconnected handles.
    pub handles_disconnected: u64,
    /// Lost handles.
    pub handles_lost: u64,
    /// Attached frontends.
    pub frontends: u64,
    /// Whether the recovery window is open.
    pub recovering: bool,
    /// Whether local access is mediated through fanotify.
    pub fanotify: bool,
    /// What local mediation covers (`off`; the export's whole filesystem,
    /// or the export as a subtree of its filesystem — every mount of it
    /// either way).
    #[serde(default)]
    pub mediation: String,
    /// The state store's kind (`lmdb`).
    #[serde(default)]
    pub store: String,
    /// Schema version of the store.
    pub schema_version: u32,
}

/// Counters since daemon start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Opens granted.
    pub opens: u64,
    /// Intents recorded for non-idempotent changes.
    pub intents: u64,
    /// Dangling intents finished by recovery.
    pub intents_recovered: u64,
    /// Dangling size changes whose outcome recovery could not know (the
    /// file changed while filterd was down, and no mark proved the change):
    /// left undone, their replays answered with an error.
    #[serde(default)]
    pub intents_unknown: u64,
    /// Replies recorded for op-id replay.
    pub replies_recorded: u64,
    /// Opens refused (any reason).
    pub opens_refused: u64,
    /// Sharing violations.
    pub sharing_violations: u64,
    /// Opens and resumes answered "not available now, retry": a
    /// disconnected persistent open holds the file (`FileNotAvailable`),
    /// or a lease is being broken (`Busy`: a local process's kernel lease,
    /// or a `no_wait` open's break of a protocol lease).
    pub not_available: u64,
    /// Handles resumed.
    pub resumes: u64,
    /// Handles closed by request.
    pub closes: u64,
    /// Handles that became disconnected.
    pub disconnects: u64,
    /// Disconnected handles expired.
    pub expiries: u64,
    /// Disconnected durable handles purged by a conflicting open.
    pub purges: u64,
    /// Replayed requests recognised (create GUID, lock sequence, op id).
    pub replays_detected: u64,
    /// Lease breaks sent.
    pub breaks: u64,
    /// Lock requests granted.
    pub locks_granted: u64,
    /// Lock requests refused (conflict or range not locked).
    pub locks_refused: u64,
    /// I/O checks asked for (CheckIo round trips).
    #[serde(default)]
    pub io_checks: u64,
    /// I/O checks refused by a lock.
    pub io_conflicts: u64,
    /// Times a LOCK was held back by a checked read or write of another
    /// handle in flight (until its `IoDone`).
    #[serde(default)]
    pub locks_waited_for_io: u64,
    /// Locks a local process's fcntl lock kept out (OFD conflict).
    pub local_lock_conflicts: u64,
    /// Local opens (fanotify) allowed.
    pub local_opens_allowed: u64,
    /// Local opens refused by a protocol share mode.
    pub local_opens_denied: u64,
    /// Local opens refused by the watchdog (no verdict in time).
    pub local_opens_watchdog: u64,
    /// Local opens refused undecided because filterd was overloaded.
    #[serde(default)]
    pub local_opens_overloaded: u64,
    /// fanotify queue overflows (local opens that may have passed unseen).
    #[serde(default)]
    pub fanotify_overflows: u64,
    /// Failed reads of the fanotify group (retried).
    #[serde(default)]
    pub fanotify_read_errors: u64,
    /// Ignore marks that could not be added or removed.
    #[serde(default)]
    pub ignore_mark_failures: u64,
    /// Times the fanotify reader found no descriptor free to read an
    /// event with and waited (the event left queued in the kernel, its
    /// opener waiting) rather than have the kernel refuse it.
    #[serde(default)]
    pub fanotify_waits_for_descriptors: u64,
    /// Local opens of the export read while `max_pending` of them waited
    /// for verdicts already: held in the reader's backlog until room
    /// frees, so the reader goes on answering opens outside the export.
    #[serde(default)]
    pub local_opens_backlogged: u64,
    /// Local opens the kernel refused at once because the file could not
    /// be opened for the fanotify event without waiting (a local process's
    /// lease on it being broken).
    #[serde(default)]
    pub local_opens_lease_refused: u64,
    /// Local opens of a file whose create was committing that waited for
    /// the commit's outcome (refused if the create was undone).
    #[serde(default)]
    pub local_opens_waited_for_commit: u64,
    /// Files filterd claimed after its open broke a local process's kernel
    /// lease (held open until the retry's open, at most 10 s).
    #[serde(default)]
    pub lease_claims: u64,
    /// Such breaks not followed by a claim (claim threads all busy, or the
    /// claim's open failed).
    #[serde(default)]
    pub lease_claims_missed: u64,
    /// Checks for existing local opens whose `/proc` scan passed its budget
    /// and were decided as if a local opener existed.
    #[serde(default)]
    pub local_scans_cut_short: u64,
    /// Local opens refused because no verdict was given for them (filterd
    /// stopping, or a thread ending without answering): the default answer.
    #[serde(default)]
    pub local_opens_denied_by_default: u64,
    /// Protocol opens refused because they would have left filterd fewer
    /// free descriptors than it keeps in reserve (to read fanotify events).
    #[serde(default)]
    pub opens_refused_descriptors: u64,
    /// Protocol opens refused because local opens of their file could not
    /// be made to reach filterd again (its ignore mark could not be
    /// removed): granting them would leave the file unmediated.
    #[serde(default)]
    pub opens_refused_unmediated: u64,
    /// Persistent handles reopened at start.
    pub recoveries: u64,
    /// Handles found lost at start.
    pub recoveries_lost: u64,
    /// LMDB write transactions committed.
    pub commits: u64,
    /// Store operations in those commits.
    pub committed_ops: u64,
    /// Frames refused as malformed.
    pub bad_frames: u64,
    /// Frontend connections accepted.
    pub frontends_attached: u64,
    /// Frontend connections lost.
    pub frontends_lost: u64,
    /// Frontends dropped for not acknowledging a lock hint in time, or
    /// for a checked read or write a lock waited on past the break timeout.
    #[serde(default)]
    pub frontends_dropped: u64,
}

/// Encodes a frame, refusing one larger than [`MAX_FRAME`].
pub fn encode<T: Serialize>(frame: &T) -> Result<Vec<u8>, WireError> {
    let bytes = serde_json::to_vec(frame)
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("encode: {e}")))?;
    if bytes.len() > MAX_FRAME {
        return Err(WireError::new(
            ErrorCode::BadFrame,
            format!("frame of {} bytes exceeds {MAX_FRAME}", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// Decodes a hello.
pub fn decode_hello(bytes: &[u8]) -> Result<Hello, WireError> {
    serde_json::from_slice(bytes)
        .map_err(|e| WireError::new(ErrorCode::BadFrame, format!("bad hello: {e}")))
}

/// Decodes a request. On failure, returns the request id too when it could be
/// read, so the rejection can name it.
///
/// The id and the request are read in two passes over the bytes rather
/// than through [`RequestFrame`]'s `#[serde(flatten)]`: flatten buffers
/// every field into serde's generic content tree and the `op` tag buffers
/// it again, which made this decoder the largest part of filterd's engine
/// thread in issue 16's profile (non-durable open+close). The id pass
/// skips the other fields without allocating; the request ignores the
/// `id` key (no request has a field of that name), so the frames accepted
/// are the same.
pub fn decode_request(bytes: &[u8]) -> Result<RequestFrame, (Option<u64>, WireError)> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }
    let bad =
        |e: serde_json::Error| WireError::new(ErrorCode::BadFrame, format!("bad request: {e}"));
    let id = serde_json::from_slice::<IdOnly>(bytes).map(|x| x.id);
    match (id, serde_json::from_slice::<Request>(bytes)) {
        (Ok(id), Ok(req)) => Ok(RequestFrame { id, req }),
        (id, Err(e)) => Err((id.ok(), bad(e))),
        (Err(e), Ok(_)) => Err((None, bad(e))),
    }
}

/// Decodes a frame from the daemon.
pub fn decode_server(bytes: &[u8]) -> Result<ServerFrame, WireError> {
    serde_json::from_slice(bytes)
        .map_err(|e| WireError::new(ErrorCode::BadFrame, format!("bad server frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Rights;

    #[test]
    fn request_roundtrip() {
        let f = RequestFrame {
            id: 7,
            req: Request::Open(OpenRequest {
                client: ClientId::new("c1").unwrap(),
                path: RelPath::new("a/b").unwrap(),
                access: Access::new(Rights::READ).unwrap(),
                share: Rights::ALL,
                disposition: Disposition::OpenIf,
                durability: Durability::Persistent { timeout_ms: 0 },
                create_guid: None,
                owner: None,
                lease: None,
                no_wait: false,
                share_group: None,
                stat: false,
                put: Vec::new(),
            }),
        };
        let b = encode(&f).unwrap();
        assert_eq!(decode_request(&b).unwrap(), f);
    }

    /// The two-pass decoder accepts and reads exactly what the derived
    /// (flattened) one does: unit, struct, newtype and flattened-field
    /// variants, with `id` first, last or in the middle, and refuses what
    /// it refuses.
    #[test]
    fn two_pass_decode_agrees_with_the_flattened_frame() {
        let key = ResumeKey::new_random();
        let frames = [
            r#"{"id":1,"op":"status"}"#.to_owned(),
            r#"{"op":"status","id":2}"#.to_owned(),
            format!(r#"{{"op":"close","id":3,"key":"{key}"}}"#),
            format!(
                r#"{{"id":4,"op":"check_io","key":"{key}","offset":5,"length":6,"write":true}}"#
            ),
            r#"{"id":5,"op":"open","client":"c","path":"a","access":["read"],"share":[],"disposition":"open","durability":{"kind":"none"}}"#.to_owned(),
            r#"{"id":6,"op":"open","client":"c","path":"../x","access":["read"],"share":[],"disposition":"open","durability":{"kind":"none"}}"#.to_owned(),
            r#"{"id":7,"op":"status","id":8}"#.to_owned(),
            r#"{"op":"status"}"#.to_owned(),
        ];
        for f in &frames {
            let derived = serde_json::from_slice::<RequestFrame>(f.as_bytes());
            let ours = decode_request(f.as_bytes());
            match (derived, ours) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{f}"),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("{f}: derived {a:?}, two-pass {b:?}"),
            }
        }
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        let cases: &[&[u8]] = &[
            b"",
            b"\xff\xfe",
            b"[]",
            b"{\"id\": 3}",
            b"{\"id\": 3, \"op\": \"format_disk\"}",
            b"{\"id\": 3, \"op\": \"open\", \"client\": \"c\", \"path\": \"../x\", \"access\": [\"read\"], \"share\": [], \"disposition\": \"open\", \"durability\": {\"kind\": \"none\"}}",
            b"{\"id\": -1, \"op\": \"status\"}",
        ];
        for c in cases {
            let (id, e) = decode_request(c).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadFrame);
            if c.starts_with(b"{\"id\": 3") {
                assert_eq!(id, Some(3));
            }
        }
    }
}
