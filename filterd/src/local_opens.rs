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
//! Not seen: a descriptor passed to another process (`SCM_RIGHTS`, or a
//! child forked after the open and outliving its parent) while the file
//! had state; a mapping whose descriptor was closed (`mmap`, no fd left).

use std::os::fd::BorrowedFd;
use std::path::Path;

use libfilter::model::FileId;

/// Most processes remembered per file; past it the next check scans all of
/// `/proc` again.
pub const MAX_PIDS: usize = 256;

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
    pub fn scanned(file: FileId, busy: bool, ours: &[BorrowedFd<'_>]) -> Self {
        let pids = scan_all(file, ours);
        LocalOpeners {
            unattributed: busy && pids.is_empty(),
            pids,
            overflowed: false,
        }
    }

    /// Remembers a local open fanotify allowed.
    pub fn saw(&mut self, pid: i32) {
        if self.pids.contains(&pid) {
            return;
        }
        if self.pids.len() >= MAX_PIDS {
            self.overflowed = true;
        } else {
            self.pids.push(pid);
        }
    }

    /// Re-checks the remembered processes; whether any still holds `file`.
    pub fn refresh(&mut self, file: FileId, ours: &[BorrowedFd<'_>]) -> bool {
        if self.overflowed {
            *self = Self::scanned(file, false, ours);
        } else {
            self.pids.retain(|p| holds(*p, file, ours));
            self.unattributed = false;
        }
        self.present()
    }

    /// Whether local opens count now (without re-checking).
    pub fn present(&self) -> bool {
        self.unattributed || !self.pids.is_empty() || self.overflowed
    }
}

/// Processes (other than filterd) with a descriptor open on `file`: every
/// `/proc/PID/fd`. Costs a `statx` per descriptor on the machine.
pub fn scan_all(file: FileId, ours: &[BorrowedFd<'_>]) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != me && holds(pid, file, ours))
        .collect()
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
