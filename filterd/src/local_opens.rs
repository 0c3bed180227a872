//! Local opens that already exist when a protocol open arrives (local
//! processes count as share-all readers, spec/smb-like.md "Share modes").
//!
//! fanotify only tells filterd about opens made while it listens and while
//! the file has protocol state (a stateless file has an ignore mark); a
//! process that opened the file before — or was allowed while state
//! existed and still holds it — is learned here:
//!
//! - **filterd holds no other descriptor of the inode** (the file's first
//!   protocol open): the kernel's write-lease rule answers in two `fcntl`s
//!   ([`libfilter::sys::alone_on_inode`]). Only when another open exists is
//!   `/proc/*/fd` scanned, to learn which processes hold it.
//! - **filterd holds other descriptors** (the probe would only see them):
//!   the processes recorded for the file — by the probe's scan, and by every
//!   local open fanotify allowed since — are checked, each through its own
//!   `/proc/PID/fd` only, and dropped once they no longer hold the file.
//!
//! Processes attached as frontends (current connections, and those lost
//! in the last [`FRONTEND_PIDS_KEPT_FOR`]) never count: their descriptors
//! are protocol handles' (passed by this filterd or, across a restart, by
//! the one before; or a handle just closed whose descriptor the frontend
//! has not dropped yet). When the probe saw another open and the scan
//! found only frontends holding the file, nothing counts.
//!
//! Not seen: a descriptor passed to another process (`SCM_RIGHTS`, or a
//! child forked after the open and outliving its parent) while the file
//! had state; a mapping whose descriptor was closed (`mmap`, no fd left).

use std::os::fd::BorrowedFd;
use std::path::Path;

use libfilter::model::FileId;

/// Most processes remembered per file; past it the next check scans all of
/// `/proc` again.
pub const MAX_PIDS: usize = 256;

/// How long a lost frontend's process is still taken for a frontend (its
/// descriptors may outlive the connection briefly, or it reattaches).
pub const FRONTEND_PIDS_KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// What filterd knows of a file's local openers.
#[derive(Debug, Default)]
pub struct LocalOpeners {
    /// Processes seen opening it (each checked before it counts).
    pids: Vec<i32>,
    /// More were seen than [`MAX_PIDS`]: the next check scans `/proc`.
    overflowed: bool,
    /// The probe saw another open no process could be named for (an open
    /// still in progress): counts until the next check.
    unattributed: bool,
}

impl LocalOpeners {
    /// The processes holding `file`, from a scan of `/proc`; `busy` when
    /// the probe saw another open (then it counts even if no process could
    /// be named: an open still in progress).
    pub fn scanned(file: FileId, busy: bool, ours: &[BorrowedFd<'_>], frontends: &[i32]) -> Self {
        let (pids, frontend_holds) = scan_all(file, ours, frontends);
        LocalOpeners {
            unattributed: busy && pids.is_empty() && !frontend_holds,
            pids,
            overflowed: false,
        }
    }

    /// Remembers a local open fanotify allowed.
    pub fn saw(&mut self, pid: i32, frontends: &[i32]) {
        if self.pids.contains(&pid) || frontends.contains(&pid) {
            return;
        }
        if self.pids.len() >= MAX_PIDS {
            self.overflowed = true;
        } else {
            self.pids.push(pid);
        }
    }

    /// Re-checks the remembered processes; whether any still holds `file`.
    pub fn refresh(&mut self, file: FileId, ours: &[BorrowedFd<'_>], frontends: &[i32]) -> bool {
        if self.overflowed {
            *self = Self::scanned(file, false, ours, frontends);
        } else {
            self.pids
                .retain(|p| !frontends.contains(p) && holds(*p, file, ours));
            self.unattributed = false;
        }
        self.present()
    }

    /// Whether only an open no process could be named for counts.
    pub fn unattributed(&self) -> bool {
        self.unattributed && self.pids.is_empty() && !self.overflowed
    }

    /// Whether local opens count now (without re-checking).
    pub fn present(&self) -> bool {
        self.unattributed || !self.pids.is_empty() || self.overflowed
    }
}

/// Processes (other than filterd and the `frontends`) with a descriptor
/// open on `file`: every `/proc/PID/fd`, and whether a frontend holds it.
/// Costs a `statx` per descriptor on the machine.
pub fn scan_all(file: FileId, ours: &[BorrowedFd<'_>], frontends: &[i32]) -> (Vec<i32>, bool) {
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (Vec::new(), false);
    };
    let mut frontend_holds = false;
    let pids = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != me && holds(pid, file, ours))
        .filter(|pid| {
            let frontend = frontends.contains(pid);
            frontend_holds |= frontend;
            !frontend
        })
        .collect();
    (pids, frontend_holds)
}

/// Whether process `pid` has a descriptor open on `file` (`statx` through
/// its `/proc/PID/fd` links: nothing is opened, so filterd's own fanotify
/// group is never asked) that is not one of filterd's own open file
/// descriptions `ours` — a frontend holds those, passed with each handle.
pub fn holds(pid: i32, file: FileId, ours: &[BorrowedFd<'_>]) -> bool {
    let fds = format!("/proc/{pid}/fd");
    let Ok(dir) = std::fs::read_dir(Path::new(&fds)) else {
        return false;
    };
    dir.flatten().any(|e| {
        let same_inode = libfilter::sys::dev_ino_nosync(&e.path())
            .is_ok_and(|(d, i)| d == file.dev && i == file.ino);
        if !same_inode {
            return false;
        }
        let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            return true;
        };
        // Cannot tell (no ptrace access): it counts.
        !ours
            .iter()
            .any(|m| libfilter::sys::same_file_description(pid, n, *m).unwrap_or(false))
    })
}
