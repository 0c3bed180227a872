//! The crash-point matrix for the changes the first matrix
//! (`exactly_once.rs`) did not reach: delete on close, rename with replace,
//! and an end-of-file change with another client's WRITE in flight. For
//! each named failpoint on the operation's path: filterd dies there, is
//! restarted, the client does what a real client does (reconnect, look up
//! its recorded reply, re-send), and the outcome must be the one it would
//! have seen without the crash — nothing applied twice, nothing
//! acknowledged lost.

use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::OpenRequest;
use libfilter::store::Store;
use rkfilter_tests::{plain_open, wait_for, Filterd, InFlight, LineClient, Scratch, Shim};
use serde_json::json;

fn frontend(s: &Scratch) -> FilterClient {
    FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-a").unwrap(),
    )
    .expect("attach")
}

fn req(path: &str, guid: CreateGuid) -> OpenRequest {
    OpenRequest {
        access: Access::new(Rights::READ.union(Rights::WRITE).union(Rights::DELETE)).unwrap(),
        share: Rights::READ,
        disposition: Disposition::OpenIf,
        durability: Durability::Persistent { timeout_ms: 60_000 },
        create_guid: Some(guid),
        ..plain_open("alice", path)
    }
}

/// The change marks (`*.rkfilter.intent`) a file carries.
fn change_marks(path: &std::path::Path) -> Vec<String> {
    rkfilter_tests::markers_on(path, "rkfilter.intent")
}

fn store_is_clean(s: &Scratch) {
    let store = Store::open_read_only(&s.state()).unwrap();
    assert!(store.intents().unwrap().is_empty(), "no dangling intent");
}

/// Delete on close. Commits: 1 the open, 2 the flag, 3 the close with its
/// unlink intent, 4 the intent's end (then the CLOSE is answered).
#[test]
fn delete_on_close_at_every_failpoint() {
    for fp in [
        "commit.before:3",
        "commit.after:3",
        "intent.after_commit:1",
        "intent.after_fs:1",
        "commit.before:4",
        "commit.after:4",
        "reply.before_send:3",
        // The remove prepared, its system call not made.
        "fs.before_change:1",
    ] {
        let s = Scratch::new("cm-doc");
        std::fs::write(s.root().join("f"), b"doomed").unwrap();
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
        let guid = CreateGuid(uuid::Uuid::new_v4());
        let fe = frontend(&s);
        let h = fe.open(req("f", guid)).unwrap();
        fe.set_delete_on_close(h.info.key, true, None).unwrap();
        assert!(
            fe.close(h.info.key).is_err(),
            "{fp}: filterd dies before the CLOSE is answered"
        );
        d.wait_killed_at(fp, Duration::from_secs(10));
        drop(fe);
        let _d = Filterd::start(&s, &[], &[]);
        let fe = frontend(&s);
        // The client reconnects by its create GUID: the handle is either
        // still there (the close never committed: close again) or gone with
        // its file.
        match fe.resume_by_guid(ClientId::new("alice").unwrap(), guid) {
            Ok(back) => {
                assert!(
                    s.root().join("f").exists(),
                    "{fp}: the file went before its close committed"
                );
                fe.close(back.info.key).unwrap();
            }
            Err(e) => assert!(
                matches!(e.code(), Some(libfilter::proto::ErrorCode::NoSuchHandle)),
                "{fp}: {e}"
            ),
        }
        assert!(!s.root().join("f").exists(), "{fp}: deleted in the end");
        drop(fe);
        drop(_d);
        store_is_clean(&s);
    }
}

/// Rename with replace, with a recorded reply (op id 5). Commits: 1 the
/// open, 2 the intent, 3 the rename's end with the reply.
#[test]
fn rename_with_replace_at_every_failpoint() {
    for fp in [
        "commit.before:2",
        "commit.after:2",
        "intent.after_commit:1",
        "intent.after_fs:1",
        "commit.before:3",
        "commit.after:3",
        "reply.before_send:2",
        // The rename prepared (its intent durable), not yet made.
        "fs.before_change:1",
    ] {
        let s = Scratch::new("cm-replace");
        std::fs::write(s.root().join("s"), b"source").unwrap();
        std::fs::write(s.root().join("t"), b"old target").unwrap();
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
        let guid = CreateGuid(uuid::Uuid::new_v4());
        let fe = frontend(&s);
        let h = fe.open(req("s", guid)).unwrap();
        let record = |key| RecordSpec {
            scope: ReplayScope::Handle(key),
            op_id: 5,
            reply: "{\"renamed\":true}".into(),
            keep: 64,
        };
        let to = RelPath::new("t").unwrap();
        let r = fe.rename(h.info.key, to.clone(), true, Some(record(h.info.key)));
        assert!(
            r.is_err(),
            "{fp}: filterd dies before the rename is answered"
        );
        d.wait_killed_at(fp, Duration::from_secs(10));
        drop(fe);
        let _d = Filterd::start(&s, &[], &[]);
        let fe = frontend(&s);
        let back = fe
            .resume_by_guid(ClientId::new("alice").unwrap(), guid)
            .unwrap_or_else(|e| panic!("{fp}: the handle survives: {e}"));
        // What a client does: look for the recorded reply, else re-send.
        match fe
            .lookup_reply(ReplayScope::Handle(back.info.key), 5)
            .unwrap()
        {
            Some(r) => assert_eq!(r.reply, "{\"renamed\":true}", "{fp}"),
            None => fe
                .rename(back.info.key, to.clone(), true, Some(record(back.info.key)))
                .unwrap_or_else(|e| panic!("{fp}: the re-sent rename: {e}")),
        }
        assert_eq!(
            std::fs::read(s.root().join("t")).unwrap(),
            b"source",
            "{fp}"
        );
        assert!(!s.root().join("s").exists(), "{fp}");
        let hs = FilterClient::connect_control(&s.socket())
            .unwrap()
            .handles()
            .unwrap();
        assert_eq!(
            hs[0].record.path.as_str(),
            "t",
            "{fp}: the handle follows its file"
        );
        fe.close(back.info.key).unwrap();
        drop(fe);
        drop(_d);
        store_is_clean(&s);
    }
}

/// End of file (op id 2) on a persistent smbl/1 handle while another
/// client's WRITE comes in: filterd stalls at each point, the WRITE is
/// sent, filterd is killed. Whatever the WRITE was told, an acknowledged
/// WRITE is on disk after recovery, and the re-sent SET_INFO is applied
/// exactly once. Commits: 1 the CREATE, 2 the first WRITE's reply record,
/// 3 the intent, 4 the change's end with its reply.
#[test]
fn end_of_file_with_a_concurrent_write_at_every_failpoint() {
    end_of_file_with_a_concurrent_write(EOF_FAILPOINTS, false);
}

/// The same with the WRITE coming through another frontend instance (a
/// second smbshim, as a multi-protocol server's other frontend would): it
/// learns of the size change only by the `LocksPresent` hint.
#[test]
fn end_of_file_with_a_concurrent_write_from_another_frontend_at_every_failpoint() {
    end_of_file_with_a_concurrent_write(EOF_FAILPOINTS, true);
}

const EOF_FAILPOINTS: &[&str] = &[
    "commit.before:3",
    "intent.after_commit:1",
    "intent.after_fs:1",
    "commit.before:4",
    "commit.after:4",
    "reply.before_send:3",
];

/// `separate`: bob (the WRITE) talks to a second smbshim.
fn end_of_file_with_a_concurrent_write(points: &[&str], separate: bool) {
    for &point in points {
        let (name, n) = point.split_once(':').unwrap();
        let s = Scratch::new("cm-eof");
        let armed = format!("{point}:sleep2500");
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", armed.as_str())]);
        let shim = Shim::start("smbshim", &s.socket(), "smb-m");
        let other = separate.then(|| Shim::start("smbshim", &s.socket(), "smb-n"));
        let bob_addr = other.as_ref().map_or(&shim.addr, |o| &o.addr);
        let session = |c: &mut LineClient, guid: &str, user: &str, prev: Option<u64>| {
            let mut q = json!({"cmd": "SESSION_SETUP", "client_guid": guid, "user": user});
            if let Some(p) = prev {
                q["previous_session_id"] = json!(p);
            }
            let r = c.call(q);
            r["session_id"].as_u64().expect("session")
        };
        let all = ["read", "write", "delete"];
        let (ga, create_guid) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        let mut a = LineClient::connect(&shim.addr);
        let sa = session(&mut a, &ga, "alice", None);
        let create = json!({"cmd": "CREATE", "session_id": sa, "path": "f", "access": all, "share": all,
                             "disposition": "overwrite_if",
                             "durable": {"create_guid": create_guid, "persistent": true, "timeout_ms": 60000}});
        let r = a.call(create.clone());
        assert_eq!(r["status"], "STATUS_SUCCESS", "{point}: {r}");
        let fa = r["file_id"].clone();
        let hundred =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [b'x'; 100]);
        let r = a.call(json!({"cmd": "WRITE", "session_id": sa, "file_id": fa, "offset": 0, "data": hundred, "op_id": 1}));
        assert_eq!(r["status"], "STATUS_SUCCESS", "{point}: {r}");
        let mut b = LineClient::connect(bob_addr);
        let sb = session(&mut b, &uuid::Uuid::new_v4().to_string(), "bob", None);
        let r = b.call(json!({"cmd": "CREATE", "session_id": sb, "path": "f", "access": all, "share": all, "disposition": "open"}));
        assert_eq!(r["status"], "STATUS_SUCCESS", "{point}: {r}");
        let fb = r["file_id"].clone();
        let set_info = json!({"cmd": "SET_INFO", "session_id": sa, "file_id": fa.clone(), "end_of_file": 10, "op_id": 2});
        {
            let set_info = set_info.clone();
            std::thread::spawn(move || {
                let _ = a.call(set_info);
            });
        }
        let stalled = format!("failpoint {name}: stalling");
        wait_for(
            &format!("{point} to stall (hit {n})"),
            Duration::from_secs(10),
            || d.log_text().contains(&stalled).then_some(()),
        );
        let word = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"DATA");
        let mut write = InFlight::send(
            b,
            json!({"cmd": "WRITE", "session_id": sb, "file_id": fb, "offset": 50, "data": word, "op_id": 3}),
        );
        let answered_before_the_kill = write.early(Duration::from_millis(800));
        d.kill9();
        let d2 = Filterd::start(&s, &[], &[]);
        // An answer is required: no answer (a hang, a panicked client
        // thread) is a failure, not a WRITE that was "not acknowledged".
        let write = write
            .outcome(&format!("{point}: bob's WRITE"), Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{point}: bob's WRITE answered, its connection kept"));
        rkfilter_tests::assert_answered_across_a_kill(
            &format!("{point}: the WRITE's answer"),
            &write,
        );
        // Alice moves to a new connection (tearing her old session down),
        // reconnects her open and re-sends her SET_INFO with the replay flag.
        let mut a2 = LineClient::connect(&shim.addr);
        let sa2 = session(&mut a2, &ga, "alice", Some(sa));
        let r = wait_for(
            &format!("{point}: alice's reconnect"),
            Duration::from_secs(20),
            || {
                let r = a2.call(json!({"cmd": "RECONNECT", "session_id": sa2, "file_id": fa, "create_guid": create_guid}));
                (r["status"] == "STATUS_SUCCESS").then_some(r)
            },
        );
        let fa2 = r["file_id"].clone();
        let mut again = set_info.clone();
        again["session_id"] = json!(sa2);
        again["file_id"] = fa2;
        again["replay"] = json!(true);
        let r = a2.call(again);
        assert_eq!(
            r["status"],
            "STATUS_SUCCESS",
            "{point}: the re-sent SET_INFO: {r}; the WRITE got {write}; recovery: {}",
            d2.log_text()
                .lines()
                .filter(|l| l.contains("end-of-file"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let content = std::fs::read(s.root().join("f")).unwrap();
        eprintln!(
            "{point}: the WRITE got {}, the file has {} bytes",
            write["status"],
            content.len()
        );
        assert_eq!(content.get(..10), Some(&[b'x'; 10][..]), "{point}");
        let acknowledged = write["status"] == "STATUS_SUCCESS";
        // Stalled before the intent's commit, nothing of the SET_INFO is
        // done yet: a WRITE that got through then (smbshim not yet told
        // to check the file's I/O) comes before the truncate, and the
        // re-sent SET_INFO, applied after it, legitimately cuts it off.
        let before_the_change = point == "commit.before:3" && answered_before_the_kill;
        if acknowledged && before_the_change && content.len() == 10 {
            eprintln!("{point}: the WRITE came before the change, which cut it off");
        } else if acknowledged {
            assert_eq!(
                content.get(50..54),
                Some(&b"DATA"[..]),
                "{point}: an acknowledged WRITE was lost ({} bytes)",
                content.len()
            );
        } else {
            assert_eq!(
                content.len(),
                10,
                "{point}: the change applied once, nothing else"
            );
        }
        drop(other);
        drop(shim);
    }
}

/// Makes `f` (100 bytes) and opens it for a local writer, before filterd
/// starts: an open is mediated, its writes are not.
fn local_writer(s: &Scratch) -> std::fs::File {
    std::fs::write(s.root().join("f"), [b'x'; 100]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.root().join("f"))
        .unwrap()
}

/// A size change stalled at failpoint `point` (for 20 s, to be killed
/// there): an end-of-file change to 10 (SET_INFO with a recorded reply,
/// op 2, on a persistent handle) or an overwriting persistent open, sent
/// from another thread. The file `f` must exist.
struct StalledSizeChange {
    d: Filterd,
    fe: std::sync::Arc<FilterClient>,
    /// The handle of the end-of-file change.
    key: Option<ResumeKey>,
    /// The size the change sets.
    size: u64,
    /// Whether the change was answered with success.
    bg: std::thread::JoinHandle<bool>,
}

fn stall_size_change(s: &Scratch, case: &str, point: &str) -> StalledSizeChange {
    let armed = format!("{point}:1:sleep20000");
    let d = Filterd::start(s, &[], &[("RKFILTER_FAILPOINTS", armed.as_str())]);
    let fe = std::sync::Arc::new(frontend(s));
    let mut open = req("f", CreateGuid(uuid::Uuid::new_v4()));
    open.share = Rights::ALL;
    let (size, key, bg) = match case {
        "end_of_file" => {
            let key = fe.open(open).unwrap().info.key;
            let fe = fe.clone();
            let record = RecordSpec {
                scope: ReplayScope::Handle(key),
                op_id: 2,
                reply: "done".into(),
                keep: 8,
            };
            (
                10,
                Some(key),
                std::thread::spawn(move || fe.set_end_of_file(key, 10, Some(record)).is_ok()),
            )
        }
        _ => {
            open.disposition = Disposition::Overwrite;
            let fe = fe.clone();
            (0, None, std::thread::spawn(move || fe.open(open).is_ok()))
        }
    };
    d.wait_log(
        &format!("failpoint {point}: stalling"),
        Duration::from_secs(20),
    );
    StalledSizeChange {
        d,
        fe,
        key,
        size,
        bg,
    }
}

/// F6′: a size change is made, then a local process writes the file (no
/// gate sees a local write), then filterd dies before the change's
/// completion commits. Recovery must not truncate again over the local
/// write: the file is as the local writer left it. For an end-of-file
/// change (SET_INFO, recorded reply) and an overwriting persistent open.
#[test]
fn a_local_write_after_a_size_change_survives_its_recovery() {
    use std::os::unix::fs::FileExt;
    for case in ["end_of_file", "overwrite"] {
        let s = Scratch::new("cm-eof-local");
        let local = local_writer(&s);
        let StalledSizeChange {
            mut d,
            fe,
            size,
            key,
            bg,
        } = stall_size_change(&s, case, "intent.after_fs");
        assert_eq!(
            std::fs::metadata(s.root().join("f")).unwrap().len(),
            size,
            "{case}: the change is made"
        );
        local.write_all_at(b"DATA", 50).unwrap();
        d.kill9();
        assert!(
            !bg.join().unwrap(),
            "{case}: answered before its completion"
        );
        let _d = Filterd::start(&s, &[], &[]);
        let content = std::fs::read(s.root().join("f")).unwrap();
        assert_eq!(
            content.get(50..54),
            Some(&b"DATA"[..]),
            "{case}: recovery truncated over the local write ({} bytes)",
            content.len()
        );
        assert_eq!(content.len(), 54, "{case}");
        assert!(
            _d.log_text().contains("(its mark is on the file)"),
            "{case}: recovery says why it did not redo the change"
        );
        assert_eq!(
            change_marks(&s.root().join("f")),
            Vec::<String>::new(),
            "{case}: the mark outlives its recovery"
        );
        if let Some(key) = key {
            // The change was made: its replay is told so.
            let fe2 = frontend(&s);
            fe2.resume(ClientId::new("alice").unwrap(), key)
                .expect("the handle comes back");
            let looked = fe2.lookup_reply(ReplayScope::Handle(key), 2);
            assert!(
                matches!(&looked, Ok(Some(r)) if r.reply == "done"),
                "{case}: the replay is told it was done, got {looked:?}"
            );
        }
        drop(fe);
        drop(_d);
        store_is_clean(&s);
    }
}

/// Review of F6′'s fix: filterd dies after a size change's intent commits
/// but before the change is made, and the file's metadata (not its
/// content) changes meanwhile — a chmod here; the filter's own removal of
/// a create marker does the same. Recovery took the moved status-change
/// time as "the change happened" and recorded success over a file never
/// truncated. Only a content change (size, mtime) counts now: the change
/// is made, once.
#[test]
fn a_metadata_change_is_no_sign_that_a_size_change_happened() {
    use std::os::unix::fs::PermissionsExt;
    for case in ["end_of_file", "overwrite"] {
        let s = Scratch::new("cm-eof-chmod");
        std::fs::write(s.root().join("f"), [b'x'; 100]).unwrap();
        let StalledSizeChange {
            mut d,
            fe,
            size,
            bg,
            ..
        } = stall_size_change(&s, case, "intent.after_commit");
        assert_eq!(
            std::fs::metadata(s.root().join("f")).unwrap().len(),
            100,
            "{case}: stalled before the change"
        );
        std::fs::set_permissions(s.root().join("f"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        d.kill9();
        assert!(!bg.join().unwrap(), "{case}: answered before its change");
        let _d = Filterd::start(&s, &[], &[]);
        assert_eq!(
            std::fs::metadata(s.root().join("f")).unwrap().len(),
            size,
            "{case}: recovery recorded a change it never made"
        );
        drop(fe);
        drop(_d);
        store_is_clean(&s);
    }
}

/// Review of F6′: filterd dies after a size change's intent commits but
/// before the change is made, and a local process writes the file while
/// filterd is down. The file's stamp moved, yet the change never happened:
/// recovery took the moved stamp as proof and recorded success — the
/// re-sent SET_INFO was told its truncate happened though it never did.
/// Only the change's own mark on the file proves it now; without it the
/// outcome is unknown: nothing is truncated over the local write, the
/// replay of the end-of-file change is answered with an error, and the
/// overwriting open is not brought back as done.
#[test]
fn a_local_write_while_down_is_no_sign_that_a_size_change_happened() {
    use std::os::unix::fs::FileExt;
    for case in ["end_of_file", "overwrite"] {
        let s = Scratch::new("cm-eof-down");
        let local = local_writer(&s);
        let StalledSizeChange {
            mut d, fe, key, bg, ..
        } = stall_size_change(&s, case, "intent.after_commit");
        d.kill9();
        assert!(!bg.join().unwrap(), "{case}: answered before its change");
        // filterd is down: a local process writes the file.
        assert_eq!(
            std::fs::metadata(s.root().join("f")).unwrap().len(),
            100,
            "{case}: killed before the change"
        );
        local.write_all_at(b"DATA", 50).unwrap();
        let d = Filterd::start(&s, &[], &[]);
        let content = std::fs::read(s.root().join("f")).unwrap();
        assert_eq!(
            (content.len(), content.get(50..54)),
            (100, Some(&b"DATA"[..])),
            "{case}: recovery truncated over the local write"
        );
        let said = d.log_text().contains("outcome unknown");
        let fe2 = frontend(&s);
        if let Some(key) = key {
            // The client reconnects and re-sends its SET_INFO: the filter
            // must not say it was done.
            fe2.resume(ClientId::new("alice").unwrap(), key)
                .expect("the handle comes back");
            let looked = fe2.lookup_reply(ReplayScope::Handle(key), 2);
            assert!(
                matches!(&looked, Err(e) if e.code() == Some(libfilter::proto::ErrorCode::Internal)),
                "{case}: the replay is told its outcome is unknown, got {looked:?}"
            );
            // The client sends it anew: made now, over the local write,
            // and its mark is gone once its completion commits.
            fe2.set_end_of_file(key, 10, None).unwrap();
            assert_eq!(std::fs::metadata(s.root().join("f")).unwrap().len(), 10);
            wait_for("the change's mark to go", Duration::from_secs(10), || {
                change_marks(&s.root().join("f")).is_empty().then_some(())
            });
        }
        drop(fe2);
        drop(fe);
        drop(d);
        store_is_clean(&s);
        if key.is_none() {
            let store = Store::open_read_only(&s.state()).unwrap();
            let handles = store.handles().unwrap();
            assert!(
                handles.is_empty(),
                "{case}: the overwriting open is not brought back as done: {handles:?}"
            );
        }
        assert!(said, "{case}: recovery says it cannot know");
    }
}

/// filterd's commits so far.
fn commits(d: &Filterd) -> u64 {
    d.control().stats().expect("stats").commits
}

/// The commits of an exclusive nfsl/1 OPEN (a dry run checks it: a
/// matrix over fewer would prove less, over none nothing; before, a
/// count of 0 ran no case and passed).
const EXCL_COMMITS: u64 = 2;

/// The commits of a truncating nfsl/1 OPEN (a dry run checks it): the
/// intent, the truncation's end, the open with its state and slot reply.
const TRUNC_COMMITS: u64 = 3;

/// The commits of an nfsl/1 RENAME of a file its client has open (a dry
/// run checks it): the intent, the rename's end with its slot reply, the
/// moved open state.
const RENAME_COMMITS: u64 = 3;

/// The open-state records of nfsshim instance `instance`'s client `cid`.
fn nfs_states(d: &Filterd, instance: &str, cid: &str) -> Vec<(u64, String)> {
    let scope =
        ReplayScope::Session(ScopeName::new(format!("nfs/{instance}/states/{cid}")).unwrap());
    d.control().list_records(scope).expect("list records")
}

/// Re-sends `req` (same slot and seqid) until the answer is not DELAY.
fn resend(nfs: &mut rkfilter_tests::Nfs, req: &serde_json::Value) -> serde_json::Value {
    nfs.resend_patiently(req, Duration::from_secs(30))
}

/// Sends `req`, which kills filterd at its failpoint `fp` (DELAY), starts filterd
/// again (and nfsshim too if `restart_shim`), and re-sends `req` on the same
/// slot and seqid until it is answered, twice: the same answer both times.
/// Returns the new filterd and that answer (without its xid).
#[allow(clippy::too_many_arguments)]
fn crash_and_resend(
    s: &Scratch,
    mut d: Filterd,
    shim: &mut Shim,
    nfs: &mut rkfilter_tests::Nfs,
    req: &serde_json::Value,
    fp: &str,
    restart_shim: bool,
    case: &str,
) -> (Filterd, serde_json::Value) {
    let r = nfs.call(req.clone());
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{case}: filterd died: {r}");
    d.wait_killed_at(fp, Duration::from_secs(10));
    let d = Filterd::start(s, &[], &[]);
    if restart_shim {
        shim.kill9_in_place();
        *shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
        nfs.c = LineClient::connect(&shim.addr);
    }
    let mut first = resend(nfs, req);
    assert_eq!(first["status"], "NFS4_OK", "{case}: {first}");
    let mut again = resend(nfs, req);
    // Each answer carries its own request's xid.
    first["xid"].take();
    again["xid"].take();
    assert_eq!(again, first, "{case}: a re-send gets the recorded answer");
    (d, first)
}

/// An nfsl/1 OPEN and CLOSE are one commit each — the filter's open or
/// close, the open state and the slot reply together — and stay exactly
/// once when filterd dies at each point of that commit: with the records
/// batched but not committed, before the commit, and after it (reply not
/// sent). The client re-sends on the same slot and seqid, to the same
/// nfsshim (which reattaches) or to a restarted one (which restores its
/// slots): it gets one answer, the same on every re-send, and exactly one
/// open state and handle exist (none after the CLOSE).
#[test]
fn nfs_open_and_close_commit_once_across_a_crash_at_every_point() {
    use rkfilter_tests::{handles_on, Nfs};
    let open = json!({"op": "OPEN", "owner": "o1", "path": "f", "access": "both",
                      "deny": "none", "create": {"mode": "unchecked"}});
    // Without a crash: how many commits each request makes, and where.
    let (open_at, close_at) = {
        let s = Scratch::new("cm-nfs-dry");
        let d = Filterd::start(&s, &[], &[]);
        let shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
        let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
        let c0 = commits(&d);
        let r = nfs.call(open.clone());
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        let c1 = commits(&d);
        assert_eq!(c1 - c0, 1, "an OPEN is one commit");
        let r = nfs.call(json!({"op": "CLOSE", "stateid": r["stateid"]}));
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        let c2 = commits(&d);
        assert_eq!(c2 - c1, 1, "a CLOSE is one commit");
        (c1, c2)
    };
    for (op, fp) in [
        ("OPEN", "open.records_batched:1".to_owned()),
        ("OPEN", format!("commit.before:{open_at}")),
        ("OPEN", format!("commit.after:{open_at}")),
        ("CLOSE", "close.records_batched:1".to_owned()),
        ("CLOSE", format!("commit.before:{close_at}")),
        ("CLOSE", format!("commit.after:{close_at}")),
    ] {
        for restart_shim in [false, true] {
            let case = format!("{op} at {fp}, nfsshim restarted: {restart_shim}");
            let s = Scratch::new("cm-nfs");
            let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
            let mut shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
            let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
            let cid = nfs.clientid.clone();
            let req = if op == "OPEN" {
                open.clone()
            } else {
                let r = nfs.call(open.clone());
                assert_eq!(r["status"], "NFS4_OK", "{case}: {r}");
                json!({"op": "CLOSE", "stateid": r["stateid"]})
            };
            let (d, first) =
                crash_and_resend(&s, d, &mut shim, &mut nfs, &req, &fp, restart_shim, &case);
            let (handles, states) = (handles_on(&s, "f").len(), nfs_states(&d, "nfs-cm", &cid));
            if op == "OPEN" {
                assert_eq!(handles, 1, "{case}: one filter handle");
                assert_eq!(states.len(), 1, "{case}: one open state: {states:?}");
                let r = nfs.call(json!({"op": "CLOSE", "stateid": first["stateid"]}));
                assert_eq!(r["status"], "NFS4_OK", "{case}: the open is usable: {r}");
            } else {
                assert_eq!(handles, 0, "{case}: the handle is closed");
                assert!(states.is_empty(), "{case}: no open state: {states:?}");
            }
            assert!(handles_on(&s, "f").is_empty(), "{case}: nothing left open");
            assert!(
                nfs_states(&d, "nfs-cm", &cid).is_empty(),
                "{case}: no state left"
            );
            drop(shim);
            drop(d);
        }
    }
}

/// An upgrade OPEN (the same owner opening the same file again) changes the
/// open state it finds: its stateid seqid grows by one. When filterd dies
/// before or after the commit of the state record and the slot reply, the
/// client's re-send on the same slot and seqid applies the upgrade once:
/// the stateid seqid is 2 (not 3), a READ with it is current, and one open
/// state and one handle exist — whether nfsshim stays up (its open states in
/// memory must not run ahead of what committed) or restarts.
#[test]
fn nfs_upgrade_open_applies_once_across_a_crash_of_its_commit() {
    use rkfilter_tests::{handles_on, Nfs};
    let open = json!({"op": "OPEN", "owner": "o1", "path": "f", "access": "both",
                      "deny": "both", "create": {"mode": "unchecked"}});
    // Widens nothing: only the stateid seqid changes.
    let upgrade = json!({"op": "OPEN", "owner": "o1", "path": "f", "access": "read",
                         "deny": "write"});
    // Without a crash: the upgrade's last commit holds its state and reply.
    let upgrade_at = {
        let s = Scratch::new("cm-nfs-up-dry");
        let d = Filterd::start(&s, &[], &[]);
        let shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
        let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
        let r = nfs.call(open.clone());
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        let r = nfs.call(upgrade.clone());
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        assert_eq!(r["stateid"]["seqid"], 2, "{r}");
        commits(&d)
    };
    for fp in [
        format!("commit.before:{upgrade_at}"),
        format!("commit.after:{upgrade_at}"),
    ] {
        for restart_shim in [false, true] {
            let case = format!("upgrade OPEN at {fp}, nfsshim restarted: {restart_shim}");
            let s = Scratch::new("cm-nfs-up");
            let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
            let mut shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
            let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
            let cid = nfs.clientid.clone();
            let r = nfs.call(open.clone());
            assert_eq!(r["status"], "NFS4_OK", "{case}: {r}");
            let other = r["stateid"]["other"].clone();
            let (d, first) = crash_and_resend(
                &s,
                d,
                &mut shim,
                &mut nfs,
                &upgrade,
                &fp,
                restart_shim,
                &case,
            );
            assert_eq!(
                first["stateid"],
                json!({"other": other, "seqid": 2}),
                "{case}: the upgrade applied once: {first}"
            );
            // The re-send above went through the reattached connection, but
            // an nfsshim that stayed up answers READ and WRITE NFS4ERR_DELAY
            // until its event thread has applied the reattach (re-learned
            // which files have locks; nfs-like.md, "Restarts"), which under
            // load can come after that answer. A client re-sends a DELAY;
            // a stale seqid (NFS4ERR_OLD_STATEID) still fails the check.
            let r = nfs.call_patiently(
                json!({"op": "READ", "stateid": {"other": other, "seqid": 2},
                                    "offset": 0, "count": 1}),
            );
            assert_eq!(r["status"], "NFS4_OK", "{case}: seqid 2 is current: {r}");
            assert_eq!(handles_on(&s, "f").len(), 1, "{case}: one filter handle");
            let states = nfs_states(&d, "nfs-cm", &cid);
            assert_eq!(states.len(), 1, "{case}: one open state: {states:?}");
            let r = nfs.call(json!({"op": "CLOSE", "stateid": first["stateid"]}));
            assert_eq!(r["status"], "NFS4_OK", "{case}: {r}");
            assert!(handles_on(&s, "f").is_empty(), "{case}: nothing left open");
            drop(shim);
            drop(d);
        }
    }
}

/// A LOCK by a new lock-owner makes its lock state (seqid 1) in memory
/// before the commit of the open state's record and the slot reply. When
/// filterd dies before or after that commit, the re-send on the same slot
/// and seqid gives lock seqid 1 (not 2), and the lock is held once.
#[test]
fn nfs_lock_applies_once_across_a_crash_of_its_commit() {
    use rkfilter_tests::Nfs;
    let open = json!({"op": "OPEN", "owner": "o1", "path": "f", "access": "both",
                      "deny": "none", "create": {"mode": "unchecked"}});
    let lock = |sid: &serde_json::Value| {
        json!({"op": "LOCK", "stateid": sid, "owner": "lo", "type": "write",
               "offset": 0, "length": 10})
    };
    let lock_at = {
        let s = Scratch::new("cm-nfs-lock-dry");
        let d = Filterd::start(&s, &[], &[]);
        let shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
        let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
        let r = nfs.call(open.clone());
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        let r = nfs.call(lock(&r["stateid"]));
        assert_eq!(r["lock_stateid"]["seqid"], 1, "{r}");
        commits(&d)
    };
    for fp in [
        format!("commit.before:{lock_at}"),
        format!("commit.after:{lock_at}"),
    ] {
        for restart_shim in [false, true] {
            let case = format!("LOCK at {fp}, nfsshim restarted: {restart_shim}");
            let s = Scratch::new("cm-nfs-lock");
            let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
            let mut shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
            let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
            let o = nfs.call(open.clone());
            assert_eq!(o["status"], "NFS4_OK", "{case}: {o}");
            let req = lock(&o["stateid"]);
            let (_d, first) =
                crash_and_resend(&s, d, &mut shim, &mut nfs, &req, &fp, restart_shim, &case);
            assert_eq!(
                first["lock_stateid"]["seqid"], 1,
                "{case}: the lock state made once: {first}"
            );
            let r = nfs.call(json!({"op": "LOCKU", "lock_stateid": first["lock_stateid"],
                                    "offset": 0, "length": 10}));
            assert_eq!(r["status"], "NFS4_OK", "{case}: {r}");
            assert_eq!(r["lock_stateid"]["seqid"], 2, "{case}: {r}");
            let r = nfs.call(json!({"op": "CLOSE", "stateid": o["stateid"]}));
            assert_eq!(r["status"], "NFS4_OK", "{case}: the lock is gone: {r}");
        }
    }
}

/// An nfsl/1 REMOVE or RENAME is recorded by filterd in the commit that
/// ends its change (the slot reply with it). When filterd dies at each
/// point of that change — intent committed, name changed, change
/// committed and reply not sent — the client's re-send on the same slot
/// and seqid gets `NFS4_OK` (spec: "a REMOVE re-sent after a crash is
/// `NFS4_OK`, not `NFS4ERR_NOENT`"), the same on every re-send, also
/// through an nfsshim that stayed up and only reattached, and the change
/// is applied once.
#[test]
fn nfs_remove_and_rename_answer_once_across_a_crash_at_every_point() {
    use rkfilter_tests::Nfs;
    let remove = json!({"op": "REMOVE", "path": "f"});
    let rename = json!({"op": "RENAME", "from": "f", "to": "g"});
    for (op, req) in [("REMOVE", &remove), ("RENAME", &rename)] {
        // Without a crash: the commits the change makes (intent, end).
        let (before, after) = {
            let s = Scratch::new("cm-nfs-ns-dry");
            std::fs::write(s.root().join("f"), b"x").unwrap();
            let d = Filterd::start(&s, &[], &[]);
            let shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
            let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
            let c0 = commits(&d);
            let r = nfs.call(req.clone());
            assert_eq!(r["status"], "NFS4_OK", "{op}: {r}");
            (c0, commits(&d))
        };
        assert!(after > before, "{op} commits");
        let mut points = vec![
            "intent.after_commit".to_owned(),
            "intent.after_fs".to_owned(),
        ];
        points.extend((before + 1..=after).map(|n| format!("commit.after:{n}")));
        for fp in points {
            for restart_shim in [false, true] {
                let case = format!("{op} at {fp}, nfsshim restarted: {restart_shim}");
                let s = Scratch::new("cm-nfs-ns");
                std::fs::write(s.root().join("f"), b"x").unwrap();
                let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
                let mut shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
                let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
                let (_d, _) =
                    crash_and_resend(&s, d, &mut shim, &mut nfs, req, &fp, restart_shim, &case);
                assert!(!s.root().join("f").exists(), "{case}: f is gone");
                assert_eq!(
                    s.root().join("g").exists(),
                    op == "RENAME",
                    "{case}: applied once"
                );
            }
        }
    }
}

/// An nfsl/1 exclusive create keeps its verifier with the file it made,
/// so that its re-send "succeeds as if it had created the file" (spec).
/// When filterd dies at each commit of that OPEN and nfsshim is restarted
/// too (or only reattaches), the re-send on the same slot and seqid, and a
/// new OPEN with the same verifier, get `NFS4_OK` with `created: true`
/// and one handle exists — never `NFS4ERR_EXIST` for the client's own
/// create.
#[test]
fn nfs_exclusive_create_is_its_own_across_a_crash_at_every_commit() {
    use rkfilter_tests::{handles_on, Nfs};
    let open = json!({"op": "OPEN", "owner": "o1", "path": "f", "access": "both",
                      "deny": "none",
                      "create": {"mode": "exclusive", "verifier": "00000000000000ff"}});
    let (before, after) = {
        let s = Scratch::new("cm-nfs-excl-dry");
        let d = Filterd::start(&s, &[], &[]);
        let shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
        let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
        let c0 = commits(&d);
        let r = nfs.call(open.clone());
        assert_eq!(r["created"], true, "{r}");
        (c0, commits(&d))
    };
    assert_eq!(after - before, EXCL_COMMITS, "an exclusive OPEN's commits");
    let mut ran = 0;
    for n in before + 1..=after {
        for fp in [format!("commit.before:{n}"), format!("commit.after:{n}")] {
            for restart_shim in [false, true] {
                ran += 1;
                let case = format!("exclusive OPEN at {fp}, nfsshim restarted: {restart_shim}");
                let s = Scratch::new("cm-nfs-excl");
                let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
                let mut shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
                let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
                let (_d, first) =
                    crash_and_resend(&s, d, &mut shim, &mut nfs, &open, &fp, restart_shim, &case);
                assert_eq!(first["created"], true, "{case}: {first}");
                assert_eq!(handles_on(&s, "f").len(), 1, "{case}: one filter handle");
                let r = nfs.call(json!({"op": "CLOSE", "stateid": first["stateid"]}));
                assert_eq!(r["status"], "NFS4_OK", "{case}: {r}");
                // The client's next exclusive create with its verifier (it
                // never saw an answer, say): still its own file.
                let r = nfs.call(open.clone());
                assert_eq!(r["status"], "NFS4_OK", "{case}: {r}");
                assert_eq!(r["created"], true, "{case}: {r}");
            }
        }
    }
    assert_eq!(
        ran,
        EXCL_COMMITS * 4,
        "every commit, both points, both ways"
    );
}

/// A truncating nfsl/1 OPEN commits in steps (the truncation bracketed by
/// an intent, then the open state and slot reply). When filterd dies
/// after the truncation committed and nfsshim is restarted too, another
/// client writes the file and is answered; the first client's re-send of
/// its OPEN on the same slot and seqid must find the open that was made,
/// not truncate again over the acknowledged write (invariant 3: recovery
/// never redoes a change over work acknowledged since). Old code: the
/// restarted nfsshim closed the open's handle at restore (no state record
/// named it), and the re-send truncated the file a second time.
#[test]
fn nfs_truncating_open_is_not_redone_over_a_later_write() {
    use rkfilter_tests::Nfs;
    let open = json!({"op": "OPEN", "owner": "o1", "path": "f", "access": "both",
                      "deny": "none", "truncate": true});
    let (before, after) = {
        let s = Scratch::new("cm-nfs-trunc-dry");
        std::fs::write(s.root().join("f"), b"0123456789").unwrap();
        let d = Filterd::start(&s, &[], &[]);
        let shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
        let mut nfs = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
        let c0 = commits(&d);
        let r = nfs.call(open.clone());
        assert_eq!(r["size"], 0, "{r}");
        (c0, commits(&d))
    };
    assert_eq!(after - before, TRUNC_COMMITS, "a truncating OPEN's commits");
    // The first commit is the intent, before the truncation.
    let mut ran = 0;
    for n in before + 2..=after {
        let fp = format!("commit.before:{n}");
        for restart_shim in [false, true] {
            ran += 1;
            let case = format!("truncating OPEN at {fp}, nfsshim restarted: {restart_shim}");
            let s = Scratch::new("cm-nfs-trunc");
            std::fs::write(s.root().join("f"), b"0123456789").unwrap();
            let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
            let mut shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
            let mut a = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
            let r = a.call(open.clone());
            assert_eq!(r["status"], "NFS4ERR_DELAY", "{case}: filterd died: {r}");
            d.wait_killed_at(&fp, Duration::from_secs(10));
            let _d = Filterd::start(&s, &[], &[]);
            if restart_shim {
                shim.kill9_in_place();
                shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
                a.c = LineClient::connect(&shim.addr);
            }
            assert_eq!(std::fs::read(s.root().join("f")).unwrap(), b"", "{case}");
            wait_for("filterd reachable", Duration::from_secs(30), || {
                let mut c = LineClient::connect(&shim.addr);
                let r = c.call_with(
                    "xid",
                    json!({"op": "EXCHANGE_ID", "owner": "host-b", "verifier": "00000000000000b2"}),
                );
                (r["status"] == "NFS4_OK").then_some(())
            });
            let mut b = Nfs::connect(&shim.addr, "host-b", "00000000000000b2");
            let o = b.call_patiently(json!({"op": "OPEN", "owner": "ob", "path": "f",
                                            "access": "write", "deny": "none"}));
            assert_eq!(o["status"], "NFS4_OK", "{case}: {o}");
            let w = b.call_patiently(
                json!({"op": "WRITE", "stateid": o["stateid"], "offset": 0, "data": "YWNrZWQ="}),
            );
            assert_eq!(w["status"], "NFS4_OK", "{case}: {w}");
            let r = resend(&mut a, &open);
            assert_eq!(r["status"], "NFS4_OK", "{case}: {r}");
            assert_eq!(
                std::fs::read(s.root().join("f")).unwrap(),
                b"acked",
                "{case}: the re-sent OPEN truncated again over an acknowledged write"
            );
        }
    }
    assert_eq!(
        ran,
        (TRUNC_COMMITS - 1) * 2,
        "every commit after the intent's, both ways"
    );
}

/// A RENAME moves the renaming client's open states to the new name. When
/// filterd dies after the commit that records the rename (and its slot
/// reply), the moves nfsshim writes in a later commit are lost; the re-send
/// is then answered from the recorded reply and never writes them. An
/// nfsshim restored after that (at once, or after more work) must still
/// know the open by its file's name now: a further lock-owner's LOCK opens
/// its handle of the open's file by that name, and by the old name it
/// would lock another client's new file of that name (or fail), leaving
/// the renamed file's range unlocked. Old code: the open state kept "f".
#[test]
fn nfs_rename_moves_open_states_once_across_a_crash_of_its_commit() {
    use rkfilter_tests::{handles_on, Nfs};
    let rename = json!({"op": "RENAME", "from": "f", "to": "g"});
    let open_f = json!({"op": "OPEN", "owner": "o1", "path": "f", "access": "both",
                        "deny": "none"});
    let lock = |owner: &str, offset: u64, stateid: &serde_json::Value| {
        json!({"op": "LOCK", "owner": owner, "type": "write", "stateid": stateid,
               "offset": offset, "length": 4})
    };
    let setup = || {
        let s = Scratch::new("cm-nfs-mv");
        std::fs::write(s.root().join("f"), b"0123456789").unwrap();
        s
    };
    // Client a opens f and locks it (its first lock-owner locks through
    // the open's handle); filterd starts again with `fp` armed.
    let start_locked = |s: &Scratch, fp: Option<&str>, case: &str| {
        let d = Filterd::start(s, &[], &[]);
        let shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
        let mut a = Nfs::connect(&shim.addr, "host-a", "00000000000000a1");
        let o = a.call(open_f.clone());
        assert_eq!(o["status"], "NFS4_OK", "{case}: {o}");
        let stateid = o["stateid"].clone();
        let r = a.call(lock("l1", 0, &stateid));
        assert_eq!(r["status"], "NFS4_OK", "{case}: {r}");
        drop(d);
        let env: Vec<(&str, &str)> = fp.map(|f| ("RKFILTER_FAILPOINTS", f)).into_iter().collect();
        let d = Filterd::start(s, &[], &env);
        let r = a.call_patiently(json!({"op": "READ", "stateid": stateid, "offset": 0,
                                         "count": 1}));
        assert_eq!(r["status"], "NFS4_OK", "{case}: nfsshim reattached: {r}");
        (d, shim, a, stateid)
    };
    // Without a crash: the commits the RENAME makes.
    let (before, after) = {
        let s = setup();
        let shim_and_d = start_locked(&s, None, "dry run");
        let (d, _shim, mut nfs) = (shim_and_d.0, shim_and_d.1, shim_and_d.2);
        let c0 = commits(&d);
        let r = nfs.call(rename.clone());
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        (c0, commits(&d))
    };
    assert_eq!(after - before, RENAME_COMMITS, "a RENAME's commits");
    let points = (before + 1..=after)
        .flat_map(|n| [format!("commit.before:{n}"), format!("commit.after:{n}")]);
    let mut ran = 0;
    for fp in points {
        for restart_shim in [true, false] {
            ran += 1;
            let case = format!("RENAME at {fp}, nfsshim restarted with filterd: {restart_shim}");
            let s = setup();
            let (d, mut shim, mut a, stateid) = start_locked(&s, Some(&fp), &case);
            let (d, _) =
                crash_and_resend(&s, d, &mut shim, &mut a, &rename, &fp, restart_shim, &case);
            if !restart_shim {
                shim.kill9_in_place();
                shim = Shim::start("nfsshim", &s.socket(), "nfs-cm");
                a.c = LineClient::connect(&shim.addr);
            }
            // Another client makes a new file under the old name.
            let mut b = Nfs::connect(&shim.addr, "host-b", "00000000000000b2");
            let ob = b.call_patiently(json!({"op": "OPEN", "owner": "ob", "path": "f",
                "access": "write", "deny": "none", "create": {"mode": "unchecked"}}));
            assert_eq!(ob["status"], "NFS4_OK", "{case}: {ob}");
            // A second lock-owner of the renamed open locks its file.
            let r = a.call_patiently(lock("l2", 4, &stateid));
            assert_eq!(r["status"], "NFS4_OK", "{case}: {r}");
            assert_eq!(
                handles_on(&s, "f").len(),
                1,
                "{case}: only b's handle names f"
            );
            assert_eq!(
                handles_on(&s, "g").len(),
                2,
                "{case}: the open's and the second lock-owner's handles are g's"
            );
            drop(shim);
            drop(d);
        }
    }
    assert_eq!(
        ran,
        RENAME_COMMITS * 4,
        "every commit, both points, both ways"
    );
}
