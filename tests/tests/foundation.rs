//! End-to-end tests of the foundation: real filterd processes, frontends
//! over libfilter (in-process clients and `testfront` processes), filterctl.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::{ErrorCode, OpenRequest, Request};
use rkfilter_tests::{bin, filterctl, plain_open, wait_for, Filterd, Scratch, TestFront};
use serde_json::{json, Value};

fn frontend(d: &Scratch, proto: &str, inst: &str) -> FilterClient {
    FilterClient::connect_frontend(
        &d.socket(),
        Protocol::new(proto).unwrap(),
        InstanceName::new(inst).unwrap(),
    )
    .expect("frontend attaches")
}

fn req(
    client: &str,
    path: &str,
    access: Rights,
    share: Rights,
    disp: Disposition,
    dur: Durability,
) -> OpenRequest {
    OpenRequest {
        access: Access::new(access).unwrap(),
        share,
        disposition: disp,
        durability: dur,
        ..plain_open(client, path)
    }
}

const RW: Rights = Rights::READ.union(Rights::WRITE);

fn handles_json(s: &Scratch) -> Value {
    let out = filterctl(&[
        "--socket",
        s.socket().to_str().unwrap(),
        "handles",
        "--json",
    ]);
    assert_eq!(out.code, 0, "filterctl handles failed: {}", out.stderr);
    out.json()
}

fn handle_list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o
            .get("handles")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        _ => vec![],
    }
}

#[test]
fn open_write_read_close() {
    let s = Scratch::new("owrc");
    let _d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb", "smb-1");
    let h = fe
        .open(req(
            "c1",
            "a.txt",
            RW,
            Rights::NONE,
            Disposition::Create,
            Durability::None,
        ))
        .unwrap();
    assert_eq!(h.info.create_action, CreateAction::Created);
    let f = std::fs::File::from(h.fd);
    f.write_all_at(b"hello world", 0).unwrap();
    assert_eq!(
        std::fs::read(s.root().join("a.txt")).unwrap(),
        b"hello world"
    );
    let mut buf = [0u8; 5];
    f.read_exact_at(&mut buf, 6).unwrap();
    assert_eq!(&buf, b"world");
    assert_eq!(handle_list(&handles_json(&s)).len(), 1);
    fe.close(h.info.key).unwrap();
    assert_eq!(handle_list(&handles_json(&s)).len(), 0);
    // Closing twice is an error, not a crash.
    assert_eq!(
        fe.close(h.info.key).unwrap_err().code(),
        Some(ErrorCode::NoSuchHandle)
    );
}

/// filterd names a frontend's new handles with time-ordered keys (UUID
/// v7) when the frontend asked for `FEATURE_TIME_ORDERED_KEYS`, so a
/// commit's new records land together at the end of the handle table
/// (docs/PERFORMANCE.md, round 17): each open's key is above the last. A
/// frontend that did not ask — one that may take a half of a key for
/// unique — gets random (v4) keys, as from every daemon before.
#[test]
fn new_handles_get_time_ordered_keys() {
    let s = Scratch::new("keys");
    let _d = Filterd::start(&s, &[], &[]);
    let old = frontend(&s, "smb", "smb-0");
    let h = old
        .open(req(
            "c0",
            "old",
            RW,
            Rights::ALL,
            Disposition::OpenIf,
            Durability::None,
        ))
        .unwrap();
    assert_eq!(h.info.key.0.get_version_num(), 4, "{}", h.info.key);
    let fe = FilterClient::connect_frontend_with(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-1").unwrap(),
        libfilter::proto::FEATURE_TIME_ORDERED_KEYS,
    )
    .expect("frontend attaches");
    let keys: Vec<ResumeKey> = (0..20)
        .map(|i| {
            let dur = if i % 2 == 0 {
                Durability::Persistent { timeout_ms: 60_000 }
            } else {
                Durability::None
            };
            let h = fe
                .open(req(
                    "c1",
                    &format!("k{i}"),
                    RW,
                    Rights::ALL,
                    Disposition::OpenIf,
                    dur,
                ))
                .unwrap();
            h.info.key
        })
        .collect();
    for k in &keys {
        assert_eq!(k.0.get_version_num(), 7, "{k}");
    }
    for w in keys.windows(2) {
        assert!(w[0] < w[1], "{} then {}", w[0], w[1]);
    }
}

#[test]
fn dispositions() {
    let s = Scratch::new("disp");
    let _d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb", "smb-1");
    let o = |path: &str, disp| fe.open(req("c1", path, RW, Rights::ALL, disp, Durability::None));
    assert_eq!(
        o("x", Disposition::Open).unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        o("nodir/x", Disposition::OpenIf).unwrap_err().code(),
        Some(ErrorCode::PathNotFound)
    );
    assert_eq!(
        o("x", Disposition::Overwrite).unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
    let a = o("x", Disposition::OpenIf).unwrap();
    assert_eq!(a.info.create_action, CreateAction::Created);
    std::fs::File::from(a.fd).write_all_at(b"12345", 0).unwrap();
    assert_eq!(
        o("x", Disposition::Create).unwrap_err().code(),
        Some(ErrorCode::Collision)
    );
    let b = o("x", Disposition::OpenIf).unwrap();
    assert_eq!(
        (b.info.create_action, b.info.size),
        (CreateAction::Opened, 5)
    );
    let c = o("x", Disposition::Overwrite).unwrap();
    assert_eq!(
        (c.info.create_action, c.info.size),
        (CreateAction::Overwritten, 0)
    );
    assert_eq!(std::fs::metadata(s.root().join("x")).unwrap().len(), 0);
    std::fs::write(s.root().join("x"), b"abc").unwrap();
    let d = o("x", Disposition::Supersede).unwrap();
    assert_eq!(d.info.create_action, CreateAction::Superseded);
    let e = o("y", Disposition::OverwriteIf).unwrap();
    assert_eq!(e.info.create_action, CreateAction::Created);
    std::fs::create_dir(s.root().join("dir")).unwrap();
    let r = fe.open(req(
        "c1",
        "dir",
        Rights::READ,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ));
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotAFile));
    // A read-only open gets a read-only descriptor, even when it truncates.
    std::fs::write(s.root().join("ro"), b"abc").unwrap();
    let ro = fe
        .open(req(
            "c1",
            "ro",
            Rights::READ,
            Rights::ALL,
            Disposition::Overwrite,
            Durability::None,
        ))
        .unwrap();
    assert!(std::fs::File::from(ro.fd).write_all_at(b"z", 0).is_err());
    assert_eq!(std::fs::metadata(s.root().join("ro")).unwrap().len(), 0);
}

#[test]
fn sharing_violation_across_frontends() {
    let s = Scratch::new("share");
    let _d = Filterd::start(&s, &[], &[]);
    std::fs::write(s.root().join("f"), b"data").unwrap();
    let smb = frontend(&s, "smb", "smb-1");
    let nfs = frontend(&s, "nfs", "nfs-1");
    let a = smb
        .open(req(
            "c1",
            "f",
            Rights::READ,
            Rights::READ,
            Disposition::Open,
            Durability::None,
        ))
        .unwrap();
    // Another reader that shares read: fine.
    let b = nfs
        .open(req(
            "c2",
            "f",
            Rights::READ,
            Rights::READ,
            Disposition::Open,
            Durability::None,
        ))
        .unwrap();
    // A writer: the first open does not share write.
    let w = nfs.open(req(
        "c2",
        "f",
        RW,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ));
    assert_eq!(w.unwrap_err().code(), Some(ErrorCode::SharingViolation));
    // A reader that does not share read with the existing readers.
    let r = nfs.open(req(
        "c3",
        "f",
        Rights::READ,
        Rights::NONE,
        Disposition::Open,
        Durability::None,
    ));
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::SharingViolation));
    // A truncating open refused by share modes truncates nothing.
    let t = nfs.open(req(
        "c2",
        "f",
        RW,
        Rights::ALL,
        Disposition::Overwrite,
        Durability::None,
    ));
    assert_eq!(t.unwrap_err().code(), Some(ErrorCode::SharingViolation));
    assert_eq!(std::fs::read(s.root().join("f")).unwrap(), b"data");
    smb.close(a.info.key).unwrap();
    nfs.close(b.info.key).unwrap();
    nfs.open(req(
        "c2",
        "f",
        RW,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ))
    .unwrap();
    let st = stats(&s);
    assert!(st["sharing_violations"].as_u64().unwrap() >= 3, "{st}");
}

fn stats(s: &Scratch) -> Value {
    let out = filterctl(&["--socket", s.socket().to_str().unwrap(), "stats", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.json()
}

fn open_cmd(
    client: &str,
    path: &str,
    access: &[&str],
    share: &[&str],
    disp: &str,
    dur: Value,
    guid: Option<&str>,
) -> Value {
    json!({"cmd": "open", "client": client, "path": path, "access": access, "share": share,
           "disposition": disp, "durability": dur, "create_guid": guid})
}

/// alice's persistent read-write create of `path` (sharing read), with no
/// create GUID.
fn persistent_create(path: &str) -> Value {
    open_cmd(
        "alice",
        path,
        &["read", "write"],
        &["read"],
        "create",
        json!({"kind": "persistent", "timeout_ms": 60000}),
        None,
    )
}

fn state_of(s: &Scratch, key: &Value) -> String {
    let h = handle_list(&handles_json(s));
    h.iter()
        .find(|h| h["key"] == *key)
        .map(|h| h["conn"]["state"].as_str().unwrap_or("?").to_owned())
        .unwrap_or_else(|| "gone".into())
}

#[test]
fn frontend_sigkill_leaves_handles_protecting_and_replacement_resumes() {
    let s = Scratch::new("fekill");
    let _d = Filterd::start(&s, &[], &[]);
    let sock = s.socket();
    let mut fe = TestFront::start(&sock, "smb", "smb-a").unwrap();
    let g_p = uuid::Uuid::new_v4().to_string();
    let g_d = uuid::Uuid::new_v4().to_string();
    let p = fe.cmd(open_cmd(
        "alice",
        "persist.txt",
        &["read", "write"],
        &["read"],
        "create",
        json!({"kind": "persistent", "timeout_ms": 60000}),
        Some(&g_p),
    ));
    assert_eq!(p["ok"], true, "{p}");
    let d = fe.cmd(open_cmd(
        "alice",
        "durable.txt",
        &["read", "write"],
        &["read"],
        "create",
        json!({"kind": "durable", "timeout_ms": 60000}),
        Some(&g_d),
    ));
    assert_eq!(d["ok"], true, "{d}");
    let n = fe.cmd(open_cmd(
        "alice",
        "plain.txt",
        &["read", "write"],
        &[],
        "create",
        json!({"kind": "none"}),
        None,
    ));
    assert_eq!(n["ok"], true, "{n}");
    for k in [&p, &d] {
        let w = fe.cmd(json!({"cmd": "write", "key": k["key"], "offset": 0, "data": "survives"}));
        assert_eq!(w["ok"], true);
    }
    // Another frontend attaching with the same live instance name is refused.
    let busy = TestFront::start(&sock, "smb", "smb-a")
        .err()
        .expect("instance busy");
    assert_eq!(busy["code"], "InstanceBusy", "{busy}");

    fe.kill9();
    wait_for("handles to disconnect", Duration::from_secs(10), || {
        (state_of(&s, &p["key"]) == "disconnected").then_some(())
    });
    assert_eq!(state_of(&s, &d["key"]), "disconnected");
    assert_eq!(
        state_of(&s, &n["key"]),
        "gone",
        "non-durable handle must be closed"
    );

    // Still protecting: a conflicting open of the persistent file is refused.
    let other = frontend(&s, "nfs", "nfs-1");
    let r = other.open(req(
        "bob",
        "persist.txt",
        RW,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ));
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::FileNotAvailable));
    // A plain file is free again.
    other
        .open(req(
            "bob",
            "plain.txt",
            RW,
            Rights::ALL,
            Disposition::Open,
            Durability::None,
        ))
        .unwrap();

    // A replacement process with the same instance name resumes and reads.
    let mut fe2 = TestFront::start(&sock, "smb", "smb-a").unwrap();
    // Wrong client identity is refused (invariant 6).
    let wrong = fe2.cmd(json!({"cmd": "resume", "client": "mallory", "create_guid": g_p}));
    assert_eq!(wrong["ok"], false);
    let wrong = fe2.cmd(json!({"cmd": "resume", "client": "mallory", "key": p["key"]}));
    assert_eq!(wrong["code"], "NotOwner", "{wrong}");
    // A frontend of another protocol cannot take it either.
    let nfs_front = TestFront::start(&sock, "nfs", "nfs-2").unwrap();
    drop(nfs_front);
    let rp = fe2.cmd(json!({"cmd": "resume", "client": "alice", "create_guid": g_p}));
    assert_eq!(rp["ok"], true, "{rp}");
    assert_eq!(rp["key"], p["key"]);
    assert_eq!(rp["create_action"], "created");
    let data = fe2.cmd(json!({"cmd": "read", "key": p["key"], "offset": 0, "len": 100}));
    assert_eq!(data["data"], "survives");
    let rd = fe2.cmd(json!({"cmd": "resume", "client": "alice", "key": d["key"]}));
    assert_eq!(rd["ok"], true, "{rd}");
    let data = fe2.cmd(json!({"cmd": "read", "key": d["key"], "offset": 0, "len": 100}));
    assert_eq!(data["data"], "survives");
    assert_eq!(state_of(&s, &p["key"]), "connected");
    // Resuming an attached handle again is refused.
    let again = fe2.cmd(json!({"cmd": "resume", "client": "alice", "key": p["key"]}));
    assert_eq!(again["code"], "NoSuchHandle", "{again}");
    assert!(stats(&s)["resumes"].as_u64().unwrap() >= 2);
}

#[test]
fn disconnected_durable_is_purged_persistent_is_not() {
    let s = Scratch::new("purge");
    let _d = Filterd::start(&s, &[], &[]);
    let mut fe = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let d = fe.cmd(open_cmd(
        "alice",
        "d",
        &["read", "write"],
        &[],
        "create",
        json!({"kind": "durable", "timeout_ms": 60000}),
        None,
    ));
    let p = fe.cmd(open_cmd(
        "alice",
        "p",
        &["read", "write"],
        &[],
        "create",
        json!({"kind": "persistent", "timeout_ms": 60000}),
        None,
    ));
    let det = fe.cmd(json!({"cmd": "detach", "key": d["key"]}));
    assert_eq!(det["ok"], true);
    let det = fe.cmd(json!({"cmd": "detach", "key": p["key"]}));
    assert_eq!(det["ok"], true);
    let other = frontend(&s, "nfs", "nfs-1");
    // A share-compatible open of the durable file does not purge it... there is
    // none (share none), so the conflicting open purges it and proceeds.
    other
        .open(req(
            "bob",
            "d",
            Rights::READ,
            Rights::ALL,
            Disposition::Open,
            Durability::None,
        ))
        .unwrap();
    assert_eq!(state_of(&s, &d["key"]), "gone");
    let r = other.open(req(
        "bob",
        "p",
        Rights::READ,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ));
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::FileNotAvailable));
    assert_eq!(stats(&s)["purges"], 1);
    // The purged handle's frontend heard about it.
    drop(fe);
}

#[test]
fn disconnected_handles_expire_after_their_timeout() {
    let s = Scratch::new("expire");
    let _d = Filterd::start(&s, &[], &[]);
    let mut fe = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let p = fe.cmd(open_cmd(
        "alice",
        "p",
        &["read", "write"],
        &[],
        "create",
        json!({"kind": "persistent", "timeout_ms": 300}),
        None,
    ));
    let d = fe.cmd(open_cmd(
        "alice",
        "d",
        &["read", "write"],
        &[],
        "create",
        json!({"kind": "durable", "timeout_ms": 60000}),
        None,
    ));
    // Detach, resume, detach again: the second timeout counts, not the first.
    fe.cmd(json!({"cmd": "detach", "key": d["key"]}));
    fe.kill9();
    wait_for(
        "persistent handle to expire",
        Duration::from_secs(10),
        || (state_of(&s, &p["key"]) == "gone").then_some(()),
    );
    assert_eq!(
        state_of(&s, &d["key"]),
        "disconnected",
        "60 s timeout must not have fired"
    );
    let other = frontend(&s, "nfs", "nfs-1");
    other
        .open(req(
            "bob",
            "p",
            RW,
            Rights::NONE,
            Disposition::Open,
            Durability::None,
        ))
        .unwrap();
    assert!(stats(&s)["expiries"].as_u64().unwrap() >= 1);
    // filterctl expire ends the durable one now.
    let key = d["key"].as_str().unwrap();
    let out = filterctl(&["--socket", s.socket().to_str().unwrap(), "expire", key]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(state_of(&s, &d["key"]), "gone");
}

#[test]
fn reconnect_restarts_the_timeout() {
    let s = Scratch::new("retimer");
    let _d = Filterd::start(&s, &[], &[]);
    let mut fe = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let p = fe.cmd(open_cmd(
        "alice",
        "p",
        &["read"],
        &["read"],
        "create",
        json!({"kind": "durable", "timeout_ms": 400}),
        None,
    ));
    fe.cmd(json!({"cmd": "detach", "key": p["key"]}));
    let r = fe.cmd(json!({"cmd": "resume", "client": "alice", "key": p["key"]}));
    assert_eq!(r["ok"], true, "{r}");
    // Past the first timer's deadline the handle is still there and attached.
    let t0 = std::time::Instant::now();
    wait_for("first deadline to pass", Duration::from_secs(5), || {
        (t0.elapsed() > Duration::from_millis(600)).then_some(())
    });
    assert_eq!(state_of(&s, &p["key"]), "connected");
    fe.cmd(json!({"cmd": "detach", "key": p["key"]}));
    wait_for("second timeout", Duration::from_secs(10), || {
        (state_of(&s, &p["key"]) == "gone").then_some(())
    });
}

#[test]
fn paths_cannot_leave_the_root() {
    let s = Scratch::new("confine");
    let _d = Filterd::start(&s, &[], &[]);
    std::os::unix::fs::symlink("/etc", s.root().join("etc-link")).unwrap();
    std::os::unix::fs::symlink("../../../../../../etc/passwd", s.root().join("rel-link")).unwrap();
    std::fs::create_dir(s.root().join("sub")).unwrap();
    std::os::unix::fs::symlink("../inside", s.root().join("sub/ok-link")).unwrap();
    std::fs::write(s.root().join("inside"), b"in").unwrap();
    let fe = frontend(&s, "smb", "smb-1");
    for p in ["etc-link/passwd", "rel-link"] {
        let r = fe.open(req(
            "c",
            p,
            Rights::READ,
            Rights::ALL,
            Disposition::Open,
            Durability::None,
        ));
        assert_eq!(r.unwrap_err().code(), Some(ErrorCode::AccessDenied), "{p}");
    }
    // Creating through an escaping symlink is refused too, and creates nothing.
    let r = fe.open(req(
        "c",
        "etc-link/rkf-should-not-exist",
        RW,
        Rights::ALL,
        Disposition::Create,
        Durability::None,
    ));
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::AccessDenied));
    assert!(!std::path::Path::new("/etc/rkf-should-not-exist").exists());
    // A symlink that stays inside is fine.
    fe.open(req(
        "c",
        "sub/ok-link",
        Rights::READ,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ))
    .unwrap();
    // A directory rename neither follows a final symlink nor resolves its
    // source or target through one that leaves the root (session 23).
    std::fs::create_dir(s.root().join("mv")).unwrap();
    let p = |p: &str| RelPath::new(p).unwrap();
    for (from, to, code) in [
        ("etc-link", "renamed-etc", ErrorCode::NotAFile),
        ("etc-link/ssl", "ssl", ErrorCode::AccessDenied),
        (
            "mv",
            "etc-link/rkf-should-not-exist",
            ErrorCode::AccessDenied,
        ),
    ] {
        let r = fe.rename_directory(p(from), p(to), false, None);
        assert_eq!(r.unwrap_err().code(), Some(code), "{from} → {to}");
    }
    assert!(!std::path::Path::new("/etc/rkf-should-not-exist").exists());
    assert!(s.root().join("mv").is_dir() && std::path::Path::new("/etc").is_dir());
    assert!(std::fs::symlink_metadata(s.root().join("etc-link"))
        .unwrap()
        .is_symlink());
    // `..` and absolute paths never reach the daemon as a RelPath, and the
    // daemon refuses them when a peer sends them raw.
    for p in ["../etc/passwd", "/etc/passwd", "a/../../b"] {
        assert!(RelPath::new(p).is_err());
        let raw = format!(
            r#"{{"id":9,"op":"open","client":"c","path":"{p}","access":["read"],"share":[],"disposition":"open","durability":{{"kind":"none"}}}}"#
        );
        let (id, reply) = raw_exchange(&s, &[raw.as_bytes()]).pop().unwrap();
        assert_eq!(id, Some(9));
        assert_eq!(reply["result"]["Err"]["code"], "bad_frame", "{reply}");
    }
}

/// Review A3: a directory rename is refused while a file below it is open,
/// also when the handle's path or the directory's name goes through a
/// symbolic link inside the export, so the stored path never says less
/// than where the file is — and across a kill -9 and restart (the mark is
/// stored with the handle). Before, the rename went ahead and `link/f`
/// named its file through a link that led nowhere.
#[test]
fn a_directory_rename_sees_files_opened_through_links() {
    let s = Scratch::new("dir-rename-links");
    let root = s.root();
    std::fs::create_dir_all(root.join("d/sub")).unwrap();
    std::fs::create_dir_all(root.join("other")).unwrap();
    std::fs::write(root.join("d/sub/f"), "f").unwrap();
    std::fs::write(root.join("d/sub/g"), "g").unwrap();
    std::fs::write(root.join("other/h"), "h").unwrap();
    // `link` → the directory, `glink` → a file in it, `ld` → `d`.
    std::os::unix::fs::symlink("d/sub", root.join("link")).unwrap();
    std::os::unix::fs::symlink("d/sub/g", root.join("glink")).unwrap();
    std::os::unix::fs::symlink("d", root.join("ld")).unwrap();
    let mut d = Filterd::start(&s, &[], &[]);
    let p = |p: &str| RelPath::new(p).unwrap();
    let persistent = Durability::Persistent { timeout_ms: 60_000 };
    let fe = frontend(&s, "smb", "smb-a");
    let open = |fe: &FilterClient, path: &str| {
        fe.open(req(
            "c",
            path,
            Rights::READ,
            Rights::ALL,
            Disposition::Open,
            persistent,
        ))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .info
        .key
    };
    let marks = |d: &Filterd| -> Vec<(String, bool)> {
        let mut v: Vec<_> = d
            .control()
            .handles()
            .unwrap()
            .into_iter()
            .map(|h| (h.record.path.as_str().to_owned(), h.record.through_link))
            .collect();
        v.sort();
        v
    };
    let refused = |fe: &FilterClient, from: &str, to: &str, what: &str| {
        let r = fe.rename_directory(p(from), p(to), false, None);
        assert_eq!(
            r.unwrap_err().code(),
            Some(ErrorCode::AccessDenied),
            "{from} → {to} with {what} open below"
        );
    };
    let f = open(&fe, "link/f");
    assert_eq!(marks(&d), [("link/f".to_owned(), true)]);
    refused(&fe, "d", "e", "link/f");
    refused(&fe, "d/sub", "d/sub2", "link/f");
    // A handle by a plain path, the directory named through `ld`.
    fe.close(f).unwrap();
    let plain = open(&fe, "d/sub/f");
    assert_eq!(marks(&d), [("d/sub/f".to_owned(), false)]);
    refused(&fe, "ld/sub", "ld/sub2", "d/sub/f");
    fe.close(plain).unwrap();
    // A link to the file itself; a directory whose name ends as the
    // kernel marks a deleted file's (a client may choose it); a file with
    // a second hard link in another directory, opened through a link to
    // its first (not below the other's directory: no false refusal). Then
    // a restart: the first directory rename finds the marks again (they
    // are not stored), and a recovered handle (no descriptor yet) is
    // placed by its recorded path. (Which hard link an open by kernel handle would name instead
    // depends on the kernel's cache: not forced here.)
    std::fs::create_dir_all(root.join("x (deleted)/sub")).unwrap();
    std::fs::write(root.join("x (deleted)/sub/f"), "x").unwrap();
    std::os::unix::fs::symlink("x (deleted)/sub", root.join("xl")).unwrap();
    std::fs::create_dir_all(root.join("hd/sub")).unwrap();
    std::fs::write(root.join("other/g2"), "g2").unwrap();
    std::fs::hard_link(root.join("other/g2"), root.join("hd/sub/g2")).unwrap();
    std::os::unix::fs::symlink("other/g2", root.join("hl")).unwrap();
    open(&fe, "glink");
    open(&fe, "other/h");
    open(&fe, "xl/f");
    open(&fe, "hl");
    let marked = [
        ("glink".to_owned(), true),
        ("hl".to_owned(), true),
        ("other/h".to_owned(), false),
        ("xl/f".to_owned(), true),
    ];
    assert_eq!(marks(&d), marked);
    refused(&fe, "d", "e", "glink");
    refused(&fe, "x (deleted)", "x2", "xl/f");
    fe.rename_directory(p("hd"), p("hd2"), false, None)
        .expect("hl's file is open by its name outside hd");
    d.kill9();
    drop(fe);
    let d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb", "smb-a");
    refused(&fe, "d", "e", "glink (recovered)");
    // Found again by that rename (the marks are not stored).
    assert_eq!(marks(&d), marked);
    refused(&fe, "x (deleted)", "x2", "xl/f (recovered)");
    assert!(root.join("d/sub/g").exists());
    fe.rename_directory(p("hd2"), p("hd3"), false, None)
        .expect("hl's file is open by its name outside hd2 (recovered)");
    refused(&fe, "other", "other2", "other/h");
    // A directory with nothing open below still renames beside a marked
    // handle, and so does `d` once that handle is closed.
    std::fs::create_dir(root.join("x")).unwrap();
    std::fs::write(root.join("x/k"), "k").unwrap();
    fe.rename_directory(p("x"), p("y"), false, None)
        .expect("nothing below x is open");
    assert!(root.join("y/k").is_file());
    let glink = d
        .control()
        .handles()
        .unwrap()
        .into_iter()
        .find(|h| h.record.path.as_str() == "glink")
        .expect("glink's handle")
        .record
        .key;
    fe.resume(ClientId::new("c").unwrap(), glink).unwrap();
    fe.close(glink).unwrap();
    fe.rename_directory(p("d"), p("e"), false, None)
        .expect("nothing below d is open");
    assert!(root.join("e/sub/g").is_file());
}

/// A commit that fails puts handles back from the store, which does not
/// hold the link mark: the mark must survive (the session-26 review: a
/// failed close of `link/f` came back unmarked, and `d` was renamed under
/// it).
#[test]
fn a_failed_close_keeps_a_handle_seen_below_through_its_link() {
    let s = Scratch::new("dir-rename-link-failed-close");
    let root = s.root();
    std::fs::create_dir_all(root.join("d/sub")).unwrap();
    std::fs::write(root.join("d/sub/f"), "f").unwrap();
    std::os::unix::fs::symlink("d/sub", root.join("link")).unwrap();
    // The second commit (the close's) fails.
    let _d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", "commit.before:2:fail")]);
    let fe = frontend(&s, "smb", "smb-a");
    let persistent = Durability::Persistent { timeout_ms: 60_000 };
    let key = fe
        .open(req(
            "c",
            "link/f",
            Rights::READ,
            Rights::ALL,
            Disposition::Open,
            persistent,
        ))
        .unwrap()
        .info
        .key;
    assert!(fe.close(key).is_err(), "the close's commit fails");
    let r = fe.rename_directory(
        RelPath::new("d").unwrap(),
        RelPath::new("e").unwrap(),
        false,
        None,
    );
    assert_eq!(
        r.unwrap_err().code(),
        Some(ErrorCode::AccessDenied),
        "link/f is open below d again"
    );
    assert!(root.join("d/sub/f").is_file());
}

/// A handle opened through a link to one of a file's two hard links, and
/// that name then removed by a local process: the file now lies only
/// below the other directory, which is not renamed under it, and the
/// directory of the removed name renames freely (the session-26 review:
/// the kernel named the file by its removed name, so the wrong directory
/// was refused and the right one renamed).
#[test]
fn a_directory_rename_places_a_file_by_a_name_it_still_has() {
    let s = Scratch::new("dir-rename-removed-alias");
    let root = s.root();
    std::fs::create_dir_all(root.join("other")).unwrap();
    std::fs::create_dir_all(root.join("hd/sub")).unwrap();
    std::fs::write(root.join("other/g2"), "g2").unwrap();
    std::fs::hard_link(root.join("other/g2"), root.join("hd/sub/g2")).unwrap();
    std::os::unix::fs::symlink("other/g2", root.join("hl")).unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb", "smb-a");
    fe.open(req(
        "c",
        "hl",
        Rights::READ,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ))
    .unwrap();
    std::fs::remove_file(root.join("other/g2")).unwrap();
    let p = |p: &str| RelPath::new(p).unwrap();
    fe.rename_directory(p("other"), p("other2"), false, None)
        .expect("nothing open lies below other now");
    let r = fe.rename_directory(p("hd"), p("hd2"), false, None);
    assert_eq!(
        r.unwrap_err().code(),
        Some(ErrorCode::AccessDenied),
        "the file's only name is below hd"
    );
    assert!(root.join("hd/sub/g2").is_file());
}

/// A create-if-absent of a name that is a symbolic link leading nowhere
/// is "not found" at once: before, the open found nothing through it and
/// the exclusive create found the link, round after round, and the answer
/// was "retry" — forever, for a client that retries (the session-26
/// review). Unmarked and marked (a persistent create with a GUID) alike;
/// nothing is created.
#[test]
fn a_create_through_a_dangling_link_is_not_found() {
    let s = Scratch::new("dangling-link");
    let root = s.root();
    std::os::unix::fs::symlink("nowhere", root.join("dangle")).unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb", "smb-a");
    for (dur, guid) in [
        (Durability::None, None),
        (
            Durability::Persistent { timeout_ms: 60_000 },
            Some(CreateGuid(uuid::Uuid::new_v4())),
        ),
    ] {
        for disp in [Disposition::OpenIf, Disposition::OverwriteIf] {
            let mut r = req("c", "dangle", RW, Rights::ALL, disp, dur);
            r.create_guid = guid;
            let e = fe.open(r).expect_err("nothing to open");
            assert_eq!(e.code(), Some(ErrorCode::NotFound), "{disp:?} {dur:?}: {e}");
        }
    }
    assert!(!root.join("nowhere").exists());
    assert!(std::fs::symlink_metadata(root.join("dangle"))
        .unwrap()
        .is_symlink());
}

/// Attaches a raw SEQPACKET frontend, sends `frames` after a valid hello, and
/// returns each reply (id, frame).
fn raw_exchange(s: &Scratch, frames: &[&[u8]]) -> Vec<(Option<u64>, Value)> {
    use libfilter::sys::{recv_packet, send_packet, Packet};
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(&s.socket()).unwrap()).unwrap();
    // A fresh instance name per exchange: the daemon may not have seen the
    // previous exchange's connection close yet, and refuses a second live
    // connection of one instance.
    let hello = format!(
        r#"{{"version":1,"role":{{"kind":"frontend","protocol":"raw","instance":"raw-{}"}}}}"#,
        uuid::Uuid::new_v4().simple()
    );
    send_packet(fd.as_fd(), hello.as_bytes(), None).unwrap();
    let mut buf = vec![0u8; 70_000];
    let recv = |buf: &mut Vec<u8>| -> Value {
        match recv_packet(fd.as_fd(), buf).unwrap() {
            Packet::Data { len, .. } => serde_json::from_slice(&buf[..len]).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    assert!(recv(&mut buf).get("frame").is_some());
    let mut out = vec![];
    for f in frames {
        send_packet(fd.as_fd(), f, None).unwrap();
        let v = recv(&mut buf);
        out.push((v["id"].as_u64(), v));
    }
    out
}

#[test]
fn malformed_frames_get_errors_and_change_nothing() {
    let s = Scratch::new("garbage");
    let _d = Filterd::start(&s, &[], &[]);
    let mut fe = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let p = fe.cmd(persistent_create("p"));
    assert_eq!(p["ok"], true);
    let before = handles_json(&s);
    let big = vec![b'x'; 70_000];
    let frames: Vec<&[u8]> = vec![
        b"\x00\x01\x02garbage",
        b"{not json",
        b"[]",
        br#"{"id":5,"op":"format_disk"}"#,
        br#"{"id":6,"op":"close","key":"not-a-uuid"}"#,
        br#"{"id":7,"op":"open","client":"","path":"p","access":[],"share":[],"disposition":"open","durability":{"kind":"none"}}"#,
        br#"{"id":8,"op":"open","client":"c","path":"p","access":["read"],"share":["everything"],"disposition":"open","durability":{"kind":"none"}}"#,
        br#"{"id":10,"op":"close","key":"00000000-0000-0000-0000-000000000000"}"#,
        &big,
        br#"{"id":11,"op":"status"}"#,
    ];
    let replies = raw_exchange(&s, &frames);
    for (i, (id, r)) in replies.iter().enumerate().take(9) {
        let code = &r["result"]["Err"]["code"];
        assert!(code.is_string(), "frame {i} got {r}");
        if i == 7 {
            assert_eq!(*code, "no_such_handle");
        } else {
            assert_eq!(*code, "bad_frame", "frame {i}: {r}");
        }
        if (3..=7).contains(&i) {
            assert!(id.is_some(), "frame {i} should echo its id: {r}");
        }
    }
    // The connection is still usable after all that.
    assert_eq!(replies[9].0, Some(11));
    assert!(replies[9].1["result"]["Ok"].is_object(), "{}", replies[9].1);
    // Garbage instead of a hello: an error, then the connection closes.
    {
        use libfilter::sys::{recv_packet, send_packet, Packet};
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(&s.socket()).unwrap()).unwrap();
        send_packet(fd.as_fd(), b"GET / HTTP/1.1\r\n\r\n", None).unwrap();
        let mut buf = vec![0u8; 70_000];
        match recv_packet(fd.as_fd(), &mut buf).unwrap() {
            Packet::Data { len, .. } => {
                let v: Value = serde_json::from_slice(&buf[..len]).unwrap();
                assert_eq!(v["result"]["Err"]["code"], "bad_frame");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            recv_packet(fd.as_fd(), &mut buf).unwrap(),
            Packet::Eof
        ));
        // A hello with a version from the future.
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(&s.socket()).unwrap()).unwrap();
        send_packet(
            fd.as_fd(),
            br#"{"version":99,"role":{"kind":"control"}}"#,
            None,
        )
        .unwrap();
        match recv_packet(fd.as_fd(), &mut buf).unwrap() {
            Packet::Data { len, .. } => {
                let v: Value = serde_json::from_slice(&buf[..len]).unwrap();
                assert_eq!(v["result"]["Err"]["code"], "unsupported_version");
            }
            other => panic!("{other:?}"),
        }
    }
    // Stored state is exactly as before, and the daemon still serves.
    assert_eq!(handles_json(&s), before);
    let r = fe.cmd(json!({"cmd": "read", "key": p["key"], "offset": 0, "len": 1}));
    assert_eq!(r["ok"], true);
    assert!(stats(&s)["bad_frames"].as_u64().unwrap() >= 9);
    // A control connection may not open files.
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let r = ctl.call(Request::Open(req(
        "c",
        "p",
        Rights::READ,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    )));
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotPermitted));
}

#[test]
fn filterctl_reads_state_while_filterd_is_down() {
    let s = Scratch::new("offline");
    let mut d = Filterd::start(&s, &[], &[]);
    let mut fe = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let p = fe.cmd(persistent_create("dir-less.txt"));
    assert_eq!(p["ok"], true);
    d.kill9();
    let st = s.state();
    let out = filterctl(&["--state", st.to_str().unwrap(), "handles", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let hs = handle_list(&out.json());
    assert_eq!(hs.len(), 1, "{}", out.stdout);
    assert_eq!(hs[0]["key"], p["key"]);
    assert_eq!(hs[0]["path"], "dir-less.txt");
    let out = filterctl(&["--state", st.to_str().unwrap(), "handles"]);
    assert_eq!(out.code, 0);
    assert!(out.stdout.contains("dir-less.txt"), "{}", out.stdout);
    let out = filterctl(&["--state", st.to_str().unwrap(), "status"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let key = p["key"].as_str().unwrap();
    let out = filterctl(&["--state", st.to_str().unwrap(), "expire", key]);
    assert_eq!(out.code, 1, "mutating offline must refuse: {}", out.stdout);
    drop(fe);
    // The offline view is what the restarted daemon shows: the handle
    // (connected when the daemon died) disconnected, same path and modes.
    assert_eq!(hs[0]["conn"]["state"], "disconnected", "{}", hs[0]);
    let _d2 = Filterd::start(&s, &[], &[]);
    let live = handle_list(&handles_json(&s));
    assert_eq!(live.len(), 1);
    for f in [
        "key",
        "path",
        "access",
        "share",
        "durability",
        "client",
        "frontend",
    ] {
        assert_eq!(live[0][f], hs[0][f], "{f}");
    }
    assert_eq!(live[0]["conn"]["state"], hs[0]["conn"]["state"]);
}

#[test]
fn restart_reopens_persistent_handles_by_file_handle() {
    let s = Scratch::new("restart");
    let mut d = Filterd::start(&s, &[], &[]);
    let mut fe = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let g = uuid::Uuid::new_v4().to_string();
    let p = fe.cmd(open_cmd(
        "alice",
        "before.txt",
        &["read", "write"],
        &[],
        "create",
        json!({"kind": "persistent", "timeout_ms": 60000}),
        Some(&g),
    ));
    assert_eq!(p["ok"], true, "{p}");
    fe.cmd(json!({"cmd": "write", "key": p["key"], "offset": 0, "data": "kept"}));
    let gone = fe.cmd(open_cmd(
        "alice",
        "gone.txt",
        &["read"],
        &[],
        "create",
        json!({"kind": "persistent", "timeout_ms": 60000}),
        None,
    ));
    let epoch = fe.epoch;
    d.kill9();
    drop(fe);
    // While the daemon is down, the file is renamed and another deleted.
    std::fs::rename(s.root().join("before.txt"), s.root().join("after.txt")).unwrap();
    std::fs::remove_file(s.root().join("gone.txt")).unwrap();
    let _d2 = Filterd::start(&s, &[], &[]);
    assert_eq!(state_of(&s, &p["key"]), "disconnected");
    assert_eq!(
        state_of(&s, &gone["key"]),
        "lost",
        "a vanished file is reported, not dropped"
    );
    // Its share mode (none) protects the file under its new name.
    let other = frontend(&s, "nfs", "nfs-1");
    let r = other.open(req(
        "bob",
        "after.txt",
        Rights::READ,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ));
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::FileNotAvailable));
    let mut fe = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    assert!(fe.epoch > epoch);
    let r = fe.cmd(json!({"cmd": "resume", "client": "alice", "create_guid": g}));
    assert_eq!(r["ok"], true, "{r}");
    let data = fe.cmd(json!({"cmd": "read", "key": p["key"], "offset": 0, "len": 10}));
    assert_eq!(data["data"], "kept");
    assert!(stats(&s)["recoveries"].as_u64().unwrap() >= 1);
}

#[test]
fn failpoints_prove_no_reply_before_commit() {
    // Crash before the commit: the open was never acknowledged and is not
    // there after restart. Crash after the commit but before the reply: it
    // is there (disconnected), so the client's replay can find it.
    for (fp, expect_present) in [("commit.before", false), ("commit.after", true)] {
        let s = Scratch::new("failpoint");
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
        let fe = frontend(&s, "smb", "smb-a");
        let mut r = req(
            "alice",
            "f",
            RW,
            Rights::NONE,
            Disposition::Create,
            Durability::Persistent { timeout_ms: 60000 },
        );
        let g = CreateGuid(uuid::Uuid::new_v4());
        r.create_guid = Some(g);
        let res = fe.open(r);
        assert!(res.is_err(), "{fp}: no reply may arrive: {res:?}");
        d.wait_killed_at(fp, Duration::from_secs(10));
        let _d2 = Filterd::start(&s, &[], &[]);
        let fe2 = frontend(&s, "smb", "smb-a");
        let resumed = fe2.resume_by_guid(ClientId::new("alice").unwrap(), g);
        assert_eq!(resumed.is_ok(), expect_present, "{fp}: {resumed:?}");
    }
}

#[test]
fn one_active_daemon_per_state_dir_and_clean_shutdown() {
    let s = Scratch::new("single");
    let mut d = Filterd::start(&s, &[], &[]);
    // Something for the standby to recover.
    let mut fe = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let p = fe.cmd(open_cmd(
        "alice",
        "kept.txt",
        &["read", "write"],
        &[],
        "create",
        json!({"kind": "persistent", "timeout_ms": 60000}),
        None,
    ));
    assert_eq!(p["ok"], true, "{p}");
    let mut second = Filterd::spawn(&s, &[], &[]);
    let st = second.wait_exit(Duration::from_secs(10));
    assert!(!st.success());
    let log = second.log_text();
    assert!(log.contains("another filterd"), "{log}");
    // A standby takes over when the active one dies.
    let mut standby = Filterd::spawn(&s, &["--standby"], &[]);
    let ctl = d.control();
    let pid1 = ctl.hello().pid;
    d.kill9();
    let t0 = std::time::Instant::now();
    standby.wait_ready();
    let took = t0.elapsed();
    let pid2 = standby.control().hello().pid;
    assert_ne!(pid1, pid2);
    assert!(
        took < Duration::from_secs(1),
        "standby must take over within a second, took {took:?}"
    );
    drop(fe);
    assert_eq!(
        state_of(&s, &p["key"]),
        "disconnected",
        "the standby recovered the handle"
    );
    let bob = frontend(&s, "nfs", "nfs-1").open(req(
        "bob",
        "kept.txt",
        Rights::READ,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ));
    assert_eq!(
        bob.err().and_then(|e| e.code()),
        Some(ErrorCode::FileNotAvailable),
        "and it protects the file"
    );
    // A second standby behind it stops on SIGTERM while it waits.
    let other = s.dir.join("standby2.sock");
    let mut standby2 = Filterd::spawn_on(&s, Some(&other), &[], &["--standby"], &[]);
    standby2.wait_log("waiting for the active filterd", Duration::from_secs(10));
    standby2.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(standby2.wait_exit(Duration::from_secs(5)).success());
    assert!(standby.terminate().success(), "SIGTERM must exit 0");
    assert!(!s.socket().exists(), "socket removed on clean shutdown");
}

#[test]
fn every_program_has_help_and_version() {
    for p in ["filterd", "filterctl", "smbshim", "nfsshim", "rksmbd"] {
        let out = std::process::Command::new(bin(p))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{p} --help");
        let out = std::process::Command::new(bin(p))
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{p} --version");
    }
}

/// spec/cli.md: "a bad flag or missing argument gives a one-line error
/// naming it and exit 2" — for every program, not clap's error followed by
/// its usage block (5 to 8 lines before).
#[test]
fn a_usage_error_is_one_line_naming_the_flag_with_a_hint() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("filterd", &["--no-such-flag"], "--no-such-flag"),
        ("filterd", &["--root", "/tmp"], "--state"),
        ("filterctl", &["--no-such-flag"], "--no-such-flag"),
        ("filterctl", &["--socket", "/x"], "status"),
        ("filterctl", &["--socket", "/x", "handle"], "KEY"),
        // A malformed key is bad usage, said before any daemon is asked
        // (it was exit 1, "cannot connect", with no word of the key).
        ("filterctl", &["--socket", "/x", "handle", "notakey"], "KEY"),
        ("filterctl", &["--socket", "/x", "expire", "notakey"], "KEY"),
        (
            "filterctl",
            &["--socket", "/x", "--timeout-ms", "0", "status"],
            "--timeout-ms",
        ),
        (
            "filterctl",
            &["--socket", "/x", "--state", "/y", "status"],
            "--state",
        ),
        ("filterctl", &[], "--socket"),
        ("smbshim", &["--no-such-flag"], "--no-such-flag"),
        ("smbshim", &["--filter", "/x"], "--listen"),
        (
            "smbshim",
            &["--filter", "/x", "--listen", "nonsense"],
            "--listen",
        ),
        ("nfsshim", &["--no-such-flag"], "--no-such-flag"),
        ("nfsshim", &["--listen", "127.0.0.1:0"], "--filter"),
        // Lease lengths under their minimum are refused, not silently
        // raised (filterd's TTL was raised to 2 s, nfsshim's lease to 1 s).
        (
            "nfsshim",
            &[
                "--filter",
                "/x",
                "--listen",
                "127.0.0.1:0",
                "--lease-ms",
                "500",
            ],
            "--lease-ms",
        ),
        (
            "filterd",
            &["--root", "/x", "--state", "/y", "--lease-ttl-secs", "1"],
            "--lease-ttl-secs",
        ),
        ("rksmbd", &["--no-such-flag"], "--no-such-flag"),
        (
            "rksmbd",
            &["--filter", "/x", "--listen", "127.0.0.1:0"],
            "--share",
        ),
    ];
    for (p, args, names) in cases {
        let out = std::process::Command::new(bin(p))
            .args(*args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{p} {args:?}: {err}");
        assert!(out.stdout.is_empty(), "{p} {args:?}");
        assert_eq!(err.lines().count(), 1, "{p} {args:?}:\n{err}");
        assert!(err.starts_with(&format!("{p}: ")), "{p} {args:?}: {err}");
        assert!(err.contains(names), "{p} {args:?} names {names}: {err}");
        assert!(err.contains("--help"), "{p} {args:?}: {err}");
    }
}

/// A path component swapped between a directory inside the root and a
/// symlink to /etc while opens race it: every open either resolves inside
/// the root or is refused — never a file outside (openat2 resolves the
/// whole path at once, beneath the root).
#[test]
fn confinement_holds_while_a_symlink_is_swapped_in() {
    use std::io::Read;
    let s = Scratch::new("confine-race");
    let _d = Filterd::start(&s, &[], &[]);
    let root = s.root();
    std::fs::create_dir(root.join("real")).unwrap();
    std::fs::write(root.join("real/passwd"), b"inside").unwrap();
    std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (root, stop) = (root.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // "d" is the real directory one moment, the symlink the next.
                let from = if n.is_multiple_of(2) { "real" } else { "evil" };
                let _ = std::fs::rename(root.join(from), root.join("d"));
                let _ = std::fs::rename(root.join("d"), root.join(from));
                n += 1;
            }
            n
        })
    };
    let fe = frontend(&s, "smb", "smb-race");
    // Until both outcomes were seen: opens that resolved through the real
    // directory, and opens refused because "d" was the symlink out of the
    // root (AccessDenied). Without both, the race was not exercised.
    let (mut inside, mut refused, mut absent) = (0, 0, 0);
    let t0 = std::time::Instant::now();
    while (inside == 0 || refused == 0) && t0.elapsed() < Duration::from_secs(30) {
        match fe.open(req(
            "c",
            "d/passwd",
            Rights::READ,
            Rights::ALL,
            Disposition::Open,
            Durability::None,
        )) {
            Ok(h) => {
                let mut text = String::new();
                std::fs::File::from(h.fd).read_to_string(&mut text).unwrap();
                assert_eq!(text, "inside", "an open escaped the root");
                fe.close(h.info.key).unwrap();
                inside += 1;
            }
            Err(e) => match e.code() {
                Some(ErrorCode::AccessDenied) => {
                    assert!(e.to_string().contains("outside the export root"), "{e}");
                    refused += 1;
                }
                Some(ErrorCode::NotFound) | Some(ErrorCode::PathNotFound) => absent += 1,
                _ => panic!("unexpected refusal: {e}"),
            },
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    eprintln!("{inside} opens inside, {refused} refused, {absent} absent, {swaps} swaps");
    assert!(
        inside > 0 && refused > 0,
        "the race must reach both the real directory and the symlink out"
    );
}

/// `filterctl … | head`: a reader that goes away before filterctl writes
/// ends it quietly (exit 0, nothing on stderr) — not a panic with a
/// backtrace from `println!`.
#[test]
fn filterctl_stops_quietly_when_its_reader_goes_away() {
    let s = Scratch::new("ctl-epipe");
    let d = Filterd::start(&s, &[], &[]);
    let sock = d.socket().to_string_lossy().into_owned();
    for args in [
        vec!["--socket", &sock, "stats"],
        vec!["--socket", &sock, "status", "--json"],
    ] {
        // The read end is closed before filterctl starts: its first write
        // gets EPIPE.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = std::process::Command::new(bin("filterctl"))
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .stdout(writer)
            .output()
            .expect("run filterctl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.is_empty(),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}

/// An error printed by filterctl is one line that names its cause once
/// (a refusal of filterd's, an LMDB error), not the cause twice over.
#[test]
fn filterctl_errors_name_their_cause_once() {
    let s = Scratch::new("ctl-once");
    let d = Filterd::start(&s, &[], &[]);
    let sock = d.socket().to_string_lossy().into_owned();
    let key = "00000000-0000-0000-0000-000000000000";
    let out = filterctl(&["--socket", &sock, "handle", key]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert_eq!(
        out.stderr.matches(&format!("no handle {key}")).count(),
        1,
        "{}",
        out.stderr
    );
    // A state dir whose LMDB file is not one, with no daemon.
    let junk = s.dir.join("junk");
    std::fs::create_dir_all(junk.join("lmdb")).unwrap();
    std::fs::write(junk.join("lmdb/data.mdb"), b"not lmdb").unwrap();
    let out = filterctl(&["--state", junk.to_str().unwrap(), "handles"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert_eq!(
        out.stderr.matches("not an LMDB file").count(),
        1,
        "{}",
        out.stderr
    );
}

/// smbshim, nfsshim and rksmbd that cannot start say why in one line
/// (`PROGRAM: what: why`, as filterd and filterctl do) and exit 1 — not
/// anyhow's multi-line report with a backtrace.
#[test]
fn frontends_that_cannot_listen_say_why_in_one_line() {
    let s = Scratch::new("shim-one-line");
    let d = Filterd::start(&s, &[], &[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let users = s.dir.join("users");
    let mut hash = std::process::Command::new(bin("rksmbd"))
        .args(["hash-password", "u"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("rksmbd hash-password");
    {
        use std::io::Write;
        hash.stdin.take().unwrap().write_all(b"pw\n").unwrap();
    }
    rkfilter_tests::write_users_file(&users, &hash.wait_with_output().unwrap().stdout);
    for (prog, extra) in [
        ("smbshim", vec![]),
        ("nfsshim", vec![]),
        (
            "rksmbd",
            vec!["--share", "s", "--users", users.to_str().unwrap()],
        ),
    ] {
        let out = std::process::Command::new(bin(prog))
            .arg("--filter")
            .arg(d.socket())
            .args(["--listen", &addr, "--instance", &format!("{prog}-busy")])
            .args(&extra)
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("run the frontend");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{prog}: {err}");
        assert_eq!(err.lines().count(), 1, "{prog}: {err}");
        assert!(
            err.starts_with(&format!("{prog}: listening on {addr}: ")) && err.contains("in use"),
            "{prog}: {err}"
        );
    }
}

/// A malformed `--listen` is bad usage (exit 2, the flag named), found
/// before the frontend attaches to filterd — here there is none to attach
/// to, which it would otherwise wait 30 s for.
#[test]
fn a_malformed_listen_is_bad_usage() {
    let s = Scratch::new("bad-listen");
    for prog in ["smbshim", "nfsshim", "rksmbd"] {
        for listen in ["nonsense", "127.0.0.1:http", ":4450", "127.0.0.1:70000"] {
            let mut cmd = std::process::Command::new(bin(prog));
            cmd.arg("--filter")
                .arg(s.socket())
                .args(["--listen", listen]);
            if prog == "rksmbd" {
                cmd.args(["--share", "s", "--users", "/dev/null"]);
            }
            let out = cmd.output().expect("run the frontend");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{prog} {listen}: {err}");
            let first = err.lines().next().unwrap_or_default();
            assert!(first.contains("--listen"), "{prog} {listen}: {err}");
        }
    }
}

/// `filterctl --state DIR locks` with the daemon down names a lock's
/// owner as the live daemon did (the lock owner the frontend gave, e.g.
/// nfsshim's `OWNER-lock`), not the owner of the open.
#[test]
fn offline_locks_name_the_owner_the_live_daemon_names() {
    let s = Scratch::new("ctl-lock-owner");
    let mut d = Filterd::start(&s, &[], &[]);
    let nfs = rkfilter_tests::Shim::start("nfsshim", d.socket(), "nfs");
    let mut c = std::process::Command::new(bin("nfsshim"))
        .args(["client", &nfs.addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("nfsshim client");
    {
        use std::io::Write;
        let mut stdin = c.stdin.take().unwrap();
        stdin
            .write_all(b"exchange bob\nsession\nopen b.txt create=unchecked\nlock . 0 eof write\n")
            .unwrap();
    }
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lock_stateid"), "{text}");
    let sock = d.socket().to_string_lossy().into_owned();
    let owners = |v: Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["owner"].clone())
            .collect()
    };
    let live = owners(filterctl(&["--socket", &sock, "locks", "--json"]).json());
    assert_eq!(live, vec![json!("bob-lock")]);
    assert!(d.terminate().success());
    let state = s.state().to_string_lossy().into_owned();
    let offline = owners(filterctl(&["--state", &state, "locks", "--json"]).json());
    assert_eq!(offline, live, "offline locks name the lock owner");
}

/// A malformed `--store` is bad usage, as any bad flag value: exit 2 and
/// an error naming the flag — for filterd and for filterctl.
#[test]
fn a_malformed_store_is_bad_usage() {
    let s = Scratch::new("bad-store");
    let (root, state) = (s.root(), s.state());
    for (prog, args) in [
        (
            "filterctl",
            vec!["--store", "etcd://127.0.0.1:2379", "status"],
        ),
        ("filterctl", vec!["--store", "foo", "handles"]),
        (
            "filterd",
            vec![
                "--root",
                root.to_str().unwrap(),
                "--state",
                state.to_str().unwrap(),
                "--no-fanotify",
                "--store",
                "etcd://127.0.0.1:2379",
            ],
        ),
    ] {
        let out = std::process::Command::new(bin(prog))
            .args(&args)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{prog} {args:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(first.contains("--store"), "{prog} {args:?}: {err}");
    }
}

/// filterctl against an etcd that is not there says so in one line that
/// names the endpoint and the cause, exit 1, within a few seconds. Before:
/// after 10 s of retries, tonic's whole transport error on one long line
/// (`grpc request error: code: ... source: tonic::transport::Error(...)`).
#[test]
fn filterctl_names_an_unreachable_etcd_in_one_line_quickly() {
    // Nothing listens on port 1; the listener below never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = silent.local_addr().unwrap().to_string();
    for (endpoint, cause) in [("127.0.0.1:1", "connection refused"), (silent.as_str(), "")] {
        let url = format!("etcd://{endpoint}/rk");
        let t0 = std::time::Instant::now();
        let out = filterctl(&["--store", &url, "status"]);
        let took = t0.elapsed();
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        let expect = format!("etcd at {endpoint} is not reachable: {cause}");
        assert!(out.stderr.contains(&expect), "{expect:?} in {}", out.stderr);
        assert!(!out.stderr.contains("tonic"), "{}", out.stderr);
        assert!(took < Duration::from_secs(6), "took {took:?}");
    }
}

/// filterctl against a daemon that does not answer — stopped, a socket
/// whose listener accepts and never replies, or one whose backlog is
/// full — gives up after
/// `--timeout-ms`, exit 1, in one line saying so. Before, it waited
/// forever in the hello (the kernel accepts into the backlog for a
/// stopped process), exactly when an operator or a monitor asks.
#[test]
fn filterctl_gives_up_on_a_daemon_that_does_not_answer() {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let s = Scratch::new("ctl-timeout");
    let d = Filterd::start(&s, &[], &[]);
    let sock = d.socket().to_str().expect("utf-8 path").to_owned();
    let seqpacket = || {
        socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket")
    };
    // A listener that never accepts (its backlog takes `backlog` + 1).
    let listening = |name: &str, backlog: i32| {
        let path = s.root().join("..").join(name);
        let l = seqpacket();
        bind(l.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("bind");
        listen(&l, Backlog::new(backlog).expect("backlog")).expect("listen");
        (l, path.to_str().expect("utf-8 path").to_owned())
    };
    let (_silent_listener, silent) = listening("silent.sock", 8);
    // A listener whose backlog is full: a Unix connect waits for room.
    let (_full_listener, full) = listening("full.sock", 0);
    let filler = seqpacket();
    nix::sys::socket::connect(
        filler.as_raw_fd(),
        &UnixAddr::new(full.as_str()).expect("addr"),
    )
    .expect("the backlog's one place");
    d.stop();
    for target in [&sock, &silent, &full] {
        let mut child = std::process::Command::new(bin("filterctl"))
            .args(["--socket", target, "--timeout-ms", "500", "status"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run filterctl");
        // Polled, and killed if it still waits (the test fails, not hangs).
        let t0 = std::time::Instant::now();
        let code = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status.code();
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("filterctl --socket {target} still waiting after 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
            .expect("read stderr");
        assert_eq!(code, Some(1), "{target}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("did not answer within 500ms"), "{err}");
        assert!(err.contains(target.as_str()), "names the socket: {err}");
    }
    d.signal(nix::sys::signal::Signal::SIGCONT);
    let out = filterctl(&["--socket", &sock, "--timeout-ms", "5000", "status"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

/// A frontend started before filterd waits for it (it may be starting or
/// recovering), says so once on stderr after a second rather than leaving
/// the operator 30 s of silence, and attaches as soon as filterd is up.
/// Before, nothing was said until the 30 s ran out.
#[test]
fn a_frontend_started_before_filterd_says_it_waits_then_attaches() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    for prog in ["smbshim", "nfsshim"] {
        let s = Scratch::new(&format!("{prog}-early"));
        let mut child = Command::new(bin(prog))
            .arg("--filter")
            .arg(s.socket())
            .args(["--listen", "127.0.0.1:0", "--instance", "early"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the frontend");
        let lines = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = crossbeam_channel::unbounded();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
            rx
        };
        let err = lines(Box::new(child.stderr.take().expect("stderr")));
        let out = lines(Box::new(child.stdout.take().expect("stdout")));
        let said = err
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("{prog} said nothing while it waited for filterd"));
        assert!(
            said.starts_with(&format!("{prog}: filterd at {} ", s.socket().display()))
                && said.contains("is not answering yet")
                && said.ends_with("waiting up to 30 s"),
            "{said}"
        );
        let _d = Filterd::start(&s, &[], &[]);
        let listening = out
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{prog} did not attach once filterd was up"));
        assert!(listening.starts_with("listening on "), "{listening}");
        assert!(err.try_recv().is_err(), "{prog} said it more than once");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A frontend started against a filterd that accepts and does not answer
/// (stopped) says it waits after a second and gives up at its start wait
/// (30 s), exit non-zero, naming the cause — however long its call
/// timeout. Before, it waited in the hello forever.
#[test]
fn a_frontend_started_against_a_stopped_filterd_gives_up_at_its_start_wait() {
    use std::process::{Command, Stdio};
    let s = Scratch::new("smbshim-stopped");
    let d = Filterd::start(&s, &[], &[]);
    d.stop();
    let t0 = std::time::Instant::now();
    let mut child = Command::new(bin("smbshim"))
        .arg("--filter")
        .arg(s.socket())
        .args(["--listen", "127.0.0.1:0", "--instance", "stopped"])
        .env("RKFILTER_CALL_TIMEOUT_MS", "120000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn smbshim");
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("smbshim still waiting for a stopped filterd after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t0.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    assert!(!status.success(), "{err}");
    assert!(
        took >= Duration::from_secs(25) && took < Duration::from_secs(50),
        "took {took:?}: {err}"
    );
    assert!(err.contains("is not answering yet"), "said it waits: {err}");
    assert!(err.contains("did not answer within"), "{err}");
    d.signal(nix::sys::signal::Signal::SIGCONT);
}

/// Every file under `dir` with its bytes, for "wrote nothing" checks.
fn tree(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            if p.is_dir() {
                todo.push(p.clone());
                out.insert(name + "/", Vec::new());
            } else if p.is_file() {
                out.insert(name, std::fs::read(&p).unwrap());
            } else {
                out.insert(name, b"(special)".to_vec());
            }
        }
    }
    out
}

/// Offline filterctl inspects a state dir without writing into it: not a
/// `lock.mdb` next to a file that is not LMDB, nor beside a good store
/// whose lock file is gone (a copy taken for a post-mortem), nor anything
/// where there is no store at all — and a store it cannot read is named in
/// one line. With a live filterd, `--state` still answers.
#[test]
fn offline_filterctl_writes_nothing_into_the_state_dir() {
    let s = Scratch::new("ctl-readonly");
    let empty = s.dir.join("empty");
    let no_data = s.dir.join("no-data");
    let junk = s.dir.join("junk");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::create_dir_all(no_data.join("lmdb")).unwrap();
    std::fs::create_dir_all(junk.join("lmdb")).unwrap();
    std::fs::write(junk.join("lmdb/data.mdb"), vec![0x5a; 8192]).unwrap();
    for (dir, says) in [
        (&empty, "missing database data.mdb"),
        (&no_data, "missing database data.mdb"),
        (&junk, "not an LMDB file"),
    ] {
        let before = tree(dir);
        let out = filterctl(&["--state", dir.to_str().unwrap(), "handles"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(out.stderr.contains(says), "{}", out.stderr);
        assert_eq!(
            tree(dir).keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>()
        );
        assert!(tree(dir) == before, "{} changed", dir.display());
    }

    // A live daemon's state dir: answered (through its socket).
    let mut d = Filterd::start(&s, &[], &[]);
    let st = s.state();
    let mut fe = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let p = fe.cmd(persistent_create("kept.txt"));
    assert_eq!(p["ok"], true);
    let out = filterctl(&["--state", st.to_str().unwrap(), "handles", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(handle_list(&out.json()).len(), 1, "{}", out.stdout);
    d.kill9();
    drop(fe);

    // A copy of the dead daemon's store without its lock file.
    let copy = s.dir.join("copy");
    std::fs::create_dir_all(copy.join("lmdb")).unwrap();
    std::fs::copy(st.join("lmdb/data.mdb"), copy.join("lmdb/data.mdb")).unwrap();
    let before = tree(&copy);
    let out = filterctl(&["--state", copy.to_str().unwrap(), "handles", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let hs = handle_list(&out.json());
    assert_eq!(hs.len(), 1, "{}", out.stdout);
    assert_eq!(hs[0]["key"], p["key"]);
    assert_eq!(
        tree(&copy).keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert!(tree(&copy) == before, "the copy changed");

    // The dead daemon's own dir (its lock file left behind) reads as well.
    let out = filterctl(&["--state", st.to_str().unwrap(), "handles", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(handle_list(&out.json()).len(), 1, "{}", out.stdout);
}
