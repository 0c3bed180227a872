//! Leases: granting, breaking (and parking what waits for a break),
//! acknowledgements, and running waiting requests again when a break ends.

use super::*;

/// How setting a lease's state moves its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Epoch {
    /// Up by one when the state changes.
    OnChange,
    /// Up by one (a break is announced).
    Bump,
    /// Unchanged (the break that announced it already moved it).
    Keep,
}

impl Engine {
    /// The leases on a file by key: their state and their handles.
    /// In the order their keys are first met among the file's handles.
    /// One pass, the keys found so far in a map: before (review rvcx) a
    /// linear search of them per handle cost handles × keys.
    pub(super) fn leases_on(&self, file: FileId) -> Vec<(LeaseKey, LeaseState, Vec<ResumeKey>)> {
        let mut out: Vec<(LeaseKey, LeaseState, Vec<ResumeKey>)> = Vec::new();
        let mut at: HashMap<LeaseKey, usize> = HashMap::new();
        for k in self.by_file.get(&file).into_iter().flatten() {
            let Some(l) = self.handles.get(k).and_then(|h| h.rec.lease) else {
                continue;
            };
            match at.get(&l.key).and_then(|i| out.get_mut(*i)) {
                Some(e) => e.2.push(*k),
                None => {
                    at.insert(l.key, out.len());
                    out.push((l.key, l.state, vec![*k]));
                }
            }
        }
        out
    }

    /// Breaks the leases of other keys that an open with `mode` conflicts
    /// with (`truncates`: it overwrites or supersedes the file). Holders
    /// that are disconnected (or need no ack) are lowered at once — but an
    /// SMB 2/3 holder that may resume waits ([`Self::holder_resumes_break`]);
    /// attached ones get a LEASE_BREAK event. Returns whether the open must wait for
    /// acknowledgements. Leases held through a frontend of
    /// [`lease::MSFSA_PROTOCOL`] break by Windows' rules
    /// ([`lease::break_to_on_open`]), others by [`lease::break_to`], a
    /// truncating open counted as a writer whatever its access.
    /// A delegation (a lease of [`lease::DELEGATION_PROTOCOL`]) of the
    /// opener's own client through the same frontend (`opener`) is not
    /// broken: spec/nfs-like.md recalls a delegation for a conflicting
    /// open "from anyone else" (RFC 8881 §10.4: the client resolves
    /// conflicts among its own opens), and a recall of its own would make
    /// the client's OPEN wait (NFS4ERR_DELAY) for a DELEGRETURN of its own.
    /// The open waits for the breaks returned (none: it need not wait).
    pub(super) fn break_leases_for(
        &mut self,
        file: FileId,
        requester: Option<LeaseKey>,
        mode: ShareMode,
        group: Option<&super::opens::ShareGroup>,
        opener: Option<(&libfilter::model::ClientId, &InstanceName)>,
        truncates: bool,
    ) -> Vec<(LeaseKey, u64)> {
        self.break_leases(file, requester, |lk, state, keys, this| {
            let own = |k: &ResumeKey| {
                this.handles
                    .get(k)
                    .is_some_and(|h| group.is_some_and(|g| g.holds(h)) || own_delegation(h, opener))
            };
            if keys.iter().all(own) {
                // The requester's own share reservation: nothing to break.
                return None;
            }
            // A truncating open writes (it empties the file) whatever
            // access it asked for: a read-only overwrite breaks R as a
            // writer does (attack44 F1). Its share mode (`mode`) has the
            // access its truncation implies added (re-review rr44e R1), as
            // has a holder's whose own truncation waits for its intent
            // (`holder_mode`, rr44f M2): such a holder loses H to an open
            // its parked overwrite refuses, by either rule set below.
            let writes = truncates || mode.access.contains(libfilter::model::Rights::WRITE);
            let handle_conflict = keys
                .iter()
                .filter(|k| !own(k))
                .filter_map(|k| this.handles.get(k))
                .any(|h| share::conflicts(mode, super::opens::holder_mode(h)));
            let windows = keys
                .iter()
                .filter_map(|k| this.handles.get(k))
                .any(|h| h.rec.protocol.as_str() == lease::MSFSA_PROTOCOL);
            if windows {
                let oplock = lease::is_oplock_key(&lk);
                let to = lease::break_to_on_open(state, handle_conflict, truncates, oplock)?;
                return Some((to, lease::open_waits_for(state, to, handle_conflict)));
            }
            lease::break_to(
                state,
                BreakTrigger {
                    writes,
                    handle_conflict,
                },
            )
            .map(|to| (to, true))
        })
    }

    /// Breaks other keys' handle caching before their file is renamed or
    /// removed. Returns whether the change must wait for acks.
    pub(super) fn break_leases_for_namespace(
        &mut self,
        file: FileId,
        requester: Option<LeaseKey>,
    ) -> bool {
        !self
            .break_leases(file, requester, |_, state, _, _| {
                lease::break_for_namespace(state).map(|to| (to, true))
            })
            .is_empty()
    }

    /// A write or a byte-range lock through handle `key` (attached to
    /// `conn`): see [`Self::break_read_caching_of`]. See
    /// `Request::BreakReadCaching`.
    pub(super) fn break_read_caching(
        &mut self,
        conn: ConnId,
        key: ResumeKey,
    ) -> Result<(), WireError> {
        if !self.handles.get(&key).is_some_and(|h| h.conn == Some(conn)) {
            return Err(err(
                ErrorCode::NoSuchHandle,
                format!("handle {key} is not attached to this connection"),
            ));
        }
        self.break_read_caching_of(key);
        Ok(())
    }

    /// The file of handle `key` changed (a write, a byte-range lock, a
    /// new end of file): every other key's read caching of it goes, by
    /// the holder's protocol's rule — an SMB 2/3 holder's R and RH (and
    /// level II oplocks) go to none (MS-FSA 2.1.4.12, 2.1.5.15.4;
    /// [`lease::break_for_write`]), another protocol's lease loses what a
    /// writer breaks ([`lease::break_to`]). Holders that are disconnected
    /// (a durable handle whose client will reconnect) are lowered at once,
    /// so a reconnect finds the lease broken — but a persistent SMB 2/3
    /// holder's break waits for it to resume ([`Self::holder_resumes_break`]);
    /// attached ones are told. The
    /// change does not wait for acknowledgements. The writer's own lease
    /// stays, and so does one held only by handles of its share group (an
    /// nfsl/1 open-owner's delegation, written through a lock-owner's
    /// handle of its own) or a delegation of the writer's own client
    /// through the same frontend (RFC 8881 §10.4: the client resolves
    /// conflicts among its own opens, as [`Self::break_leases_for`]).
    pub(super) fn break_read_caching_of(&mut self, key: ResumeKey) {
        let Some(h) = self.handles.get(&key) else {
            return;
        };
        let (file, own) = (h.rec.file, h.rec.lease.map(|l| l.key));
        let group = super::opens::ShareGroup::of_handle(h);
        let writer = (h.rec.client.clone(), h.rec.frontend.clone());
        self.break_leases(file, own, |_, state, keys, this| {
            let ours = |k: &ResumeKey| {
                this.handles.get(k).is_some_and(|h| {
                    group.as_ref().is_some_and(|g| g.holds(h))
                        || own_delegation(h, Some((&writer.0, &writer.1)))
                })
            };
            if keys.iter().all(ours) {
                return None;
            }
            let windows = keys
                .iter()
                .filter_map(|k| this.handles.get(k))
                .any(|h| h.rec.protocol.as_str() == lease::MSFSA_PROTOCOL);
            let to = if windows {
                lease::break_for_write(state)
            } else {
                lease::break_to(
                    state,
                    BreakTrigger {
                        writes: true,
                        handle_conflict: false,
                    },
                )
            };
            to.map(|to| (to, false))
        });
    }

    /// Breaks every lease of another key on `file` that `target` says must
    /// go down, and whether the change must wait for the holder's
    /// acknowledgement when one is needed; see `break_leases_for`. A lease
    /// already being broken is not broken again: what the change needs is
    /// noted for when the holder acknowledges ([`Breaking::required`]).
    /// Returns the breaks (in progress when this returns: lease key and
    /// [`Breaking::id`]) the change waits for: none when it need not wait.
    pub(super) fn break_leases(
        &mut self,
        file: FileId,
        requester: Option<LeaseKey>,
        target: impl Fn(LeaseKey, LeaseState, &[ResumeKey], &Self) -> Option<(LeaseState, bool)>,
    ) -> Vec<(LeaseKey, u64)> {
        let mut waits_for = Vec::new();
        for (lk, state, keys) in self.leases_on(file) {
            if Some(lk) == requester {
                continue;
            }
            let wanted = target(lk, state, &keys, self);
            if let Some(b) = self.breaking.get_mut(&(file, lk)) {
                let wait = match wanted {
                    Some((to, must_wait)) => {
                        b.required = b.required.and(to);
                        let wait = must_wait || (b.waiters && b.required != b.to);
                        b.waiters |= must_wait;
                        wait
                    }
                    // Nothing needed of the lease, but opens wait for the
                    // rest of its break chain: this one waits behind them.
                    None => b.waiters && b.required != b.to,
                };
                if wait {
                    waits_for.push((lk, b.id));
                }
                continue;
            }
            let Some((to, must_wait)) = wanted else {
                continue;
            };
            let attached: Vec<ConnId> = keys
                .iter()
                .filter_map(|k| self.handles.get(k))
                .filter_map(|h| h.conn)
                .collect();
            // A lease whose holders are all away but one of them will
            // resume it (MS-SMB2 3.3.4.7: a persistent open, or a durable
            // one keeping H) is not lowered now: the break waits, as for
            // an attached holder, for the ack of a holder that resumes
            // (told then: `resend_break_on_attach`) or for its deadline.
            let resumes = attached.is_empty() && self.holder_resumes_break(&keys, lk, to);
            let ack = lease::ack_required(state) && (!attached.is_empty() || resumes);
            // The epoch goes up when the break is sent (MS-SMB2 3.3.4.7),
            // also while the holder keeps its state until it acknowledges:
            // an open under its key meanwhile sees the new epoch.
            // `keys` are the lease's holders: the work of each break
            // touches them alone, not every handle of the file (review
            // rvcx: a walk of the file's n handles per lease of n).
            let epoch = match ack {
                true => self.set_lease_state_of(&keys, lk, state, Epoch::Bump),
                false => self.set_lease_state_of(&keys, lk, to, Epoch::OnChange),
            };
            self.last_break_id += 1;
            let chain = Breaking {
                to,
                required: to,
                waiters: must_wait,
                deadline_ms: 0,
                extended: false,
                id: self.last_break_id,
            };
            self.send_break(
                attached.first().copied(),
                (file, lk),
                &keys,
                state,
                epoch,
                ack,
                chain,
            );
            // (An ack is awaited only for a break now in progress:
            // `send_break`.)
            if ack && must_wait {
                waits_for.push((lk, self.last_break_id));
            }
        }
        waits_for
    }

    /// Sets a lease's state on every handle of its key on the file (durably
    /// for persistent ones); bumps the epoch. A disconnected non-persistent
    /// durable handle is purged when the break costs it what its protocol
    /// says ([`purged_by_lowering`]): the conflicting open then finds the
    /// file as that close left it. Returns the new epoch.
    pub(super) fn set_lease_state(&mut self, file: FileId, lk: LeaseKey, to: LeaseState) -> u16 {
        self.set_lease_state_with(file, lk, to, Epoch::OnChange)
    }

    /// [`Self::set_lease_state`], with the epoch going up as `epoch` says.
    pub(super) fn set_lease_state_with(
        &mut self,
        file: FileId,
        lk: LeaseKey,
        to: LeaseState,
        epoch_step: Epoch,
    ) -> u16 {
        let keys = self.lease_holder_keys(file, lk);
        self.set_lease_state_of(&keys, lk, to, epoch_step)
    }

    /// [`Self::set_lease_state_with`] on the handles `keys` (those of
    /// the file under `lk`; any other is left alone).
    fn set_lease_state_of(
        &mut self,
        keys: &[ResumeKey],
        lk: LeaseKey,
        to: LeaseState,
        epoch_step: Epoch,
    ) -> u16 {
        let mut epoch = 0;
        let mut purge = Vec::new();
        for &k in keys {
            let Some(h) = self.handles.get_mut(&k) else {
                continue;
            };
            let Some(l) = h.rec.lease.as_mut() else {
                continue;
            };
            if l.key != lk {
                continue;
            }
            let purged = purged_by_lowering(h.rec.protocol.as_str(), l.state, to);
            let bump = match epoch_step {
                Epoch::OnChange => l.state != to,
                Epoch::Bump => true,
                Epoch::Keep => false,
            };
            l.state = to;
            if bump {
                l.epoch = l.epoch.wrapping_add(1);
            }
            epoch = l.epoch;
            if purged && h.conn.is_none() && matches!(h.rec.durability, Durability::Durable { .. })
            {
                purge.push(k);
            } else if h.rec.durability.is_persistent() && !h.parked {
                // (A handle whose open waits for its intent gets its record
                // from the completion, as in `detach`.)
                self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
            }
        }
        for k in purge {
            self.purge(k);
        }
        epoch
    }

    /// Whether a handle of `keys` other than `key`'s client's own may
    /// write the file: an open for write of another client (or another
    /// frontend), one whose writes no read delegation of `key`'s would
    /// hear of (a write through an open breaks no R or RH lease by
    /// Windows' rules, `break_read_caching`). A truncating open whose
    /// truncation waits for its intent writes whatever access it asked
    /// for (`holder_mode`): its truncation, made once the intent is
    /// durable, would recall the delegation at once (re-review rr45a F2);
    /// an open of its file now waits for it instead (rr45c N1).
    /// Lost handles and stat opens write nothing.
    fn another_client_writes(&self, key: ResumeKey, keys: &[ResumeKey]) -> bool {
        let Some(me) = self.handles.get(&key) else {
            return false;
        };
        keys.iter()
            .filter(|k| **k != key)
            .filter_map(|k| self.handles.get(k))
            .filter(|h| h.rec.conn != ConnState::Lost && !h.rec.stat)
            .filter(|h| h.rec.client != me.rec.client || h.rec.frontend != me.rec.frontend)
            .any(|h| {
                super::opens::holder_mode(h)
                    .access
                    .contains(libfilter::model::Rights::WRITE)
            })
    }

    /// Grants (or upgrades) the lease of a new open. A delegation (a
    /// lease asked for through a frontend of [`lease::DELEGATION_PROTOCOL`])
    /// is not granted at all while another client may write the file
    /// ([`lease::grantable_delegation`]).
    pub(super) fn grant_lease(
        &mut self,
        key: ResumeKey,
        lr: libfilter::model::LeaseRequest,
    ) -> Option<HeldLease> {
        let file = self.handles.get(&key)?.rec.file;
        let keys: Vec<ResumeKey> = self.by_file.get(&file).cloned().unwrap_or_default();
        let mut existing: Option<HeldLease> = None;
        let mut others_open = false;
        let mut others_leases: Vec<(LeaseState, bool)> = Vec::new();
        for k in &keys {
            if *k == key {
                continue;
            }
            match self.handles.get(k).and_then(|h| h.rec.lease) {
                Some(l) if l.key == lr.key => existing = Some(l),
                other => {
                    if let Some(l) = other {
                        others_leases.push((l.state, lease::is_oplock_key(&l.key)));
                    }
                    // A stat open without a lease is no other open
                    // (smb2.lease.statopen2); with one, its lease is.
                    if self.handles.get(k).is_some_and(|h| {
                        h.rec.conn != ConnState::Lost && (!h.rec.stat || h.rec.lease.is_some())
                    }) {
                        others_open = true;
                    }
                }
            }
        }
        // A local process holding the file is another open (no lease).
        let local = self.local_openers.get(&file).is_some_and(|l| l.present());
        others_open |= local;
        let mut granted = lease::grantable(lr.state, others_open);
        if self
            .handles
            .get(&key)
            .is_some_and(|h| h.rec.protocol.as_str() == lease::DELEGATION_PROTOCOL)
        {
            // A local opener's mode is not known: it may write.
            let others_write = local || self.another_client_writes(key, &keys);
            granted = lease::grantable_delegation(granted, others_write);
        }
        if self.handles.get(&key).is_some_and(|h| h.rec.stat) {
            // A stat open broke nothing on its way in (`Engine::open`):
            // none beside another key's write caching.
            granted =
                lease::grantable_without_break(granted, others_leases.iter().map(|(s, _)| *s));
        }
        // Windows upgrades a contended lease all or nothing: only to a
        // state that can be held beside the others' in full (smbtorture
        // smb2.lease.upgrade3).
        let whole = self
            .handles
            .get(&key)
            .is_some_and(|h| h.rec.protocol.as_str() == lease::MSFSA_PROTOCOL);
        if whole {
            // Oplocks and leases side by side (smb2.lease.oplock).
            granted =
                lease::grantable_beside(granted, lease::is_oplock_key(&lr.key), others_leases);
        }
        let held = match existing {
            Some(e) => {
                // An upgrade only to a superset of what is held (MS-SMB2
                // 3.3.5.9.8: RH asked as RW stays RH).
                // Never while a break of it is in progress: the holder
                // is acknowledging its way down (smb2.lease.breaking3).
                let breaking = self.breaking.contains_key(&(file, lr.key));
                let state =
                    if !breaking && granted.contains(e.state) && (!whole || granted == lr.state) {
                        granted
                    } else {
                        e.state
                    };
                HeldLease {
                    key: lr.key,
                    state,
                    epoch: if state == e.state {
                        e.epoch
                    } else {
                        e.epoch.wrapping_add(1)
                    },
                }
            }
            None => HeldLease {
                key: lr.key,
                state: granted,
                // One above the client's (MS-SMB2 3.3.5.9.11); 1 for a
                // request without one.
                epoch: lr.epoch.wrapping_add(1),
            },
        };
        // The new handle now holds the key (the index of keys to files).
        if let Some((client, before)) = self
            .handles
            .get(&key)
            .map(|h| (h.rec.client.clone(), h.rec.lease.map(|l| l.key)))
        {
            if before != Some(lr.key) {
                if let Some(old) = before {
                    self.lease_key_dropped(&client, old);
                }
                self.lease_key_taken(&client, lr.key, file);
            }
        }
        for k in keys {
            let Some(h) = self.handles.get_mut(&k) else {
                continue;
            };
            let same = k == key || h.rec.lease.is_some_and(|l| l.key == lr.key);
            if same && h.rec.lease != Some(held) {
                h.rec.lease = Some(held);
                // (Not the record of a handle whose open waits for its
                // intent, the new one's included: `detach`.)
                if h.rec.durability.is_persistent() && !h.parked {
                    self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
                }
            }
        }
        Some(held)
    }

    /// One more handle of `client` holds lease key `lk`, on `file`.
    pub(super) fn lease_key_taken(&mut self, client: &ClientId, lk: LeaseKey, file: FileId) {
        let e = self
            .lease_files
            .entry((client.clone(), lk))
            .or_insert((file, 0));
        e.1 += 1;
    }

    /// One handle of `client` fewer holds lease key `lk`.
    pub(super) fn lease_key_dropped(&mut self, client: &ClientId, lk: LeaseKey) {
        let k = (client.clone(), lk);
        if let Some(e) = self.lease_files.get_mut(&k) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                self.lease_files.remove(&k);
            }
        }
    }

    /// Handle `key` (of `client`, on `file`) no longer holds lease key
    /// `lk` (removed, or lost): one handle fewer holds the key, and a break
    /// of it on `file` that no other handle of the file holds is over (what
    /// waited on it is retried), as is one no attached handle holds
    /// ([`Engine::settle_unackable_break`]).
    pub(super) fn lease_key_released(
        &mut self,
        key: ResumeKey,
        client: &ClientId,
        lk: LeaseKey,
        file: FileId,
    ) {
        self.lease_key_dropped(client, lk);
        let still_held = self
            .by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter(|k| **k != key)
            .filter_map(|k| self.handles.get(k))
            .any(|o| o.rec.lease.is_some_and(|x| x.key == lk));
        if still_held {
            // Perhaps by disconnected handles only, which no ack comes
            // for: as at a detach (re-review rr39b 4).
            self.settle_unackable_break(file, lk);
        } else if self.breaking.remove(&(file, lk)).is_some() {
            self.retry_files.insert(file);
        }
    }

    /// Refuses an open of `path` by `client` under lease key `lk` when the
    /// client holds the key on another file: a lease key names one file
    /// (MS-SMB2 3.3.5.9.8, 3.3.5.9.11 keep a lease table per client).
    /// Checked before the open touches the filesystem, so a refused
    /// create makes nothing.
    pub(super) fn lease_key_free_for(
        &self,
        client: &ClientId,
        lk: LeaseKey,
        path: &RelPath,
    ) -> Result<(), WireError> {
        let Some((file, _)) = self.lease_files.get(&(client.clone(), lk)) else {
            return Ok(());
        };
        if self.fs.file_at_checked(path).ok().flatten() == Some(*file) {
            return Ok(());
        }
        Err(err(
            ErrorCode::LeaseKeyInUse,
            format!("lease key {lk} is held on another file than {path}"),
        ))
    }

    /// Whether a handle of a client other than `client` holds lease key
    /// `lk` on `file`.
    pub(super) fn lease_key_held_by_another_client(
        &self,
        file: FileId,
        lk: LeaseKey,
        client: &ClientId,
    ) -> bool {
        self.by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .any(|h| h.rec.lease.is_some_and(|l| l.key == lk) && h.rec.client != *client)
    }

    /// A holder acknowledged a break (or, with none in progress, lowers
    /// its lease of its own accord). The lease is the one `lk` names on
    /// this connection — of `client` when named: a key names a lease of
    /// one client, and one frontend connection carries many (smbshim's
    /// clients share it). Before (review), the first break of the key on
    /// any file was taken, and any handle under the key on this connection
    /// passed as its holder: one client's ack settled another client's
    /// lease on another file, unflushed.
    pub(super) fn lease_ack(
        &mut self,
        conn: ConnId,
        lk: LeaseKey,
        state: LeaseState,
        client: Option<&ClientId>,
    ) -> Result<Reply, WireError> {
        let Some((file, current)) = self.lease_held_here(conn, lk, client)? else {
            if self.breaking.keys().any(|(_, k)| *k == lk) {
                return Err(err(
                    ErrorCode::NotOwner,
                    format!("lease {lk} is not held through this connection"),
                ));
            }
            return Err(err(
                ErrorCode::NoSuchHandle,
                format!("no break in progress for lease {lk}, nor is it held here"),
            ));
        };
        let Some(b) = self.breaking.get(&(file, lk)) else {
            // No break in progress: the holder gives up part or all of its
            // lease of its own accord (nfsl/1 DELEGRETURN without a
            // recall), so a later conflicting open need not break it. Only
            // lowering.
            if !current.contains(state) {
                return Err(err(
                    ErrorCode::BadFrame,
                    format!("lease {lk} is {current}: {state} is not a lowering"),
                ));
            }
            return Ok(self.settle_lease(file, lk, state));
        };
        if !b.to.contains(state) {
            return Err(err(
                ErrorCode::BadFrame,
                format!("acknowledged state {state} exceeds the break's {}", b.to),
            ));
        }
        let Some(b) = self.breaking.remove(&(file, lk)) else {
            return Ok(self.settle_lease(file, lk, state));
        };
        // The break's epoch was bumped when it was sent.
        let holders = self.lease_holder_keys(file, lk);
        let epoch = self.set_lease_state_of(&holders, lk, state, Epoch::Keep);
        let windows = self
            .lease_holders_among(&holders, lk)
            .any(|h| h.rec.protocol.as_str() == lease::MSFSA_PROTOCOL);
        match lease::next_break_step(state, b.required) {
            Some(next) if windows => self.break_next_step(conn, file, lk, state, next, &b),
            _ => self.break_over(file),
        }
        Ok(Reply::Lease(HeldLease {
            key: lk,
            state,
            epoch,
        }))
    }

    /// An acknowledged break left the lease above what the opens that met
    /// it mid-break need: the next step of the chain goes to the holder
    /// (on the connection that acknowledged), with the chain's epoch. The
    /// opens waiting for it run again once the chain ends.
    fn break_next_step(
        &mut self,
        conn: ConnId,
        file: FileId,
        lk: LeaseKey,
        state: LeaseState,
        next: LeaseState,
        chain: &Breaking,
    ) {
        let ack = lease::ack_required(state);
        let holders = self.lease_holder_keys(file, lk);
        let epoch = match ack {
            true => self.set_lease_state_of(&holders, lk, state, Epoch::Keep),
            false => self.set_lease_state_of(&holders, lk, next, Epoch::Keep),
        };
        let step = Breaking {
            to: next,
            required: chain.required,
            waiters: chain.waiters,
            deadline_ms: 0,
            extended: chain.extended,
            id: chain.id,
        };
        self.send_break(Some(conn), (file, lk), &holders, state, epoch, ack, step);
        if !ack {
            self.break_over(file);
        }
    }

    /// Sends the break of lease `lk` on `file` (held by the handles
    /// `holders`) from `state` to `b.to` to connection `conn` (none: a
    /// disconnected holder learns nothing); one that needs an
    /// acknowledgement is in progress until it comes, or until the break
    /// timeout from now.
    #[allow(clippy::too_many_arguments)]
    fn send_break(
        &mut self,
        conn: Option<ConnId>,
        (file, lk): (FileId, LeaseKey),
        holders: &[ResumeKey],
        state: LeaseState,
        epoch: u16,
        ack: bool,
        b: Breaking,
    ) {
        if let Some(writer) = conn
            .and_then(|c| self.conns.get(&c))
            .map(|c| c.writer.clone())
        {
            // If the commit `dep` names fails, the rollback forgets the
            // break (`Engine::roll_back`) so it is sent again.
            let dep = self.break_dependency_among(holders, lk);
            let parked = self
                .lease_holders_among(holders, lk)
                .find(|h| h.parked)
                .map(|h| h.rec.key);
            let ev = Event::LeaseBreak {
                lease_key: lk,
                current_state: state,
                new_state: b.to,
                epoch,
                ack_required: ack,
                file: Some(file),
            };
            match parked.and_then(|k| self.handles.get_mut(&k)) {
                // Its open waits for an intent: the reply granting the
                // lease is not even built. The break follows it
                // (`finish_parked`), and is counted when it goes.
                Some(h) => h.held_break = Some(ev),
                None => self.break_event_after(dep, writer, ev),
            }
        } else {
            // Neither sent nor counted in `stats.breaks`.
            debug!(lease_key = %lk, from = %state, to = %b.to, "lease break of a disconnected holder: not sent");
        }
        if ack {
            // The local opens waiting for the file's breaks wait for this
            // one too: none held past its deadline begins that wait.
            self.refuse_held_local_opens_past_deadline(file);
            let deadline_ms = mono_ms() + self.cfg.break_timeout_ms;
            self.breaking
                .insert((file, lk), Breaking { deadline_ms, ..b });
        }
    }

    /// Hands the break event `ev` to `writer`, behind sequence `dep`
    /// ([`Engine::event_after`]), and counts it in `stats.breaks`: the
    /// only place a break is counted, so a break held for a parked open's
    /// reply counts when it goes, and one of a disconnected holder never.
    /// If `dep`'s commit fails the event is dropped (and the break sent
    /// anew by the open that wants it): the count is taken back with it
    /// (`Undo::BreakSent`). Before (review rvobs) a break counted when it
    /// was decided: a holder sent one break after a failed commit was
    /// counted two, and a disconnected holder's break one.
    pub(super) fn break_event_after(
        &mut self,
        dep: u64,
        writer: std::sync::Arc<crate::outbox::ConnWriter>,
        ev: Event,
    ) {
        if let Event::LeaseBreak {
            lease_key,
            current_state,
            new_state,
            epoch,
            ack_required,
            ..
        } = &ev
        {
            // At INFO those that need an acknowledgement, as before; the
            // others (a read lease broken by a write) would flood it.
            match ack_required {
                true => {
                    info!(lease_key = %lease_key, from = %current_state, to = %new_state, epoch, "lease break sent")
                }
                false => {
                    debug!(lease_key = %lease_key, from = %current_state, to = %new_state, epoch, "lease break sent")
                }
            }
        }
        self.stats.breaks += 1;
        self.undo_if_seq_fails(dep, super::durable::Undo::BreakSent);
        self.event_after(dep, writer, ev);
    }

    /// The commit a break of lease `lk` on `file` (or any event showing
    /// its new state or epoch) must wait for. A persistent holder's epoch
    /// bump (or lowered state) is in the current group: the event shows it
    /// only once that, and all the request builds on, is durable — else
    /// after a restart the next break could repeat the epoch (a v2-lease
    /// client ignores it). Other holders' lease state is not stored: their
    /// event goes at once — but never ahead of a reply that grants the
    /// lease and waits for a commit (`Handle::shown_at`): the frontend
    /// would not know the lease yet and drop the break.
    pub(super) fn break_dependency(&self, file: FileId, lk: LeaseKey) -> u64 {
        self.break_dependency_among(self.by_file.get(&file).map_or(&[], |v| &v[..]), lk)
    }

    /// [`Self::break_dependency`], the lease's holders among `keys`.
    fn break_dependency_among(&self, keys: &[ResumeKey], lk: LeaseKey) -> u64 {
        let (persistent, shown) = self
            .lease_holders_among(keys, lk)
            .fold((false, 0), |(p, s), h| {
                (p || h.rec.durability.is_persistent(), s.max(h.shown_at))
            });
        if persistent { self.batch.dep() } else { 0 }.max(shown)
    }

    /// The handles of `file` under lease key `lk`.
    fn lease_holders(&self, file: FileId, lk: LeaseKey) -> impl Iterator<Item = &Handle> + '_ {
        self.lease_holders_among(self.by_file.get(&file).map_or(&[], |v| &v[..]), lk)
    }

    /// Their keys.
    fn lease_holder_keys(&self, file: FileId, lk: LeaseKey) -> Vec<ResumeKey> {
        self.lease_holders(file, lk).map(|h| h.rec.key).collect()
    }

    /// The handles among `keys` under lease key `lk`.
    fn lease_holders_among<'a>(
        &'a self,
        keys: &'a [ResumeKey],
        lk: LeaseKey,
    ) -> impl Iterator<Item = &'a Handle> + 'a {
        keys.iter()
            .filter_map(|k| self.handles.get(k).map(|h| &**h))
            .filter(move |h| h.rec.lease.is_some_and(|l| l.key == lk))
    }

    /// A break held for a parked open's reply (`Handle::held_break`)
    /// whose handle went before it was answered (its truncate failed, it
    /// was closed): it goes to another attached holder of the lease key,
    /// behind what that holder's replies wait for; with none, the break is
    /// settled as for a holder that cannot acknowledge. Before (review,
    /// session 29) it was dropped with the handle while the break stayed
    /// in progress: the breaking open waited the whole break timeout and
    /// the lease was then lowered without its client having flushed.
    pub(super) fn pass_held_break(&mut self, file: FileId, ev: Event) {
        let Event::LeaseBreak { lease_key: lk, .. } = ev else {
            return;
        };
        // Another holder still waiting for its intent: held for its reply
        // in turn (sent now, the break would come before the reply that
        // grants the lease, and the frontend would drop it).
        let parked = self
            .lease_holders(file, lk)
            .find(|h| h.parked)
            .map(|h| h.rec.key);
        if let Some(h) = parked.and_then(|k| self.handles.get_mut(&k)) {
            h.held_break = Some(ev);
            return;
        }
        let to = self
            .by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .filter(|h| h.rec.lease.is_some_and(|l| l.key == lk))
            .filter_map(|h| {
                let c = self.conns.get(&h.conn?)?;
                Some((h.shown_at, c.writer.clone()))
            })
            .max_by_key(|(shown, _)| *shown);
        match to {
            Some((shown, writer)) => {
                let dep = self.request_dependency().max(shown);
                self.break_event_after(dep, writer, ev);
            }
            None => self.settle_unackable_break(file, lk),
        }
    }

    /// Whether lease `lk` on `file` is held through a frontend of
    /// [`lease::MSFSA_PROTOCOL`] (its breaks follow Windows' rules).
    pub(super) fn lease_follows_msfsa(&self, file: FileId, lk: LeaseKey) -> bool {
        self.by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .any(|h| {
                h.rec.lease.is_some_and(|l| l.key == lk)
                    && h.rec.protocol.as_str() == lease::MSFSA_PROTOCOL
            })
    }

    /// Sets a lease to what its holder kept and lets waiting opens retry.
    pub(super) fn settle_lease(&mut self, file: FileId, lk: LeaseKey, state: LeaseState) -> Reply {
        let epoch = self.set_lease_state(file, lk, state);
        self.retry_files.insert(file);
        Reply::Lease(HeldLease {
            key: lk,
            state,
            epoch,
        })
    }

    /// The file on which lease key `lk` is held through connection `conn`
    /// (by `client`, when named), with the lease's state. A key held here
    /// by more than one client and no client named is refused: which
    /// client's lease is meant cannot be told, and a guess could settle a
    /// lease whose holder never flushed.
    fn lease_held_here(
        &self,
        conn: ConnId,
        lk: LeaseKey,
        client: Option<&ClientId>,
    ) -> Result<Option<(FileId, LeaseState)>, WireError> {
        let held: Vec<(FileId, LeaseState, &ClientId)> = self
            .conns
            .get(&conn)
            .into_iter()
            .flat_map(|c| c.handles.iter())
            .filter_map(|k| self.handles.get(k))
            .filter(|h| client.is_none_or(|c| h.rec.client == *c))
            .filter_map(|h| {
                let l = h.rec.lease.filter(|l| l.key == lk)?;
                Some((h.rec.file, l.state, &h.rec.client))
            })
            .collect();
        if let Some((_, _, first)) = held.first() {
            if held.iter().any(|(_, _, c)| c != first) {
                return Err(err(
                    ErrorCode::LeaseKeyInUse,
                    format!(
                        "lease key {lk} is held through this connection by more than one client: the acknowledgement must name its client"
                    ),
                ));
            }
        }
        // One client holds a key on one file (`lease_key_free_for`);
        // should it hold more, the one with a break in progress is meant.
        Ok(held
            .iter()
            .find(|(f, _, _)| self.breaking.contains_key(&(*f, lk)))
            .or(held.first())
            .map(|(f, s, _)| (*f, *s)))
    }

    /// Runs again the waiting opens of every file whose break ended.
    pub(super) fn process_retries(&mut self) {
        self.commits_resolved();
        let files = std::mem::take(&mut self.retry_files);
        let breaks_over = std::mem::take(&mut self.break_over_files);
        for f in breaks_over.difference(&files) {
            self.retry_waiting(*f, false);
        }
        for f in files {
            self.retry_waiting(f, true);
        }
        self.learn_links_step();
    }

    /// A break of a lease on `file` ended by its holder's acknowledgement
    /// or by its timeout: what waited for it runs again — an open that
    /// waits for breaks alone once the last of them is over
    /// ([`Self::retry_waiting`]). Every other way a break ends (its
    /// holder closed, lost, detached, a failed commit) retries the file
    /// in full.
    pub(super) fn break_over(&mut self, file: FileId) {
        self.break_over_files.insert(file);
    }

    /// Runs a request that waited, if its connection is still there.
    pub(super) fn run_again(&mut self, conn: ConnId, id: u64, req: Request) {
        let Some((writer, role)) = self
            .conns
            .get(&conn)
            .map(|c| (c.writer.clone(), c.role.clone()))
        else {
            return;
        };
        self.run_request(conn, &writer, &role, id, req);
    }

    /// Runs again the opens of `file` that waited for lease breaks. With
    /// `all` unset (only breaks ended, `Self::break_over`), an open that
    /// waits for breaks alone keeps waiting while one of them (that
    /// break, a later step of its chain included, not one begun anew) is
    /// still in progress: run again now, it would only wait again, at the cost of
    /// a whole open (before, review rvcx: n acknowledgements of one open's
    /// n breaks ran it n times, each time over every lease of the file).
    pub(super) fn retry_waiting(&mut self, file: FileId, all: bool) {
        self.retry_deferred_deletes(file);
        let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_changes)
            .into_iter()
            .partition(|(f, _, _, _)| *f == file);
        self.waiting_changes = later;
        for (_, conn, id, req) in ready {
            self.run_again(conn, id, req);
        }
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_local)
            .into_iter()
            .partition(|(f, ..)| *f == file);
        self.waiting_local = later;
        for (f, pid, reply, fd) in now {
            self.on_local_open(f, pid, fd, reply);
        }
        let (mine, mut later): (Vec<WaitingOpen>, Vec<WaitingOpen>) =
            std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(|w| w.file == file);
        let mut now = Vec::new();
        for mut w in mine {
            if all || !self.conns.contains_key(&w.conn) || self.breaks_all_over(file, &mut w.breaks)
            {
                now.push(w);
            } else {
                later.push(w);
            }
        }
        self.waiting = later;
        for w in now {
            let Some(writer) = self.conns.get(&w.conn).map(|c| c.writer.clone()) else {
                continue; // its frontend went away meanwhile
            };
            self.open_reruns += 1;
            self.begin_request();
            let outcome = self.open(w.conn, w.id, w.protocol, w.instance, w.req, w.replay);
            self.answer(w.conn, &writer, w.id, outcome);
        }
    }

    /// Whether none of `breaks` (on `file`) is in progress any more. Those
    /// over are dropped from the front, and the look stops at the first
    /// still in progress: acknowledged in the order they were sent, n
    /// breaks cost n looks in all, not one per break still waited for at
    /// each acknowledgement.
    fn breaks_all_over(&self, file: FileId, breaks: &mut VecDeque<(LeaseKey, u64)>) -> bool {
        while let Some((lk, id)) = breaks.front() {
            if self.breaking.get(&(file, *lk)).is_some_and(|b| b.id == *id) {
                return false;
            }
            breaks.pop_front();
        }
        true
    }

    /// Whether a disconnected holder among `keys` (under `lk`) of
    /// [`lease::MSFSA_PROTOCOL`] keeps its open through a break of its
    /// lease to `to`, and may resume it to acknowledge: MS-SMB2 3.3.4.7
    /// closes an open without a connection only when it is neither
    /// durable nor persistent, or durable (not persistent) and `to` lacks
    /// H; any other waits for its client (the lease break acknowledgment
    /// timer, 3.3.2.5) — connection loss keeps durable and persistent
    /// opens (3.3.7.1). Before (review rvfailover), every disconnected
    /// holder's lease was lowered at once: a failing-over client's cached
    /// writes then overwrote another client's acknowledged write. The
    /// smb-like and nfs-like specs lower a disconnected holder at once:
    /// their holders never wait here.
    fn holder_resumes_break(&self, keys: &[ResumeKey], lk: LeaseKey, to: LeaseState) -> bool {
        self.lease_holders_among(keys, lk).any(|h| {
            h.conn.is_none()
                && h.rec.protocol.as_str() == lease::MSFSA_PROTOCOL
                && matches!(h.rec.conn, ConnState::Disconnected { .. })
                && (h.rec.durability.is_persistent()
                    || (matches!(h.rec.durability, Durability::Durable { .. })
                        && to.contains(LeaseState::H)))
        })
    }

    /// Handle `key` was just attached to `conn` (a resume, or a new open
    /// under its lease key) while a break of its lease is in progress
    /// that no other attached holder was told of (all were away: the
    /// break was not sent, or its holder's connection went before it
    /// acknowledged): the break goes to `conn` now, behind the reply that
    /// attached it, so its client can acknowledge there (MS-SMB2 3.3.4.7
    /// sends a break on any connection of the lease's opens). Only for
    /// [`lease::MSFSA_PROTOCOL`] holders: no other break stays in
    /// progress with no holder attached ([`Self::holder_resumes_break`]).
    /// The holder gets at least [`Self::resume_grace_ms`] from now to
    /// write back and acknowledge: the deadline set when the break was
    /// decided may be about to pass (re-review rr39h F3: a holder that
    /// resumed 0.2 s before it had 0.2 s). With `rebound` (the request
    /// replayed `key` while it stayed attached on `conn`, or resumed or
    /// replayed it while disconnected), other holders attached on `conn`
    /// do not count as told: the client may have lost what `conn` carried
    /// to it (a channel or connection of rksmbd's, which reaches filterd
    /// over one connection, that died; re-review rr40a R1, rr40b F2: a
    /// client with a second open under the key was never sent the break
    /// again). A second copy of a break the client did see is harmless.
    pub(super) fn resend_break_on_attach(&mut self, conn: ConnId, key: ResumeKey, rebound: bool) {
        let Some(h) = self.handles.get(&key) else {
            return;
        };
        let (Some(l), Some(c)) = (h.rec.lease, h.conn) else {
            return;
        };
        if c != conn || h.rec.protocol.as_str() != lease::MSFSA_PROTOCOL {
            return;
        }
        let file = h.rec.file;
        let Some(to) = self.breaking.get(&(file, l.key)).map(|b| b.to) else {
            return;
        };
        let told_elsewhere = self
            .lease_holders(file, l.key)
            .any(|o| o.rec.key != key && o.conn.is_some_and(|c| !rebound || c != conn));
        if told_elsewhere {
            return;
        }
        let Some(writer) = self.conns.get(&conn).map(|c| c.writer.clone()) else {
            return;
        };
        let grace = self.resume_grace_ms();
        if let Some(b) = self
            .breaking
            .get_mut(&(file, l.key))
            .filter(|b| !b.extended)
        {
            let later = mono_ms().saturating_add(grace);
            if later > b.deadline_ms {
                b.deadline_ms = later;
                b.extended = true;
            }
        }
        let holders = self.lease_holder_keys(file, l.key);
        let dep = self
            .break_dependency_among(&holders, l.key)
            .max(self.request_dependency());
        info!(lease_key = %l.key, from = %l.state, to = %to, "lease break in progress sent again to a holder that resumed");
        let ev = Event::LeaseBreak {
            lease_key: l.key,
            current_state: l.state,
            new_state: to,
            epoch: l.epoch,
            ack_required: true,
            file: Some(file),
        };
        self.break_event_after(dep, writer, ev);
    }

    /// The least time a holder told of a break in progress when it
    /// resumes has to acknowledge it: the break timeout, at most 5 s (a
    /// client writes its cached data back within moments once told).
    fn resume_grace_ms(&self) -> u64 {
        self.cfg.break_timeout_ms.min(5_000)
    }

    /// A break in progress whose lease no attached open holds any more can
    /// never be acknowledged: lower the lease now instead of at the timeout
    /// — unless a disconnected holder may resume to acknowledge it
    /// ([`Self::holder_resumes_break`]): it stays in progress then.
    pub(super) fn settle_unackable_break(&mut self, file: FileId, lk: LeaseKey) {
        let Some(to) = self.breaking.get(&(file, lk)).map(|b| b.to) else {
            return;
        };
        let holders = self.lease_holder_keys(file, lk);
        if self.holder_resumes_break(&holders, lk, to) {
            return;
        }
        let attached = self
            .by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .any(|o| o.conn.is_some() && o.rec.lease.is_some_and(|x| x.key == lk));
        if attached {
            return;
        }
        if let Some(b) = self.breaking.remove(&(file, lk)) {
            debug!(lease_key = %lk, to = %b.to, "break target disconnected: lowered at once");
            self.set_lease_state(file, lk, b.to);
            self.retry_files.insert(file);
        }
    }
}

/// Whether lowering a disconnected non-persistent durable handle's lease
/// from `from` to `to` closes the handle. MS-SMB2 3.3.4.7 closes a
/// durable open without a connection when a break leaves its lease
/// without H (smbtorture's durable-open oplock, lease and open2-oplock
/// tests check it): so for [`lease::MSFSA_PROTOCOL`], any lowering to a
/// state without H. One that keeps H (RWH to RH) keeps the open: its
/// break waits for the client to resume ([`Engine::holder_resumes_break`];
/// before, review rvfailover, it was closed too). The smb-like spec closes
/// one only when its H is broken — a lower R or W shows at its RECONNECT
/// instead — and nfs-like holders follow it.
fn purged_by_lowering(protocol: &str, from: LeaseState, to: LeaseState) -> bool {
    let lost = |s: LeaseState| from.contains(s) && !to.contains(s);
    if protocol == lease::MSFSA_PROTOCOL {
        let lowered = [LeaseState::R, LeaseState::W, LeaseState::H]
            .into_iter()
            .any(lost);
        lowered && !to.contains(LeaseState::H)
    } else {
        lost(LeaseState::H)
    }
}

/// Whether `h` carries a delegation of the opener's own client (`opener`:
/// its client and frontend), which its open does not break
/// ([`Engine::break_leases_for`]).
fn own_delegation(
    h: &Handle,
    opener: Option<(&libfilter::model::ClientId, &InstanceName)>,
) -> bool {
    opener.is_some_and(|(client, frontend)| {
        h.rec.protocol.as_str() == lease::DELEGATION_PROTOCOL
            && h.rec.client == *client
            && h.rec.frontend == *frontend
    })
}
