//! Non-idempotent filesystem changes by request — rename, end of file,
//! remove, delete on close — each bracketed by an intent that commits
//! before the change (invariant 3).

use std::path::Path;

use super::*;

/// Most handles whose link mark one engine step finds
/// ([`Engine::learn_links_step`]); a few in unit tests, whose engine
/// holds few handles.
#[cfg(not(test))]
pub(super) const LINKS_PER_STEP: usize = 1024;
#[cfg(test)]
pub(super) const LINKS_PER_STEP: usize = 8;

/// Whether `path` lies below directory `dir` (not `dir` itself).
fn is_below(path: &RelPath, dir: &RelPath) -> bool {
    path.as_str()
        .strip_prefix(dir.as_str())
        .is_some_and(|rest| rest.starts_with('/'))
}

impl Engine {
    /// Renames the file of an attached handle (spec/smb-like.md "SET_INFO").
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rename(
        &mut self,
        conn: ConnId,
        req_id: u64,
        protocol: &Protocol,
        key: ResumeKey,
        to: RelPath,
        replace: bool,
        record: Option<RecordSpec>,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        let h = self.attached_with(
            conn,
            key,
            libfilter::model::Rights::DELETE,
            "rename needs delete access",
        )?;
        let (from, file, persistent) = (
            h.rec.path.clone(),
            h.rec.file,
            h.rec.durability.is_persistent(),
        );
        let kernel_handle = self
            .handles
            .get(&key)
            .and_then(|h| h.rec.kernel_handle.clone());
        self.others_share_delete(file, Some(key))?;
        // Replacing a target is deleting it: every open of the target must
        // share delete, and its handle-caching leases are broken first.
        let target = if replace {
            self.fs.file_at_checked(&to)?.filter(|t| *t != file)
        } else {
            None
        };
        if let Some(t) = target {
            // A handle that lost its file to inode reuse decides nothing
            // (its record marked lost goes into the batch first, so that
            // the dependency below covers it too).
            self.lose_handles_of_a_reused_inode_at(t, &to);
            self.depends_on_file(t);
            self.others_share_delete(t, None)?;
        }
        let record = record
            .map(|r| self.own_record(conn, protocol, r))
            .transpose()?;
        let own_lease = self
            .handles
            .get(&key)
            .and_then(|h| h.rec.lease.map(|l| l.key));
        let waits_for = if self.break_leases_for_namespace(file, own_lease) {
            Some(file)
        } else {
            target.filter(|t| self.break_leases_for_namespace(*t, own_lease))
        };
        if let Some(file) = waits_for {
            let req = Request::Rename {
                key,
                to,
                replace,
                record: record.map(|mut r| {
                    r.scope = unscope(protocol, r.scope);
                    r
                }),
            };
            self.wait_limit()?;
            self.waiting_changes.push((file, conn, req_id, req));
            return Ok(None);
        }
        let bracketed = persistent || self.has_persistent_handles(file);
        let recorded = record.is_some();
        // Made at once: it waits for a pending close of either file, and
        // (not bracketed at all) for a change of either in flight.
        let waits = [Some(file), target].into_iter().flatten().find_map(|f| {
            let closing = if needs_intent(persistent, recorded) {
                None
            } else {
                self.close_pending(f).map(Some)
            };
            let in_flight = if needs_intent(bracketed, recorded) {
                None
            } else {
                self.change_in_flight(f)
            };
            closing.or(in_flight).map(|s| (s, f))
        });
        if let Some((seq, f)) = waits {
            let req = Request::Rename {
                key,
                to,
                replace,
                record: None,
            };
            return self.wait_behind(seq, f, conn, req_id, req);
        }
        // An intent names its file by kernel handle, also for a handle
        // that keeps none (a non-durable one): recovery tells the renamed
        // file from one created since under a reused inode number, and a
        // file moved elsewhere meanwhile from one never renamed.
        let kernel_handle = match kernel_handle {
            None if needs_intent(bracketed, record.is_some()) => self
                .handles
                .get(&key)
                .and_then(|h| h.fd.as_ref())
                .and_then(|f| self.fs.file_handle_of(f.as_fd()).ok()),
            kh => kh,
        };
        let change = IntentChange::Rename {
            key,
            from,
            to,
            file,
            replace,
            record,
            kernel_handle,
        };
        self.run_change(conn, req_id, key, change, bracketed, target)
    }

    /// Renames directory `from` (`Request::RenameDirectory`): refused
    /// while a handle was opened by a path below it, or a rename, remove
    /// or delete on close of a path below it is in progress — Windows refuses a
    /// directory rename while a file below is open, and a handle's stored
    /// path must not go stale (a later rename, remove or delete on close
    /// by that path would miss its file; a restart would list it under a
    /// name it no longer has); waits while a rename below is made and its
    /// completion still committing. One engine step from the check to the
    /// `renameat2`, so no open below slips between them; nothing stored
    /// changes, so nothing is bracketed or recorded.
    pub(super) fn rename_directory(
        &mut self,
        conn: ConnId,
        req_id: u64,
        from: RelPath,
        to: RelPath,
        replace: bool,
        expect: Option<FileId>,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        if self.links_pending {
            // Which handles' paths pass a link is still being found.
            self.wait_limit()?;
            let req = Request::RenameDirectory {
                from,
                to,
                replace,
                expect,
            };
            self.waiting_links.push((conn, req_id, req));
            return Ok(None);
        }
        // Where `from` lies, links on the way resolved (review A3).
        let place = self.fs.place_of_path(&from);
        let below = |h: &Handle| self.lies_below(h, &from, place.as_deref());
        // A handle below whose removal is still committing comes back if
        // that commit fails; a rename below that is made, its completion
        // still committing, leaves its intent to a crash now, and recovery
        // would not find the file at its new path if the directory moved
        // (review D-4). The request waits for that commit, and runs again.
        let committed = self.pipe.committed();
        let completing = || {
            self.renames_completing
                .iter()
                .find(|(s, _, paths)| {
                    *s > committed
                        && paths
                            .iter()
                            .any(|p| at_or_below(p, &from, place.as_deref()))
                })
                .map(|&(seq, file, _)| (seq, file))
        };
        if let Some((seq, file)) = self.removal_pending_with(below).or_else(completing) {
            self.wait_limit()?;
            self.wait_for_commit(seq, file);
            let req = Request::RenameDirectory {
                from,
                to,
                replace,
                expect,
            };
            self.waiting_changes.push((file, conn, req_id, req));
            return Ok(None);
        }
        let open_below = self
            .handles
            .values()
            .find(|h| below(h))
            .map(|h| h.rec.path.clone())
            .or_else(|| self.change_in_progress_below(&from, place.as_deref()));
        if let Some(path) = open_below {
            // The refusal shows that handle, maybe still committing.
            self.depends_on_all();
            return Err(err(
                ErrorCode::AccessDenied,
                format!("{from}: {path} below it is open or being changed"),
            ));
        }
        self.fs.rename_directory(&from, &to, replace, expect)?;
        Ok(Some((Reply::Done, None)))
    }

    /// Finds whether the paths of handles recovered since the start (or
    /// put back from the store) pass a symbolic link
    /// ([`HandleRecord::through_link`] is not stored): one path walk
    /// each, at most [`LINKS_PER_STEP`] per engine step, between requests,
    /// from the first step after recovery on — not during recovery (~1 µs
    /// per handle with a warm cache, which made a restart of 100k handles
    /// a third longer: measured), and never in one stall (a cold cache
    /// after a takeover may read the disk for each). Directory renames
    /// wait until it is done (`rename_directory`), then run.
    pub(super) fn learn_links_step(&mut self) {
        if !self.links_pending {
            return;
        }
        let fs = &*self.fs;
        let unknown = self.handles.values_mut().filter(|h| !h.link_known);
        for (learnt, h) in unknown.enumerate() {
            if learnt == LINKS_PER_STEP {
                return;
            }
            h.rec.through_link = fs.path_has_link(&h.rec.path);
            h.link_known = true;
        }
        self.links_pending = false;
        for (conn, id, req) in std::mem::take(&mut self.waiting_links) {
            self.run_again(conn, id, req);
        }
    }

    /// Whether `h`'s file lies below directory `dir`, which lies at
    /// `place` (links on the way resolved; `None`: not found). By its
    /// path; and where paths alone do not show it (review A3): `dir`
    /// named through a symbolic link (`ld/sub` with `ld` → `d`: a handle
    /// of `d/sub/f`), or a handle opened (or last renamed) through one
    /// (`link/f` with `link` → `d/sub`, or a link to the file itself),
    /// asked where its file lies now — only a handle marked
    /// [`through_link`](libfilter::model::HandleRecord::through_link), or
    /// not known to be unmarked (a recovered one whose close is
    /// committing): the others' paths say where their files are.
    fn lies_below(&self, h: &Handle, dir: &RelPath, place: Option<&Path>) -> bool {
        if is_below(&h.rec.path, dir) {
            return true;
        }
        let Some(place) = place else {
            return false;
        };
        let under = |p: &Path| p != place && p.starts_with(place);
        (place != Path::new(dir.as_str()) && under(Path::new(h.rec.path.as_str())))
            || ((h.rec.through_link || !h.link_known)
                && self
                    .fs
                    .place_of_file(
                        h.fd.as_ref().map(|f| f.as_fd()),
                        h.rec.kernel_handle.as_ref(),
                        &h.rec.path,
                    )
                    .is_some_and(|p| under(&p)))
    }

    /// A path at or below directory `dir` (which lies at `place`, see
    /// [`Self::lies_below`]) that a change in progress
    /// names: a rename or remove (by path) whose intent is committing, or whose
    /// intent is durable and whose system call has not run yet (a delete
    /// on close whose handle's removal just committed among them). Moving
    /// the directory under it would make that change miss its file, and
    /// recovery take the path's emptiness for the change made.
    fn change_in_progress_below(&self, dir: &RelPath, place: Option<&Path>) -> Option<RelPath> {
        let at_or_below = |p: &RelPath| at_or_below(p, dir, place);
        self.parked.values().find_map(|p| match &p.change {
            Some(IntentChange::Rename { from, to, .. }) => {
                [from, to].into_iter().find(|p| at_or_below(p)).cloned()
            }
            Some(IntentChange::Remove { path, .. }) => at_or_below(path).then(|| path.clone()),
            // A truncating open (no change to perform: `None`) or a size
            // change is by a handle, which `handles` shows.
            Some(IntentChange::TruncatingOpen { .. } | IntentChange::SetSize { .. }) | None => None,
        })
    }

    /// Truncates or extends the file of an attached handle.
    pub(super) fn set_end_of_file(
        &mut self,
        conn: ConnId,
        req_id: u64,
        protocol: &Protocol,
        key: ResumeKey,
        size: u64,
        record: Option<RecordSpec>,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        self.attached_with(
            conn,
            key,
            libfilter::model::Rights::WRITE,
            "end_of_file needs write access",
        )?;
        let fs = &*self.fs;
        let h = self
            .handles
            .get_mut(&key)
            .ok_or_else(|| err(ErrorCode::NoSuchHandle, format!("no handle {key}")))?;
        if h.rec.kernel_handle.is_none() {
            h.rec.kernel_handle =
                h.fd.as_ref()
                    .and_then(|f| fs.file_handle_of(f.as_fd()).ok());
        }
        let Some(kernel_handle) = h.rec.kernel_handle.clone() else {
            return Err(err(
                ErrorCode::Unsupported,
                "this filesystem has no file handles",
            ));
        };
        let persistent = h.rec.durability.is_persistent();
        let file = h.rec.file;
        let record = record
            .map(|r| self.own_record(conn, protocol, r))
            .transpose()?;
        let bracketed = persistent || self.has_persistent_handles(file);
        if needs_intent(bracketed, record.is_some()) {
            // Every writer of the file through the filter checks its I/O
            // before the stamp is taken (see `hint_size_change`).
            if let Some(f) = self.hint_size_change(key) {
                let req = Request::SetEndOfFile {
                    key,
                    size,
                    record: record.map(|mut r| {
                        r.scope = unscope(protocol, r.scope);
                        r
                    }),
                };
                self.wait_limit()?;
                self.waiting_changes.push((f, conn, req_id, req));
                return Ok(None);
            }
        }
        // The file as it is before the change: recovery redoes the change
        // only if it still is (else writes no gate saw may have come after
        // the change).
        let before = self
            .handles
            .get(&key)
            .and_then(|h| h.fd.as_ref())
            .and_then(|f| self.fs.stamp(f.as_fd()).ok());
        if !needs_intent(persistent, record.is_some()) {
            if let Some(seq) = self.close_pending(file) {
                let req = Request::SetEndOfFile {
                    key,
                    size,
                    record: None,
                };
                return self.wait_for_close(seq, file, conn, req_id, req);
            }
        }
        // Other keys' read caching goes (MS-FSA 2.1.5.15.4: a new end of
        // file breaks R and RH to none), whatever the change's outcome.
        self.break_read_caching_of(key);
        let change = IntentChange::SetSize {
            key,
            kernel_handle,
            size,
            record,
            before,
        };
        self.run_change(conn, req_id, key, change, bracketed, None)
    }

    /// Removes a file by path (NFS-like REMOVE; delete on close).
    pub(super) fn remove_path(
        &mut self,
        conn: ConnId,
        req_id: u64,
        protocol: &Protocol,
        path: RelPath,
        record: Option<RecordSpec>,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        // The file's number and kernel handle from one look at one file
        // (`identity_at`): two looks paired one file's number with
        // another's handle in the intent when a local process replaced the
        // name between them. Without a kernel handle (or for the error of
        // a path that leaves the root), the number alone.
        let (file, kernel_handle) = match self.fs.identity_at(&path) {
            Some((file, kh)) => (file, Some(kh)),
            None => (
                self.fs
                    .file_at_checked(&path)?
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("{path}: not found")))?,
                None,
            ),
        };
        // As for a rename's target.
        self.lose_handles_of_a_reused_inode_at(file, &path);
        self.depends_on_file(file);
        self.others_share_delete(file, None)?;
        let record = record
            .map(|r| self.own_record(conn, protocol, r))
            .transpose()?;
        if self.break_leases_for_namespace(file, None) {
            let req = Request::Remove {
                path,
                record: record.map(|mut r| {
                    r.scope = unscope(protocol, r.scope);
                    r
                }),
            };
            self.wait_limit()?;
            self.waiting_changes.push((file, conn, req_id, req));
            return Ok(None);
        }
        if !needs_intent(false, record.is_some()) {
            if let Some(seq) = self.close_pending(file) {
                let req = Request::Remove { path, record: None };
                return self.wait_for_close(seq, file, conn, req_id, req);
            }
        }
        // Persistent handles of the file must find its removal bracketed
        // after a crash, whoever removed it.
        let bracketed = self.has_persistent_handles(file);
        if !needs_intent(bracketed, record.is_some()) {
            if let Some(seq) = self.change_in_flight(file) {
                let req = Request::Remove { path, record: None };
                return self.wait_behind(seq, file, conn, req_id, req);
            }
        }
        let change = IntentChange::Remove {
            path,
            file,
            record,
            kernel_handle,
            on_close: false,
        };
        self.run_change(
            conn,
            req_id,
            ResumeKey(uuid::Uuid::nil()),
            change,
            bracketed,
            None,
        )
    }

    /// Whether any handle of `file` is persistent: a change of the file
    /// is then bracketed by an intent whatever handle makes it.
    pub(super) fn has_persistent_handles(&self, file: FileId) -> bool {
        self.by_file
            .get(&file)
            .into_iter()
            .flatten()
            .filter_map(|k| self.handles.get(k))
            .any(|h| h.rec.durability.is_persistent())
    }

    /// Performs a rename, remove or size change: bracketed by an intent
    /// (parked until it is durable) when it must survive a crash — the
    /// file has persistent handles (`persistent`), or the reply is
    /// recorded — else at once. `replaces`: the file a rename with replace
    /// takes the name of.
    pub(super) fn run_change(
        &mut self,
        conn: ConnId,
        req_id: u64,
        key: ResumeKey,
        change: IntentChange,
        persistent: bool,
        replaces: Option<FileId>,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        let recorded = match &change {
            IntentChange::Rename { record, .. }
            | IntentChange::Remove { record, .. }
            | IntentChange::SetSize { record, .. } => record.is_some(),
            IntentChange::TruncatingOpen { .. } => false,
        };
        if !needs_intent(persistent, recorded) {
            self.perform(&change, None)?;
            return Ok(Some((Reply::Done, None)));
        }
        self.park_intent(conn, req_id, key, change.clone(), Some(change), replaces);
        Ok(None)
    }

    /// A change made at once (no intent) to `file` while a close of one of
    /// its persistent handles is pending (sequence `seq`): if that commit
    /// fails the handle comes back, so the change must not have been made
    /// under it. The request waits and runs again from the start once the
    /// close's commit is resolved. (A change bracketed by an intent needs
    /// no wait: its intent builds on the close's commit and fails with it.)
    fn wait_for_close(
        &mut self,
        seq: u64,
        file: FileId,
        conn: ConnId,
        req_id: u64,
        req: Request,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        self.wait_behind(Some(seq), file, conn, req_id, req)
    }

    /// A change of `file` by path or name in flight under an intent, which
    /// a change made at once must not overtake: its intent committing or
    /// its system call still to run (`parked`), or a rename made whose
    /// completion is still committing (`renames_completing`). Recovery
    /// judges such a change by which name holds the file; a change made
    /// at once meanwhile would make it misjudge — a made rename moved back
    /// taken for one never made, and redone by its replay over the
    /// acknowledged move. `Some(None)`: wait for the parked change's
    /// `finish_parked` (or its abandonment), which runs the file's waits
    /// again; `Some(Some(seq))`: wait for commit `seq`.
    fn change_in_flight(&self, file: FileId) -> Option<Option<u64>> {
        if self
            .parked
            .values()
            .any(|p| p.change.as_ref().and_then(super::durable::intent_file) == Some(file))
        {
            return Some(None);
        }
        let committed = self.pipe.committed();
        self.renames_completing
            .iter()
            .filter(|(s, f, _)| *s > committed && *f == file)
            .map(|&(s, _, _)| s)
            .max()
            .map(Some)
    }

    /// Parks request `req_id` on `file` until commit `seq` is resolved
    /// (none: until something else runs the file's waits again), then
    /// runs it again from the start.
    fn wait_behind(
        &mut self,
        seq: Option<u64>,
        file: FileId,
        conn: ConnId,
        req_id: u64,
        req: Request,
    ) -> Result<Option<(Reply, Option<ResumeKey>)>, WireError> {
        self.wait_limit()?;
        if let Some(seq) = seq {
            self.wait_for_commit(seq, file);
        }
        self.waiting_changes.push((file, conn, req_id, req));
        Ok(None)
    }

    /// Records `change` as an intent in this batch and parks request `req_id`
    /// until the intent is durable (`finish_parked`); `then` is the rename,
    /// remove or size change to perform then (none: a truncating open);
    /// `replaces`, the file a rename with replace takes the name of.
    pub(super) fn park_intent(
        &mut self,
        conn: ConnId,
        req_id: u64,
        key: ResumeKey,
        change: IntentChange,
        then: Option<IntentChange>,
        replaces: Option<FileId>,
    ) {
        let content = match &change {
            IntentChange::TruncatingOpen { record, .. } => Some(record.file),
            IntentChange::SetSize { key, .. } => self.handles.get(key).map(|h| h.rec.file),
            IntentChange::Rename { .. } | IntentChange::Remove { .. } => None,
        };
        if let Some(f) = content {
            self.content_change_begin(f);
        }
        let intent = Intent {
            id: IntentId(uuid::Uuid::new_v4()),
            change,
            recorded_ms: now_ms(),
        };
        self.stats.intents += 1;
        self.batch.notify.push(intent.id);
        let writer = self.conns.get(&conn).map(|c| c.writer.clone());
        self.parked.insert(
            intent.id,
            Parked {
                writer,
                id: Some(req_id),
                seq: self.batch.seq(),
                key,
                change: then,
                content,
                replaces,
            },
        );
        self.batch.push(StoreOp::PutIntent(Box::new(intent)));
    }

    /// Brackets the delete-on-close of a file whose last persistent handle
    /// is going away: the intent commits with the handle's deletion, the
    /// unlink follows once both are durable (`finish_parked`), then the
    /// intent goes. A CLOSE waiting for it is answered after that.
    pub(super) fn park_unlink(&mut self, gone: &Handle) {
        let change = IntentChange::Remove {
            path: gone.rec.path.clone(),
            file: gone.rec.file,
            record: None,
            kernel_handle: gone.rec.kernel_handle.clone(),
            on_close: true,
        };
        let intent = Intent {
            id: IntentId(uuid::Uuid::new_v4()),
            change: change.clone(),
            recorded_ms: now_ms(),
        };
        self.stats.intents += 1;
        self.batch.notify.push(intent.id);
        self.parked.insert(
            intent.id,
            Parked {
                writer: None,
                id: None,
                seq: self.batch.seq(),
                key: gone.rec.key,
                change: Some(change),
                content: None,
                replaces: None,
            },
        );
        self.last_unlink = Some(intent.id);
        self.batch.push(StoreOp::PutIntent(Box::new(intent)));
    }

    /// Does a rename, remove or size change now, updating the handles and
    /// recording the reply in this batch (so in the commit that also drops
    /// the intent). With `intent` (the change's intent, whose end a commit
    /// records), what it changed on disk is fsync'd before that commit, and
    /// a size change marks the file with the intent's id first.
    pub(super) fn perform(
        &mut self,
        change: &IntentChange,
        intent: Option<IntentId>,
    ) -> Result<(), WireError> {
        let durable = intent.is_some();
        let fs = &*self.fs;
        match change {
            IntentChange::Rename {
                key,
                from,
                to,
                file,
                replace,
                record,
                kernel_handle,
            } => {
                let dirs = self.dirs_to_sync(durable, &[from, to])?;
                fs.rename(from, to, *file, kernel_handle.as_ref(), *replace)?;
                self.batch.sync_changed(dirs);
                // The path is the file's: every handle that named it by the
                // old path follows (the renaming one whatever it named),
                // and whether it passes a link is the new path's.
                let keys: Vec<ResumeKey> = self.by_file.get(file).cloned().unwrap_or_default();
                let through_link = fs.path_has_link(to);
                for k in keys {
                    if let Some(h) = self.handles.get_mut(&k) {
                        if k == *key || h.rec.path == *from {
                            h.rec.path = to.clone();
                            h.rec.through_link = through_link;
                            h.link_known = true;
                            if h.rec.durability.is_persistent() {
                                self.batch.push(StoreOp::PutHandle(Box::new(h.rec.clone())));
                            }
                        }
                    }
                }
                if let Some(r) = record {
                    self.remember_reply(r.clone());
                }
                Ok(())
            }
            IntentChange::Remove {
                path,
                file,
                record,
                kernel_handle,
                ..
            } => {
                let dirs = self.dirs_to_sync(durable, &[path])?;
                fs.remove(path, *file, kernel_handle.as_ref())?;
                self.batch.sync_changed(dirs);
                if let Some(r) = record {
                    self.remember_reply(r.clone());
                }
                Ok(())
            }
            IntentChange::SetSize {
                key,
                kernel_handle,
                size,
                record,
                ..
            } => {
                let path = self.handles.get(key).map(|h| &h.rec.path);
                let done = fs
                    .set_size_by_handle(kernel_handle, path, *size)
                    .map_err(|e| {
                        // A size the filesystem cannot hold is the client's
                        // bad parameter; no space is disk full.
                        let code = match e.raw_os_error() {
                            Some(libc::EFBIG) | Some(libc::EINVAL) => ErrorCode::BadFrame,
                            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::DiskFull,
                            _ => ErrorCode::Internal,
                        };
                        err(code, format!("set end of file to {size}: {e}"))
                    });
                let fd = done?;
                if let Some(id) = intent {
                    let path = self.handles.get(key).map(|h| h.rec.path.clone());
                    self.mark_change(&fd, id, kernel_handle, path);
                    self.batch.sync_fd(fd);
                }
                if let Some(r) = record {
                    self.remember_reply(r.clone());
                }
                Ok(())
            }
            IntentChange::TruncatingOpen { .. } => {
                Err(err(ErrorCode::Internal, "not a rename or remove"))
            }
        }
    }
}

impl Engine {
    /// What makes the names of `paths` durable before the commit that
    /// records their change (nothing unless `durable`): their directories,
    /// opened before the change, or the whole filesystem where one cannot
    /// be opened ([`ToSync::add_dir_of`]). A directory gone fails the
    /// change, not made yet.
    pub(super) fn dirs_to_sync(
        &self,
        durable: bool,
        paths: &[&RelPath],
    ) -> Result<ToSync, WireError> {
        let mut sync = ToSync::default();
        if !durable {
            return Ok(sync);
        }
        for p in paths {
            sync.add_dir_of(&*self.fs, p).map_err(|e| {
                let mut w = self.fs.map_errno(&e, p);
                w.message = format!(
                    "{p}: its directory cannot be opened to be synced: {}",
                    w.message
                );
                w
            })?;
        }
        Ok(sync)
    }

    /// Marks a file whose size change of intent `id` is made (after the
    /// `ftruncate`, before the fsync that precedes the completion commit):
    /// recovery's proof that the change happened, which the file's stamp
    /// cannot give (a local write while filterd is down moves it too). The
    /// mark goes once the completion is resolved (`marks_after`). Without
    /// extended attributes the file stays unmarked, and recovery reports
    /// the outcome unknown rather than claim it.
    pub(super) fn mark_change(
        &mut self,
        fd: &OwnedFd,
        id: IntentId,
        kh: &KernelHandle,
        path: Option<RelPath>,
    ) {
        match self.fs.mark_change(fd.as_fd(), id) {
            Ok(()) => self
                .marks_after
                .push((self.batch.seq(), kh.clone(), path, id)),
            Err(e) => debug!(intent = %id.0, error = %e, "size change not marked"),
        }
    }
}

/// Whether `p` is directory `dir` or lies below it, `dir` lying at `place`
/// (links on the way resolved, see `Engine::lies_below`).
fn at_or_below(p: &RelPath, dir: &RelPath, place: Option<&Path>) -> bool {
    let by_place = place.filter(|pl| *pl != Path::new(dir.as_str()));
    p == dir || is_below(p, dir) || by_place.is_some_and(|pl| Path::new(p.as_str()).starts_with(pl))
}

/// Whether a change must be bracketed by an intent: on a persistent
/// handle, or with a recorded reply (it must survive a crash); otherwise it
/// is made at once.
fn needs_intent(persistent: bool, recorded: bool) -> bool {
    persistent || recorded
}
