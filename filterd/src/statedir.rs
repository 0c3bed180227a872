//! One active daemon per store: the state dir's lock.
//!
//! filterd holds an exclusive `flock` on `STATE/filterd.lock`, a 0600 file
//! of filterd's user that no other user can open (created `O_NOFOLLOW`,
//! its owner checked), in a state dir of filterd's user in a directory
//! nobody else may rename it out of ([`check_state_dir`]), whose group's
//! and other users' write permission is taken away before anything in it
//! is used ([`shut_writers_out`], then [`check_entries`]). Before (review
//! rr48c M2) the lock was a `flock` on the state dir itself, which any
//! member of the state dir's group — the frontends', as README advises —
//! could hold (`flock -s STATE sleep inf`) to make every later start fail
//! and keep a standby waiting forever. If the lock file is renamed or
//! replaced between our `open` and our `flock`, the inode check after
//! locking notices and we start over.
//! The lock is taken before anything else in the state dir is touched
//! (epoch, intents, socket).
//!
//! The state dir's own `flock` is still taken, second ([`lock_dir`]): it
//! is what filterds before this one took as their lock, and what
//! `filterctl --state` probes. Held while the store's writer lock on
//! `STATE/lmdb/` is held too ([`busy_store`]: only filterd's user can
//! open that directory), another filterd serves, and the start is
//! refused, or a standby waits — on the store's lock, not the dir's: an
//! older filterd, or one of this version whose lock file was removed
//! behind its back (`rm STATE/filterd.lock`, which only filterd's user
//! can do). Held by anyone else, it is ignored with a warning, and the
//! lock is taken when it is let go.
//!
//! A `--standby` daemon waits for the lock on a helper thread while the
//! main thread waits for SIGTERM/SIGINT on a signalfd, so a waiting standby
//! can be stopped at once (exit 0) instead of taking over later.
//!
//! The export root's lock ([`lock_root`]) is likewise a private file under
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
    _file: Flock<File>,
    /// The state dir's own `flock` ([`lock_dir`]); `None` while another
    /// process holds it (a helper thread takes it when it is let go).
    _dir: Option<Flock<File>>,
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

/// Whether the file or directory `held` (locked) is still the one at `path`.
fn still_at_path(held: &Flock<File>, path: &Path) -> anyhow::Result<bool> {
    let held = fstat(held.as_fd())?;
    Ok(match stat(path) {
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

/// Refuses a state dir another user could have put things in or could
/// change under filterd (review rr48c L1: a state dir under a directory
/// others may write, e.g. one they made in `/tmp`, could be renamed away
/// and replaced by one holding crafted records, socket or runtime
/// record): it must be a directory of filterd's user (its group's and
/// others' write permission is taken away before anything in it is used,
/// [`shut_writers_out`], the rest once it is locked, [`tighten`]), in a
/// directory nobody else may rename it out of ([`check_parent`]).
pub fn check_state_dir(state: &Path) -> anyhow::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    check_dir(state, &[me], 0, false)
        .and_then(|()| state.parent().map_or(Ok(()), check_parent))
        .with_context(|| {
            format!(
                "state dir {} cannot be trusted: make it a directory of filterd's user (uid {me}), in a directory of that user or root that neither its group nor other users may write (chmod go-w; its group may if the directory is filterd's user's and of that user's primary group) or that is sticky",
                state.display()
            )
        })
}

/// Checks that `p`, the parent of a directory filterd trusts (the state
/// dir, the socket's directory), is one nobody else may rename that
/// directory out of, and put another in its place: a directory of
/// filterd's user or root that neither its group nor other users may
/// write, or that is sticky (`/tmp`: nobody else may rename or remove
/// what is ours there). `/var/lib`, `/run` (root, 0755) and `/tmp` (1777)
/// are. Its group may write it when it is filterd's user's and of that
/// user's own primary group, the one its passwd entry names (a user
/// private group under umask 002, or root's): that group's members are
/// then trusted like filterd's user. Not filterd's effective group,
/// which `Group=`, `sg` or `setpriv --regid` may make the frontends'
/// (review rr49d L2); no passwd entry, no exception. Before (review
/// rr49a F5) any group's write permission was accepted, and a member of
/// a shared group (`root:staff 2775`) could swap the state dir, with its
/// socket, while filterd ran. Only this one directory is checked, not
/// the ones above it (review rr49d L5): one another user may write
/// there lets them rename the whole subtree away (README "Socket
/// permissions").
fn check_parent(p: &Path) -> anyhow::Result<()> {
    let me = nix::unistd::geteuid();
    let m = std::fs::symlink_metadata(p).with_context(|| format!("{}", p.display()))?;
    let own_group = m.uid() == me.as_raw() && primary_gid() == Some(m.gid());
    check_dir(
        p,
        &[me.as_raw(), 0],
        if own_group { 0o002 } else { 0o022 },
        true,
    )
}

/// filterd's user's primary group, as its passwd entry names it, looked
/// up once, at the first call ([`lock`] makes it before anything else),
/// and kept: a `--standby` checks the socket's directory only after its
/// wait, when the directory service may be what is down (often the very
/// outage that stopped the active filterd), and a lookup then could
/// refuse the takeover, or hang it (review rr49j L1). `None` (no entry,
/// or the lookup failed) is logged: no group may then write a parent.
fn primary_gid() -> Option<u32> {
    static PRIMARY: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *PRIMARY.get_or_init(|| {
        let me = nix::unistd::geteuid();
        match nix::unistd::User::from_uid(me) {
            Ok(Some(u)) => Some(u.gid.as_raw()),
            r => {
                warn!(
                    uid = me.as_raw(),
                    error = ?r.err(),
                    "filterd's user has no passwd entry (or it cannot be read): no directory its group may write is trusted as the state dir's or the socket's directory's parent"
                );
                None
            }
        }
    })
}

/// The socket's path `socket` with its directory resolved (symbolic
/// links in it followed, once: `/var/run` is a link to `/run` on most
/// systems; review rr49a F4 — before, such a path was refused as a link),
/// checked to be one another user cannot change under filterd (review
/// rr48c L1: swap the socket for a symbolic link between its `bind` and
/// its `chmod`): a directory of filterd's user or root that neither its
/// group nor others may write, or sticky, in a directory nobody else may
/// rename it out of ([`check_parent`]). filterd binds the path returned.
pub fn trusted_socket_path(socket: &Path) -> anyhow::Result<PathBuf> {
    let me = nix::unistd::geteuid().as_raw();
    let (Some(given), Some(name)) = (socket.parent(), socket.file_name()) else {
        bail!("--socket {} names no file in a directory", socket.display());
    };
    let dir = given
        .canonicalize()
        .with_context(|| format!("the socket's directory {}", given.display()))?;
    check_dir(&dir, &[me, 0], 0o022, true)
        .and_then(|()| match dir.parent() {
            Some(p) => check_parent(p),
            None => Ok(()),
        })
        .with_context(|| {
            format!(
                "the socket's directory {} cannot be trusted: give --socket a path in a directory of filterd's user or root that neither its group nor other users may write, or a sticky one such as /tmp, whose own parent is such a directory too (its group may write that one if it is filterd's user's and of that user's primary group)",
                dir.display()
            )
        })?;
    Ok(dir.join(name))
}

/// Checks that `d` is a directory (not a symbolic link) owned by one of
/// `owners` that gives none of the write permissions `may_not` names
/// (`0o022`: group and others; `0o002`: others; `0`: any) — unless
/// `sticky_ok` and it has the sticky bit, where nobody else may rename or
/// remove what is ours.
fn check_dir(d: &Path, owners: &[u32], may_not: u32, sticky_ok: bool) -> anyhow::Result<()> {
    let m = std::fs::symlink_metadata(d).with_context(|| format!("{}", d.display()))?;
    let writable_by_others = m.mode() & may_not != 0 && !(sticky_ok && m.mode() & 0o1000 != 0);
    if !m.is_dir() || !owners.contains(&m.uid()) || writable_by_others {
        bail!(
            "{} must be a directory of uid {}{} (it is {}, uid {}, mode {:04o})",
            d.display(),
            {
                let mut names: Vec<String> = owners.iter().map(u32::to_string).collect();
                names.dedup();
                names.join(" or ")
            },
            match (may_not, sticky_ok) {
                (0, _) => "",
                (0o002, true) => {
                    " that other users may not write (its group may: filterd's user's primary group), or sticky"
                }
                (_, true) => " that neither its group nor other users may write, or sticky",
                (_, false) => " that neither its group nor other users may write",
            },
            if m.is_dir() {
                "a directory"
            } else if m.is_symlink() {
                "a symbolic link"
            } else {
                "not a directory"
            },
            m.uid(),
            m.mode() & 0o7777
        );
    }
    Ok(())
}

/// The default socket's name in the state dir.
pub const SOCKET_FILE: &str = "filterd.sock";

/// The name `filterd.run` is written through (libfilter `runtime::write`).
const RUNTIME_TMP: &str = "filterd.run.tmp";

/// The name `frontends.seen` is written through (`frontends_seen`).
const SEEN_TMP: &str = "frontends.seen.tmp";

/// Takes its group's and other users' write permission off the state dir
/// before anything in it is used — by every start, a refused one too:
/// that write permission is nothing a live filterd relies on (it took it
/// away when it started, [`tighten`]), and while it lasts another user
/// can put what they like in the dir ([`check_entries`] refuses what they
/// did). Its other permissions are taken away only once the lock is held
/// (review rr37b). Before (review rr49a F2) the dir was narrowed only
/// after the lock, and what was put in it before was used as found.
fn shut_writers_out(state: &Path) -> anyhow::Result<()> {
    let dir = open_dir(state)?;
    let mode = dir.metadata()?.mode() & 0o7777;
    if mode & 0o022 == 0 {
        return Ok(());
    }
    let now = mode & !0o022;
    dir.set_permissions(std::fs::Permissions::from_mode(now))
        .with_context(|| {
            format!(
                "state dir {} may be written by other users (mode {mode:04o}) and its mode cannot be changed",
                state.display()
            )
        })?;
    warn!(
        state = %state.display(),
        was = format!("{mode:04o}"),
        now = format!("{now:04o}"),
        "state dir tightened: other users could write it"
    );
    Ok(())
}

/// Refuses a state dir holding, under a name filterd uses, something
/// filterd's user did not make: another user's, or a symbolic link, or
/// not of the kind filterd makes — planted while the dir was open to
/// other users' writes ([`shut_writers_out`]; nobody else can add
/// anything since). The store's directory is checked where it is opened
/// (libfilter `store::open_store_dir`), the `.tmp` files are always made
/// anew (`O_EXCL|O_NOFOLLOW`, libfilter `runtime::replace_file`).
fn check_entries(state: &Path) -> anyhow::Result<()> {
    use std::fs::FileType;
    use std::os::unix::fs::FileTypeExt;
    let me = nix::unistd::geteuid().as_raw();
    /// A name filterd uses, what it makes there, a test for that, and
    /// whether it may be removed (filterd makes it anew, losing nothing).
    type Entry = (&'static str, &'static str, fn(&FileType) -> bool, bool);
    // The `.tmp` names each record is written through, then renamed
    // from: anything another user put there, or a directory (which the
    // write's clean-up does not remove), kept it from ever being written
    // again, at every start — `frontends.seen.tmp` switched the restart
    // gate off for good (attack49 F1).
    let entries: [Entry; 6] = [
        (
            libfilter::runtime::LOCK_FILE,
            "a regular file",
            FileType::is_file,
            false,
        ),
        (
            libfilter::runtime::RUNTIME_FILE,
            "a regular file",
            FileType::is_file,
            true,
        ),
        (
            crate::frontends_seen::FILE,
            "a regular file",
            FileType::is_file,
            false,
        ),
        (SOCKET_FILE, "a socket", FileType::is_socket, true),
        (RUNTIME_TMP, "a regular file", FileType::is_file, true),
        (SEEN_TMP, "a regular file", FileType::is_file, true),
    ];
    for (name, kind, is_kind, removable) in entries {
        let path = state.join(name);
        let m = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            r => r.with_context(|| format!("{}", path.display()))?,
        };
        if m.uid() != me {
            bail!(
                "{} cannot be trusted: it belongs to uid {}, not to filterd's user (uid {me}). If it is from when filterd ran as that user, give the state dir to this one (chown -R {me} {}){}. Otherwise another user put it there while the state dir was open to them",
                path.display(),
                m.uid(),
                state.display(),
                if removable {
                    ", or remove it while no filterd runs"
                } else {
                    ""
                }
            );
        }
        if !is_kind(&m.file_type()) {
            bail!(
                "{} cannot be trusted: it is {}, not {kind} as filterd makes it; remove it",
                path.display(),
                if m.is_symlink() {
                    "a symbolic link"
                } else {
                    "of another kind"
                }
            );
        }
    }
    Ok(())
}

/// Takes the state dir's lock ([`libfilter::runtime::LOCK_FILE`], then
/// the dir's own [`lock_dir`]). Without `standby`, refuses when another
/// daemon holds it; with it, waits until it is free or a signal of `sigs`
/// arrives (`sigs` must be blocked in every thread). `lmdb`: the store is
/// `STATE/lmdb/`, which is narrowed and checked here; an etcd filterd
/// leaves a leftover one as it is (review rr49j L4).
pub fn lock(state: &Path, lmdb: bool, standby: bool, sigs: &SigSet) -> anyhow::Result<Locked> {
    // Once, before any wait: the later checks reuse it (review rr49j L1).
    primary_gid();
    check_state_dir(state)?;
    shut_writers_out(state)?;
    check_entries(state)?;
    // Before the wait, so a standby's wait leaves no old, open `lmdb/`
    // (review rr49d L9); a live filterd keeps its descriptors.
    if lmdb {
        libfilter::store::narrow_store_dir(state)?;
    }
    let path = state.join(libfilter::runtime::LOCK_FILE);
    let file = loop {
        let file = open_lock_file(&path, "the state dir's lock file")?;
        let held = match lock_now(file) {
            Ok(l) => l,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
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
                match wait_for_lock(file, sigs)? {
                    Ok(l) => l,
                    Err(sig) => return Ok(Locked::Stopped(sig)),
                }
            }
            Err((_, e)) => return Err(e).context("locking the state dir's lock file"),
        };
        if still_at_path(&held, &path)? {
            break held;
        }
        info!("the state dir's lock file was replaced while it was being locked; locking it again");
    };
    match lock_dir(state, standby, sigs)? {
        Ok(dir) => Ok(Locked::Held(StateLock {
            _file: file,
            _dir: dir,
        })),
        Err(sig) => Ok(Locked::Stopped(sig)),
    }
}

/// The state dir's own `flock`, held beside the lock file: the lock of
/// the filterds before this one, so that neither an older filterd nor
/// this one serves while the other does (during an upgrade), and what
/// `filterctl --state` probes. When it is busy, whether a filterd holds
/// it is judged by a lock no other user can hold ([`busy_store`]: the
/// LMDB store's writer `flock` on `STATE/lmdb/`, a 0700 directory of
/// filterd's user, which every filterd serving from this state dir
/// holds): busy, another filterd serves (an earlier version, or one of
/// this version whose lock file was removed behind its back), and the
/// start is refused, or a standby waits. Free, whoever holds the dir's
/// `flock` serves nothing (a member of the state dir's group can open it
/// and hold its `flock`): it is ignored, with a warning, and a helper
/// thread takes it once it is let go (`Ok(None)`). Before (review rr48g
/// M-a) the holder was judged by its name and uid, which a group member
/// could fake (a setuid-root program run through a link named `filterd`).
///
/// A standby waits on the store's writer lock, never on the dir's, and
/// judges again once it is let go: when the filterd it waits for dies,
/// whoever else wanted the dir's `flock` — a group member queued on it —
/// may get it first, and keep it. Before (review rr49a F1) the standby
/// blocked on the dir's `flock` and never looked at the store again,
/// waiting (and holding the lock file, so every other start was refused)
/// for as long as that group member liked.
fn lock_dir(
    state: &Path,
    standby: bool,
    sigs: &SigSet,
) -> anyhow::Result<Result<Option<Flock<File>>, Signal>> {
    loop {
        let dir = open_dir(state)?;
        let held = match lock_now(dir) {
            Ok(l) => l,
            Err((dir, nix::errno::Errno::EWOULDBLOCK)) => {
                let Some(store) = busy_store(state)? else {
                    warn!(
                        state = %state.display(),
                        "a process holds a flock on the state dir but no filterd serves its store (a member of the state dir's group can open it); ignored: filterd's lock is its lock file. It is taken when let go, and until then an older filterd or filterctl --state may not see that this one runs"
                    );
                    take_when_free(dir);
                    return Ok(Ok(None));
                };
                if !standby {
                    bail!(
                        "another filterd (pid {}) is active on state dir {}: it holds the directory's flock and its store's (an earlier version, or one whose lock file {} was removed); stop it first, or start this one with --standby to take over when it dies",
                        active_pid(state),
                        state.display(),
                        libfilter::runtime::LOCK_FILE
                    );
                }
                info!(
                    active_pid = active_pid(state),
                    "standby: waiting for the active filterd to exit (it holds the state dir's flock and its store's)"
                );
                drop(dir);
                match wait_for_lock(store, sigs)? {
                    // Let go at once: `Store::open` takes it for good.
                    Ok(store) => drop(store),
                    Err(sig) => return Ok(Err(sig)),
                }
                continue;
            }
            Err((_, e)) => return Err(e).context("locking the state dir"),
        };
        if still_at_path(&held, state)? {
            return Ok(Ok(Some(held)));
        }
        info!("the state dir was replaced while it was being locked; locking it again");
    }
}

/// The store's directory `STATE/lmdb/` when some process holds its
/// writer `flock` (libfilter `Store::open`), probed without waiting; the
/// probe is let go at once. Only filterd's user (or root) can open that
/// 0700 directory, so a busy lock is a filterd serving from this state
/// dir. `None`: free, or no store there (etcd, whose table's owner key
/// keeps a second filterd from serving; a new state dir). Anything else
/// there — a symbolic link, which `Store::open` would refuse too —
/// refuses the start (libfilter `store::open_store_dir`).
fn busy_store(state: &Path) -> anyhow::Result<Option<File>> {
    use libfilter::store::StoreError;
    let db = match libfilter::store::open_store_dir(&state.join(libfilter::store::STORE_DIR)) {
        Ok(db) => db,
        Err(StoreError::Dir { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    match Flock::lock(db, FlockArg::LockSharedNonblock) {
        Err((db, nix::errno::Errno::EWOULDBLOCK)) => Ok(Some(db)),
        _ => Ok(None),
    }
}

/// Takes the state dir's `flock` on a helper thread once whoever holds it
/// lets go, and holds it until the process exits.
fn take_when_free(dir: File) {
    let r = std::thread::Builder::new()
        .name("state-dir-lock".into())
        .spawn(move || {
            if let Ok(held) = Flock::lock(dir, FlockArg::LockExclusive) {
                info!("the state dir's flock was let go: held from now on");
                // Held for the process's life: the kernel lets go at exit.
                std::mem::forget(held);
            }
        });
    if let Err(e) = r {
        warn!(error = %e, "cannot wait for the state dir's flock");
    }
}

/// Takes away every permission of other users from an existing state dir
/// (`mode & !0o027`, as filterd creates it: 0750), and its group's write
/// permission, so no other user can open it or read what it holds, nor
/// put anything in it. Called once the state dir's lock is held, so a
/// second daemon that is refused leaves the live one's dir open to its
/// group (review rr37b); it takes only its group's and others' write
/// permission away, as every start does before anything is used
/// ([`shut_writers_out`]). Whoever can open the dir can hold its own
/// `flock`, which no longer keeps filterd from starting ([`lock_dir`];
/// review rvacl, rr48c M2).
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
            "state dir tightened: other users could open it"
        ),
        Err(e) => warn!(
            state = %state.display(),
            mode = format!("{mode:04o}"),
            error = %e,
            "cannot tighten the state dir: other users can open it"
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
    check_dir(dir, &[me], 0o022, false)?;
    if let Some(parent) = dir.parent() {
        check_dir(parent, &[me, 0], 0o022, false)?;
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

/// Opens (creating, mode 0600) the lock file `path` (`what`, for errors),
/// never through a symbolic link; one left with a wider mode is narrowed,
/// so no other user can open it.
fn open_lock_file(path: &Path, what: &str) -> anyhow::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening {what} {}", path.display()))?;
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
            Some(f) => open_lock_file(f, "the export root's lock file")?,
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

    /// Only an LMDB filterd narrows and checks `STATE/lmdb/`: an etcd one
    /// is neither refused by a leftover one of another user nor changes
    /// it (review rr49j L4).
    #[test]
    fn only_an_lmdb_filterd_narrows_and_checks_the_store_directory() {
        let state = std::env::temp_dir().join(format!("rkf-etcd-lmdb-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o750)
            .create(&state)
            .unwrap();
        let lmdb = state.join(libfilter::store::STORE_DIR);
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&lmdb)
            .unwrap();
        std::fs::set_permissions(&lmdb, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sigs = SigSet::empty();
        let held = |lmdb_store: bool| match lock(&state, lmdb_store, false, &sigs) {
            Ok(Locked::Held(_)) => Ok(()),
            Ok(Locked::Stopped(sig)) => panic!("stopped by {sig:?}"),
            Err(e) => Err(format!("{e:#}")),
        };
        let mode = || std::fs::metadata(&lmdb).unwrap().mode() & 0o7777;
        held(false).unwrap();
        assert_eq!(mode(), 0o755, "an etcd filterd left lmdb/ as it was");
        if nix::unistd::geteuid().is_root() {
            let nobody = Some(nix::unistd::Uid::from_raw(65534));
            nix::unistd::chown(&lmdb, nobody, None).unwrap();
            held(false).unwrap();
            let e = held(true).unwrap_err();
            assert!(e.contains("belongs to uid 65534"), "{e}");
            nix::unistd::chown(&lmdb, Some(nix::unistd::geteuid()), None).unwrap();
        }
        held(true).unwrap();
        assert_eq!(mode(), 0o700, "an LMDB filterd made lmdb/ private");
        let _ = std::fs::remove_dir_all(&state);
    }
}
