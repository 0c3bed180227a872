//! CHANGE_NOTIFY (MS-SMB2 2.2.35, 2.2.36, 3.3.5.19): a request on a
//! directory open that goes async and is answered with the first changes
//! in that directory (FILE_NOTIFY_INFORMATION, MS-FSCC 2.7.1), or ends with
//! STATUS_CANCELLED (CANCEL) or STATUS_NOTIFY_CLEANUP (the directory's
//! open is closed).
//!
//! Changes are seen through inotify on the directory itself (one inotify
//! instance per connection, created with its first CHANGE_NOTIFY, polled
//! by the connection thread beside its socket): they are the export
//! root's, so changes made through filterd by any frontend, and by local
//! processes, all show. Not done: SMB2_WATCH_TREE (only the directory
//! itself is watched, not its subdirectories), and changes between two
//! CHANGE_NOTIFY requests of an open are not kept (Windows buffers them
//! per open once the first request came).

use std::os::fd::{AsFd, AsRawFd};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};

use crate::files::Kind;
use crate::server::{AsyncHead, Connection, Outcome, Reply, Request};
use crate::wire::{self, status, Reader, Writer, HEADER_LEN};

/// Most CHANGE_NOTIFY requests one connection may have waiting.
const MAX_WAITING: usize = 1024;

/// Completion filter bits (2.2.35).
const FILE_NOTIFY_CHANGE_FILE_NAME: u32 = 0x1;
const FILE_NOTIFY_CHANGE_DIR_NAME: u32 = 0x2;
const FILE_NOTIFY_CHANGE_ATTRIBUTES: u32 = 0x4;
const FILE_NOTIFY_CHANGE_SIZE: u32 = 0x8;
const FILE_NOTIFY_CHANGE_LAST_WRITE: u32 = 0x10;
const FILE_NOTIFY_CHANGE_LAST_ACCESS: u32 = 0x20;
const FILE_NOTIFY_CHANGE_CREATION: u32 = 0x40;
const FILE_NOTIFY_CHANGE_EA: u32 = 0x80;
const FILE_NOTIFY_CHANGE_SECURITY: u32 = 0x100;

/// FILE_NOTIFY_INFORMATION actions (MS-FSCC 2.7.1).
const FILE_ACTION_ADDED: u32 = 1;
const FILE_ACTION_REMOVED: u32 = 2;
const FILE_ACTION_MODIFIED: u32 = 3;
const FILE_ACTION_RENAMED_OLD_NAME: u32 = 4;
const FILE_ACTION_RENAMED_NEW_NAME: u32 = 5;

/// A CHANGE_NOTIFY answered STATUS_PENDING.
struct Waiting {
    head: AsyncHead,
    open: u64,
    wd: WatchDescriptor,
    filter: u32,
    max_output: usize,
}

/// A connection's waiting CHANGE_NOTIFY requests and its inotify
/// instance.
#[derive(Default)]
pub struct Watches {
    inotify: Option<Inotify>,
    list: Vec<Waiting>,
}

impl Watches {
    /// The inotify descriptor to poll while requests wait.
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self.list.is_empty() {
            true => None,
            false => self.inotify.as_ref().map(|i| i.as_fd()),
        }
    }

    /// Nobody is left to answer (lost connection).
    pub fn clear(&mut self) {
        self.list.clear();
        self.inotify = None;
    }
}

/// CHANGE_NOTIFY (3.3.5.19): on a directory open only; goes async.
pub fn change_notify(c: &mut Connection, req: &Request<'_>, related: Option<u64>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 32 {
        return Err(status::INVALID_PARAMETER);
    }
    let _flags = r.u16("flags")?;
    let max_output = r.u32("output buffer length")?;
    let id = crate::files::open_id(c, req, 8, related)?;
    r.skip(16, "file id")?;
    let filter = r.u32("completion filter")?;
    if max_output > crate::server::MAX_IO {
        return Err(status::INVALID_PARAMETER);
    }
    let fd = match c.opens.get(&id).map(|o| &o.kind) {
        Some(Kind::Dir { fd, .. }) => fd.as_raw_fd(),
        Some(Kind::File { .. }) => return Err(status::INVALID_PARAMETER),
        None => return Err(status::FILE_CLOSED),
    };
    // Only the last request of a PDU goes async (3.3.4.2).
    if req.hdr.next_command != 0 || c.notify.list.len() >= MAX_WAITING {
        return Err(status::INSUFFICIENT_RESOURCES);
    }
    if c.notify.inotify.is_none() {
        c.notify.inotify = Some(
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
                .map_err(|_| status::INSUFFICIENT_RESOURCES)?,
        );
    }
    let Some(inotify) = &c.notify.inotify else {
        return Err(status::INSUFFICIENT_RESOURCES);
    };
    // The open's own descriptor names the directory, whatever renames
    // happened since it was opened.
    let wd = inotify
        .add_watch(format!("/proc/self/fd/{fd}").as_str(), mask())
        .map_err(|_| status::INSUFFICIENT_RESOURCES)?;
    let head = c.go_async(&req.hdr);
    c.notify.list.push(Waiting {
        head,
        open: id,
        wd,
        filter,
        max_output: usize::try_from(max_output).unwrap_or(0),
    });
    Ok(Reply::with_status(
        status::PENDING,
        crate::server::error_body(),
    ))
}

/// Everything rksmbd maps onto completion filters.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_ONLYDIR
}

/// The action an inotify event is for a completion filter, if any.
fn action(ev: &InotifyEvent, filter: u32) -> Option<u32> {
    let m = ev.mask;
    let names = match m.contains(AddWatchFlags::IN_ISDIR) {
        true => FILE_NOTIFY_CHANGE_DIR_NAME,
        false => FILE_NOTIFY_CHANGE_FILE_NAME,
    };
    let attrs = FILE_NOTIFY_CHANGE_ATTRIBUTES
        | FILE_NOTIFY_CHANGE_LAST_ACCESS
        | FILE_NOTIFY_CHANGE_CREATION
        | FILE_NOTIFY_CHANGE_EA
        | FILE_NOTIFY_CHANGE_SECURITY;
    let writes = FILE_NOTIFY_CHANGE_SIZE | FILE_NOTIFY_CHANGE_LAST_WRITE;
    let (action, wanted) = if m.contains(AddWatchFlags::IN_CREATE) {
        (FILE_ACTION_ADDED, names)
    } else if m.contains(AddWatchFlags::IN_DELETE) {
        (FILE_ACTION_REMOVED, names)
    } else if m.contains(AddWatchFlags::IN_MOVED_FROM) {
        (FILE_ACTION_RENAMED_OLD_NAME, names)
    } else if m.contains(AddWatchFlags::IN_MOVED_TO) {
        (FILE_ACTION_RENAMED_NEW_NAME, names)
    } else if m.contains(AddWatchFlags::IN_MODIFY) {
        (FILE_ACTION_MODIFIED, writes)
    } else if m.contains(AddWatchFlags::IN_ATTRIB) {
        (FILE_ACTION_MODIFIED, attrs)
    } else {
        return None;
    };
    (filter & wanted != 0).then_some(action)
}

/// The connection's inotify descriptor is readable: the waiting requests
/// whose directory changed as their filter asks are answered.
pub fn deliver(c: &mut Connection) {
    let Some(inotify) = &c.notify.inotify else {
        return;
    };
    let mut events = Vec::new();
    while let Ok(mut batch) = inotify.read_events() {
        if batch.is_empty() {
            break;
        }
        events.append(&mut batch);
    }
    let overflow = events
        .iter()
        .any(|e| e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW));
    let mut done = Vec::new();
    for (i, w) in c.notify.list.iter().enumerate() {
        let changes: Vec<(u32, String)> = events
            .iter()
            .filter(|e| e.wd == w.wd)
            .filter_map(|e| {
                let name = e.name.as_ref()?.to_str()?.to_owned();
                Some((action(e, w.filter)?, name))
            })
            .collect();
        if changes.is_empty() && !overflow {
            continue;
        }
        let body = match overflow {
            true => None,
            false => response(&changes, w.max_output),
        };
        done.push((i, body));
    }
    for (i, body) in done.into_iter().rev() {
        let w = c.notify.list.remove(i);
        finish(c, w, body);
    }
}

/// Answers a waiting request with its changes, or with
/// STATUS_NOTIFY_ENUM_DIR when they do not fit (or were lost): the client
/// then lists the directory itself.
fn finish(c: &mut Connection, w: Waiting, body: Option<Vec<u8>>) {
    match body {
        Some(b) => c.finish_async(&w.head, status::SUCCESS, &b),
        None => c.finish_async(&w.head, status::NOTIFY_ENUM_DIR, &[]),
    }
    unwatch(c, &w.wd);
}

/// Drops the inotify watch no waiting request uses any more.
fn unwatch(c: &mut Connection, wd: &WatchDescriptor) {
    if c.notify.list.iter().any(|w| w.wd == *wd) {
        return;
    }
    if let Some(i) = &c.notify.inotify {
        let _ = i.rm_watch(*wd);
    }
}

/// The CHANGE_NOTIFY response (2.2.36) carrying FILE_NOTIFY_INFORMATION
/// entries, or none when they exceed `max_output`.
fn response(changes: &[(u32, String)], max_output: usize) -> Option<Vec<u8>> {
    let mut entries = Writer::new();
    let mut last_at = None;
    for (action, name) in changes {
        entries.align(4);
        let at = entries.len();
        if let Some(prev) = last_at {
            entries.put_u32(prev, wire::len32(at - prev));
        }
        let name = wire::to_utf16(name);
        entries
            .u32(0)
            .u32(*action)
            .u32(wire::len32(name.len()))
            .bytes(&name);
        last_at = Some(at);
    }
    if entries.len() > max_output {
        return None;
    }
    let mut w = Writer::new();
    w.u16(9)
        .u16(wire::len16(HEADER_LEN + 8))
        .u32(wire::len32(entries.len()))
        .bytes(&entries.0);
    Some(w.0)
}

/// CANCEL (3.3.5.16) of a waiting CHANGE_NOTIFY, named by AsyncId or
/// MessageId: it ends with STATUS_CANCELLED.
pub fn cancel(c: &mut Connection, req: &Request<'_>) {
    let hdr = &req.hdr;
    let origin = c.origin();
    let hit = c
        .notify
        .list
        .iter()
        .position(|w| w.head.cancelled_by(hdr, origin));
    if let Some(i) = hit {
        let w = c.notify.list.remove(i);
        c.finish_async(&w.head, status::CANCELLED, &[]);
        unwatch(c, &w.wd);
    }
}

/// Open `open` is being closed: its waiting requests end with
/// STATUS_NOTIFY_CLEANUP (3.3.5.19 via the object store's cleanup).
pub fn open_closing(c: &mut Connection, open: u64) {
    while let Some(i) = c.notify.list.iter().position(|w| w.open == open) {
        let w = c.notify.list.remove(i);
        c.finish_async(&w.head, status::NOTIFY_CLEANUP, &[]);
        unwatch(c, &w.wd);
    }
}
