//! The live daemon's runtime record in its state dir (`STATE/filterd.run`).
//!
//! filterd writes it as soon as it holds the state dir's lock (phase
//! `starting`) and again once its socket accepts (phase `serving`), and
//! removes it on a clean shutdown. It names the daemon's pid and socket, so
//! `filterctl --state DIR` finds a live daemon whatever `--socket` it was
//! started with, and never reads the LMDB files behind a running daemon's
//! back. Whether a daemon is alive is decided by the state dir's lock
//! ([`lock_holder`]), not by the record: when nobody holds the lock, the
//! store is at rest and may be read offline.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name in the state dir.
pub const RUNTIME_FILE: &str = "filterd.run";

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

/// Writes the record (atomically: a temporary file renamed over it).
pub fn write(state: &Path, rec: &DaemonRecord) -> Result<(), RuntimeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state.join(RUNTIME_FILE);
    let tmp = state.join(format!("{RUNTIME_FILE}.tmp"));
    let text = serde_json::to_string(rec).map_err(|source| RuntimeError::Corrupt {
        path: path.display().to_string(),
        source,
    })?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads the record; `None` when there is none.
pub fn read(state: &Path) -> Result<Option<DaemonRecord>, RuntimeError> {
    let path = state.join(RUNTIME_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| RuntimeError::Corrupt {
            path: path.display().to_string(),
            source,
        })
}

/// Removes the record (clean shutdown). Absent is fine.
pub fn remove(state: &Path) {
    let _ = std::fs::remove_file(state.join(RUNTIME_FILE));
}

/// The pid of the process holding `state`'s lock (filterd's exclusive
/// `flock` on the directory itself), read from `/proc/locks` without
/// touching the lock: a probe that took it, even shared, could make a
/// daemon starting at that moment refuse to run. A waiting standby's
/// blocked request (`->`) is not a holder. This, not the runtime record,
/// says whether a daemon is alive: the record can be deleted behind a
/// live daemon, and a killed daemon's record names a pid that may linger
/// as a zombie (which holds no lock: its descriptors are closed).
pub fn lock_holder(state: &Path) -> Result<Option<u32>, RuntimeError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(state).map_err(io_err(state))?;
    let dev = meta.dev();
    // The kernel prints MAJOR:MINOR:INODE, major and minor in hex.
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = Path::new("/proc/locks");
    let text = std::fs::read_to_string(locks).map_err(io_err(locks))?;
    Ok(text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, id, ..] if *id == want => pid.parse().ok(),
            _ => None,
        }
    }))
}

/// Whether a daemon serves a state dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// A process (pid) holds the state dir's lock; its runtime record, when
    /// there is one and it names that process.
    Running {
        /// The lock holder.
        pid: u32,
        /// Its record, if present and its own.
        record: Option<DaemonRecord>,
    },
    /// Nobody holds the lock: the store is at rest (a record left behind
    /// by a killed daemon is stale).
    NotRunning,
}

/// Whether a filterd is alive on `state`, by its lock, with its record.
pub fn live(state: &Path) -> Result<Liveness, RuntimeError> {
    Ok(match lock_holder(state)? {
        None => Liveness::NotRunning,
        Some(pid) => Liveness::Running {
            pid,
            record: read(state).ok().flatten().filter(|r| r.pid == pid),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_staleness() {
        let dir = std::env::temp_dir().join(format!("rkf-runtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        assert_eq!(
            live(&dir).unwrap(),
            Liveness::Running {
                pid: std::process::id(),
                record: None
            }
        );
        drop(held);
        assert_eq!(live(&dir).unwrap(), Liveness::NotRunning);
        std::fs::write(dir.join(RUNTIME_FILE), b"nonsense").unwrap();
        assert!(matches!(read(&dir), Err(RuntimeError::Corrupt { .. })));
        remove(&dir);
        assert_eq!(read(&dir).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
