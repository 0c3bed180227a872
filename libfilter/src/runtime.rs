//! The live daemon's runtime record in its state dir (`STATE/filterd.run`).
//!
//! filterd writes it as soon as it holds the state dir's lock (phase
//! `starting`) and again once its socket accepts (phase `serving`), and
//! removes it on a clean shutdown. It names the daemon's pid and socket, so
//! `filterctl --state DIR` finds a live daemon whatever `--socket` it was
//! started with, and never reads the LMDB files behind a running daemon's
//! back. Whether a daemon is alive is decided by the state dir's locks
//! ([`lock_is_held`]), not by the record: when nobody holds them, the
//! store is at rest and may be read offline.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name in the state dir.
pub const RUNTIME_FILE: &str = "filterd.run";

/// The daemon's lock file in the state dir: filterd holds an exclusive
/// `flock` on it (mode 0600, so no other user can open it to hold it).
pub const LOCK_FILE: &str = "filterd.lock";

/// How far the daemon has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Holds the lock; recovering the store, socket not yet accepting.
    Starting,
    /// The socket accepts.
    Serving,
}

/// Who serves a state dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonRecord {
    /// The daemon's process id.
    pub pid: u32,
    /// Its socket (absolute).
    pub socket: PathBuf,
    /// How far it has got.
    pub phase: Phase,
}

/// Reading or writing the runtime record failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a record.
    #[error("{path} is not a filterd runtime record")]
    Corrupt {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes the record (atomically: a temporary file renamed over it), mode
/// 0640: filterctl of the state dir's group reads it.
pub fn write(state: &Path, rec: &DaemonRecord) -> Result<(), RuntimeError> {
    let path = state.join(RUNTIME_FILE);
    let tmp = state.join(format!("{RUNTIME_FILE}.tmp"));
    let text = serde_json::to_string(rec).map_err(|source| RuntimeError::Corrupt {
        path: path.display().to_string(),
        source,
    })?;
    replace_file(&path, &tmp, text.as_bytes(), 0o640).map_err(io_err(&path))
}

/// Replaces `path` with a file holding `bytes` (mode `mode`), written to
/// `tmp` first and renamed over it. `tmp` is always a file of our own: a
/// leftover at its name (a crash mid-write, or a symbolic link someone
/// planted) is removed and the file made anew with `O_EXCL|O_NOFOLLOW`,
/// so the write never follows a link out of the state dir (review rvacl).
pub fn replace_file(path: &Path, tmp: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(tmp, path)
}

/// Reads the record; `None` when there is none.
pub fn read(state: &Path) -> Result<Option<DaemonRecord>, RuntimeError> {
    Ok(read_with_writer(state)?.map(|(rec, _)| rec))
}

/// Reads the record and the uid of its file's owner (who wrote it: the
/// daemon's user, when a daemon did). Only a regular file is read, not
/// through a link at its name, and a FIFO there is not waited on
/// (attack51a L2: another user's "state dir" could hold one, and hang
/// the operator's filterctl).
pub fn read_with_writer(state: &Path) -> Result<Option<(DaemonRecord, u32)>, RuntimeError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = state.join(RUNTIME_FILE);
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let meta = file.metadata().map_err(io_err(&path))?;
    if !meta.is_file() {
        return Err(io_err(&path)(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        )));
    }
    let mut text = String::new();
    Read::by_ref(&mut file)
        .take(64 << 10)
        .read_to_string(&mut text)
        .map_err(io_err(&path))?;
    serde_json::from_str(&text)
        .map(|rec| Some((rec, meta.uid())))
        .map_err(|source| RuntimeError::Corrupt {
            path: path.display().to_string(),
            source,
        })
}

/// Removes the record (clean shutdown). Absent is fine.
pub fn remove(state: &Path) {
    let _ = std::fs::remove_file(state.join(RUNTIME_FILE));
}

/// Whether `pid` is a running filterd (its `/proc/PID/comm` says so).
fn is_live_filterd(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "filterd")
}

/// Whether some process holds `state`'s lock: filterd's exclusive
/// `flock` on [`LOCK_FILE`] (probed when this user may open it: filterd's
/// own user, root), or the one on the directory itself, which filterd
/// takes too and filterds before the lock file took alone. This, not the
/// runtime record, says whether a daemon is alive: the record can be
/// deleted behind a live daemon, and a killed daemon's record names a
/// pid that may linger as a zombie (which holds no lock: its descriptors
/// are closed). Probed by taking a shared lock without waiting and
/// dropping it at once: unlike `/proc/locks`, this sees through pid
/// namespaces and filesystems (btrfs) whose `/proc/locks` device differs
/// from `stat`'s. A daemon starting in that instant retries its own lock
/// (filterd `statedir`). Whoever else can open the directory (a member
/// of its group) can hold its `flock` too: then a daemon is reported
/// alive when none is, which only keeps filterctl from reading the store
/// offline.
pub fn lock_is_held(state: &Path) -> Result<bool, RuntimeError> {
    probe(state).map(|(held, _)| held)
}

/// [`lock_is_held`], and the uid of the state dir's owner. The dir is
/// opened as one, without waiting: a FIFO or device named as the state
/// dir is refused, not waited on or opened (attack51a L2).
fn probe(state: &Path) -> Result<(bool, u32), RuntimeError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let lock_file = state.join(LOCK_FILE);
    // Absent (no filterd of this version ran here) or not ours to open
    // (filterctl of the state dir's group): the dir's flock tells.
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&lock_file)
    {
        if is_flocked(f).map_err(io_err(&lock_file))? {
            let owner = std::fs::metadata(state).map_err(io_err(state))?.uid();
            return Ok((true, owner));
        }
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(state)
        .map_err(io_err(state))?;
    let owner = dir.metadata().map_err(io_err(state))?.uid();
    is_flocked(dir)
        .map(|held| (held, owner))
        .map_err(io_err(state))
}

/// Whether some process holds an exclusive `flock` on `f`'s file.
fn is_flocked(f: std::fs::File) -> std::io::Result<bool> {
    use nix::fcntl::{Flock, FlockArg};
    match Flock::lock(f, FlockArg::LockSharedNonblock) {
        Ok(probe) => {
            drop(probe);
            Ok(false)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, e)) => Err(std::io::Error::from(e)),
    }
}

/// Whether a daemon serves a state dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// A process holds the state dir's lock; its runtime record, if there
    /// is one (its pid is as the daemon's own pid namespace sees it).
    Running {
        /// Its record, if present and readable.
        record: Option<DaemonRecord>,
        /// The user the daemon runs as, as far as the files tell: the
        /// record's owner, or without one the state dir's. A listener at
        /// the socket the record names that runs as another user is not
        /// that daemon (attack51a L3: another user's dir, a lock held
        /// there and a record naming any socket made root's filterctl
        /// talk to it).
        user: u32,
    },
    /// Nobody holds the lock: the store is at rest (a record left behind
    /// by a killed daemon is stale).
    NotRunning,
}

/// Whether a filterd is alive on `state`, by its lock, with its record.
/// A caller who may not open the directory (search permission only) goes
/// by the record instead: alive when its pid is a running filterd.
pub fn live(state: &Path) -> Result<Liveness, RuntimeError> {
    let (held, dir_owner) = match probe(state) {
        Err(RuntimeError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            return Ok(match read_with_writer(state)? {
                Some((r, user)) if is_live_filterd(r.pid) => Liveness::Running {
                    record: Some(r),
                    user,
                },
                _ => Liveness::NotRunning,
            });
        }
        r => r?,
    };
    Ok(if held {
        match read_with_writer(state).ok().flatten() {
            Some((rec, user)) => Liveness::Running {
                record: Some(rec),
                user,
            },
            None => Liveness::Running {
                record: None,
                user: dir_owner,
            },
        }
    } else {
        Liveness::NotRunning
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_staleness() {
        let dir = std::env::temp_dir().join(format!("rkf-runtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(read(&dir).unwrap(), None);
        let rec = DaemonRecord {
            pid: u32::MAX,
            socket: dir.join("s.sock"),
            phase: Phase::Serving,
        };
        write(&dir, &rec).unwrap();
        assert_eq!(read(&dir).unwrap(), Some(rec));
        // Nobody holds the lock: the record is stale.
        assert_eq!(live(&dir).unwrap(), Liveness::NotRunning);
        // Holding the directory's lock is what makes a daemon alive.
        let held = nix::fcntl::Flock::lock(
            std::fs::File::open(&dir).unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        std::fs::write(dir.join(RUNTIME_FILE), b"nonsense").unwrap();
        assert_eq!(
            live(&dir).unwrap(),
            Liveness::Running {
                record: None,
                user: me
            }
        );
        drop(held);
        assert_eq!(live(&dir).unwrap(), Liveness::NotRunning);
        // So does holding the lock file's (filterd holds both; review
        // rr48c M2: a member of the dir's group can hold the dir's too).
        let held = nix::fcntl::Flock::lock(
            std::fs::File::create(dir.join(LOCK_FILE)).unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        assert_eq!(
            live(&dir).unwrap(),
            Liveness::Running {
                record: None,
                user: me
            }
        );
        drop(held);
        assert_eq!(live(&dir).unwrap(), Liveness::NotRunning);
        assert!(matches!(read(&dir), Err(RuntimeError::Corrupt { .. })));
        remove(&dir);
        assert_eq!(read(&dir).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// attack51a L2: a FIFO named as the state dir, or at the record's
    /// name, is refused at once, not waited on for a writer.
    #[test]
    fn a_fifo_as_the_state_dir_or_its_record_is_refused_not_waited_on() {
        let dir = std::env::temp_dir().join(format!("rkf-runtime-fifo-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(live(&fifo), Err(RuntimeError::Io { .. })));
        nix::unistd::mkfifo(
            &dir.join(RUNTIME_FILE),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(matches!(read(&dir), Err(RuntimeError::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The temporary file is made anew, never written through a symbolic
    /// link left at its name (review rvacl: it followed one out of the
    /// state dir), and the record gets mode 0640.
    #[test]
    fn the_record_is_never_written_through_a_link_at_its_temporary_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rkf-runtime-link-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let outside = dir.join("outside");
        std::fs::write(&outside, b"keep me").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join(format!("{RUNTIME_FILE}.tmp"))).unwrap();
        let rec = DaemonRecord {
            pid: 7,
            socket: dir.join("s.sock"),
            phase: Phase::Starting,
        };
        write(&dir, &rec).unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
        assert_eq!(read(&dir).unwrap(), Some(rec));
        let meta = std::fs::symlink_metadata(dir.join(RUNTIME_FILE)).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
