//! Local access: the engine's verdict on a local process's open
//! (fanotify, see `crate::local`).

use super::*;
use crate::local_opens::LocalOpeners;

impl Engine {
    /// Turns local-access mediation on.
    pub fn set_fanotify(
        &mut self,
        fan: Arc<nix::sys::fanotify::Fanotify>,
        counters: Arc<crate::local::LocalCounters>,
        mediated: Arc<crate::local::Mediated>,
        export_root: OwnedFd,
    ) {
        self.mediation = mediated.scope.word().to_owned();
        self.export_root = Some(export_root);
        // Files recovered with state: their local opens reach the engine
        // through every mount.
        for file in self.by_file.keys() {
            mediated.add(*file);
        }
        self.fanotify = Some(fan);
        self.mediated = Some(mediated);
        self.local_counters = counters;
    }

    /// Decides a local process's open: it counts as a read that shares
    /// everything (share modes that exclude readers refuse it); conflicting
    /// caching leases are broken first, the open waiting for the acks.
    pub(super) fn on_local_open(
        &mut self,
        file: FileId,
        pid: i32,
        fd: Arc<OwnedFd>,
        reply: LocalReply,
    ) {
        use crate::local::Verdict;
        if !reply.take() {
            // Refused by the reader's watchdog while it waited here:
            // nothing is done for an open that did not happen.
            self.local_open_past_deadline(file, pid);
            return;
        }
        if !reply.may_wait() {
            // Acted for already and run again past its deadline (a failed
            // commit forgot the break it waited for, and put back a handle
            // it purged): refused before anything is done for it again —
            // a handle purged again, a lease broken again, for an open
            // that may wait no more (re-review rr-w3r2 1: refused only
            // after the break had gone out).
            self.refuse_held_past_deadline(file, reply, fd);
            return;
        }
        // A step of its own: a purge it makes is settled by its own commit.
        self.begin_request();
        if let Some(seq) = self.create_pending(file) {
            // A persistent create whose commit is pending (its handle
            // may be closed already): if it fails, the rollback unlinks
            // the file, and a local process let in now would be left
            // writing to a file without a name. It waits for the outcome
            // (refused when the create is undone); the reader's verdict
            // deadline bounds the wait.
            self.stats.local_opens_waited_for_commit += 1;
            debug!(pid, %file, "local open of a file whose create is committing: waits");
            if self.park_local(file, pid, reply, fd) {
                self.wait_for_commit(seq, file);
            }
            return;
        }
        if self.restart_gate_closed(None) {
            // After a restart: a frontend seen before it may have a client
            // caching under a lease this daemon forgot — of any file, one
            // without state here included — and has not broken it yet
            // (`restart_gate`). Decided again when the gate opens.
            self.restart_gate_hold_local(file, pid, reply, fd);
            return;
        }
        self.lose_handles_of_a_reused_inode(file, fd.as_fd());
        let mut holders = self.holders_of(file);
        let (removal, pending) = self.pending_removed_holders(file);
        if !pending.is_empty() {
            // A handle whose removal is committing would refuse this open
            // (or be purged by it) were it back: the open waits for the
            // outcome, then meets it only if a failed commit put it back.
            // Decided at once as if it were there, a local open right
            // after a share-none handle's CLOSE reply was refused (EPERM).
            // Handles that would let it in change nothing: decided now.
            let all: Vec<_> = holders.iter().chain(&pending).cloned().collect();
            let clean = matches!(
                share::decide(ShareMode::LOCAL_PROCESS, all),
                ShareDecision::Grant { purge } if purge.is_empty()
            );
            if let Some(seq) = removal.filter(|_| !clean) {
                self.stats.local_opens_waited_for_commit += 1;
                debug!(pid, %file, "local open of a file whose handle's removal is committing: waits");
                if self.park_local(file, pid, reply, fd) {
                    self.wait_for_commit(seq, file);
                }
                return;
            }
        }
        holders.extend(pending);
        // No protocol state: no share-mode holder and no handle at all. A
        // stat or sharing-exempt open holds no share mode but may hold a
        // lease (smb2.lease.statopen), which this open must break; taken
        // for stateless, the file was marked ignored, the lease never
        // broken, and this opener never tracked, so a later share-none
        // open or write lease was granted past it (review, session 29).
        let stateless = holders.is_empty() && !self.by_file.contains_key(&file);
        if stateless && self.lingers(file) {
            // Its last handle closed a moment ago: still remembered.
            let frontends = self.frontend_pids();
            if let Some(l) = self.local_openers.get_mut(&file) {
                l.saw(pid, &frontends);
            }
            reply.send(Verdict::Allow, fd);
            return;
        }
        if stateless {
            // No protocol state: ignore this file's opens from now on.
            if let Some(fan) = &self.fanotify {
                crate::local::ignore(fan, &fd, &self.local_counters);
            }
            if let Some(m) = &self.mediated {
                m.remove(file);
            }
            reply.send(Verdict::Allow, fd);
            return;
        }
        match share::decide(ShareMode::LOCAL_PROCESS, holders) {
            ShareDecision::Violation | ShareDecision::NotAvailable => {
                debug!(pid, %file, "local open refused by a protocol share mode");
                reply.send(Verdict::Deny, fd);
                return;
            }
            ShareDecision::Grant { purge } => {
                for k in purge {
                    self.purge(k);
                }
            }
        }
        // It counts against later protocol opens while it is open (the
        // frontends' pids are looked up only for a file that keeps track).
        if pid > 0 && self.local_openers.contains_key(&file) {
            let frontends = self.frontend_pids();
            if let Some(l) = self.local_openers.get_mut(&file) {
                l.saw(pid, &frontends);
            }
        }
        if !self
            .break_leases_for(file, None, ShareMode::LOCAL_PROCESS, None, None, false)
            .is_empty()
        {
            // Remembered already (pid 0 when it runs again). Acted for:
            // the engine keeps it until its verdict (the break's timeout
            // bounds the wait), the watchdog does not refuse it meanwhile
            // — unless it ran again past its deadline (a failed commit
            // forgot the break it waited for), when it may not wait again.
            if !reply.may_wait() {
                self.refuse_held_past_deadline(file, reply, fd);
                return;
            }
            let mut reply = reply;
            reply.acted = true;
            self.waiting_local.push((file, 0, reply, fd));
            return;
        }
        reply.send(Verdict::Allow, fd);
        // The next ones may be the reader's to allow (checked again
        // before the engine waits).
        if self.mediated.is_some() && !self.plain_files.contains(&file) {
            self.plain_files.push(file);
        }
    }

    /// Parks a local open in `waiting_local` until what it waits for is
    /// resolved: `false` (dropped, refused at once) when its verdict
    /// deadline passed already ([`LocalReply::park`]).
    pub(super) fn park_local(
        &mut self,
        file: FileId,
        pid: i32,
        reply: LocalReply,
        fd: Arc<OwnedFd>,
    ) -> bool {
        if !reply.park() {
            match reply.acted {
                true => self.refuse_held_past_deadline(file, reply, fd),
                false => self.local_open_past_deadline(file, pid),
            }
            return false;
        }
        self.waiting_local.push((file, pid, reply, fd));
        true
    }

    /// Refuses a local open the engine acted for (and holds) whose verdict
    /// deadline passed before a new wait for it ([`LocalReply::may_wait`]).
    fn refuse_held_past_deadline(&mut self, file: FileId, reply: LocalReply, fd: Arc<OwnedFd>) {
        self.stats.local_opens_refused_after_acting += 1;
        warn!(%file, "local open acted for, past its verdict deadline, would wait again: refused");
        reply.send(crate::local::Verdict::Deny, fd);
    }

    /// Before a new lease break of `file` that local opens waiting for its
    /// breaks then wait for too (a step of a chain, a break again): those
    /// the engine acted for whose deadline passed are refused now, never
    /// kept waiting past their held grace ([`LocalReply::may_wait`]).
    pub(super) fn refuse_held_local_opens_past_deadline(&mut self, file: FileId) {
        let (late, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_local)
            .into_iter()
            .partition(|(f, _, reply, _)| *f == file && !reply.may_wait());
        self.waiting_local = kept;
        for (file, _, reply, fd) in late {
            self.refuse_held_past_deadline(file, reply, fd);
        }
    }

    /// A local open whose verdict deadline passed while it waited here
    /// (refused by the reader's watchdog, or refused now by dropping its
    /// verdict): dropped without acting for it, counted.
    fn local_open_past_deadline(&mut self, file: FileId, pid: i32) {
        self.stats.local_opens_past_deadline += 1;
        debug!(pid, %file, "local open past its verdict deadline (refused): dropped, nothing done for it");
    }

    /// Whether a local open of `file` would be allowed as it stands,
    /// with nothing to do but record its opener: the file has handles,
    /// no create of it is committing, no local open of it waits, the share
    /// modes (of handles whose removal is committing too) let a local
    /// reader in without purging anything, and no
    /// handle of it holds a lease nor is one being broken (conservative:
    /// any lease sends its local opens to the engine), and the open gate
    /// after a restart does not hold local opens (`restart_gate`).
    pub(super) fn local_open_is_plain(&self, file: FileId) -> bool {
        if self.restart_gate_holds(None)
            || self
                .pending_creates
                .get(&file)
                .is_some_and(|&seq| seq > self.pipe.committed())
            || self.waiting_local.iter().any(|(f, ..)| *f == file)
        {
            return false;
        }
        let mut holders = self.holders_of(file);
        if holders.is_empty() {
            return false;
        }
        if self
            .by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .any(|h| h.rec.lease.is_some())
            || self.breaking.keys().any(|(f, _)| *f == file)
        {
            return false;
        }
        holders.extend(self.pending_removed_holders(file).1);
        matches!(
            share::decide(ShareMode::LOCAL_PROCESS, holders),
            ShareDecision::Grant { purge } if purge.is_empty()
        )
    }

    /// Before the engine waits: the files whose local opens were plain
    /// when decided, and still are, are published to the reader
    /// ([`crate::local::Plain`]); the others are forgotten.
    pub(super) fn publish_plain_files(&mut self) {
        if self.plain_files.is_empty() {
            return;
        }
        if self.store.kind() != "lmdb" {
            // A shared store's owner checks its lease before it acts on
            // each event (`Engine::run`), which the reader cannot: its
            // local opens all reach the engine.
            self.plain_files.clear();
            return;
        }
        let mut files = std::mem::take(&mut self.plain_files);
        files.retain(|f| self.local_open_is_plain(*f));
        if files.len() > crate::local::MAX_PLAIN_FILES {
            // The most recently decided ones.
            files.drain(..files.len() - crate::local::MAX_PLAIN_FILES);
        }
        if let Some(m) = &self.mediated {
            m.plain.publish(&files);
        }
        self.plain_files = files;
    }

    /// When the engine wakes: the reader allows nothing by itself any
    /// more, and the openers it allowed count as if the engine had
    /// allowed them (`on_local_open`).
    pub(super) fn take_back_plain_files(&mut self) {
        let Some(m) = &self.mediated else {
            return;
        };
        let seen = m.plain.take_back();
        if seen.is_empty() {
            return;
        }
        let frontends = self.frontend_pids();
        for (file, pid) in seen {
            if pid > 0 {
                if let Some(l) = self.local_openers.get_mut(&file) {
                    l.saw(pid, &frontends);
                }
            }
        }
    }

    /// Refuses a client path that, in the export as local processes see it
    /// now, crosses into another mount: filterd resolves paths in a clone
    /// of the export's mounts taken at start, which lacks a mount added
    /// inside the export since — a create there would land in the
    /// directory the new mount hides, out of local processes' sight. One
    /// `O_PATH` resolution through the export root itself (which raises
    /// no fanotify event and breaks no lease) with `RESOLVE_NO_XDEV`: a
    /// crossing fails it with `EXDEV`, wherever on the path it is.
    pub(super) fn refuse_paths_crossing_later_mounts(
        &mut self,
        path: &RelPath,
    ) -> Result<(), WireError> {
        let Some(real) = &self.export_root else {
            return Ok(());
        };
        match libfilter::sys::openat2_beneath(real.as_fd(), path.as_str(), libc::O_PATH, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                self.stats.opens_refused += 1;
                Err(err(
                    ErrorCode::AccessDenied,
                    format!("{path}: crosses a mount inside the export (mounted since filterd started, or another filesystem)"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// A protocol open's file gets protocol state: its local opens must
    /// reach filterd again (its ignore mark is removed). When that fails
    /// the open is refused (and counted) — granted, local opens of the
    /// file would pass unseen, past its share mode. A file this very open
    /// created has no mark to remove.
    pub(super) fn mediate_local_opens_of(
        &mut self,
        path: &RelPath,
        of: &crate::fsops::OpenedFile,
    ) -> Result<(), WireError> {
        let Some(fan) = &self.fanotify else {
            return Ok(());
        };
        // Before the probe for local openers: from now on its opens reach
        // the engine through every mount.
        if let Some(m) = &self.mediated {
            m.add(of.file);
        }
        // A file this open created carries no ignore mark — unless the
        // export is a subtree: then the reader answers opens through other
        // mounts itself, and one between the create and the `add` above
        // found a file it did not know and marked it ignored. That mark
        // would hide every later open (through every mount) from the share
        // modes this open is about to take.
        if of.created && self.mediated.is_none() {
            return Ok(());
        }
        crate::local::unignore(fan, of.fd.as_fd(), &self.local_counters).map_err(|e| {
            self.stats.opens_refused += 1;
            self.stats.opens_refused_unmediated += 1;
            err(
                ErrorCode::Internal,
                format!(
                    "{path}: local opens of the file cannot be mediated (its fanotify ignore mark could not be removed: {e}); refused rather than granted unmediated"
                ),
            )
        })
    }

    /// With local mediation on, refuses a protocol open that leaves filterd
    /// fewer free descriptors than [`crate::local::descriptor_reserve`]
    /// (counted): reading a
    /// fanotify event takes a descriptor the kernel makes, so protocol
    /// opens must never use the last ones. `fd` is the open's new
    /// descriptor. One `getrlimit` and one `stat` of `/proc/self/fd` (its
    /// size is the number of descriptors open, Linux 6.2); before that,
    /// the new descriptor's number — descriptors are given lowest first,
    /// so at most `limit - fd - 1` are free.
    pub(super) fn keep_descriptor_reserve(
        &mut self,
        path: &RelPath,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), WireError> {
        if self.fanotify.is_none() {
            // No events to read: nothing to keep descriptors for, and the
            // check stays off the open path.
            return Ok(());
        }
        let number = u64::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap_or(0);
        let Some((limit, free)) = crate::local::free_descriptors(number + 1) else {
            return Ok(());
        };
        let reserve = crate::local::descriptor_reserve(limit);
        if free >= reserve {
            return Ok(());
        }
        self.stats.opens_refused += 1;
        self.stats.opens_refused_descriptors += 1;
        let n = self.stats.opens_refused_descriptors;
        if n.is_power_of_two() {
            tracing::warn!(
                limit,
                free,
                reserve,
                refused = n,
                "protocol opens refused: filterd is near its descriptor limit"
            );
        }
        Err(err(
            ErrorCode::LimitReached,
            format!(
                "{path}: filterd has {free} free descriptors of {limit}, fewer than the {reserve} it keeps for reading local opens; close handles or raise its limit"
            ),
        ))
    }

    /// Whether local processes hold `file` open, for a protocol open whose
    /// new descriptor is `fd` (not yet a handle). See `crate::local_opens`
    /// for what is seen. Without local mediation, local opens never count.
    /// When filterd held no other descriptor of the file, what the probe
    /// learnt is returned too, for [`Engine::remember_local_openers`] once
    /// the handle exists.
    pub(super) fn local_opens_of(
        &mut self,
        file: FileId,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> (bool, Option<LocalOpeners>) {
        if self.fanotify.is_none() {
            return (false, None);
        }
        let frontends = self.frontend_pids();
        let mut budget = crate::local_opens::ScanBudget::default();
        let (present, known) = self.local_opens_within(file, fd, &frontends, &mut budget);
        if budget.cut {
            self.stats.local_scans_cut_short += 1;
            debug!(%file, "/proc scan over its budget: a local opener unless only a frontend explains the other open");
        }
        (present, known)
    }

    fn local_opens_within(
        &mut self,
        file: FileId,
        fd: std::os::fd::BorrowedFd<'_>,
        frontends: &[i32],
        budget: &mut crate::local_opens::ScanBudget,
    ) -> (bool, Option<LocalOpeners>) {
        // filterd's own open file descriptions of the file: its handles'
        // (frontends hold the same ones) and local opens waiting here.
        let mut mine: Vec<std::os::fd::BorrowedFd<'_>> = self
            .by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .flat_map(|h| [h.fd.as_deref(), h.lock_fd.as_ref()])
            .flatten()
            .map(|f| f.as_fd())
            .chain(
                self.waiting_local
                    .iter()
                    .filter(|(f, ..)| *f == file)
                    .map(|(.., fd)| fd.as_fd()),
            )
            .collect();
        if mine.is_empty() {
            let alone = crate::local::alone_on_inode(fd);
            // A frontend closed the file's last handle a moment ago: a
            // scan that names nobody — complete or cut short by its budget
            // — is that frontend's descriptor, not a local opener.
            let just_closed = self.lingers(file);
            if !matches!(alone, Ok(true)) && just_closed {
                // Its last handle closed a moment ago, and every local
                // open since reached us: the other open the probe saw is
                // a remembered process's, or a frontend's descriptor of
                // the closed handle. Re-check the remembered ones only.
                if let Some(l) = self.local_openers.get_mut(&file) {
                    if l.refresh(file, &[fd], frontends, budget) {
                        return (true, None);
                    }
                    // None of them holds it now. A frontend's descriptor
                    // of the closed handle explains what the probe saw;
                    // otherwise it is a process never heard of (a child
                    // that inherited a descriptor): scan, below.
                    if frontends
                        .iter()
                        .any(|p| crate::local_opens::holds(*p, file, &[fd], budget))
                    {
                        return (false, None);
                    }
                }
            }
            let known = match alone {
                Ok(true) => LocalOpeners::default(),
                Ok(false) => {
                    let found =
                        LocalOpeners::scanned(file, true, &[fd], frontends, budget, just_closed);
                    // Nobody named, or not everyone looked at: the other
                    // open may have been closed since (a frontend
                    // dropping a closed handle's descriptor); probing
                    // again tells — alone now is alone.
                    if (found.unattributed() || budget.cut)
                        && crate::local::alone_on_inode(fd).is_ok_and(|a| a)
                    {
                        LocalOpeners::default()
                    } else {
                        found
                    }
                }
                Err(e) => {
                    // No leases here: scan (slower, as complete).
                    debug!(error = %e, %file, "write-lease probe failed; scanning /proc");
                    LocalOpeners::scanned(file, false, &[fd], frontends, budget, just_closed)
                }
            };
            return (known.present(), Some(known));
        }
        mine.push(fd);
        // Every local open since filterd first held the file reached the
        // engine; recovered handles were never probed: scan once.
        let entry = self
            .local_openers
            .entry(file)
            .or_insert_with(|| LocalOpeners::scanned(file, false, &mine, frontends, budget, false));
        (entry.refresh(file, &mine, frontends, budget), None)
    }

    /// Whether a local process holds `file` open, for the undo of a
    /// create whose commit failed (`fd`: the rolled-back handle's own
    /// descriptor). Alone by the write-lease probe: no. Otherwise the
    /// processes holding it are looked for in `/proc` (filterd and
    /// frontends left out): one found, or a scan cut short, is a yes
    /// (the file stays: nothing is lost, but the undo is not done). An
    /// open still in progress — a local open waiting here for the
    /// create's outcome, which is then refused — names no process and
    /// does not count. Without local mediation, local opens never count.
    pub(super) fn held_locally(&mut self, file: FileId, fd: std::os::fd::BorrowedFd<'_>) -> bool {
        if self.fanotify.is_none() || crate::local::alone_on_inode(fd).is_ok_and(|a| a) {
            return false;
        }
        let frontends = self.frontend_pids();
        // Rare (a failed commit), and a cut-short scan keeps the file: a
        // larger budget than a protocol open's (200 ms at most).
        let mut budget = crate::local_opens::ScanBudget::times(4);
        let (pids, _) = crate::local_opens::scan_all(file, &[fd], &frontends, &mut budget);
        if budget.cut {
            self.stats.local_scans_cut_short += 1;
        }
        if !pids.is_empty() {
            debug!(%file, ?pids, "local processes hold a file whose create is undone");
        }
        !pids.is_empty() || budget.cut
    }

    /// Processes attached as frontends now, or lost within
    /// [`crate::local_opens::FRONTEND_PIDS_KEPT_FOR`]: their descriptors
    /// are protocol handles', never local opens.
    pub(super) fn frontend_pids(&mut self) -> Vec<i32> {
        let now = std::time::Instant::now();
        self.frontends_gone.retain(|(pid, started, at)| {
            now.duration_since(*at) < crate::local_opens::FRONTEND_PIDS_KEPT_FOR
                // Still the same process (its pid not reused since).
                && started.is_some()
                && crate::local_opens::start_time(*pid) == *started
        });
        self.conns
            .values()
            .filter(|c| matches!(*c.role, Role::Frontend { .. }))
            .map(|c| c.peer.pid)
            .chain(self.frontends_gone.iter().map(|(p, _, _)| *p))
            .collect()
    }

    /// `file`'s last handle closed: what is known of its local openers is
    /// kept for [`crate::local_opens::LINGER`] (see there); entries whose
    /// time has passed go now, and so do their files from the set of
    /// files the reader sends to the engine (`Mediated`, a subtree
    /// export's) when they have no handle again. Before (review, session
    /// 29) a file stayed in that set for the rest of the run: it grew with
    /// every file ever opened, and once the filesystem gave a removed
    /// file's inode number to another file, that file's opens through
    /// other mounts went through the engine instead of being answered at
    /// once.
    pub(super) fn linger_local_openers(&mut self, file: FileId) {
        let now = std::time::Instant::now();
        while let Some(&(until, f)) = self.lingering.front() {
            if until > now {
                break;
            }
            self.lingering.pop_front();
            if self.by_file.contains_key(&f) {
                continue;
            }
            let lingers = match self.local_openers.get(&f) {
                Some(l) if l.lingering_until.is_none_or(|u| u <= now) => {
                    self.local_openers.remove(&f);
                    false
                }
                Some(_) => true,
                None => false,
            };
            // A handle whose removal is committing keeps it until then
            // (were the commit to fail, the handle would be back).
            let removing = self.removal_pending_of(|r| r.file == f).is_some();
            if !lingers && !removing {
                if let Some(m) = &self.mediated {
                    m.remove(f);
                }
            }
        }
        if self.mediated.is_none() {
            // No fanotify.
            self.local_openers.remove(&file);
            return;
        }
        let until = now + crate::local_opens::LINGER;
        let known = match self.local_openers.get_mut(&file) {
            Some(l) => {
                l.lingering_until = Some(until);
                true
            }
            None => false,
        };
        // Queued only when there is something to let go then: a whole
        // filesystem's or mount's export keeps no set of files, and a
        // close there (the hot path) costs no entry.
        let subtree = self
            .mediated
            .as_ref()
            .is_some_and(|m| m.scope == crate::local::MarkScope::Subtree);
        if known || subtree {
            self.lingering.push_back((until, file));
        }
    }

    /// Whether `file` has no handle but what is known of its local openers
    /// is still kept (its last handle closed within
    /// [`crate::local_opens::LINGER`]).
    fn lingers(&self, file: FileId) -> bool {
        !self.by_file.contains_key(&file)
            && self
                .local_openers
                .get(&file)
                .and_then(|l| l.lingering_until)
                .is_some_and(|u| u > std::time::Instant::now())
    }

    /// Keeps what a probe learnt about `file`'s local openers, once the
    /// file has a handle.
    pub(super) fn remember_local_openers(&mut self, file: FileId, known: Option<LocalOpeners>) {
        if let Some(k) = known {
            self.local_openers.insert(file, k);
        }
    }
}
