//! The engine's transactions, driven without threads, daemon sockets, a
//! real store or real files: requests go straight to `run_request`, the
//! test plays the committer against an in-memory [`StateStore`] and
//! decides whether each commit succeeds, and every filesystem effect lands
//! in an in-memory filesystem ([`MemFs`]) that logs it beside the commits.
//! The property at the heart of invariant 1: a commit that fails leaves
//! the engine's state, and the filesystem, exactly as they were before the
//! requests that rode on it. And invariant 3's order: intent commit, then
//! the filesystem change, then the commit that completes it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use libfilter::locks::{LockOp, LockRange};
use libfilter::model::*;
use libfilter::proto::{Hello, OpenRequest, Request, Role};
use libfilter::store::{replay_key, RawReplay, ReplayTrim, StateStore, StoreError, StoreOp};
use proptest::prelude::*;

use super::fs::Fs;
use super::memfs::{Logged, MemFs};
use super::*;
use crate::committer::{CommitCounters, Pipeline};
use crate::outbox::ConnWriter;

/// The table in memory; `fail` makes the next commits fail.
#[derive(Default)]
struct MemStore {
    inner: Mutex<Mem>,
}

#[derive(Default, Clone)]
struct Mem {
    handles: BTreeMap<ResumeKey, HandleRecord>,
    replays: BTreeMap<Vec<u8>, ReplayRecord>,
    intents: BTreeMap<IntentId, Intent>,
    seq: u64,
    fail: bool,
    /// The lease of a shared table may have run out: `owner_check` fails.
    lost: bool,
    /// Replay puts that had the store count their scope
    /// (`ReplayTrim::Keep`).
    counted_scopes: u64,
    /// `commit_step_ops` (0: no bound).
    step_ops: usize,
}

impl StateStore for MemStore {
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn claim(&self) -> Result<(u64, bool), StoreError> {
        Ok((1, true))
    }
    fn owner_check(&self) -> Result<(), StoreError> {
        match self.inner.lock().unwrap().lost {
            true => Err(StoreError::LeaseLost { fence: 1 }),
            false => Ok(()),
        }
    }
    fn commit(&self, batches: &[&[StoreOp]]) -> Result<u64, StoreError> {
        let mut m = self.inner.lock().unwrap();
        if m.fail {
            return Err(StoreError::MapFull);
        }
        for op in batches.iter().flat_map(|b| b.iter()) {
            match op {
                StoreOp::PutHandle(r) | StoreOp::DetachHandle(r) => {
                    m.handles.insert(r.key, (**r).clone());
                }
                StoreOp::DeleteHandle(r) => {
                    m.handles.remove(&r.key);
                    let prefix = libfilter::store::replay_prefix(&ReplayScope::Handle(r.key));
                    m.replays.retain(|k, _| !k.starts_with(&prefix));
                }
                StoreOp::PutReplay {
                    scope,
                    op_id,
                    record,
                    trim,
                } => {
                    let key = replay_key(scope, *op_id);
                    let (record, dropped) = match trim {
                        ReplayTrim::Evicted(dropped) => (record.clone(), dropped.clone()),
                        ReplayTrim::Keep(keep) => {
                            m.counted_scopes += 1;
                            let prefix = libfilter::store::replay_prefix(scope);
                            let held = m.replays.get(&key).cloned();
                            let others = m
                                .replays
                                .range(prefix.clone()..)
                                .take_while(|(k, _)| k.starts_with(&prefix))
                                .filter(|(k, _)| **k != key)
                                .filter_map(|(k, r)| {
                                    libfilter::store::parse_replay_key(k).map(|(_, op)| r.age(op))
                                })
                                .collect();
                            let (record, dropped) =
                                libfilter::store::counted_trim(record, held, others, *keep);
                            (record, dropped)
                        }
                    };
                    m.replays.insert(key, record);
                    for op in dropped {
                        m.replays.remove(&replay_key(scope, op));
                    }
                }
                StoreOp::DeleteReplay { scope, op_id } => {
                    m.replays.remove(&replay_key(scope, *op_id));
                }
                StoreOp::DeleteReplayScope(scope) => {
                    let prefix = libfilter::store::replay_prefix(scope);
                    m.replays.retain(|k, _| !k.starts_with(&prefix));
                }
                StoreOp::PutIntent(i) => {
                    m.intents.insert(i.id, (**i).clone());
                }
                StoreOp::DeleteIntent(id) => {
                    m.intents.remove(id);
                }
            }
        }
        m.seq += 1;
        Ok(m.seq)
    }
    fn commit_step_ops(&self) -> usize {
        match self.inner.lock().unwrap().step_ops {
            0 => usize::MAX,
            n => n,
        }
    }
    fn handle(&self, key: ResumeKey) -> Result<Option<HandleRecord>, StoreError> {
        Ok(self.inner.lock().unwrap().handles.get(&key).cloned())
    }
    fn all_handles(&self) -> Result<Vec<Result<HandleRecord, StoreError>>, StoreError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .handles
            .values()
            .cloned()
            .map(Ok)
            .collect())
    }
    fn scope_records(&self, scope: &ReplayScope) -> Result<Vec<(u64, ReplayRecord)>, StoreError> {
        let prefix = libfilter::store::replay_prefix(scope);
        Ok(self
            .inner
            .lock()
            .unwrap()
            .replays
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, v)| {
                libfilter::store::parse_replay_key(k).map(|(_, op)| (op, v.clone()))
            })
            .collect())
    }
    fn all_replays(&self) -> Result<Vec<RawReplay>, StoreError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .replays
            .iter()
            .map(|(k, v)| (k.clone(), Ok(v.clone())))
            .collect())
    }
    fn all_intents(&self) -> Result<Vec<Result<Intent, StoreError>>, StoreError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .intents
            .values()
            .cloned()
            .map(Ok)
            .collect())
    }
    fn clean_shutdown(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

struct Harness {
    engine: Engine,
    pipe: Arc<Pipeline>,
    store: Arc<MemStore>,
    conn: ConnId,
    writer: Arc<ConnWriter>,
    /// The frontend's end of the connection (replies land here).
    peer: OwnedFd,
    /// The filesystem the engine sees.
    fs: MemFs,
    /// The last request id used.
    last_id: u64,
    /// Every reply received, by request id.
    replies: BTreeMap<u64, Result<libfilter::proto::Reply, WireError>>,
    /// Every event received, in order.
    events: Vec<libfilter::proto::Event>,
    /// Every frame received, in order.
    arrived: Vec<Arrived>,
    /// The groups the last failed commit failed (what `CommitFailed`
    /// named).
    last_failed: Vec<u64>,
}

/// A frame that reached the frontend.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Arrived {
    /// The reply to this request.
    Reply(u64),
    /// The event at this index of `Harness::events`.
    Event(usize),
}

/// A frontend (instance `smb-t`) says hello on a new connection `conn`:
/// its writer, and the frontend's end of the socket.
fn hello(engine: &mut Engine, conn: ConnId, protocol: &str) -> (Arc<ConnWriter>, OwnedFd) {
    hello_as(engine, conn, protocol, None)
}

/// [`hello`] of frontend process `incarnation` (None: filterd draws one).
fn hello_as(
    engine: &mut Engine,
    conn: ConnId,
    protocol: &str,
    incarnation: Option<u64>,
) -> (Arc<ConnWriter>, OwnedFd) {
    hello_of(engine, conn, protocol, "smb-t", incarnation)
}

/// [`hello_as`] of frontend instance `instance`.
fn hello_of(
    engine: &mut Engine,
    conn: ConnId,
    protocol: &str,
    instance: &str,
    incarnation: Option<u64>,
) -> (Arc<ConnWriter>, OwnedFd) {
    let (writer, peer) = ConnWriter::pair_for_test();
    engine
        .on_hello(
            conn,
            Hello {
                version: libfilter::proto::PROTO_VERSION,
                features: 0,
                role: Role::Frontend {
                    protocol: Protocol::new(protocol).unwrap(),
                    instance: InstanceName::new(instance).unwrap(),
                    incarnation,
                },
            },
            Peer {
                pid: 1,
                uid: 0,
                gid: 0,
            },
            writer.clone(),
        )
        .unwrap();
    (writer, peer)
}

fn config() -> Config {
    Config {
        max_durable_timeout_ms: 300_000,
        root_display: "test".into(),
        state_display: "memory".into(),
        store_display: "memory".into(),
        fanotify: false,
        break_timeout_ms: 1000,
        max_handles_per_client: 1000,
        max_handles_per_frontend: 1000,
        max_connections: 10,
        max_pending_breaks: 100,
        handle_room: usize::MAX,
        handle_share_exempt: Vec::new(),
    }
}

impl Harness {
    fn new() -> Harness {
        super::opens::reset_keys(0);
        let fs = MemFs::new();
        for f in ["a", "b", "c"] {
            fs.put(f, 10);
        }
        fs.mkdir("d");
        Harness::on(fs)
    }

    /// A fresh engine (as after a restart) on filesystem `fs`.
    fn on(fs: MemFs) -> Harness {
        Harness::on_as(fs, "smb")
    }

    /// A fresh engine whose frontend attaches as protocol `protocol`
    /// (`"smb2"`: leases break by Windows' rules).
    fn on_as(fs: MemFs, protocol: &str) -> Harness {
        Harness::serving(fs, Arc::new(MemStore::default()), 1, protocol)
    }

    /// filterd restarted on the same filesystem and store: a fresh engine
    /// (the next epoch) that recovered what the store holds.
    fn restarted(self) -> Harness {
        let (fs, store) = (self.fs.clone(), self.store.clone());
        let epoch = self.engine.epoch + 1;
        drop(self);
        Harness::serving(fs, store, epoch, "smb")
    }

    /// An engine of `epoch` on `fs` and `store` (recovered from it when it
    /// holds anything) with one frontend attached as `protocol`.
    fn serving(fs: MemFs, store: Arc<MemStore>, epoch: u64, protocol: &str) -> Harness {
        let pipe = Arc::new(Pipeline::default());
        let mut engine = Engine::new(
            config(),
            Box::new(fs.clone()),
            epoch,
            pipe.clone(),
            store.clone(),
            Arc::new(CommitCounters::default()),
        );
        engine.recover(store.as_ref()).unwrap();
        let conn = ConnId(1);
        let (writer, peer) = hello(&mut engine, conn, protocol);
        Harness {
            engine,
            pipe,
            store,
            conn,
            writer,
            peer,
            fs,
            last_id: 0,
            replies: BTreeMap::new(),
            events: Vec::new(),
            arrived: Vec::new(),
            last_failed: Vec::new(),
        }
    }

    /// The frontend attaches again (as after losing its connection) on a
    /// new connection, as the same instance.
    fn reattach(&mut self) {
        self.reattach_as(None);
    }

    /// [`Harness::reattach`] as frontend process `incarnation` (None:
    /// filterd draws one).
    fn reattach_as(&mut self, incarnation: Option<u64>) {
        let conn = ConnId(self.conn.0 + 1);
        let protocol = match &*self.engine.conns[&self.conn].role {
            Role::Frontend { protocol, .. } => protocol.as_str().to_owned(),
            Role::Control => "smb".to_owned(),
        };
        self.engine.begin_request();
        self.engine.on_closed(self.conn);
        let (writer, peer) = hello_as(&mut self.engine, conn, &protocol, incarnation);
        (self.conn, self.writer, self.peer) = (conn, writer, peer);
    }

    /// Runs a request; returns its id.
    fn run(&mut self, req: Request) -> u64 {
        let role = self.engine.conns[&self.conn].role.clone();
        let writer = self.writer.clone();
        self.last_id += 1;
        let id = self.last_id;
        self.engine.run_request(self.conn, &writer, &role, id, req);
        self.drain_replies();
        id
    }

    /// Reads every reply that reached the frontend's end, logging each
    /// (id, success) in the filesystem's log after what came before it.
    fn drain_replies(&mut self) -> Vec<(u64, bool)> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70 * 1024];
        while let Ok(n) = nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(&self.peer),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            if n == 0 {
                break;
            }
            let frame = libfilter::proto::decode_server(&buf[..n]);
            if let Ok(libfilter::proto::ServerFrame::Event(ev)) = frame {
                self.arrived.push(Arrived::Event(self.events.len()));
                self.events.push(ev);
                continue;
            }
            if let Ok(libfilter::proto::ServerFrame::Reply {
                id: Some(id),
                result,
            }) = frame
            {
                self.fs.log_reply(id, result.is_ok());
                self.arrived.push(Arrived::Reply(id));
                got.push((id, result.is_ok()));
                assert!(
                    self.replies.insert(id, result).is_none(),
                    "request {id} answered twice"
                );
            }
        }
        got
    }

    /// Plays the committer until nothing is queued (intents' completions
    /// included): everything commits (or, with `!ok`, the first commit
    /// fails).
    fn commit(&mut self, ok: bool) {
        self.commit_once(ok);
        if ok {
            for _ in 0..8 {
                self.commit_once(true);
            }
        }
    }

    /// Fails, whole, every group flushed to the committer, as its
    /// rollback does before it publishes the failure; the last sequence
    /// failed (`through`).
    fn roll_back_flushed(&mut self) -> u64 {
        self.engine.flush();
        self.roll_back_queued()
    }

    /// [`Harness::roll_back_flushed`] without flushing first: requests
    /// run since the last flush stay pending, above the failure.
    fn roll_back_queued(&mut self) -> u64 {
        let failed: Vec<u64> = self
            .pipe
            .take_jobs()
            .iter()
            .flat_map(|j| j.groups.iter().map(|g| g.seq))
            .collect();
        let through = failed.iter().copied().max().expect("a group to fail");
        self.engine
            .roll_back(&failed, through, ErrorCode::DiskFull, "test");
        through
    }

    /// Settles the failure [`Harness::roll_back_flushed`] rolled back
    /// through `through`, as the committer does after the engine's
    /// rollback: what waited for it refused, the rest sent, `through`
    /// resolved.
    fn settle_failure(&mut self, through: u64) {
        let (ready, refused) = self.pipe.settle_failure(through, false).unwrap_or_default();
        for d in refused {
            d.fail(ErrorCode::DiskFull, "test");
        }
        for d in ready {
            d.send();
        }
        self.pipe.publish(through);
        self.drain_replies();
    }

    fn commit_once(&mut self, ok: bool) {
        for id in self.commit_holding_intents(ok) {
            self.engine.finish_parked(id);
        }
    }

    /// One commit whose intents the engine does not hear of yet (as when
    /// the committer has made them durable and the engine is still busy
    /// with its round): their ids, to hand to `finish_parked` later.
    fn commit_holding_intents(&mut self, ok: bool) -> Vec<IntentId> {
        self.engine.flush();
        self.store.inner.lock().unwrap().fail = !ok;
        let jobs = self.pipe.take_jobs();
        // As the committer: what the round changed on disk is durable
        // before its commit; a failed fsync or syncfs fails the groups it
        // is tied to (and those building on them), the others commit.
        let mut failed = BTreeSet::new();
        for j in &jobs {
            for (seq, fd) in &j.sync {
                if self.fs.fsync(fd.as_fd()).is_err() {
                    failed.insert(*seq);
                }
            }
            if let Some(r) = &j.syncfs {
                if self.fs.syncfs(r.as_fd()).is_err() {
                    failed.extend(j.syncfs_for.iter().copied());
                }
            }
        }
        let groups: Vec<crate::committer::Group> =
            jobs.into_iter().flat_map(|j| j.groups).collect();
        let Some(through) = groups.iter().map(|g| g.seq).max() else {
            // What the round settled without a commit went out at once.
            self.drain_replies();
            return Vec::new();
        };
        for g in &groups {
            if g.deps.iter().any(|d| failed.contains(d)) {
                failed.insert(g.seq);
            }
        }
        let kept: Vec<&crate::committer::Group> =
            groups.iter().filter(|g| !failed.contains(&g.seq)).collect();
        let batches: Vec<&[StoreOp]> = kept.iter().map(|g| g.ops.as_slice()).collect();
        let result = if kept.is_empty() {
            Ok(0)
        } else {
            self.store.commit(&batches)
        };
        let mut notify = Vec::new();
        if result.is_ok() && !kept.is_empty() {
            self.fs.log_commit(
                kept.iter()
                    .flat_map(|g| g.ops.iter())
                    .map(op_name)
                    .collect(),
            );
            notify = kept.iter().flat_map(|g| g.notify.clone()).collect();
        }
        if result.is_err() {
            failed.extend(groups.iter().map(|g| g.seq));
        }
        if !failed.is_empty() {
            self.last_failed = failed.iter().copied().collect();
        }
        if failed.is_empty() {
            for d in self.pipe.settle_success(through) {
                d.send();
            }
            self.pipe.publish(through);
            self.drain_replies();
        } else {
            let failed: Vec<u64> = failed.into_iter().collect();
            self.engine
                .roll_back(&failed, through, ErrorCode::DiskFull, "test");
            let (ready, refused) = self.pipe.settle_failure(through, false).unwrap_or_default();
            for d in ready {
                d.send();
            }
            for d in refused {
                d.fail(ErrorCode::DiskFull, "test");
            }
            self.pipe.publish(through);
        }
        self.store.inner.lock().unwrap().fail = false;
        self.drain_replies();
        notify
    }

    fn keys(&self) -> Vec<ResumeKey> {
        self.engine.handles.keys().copied().collect()
    }

    /// Everything a failed commit must leave as it was.
    fn digest(&self) -> String {
        let e = &self.engine;
        let handles: Vec<_> = e
            .handles
            .values()
            .map(|h| {
                let r = &h.rec;
                (
                    r.key,
                    r.path.as_str().to_owned(),
                    r.file,
                    r.locks.clone(),
                    r.lock_sequence.clone(),
                    r.lease,
                    r.delete_on_close,
                    r.durability,
                    r.conn,
                    h.conn,
                    h.parked,
                )
            })
            .collect();
        let locks: Vec<_> = e
            .locks
            .iter()
            .map(|(f, t)| (*f, t.locks().to_vec()))
            .collect();
        let mut replays: Vec<_> = e
            .replays
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(s, m)| {
                (
                    s.clone(),
                    m.iter()
                        .map(|(k, v)| (*k, v.reply.clone()))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        replays.sort();
        let mut per_client: Vec<_> = e.per_client.iter().map(|(k, v)| (k.clone(), *v)).collect();
        per_client.sort();
        // Which opens a file has is a set; its order is not state.
        let by_file: Vec<_> = e
            .by_file
            .iter()
            .map(|(f, v)| {
                let mut v = v.clone();
                v.sort();
                (*f, v)
            })
            .collect();
        // The filesystem: every name and its file (identity, generation,
        // size, create marker), and the OFD locks each handle's lock
        // descriptor carries.
        let files = self.fs.snapshot();
        let ofd: Vec<_> = e
            .handles
            .values()
            .map(|h| {
                (
                    h.rec.key,
                    h.lock_fd.as_ref().map(|f| self.fs.ofd_locks(f.as_fd())),
                )
            })
            .collect();
        // Each user's count is what its handles in the table make
        // (`handle_shares`), and is part of what a rollback restores.
        let uids = e.handle_shares.holders();
        assert_eq!(uids, shares_recounted(e), "per-user handle counts drifted");
        format!(
            "{handles:?}\n{locks:?}\n{replays:?}\n{by_file:?}\n{:?}\n{per_client:?}\n{uids:?}\n{:?}\n{}\n{files:?}\n{ofd:?}",
            e.by_guid.len(),
            e.content_changes,
            e.parked.len()
        )
    }
}

/// A store operation's name, for the log.
fn op_name(op: &StoreOp) -> &'static str {
    match op {
        StoreOp::PutHandle(_) => "PutHandle",
        StoreOp::DetachHandle(_) => "DetachHandle",
        StoreOp::DeleteHandle(_) => "DeleteHandle",
        StoreOp::PutReplay { .. } => "PutReplay",
        StoreOp::DeleteReplay { .. } => "DeleteReplay",
        StoreOp::DeleteReplayScope(_) => "DeleteReplayScope",
        StoreOp::PutIntent(_) => "PutIntent",
        StoreOp::DeleteIntent(_) => "DeleteIntent",
    }
}

fn open(path: &str, share: Rights) -> Request {
    Request::Open(OpenRequest {
        create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
        ..OpenRequest::new(
            ClientId::new("alice").unwrap(),
            RelPath::new(path).unwrap(),
            Access::new(Rights::READ.union(Rights::WRITE).union(Rights::DELETE)).unwrap(),
            share,
            Disposition::OpenIf,
            Durability::Persistent { timeout_ms: 60_000 },
        )
    })
}

fn session(n: u8) -> ReplayScope {
    ReplayScope::Session(ScopeName::new(format!("s{n}")).unwrap())
}

/// Paths opens and removes name: existing files, an absent one, one in a
/// directory, one whose directory does not exist.
const PATHS: [&str; 6] = ["a", "b", "c", "n", "d/m", "z/q"];
/// Rename targets.
const TARGETS: [&str; 4] = ["x", "a", "d/y", "z/w"];
const SHARES: [Rights; 4] = [
    Rights::ALL,
    Rights::READ,
    Rights::READ.union(Rights::WRITE),
    Rights::NONE,
];
const DISPOSITIONS: [Disposition; 6] = [
    Disposition::Open,
    Disposition::Create,
    Disposition::OpenIf,
    Disposition::Overwrite,
    Disposition::OverwriteIf,
    Disposition::Supersede,
];

/// A request that changes persistent state when it succeeds (persistent
/// handles; changes with a recorded reply), over the handles there are.
#[derive(Debug, Clone)]
enum Op {
    /// Path, share mode, disposition (indexes).
    Open(u8, u8, u8),
    Lock(u8, u64, u64, bool),
    Unlock(u8, u64, u64),
    DeleteOnClose(u8, bool),
    Close(u8),
    Record(u8, u64),
    /// Handle, target, replace.
    Rename(u8, u8, bool),
    /// Path (by path, as NFS-like REMOVE), with a recorded reply.
    Remove(u8, u64),
    EndOfFile(u8, u64),
    /// Expire a disconnected persistent handle (by index among them), as
    /// its timer or `filterctl expire` does (a non-persistent one's expiry
    /// rides on no commit).
    Expire(u8),
    /// Resume a disconnected persistent handle (by index among them) on
    /// the harness's connection.
    Resume(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..6u8, 0..4u8, 0..6u8).prop_map(|(p, s, d)| Op::Open(p, s, d)),
        1 => (0..4u8, 0..40u64, 1..10u64, any::<bool>()).prop_map(|(h, o, l, x)| Op::Lock(h, o, l, x)),
        1 => (0..4u8, 0..40u64, 1..10u64).prop_map(|(h, o, l)| Op::Unlock(h, o, l)),
        1 => (0..4u8, any::<bool>()).prop_map(|(h, d)| Op::DeleteOnClose(h, d)),
        1 => (0..4u8).prop_map(Op::Close),
        1 => (0..3u8, 0..5u64).prop_map(|(s, o)| Op::Record(s, o)),
        1 => (0..4u8, 0..4u8, any::<bool>()).prop_map(|(h, t, r)| Op::Rename(h, t, r)),
        1 => (0..6u8, 0..1000u64).prop_map(|(p, o)| Op::Remove(p, o)),
        1 => (0..4u8, 0..100u64).prop_map(|(h, n)| Op::EndOfFile(h, n)),
        1 => (0..4u8).prop_map(Op::Expire),
        1 => (0..4u8).prop_map(Op::Resume),
    ]
}

impl Harness {
    /// The disconnected persistent handle at index `i` (modulo their
    /// number), if any.
    fn disconnected_persistent(&self, i: u8) -> Option<ResumeKey> {
        let away: Vec<ResumeKey> = self
            .engine
            .handles
            .values()
            .filter(|x| x.conn.is_none() && x.rec.durability.is_persistent())
            .map(|x| x.rec.key)
            .collect();
        away.get(usize::from(i) % away.len().max(1)).copied()
    }

    /// Runs `op`; returns its request id (none: no handle to run it on).
    fn apply(&mut self, op: &Op) -> Option<u64> {
        let keys = self.keys();
        let key = |i: u8| keys.get(usize::from(i) % keys.len().max(1)).copied();
        let record = |scope: ReplayScope, op_id: u64| RecordSpec {
            scope,
            op_id,
            reply: format!("reply {op_id}"),
            keep: 64,
        };
        let req = match *op {
            Op::Open(p, s, d) => {
                let Request::Open(mut o) = open(PATHS[usize::from(p)], SHARES[usize::from(s)])
                else {
                    return None;
                };
                o.disposition = DISPOSITIONS[usize::from(d)];
                o.no_wait = true;
                Request::Open(o)
            }
            Op::Lock(h, offset, length, exclusive) => Request::Lock {
                key: key(h)?,
                locks: vec![LockOp {
                    range: LockRange { offset, length },
                    exclusive,
                    unlock: false,
                }],
                lock_sequence: Some(LockSequence {
                    index: 1 + h,
                    number: u8::try_from(offset % 16).unwrap_or(0),
                }),
                lock_owner: None,
            },
            Op::Unlock(h, offset, length) => Request::Lock {
                key: key(h)?,
                locks: vec![LockOp {
                    range: LockRange { offset, length },
                    exclusive: false,
                    unlock: true,
                }],
                lock_sequence: None,
                lock_owner: None,
            },
            Op::DeleteOnClose(h, delete) => Request::SetDeleteOnClose {
                key: key(h)?,
                delete,
                record: None,
            },
            Op::Close(h) => Request::Close {
                key: key(h)?,
                put: vec![],
                delete: vec![],
                delete_on_close: None,
            },
            Op::Record(s, op_id) => Request::RecordReply {
                scope: session(s),
                op_id,
                reply: format!("reply {op_id}"),
                keep: 3,
            },
            Op::Rename(h, t, replace) => {
                let key = key(h)?;
                Request::Rename {
                    key,
                    to: RelPath::new(TARGETS[usize::from(t)]).unwrap(),
                    replace,
                    record: Some(record(ReplayScope::Handle(key), 100)),
                }
            }
            Op::Remove(p, op_id) => Request::Remove {
                path: RelPath::new(PATHS[usize::from(p)]).unwrap(),
                record: Some(record(session(9), 1000 + op_id)),
            },
            Op::Expire(i) => {
                let key = self.disconnected_persistent(i)?;
                self.engine.begin_request();
                self.engine.expire(key);
                return None;
            }
            // Of persistent handles: a durable one's resume writes
            // nothing, and with nothing pending is answered at once.
            Op::Resume(i) => {
                let key = self.disconnected_persistent(i)?;
                Request::Resume(libfilter::proto::ResumeRequest {
                    client: ClientId::new("alice").unwrap(),
                    target: libfilter::proto::ResumeTarget::Key { key },
                    owner: None,
                    matching: None,
                    if_last_held: false,
                })
            }
            Op::EndOfFile(h, size) => {
                let key = key(h)?;
                Request::SetEndOfFile {
                    key,
                    size,
                    record: Some(record(ReplayScope::Handle(key), 200 + size)),
                }
            }
        };
        Some(self.run(req))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random requests in rounds, each round's commit succeeding or
    /// failing. Whatever rides on a commit that fails, the engine and the
    /// filesystem are exactly as before the round: handles, paths, locks
    /// (and their OFD mirrors), lock sequences, delete-on-close flags,
    /// recorded replies, indexes; every name, file identity, size and
    /// create marker. No success is answered before its commit, every
    /// request is answered, and the store holds exactly the engine's
    /// persistent handles.
    #[test]
    fn a_failed_commit_leaves_the_state_exactly_as_before(
        rounds in proptest::collection::vec(
            (proptest::collection::vec(op(), 1..6), proptest::bool::weighted(0.6)),
            1..6,
        ),
        // Which handle comes first in the engine's maps.
        key_seed in any::<u64>(),
    ) {
        let mut h = Harness::new();
        super::opens::reset_keys(key_seed);
        for p in ["a", "b", "c"] {
            h.run(open(p, Rights::ALL));
        }
        // Disconnected handles to expire and purge: a persistent one of a
        // new file that shares only reading, and a durable one of another
        // that does not share delete and deletes it on close.
        h.run(open("n", Rights::READ));
        let Request::Open(mut o) = open("d/m", Rights::READ.union(Rights::WRITE)) else {
            unreachable!()
        };
        o.durability = Durability::Durable { timeout_ms: 60_000 };
        o.create_guid = None;
        let id = h.run(Request::Open(o));
        h.commit(true);
        let n = h.keys().into_iter().find(|k| h.engine.handles[k].rec.path.as_str() == "n");
        let durable = h.opened(id);
        h.run(Request::SetDeleteOnClose { key: durable, delete: true, record: None });
        for key in n.into_iter().chain([durable]) {
            h.run(Request::Detach { key, delete_on_close: None });
        }
        h.commit(true);
        h.fs.take_log();
        for (ops, ok) in &rounds {
            let before = h.digest();
            let events_before = h.events.len();
            let mut ids = Vec::new();
            let mut early = Vec::new();
            let mut unchanged = Vec::new();
            for o in ops {
                let was = h.digest();
                let Some(id) = h.apply(o) else {
                    continue;
                };
                ids.push(id);
                // Nothing this round did is durable yet: a request told it
                // succeeded must have changed nothing (a lock-sequence
                // replay, say).
                let now: Vec<Logged> = h.fs.take_log();
                if now.contains(&Logged::Reply(id, true)) {
                    prop_assert_eq!(
                        h.digest(), was,
                        "{:?} succeeded before its commit: {:?}", o, now
                    );
                    unchanged.push(id);
                }
                early.extend(now);
            }
            h.commit(*ok);
            let log = [early, h.fs.take_log()].concat();
            let replies: Vec<(u64, bool)> = log
                .iter()
                .filter_map(|l| match l {
                    Logged::Reply(id, ok) => Some((*id, *ok)),
                    _ => None,
                })
                .collect();
            let mut answered: Vec<u64> = replies.iter().map(|(id, _)| *id).collect();
            answered.sort_unstable();
            prop_assert_eq!(&answered, &ids, "every request is answered once: {:?}", log);
            if *ok {
                // A success is answered after a commit that follows every
                // filesystem change before it.
                for (i, l) in log.iter().enumerate() {
                    if matches!(l, Logged::Reply(id, true) if !unchanged.contains(id)) {
                        let last_change = log[..i].iter().rposition(|x| {
                            !matches!(x, Logged::Reply(..) | Logged::Commit(_) | Logged::Fsync(_))
                        });
                        let last_commit = log[..i].iter().rposition(|x| matches!(x, Logged::Commit(_)));
                        prop_assert!(
                            last_commit.is_some() && last_change.is_none_or(|c| Some(c) < last_commit),
                            "reply {:?} before the commit of a change: {:?}", l, log
                        );
                    }
                }
            } else {
                prop_assert!(
                    replies.iter().all(|(id, ok)| !ok || unchanged.contains(id)),
                    "a request whose commit failed succeeded: {:?}", log
                );
                prop_assert_eq!(h.digest(), before, "after {:?}", ops);
                let told: Vec<_> = h.events[events_before..]
                    .iter()
                    .filter(|e| matches!(e, libfilter::proto::Event::Expired { .. } | libfilter::proto::Event::Purged { .. }))
                    .collect();
                prop_assert!(told.is_empty(), "told of removals that failed: {:?}", told);
            }
            // The store holds what the engine holds of persistent handles.
            let stored: Vec<ResumeKey> = h.store.inner.lock().unwrap().handles.keys().copied().collect();
            let live: Vec<ResumeKey> = h
                .engine
                .handles
                .values()
                .filter(|x| x.rec.durability.is_persistent())
                .map(|x| x.rec.key)
                .collect();
            prop_assert_eq!(stored, live, "after {:?}", rounds);
        }
    }
}

/// An exclusive lock (or unlock) of byte 8 by `key`.
fn lock_byte_8(key: ResumeKey, unlock: bool) -> Request {
    Request::Lock {
        key,
        locks: vec![LockOp {
            range: LockRange {
                offset: 8,
                length: 1,
            },
            exclusive: true,
            unlock,
        }],
        lock_sequence: None,
        lock_owner: None,
    }
}

/// Opens "a" and locks its byte 8, durably: the handle.
fn open_and_lock_byte_8(h: &mut Harness) -> ResumeKey {
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.keys()[0];
    h.run(lock_byte_8(key, false));
    h.commit(true);
    key
}

/// Round 12 (the proptest above, seen once in a thousand runs): an unlock
/// of a handle's last lock closed its lock descriptor at once; when its
/// commit failed, the lock came back in the table, but taking it again as
/// an OFD lock meant reopening the file — removed since the lock, so the
/// reopen failed and the restored lock was not mirrored.
#[test]
fn a_failed_unlock_of_a_removed_files_last_lock_keeps_its_ofd_lock() {
    let mut h = Harness::new();
    let key = open_and_lock_byte_8(&mut h);
    let lock = |unlock| lock_byte_8(key, unlock);
    h.run(Request::Remove {
        path: RelPath::new("a").unwrap(),
        record: None,
    });
    h.commit(true);
    let before = h.digest();
    assert!(
        before.ends_with(
            "Some([HeldLock { range: LockRange { offset: 8, length: 1 }, kind: Exclusive }]))]"
        ),
        "{before}"
    );
    h.run(lock(true));
    h.commit(false);
    assert_eq!(h.digest(), before);
    // A durable unlock lets the descriptor go.
    h.run(lock(true));
    h.commit(true);
    assert!(h.engine.handles[&key].lock_fd.is_none());
}

/// Review: a persistent handle's close kept the whole handle until its
/// deletion committed, its OFD locks too — so another open's LOCK of the
/// range right after the CLOSE's reply met them and was refused. They go
/// with the close; a close whose commit fails takes them again on the
/// same descriptor.
#[test]
fn a_closes_ofd_locks_go_with_it_and_come_back_if_it_fails() {
    let mut h = Harness::new();
    let key = open_and_lock_byte_8(&mut h);
    let ofd = h.engine.handles[&key]
        .lock_fd
        .as_ref()
        .and_then(|f| f.try_clone().ok())
        .expect("a lock descriptor");
    let close = Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    };
    h.run(close.clone());
    assert_eq!(h.fs.ofd_locks(ofd.as_fd()), vec![], "released at the close");
    h.commit(false);
    assert_eq!(
        h.fs.ofd_locks(ofd.as_fd()),
        h.engine.handles[&key].rec.locks,
        "taken again when the close failed"
    );
    assert!(!h.engine.unmirrored.contains(&key));
    h.run(close);
    h.commit(true);
    assert_eq!(h.fs.ofd_locks(ofd.as_fd()), vec![]);
}

/// A failed unlock's lock comes back; when a local process took the range
/// meanwhile (the unlock released the OFD lock at once), it cannot be
/// taken again yet: it is counted unmirrored (filterctl shows it) and
/// taken when the range is free, as after a restart — not left silently
/// unenforced against local processes.
#[test]
fn a_failed_unlocks_lock_a_local_process_took_is_retried() {
    let mut h = Harness::new();
    let key = open_and_lock_byte_8(&mut h);
    let lock = |unlock| lock_byte_8(key, unlock);
    h.run(lock(true));
    h.fs.fail_next("mirror", libc::EAGAIN);
    h.commit(false);
    one_lock_unmirrored_until_retried(&mut h, key);
}

/// The handle holds one lock, counted unmirrored (filterctl shows it);
/// the next wake-up takes its OFD locks, the range being free.
fn one_lock_unmirrored_until_retried(h: &mut Harness, key: ResumeKey) {
    assert_eq!(h.engine.handles[&key].rec.locks.len(), 1, "one lock held");
    assert!(
        h.engine.unmirrored.contains(&key),
        "left unmirrored silently"
    );
    h.engine.expire_due(0);
    assert!(!h.engine.unmirrored.contains(&key), "not taken when free");
}

/// Review: when a LOCK's OFD mirror failed (a local process holds a
/// conflicting lock) and taking the handle's earlier locks again failed
/// too, that result was dropped: the locks were enforced among protocol
/// clients only, filterctl showed them mirrored, and nothing retried.
#[test]
fn a_refused_locks_earlier_locks_not_taken_again_are_retried() {
    let mut h = Harness::new();
    let key = open_and_lock_byte_8(&mut h);
    h.fs.fail_next("mirror", libc::EAGAIN); // the LOCK's own
    h.fs.fail_next("mirror", libc::EAGAIN); // the restore
    h.run(lock_10_at_200(key, false));
    one_lock_unmirrored_until_retried(&mut h, key);
}

/// An exclusive LOCK (or UNLOCK) of bytes 200–209.
fn lock_10_at_200(key: ResumeKey, unlock: bool) -> Request {
    Request::Lock {
        key,
        locks: vec![LockOp {
            range: LockRange {
                offset: 200,
                length: 10,
            },
            exclusive: true,
            unlock,
        }],
        lock_sequence: None,
        lock_owner: None,
    }
}

/// Review: while one of a handle's locks was not mirrored (a local
/// process took its range), every mirror of the handle failed, and an
/// UNLOCK of another of its locks was refused LockNotGranted for as long
/// as that local lock lasted. An unlock asks for nothing that can
/// conflict: it is granted, and the handle stays unmirrored until retried.
#[test]
fn an_unlock_is_granted_while_another_lock_of_the_handle_is_unmirrored() {
    let mut h = Harness::new();
    let key = open_and_lock_byte_8(&mut h);
    h.run(lock_10_at_200(key, false));
    h.commit(true);
    h.fs.fail_next("mirror", libc::EAGAIN);
    let id = h.run(lock_10_at_200(key, true));
    h.commit(true);
    assert!(
        matches!(h.reply(id), Some(Ok(_))),
        "the unlock is granted: {:?}",
        h.reply(id)
    );
    one_lock_unmirrored_until_retried(&mut h, key);
}

/// Review rvping 3: an NFS LOCKU of the middle of a held range comes as
/// the range's unlock and the re-lock of the two pieces left. When the
/// mirror of those pieces met a kernel lock (a frozen old owner's after a
/// takeover, a local process's while the handle was not mirrored) the
/// batch was refused LockNotGranted — NFS4ERR_DENIED, which a LOCKU never
/// is. It takes nothing the handle did not hold: the split stands and the
/// handle stays unmirrored until retried. A batch that takes a byte the
/// handle did not hold is still refused.
#[test]
fn a_split_of_a_held_range_is_granted_when_its_mirror_fails() {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.keys()[0];
    let op = |offset, length, unlock| LockOp {
        range: LockRange { offset, length },
        exclusive: true,
        unlock,
    };
    let batch = |locks| Request::Lock {
        key,
        locks,
        lock_sequence: None,
        lock_owner: None,
    };
    h.run(batch(vec![op(0, 100, false)]));
    h.commit(true);
    h.fs.fail_next("mirror", libc::EAGAIN);
    let id = h.run(batch(vec![
        op(0, 100, true),
        op(0, 40, false),
        op(60, 40, false),
    ]));
    h.commit(true);
    assert!(
        matches!(h.reply(id), Some(Ok(_))),
        "the split is granted: {:?}",
        h.reply(id)
    );
    let ranges = |h: &Harness| -> Vec<(u64, u64)> {
        h.engine.handles[&key]
            .rec
            .locks
            .iter()
            .map(|l| (l.range.offset, l.range.length))
            .collect()
    };
    assert_eq!(ranges(&h), [(0, 40), (60, 40)]);
    assert!(
        h.engine.unmirrored.contains(&key),
        "left unmirrored silently"
    );
    h.engine.expire_due(0);
    assert!(!h.engine.unmirrored.contains(&key), "not taken when free");
    // Growing a piece takes bytes 40..50: refused when its mirror fails.
    h.fs.fail_next("mirror", libc::EAGAIN);
    let id = h.run(batch(vec![op(0, 40, true), op(0, 50, false)]));
    h.commit(true);
    assert!(
        matches!(h.reply(id), Some(Err(e)) if e.code == ErrorCode::LockNotGranted),
        "{:?}",
        h.reply(id)
    );
    assert_eq!(ranges(&h), [(0, 40), (60, 40)]);
}

/// An exclusive lock op of `length` bytes at `offset`.
fn x_op(offset: u64, length: u64, unlock: bool) -> LockOp {
    LockOp {
        range: LockRange { offset, length },
        exclusive: true,
        unlock,
    }
}

/// A batch of lock ops of `key`.
fn lock_batch(key: ResumeKey, locks: Vec<LockOp>) -> Request {
    Request::Lock {
        key,
        locks,
        lock_sequence: None,
        lock_owner: None,
    }
}

/// Review rr41d: a LOCK through a handle with a range not mirrored (a
/// local process took 70..80 of its 0..100 while filterd was down) was
/// refused whenever the mirror failed, a kept range's failure too: every
/// LOCK of a free range was denied, "local process" the conflict. Only a
/// new byte whose OFD lock fails is refused now — a local process holds
/// it; the handle stays unmirrored, taken once the local lock goes.
#[test]
fn a_lock_of_free_bytes_is_granted_while_a_kept_range_is_unmirrored() {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.keys()[0];
    h.run(lock_batch(key, vec![x_op(0, 100, false)]));
    h.commit(true);
    let local = |h: &Harness, offset, held| h.fs.local_lock(LockRange { offset, length: 10 }, held);
    local(&h, 70, true);
    local(&h, 300, true);
    // Next to the kept range (its own mirror step) and apart from it.
    for (offset, length) in [(100, 100), (400, 10)] {
        let id = h.run(lock_batch(key, vec![x_op(offset, length, false)]));
        h.commit(true);
        assert!(
            matches!(h.reply(id), Some(Ok(_))),
            "a free range is granted: {:?}",
            h.reply(id)
        );
        assert!(
            h.engine.unmirrored.contains(&key),
            "left unmirrored silently"
        );
    }
    // Bytes a local process holds: refused, nothing changed.
    let id = h.run(lock_batch(key, vec![x_op(295, 10, false)]));
    h.commit(true);
    assert!(
        matches!(h.reply(id), Some(Err(e)) if e.code == ErrorCode::LockNotGranted),
        "{:?}",
        h.reply(id)
    );
    assert_eq!(h.engine.handles[&key].rec.locks.len(), 3);
    local(&h, 70, false);
    h.engine.expire_due(0);
    assert!(!h.engine.unmirrored.contains(&key), "not taken when free");
}

/// Review rr41d: the per-client cap counted a batch's locks but not its
/// unlocks, so a client holding 63 locks on a file was refused an NFS
/// LOCKU of the middle of one (its unlock and the re-lock of two pieces)
/// although 64 were left. The count after the batch is checked; past the
/// cap a split is still refused.
#[test]
fn the_lock_caps_count_a_batchs_unlocks() {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.keys()[0];
    let cap = u64::try_from(MAX_LOCKS_PER_CLIENT_PER_FILE).unwrap();
    let ops = (0..cap - 1).map(|i| x_op(i * 100, 10, false)).collect();
    h.run(lock_batch(key, ops));
    h.commit(true);
    let split = |at: u64| {
        lock_batch(
            key,
            vec![
                x_op(at, 10, true),
                x_op(at, 4, false),
                x_op(at + 6, 4, false),
            ],
        )
    };
    let id = h.run(split(0));
    h.commit(true);
    assert!(matches!(h.reply(id), Some(Ok(_))), "{:?}", h.reply(id));
    assert_eq!(
        h.engine.handles[&key].rec.locks.len(),
        MAX_LOCKS_PER_CLIENT_PER_FILE
    );
    let id = h.run(split(100));
    h.commit(true);
    assert!(
        matches!(h.reply(id), Some(Err(e)) if e.code == ErrorCode::LimitReached),
        "{:?}",
        h.reply(id)
    );
    assert_eq!(
        h.engine.handles[&key].rec.locks.len(),
        MAX_LOCKS_PER_CLIENT_PER_FILE
    );
}

/// Review rr41d: a batch that locks nothing new (a split of a held
/// range: an NFS LOCKU of its middle) broke other clients' read caching
/// as a new lock does.
#[test]
fn a_split_of_a_held_range_breaks_no_read_caching() {
    use libfilter::lease::{LeaseKey, LeaseState};
    use libfilter::proto::Event;
    let is_break = |e: &Event| matches!(e, Event::LeaseBreak { .. });
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.keys()[0];
    h.run(lock_batch(key, vec![x_op(0, 100, false)]));
    h.commit(true);
    let Request::Open(mut o) = bobs("a", Rights::READ, Disposition::Open) else {
        unreachable!("bobs() makes an open")
    };
    o.lease = Some(LeaseRequest {
        key: LeaseKey(uuid::Uuid::new_v4()),
        state: LeaseState::parse("R").unwrap(),
        epoch: 0,
    });
    let id = h.run(Request::Open(o));
    h.commit(true);
    h.drain_replies();
    h.opened(id);
    let bob = h.keys().into_iter().find(|k| *k != key).unwrap();
    assert!(
        h.engine.handles[&bob].rec.lease.is_some(),
        "bob holds a read lease"
    );
    h.run(lock_batch(
        key,
        vec![x_op(0, 100, true), x_op(0, 40, false), x_op(60, 40, false)],
    ));
    h.commit(true);
    assert!(!h.events.iter().any(is_break), "{:?}", h.events);
    // The control: a new lock breaks it.
    h.run(lock_batch(key, vec![x_op(200, 10, false)]));
    h.commit(true);
    assert!(h.events.iter().any(is_break), "{:?}", h.events);
}

/// Review: `filterctl stats` counted an open or a lock granted when the
/// engine decided it, and a failed commit, which refuses its reply, took
/// nothing back: after a disk-full burst it showed grants its clients
/// were refused. They are counted refused now.
#[test]
fn grants_whose_commit_fails_are_counted_refused() {
    let mut h = Harness::new();
    let key = open_and_lock_byte_8(&mut h);
    let granted = |h: &Harness| {
        let st = &h.engine.stats;
        (
            st.opens,
            st.locks_granted,
            st.opens_refused,
            st.locks_refused,
        )
    };
    assert_eq!(granted(&h), (1, 1, 0, 0));
    let opened = h.run(open("b", Rights::ALL));
    let locked = h.run(lock_10_at_200(key, false));
    h.commit(false);
    assert!(
        matches!(h.reply(opened), Some(Err(_))),
        "{:?}",
        h.reply(opened)
    );
    assert!(
        matches!(h.reply(locked), Some(Err(_))),
        "{:?}",
        h.reply(locked)
    );
    assert_eq!(granted(&h), (1, 1, 1, 1), "the failed ones counted refused");
}

/// Review: one handle's view (`Request::Handle`) waited for every pending
/// commit, so rksmbd's count of a handle's locks before a LOCK made the
/// LOCK wait for other clients' fsyncs. It waits only for its own file's.
#[test]
fn one_handles_view_waits_only_for_its_own_file() {
    let mut h = Harness::new();
    let key = open_and_lock_byte_8(&mut h);
    h.run(open("b", Rights::ALL));
    let other = h.run(Request::Handle {
        key,
        learning: false,
    });
    assert!(
        matches!(h.reply(other), Some(Ok(_))),
        "answered before another file's commit: {:?}",
        h.reply(other)
    );
    let own = h.run(lock_10_at_200(key, false));
    let view = h.run(Request::Handle {
        key,
        learning: false,
    });
    assert!(h.reply(own).is_none() && h.reply(view).is_none());
    h.commit(true);
    assert!(matches!(h.reply(view), Some(Ok(_))), "{:?}", h.reply(view));
}

/// Review of the test above's fix: an overwrite parks on its intent and
/// was counted granted when it parked; its intent's commit failing
/// refused it, and `stats` kept it. A parked open counts when answered.
#[test]
fn an_overwrite_is_counted_when_answered() {
    let mut h = Harness::new();
    let counted = |h: &Harness| (h.engine.stats.opens, h.engine.stats.opens_refused);
    let failed = h.run(with_disposition(
        open("b", Rights::ALL),
        Disposition::Overwrite,
    ));
    h.commit(false);
    assert!(
        matches!(h.reply(failed), Some(Err(_))),
        "{:?}",
        h.reply(failed)
    );
    assert_eq!(counted(&h), (0, 1));
    let made = h.run(with_disposition(
        open("b", Rights::ALL),
        Disposition::Overwrite,
    ));
    h.commit(true);
    assert!(matches!(h.reply(made), Some(Ok(_))), "{:?}", h.reply(made));
    assert_eq!(counted(&h), (1, 1));
}

/// A request that builds on a failed one fails with it; one that does not
/// is kept (group by group, as the committer retries).
#[test]
fn only_what_builds_on_a_failed_group_is_abandoned() {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.run(open("b", Rights::ALL));
    h.commit(true);
    let keys = h.keys();
    let (ka, kb) = (keys[0], keys[1]);
    let file_of = |h: &Harness, k: ResumeKey| h.engine.handles[&k].rec.file;
    let lock = |key, offset| Request::Lock {
        key,
        locks: vec![LockOp {
            range: LockRange { offset, length: 1 },
            exclusive: true,
            unlock: false,
        }],
        lock_sequence: None,
        lock_owner: None,
    };
    // Three requests, three groups: a lock on A, a second lock on A (builds
    // on the first), a lock on B (independent).
    h.run(lock(ka, 0));
    h.run(lock(ka, 5));
    h.run(lock(kb, 0));
    h.engine.flush();
    let jobs = h.pipe.take_jobs();
    let groups: Vec<crate::committer::Group> = jobs.into_iter().flat_map(|j| j.groups).collect();
    assert_eq!(groups.len(), 3);
    assert!(
        groups[1].deps.contains(&groups[0].seq),
        "the second lock on A builds on the first"
    );
    assert!(
        groups[2].deps.is_empty(),
        "the lock on B builds on nothing pending"
    );
    // The first fails on its own; the committer fails the second with it
    // and commits the third.
    let through = groups[2].seq;
    let batches: Vec<&[StoreOp]> = vec![groups[2].ops.as_slice()];
    h.store.commit(&batches).unwrap();
    h.engine.roll_back(
        &[groups[0].seq, groups[1].seq],
        through,
        ErrorCode::DiskFull,
        "test",
    );
    let _ = h.pipe.settle_failure(through, false);
    h.pipe.publish(through);
    assert!(
        !h.engine.locks.contains_key(&file_of(&h, ka)),
        "both locks on A are gone"
    );
    assert_eq!(
        h.engine.locks[&file_of(&h, kb)].locks().len(),
        1,
        "the lock on B stays"
    );
    assert_eq!(h.engine.handles[&kb].rec.locks.len(), 1);
}

/// `OpenRequest::share_group`: one client's handles of one group are one
/// share reservation (an NFS open-owner's upgrade is not refused by its own
/// deny); another group, another client or no group still conflicts.
#[test]
fn a_share_group_is_one_reservation() {
    let mut h = Harness::new();
    let grouped = |client: &str, group: Option<&str>, access: Rights, share: Rights| {
        Request::Open(OpenRequest {
            create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
            no_wait: true,
            share_group: group.map(str::to_owned),
            ..OpenRequest::new(
                ClientId::new(client).unwrap(),
                RelPath::new("a").unwrap(),
                Access::new(access).unwrap(),
                share,
                Disposition::Open,
                Durability::Persistent { timeout_ms: 60_000 },
            )
        })
    };
    // Read, denying write; then write by the same group.
    h.run(grouped("alice", Some("oo"), Rights::READ, Rights::READ));
    h.commit(true);
    h.run(grouped("alice", Some("oo"), Rights::WRITE, Rights::ALL));
    h.commit(true);
    assert_eq!(h.keys().len(), 2, "the upgrade joins the reservation");
    for (client, group) in [("alice", Some("o2")), ("bob", Some("oo")), ("alice", None)] {
        h.run(grouped(client, group, Rights::WRITE, Rights::ALL));
        h.commit(true);
        assert_eq!(h.keys().len(), 2, "{client} {group:?} is refused");
    }
    // Others see the union: reading is shared, writing denied.
    h.run(grouped("bob", None, Rights::READ, Rights::ALL));
    h.commit(true);
    assert_eq!(h.keys().len(), 3);
}

#[test]
fn handles_of_one_client_share_one_copy_of_its_names() {
    // Each request carries its own copy of the client's and frontend's
    // names; the handle keeps the copy its count's key holds (100k handles
    // of one client are one name, not 100k).
    let mut h = Harness::new();
    let a = h.run(open("a", Rights::ALL));
    h.commit(true);
    let b = h.run(open("b", Rights::ALL));
    h.commit(true);
    let (a, b) = (h.opened(a), h.opened(b));
    let (ra, rb) = (&h.engine.handles[&a].rec, &h.engine.handles[&b].rec);
    assert!(std::ptr::eq(ra.client.as_str(), rb.client.as_str()));
    assert!(std::ptr::eq(ra.protocol.as_str(), rb.protocol.as_str()));
    assert!(std::ptr::eq(ra.frontend.as_str(), rb.frontend.as_str()));
}

impl Harness {
    /// The reply to request `id`, if it came.
    fn reply(&self, id: u64) -> Option<&Result<libfilter::proto::Reply, WireError>> {
        self.replies.get(&id)
    }

    /// Sends a `durable_ok` listing with request `id` again (a peer
    /// reusing it), runs the bounded waits due at `due_ms`, checks the
    /// listing was answered with what is durable and forgets that reply,
    /// then commits everything.
    fn same_id_listing_past_its_bound(&mut self, id: u64, due_ms: u64) {
        self.last_id = id - 1;
        assert_eq!(self.run(durable_handles(None)), id, "the same id again");
        self.engine.status_waits_due(due_ms);
        self.drain_replies();
        let listed = self.replies.remove(&id);
        assert!(
            matches!(
                listed,
                Some(Ok(Reply::Handles {
                    commit_wait: Some(_),
                    ..
                }))
            ),
            "the listing answered with what is durable: {listed:?}"
        );
        self.commit(true);
        self.drain_replies();
    }

    /// Commits the first job flushed to the committer (two or more were),
    /// the later ones left in flight for ever, as a slow store would.
    fn commit_first_job_only(&mut self) {
        let mut jobs = self.pipe.take_jobs();
        assert!(jobs.len() >= 2, "a job per flush: {}", jobs.len());
        drop(jobs.split_off(1));
        let groups: Vec<crate::committer::Group> =
            jobs.into_iter().flat_map(|j| j.groups).collect();
        let through = groups.iter().map(|g| g.seq).max().expect("a group");
        let ops: Vec<&[StoreOp]> = groups.iter().map(|g| g.ops.as_slice()).collect();
        self.store.commit(&ops).expect("the first job's commit");
        for d in self.pipe.settle_success(through) {
            d.send();
        }
        self.pipe.publish(through);
        self.drain_replies();
    }

    /// Opens "a" and "c" and commits: their keys.
    fn durable_a_and_c(&mut self) -> (ResumeKey, ResumeKey) {
        let (oa, oc) = (
            self.run(open("a", Rights::ALL)),
            self.run(open("c", Rights::ALL)),
        );
        self.commit(true);
        (self.opened(oa), self.opened(oc))
    }

    /// The key request `id` opened.
    fn opened(&self, id: u64) -> ResumeKey {
        match self.reply(id) {
            Some(Ok(libfilter::proto::Reply::Opened(o))) => o.key,
            other => panic!("request {id} did not open: {other:?}"),
        }
    }

    /// Asserts request `id` was answered with success.
    fn answered(&self, id: u64) {
        assert!(
            matches!(self.reply(id), Some(Ok(_))),
            "{:?}",
            self.reply(id)
        );
    }

    /// The code request `id` was refused with.
    fn refused(&self, id: u64) -> ErrorCode {
        match self.reply(id) {
            Some(Err(e)) => e.code,
            other => panic!("request {id} was not refused: {other:?}"),
        }
    }
}

fn with_disposition(req: Request, d: Disposition) -> Request {
    match req {
        Request::Open(mut o) => {
            o.disposition = d;
            Request::Open(o)
        }
        other => other,
    }
}

/// The position of the first log entry `f` accepts.
fn pos(log: &[Logged], f: impl Fn(&Logged) -> bool) -> usize {
    log.iter()
        .position(f)
        .unwrap_or_else(|| panic!("not in the log: {log:?}"))
}

fn commit_with(log: &[Logged], op: &str) -> usize {
    pos(
        log,
        |l| matches!(l, Logged::Commit(ops) if ops.contains(&op)),
    )
}

/// A rename with a recorded reply: its intent commits, then the name
/// changes, then both directories are synced and the commit that completes
/// it (paths, reply record, intent deletion) follows; the reply after that.
#[test]
fn a_rename_is_intent_then_change_then_completion() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    h.fs.take_log();
    let id = h.run(Request::Rename {
        key,
        to: RelPath::new("d/x").unwrap(),
        replace: false,
        record: Some(RecordSpec {
            scope: ReplayScope::Handle(key),
            op_id: 7,
            reply: "renamed".into(),
            keep: 8,
        }),
    });
    assert!(
        h.fs.file("a").is_some(),
        "nothing changes before the intent is durable"
    );
    assert!(h.reply(id).is_none(), "parked until the change is recorded");
    h.commit(true);
    let log = h.fs.take_log();
    let intent = commit_with(&log, "PutIntent");
    let change = pos(&log, |l| *l == Logged::Rename("a".into(), "d/x".into()));
    let synced_from = pos(&log, |l| *l == Logged::Fsync("/".into()));
    let synced_to = pos(&log, |l| *l == Logged::Fsync("d/".into()));
    let done = commit_with(&log, "DeleteIntent");
    let reply = pos(&log, |l| *l == Logged::Reply(id, true));
    assert!(intent < change, "{log:?}");
    assert!(change < synced_from && change < synced_to, "{log:?}");
    assert!(synced_from < done && synced_to < done, "{log:?}");
    assert!(done < reply, "{log:?}");
    assert!(
        matches!(&log[done], Logged::Commit(ops) if ops.contains(&"PutHandle") && ops.contains(&"PutReplay")),
        "the new path and the reply record commit with the intent's deletion: {log:?}"
    );
    assert_eq!(h.engine.handles[&key].rec.path.as_str(), "d/x");
    assert!(h.fs.file("a").is_none() && h.fs.file("d/x").is_some());
}

/// An overwrite of an existing file by a persistent open: intent, then
/// the truncation, then the file's sync and the handle record with the
/// intent's deletion, then the reply.
#[test]
fn an_overwrite_is_intent_then_truncation_then_record() {
    let mut h = Harness::new();
    let id = h.run(with_disposition(
        open("b", Rights::ALL),
        Disposition::Overwrite,
    ));
    assert_eq!(
        h.fs.file("b").map(|f| f.size),
        Some(10),
        "not before the intent"
    );
    h.commit(true);
    let log = h.fs.take_log();
    let intent = commit_with(&log, "PutIntent");
    let change = pos(&log, |l| *l == Logged::Truncate("b".into()));
    let synced = pos(&log, |l| *l == Logged::Fsync("b".into()));
    let done = commit_with(&log, "PutHandle");
    let reply = pos(&log, |l| *l == Logged::Reply(id, true));
    assert!(
        intent < change && change < synced && synced < done && done < reply,
        "{log:?}"
    );
    assert!(commit_with(&log, "DeleteIntent") == done, "{log:?}");
    assert_eq!(h.fs.file("b").map(|f| f.size), Some(0));
}

/// An end-of-file change, a remove by path and a delete on close: each
/// changes the filesystem only after its intent commits, and is answered
/// only after the commit that completes it.
#[test]
fn size_changes_removes_and_deletes_on_close_wait_for_their_intent() {
    let mut h = Harness::new();
    let a = h.run(open("a", Rights::ALL));
    let c = h.run(open("c", Rights::ALL));
    h.commit(true);
    let (a, c) = (h.opened(a), h.opened(c));
    h.fs.take_log();
    let record = |op_id| RecordSpec {
        scope: session(1),
        op_id,
        reply: "ok".into(),
        keep: 8,
    };
    let cases: Vec<(Request, Logged)> = vec![
        (
            Request::SetEndOfFile {
                key: a,
                size: 3,
                record: Some(record(1)),
            },
            Logged::SetSize("a".into(), 3),
        ),
        (
            Request::Remove {
                path: RelPath::new("b").unwrap(),
                record: Some(record(2)),
            },
            Logged::Remove("b".into()),
        ),
    ];
    for (req, change) in cases {
        let id = h.run(req);
        assert!(h.fs.take_log().is_empty(), "nothing before the intent");
        h.commit(true);
        let log = h.fs.take_log();
        let intent = commit_with(&log, "PutIntent");
        let at = pos(&log, |l| *l == change);
        let done = commit_with(&log, "DeleteIntent");
        let reply = pos(&log, |l| *l == Logged::Reply(id, true));
        assert!(intent < at && at < done && done < reply, "{log:?}");
        assert!(
            log[at..done].iter().any(|l| matches!(l, Logged::Fsync(_))),
            "{log:?}"
        );
    }
    // Delete on close of the last handle: the handle's deletion and the
    // intent commit together; the unlink follows; the CLOSE is answered
    // once the intent is gone.
    h.run(Request::SetDeleteOnClose {
        key: c,
        delete: true,
        record: None,
    });
    h.commit(true);
    h.fs.take_log();
    let id = h.run(Request::Close {
        key: c,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    assert!(h.fs.file("c").is_some());
    h.commit(true);
    let log = h.fs.take_log();
    let intent = pos(
        &log,
        |l| matches!(l, Logged::Commit(ops) if ops.contains(&"PutIntent") && ops.contains(&"DeleteHandle")),
    );
    let at = pos(&log, |l| *l == Logged::Remove("c".into()));
    let done = commit_with(&log, "DeleteIntent");
    let reply = pos(&log, |l| *l == Logged::Reply(id, true));
    assert!(intent < at && at < done && done < reply, "{log:?}");
    assert!(h.fs.file("c").is_none());
}

/// An intent that never becomes durable changes nothing on disk, and its
/// request is refused.
#[test]
fn a_failed_intent_commit_changes_nothing() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    let before = h.fs.snapshot();
    h.fs.take_log();
    let id = h.run(Request::SetEndOfFile {
        key,
        size: 1,
        record: None,
    });
    h.commit(false);
    assert_eq!(h.fs.snapshot(), before);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    assert!(
        h.engine.content_changes.is_empty(),
        "reads and writes go on"
    );
}

/// A change that fails on disk after its intent committed: the intent is
/// dropped in the completion, nothing moves, the client learns why.
#[test]
fn a_change_refused_by_the_filesystem_after_its_intent() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    h.fs.fail_next("rename", libc::EACCES);
    let id = h.run(Request::Rename {
        key,
        to: RelPath::new("x").unwrap(),
        replace: false,
        record: None,
    });
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::AccessDenied);
    assert_eq!(h.engine.handles[&key].rec.path.as_str(), "a");
    assert!(h.fs.file("a").is_some() && h.fs.file("x").is_none());
    assert!(h.store.inner.lock().unwrap().intents.is_empty());
}

/// A persistent create whose commit fails is undone with its file: no
/// client was told of it.
#[test]
fn a_create_whose_commit_failed_leaves_no_file() {
    let mut h = Harness::new();
    let id = h.run(open("n", Rights::ALL));
    assert!(
        h.fs.file("n").is_some(),
        "created (marked) before the commit"
    );
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    assert!(h.fs.file("n").is_none(), "{:?}", h.fs.snapshot());
    assert!(h.engine.handles.is_empty());
}

/// A create re-sent after a crash finds the file its marker names (made
/// before the crash, perhaps written since by others): when its commit
/// fails, the file stays. Old code (review of issue 12's fixes): the
/// rollback took it for a file this open had made and unlinked it.
#[test]
fn a_replayed_create_whose_commit_failed_keeps_the_file_from_before() {
    let mut before = Harness::new();
    let req = open("n", Rights::ALL);
    before.run(req.clone());
    assert!(before.fs.file("n").is_some(), "created, marked");
    // The daemon dies before the commit; a new one serves the same files.
    let mut h = Harness::on(before.fs.clone());
    let id = h.run(req);
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    assert!(h.fs.file("n").is_some(), "{:?}", h.fs.snapshot());
    assert!(h.engine.handles.is_empty());
}

/// A close of a created file's persistent handle clears the create marker
/// before its deletion commits; if that commit fails, the handle and the
/// marker are back.
#[test]
fn a_close_whose_commit_failed_puts_the_create_marker_back() {
    let mut h = Harness::new();
    let id = h.run(open("n", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    let marker = h.fs.file("n").and_then(|f| f.marker);
    assert!(marker.is_some());
    let id = h.run(Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    assert_eq!(h.fs.file("n").and_then(|f| f.marker), None);
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    assert!(h.engine.handles.contains_key(&key));
    assert_eq!(h.fs.file("n").and_then(|f| f.marker), marker);
}

/// Opens "c" persistent with delete on close (committed), then runs its
/// CLOSE and another open of "c" (a new create GUID) behind it: the key,
/// the close's and the open's request ids.
fn closing_with_delete_on_close_then_opened(h: &mut Harness) -> (ResumeKey, u64, u64) {
    let (kc, close) = closing_with_delete_on_close(h);
    (kc, close, h.run(open("c", Rights::ALL)))
}

/// Opens "c" persistent with delete on close (committed), then runs its
/// CLOSE: the key and the close's request id.
fn closing_with_delete_on_close(h: &mut Harness) -> (ResumeKey, u64) {
    let id = h.run(open("c", Rights::ALL));
    h.commit(true);
    let kc = h.opened(id);
    h.run(Request::SetDeleteOnClose {
        key: kc,
        delete: true,
        record: None,
    });
    h.commit(true);
    let close = h.run(Request::Close {
        key: kc,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    (kc, close)
}

/// An open of a file whose delete on close is waiting for its intent (its
/// last persistent handle's close committing, or committed and the unlink
/// not yet made) is not granted that file: the unlink would take it from
/// under the new handle after its "opened". It waits for the unlink and
/// runs again, against the file system as it is then (here: it creates a
/// new file).
#[test]
fn an_open_waits_for_a_delete_on_close_in_progress() {
    let mut h = Harness::new();
    let old = h.fs.file("c").map(|f| (f.ino, f.gen));
    let (_, close, second) = closing_with_delete_on_close_then_opened(&mut h);
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    assert!(h.reply(close).is_some_and(|r| r.is_ok()));
    let kb = h.opened(second);
    let now = h.fs.file("c").map(|f| (f.ino, f.gen));
    assert!(
        now.is_some(),
        "the second open's file was unlinked under it"
    );
    assert_ne!(now, old, "the second open got the file being deleted");
    assert!(h.engine.handles.contains_key(&kb));
}

/// The same, the close's commit failing: the closing handle is back (its
/// delete on close with it), and the open that waited runs again and
/// shares the file with it.
#[test]
fn an_open_that_waited_for_a_delete_on_close_whose_close_failed_runs_again() {
    let mut h = Harness::new();
    let old = h.fs.file("c").map(|f| (f.ino, f.gen));
    let (kc, close, second) = closing_with_delete_on_close_then_opened(&mut h);
    h.commit(false);
    assert_eq!(h.refused(close), ErrorCode::DiskFull);
    h.engine.process_retries();
    h.commit(true);
    let kb = h.opened(second);
    assert_eq!(h.fs.file("c").map(|f| (f.ino, f.gen)), old);
    assert!(h.engine.handles.contains_key(&kc) && h.engine.handles.contains_key(&kb));
}

/// The same, killed once the close's commit is durable and before its
/// unlink: the second open was not granted the file (nor recorded), so
/// recovery's unlink takes no acknowledged handle's file.
#[test]
fn a_delete_on_close_finished_by_recovery_takes_no_later_open_s_file() {
    let mut h = Harness::new();
    closing_with_delete_on_close_then_opened(&mut h);
    h.commit_holding_intents(true);
    let h = h.restarted();
    for r in h.engine.handles.values().map(|h| &h.rec) {
        assert_ne!(r.conn, ConnState::Lost, "{} came back lost", r.path);
    }
    if !h.engine.handles.is_empty() {
        assert!(
            h.fs.file("c").is_some(),
            "a stored handle's file was unlinked"
        );
    }
}

/// Recovery finishing a delete on close whose file a stored handle holds
/// (an open a build before opens waited for the unlink let in, recorded
/// with the close): the file is not unlinked under that acknowledged
/// handle; the delete passes to it.
#[test]
fn recovery_passes_a_delete_on_close_to_a_stored_handle_of_the_file() {
    let mut h = Harness::new();
    let id = h.run(open("c", Rights::ALL));
    h.commit(true);
    let kb = h.opened(id);
    let rec = h.engine.handles[&kb].rec.clone();
    let intent = on_close_intent(&rec);
    h.store
        .commit(&[&[StoreOp::PutIntent(Box::new(intent))]])
        .unwrap();
    let h = h.restarted();
    assert!(h.fs.file("c").is_some(), "unlinked under a stored handle");
    let back = &h.engine.handles[&kb].rec;
    assert_ne!(back.conn, ConnState::Lost);
    assert!(back.delete_on_close, "the delete passed to it");
}

/// The intent of `rec`'s delete on close, as its close records it.
fn on_close_intent(rec: &HandleRecord) -> Intent {
    Intent {
        id: IntentId(uuid::Uuid::new_v4()),
        change: IntentChange::Remove {
            path: rec.path.clone(),
            file: rec.file,
            record: None,
            kernel_handle: rec.kernel_handle.clone(),
            on_close: true,
        },
        recorded_ms: 0,
    }
}

/// The same, but the stored handle is known by the file's number alone
/// (no kernel handle) under another name: not proof that it is the file
/// (numbers are reused), so the delete on close is finished, not passed.
#[test]
fn recovery_passes_no_delete_on_close_to_a_handle_known_by_number_alone() {
    let mut h = Harness::new();
    let id = h.run(open("c", Rights::ALL));
    h.commit(true);
    let kb = h.opened(id);
    let rec = h.engine.handles[&kb].rec.clone();
    let mut other = rec.clone();
    other.kernel_handle = None;
    other.path = RelPath::new("elsewhere").unwrap();
    let intent = on_close_intent(&rec);
    h.store
        .commit(&[&[
            StoreOp::PutHandle(Box::new(other)),
            StoreOp::PutIntent(Box::new(intent)),
        ]])
        .unwrap();
    let h = h.restarted();
    assert!(h.fs.file("c").is_none(), "the delete on close is finished");
    assert!(h
        .store
        .inner
        .lock()
        .unwrap()
        .handles
        .get(&kb)
        .is_none_or(|r| !r.delete_on_close));
}

/// A size change whose handle goes (closed here; a frontend gone or an
/// expiry alike) while it waits for its intent: the change is still made,
/// and the file's reads and writes go on once its completion commits —
/// the file's count of changes in flight is not left behind.
#[test]
fn a_size_change_whose_handle_went_while_it_waited_lets_io_go_on() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    let change = h.run(Request::SetEndOfFile {
        key,
        size: 3,
        record: None,
    });
    h.run(Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    assert!(!h.engine.content_changes.is_empty());
    h.commit(true);
    assert!(h.reply(change).is_some_and(|r| r.is_ok()));
    assert_eq!(h.fs.file("a").map(|f| f.size), Some(3));
    assert!(h.engine.content_changes.is_empty());
}

/// The same for a truncating open whose handle went before its
/// truncation was made (answered "closed before its open finished").
#[test]
fn a_truncating_open_whose_handle_went_while_it_waited_lets_io_go_on() {
    let mut h = Harness::new();
    let id = h.run(with_disposition(
        open("a", Rights::ALL),
        Disposition::OverwriteIf,
    ));
    let key = h.engine.handles.keys().copied().next();
    assert!(
        h.reply(id).is_none() && key.is_some(),
        "parked on its intent"
    );
    h.engine.remove(key.unwrap_or(ResumeKey(uuid::Uuid::nil())));
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::NoSuchHandle);
    assert!(h.engine.content_changes.is_empty());
}

/// The same, the intent's commit failing (a recorded size change on a
/// non-persistent handle, whose going no failed commit undoes): the
/// change is abandoned and leaves no count behind either.
#[test]
fn a_size_change_whose_handle_went_and_whose_intent_failed_lets_io_go_on() {
    let mut h = Harness::new();
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.durability = Durability::None;
    o.create_guid = None;
    let id = h.run(Request::Open(o));
    h.commit(true);
    let key = h.opened(id);
    h.run(Request::SetEndOfFile {
        key,
        size: 3,
        record: Some(RecordSpec {
            scope: session(1),
            op_id: 1,
            reply: "ok".into(),
            keep: 8,
        }),
    });
    h.engine.remove(key);
    h.commit(false);
    assert!(h.engine.content_changes.is_empty());
}

/// A non-persistent open of `path` (no create GUID) sharing everything.
fn plain_open(path: &str) -> Request {
    let Request::Open(mut o) = open(path, Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.durability = Durability::None;
    o.create_guid = None;
    Request::Open(o)
}

/// Two non-persistent handles of "a": one renames it a→x with a recorded
/// reply (an intent), made and its completion not yet committed; then the
/// other renames it x→a back, nothing recorded (at once). The rename
/// back's request id.
fn renamed_then_renamed_back(h: &mut Harness) -> u64 {
    let (x, y) = (h.run(plain_open("a")), h.run(plain_open("a")));
    h.commit(true);
    let (x, y) = (h.opened(x), h.opened(y));
    let record = RecordSpec {
        scope: session(1),
        op_id: 1,
        reply: "ok".into(),
        keep: 8,
    };
    let rename = |key, to: &str, record| Request::Rename {
        key,
        to: RelPath::new(to).unwrap(),
        replace: false,
        record,
    };
    h.run(rename(x, "x", Some(record)));
    for id in h.commit_holding_intents(true) {
        h.engine.finish_parked(id);
    }
    assert!(h.fs.file("x").is_some(), "the recorded rename is made");
    h.run(rename(y, "a", None))
}

/// A change made at once (no intent: a non-persistent handle, nothing
/// recorded) does not overtake a change of the same file whose intent is
/// in flight (`renamed_then_renamed_back`). Had the rename back been made
/// and answered, a crash then would leave the file at `a`, recovery would
/// take the recorded rename for one never made and drop it, and its replay
/// would rename a→x again over the acknowledged x→a.
#[test]
fn a_change_made_at_once_waits_for_a_change_of_its_file_in_flight() {
    let mut h = Harness::new();
    let back = renamed_then_renamed_back(&mut h);
    let back_answered = h.reply(back).is_some();
    // Killed before the first rename's completion commits.
    let h = h.restarted();
    // (Its scope is the session's as the filter owns it.)
    let recorded = h.engine.replays.values().any(|m| m.contains_key(&1));
    assert!(
        recorded && h.fs.file("x").is_some(),
        "recovery dropped the made rename (answered since: {back_answered}); \
         its replay would redo it over the rename back"
    );
    assert!(!back_answered, "answered, yet undone by the crash");
}

/// The same without a crash: the rename back runs once the first one's
/// completion is durable.
#[test]
fn a_change_made_at_once_runs_once_the_change_in_flight_is_durable() {
    let mut h = Harness::new();
    let back = renamed_then_renamed_back(&mut h);
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    assert!(matches!(
        h.reply(back),
        Some(Ok(libfilter::proto::Reply::Done))
    ));
    assert!(h.fs.file("a").is_some() && h.fs.file("x").is_none());
}

/// A change made at once also waits for one whose intent is still
/// committing (parked): it runs after that change is made and durable,
/// so both are made in the order they came.
#[test]
fn a_change_made_at_once_waits_for_a_parked_change_of_its_file() {
    let mut h = Harness::new();
    let (x, y) = (h.run(plain_open("a")), h.run(plain_open("a")));
    h.commit(true);
    let (x, y) = (h.opened(x), h.opened(y));
    let first = h.run(recorded_rename(x, "x", 1));
    let second = h.run(Request::Rename {
        key: y,
        to: RelPath::new("y").unwrap(),
        replace: false,
        record: None,
    });
    assert!(h.reply(second).is_none(), "waits for the first");
    for _ in 0..3 {
        h.commit(true);
        h.engine.process_retries();
    }
    let done = |id| matches!(h.reply(id), Some(Ok(libfilter::proto::Reply::Done)));
    assert!(done(first) && done(second));
    assert!(h.fs.file("y").is_some() && h.fs.file("x").is_none());
}

/// A second close of a persistent handle whose close is still committing
/// (rksmbd's close-settler re-sending a close whose answer never came) is
/// not answered "no such handle" before that commit (round 16): if the
/// commit fails the handle is back, and the second close fails with it,
/// so its sender closes again. Once the close is durable it is
/// `NoSuchHandle`.
#[test]
fn no_such_handle_waits_for_the_removal_it_shows() {
    let mut h = Harness::new();
    let id = h.run(open("n", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    let close = || Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    };
    h.run(close());
    let again = h.run(close());
    assert!(h.reply(again).is_none(), "not before the close commits");
    h.commit(false);
    assert_ne!(h.refused(again), ErrorCode::NoSuchHandle);
    assert!(h.engine.handles.contains_key(&key), "the close was undone");
    h.run(close());
    let again = h.run(close());
    h.commit(true);
    assert_eq!(h.refused(again), ErrorCode::NoSuchHandle);
    assert!(h.engine.handles.is_empty());
}

/// A truncating open whose truncation fails after its connection dropped:
/// the store does not keep the handle (whatever wrote its record
/// meanwhile).
#[test]
fn a_parked_open_that_fails_leaves_no_record() {
    let mut h = Harness::new();
    h.run(with_disposition(
        open("b", Rights::ALL),
        Disposition::Overwrite,
    ));
    let conn = h.conn;
    h.engine.begin_request();
    h.engine.on_closed(conn);
    h.fs.fail_next("truncate", libc::EIO);
    h.commit(true);
    assert!(h.engine.handles.is_empty());
    assert!(
        h.store.inner.lock().unwrap().handles.is_empty(),
        "a handle whose open failed is not recovered after a restart"
    );
}

/// A parked open whose handle goes before its intent is durable is still
/// answered.
#[test]
fn a_parked_open_closed_meanwhile_is_answered() {
    let mut h = Harness::new();
    let id = h.run(with_disposition(
        open("b", Rights::ALL),
        Disposition::Overwrite,
    ));
    let key = h.keys()[0];
    h.run(Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::NoSuchHandle);
    assert_eq!(
        h.fs.file("b").map(|f| f.size),
        Some(10),
        "nothing truncated"
    );
}

/// Inode reuse: a file deleted behind a disconnected handle's back and a
/// new one under the same name with the same inode number (next
/// generation) is not the handle's file — delete on close spares it.
#[test]
fn a_reused_inode_is_not_the_handles_file() {
    let mut h = Harness::new();
    h.fs.reuse_inodes(true);
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    h.run(Request::SetDeleteOnClose {
        key,
        delete: true,
        record: None,
    });
    h.commit(true);
    let old = h.fs.file("a").unwrap();
    h.fs.unlink("a");
    h.fs.put("a", 5);
    let new = h.fs.file("a").unwrap();
    assert_eq!((new.ino, new.gen), (old.ino, old.gen + 1));
    h.fs.take_log();
    h.run(Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    h.commit(true);
    assert_eq!(h.fs.file("a"), Some(new), "{:?}", h.fs.take_log());
}

/// A fresh engine (epoch 2) on `fs` and `store`, recovered.
fn recovered(fs: &MemFs, store: &Arc<MemStore>) -> Engine {
    try_recovered(fs, store).unwrap()
}

/// [`recovered`], or why recovery failed.
fn try_recovered(fs: &MemFs, store: &Arc<MemStore>) -> anyhow::Result<Engine> {
    let mut e = Engine::new(
        config(),
        Box::new(fs.clone()),
        2,
        Arc::new(Pipeline::default()),
        store.clone(),
        Arc::new(CommitCounters::default()),
    );
    e.recover(store.as_ref())?;
    Ok(e)
}

/// A persistent handle's stored record of `path` on `fs` (smb, frontend
/// smb-t, client alice, no create GUID), as recovery finds it.
fn persistent_record(fs: &MemFs, path: &str) -> HandleRecord {
    let path = RelPath::new(path).unwrap();
    let mut r = libfilter::testing::persistent_record(path.as_str());
    r.frontend = InstanceName::new("smb-t").unwrap();
    r.client = ClientId::new("alice").unwrap();
    r.create_guid = None;
    r.file = fs.file_at_checked(&path).unwrap().unwrap();
    r.kernel_handle = fs.identity_at(&path).map(|(_, kh)| kh);
    r.durability = Durability::Persistent { timeout_ms: 60_000 };
    r.create_action = CreateAction::Opened;
    r.opened_ms = 0;
    r
}

/// Restart recovery without files: an interrupted rename whose change
/// happened is finished (paths, reply), one that did not is dropped; a
/// handle whose file is gone is lost; the changed directories are synced
/// before the commit.
#[test]
fn recovery_finishes_or_drops_intents() {
    let h = Harness::new();
    let (fs, store) = (h.fs.clone(), h.store.clone());
    let rec = |path: &str| persistent_record(&fs, path);
    let (ra, rb, rc) = (rec("a"), rec("b"), rec("c"));
    let rename = |r: &HandleRecord, to: &str| Intent {
        id: IntentId(uuid::Uuid::new_v4()),
        change: IntentChange::Rename {
            key: r.key,
            from: r.path.clone(),
            to: RelPath::new(to).unwrap(),
            file: r.file,
            replace: false,
            record: None,
            kernel_handle: r.kernel_handle.clone(),
        },
        recorded_ms: 0,
    };
    // a was renamed to x before the crash; b's rename never happened; c
    // is gone.
    let (done, undone) = (rename(&ra, "x"), rename(&rb, "y"));
    fs.rename(&ra.path, &RelPath::new("x").unwrap(), ra.file, None, false)
        .unwrap();
    fs.unlink("c");
    store
        .commit(&[&[
            StoreOp::PutHandle(Box::new(ra.clone())),
            StoreOp::PutHandle(Box::new(rb.clone())),
            StoreOp::PutHandle(Box::new(rc.clone())),
            StoreOp::PutIntent(Box::new(done)),
            StoreOp::PutIntent(Box::new(undone)),
        ]])
        .unwrap();
    fs.take_log();
    let e = recovered(&fs, &store);
    let m = store.inner.lock().unwrap().clone();
    assert!(m.intents.is_empty());
    assert_eq!(m.handles[&ra.key].path.as_str(), "x");
    assert_eq!(m.handles[&rb.key].path.as_str(), "b");
    assert_eq!(m.handles[&rc.key].conn, ConnState::Lost);
    assert_eq!(e.handles[&ra.key].rec.path.as_str(), "x");
    assert!(matches!(
        e.handles[&rb.key].rec.conn,
        ConnState::Disconnected { .. }
    ));
    assert_eq!(e.handles[&rc.key].rec.conn, ConnState::Lost);
    assert!(
        fs.file("y").is_none(),
        "a rename that did not happen is not redone"
    );
    let log = fs.take_log();
    assert!(log.contains(&Logged::Fsync("/".into())), "{log:?}");
    assert!(
        !log.iter()
            .any(|l| matches!(l, Logged::Rename(..) | Logged::Remove(_))),
        "{log:?}"
    );
}

/// Review rr45h F1: recovery records its lost marks in commits of at most
/// the store's `commit_step_ops`. On a store with no room for them it
/// refuses to start (re-review rr46c F1: served lost but recorded
/// disconnected, a handle whose file came back was resumable again at the
/// next start, its locks beside others'); with room, the next start
/// records them. Stale records of non-persistent handles alone do not
/// stop a start on a full store: every start drops them.
#[test]
fn recovery_records_lost_handles_in_steps_and_serves_without_room() {
    let h = Harness::new();
    let (fs, store) = (h.fs.clone(), h.store.clone());
    for i in 0..5 {
        fs.put(&format!("f{i}"), 1);
    }
    let recs: Vec<HandleRecord> = (0..5)
        .map(|i| persistent_record(&fs, &format!("f{i}")))
        .collect();
    let kept = persistent_record(&fs, "a");
    let mut puts: Vec<StoreOp> = recs
        .iter()
        .map(|r| StoreOp::PutHandle(Box::new(r.clone())))
        .collect();
    puts.push(StoreOp::PutHandle(Box::new(kept.clone())));
    store.commit(&[&puts]).unwrap();
    for i in 0..5 {
        fs.unlink(&format!("f{i}"));
    }
    let stored_lost = || {
        let m = store.inner.lock().unwrap();
        recs.iter()
            .filter(|r| m.handles[&r.key].conn == ConnState::Lost)
            .count()
    };
    let check = |e: &Engine| {
        for r in &recs {
            assert_eq!(e.handles[&r.key].rec.conn, ConnState::Lost);
        }
        assert!(matches!(
            e.handles[&kept.key].rec.conn,
            ConnState::Disconnected { .. }
        ));
    };
    store.inner.lock().unwrap().fail = true;
    assert!(try_recovered(&fs, &store).is_err(), "lost marks unrecorded");
    assert_eq!(stored_lost(), 0, "nothing could be recorded");
    let seq = {
        let mut m = store.inner.lock().unwrap();
        m.fail = false;
        m.step_ops = 2;
        m.seq
    };
    check(&recovered(&fs, &store));
    assert_eq!(stored_lost(), 5);
    assert_eq!(
        store.inner.lock().unwrap().seq - seq,
        3,
        "five marks, two a commit"
    );
    // A stale non-persistent record and no room: served, deleted later.
    let mut stale = persistent_record(&fs, "a");
    stale.key = ResumeKey::new_random();
    stale.durability = Durability::Durable { timeout_ms: 60_000 };
    store
        .commit(&[&[StoreOp::PutHandle(Box::new(stale.clone()))]])
        .unwrap();
    store.inner.lock().unwrap().fail = true;
    let e = recovered(&fs, &store);
    assert!(!e.handles.contains_key(&stale.key));
    assert!(store.inner.lock().unwrap().handles.contains_key(&stale.key));
    store.inner.lock().unwrap().fail = false;
    recovered(&fs, &store);
    assert!(!store.inner.lock().unwrap().handles.contains_key(&stale.key));
}

/// Re-review rr46c F4, rr47a F5: recovery's steps weigh each operation
/// by the trees it touches and its large values. A stale non-persistent
/// record's delete touches its record alone (its replay scope is never
/// stored): with a step of four, five such deletes take two commits (at
/// two each, three). A lost mark of a handle with a 4 KiB path and 64
/// locks (two overflow pages) weighs two: five take three commits, not
/// two, as they would at one an operation.
#[test]
fn recovery_steps_weigh_what_each_operation_touches() {
    let h = Harness::new();
    let (fs, store) = (h.fs.clone(), h.store.clone());
    let stale: Vec<HandleRecord> = (0..5)
        .map(|_| {
            let mut r = persistent_record(&fs, "a");
            r.key = ResumeKey::new_random();
            r.durability = Durability::Durable { timeout_ms: 60_000 };
            r
        })
        .collect();
    let large: Vec<HandleRecord> = (0..5)
        .map(|i| {
            let mut r = persistent_record(&fs, "a");
            r.key = ResumeKey::new_random();
            // Gone: no file at its path nor by its identity.
            r.path = RelPath::new(vec![format!("{i}").repeat(200); 20].join("/")).unwrap();
            r.file = FileId { dev: 9, ino: 9 };
            r.kernel_handle = None;
            r.locks = (0..64)
                .map(|o| HeldLock {
                    range: LockRange {
                        offset: o * 100,
                        length: 10,
                    },
                    kind: libfilter::locks::LockKind::Exclusive,
                })
                .collect();
            r
        })
        .collect();
    let put = |r: &HandleRecord| StoreOp::PutHandle(Box::new(r.clone()));
    let lost_mark = |r: &HandleRecord| {
        put(&HandleRecord {
            conn: ConnState::Lost,
            ..r.clone()
        })
    };
    assert!(large
        .iter()
        .all(|r| libfilter::store::step_weight(&lost_mark(r)) == 2));
    let puts: Vec<StoreOp> = stale.iter().chain(&large).map(put).collect();
    store.commit(&[&puts]).unwrap();
    let seq = {
        let mut m = store.inner.lock().unwrap();
        m.step_ops = 4;
        m.seq
    };
    recovered(&fs, &store);
    let m = store.inner.lock().unwrap();
    assert!(stale.iter().all(|r| !m.handles.contains_key(&r.key)));
    assert!(large
        .iter()
        .all(|r| m.handles.get(&r.key).map(|r| r.conn) == Some(ConnState::Lost)));
    assert_eq!(
        m.seq - seq,
        2 + 3,
        "five deletes of one tree, four a commit; five lost marks of two overflow pages, two a commit"
    );
}

/// Recovery of many handles (the name indexes are filled on a thread of
/// their own while the files are looked at): every handle is in the table
/// in key order, the per-client, per-frontend and
/// create-GUID indexes count each once (lost ones too, which the file
/// index leaves out), and a handle whose
/// file is gone is lost — the same tables one insert at a time would give.
#[test]
fn recovery_of_many_handles_fills_every_index_once() {
    let fs = MemFs::new();
    let n = 1_500usize;
    for i in 0..n {
        fs.put(&format!("f{i}"), 1);
    }
    let h = Harness::on(fs.clone());
    let store = h.store.clone();
    let clients = ["alice", "bob", "carol"];
    let recs: Vec<HandleRecord> = (0..n)
        .map(|i| HandleRecord {
            protocol: Protocol::new(if i % 2 == 0 { "smb" } else { "nfs" }).unwrap(),
            frontend: InstanceName::new(format!("fe-{}", i % 4)).unwrap(),
            client: ClientId::new(clients[i % 3]).unwrap(),
            create_guid: (i % 5 != 0).then(|| CreateGuid(uuid::Uuid::new_v4())),
            lease: (i % 7 == 0).then(|| HeldLease {
                key: LeaseKey(uuid::Uuid::new_v4()),
                state: LeaseState::parse("RH").unwrap(),
                epoch: 1,
            }),
            ..persistent_record(&fs, &format!("f{i}"))
        })
        .collect();
    let ops: Vec<StoreOp> = recs
        .iter()
        .map(|r| StoreOp::PutHandle(Box::new(r.clone())))
        .collect();
    store.commit(&[&ops]).unwrap();
    fs.unlink("f7");
    let e = recovered(&fs, &store);
    assert_eq!(e.handles.len(), n);
    let mut keys: Vec<ResumeKey> = recs.iter().map(|r| r.key).collect();
    keys.sort();
    assert!(e.handles.keys().copied().eq(keys));
    assert_eq!(e.handles[&recs[7].key].rec.conn, ConnState::Lost);
    // The file index holds every handle but the lost one (its file id may
    // be another file's by now: `Engine::lose`).
    assert_eq!(e.by_file.values().map(Vec::len).sum::<usize>(), n - 1);
    assert!(e.by_file.values().flatten().all(|k| *k != recs[7].key));
    for c in clients {
        let count = recs.iter().filter(|r| r.client.as_str() == c).count();
        let by_protocol: usize = e
            .per_client
            .iter()
            .filter(|((_, cl), _)| cl.as_str() == c)
            .map(|(_, k)| *k)
            .sum();
        assert_eq!(by_protocol, count, "client {c}");
    }
    assert_eq!(e.per_frontend.values().sum::<usize>(), n);
    assert_eq!(e.per_frontend.len(), 4);
    let guids: Vec<_> = recs.iter().filter(|r| r.create_guid.is_some()).collect();
    assert_eq!(e.by_guid.len(), guids.len());
    assert_eq!(e.guid_clients.len(), guids.len());
    for r in guids {
        let g = r.create_guid.unwrap();
        assert_eq!(e.by_guid[&(r.client.clone(), g)], r.key);
        assert_eq!(e.guid_clients[&g], 1);
    }
    // Every handle's expiry is queued, the lost one's too.
    assert_eq!(e.expiries.len(), n);
    // Lease keys are indexed on the file each handle was found at; the
    // lost one's not at all.
    let leased: Vec<_> = recs
        .iter()
        .filter(|r| r.lease.is_some() && r.key != recs[7].key)
        .collect();
    assert!(recs[7].lease.is_some());
    assert_eq!(e.lease_files.len(), leased.len());
    for r in leased {
        let l = r.lease.unwrap();
        assert_eq!(e.lease_files[&(r.client.clone(), l.key)], (r.file, 1));
    }
    // The records share the counts' copies of their names.
    for hd in e.handles.values() {
        let (p, c) = e
            .per_client
            .get_key_value(&(hd.rec.protocol.clone(), hd.rec.client.clone()))
            .unwrap()
            .0;
        assert!(std::ptr::eq(p.as_str(), hd.rec.protocol.as_str()));
        assert!(std::ptr::eq(c.as_str(), hd.rec.client.as_str()));
        let f = e.per_frontend.get_key_value(&hd.rec.frontend).unwrap().0;
        assert!(std::ptr::eq(f.as_str(), hd.rec.frontend.as_str()));
    }
    let stored: HashMap<ResumeKey, &HandleRecord> = recs.iter().map(|r| (r.key, r)).collect();
    for hd in e.handles.values() {
        let was = HandleRecord {
            conn: hd.rec.conn,
            ..stored[&hd.rec.key].clone()
        };
        assert_eq!(hd.rec, was);
    }
}

/// Issue 12's rollback review, F1: a local process's open of a file whose
/// persistent create is committing waits for the outcome — refused when
/// the failed commit unlinks the file again, let through when it commits.
/// Old code let it through at once, and a failed commit then unlinked the
/// file it was writing.
#[test]
fn a_local_open_of_a_create_still_committing_waits_for_its_outcome() {
    // Also when the create's handle is closed again before the commit.
    for (ok, closed) in [(false, false), (true, false), (false, true)] {
        let mut h = Harness::new();
        let id = h.run(open("n", Rights::ALL));
        let (key, file) = only_handle(&h);
        if closed {
            h.run(Request::Close {
                key,
                put: vec![],
                delete: vec![],
                delete_on_close: None,
            });
        }
        let rx = local_open(&mut h, file);
        assert!(rx.try_recv().is_err(), "decided before the create commits");
        assert_eq!(h.engine.stats.local_opens_waited_for_commit, 1);
        h.commit(ok);
        h.engine.process_retries();
        let verdict = rx.try_recv().expect("decided once the commit is resolved");
        if ok {
            assert_eq!(verdict, crate::command::Verdict::Allow);
            h.opened(id);
            assert!(h.fs.file("n").is_some());
        } else {
            assert_eq!(verdict, crate::command::Verdict::Deny);
            assert_eq!(h.refused(id), ErrorCode::DiskFull);
            assert!(h.fs.file("n").is_none(), "{:?}", h.fs.snapshot());
        }
    }
}

/// Review: a local open waiting for its file's create to commit, refused
/// by the reader's watchdog at its verdict deadline meanwhile, is dropped
/// when the commit resolves — no lease broken, no state changed for an
/// open that never happened. Before, the engine ran it then and broke
/// the creator's lease. So is one whose deadline passed while it waited,
/// the commit resolving before the watchdog woke (before, review: the
/// engine took it then and broke the lease). The same open in time
/// breaks it (the control), and one whose deadline passed before it
/// could wait is dropped at once.
#[test]
fn a_local_open_the_watchdog_refused_while_it_waited_does_nothing() {
    use crate::command::EventClaim;
    use libfilter::lease::{LeaseKey, LeaseState};
    use libfilter::proto::Event;
    use std::time::Duration;
    let is_break = |e: &Event| matches!(e, Event::LeaseBreak { .. });
    // Refused by the watchdog while it waited; its deadline passed while
    // it waited, the watchdog not awake yet; neither (the control).
    for (refused, late) in [(true, false), (false, true), (false, false)] {
        let mut h = Harness::new();
        let Request::Open(mut o) = open("n", Rights::ALL) else {
            unreachable!("open() makes an open")
        };
        o.lease = Some(LeaseRequest {
            key: LeaseKey(uuid::Uuid::new_v4()),
            state: LeaseState::parse("RWH").unwrap(),
            epoch: 0,
        });
        let id = h.run(Request::Open(o));
        let (key, file) = only_handle(&h);
        let lease = h.engine.handles[&key].rec.lease;
        // An hour away, moved past by the test (never a sleep past a near
        // deadline, which a loaded machine may overshoot before the take).
        let deadline = std::time::Instant::now() + Duration::from_secs(3600);
        let claim = EventClaim::new(deadline);
        let rx = local_open_claimed(&mut h, file, claim.clone());
        assert_eq!(h.engine.stats.local_opens_waited_for_commit, 1);
        if refused {
            assert!(claim.watchdog_refuses(), "the engine let it go to wait");
        }
        if late {
            claim.pass_deadline();
        }
        h.commit(true);
        h.engine.process_retries();
        // A persistent holder's break goes out once its epoch is durable.
        h.commit(true);
        h.drain_replies();
        h.opened(id);
        assert!(rx.try_recv().is_err(), "waits for the break, or dropped");
        if refused || late {
            assert!(!h.events.iter().any(is_break), "{:?}", h.events);
            assert!(h.engine.breaking.is_empty());
            assert!(h.engine.waiting_local.is_empty());
            assert_eq!(h.engine.handles[&key].rec.lease, lease);
            assert_eq!(h.engine.stats.local_opens_past_deadline, 1);
        } else {
            assert!(!h.engine.breaking.is_empty());
            assert!(h.events.iter().any(is_break), "{:?}", h.events);
            assert!(!claim.watchdog_refuses(), "the engine holds it");
            assert_eq!(h.engine.stats.local_opens_past_deadline, 0);
        }
    }
    // Past its deadline before it could wait: dropped at once.
    let mut h = Harness::new();
    h.run(open("n", Rights::ALL));
    let (_, file) = only_handle(&h);
    let claim = EventClaim::new(std::time::Instant::now());
    let rx = local_open_claimed(&mut h, file, claim.clone());
    assert!(h.engine.waiting_local.is_empty());
    assert!(rx.try_recv().is_err(), "no verdict: the drop refuses it");
    assert_eq!(h.engine.stats.local_opens_past_deadline, 1);
    assert!(
        !claim.engine_takes(),
        "refused: the engine may not act for it"
    );
}

/// A non-persistent open by another client (no create GUID).
fn bobs(path: &str, access: Rights, d: Disposition) -> Request {
    match open(path, Rights::ALL) {
        Request::Open(mut o) => {
            o.client = ClientId::new("bob").unwrap();
            o.access = Access::new(access).unwrap();
            o.durability = Durability::None;
            o.create_guid = None;
            o.disposition = d;
            Request::Open(o)
        }
        other => other,
    }
}

/// Issue 12's rollback review, F2′: a change made at once (no intent) to
/// a file whose persistent handle's CLOSE is committing — a truncating
/// open, a remove, a rename over it — waits for that commit. When it
/// fails, the handle is back with its share mode (reading only), and the
/// change is refused by it instead of having been made under it; when it
/// commits, the change goes ahead. Old code made each change at once.
#[test]
fn changes_made_at_once_wait_for_a_pending_close_of_their_file() {
    let rw = Rights::READ.union(Rights::WRITE).union(Rights::DELETE);
    for case in ["overwrite", "remove", "rename over"] {
        for ok in [false, true] {
            let mut h = Harness::new();
            let p = h.run(open("b", Rights::READ));
            let a = h.run(bobs("a", rw, Disposition::Open));
            h.commit(true);
            let (p, a) = (h.opened(p), h.opened(a));
            let before = h.fs.file("b");
            let close = h.run(Request::Close {
                key: p,
                put: vec![],
                delete: vec![],
                delete_on_close: None,
            });
            let req = match case {
                "overwrite" => bobs("b", rw, Disposition::Overwrite),
                "remove" => Request::Remove {
                    path: RelPath::new("b").unwrap(),
                    record: None,
                },
                _ => Request::Rename {
                    key: a,
                    to: RelPath::new("b").unwrap(),
                    replace: true,
                    record: None,
                },
            };
            let id = h.run(req);
            assert_eq!(
                h.fs.file("b"),
                before,
                "{case}: changed before the close commits"
            );
            assert!(h.reply(id).is_none(), "{case}");
            h.commit(ok);
            h.engine.process_retries();
            h.commit(true);
            h.drain_replies();
            if ok {
                assert!(h.reply(close).is_some_and(|r| r.is_ok()));
                assert!(
                    h.reply(id).is_some_and(|r| r.is_ok()),
                    "{case}: {:?}",
                    h.reply(id)
                );
                assert_ne!(h.fs.file("b"), before, "{case}");
            } else {
                assert_eq!(h.refused(close), ErrorCode::DiskFull);
                assert!(h.engine.handles.contains_key(&p), "the close is undone");
                assert_eq!(h.refused(id), ErrorCode::SharingViolation, "{case}");
                assert_eq!(h.fs.file("b"), before, "{case}: changed under the handle");
            }
        }
    }
}

/// F2′ for delete on close: the last open of a file, non-persistent with
/// delete on close, closes while a persistent handle's close of the same
/// file is committing. The unlink waits: if that commit fails, the handle
/// is back and the delete passes to it (as to any open that remains);
/// if it commits, the file goes. Old code unlinked it at once.
#[test]
fn a_delete_on_close_waits_for_a_pending_close_of_the_file() {
    let rw = Rights::READ.union(Rights::WRITE).union(Rights::DELETE);
    for ok in [false, true] {
        let mut h = Harness::new();
        let p = h.run(open("b", Rights::ALL));
        let n = h.run(bobs("b", rw, Disposition::Open));
        h.commit(true);
        let (p, n) = (h.opened(p), h.opened(n));
        h.run(Request::SetDeleteOnClose {
            key: n,
            delete: true,
            record: None,
        });
        h.commit(true);
        let before = h.fs.file("b");
        h.run(Request::Close {
            key: p,
            put: vec![],
            delete: vec![],
            delete_on_close: None,
        });
        let close_n = h.run(Request::Close {
            key: n,
            put: vec![],
            delete: vec![],
            delete_on_close: None,
        });
        assert_eq!(h.fs.file("b"), before, "unlinked before the close commits");
        // Its CLOSE waits too: answered at once, the client was told its
        // last open closed while the file was still there (CI).
        assert!(h.reply(close_n).is_none(), "{:?}", h.reply(close_n));
        h.commit(ok);
        h.engine.process_retries();
        h.commit(true);
        assert!(
            matches!(h.reply(close_n), Some(Ok(libfilter::proto::Reply::Done))),
            "{:?}",
            h.reply(close_n)
        );
        if ok {
            assert!(h.fs.file("b").is_none(), "{:?}", h.fs.snapshot());
        } else {
            assert_eq!(h.fs.file("b"), before);
            assert!(
                h.engine.handles[&p].rec.delete_on_close,
                "passed to the handle that is back"
            );
            assert!(h.store.inner.lock().unwrap().handles[&p].delete_on_close);
        }
    }
}

impl Harness {
    /// The lease request `id`'s open holds.
    fn lease_of(&self, id: u64) -> Option<HeldLease> {
        match self.reply(id) {
            Some(Ok(libfilter::proto::Reply::Opened(o))) => o.lease,
            other => panic!("request {id} did not open: {other:?}"),
        }
    }
}

impl Harness {
    /// The epochs of the lease breaks the frontend was sent, in order.
    fn break_epochs(&self) -> Vec<u16> {
        self.events
            .iter()
            .filter_map(|e| match e {
                libfilter::proto::Event::LeaseBreak { epoch, .. } => Some(*epoch),
                _ => None,
            })
            .collect()
    }
}

/// A failed commit undoes a lock of a non-persistent handle that waited
/// for it, and nothing else of that handle: a lease change made meanwhile
/// that waited for no commit stays, at its epoch (review: the whole record
/// was put back, the lease at its old epoch, and the next break repeated
/// an epoch the client had seen).
#[test]
fn a_failed_commit_undoes_a_lock_but_not_a_lease_change_made_meanwhile() {
    let mut h = Harness::new();
    let st = |s: &str| libfilter::lease::LeaseState::parse(s).unwrap();
    let lk = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let p = h.run(open("a", Rights::ALL));
    h.commit(true);
    let kp = h.opened(p);
    let b = h.run(leased_open("bob", "a", lk, st("RH"), 0));
    h.commit(true);
    let kb = h.opened(b);
    let before = h.lease_of(b).expect("a lease");
    // The persistent handle's lock commits; bob's lock waits for it.
    h.run(lock_byte_8(kp, false));
    let bobs_lock = h.run(Request::Lock {
        key: kb,
        locks: vec![LockOp {
            range: LockRange {
                offset: 20,
                length: 1,
            },
            exclusive: true,
            unlock: false,
        }],
        lock_sequence: None,
        lock_owner: None,
    });
    assert!(h.reply(bobs_lock).is_none(), "waits for the commit");
    // The persistent handle's lock broke bob's read caching (RH to H, as
    // a write does); bob acknowledges: that waits for nothing.
    let lowered = h.run(Request::LeaseBreakAck {
        lease_key: lk,
        state: st("H"),
        client: None,
    });
    assert!(
        matches!(
            h.reply(lowered),
            Some(Ok(libfilter::proto::Reply::Lease(_)))
        ),
        "{:?}",
        h.reply(lowered)
    );
    h.commit(false);
    h.refused(bobs_lock);
    let rec = &h.engine.handles[&kb].rec;
    assert!(rec.locks.is_empty(), "{:?}", rec.locks);
    let now = rec.lease.expect("still leased");
    assert_eq!((now.state, now.epoch), (st("H"), before.epoch + 1));
}

/// A non-durable open of `path` by `client` under lease `key`.
fn leased_open(
    client: &str,
    path: &str,
    key: libfilter::lease::LeaseKey,
    state: libfilter::lease::LeaseState,
    epoch: u16,
) -> Request {
    let Request::Open(mut o) = open(path, Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.client = ClientId::new(client).unwrap();
    o.durability = Durability::None;
    o.create_guid = None;
    o.lease = Some(LeaseRequest { key, state, epoch });
    Request::Open(o)
}

/// A lease key names one file of its client's (MS-SMB2 3.3.5.9.8): an open
/// of another file under it is refused before anything is created, another
/// client may use it, and it is free again once its last handle is closed.
/// A second open under a held key upgrades only to a superset; a new
/// lease's epoch is one above the request's.
#[test]
fn a_lease_key_names_one_file_of_its_clients() {
    let mut h = Harness::new();
    let key = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let st = |s: &str| libfilter::lease::LeaseState::parse(s).unwrap();
    let leased = |client: &str, path: &str, state: &str, epoch: u16| {
        leased_open(client, path, key, st(state), epoch)
    };
    let a = h.run(leased("alice", "a", "RH", 0x4711));
    h.commit(true);
    let ka = h.opened(a);
    let l = h.lease_of(a).expect("a lease");
    assert_eq!((l.state, l.epoch), (st("RH"), 0x4712));
    // RW is no superset of RH: the lease stays; RWH is, and it upgrades.
    let a2 = h.run(leased("alice", "a", "RW", 0));
    h.commit(true);
    assert_eq!(h.lease_of(a2).map(|l| l.state), Some(st("RH")));
    let a3 = h.run(leased("alice", "a", "RWH", 0));
    h.commit(true);
    let l = h.lease_of(a3).expect("a lease");
    assert_eq!((l.state, l.epoch), (st("RWH"), 0x4713));
    // Another file under the key: refused, and nothing created.
    let b = h.run(leased("alice", "e", "R", 0));
    h.commit(true);
    assert_eq!(h.refused(b), ErrorCode::LeaseKeyInUse);
    let Request::Open(mut plain) = open("e", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    plain.disposition = Disposition::Create;
    plain.durability = Durability::None;
    plain.create_guid = None;
    let created = h.run(Request::Open(plain));
    h.commit(true);
    let kb = h.opened(created);
    // Another client's key is its own.
    let bob = h.run(leased("bob", "e", "R", 0));
    h.commit(true);
    let kbob = h.opened(bob);
    // Closed everywhere, the key is free for another file.
    for k in [ka, h.opened(a2), h.opened(a3), kb, kbob] {
        h.run(Request::Close {
            key: k,
            put: vec![],
            delete: vec![],
            delete_on_close: None,
        });
        h.commit(true);
    }
    let again = h.run(leased("alice", "e", "R", 0));
    h.commit(true);
    h.opened(again);
}

/// Another client's open under a lease key a client holds on the file is
/// not under that lease: it breaks it as an open of another key would, and
/// gets no lease of its own under the key (review, session 27: both were
/// granted RWH, and both cached writes).
#[test]
fn another_clients_open_under_a_held_lease_key_breaks_it() {
    let mut h = Harness::new();
    let key = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let st = |s: &str| libfilter::lease::LeaseState::parse(s).unwrap();
    let leased = |client: &str| leased_open(client, "a", key, st("RWH"), 0);
    let alice = h.run(leased("alice"));
    h.commit(true);
    h.opened(alice);
    assert_eq!(h.lease_of(alice).map(|l| l.state), Some(st("RWH")));
    let bob = h.run(leased("bob"));
    h.commit(true);
    assert!(
        h.events
            .iter()
            .any(|e| matches!(e, Event::LeaseBreak { lease_key, .. } if *lease_key == key)),
        "alice's lease is not broken: {:?}",
        h.events
    );
    assert!(h.reply(bob).is_none(), "waits for alice's acknowledgement");
    // Alice acknowledges each break (down to none: bob writes).
    for _ in 0..3 {
        let Some(to) = h.events.iter().rev().find_map(|e| match e {
            Event::LeaseBreak {
                new_state,
                ack_required: true,
                ..
            } => Some(*new_state),
            _ => None,
        }) else {
            break;
        };
        h.run(Request::LeaseBreakAck {
            lease_key: key,
            state: to,
            client: None,
        });
        h.commit(true);
        h.engine.process_retries();
        h.commit(true);
        h.drain_replies();
        if h.reply(bob).is_some() {
            break;
        }
    }
    h.opened(bob);
    assert_eq!(h.lease_of(bob), None, "bob shares alice's lease");
}

/// A lease break acknowledgement settles the lease of the client it names,
/// never another client's under the same key on another file of the same
/// connection (review: alice's ack under her key found the break of bob's
/// lease under it on b, set bob's lease to none unflushed and let carol
/// in; bob's own ack was then refused). Naming no client, the ack is
/// refused while the key is held here by two.
#[test]
fn a_lease_break_ack_settles_only_its_own_clients_lease() {
    let mut h = Harness::new();
    let k = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let st = |s: &str| libfilter::lease::LeaseState::parse(s).unwrap();
    let ack = |state: &str, client: Option<&str>| Request::LeaseBreakAck {
        lease_key: k,
        state: st(state),
        client: client.map(|c| ClientId::new(c).unwrap()),
    };
    let alice = h.run(leased_open("alice", "a", k, st("RWH"), 0));
    h.commit(true);
    assert_eq!(h.lease_of(alice).map(|l| l.state), Some(st("RWH")));
    let bob = h.run(leased_open("bob", "b", k, st("RWH"), 0));
    h.commit(true);
    let kbob = h.opened(bob);
    assert_eq!(h.lease_of(bob).map(|l| l.state), Some(st("RWH")));
    // Carol writes b: bob's lease breaks, and carol waits for his ack.
    let Request::Open(mut o) = bobs("b", Rights::READ.union(Rights::WRITE), Disposition::Open)
    else {
        unreachable!("bobs() makes an open")
    };
    o.client = ClientId::new("carol").unwrap();
    let carol = h.run(Request::Open(o));
    h.commit(true);
    let to = h
        .events
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::LeaseBreak {
                lease_key,
                new_state,
                ack_required: true,
                ..
            } if *lease_key == k => Some(*new_state),
            _ => None,
        })
        .expect("bob's lease breaks");
    assert!(h.reply(carol).is_none(), "waits for bob");
    let bobs_lease = |h: &Harness| h.engine.handles[&kbob].rec.lease.map(|l| l.state);
    // Alice's ack, named: her lease on a has no break; she holds RWH, so it
    // lowers hers (to none), and bob's stays as it was.
    let hers = h.run(ack("", Some("alice")));
    h.commit(true);
    assert!(
        h.reply(hers).is_some_and(|r| r.is_ok()),
        "{:?}",
        h.reply(hers)
    );
    assert_eq!(bobs_lease(&h), Some(st("RWH")));
    // Unnamed, while two clients hold the key here: refused.
    let unnamed = h.run(ack(&to.to_string(), None));
    h.commit(true);
    assert_eq!(h.refused(unnamed), ErrorCode::LeaseKeyInUse);
    h.engine.process_retries();
    h.commit(true);
    assert!(h.reply(carol).is_none(), "still waits for bob");
    assert_eq!(bobs_lease(&h), Some(st("RWH")));
    // Bob's own ack settles it.
    let his = h.run(ack(&to.to_string(), Some("bob")));
    h.commit(true);
    assert!(
        h.reply(his).is_some_and(|r| r.is_ok()),
        "{:?}",
        h.reply(his)
    );
    assert_eq!(bobs_lease(&h), Some(to));
}

/// A break of a lease whose grant waits for a commit goes out only after
/// that grant (review: a non-persistent holder's break went out at once,
/// ahead of the open reply granting the lease; the frontend, knowing no
/// such lease, dropped it, and the breaking open waited the whole break
/// timeout). If the commit fails, neither goes out, and the breaking open
/// does not wait for the break.
#[test]
fn a_break_never_overtakes_the_reply_that_granted_the_lease() {
    use libfilter::proto::Event;
    for ok in [true, false] {
        let mut h = Harness::new();
        let key = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
        let rh = libfilter::lease::LeaseState::parse("RH").unwrap();
        // A persistent open of the file, committing.
        h.run(open("a", Rights::ALL));
        // Carol's durable open shows the file: it waits for that commit.
        let Request::Open(mut o) = leased_open("carol", "a", key, rh, 0) else {
            unreachable!("leased_open() makes an open")
        };
        o.durability = Durability::Durable { timeout_ms: 60_000 };
        let carol = h.run(Request::Open(o));
        assert!(h.reply(carol).is_none(), "answered before the commit");
        // Bob's open breaks carol's lease meanwhile.
        let rw = Rights::READ.union(Rights::WRITE);
        let bob = h.run(bobs("a", rw, Disposition::Open));
        let is_break =
            |e: &Event| matches!(e, Event::LeaseBreak { lease_key, .. } if *lease_key == key);
        assert!(
            !h.events.iter().any(is_break),
            "a break of a lease not granted yet: {:?}",
            h.events
        );
        h.commit(ok);
        if !ok {
            h.engine.process_retries();
            h.commit(true);
            assert_eq!(h.refused(carol), ErrorCode::DiskFull);
            assert!(!h.events.iter().any(is_break), "{:?}", h.events);
            h.opened(bob);
            continue;
        }
        assert_eq!(h.lease_of(carol).map(|l| l.state), Some(rh));
        let granted = h.arrived.iter().position(|a| *a == Arrived::Reply(carol));
        let broken = h
            .arrived
            .iter()
            .position(|a| matches!(a, Arrived::Event(i) if is_break(&h.events[*i])));
        assert!(
            broken.is_some(),
            "carol's lease is not broken: {:?}",
            h.events
        );
        assert!(granted < broken, "the break came first: {:?}", h.arrived);
    }
}

/// The same for a persistent open parked on its truncation's intent: a
/// break of the lease it holds meanwhile (here by another handle's lock:
/// another open waits for the truncation) is held until its reply
/// (review follow-up: the break went out once the intent and the
/// breaking request committed, before the open's reply was even built).
#[test]
fn a_break_of_a_parked_opens_lease_follows_its_reply() {
    use libfilter::proto::Event;
    let mut h = Harness::new();
    let bob = bobs_handle(&mut h, false);
    let key = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let rh = libfilter::lease::LeaseState::parse("RH").unwrap();
    let Request::Open(mut o) = leased_open("carol", "a", key, rh, 0) else {
        unreachable!("leased_open() makes an open")
    };
    o.durability = Durability::Persistent { timeout_ms: 60_000 };
    o.create_guid = Some(CreateGuid(uuid::Uuid::new_v4()));
    o.disposition = Disposition::OverwriteIf;
    let carol = h.run(Request::Open(o));
    h.run(lock_byte_8(bob, false));
    let intents = h.commit_holding_intents(true);
    assert!(
        h.events.is_empty(),
        "the open is not answered yet: {:?}",
        h.events
    );
    for id in intents {
        h.engine.finish_parked(id);
    }
    h.commit(true);
    assert_eq!(h.lease_of(carol).map(|l| l.state), Some(rh));
    let broken = h.arrived.iter().position(|a| {
        matches!(a, Arrived::Event(i) if matches!(h.events[*i], Event::LeaseBreak { lease_key, .. } if lease_key == key))
    });
    let granted = h.arrived.iter().position(|a| *a == Arrived::Reply(carol));
    assert!(
        broken.is_some(),
        "carol's lease is not broken: {:?}",
        h.events
    );
    assert!(granted < broken, "the break came first: {:?}", h.arrived);
}

/// Whether an `Expired` or `Purged` event of `key` reached the frontend.
fn told_gone(h: &Harness, key: ResumeKey) -> bool {
    use libfilter::proto::Event;
    h.events
        .iter()
        .any(|e| matches!(e, Event::Expired { key: k } | Event::Purged { key: k } if *k == key))
}

/// An expiry whose commit fails is undone whole: the handle is back as it
/// was (disconnected, its locks held, its share mode enforced), its
/// frontend was never told it expired, and its expiry is tried again —
/// and told once that commit is durable.
#[test]
fn an_expiry_whose_commit_fails_is_undone_and_tried_again() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::READ));
    h.commit(true);
    let key = h.opened(id);
    h.run(Request::Lock {
        key,
        locks: vec![LockOp {
            range: LockRange {
                offset: 0,
                length: 10,
            },
            exclusive: true,
            unlock: false,
        }],
        lock_sequence: None,
        lock_owner: None,
    });
    h.run(Request::Detach {
        key,
        delete_on_close: None,
    });
    h.commit(true);
    let before = h.digest();
    h.engine.expire_due(u64::MAX);
    h.drain_replies();
    assert!(!told_gone(&h, key), "told of an expiry not yet durable");
    h.commit(false);
    assert!(!told_gone(&h, key), "told of an expiry that failed");
    assert_eq!(h.digest(), before, "the expiry is undone whole");
    assert!(h.store.inner.lock().unwrap().handles.contains_key(&key));
    // Its share mode still keeps a writer out.
    let mut w = open("a", Rights::ALL);
    if let Request::Open(o) = &mut w {
        o.client = ClientId::new("bob").unwrap();
        o.no_wait = true;
    }
    let id = h.run(w);
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::FileNotAvailable);
    // Tried again later: it goes, and the frontend hears of it then.
    h.engine.expire_due(u64::MAX);
    h.commit(true);
    assert!(!h.engine.handles.contains_key(&key));
    assert!(!h.store.inner.lock().unwrap().handles.contains_key(&key));
    assert!(h.engine.locks.is_empty());
    assert!(told_gone(&h, key));
}

/// A disconnected durable handle purged by a persistent open whose commit
/// fails is back: its descriptor, its share mode, and its delete on close,
/// which had not happened (the file is still there) — and its frontend
/// was not told. When the open commits, the purge is told and the file
/// is removed only after that commit.
#[test]
fn a_purge_whose_commit_fails_is_undone() {
    let mut h = Harness::new();
    let durable = |share| {
        let Request::Open(mut o) = open("c", share) else {
            unreachable!()
        };
        o.durability = Durability::Durable { timeout_ms: 60_000 };
        o.create_guid = None;
        Request::Open(o)
    };
    let id = h.run(durable(Rights::READ.union(Rights::WRITE)));
    h.commit(true);
    let key = h.opened(id);
    h.run(Request::SetDeleteOnClose {
        key,
        delete: true,
        record: None,
    });
    h.run(Request::Detach {
        key,
        delete_on_close: None,
    });
    h.commit(true);
    let before = h.digest();
    // A persistent open that does not share delete purges it.
    let id = h.run(open("c", Rights::READ));
    assert!(
        h.fs.file("c").is_some(),
        "unlinked before the purge commits"
    );
    assert!(!told_gone(&h, key), "told of a purge not yet durable");
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    assert!(!told_gone(&h, key), "told of a purge that failed");
    assert_eq!(h.digest(), before, "the purge is undone whole");
    // Again, committing: the purge is told, the file goes after the commit.
    let id = h.run(open("c", Rights::READ));
    h.commit(true);
    h.opened(id);
    assert!(told_gone(&h, key));
    assert!(!h.engine.handles.contains_key(&key));
    assert!(
        h.fs.file("c").is_none(),
        "the purged handle's delete on close"
    );
    let log = h.fs.take_log();
    let unlink = pos(&log, |l| matches!(l, Logged::Remove(p) if p == "c"));
    let first_commit = pos(&log, |l| matches!(l, Logged::Commit(_)));
    assert!(first_commit < unlink, "{log:?}");
}

/// F6′ and its review: recovery takes an interrupted size change as made
/// only if the file carries the intent's mark, and redoes it only over a
/// file still as its intent's stamp says. a: the change happened unmarked
/// (a crash between the truncate and its mark, or no extended
/// attributes), then a local write moved the file — or the change never
/// happened and a local write came: the same file, so the outcome is
/// unknown; nothing is done and the replay is told so. b: the change never
/// happened — it is made. c: an intent from before stamps existed is
/// redone as it always was. e: the change is marked — made, the local
/// write after it stays, the reply is recorded and the mark goes.
#[test]
fn recovery_redoes_a_size_change_only_over_an_untouched_file() {
    let h = Harness::new();
    let (fs, store) = (h.fs.clone(), h.store.clone());
    fs.put("e", 10);
    let kh_of = |path: &str| fs.identity_at(&RelPath::new(path).unwrap()).unwrap().1;
    let scope = ReplayScope::Session(ScopeName::new("smb/s").unwrap());
    let set_size = |path: &str, stamped: bool, op_id: u64| {
        let before = stamped.then(|| super::memfs::stamp_of(&fs.file(path).unwrap()));
        Intent {
            id: IntentId(uuid::Uuid::new_v4()),
            change: IntentChange::SetSize {
                key: ResumeKey::new_random(),
                kernel_handle: kh_of(path),
                size: 4,
                record: Some(RecordSpec {
                    scope: scope.clone(),
                    op_id,
                    reply: "ok".into(),
                    keep: 8,
                }),
                before,
            },
            recorded_ms: 0,
        }
    };
    let (a, b, c, d) = (
        set_size("a", true, 1),
        set_size("b", true, 2),
        set_size("c", false, 3),
        set_size("e", true, 4),
    );
    for p in ["a", "c", "e"] {
        let fd = fs.set_size_by_handle(&kh_of(p), None, 4).unwrap();
        if p == "e" {
            fs.mark_change(fd.as_fd(), d.id).unwrap();
        }
        fs.write(p, 8);
    }
    store
        .commit(&[&[
            StoreOp::PutIntent(Box::new(a)),
            StoreOp::PutIntent(Box::new(b)),
            StoreOp::PutIntent(Box::new(c)),
            StoreOp::PutIntent(Box::new(d)),
        ]])
        .unwrap();
    let mut e = recovered(&fs, &store);
    let inner = store.inner.lock().unwrap();
    assert!(inner.intents.is_empty());
    let size = |p: &str| fs.file(p).unwrap().size;
    let reply = |op: u64| {
        inner
            .replays
            .get(&replay_key(&scope, op))
            .map(|r| r.reply.clone())
    };
    assert_eq!(size("a"), 8, "a local write is lost");
    assert_eq!(
        reply(1).as_deref(),
        Some(OUTCOME_UNKNOWN),
        "an unproven change is claimed"
    );
    assert_eq!(
        (size("b"), reply(2).as_deref()),
        (4, Some("ok")),
        "the change that never happened is made"
    );
    assert_eq!(
        (size("c"), reply(3).as_deref()),
        (4, Some("ok")),
        "an unstamped intent is redone"
    );
    assert_eq!(
        (size("e"), reply(4).as_deref()),
        (8, Some("ok")),
        "a marked change is taken as made, the write after it kept"
    );
    assert_eq!(fs.file("e").unwrap().change_mark, None, "the mark stays");
    drop(inner);
    assert!(
        matches!(e.lookup_reply(&scope, 1, true), Err(x) if x.code == ErrorCode::Internal),
        "the replay of an unknown outcome is not an error"
    );
}

/// A size change made through the engine marks its file before the
/// completion commit, and the mark goes once that commit is resolved.
#[test]
fn a_size_change_marks_its_file_until_its_completion_commits() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    let id = h.run(Request::SetEndOfFile {
        key,
        size: 3,
        record: None,
    });
    h.commit_once(true);
    h.commit_once(true);
    assert!(
        h.fs.file("a").unwrap().change_mark.is_some(),
        "the change is not marked"
    );
    h.commit(true);
    assert!(matches!(h.reply(id), Some(Ok(_))));
    assert_eq!(h.fs.file("a").unwrap().change_mark, None, "the mark stays");
}

/// The lazy removal of one change's mark leaves another change's mark on
/// the same file (through another handle) alone: that mark is the proof of
/// a change whose completion is still pending, and without it recovery
/// would call a change it made "unknown".
#[test]
fn removing_a_changes_mark_leaves_a_later_changes_mark() {
    let mut h = Harness::new();
    let x = h.run(open("a", Rights::ALL));
    let y = h.run(open("a", Rights::ALL));
    h.commit(true);
    let (kx, ky) = (h.opened(x), h.opened(y));
    let x = h.run(Request::SetEndOfFile {
        key: kx,
        size: 3,
        record: None,
    });
    h.commit_once(true);
    let y = h.run(Request::SetEndOfFile {
        key: ky,
        size: 2,
        record: None,
    });
    let mut y_made = false;
    for _ in 0..12 {
        // A flush is where marks are removed; look before the commit it
        // hands over.
        h.engine.flush();
        let made = h.fs.file("a").unwrap().size == 2;
        y_made |= made;
        if made && h.reply(y).is_none() {
            assert!(
                h.fs.file("a").unwrap().change_mark.is_some(),
                "a change whose completion is pending lost its mark"
            );
        }
        h.commit_once(true);
    }
    assert!(y_made, "the second change was never made");
    assert!(matches!(h.reply(x), Some(Ok(_))));
    assert!(matches!(h.reply(y), Some(Ok(_))));
    assert_eq!(h.fs.file("a").unwrap().change_mark, None, "the mark stays");
}

/// Recovery marks a size change it redoes itself, so a crash before its
/// commit (here: the commit fails) leaves the next recovery proof that the
/// change was made, instead of "unknown".
#[test]
fn a_size_change_recovery_redoes_is_marked_until_recorded() {
    let h = Harness::new();
    let (fs, store) = (h.fs.clone(), h.store.clone());
    fs.put("b", 10);
    let kh = fs.identity_at(&RelPath::new("b").unwrap()).unwrap().1;
    let scope = ReplayScope::Session(ScopeName::new("smb/s").unwrap());
    let intent = Intent {
        id: IntentId(uuid::Uuid::new_v4()),
        change: IntentChange::SetSize {
            key: ResumeKey::new_random(),
            kernel_handle: kh,
            size: 4,
            record: Some(RecordSpec {
                scope: scope.clone(),
                op_id: 7,
                reply: "ok".into(),
                keep: 8,
            }),
            before: Some(super::memfs::stamp_of(&fs.file("b").unwrap())),
        },
        recorded_ms: 0,
    };
    store
        .commit(&[&[StoreOp::PutIntent(Box::new(intent))]])
        .unwrap();
    let engine = || {
        Engine::new(
            config(),
            Box::new(fs.clone()),
            2,
            Arc::new(Pipeline::default()),
            store.clone(),
            Arc::new(CommitCounters::default()),
        )
    };
    store.inner.lock().unwrap().fail = true;
    assert!(engine().recover(store.as_ref()).is_err());
    assert_eq!(fs.file("b").unwrap().size, 4);
    assert!(
        fs.file("b").unwrap().change_mark.is_some(),
        "recovery's own change is not marked"
    );
    store.inner.lock().unwrap().fail = false;
    engine().recover(store.as_ref()).unwrap();
    let inner = store.inner.lock().unwrap();
    assert_eq!(
        inner
            .replays
            .get(&replay_key(&scope, 7))
            .map(|r| r.reply.as_str()),
        Some("ok"),
        "a change recovery made is not taken as made"
    );
    drop(inner);
    assert_eq!(fs.file("b").unwrap().change_mark, None, "the mark stays");
}

/// Review: recovery took a marked size change (an end-of-file change, a
/// truncating open) as made and recorded it with no fsync: the mark
/// proves the change reached the page cache, not the disk — the
/// completion's fsync may have failed, or the crash came before it. Such
/// a change is fsync'd before the commit that records it (here that
/// commit fails, so the fsync is seen to come first), as one recovery
/// redoes is.
#[test]
fn a_marked_size_change_is_fsynced_before_recovery_records_it() {
    let h = Harness::new();
    let (fs, store) = (h.fs.clone(), h.store.clone());
    fs.put("e", 10);
    fs.put("t", 10);
    let kh_of = |path: &str| fs.identity_at(&RelPath::new(path).unwrap()).unwrap().1;
    let stamp = |path: &str| Some(super::memfs::stamp_of(&fs.file(path).unwrap()));
    let scope = ReplayScope::Session(ScopeName::new("smb/s").unwrap());
    let set_size = Intent {
        id: IntentId(uuid::Uuid::new_v4()),
        change: IntentChange::SetSize {
            key: ResumeKey::new_random(),
            kernel_handle: kh_of("e"),
            size: 4,
            record: Some(RecordSpec {
                scope: scope.clone(),
                op_id: 1,
                reply: "ok".into(),
                keep: 8,
            }),
            before: stamp("e"),
        },
        recorded_ms: 0,
    };
    let rec = persistent_record(&fs, "t");
    let overwrite = Intent {
        id: IntentId(uuid::Uuid::new_v4()),
        change: IntentChange::TruncatingOpen {
            record: Box::new(rec.clone()),
            before: stamp("t"),
        },
        recorded_ms: 0,
    };
    // Both changes made and marked; neither completion's fsync ran.
    for (path, size, id) in [("e", 4, set_size.id), ("t", 0, overwrite.id)] {
        let fd = fs.set_size_by_handle(&kh_of(path), None, size).unwrap();
        fs.mark_change(fd.as_fd(), id).unwrap();
    }
    store
        .commit(&[&[
            StoreOp::PutIntent(Box::new(set_size)),
            StoreOp::PutIntent(Box::new(overwrite)),
        ]])
        .unwrap();
    fs.take_log();
    store.inner.lock().unwrap().fail = true;
    assert!(try_recovered(&fs, &store).is_err());
    let log = fs.take_log();
    for path in ["e", "t"] {
        assert!(
            log.contains(&Logged::Fsync(path.into())),
            "{path}: a marked change recorded unsynced: {log:?}"
        );
    }
    store.inner.lock().unwrap().fail = false;
    recovered(&fs, &store);
    let inner = store.inner.lock().unwrap();
    assert!(inner.intents.is_empty());
    assert_eq!(
        inner
            .replays
            .get(&replay_key(&scope, 1))
            .map(|r| r.reply.as_str()),
        Some("ok")
    );
    assert!(inner.handles.contains_key(&rec.key));
    drop(inner);
    assert!(fs.take_log().contains(&Logged::Fsync("e".into())));
}

/// A size change or remove through a non-persistent handle of a file
/// with persistent handles is bracketed by an intent like a persistent
/// one's: recorded, then made, then completed.
#[test]
fn a_change_through_a_non_persistent_handle_of_a_persistent_file_is_bracketed() {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!()
    };
    o.durability = Durability::None;
    o.create_guid = None;
    let id = h.run(Request::Open(o));
    let key = h.opened(id);
    h.fs.take_log();
    let id = h.run(Request::SetEndOfFile {
        key,
        size: 3,
        record: None,
    });
    assert!(
        h.reply(id).is_none(),
        "answered before its intent is durable"
    );
    h.commit(true);
    assert!(matches!(h.reply(id), Some(Ok(_))));
    let log = h.fs.take_log();
    let intent = commit_with(&log, "PutIntent");
    let change = pos(&log, |l| matches!(l, Logged::SetSize(p, 3) if p == "a"));
    let done = commit_with(&log, "DeleteIntent");
    assert!(intent < change && change < done, "{log:?}");
    let id = h.run(Request::Remove {
        path: RelPath::new("a").unwrap(),
        record: None,
    });
    assert!(
        h.reply(id).is_none(),
        "answered before its intent is durable"
    );
    h.commit(true);
    let log = h.fs.take_log();
    let intent = commit_with(&log, "PutIntent");
    let change = pos(&log, |l| matches!(l, Logged::Remove(p) if p == "a"));
    assert!(intent < change, "{log:?}");
}

/// A local open while an expiry's commit is pending waits for it (the
/// handle may come back): refused by the share mode of the handle put
/// back by a failed commit, allowed once the expiry is durable.
#[test]
fn a_local_open_during_a_pending_expiry_still_meets_its_share_mode() {
    use crate::command::Verdict;
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::NONE));
    h.commit(true);
    let key = h.opened(id);
    let file = h.engine.handles[&key].rec.file;
    h.run(Request::Detach {
        key,
        delete_on_close: None,
    });
    h.commit(true);
    assert_eq!(
        local_open(&mut h, file).try_recv().ok(),
        Some(Verdict::Deny)
    );
    h.engine.expire_due(u64::MAX);
    let waiting = local_open(&mut h, file);
    assert!(
        waiting.try_recv().is_err(),
        "decided before the expiry commits"
    );
    h.commit(false);
    h.engine.process_retries();
    assert!(h.engine.handles.contains_key(&key));
    assert_eq!(
        waiting.try_recv().ok(),
        Some(Verdict::Deny),
        "a local open got past a handle whose expiry failed"
    );
    h.engine.expire_due(u64::MAX);
    h.commit(true);
    assert_eq!(
        local_open(&mut h, file).try_recv().ok(),
        Some(Verdict::Allow)
    );
}

/// The first local open after a persistent share-none handle's CLOSE was
/// answered, the engine not yet told the commit is resolved (the committer
/// sends the reply first; an idle engine heard of it at its next tick),
/// is let in once the engine hears. Before, it was refused (EPERM) by the
/// closed handle's share mode, still filed for undo (review).
#[test]
fn a_local_open_right_after_a_close_s_reply_is_let_in() {
    use crate::command::Verdict;
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::NONE));
    h.commit(true);
    let key = h.opened(id);
    let file = h.engine.handles[&key].rec.file;
    let close = h.run(Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    // Durable and answered; the engine has not run since.
    h.commit_once(true);
    assert!(
        matches!(h.reply(close), Some(Ok(_))),
        "{:?}",
        h.reply(close)
    );
    let verdict = local_open(&mut h, file);
    h.engine.process_retries();
    assert_eq!(verdict.try_recv().ok(), Some(Verdict::Allow));
}

/// A local open while a handle's close is committing waits for it only
/// when that handle would refuse it: behind a share-none handle it is
/// decided once the close commits (let in), behind one sharing all it is
/// decided at once (review: waiting on every pending close held local
/// opens behind other clients' commits, up to the verdict deadline).
#[test]
fn a_local_open_waits_for_a_pending_close_only_if_its_handle_would_refuse() {
    use crate::command::Verdict;
    for (share, waits) in [(Rights::NONE, true), (Rights::ALL, false)] {
        let mut h = Harness::new();
        let id = h.run(open("a", share));
        h.commit(true);
        let key = h.opened(id);
        let file = h.engine.handles[&key].rec.file;
        h.run(Request::Close {
            key,
            put: vec![],
            delete: vec![],
            delete_on_close: None,
        });
        let verdict = local_open(&mut h, file);
        if waits {
            assert!(
                verdict.try_recv().is_err(),
                "decided before the close commits"
            );
            h.commit_once(true);
            h.engine.process_retries();
        }
        assert_eq!(
            verdict.try_recv().ok(),
            Some(Verdict::Allow),
            "share {share:?}"
        );
    }
}

/// A local open of `file` by pid 4242: where its verdict comes.
fn local_open(h: &mut Harness, file: FileId) -> std::sync::mpsc::Receiver<crate::command::Verdict> {
    let later = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    local_open_claimed(h, file, crate::command::EventClaim::new(later))
}

/// [`local_open`] with `claim` shared with the test (as the reader's
/// watchdog shares it).
fn local_open_claimed(
    h: &mut Harness,
    file: FileId,
    claim: crate::command::EventClaim,
) -> std::sync::mpsc::Receiver<crate::command::Verdict> {
    let (tx, rx) = std::sync::mpsc::channel();
    let fd = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
    let sink = Box::new(move |v| {
        let _ = tx.send(v);
    });
    h.engine
        .on_local_open(file, 4242, fd, LocalReply::new(sink, claim));
    rx
}

/// The key and file of the harness's only handle.
fn only_handle(h: &Harness) -> (ResumeKey, FileId) {
    h.engine
        .handles
        .values()
        .next()
        .map(|h| (h.rec.key, h.rec.file))
        .expect("a handle")
}

/// Issue 13, F3: a LOCK over a range another handle was let write
/// (`CheckIo`) waits until that write's `IoDone`; a `CheckIo` of the file
/// arriving meanwhile waits behind the LOCK; a write whose `IoDone` does
/// not come before the deadline gets its frontend dropped.
#[test]
fn a_lock_waits_for_checked_io_until_its_io_done() {
    let mut h = Harness::new();
    let a = h.run(open("a", Rights::ALL));
    let b = h.run(open("a", Rights::ALL));
    h.commit(true);
    let (ka, kb) = (h.opened(a), h.opened(b));
    let lock = |key, offset, exclusive| Request::Lock {
        key,
        locks: vec![LockOp {
            range: LockRange { offset, length: 10 },
            exclusive,
            unlock: false,
        }],
        lock_sequence: None,
        lock_owner: None,
    };
    let check = |key, offset, write| Request::CheckIo {
        key,
        range: LockRange { offset, length: 10 },
        write,
        own_protocol_advisory: false,
    };
    // The file has a lock elsewhere; B is let write 0..10.
    h.run(lock(ka, 100, true));
    h.commit(true);
    let w = h.run(check(kb, 0, true));
    h.commit(true);
    assert!(matches!(h.reply(w), Some(Ok(_))));
    // A's shared lock over it waits; a read check by B waits behind it; a
    // lock elsewhere does not.
    let l = h.run(lock(ka, 5, false));
    let r = h.run(check(kb, 50, false));
    let other = h.run(lock(ka, 200, true));
    h.commit(true);
    assert!(h.reply(l).is_none() && h.reply(r).is_none());
    assert!(matches!(h.reply(other), Some(Ok(_))));
    // A parked check whose caller gave up (its IoDone came first) is
    // withdrawn: answered, never registered.
    let gave_up = h.run(check(kb, 70, true));
    h.run(Request::IoDone { check: gave_up });
    assert_eq!(h.refused(gave_up), ErrorCode::Busy);
    // IoDone: the lock is granted, then the read check passes.
    h.run(Request::IoDone { check: w });
    assert!(h.reply(h.last_id).is_none(), "IoDone is never answered");
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    assert!(matches!(h.reply(l), Some(Ok(_))), "{:?}", h.reply(l));
    assert!(matches!(h.reply(r), Some(Ok(_))), "{:?}", h.reply(r));
    // B's read of 50..60 is still in flight: an exclusive lock over it
    // waits, and past the deadline B's frontend (this connection) is
    // dropped rather than bypassed.
    let x = h.run(lock(ka, 55, true));
    h.commit(true);
    assert!(h.reply(x).is_none());
    assert!(h.engine.checked_io.next_deadline().is_some());
    h.engine.expire_due(u64::MAX);
    assert!(!h.engine.conns.contains_key(&h.conn), "dropped");
    assert_eq!(h.engine.stats.frontends_dropped, 1);
    assert!(h.engine.checked_io.next_deadline().is_none());
}

/// Two handles of file "a", opened durably.
fn two_handles_of_a(h: &mut Harness) -> (ResumeKey, ResumeKey) {
    let a = h.run(open("a", Rights::ALL));
    let b = h.run(open("a", Rights::ALL));
    h.commit(true);
    (h.opened(a), h.opened(b))
}

/// An exclusive lock of 10 bytes at `offset` by `key`.
fn lock_10(key: ResumeKey, offset: u64) -> Request {
    Request::Lock {
        key,
        locks: vec![LockOp {
            range: LockRange { offset, length: 10 },
            exclusive: true,
            unlock: false,
        }],
        lock_sequence: None,
        lock_owner: None,
    }
}

/// A check of a 10-byte write at `offset` through `key`.
fn write_check_10(key: ResumeKey, offset: u64) -> Request {
    Request::CheckIo {
        key,
        range: LockRange { offset, length: 10 },
        write: true,
        own_protocol_advisory: false,
    }
}

/// A CheckIo whose answer waited for a commit that failed is checked
/// again on the state rolled back and answered (attack45 F2: refused
/// before, for another client's failed change); the I/O it counted for
/// the failed answer goes with the commit, and the one it counts now goes
/// with its IoDone. Left behind, a check's entry held every later
/// conflicting lock until the break timeout and then dropped the frontend
/// (review, session 27); `a_check_given_up_on_is_not_run_again`.
#[test]
fn a_check_behind_a_failed_commit_holds_no_lock_back() {
    let mut h = Harness::new();
    let (ka, kb) = two_handles_of_a(&mut h);
    let lock = |offset| lock_10(ka, offset);
    // A lock elsewhere in the file is committing; B's write check waits
    // for that commit, which fails.
    h.run(lock(100));
    let w = h.run(write_check_10(kb, 0));
    h.commit(false);
    h.drain_replies();
    assert!(matches!(h.reply(w), Some(Ok(_))), "{:?}", h.reply(w));
    h.run(Request::IoDone { check: w });
    let x = h.run(lock(5));
    h.commit(true);
    h.drain_replies();
    assert!(matches!(h.reply(x), Some(Ok(_))), "{:?}", h.reply(x));
    assert!(h.engine.checked_io.next_deadline().is_none());
    assert_eq!(h.engine.stats.frontends_dropped, 0);
}

/// Locks and checks parked behind checked I/O count against
/// `--max-pending-breaks` like waiting opens: a frontend that pipelines
/// them cannot grow the queue without bound (review, session 27).
#[test]
fn parked_locks_and_checks_are_capped() {
    let mut h = Harness::new();
    let (ka, kb) = two_handles_of_a(&mut h);
    let lock = |offset| lock_10(ka, offset);
    let check = |offset| write_check_10(kb, offset);
    h.run(lock(100));
    h.commit(true);
    let w = h.run(check(0));
    h.commit(true);
    assert!(matches!(h.reply(w), Some(Ok(_))));
    // Refused for want of a waiting place, a lock starts no deadline on
    // the I/O it would have waited for (past it, that I/O's frontend would
    // be dropped for a lock that is not waiting).
    h.engine.cfg.max_pending_breaks = 0;
    let refused = h.run(lock(5));
    assert_eq!(h.refused(refused), ErrorCode::LimitReached);
    assert!(h.engine.checked_io.next_deadline().is_none());
    h.engine.cfg.max_pending_breaks = 3;
    let parked = [h.run(lock(5)), h.run(check(50)), h.run(check(70))];
    let refused = [h.run(check(80)), h.run(lock(0))];
    h.drain_replies();
    for id in parked {
        assert!(h.reply(id).is_none(), "{:?}", h.reply(id));
    }
    for id in refused {
        assert_eq!(h.refused(id), ErrorCode::LimitReached);
    }
    h.run(Request::IoDone { check: w });
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    for id in parked {
        assert!(matches!(h.reply(id), Some(Ok(_))), "{:?}", h.reply(id));
    }
}

/// Review of issue 13's F3 fix: a CheckIo that reused the id of one still
/// in flight (on another file) replaced its entry, taking away the
/// deadline of the LOCK waiting on it — the lock, and every later CheckIo
/// of that file, waited forever. A check id in flight is refused now.
#[test]
fn a_check_id_still_in_flight_is_not_taken_again() {
    let mut h = Harness::new();
    let a = h.run(open("a", Rights::ALL));
    let b = h.run(open("a", Rights::ALL));
    let c = h.run(open("b", Rights::ALL));
    h.commit(true);
    let (ka, kb, kc) = (h.opened(a), h.opened(b), h.opened(c));
    let range = |offset| LockRange { offset, length: 10 };
    let lock = |key, offset| Request::Lock {
        key,
        locks: vec![LockOp {
            range: range(offset),
            exclusive: true,
            unlock: false,
        }],
        lock_sequence: None,
        lock_owner: None,
    };
    let check = |key, offset| Request::CheckIo {
        key,
        range: range(offset),
        write: true,
        own_protocol_advisory: false,
    };
    h.run(lock(ka, 100));
    h.commit(true);
    let w = h.run(check(kb, 0));
    h.commit(true);
    assert!(matches!(h.reply(w), Some(Ok(_))));
    let l = h.run(lock(ka, 5));
    h.commit(true);
    assert!(h.reply(l).is_none(), "the lock waits for the write");
    // The same id again, for another file (its first answer is set
    // aside: the harness takes one answer per id).
    h.replies.remove(&w);
    h.last_id = w - 1;
    assert_eq!(h.run(check(kc, 0)), w);
    assert_eq!(h.refused(w), ErrorCode::BadFrame);
    assert!(
        h.engine.checked_io.next_deadline().is_some(),
        "the waiting lock lost its deadline"
    );
    h.last_id = l;
    h.run(Request::IoDone { check: w });
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    assert!(matches!(h.reply(l), Some(Ok(_))), "{:?}", h.reply(l));
}

/// A stat open (`OpenRequest::stat`: attributes only) takes no part in
/// sharing, breaks no lease and keeps no lease from being granted in full
/// (smbtorture smb2.lease.statopen2–4), while a reader does all three.
#[test]
fn a_stat_open_takes_no_part_in_sharing_or_leases() {
    use libfilter::lease::{LeaseKey, LeaseState};
    use libfilter::proto::Event;
    let mut h = Harness::new();
    let st = |s: &str| LeaseState::parse(s).unwrap();
    let plain = |share: Rights, stat: bool| {
        let Request::Open(mut o) = open("a", share) else {
            unreachable!("open() makes an open")
        };
        o.access = Access::new(Rights::READ).unwrap();
        o.durability = Durability::None;
        o.create_guid = None;
        o.stat = stat;
        o.no_wait = true;
        Request::Open(o)
    };
    let first = h.run(plain(Rights::ALL, true));
    h.commit(true);
    h.opened(first);
    let Request::Open(mut leased) = open("a", Rights::NONE) else {
        unreachable!("open() makes an open")
    };
    leased.durability = Durability::None;
    leased.create_guid = None;
    leased.lease = Some(LeaseRequest {
        key: LeaseKey(uuid::Uuid::new_v4()),
        state: st("RWH"),
        epoch: 0,
    });
    let l = h.run(Request::Open(leased));
    h.commit(true);
    assert_eq!(h.lease_of(l).map(|l| l.state), Some(st("RWH")));
    // Shared with nobody, leased RWH: a stat open still gets in, and
    // breaks nothing.
    let second = h.run(plain(Rights::ALL, true));
    h.commit(true);
    h.opened(second);
    let breaks = |h: &Harness| {
        h.events
            .iter()
            .filter(|e| matches!(e, Event::LeaseBreak { .. }))
            .count()
    };
    assert_eq!(breaks(&h), 0);
    // A reader breaks the lease (and waits for the ack: busy).
    let reader = h.run(plain(Rights::ALL, false));
    h.commit(true);
    assert_eq!(h.refused(reader), ErrorCode::Busy);
    assert_eq!(breaks(&h), 1);
}

/// An open exempt from sharing (`OpenRequest::share_exempt`: no data
/// access, MS-FSA 2.1.5.1.2.1) is refused by no share mode and refuses no
/// open (smbtorture smb2.sharemode.sharemode-access, access-sharemode), but
/// unlike a stat open it breaks leases; it is honoured only for an open
/// that can change nothing.
#[test]
fn a_sharing_exempt_open_takes_no_part_in_sharing_but_breaks_leases() {
    use libfilter::lease::{LeaseKey, LeaseState};
    use libfilter::proto::Event;
    let mut h = Harness::new();
    let with = |path: &str, access: Rights, share: Rights, exempt: bool| {
        let Request::Open(mut o) = open(path, share) else {
            unreachable!("open() makes an open")
        };
        o.access = Access::new(access).unwrap();
        o.durability = Durability::None;
        o.create_guid = None;
        o.share_exempt = exempt;
        o.no_wait = true;
        Request::Open(o)
    };
    // First in: a later open that shares nothing is not refused by it.
    let x = h.run(with("b", Rights::READ, Rights::ALL, true));
    h.commit(true);
    let x = h.opened(x);
    assert!(h.engine.handles.get(&x).is_some_and(|h| h.rec.share_exempt));
    let y = h.run(with(
        "b",
        Rights::READ.union(Rights::WRITE),
        Rights::NONE,
        false,
    ));
    h.commit(true);
    h.opened(y);
    // Beside a holder that shares nothing: in, where a reader is not.
    let z = h.run(with("b", Rights::READ, Rights::ALL, true));
    h.commit(true);
    h.opened(z);
    let reader = h.run(with("b", Rights::READ, Rights::ALL, false));
    h.commit(true);
    assert_eq!(h.refused(reader), ErrorCode::SharingViolation);
    // Asking for more than reading, or overwriting: an ordinary open.
    for (access, d) in [
        (Rights::WRITE, Disposition::Open),
        (Rights::READ, Disposition::OverwriteIf),
    ] {
        let r = h.run(with_disposition(with("b", access, Rights::ALL, true), d));
        h.commit(true);
        assert_eq!(
            h.refused(r),
            ErrorCode::SharingViolation,
            "{access:?} {d:?}"
        );
    }
    // It breaks another key's RWH lease, as a stat open does not.
    let Request::Open(mut leased) = open("c", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    leased.durability = Durability::None;
    leased.create_guid = None;
    leased.lease = Some(LeaseRequest {
        key: LeaseKey(uuid::Uuid::new_v4()),
        state: LeaseState::parse("RWH").unwrap(),
        epoch: 0,
    });
    let l = h.run(Request::Open(leased));
    h.commit(true);
    h.opened(l);
    let e = h.run(with("c", Rights::READ, Rights::ALL, true));
    h.commit(true);
    assert_eq!(h.refused(e), ErrorCode::Busy);
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::LeaseBreak { .. })));
}

/// A stat open that asks for more than reading, or overwrites, is an
/// ordinary open: the flag slips past no share mode and no lease (a review
/// truncated a share-none, RWH-leased file with an attribute-only
/// OVERWRITE_IF).
#[test]
fn a_stat_open_that_could_change_the_file_is_an_ordinary_open() {
    let mut h = Harness::new();
    let Request::Open(mut held) = open("a", Rights::NONE) else {
        unreachable!("open() makes an open")
    };
    held.durability = Durability::None;
    held.create_guid = None;
    let first = h.run(Request::Open(held));
    h.commit(true);
    h.opened(first);
    let stat_open = |access: Rights, disposition: Disposition| {
        let Request::Open(mut o) = open("a", Rights::ALL) else {
            unreachable!("open() makes an open")
        };
        o.access = Access::new(access).unwrap();
        o.disposition = disposition;
        o.durability = Durability::None;
        o.create_guid = None;
        o.stat = true;
        o.no_wait = true;
        Request::Open(o)
    };
    for (access, disposition) in [
        (Rights::READ, Disposition::OverwriteIf),
        (Rights::READ, Disposition::Overwrite),
        (Rights::READ, Disposition::Supersede),
        (Rights::WRITE, Disposition::Open),
        (Rights::DELETE, Disposition::OpenIf),
    ] {
        let r = h.run(stat_open(access, disposition));
        h.commit(true);
        assert_eq!(
            h.refused(r),
            ErrorCode::SharingViolation,
            "{access:?} {disposition:?}"
        );
    }
    // An attribute-only open that changes nothing still gets in.
    let r = h.run(stat_open(Rights::READ, Disposition::Open));
    h.commit(true);
    h.opened(r);
}

/// A non-persistent read-write open of "a" with `disposition`, under lease
/// `lease` (its key and state) if any.
fn read_write_open_of_a(
    disposition: Disposition,
    lease: Option<(libfilter::lease::LeaseKey, &str)>,
) -> Request {
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.access = Access::new(Rights::READ.union(Rights::WRITE)).unwrap();
    o.disposition = disposition;
    o.durability = Durability::None;
    o.create_guid = None;
    o.lease = lease.map(|(key, s)| LeaseRequest {
        key,
        state: libfilter::lease::LeaseState::parse(s).unwrap(),
        epoch: 0,
    });
    Request::Open(o)
}

/// A harness (MS-FSA's rule) with `a` open under an RH lease (the lease
/// key returned) and a plain open of `a` with DELETE (its handle
/// returned), whose delete on close waits for that lease's break.
fn a_deleter_beside_an_rh_lease() -> (Harness, libfilter::lease::LeaseKey, ResumeKey) {
    a_deleter_beside_an_rh_lease_as(Durability::None)
}

/// [`a_deleter_beside_an_rh_lease`] with the deleter opened `durability`.
fn a_deleter_beside_an_rh_lease_as(
    durability: Durability,
) -> (Harness, libfilter::lease::LeaseKey, ResumeKey) {
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
    let k = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let holder = h.run(read_write_open_of_a(Disposition::Open, Some((k, "RH"))));
    h.commit(true);
    h.opened(holder);
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.durability = durability;
    o.create_guid = None;
    let deleter = h.run(Request::Open(o));
    h.commit(true);
    let key = h.opened(deleter);
    (h, k, key)
}

/// Runs a `SetDeleteOnClose` of `key` to `delete`; its request id.
fn set_delete_on_close(h: &mut Harness, key: ResumeKey, delete: bool) -> u64 {
    h.run(Request::SetDeleteOnClose {
        key,
        delete,
        record: None,
    })
}

/// Opens with request `open`, then sets the handle's delete on close,
/// each committed: its key.
fn opened_with_delete_on_close(h: &mut Harness, open: Request) -> ResumeKey {
    let key = h.run(open);
    h.commit(true);
    let key = h.opened(key);
    let set = set_delete_on_close(h, key, true);
    h.commit(true);
    h.answered(set);
    key
}

/// Runs a `Handle` query of `key`; its request id.
fn query_handle(h: &mut Harness, key: ResumeKey, learning: bool) -> u64 {
    h.run(Request::Handle { key, learning })
}

/// Lease `k`'s break to R acknowledged, and what waited for it run.
fn break_to_r_acknowledged(h: &mut Harness, k: libfilter::lease::LeaseKey) {
    h.run(Request::LeaseBreakAck {
        lease_key: k,
        state: libfilter::lease::LeaseState::parse("R").unwrap(),
        client: None,
    });
    h.commit(true);
    h.engine.process_retries();
    h.drain_replies();
    h.commit(true);
}

/// A `Handle` query and a `SetDeleteOnClose` of a handle whose delete on
/// close waits for a lease break (MS-FSA's rule, `MSFSA_PROTOCOL`) wait
/// behind it, from the same connection: they run in the order sent. A
/// frontend whose `SetDeleteOnClose` went unanswered learns its outcome
/// by a `Handle` query (`FilterClient::set_delete_on_close_learnt`); before,
/// the query was answered at once with the flag unset, its client was told
/// the change failed, and the change set the flag after the break.
#[test]
fn a_handle_query_waits_behind_its_delete_on_close_waiting_for_a_break() {
    use libfilter::proto::Reply;
    let (mut h, k, key) = a_deleter_beside_an_rh_lease();
    let set = |delete| Request::SetDeleteOnClose {
        key,
        delete,
        record: None,
    };
    let doc = h.run(set(true));
    let query = h.run(Request::Handle {
        key,
        learning: true,
    });
    let clear = h.run(set(false));
    let last = h.run(Request::Handle {
        key,
        learning: true,
    });
    h.commit(true);
    assert!(
        h.reply(doc).is_none(),
        "the delete on close waits for the break"
    );
    assert!(h.reply(query).is_none(), "the query waits behind it");
    assert!(h.reply(clear).is_none(), "so does the next change");
    assert!(h.reply(last).is_none());
    break_to_r_acknowledged(&mut h, k);
    let flag = |h: &Harness, id| match h.reply(id) {
        Some(Ok(Reply::Handle(v))) => v.record.delete_on_close,
        r => panic!("a handle view: {r:?}"),
    };
    assert!(matches!(h.reply(doc), Some(Ok(Reply::Done))));
    assert!(flag(&h, query), "the query shows the change made");
    assert!(matches!(h.reply(clear), Some(Ok(Reply::Done))));
    assert!(!flag(&h, last), "the later change ran after");
}

/// Review rv-cross (1): a delegation (a lease asked through an NFS-like
/// frontend) was granted RH beside another client's open for write, whose
/// writes break no read caching: its holder served stale data. Now it gets
/// nothing then; the writer's own client still gets one, and an open for
/// write by another client while one is held breaks RH to H, waiting for
/// the holder's answer (a recall).
#[test]
fn a_delegation_is_not_granted_beside_another_clients_writer() {
    use libfilter::lease::{LeaseKey, LeaseState, DELEGATION_PROTOCOL};
    use libfilter::proto::Event;
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, DELEGATION_PROTOCOL);
    let st = |s: &str| LeaseState::parse(s).unwrap();
    let by = |client: &str, access: Rights, lease: Option<(LeaseKey, &str)>| {
        let Request::Open(mut o) = read_write_open_of_a(Disposition::Open, lease) else {
            unreachable!("read_write_open_of_a makes an open")
        };
        o.client = ClientId::new(client).unwrap();
        o.access = Access::new(access).unwrap();
        Request::Open(o)
    };
    let key = || LeaseKey(uuid::Uuid::new_v4());
    let writer = h.run(by("w", Rights::READ.union(Rights::WRITE), None));
    h.commit(true);
    h.opened(writer);
    let other = h.run(by("n", Rights::READ, Some((key(), "RH"))));
    h.commit(true);
    assert_eq!(h.lease_of(other).map(|l| l.state), Some(st("")));
    let own = h.run(by("w", Rights::READ, Some((key(), "RH"))));
    h.commit(true);
    assert_eq!(h.lease_of(own).map(|l| l.state), Some(st("RH")));
    let later = h.run(by("x", Rights::WRITE, None));
    h.commit(true);
    assert!(h.reply(later).is_none(), "waits for the recall");
    let breaks: Vec<_> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::LeaseBreak {
                current_state,
                new_state,
                ack_required,
                ..
            } => Some((*current_state, *new_state, *ack_required)),
            _ => None,
        })
        .collect();
    assert_eq!(breaks, vec![(st("RH"), st("H"), true)]);
}

/// Review of 1624469: every `Handle` query of a handle from the connection
/// whose delete on close of it waited for a lease break waited too, not
/// only the query that learns that change's outcome. A frontend shares one
/// connection among its clients: rksmbd's lock and create checks held a
/// LOCK for the break timeout (the LOCK's pump could not read the break's
/// acknowledgement) or were refused at `--max-pending-breaks`. A plain
/// query is answered at once; the learning one still waits.
#[test]
fn only_the_learning_handle_query_waits_behind_a_delete_on_close() {
    use libfilter::proto::Reply;
    let (mut h, k, key) = a_deleter_beside_an_rh_lease();
    let doc = set_delete_on_close(&mut h, key, true);
    let plain = query_handle(&mut h, key, false);
    let learning = query_handle(&mut h, key, true);
    h.commit(true);
    assert!(h.reply(doc).is_none(), "the delete on close waits");
    assert!(
        matches!(h.reply(plain), Some(Ok(Reply::Handle(v))) if !v.record.delete_on_close),
        "a plain query is answered at once: {:?}",
        h.reply(plain)
    );
    assert!(h.reply(learning).is_none(), "the learning query waits");
    break_to_r_acknowledged(&mut h, k);
    assert!(matches!(h.reply(doc), Some(Ok(Reply::Done))));
    assert!(
        matches!(h.reply(learning), Some(Ok(Reply::Handle(v))) if v.record.delete_on_close),
        "the learning query shows the change made"
    );
}

/// Review of 1624469: a detach of a handle left its connection's
/// `SetDeleteOnClose` of it parked behind a lease break, and the change ran
/// when the break ended — after the handle's resume on the same connection
/// (a frontend shares one among its clients), setting the flag of the
/// resumed handle. Now the detach answers the parked change and its
/// learning query an error, and the flag stays unset.
#[test]
fn a_detach_withdraws_its_parked_delete_on_close() {
    let (mut h, k, key) =
        a_deleter_beside_an_rh_lease_as(Durability::Durable { timeout_ms: 60_000 });
    let doc = set_delete_on_close(&mut h, key, true);
    let query = query_handle(&mut h, key, true);
    h.commit(true);
    assert!(h.reply(doc).is_none(), "the delete on close waits");
    h.run(Request::Detach {
        key,
        delete_on_close: None,
    });
    h.commit(true);
    let r = h.run(Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new("alice").unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key },
        owner: None,
        matching: None,
        if_last_held: false,
    }));
    h.commit(true);
    assert_eq!(h.opened(r), key);
    break_to_r_acknowledged(&mut h, k);
    assert!(
        !h.engine.handles[&key].rec.delete_on_close,
        "the detached handle's parked change set the resumed one's flag"
    );
    assert!(matches!(h.reply(doc), Some(Err(_))), "{:?}", h.reply(doc));
    assert!(
        matches!(h.reply(query), Some(Err(_))),
        "{:?}",
        h.reply(query)
    );
}

/// Review of 1624469: a `SetDeleteOnClose` parked behind its own
/// connection's parked change of the same handle (the frontend's set-back
/// of an unsure flag, before the handle goes) was refused `LimitReached`
/// at `--max-pending-breaks`, and the handle went with the parked change's
/// flag. Like the learning query, it is not held to the limit.
#[test]
fn a_change_behind_its_own_parked_delete_on_close_is_not_limited() {
    use libfilter::proto::Reply;
    let (mut h, k, key) = a_deleter_beside_an_rh_lease();
    let doc = set_delete_on_close(&mut h, key, true);
    h.commit(true);
    assert!(h.reply(doc).is_none(), "the delete on close waits");
    h.engine.cfg.max_pending_breaks = 1;
    let back = set_delete_on_close(&mut h, key, false);
    h.commit(true);
    assert!(
        h.reply(back).is_none(),
        "parked behind it: {:?}",
        h.reply(back)
    );
    break_to_r_acknowledged(&mut h, k);
    assert!(matches!(h.reply(back), Some(Ok(Reply::Done))));
    assert!(!h.engine.handles[&key].rec.delete_on_close);
}

/// Only the first few requests parked behind a connection's own parked
/// delete on close escape `--max-pending-breaks`: a frontend sending
/// them in a loop filled the waiting list without bound, and every other
/// client's waiting request was refused (re-review rr-doc3).
#[test]
fn followers_of_a_parked_delete_on_close_are_limited_past_a_few() {
    use libfilter::proto::ErrorCode;
    let (mut h, _k, key) = a_deleter_beside_an_rh_lease();
    let doc = set_delete_on_close(&mut h, key, true);
    h.commit(true);
    assert!(h.reply(doc).is_none(), "the delete on close waits");
    h.engine.cfg.max_pending_breaks = 1;
    let learn = Request::Handle {
        key,
        learning: true,
    };
    // Each change with its learning query: they do not count together
    // (counted together, the set-back of change, query, retry, query was
    // refused — rr-final35).
    let mut parked = vec![h.run(learn.clone())];
    for i in 1..FOLLOWERS_EXEMPT {
        parked.push(set_delete_on_close(&mut h, key, i % 2 == 0));
        parked.push(h.run(learn.clone()));
    }
    h.commit(true);
    for id in parked {
        assert!(h.reply(id).is_none(), "parked within the few");
    }
    let past = set_delete_on_close(&mut h, key, false);
    h.commit(true);
    assert!(
        matches!(h.reply(past), Some(Err(ref e)) if e.code == ErrorCode::LimitReached),
        "{:?}",
        h.reply(past)
    );
}

/// Windows' break chain (smbtorture smb2.lease.breaking3, MS-SMB2 3.3.4.7):
/// an open waiting for an RWH lease's break to RH, and an overwrite that
/// meets the lease mid-break, wait for the whole chain — RH, then R (one
/// more acknowledgement), then none — which carries the first break's
/// epoch; an overwrite beside an RH lease without a sharing conflict breaks
/// it to none and does not wait (breaking4).
#[test]
fn a_lease_met_mid_break_is_broken_a_step_at_a_time() {
    use libfilter::lease::{LeaseKey, LeaseState};
    use libfilter::proto::{Event, Reply};
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
    let st = |s: &str| LeaseState::parse(s).unwrap();
    let plain = read_write_open_of_a;
    let breaks = |h: &Harness| -> Vec<(LeaseState, LeaseState, u16, bool)> {
        h.events
            .iter()
            .filter_map(|e| match e {
                Event::LeaseBreak {
                    current_state,
                    new_state,
                    epoch,
                    ack_required,
                    ..
                } => Some((*current_state, *new_state, *epoch, *ack_required)),
                _ => None,
            })
            .collect()
    };
    let k1 = LeaseKey(uuid::Uuid::new_v4());
    let holder = h.run(plain(Disposition::Open, Some((k1, "RWH"))));
    h.commit(true);
    let e0 = h.lease_of(holder).unwrap().epoch;
    let opener = h.run(plain(Disposition::Open, None));
    h.commit(true);
    assert!(h.reply(opener).is_none(), "waits for the break to RH");
    assert_eq!(breaks(&h), vec![(st("RWH"), st("RH"), e0 + 1, true)]);
    let overwriter = h.run(plain(Disposition::Overwrite, None));
    h.commit(true);
    assert!(h.reply(overwriter).is_none());
    assert_eq!(
        breaks(&h).len(),
        1,
        "a lease being broken is not broken again"
    );
    // Mid-break, an open under the key sees the new epoch, no upgrade.
    let again = h.run(plain(Disposition::Open, Some((k1, "RWH"))));
    h.commit(true);
    assert_eq!(
        h.lease_of(again).map(|l| (l.state, l.epoch)),
        Some((st("RWH"), e0 + 1))
    );
    let ack = h.run(Request::LeaseBreakAck {
        lease_key: k1,
        state: st("RH"),
        client: None,
    });
    h.commit(true);
    assert!(matches!(h.reply(ack), Some(Ok(Reply::Lease(l))) if l.state == st("RH")));
    assert_eq!(breaks(&h)[1..], [(st("RH"), st("R"), e0 + 1, true)]);
    h.engine.process_retries();
    h.drain_replies();
    h.commit(true);
    assert!(h.reply(opener).is_none() && h.reply(overwriter).is_none());
    h.run(Request::LeaseBreakAck {
        lease_key: k1,
        state: st("R"),
        client: None,
    });
    h.commit(true);
    assert_eq!(breaks(&h)[2..], [(st("R"), st(""), e0 + 1, false)]);
    h.engine.process_retries();
    h.drain_replies();
    h.commit(true);
    h.opened(opener);
    h.opened(overwriter);

    // breaking4: RH beside nobody it conflicts with; an overwrite breaks it
    // to none (asking for an acknowledgement) and goes on.
    let k2 = LeaseKey(uuid::Uuid::new_v4());
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
    let holder = h.run(plain(Disposition::Open, Some((k2, "RH"))));
    h.commit(true);
    assert_eq!(h.lease_of(holder).map(|l| l.state), Some(st("RH")));
    let overwriter = h.run(plain(Disposition::Overwrite, None));
    h.commit(true);
    h.opened(overwriter);
    assert_eq!(breaks(&h).len(), 1);
    assert_eq!((breaks(&h)[0].1, breaks(&h)[0].3), (st(""), true));
}

/// Issue 16, 6: a non-persistent handle's close is done at once, so it
/// may not carry records whose commit could fail (old code dropped the
/// handle, then answered the close with an error when the records'
/// commit failed); and no close records into its own handle's scope
/// (old code re-created that scope in memory after the close).
#[test]
fn a_close_carries_records_only_for_a_persistent_handle_and_not_into_its_own_scope() {
    let spec = |scope: ReplayScope| RecordSpec {
        scope,
        op_id: 7,
        reply: "ok".into(),
        keep: 8,
    };
    let mut h = Harness::new();
    let b = h.run(bobs("a", Rights::ALL, Disposition::Open));
    let p = h.run(open("b", Rights::ALL));
    h.commit(true);
    let (b, p) = (h.opened(b), h.opened(p));
    let id = h.run(Request::Close {
        key: b,
        put: vec![spec(session(1))],
        delete: vec![],
        delete_on_close: None,
    });
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::BadFrame);
    assert!(h.engine.handles.contains_key(&b), "the handle is kept");
    let id = h.run(Request::Close {
        key: p,
        put: vec![spec(ReplayScope::Handle(p))],
        delete: vec![],
        delete_on_close: None,
    });
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::BadFrame);
    assert!(!h.engine.replays.contains_key(&ReplayScope::Handle(p)));
    assert!(h.engine.handles.contains_key(&p));
}

/// Issue 16, 7: a break's epoch bump of a persistent holder is durable
/// before the break shows it (old code sent the break at once: after a
/// kill -9 before the commit the next break repeated the epoch).
#[test]
fn a_persistent_holders_break_waits_for_its_epoch_bump() {
    use libfilter::lease::{LeaseKey, LeaseState};
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
    let st = |s: &str| LeaseState::parse(s).unwrap();
    let k = LeaseKey(uuid::Uuid::new_v4());
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.disposition = Disposition::Open;
    o.lease = Some(LeaseRequest {
        key: k,
        state: st("RWH"),
        epoch: 0,
    });
    let holder = h.run(Request::Open(o));
    h.commit(true);
    let e0 = h.lease_of(holder).unwrap().epoch;
    h.run(bobs("a", Rights::READ, Disposition::Open));
    assert!(
        h.break_epochs().is_empty(),
        "sent before the bump is durable"
    );
    h.commit(true);
    h.drain_replies();
    assert_eq!(h.break_epochs(), vec![e0 + 1]);
}

/// A break that times out lowers a persistent holder's lease at a new
/// epoch, and tells it so only once that is durable; if the commit fails
/// it is never told (review: told at once, a rollback or a crash gave the
/// lease back at the old epoch, and the next break repeated an epoch the
/// client had seen, so it ignored it).
#[test]
fn a_persistent_holders_break_timeout_is_told_only_once_durable() {
    use libfilter::lease::LeaseKey;
    for ok in [true, false] {
        let fs = MemFs::new();
        fs.put("a", 10);
        let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
        let k = LeaseKey(uuid::Uuid::new_v4());
        let holder = h.run(with_rwh_lease(open("a", Rights::ALL), k));
        h.commit(true);
        let e0 = h.lease_of(holder).unwrap().epoch;
        h.run(bobs("a", Rights::READ, Disposition::Open));
        h.commit(true);
        assert_eq!(h.break_epochs(), vec![e0 + 1]);
        // Never acknowledged.
        h.engine.expire_due(u64::MAX);
        h.drain_replies();
        assert_eq!(
            h.break_epochs(),
            vec![e0 + 1],
            "told before the lowering is durable"
        );
        h.commit(ok);
        h.drain_replies();
        let told = if ok {
            vec![e0 + 1, e0 + 2]
        } else {
            vec![e0 + 1]
        };
        assert_eq!(h.break_epochs(), told, "commit ok: {ok}");
    }
}

/// A break whose event waited for a commit that failed was never sent: the
/// rollback forgets it, so the open that wants it sends it anew (a review
/// found the break dropped while filterd still counted it in progress, so
/// the lease would later be taken without the holder ever told).
#[test]
fn a_break_whose_commit_failed_is_sent_again() {
    use libfilter::lease::{LeaseKey, LeaseState};
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
    let st = |s: &str| LeaseState::parse(s).unwrap();
    let k = LeaseKey(uuid::Uuid::new_v4());
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.disposition = Disposition::Open;
    o.lease = Some(LeaseRequest {
        key: k,
        state: st("RWH"),
        epoch: 0,
    });
    let holder = h.run(Request::Open(o));
    h.commit(true);
    let e0 = h.lease_of(holder).unwrap().epoch;
    h.run(bobs("a", Rights::READ, Disposition::Open));
    h.commit(false);
    h.drain_replies();
    assert!(
        h.break_epochs().is_empty(),
        "a break shown whose bump failed"
    );
    assert_eq!(h.lease_of(holder).unwrap().epoch, e0, "the bump is undone");
    h.run(bobs("a", Rights::READ, Disposition::Open));
    h.commit(true);
    h.drain_replies();
    assert_eq!(h.break_epochs(), vec![e0 + 1], "the break is sent again");
}

/// Re-review rr47e F5: a detach's record, written as a plain rewrite,
/// was refused at the store's reserve (the record grows by its
/// disconnect times): the frontend was told DISK_FULL while the engine
/// kept the handle disconnected. A detach — asked for, or of a frontend
/// lost — writes it as a detach (`StoreOp::DetachHandle`), which the
/// store lets use an eighth of its delete reserve, and its reply waits
/// for it.
#[test]
fn a_detach_writes_its_record_as_a_detach_the_reserve_lets_through() {
    let mut h = Harness::new();
    let (a, b) = (h.run(open("a", Rights::ALL)), h.run(open("b", Rights::ALL)));
    h.commit(true);
    let (a, b) = (h.opened(a), h.opened(b));
    h.fs.take_log();
    let id = h.run(Request::Detach {
        key: a,
        delete_on_close: None,
    });
    assert!(
        h.reply(id).is_none(),
        "answered before its record is durable"
    );
    h.commit(true);
    h.answered(id);
    // The frontend is lost with its other handle.
    h.reattach();
    h.commit(true);
    let log = h.fs.take_log();
    let detaches: Vec<&Logged> = log
        .iter()
        .filter(|l| matches!(l, Logged::Commit(ops) if ops.contains(&"DetachHandle")))
        .collect();
    assert_eq!(detaches.len(), 2, "{log:?}");
    assert!(
        !log.iter()
            .any(|l| matches!(l, Logged::Commit(ops) if ops.contains(&"PutHandle"))),
        "{log:?}"
    );
    for k in [a, b] {
        let stored = h.store.inner.lock().unwrap().handles[&k].conn;
        assert!(
            matches!(stored, ConnState::Disconnected { .. }),
            "{stored:?}"
        );
    }
}

/// Re-review rr48b L2: a replacement frontend that says hello before its
/// dead predecessor's EOF is read retires the predecessor there
/// (`on_hello` → `on_closed`). Its detaches went into the group of the
/// last request run, still open — another frontend's persistent create
/// here — and a failed commit of that create rolled them back with it:
/// the store kept the handle attached. They are a step of their own and
/// commit though the create fails.
#[test]
fn a_replacements_hello_detaches_in_a_group_of_its_own() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    // Another frontend, on a connection of its own, creates `n`: its
    // group is still open when the replacement says hello.
    let (writer, peer) = hello_of(&mut h.engine, ConnId(2), "smb", "smb-y", None);
    let dead = std::mem::replace(&mut h.peer, peer);
    (h.conn, h.writer) = (ConnId(2), writer);
    h.fs.fail_next("fsync", libc::EIO);
    let create = h.run(open("n", Rights::ALL));
    assert!(h.reply(create).is_none(), "answered before its commit");
    // smb-t dies; its replacement's hello comes before its EOF.
    drop(dead);
    let _replacement = hello_of(&mut h.engine, ConnId(3), "smb", "smb-t", None);
    h.commit(true);
    assert_eq!(h.last_failed.len(), 1, "{:?}", h.last_failed);
    h.refused(create);
    let stored = h.store.inner.lock().unwrap().handles[&key].conn;
    assert!(
        matches!(stored, ConnState::Disconnected { .. }),
        "the detach was rolled back with the create: {stored:?}"
    );
    assert!(h.engine.handles[&key].conn.is_none());
}

/// A harness (MS-FSA's rule) with alice's persistent open of `a` under an
/// RWH lease, committed: the harness and the holder's handle.
fn a_persistent_rwh_holder_of_a() -> (Harness, ResumeKey) {
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
    let k = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let holder = h.run(with_rwh_lease(open("a", Rights::ALL), k));
    h.commit(true);
    let holder = h.opened(holder);
    (h, holder)
}

/// Re-review rr47e F2: an open that breaks a persistent holder's lease
/// puts the holder's epoch bump in its own group; when that commit is
/// refused (the store at its reserve: every try fails alike) the rollback
/// forgot the break and ran the open again, which bumped the epoch again
/// in a commit refused again — for ever, the opener never answered. The
/// opener whose own group failed gets the failure (nothing changed, the
/// holder's epoch as it was) and is not run again.
#[test]
fn an_open_whose_break_cannot_commit_is_refused_not_run_again() {
    let (mut h, holder) = a_persistent_rwh_holder_of_a();
    let epoch = |h: &Harness| h.engine.handles[&holder].rec.lease.map(|l| l.epoch);
    let e0 = epoch(&h).unwrap();
    let bob = h.run(bobs("a", Rights::READ, Disposition::Open));
    assert!(h.reply(bob).is_none(), "bob's open waits for the break");
    let reruns = h.engine.open_reruns;
    for _ in 0..4 {
        h.commit(false);
        h.engine.process_retries();
    }
    h.drain_replies();
    assert_eq!(
        h.refused(bob),
        ErrorCode::DiskFull,
        "bob's open is answered"
    );
    assert_eq!(h.engine.open_reruns, reruns, "and not run again");
    assert!(h.engine.waiting.is_empty(), "nothing waits");
    assert_eq!(epoch(&h), Some(e0), "the bump is undone");
    assert!(h.break_epochs().is_empty(), "no break shown");
    // Room again: the next open breaks the lease as usual.
    h.run(bobs("a", Rights::READ, Disposition::Open));
    h.commit(true);
    h.drain_replies();
    assert_eq!(h.break_epochs(), vec![e0 + 1]);
}

/// The same for a change that waits for a handle-caching break: a
/// remove of a file whose persistent holder caches handles (rr47e F2).
#[test]
fn a_remove_whose_break_cannot_commit_is_refused_not_run_again() {
    let (mut h, holder) = a_persistent_rwh_holder_of_a();
    let epoch = |h: &Harness| h.engine.handles[&holder].rec.lease.map(|l| l.epoch);
    let e0 = epoch(&h).unwrap();
    let id = h.run(Request::Remove {
        path: RelPath::new("a").unwrap(),
        record: None,
    });
    assert!(h.reply(id).is_none(), "the remove waits for the break");
    assert_eq!(h.engine.waiting_changes.len(), 1);
    for _ in 0..4 {
        h.commit(false);
        h.engine.process_retries();
    }
    h.drain_replies();
    assert_eq!(h.refused(id), ErrorCode::DiskFull, "the remove is answered");
    assert!(h.engine.waiting_changes.is_empty(), "nothing waits");
    assert_eq!(epoch(&h), Some(e0), "the bump is undone");
    assert!(h.break_epochs().is_empty(), "no break shown");
}

/// Review rvobs: `stats.breaks` counted a break when it was decided, so a
/// break whose event went down with a failed commit (never sent) was
/// counted, and counted again when the open sent it anew: the holder got
/// one break, `stats` said 2. A break counts when its event is handed to
/// the holder's connection, and a failed commit takes it back.
#[test]
fn a_break_whose_commit_failed_is_counted_once() {
    let (mut h, _) = a_persistent_rwh_holder_of_a();
    h.run(bobs("a", Rights::READ, Disposition::Open));
    assert_eq!(h.engine.durable_stats().breaks, 0, "pending: not yet");
    h.commit(false);
    h.drain_replies();
    assert!(h.break_epochs().is_empty(), "nothing sent");
    assert_eq!(h.engine.durable_stats().breaks, 0, "nothing sent");
    h.engine.process_retries();
    h.run(bobs("a", Rights::READ, Disposition::Open));
    h.commit(true);
    h.drain_replies();
    assert_eq!(h.break_epochs().len(), 1, "one break sent");
    assert_eq!(h.engine.stats.breaks, 1, "counted once");
    assert_eq!(h.engine.durable_stats().breaks, 1);
}

/// Review rvobs: a disconnected persistent holder's break (no connection:
/// nothing sent) was counted as sent. It is not counted — neither while
/// it waits for the holder to resume (review rvfailover) nor when its
/// deadline lowers the lease.
#[test]
fn a_disconnected_holders_break_is_not_counted() {
    let (mut h, holder) = a_persistent_rwh_holder_of_a();
    h.run(Request::Detach {
        key: holder,
        delete_on_close: None,
    });
    h.commit(true);
    let bob = h.run(bobs("a", Rights::READ, Disposition::Open));
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    assert!(h.reply(bob).is_none(), "bob's open waits for the holder");
    h.engine.expire_due(mono_ms() + 5_000);
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    assert!(h.reply(bob).is_some(), "bob's open was answered");
    assert!(h.break_epochs().is_empty(), "nothing sent");
    assert_eq!(h.engine.stats.breaks, 0, "nothing counted");
}

/// A break whose attached holder closes, leaving only a disconnected
/// (durable) handle under the key, is over at once: no ack can come for
/// it. Before, only a detach settled such a break (`lease_key_released`
/// counted the disconnected handle as holding the lease), and the breaking
/// open waited out the break timeout (re-review rr39b 4).
#[test]
fn a_break_whose_last_attached_holder_closes_is_over_at_once() {
    let mut h = Harness::new();
    let k = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let durable = opened_and_detached(&mut h, with_rwh_lease(open("a", Rights::ALL), k));
    let attached = h.run(leased_open(
        "alice",
        "a",
        k,
        libfilter::lease::LeaseState::parse("RWH").unwrap(),
        0,
    ));
    h.commit(true);
    let attached = h.opened(attached);
    assert_ne!(attached, durable);
    let bob = h.run(bobs("a", Rights::WRITE, Disposition::Open));
    h.commit(true);
    h.drain_replies();
    assert!(!h.break_epochs().is_empty(), "alice's lease is broken");
    assert!(h.reply(bob).is_none(), "waits for alice's ack");
    h.run(Request::Close {
        key: attached,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    assert!(h.reply(bob).is_some(), "bob's open still waits for an ack");
}

/// The lease breaks (lease key, from, to, ack required) the frontend was
/// sent, in order.
/// A lease break sent: the key, from, to, whether it wants an
/// acknowledgement.
type BreakSent = (libfilter::lease::LeaseKey, String, String, bool);

fn lease_breaks(h: &Harness) -> Vec<BreakSent> {
    h.events
        .iter()
        .filter_map(|e| match e {
            libfilter::proto::Event::LeaseBreak {
                lease_key,
                current_state,
                new_state,
                ack_required,
                ..
            } => Some((
                *lease_key,
                current_state.to_string(),
                new_state.to_string(),
                *ack_required,
            )),
            _ => None,
        })
        .collect()
}

/// Alice's open of `a` under an RWH lease `k` (MS-FSA's rule) with
/// `durability`, detached: the harness, the key and the handle.
fn a_detached_rwh_holder_as(
    durability: Durability,
    protocol: &str,
) -> (Harness, libfilter::lease::LeaseKey, ResumeKey) {
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, protocol);
    let k = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let Request::Open(mut o) = with_rwh_lease(open("a", Rights::ALL), k) else {
        unreachable!("an open")
    };
    o.durability = durability;
    let holder = h.run(Request::Open(o));
    h.commit(true);
    let holder = h.opened(holder);
    h.run(Request::Detach {
        key: holder,
        delete_on_close: None,
    });
    h.commit(true);
    (h, k, holder)
}

/// Resumes alice's handle `key`; the request's id.
fn resume_alices(h: &mut Harness, key: ResumeKey) -> u64 {
    let r = resume_alices_as(h, key, false);
    h.drain_replies();
    r
}

/// Resumes alice's handle `key`, as a frontend's own reattach when
/// `if_last_held`; the request's id.
fn resume_alices_as(h: &mut Harness, key: ResumeKey, if_last_held: bool) -> u64 {
    let r = h.run(resume_of("alice", key, if_last_held));
    h.commit(true);
    r
}

/// `client`'s resume of handle `key` (as a frontend's own reattach when
/// `if_last_held`).
fn resume_of(client: &str, key: ResumeKey, if_last_held: bool) -> Request {
    Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new(client).unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key },
        owner: None,
        matching: None,
        if_last_held,
    })
}

/// Acknowledges lease `k`'s break to `state`, and runs what waited.
fn acknowledge(h: &mut Harness, k: libfilter::lease::LeaseKey, state: &str) -> u64 {
    let ack = h.run(Request::LeaseBreakAck {
        lease_key: k,
        state: libfilter::lease::LeaseState::parse(state).unwrap(),
        client: None,
    });
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    ack
}

/// Review rvfailover: an SMB 2/3 lease whose holders are all disconnected
/// was lowered at once when another client's open broke it, with nothing
/// sent — a persistent (or durable, keeping H) holder's client, failing
/// over with cached writes, then overwrote the other client's
/// acknowledged write. MS-SMB2 3.3.4.7 keeps such an open and its break
/// in progress: the conflicting open waits; the holder that resumes is
/// sent the break behind its resume's reply, and its ack lets the open
/// in. The holder keeps its handle and the lease its H.
#[test]
fn a_resumable_holders_break_waits_for_its_resume_and_ack() {
    for d in [
        Durability::Persistent { timeout_ms: 60_000 },
        Durability::Durable { timeout_ms: 60_000 },
    ] {
        let (mut h, k, holder) = a_detached_rwh_holder_as(d, libfilter::lease::MSFSA_PROTOCOL);
        let bob = h.run(bobs(
            "a",
            Rights::READ.union(Rights::WRITE),
            Disposition::Open,
        ));
        h.commit(true);
        h.engine.process_retries();
        h.commit(true);
        h.drain_replies();
        assert!(
            h.reply(bob).is_none(),
            "{d:?}: bob's open waits for the holder"
        );
        assert!(lease_breaks(&h).is_empty(), "{d:?}: nothing sent yet");
        assert_eq!(h.engine.stats.breaks, 0, "{d:?}");
        assert!(h.engine.handles.contains_key(&holder), "{d:?}: kept");
        let r = resume_alices(&mut h, holder);
        assert_eq!(h.opened(r), holder);
        assert_eq!(
            lease_breaks(&h),
            vec![(k, "RWH".into(), "RH".into(), true)],
            "{d:?}: the resumed holder is told of the break"
        );
        assert!(
            matches!(h.arrived.last(), Some(Arrived::Event(_))),
            "{d:?}: the break follows the resume's reply"
        );
        assert!(h.reply(bob).is_none(), "{d:?}: still waiting for the ack");
        acknowledge(&mut h, k, "RH");
        assert!(
            matches!(h.reply(bob), Some(Ok(_))),
            "{d:?}: {:?}",
            h.reply(bob)
        );
        let l = h.engine.handles[&holder].rec.lease.unwrap();
        assert_eq!(l.state.to_string(), "RH", "{d:?}");
    }
}

/// Review rvfailover: a break sent to an SMB 2/3 holder whose connection
/// then went before it acknowledged was settled at once (the lease
/// lowered, the conflicting open let in): it stays in progress, is sent
/// again when the holder resumes (and again after it drops and resumes
/// once more), at the break's epoch, and its ack there ends it.
#[test]
fn a_sent_break_stays_in_progress_across_its_holders_reconnects() {
    for d in [
        Durability::Persistent { timeout_ms: 60_000 },
        Durability::Durable { timeout_ms: 60_000 },
    ] {
        let fs = MemFs::new();
        fs.put("a", 10);
        let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
        let k = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
        let Request::Open(mut o) = with_rwh_lease(open("a", Rights::ALL), k) else {
            unreachable!("an open")
        };
        o.durability = d;
        let holder = h.run(Request::Open(o));
        h.commit(true);
        let holder = h.opened(holder);
        let bob = h.run(bobs(
            "a",
            Rights::READ.union(Rights::WRITE),
            Disposition::Open,
        ));
        h.commit(true);
        h.drain_replies();
        assert_eq!(lease_breaks(&h).len(), 1, "{d:?}: the break is sent");
        let epoch = h.break_epochs()[0];
        for _ in 0..2 {
            h.run(Request::Detach {
                key: holder,
                delete_on_close: None,
            });
            h.commit(true);
            h.engine.process_retries();
            h.commit(true);
            h.drain_replies();
            assert!(h.reply(bob).is_none(), "{d:?}: bob's open still waits");
            assert!(h.engine.handles.contains_key(&holder), "{d:?}: kept");
            resume_alices(&mut h, holder);
        }
        assert_eq!(
            lease_breaks(&h),
            vec![(k, "RWH".into(), "RH".into(), true); 3],
            "{d:?}"
        );
        assert_eq!(h.break_epochs(), vec![epoch; 3], "{d:?}: the break's epoch");
        assert_eq!(h.engine.stats.breaks, 3, "{d:?}: each sent counts");
        acknowledge(&mut h, k, "RH");
        assert!(matches!(h.reply(bob), Some(Ok(_))), "{d:?}");
    }
}

/// A replayed open of a holder still attached on the same filterd
/// connection (rksmbd's one connection, a multichannel client replaying
/// on another channel) is sent the break in progress again.
#[test]
fn a_replayed_open_of_an_attached_holder_is_sent_the_break_again() {
    let (mut h, k, bob, breaks) = replay_mid_break(false);
    assert_eq!(breaks[1], breaks[0], "the same break: {breaks:?}");
    acknowledge(&mut h, k, "RH");
    assert!(matches!(h.reply(bob), Some(Ok(_))), "{:?}", h.reply(bob));
}

/// As above with a second open under the lease key attached on the same
/// connection (rksmbd: every client's opens on one connection): it does
/// not count as told (re-review rr40a R1).
#[test]
fn a_replayed_open_of_one_of_two_attached_holders_on_one_connection_is_sent_the_break_again() {
    replay_mid_break(true);
}

/// Re-review rr40b F2: a durable holder whose connection died mid-break
/// and that resumes on the same filterd connection as a second open
/// under its lease key (rksmbd: every client connection on one) is sent
/// the break again: the other open counted as told, though the break had
/// gone to the dead connection.
#[test]
fn a_resumed_holder_beside_another_attached_holder_is_sent_the_break_again() {
    let durable = Durability::Persistent { timeout_ms: 60_000 };
    let (mut h, _k, holder, _o, bob) = holders_mid_break(true, durable);
    h.run(Request::Detach {
        key: holder,
        delete_on_close: None,
    });
    h.commit(true);
    resume_alices(&mut h, holder);
    let breaks = lease_breaks(&h);
    assert_eq!(breaks.len(), 2, "sent again behind the resume: {breaks:?}");
    assert!(h.reply(bob).is_none(), "bob still waits");
}

/// An SMB 2/3 RWH holder of "a" (and a `second` open under its key),
/// bob's open waiting for its break, then the holder's open replayed:
/// the harness, the lease key, bob's request and the breaks sent (two:
/// checked).
fn replay_mid_break(second: bool) -> (Harness, libfilter::lease::LeaseKey, u64, Vec<BreakSent>) {
    let durable = Durability::Persistent { timeout_ms: 60_000 };
    let (mut h, k, holder, o, bob) = holders_mid_break(second, durable);
    let again = h.run(Request::ReplayOpen(o));
    h.commit(true);
    h.drain_replies();
    assert_eq!(h.opened(again), holder, "the replay gets the original");
    let breaks = lease_breaks(&h);
    assert_eq!(breaks.len(), 2, "sent again behind the replay: {breaks:?}");
    assert!(h.reply(bob).is_none(), "bob still waits");
    (h, k, bob, breaks)
}

/// An SMB 2/3 RWH holder of "a" opened with `durability` (and a `second`
/// open under its key, attached on the same connection), and bob's open
/// waiting for the break sent: the harness, the lease key, the holder,
/// its open request, bob's request.
fn holders_mid_break(
    second: bool,
    durability: Durability,
) -> (
    Harness,
    libfilter::lease::LeaseKey,
    ResumeKey,
    OpenRequest,
    u64,
) {
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
    let k = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let Request::Open(mut o) = with_rwh_lease(open("a", Rights::ALL), k) else {
        unreachable!("an open")
    };
    o.durability = durability;
    let holder = h.run(Request::Open(o.clone()));
    h.commit(true);
    let holder = h.opened(holder);
    if second {
        let other = h.run(with_rwh_lease(open("a", Rights::ALL), k));
        h.commit(true);
        assert_ne!(h.opened(other), holder);
    }
    let bob = h.run(bobs(
        "a",
        Rights::READ.union(Rights::WRITE),
        Disposition::Open,
    ));
    h.commit(true);
    h.drain_replies();
    assert_eq!(lease_breaks(&h).len(), 1, "the break is sent");
    (h, k, holder, o, bob)
}

/// An SMB 2/3 persistent RWH holder of "a" away (detached), and bob's
/// open waiting for its break: the harness, the lease key, the holder,
/// bob's request.
fn bob_waits_for_a_persistent_holder_away() -> (Harness, libfilter::lease::LeaseKey, ResumeKey, u64)
{
    let (mut h, k, holder) = a_detached_rwh_holder_as(
        Durability::Persistent { timeout_ms: 60_000 },
        libfilter::lease::MSFSA_PROTOCOL,
    );
    let bob = h.run(bobs(
        "a",
        Rights::READ.union(Rights::WRITE),
        Disposition::Open,
    ));
    h.commit(true);
    h.drain_replies();
    (h, k, holder, bob)
}

/// Re-review rr39h F3: a holder that resumes just before the break's
/// deadline gets time to write back and acknowledge (the break timeout,
/// at most 5 s, from its resume): the lease is not lowered under it at
/// the deadline the break was given when decided.
#[test]
fn a_holder_resuming_at_the_deadline_gets_time_to_acknowledge() {
    let (mut h, k, holder, bob) = bob_waits_for_a_persistent_holder_away();
    assert!(h.reply(bob).is_none());
    // Almost at its deadline when the holder resumes.
    for b in h.engine.breaking.values_mut() {
        b.deadline_ms = mono_ms() + 1;
    }
    resume_alices(&mut h, holder);
    assert_eq!(lease_breaks(&h).len(), 1, "told on its resume");
    h.engine.expire_due(mono_ms() + 500);
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    assert!(h.reply(bob).is_none(), "the holder still has time to ack");
    let l = h.engine.handles[&holder].rec.lease.unwrap();
    assert_eq!(l.state.to_string(), "RWH", "not lowered");
    acknowledge(&mut h, k, "RH");
    assert!(matches!(h.reply(bob), Some(Ok(_))), "{:?}", h.reply(bob));
}

/// Re-review rr39k A3: the deadline is pushed back once, not at every
/// resume: a holder resuming and dropping again in a loop kept the
/// breaking open waiting for ever.
#[test]
fn a_break_deadline_is_pushed_back_once_only() {
    let (mut h, _k, holder, bob) = bob_waits_for_a_persistent_holder_away();
    for _ in 0..3 {
        for b in h.engine.breaking.values_mut() {
            b.deadline_ms = b.deadline_ms.min(mono_ms() + 1);
        }
        resume_alices(&mut h, holder);
        h.run(Request::Detach {
            key: holder,
            delete_on_close: None,
        });
        h.commit(true);
        h.drain_replies();
    }
    let latest = h.engine.breaking.values().map(|b| b.deadline_ms).max();
    assert!(
        latest.is_some_and(|d| d <= mono_ms() + 1),
        "pushed back again: {latest:?}"
    );
    h.engine.expire_due(mono_ms() + 10);
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    assert!(matches!(h.reply(bob), Some(Ok(_))), "{:?}", h.reply(bob));
}

/// Re-review rr39h F4: a holder that comes back with an overwrite under
/// its lease key while the break is in progress (its first holder away)
/// waits for the overwrite's intent; attached when it finishes, it is
/// told of the break behind its reply, as an open answered at once is.
#[test]
fn an_overwrite_attached_under_a_breaking_lease_is_told_of_the_break() {
    let (mut h, k, _holder) = a_detached_rwh_holder_as(
        Durability::Persistent { timeout_ms: 60_000 },
        libfilter::lease::MSFSA_PROTOCOL,
    );
    let bob = h.run(bobs(
        "a",
        Rights::READ.union(Rights::WRITE),
        Disposition::Open,
    ));
    h.commit(true);
    h.drain_replies();
    assert!(h.reply(bob).is_none());
    assert!(lease_breaks(&h).is_empty(), "nothing sent yet");
    let again = h.run(with_rwh_lease(
        with_disposition(open("a", Rights::ALL), Disposition::Overwrite),
        k,
    ));
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    assert!(h.reply(again).is_some(), "the overwrite is answered");
    h.opened(again);
    assert_eq!(h.fs.file("a").map(|f| f.size), Some(0), "truncated");
    assert_eq!(
        lease_breaks(&h),
        vec![(k, "RWH".into(), "RH".into(), true)],
        "the holder attached by the overwrite is told of the break"
    );
}

/// A resumable holder that never comes back: at the break's deadline the
/// lease goes to none (Windows' rule, MS-SMB2 3.3.2.5) and the waiting
/// open is let in; a persistent holder keeps its handle (its lowered
/// lease stored), a durable one, left without H, is closed (3.3.4.7).
#[test]
fn a_resumable_holders_break_lowers_at_its_deadline() {
    for (d, kept) in [
        (Durability::Persistent { timeout_ms: 60_000 }, true),
        (Durability::Durable { timeout_ms: 60_000 }, false),
    ] {
        let (mut h, _k, holder) = a_detached_rwh_holder_as(d, libfilter::lease::MSFSA_PROTOCOL);
        let bob = h.run(bobs(
            "a",
            Rights::READ.union(Rights::WRITE),
            Disposition::Open,
        ));
        h.commit(true);
        h.drain_replies();
        assert!(h.reply(bob).is_none(), "{d:?}");
        // Past the break's deadline, long before the handle's.
        h.engine.expire_due(mono_ms() + 5_000);
        h.commit(true);
        h.engine.process_retries();
        h.commit(true);
        h.drain_replies();
        assert!(matches!(h.reply(bob), Some(Ok(_))), "{d:?}");
        assert_eq!(h.engine.handles.contains_key(&holder), kept, "{d:?}");
        if kept {
            let stored = h.store.inner.lock().unwrap().handles[&holder].clone();
            assert_eq!(
                stored.lease.unwrap().state,
                libfilter::lease::LeaseState::NONE,
                "{d:?}"
            );
        }
        assert!(lease_breaks(&h).is_empty(), "{d:?}: nothing sent");
    }
}

/// The smb-like spec's rule stays for smbshim's holders (and a durable
/// SMB 2/3 holder whose break takes H: MS-SMB2 3.3.4.7 closes it): a
/// disconnected holder is lowered at once, the conflicting open not held.
#[test]
fn a_disconnected_holder_of_the_smb_like_spec_is_lowered_at_once() {
    for (d, protocol, share) in [
        (
            Durability::Persistent { timeout_ms: 60_000 },
            "smb",
            Rights::ALL,
        ),
        (
            Durability::Durable { timeout_ms: 60_000 },
            "smb",
            Rights::ALL,
        ),
        (
            Durability::Durable { timeout_ms: 60_000 },
            libfilter::lease::MSFSA_PROTOCOL,
            Rights::NONE,
        ),
    ] {
        let (mut h, _k, _holder) = a_detached_rwh_holder_as(d, protocol);
        let Request::Open(mut o) = bobs("a", Rights::READ.union(Rights::WRITE), Disposition::Open)
        else {
            unreachable!("an open")
        };
        o.share = share;
        let bob = h.run(Request::Open(o));
        h.commit(true);
        h.engine.process_retries();
        h.commit(true);
        h.drain_replies();
        assert!(h.reply(bob).is_some(), "{d:?} {protocol}: answered at once");
    }
}

/// Review rvfailover (its finding 3): a durable SMB 2/3 handle H1 under
/// lease key K, disconnected, was closed when K's break — sent to, and
/// acknowledged through, the same client's handle H2 under K on another
/// connection — lowered K while keeping H. MS-SMB2 3.3.4.7 closes a
/// disconnected durable open only when the lease loses H: H1 stays.
#[test]
fn a_disconnected_durable_holder_survives_a_break_acked_elsewhere_keeping_h() {
    let (mut h, k, h1) = a_detached_rwh_holder_as(
        Durability::Durable { timeout_ms: 60_000 },
        libfilter::lease::MSFSA_PROTOCOL,
    );
    let Request::Open(mut o) = with_rwh_lease(open("a", Rights::ALL), k) else {
        unreachable!("an open")
    };
    o.durability = Durability::Durable { timeout_ms: 60_000 };
    o.disposition = Disposition::Open;
    let h2 = h.run(Request::Open(o));
    h.commit(true);
    let h2 = h.opened(h2);
    let bob = h.run(bobs(
        "a",
        Rights::READ.union(Rights::WRITE),
        Disposition::Open,
    ));
    h.commit(true);
    h.drain_replies();
    assert_eq!(lease_breaks(&h).len(), 1, "sent through H2's connection");
    acknowledge(&mut h, k, "RH");
    assert!(matches!(h.reply(bob), Some(Ok(_))));
    assert!(h.engine.handles.contains_key(&h1), "H1 was closed");
    assert!(h.engine.handles.contains_key(&h2));
}

/// Runs `open`, detaches the handle it opens, both committed: its key.
fn opened_and_detached(h: &mut Harness, open: Request) -> ResumeKey {
    let opened = h.run(open);
    h.commit(true);
    let key = h.opened(opened);
    h.run(Request::Detach {
        key,
        delete_on_close: None,
    });
    h.commit(true);
    key
}

/// Review rvobs: a replayed open (its create GUID names a disconnected
/// handle) counted in `stats.replays_detected` before its reattachment
/// committed, and a failed commit, which refuses the reply, kept it. Only
/// a replay answered counts.
#[test]
fn a_replayed_open_whose_commit_fails_is_not_counted() {
    let mut h = Harness::new();
    let req = open("a", Rights::ALL);
    let key = opened_and_detached(&mut h, req.clone());
    let Request::Open(o) = req else {
        unreachable!("open() makes an open")
    };
    let req = Request::ReplayOpen(o);
    let replay = h.run(req.clone());
    assert!(h.reply(replay).is_none(), "waits for the reattachment");
    assert_eq!(h.engine.durable_stats().replays_detected, 0, "pending");
    h.commit(false);
    assert!(h.reply(replay).is_some_and(|r| r.is_err()), "refused");
    assert_eq!(h.engine.stats.replays_detected, 0, "refused: not counted");
    let replay = h.run(req);
    h.commit(true);
    assert_eq!(h.opened(replay), key, "the same handle");
    assert_eq!(h.engine.stats.replays_detected, 1, "answered: counted");
}

/// Re-review rr39e F4: a replayed open that asks its handle to hold the
/// lease key it names (`replay_same_lease`, rksmbd's replayed CREATE) and
/// finds it under another is refused `AccessDenied` before anything is
/// reattached — the handle stays disconnected with its deadline, no
/// replay is counted — and one under the handle's key gets it. Without
/// the flag the key is not checked (every other frontend's replay).
#[test]
fn a_replay_under_another_lease_key_changes_nothing() {
    let mut h = Harness::new();
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    let key1 = LeaseKey(uuid::Uuid::from_u128(1));
    let key2 = LeaseKey(uuid::Uuid::from_u128(2));
    o.lease = Some(LeaseRequest {
        key: key1,
        state: LeaseState::R,
        epoch: 0,
    });
    let key = opened_and_detached(&mut h, Request::Open(o.clone()));
    let was = (
        h.engine.handles[&key].rec.conn,
        h.engine.handles[&key].expires_mono,
        h.engine.stats.replays_detected,
    );
    let stored = h_stored(&h, key);
    o.replay_same_lease = true;
    let mut other = o.clone();
    other.lease = other.lease.map(|l| LeaseRequest { key: key2, ..l });
    let id = h.run(Request::ReplayOpen(other));
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::AccessDenied);
    let hd = &h.engine.handles[&key];
    assert_eq!(
        (
            hd.rec.conn,
            hd.expires_mono,
            h.engine.stats.replays_detected
        ),
        was
    );
    assert_eq!(h_stored(&h, key), stored, "the store holds it as it was");
    let id = h.run(Request::ReplayOpen(o));
    h.commit(true);
    assert_eq!(h.opened(id), key, "under its own key");
}

/// Re-review rr46e F1: a replay that only resumes (`resume_only`,
/// rksmbd's replayed CREATE let past its caps of opens) whose create GUID
/// names no handle — the original closed before it came, or never made —
/// is refused `NoSuchHandle` with nothing opened, created or truncated;
/// one whose GUID names a handle gets it as any replay. Without the flag
/// such a replay runs as a fresh open.
#[test]
fn a_replay_that_only_resumes_runs_nothing_afresh() {
    let mut h = Harness::new();
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.disposition = Disposition::OverwriteIf;
    o.resume_only = true;
    // The original, closed: its create GUID names nothing now.
    let first = h.run(Request::Open(o.clone()));
    h.commit(true);
    let key = h.opened(first);
    h.run(Request::Close {
        key,
        put: Vec::new(),
        delete: Vec::new(),
        delete_on_close: None,
    });
    h.commit(true);
    h.fs.put("a", 10);
    let before = h.fs.snapshot();
    let id = h.run(Request::ReplayOpen(o.clone()));
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::NoSuchHandle);
    let mut absent = o.clone();
    absent.path = RelPath::new("n").unwrap();
    absent.create_guid = Some(CreateGuid(uuid::Uuid::new_v4()));
    let id = h.run(Request::ReplayOpen(absent));
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::NoSuchHandle);
    assert_eq!(h.fs.snapshot(), before, "nothing truncated or created");
    assert!(h.engine.handles.is_empty(), "nothing opened");
    // One whose GUID names a (detached) handle gets it.
    let mut held = o.clone();
    held.create_guid = Some(CreateGuid(uuid::Uuid::new_v4()));
    held.resume_only = false;
    let key = opened_and_detached(&mut h, Request::Open(held.clone()));
    held.resume_only = true;
    let id = h.run(Request::ReplayOpen(held));
    h.commit(true);
    assert_eq!(h.opened(id), key, "the original");
    // Without the flag the closed original's replay runs afresh.
    o.resume_only = false;
    let id = h.run(Request::ReplayOpen(o));
    h.commit(true);
    assert_ne!(h.opened(id), key);
    assert_eq!(h.fs.file("a").map(|f| f.size), Some(0), "truncated");
}

/// A plain (non-durable) open of `path` by alice, read and write, sharing
/// nothing.
fn plain_exclusive_open(path: &str, disposition: Disposition) -> Request {
    let Request::Open(mut o) = open(path, Rights::NONE) else {
        unreachable!()
    };
    o.durability = Durability::None;
    o.create_guid = None;
    o.disposition = disposition;
    Request::Open(o)
}

/// The open gate after a restart (`restart_gate`): an open of an existing
/// file waits while a frontend seen before the restart has not resynced
/// (its client may cache under a lease the restart forgot); a `no_wait`
/// open is answered Busy; a create and the instance's own opens do not
/// wait; `Resynced` (or a hello without the feature) lets the open run;
/// at the gate's deadline the absent instance is given up.
#[test]
fn opens_after_a_restart_wait_until_the_frontends_seen_before_resynced() {
    let mut h = Harness::new();
    let away = InstanceName::new("rksmbd-x").unwrap();
    let me = InstanceName::new("smb-t").unwrap();
    h.engine.restart_unsettled = [away.clone(), me.clone()].into_iter().collect();
    let held = h.run(plain_exclusive_open("a", Disposition::Open));
    assert!(h.reply(held).is_none(), "held for rksmbd-x");
    assert_eq!(h.engine.stats.opens_waited_for_frontends, 1);
    let Request::Open(mut o) = plain_exclusive_open("b", Disposition::Open) else {
        unreachable!()
    };
    o.no_wait = true;
    let busy = h.run(Request::Open(o));
    assert_eq!(h.refused(busy), ErrorCode::Busy);
    let created = h.run(plain_exclusive_open("new", Disposition::Create));
    h.opened(created);
    // Our own Resynced settles us, not rksmbd-x: still held.
    h.run(Request::Resynced);
    assert!(!h.engine.restart_unsettled.contains(&me));
    h.engine.process_retries();
    h.drain_replies();
    assert!(h.reply(held).is_none(), "still held for rksmbd-x");
    // rksmbd-x resyncs: the open runs.
    h.engine.restart_settled(&away);
    h.engine.process_retries();
    h.drain_replies();
    h.opened(held);

    // Own opens pass; an absent instance is given up at the deadline.
    let mut h = Harness::new();
    h.engine.restart_unsettled = [me.clone()].into_iter().collect();
    let own = h.run(plain_exclusive_open("a", Disposition::Open));
    h.opened(own);
    h.engine.restart_unsettled = [away.clone()].into_iter().collect();
    let held = h.run(plain_exclusive_open("b", Disposition::Open));
    assert!(h.reply(held).is_none(), "held for rksmbd-x");
    let deadline = h.engine.restart_gate_deadline.expect("a deadline");
    h.engine.expire_due(deadline - 1);
    h.engine.process_retries();
    h.drain_replies();
    assert!(h.reply(held).is_none(), "held until the deadline");
    h.engine.expire_due(deadline);
    h.engine.process_retries();
    h.drain_replies();
    h.opened(held);
    assert!(h.engine.hint_gave_up.contains(&away), "given up");
    assert!(h.engine.restart_unsettled.is_empty());
}

/// A request the engine runs once its lease may have run out acts on
/// nothing: no file is created, nothing is batched or answered. The poll's
/// own check is not enough: a thread stopped (SIGSTOP) after that check
/// reads, once it runs again, requests that arrived while the lease ran
/// out (seen once in `etcd.rs`: a stale owner created the file `late`).
#[test]
fn a_request_run_after_the_lease_may_have_run_out_acts_on_nothing() {
    let mut h = Harness::new();
    h.store.inner.lock().unwrap().lost = true;
    let stepped_down = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.run(open("n", Rights::READ))
    }));
    assert!(stepped_down.is_err(), "the engine stepped down");
    assert!(h.fs.file("n").is_none(), "the stale owner created a file");
    assert!(h.drain_replies().is_empty(), "the stale owner answered");
    h.store.inner.lock().unwrap().lost = false;
    h.engine.flush();
    assert!(
        h.pipe.take_jobs().is_empty(),
        "the stale owner batched a change"
    );
}

/// The open gate after a restart holds local opens too (round aW), of
/// any file — one without state here may be one whose lease the restart
/// forgot: decided once the instance seen before has resynced, or at the
/// gate's deadline; never published to the reader meanwhile.
#[test]
fn local_opens_after_a_restart_wait_at_the_open_gate() {
    use crate::command::Verdict;
    let away = InstanceName::new("smb-away").unwrap();
    let local_open = |h: &mut Harness| {
        let got = Arc::new(Mutex::new(None));
        let sink = got.clone();
        let fd = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        h.engine.on_local_open(
            FileId { dev: 1, ino: 2 },
            4242,
            fd,
            LocalReply::for_test(Box::new(move |v| *sink.lock().unwrap() = Some(v))),
        );
        got
    };
    // Ended by the resync.
    let mut h = Harness::new();
    h.engine.restart_unsettled = [away.clone()].into_iter().collect();
    let got = local_open(&mut h);
    assert_eq!(*got.lock().unwrap(), None, "held for smb-away");
    assert_eq!(h.engine.stats.local_opens_waited_for_frontends, 1);
    assert_eq!(h.engine.stats.opens_waited_for_frontends, 0);
    assert!(!h.engine.local_open_is_plain(FileId { dev: 1, ino: 2 }));
    h.engine.restart_settled(&away);
    h.engine.process_retries();
    assert_eq!(*got.lock().unwrap(), Some(Verdict::Allow));
    assert!(h.engine.waiting_local.is_empty());
    // Ended by the deadline.
    let mut h = Harness::new();
    h.engine.restart_unsettled = [away.clone()].into_iter().collect();
    let got = local_open(&mut h);
    let deadline = h.engine.restart_gate_deadline.expect("a deadline");
    h.engine.expire_due(deadline - 1);
    h.engine.process_retries();
    assert_eq!(*got.lock().unwrap(), None, "held until the deadline");
    h.engine.expire_due(deadline);
    h.engine.process_retries();
    assert_eq!(*got.lock().unwrap(), Some(Verdict::Allow));
    assert!(h.engine.restart_unsettled.is_empty());
}

/// Review aV: a handle lost to a reused inode (`Engine::lose`) leaves the
/// file index and drops its locks and lease key at once, and the commit
/// that records the loss may fail. Then the loss is undone whole, as any
/// change of a failed commit: the handle is disconnected again, filed
/// under its file, holds its locks (and their OFD mirror) and its lease
/// key — exactly what the store still says. The next open of the file
/// finds the loss again and records it.
#[test]
fn a_loss_whose_commit_fails_is_undone_whole() {
    use libfilter::lease::{LeaseKey, LeaseState};
    let mut h = Harness::new();
    h.fs.reuse_inodes(true);
    let lk = LeaseKey(uuid::Uuid::new_v4());
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.lease = Some(LeaseRequest {
        key: lk,
        state: LeaseState::parse("RH").unwrap(),
        epoch: 0,
    });
    let id = h.run(Request::Open(o));
    h.commit(true);
    let key = h.opened(id);
    let locked = h.run(Request::Lock {
        key,
        locks: vec![LockOp {
            range: LockRange {
                offset: 0,
                length: 4,
            },
            exclusive: true,
            unlock: false,
        }],
        lock_sequence: None,
        lock_owner: None,
    });
    h.commit(true);
    assert!(
        matches!(h.reply(locked), Some(Ok(_))),
        "{:?}",
        h.reply(locked)
    );
    // filterd restarts: the recovered handle holds no descriptor of its
    // file, only its number — which a new file under the name gets.
    let mut h = h.restarted();
    assert!(h.engine.handles[&key].fd.is_none());
    h.fs.unlink("a");
    h.fs.put("a", 5);
    let before = h.digest();
    let alice = ClientId::new("alice").unwrap();
    let lease_key_before = h.engine.lease_files.get(&(alice.clone(), lk)).copied();
    assert!(lease_key_before.is_some());
    let stored = h.store.inner.lock().unwrap().handles[&key].clone();

    let id = h.run(open("a", Rights::ALL));
    assert_eq!(h.engine.handles[&key].rec.conn, ConnState::Lost);
    assert!(
        h.reply(id).is_none(),
        "the open waits for the loss's commit"
    );
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    assert_eq!(h.digest(), before, "the loss is undone");
    assert_eq!(
        h.engine.lease_files.get(&(alice, lk)).copied(),
        lease_key_before,
        "the lease key is held again"
    );
    assert_eq!(h.store.inner.lock().unwrap().handles[&key], stored);

    // The next open finds the loss again, and it is recorded.
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    h.opened(id);
    assert_eq!(
        h.store.inner.lock().unwrap().handles[&key].conn,
        ConnState::Lost
    );
    assert!(!h.engine.by_file.values().flatten().any(|k| *k == key));
}

/// The daemon's filesystem fences every change on the owner's lease
/// (`HostFs::fence`, round 20): once the lease may have run out, no
/// rename, remove, size change or create is made — each checked right
/// before its system call, after the lookups that prepare it. End to end
/// (`tests/tests/etcd_fence.rs`) an etcd owner frozen between the step's
/// own check and the system call made its change after a standby had
/// taken over; here the lease is lost before the call, on a real
/// directory, so the fence is what stops each operation.
#[test]
fn the_host_filesystem_changes_nothing_once_the_lease_may_have_run_out() {
    use std::os::unix::fs::MetadataExt;
    let dir = std::env::temp_dir().join(format!("rkf-fence-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a"), b"data").unwrap();
    let meta = std::fs::metadata(dir.join("a")).unwrap();
    let file = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let kh = libfilter::sys::file_handle_of(std::fs::File::open(dir.join("a")).unwrap().as_fd())
        .unwrap();
    let root = OwnedFd::from(std::fs::File::open(&dir).unwrap());
    let store = Arc::new(MemStore::default());
    let fs = super::fs::HostFs::new(root, store.clone());
    let (a, b, new) = (
        RelPath::new("a").unwrap(),
        RelPath::new("b").unwrap(),
        RelPath::new("new").unwrap(),
    );
    let rw = Access::new(Rights::READ.union(Rights::WRITE)).unwrap();
    store.inner.lock().unwrap().lost = true;
    type Step<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let steps: Vec<Step<'_>> = vec![
        (
            "rename",
            Box::new(|| drop(fs.rename(&a, &b, file, Some(&kh), false))),
        ),
        ("remove", Box::new(|| drop(fs.remove(&a, file, Some(&kh))))),
        ("truncate", Box::new(|| drop(fs.truncate(&a, file)))),
        (
            "truncate by handle",
            Box::new(|| drop(fs.truncate_by_handle(&kh, &a))),
        ),
        (
            "set size",
            Box::new(|| drop(fs.set_size_by_handle(&kh, Some(&a), 1))),
        ),
        (
            "create",
            Box::new(|| drop(fs.open(&new, rw, Disposition::Create, None))),
        ),
        (
            "create if absent",
            Box::new(|| drop(fs.open(&new, rw, Disposition::OpenIf, None))),
        ),
        (
            "marked create",
            Box::new(|| drop(fs.open(&new, rw, Disposition::Create, Some(b"G")))),
        ),
    ];
    for (what, step) in &steps {
        let stepped_down = std::panic::catch_unwind(std::panic::AssertUnwindSafe(step));
        assert!(stepped_down.is_err(), "{what}: made without stepping down");
        assert_eq!(
            std::fs::read(dir.join("a")).ok().as_deref(),
            Some(&b"data"[..]),
            "{what}"
        );
        assert!(
            !dir.join("b").exists() && !dir.join("new").exists(),
            "{what}"
        );
    }
    // Owning again, the same calls act.
    store.inner.lock().unwrap().lost = false;
    fs.rename(&a, &b, file, Some(&kh), false).unwrap();
    assert!(dir.join("b").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A directory rename (rksmbd's, `Request::RenameDirectory`) is refused
/// while a handle was opened below the directory — Windows refuses it,
/// and the handle's path would go stale — and a pending close of the last
/// one makes it wait: if that close's commit fails the handle is back and
/// the rename is refused; if it commits, the directory moves. A handle in
/// a sibling with the same prefix does not count.
#[test]
fn a_directory_rename_is_refused_by_handles_below_and_waits_for_their_close() {
    for ok in [false, true] {
        let mut h = Harness::new();
        h.fs.mkdir("dd");
        let below = h.run(open("d/m", Rights::ALL));
        let sibling = h.run(open("dd/m", Rights::ALL));
        h.commit(true);
        let (below, _sibling) = (h.opened(below), h.opened(sibling));
        let mv = || Request::RenameDirectory {
            from: RelPath::new("d").unwrap(),
            to: RelPath::new("e").unwrap(),
            replace: false,
            expect: None,
        };
        let refused = h.run(mv());
        h.commit(true);
        h.drain_replies();
        assert_eq!(h.refused(refused), ErrorCode::AccessDenied);
        assert!(h.fs.file("d/m").is_some(), "moved under an open handle");
        let close = h.run(Request::Close {
            key: below,
            put: vec![],
            delete: vec![],
            delete_on_close: None,
        });
        let id = h.run(mv());
        assert!(h.reply(id).is_none(), "answered before the close commits");
        assert!(h.fs.file("d/m").is_some(), "moved before the close commits");
        h.commit(ok);
        h.engine.process_retries();
        h.commit(true);
        h.drain_replies();
        if ok {
            assert!(h.reply(close).is_some_and(|r| r.is_ok()));
            assert!(h.reply(id).is_some_and(|r| r.is_ok()), "{:?}", h.reply(id));
            assert!(h.fs.file("e/m").is_some() && h.fs.file("d/m").is_none());
        } else {
            assert!(h.engine.handles.contains_key(&below), "the close is undone");
            assert_eq!(h.refused(id), ErrorCode::AccessDenied);
            assert!(h.fs.file("d/m").is_some(), "moved under the handle back");
        }
    }
}

/// After a restart the link marks of the recovered handles are found a
/// chunk per step (they are not stored): a directory rename waits until
/// every one is known, then runs — here refused, a handle being below.
#[test]
fn a_directory_rename_after_a_restart_waits_for_the_link_marks() {
    let mut h = Harness::new();
    let n = super::changes::LINKS_PER_STEP + 2;
    for i in 0..=n {
        let path = if i == n {
            "d/m".to_owned()
        } else {
            format!("f{i}")
        };
        let id = h.run(open(&path, Rights::ALL));
        h.commit(true);
        h.opened(id);
    }
    let mut h = h.restarted();
    assert!(h.engine.links_pending);
    let id = h.run(Request::RenameDirectory {
        from: RelPath::new("d").unwrap(),
        to: RelPath::new("e").unwrap(),
        replace: false,
        expect: None,
    });
    h.drain_replies();
    assert!(h.reply(id).is_none(), "answered before the marks are known");
    h.engine.process_retries();
    h.drain_replies();
    assert!(h.reply(id).is_none(), "{} handles need two steps", n + 1);
    h.engine.process_retries();
    h.drain_replies();
    assert!(!h.engine.links_pending);
    assert_eq!(h.refused(id), ErrorCode::AccessDenied);
    assert!(h.fs.file("d/m").is_some());
}

/// Recovery decides an interrupted rename by where its file is, named by
/// kernel handle — not by what the target name holds. A rename whose file
/// is at neither name (moved while filterd was down: before or after the
/// rename, nothing says) and one whose target a new file took under the
/// reused inode number are neither claimed nor run again: their replays
/// are told the outcome is unknown. A remove is made once its path no
/// longer names its file — also one moved away meanwhile (asking whether
/// the file has a name left would call a remove of one of several hard
/// links unknown).
#[test]
fn recovery_claims_no_rename_whose_file_went_elsewhere() {
    let h = Harness::new();
    let (fs, store) = (h.fs.clone(), h.store.clone());
    fs.put("r", 1);
    fs.put("n", 1);
    let scope = ReplayScope::Session(ScopeName::new("nfs/s").unwrap());
    let path = |p: &str| RelPath::new(p).unwrap();
    let spec = |op_id| RecordSpec {
        scope: scope.clone(),
        op_id,
        reply: "ok".into(),
        keep: 8,
    };
    let rename = |from: &str, to: &str, op_id| {
        let (file, kh) = fs.identity_at(&path(from)).unwrap();
        let key = ResumeKey::new_random();
        Intent {
            id: IntentId(uuid::Uuid::new_v4()),
            change: IntentChange::Rename {
                key,
                from: path(from),
                to: path(to),
                file,
                replace: false,
                record: Some(spec(op_id)),
                kernel_handle: Some(kh),
            },
            recorded_ms: 0,
        }
    };
    let remove = |p: &str, op_id| {
        let (file, kh) = fs.identity_at(&path(p)).unwrap();
        Intent {
            id: IntentId(uuid::Uuid::new_v4()),
            change: IntentChange::Remove {
                path: path(p),
                file,
                record: Some(spec(op_id)),
                kernel_handle: Some(kh),
                on_close: false,
            },
            recorded_ms: 0,
        }
    };
    // a → x, interrupted; then a local process moved a to z.
    let moved = rename("a", "x", 1);
    // r → s never happened; a local process removed r and made s, which
    // took r's inode number.
    let reused = rename("r", "s", 2);
    // The remove of b never happened; a local process moved b to y.
    let kept = remove("b", 3);
    // The remove of n happened.
    let removed = remove("n", 4);
    let (z, y) = (path("z"), path("y"));
    let (fa, fb) = (
        fs.file_at_checked(&path("a")).unwrap().unwrap(),
        fs.file_at_checked(&path("b")).unwrap().unwrap(),
    );
    fs.rename(&path("a"), &z, fa, None, false).unwrap();
    fs.rename(&path("b"), &y, fb, None, false).unwrap();
    fs.unlink("r");
    fs.reuse_inodes(true);
    fs.put("s", 2);
    fs.unlink("n");
    store
        .commit(&[&[
            StoreOp::PutIntent(Box::new(moved)),
            StoreOp::PutIntent(Box::new(reused)),
            StoreOp::PutIntent(Box::new(kept)),
            StoreOp::PutIntent(Box::new(removed)),
        ]])
        .unwrap();
    fs.take_log();
    let _e = recovered(&fs, &store);
    let inner = store.inner.lock().unwrap();
    assert!(inner.intents.is_empty());
    let reply = |op: u64| {
        inner
            .replays
            .get(&replay_key(&scope, op))
            .map(|r| r.reply.clone())
    };
    for (op, what) in [
        (1, "a rename whose file moved elsewhere"),
        (2, "a rename whose target a reused inode took"),
    ] {
        assert_eq!(reply(op).as_deref(), Some(OUTCOME_UNKNOWN), "{what}");
    }
    assert_eq!(
        reply(3).as_deref(),
        Some("ok"),
        "a remove whose path is empty"
    );
    assert_eq!(reply(4).as_deref(), Some("ok"), "a remove that happened");
    assert!(fs.file("z").is_some() && fs.file("y").is_some() && fs.file("s").is_some());
    let log = fs.take_log();
    assert!(
        !log.iter()
            .any(|l| matches!(l, Logged::Rename(..) | Logged::Remove(_))),
        "nothing redone: {log:?}"
    );
}

/// A directory rename is refused while a change of a path below it is in
/// progress: a remove whose intent is committing (a crash after that
/// commit would find the path empty and take the remove for made), and a
/// delete on close whose handle's removal has committed but whose unlink
/// has not run yet. Once they are done the directory moves.
#[test]
fn a_directory_rename_is_refused_while_a_change_below_is_in_progress() {
    let mut h = Harness::new();
    h.fs.put("d/f", 1);
    h.fs.put("d/g", 1);
    let g = h.run(open("d/g", Rights::ALL));
    h.commit(true);
    let g = h.opened(g);
    h.run(Request::SetDeleteOnClose {
        key: g,
        delete: true,
        record: None,
    });
    h.commit(true);
    h.drain_replies();
    let mv = || Request::RenameDirectory {
        from: RelPath::new("d").unwrap(),
        to: RelPath::new("e").unwrap(),
        replace: false,
        expect: None,
    };
    let remove = h.run(Request::Remove {
        path: RelPath::new("d/f").unwrap(),
        record: Some(RecordSpec {
            scope: session(1),
            op_id: 1,
            reply: "ok".into(),
            keep: 8,
        }),
    });
    let refused = h.run(mv());
    h.commit(true);
    h.drain_replies();
    assert_eq!(h.refused(refused), ErrorCode::AccessDenied);
    assert!(h.reply(remove).is_some_and(|r| r.is_ok()));
    assert!(h.fs.file("d/f").is_none());
    // The delete on close: the handle's removal and the intent commit,
    // the unlink waits for the engine to hear of it.
    h.run(Request::Close {
        key: g,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    let held = h.commit_holding_intents(true);
    assert!(!held.is_empty() && h.fs.file("d/g").is_some());
    let refused = h.run(mv());
    h.commit(true);
    h.drain_replies();
    assert_eq!(h.refused(refused), ErrorCode::AccessDenied);
    assert!(h.fs.file("d/g").is_some(), "moved before the unlink");
    for id in held {
        h.engine.finish_parked(id);
    }
    h.commit(true);
    assert!(h.fs.file("d/g").is_none(), "the delete on close is lost");
    let moved = h.run(mv());
    h.commit(true);
    h.drain_replies();
    assert!(
        h.reply(moved).is_some_and(|r| r.is_ok()),
        "{:?}",
        h.reply(moved)
    );
}

/// A rename below a directory that is made, its completion (the intent's
/// deletion) still committing, holds a directory rename until that commit
/// is resolved (review D-4): moved in between and then a crash, recovery
/// would find the file at neither name and call a made rename unknown.
/// Its handle closed meanwhile, nothing else holds the directory.
#[test]
fn a_directory_rename_waits_for_a_rename_below_to_complete() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    let renamed = h.run(Request::Rename {
        key,
        to: RelPath::new("d/x").unwrap(),
        replace: false,
        record: Some(RecordSpec {
            scope: session(1),
            op_id: 1,
            reply: "renamed".into(),
            keep: 8,
        }),
    });
    let held = h.commit_holding_intents(true);
    assert!(!held.is_empty());
    h.run(Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    for id in held {
        h.engine.finish_parked(id);
    }
    assert!(h.fs.file("d/x").is_some(), "the rename is made");
    let moved = h.run(Request::RenameDirectory {
        from: RelPath::new("d").unwrap(),
        to: RelPath::new("e").unwrap(),
        replace: false,
        expect: None,
    });
    h.drain_replies();
    assert!(
        h.reply(moved).is_none(),
        "answered before the rename completes"
    );
    assert!(
        h.fs.file("d/x").is_some(),
        "moved before the rename completes"
    );
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    h.drain_replies();
    assert!(h.reply(renamed).is_some_and(|r| r.is_ok()));
    assert!(
        h.reply(moved).is_some_and(|r| r.is_ok()),
        "{:?}",
        h.reply(moved)
    );
    assert!(h.fs.file("e/x").is_some() && h.fs.file("d/x").is_none());
}

/// Review D-5: a record an open carries asks for the opened file's kernel
/// handle with a `"kernel_handle": null` member, and gets it in the
/// open's own commit when its connection was granted
/// `FEATURE_OPEN_KERNEL_HANDLE` (nfsshim wrote it in a second commit,
/// which an older create's could overwrite a newer create's record with);
/// a record without the member is filled as before and gains nothing, and
/// a frontend without the feature gets its member as it sent it.
#[test]
fn an_opens_record_gets_the_kernel_handle_it_asks_for() {
    let spec = |op_id: u64, reply: &str| RecordSpec {
        scope: session(1),
        op_id,
        reply: reply.into(),
        keep: 8,
    };
    fn stored(h: &Harness, op_id: u64) -> serde_json::Value {
        let scope = ReplayScope::Session(ScopeName::new("smb/s1").unwrap());
        serde_json::from_str(&h.engine.replays[&scope][&op_id].reply).unwrap()
    }
    fn grant(h: &mut Harness, features: u64) {
        if let Some(c) = h.engine.conns.get_mut(&h.conn) {
            c.features = features;
        }
    }
    let mut h = Harness::new();
    grant(&mut h, libfilter::proto::FEATURE_OPEN_KERNEL_HANDLE);
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.put = vec![
        spec(1, r#"{"v":"x","kernel_handle":null,"opened":null}"#),
        spec(2, r#"{"v":"x","opened":null}"#),
    ];
    let id = h.run(Request::Open(o));
    h.commit(true);
    let key = h.opened(id);
    let kh = h.engine.handles[&key].rec.kernel_handle.clone();
    assert!(kh.is_some(), "MemFs gives handles");
    assert_eq!(
        stored(&h, 1)["kernel_handle"],
        serde_json::to_value(&kh).unwrap()
    );
    assert_eq!(
        stored(&h, 1)["opened"]["key"],
        serde_json::json!(key.to_string())
    );
    assert_eq!(stored(&h, 2).get("kernel_handle"), None);
    assert_eq!(
        stored(&h, 2)["opened"]["key"],
        serde_json::json!(key.to_string())
    );
    grant(&mut h, 0);
    let Request::Open(mut o) = open("b", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.put = vec![spec(3, r#"{"v":"y","kernel_handle":"mine","opened":null}"#)];
    let id = h.run(Request::Open(o));
    h.commit(true);
    let key = h.opened(id);
    assert_eq!(stored(&h, 3)["kernel_handle"], serde_json::json!("mine"));
    assert_eq!(
        stored(&h, 3)["opened"]["key"],
        serde_json::json!(key.to_string())
    );
}

/// A resume whose commit fails is undone: the handle is disconnected
/// again with its deadline (before, the engine kept it attached to the
/// frontend that was told the resume failed; the store said disconnected,
/// so it never timed out and a retry was refused "attached, not
/// disconnected"). The frontend's retry then resumes it. A detach whose
/// commit fails is not undone: its frontend has let the handle go.
#[test]
fn a_resume_whose_commit_fails_is_undone_and_a_detach_is_not() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    let mut h = h.restarted();
    let resume = Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new("alice").unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key },
        owner: None,
        matching: None,
        if_last_held: false,
    });
    let was = h.engine.handles[&key].rec.conn;
    assert!(matches!(was, ConnState::Disconnected { .. }), "{was:?}");

    let id = h.run(resume.clone());
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    assert_eq!(h.engine.handles[&key].rec.conn, was);
    assert_eq!(h.engine.handles[&key].conn, None);
    assert!(!h.engine.conns[&h.conn].handles.contains(&key));

    let id = h.run(resume.clone());
    h.commit(true);
    assert_eq!(h.opened(id), key, "the retry resumes it");
    assert_eq!(h.engine.handles[&key].conn, Some(h.conn));

    let id = h.run(Request::Detach {
        key,
        delete_on_close: None,
    });
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    assert_eq!(h.engine.handles[&key].conn, None);
    assert!(!h.engine.conns[&h.conn].handles.contains(&key));
    // The client's resume through its next frontend finds it.
    let id = h.run(resume);
    h.commit(true);
    assert_eq!(h.opened(id), key);
}

/// Review (session 29): a file whose only handle is a stat open holding a
/// lease (smb2.lease.statopen gives one RWH) has protocol state: a local
/// open breaks the lease before it is let in. Before, no share-mode
/// holder was taken for no state: the local open was allowed at once, the
/// file marked ignored and its opener never tracked.
#[test]
fn a_local_open_breaks_the_lease_of_a_stat_open() {
    use crate::command::Verdict;
    use libfilter::lease::{LeaseKey, LeaseState};
    let mut h = Harness::new();
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.access = Access::new(Rights::READ).unwrap();
    o.durability = Durability::None;
    o.create_guid = None;
    o.stat = true;
    o.lease = Some(LeaseRequest {
        key: LeaseKey(uuid::Uuid::new_v4()),
        state: LeaseState::parse("RWH").unwrap(),
        epoch: 0,
    });
    let id = h.run(Request::Open(o));
    h.commit(true);
    let key = h.opened(id);
    let rec = &h.engine.handles[&key].rec;
    assert!(
        rec.lease.is_some_and(|l| l.state.contains(LeaseState::W)),
        "{:?}",
        rec.lease
    );
    let file = rec.file;
    let got = Arc::new(Mutex::new(None));
    let sink = got.clone();
    let fd = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
    h.engine.on_local_open(
        file,
        4242,
        fd,
        LocalReply::for_test(Box::new(move |v| *sink.lock().unwrap() = Some(v))),
    );
    h.drain_replies();
    assert_eq!(*got.lock().unwrap(), None, "waits for the break");
    assert!(
        h.events
            .iter()
            .any(|e| matches!(e, Event::LeaseBreak { .. })),
        "{:?}",
        h.events
    );
    // Acknowledged: the local open goes in.
    let Some((lease_key, state)) = h.events.iter().find_map(|e| match e {
        Event::LeaseBreak {
            lease_key,
            new_state,
            ..
        } => Some((*lease_key, *new_state)),
        _ => None,
    }) else {
        unreachable!("found above")
    };
    h.run(Request::LeaseBreakAck {
        lease_key,
        state,
        client: None,
    });
    h.commit(true);
    h.engine.process_retries();
    assert_eq!(*got.lock().unwrap(), Some(Verdict::Allow));
}

/// Review (session 29): a subtree export's set of files whose local opens
/// through other mounts reach the engine (`Mediated`) lets a file go once
/// its last handle closed and what is known of its local openers has
/// lingered — not while its close is committing (a failed commit puts the
/// handle back). Before, every file ever opened stayed in it for the run.
#[test]
fn a_file_without_handles_leaves_the_mediated_set_after_lingering() {
    let mut h = Harness::new();
    let mediated = Arc::new(crate::local::Mediated::subtree_for_test());
    h.engine.mediated = Some(mediated.clone());
    let mut keys = Vec::new();
    for p in ["a", "b", "c"] {
        let id = h.run(open(p, Rights::ALL));
        h.commit(true);
        let k = h.opened(id);
        mediated.add(h.engine.handles[&k].rec.file);
        keys.push((k, h.engine.handles[&k].rec.file));
    }
    let [(a, fa), (b, fb), (c, fc)] = keys[..] else {
        unreachable!("three opens")
    };
    let close = |key| Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    };
    let lingered = |h: &mut Harness| {
        for (until, _) in h.engine.lingering.iter_mut() {
            *until = std::time::Instant::now() - std::time::Duration::from_secs(1);
        }
    };
    // Its close committing: kept; the commit fails, the handle is back.
    h.run(close(a));
    lingered(&mut h);
    h.run(close(b));
    assert!(mediated.contains(fa), "kept while its close commits");
    h.commit(false);
    assert!(h.engine.handles.contains_key(&a) && mediated.contains(fa));
    // Closed: kept while it lingers, then let go at the next last close.
    h.run(close(a));
    h.commit(true);
    assert!(mediated.contains(fa), "kept while it lingers");
    lingered(&mut h);
    h.run(close(c));
    h.commit(true);
    assert!(!mediated.contains(fa), "let go");
    assert!(
        mediated.contains(fb) && mediated.contains(fc),
        "b open, c lingers"
    );
}

/// A durable intent's change is made (a rename; an overwrite by a second
/// open) right after a lock on the file's handle was queued for commit:
/// the completion builds on the lock (it writes records of the file whole).
/// When the lock's commit then fails, the completion can neither commit
/// (it carries what failed) nor be undone (its change is on disk): the
/// daemon stops as a crash would, and recovery finishes it from its intent
/// (the unit tests see a panic). Old code abandoned the completion and
/// served on: the handle put back at its old path with the file at the new
/// one, or an overwritten file without its handle, the intent left behind.
fn a_completion_built_on_a_failed_commit(overwrite: bool) {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    if overwrite {
        h.run(with_disposition(
            open("a", Rights::ALL),
            Disposition::Overwrite,
        ));
    } else {
        h.run(Request::Rename {
            key,
            to: RelPath::new("x").unwrap(),
            replace: false,
            record: None,
        });
    }
    // The intent is durable; before the engine hears so, a lock on the
    // handle runs and the committer takes its commit.
    let intents = h.commit_holding_intents(true);
    assert_eq!(intents.len(), 1);
    h.run(lock_10(key, 0));
    h.engine.flush();
    let lock = h
        .pipe
        .take_jobs()
        .iter()
        .flat_map(|j| j.groups.iter().map(|g| g.seq))
        .max()
        .expect("the lock has a commit of its own");
    for i in intents {
        h.engine.finish_parked(i);
    }
    h.engine.flush();
    if overwrite {
        assert_eq!(h.fs.file("a").map(|f| f.size), Some(0), "truncated");
    } else {
        assert!(h.fs.file("a").is_none() && h.fs.file("x").is_some());
    }
    let abandoned = h.engine.abandoned_by(&[lock], lock);
    assert!(
        h.engine.abandons_completion(&abandoned),
        "the completion builds on the lock"
    );
    h.engine
        .roll_back(&[lock], lock, ErrorCode::DiskFull, "test");
}

#[test]
#[should_panic(expected = "stopped for recovery")]
fn a_rename_whose_completion_built_on_a_failed_commit_stops() {
    a_completion_built_on_a_failed_commit(false);
}

#[test]
#[should_panic(expected = "stopped for recovery")]
fn an_overwrite_whose_completion_built_on_a_failed_commit_stops() {
    a_completion_built_on_a_failed_commit(true);
}

/// A persistent overwrite waiting for its intent, granted a lease, the
/// lease broken by another client's open, its frontend's connection
/// dropped: neither the grant, the break nor the detach writes the
/// handle's record (the completion writes it, with the truncate), each of
/// which did before. Killed after the intent's
/// commit, before the truncate, and the file written by a local process
/// meanwhile: recovery cannot tell whether the truncate happened and drops
/// the open — and any record of its handle with it. Old code wrote the
/// record at the detach and recovery kept it: the handle came back
/// claiming `Overwritten`, and the client's re-sent create got that though
/// the file was never truncated (exactly once broken).
#[test]
fn a_dropped_overwrite_leaves_no_handle_claiming_it() {
    let mut h = Harness::new();
    let bobs = bobs_handle(&mut h, false);
    let Request::Open(mut o) = with_disposition(open("a", Rights::ALL), Disposition::Overwrite)
    else {
        unreachable!("open() makes an open")
    };
    o.lease = Some(LeaseRequest {
        key: libfilter::lease::LeaseKey(uuid::Uuid::new_v4()),
        state: libfilter::lease::LeaseState::parse("RWH").unwrap(),
        epoch: 0,
    });
    let create = Request::Open(o);
    let id = h.run(create.clone());
    assert!(h
        .engine
        .handles
        .values()
        .filter(|h| h.parked)
        .all(|h| h.rec.lease.is_some()));
    // Another client's lock breaks the lease (its epoch goes up).
    h.run(lock_byte_8(bobs, false));
    assert!(h.engine.breaking.len() == 1);
    let conn = h.conn;
    h.engine.begin_request();
    h.engine.on_closed(conn);
    let intents = h.commit_holding_intents(true);
    assert_eq!(intents.len(), 1, "the intent is durable");
    assert!(h.reply(id).is_none());
    assert!(
        h.store.inner.lock().unwrap().handles.is_empty(),
        "no record before the completion"
    );
    // As a build whose detach wrote it left the store: recovery drops the
    // record with the open.
    let rec = h
        .engine
        .handles
        .values()
        .find(|h| h.parked)
        .map(|h| h.rec.clone())
        .expect("the waiting open's handle");
    h.store.inner.lock().unwrap().handles.insert(rec.key, rec);
    // kill -9 at intent.after_commit; a local process writes the file.
    h.fs.write("a", 20);
    let mut h = h.restarted();
    assert!(h.store.inner.lock().unwrap().intents.is_empty());
    assert!(
        h.store.inner.lock().unwrap().handles.is_empty(),
        "the dropped open's record is gone"
    );
    assert!(
        h.engine.handles.is_empty(),
        "no handle claims the overwrite"
    );
    // The re-sent create runs anew: it truncates before it says so.
    let id = h.run(create);
    assert!(h.reply(id).is_none(), "not a replay of the dropped open");
    h.commit(true);
    h.opened(id);
    assert_eq!(h.fs.file("a").map(|f| f.size), Some(0));
}

/// Review (session 29): a persistent overwrite whose open waits for its
/// intent, its frontend gone meanwhile, is not resumed until its open is
/// done (Retry, as a replayed create gets): resumed, its reply went out
/// before the truncate it reports and its record reached the store before
/// its completion.
#[test]
fn a_waiting_overwrite_is_not_resumed_until_its_open_is_done() {
    let mut h = Harness::new();
    let id = h.run(with_disposition(
        open("a", Rights::ALL),
        Disposition::Overwrite,
    ));
    assert!(h.reply(id).is_none(), "waits for its intent");
    let key = *h.engine.handles.keys().next().expect("its handle");
    assert!(h.engine.handles[&key].parked);
    h.reattach();
    let resume = Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new("alice").unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key },
        owner: None,
        matching: None,
        if_last_held: false,
    });
    let r = h.run(resume.clone());
    // The intent commits (the refusal, which waited for it, goes out);
    // the file is not truncated yet.
    let intents = h.commit_holding_intents(true);
    // Retry, as a frontend that did not ask for its code reads it.
    assert_eq!(h.refused(r), ErrorCode::FileNotAvailable);
    assert!(h.store.inner.lock().unwrap().handles.is_empty());
    assert_eq!(h.fs.file("a").map(|f| f.size), Some(10));
    // Truncated, the completion committed: resumed then.
    for i in intents {
        h.engine.finish_parked(i);
    }
    h.commit(true);
    assert_eq!(h.fs.file("a").map(|f| f.size), Some(0));
    let r = h.run(resume);
    h.commit(true);
    assert_eq!(h.opened(r), key);
}

/// Review (session 29): a durable (not persistent) handle's resume waits
/// for another handle's pending commit of its file; that commit fails.
/// The resume is refused and its handle disconnected again, kept — before,
/// every Opened reply filed a drop of its handle, and the durable handle
/// was deleted (its file unlinked, had its open created it).
#[test]
fn a_durable_resume_whose_dependency_fails_keeps_the_handle() {
    let mut h = Harness::new();
    let (d, was, r) = resume_carol_behind_a_pending_lock(&mut h, None);
    h.commit(false);
    assert_eq!(h.refused(r), ErrorCode::DiskFull);
    let back = &h.engine.handles[&d];
    assert_eq!(
        (back.conn, back.rec.conn),
        (None, was),
        "kept, disconnected"
    );
    assert!(h.fs.file("a").is_some());
}

/// Review (session 29): a client holds lease key L on `a` and opens `a`
/// again, a persistent overwrite under L, which waits for its intent;
/// another client's open breaks L — held for the waiting open's reply.
/// The truncate then fails and that handle goes without a reply: the
/// break reaches the client through its other handle. Before, it was
/// dropped with the handle while the break stayed in progress.
#[test]
fn a_break_held_for_an_open_that_fails_goes_to_the_leases_other_holder() {
    let mut h = Harness::new();
    let bob = bobs_handle(&mut h, false);
    let (lk, _, second) = leased_then_a_waiting_overwrite(&mut h);
    h.run(lock_byte_8(bob, false));
    assert!(
        !h.events
            .iter()
            .any(|e| matches!(e, Event::LeaseBreak { .. })),
        "held for the waiting open's reply"
    );
    h.fs.fail_next("truncate", libc::EIO);
    h.commit(true);
    assert!(h.refused(second) != ErrorCode::DiskFull);
    assert!(
        h.events
            .iter()
            .any(|e| matches!(e, Event::LeaseBreak { lease_key, .. } if *lease_key == lk)),
        "{:?}",
        h.events
    );
}

/// A durable handle with a lease is resumed while another handle's commit
/// of its file is pending; a conflicting open breaks the lease, the break
/// waiting behind the resume's reply. That commit fails: the resume is
/// refused and the handle disconnected again — and the break, dropped
/// with the commit, is no longer in progress: the conflicting open runs
/// again and goes through. Before, it waited the whole break timeout.
#[test]
fn a_break_behind_a_failed_resume_does_not_hold_the_breaking_open() {
    use libfilter::lease::{LeaseKey, LeaseState};
    let mut h = Harness::new();
    let lease = LeaseRequest {
        key: LeaseKey(uuid::Uuid::new_v4()),
        state: LeaseState::parse("RWH").unwrap(),
        epoch: 0,
    };
    let (_, _, r) = resume_carol_behind_a_pending_lock(&mut h, Some(lease));
    let bob = h.run(bobs(
        "a",
        Rights::READ.union(Rights::WRITE),
        Disposition::Open,
    ));
    assert!(h.reply(bob).is_none(), "waits for the break");
    h.commit(false);
    assert_eq!(h.refused(r), ErrorCode::DiskFull);
    h.engine.process_retries();
    h.commit(true);
    assert!(h.reply(bob).is_some(), "bob's open went on");
}

/// Alice's persistent handle of `a` and carol's durable one (with
/// `lease`), detached; alice's lock is left pending and carol's resume,
/// which shows the file, waits for it: carol's handle, its connection
/// state before, and the resume's request id.
fn resume_carol_behind_a_pending_lock(
    h: &mut Harness,
    lease: Option<LeaseRequest>,
) -> (ResumeKey, ConnState, u64) {
    let p = h.run(open("a", Rights::ALL));
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.client = ClientId::new("carol").unwrap();
    o.durability = Durability::Durable { timeout_ms: 60_000 };
    o.create_guid = None;
    o.lease = lease;
    let d = h.run(Request::Open(o));
    h.commit(true);
    let (p, d) = (h.opened(p), h.opened(d));
    h.run(Request::Detach {
        key: d,
        delete_on_close: None,
    });
    h.commit(true);
    let was = h.engine.handles[&d].rec.conn;
    h.run(lock_byte_8(p, false));
    let r = h.run(Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new("carol").unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key: d },
        owner: None,
        matching: None,
        if_last_held: false,
    }));
    assert!(h.reply(r).is_none(), "waits for the lock's commit");
    (d, was, r)
}

/// Review (session 29): as above, but the waiting open's frontend
/// connection went while it waited and the client resumed its other
/// handle: the waiting open succeeds, detached — the break held for its
/// reply reaches the client through the resumed handle. Before, with no
/// connection to send it on, it was dropped while the break stayed in
/// progress.
#[test]
fn a_break_held_for_a_detached_waiting_open_goes_to_the_leases_other_holder() {
    let mut h = Harness::new();
    let bob = bobs_handle(&mut h, true);
    let (lk, first, _) = leased_then_a_waiting_overwrite(&mut h);
    h.reattach();
    let resumed = h.run(resume_of("bob", bob, false));
    let r = h.run(Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new("alice").unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key: first },
        owner: None,
        matching: None,
        if_last_held: false,
    }));
    let intents = h.commit_holding_intents(true);
    assert_eq!(h.opened(r), first);
    assert_eq!(h.opened(resumed), bob);
    h.run(lock_byte_8(bob, false));
    let breaks = |h: &Harness| {
        h.events
            .iter()
            .filter(|e| matches!(e, Event::LeaseBreak { lease_key, .. } if *lease_key == lk))
            .count()
    };
    assert_eq!(breaks(&h), 0, "held for the waiting open's reply");
    for i in intents {
        h.engine.finish_parked(i);
    }
    h.commit(true);
    assert_eq!(breaks(&h), 1, "{:?}", h.events);
}

/// Review (session 29), since re-review rr45c N1: of two overwrites
/// under one lease key (no other holder), the second waits for the
/// first's truncation (no longer for an intent of its own beside it); a
/// break of the lease held for the first's reply goes with the first's
/// handle when its truncate fails, and the second then runs and is
/// answered, no break sent at all. (Before, both parked, the break was
/// passed on to the second, held for its reply in turn.) And a waiting
/// open's break whose intent commit fails goes with it, not also passed
/// on by the rollback.
#[test]
fn a_second_overwrite_under_a_lease_key_waits_for_the_first() {
    use libfilter::lease::{LeaseKey, LeaseState};
    let mut h = Harness::new();
    let lk = LeaseKey(uuid::Uuid::new_v4());
    let overwrite = || {
        let Request::Open(mut o) = with_disposition(open("a", Rights::ALL), Disposition::Overwrite)
        else {
            unreachable!("an open")
        };
        o.lease = Some(LeaseRequest {
            key: lk,
            state: LeaseState::parse("RWH").unwrap(),
            epoch: 0,
        });
        Request::Open(o)
    };
    let bob = bobs_handle(&mut h, false);
    let first = h.run(overwrite());
    let second = h.run(overwrite());
    h.run(lock_byte_8(bob, false));
    assert!(h.reply(second).is_none());
    h.fs.fail_next("truncate", libc::EIO);
    h.commit(true);
    assert!(h.reply(first).is_some_and(Result::is_err));
    h.engine.process_retries();
    h.commit(true);
    let granted = h.arrived.iter().position(|a| *a == Arrived::Reply(second));
    let broken = h.arrived.iter().position(|a| {
        matches!(a, Arrived::Event(i) if matches!(h.events.get(*i), Some(Event::LeaseBreak { .. })))
    });
    assert!(granted.is_some(), "{:?}", h.arrived);
    // No break at all: the one held went with the first handle, settled
    // (no holder left to tell), and the second's lease, granted after the
    // lock, meets nothing. Had the second parked beside the first instead
    // of waiting, the held break would have been passed to it and sent
    // behind its reply.
    assert!(broken.is_none(), "a break was sent: {:?}", h.arrived);
    assert!(h.engine.breaking.is_empty(), "a break left in progress");
}

/// See above: the rollback of a waiting open (the truncation's) that
/// holds a break of its lease, by a lock of a handle opened before it
/// (an open would wait for the truncation and break nothing). The lock,
/// built on the intent, is refused with it, and the break held goes with
/// the open: none is sent (passed on to the lease's other holder, it
/// went out though nothing was breaking). The lock asked again breaks
/// the lease once.
#[test]
fn a_break_held_for_a_waiting_open_whose_intent_fails_is_sent_once() {
    let mut h = Harness::new();
    let bob = bobs_handle(&mut h, false);
    let (lk, _, _) = leased_then_a_waiting_overwrite(&mut h);
    let lock = h.run(lock_byte_8(bob, false));
    // The last request shows nothing pending (a break the rollback passed
    // on would go out at once).
    h.run(Request::Stats);
    h.commit(false);
    assert_eq!(h.refused(lock), ErrorCode::DiskFull);
    let breaks = |h: &Harness| {
        h.events
            .iter()
            .filter(|e| matches!(e, Event::LeaseBreak { lease_key, .. } if *lease_key == lk))
            .count()
    };
    assert_eq!(breaks(&h), 0, "{:?}", h.events);
    h.engine.process_retries();
    h.run(lock_byte_8(bob, false));
    h.run(Request::Stats);
    h.commit(true);
    assert_eq!(breaks(&h), 1, "{:?}", h.events);
}

/// Open request `r` asking for an RWH lease under `lk`.
fn with_rwh_lease(r: Request, lk: libfilter::lease::LeaseKey) -> Request {
    let Request::Open(mut o) = r else {
        unreachable!("an open")
    };
    o.lease = Some(LeaseRequest {
        key: lk,
        state: libfilter::lease::LeaseState::parse("RWH").unwrap(),
        epoch: 0,
    });
    Request::Open(o)
}

/// Bob's open of `a` for reading and writing, with no lease, persistent
/// or not: a lock of it breaks the read caching of leases granted after
/// it, also one whose open waits for its truncation's intent, when an
/// open of the file would wait for that truncation instead (re-review
/// rr45c N1). Its handle.
fn bobs_handle(h: &mut Harness, persistent: bool) -> ResumeKey {
    let Request::Open(mut o) = bobs("a", Rights::READ.union(Rights::WRITE), Disposition::Open)
    else {
        unreachable!("bobs() makes an open")
    };
    if persistent {
        o.durability = Durability::Persistent { timeout_ms: 60_000 };
        o.create_guid = Some(CreateGuid(uuid::Uuid::new_v4()));
    }
    let bob = h.run(Request::Open(o));
    h.commit(true);
    h.opened(bob)
}

/// Alice opens `a` with an RWH lease, then opens it again, a persistent
/// overwrite under the same lease key, which waits for its intent: the
/// key, the first handle, and the second open's request id.
fn leased_then_a_waiting_overwrite(
    h: &mut Harness,
) -> (libfilter::lease::LeaseKey, ResumeKey, u64) {
    let lk = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let first = h.run(with_rwh_lease(open("a", Rights::ALL), lk));
    h.commit(true);
    let first = h.opened(first);
    let second = h.run(with_rwh_lease(
        with_disposition(open("a", Rights::ALL), Disposition::Overwrite),
        lk,
    ));
    assert!(h.reply(second).is_none(), "waits for its intent");
    (lk, first, second)
}

/// A request the engine runs right after rolling back a failed commit,
/// before the committer has settled it, shows the rolled-back state: its
/// reply is not failed as if it depended on the abandoned commit (a
/// directory rename right after a failed close got "a commit it depends
/// on failed", 3 in 30 runs of foundation.rs'
/// `a_failed_close_keeps_a_handle_seen_below_through_its_link`).
#[test]
fn a_request_right_after_a_rollback_is_not_failed_with_it() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    let close = h.run(Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    let through = h.roll_back_flushed();
    // The committer has not settled the failure yet.
    let status = h.run(Request::Status);
    h.settle_failure(through);
    assert_eq!(h.refused(close), ErrorCode::DiskFull);
    assert!(
        matches!(h.reply(status), Some(Ok(_))),
        "{:?}",
        h.reply(status)
    );
}

/// A recorded remove of `path` (so bracketed by an intent).
fn removing(path: &str) -> Request {
    Request::Remove {
        path: RelPath::new(path).unwrap(),
        record: Some(RecordSpec {
            scope: session(1),
            op_id: 1,
            reply: "ok".into(),
            keep: 8,
        }),
    }
}

/// Opens `a` persistently and asks to rename it to `to`: the handle and
/// the rename's request id.
fn renaming_a_to(h: &mut Harness, to: &str, replace: bool) -> (ResumeKey, u64) {
    let a = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(a);
    let id = h.run(Request::Rename {
        key,
        to: RelPath::new(to).unwrap(),
        replace,
        record: None,
    });
    (key, id)
}

/// Commits the intents waiting, then makes their changes with the next
/// `dir_of` failing with `errno` (EMFILE: filterd at its descriptor
/// limit; EACCES: a directory an unprivileged filterd may write but not
/// read) and commits: what the filesystem saw meanwhile.
fn finish_intents_with_dir_of_failing(h: &mut Harness, errno: i32) -> Vec<Logged> {
    let ids = h.commit_holding_intents(true);
    h.fs.take_log();
    h.fs.fail_next("dir_of", errno);
    for i in ids {
        h.engine.finish_parked(i);
    }
    h.commit(true);
    h.fs.take_log()
}

/// Whether `log` shows the filesystem synced after `change` and before
/// the first commit after it.
fn synced_whole_between(log: &[Logged], change: impl Fn(&Logged) -> bool) -> bool {
    let Some(c) = log.iter().position(change) else {
        return false;
    };
    let commit = log[c..]
        .iter()
        .position(|l| matches!(l, Logged::Commit(_)))
        .map_or(log.len(), |i| c + i);
    log[c..commit].contains(&Logged::Syncfs)
}

/// An open sharing nothing from another client, of `path`.
fn bobs_open(path: &str, no_wait: bool) -> Request {
    let Request::Open(mut o) = open(path, Rights::NONE) else {
        unreachable!()
    };
    o.client = ClientId::new("bob").unwrap();
    o.no_wait = no_wait;
    Request::Open(o)
}

/// Commits change `change` (a remove or rename with replace parked for
/// its intent) with open `open` of `path` waiting for it, then runs what
/// waited (as the engine's loop does): the change is made, and the open
/// (Busy, asked not to wait) granted no file `path` no longer names.
fn change_made_then_open_answered(
    h: &mut Harness,
    change: u64,
    open: u64,
    path: &str,
    no_wait: bool,
) {
    h.commit(true);
    h.engine.process_retries();
    h.commit(true);
    assert!(
        matches!(h.reply(change), Some(Ok(_))),
        "{:?}",
        h.reply(change)
    );
    if no_wait {
        assert_eq!(h.refused(open), ErrorCode::Busy);
    }
    let kept = match h.reply(open) {
        Some(Ok(libfilter::proto::Reply::Opened(o))) => {
            h.fs.file(path).map(|f| f.ino) == Some(o.file.ino)
        }
        Some(Err(_)) => true,
        other => panic!("open {open} was not answered: {other:?}"),
    };
    assert!(
        kept,
        "the open's file was taken from under it: {:?}",
        h.reply(open)
    );
}

/// Review r1: an open of the target of a rename with replace whose
/// intent is committing waits for that rename (or is told Busy, asked not
/// to wait): granted at once — by creating the target, or opening the
/// file there — it lost its file to the rename once the intent was
/// durable (the client told it created, its data gone).
#[test]
fn an_open_of_a_pending_rename_target_waits_for_the_rename() {
    for (target_exists, no_wait) in [(true, false), (false, false), (true, true), (false, true)] {
        let mut h = Harness::new();
        if target_exists {
            h.fs.put("g", 5);
        }
        let (_, ren) = renaming_a_to(&mut h, "g", true);
        assert!(h.reply(ren).is_none(), "parked for its intent");
        let b = h.run(bobs_open("g", no_wait));
        if !target_exists {
            assert!(
                h.fs.file("g").is_none(),
                "a create that waits made its file"
            );
        }
        change_made_then_open_answered(&mut h, ren, b, "g", no_wait);
    }
}

/// Review r1: an open of a file whose remove is committing waits for the
/// remove (Busy, asked not to wait): granted at once, its file was
/// unlinked under it once the intent was durable.
#[test]
fn an_open_of_a_file_whose_remove_is_committing_waits_for_it() {
    for no_wait in [false, true] {
        let mut h = Harness::new();
        h.fs.put("r", 5);
        let rm = h.run(removing("r"));
        assert!(h.reply(rm).is_none(), "parked for its intent");
        let b = h.run(bobs_open("r", no_wait));
        change_made_then_open_answered(&mut h, rm, b, "r", no_wait);
        if !no_wait {
            // Run again after the remove: it created the file anew.
            assert!(h.fs.file("r").is_some(), "{:?}", h.reply(b));
        }
    }
}

/// Review r1 b2: a durable rename whose directory cannot be opened to be
/// synced (EMFILE: filterd at its descriptor limit; EACCES: an
/// unprivileged filterd in a directory it may write but not read) is
/// made, and the whole filesystem synced before its completion commits.
/// Refused (2ef4b32), every rename in a write-only directory failed;
/// skipped (before review r1), it committed with nothing synced.
#[test]
fn a_rename_whose_directory_cannot_be_opened_is_made_its_filesystem_synced() {
    for errno in [libc::EMFILE, libc::EACCES] {
        let mut h = Harness::new();
        let (key, id) = renaming_a_to(&mut h, "x", false);
        let log = finish_intents_with_dir_of_failing(&mut h, errno);
        assert!(
            matches!(h.reply(id), Some(Ok(_))),
            "answered {:?} with {log:?}",
            h.reply(id)
        );
        assert!(
            synced_whole_between(&log, |l| matches!(l, Logged::Rename(..))),
            "{log:?}"
        );
        assert!(h.fs.file("a").is_none() && h.fs.file("x").is_some());
        assert_eq!(h.engine.handles[&key].rec.path.as_str(), "x");
        assert!(h.store.inner.lock().unwrap().intents.is_empty());
    }
}

/// The same for a durable remove: made, the filesystem synced.
#[test]
fn a_remove_whose_directory_cannot_be_opened_is_made_its_filesystem_synced() {
    for errno in [libc::EMFILE, libc::EACCES] {
        let mut h = Harness::new();
        h.fs.put("r", 5);
        let rm = h.run(removing("r"));
        let log = finish_intents_with_dir_of_failing(&mut h, errno);
        assert!(matches!(h.reply(rm), Some(Ok(_))), "{log:?}");
        assert!(
            synced_whole_between(&log, |l| matches!(l, Logged::Remove(_))),
            "{log:?}"
        );
        assert!(h.fs.file("r").is_none());
    }
}

/// A persistent create whose directory cannot be opened to be synced is
/// made, the filesystem synced before the handle's commit; refused only
/// when that syncfs fails (the commit fails whole, as for a failed
/// fsync), its file unlinked again.
#[test]
fn a_persistent_create_whose_directory_cannot_be_opened_syncs_its_filesystem() {
    for syncfs_fails in [false, true] {
        let mut h = Harness::new();
        h.fs.fail_next("dir_of", libc::EACCES);
        if syncfs_fails {
            h.fs.fail_next("syncfs", libc::EIO);
        }
        h.fs.take_log();
        let id = h.run(open("n", Rights::ALL));
        h.commit(true);
        let log = h.fs.take_log();
        if syncfs_fails {
            assert!(matches!(h.reply(id), Some(Err(_))), "{:?}", h.reply(id));
            assert!(h.engine.handles.is_empty());
            assert!(h.store.inner.lock().unwrap().handles.is_empty());
            assert!(h.fs.file("n").is_none(), "the refused create's file stays");
        } else {
            let key = h.opened(id);
            assert!(
                synced_whole_between(&log, |l| matches!(l, Logged::Create(_))),
                "{log:?}"
            );
            assert!(h.store.inner.lock().unwrap().handles.contains_key(&key));
            assert!(h.fs.file("n").is_some());
        }
    }
}

/// Review l2c: a failed fsync of one request's change fails that
/// request's group only. Two persistent creates in one round (in two
/// directories); the first one's fsync fails: the commit fails its group
/// alone (what `CommitFailed` names), its file is unlinked again, and
/// the other create commits and is answered.
#[test]
fn a_failed_fsync_fails_only_the_request_whose_change_it_syncs() {
    let mut h = Harness::new();
    h.fs.take_log();
    h.fs.fail_next("fsync", libc::EIO);
    let first = h.run(open("n", Rights::ALL));
    let second = h.run(open("d/m", Rights::ALL));
    h.commit(true);
    assert_eq!(h.last_failed.len(), 1, "{:?}", h.last_failed);
    assert!(
        matches!(h.reply(first), Some(Err(_))),
        "{:?}",
        h.reply(first)
    );
    assert!(h.fs.file("n").is_none(), "the refused create's file stays");
    let key = h.opened(second);
    assert!(h.store.inner.lock().unwrap().handles.contains_key(&key));
    assert!(h.fs.file("d/m").is_some());
}

/// Review r1 b2: a delete on close whose directory cannot be opened for
/// fsync unlinks the file (the filesystem synced). Refused (2ef4b32),
/// the unlink was never made, yet its intent was deleted: the file stayed
/// for good, and the CLOSE got an error for a handle already gone.
#[test]
fn a_delete_on_close_whose_directory_cannot_be_opened_unlinks_its_file() {
    let mut h = Harness::new();
    let old = h.fs.file("c").map(|f| (f.ino, f.gen));
    let (kc, close, _second) = closing_with_delete_on_close_then_opened(&mut h);
    let log = finish_intents_with_dir_of_failing(&mut h, libc::EMFILE);
    assert!(
        matches!(h.reply(close), Some(Ok(_))),
        "{:?} {log:?}",
        h.reply(close)
    );
    assert!(!h.engine.handles.contains_key(&kc));
    assert!(!h.store.inner.lock().unwrap().handles.contains_key(&kc));
    assert!(
        synced_whole_between(&log, |l| matches!(l, Logged::Remove(_))),
        "{log:?}"
    );
    h.engine.process_retries();
    h.commit(true);
    let (fs, st) = (h.fs.clone(), h.store.clone());
    let gone = |fs: &MemFs| fs.file("c").map(|f| (f.ino, f.gen)) != old;
    assert!(gone(&fs), "the file deleted on close is still there");
    drop(h);
    let _e = recovered(&fs, &st);
    assert!(gone(&fs), "the file deleted on close is still there");
}

/// A delete on close whose unlink fails (EIO) answers its CLOSE done: the
/// handle is gone, its deletion committed, and a failed CLOSE made the
/// frontends keep the open, served with no handle behind it (review g5).
/// The file stays (logged); no intent is kept — recovery then passed the
/// delete to a later client's handle (review g4).
#[test]
fn a_delete_on_close_whose_unlink_fails_answers_its_close_done() {
    let mut h = Harness::new();
    let (kc, close) = closing_with_delete_on_close(&mut h);
    let ids = h.commit_holding_intents(true);
    h.fs.fail_next("remove", libc::EIO);
    for i in ids {
        h.engine.finish_parked(i);
    }
    h.commit(true);
    assert!(
        matches!(h.reply(close), Some(Ok(_))),
        "{:?}",
        h.reply(close)
    );
    assert!(!h.engine.handles.contains_key(&kc));
    assert!(h.fs.file("c").is_some());
    assert!(h.store.inner.lock().unwrap().intents.is_empty());
}

/// Recovery that finished an interrupted rename but cannot open its
/// directory to sync it (EMFILE, or EACCES: a directory an unprivileged
/// filterd may write but not read) syncs the whole filesystem; it fails
/// (the intent stays for the next start) only when that syncfs fails.
/// Failing on EACCES (2ef4b32), filterd never came up.
#[test]
fn recovery_syncs_the_filesystem_when_a_finished_rename_s_directory_cannot_be_opened() {
    for errno in [libc::EMFILE, libc::EACCES] {
        let h = Harness::new();
        let (fs, store) = (h.fs.clone(), h.store.clone());
        let ra = persistent_record(&fs, "a");
        let intent = Intent {
            id: IntentId(uuid::Uuid::new_v4()),
            change: IntentChange::Rename {
                key: ra.key,
                from: ra.path.clone(),
                to: RelPath::new("x").unwrap(),
                file: ra.file,
                replace: false,
                record: None,
                kernel_handle: ra.kernel_handle.clone(),
            },
            recorded_ms: 0,
        };
        fs.rename(&ra.path, &RelPath::new("x").unwrap(), ra.file, None, false)
            .unwrap();
        store
            .commit(&[&[
                StoreOp::PutHandle(Box::new(ra.clone())),
                StoreOp::PutIntent(Box::new(intent)),
            ]])
            .unwrap();
        fs.fail_next("dir_of", errno);
        fs.fail_next("syncfs", libc::EIO);
        assert!(try_recovered(&fs, &store).is_err());
        assert_eq!(store.inner.lock().unwrap().intents.len(), 1);
        fs.take_log();
        fs.fail_next("dir_of", errno);
        recovered(&fs, &store);
        assert!(store.inner.lock().unwrap().intents.is_empty());
        assert!(fs.take_log().contains(&Logged::Syncfs));
    }
}

/// Review r1: a REMOVE's intent names its file by number and kernel
/// handle from one look at one file. Two looks (the number, then the
/// handle) paired one file's number with another's handle when a local
/// process replaced the name between them.
#[test]
fn a_remove_s_intent_names_one_file_by_number_and_handle() {
    let mut h = Harness::new();
    h.fs.put("r", 5);
    for op in ["file_at_checked", "identity_at"] {
        h.fs.replace_before(op, "r");
    }
    h.run(removing("r"));
    h.commit_holding_intents(true);
    let intents = h.store.inner.lock().unwrap().intents.clone();
    let Some(IntentChange::Remove {
        file,
        kernel_handle: Some(kh),
        ..
    }) = intents.values().next().map(|i| i.change.clone())
    else {
        panic!("no remove intent with a kernel handle: {intents:?}")
    };
    let ino = kh
        .bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    assert_eq!(ino, Some(file.ino), "the handle is another file's");
}

/// Review: a persistent close whose commit fails is refused and its handle
/// put back, but `stats.closes` kept counting it. It is taken back with
/// the handle; the close that then commits counts once.
#[test]
fn a_close_whose_commit_fails_is_not_counted() {
    let mut h = Harness::new();
    let opened = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(opened);
    let close = |h: &mut Harness| {
        h.run(Request::Close {
            key,
            put: vec![],
            delete: vec![],
            delete_on_close: None,
        })
    };
    let failed = close(&mut h);
    h.commit(false);
    h.refused(failed);
    assert!(h.keys().contains(&key), "the handle is back");
    assert_eq!(h.engine.stats.closes, 0, "a refused close counted");
    let closed = close(&mut h);
    h.commit(true);
    h.answered(closed);
    assert_eq!(h.engine.stats.closes, 1);
}

/// A reply recorded for replay whose commit fails is refused, and no
/// longer counted in `stats.replies_recorded`.
#[test]
fn a_reply_recorded_whose_commit_fails_is_not_counted() {
    let mut h = Harness::new();
    let record = |h: &mut Harness, op_id| {
        h.run(Request::RecordReply {
            scope: session(1),
            op_id,
            reply: format!("reply {op_id}"),
            keep: 3,
        })
    };
    let failed = record(&mut h, 1);
    h.commit(false);
    h.refused(failed);
    assert_eq!(h.engine.stats.replies_recorded, 0);
    let recorded = record(&mut h, 2);
    h.commit(true);
    h.answered(recorded);
    assert_eq!(h.engine.stats.replies_recorded, 1);
}

/// The records memory evicts past a scope's `keep` are the oldest
/// recorded, whatever their op ids (review rvspec), and the ones the
/// store drops, named by op id (`ReplayTrim::Evicted`), never by having
/// the store count the scope (review rvcx: counting walked a full
/// scope's 4096 keys on the committer thread per put). Also with op ids
/// out of order, a record put again, through `WriteRecords`, after a
/// restart and over a scope stored with a larger `keep` (an older
/// daemon's, or an earlier request's): memory and store hold the same
/// records.
#[test]
fn replay_records_memory_evicts_are_the_ones_the_store_drops() {
    let mut h = Harness::new();
    let mine = ReplayScope::Session(ScopeName::new("smb/s1").unwrap());
    let record = |h: &mut Harness, op_id: u64, keep: u32| {
        let id = h.run(Request::RecordReply {
            scope: session(1),
            op_id,
            reply: format!("reply {op_id}"),
            keep,
        });
        h.commit(true);
        h.answered(id);
    };
    let agree = |h: &Harness, want: &[u64]| {
        let stored: Vec<u64> = h
            .store
            .scope_records(&mine)
            .unwrap()
            .into_iter()
            .map(|(op, _)| op)
            .collect();
        let held: Vec<u64> = h.engine.replays[&mine].keys().copied().collect();
        assert_eq!(held, want, "memory");
        assert_eq!(stored, want, "store");
        assert_eq!(
            h.store.inner.lock().unwrap().counted_scopes,
            0,
            "a put had the store count its scope"
        );
    };
    for op_id in 1..=8 {
        record(&mut h, op_id, 8);
    }
    agree(&h, &[1, 2, 3, 4, 5, 6, 7, 8]);
    // A smaller keep: four go at once.
    record(&mut h, 9, 5);
    agree(&h, &[5, 6, 7, 8, 9]);
    // An op id below the scope's (a client's choice; nfsshim's `excl`
    // uses path hashes): recorded last, it stays, and the oldest
    // recorded goes. Review rvspec: the lowest op id went, so this one
    // went in its own commit and a replay of it ran again.
    record(&mut h, 2, 5);
    agree(&h, &[2, 6, 7, 8, 9]);
    record(&mut h, 7_000, 5);
    agree(&h, &[2, 7, 8, 9, 7_000]);
    // Recorded again, a record moves to the newest: 8 goes, not 7.
    record(&mut h, 7, 5);
    record(&mut h, 3, 5);
    agree(&h, &[2, 3, 7, 9, 7_000]);
    // `WriteRecords`: deletes, then puts, each evicting the oldest.
    let spec = |op_id: u64| RecordSpec {
        scope: session(1),
        op_id,
        reply: "w".into(),
        keep: 4,
    };
    let id = h.run(Request::WriteRecords {
        put: vec![spec(10), spec(11)],
        delete: vec![(session(1), 9)],
    });
    h.commit(true);
    h.answered(id);
    agree(&h, &[3, 7, 10, 11]);
    // A restart loads what the store holds, in the order it was
    // recorded: a low op id recorded after it still evicts the oldest
    // (7, recorded again before 3), not itself.
    for op_id in 20..=27 {
        record(&mut h, op_id, 12);
    }
    agree(&h, &[3, 7, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27]);
    let mut h = h.restarted();
    agree(&h, &[3, 7, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27]);
    record(&mut h, 1, 12);
    agree(&h, &[1, 3, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27]);
    // A larger keep stored before is trimmed by the next put with a
    // smaller one.
    record(&mut h, 28, 3);
    agree(&h, &[1, 27, 28]);
}

/// A record lookup counts as a replay only for a frontend that does not
/// report its replays itself (`FEATURE_REPLAY_REPORTS`, which nfsshim
/// asks for); one that does is counted by its `ReplaysAnswered`. Review:
/// every nfsshim attach counted one (its registry lookup), its re-sends
/// answered from its slot cache none.
#[test]
fn a_lookup_counts_as_a_replay_only_without_replay_reports() {
    let mut h = Harness::new();
    let recorded = h.run(Request::RecordReply {
        scope: session(1),
        op_id: 1,
        reply: "r".into(),
        keep: 3,
    });
    h.commit(true);
    h.answered(recorded);
    let lookup = |h: &mut Harness| {
        let id = h.run(Request::LookupReply {
            scope: session(1),
            op_id: 1,
        });
        assert!(h.reply(id).is_some_and(|r| r.is_ok()), "found");
    };
    lookup(&mut h);
    assert_eq!(h.engine.stats.replays_detected, 1, "counted, as before");
    if let Some(c) = h.engine.conns.get_mut(&h.conn) {
        c.features = libfilter::proto::FEATURE_REPLAY_REPORTS;
    }
    lookup(&mut h);
    assert_eq!(h.engine.stats.replays_detected, 1, "the frontend counts");
    let id = h.run(Request::ReplaysAnswered { count: 2 });
    assert!(h.reply(id).is_none(), "never answered");
    assert_eq!(h.engine.stats.replays_detected, 3);
}

/// Review: `ReplaysAnswered` was taken from any frontend, with or without
/// `FEATURE_REPLAY_REPORTS` (whose lookups are counted already: twice),
/// and with any count (`u64::MAX` pinned `replays_detected` there). It is
/// refused, answered with the error, and counts nothing unless granted
/// the bit and from 1 to `MAX_REPLAYS_ANSWERED`.
#[test]
fn replays_answered_needs_the_bit_and_a_sane_count() {
    use libfilter::proto::{FEATURE_REPLAY_REPORTS, MAX_REPLAYS_ANSWERED};
    let mut h = Harness::new();
    let refused = |h: &mut Harness, count: u64, code: ErrorCode| {
        let id = h.run(Request::ReplaysAnswered { count });
        assert!(
            matches!(h.reply(id), Some(Err(e)) if e.code == code),
            "count {count} refused with {code:?}"
        );
        assert_eq!(h.engine.stats.replays_detected, 0, "nothing counted");
    };
    refused(&mut h, 1, ErrorCode::NotPermitted);
    if let Some(c) = h.engine.conns.get_mut(&h.conn) {
        c.features = FEATURE_REPLAY_REPORTS;
    }
    refused(&mut h, 0, ErrorCode::BadFrame);
    refused(&mut h, MAX_REPLAYS_ANSWERED + 1, ErrorCode::BadFrame);
    refused(&mut h, u64::MAX, ErrorCode::BadFrame);
    let id = h.run(Request::ReplaysAnswered {
        count: MAX_REPLAYS_ANSWERED,
    });
    assert!(h.reply(id).is_none(), "never answered");
    assert_eq!(h.engine.stats.replays_detected, MAX_REPLAYS_ANSWERED);
}

/// Review: an expiry whose commit fails puts the handle back and is tried
/// again later, but `stats.expiries` kept the failed one: it counted
/// twice. It is taken back with the handle.
#[test]
fn an_expiry_whose_commit_fails_is_not_counted() {
    let mut h = Harness::new();
    let key = opened_and_detached(&mut h, open("a", Rights::ALL));
    h.engine.expire_due(u64::MAX);
    h.commit(false);
    assert!(h.keys().contains(&key), "the handle is back");
    assert_eq!(h.engine.stats.expiries, 0, "an expiry that failed counted");
    h.engine.expire_due(u64::MAX);
    h.commit(true);
    assert!(!h.keys().contains(&key));
    assert_eq!(h.engine.stats.expiries, 1);
}

/// Review: `stats` was answered at once, counting requests whose commit
/// was still pending (and might fail). Then it waited for them, as a
/// listing does, and a failed commit refused it (review g3). It is
/// answered at once with what is durable: a pending open is not counted,
/// neither granted nor refused, until its commit settles it.
#[test]
fn stats_count_only_what_is_durable() {
    let mut h = Harness::new();
    let stats_now = |h: &mut Harness| {
        let id = h.run(Request::Stats);
        match h.reply(id) {
            Some(Ok(libfilter::proto::Reply::Stats(s))) => s.clone(),
            other => panic!("stats not answered at once: {other:?}"),
        }
    };
    let opened = h.run(open("a", Rights::ALL));
    let s = stats_now(&mut h);
    assert_eq!((s.opens, s.opens_refused), (0, 0), "a pending open");
    h.commit(false);
    let s = stats_now(&mut h);
    assert_eq!((s.opens, s.opens_refused), (0, 1), "its commit failed");
    assert!(h.reply(opened).is_some_and(|r| r.is_err()));
    let opened = h.run(open("a", Rights::ALL));
    h.commit_holding_intents(true);
    h.answered(opened);
    // Durable and answered, not yet pruned from the pending list by the
    // engine's next flush: counted (review g4).
    let s = stats_now(&mut h);
    assert_eq!((s.opens, s.opens_refused), (1, 1), "committed");
}

/// Review (rr-watch2): a local open the engine acted for (a break RWH→RH)
/// waited for a whole Windows break chain — an overwrite meeting the lease
/// mid-break made the ack to RH start a step RH→R with a fresh break
/// timeout — past its deadline + the held grace, and was then refused by
/// the watchdog's force. An acted open begins no new wait past its
/// deadline: the engine refuses it itself when the step goes out. Before
/// its deadline (the control) it waits for the step. The deadline is an
/// hour away and moved past by the test: nothing here hangs on timing.
#[test]
fn a_held_local_open_past_its_deadline_waits_for_no_new_break_step() {
    use crate::command::{EventClaim, Verdict};
    use libfilter::lease::LeaseState;
    use std::time::{Duration, Instant};
    for late in [true, false] {
        let (mut h, k1) = a_windows_rwh_holder_of_a();
        let (_, file) = only_handle(&h);
        let claim = EventClaim::new(Instant::now() + Duration::from_secs(3600));
        let rx = local_open_claimed(&mut h, file, claim.clone());
        assert!(rx.try_recv().is_err(), "waits for the break RWH->RH");
        let overwriter = h.run(read_write_open_of_a(Disposition::Overwrite, None));
        h.commit(true);
        assert!(h.reply(overwriter).is_none());
        if late {
            // The holder acknowledges just before the break timeout, past
            // the open's deadline.
            claim.pass_deadline();
        }
        h.run(Request::LeaseBreakAck {
            lease_key: k1,
            state: LeaseState::parse("RH").unwrap(),
            client: None,
        });
        h.commit(true);
        h.engine.process_retries();
        h.drain_replies();
        assert!(!h.engine.breaking.is_empty(), "step RH->R in flight");
        if late {
            assert_eq!(rx.try_recv().ok(), Some(Verdict::Deny), "refused now");
            assert!(h.engine.waiting_local.is_empty());
            assert_eq!(h.engine.stats.local_opens_refused_after_acting, 1);
        } else {
            assert!(rx.try_recv().is_err(), "waits for the step");
            assert_eq!(h.engine.waiting_local.len(), 1);
            assert!(!claim.watchdog_refuses(), "the engine holds it");
        }
    }
}

/// Review (rr-watch2): a failed commit forgets the break a held local open
/// waited for (its persistent holder's epoch bump was in it), and the open
/// runs again and breaks anew — a fresh break timeout, past its deadline +
/// held grace. Run again past its deadline, the engine refuses it instead
/// of waiting again; before it (the control), it waits for the new break.
#[test]
fn a_held_local_open_run_again_past_its_deadline_waits_no_more() {
    use crate::command::{EventClaim, Verdict};
    use std::time::{Duration, Instant};
    for late in [true, false] {
        let mut h = Harness::new();
        let k = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
        h.run(with_rwh_lease(open("n", Rights::ALL), k));
        h.commit(true);
        h.drain_replies();
        let (_, file) = only_handle(&h);
        let claim = EventClaim::new(Instant::now() + Duration::from_secs(3600));
        let rx = local_open_claimed(&mut h, file, claim.clone());
        assert!(
            !h.engine.breaking.is_empty(),
            "the break waits for its epoch"
        );
        if late {
            claim.pass_deadline();
        }
        h.commit(false);
        let events_before = h.events.len();
        h.engine.process_retries();
        if late {
            assert_eq!(rx.try_recv().ok(), Some(Verdict::Deny), "refused now");
            assert!(h.engine.waiting_local.is_empty());
            assert_eq!(h.engine.stats.local_opens_refused_after_acting, 1);
            // Refused before acting again: no break sent again, none in
            // progress, also once the step commits (re-review rr-w3r2 1).
            h.commit(true);
            h.drain_replies();
            assert!(h.engine.breaking.is_empty(), "no break again");
            let again = h.events[events_before..]
                .iter()
                .any(|e| matches!(e, libfilter::proto::Event::LeaseBreak { .. }));
            assert!(!again, "{:?}", &h.events[events_before..]);
        } else {
            assert!(rx.try_recv().is_err(), "waits for the break sent again");
            assert_eq!(h.engine.waiting_local.len(), 1);
            assert!(!h.engine.breaking.is_empty(), "sent again");
        }
    }
}

/// Review (rr-watch2): a local open the engine acted for, parked again
/// for a commit (a create or a handle's removal committing when it ran
/// again), kept the event whatever the commit took — past its held grace.
/// Past its deadline the engine refuses it instead of parking it; before
/// (the control), it parks it, still holding it.
#[test]
fn a_held_local_open_past_its_deadline_is_not_parked_for_a_commit() {
    use crate::command::{EventClaim, Verdict};
    use std::time::{Duration, Instant};
    for late in [true, false] {
        let mut h = Harness::new();
        h.run(open("n", Rights::ALL));
        let (_, file) = only_handle(&h);
        let claim = EventClaim::new(Instant::now() + Duration::from_secs(3600));
        assert!(claim.engine_takes(), "the engine holds it");
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Box::new(move |v| {
            let _ = tx.send(v);
        });
        let mut reply = LocalReply::new(sink, claim.clone());
        reply.acted = true;
        if late {
            claim.pass_deadline();
        }
        let fd = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let parked = h.engine.park_local(file, 0, reply, fd);
        assert_eq!(parked, !late);
        assert_eq!(h.engine.waiting_local.len(), usize::from(!late));
        match late {
            true => assert_eq!(rx.try_recv().ok(), Some(Verdict::Deny), "refused now"),
            false => assert!(rx.try_recv().is_err() && !claim.watchdog_refuses()),
        }
        assert_eq!(
            h.engine.stats.local_opens_refused_after_acting,
            u64::from(late),
            "counted when refused"
        );
    }
}

/// A Windows-protocol harness whose file "a" has a handle holding an RWH
/// lease (committed), and the lease's key.
fn a_windows_rwh_holder_of_a() -> (Harness, libfilter::lease::LeaseKey) {
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, libfilter::lease::MSFSA_PROTOCOL);
    let k = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    h.run(read_write_open_of_a(Disposition::Open, Some((k, "RWH"))));
    h.commit(true);
    (h, k)
}

/// A `Frontends` reply stays within a frame whatever the number of
/// instances: the rows past a page are counted in `more`, not sent.
/// Before, every row was sent, and a store naming a few hundred
/// instances with long names made a reply filterd could not encode.
#[test]
fn a_frontends_reply_of_many_instances_fits_a_frame() {
    let rows: Vec<libfilter::proto::FrontendView> = (0..2000)
        .map(|i| libfilter::proto::FrontendView {
            protocol: Protocol::new("p".repeat(64)).unwrap(),
            instance: InstanceName::new(format!("{i:0>64}")).unwrap(),
            pid: i32::MAX,
            uid: u32::MAX,
            attached_ms: u64::MAX,
            handles: u64::MAX,
            attached: true,
            stored_handles: Some(u64::MAX),
        })
        .collect();
    let reply = super::frontends_reply(rows);
    let libfilter::proto::Reply::Frontends {
        frontends, more, ..
    } = &reply
    else {
        panic!("{reply:?}");
    };
    assert!(!frontends.is_empty());
    assert_eq!(frontends.len() as u64 + more, 2000);
    let frame = libfilter::proto::ServerFrame::Reply {
        id: Some(u64::MAX),
        result: Ok(reply),
    };
    libfilter::proto::encode_server(libfilter::proto::Encoding::Json, &frame)
        .expect("the reply fits a frame");
}

/// `Wrote`, the one-way `BreakReadCaching`: refused (answered with the
/// error, nothing broken) from a connection not granted
/// `FEATURE_WRITE_NOTICES`; granted it, never answered, and another key's
/// read caching of the file goes.
#[test]
fn wrote_breaks_other_keys_read_caching_one_way_and_needs_the_bit() {
    let mut h = Harness::new();
    let st = |s: &str| libfilter::lease::LeaseState::parse(s).unwrap();
    let new_key = || libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let shared = |r: Request, access: Rights| {
        let Request::Open(mut o) = r else {
            unreachable!("an open")
        };
        o.share = Rights::ALL;
        o.access = libfilter::model::Access::new(access).unwrap();
        Request::Open(o)
    };
    let a = h.run(shared(
        leased_open("alice", "a", new_key(), st("R"), 0),
        Rights::READ,
    ));
    h.commit(true);
    let holder = h.opened(a);
    // (An open for writing would break the R lease itself.)
    let b = h.run(shared(open("a", Rights::READ), Rights::READ));
    h.commit(true);
    let writer = h.opened(b);
    let state = |h: &Harness, k| {
        h.engine
            .handles
            .get(&k)
            .and_then(|x| x.rec.lease)
            .map(|l| l.state)
    };
    let id = h.run(Request::Wrote { key: writer });
    assert!(
        matches!(h.reply(id), Some(Err(e)) if e.code == ErrorCode::NotPermitted),
        "refused without the bit"
    );
    assert_eq!(state(&h, holder), Some(st("R")), "nothing broken");
    if let Some(c) = h.engine.conns.get_mut(&h.conn) {
        c.features = libfilter::proto::FEATURE_WRITE_NOTICES;
    }
    let id = h.run(Request::Wrote { key: writer });
    h.commit(true);
    assert!(h.reply(id).is_none(), "never answered");
    assert_eq!(state(&h, holder), Some(libfilter::lease::LeaseState::NONE));
}

/// Review rvx: a recovered handle takes its descriptor when it is resumed
/// (or its open replayed by create GUID), and that reopen failing for lack
/// of descriptors or memory, or interrupted, says nothing about the file.
/// The handle is kept — disconnected, its share mode, stored record and
/// timeout as they were — the resume is refused with a code the frontends
/// answer as "retry", another client's conflicting open is still refused,
/// and the same resume succeeds once the reopen can be made. Before, any
/// reopen error but `EWOULDBLOCK` lost the handle for good (refused
/// `NoSuchHandle`, recorded lost), and the conflicting open went through.
#[test]
fn a_resume_that_cannot_reopen_for_lack_of_descriptors_keeps_the_handle() {
    let mut h = Harness::new();
    // Alice's persistent open denies writers.
    let Request::Open(o) = open("a", Rights::READ) else {
        unreachable!("open() makes an open")
    };
    let id = h.run(Request::Open(o.clone()));
    h.commit(true);
    let key = h.opened(id);
    let mut h = h.restarted();
    assert!(h.engine.handles[&key].fd.is_none());
    let before = h.digest();
    let stored = h.store.inner.lock().unwrap().handles[&key].clone();
    let resume = Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new("alice").unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key },
        owner: None,
        matching: None,
        if_last_held: false,
    });
    let mut bob = o.clone();
    bob.client = ClientId::new("bob").unwrap();
    bob.create_guid = None;
    let refused = |h: &mut Harness, req: Request| {
        let id = h.run(req);
        if h.reply(id).is_none() {
            h.commit(true);
        }
        h.refused(id)
    };
    for (errno, code) in [
        (libc::EMFILE, ErrorCode::LimitReached),
        (libc::ENFILE, ErrorCode::LimitReached),
        (libc::ENOMEM, ErrorCode::LimitReached),
        (libc::EINTR, ErrorCode::Busy),
    ] {
        h.fs.fail_next("reopen", errno);
        assert_eq!(refused(&mut h, resume.clone()), code, "errno {errno}");
        // The replay of the open by its create GUID reopens the same way.
        h.fs.fail_next("reopen", errno);
        assert_eq!(
            refused(&mut h, Request::ReplayOpen(o.clone())),
            code,
            "errno {errno}"
        );
        assert_eq!(h.digest(), before, "errno {errno}: the handle is kept");
        assert_eq!(h.store.inner.lock().unwrap().handles[&key], stored);
        // A disconnected persistent open's share mode: "retry later".
        assert_eq!(
            refused(&mut h, Request::Open(bob.clone())),
            ErrorCode::FileNotAvailable,
            "errno {errno}: the share mode still holds"
        );
    }
    let r = h.run(resume);
    h.commit(true);
    assert_eq!(h.opened(r), key);
    assert_eq!(h.engine.handles[&key].rec.conn, ConnState::Connected);
    assert_eq!(
        refused(&mut h, Request::Open(bob)),
        ErrorCode::SharingViolation
    );
}

/// A resume whose file is gone (its kernel handle names no file, `ESTALE`)
/// still loses the handle: only failures that say nothing about the file
/// keep it.
#[test]
fn a_resume_whose_file_is_gone_loses_the_handle() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::READ));
    h.commit(true);
    let key = h.opened(id);
    let mut h = h.restarted();
    h.fs.fail_next("reopen", libc::ESTALE);
    let r = h.run(Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new("alice").unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key },
        owner: None,
        matching: None,
        if_last_held: false,
    }));
    h.commit(true);
    assert_eq!(h.refused(r), ErrorCode::NoSuchHandle);
    assert_eq!(h.engine.handles[&key].rec.conn, ConnState::Lost);
}

/// Review rvx, at recovery: a look at a persistent handle's file that
/// fails for a reason that says nothing about the file (an I/O error, an
/// interrupted open) keeps the handle disconnected under the file it
/// recorded — its share mode holds, nothing is stored — and its resume
/// reopens it. Before, any failure but running out of descriptors or
/// memory (which refuses the start) recorded the handle lost for good.
#[test]
fn recovery_keeps_a_handle_whose_file_could_not_be_looked_at() {
    for errno in [libc::EIO, libc::EINTR] {
        let mut h = Harness::new();
        let id = h.run(open("a", Rights::READ));
        h.commit(true);
        let key = h.opened(id);
        let stored = h.store.inner.lock().unwrap().handles[&key].clone();
        h.fs.fail_next("reopen", errno);
        let mut h = h.restarted();
        assert!(
            matches!(
                h.engine.handles[&key].rec.conn,
                ConnState::Disconnected { .. }
            ),
            "errno {errno}"
        );
        assert_eq!(h.store.inner.lock().unwrap().handles[&key], stored);
        assert!(h.engine.by_file.values().flatten().any(|k| *k == key));
        let r = h.run(Request::Resume(libfilter::proto::ResumeRequest {
            client: ClientId::new("alice").unwrap(),
            target: libfilter::proto::ResumeTarget::Key { key },
            owner: None,
            matching: None,
            if_last_held: false,
        }));
        h.commit(true);
        assert_eq!(h.opened(r), key, "errno {errno}");
    }
}

/// Review of 1624469: a frontend whose `SetDeleteOnClose` is in flight or
/// went unanswered closes the handle with the flag its client was last
/// told (`Close`'s `delete_on_close`), set in the close's own step: a
/// change run first (here answered, as one whose answer never reached
/// the frontend) does not delete the file. Without the field the close
/// goes with filterd's flag, as before.
#[test]
fn a_close_carrying_the_told_flag_goes_with_it() {
    let fs = MemFs::new();
    fs.put("a", 10);
    fs.put("b", 10);
    let mut h = Harness::on(fs);
    let mut close_with = |path: &str, told: Option<bool>| {
        let key = opened_with_delete_on_close(&mut h, plain_open(path));
        let close = h.run(Request::Close {
            key,
            put: vec![],
            delete: vec![],
            delete_on_close: told,
        });
        h.commit(true);
        h.answered(close);
        h.fs.file(path).is_some()
    };
    assert!(close_with("a", Some(false)), "told it stays, a is deleted");
    assert!(!close_with("b", None), "filterd's flag: b is deleted");
}

/// The same for a persistent handle's detach: its record is stored with
/// the told flag, so a resume after a restart gets it too. A told flag
/// set on a handle without delete access is refused, nothing done.
#[test]
fn a_detach_carrying_the_told_flag_stores_it() {
    let mut h = Harness::new();
    let key = opened_with_delete_on_close(&mut h, open("a", Rights::ALL));
    let detach = h.run(Request::Detach {
        key,
        delete_on_close: Some(false),
    });
    h.commit(true);
    h.answered(detach);
    let stored = h.store.inner.lock().unwrap().handles.get(&key).cloned();
    assert!(
        stored.is_some_and(|r| !r.delete_on_close),
        "the stored record has the told flag, not the change's"
    );
    assert!(!h.engine.handles[&key].rec.delete_on_close);

    let Request::Open(mut o) = plain_open("b") else {
        unreachable!("plain_open makes an open")
    };
    o.access = Access::new(Rights::READ).unwrap();
    let reader = h.run(Request::Open(o));
    h.commit(true);
    let reader = h.opened(reader);
    let close = h.run(Request::Close {
        key: reader,
        put: vec![],
        delete: vec![],
        delete_on_close: Some(true),
    });
    h.commit(true);
    assert_eq!(h.refused(close), ErrorCode::AccessDenied);
    assert!(
        h.engine.handles.contains_key(&reader),
        "refused, still open"
    );
    assert!(!h.engine.handles[&reader].rec.delete_on_close);
}

/// A persistent handle's close carrying a told flag whose commit fails:
/// the handle is put back whole, with the flag it had before the close
/// (what the store still holds: a failed commit restores persistent
/// handles from it), not the told one.
#[test]
fn a_failed_close_carrying_the_told_flag_puts_the_flag_back() {
    let mut h = Harness::new();
    let key = opened_with_delete_on_close(&mut h, open("a", Rights::ALL));
    let close = h.run(Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: Some(false),
    });
    h.commit(false);
    assert!(
        matches!(h.reply(close), Some(Err(_))),
        "{:?}",
        h.reply(close)
    );
    assert!(
        h.engine.handles[&key].rec.delete_on_close,
        "put back with the told flag, which the store does not hold"
    );
    let stored = h.store.inner.lock().unwrap().handles.get(&key).cloned();
    assert!(stored.is_some_and(|r| r.delete_on_close));
}

/// As if the wall clock had stepped by `by_ms` since handle `key`
/// disconnected (NTP, `date -s`): its record's wall-clock deadline, as the
/// engine reads it against `now_ms()`, is `by_ms` off. Its monotonic one
/// is not moved (as the step does not move it).
fn wall_clock_stepped(h: &mut Harness, key: ResumeKey, by_ms: i64) {
    let shift = |t: u64| t.saturating_add_signed(-by_ms);
    let hd = h.engine.handles.get_mut(&key).expect("the handle");
    let ConnState::Disconnected {
        since_ms,
        expires_ms,
    } = hd.rec.conn
    else {
        panic!("not disconnected: {:?}", hd.rec.conn);
    };
    hd.rec.conn = ConnState::Disconnected {
        since_ms: shift(since_ms),
        expires_ms: shift(expires_ms),
    };
}

/// A persistent handle of `a` (60 s), disconnected by a restart, and the
/// resume its client sends.
fn disconnected_by_a_restart() -> (Harness, ResumeKey, Request) {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    let h = h.restarted();
    let resume = Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new("alice").unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key },
        owner: None,
        matching: None,
        if_last_held: false,
    });
    (h, key, resume)
}

const TWO_HOURS_MS: i64 = 2 * 3600 * 1000;

/// Re-review rr39e F4: a resume whose `matching` the handle does not meet
/// (rksmbd's DH2C without the persistent flag, under another FileId or
/// lease key) is refused before anything is attached: the handle stays
/// disconnected with its deadlines, nothing is written, no resume is
/// counted. A matching resume then gets it. Before, rksmbd found the
/// mismatch after the resume and detached the handle again, which
/// restarted its durable timeout and wrote its record again.
#[test]
fn a_resume_not_matching_changes_nothing() {
    let (mut h, key, resume) = disconnected_by_a_restart();
    let Request::Resume(r) = resume else {
        unreachable!("a resume")
    };
    let with = |m: libfilter::proto::ResumeMatch| {
        Request::Resume(libfilter::proto::ResumeRequest {
            matching: Some(m),
            if_last_held: false,
            ..r.clone()
        })
    };
    let right = libfilter::proto::ResumeMatch {
        short_id: Some(key.short_id()),
        refuse_persistent: false,
        lease_key: None,
        name: None,
    };
    let was = (
        h.engine.handles[&key].rec.conn,
        h.engine.handles[&key].expires_mono,
        h.engine.stats.resumes,
    );
    let before = h_stored(&h, key);
    for wrong in [
        libfilter::proto::ResumeMatch {
            refuse_persistent: true,
            ..right.clone()
        },
        libfilter::proto::ResumeMatch {
            short_id: Some(key.short_id() ^ 1),
            ..right.clone()
        },
    ] {
        let id = h.run(with(wrong));
        h.commit(true);
        assert_eq!(h.refused(id), ErrorCode::NoSuchHandle);
    }
    let hd = &h.engine.handles[&key];
    assert_eq!((hd.rec.conn, hd.expires_mono, h.engine.stats.resumes), was);
    assert_eq!(h_stored(&h, key), before, "the store holds it as it was");
    let id = h.run(with(right));
    h.commit(true);
    assert_eq!(h.opened(id), key);
    assert_eq!(h.engine.stats.resumes, was.2 + 1);
}

/// Re-review rr40b F1: a leased handle's resume under another name (a
/// DH2C of a leased open naming another file, or a name rksmbd cannot
/// parse) is refused `NameMismatch` before anything is attached: the
/// handle stays disconnected with its deadlines, nothing is written, no
/// resume is counted. Under its own name it is resumed. Before, rksmbd
/// found the other name after the resume and detached the handle again,
/// which restarted its durable timeout.
#[test]
fn a_leased_resume_under_another_name_changes_nothing() {
    use libfilter::proto::{ResumeMatch, ResumeName};
    let mut h = Harness::new();
    let lease = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let Request::Open(mut o) = open("d/a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.lease = Some(LeaseRequest {
        key: lease,
        state: libfilter::lease::LeaseState::parse("RH").unwrap(),
        epoch: 1,
    });
    h.fs.mkdir("d");
    let id = h.run(Request::Open(o));
    h.commit(true);
    let key = h.opened(id);
    let mut h = h.restarted();
    assert!(h.engine.handles[&key].rec.lease.is_some(), "still leased");
    h.writer
        .set_features(libfilter::proto::FEATURE_RESUME_MATCH);
    let resume = |name: ResumeName| {
        Request::Resume(libfilter::proto::ResumeRequest {
            client: ClientId::new("alice").unwrap(),
            target: libfilter::proto::ResumeTarget::Key { key },
            owner: None,
            matching: Some(ResumeMatch {
                short_id: Some(key.short_id()),
                refuse_persistent: false,
                lease_key: Some(lease),
                name: Some(name),
            }),
            if_last_held: false,
        })
    };
    let was = (
        h.engine.handles[&key].rec.conn,
        h.engine.handles[&key].expires_mono,
        h.engine.stats.resumes,
    );
    let before = h_stored(&h, key);
    for wrong in ["a", "D/a", "d/b"]
        .map(|p| ResumeName::Path(RelPath::new(p).unwrap()))
        .into_iter()
        .chain([ResumeName::NoPath])
    {
        let id = h.run(resume(wrong.clone()));
        h.commit(true);
        assert_eq!(h.refused(id), ErrorCode::NameMismatch, "{wrong:?}");
    }
    // A connection without the bit is told the older code (it never
    // sends a name).
    h.writer.set_features(0);
    let id = h.run(resume(ResumeName::NoPath));
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::NoSuchHandle);
    let hd = &h.engine.handles[&key];
    assert_eq!((hd.rec.conn, hd.expires_mono, h.engine.stats.resumes), was);
    assert_eq!(h_stored(&h, key), before, "the store holds it as it was");
    let id = h.run(resume(ResumeName::Path(RelPath::new("d/a").unwrap())));
    h.commit(true);
    assert_eq!(h.opened(id), key);
    assert_eq!(h.engine.stats.resumes, was.2 + 1);
}

/// The record the store holds for handle `key`.
fn h_stored(h: &Harness, key: ResumeKey) -> Option<HandleRecord> {
    h.store.inner.lock().unwrap().handles.get(&key).cloned()
}

/// Review rvclock: the wall clock steps forward while a persistent
/// handle is disconnected with 60 s to go; its client's resume fails to
/// commit and is undone. The undo rebuilt the monotonic deadline from the
/// wall-clock one (already past): the handle expired at once, and the
/// retry a second later found nothing. It keeps its monotonic deadline.
#[test]
fn a_failed_resume_after_a_wall_clock_step_keeps_the_deadline() {
    let (mut h, key, resume) = disconnected_by_a_restart();
    wall_clock_stepped(&mut h, key, TWO_HOURS_MS);
    let id = h.run(resume.clone());
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    // One second later on the monotonic clock.
    h.engine.expire_due(mono_ms() + 1_000);
    h.commit(true);
    assert!(h.engine.handles.contains_key(&key), "expired at once");
    let id = h.run(resume);
    h.commit(true);
    assert_eq!(h.opened(id), key, "the retry a second later resumes it");
}

/// Review rvclock: the same with the wall clock stepped two hours back:
/// the handle expires when its 60 s are up, not two hours later.
#[test]
fn a_failed_resume_after_a_step_back_still_expires() {
    let (mut h, key, resume) = disconnected_by_a_restart();
    wall_clock_stepped(&mut h, key, -TWO_HOURS_MS);
    let id = h.run(resume);
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    h.engine.expire_due(mono_ms() + 61_000);
    h.commit(true);
    assert!(
        !h.engine.handles.contains_key(&key),
        "61 s later the 60 s handle is still there"
    );
}

/// Review rvclock: a purge whose commit fails puts the handle back with
/// the monotonic deadline it had, whatever the wall clock did meanwhile
/// (rebuilt from the wall clock after a forward step, it expired
/// `EXPIRY_RETRY_MS` later instead of a minute later).
#[test]
fn a_failed_purge_after_a_wall_clock_step_keeps_the_deadline() {
    let mut h = Harness::new();
    let Request::Open(mut o) = open("c", Rights::READ.union(Rights::WRITE)) else {
        unreachable!()
    };
    o.durability = Durability::Durable { timeout_ms: 60_000 };
    o.create_guid = None;
    let id = h.run(Request::Open(o));
    h.commit(true);
    let key = h.opened(id);
    h.run(Request::Detach {
        key,
        delete_on_close: None,
    });
    h.commit(true);
    wall_clock_stepped(&mut h, key, TWO_HOURS_MS);
    // A persistent open that does not share write purges it; its commit
    // fails.
    let id = h.run(open("c", Rights::READ));
    h.commit(false);
    assert_eq!(h.refused(id), ErrorCode::DiskFull);
    assert!(h.engine.handles.contains_key(&key), "the purge is undone");
    h.engine
        .expire_due(mono_ms() + super::durable::EXPIRY_RETRY_MS + 1_000);
    h.commit(true);
    assert!(
        h.engine.handles.contains_key(&key),
        "expired with most of its minute to go"
    );
    h.engine.expire_due(mono_ms() + 61_000);
    h.commit(true);
    assert!(!h.engine.handles.contains_key(&key), "expired in time");
}

/// How a holder's break ends, in
/// [`an_open_waiting_for_many_breaks_runs_again_once_they_are_all_over`].
#[derive(Clone, Copy, Debug)]
enum BreakEnd {
    Acknowledged,
    HolderClosed,
    /// Its (durable) handle detached: its client cannot acknowledge.
    HolderDetached,
    TimedOut,
}

/// Review rvcx: an open waiting for the breaks of n holders' leases ran
/// again from scratch at every acknowledgement (each time over every
/// lease of the file): n runs for one open, a second and more of the
/// engine's time for 2000 holders. It runs again once, when the last of
/// its breaks is over — acknowledged, timed out, its holder closed or
/// detached — and never waits for ever.
#[test]
fn an_open_waiting_for_many_breaks_runs_again_once_they_are_all_over() {
    use libfilter::lease::{LeaseKey, LeaseState};
    use libfilter::proto::Event;
    const N: usize = 40;
    for last in [
        BreakEnd::Acknowledged,
        BreakEnd::HolderClosed,
        BreakEnd::HolderDetached,
        BreakEnd::TimedOut,
    ] {
        let mut h = Harness::new();
        let mut holders = BTreeMap::new();
        for _ in 0..N {
            let k = LeaseKey(uuid::Uuid::new_v4());
            let Request::Open(mut reader) =
                read_write_open_of_a(Disposition::Open, Some((k, "RH")))
            else {
                unreachable!("an open")
            };
            reader.access = Access::new(Rights::READ).unwrap();
            reader.durability = Durability::Durable { timeout_ms: 60_000 };
            reader.create_guid = Some(CreateGuid(uuid::Uuid::new_v4()));
            let id = h.run(Request::Open(reader));
            h.commit(true);
            assert_eq!(
                h.lease_of(id).map(|l| l.state),
                Some(LeaseState::parse("RH").unwrap())
            );
            holders.insert(k, h.opened(id));
        }
        let writer = h.run(read_write_open_of_a(Disposition::Open, None));
        h.commit(true);
        let breaks: Vec<(LeaseKey, LeaseState)> = h
            .events
            .iter()
            .filter_map(|e| match e {
                Event::LeaseBreak {
                    lease_key,
                    new_state,
                    ack_required: true,
                    ..
                } => Some((*lease_key, *new_state)),
                _ => None,
            })
            .collect();
        assert_eq!(breaks.len(), N, "{last:?}: every holder's lease breaks");
        let before = h.engine.open_reruns;
        for (i, (k, to)) in breaks.iter().enumerate() {
            let end = if i + 1 == N {
                last
            } else {
                BreakEnd::Acknowledged
            };
            match end {
                BreakEnd::Acknowledged => {
                    h.run(Request::LeaseBreakAck {
                        lease_key: *k,
                        state: *to,
                        client: None,
                    });
                }
                BreakEnd::HolderClosed => {
                    h.run(Request::Close {
                        key: holders[k],
                        put: vec![],
                        delete: vec![],
                        delete_on_close: None,
                    });
                }
                BreakEnd::HolderDetached => {
                    h.run(Request::Detach {
                        key: holders[k],
                        delete_on_close: None,
                    });
                }
                BreakEnd::TimedOut => h.engine.expire_due(u64::MAX),
            }
            h.commit(true);
            h.engine.process_retries();
            h.drain_replies();
            h.commit(true);
            if i + 1 < N {
                assert!(h.reply(writer).is_none(), "{last:?}: waits for the rest");
            }
        }
        h.opened(writer);
        let runs = h.engine.open_reruns - before;
        assert!(
            runs <= 2,
            "{last:?}: the waiting open ran again {runs} times for {N} breaks"
        );
    }
}

/// An open that waits for a break runs again once that break is over,
/// also when a later open began a new break of the same lease in the
/// same step (the engine retries after the step's requests): it waits
/// for the break it met, not for the lease key (`Breaking::id`). Here
/// the new break (of H, for an open the holder's share mode refuses)
/// asks nothing the writer needs, so the writer goes on, as it did when
/// every acknowledgement ran it again.
#[test]
fn an_open_waits_for_the_break_it_met_not_a_new_one_of_the_same_lease() {
    use libfilter::lease::{LeaseKey, LeaseState};
    use libfilter::proto::Event;
    let mut h = Harness::new();
    let k = LeaseKey(uuid::Uuid::new_v4());
    let Request::Open(mut reader) = read_write_open_of_a(Disposition::Open, Some((k, "RH"))) else {
        unreachable!("an open")
    };
    reader.access = Access::new(Rights::READ).unwrap();
    reader.share = Rights::READ.union(Rights::WRITE);
    let holder = h.run(Request::Open(reader));
    h.commit(true);
    assert_eq!(
        h.lease_of(holder).map(|l| l.state),
        Some(LeaseState::parse("RH").unwrap())
    );
    let writer = h.run(read_write_open_of_a(Disposition::Open, None));
    h.commit(true);
    assert!(h.reply(writer).is_none(), "waits for the break of R");
    let to = h
        .events
        .iter()
        .find_map(|e| match e {
            Event::LeaseBreak { new_state, .. } => Some(*new_state),
            _ => None,
        })
        .expect("a break");
    h.run(Request::LeaseBreakAck {
        lease_key: k,
        state: to,
        client: None,
    });
    // In the same step, an open the holder's share mode refuses breaks
    // its H: a new break of the same lease.
    let Request::Open(mut deleter) = open("a", Rights::ALL) else {
        unreachable!("an open")
    };
    deleter.access = Access::new(Rights::DELETE).unwrap();
    deleter.durability = Durability::None;
    deleter.create_guid = None;
    let deleter = h.run(Request::Open(deleter));
    h.commit(true);
    assert!(h.reply(deleter).is_none(), "waits for the break of H");
    h.engine.process_retries();
    h.drain_replies();
    h.commit(true);
    h.opened(writer);
}

/// Re-review rr37d: an open's owner had no length limit; one of many
/// kilobytes (a third-party frontend's) made a lock view too large for a
/// listing page, which then failed at it for good. Refused past 4 KiB,
/// nothing opened.
#[test]
fn an_open_naming_an_owner_of_many_kilobytes_is_refused() {
    let mut h = Harness::new();
    let with_owner = |n: usize| match open("a", Rights::ALL) {
        Request::Open(o) => Request::Open(OpenRequest {
            owner: Some("o".repeat(n)),
            ..o
        }),
        other => other,
    };
    let id = h.run(with_owner(4097));
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::BadFrame);
    assert!(h.engine.handles.is_empty(), "nothing opened");
    let id = h.run(with_owner(4096));
    h.commit(true);
    h.opened(id);
}

/// Re-reviews rr37g and rr37h: after a commit failed whole, a handle
/// whose `shown_at` (what a break to it waits for) was the abandoned
/// sequence got `through` — abandoned too: a break made to wait for it
/// before the committer published the failure was refused by the
/// pipeline, never sent, its opener waiting out the break timeout. Now it
/// gets a sequence already resolved or still pending. (The rr37h case —
/// a sequence an earlier rollback abandoned past its `through` — is not
/// reached here: the harness commits every queued group at once.)
#[test]
fn a_rollback_leaves_no_handle_shown_at_an_abandoned_commit() {
    let mut h = Harness::new();
    let a = h.run(open("a", Rights::ALL));
    h.commit(true);
    let a = h.opened(a);
    h.run(open("b", Rights::ALL));
    let seq = h.engine.batch.last_pending().expect("the open's group");
    if let Some(x) = h.engine.handles.get_mut(&a) {
        x.shown_at = seq;
    }
    h.engine.flush();
    let jobs = h.pipe.take_jobs();
    let through = jobs
        .iter()
        .flat_map(|j| j.groups.iter().map(|g| g.seq))
        .max()
        .expect("a group");
    // Rolled back; the committer has not published the failure yet.
    let before = h.pipe.committed();
    h.engine
        .roll_back(&[through], through, ErrorCode::DiskFull, "test");
    let shown = h.engine.handles.get(&a).map(|x| x.shown_at);
    assert!(
        shown.is_some_and(|s| s <= before),
        "shown at {shown:?}, an abandoned sequence (resolved up to {before})"
    );
}

/// Re-review rr38 of d837ff2, as requests do it: a detached persistent
/// handle is resumed (its reply waits for the resume's group) and closed
/// (a group of its own that keeps the whole handle), and the commit of
/// both fails whole. The undo puts the handle back (`Undo::Reinsert`)
/// with the resume's abandoned sequence as `shown_at`: with the fix-up
/// before the undo it stayed so.
#[test]
fn a_resumed_then_closed_handle_put_back_is_not_shown_at_an_abandoned_commit() {
    let mut h = Harness::new();
    let a = h.run(open("a", Rights::ALL));
    h.commit(true);
    let a = h.opened(a);
    h.run(Request::Detach {
        key: a,
        delete_on_close: None,
    });
    h.commit(true);
    let r = h.run(Request::Resume(libfilter::proto::ResumeRequest {
        client: ClientId::new("alice").unwrap(),
        target: libfilter::proto::ResumeTarget::Key { key: a },
        owner: None,
        matching: None,
        if_last_held: false,
    }));
    let resumed_at = h.engine.handles.get(&a).map(|x| x.shown_at);
    assert!(
        resumed_at.is_some_and(|s| s > h.pipe.committed()),
        "the resume's reply waits: {resumed_at:?}"
    );
    h.run(Request::Close {
        key: a,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    let before = h.pipe.committed();
    h.roll_back_flushed();
    let back = h.engine.handles.get(&a).map(|x| x.shown_at);
    assert!(back.is_some(), "the close is undone: the handle is back");
    assert!(
        back.is_some_and(|s| s <= before),
        "shown at {back:?}, an abandoned sequence (resolved up to {before}); resume {r}"
    );
}

/// Review rvspec n2/n7: a `no_wait` truncating persistent open of a file
/// whose frontend takes lock hints waits for the size-change hint's
/// acknowledgment when it asks to (`wait_for_hints`, nfsshim's opens) and
/// is refused `Busy` when it does not (smbshim's and rksmbd's, sent from
/// the thread that reads their client's connection, which must not wait
/// on other frontends).
#[test]
fn a_no_wait_truncating_open_waits_for_the_hint_only_when_it_asks_to() {
    for wait_for_hints in [false, true] {
        let mut h = Harness::new();
        if let Some(c) = h.engine.conns.get_mut(&h.conn) {
            c.features = libfilter::proto::FEATURE_LOCK_HINTS;
        }
        let first = h.run(open("a", Rights::ALL));
        h.commit(true);
        let first = h.opened(first);
        let file = h.engine.handles[&first].rec.file;
        let Request::Open(mut o) = with_disposition(open("a", Rights::ALL), Disposition::Overwrite)
        else {
            unreachable!("open() makes an open")
        };
        o.client = ClientId::new("bob").unwrap();
        o.no_wait = true;
        o.wait_for_hints = wait_for_hints;
        let id = h.run(Request::Open(o));
        if !wait_for_hints {
            assert_eq!(h.refused(id), ErrorCode::Busy, "without the flag: Busy");
            continue;
        }
        assert!(
            h.reply(id).is_none(),
            "held for the hint: {:?}",
            h.reply(id)
        );
        assert!(h.engine.hint_waits.contains_key(&file), "a hint wait");
        h.run(Request::LockHintAck { file });
        h.engine.process_retries();
        h.drain_replies();
        h.commit(true);
        h.commit(true);
        h.drain_replies();
        assert!(
            matches!(h.reply(id), Some(Ok(_))),
            "answered once acknowledged: {:?}",
            h.reply(id)
        );
    }
}

/// Review rvnode 1: on a store shared between machines a frontend that
/// asks for fenced I/O is refused lock hints (it then checks every read
/// and write, and a daemon stopped past its lease answers none); on LMDB
/// hints are granted as before, and a frontend that does not ask for the
/// bit keeps its hints on any store.
#[test]
fn a_shared_store_withholds_lock_hints_from_a_frontend_that_checks_without_them() {
    use libfilter::proto::{FEATURES, FEATURE_FENCED_IO, FEATURE_LOCK_HINTS};
    let shared = fenced_io(FEATURES, true);
    assert_eq!(shared, FEATURES & !FEATURE_LOCK_HINTS);
    let local = fenced_io(FEATURES, false);
    assert_eq!(local, FEATURES & !FEATURE_FENCED_IO);
    let older = FEATURES & !FEATURE_FENCED_IO;
    assert_eq!(fenced_io(older, true), older);
    assert_eq!(fenced_io(older, false), older);
}

/// Resumes alice's handle `key` as a frontend's reattach does
/// (`if_last_held`); the request's id.
fn reattach_alices(h: &mut Harness, key: ResumeKey) -> u64 {
    resume_alices_as(h, key, true)
}

/// rvnode finding 3 (fail-back between nodes): frontend process A held a
/// persistent handle; while A was away from filterd, process B of the
/// same instance name (the other node's) resumed it for its client, and
/// went. A's automatic reattach (`if_last_held`) is refused — lost, the
/// handle left disconnected for its client's reconnect, its record as it
/// was — while a client's own resume still takes it, and B's reattach
/// too. The stamp is stored: after a restart A is still refused.
#[test]
fn a_reattach_is_refused_a_handle_another_frontend_process_attached_since() {
    const A: u64 = 0xa;
    const B: u64 = 0xb;
    let mut h = Harness::new();
    h.reattach_as(Some(A));
    let key = {
        let o = h.run(open("a", Rights::ALL));
        h.commit(true);
        h.opened(o)
    };
    assert_eq!(
        h.engine.handles[&key].rec.attached_by, 0,
        "unstamped: the opener's"
    );
    // B resumes it for its client.
    h.reattach_as(Some(B));
    let r = resume_alices(&mut h, key);
    assert_eq!(h.opened(r), key);
    assert_eq!(h.engine.handles[&key].rec.attached_by, B);
    assert_eq!(
        h.store.handle(key).unwrap().map(|r| r.attached_by),
        Some(B),
        "the stamp is stored with the resume"
    );
    // A is back (B gone): its reattach is refused, nothing changes.
    h.reattach_as(Some(A));
    let r = reattach_alices(&mut h, key);
    assert_eq!(h.refused(r), ErrorCode::NoSuchHandle);
    for rec in [
        h.engine.handles[&key].rec.clone(),
        h.store.handle(key).unwrap().unwrap(),
    ] {
        assert!(matches!(rec.conn, ConnState::Disconnected { .. }));
        assert_eq!(rec.attached_by, B);
    }
    // And so after a restart (the fail-back: the stamp came from the store).
    let mut h = h.restarted();
    h.reattach_as(Some(A));
    let r = reattach_alices(&mut h, key);
    assert_eq!(h.refused(r), ErrorCode::NoSuchHandle);
    // The process that attached it last reattaches it.
    h.reattach_as(Some(B));
    let r = reattach_alices(&mut h, key);
    assert_eq!(h.opened(r), key);
    // A client's own resume (a reconnect through A) takes it, and A's
    // reattach after that is its own again.
    h.reattach_as(Some(A));
    let r = resume_alices(&mut h, key);
    assert_eq!(h.opened(r), key);
    h.reattach_as(Some(A));
    let r = reattach_alices(&mut h, key);
    assert_eq!(h.opened(r), key);
}

/// A record from before the stamp (`attached_by` 0) is reattached by any
/// frontend process, as before; a plain restart with nobody else
/// attaching meanwhile keeps every reattach.
#[test]
fn a_reattach_of_an_unstamped_or_own_handle_is_granted() {
    let mut h = Harness::new();
    h.reattach_as(Some(7));
    let o = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(o);
    let mut h = h.restarted();
    h.reattach_as(Some(7));
    let r = reattach_alices(&mut h, key);
    assert_eq!(h.opened(r), key);
    if let Some(x) = h.engine.handles.get_mut(&key) {
        x.rec.attached_by = 0;
    }
    h.reattach_as(Some(8));
    let r = reattach_alices(&mut h, key);
    assert_eq!(h.opened(r), key);
    assert_eq!(
        h.engine.handles[&key].rec.attached_by, 0,
        "a frontend's own reattach stamps nothing"
    );
}

/// `status` parked behind a pending commit is answered once its bound
/// passes, with the counts of the last moment nothing was pending and
/// `commit_wait` (review rvslowetcd finding 3: with etcd stalled it
/// waited until the lease check gave up); the parked reply is taken back,
/// so the commit resolving later sends nothing more (the harness fails a
/// request answered twice).
#[test]
fn a_status_behind_a_stalled_commit_answers_with_what_is_durable() {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let first = h.run(Request::Status);
    let Some(Ok(Reply::Status(s))) = h.reply(first) else {
        panic!("{:?}", h.reply(first));
    };
    assert_eq!((s.handles_connected, s.commit_wait.is_none()), (1, true));
    h.run(open("b", Rights::ALL));
    h.engine.flush();
    let second = h.run(Request::Status);
    assert!(h.reply(second).is_none(), "waits for the open of b");
    h.engine.status_waits_due(mono_ms());
    h.drain_replies();
    assert!(h.reply(second).is_none(), "answered before its bound");
    h.engine
        .status_waits_due(mono_ms() + super::status_wait::STATUS_COMMIT_WAIT_MS);
    h.drain_replies();
    let Some(Ok(Reply::Status(s))) = h.reply(second) else {
        panic!("{:?}", h.reply(second));
    };
    assert_eq!(s.handles_connected, 1, "the pending open of b is not shown");
    let w = s
        .commit_wait
        .as_ref()
        .expect("says what it did not wait for");
    assert!(
        w.waited_ms >= super::status_wait::STATUS_COMMIT_WAIT_MS,
        "{w:?}"
    );
    assert!(
        w.replies_awaiting_commit >= 1 && w.counts_age_ms.is_some(),
        "{w:?}"
    );
    h.commit(true);
    h.drain_replies();
    let third = h.run(Request::Status);
    let Some(Ok(Reply::Status(s))) = h.reply(third) else {
        panic!("{:?}", h.reply(third));
    };
    assert_eq!((s.handles_connected, s.commit_wait.is_none()), (2, true));
}

/// The listings parked behind a pending commit are answered once their
/// bound passes, as `status` is, with what is durable only: the files and
/// handles a pending commit changes are left out (not shown as they will
/// be, nor as they were: no copy of the durable record is kept) and
/// counted in `commit_wait`; `frontends`, whose stored-handle counts
/// pending commits change, asked first now, has no rows taken with the
/// durable counts to answer with: refused (`Busy`) rather than left
/// waiting.
/// Before, each waited for every pending commit, and with etcd stalled an
/// operator got no answer at all. The parked replies are taken back, so
/// the commit resolving later sends nothing more (the harness fails a
/// request answered twice).
#[test]
fn listings_behind_a_stalled_commit_answer_with_what_is_durable() {
    let mut h = Harness::new();
    let (a, c) = h.durable_a_and_c();
    h.run(lock_10(a, 0));
    h.run(lock_10(c, 0));
    h.commit(true);
    let file_a = h.engine.handles[&a].rec.file;
    // Pending: the open of b, a second lock of c.
    let ob = h.run(open("b", Rights::ALL));
    let lc = h.run(lock_10(c, 100));
    h.engine.flush();
    assert!(h.reply(ob).is_none() && h.reply(lc).is_none());
    let ids = [
        h.run(durable_handles(None)),
        h.run(Request::Files {
            after: None,
            holders_after: None,
            durable_ok: true,
        }),
        h.run(Request::Locks {
            after: None,
            locks_after: None,
            durable_ok: true,
        }),
        h.run(Request::Frontends { durable_ok: false }),
    ];
    // Without `durable_ok` (a frontend's, a library caller's): complete,
    // waiting for every pending commit however long (re-review rr43a F1).
    let complete = [
        h.run(Request::Handles {
            after: None,
            durable_ok: false,
        }),
        h.run(Request::Locks {
            after: None,
            locks_after: None,
            durable_ok: false,
        }),
    ];
    h.engine.status_waits_due(mono_ms());
    h.drain_replies();
    assert!(
        ids.iter().all(|id| h.reply(*id).is_none()),
        "answered before their bound"
    );
    h.engine
        .status_waits_due(mono_ms() + 10 * super::status_wait::STATUS_COMMIT_WAIT_MS);
    h.drain_replies();
    assert!(
        complete.iter().all(|id| h.reply(*id).is_none()),
        "a listing without durable_ok answered before the commits it shows"
    );
    let left_out = |w: &Option<libfilter::proto::CommitWait>| {
        let w = w.as_ref().expect("says what it did not wait for");
        assert!(
            w.waited_ms >= super::status_wait::STATUS_COMMIT_WAIT_MS
                && w.replies_awaiting_commit >= 2,
            "{w:?}"
        );
        (w.handles_left_out, w.files_left_out)
    };
    let Some(Ok(Reply::Handles {
        handles,
        next: None,
        commit_wait,
    })) = h.reply(ids[0])
    else {
        panic!("{:?}", h.reply(ids[0]));
    };
    let keys: Vec<ResumeKey> = handles.iter().map(|v| v.record.key).collect();
    assert_eq!(keys, [a], "only a's state is durable and not pending");
    assert_eq!(left_out(commit_wait), (Some(2), Some(2)), "b and c");
    let Some(Ok(Reply::Files {
        files, commit_wait, ..
    })) = h.reply(ids[1])
    else {
        panic!("{:?}", h.reply(ids[1]));
    };
    let listed: Vec<FileId> = files.iter().map(|f| f.file).collect();
    assert_eq!(listed, [file_a]);
    assert_eq!(left_out(commit_wait), (Some(2), Some(2)));
    let Some(Ok(Reply::Locks {
        locks, commit_wait, ..
    })) = h.reply(ids[2])
    else {
        panic!("{:?}", h.reply(ids[2]));
    };
    let holders: Vec<ResumeKey> = locks.iter().map(|l| l.key).collect();
    assert_eq!(holders, [a], "c's pending lock is not shown");
    assert_eq!(left_out(commit_wait), (Some(2), Some(2)));
    match h.reply(ids[3]) {
        Some(Err(e)) if e.code == ErrorCode::Busy && e.message.contains("durable") => {}
        other => panic!("frontends past its bound: {other:?}"),
    }
    h.commit(true);
    h.drain_replies();
    h.opened(ob);
    h.answered(lc);
    assert_eq!(waited_rows(&h, complete[0]), 3, "waited: every handle");
    assert_eq!(
        waited_rows(&h, complete[1]),
        3,
        "waited: c's second lock too"
    );
    let all = h.run(durable_handles(None));
    assert_eq!(waited_rows(&h, all), 3, "nothing pending: every handle");
}

/// The rows of a `Handles` or `Locks` reply that waited for every commit
/// pending at it (no `commit_wait`).
fn waited_rows(h: &Harness, id: u64) -> usize {
    match h.reply(id) {
        Some(Ok(Reply::Handles {
            handles,
            commit_wait: None,
            ..
        })) => handles.len(),
        Some(Ok(Reply::Locks {
            locks,
            commit_wait: None,
            ..
        })) => locks.len(),
        other => panic!("a listing that waited: {other:?}"),
    }
}

/// Re-review rr43a F6: request ids are the peer's. A LOCK parked behind
/// a pending commit and a listing sent with the same id: the listing's
/// bound takes back the listing's own reply. It took the first parked
/// reply of that id, the LOCK's, which then never went, and later sent
/// the full listing too.
#[test]
fn a_listings_bound_takes_back_its_own_reply_not_a_lock_of_the_same_id() {
    let mut h = Harness::new();
    let oa = h.run(open("a", Rights::ALL));
    h.commit(true);
    let a = h.opened(oa);
    let lock = h.run(lock_10(a, 0));
    h.engine.flush();
    assert!(h.reply(lock).is_none(), "the lock waits for its commit");
    let due = mono_ms() + 10 * super::status_wait::STATUS_COMMIT_WAIT_MS;
    h.same_id_listing_past_its_bound(lock, due);
    assert!(
        matches!(h.reply(lock), Some(Ok(Reply::Done))),
        "the LOCK's own reply once its commit is durable: {:?}",
        h.reply(lock)
    );
}

/// rr44a F1: a status and a listing sent with the same id, parked under
/// the same sequence, the listing due first (commits stuck before it
/// came). Withdrawn by id, the listing's bound took the status's reply,
/// and the status was never answered.
#[test]
fn a_listings_bound_takes_back_its_own_reply_not_a_status_of_the_same_id() {
    let mut h = Harness::new();
    h.durable_a_and_c();
    let ob = h.run(open("b", Rights::ALL));
    h.engine.flush();
    assert!(h.reply(ob).is_none(), "b's open is pending");
    let t0 = mono_ms();
    h.engine.status_waits_due(t0);
    while mono_ms() <= t0 {
        std::thread::yield_now();
    }
    let status = h.run(Request::Status);
    h.same_id_listing_past_its_bound(status, t0 + super::status_wait::STATUS_COMMIT_WAIT_MS);
    assert!(
        matches!(h.reply(status), Some(Ok(Reply::Status(_)))),
        "the status's own reply: {:?}",
        h.reply(status)
    );
}

/// An opted-in (`durable_ok`) `Handles` page after `after`.
fn durable_handles(after: Option<ResumeKey>) -> Request {
    Request::Handles {
        after,
        durable_ok: true,
    }
}

/// A rename of `key` to `to` recorded under op `op_id` of session 1
/// (reply "ok", 8 kept).
fn recorded_rename(key: ResumeKey, to: &str, op_id: u64) -> Request {
    Request::Rename {
        key,
        to: RelPath::new(to).unwrap(),
        replace: false,
        record: Some(RecordSpec {
            scope: session(1),
            op_id,
            reply: "ok".into(),
            keep: 8,
        }),
    }
}

/// The keys of a `Handles` reply that did not wait (`commit_wait` set).
fn durable_keys(h: &Harness, id: u64) -> Vec<ResumeKey> {
    match h.reply(id) {
        Some(Ok(Reply::Handles {
            handles,
            commit_wait: Some(_),
            ..
        })) => handles.iter().map(|v| v.record.key).collect(),
        other => panic!("a durable-only page: {other:?}"),
    }
}

/// The bound is a listing's, not each page's (re-review rr43a F4): once
/// commits have been pending for the bound with none resolving, a later
/// page is answered at once with what is durable — not after a bound of
/// its own, which made `filterctl handles` take about a second per page
/// (minutes at 100k handles) during a stall.
#[test]
fn a_later_page_during_a_stall_does_not_wait_its_own_bound() {
    let mut h = Harness::new();
    let (a, c) = h.durable_a_and_c();
    let ob = h.run(open("b", Rights::ALL));
    h.engine.flush();
    assert!(h.reply(ob).is_none(), "b's open is pending");
    let first = h.run(durable_handles(None));
    let arrived = mono_ms();
    let bound = super::status_wait::STATUS_COMMIT_WAIT_MS;
    h.engine.status_waits_due(arrived + bound);
    h.drain_replies();
    let (low, high) = (a.min(c), a.max(c));
    assert_eq!(durable_keys(&h, first), [low, high]);
    // The next page arrives later, the commit still pending: answered by
    // the same instant, not a bound after its own arrival.
    while mono_ms() <= arrived {
        std::thread::yield_now();
    }
    let later = h.run(durable_handles(Some(low)));
    h.engine.status_waits_due(arrived + bound);
    h.drain_replies();
    assert_eq!(durable_keys(&h, later), [high]);
    // With progress (the commit resolved) a stall starts afresh.
    h.commit(true);
    h.drain_replies();
    h.opened(ob);
    let od = h.run(open("e", Rights::ALL));
    h.engine.flush();
    assert!(h.reply(od).is_none(), "e's open is pending");
    let fresh = h.run(durable_handles(None));
    h.engine.status_waits_due(arrived + bound);
    h.drain_replies();
    assert!(
        h.reply(fresh).is_none(),
        "commits resolved since: a new stall, and the page waits its bound"
    );
    h.commit(true);
    h.drain_replies();
    h.opened(od);
    assert!(matches!(
        h.reply(fresh),
        Some(Ok(Reply::Handles {
            commit_wait: None,
            ..
        }))
    ));
}

/// Re-review rr43d G3: a slow store whose commits still resolve, one
/// every second or so, kept the stall's clock recent, and each page of a
/// listing waited a bound of its own (minutes for a long listing). Once
/// a page was answered with what is durable, the later pages on that
/// connection are answered at once while a commit pending then still is.
#[test]
fn a_later_page_behind_a_slow_store_that_still_commits_does_not_wait_its_own_bound() {
    let mut h = Harness::new();
    let (a, c) = h.durable_a_and_c();
    let ob = h.run(open("b", Rights::ALL));
    h.engine.flush();
    let first = h.run(durable_handles(None));
    // The load goes on while page 1 waits: e's commit is given out
    // after it came (rr44a F2: page 1's own dependency, b, was kept,
    // and once b resolved the next page waited a bound again).
    let oe = h.run(open("e", Rights::ALL));
    h.engine.flush();
    h.engine
        .status_waits_due(mono_ms() + super::status_wait::STATUS_COMMIT_WAIT_MS);
    h.drain_replies();
    let (low, high) = (a.min(c), a.max(c));
    assert_eq!(durable_keys(&h, first), [low, high]);
    // Progress: b's commit resolves; e's is still in flight.
    h.commit_first_job_only();
    h.opened(ob);
    assert!(h.reply(oe).is_none(), "e's open is pending");
    h.engine.status_waits_due(mono_ms());
    let later = h.run(durable_handles(Some(low)));
    h.engine.status_waits_due(mono_ms());
    h.drain_replies();
    assert!(
        h.reply(later).is_some(),
        "answered at the end of its round, not a bound after it came"
    );
    let mut durable: Vec<ResumeKey> = [h.opened(ob), high]
        .into_iter()
        .filter(|k| *k > low)
        .collect();
    durable.sort();
    assert_eq!(durable_keys(&h, later), durable, "b now, e still left out");
}

/// A recorded rename of a file whose handles are not persistent: its
/// completion's commit holds no handle record, yet the handles' new path
/// is its to show (re-review rr43a F5). While that commit is pending a
/// durable-only listing leaves the file out, its handles at the old path
/// or the new; once it is durable they are listed at the new path.
#[test]
fn a_durable_only_listing_leaves_out_a_rename_whose_completion_is_pending() {
    let mut h = Harness::new();
    let (x, y, z) = (
        h.run(plain_open("a")),
        h.run(plain_open("a")),
        h.run(plain_open("z")),
    );
    h.commit(true);
    let (x, _y, z) = (h.opened(x), h.opened(y), h.opened(z));
    let rename = h.run(recorded_rename(x, "x", 1));
    for id in h.commit_holding_intents(true) {
        h.engine.finish_parked(id);
    }
    assert!(h.fs.file("x").is_some(), "the rename is made");
    h.engine.flush();
    assert!(h.reply(rename).is_none(), "its completion is pending");
    let listed = h.run(durable_handles(None));
    h.engine
        .status_waits_due(mono_ms() + super::status_wait::STATUS_COMMIT_WAIT_MS);
    h.drain_replies();
    assert_eq!(durable_keys(&h, listed), [z], "the renamed file left out");
    h.commit(true);
    h.drain_replies();
    assert!(matches!(h.reply(rename), Some(Ok(Reply::Done))));
    let all = h.run(durable_handles(None));
    let Some(Ok(Reply::Handles {
        handles,
        commit_wait: None,
        ..
    })) = h.reply(all)
    else {
        panic!("{:?}", h.reply(all));
    };
    let paths: Vec<String> = handles
        .iter()
        .map(|v| v.record.path.as_str().to_owned())
        .collect();
    assert_eq!(paths.iter().filter(|p| *p == "x").count(), 2, "{paths:?}");
}

/// Re-review rr44f M2, now by waiting (re-review rr45c N1): a persistent
/// read-only overwrite parks on its intent with its handle in place. An
/// open that shares no writing, arriving before the truncation is made,
/// waits for it and is then granted beside the reader the overwrite is
/// once done, over the emptied file — as Windows serialises the
/// overwrite against other creates. Before rr44f, it was granted at once
/// beside a "reader" and the file emptied under it once the intent was
/// durable; after, refused as a sharing violation.
#[test]
fn an_open_beside_a_parked_read_only_truncation_waits_for_it() {
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on(fs);
    let bob = parked_truncation(&mut h, "bob", Rights::READ, Disposition::Overwrite, None);
    let alice = h.run(open("a", Rights::READ));
    assert!(h.reply(alice).is_none(), "alice waits for bob's truncation");
    h.commit(true);
    h.opened(bob);
    assert!(h.reply(alice).is_none(), "alice waits for bob's truncation");
    h.engine.process_retries();
    h.commit(true);
    h.opened(alice);
    assert!(
        matches!(h.reply(alice), Some(Ok(libfilter::proto::Reply::Opened(o))) if o.size == 0),
        "{:?}",
        h.reply(alice)
    );
    assert_eq!(
        h.fs.file("a").map(|f| f.size),
        Some(0),
        "bob's overwrite made"
    );
}

/// `client`'s persistent `disposition` (a truncating one) of "a" with
/// `access`, sharing all, under `lease` if any, parked on its intent (not
/// flushed to the committer yet): its request id.
fn parked_truncation(
    h: &mut Harness,
    client: &str,
    access: Rights,
    disposition: Disposition,
    lease: Option<(libfilter::lease::LeaseKey, &str)>,
) -> u64 {
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!("open() makes an open")
    };
    o.client = ClientId::new(client).unwrap();
    o.access = Access::new(access).unwrap();
    o.disposition = disposition;
    o.lease = lease.map(|(key, state)| LeaseRequest {
        key,
        state: libfilter::lease::LeaseState::parse(state).unwrap(),
        epoch: 0,
    });
    let id = h.run(Request::Open(o));
    h.engine.flush();
    assert!(h.reply(id).is_none(), "the truncation waits for its intent");
    id
}

/// Re-review rr45a F1: once its truncation is made, a read-only overwrite
/// or supersede holds the file with the access it asked for, as Windows
/// records it (FastFAT clears the access it added for the share check
/// before `IoCheckShareAccess` records the open) and Samba does: a later
/// reader sharing only reading (an overwrite's), or reading and writing
/// (a supersede's: no FILE_SHARE_DELETE, the common Windows share mode),
/// is granted — whether the truncation was made at once, once its intent
/// was durable, or by recovery after a crash (kill -9) between the two
/// (the handle then disconnected and persistent: no
/// `STATUS_FILE_NOT_AVAILABLE` either). Before, the implied access counted
/// for the handle's life and each was refused.
#[test]
fn a_completed_read_only_truncation_holds_the_file_as_a_reader() {
    for (d, share) in [
        (Disposition::Overwrite, Rights::READ),
        (Disposition::Supersede, Rights::READ.union(Rights::WRITE)),
    ] {
        for made in ["at once", "after its intent", "by recovery"] {
            let fs = MemFs::new();
            fs.put("a", 10);
            let mut h = Harness::on(fs);
            if made == "at once" {
                let bob = h.run(bobs("a", Rights::READ, d));
                h.commit(true);
                h.opened(bob);
            } else {
                let bob = parked_truncation(&mut h, "bob", Rights::READ, d, None);
                if made == "after its intent" {
                    h.commit(true);
                    h.opened(bob);
                } else {
                    // The intent is durable; filterd dies before it makes
                    // the truncation.
                    h.commit_holding_intents(true);
                    assert_eq!(h.fs.file("a").map(|f| f.size), Some(10));
                    h = h.restarted();
                }
            }
            assert_eq!(h.fs.file("a").map(|f| f.size), Some(0), "{d:?} {made}");
            let Request::Open(mut o) = open("a", share) else {
                unreachable!("open() makes an open")
            };
            o.access = Access::new(Rights::READ).unwrap();
            let alice = h.run(Request::Open(o));
            h.commit(true);
            assert!(
                matches!(h.reply(alice), Some(Ok(_))),
                "a reader sharing {share:?} after a read-only {d:?} made {made}: {:?}",
                h.reply(alice)
            );
        }
    }
}

/// `client`'s open of "a" for reading, sharing all, under a new lease key
/// asking RH, persistent (with a create GUID) or not: the request.
fn readers_leased_open(client: &str, persistent: bool) -> (Request, libfilter::lease::LeaseKey) {
    let key = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let rh = libfilter::lease::LeaseState::parse("RH").unwrap();
    let Request::Open(mut o) = leased_open(client, "a", key, rh, 0) else {
        unreachable!("leased_open() makes an open")
    };
    o.access = Access::new(Rights::READ).unwrap();
    if persistent {
        o.durability = Durability::Persistent { timeout_ms: 60_000 };
        o.create_guid = Some(CreateGuid(uuid::Uuid::new_v4()));
    }
    (Request::Open(o), key)
}

/// Whether request `first` was answered before request `then` (both
/// answered).
fn answered_before(h: &Harness, first: u64, then: u64) -> bool {
    let at = |id| h.arrived.iter().position(|a| *a == Arrived::Reply(id));
    matches!((at(first), at(then)), (Some(a), Some(b)) if a < b)
}

/// The handles of protocol client `client`.
fn handles_of<'a>(h: &'a Harness, client: &str) -> Vec<&'a Handle> {
    h.engine
        .handles
        .values()
        .filter(|x| x.rec.client.as_str() == client)
        .map(|x| &**x)
        .collect()
}

/// The size and lease (its state, "" for none) request `id`'s open was
/// answered with.
fn size_and_lease(h: &Harness, id: u64) -> (u64, String) {
    match h.reply(id) {
        Some(Ok(libfilter::proto::Reply::Opened(o))) => (
            o.size,
            o.lease.map(|l| l.state.to_string()).unwrap_or_default(),
        ),
        other => panic!("request {id} did not open: {other:?}"),
    }
}

/// Re-review rr45c N1 (and rr45a F2): an open of a file whose truncating
/// persistent open waits for its intent waits for the truncation, then
/// gets what an open made after it gets — size 0 and its lease (an
/// smbl/1 or SMB 2/3 RH lease; an nfsl/1 read delegation beside a
/// reader), with nothing to break once it is made, persistent or not.
/// Before, it was granted at once, told the old size; its lease was
/// broken only by the completion on the live path (rr45a F2's fix), and
/// never after a crash between the intent and the completion (below).
#[test]
fn an_open_beside_a_parked_truncation_waits_and_is_answered_as_after_it() {
    let rw = Rights::READ.union(Rights::WRITE);
    for protocol in [
        "smb",
        libfilter::lease::MSFSA_PROTOCOL,
        libfilter::lease::DELEGATION_PROTOCOL,
    ] {
        for bob_access in [Rights::READ, rw] {
            for persistent in [false, true] {
                let what = format!(
                    "{protocol} persistent {persistent} beside a parked {bob_access:?} overwrite"
                );
                // What carol gets when she opens after the truncation.
                let fs = MemFs::new();
                fs.put("a", 10);
                let mut after = Harness::on_as(fs, protocol);
                let bob =
                    parked_truncation(&mut after, "bob", bob_access, Disposition::Overwrite, None);
                after.commit(true);
                after.opened(bob);
                let carol = after.run(readers_leased_open("carol", persistent).0);
                after.commit(true);
                let expected = size_and_lease(&after, carol);
                assert_eq!(expected.0, 0, "{what}");
                // Carol opens while the truncation waits for its intent.
                let fs = MemFs::new();
                fs.put("a", 10);
                let mut h = Harness::on_as(fs, protocol);
                let bob =
                    parked_truncation(&mut h, "bob", bob_access, Disposition::Overwrite, None);
                let carol = h.run(readers_leased_open("carol", persistent).0);
                assert!(h.reply(carol).is_none(), "{what}: carol waits");
                h.commit(true);
                h.opened(bob);
                h.engine.process_retries();
                h.commit(true);
                assert_eq!(size_and_lease(&h, carol), expected, "{what}");
                let breaks = lease_breaks(&h);
                assert!(breaks.is_empty(), "{what}: {breaks:?}");
                assert!(
                    answered_before(&h, bob, carol),
                    "{what}: bob is answered first: {:?}",
                    h.arrived
                );
            }
        }
    }
}

/// Re-review rr45c N1: filterd dies (kill -9) between a truncating
/// persistent open's intent commit and its completion's — before the
/// truncation, after it, or as the completion's commit fails (filterd
/// stops for recovery) — while another client's persistent open asking
/// RH waits for that truncation: nothing of that open was stored, so
/// recovery, which finishes the truncation, leaves no lease caching
/// reads over the emptied file; the client's replay of the open gets
/// size 0 and RH, and no break is due. Before, the open was granted RH
/// beside the parked truncation and recorded with the intent: after the
/// restart its record still said RH over the 0-byte file, and no break
/// was ever sent.
#[test]
fn a_lease_beside_a_parked_truncation_caches_nothing_stale_after_a_crash() {
    for protocol in ["smb", libfilter::lease::MSFSA_PROTOCOL] {
        for when in [
            "before truncate",
            "after truncate",
            "completion commit fails",
        ] {
            let what = format!("{protocol}, killed {when}");
            let fs = MemFs::new();
            fs.put("a", 10);
            let mut h = Harness::on_as(fs, protocol);
            parked_truncation(&mut h, "bob", Rights::READ, Disposition::Overwrite, None);
            let (req, _) = readers_leased_open("carol", true);
            h.run(req.clone());
            let mut intents = h.commit_holding_intents(true);
            intents.extend(h.commit_holding_intents(true));
            if when != "before truncate" {
                for id in &intents {
                    h.engine.finish_parked(*id);
                }
                h.drain_replies();
            }
            if when == "completion commit fails" {
                let stopped =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.commit_once(false)));
                assert!(stopped.is_err(), "{what}: filterd stops for recovery");
                h.store.inner.lock().unwrap().fail = false;
            }
            assert!(lease_breaks(&h).is_empty(), "{what}");
            let mut h = h.restarted();
            assert_eq!(h.fs.file("a").map(|f| f.size), Some(0), "{what}");
            let carols: Vec<_> = handles_of(&h, "carol")
                .iter()
                .map(|x| x.rec.lease.map(|l| l.state.to_string()))
                .collect();
            assert!(carols.is_empty(), "{what}: carol's handles {carols:?}");
            let Request::Open(o) = req else {
                unreachable!("an open")
            };
            let again = h.run(Request::ReplayOpen(o));
            h.commit(true);
            assert_eq!(size_and_lease(&h, again), (0, "RH".to_owned()), "{what}");
            assert!(lease_breaks(&h).is_empty(), "{what}");
        }
    }
}

/// Re-review rr45c: a leased open waiting for a truncation whose intent's
/// commit fails, or whose truncate fails, runs once it is abandoned and
/// is granted over the file as it stayed (10 bytes), RH, nothing broken.
/// (Before, granted beside the parked truncation, it was refused with
/// the failed intent's commit, which it built on.)
#[test]
fn an_open_waiting_for_an_abandoned_truncation_sees_the_file_as_it_stayed() {
    for case in ["intent commit fails", "truncate fails"] {
        let fs = MemFs::new();
        fs.put("a", 10);
        let mut h = Harness::on_as(fs, "smb");
        let bob = parked_truncation(&mut h, "bob", Rights::READ, Disposition::Overwrite, None);
        let carol = h.run(readers_leased_open("carol", false).0);
        assert!(h.reply(carol).is_none(), "{case}: carol waits");
        if case == "truncate fails" {
            h.fs.fail_next("truncate", libc::EIO);
        }
        h.commit(case != "intent commit fails");
        h.refused(bob);
        h.engine.process_retries();
        h.commit(true);
        assert_eq!(size_and_lease(&h, carol), (10, "RH".to_owned()), "{case}");
        assert_eq!(h.fs.file("a").map(|f| f.size), Some(10), "{case}");
        assert!(lease_breaks(&h).is_empty(), "{case}");
    }
}

/// Re-review rr45c: two opens of one create GUID (a persistent open and
/// its client's replay of it) both waiting for a parked truncation are
/// answered in order once it is made: the first opens the file, the
/// replay gets that same handle; one handle, nothing opened twice.
#[test]
fn a_replay_of_an_open_waiting_for_a_truncation_gets_the_same_handle() {
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on_as(fs, "smb");
    let bob = parked_truncation(&mut h, "bob", Rights::READ, Disposition::Overwrite, None);
    let (req, _) = readers_leased_open("carol", true);
    let Request::Open(o) = req.clone() else {
        unreachable!("an open")
    };
    let first = h.run(req);
    let replay = h.run(Request::ReplayOpen(o));
    assert!(h.reply(first).is_none() && h.reply(replay).is_none());
    h.commit(true);
    h.opened(bob);
    h.engine.process_retries();
    h.commit(true);
    assert_eq!(h.opened(first), h.opened(replay));
    assert_eq!(size_and_lease(&h, first), (0, "RH".to_owned()));
    assert_eq!(handles_of(&h, "carol").len(), 1);
    assert!(answered_before(&h, first, replay), "{:?}", h.arrived);
}

/// Re-review rr45c: a truncating open's own lease key, held by an earlier
/// handle of its client, keeps its read caching when the truncation is
/// made (the client's own writes do not break its lease), under either
/// rule set.
#[test]
fn a_parked_truncation_breaks_not_its_own_lease_key() {
    for protocol in ["smb", libfilter::lease::MSFSA_PROTOCOL] {
        let fs = MemFs::new();
        fs.put("a", 10);
        let mut h = Harness::on_as(fs, protocol);
        let (first, key) = readers_leased_open("bob", false);
        let first = h.run(first);
        h.commit(true);
        h.opened(first);
        let bob = parked_truncation(
            &mut h,
            "bob",
            Rights::READ,
            Disposition::Overwrite,
            Some((key, "RH")),
        );
        h.commit(true);
        h.opened(bob);
        assert!(lease_breaks(&h).is_empty(), "{protocol}");
        assert_eq!(size_and_lease(&h, bob), (0, "RH".to_owned()), "{protocol}");
    }
}

/// Re-review rr45a F3 (with rr45c N1's waiting): a holder whose own
/// truncating open waits for its intent under an RH lease; an open that
/// shares no writing — which that holder, checked as a writer while it
/// waits, would refuse — waits for the truncation instead of breaking H,
/// and is then granted beside the reader the holder is once done, its
/// lease untouched, under either rule set.
#[test]
fn an_open_beside_a_parked_truncation_s_lease_waits_instead_of_breaking_it() {
    for protocol in [libfilter::lease::MSFSA_PROTOCOL, "smb"] {
        let fs = MemFs::new();
        fs.put("a", 10);
        let mut h = Harness::on_as(fs, protocol);
        let key = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
        let carol = parked_truncation(
            &mut h,
            "carol",
            Rights::READ,
            Disposition::Overwrite,
            Some((key, "RH")),
        );
        let Request::Open(mut o) = bobs("a", Rights::READ, Disposition::Open) else {
            unreachable!("bobs() makes an open")
        };
        o.share = Rights::READ;
        let bob = h.run(Request::Open(o));
        assert!(h.reply(bob).is_none(), "{protocol}: bob waits");
        h.commit(true);
        assert_eq!(
            h.lease_of(carol).map(|l| l.state.to_string()).as_deref(),
            Some("RH")
        );
        h.engine.process_retries();
        h.commit(true);
        h.opened(bob);
        let breaks = lease_breaks(&h);
        assert!(breaks.is_empty(), "{protocol}: {breaks:?}");
    }
}

/// Re-review rr44e R1: share modes are checked with the access a
/// truncation implies added (Windows: an overwrite asks for writing, a
/// supersede for deleting; here for writing too). A read-only overwrite
/// or supersede beside a holder that shares only reading is a sharing
/// violation and leaves the file as it was; before, it emptied the file a
/// deny-write open protects. A plain read-only open is still shared.
#[test]
fn a_read_only_truncation_is_refused_by_a_holder_that_shares_no_writing() {
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on(fs);
    let alice = h.run(open("a", Rights::READ));
    h.commit(true);
    h.opened(alice);
    for d in [
        Disposition::Overwrite,
        Disposition::OverwriteIf,
        Disposition::Supersede,
    ] {
        let bob = h.run(bobs("a", Rights::READ, d));
        h.commit(true);
        assert!(
            matches!(h.reply(bob), Some(Err(e)) if e.code == ErrorCode::SharingViolation),
            "a read-only {d:?}: {:?}",
            h.reply(bob)
        );
        assert_eq!(h.fs.file("a").map(|f| f.size), Some(10), "{d:?}");
    }
    let reader = h.run(bobs("a", Rights::READ, Disposition::Open));
    h.commit(true);
    h.opened(reader);
}

/// Attack44 F1: an open that truncates breaks read caching as a writer
/// does, whatever access it asked for — an R or RH lease (an smbl/1
/// lease, an nfsl/1 read delegation) loses R to a read-only overwrite
/// (Samba breaks with FILE_WRITE_DATA added to such an open's access).
/// Before, only its `access` counted: R stayed cached over an emptied
/// file, and a read delegation was not recalled.
#[test]
fn a_read_only_overwrite_breaks_read_caching() {
    let cases = [
        ("smb", "R", "", Disposition::Overwrite),
        ("smb", "RH", "H", Disposition::OverwriteIf),
        ("smb", "RWH", "H", Disposition::Supersede),
        (
            libfilter::lease::DELEGATION_PROTOCOL,
            "RH",
            "H",
            Disposition::Overwrite,
        ),
    ];
    for (protocol, held, to, disposition) in cases {
        let fs = MemFs::new();
        fs.put("a", 10);
        let mut h = Harness::on_as(fs, protocol);
        let key = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
        let state = libfilter::lease::LeaseState::parse(held).unwrap();
        let alice = h.run(leased_open("alice", "a", key, state, 0));
        h.commit(true);
        h.opened(alice);
        assert_eq!(h.lease_of(alice).map(|l| l.state), Some(state));
        h.run(bobs("a", Rights::READ, disposition));
        h.commit(true);
        let breaks = lease_breaks(&h);
        assert!(
            matches!(breaks.as_slice(), [(k, from, got, _)] if *k == key && from == held && got == to),
            "{protocol} {held} under a read-only {disposition:?}: {breaks:?}"
        );
    }
}

/// The views of attack45 F2 and the frontends' read-only requests, each
/// parked behind a commit that fails: an open of `a`'s file and a record
/// of session 1. Each is a request that changed nothing.
fn views_of(key: ResumeKey) -> Vec<Request> {
    vec![
        Request::Status,
        durable_handles(None),
        Request::Handles {
            after: None,
            durable_ok: false,
        },
        Request::Files {
            after: None,
            holders_after: None,
            durable_ok: true,
        },
        Request::Locks {
            after: None,
            locks_after: None,
            durable_ok: true,
        },
        Request::Frontends { durable_ok: false },
        Request::Handle {
            key,
            learning: false,
        },
        Request::LookupReply {
            scope: session(1),
            op_id: 1,
        },
        Request::ListRecords {
            scope: session(1),
            after: None,
        },
        Request::CheckIo {
            key,
            range: LockRange {
                offset: 0,
                length: 10,
            },
            write: false,
            own_protocol_advisory: false,
        },
    ]
}

/// attack45 F2: a request that changed nothing, parked behind a commit
/// that then fails, was refused with that commit's error (`DiskFull`
/// while the store was full): `filterctl status` and the listings exited
/// 1, and a frontend's view of a handle or check of a read failed for
/// another client's change. Each is answered from the state rolled back,
/// showing none of what failed; what did change something still fails.
#[test]
fn views_behind_a_failed_commit_are_answered_from_the_state_rolled_back() {
    let mut h = Harness::new();
    let a = h.run(open("a", Rights::ALL));
    h.commit(true);
    let ka = h.opened(a);
    // Pending, to fail: a second open of a's file, a record of session 1.
    let second = h.run(open("a", Rights::ALL));
    let recorded = h.run(Request::RecordReply {
        scope: session(1),
        op_id: 1,
        reply: "r".into(),
        keep: 3,
    });
    let views: Vec<u64> = views_of(ka).into_iter().map(|v| h.run(v)).collect();
    for id in &views {
        assert!(h.reply(*id).is_none(), "{id} waits for the commit it shows");
    }
    h.commit(false);
    assert_eq!(h.refused(second), ErrorCode::DiskFull);
    assert_eq!(h.refused(recorded), ErrorCode::DiskFull);
    for id in &views {
        assert!(
            matches!(h.reply(*id), Some(Ok(_))),
            "view {id}: {:?}",
            h.reply(*id)
        );
    }
    let [status, durable, complete, ..] = views[..] else {
        unreachable!()
    };
    let Some(Ok(Reply::Status(s))) = h.reply(status) else {
        unreachable!()
    };
    assert_eq!((s.handles_connected, s.commit_wait.is_none()), (1, true));
    for id in [durable, complete] {
        let Some(Ok(Reply::Handles { handles, .. })) = h.reply(id) else {
            panic!("{:?}", h.reply(id));
        };
        let keys: Vec<ResumeKey> = handles.iter().map(|v| v.record.key).collect();
        assert_eq!(keys, [ka], "the failed open is not listed");
    }
    assert!(
        matches!(
            h.reply(views[7]),
            Some(Ok(Reply::Recorded { record: None }))
        ),
        "the failed record is not found: {:?}",
        h.reply(views[7])
    );
    assert!(
        matches!(h.reply(views[8]), Some(Ok(Reply::Records { records, .. })) if records.is_empty()),
        "{:?}",
        h.reply(views[8])
    );
    // The read it let through is in flight (counted anew) until IoDone.
    let lock = h.run(lock_10(ka, 0));
    h.commit(true);
    assert!(
        matches!(h.reply(lock), Some(Ok(_))),
        "own lock over own read"
    );
    h.run(Request::IoDone { check: views[9] });
    assert_eq!(h.engine.views.len(), 0, "none kept once resolved");
}

/// a's open durable, and a create of n pending: its directory is
/// fsync'd before the commit, so a failed fsync fails it alone. Its id.
fn a_create_to_fail() -> (Harness, u64) {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let created = h.run(open("n", Rights::ALL));
    (h, created)
}

/// A view parked behind a commit that succeeds still showed an earlier
/// group of the same merged commit that failed (its fsync, here): it was
/// sent as it was, listing a handle the rollback took away. It is built
/// again too.
#[test]
fn a_view_behind_a_later_commit_does_not_show_an_earlier_failed_one() {
    // Then an open of b's existing file (no fsync: it commits).
    let (mut h, created) = a_create_to_fail();
    let opened = h.run(open("b", Rights::ALL));
    let status = h.run(Request::Status);
    assert!(h.reply(status).is_none());
    h.fs.fail_next("fsync", libc::EIO);
    h.commit_once(true);
    assert!(
        matches!(h.reply(created), Some(Err(_))),
        "{:?}",
        h.reply(created)
    );
    h.opened(opened);
    let Some(Ok(Reply::Status(s))) = h.reply(status) else {
        panic!("{:?}", h.reply(status));
    };
    assert_eq!(s.handles_connected, 2, "a and b, not the failed n");
}

/// A `CheckIo` whose frontend gave up waiting (its `IoDone` came while
/// the answer was parked) is not run again when the commit fails: no
/// second `IoDone` would end the I/O it counted.
#[test]
fn a_check_given_up_on_is_not_run_again() {
    let mut h = Harness::new();
    let (ka, kb) = two_handles_of_a(&mut h);
    h.run(lock_10(ka, 100));
    let w = h.run(write_check_10(kb, 0));
    assert_eq!(h.engine.views.len(), 1, "the check is parked");
    h.run(Request::IoDone { check: w });
    assert_eq!(h.engine.views.len(), 0, "forgotten once given up on");
    h.commit(false);
    assert!(matches!(h.reply(w), Some(Err(_))), "{:?}", h.reply(w));
    let x = h.run(lock_10(ka, 5));
    h.commit(true);
    assert!(matches!(h.reply(x), Some(Ok(_))), "{:?}", h.reply(x));
}

/// Re-review rr45c N1, for an end of file set through a persistent
/// handle (bracketed by an intent as a truncating open is): a leased open
/// of the file while that change waits for its intent waits for it, and
/// is then answered with the new size and RH, nothing to break. Before,
/// it was granted RH at once, told the old size, and the change (whose
/// breaks were made before its intent) broke nothing once made.
#[test]
fn an_open_beside_an_end_of_file_waiting_for_its_intent_waits_for_it() {
    let fs = MemFs::new();
    fs.put("a", 10);
    let mut h = Harness::on(fs);
    let alice = h.run(open("a", Rights::ALL));
    h.commit(true);
    let alice = h.opened(alice);
    let set = h.run(Request::SetEndOfFile {
        key: alice,
        size: 3,
        record: None,
    });
    h.engine.flush();
    assert!(h.reply(set).is_none(), "the change waits for its intent");
    let carol = h.run(readers_leased_open("carol", false).0);
    assert!(h.reply(carol).is_none(), "carol waits");
    h.commit(true);
    assert!(matches!(h.reply(set), Some(Ok(_))), "{:?}", h.reply(set));
    h.engine.process_retries();
    h.commit(true);
    assert_eq!(size_and_lease(&h, carol), (3, "RH".to_owned()));
    assert!(lease_breaks(&h).is_empty(), "{:?}", lease_breaks(&h));
}

/// Re-review rr45g F1: a status answered from durable state past its
/// bound was still kept to run again, so while a commit stalled a client
/// looping `status` grew the kept views without bound, and every `IoDone`
/// and flush scanned them all. Answered by its bound, a view is forgotten.
#[test]
fn views_answered_by_their_bound_are_not_kept() {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let ob = h.run(open("b", Rights::ALL));
    h.engine.flush();
    assert!(h.reply(ob).is_none(), "b's open is pending");
    let bound = super::status_wait::STATUS_COMMIT_WAIT_MS;
    for round in 0..5 {
        let ids: Vec<u64> = (0..100).map(|_| h.run(Request::Status)).collect();
        assert_eq!(h.engine.views.len(), 100, "round {round}: parked");
        h.engine.status_waits_due(mono_ms() + bound);
        h.drain_replies();
        h.engine.flush();
        for id in ids {
            assert!(
                matches!(h.reply(id), Some(Ok(Reply::Status(_)))),
                "round {round}: {:?}",
                h.reply(id)
            );
        }
        assert_eq!(h.engine.views.len(), 0, "round {round}: none kept");
    }
    h.commit(true);
    h.opened(ob);
}

/// Records reply "r" of op 1 in session 1 (3 kept); the request's id.
fn record_op_1_of_session_1(h: &mut Harness) -> u64 {
    h.run(Request::RecordReply {
        scope: session(1),
        op_id: 1,
        reply: "r".into(),
        keep: 3,
    })
}

/// Asserts that `LookupReply` `lookup` found its record.
fn found_record(h: &Harness, lookup: u64) {
    assert!(
        matches!(
            h.reply(lookup),
            Some(Ok(Reply::Recorded { record: Some(_) }))
        ),
        "{:?}",
        h.reply(lookup)
    );
}

/// Re-review rr45g F3: a view of one scope parked behind a commit of its
/// scope that stands, above an earlier group that failed, showed nothing
/// rolled back, yet was run again, and its replay counted twice (the first
/// count stands with its sequence). It is run again only when its own
/// sequence is abandoned.
#[test]
fn a_scoped_view_behind_a_commit_that_stands_is_not_run_again() {
    // Then a record of session 1 (it commits).
    let (mut h, created) = a_create_to_fail();
    let recorded = record_op_1_of_session_1(&mut h);
    let lookup = h.run(Request::LookupReply {
        scope: session(1),
        op_id: 1,
    });
    assert!(h.reply(lookup).is_none(), "waits for the record");
    assert_eq!(h.engine.stats.replays_detected, 1);
    h.fs.fail_next("fsync", libc::EIO);
    h.commit_once(true);
    assert!(matches!(h.reply(created), Some(Err(_))));
    h.commit(true);
    h.answered(recorded);
    found_record(&h, lookup);
    assert_eq!(h.engine.stats.replays_detected, 1, "counted once");
    assert_eq!(h.engine.views.len(), 0);
}

/// attack45b N2: under a load that always has a commit pending (a slow
/// disk, creates always in flight), `status` past its bound shows counts
/// taken while commits were pending once those commits resolved — not
/// the counts of the last moment nothing was pending, which never came
/// again (it showed counts 20 s old, without a handle acknowledged
/// since). Counts taken before a commit that then fails are dropped, not
/// shown.
#[test]
fn status_counts_refresh_under_a_load_that_never_stops() {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let first = h.run(Request::Status);
    assert!(
        h.reply(first).is_some(),
        "nothing pending: answered at once"
    );
    let connected = |h: &mut Harness, at: u64| {
        let id = h.run(Request::Status);
        h.engine.status_waits_due(at);
        h.drain_replies();
        match h.reply(id) {
            Some(Ok(Reply::Status(s))) => s.handles_connected,
            other => panic!("{other:?}"),
        }
    };
    b_durable_and_c_always_pending(&mut h);
    assert_eq!(connected(&mut h, later(4)), 2, "a and b are durable");
    // Counts taken with x pending, then x's commit fails: not shown.
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    h.run(Request::Status);
    h.run(open("x", Rights::ALL));
    h.engine.flush();
    h.engine.note_durable_counts(later(1), false);
    let through = h.roll_back_flushed();
    h.run(open("y", Rights::ALL));
    h.settle_failure(through);
    h.engine.flush();
    h.engine.note_durable_counts(later(2), false);
    assert_eq!(connected(&mut h, later(4)), 1, "only a is durable");
}

/// `n` bounds of a status wait from now (monotonic ms).
fn later(n: u64) -> u64 {
    mono_ms() + n * super::status_wait::STATUS_COMMIT_WAIT_MS
}

/// A load that always has a commit pending: b pending, the durable counts
/// are taken at a round's end (with b, [`later`] 1), then c is given out
/// and b alone resolves (at `later(2)`): c is always pending.
fn b_durable_and_c_always_pending(h: &mut Harness) {
    h.run(open("b", Rights::ALL));
    h.engine.flush();
    h.engine.note_durable_counts(later(1), false);
    h.run(open("c", Rights::ALL));
    h.engine.flush();
    h.commit_first_job_only();
    h.engine.note_durable_counts(later(2), false);
}

/// Under a load that always has a commit pending, `frontends` past its
/// bound answers with the rows taken with `status`'s durable counts once
/// the commits given out when they were taken resolved, and says how old
/// they are (`commit_wait`); before, it was refused `Busy` every time, as
/// `status` once showed counts 20 s old (attack45b N2). A store stalled
/// since the first `frontends` has no such rows: refused, saying why.
#[test]
fn frontends_answers_under_a_load_that_never_stops() {
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    let first = h.run(Request::Frontends { durable_ok: true });
    assert!(
        matches!(
            h.reply(first),
            Some(Ok(Reply::Frontends {
                commit_wait: None,
                ..
            }))
        ),
        "nothing pending: answered at once, of now: {:?}",
        h.reply(first)
    );
    let frontends = |h: &mut Harness, at: u64| {
        let id = h.run(Request::Frontends { durable_ok: true });
        h.engine.status_waits_due(at);
        h.drain_replies();
        h.reply(id).cloned()
    };
    b_durable_and_c_always_pending(&mut h);
    let past = frontends(&mut h, later(4));
    let Some(Ok(Reply::Frontends {
        frontends: rows,
        commit_wait: Some(w),
        ..
    })) = past.clone()
    else {
        panic!("frontends past its bound: {past:?}");
    };
    let stored: u64 = rows.iter().filter_map(|f| f.stored_handles).sum();
    let attached: u64 = rows.iter().map(|f| f.handles).sum();
    assert_eq!((stored, attached), (2, 2), "a and b are durable: {rows:?}");
    assert!(
        w.waited_ms >= super::status_wait::STATUS_COMMIT_WAIT_MS
            && w.replies_awaiting_commit >= 1
            && w.counts_age_ms >= Some(2 * super::status_wait::STATUS_COMMIT_WAIT_MS),
        "says how old the rows are: {w:?}"
    );
    // Re-review rr47a F2: a caller that did not ask with `durable_ok` (an
    // older filterctl, a library caller) reads no `commit_wait`: refused,
    // as before, never given the older rows unmarked.
    let id = h.run(Request::Frontends { durable_ok: false });
    h.engine.status_waits_due(later(5));
    h.drain_replies();
    match h.reply(id) {
        Some(Err(e)) if e.code == ErrorCode::Busy && e.message.contains("durable_ok") => {}
        other => panic!("frontends without durable_ok past its bound: {other:?}"),
    }
    // Stalled since the first `frontends`: no durable rows to answer with.
    let mut h = Harness::new();
    h.run(open("a", Rights::ALL));
    h.commit(true);
    h.run(open("b", Rights::ALL));
    h.engine.flush();
    match frontends(&mut h, later(4)) {
        Some(Err(e)) if e.code == ErrorCode::Busy && e.message.contains("durable state") => {}
        other => panic!("frontends of a store stalled since it was asked: {other:?}"),
    }
}

/// Fails the first group flushed to the committer (as a failed fsync of
/// its create fails it) and commits the others alone, as `retry_alone`
/// does; the engine rolls back, and the failure is not yet settled: the
/// replies of the groups that committed are not sent. `through`.
fn roll_back_first_of_flushed(h: &mut Harness) -> u64 {
    h.engine.flush();
    let groups: Vec<crate::committer::Group> = h
        .pipe
        .take_jobs()
        .into_iter()
        .flat_map(|j| j.groups)
        .collect();
    let (Some(first), Some(through)) = (groups.first(), groups.last()) else {
        panic!("no group flushed");
    };
    let (failed, through) = (first.seq, through.seq);
    let kept: Vec<&[StoreOp]> = groups
        .iter()
        .filter(|g| g.seq != failed)
        .map(|g| g.ops.as_slice())
        .collect();
    h.store.commit(&kept).expect("the groups that did not fail");
    h.engine
        .roll_back(&[failed], through, ErrorCode::DiskFull, "test");
    through
}

/// Re-review rr45g F4: after a commit failed in part, the rollback
/// forgot which pending groups last changed each file and scope but for
/// those above the failure. A request that showed a file or scope a group
/// that committed alone had changed (a view run again, or a new one
/// arriving before the committer settled the failure) was answered at
/// once, before the reply of that group's own request. It waits for it.
#[test]
fn a_view_after_a_failure_goes_behind_the_reply_of_what_it_shows() {
    // b's open and a record of session 1 commit alone; the create fails.
    let (mut h, created) = a_create_to_fail();
    let opened = h.run(open("b", Rights::ALL));
    let recorded = record_op_1_of_session_1(&mut h);
    let through = roll_back_first_of_flushed(&mut h);
    let kb = h
        .engine
        .handles
        .values()
        .find(|x| x.rec.path.as_str() == "b")
        .map(|x| x.rec.key)
        .expect("b's handle");
    let view = h.run(Request::Handle {
        key: kb,
        learning: false,
    });
    let lookup = h.run(Request::LookupReply {
        scope: session(1),
        op_id: 1,
    });
    assert!(h.reply(view).is_none(), "b's handle waits for b's open");
    assert!(h.reply(lookup).is_none(), "the record waits for its own");
    h.settle_failure(through);
    assert!(matches!(h.reply(created), Some(Err(_))));
    assert_eq!(h.opened(opened), kb);
    assert!(answered_before(&h, opened, view), "{:?}", h.arrived);
    assert!(answered_before(&h, recorded, lookup), "{:?}", h.arrived);
    found_record(&h, lookup);
}

/// Re-review rr45g F2: a view run again after a failed commit was parked
/// again behind the next pending one, and run again each time that
/// failed: while commits kept failing, a complete listing was never
/// answered, and every failure ran every such view again. Run again once,
/// a view whose commit fails again while others are still pending is
/// answered without waiting: a status or `durable_ok` listing from what
/// is durable (as past its bound), and a `frontends` so once its rows
/// were taken with the durable counts (asked before, with nothing
/// pending); any other refused `Busy`, saying why.
#[test]
fn a_view_run_again_is_not_run_again_while_commits_keep_failing() {
    for asked_before in [false, true] {
        let mut h = Harness::new();
        h.run(open("a", Rights::ALL));
        h.commit(true);
        if asked_before {
            h.run(Request::Frontends { durable_ok: true });
        }
        view_run_again_while_commits_keep_failing(h, asked_before);
    }
}

/// [`a_view_run_again_is_not_run_again_while_commits_keep_failing`]
/// after "a" is open, `frontends` asked before or not.
fn view_run_again_while_commits_keep_failing(mut h: Harness, frontends_asked_before: bool) {
    // b's open to fail first; then c's, pending behind it, to fail next.
    h.run(open("b", Rights::ALL));
    let views = [
        Request::Status,
        durable_handles(None),
        Request::Handles {
            after: None,
            durable_ok: false,
        },
        Request::Frontends { durable_ok: true },
    ]
    .map(|v| h.run(v));
    h.engine.flush();
    h.run(open("c", Rights::ALL));
    let through = h.roll_back_queued();
    h.settle_failure(through);
    for id in views {
        assert!(h.reply(id).is_none(), "{id} is run again, behind c's open");
    }
    assert_eq!(h.engine.views.len(), views.len());
    // c's open fails too, with a's second open pending behind it.
    h.engine.flush();
    let again = h.run(open("a", Rights::ALL));
    let through = h.roll_back_queued();
    h.settle_failure(through);
    let [status, durable, complete, frontends] = views;
    let Some(Ok(Reply::Status(s))) = h.reply(status) else {
        panic!("{:?}", h.reply(status));
    };
    assert!(s.commit_wait.is_some(), "from what is durable: {s:?}");
    assert!(
        matches!(
            h.reply(durable),
            Some(Ok(Reply::Handles {
                commit_wait: Some(_),
                ..
            }))
        ),
        "{:?}",
        h.reply(durable)
    );
    if frontends_asked_before {
        let Some(Ok(Reply::Frontends {
            frontends: rows,
            commit_wait: Some(_),
            ..
        })) = h.reply(frontends)
        else {
            panic!("{:?}", h.reply(frontends));
        };
        // Re-review rr47a F3: the rows as durable, none of the pending
        // state (a's second open) nor of what failed (b, c).
        let stored: u64 = rows.iter().filter_map(|f| f.stored_handles).sum();
        let attached: u64 = rows.iter().map(|f| f.handles).sum();
        assert_eq!((stored, attached), (1, 1), "a alone is durable: {rows:?}");
    } else {
        assert_eq!(h.refused(frontends), ErrorCode::Busy);
    }
    assert_eq!(h.refused(complete), ErrorCode::Busy);
    let Some(Err(e)) = h.reply(complete) else {
        unreachable!()
    };
    assert!(e.message.contains("failed twice"), "{}", e.message);
    assert_eq!(h.engine.views.len(), 0, "none kept");
    h.commit(true);
    h.opened(again);
}

/// Re-review rr48e F6: a reply waiting for its commit held a duplicate of
/// the handle's descriptor, and when the duplicate could not be made
/// (EMFILE) the reply went out as `Opened` without it, the handle left
/// attached. Now it shares the handle's own descriptor: there is nothing
/// to fail, and no descriptor is taken from filterd's table for it.
#[test]
fn a_reply_waiting_for_its_commit_shares_the_handles_descriptor() {
    let mut h = Harness::new();
    let id = h.run(open("a", Rights::ALL));
    assert!(h.reply(id).is_none(), "waits for its commit");
    let fd = h
        .engine
        .handles
        .values()
        .find_map(|x| x.fd.clone())
        .expect("a's descriptor");
    assert_eq!(
        Arc::strong_count(&fd),
        3,
        "the handle's, the waiting reply's and this test's"
    );
    h.commit(true);
    h.opened(id);
    assert_eq!(
        Arc::strong_count(&fd),
        2,
        "sent: the handle's and this test's"
    );
}

/// Review rr48c M4: one user saying hello on every connection slot kept
/// every frontend and filterctl out. Now a user holds at most three
/// quarters of `--max-connections`; another user is let in past that.
#[test]
fn one_user_holds_at_most_three_quarters_of_the_connections() {
    let mut h = Harness::new();
    let control = |uid: u32| {
        (
            Hello {
                version: libfilter::proto::PROTO_VERSION,
                features: 0,
                role: Role::Control,
            },
            Peer {
                pid: 9,
                uid,
                gid: 0,
            },
            ConnWriter::pair_for_test(),
        )
    };
    // max_connections 10: eight for one user.
    for i in 0..8 {
        let (hello, peer, (w, _peer)) = control(65534);
        h.engine
            .on_hello(ConnId(100 + i), hello, peer, w)
            .expect("within the user's part");
    }
    let (hello, peer, (w, _peer)) = control(65534);
    let e = h.engine.on_hello(ConnId(200), hello, peer, w).unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitReached, "{}", e.message);
    assert!(e.message.contains("user 65534 holds 8"), "{}", e.message);
    // The harness's frontend is user 0's; another of user 0 gets in.
    let (hello, peer, (w, _peer)) = control(0);
    h.engine
        .on_hello(ConnId(201), hello, peer, w)
        .expect("another user is let in");
}

/// What each user's handles count as, counted afresh from the handle
/// table (what `Engine::handle_shares` must always hold).
fn shares_recounted(e: &Engine) -> Vec<(u32, usize)> {
    let mut by: BTreeMap<u32, usize> = BTreeMap::new();
    for hd in e.handles.values() {
        if let Some(uid) = hd.uid {
            *by.entry(uid).or_default() += super::handle_shares::weight(hd);
        }
    }
    by.into_iter().collect()
}

/// A durable open of "a" (sharing everything) by a client of its own,
/// with a create GUID of its own: what attack49 F2's hoarder sent.
fn hoarders_open(n: usize) -> Request {
    let Request::Open(mut o) = open("a", Rights::ALL) else {
        unreachable!()
    };
    o.client = ClientId::new(format!("hoard-{n}")).unwrap();
    o.durability = Durability::Durable { timeout_ms: 60_000 };
    Request::Open(o)
}

impl Harness {
    /// A frontend of user `uid` says hello as `instance` on connection
    /// `conn`, and the harness's requests go there from now on; what they
    /// went to before is returned ([`Harness::use_conn`] goes back).
    fn connect_as(
        &mut self,
        conn: u64,
        instance: &str,
        uid: u32,
    ) -> (ConnId, Arc<ConnWriter>, OwnedFd) {
        let (writer, peer) = ConnWriter::pair_for_test();
        self.engine
            .on_hello(
                ConnId(conn),
                Hello {
                    version: libfilter::proto::PROTO_VERSION,
                    features: 0,
                    role: Role::Frontend {
                        protocol: Protocol::new("smb").unwrap(),
                        instance: InstanceName::new(instance).unwrap(),
                        incarnation: None,
                    },
                },
                Peer {
                    pid: 1,
                    uid,
                    gid: 0,
                },
                writer.clone(),
            )
            .unwrap();
        self.use_conn((ConnId(conn), writer, peer))
    }

    /// Requests go to connection `to` from now on; the one before is
    /// returned.
    fn use_conn(
        &mut self,
        to: (ConnId, Arc<ConnWriter>, OwnedFd),
    ) -> (ConnId, Arc<ConnWriter>, OwnedFd) {
        self.drain_replies();
        (
            std::mem::replace(&mut self.conn, to.0),
            std::mem::replace(&mut self.writer, to.1),
            std::mem::replace(&mut self.peer, to.2),
        )
    }

    /// Handle descriptors counted against `uid`.
    fn held_by(&self, uid: u32) -> usize {
        self.engine.handle_shares.held(uid)
    }
}

/// attack49 F2: one user opening durable handles under a new client id
/// each time took every descriptor filterd had. Now its opens are refused
/// once its handles count as three quarters of the handles' room, while
/// another user's still open; its disconnected handles count until they
/// expire, and an expiry gives room back.
#[test]
fn a_user_holding_its_share_of_the_handles_room_is_refused_while_another_opens() {
    let mut h = Harness::new();
    // 40 descriptors for handles: 30 for one user, 30 handles without
    // locks.
    h.engine.handle_shares = super::handle_shares::Shares::new(40, Vec::new());
    let honest = h.connect_as(20, "evil", 1001);
    let mut keys = Vec::new();
    for n in 0..30 {
        let id = h.run(hoarders_open(n));
        h.commit(true);
        keys.push(h.opened(id));
    }
    assert_eq!(h.held_by(1001), 30);
    let id = h.run(hoarders_open(30));
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::LimitReached);
    let Some(Err(e)) = h.reply(id) else {
        unreachable!()
    };
    assert!(e.message.contains("user 1001"), "{}", e.message);
    assert_eq!(h.engine.stats.opens_refused_share, 1);
    assert_eq!(h.held_by(1001), 30, "a refused open counts nothing");
    // Another user (the harness's frontend, uid 0, not exempt here)
    // still opens.
    let evil = h.use_conn(honest);
    let id = h.run(open("b", Rights::ALL));
    h.commit(true);
    let b = h.opened(id);
    assert_eq!(h.held_by(0), 1);
    // The hoarder's connection goes: its durable handles stay, and
    // still count; from a new connection it is still refused.
    h.engine.begin_request();
    h.engine.on_closed(evil.0);
    drop(evil);
    assert!(keys.iter().all(|k| h.engine.handles.contains_key(k)));
    assert_eq!(h.held_by(1001), 30);
    let honest = h.connect_as(21, "evil2", 1001);
    let id = h.run(hoarders_open(31));
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::LimitReached);
    assert_eq!(h.engine.stats.opens_refused_share, 2);
    // One expires: room for one more.
    h.engine.begin_request();
    h.engine.expire(keys[0]);
    h.commit(true);
    assert_eq!(h.held_by(1001), 29);
    let id = h.run(hoarders_open(32));
    h.commit(true);
    h.opened(id);
    assert_eq!(h.held_by(1001), 30);
    // A close gives back what the handle counted.
    let _ = h.use_conn(honest);
    h.run(Request::Close {
        key: b,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    h.commit(true);
    assert_eq!(h.held_by(0), 0);
    assert_eq!(
        h.engine.handle_shares.holders(),
        shares_recounted(&h.engine)
    );
}

/// Root and filterd's own user (the exempt ones) are never refused for
/// their share.
#[test]
fn an_exempt_user_is_never_refused_for_its_share() {
    let mut h = Harness::new();
    h.engine.handle_shares = super::handle_shares::Shares::new(8, vec![0]);
    for n in 0..10 {
        let id = h.run(hoarders_open(n));
        h.commit(true);
        h.opened(id);
    }
    assert_eq!(h.held_by(0), 10);
    assert_eq!(h.engine.stats.opens_refused_share, 0);
}

/// Never reply before durability; a failed commit undoes everything: a
/// persistent open whose commit fails gives back its count, and a close
/// whose commit fails takes it again (the handle is put back).
#[test]
fn a_failed_commit_leaves_the_handle_counts_as_they_were() {
    let mut h = Harness::new();
    h.engine.handle_shares = super::handle_shares::Shares::new(40, Vec::new());
    let _ = h.connect_as(20, "evil", 1001);
    let id = h.run(open("a", Rights::ALL));
    assert_eq!(h.held_by(1001), 1, "counted while it commits");
    h.commit(false);
    assert!(matches!(h.reply(id), Some(Err(_))));
    assert_eq!(h.held_by(1001), 0, "given back with the open");
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    h.run(Request::Close {
        key,
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    assert_eq!(h.held_by(1001), 0);
    h.commit(false);
    assert!(h.engine.handles.contains_key(&key), "the close is undone");
    assert_eq!(h.held_by(1001), 1, "and its count with it");
    assert_eq!(
        h.engine.handle_shares.holders(),
        shares_recounted(&h.engine)
    );
}

/// A handle counts against the user that attached it last: taken over
/// by a frontend of another user, it moves to that user. A recovered
/// handle counts against nobody until resumed, and its resume (which
/// takes a descriptor) is never refused for the share, even to a user
/// holding its share: it counts against that user, whose next open is
/// refused instead.
#[test]
fn a_handle_counts_against_the_user_that_attached_it_last() {
    let mut h = Harness::new();
    h.engine.handle_shares = super::handle_shares::Shares::new(40, Vec::new());
    // Opened by the harness's frontend (uid 0, instance smb-t).
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    assert_eq!(h.held_by(0), 1);
    // Its frontend goes; a replacement of user 1001 takes over.
    h.engine.begin_request();
    let gone = h.conn;
    h.engine.on_closed(gone);
    assert_eq!(h.held_by(0), 1, "a disconnected handle still counts");
    let _ = h.connect_as(30, "smb-t", 1001);
    let r = resume_alices_as(&mut h, key, false);
    assert_eq!(h.opened(r), key);
    assert_eq!((h.held_by(0), h.held_by(1001)), (0, 1));

    // After a restart, nobody.
    let mut h = h.restarted();
    h.engine.handle_shares = super::handle_shares::Shares::new(40, Vec::new());
    assert!(h.engine.handles.contains_key(&key));
    assert!(h.engine.handle_shares.holders().is_empty());
    // A user at its share still resumes it (review rr50a L1: refused,
    // a connected client lost its open after a restart), and it counts
    // against that user, whose next open is refused instead.
    h.engine.begin_request();
    let c = h.conn;
    h.engine.on_closed(c);
    let _ = h.connect_as(40, "smb-t", 1001);
    for n in 0..30 {
        let id = h.run(hoarders_open(n));
        h.commit(true);
        h.opened(id);
    }
    let r = resume_alices_as(&mut h, key, false);
    assert_eq!(h.opened(r), key);
    assert!(h.engine.handles[&key].fd.is_some());
    assert_eq!(h.held_by(1001), 31);
    let id = h.run(hoarders_open(30));
    h.commit(true);
    assert_eq!(h.refused(id), ErrorCode::LimitReached);
    assert_eq!(
        h.engine.handle_shares.holders(),
        shares_recounted(&h.engine)
    );
}

/// A resume by another user whose commit fails leaves the handle counting
/// against the user it counted against before.
#[test]
fn a_failed_resume_by_another_user_gives_the_handle_back_to_the_first() {
    let mut h = Harness::new();
    h.engine.handle_shares = super::handle_shares::Shares::new(40, Vec::new());
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let key = h.opened(id);
    h.engine.begin_request();
    let gone = h.conn;
    h.engine.on_closed(gone);
    h.commit(true);
    let _ = h.connect_as(30, "smb-t", 1001);
    let r = h.run(resume_of("alice", key, false));
    assert_eq!((h.held_by(0), h.held_by(1001)), (0, 1));
    h.commit(false);
    assert!(matches!(h.reply(r), Some(Err(_))), "{:?}", h.reply(r));
    assert_eq!((h.held_by(0), h.held_by(1001)), (1, 0));
    assert_eq!(
        h.engine.handle_shares.holders(),
        shares_recounted(&h.engine)
    );
}

/// Review rr50a M1: a handle counts what it holds — one descriptor, and
/// one more only while its byte-range locks' descriptor is open. A lock
/// whose descriptor would take its user past its share is refused
/// (`LimitReached`) and changes nothing; once the user holds less, it is
/// granted.
#[test]
fn a_handle_counts_its_lock_descriptor_only_while_it_is_open() {
    let mut h = Harness::new();
    h.engine.handle_shares = super::handle_shares::Shares::new(40, Vec::new());
    let _ = h.connect_as(20, "evil", 1001);
    let id = h.run(open("a", Rights::ALL));
    h.commit(true);
    let a = h.opened(id);
    assert_eq!(h.held_by(1001), 1);
    let l = h.run(lock_byte_8(a, false));
    h.commit(true);
    assert!(matches!(h.reply(l), Some(Ok(_))), "{:?}", h.reply(l));
    assert_eq!(h.held_by(1001), 2, "its lock descriptor counts");
    let u = h.run(lock_byte_8(a, true));
    h.commit(true);
    assert!(matches!(h.reply(u), Some(Ok(_))), "{:?}", h.reply(u));
    assert!(h.engine.handles[&a].lock_fd.is_none());
    assert_eq!(h.held_by(1001), 1, "closed, it counts no more");
    let mut keys = Vec::new();
    for n in 0..29 {
        let id = h.run(hoarders_open(n));
        h.commit(true);
        keys.push(h.opened(id));
    }
    assert_eq!(h.held_by(1001), 30, "at its share: 30 handles, no locks");
    let l = h.run(lock_byte_8(a, false));
    h.commit(true);
    assert_eq!(h.refused(l), ErrorCode::LimitReached);
    let Some(Err(e)) = h.reply(l) else {
        unreachable!()
    };
    assert!(e.message.contains("share-exempt-uid"), "{}", e.message);
    let file = h.engine.handles[&a].rec.file;
    assert!(
        h.engine.locks.get(&file).is_none_or(|t| t.is_empty()),
        "no lock taken"
    );
    assert!(h.engine.handles[&a].rec.locks.is_empty());
    assert!(h.engine.handles[&a].lock_fd.is_none());
    assert_eq!(h.held_by(1001), 30, "nothing counted");
    // One handle goes: the lock is granted.
    h.run(Request::Close {
        key: keys[0],
        put: vec![],
        delete: vec![],
        delete_on_close: None,
    });
    h.commit(true);
    let l = h.run(lock_byte_8(a, false));
    h.commit(true);
    assert!(matches!(h.reply(l), Some(Ok(_))), "{:?}", h.reply(l));
    assert_eq!(h.held_by(1001), 30);
    assert_eq!(
        h.engine.handle_shares.holders(),
        shares_recounted(&h.engine)
    );
}

/// Review rr50a L4: a user holding its share still resumes its own
/// disconnected handle, and a replayed create of it gets the original
/// handle (not `LimitReached`) — before a restart (the handle holds its
/// descriptor) and after one (recovered, it takes one: rr50a L1).
#[test]
fn a_user_at_its_share_resumes_and_replays_its_own_handles() {
    let mut h = Harness::new();
    h.engine.handle_shares = super::handle_shares::Shares::new(40, Vec::new());
    let _ = h.connect_as(20, "smb-u", 1001);
    let req = open("a", Rights::ALL);
    let Request::Open(o) = req.clone() else {
        unreachable!()
    };
    let id = h.run(req);
    h.commit(true);
    let key = h.opened(id);
    for n in 0..29 {
        let id = h.run(hoarders_open(n));
        h.commit(true);
        h.opened(id);
    }
    assert_eq!(h.held_by(1001), 30, "at its share");
    let at_share = |h: &mut Harness, conn: u64| {
        h.engine.begin_request();
        let c = h.conn;
        h.engine.on_closed(c);
        h.commit(true);
        let _ = h.connect_as(conn, "smb-u", 1001);
    };
    // Its frontend reconnects and resumes the handle.
    at_share(&mut h, 21);
    let r = resume_alices_as(&mut h, key, true);
    assert_eq!(h.opened(r), key);
    // A replayed create of it.
    at_share(&mut h, 22);
    let r = h.run(Request::ReplayOpen(o.clone()));
    h.commit(true);
    assert_eq!(h.opened(r), key, "the original handle");
    assert_eq!(h.held_by(1001), 30);
    // After a restart (the durable handles are gone, the persistent one
    // recovered, counting against nobody) the user fills its share
    // again; a replayed create of the recovered handle is still
    // answered with it. It then holds 31 against a share of 30: this is
    // the documented gap (review rr50b M1; README, ARCHITECTURE "Handle
    // descriptors by user"): across a restart one uid may hold its share
    // plus what it held before, as no uid is stored in the handle's
    // record. The remedy left is to store it; this assert then changes.
    let mut h = h.restarted();
    h.engine.handle_shares = super::handle_shares::Shares::new(40, Vec::new());
    assert!(h.engine.handles[&key].fd.is_none(), "recovered");
    h.engine.begin_request();
    let c = h.conn;
    h.engine.on_closed(c);
    let _ = h.connect_as(30, "smb-u", 1001);
    for n in 0..30 {
        let id = h.run(hoarders_open(100 + n));
        h.commit(true);
        h.opened(id);
    }
    assert_eq!(h.held_by(1001), 30, "at its share again");
    let r = h.run(Request::ReplayOpen(o));
    h.commit(true);
    assert_eq!(h.opened(r), key, "the original handle, not LimitReached");
    assert_eq!(
        h.held_by(1001),
        31,
        "counted against the user: past its share (the documented gap)"
    );
    assert_eq!(
        h.engine.handle_shares.holders(),
        shares_recounted(&h.engine)
    );
}
