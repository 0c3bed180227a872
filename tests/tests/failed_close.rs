//! A CLOSE whose commit fails (failpoint `commit.before:N:fail`) is
//! undone in filterd: the handle is back, attached to smbshim. smbshim must
//! keep the open too, so the client, told the CLOSE failed, can close it
//! again (or go on using it). Before the fix smbshim had forgotten the open
//! when it sent the close: a retried CLOSE got STATUS_FILE_CLOSED (a client
//! takes that as closed) while filterd still held the handle, its share
//! mode and its record, for as long as smbshim stayed attached.
//!
//! rksmbd (the real SMB 3 server) answered such a CLOSE with
//! STATUS_SUCCESS and forgot the open: the client believed the file closed
//! while filterd held its handle, share mode and persistent record (and
//! would restore it after a failover). Now it answers
//! STATUS_INSUFFICIENT_RESOURCES and keeps the open.

use std::time::Duration;

use base64::Engine as _;

use rkfilter_tests::smb3::Dialogue;
use rkfilter_tests::{
    handle_paths, handles_on, smb_persistent_create, smb_session, wait_for, Filterd, InFlight,
    LineClient, Nfs, RkSmbd, Scratch, Shim,
};
use serde::Serialize;
use serde_json::{json, Value};

/// Where [`persistent_open_failing_its_close`] logs smbshim's stderr.
fn smbshim_log(s: &Scratch) -> std::path::PathBuf {
    s.dir.join("smbshim.log")
}

/// A persistent open of `path` in session `sid`, which must succeed: its
/// file id.
fn persistent_open(c: &mut LineClient, sid: u64, path: &str) -> Value {
    let r = smb_persistent_create(c, sid, path);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    r["file_id"].clone()
}

/// A CREATE (`open_if`) of `f` for reading and writing, sharing read,
/// persistent under create GUID `guid`.
fn durable_create_of_f(sid: u64, guid: &str) -> Value {
    json!({"cmd": "CREATE", "session_id": sid, "path": "f",
        "access": ["read", "write"], "share": ["read"], "disposition": "open_if",
        "durable": {"create_guid": guid, "persistent": true, "timeout_ms": 60000}})
}

/// A persistent open of `f` in session `sid` by a CREATE carrying a create
/// GUID ([`durable_create_of_f`]), which must succeed: (the CREATE, its
/// file id).
fn durable_open_of_f(c: &mut LineClient, sid: u64) -> (Value, Value) {
    let guid = uuid::Uuid::new_v4().to_string();
    let create = durable_create_of_f(sid, &guid);
    let r = c.call(create.clone());
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    (create, r["file_id"].clone())
}

fn close_req(sid: &impl Serialize, fid: &impl Serialize) -> Value {
    json!({"cmd": "CLOSE", "session_id": sid, "file_id": fid})
}

fn logoff_req(sid: &impl Serialize) -> Value {
    json!({"cmd": "LOGOFF", "session_id": sid})
}

fn flush_req(sid: &impl Serialize, fid: &impl Serialize) -> Value {
    json!({"cmd": "FLUSH", "session_id": sid, "file_id": fid})
}

/// A SESSION_SETUP of user `m` for a client GUID of its own.
fn session_setup_of_a_new_client() -> Value {
    let client = uuid::Uuid::new_v4().to_string();
    json!({"cmd": "SESSION_SETUP", "client_guid": client, "user": "m"})
}

/// A connection to smbshim `smb` and the session `setup` made on it.
fn session(smb: &Shim, setup: &Value) -> (LineClient, u64) {
    let mut c = LineClient::connect(&smb.addr);
    let sid = c.call(setup.clone())["session_id"]
        .as_u64()
        .expect("session_id");
    (c, sid)
}

/// `req` sent to smbshim `smb` on a connection of its own, in flight.
fn in_flight(smb: &Shim, req: Value) -> InFlight {
    InFlight::send(LineClient::connect(&smb.addr), req)
}

/// The answer to `req` in flight, within `secs` seconds (none, or the
/// connection ended, fails the test).
fn answer(req: InFlight, what: &str, secs: u64) -> Value {
    req.outcome(what, Duration::from_secs(secs))
        .expect("an answer")
}

/// smbshim in front of a filterd whose second commit (the first close's:
/// commit 1 records the create) fails, and a persistent open of `f` in a
/// session: (scratch, filterd, smbshim, client, session id, file id).
fn persistent_open_failing_its_close(
    name: &str,
) -> (Scratch, Filterd, Shim, LineClient, u64, serde_json::Value) {
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", "commit.before:2:fail")]);
    // Its log: what smbshim waits for ([`wait_logged`]).
    let smb = Shim::start_logged("smbshim", d.socket(), name, &[], &smbshim_log(&s));
    let (mut c, sid) = smb_session(&smb.addr);
    let fid = persistent_open(&mut c, sid, "f");
    (s, d, smb, c, sid, fid)
}

/// smbshim: a persistent open of `f`; `teardown` (a CLOSE or a LOGOFF of
/// it, by session id and file id) fails as its close's commit fails, the
/// handle stays listed, the open writes, and `teardown` again closes it.
fn smbshim_keeps_the_open(
    name: &str,
    teardown: impl Fn(&serde_json::Value, &serde_json::Value) -> serde_json::Value,
) {
    let (s, d, _smb, mut c, sid, fid) = persistent_open_failing_its_close(name);
    let sid = json!(sid);

    let r = c.call(teardown(&sid, &fid));
    assert_ne!(
        r["status"], "STATUS_SUCCESS",
        "the close's commit failed: {r}"
    );
    assert_eq!(handle_paths(d.socket()), ["f"], "filterd undid the close");

    // The open is still the client's: it writes through it, and a second
    // try closes it for good.
    let r = c.call(
        json!({"cmd": "WRITE", "session_id": sid, "file_id": fid, "offset": 0,
                          "data": "ZGF0YQ==", "op_id": 1}),
    );
    assert_eq!(
        r["status"], "STATUS_SUCCESS",
        "a write after the failed close: {r}"
    );
    let r = c.call(teardown(&sid, &fid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "the second try: {r}");
    assert!(handle_paths(d.socket()).is_empty(), "closed in filterd too");
    assert_eq!(std::fs::read(s.root().join("f")).expect("f"), b"data");
}

#[test]
fn a_close_whose_commit_fails_leaves_the_open_usable_and_closable() {
    smbshim_keeps_the_open("failed-close", close_req);
}

/// smbshim's LOGOFF closes every open of the session, persistent ones too:
/// one whose close filterd undid fails the LOGOFF, and the session and the
/// open stay, usable; the next LOGOFF closes it. (It answered success
/// while filterd kept the handle attached, and remembered for a restart.)
#[test]
fn smbshim_refuses_a_logoff_whose_close_fails() {
    smbshim_keeps_the_open("failed-logoff", |sid, _| logoff_req(sid));
}

/// smbshim: a persistent open of `f`; filterd is killed as `teardown` (a
/// CLOSE or a LOGOFF of it) asks for its close, so the close never ran,
/// and is started again. `teardown` must not answer success, and the
/// handle must not stay: before the fix smbshim forgot the open, its
/// attachment resumed the handle in the restarted filterd, and nobody
/// named it again — attached for good, its share mode and locks held (a
/// LOGOFF even answered success). Now smbshim closes it again until
/// filterd answers (`libfilter::settle`). Returns the scratch dir, the
/// restarted filterd, smbshim, the client and its session, for more.
fn smbshim_settles_an_unanswered_close(
    name: &str,
    teardown: impl Fn(&serde_json::Value, &serde_json::Value) -> serde_json::Value,
) -> (Scratch, Filterd, Shim, LineClient, u64) {
    let s = Scratch::new(name);
    let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", "request.close:1:kill")]);
    let smb = Shim::start("smbshim", d.socket(), name);
    let (mut c, sid) = smb_session(&smb.addr);
    let fid = persistent_open(&mut c, sid, "f");

    let r = c.call(teardown(&json!(sid), &fid));
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "filterd died before the close: not done, retry: {r}"
    );
    d.wait_killed_at("request.close:1:kill", Duration::from_secs(10));
    let d = Filterd::start(&s, &[], &[]);
    wait_for("filterd to hold no handle", Duration::from_secs(20), || {
        handle_paths(d.socket()).is_empty().then_some(())
    });
    // Another client opens the file sharing nothing.
    let (mut other, osid) = smb_session(&smb.addr);
    let r = other.call(json!({"cmd": "CREATE", "session_id": osid, "path": "f",
        "access": ["read", "write"], "share": [], "disposition": "open"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "nothing holds f: {r}");
    (s, d, smb, c, sid)
}

#[test]
fn smbshim_closes_again_a_handle_whose_close_was_never_answered() {
    let (_s, _d, _smb, mut c, sid) =
        smbshim_settles_an_unanswered_close("smbshim-unsettled-close", close_req);
    let r = c.call(logoff_req(&sid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
}

/// A LOGOFF whose close was never answered fails with the close's status
/// (it answered success), the session stays, and the next LOGOFF ends it.
#[test]
fn smbshim_fails_a_logoff_whose_close_was_never_answered() {
    let (_s, _d, _smb, mut c, sid) =
        smbshim_settles_an_unanswered_close("smbshim-unsettled-logoff", |sid, _| logoff_req(sid));
    let r = c.call(logoff_req(&sid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "the second LOGOFF: {r}");
}

/// The CLOSE came first: a replayed CREATE of the open whose CLOSE filterd
/// never answered (filterd killed at it, then restarted) must not get the
/// original open back while smbshim still closes its handle again — it
/// would be closed under the client. It is told to retry until the close
/// is made, then opens anew (another file id).
#[test]
fn smbshim_hands_out_no_open_whose_close_is_being_made_again() {
    let s = Scratch::new("smbshim-unsettled-replay");
    let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", "request.close:1:kill")]);
    let smb = Shim::start("smbshim", d.socket(), "smbshim-unsettled-replay");
    let (mut c, sid) = smb_session(&smb.addr);
    let (create, fid) = durable_open_of_f(&mut c, sid);
    let r = c.call(close_req(&sid, &fid));
    assert_eq!(r["status"], "STATUS_FILE_NOT_AVAILABLE", "{r}");
    d.wait_killed_at("request.close:1:kill", Duration::from_secs(10));
    let _d = Filterd::start(&s, &[], &[]);
    let mut replay = create;
    replay["replay"] = json!(true);
    let r = wait_for("the replayed CREATE", Duration::from_secs(20), || {
        let r = c.call(replay.clone());
        (r["status"] != "STATUS_FILE_NOT_AVAILABLE").then_some(r)
    });
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_ne!(r["file_id"], fid, "the open whose CLOSE came first: {r}");
}

/// Polls smbshim's log `log` for `needle`.
fn wait_logged(log: &std::path::Path, needle: &str) {
    wait_logged_times(log, needle, 1);
}

/// Polls smbshim's log `log` for `needle`, `n` times over.
fn wait_logged_times(log: &std::path::Path, needle: &str, n: usize) {
    wait_for(needle, Duration::from_secs(20), || {
        let text = std::fs::read_to_string(log).ok()?;
        (text.matches(needle).count() >= n).then_some(())
    });
}

/// The CLOSE came first while it is still in flight too: a replayed
/// CREATE of the open (on another connection) that filterd answered with
/// the original handle before the CLOSE took the open — held there by
/// the test hook (`SMBSHIM_TEST_HOLD_STORE`, `.hold-replay`) — must not
/// get that open back while filterd makes the close (stalled at it): it
/// got it, and the close then took the handle from under it (re-review
/// after rr40h). It is told to retry, as a retried CLOSE is; once the
/// close is made, the GUID names no open and the replay opens anew.
#[test]
fn smbshim_hands_out_no_open_whose_close_is_in_flight() {
    const STALL: &str = "request.close:1:sleep8000";
    let name = "smbshim-close-in-flight-replay";
    let h = Hooked::start(name, &[("RKFILTER_FAILPOINTS", STALL)]);
    let (mut c, sid) = h.session();
    let (create, fid) = durable_open_of_f(&mut c, sid);

    h.hold("replay");
    let mut replay = create;
    replay["replay"] = json!(true);
    let replayed = h.in_flight(replay.clone());
    h.wait_logged("test hook: a replayed CREATE waits before its store");
    // The CLOSE (on a third connection: the session's stays) takes the
    // open from the table and waits in filterd.
    let close = h.in_flight(close_req(&sid, &fid));
    h.d.wait_stalled_at(STALL, Duration::from_secs(10));
    h.release("replay");
    let r = answer(replayed, "the replay", 30);
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "the CLOSE came first and is in flight: {r}"
    );
    let r = answer(close, "the CLOSE", 60);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(handle_paths(h.d.socket()).is_empty(), "closed in filterd");

    let r = c.call(replay);
    assert_eq!(r["status"], "STATUS_SUCCESS", "the GUID names no open: {r}");
    assert_ne!(r["file_id"], fid, "a new open: {r}");
    assert_eq!(r["create_action"], "opened", "{r}");
    assert_eq!(handle_paths(h.d.socket()), ["f"], "the new open's handle");
}

/// What becomes of a close filterd never answered, after the client is
/// told it is not done ([`smbshim_tells_no_close_done_before_it_settles`]).
enum Then {
    /// filterd comes back: the retried teardown is answered done.
    FilterdBack,
    /// smbshim dies before filterd is back; the client RECONNECTs the open
    /// through a replacement and CLOSEs it there.
    FrontendDies,
}

/// smbshim: a persistent open of `f` holding a byte-range lock; filterd
/// is killed as `teardown` (a CLOSE or a LOGOFF) asks for its close.
/// `teardown` is answered STATUS_FILE_NOT_AVAILABLE, and so is it again
/// while filterd is down: before the fix the retry was answered done
/// (FILE_CLOSED, SUCCESS), the client forgot the open, and a smbshim
/// that died before filterd came back took its settler along — the
/// restarted filterd held the handle, its share mode and lock, for its
/// whole durable timeout (rvchaos 1). Then, per `then`, the handle goes
/// (well before its 60 s timeout).
fn smbshim_tells_no_close_done_before_it_settles(
    name: &str,
    teardown: impl Fn(&Value, &Value) -> Value,
    then: Then,
) {
    let s = Scratch::new(name);
    let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", "request.close:1:kill")]);
    let smb = Shim::start("smbshim", d.socket(), name);
    let client_guid = uuid::Uuid::new_v4().to_string();
    let create_guid = uuid::Uuid::new_v4().to_string();
    let mut c = LineClient::connect(&smb.addr);
    let setup = json!({"cmd": "SESSION_SETUP", "client_guid": client_guid, "user": "m"});
    let r = c.call(setup.clone());
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let sid = r["session_id"].clone();
    let r = c.call(json!({"cmd": "CREATE", "session_id": sid, "path": "f",
        "access": ["read", "write"], "share": ["read"], "disposition": "create",
        "durable": {"create_guid": create_guid, "persistent": true, "timeout_ms": 60000}}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let r = c.call(json!({"cmd": "LOCK", "session_id": sid, "file_id": fid,
        "locks": [{"offset": 0, "length": 10, "exclusive": true, "unlock": false}]}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");

    let r = c.call(teardown(&sid, &fid));
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "filterd died: {r}"
    );
    d.wait_killed_at("request.close:1:kill", Duration::from_secs(10));
    let r = c.call(teardown(&sid, &fid));
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "retried while filterd is down: still not done: {r}"
    );

    match then {
        Then::FilterdBack => {
            let d = Filterd::start(&s, &[], &[]);
            let r = wait_for("the retried close", Duration::from_secs(20), || {
                let r = c.call(teardown(&sid, &fid));
                (r["status"] != "STATUS_FILE_NOT_AVAILABLE").then_some(r)
            });
            assert_eq!(r["status"], "STATUS_SUCCESS", "the close is made: {r}");
            assert!(handle_paths(d.socket()).is_empty(), "closed in filterd");
        }
        Then::FrontendDies => {
            drop(c);
            smb.kill9();
            let started = std::time::Instant::now();
            let d = Filterd::start(&s, &[], &[]);
            let smb = Shim::start("smbshim", d.socket(), name);
            let mut c = LineClient::connect(&smb.addr);
            let r = c.call(setup);
            assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
            let sid = r["session_id"].clone();
            let r = wait_for("RECONNECT", Duration::from_secs(20), || {
                let r = c.call(json!({"cmd": "RECONNECT", "session_id": sid,
                    "file_id": fid, "create_guid": create_guid}));
                (r["status"] != "STATUS_FILE_NOT_AVAILABLE").then_some(r)
            });
            assert_eq!(
                r["status"], "STATUS_SUCCESS",
                "the client kept its open: {r}"
            );
            let fid = r["file_id"].clone();
            let r = c.call(close_req(&sid, &fid));
            assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
            assert!(handle_paths(d.socket()).is_empty(), "closed in filterd");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "gone well before its 60 s timeout"
            );
        }
    }
}

#[test]
fn smbshim_retried_close_waits_for_filterd() {
    smbshim_tells_no_close_done_before_it_settles(
        "settle-close-back",
        close_req,
        Then::FilterdBack,
    );
}

#[test]
fn smbshim_close_not_done_survives_the_frontend() {
    smbshim_tells_no_close_done_before_it_settles(
        "settle-close-dies",
        close_req,
        Then::FrontendDies,
    );
}

#[test]
fn smbshim_retried_logoff_waits_for_filterd() {
    smbshim_tells_no_close_done_before_it_settles(
        "settle-logoff-back",
        |sid, _| logoff_req(sid),
        Then::FilterdBack,
    );
}

#[test]
fn smbshim_logoff_not_done_survives_the_frontend() {
    smbshim_tells_no_close_done_before_it_settles(
        "settle-logoff-dies",
        |sid, _| logoff_req(sid),
        Then::FrontendDies,
    );
}

/// rksmbd and a real SMB 3 client (smbprotocol, `tests/smb3/SCRIPT`): the
/// script's first close of persistent open `file` (a CLOSE, a
/// TREE_DISCONNECT), whose commit fails, is refused ("refused": filterd
/// still lists the handle); its FileId still writes and reads; the second
/// try succeeds ("done": filterd lists nothing).
fn rksmbd_keeps_the_open(name: &str, script: &str, file: &str) {
    // Commit 1 records the persistent create; commit 2 is the close's.
    rksmbd_keeps_the_open_with(name, script, file, "commit.before:2:fail");
}

/// [`rksmbd_keeps_the_open`], filterd's failure armed by `failpoints`.
fn rksmbd_keeps_the_open_with(name: &str, script: &str, file: &str, failpoints: &str) {
    rksmbd_keeps_the_open_through(name, script, file, failpoints, |_| {});
}

/// [`rksmbd_keeps_the_open_with`], `between` run once the script's first
/// close was refused, while the client waits.
fn rksmbd_keeps_the_open_through(
    name: &str,
    script: &str,
    file: &str,
    failpoints: &str,
    between: impl FnOnce(&mut RksmbdRun),
) {
    let mut run = RksmbdRun::start(name, failpoints, script, &[]);
    run.script.expect("refused");
    assert_eq!(
        handle_paths(run.d.socket()),
        [file],
        "filterd undid the close: the open is still held\n{}",
        run.script.log
    );
    between(&mut run);
    run.script.say("go");
    run.script.expect("done");
    assert_eq!(
        handle_paths(run.d.socket()),
        Vec::<String>::new(),
        "the second try closed it in filterd\n{}",
        run.script.log
    );
    run.script.say("go");
    run.script.finish();
}

/// rksmbd and a real SMB 3 client running `tests/smb3/SCRIPT` in front of
/// a filterd armed with `failpoints` (`RKFILTER_FAILPOINTS`).
struct RksmbdRun {
    // (Dropped in this order: the processes before their scratch dir.)
    script: Dialogue,
    _srv: RkSmbd,
    d: Filterd,
    failpoints: String,
    s: Scratch,
}

impl RksmbdRun {
    /// filterd armed with `failpoints`, rksmbd (with `env` besides)
    /// sharing `data` to alice, and `script` started against it.
    fn start(name: &str, failpoints: &str, script: &str, env: &[(&str, &str)]) -> RksmbdRun {
        let s = Scratch::new(name);
        let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", failpoints)]);
        let srv = RkSmbd::start_with_env(&s, "rksmbd", "data", &[("alice", "pw")], env);
        let script = Dialogue::start(&srv, script, Duration::from_secs(60));
        RksmbdRun {
            s,
            d,
            failpoints: failpoints.to_owned(),
            _srv: srv,
            script,
        }
    }

    /// Waits for filterd to die at the kill it was armed with.
    fn filterd_killed(&mut self) {
        self.d
            .wait_killed_at(&self.failpoints, Duration::from_secs(10));
    }

    /// filterd started again (unarmed) on the same state.
    fn restart_filterd(&mut self) {
        self.d = Filterd::start(&self.s, &[], &[]);
    }
}

/// filterd's failpoint killing it under its second commit, the close's or
/// the detach's (commit 1 records the persistent create).
const KILL_AT_COMMIT_2: &str = "commit.before:2:kill";

/// The CLOSE is refused; then another client opens the closed file.
#[test]
fn rksmbd_refuses_a_close_filterd_did_not_make_and_keeps_the_open() {
    rksmbd_keeps_the_open("rksmbd-failed-close", "failed_close.py", "closing.txt");
}

/// As above, with filterd killed and restarted after the failed CLOSE:
/// the open rksmbd kept must still be attached to it. rksmbd's
/// `Attachment` forgot the handle on the refusal, so the restart left it
/// disconnected, the second CLOSE found it not rksmbd's (`NotOwner`,
/// answered as closed) and filterd held it, share mode and record, until
/// its durable timeout. Now a close filterd undid keeps the handle
/// remembered, and the reattach resumes it.
#[test]
fn rksmbd_keeps_an_open_whose_close_failed_across_a_filterd_restart() {
    rksmbd_keeps_the_open_through(
        "rksmbd-failed-close-restart",
        "failed_close.py",
        "closing.txt",
        "commit.before:2:fail",
        |run| {
            run.d.kill9();
            run.restart_filterd();
            // Resumed: attached again (a disconnected handle is listed
            // too).
            wait_for("the kept open resumed", Duration::from_secs(20), || {
                attached_paths(&run.d)
                    .contains(&"closing.txt".to_owned())
                    .then_some(())
            });
        },
    );
}

/// TREE_DISCONNECT closes the tree's opens: one whose close filterd undid
/// fails the request, and the tree and the open stay. (A LOGOFF detaches
/// persistent opens and closes only others, which commit nothing: no
/// commit of it can fail.)
#[test]
fn rksmbd_refuses_a_tree_disconnect_whose_close_fails() {
    rksmbd_keeps_the_open(
        "rksmbd-failed-tdis",
        "failed_tree_disconnect.py",
        "kept.txt",
    );
}

/// A LOGOFF sent through a bound channel (multichannel) whose close
/// filterd refuses fails and changes nothing: the channel stays bound, and
/// reads the open. rksmbd unbound the channel all the same, so it could
/// no longer use the session the LOGOFF had kept. (LOGOFF closes only
/// opens that are not durable, which commit nothing: the failpoint
/// refuses the close instead.)
#[test]
fn rksmbd_keeps_the_channel_of_a_logoff_whose_close_fails() {
    rksmbd_keeps_the_open_with(
        "rksmbd-failed-channel-logoff",
        "failed_channel_logoff.py",
        "kept.txt",
        "close.refuse:1:fail",
    );
}

/// A CLOSE whose answer from filterd never came (filterd killed under its
/// commit) is answered STATUS_FILE_NOT_AVAILABLE, and so is the FileId's
/// retried CLOSE while filterd is down: before, the retry got
/// STATUS_FILE_CLOSED, the client forgot the open, and an rksmbd that died
/// before filterd came back took the handle's settler with it — the
/// handle stayed for its durable timeout (rvchaos 1). Once filterd is
/// back the retried CLOSE succeeds and nothing is held.
#[test]
fn rksmbd_retried_close_waits_for_filterd() {
    rksmbd_settles_a_close_while_filterd_is_down("rksmbd-settling-close", "settling_close.py");
}

/// rksmbd and `script` (`tests/smb3/`), filterd killed under the close's
/// commit: the script's first close is refused, and so is its retry while
/// filterd is down ("still"); once filterd is back the script closes for
/// good, and filterd holds nothing.
fn rksmbd_settles_a_close_while_filterd_is_down(name: &str, script: &str) {
    let mut run = RksmbdRun::start(name, KILL_AT_COMMIT_2, script, &[]);
    run.script.expect("refused");
    run.filterd_killed();
    run.script.say("go");
    run.script.expect("still");
    run.restart_filterd();
    run.script.say("go");
    run.script.finish();
    assert!(handle_paths(run.d.socket()).is_empty(), "closed in filterd");
}

/// The same through a second channel of the session (multichannel): the
/// FileId's retried CLOSE sent there, while the close settles, is
/// STATUS_FILE_NOT_AVAILABLE as on the first, and a TREE_DISCONNECT of the
/// open's tree is STATUS_FILE_NOT_AVAILABLE too, the tree staying. Before,
/// the settling note was kept by the connection the CLOSE came on, so a
/// retry elsewhere got STATUS_FILE_CLOSED, and the TREE_DISCONNECT
/// succeeded (the tree, the client's only way to name the open, went).
#[test]
fn rksmbd_retried_close_waits_for_filterd_on_every_channel() {
    rksmbd_settles_a_close_while_filterd_is_down(
        "rksmbd-settling-close-channel",
        "settling_close_channel.py",
    );
}

/// A TREE_DISCONNECT whose close of a persistent open filterd never
/// answered (filterd killed under its commit) is STATUS_FILE_NOT_AVAILABLE
/// and keeps the tree, as a CLOSE is; retried, or the open reconnected,
/// while filterd is down: the same. Once filterd is back the open's CLOSE
/// through the kept tree succeeds, then the TREE_DISCONNECT, and nothing
/// is held. Before, the TREE_DISCONNECT succeeded: the client forgot the
/// tree and the open, whose close only this rksmbd's settler would make
/// (re-review rr41b B).
#[test]
fn rksmbd_tree_disconnect_waits_for_a_settling_close() {
    rksmbd_settles_a_close_while_filterd_is_down(
        "rksmbd-settling-tdis",
        "settling_tree_disconnect.py",
    );
}

/// A reconnect (DH2C, from a new connection) of an open whose CLOSE
/// settles, filterd serving again but the settling close not yet made
/// (held here, `RKSMBD_TEST_SETTLE_DELAY_MS`), is told to retry. It was
/// STATUS_OBJECT_NAME_NOT_FOUND (filterd refused the resume, the handle
/// attached to rksmbd): the client forgot an open whose close only
/// rksmbd's memory would make — an rksmbd dying then left the handle to
/// its durable timeout.
#[test]
fn rksmbd_reconnect_waits_for_a_settling_close() {
    reconnect_of_a_settling_close_is_retry("rksmbd-settling-reconnect", "go");
}

/// The same from another client GUID of the same user (smbprotocol picks
/// one per connection): the open, without a lease, is its user's, and
/// a reconnect resumes it for any client GUID of hers — so it is told to
/// retry as well. It was STATUS_OBJECT_NAME_NOT_FOUND, final for the
/// client: the settling FileId was kept for its client GUID alone
/// (re-review rr41h F3).
#[test]
fn rksmbd_reconnect_from_another_client_guid_waits_for_a_settling_close() {
    reconnect_of_a_settling_close_is_retry("rksmbd-settling-reconnect-guid", "new-guid");
}

/// settling_reconnect.py, its DH2C made as `how` says ("new-guid": from
/// another client GUID), is told to retry.
fn reconnect_of_a_settling_close_is_retry(name: &str, how: &str) {
    let env = [("RKSMBD_TEST_SETTLE_DELAY_MS", "60000")];
    let mut run = RksmbdRun::start(name, KILL_AT_COMMIT_2, "settling_reconnect.py", &env);
    run.script.expect("refused");
    run.filterd_killed();
    run.restart_filterd();
    run.script.say(how);
    run.script.expect("retry");
    assert_eq!(
        handle_paths(run.d.socket()),
        ["settling.txt"],
        "the close still settles"
    );
    run.script.say("go");
    run.script.finish();
}

/// A reconnect (DH2C) under way when the open's CLOSE begins to settle —
/// past its check for a settling close (held there,
/// `RKSMBD_TEST_RECONNECT_HOLD_MS`), filterd killed under the close's
/// commit and restarted meanwhile — is told to retry when the restarted
/// filterd refuses the resume (the handle attached to rksmbd). Before
/// (re-review rr41h F4) only the check before the resume looked, and the
/// DH2C was STATUS_OBJECT_NAME_NOT_FOUND: the client forgot an open whose
/// close was not made (tests/smb3/settling_meanwhile_reconnect.py).
#[test]
fn rksmbd_reconnect_under_way_when_its_close_begins_to_settle_is_retry() {
    let s = Scratch::new("rksmbd-settling-meanwhile");
    let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", KILL_AT_COMMIT_2)]);
    let env = [
        ("RKSMBD_TEST_SETTLE_DELAY_MS", "60000"),
        ("RKSMBD_TEST_RECONNECT_HOLD_MS", "15000"),
    ];
    let (srv, log) = RkSmbd::start_logged(&s, "rksmbd", "data", &[("alice", "pw")], &env);
    let mut script = Dialogue::start(
        &srv,
        "settling_meanwhile_reconnect.py",
        Duration::from_secs(90),
    );
    script.expect("reconnecting");
    let held = "a reconnect is held after its settling check";
    rkfilter_tests::wait_logged(&log, &format!("test hook: {held}"));
    script.say("go");
    script.expect("refused");
    d.wait_killed_at(KILL_AT_COMMIT_2, Duration::from_secs(10));
    d = Filterd::start(&s, &[], &[]);
    script.say("go");
    script.expect("serving");
    // The DH2C must meet the restarted filterd, the close settling: still
    // held once rksmbd serves again (else the hold was too short for this
    // machine's load, and the test proves nothing).
    let over = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !over.contains(&format!("test hook over: {held}")),
        "the DH2C was let go before rksmbd served again: hold it longer"
    );
    script.say("go");
    script.expect("retry");
    assert_eq!(
        handle_paths(d.socket()),
        ["settling-meanwhile.txt"],
        "the close still settles"
    );
    script.say("go");
    script.finish();
}

/// A CLOSE whose answer from filterd never came (filterd killed under its
/// commit): the CLOSE is not a success and rksmbd forgets the open (it
/// serves nothing through a handle filterd may have closed), but the
/// handle must not stay behind. It did: the close never committed, the
/// restarted filterd got the handle back, resumed by rksmbd's attachment,
/// and nobody named it again — its share mode refused every other writer
/// for as long as rksmbd ran. Now rksmbd closes it again until filterd
/// answers (`rksmbd::settle`).
#[test]
fn rksmbd_closes_again_a_handle_whose_close_was_never_answered() {
    let mut run = RksmbdRun::start(
        "rksmbd-unsettled-close",
        KILL_AT_COMMIT_2,
        "unsettled_close.py",
        &[],
    );
    run.script.expect("refused");
    run.filterd_killed();
    run.restart_filterd();
    wait_for("filterd holds no handle", Duration::from_secs(20), || {
        handle_paths(run.d.socket()).is_empty().then_some(())
    });
    run.script.say("go");
    run.script.finish();
}

/// A connection drop whose Detach filterd never answered: filterd dies
/// under the detach's commit (commit 1 records the persistent create,
/// commit 2 is the detach's), and the restarted one gets the handle back
/// as the store had it, attached. rksmbd only logs the failed detach; a
/// reviewer feared the handle stays attached to rksmbd, "connected" with
/// no connection holding it, its DH2C refused ("attached, not
/// disconnected") until rksmbd exits. It does not: `Attachment::detach`
/// forgets the handle before it asks, so rksmbd's reattach does not
/// resume it and it waits disconnected; the DH2C succeeds. This guards
/// that (it passed before any change).
#[test]
fn rksmbd_resumes_a_handle_whose_detach_was_never_answered() {
    let mut run = RksmbdRun::start(
        "rksmbd-unsettled-detach",
        KILL_AT_COMMIT_2,
        "detach_then_reconnect.py",
        &[],
    );
    run.script.expect("ready");
    run.script.say("go");
    run.script.expect("dropped");
    run.filterd_killed();
    run.restart_filterd();
    // rksmbd attached again; the restored handle, which rksmbd's
    // attachment forgot when it sent the detach, waits disconnected.
    let sock = run.d.socket().display().to_string();
    wait_for(
        "the handle to wait disconnected, not attached to rksmbd",
        Duration::from_secs(20),
        || {
            let attached = matches!(
                run.d.control().call(libfilter::proto::Request::Frontends {
                    durable_ok: false,
                }),
                Ok((libfilter::proto::Reply::Frontends { frontends, .. }, _)) if frontends.iter().any(|f| f.attached)
            );
            let v = rkfilter_tests::filterctl(&["--socket", &sock, "handles", "--json"]).json();
            let states: Vec<&str> = v
                .as_array()?
                .iter()
                .filter_map(|h| h["conn"]["state"].as_str())
                .collect();
            (attached && states == ["disconnected"]).then_some(())
        },
    );
    run.script.say("go");
    run.script.finish();
    rkfilter_tests::smb3::no_handles_left(&run.d);
}

/// A CREATE with an AppInstanceId closes the old open of that id (another
/// connection's) first: when filterd undoes that close, the old open stays
/// its client's (rksmbd forgot it, leaving the handle attached) and the
/// new CREATE is refused.
#[test]
fn rksmbd_keeps_an_open_whose_app_instance_takeover_fails() {
    rksmbd_keeps_the_open("rksmbd-failed-app", "failed_app_instance.py", "app.txt");
}

/// The paths of the handles filterd `d` lists as attached, sorted.
fn attached_paths(d: &Filterd) -> Vec<String> {
    let sock = d.socket().display().to_string();
    let all = rkfilter_tests::filterctl(&["--socket", &sock, "handles", "--json"]).json();
    let attached: Vec<Value> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["conn"]["state"] == "connected")
        .cloned()
        .collect();
    rkfilter_tests::listed_paths(&Value::Array(attached))
}

/// What `end` left of the session in [`a_close_undone_after_the_session_ends`].
enum Ended {
    /// Its connection went, and the session with it.
    Gone,
    /// A LOGOFF waited its bound and was refused: LOGOFF again.
    Refused(LineClient),
    /// A LOGOFF waits for the CLOSE's answer.
    Waiting(rkfilter_tests::InFlight),
}

/// smbshim: a CLOSE (from another connection of the session) whose
/// commit fails while `end` tries to end the session meanwhile (the loss
/// of its connection, with no other open, done at once; or a LOGOFF,
/// which waits for the CLOSE's answer, at most its bound). smbshim
/// cannot put the open back into an ended session, and must not leave
/// filterd holding its handle. It did: the handle stayed attached to
/// smbshim, its share mode refusing every other open of the file, for
/// as long as smbshim ran — while a LOGOFF had answered success.
/// filterd is stopped (SIGSTOP) while the CLOSE waits in it, so `end`
/// surely comes first.
fn a_close_undone_after_the_session_ends(
    name: &str,
    end: impl FnOnce(&str, &std::path::Path, LineClient, u64) -> Ended,
) {
    use nix::sys::signal::Signal;
    let (s, d, smb, mut a, sid, fid) = persistent_open_failing_its_close(name);

    // Stopped, every thread of it (the signal lands asynchronously).
    d.stop();
    let mut b = LineClient::connect(&smb.addr);
    let close = b.send_only("mid", close_req(&sid, &fid));
    // The CLOSE took the open from smbshim's table (a FLUSH of it, which
    // asks filterd nothing, no longer finds it) and waits in filterd.
    wait_for("the CLOSE under way", Duration::from_secs(30), || {
        let r = a.call(flush_req(&sid, &fid));
        (r["status"] != "STATUS_SUCCESS").then_some(())
    });
    let ended = end(&smb.addr, &smbshim_log(&s), a, sid);
    d.signal(Signal::SIGCONT);
    let (r, _) = b.reply_to("mid", close).expect("the CLOSE's reply");
    assert_ne!(r["status"], "STATUS_SUCCESS", "its commit failed: {r}");
    match ended {
        Ended::Gone => {}
        Ended::Refused(mut a) => {
            // The open is back; the LOGOFF again closes it and ends the
            // session.
            let r = a.call(logoff_req(&sid));
            assert_eq!(r["status"], "STATUS_SUCCESS", "the second LOGOFF: {r}");
        }
        Ended::Waiting(logoff) => {
            // The open is back, and the LOGOFF that waited closes it.
            let r = answer(logoff, "the LOGOFF", 60);
            assert_eq!(r["status"], "STATUS_SUCCESS", "the waiting LOGOFF: {r}");
        }
    }

    // The session is gone and the open with it: filterd holds nothing of
    // it, and another client opens the file exclusively.
    assert!(
        handle_paths(d.socket()).is_empty(),
        "the handle of an open no session has: {:?}",
        handle_paths(d.socket())
    );
    let (mut c, sid2) = smb_session(&smb.addr);
    let r = c.call(json!({"cmd": "CREATE", "session_id": sid2, "path": "f",
                          "access": ["read", "write"], "share": [], "disposition": "open"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = c.call(flush_req(&sid, &fid));
    assert_eq!(r["status"], "STATUS_USER_SESSION_DELETED", "ended: {r}");
}

/// The LOGOFF waits for the CLOSE in flight, and once filterd undid it
/// closes the open put back and ends the session. Before, it was
/// `STATUS_FILE_NOT_AVAILABLE` at once (rr40h; before that, rr40f 2, it
/// answered success and the undone close's open was closed by
/// `keep_open`); a client that dropped its connection then left the
/// open disconnected for its durable timeout.
#[test]
fn a_logoff_while_a_close_is_undone_waits_and_leaves_no_handle() {
    a_close_undone_after_the_session_ends("failed-close-logoff", |_, log, a, sid| {
        let logoff = InFlight::send(a, logoff_req(&sid));
        wait_logged(log, &format!("LOGOFF of session {sid} waits"));
        Ended::Waiting(logoff)
    });
}

/// The LOGOFF's wait is bounded (smbshim's `LETTING_GO_WAIT`, 20 s): with
/// filterd stopped for longer it is `STATUS_FILE_NOT_AVAILABLE`, the
/// session kept, and LOGOFF again once the CLOSE is answered (undone)
/// closes the open put back.
#[test]
fn a_logoff_waits_for_a_close_in_flight_no_longer_than_its_bound() {
    a_close_undone_after_the_session_ends("failed-close-logoff-bound", |_, _, mut a, sid| {
        let started = std::time::Instant::now();
        let r = a.call(logoff_req(&sid));
        assert_eq!(
            r["status"], "STATUS_FILE_NOT_AVAILABLE",
            "a CLOSE of its open waits in a stopped filterd: {r}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(19) && waited < Duration::from_secs(40),
            "waited its bound: {waited:?}"
        );
        Ended::Refused(a)
    });
}

#[test]
fn a_close_undone_after_its_connection_went_does_not_leave_the_handle() {
    a_close_undone_after_the_session_ends("failed-close-lost", |addr, _, a, sid| {
        drop(a);
        // Its session ends with it (asked from a third connection).
        let mut c = LineClient::connect(addr);
        wait_for("the session ended", Duration::from_secs(30), || {
            let r = c.call(flush_req(&sid, &"x"));
            (r["status"] == "STATUS_USER_SESSION_DELETED").then_some(())
        });
        Ended::Gone
    });
}

/// nfsshim in front of a filterd whose commit `n` fails, a file `f`, and
/// client host-a with `owner`'s OPEN of it for `access`, then its second
/// OPEN of it with `extra`: (scratch, filterd, nfsshim, client, the second
/// OPEN's answer).
fn nfs_open_twice(
    name: &str,
    n: u32,
    access: &str,
    extra: Value,
) -> (Scratch, Filterd, Shim, Nfs, Value) {
    let s = Scratch::new(name);
    std::fs::write(s.root().join("f"), b"f").expect("f");
    let fp = format!("commit.before:{n}:fail");
    let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
    let nfs = Shim::start("nfsshim", &s.socket(), name);
    let mut a = Nfs::connect(&nfs.addr, "host-a", "00000000000000aa");
    nfs_ok(a.open("oo", "f", "read", "none", json!({})));
    let o = nfs_ok(a.open("oo", "f", access, "none", extra));
    (s, d, nfs, a, o)
}

fn nfs_ok(r: Value) -> Value {
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    r
}

/// nfsshim: a CLOSE closes the open state's further handles (an upgrade's
/// here) before its own, whose commit carries the state's deletion. When
/// that last commit fails the CLOSE fails and the open state stays — but
/// it still named the upgrade's handle filterd had closed: its WRITEs went
/// through that descriptor while filterd held no write access, so another
/// client's OPEN denying writes was granted beside them. Now a handle the
/// CLOSE closed leaves the open state at once: nfsshim and filterd agree,
/// the open is left with the access filterd still holds for it, and the
/// next CLOSE closes the rest. The seventh commit is the open's own
/// close (the sixth the upgrade handle's: failing it leaves all as it
/// was).
#[test]
fn nfsshim_a_close_whose_commit_fails_names_no_handle_filterd_closed() {
    let (s, _d, nfs, mut a, o) = nfs_open_twice("nfs-failed-close", 7, "both", json!({}));
    let sid = o["stateid"].clone();
    assert_eq!(handles_on(&s, "f").len(), 2, "the open and its upgrade");

    let r = a.call(json!({"op": "CLOSE", "stateid": sid}));
    assert_ne!(
        r["status"], "NFS4_OK",
        "the open's close did not commit: {r}"
    );
    let held = handles_on(&s, "f");
    assert_eq!(held.len(), 1, "the upgrade's handle closed: {held:?}");

    // The open state writes no more through a handle filterd closed, and
    // another client may deny writes beside what filterd holds.
    let r = a.call(json!({"op": "WRITE", "stateid": sid, "offset": 0, "data": "eA=="}));
    assert_ne!(
        r["status"], "NFS4_OK",
        "a write without a write handle: {r}"
    );
    let mut b = Nfs::connect(&nfs.addr, "host-b", "00000000000000bb");
    let r = b.open("ob", "f", "read", "write", json!({}));
    let bsid = nfs_ok(r)["stateid"].clone();
    nfs_ok(b.call(json!({"op": "CLOSE", "stateid": bsid})));

    // The next CLOSE closes the rest.
    nfs_ok(a.call(json!({"op": "CLOSE", "stateid": sid})));
    assert!(handles_on(&s, "f").is_empty(), "{:?}", handles_on(&s, "f"));
}

/// nfsshim: a DELEGRETURN closes the handle that only carried the
/// delegation (an OPEN that widened no mode but got one). When that
/// close's commit failed, nfsshim ignored the error and forgot the handle:
/// filterd held it, attached to nfsshim and named by no state, for as
/// long as nfsshim ran (the open's CLOSE left it behind). Now the
/// DELEGRETURN fails with nothing changed, and the next one returns it.
#[test]
fn nfsshim_a_delegreturn_whose_carrier_close_fails_keeps_the_delegation() {
    // Commit 8 is the carrier's close (6 the DELEGRETURN's mark in the
    // open state's record, 7 the lease given up, 9 its records).
    let deleg = json!({"want_delegation": "read"});
    let (s, _d, _nfs, mut a, o) = nfs_open_twice("nfs-failed-delegreturn", 8, "read", deleg);
    assert_eq!(o["delegation"]["type"], "read", "{o}");
    let sid = o["stateid"].clone();
    let deleg = o["delegation"]["stateid"].clone();
    assert_eq!(handles_on(&s, "f").len(), 2, "the open and its carrier");

    let r = a.call(json!({"op": "DELEGRETURN", "stateid": deleg}));
    assert_ne!(
        r["status"], "NFS4_OK",
        "the carrier's close did not commit: {r}"
    );
    assert_eq!(handles_on(&s, "f").len(), 2, "the carrier is still held");

    // Still the client's: the next DELEGRETURN returns it, and the CLOSE
    // leaves filterd holding nothing.
    nfs_ok(a.call(json!({"op": "DELEGRETURN", "stateid": deleg})));
    nfs_ok(a.call(json!({"op": "CLOSE", "stateid": sid})));
    assert!(handles_on(&s, "f").is_empty(), "{:?}", handles_on(&s, "f"));
}

/// A replayed CREATE whose handle query (for the original's rights) times
/// out, filterd stalled (`request.handle` sleeps past smbshim's call
/// timeout): smbshim lets the original go back to waiting for the client
/// — it detaches it — and that detach fails too (its commit, the fourth:
/// create, the lost connection's detach, the replay's takeover, this one).
/// The replay is told to retry; the handle must not stay attached to
/// smbshim, which forgot it, holding the file for as long as smbshim runs,
/// nor be closed, or the client's next replay would open anew (truncating
/// the file again): it finds the original, its data there.
#[test]
fn a_replay_whose_handle_query_and_let_go_fail_leaves_the_original_waiting() {
    let name = "smbshim-replay-let-go";
    let s = Scratch::new(name);
    let d = Filterd::start(
        &s,
        &[],
        &[(
            "RKFILTER_FAILPOINTS",
            "request.handle:1:sleep1500,commit.before:4:fail",
        )],
    );
    let smb = Shim::start_with_env(
        "smbshim",
        d.socket(),
        name,
        &[("RKFILTER_CALL_TIMEOUT_MS", "1000")],
    );
    let client_guid = uuid::Uuid::new_v4().to_string();
    let guid = uuid::Uuid::new_v4().to_string();
    let connect = || {
        let mut c = LineClient::connect(&smb.addr);
        let r = c.call(json!({"cmd": "SESSION_SETUP", "client_guid": client_guid, "user": "m"}));
        assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
        let sid = r["session_id"].as_u64().expect("session_id");
        (c, sid)
    };
    let create = |sid: u64, replay: bool| {
        json!({"cmd": "CREATE", "session_id": sid, "path": "f", "access": ["read", "write"],
               "share": ["read"], "disposition": "overwrite_if", "replay": replay,
               "durable": {"create_guid": guid, "persistent": true, "timeout_ms": 60000}})
    };
    let data = base64::engine::general_purpose::STANDARD.encode("data");
    let (mut c, sid) = connect();
    let r = c.call(create(sid, false));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let w = c.call(json!({"cmd": "WRITE", "session_id": sid, "file_id": fid,
        "offset": 0, "data": data.clone()}));
    assert_eq!(w["status"], "STATUS_SUCCESS", "{w}");
    let ctl = d.control();
    let conn_is = |state: &str| {
        let hs = ctl.handles().ok()?;
        let h = hs.first()?;
        (serde_json::to_value(h.record.conn).ok()?["state"] == state).then_some(())
    };
    drop(c);
    wait_for(
        "the open to wait disconnected",
        Duration::from_secs(10),
        || conn_is("disconnected"),
    );

    let (mut c, sid) = connect();
    let r = c.call(create(sid, true));
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "the handle query timed out: {r}"
    );
    d.wait_stalled_at("request.handle", Duration::from_secs(10));
    wait_for(
        "the detach's commit to fail",
        Duration::from_secs(10),
        || {
            d.log_text()
                .contains("failpoint commit.before: failing")
                .then_some(())
        },
    );
    wait_for(
        "the handle to wait disconnected again",
        Duration::from_secs(10),
        || conn_is("disconnected"),
    );
    let r = c.call(create(sid, true));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(r["file_id"], fid, "the original open: {r}");
    let rd = c.call(json!({"cmd": "READ", "session_id": sid, "file_id": fid,
        "offset": 0, "length": 10}));
    assert_eq!(rd["data"], data, "not truncated again: {rd}");
}

/// smbshim: a persistent open of `f`; its CLOSE on one connection waits
/// for filterd (stalled at it), and `retry` (a CLOSE of the same
/// session, named by id; a LOGOFF now waits instead, below) comes on
/// another connection meanwhile. It
/// must be told STATUS_FILE_NOT_AVAILABLE: before the fix the open was
/// gone and the note of its close written only after filterd's answer,
/// so a retried CLOSE was told FILE_CLOSED and a LOGOFF SUCCESS (ending
/// the session) — the client forgot an open whose close might never be
/// made (re-review rr40f 2). Once filterd answers, the first CLOSE is
/// done and the handle gone.
fn smbshim_tells_a_retry_on_another_connection_the_close_is_in_flight(
    name: &str,
    retry: impl Fn(&Value, &Value) -> Value,
) {
    const STALL: &str = "request.close:1:sleep8000";
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", STALL)]);
    let smb = Shim::start("smbshim", d.socket(), name);
    let (mut c, sid) = smb_session(&smb.addr);
    let fid = persistent_open(&mut c, sid, "f");
    let sid = json!(sid);

    let first = InFlight::send(c, close_req(&sid, &fid));
    d.wait_stalled_at(STALL, Duration::from_secs(10));
    let mut other = LineClient::connect(&smb.addr);
    let r = other.call(retry(&sid, &fid));
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "the first CLOSE still waits for filterd: {r}"
    );
    let r = answer(first, "the first CLOSE", 60);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(handle_paths(d.socket()).is_empty(), "closed in filterd");
}

#[test]
fn smbshim_close_retried_on_another_connection_waits_for_the_first() {
    smbshim_tells_a_retry_on_another_connection_the_close_is_in_flight(
        "close-in-flight-close",
        close_req,
    );
}

/// smbshim: a persistent open of `f`; its CLOSE on one connection waits
/// for filterd (the close's commit stalled), and a LOGOFF of the session
/// comes on another connection meanwhile. The LOGOFF waits for the
/// CLOSE, while another client on a third connection is served (a
/// session, a CREATE, WRITE, READ and CLOSE of another file), and then
/// ends the session: success, the handle gone from filterd. Before
/// (re-review rr40h) it was refused at once, `STATUS_FILE_NOT_AVAILABLE`.
#[test]
fn smbshim_logoff_on_another_connection_waits_for_a_close_in_flight() {
    const STALL: &str = "commit.before:2:sleep8000";
    let name = "close-in-flight-logoff";
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", STALL)]);
    let log = smbshim_log(&s);
    let smb = Shim::start_logged("smbshim", d.socket(), name, &[], &log);
    let (mut c, sid) = smb_session(&smb.addr);
    let fid = persistent_open(&mut c, sid, "f");

    let first = InFlight::send(c, close_req(&sid, &fid));
    d.wait_stalled_at(STALL, Duration::from_secs(10));
    let mut logoff = in_flight(&smb, logoff_req(&sid));
    wait_logged(&log, &format!("LOGOFF of session {sid} waits"));

    // Another client is served meanwhile.
    let (mut other, osid) = smb_session(&smb.addr);
    let r = other.call(json!({"cmd": "CREATE", "session_id": osid, "path": "g",
        "access": ["read", "write"], "share": [], "disposition": "open_if"}));
    assert_eq!(
        r["status"], "STATUS_SUCCESS",
        "another client's CREATE: {r}"
    );
    let gid = r["file_id"].clone();
    let data = base64::engine::general_purpose::STANDARD.encode("data");
    let r = other.call(json!({"cmd": "WRITE", "session_id": osid, "file_id": gid,
        "offset": 0, "data": data}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = other.call(json!({"cmd": "READ", "session_id": osid, "file_id": gid,
        "offset": 0, "length": 10}));
    assert_eq!(r["data"], data, "{r}");
    let r = other.call(close_req(&osid, &gid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(
        !logoff.early(Duration::ZERO),
        "the LOGOFF still waits for the CLOSE"
    );

    let r = answer(first, "the first CLOSE", 60);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = answer(logoff, "the LOGOFF", 60);
    assert_eq!(r["status"], "STATUS_SUCCESS", "once the close is made: {r}");
    assert!(handle_paths(d.socket()).is_empty(), "closed in filterd");
    let r = other.call(flush_req(&sid, &fid));
    assert_eq!(r["status"], "STATUS_USER_SESSION_DELETED", "ended: {r}");
}

/// smbshim with the hold hooks (`SMBSHIM_TEST_HOLD_STORE`, its release
/// file there) in front of a filterd run with `filterd_env`, logging to
/// [`smbshim_log`].
struct Hooked {
    // (Dropped in this order: the processes before their scratch dir.)
    smb: Shim,
    d: Filterd,
    s: Scratch,
    log: std::path::PathBuf,
    /// The store hook's release file: a CREATE filterd answered waits
    /// while it is away.
    release: std::path::PathBuf,
}

impl Hooked {
    fn start(name: &str, filterd_env: &[(&str, &str)]) -> Hooked {
        let s = Scratch::new(name);
        let d = Filterd::start(&s, &[], filterd_env);
        let log = smbshim_log(&s);
        let release = s.dir.join("release-store");
        std::fs::write(&release, b"").expect("let CREATEs be stored");
        let smb = Shim::start_logged(
            "smbshim",
            d.socket(),
            name,
            &[("SMBSHIM_TEST_HOLD_STORE", &release.to_string_lossy())],
            &log,
        );
        Hooked {
            s,
            d,
            smb,
            log,
            release,
        }
    }

    /// Requests wait at hook `what` (its file `release-store.hold-WHAT`)
    /// from now until [`Hooked::release`].
    fn hold(&self, what: &str) {
        std::fs::write(self.hold_file(what), b"").expect("hold");
    }

    fn release(&self, what: &str) {
        std::fs::remove_file(self.hold_file(what)).expect("release");
    }

    fn hold_file(&self, what: &str) -> std::path::PathBuf {
        self.s.dir.join(format!("release-store.hold-{what}"))
    }

    /// A new connection to smbshim.
    fn connect(&self) -> LineClient {
        LineClient::connect(&self.smb.addr)
    }

    /// A new connection and a session on it.
    fn session(&self) -> (LineClient, u64) {
        smb_session(&self.smb.addr)
    }

    fn in_flight(&self, req: Value) -> InFlight {
        in_flight(&self.smb, req)
    }

    fn wait_logged(&self, needle: &str) {
        wait_logged(&self.log, needle);
    }

    fn wait_logged_times(&self, needle: &str, n: usize) {
        wait_logged_times(&self.log, needle, n);
    }
}

/// After a replay refused because the open's CLOSE came first, the
/// client replays again: the GUID names no open, and the CREATE runs
/// anew — a new open, with its own handle in filterd, whose share mode
/// holds (another client's CREATE that shares nothing is refused) and
/// whose CLOSE is made.
fn replay_opens_anew(h: &Hooked, c: &mut LineClient, sid: u64, replay: Value, fid: &Value) {
    let r = c.call(replay);
    assert_eq!(r["status"], "STATUS_SUCCESS", "the GUID names no open: {r}");
    assert_ne!(&r["file_id"], fid, "a new open: {r}");
    let new = r["file_id"].clone();
    assert_eq!(handle_paths(h.d.socket()), ["f"], "the new open's handle");
    let (mut o, osid) = h.session();
    let r = o.call(json!({"cmd": "CREATE", "session_id": osid, "path": "f",
        "access": ["read", "write"], "share": [], "disposition": "open"}));
    assert_eq!(
        r["status"], "STATUS_SHARING_VIOLATION",
        "the new open's share mode: {r}"
    );
    let r = c.call(close_req(&sid, &new));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(handle_paths(h.d.socket()).is_empty(), "closed in filterd");
}

/// The CLOSE came first even when it is made, its in-flight note gone,
/// while a replayed CREATE of the open is between filterd's answer (the
/// original handle) and its store — held there by the test hook
/// (`.hold-replay`, after the replay's handle query). The replay was
/// handed the open back with no handle behind it in filterd: its share
/// mode held nothing, and its CLOSE was `NoSuchHandle` (re-review rr41a
/// 1). Every close filterd made while a replay was in flight is noted
/// with a generation (`smbshim::closes_made`); the replay, refused, is
/// told to retry, and its next replay opens anew.
#[test]
fn smbshim_hands_out_no_open_whose_close_was_made_as_it_was_replayed() {
    let name = "smbshim-close-made-replay";
    let h = Hooked::start(name, &[]);
    let (mut c, sid) = h.session();
    let (create, fid) = durable_open_of_f(&mut c, sid);

    h.hold("replay");
    let mut replay = create;
    replay["replay"] = json!(true);
    let replayed = h.in_flight(replay.clone());
    h.wait_logged("test hook: a replayed CREATE waits before its store");
    let mut other = h.connect();
    let r = other.call(close_req(&sid, &fid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(handle_paths(h.d.socket()).is_empty(), "closed in filterd");
    h.release("replay");
    let r = answer(replayed, "the replay", 30);
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "the CLOSE came first and was made: {r}"
    );
    let r = c.call(json!({"cmd": "READ", "session_id": sid, "file_id": fid,
        "offset": 0, "length": 4}));
    assert_eq!(r["status"], "STATUS_FILE_CLOSED", "no open was stored: {r}");
    replay_opens_anew(&h, &mut c, sid, replay, &fid);
}

/// The same, with the close made while the replay is held before its
/// first check — right after filterd's answer, before its handle query
/// (the store hook itself, its release file away): that first check
/// refuses it, saying the CLOSE was made (without it, the handle query
/// would find no handle and refuse it for that, a round trip later).
#[test]
fn smbshim_refuses_a_replay_whose_close_was_made_before_its_handle_query() {
    let name = "smbshim-close-made-replay-early";
    let h = Hooked::start(name, &[]);
    let (mut c, sid) = h.session();
    let (create, fid) = durable_open_of_f(&mut c, sid);

    std::fs::remove_file(&h.release).expect("hold CREATEs filterd answered");
    let mut replay = create;
    replay["replay"] = json!(true);
    let replayed = h.in_flight(replay.clone());
    // The first CREATE logged it too, not held.
    h.wait_logged_times("test hook: a CREATE filterd answered waits for", 2);
    let mut other = h.connect();
    let r = other.call(close_req(&sid, &fid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    std::fs::write(&h.release, b"").expect("release the replay");
    let r = answer(replayed, "the replay", 30);
    assert_eq!(r["status"], "STATUS_FILE_NOT_AVAILABLE", "{r}");
    let why = r["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("CLOSE was made"),
        "refused by the first check, before the handle query: {r}"
    );
    replay_opens_anew(&h, &mut c, sid, replay, &fid);
}

/// The same, with the close made while the replay is held just before
/// its handle query (`.hold-query`): the query fails, the open is not
/// stored, and the replay must not let go of (detach) the handle — that
/// is the CLOSE's — nor keep the GUID: it is refused as the first check
/// would. Before (re-review rr41f 3) it detached the handle whatever a
/// CLOSE had done with it (here filterd refused that, the close made,
/// and smbshim logged it).
#[test]
fn smbshim_a_replay_whose_handle_query_fails_for_a_close_lets_nothing_go() {
    let name = "smbshim-close-made-replay-query";
    let h = Hooked::start(name, &[]);
    let (mut c, sid) = h.session();
    let (create, fid) = durable_open_of_f(&mut c, sid);

    h.hold("query");
    let mut replay = create;
    replay["replay"] = json!(true);
    let replayed = h.in_flight(replay.clone());
    h.wait_logged("test hook: a replayed CREATE waits before its handle query");
    let mut other = h.connect();
    let r = other.call(close_req(&sid, &fid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(handle_paths(h.d.socket()).is_empty(), "closed in filterd");
    h.release("query");
    let r = answer(replayed, "the replay", 30);
    assert_eq!(r["status"], "STATUS_FILE_NOT_AVAILABLE", "{r}");
    let text = std::fs::read_to_string(&h.log).unwrap_or_default();
    assert!(
        !text.contains("letting go of handle"),
        "the CLOSE's handle is not let go by the replay: {text}"
    );
    replay_opens_anew(&h, &mut c, sid, replay, &fid);
}

/// A LOGOFF waits for a CLOSE in flight (from another connection, filterd
/// stalled at its commit); meanwhile the session's home connection drops,
/// which ends the session. Before (re-review rr41a 2), that end detached
/// the session's other persistent open (`g`) as any lost connection's,
/// and the LOGOFF, woken, answered SUCCESS: `g` stayed disconnected,
/// holding its share mode for its durable timeout, its client told it was
/// closed. A LOGOFF received means the client wants the opens closed: the
/// session logging off is closed at its end, whatever ends it, and the
/// LOGOFF is told STATUS_USER_SESSION_DELETED, as one just after would be.
#[test]
fn smbshim_logoff_closes_its_opens_when_the_session_is_lost_as_it_waits() {
    const STALL: &str = "commit.before:3:sleep8000";
    let name = "logoff-waiting-session-lost";
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", STALL)]);
    let log = smbshim_log(&s);
    let smb = Shim::start_logged("smbshim", d.socket(), name, &[], &log);
    let (mut home, sid) = smb_session(&smb.addr);
    let fid = persistent_open(&mut home, sid, "f");
    persistent_open(&mut home, sid, "g");
    let close = in_flight(&smb, close_req(&sid, &fid));
    d.wait_stalled_at(STALL, Duration::from_secs(10));
    let logoff = in_flight(&smb, logoff_req(&sid));
    wait_logged(&log, &format!("LOGOFF of session {sid} waits"));
    drop(home);
    let mut c = LineClient::connect(&smb.addr);
    wait_for("the session ends", Duration::from_secs(10), || {
        let r = c.call(flush_req(&sid, &"x"));
        (r["status"] == "STATUS_USER_SESSION_DELETED").then_some(())
    });
    let r = answer(close, "the CLOSE", 60);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = answer(logoff, "the LOGOFF", 60);
    assert_eq!(
        r["status"], "STATUS_USER_SESSION_DELETED",
        "ended under it: {r}"
    );
    // g is closed by the lost connection's end of the session (smbshim's
    // `end_session`, as the waiting LOGOFF asked), one filterd call after
    // the session left the table; the LOGOFF, finding it ended, answers
    // without waiting for that. Left detached, g would stay listed for
    // its 60 s timeout.
    wait_for(
        "g closed as the LOGOFF asked, not left detached",
        Duration::from_secs(10),
        || handle_paths(d.socket()).is_empty().then_some(()),
    );
}

/// A LOGOFF that found an open of its session and a CLOSE of that open
/// (from another connection) race: the CLOSE takes it first — the LOGOFF
/// held by the test hook (`.hold-logoff`) between finding and taking it —
/// and waits in filterd (stalled at its commit). The LOGOFF was refused
/// at once, STATUS_FILE_NOT_AVAILABLE (re-review rr41a 4). It waits for
/// that close as for any other in flight, then ends the session.
#[test]
fn smbshim_logoff_waits_for_a_close_that_took_its_open_first() {
    const STALL: &str = "commit.before:2:sleep3000";
    let name = "logoff-close-race";
    let h = Hooked::start(name, &[("RKFILTER_FAILPOINTS", STALL)]);
    let (mut c, sid) = h.session();
    let fid = persistent_open(&mut c, sid, "f");

    h.hold("logoff");
    let logoff = h.in_flight(logoff_req(&sid));
    h.wait_logged("test hook: a LOGOFF found an open, waits");
    let close = h.in_flight(close_req(&sid, &fid));
    h.d.wait_stalled_at(STALL, Duration::from_secs(10));
    h.release("logoff");
    let r = answer(close, "the CLOSE", 60);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = answer(logoff, "the LOGOFF", 60);
    assert_eq!(r["status"], "STATUS_SUCCESS", "waited for the CLOSE: {r}");
    let text = std::fs::read_to_string(&h.log).unwrap_or_default();
    assert!(
        text.contains(&format!("LOGOFF of session {sid} waits")),
        "the LOGOFF waited"
    );
    assert!(handle_paths(h.d.socket()).is_empty(), "closed in filterd");
    let r = c.call(flush_req(&sid, &fid));
    assert_eq!(r["status"], "STATUS_USER_SESSION_DELETED", "ended: {r}");
}

/// Two LOGOFFs of one session (on two connections) both find its open
/// `f` — held there by the test hook (`.hold-logoff`) — and race for it
/// once released: one takes it (its close stalled in filterd at the
/// commit), the other finds it taken every time. That one is not refused
/// (STATUS_FILE_NOT_AVAILABLE, re-review rr41a 4) for the open the other
/// took first: it waits for that close as for any other in flight. One
/// ends the session; the other is told SUCCESS or, the session ended
/// under it, STATUS_USER_SESSION_DELETED. (Before rr41f F4 this raced
/// with no hook, and caught the defect in none of 20 runs.)
#[test]
fn smbshim_two_logoffs_of_a_session_both_wait_for_its_closes() {
    const STALL: &str = "commit.before:2:sleep3000";
    let name = "two-logoffs-wait";
    let h = Hooked::start(name, &[("RKFILTER_FAILPOINTS", STALL)]);
    let (mut home, sid) = h.session();
    let _fid = persistent_open(&mut home, sid, "f");
    h.hold("logoff");
    let logoff = || h.in_flight(logoff_req(&sid));
    let (l1, l2) = (logoff(), logoff());
    h.wait_logged_times("test hook: a LOGOFF found an open, waits", 2);
    h.release("logoff");
    let r1 = answer(l1, "LOGOFF 1", 60);
    let r2 = answer(l2, "LOGOFF 2", 60);
    let statuses = [r1["status"].clone(), r2["status"].clone()];
    assert!(
        statuses.contains(&json!("STATUS_SUCCESS"))
            && statuses
                .iter()
                .all(|s| s == "STATUS_SUCCESS" || s == "STATUS_USER_SESSION_DELETED"),
        "both waited, one ended the session: {r1} / {r2}"
    );
    assert!(handle_paths(h.d.socket()).is_empty(), "closed");
}

/// A LOGOFF finds the session's open `f` (held there, `.hold-logoff`);
/// a CLOSE from another connection takes it first (filterd stopped under
/// its close). The LOGOFF, released, finds it taken (held again there,
/// `.hold-lost`) while that close is undone (its commit fails): `f` is
/// back. The LOGOFF must close `f` itself, and its close is refused too
/// (`close.refuse`): the LOGOFF fails with that status and the session
/// stays, with `f`. Before (re-review rr41f F2), it saw no close in
/// flight any more, ended the session — `f` closed for good, the refusal
/// ignored — and answered SUCCESS.
#[test]
fn smbshim_logoff_closes_an_open_whose_racing_close_was_undone() {
    use nix::sys::signal::Signal;
    let name = "logoff-raced-close-undone";
    let h = Hooked::start(
        name,
        &[(
            "RKFILTER_FAILPOINTS",
            "commit.before:2:fail,close.refuse:2:fail",
        )],
    );
    let (mut home, sid) = h.session();
    let fid = persistent_open(&mut home, sid, "f");
    h.hold("logoff");
    h.hold("lost");
    let logoff = h.in_flight(logoff_req(&sid));
    h.wait_logged("test hook: a LOGOFF found an open, waits");
    h.d.stop();
    let close = h.in_flight(close_req(&sid, &fid));
    let mut c = h.connect();
    wait_for("the CLOSE takes the open", Duration::from_secs(10), || {
        let r = c.call(flush_req(&sid, &fid));
        (r["status"] != "STATUS_SUCCESS").then_some(())
    });
    h.release("logoff");
    h.wait_logged("test hook: a LOGOFF lost an open to another close");
    h.d.signal(Signal::SIGCONT);
    let r = answer(close, "the CLOSE", 60);
    assert_eq!(
        r["status"], "STATUS_INTERNAL_ERROR",
        "its commit failed: {r}"
    );
    let r = c.call(flush_req(&sid, &fid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "the open is back: {r}");
    h.release("lost");
    let r = answer(logoff, "the LOGOFF", 60);
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "its own close of f was refused: {r}"
    );
    let r = c.call(flush_req(&sid, &fid));
    assert_eq!(
        r["status"], "STATUS_SUCCESS",
        "the session stays, with f: {r}"
    );
    assert_eq!(handle_paths(h.d.socket()), ["f"], "f still open");
    let r = c.call(logoff_req(&sid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "logged off again: {r}");
    assert!(handle_paths(h.d.socket()).is_empty(), "closed");
}

/// A CLOSE that found its session (held there, `.hold-close`) as the
/// session's connection drops: the session's end takes it out and is
/// held before it sweeps its opens (`.hold-end`). The CLOSE, released,
/// must not take the open: the sweep is to (claimed, so a replay waits
/// for it). Before (re-review rr41f F1) it took it — no in-flight note
/// (no session to hold one), no claim — and its close was on its way to
/// filterd (held there, `.hold-taken`) when a replay of the open's GUID
/// on the client's other session got the handle back and stored it; the
/// close then closed it under that open (its CLOSE failed, no share mode
/// held). Then (378c88d) the CLOSE was told STATUS_FILE_CLOSED and the
/// sweep detached the persistent open (re-review rr41l A: the client
/// forgot it, its handle held till the durable timeout). Now the CLOSE
/// takes it out claimed, as the sweep would, and closes it in filterd:
/// STATUS_SUCCESS, no handle left; the replay opens anew.
#[test]
fn smbshim_takes_no_open_of_a_session_being_ended() {
    let name = "close-of-ending-session";
    let h = Hooked::start(name, &[]);
    let setup = session_setup_of_a_new_client();
    let (mut a, sid) = session(&h.smb, &setup);
    let (mut b, sid2) = session(&h.smb, &setup);
    let (create, fid) = durable_open_of_f(&mut a, sid);

    for what in ["close", "end", "taken"] {
        h.hold(what);
    }
    let mut close = h.in_flight(close_req(&sid, &fid));
    h.wait_logged("test hook: a CLOSE found its session, waits");
    drop(a);
    h.wait_logged("test hook: a session's end took it out, waits");
    h.release("close");
    // Taken (the defect) or answered (not taken): either, then go on.
    wait_for(
        "the CLOSE takes the open or answers",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&h.log).ok()?;
            (text.contains("test hook: a close took its open, waits")
                || close.early(Duration::ZERO))
            .then_some(())
        },
    );
    h.release("taken");
    let r = answer(close, "the CLOSE", 30);
    assert_eq!(
        r["status"], "STATUS_SUCCESS",
        "closed as asked, not left to the session's end: {r}"
    );
    assert!(
        handle_paths(h.d.socket()).is_empty(),
        "closed in filterd, not detached"
    );
    h.release("end");
    let mut replay = create;
    replay["replay"] = json!(true);
    replay["session_id"] = json!(sid2);
    let r = b.call(replay);
    assert_eq!(r["status"], "STATUS_SUCCESS", "opened anew: {r}");
    let new = r["file_id"].clone();
    let r = b.call(flush_req(&sid2, &new));
    assert_eq!(
        r["status"], "STATUS_SUCCESS",
        "the replayed open serves: {r}"
    );
    assert_eq!(handle_paths(h.d.socket()), ["f"], "its handle");
    let r = b.call(close_req(&sid2, &new));
    assert_eq!(
        r["status"], "STATUS_SUCCESS",
        "the replayed open closes: {r}"
    );
    assert!(handle_paths(h.d.socket()).is_empty(), "closed");
}

/// A LOGOFF lists its session's opens `f` and `g` (held there,
/// `.hold-listed`); a CLOSE from another connection takes the first
/// listed, X, before the LOGOFF looks at it (filterd stopped under its
/// close). The LOGOFF, released, finds X gone and waits before it closes
/// the other, Y (`.hold-logoff`), while X's close is undone (its commit
/// fails): X is back. The LOGOFF must list again and close X itself —
/// refused (`close.refuse`): it fails and the session stays, with X.
/// Before (re-review rr41l C) a pass that found X gone by its look
/// counted as done: the session's end closed X for good, the refusal
/// only logged, and the LOGOFF answered SUCCESS.
#[test]
fn smbshim_logoff_closes_an_open_a_close_took_after_its_listing() {
    logoff_after_a_close_took_a_listed_open("logoff-close-after-listing", false);
}

/// [`smbshim_logoff_closes_an_open_a_close_took_after_its_listing`], the
/// LOGOFF held at its listing past its bound ([`LETTING_GO_WAIT`]): its
/// pass that found X gone is its last, and X, back, must not be closed
/// for good by the session's end — the LOGOFF is not made
/// (STATUS_FILE_NOT_AVAILABLE), the session stays with X. Before
/// (re-review rr41l D) the session ended with X closed, told SUCCESS.
#[test]
fn smbshim_logoff_past_its_bound_keeps_an_open_a_close_took() {
    logoff_after_a_close_took_a_listed_open("logoff-close-past-bound", true);
}

/// smbshim's bound on a LOGOFF's wait for closes in flight.
const LETTING_GO_WAIT: Duration = Duration::from_secs(20);

fn logoff_after_a_close_took_a_listed_open(name: &str, past_bound: bool) {
    use nix::sys::signal::Signal;
    // Past the bound, X is not closed again by the LOGOFF.
    let failpoints = if past_bound {
        "commit.before:3:fail"
    } else {
        "commit.before:3:fail,close.refuse:3:fail"
    };
    let h = Hooked::start(name, &[("RKFILTER_FAILPOINTS", failpoints)]);
    let (mut c, sid) = h.session();
    let f = persistent_open(&mut c, sid, "f");
    let g = persistent_open(&mut c, sid, "g");
    // The LOGOFF lists its opens in the order of their ids.
    let (x, x_path) = if f.as_str() < g.as_str() {
        (f, "f")
    } else {
        (g, "g")
    };
    for what in ["listed", "logoff"] {
        h.hold(what);
    }
    let logoff = h.in_flight(logoff_req(&sid));
    let sent = std::time::Instant::now();
    h.wait_logged("test hook: a LOGOFF listed its opens, waits");
    if past_bound {
        // Not a readiness wait: the LOGOFF's bound is to pass.
        std::thread::sleep(
            (LETTING_GO_WAIT + Duration::from_secs(1)).saturating_sub(sent.elapsed()),
        );
    }
    h.d.stop();
    let close = h.in_flight(close_req(&sid, &x));
    wait_for("the CLOSE takes X", Duration::from_secs(10), || {
        let r = c.call(flush_req(&sid, &x));
        (r["status"] != "STATUS_SUCCESS").then_some(())
    });
    h.release("listed");
    h.wait_logged("test hook: a LOGOFF found an open, waits");
    h.d.signal(Signal::SIGCONT);
    let r = answer(close, "the CLOSE", 60);
    assert_eq!(
        r["status"], "STATUS_INTERNAL_ERROR",
        "its commit failed: {r}"
    );
    let r = c.call(flush_req(&sid, &x));
    assert_eq!(r["status"], "STATUS_SUCCESS", "X is back: {r}");
    h.release("logoff");
    let r = answer(logoff, "the LOGOFF", 60);
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "its own close of X refused, or past its bound not made: {r}"
    );
    let r = c.call(flush_req(&sid, &x));
    assert_eq!(
        r["status"], "STATUS_SUCCESS",
        "the session stays, with X: {r}"
    );
    assert_eq!(handle_paths(h.d.socket()), [x_path], "X still open");
    let r = c.call(logoff_req(&sid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "logged off again: {r}");
    assert!(handle_paths(h.d.socket()).is_empty(), "closed");
}

/// A LOGOFF that found its session's persistent open `f` (held there,
/// `.hold-logoff`) as the session's connection drops: the session's end
/// is held before its sweep (`.hold-end`), and a replay of `f`'s create
/// GUID on the client's other session moves the open there in place.
/// The LOGOFF, released, must not take it: it is the other session's
/// now. Before (re-review rr41l B) the close looked at the open's
/// session as it took it (the other, alive) and closed the replayed
/// open's handle in filterd under it.
#[test]
fn smbshim_logoff_takes_no_open_a_replay_moved_to_another_session() {
    let name = "logoff-of-moved-open";
    let h = Hooked::start(name, &[]);
    let setup = session_setup_of_a_new_client();
    let (mut a, sid) = session(&h.smb, &setup);
    let (mut b, sid2) = session(&h.smb, &setup);
    let guid = uuid::Uuid::new_v4().to_string();
    let create = durable_create_of_f(sid, &guid);
    let r = a.call(create.clone());
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");

    for what in ["logoff", "end"] {
        h.hold(what);
    }
    let logoff = h.in_flight(logoff_req(&sid));
    h.wait_logged("test hook: a LOGOFF found an open, waits");
    drop(a);
    h.wait_logged("test hook: a session's end took it out, waits");
    let mut replay = create;
    replay["replay"] = json!(true);
    replay["session_id"] = json!(sid2);
    let r = b.call(replay);
    assert_eq!(r["status"], "STATUS_SUCCESS", "moved to sid2: {r}");
    let moved = r["file_id"].clone();
    h.release("logoff");
    // The LOGOFF's end of the session waits for the end in progress.
    h.release("end");
    let r = answer(logoff, "the LOGOFF", 60);
    assert_eq!(
        r["status"], "STATUS_USER_SESSION_DELETED",
        "its session ended under it: {r}"
    );
    assert_eq!(handle_paths(h.d.socket()), ["f"], "the moved open's handle");
    let r = b.call(flush_req(&sid2, &moved));
    assert_eq!(r["status"], "STATUS_SUCCESS", "the moved open serves: {r}");
    let r = b.call(close_req(&sid2, &moved));
    assert_eq!(r["status"], "STATUS_SUCCESS", "the moved open closes: {r}");
    assert!(handle_paths(h.d.socket()).is_empty(), "closed");
}

/// A replayed CREATE on another session of the client, refused because
/// the open's CLOSE is in flight (filterd stopped), gives up the create
/// GUID it took over for its LOGOFF to close (`Unanswered::note`). Before
/// (re-review rr41a 3) it kept it: the close undone (its commit failed),
/// the open back, its session's connection lost (the persistent open
/// detached, for its client to RECONNECT), the replaying session's
/// LOGOFF closed it by GUID, and the client's RECONNECT found nothing.
#[test]
fn smbshim_a_replay_refused_for_a_close_in_flight_leaves_the_guid() {
    use nix::sys::signal::Signal;
    let name = "refused-replay-guid";
    let h = Hooked::start(name, &[("RKFILTER_FAILPOINTS", "commit.before:2:fail")]);
    let setup = session_setup_of_a_new_client();
    let (mut a, sid) = session(&h.smb, &setup);
    let (mut b, sid2) = session(&h.smb, &setup);
    let guid = uuid::Uuid::new_v4().to_string();
    let create = durable_create_of_f(sid, &guid);
    let r = a.call(create.clone());
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();

    h.hold("replay");
    let mut replay = create;
    replay["replay"] = json!(true);
    replay["session_id"] = json!(sid2);
    let replayed = h.in_flight(replay);
    h.wait_logged("test hook: a replayed CREATE waits before its store");
    h.d.stop();
    let close = h.in_flight(close_req(&sid, &fid));
    let mut c = h.connect();
    wait_for("the CLOSE takes the open", Duration::from_secs(10), || {
        let r = c.call(flush_req(&sid, &fid));
        (r["status"] != "STATUS_SUCCESS").then_some(())
    });
    h.release("replay");
    let r = answer(replayed, "the replay", 30);
    assert_eq!(
        r["status"], "STATUS_FILE_NOT_AVAILABLE",
        "the CLOSE is in flight: {r}"
    );
    h.d.signal(Signal::SIGCONT);
    let r = answer(close, "the CLOSE", 60);
    assert_eq!(
        r["status"], "STATUS_INTERNAL_ERROR",
        "its commit failed: {r}"
    );
    let r = c.call(flush_req(&sid, &fid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "the open is back: {r}");
    drop(a);
    wait_for("session 1 ends", Duration::from_secs(10), || {
        let r = c.call(flush_req(&sid, &"x"));
        (r["status"] == "STATUS_USER_SESSION_DELETED").then_some(())
    });
    assert_eq!(handle_paths(h.d.socket()), ["f"], "detached, not closed");
    let r = b.call(logoff_req(&sid2));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    // The LOGOFF's GUIDs are closed by a closer thread after its reply,
    // at once (a few ms): watched for 2 s, the handle must stay.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        assert_eq!(handle_paths(h.d.socket()), ["f"], "left for the RECONNECT");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut n, sid3) = session(&h.smb, &setup);
    let r = n.call(
        json!({"cmd": "RECONNECT", "session_id": sid3, "file_id": fid,
        "create_guid": guid}),
    );
    assert_eq!(r["status"], "STATUS_SUCCESS", "the client's RECONNECT: {r}");
    assert_eq!(handle_paths(h.d.socket()), ["f"]);
}
