//! An answer that comes after its call gave up. A frontend's `FilterClient`
//! waits `RKFILTER_CALL_TIMEOUT_MS` (120 s by default) for filterd; when
//! filterd is stalled past it (SIGSTOP here; a slow disk or a long commit
//! in the field) the frontend tells its client the request failed. Before
//! the fix the answer that came later was dropped unread: a CREATE's open
//! stayed in filterd, attached to the frontend, named by nobody — its share
//! mode refused every other client for as long as the frontend lived; a
//! LOCK's range stayed locked against everyone. Now libfilter remembers
//! what a call that gave up was and undoes its late answer: a fresh open is
//! closed, a replayed or resumed one detached (it stays resumable), a lock
//! without a lock sequence unlocked.

use std::time::Duration;

use nix::sys::signal::Signal;
use rkfilter_tests::smb3::Dialogue;
use rkfilter_tests::{
    filterctl, smb_session, wait_for, wait_logged, Filterd, LineClient, RkSmbd, Scratch, Shim,
};
use serde_json::{json, Value};

/// How long smbshim waits for filterd before it answers its client.
const CALL_TIMEOUT_MS: &str = "700";

/// filterd and an smbshim whose calls give up after [`CALL_TIMEOUT_MS`].
fn setup(name: &str) -> (Scratch, Filterd, Shim) {
    setup_shim(name, "smbshim")
}

/// filterd and frontend `shim` whose calls give up after [`CALL_TIMEOUT_MS`].
fn setup_shim(name: &str, shim: &str) -> (Scratch, Filterd, Shim) {
    setup_failing(name, shim, &[])
}

/// As [`setup_shim`], filterd started with environment `env`.
fn setup_failing(name: &str, shim: &str, env: &[(&str, &str)]) -> (Scratch, Filterd, Shim) {
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &[], env);
    let smb = Shim::start_with_env(
        shim,
        d.socket(),
        name,
        &[("RKFILTER_CALL_TIMEOUT_MS", CALL_TIMEOUT_MS)],
    );
    (s, d, smb)
}

/// filterd's handles: (path, connection state) each.
fn handles(d: &Filterd) -> Vec<(String, String)> {
    let sock = d.socket().display().to_string();
    let v = filterctl(&["--socket", &sock, "handles", "--json"]).json();
    v.as_array()
        .expect("a list")
        .iter()
        .map(|h| {
            let r = if h["record"].is_object() {
                &h["record"]
            } else {
                h
            };
            (
                r["path"].as_str().unwrap_or_default().to_owned(),
                r["conn"]["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Waits until filterd's one handle, of `f`, is disconnected.
fn wait_detached(d: &Filterd) {
    wait_for(
        "the late answer's handle to be detached",
        Duration::from_secs(10),
        || (handles(d) == [("f".to_owned(), "disconnected".to_owned())]).then_some(()),
    );
}

/// Sends `req` on `c` while filterd is stopped, waits for smbshim's answer
/// (it gives up on filterd), then lets filterd go on: its late answer
/// reaches smbshim after the client was told the request failed.
fn answered_late(d: &Filterd, c: &mut LineClient, req: Value) -> Value {
    d.stop();
    let r = c.call(req);
    d.signal(Signal::SIGCONT);
    assert_eq!(r["status"], "STATUS_FILE_NOT_AVAILABLE", "gave up: {r}");
    r
}

fn exclusive_create(sid: u64) -> Value {
    json!({"cmd": "CREATE", "session_id": sid, "path": "f", "access": ["read", "write"],
           "share": [], "disposition": "open_if"})
}

/// Client `a` (session `sid`) of `smb` sends an exclusive CREATE of `f`
/// that filterd answers late; waits for the open nobody can name to go
/// (`what`), then opens `f` exclusively from another client: no orphan
/// refuses it. Returns that client, its session and the CREATE's reply.
fn late_open_goes(
    d: &Filterd,
    smb: &Shim,
    a: &mut LineClient,
    sid: u64,
    what: &str,
) -> (LineClient, u64, Value) {
    answered_late(d, a, exclusive_create(sid));
    let resumed = std::time::Instant::now();
    wait_for(what, Duration::from_secs(10), || {
        handles(d).is_empty().then_some(())
    });
    eprintln!(
        "the late open was closed {:?} after filterd went on",
        resumed.elapsed()
    );
    let (mut b, bsid) = smb_session(&smb.addr);
    let r = b.call(exclusive_create(bsid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    (b, bsid, r)
}

#[test]
fn an_open_answered_after_its_call_gave_up_is_closed() {
    let (_s, d, smb) = setup("late-open");
    let (mut a, sid) = smb_session(&smb.addr);
    // The open nobody can name goes away once its late answer is read.
    let (mut b, bsid, r) = late_open_goes(&d, &smb, &mut a, sid, "the late open to be closed");
    // And the first client, told its open failed, opens again once b is done.
    let fid = r["file_id"].clone();
    let r = b.call(json!({"cmd": "CLOSE", "session_id": bsid, "file_id": fid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = a.call(exclusive_create(sid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
}

/// The late open's undo fails: filterd refuses its close
/// (`close.refuse:1:fail`, as a close whose commit fails is undone).
/// Before, the failure was only logged: the open stayed attached to
/// smbshim, named by nobody, and refused every other client's exclusive
/// open for as long as smbshim stayed attached (this test timed out).
/// Now the undo is sent again until filterd answers it.
#[test]
fn a_late_open_whose_close_is_refused_is_closed_again() {
    let (_s, d, smb) = setup_failing(
        "late-open-refused",
        "smbshim",
        &[("RKFILTER_FAILPOINTS", "close.refuse:1:fail")],
    );
    let (mut a, sid) = smb_session(&smb.addr);
    let what = "the late open to be closed, its refused close sent again";
    late_open_goes(&d, &smb, &mut a, sid, what);
}

#[test]
fn a_replayed_open_answered_late_is_detached_and_stays_resumable() {
    let (_s, d, smb) = setup("late-replay");
    let (mut a, sid) = smb_session(&smb.addr);
    let guid = uuid::Uuid::new_v4().to_string();
    let create = json!({"cmd": "CREATE", "session_id": sid, "path": "f",
        "access": ["read", "write"], "share": [], "disposition": "open_if", "replay": true,
        "durable": {"create_guid": guid, "persistent": true, "timeout_ms": 60000}});
    answered_late(&d, &mut a, create.clone());

    // Not closed (the client may replay its GUID), not kept attached to a
    // frontend that never handed it out: disconnected, as after a lost
    // connection.
    wait_detached(&d);
    // The client replays its create and gets the handle back.
    let r = a.call(create);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(handles(&d), [("f".to_owned(), "connected".to_owned())]);
}

/// Client `a` (session `sid`) of `smb` sends a persistent CREATE of `f`
/// with `disposition` (sharing everything) that filterd answers late;
/// waits for its handle to wait disconnected. Returns the CREATE, to be
/// replayed.
fn late_persistent_create(d: &Filterd, a: &mut LineClient, sid: u64, disposition: &str) -> Value {
    late_persistent_create_with(d, a, sid, disposition, json!(["read", "write"]))
}

/// [`late_persistent_create`] asking for `access`.
fn late_persistent_create_with(
    d: &Filterd,
    a: &mut LineClient,
    sid: u64,
    disposition: &str,
    access: Value,
) -> Value {
    let guid = uuid::Uuid::new_v4().to_string();
    let create = json!({"cmd": "CREATE", "session_id": sid, "path": "f",
        "access": access, "share": ["read", "write", "delete"],
        "disposition": disposition,
        "durable": {"create_guid": guid, "persistent": true, "timeout_ms": 60000}});
    answered_late(d, a, create.clone());
    // Not closed: the client was told to try again and replays its GUID.
    wait_detached(d);
    let mut replay = create;
    replay["replay"] = json!(true);
    replay
}

/// A fresh persistent CREATE (create GUID G, overwrite_if) answered late.
/// Its client was told STATUS_FILE_NOT_AVAILABLE, "retry later", and
/// replays G. Before the fix the late open was closed, G with it, and the
/// replay ran the CREATE again: after client b had written and closed the
/// file, the replay answered "overwritten" and truncated b's acknowledged
/// write. Now the late open is detached and the replay takes it back: the
/// original's answer, the file as b left it.
#[test]
fn a_late_persistent_overwrite_is_replayed_not_run_again() {
    let (s, d, smb) = setup("late-durable-overwrite");
    std::fs::write(s.root().join("f"), "old contents").expect("write");
    let (mut a, sid) = smb_session(&smb.addr);
    let replay = late_persistent_create(&d, &mut a, sid, "overwrite_if");
    b_writes_f(&smb.addr);

    let r = a.call(replay);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(r["create_action"], "overwritten", "the original's: {r}");
    assert_eq!(
        std::fs::read_to_string(s.root().join("f")).expect("read"),
        "b's data",
        "the replay did not overwrite again"
    );
    assert_eq!(handles(&d), [("f".to_owned(), "connected".to_owned())]);
}

/// As above with disposition create: the replay of a CREATE that made
/// the file was answered STATUS_OBJECT_NAME_COLLISION before the fix (the
/// file it collided with was its own); now it gets the original open.
#[test]
fn a_late_persistent_create_is_replayed_without_a_collision() {
    let (_s, d, smb) = setup("late-durable-create");
    let (mut a, sid) = smb_session(&smb.addr);
    let replay = late_persistent_create(&d, &mut a, sid, "create");
    let r = a.call(replay);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(r["create_action"], "created", "the original's: {r}");
    assert_eq!(handles(&d), [("f".to_owned(), "connected".to_owned())]);
}

/// filterd is killed under smbshim's persistent open and restarted with
/// its first resume stalled past smbshim's call timeout
/// (`request.resume:sleep2500`). smbshim's attachment retries the resume,
/// is refused "attached, not disconnected" (the first did attach it), and
/// counts the handle resumed. Before the fix the first resume's late
/// answer was still undone: its `Detach` took the handle from under the
/// live open — READ, LOCK and CLOSE on it STATUS_ACCESS_DENIED, the
/// handle disconnected and expiring under a connected client. Now the
/// attachment marks the handle held before it looks, and the late answer
/// is left.
#[test]
fn a_resume_answered_late_after_a_restart_leaves_the_open_attached() {
    resume_late_after_a_restart("late-resume-restart", "request.resume:sleep2500");
}

/// As above, and the attachment's look at the handle (a `Handle` view,
/// after its retried resume was refused "attached") goes unanswered too
/// (`request.handle:sleep2500`). Before the fix the unanswered look
/// counted as "not attached here": the handle was reported lost, smbshim
/// forgot the open (READ STATUS_FILE_CLOSED), yet filterd kept it attached
/// to smbshim's live connection, nobody's open, with no detach ever sent.
/// Now an unanswered look is looked at again, and the open keeps working.
#[test]
fn a_resume_whose_look_goes_unanswered_leaves_the_open_attached() {
    resume_late_after_a_restart(
        "late-resume-look",
        "request.resume:sleep2500,request.handle:sleep2500",
    );
}

/// smbshim's persistent open of `f`; filterd killed and restarted with
/// failpoints `fp`; then the open must still work and its handle be
/// connected.
fn resume_late_after_a_restart(name: &str, fp: &str) {
    let (s, mut d, smb) = setup(name);
    std::fs::write(s.root().join("f"), "hello world").expect("write");
    let (mut a, sid) = smb_session(&smb.addr);
    let guid = uuid::Uuid::new_v4().to_string();
    let r = a.call(json!({"cmd": "CREATE", "session_id": sid, "path": "f",
        "access": ["read", "write"], "share": ["read"], "disposition": "open",
        "durable": {"create_guid": guid, "persistent": true, "timeout_ms": 60000}}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    d.kill9();
    let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
    // smbshim has resumed its handles (retried, refused, looked) by then;
    // the late answer's detach, when made, came before.
    d.wait_log(
        "frontend seen before the restart resynced",
        Duration::from_secs(30),
    );
    // Every armed stall happened (a point never reached would leave this
    // test about nothing).
    for armed in fp.split(',') {
        d.wait_stalled_at(armed, Duration::from_secs(30));
    }
    let r = a.call(json!({"cmd": "READ", "session_id": sid, "file_id": fid,
        "offset": 0, "length": 5}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(handles(&d), [("f".to_owned(), "connected".to_owned())]);
    let r = a.call(json!({"cmd": "CLOSE", "session_id": sid, "file_id": fid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
}

#[test]
fn a_lock_answered_after_its_call_gave_up_is_unlocked() {
    let (_s, d, smb) = setup("late-lock");
    let (mut a, sid) = smb_session(&smb.addr);
    let share = json!({"cmd": "CREATE", "session_id": sid, "path": "f", "access": ["read", "write"],
                       "share": ["read", "write"], "disposition": "open_if"});
    let r = a.call(share.clone());
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let lock = |sid: u64, fid: &Value| {
        json!({"cmd": "LOCK", "session_id": sid, "file_id": fid,
               "locks": [{"offset": 0, "length": 10, "exclusive": true, "unlock": false}]})
    };
    // b's open first: with two opens of the file, a lock goes to filterd.
    let (mut b, bsid) = smb_session(&smb.addr);
    let mut open = share;
    open["session_id"] = json!(bsid);
    let r = b.call(open);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let bfid = r["file_id"].clone();
    answered_late(&d, &mut a, lock(sid, &fid));

    // b's lock of the range: refused while the lock a was told failed
    // still stands, granted once it is undone.
    wait_for(
        "the late lock to be undone",
        Duration::from_secs(10),
        || {
            let r = b.call(lock(bsid, &bfid));
            (r["status"] == "STATUS_SUCCESS").then_some(())
        },
    );
}

/// Client `a` (session `sid`) creates `f` with delete access: its file id.
fn deletable_open(a: &mut LineClient, sid: u64) -> Value {
    let r = a.call(json!({"cmd": "CREATE", "session_id": sid, "path": "f",
        "access": ["read", "write", "delete"], "share": ["read", "write", "delete"],
        "disposition": "open_if"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    r["file_id"].clone()
}

fn set_delete_on_close(sid: u64, fid: &Value) -> Value {
    json!({"cmd": "SET_INFO", "session_id": sid, "file_id": fid, "delete_on_close": true})
}

/// Open `fid`'s SET_INFO `delete_on_close` answered late (filterd
/// stopped), then its CLOSE: `f` stays, its client told the change failed.
fn late_delete_on_close_then_close_leaves_f(
    s: &Scratch,
    d: &Filterd,
    a: &mut LineClient,
    sid: u64,
    fid: &Value,
) {
    answered_late(d, a, set_delete_on_close(sid, fid));
    let r = a.call(json!({"cmd": "CLOSE", "session_id": sid, "file_id": fid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(
        s.root().join("f").exists(),
        "told its delete on close failed, the client's file is deleted"
    );
}

/// A SET_INFO `delete_on_close` that filterd answers after smbshim's call
/// gave up, and a query of the handle after it too: the client is told
/// STATUS_FILE_NOT_AVAILABLE, and closes without retrying. Before the fix
/// the flag filterd set late stood and the close deleted the file the
/// client was told would stay (review of session 32); now smbshim sets the
/// flag back to what the client was told before the close.
#[test]
fn smbshim_a_delete_on_close_set_after_its_call_gave_up_is_set_back_before_close() {
    let (s, d, smb) = setup("late-doc-unknown");
    let (mut a, sid) = smb_session(&smb.addr);
    let fid = deletable_open(&mut a, sid);
    late_delete_on_close_then_close_leaves_f(&s, &d, &mut a, sid, &fid);
}

/// The same on an open a replay found in filterd (a persistent CREATE
/// answered late, replayed): smbshim does not know its flag and asks
/// filterd first, stopped too. Before the fix the change was sent all the
/// same and, its outcome unknown, nothing was set back (what to set it
/// back to was unknown): the close deleted the file. Now a change whose
/// told flag cannot be learnt is not sent (review of 1624469).
#[test]
fn smbshim_sends_no_delete_on_close_it_could_not_set_back() {
    let (s, d, smb) = setup("late-doc-replayed");
    let (mut a, sid) = smb_session(&smb.addr);
    let access = json!(["read", "write", "delete"]);
    let replay = late_persistent_create_with(&d, &mut a, sid, "open_if", access);
    let r = a.call(replay);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    late_delete_on_close_then_close_leaves_f(&s, &d, &mut a, sid, &fid);
}

/// A SET_INFO `delete_on_close` whose filterd call gives up (filterd's
/// engine stalled 1 s on it, smbshim waiting 700 ms) but whose outcome the
/// query after it learns: the client is told it succeeded, and the close
/// deletes the file. Before the fix it was told STATUS_FILE_NOT_AVAILABLE
/// while the flag stood.
#[test]
fn smbshim_a_delete_on_close_learnt_after_its_call_gave_up_is_answered_by_its_outcome() {
    let (s, d, smb) = setup_failing(
        "late-doc-learnt",
        "smbshim",
        &[(
            "RKFILTER_FAILPOINTS",
            "request.set_delete_on_close:sleep1000",
        )],
    );
    let (mut a, sid) = smb_session(&smb.addr);
    let fid = deletable_open(&mut a, sid);
    let r = a.call(set_delete_on_close(sid, &fid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    d.wait_stalled_at("request.set_delete_on_close", Duration::from_secs(10));
    let r = a.call(json!({"cmd": "CLOSE", "session_id": sid, "file_id": fid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(
        !s.root().join("f").exists(),
        "told delete on close, f stays"
    );
}

/// A CLOSE of an open from another connection of its session while the
/// open's SET_INFO `delete_on_close` is still in flight (filterd's engine
/// stalled 1.5 s on the change; smbshim waits 5 s): filterd runs the
/// change, then the close. Before the fix smbshim marked an open unsure
/// only once a change's outcome was learnt unknown, so the close went
/// with the change's flag and deleted the file, and the SET_INFO, its
/// learning query finding the handle gone, was answered a failure: a
/// client told its delete on close failed had its file deleted (review
/// of 1624469). Now the open is marked while the change is in flight and
/// the close carries the flag its client was last told (`Close`'s
/// `delete_on_close`), which filterd sets in the close's own step: the
/// file stays, and the SET_INFO is answered STATUS_FILE_CLOSED.
#[test]
fn smbshim_a_close_from_elsewhere_while_a_delete_on_close_is_in_flight_keeps_the_file() {
    let s = Scratch::new("late-doc-in-flight");
    let d = Filterd::start(
        &s,
        &[],
        &[(
            "RKFILTER_FAILPOINTS",
            "request.set_delete_on_close:sleep1500",
        )],
    );
    let smb = Shim::start_with_env(
        "smbshim",
        d.socket(),
        "late-doc-in-flight",
        &[("RKFILTER_CALL_TIMEOUT_MS", "5000")],
    );
    let (mut a, sid) = smb_session(&smb.addr);
    let fid = deletable_open(&mut a, sid);
    let set = set_delete_on_close(sid, &fid);
    let setter = std::thread::spawn(move || a.call(set));
    // The change is in filterd's engine, stalled there.
    d.wait_log(
        "failpoint request.set_delete_on_close: stalling",
        Duration::from_secs(10),
    );
    let mut b = LineClient::connect(&smb.addr);
    let r = b.call(json!({"cmd": "CLOSE", "session_id": sid, "file_id": fid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = setter.join().expect("the SET_INFO's thread");
    assert_eq!(r["status"], "STATUS_FILE_CLOSED", "{r}");
    assert!(
        s.root().join("f").exists(),
        "closed while its delete on close was in flight, the client's file is deleted"
    );
}

/// nfsshim: an OPEN (a `ReplayOpen` carrying the open's records) that
/// filterd answers after nfsshim answered `NFS4ERR_DELAY`. Before the fix
/// its handle stayed attached to nfsshim, named by no stateid the client
/// was given, until nfsshim went; now it is detached — it expires after
/// its timeout unless the client's re-sent OPEN takes it back, as here.
#[test]
fn nfsshim_detaches_an_open_answered_late_and_its_resend_gets_it() {
    let (_s, d, nfs) = setup_shim("late-nfs", "nfsshim");
    let mut n = rkfilter_tests::Nfs::connect(&nfs.addr, "host", "00000000000000aa");
    d.stop();
    let open = json!({"op": "OPEN", "owner": "p", "path": "f", "access": "both", "deny": "both",
                      "create": {"mode": "unchecked"}});
    let r = n.call(open.clone());
    d.signal(Signal::SIGCONT);
    assert_eq!(r["status"], "NFS4ERR_DELAY", "gave up: {r}");

    wait_detached(&d);
    // The client re-sends its OPEN (same slot and seqid) and gets it.
    let r = n.send(open);
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    assert_eq!(handles(&d), [("f".to_owned(), "connected".to_owned())]);
}

/// filterd and an rksmbd (share `data`, user alice) whose calls give up
/// after `timeout_ms`.
fn setup_rksmbd(name: &str, timeout_ms: &str) -> (Scratch, Filterd, RkSmbd) {
    setup_rksmbd_failing(name, timeout_ms, &[])
}

/// As [`setup_rksmbd`], filterd started with environment `env`.
fn setup_rksmbd_failing(
    name: &str,
    timeout_ms: &str,
    env: &[(&str, &str)],
) -> (Scratch, Filterd, RkSmbd) {
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &[], env);
    let env = [("RKFILTER_CALL_TIMEOUT_MS", timeout_ms)];
    let srv = RkSmbd::start_with_env(&s, "rksmbd", "data", &[("alice", "pw")], &env);
    (s, d, srv)
}

/// rksmbd and a real SMB 3 client (`tests/smb3/late_reply.py`, raw SMB
/// 3.0.2), rksmbd's calls giving up after 2 s (room for the replay below
/// to be answered once filterd goes on). A plain exclusive CREATE sent
/// while filterd is stopped fails with STATUS_FILE_NOT_AVAILABLE
/// (docs/smb3.md); after SIGCONT its late open is closed and another
/// client's exclusive open is granted. A persistent CREATE (DH2Q, create
/// GUID G) fails with STATUS_SERVER_UNAVAILABLE, and its replay
/// (SMB2_FLAGS_REPLAY_OPERATION, G) is sent while filterd is still
/// stopped: filterd answers the original (late) and the replay with the
/// same handle, and the original's undo must leave the replay's handle
/// attached and working. A durable v1 CREATE (DHnQ: its create GUID is
/// rksmbd's own, which no client replays) is closed once answered late,
/// not left detached holding the file for its timeout with nobody to
/// reconnect it (re-review of 4418b41). A persistent CREATE that fails so
/// and is not replayed is left detached: its client, told
/// STATUS_SERVER_UNAVAILABLE, may yet replay it
/// (`rksmbd_replays_a_timed_out_persistent_create_without_running_it_again`).
#[test]
fn rksmbd_undoes_creates_answered_after_its_call_gave_up() {
    let (_s, d, srv) = setup_rksmbd("late-rksmbd", "2000");
    let mut script = Dialogue::start(&srv, "late_reply.py", Duration::from_secs(60));
    let file = || "late.txt".to_owned();

    late_create_closed(&d, &mut script, "gave up");

    script.expect("ready");
    d.stop();
    script.say("go");
    script.expect("replaying");
    d.signal(Signal::SIGCONT);

    script.expect("replayed");
    assert_eq!(
        handles(&d),
        [(file(), "connected".to_owned())],
        "the replay holds the handle\n{}",
        script.log
    );
    script.say("go");

    late_create_closed(&d, &mut script, "gave up again");

    script.expect("ready");
    d.stop();
    script.say("go");
    script.expect("gave up on H");
    d.signal(Signal::SIGCONT);
    wait_for(
        "the late persistent open to be left detached",
        Duration::from_secs(10),
        || (handles(&d) == [(file(), "disconnected".to_owned())]).then_some(()),
    );
    script.say("go");
    script.finish();
}

/// Waits for `script` to say "closed", then checks doc.txt is still
/// there: its client was told its delete on close failed.
fn doc_txt_stays(s: &Scratch, script: &mut Dialogue) {
    script.expect("closed");
    assert!(
        s.root().join("doc.txt").exists(),
        "told its delete on close failed, the client's file is deleted\n{}",
        script.log
    );
}

/// rksmbd and a real SMB 3 client (`tests/smb3/late_delete_on_close.py`),
/// rksmbd's calls giving up after 1 s. A delete-pending SET_INFO sent while
/// filterd is stopped fails (STATUS_FILE_NOT_AVAILABLE: the call and the
/// query of its outcome gave up); filterd sets the flag late; the client
/// closes without retrying. Before the fix the file was deleted under a
/// client told the change failed (review of session 32); now rksmbd's
/// close carries the flag it told the client. Then a delete-pending
/// SET_INFO filterd stalls 1.5 s on (its second SetDeleteOnClose: the
/// close's told flag needs no set-back call of its own): the call gives up,
/// the query after it learns the flag set, the client is told SUCCESS,
/// and its close deletes the file.
#[test]
fn rksmbd_answers_a_delete_on_close_by_filterd_s_flag_after_its_call_gave_up() {
    let env = [(
        "RKFILTER_FAILPOINTS",
        "request.set_delete_on_close:2:sleep1500",
    )];
    let (s, d, _srv, mut script) =
        delete_on_close_given_up("late-rksmbd-doc", "late_delete_on_close.py", &env);
    doc_txt_stays(&s, &mut script);
    script.say("go");
    script.expect("closed");
    d.wait_stalled_at("request.set_delete_on_close", Duration::from_secs(10));
    assert!(
        !s.root().join("learnt.txt").exists(),
        "told delete pending, the file stays\n{}",
        script.log
    );
    script.say("go");
    script.finish();
}

/// rksmbd and a real SMB 3 client
/// (`tests/smb3/late_delete_on_close_previous_session.py`), rksmbd's calls
/// giving up after 1 s: a persistent open's delete-pending SET_INFO sent
/// while filterd is stopped fails, its outcome unknown, and filterd sets
/// the flag late. The client then sets up a session with PreviousSessionId
/// naming the old one, reconnects the open (DH2C) and closes it. Before
/// the fix the ended session's handles were detached with filterd's flag
/// (only the old connection's own release set it back, and that
/// connection forgot its opens): the DH2C took the flag over and the
/// CLOSE deleted the file its client was told stays (review of 1624469).
#[test]
fn rksmbd_sets_an_unsure_delete_on_close_back_when_another_session_ends_its_own() {
    let (s, _d, _srv, mut script) = delete_on_close_given_up(
        "late-rksmbd-doc-prev",
        "late_delete_on_close_previous_session.py",
        &[],
    );
    doc_txt_stays(&s, &mut script);
    script.say("go");
    script.finish();
}

/// rksmbd (1 s call timeout; filterd run with `env`) and `script`, which
/// opens a file and prints "ready", asks its delete on close while filterd
/// is stopped, prints "gave up" once it failed, and goes on once filterd
/// does.
fn delete_on_close_given_up(
    name: &str,
    script: &str,
    env: &[(&str, &str)],
) -> (Scratch, Filterd, RkSmbd, Dialogue) {
    let (s, d, srv) = setup_rksmbd_failing(name, "1000", env);
    let mut script = Dialogue::start(&srv, script, Duration::from_secs(60));
    script.expect("ready");
    d.stop();
    script.say("go");
    script.expect("gave up");
    d.signal(Signal::SIGCONT);
    script.say("go");
    (s, d, srv, script)
}

/// The same with an AppInstanceId
/// (`tests/smb3/late_delete_on_close_app_instance.py`): another client's
/// open under the same AppInstanceId closes the marked open from its own
/// connection (`close_elsewhere`). Before the fix that close went with the
/// flag filterd set late, and the file was deleted at once.
#[test]
fn rksmbd_sets_an_unsure_delete_on_close_back_before_an_app_instance_takeover() {
    let (_s, _d, _srv, mut script) = delete_on_close_given_up(
        "late-rksmbd-doc-app",
        "late_delete_on_close_app_instance.py",
        &[],
    );
    script.finish();
}

/// rksmbd (calls waiting 5 s) and a real SMB 3 client
/// (`tests/smb3/in_flight_delete_on_close_app_instance.py`), filterd's
/// engine stalled 1.5 s on the delete on close: client A's delete-pending
/// SET_INFO is in flight when client B's open under the same AppInstanceId
/// closes A's open from B's connection (`close_elsewhere`). Before the fix
/// the open was marked only once a change's outcome was learnt unknown, so
/// that close went with the flag the change set just before it, and the
/// file A was never told goes was deleted under B's open; now the close
/// carries the flag A was last told, which filterd sets in the close's own
/// step.
#[test]
fn rksmbd_an_app_instance_takeover_while_a_delete_on_close_is_in_flight_keeps_the_file() {
    let env = [(
        "RKFILTER_FAILPOINTS",
        "request.set_delete_on_close:sleep1500",
    )];
    let (_s, d, srv) = setup_rksmbd_failing("late-rksmbd-doc-in-flight", "5000", &env);
    let mut script = Dialogue::start(
        &srv,
        "in_flight_delete_on_close_app_instance.py",
        Duration::from_secs(60),
    );
    script.expect("sent");
    d.wait_log(
        "failpoint request.set_delete_on_close: stalling",
        Duration::from_secs(10),
    );
    script.say("go");
    script.finish();
}

/// rksmbd and a real SMB 3 client (`tests/smb3/late_delete_on_close_create.py`),
/// rksmbd's calls giving up after 1 s, filterd's engine stalled 2.5 s on
/// the delete on close a CREATE (FILE_DELETE_ON_CLOSE) of an existing file
/// asks for: the call and the query of its outcome give up, the CREATE
/// fails and its handle is closed. Before the fix the close, run after the
/// late set, deleted the file of a client told its CREATE failed; now the
/// flag is cleared first (sent after the set, so filterd runs it after).
#[test]
fn rksmbd_a_create_whose_delete_on_close_gave_up_leaves_the_file() {
    let env = [(
        "RKFILTER_FAILPOINTS",
        "request.set_delete_on_close:sleep2500",
    )];
    let (s, d, srv) = setup_rksmbd_failing("late-rksmbd-doc-create", "1000", &env);
    std::fs::write(s.root().join("kept.txt"), b"kept").expect("write kept.txt");
    let mut script = Dialogue::start(
        &srv,
        "late_delete_on_close_create.py",
        Duration::from_secs(60),
    );
    script.expect("failed");
    script.finish();
    d.wait_stalled_at("request.set_delete_on_close", Duration::from_secs(10));
    // The handle's close, after filterd went on: the file stays.
    wait_for(
        "the failed CREATE's handle to go",
        Duration::from_secs(10),
        || handles(&d).is_empty().then_some(()),
    );
    assert_eq!(
        std::fs::read(s.root().join("kept.txt")).ok().as_deref(),
        Some(&b"kept"[..]),
        "told its CREATE failed, the client's file is deleted\n{}",
        script.log
    );
}

/// rksmbd and a real SMB 3 client (`tests/smb3/late_replay.py`), rksmbd's
/// calls giving up after 1 s: a persistent OVERWRITE_IF CREATE (DH2Q,
/// create GUID G) of `late.txt` sent while filterd is stopped is answered
/// STATUS_SERVER_UNAVAILABLE (MS-SMB2 3.2.5.7: the client replays it);
/// filterd's late answer leaves the open detached; another client writes
/// the file; the first client's connection drops and it replays the
/// CREATE (SMB2_FLAGS_REPLAY_OPERATION, G) from a new connection. Before
/// the fix the late open was closed (and the CREATE answered
/// STATUS_FILE_NOT_AVAILABLE): the replay — which a client whose
/// connection dropped before that answer sends all the same — ran the
/// CREATE again and truncated the other client's acknowledged write. Now
/// it gets the original open: its create action (created, where a CREATE
/// run again answers overwritten: the file is missing at first), the file
/// as the other client left it.
#[test]
fn rksmbd_replays_a_timed_out_persistent_create_without_running_it_again() {
    let (s, d, srv) = setup_rksmbd("late-rksmbd-replay", "1000");
    // Missing: the original answers FILE_CREATED, a CREATE run again
    // FILE_OVERWRITTEN.
    let path = s.root().join("late.txt");
    let mut script = Dialogue::start(&srv, "late_replay.py", Duration::from_secs(60));
    script.expect("ready");
    d.stop();
    script.say("go");
    script.expect("gave up");
    d.signal(Signal::SIGCONT);
    // Polled for up to 10 s; past that the script goes on, and its replay
    // shows what the late answer left.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while handles(&d) != [("late.txt".to_owned(), "disconnected".to_owned())]
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    script.say("go");
    script.expect("replayed");
    assert_eq!(
        handles(&d),
        [("late.txt".to_owned(), "connected".to_owned())],
        "the replay holds the handle\n{}",
        script.log
    );
    assert_eq!(std::fs::read(&path).expect("read"), b"b's data");
    script.say("go");
    script.finish();
}

/// rksmbd and a real SMB 3 client (`tests/smb3/late_claim.py`), rksmbd's
/// calls giving up after 1 s and a replay held 3 s before it claims its
/// create GUID: a persistent CREATE succeeds, its connection drops, and
/// its replay on a new connection is held; filterd is stopped meanwhile,
/// so the claim's second ask of filterd gives up and the handle is left
/// disconnected. Before the fix that replay was answered
/// STATUS_FILE_NOT_AVAILABLE, the status of a call that gave up for a
/// CREATE whose client does not replay it; now STATUS_SERVER_UNAVAILABLE,
/// as any DH2Q CREATE whose call gave up, and the client's next replay
/// takes the original open.
#[test]
fn rksmbd_answers_a_replay_whose_claim_gave_up_server_unavailable() {
    let (_s, d, srv, log) =
        setup_rksmbd_hooked("late-rksmbd-claim", "RKSMBD_TEST_REPLAY_CLAIM_DELAY_MS");
    let mut script = Dialogue::start(&srv, "late_claim.py", Duration::from_secs(60));
    script.expect("replaying");
    wait_logged(&log, "a replay is held before its claim");
    d.stop();
    script.expect("gave up");
    go_on_until(
        &d,
        "the handle to be left disconnected",
        &[("claim.txt", "disconnected")],
    );
    script.say("go");
    script.finish();
}

/// Runs a script that makes a persistent CREATE while filterd is stopped
/// ("ready", "gave up": STATUS_SERVER_UNAVAILABLE) and logs off once
/// filterd's late answer came, up to its "logged off".
fn until_logged_off(script: &mut Dialogue, d: &Filterd) {
    script.expect("ready");
    d.stop();
    script.say("go");
    script.expect("gave up");
    go_on_until(d, "the late CREATE to be answered", &[]);
    script.say("go");
    script.expect("logged off");
}

/// As [`setup_rksmbd`] with a 1 s call timeout, rksmbd's test hook
/// `hook` (a delay) set to 3 s and its log kept in the file returned.
fn setup_rksmbd_hooked(name: &str, hook: &str) -> (Scratch, Filterd, RkSmbd, std::path::PathBuf) {
    setup_rksmbd_hooked_for(name, hook, "3000", "1000")
}

/// As [`setup_rksmbd_hooked`], the delay `ms` milliseconds and the call
/// timeout `timeout_ms`.
fn setup_rksmbd_hooked_for(
    name: &str,
    hook: &str,
    ms: &str,
    timeout_ms: &str,
) -> (Scratch, Filterd, RkSmbd, std::path::PathBuf) {
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &[], &[]);
    let env = [("RKFILTER_CALL_TIMEOUT_MS", timeout_ms), (hook, ms)];
    let (srv, log) = RkSmbd::start_logged(&s, "rksmbd", "data", &[("alice", "pw")], &env);
    (s, d, srv, log)
}

/// rksmbd (`tests/smb3/late_closer_fresh.py`), its calls giving up
/// after 1 s and its unanswered-closer held 3 s after claiming a create
/// GUID: a session's persistent CREATE of G is answered
/// STATUS_SERVER_UNAVAILABLE, its late answer leaves nothing, and the
/// session logs off; while the closer holds G another session's fresh
/// CREATE (no replay flag) of G must succeed. Before the fix it met the
/// closer's claim, was STATUS_FILE_NOT_AVAILABLE at once, and its handle
/// was dropped attached with no open behind it (re-review unavail4 2).
#[test]
fn rksmbd_waits_for_the_closer_s_claim_before_a_fresh_create() {
    let (_s, d, srv, log) = setup_rksmbd_hooked(
        "late-rksmbd-closer-fresh",
        "RKSMBD_TEST_CLOSER_CLAIM_DELAY_MS",
    );
    let mut script = Dialogue::start(&srv, "late_closer_fresh.py", Duration::from_secs(60));
    until_logged_off(&mut script, &d);
    wait_logged(&log, "the closer holds a create GUID");
    script.say("go");
    script.finish();
}

/// rksmbd (`tests/smb3/late_closer_replay.py`), its calls giving up
/// after 4 s (a closer may hold a GUID for two calls: 9 s) and its
/// unanswered-closer held 7 s after claiming a create GUID — past a
/// replay's usual 5 s wait for a connection letting go: a
/// session's persistent CREATE of G is answered STATUS_SERVER_UNAVAILABLE,
/// its late open left detached, and the session logs off; while the
/// closer holds G another session replays the CREATE. filterd hands the
/// replay the late open; it must wait for the closer (whose resume finds
/// the open attached and leaves it) and answer as the original. Before
/// the fix it gave up after 5 s, STATUS_FILE_NOT_AVAILABLE, and dropped
/// the handle attached with no open behind it (re-review rr-unavail4 1).
#[test]
fn rksmbd_a_replay_waits_for_the_closer_s_claim_as_long_as_it_holds_it() {
    let (_s, d, srv, log) = setup_rksmbd_hooked_for(
        "late-rksmbd-closer-replay",
        "RKSMBD_TEST_CLOSER_CLAIM_DELAY_MS",
        "7000",
        "4000",
    );
    let mut script = Dialogue::start(&srv, "late_closer_replay.py", Duration::from_secs(60));
    late_create_detached(&d, &mut script, "y.txt");
    script.expect("logged off");
    wait_logged(&log, "the closer holds a create GUID");
    script.say("go");
    script.finish();
    wait_for("nothing left", Duration::from_secs(10), || {
        handles(&d).is_empty().then_some(())
    });
}

/// rksmbd and a client that does not replay (`tests/smb3/late_logoff.py`),
/// rksmbd's calls giving up after 1 s: a persistent exclusive CREATE sent
/// while filterd is stopped is answered STATUS_SERVER_UNAVAILABLE, and
/// its late open left detached for a replay that never comes; the client
/// logs off. Before the fix the open was in no session's table, and
/// stayed disconnected for its durable timeout after the LOGOFF, refusing
/// every other client; now the LOGOFF closes it, and another client's
/// exclusive CREATE succeeds at once.
#[test]
fn rksmbd_logoff_closes_a_late_persistent_open_never_replayed() {
    let (_s, d, srv) = setup_rksmbd("late-rksmbd-logoff", "1000");
    let mut script = Dialogue::start(&srv, "late_logoff.py", Duration::from_secs(60));
    late_create_detached(&d, &mut script, "logoff.txt");
    script.expect("logged off");
    // Closed after the LOGOFF's answer, by the closer thread.
    wait_for(
        "the late open to be closed",
        Duration::from_secs(10),
        || handles(&d).is_empty().then_some(()),
    );
    script.say("go");
    script.finish();
}

/// rksmbd and a client that logs off a session with five persistent
/// CREATEs answered STATUS_SERVER_UNAVAILABLE while filterd is still
/// stopped (`tests/smb3/late_logoff_stalled.py`), rksmbd's calls giving up
/// after 1 s: the LOGOFF must be answered within 2.5 s, and the late
/// opens closed once filterd goes on. Before the fix the LOGOFF closed
/// them on its connection before replying, a call timeout each (5 s;
/// minutes at the 120 s default), holding the connection's other
/// requests (re-review unavail3 2).
#[test]
fn rksmbd_logoff_answers_before_closing_its_unanswered_creates() {
    let (_s, d, srv) = setup_rksmbd("late-rksmbd-logoff-stalled", "1000");
    let mut script = Dialogue::start(&srv, "late_logoff_stalled.py", Duration::from_secs(90));
    script.expect("ready");
    d.stop();
    script.say("go");
    script.expect("logged off");
    go_on_until(&d, "the late opens to be closed", &[]);
    script.say("go");
    script.finish();
}

/// As `rksmbd_logoff_closes_a_late_persistent_open_never_replayed`,
/// filterd killed before the LOGOFF: the unanswered-closer's take of the
/// late open by create GUID fails (the connection lost), and filterd,
/// restarted, recovers the persistent open disconnected. Before the fix
/// the closer forgot the GUID after that one failure and the open held
/// logoff.txt for its durable timeout (B's exclusive CREATE refused); now
/// the closer tries it again once rksmbd has reattached.
#[test]
fn rksmbd_logoff_s_close_that_failed_while_filterd_was_down_is_made_after_reattach() {
    let s = Scratch::new("late-rksmbd-logoff-filterd-down");
    let mut d = Filterd::start(&s, &[], &[]);
    let env = [("RKFILTER_CALL_TIMEOUT_MS", "1000")];
    let (srv, log) = RkSmbd::start_logged(&s, "rksmbd", "data", &[("alice", "pw")], &env);
    let mut script = Dialogue::start(&srv, "late_logoff.py", Duration::from_secs(90));
    late_create_left_detached(&d, &mut script, "logoff.txt");
    d.kill9();
    script.say("go");
    script.expect("logged off");
    // The closer tried, and failed: filterd is gone.
    wait_logged(&log, "taking an unanswered CREATE's open to close it");
    let d = Filterd::start(&s, &[], &[]);
    closed_soon_after_restart(&d);
    script.say("go");
    script.finish();
}

/// As above, filterd stopped until after the LOGOFF (whose own take of the
/// open goes unanswered): the late open is answered after the session
/// ended. Before the fix rksmbd's DH2Q opens were sent with a
/// `SessionEnd` nothing ended, and the late answer was left detached
/// after the LOGOFF; now the LOGOFF ends the session's, and the late open
/// is closed.
#[test]
fn rksmbd_closes_a_late_persistent_open_answered_after_logoff() {
    let (_s, d, srv) = setup_rksmbd("late-rksmbd-after-logoff", "1000");
    let mut script = Dialogue::start(&srv, "late_logoff.py", Duration::from_secs(60));
    script.expect("ready");
    d.stop();
    script.say("go");
    script.expect("gave up");
    script.say("go");
    script.expect("logged off");
    go_on_until(&d, "the late open to be closed", &[]);
    script.say("go");
    script.finish();
}

/// rksmbd and a client that retries a persistent CREATE answered
/// STATUS_SERVER_UNAVAILABLE with the same create GUID but without the
/// replay flag (`tests/smb3/late_fresh_retry.py`), rksmbd's calls giving
/// up after 1 s: the late answer leaves nothing (FILE_CREATE of an
/// existing file), so the retry is made fresh and answered SUCCESS. The
/// LOGOFF must detach that open for a DH2C, as every acknowledged durable
/// open. Before the fix only a replay made the session forget the GUID,
/// and the LOGOFF closed the detached open by GUID: the DH2C failed
/// (re-review unavail3 1).
#[test]
fn rksmbd_logoff_keeps_an_open_a_fresh_retry_of_an_unanswered_guid_got() {
    let (_s, d, srv) = setup_rksmbd("late-rksmbd-fresh-retry", "1000");
    let mut script = Dialogue::start(&srv, "late_fresh_retry.py", Duration::from_secs(60));
    until_logged_off(&mut script, &d);
    assert_eq!(
        handles(&d),
        [("x.txt".to_owned(), "disconnected".to_owned())]
    );
    script.say("go");
    script.finish();
}

/// rksmbd and an application that fails over to another client
/// (`tests/smb3/late_app_instance.py`), rksmbd's calls giving up after
/// 1 s: a persistent CREATE under an AppInstanceId sent while filterd is
/// stopped is answered STATUS_SERVER_UNAVAILABLE and its late open left
/// detached; the instance's CREATE from another client must succeed at
/// once, as MS-SMB2 3.3.5.9.13 closes the instance's earlier open. Before
/// the fix the late open was no open the takeover knew of, and refused
/// the new one for its durable timeout.
#[test]
fn rksmbd_app_instance_takeover_closes_a_late_open_never_replayed() {
    let (_s, d, srv) = setup_rksmbd("late-rksmbd-app", "1000");
    let mut script = Dialogue::start(&srv, "late_app_instance.py", Duration::from_secs(60));
    late_create_detached(&d, &mut script, "app.txt");
    script.finish();
}

/// Lets `script` send a CREATE of `file` while filterd is stopped; once it
/// says "gave up" (answered STATUS_SERVER_UNAVAILABLE), lets filterd go
/// on, waits for the late open to be left detached, and lets the script
/// go on.
fn late_create_detached(d: &Filterd, script: &mut Dialogue, file: &str) {
    late_create_left_detached(d, script, file);
    script.say("go");
}

/// As [`late_create_detached`], up to the late open left detached: the
/// script waits.
fn late_create_left_detached(d: &Filterd, script: &mut Dialogue, file: &str) {
    script.expect("ready");
    d.stop();
    script.say("go");
    script.expect("gave up");
    go_on_until(
        d,
        "the late open to be left detached",
        &[(file, "disconnected")],
    );
}

/// Lets the stopped filterd go on and waits (`what`) until its handles
/// are `want`: (path, connection state) each.
fn go_on_until(d: &Filterd, what: &str, want: &[(&str, &str)]) {
    d.signal(Signal::SIGCONT);
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(p, s)| ((*p).to_owned(), (*s).to_owned()))
        .collect();
    wait_for(what, Duration::from_secs(10), || {
        (handles(d) == want).then_some(())
    });
}

/// Lets `script` send a CREATE while filterd is stopped; once it says
/// `gave_up` (the CREATE failed), lets filterd go on and waits for the
/// late open to be closed.
fn late_create_closed(d: &Filterd, script: &mut Dialogue, gave_up: &str) {
    script.expect("ready");
    d.stop();
    script.say("go");
    script.expect(gave_up);
    d.signal(Signal::SIGCONT);
    wait_for(
        "the late open to be closed",
        Duration::from_secs(10),
        || handles(d).is_empty().then_some(()),
    );
    script.say("go");
}

/// `tests/smb3/lock_failover.py` against `srv`, with `f` opened plain
/// (sharing everything).
fn smb3_client_of_f(srv: &RkSmbd) -> Dialogue {
    let mut script = Dialogue::start(srv, "lock_failover.py", Duration::from_secs(60));
    script.say("open f plain");
    script.expect("opened");
    script
}

/// Sends `cmd` (`lock ...`) to `script`: the status its answer carries.
fn lock_status(script: &mut Dialogue, cmd: &str) -> String {
    script.say(cmd);
    let line = script.expect("lock ");
    line.rsplit(' ').next().unwrap_or_default().to_owned()
}

/// rksmbd: a LOCK (no lock sequence) of a real SMB 3 client sent while
/// filterd is stopped is STATUS_FILE_NOT_AVAILABLE; once filterd goes on
/// its late grant is undone, and another client's lock of the range is
/// granted.
#[test]
fn rksmbd_unlocks_a_lock_answered_after_its_call_gave_up() {
    let (s, d, srv) = setup_rksmbd("late-rksmbd-lock", CALL_TIMEOUT_MS);
    std::fs::write(s.root().join("f"), vec![b'.'; 100]).expect("f");
    let mut a = smb3_client_of_f(&srv);
    let mut b = smb3_client_of_f(&srv);
    let lock = "lock 0 10 excl 0 0";

    d.stop();
    let st = lock_status(&mut a, lock);
    d.signal(Signal::SIGCONT);
    assert_eq!(st, "0xc0000467", "gave up:\n{}", a.log);

    // FAIL_IMMEDIATELY: refused while the lock a was told failed still
    // stands, granted once it is undone.
    wait_for(
        "the late lock to be undone",
        Duration::from_secs(10),
        || (lock_status(&mut b, lock) == "0x0").then_some(()),
    );
    for c in [&mut a, &mut b] {
        c.say("done");
        c.finish();
    }
}

/// rksmbd, its calls giving up after 1 s, filterd started with `env`, and
/// `script`; filterd SIGSTOPped once the script printed "ready".
fn stopped_when_ready(
    name: &str,
    env: &[(&str, &str)],
    script: &str,
) -> (Scratch, Filterd, RkSmbd, Dialogue) {
    let (s, d, srv) = setup_rksmbd_failing(name, "1000", env);
    let mut script = Dialogue::start(&srv, script, Duration::from_secs(90));
    script.expect("ready");
    d.stop();
    (s, d, srv, script)
}

/// rksmbd and a real SMB 3 client (`tests/smb3/close_then_reconnect.py`):
/// a persistent handle's CLOSE is sent while filterd is stopped and the
/// client drops its connection without the answer, then reconnects the
/// handle (DH2C, same create GUID) — which MS-SMB2 allows a client that
/// never got the CLOSE's answer. rksmbd's call gives up (1 s), the open is
/// forgotten and its handle goes to the close-settler. The CLOSE was sent
/// first, so it wins: the DH2C fails, the handle is closed (never left
/// held against another client's open), and no reconnect gets a handle
/// the settler then closes. filterd goes on while the DH2C is in flight
/// (`cont_early`) or after rksmbd gave up on it too.
fn rksmbd_close_then_reconnect(name: &str, cont_early: bool, env: &[(&str, &str)]) {
    let (_s, d, _srv, mut script) = stopped_when_ready(name, env, "close_then_reconnect.py");
    script.say("go");
    script.expect("reconnecting");
    if cont_early {
        d.signal(Signal::SIGCONT);
    }
    let refused = script.expect("reconnect refused");
    if !cont_early {
        d.signal(Signal::SIGCONT);
    }
    eprintln!("{refused}");
    wait_for(
        "the handle whose CLOSE was unanswered to be closed",
        Duration::from_secs(10),
        || handles(&d).is_empty().then_some(()),
    );
    script.say("go");
    script.finish();
    assert!(handles(&d).is_empty(), "nothing left\n{}", script.log);
}

#[test]
fn rksmbd_refuses_a_reconnect_racing_its_unanswered_close() {
    rksmbd_close_then_reconnect("close-reconnect-early", true, &[]);
}

#[test]
fn rksmbd_refuses_a_reconnect_after_its_unanswered_close() {
    rksmbd_close_then_reconnect("close-reconnect-late", false, &[]);
}

/// As above, and the CLOSE's commit fails once filterd goes on
/// (`commit.before:2:fail`; the first commit records the persistent open):
/// filterd undoes the close and the handle is back, attached to rksmbd,
/// while the settler's own closes and the DH2C were queued behind it.
#[test]
fn rksmbd_closes_a_handle_whose_unanswered_close_is_undone() {
    let fp = [("RKFILTER_FAILPOINTS", "commit.before:2:fail")];
    rksmbd_close_then_reconnect("close-reconnect-undone", false, &fp);
}

/// A persistent fresh open answered late on a connection that died first
/// (smbshim killed while filterd is stopped, after it gave up): nobody
/// reads the answer, so nothing in libfilter undoes it. filterd's own
/// disconnect handling does what matters: the handle is not left attached
/// to the dead connection but waits disconnected, as any persistent handle
/// of a lost connection does, until its timeout (60 s here) or its
/// client's replay through a replacement frontend. Accepted (docs).
#[test]
fn a_late_persistent_open_of_a_frontend_that_died_waits_disconnected() {
    let (_s, d, smb) = setup("late-open-dead");
    let client_guid = uuid::Uuid::new_v4().to_string();
    let session = |addr: &str| {
        let mut c = LineClient::connect(addr);
        let r = c.call(json!({"cmd": "SESSION_SETUP", "client_guid": client_guid, "user": "m"}));
        assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
        let sid = r["session_id"].as_u64().expect("session_id");
        (c, sid)
    };
    let (mut a, sid) = session(&smb.addr);
    let guid = uuid::Uuid::new_v4().to_string();
    let create = json!({"cmd": "CREATE", "session_id": sid, "path": "f",
        "access": ["read", "write"], "share": [], "disposition": "open_if",
        "durable": {"create_guid": guid, "persistent": true, "timeout_ms": 60000}});
    d.stop();
    let r = a.call(create.clone());
    assert_eq!(r["status"], "STATUS_FILE_NOT_AVAILABLE", "gave up: {r}");
    smb.kill9();
    d.signal(Signal::SIGCONT);
    wait_detached(&d);
    // The client replays its create through a replacement and gets it.
    let smb = Shim::start("smbshim", d.socket(), "late-open-dead");
    let (mut a, sid) = session(&smb.addr);
    let mut replay = create;
    replay["session_id"] = json!(sid);
    replay["replay"] = json!(true);
    let r = a.call(replay);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(handles(&d), [("f".to_owned(), "connected".to_owned())]);
}

/// rksmbd and a real SMB 3 client (`tests/smb3/detach_then_reconnect.py`):
/// a persistent handle's client drops its connection while filterd is
/// stopped, so rksmbd's Detach of it gives up (1 s); filterd goes on and
/// the client reconnects the handle (DH2C). With `fp`, filterd's commit
/// of the detach fails too. A reviewer feared the handle is then left
/// attached to rksmbd with no connection holding it, every DH2C refused.
/// It is not: giving up does not withdraw the Detach, filterd makes it
/// when it goes on, and a failed commit's undo keeps the handle
/// disconnected in memory. These guard that (they passed before any
/// change; with rksmbd not sending the detach they fail at the DH2C,
/// STATUS_OBJECT_NAME_NOT_FOUND).
///
/// With `fp` the DH2C is sent once the failed commit was rolled back
/// (`commits_failed` in `filterctl stats`): a DH2C whose resume reaches
/// filterd while the detach's commit is still in flight builds on the
/// detach, and fails with it (STATUS_INTERNAL_ERROR; nothing built on
/// state that never became durable is acknowledged). That happened once
/// in CI under load; the client's next DH2C gets the handle.
fn rksmbd_reconnect_after_unanswered_detach(name: &str, fp: &[(&str, &str)]) {
    let (_s, d, _srv, mut script) = stopped_when_ready(name, fp, "detach_then_reconnect.py");
    script.say("probe");
    script.expect("dropped");
    d.signal(Signal::SIGCONT);
    if !fp.is_empty() {
        let ctl = d.control();
        wait_for(
            "the detach's commit to fail",
            Duration::from_secs(10),
            || (ctl.stats().ok()?.commits_failed >= 1).then_some(()),
        );
    }
    script.say("go");
    script.finish();
    wait_for("nothing left", Duration::from_secs(10), || {
        handles(&d).is_empty().then_some(())
    });
}

#[test]
fn rksmbd_reconnects_a_handle_whose_detach_was_unanswered() {
    rksmbd_reconnect_after_unanswered_detach("detach-unanswered", &[]);
}

#[test]
fn rksmbd_reconnects_a_handle_whose_unanswered_detach_failed() {
    let fp = [("RKFILTER_FAILPOINTS", "commit.before:2:fail")];
    rksmbd_reconnect_after_unanswered_detach("detach-unanswered-failed", &fp);
}

/// smbshim and a persistent open of `f` whose first record lookup (a
/// replay's) stalls filterd past smbshim's call timeout: `before` (WRITEs
/// and SET_INFOs with op ids, each acknowledged) runs, then `replay` is
/// re-sent with `"replay": true`. Its lookup gets no answer in time, and
/// it must not run again: it did (the failed lookup fell through to the
/// change), putting back old bytes or truncating again over data
/// acknowledged since. Now it is answered the retry status, and once
/// filterd answers again its re-send gets the recorded reply; `f` holds
/// `want` throughout — also after a later size change of the handle, run
/// after any change the replay sent to the stalled filterd.
fn a_replay_whose_lookup_goes_unanswered_runs_nothing(
    name: &str,
    before: &[Value],
    replay: Value,
    want: &[u8],
) {
    let (s, d, smb) = setup_failing(
        name,
        "smbshim",
        &[("RKFILTER_FAILPOINTS", "request.lookup_reply:1:sleep3000")],
    );
    let (mut c, sid) = smb_session(&smb.addr);
    let r = rkfilter_tests::smb_persistent_create(&mut c, sid, "f");
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let with_ids = |v: &Value| {
        let mut v = v.clone();
        v["session_id"] = json!(sid);
        v["file_id"] = fid.clone();
        v
    };
    for req in before {
        let r = c.call(with_ids(req));
        assert_eq!(r["status"], "STATUS_SUCCESS", "{req}: {r}");
    }
    assert_eq!(std::fs::read(s.root().join("f")).expect("f"), want);
    let mut again = with_ids(&replay);
    again["replay"] = json!(true);
    let r = c.call(again.clone());
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "the lookup went unanswered: retry, nothing run: {r}"
    );
    d.wait_stalled_at("request.lookup_reply", Duration::from_secs(10));
    assert_eq!(
        std::fs::read(s.root().join("f")).expect("f"),
        want,
        "the replay ran again"
    );
    wait_for(
        "the replay's recorded reply",
        Duration::from_secs(20),
        || (c.call(again.clone())["status"] == "STATUS_SUCCESS").then_some(()),
    );
    // filterd runs a handle's size changes in the order they came: once
    // one sent now (to the size `f` has) is answered, a change sent by the
    // timed-out replay has run, or never will.
    // Its call may itself give up under load (smbshim's call timeout is
    // 700 ms here): re-sent as a replay until answered.
    let size = u64::try_from(want.len()).expect("a small file");
    let mut set = json!({"cmd": "SET_INFO", "session_id": sid, "file_id": fid,
        "end_of_file": size, "op_id": 99});
    wait_for("the size change", Duration::from_secs(20), || {
        let r = c.call(set.clone());
        set["replay"] = json!(true);
        match r["status"].as_str() {
            Some("STATUS_SUCCESS") => Some(()),
            Some("STATUS_FILE_NOT_AVAILABLE") => None,
            _ => panic!("{r}"),
        }
    });
    assert_eq!(
        std::fs::read(s.root().join("f")).expect("f"),
        want,
        "the replay ran again, late"
    );
    drop(d);
}

#[test]
fn smbshim_runs_no_replayed_write_whose_lookup_went_unanswered() {
    let write =
        |op: u64, data: &str| json!({"cmd": "WRITE", "offset": 0, "data": data, "op_id": op});
    // "aaaa", then "bbbb" over it; the first again would put "aaaa" back.
    a_replay_whose_lookup_goes_unanswered_runs_nothing(
        "replay-write-unanswered",
        &[write(1, "YWFhYQ=="), write(2, "YmJiYg==")],
        write(1, "YWFhYQ=="),
        b"bbbb",
    );
}

#[test]
fn smbshim_runs_no_replayed_set_info_whose_lookup_went_unanswered() {
    let truncate = json!({"cmd": "SET_INFO", "end_of_file": 0, "op_id": 2});
    // "aaaa", cut to nothing, then "bbbb": the cut again would lose it.
    a_replay_whose_lookup_goes_unanswered_runs_nothing(
        "replay-truncate-unanswered",
        &[
            json!({"cmd": "WRITE", "offset": 0, "data": "YWFhYQ==", "op_id": 1}),
            truncate.clone(),
            json!({"cmd": "WRITE", "offset": 0, "data": "YmJiYg==", "op_id": 3}),
        ],
        truncate,
        b"bbbb",
    );
}

/// Client b's exclusive CREATE of `f` (sharing nothing) succeeds at once:
/// no handle is left in filterd to refuse it.
///
/// The LOGOFF closes after its reply (rr-logoff 4), and a close whose
/// resume outlasts smbshim's call timeout is made when its answer comes:
/// the handle is waited for. b's CREATE is retried while it is refused
/// STATUS_FILE_NOT_AVAILABLE, the retry status (its own filterd call may
/// give up under load, at 700 ms here).
fn nothing_left_of_f(d: &Filterd, smb: &Shim) {
    wait_for("no handle left", Duration::from_secs(20), || {
        handles(d).is_empty().then_some(())
    });
    let (mut b, bsid) = smb_session(&smb.addr);
    wait_for("b's exclusive CREATE", Duration::from_secs(20), || {
        let r = b.call(json!({"cmd": "CREATE", "session_id": bsid, "path": "f",
            "access": ["read", "write"], "share": [], "disposition": "open_if"}));
        match r["status"].as_str() {
            Some("STATUS_SUCCESS") => Some(()),
            Some("STATUS_FILE_NOT_AVAILABLE") => None,
            _ => panic!("{r}"),
        }
    });
}

/// A persistent CREATE answered late is detached for the client's replay
/// of its create GUID; the client logs off instead. LOGOFF closes every
/// open of the session, durable ones too (spec), but the detached handle
/// was in no session's table: before the fix it stayed disconnected for
/// its durable timeout (60 s here) after the LOGOFF — refusing b's
/// exclusive CREATE STATUS_FILE_NOT_AVAILABLE. Now the session remembers
/// the GUID of the CREATE that got no answer and its LOGOFF closes the
/// handle by it.
#[test]
fn a_late_persistent_create_detached_is_closed_by_logoff() {
    detached_then_logoff("late-durable-logoff", &[]);
}

/// A persistent CREATE answered late (its handle detached), then its
/// session's LOGOFF; filterd started with `env`: nothing is left.
fn detached_then_logoff(name: &str, env: &[(&str, &str)]) {
    let (_s, d, smb) = setup_failing(name, "smbshim", env);
    let (mut a, sid) = smb_session(&smb.addr);
    late_persistent_create(&d, &mut a, sid, "create");
    let r = a.call(json!({"cmd": "LOGOFF", "session_id": sid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    nothing_left_of_f(&d, &smb);
    // Each stall armed (`env`) happened.
    for (_, fps) in env.iter().filter(|(k, _)| *k == "RKFILTER_FAILPOINTS") {
        for armed in fps.split(',') {
            d.wait_stalled_at(armed, Duration::from_secs(10));
        }
    }
}

/// As `a_late_persistent_create_detached_is_closed_by_logoff`, filterd
/// killed before the LOGOFF: the closer's take of the late open by create
/// GUID fails (the connection lost), and filterd, restarted, recovers the
/// persistent open disconnected. Before the fix the closer forgot the
/// GUID after that one failure and the open held f for its durable
/// timeout (60 s here, refusing b's exclusive CREATE); now the closer
/// tries it again once smbshim has reattached, and it goes within
/// seconds.
#[test]
fn a_logoff_s_close_that_failed_while_filterd_was_down_is_made_after_reattach() {
    let name = "late-logoff-filterd-down";
    let s = Scratch::new(name);
    let mut d = Filterd::start(&s, &[], &[]);
    let log = s.dir.join("smbshim.log");
    let env = [("RKFILTER_CALL_TIMEOUT_MS", CALL_TIMEOUT_MS)];
    let smb = Shim::start_logged("smbshim", d.socket(), name, &env, &log);
    let (mut a, sid) = smb_session(&smb.addr);
    late_persistent_create(&d, &mut a, sid, "create");
    d.kill9();
    let r = a.call(json!({"cmd": "LOGOFF", "session_id": sid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    // The closer tried, and failed: filterd is gone.
    wait_logged(&log, "closing the open of unanswered CREATE");
    let d = Filterd::start(&s, &[], &[]);
    closed_soon_after_restart(&d);
    nothing_left_of_f(&d, &smb);
}

/// Waits for filterd, restarted (its handles recovered disconnected, each
/// with a fresh durable timeout of 60 s here), to hold no handle: far
/// sooner than that timeout.
fn closed_soon_after_restart(d: &Filterd) {
    let restarted = std::time::Instant::now();
    wait_for(
        "the late open to be closed after the frontend reattached",
        Duration::from_secs(20),
        || handles(d).is_empty().then_some(()),
    );
    eprintln!(
        "the late open was closed {:?} after filterd restarted",
        restarted.elapsed()
    );
}

/// As above, but the client replays first, and the replay is answered the
/// retry status after it found the open: its look at the handle goes
/// unanswered (filterd stalled past smbshim's 700 ms), so smbshim detaches
/// the open again for the next replay. Then the client logs off. Before
/// the fix (review rr-logoff2 1) the replay's answer took the GUID from
/// its session, and no LOGOFF closed the late open: it stayed for its
/// durable timeout, refusing b's exclusive CREATE.
#[test]
fn a_late_create_whose_replay_was_told_to_retry_is_closed_by_logoff() {
    let (_s, d, smb) = setup_failing(
        "late-replay-retry-logoff",
        "smbshim",
        &[("RKFILTER_FAILPOINTS", "request.handle:1:sleep1500")],
    );
    let (mut a, sid) = smb_session(&smb.addr);
    let replay = late_persistent_create(&d, &mut a, sid, "create");
    let r = a.call(replay);
    assert_eq!(r["status"], "STATUS_FILE_NOT_AVAILABLE", "retry: {r}");
    d.wait_stalled_at("request.handle", Duration::from_secs(10));
    wait_detached(&d);
    let r = a.call(json!({"cmd": "LOGOFF", "session_id": sid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    nothing_left_of_f(&d, &smb);
}

/// As above, the other order: the client logs off while filterd is still
/// stopped, before the CREATE's late answer comes (the LOGOFF's own look
/// for the handle by create GUID goes unanswered too). Before the fix the
/// late answer detached the open after the session had ended, and it
/// stayed disconnected for its durable timeout; now the session's end is
/// marked first, and a late answer for an ended session is closed.
#[test]
fn a_late_persistent_create_answered_after_logoff_is_closed() {
    let (_s, d, smb) = setup("late-durable-after-logoff");
    let (mut a, sid) = smb_session(&smb.addr);
    let guid = uuid::Uuid::new_v4().to_string();
    d.stop();
    let r = a.call(json!({"cmd": "CREATE", "session_id": sid, "path": "f",
        "access": ["read", "write"], "share": ["read", "write", "delete"],
        "disposition": "create",
        "durable": {"create_guid": guid, "persistent": true, "timeout_ms": 60000}}));
    assert_eq!(r["status"], "STATUS_FILE_NOT_AVAILABLE", "gave up: {r}");
    let r = a.call(json!({"cmd": "LOGOFF", "session_id": sid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    d.signal(Signal::SIGCONT);
    // filterd makes the open late, then it goes.
    let sock = d.socket().display().to_string();
    wait_for(
        "the late open to be made and closed",
        Duration::from_secs(10),
        || {
            let st = filterctl(&["--socket", &sock, "stats", "--json"]).json();
            (st["opens"].as_u64() >= Some(1) && handles(&d).is_empty()).then_some(())
        },
    );
    nothing_left_of_f(&d, &smb);
}

/// Two sessions of one client (one client GUID and user), each on its
/// own connection; and the client GUID.
fn two_sessions(addr: &str) -> ((LineClient, u64), (LineClient, u64), String) {
    let guid = uuid::Uuid::new_v4().to_string();
    let one = || {
        let mut m = LineClient::connect(addr);
        let r = m.call(json!({"cmd": "SESSION_SETUP", "client_guid": guid, "user": "m"}));
        assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
        let sid = r["session_id"].as_u64().expect("session_id");
        (m, sid)
    };
    let a = one();
    let b = one();
    (a, b, guid)
}

/// Waits until the LOGOFFs of client `client_guid` so far have closed
/// what they close: smbshim closes a LOGOFF's unanswered CREATEs after
/// its reply, in order, one client's on one thread; so once a later
/// LOGOFF's own unanswered open (of file "barrier") is gone, the earlier
/// ones are done.
fn logoffs_done(d: &Filterd, addr: &str, client_guid: &str) {
    let mut c = LineClient::connect(addr);
    let r = c.call(json!({"cmd": "SESSION_SETUP", "client_guid": client_guid, "user": "m"}));
    let sid = r["session_id"].as_u64().expect("session_id");
    answered_late(
        d,
        &mut c,
        json!({"cmd": "CREATE", "session_id": sid, "path": "barrier",
            "access": ["read"], "share": ["read", "write", "delete"], "disposition": "open_if",
            "durable": {"create_guid": uuid::Uuid::new_v4().to_string(),
                        "persistent": true, "timeout_ms": 60000}}),
    );
    let barrier = |state: &str| handles(d).iter().any(|(p, s)| p == "barrier" && s == state);
    wait_for("the barrier's late open", Duration::from_secs(10), || {
        barrier("disconnected").then_some(())
    });
    let r = c.call(json!({"cmd": "LOGOFF", "session_id": sid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    wait_for(
        "the barrier's LOGOFF to close it",
        Duration::from_secs(20),
        || handles(d).iter().all(|(p, _)| p != "barrier").then_some(()),
    );
}

/// Another client, b, opens `f`, writes "b's data" over it and closes it.
fn b_writes_f(addr: &str) {
    let (mut b, bsid) = smb_session(addr);
    let r = b.call(json!({"cmd": "CREATE", "session_id": bsid, "path": "f",
        "access": ["read", "write"], "share": ["read", "write", "delete"], "disposition": "open"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "b's data");
    let r = b.call(
        json!({"cmd": "WRITE", "session_id": bsid, "file_id": fid, "offset": 0, "data": data}),
    );
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = b.call(json!({"cmd": "CLOSE", "session_id": bsid, "file_id": fid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
}

/// Review rr-logoff 1. Session S1's CREATE G (persistent, overwrite_if)
/// is answered late; the client replays G on its session S2, answered
/// late too (kept detached for S2's next replay). Client b writes f. S1
/// logs off. Before the fix S1's LOGOFF closed G's open, which S2 was to
/// replay: S2's replay ran the CREATE again and truncated b's write. Now
/// G is S2's once S2 replays it, and S1's LOGOFF leaves it.
#[test]
fn a_logoff_keeps_an_open_another_session_replays() {
    let (s, d, smb) = setup("logoff-cross-session");
    std::fs::write(s.root().join("f"), "old contents").expect("write");
    let ((mut a1, sid1), (mut a2, sid2), client) = two_sessions(&smb.addr);
    let mut replay = late_persistent_create(&d, &mut a1, sid1, "overwrite_if");
    replay["session_id"] = json!(sid2);
    answered_late(&d, &mut a2, replay.clone());
    wait_detached(&d);
    b_writes_f(&smb.addr);
    let r = a1.call(json!({"cmd": "LOGOFF", "session_id": sid1}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    logoffs_done(&d, &smb.addr, &client);
    let r = a2.call(replay);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(
        std::fs::read_to_string(s.root().join("f")).expect("read"),
        "b's data",
        "the replay ran the CREATE again: {r}"
    );
    assert_eq!(r["create_action"], "overwritten", "the original's: {r}");
}

/// Review rr-logoff 2. S1's CREATE G and S1's replay of G are both
/// answered late (before the fix G was noted twice, and only one copy
/// left). The client replays G on S2: SUCCESS. S2's connection drops:
/// the persistent open waits detached for the client's RECONNECT. Before
/// the fix S1's LOGOFF closed it; now it is left for the RECONNECT.
#[test]
fn a_logoff_leaves_a_durable_open_another_session_got() {
    let (_s, d, smb) = setup("logoff-taken-by-another");
    let ((mut a1, sid1), (mut a2, sid2), client) = two_sessions(&smb.addr);
    let replay = late_persistent_create(&d, &mut a1, sid1, "create");
    answered_late(&d, &mut a1, replay.clone());
    wait_detached(&d);
    let mut r2 = replay;
    r2["session_id"] = json!(sid2);
    let r = a2.call(r2);
    assert_eq!(r["status"], "STATUS_SUCCESS", "S2's replay: {r}");
    drop(a2);
    wait_detached(&d);
    let r = a1.call(json!({"cmd": "LOGOFF", "session_id": sid1}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    logoffs_done(&d, &smb.addr, &client);
    assert_eq!(
        handles(&d),
        [("f".to_owned(), "disconnected".to_owned())],
        "S2's durable open is kept for its RECONNECT"
    );
}

/// Review rr-logoff 5: as `a_late_persistent_create_detached_is_closed_by_logoff`,
/// with filterd's resume slower than smbshim's call timeout (as under
/// load): the LOGOFF's resume goes unanswered, and its late answer is
/// closed when it comes.
#[test]
fn a_late_persistent_create_detached_is_closed_by_logoff_despite_a_slow_resume() {
    detached_then_logoff(
        "late-durable-logoff-slow",
        &[("RKFILTER_FAILPOINTS", "request.resume:sleep1000")],
    );
}

/// Review rr-logoff 4. Eight durable CREATEs go unanswered while filterd
/// is stopped; the session logs off with filterd still stopped. Before
/// the fix the LOGOFF's reply waited for a resume by GUID of each, one
/// call timeout apiece (8 × 700 ms here, minutes at the default), and the
/// connection's other requests waited behind it. Now it answers first.
#[test]
fn a_logoff_answers_before_closing_its_unanswered_creates() {
    let (_s, d, smb) = setup("logoff-answers-first");
    let (mut a, sid) = smb_session(&smb.addr);
    d.stop();
    // Eight: closed inline, the LOGOFF would wait 8 × 700 ms for the
    // resumes; the bound below leaves half of that to a loaded machine.
    for i in 0..8 {
        let r = a.call(
            json!({"cmd": "CREATE", "session_id": sid, "path": format!("f{i}"),
            "access": ["read", "write"], "share": ["read"], "disposition": "create",
            "durable": {"create_guid": uuid::Uuid::new_v4().to_string(),
                        "persistent": true, "timeout_ms": 60000}}),
        );
        assert_eq!(r["status"], "STATUS_FILE_NOT_AVAILABLE", "{r}");
    }
    let t = std::time::Instant::now();
    let r = a.call(json!({"cmd": "LOGOFF", "session_id": sid}));
    let took = t.elapsed();
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    d.signal(Signal::SIGCONT);
    assert!(
        took < Duration::from_millis(2800),
        "the LOGOFF waited for its closes: {took:?}"
    );
    // The late opens go: closed as answers for a logged-off session.
    wait_for("the late opens to go", Duration::from_secs(20), || {
        handles(&d).is_empty().then_some(())
    });
}

/// Every WRITE tells filterd (`Request::Wrote`) so that other keys' read
/// caching breaks. Before the fix the notice was a blocking send: with
/// filterd stopped, its socket filled after a few hundred notices, every
/// later WRITE waited the call timeout, and then the connection was given
/// up — filterd took the whole frontend as lost and detached its handles.
/// Now a notice that cannot go at once is kept and sent later: thousands
/// of WRITEs to files without locks finish promptly while filterd is
/// stopped, and afterwards every handle is still attached.
#[test]
fn writes_go_on_while_filterd_is_stopped_and_lose_no_handle() {
    let (_s, d, smb) = setup("stopped-writes");
    let (mut c, sid) = smb_session(&smb.addr);
    let fids: Vec<Value> = (0..4)
        .map(|i| {
            let r = c.call(
                json!({"cmd": "CREATE", "session_id": sid, "path": format!("w{i}"),
                "access": ["read", "write"], "share": ["read", "write"], "disposition": "create"}),
            );
            assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
            r["file_id"].clone()
        })
        .collect();
    let data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 4096]);
    d.stop();
    let t0 = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..3000u64 {
        let w0 = std::time::Instant::now();
        let fid = &fids[usize::try_from(i % 4).unwrap()];
        let r = c.call(json!({"cmd": "WRITE", "session_id": sid, "file_id": fid,
            "offset": (i / 4) * 4096, "data": data}));
        slowest = slowest.max(w0.elapsed());
        assert_eq!(r["status"], "STATUS_SUCCESS", "write {i}: {r}");
        assert!(
            slowest < Duration::from_millis(500),
            "write {i} waited for the stopped filterd: {slowest:?}"
        );
    }
    d.signal(Signal::SIGCONT);
    eprintln!(
        "3000 writes with filterd stopped: {:?}, the slowest {slowest:?}",
        t0.elapsed()
    );
    // No handle was detached: all four still attached, and usable.
    let h = handles(&d);
    assert_eq!(h.len(), 4, "{h:?}");
    assert!(h.iter().all(|(_, st)| st != "disconnected"), "{h:?}");
    for fid in &fids {
        let r = c.call(json!({"cmd": "CLOSE", "session_id": sid, "file_id": fid}));
        assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    }
}

/// The one handle filterd holds is durable.txt, disconnected.
fn durable_txt_disconnected(d: &Filterd) -> Option<()> {
    (handles(d) == [("durable.txt".to_owned(), "disconnected".to_owned())]).then_some(())
}

/// Starts reconnect_view_unanswered.py against `srv` and has it send its
/// first DH2C once filterd `d` holds the dropped handle disconnected:
/// the script and the DH2C's line.
fn first_dh2c(srv: &RkSmbd, d: &Filterd) -> (Dialogue, String) {
    let mut script = Dialogue::start(srv, "reconnect_view_unanswered.py", Duration::from_secs(90));
    script.expect("dropped");
    wait_for("the handle detached", Duration::from_secs(10), || {
        durable_txt_disconnected(d)
    });
    script.say("go");
    let first = script.expect("first DH2C");
    (script, first)
}

/// The script's second DH2C, once filterd `d` holds the handle
/// disconnected again: it must succeed and read the data back, after a
/// first DH2C (`first`) told to retry, not that the handle was gone.
fn second_dh2c(mut script: Dialogue, d: &Filterd, first: &str) {
    wait_for("the handle detached again", Duration::from_secs(30), || {
        durable_txt_disconnected(d)
    });
    assert_eq!(first, "first DH2C: 0xc0000467", "{}", script.log);
    script.say("go");
    let second = script.expect("second DH2C");
    assert_eq!(second, "second DH2C: STATUS_SUCCESS", "{}", script.log);
    script.finish();
}

/// Re-review rr45b F1: a DH2C whose resume succeeded but whose look at the
/// handle (`Request::Handle`) went unanswered — filterd slow past rksmbd's
/// call timeout here (`request.handle:1:sleep3000`), or killed (below) —
/// was answered STATUS_OBJECT_NAME_NOT_FOUND, final for the client,
/// though filterd still held the handle, detached, and the next DH2C
/// found it. Now it is detached again and answered
/// STATUS_FILE_NOT_AVAILABLE (try again), and the retry gets the handle
/// and its data (tests/smb3/reconnect_view_unanswered.py).
#[test]
fn a_dh2c_whose_look_goes_unanswered_is_told_to_retry_not_gone() {
    let (_s, d, srv) = setup_rksmbd_failing(
        "rksmbd-dh2c-view-unanswered",
        "1000",
        &[("RKFILTER_FAILPOINTS", "request.handle:1:sleep3000")],
    );
    let (script, first) = first_dh2c(&srv, &d);
    second_dh2c(script, &d, &first);
}

/// As [`a_dh2c_whose_look_goes_unanswered_is_told_to_retry_not_gone`],
/// filterd SIGKILLed at that look (`request.handle:1:kill`) and
/// restarted: the handle it recovers is reconnected by the retry (a
/// reconnect works across kill -9 of filterd at any point).
#[test]
fn a_dh2c_whose_look_meets_a_filterd_kill_is_told_to_retry_not_gone() {
    let s = Scratch::new("rksmbd-dh2c-view-killed");
    let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", "request.handle:1:kill")]);
    let env = [("RKFILTER_CALL_TIMEOUT_MS", "1000")];
    let srv = RkSmbd::start_with_env(&s, "rksmbd", "data", &[("alice", "pw")], &env);
    let (script, first) = first_dh2c(&srv, &d);
    d.wait_exit(Duration::from_secs(10));
    let d = Filterd::start(&s, &[], &[]);
    second_dh2c(script, &d, &first);
}

/// Re-review rr45b F2: a CREATE replayed on its open's connection reports
/// the lease filterd holds now. When rksmbd's look at the handle went
/// unanswered (`request.handle:1:sleep3000`, its calls giving up after
/// 1 s) the replay reported the lease granted at CREATE time, RWH, though
/// filterd's break timeout had lowered it to none and another client had
/// the file open for writing. Now it is told to come again
/// (STATUS_SERVER_UNAVAILABLE on SMB 3.0.2, which replays it), exactly
/// that: a replay answered by filterd (its look not the one stalled)
/// would pass no check here (re-review rr45f F3). Control run:
/// `RKSMBD_REPLAY_LEASE_FP=request.handle:100:sleep1` at build time
/// (never reached) shows the replay answered with lease 0
/// (tests/smb3/replay_lease_unanswered.py).
#[test]
fn a_replay_whose_look_goes_unanswered_reports_no_lease_from_memory() {
    let s = Scratch::new("rksmbd-replay-lease-unanswered");
    let control = option_env!("RKSMBD_REPLAY_LEASE_FP");
    let fp = control.unwrap_or("request.handle:1:sleep3000");
    let d = Filterd::start(
        &s,
        &["--break-timeout-ms", "1000"],
        &[("RKFILTER_FAILPOINTS", fp)],
    );
    let env = [("RKFILTER_CALL_TIMEOUT_MS", "1000")];
    let srv = RkSmbd::start_with_env(&s, "rksmbd", "data", &[("alice", "pw")], &env);
    let mut script = Dialogue::start(&srv, "replay_lease_unanswered.py", Duration::from_secs(90));
    script.expect("other client opened");
    script.expect("replay?");
    // The break timeout lowered A's lease to none.
    let sock = d.socket().display().to_string();
    wait_for("A's lease lowered", Duration::from_secs(10), || {
        let v = filterctl(&["--socket", &sock, "handles", "--json"]).json();
        v.to_string().contains(r#""state":"""#).then_some(())
    });
    script.say("go");
    let line = script.expect("replay");
    script.expect("done?");
    script.say("go");
    script.finish();
    assert!(
        !line.ends_with("lease 7"),
        "the replay reported RWH from memory: {line}"
    );
    match control {
        None => assert!(
            line.starts_with("replay 0xc0000466 "),
            "not told to come again (STATUS_SERVER_UNAVAILABLE): {line}"
        ),
        Some(_) => assert!(line.ends_with(" lease 0"), "not filterd's lease: {line}"),
    }
}
