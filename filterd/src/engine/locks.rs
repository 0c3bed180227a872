//! Byte-range locks: LockFileEx rules, lock sequences, OFD mirrors for
//! local processes, and the lock hints that tell frontends which files
//! they must check I/O on.

use super::*;

/// A first lock waiting for frontends to hear of it (see `hint_first`).
pub(super) struct HintWait {
    /// Connections told `LocksPresent` that have not acknowledged yet.
    pub(super) conns: HashSet<ConnId>,
    /// Frontend instances that have disconnected handles of the file and
    /// are not attached (filterd restarted while they were away or
    /// stopped): done when they resume a handle of the file.
    pub(super) absent: HashSet<InstanceName>,
    /// When the lock proceeds anyway (monotonic ms).
    pub(super) deadline: u64,
}

impl HintWait {
    pub(super) fn done(&self) -> bool {
        self.conns.is_empty() && self.absent.is_empty()
    }
}

impl Engine {
    /// Lock hints across a restart: `seen` names the frontends that were
    /// attached with lock hints before it. Each of them whose process is
    /// still alive may have a read or write in flight that it decided on
    /// without asking the old daemon; a first lock waits for them (as
    /// absent frontends) until they say hello — a frontend drains that I/O
    /// before its hello — or the break timeout.
    /// Opens wait for them too, until they resynced (`restart_gate`).
    pub fn set_frontends_seen(&mut self, seen: crate::frontends_seen::FrontendsSeen) {
        self.restart_expected = seen.alive().cloned().collect();
        self.restart_unsettled = self.restart_expected.clone();
        self.seen_before_restart = seen.snapshot();
        if !self.restart_expected.is_empty() {
            info!(
                frontends = self.restart_expected.len(),
                "first locks wait for the frontends attached before the restart to come back"
            );
        }
        self.frontends_seen = seen;
    }

    /// Lock hints: `instance` said hello (with `features`): it has no
    /// unchecked I/O in flight from before, so no first lock waits for it
    /// as absent any more; remembered across restarts if it uses hints or
    /// says `Resynced` (then opens after a restart wait for that, not for
    /// the hello: `restart_gate`).
    pub(super) fn frontend_said_hello(&mut self, instance: &InstanceName, pid: i32, features: u64) {
        // A new process under the name of one seen before the restart
        // (or, since, the last one recorded) that is still running ends
        // nothing: the old one may have I/O in flight (it is waited for
        // until it dies or the break timeout).
        let another = self.another_ran_before_restart(instance, pid)
            || self.frontends_seen.another_alive(instance, pid);
        if !another {
            self.restart_expected.remove(instance);
            for (file, w) in self.hint_waits.iter_mut() {
                if w.absent.remove(instance) && w.done() {
                    self.retry_files.insert(*file);
                }
            }
            self.hint_waits.retain(|_, w| !w.done());
            // One that will not say `Resynced` has resynced as far as
            // filterd can know (`restart_gate`).
            if features & proto::FEATURE_RESYNCED == 0 {
                self.restart_settled(instance);
            }
        }
        // One that will say `Resynced` is one whose clients' leases a
        // restart may forget: opens after a restart wait for it.
        if features & (proto::FEATURE_LOCK_HINTS | proto::FEATURE_RESYNCED) != 0 {
            let attached = &self.instances;
            self.frontends_seen
                .insert(instance, pid, |n| attached.contains_key(n));
        }
    }

    /// Whether the process that was attached as `instance` before the
    /// restart is another one than `pid` and may still be running: `pid`
    /// then speaks neither for the I/O that process may have in flight nor
    /// for its clients' leases. Asked of the list as this daemon found it,
    /// not as hellos since rewrote it: a second process under the name —
    /// a replacement, or a peer of the same uid claiming the name — is
    /// recorded at its hello, and before review aV was then taken for the
    /// one from before at its next hello or `Resynced`.
    pub(super) fn another_ran_before_restart(&self, instance: &InstanceName, pid: i32) -> bool {
        self.seen_before_restart.another_alive(instance, pid)
    }

    /// The frontend `me` a request of `conn` may skip in the waits after a
    /// restart (for frontends seen before it): its own — unless another
    /// process ran under the name before the restart and still runs. That
    /// one may have I/O in flight, or clients caching under leases, that
    /// the process asking knows nothing of (review, session 27: a
    /// replacement's own LOCK was granted while its stalled predecessor's
    /// write was in flight).
    pub(super) fn own_frontend_exempt<'a>(
        &self,
        conn: ConnId,
        me: &'a InstanceName,
    ) -> Option<&'a InstanceName> {
        if self.restart_expected.is_empty() && self.restart_unsettled.is_empty() {
            // Nobody seen before a restart is waited for (the steady
            // state): no look at /proc on every open.
            return Some(me);
        }
        let pid = self.conns.get(&conn).map_or(0, |c| c.peer.pid);
        (!self.another_ran_before_restart(me, pid)).then_some(me)
    }

    /// `conn` asked for a CheckIo: a read or write the answer lets through
    /// may still be in flight when this daemon dies, and its successor
    /// knows nothing of it. So a frontend that checks its I/O is
    /// remembered across restarts as one with lock hints is (rksmbd takes
    /// no hints and checks every read and write): a restarted daemon's
    /// locks wait for its hello, which it says only once that I/O is done.
    pub(super) fn frontend_checks_io(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let proto::Role::Frontend { instance, .. } = &*c.role else {
            return;
        };
        if self.frontends_seen.has(instance, c.peer.pid) {
            return;
        }
        let attached = &self.instances;
        self.frontends_seen
            .insert(instance, c.peer.pid, |n| attached.contains_key(n));
    }

    /// Lock hints: `instance` did not come back before a first lock's
    /// deadline: no first lock waits for it again until it attaches.
    pub(super) fn hint_give_up(&mut self, instance: InstanceName) {
        self.restart_expected.remove(&instance);
        if !self.instances.contains_key(&instance) {
            // Attached under the name is another process (the one waited
            // for was seen before the restart): it stays seen, so the next
            // restart waits for it.
            self.frontends_seen.remove(&instance);
        }
        self.hint_gave_up.insert(instance);
    }

    /// Connections with lock hints that hold attached handles of `file`.
    pub(super) fn hinted_conns_of(&self, file: FileId) -> HashSet<ConnId> {
        self.by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k).and_then(|h| h.conn))
            .filter(|c| {
                self.conns
                    .get(c)
                    .is_some_and(|x| x.features & proto::FEATURE_LOCK_HINTS != 0)
            })
            .collect()
    }

    /// Lock hints: a LOCK that would give `file` its first lock waits until
    /// every other frontend with handles of the file has been told (so none
    /// of them reads or writes it unchecked once the lock is granted):
    /// attached frontends acknowledge `LocksPresent`; frontends that are
    /// not attached but have disconnected handles of the file (after a
    /// filterd restart, or while they are stopped), and after a restart
    /// every frontend seen before it, are waited for until they say hello
    /// (`frontend_said_hello`; they drain their unchecked I/O before it,
    /// and learn of the lock when they resume or open). Until the
    /// deadline; then attached ones that did not answer are dropped,
    /// absent ones are given up on. A LOCK on a file that has locks
    /// already waits only for the frontends seen before a restart
    /// (`restart_wait`).
    /// Returns the file when the request must wait.
    pub(super) fn hint_first(
        &mut self,
        conn: ConnId,
        key: ResumeKey,
        ops: &[LockOp],
    ) -> Option<FileId> {
        let h = self.handles.get(&key).filter(|h| h.conn == Some(conn))?;
        let file = h.rec.file;
        let me = h.rec.frontend.clone();
        if !ops.iter().any(|o| !o.unlock) {
            return None;
        }
        let me = self.own_frontend_exempt(conn, &me).cloned();
        if self.hint_waits.contains_key(&file) {
            return Some(file);
        }
        if self.locks.get(&file).is_some_and(|t| !t.is_empty()) {
            return self.restart_wait(file, me.as_ref());
        }
        // The locker's own frontend too: another of its clients may have
        // an unchecked write of the file in flight (review of issue 13).
        let others = self.untold_conns_of(file);
        let absent: HashSet<InstanceName> = self
            .by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .filter(|h| h.conn.is_none() && matches!(h.rec.conn, ConnState::Disconnected { .. }))
            .map(|h| &h.rec.frontend)
            .filter(|i| !self.instances.contains_key(*i))
            // After a restart: every frontend seen before it that has not
            // said hello since (it may have I/O on the file in flight) —
            // even when another process has taken its name meanwhile.
            .chain(self.restart_expected.iter())
            .filter(|i| Some(*i) != me.as_ref() && !self.hint_gave_up.contains(*i))
            .cloned()
            .collect();
        if others.is_empty() && absent.is_empty() {
            return None;
        }
        debug!(file = ?file, attached = others.len(), absent = absent.len(), "first lock waits for frontends to hear of it");
        self.tell_and_wait(file, others, absent, mono_ms() + self.cfg.break_timeout_ms);
        Some(file)
    }

    /// Connections with lock hints and attached handles of `file` not told
    /// yet that it has locks.
    fn untold_conns_of(&self, file: FileId) -> HashSet<ConnId> {
        let told = self.lock_hints.get(&file);
        self.hinted_conns_of(file)
            .into_iter()
            .filter(|c| told.is_none_or(|t| !t.contains(c)))
            .collect()
    }

    /// Tells `conns` that `file` has locks (`LocksPresent`) and makes the
    /// file's first lock or size change wait for their acknowledgement and
    /// for the `absent` frontends, until `deadline`.
    fn tell_and_wait(
        &mut self,
        file: FileId,
        conns: HashSet<ConnId>,
        absent: HashSet<InstanceName>,
        deadline: u64,
    ) {
        for c in &conns {
            if let Some(x) = self.conns.get(c) {
                x.writer
                    .send_frame(&ServerFrame::Event(Event::LocksPresent { file }), None);
            }
        }
        self.lock_hints
            .entry(file)
            .or_default()
            .extend(conns.iter());
        self.hint_waits.insert(
            file,
            HintWait {
                conns,
                absent,
                deadline,
            },
        );
    }

    /// A bracketed size change of `file` (an end-of-file change) waits
    /// before its intent until every frontend with handles of the file has
    /// acknowledged `LocksPresent` — so none has an unchecked write of it
    /// in flight or starts one — and no checked write of it is in flight.
    /// Only then is the file's stamp taken for the intent: a write landing
    /// between the stamp and the change would make recovery call the change
    /// "outcome unknown" though it was never made (review of task rF: a
    /// second frontend's unchecked WRITE, decided before the hint reached
    /// it). Until the break timeout, as for a first lock; then the silent
    /// frontend is dropped. Returns the file when the request must wait.
    pub(super) fn hint_size_change(&mut self, key: ResumeKey) -> Option<FileId> {
        let file = self.handles.get(&key)?.rec.file;
        self.hint_size_change_of(file)
    }

    /// [`Self::hint_size_change`] for `file` (a truncating open has no
    /// handle of it yet).
    pub(super) fn hint_size_change_of(&mut self, file: FileId) -> Option<FileId> {
        if self.hint_waits.contains_key(&file) {
            return Some(file);
        }
        // The changer's own frontend too: another of its clients may have
        // an unchecked write of the file in flight.
        let others = self.untold_conns_of(file);
        let deadline = mono_ms() + self.cfg.break_timeout_ms;
        if others.is_empty() {
            return self.size_change_waits_for_io(file, deadline);
        }
        debug!(file = ?file, attached = others.len(), "size change waits for frontends to hear of it");
        self.tell_and_wait(file, others, HashSet::new(), deadline);
        Some(file)
    }

    /// After a restart, a LOCK on a file that has locks already (recovered)
    /// waits too for the frontends seen before the restart that have not
    /// said hello since: one may have a read or write of the file in flight
    /// that the old daemon checked (`CheckIo`) and this one never heard
    /// of; it drains those before its hello (`libfilter::attach`). Until
    /// the break timeout, as for a first lock. Returns the file when the
    /// request must wait.
    fn restart_wait(&mut self, file: FileId, me: Option<&InstanceName>) -> Option<FileId> {
        let absent: HashSet<InstanceName> = self
            .restart_expected
            .iter()
            .filter(|i| Some(*i) != me && !self.hint_gave_up.contains(*i))
            .cloned()
            .collect();
        if absent.is_empty() {
            return None;
        }
        debug!(file = ?file, absent = absent.len(), "lock waits for the frontends seen before the restart");
        let deadline = mono_ms() + self.cfg.break_timeout_ms;
        self.hint_waits.insert(
            file,
            HintWait {
                conns: HashSet::new(),
                absent,
                deadline,
            },
        );
        Some(file)
    }

    /// Lock hints at open and resume: whether `file` has locks or a first
    /// lock waiting; if so, the connection is among those told (it hears
    /// `LocksGone`). The reply carrying this goes before any later event on
    /// the connection, and a frontend resuming after a restart serves no
    /// I/O before it has applied it, so a lock granted after this answer is
    /// told by `LocksPresent`, one granted before by this answer.
    pub(super) fn hint_open(&mut self, conn: ConnId, file: FileId) -> bool {
        let locked = self.locks.get(&file).is_some_and(|t| !t.is_empty());
        // Not another process under the name while the one seen before
        // the restart still runs: that one is what is waited for
        // (`own_frontend_exempt`). Asked only while a lock waits here.
        let back = match self.conns.get(&conn).map(|c| &*c.role) {
            Some(Role::Frontend { instance, .. }) if self.hint_waits.contains_key(&file) => {
                self.own_frontend_exempt(conn, instance).cloned()
            }
            _ => None,
        };
        if let Some(w) = self.hint_waits.get_mut(&file) {
            // An absent frontend waited for is back with a handle of it.
            if let Some(instance) = back {
                if w.absent.remove(&instance) && w.done() {
                    self.hint_waits.remove(&file);
                    self.retry_files.insert(file);
                }
            }
        } else if !locked {
            return false;
        }
        if self
            .conns
            .get(&conn)
            .is_some_and(|x| x.features & proto::FEATURE_LOCK_HINTS != 0)
        {
            self.lock_hints.entry(file).or_default().insert(conn);
        }
        true
    }

    /// Lock hints: `file` has locks now; tell every hinted frontend with
    /// handles of it that was not told yet (the locker's own included).
    pub(super) fn locks_present(&mut self, file: FileId) {
        let told = self.lock_hints.get(&file).cloned().unwrap_or_default();
        let conns = self.hinted_conns_of(file);
        for c in conns.difference(&told) {
            if let Some(x) = self.conns.get(c) {
                x.writer
                    .send_frame(&ServerFrame::Event(Event::LocksPresent { file }), None);
            }
        }
        self.lock_hints.entry(file).or_default().extend(conns);
    }

    /// Lock hints: the last lock of `file` went away.
    pub(super) fn locks_gone(&mut self, file: FileId) {
        for c in self.lock_hints.remove(&file).unwrap_or_default() {
            if let Some(x) = self.conns.get(&c) {
                x.writer
                    .send_frame(&ServerFrame::Event(Event::LocksGone { file }), None);
            }
        }
    }

    pub(super) fn lock_view(&self, file: FileId, l: &Lock<ResumeKey>) -> LockView {
        LockView {
            file,
            key: l.owner,
            owner: self
                .handles
                .get(&l.owner)
                .and_then(|h| h.rec.lock_owner.clone().or_else(|| h.rec.owner.clone())),
            range: l.range,
            kind: l.kind,
            unmirrored: self.unmirrored.contains(&l.owner),
        }
    }

    /// Locks and unlocks byte ranges (spec/smb-like.md "Byte-range locks",
    /// "Lock sequence replay"), mirrors them as OFD locks, and records them
    /// in the handle (durably for persistent handles).
    pub(super) fn lock(
        &mut self,
        conn: ConnId,
        key: ResumeKey,
        ops: &[LockOp],
        seq: Option<LockSequence>,
        lock_owner: Option<String>,
    ) -> Result<Reply, WireError> {
        self.attached_to(conn, key)?;
        if let Some(q) = seq {
            if q.number > 15 || q.index > 64 {
                return Err(err(
                    ErrorCode::BadFrame,
                    "lock_sequence: number 0..15, index 0..64",
                ));
            }
        }
        let held_now = |s: &Self, file: FileId| s.locks.get(&file).map_or(0, |t| t.locks().len());
        let (file, stat) = self
            .handles
            .get(&key)
            .map(|h| (h.rec.file, h.rec.stat || h.rec.share_exempt))
            .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
        // A stat or sharing-exempt open got past share modes because it
        // can change nothing;
        // a byte-range lock would keep the holders out of their own data
        // (MS-FSA 2.1.5.7: a lock needs read or write data access).
        if stat {
            return Err(err(
                ErrorCode::AccessDenied,
                "an open without data access (stat or sharing-exempt) cannot lock byte ranges",
            ));
        }
        // A lock-sequence replay, a conflict or a grant shows the file's
        // lock state: never before its pending change is durable.
        self.depends_on_file(file);
        let held = held_now(self, file);
        // What this client holds on the file already (all its handles).
        let client_held = {
            let me = self
                .handles
                .get(&key)
                .map(|h| (&h.rec.protocol, &h.rec.client));
            self.locks.get(&file).map_or(0, |t| {
                t.locks()
                    .iter()
                    .filter(|l| {
                        self.handles
                            .get(&l.owner)
                            .map(|o| (&o.rec.protocol, &o.rec.client))
                            == me
                    })
                    .count()
            })
        };
        let adding = ops.iter().filter(|o| !o.unlock).count();
        // What the file and the client hold once the batch is applied, if
        // it may pass a cap: its unlocks count as well as its locks.
        // Counting only the locks, a client holding 63 locks on a file was
        // refused an NFS LOCKU of the middle of one (sent as its unlock and
        // the re-lock of two pieces) although 64 were left (review rr41d).
        let counted_after = (adding > 0
            && (client_held + adding > MAX_LOCKS_PER_CLIENT_PER_FILE
                || held + adding > MAX_LOCKS_PER_FILE))
            .then(|| self.counts_after(key, file, ops))
            .flatten();
        let Some(h) = self.handles.get_mut(&key) else {
            return Err(err(ErrorCode::NoSuchHandle, format!("no handle {key}")));
        };
        let persistent = h.rec.durability.is_persistent();
        let checked = seq.filter(|q| q.index > 0 && h.rec.durability != Durability::None);
        if let Some(q) = checked {
            if h.rec.lock_sequence.contains(&(q.index, q.number)) {
                self.stats.replays_detected += 1;
                debug!(resume_key = %key, index = q.index, number = q.number, "lock sequence replay: nothing applied");
                return Ok(Reply::Done);
            }
        }
        let (held_after, client_after) = counted_after.unwrap_or((held, client_held));
        if client_after > MAX_LOCKS_PER_CLIENT_PER_FILE && client_after > client_held {
            // One client cannot take a file's whole lock capacity.
            self.stats.locks_refused += 1;
            return Err(err(
                ErrorCode::LimitReached,
                format!("one client holds at most {MAX_LOCKS_PER_CLIENT_PER_FILE} byte-range locks on a file"),
            ));
        }
        if held_after > MAX_LOCKS_PER_FILE && held_after > held {
            self.stats.locks_refused += 1;
            return Err(err(
                ErrorCode::LimitReached,
                format!("a file holds at most {MAX_LOCKS_PER_FILE} byte-range locks"),
            ));
        }
        let first_lock = self
            .handles
            .get(&key)
            .is_some_and(|h| h.rec.locks.is_empty());
        if adding > 0 && first_lock && self.lock_fd_refused(key) {
            // Its lock descriptor would take the handle's user past its
            // share of the handles' room (`handle_shares`): refused
            // before anything changes. A handle holding locks already
            // but no descriptor for them (`unmirrored`) is not refused —
            // an NFS LOCKU splitting a range re-locks its pieces, and
            // LOCKU must not fail for resources; its locks stay among
            // protocol clients until the descriptor may be opened
            // (`mirror_unweighed`).
            self.stats.locks_refused += 1;
            return Err(err(
                ErrorCode::LimitReached,
                "the user of this open holds its share of the descriptors filterd leaves to handles: a lock takes one more (close handles, raise filterd's limit or exempt the user: filterd --share-exempt-uid)",
            ));
        }
        let Some(h) = self.handles.get_mut(&key) else {
            return Err(err(ErrorCode::NoSuchHandle, format!("no handle {key}")));
        };
        if let Some(q) = checked {
            // Invalidate the entry before applying: set again only on success.
            h.rec.lock_sequence.retain(|(i, _)| *i != q.index);
        }
        let table = self.locks.entry(file).or_insert_with(LockTable::new);
        let before = table.clone();
        let outcome = table.apply_batch(&key, ops);
        let held: Vec<HeldLock> = table
            .of_owner(&key)
            .map(|l| HeldLock {
                range: l.range,
                kind: l.kind,
            })
            .collect();
        // What the table change asks of the kernel, not the ops' flags: an
        // NFS LOCKU of the middle of a range is sent as the range's unlock
        // and the re-lock of the two pieces left, yet it takes nothing the
        // handle did not hold.
        let releases_only = adding == 0 || only_releases(&before, &key, &held);
        let held_before: Vec<HeldLock> = before
            .of_owner(&key)
            .map(|l| HeldLock {
                range: l.range,
                kind: l.kind,
            })
            .collect();
        let result = match outcome {
            Err(BatchError::Conflict(l)) => {
                let mut e = err(
                    ErrorCode::LockNotGranted,
                    "a lock of another open (or this one) conflicts",
                );
                e.conflict = Some(Box::new(self.lock_view(file, &l)));
                Err(e)
            }
            Err(BatchError::RangeNotLocked(r)) => Err(err(
                ErrorCode::RangeNotLocked,
                format!(
                    "no lock of this open at offset {} length {}",
                    r.offset, r.length
                ),
            )),
            Ok(()) => match if held.is_empty() {
                self.release_mirror(key).map_err(|e| (e, true))
            } else {
                self.mirror_from(key, &held, &held_before)
            } {
                Ok(()) => Ok(()),
                Err((e, takes_new)) if releases_only || !takes_new => {
                    // Only unlocks: nothing asked for can conflict. A kept
                    // range a local process took while the handle was not
                    // mirrored failed again (the mirror made every other
                    // step): the unlock stands, the handle stays on
                    // `unmirrored` for the retry. Refused, an unlock failed
                    // for as long as that local lock lasted (review) — and
                    // an NFS LOCKU splitting a range (its pieces' re-lock
                    // met the kernel lock) was answered NFS4ERR_DENIED,
                    // which LOCKU never is, its CLOSE then LOCKS_HELD: a
                    // frozen old owner's OFD locks after a takeover
                    // (review rvping 3). Likewise a LOCK whose new bytes
                    // were all taken, only a kept range failing: refused,
                    // every LOCK through a handle with an unmirrored range
                    // was denied, the range asked for free (review rr41d).
                    // A new byte whose OFD lock failed is never granted: a
                    // local process holds it.
                    warn!(resume_key = %key, error = %e.message, "unlocked; the handle's other locks are not all mirrored yet: retrying");
                    self.unmirrored.insert(key);
                    Ok(())
                }
                Err((e, _)) => {
                    // A local process holds a conflicting fcntl lock: undo.
                    self.stats.local_lock_conflicts += 1;
                    if let Some(t) = self.locks.get_mut(&file) {
                        *t = before.clone();
                    }
                    if let Err(restore) = self.mirror(key, &held_before) {
                        // The mirror never frees a range it keeps, but it
                        // may have changed one's type before failing (an
                        // exclusive lock the request made shared), and a
                        // local process may have taken that since: keep
                        // trying until it lets go, as recovery does, and
                        // let filterctl show the lock as not mirrored
                        // (found by review: this result was dropped).
                        warn!(resume_key = %key, error = %restore.message, "locks of a refused LOCK not mirrored again yet: retrying");
                        self.unmirrored.insert(key);
                    }
                    Err(e)
                }
            },
        };
        let Some(h) = self.handles.get_mut(&key) else {
            return Err(err(ErrorCode::NoSuchHandle, format!("no handle {key}")));
        };
        match &result {
            Ok(()) => {
                h.rec.locks = held;
                if lock_owner.is_some() {
                    h.rec.lock_owner = lock_owner;
                }
                if let Some(q) = checked {
                    h.rec.lock_sequence.push((q.index, q.number));
                }
                self.stats.locks_granted += 1;
                if adding > 0 {
                    self.batch.reply_point = Some("lock.granted");
                }
            }
            Err(_) => self.stats.locks_refused += 1,
        }
        if persistent && (result.is_ok() || checked.is_some()) {
            self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
        }
        if result.is_ok() && h.rec.locks.is_empty() {
            let dep = self.request_dependency();
            self.close_lock_fd_after(dep, key);
        }
        if result.is_ok() && !releases_only {
            // A lock breaks other keys' read caching as a write does
            // (MS-FSA 2.1.4.12, LOCK_CONTROL; smb2.lease.lock1), for every
            // frontend's lock — not a split of a held range (an NFS LOCKU
            // of its middle), which locks nothing new (review rr41d).
            self.break_read_caching_of(key);
        }
        if self.locks.get(&file).is_some_and(|t| !t.is_empty()) {
            if result.is_ok() {
                self.locks_present(file);
            }
        } else {
            self.locks.remove(&file);
            // Once the unlock is durable: if it fails, the lock is back.
            let dep = self.request_dependency();
            self.locks_gone_after(dep, file);
        }
        result.map(|()| Reply::Done)
    }

    /// How many locks `file` holds, and how many of them the client of
    /// `key` holds (all its handles), once `ops` are applied; `None` when
    /// the batch is refused anyway (a conflict, a range not locked).
    fn counts_after(&self, key: ResumeKey, file: FileId, ops: &[LockOp]) -> Option<(usize, usize)> {
        let mut table = self
            .locks
            .get(&file)
            .cloned()
            .unwrap_or_else(LockTable::new);
        table.apply_batch(&key, ops).ok()?;
        let client = |k: &ResumeKey| {
            self.handles
                .get(k)
                .map(|h| (&h.rec.protocol, &h.rec.client))
        };
        let me = client(&key);
        let mine = table
            .locks()
            .iter()
            .filter(|l| client(&l.owner) == me)
            .count();
        Some((table.locks().len(), mine))
    }

    /// The handle's last lock went: its OFD locks are released now; its
    /// lock descriptor is kept until the unlock is durable
    /// ([`Self::close_lock_fd_after`]). A failed commit takes the locks
    /// again on that descriptor — reopening the file may fail by then (it
    /// was removed or renamed since the lock), which left the handle's
    /// restored locks unmirrored (the engine's proptest of failed commits).
    pub(super) fn release_mirror(&mut self, key: ResumeKey) -> Result<(), WireError> {
        if let Some(h) = self.handles.get_mut(&key) {
            release_ofd_locks(&*self.fs, h);
        }
        self.reweigh(key);
        Ok(())
    }

    /// Closes the lock descriptor of `key`, released by
    /// [`Self::release_mirror`], once sequence `seq` is durable — if the
    /// handle has no locks then.
    pub(super) fn close_lock_fd_after(&mut self, seq: u64, key: ResumeKey) {
        if seq > self.pipe.committed() {
            self.idle_lock_fds.push((seq, key));
        } else {
            self.close_idle_lock_fd(key);
        }
    }

    pub(super) fn close_idle_lock_fd(&mut self, key: ResumeKey) {
        if let Some(h) = self.handles.get_mut(&key) {
            if h.rec.locks.is_empty() {
                h.lock_fd = None;
            }
        }
        self.reweigh(key);
    }

    /// Takes the handle's locks as OFD locks on its own lock descriptor.
    /// When that descriptor cannot be opened (a local process's kernel
    /// lease: the read-write open would break it) the locks hold among
    /// protocol clients only for now: the handle is counted `unmirrored`,
    /// which filterctl shows and `expire_due` retries.
    pub(super) fn mirror(&mut self, key: ResumeKey, held: &[HeldLock]) -> Result<(), WireError> {
        self.mirror_from(key, held, &[]).map_err(|(e, _)| e)
    }

    /// [`Self::mirror`] of a handle that held `before` until now: a
    /// failure says, too, whether a part that failed asked for a byte or
    /// a kind not in `before` (`fsops::failure_takes_new`).
    pub(super) fn mirror_from(
        &mut self,
        key: ResumeKey,
        held: &[HeldLock],
        before: &[HeldLock],
    ) -> Result<(), (WireError, bool)> {
        let r = self.mirror_unweighed(key, held, before);
        self.reweigh(key);
        r
    }

    /// [`Self::mirror_from`] but for the handle's count against its user.
    /// A lock descriptor that would take that user past its share is not
    /// opened: the locks hold among protocol clients only for now
    /// (`unmirrored`) — an unlock, or a retry (the lock path refuses a
    /// lock needing one: `Self::lock`).
    fn mirror_unweighed(
        &mut self,
        key: ResumeKey,
        held: &[HeldLock],
        before: &[HeldLock],
    ) -> Result<(), (WireError, bool)> {
        let refused = !held.is_empty() && self.lock_fd_refused(key);
        let fs = &*self.fs;
        let Some(h) = self.handles.get_mut(&key) else {
            return Ok(());
        };
        if held.is_empty() {
            h.lock_fd = None; // closing our own OFD releases its locks
            self.unmirrored.remove(&key);
            return Ok(());
        }
        if h.lock_fd.is_none() {
            if h.rec.kernel_handle.is_none() {
                h.rec.kernel_handle =
                    h.fd.as_ref()
                        .and_then(|f| fs.file_handle_of(f.as_fd()).ok());
            }
            let rw = libfilter::model::Access::new(
                libfilter::model::Rights::READ.union(libfilter::model::Rights::WRITE),
            )
            .map_err(|e| (err(ErrorCode::Internal, e.to_string()), true))?;
            match h
                .rec
                .kernel_handle
                .as_ref()
                .filter(|_| !refused)
                .map(|kh| fs.reopen(kh, rw, &h.rec.path, h.rec.file))
            {
                Some(Ok((fd, _, _))) => h.lock_fd = Some(fd),
                _ => {
                    if self.unmirrored.insert(key) {
                        warn!(resume_key = %key, "cannot open a lock descriptor: locks are enforced among protocol clients only until it can be");
                    }
                    return Ok(());
                }
            }
        }
        let Some(fd) = h.lock_fd.as_ref() else {
            return Ok(());
        };
        fs.mirror_ofd_locks(fd.as_fd(), held, before)
            .map(|()| {
                self.unmirrored.remove(&key);
            })
            .map_err(|f| {
                let e = f.error;
                let wire = if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                    err(
                        ErrorCode::LockNotGranted,
                        "a local process holds a conflicting lock",
                    )
                } else {
                    err(ErrorCode::Internal, format!("OFD lock: {e}"))
                };
                (wire, f.takes_new)
            })
    }
}

/// Whether `after`, what `owner` holds once a batch is applied, lies
/// within what it held in `before` with the same kind: the batch released
/// ranges (or split one) and took nothing new, so its mirror can fail only
/// on a range the handle kept, never on one it asked for.
fn only_releases(before: &LockTable<ResumeKey>, owner: &ResumeKey, after: &[HeldLock]) -> bool {
    after.iter().all(|a| {
        before.of_owner(owner).any(|b| {
            b.kind == a.kind && b.range.offset <= a.range.offset && a.range.end() <= b.range.end()
        })
    })
}

/// Releases the OFD locks of `h`'s lock descriptor, keeping the descriptor
/// (a failed commit takes them again on it: [`Engine::release_mirror`]).
pub(super) fn release_ofd_locks(fs: &dyn super::fs::Fs, h: &mut Handle) {
    let Some(fd) = h.lock_fd.as_ref() else {
        return;
    };
    if let Err(crate::fsops::OfdFailure { error: e, .. }) =
        fs.mirror_ofd_locks(fd.as_fd(), &[], &[])
    {
        // Closing our own open file description releases them.
        warn!(resume_key = %h.rec.key, error = %e, "cannot release OFD locks: closing their descriptor");
        h.lock_fd = None;
    }
}
