//! Exactly-once across crashes: every mutating open × every failpoint. For
//! each pair: start filterd with the failpoint armed, send the request,
//! filterd kills itself (or, where the point is not on the request's path,
//! completes and is killed with SIGKILL anyway), restart it, replay the
//! request, and check that the outcome equals the no-crash outcome, that the
//! filesystem and the store agree, and that nothing acknowledged was lost.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::{ErrorCode, OpenRequest};
use libfilter::store::Store;
use rkfilter_tests::{plain_open, Filterd, Scratch};

const FAILPOINTS: &[&str] = &[
    "open.after_fs",
    "commit.before",
    "commit.after",
    "reply.before_send",
    "intent.after_commit",
    "intent.after_fs",
];

fn frontend(s: &Scratch) -> FilterClient {
    FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-a").unwrap(),
    )
    .expect("attach")
}

fn open_req(path: &str, disp: Disposition, guid: CreateGuid) -> OpenRequest {
    OpenRequest {
        access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        share: Rights::READ,
        disposition: disp,
        durability: Durability::Persistent { timeout_ms: 60_000 },
        create_guid: Some(guid),
        ..plain_open("alice", path)
    }
}

/// What a client saw, reduced to what must not differ between a crash and
/// no crash.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    action: CreateAction,
    size: u64,
    content: Vec<u8>,
}

/// Sets up the file the operation expects (`pre` content or absent).
fn prepare(s: &Scratch, pre: Option<&[u8]>) {
    if let Some(p) = pre {
        std::fs::write(s.root().join("f"), p).unwrap();
    }
}

fn outcome(s: &Scratch, h: &libfilter::client::OpenedHandle) -> Outcome {
    Outcome {
        action: h.info.create_action,
        size: h.info.size,
        content: std::fs::read(s.root().join("f")).unwrap_or_default(),
    }
}

/// Runs the operation without any failpoint.
fn no_crash(disp: Disposition, pre: Option<&[u8]>) -> Outcome {
    let s = Scratch::new("eo-ref");
    prepare(&s, pre);
    let _d = Filterd::start(&s, &[], &[]);
    let h = frontend(&s)
        .open(open_req("f", disp, CreateGuid(uuid::Uuid::new_v4())))
        .unwrap();
    outcome(&s, &h)
}

/// What the store holds after the daemon stopped: handles and intents, from
/// the LMDB files or (with `etcd`) the etcd table.
fn stored(s: &Scratch, etcd: Option<&str>) -> (Vec<HandleRecord>, usize) {
    use libfilter::store::StateStore;
    let (hs, intents) = match etcd {
        None => {
            let store = Store::open_read_only(&s.state()).unwrap();
            (store.handles().unwrap(), store.intents().unwrap().len())
        }
        Some(url) => {
            let url = libfilter::etcd::EtcdUrl::parse(url).unwrap();
            let store = libfilter::etcd::EtcdStore::open_read_only(&url).unwrap();
            (
                store.all_handles().unwrap(),
                store.all_intents().unwrap().len(),
            )
        }
    };
    (hs.into_iter().map(|r| r.unwrap()).collect(), intents)
}

fn check_store_agrees(s: &Scratch, guid: CreateGuid, etcd: Option<&str>) {
    let (hs, intents) = stored(s, etcd);
    let mine: Vec<&HandleRecord> = hs.iter().filter(|h| h.create_guid == Some(guid)).collect();
    assert_eq!(
        mine.len(),
        1,
        "exactly one handle for the create GUID: {hs:?}"
    );
    assert_eq!(intents, 0, "no dangling intent after recovery");
    let meta = std::fs::metadata(s.root().join("f")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        mine[0].file.ino,
        meta.ino(),
        "store and filesystem name the same file"
    );
}

/// filterd's flags for the store: LMDB (none), or an etcd table at `etcd`
/// — restarted as a standby, which takes over once the dead owner's lease
/// has run out.
fn store_flags(etcd: Option<&str>, restart: bool) -> Vec<&str> {
    match etcd {
        None => vec![],
        Some(url) if restart => vec!["--store", url, "--lease-ttl-secs", "2", "--standby"],
        Some(url) => vec!["--store", url, "--lease-ttl-secs", "2"],
    }
}

fn crash_and_replay(
    fp: &str,
    disp: Disposition,
    pre: Option<&[u8]>,
    expect: &Outcome,
    etcd: Option<&str>,
) {
    let s = Scratch::new("eo");
    prepare(&s, pre);
    let mut d = Filterd::start(
        &s,
        &store_flags(etcd, false),
        &[("RKFILTER_FAILPOINTS", fp)],
    );
    let guid = CreateGuid(uuid::Uuid::new_v4());
    let first = frontend(&s).open(open_req("f", disp, guid));
    let truncates_existing = pre.is_some()
        && matches!(
            disp,
            Disposition::Overwrite | Disposition::OverwriteIf | Disposition::Supersede
        );
    let on_path = !fp.starts_with("intent.") || truncates_existing;
    assert_eq!(
        first.is_err(),
        on_path,
        "{fp} {disp:?}: the failpoint must fire exactly when on the path: {first:?}"
    );
    match &first {
        Ok(_) => d.kill9(),
        Err(_) => {
            d.wait_killed_at(fp, Duration::from_secs(10));
        }
    }
    let d2 = Filterd::start(&s, &store_flags(etcd, true), &[]);
    // Before the client replays, someone else wants the file. Whatever was
    // durable — the handle, or the intent recovery rolled forward — must
    // already protect it (share read only); nothing durable, nothing to protect.
    let durable = first.is_ok() || !matches!(fp, "open.after_fs" | "commit.before");
    let bob = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("nfs").unwrap(),
        InstanceName::new("nfs-b").unwrap(),
    )
    .unwrap();
    let mut intruder = open_req("f", Disposition::Open, CreateGuid(uuid::Uuid::new_v4()));
    intruder.client = ClientId::new("bob").unwrap();
    intruder.share = Rights::ALL;
    intruder.durability = Durability::None;
    match bob.open(intruder) {
        Ok(h) => {
            assert!(
                !durable,
                "{fp} {disp:?}: a durable open/intent must keep others out after restart"
            );
            bob.close(h.info.key).unwrap();
        }
        Err(e) if e.code() == Some(ErrorCode::NotFound) => assert!(!durable, "{fp} {disp:?}: {e}"),
        Err(e) => {
            assert!(durable, "{fp} {disp:?}: nothing was durable, yet: {e}");
            assert_eq!(e.code(), Some(ErrorCode::FileNotAvailable), "{fp} {disp:?}");
        }
    }
    drop(bob);
    let fe = frontend(&s);
    let replayed = fe
        .replay_open(open_req("f", disp, guid))
        .unwrap_or_else(|e| panic!("{fp} {disp:?}: replay failed: {e}\n{}", d2.log_text()));
    if let Ok(h) = &first {
        assert_eq!(
            h.info.key, replayed.info.key,
            "{fp} {disp:?}: acknowledged open must come back"
        );
    }
    let got = outcome(&s, &replayed);
    assert_eq!(
        &got, expect,
        "{fp} {disp:?}: outcome differs from the no-crash run"
    );
    // A second replay changes nothing either.
    let again = fe.replay_open(open_req("f", disp, guid)).unwrap();
    assert_eq!(again.info.key, replayed.info.key);
    // A non-replay with the same GUID is a duplicate.
    assert_eq!(
        fe.open(open_req("f", disp, guid)).unwrap_err().code(),
        Some(ErrorCode::DuplicateCreateGuid)
    );
    drop(fe);
    let mut d2 = d2;
    d2.terminate();
    check_store_agrees(&s, guid, etcd);
}

#[test]
fn every_failpoint_times_every_persistent_open() {
    let cases: &[(Disposition, Option<&[u8]>)] = &[
        (Disposition::Create, None),
        (Disposition::OpenIf, None),
        (Disposition::OpenIf, Some(b"old data")),
        (Disposition::Overwrite, Some(b"old data")),
        (Disposition::OverwriteIf, Some(b"old data")),
        (Disposition::OverwriteIf, None),
        (Disposition::Supersede, Some(b"old data")),
    ];
    for &(disp, pre) in cases {
        let expect = no_crash(disp, pre);
        for fp in FAILPOINTS {
            crash_and_replay(fp, disp, pre, &expect, None);
        }
    }
}

/// The same matrix against the etcd store (a one-member cluster; each case
/// its own prefix), for a create and an overwrite of existing data.
#[test]
fn every_failpoint_against_the_etcd_store() {
    if !rkfilter_tests::etcd::etcd_available("every_failpoint_against_the_etcd_store") {
        return;
    }
    let top = Scratch::new("eo-etcd");
    let cluster = rkfilter_tests::etcd::Cluster::start(&top, 1);
    let cases: &[(Disposition, Option<&[u8]>)] = &[
        (Disposition::Create, None),
        (Disposition::OverwriteIf, Some(b"old data")),
    ];
    for &(disp, pre) in cases {
        let expect = no_crash(disp, pre);
        for fp in FAILPOINTS {
            let url = cluster.url(&format!("eo/{}", uuid::Uuid::new_v4().simple()));
            crash_and_replay(fp, disp, pre, &expect, Some(&url));
        }
    }
}

#[test]
fn recorded_replies_survive_a_crash_after_commit_only() {
    // In the restarted daemon the first commit is the reattach, the second
    // the recorded reply: arm each failpoint for its second hit.
    for (fp, survives) in [
        ("commit.before:2", false),
        ("commit.after:2", true),
        ("reply.before_send:2", true),
    ] {
        let s = Scratch::new("eo-rec");
        let guid = CreateGuid(uuid::Uuid::new_v4());
        let key = {
            let _d = Filterd::start(&s, &[], &[]);
            frontend(&s)
                .open(open_req("f", Disposition::Create, guid))
                .unwrap()
                .info
                .key
        };
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
        let fe = frontend(&s);
        let h = fe
            .replay_open(open_req("f", Disposition::Create, guid))
            .unwrap();
        assert_eq!(h.info.key, key);
        let r = fe.record_reply(ReplayScope::Handle(key), 7, "{\"count\":1}".into(), 64);
        assert!(
            r.is_err(),
            "{fp}: the daemon must die before replying: {r:?}"
        );
        d.wait_killed_at(fp, Duration::from_secs(10));
        let _d2 = Filterd::start(&s, &[], &[]);
        let fe = frontend(&s);
        let h = fe
            .replay_open(open_req("f", Disposition::Create, guid))
            .unwrap();
        let rec = fe.lookup_reply(ReplayScope::Handle(h.info.key), 7).unwrap();
        assert_eq!(rec.is_some(), survives, "{fp}: {rec:?}");
        if let Some(r) = rec {
            assert_eq!(r.reply, "{\"count\":1}");
        }
        // Records go with the handle.
        fe.close(h.info.key).unwrap();
        let gone = fe.lookup_reply(ReplayScope::Handle(h.info.key), 7);
        assert_eq!(
            gone.unwrap_err().code(),
            Some(ErrorCode::NoSuchHandle),
            "scope of a closed handle is gone"
        );
    }
}

#[test]
fn session_scopes_are_per_protocol_and_bounded() {
    let s = Scratch::new("eo-sess");
    let _d = Filterd::start(&s, &[], &[]);
    let smb = frontend(&s);
    let nfs = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("nfs").unwrap(),
        InstanceName::new("nfs-a").unwrap(),
    )
    .unwrap();
    let scope = ReplayScope::Session(ScopeName::new("sess1/slot0").unwrap());
    for op in 1..=5 {
        nfs.record_reply(scope.clone(), op, format!("reply {op}"), 2)
            .unwrap();
    }
    assert!(
        nfs.lookup_reply(scope.clone(), 3).unwrap().is_none(),
        "only the newest 2 are kept"
    );
    assert_eq!(
        nfs.lookup_reply(scope.clone(), 5).unwrap().unwrap().reply,
        "reply 5"
    );
    assert!(
        smb.lookup_reply(scope.clone(), 5).unwrap().is_none(),
        "another protocol sees its own namespace"
    );
    // Oversized replies are refused, and change nothing.
    let big = "x".repeat(MAX_REPLY_BYTES + 1);
    assert_eq!(
        nfs.record_reply(scope.clone(), 6, big, 2)
            .unwrap_err()
            .code(),
        Some(ErrorCode::BadFrame)
    );
    assert!(nfs.lookup_reply(scope.clone(), 6).unwrap().is_none());
}

#[test]
fn kill9_under_concurrent_load_loses_no_acknowledged_handle() {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let s = Scratch::new("eo-load");
    let mut d = Filterd::start(&s, &[], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(ResumeKey, String, String)>>> = Arc::default();
    let mut threads = vec![];
    for t in 0..4 {
        let (sock, stop, acked) = (s.socket(), stop.clone(), acked.clone());
        threads.push(std::thread::spawn(move || {
            let fe = FilterClient::connect_frontend(
                &sock,
                Protocol::new("smb").unwrap(),
                InstanceName::new(format!("load-{t}")).unwrap(),
            )
            .unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let client = format!("client-{t}");
                let path = format!("t{t}-{n}");
                let mut r = open_req(&path, Disposition::Create, CreateGuid(uuid::Uuid::new_v4()));
                r.client = ClientId::new(client.clone()).unwrap();
                r.share = Rights::NONE;
                match fe.open(r) {
                    Ok(h) => acked.lock().unwrap().push((h.info.key, client, path)),
                    Err(_) => break,
                }
                n += 1;
            }
        }));
    }
    rkfilter_tests::wait_for("some acknowledged opens", Duration::from_secs(20), || {
        (acked.lock().unwrap().len() >= 200).then_some(())
    });
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let d2 = Filterd::start(&s, &[], &[]);
    let ctl = d2.control();
    let handles = ctl.handles().unwrap();
    let keys: Vec<ResumeKey> = handles.iter().map(|h| h.record.key).collect();
    let unique: HashSet<ResumeKey> = keys.iter().copied().collect();
    assert_eq!(unique.len(), keys.len(), "no handle appears twice");
    for (k, _, _) in &acked {
        assert!(unique.contains(k), "acknowledged handle {k} lost");
    }
    // Their share modes (none) protect their files.
    let bob = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("nfs").unwrap(),
        InstanceName::new("nfs-b").unwrap(),
    )
    .unwrap();
    for (_, _, path) in acked.iter().step_by(17) {
        let mut r = open_req(path, Disposition::Open, CreateGuid(uuid::Uuid::new_v4()));
        r.client = ClientId::new("bob").unwrap();
        r.durability = Durability::None;
        assert_eq!(
            bob.open(r).unwrap_err().code(),
            Some(ErrorCode::FileNotAvailable),
            "{path}"
        );
    }
    // Recovered handles hold no descriptor until resumed; resuming takes one
    // each, closing gives it back: no descriptor leaks.
    let fd_count = || {
        std::fs::read_dir(format!("/proc/{}/fd", d2.pid()))
            .unwrap()
            .count()
    };
    let idle = fd_count();
    assert!(
        idle < 64,
        "{idle} descriptors with every handle disconnected"
    );
    let fronts: Vec<FilterClient> = (0..4)
        .map(|t| {
            FilterClient::connect_frontend(
                &s.socket(),
                Protocol::new("smb").unwrap(),
                InstanceName::new(format!("load-{t}")).unwrap(),
            )
            .unwrap()
        })
        .collect();
    // Connections that just closed release their descriptors asynchronously:
    // wait for the count to settle before taking it as the base.
    let settled = || {
        let mut last = fd_count();
        loop {
            std::thread::sleep(Duration::from_millis(30));
            let now = fd_count();
            if now == last {
                return now;
            }
            last = now;
        }
    };
    let base = settled();
    let sample: Vec<_> = acked.iter().take(50).collect();
    // Each handle is resumed by the instance that opened it (client-T's
    // opens were made by load-T): only the owning instance may resume.
    let owner = |client: &str| -> usize {
        client
            .trim_start_matches("client-")
            .parse()
            .expect("client-T")
    };
    for (k, client, _) in &sample {
        let h = fronts[owner(client)]
            .resume(ClientId::new(client.as_str()).unwrap(), *k)
            .unwrap();
        drop(h.fd);
    }
    rkfilter_tests::wait_for(
        "one daemon descriptor per resumed handle",
        Duration::from_secs(5),
        || (fd_count() == base + sample.len()).then_some(()),
    );
    for (k, client, _) in &sample {
        fronts[owner(client)].close(*k).unwrap();
    }
    rkfilter_tests::wait_for(
        "closing to give every descriptor back",
        Duration::from_secs(5),
        || (fd_count() == base).then_some(()),
    );
}

#[test]
fn attachment_reattaches_and_resumes_after_filterd_restart() {
    use libfilter::attach::{AttachEvent, Attachment};
    let s = Scratch::new("eo-attach");
    let mut d = Filterd::start(&s, &[], &[]);
    let a = Attachment::connect(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-a").unwrap(),
    )
    .unwrap();
    // The resumed handle holds a lease: the reattach reports it (re-review
    // rr41i: with none, a `leases` always `None` passed).
    let mut leased = open_req("p", Disposition::Create, CreateGuid(uuid::Uuid::new_v4()));
    leased.lease = Some(libfilter::model::LeaseRequest {
        key: libfilter::lease::LeaseKey(uuid::Uuid::new_v4()),
        state: libfilter::lease::LeaseState::parse("RWH").unwrap(),
        epoch: 0,
    });
    let p = a.open(leased).unwrap();
    assert!(
        p.info.lease.is_some_and(|l| l
            .state
            .contains(libfilter::lease::LeaseState::parse("RW").unwrap())),
        "{:?}",
        p.info.lease
    );
    let mut plain = open_req("n", Disposition::Create, CreateGuid(uuid::Uuid::new_v4()));
    plain.durability = Durability::None;
    let n = a.open(plain).unwrap();
    let f = std::fs::File::from(p.fd);
    d.kill9();
    assert_eq!(
        a.events().recv_timeout(Duration::from_secs(10)).unwrap(),
        AttachEvent::Lost
    );
    let _d2 = Filterd::start(&s, &[], &[]);
    match a.events().recv_timeout(Duration::from_secs(10)).unwrap() {
        AttachEvent::Reattached {
            resumed,
            lost,
            leases,
            ..
        } => {
            assert_eq!(resumed, vec![p.info.key]);
            assert_eq!(lost, vec![n.info.key]);
            // Each resumed handle's lease as filterd holds it.
            assert_eq!(leases, vec![(p.info.key, p.info.lease)]);
        }
        other => panic!("{other:?}"),
    }
    // The descriptor the frontend held all along still works, and the
    // handle is attached to the new connection.
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"still here", 0).unwrap();
    assert_eq!(std::fs::read(s.root().join("p")).unwrap(), b"still here");
    a.close(p.info.key).unwrap();
    assert_eq!(a.remembered(), 0);
}

#[test]
fn close_survives_a_crash_at_every_commit_step() {
    // Commit 1 in the restarted daemon is the reattach, commit 2 the close.
    for fp in ["commit.before:2", "commit.after:2", "reply.before_send:2"] {
        let s = Scratch::new("eo-close");
        let guid = CreateGuid(uuid::Uuid::new_v4());
        {
            let _d = Filterd::start(&s, &[], &[]);
            let h = frontend(&s)
                .open(open_req("f", Disposition::Create, guid))
                .unwrap();
            std::fs::File::from(h.fd).write_all_at(b"kept", 0).unwrap();
        }
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
        let fe = frontend(&s);
        let h = fe
            .replay_open(open_req("f", Disposition::Create, guid))
            .unwrap();
        assert!(
            fe.close(h.info.key).is_err(),
            "{fp}: the daemon must die before confirming the close"
        );
        d.wait_killed_at(fp, Duration::from_secs(10));
        let _d2 = Filterd::start(&s, &[], &[]);
        let fe = frontend(&s);
        // The client reconnects (if the handle is still there) and closes.
        match fe.resume_by_guid(ClientId::new("alice").unwrap(), guid) {
            Ok(h) => {
                assert_eq!(
                    fp, "commit.before:2",
                    "only an uncommitted close may leave the handle"
                );
                fe.close(h.info.key).unwrap();
            }
            Err(e) => assert_ne!(fp, "commit.before:2", "{e}"),
        }
        // A create re-sent now is a new create: the file exists, so it
        // collides; it is not mistaken for a replay of the closed open.
        assert_eq!(
            fe.replay_open(open_req("f", Disposition::Create, guid))
                .unwrap_err()
                .code(),
            Some(ErrorCode::Collision),
            "{fp}"
        );
        // Either way the outcome is the no-crash one: no handle, data intact.
        let fe2 = FilterClient::connect_control(&s.socket()).unwrap();
        let left: Vec<_> = fe2
            .handles()
            .unwrap()
            .into_iter()
            .filter(|h| h.record.create_guid == Some(guid))
            .collect();
        assert!(left.is_empty(), "{fp}: {left:?}");
        assert_eq!(std::fs::read(s.root().join("f")).unwrap(), b"kept");
    }
}

#[test]
fn create_guid_of_another_client_is_a_duplicate() {
    let s = Scratch::new("eo-dup");
    let _d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s);
    let guid = CreateGuid(uuid::Uuid::new_v4());
    fe.open(open_req("a", Disposition::Create, guid)).unwrap();
    let mut other = open_req("b", Disposition::Create, guid);
    other.client = ClientId::new("mallory").unwrap();
    assert_eq!(
        fe.open(other.clone()).unwrap_err().code(),
        Some(ErrorCode::DuplicateCreateGuid)
    );
    assert_eq!(
        fe.replay_open(other).unwrap_err().code(),
        Some(ErrorCode::DuplicateCreateGuid)
    );
    assert!(
        !s.root().join("b").exists(),
        "a refused create creates nothing"
    );
}
