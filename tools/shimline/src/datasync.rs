//! Durable writes with group commit for data: a WRITE on a persistent
//! handle is on stable storage before its reply (a node failure after the
//! reply must not lose it — why Windows makes every write to a
//! continuously-available share write-through), and concurrent writers of
//! one open share an `fdatasync` instead of queueing one each.

use std::fs::File;
use std::sync::{Condvar, Mutex};

/// A frontend's descriptor of an open file, with the bookkeeping that lets
/// concurrent writers share a data sync.
pub struct SyncedFile {
    file: File,
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Writes that asked to be made durable.
    asked: u64,
    /// Writes known durable.
    synced: u64,
    /// A sync is running (its caller will cover everything asked before it
    /// started).
    running: bool,
    /// A sync failed: the error (its errno) every later one reports. Linux
    /// reports a writeback error to a file description once and may have
    /// dropped the dirty pages it could not write, so a later `fdatasync`
    /// that succeeds proves nothing about the writes before it: once one
    /// failed, no write through this descriptor is promised durable again
    /// (PostgreSQL's fsync lesson). Without it the writers that waited
    /// behind the failed sync ran their own, got success and were told
    /// their writes were durable (review: failed data sync reported once).
    failed: Option<FailedSync>,
}

/// What a failed data sync said, kept to report again.
#[derive(Clone, Copy)]
enum FailedSync {
    Errno(i32),
    Kind(std::io::ErrorKind),
}

impl FailedSync {
    fn of(e: &std::io::Error) -> FailedSync {
        e.raw_os_error()
            .map_or(FailedSync::Kind(e.kind()), FailedSync::Errno)
    }

    fn error(self) -> std::io::Error {
        match self {
            FailedSync::Errno(n) => std::io::Error::from_raw_os_error(n),
            FailedSync::Kind(k) => std::io::Error::new(k, "an earlier data sync failed"),
        }
    }
}

/// The error of a call made after a sync of the file had failed (it
/// covered no write of this call): the failure is the earlier sync's, not
/// this call's ([`SyncedFile::sync_written`]). A protocol may answer it
/// apart — smbshim does: a client that freed space and retries must not
/// hear "disk full" for good.
#[derive(Debug)]
pub struct EarlierSyncFailed(std::io::Error);

impl std::fmt::Display for EarlierSyncFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "an earlier data sync of this open failed ({}): reopen and rewrite",
            self.0
        )
    }
}

impl std::error::Error for EarlierSyncFailed {}

impl EarlierSyncFailed {
    fn error(failed: FailedSync) -> std::io::Error {
        let e = failed.error();
        std::io::Error::new(e.kind(), EarlierSyncFailed(e))
    }

    /// The earlier failure `e` reports, if it is one.
    pub fn of(e: &std::io::Error) -> Option<&std::io::Error> {
        e.get_ref()?
            .downcast_ref::<EarlierSyncFailed>()
            .map(|x| &x.0)
    }
}

impl From<File> for SyncedFile {
    fn from(file: File) -> Self {
        SyncedFile {
            file,
            state: Mutex::new(SyncState::default()),
            done: Condvar::new(),
        }
    }
}

impl std::ops::Deref for SyncedFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

impl SyncedFile {
    /// Makes every write done through this file before the call durable:
    /// one `fdatasync` covers every writer that asked while it ran or
    /// before it started. Once a sync has failed, this fails for every
    /// writer not already answered durable with its error, and for every
    /// later call with an [`EarlierSyncFailed`] of it (see
    /// `SyncState::failed`).
    pub fn sync_written(&self) -> std::io::Result<()> {
        self.sync_written_by(|f| f.sync_data())
    }

    /// `sync_written`, with `sync` as the data sync (a test's can fail).
    #[doc(hidden)]
    pub fn sync_written_by(
        &self,
        sync: impl Fn(&File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let lock = || self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = lock();
        if let Some(failed) = s.failed {
            return Err(EarlierSyncFailed::error(failed));
        }
        s.asked += 1;
        let mine = s.asked;
        loop {
            if s.synced >= mine {
                return Ok(());
            }
            if let Some(failed) = s.failed {
                return Err(failed.error());
            }
            if s.running {
                s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.running = true;
            let covers = s.asked;
            drop(s);
            let r = sync(&self.file);
            s = lock();
            s.running = false;
            match &r {
                Ok(()) => s.synced = s.synced.max(covers),
                Err(e) => s.failed = Some(FailedSync::of(e)),
            }
            self.done.notify_all();
            r?;
        }
    }
}

/// Whether a READ of `wanted` bytes at `offset` that got `got` reached the
/// end of `file`: a short read, or a full one that ends at or past the
/// file's size. That is NFSv4's READ `eof` (RFC 8881 18.22.3), nfsshim's
/// answer, so a client reading a file whole stops without one more READ
/// that returns nothing. (smbshim keeps SMB's way: only a short read.)
pub fn read_reached_eof(file: &File, offset: u64, got: usize, wanted: usize) -> bool {
    if got < wanted {
        return true;
    }
    let end = offset.saturating_add(u64::try_from(got).unwrap_or(u64::MAX));
    file.metadata().is_ok_and(|m| end >= m.len())
}

/// Whether `length` bytes at `offset` lie within the offsets a file can
/// have (up to `i64::MAX`, the kernel's `loff_t`). A READ or WRITE past
/// them is the client's mistake, answered as bad input before any
/// pread/pwrite: the kernel's EINVAL or EFBIG for it would otherwise come
/// back as a server or disk failure (review r4 #2).
pub fn in_file_range(offset: u64, length: u64) -> bool {
    offset
        .checked_add(length)
        .is_some_and(|end| i64::try_from(end).is_ok())
}

/// What a failed pread, pwrite or data sync says, for the protocol
/// status: only running out of space (or quota) is a full disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFailure {
    /// ENOSPC or EDQUOT.
    NoSpace,
    /// EINVAL or EFBIG: a range the file system cannot hold (bad input).
    BadRange,
    /// Anything else: the server's own failure.
    Server,
}

impl IoFailure {
    /// The failure `e` is.
    pub fn of(e: &std::io::Error) -> IoFailure {
        // An earlier sync's failure is classed as that sync's was.
        let e = EarlierSyncFailed::of(e).unwrap_or(e);
        match e.raw_os_error() {
            Some(nix::libc::ENOSPC | nix::libc::EDQUOT) => IoFailure::NoSpace,
            Some(nix::libc::EINVAL | nix::libc::EFBIG) => IoFailure::BadRange,
            _ => IoFailure::Server,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_range_ends_at_the_largest_signed_offset() {
        let top = u64::try_from(i64::MAX).unwrap();
        assert!(in_file_range(0, 0));
        assert!(in_file_range(top - 1, 1));
        assert!(in_file_range(top, 0));
        assert!(!in_file_range(top, 1));
        assert!(!in_file_range(u64::MAX, 10));
        assert!(!in_file_range(u64::MAX - 1, 3));
    }

    #[test]
    fn only_running_out_of_space_is_a_full_disk() {
        let of = |e| IoFailure::of(&std::io::Error::from_raw_os_error(e));
        assert_eq!(of(nix::libc::ENOSPC), IoFailure::NoSpace);
        assert_eq!(of(nix::libc::EDQUOT), IoFailure::NoSpace);
        assert_eq!(of(nix::libc::EFBIG), IoFailure::BadRange);
        assert_eq!(of(nix::libc::EINVAL), IoFailure::BadRange);
        assert_eq!(of(nix::libc::EBADF), IoFailure::Server);
        assert_eq!(of(nix::libc::EIO), IoFailure::Server);
    }
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    /// A new, empty file of this test run, named after `name`.
    fn scratch(name: &str) -> (std::path::PathBuf, Arc<SyncedFile>) {
        let p = std::env::temp_dir().join(format!("shimline-{name}-{}", std::process::id()));
        let f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        (p, Arc::new(SyncedFile::from(f)))
    }

    /// Writers Y and Z wait behind X's sync; the sync one of them runs for
    /// both fails (EIO), and a sync after it succeeds, as Linux's does once
    /// it has reported a writeback error. Neither Y nor Z may hear its
    /// write is durable, nor may a writer after them.
    #[test]
    fn a_failed_sync_fails_every_writer_it_covered_and_later_ones() {
        let (p, f) = scratch("syncfail");
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let asked = |f: &SyncedFile| f.state.lock().unwrap().asked;
        let writer = || {
            let (f, calls) = (f.clone(), calls.clone());
            std::thread::spawn(move || {
                f.sync_written_by(|_| {
                    match calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                        // X's sync: returns once Y and Z wait behind it.
                        0 => {
                            while asked(&f) < 3 {
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                            Ok(())
                        }
                        1 => Err(std::io::Error::from_raw_os_error(nix::libc::EIO)),
                        _ => Ok(()),
                    }
                })
            })
        };
        let x = writer();
        while !f.state.lock().unwrap().running {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (y, z) = (writer(), writer());
        assert!(x.join().unwrap().is_ok());
        for t in [y, z] {
            let e = t
                .join()
                .unwrap()
                .expect_err("a writer the failed sync covered");
            assert_eq!(e.raw_os_error(), Some(nix::libc::EIO));
        }
        let later = writer().join().unwrap().expect_err("a later writer");
        assert_eq!(
            EarlierSyncFailed::of(&later).and_then(|e| e.raw_os_error()),
            Some(nix::libc::EIO),
            "{later}"
        );
        assert_eq!(IoFailure::of(&later), IoFailure::Server);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn concurrent_writers_all_return_durable() {
        let (p, f) = scratch("sync");
        let ts: Vec<_> = (0..8u64)
            .map(|i| {
                let f = f.clone();
                std::thread::spawn(move || {
                    f.write_all_at(b"x", i).unwrap();
                    f.sync_written().unwrap();
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        let s = f.state.lock().unwrap();
        assert_eq!((s.asked, s.synced >= s.asked, s.running), (8, true, false));
        let _ = std::fs::remove_file(&p);
    }
}
