//! The frontend ↔ filterd wire protocol (version 1). The only place message
//! types are defined.
//!
//! Transport: a Unix `SOCK_SEQPACKET` socket; one message = one packet of at
//! most [`MAX_FRAME`] bytes: a UTF-8 JSON document, or a binary frame once
//! the hello agreed on [`FEATURE_BINARY_FRAMES`] — with the open+close
//! frames in a hand-made compact layout once it also agreed on
//! [`FEATURE_COMPACT_FRAMES`] (see [`Encoding`], the layout at that
//! feature, and docs/ARCHITECTURE.md, "Frame format"). The first frame each way is a
//! hello ([`Hello`] / [`HelloReply`], always JSON) carrying the version and
//! feature bits. After that the peer sends [`RequestFrame`]s, each with an id of its
//! choosing; the daemon answers each with exactly one [`ServerFrame::Reply`]
//! carrying the same id, in any order (requests may be pipelined) — except
//! [`Request::IoDone`], a one-way notice it never answers — and may push
//! [`ServerFrame::Event`]s at any time. A reply to an open or a resume carries
//! the file descriptor as `SCM_RIGHTS` ancillary data.
//!
//! Decoding never panics: an oversized packet, bad JSON or MessagePack, an unknown request or
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
pub const FEATURES: u64 = FEATURE_LOCK_HINTS
    | FEATURE_BINARY_FRAMES
    | FEATURE_COMPACT_FRAMES
    | FEATURE_COMPACT_RECORDS
    | FEATURE_RETRY_CODE
    | FEATURE_RESYNCED
    | FEATURE_RENAME_DIRECTORY
    | FEATURE_SHARE_EXEMPT
    | FEATURE_RESUME_OWNER
    | FEATURE_TIME_ORDERED_KEYS
    | FEATURE_OPEN_KERNEL_HANDLE
    | FEATURE_REPLAY_REPORTS
    | FEATURE_WRITE_NOTICES
    | FEATURE_ORDERED_DELETE_QUERY
    | FEATURE_CLOSE_DELETE_ON_CLOSE
    | FEATURE_PAGED_WITHIN_FILE
    | FEATURE_WAIT_FOR_HINTS
    | FEATURE_RESUME_MATCH
    | FEATURE_FENCED_IO
    | FEATURE_STEP_DOWN
    | FEATURE_RESUME_ONLY;
/// Feature: binary frames, version 1. Once the hello (JSON both ways)
/// granted it, each side writes every further frame as MessagePack
/// (structs as maps with their field names, enums as serde's derive
/// shapes them: the same document as the JSON form, in binary), wrapped
/// in an array: a request as `[id, request]`, a daemon frame as
/// `[0, hello_reply]`, `[1, id or nil, {"Ok": reply} or {"Err": error}]`
/// or `[2, event]`. The daemon still reads JSON frames on such a
/// connection. A different binary layout would take another bit.
pub const FEATURE_BINARY_FRAMES: u64 = 2;
/// Feature: compact hot frames (issue 16), on top of
/// [`FEATURE_BINARY_FRAMES`] (granted together with it; alone it changes
/// nothing). The four frames of an open+close — an open or replay open
/// without records to write, a close without records, an `Opened` reply
/// and a `Done` reply — are written in a hand-made layout instead of
/// MessagePack; every other frame stays a binary frame, version 1. Both
/// sides read all three forms on any connection (the first byte tells:
/// `{` JSON, an array marker binary, `0xc1` — the marker MessagePack
/// never uses — compact). Layout (`varint`: unsigned LEB128, at most 10
/// bytes; `str`: varint length, then that many UTF-8 bytes; `uuid`: 16
/// bytes; `opt`: 0, or 1 then a varint; `dur`: 0 none, 1 durable then
/// varint `timeout_ms`, 2 persistent then varint `timeout_ms`):
///
/// ```text
/// open / replay open  c1 01|02 id:varint flags access share disposition dur
///                     client:str path:str [create_guid:uuid] [owner:str]
///                     [lease key:uuid state epoch:varint] [share_group:str]
///     flags: 1 create_guid, 2 owner, 4 lease, 8 no_wait, 16 share_group,
///            32 stat, 64 share_exempt, 128 wait_for_hints; access and share: the rights
///            bits (1 read, 2 write, 4 delete); disposition 0..=5 in the
///            order of `Disposition`; state: the lease state bits
/// close               c1 03 id:varint key:uuid
/// Opened reply        c1 04 id:opt flags key:uuid create_action size:varint
///                     dev:varint ino:varint dur [lease key:uuid state epoch]
///     flags: 1 lease, 2 locked; create_action 0..=3 in the order of
///            `CreateAction`
/// Done reply          c1 05 id:opt
/// ```
///
/// Nothing may follow a frame. The decoder is total: a short frame, a
/// length past its end, an unknown flag, kind or enum value, bad UTF-8 or
/// a value the model refuses (an empty access, a bad path) is a
/// [`ErrorCode::BadFrame`] [`WireError`].
pub const FEATURE_COMPACT_FRAMES: u64 = 4;
/// Feature: compact frames also for an open, replay open or close that
/// carries records to write (issue 16: nfsshim's OPEN writes its open
/// state and slot reply in the open's commit, its CLOSE the slot reply,
/// and the MessagePack decode of those frames was filterd's largest extra
/// cost per nfsl/1 pair). On top of [`FEATURE_COMPACT_FRAMES`] (granted
/// with both it and [`FEATURE_BINARY_FRAMES`]; alone it changes nothing).
/// A writer uses these kinds only once granted (an older daemon reads
/// them as unknown kinds); the daemon reads them on any connection.
/// Layout (`rec`: `scope op_id:varint reply:str keep:varint`; `scope`: 0
/// then the handle's resume key `uuid`, or 1 then the session scope's
/// name `str`; `n`, `m`: varint counts, at least 1 record or deletion):
///
/// ```text
/// open / replay open with records  c1 06|07, then the open's layout as
///                                  above, then n:varint rec × n
/// close with records               c1 08 id:varint key:uuid n:varint
///                                  rec × n m:varint (scope op_id) × m
/// ```
pub const FEATURE_COMPACT_RECORDS: u64 = 8;
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
/// Feature: the [`ErrorCode::Retry`] answer. A request refused because
/// the file or its name changed under it (a local process created,
/// removed or replaced it meanwhile) or because the original of a
/// replayed open is still in progress is answered `Retry` on a
/// connection that was granted this bit, and `FileNotAvailable` — what
/// every daemon answered before the bit existed — on any other, so a
/// frontend that does not know the code never sees it. `FileNotAvailable`
/// then keeps only its lasting meaning on such a connection: a
/// disconnected persistent open holds the file. nfsshim asks for it (its
/// clients are told `NFS4ERR_DELAY`, not `NFS4ERR_SHARE_DENIED`);
/// smbshim and rksmbd do not (both answer `STATUS_FILE_NOT_AVAILABLE`
/// either way).
pub const FEATURE_RETRY_CODE: u64 = 16;
/// Feature: the [`Request::Resynced`] notice. A frontend that asks for it
/// tells the daemon, after every hello, once it has applied what the
/// reattach that followed it found — above all, once it has sent its
/// clients the breaks of the leases whose handles a restarted daemon
/// forgot. A restarted daemon holds every open (but the frontend's own)
/// until each frontend seen before the restart whose process is alive
/// has said it: until the notice for one that asked for this bit, until
/// the hello for one that did not (or, either way, the break timeout).
/// `crate::attach` asks for it and sends the notice from
/// `Attachment::resynced` (and right after its first hello).
pub const FEATURE_RESYNCED: u64 = 32;
/// Feature: [`Request::RenameDirectory`]. A daemon without it answers the
/// request `BadFrame`; a frontend then renames directories itself, and a
/// handle below one keeps the path it was opened by.
pub const FEATURE_RENAME_DIRECTORY: u64 = 64;
/// Feature: the daemon knows [`OpenRequest::share_exempt`]. A daemon
/// without it refuses the compact open flag for it as unknown
/// (`BadFrame`), so [`crate::client::FilterClient`] always asks for the bit
/// and, when it is not granted, sends such an open without the flag: the
/// open then takes part in sharing, as every open did before.
pub const FEATURE_SHARE_EXEMPT: u64 = 128;
/// Feature: the daemon checks [`ResumeRequest::owner`]. rksmbd asks for
/// it; without it a reconnect is checked by client alone, as before.
pub const FEATURE_RESUME_OWNER: u64 = 256;
/// Feature: time-ordered resume keys. A frontend that asks for it takes
/// resume keys as opaque 16-byte values, unique only whole: the daemon
/// may then name the frontend's new handles with time-ordered keys (UUID
/// v7, [`ResumeKey::new_time_ordered`]) when its store gains by them (the
/// LMDB store: docs/PERFORMANCE.md, round 17), and every key it mints in
/// one millisecond shares its high 64 bits. A frontend that does not ask
/// gets random (v4) keys, as every daemon minted before the bit existed.
/// rksmbd, smbshim and nfsshim ask for it.
pub const FEATURE_TIME_ORDERED_KEYS: u64 = 512;
/// Feature: the daemon fills a top-level `"kernel_handle"` member of a
/// record an open carries ([`OpenRequest::put`]) with the opened file's
/// kernel handle. A daemon without it stores the member as sent. nfsshim
/// asks for it (its exclusive-create verifier record) and, when it is not
/// granted, writes the handle in a second commit after the create, as
/// before the bit existed.
pub const FEATURE_OPEN_KERNEL_HANDLE: u64 = 1024;
/// Feature: the frontend reports the replays it answers
/// ([`Request::ReplaysAnswered`]). Its [`Request::LookupReply`]s are then
/// not counted as replays in [`Stats::replays_detected`]: nfsshim looks
/// records up for other reasons (its registry at every attach, a slot's
/// record to undo a request abandoned at its seqid) and answers a re-sent
/// request from its own slot cache without asking filterd. A frontend
/// without it has every lookup that finds a record counted, as before the
/// bit (smbshim looks up only for a re-sent request). nfsshim and rksmbd
/// ask for it ([`crate::client::ReplayCounter`]).
pub const FEATURE_REPLAY_REPORTS: u64 = 2048;
/// Feature: [`Request::Wrote`], the one-way form of
/// [`Request::BreakReadCaching`]. A frontend tells filterd of every write
/// (and size change it makes itself) without a round trip: the write's
/// reply does not wait for filterd, and a file nobody caches costs the
/// frontend one send. Without the bit the frontend calls
/// `BreakReadCaching` ([`crate::client::FilterClient::wrote`]).
pub const FEATURE_WRITE_NOTICES: u64 = 4096;
/// Feature: the daemon runs a learning `Handle` query
/// ([`Request::Handle`]'s `learning`) of a handle after the same
/// connection's `SetDeleteOnClose` of it that waits for lease breaks, so
/// the flag it shows is that change's outcome. A daemon without it answers
/// the query at once, the change perhaps still waiting:
/// [`crate::client::FilterClient::set_delete_on_close_learnt`] then takes a
/// flag not as asked for an unknown outcome, not a failure (review of
/// 1624469: read as failed, the frontend neither marked the open nor set
/// its flag back, and the late change deleted the file). A frontend's
/// hello always asks for it.
pub const FEATURE_ORDERED_DELETE_QUERY: u64 = 8192;
/// Feature: [`Request::Close`] and [`Request::Detach`] carry
/// `delete_on_close`, the flag the handle's client was last told, which
/// the daemon sets in the same step as the close or detach (after
/// withdrawing the connection's parked `SetDeleteOnClose` of the handle),
/// so the handle goes with the told flag. A frontend whose change of the
/// flag went unanswered (or is still in flight) needs no separate set-back
/// call, which rksmbd made on another connection's thread holding the
/// session's lock, and a release while the change is in flight goes with
/// the told flag too (review of 1624469). A daemon without it ignores the
/// field: [`crate::client::FilterClient::close_told`] then sets the flag
/// back by a `SetDeleteOnClose` first, as before the bit. A frontend's
/// hello always asks for it.
pub const FEATURE_CLOSE_DELETE_ON_CLOSE: u64 = 16384;
/// Feature: the `Files` and `Locks` listings page inside a file (review
/// rvcx). Granted, a page may end part-way through a file's holders or
/// locks: its reply names where ([`Reply::Files`]'s `next_holder`,
/// [`Reply::Locks`]'s `next_lock`), the next request passes that back
/// (`holders_after`, `locks_after`), and a file split across pages comes
/// in several [`FileView`]s of the same file id, one after another
/// ([`crate::client::FilterClient::files`] joins them). Not granted (an
/// older filterctl), a page holds whole files, as before, except a file
/// too large for a page on its own: it is cut to what fits, the rest of
/// its holders or locks left off (before, the reply could not be encoded
/// and the listing failed at that file). Control connections ask for it;
/// a frontend may.
pub const FEATURE_PAGED_WITHIN_FILE: u64 = 32768;
/// Feature: the daemon knows [`OpenRequest::wait_for_hints`] (review
/// rvspec n2/n7). A daemon without it refuses the compact open flag for
/// it as unknown (`BadFrame`), so [`crate::client::FilterClient`] always
/// asks for the bit and, when it is not granted, sends such an open
/// without the flag: a `no_wait` truncating open is then refused `Busy`
/// while the size-change hint waits, as before the bit.
pub const FEATURE_WAIT_FOR_HINTS: u64 = 65536;
/// Feature: the daemon checks [`ResumeRequest::matching`] before it
/// reattaches anything (re-review rr39e F4). rksmbd asks for it: a DH2C /
/// DHnC whose FileId, lease key or persistence does not match the open's
/// is refused with nothing written, counted or restarted — checked after
/// the resume, as without the bit, the detach that follows a mismatch
/// starts the handle's durable timeout afresh. Likewise a replayed
/// CREATE under another lease key ([`OpenRequest::replay_same_lease`]).
/// An older daemon ignores both fields, so [`crate::client::FilterClient`]
/// sends them only once granted.
pub const FEATURE_RESUME_MATCH: u64 = 131072;
/// Feature: fenced I/O (review rvnode 1). A frontend asks for it with
/// [`FEATURE_LOCK_HINTS`] to say that it checks every read and write with
/// [`Request::CheckIo`] when the hello grants it but not the hints
/// (`crate::attach` does: [`crate::attach::Attachment::decide_io`]). A
/// daemon whose store is shared between machines (etcd) grants it and
/// then withholds `FEATURE_LOCK_HINTS`: there, a daemon stopped past its
/// lease (SIGSTOP, a paused VM) keeps its sockets open while another
/// machine takes the table over, so a frontend that trusted the hints
/// would go on reading and writing files without locks through the
/// descriptors it holds — over data, and inside locks, that the new
/// owner acknowledged. Checked, each read and write waits for the
/// stopped daemon, which never answers it (it steps down when it runs
/// again: every step checks its lease first). A daemon on a one-machine
/// store (LMDB: a stopped daemon keeps its lock, nobody takes over)
/// does not grant it, and hints work as before. A frontend that asks for hints without this bit is given
/// them as before the bit, on any store (its I/O is then not fenced).
pub const FEATURE_FENCED_IO: u64 = 262144;
/// The daemon sends [`Event::SteppingDown`] before it exits because it
/// lost the ownership of its table (fenced, or its etcd lease ran out):
/// another daemon owns the state now, this one will not serve it again
/// until it wins it back. A frontend that asked for the bit lets go of its
/// clients then (rksmbd closes their connections, so they reconnect — to
/// the new owner's node where the address moved) instead of answering
/// them "not available" for as long as its daemon is gone. Without the
/// bit the daemon sends nothing (an older frontend would log the unknown
/// event as undecodable and carry on).
pub const FEATURE_STEP_DOWN: u64 = 524288;
/// Feature: a replayed open may be asked to resume only
/// ([`OpenRequest::resume_only`]): one whose create GUID names no handle is
/// refused `NoSuchHandle`, with nothing opened, created or truncated,
/// instead of run as a fresh open. rksmbd asks for it for a replayed
/// CREATE it let past its caps of opens because another of its
/// connections held the open (re-review rr46e F1): that connection's
/// CLOSE before filterd was asked had the replay run the CREATE anew, its
/// disposition and all, past the caps, and then refused. An older daemon
/// is not asked ([`crate::client::FilterClient`] leaves the flag out);
/// an open with it set has no compact form.
pub const FEATURE_RESUME_ONLY: u64 = 1_048_576;
/// The largest `count` one [`Request::ReplaysAnswered`] may carry; the
/// daemon refuses more (and 0), changing nothing. A frontend with more to
/// tell sends it in several notices ([`crate::client::ReplayCounter`]).
pub const MAX_REPLAYS_ANSWERED: u64 = 1 << 20;
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
        /// Which frontend process this is: drawn once per process (per
        /// [`crate::attach::Attachment`]) and said again at every
        /// reattach, never 0. filterd stamps every handle this connection
        /// attaches with it ([`crate::model::HandleRecord::attached_by`]),
        /// so that a reattach that names [`ResumeRequest::if_last_held`]
        /// finds whether another process of the same instance name (on
        /// another node, over the shared table) attached the handle since.
        /// Absent (an older frontend, a plain [`crate::client::FilterClient`]):
        /// filterd draws one for the connection. An older daemon ignores it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incarnation: Option<u64>,
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
        /// close. Only a persistent handle's close may carry records (a
        /// non-persistent handle is gone at once and could not be brought
        /// back if their commit failed), and never into the closed
        /// handle's own scope (it goes with the handle): either refuses
        /// the close with `BadFrame`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        put: Vec<RecordSpec>,
        /// (scope, op id) of records deleted in the same commit (nfsl/1:
        /// the open state).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        delete: Vec<(ReplayScope, u64)>,
        /// The delete on close the handle's client was last told, set in
        /// the same step as the close ([`FEATURE_CLOSE_DELETE_ON_CLOSE`]):
        /// the handle goes with it, whatever a change of the flag whose
        /// outcome the frontend does not know did. Absent: filterd's flag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delete_on_close: Option<bool>,
    },
    /// The handle's client lost its connection: a durable or persistent handle
    /// becomes disconnected (its timeout starts), another one is closed.
    /// Frontend only.
    Detach {
        /// The handle.
        key: ResumeKey,
        /// As [`Request::Close`]'s: the flag the handle keeps, stored
        /// with the detach (a persistent handle's durably).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delete_on_close: Option<bool>,
    },
    /// Daemon status.
    Status,
    /// Handles, a page at a time (by resume key): those after `after`.
    Handles {
        /// Resume key the previous page ended with (`next` of its reply).
        #[serde(default)]
        after: Option<ResumeKey>,
        /// The caller takes what is durable if commits stay pending
        /// (filterctl's listings only): past filterd's bound (1 s for the
        /// request — at once once commits have been pending with none
        /// resolving for that long) the page lists only what is durable,
        /// everything on a file a pending commit changes left out, and its
        /// reply carries `commit_wait` saying so. Unset (the default, and
        /// all an older peer sends) the page waits for every commit pending
        /// at the request and is complete: a frontend or tool that acts on
        /// the list (which handles are its own, which are gone) needs that.
        /// An older daemon ignores it and waits.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        durable_ok: bool,
    },
    /// One handle.
    Handle {
        /// The handle.
        key: ResumeKey,
        /// The query learns the outcome of this connection's
        /// `SetDeleteOnClose` of `key` that went unanswered
        /// (`FilterClient::set_delete_on_close_learnt`): it waits behind
        /// that change while it waits for lease breaks. Any other query is
        /// answered at once: a frontend shares one connection among all its
        /// clients, and rksmbd's lock and create checks that waited (review
        /// of 1624469) held a LOCK for the break timeout, or were refused
        /// when the parked requests reached their limit.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        learning: bool,
    },
    /// Open files and their holders, a page at a time (by file id, then
    /// a file's holders by resume key).
    Files {
        /// File id the previous page ended with (`next` of its reply).
        #[serde(default)]
        after: Option<FileId>,
        /// The previous page ended inside file `after`, after this holder
        /// (`next_holder` of its reply; [`FEATURE_PAGED_WITHIN_FILE`]):
        /// the page goes on with that file's later holders.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holders_after: Option<ResumeKey>,
        /// As in [`Request::Handles`].
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        durable_ok: bool,
    },
    /// Attached frontends.
    Frontends {
        /// The caller takes rows as durable at a recent moment if commits
        /// stay pending (filterctl's `frontends` only): past filterd's
        /// bound (1 s for the request) the reply lists the rows taken with
        /// `status`'s durable counts, and carries `commit_wait` saying how
        /// old they are. Unset (the default, and all an older peer sends)
        /// the request is refused (`Busy`, saying why) past the bound, as
        /// before, so that a caller that does not read `commit_wait` never
        /// gets older rows unmarked (re-review rr47a F2). An older daemon
        /// ignores it and refuses.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        durable_ok: bool,
    },
    /// Counters.
    Stats,
    /// Expire a disconnected handle now. Control only.
    Expire {
        /// The handle.
        key: ResumeKey,
    },
    /// Purge every handle without a connection now — disconnected or
    /// lost — each counted in [`Stats::purges`] and announced to its
    /// frontend as [`Event::Purged`]. Control only.
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
    /// One-way, never answered ([`FEATURE_RESYNCED`]): this frontend has
    /// applied the reattach that followed its hello — it resumed what it
    /// could and sent its clients the breaks of leases whose handles were
    /// lost. A restarted daemon's opens wait for it from every frontend
    /// seen before the restart. Frontend only.
    Resynced,
    /// One-way, never answered ([`FEATURE_REPLAY_REPORTS`]): this frontend
    /// answered `count` re-sent requests itself, from what it had
    /// recorded (nfsshim's slot cache), counted in
    /// [`Stats::replays_detected`]. Frontend only. Refused (answered with
    /// the error, nothing counted) from a connection not granted the bit.
    ReplaysAnswered {
        /// How many: 1 to [`MAX_REPLAYS_ANSWERED`], or refused.
        count: u64,
    },
    /// The holder of a lease acknowledges a break to `state` (at most what
    /// the break asked for). With no break in progress, the holder lowers
    /// its lease of its own accord (`state` at most what it holds; the
    /// lease must be held through this connection). Frontend only.
    ///
    /// A lease key names a lease of one client (MS-SMB2 3.3.1.4: a lease
    /// table per client GUID), and one connection may carry many clients:
    /// `client` names the holder (the `client` of its opens). Without it,
    /// the key must be held through this connection by one client only;
    /// held by several, the acknowledgement is refused `LeaseKeyInUse`
    /// rather than settle another client's lease.
    LeaseBreakAck {
        /// The lease key.
        lease_key: LeaseKey,
        /// The state kept.
        state: LeaseState,
        /// The client whose lease it is (absent from frontends older than
        /// the field: the key alone then names the lease).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<ClientId>,
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
    /// One-way, never answered ([`FEATURE_WRITE_NOTICES`]; an error is):
    /// [`Request::BreakReadCaching`] without the round trip. A frame sent
    /// before the write's reply, so filterd applies it before any later
    /// request of this connection. Frontend only; refused from a
    /// connection not granted the bit.
    Wrote {
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
    /// Rename a directory by path, refused `AccessDenied` while any handle
    /// (attached or disconnected, any frontend's) was opened by a path
    /// below it — as Windows refuses it while a file below is open
    /// (smbtorture smb2.rename.rename_dir_openfile), and so that no
    /// handle's stored path goes stale. The check and the `renameat2` are
    /// one step of the engine, so no open below can slip between them. A
    /// directory rename changes nothing stored: not bracketed, not
    /// recorded. `from` must name a directory (`NotAFile` otherwise) and,
    /// with `expect`, that very directory (`NotFound` otherwise: the
    /// frontend's open names it by a path gone stale); `replace` lets it
    /// replace an empty directory. Needs [`FEATURE_RENAME_DIRECTORY`].
    /// Frontend only.
    RenameDirectory {
        /// The directory.
        from: RelPath,
        /// Its new path.
        to: RelPath,
        /// Replace an existing (empty) directory at `to`.
        #[serde(default)]
        replace: bool,
        /// The directory `from` must name (the frontend's open of it).
        #[serde(default)]
        expect: Option<FileId>,
    },
    /// Byte-range locks, a page at a time (by file id, then a file's
    /// locks in its table's order: range, kind, holder).
    Locks {
        /// File id the previous page ended with.
        #[serde(default)]
        after: Option<FileId>,
        /// The previous page ended inside file `after`, after this lock
        /// (`next_lock` of its reply; [`FEATURE_PAGED_WITHIN_FILE`]): the
        /// page goes on with that file's later locks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        locks_after: Option<LockCursor>,
        /// As in [`Request::Handles`].
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        durable_ok: bool,
    },
}

impl Request {
    /// Every [`Request::name`], one per variant: filterd's failpoints
    /// `request.NAME` are these, and it refuses any other (a test checks
    /// that every variant's name is here).
    pub const NAMES: &'static [&'static str] = &[
        "open",
        "replay_open",
        "record_reply",
        "lookup_reply",
        "drop_scope",
        "list_records",
        "delete_record",
        "write_records",
        "lock",
        "check_io",
        "io_done",
        "resynced",
        "replays_answered",
        "locks",
        "lease_break_ack",
        "break_read_caching",
        "wrote",
        "rename",
        "remove",
        "rename_directory",
        "lock_hint_ack",
        "set_end_of_file",
        "set_delete_on_close",
        "resume",
        "close",
        "detach",
        "status",
        "handles",
        "handle",
        "files",
        "frontends",
        "stats",
        "expire",
        "purge_disconnected",
    ];

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
            Request::Resynced => "resynced",
            Request::ReplaysAnswered { .. } => "replays_answered",
            Request::Locks { .. } => "locks",
            Request::LeaseBreakAck { .. } => "lease_break_ack",
            Request::BreakReadCaching { .. } => "break_read_caching",
            Request::Wrote { .. } => "wrote",
            Request::Rename { .. } => "rename",
            Request::Remove { .. } => "remove",
            Request::RenameDirectory { .. } => "rename_directory",
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
            Request::Frontends { .. } => "frontends",
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
    /// must acknowledge a break first (the breaks are sent all the same),
    /// a rename, delete or restart gate holds the file, or — unless
    /// [`Self::wait_for_hints`] — a truncating persistent open must wait
    /// for the frontends to acknowledge its size-change hint: nfsl/1
    /// answers such opens NFS4ERR_DELAY.
    #[serde(default)]
    pub no_wait: bool,
    /// With [`Self::no_wait`]: a truncating persistent open waits for the
    /// frontends with handles of the file to acknowledge its size-change
    /// hint (bounded by the break timeout; no client's answer needed, the
    /// frontends' event threads send the acknowledgments) instead of being
    /// refused `Busy`. nfsshim sets it (review rvspec n2/n7: every
    /// truncating OPEN of a file with another handle was NFS4ERR_DELAY
    /// first). smbshim and rksmbd leave it unset: their opens are sent
    /// from the thread that reads the client's connection, which must not
    /// wait on other frontends (a stalled one would hold the client's
    /// lease-break acknowledgments unread behind the CREATE). Sent only
    /// to a daemon that granted [`FEATURE_WAIT_FOR_HINTS`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wait_for_hints: bool,
    /// A replay ([`Request::ReplayOpen`]) that finds the original open
    /// holding a lease under another key than [`Self::lease`]'s is refused
    /// `AccessDenied`, before anything is attached, written or counted
    /// (rksmbd's replayed CREATE under another lease key, MS-SMB2
    /// 3.3.5.9.10; re-review rr39e F4: refused after the replay had
    /// reattached the open, the detach that followed restarted its
    /// durable timeout). Without [`Self::lease`] nothing is checked; a
    /// fresh open ignores it. Sent only to a daemon that granted
    /// [`FEATURE_RESUME_MATCH`]; an open with it set has no compact form.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay_same_lease: bool,
    /// A replay ([`Request::ReplayOpen`]) that only resumes: one whose
    /// create GUID names no handle of the client's is refused
    /// `NoSuchHandle` before anything is opened, created or truncated
    /// (a removal of that handle still committing is what the refusal
    /// shows, as for a resume by create GUID), where a replay otherwise
    /// runs as a fresh open. One that names a handle is answered as any
    /// replay. A fresh open ([`Request::Open`]) ignores it. Sent only to a
    /// daemon that granted [`FEATURE_RESUME_ONLY`]; an open with it set
    /// has no compact form.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_only: bool,
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
    /// another open when leases are granted; honoured (access at most
    /// read, no overwrite), its descriptor is `O_PATH` and a lease it asks
    /// for is granted only where no break is needed (none beside another
    /// key's W). Stored with the handle (`HandleRecord::stat`): a resumed
    /// or recovered handle is a stat open still.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stat: bool,
    /// An open that asks for no data access nor delete (MS-FSA
    /// 2.1.5.1.2.1: SMB opens for extended attributes, the security
    /// descriptor's writing or the like). It takes no part in sharing —
    /// refused by no share mode, refusing no open — but unlike a `stat`
    /// open it breaks leases and counts as an open as a reader's would.
    /// Honoured like `stat` (access at most read, no overwrite), its
    /// descriptor is `O_PATH`. Stored with the handle
    /// (`HandleRecord::share_exempt`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub share_exempt: bool,
    /// Records written in the open's own commit, as by
    /// [`Request::WriteRecords`] (nfsl/1: the open state and the OPEN's slot
    /// reply), only if the open succeeds: the handle and the records are
    /// durable together or not at all. A record whose text is a JSON object
    /// with an `"opened"` member is completed by filterd: `"opened"` becomes
    /// this open's [`Opened`] (resume key, create action, size, lease
    /// granted), which only filterd knows before the commit; on a
    /// connection granted [`FEATURE_OPEN_KERNEL_HANDLE`], a top-level
    /// `"kernel_handle"` member of such a record becomes the opened file's
    /// kernel handle ([`crate::model::KernelHandle`]; stays `null` on a
    /// filesystem without handles, or for an open that is not durable or
    /// persistent), so the record tells that file from another given the
    /// same inode number later. A re-sent open
    /// that returns the original ([`Request::ReplayOpen`]) writes them again,
    /// completed with what it returns. Refused with a persistent open that
    /// truncates (it commits in two steps, see the intents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub put: Vec<RecordSpec>,
}

impl OpenRequest {
    /// An open with what every open names; the optional parts (create
    /// GUID, owner, lease, share group, stat, records) are left out. Set
    /// them with struct update syntax:
    /// `OpenRequest { create_guid: Some(g), ..OpenRequest::new(..) }`.
    pub fn new(
        client: ClientId,
        path: RelPath,
        access: Access,
        share: ShareAccess,
        disposition: Disposition,
        durability: Durability,
    ) -> Self {
        OpenRequest {
            client,
            path,
            access,
            share,
            disposition,
            durability,
            create_guid: None,
            owner: None,
            lease: None,
            no_wait: false,
            wait_for_hints: false,
            replay_same_lease: false,
            resume_only: false,
            share_group: None,
            share_exempt: false,
            stat: false,
            put: Vec::new(),
        }
    }
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
    /// Must also be the handle's protocol-level owner (the open's
    /// `owner`), else `AccessDenied` and nothing changes: rksmbd's leased
    /// opens belong to a client GUID, which goes in clear, and MS-SMB2
    /// 3.3.5.9.12 refuses a reconnect by another user. Needs
    /// [`FEATURE_RESUME_OWNER`] (an older daemon ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// What the handle must also match, else `NoSuchHandle` and nothing
    /// changes (nothing attached, written or counted; its expiry stays
    /// where it was). Needs [`FEATURE_RESUME_MATCH`] (an older daemon
    /// ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matching: Option<ResumeMatch>,
    /// A frontend's automatic reattach of a handle it held (after its
    /// filterd connection came back): refused `NoSuchHandle` — lost, and
    /// nothing changes — when another frontend process attached the
    /// handle since (its [`crate::model::HandleRecord::attached_by`] is
    /// neither this connection's `incarnation` nor 0, unknown). An older
    /// daemon ignores it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub if_last_held: bool,
}

/// What a resumed handle must match ([`ResumeRequest::matching`]):
/// rksmbd's DH2C / DHnC (MS-SMB2 3.3.5.9.12, 3.3.5.9.7) names the open's
/// FileId, its lease key and whether it is persistent, and a reconnect
/// that gets any of them wrong must leave the disconnected open as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeMatch {
    /// The handle's resume key's short id ([`ResumeKey::short_id`]) must
    /// be this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_id: Option<u64>,
    /// A persistent handle is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refuse_persistent: bool,
    /// A handle holding a lease must hold it under this key (none: a
    /// handle holding a lease is refused). A handle without a lease, or
    /// holding an oplock ([`crate::lease::is_oplock_key`]: any reconnect
    /// of the open takes it), passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_key: Option<LeaseKey>,
    /// The name the reconnect gives, which a handle holding a lease (not
    /// an oplock, as for `lease_key`) must have been opened under, else
    /// [`ErrorCode::NameMismatch`] and nothing changes (rksmbd: a DH2C of
    /// a leased open under another name is STATUS_INVALID_PARAMETER,
    /// re-review rr40b F1). Compared exactly with the handle's path
    /// ([`HandleRecord::path`](crate::model::HandleRecord)), so the
    /// frontend sends it in the form filterd stores. None: not checked
    /// (an older frontend's match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<ResumeName>,
}

/// The name a reconnect gives ([`ResumeMatch::name`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeName {
    /// A path, in the form the handle's record holds it.
    Path(RelPath),
    /// A name that is no path (empty, or one the frontend cannot parse,
    /// such as rksmbd's `a/b` or `a:b`): no leased handle matches it.
    NoPath,
}

impl ResumeMatch {
    /// Whether a handle with `key`, `durability` and lease key `lease`
    /// matches.
    pub fn matches(&self, key: ResumeKey, durability: Durability, lease: Option<LeaseKey>) -> bool {
        let id_ok = self.short_id.is_none_or(|id| id == key.short_id());
        let persistence_ok = !(self.refuse_persistent && durability.is_persistent());
        let lease_ok = match lease {
            None => true,
            Some(l) if crate::lease::is_oplock_key(&l) => true,
            Some(l) => self.lease_key == Some(l),
        };
        id_ok && persistence_ok && lease_ok
    }

    /// Whether a handle opened as `path` with lease key `lease` matches
    /// [`ResumeMatch::name`]: always, without a name to check or without a
    /// lease (an oplock is none here).
    pub fn names(&self, path: &RelPath, lease: Option<LeaseKey>) -> bool {
        match (&self.name, lease) {
            (None, _) | (_, None) => true,
            (Some(_), Some(l)) if crate::lease::is_oplock_key(&l) => true,
            (Some(ResumeName::Path(p)), Some(_)) => p == path,
            (Some(ResumeName::NoPath), Some(_)) => false,
        }
    }
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
    /// A disconnected persistent open holds the file (until it is resumed
    /// or expires), or the daemon is recovering: retry later. Without
    /// [`FEATURE_RETRY_CODE`] also what [`ErrorCode::Retry`] is answered as.
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
    /// Nothing was done and a retry may well succeed at once: the file or
    /// its name changed under the request (a local process created,
    /// removed or replaced it between the steps of the open), or the
    /// original of a replayed open is still in progress. Sent only on a
    /// connection granted [`FEATURE_RETRY_CODE`]; `FileNotAvailable`
    /// on any other ([`ErrorCode::granted`]).
    Retry,
    /// A resume's handle was opened under another name than its
    /// [`ResumeMatch::name`] (nothing changed). Sent only on a connection
    /// granted [`FEATURE_RESUME_MATCH`]; `NoSuchHandle` on any other
    /// ([`ErrorCode::granted`]), though only such a connection sends the
    /// name.
    NameMismatch,
    /// A fault in the daemon; the message says which.
    Internal,
}

impl ErrorCode {
    /// The code a connection granted `features` is sent for this one: a
    /// code newer than the connection's features is sent as the older
    /// code that meant it before.
    pub fn granted(self, features: u64) -> ErrorCode {
        match self {
            ErrorCode::Retry if features & FEATURE_RETRY_CODE == 0 => ErrorCode::FileNotAvailable,
            ErrorCode::NameMismatch if features & FEATURE_RESUME_MATCH == 0 => {
                ErrorCode::NoSuchHandle
            }
            code => code,
        }
    }
}

impl ServerFrame {
    /// This frame as a connection granted `features` is sent it (see
    /// [`ErrorCode::granted`]); `None` when it is sent as it is.
    pub fn granted(&self, features: u64) -> Option<ServerFrame> {
        match self {
            ServerFrame::Reply { id, result: Err(e) } if e.code.granted(features) != e.code => {
                Some(ServerFrame::Reply {
                    id: *id,
                    result: Err(WireError {
                        code: e.code.granted(features),
                        message: e.message.clone(),
                        conflict: e.conflict.clone(),
                    }),
                })
            }
            _ => None,
        }
    }
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

/// The longest an [`Opened`] is as JSON text (about 330 bytes at most;
/// filterd's tests check the bound). A record an open carries with an
/// `"opened"` member for filterd to fill ([`OpenRequest::put`]) is refused
/// unless it stays within [`crate::model::MAX_REPLY_BYTES`] filled with one
/// this long.
pub const MAX_OPENED_JSON_BYTES: usize = 512;

/// The longest a [`crate::model::KernelHandle`] is as JSON text (about 300
/// bytes for the kernel's largest, 128-byte, handle; filterd's tests check
/// the bound). A record an open carries with a top-level
/// `"kernel_handle": null` member besides `"opened"` is refused unless it
/// stays within [`crate::model::MAX_REPLY_BYTES`] filled with both.
pub const MAX_KERNEL_HANDLE_JSON_BYTES: usize = 320;

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
        /// Set when the page did not wait for the commits pending at the
        /// request (the request's `durable_ok`, and none resolved within
        /// filterd's bound): it lists only what is durable, leaving out
        /// every file a pending commit changes with all its handles. Never
        /// set for a request without `durable_ok`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit_wait: Option<CommitWait>,
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
        /// The page ended inside file `next`, after this holder: pass it
        /// as `holders_after` with `after` = `next`
        /// ([`FEATURE_PAGED_WITHIN_FILE`]; never set without it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_holder: Option<ResumeKey>,
        /// As in `Handles`: set when the page lists only what is durable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit_wait: Option<CommitWait>,
    },
    /// Frontends.
    Frontends {
        /// The frontends: as many as fit about [`PAGE_BYTES`], in
        /// (protocol, instance) order.
        frontends: Vec<FrontendView>,
        /// How many more rows there were, left off to keep the reply
        /// within a frame. 0 from an older daemon, which sent them all.
        #[serde(default)]
        more: u64,
        /// Set when the rows are not of now: commits were pending past the
        /// bound, and these are the rows taken with `status`'s durable
        /// counts, `counts_age_ms` old (filterctl's `frontends`; absent:
        /// of now, every pending commit waited for — and from a daemon
        /// older than this, which refused it `Busy` instead).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit_wait: Option<CommitWait>,
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
        /// The page ended inside file `next`, after this lock: pass it as
        /// `locks_after` with `after` = `next`
        /// ([`FEATURE_PAGED_WITHIN_FILE`]; never set without it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_lock: Option<LockCursor>,
        /// As in `Handles`: set when the page lists only what is durable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit_wait: Option<CommitWait>,
    },
    /// How many handles a purge removed.
    Purged {
        /// Handles purged: disconnected and lost.
        count: u64,
        /// Of them, lost ones; `None` from a daemon before this field,
        /// which did not tell them apart (not "none lost": a new
        /// `filterctl` printed "0 lost" for an older daemon's purge).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lost: Option<u64>,
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
    /// proceed, or a handle without a connection was purged by the
    /// operator.
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
        /// The file the lease is held on. A lease key names a lease of one
        /// client, and one connection may carry several clients' leases
        /// under one key, each on its own file: the file tells them apart
        /// (absent from daemons older than the field).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<FileId>,
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
    /// The daemon lost the ownership of its table and exits now
    /// ([`FEATURE_STEP_DOWN`]): the connection ends right after it.
    SteppingDown,
}

/// A handle as filterctl shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleView {
    /// The stored record.
    #[serde(flatten)]
    pub record: HandleRecord,
    /// Whether the daemon holds an open descriptor for it.
    pub fd_open: bool,
    /// The break of its lease in progress, if one is: who stalls an open,
    /// and for how long yet. Not stored (a restart ends every break).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaking: Option<BreakView>,
}

/// A lease break in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakView {
    /// What the holder was asked to keep.
    pub to: LeaseState,
    /// Milliseconds until the break times out and the lease is taken down
    /// to `to` without the holder's acknowledgement. The time runs from
    /// when filterd decided the break; the event itself may still wait for
    /// the commit of the state it shows, or for the reply of the open that
    /// granted the lease, before it reaches the holder.
    pub ms_left: u64,
    /// Whether an open waits for it.
    pub waiters: bool,
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

/// Where a `Locks` page ended inside a file: its last lock, by what
/// orders a file's locks (range, kind, holder), so the next page starts
/// at the first lock after it — the same place whatever locks were taken
/// or released between the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockCursor {
    /// The lock's range.
    pub range: LockRange,
    /// Shared or exclusive.
    pub kind: LockKind,
    /// The holding handle.
    pub key: ResumeKey,
    /// How many locks equal to it (a handle's stacked shared locks of
    /// one range) come before it in the file's table: the next page
    /// starts past them too.
    #[serde(default)]
    pub nth: u32,
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
    /// Handles it holds through its attachment.
    pub handles: u64,
    /// Whether it is attached now. An instance the stored handle table
    /// names (a persistent handle) but that is not attached (its frontend died, or has not come back since
    /// a restart) is listed too, `false`, with `pid`, `uid` and
    /// `attached_ms` 0 and `handles` 0, so the live listing has the rows
    /// the offline one has. An older daemon lists attached ones only:
    /// absent reads as `true`.
    #[serde(default = "yes")]
    pub attached: bool,
    /// The handles the stored handle table holds for this instance — its
    /// persistent ones, attached or not; durable and non-durable handles
    /// are not stored — what offline `frontends` counts from the store.
    /// `None`: an older daemon, which did not say.
    #[serde(default)]
    pub stored_handles: Option<u64>,
}

/// `true`: the serde default of [`FrontendView::attached`].
fn yes() -> bool {
    true
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
    /// The state store: `lmdb`, or an etcd table's canonical URL
    /// (`etcd://HOST:PORT,…/PREFIX`, as `EtcdUrl` prints it: the URL as
    /// given, endpoints in their order, the trailing `/` dropped), so that
    /// filterctl's offline view names the same store alike. Empty from a
    /// daemon older than the field; a daemon older than `store_detail`
    /// sent its description here.
    #[serde(default)]
    pub store: String,
    /// The store described for a person: for etcd the URL with this
    /// daemon's owner name, fencing revision, lease and margin. Empty from
    /// an older daemon (whose `store` said this).
    #[serde(default)]
    pub store_detail: String,
    /// Schema version of the store.
    pub schema_version: u32,
    /// The stored records filterd's last recovery (its start, or its
    /// takeover of an etcd table) could not read and skipped (left in the
    /// store for inspection: a corrupt or unknown-version handle, intent
    /// or replay record), named as [`CorruptRecords::note`] names them:
    /// the first [`CORRUPT_NAMES_KEPT`]. As of that recovery: filterd
    /// does not count again, so a record it has deleted since (a dropped
    /// or trimmed replay scope, a closed handle's scope) or that was
    /// deleted by hand stays named until the next restart; offline
    /// `filterctl status` counts what the store holds now. `None`: an
    /// older daemon, which did not say — unknown, not none.
    #[serde(default)]
    pub corrupt_records: Option<Vec<String>>,
    /// How many there were in all (`corrupt_records` keeps the first
    /// [`CORRUPT_NAMES_KEPT`]). `None` from an older daemon.
    #[serde(default)]
    pub corrupt_records_total: Option<u64>,
    /// Set only when this reply did not wait for the commits pending at
    /// the request: none resolved within filterd's bound (1 s; a stalled or
    /// slow store, review rvslowetcd finding 3). The handle and frontend
    /// counts are then durable ones, not the newest: of the last moment
    /// nothing was pending, or taken at a moment whose commits have all
    /// resolved since. `None` (absent from the JSON) in the
    /// usual reply, which waits for what it shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_wait: Option<CommitWait>,
    /// With the table in etcd: how long this daemon's fencing lease is
    /// proven to stand from now (ms; 0 once lost), as the keepalive last
    /// proved it — read from what it keeps, never asked of etcd. The
    /// daemon steps down a margin (`store_detail`) before it runs out.
    /// `None` (absent from the JSON) for LMDB and from an older daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_left_ms: Option<u64>,
}

/// What a `status` or a listing (`Handles`, `Files`, `Locks`) answered
/// without waiting for its commits says about them
/// ([`StatusInfo::commit_wait`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitWait {
    /// How long the status or listing page waited before it answered (ms).
    pub waited_ms: u64,
    /// How long commits have been pending without a break (ms): about
    /// the age of the oldest commit not yet resolved.
    pub pending_for_ms: u64,
    /// Replies (and events) parked now behind pending commits.
    pub replies_awaiting_commit: u64,
    /// How old the counts shown are (ms since nothing was last pending);
    /// `None`: something has been pending since filterd started, and the
    /// counts are 0 (unknown). A listing: 0 — its rows are durable as of
    /// the answer.
    #[serde(default)]
    pub counts_age_ms: Option<u64>,
    /// A listing only: the handles it left out — those whose state
    /// (record, presence, locks) a pending commit changes, so their
    /// durable state is not known apart from it. `None` in a status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handles_left_out: Option<u64>,
    /// A listing only: the files a pending commit changes, left out with
    /// their handles and locks. `None` in a status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_left_out: Option<u64>,
}

/// How many unreadable stored records filterd names in
/// [`StatusInfo::corrupt_records`]: enough to find them, bounded so that
/// a store of a million bad records does not make a status reply of
/// megabytes.
pub const CORRUPT_NAMES_KEPT: usize = 100;

/// The stored records that could not be read, as filterd's recovery and
/// filterctl's offline view both name and count them: `status` reports
/// them alike on either side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorruptRecords {
    /// The first [`CORRUPT_NAMES_KEPT`] names.
    pub names: Vec<String>,
    /// All of them.
    pub total: u64,
}

/// Longest name [`CorruptRecords`] keeps, in bytes (then `…`): a
/// record's error can quote much of the record, and
/// [`CORRUPT_NAMES_KEPT`] long ones would push a `Status` reply past
/// [`MAX_FRAME`] — which rksmbd asks for at startup.
pub const CORRUPT_NAME_BYTES: usize = 200;

impl CorruptRecords {
    /// Counts one unreadable record, and keeps its name (cut to
    /// [`CORRUPT_NAME_BYTES`]) while there is room.
    pub fn note(&mut self, name: String) {
        self.total += 1;
        if self.names.len() < CORRUPT_NAMES_KEPT {
            self.names.push(clipped(name, CORRUPT_NAME_BYTES));
        }
    }

    /// Notes a replay-table record that does not decode (`error`), or
    /// whose key does not parse (`error` `None`), by its scope and op id
    /// (its key in hex when the key does not parse): the store's error
    /// names no key for this table. An empty key is one the store could
    /// not take apart at all: its `error` names the stored key.
    pub fn note_replay(&mut self, key: &[u8], error: Option<&dyn std::fmt::Display>) {
        let name = match (crate::store::parse_replay_key(key), error) {
            (Some((scope, op)), Some(e)) => {
                format!("{e} (replay record {op} of {})", scope_name(&scope))
            }
            // A key the store could not even take apart: its error
            // names it.
            (None, Some(e)) if key.is_empty() => e.to_string(),
            (None, _) => format!(
                "replay key {} does not parse",
                key.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            (Some(_), None) => return,
        };
        self.note(name);
    }
}

/// `text` cut to at most `max` bytes at a character boundary, `…` added
/// when cut: a text for people that must stay bounded (a reply, a
/// record).
pub fn clipped(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// A replay scope as [`CorruptRecords::note_replay`] names it: a session
/// scope by its name, a handle's by its resume key.
fn scope_name(scope: &ReplayScope) -> String {
    match scope {
        ReplayScope::Session(n) => n.as_str().to_owned(),
        ReplayScope::Handle(k) => format!("handle {k}"),
    }
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
    /// Disconnected durable handles purged by a conflicting open, and
    /// handles purged by the operator ([`Request::PurgeDisconnected`]).
    pub purges: u64,
    /// Replayed requests recognised. By filterd: an open replayed by its
    /// create GUID, a durable handle's LOCK replayed by its lock
    /// sequence, and a [`Request::LookupReply`] that finds a record from
    /// a frontend not granted [`FEATURE_REPLAY_REPORTS`] (smbshim). Told
    /// by frontends granted it ([`Request::ReplaysAnswered`], about
    /// 100 ms late, or later while the daemon does not read; lost if the
    /// frontend, or the daemon before reading it, stops): nfsshim's re-sends answered from its slot cache and
    /// exclusive creates re-sent as new requests (its verifier record);
    /// rksmbd's LOCKs replayed by a lock sequence it keeps itself (an
    /// open that is not durable) and replays of a LOCK still waiting.
    /// Not counted: rksmbd's replayed CREATE answered on its own
    /// connection from the open it has (docs/ARCHITECTURE.md). A replay
    /// whose reply fails with its commit is not counted.
    pub replays_detected: u64,
    /// Lease breaks sent: break events handed to a holder's connection
    /// (each step of a break chain counts), counted when the event is
    /// made — one that waits for a commit (a persistent holder's epoch
    /// bump) is taken back if that commit fails (it is sent, and counted,
    /// anew), and stays counted if the holder's connection goes before it
    /// is delivered, and a break in progress sent again to an SMB 2/3
    /// holder that resumes its lease mid-break counts once more. Not
    /// counted: breaks of disconnected holders (nothing is sent: their
    /// lease is lowered, or an SMB 2/3 holder's break waits for it to
    /// resume) and the notice of a lowering after a break timed out.
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
    /// Of `local_opens_allowed`, those the fanotify reader allowed itself
    /// (a file the engine published as plain: no share mode, purge,
    /// lease or pending create in the way).
    #[serde(default)]
    pub local_opens_allowed_by_reader: u64,
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
    /// Local opens whose verdict deadline passed while they waited in
    /// filterd (for a commit, the restart gate): refused (by the reader's
    /// watchdog, or at once when the engine found it late), and dropped
    /// by the engine without acting for them — no purge, no lease break.
    #[serde(default)]
    pub local_opens_past_deadline: u64,
    /// Local opens the engine acted for (it broke a lease or purged for
    /// them, and held their event) whose verdict deadline passed before
    /// it would have waited for them again (a further step of a break
    /// chain, a break sent again after a failed commit, a commit to
    /// wait for): refused by the engine itself, not by the watchdog, so
    /// not in `local_opens_watchdog`.
    #[serde(default)]
    pub local_opens_refused_after_acting: u64,
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
    /// Protocol opens (and resumes taking a descriptor) refused because
    /// their peer user's handles held its share (three quarters) of the
    /// descriptors filterd leaves to handles; root's and filterd's own
    /// user's never are.
    #[serde(default)]
    pub opens_refused_share: u64,
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
    /// Opens a restarted daemon held until the frontends seen before the
    /// restart had resynced ([`Request::Resynced`]) or were given up.
    #[serde(default)]
    pub opens_waited_for_frontends: u64,
    /// Local opens (fanotify) a restarted daemon held at the same gate
    /// as [`Stats::opens_waited_for_frontends`]: any existing file's,
    /// since which files had forgotten leases is not known.
    #[serde(default)]
    pub local_opens_waited_for_frontends: u64,
    /// Requests waiting now (a gauge, not a counter) for lease-break
    /// acknowledgements or a commit: what `--max-pending-breaks` caps.
    #[serde(default)]
    pub requests_waiting: u64,
    /// Replies waiting now (a gauge) for the commit that makes what they
    /// answer durable: the requests a pending (or stalled) group commit
    /// holds. What `stats` counts leaves them out until it is durable.
    #[serde(default)]
    pub replies_awaiting_commit: u64,
    /// Replies carrying a descriptor queued now (a gauge) for peers that
    /// have not read what went before: what the outbox's budget of such
    /// replies counts (an eighth of filterd's descriptor limit, at least
    /// 4096 but at most a quarter of the limit, shared by peer user past
    /// it).
    #[serde(default)]
    pub replies_queued_unread: u64,
    /// Commits that failed and were rolled back (with every request that
    /// built on them): counted once the rollback is done, so a request
    /// sent after this counter moved sees the rolled-back state.
    #[serde(default)]
    pub commits_failed: u64,
}

/// How a connection's frames after the hello are encoded: JSON unless
/// both sides agreed on [`FEATURE_BINARY_FRAMES`] in the hello (which is
/// always JSON). The daemon reads either on any connection (a frame's
/// first byte tells them apart: a JSON frame is an object, `{`, a binary
/// one a MessagePack array, `0x90`–`0x9f`); it writes the agreed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// One UTF-8 JSON document per frame.
    #[default]
    Json,
    /// Binary frames, version 1: see [`FEATURE_BINARY_FRAMES`].
    Binary,
    /// Binary frames, with the hot frames compact: see
    /// [`FEATURE_COMPACT_FRAMES`].
    Compact,
    /// As [`Encoding::Compact`], and the hot frames that carry records
    /// compact too: see [`FEATURE_COMPACT_RECORDS`].
    CompactRecords,
}

impl Encoding {
    /// The encoding that granted feature bits `features` select.
    pub fn from_features(features: u64) -> Self {
        let compact = FEATURE_BINARY_FRAMES | FEATURE_COMPACT_FRAMES;
        if features & (compact | FEATURE_COMPACT_RECORDS) == compact | FEATURE_COMPACT_RECORDS {
            Encoding::CompactRecords
        } else if features & compact == compact {
            Encoding::Compact
        } else if features & FEATURE_BINARY_FRAMES != 0 {
            Encoding::Binary
        } else {
            Encoding::Json
        }
    }
}

/// Whether `bytes` is a binary frame (a MessagePack array) rather than
/// JSON (which starts with `{` or whitespace).
fn is_binary(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(0x90..=0x9f | 0xdc | 0xdd))
}

/// The tags of [`ServerFrame`]'s variants in a binary frame.
const BIN_HELLO: u8 = 0;
const BIN_REPLY: u8 = 1;
const BIN_EVENT: u8 = 2;

fn bin_encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, WireError> {
    // Room for the hot frames from the start (an open+close pair's four
    // are 349 bytes together): `to_vec_named` grows an empty `Vec` by
    // doubling, four or five reallocations and copies per frame (issue
    // 16: 1.18 → 0.42 µs of CPU for a pair's four encodes). A larger
    // frame still grows.
    let mut out = Vec::with_capacity(BIN_ENCODE_START);
    rmp_serde::encode::write_named(&mut out, value)
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("encode: {e}")))?;
    Ok(out)
}

/// The capacity a binary frame's buffer starts with.
const BIN_ENCODE_START: usize = 256;

/// Refuses a frame larger than [`MAX_FRAME`].
fn checked_size(bytes: Vec<u8>) -> Result<Vec<u8>, WireError> {
    if bytes.len() > MAX_FRAME {
        return Err(WireError::new(
            ErrorCode::BadFrame,
            format!("frame of {} bytes exceeds {MAX_FRAME}", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// Encodes a request frame in `encoding`, refusing one larger than
/// [`MAX_FRAME`].
pub fn encode_request(encoding: Encoding, frame: &RequestFrame) -> Result<Vec<u8>, WireError> {
    match encoding {
        Encoding::Json => encode(frame),
        Encoding::Binary => checked_size(bin_encode(&(frame.id, &frame.req))?),
        Encoding::Compact | Encoding::CompactRecords => {
            match compact::encode_request(frame, encoding == Encoding::CompactRecords) {
                Some(bytes) => checked_size(bytes),
                None => encode_request(Encoding::Binary, frame),
            }
        }
    }
}

/// Encodes a frame from the daemon in `encoding`, refusing one larger
/// than [`MAX_FRAME`].
pub fn encode_server(encoding: Encoding, frame: &ServerFrame) -> Result<Vec<u8>, WireError> {
    match encoding {
        Encoding::Json => encode(frame),
        Encoding::Binary => checked_size(match frame {
            ServerFrame::Hello(h) => bin_encode(&(BIN_HELLO, h))?,
            ServerFrame::Reply { id, result } => bin_encode(&(BIN_REPLY, id, result))?,
            ServerFrame::Event(ev) => bin_encode(&(BIN_EVENT, ev))?,
        }),
        Encoding::Compact | Encoding::CompactRecords => match compact::encode_server(frame) {
            Some(bytes) => checked_size(bytes),
            None => encode_server(Encoding::Binary, frame),
        },
    }
}

/// Decodes one binary value that must fill `bytes` exactly.
fn bin_decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // Deep nesting is refused long before it could exhaust the stack.
    de.set_max_depth(64);
    let value = T::deserialize(&mut de).map_err(|e| e.to_string())?;
    let used = bin_len(bytes).ok_or("truncated")?;
    if used != bytes.len() {
        return Err(format!("{} bytes after the frame", bytes.len() - used));
    }
    Ok(value)
}

/// The length of the first MessagePack value in `bytes`, if it is whole.
fn bin_len(bytes: &[u8]) -> Option<usize> {
    let mut rest = bytes;
    skip_value(&mut rest, 0)?;
    Some(bytes.len() - rest.len())
}

/// Skips one MessagePack value at the start of `rest` (at most 64 deep).
fn skip_value(rest: &mut &[u8], depth: u32) -> Option<()> {
    use rmp::Marker;
    if depth > 64 {
        return None;
    }
    let marker = rmp::decode::read_marker(rest).ok()?;
    let fixed = |rest: &mut &[u8], n: usize| -> Option<()> {
        *rest = rest.get(n..)?;
        Some(())
    };
    let len = |rest: &mut &[u8], n: usize| -> Option<usize> {
        let b = rest.get(..n)?;
        let v = b.iter().fold(0usize, |a, x| (a << 8) | usize::from(*x));
        *rest = rest.get(n..)?;
        Some(v)
    };
    let items = |rest: &mut &[u8], n: usize| -> Option<()> {
        for _ in 0..n {
            skip_value(rest, depth + 1)?;
        }
        Some(())
    };
    match marker {
        Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
            Some(())
        }
        Marker::U8 | Marker::I8 => fixed(rest, 1),
        Marker::U16 | Marker::I16 => fixed(rest, 2),
        Marker::U32 | Marker::I32 | Marker::F32 => fixed(rest, 4),
        Marker::U64 | Marker::I64 | Marker::F64 => fixed(rest, 8),
        Marker::FixStr(n) => fixed(rest, usize::from(n)),
        Marker::Str8 | Marker::Bin8 => {
            let n = len(rest, 1)?;
            fixed(rest, n)
        }
        Marker::Str16 | Marker::Bin16 => {
            let n = len(rest, 2)?;
            fixed(rest, n)
        }
        Marker::Str32 | Marker::Bin32 => {
            let n = len(rest, 4)?;
            fixed(rest, n)
        }
        Marker::FixArray(n) => items(rest, usize::from(n)),
        Marker::Array16 => {
            let n = len(rest, 2)?;
            items(rest, n)
        }
        Marker::Array32 => {
            let n = len(rest, 4)?;
            items(rest, n)
        }
        Marker::FixMap(n) => items(rest, 2 * usize::from(n)),
        Marker::Map16 => {
            let n = len(rest, 2)?;
            items(rest, 2 * n)
        }
        Marker::Map32 => {
            let n = len(rest, 4)?;
            items(rest, n.checked_mul(2)?)
        }
        Marker::FixExt1 => fixed(rest, 2),
        Marker::FixExt2 => fixed(rest, 3),
        Marker::FixExt4 => fixed(rest, 5),
        Marker::FixExt8 => fixed(rest, 9),
        Marker::FixExt16 => fixed(rest, 17),
        Marker::Ext8 => {
            let n = len(rest, 1)?;
            fixed(rest, n + 1)
        }
        Marker::Ext16 => {
            let n = len(rest, 2)?;
            fixed(rest, n + 1)
        }
        Marker::Ext32 => {
            let n = len(rest, 4)?;
            fixed(rest, n.checked_add(1)?)
        }
        Marker::Reserved => None,
    }
}

// The fast paths of the binary decoders (issue 16). serde's derive reads
// an internally tagged enum (`Request` by `op`, `Reply` by `kind`) by
// buffering the whole map into its generic content tree to find the tag,
// then deserializing the variant from that copy: the largest part of
// decoding a request in filterd's profile. For the frames of the hot path
// — an open, a replay open and a close; an `Opened` or `Done` reply — the
// decoders below read the tag straight from the bytes and deserialize the
// variant's body from the same bytes (the body's type ignores the tag key,
// as it ignores any unknown key). They take only frames whose tag is the
// map's first key and appears once, with string keys and nothing after
// the frame (what our encoder writes); anything else, and any frame their
// body does not decode, goes through the general decoder, which accepts
// and refuses exactly what it did before. `proto::binary_tests` checks
// both give the same value for every frame they take.

/// A MessagePack map at the start of `map` whose first key is `tag`, a
/// string key appearing once, with string keys only: the tag's value, the
/// map's entry count and its length in bytes.
fn tagged_map<'a>(map: &'a [u8], tag: &str) -> Option<(&'a str, u32, usize)> {
    let mut rest = map;
    let n = rmp::decode::read_map_len(&mut rest).ok()?;
    let (first, tail) = rmp::decode::read_str_from_slice(rest).ok()?;
    if first != tag {
        return None;
    }
    let (value, tail) = rmp::decode::read_str_from_slice(tail).ok()?;
    rest = tail;
    for _ in 1..n {
        let (key, tail) = rmp::decode::read_str_from_slice(rest).ok()?;
        if key == tag {
            return None;
        }
        rest = tail;
        skip_value(&mut rest, 1)?;
    }
    Some((value, n, map.len() - rest.len()))
}

/// Deserializes a variant's body from the map that also holds its tag.
fn bin_body<'a, T: Deserialize<'a>>(map: &'a [u8]) -> Option<T> {
    let mut de = rmp_serde::Deserializer::from_read_ref(map);
    de.set_max_depth(64);
    T::deserialize(&mut de).ok()
}

/// [`Request::Close`]'s fields, for the fast path (built into the variant
/// with every field named, so a field added to it fails to compile here
/// until it is added to this mirror too).
#[derive(Deserialize)]
struct CloseBody {
    key: ResumeKey,
    #[serde(default)]
    put: Vec<RecordSpec>,
    #[serde(default)]
    delete: Vec<(ReplayScope, u64)>,
    #[serde(default)]
    delete_on_close: Option<bool>,
}

/// A binary `[id, request]` frame of an open, replay open or close
/// decoded without serde's content buffering, or None: see above.
fn fast_bin_request(bytes: &[u8]) -> Option<(u64, Request)> {
    let mut rest = bytes;
    if rmp::decode::read_array_len(&mut rest).ok()? != 2 {
        return None;
    }
    let id = rmp::decode::read_int::<u64, _>(&mut rest).ok()?;
    let (op, _, len) = tagged_map(rest, "op")?;
    if len != rest.len() {
        return None;
    }
    let req = match op {
        "open" => Request::Open(bin_body(rest)?),
        "replay_open" => Request::ReplayOpen(bin_body(rest)?),
        "close" => {
            let b: CloseBody = bin_body(rest)?;
            Request::Close {
                key: b.key,
                put: b.put,
                delete: b.delete,
                delete_on_close: b.delete_on_close,
            }
        }
        _ => return None,
    };
    Some((id, req))
}

/// A binary reply frame `[1, id, {"Ok": reply}]` whose reply is `Opened`
/// or `Done`, decoded without serde's content buffering, or None.
fn fast_bin_reply(bytes: &[u8]) -> Option<ServerFrame> {
    let mut rest = bytes;
    if rmp::decode::read_array_len(&mut rest).ok()? != 3
        || rmp::decode::read_int::<u8, _>(&mut rest).ok()? != BIN_REPLY
    {
        return None;
    }
    let id = if rest.first() == Some(&0xc0) {
        rest = rest.get(1..)?;
        None
    } else {
        Some(rmp::decode::read_int::<u64, _>(&mut rest).ok()?)
    };
    if rmp::decode::read_map_len(&mut rest).ok()? != 1 {
        return None;
    }
    let (ok, tail) = rmp::decode::read_str_from_slice(rest).ok()?;
    if ok != "Ok" {
        return None;
    }
    rest = tail;
    let (kind, n, len) = tagged_map(rest, "kind")?;
    if len != rest.len() {
        return None;
    }
    let reply = match kind {
        "opened" => Reply::Opened(bin_body(rest)?),
        "done" if n == 1 => Reply::Done,
        _ => return None,
    };
    Some(ServerFrame::Reply {
        id,
        result: Ok(reply),
    })
}

/// A binary frame from the daemon: `[tag, fields...]`.
struct BinServerFrame(ServerFrame);

impl<'de> Deserialize<'de> for BinServerFrame {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = BinServerFrame;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a binary server frame [tag, ...]")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<BinServerFrame, A::Error> {
                use serde::de::Error;
                let missing = || A::Error::custom("frame ends early");
                let tag: u8 = seq.next_element()?.ok_or_else(missing)?;
                let frame = match tag {
                    BIN_HELLO => ServerFrame::Hello(seq.next_element()?.ok_or_else(missing)?),
                    BIN_REPLY => ServerFrame::Reply {
                        id: seq.next_element()?.ok_or_else(missing)?,
                        result: seq.next_element()?.ok_or_else(missing)?,
                    },
                    BIN_EVENT => ServerFrame::Event(seq.next_element()?.ok_or_else(missing)?),
                    t => return Err(A::Error::custom(format!("unknown frame tag {t}"))),
                };
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::custom("frame has extra fields"));
                }
                Ok(BinServerFrame(frame))
            }
        }
        d.deserialize_seq(V)
    }
}

/// The hot frames' compact layout ([`FEATURE_COMPACT_FRAMES`], issue 16):
/// a hand-written encoder and a total decoder, no serde. See the feature's
/// doc for the layout; everything here reads peer bytes through
/// [`compact::Reader`], whose every read is checked.
mod compact {
    use super::*;
    use crate::lease::{LeaseKey, LeaseState};
    use crate::model::{Rights, ScopeName};
    use uuid::Uuid;

    /// The first byte of a compact frame: MessagePack's never-used
    /// marker, so neither JSON (`{`) nor a binary v1 frame (an array).
    pub const MARK: u8 = 0xc1;
    const OPEN: u8 = 1;
    const REPLAY_OPEN: u8 = 2;
    const CLOSE: u8 = 3;
    const OPENED: u8 = 4;
    const DONE: u8 = 5;
    const OPEN_RECORDS: u8 = 6;
    const REPLAY_OPEN_RECORDS: u8 = 7;
    const CLOSE_RECORDS: u8 = 8;

    // `OpenRequest` flags.
    const F_CREATE_GUID: u8 = 1;
    const F_OWNER: u8 = 2;
    const F_LEASE: u8 = 4;
    const F_NO_WAIT: u8 = 8;
    const F_SHARE_GROUP: u8 = 16;
    const F_STAT: u8 = 32;
    const F_SHARE_EXEMPT: u8 = 64;
    const F_WAIT_FOR_HINTS: u8 = 128;
    // `Opened` flags.
    const O_LEASE: u8 = 1;
    const O_LOCKED: u8 = 2;
    const OPENED_FLAGS: u8 = 3;

    /// Room for a hot frame from the start (an open with a 100-byte path
    /// and client is ~130 bytes).
    const START: usize = 160;

    fn varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let [low, ..] = v.to_le_bytes();
            v >>= 7;
            if v == 0 {
                out.push(low & 0x7f);
                return;
            }
            out.push(low | 0x80);
        }
    }

    fn opt_varint(out: &mut Vec<u8>, v: Option<u64>) {
        match v {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                varint(out, v);
            }
        }
    }

    fn text(out: &mut Vec<u8>, s: &str) {
        varint(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    fn durability(out: &mut Vec<u8>, d: Durability) {
        match d {
            Durability::None => out.push(0),
            Durability::Durable { timeout_ms } => {
                out.push(1);
                varint(out, u64::from(timeout_ms));
            }
            Durability::Persistent { timeout_ms } => {
                out.push(2);
                varint(out, u64::from(timeout_ms));
            }
        }
    }

    fn open(out: &mut Vec<u8>, o: &OpenRequest) {
        let mut flags = 0;
        for (set, bit) in [
            (o.create_guid.is_some(), F_CREATE_GUID),
            (o.owner.is_some(), F_OWNER),
            (o.lease.is_some(), F_LEASE),
            (o.no_wait, F_NO_WAIT),
            (o.share_group.is_some(), F_SHARE_GROUP),
            (o.stat, F_STAT),
            (o.share_exempt, F_SHARE_EXEMPT),
            (o.wait_for_hints, F_WAIT_FOR_HINTS),
        ] {
            if set {
                flags |= bit;
            }
        }
        out.extend_from_slice(&[
            flags,
            o.access.rights().bits(),
            o.share.bits(),
            match o.disposition {
                Disposition::Open => 0,
                Disposition::Create => 1,
                Disposition::OpenIf => 2,
                Disposition::Overwrite => 3,
                Disposition::OverwriteIf => 4,
                Disposition::Supersede => 5,
            },
        ]);
        durability(out, o.durability);
        text(out, o.client.as_str());
        text(out, o.path.as_str());
        if let Some(g) = &o.create_guid {
            out.extend_from_slice(g.0.as_bytes());
        }
        if let Some(owner) = &o.owner {
            text(out, owner);
        }
        if let Some(l) = &o.lease {
            out.extend_from_slice(l.key.0.as_bytes());
            out.push(l.state.bits());
            varint(out, u64::from(l.epoch));
        }
        if let Some(g) = &o.share_group {
            text(out, g);
        }
    }

    fn scope(out: &mut Vec<u8>, s: &ReplayScope) {
        match s {
            ReplayScope::Handle(k) => {
                out.push(0);
                out.extend_from_slice(k.0.as_bytes());
            }
            ReplayScope::Session(name) => {
                out.push(1);
                text(out, name.as_str());
            }
        }
    }

    fn records(out: &mut Vec<u8>, put: &[RecordSpec]) {
        varint(out, put.len() as u64);
        for r in put {
            scope(out, &r.scope);
            varint(out, r.op_id);
            text(out, &r.reply);
            varint(out, u64::from(r.keep));
        }
    }

    /// Room for `put`'s records beyond [`START`].
    fn records_len(put: &[RecordSpec]) -> usize {
        put.iter()
            .map(|r| {
                let name = match &r.scope {
                    ReplayScope::Handle(_) => 16,
                    ReplayScope::Session(s) => s.as_str().len(),
                };
                name + r.reply.len() + 32
            })
            .sum()
    }

    /// The compact form of a request, or None for one it does not cover
    /// (every request but an open, a replay open or a close; an open or
    /// close that carries records to write unless `with_records`, see
    /// [`FEATURE_COMPACT_RECORDS`]).
    pub fn encode_request(frame: &RequestFrame, with_records: bool) -> Option<Vec<u8>> {
        let mut out;
        match &frame.req {
            Request::Open(o) | Request::ReplayOpen(o)
                if (o.put.is_empty() || with_records) && !o.replay_same_lease && !o.resume_only =>
            {
                let open_kind = matches!(frame.req, Request::Open(_));
                let kind = match (open_kind, o.put.is_empty()) {
                    (true, true) => OPEN,
                    (false, true) => REPLAY_OPEN,
                    (true, false) => OPEN_RECORDS,
                    (false, false) => REPLAY_OPEN_RECORDS,
                };
                out = Vec::with_capacity(START + records_len(&o.put));
                out.extend_from_slice(&[MARK, kind]);
                varint(&mut out, frame.id);
                open(&mut out, o);
                if !o.put.is_empty() {
                    records(&mut out, &o.put);
                }
            }
            // A close carrying the told flag has no compact form: it is
            // written as JSON or binary.
            Request::Close {
                key,
                put,
                delete,
                delete_on_close: None,
            } if put.is_empty() && delete.is_empty() => {
                out = Vec::with_capacity(START);
                out.extend_from_slice(&[MARK, CLOSE]);
                varint(&mut out, frame.id);
                out.extend_from_slice(key.0.as_bytes());
            }
            Request::Close {
                key,
                put,
                delete,
                delete_on_close: None,
            } if with_records => {
                out = Vec::with_capacity(START + records_len(put) + 32 * delete.len());
                out.extend_from_slice(&[MARK, CLOSE_RECORDS]);
                varint(&mut out, frame.id);
                out.extend_from_slice(key.0.as_bytes());
                records(&mut out, put);
                varint(&mut out, delete.len() as u64);
                for (s, op) in delete {
                    scope(&mut out, s);
                    varint(&mut out, *op);
                }
            }
            _ => return None,
        }
        Some(out)
    }

    /// The compact form of a daemon frame, or None for one it does not
    /// cover (all but an `Opened` or `Done` reply).
    pub fn encode_server(frame: &ServerFrame) -> Option<Vec<u8>> {
        let ServerFrame::Reply { id, result: Ok(r) } = frame else {
            return None;
        };
        let mut out = Vec::with_capacity(START);
        match r {
            Reply::Opened(o) => {
                out.extend_from_slice(&[MARK, OPENED]);
                opt_varint(&mut out, *id);
                let flags = if o.lease.is_some() { O_LEASE } else { 0 }
                    | if o.locked { O_LOCKED } else { 0 };
                out.push(flags);
                out.extend_from_slice(o.key.0.as_bytes());
                out.push(match o.create_action {
                    CreateAction::Opened => 0,
                    CreateAction::Created => 1,
                    CreateAction::Overwritten => 2,
                    CreateAction::Superseded => 3,
                });
                varint(&mut out, o.size);
                varint(&mut out, o.file.dev);
                varint(&mut out, o.file.ino);
                durability(&mut out, o.durability);
                if let Some(l) = &o.lease {
                    out.extend_from_slice(l.key.0.as_bytes());
                    out.push(l.state.bits());
                    varint(&mut out, u64::from(l.epoch));
                }
            }
            Reply::Done => {
                out.extend_from_slice(&[MARK, DONE]);
                opt_varint(&mut out, *id);
            }
            _ => return None,
        }
        Some(out)
    }

    /// Checked reads from a peer's frame: every read either succeeds
    /// within the bytes or names what was wrong.
    pub struct Reader<'a> {
        rest: &'a [u8],
    }

    type R<T> = Result<T, String>;

    impl<'a> Reader<'a> {
        pub fn new(bytes: &'a [u8]) -> Self {
            Reader { rest: bytes }
        }
        fn byte(&mut self, what: &str) -> R<u8> {
            let (&b, rest) = self
                .rest
                .split_first()
                .ok_or_else(|| format!("frame ends before {what}"))?;
            self.rest = rest;
            Ok(b)
        }
        fn bytes(&mut self, n: usize, what: &str) -> R<&'a [u8]> {
            if self.rest.len() < n {
                return Err(format!("frame ends inside {what}"));
            }
            let (b, rest) = self.rest.split_at(n);
            self.rest = rest;
            Ok(b)
        }
        /// A LEB128 integer of at most 10 bytes that fits in 64 bits.
        fn varint(&mut self, what: &str) -> R<u64> {
            let mut v: u64 = 0;
            for shift in (0..64).step_by(7) {
                let b = self.byte(what)?;
                let part = u64::from(b & 0x7f);
                if shift == 63 && part > 1 {
                    return Err(format!("{what} overflows 64 bits"));
                }
                v |= part << shift;
                if b & 0x80 == 0 {
                    return Ok(v);
                }
            }
            Err(format!("{what} overflows 64 bits"))
        }
        fn u32(&mut self, what: &str) -> R<u32> {
            u32::try_from(self.varint(what)?).map_err(|_| format!("{what} exceeds 32 bits"))
        }
        fn u16(&mut self, what: &str) -> R<u16> {
            u16::try_from(self.varint(what)?).map_err(|_| format!("{what} exceeds 16 bits"))
        }
        fn opt_varint(&mut self, what: &str) -> R<Option<u64>> {
            match self.byte(what)? {
                0 => Ok(None),
                1 => self.varint(what).map(Some),
                b => Err(format!("bad option tag {b} for {what}")),
            }
        }
        /// A length-prefixed UTF-8 string; the length is bounded by the
        /// bytes left (so by the frame, at most [`MAX_FRAME`]).
        fn text(&mut self, what: &str) -> R<&'a str> {
            let n = self.varint(what)?;
            let n = usize::try_from(n)
                .ok()
                .filter(|n| *n <= self.rest.len())
                .ok_or_else(|| format!("{what} longer than the frame"))?;
            std::str::from_utf8(self.bytes(n, what)?).map_err(|_| format!("{what} is not UTF-8"))
        }
        fn uuid(&mut self, what: &str) -> R<Uuid> {
            let b = self.bytes(16, what)?;
            Uuid::from_slice(b).map_err(|_| format!("bad {what}"))
        }
        fn durability(&mut self) -> R<Durability> {
            Ok(match self.byte("durability")? {
                0 => Durability::None,
                1 => Durability::Durable {
                    timeout_ms: self.u32("timeout")?,
                },
                2 => Durability::Persistent {
                    timeout_ms: self.u32("timeout")?,
                },
                b => return Err(format!("bad durability {b}")),
            })
        }
        fn lease(&mut self) -> R<(LeaseKey, LeaseState, u16)> {
            let key = LeaseKey(self.uuid("lease key")?);
            let b = self.byte("lease state")?;
            let state = LeaseState::from_bits(b).ok_or_else(|| format!("bad lease state {b}"))?;
            Ok((key, state, self.u16("lease epoch")?))
        }
        fn open(&mut self) -> R<OpenRequest> {
            // Every bit of an open's flags has a meaning (128, the last,
            // `wait_for_hints`): none is unknown.
            let flags = self.byte("flags")?;
            let a = self.byte("access")?;
            let access = Rights::from_bits(a)
                .and_then(|r| Access::new(r).ok())
                .ok_or_else(|| format!("bad access {a:#x}"))?;
            let s = self.byte("share")?;
            let share = Rights::from_bits(s).ok_or_else(|| format!("bad share {s:#x}"))?;
            let disposition = match self.byte("disposition")? {
                0 => Disposition::Open,
                1 => Disposition::Create,
                2 => Disposition::OpenIf,
                3 => Disposition::Overwrite,
                4 => Disposition::OverwriteIf,
                5 => Disposition::Supersede,
                b => return Err(format!("bad disposition {b}")),
            };
            let durability = self.durability()?;
            let client = ClientId::new(self.text("client")?).map_err(|e| e.to_string())?;
            let path = RelPath::new(self.text("path")?).map_err(|e| e.to_string())?;
            let create_guid = if flags & F_CREATE_GUID != 0 {
                Some(CreateGuid(self.uuid("create guid")?))
            } else {
                None
            };
            let owner = if flags & F_OWNER != 0 {
                Some(self.text("owner")?.to_owned())
            } else {
                None
            };
            let lease = if flags & F_LEASE != 0 {
                let (key, state, epoch) = self.lease()?;
                Some(LeaseRequest { key, state, epoch })
            } else {
                None
            };
            let share_group = if flags & F_SHARE_GROUP != 0 {
                Some(self.text("share group")?.to_owned())
            } else {
                None
            };
            Ok(OpenRequest {
                client,
                path,
                access,
                share,
                disposition,
                durability,
                create_guid,
                owner,
                lease,
                no_wait: flags & F_NO_WAIT != 0,
                wait_for_hints: flags & F_WAIT_FOR_HINTS != 0,
                replay_same_lease: false,
                resume_only: false,
                share_group,
                stat: flags & F_STAT != 0,
                share_exempt: flags & F_SHARE_EXEMPT != 0,
                put: Vec::new(),
            })
        }
        fn opened(&mut self) -> R<Opened> {
            let flags = self.byte("flags")?;
            if flags & !OPENED_FLAGS != 0 {
                return Err(format!("unknown opened flags {flags:#x}"));
            }
            let key = ResumeKey(self.uuid("resume key")?);
            let create_action = match self.byte("create action")? {
                0 => CreateAction::Opened,
                1 => CreateAction::Created,
                2 => CreateAction::Overwritten,
                3 => CreateAction::Superseded,
                b => return Err(format!("bad create action {b}")),
            };
            let size = self.varint("size")?;
            let file = FileId {
                dev: self.varint("dev")?,
                ino: self.varint("ino")?,
            };
            let durability = self.durability()?;
            let lease = if flags & O_LEASE != 0 {
                let (key, state, epoch) = self.lease()?;
                Some(HeldLease { key, state, epoch })
            } else {
                None
            };
            Ok(Opened {
                key,
                create_action,
                size,
                file,
                durability,
                lease,
                locked: flags & O_LOCKED != 0,
            })
        }
        /// A count of items that each take at least `min` bytes, bounded
        /// by the bytes left (so a count cannot make a large allocation).
        fn count(&mut self, what: &str, min: usize) -> R<usize> {
            let n = self.varint(what)?;
            usize::try_from(n)
                .ok()
                .filter(|n| n.saturating_mul(min) <= self.rest.len())
                .ok_or_else(|| format!("{what} {n} exceeds the frame"))
        }
        fn scope(&mut self) -> R<ReplayScope> {
            match self.byte("scope")? {
                0 => Ok(ReplayScope::Handle(ResumeKey(self.uuid("scope key")?))),
                1 => ScopeName::new(self.text("scope name")?)
                    .map(ReplayScope::Session)
                    .map_err(|e| format!("scope name: {e}")),
                b => Err(format!("bad scope kind {b}")),
            }
        }
        /// A count, then that many records.
        fn records(&mut self) -> R<Vec<RecordSpec>> {
            // A record takes at least 5 bytes (scope kind, an empty name,
            // op id, reply length, keep).
            let n = self.count("records", 5)?;
            let mut put = Vec::with_capacity(n);
            for _ in 0..n {
                put.push(RecordSpec {
                    scope: self.scope()?,
                    op_id: self.varint("op id")?,
                    reply: self.text("reply")?.to_owned(),
                    keep: self.u32("keep")?,
                });
            }
            Ok(put)
        }
        fn end(&self) -> R<()> {
            if self.rest.is_empty() {
                Ok(())
            } else {
                Err(format!("{} bytes after the frame", self.rest.len()))
            }
        }
    }

    /// Decodes a compact request frame (its first byte is [`MARK`]); on
    /// failure, the id too when it could be read.
    pub fn decode_request(bytes: &[u8]) -> Result<RequestFrame, (Option<u64>, String)> {
        let mut r = Reader::new(bytes);
        let head = (|| -> R<(u8, u64)> {
            if r.byte("mark")? != MARK {
                return Err("not a compact frame".into());
            }
            let kind = r.byte("kind")?;
            Ok((kind, r.varint("id")?))
        })();
        let (kind, id) = head.map_err(|e| (None, e))?;
        let req = (|| -> R<Request> {
            let req = match kind {
                OPEN => Request::Open(r.open()?),
                REPLAY_OPEN => Request::ReplayOpen(r.open()?),
                OPEN_RECORDS | REPLAY_OPEN_RECORDS => {
                    let mut o = r.open()?;
                    o.put = r.records()?;
                    // One form per frame: an open without records is
                    // written as OPEN or REPLAY_OPEN.
                    if o.put.is_empty() {
                        return Err("no records in a frame kind with records".into());
                    }
                    if kind == OPEN_RECORDS {
                        Request::Open(o)
                    } else {
                        Request::ReplayOpen(o)
                    }
                }
                CLOSE => Request::Close {
                    key: ResumeKey(r.uuid("resume key")?),
                    put: Vec::new(),
                    delete: Vec::new(),
                    delete_on_close: None,
                },
                CLOSE_RECORDS => {
                    let key = ResumeKey(r.uuid("resume key")?);
                    let put = r.records()?;
                    // A deletion takes at least 3 bytes (kind, empty name, op id).
                    let m = r.count("deletions", 3)?;
                    if put.is_empty() && m == 0 {
                        return Err("no records in a frame kind with records".into());
                    }
                    let mut delete = Vec::with_capacity(m);
                    for _ in 0..m {
                        delete.push((r.scope()?, r.varint("op id")?));
                    }
                    Request::Close {
                        key,
                        put,
                        delete,
                        delete_on_close: None,
                    }
                }
                k => return Err(format!("unknown compact request kind {k}")),
            };
            r.end()?;
            Ok(req)
        })()
        .map_err(|e| (Some(id), e))?;
        Ok(RequestFrame { id, req })
    }

    /// Decodes a compact daemon frame (its first byte is [`MARK`]).
    pub fn decode_server(bytes: &[u8]) -> R<ServerFrame> {
        let mut r = Reader::new(bytes);
        if r.byte("mark")? != MARK {
            return Err("not a compact frame".into());
        }
        let kind = r.byte("kind")?;
        let id = r.opt_varint("id")?;
        let reply = match kind {
            OPENED => Reply::Opened(r.opened()?),
            DONE => Reply::Done,
            k => return Err(format!("unknown compact reply kind {k}")),
        };
        r.end()?;
        Ok(ServerFrame::Reply {
            id,
            result: Ok(reply),
        })
    }
}

/// Encodes a JSON frame, refusing one larger than [`MAX_FRAME`]: the
/// hello, and every frame of a connection that did not agree on
/// [`FEATURE_BINARY_FRAMES`].
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
    if bytes.first() == Some(&compact::MARK) {
        return compact::decode_request(bytes).map_err(|(id, e)| {
            (
                id,
                WireError::new(ErrorCode::BadFrame, format!("bad compact request: {e}")),
            )
        });
    }
    if is_binary(bytes) {
        if let Some((id, req)) = fast_bin_request(bytes) {
            return Ok(RequestFrame { id, req });
        }
        return match bin_decode::<(u64, Request)>(bytes) {
            Ok((id, req)) => Ok(RequestFrame { id, req }),
            Err(e) => {
                let mut rest = bytes;
                let id = rmp::decode::read_array_len(&mut rest)
                    .ok()
                    .filter(|n| *n >= 1)
                    .and_then(|_| rmp::decode::read_int::<u64, _>(&mut rest).ok());
                Err((
                    id,
                    WireError::new(ErrorCode::BadFrame, format!("bad binary request: {e}")),
                ))
            }
        };
    }
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
    if bytes.first() == Some(&compact::MARK) {
        return compact::decode_server(bytes).map_err(|e| {
            WireError::new(
                ErrorCode::BadFrame,
                format!("bad compact server frame: {e}"),
            )
        });
    }
    if is_binary(bytes) {
        if let Some(frame) = fast_bin_reply(bytes) {
            return Ok(frame);
        }
        return bin_decode::<BinServerFrame>(bytes)
            .map(|f| f.0)
            .map_err(|e| {
                WireError::new(ErrorCode::BadFrame, format!("bad binary server frame: {e}"))
            });
    }
    serde_json::from_slice(bytes)
        .map_err(|e| WireError::new(ErrorCode::BadFrame, format!("bad server frame: {e}")))
}

#[cfg(test)]
mod tests {
    /// A `Status` reply naming [`CORRUPT_NAMES_KEPT`] unreadable records
    /// whose errors are long stays within a frame: each name is cut to
    /// [`CORRUPT_NAME_BYTES`]. Before, 100 names of a kilobyte made a reply
    /// filterd could not send, to rksmbd's startup `Status` too.
    #[test]
    fn a_status_of_many_long_corrupt_names_fits_a_frame() {
        let mut corrupt = CorruptRecords::default();
        for i in 0..1000 {
            corrupt.note(format!("{i} {}", "é".repeat(2000)));
        }
        assert!(corrupt
            .names
            .iter()
            .all(|n| n.len() <= CORRUPT_NAME_BYTES + 3));
        let status = StatusInfo {
            pid: u32::MAX,
            epoch: u64::MAX,
            root: "/".repeat(4096),
            state_dir: "/".repeat(4096),
            uptime_ms: u64::MAX,
            handles_connected: u64::MAX,
            handles_disconnected: u64::MAX,
            handles_lost: u64::MAX,
            frontends: u64::MAX,
            recovering: false,
            fanotify: false,
            mediation: String::new(),
            store: String::new(),
            store_detail: String::new(),
            schema_version: u32::MAX,
            corrupt_records: Some(corrupt.names),
            corrupt_records_total: Some(corrupt.total),
            commit_wait: None,
            lease_left_ms: Some(u64::MAX),
        };
        let frame = ServerFrame::Reply {
            id: Some(u64::MAX),
            result: Ok(Reply::Status(status)),
        };
        encode_server(Encoding::Json, &frame).expect("the reply fits a frame");
    }

    use super::*;
    use crate::model::Rights;

    #[test]
    fn request_roundtrip() {
        let f = RequestFrame {
            id: 7,
            req: Request::Open(OpenRequest::new(
                ClientId::new("c1").unwrap(),
                RelPath::new("a/b").unwrap(),
                Access::new(Rights::READ).unwrap(),
                Rights::ALL,
                Disposition::OpenIf,
                Durability::Persistent { timeout_ms: 0 },
            )),
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

    /// A lease break acknowledgement from a frontend older than its
    /// `client` field still decodes (naming no client), and one naming
    /// none is sent as those frontends sent it.
    #[test]
    fn a_lease_break_ack_without_a_client_is_the_frame_from_before() {
        let k = uuid::Uuid::new_v4();
        let old = format!(r#"{{"id":1,"op":"lease_break_ack","lease_key":"{k}","state":"RH"}}"#);
        let f = decode_request(old.as_bytes()).unwrap();
        let ack = Request::LeaseBreakAck {
            lease_key: LeaseKey(k),
            state: LeaseState::parse("RH").unwrap(),
            client: None,
        };
        assert_eq!(f.req, ack);
        let sent = String::from_utf8(encode(&f).unwrap()).unwrap();
        assert!(!sent.contains("client"), "{sent}");
    }

    /// A purge's reply from a daemon older than its `lost` field decodes
    /// as not telling (`None`), not as none lost, and one not telling is
    /// sent as those daemons sent it.
    #[test]
    fn a_purge_reply_without_lost_is_the_frame_from_before() {
        let old = Reply::Purged {
            count: 3,
            lost: None,
        };
        let frame = ServerFrame::Reply {
            id: Some(7),
            result: Ok(old.clone()),
        };
        let sent = String::from_utf8(encode(&frame).unwrap()).unwrap();
        assert!(
            sent.contains("\"count\":3") && !sent.contains("lost"),
            "{sent}"
        );
        assert_eq!(decode_server(sent.as_bytes()).unwrap(), frame);
        let new = sent.replace("\"count\":3", "\"count\":3,\"lost\":1");
        let Ok(ServerFrame::Reply { result: Ok(r), .. }) = decode_server(new.as_bytes()) else {
            panic!("{new}");
        };
        assert_eq!(
            r,
            Reply::Purged {
                count: 3,
                lost: Some(1)
            }
        );
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

    /// `Retry` goes only to a connection granted `FEATURE_RETRY_CODE`;
    /// any other reads it as the `FileNotAvailable` daemons answered
    /// before, with the message kept. Every other code and frame goes as
    /// it is.
    #[test]
    fn a_retry_is_file_not_available_without_its_feature() {
        let refusal = |code| ServerFrame::Reply {
            id: Some(9),
            result: Err(WireError::new(code, "replaced while opening; retry")),
        };
        let old = refusal(ErrorCode::Retry).granted(FEATURE_LOCK_HINTS);
        assert_eq!(old, Some(refusal(ErrorCode::FileNotAvailable)));
        assert_eq!(refusal(ErrorCode::Retry).granted(FEATURES), None);
        assert_eq!(refusal(ErrorCode::Retry).granted(FEATURE_RETRY_CODE), None);
        assert_ne!(FEATURES & FEATURE_RETRY_CODE, 0);
        for code in [
            ErrorCode::FileNotAvailable,
            ErrorCode::Busy,
            ErrorCode::SharingViolation,
        ] {
            assert_eq!(refusal(code).granted(0), None, "{code:?}");
            assert_eq!(code.granted(0), code);
        }
        let ok = ServerFrame::Reply {
            id: Some(1),
            result: Ok(Reply::Done),
        };
        assert_eq!(ok.granted(0), None);
        // The new code on the wire, both encodings.
        let f = refusal(ErrorCode::Retry);
        assert!(String::from_utf8(encode(&f).unwrap())
            .unwrap()
            .contains("\"retry\""));
        for enc in [Encoding::Json, Encoding::Binary, Encoding::Compact] {
            assert_eq!(decode_server(&encode_server(enc, &f).unwrap()).unwrap(), f);
        }
    }

    /// Re-review rr39e F4: what a resume must match. A request without
    /// `matching` (an older frontend's) decodes as asking nothing, and one
    /// with it round-trips in every encoding.
    #[test]
    fn a_resume_match_checks_id_persistence_and_lease() {
        let key = ResumeKey::new_time_ordered();
        let lease = LeaseKey(uuid::Uuid::from_bytes([7; 16]));
        let mut oplock = [0u8; 16];
        oplock[..8].copy_from_slice(crate::lease::OPLOCK_KEY_TAG);
        let oplock = LeaseKey(uuid::Uuid::from_bytes(oplock));
        let persistent = Durability::Persistent { timeout_ms: 1 };
        let durable = Durability::Durable { timeout_ms: 1 };
        let m = ResumeMatch {
            short_id: Some(key.short_id()),
            refuse_persistent: true,
            lease_key: Some(lease),
            name: Some(ResumeName::Path(RelPath::new("d/f").unwrap())),
        };
        assert!(m.matches(key, durable, Some(lease)));
        assert!(m.matches(key, durable, None), "no lease to match");
        assert!(m.matches(key, durable, Some(oplock)), "an oplock passes");
        assert!(!m.matches(key, persistent, Some(lease)));
        assert!(!m.matches(ResumeKey::new_time_ordered(), durable, Some(lease)));
        assert!(!m.matches(key, durable, Some(LeaseKey(uuid::Uuid::nil()))));
        let no_lease = ResumeMatch {
            lease_key: None,
            ..m.clone()
        };
        assert!(!no_lease.matches(key, durable, Some(lease)));
        assert!(no_lease.matches(key, durable, Some(oplock)));

        // Re-review rr40b F1: a leased handle's name, exactly as stored;
        // an oplock's or an unleased handle's is not checked, nor any
        // without a name to check.
        let p = |s: &str| RelPath::new(s).unwrap();
        assert!(m.names(&p("d/f"), Some(lease)));
        for other in ["d/F", "f", "d/f/g", "e/f"] {
            assert!(!m.names(&p(other), Some(lease)), "{other}");
            assert!(m.names(&p(other), Some(oplock)), "{other}");
            assert!(m.names(&p(other), None), "{other}");
        }
        let no_path = ResumeMatch {
            name: Some(ResumeName::NoPath),
            ..m.clone()
        };
        assert!(!no_path.names(&p("d/f"), Some(lease)));
        assert!(no_path.names(&p("d/f"), Some(oplock)));
        let unnamed = ResumeMatch {
            name: None,
            ..m.clone()
        };
        assert!(unnamed.names(&p("e"), Some(lease)));
        assert_eq!(
            ErrorCode::NameMismatch.granted(FEATURES & !FEATURE_RESUME_MATCH),
            ErrorCode::NoSuchHandle,
            "an older frontend is told the code it knows"
        );
        assert_eq!(
            ErrorCode::NameMismatch.granted(FEATURE_RESUME_MATCH),
            ErrorCode::NameMismatch
        );
        let before_names = br#"{"id":3,"op":"resume","client":"c","by":"key","key":"00000000-0000-0000-0000-000000000001","matching":{"short_id":5}}"#;
        match decode_request(before_names).unwrap().req {
            Request::Resume(r) => assert_eq!(
                r.matching,
                Some(ResumeMatch {
                    short_id: Some(5),
                    refuse_persistent: false,
                    lease_key: None,
                    name: None,
                })
            ),
            other => panic!("{other:?}"),
        }

        let old = br#"{"id":1,"op":"resume","client":"c","by":"key","key":"00000000-0000-0000-0000-000000000001"}"#;
        match decode_request(old).unwrap().req {
            Request::Resume(r) => assert_eq!((r.matching, r.if_last_held), (None, false)),
            other => panic!("{other:?}"),
        }
        let frame = RequestFrame {
            id: 2,
            req: Request::Resume(ResumeRequest {
                client: ClientId::new("c").unwrap(),
                target: ResumeTarget::Key { key },
                owner: None,
                matching: Some(m),
                if_last_held: true,
            }),
        };
        for enc in [Encoding::Json, Encoding::Binary, Encoding::Compact] {
            let bytes = encode_request(enc, &frame).unwrap();
            assert_eq!(decode_request(&bytes).unwrap(), frame);
        }
        let mut no_path_frame = frame.clone();
        if let Request::Resume(r) = &mut no_path_frame.req {
            r.matching = Some(no_path);
        }
        for enc in [Encoding::Json, Encoding::Binary, Encoding::Compact] {
            let bytes = encode_request(enc, &no_path_frame).unwrap();
            assert_eq!(decode_request(&bytes).unwrap(), no_path_frame);
        }
        // A replay that names its lease key has no compact form: written
        // as a binary frame, it keeps the flag.
        let replay = RequestFrame {
            id: 3,
            req: Request::ReplayOpen(OpenRequest {
                lease: Some(crate::model::LeaseRequest {
                    key: lease,
                    state: LeaseState::R,
                    epoch: 0,
                }),
                replay_same_lease: true,
                ..OpenRequest::new(
                    ClientId::new("c").unwrap(),
                    RelPath::new("f").unwrap(),
                    crate::model::Access::new(crate::model::Rights::READ).unwrap(),
                    crate::model::Rights::READ,
                    Disposition::Open,
                    durable,
                )
            }),
        };
        for enc in [Encoding::Json, Encoding::Binary, Encoding::Compact] {
            let bytes = encode_request(enc, &replay).unwrap();
            assert_ne!(bytes.first(), Some(&0xc1), "{enc:?}");
            assert_eq!(decode_request(&bytes).unwrap(), replay);
        }
        // Nor one that only resumes (`resume_only`): it keeps the flag.
        let mut resume_only = replay;
        if let Request::ReplayOpen(o) = &mut resume_only.req {
            o.replay_same_lease = false;
            o.resume_only = true;
        }
        for enc in [Encoding::Json, Encoding::Binary, Encoding::Compact] {
            let bytes = encode_request(enc, &resume_only).unwrap();
            assert_ne!(bytes.first(), Some(&0xc1), "{enc:?}");
            assert_eq!(decode_request(&bytes).unwrap(), resume_only);
        }
    }
}

/// Issue 16: binary frames. Every message type goes through the binary
/// encoding and back unchanged, and through JSON too; a malformed binary
/// frame is a typed error, never a panic.
#[cfg(test)]
mod binary_tests {
    use super::*;
    use crate::locks::LockKind;
    use crate::model::{HeldLease, Rights};
    use crate::record::tests::{
        durability, file, handle_record, lease_state, name, path, record_spec, scope, text, uuid,
    };
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = ResumeKey> {
        uuid().prop_map(ResumeKey)
    }

    fn lease_key() -> impl Strategy<Value = LeaseKey> {
        uuid().prop_map(LeaseKey)
    }

    fn resume_match() -> impl Strategy<Value = ResumeMatch> {
        (
            proptest::option::of(any::<u64>()),
            any::<bool>(),
            proptest::option::of(lease_key()),
            proptest::option::of(prop_oneof![
                path().prop_map(ResumeName::Path),
                Just(ResumeName::NoPath),
            ]),
        )
            .prop_map(
                |(short_id, refuse_persistent, lease_key, name)| ResumeMatch {
                    short_id,
                    refuse_persistent,
                    lease_key,
                    name,
                },
            )
    }

    fn range() -> impl Strategy<Value = LockRange> {
        (any::<u64>(), any::<u64>()).prop_map(|(offset, length)| LockRange { offset, length })
    }

    fn held_lease() -> impl Strategy<Value = HeldLease> {
        (lease_key(), lease_state(), any::<u16>()).prop_map(|(key, state, epoch)| HeldLease {
            key,
            state,
            epoch,
        })
    }

    fn open_request() -> impl Strategy<Value = OpenRequest> {
        (
            (
                "[^\u{0}]{1,30}",
                path(),
                1u8..=7,
                0u8..=7,
                0usize..6,
                durability(),
            ),
            (
                proptest::option::of(uuid()),
                proptest::option::of(text()),
                proptest::option::of((lease_key(), lease_state(), any::<u16>())),
                any::<bool>(),
                proptest::option::of(text()),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            ),
            proptest::collection::vec(record_spec(), 0..2),
        )
            .prop_map(
                |(
                    (client, path, access, share, disp, durability),
                    (
                        create_guid,
                        owner,
                        lease,
                        no_wait,
                        share_group,
                        stat,
                        share_exempt,
                        wait_for_hints,
                        replay_same_lease,
                        resume_only,
                    ),
                    put,
                )| OpenRequest {
                    client: ClientId::new(client).expect("valid identity"),
                    path,
                    access: Access::new(Rights::from_bits_truncate(access)).expect("non-empty"),
                    share: Rights::from_bits_truncate(share),
                    disposition: [
                        Disposition::Open,
                        Disposition::Create,
                        Disposition::OpenIf,
                        Disposition::Overwrite,
                        Disposition::OverwriteIf,
                        Disposition::Supersede,
                    ][disp],
                    durability,
                    create_guid: create_guid.map(CreateGuid),
                    owner,
                    lease: lease.map(|(key, state, epoch)| LeaseRequest { key, state, epoch }),
                    no_wait,
                    wait_for_hints,
                    replay_same_lease,
                    resume_only,
                    share_group,
                    stat,
                    share_exempt,
                    put: put.into_iter().flatten().collect(),
                },
            )
    }

    /// Every request variant (the match in `covers_every_request` fails
    /// to compile when one is added without a case here).
    fn request() -> impl Strategy<Value = Request> {
        let lock_op =
            (range(), any::<bool>(), any::<bool>()).prop_map(|(range, exclusive, unlock)| LockOp {
                range,
                exclusive,
                unlock,
            });
        prop_oneof![
            open_request().prop_map(Request::Open),
            open_request().prop_map(Request::ReplayOpen),
            (
                "[^\u{0}]{1,30}",
                key(),
                proptest::option::of(uuid()),
                proptest::option::of(resume_match()),
                any::<bool>(),
            )
                .prop_map(|(c, key, g, matching, held)| {
                    Request::Resume(ResumeRequest {
                        client: ClientId::new(c).expect("valid identity"),
                        target: match g {
                            Some(g) => ResumeTarget::CreateGuid {
                                create_guid: CreateGuid(g),
                            },
                            None => ResumeTarget::Key { key },
                        },
                        owner: None,
                        matching,
                        if_last_held: held,
                    })
                }),
            (
                key(),
                proptest::collection::vec(record_spec(), 0..2),
                proptest::collection::vec((scope(), any::<u64>()), 0..2),
                proptest::option::of(any::<bool>())
            )
                .prop_map(|(key, put, delete, delete_on_close)| Request::Close {
                    key,
                    put: put.into_iter().flatten().collect(),
                    delete,
                    delete_on_close,
                }),
            (key(), proptest::option::of(any::<bool>())).prop_map(|(key, delete_on_close)| {
                Request::Detach {
                    key,
                    delete_on_close,
                }
            }),
            Just(Request::Status),
            (proptest::option::of(key()), any::<bool>())
                .prop_map(|(after, durable_ok)| Request::Handles { after, durable_ok }),
            (key(), any::<bool>()).prop_map(|(key, learning)| Request::Handle { key, learning }),
            (
                proptest::option::of(file()),
                proptest::option::of(key()),
                any::<bool>()
            )
                .prop_map(|(after, holders_after, durable_ok)| Request::Files {
                    after,
                    holders_after,
                    durable_ok
                }),
            any::<bool>().prop_map(|durable_ok| Request::Frontends { durable_ok }),
            Just(Request::Stats),
            key().prop_map(|key| Request::Expire { key }),
            Just(Request::PurgeDisconnected),
            (scope(), any::<u64>(), text(), any::<u32>()).prop_map(
                |(scope, op_id, reply, keep)| {
                    Request::RecordReply {
                        scope,
                        op_id,
                        reply,
                        keep,
                    }
                }
            ),
            (scope(), any::<u64>())
                .prop_map(|(scope, op_id)| Request::LookupReply { scope, op_id }),
            (scope(), proptest::option::of(any::<u64>()))
                .prop_map(|(scope, after)| Request::ListRecords { scope, after }),
            (
                proptest::collection::vec(record_spec(), 0..3),
                proptest::collection::vec((scope(), any::<u64>()), 0..3)
            )
                .prop_map(|(put, delete)| Request::WriteRecords {
                    put: put.into_iter().flatten().collect(),
                    delete,
                }),
            (scope(), any::<u64>())
                .prop_map(|(scope, op_id)| Request::DeleteRecord { scope, op_id }),
            scope().prop_map(|scope| Request::DropScope { scope }),
            (
                key(),
                proptest::collection::vec(lock_op, 0..4),
                proptest::option::of((any::<u8>(), any::<u8>())),
                proptest::option::of(text())
            )
                .prop_map(|(key, locks, seq, lock_owner)| Request::Lock {
                    key,
                    locks,
                    lock_sequence: seq.map(|(number, index)| LockSequence { number, index }),
                    lock_owner,
                }),
            (key(), range(), any::<bool>(), any::<bool>()).prop_map(
                |(key, range, write, own_protocol_advisory)| Request::CheckIo {
                    key,
                    range,
                    write,
                    own_protocol_advisory,
                }
            ),
            any::<u64>().prop_map(|check| Request::IoDone { check }),
            Just(Request::Resynced),
            any::<u64>().prop_map(|count| Request::ReplaysAnswered { count }),
            (
                lease_key(),
                lease_state(),
                proptest::option::of("[^\u{0}]{1,30}")
            )
                .prop_map(|(lease_key, state, c)| Request::LeaseBreakAck {
                    lease_key,
                    state,
                    client: c.map(|c| ClientId::new(c).expect("valid identity")),
                }),
            key().prop_map(|key| Request::BreakReadCaching { key }),
            key().prop_map(|key| Request::Wrote { key }),
            (key(), path(), any::<bool>(), record_spec()).prop_map(|(key, to, replace, record)| {
                Request::Rename {
                    key,
                    to,
                    replace,
                    record,
                }
            }),
            (key(), any::<u64>(), record_spec())
                .prop_map(|(key, size, record)| Request::SetEndOfFile { key, size, record }),
            (key(), any::<bool>(), record_spec()).prop_map(|(key, delete, record)| {
                Request::SetDeleteOnClose {
                    key,
                    delete,
                    record,
                }
            }),
            file().prop_map(|file| Request::LockHintAck { file }),
            (path(), record_spec()).prop_map(|(path, record)| Request::Remove { path, record }),
            (path(), path(), any::<bool>(), proptest::option::of(file())).prop_map(
                |(from, to, replace, expect)| Request::RenameDirectory {
                    from,
                    to,
                    replace,
                    expect
                }
            ),
            (
                proptest::option::of(file()),
                proptest::option::of(lock_cursor()),
                any::<bool>()
            )
                .prop_map(|(after, locks_after, durable_ok)| Request::Locks {
                    after,
                    locks_after,
                    durable_ok
                }),
        ]
    }

    /// Re-review rr47a F2: `Frontends`'s `durable_ok` keeps the wire as
    /// it was: unset, the request is `{"op": "frontends"}` both ways, and
    /// an older daemon's unit variant reads one with it set (ignoring it,
    /// and refusing past its bound as before).
    #[test]
    fn frontends_durable_ok_keeps_the_wire() {
        let plain = RequestFrame {
            id: 1,
            req: Request::Frontends { durable_ok: false },
        };
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({"id": 1, "op": "frontends"})
        );
        let sent_before: RequestFrame =
            serde_json::from_str(r#"{"id": 1, "op": "frontends"}"#).unwrap();
        assert_eq!(sent_before, plain);
        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "snake_case", tag = "op")]
        enum Older {
            Frontends,
        }
        let asked = serde_json::to_string(&Request::Frontends { durable_ok: true }).unwrap();
        assert!(asked.contains("durable_ok"), "{asked}");
        assert!(matches!(
            serde_json::from_str::<Older>(&asked),
            Ok(Older::Frontends)
        ));
    }

    #[test]
    fn covers_every_request() {
        // Compile-time reminder: a new variant needs a case in `request()`.
        fn _exhaustive(r: &Request) {
            match r {
                Request::Open(_)
                | Request::ReplayOpen(_)
                | Request::Resume(_)
                | Request::Close { .. }
                | Request::Detach { .. }
                | Request::Status
                | Request::Handles { .. }
                | Request::Handle { .. }
                | Request::Files { .. }
                | Request::Frontends { .. }
                | Request::Stats
                | Request::Expire { .. }
                | Request::PurgeDisconnected
                | Request::RecordReply { .. }
                | Request::LookupReply { .. }
                | Request::ListRecords { .. }
                | Request::WriteRecords { .. }
                | Request::DeleteRecord { .. }
                | Request::DropScope { .. }
                | Request::Lock { .. }
                | Request::CheckIo { .. }
                | Request::IoDone { .. }
                | Request::Resynced
                | Request::ReplaysAnswered { .. }
                | Request::LeaseBreakAck { .. }
                | Request::BreakReadCaching { .. }
                | Request::Wrote { .. }
                | Request::Rename { .. }
                | Request::SetEndOfFile { .. }
                | Request::SetDeleteOnClose { .. }
                | Request::LockHintAck { .. }
                | Request::Remove { .. }
                | Request::RenameDirectory { .. }
                | Request::Locks { .. } => {}
            }
        }
        // One name per variant above (34), none twice: with the property
        // test's check that every generated request's name is listed, a
        // variant added to `name()` but not to `NAMES` fails here.
        let mut names = Request::NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Request::NAMES.len(), "a name twice");
        assert_eq!(
            Request::NAMES.len(),
            34,
            "update NAMES with the match above"
        );
    }

    fn lock_cursor() -> impl Strategy<Value = LockCursor> {
        (range(), any::<bool>(), key(), any::<u32>()).prop_map(|(range, excl, key, nth)| {
            LockCursor {
                range,
                kind: if excl {
                    LockKind::Exclusive
                } else {
                    LockKind::Shared
                },
                key,
                nth,
            }
        })
    }

    fn lock_view() -> impl Strategy<Value = LockView> {
        (
            file(),
            key(),
            proptest::option::of(text()),
            range(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(file, key, owner, range, excl, unmirrored)| LockView {
                file,
                key,
                owner,
                range,
                kind: if excl {
                    LockKind::Exclusive
                } else {
                    LockKind::Shared
                },
                unmirrored,
            })
    }

    fn wire_error() -> impl Strategy<Value = WireError> {
        (
            prop::sample::select(vec![
                ErrorCode::BadFrame,
                ErrorCode::NotFound,
                ErrorCode::SharingViolation,
                ErrorCode::LockNotGranted,
                ErrorCode::Busy,
                ErrorCode::Retry,
                ErrorCode::Internal,
            ]),
            text(),
            proptest::option::of(lock_view()),
        )
            .prop_map(|(code, message, conflict)| WireError {
                code,
                message,
                conflict: conflict.map(Box::new),
            })
    }

    /// An `Opened` with every field drawn.
    fn opened() -> impl Strategy<Value = Opened> {
        (
            key(),
            0usize..4,
            any::<u64>(),
            file(),
            durability(),
            proptest::option::of(held_lease()),
            any::<bool>(),
        )
            .prop_map(
                |(key, action, size, file, durability, lease, locked)| Opened {
                    key,
                    create_action: [
                        CreateAction::Opened,
                        CreateAction::Created,
                        CreateAction::Overwritten,
                        CreateAction::Superseded,
                    ][action],
                    size,
                    file,
                    durability,
                    lease,
                    locked,
                },
            )
    }

    fn reply() -> impl Strategy<Value = Reply> {
        let opened = opened();
        let status = (any::<u64>(), path(), any::<bool>(), text()).prop_map(
            |(n, root, recovering, store)| StatusInfo {
                pid: 1,
                epoch: n,
                root: root.to_string(),
                state_dir: "/s".into(),
                uptime_ms: n,
                handles_connected: n,
                handles_disconnected: 0,
                handles_lost: 1,
                frontends: 2,
                recovering,
                fanotify: !recovering,
                mediation: "off".into(),
                store_detail: store.clone(),
                store,
                schema_version: 2,
                corrupt_records: recovering.then(|| vec![root.to_string()]),
                corrupt_records_total: recovering.then_some(n),
                commit_wait: None,
                lease_left_ms: recovering.then_some(n),
            },
        );
        let handle_view = || {
            (
                handle_record(),
                any::<bool>(),
                proptest::option::of((lease_state(), any::<u64>(), any::<bool>())),
            )
                .prop_map(|(record, fd_open, breaking)| HandleView {
                    record,
                    fd_open,
                    breaking: breaking.map(|(to, ms_left, waiters)| BreakView {
                        to,
                        ms_left,
                        waiters,
                    }),
                })
        };
        let file_view =
            (file(), path(), key(), durability()).prop_map(|(file, path, key, durability)| {
                FileView {
                    file,
                    path,
                    holders: vec![FileHolder {
                        key,
                        access: Access::new(Rights::READ).expect("non-empty"),
                        share: Rights::ALL,
                        durability,
                        conn: ConnState::Connected,
                    }],
                }
            });
        prop_oneof![
            opened.prop_map(Reply::Opened),
            Just(Reply::Done),
            status.prop_map(Reply::Status),
            (
                proptest::collection::vec(handle_view(), 0..3),
                proptest::option::of(key()),
                proptest::option::of(any::<(u64, u64)>())
            )
                .prop_map(|(handles, next, wait)| Reply::Handles {
                    handles,
                    next,
                    commit_wait: wait.map(|(ms, n)| CommitWait {
                        waited_ms: ms,
                        pending_for_ms: ms,
                        replies_awaiting_commit: n,
                        counts_age_ms: Some(0),
                        handles_left_out: Some(n),
                        files_left_out: Some(n / 2),
                    }),
                }),
            handle_view().prop_map(Reply::Handle),
            (
                proptest::collection::vec(file_view, 0..3),
                proptest::option::of(file()),
                proptest::option::of(key())
            )
                .prop_map(|(files, next, next_holder)| Reply::Files {
                    files,
                    next,
                    next_holder,
                    commit_wait: None,
                }),
            (name(), name(), any::<i32>(), any::<u64>()).prop_map(|(p, i, pid, n)| {
                Reply::Frontends {
                    frontends: vec![FrontendView {
                        protocol: Protocol::new(p).expect("valid name"),
                        instance: InstanceName::new(i).expect("valid name"),
                        pid,
                        uid: 0,
                        attached_ms: n,
                        handles: n,
                        attached: n % 2 == 0,
                        stored_handles: Some(n).filter(|n| n % 3 == 0),
                    }],
                    more: n % 5,
                    commit_wait: None,
                }
            }),
            any::<u64>().prop_map(|n| Reply::Stats(Stats {
                opens: n,
                bad_frames: n / 2,
                ..Stats::default()
            })),
            held_lease().prop_map(Reply::Lease),
            proptest::option::of((text(), any::<u64>())).prop_map(|r| Reply::Recorded {
                record: r.map(|(reply, recorded_ms)| ReplayRecord {
                    reply,
                    recorded_ms,
                    seq: None
                }),
            }),
            (
                proptest::collection::vec((any::<u64>(), text()), 0..3),
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(records, next)| Reply::Records { records, next }),
            (
                proptest::collection::vec(lock_view(), 0..3),
                proptest::option::of(file()),
                proptest::option::of(lock_cursor())
            )
                .prop_map(|(locks, next, next_lock)| Reply::Locks {
                    locks,
                    next,
                    next_lock,
                    commit_wait: None,
                }),
            (any::<u64>(), proptest::option::of(any::<u64>()))
                .prop_map(|(count, lost)| Reply::Purged { count, lost }),
        ]
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            key().prop_map(|key| Event::Expired { key }),
            key().prop_map(|key| Event::Purged { key }),
            (
                lease_key(),
                lease_state(),
                lease_state(),
                any::<u16>(),
                any::<bool>(),
                proptest::option::of(file())
            )
                .prop_map(
                    |(lease_key, current_state, new_state, epoch, ack_required, file)| {
                        Event::LeaseBreak {
                            lease_key,
                            current_state,
                            new_state,
                            epoch,
                            ack_required,
                            file,
                        }
                    }
                ),
            file().prop_map(|file| Event::LocksPresent { file }),
            file().prop_map(|file| Event::LocksGone { file }),
            Just(Event::ConnectionLost),
            Just(Event::SteppingDown),
        ]
    }

    fn server_frame() -> impl Strategy<Value = ServerFrame> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(features, epoch, pid)| {
                ServerFrame::Hello(HelloReply {
                    version: PROTO_VERSION,
                    features,
                    epoch,
                    pid,
                })
            }),
            (
                proptest::option::of(any::<u64>()),
                reply(),
                proptest::option::of(wire_error())
            )
                .prop_map(|(id, r, e)| ServerFrame::Reply {
                    id,
                    result: e.map_or(Ok(r), Err),
                }),
            event().prop_map(ServerFrame::Event),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn requests_roundtrip_in_both_encodings(id in any::<u64>(), req in request()) {
            prop_assert!(Request::NAMES.contains(&req.name()), "{} not in Request::NAMES", req.name());
            let frame = RequestFrame { id, req };
            for enc in [Encoding::Binary, Encoding::Json, Encoding::Compact, Encoding::CompactRecords] {
                let bytes = encode_request(enc, &frame).expect("encodes");
                prop_assert_eq!(
                    is_binary(&bytes),
                    enc == Encoding::Binary
                        || (enc == Encoding::Compact && !compact_request(&frame))
                        || (enc == Encoding::CompactRecords && !hot_request(&frame))
                );
                prop_assert_eq!(decode_request(&bytes).expect("decodes"), frame.clone());
            }
            // With records compact too, every hot request is compact, and
            // one without records is written as before, byte for byte.
            let r = encode_request(Encoding::CompactRecords, &frame).expect("encodes");
            prop_assert_eq!(r.first() == Some(&compact::MARK), hot_request(&frame));
            if compact_request(&frame) || !hot_request(&frame) {
                prop_assert_eq!(&r, &encode_request(Encoding::Compact, &frame).expect("encodes"));
            }
            // The compact layout takes exactly the hot requests; what it
            // leaves is written as binary v1, byte for byte.
            let c = encode_request(Encoding::Compact, &frame).expect("encodes");
            prop_assert_eq!(c.first() == Some(&compact::MARK), compact_request(&frame));
            if !compact_request(&frame) {
                prop_assert_eq!(&c, &encode_request(Encoding::Binary, &frame).expect("encodes"));
            }
            // The fast path takes the hot requests, and gives what the
            // general decoder gives.
            let bytes = encode_request(Encoding::Binary, &frame).expect("encodes");
            // The pre-sized encoder writes the bytes `to_vec_named` writes.
            prop_assert_eq!(
                &bytes,
                &rmp_serde::to_vec_named(&(frame.id, &frame.req)).expect("encodes")
            );
            let fast = fast_bin_request(&bytes);
            prop_assert_eq!(
                fast.is_some(),
                matches!(frame.req, Request::Open(_) | Request::ReplayOpen(_) | Request::Close { .. })
            );
            if let Some(fast) = fast {
                prop_assert_eq!(Ok(fast), bin_decode::<(u64, Request)>(&bytes));
            }
        }

        #[test]
        fn server_frames_roundtrip_in_both_encodings(frame in server_frame()) {
            for enc in [Encoding::Binary, Encoding::Json, Encoding::Compact] {
                let bytes = encode_server(enc, &frame).expect("encodes");
                prop_assert_eq!(decode_server(&bytes).expect("decodes"), frame.clone());
            }
            let hot = matches!(
                frame,
                ServerFrame::Reply { result: Ok(Reply::Opened(_) | Reply::Done), .. }
            );
            let c = encode_server(Encoding::Compact, &frame).expect("encodes");
            prop_assert_eq!(c.first() == Some(&compact::MARK), hot);
            if !hot {
                prop_assert_eq!(&c, &encode_server(Encoding::Binary, &frame).expect("encodes"));
            }
            let bytes = encode_server(Encoding::Binary, &frame).expect("encodes");
            let fast = fast_bin_reply(&bytes);
            prop_assert_eq!(
                fast.is_some(),
                matches!(
                    frame,
                    ServerFrame::Reply { result: Ok(Reply::Opened(_) | Reply::Done), .. }
                )
            );
            if let Some(fast) = fast {
                prop_assert_eq!(Ok(fast), bin_decode::<BinServerFrame>(&bytes).map(|f| f.0));
            }
        }

        /// Cutting a binary frame short, or flipping a byte of it, gives a
        /// frame or a typed BadFrame error, never a panic; cut short it is
        /// always refused.
        #[test]
        fn damaged_binary_frames_are_refused(
            id in any::<u64>(),
            req in request(),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            let bytes = encode_request(Encoding::Binary, &RequestFrame { id, req }).expect("encodes");
            let short = &bytes[..cut.index(bytes.len())];
            let (_, e) = decode_request(short).expect_err("a truncated frame is refused");
            prop_assert_eq!(e.code, ErrorCode::BadFrame);
            let mut flipped = bytes.clone();
            let at = flip.0.index(flipped.len());
            flipped[at] ^= flip.1 | 1;
            if let Err((_, e)) = decode_request(&flipped) {
                prop_assert_eq!(e.code, ErrorCode::BadFrame);
            }
            let _ = decode_server(&flipped);
            // A damaged frame the fast path takes, the general decoder
            // takes too, as the same value.
            if let Some(fast) = fast_bin_request(&flipped) {
                prop_assert_eq!(Ok(fast), bin_decode::<(u64, Request)>(&flipped));
            }
        }

        /// Every field of the compact frames round-trips (an `Opened`
        /// with every field drawn, in a reply with or without an id), and
        /// a compact frame cut short is refused; one with a byte flipped
        /// is refused as a `BadFrame` or decodes to a frame that
        /// round-trips — never a panic.
        #[test]
        fn compact_frames_roundtrip_and_damage_is_refused(
            id in any::<u64>(),
            req in request(),
            reply_id in proptest::option::of(any::<u64>()),
            opened in opened(),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            let frame = RequestFrame { id, req };
            let reply = ServerFrame::Reply { id: reply_id, result: Ok(Reply::Opened(opened)) };
            let done = ServerFrame::Reply { id: reply_id, result: Ok(Reply::Done) };
            let mut frames = vec![
                encode_server(Encoding::Compact, &reply).expect("encodes"),
                encode_server(Encoding::Compact, &done).expect("encodes"),
            ];
            prop_assert_eq!(decode_server(&frames[0]).expect("decodes"), reply);
            prop_assert_eq!(decode_server(&frames[1]).expect("decodes"), done);
            if hot_request(&frame) {
                let bytes = encode_request(Encoding::CompactRecords, &frame).expect("encodes");
                prop_assert_eq!(decode_request(&bytes).expect("decodes"), frame.clone());
                let short = &bytes[..cut.index(bytes.len())];
                let (_, e) = decode_request(short).expect_err("a truncated frame is refused");
                prop_assert_eq!(e.code, ErrorCode::BadFrame);
                let mut longer = bytes.clone();
                longer.push(0);
                let (got, e) = decode_request(&longer).expect_err("a trailing byte is refused");
                prop_assert_eq!(e.code, ErrorCode::BadFrame);
                prop_assert_eq!(got, Some(id));
                frames.push(bytes);
            }
            for bytes in frames {
                let short = &bytes[..cut.index(bytes.len())];
                prop_assert!(decode_server(short).is_err());
                let mut flipped = bytes.clone();
                let at = flip.0.index(flipped.len());
                flipped[at] ^= flip.1 | 1;
                match decode_request(&flipped) {
                    Err((_, e)) => prop_assert_eq!(e.code, ErrorCode::BadFrame),
                    Ok(f) => {
                        let again = encode_request(Encoding::CompactRecords, &f).expect("encodes");
                        prop_assert_eq!(decode_request(&again).expect("decodes"), f);
                    }
                }
                match decode_server(&flipped) {
                    Err(e) => prop_assert_eq!(e.code, ErrorCode::BadFrame),
                    Ok(f) => {
                        let again = encode_server(Encoding::Compact, &f).expect("encodes");
                        prop_assert_eq!(decode_server(&again).expect("decodes"), f);
                    }
                }
            }
        }

        #[test]
        fn arbitrary_compact_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut framed = vec![compact::MARK];
            framed.extend_from_slice(&body);
            if let Err((_, e)) = decode_request(&framed) {
                prop_assert_eq!(e.code, ErrorCode::BadFrame);
            }
            if let Err(e) = decode_server(&framed) {
                prop_assert_eq!(e.code, ErrorCode::BadFrame);
            }
        }

        #[test]
        fn arbitrary_binary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut framed = vec![0x92];
            framed.extend_from_slice(&body);
            if let Err((_, e)) = decode_request(&framed) {
                prop_assert_eq!(e.code, ErrorCode::BadFrame);
            }
            framed[0] = 0x93;
            let _ = decode_server(&framed);
        }
    }

    /// What the fast paths leave to the general decoder: a tag that is
    /// not the first key, a repeated tag, bytes after the frame, a `done`
    /// with other keys; the general decoder's verdict on them stands.
    #[test]
    fn fast_paths_leave_unusual_frames_to_the_general_decoder() {
        use rmp::encode::{write_array_len, write_bin, write_map_len, write_str, write_uint};
        let key = ResumeKey::new_random();
        // `[7, {entries}]`, each entry a string key and a string value or
        // the resume key (`None`).
        let request = |entries: &[(&str, Option<&str>)]| {
            let mut b = Vec::new();
            write_array_len(&mut b, 2).unwrap();
            write_uint(&mut b, 7).unwrap();
            write_map_len(&mut b, u32::try_from(entries.len()).unwrap()).unwrap();
            for (k, v) in entries {
                write_str(&mut b, k).unwrap();
                match v {
                    Some(v) => write_str(&mut b, v).unwrap(),
                    None => write_bin(&mut b, key.0.as_bytes()).unwrap(),
                }
            }
            b
        };
        for entries in [
            &[("key", None), ("op", Some("close"))][..],
            &[("op", Some("close")), ("key", None), ("op", Some("close"))][..],
            &[("op", Some("status"))][..],
        ] {
            let bytes = request(entries);
            assert!(fast_bin_request(&bytes).is_none(), "{entries:?}");
        }
        // The general decoder still reads a tag that is not first.
        let late_tag = request(&[("key", None), ("op", Some("close"))]);
        assert!(matches!(
            decode_request(&late_tag),
            Ok(RequestFrame {
                id: 7,
                req: Request::Close { .. }
            })
        ));
        let mut bytes = request(&[("op", Some("close")), ("key", None)]);
        assert!(fast_bin_request(&bytes).is_some());
        bytes.push(0xc0);
        assert!(fast_bin_request(&bytes).is_none());
        assert!(decode_request(&bytes).is_err(), "bytes after the frame");
        let done = |extra: bool| {
            let mut b = Vec::new();
            write_array_len(&mut b, 3).unwrap();
            write_uint(&mut b, u64::from(BIN_REPLY)).unwrap();
            write_uint(&mut b, 3).unwrap();
            write_map_len(&mut b, 1).unwrap();
            write_str(&mut b, "Ok").unwrap();
            write_map_len(&mut b, if extra { 2 } else { 1 }).unwrap();
            write_str(&mut b, "kind").unwrap();
            write_str(&mut b, "done").unwrap();
            if extra {
                write_str(&mut b, "x").unwrap();
                write_uint(&mut b, 1).unwrap();
            }
            b
        };
        assert!(fast_bin_reply(&done(false)).is_some());
        assert!(fast_bin_reply(&done(true)).is_none());
        assert_eq!(
            decode_server(&done(true)).ok(),
            bin_decode::<BinServerFrame>(&done(true)).ok().map(|f| f.0)
        );
    }

    #[test]
    fn malformed_binary_frames_are_typed_errors() {
        let status = encode_request(
            Encoding::Binary,
            &RequestFrame {
                id: 9,
                req: Request::Status,
            },
        )
        .expect("encodes");
        let mut trailing = status.clone();
        trailing.push(0xc0);
        let deep = {
            let mut v = vec![0x92, 0x05];
            v.extend(std::iter::repeat_n(0x91, 10_000));
            v.push(0xc0);
            v
        };
        let cases: Vec<(Vec<u8>, Option<u64>)> = vec![
            (vec![0x90], None),
            (vec![0x92, 0x07], Some(7)),
            (vec![0x92, 0x07, 0xc1], Some(7)),
            (
                vec![0x92, 0x07, 0x81, 0xa2, b'o', b'p', 0xa3, b'f', b'o', b'o'],
                Some(7),
            ),
            (vec![0x92, 0xff, 0x80], None),
            (vec![0x92, 0x07, 0xdb, 0xff, 0xff, 0xff, 0xff], Some(7)),
            (vec![0x92, 0x07, 0xdf, 0xff, 0xff, 0xff, 0xff], Some(7)),
            (trailing, None),
            (deep, Some(5)),
        ];
        for (bytes, want_id) in cases {
            let (id, e) = decode_request(&bytes).expect_err("refused");
            assert_eq!(e.code, ErrorCode::BadFrame, "{bytes:x?}");
            if want_id.is_some() {
                assert_eq!(id, want_id, "{bytes:x?}: {e}");
            }
        }
        assert!(decode_server(&[0x92, 0x09, 0xc0]).is_err());
        assert!(decode_server(&[0x93, 0x01, 0xc0]).is_err());
    }

    /// A JSON frame is still read on any connection, and the binary one is
    /// smaller.
    /// Whether the compact layout covers a request.
    /// Whether `f` is an open, replay open or close, compact with
    /// [`FEATURE_COMPACT_RECORDS`] whatever records it carries.
    fn hot_request(f: &RequestFrame) -> bool {
        match &f.req {
            // A replay naming its lease key has no compact form.
            Request::Open(o) | Request::ReplayOpen(o) => !o.replay_same_lease && !o.resume_only,
            Request::Close {
                delete_on_close: None,
                ..
            } => true,
            _ => false,
        }
    }

    /// The compact kinds with records ([`FEATURE_COMPACT_RECORDS`]): one
    /// hand-made frame of each decodes to what it says; a count of none,
    /// a count past the frame, a bad scope kind, a bad scope name or a
    /// truncated record is a `BadFrame` with the id.
    #[test]
    fn compact_frames_with_records() {
        let m = compact::MARK;
        // An open (kind 6), id 7, access R, client "c", path "f".
        let open = [m, 6, 7, 0, 1, 0, 0, 0, 1, b'c', 1, b'f'];
        // A session record: scope "s", op 3, reply "{}", keep 9.
        let rec = [1, 1, b's', 3, 2, b'{', b'}', 9];
        let frame = [&open[..], &[1], &rec].concat();
        let Ok(RequestFrame {
            id: 7,
            req: Request::Open(o),
        }) = decode_request(&frame)
        else {
            panic!("decodes");
        };
        assert_eq!(
            o.put,
            vec![RecordSpec {
                scope: ReplayScope::Session(crate::model::ScopeName::new("s").expect("name")),
                op_id: 3,
                reply: "{}".into(),
                keep: 9,
            }]
        );
        // A close (kind 8), key 0…, no records, one deletion of handle
        // scope 0… op 5.
        let close = [&[m, 8, 7][..], &[0; 16], &[0, 1, 0], &[0; 16], &[5]].concat();
        let Ok(RequestFrame {
            req: Request::Close { put, delete, .. },
            ..
        }) = decode_request(&close)
        else {
            panic!("decodes");
        };
        assert!(put.is_empty());
        assert_eq!(
            delete,
            vec![(ReplayScope::Handle(ResumeKey(uuid::Uuid::nil())), 5)]
        );
        let cases: Vec<Vec<u8>> = vec![
            [&open[..], &[0]].concat(),
            [&open[..], &[0xff, 0xff, 0x03], &rec].concat(),
            [&open[..], &[1, 2], &rec[1..]].concat(),
            [&open[..], &[1, 1, 0], &rec[2..]].concat(),
            [&open[..], &[1], &rec[..rec.len() - 1]].concat(),
            [&[m, 8, 7][..], &[0; 16], &[0, 0]].concat(),
            [&[m, 8, 7][..], &[0; 16], &[0, 9]].concat(),
        ];
        for bytes in cases {
            let (got, e) = decode_request(&bytes).expect_err("refused");
            assert_eq!(e.code, ErrorCode::BadFrame, "{bytes:?}");
            assert_eq!(got, Some(7), "{bytes:?}: {e}");
        }
        // Only a connection granted the feature writes them.
        let f = RequestFrame {
            id: 7,
            req: Request::Open(o),
        };
        let plain = encode_request(Encoding::Compact, &f).expect("encodes");
        assert!(is_binary(&plain));
        let with = encode_request(Encoding::CompactRecords, &f).expect("encodes");
        assert_eq!(with.get(..2), Some(&[m, 6][..]));
        assert_eq!(Encoding::from_features(FEATURES), Encoding::CompactRecords);
        assert_eq!(
            Encoding::from_features(FEATURE_BINARY_FRAMES | FEATURE_COMPACT_RECORDS),
            Encoding::Binary
        );
    }

    fn compact_request(f: &RequestFrame) -> bool {
        match &f.req {
            Request::Open(o) | Request::ReplayOpen(o) => {
                o.put.is_empty() && !o.replay_same_lease && !o.resume_only
            }
            Request::Close {
                put,
                delete,
                delete_on_close: None,
                ..
            } => put.is_empty() && delete.is_empty(),
            _ => false,
        }
    }

    /// Hand-made compact frames that are wrong in one way each: every one
    /// is a `BadFrame`, with the id when it was read.
    #[test]
    fn malformed_compact_frames_are_typed_errors() {
        let m = compact::MARK;
        // An open: id 7, flags, access R, share none, disposition open,
        // durability none, client "c", then the path.
        let open = |flags: u8, access: u8, disp: u8, path: &[u8]| {
            let mut b = vec![m, 1, 7, flags, access, 0, disp, 0, 1, b'c'];
            b.push(u8::try_from(path.len()).expect("short"));
            b.extend_from_slice(path);
            b
        };
        assert!(decode_request(&open(0, 1, 0, b"f")).is_ok());
        assert!(
            matches!(decode_request(&open(128, 1, 0, b"f")), Ok(RequestFrame { req: Request::Open(o), .. }) if o.wait_for_hints && !o.no_wait)
        );
        let cases: Vec<(Vec<u8>, Option<u64>)> = vec![
            (vec![m], None),
            (vec![m, 1], None),
            (vec![m, 9, 7], Some(7)),
            (vec![m, 3, 7, 1, 2, 3], Some(7)),
            // An id of eleven varint bytes, and one past 64 bits.
            ([&[m, 3][..], &[0xff; 10], &[1]].concat(), None),
            ([&[m, 3][..], &[0xff; 9], &[2]].concat(), None),
            // The owner flag, and the frame ends before the owner (every
            // flag bit has a meaning: 128 is `wait_for_hints`).
            (open(2, 1, 0, b"f"), Some(7)),
            (open(0, 0, 0, b"f"), Some(7)),
            (open(0, 8, 0, b"f"), Some(7)),
            (open(0, 1, 6, b"f"), Some(7)),
            (open(0, 1, 0, b"../f"), Some(7)),
            (open(0, 1, 0, b"/f"), Some(7)),
            (open(0, 1, 0, &[0xff, 0xfe]), Some(7)),
            (open(1, 1, 0, b"f"), Some(7)),
            // A path length past the frame's end.
            (
                vec![m, 1, 7, 0, 1, 0, 0, 0, 1, b'c', 0xff, 0xff, 0x03, b'f'],
                Some(7),
            ),
            // Durability 3; a durable timeout past 32 bits.
            (vec![m, 1, 7, 0, 1, 0, 0, 3, 1, b'c', 1, b'f'], Some(7)),
            (
                vec![
                    m, 1, 7, 0, 1, 0, 0, 1, 0x80, 0x80, 0x80, 0x80, 0x10, 1, b'c', 1, b'f',
                ],
                Some(7),
            ),
            ([open(0, 1, 0, b"f"), vec![0]].concat(), Some(7)),
        ];
        for (bytes, id) in cases {
            let (got, e) = decode_request(&bytes).expect_err("refused");
            assert_eq!(e.code, ErrorCode::BadFrame, "{bytes:?}");
            assert_eq!(got, id, "{bytes:?}: {e}");
        }
        for bytes in [
            vec![m, 5],
            vec![m, 5, 2],
            vec![m, 5, 0, 0],
            vec![m, 6, 0],
            vec![m, 4, 0, 4],
            // An `Opened` with lease state W without R.
            [
                &[m, 4, 0, 1][..],
                &[0; 16],
                &[0, 0, 0, 0, 0],
                &[0; 16],
                &[4, 0],
            ]
            .concat(),
        ] {
            let e = decode_server(&bytes).expect_err("refused");
            assert_eq!(e.code, ErrorCode::BadFrame, "{bytes:?}");
        }
    }

    /// The fuzz corpus's compact seeds are frames the decoders take (so
    /// the fuzzer starts inside the compact decoder, not at its refusal).
    #[test]
    fn fuzz_corpus_compact_seeds_decode() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/wire_frames");
        for (name, request) in [
            ("compact-request-open", true),
            ("compact-request-close", true),
            ("compact-reply-opened", false),
            ("compact-reply-done", false),
        ] {
            let bytes = std::fs::read(dir.join(name)).expect("seed");
            if request {
                decode_request(&bytes).unwrap_or_else(|(_, e)| panic!("{name}: {e}"));
            } else {
                decode_server(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }

    /// The features pick the encoding: compact only on top of binary.
    #[test]
    fn compact_needs_binary_frames() {
        assert_eq!(Encoding::from_features(0), Encoding::Json);
        assert_eq!(
            Encoding::from_features(FEATURE_COMPACT_FRAMES),
            Encoding::Json
        );
        assert_eq!(
            Encoding::from_features(FEATURE_BINARY_FRAMES),
            Encoding::Binary
        );
        assert_eq!(
            Encoding::from_features(FEATURE_BINARY_FRAMES | FEATURE_COMPACT_FRAMES),
            Encoding::Compact
        );
    }

    #[test]
    fn json_is_still_read_and_binary_is_smaller() {
        let frame = RequestFrame {
            id: 3,
            req: Request::Close {
                key: ResumeKey::new_random(),
                put: Vec::new(),
                delete: Vec::new(),
                delete_on_close: None,
            },
        };
        let json = encode_request(Encoding::Json, &frame).expect("encodes");
        let bin = encode_request(Encoding::Binary, &frame).expect("encodes");
        assert_eq!(decode_request(&json).expect("json"), frame);
        assert_eq!(decode_request(&bin).expect("binary"), frame);
        assert!(bin.len() < json.len(), "{} vs {}", bin.len(), json.len());
    }
}
