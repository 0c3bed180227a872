//! Recorded replies (exactly once for op ids and session slots): scopes,
//! recording, lookup.

use std::collections::BTreeSet;

use super::*;

/// One scope's recorded replies: by op id (lookups, listings: read
/// through `Deref`) and in the order they were recorded
/// ([`ReplayRecord::age`]), which eviction follows. Changed only through
/// its methods, which keep the two in step.
#[derive(Debug, Default)]
pub(super) struct ScopeReplies {
    by_op: BTreeMap<u64, ReplayRecord>,
    /// Every record's age, oldest first.
    by_age: BTreeSet<(u64, u64)>,
}

impl ScopeReplies {
    /// Holds `record` as op `op_id`'s, at the place its `seq` says.
    pub(super) fn insert(&mut self, op_id: u64, record: ReplayRecord) {
        let age = record.age(op_id);
        if let Some(old) = self.by_op.insert(op_id, record) {
            self.by_age.remove(&old.age(op_id));
        }
        self.by_age.insert(age);
    }

    pub(super) fn remove(&mut self, op_id: u64) -> Option<ReplayRecord> {
        let old = self.by_op.remove(&op_id)?;
        self.by_age.remove(&old.age(op_id));
        Some(old)
    }

    /// The `seq` a record recorded now takes: one past the newest's.
    fn next_seq(&self) -> u64 {
        self.by_age
            .last()
            .map_or(1, |&(seq, _)| seq.saturating_add(1))
    }

    /// Drops the oldest recorded, and says its op id.
    fn pop_oldest(&mut self) -> Option<u64> {
        let (_, op_id) = self.by_age.pop_first()?;
        self.by_op.remove(&op_id);
        Some(op_id)
    }
}

impl std::ops::Deref for ScopeReplies {
    type Target = BTreeMap<u64, ReplayRecord>;
    fn deref(&self) -> &Self::Target {
        &self.by_op
    }
}

impl FromIterator<(u64, ReplayRecord)> for ScopeReplies {
    fn from_iter<I: IntoIterator<Item = (u64, ReplayRecord)>>(records: I) -> Self {
        let mut s = ScopeReplies::default();
        for (op_id, record) in records {
            s.insert(op_id, record);
        }
        s
    }
}

impl Engine {
    pub(super) fn own_record(
        &self,
        conn: ConnId,
        protocol: &Protocol,
        mut r: RecordSpec,
    ) -> Result<RecordSpec, WireError> {
        check_reply(&r.reply)?;
        r.scope = self.own_scope(conn, protocol, r.scope)?;
        r.keep = r.keep.clamp(1, MAX_KEEP);
        Ok(r)
    }

    /// A frontend's record writes and deletes, each checked and mapped
    /// into the filter's scopes ([`Self::own_record`], [`Self::own_scope`]):
    /// all or nothing.
    #[allow(clippy::type_complexity)]
    pub(super) fn own_records(
        &self,
        conn: ConnId,
        protocol: &Protocol,
        put: Vec<RecordSpec>,
        delete: Vec<(ReplayScope, u64)>,
    ) -> Result<(Vec<RecordSpec>, Vec<(ReplayScope, u64)>), WireError> {
        let put = put
            .into_iter()
            .map(|r| self.own_record(conn, protocol, r))
            .collect::<Result<_, _>>()?;
        let delete = delete
            .into_iter()
            .map(|(s, op)| self.own_scope(conn, protocol, s).map(|s| (s, op)))
            .collect::<Result<_, _>>()?;
        Ok((put, delete))
    }

    /// Deletes, then writes, checked records in the current batch
    /// (`WriteRecords`, and the records a `Close` carries).
    pub(super) fn write_records(&mut self, put: Vec<RecordSpec>, delete: Vec<(ReplayScope, u64)>) {
        for (scope, op_id) in delete {
            let persistent = self.scope_is_persistent(&scope);
            if let Some(recs) = self.replays.get_mut(&scope) {
                if recs.remove(op_id).is_some() && persistent {
                    self.batch.push(StoreOp::DeleteReplay { scope, op_id });
                }
            }
        }
        for r in put {
            self.remember_reply(r);
        }
    }

    pub(super) fn remember_reply(&mut self, r: RecordSpec) {
        let record = ReplayRecord {
            reply: r.reply,
            recorded_ms: now_ms(),
            seq: None,
        };
        self.put_reply(r.scope, r.op_id, record, r.keep);
    }

    /// Records a reply in memory and, for a persistent scope, in the
    /// store, keeping the scope's newest `keep` by recording order: the
    /// record takes the scope's next `seq` (put again, it moves to the
    /// newest), and the oldest recorded go, whatever their op ids —
    /// not the lowest op ids: an smbl/1 client chooses its op ids in no
    /// order, and a low one recorded after 1024 high ones went in its own
    /// commit, so a replay of it ran again (review rvspec). Memory holds
    /// every persistent scope whole (loaded at start, put back from the
    /// store when a commit fails), so the store is told just the op ids
    /// memory dropped ([`ReplayTrim::Evicted`]): a key per record
    /// dropped, where counting the scope's keys on every put cost a full
    /// scope's 4096 keys on the committer thread (review rvcx).
    fn put_reply(&mut self, scope: ReplayScope, op_id: u64, mut record: ReplayRecord, keep: u32) {
        let recs = self.replays.entry(scope.clone()).or_default();
        record.seq = Some(recs.next_seq());
        recs.insert(op_id, record.clone());
        let keep = usize::try_from(keep).unwrap_or(usize::MAX).max(1);
        let mut dropped = Vec::new();
        while recs.len() > keep {
            dropped.extend(recs.pop_oldest());
        }
        if self.scope_is_persistent(&scope) {
            self.batch.push(StoreOp::PutReplay {
                scope,
                op_id,
                record,
                trim: ReplayTrim::Evicted(dropped),
            });
        }
        self.stats.replies_recorded += 1;
    }

    /// Maps a frontend's replay scope into the filter's: a handle must be
    /// attached to this connection; a session is namespaced by protocol.
    pub(super) fn own_scope(
        &self,
        conn: ConnId,
        protocol: &Protocol,
        scope: ReplayScope,
    ) -> Result<ReplayScope, WireError> {
        match scope {
            ReplayScope::Handle(k) => {
                self.attached_to(conn, k)?;
                Ok(ReplayScope::Handle(k))
            }
            ReplayScope::Session(name) => ScopeName::new(format!("{protocol}/{}", name.as_str()))
                .map(ReplayScope::Session)
                .map_err(|e| err(ErrorCode::BadFrame, e.to_string())),
        }
    }

    /// Whether a scope's records must be on stable storage.
    pub(super) fn scope_is_persistent(&self, scope: &ReplayScope) -> bool {
        match scope {
            ReplayScope::Handle(k) => self
                .handles
                .get(k)
                .is_some_and(|h| h.rec.durability.is_persistent()),
            ReplayScope::Session(_) => true,
        }
    }

    pub(super) fn record_reply(
        &mut self,
        scope: ReplayScope,
        op_id: u64,
        reply: String,
        keep: u32,
    ) -> Result<Reply, WireError> {
        check_reply(&reply)?;
        let keep = keep.clamp(1, MAX_KEEP);
        let record = ReplayRecord {
            reply,
            recorded_ms: now_ms(),
            seq: None,
        };
        self.put_reply(scope, op_id, record, keep);
        Ok(Reply::Done)
    }

    /// Counts `count` re-sends a frontend answered itself
    /// ([`Request::ReplaysAnswered`](libfilter::proto::Request)). Only
    /// from a connection granted `FEATURE_REPLAY_REPORTS` (one without it
    /// has its lookups counted: its report would count twice), and only a
    /// count from 1 to `MAX_REPLAYS_ANSWERED`: before, any frontend could
    /// add any count (`u64::MAX` pinned the statistic there for good).
    /// Refused, nothing changes.
    pub(super) fn replays_answered(&mut self, conn: ConnId, count: u64) -> Result<(), WireError> {
        if !self.granted(conn, proto::FEATURE_REPLAY_REPORTS) {
            return Err(err(
                ErrorCode::NotPermitted,
                "replays_answered: the hello was not granted replay reports (2048)",
            ));
        }
        if !(1..=proto::MAX_REPLAYS_ANSWERED).contains(&count) {
            return Err(err(
                ErrorCode::BadFrame,
                format!(
                    "replays_answered: count {count}, not 1 to {}",
                    proto::MAX_REPLAYS_ANSWERED
                ),
            ));
        }
        self.stats.replays_detected = self.stats.replays_detected.saturating_add(count);
        Ok(())
    }

    /// The recorded reply of `op_id`; an error if recovery recorded its
    /// outcome as unknown ([`OUTCOME_UNKNOWN`]): the re-sent request is
    /// neither told it succeeded nor run again over what came after it.
    /// A record found is a replay detected when `counted` (the frontend
    /// does not report its replays itself, `FEATURE_REPLAY_REPORTS`).
    pub(super) fn lookup_reply(
        &mut self,
        scope: &ReplayScope,
        op_id: u64,
        counted: bool,
    ) -> Result<Reply, WireError> {
        // Its place in the scope is not the frontend's business: the
        // reply goes as it did before `seq`.
        let record = self
            .replays
            .get(scope)
            .and_then(|m| m.get(&op_id))
            .map(|r| ReplayRecord {
                seq: None,
                ..r.clone()
            });
        if counted && record.is_some() {
            self.stats.replays_detected += 1;
        }
        if record.as_ref().is_some_and(|r| r.reply == OUTCOME_UNKNOWN) {
            return Err(err(
                ErrorCode::Internal,
                format!(
                    "op {op_id}: outcome unknown — filterd stopped during it and the file \
                     changed meanwhile; it is not run again"
                ),
            ));
        }
        Ok(Reply::Recorded { record })
    }
}

/// A reply a frontend may record: bounded, and not recovery's own
/// [`OUTCOME_UNKNOWN`].
fn check_reply(reply: &str) -> Result<(), WireError> {
    if reply.len() > MAX_REPLY_BYTES {
        return Err(err(
            ErrorCode::BadFrame,
            format!("recorded reply exceeds {MAX_REPLY_BYTES} bytes"),
        ));
    }
    if reply == OUTCOME_UNKNOWN {
        return Err(err(ErrorCode::BadFrame, "reserved reply"));
    }
    Ok(())
}
