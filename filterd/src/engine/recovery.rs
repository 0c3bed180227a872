//! Restart recovery: dangling intents finished or dropped, replay records
//! loaded, every persistent handle reopened by kernel handle (proven to lie
//! beneath the root) with its locks re-taken — all before the socket
//! accepts anyone (invariant 5).

use super::fs::SizeRedo;
use super::*;

impl Engine {
    /// Restart recovery: reopens every persistent handle in the store by its
    /// kernel file handle (a renamed file is still found), as disconnected
    /// with a fresh timeout (time the daemon was down does not count). A
    /// handle whose file is gone is kept as *lost* for the operator to see.
    /// Runs before the socket accepts anyone, so no conflicting open can slip
    /// in ahead of restored state (invariant 5).
    pub fn recover(&mut self, store: &dyn StateStore) -> anyhow::Result<()> {
        let t0 = Instant::now();
        // Dangling intents first: finish what a crash interrupted, so the
        // handle records they announce exist before handles are loaded.
        let mut finished = Vec::new();
        let mut sync: Vec<OwnedFd> = Vec::new();
        // Files whose change mark proved a change: unmarked once that is
        // recorded.
        let mut unmark = Vec::new();
        for i in store.all_intents()? {
            let intent = match i {
                Ok(i) => i,
                Err(e) => {
                    error!(error = %e, "stored intent does not decode; left in place for inspection");
                    continue;
                }
            };
            match intent.change {
                IntentChange::TruncatingOpen { record, before } => {
                    // Made before the crash if the file carries the
                    // intent's mark; made now if the file is as it was
                    // before; else unknown — the content moved (a local
                    // write while filterd was down looks the same as the
                    // truncate), so it is neither redone over what came
                    // after nor claimed: the open is dropped (never
                    // answered, so nobody holds it).
                    let done = record.kernel_handle.as_ref().map(|kh| {
                        self.fs.redo_size_change(
                            kh,
                            Some(&record.path),
                            0,
                            before.as_ref(),
                            intent.id,
                        )
                    });
                    match done {
                        Some(Ok(SizeRedo::Unknown)) => {
                            warn!(resume_key = %record.key, path = %record.path, "interrupted overwrite: outcome unknown (the file changed while filterd was down and carries no mark): not truncated, open dropped");
                            self.stats.intents_unknown += 1;
                        }
                        Some(Ok(redone)) => {
                            match redone {
                                SizeRedo::Redone(fd) => {
                                    sync.push(fd);
                                    info!(resume_key = %record.key, path = %record.path, "recovery finished an interrupted overwrite");
                                }
                                _ => {
                                    info!(resume_key = %record.key, path = %record.path, "interrupted overwrite had been made (its mark is on the file): not truncated again");
                                }
                            }
                            // Made or redone (and marked by the redo): the
                            // mark goes once this is recorded.
                            unmark.extend(
                                record
                                    .kernel_handle
                                    .clone()
                                    .map(|kh| (kh, Some(record.path.clone()), intent.id)),
                            );
                            self.stats.intents_recovered += 1;
                            finished.push(StoreOp::PutHandle(record));
                        }
                        _ => {
                            warn!(resume_key = %record.key, path = %record.path, "interrupted overwrite abandoned: file gone")
                        }
                    }
                    finished.push(StoreOp::DeleteIntent(intent.id));
                }
                IntentChange::Rename {
                    key,
                    from,
                    to,
                    file,
                    record,
                    kernel_handle,
                    ..
                } => {
                    let fs = &*self.fs;
                    if fs.names(&to, file, kernel_handle.as_ref()) {
                        info!(resume_key = %key, %from, %to, "recovery finished an interrupted rename");
                        self.stats.intents_recovered += 1;
                        sync.extend(fs.dir_of(&from).ok());
                        sync.extend(fs.dir_of(&to).ok());
                        // The path is the file's: every handle that named
                        // it by the old path follows.
                        for r in store.all_handles()?.into_iter().flatten() {
                            if r.file == file && (r.key == key || r.path == from) {
                                let mut rec = r;
                                rec.path = to.clone();
                                finished.push(StoreOp::PutHandle(Box::new(rec)));
                            }
                        }
                        if let Some(r) = record {
                            finished.push(record_op(r));
                        }
                    } else {
                        warn!(resume_key = %key, %from, %to, "interrupted rename had not happened: dropped (a replay runs it)");
                    }
                    finished.push(StoreOp::DeleteIntent(intent.id));
                }
                IntentChange::SetSize {
                    key,
                    kernel_handle,
                    size,
                    record,
                    before,
                } => {
                    // While the change was in flight every protocol read
                    // and write of the file through the filter waited for
                    // its completion to commit (`content_changes`); writes
                    // no gate saw (a local writer, a non-persistent handle)
                    // did not. So the change counts as made only if the
                    // file carries its mark; it is made now only over an
                    // untouched file; else its outcome is unknown and the
                    // replay is told so (an error, never a success).
                    let path = store.handle(key).ok().flatten().map(|r| r.path);
                    match self.fs.redo_size_change(
                        &kernel_handle,
                        path.as_ref(),
                        size,
                        before.as_ref(),
                        intent.id,
                    ) {
                        Ok(SizeRedo::Unknown) => {
                            warn!(resume_key = %key, size, "interrupted end-of-file change: outcome unknown (the file changed while filterd was down and carries no mark): not done again, its replay fails");
                            self.stats.intents_unknown += 1;
                            if let Some(r) = record {
                                finished.push(record_op(RecordSpec {
                                    reply: OUTCOME_UNKNOWN.to_owned(),
                                    ..r
                                }));
                            }
                        }
                        Ok(redone) => {
                            match redone {
                                SizeRedo::Redone(fd) => {
                                    sync.push(fd);
                                    info!(resume_key = %key, size, "recovery finished an interrupted end-of-file change");
                                }
                                _ => {
                                    info!(resume_key = %key, size, "interrupted end-of-file change had been made (its mark is on the file): not done again");
                                }
                            }
                            // Made or redone (and marked by the redo): the
                            // mark goes once this is recorded.
                            unmark.push((kernel_handle, path, intent.id));
                            self.stats.intents_recovered += 1;
                            if let Some(r) = record {
                                finished.push(record_op(r));
                            }
                        }
                        Err(e) => {
                            warn!(resume_key = %key, error = %e, "interrupted end-of-file change abandoned")
                        }
                    }
                    finished.push(StoreOp::DeleteIntent(intent.id));
                }
                IntentChange::Remove {
                    path,
                    file,
                    record,
                    kernel_handle,
                    on_close,
                } => {
                    let fs = &*self.fs;
                    if !fs.names(&path, file, kernel_handle.as_ref()) {
                        info!(%path, "recovery finished an interrupted remove");
                        self.stats.intents_recovered += 1;
                        sync.extend(fs.dir_of(&path).ok());
                        if let Some(r) = record {
                            finished.push(record_op(r));
                        }
                    } else if on_close {
                        // The handle's deletion committed: finish its
                        // delete-on-close.
                        match fs.remove(&path, file, kernel_handle.as_ref()) {
                            Ok(()) => {
                                info!(%path, "recovery finished an interrupted delete on close");
                                self.stats.intents_recovered += 1;
                                sync.extend(fs.dir_of(&path).ok());
                            }
                            Err(e) => {
                                warn!(%path, error = %e.message, "interrupted delete on close could not be finished")
                            }
                        }
                    } else {
                        warn!(%path, "interrupted remove had not happened: dropped (a replay runs it)");
                    }
                    finished.push(StoreOp::DeleteIntent(intent.id));
                }
            }
        }
        if !finished.is_empty() {
            // What recovery changed on disk is durable before the commit
            // that records it.
            for fd in &sync {
                self.fs
                    .fsync(fd.as_fd())
                    .map_err(|e| anyhow::anyhow!("fsync after recovery's changes: {e}"))?;
            }
            // One request per intent (its changes end with deleting it),
            // so that each is atomic and a store that splits large commits
            // (etcd) packs them whole.
            let per_intent: Vec<&[StoreOp]> = finished
                .split_inclusive(|op| matches!(op, StoreOp::DeleteIntent(_)))
                .collect();
            store.commit(&per_intent)?;
        }
        for (kh, path, id) in unmark {
            self.fs.clear_change_mark(&kh, path.as_ref(), id);
        }
        for (k, rec) in store.all_replays()? {
            match (libfilter::store::parse_replay_key(&k), rec) {
                (Some((scope, op_id)), Ok(rec)) => {
                    self.replays.entry(scope).or_default().insert(op_id, rec);
                }
                (_, Err(e)) => error!(error = %e, "stored replay record does not decode; ignored"),
                (None, _) => error!("stored replay key does not parse; ignored"),
            }
        }
        let replays_done = t0.elapsed();
        let mut updates = Vec::new();
        let now = now_ms();
        let mut corrupt = 0u64;
        let stored = store.all_handles()?;
        let read_done = t0.elapsed();
        // Each record moves once, into the box the handle table keeps (a
        // record is some 400 bytes: 100k of them copied from vector to
        // vector was tens of MB of copies and page faults).
        let mut persistent = Vec::with_capacity(stored.len());
        for r in stored {
            match r {
                Ok(rec) if rec.durability.is_persistent() => {
                    persistent.push(Box::new(Handle::detached(rec)))
                }
                Ok(rec) => updates.push(StoreOp::DeleteHandle(Box::new(rec))),
                Err(e) => {
                    error!(error = %e, "stored handle record does not decode; left in place for inspection");
                    corrupt += 1;
                }
            }
        }
        // Which files are still there, all looked at in one go (on every
        // core: `Fs::locate_for_recovery`); a handle lost before, or without
        // a kernel handle, is not looked for.
        let located = {
            let (which, probes): (Vec<usize>, Vec<_>) = persistent
                .iter()
                .enumerate()
                .filter(|(_, h)| h.rec.conn != ConnState::Lost)
                .filter_map(|(i, h)| Some((i, (h.rec.kernel_handle.as_ref()?, &h.rec.path))))
                .unzip();
            let mut located: Vec<Option<std::io::Result<FileId>>> = std::iter::repeat_with(|| None)
                .take(persistent.len())
                .collect();
            for (i, found) in which.into_iter().zip(self.fs.locate_for_recovery(&probes)) {
                if let Some(slot) = located.get_mut(i) {
                    *slot = Some(found);
                }
            }
            located
        };
        let located_done = t0.elapsed();
        // The indexes grow once, to their size.
        self.by_guid.reserve(persistent.len());
        self.guid_clients.reserve(persistent.len());
        self.expiries.reserve(persistent.len());
        let mut filed = Vec::with_capacity(persistent.len());
        let mut table = Vec::with_capacity(persistent.len());
        let mut restores = Vec::new();
        // One clock reading for every recovered handle's expiry.
        let mono_now = mono_ms();
        for (mut h, found) in persistent.into_iter().zip(located) {
            let rec = &mut h.rec;
            let timeout = u64::from(rec.durability.timeout_ms().unwrap_or(0));
            let found = match found {
                Some(Ok(file)) => Some(file),
                // Out of descriptors or memory is our problem, not the
                // handle's: refuse to start rather than mark it lost.
                Some(Err(e))
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM)
                    ) =>
                {
                    anyhow::bail!(
                        "cannot reopen persistent handles: {e}; raise the descriptor limit (LimitNOFILE=) \
                         — filterd needs one descriptor per handle"
                    );
                }
                Some(Err(e)) => {
                    warn!(resume_key = %rec.key, path = %rec.path, error = %e, "persistent handle lost: file cannot be reopened");
                    None
                }
                None => None,
            };
            // The look proves the file is there; a descriptor is taken when
            // the handle is resumed, so a daemon with 100k disconnected
            // handles does not need 100k descriptors. The stored record is
            // left as it is (at recovery every handle is disconnected,
            // whatever it says); only a lost handle is rewritten.
            match found {
                Some(file) => {
                    if file != rec.file {
                        rec.file = file;
                        updates.push(StoreOp::PutHandle(Box::new(rec.clone())));
                    }
                    rec.conn = ConnState::Disconnected {
                        since_ms: now,
                        expires_ms: now + timeout,
                    };
                    self.stats.recoveries += 1;
                }
                None => {
                    rec.conn = ConnState::Lost;
                    self.stats.recoveries_lost += 1;
                    updates.push(StoreOp::PutHandle(Box::new(rec.clone())));
                }
            };
            // A lost handle stays visible until its timeout too, then goes
            // (it protects nothing: its file is gone).
            self.expiries
                .push(Reverse((mono_now + timeout, rec.key, 0)));
            let key = rec.key;
            let restore = if matches!(rec.conn, ConnState::Disconnected { .. }) {
                rec.locks.clone()
            } else {
                Vec::new()
            };
            let file = rec.file;
            filed.push((file, key));
            // Counted, and its names shared with the count's keys.
            self.index_names(&mut h.rec);
            table.push((key, h));
            if !restore.is_empty() {
                restores.push((key, file, restore));
            }
        }
        // The handle table, built once from key order as the file index
        // below (the store reads in key order, so the sort finds it sorted).
        table.sort_unstable_by_key(|(key, _)| *key);
        if self.handles.is_empty() {
            self.handles = table.into_iter().collect();
        } else {
            self.handles.extend(table);
        }
        // The file index, built once: in file order (a B-tree filled in
        // order is built whole, its nodes full, instead of 100k lookups of
        // random files).
        filed.sort_unstable();
        let mut by_file: Vec<(FileId, Vec<ResumeKey>)> = Vec::new();
        for (file, key) in filed {
            match by_file.last_mut() {
                Some((f, keys)) if *f == file => keys.push(key),
                _ => by_file.push((file, vec![key])),
            }
        }
        if self.by_file.is_empty() {
            self.by_file = by_file.into_iter().collect();
        } else {
            for (file, keys) in by_file {
                self.by_file.entry(file).or_default().extend(keys);
            }
        }
        // Re-take every recovered handle's byte-range locks, in the filter
        // and as OFD locks, before anyone is served (invariant 5).
        for (key, file, restore) in restores {
            let t = self.locks.entry(file).or_insert_with(LockTable::new);
            for l in &restore {
                t.restore(Lock {
                    owner: key,
                    range: l.range,
                    kind: l.kind,
                });
            }
            if let Err(e) = self.mirror(key, &restore) {
                // A local process holds a conflicting lock (taken
                // while filterd was down): keep trying until it lets
                // go; filterctl shows the lock as not mirrored.
                warn!(resume_key = %key, error = %e.message, "recovered locks not mirrored as OFD locks yet: retrying");
                self.unmirrored.insert(key);
            }
        }
        let indexed_done = t0.elapsed();
        if !updates.is_empty() {
            // Each update stands alone: one request each, so that a store
            // that splits large commits (etcd) packs them whole.
            let each: Vec<&[StoreOp]> = updates.iter().map(std::slice::from_ref).collect();
            store.commit(&each)?;
        }
        // Reading every record left the store's pages resident; the engine
        // keeps what it needs in its own tables.
        store.release_read_pages();
        info!(
            recovered = self.stats.recoveries,
            lost = self.stats.recoveries_lost,
            corrupt,
            elapsed_ms = millis(t0.elapsed()),
            intents_and_replays_ms = millis(replays_done),
            read_ms = millis(read_done - replays_done),
            located_ms = millis(located_done - read_done),
            indexed_ms = millis(indexed_done - located_done),
            "recovery done"
        );
        Ok(())
    }
}
