//! Expiry of disconnected handles, purges, and the deadlines of breaks and
//! lock hints (all on the monotonic clock).

use super::*;

impl Engine {
    /// A frontend that did not do in time what a lock waits for (a lock
    /// hint's acknowledgement, a checked write's `IoDone`) is treated as
    /// failed, never bypassed: its connection is dropped (its durable
    /// handles detach, its other handles close), so it can do no I/O on the
    /// file that filterd does not hear of; the lock then proceeds.
    pub(super) fn drop_frontend(&mut self, c: ConnId, why: &str) {
        if let Some(x) = self.conns.get(&c) {
            warn!(conn = c.0, pid = x.peer.pid, "{why}: frontend dropped");
            self.stats.frontends_dropped += 1;
            x.writer.kill();
            // Its durable handles are disconnected now: it must not be
            // waited for again, as an absent frontend, by the lock it was
            // just dropped for (nor by another first lock until it attaches
            // again; it learns of locks when it resumes).
            if let Role::Frontend { instance, .. } = &*x.role {
                self.hint_gave_up.insert(instance.clone());
            }
        }
        self.on_closed(c);
    }

    /// Expires a disconnected or lost handle. Its frontend hears of it once
    /// the deletion is durable; if that commit fails the handle is back and
    /// its expiry is tried again (`durable::EXPIRY_RETRY_MS`).
    pub(super) fn expire(&mut self, key: ResumeKey) {
        if let Some(rec) = self.remove_as(key, Some(Event::Expired { key })) {
            self.stats.expiries += 1;
            info!(resume_key = %key, path = %rec.path, "handle expired");
        }
    }

    /// Purges a disconnected durable handle in the way of the request being
    /// run: undone if that request's commit fails (`settle_removals`).
    pub(super) fn purge(&mut self, key: ResumeKey) {
        if let Some(rec) = self.remove_as(key, Some(Event::Purged { key })) {
            self.stats.purges += 1;
            info!(resume_key = %key, path = %rec.path, "disconnected durable handle purged by a conflicting open");
        }
    }

    /// Purges a disconnected or lost handle at the operator's word
    /// (`filterctl purge --disconnected`): a purge, counted and announced
    /// as one, not an expiry (its timeout did not come).
    fn purge_by_operator(&mut self, key: ResumeKey) {
        if let Some(rec) = self.remove_as(key, Some(Event::Purged { key })) {
            self.stats.purges += 1;
            info!(resume_key = %key, path = %rec.path, lost = rec.conn == ConnState::Lost, "handle purged by the operator");
        }
    }

    /// `purge --disconnected`: every handle with no connection —
    /// disconnected, or lost (its file gone) — is purged. The reply says
    /// how many of them were lost.
    pub(super) fn purge_unattached(&mut self) -> Reply {
        let keys: Vec<(ResumeKey, bool)> = self
            .handles
            .values()
            .filter(|h| h.conn.is_none())
            .map(|h| (h.rec.key, h.rec.conn == ConnState::Lost))
            .collect();
        let count = keys.len() as u64;
        let lost = keys.iter().filter(|(_, lost)| *lost).count() as u64;
        for (key, _) in keys {
            self.purge_by_operator(key);
        }
        Reply::Purged {
            count,
            lost: Some(lost),
        }
    }

    pub(super) fn expire_due(&mut self, now: u64) {
        self.begin_request();
        // Locks not mirrored yet (a local process held a conflicting lock
        // or a kernel lease): try again.
        let retry: Vec<ResumeKey> = self.unmirrored.iter().copied().collect();
        for key in retry {
            let held = match self.handles.get(&key) {
                Some(h) => h.rec.locks.clone(),
                None => {
                    self.unmirrored.remove(&key);
                    continue;
                }
            };
            // (`mirror` takes the key off `unmirrored` once it took them.)
            if self.mirror(key, &held).is_ok() && !self.unmirrored.contains(&key) {
                info!(resume_key = %key, "locks mirrored as OFD locks at last");
            }
        }
        let late: Vec<FileId> = self
            .hint_waits
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(f, _)| *f)
            .collect();
        for f in late {
            // A frontend that does not acknowledge in time is treated as
            // failed, never bypassed: its connection is dropped (its durable
            // handles detach, its other handles close), so it can do no
            // unchecked I/O on the file; the lock then proceeds.
            if let Some(w) = self.hint_waits.remove(&f) {
                // A frontend that had handles of the file when it went away
                // (filterd restarted, or it is stopped) and is still not
                // back: nothing to drop. It learns of the lock when it
                // resumes the handle, and until then does no I/O unchecked
                // (its attachment is not io_ready).
                for i in w.absent {
                    warn!(file = ?f, instance = %i, "frontend with disconnected handles of a file, or attached before a restart, did not come back before its first lock: the lock proceeds");
                    self.hint_give_up(i);
                }
                for c in w.conns {
                    self.drop_frontend(c, "frontend did not acknowledge a lock hint in time");
                }
            }
            self.retry_files.insert(f);
        }
        self.checked_io_overdue(now);
        self.restart_gate_due(now);
        let due: Vec<(FileId, LeaseKey)> = self
            .breaking
            .iter()
            .filter(|(_, b)| b.deadline_ms <= now)
            .map(|(k, _)| *k)
            .collect();
        for (file, lk) in due {
            if let Some(b) = self.breaking.remove(&(file, lk)) {
                // Each lowering commits (or fails) by itself.
                self.begin_request();
                warn!(lease_key = %lk, to = %b.to, "lease break not acknowledged in time: lowered anyway");
                let holder = self
                    .by_file
                    .get(&file)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| self.handles.get(k))
                    .find_map(|h| match (h.rec.lease, h.conn) {
                        (Some(l), Some(c)) if l.key == lk => Some((l.state, c)),
                        _ => None,
                    })
                    .and_then(|(s, c)| Some((s, self.conns.get(&c)?.writer.clone())));
                // Windows takes the whole lease from a holder that did not
                // acknowledge in time (MS-SMB2 3.3.2.5: Lease.LeaseState
                // becomes none; smbtorture smb2.lease.timeout), not just
                // what the break asked for.
                let windows = self.lease_follows_msfsa(file, lk);
                let to = if windows { LeaseState::NONE } else { b.to };
                let epoch = self.set_lease_state(file, lk, to);
                // Tell the holder its lease went down without it (an nfsl/1
                // delegation is revoked then) — as a break is told, once a
                // persistent holder's lowered lease and new epoch are
                // durable: shown before, a failed commit or a crash would
                // give them back, and the next break would repeat an epoch
                // the client saw (review: sent at once, it did). If the
                // commit fails the event is dropped with it.
                if let Some((from, writer)) = holder {
                    let dep = self.break_dependency(file, lk);
                    let ev = Event::LeaseBreak {
                        lease_key: lk,
                        current_state: from,
                        new_state: to,
                        epoch,
                        ack_required: false,
                        file: Some(file),
                    };
                    self.event_after(dep, writer, ev);
                }
                self.break_over(file);
            }
        }
        while let Some(Reverse((t, key, gen))) = self.expiries.peek().copied() {
            if t > now {
                break;
            }
            self.expiries.pop();
            let due = self.handles.get(&key).is_some_and(|h| {
                h.gen == gen
                    && matches!(h.rec.conn, ConnState::Disconnected { .. } | ConnState::Lost)
            });
            if due {
                // Each expiry commits (or fails) by itself.
                self.begin_request();
                self.expire(key);
            }
        }
    }
}
