//! An in-memory filesystem behind the engine's port ([`super::fs::Fs`]),
//! for the engine's unit tests: names → files, each file with an inode
//! number and a generation (so a reused inode number can be modelled: the
//! kernel handle carries the generation), a size and a create marker;
//! directories; descriptors; OFD locks per descriptor. It can be told to
//! fail the next call of an operation, and it logs every change it makes
//! (and what the test's committer logs beside it) in order.
//!
//! Descriptors are anonymous (`memfd_create`, one per open, so each is an
//! open file description of its own that a duplicate shares): no file in
//! any directory is ever made. The fake maps a descriptor to its file by
//! the descriptor's own inode number.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use libfilter::locks::LockRange;
use libfilter::model::{Access, Disposition, FileId, HeldLock, KernelHandle, RelPath};
use libfilter::proto::{ErrorCode, WireError};

use super::fs::Fs;
use crate::fsops::{self, OpenedFile};

/// One change the fake made, or a commit the test's committer made, in
/// the order they happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Logged {
    Create(String),
    Truncate(String),
    SetSize(String, u64),
    Rename(String, String),
    Remove(String),
    ClearMarker(String),
    /// A descriptor (of a file or directory: its path) made durable.
    Fsync(String),
    /// The whole filesystem made durable (`syncfs`).
    Syncfs,
    /// A commit, by the names of its store operations.
    Commit(Vec<&'static str>),
    /// A reply the frontend received (request id, success).
    Reply(u64, bool),
}

/// A file as the test compares it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct MemFile {
    pub ino: u64,
    pub gen: u32,
    pub size: u64,
    /// Its change time: bumped by every write and size change.
    pub ctime: u64,
    pub marker: Option<Vec<u8>>,
    /// The change mark: the id of the intent whose size change was made.
    pub change_mark: Option<Vec<u8>>,
    /// Still has a name (unlinked files live on while a descriptor or a
    /// kernel handle could reach them).
    pub linked: bool,
}

enum DescOf {
    File(u64),
    Dir(String),
}

struct Desc {
    of: DescOf,
    locks: Vec<HeldLock>,
}

#[derive(Default)]
struct State {
    /// Path → file object (object ids are never reused; inode numbers may
    /// be).
    names: BTreeMap<String, u64>,
    objs: BTreeMap<u64, MemFile>,
    /// Directories ("" is the root).
    dirs: BTreeSet<String>,
    next_obj: u64,
    next_ino: u64,
    /// A new file takes the inode number of an unlinked one, with the
    /// next generation.
    reuse_inodes: bool,
    /// Descriptors by their own (memfd) inode number.
    descs: HashMap<u64, Desc>,
    /// The next call of an operation fails with an errno.
    fail: Vec<(&'static str, i32)>,
    /// Right before the next call of an operation, a local process
    /// replaces a name with a new file.
    replace: Vec<(&'static str, String)>,
    /// Exclusive fcntl locks local processes hold, on every file.
    local_locks: Vec<LockRange>,
    log: Vec<Logged>,
    /// The root's descriptor [`Fs::filesystem`] gives, made on first use.
    root: Option<Arc<OwnedFd>>,
}

/// The fake; clones share one filesystem (the test keeps one, the engine
/// another).
#[derive(Clone)]
pub(super) struct MemFs {
    inner: Arc<Mutex<State>>,
}

const DEV: u64 = 1;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

fn kernel_handle(f: &MemFile) -> KernelHandle {
    let mut bytes = f.ino.to_le_bytes().to_vec();
    bytes.extend_from_slice(&f.gen.to_le_bytes());
    KernelHandle {
        handle_type: 1,
        bytes,
    }
}

impl MemFs {
    /// An empty root.
    pub(super) fn new() -> MemFs {
        let mut st = State {
            next_obj: 1,
            next_ino: 100,
            ..State::default()
        };
        st.dirs.insert(String::new());
        MemFs {
            inner: Arc::new(Mutex::new(st)),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a file of `size` bytes at `path` (its directory must exist).
    pub(super) fn put(&self, path: &str, size: u64) {
        let mut st = self.st();
        let obj = st.make_file(None);
        if let Some(f) = st.objs.get_mut(&obj) {
            f.size = size;
        }
        st.names.insert(path.to_owned(), obj);
    }

    /// A local process writes `path` up to `size` bytes (no gate sees
    /// it; nothing is logged).
    pub(super) fn write(&self, path: &str, size: u64) {
        let mut st = self.st();
        if let Some(f) = st
            .names
            .get(path)
            .copied()
            .and_then(|o| st.objs.get_mut(&o))
        {
            f.size = f.size.max(size);
            f.ctime += 1;
        }
    }

    /// Adds a directory.
    pub(super) fn mkdir(&self, path: &str) {
        self.st().dirs.insert(path.to_owned());
    }

    /// New files reuse the inode numbers of unlinked ones.
    pub(super) fn reuse_inodes(&self, on: bool) {
        self.st().reuse_inodes = on;
    }

    /// The next call of `op` fails with `errno`.
    pub(super) fn fail_next(&self, op: &'static str, errno: i32) {
        self.st().fail.push((op, errno));
    }

    /// A local process holds (`true`) or lets go of an exclusive fcntl
    /// lock of `range` on every file: a mirror's step over it fails.
    pub(super) fn local_lock(&self, range: LockRange, held: bool) {
        let mut st = self.st();
        st.local_locks.retain(|r| *r != range);
        if held {
            st.local_locks.push(range);
        }
    }

    /// Right before the next call of `op`, a local process replaces
    /// `path` with a new file (not logged: not the engine's).
    pub(super) fn replace_before(&self, op: &'static str, path: &str) {
        self.st().replace.push((op, path.to_owned()));
    }

    /// Appends a commit to the log (the test plays the committer).
    pub(super) fn log_commit(&self, ops: Vec<&'static str>) {
        self.st().log.push(Logged::Commit(ops));
    }

    /// Appends a reply the frontend received to the log.
    pub(super) fn log_reply(&self, id: u64, ok: bool) {
        self.st().log.push(Logged::Reply(id, ok));
    }

    /// A local process unlinks `path` (not logged: not the engine's).
    pub(super) fn unlink(&self, path: &str) {
        self.st().unlink(path);
    }

    /// Everything logged so far, and a fresh log.
    pub(super) fn take_log(&self) -> Vec<Logged> {
        std::mem::take(&mut self.st().log)
    }

    /// The namespace as the test compares it: every name and its file.
    pub(super) fn snapshot(&self) -> BTreeMap<String, MemFile> {
        let st = self.st();
        st.names
            .iter()
            .filter_map(|(p, o)| st.objs.get(o).map(|f| (p.clone(), f.clone())))
            .collect()
    }

    /// The file `path` names.
    pub(super) fn file(&self, path: &str) -> Option<MemFile> {
        let st = self.st();
        st.names.get(path).and_then(|o| st.objs.get(o)).cloned()
    }

    /// The OFD locks a descriptor carries (none for an unknown one).
    pub(super) fn ofd_locks(&self, fd: BorrowedFd<'_>) -> Vec<HeldLock> {
        let st = self.st();
        desc_ino(fd)
            .ok()
            .and_then(|i| st.descs.get(&i))
            .map(|d| d.locks.clone())
            .unwrap_or_default()
    }
}

/// A fake file's stamp: its change counter stands for both times.
pub(super) fn stamp_of(f: &MemFile) -> libfilter::model::FileStamp {
    let t = (i64::try_from(f.ctime).unwrap_or(i64::MAX), 0);
    libfilter::model::FileStamp {
        size: f.size,
        mtime: t,
        ctime: t,
    }
}

fn desc_ino(fd: BorrowedFd<'_>) -> io::Result<u64> {
    nix::sys::stat::fstat(fd)
        .map(|s| s.st_ino)
        .map_err(io::Error::from)
}

impl State {
    /// Drops a name; its file lives on unlinked.
    fn unlink(&mut self, path: &str) {
        if let Some(obj) = self.names.remove(path) {
            if let Some(f) = self.objs.get_mut(&obj) {
                f.linked = false;
            }
        }
    }

    /// The file a descriptor or else a kernel handle reaches.
    fn obj_of(&self, fd: Option<BorrowedFd<'_>>, kh: Option<&KernelHandle>) -> Option<u64> {
        match (fd, kh) {
            (Some(fd), _) => self.obj_of_fd(fd).ok(),
            (None, Some(kh)) => self.obj_of_handle(kh).ok(),
            (None, None) => None,
        }
    }

    fn check(&mut self, op: &'static str) -> io::Result<()> {
        match self.fail.iter().position(|(o, _)| *o == op) {
            Some(i) => Err(errno(self.fail.remove(i).1)),
            None => Ok(()),
        }
    }

    /// What a local process does right before `op` ([`MemFs::replace_before`]).
    fn before(&mut self, op: &'static str) {
        if let Some(i) = self.replace.iter().position(|(o, _)| *o == op) {
            let (_, path) = self.replace.remove(i);
            self.unlink(&path);
            let obj = self.make_file(None);
            self.names.insert(path, obj);
        }
    }

    fn make_file(&mut self, marker: Option<&[u8]>) -> u64 {
        let reused = if self.reuse_inodes {
            self.objs
                .values()
                .filter(|f| !f.linked)
                .map(|f| f.ino)
                .filter(|ino| !self.objs.values().any(|g| g.linked && g.ino == *ino))
                .min()
        } else {
            None
        };
        let (ino, gen) = match reused {
            Some(ino) => {
                let gen = self
                    .objs
                    .values()
                    .filter(|f| f.ino == ino)
                    .map(|f| f.gen)
                    .max()
                    .unwrap_or(0);
                (ino, gen + 1)
            }
            None => {
                self.next_ino += 1;
                (self.next_ino, 1)
            }
        };
        let obj = self.next_obj;
        self.next_obj += 1;
        self.objs.insert(
            obj,
            MemFile {
                ino,
                gen,
                size: 0,
                ctime: 0,
                marker: marker.map(<[u8]>::to_vec),
                change_mark: None,
                linked: true,
            },
        );
        obj
    }

    fn new_desc(&mut self, of: DescOf) -> io::Result<OwnedFd> {
        let fd = nix::sys::memfd::memfd_create(c"memfs", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(io::Error::from)?;
        let ino = desc_ino(std::os::fd::AsFd::as_fd(&fd))?;
        self.descs.insert(
            ino,
            Desc {
                of,
                locks: Vec::new(),
            },
        );
        Ok(fd)
    }

    fn file_desc(&mut self, obj: u64) -> io::Result<(OwnedFd, FileId, u64)> {
        let f = self
            .objs
            .get(&obj)
            .cloned()
            .ok_or_else(|| errno(libc::ESTALE))?;
        let fd = self.new_desc(DescOf::File(obj))?;
        Ok((fd, id(&f), f.size))
    }

    fn obj_of_fd(&self, fd: BorrowedFd<'_>) -> io::Result<u64> {
        match self.descs.get(&desc_ino(fd)?).map(|d| &d.of) {
            Some(DescOf::File(o)) => Ok(*o),
            Some(DescOf::Dir(_)) => Err(errno(libc::EISDIR)),
            None => Err(errno(libc::EBADF)),
        }
    }

    /// The linked file of a kernel handle (a stale or unlinked one:
    /// `ESTALE`, as a proof beneath the root would find).
    fn obj_of_handle(&self, kh: &KernelHandle) -> io::Result<u64> {
        self.objs
            .iter()
            .find(|(_, f)| f.linked && kernel_handle(f) == *kh)
            .map(|(o, _)| *o)
            .ok_or_else(|| errno(libc::ESTALE))
    }

    fn path_of(&self, obj: u64) -> String {
        self.names
            .iter()
            .find(|(_, o)| **o == obj)
            .map_or_else(|| format!("(unlinked {obj})"), |(p, _)| p.clone())
    }

    fn names(&self, path: &str, expect: FileId, kh: Option<&KernelHandle>) -> bool {
        match self.names.get(path).and_then(|o| self.objs.get(o)) {
            Some(f) => id(f) == expect && kh.is_none_or(|k| *k == kernel_handle(f)),
            None => false,
        }
    }

    fn map_errno(&self, e: &io::Error, path: &RelPath) -> WireError {
        let code = match e.raw_os_error() {
            Some(libc::ENOENT) if self.dirs.contains(parent_of(path.as_str())) => {
                ErrorCode::NotFound
            }
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => ErrorCode::PathNotFound,
            Some(libc::EEXIST) => ErrorCode::Collision,
            Some(libc::EISDIR) => ErrorCode::NotAFile,
            Some(libc::ENOSPC) => ErrorCode::DiskFull,
            Some(libc::EACCES) => ErrorCode::AccessDenied,
            Some(libc::EWOULDBLOCK) => ErrorCode::Busy,
            _ => ErrorCode::Internal,
        };
        WireError::new(code, format!("{path}: {e}"))
    }

    /// Resolves `path` for a new name: its directory must exist and the
    /// name must not be a directory.
    fn check_name(&self, path: &str) -> io::Result<()> {
        if !self.dirs.contains(parent_of(path)) {
            return Err(errno(libc::ENOENT));
        }
        if self.dirs.contains(path) {
            return Err(errno(libc::EISDIR));
        }
        Ok(())
    }
}

fn id(f: &MemFile) -> FileId {
    FileId {
        dev: DEV,
        ino: f.ino,
    }
}

impl Fs for MemFs {
    fn open(
        &self,
        path: &RelPath,
        _access: Access,
        disposition: Disposition,
        marker: Option<&[u8]>,
    ) -> Result<OpenedFile, WireError> {
        let mut st = self.st();
        let p = path.as_str();
        let werr = |st: &State, e: io::Error| st.map_errno(&e, path);
        if let Err(e) = st.check("open").and_then(|()| st.check_name(p)) {
            return Err(werr(&st, e));
        }
        let creates = !matches!(disposition, Disposition::Open | Disposition::Overwrite);
        let (obj, created, linked) = match st.names.get(p).copied() {
            Some(obj) => {
                let ours = marker.is_some()
                    && creates
                    && st.objs.get(&obj).and_then(|f| f.marker.as_deref()) == marker;
                if ours {
                    (obj, true, false)
                } else if disposition == Disposition::Create {
                    return Err(werr(&st, errno(libc::EEXIST)));
                } else {
                    (obj, false, false)
                }
            }
            None if !creates => return Err(werr(&st, errno(libc::ENOENT))),
            None => {
                let obj = st.make_file(marker);
                st.names.insert(p.to_owned(), obj);
                st.log.push(Logged::Create(p.to_owned()));
                (obj, true, true)
            }
        };
        let (fd, file, size) = st.file_desc(obj).map_err(|e| werr(&st, e))?;
        Ok(OpenedFile {
            fd,
            created,
            linked,
            file,
            size,
            // No links here.
            through_link: false,
        })
    }

    fn truncate(&self, path: &RelPath, expect: FileId) -> Result<(), WireError> {
        let mut st = self.st();
        if let Err(e) = st.check("truncate") {
            return Err(st.map_errno(&e, path));
        }
        let Some(obj) = st.names.get(path.as_str()).copied() else {
            // As fsops::truncate: removed since the open, a retry.
            return Err(WireError::new(
                ErrorCode::Retry,
                format!("{path}: removed while opening; retry"),
            ));
        };
        match st.objs.get_mut(&obj) {
            Some(f) if id(f) == expect => {
                f.size = 0;
                f.ctime += 1;
            }
            _ => {
                return Err(WireError::new(
                    ErrorCode::Retry,
                    format!("{path}: replaced while opening; retry"),
                ))
            }
        }
        st.log.push(Logged::Truncate(path.as_str().to_owned()));
        Ok(())
    }

    fn truncate_by_handle(&self, kh: &KernelHandle, _path: &RelPath) -> io::Result<OwnedFd> {
        self.set_size_by_handle(kh, None, 0)
    }

    fn set_size_by_handle(
        &self,
        kh: &KernelHandle,
        _path: Option<&RelPath>,
        size: u64,
    ) -> io::Result<OwnedFd> {
        let mut st = self.st();
        st.check(if size == 0 { "truncate" } else { "set_size" })?;
        let obj = st.obj_of_handle(kh)?;
        if let Some(f) = st.objs.get_mut(&obj) {
            f.size = size;
            f.ctime += 1;
        }
        let path = st.path_of(obj);
        st.log.push(if size == 0 {
            Logged::Truncate(path)
        } else {
            Logged::SetSize(path, size)
        });
        st.new_desc(DescOf::File(obj))
    }

    fn reopen(
        &self,
        kh: &KernelHandle,
        _access: Access,
        _path: &RelPath,
        _expect: FileId,
    ) -> io::Result<(OwnedFd, FileId, u64)> {
        let mut st = self.st();
        st.check("reopen")?;
        let obj = st.obj_of_handle(kh)?;
        st.file_desc(obj)
    }

    fn locate_for_recovery(&self, files: &[(&KernelHandle, &RelPath)]) -> Vec<io::Result<FileId>> {
        let mut st = self.st();
        files
            .iter()
            .map(|(kh, _)| {
                st.check("reopen")?;
                let obj = st.obj_of_handle(kh)?;
                st.file_desc(obj).map(|(_, file, _)| file)
            })
            .collect()
    }

    fn mark_change(&self, fd: BorrowedFd<'_>, id: libfilter::model::IntentId) -> io::Result<()> {
        let mut st = self.st();
        let obj = st.obj_of_fd(fd)?;
        if let Some(f) = st.objs.get_mut(&obj) {
            f.change_mark = Some(id.0.as_bytes().to_vec());
        }
        Ok(())
    }

    fn clear_change_mark(
        &self,
        kh: &KernelHandle,
        _path: Option<&RelPath>,
        id: libfilter::model::IntentId,
    ) {
        let mut st = self.st();
        if let Some(f) = st.obj_of(None, Some(kh)).and_then(|o| st.objs.get_mut(&o)) {
            if f.change_mark.as_deref() == Some(id.0.as_bytes()) {
                f.change_mark = None;
            }
        }
    }

    fn redo_size_change(
        &self,
        kh: &KernelHandle,
        path: Option<&RelPath>,
        size: u64,
        before: Option<&libfilter::model::FileStamp>,
        id: libfilter::model::IntentId,
    ) -> io::Result<super::fs::SizeRedo> {
        let obj = self.st().obj_of_handle(kh)?;
        let now = self.st().objs.get(&obj).cloned();
        if now
            .as_ref()
            .and_then(|f| f.change_mark.as_deref())
            .is_some_and(|m| m == id.0.as_bytes())
        {
            // The descriptor recovery fsyncs before recording the change.
            return self
                .st()
                .new_desc(DescOf::File(obj))
                .map(super::fs::SizeRedo::Made);
        }
        if let Some(b) = before {
            if !now
                .as_ref()
                .map(stamp_of)
                .is_some_and(|n| n.same_content_as(b))
            {
                return Ok(super::fs::SizeRedo::Unknown);
            }
        }
        let fd = self.set_size_by_handle(kh, path, size)?;
        // As the host's redo: recovery's own change is marked too.
        self.mark_change(fd.as_fd(), id)?;
        Ok(super::fs::SizeRedo::Redone(fd))
    }

    fn stamp(&self, fd: BorrowedFd<'_>) -> io::Result<libfilter::model::FileStamp> {
        let st = self.st();
        let obj = st.obj_of_fd(fd)?;
        st.objs
            .get(&obj)
            .map(stamp_of)
            .ok_or_else(|| errno(libc::EBADF))
    }

    fn stat(&self, fd: BorrowedFd<'_>) -> io::Result<(FileId, u64)> {
        let st = self.st();
        let obj = st.obj_of_fd(fd)?;
        let f = st.objs.get(&obj).ok_or_else(|| errno(libc::EBADF))?;
        Ok((id(f), f.size))
    }

    fn file_handle_of(&self, fd: BorrowedFd<'_>) -> io::Result<KernelHandle> {
        let st = self.st();
        let obj = st.obj_of_fd(fd)?;
        st.objs
            .get(&obj)
            .map(kernel_handle)
            .ok_or_else(|| errno(libc::EBADF))
    }

    fn clear_marker(&self, fd: Option<BorrowedFd<'_>>, kh: Option<&KernelHandle>, _path: &RelPath) {
        let mut st = self.st();
        let obj = st.obj_of(fd, kh);
        let Some(obj) = obj else {
            return;
        };
        if let Some(f) = st.objs.get_mut(&obj) {
            if f.marker.take().is_some() {
                let path = st.path_of(obj);
                st.log.push(Logged::ClearMarker(path));
            }
        }
    }

    fn restore_marker(
        &self,
        fd: Option<BorrowedFd<'_>>,
        kh: Option<&KernelHandle>,
        _path: &RelPath,
        marker: &[u8],
    ) {
        let mut st = self.st();
        let obj = st.obj_of(fd, kh);
        if let Some(f) = obj.and_then(|o| st.objs.get_mut(&o)) {
            f.marker = Some(marker.to_vec());
        }
    }

    fn remove(
        &self,
        path: &RelPath,
        expect: FileId,
        kh: Option<&KernelHandle>,
    ) -> Result<(), WireError> {
        let mut st = self.st();
        if let Err(e) = st.check("remove") {
            return Err(st.map_errno(&e, path));
        }
        if !st.names(path.as_str(), expect, kh) {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("{path}: not found"),
            ));
        }
        st.unlink(path.as_str());
        st.log.push(Logged::Remove(path.as_str().to_owned()));
        Ok(())
    }

    fn rename(
        &self,
        from: &RelPath,
        to: &RelPath,
        expect: FileId,
        kh: Option<&KernelHandle>,
        replace: bool,
    ) -> Result<(), WireError> {
        let mut st = self.st();
        if let Err(e) = st.check("rename") {
            return Err(st.map_errno(&e, to));
        }
        if !st.names(from.as_str(), expect, kh) {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("{from}: no longer names the open file"),
            ));
        }
        if let Err(e) = st.check_name(to.as_str()) {
            return Err(st.map_errno(&e, to));
        }
        if from == to {
            return Ok(());
        }
        if st.names.contains_key(to.as_str()) && !replace {
            return Err(st.map_errno(&errno(libc::EEXIST), to));
        }
        if let Some(obj) = st.names.remove(from.as_str()) {
            if let Some(old) = st.names.insert(to.as_str().to_owned(), obj) {
                if let Some(f) = st.objs.get_mut(&old) {
                    f.linked = false;
                }
            }
        }
        st.log.push(Logged::Rename(
            from.as_str().to_owned(),
            to.as_str().to_owned(),
        ));
        Ok(())
    }

    fn rename_directory(
        &self,
        from: &RelPath,
        to: &RelPath,
        replace: bool,
        // Directories have no identity in the fake.
        _expect: Option<FileId>,
    ) -> Result<(), WireError> {
        let mut st = self.st();
        if let Err(e) = st.check("rename") {
            return Err(st.map_errno(&e, to));
        }
        let (f, t) = (from.as_str(), to.as_str());
        if !st.dirs.contains(f) {
            if st.names.contains_key(f) {
                return Err(WireError::new(
                    ErrorCode::NotAFile,
                    format!("{from}: not a directory"),
                ));
            }
            return Err(st.map_errno(&errno(libc::ENOENT), from));
        }
        let inside = |p: &str, d: &str| p.strip_prefix(d).is_some_and(|r| r.starts_with('/'));
        let refused = if !st.dirs.contains(parent_of(t)) {
            Some(libc::ENOENT)
        } else if inside(t, f) {
            Some(libc::EINVAL)
        } else if st.names.contains_key(t) {
            Some(libc::ENOTDIR)
        } else if st.dirs.contains(t) && !replace {
            Some(libc::EEXIST)
        } else if st.dirs.iter().any(|d| inside(d, t)) || st.names.keys().any(|n| inside(n, t)) {
            Some(libc::ENOTEMPTY)
        } else {
            None
        };
        if let Some(e) = refused {
            return Err(st.map_errno(&errno(e), to));
        }
        if f == t {
            return Ok(());
        }
        let moved = |p: &str| -> Option<String> {
            if p == f {
                Some(t.to_owned())
            } else {
                inside(p, f).then(|| format!("{t}{}", &p[f.len()..]))
            }
        };
        st.dirs.remove(t);
        let dirs: Vec<String> = st
            .dirs
            .iter()
            .filter(|d| moved(d).is_some())
            .cloned()
            .collect();
        for d in dirs {
            st.dirs.remove(&d);
            if let Some(n) = moved(&d) {
                st.dirs.insert(n);
            }
        }
        let names: Vec<String> = st
            .names
            .keys()
            .filter(|n| moved(n).is_some())
            .cloned()
            .collect();
        for n in names {
            if let (Some(obj), Some(new)) = (st.names.remove(&n), moved(&n)) {
                st.names.insert(new, obj);
            }
        }
        st.log.push(Logged::Rename(f.to_owned(), t.to_owned()));
        Ok(())
    }

    fn names(&self, path: &RelPath, expect: FileId, kh: Option<&KernelHandle>) -> bool {
        self.st().names(path.as_str(), expect, kh)
    }

    fn identity_at(&self, path: &RelPath) -> Option<(FileId, KernelHandle)> {
        let mut st = self.st();
        st.before("identity_at");
        st.names
            .get(path.as_str())
            .and_then(|o| st.objs.get(o))
            .map(|f| (id(f), kernel_handle(f)))
    }

    fn file_at_checked(&self, path: &RelPath) -> Result<Option<FileId>, WireError> {
        let mut st = self.st();
        st.before("file_at_checked");
        Ok(st
            .names
            .get(path.as_str())
            .and_then(|o| st.objs.get(o))
            .map(id))
    }

    fn path_has_link(&self, _path: &RelPath) -> bool {
        false
    }

    fn place_of_path(&self, path: &RelPath) -> Option<std::path::PathBuf> {
        Some(path.as_str().into())
    }

    fn place_of_file(
        &self,
        _fd: Option<BorrowedFd<'_>>,
        _kh: Option<&KernelHandle>,
        _path: &RelPath,
    ) -> Option<std::path::PathBuf> {
        None
    }

    fn dir_of(&self, path: &RelPath) -> io::Result<OwnedFd> {
        let mut st = self.st();
        st.check("dir_of")?;
        let parent = parent_of(path.as_str()).to_owned();
        if !st.dirs.contains(&parent) {
            return Err(errno(libc::ENOENT));
        }
        st.new_desc(DescOf::Dir(parent))
    }

    fn filesystem(&self) -> Arc<OwnedFd> {
        let mut st = self.st();
        if let Some(r) = &st.root {
            return Arc::clone(r);
        }
        let r = Arc::new(
            st.new_desc(DescOf::Dir(String::new()))
                .expect("a descriptor for the fake's root"),
        );
        st.root = Some(Arc::clone(&r));
        r
    }

    fn syncfs(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut st = self.st();
        st.check("syncfs")?;
        if !st.descs.contains_key(&desc_ino(fd)?) {
            return Err(errno(libc::EBADF));
        }
        st.log.push(Logged::Syncfs);
        Ok(())
    }

    fn fsync(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut st = self.st();
        st.check("fsync")?;
        let what = match st.descs.get(&desc_ino(fd)?).map(|d| &d.of) {
            Some(DescOf::File(o)) => st.path_of(*o),
            Some(DescOf::Dir(d)) => format!("{d}/"),
            None => return Err(errno(libc::EBADF)),
        };
        st.log.push(Logged::Fsync(what));
        Ok(())
    }

    /// A failed mirror leaves the descriptor's locks as they were (the
    /// real one keeps every range held before and held still, and takes
    /// the parts that did not fail: `fsops::mirror_ofd_locks`). A step of
    /// the real mirror that meets a [`MemFs::local_lock`] fails, and the
    /// failure says whether it asked for more than `before`.
    fn mirror_ofd_locks(
        &self,
        fd: BorrowedFd<'_>,
        locks: &[HeldLock],
        before: &[HeldLock],
    ) -> Result<(), fsops::OfdFailure> {
        let mut st = self.st();
        st.check("mirror").map_err(fsops::OfdFailure::all)?;
        let failed: Vec<fsops::OfdStep> = fsops::ofd_steps(locks, before)
            .into_iter()
            .filter(|step| {
                step.lock().is_some()
                    && st
                        .local_locks
                        .iter()
                        .any(|r| step.overlaps(r.offset, r.end()))
            })
            .collect();
        if !failed.is_empty() {
            return Err(fsops::OfdFailure {
                error: errno(libc::EAGAIN),
                takes_new: failed
                    .iter()
                    .any(|step| fsops::failure_takes_new(step, before)),
            });
        }
        let ino = desc_ino(fd).map_err(fsops::OfdFailure::all)?;
        let d = st
            .descs
            .get_mut(&ino)
            .ok_or_else(|| fsops::OfdFailure::all(errno(libc::EBADF)))?;
        d.locks = locks
            .iter()
            .filter(|l| l.range.length != 0)
            .cloned()
            .collect();
        Ok(())
    }

    fn map_errno(&self, e: &io::Error, path: &RelPath) -> WireError {
        self.st().map_errno(e, path)
    }
}
