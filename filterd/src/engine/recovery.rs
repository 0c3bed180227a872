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
        let mut updates = Vec::new();
        let now = now_ms();
        let mut corrupt = 0u64;
        for r in store.all_handles()? {
            let mut rec = match r {
                Ok(rec) => rec,
                Err(e) => {
                    error!(error = %e, "stored handle record does not decode; left in place for inspection");
                    corrupt += 1;
                    continue;
                }
            };
            if !rec.durability.is_persistent() {
                updates.push(StoreOp::DeleteHandle(Box::new(rec)));
                continue;
            }
            let timeout = u64::from(rec.durability.timeout_ms().unwrap_or(0));
            let reopened = match (&rec.kernel_handle, rec.conn) {
                (_, ConnState::Lost) => None,
                (Some(kh), _) => {
                    match self.fs.reopen_for_recovery(kh, rec.access, &rec.path) {
                        Ok(x) => Some(x),
                        // Out of descriptors or memory is our problem, not the
                        // handle's: refuse to start rather than mark it lost.
                        Err(e)
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
                        Err(e) => {
                            warn!(resume_key = %rec.key, path = %rec.path, error = %e, "persistent handle lost: file cannot be reopened");
                            None
                        }
                    }
                }
                (None, _) => None,
            };
            // The reopen proves the file is there; the descriptor itself is
            // closed again and taken anew when the handle is resumed, so a
            // daemon with 100k disconnected handles does not need 100k
            // descriptors. The stored record is left as it is (at recovery
            // every handle is disconnected, whatever it says); only a lost
            // handle is rewritten.
            match reopened {
                Some((_fd, file, _size)) => {
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
            let fd = None;
            match rec.conn {
                ConnState::Disconnected { .. } => {
                    self.expiries
                        .push(Reverse((mono_ms() + timeout, rec.key, 0)));
                }
                // A lost handle stays visible until its timeout too, then
                // goes (it protects nothing: its file is gone).
                ConnState::Lost => self
                    .expiries
                    .push(Reverse((mono_ms() + timeout, rec.key, 0))),
                ConnState::Connected => {}
            }
            let key = rec.key;
            let restore = if matches!(rec.conn, ConnState::Disconnected { .. }) {
                rec.locks.clone()
            } else {
                Vec::new()
            };
            let file = rec.file;
            self.insert(Handle {
                rec,
                fd,
                conn: None,
                gen: 0,
                parked: false,
                lock_fd: None,
                linked: false,
                stat: false,
            });
            // Re-take its byte-range locks, in the filter and as OFD locks,
            // before anyone is served (invariant 5).
            if !restore.is_empty() {
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
        }
        if !updates.is_empty() {
            // Each update stands alone: one request each, so that a store
            // that splits large commits (etcd) packs them whole.
            let each: Vec<&[StoreOp]> = updates.iter().map(std::slice::from_ref).collect();
            store.commit(&each)?;
        }
        info!(
            recovered = self.stats.recoveries,
            lost = self.stats.recoveries_lost,
            corrupt,
            elapsed_ms = millis(t0.elapsed()),
            "recovery done"
        );
        Ok(())
    }
}
