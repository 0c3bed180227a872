//! File commands: CREATE, CLOSE, READ, WRITE, FLUSH, QUERY_INFO, SET_INFO,
//! QUERY_DIRECTORY — and the one place filterd errors become NTSTATUS
//! values ([`status_of`]).
//!
//! **Files** are filterd handles: CREATE is a filterd open (access and
//! share mapped onto filterd's rights), READ/WRITE are pread/pwrite on the
//! descriptor filterd passes (each checked against byte-range locks with
//! `CheckIo`), rename, end-of-file and delete-on-close are filterd
//! requests, CLOSE closes the handle.
//!
//! **Directories** are not filterd handles: filterd's protocol opens
//! regular files only (its paths cannot name the export root, and its
//! open refuses anything that is not a regular file). rksmbd opens
//! directories itself, always relative to the export root's descriptor
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` — the same
//! confinement filterd applies — and lists, creates, renames and removes
//! them through descriptors, never through joined host paths.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;

use libfilter::client::ClientError;
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::locks::LockRange;
use libfilter::model::{
    Access, ClientId, CreateAction, CreateGuid, Disposition, Durability, HeldLease, LeaseRequest,
    RelPath, ResumeKey, Rights, DEFAULT_DURABLE_TIMEOUT_MS,
};
use libfilter::proto::{ErrorCode, OpenRequest};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

use crate::breaks::{self, lease_bits, lease_state, Holder};
use crate::contexts::{self, CreateContexts, LeaseV, ReconnectV2, ResponseContexts};
use crate::crypto::Dialect;
use crate::info::{self, FileFacts, Meta};
use crate::server::{
    Connection, Outcome, Reply, Request, Shared, MAX_IO, MAX_OPENS_PER_CONNECTION,
};
use crate::wire::{self, status, Command, Reader, Writer, HEADER_LEN};

/// RequestedOplockLevel: a lease (2.2.13).
const OPLOCK_LEVEL_LEASE: u8 = 0xFF;
/// How long an open waits for lease holders to acknowledge their breaks.
const BREAK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest durable timeout granted (MS-SMB2 3.3.5.9.10: at most 300 s).
const MAX_DURABLE_TIMEOUT_MS: u32 = 300_000;

/// Most entries one directory listing holds (a bigger directory is cut).
const MAX_LISTING: usize = 100_000;

// Access mask bits (MS-SMB2 2.2.13.1).
const FILE_READ_DATA: u32 = 0x1;
const FILE_WRITE_DATA: u32 = 0x2;
const FILE_APPEND_DATA: u32 = 0x4;
const FILE_EXECUTE: u32 = 0x20;
const FILE_WRITE_ATTRIBUTES: u32 = 0x100;
const DELETE: u32 = 0x1_0000;
const MAXIMUM_ALLOWED: u32 = 0x0200_0000;
const GENERIC_ALL: u32 = 0x1000_0000;
const GENERIC_EXECUTE: u32 = 0x2000_0000;
const GENERIC_WRITE: u32 = 0x4000_0000;
const GENERIC_READ: u32 = 0x8000_0000;
/// What MAXIMUM_ALLOWED and GENERIC_ALL grant.
const FILE_ALL_ACCESS: u32 = 0x001F_01FF;

// Create options.
const FILE_DIRECTORY_FILE: u32 = 0x1;
const FILE_NON_DIRECTORY_FILE: u32 = 0x40;
const FILE_DELETE_ON_CLOSE: u32 = 0x1000;

/// The one place filterd errors become NTSTATUS values.
pub fn status_of(e: &ClientError) -> u32 {
    match e.code() {
        Some(ErrorCode::NotFound) | Some(ErrorCode::NoSuchHandle) => status::OBJECT_NAME_NOT_FOUND,
        Some(ErrorCode::PathNotFound) => status::OBJECT_PATH_NOT_FOUND,
        Some(ErrorCode::Collision) => status::OBJECT_NAME_COLLISION,
        Some(ErrorCode::AccessDenied) | Some(ErrorCode::NotOwner) => status::ACCESS_DENIED,
        Some(ErrorCode::NotAFile) => status::FILE_IS_A_DIRECTORY,
        Some(ErrorCode::SharingViolation) => status::SHARING_VIOLATION,
        Some(ErrorCode::FileNotAvailable) | Some(ErrorCode::Busy) => status::FILE_NOT_AVAILABLE,
        Some(ErrorCode::DuplicateCreateGuid) => status::DUPLICATE_OBJECTID,
        Some(ErrorCode::DiskFull) => status::DISK_FULL,
        Some(ErrorCode::LockNotGranted) => status::LOCK_NOT_GRANTED,
        Some(ErrorCode::RangeNotLocked) => status::RANGE_NOT_LOCKED,
        Some(ErrorCode::LockConflict) => status::FILE_LOCK_CONFLICT,
        Some(ErrorCode::BadFrame) => status::INVALID_PARAMETER,
        Some(ErrorCode::Unsupported) => status::NOT_SUPPORTED,
        Some(ErrorCode::LimitReached) => status::INSUFFICIENT_RESOURCES,
        None if matches!(e, ClientError::Disconnected | ClientError::Timeout(_)) => {
            status::FILE_NOT_AVAILABLE
        }
        _ => status::INTERNAL_ERROR,
    }
}

/// An errno from a directory operation as an NTSTATUS.
fn errno_status(e: nix::errno::Errno) -> u32 {
    use nix::errno::Errno;
    match e {
        Errno::ENOENT => status::OBJECT_NAME_NOT_FOUND,
        Errno::ENOTDIR => status::OBJECT_PATH_NOT_FOUND,
        Errno::EEXIST => status::OBJECT_NAME_COLLISION,
        Errno::ENOTEMPTY => status::DIRECTORY_NOT_EMPTY,
        Errno::EACCES | Errno::EPERM | Errno::EROFS | Errno::EXDEV | Errno::ELOOP => {
            status::ACCESS_DENIED
        }
        Errno::ENOSPC | Errno::EDQUOT => status::DISK_FULL,
        Errno::ENAMETOOLONG => status::OBJECT_NAME_INVALID,
        _ => status::INTERNAL_ERROR,
    }
}

fn io_status(e: std::io::Error) -> u32 {
    errno_status(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))
}

/// Opens the export root (as filterd reports it) `O_PATH`: the anchor of
/// every directory operation.
pub fn open_root(attach: &libfilter::attach::Attachment) -> anyhow::Result<OwnedFd> {
    let (reply, _) = attach.client().call(libfilter::proto::Request::Status)?;
    let libfilter::proto::Reply::Status(st) = reply else {
        anyhow::bail!("filterd answered status with {reply:?}");
    };
    let fd = nix::fcntl::open(
        std::path::Path::new(&st.root),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(fd)
}

/// What an open is.
enum Kind {
    /// A filterd handle on a regular file.
    File { key: ResumeKey, file: std::fs::File },
    /// A directory, opened beneath the root by rksmbd.
    Dir {
        fd: OwnedFd,
        listing: Option<Listing>,
    },
}

/// A directory listing in progress (QUERY_DIRECTORY).
struct Listing {
    entries: Vec<(String, Meta)>,
    next: usize,
}

/// An open of this connection.
pub struct Open {
    /// Its session.
    pub session: u64,
    /// Its tree.
    pub tree: u32,
    path: Option<RelPath>,
    granted: u32,
    delete_on_close: bool,
    kind: Kind,
    /// Granted durable (or persistent): on a lost connection the filterd
    /// handle is detached, not closed, so a DH2C can resume it.
    durable: bool,
    /// The filterd lease key standing for this open's oplock, if any.
    oplock: Option<LeaseKey>,
}

/// The lease key of the oplock of open `id` (an OPLOCK_BREAK
/// acknowledgment names the open by FileId).
pub fn oplock_of(c: &Connection, req: &Request<'_>, id: u64) -> Result<LeaseKey, u32> {
    match c.opens.get(&id) {
        Some(o) if o.session == req.hdr.session_id => {
            o.oplock.ok_or(status::INVALID_OPLOCK_PROTOCOL)
        }
        _ => Err(status::FILE_CLOSED),
    }
}

impl Open {
    fn meta(&self) -> Result<Meta, u32> {
        match &self.kind {
            Kind::File { file, .. } => Meta::of(file),
            Kind::Dir { fd, .. } => Meta::of(fd),
        }
    }
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.kind {
            Kind::File { file, .. } => file.as_fd(),
            Kind::Dir { fd, .. } => fd.as_fd(),
        }
    }
    /// The path from the share root as SMB names it (`\a\b`).
    fn smb_name(&self) -> String {
        match &self.path {
            Some(p) => format!("\\{}", p.as_str().replace('/', "\\")),
            None => "\\".into(),
        }
    }
}

/// Releases an open that is going away: a file is closed in filterd; a
/// directory marked delete-on-close is removed.
pub fn release(sh: &Shared, open: &Open, connection_lost: bool) {
    match &open.kind {
        Kind::File { key, .. } if connection_lost && open.durable => {
            if let Err(e) = sh.filter.detach(*key) {
                tracing::warn!(resume_key = %key, error = %e, "detach in filterd failed");
            }
        }
        Kind::File { key, .. } => {
            if let Err(e) = sh.filter.close(*key) {
                tracing::warn!(resume_key = %key, error = %e, "close in filterd failed");
            }
        }
        Kind::Dir { .. } => {
            if let (true, Some(path)) = (open.delete_on_close, &open.path) {
                if let Ok((parent, leaf)) = parent_and_leaf(sh, path) {
                    let _ =
                        nix::unistd::unlinkat(&parent, leaf, nix::unistd::UnlinkatFlags::RemoveDir);
                }
            }
        }
    }
}

/// Runs a file command.
pub fn command(c: &mut Connection, cmd: Command, req: &Request<'_>, file: Option<u64>) -> Outcome {
    match cmd {
        Command::Create => create(c, req),
        Command::Close => close(c, req, file),
        Command::Read => read(c, req, file),
        Command::Write => write(c, req, file),
        Command::Flush => flush(c, req, file),
        Command::QueryInfo => query_info(c, req, file),
        Command::SetInfo => set_info(c, req, file),
        Command::QueryDirectory => query_directory(c, req, file),
        Command::Lock => crate::lock::lock(c, req, file),
        _ => Err(status::NOT_SUPPORTED),
    }
}

/// A client name (`a\b`, relative to the share) as a path beneath the
/// root; `None` is the share root itself.
fn parse_name(name: &str) -> Result<Option<RelPath>, u32> {
    let name = name.trim_start_matches('\\').trim_end_matches('\\');
    if name.is_empty() {
        return Ok(None);
    }
    let mut parts = Vec::new();
    for comp in name.split('\\') {
        let bad = comp.is_empty()
            || comp == "."
            || comp == ".."
            || comp.chars().any(|ch| ch < ' ' || "/:*?\"<>|".contains(ch));
        if bad {
            return Err(status::OBJECT_NAME_INVALID);
        }
        parts.push(comp);
    }
    RelPath::new(parts.join("/"))
        .map(Some)
        .map_err(|_| status::OBJECT_NAME_INVALID)
}

/// The parent directory of `path` (opened `O_PATH` beneath the root) and
/// its last component.
fn parent_and_leaf<'p>(sh: &Shared, path: &'p RelPath) -> Result<(OwnedFd, &'p str), u32> {
    let (parent, leaf) = match path.as_str().rsplit_once('/') {
        Some((p, l)) => (p, l),
        None => (".", path.as_str()),
    };
    let fd = libfilter::sys::openat2_beneath(
        sh.root.as_fd(),
        parent,
        libc_flags(OFlag::O_PATH | OFlag::O_DIRECTORY),
        0,
    )
    .map_err(|e| match e.raw_os_error() {
        Some(2) | Some(20) => status::OBJECT_PATH_NOT_FOUND,
        _ => io_status(e),
    })?;
    Ok((fd, leaf))
}

fn libc_flags(f: OFlag) -> i32 {
    f.bits()
}

/// What `path` names now (not following a final symlink), if anything.
fn lookup(sh: &Shared, path: &Option<RelPath>) -> Result<Option<Meta>, u32> {
    let Some(path) = path else {
        return Meta::of(sh.root.as_fd()).map(Some);
    };
    let (parent, leaf) = parent_and_leaf(sh, path)?;
    match nix::sys::stat::fstatat(&parent, leaf, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(Meta::from_stat(&st))),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(errno_status(e)),
    }
}

/// Opens a directory beneath the root for reading.
fn open_dir(sh: &Shared, path: &Option<RelPath>) -> Result<OwnedFd, u32> {
    let p = path.as_ref().map(RelPath::as_str).unwrap_or(".");
    libfilter::sys::openat2_beneath(
        sh.root.as_fd(),
        p,
        libc_flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY),
        0,
    )
    .map_err(io_status)
}

/// filterd rights for an SMB access mask; attribute-only opens count as
/// reads (filterd has no attribute-only access).
fn rights_of(access: u32) -> Rights {
    let any = |m: u32| access & m != 0;
    let mut r = Rights::NONE;
    if any(FILE_READ_DATA
        | FILE_EXECUTE
        | GENERIC_READ
        | GENERIC_EXECUTE
        | GENERIC_ALL
        | MAXIMUM_ALLOWED)
    {
        r = r.union(Rights::READ);
    }
    if any(FILE_WRITE_DATA | FILE_APPEND_DATA | GENERIC_WRITE | GENERIC_ALL | MAXIMUM_ALLOWED) {
        r = r.union(Rights::WRITE);
    }
    if any(DELETE | GENERIC_ALL | MAXIMUM_ALLOWED) {
        r = r.union(Rights::DELETE);
    }
    if r.is_empty() {
        Rights::READ
    } else {
        r
    }
}

/// The access mask a granted open reports (generic rights expanded).
fn granted_mask(access: u32) -> u32 {
    let mut m = access & 0x01FF_FFFF & !MAXIMUM_ALLOWED;
    if access & (MAXIMUM_ALLOWED | GENERIC_ALL) != 0 {
        m |= FILE_ALL_ACCESS;
    }
    if access & GENERIC_READ != 0 {
        m |= 0x0012_0089;
    }
    if access & GENERIC_WRITE != 0 {
        m |= 0x0012_0116;
    }
    if access & GENERIC_EXECUTE != 0 {
        m |= 0x0012_00A0;
    }
    m
}

fn disposition(d: u32) -> Result<Disposition, u32> {
    Ok(match d {
        0 => Disposition::Supersede,
        1 => Disposition::Open,
        2 => Disposition::Create,
        3 => Disposition::OpenIf,
        4 => Disposition::Overwrite,
        5 => Disposition::OverwriteIf,
        _ => return Err(status::INVALID_PARAMETER),
    })
}

/// CREATE (MS-SMB2 2.2.13, 3.3.5.9).
fn create(c: &mut Connection, req: &Request<'_>) -> Outcome {
    if c.opens.len() >= MAX_OPENS_PER_CONNECTION {
        return Err(status::INSUFFICIENT_RESOURCES);
    }
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 57 {
        return Err(status::INVALID_PARAMETER);
    }
    r.u8("security flags")?;
    let oplock = r.u8("oplock level")?;
    r.u32("impersonation")?;
    r.u64("create flags")?;
    r.u64("reserved")?;
    let access = r.u32("desired access")?;
    let _attrs = r.u32("file attributes")?;
    let share = r.u32("share access")?;
    let disp = r.u32("create disposition")?;
    let options = r.u32("create options")?;
    let name_off = r.u16("name offset")?;
    let name_len = r.u16("name length")?;
    let ctx_off = r.u32("contexts offset")?;
    let ctx_len = r.u32("contexts length")?;
    let name = wire::utf16(
        wire::buffer(req.msg, u32::from(name_off), u32::from(name_len), "name")?,
        "name",
    )?;
    let ctxs = if ctx_len == 0 {
        CreateContexts::default()
    } else {
        contexts::parse(req.msg, ctx_off, ctx_len)?
    };
    // A reconnect ignores every other field of the request but the name
    // (3.3.5.9.7, 3.3.5.9.12), including the oplock level.
    if let Some(pid) = ctxs.reconnect_v1 {
        return reconnect(c, req, Reconnect::v1(pid), ctxs.lease, &name);
    }
    if let Some(rc) = ctxs.reconnect_v2 {
        return reconnect(c, req, rc.into(), ctxs.lease, &name);
    }
    // Leases are considered only with the lease oplock level (2.2.13).
    let lease = ctxs.lease.filter(|_| oplock == OPLOCK_LEVEL_LEASE);
    let disp = disposition(disp)?;
    let path = parse_name(&name)?;
    if options & FILE_DIRECTORY_FILE != 0 && options & FILE_NON_DIRECTORY_FILE != 0 {
        return Err(status::INVALID_PARAMETER);
    }
    if options & FILE_DELETE_ON_CLOSE != 0 && access & (DELETE | GENERIC_ALL | MAXIMUM_ALLOWED) == 0
    {
        return Err(status::ACCESS_DENIED);
    }
    let session = req.hdr.session_id;
    let user = c.logged_on(req)?.user.clone().unwrap_or_default();
    let tree = req.hdr.tree_id;
    let sh = c.sh.clone();
    let existing = lookup(&sh, &path)?;
    let wants_dir = options & FILE_DIRECTORY_FILE != 0;
    let (open, action, meta) = match existing {
        Some(m) if m.is_dir => {
            if options & FILE_NON_DIRECTORY_FILE != 0 {
                return Err(status::FILE_IS_A_DIRECTORY);
            }
            match disp {
                Disposition::Open | Disposition::OpenIf => {}
                Disposition::Create => return Err(status::OBJECT_NAME_COLLISION),
                _ => return Err(status::INVALID_PARAMETER),
            }
            let fd = open_dir(&sh, &path)?;
            let meta = Meta::of(&fd)?;
            (
                dir_open(session, tree, path, access, options, fd),
                CreateAction::Opened,
                meta,
            )
        }
        None if wants_dir => {
            let Some(p) = &path else {
                return Err(status::OBJECT_NAME_NOT_FOUND);
            };
            match disp {
                Disposition::Create | Disposition::OpenIf => {}
                Disposition::Open => return Err(status::OBJECT_NAME_NOT_FOUND),
                _ => return Err(status::INVALID_PARAMETER),
            }
            let (parent, leaf) = parent_and_leaf(&sh, p)?;
            nix::sys::stat::mkdirat(&parent, leaf, Mode::from_bits_truncate(0o755))
                .map_err(errno_status)?;
            let fd = open_dir(&sh, &path)?;
            let meta = Meta::of(&fd)?;
            (
                dir_open(session, tree, path, access, options, fd),
                CreateAction::Created,
                meta,
            )
        }
        Some(_) if wants_dir => return Err(status::NOT_A_DIRECTORY),
        _ => {
            let Some(p) = path else {
                return Err(status::FILE_IS_A_DIRECTORY);
            };
            let spec = FileCreate {
                path: p,
                access,
                share,
                disp,
                options,
                session,
                tree,
                user,
                replay: req.hdr.flags & wire::FLAG_REPLAY != 0,
                oplock,
            };
            return open_file(c, spec, &ctxs, lease);
        }
    };
    let id = c.new_file_id();
    c.opens.insert(id, open);
    Ok(create_reply(action, &meta, id, id, 0, Vec::new()))
}

/// A CREATE of a regular file, decoded.
struct FileCreate {
    path: RelPath,
    access: u32,
    share: u32,
    disp: Disposition,
    options: u32,
    session: u64,
    tree: u32,
    user: String,
    replay: bool,
    oplock: u8,
}

/// The filterd client identity of an open. An open with a lease belongs
/// to the client GUID (MS-SMB2 3.3.5.9.12 checks it on reconnect); any
/// other open to the logged-on user, so that a durable open under an
/// oplock can be reconnected from a new client GUID by the same user, as
/// Windows allows.
fn client_of(c: &Connection, user: &str, leased: bool) -> Result<ClientId, u32> {
    let id = if leased {
        c.client_guid.to_string()
    } else {
        format!("smb-user:{user}")
    };
    ClientId::new(id).map_err(|_| status::INVALID_PARAMETER)
}

/// The persistent half of an SMB2 FileId for a filterd handle: the same
/// on every connection and after a reconnect (2.2.14.1).
fn persistent_id(key: ResumeKey) -> u64 {
    key.0.as_u64_pair().0
}

/// The granted lease as a response context value.
fn lease_response(asked: &LeaseV, held: Option<HeldLease>) -> LeaseV {
    LeaseV {
        key: asked.key,
        state: held.map(|l| lease_bits(l.state)).unwrap_or(0),
        v2: asked
            .v2
            .map(|(parent, _)| (parent, held.map(|l| l.epoch).unwrap_or(0))),
    }
}

/// The response contexts of a file CREATE — DH2Q when durable, the lease
/// when one was asked for — and the oplock level to report.
fn reply_contexts(
    durable: Option<(u32, bool)>,
    lease: Option<&LeaseV>,
    held: Option<HeldLease>,
) -> (Vec<u8>, u8) {
    let mut rc = ResponseContexts::new();
    if let Some((t, persistent)) = durable {
        rc.durable_v2(t, persistent);
    }
    let mut oplock = 0;
    if let Some(asked) = lease {
        rc.lease(&lease_response(asked, held));
        oplock = OPLOCK_LEVEL_LEASE;
    }
    (rc.into_bytes(), oplock)
}

/// Opens a regular file as a filterd handle, durable or persistent as
/// DH2Q asks and MS-SMB2 3.3.5.9.10 allows, with a lease if asked.
fn open_file(
    c: &mut Connection,
    f: FileCreate,
    ctxs: &CreateContexts,
    lease: Option<LeaseV>,
) -> Outcome {
    let sh = c.sh.clone();
    let smb3 = c.dialect().is_some_and(Dialect::is_smb3);
    // A lease, or an oplock as a lease under a key of rksmbd's.
    let oplock_key = match (&lease, breaks::oplock_state(f.oplock)) {
        (None, Some(_)) => Some(breaks::oplock_key()),
        _ => None,
    };
    let lease_req = match (&lease, oplock_key) {
        (Some(l), _) if l.state != 0 => Some(LeaseRequest {
            key: LeaseKey(uuid::Uuid::from_bytes_le(l.key)),
            state: lease_state(l.state),
        }),
        (None, Some(key)) => {
            breaks::oplock_state(f.oplock).map(|state| LeaseRequest { key, state })
        }
        _ => None,
    };
    let wants_h = lease_req.is_some_and(|l| l.state.contains(LeaseState::H));
    // Durable v1 (DHnQ, 3.3.5.9.6): only with a batch oplock or an H
    // lease; its create GUID is derived from the persistent FileId, which
    // is all a DHnC names.
    let v1_pid = u64::from_le_bytes(crate::ntlm::random_bytes());
    let (durability, create_guid) = match (ctxs.durable_v2, ctxs.durable_v1) {
        (Some(d), _) if smb3 => {
            let t = match d.timeout_ms {
                0 => DEFAULT_DURABLE_TIMEOUT_MS,
                t => t.min(MAX_DURABLE_TIMEOUT_MS),
            };
            if d.persistent {
                // The share is continuously available on every 3.x dialect.
                (
                    Durability::Persistent { timeout_ms: t },
                    Some(d.create_guid),
                )
            } else if wants_h {
                (Durability::Durable { timeout_ms: t }, Some(d.create_guid))
            } else {
                (Durability::None, None)
            }
        }
        (None, true) if wants_h => (
            Durability::Durable {
                timeout_ms: DEFAULT_DURABLE_TIMEOUT_MS,
            },
            Some(v1_guid(v1_pid)),
        ),
        _ => (Durability::None, None),
    };
    let req = OpenRequest {
        client: client_of(c, &f.user, lease.is_some())?,
        path: f.path.clone(),
        access: Access::new(rights_of(f.access)).map_err(|_| status::INVALID_PARAMETER)?,
        share: Rights::from_bits_truncate(u8::try_from(f.share & 7).unwrap_or(0)),
        disposition: f.disp,
        durability,
        create_guid: create_guid.map(CreateGuid),
        owner: Some(f.user),
        lease: lease_req,
        // Never block this connection's thread on a lease break: the
        // holder may be this very client, whose acknowledgment arrives on
        // this connection (see open_waiting_for_breaks).
        no_wait: true,
    };
    let replay = f.replay && create_guid.is_some();
    let h = open_waiting_for_breaks(c, req, replay).map_err(|e| status_of(&e))?;
    let key = h.info.key;
    let file = std::fs::File::from(h.fd);
    let held = h.info.lease;
    // A durable (not persistent) open stands only with H granted.
    let durable = match h.info.durability {
        Durability::Persistent { timeout_ms } => Some((timeout_ms, true)),
        Durability::Durable { timeout_ms }
            if held.is_some_and(|l| l.state.contains(LeaseState::H)) =>
        {
            Some((timeout_ms, false))
        }
        _ => None,
    };
    let v1 = durable.is_some() && ctxs.durable_v2.is_none();
    let id = c.new_file_id();
    let pid = match durable {
        Some(_) if v1 => v1_pid,
        Some(_) => persistent_id(key),
        None => id,
    };
    let oplock = oplock_key.filter(|_| held.is_some());
    match (held, &lease, oplock) {
        (Some(l), Some(asked), _) => sh.notifier.granted(
            l.key,
            c.id,
            Holder::Lease {
                v2: asked.v2.is_some(),
            },
        ),
        (Some(l), None, Some(_)) => sh.notifier.granted(
            l.key,
            c.id,
            Holder::Oplock {
                file_id: file_id_bytes(pid, id),
            },
        ),
        _ => {}
    }
    let mut delete_on_close = false;
    if f.options & FILE_DELETE_ON_CLOSE != 0 {
        if let Err(e) = sh.filter.client().set_delete_on_close(key, true, None) {
            let _ = sh.filter.close(key);
            return Err(status_of(&e));
        }
        delete_on_close = true;
    }
    let meta = Meta::of(&file)?;
    let (mut contexts, mut level) = reply_contexts(durable.filter(|_| !v1), lease.as_ref(), held);
    if v1 {
        let mut rc = ResponseContexts::new();
        rc.push(b"DHnQ", &[0; 8]);
        contexts = rc.into_bytes();
    }
    if oplock.is_some() {
        level = held.map(|l| breaks::oplock_level(l.state)).unwrap_or(0);
    }
    c.opens.insert(
        id,
        Open {
            session: f.session,
            tree: f.tree,
            path: Some(f.path),
            granted: granted_mask(f.access),
            delete_on_close,
            kind: Kind::File { key, file },
            durable: durable.is_some(),
            oplock,
        },
    );
    Ok(create_reply(
        h.info.create_action,
        &meta,
        pid,
        id,
        level,
        contexts,
    ))
}

/// The create GUID of a durable v1 open with persistent FileId `pid`.
fn v1_guid(pid: u64) -> uuid::Uuid {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&pid.to_le_bytes());
    b[8..].copy_from_slice(b"rksmbdv1");
    uuid::Uuid::from_bytes(b)
}

fn file_id_bytes(persistent: u64, volatile: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&persistent.to_le_bytes());
    b[8..].copy_from_slice(&volatile.to_le_bytes());
    b
}

/// Opens through filterd; while lease holders must first acknowledge a
/// break (filterd answers Busy and sends the breaks), keeps serving this
/// connection's requests — the acknowledgment may be among them — and
/// retries, for up to [`BREAK_WAIT`].
fn open_waiting_for_breaks(
    c: &mut Connection,
    req: OpenRequest,
    replay: bool,
) -> Result<libfilter::client::OpenedHandle, ClientError> {
    let sh = c.sh.clone();
    let deadline = std::time::Instant::now() + BREAK_WAIT;
    loop {
        let r = if replay {
            sh.filter.replay_open(req.clone())
        } else {
            sh.filter.open(req.clone())
        };
        match r {
            Err(e) if e.code() == Some(ErrorCode::Busy) && std::time::Instant::now() < deadline => {
                c.pump(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Which durable open a CREATE reconnects: DH2C names it by create GUID
/// (and FileId), DHnC by its persistent FileId alone.
#[derive(Debug, Clone, Copy)]
struct Reconnect {
    create_guid: uuid::Uuid,
    persistent_file_id: u64,
    v1: bool,
}

impl From<ReconnectV2> for Reconnect {
    fn from(rc: ReconnectV2) -> Self {
        Reconnect {
            create_guid: rc.create_guid,
            persistent_file_id: rc.persistent_file_id,
            v1: false,
        }
    }
}

impl Reconnect {
    fn v1(persistent_file_id: u64) -> Self {
        Reconnect {
            create_guid: v1_guid(persistent_file_id),
            persistent_file_id,
            v1: true,
        }
    }
}

/// DH2C / DHnC (MS-SMB2 3.3.5.9.12, 3.3.5.9.7): resumes a disconnected
/// durable or persistent filterd handle by its create GUID, for the same
/// client; the FileId and the lease key (of a lease, not an oplock) must
/// match the original open's.
fn reconnect(
    c: &mut Connection,
    req: &Request<'_>,
    rc: Reconnect,
    lease: Option<LeaseV>,
    name: &str,
) -> Outcome {
    let sh = c.sh.clone();
    let user = c.logged_on(req)?.user.clone().unwrap_or_default();
    // A leased open belongs to the client GUID, any other to the user.
    let guid = CreateGuid(rc.create_guid);
    let (by_client, by_user) = (client_of(c, &user, true)?, client_of(c, &user, false)?);
    let h = sh
        .filter
        .resume_by_guid(by_client, guid)
        .or_else(|_| sh.filter.resume_by_guid(by_user, guid))
        .map_err(|e| match e.code() {
            Some(ErrorCode::NoSuchHandle | ErrorCode::NotFound | ErrorCode::NotOwner) => {
                status::OBJECT_NAME_NOT_FOUND
            }
            _ => status_of(&e),
        })?;
    let key = h.info.key;
    let held = h.info.lease;
    let oplock = held.map(|l| l.key).filter(breaks::is_oplock_key);
    let lease_ok = match (held, &lease) {
        (Some(_), _) if oplock.is_some() => true,
        (Some(l), Some(asked)) => l.key == LeaseKey(uuid::Uuid::from_bytes_le(asked.key)),
        (Some(_), None) => false,
        (None, _) => true,
    };
    let pid_ok = rc.v1 || rc.persistent_file_id == persistent_id(key);
    let view = match sh
        .filter
        .client()
        .call(libfilter::proto::Request::Handle { key })
    {
        Ok((libfilter::proto::Reply::Handle(v), _)) => Some(v),
        _ => None,
    };
    let (Some(view), true, true) = (view, lease_ok, pid_ok) else {
        let _ = sh.filter.detach(key);
        return Err(status::OBJECT_NAME_NOT_FOUND);
    };
    let rec = view.record;
    // With a lease the name must be the open's (an oplock's is ignored).
    if oplock.is_none()
        && held.is_some()
        && parse_name(name).ok().flatten().as_ref() != Some(&rec.path)
    {
        let _ = sh.filter.detach(key);
        return Err(status::INVALID_PARAMETER);
    }
    let file = std::fs::File::from(h.fd);
    let meta = Meta::of(&file)?;
    let id = c.new_file_id();
    let pid = rc.persistent_file_id;
    // A reconnect answers with no DH2Q response context.
    let (contexts, mut level) = reply_contexts(None, lease.as_ref(), held);
    match (held, &lease, oplock) {
        (Some(l), _, Some(_)) => {
            level = breaks::oplock_level(l.state);
            sh.notifier.granted(
                l.key,
                c.id,
                Holder::Oplock {
                    file_id: file_id_bytes(pid, id),
                },
            );
        }
        (Some(l), Some(asked), None) => sh.notifier.granted(
            l.key,
            c.id,
            Holder::Lease {
                v2: asked.v2.is_some(),
            },
        ),
        _ => {}
    }
    c.opens.insert(
        id,
        Open {
            session: req.hdr.session_id,
            tree: req.hdr.tree_id,
            path: Some(rec.path),
            granted: mask_of_rights(rec.access.rights()),
            delete_on_close: rec.delete_on_close,
            kind: Kind::File { key, file },
            durable: true,
            oplock,
        },
    );
    tracing::info!(resume_key = %key, "durable handle reconnected");
    Ok(create_reply(
        CreateAction::Opened,
        &meta,
        pid,
        id,
        level,
        contexts,
    ))
}

/// An access mask for filterd rights (after a reconnect, when the original
/// SMB mask is no longer known).
fn mask_of_rights(r: Rights) -> u32 {
    let mut m = 0x0012_0080; // read attributes, read control, synchronize
    if r.contains(Rights::READ) {
        m |= 0x0012_0089;
    }
    if r.contains(Rights::WRITE) {
        m |= 0x0012_0116;
    }
    if r.contains(Rights::DELETE) {
        m |= DELETE;
    }
    m
}

/// The CREATE response (2.2.14).
fn create_reply(
    action: CreateAction,
    meta: &Meta,
    persistent: u64,
    volatile: u64,
    oplock: u8,
    contexts: Vec<u8>,
) -> Reply {
    let mut w = Writer::new();
    w.u16(89).u8(oplock).u8(0);
    w.u32(match action {
        CreateAction::Superseded => 0,
        CreateAction::Opened => 1,
        CreateAction::Created => 2,
        CreateAction::Overwritten => 3,
    });
    w.u64(meta.created)
        .u64(meta.accessed)
        .u64(meta.written)
        .u64(meta.changed);
    w.u64(meta.allocated)
        .u64(meta.size)
        .u32(meta.attributes())
        .u32(0);
    w.u64(persistent).u64(volatile);
    if contexts.is_empty() {
        w.u32(0).u32(0).u8(0);
    } else {
        // The fixed part ends 8-aligned (64 + 88), so the contexts follow.
        w.u32(wire::len32(HEADER_LEN + 88))
            .u32(wire::len32(contexts.len()));
        w.bytes(&contexts);
    }
    let mut reply = Reply::ok(w.0);
    reply.file = Some(volatile);
    reply
}
fn dir_open(
    session: u64,
    tree: u32,
    path: Option<RelPath>,
    access: u32,
    options: u32,
    fd: OwnedFd,
) -> Open {
    Open {
        session,
        tree,
        path,
        granted: granted_mask(access),
        delete_on_close: options & FILE_DELETE_ON_CLOSE != 0,
        kind: Kind::Dir { fd, listing: None },
        durable: false,
        oplock: None,
    }
}

/// The open a request names (its FileId, or the related chain's), which
/// must belong to the request's session and tree.
fn open_id(c: &Connection, req: &Request<'_>, at: usize, related: Option<u64>) -> Result<u64, u32> {
    let mut r = Reader::new(req.body);
    r.skip(at, "to file id")?;
    let persistent = r.u64("file id")?;
    let volatile = r.u64("file id")?;
    let id = if persistent == u64::MAX && volatile == u64::MAX {
        related.ok_or(status::FILE_CLOSED)?
    } else {
        volatile
    };
    match c.opens.get(&id) {
        Some(o) if o.session == req.hdr.session_id && o.tree == req.hdr.tree_id => Ok(id),
        _ => Err(status::FILE_CLOSED),
    }
}

/// The filterd handle of the regular-file open a request names, and
/// whether it is durable (or persistent).
pub fn file_of(
    c: &Connection,
    req: &Request<'_>,
    at: usize,
    related: Option<u64>,
) -> Result<(ResumeKey, bool), u32> {
    let o = get(c, open_id(c, req, at, related)?)?;
    match &o.kind {
        Kind::File { key, .. } => Ok((*key, o.durable)),
        Kind::Dir { .. } => Err(status::INVALID_PARAMETER),
    }
}

fn get(c: &Connection, id: u64) -> Result<&Open, u32> {
    c.opens.get(&id).ok_or(status::FILE_CLOSED)
}

/// CLOSE (2.2.15), with the post-query attributes flag.
fn close(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 24 {
        return Err(status::INVALID_PARAMETER);
    }
    let flags = r.u16("flags")?;
    let id = open_id(c, req, 8, related)?;
    let meta = if flags & 1 != 0 {
        get(c, id)?.meta().ok()
    } else {
        None
    };
    c.close_open(id);
    let mut w = Writer::new();
    w.u16(60).u16(flags & 1).u32(0);
    match meta {
        Some(m) => {
            w.u64(m.created)
                .u64(m.accessed)
                .u64(m.written)
                .u64(m.changed);
            w.u64(m.allocated).u64(m.size).u32(m.attributes());
        }
        None => {
            w.bytes(&[0; 52]);
        }
    }
    Ok(Reply::ok(w.0))
}

fn may(o: &Open, mask: u32) -> Result<(), u32> {
    if o.granted & mask != 0 {
        Ok(())
    } else {
        Err(status::ACCESS_DENIED)
    }
}

/// Mandatory byte-range locks: filterd decides whether this handle may
/// touch the range (rksmbd does not take lock hints, so every I/O asks).
fn check_io(sh: &Shared, key: ResumeKey, offset: u64, len: u64, write: bool) -> Result<(), u32> {
    if len == 0 {
        return Ok(());
    }
    sh.filter
        .client()
        .check_io(
            key,
            LockRange {
                offset,
                length: len,
            },
            write,
        )
        .map_err(|e| status_of(&e))
}

/// READ (2.2.19).
fn read(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 49 {
        return Err(status::INVALID_PARAMETER);
    }
    r.u8("padding")?;
    r.u8("flags")?;
    let len = r.u32("length")?;
    let offset = r.u64("offset")?;
    let id = open_id(c, req, 16, related)?;
    let o = get(c, id)?;
    let Kind::File { key, file } = &o.kind else {
        return Err(status::INVALID_DEVICE_REQUEST);
    };
    may(o, FILE_READ_DATA | FILE_EXECUTE)?;
    if len > MAX_IO {
        return Err(status::INVALID_PARAMETER);
    }
    check_io(&c.sh, *key, offset, u64::from(len), false)?;
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    let n = read_full(file, &mut buf, offset).map_err(io_status)?;
    if n == 0 && len > 0 {
        return Err(status::END_OF_FILE);
    }
    buf.truncate(n);
    let mut w = Writer::new();
    w.u16(17)
        .u8(u8::try_from(HEADER_LEN + 16).unwrap_or(80))
        .u8(0);
    w.u32(wire::len32(n)).u32(0).u32(0);
    w.bytes(&buf);
    Ok(Reply::ok(w.0))
}

/// Reads until `buf` is full or end of file.
fn read_full(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset.saturating_add(u64::try_from(done).unwrap_or(u64::MAX));
        let n = f.read_at(buf.get_mut(done..).unwrap_or(&mut []), at)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// WRITE (2.2.21).
fn write(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 49 {
        return Err(status::INVALID_PARAMETER);
    }
    let data_off = r.u16("data offset")?;
    let len = r.u32("length")?;
    let offset = r.u64("offset")?;
    let id = open_id(c, req, 16, related)?;
    let data = wire::buffer(req.msg, u32::from(data_off), len, "data")?;
    let o = get(c, id)?;
    let Kind::File { key, file } = &o.kind else {
        return Err(status::INVALID_DEVICE_REQUEST);
    };
    may(o, FILE_WRITE_DATA | FILE_APPEND_DATA)?;
    check_io(&c.sh, *key, offset, u64::from(len), true)?;
    file.write_all_at(data, offset).map_err(io_status)?;
    let mut w = Writer::new();
    w.u16(17).u16(0).u32(len).u32(0).u16(0).u16(0).u8(0);
    Ok(Reply::ok(w.0))
}

/// FLUSH (2.2.17).
fn flush(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let id = open_id(c, req, 8, related)?;
    if let Kind::File { file, .. } = &get(c, id)?.kind {
        file.sync_data().map_err(io_status)?;
    }
    Ok(Reply::ok(vec![4, 0, 0, 0]))
}

/// A QUERY_INFO / QUERY_DIRECTORY response body: StructureSize 9, the
/// offset and length of `data`.
fn output_body(data: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u16(9)
        .u16(wire::len16(HEADER_LEN + 8))
        .u32(wire::len32(data.len()));
    if data.is_empty() {
        w.u8(0);
    } else {
        w.bytes(data);
    }
    w.0
}

/// QUERY_INFO (2.2.37).
fn query_info(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 41 {
        return Err(status::INVALID_PARAMETER);
    }
    let info_type = r.u8("info type")?;
    let class = r.u8("info class")?;
    let max = usize::try_from(r.u32("output buffer length")?).unwrap_or(usize::MAX);
    let id = open_id(c, req, 24, related)?;
    let o = get(c, id)?;
    let data = match info_type {
        1 => {
            let name = o.smb_name();
            info::file_class(
                class,
                &FileFacts {
                    meta: o.meta()?,
                    delete_pending: o.delete_on_close,
                    access: o.granted,
                    name: &name,
                },
            )?
        }
        2 => info::fs_class(class, o.fd())?,
        // Security descriptors and quotas are not offered.
        _ => return Err(status::NOT_SUPPORTED),
    };
    if data.len() > max {
        if info::is_variable(info_type, class) {
            let cut = data.get(..max).unwrap_or(&[]);
            return Ok(Reply::with_status(
                status::BUFFER_OVERFLOW,
                output_body(cut),
            ));
        }
        return Err(status::INFO_LENGTH_MISMATCH);
    }
    Ok(Reply::ok(output_body(&data)))
}

/// SET_INFO (2.2.39): end of file, rename, disposition, basic info.
fn set_info(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 33 {
        return Err(status::INVALID_PARAMETER);
    }
    let info_type = r.u8("info type")?;
    let class = r.u8("info class")?;
    let len = r.u32("buffer length")?;
    let off = r.u16("buffer offset")?;
    let id = open_id(c, req, 16, related)?;
    let buf = wire::buffer(req.msg, u32::from(off), len, "buffer")?;
    if info_type != 1 {
        return Err(status::NOT_SUPPORTED);
    }
    let sh = c.sh.clone();
    let mut b = Reader::new(buf);
    match class {
        // FileBasicInformation: times (creation and attributes are not kept).
        4 => {
            let o = get(c, id)?;
            may(o, FILE_WRITE_ATTRIBUTES)?;
            b.u64("creation")?;
            let atime = b.u64("access time")?;
            let mtime = b.u64("write time")?;
            set_times(o.fd(), atime, mtime)?;
        }
        // FileRenameInformation (MS-FSCC 2.4.37.2).
        10 => {
            let replace = b.u8("replace")? != 0;
            b.skip(7, "reserved")?;
            b.u64("root directory")?;
            let n = b.u32("name length")?;
            let name = wire::utf16(
                b.bytes(usize::try_from(n).unwrap_or(usize::MAX), "name")?,
                "name",
            )?;
            let Some(to) = parse_name(&name)? else {
                return Err(status::OBJECT_NAME_INVALID);
            };
            rename(c, id, to, replace)?;
        }
        // FileDispositionInformation.
        13 => {
            let delete = b.u8("delete pending")? != 0;
            let o = get(c, id)?;
            may(o, DELETE)?;
            match &o.kind {
                Kind::File { key, .. } => sh
                    .filter
                    .client()
                    .set_delete_on_close(*key, delete, None)
                    .map_err(|e| status_of(&e))?,
                Kind::Dir { fd, .. } => {
                    if o.path.is_none() {
                        return Err(status::ACCESS_DENIED);
                    }
                    if delete && !dir_is_empty(fd)? {
                        return Err(status::DIRECTORY_NOT_EMPTY);
                    }
                }
            }
            if let Some(o) = c.opens.get_mut(&id) {
                o.delete_on_close = delete;
            }
        }
        // FileAllocationInformation: accepted, nothing to do.
        19 => {}
        // FileEndOfFileInformation.
        20 => {
            let size = b.u64("end of file")?;
            let o = get(c, id)?;
            let Kind::File { key, .. } = &o.kind else {
                return Err(status::INVALID_PARAMETER);
            };
            sh.filter
                .client()
                .set_end_of_file(*key, size, None)
                .map_err(|e| status_of(&e))?;
        }
        _ => return Err(status::INVALID_INFO_CLASS),
    }
    Ok(Reply::ok(vec![2, 0]))
}

/// Sets access and write times; 0 and -1 leave a time unchanged.
fn set_times(fd: std::os::fd::BorrowedFd<'_>, atime: u64, mtime: u64) -> Result<(), u32> {
    use nix::sys::time::TimeSpec;
    let spec = |t: u64| -> TimeSpec {
        if t == 0 || t == u64::MAX || t < 116_444_736_000_000_000 {
            return TimeSpec::UTIME_OMIT;
        }
        let unix = t - 116_444_736_000_000_000;
        let secs = i64::try_from(unix / 10_000_000).unwrap_or(i64::MAX);
        let nsecs = i64::try_from((unix % 10_000_000) * 100).unwrap_or(0);
        TimeSpec::new(secs, nsecs)
    };
    nix::sys::stat::futimens(fd, &spec(atime), &spec(mtime)).map_err(errno_status)
}

fn rename(c: &mut Connection, id: u64, to: RelPath, replace: bool) -> Result<(), u32> {
    let sh = c.sh.clone();
    let o = get(c, id)?;
    may(o, DELETE)?;
    match &o.kind {
        Kind::File { key, .. } => {
            sh.filter
                .client()
                .rename(*key, to.clone(), replace, None)
                .map_err(|e| status_of(&e))?;
        }
        Kind::Dir { .. } => {
            let Some(from) = &o.path else {
                return Err(status::ACCESS_DENIED);
            };
            let (from_dir, from_leaf) = parent_and_leaf(&sh, from)?;
            let (to_dir, to_leaf) = parent_and_leaf(&sh, &to)?;
            let flags = if replace {
                nix::fcntl::RenameFlags::empty()
            } else {
                nix::fcntl::RenameFlags::RENAME_NOREPLACE
            };
            nix::fcntl::renameat2(&from_dir, from_leaf, &to_dir, to_leaf, flags)
                .map_err(errno_status)?;
        }
    }
    if let Some(o) = c.opens.get_mut(&id) {
        o.path = Some(to);
    }
    Ok(())
}

/// Reads a directory through a fresh descriptor of it (so every listing
/// starts at the beginning): names and metadata, `.` and `..` first
/// (both reported with the directory's own metadata, so nothing above the
/// export root is ever looked at).
fn read_dir(dir: &OwnedFd) -> Result<Vec<(String, Meta)>, u32> {
    let own = Meta::of(dir)?;
    let fd = libfilter::sys::openat2_beneath(
        dir.as_fd(),
        ".",
        libc_flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY),
        0,
    )
    .map_err(io_status)?;
    let mut d = nix::dir::Dir::from_fd(fd).map_err(errno_status)?;
    let mut out = vec![(".".to_owned(), own), ("..".to_owned(), own)];
    for entry in d.iter() {
        let Ok(entry) = entry else { continue };
        let Ok(name) = entry.file_name().to_str() else {
            continue; // names that are not UTF-8 cannot be shown to SMB
        };
        if name == "." || name == ".." {
            continue;
        }
        if let Ok(st) = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            out.push((name.to_owned(), Meta::from_stat(&st)));
        }
        if out.len() >= MAX_LISTING {
            break;
        }
    }
    Ok(out)
}

fn dir_is_empty(dir: &OwnedFd) -> Result<bool, u32> {
    Ok(read_dir(dir)?.len() <= 2)
}

/// Windows wildcard match, case-insensitive: `*`, `?`, and the DOS forms
/// `<` `>` `"` taken as `*`, `?`, `.`. Greedy with one backtrack point,
/// so any pattern costs at most pattern × name steps.
fn matches(pattern: &str, name: &str) -> bool {
    let fold = |c: char| c.to_lowercase().next().unwrap_or(c);
    let p: Vec<char> = pattern
        .chars()
        .map(|c| match c {
            '<' => '*',
            '>' => '?',
            '"' => '.',
            c => fold(c),
        })
        .collect();
    let n: Vec<char> = name.chars().map(fold).collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match (p.get(pi), n.get(ni)) {
            (Some('*'), _) => {
                star = Some((pi, ni));
                pi += 1;
            }
            (Some(a), Some(b)) if *a == '?' || a == b => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or(&[]).iter().all(|c| *c == '*')
}

/// QUERY_DIRECTORY (2.2.33).
fn query_directory(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 33 {
        return Err(status::INVALID_PARAMETER);
    }
    let class = r.u8("info class")?;
    let flags = r.u8("flags")?;
    r.u32("file index")?;
    let id = open_id(c, req, 8, related)?;
    r.skip(16, "file id")?;
    let name_off = r.u16("name offset")?;
    let name_len = r.u16("name length")?;
    let max = usize::try_from(r.u32("output length")?)
        .unwrap_or(0)
        .min(MAX_IO as usize);
    let pattern = wire::utf16(
        wire::buffer(req.msg, u32::from(name_off), u32::from(name_len), "pattern")?,
        "pattern",
    )?;
    let fixed = info::dir_class_fixed(class).ok_or(status::INVALID_INFO_CLASS)?;
    let o = c.opens.get_mut(&id).ok_or(status::FILE_CLOSED)?;
    let Kind::Dir { fd, listing } = &mut o.kind else {
        return Err(status::INVALID_PARAMETER);
    };
    let restart = flags & (0x01 | 0x10) != 0;
    let first = listing.is_none() || restart;
    if first {
        let pattern = if pattern.is_empty() { "*" } else { &pattern };
        let entries = read_dir(fd)?
            .into_iter()
            .filter(|(n, _)| matches(pattern, n))
            .collect();
        *listing = Some(Listing { entries, next: 0 });
    }
    let Some(l) = listing.as_mut() else {
        return Err(status::INTERNAL_ERROR);
    };
    let single = flags & 0x02 != 0;
    let mut out = Writer::new();
    let mut last_at: Option<usize> = None;
    while let Some((name, meta)) = l.entries.get(l.next) {
        let entry = info::dir_entry(class, name, meta);
        let start = (out.len() + 7) & !7;
        if start + entry.len() > max {
            if last_at.is_none() {
                return Err(status::BUFFER_OVERFLOW);
            }
            break;
        }
        out.align(8);
        if let Some(prev) = last_at {
            out.put_u32(prev, wire::len32(start - prev));
        }
        last_at = Some(start);
        out.bytes(&entry);
        l.next += 1;
        if single {
            break;
        }
    }
    let _ = fixed;
    if last_at.is_none() {
        return Err(if first && l.entries.is_empty() {
            status::NO_SUCH_FILE
        } else {
            status::NO_MORE_FILES
        });
    }
    Ok(Reply::ok(output_body(&out.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_paths_beneath_the_share() {
        assert_eq!(parse_name(""), Ok(None));
        assert_eq!(parse_name("\\"), Ok(None));
        assert_eq!(parse_name("a\\b.txt").unwrap().unwrap().as_str(), "a/b.txt");
        for bad in ["..", "a\\..\\b", "a\\\\b", "a/b", "x:stream", "*", "a\u{1}"] {
            assert_eq!(parse_name(bad), Err(status::OBJECT_NAME_INVALID), "{bad:?}");
        }
    }

    #[test]
    fn wildcards() {
        assert!(matches("*", "anything"));
        assert!(matches("*.TXT", "a.txt"));
        assert!(matches("a?c", "abc"));
        assert!(!matches("a?c", "ac"));
        assert!(matches("File.Txt", "file.txt"));
        assert!(!matches("file", "file.txt"));
        assert!(matches("<.txt", "x.txt"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
        // No exponential backtracking.
        let long = "a".repeat(255);
        assert!(!matches(&format!("{}b", "*a".repeat(100)), &long));
    }

    #[test]
    fn access_maps_onto_filterd_rights() {
        assert_eq!(rights_of(FILE_READ_DATA), Rights::READ);
        assert_eq!(rights_of(0x80), Rights::READ); // attributes only
        assert_eq!(rights_of(DELETE), Rights::DELETE);
        assert_eq!(rights_of(GENERIC_ALL), Rights::ALL);
        assert_eq!(
            rights_of(FILE_APPEND_DATA | FILE_READ_DATA),
            Rights::READ.union(Rights::WRITE)
        );
    }
}
