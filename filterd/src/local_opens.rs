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

/// Most `/proc/PID/fd` entries one check looks at, and the most CPU time
/// it spends ([`ScanBudget`]): the engine thread does it. Past either, the
/// check decides as if a local opener exists (conservative: share modes
/// without read are refused, no write caching) and counts it
/// (`filterctl stats`: `local_scans_cut_short`) — unless the scan named
/// nobody while a frontend holds the file or just closed its last handle
/// ([`LocalOpeners::scanned`]).
pub const SCAN_ENTRIES: usize = 65_536;
/// See [`SCAN_ENTRIES`]: CPU time of the engine thread, which a loaded
/// machine does not eat (a wall-clock budget did: on one busy CPU the
/// scan at the first open after a restart ran out of it before it reached
/// the frontend holding the file, and the open was refused as if a local
/// reader held it).
pub const SCAN_TIME: std::time::Duration = std::time::Duration::from_millis(50);
/// The longest a check takes by the wall clock, whatever its CPU time (a
/// scan whose `statx` calls block in the kernel stops there).
pub const SCAN_WALL_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// What one check may still spend on `/proc`.
pub struct ScanBudget {
    left: usize,
    /// The engine thread's CPU time when the check's scan began: read at
    /// its first entry (most protocol opens scan nothing, and pay no
    /// clock read). Inner `None`: the clock could not be read; the wall
    /// clock alone bounds it.
    cpu_start: Option<Option<std::time::Duration>>,
    cpu_limit: std::time::Duration,
    deadline: std::time::Instant,
    /// The budget ran out: what was not looked at counted as held.
    pub cut: bool,
}

impl Default for ScanBudget {
    fn default() -> Self {
        ScanBudget::times(1)
    }
}

impl ScanBudget {
    /// A budget `times` the usual one, entries and time (for a check that
    /// is rare and costly to get wrong: the undo of a failed create).
    pub fn times(times: u32) -> Self {
        ScanBudget {
            left: SCAN_ENTRIES.saturating_mul(times as usize),
            cpu_start: None,
            cpu_limit: SCAN_TIME * times,
            deadline: std::time::Instant::now() + SCAN_WALL_TIME * times,
            cut: false,
        }
    }

    /// Spends one entry; false once the budget is spent.
    fn spend(&mut self) -> bool {
        if self.cut {
            return false;
        }
        if self.cpu_start.is_none() {
            self.cpu_start = Some(libfilter::sys::thread_cpu_time());
        }
        self.left = self.left.saturating_sub(1);
        if self.left == 0 || (self.left.is_multiple_of(512) && self.out_of_time()) {
            self.cut = true;
        }
        !self.cut
    }

    /// Whether the check has used its CPU time, or its wall time.
    fn out_of_time(&self) -> bool {
        let cpu = match (self.cpu_start.flatten(), libfilter::sys::thread_cpu_time()) {
            (Some(start), Some(now)) => now.saturating_sub(start) >= self.cpu_limit,
            _ => false,
        };
        cpu || std::time::Instant::now() >= self.deadline
    }
}

/// How long a lost frontend's process is still taken for a frontend (its
/// descriptors may outlive the connection briefly, or it reattaches).
pub const FRONTEND_PIDS_KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// How long what filterd knows of a file's local openers is kept after
/// its last handle closed. Meanwhile the file gets no ignore mark, so
/// every local open of it still reaches filterd and is remembered; the
/// next protocol open re-checks the remembered processes instead of
/// scanning `/proc` when the probe sees another open — usually a
/// frontend that has not yet dropped the closed handle's descriptor,
/// which a scan cut short by its budget could not tell from a local
/// reader.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// What filterd knows of a file's local openers.
#[derive(Debug, Default)]
pub struct LocalOpeners {
    /// Since the file's last handle closed: until when this is kept.
    pub lingering_until: Option<std::time::Instant>,
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
    /// be named: an open still in progress). `frontend_closed`: a
    /// frontend closed the file's last handle a moment ago (it lingers),
    /// so it may still hold that handle's descriptor.
    ///
    /// A scan cut short by `budget` counts as an opener (and the next
    /// check scans again) — unless it named nobody while a frontend holds
    /// the file (a descriptor of no current handle: one just closed) or
    /// just closed it: then what the probe saw is that frontend's
    /// descriptor, and no local opener is assumed.
    pub fn scanned(
        file: FileId,
        busy: bool,
        ours: &[BorrowedFd<'_>],
        frontends: &[i32],
        budget: &mut ScanBudget,
        frontend_closed: bool,
    ) -> Self {
        let (pids, frontend_holds) = scan_all(file, ours, frontends, budget);
        let frontend_explains = pids.is_empty() && (frontend_holds || frontend_closed);
        LocalOpeners {
            unattributed: busy && !frontend_explains && pids.is_empty(),
            pids,
            overflowed: budget.cut && !frontend_explains,
            lingering_until: None,
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
    pub fn refresh(
        &mut self,
        file: FileId,
        ours: &[BorrowedFd<'_>],
        frontends: &[i32],
        budget: &mut ScanBudget,
    ) -> bool {
        if self.overflowed {
            let (until, closed) = (self.lingering_until, self.lingering_until.is_some());
            *self = Self::scanned(file, false, ours, frontends, budget, closed);
            self.lingering_until = until;
        } else {
            self.pids
                .retain(|p| !frontends.contains(p) && holds(*p, file, ours, budget));
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
/// Stops early (`budget.cut`) when the budget is spent; the process it was
/// looking at then is not named.
pub fn scan_all(
    file: FileId,
    ours: &[BorrowedFd<'_>],
    frontends: &[i32],
    budget: &mut ScanBudget,
) -> (Vec<i32>, bool) {
    // (`sleepMS`: the engine thread held off the CPU as the scan starts,
    // as on a loaded machine.)
    crate::failpoint::hit("local.scan");
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (Vec::new(), false);
    };
    let mut frontend_holds = false;
    let mut pids = Vec::new();
    for pid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
    {
        if budget.cut {
            break;
        }
        if pid == me || !holds(pid, file, ours, budget) {
            continue;
        }
        if budget.cut {
            // Counted because the budget ran out while looking at it, not
            // seen holding the file: not named (the cut counts instead).
            break;
        }
        if frontends.contains(&pid) {
            frontend_holds = true;
        } else {
            pids.push(pid);
        }
    }
    (pids, frontend_holds)
}

/// Whether process `pid` has a descriptor open on `file` (`statx` through
/// its `/proc/PID/fd` links: nothing is opened, so filterd's own fanotify
/// group is never asked) that is not one of filterd's own open file
/// descriptions `ours` — a frontend holds those, passed with each handle.
/// Once `budget` is spent, it answers true (conservative).
pub fn holds(pid: i32, file: FileId, ours: &[BorrowedFd<'_>], budget: &mut ScanBudget) -> bool {
    if let Some(held) = holds_in(pid, &format!("/proc/{pid}/fd"), file, ours, budget) {
        return held;
    }
    // A process whose main thread exited (pthread_exit) while others run
    // shows an empty fd directory there: its threads share one table, so
    // the first other thread's tells.
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    for tid in tasks
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&tid| tid != pid)
    {
        let fds = format!("/proc/{pid}/task/{tid}/fd");
        if let Some(held) = holds_in(tid, &fds, file, ours, budget) {
            return held;
        }
    }
    false
}

/// [`holds`] through one fd directory (of task `tid`); `None` when it is
/// unreadable or empty.
fn holds_in(
    tid: i32,
    fds: &str,
    file: FileId,
    ours: &[BorrowedFd<'_>],
    budget: &mut ScanBudget,
) -> Option<bool> {
    let dir = std::fs::read_dir(Path::new(fds)).ok()?;
    let mut any = false;
    let held = dir.flatten().any(|e| {
        any = true;
        if !budget.spend() {
            return true;
        }
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
            .any(|m| libfilter::sys::same_file_description(tid, n, *m).unwrap_or(false))
    });
    any.then_some(held)
}

/// The start time of process `pid` (`/proc/PID/stat` field 22, in clock
/// ticks since boot): with the pid, it names one process, not whichever
/// process has the pid now.
/// Whether process `pid` has exited and awaits its parent's wait (a
/// zombie): it holds no file and does no I/O any more, though `/proc`
/// still shows it.
pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = stat.rsplit_once(')')?.1.to_owned();
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(false)
}

pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces and parentheses).
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod start_time_tests {
    #[test]
    fn a_live_process_has_one_start_time_and_a_missing_one_none() {
        let me = i32::try_from(std::process::id()).unwrap();
        let t = super::start_time(me);
        assert!(t.is_some());
        assert_eq!(super::start_time(me), t);
        assert_eq!(super::start_time(i32::MAX), None);
    }

    /// An exited child not waited for yet is a zombie; a live one is not.
    #[test]
    fn an_exited_child_not_reaped_is_a_zombie() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        assert!(!super::is_zombie(pid));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        while !super::is_zombie(pid) {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "never a zombie"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(!super::is_zombie(pid), "reaped: gone");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spends entries up to the next clock check.
    fn spend_to_check(b: &mut ScanBudget) -> bool {
        (0..512).all(|_| b.spend())
    }

    /// Round 13: time the engine thread waits for a CPU (here: sleeps)
    /// does not use up a scan's budget; time it computes does.
    #[test]
    fn a_scan_budget_is_cpu_time_not_waiting() {
        let mut b = ScanBudget::default();
        assert!(b.spend());
        std::thread::sleep(SCAN_TIME * 2);
        assert!(spend_to_check(&mut b), "cut by time spent waiting");
        assert!(!b.cut);
        let spin = std::time::Instant::now();
        let start = b.cpu_start.flatten().expect("the thread's CPU clock");
        while libfilter::sys::thread_cpu_time().unwrap() < start + SCAN_TIME {
            assert!(spin.elapsed() < SCAN_WALL_TIME, "no CPU time measured");
        }
        assert!(!spend_to_check(&mut b), "not cut by CPU time");
        assert!(b.cut);
    }

    /// The wall clock still bounds a scan whose calls block.
    #[test]
    fn a_scan_budget_has_a_wall_clock_limit() {
        let mut b = ScanBudget {
            deadline: std::time::Instant::now(),
            ..Default::default()
        };
        assert!(!spend_to_check(&mut b));
    }
}
