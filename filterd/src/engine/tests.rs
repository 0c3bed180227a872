//! The engine's transactions, driven without threads, daemon sockets or a
//! real store: requests go straight to `run_request`, the test plays the
//! committer against an in-memory [`StateStore`], and decides whether each
//! commit succeeds. The property at the heart of invariant 1: a commit that
//! fails leaves the engine's state exactly as it was before the requests
//! that rode on it.
//!
//! (Files are still opened beneath a temporary export root: the engine
//! performs its opens itself.)

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use libfilter::locks::{LockOp, LockRange};
use libfilter::model::*;
use libfilter::proto::{Hello, OpenRequest, Request, Role};
use libfilter::store::{replay_key, RawReplay, StateStore, StoreError, StoreOp};
use proptest::prelude::*;

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
}

impl StateStore for MemStore {
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn claim(&self) -> Result<(u64, bool), StoreError> {
        Ok((1, true))
    }
    fn commit(&self, batches: &[&[StoreOp]]) -> Result<u64, StoreError> {
        let mut m = self.inner.lock().unwrap();
        if m.fail {
            return Err(StoreError::MapFull);
        }
        for op in batches.iter().flat_map(|b| b.iter()) {
            match op {
                StoreOp::PutHandle(r) => {
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
                    ..
                } => {
                    m.replays.insert(replay_key(scope, *op_id), record.clone());
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
    _peer: OwnedFd,
    dir: std::path::PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config() -> Config {
    Config {
        max_durable_timeout_ms: 300_000,
        root_display: "test".into(),
        state_display: "memory".into(),
        fanotify: false,
        break_timeout_ms: 1000,
        max_handles_per_client: 1000,
        max_handles_per_frontend: 1000,
        max_connections: 10,
        max_pending_breaks: 100,
    }
}

impl Harness {
    fn new() -> Harness {
        let dir = std::env::temp_dir().join(format!("rkf-core-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["a", "b", "c"] {
            std::fs::write(dir.join(f), b"0123456789").unwrap();
        }
        let root: OwnedFd = std::fs::File::open(&dir).unwrap().into();
        let pipe = Arc::new(Pipeline::default());
        let store = Arc::new(MemStore::default());
        let mut engine = Engine::new(
            config(),
            Box::new(fs::HostFs::new(root)),
            1,
            pipe.clone(),
            store.clone(),
            Arc::new(CommitCounters::default()),
        );
        let (ours, peer) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        let writer = ConnWriter::for_test(ours);
        let conn = ConnId(1);
        engine
            .on_hello(
                conn,
                Hello {
                    version: libfilter::proto::PROTO_VERSION,
                    features: 0,
                    role: Role::Frontend {
                        protocol: Protocol::new("smb").unwrap(),
                        instance: InstanceName::new("smb-t").unwrap(),
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
        Harness {
            engine,
            pipe,
            store,
            conn,
            writer,
            _peer: peer,
            dir,
        }
    }

    fn run(&mut self, req: Request) {
        let role = self.engine.conns[&self.conn].role.clone();
        let writer = self.writer.clone();
        self.engine.run_request(self.conn, &writer, &role, 0, req);
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

    fn commit_once(&mut self, ok: bool) {
        self.engine.flush();
        self.store.inner.lock().unwrap().fail = !ok;
        let jobs = self.pipe.take_jobs();
        let groups: Vec<crate::committer::Group> =
            jobs.into_iter().flat_map(|j| j.groups).collect();
        let Some(through) = groups.iter().map(|g| g.seq).max() else {
            return;
        };
        let batches: Vec<&[StoreOp]> = groups.iter().map(|g| g.ops.as_slice()).collect();
        match self.store.commit(&batches) {
            Ok(_) => {
                let _ = self.pipe.settle_success(through);
                let notify: Vec<IntentId> = groups.iter().flat_map(|g| g.notify.clone()).collect();
                for id in notify {
                    self.engine.finish_parked(id);
                }
            }
            Err(_) => {
                let failed: Vec<u64> = groups.iter().map(|g| g.seq).collect();
                self.engine
                    .roll_back(&failed, through, ErrorCode::DiskFull, "test");
                let _ = self.pipe.settle_failure(through, false);
            }
        }
        self.store.inner.lock().unwrap().fail = false;
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
        format!(
            "{handles:?}\n{locks:?}\n{replays:?}\n{by_file:?}\n{:?}\n{per_client:?}\n{:?}\n{}",
            e.by_guid.len(),
            e.content_changes,
            e.parked.len()
        )
    }
}

fn open(path: &str, share: Rights) -> Request {
    Request::Open(OpenRequest {
        client: ClientId::new("alice").unwrap(),
        path: RelPath::new(path).unwrap(),
        access: Access::new(Rights::READ.union(Rights::WRITE).union(Rights::DELETE)).unwrap(),
        share,
        disposition: Disposition::OpenIf,
        durability: Durability::Persistent { timeout_ms: 60_000 },
        create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
        owner: None,
        lease: None,
        no_wait: false,
        share_group: None,
    })
}

fn session(n: u8) -> ReplayScope {
    ReplayScope::Session(ScopeName::new(format!("s{n}")).unwrap())
}

/// A request that changes persistent state, over the handles phase one left.
#[derive(Debug, Clone)]
enum Op {
    Open(u8, bool),
    Lock(u8, u64, u64, bool),
    Unlock(u8, u64, u64),
    DeleteOnClose(u8, bool),
    Close(u8),
    Record(u8, u64),
    Rename(u8, u8),
    EndOfFile(u8, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3u8, any::<bool>()).prop_map(|(p, s)| Op::Open(p, s)),
        (0..4u8, 0..40u64, 1..10u64, any::<bool>()).prop_map(|(h, o, l, x)| Op::Lock(h, o, l, x)),
        (0..4u8, 0..40u64, 1..10u64).prop_map(|(h, o, l)| Op::Unlock(h, o, l)),
        (0..4u8, any::<bool>()).prop_map(|(h, d)| Op::DeleteOnClose(h, d)),
        (0..4u8).prop_map(Op::Close),
        (0..3u8, 0..5u64).prop_map(|(s, o)| Op::Record(s, o)),
        (0..4u8, 0..3u8).prop_map(|(h, t)| Op::Rename(h, t)),
        (0..4u8, 0..100u64).prop_map(|(h, n)| Op::EndOfFile(h, n)),
    ]
}

impl Harness {
    fn apply(&mut self, op: &Op) {
        let keys = self.keys();
        let key = |i: u8| keys.get(usize::from(i) % keys.len().max(1)).copied();
        let record = |scope: ReplayScope, op_id: u64| RecordSpec {
            scope,
            op_id,
            reply: format!("reply {op_id}"),
            keep: 64,
        };
        let req = match *op {
            Op::Open(p, share_all) => open(
                ["a", "b", "c"][usize::from(p)],
                if share_all { Rights::ALL } else { Rights::READ },
            ),
            Op::Lock(h, ..) | Op::Unlock(h, ..) if key(h).is_none() => return,
            Op::Lock(h, offset, length, exclusive) => Request::Lock {
                key: key(h).unwrap_or(ResumeKey(uuid::Uuid::nil())),
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
                key: key(h).unwrap_or(ResumeKey(uuid::Uuid::nil())),
                locks: vec![LockOp {
                    range: LockRange { offset, length },
                    exclusive: false,
                    unlock: true,
                }],
                lock_sequence: None,
                lock_owner: None,
            },
            Op::DeleteOnClose(h, delete) => match key(h) {
                Some(key) => Request::SetDeleteOnClose {
                    key,
                    delete,
                    record: None,
                },
                None => return,
            },
            Op::Close(h) => match key(h) {
                Some(key) => Request::Close { key },
                None => return,
            },
            Op::Record(s, op_id) => Request::RecordReply {
                scope: session(s),
                op_id,
                reply: format!("reply {op_id}"),
                keep: 3,
            },
            Op::Rename(h, t) => match key(h) {
                Some(key) => Request::Rename {
                    key,
                    to: RelPath::new(["x", "y", "a"][usize::from(t)]).unwrap(),
                    replace: false,
                    record: Some(record(ReplayScope::Handle(key), 100)),
                },
                None => return,
            },
            Op::EndOfFile(h, size) => match key(h) {
                Some(key) => Request::SetEndOfFile {
                    key,
                    size,
                    record: Some(record(ReplayScope::Handle(key), 200 + size)),
                },
                None => return,
            },
        };
        self.run(req);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever persistent changes ride on a commit, its failure leaves the
    /// engine exactly as before them: handles, paths, locks, lock
    /// sequences, delete-on-close flags, recorded replies, indexes.
    #[test]
    fn a_failed_commit_leaves_the_state_exactly_as_before(
        setup in proptest::collection::vec(op(), 0..6),
        doomed in proptest::collection::vec(op(), 1..8),
    ) {
        let mut h = Harness::new();
        for p in ["a", "b", "c"] {
            h.run(open(p, Rights::ALL));
        }
        h.commit(true);
        for o in &setup {
            h.apply(o);
            h.commit(true);
        }
        let before = h.digest();
        for o in &doomed {
            h.apply(o);
        }
        h.commit(false);
        prop_assert_eq!(h.digest(), before, "after {:?}", doomed);
        // And the store never saw any of it: what it holds is what the
        // engine holds of persistent handles.
        let stored: Vec<ResumeKey> = h.store.inner.lock().unwrap().handles.keys().copied().collect();
        let live: Vec<ResumeKey> = h
            .engine
            .handles
            .values()
            .filter(|x| x.rec.durability.is_persistent())
            .map(|x| x.rec.key)
            .collect();
        prop_assert_eq!(stored, live);
    }
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
            client: ClientId::new(client).unwrap(),
            path: RelPath::new("a").unwrap(),
            access: Access::new(access).unwrap(),
            share,
            disposition: Disposition::Open,
            durability: Durability::Persistent { timeout_ms: 60_000 },
            create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
            owner: None,
            lease: None,
            no_wait: true,
            share_group: group.map(str::to_owned),
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
