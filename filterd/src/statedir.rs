//! One active daemon per store: the state dir's lock.
//!
//! filterd holds an exclusive `flock` on the state directory itself, not on
//! a file inside it: a file can be deleted or replaced while it is held
//! (`rm STATE/filterd.lock` used to let a second daemon lock the newcomer
//! and serve the same store). A directory with the store in it cannot be
//! removed while the store is there; if the path is renamed away and a new
//! directory put in its place between our `open` and our `flock`, the
//! inode check after locking notices and we start over. The lock is taken
//! before anything in the state dir is touched (epoch, intents, socket).
//!
//! A `--standby` daemon waits for the lock on a helper thread while the
//! main thread waits for SIGTERM/SIGINT on a signalfd, so a waiting standby
//! can be stopped at once (exit 0) instead of taking over later.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{fstat, stat};
use tracing::info;

/// The held lock; released when dropped or when the process dies.
pub struct StateLock {
    _dir: Flock<File>,
}

/// What taking the lock came to.
pub enum Locked {
    /// We are the active daemon.
    Held(StateLock),
    /// A standby was told to stop while it waited.
    Stopped(Signal),
}

fn open_dir(state: &Path) -> anyhow::Result<File> {
    File::open(state).with_context(|| format!("opening state dir {}", state.display()))
}

/// Whether the directory `dir` (locked) is still the one at `state`.
fn still_at_path(dir: &Flock<File>, state: &Path) -> anyhow::Result<bool> {
    let held = fstat(dir.as_fd())?;
    Ok(match stat(state) {
        Ok(now) => (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino),
        Err(_) => false,
    })
}

fn active_pid(state: &Path) -> String {
    match libfilter::runtime::read(state) {
        Ok(Some(r)) => r.pid.to_string(),
        _ => "unknown".into(),
    }
}

/// Takes the state dir's lock. Without `standby`, refuses when another
/// daemon holds it; with it, waits until it is free or a signal of `sigs`
/// arrives (`sigs` must be blocked in every thread).
pub fn lock(state: &Path, standby: bool, sigs: &SigSet) -> anyhow::Result<Locked> {
    loop {
        let dir = open_dir(state)?;
        let held = match lock_now(dir) {
            Ok(l) => l,
            Err((dir, nix::errno::Errno::EWOULDBLOCK)) => {
                if !standby {
                    bail!(
                        "another filterd (pid {}) is active on state dir {}; stop it first, or start this one with --standby to take over when it dies",
                        active_pid(state),
                        state.display()
                    );
                }
                info!(
                    active_pid = active_pid(state),
                    "standby: waiting for the active filterd to exit"
                );
                match wait_for_lock(dir, sigs)? {
                    Ok(l) => l,
                    Err(sig) => return Ok(Locked::Stopped(sig)),
                }
            }
            Err((_, e)) => return Err(e).context("locking the state dir"),
        };
        if still_at_path(&held, state)? {
            return Ok(Locked::Held(StateLock { _dir: held }));
        }
        info!("the state dir was replaced while it was being locked; locking it again");
    }
}

/// The export root's own lock, held beside the state dir's with the LMDB
/// store; released when dropped or when the process dies.
pub struct RootLock {
    _dir: Flock<File>,
}

/// Takes an exclusive `flock` on the export root directory itself, so a
/// second daemon serving the same root with *another* state dir is
/// refused (or, `standby`, waits): each would grant opens the other's
/// share modes and locks forbid, and neither's fanotify group would see
/// the other's opens (review). `None` with the lock: a standby stopped by
/// a signal while it waited. Only with the LMDB store: with etcd the
/// table's owner key decides, on every machine, and a flock on a network
/// filesystem would reach across machines.
pub fn lock_root(root: &Path, standby: bool, sigs: &SigSet) -> anyhow::Result<Option<RootLock>> {
    let dir =
        File::open(root).with_context(|| format!("opening export root {}", root.display()))?;
    let held = match lock_now(dir) {
        Ok(l) => l,
        Err((dir, nix::errno::Errno::EWOULDBLOCK)) => {
            if !standby {
                bail!(
                    "another filterd serves export root {} (with another state dir); one export root has one filterd: stop the other, or start this one with --standby to take over when it dies",
                    root.display()
                );
            }
            info!("standby: waiting for the filterd serving this export root to exit");
            match wait_for_lock(dir, sigs)? {
                Ok(l) => l,
                Err(_) => return Ok(None),
            }
        }
        Err((_, e)) => return Err(e).context("locking the export root"),
    };
    Ok(Some(RootLock { _dir: held }))
}

/// How long a busy lock is retried before another daemon is taken to hold
/// it: `filterctl --state` probes it with a shared lock held for an
/// instant (libfilter `runtime::lock_is_held`).
const PROBE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The exclusive lock without waiting for a daemon, retried for
/// [`PROBE_GRACE`] while it is busy (a filterctl probe is gone at once).
fn lock_now(dir: File) -> Result<Flock<File>, (File, nix::errno::Errno)> {
    let deadline = std::time::Instant::now() + PROBE_GRACE;
    let mut dir = dir;
    loop {
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Err((d, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                dir = d;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// Blocks in `flock` on a helper thread while this thread waits for a
/// signal of `sigs`. `Err(signal)`: the signal came first.
fn wait_for_lock(dir: File, sigs: &SigSet) -> anyhow::Result<Result<Flock<File>, Signal>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use nix::sys::signalfd::{SfdFlags, SignalFd};

    let signals = SignalFd::with_flags(sigs, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("signalfd")?;
    let done = Arc::new(EventFd::from_flags(
        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
    )?);
    let (tx, rx) = crossbeam_channel::bounded(1);
    {
        let done = done.clone();
        std::thread::Builder::new()
            .name("standby-wait".into())
            .spawn(move || {
                let r = Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, e)| e);
                let _ = tx.send(r);
                let _ = done.write(1);
            })?;
    }
    loop {
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(done.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("waiting for the state lock"),
        }
        if let Ok(Some(si)) = signals.read_signal() {
            let sig = i32::try_from(si.ssi_signo)
                .ok()
                .and_then(|n| Signal::try_from(n).ok())
                .unwrap_or(Signal::SIGTERM);
            return Ok(Err(sig));
        }
        if let Ok(r) = rx.try_recv() {
            return r.map(Ok).context("waiting for the state lock");
        }
    }
}
