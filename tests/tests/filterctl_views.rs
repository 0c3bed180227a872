//! End-to-end tests of what `filterctl` shows an operator, live and
//! offline: the same fact under the same name in `status --json` either
//! way, listings whose shape does not depend on the data (an unreadable
//! stored record is named on stderr and fails no command, live or offline:
//! `status` shows it and exits 0),
//! `frontends` counts that say which handles they count, and `handle KEY`
//! showing a handle's locks and lease in text as `--json` does.

use libfilter::lease::LeaseKey;
use libfilter::locks::{LockOp, LockRange};
use libfilter::model::{ClientId, CreateGuid, Durability, Rights};
use libfilter::store::Store;
use rkfilter_tests::{attach, filterctl, CtlOutput, Filterd, Scratch};
use serde_json::Value;

/// `filterctl --state S ARGS…`.
fn ctl_state(s: &Scratch, args: &[&str]) -> CtlOutput {
    let st = s.state();
    let mut a = vec!["--state", st.to_str().unwrap()];
    a.extend_from_slice(args);
    filterctl(&a)
}

/// `filterctl --socket S ARGS…`.
fn ctl_live(s: &Scratch, args: &[&str]) -> CtlOutput {
    let sock = s.socket();
    let mut a = vec!["--socket", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    filterctl(&a)
}

/// A running filterd with frontend smb/smb-a attached, holding a
/// persistent read-write open of `f.txt` with an RWH lease and an
/// exclusive lock on bytes 0..5: the handle's key and its lease key.
fn daemon_with_a_leased_locked_handle(
    s: &Scratch,
) -> (Filterd, libfilter::client::FilterClient, String, LeaseKey) {
    daemon_on_with_a_leased_locked_handle(s, &[])
}

/// [`daemon_with_a_leased_locked_handle`], filterd started with `flags`
/// (`--store etcd://…`).
fn daemon_on_with_a_leased_locked_handle(
    s: &Scratch,
    flags: &[&str],
) -> (Filterd, libfilter::client::FilterClient, String, LeaseKey) {
    std::fs::write(s.root().join("f.txt"), b"data").unwrap();
    let d = Filterd::start(s, flags, &[]);
    let fe = attach(&s.socket(), "smb", "smb-a");
    let lease = LeaseKey(uuid::Uuid::new_v4());
    let req = libfilter::proto::OpenRequest {
        client: ClientId::new("frank").unwrap(),
        durability: Durability::Persistent { timeout_ms: 60_000 },
        create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
        ..rkfilter_tests::rw_open_if("f.txt", Rights::READ, Some((lease, "RWH")))
    };
    let h = fe.open(req).expect("open");
    let lock = LockOp {
        range: LockRange {
            offset: 0,
            length: 5,
        },
        exclusive: true,
        unlock: false,
    };
    fe.lock(h.info.key, vec![lock], None).expect("lock");
    (d, fe, h.info.key.to_string(), lease)
}

/// Live and offline `status --json` give the facts both know under the
/// same names, with the same values where the fact is the same. Before,
/// the two shared no field name: live `epoch`, `handles_connected`…,
/// offline `meta.epoch`, `handles`.
#[test]
fn status_json_names_the_same_facts_alike_live_and_offline() {
    let s = Scratch::new("ctl-status-names");
    let (mut d, fe, _, _) = daemon_with_a_leased_locked_handle(&s);
    let live = ctl_live(&s, &["status", "--json"]);
    assert_eq!(live.code, 0, "{}", live.stderr);
    let live = live.json();
    assert!(
        live.get("lease_left_ms").is_none(),
        "LMDB has no lease: {live}"
    );
    drop(fe);
    assert!(d.terminate().success());
    let offline = ctl_state(&s, &["status", "--json"]);
    assert_eq!(offline.code, 0, "{}", offline.stderr);
    let offline = offline.json();
    for name in [
        "daemon",
        "epoch",
        "schema_version",
        "store",
        "state_dir",
        "handles",
        "handles_connected",
        "handles_disconnected",
        "handles_lost",
    ] {
        for (side, v) in [("live", &live), ("offline", &offline)] {
            assert!(
                v.get(name).is_some_and(|x| !x.is_null()),
                "{side} status lacks {name}: {v}"
            );
        }
    }
    assert_eq!(live["daemon"], "running", "{live}");
    assert_eq!(offline["daemon"], "not running", "{offline}");
    for same in ["epoch", "schema_version", "store", "handles"] {
        assert_eq!(live[same], offline[same], "{same}: {live} vs {offline}");
    }
    assert_eq!(live["handles_connected"], 1, "{live}");
    // Offline, as a restart will show it: the handle waits, disconnected.
    assert_eq!(offline["handles_connected"], 0, "{offline}");
    assert_eq!(offline["handles_disconnected"], 1, "{offline}");
    // The names scripts used before stay.
    assert_eq!(offline["meta"]["epoch"], offline["epoch"], "{offline}");
    assert_eq!(offline["corrupt_records"], Value::Array(vec![]));
    for name in ["corrupt_records", "corrupt_records_total"] {
        assert_eq!(live[name], offline[name], "{name}: {live} vs {offline}");
    }
    // A relative `--state` names the dir as the live daemon does.
    let rel = std::process::Command::new(rkfilter_tests::bin("filterctl"))
        .current_dir(&s.dir)
        .args(["--state", "./state", "status", "--json"])
        .output()
        .expect("run filterctl");
    let rel: Value = serde_json::from_slice(&rel.stdout).expect("JSON");
    assert_eq!(rel["state_dir"], live["state_dir"], "{rel} vs {live}");
}

/// The key of the corrupt handle record [`corrupt_the_store`] writes, as
/// filterctl names it (hex).
const BAD_KEY_HEX: &str = "09090909090909090909090909090909";

/// With filterd stopped, writes an unreadable handle record (key
/// [`BAD_KEY_HEX`]) and an unreadable nfsshim client record into the store.
fn corrupt_the_store(s: &Scratch) {
    let store = Store::open(&s.state(), 1 << 24).expect("open the stopped daemon's store");
    store
        .put_raw("handles", &[9; 16], b"\x09from the future")
        .unwrap();
    let scope = libfilter::model::ReplayScope::Session(
        libfilter::model::ScopeName::new("nfs/nfs-a/clients").unwrap(),
    );
    store
        .put_raw(
            "replay",
            &libfilter::store::replay_key(&scope, 7),
            b"\x09garbage",
        )
        .unwrap();
}

/// One rule for unreadable stored records, live and offline: no command
/// fails for them. No listing changes shape (`handles --json` is still an
/// array a script's `jq '.[]'` works on), every readable record is shown,
/// the unreadable ones a listing meets offline are named on stderr, and it
/// exits 0; `status` shows every one (the replay table's too) in its
/// output, names them on stderr and exits 0 — live too, where filterd's
/// recovery skipped them, so `until filterctl … status` still sees the
/// daemon ready. Before, live and offline `status` exited 1 for them.
#[test]
fn unreadable_records_are_named_and_fail_no_command_live_or_offline() {
    let s = Scratch::new("ctl-corrupt");
    let (mut d, fe, key, _) = daemon_with_a_leased_locked_handle(&s);
    drop(fe);
    assert!(d.terminate().success());
    corrupt_the_store(&s);
    for cmd in ["handles", "files", "locks", "leases", "frontends"] {
        let out = ctl_state(&s, &[cmd, "--json"]);
        assert_eq!(out.code, 0, "{cmd}: {}{}", out.stdout, out.stderr);
        let v = out.json();
        let rows = v
            .as_array()
            .unwrap_or_else(|| panic!("{cmd} --json is an array: {v}"));
        assert_eq!(rows.len(), 1, "{cmd}: the readable handle is shown: {v}");
        assert!(out.stderr.contains(BAD_KEY_HEX), "{cmd}: {}", out.stderr);
        let text = ctl_state(&s, &[cmd]);
        assert_eq!(text.code, 0, "{cmd}: {}{}", text.stdout, text.stderr);
        assert!(text.stderr.contains(BAD_KEY_HEX), "{cmd}: {}", text.stderr);
    }
    let one = ctl_state(&s, &["handle", &key, "--json"]);
    assert_eq!(one.code, 0, "{}{}", one.stdout, one.stderr);
    assert_eq!(one.json()["key"], key.as_str());
    assert!(one.stderr.contains(BAD_KEY_HEX), "{}", one.stderr);
    let clients = ctl_state(&s, &["clients", "--json"]);
    assert_eq!(clients.code, 0, "{}{}", clients.stdout, clients.stderr);
    assert_eq!(clients.json(), Value::Array(vec![]));
    assert!(
        clients
            .stderr
            .contains("replay record 7 of nfs/nfs-a/clients"),
        "{}",
        clients.stderr
    );
    // `status` shows both, the client record too, and names them on
    // stderr; it does not fail for them.
    let offline = ctl_state(&s, &["status", "--json"]);
    assert_eq!(offline.code, 0, "{}{}", offline.stdout, offline.stderr);
    assert!(offline.stderr.contains(BAD_KEY_HEX), "{}", offline.stderr);
    let offline = offline.json();
    assert_eq!(offline["corrupt_records_total"], 2, "{offline}");
    let text = ctl_state(&s, &["status"]);
    assert_eq!(text.code, 0, "{}{}", text.stdout, text.stderr);
    assert!(
        text.stdout.contains("corrupt records:  2"),
        "{}",
        text.stdout
    );
    // Live: recovery skipped both; `status` names them as offline does.
    let _d = Filterd::start(&s, &[], &[]);
    let live = ctl_live(&s, &["status", "--json"]);
    assert_eq!(live.code, 0, "{}{}", live.stdout, live.stderr);
    assert!(live.stderr.contains(BAD_KEY_HEX), "{}", live.stderr);
    let live = live.json();
    for name in ["corrupt_records", "corrupt_records_total"] {
        assert_eq!(live[name], offline[name], "{name}: {live} vs {offline}");
    }
    assert!(
        live["corrupt_records"].to_string().contains(BAD_KEY_HEX),
        "{live}"
    );
    let text = ctl_live(&s, &["status"]);
    assert_eq!(text.code, 0, "{}{}", text.stdout, text.stderr);
    assert!(text.stdout.contains(BAD_KEY_HEX), "{}", text.stdout);
    // Live counts as of recovery, and says so; offline counts now.
    assert!(
        text.stdout
            .contains("corrupt records:  2 (found at filterd's last recovery)"),
        "{}",
        text.stdout
    );
    for cmd in [
        "handles",
        "files",
        "locks",
        "leases",
        "frontends",
        "clients",
    ] {
        let out = ctl_live(&s, &[cmd, "--json"]);
        assert_eq!(out.code, 0, "{cmd}: {}{}", out.stdout, out.stderr);
    }
}

/// filterd over a store with one unreadable record is ready as the spec
/// says — `filterctl --socket S status` exits 0 — so README's quick start
/// (`until filterctl … status`) and rkdemo's readiness wait end. Before,
/// `status` exited 1 for as long as the record was stored.
#[test]
fn status_of_a_daemon_over_a_corrupt_record_exits_0() {
    let s = Scratch::new("ctl-corrupt-ready");
    {
        let store = Store::open(&s.state(), 1 << 24).expect("open the store");
        store
            .put_raw("handles", &[9; 16], b"\x09from the future")
            .unwrap();
    }
    let _d = Filterd::start(&s, &[], &[]);
    let out = ctl_live(&s, &["status"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("corrupt records:  1"), "{}", out.stdout);
    assert!(out.stderr.contains(BAD_KEY_HEX), "{}", out.stderr);
}

/// `frontends` counts under one name one fact: `handles` (`ATTACHED
/// HANDLES`) are those a frontend holds through its attachment, live and
/// offline (none offline: nothing is attached); the handles the store
/// names an instance in are `stored_handles` (`STORED HANDLES`). Before,
/// offline `handles`/`HANDLES` counted stored handles, live ones attached.
#[test]
fn frontends_name_attached_and_stored_handles_apart() {
    let s = Scratch::new("ctl-frontends");
    let (mut d, fe, _, _) = daemon_with_a_leased_locked_handle(&s);
    let live = ctl_live(&s, &["frontends", "--json"]);
    assert_eq!(live.code, 0, "{}", live.stderr);
    let live = live.json();
    assert_eq!(live[0]["instance"], "smb-a", "{live}");
    assert_eq!(live[0]["handles"], 1, "{live}");
    assert_eq!(live[0]["attached"], true, "{live}");
    let text = ctl_live(&s, &["frontends"]).stdout;
    assert!(text.contains("ATTACHED HANDLES"), "{text}");
    drop(fe);
    assert!(d.terminate().success());
    let offline = ctl_state(&s, &["frontends", "--json"]);
    assert_eq!(offline.code, 0, "{}", offline.stderr);
    let offline = offline.json();
    assert_eq!(offline[0]["instance"], "smb-a", "{offline}");
    assert_eq!(offline[0]["attached"], false, "{offline}");
    assert_eq!(offline[0]["handles"], 0, "nothing is attached: {offline}");
    assert_eq!(offline[0]["stored_handles"], 1, "{offline}");
    let text = ctl_state(&s, &["frontends"]).stdout;
    assert!(
        text.contains("STORED HANDLES") && !text.contains("ATTACHED HANDLES"),
        "{text}"
    );
}

/// The line of `handle KEY`'s text that gives `name` (`lease: …`).
fn field(view: &str, t: &str, name: &str) -> String {
    t.lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("{view}: no {name} line: {t}"))
        .to_owned()
}

/// Text `handle KEY` shows the handle's lease and byte-range locks, live
/// and offline, as `--json` does. Before, the text left both out.
#[test]
fn handle_text_shows_its_locks_and_lease() {
    let s = Scratch::new("ctl-handle-text");
    let (mut d, fe, key, lease) = daemon_with_a_leased_locked_handle(&s);
    let check = |view: &str, out: CtlOutput| {
        assert_eq!(out.code, 0, "{view}: {}", out.stderr);
        let t = out.stdout;
        let line = |name: &str| field(view, &t, name);
        let l = line("lease");
        assert!(
            l.contains(&lease.to_string()) && l.contains("RWH"),
            "{view}: {t}"
        );
        assert!(line("locks").ends_with(" 1"), "{view}: {t}");
        // Opened, never moved by a client's resume: the opener's (the
        // stamp is 0 until a resume moves it; stored: offline too).
        assert!(line("attached by").ends_with("the opener"), "{view}: {t}");
        assert!(
            line("lock").ends_with("exclusive, offset 0, length 5"),
            "{view}: {t}"
        );
    };
    check("live", ctl_live(&s, &["handle", &key]));
    drop(fe);
    assert!(d.terminate().success());
    check("offline", ctl_state(&s, &["handle", &key]));
}

/// A lost handle holds no lease and no locks (filterd enforces none of
/// them), whatever its record still names: text `handle KEY` says so, as
/// `locks` and `leases` do, live and offline. Before, it showed the
/// record's lease and locks as held.
#[test]
fn handle_text_of_a_lost_handle_shows_no_lease_or_locks_held() {
    let s = Scratch::new("ctl-handle-lost");
    let (mut d, fe, key, lease) = daemon_with_a_leased_locked_handle(&s);
    drop(fe);
    d.kill9();
    std::fs::remove_file(s.root().join("f.txt")).unwrap();
    let d = Filterd::start(&s, &[], &[]);
    let check = |view: &str, out: CtlOutput| {
        assert_eq!(out.code, 0, "{view}: {}", out.stderr);
        let t = out.stdout;
        let line = |name: &str| field(view, &t, name);
        assert!(line("state").contains("lost"), "{view}: {t}");
        let l = line("lease");
        assert!(
            l.contains("none (lost; was") && l.contains(&lease.to_string()),
            "{view}: {t}"
        );
        assert!(line("locks").contains(" 0 (lost"), "{view}: {t}");
        assert!(!t.lines().any(|l| l.starts_with("lock:")), "{view}: {t}");
    };
    let none = Value::Array(vec![]);
    assert_eq!(ctl_live(&s, &["locks", "--json"]).json(), none);
    assert_eq!(ctl_live(&s, &["leases", "--json"]).json(), none);
    check("live", ctl_live(&s, &["handle", &key]));
    drop(d);
    assert_eq!(ctl_state(&s, &["locks", "--json"]).json(), none);
    check("offline", ctl_state(&s, &["handle", &key]));
}

/// An open of `path` by `fe` with `durability` (a create GUID for the
/// durable and persistent ones, as SMB gives).
fn open_with(fe: &libfilter::client::FilterClient, path: &str, durability: Durability) {
    let req = libfilter::proto::OpenRequest {
        client: ClientId::new("frank").unwrap(),
        create_guid: (durability != Durability::None).then(|| CreateGuid(uuid::Uuid::new_v4())),
        durability,
        ..rkfilter_tests::rw_open_if(path, Rights::READ, None)
    };
    fe.open(req).expect("open");
}

/// Live `frontends` lists the same rows offline does, in the same order
/// (protocol, then instance): an instance whose frontend is gone but whose
/// persistent handles wait is listed, `attached` false and `handles` 0;
/// every row counts as `stored_handles` the persistent handles alone (the
/// only ones stored), as offline does; and an instance whose gone
/// frontend left only a durable handle (in memory, not stored) is not
/// listed. Before, live left the instance out and had no
/// `stored_handles`; then it counted durable and non-durable handles as
/// stored, listed an instance with only those, and sorted by instance
/// first.
#[test]
fn frontends_list_the_same_rows_live_and_offline() {
    let s = Scratch::new("ctl-frontends-rows");
    let (mut d, fe, _, _) = daemon_with_a_leased_locked_handle(&s);
    // nfs/z-nfs sorts first by protocol, last by instance.
    let nfs = attach(&s.socket(), "nfs", "z-nfs");
    open_with(&nfs, "p.txt", Durability::Persistent { timeout_ms: 60_000 });
    open_with(&nfs, "d.txt", Durability::Durable { timeout_ms: 60_000 });
    open_with(&nfs, "n.txt", Durability::None);
    let smb_d = attach(&s.socket(), "smb", "smb-d");
    open_with(&smb_d, "e.txt", Durability::Durable { timeout_ms: 60_000 });
    let attached = ctl_live(&s, &["frontends", "--json"]).json();
    assert_eq!(attached[0]["instance"], "z-nfs", "{attached}");
    assert_eq!(attached[0]["handles"], 3, "{attached}");
    assert_eq!(attached[0]["stored_handles"], 1, "{attached}");
    assert_eq!(attached[1]["instance"], "smb-a", "{attached}");
    assert_eq!(attached[1]["stored_handles"], 1, "{attached}");
    assert_eq!(attached[2]["instance"], "smb-d", "{attached}");
    assert_eq!(attached[2]["stored_handles"], 0, "{attached}");
    drop((fe, nfs, smb_d));
    let live = rkfilter_tests::wait_for(
        "the frontends to be gone",
        std::time::Duration::from_secs(10),
        || {
            let v = ctl_live(&s, &["frontends", "--json"]).json();
            let rows = v.as_array()?;
            rows.iter().all(|r| r["attached"] == false).then_some(v)
        },
    );
    let text = ctl_live(&s, &["frontends"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.contains("not attached"), "{}", text.stdout);
    assert!(d.terminate().success());
    let offline = ctl_state(&s, &["frontends", "--json"]);
    assert_eq!(offline.code, 0, "{}", offline.stderr);
    let offline = offline.json();
    let rows = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap_or_else(|| panic!("an array: {v}"))
            .iter()
            .map(|r| {
                let f = [
                    "protocol",
                    "instance",
                    "attached",
                    "handles",
                    "stored_handles",
                ];
                f.iter().map(|k| r[*k].clone()).collect()
            })
            .collect()
    };
    assert_eq!(rows(&live), rows(&offline), "{live} vs {offline}");
    assert_eq!(rows(&live).len(), 2, "{live}");
    assert_eq!(live[0]["instance"], "z-nfs", "{live}");
    assert_eq!(live[0]["stored_handles"], 1, "{live}");
    assert_eq!(live[1]["instance"], "smb-a", "{live}");
    assert_eq!(live[1]["handles"], 0, "{live}");
    assert_eq!(live[1]["stored_handles"], 1, "{live}");
}

/// With an etcd table, `status --json` gives the same fact alike live and
/// offline (`--store`): `store` is the table's canonical URL on both sides
/// (the owner, fencing revision and lease in `store_detail`, live),
/// with or without the PREFIX's trailing `/`; `epoch` is the owner's fencing
/// revision, and null once no owner holds the table (etcd keeps no
/// revision of a gone one); and while an owner serves, `handles` and the
/// per-state counts are null offline (the owner's to say; `stored_handles`
/// counts the records). Before, live `store` was the description, offline
/// the argument as typed; offline `epoch` became 0 with the owner gone;
/// and offline counts contradicted the owner's under the same names.
#[test]
fn status_json_with_etcd_names_the_same_facts_alike() {
    if !rkfilter_tests::etcd::etcd_available("status_json_with_etcd_names_the_same_facts_alike") {
        return;
    }
    let s = Scratch::new("ctl-status-etcd");
    let cluster = rkfilter_tests::etcd::Cluster::start(&s, 1);
    let canonical = cluster.url("rk/ctl");
    // Spelled another way (a trailing slash), as an operator may.
    let typed = format!("{canonical}/");
    let flags = ["--store", typed.as_str(), "--lease-ttl-secs", "2"];
    let (mut d, fe, _, _) = daemon_on_with_a_leased_locked_handle(&s, &flags);
    let offline = || {
        let out = filterctl(&["--store", &typed, "status", "--json"]);
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        out.json()
    };
    let live = ctl_live(&s, &["status", "--json"]);
    assert_eq!(live.code, 0, "{}", live.stderr);
    let live = live.json();
    assert_eq!(live["store"], canonical.as_str(), "{live}");
    assert!(
        live["lease_left_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0 && ms <= 2000),
        "the 2 s lease's time left: {live}"
    );
    assert!(
        live["store_detail"]
            .as_str()
            .is_some_and(|d| d.contains("fencing revision")),
        "{live}"
    );
    let serving = offline();
    for same in ["store", "epoch", "schema_version"] {
        assert_eq!(live[same], serving[same], "{same}: {live} vs {serving}");
    }
    assert!(live["epoch"].as_u64().is_some_and(|e| e > 0), "{live}");
    for unknown in [
        "handles",
        "handles_connected",
        "handles_disconnected",
        "handles_lost",
    ] {
        assert!(serving[unknown].is_null(), "{unknown}: {serving}");
    }
    assert_eq!(serving["stored_handles"], 1, "{serving}");
    drop(fe);
    assert!(d.terminate().success());
    // No owner now: the table keeps no fencing revision.
    let gone = rkfilter_tests::wait_for(
        "the owner to be gone",
        std::time::Duration::from_secs(30),
        || Some(offline()).filter(|v| v["owner"] == "none"),
    );
    assert!(gone["epoch"].is_null(), "{gone}");
    assert_eq!(gone["store"], canonical.as_str(), "{gone}");
    assert_eq!(gone["handles"], 1, "{gone}");
    assert_eq!(gone["handles_disconnected"], 1, "{gone}");
}

/// `filterctl files` and `filterctl locks` list every holder and every
/// lock of a file however many or long they are: a listing page ends
/// inside a file when the file does not fit it (`FEATURE_PAGED_WITHIN_FILE`).
/// Before (review rvcx), a page held whole files: 700 opens of one file,
/// or 256 locks with 200-byte lock owners, made a reply over a frame, and
/// both commands failed, exit 1, "reply could not be encoded". Also a
/// file of 256 stacked shared locks of one range, so a page ends between
/// locks that are equal in the table's order. And a control client that
/// does not ask for the bit (an older filterctl) still gets every page:
/// the one file too large for a page cut to what fits, the files after
/// it listed.
#[test]
fn files_and_locks_list_every_entry_of_a_file_larger_than_a_frame() {
    use libfilter::model::{Access, FileId};
    use std::collections::BTreeSet;
    let s = Scratch::new("ctl-big-files");
    for f in ["hot", "cold", "lk", "stack"] {
        std::fs::write(s.root().join(f), vec![0u8; 10]).unwrap();
    }
    let mut d = Filterd::start(&s, &[], &[("RUST_LOG", "warn")]);
    let fe = attach(&s.socket(), "smb", "smb-a");
    let mut hot = BTreeSet::new();
    // More than a page's worth of holders is chosen from at a time
    // (`HOLDERS_PER_PAGE_MAX`, 2,048).
    for _ in 0..2500 {
        let h = fe.open(rkfilter_tests::plain_open("a", "hot")).unwrap();
        hot.insert(h.info.key.to_string());
    }
    let cold = fe.open(rkfilter_tests::plain_open("b", "cold")).unwrap();
    let files = ctl_live(&s, &["files", "--json"]);
    assert_eq!(files.code, 0, "{}", files.stderr);
    let files = files.json();
    let files = files.as_array().unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths.len(), 2, "each file once: {paths:?}");
    let holders = |path: &str| -> BTreeSet<String> {
        let f = files.iter().find(|f| f["path"] == path).unwrap();
        f["holders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["key"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(holders("hot"), hot, "every holder of hot");
    assert_eq!(holders("cold").len(), 1);
    let text = ctl_live(&s, &["files"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.ends_with("2 file(s)\n"), "{}", text.stdout);
    assert_eq!(
        text.stdout
            .lines()
            .filter(|l| l.starts_with("hot "))
            .count(),
        2500
    );
    // A control connection without the bit, as an older filterctl's.
    let old =
        libfilter::client::FilterClient::connect(&s.socket(), libfilter::proto::Role::Control)
            .unwrap();
    let listed = old.files().expect("an older client's listing");
    let hot_id: FileId = listed
        .iter()
        .find(|f| f.path.as_str() == "hot")
        .unwrap()
        .file;
    let cut = listed.iter().filter(|f| f.file == hot_id).count();
    assert_eq!(cut, 1);
    assert!(
        listed.iter().any(|f| f.file == cold.info.file),
        "{listed:?}"
    );

    // 4 clients, each 64 exclusive locks of "lk" and 64 stacked shared
    // locks of one range of "stack", all with 200-byte lock owners;
    // persistent, so the offline listing shows them too.
    let mut locks = BTreeSet::new();
    for c in 0..4u64 {
        for path in ["lk", "stack"] {
            let req = libfilter::proto::OpenRequest {
                access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
                owner: Some(format!("{c}{}", "o".repeat(200))),
                durability: Durability::Persistent { timeout_ms: 60_000 },
                create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
                ..rkfilter_tests::plain_open(&format!("lc{c}"), path)
            };
            let h = fe.open(req).unwrap();
            let ops: Vec<LockOp> = (0..64u64)
                .map(|i| LockOp {
                    range: LockRange {
                        offset: if path == "lk" { c * 64 + i } else { 0 },
                        length: 1,
                    },
                    exclusive: path == "lk",
                    unlock: false,
                })
                .collect();
            fe.lock(h.info.key, ops, None).unwrap();
            for i in 0..64u64 {
                let offset = if path == "lk" { c * 64 + i } else { 0 };
                locks.insert((h.info.key.to_string(), offset, i));
            }
        }
    }
    // Each listed lock as (holder, offset, its place among the holder's
    // equal locks).
    let listed = |out: CtlOutput| -> (usize, BTreeSet<(String, u64, u64)>) {
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v = out.json();
        let all = v.as_array().unwrap();
        let mut seen = std::collections::BTreeMap::<(String, u64), u64>::new();
        let mut set = BTreeSet::new();
        for l in all {
            assert_eq!(l["owner"].as_str().unwrap().len(), 201, "{l}");
            let key = l["key"].as_str().unwrap().to_string();
            let offset = l["offset"].as_u64().unwrap();
            let n = seen.entry((key.clone(), offset)).or_default();
            let nth = if l["kind"] == "shared" {
                *n
            } else {
                offset % 64
            };
            *n += 1;
            set.insert((key, offset, nth));
        }
        (all.len(), set)
    };
    let (n, live) = listed(ctl_live(&s, &["locks", "--json"]));
    assert_eq!(n, 512, "every lock once");
    assert_eq!(live, locks, "every lock");
    let text = ctl_live(&s, &["locks"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    drop(old);
    drop(fe);
    assert!(d.terminate().success());
    let (n, offline) = listed(ctl_state(&s, &["locks", "--json"]));
    assert_eq!((n, offline), (512, locks), "offline, the same locks");
}

/// Review rvobs: at `RUST_LOG=debug` the request span carried the resume
/// key only for opens and resumes, and a successful unlock or close
/// logged no line at all. Every request now logs one line, with the key
/// of the handle it names.
#[test]
fn each_request_logs_one_line_with_the_handle_it_names() {
    let s = Scratch::new("ctl-request-lines");
    std::fs::write(s.root().join("f"), b"x").unwrap();
    let d = Filterd::start(&s, &[], &[("RUST_LOG", "filterd=debug")]);
    let fe = attach(&s.socket(), "smb", "smb-a");
    let h = fe.open(rkfilter_tests::plain_open("a", "f")).unwrap();
    let key = h.info.key;
    let range = LockRange {
        offset: 0,
        length: 10,
    };
    let lock = LockOp {
        range,
        exclusive: true,
        unlock: false,
    };
    fe.lock(key, vec![lock], None).unwrap();
    fe.lock(
        key,
        vec![LockOp {
            unlock: true,
            ..lock
        }],
        None,
    )
    .unwrap();
    fe.close(key).unwrap();
    let shown = format!("resume_key={key}");
    for op in ["open", "lock", "close"] {
        rkfilter_tests::wait_for(
            &format!("a line of the {op} with its key"),
            std::time::Duration::from_secs(10),
            || {
                let log = d.log_text();
                let lines = log
                    .lines()
                    .filter(|l| {
                        l.contains(&format!("op=\"{op}\""))
                            && l.contains(&shown)
                            && l.contains("handled")
                    })
                    .count();
                let want = if op == "lock" { 2 } else { 1 };
                (lines == want).then_some(())
            },
        );
    }
}

/// attack45 F2: while another client's commit fails (the store full),
/// `filterctl status`, `handles`, `files`, `locks`, `leases` and
/// `frontends` exited 1 with "filterd refused the request: … state store
/// commit failed": each parked its reply behind the newest pending
/// commit, and the failure refused everything parked there. A view
/// changes nothing: it is answered from the state rolled back, and exits
/// 0; so are a frontend's complete listing and its view of a handle on
/// the failed open's file. The open itself still fails.
#[test]
fn views_parked_behind_a_failed_commit_are_answered() {
    use libfilter::proto::{OpenRequest, Request};
    use std::sync::Arc;
    use std::time::Duration;
    let s = Scratch::new("views-failed-commit");
    // Commit 1: the open of c. Commit 2: the open of d, held 800 ms once
    // durable (less than status's 1 s bound). Commit 3, queued meanwhile
    // and failed: a second open of c's file, which the views wait for.
    let fp = "commit.after:2:sleep800,commit.before:3:fail";
    let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
    let fe = Arc::new(attach(&s.socket(), "smb", "smb-a"));
    let persistent = |path: &str| OpenRequest {
        client: ClientId::new("frank").unwrap(),
        durability: Durability::Persistent { timeout_ms: 60_000 },
        create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
        ..rkfilter_tests::rw_open_if(path, Rights::ALL, None)
    };
    let key = fe.open(persistent("c")).expect("open of c").info.key;
    let opener = |path: &'static str| {
        let (fe, req) = (fe.clone(), persistent(path));
        std::thread::spawn(move || fe.open(req).map(|h| h.info.key))
    };
    let held = opener("d");
    d.wait_log("failpoint commit.after: stalling", Duration::from_secs(20));
    let failing = opener("c");
    let ctl = d.control();
    let parked = |n: u64| {
        rkfilter_tests::wait_for("replies parked", Duration::from_secs(20), || {
            let st = ctl.stats().ok()?;
            (st.replies_awaiting_commit >= n || st.commits_failed > 0)
                .then_some(st.commits_failed == 0)
        })
    };
    assert!(parked(2), "the second open of c parked behind commit 3");
    let sock = s.socket().to_str().unwrap().to_owned();
    let views = ["status", "handles", "files", "locks", "leases", "frontends"];
    let ctls: Vec<_> = views
        .into_iter()
        .map(|v| {
            let sock = sock.clone();
            std::thread::spawn(move || rkfilter_tests::filterctl_as_is(&["--socket", &sock, v]))
        })
        .collect();
    let listing = {
        let fe = fe.clone();
        std::thread::spawn(move || fe.handles())
    };
    let view = {
        let fe = fe.clone();
        std::thread::spawn(move || {
            fe.call(Request::Handle {
                key,
                learning: false,
            })
        })
    };
    assert!(
        parked(2 + views.len() as u64 + 2),
        "the views parked before commit 3 failed (a machine too slow for the 800 ms window)"
    );
    assert!(held.join().unwrap().is_ok(), "the open of d committed");
    assert!(failing.join().unwrap().is_err(), "the failed open fails");
    for (v, out) in views.iter().zip(ctls) {
        let out = out.join().unwrap();
        assert_eq!(out.code, 0, "filterctl {v}: {}{}", out.stdout, out.stderr);
    }
    let listed = listing.join().unwrap().expect("the frontend's listing");
    assert_eq!(listed.len(), 2, "c and d, not the failed open: {listed:?}");
    assert!(view.join().unwrap().is_ok(), "the frontend's view of c");
}
