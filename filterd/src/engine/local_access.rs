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
        scope: crate::local::MarkScope,
    ) {
        self.mediation = scope.word().to_owned();
        self.fanotify = Some(fan);
        self.local_counters = counters;
    }

    /// Decides a local process's open: it counts as a read that shares
    /// everything (share modes that exclude readers refuse it); conflicting
    /// caching leases are broken first, the open waiting for the acks.
    pub(super) fn on_local_open(&mut self, file: FileId, pid: i32, fd: OwnedFd, reply: LocalReply) {
        use crate::local::Verdict;
        // A step of its own: a purge it makes is settled by its own commit.
        self.begin_request();
        let mut holders = self.holders_of(file);
        holders.extend(self.pending_removed_holders(file));
        if holders.is_empty() && self.lingers(file) {
            // Its last handle closed a moment ago: still remembered.
            let frontends = self.frontend_pids();
            if let Some(l) = self.local_openers.get_mut(&file) {
                l.saw(pid, &frontends);
            }
            reply.send(Verdict::Allow);
            return;
        }
        if holders.is_empty() {
            // No protocol state: ignore this file's opens from now on.
            if let Some(fan) = &self.fanotify {
                crate::local::ignore(fan, &fd, &self.local_counters);
            }
            reply.send(Verdict::Allow);
            return;
        }
        match share::decide(ShareMode::LOCAL_PROCESS, holders) {
            ShareDecision::Violation | ShareDecision::NotAvailable => {
                debug!(pid, %file, "local open refused by a protocol share mode");
                reply.send(Verdict::Deny);
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
        if self.break_leases_for(file, None, ShareMode::LOCAL_PROCESS, None) {
            self.waiting_local.push((file, reply, fd));
            return;
        }
        reply.send(Verdict::Allow);
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
            debug!(%file, "/proc scan over its budget: counted as a local opener");
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
            .flat_map(|h| [h.fd.as_ref(), h.lock_fd.as_ref()])
            .flatten()
            .map(|f| f.as_fd())
            .chain(
                self.waiting_local
                    .iter()
                    .filter(|(f, ..)| *f == file)
                    .map(|(_, _, fd)| fd.as_fd()),
            )
            .collect();
        if mine.is_empty() {
            let alone = libfilter::sys::alone_on_inode(fd);
            if !matches!(alone, Ok(true)) && self.lingers(file) {
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
                    let found = LocalOpeners::scanned(file, true, &[fd], frontends, budget);
                    // Nobody named, or not everyone looked at: the other
                    // open may have been closed since (a frontend
                    // dropping a closed handle's descriptor); probing
                    // again tells — alone now is alone.
                    if (found.unattributed() || budget.cut)
                        && libfilter::sys::alone_on_inode(fd).is_ok_and(|a| a)
                    {
                        LocalOpeners::default()
                    } else {
                        found
                    }
                }
                Err(e) => {
                    // No leases here: scan (slower, as complete).
                    debug!(error = %e, %file, "write-lease probe failed; scanning /proc");
                    LocalOpeners::scanned(file, false, &[fd], frontends, budget)
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
            .or_insert_with(|| LocalOpeners::scanned(file, false, &mine, frontends, budget));
        (entry.refresh(file, &mine, frontends, budget), None)
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
            .filter(|c| matches!(c.role, Role::Frontend { .. }))
            .map(|c| c.peer.pid)
            .chain(self.frontends_gone.iter().map(|(p, _, _)| *p))
            .collect()
    }

    /// `file`'s last handle closed: what is known of its local openers is
    /// kept for [`crate::local_opens::LINGER`] (see there); entries whose
    /// time has passed go now.
    pub(super) fn linger_local_openers(&mut self, file: FileId) {
        let now = std::time::Instant::now();
        while let Some(&(until, f)) = self.lingering.front() {
            if until > now {
                break;
            }
            self.lingering.pop_front();
            if !self.by_file.contains_key(&f)
                && self
                    .local_openers
                    .get(&f)
                    .is_some_and(|l| l.lingering_until.is_none_or(|u| u <= now))
            {
                self.local_openers.remove(&f);
            }
        }
        if self.fanotify.is_none() {
            self.local_openers.remove(&file);
            return;
        }
        if let Some(l) = self.local_openers.get_mut(&file) {
            let until = now + crate::local_opens::LINGER;
            l.lingering_until = Some(until);
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
