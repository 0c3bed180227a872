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
//!
//! Nobody but filterd's user (and the state dir's group) may be able to
//! take these locks, or a local user could keep filterd from starting by
//! holding one: an existing state dir is tightened to 0750 ([`tighten`]),
//! and the export root's lock ([`lock_root`]) is a private file under
//! `/run/rkfilter/roots` (or `--root-lock-dir`), not the root directory
//! anyone may open.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{fstat, stat};
use tracing::{info, warn};

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

/// Takes away group write and every permission of other users from an
/// existing state dir (`mode & !0o027`, as filterd creates it: 0750), so
/// no other user can open it — and so none can hold its `flock` to keep
/// filterd from starting, restarting or taking over (review rvacl: `flock
/// -x STATE sleep 1e9` as nobody on a 0755 state dir did). Called once the
/// state dir's lock is held, so a second daemon that is refused leaves the
/// live one's dir as it is (review rr37b). The dir's own
/// `flock` stays the daemon lock: `filterctl --state` probes it
/// (`runtime::lock_is_held`) and older filterds take it. A process that
/// opened the directory before it was tightened keeps its descriptor.
pub fn tighten(state: &Path) {
    let Ok(meta) = std::fs::metadata(state) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    let tight = mode & !0o027;
    if tight == mode {
        return;
    }
    match std::fs::set_permissions(state, std::fs::Permissions::from_mode(tight)) {
        Ok(()) => warn!(
            state = %state.display(),
            was = format!("{mode:04o}"),
            now = format!("{tight:04o}"),
            "state dir tightened: other users could open it and hold its lock"
        ),
        Err(e) => warn!(
            state = %state.display(),
            mode = format!("{mode:04o}"),
            error = %e,
            "cannot tighten the state dir: any user who can open it can hold its lock and keep filterd from starting"
        ),
    }
}

/// The export root's own lock, held beside the state dir's with the LMDB
/// store; released when dropped or when the process dies. A lock file is
/// removed when dropped (still held, so a daemon that opened it meanwhile
/// finds it gone once it has it, and locks again).
pub struct RootLock {
    held: Flock<File>,
    file: Option<PathBuf>,
}

impl RootLock {
    /// The file (or directory) whose `flock` this is.
    fn what(file: Option<&Path>, root: &Path) -> String {
        match file {
            Some(f) => format!("lock file {}", f.display()),
            None => format!(
                "a flock on the directory {} itself, which any process that can open it may hold",
                root.display()
            ),
        }
    }
}

impl Drop for RootLock {
    fn drop(&mut self) {
        if let Some(file) = &self.file {
            if still_at_path(&self.held, file).unwrap_or(false) {
                let _ = std::fs::remove_file(file);
            }
        }
    }
}

/// Where root filterds keep their export roots' lock files unless
/// `--root-lock-dir` says otherwise.
const ROOT_LOCK_DIR: &str = "/run/rkfilter/roots";

/// The directory for the export roots' lock files: `option`
/// (`--root-lock-dir`) when given, else [`ROOT_LOCK_DIR`] as root; `None`
/// (a warning said so) for a non-root filterd without the option: the
/// root directory's own flock. Never chosen by the environment, so every
/// filterd of one user on one root takes the same lock (review rr37b: a
/// service without `XDG_RUNTIME_DIR` and a login shell's filterd with it
/// both served). A directory that cannot be made or trusted is an error
/// naming the option.
fn root_lock_dir(option: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    let dir = match option {
        Some(d) if d.is_relative() => std::env::current_dir()?.join(d),
        Some(d) => d.to_path_buf(),
        None if nix::unistd::geteuid().is_root() => PathBuf::from(ROOT_LOCK_DIR),
        None => {
            warn!("not root and no --root-lock-dir: the export root is locked by a flock on its directory, which any local user who can open it can hold to keep filterd from starting");
            return Ok(None);
        }
    };
    make_private_dirs(&dir).map(Some).with_context(|| {
        format!(
            "the export roots' lock dir {} cannot be used; give --root-lock-dir DIR, a directory of filterd's user that no other user may write, shared by every filterd serving this export root",
            dir.display()
        )
    })
}

/// Creates `dir` and the missing directories above it with mode 0700, and
/// checks that each it may have to trust — `dir` and its parent — is a
/// directory (not a symbolic link) that nobody else may write: `dir` of
/// this user, its parent of this user or root.
fn make_private_dirs(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    for (d, owners) in [(Some(dir), [me, me]), (dir.parent(), [me, 0])] {
        let Some(d) = d else { continue };
        let m = std::fs::symlink_metadata(d).with_context(|| format!("{}", d.display()))?;
        if !m.is_dir() || !owners.contains(&m.uid()) || m.mode() & 0o022 != 0 {
            bail!(
                "{} must be a directory of uid {} that no other user may write (it holds the export roots' lock files)",
                d.display(),
                owners.iter().map(u32::to_string).collect::<Vec<_>>().join(" or ")
            );
        }
    }
    Ok(dir.to_path_buf())
}

/// The name of `root`'s lock file: its device and kernel file handle
/// (`DEV-hTYPE-HANDLE.lock`, hex), which a new directory that reuses a
/// deleted root's inode number does not share (the handle carries the
/// inode's generation); `DEV-INO.lock` where the filesystem gives no file
/// handle (or one too long for a file name). The device is the same through every bind mount and mount
/// namespace.
fn lock_file_name(root: &Path) -> anyhow::Result<String> {
    let dir =
        File::open(root).with_context(|| format!("opening export root {}", root.display()))?;
    let id = fstat(dir.as_fd()).with_context(|| format!("export root {}", root.display()))?;
    Ok(match libfilter::sys::file_handle_of(dir.as_fd()) {
        // At most 2 × 100 hex digits: the name stays within NAME_MAX
        // (common filesystems' directory handles have 8 to 24 bytes).
        Ok(h) if h.bytes.len() <= 100 => {
            let mut name = format!("{:x}-h{:x}-", id.st_dev, h.handle_type);
            for b in &h.bytes {
                name.push_str(&format!("{b:02x}"));
            }
            name.push_str(".lock");
            name
        }
        _ => format!("{}-{}.lock", id.st_dev, id.st_ino),
    })
}

/// Whether `name` is one [`lock_file_name`] gives: `DEV-hTYPE-HEX.lock`
/// (hex digits) or `DEV-INO.lock` (decimal).
fn is_root_lock_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".lock") else {
        return false;
    };
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let dec = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = stem.split('-').collect();
    match parts.as_slice() {
        [dev, ty, handle] => hex(dev) && ty.strip_prefix('h').is_some_and(hex) && hex(handle),
        [dev, ino] => dec(dev) && dec(ino),
        _ => false,
    }
}

/// Most entries of the lock dir [`sweep`] looks at per start.
const SWEEP_MAX: usize = 256;

/// Removes the lock files in `dir` that no process holds (left by killed
/// filterds, or by roots long gone), looking at up to [`SWEEP_MAX`]
/// entries. Each is removed only while this process holds its lock and the
/// path still names the file locked, so no lock a daemon holds or is about
/// to get is lost: a daemon that opened a file removed here before it
/// locked it finds, once it has the lock, the path gone or naming another
/// file, and locks again ([`lock_root`]'s check after locking).
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut removed = 0usize;
    for entry in entries.take(SWEEP_MAX).flatten() {
        let path = entry.path();
        // Only names [`lock_file_name`] gives: the dir may be one an
        // operator shares with other programs (re-review rr37d: an unheld
        // `Cargo.lock`, a `.pwd.lock` held by `fcntl`, were removed).
        if !entry.file_name().to_str().is_some_and(is_root_lock_name) {
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        // filterd's lock files stay empty.
        if !file.metadata().is_ok_and(|m| m.is_file() && m.len() == 0) {
            continue;
        }
        let Ok(held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if still_at_path(&held, &path).unwrap_or(false) && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        info!(dir = %dir.display(), removed, "removed lock files no filterd held");
    }
}

/// Opens (creating, mode 0600) the lock file `path`, never through a
/// symbolic link; one left with a wider mode is narrowed, so no other
/// user can open it.
fn open_lock_file(path: &Path) -> anyhow::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening the export root's lock file {}", path.display()))?;
    let m = file.metadata()?;
    if !m.is_file() || m.uid() != nix::unistd::geteuid().as_raw() {
        bail!(
            "{} is not a regular file of filterd's user; remove it",
            path.display()
        );
    }
    if m.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Takes an exclusive lock for the export root, so a second daemon
/// serving the same root with *another* state dir is refused (or,
/// `standby`, waits): each would grant opens the other's share modes and
/// locks forbid, and neither's fanotify group would see the other's opens
/// (review). `None` with the lock: a standby stopped by a signal while it
/// waited. Only with the LMDB store: with etcd the table's owner key
/// decides, on every machine, and a flock on a network filesystem would
/// reach across machines.
///
/// The lock is a `flock` on a file no other user can open, named by the
/// root's device and kernel file handle ([`lock_file_name`]; a bind mount
/// of the root is the same root) in the lock dir ([`root_lock_dir`]:
/// `--root-lock-dir`, else `/run/rkfilter/roots` as root), created as
/// needed; stale files there are swept first ([`sweep`]). Before (review
/// rvacl) it was a flock on the root directory itself, which any local
/// user who can read the root could hold to keep filterd from starting;
/// that is still what a non-root filterd without `--root-lock-dir` takes.
pub fn lock_root(
    root: &Path,
    lock_dir: Option<&Path>,
    standby: bool,
    sigs: &SigSet,
) -> anyhow::Result<Option<RootLock>> {
    let file = match root_lock_dir(lock_dir)? {
        Some(dir) => {
            sweep(&dir);
            Some(dir.join(lock_file_name(root)?))
        }
        None => None,
    };
    loop {
        let target = match &file {
            Some(f) => open_lock_file(f)?,
            None => File::open(root)
                .with_context(|| format!("opening export root {}", root.display()))?,
        };
        let held = match lock_now(target) {
            Ok(l) => l,
            Err((target, nix::errno::Errno::EWOULDBLOCK)) => {
                if !standby {
                    bail!(
                        "another filterd serves export root {} (with another state dir; it holds {}); one export root has one filterd: stop the other, or start this one with --standby to take over when it dies",
                        root.display(),
                        RootLock::what(file.as_deref(), root)
                    );
                }
                info!("standby: waiting for the filterd serving this export root to exit");
                match wait_for_lock(target, sigs)? {
                    Ok(l) => l,
                    Err(_) => return Ok(None),
                }
            }
            Err((_, e)) => return Err(e).context("locking the export root"),
        };
        match &file {
            Some(f) if !still_at_path(&held, f)? => {
                info!("the export root's lock file was removed while it was being locked; locking it again");
            }
            _ => return Ok(Some(RootLock { held, file })),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The sweep touches only the names filterd gives its lock files.
    #[test]
    fn only_filterds_lock_names_are_swept() {
        for good in ["fd00-h1-81e09800f949ed9f.lock", "64768-1234.lock"] {
            assert!(is_root_lock_name(good), "{good}");
        }
        for bad in [
            "Cargo.lock",
            ".pwd.lock",
            "xtables.lock",
            "fd00-h1-81e0.lck",
            "fd00-x1-81e0.lock",
            "1-2-3-4.lock",
            "a-2.lock",
            "-2.lock",
            ".lock",
        ] {
            assert!(!is_root_lock_name(bad), "{bad}");
        }
    }
}
