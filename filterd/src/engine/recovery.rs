//! Restart recovery: dangling intents finished or dropped, replay records
//! loaded, every persistent handle reopened by kernel handle (proven to lie
//! beneath the root) with its locks re-taken — all before the socket
//! accepts anyone (invariant 5).

use super::fs::SizeRedo;
use super::*;
use libfilter::proto::CorruptRecords;
use libfilter::store::step_weight;

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
        // One request per intent (its changes end with deleting it), so
        // that each is atomic and a store that splits large commits (etcd)
        // packs them whole; an intent's changes to other handles (a
        // rename's, a delete on close passed on) go before it, one request
        // each: done again if the intent is, they change nothing again.
        let mut requests: Vec<Vec<StoreOp>> = Vec::new();
        let mut finished = Vec::new();
        let mut sync = ToSync::default();
        // Files whose change mark proved a change: unmarked once that is
        // recorded.
        let mut unmark = Vec::new();
        // The stored handles of each file, read once, when an interrupted
        // delete on close first asks (not per intent: a crash amid a burst
        // of them would read 100k records as often).
        let mut stored_by_file: Option<HashMap<FileId, Vec<HandleRecord>>> = None;
        // The records skipped as unreadable, named for `status`
        // (`StatusInfo::corrupt_records`): a log line alone went by
        // unseen, and live filterctl could not tell.
        let mut corrupt = CorruptRecords::default();
        for i in store.all_intents()? {
            let intent = match i {
                Ok(i) => i,
                Err(e) => {
                    error!(error = %e, "stored intent does not decode; left in place for inspection");
                    corrupt.note(e.to_string());
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
                    // answered, so nobody holds it), and with it any
                    // record of its handle written meanwhile (a detach or
                    // lease change of the waiting open did, before they
                    // left it to the completion): kept, it came back
                    // claiming `Overwritten` to the client's re-sent create.
                    // A file gone drops it the same way.
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
                            finished.push(StoreOp::DeleteHandle(record));
                        }
                        Some(Ok(redone)) => {
                            match redone {
                                SizeRedo::Redone(fd) => {
                                    sync.fds.push(fd);
                                    info!(resume_key = %record.key, path = %record.path, "recovery finished an interrupted overwrite");
                                }
                                SizeRedo::Made(fd) => {
                                    // Fsync'd too: the mark proves the
                                    // change reached the page cache, not
                                    // the disk (its completion's fsync may
                                    // have failed, or the crash came
                                    // before it — review).
                                    sync.fds.push(fd);
                                    info!(resume_key = %record.key, path = %record.path, "interrupted overwrite had been made (its mark is on the file): not truncated again");
                                }
                                // Matched above.
                                SizeRedo::Unknown => {}
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
                            warn!(resume_key = %record.key, path = %record.path, "interrupted overwrite abandoned: file gone");
                            finished.push(StoreOp::DeleteHandle(record));
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
                        dir_to_sync(fs, &from, &mut sync);
                        dir_to_sync(fs, &to, &mut sync);
                        // The path is the file's: every handle that named
                        // it by the old path follows.
                        for r in store.all_handles()?.into_iter().flatten() {
                            if r.file == file && (r.key == key || r.path == from) {
                                let mut rec = r;
                                rec.path = to.clone();
                                requests.push(vec![StoreOp::PutHandle(Box::new(rec))]);
                            }
                        }
                        if let Some(r) = record {
                            finished.push(record_op(r));
                        }
                    } else if fs.names(&from, file, kernel_handle.as_ref()) {
                        warn!(resume_key = %key, %from, %to, "interrupted rename had not happened: dropped (a replay runs it)");
                    } else {
                        // The file is at neither name: moved or removed
                        // while filterd was down, before or after the
                        // rename — which, nothing says. Neither claimed
                        // nor run again over whatever `from` names now.
                        warn!(resume_key = %key, %from, %to, "interrupted rename: outcome unknown (the file is at neither name): not done again, its replay fails");
                        self.stats.intents_unknown += 1;
                        if let Some(r) = record {
                            finished.push(record_op(RecordSpec {
                                reply: OUTCOME_UNKNOWN.to_owned(),
                                ..r
                            }));
                        }
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
                                    sync.fds.push(fd);
                                    info!(resume_key = %key, size, "recovery finished an interrupted end-of-file change");
                                }
                                SizeRedo::Made(fd) => {
                                    // Fsync'd too, as an overwrite's.
                                    sync.fds.push(fd);
                                    info!(resume_key = %key, size, "interrupted end-of-file change had been made (its mark is on the file): not done again");
                                }
                                // Matched above.
                                SizeRedo::Unknown => {}
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
                    // The path no longer naming the file is taken for the
                    // remove made. (Not asked further: a file of several
                    // hard links keeps a name after its remove, so "has it
                    // a name left" would call a remove that happened
                    // unknown — review D-2. filterd's own rename of a
                    // directory above it is refused while the remove is in
                    // progress.)
                    if !fs.names(&path, file, kernel_handle.as_ref()) {
                        info!(%path, "recovery finished an interrupted remove");
                        self.stats.intents_recovered += 1;
                        dir_to_sync(fs, &path, &mut sync);
                        if let Some(r) = record {
                            finished.push(record_op(r));
                        }
                    } else if on_close {
                        // The handle's deletion committed: finish its
                        // delete-on-close — unless a stored handle of the
                        // file (one a build before opens waited for the
                        // unlink, `Engine::deletion_pending`, let
                        // in) holds it: unlinked, that acknowledged handle
                        // would come back lost. The delete passes to it,
                        // as to any open that remains when a handle with
                        // delete on close goes (it is the file's, as on
                        // Windows).
                        // The same file: its number and its kernel handle,
                        // or (without one) its name too — a number alone
                        // may be another file's now.
                        let same_file = |r: &&HandleRecord| {
                            r.conn != ConnState::Lost
                                && match (&r.kernel_handle, &kernel_handle) {
                                    (Some(a), Some(b)) => a == b,
                                    _ => r.path == path,
                                }
                        };
                        let stored = match &mut stored_by_file {
                            Some(m) => m,
                            None => {
                                let mut m: HashMap<FileId, Vec<HandleRecord>> = HashMap::new();
                                for r in store.all_handles()?.into_iter().flatten() {
                                    m.entry(r.file).or_default().push(r);
                                }
                                stored_by_file.insert(m)
                            }
                        };
                        let holders: Vec<HandleRecord> = stored
                            .get(&file)
                            .into_iter()
                            .flatten()
                            .filter(same_file)
                            .cloned()
                            .collect();
                        if !holders.is_empty() {
                            warn!(%path, handles = holders.len(), "interrupted delete on close passed to the file's stored handles");
                            for mut r in holders {
                                r.delete_on_close = true;
                                requests.push(vec![StoreOp::PutHandle(Box::new(r))]);
                            }
                        } else {
                            match fs.remove(&path, file, kernel_handle.as_ref()) {
                                Ok(()) => {
                                    info!(%path, "recovery finished an interrupted delete on close");
                                    self.stats.intents_recovered += 1;
                                    dir_to_sync(fs, &path, &mut sync);
                                }
                                Err(e) => {
                                    warn!(%path, error = %e.message, "interrupted delete on close could not be finished")
                                }
                            }
                        }
                    } else {
                        warn!(%path, "interrupted remove had not happened: dropped (a replay runs it)");
                    }
                    finished.push(StoreOp::DeleteIntent(intent.id));
                }
            }
            requests.push(std::mem::take(&mut finished));
        }
        if !requests.is_empty() {
            // What recovery changed on disk is durable before the commit
            // that records it.
            for fd in &sync.fds {
                self.fs
                    .fsync(fd.as_fd())
                    .map_err(|e| anyhow::anyhow!("fsync after recovery's changes: {e}"))?;
            }
            if let Some(r) = &sync.filesystem {
                self.fs
                    .syncfs(r.as_fd())
                    .map_err(|e| anyhow::anyhow!("syncfs after recovery's changes: {e}"))?;
            }
            // In steps the store can take on a full disk (review rr45h
            // F1), as completions (their handle rewrites may grow a
            // record: a longer path); one failing leaves its intent and
            // those after it for the next start, as a crash would.
            let requests: Vec<&[StoreOp]> = requests.iter().map(Vec::as_slice).collect();
            commit_in_steps(store, &requests, Step::Completion).map_err(|(_, e)| e)?;
        }
        for (kh, path, id) in unmark {
            self.fs.clear_change_mark(&kh, path.as_ref(), id);
        }
        for (k, rec) in store.all_replays()? {
            match (libfilter::store::parse_replay_key(&k), rec) {
                (Some((scope, op_id)), Ok(rec)) => {
                    self.replays.entry(scope).or_default().insert(op_id, rec);
                }
                (_, Err(e)) => {
                    error!(error = %e, "stored replay record does not decode; ignored");
                    corrupt.note_replay(&k, Some(&e));
                }
                (None, _) => {
                    error!("stored replay key does not parse; ignored");
                    corrupt.note_replay(&k, None);
                }
            }
        }
        let replays_done = t0.elapsed();
        // Stale records of non-persistent handles, deleted; and lost marks.
        let mut stale = Vec::new();
        let mut updates = Vec::new();
        let now = now_ms();
        // Each record moves once, from the store's decode into the box the
        // handle table keeps, as it is read (a record is some 400 bytes: a
        // vector of 100k of them first was tens of MB of copies and page
        // faults); its names come shared from the decode.
        let mut persistent = Vec::new();
        store.each_handle(&mut |r| match r {
            Ok(rec) if rec.durability.is_persistent() => {
                persistent.push(Box::new(Handle::detached(rec)))
            }
            Ok(rec) => stale.push(StoreOp::DeleteHandle(Box::new(rec))),
            Err(e) => {
                error!(error = %e, "stored handle record does not decode; left in place for inspection");
                corrupt.note(e.to_string());
            }
        })?;
        let read_done = t0.elapsed();
        // Files found under another id than stored: recorded before
        // serving (a failed commit puts a handle back as the store has it).
        let mut moved = Vec::new();
        // Which files are still there, all looked at in one go
        // (`Fs::locate_for_recovery`: mostly kernel time); a handle lost
        // before, or without a kernel handle, is not looked for. Meanwhile a
        // thread of its own fills the indexes that need only a record's
        // names and keys (the client and frontend counts — whose names the
        // records then share —, the create GUID index, the expiries): that
        // is user-space work the calling thread would otherwise do after
        // the look, with the other core idle.
        let mono_now = mono_ms();
        let mut named = NameIndexes {
            per_client: std::mem::take(&mut self.per_client),
            per_frontend: std::mem::take(&mut self.per_frontend),
            by_guid: std::mem::take(&mut self.by_guid),
            guid_clients: std::mem::take(&mut self.guid_clients),
            expiries: std::mem::take(&mut self.expiries),
        };
        let mut which = Vec::with_capacity(persistent.len());
        let mut probes = Vec::with_capacity(persistent.len());
        let mut names = Vec::with_capacity(persistent.len());
        for (i, h) in persistent.iter_mut().enumerate() {
            // A lost handle stays visible until its timeout too, then goes
            // (it protects nothing: its file is gone).
            let expires_mono = mono_now + u64::from(h.rec.durability.timeout_ms().unwrap_or(0));
            h.expires_mono = expires_mono;
            // Disjoint fields: the look reads the kernel handle and path,
            // the indexing thread rewrites the names.
            let HandleRecord {
                key,
                protocol,
                frontend,
                client,
                create_guid,
                path,
                kernel_handle,
                conn,
                ..
            } = &mut h.rec;
            if *conn != ConnState::Lost {
                if let Some(kh) = kernel_handle.as_ref() {
                    which.push(i);
                    probes.push((kh, &*path));
                }
            }
            names.push(RecordNames {
                key: *key,
                protocol,
                frontend,
                client,
                create_guid: *create_guid,
                expires_mono,
            });
        }
        let (found, named) = std::thread::scope(|s| {
            let indexer = std::thread::Builder::new()
                .name("recovery-index".into())
                .spawn_scoped(s, move || {
                    named.index(names);
                    named
                });
            let found = self.fs.locate_for_recovery(&probes);
            match indexer.map(|t| t.join()) {
                Ok(Ok(named)) => Ok((found, named)),
                // No thread to spare at start (a panic aborts through the
                // hook before this): refuse to start, as for descriptors.
                _ => Err(anyhow::anyhow!("cannot start recovery's indexing thread")),
            }
        })?;
        self.per_client = named.per_client;
        self.per_frontend = named.per_frontend;
        self.by_guid = named.by_guid;
        self.guid_clients = named.guid_clients;
        self.expiries = named.expiries;
        let mut located: Vec<Option<std::io::Result<FileId>>> = std::iter::repeat_with(|| None)
            .take(persistent.len())
            .collect();
        for (i, f) in which.into_iter().zip(found) {
            if let Some(slot) = located.get_mut(i) {
                *slot = Some(f);
            }
        }
        let located_done = t0.elapsed();
        let mut filed = Vec::with_capacity(persistent.len());
        let mut table = Vec::with_capacity(persistent.len());
        let mut restores = Vec::new();
        for (mut h, found) in persistent.into_iter().zip(located) {
            let rec = &mut h.rec;
            let timeout = u64::from(rec.durability.timeout_ms().unwrap_or(0));
            let found = match found {
                Some(Ok(file)) => Some(file),
                Some(Err(e)) => match super::opens::ReopenFailure::of(&e) {
                    // Out of descriptors or memory is our problem, not the
                    // handle's: refuse to start rather than mark it lost.
                    super::opens::ReopenFailure::Resources => {
                        anyhow::bail!(
                            "cannot reopen persistent handles: {e}; raise the descriptor limit (LimitNOFILE=) \
                             — filterd needs one descriptor per handle"
                        );
                    }
                    super::opens::ReopenFailure::Gone => {
                        warn!(resume_key = %rec.key, path = %rec.path, error = %e, "persistent handle lost: file cannot be reopened");
                        None
                    }
                    // Says nothing about the file (an I/O error, an
                    // interrupted open): kept under the file it recorded;
                    // its resume reopens it by kernel handle and decides
                    // then (review rvx: lost for good before).
                    super::opens::ReopenFailure::Moment | super::opens::ReopenFailure::Other => {
                        warn!(resume_key = %rec.key, path = %rec.path, error = %e, "persistent handle kept unchecked: its file could not be looked at");
                        Some(rec.file)
                    }
                },
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
                        moved.push(StoreOp::PutHandle(Box::new(rec.clone())));
                    }
                    rec.conn = ConnState::Disconnected {
                        since_ms: now,
                        expires_ms: now + timeout,
                    };
                    self.stats.recoveries += 1;
                }
                None => {
                    // A record already stored lost is not written again:
                    // on a full store that write would refuse the start.
                    let recorded = rec.conn == ConnState::Lost;
                    rec.conn = ConnState::Lost;
                    self.stats.recoveries_lost += 1;
                    if !recorded {
                        updates.push(StoreOp::PutHandle(Box::new(rec.clone())));
                    }
                }
            };
            // The lease key's file is the one the look found (a lost
            // handle holds none: `Engine::lose`).
            if let Some(l) = rec.lease.filter(|_| rec.conn != ConnState::Lost) {
                self.lease_key_taken(&rec.client, l.key, rec.file);
            }
            let key = rec.key;
            let restore = if matches!(rec.conn, ConnState::Disconnected { .. }) {
                rec.locks.clone()
            } else {
                Vec::new()
            };
            let file = rec.file;
            // A lost handle is left out of the file index (`Engine::lose`).
            if rec.conn != ConnState::Lost {
                filed.push((file, key));
            }
            table.push((key, h));
            if !restore.is_empty() {
                restores.push((key, file, restore));
            }
        }
        // The handle table, built once from key order as the file index
        // below (the store reads in key order, so the sort finds it sorted).
        table.sort_unstable_by_key(|(key, _)| *key);
        // Their link marks are not stored: found from the next step on.
        self.links_pending |= !table.is_empty();
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
        // Each update stands alone: one request each, so that a store that
        // splits large commits (etcd) packs them whole; in steps the store
        // can take on a full disk (review rr45h F1).
        let each: Vec<&[StoreOp]> = moved.iter().map(std::slice::from_ref).collect();
        commit_in_steps(store, &each, Step::Completion).map_err(|(_, e)| e)?;
        // Lost marks are recorded before serving, as completions are: the
        // engine serves those handles lost (no file index entry, no locks,
        // a resume refused), and a mark left unrecorded would bring the
        // handle back disconnected at the next start or failover — with
        // its share mode and locks beside whatever others took meanwhile,
        // since a file "gone" by ENOENT, EXDEV or ELOOP can come back
        // (re-review rr46c F1). Without room for them the start is refused.
        let each: Vec<&[StoreOp]> = updates.iter().map(std::slice::from_ref).collect();
        commit_in_steps(store, &each, Step::Completion).map_err(|(_, e)| e)?;
        // Stale records of non-persistent handles: never resumed (every
        // start drops them), so on a full store they wait for the next.
        let each: Vec<&[StoreOp]> = stale.iter().map(std::slice::from_ref).collect();
        match commit_in_steps(store, &each, Step::Plain) {
            Ok(()) => {}
            Err((
                done,
                e @ (StoreError::Full | StoreError::MapFull | StoreError::Reserved { .. }),
            )) => {
                warn!(error = %e, unrecorded = each.len() - done, "stale records of non-persistent handles not deleted from the store: deleted at the next start");
            }
            Err((_, e)) => return Err(e.into()),
        }
        // Reading every record left the store's pages resident; the engine
        // keeps what it needs in its own tables.
        store.release_read_pages();
        info!(
            recovered = self.stats.recoveries,
            lost = self.stats.recoveries_lost,
            corrupt = corrupt.total,
            elapsed_ms = millis(t0.elapsed()),
            intents_and_replays_ms = millis(replays_done),
            read_ms = millis(read_done - replays_done),
            located_ms = millis(located_done - read_done),
            indexed_ms = millis(indexed_done - located_done),
            "recovery done"
        );
        self.corrupt = corrupt;
        Ok(())
    }
}

/// How [`commit_in_steps`] commits.
#[derive(Clone, Copy)]
enum Step {
    /// What serving needs recorded first (intents finished, files found
    /// under another id): [`StateStore::commit_completion`], which may use
    /// the reserves, as an intent's completion does.
    Completion,
    /// What the next start finds again: [`StateStore::commit`].
    Plain,
}

/// Commits `requests` in order, each whole, at most
/// [`StateStore::commit_step_ops`] operations a transaction, each weighed
/// by the trees it touches and its large values
/// ([`libfilter::store::step_weight`]; a larger request alone): one
/// transaction of them all could need more pages than a full disk leaves
/// (review rr45h F1), and a step of deletes counted one an operation
/// copied twice the pages it was sized for (re-review rr46c F4). On
/// failure, how many committed before it and why.
fn commit_in_steps(
    store: &dyn StateStore,
    requests: &[&[StoreOp]],
    how: Step,
) -> Result<(), (usize, StoreError)> {
    let most = store.commit_step_ops().max(1);
    let mut done = 0;
    while done < requests.len() {
        let mut end = done;
        let mut weight = 0usize;
        // Unbounded (etcd, which splits commits itself): one step of all,
        // no record encoded again to weigh it (re-review rr47a F5).
        if most == usize::MAX {
            end = requests.len();
        }
        for r in requests.iter().skip(end) {
            let w = r.iter().map(step_weight).sum::<usize>();
            if end > done && weight.saturating_add(w) > most {
                break;
            }
            weight = weight.saturating_add(w);
            end += 1;
        }
        let step = requests.get(done..end).unwrap_or_default();
        match how {
            Step::Completion => store.commit_completion(step),
            Step::Plain => store.commit(step),
        }
        .map_err(|e| (done, e))?;
        done = end;
    }
    Ok(())
}

/// The indexes recovery fills from records' names and keys alone, owned by
/// its indexing thread while the files are looked at.
struct NameIndexes {
    per_client: HashMap<(Protocol, ClientId), usize>,
    per_frontend: HashMap<InstanceName, usize>,
    by_guid: HashMap<(ClientId, CreateGuid), ResumeKey>,
    guid_clients: HashMap<CreateGuid, u32>,
    expiries: BinaryHeap<Reverse<(u64, ResumeKey, u64)>>,
}

/// What the indexing thread reads of one record, and the names it
/// replaces by the shared copies.
struct RecordNames<'a> {
    key: ResumeKey,
    protocol: &'a mut Protocol,
    frontend: &'a mut InstanceName,
    client: &'a mut ClientId,
    create_guid: Option<CreateGuid>,
    expires_mono: u64,
}

impl NameIndexes {
    /// Every record counted, its names shared with the counts' keys, its
    /// create GUID indexed and its expiry queued (the indexes grow once,
    /// to their size).
    fn index(&mut self, names: Vec<RecordNames<'_>>) {
        self.by_guid.reserve(names.len());
        self.guid_clients.reserve(names.len());
        self.expiries.reserve(names.len());
        for r in names {
            super::opens::share_counted_names(
                &mut self.per_client,
                &mut self.per_frontend,
                r.protocol,
                r.client,
                r.frontend,
            );
            if let Some(g) = r.create_guid {
                super::opens::index_create_guid(
                    &mut self.by_guid,
                    &mut self.guid_clients,
                    r.client,
                    g,
                    r.key,
                );
            }
            self.expiries.push(Reverse((r.expires_mono, r.key, 0)));
        }
    }
}

/// Adds what makes durable the directory holding `path` before
/// recovery's commit records a change of its names: the directory, or the
/// whole filesystem where it cannot be opened ([`ToSync::add_dir_of`]; a
/// failed `syncfs` then fails recovery, as a failed fsync does, and the
/// intent stays for the next start). Failed, it kept filterd from coming
/// up at all in a directory it may write but not read (review r1 b2). One
/// no longer there (removed, or replaced by a link, while filterd was
/// down) has nothing to sync: a warning.
fn dir_to_sync(fs: &dyn super::fs::Fs, path: &RelPath, sync: &mut ToSync) {
    if let Err(e) = sync.add_dir_of(fs, path) {
        warn!(%path, error = %e, "the directory of a change recovery finished is gone: not synced");
    }
}
