//! Local access mediation through fanotify (invariant 7).
//!
//! filterd marks only the export root's own mount for `FAN_OPEN_PERM`; it
//! refuses to start with fanotify when the root is not a mount point (a
//! bind mount of itself will do), so it never gates opens outside the
//! export. Each open by a local process (never filterd's own) is decided by
//! the engine, which owns the state: a protocol open whose share mode does
//! not let others read refuses it (`EACCES`); conflicting caching leases are
//! broken first (W, and H when the open would conflict), the local open
//! waiting for the holder's ack or the break timeout. A file without
//! protocol state gets an ignore mark (surviving modification), so later
//! opens of it never reach filterd; the engine removes it when state appears.
//!
//! A local open counts as read access sharing everything: `FAN_OPEN_PERM`
//! does not tell a read open from a write open (the open flags are not in the
//! event), so writes by local processes are not told apart.
//!
//! Every permission event lives in an [`Answer`] guard whose `Drop` allows
//! it, so no path — error, timeout, panic, shutdown — leaves a process
//! blocked; and the wait for the engine's verdict is bounded (a watchdog
//! answers ALLOW past it).

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MarkFlags, MaskFlags,
    Response,
};

use crate::conn::EngineTx;
use crate::engine::Command;

/// The engine's answer to a local open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it proceed.
    Allow,
    /// Refuse it with EACCES.
    Deny,
}

/// Counters for `filterctl stats`, shared with the engine.
#[derive(Default)]
pub struct LocalCounters {
    /// Local opens allowed.
    pub allowed: AtomicU64,
    /// Local opens denied by a share mode.
    pub denied: AtomicU64,
    /// Local opens answered by the watchdog.
    pub watchdog: AtomicU64,
}

/// Checks that `root` is a mount point and sets up the fanotify group on its
/// mount. Fails with a message telling the user what to do otherwise.
pub fn setup(root: &Path) -> anyhow::Result<Arc<Fanotify>> {
    check_mount_point(root)?;
    let dir = std::fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
    let fan = Fanotify::init(
        InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC,
        EventFFlags::O_RDONLY | EventFFlags::O_CLOEXEC | EventFFlags::O_LARGEFILE,
    )
    .context("fanotify_init (needs CAP_SYS_ADMIN; run with --no-fanotify otherwise)")?;
    fan.mark(
        MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_MOUNT,
        MaskFlags::FAN_OPEN_PERM,
        dir.as_fd(),
        None::<&Path>,
    )
    .context("marking the export root's mount")?;
    Ok(Arc::new(fan))
}

/// Refuses an export root that is not a mount point: marking its mount
/// would gate opens on a whole filesystem that is not the export.
pub fn check_mount_point(root: &Path) -> anyhow::Result<()> {
    let dir = std::fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
    let parent = root.parent().unwrap_or(root);
    let pdir =
        std::fs::File::open(parent).with_context(|| format!("opening {}", parent.display()))?;
    let (mine, theirs) = (
        libfilter::sys::mount_id_of(dir.as_fd())?,
        libfilter::sys::mount_id_of(pdir.as_fd())?,
    );
    if mine == theirs && root != parent {
        bail!(
            "export root {} is not a mount point: fanotify would gate opens on its whole filesystem. \
             Bind-mount it onto itself (mount --bind {0} {0}) or run with --no-fanotify",
            root.display()
        );
    }
    Ok(())
}

/// Adds an ignore mark for opens of the file `fd` refers to.
pub fn ignore(fan: &Fanotify, fd: &OwnedFd) {
    let _ = fan.mark(
        MarkFlags::FAN_MARK_ADD
            | MarkFlags::FAN_MARK_IGNORED_MASK
            | MarkFlags::FAN_MARK_IGNORED_SURV_MODIFY,
        MaskFlags::FAN_OPEN_PERM,
        fd.as_fd(),
        None::<&Path>,
    );
}

/// Removes the ignore mark of the file `fd` refers to (protocol state appeared).
pub fn unignore(fan: &Fanotify, fd: std::os::fd::BorrowedFd<'_>) {
    let _ = fan.mark(
        MarkFlags::FAN_MARK_REMOVE | MarkFlags::FAN_MARK_IGNORED_MASK,
        MaskFlags::FAN_OPEN_PERM,
        fd,
        None::<&Path>,
    );
}

/// A permission event that must be answered: ALLOW unless told otherwise,
/// on every path (the `Drop`).
struct Answer {
    fan: Arc<Fanotify>,
    event: FanotifyEvent,
    response: Response,
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(fd) = self.event.fd() {
            if let Err(e) = self
                .fan
                .write_response(FanotifyResponse::new(fd, self.response))
            {
                tracing::error!(error = %e, "could not answer a fanotify permission event");
            }
        }
    }
}

/// What the answerer thread hears about.
pub enum AnswerMsg {
    /// An event waiting for its verdict.
    Pending(u64, Box<AnswerSlot>),
    /// The engine's verdict on event `id`.
    Verdict(u64, Verdict),
}

/// An event being decided, with its deadline.
pub struct AnswerSlot {
    answer: Answer,
    deadline: std::time::Instant,
}

/// Reads permission events forever. filterd's own opens are allowed at
/// once; each local open is handed to the engine, and the answerer thread
/// writes the verdict (or ALLOW past `bound`), so this loop never waits on
/// the engine — which may itself be opening a file on the marked mount.
pub fn run(fan: Arc<Fanotify>, engine: EngineTx, counters: Arc<LocalCounters>, bound: Duration) {
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    let (tx, rx) = crossbeam_channel::unbounded::<AnswerMsg>();
    {
        let counters = counters.clone();
        let spawned = std::thread::Builder::new()
            .name("fanotify-answer".into())
            .spawn(move || answerer(rx, counters));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the fanotify answerer; local mediation off");
            return;
        }
    }
    let mut next_id = 0u64;
    loop {
        let events = match fan.read_events() {
            Ok(ev) => ev,
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => {
                tracing::error!(error = %e, "fanotify read failed; local mediation stops");
                return;
            }
        };
        for event in events {
            let ans = Answer {
                fan: fan.clone(),
                event,
                response: Response::FAN_ALLOW,
            };
            if ans.event.pid() == me || !ans.event.mask().contains(MaskFlags::FAN_OPEN_PERM) {
                continue; // our own opens: allowed by the guard at once
            }
            let Some(fd) = ans.event.fd() else { continue };
            let Ok(st) = nix::sys::stat::fstat(fd) else {
                continue;
            };
            let file = libfilter::model::FileId {
                dev: st.st_dev,
                ino: st.st_ino,
            };
            let Ok(dup) = fd.try_clone_to_owned() else {
                continue;
            };
            let pid = ans.event.pid();
            next_id += 1;
            let id = next_id;
            let slot = AnswerSlot {
                answer: ans,
                deadline: std::time::Instant::now() + bound,
            };
            // Registered before the engine can possibly answer.
            if tx.send(AnswerMsg::Pending(id, Box::new(slot))).is_err() {
                return;
            }
            let cmd = Command::LocalOpen {
                file,
                pid,
                fd: dup,
                id,
                reply: tx.clone(),
            };
            if engine.send(cmd).is_err() {
                return; // engine gone: the answerer's guards allow
            }
        }
    }
}

/// Holds every undecided event; answers each with the engine's verdict, or
/// ALLOW when its deadline passes (the watchdog), or when it stops.
fn answerer(rx: crossbeam_channel::Receiver<AnswerMsg>, counters: Arc<LocalCounters>) {
    let mut pending: std::collections::HashMap<u64, Box<AnswerSlot>> = Default::default();
    loop {
        let now = std::time::Instant::now();
        let wait = pending
            .values()
            .map(|s| s.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1));
        match rx.recv_timeout(wait) {
            Ok(AnswerMsg::Pending(id, slot)) => {
                pending.insert(id, slot);
            }
            Ok(AnswerMsg::Verdict(id, v)) => {
                if let Some(mut slot) = pending.remove(&id) {
                    match v {
                        Verdict::Deny => {
                            counters.denied.fetch_add(1, Ordering::Relaxed);
                            slot.answer.response = Response::FAN_DENY;
                        }
                        Verdict::Allow => {
                            counters.allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Dropping the slot writes the answer.
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        let now = std::time::Instant::now();
        let late: Vec<u64> = pending
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for id in late {
            counters.watchdog.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event = id, "local open not decided in time: allowed");
            pending.remove(&id);
        }
    }
}
