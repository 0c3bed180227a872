//! smbl/1 semantics paragraph by paragraph, against real filterd + smbshim
//! processes: failover flow C (filterd SIGKILL while the client stays
//! connected), create replay and DUPLICATE_OBJECTID, disconnected durable vs
//! persistent opens under a conflicting CREATE, sessions and RECONNECT
//! rules, delete_on_close, and malformed requests.

use std::time::Duration;

use base64::Engine as _;
use rkfilter_tests::{wait_for, Filterd, LineClient, Scratch, Shim};
use serde_json::{json, Value};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn guid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn setup(c: &mut LineClient, client_guid: &str, user: &str, prev: Option<u64>) -> u64 {
    let mut req = json!({"cmd": "SESSION_SETUP", "client_guid": client_guid, "user": user});
    if let Some(p) = prev {
        req["previous_session_id"] = json!(p);
    }
    let r = c.call(req);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    r["session_id"].as_u64().expect("session_id")
}

fn ok(r: Value) -> Value {
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    r
}

/// A CREATE request, built field by field.
struct Create(Value);

impl Create {
    fn new(path: &str, access: &[&str], share: &[&str], disposition: &str) -> Create {
        Create(
            json!({"cmd": "CREATE", "path": path, "access": access, "share": share,
                      "disposition": disposition}),
        )
    }

    fn durable(mut self, create_guid: &str, persistent: bool, timeout_ms: u64) -> Create {
        self.0["durable"] =
            json!({"create_guid": create_guid, "persistent": persistent, "timeout_ms": timeout_ms});
        self
    }

    fn lease(mut self, key: &str, state: &str) -> Create {
        self.0["lease"] = json!({"key": key, "state": state});
        self
    }

    fn replay(mut self, replay: bool) -> Create {
        self.0["replay"] = json!(replay);
        self
    }

    fn send(&self, c: &mut LineClient, sid: u64) -> Value {
        let mut req = self.0.clone();
        req["session_id"] = json!(sid);
        c.call(req)
    }
}

fn read(c: &mut LineClient, sid: u64, fid: &Value, len: u64) -> Value {
    c.call(json!({"cmd": "READ", "session_id": sid, "file_id": fid, "offset": 0, "length": len}))
}

#[test]
fn flow_c_filterd_sigkill_while_the_client_stays_connected() {
    let s = Scratch::new("smb-flow-c");
    let mut d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-c");
    let mut a = LineClient::connect(&shim.addr);
    let mut b = LineClient::connect(&shim.addr);
    let sa = setup(&mut a, &guid(), "alice", None);
    let sb = setup(&mut b, &guid(), "bob", None);
    let g = guid();
    let rw = ["read", "write"];
    let all = ["read", "write", "delete"];
    let p = ok(Create::new("p", &rw, &all, "create")
        .durable(&g, true, 60_000)
        .send(&mut a, sa));
    let fid = p["file_id"].clone();
    ok(a.call(
        json!({"cmd": "WRITE", "session_id": sa, "file_id": fid, "offset": 0,
                     "data": b64("persist"), "op_id": 1}),
    ));
    let lock = json!({"cmd": "LOCK", "session_id": sa, "file_id": fid,
                      "lock_sequence": {"number": 3, "index": 5},
                      "locks": [{"offset": 0, "length": 4, "exclusive": true, "unlock": false}]});
    ok(a.call(lock.clone()));
    // A durable (in-memory) open with an H lease: it does not survive a
    // filterd crash.
    let lk = guid();
    let dg = guid();
    let dur = ok(Create::new("d", &rw, &all, "create")
        .durable(&dg, false, 60_000)
        .lease(&lk, "RWH")
        .send(&mut a, sa));
    assert_eq!(dur["durable"]["persistent"], false, "{dur}");
    let dfid = dur["file_id"].clone();

    d.kill9();
    let _d2 = Filterd::start(&s, &[], &[]);
    // The client never reconnected: its persistent open carries on once
    // smbshim has reattached. The durable open's RWH lease went with it:
    // the client is told by a LEASE_BREAK to none, no ack asked, which
    // may come before or among these replies.
    let mut notes = Vec::new();
    let r = wait_for("the open to work again", Duration::from_secs(10), || {
        let id = a.send_only(
            "mid",
            json!({"cmd": "READ", "session_id": sa, "file_id": fid, "offset": 0, "length": 100}),
        );
        let (r, seen) = a.reply_to("mid", id)?;
        notes.extend(seen);
        (r["status"] == "STATUS_SUCCESS").then_some(r)
    });
    assert_eq!(r["data"], b64("persist"));
    if notes.is_empty() {
        a.set_read_timeout(Duration::from_secs(10));
        notes.extend(a.next_line());
        a.set_read_timeout(Duration::from_secs(60));
    }
    assert_eq!(notes.len(), 1, "one notification: {notes:?}");
    assert_eq!(notes[0]["cmd"], "LEASE_BREAK", "{notes:?}");
    assert_eq!(notes[0]["lease_key"], json!(lk), "{notes:?}");
    assert_eq!(notes[0]["new_state"], "", "{notes:?}");
    assert_eq!(notes[0]["ack_required"], false, "{notes:?}");
    // Lock-sequence replay after the failover: success, nothing applied...
    ok(a.call(lock));
    // ...and the lock itself survived: B is refused.
    let fb = ok(Create::new("p", &["read"], &all, "open").send(&mut b, sb))["file_id"].clone();
    assert_eq!(
        read(&mut b, sb, &fb, 4)["status"],
        "STATUS_FILE_LOCK_CONFLICT"
    );
    // Op-id replay after the failover: the recorded reply, not a new write.
    let w = a.call(
        json!({"cmd": "WRITE", "session_id": sa, "file_id": fid, "offset": 0,
                          "data": b64("XX"), "op_id": 1, "replay": true}),
    );
    assert_eq!(w["count"], 7, "the recorded reply: {w}");
    assert_eq!(std::fs::read(s.root().join("p")).unwrap(), b"persist");
    // The durable open is gone for good.
    let r = wait_for(
        "the durable open to be dropped",
        Duration::from_secs(10),
        || {
            let r = read(&mut a, sa, &dfid, 1);
            (r["status"] == "STATUS_FILE_CLOSED").then_some(r)
        },
    );
    assert_eq!(r["status"], "STATUS_FILE_CLOSED");
}

#[test]
fn create_replay_and_duplicate_objectid() {
    let s = Scratch::new("smb-replay");
    std::fs::write(s.root().join("f"), b"old contents").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-r");
    let cg = guid();
    let mut a = LineClient::connect(&shim.addr);
    let sa = setup(&mut a, &cg, "alice", None);
    let g = guid();
    let rw = ["read", "write"];
    let all = ["read", "write", "delete"];
    let first = ok(Create::new("f", &rw, &all, "overwrite_if")
        .durable(&g, true, 60_000)
        .send(&mut a, sa));
    assert_eq!(first["create_action"], "overwritten");
    let fid = first["file_id"].clone();
    ok(a.call(
        json!({"cmd": "WRITE", "session_id": sa, "file_id": fid, "offset": 0, "data": b64("new")}),
    ));
    // Replayed on the same session: the original open and create action;
    // nothing truncated again, whatever the replay asks for.
    let again = ok(Create::new("f", &["read"], &[], "supersede")
        .durable(&g, true, 60_000)
        .replay(true)
        .send(&mut a, sa));
    assert_eq!(again["file_id"], fid);
    assert_eq!(again["create_action"], "overwritten");
    assert_eq!(again["size"], 3, "not truncated again: {again}");
    // Without replay: DUPLICATE_OBJECTID.
    let dup = Create::new("f", &rw, &all, "open_if")
        .durable(&g, true, 60_000)
        .send(&mut a, sa);
    assert_eq!(dup["status"], "STATUS_DUPLICATE_OBJECTID");
    // Replayed from another live session of the same client: refused, and
    // the original stays usable.
    let mut a2 = LineClient::connect(&shim.addr);
    let sa2 = setup(&mut a2, &cg, "alice", None);
    let other = Create::new("f", &rw, &all, "open_if")
        .durable(&g, true, 60_000)
        .replay(true)
        .send(&mut a2, sa2);
    assert_eq!(other["status"], "STATUS_DUPLICATE_OBJECTID", "{other}");
    assert_eq!(ok(read(&mut a, sa, &fid, 10))["data"], b64("new"));
    // The same create GUID from another client: DUPLICATE_OBJECTID.
    let mut x = LineClient::connect(&shim.addr);
    let sx = setup(&mut x, &guid(), "alice", None);
    for replay in [false, true] {
        let r = Create::new("f2", &rw, &all, "open_if")
            .durable(&g, true, 60_000)
            .replay(replay)
            .send(&mut x, sx);
        assert_eq!(r["status"], "STATUS_DUPLICATE_OBJECTID", "{r}");
    }
    assert!(!s.root().join("f2").exists(), "nothing was created");
    // A CREATE without durable is never replay-detected.
    let plain = ok(Create::new("g", &rw, &all, "create")
        .replay(true)
        .send(&mut a, sa));
    assert_eq!(plain["create_action"], "created");
    let plain2 = Create::new("g", &rw, &all, "create")
        .replay(true)
        .send(&mut a, sa);
    assert_eq!(plain2["status"], "STATUS_OBJECT_NAME_COLLISION");
    // A replay from a new connection whose open is disconnected reattaches
    // it: the create action is the original one.
    drop(a);
    let mut a3 = LineClient::connect(&shim.addr);
    let sa3 = setup(&mut a3, &cg, "alice", None);
    let back = wait_for(
        "the open to be disconnected",
        Duration::from_secs(5),
        || {
            let r = Create::new("f", &rw, &all, "create")
                .durable(&g, true, 60_000)
                .replay(true)
                .send(&mut a3, sa3);
            (r["status"] == "STATUS_SUCCESS").then_some(r)
        },
    );
    assert_eq!(back["file_id"], fid);
    assert_eq!(back["create_action"], "overwritten");
    assert_eq!(ok(read(&mut a3, sa3, &fid, 10))["data"], b64("new"));
}

#[test]
fn disconnected_durable_is_purged_and_persistent_is_not_available() {
    let s = Scratch::new("smb-purge");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-p");
    let ca = guid();
    let mut a = LineClient::connect(&shim.addr);
    let sa = setup(&mut a, &ca, "alice", None);
    let rw = ["read", "write"];
    // A durable open without an H lease is not granted as durable.
    let nog = guid();
    let r = ok(Create::new("nolease", &rw, &[], "create")
        .durable(&nog, false, 0)
        .send(&mut a, sa));
    assert!(r["durable"].is_null(), "no H lease, no durable: {r}");
    let r = ok(Create::new("rlease", &rw, &[], "create")
        .durable(&guid(), false, 0)
        .lease(&guid(), "RW")
        .send(&mut a, sa));
    assert!(r["durable"].is_null(), "RW has no H: {r}");
    // A durable RWH open and a persistent one, both sharing nothing.
    let dg = guid();
    let lk = guid();
    let dur = ok(Create::new("d", &rw, &[], "create")
        .durable(&dg, false, 0)
        .lease(&lk, "RWH")
        .send(&mut a, sa));
    assert_eq!(
        (
            dur["durable"]["persistent"].as_bool(),
            dur["durable"]["timeout_ms"].as_u64()
        ),
        (Some(false), Some(60_000)),
        "timeout 0 means the default: {dur}"
    );
    let pg = guid();
    let per = ok(Create::new("p", &rw, &[], "create")
        .durable(&pg, true, 4_000)
        .send(&mut a, sa));
    assert_eq!(per["durable"]["timeout_ms"], 4_000);
    let t0 = std::time::Instant::now();
    let big = ok(
        Create::new("big", &rw, &["read", "write", "delete"], "create")
            .durable(&guid(), true, 900_000)
            .send(&mut a, sa),
    );
    assert_eq!(big["durable"]["timeout_ms"], 300_000, "capped: {big}");
    let dfid = dur["file_id"].clone();
    drop(a);

    let mut b = LineClient::connect(&shim.addr);
    let sb = setup(&mut b, &guid(), "bob", None);
    // The disconnected durable open is purged and B's CREATE proceeds.
    let rb = wait_for(
        "the durable open to be purged",
        Duration::from_secs(5),
        || {
            let r = Create::new("d", &["read"], &[], "open").send(&mut b, sb);
            (r["status"] == "STATUS_SUCCESS").then_some(r)
        },
    );
    assert_eq!(rb["create_action"], "opened");
    let mut a = LineClient::connect(&shim.addr);
    let sa = setup(&mut a, &ca, "alice", None);
    let r = a.call(
        json!({"cmd": "RECONNECT", "session_id": sa, "file_id": dfid,
                          "create_guid": dg, "lease_key": lk}),
    );
    assert_eq!(
        r["status"], "STATUS_OBJECT_NAME_NOT_FOUND",
        "purged for good: {r}"
    );
    // The disconnected persistent open keeps its file until it expires.
    // smbshim detaches a dropped connection's handles one by one: until it
    // reaches this one, it is still attached and shares nothing.
    wait_for(
        "the persistent open to be disconnected",
        Duration::from_secs(3),
        || {
            let r = Create::new("p", &["read"], &[], "open").send(&mut b, sb);
            match r["status"].as_str() {
                Some("STATUS_FILE_NOT_AVAILABLE") => Some(()),
                Some("STATUS_SHARING_VIOLATION") => None,
                _ => panic!("{r} after {:?}", t0.elapsed()),
            }
        },
    );
    let r = wait_for(
        "the persistent open to expire",
        Duration::from_secs(10),
        || {
            let r = Create::new("p", &["read"], &[], "open").send(&mut b, sb);
            match r["status"].as_str() {
                Some("STATUS_SUCCESS") => Some(r),
                Some("STATUS_FILE_NOT_AVAILABLE") => None,
                _ => panic!("unexpected {r}"),
            }
        },
    );
    assert_eq!(r["create_action"], "opened");
}

#[test]
fn sessions_and_reconnect_rules() {
    let s = Scratch::new("smb-sessions");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-s");
    let ca = guid();
    let mut a = LineClient::connect(&shim.addr);
    let s1 = setup(&mut a, &ca, "alice", None);
    let rw = ["read", "write"];
    let all = ["read", "write", "delete"];
    let g = guid();
    let lk = guid();
    let o = ok(Create::new("f", &rw, &all, "create")
        .durable(&g, true, 3_000)
        .lease(&lk, "RWH")
        .send(&mut a, s1));
    assert_eq!(o["lease"]["state"], "RWH");
    let fid = o["file_id"].clone();
    // Still attached to a live session: RECONNECT is refused.
    let mut a2 = LineClient::connect(&shim.addr);
    let s2 = setup(&mut a2, &ca, "alice", None);
    let rec = json!({"cmd": "RECONNECT", "session_id": s2, "file_id": fid, "create_guid": g, "lease_key": lk});
    assert_eq!(
        a2.call(rec.clone())["status"],
        "STATUS_OBJECT_NAME_NOT_FOUND"
    );
    // previous_session_id tears the old session down as if its connection
    // had dropped: the open is disconnected, the old session is gone.
    let s3 = setup(&mut a2, &ca, "alice", Some(s1));
    assert_eq!(
        read(&mut a, s1, &fid, 1)["status"],
        "STATUS_USER_SESSION_DELETED"
    );
    // A write open by another client while disconnected: the lease is
    // lowered at once (nobody can ack) and RECONNECT reports the lower state.
    let mut b = LineClient::connect(&shim.addr);
    let sb = setup(&mut b, &guid(), "bob", None);
    let fb = ok(Create::new("f", &rw, &all, "open").send(&mut b, sb))["file_id"].clone();
    ok(b.call(json!({"cmd": "CLOSE", "session_id": sb, "file_id": fb})));
    // RECONNECT without the lease key of a leased open: not found.
    let r =
        a2.call(json!({"cmd": "RECONNECT", "session_id": s3, "file_id": fid, "create_guid": g}));
    assert_eq!(r["status"], "STATUS_OBJECT_NAME_NOT_FOUND", "{r}");
    let mut rec3 = rec.clone();
    rec3["session_id"] = json!(s3);
    let r = ok(a2.call(rec3.clone()));
    assert_eq!(
        r["lease"]["state"], "H",
        "the break while disconnected: {r}"
    );
    assert_eq!(r["durable"]["persistent"], true);
    // Disconnect, reconnect, disconnect: the second disconnect restarts the
    // timeout (3 s), so an expiry timer from the first never reaps it.
    // Each round: wait 2 s, then reconnect from a new connection. The second
    // round is 4 s after the first disconnect, 2 s after the second.
    drop(a2);
    let mut a5 = None;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(2_000));
        drop(a5.take());
        let mut c = LineClient::connect(&shim.addr);
        let sid = setup(&mut c, &ca, "alice", None);
        let mut req = rec.clone();
        req["session_id"] = json!(sid);
        let r = wait_for("the open to be reconnected", Duration::from_secs(5), || {
            let r = c.call(req.clone());
            (r["status"] == "STATUS_SUCCESS").then_some(r)
        });
        assert_eq!(r["file_id"], fid);
        a5 = Some((c, sid));
    }
    let (mut a5, s5) = a5.expect("reconnected");
    // LOGOFF closes durable opens too.
    ok(a5.call(json!({"cmd": "LOGOFF", "session_id": s5})));
    let mut a6 = LineClient::connect(&shim.addr);
    let s6 = setup(&mut a6, &ca, "alice", None);
    let mut rec6 = rec;
    rec6["session_id"] = json!(s6);
    assert_eq!(a6.call(rec6)["status"], "STATUS_OBJECT_NAME_NOT_FOUND");
    assert!(s.root().join("f").exists());
}

#[test]
fn delete_on_close_removes_the_file_with_its_last_open() {
    let s = Scratch::new("smb-doc");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-d");
    let mut a = LineClient::connect(&shim.addr);
    let sa = setup(&mut a, &guid(), "alice", None);
    let all = ["read", "write", "delete"];
    let g = guid();
    let fa = ok(Create::new("f", &all, &all, "create")
        .durable(&g, true, 0)
        .send(&mut a, sa))["file_id"]
        .clone();
    let fb = ok(Create::new("f", &["read"], &all, "open").send(&mut a, sa))["file_id"].clone();
    // Needs delete access.
    let r = a
        .call(json!({"cmd": "SET_INFO", "session_id": sa, "file_id": fb, "delete_on_close": true}));
    assert_eq!(r["status"], "STATUS_ACCESS_DENIED", "{r}");
    let r = a.call(
        json!({"cmd": "SET_INFO", "session_id": sa, "file_id": fa, "delete_on_close": "yes"}),
    );
    assert_eq!(r["status"], "STATUS_INVALID_PARAMETER", "{r}");
    let doc = json!({"cmd": "SET_INFO", "session_id": sa, "file_id": fa, "delete_on_close": true, "op_id": 9});
    ok(a.call(doc.clone()));
    let mut replay = doc;
    replay["replay"] = json!(true);
    ok(a.call(replay));
    // Not the last open: the file stays until the other one closes.
    ok(a.call(json!({"cmd": "CLOSE", "session_id": sa, "file_id": fa})));
    assert!(s.root().join("f").exists(), "another open remains");
    ok(a.call(json!({"cmd": "CLOSE", "session_id": sa, "file_id": fb})));
    assert!(!s.root().join("f").exists(), "deleted with its last open");
    // Cleared again, nothing is deleted.
    let fc = ok(Create::new("h", &all, &all, "create").send(&mut a, sa))["file_id"].clone();
    ok(a.call(
        json!({"cmd": "SET_INFO", "session_id": sa, "file_id": fc, "delete_on_close": true}),
    ));
    ok(a.call(
        json!({"cmd": "SET_INFO", "session_id": sa, "file_id": fc, "delete_on_close": false}),
    ));
    ok(a.call(json!({"cmd": "CLOSE", "session_id": sa, "file_id": fc})));
    assert!(s.root().join("h").exists());
}

#[test]
fn malformed_requests_get_invalid_parameter_and_change_nothing() {
    let s = Scratch::new("smb-malformed");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-m");
    let mut a = LineClient::connect(&shim.addr);
    let sa = setup(&mut a, &guid(), "alice", None);
    let cases = [
        json!({"cmd": "CREATE", "session_id": sa, "path": "x", "access": [], "share": [], "disposition": "create"}),
        json!({"cmd": "CREATE", "session_id": sa, "path": "x", "access": ["eat"], "share": [], "disposition": "create"}),
        json!({"cmd": "CREATE", "session_id": sa, "path": "x", "access": ["read"], "share": "all", "disposition": "create"}),
        json!({"cmd": "CREATE", "session_id": sa, "path": "x", "access": ["read"], "share": [], "disposition": "maybe"}),
        json!({"cmd": "CREATE", "session_id": sa, "path": "x", "access": ["read"], "share": [], "disposition": "create",
               "lease": {"key": guid(), "state": "W"}}),
        json!({"cmd": "CREATE", "session_id": sa, "path": "x", "access": ["read"], "share": [], "disposition": "create",
               "durable": {"create_guid": "not-a-uuid", "persistent": true, "timeout_ms": 0}}),
        json!({"cmd": "CREATE", "session_id": sa, "access": ["read"], "share": [], "disposition": "create"}),
        json!({"cmd": "CREATE", "session_id": sa, "path": 7, "access": ["read"], "share": [], "disposition": "create"}),
        json!({"cmd": "SESSION_SETUP", "client_guid": "x", "user": "alice"}),
        json!({"cmd": "READ", "session_id": sa, "file_id": "f", "offset": -1, "length": 1}),
        json!({"cmd": "LOCK", "session_id": sa, "file_id": "f", "locks": "all"}),
        json!({"cmd": 5}),
    ];
    for (i, c) in cases.iter().enumerate() {
        let r = a.call(c.clone());
        assert_eq!(r["status"], "STATUS_INVALID_PARAMETER", "case {i}: {r}");
        assert!(r["error"].is_string(), "case {i} says why: {r}");
    }
    let r = a.call(json!({"cmd": "FROB"}));
    assert_eq!(r["status"], "STATUS_NOT_SUPPORTED");
    let r = a.raw(b"[1, 2]\n").unwrap();
    assert_eq!(
        (r["status"].as_str(), r["mid"].is_null()),
        (Some("STATUS_INVALID_PARAMETER"), true)
    );
    let r = a.raw(b"{\"cmd\": \"ECHO\", \"mid\": \"seven\"}\n").unwrap();
    assert_eq!(r["status"], "STATUS_INVALID_PARAMETER");
    // Extra fields are ignored; the connection is still fine.
    ok(a.call(json!({"cmd": "ECHO", "colour": "blue"})));
    assert!(!s.root().join("x").exists(), "nothing was created");
    let ctl = libfilter::client::FilterClient::connect_control(&s.socket()).unwrap();
    assert!(ctl.handles().unwrap().is_empty(), "nothing stored");
}

/// Mandatory locks across two smbshim instances, and the lock hints that
/// spare I/O on unlocked files a round trip to filterd.
#[test]
fn locks_are_mandatory_across_frontends_and_unlocked_io_needs_no_round_trip() {
    let s = Scratch::new("smb-hints");
    let d = Filterd::start(&s, &[], &[]);
    let shim_a = Shim::start("smbshim", &s.socket(), "smb-ha");
    let shim_b = Shim::start("smbshim", &s.socket(), "smb-hb");
    let mut a = LineClient::connect(&shim_a.addr);
    let mut b = LineClient::connect(&shim_b.addr);
    let sa = setup(&mut a, &guid(), "alice", None);
    let sb = setup(&mut b, &guid(), "bob", None);
    let rw = ["read", "write"];
    let all = ["read", "write", "delete"];
    let fa = ok(Create::new("f", &rw, &all, "create").send(&mut a, sa))["file_id"].clone();
    let fb = ok(Create::new("f", &rw, &all, "open").send(&mut b, sb))["file_id"].clone();
    let io_checks = |d: &Filterd| d.control().stats().unwrap().io_checks;
    let write = |c: &mut LineClient, sid: u64, fid: &Value| {
        c.call(json!({"cmd": "WRITE", "session_id": sid, "file_id": fid, "offset": 0, "data": b64("abcd")}))
    };
    let before = io_checks(&d);
    for _ in 0..20 {
        ok(write(&mut b, sb, &fb));
        ok(read(&mut a, sa, &fa, 4));
    }
    assert_eq!(io_checks(&d), before, "no lock on the file: no CheckIo");
    // A's exclusive lock: from the moment it is granted, B's I/O is refused.
    let lock = |unlock: bool| {
        json!({"cmd": "LOCK", "session_id": sa, "file_id": fa,
               "locks": [{"offset": 0, "length": 10, "exclusive": true, "unlock": unlock}]})
    };
    ok(a.call(lock(false)));
    assert_eq!(
        write(&mut b, sb, &fb)["status"],
        "STATUS_FILE_LOCK_CONFLICT"
    );
    assert_eq!(
        read(&mut b, sb, &fb, 4)["status"],
        "STATUS_FILE_LOCK_CONFLICT"
    );
    ok(write(&mut a, sa, &fa));
    // A new open of the locked file learns it at open time.
    let mut b2 = LineClient::connect(&shim_b.addr);
    let sb2 = setup(&mut b2, &guid(), "carol", None);
    let fb2 = ok(Create::new("f", &["read"], &all, "open").send(&mut b2, sb2))["file_id"].clone();
    assert_eq!(
        read(&mut b2, sb2, &fb2, 4)["status"],
        "STATUS_FILE_LOCK_CONFLICT"
    );
    // Unlocked: B writes again, and soon without a round trip.
    ok(a.call(lock(true)));
    ok(write(&mut b, sb, &fb));
    wait_for(
        "the lock hint to be withdrawn",
        Duration::from_secs(5),
        || {
            let n = io_checks(&d);
            ok(write(&mut b, sb, &fb));
            (io_checks(&d) == n).then_some(())
        },
    );
}
