//! After one of filterd's opens broke a local process's kernel lease
//! (`F_SETLEASE`), filterd claims the file so that the protocol open's
//! retry gets through, even against a holder that takes its lease again
//! each time it is broken.
//!
//! filterd's own opens never wait on a lease (`O_NONBLOCK`, see `fsops`):
//! such an open fails at once with `EWOULDBLOCK`, the kernel starts the
//! break, and the request is answered `Busy` (retry). Left at that, a
//! holder that re-takes its lease as soon as it has released it would be
//! found holding it by every retry. So [`after_break`] hands the file (an
//! `O_PATH` anchor, which breaks no lease) to a claim thread, which opens
//! it *blocking* with the same access: that open counts as an opener from
//! the moment it starts waiting in the kernel's `break_lease`, so the
//! holder's re-take fails (`EAGAIN`: a write lease needs the file to have
//! no other open, a read lease no writer), and it completes once the
//! holder releases (or the kernel's `lease-break-time` passes). The claim
//! is then kept for [`CLAIM_HELD_FOR`]; the first open filterd makes of the
//! file meanwhile ([`opened`]) ends it, before that open's local-opener
//! probe could take the claim for someone else's open.
//!
//! Bounded: [`CLAIM_THREADS`] threads, at most [`MAX_CLAIMS`] files claimed
//! or waited for at once, one claim per file; past that a break is simply
//! answered `Busy` as before. Regular files only (a device's blocking open
//! could wait forever). The claim threads' opens go through filterd's own
//! mount, exempt from its fanotify group, so they never wait on filterd.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfilter::model::FileId;

/// How long a claimed file is kept open for the protocol open's retry.
pub const CLAIM_HELD_FOR: Duration = Duration::from_secs(10);
/// Threads that wait for breaks (each blocks in one open at a time).
pub const CLAIM_THREADS: usize = 4;
/// Most files claimed or waited for at once.
pub const MAX_CLAIMS: usize = 64;

/// Counters for `filterctl stats`.
#[derive(Default)]
pub struct ClaimCounters {
    /// Files claimed after a break (the claim's open went through).
    pub claimed: AtomicU64,
    /// Breaks not followed by a claim (all claim threads busy, or the
    /// claim's open failed).
    pub unclaimed: AtomicU64,
}

enum State {
    /// A claim thread waits for the break; `cancelled` once filterd
    /// opened the file anyway (the claim is then dropped on arrival).
    Waiting { cancelled: bool },
    /// Held open until `until`.
    Holding { _fd: OwnedFd, until: Instant },
}

struct Job {
    file: FileId,
    anchor: OwnedFd,
    access: i32,
}

struct Claims {
    jobs: crossbeam_channel::Sender<Job>,
    files: Mutex<HashMap<FileId, State>>,
    live: AtomicUsize,
}

static CLAIMS: OnceLock<Option<Claims>> = OnceLock::new();
static COUNTERS: OnceLock<ClaimCounters> = OnceLock::new();

/// The counters (zero until a break happens).
pub fn counters() -> &'static ClaimCounters {
    COUNTERS.get_or_init(ClaimCounters::default)
}

fn claims() -> Option<&'static Claims> {
    CLAIMS
        .get_or_init(|| {
            let (tx, rx) = crossbeam_channel::bounded::<Job>(MAX_CLAIMS);
            for i in 0..CLAIM_THREADS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("lease-claim-{i}"))
                    .spawn(move || claim_thread(rx));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a lease-claim thread; breaks are answered Busy only");
                    return None;
                }
            }
            Some(Claims {
                jobs: tx,
                files: Mutex::new(HashMap::new()),
                live: AtomicUsize::new(0),
            })
        })
        .as_ref()
}

/// filterd's open of the file `anchor` (`O_PATH`) names, with access
/// `access` (`O_RDONLY` / `O_WRONLY` / `O_RDWR`), failed because it would
/// break a local process's lease: claim the file once the break is done.
pub fn after_break(anchor: OwnedFd, access: i32) {
    let Ok(st) = nix::sys::stat::fstat(&anchor) else {
        return;
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return;
    }
    let file = FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    };
    let Some(c) = claims() else {
        counters().unclaimed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Ok(mut files) = c.files.lock() else {
        return;
    };
    if files.contains_key(&file) {
        return; // claimed or being claimed already
    }
    let job = Job {
        file,
        anchor,
        access: access & libc::O_ACCMODE,
    };
    if files.len() >= MAX_CLAIMS || c.jobs.try_send(job).is_err() {
        counters().unclaimed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    files.insert(file, State::Waiting { cancelled: false });
    c.live.store(files.len(), Ordering::Release);
}

/// filterd opened `fd` (not `O_PATH`): a claim of its file has done its
/// work and ends now (one waited for is dropped when it arrives).
pub fn opened(fd: BorrowedFd<'_>) {
    let Some(Some(c)) = CLAIMS.get() else {
        return;
    };
    if c.live.load(Ordering::Acquire) == 0 {
        return;
    }
    let Ok(st) = nix::sys::stat::fstat(fd) else {
        return;
    };
    let file = FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    };
    let gone = {
        let Ok(mut files) = c.files.lock() else {
            return;
        };
        let gone = match files.get_mut(&file) {
            Some(State::Waiting { cancelled }) => {
                *cancelled = true;
                None
            }
            Some(State::Holding { .. }) => files.remove(&file),
            None => None,
        };
        c.live.store(files.len(), Ordering::Release);
        gone
    };
    drop(gone); // closes the claim's descriptor, outside the lock
}

/// Takes claims one at a time: a blocking open of each anchor's file
/// (through `/proc/thread-self/fd`, so the same file whatever its name is
/// now), held until [`CLAIM_HELD_FOR`] passes or [`opened`] ends it.
fn claim_thread(jobs: crossbeam_channel::Receiver<Job>) {
    loop {
        let job = match jobs.recv_timeout(Duration::from_secs(1)) {
            Ok(j) => Some(j),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let Some(c) = CLAIMS.get().and_then(Option::as_ref) else {
            return;
        };
        if let Some(job) = job {
            let path = format!("/proc/thread-self/fd/{}", job.anchor.as_raw_fd());
            let opened = nix::fcntl::open(
                path.as_str(),
                nix::fcntl::OFlag::from_bits_retain(job.access | libc::O_CLOEXEC | libc::O_NOCTTY),
                nix::sys::stat::Mode::empty(),
            );
            drop(job.anchor);
            let Ok(mut files) = c.files.lock() else {
                return;
            };
            let keep = matches!(
                files.get(&job.file),
                Some(State::Waiting { cancelled: false })
            );
            match opened {
                Ok(fd) if keep => {
                    counters().claimed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(file = %job.file, "claimed a file after breaking a local lease");
                    files.insert(
                        job.file,
                        State::Holding {
                            _fd: fd,
                            until: Instant::now() + CLAIM_HELD_FOR,
                        },
                    );
                }
                other => {
                    if other.is_err() {
                        counters().unclaimed.fetch_add(1, Ordering::Relaxed);
                    }
                    files.remove(&job.file);
                }
            }
            c.live.store(files.len(), Ordering::Release);
        }
        // Claims past their time end.
        let Ok(mut files) = c.files.lock() else {
            return;
        };
        let now = Instant::now();
        files.retain(|_, s| match s {
            State::Holding { until, .. } => *until > now,
            State::Waiting { .. } => true,
        });
        c.live.store(files.len(), Ordering::Release);
    }
}
