//! What the engine shows, undoes and syncs, tied to the commit that makes
//! it durable.
//!
//! Every request that changes persistent state gets a *commit sequence* of
//! its own: its store operations form a group under that sequence
//! ([`Batch::push`]), and the files and replay scopes they change are
//! stamped with it. A request's reply waits for the highest sequence it
//! *depends on*: its own group, or — when it only reads — the group that
//! last changed a file or scope it looked at (`depends_on_file`,
//! `depends_on_scope`). So a create replay, a lock-sequence replay or a
//! recorded-reply lookup never shows state whose commit is pending, and a
//! reply that shows nothing pending goes out at once (a non-durable open
//! never waits for an fsync). What a group read from other pending groups
//! travels with it (`Group::deps`), so the committer can fail a request
//! that cannot fit on its own, together with exactly the requests that
//! built on it.
//!
//! When a commit fails, [`Engine::roll_back`] abandons the failed groups
//! and every pending one that built on them, reads persistent state back
//! from the store (which holds exactly what committed), undoes in-memory
//! effects of requests that waited on an abandoned group, and tells the
//! committer which sequences were abandoned.
//!
//! What a rollback would take back is not built on before the outcome:
//! a local open of a file whose create is committing (`create_pending`),
//! and a change made at once to a file whose persistent handle's close is
//! committing (`close_pending`), wait for that commit (`wait_for_commit`)
//! and run again once it is resolved.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use libfilter::locks::{Lock, LockTable};
use libfilter::model::{
    ConnState, FileId, HandleRecord, HeldLock, InstanceName, IntentChange, RelPath, ReplayScope,
    ResumeKey,
};
use libfilter::proto::{ErrorCode, Event, ServerFrame};
use libfilter::store::StoreOp;
use tracing::{debug, error, warn};

use super::fs::Fs;
use super::{err, Engine, Handle};
use crate::committer::{CommitJob, Group};

/// How long after an expiry whose commit failed it is tried again.
pub(super) const EXPIRY_RETRY_MS: u64 = 5_000;

/// An in-memory effect to undo if the commit a request waited for fails.
pub(super) enum Undo {
    /// A non-persistent open that was granted: close it again.
    Drop(ResumeKey),
    /// What a request changed of a non-persistent handle's record, as it
    /// was before: only that is put back, so what other requests changed
    /// meanwhile without waiting for the failed commit stays (review: the
    /// whole record was put back, and a lease acknowledged meanwhile went
    /// back to its old state and epoch).
    Record(Box<RecordPart>),
    /// A handle closed, expired or purged whose removal has not committed
    /// (a persistent handle's deletion; the commit the request that purged
    /// a non-persistent one waited for): kept whole — descriptor, locks'
    /// descriptor, attachment — to put back.
    Reinsert(Box<Handle>),
    /// A persistent handle lost its file (`Engine::lose`) in a request
    /// whose commit records that: what the loss took, to give back.
    Lose(Box<Loss>),
    /// A handle a frontend resumed: its attachment before
    /// (`Engine::put_back_attachment`).
    Attachment(Box<Attachment>),
    /// What a request counted as granted in `filterctl stats`: its reply
    /// fails with the commit, so the grants are taken back (and an open or
    /// a lock counted refused instead). Before, a burst of failed commits
    /// left `stats` counting opens and locks its clients were refused
    /// (review).
    Counts(Granted),
    /// A handle's removal counted in `filterctl stats`, filed beside its
    /// `Reinsert`: the handle is put back, so the close, expiry or purge is
    /// taken back with it. Before, `stats` kept counting them, and an
    /// expiry retried after a failed commit counted twice (review).
    Uncount(Removed),
    /// A lease break event handed to its holder's connection behind this
    /// commit, counted in `stats.breaks`: the event goes down with a failed
    /// commit (and the break is sent anew), so the count is taken back.
    /// Before, a break retried after a failed commit counted twice, and
    /// one never sent once (review rvobs).
    BreakSent,
}

/// What one request counted in [`Stats`](libfilter::proto::Stats) and
/// its reply stands for: grants, and replies recorded for replay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Granted {
    pub(super) opens: u64,
    pub(super) resumes: u64,
    pub(super) locks: u64,
    pub(super) replies_recorded: u64,
    /// Replays answered (`stats.replays_detected`): one whose reply fails
    /// with the commit was not answered (review rvobs: a replayed open
    /// whose reattachment failed to commit stayed counted).
    pub(super) replays: u64,
}

impl Granted {
    /// The grants counted in `stats` so far.
    pub(super) fn counted(stats: &libfilter::proto::Stats) -> Granted {
        Granted {
            opens: stats.opens,
            resumes: stats.resumes,
            locks: stats.locks_granted,
            replies_recorded: stats.replies_recorded,
            replays: stats.replays_detected,
        }
    }

    /// The grants counted since `before`.
    pub(super) fn since(self, before: Granted) -> Granted {
        Granted {
            opens: self.opens.saturating_sub(before.opens),
            resumes: self.resumes.saturating_sub(before.resumes),
            locks: self.locks.saturating_sub(before.locks),
            replies_recorded: self
                .replies_recorded
                .saturating_sub(before.replies_recorded),
            replays: self.replays.saturating_sub(before.replays),
        }
    }

    /// Takes these grants back from `stats`: refused, as their replies are.
    fn take_back(self, stats: &mut libfilter::proto::Stats) {
        self.not_yet(stats);
        stats.opens_refused += self.opens;
        stats.locks_refused += self.locks;
    }

    /// Takes these grants out of `stats`, neither granted nor refused
    /// yet: their commit is pending.
    fn not_yet(self, stats: &mut libfilter::proto::Stats) {
        stats.opens = stats.opens.saturating_sub(self.opens);
        stats.resumes = stats.resumes.saturating_sub(self.resumes);
        stats.locks_granted = stats.locks_granted.saturating_sub(self.locks);
        stats.replies_recorded = stats.replies_recorded.saturating_sub(self.replies_recorded);
        stats.replays_detected = stats.replays_detected.saturating_sub(self.replays);
    }
}

/// How a handle was removed, as `filterctl stats` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Removed {
    /// `stats.closes`.
    Close,
    /// `stats.expiries`.
    Expiry,
    /// `stats.purges`.
    Purge,
}

impl Removed {
    /// The removal a frontend is told of with `event`.
    pub(super) fn announced_by(event: &Event) -> Option<Removed> {
        match event {
            Event::Expired { .. } => Some(Removed::Expiry),
            Event::Purged { .. } => Some(Removed::Purge),
            _ => None,
        }
    }

    /// Takes the removal back from `stats`: the handle is back.
    fn take_back(self, stats: &mut libfilter::proto::Stats) {
        let n = match self {
            Removed::Close => &mut stats.closes,
            Removed::Expiry => &mut stats.expiries,
            Removed::Purge => &mut stats.purges,
        };
        *n = n.saturating_sub(1);
    }
}

/// The part of a handle's record a request changes in memory only.
pub(super) struct RecordPart {
    /// The handle.
    pub(super) key: ResumeKey,
    /// Its part as it was.
    pub(super) was: Part,
}

/// A part of a handle's record (`RecordPart`).
pub(super) enum Part {
    /// What a lock changes: the locks held, the lock sequences seen and
    /// the lock owner.
    Locks {
        locks: Vec<HeldLock>,
        lock_sequence: Vec<(u8, u8)>,
        lock_owner: Option<String>,
    },
    /// Whether the file goes when the handle is closed.
    DeleteOnClose(bool),
}

impl RecordPart {
    /// The part of `rec` that `req` changes, if it changes one.
    pub(super) fn of(req: &libfilter::proto::Request, rec: &HandleRecord) -> Option<RecordPart> {
        use libfilter::proto::Request;
        let was = match req {
            Request::Lock { .. } => Part::Locks {
                locks: rec.locks.clone(),
                lock_sequence: rec.lock_sequence.clone(),
                lock_owner: rec.lock_owner.clone(),
            },
            Request::SetDeleteOnClose { .. } => Part::DeleteOnClose(rec.delete_on_close),
            _ => return None,
        };
        Some(RecordPart { key: rec.key, was })
    }

    /// Puts the part back into `rec`.
    fn restore(self, rec: &mut HandleRecord) {
        match self.was {
            Part::Locks {
                locks,
                lock_sequence,
                lock_owner,
            } => {
                rec.locks = locks;
                rec.lock_sequence = lock_sequence;
                rec.lock_owner = lock_owner;
            }
            Part::DeleteOnClose(d) => rec.delete_on_close = d,
        }
    }
}

/// A handle's attachment as it was before a resume: what a failed commit
/// puts back. Without it the store held the handle disconnected while the
/// engine kept it attached to a frontend told the resume failed — never
/// timing out, named by no open (found in session 28; the attachment's
/// retry papered over it).
pub(super) struct Attachment {
    /// The handle.
    pub(super) key: ResumeKey,
    /// Its connection state (a disconnected one's deadline kept).
    pub(super) state: ConnState,
    /// A disconnected one's expiry deadline on the monotonic clock, put
    /// back as it was (`Handle::expires_mono`).
    pub(super) expires_mono: u64,
    /// The connection it was attached to.
    pub(super) conn: Option<super::ConnId>,
    /// The frontend instance it belonged to.
    pub(super) frontend: libfilter::model::InstanceName,
    /// The frontend process that attached it last (`attached_by`).
    pub(super) attached_by: u64,
    /// The peer user it counted against (`Handle::uid`).
    pub(super) uid: Option<u32>,
}

/// What [`Engine::lose`] took from a handle besides its record's
/// connection state: its place in the file index, its locks in the lock
/// table and its lease key follow from the record and are given back from
/// it; the rest is kept here.
pub(super) struct Loss {
    /// The handle.
    pub(super) key: ResumeKey,
    /// Its connection state before (disconnected, with its deadline).
    pub(super) conn: ConnState,
    /// Its expiry deadline before, on the monotonic clock
    /// (`Handle::expires_mono`).
    pub(super) expires_mono: u64,
    /// Its locks' descriptor (carrying their OFD mirror).
    pub(super) lock_fd: Option<OwnedFd>,
    /// Its locks were not mirrored yet (`Engine::unmirrored`).
    pub(super) unmirrored: bool,
}

/// A handle an expiry or purge removed in the request being run
/// (`Engine::settle_removals` decides what becomes of it when the request
/// ends).
pub(super) struct Removal {
    /// The frontend instance to tell.
    pub(super) frontend: InstanceName,
    /// What to tell it (`Expired`, `Purged`).
    pub(super) event: Event,
    /// A non-persistent handle, kept whole until the request's commit is
    /// known (a persistent one is kept by its deletion's group).
    pub(super) kept: Option<Box<Handle>>,
    /// Its removal left its file without locks.
    pub(super) locks_emptied: bool,
    /// It was its file's last open then (its delete on close unlinks).
    pub(super) last_of_file: bool,
}

/// What one pending sequence changed, and what it built on.
#[derive(Default)]
pub(super) struct Touched {
    handles: BTreeSet<ResumeKey>,
    scopes: BTreeSet<ReplayScope>,
    files: BTreeSet<FileId>,
    deps: BTreeSet<u64>,
    undo: Vec<Undo>,
    /// It finishes a durable intent's change (see
    /// [`crate::committer::Group::completes_intent`]): abandoning it would
    /// leave the change on disk and memory without it.
    completes_intent: bool,
    /// Requests (connection, request id) that ran in it and wait without
    /// a reply (an open or a change behind lease breaks): if it fails they
    /// are answered with the failure, not run again (`roll_back`).
    waiting: Vec<(super::ConnId, u64)>,
}

/// What the pending commits change ([`Engine::pending_changes`]): a
/// listing answered without waiting for them leaves these out.
#[derive(Default)]
pub(super) struct PendingChanges {
    /// Files a pending commit changes (their handles, holders and locks).
    pub(super) files: BTreeSet<FileId>,
    /// Handles a pending commit changes, present or removed.
    pub(super) keys: BTreeSet<ResumeKey>,
}

impl PendingChanges {
    /// Whether a pending commit changes `rec`'s handle or its file.
    pub(super) fn changes(&self, rec: &HandleRecord) -> bool {
        self.keys.contains(&rec.key) || self.files.contains(&rec.file)
    }
}

/// The groups being built and the bookkeeping of sequences not yet durable.
pub(super) struct Batch {
    /// The sequence of the group being built (the current request's).
    seq: u64,
    /// Its store operations, in order.
    ops: Vec<StoreOp>,
    /// Intents whose parked requests continue once it is durable.
    pub(super) notify: Vec<libfilter::model::IntentId>,
    /// Pending sequences the current request read.
    reads: BTreeSet<u64>,
    /// The current group finishes a durable intent's change.
    completes_intent: bool,
    /// Groups closed this round, for the next flush.
    groups: Vec<Group>,
    /// Descriptors of files and directories this round changed (fsync'd
    /// before its commit), each with the sequence of the group that
    /// records its change: a failed fsync fails that group, not the round.
    sync: Vec<(u64, OwnedFd)>,
    /// The export root's filesystem, to be `syncfs`'d before this round's
    /// commit: a change's directory could not be opened ([`ToSync`]).
    syncfs: Option<Arc<OwnedFd>>,
    /// The groups that asked for `syncfs`: its failure fails them only.
    syncfs_for: BTreeSet<u64>,
    /// Requests whose replies wait for this round's groups.
    requests: usize,
    /// The highest sequence the request being handled depends on.
    dep: u64,
    /// The highest sequence that had operations.
    last: u64,
    /// The highest resolved sequence at the last flush (older ones are no
    /// dependency).
    committed: u64,
    /// The sequence that last changed each file / replay scope (pending ones).
    file_seq: HashMap<FileId, u64>,
    scope_seq: HashMap<ReplayScope, u64>,
    /// What each pending sequence touched.
    pending: BTreeMap<u64, Touched>,
    /// A failpoint hit right before the current request's reply goes
    /// (after its commit is durable): `lock.granted`.
    pub(super) reply_point: Option<&'static str>,
    /// The current request changes nothing: its parked reply may be
    /// withdrawn by this token ([`crate::committer::Deferred::token`]).
    pub(super) reply_token: Option<u64>,
    /// The handle the current request's open put in (a new one, not a
    /// replayed or resumed one): only that one is dropped if the commit
    /// its reply waits for fails (`Undo::Drop`).
    pub(super) inserted: Option<ResumeKey>,
    /// The handle the current request attached again — replayed while
    /// still attached on the same connection, or resumed or replayed while
    /// disconnected: the break in progress is sent again behind the reply
    /// even when other holders of its lease key are attached there
    /// (rksmbd's one connection carries every channel and connection of a
    /// client; re-review rr40a R1, rr40b F2).
    pub(super) rebound: Option<ResumeKey>,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            seq: 1,
            ops: Vec::new(),
            notify: Vec::new(),
            reads: BTreeSet::new(),
            completes_intent: false,
            groups: Vec::new(),
            sync: Vec::new(),
            syncfs: None,
            syncfs_for: BTreeSet::new(),
            requests: 0,
            dep: 0,
            last: 0,
            committed: 0,
            file_seq: HashMap::new(),
            scope_seq: HashMap::new(),
            pending: BTreeMap::new(),
            reply_point: None,
            reply_token: None,
            inserted: None,
            rebound: None,
        }
    }
}

impl Batch {
    /// Adds a store operation to the current request's group.
    pub(super) fn push(&mut self, op: StoreOp) {
        let seq = self.seq;
        // A record written whole carries the state of whoever wrote it
        // last: this group builds on that one.
        let prior = match &op {
            StoreOp::PutHandle(r) | StoreOp::DetachHandle(r) | StoreOp::DeleteHandle(r) => {
                self.file_seq.get(&r.file)
            }
            StoreOp::PutReplay { scope, .. }
            | StoreOp::DeleteReplay { scope, .. }
            | StoreOp::DeleteReplayScope(scope) => self.scope_seq.get(scope),
            StoreOp::PutIntent(_) | StoreOp::DeleteIntent(_) => None,
        };
        if let Some(p) = prior.copied().filter(|p| *p != seq && *p > self.committed) {
            self.reads.insert(p);
        }
        let t = self.pending.entry(seq).or_default();
        match &op {
            StoreOp::PutHandle(r) | StoreOp::DetachHandle(r) | StoreOp::DeleteHandle(r) => {
                self.file_seq.insert(r.file, seq);
                t.files.insert(r.file);
                t.handles.insert(r.key);
            }
            StoreOp::PutReplay { scope, .. }
            | StoreOp::DeleteReplay { scope, .. }
            | StoreOp::DeleteReplayScope(scope) => {
                self.scope_seq.insert(scope.clone(), seq);
                t.scopes.insert(scope.clone());
            }
            StoreOp::PutIntent(i) => {
                if let Some(f) = intent_file(&i.change) {
                    self.file_seq.insert(f, seq);
                    t.files.insert(f);
                }
                if let IntentChange::TruncatingOpen { record, .. } = &i.change {
                    t.handles.insert(record.key);
                }
            }
            StoreOp::DeleteIntent(_) => {}
        }
        self.dep = seq;
        self.last = seq;
        self.ops.push(op);
    }

    /// A descriptor of a file or directory the current request changed:
    /// it is fsync'd before the round's groups commit, and if that fails
    /// the current request's group fails (the group recording the change).
    pub(super) fn sync_fd(&mut self, fd: OwnedFd) {
        self.sync.push((self.seq, fd));
    }

    /// What a change of names needs made durable before the round's
    /// groups commit: its directories, or the whole filesystem.
    pub(super) fn sync_changed(&mut self, s: ToSync) {
        let seq = self.seq;
        self.sync.extend(s.fds.into_iter().map(|fd| (seq, fd)));
        if s.filesystem.is_some() {
            self.syncfs = s.filesystem;
            self.syncfs_for.insert(seq);
        }
    }

    /// The sequence of the group being built.
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// The newest pending sequence (tests).
    #[cfg(test)]
    pub(super) fn last_pending(&self) -> Option<u64> {
        self.pending.keys().next_back().copied()
    }

    /// The highest sequence the request being handled depends on.
    pub(super) fn dep(&self) -> u64 {
        self.dep
    }

    /// Closes the current request's group (if it changed anything) and
    /// starts the next.
    fn close_group(&mut self) {
        let has_ops = !self.ops.is_empty();
        if let Some(t) = self.pending.get_mut(&self.seq) {
            t.deps.extend(self.reads.iter().copied());
            t.completes_intent |= self.completes_intent;
        } else if !has_ops {
            self.reads.clear();
            self.notify.clear();
            self.completes_intent = false;
            return;
        }
        self.groups.push(Group {
            seq: self.seq,
            ops: std::mem::take(&mut self.ops),
            deps: std::mem::take(&mut self.reads).into_iter().collect(),
            notify: std::mem::take(&mut self.notify),
            completes_intent: std::mem::take(&mut self.completes_intent),
        });
        self.seq += 1;
    }

    /// Every pending sequence a read of `file` or `scope` must wait for.
    fn note_read(&mut self, s: u64) {
        self.dep = self.dep.max(s);
        if s != self.seq && s > self.committed {
            self.reads.insert(s);
        }
    }
}

/// What makes a change of names durable before the commit that records
/// it: the descriptors of the directories holding them, each fsync'd, or
/// — when one cannot be opened — the export root's whole filesystem,
/// `syncfs`'d.
#[derive(Default)]
pub(super) struct ToSync {
    pub(super) fds: Vec<OwnedFd>,
    pub(super) filesystem: Option<Arc<OwnedFd>>,
}

impl ToSync {
    /// Adds the directory holding `path`. One that cannot be opened (no
    /// descriptor left: EMFILE; a directory an unprivileged filterd may
    /// write but not read: EACCES) gives way to a `syncfs` on the root's
    /// descriptor, which needs neither a descriptor nor a permission:
    /// refused, the change failed for want of a directory's descriptor
    /// (review r1 b2); skipped, it committed unsynced. `Err` only when the
    /// directory is gone ([`dir_gone`]): nothing of it to sync.
    pub(super) fn add_dir_of(&mut self, fs: &dyn Fs, path: &RelPath) -> std::io::Result<()> {
        match fs.dir_of(path) {
            Ok(d) => self.fds.push(d),
            Err(e) if dir_gone(&e) => return Err(e),
            Err(e) => {
                debug!(%path, error = %e, "a changed name's directory cannot be opened: its filesystem is synced");
                self.filesystem = Some(fs.filesystem());
            }
        }
        Ok(())
    }
}

/// Whether `dir_of` failed because the directory is no longer there
/// (removed, or replaced by a link), not for want of a descriptor or a
/// permission.
pub(super) fn dir_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV)
    )
}

/// The file an intent's change is about, when the intent names it.
pub(super) fn intent_file(c: &IntentChange) -> Option<FileId> {
    match c {
        IntentChange::TruncatingOpen { record, .. } => Some(record.file),
        IntentChange::Rename { file, .. } | IntentChange::Remove { file, .. } => Some(*file),
        IntentChange::SetSize { .. } => None,
    }
}

/// The last sequence of `pending` up to `upto` above `committed`, or 0
/// when there is none (what is resolved needs no wait; see `roll_back`).
fn last_pending_to(pending: &BTreeMap<u64, Touched>, upto: u64, committed: u64) -> u64 {
    pending
        .range(..=upto)
        .next_back()
        .map(|(s, _)| *s)
        .filter(|s| *s > committed)
        .unwrap_or(0)
}

impl Engine {
    /// Starts a request (or an internal step that changes state): it gets
    /// a group of its own and depends on nothing yet.
    pub(super) fn begin_request(&mut self) {
        self.stop_unless_owner();
        self.end_request();
        self.batch.dep = 0;
        self.batch.committed = self.pipe.committed();
        self.batch.reply_point = None;
        self.batch.reply_token = None;
        self.batch.inserted = None;
        self.batch.rebound = None;
    }

    /// The commit the request being run waits for, while it is pending.
    pub(super) fn request_waits_for(&self) -> Option<u64> {
        (self.batch.dep > self.pipe.committed()).then_some(self.batch.dep)
    }

    /// Ends the request being run: settles the handles it expired or
    /// purged, then closes its group.
    fn end_request(&mut self) {
        self.settle_removals();
        self.batch.close_group();
    }

    /// Settles what the request's expiries and purges did, by the commit
    /// its reply waits for: when that commit is pending, a removed
    /// non-persistent handle is kept whole to put back if it fails, its
    /// delete on close becomes an unlink made only once it is durable, and
    /// the frontend's `Expired`/`Purged` event goes out only then (never,
    /// if it fails). With nothing pending all of it happens at once.
    pub(super) fn settle_removals(&mut self) {
        if self.removals.is_empty() {
            return;
        }
        let removals = std::mem::take(&mut self.removals);
        let pending = self.batch.dep > self.pipe.committed();
        let mut kept = Vec::new();
        for r in &removals {
            match &r.kept {
                Some(h) if h.rec.delete_on_close && r.last_of_file => {
                    if pending {
                        self.park_unlink(h);
                    } else {
                        self.unlink_on_close(h);
                    }
                }
                Some(h) if h.rec.delete_on_close => self.delete_pending(h),
                _ => {}
            }
        }
        // After the unlinks' intents: the reply (and what is undone) waits
        // for them too.
        let dep = self.batch.dep;
        for r in removals {
            if let Some(h) = r.kept {
                if r.locks_emptied {
                    self.locks_gone_after(dep, h.rec.file);
                }
                if pending {
                    kept.push(Undo::Reinsert(h));
                    kept.extend(Removed::announced_by(&r.event).map(Undo::Uncount));
                }
            }
            self.notify_after(dep, &r.frontend, r.event);
        }
        if pending {
            self.batch.pending.entry(dep).or_default().undo.extend(kept);
        }
    }

    /// The holders of `file` whose removal (close, expiry, purge) has not
    /// committed: the removal may fail and put them back. A local open
    /// waits for their commit when they would refuse it or be purged by
    /// it (`on_local_open`), and is decided as if they were still there
    /// otherwise — so the file gets no ignore mark while they may come
    /// back. Only sequences past `committed`: the pending map is pruned
    /// only at the end of an engine round, and an idle engine counted a
    /// close committed and answered until its next tick (review: the first
    /// local open after a persistent share-none handle's CLOSE reply was
    /// refused, EPERM).
    ///
    /// With them, the latest sequence that removed a handle of `file` (as
    /// [`Engine::close_pending`]), from the same look at `committed`: read
    /// twice, the committer could move it between the reads, and a local
    /// open met the holders of a removal it then found durable — refused
    /// (EPERM) right after the CLOSE reply, instead of waiting (CI,
    /// `local::a_local_open_right_after_a_persistent_close_is_let_in`).
    pub(super) fn pending_removed_holders(
        &self,
        file: FileId,
    ) -> (Option<u64>, Vec<libfilter::share::Holder<ResumeKey>>) {
        let committed = self.pipe.committed();
        let mut latest = None;
        let mut holders = Vec::new();
        for (seq, t) in self.batch.pending.range(committed + 1..) {
            for u in &t.undo {
                if let Undo::Reinsert(h) = u {
                    if h.rec.file == file {
                        latest = Some(*seq);
                        // As `holders_of` counts them. Only a local open
                        // (`ShareMode::LOCAL_PROCESS`, sharing all) meets
                        // them: their share decides, their access never
                        // does.
                        holders.extend(super::opens::share_holder(h));
                    }
                }
            }
        }
        (latest, holders)
    }

    /// Sends `ev` to frontend `instance` once sequence `dep` is durable
    /// (dropped if its commit fails: what it announces did not happen).
    pub(super) fn notify_after(&mut self, dep: u64, instance: &InstanceName, ev: Event) {
        let Some(writer) = self
            .instances
            .get(instance)
            .and_then(|c| self.conns.get(c))
            .map(|c| c.writer.clone())
        else {
            return;
        };
        self.event_after(dep, writer, ev);
    }

    /// Sends `ev` through `writer` once sequence `dep` is durable (dropped
    /// if its commit fails).
    pub(super) fn event_after(
        &mut self,
        dep: u64,
        writer: std::sync::Arc<crate::outbox::ConnWriter>,
        ev: Event,
    ) {
        let frame = ServerFrame::Event(ev);
        if dep <= self.pipe.committed() {
            writer.send_frame(&frame, None);
            return;
        }
        match writer.encode(&frame) {
            Ok(bytes) => self.pipe.reply_after(
                dep,
                crate::committer::Deferred {
                    writer,
                    id: None,
                    bytes,
                    fd: None,
                    point: None,
                    parked: false,
                    token: None,
                },
            ),
            Err(e) => error!(error = %e, "cannot encode an event"),
        }
    }

    /// The last lock of `file` went away in sequence `seq`: frontends go
    /// back to unchecked I/O once it is durable (and only if the file has
    /// no locks then: a failed commit puts them back).
    pub(super) fn locks_gone_after(&mut self, seq: u64, file: FileId) {
        if seq > self.pipe.committed() {
            self.gone_after.push((seq, file));
        } else {
            self.locks_gone(file);
        }
    }

    /// The current group finishes a change whose intent is durable: it must
    /// commit (see [`crate::committer::Group::completes_intent`]).
    pub(super) fn completes_intent(&mut self) {
        self.batch.completes_intent = true;
    }

    /// The sequence the current request's reply must wait for (0: none).
    pub(super) fn request_dependency(&self) -> u64 {
        self.batch.dep
    }

    /// The current request also marks `file` as changed in this batch
    /// (a filesystem change that other requests must not see early).
    pub(super) fn touch_file(&mut self, file: FileId) {
        let seq = self.batch.seq;
        self.batch.file_seq.insert(file, seq);
        self.batch
            .pending
            .entry(seq)
            .or_default()
            .files
            .insert(file);
    }

    /// The current request's reply shows `file`'s state.
    pub(super) fn depends_on_file(&mut self, file: FileId) {
        if let Some(s) = self.batch.file_seq.get(&file).copied() {
            self.batch.note_read(s);
        }
    }

    /// The current request's reply shows `scope`'s records.
    pub(super) fn depends_on_scope(&mut self, scope: &ReplayScope) {
        if let Some(s) = self.batch.scope_seq.get(scope).copied() {
            self.batch.note_read(s);
        }
    }

    /// Every commit sequence given out is resolved (durable or abandoned):
    /// what the engine holds is what is durable.
    pub(super) fn nothing_pending(&self) -> bool {
        self.batch.last <= self.pipe.committed()
    }

    /// What the commits pending now change: the files and handles whose
    /// state in memory is ahead of what is durable. Everything else the
    /// engine holds is durable — a persistent handle's record as its last
    /// commit wrote it, a non-persistent one's as nothing will take back.
    /// Gathered from what each pending group touched (its store
    /// operations' files and handles) and from what it would undo in
    /// memory (a non-persistent open, record part, removal, loss or
    /// attachment that waited for it), each handle named by its file too:
    /// a listing that leaves these files out shows no pending state.
    pub(super) fn pending_changes(&self) -> PendingChanges {
        let committed = self.pipe.committed();
        let mut p = PendingChanges::default();
        for t in self.batch.pending.range(committed + 1..).map(|(_, t)| t) {
            p.files.extend(t.files.iter().copied());
            p.keys.extend(t.handles.iter().copied());
            for u in &t.undo {
                match u {
                    Undo::Drop(key) => {
                        p.keys.insert(*key);
                    }
                    Undo::Record(part) => {
                        p.keys.insert(part.key);
                    }
                    Undo::Reinsert(h) => {
                        p.keys.insert(h.rec.key);
                        p.files.insert(h.rec.file);
                    }
                    Undo::Lose(l) => {
                        p.keys.insert(l.key);
                    }
                    Undo::Attachment(a) => {
                        p.keys.insert(a.key);
                    }
                    Undo::Counts(_) | Undo::Uncount(_) | Undo::BreakSent => {}
                }
            }
        }
        let files: Vec<FileId> = p
            .keys
            .iter()
            .filter_map(|k| self.handles.get(k).map(|h| h.rec.file))
            .collect();
        p.files.extend(files);
        p
    }

    /// The newest commit sequence given out.
    pub(super) fn last_seq(&self) -> u64 {
        self.batch.last
    }

    /// The current request's reply shows everything (listings, status).
    pub(super) fn depends_on_all(&mut self) {
        let last = self.batch.last;
        self.batch.note_read(last);
    }

    /// `filterctl stats` as durable now: what requests whose commit is
    /// still pending counted (grants, closes, expiries, purges, replies
    /// recorded, replays answered, breaks sent) is left out. Answered at once, so it neither shows what a
    /// failed commit takes back nor waits on an fsync, nor fails with a
    /// commit it does not change (review g3 of session 31: it waited, and
    /// a disk-full burst refused it exactly when `commits_failed` mattered).
    pub(super) fn durable_stats(&self) -> libfilter::proto::Stats {
        let mut s = self.stats.clone();
        // Pending: not yet durable. What is (its reply perhaps out) stays
        // in `pending` until the next flush prunes it (review g4).
        let after = self.pipe.committed().saturating_add(1);
        let pending = self.batch.pending.range(after..).map(|(_, t)| t);
        for u in pending.flat_map(|t| t.undo.iter()) {
            match u {
                Undo::Counts(c) => c.not_yet(&mut s),
                Undo::Uncount(r) => r.take_back(&mut s),
                Undo::BreakSent => s.breaks = s.breaks.saturating_sub(1),
                _ => {}
            }
        }
        s
    }

    /// Request `id` of `conn`, being run, waits without a reply (an open
    /// or a change parked behind lease breaks, `waiting`,
    /// `waiting_changes`). If what it wrote in its own group so far (a
    /// persistent holder's epoch bump) fails to commit, it is answered
    /// with the failure and not run again when the store refused it for
    /// room (`DiskFull`): run again, it wrote the same again, and a commit
    /// refused for the store's reserve was refused again, for ever, the
    /// opener never answered (re-review rr47e F2). After any other
    /// failure it runs again, as before.
    /// Nothing is noted for a request whose group is empty: its sequence
    /// is the next request's.
    pub(super) fn note_waiting(&mut self, conn: super::ConnId, id: u64) {
        let seq = self.batch.seq;
        if let Some(t) = self.batch.pending.get_mut(&seq) {
            t.waiting.push((conn, id));
        }
    }

    /// Answers with the failure, and drops, the waiting requests whose
    /// own group a failed commit abandoned ([`Self::note_waiting`]).
    fn refuse_waiting(&mut self, refused: &[(super::ConnId, u64)], code: ErrorCode, message: &str) {
        if refused.is_empty() {
            return;
        }
        let (opens, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| refused.contains(&(w.conn, w.id)));
        self.waiting = kept;
        let (changes, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_changes)
            .into_iter()
            .partition(|(_, c, id, _)| refused.contains(&(*c, *id)));
        self.waiting_changes = kept;
        self.stats.opens_refused += opens.len() as u64;
        let answers = opens
            .iter()
            .map(|w| (w.conn, w.id))
            .chain(changes.iter().map(|(_, c, id, _)| (*c, *id)));
        for (conn, id) in answers {
            warn!(
                conn = conn.0,
                id, "a waiting request whose own commit failed is refused"
            );
            if let Some(c) = self.conns.get(&conn) {
                let frame = ServerFrame::Reply {
                    id: Some(id),
                    result: Err(err(code, format!("state store commit failed: {message}"))),
                };
                c.writer.send_frame(&frame, None);
            }
        }
    }

    /// Files an undo entry under the sequence the current request waits for.
    pub(super) fn undo_if_failed(&mut self, undo: Undo) {
        self.undo_if_seq_fails(self.batch.dep, undo);
    }

    /// Files an undo entry under sequence `dep`, if it is not durable yet.
    pub(super) fn undo_if_seq_fails(&mut self, dep: u64, undo: Undo) {
        if dep > self.pipe.committed() {
            self.batch.pending.entry(dep).or_default().undo.push(undo);
        }
    }

    /// A reply to request `id`: sent once everything it depends on is
    /// durable.
    pub(super) fn reply_when_durable(
        &mut self,
        writer: &std::sync::Arc<crate::outbox::ConnWriter>,
        id: u64,
        frame: &ServerFrame,
        fd: Option<Arc<OwnedFd>>,
    ) {
        let dep = self.batch.dep;
        if dep == self.batch.seq {
            self.batch.requests += 1;
        }
        let bytes = match writer.encode(frame) {
            Ok(b) => b,
            Err(e) => {
                error!(error = %e, "cannot encode reply");
                match writer.encode(&super::unencodable(id, &e)) {
                    Ok(b) => b,
                    Err(_) => return,
                }
            }
        };
        self.pipe.reply_after(
            dep,
            crate::committer::Deferred {
                writer: writer.clone(),
                id: Some(id),
                bytes,
                fd,
                point: self.batch.reply_point.take(),
                parked: false,
                token: self.batch.reply_token.take(),
            },
        );
    }

    /// Hands the round's groups to the committer and forgets the
    /// bookkeeping of sequences that are durable now.
    pub(super) fn flush(&mut self) {
        self.end_request();
        let committed = self.pipe.committed();
        self.batch.committed = committed;
        let durable: Vec<u64> = self
            .batch
            .pending
            .range(..=committed)
            .map(|(s, _)| *s)
            .collect();
        for s in durable {
            if let Some(t) = self.batch.pending.remove(&s) {
                for f in t.files {
                    if self.batch.file_seq.get(&f) == Some(&s) {
                        self.batch.file_seq.remove(&f);
                    }
                }
                for sc in t.scopes {
                    if self.batch.scope_seq.get(&sc) == Some(&s) {
                        self.batch.scope_seq.remove(&sc);
                    }
                }
            }
        }
        self.pending_creates.retain(|_, s| *s > committed);
        self.renames_completing.retain(|(s, _, _)| *s > committed);
        self.views.resolved(committed);
        // Frontends go back to unchecked I/O on a file only once the
        // content change that made them check is durable.
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.gone_after)
            .into_iter()
            .partition(|(s, _)| *s <= committed);
        self.gone_after = later;
        for (_, f) in now {
            let idle = !self.content_changes.contains_key(&f)
                && self.locks.get(&f).is_none_or(|t| t.is_empty());
            if idle {
                self.locks_gone(f);
            }
        }
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.idle_lock_fds)
            .into_iter()
            .partition(|(s, _)| *s <= committed);
        self.idle_lock_fds = later;
        for (_, k) in now {
            self.close_idle_lock_fd(k);
        }
        // A size change's mark proves nothing once its completion is
        // resolved (its intent is gone, or will not be redone by this run):
        // removed lazily, here.
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.marks_after)
            .into_iter()
            .partition(|(s, _, _, _)| *s <= committed);
        self.marks_after = later;
        for (_, kh, path, id) in now {
            self.fs.clear_change_mark(&kh, path.as_ref(), id);
        }
        if self.batch.groups.is_empty() && self.batch.sync.is_empty() && self.batch.syncfs.is_none()
        {
            return;
        }
        let b = &mut self.batch;
        let job = CommitJob {
            groups: std::mem::take(&mut b.groups),
            sync: std::mem::take(&mut b.sync),
            syncfs: b.syncfs.take(),
            syncfs_for: std::mem::take(&mut b.syncfs_for),
            requests: std::mem::take(&mut b.requests),
        };
        self.pipe.submit(job);
    }

    /// The groups a commit that failed abandons: the failed ones, and
    /// every pending group after `through` that builds on an abandoned one
    /// or touches what one touched (its state is read back from the store,
    /// which does not hold theirs).
    pub(super) fn abandoned_by(&self, failed: &[u64], through: u64) -> BTreeSet<u64> {
        let mut abandoned: BTreeSet<u64> = failed.iter().copied().collect();
        loop {
            let mut gone_handles = BTreeSet::new();
            let mut gone_scopes = BTreeSet::new();
            for s in &abandoned {
                if let Some(t) = self.batch.pending.get(s) {
                    gone_handles.extend(t.handles.iter().copied());
                    gone_scopes.extend(t.scopes.iter().cloned());
                }
            }
            let more: Vec<u64> = self
                .batch
                .pending
                .range(through + 1..)
                .filter(|(s, t)| {
                    !abandoned.contains(s)
                        && (t.deps.iter().any(|d| abandoned.contains(d))
                            || t.handles.iter().any(|h| gone_handles.contains(h))
                            || t.scopes.iter().any(|c| gone_scopes.contains(c)))
                })
                .map(|(s, _)| *s)
                .collect();
            if more.is_empty() {
                break;
            }
            abandoned.extend(more);
        }
        abandoned
    }

    /// Whether abandoning `abandoned` would drop the completion of a
    /// durable intent: its change is on disk, so the daemon must stop
    /// instead (recovery finishes it from the intent).
    pub(super) fn abandons_completion(&self, abandoned: &BTreeSet<u64>) -> bool {
        abandoned.iter().any(|s| {
            self.batch
                .pending
                .get(s)
                .is_some_and(|t| t.completes_intent)
        })
    }

    /// A commit failed: the groups in `failed` did not commit (those up
    /// to `through` that are not in it did). Abandons them and every
    /// pending group that built on them, undoes what those did, then lets
    /// the committer fail the replies that waited for them. If that would
    /// abandon the completion of a durable intent, the daemon stops
    /// instead ([`crate::committer::stop_for_recovery`]).
    pub(super) fn roll_back(
        &mut self,
        failed: &[u64],
        through: u64,
        code: ErrorCode,
        message: &str,
    ) {
        self.end_request();
        self.status_waits.rolled_back();
        let abandoned = self.abandoned_by(failed, through);
        if self.abandons_completion(&abandoned) {
            // A completion built on a request whose commit failed (a lock
            // on the renamed handle, committing just before it): its change
            // is on disk and its record carries what failed, so it can
            // neither commit nor be undone — stop, as when a completion's
            // own commit fails. Dropping it and serving on (old code) left
            // memory and store without a change the disk has: the handle
            // back at its old path while the file is at the new one, or an
            // overwritten file whose handle was gone.
            crate::committer::stop_for_recovery(
                "the completion of a durable intent built on a commit that failed",
                &message,
            );
        }
        // Views that show what is rolled back are taken back before the
        // committer refuses what waited for it, and run again below.
        let views = self.withdraw_views(&abandoned);
        self.batch.groups.retain(|g| !abandoned.contains(&g.seq));
        // Their syncs go with them: one tied to a group in no commit would
        // fail the whole commit this round's retained groups go in.
        let b = &mut self.batch;
        crate::committer::drop_abandoned_syncs(
            &mut b.sync,
            &mut b.syncfs,
            &mut b.syncfs_for,
            &abandoned,
        );
        warn!(
            through,
            abandoned = abandoned.len(),
            "rolling back the requests whose commit failed and those that built on them"
        );
        let undone: Vec<Touched> = abandoned
            .iter()
            .filter_map(|s| self.batch.pending.remove(s))
            .collect();
        // What stays pending is what later replies wait for: the groups
        // above `through` still pending, and those up to it that committed
        // (alone, after the merged commit failed), whose replies the
        // committer sends only once this rollback is done. Rebuilt from
        // the first alone (old code), a reply that showed a file or scope
        // one of these last changed was sent at once, ahead of the reply
        // of the request that changed it (re-review rr45g F4).
        let b = &mut self.batch;
        b.file_seq.clear();
        b.scope_seq.clear();
        // What a later reply that shows everything waits for: the last
        // group up to `through` that committed, never one abandoned. A
        // reply made to wait for an abandoned sequence is failed by the
        // pipeline ("a commit it depends on failed") although it shows
        // the rolled-back state: a request arriving before the committer
        // had published `through` was refused so (a directory rename
        // right after a failed close, 3 in 30 runs of
        // `a_failed_close_keeps_a_handle_seen_below_through_its_link`
        // once the committer published after its sends).
        // Taken from what is still pending (abandoned sequences, this
        // rollback's and earlier ones', are gone from it; the pipeline
        // refuses them all): a sequence an earlier rollback abandoned
        // was taken for settled here (re-review rr37h). None: 0, which
        // every reply and event passes at once (`committed` would do the
        // same: a reply waiting at or below it is sent without asking the
        // pipeline, re-review rr38).
        let settled = last_pending_to(&b.pending, through, b.committed);
        b.last = settled;
        for (s, t) in b.pending.range(b.committed + 1..) {
            for f in &t.files {
                b.file_seq.insert(*f, *s);
            }
            for c in &t.scopes {
                b.scope_seq.insert(c.clone(), *s);
            }
            b.last = b.last.max(*s);
        }
        // In-memory effects first, newest first.
        let mut undone = undone;
        let mut created = Vec::new();
        let mut reinserted = Vec::new();
        for t in undone.iter_mut().rev() {
            for u in std::mem::take(&mut t.undo).into_iter().rev() {
                if let Undo::Reinsert(h) = u {
                    reinserted.push(h.rec.file);
                    self.reinsert(*h);
                    continue;
                }
                if let Undo::Lose(l) = u {
                    reinserted.extend(self.unlose(*l));
                    continue;
                }
                match u {
                    Undo::Drop(k) => {
                        created.extend(self.remove_quietly(k));
                    }
                    Undo::Record(part) => {
                        if let Some(h) = self.handles.get_mut(&part.key) {
                            part.restore(&mut h.rec);
                        }
                    }
                    Undo::Attachment(a) => self.put_back_attachment(&a),
                    Undo::Counts(c) => c.take_back(&mut self.stats),
                    Undo::Uncount(r) => r.take_back(&mut self.stats),
                    Undo::BreakSent => self.stats.breaks = self.stats.breaks.saturating_sub(1),
                    Undo::Reinsert(_) | Undo::Lose(_) => {}
                }
            }
        }
        // A reply that showed a handle and waited for an abandoned commit
        // went out as a failure: the handle's breaks need not wait for it.
        // A break made to wait for an abandoned sequence after `through`
        // (one that built on the failed commit, which `committed` never
        // passes) would be dropped with it (review, session 29). It takes
        // the last sequence below the old one still pending (or none):
        // `through` itself is abandoned when the whole commit failed, and
        // a break made to wait for it was refused by the pipeline, never
        // sent, its opener waiting out the break timeout (re-review
        // rr37g); one below the old value, not below `through`, so a reply
        // still queued past `through` goes first (rr37h). After the undo
        // above, so handles it put back are seen too (rr37i).
        let (pending, committed) = (&self.batch.pending, self.batch.committed);
        for h in self.handles.values_mut() {
            if abandoned.contains(&h.shown_at) {
                h.shown_at = last_pending_to(pending, h.shown_at.saturating_sub(1), committed);
            }
        }
        let mut handles = BTreeSet::new();
        let mut scopes = BTreeSet::new();
        let mut files: BTreeSet<FileId> = reinserted.into_iter().collect();
        for t in &undone {
            handles.extend(t.handles.iter().copied());
            scopes.extend(t.scopes.iter().cloned());
            files.extend(t.files.iter().copied());
        }
        // Requests parked on an intent that never became durable.
        let parked: Vec<libfilter::model::IntentId> = self
            .parked
            .iter()
            .filter(|(_, p)| abandoned.contains(&p.seq))
            .map(|(id, _)| *id)
            .collect();
        for id in parked {
            if let Some(p) = self.parked.remove(&id) {
                handles.insert(p.key);
                // Opens and changes that waited for it run again.
                if let Some(f) = p.change.as_ref().and_then(intent_file) {
                    self.retry_files.insert(f);
                }
                // Whether or not its handle is still there.
                if let Some(f) = p.content {
                    self.content_change_abandoned(f);
                }
                if p.change.is_none() {
                    // A truncating open (counted when answered).
                    self.stats.opens_refused += 1;
                }
                if let (Some(w), Some(rid)) = (&p.writer, p.id) {
                    let frame = ServerFrame::Reply {
                        id: Some(rid),
                        result: Err(err(code, format!("state store commit failed: {message}"))),
                    };
                    w.send_frame(&frame, None);
                }
            }
        }
        // Opens and changes waiting for breaks whose own group was refused
        // for the store's room: every try would be refused alike. Any
        // other failure (an I/O error, a lost lease's fence) may pass, and
        // they run again as before: the break sent once, counted once
        // (leases::a_break_sent_again_after_a_failed_commit_counts_once).
        if code == ErrorCode::DiskFull {
            let refused: Vec<(super::ConnId, u64)> = undone
                .iter()
                .flat_map(|t| t.waiting.iter().copied())
                .collect();
            self.refuse_waiting(&refused, code, message);
        }
        // Persistent state: exactly what the store holds (a handle's own
        // replay records go and come with it).
        for k in handles {
            // A break whose event waited for this commit (a persistent
            // holder's epoch bump, `Engine::send_break`) was never sent:
            // it is no longer in progress, and the open that wanted it
            // runs again below and sends it anew.
            if let Some((file, lk)) = self
                .handles
                .get(&k)
                .and_then(|h| h.rec.lease.as_ref().map(|l| (h.rec.file, l.key)))
            {
                if self.breaking.remove(&(file, lk)).is_some() {
                    self.retry_files.insert(file);
                }
            }
            created.extend(self.restore_handle(k));
            scopes.insert(ReplayScope::Handle(k));
        }
        let unlinked = self.undo_creates(created);
        // Local opens that waited for an undone create: the file they
        // opened is gone (refused); the others run again (below).
        let (refused, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_local)
            .into_iter()
            .partition(|(f, ..)| unlinked.contains(f));
        self.waiting_local = waiting;
        for (file, pid, reply, fd) in refused {
            debug!(%file, pid, "a local open of a create that was undone is refused");
            reply.send(crate::command::Verdict::Deny, fd);
        }
        self.pending_creates.retain(|_, s| !abandoned.contains(s));
        self.checked_io_abandoned(&abandoned);
        let resolved: Vec<u64> = self
            .commit_waits
            .keys()
            .filter(|s| **s <= through || abandoned.contains(s))
            .copied()
            .collect();
        for s in resolved {
            self.retry_files
                .extend(self.commit_waits.remove(&s).unwrap_or_default());
        }
        for s in scopes {
            self.restore_scope(&s);
        }
        for f in files {
            self.rebuild_locks(f);
            self.retry_files.insert(f);
        }
        self.pipe.rolled_back(abandoned);
        self.rebuild_views(views, through);
    }

    /// The latest pending sequence that removed a persistent handle
    /// matching `removed` (a close, expiry or purge): if its commit fails
    /// the handle is back (`Undo::Reinsert`).
    fn removal_pending(&self, removed: impl Fn(&HandleRecord) -> bool) -> Option<u64> {
        self.removal_pending_of(removed).map(|(s, _)| s)
    }

    /// [`Engine::removal_pending`], with the removed handle's file.
    pub(super) fn removal_pending_of(
        &self,
        removed: impl Fn(&HandleRecord) -> bool,
    ) -> Option<(u64, FileId)> {
        self.removal_pending_with(|h| removed(&h.rec))
    }

    /// [`Engine::removal_pending_of`], asking of the whole handle (its
    /// descriptor too).
    pub(super) fn removal_pending_with(
        &self,
        removed: impl Fn(&Handle) -> bool,
    ) -> Option<(u64, FileId)> {
        let committed = self.pipe.committed();
        self.batch
            .pending
            .range(committed + 1..)
            .rev()
            .find_map(|(s, t)| {
                t.undo.iter().find_map(|u| match u {
                    Undo::Reinsert(h) if removed(h) => Some((*s, h.rec.file)),
                    _ => None,
                })
            })
    }

    /// The current request's reply is about handle `key`: it shows the
    /// handle's file, or — the handle gone — its removal, when that is
    /// still committing. A "no such handle" must not go out before the
    /// close it reports is durable: were the commit to fail, the handle
    /// would be back while its frontend, told it is gone, stopped closing
    /// it (found in round 16: rksmbd's close-settler, told `NoSuchHandle`
    /// by a retry queued behind the close, left the handle attached for
    /// good once the close's commit failed). Such a reply waits, and fails
    /// with the commit.
    pub(super) fn depends_on_handle(&mut self, key: ResumeKey) {
        match self.handles.get(&key).map(|h| h.rec.file) {
            Some(f) => self.depends_on_file(f),
            None => self.depends_on_removal(|r| r.key == key),
        }
    }

    /// The current request's reply shows that no handle matching
    /// `removed` is left: it waits for a removal of one still committing.
    pub(super) fn depends_on_removal(&mut self, removed: impl Fn(&HandleRecord) -> bool) {
        if let Some(s) = self.removal_pending(removed) {
            self.batch.note_read(s);
        }
    }

    /// The pending sequence that records the create of `file` by a
    /// persistent open of this daemon (undone with its file if it fails).
    pub(super) fn create_pending(&mut self, file: FileId) -> Option<u64> {
        let seq = *self.pending_creates.get(&file)?;
        if seq > self.pipe.committed() {
            return Some(seq);
        }
        self.pending_creates.remove(&file);
        None
    }

    /// The latest pending sequence that removed a persistent handle of
    /// `file` (a close, expiry or purge): if its commit fails, the handle
    /// is put back whole (`Undo::Reinsert`), so nothing may have changed
    /// the file under it meanwhile.
    pub(super) fn close_pending(&self, file: FileId) -> Option<u64> {
        self.removal_pending(|r| r.file == file)
    }

    /// What waits on `file` runs again once sequence `seq` is resolved
    /// (durable, or abandoned and rolled back): the committer wakes the
    /// engine for it ([`crate::command::Command::CommitsResolved`]).
    pub(super) fn wait_for_commit(&mut self, seq: u64, file: FileId) {
        self.commit_waits.entry(seq).or_default().insert(file);
        if !self.pipe.wake_engine_at(seq) {
            self.commits_resolved();
        }
    }

    /// Files whose waits are over run again; the committer is asked to
    /// wake the engine for the earliest wait left.
    pub(super) fn commits_resolved(&mut self) {
        loop {
            let committed = self.pipe.committed();
            let later = self.commit_waits.split_off(&(committed + 1));
            for (_, files) in std::mem::replace(&mut self.commit_waits, later) {
                self.retry_files.extend(files);
            }
            match self.commit_waits.keys().next() {
                Some(&next) if !self.pipe.wake_engine_at(next) => continue,
                _ => return,
            }
        }
    }

    /// Files the whole of a persistent handle being removed, to put back if
    /// its deletion does not commit.
    pub(super) fn keep_until_durable(&mut self, h: Box<Handle>) {
        self.undo_if_this_group_fails(Undo::Reinsert(h));
    }

    /// Files `undo` under the group being built (the current request's
    /// store operations), whatever its reply waits for.
    pub(super) fn undo_if_this_group_fails(&mut self, undo: Undo) {
        let seq = self.batch.seq;
        self.batch.pending.entry(seq).or_default().undo.push(undo);
    }

    /// Undoes a resume whose commit failed: the handle is attached as it
    /// was, a disconnected one with its old deadline (the monotonic one it
    /// had: rebuilt from the record's wall-clock deadline, a step of the
    /// wall clock since its disconnect moved it by the step, review
    /// rvclock). A connection gone
    /// meanwhile is not attached again (its frontend is gone: the handle
    /// stays disconnected, as it would be).
    fn put_back_attachment(&mut self, a: &Attachment) {
        let conn = a.conn.filter(|c| self.conns.contains_key(c));
        if a.conn.is_some() && conn.is_none() {
            return;
        }
        let Some(h) = self.handles.get_mut(&a.key) else {
            return;
        };
        // A break of its lease sent meanwhile waited for the failed commit
        // (behind the resume's reply) and is dropped with it: no longer in
        // progress, the open that wanted it runs again (and finds the
        // holder disconnected). Else it waited the whole break timeout.
        if let Some(lk) = h.rec.lease.map(|l| l.key) {
            let file = h.rec.file;
            if self.breaking.remove(&(file, lk)).is_some() {
                self.retry_files.insert(file);
            }
        }
        let Some(h) = self.handles.get_mut(&a.key) else {
            return;
        };
        if let Some(c) = h.conn.filter(|c| Some(*c) != conn) {
            if let Some(c) = self.conns.get_mut(&c) {
                c.handles.remove(&a.key);
            }
        }
        if let Some(c) = conn.and_then(|c| self.conns.get_mut(&c)) {
            c.handles.insert(a.key);
        }
        h.conn = conn;
        h.rec.conn = a.state;
        h.rec.attached_by = a.attached_by;
        h.gen += 1;
        let gen = h.gen;
        if h.rec.frontend != a.frontend {
            let now = std::mem::replace(&mut h.rec.frontend, a.frontend.clone());
            if let Some(n) = self.per_frontend.get_mut(&now) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_frontend.remove(&now);
                }
            }
            *self.per_frontend.entry(a.frontend.clone()).or_default() += 1;
        }
        if let ConnState::Disconnected { .. } = a.state {
            h.expires_mono = a.expires_mono;
            self.expiries
                .push(std::cmp::Reverse((a.expires_mono, a.key, gen)));
        }
        self.attribute(a.key, a.uid);
    }

    /// Undoes a loss that did not commit: the handle is disconnected as it
    /// was, in the file index, holding its lease key, its locks' descriptor
    /// and its expiry's deadline; its locks are re-taken from its record
    /// (the rollback rebuilds the lock table of the file returned). The
    /// next open of the file finds the loss again.
    fn unlose(&mut self, loss: Loss) -> Option<FileId> {
        let key = loss.key;
        let h = self
            .handles
            .get_mut(&key)
            .filter(|h| h.rec.conn == ConnState::Lost)?;
        h.rec.conn = loss.conn;
        h.lock_fd = loss.lock_fd;
        h.gen += 1;
        h.expires_mono = loss.expires_mono;
        let (file, gen) = (h.rec.file, h.gen);
        let lease = h.rec.lease.map(|l| (h.rec.client.clone(), l.key));
        self.expiries
            .push(std::cmp::Reverse((loss.expires_mono, key, gen)));
        let filed = self.by_file.entry(file).or_default();
        if !filed.contains(&key) {
            filed.push(key);
        }
        if loss.unmirrored {
            self.unmirrored.insert(key);
        }
        if let Some((client, lk)) = lease {
            self.lease_key_taken(&client, lk, file);
        }
        self.reweigh(key);
        warn!(resume_key = %key, "a handle's loss whose commit failed is undone: found again at the next open of its file");
        Some(file)
    }

    /// Puts back a handle whose removal did not commit, attached as it was
    /// (if its connection is still there).
    fn reinsert(&mut self, mut h: Handle) {
        let key = h.rec.key;
        if self.handles.contains_key(&key) {
            return;
        }
        if let Some(g) = h.rec.create_guid.filter(|_| {
            h.rec.durability.is_persistent()
                && h.rec.create_action == libfilter::model::CreateAction::Created
        }) {
            // Its close cleared the create marker before the deletion
            // that did not commit (`Engine::remove`): put it back.
            let marker = super::create_marker(&h.rec.client, &g);
            self.fs.restore_marker(
                h.fd.as_ref().map(std::os::fd::AsFd::as_fd),
                h.rec.kernel_handle.as_ref(),
                &h.rec.path,
                &marker,
            );
        }
        match h.conn {
            Some(c) if self.conns.contains_key(&c) => {
                if let Some(x) = self.conns.get_mut(&c) {
                    x.handles.insert(key);
                }
            }
            None => {
                // Disconnected or lost, as it was (an expiry or purge that
                // did not commit): its expiry is tried again, at its
                // deadline (the monotonic one it kept) and not before
                // EXPIRY_RETRY_MS from now.
                let retry = h.expires_mono.max(super::mono_ms() + EXPIRY_RETRY_MS);
                self.expiries.push(std::cmp::Reverse((retry, key, h.gen)));
            }
            Some(_) => {
                h.conn = None;
                let now = libfilter::model::now_ms();
                let timeout = u64::from(h.rec.durability.timeout_ms().unwrap_or(0));
                h.rec.conn = ConnState::Disconnected {
                    since_ms: now,
                    expires_ms: now + timeout,
                };
                h.gen += 1;
                h.expires_mono = super::mono_ms() + timeout;
                self.expiries
                    .push(std::cmp::Reverse((h.expires_mono, key, h.gen)));
            }
        }
        warn!(resume_key = %key, "a close, expiry or purge whose commit failed is undone");
        self.insert(h);
    }

    /// Makes handle `key` what the store says it is. An open that never
    /// committed and created its file returns the file.
    fn restore_handle(&mut self, key: ResumeKey) -> Option<super::opens::CreatedFile> {
        let stored = match self.store.handle(key) {
            Ok(s) => s,
            Err(e) => {
                error!(resume_key = %key, error = %e, "cannot read a handle back from the store while rolling back");
                return None;
            }
        };
        // A non-persistent handle is not the store's: what a failed commit
        // changed of it is undone by its `Undo` entries.
        if self
            .handles
            .get(&key)
            .is_some_and(|h| !h.rec.durability.is_persistent())
        {
            return None;
        }
        match (stored, self.handles.contains_key(&key)) {
            (None, true) => {
                warn!(resume_key = %key, "rolled back an open whose commit failed");
                return self.remove_quietly(key);
            }
            (Some(rec), true) => {
                if let Some(h) = self.handles.get_mut(&key) {
                    let (conn, frontend) = (h.rec.conn, h.rec.frontend.clone());
                    // The store does not hold the link mark: kept for the
                    // same path, else found again.
                    let through_link = (h.rec.path == rec.path).then_some(h.rec.through_link);
                    h.rec = rec;
                    h.rec.conn = conn;
                    h.rec.frontend = frontend;
                    h.parked = false;
                    match through_link {
                        Some(t) => h.rec.through_link = t,
                        None => {
                            h.link_known = false;
                            self.links_pending = true;
                        }
                    }
                }
            }
            (Some(mut rec), false) => {
                // A close or expiry that did not commit: the handle is back,
                // disconnected, its descriptor taken anew when resumed.
                let now = libfilter::model::now_ms();
                let timeout = u64::from(rec.durability.timeout_ms().unwrap_or(0));
                rec.conn = ConnState::Disconnected {
                    since_ms: now,
                    expires_ms: now + timeout,
                };
                let mut h = Handle::detached(rec);
                h.expires_mono = super::mono_ms() + timeout;
                self.expiries
                    .push(std::cmp::Reverse((h.expires_mono, key, 0)));
                warn!(resume_key = %key, "a close whose commit failed is undone: the handle is disconnected");
                self.insert(h);
            }
            (None, false) => {}
        }
        None
    }

    /// Makes the replay scope's records what the store says they are.
    fn restore_scope(&mut self, scope: &ReplayScope) {
        match self.store.scope_records(scope) {
            Ok(recs) => {
                if recs.is_empty() {
                    self.replays.remove(scope);
                } else {
                    self.replays
                        .insert(scope.clone(), recs.into_iter().collect());
                }
            }
            Err(e) => {
                error!(error = %e, "cannot read replay records back from the store while rolling back")
            }
        }
    }

    /// A size change of `file` (a truncating open, an end-of-file change)
    /// is in flight from its intent until its completion commits: every
    /// protocol read and write of the file is checked (`LocksPresent`) and
    /// waits (`CheckIo` parks), so no write is acknowledged after the change
    /// and before its record — recovery may then redo the change safely.
    pub(super) fn content_change_begin(&mut self, file: FileId) {
        *self.content_changes.entry(file).or_default() += 1;
        self.locks_present(file);
    }

    /// The change is made and its completion is in this batch: reads and
    /// writes may go on once it is durable.
    pub(super) fn content_change_done(&mut self, file: FileId) {
        self.content_change_abandoned(file);
        self.touch_file(file);
        let seq = self.batch.seq();
        self.gone_after.push((seq, file));
    }

    /// The change will not happen (its intent never became durable).
    pub(super) fn content_change_abandoned(&mut self, file: FileId) {
        if let Some(n) = self.content_changes.get_mut(&file) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.content_changes.remove(&file);
            }
        }
        self.retry_files.insert(file);
    }

    /// Rebuilds a file's lock table (and its OFD mirrors) from its handles.
    pub(super) fn rebuild_locks(&mut self, file: FileId) {
        let keys: Vec<ResumeKey> = self.by_file.get(&file).cloned().unwrap_or_default();
        let mut table = LockTable::new();
        for k in &keys {
            if let Some(h) = self.handles.get(k) {
                for l in &h.rec.locks {
                    table.restore(Lock {
                        owner: *k,
                        range: l.range,
                        kind: l.kind,
                    });
                }
            }
        }
        if table.is_empty() {
            if self.locks.remove(&file).is_some() {
                self.locks_gone(file);
            }
        } else {
            self.locks.insert(file, table);
            // Frontends told the file had no locks (or not told it had) are
            // told now.
            self.locks_present(file);
        }
        for k in keys {
            let held = self
                .handles
                .get(&k)
                .map(|h| h.rec.locks.clone())
                .unwrap_or_default();
            let has_mirror = self.handles.get(&k).is_some_and(|h| h.lock_fd.is_some());
            if !held.is_empty() || has_mirror {
                if let Err(e) = self.mirror(k, &held) {
                    // A local process took the range while the unlock's
                    // commit was pending: keep trying until it lets go, as
                    // recovery does; filterctl shows the lock as not
                    // mirrored.
                    warn!(resume_key = %k, error = %e.message, "restored locks not mirrored as OFD locks yet: retrying");
                    self.unmirrored.insert(k);
                }
            }
        }
    }
}
