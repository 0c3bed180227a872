//! The engine's filesystem port: every filesystem operation the engine
//! performs, behind one object-safe trait.
//!
//! The engine decides (which handles, records, intents and replies) and
//! asks this port for each filesystem effect; it never names a syscall
//! itself. [`HostFs`] is the daemon's implementation: it owns the export
//! root's descriptor and delegates to [`crate::fsops`], where every path is
//! resolved beneath the root with `openat2` (invariant 6). The engine's
//! unit tests put an in-memory filesystem in its place (`engine::memfs`),
//! so its transactions run without files, sockets or threads, and the
//! order of filesystem effects against commits can be checked from the
//! fake's operation log.
//!
//! Descriptors still cross the port as [`OwnedFd`]s: the engine keeps one
//! per handle and hands duplicates to frontends, and the committer fsyncs
//! those of changed files and directories before a commit. (The fake
//! returns anonymous descriptors, never files in a directory.)

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use libfilter::model::{
    Access, Disposition, FileId, FileStamp, HeldLock, IntentId, KernelHandle, RelPath,
};
use libfilter::proto::WireError;
use libfilter::store::StateStore;

use crate::fsops::{self, OpenedFile};

/// What recovery found of an interrupted size change
/// ([`Fs::redo_size_change`]).
#[derive(Debug)]
pub enum SizeRedo {
    /// The file carries the change's mark: it was made before the crash —
    /// into the page cache at least: the completion's fsync may have
    /// failed or never run, so the descriptor is to be fsync'd before the
    /// commit that records it, as a redone change's is.
    Made(OwnedFd),
    /// It had not been made (the file was untouched): made now; the
    /// descriptor is to be fsync'd before the commit that records it.
    Redone(OwnedFd),
    /// The file's content moved and no mark proves the change: it may or
    /// may not have been made. Nothing was done.
    Unknown,
}

/// Every filesystem operation of the engine. Paths are client paths,
/// relative to the export root; no operation may reach outside it.
pub trait Fs: Send {
    /// Opens `path` per `disposition` without truncating; with `marker`
    /// (a persistent open with a create GUID) a file it creates carries it,
    /// and an existing file with the same marker counts as created
    /// ([`fsops::open`]).
    fn open(
        &self,
        path: &RelPath,
        access: Access,
        disposition: Disposition,
        marker: Option<&[u8]>,
    ) -> Result<OpenedFile, WireError>;

    /// Truncates the file `expect` names at `path` to zero, checking it is
    /// still that file ([`fsops::truncate`]).
    fn truncate(&self, path: &RelPath, expect: FileId) -> Result<(), WireError>;

    /// Truncates the file of kernel handle `kh` to zero; returns the
    /// descriptor to fsync before the commit that records it.
    fn truncate_by_handle(&self, kh: &KernelHandle, path: &RelPath) -> io::Result<OwnedFd>;

    /// Sets the size of the file of kernel handle `kh`; returns the
    /// descriptor to fsync before the commit that records it.
    fn set_size_by_handle(
        &self,
        kh: &KernelHandle,
        path: Option<&RelPath>,
        size: u64,
    ) -> io::Result<OwnedFd>;

    /// Marks the file behind `fd` (a descriptor [`Fs::set_size_by_handle`]
    /// or [`Fs::truncate_by_handle`] gave) as changed by intent `id`: the
    /// proof recovery trusts ([`Fs::redo_size_change`]). `Err`: the file
    /// cannot carry the mark (no extended attributes).
    fn mark_change(&self, fd: BorrowedFd<'_>, id: IntentId) -> io::Result<()>;

    /// Removes intent `id`'s change mark once the change's completion is
    /// durable, only if the file's mark still names `id` (a later change
    /// may have marked it since). Best effort.
    fn clear_change_mark(&self, kh: &KernelHandle, path: Option<&RelPath>, id: IntentId);

    /// Recovery's look at an interrupted size change of intent `id` on the
    /// file of kernel handle `kh`: made (the file carries the intent's
    /// mark), made now (the file is still as `before` says, or there is no
    /// stamp: an old intent), or unknown (the content moved and nothing
    /// proves the change: a local write while filterd was down looks the
    /// same as the change) — then nothing is done.
    fn redo_size_change(
        &self,
        kh: &KernelHandle,
        path: Option<&RelPath>,
        size: u64,
        before: Option<&FileStamp>,
        id: IntentId,
    ) -> io::Result<SizeRedo>;

    /// The stamp of the file behind a descriptor this port gave.
    fn stamp(&self, fd: BorrowedFd<'_>) -> io::Result<FileStamp>;

    /// Reopens the file of kernel handle `kh` (proven beneath the root) for
    /// `access`: its descriptor, identity and size.
    fn reopen(
        &self,
        kh: &KernelHandle,
        access: Access,
        path: &RelPath,
        expect: FileId,
    ) -> io::Result<(OwnedFd, FileId, u64)>;

    /// Recovery's look at persistent handles' files, given each one's
    /// kernel handle and recorded path: is it there (linked), and which
    /// file is it — one answer per entry, in order. Keeps no descriptor;
    /// may look at several files at once ([`fsops::locate_all_for_recovery`]).
    fn locate_for_recovery(&self, files: &[(&KernelHandle, &RelPath)]) -> Vec<io::Result<FileId>>;

    /// An `O_PATH` descriptor of the file behind a descriptor this port
    /// gave (what an attribute-only open holds): it stats the file, never
    /// reads or writes it.
    fn path_only(&self, fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
        libfilter::sys::reopen_path_only(fd)
    }

    /// Identity and size of the file behind a descriptor this port gave.
    fn stat(&self, fd: BorrowedFd<'_>) -> io::Result<(FileId, u64)>;

    /// The kernel handle of the file behind a descriptor this port gave.
    fn file_handle_of(&self, fd: BorrowedFd<'_>) -> io::Result<KernelHandle>;

    /// Removes the create marker of a file whose persistent handle goes
    /// away. Best effort.
    fn clear_marker(&self, fd: Option<BorrowedFd<'_>>, kh: Option<&KernelHandle>, path: &RelPath);

    /// Puts back a create marker [`Fs::clear_marker`] removed (its close
    /// did not commit). Best effort.
    fn restore_marker(
        &self,
        fd: Option<BorrowedFd<'_>>,
        kh: Option<&KernelHandle>,
        path: &RelPath,
        marker: &[u8],
    );

    /// Removes `path`, which must still name `expect` (and `kh`).
    fn remove(
        &self,
        path: &RelPath,
        expect: FileId,
        kh: Option<&KernelHandle>,
    ) -> Result<(), WireError>;

    /// Renames `from` (which must still name `expect`) to `to`.
    fn rename(
        &self,
        from: &RelPath,
        to: &RelPath,
        expect: FileId,
        kh: Option<&KernelHandle>,
        replace: bool,
    ) -> Result<(), WireError>;

    /// Renames directory `from` to `to` (replacing an empty directory
    /// there with `replace`); `NotAFile` when `from` is no directory,
    /// `NotFound` when it is not `expect`.
    fn rename_directory(
        &self,
        from: &RelPath,
        to: &RelPath,
        replace: bool,
        expect: Option<FileId>,
    ) -> Result<(), WireError>;

    /// Whether `path` names the file `expect` (and `kh`) now.
    fn names(&self, path: &RelPath, expect: FileId, kh: Option<&KernelHandle>) -> bool;

    /// The identity and kernel handle of the file `path` names, both from
    /// one look at one file (`None`: nothing there, or no kernel handle).
    fn identity_at(&self, path: &RelPath) -> Option<(FileId, KernelHandle)>;

    /// Which file `path` names now; a path that leaves the root is an error.
    fn file_at_checked(&self, path: &RelPath) -> Result<Option<FileId>, WireError>;

    /// Whether resolving `path` passes through a symbolic link
    /// ([`fsops::path_has_link`]).
    fn path_has_link(&self, path: &RelPath) -> bool;

    /// Where what `path` names lies now, relative to the root, links on
    /// the way resolved ([`fsops::place_of_path`]).
    fn place_of_path(&self, path: &RelPath) -> Option<std::path::PathBuf>;

    /// Where a handle's file lies now, relative to the root: by its
    /// descriptor, else by its kernel handle and recorded `path`
    /// ([`fsops::place`], [`fsops::place_of_handle`]); `None` when it is
    /// gone, outside the root, or cannot be told.
    fn place_of_file(
        &self,
        fd: Option<BorrowedFd<'_>>,
        kh: Option<&KernelHandle>,
        path: &RelPath,
    ) -> Option<std::path::PathBuf>;

    /// The directory holding `path`, opened to be fsync'd.
    fn dir_of(&self, path: &RelPath) -> io::Result<OwnedFd>;

    /// A descriptor on the export root's filesystem, the one this port
    /// holds (no new descriptor): what a `syncfs` makes durable when a
    /// change's directory cannot be opened to be fsync'd — no descriptor
    /// left, or a directory filterd may write but not read
    /// (`ToSync::add_dir_of`).
    fn filesystem(&self) -> Arc<OwnedFd>;

    /// Makes everything on the filesystem of `fd` durable (`syncfs`).
    fn syncfs(&self, fd: BorrowedFd<'_>) -> io::Result<()>;

    /// Makes a descriptor's changes durable (recovery; the committer
    /// syncs a round's descriptors itself).
    fn fsync(&self, fd: BorrowedFd<'_>) -> io::Result<()>;

    /// Mirrors a handle's byte-range locks as OFD locks on its own lock
    /// descriptor, never freeing a range held before and held still.
    /// `EAGAIN`/`EACCES`: a local process holds a conflicting lock; a
    /// failure leaves every range held before locked, and says whether a
    /// failed part asked for more than `before`, what the handle held.
    fn mirror_ofd_locks(
        &self,
        fd: BorrowedFd<'_>,
        locks: &[HeldLock],
        before: &[HeldLock],
    ) -> Result<(), fsops::OfdFailure>;

    /// Maps an errno from resolving `path` to a wire error.
    fn map_errno(&self, e: &io::Error, path: &RelPath) -> WireError;
}

/// The daemon's filesystem: the export root's descriptor and
/// [`crate::fsops`].
pub struct HostFs {
    /// Shared with the committer for a `syncfs` ([`Fs::filesystem`]).
    root: Arc<OwnedFd>,
    /// Whose ownership every change is fenced by ([`HostFs::fence`]).
    store: Arc<dyn StateStore>,
}

impl HostFs {
    /// Over the export root's descriptor; every rename, remove, size
    /// change and create is made only while this daemon still owns `store`.
    pub fn new(root: OwnedFd, store: Arc<dyn StateStore>) -> HostFs {
        HostFs {
            root: Arc::new(root),
            store,
        }
    }

    fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The fence right before each non-idempotent filesystem change (a
    /// rename, remove, size change or create: [`fsops::Fence`]): a shared
    /// store's owner whose lease may have run out makes no change
    /// (docs/ARCHITECTURE.md, "A change in flight at a takeover"). The
    /// engine checked as the step began (`Engine::begin_request`), but a
    /// process frozen after that check and before the change — during the
    /// lookups and the open by handle that prepare it, each of which can
    /// block on a shared filesystem — would otherwise make it after
    /// another daemon took over and recovered its intent. Failpoint
    /// `fs.before_change` stalls here, before the check.
    fn fence(&self) {
        crate::failpoint::hit("fs.before_change");
        if let Err(e) = self.store.owner_check() {
            super::step_down(&e);
        }
    }
}

impl Fs for HostFs {
    fn open(
        &self,
        path: &RelPath,
        access: Access,
        disposition: Disposition,
        marker: Option<&[u8]>,
    ) -> Result<OpenedFile, WireError> {
        fsops::open(self.root(), path, access, disposition, marker, &|| {
            self.fence()
        })
    }

    fn truncate(&self, path: &RelPath, expect: FileId) -> Result<(), WireError> {
        fsops::truncate(self.root(), path, expect, &|| self.fence())
    }

    fn truncate_by_handle(&self, kh: &KernelHandle, path: &RelPath) -> io::Result<OwnedFd> {
        fsops::truncate_by_handle(self.root(), kh, path, &|| self.fence())
    }

    fn set_size_by_handle(
        &self,
        kh: &KernelHandle,
        path: Option<&RelPath>,
        size: u64,
    ) -> io::Result<OwnedFd> {
        fsops::set_size_by_handle(self.root(), kh, path, size, &|| self.fence())
    }

    fn reopen(
        &self,
        kh: &KernelHandle,
        access: Access,
        path: &RelPath,
        expect: FileId,
    ) -> io::Result<(OwnedFd, FileId, u64)> {
        fsops::reopen(self.root(), kh, access, path, expect)
    }

    fn locate_for_recovery(&self, files: &[(&KernelHandle, &RelPath)]) -> Vec<io::Result<FileId>> {
        fsops::locate_all_for_recovery(self.root(), files)
    }

    fn stat(&self, fd: BorrowedFd<'_>) -> io::Result<(FileId, u64)> {
        fsops::stat(fd)
    }

    fn mark_change(&self, fd: BorrowedFd<'_>, id: IntentId) -> io::Result<()> {
        fsops::mark_change(self.root(), fd, id)
    }

    fn clear_change_mark(&self, kh: &KernelHandle, path: Option<&RelPath>, id: IntentId) {
        fsops::clear_change_mark(self.root(), kh, path, id)
    }

    fn redo_size_change(
        &self,
        kh: &KernelHandle,
        path: Option<&RelPath>,
        size: u64,
        before: Option<&FileStamp>,
        id: IntentId,
    ) -> io::Result<SizeRedo> {
        fsops::redo_size_change(self.root(), kh, path, size, before, id, &|| self.fence())
    }

    fn stamp(&self, fd: BorrowedFd<'_>) -> io::Result<FileStamp> {
        fsops::stamp(fd)
    }

    fn file_handle_of(&self, fd: BorrowedFd<'_>) -> io::Result<KernelHandle> {
        libfilter::sys::file_handle_of(fd)
    }

    fn clear_marker(&self, fd: Option<BorrowedFd<'_>>, kh: Option<&KernelHandle>, path: &RelPath) {
        fsops::clear_marker(self.root(), fd, kh, path)
    }

    fn restore_marker(
        &self,
        fd: Option<BorrowedFd<'_>>,
        kh: Option<&KernelHandle>,
        path: &RelPath,
        marker: &[u8],
    ) {
        fsops::restore_marker(self.root(), fd, kh, path, marker)
    }

    fn remove(
        &self,
        path: &RelPath,
        expect: FileId,
        kh: Option<&KernelHandle>,
    ) -> Result<(), WireError> {
        fsops::remove(self.root(), path, expect, kh, &|| self.fence())
    }

    fn rename(
        &self,
        from: &RelPath,
        to: &RelPath,
        expect: FileId,
        kh: Option<&KernelHandle>,
        replace: bool,
    ) -> Result<(), WireError> {
        fsops::rename(self.root(), from, to, expect, kh, replace, &|| self.fence())
    }

    fn rename_directory(
        &self,
        from: &RelPath,
        to: &RelPath,
        replace: bool,
        expect: Option<FileId>,
    ) -> Result<(), WireError> {
        fsops::rename_directory(self.root(), from, to, replace, expect, &|| self.fence())
    }

    fn names(&self, path: &RelPath, expect: FileId, kh: Option<&KernelHandle>) -> bool {
        fsops::names(self.root(), path, expect, kh)
    }

    fn identity_at(&self, path: &RelPath) -> Option<(FileId, KernelHandle)> {
        fsops::identity_at(self.root(), path)
    }

    fn file_at_checked(&self, path: &RelPath) -> Result<Option<FileId>, WireError> {
        fsops::file_at_checked(self.root(), path)
    }

    fn path_has_link(&self, path: &RelPath) -> bool {
        fsops::path_has_link(self.root(), path)
    }

    fn place_of_path(&self, path: &RelPath) -> Option<std::path::PathBuf> {
        fsops::place_of_path(self.root(), path)
    }

    fn place_of_file(
        &self,
        fd: Option<BorrowedFd<'_>>,
        kh: Option<&KernelHandle>,
        path: &RelPath,
    ) -> Option<std::path::PathBuf> {
        match (fd, kh) {
            (Some(fd), _) => fsops::place(self.root(), fd),
            (None, Some(kh)) => fsops::place_of_handle(self.root(), kh, path),
            (None, None) => None,
        }
    }

    fn dir_of(&self, path: &RelPath) -> io::Result<OwnedFd> {
        fsops::dir_of(self.root(), path)
    }

    fn filesystem(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.root)
    }

    fn syncfs(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        nix::unistd::syncfs(fd).map_err(io::Error::from)
    }

    fn fsync(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        nix::unistd::fsync(fd).map_err(io::Error::from)
    }

    fn mirror_ofd_locks(
        &self,
        fd: BorrowedFd<'_>,
        locks: &[HeldLock],
        before: &[HeldLock],
    ) -> Result<(), fsops::OfdFailure> {
        fsops::mirror_ofd_locks(fd, locks, before)
    }

    fn map_errno(&self, e: &io::Error, path: &RelPath) -> WireError {
        fsops::map_errno(e, self.root(), path)
    }
}
