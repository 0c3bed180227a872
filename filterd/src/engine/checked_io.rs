//! Checked I/O in flight (issue 13, F3): a read or write that a `CheckIo`
//! let through is counted here from that answer until its frontend's
//! `IoDone`, and a LOCK of another handle whose range would conflict with
//! it waits (parked with the other waiting requests, never blocking this
//! thread) until it is done. filterd is still not in the data path: this
//! only orders a lock grant after the pwrite it could not stop otherwise.
//! A lock waits at most the break timeout for one I/O; past it, the
//! frontend holding that I/O is treated as failed, as for a lock hint it
//! does not acknowledge: dropped (its durable handles detach), never
//! bypassed while attached.

use libfilter::locks::LockRange;

use super::*;

/// Most checked reads and writes one connection may have in flight: a
/// frontend that never says `IoDone` cannot grow the table without bound.
pub(super) const MAX_CHECKED_IO_PER_CONN: usize = 4096;

/// Whether checked I/O `io` holds back a LOCK of `key` (of `protocol`)
/// with `ops`: another handle's, not exempt as its own protocol's
/// advisory I/O, over a range a lock in `ops` takes — any lock over a
/// write, an exclusive one over a read.
fn io_holds_back(io: &CheckedIo, key: ResumeKey, protocol: &Protocol, ops: &[LockOp]) -> bool {
    io.key != key
        && (!io.advisory || io.protocol != *protocol)
        && ops
            .iter()
            .any(|o| !o.unlock && o.range.overlaps(io.range) && (io.write || o.exclusive))
}

/// One read or write a `CheckIo` allowed, not yet done.
pub(super) struct CheckedIo {
    /// The connection whose frontend does it, and the `CheckIo`'s frame id.
    conn: ConnId,
    check: u64,
    /// The handle it goes through and that handle's protocol.
    key: ResumeKey,
    protocol: Protocol,
    range: LockRange,
    write: bool,
    /// Checked with `own_protocol_advisory`: locks of its own protocol's
    /// handles do not hold it back, so it holds none of them back either.
    advisory: bool,
    /// Set when a lock first waits for it (monotonic ms): when it is not
    /// done by then, its frontend is dropped.
    deadline: Option<u64>,
    /// The commit its answer waits for, when one was pending: if that
    /// commit fails the answer is a refusal, and a frontend told "refused"
    /// does no I/O and sends no `IoDone` — the entry goes with the commit.
    until: Option<u64>,
}

/// Checked I/O in flight, by file.
#[derive(Default)]
pub(super) struct CheckedIoTable {
    by_file: HashMap<FileId, Vec<CheckedIo>>,
    /// (connection, CheckIo id) → file, for `IoDone`.
    index: HashMap<(ConnId, u64), FileId>,
    per_conn: HashMap<ConnId, usize>,
}

impl CheckedIoTable {
    /// The earliest deadline of an I/O some lock waits for.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.by_file
            .values()
            .flatten()
            .filter_map(|io| io.deadline)
            .min()
    }
}

impl Engine {
    /// A `CheckIo` of `conn` (frame `check`) passed: counts its I/O as in
    /// flight. Refused when the connection has too many already.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn checked_io_begin(
        &mut self,
        conn: ConnId,
        check: u64,
        key: ResumeKey,
        file: FileId,
        range: LockRange,
        write: bool,
        advisory: bool,
    ) -> Result<(), WireError> {
        let t = &mut self.checked_io;
        if t.per_conn
            .get(&conn)
            .is_some_and(|n| *n >= MAX_CHECKED_IO_PER_CONN)
        {
            return Err(err(
                ErrorCode::LimitReached,
                format!("more than {MAX_CHECKED_IO_PER_CONN} checked reads and writes in flight without IoDone"),
            ));
        }
        let Some(protocol) = self.handles.get(&key).map(|h| h.rec.protocol.clone()) else {
            return Ok(());
        };
        if t.index.contains_key(&(conn, check)) {
            // An id names one I/O until its IoDone: taking it again would
            // drop the first one's entry, and with it the deadline a lock
            // waiting on that I/O counts on.
            return Err(err(
                ErrorCode::BadFrame,
                format!("check id {check} is still in flight (no IoDone yet)"),
            ));
        }
        let until = self.request_waits_for();
        let t = &mut self.checked_io;
        t.index.insert((conn, check), file);
        *t.per_conn.entry(conn).or_default() += 1;
        t.by_file.entry(file).or_default().push(CheckedIo {
            conn,
            check,
            key,
            protocol,
            range,
            write,
            advisory,
            deadline: None,
            until,
        });
        Ok(())
    }

    /// The commits in `abandoned` failed: the checks whose answers waited
    /// for one of them were refused, so no `IoDone` will come for them.
    /// Forgotten, and locks waiting for them run again (review of session
    /// 27: one left behind held every later conflicting lock to the break
    /// timeout, which then dropped the frontend).
    pub(super) fn checked_io_abandoned(&mut self, abandoned: &std::collections::BTreeSet<u64>) {
        let t = &mut self.checked_io;
        let gone: Vec<(ConnId, u64, FileId)> = t
            .by_file
            .iter()
            .flat_map(|(f, v)| v.iter().map(move |io| (f, io)))
            .filter(|(_, io)| io.until.is_some_and(|s| abandoned.contains(&s)))
            .map(|(f, io)| (io.conn, io.check, *f))
            .collect();
        for (conn, check, file) in gone {
            t.index.remove(&(conn, check));
            Self::remove_io(t, conn, check, file);
            self.retry_files.insert(file);
        }
    }

    fn remove_io(t: &mut CheckedIoTable, conn: ConnId, check: u64, file: FileId) -> bool {
        let mut waited = false;
        if let Some(v) = t.by_file.get_mut(&file) {
            if let Some(i) = v.iter().position(|io| io.conn == conn && io.check == check) {
                let io = v.swap_remove(i);
                waited = io.deadline.is_some();
                if let Some(n) = t.per_conn.get_mut(&conn) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        t.per_conn.remove(&conn);
                    }
                }
            }
            if v.is_empty() {
                t.by_file.remove(&file);
            }
        }
        waited
    }

    /// `IoDone`: the I/O `check` of `conn` is done; a lock waiting for it
    /// runs again. A `CheckIo` still parked (its caller gave up waiting
    /// for the answer) is withdrawn, so it never registers an I/O nobody
    /// will report done. Another unknown id is ignored.
    pub(super) fn checked_io_done(&mut self, conn: ConnId, check: u64) {
        // Its answer, if still parked behind a commit, is not run again
        // should that commit fail (`rebuild`).
        self.views.gave_up(conn, check);
        let t = &mut self.checked_io;
        let Some(file) = t.index.remove(&(conn, check)) else {
            let parked = self.waiting_changes.iter().position(|(_, c, id, r)| {
                *c == conn && *id == check && matches!(r, Request::CheckIo { .. })
            });
            if let Some(i) = parked {
                self.waiting_changes.remove(i);
                if let Some(w) = self.conns.get(&conn).map(|c| c.writer.clone()) {
                    let e = err(ErrorCode::Busy, "withdrawn by its IoDone");
                    self.answer(conn, &w, check, Err(e));
                }
            }
            return;
        };
        if Self::remove_io(t, conn, check, file) {
            self.retry_files.insert(file);
        }
    }

    /// A connection is gone: its checked I/O is forgotten (as its unchecked
    /// I/O is: docs/ARCHITECTURE.md, "I/O gate"), and locks waiting for it
    /// run again.
    pub(super) fn checked_io_conn_gone(&mut self, conn: ConnId) {
        // Its parked requests go at the next retry of their files, and
        // `CheckIo`s parked behind its locks run again.
        for (f, c, _, _) in &self.waiting_changes {
            if *c == conn {
                self.retry_files.insert(*f);
            }
        }
        let t = &mut self.checked_io;
        if t.per_conn.remove(&conn).is_none() {
            return;
        }
        t.index.retain(|(c, _), _| *c != conn);
        let retry = &mut self.retry_files;
        t.by_file.retain(|file, v| {
            let before = v.len();
            v.retain(|io| io.conn != conn);
            if v.len() != before {
                retry.insert(*file);
            }
            !v.is_empty()
        });
    }

    /// Whether a LOCK of `key` must wait for checked I/O of other handles
    /// in flight on its file: some lock in `ops` overlaps a write, or an
    /// exclusive one overlaps a read. Starts the deadline of each I/O it
    /// waits for. Returns the file when it must wait.
    pub(super) fn lock_waits_for_io(&mut self, key: ResumeKey, ops: &[LockOp]) -> Option<FileId> {
        let h = self.handles.get(&key)?;
        let (file, protocol) = (h.rec.file, &h.rec.protocol);
        let ios = self.checked_io.by_file.get_mut(&file)?;
        let deadline = mono_ms() + self.cfg.break_timeout_ms;
        let mut wait = false;
        for io in ios.iter_mut() {
            if io_holds_back(io, key, protocol, ops) {
                wait = true;
                io.deadline.get_or_insert(deadline);
            }
        }
        wait.then_some(file)
    }

    /// Whether a LOCK of `key` would wait for checked I/O in flight (see
    /// [`Self::lock_waits_for_io`], which starts their deadlines): the
    /// file, if so.
    pub(super) fn lock_conflicts_with_io(&self, key: ResumeKey, ops: &[LockOp]) -> Option<FileId> {
        let h = self.handles.get(&key)?;
        let (file, protocol) = (h.rec.file, &h.rec.protocol);
        self.checked_io
            .by_file
            .get(&file)?
            .iter()
            .any(|io| io_holds_back(io, key, protocol, ops))
            .then_some(file)
    }

    /// Whether a size change of `file` must wait for checked writes of it
    /// in flight (allowed before the file's writers were told of the
    /// change; see `hint_size_change`). Starts the deadline of each.
    pub(super) fn size_change_waits_for_io(
        &mut self,
        file: FileId,
        deadline: u64,
    ) -> Option<FileId> {
        let ios = self.checked_io.by_file.get_mut(&file)?;
        let mut wait = false;
        for io in ios.iter_mut().filter(|io| io.write) {
            wait = true;
            io.deadline.get_or_insert(deadline);
        }
        wait.then_some(file)
    }

    /// Whether a LOCK or a size change waits on `file` for checked I/O (a
    /// new `CheckIo` of the file waits behind it, so a stream of I/O cannot
    /// starve it).
    pub(super) fn lock_waiting_on(&self, file: FileId) -> bool {
        self.waiting_changes.iter().any(|(f, c, _, r)| {
            *f == file
                && matches!(r, Request::Lock { .. } | Request::SetEndOfFile { .. })
                && self.conns.contains_key(c)
        })
    }

    /// The frontends holding checked I/O a lock waited on past its
    /// deadline: dropped, so the lock proceeds.
    pub(super) fn checked_io_overdue(&mut self, now: u64) {
        let late: HashSet<ConnId> = self
            .checked_io
            .by_file
            .values()
            .flatten()
            .filter(|io| io.deadline.is_some_and(|d| d <= now))
            .map(|io| io.conn)
            .collect();
        for c in late {
            self.drop_frontend(
                c,
                "a checked read or write a lock waited on was not done in time",
            );
        }
    }
}
