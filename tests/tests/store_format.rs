//! The stored record format across builds (issue 16): records are written
//! as version 2 (postcard), and a state dir left by a build that wrote JSON
//! opens with this one — its handles resume with their locks and replay
//! records — while a record this build cannot read is reported and skipped,
//! and every other handle is served.

use std::os::fd::AsFd;
use std::path::Path;

use libfilter::client::FilterClient;
use libfilter::locks::{LockKind, LockRange};
use libfilter::model::*;
use libfilter::proto::OpenRequest;
use libfilter::store::{replay_key, Store, StoreOp};
use rkfilter_tests::{filterctl, plain_open, Filterd, Scratch};
use serde_json::Value;

const PERSISTENT: Durability = Durability::Persistent { timeout_ms: 60_000 };

/// A file `name` in the export with `data`, and a connected persistent
/// handle record of it as a crashed daemon leaves it.
fn file_and_record(root: &Path, name: &str, data: &str, guid: CreateGuid) -> HandleRecord {
    std::fs::write(root.join(name), data).unwrap();
    let f = std::fs::File::open(root.join(name)).unwrap();
    let st = nix::sys::stat::fstat(f.as_fd()).unwrap();
    let mut r = libfilter::testing::persistent_record(name);
    r.frontend = InstanceName::new("smb-a").unwrap();
    r.client = ClientId::new("alice").unwrap();
    r.create_guid = Some(guid);
    r.file = FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    };
    r.kernel_handle = Some(libfilter::sys::file_handle_of(f.as_fd()).unwrap());
    r.access = Access::new(Rights::READ.union(Rights::WRITE)).unwrap();
    r.share = Rights::READ;
    r.durability = PERSISTENT;
    r.opened_ms = now_ms();
    r
}

fn frontend(s: &Scratch) -> FilterClient {
    FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-a").unwrap(),
    )
    .expect("attach")
}

fn alice() -> ClientId {
    ClientId::new("alice").unwrap()
}

/// What `fd` holds from offset 0 (at most 64 bytes).
fn contents(fd: &std::os::fd::OwnedFd) -> String {
    let mut buf = [0u8; 64];
    let n = nix::sys::uio::pread(fd, &mut buf, 0).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// JSON of a record as a schema-1 build wrote it (after its version byte,
/// if any).
fn json<T: serde::Serialize>(rec: &T) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a record serializes")
}

/// `filterctl --state` (offline) `handles --json`.
fn offline_handles(s: &Scratch) -> Value {
    let state = s.state();
    let out = filterctl(&["--state", state.to_str().unwrap(), "handles", "--json"]);
    assert_eq!(out.code, 0, "filterctl failed: {}", out.stderr);
    out.json()
}

/// A schema-1 state dir (JSON records: one with version byte 1, one bare
/// JSON with none, a held lock and a recorded reply) opens with this
/// filterd: both handles are recovered and resume with their data, lock and
/// reply; the store moves to schema 2, new records are written as version
/// 2, and filterctl prints every record as JSON.
#[test]
fn a_state_dir_with_json_records_opens_and_its_handles_resume() {
    let s = Scratch::new("fmt-json");
    let (ga, gb) = (
        CreateGuid(uuid::Uuid::new_v4()),
        CreateGuid(uuid::Uuid::new_v4()),
    );
    let mut a = file_and_record(&s.root(), "a", "alpha", ga);
    a.locks.push(HeldLock {
        range: LockRange {
            offset: 0,
            length: 4,
        },
        kind: LockKind::Exclusive,
    });
    let b = file_and_record(&s.root(), "b", "beta", gb);
    let scope = ReplayScope::Handle(a.key);
    {
        let store = Store::open(&s.state(), 1 << 24).unwrap();
        store
            .put_raw("meta", b"schema_version", &1u32.to_le_bytes())
            .unwrap();
        let mut v1 = vec![1u8];
        v1.extend(json(&a));
        store.put_raw("handles", a.key.as_bytes(), &v1).unwrap();
        store
            .put_raw("handles", b.key.as_bytes(), &json(&b))
            .unwrap();
        let mut reply = vec![1u8];
        reply.extend(json(&ReplayRecord {
            reply: "done".into(),
            recorded_ms: 1,
            seq: None,
        }));
        store
            .put_raw("replay", &replay_key(&scope, 7), &reply)
            .unwrap();
    }
    let mut d = Filterd::start(&s, &[], &[]);
    assert!(
        !d.log_text().contains("does not decode"),
        "a JSON record was refused:\n{}",
        d.log_text()
    );
    let control = d.control();
    assert_eq!(control.stats().unwrap().recoveries, 2, "both handles back");
    // The lock came back with its handle.
    let locks = control.locks().unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    let fe = frontend(&s);
    let ra = fe
        .resume(alice(), a.key)
        .expect("the version-1 record resumes");
    assert_eq!(contents(&ra.fd), "alpha");
    let rb = fe
        .resume_by_guid(alice(), gb)
        .expect("the bare JSON record resumes by its create GUID");
    assert_eq!(rb.info.key, b.key);
    assert_eq!(contents(&rb.fd), "beta");
    let rec = fe
        .lookup_reply(scope.clone(), 7)
        .unwrap()
        .expect("the reply is kept");
    assert_eq!(rec.reply, "done");
    // A record of this build is newer than the older build's, whatever
    // the op ids (review rvspec: the lowest op id went): kept one, the
    // older build's goes.
    fe.record_reply(scope.clone(), 3, "three".into(), 1)
        .unwrap();
    assert!(fe.lookup_reply(scope.clone(), 7).unwrap().is_none());
    let rec = fe.lookup_reply(scope, 3).unwrap().expect("the new reply");
    assert_eq!(rec.reply, "three");
    // A record written now is version 2 (an older build reads it).
    let c = fe
        .open(OpenRequest {
            disposition: Disposition::OpenIf,
            durability: PERSISTENT,
            create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
            ..plain_open("alice", "c")
        })
        .unwrap()
        .info
        .key;
    drop(fe);
    d.terminate();
    let store = Store::open_read_only(&s.state()).unwrap();
    assert_eq!(
        store.meta().unwrap().schema_version,
        libfilter::store::SCHEMA_VERSION
    );
    let raw = store.raw_values("handles").unwrap();
    let first_byte = |k: &ResumeKey| {
        raw.iter()
            .find(|(key, _)| key.as_slice() == k.as_bytes())
            .and_then(|(_, v)| v.first().copied())
    };
    // Version 2: a new open is not stamped with the frontend process
    // (`attached_by` 0, the opener's); only a client's resume through
    // another process writes version 5 (re-review rr40f 1: every record
    // was, and a downgrade lost them all).
    assert_eq!(first_byte(&c), Some(2), "new records are version 2");
    assert!(store.handles().unwrap().iter().all(Result::is_ok));
    drop(store);
    // filterctl prints them all as the same JSON, whatever their version.
    let v = offline_handles(&s);
    let shown: Vec<(String, String)> = v
        .as_array()
        .unwrap_or_else(|| panic!("no corrupt records expected: {v}"))
        .iter()
        .map(|h| {
            (
                h["key"].as_str().unwrap_or_default().to_owned(),
                h["path"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (k, p) in [(a.key, "a"), (b.key, "b"), (c, "c")] {
        assert!(
            shown.contains(&(k.to_string(), p.to_owned())),
            "{k} {p} missing from {v}"
        );
    }
}

/// A record of an unknown version, and a version-2 record cut short, are
/// each reported (log, and filterctl's `status`, live and offline) and
/// skipped; the daemon still serves the good handle beside them.
#[test]
fn a_record_of_unknown_version_is_reported_and_skipped() {
    let s = Scratch::new("fmt-unknown");
    let good = file_and_record(&s.root(), "good", "fine", CreateGuid(uuid::Uuid::new_v4()));
    {
        let store = Store::open(&s.state(), 1 << 24).unwrap();
        store
            .apply(&[StoreOp::PutHandle(Box::new(good.clone()))])
            .unwrap();
        store
            .put_raw("handles", &[9; 16], b"\x09from the future")
            .unwrap();
        let mut cut = libfilter::store::encode_record(&good).unwrap();
        cut.truncate(cut.len() / 2);
        store.put_raw("handles", &[8; 16], &cut).unwrap();
    }
    let mut d = Filterd::start(&s, &[], &[]);
    d.wait_log(
        "unknown record version 9",
        std::time::Duration::from_secs(10),
    );
    d.wait_log("binary record", std::time::Duration::from_secs(10));
    assert_eq!(d.control().stats().unwrap().recoveries, 1);
    let fe = frontend(&s);
    let h = fe
        .resume(alice(), good.key)
        .expect("the good handle resumes");
    assert_eq!(contents(&h.fd), "fine");
    // The live daemon's `status` names the two it skipped, and does not
    // fail for them (it is the readiness check).
    let sock = s.socket();
    let live = filterctl(&["--socket", sock.to_str().unwrap(), "status", "--json"]);
    assert_eq!(live.code, 0, "{}{}", live.stdout, live.stderr);
    assert_eq!(live.json()["corrupt_records_total"], 2, "{}", live.stdout);
    drop(fe);
    d.terminate();
    // Listed with the good handle; the two bad ones named on stderr, exit
    // 0: no command fails for them.
    let state = s.state();
    let out = filterctl(&["--state", state.to_str().unwrap(), "handles", "--json"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("unknown record version 9"),
        "{}",
        out.stderr
    );
    assert!(out
        .json()
        .as_array()
        .expect("an array")
        .iter()
        .any(|h| h["key"] == good.key.to_string()));
    // `status` names both, in its output and on stderr, exit 0.
    let st = filterctl(&["--state", state.to_str().unwrap(), "status", "--json"]);
    assert_eq!(st.code, 0, "{}{}", st.stdout, st.stderr);
    assert!(
        st.stderr.contains("unknown record version 9"),
        "{}",
        st.stderr
    );
    let v = st.json();
    assert_eq!(v["corrupt_records_total"], 2, "{v}");
    let corrupt = v["corrupt_records"].as_array().expect("corrupt records");
    assert_eq!(corrupt.len(), 2, "{v}");
    assert!(corrupt.iter().any(|c| c
        .as_str()
        .unwrap_or_default()
        .contains("unknown record version 9")));
}
