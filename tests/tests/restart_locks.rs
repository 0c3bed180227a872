//! Issue 13 #1: locks stay mandatory across a filterd restart. A frontend
//! that was stopped (SIGSTOP) while filterd was killed and restarted, and
//! while another protocol's client took an exclusive byte-range lock, does
//! no unchecked I/O inside that lock when it continues: it re-learns which
//! files have locks when it resumes its handles, and refuses I/O with its
//! retry status until it has.
//!
//! Old code: the attachment dropped `Opened.locked` when it resumed handles
//! and the first-lock handshake only counted attached frontends, so the
//! thawed frontend's WRITE inside the lock returned success and the bytes
//! landed.

use std::time::Duration;

use base64::Engine as _;
use nix::sys::signal::Signal;
use rkfilter_tests::{smb_session, wait_for, Filterd, LineClient, Nfs, Scratch, Shim};
use serde_json::{json, Value};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn ok(r: Value) -> Value {
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    r
}

/// Break timeout: how long a first lock waits for a stopped frontend.
const BREAK_MS: &str = "1500";

fn start_filterd(s: &Scratch, break_ms: &str) -> Filterd {
    Filterd::start(s, &["--break-timeout-ms", break_ms], &[])
}

/// A file `f` of 100 dots, filterd, nfsshim and smbshim.
fn setup(name: &str) -> (Scratch, Filterd, Shim, Shim) {
    let s = Scratch::new(name);
    std::fs::write(s.root().join("f"), vec![b'.'; 100]).unwrap();
    let d = start_filterd(&s, BREAK_MS);
    let nfs = Shim::start("nfsshim", &s.socket(), &format!("nfs-{name}"));
    let smb = Shim::start("smbshim", &s.socket(), &format!("smb-{name}"));
    (s, d, nfs, smb)
}

/// Sends a smbl/1 request until the answer is not the retry status
/// (smbshim reattaching to the restarted filterd).
fn smb_patiently(m: &mut LineClient, req: Value) -> Value {
    wait_for("smbshim to answer", Duration::from_secs(20), || {
        let r = m.call(req.clone());
        (r["status"] != "STATUS_FILE_NOT_AVAILABLE").then_some(r)
    })
}

fn smb_open(m: &mut LineClient, sid: u64, path: &str, persistent: bool) -> Value {
    let mut req = json!({"cmd": "CREATE", "session_id": sid, "path": path,
                         "access": ["read", "write"], "share": ["read", "write", "delete"],
                         "disposition": "open"});
    if persistent {
        req["durable"] = json!({"create_guid": uuid::Uuid::new_v4().to_string(),
                                "persistent": true, "timeout_ms": 60000});
    }
    let r = smb_patiently(m, req);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    r["file_id"].clone()
}

/// The thawed nfsshim's client WRITEs inside the lock (bytes 10..30):
/// refused, after any number of DELAYs while nfsshim re-learns.
fn nfs_write_refused(n: &mut Nfs, sid: &Value) {
    let r = n
        .call_patiently(json!({"op": "WRITE", "stateid": sid, "offset": 12, "data": b64(b"XXXX")}));
    assert_eq!(
        r["status"], "NFS4ERR_LOCKED",
        "a WRITE inside the lock: {r}"
    );
}

/// The locked bytes 10..30 of `f` are still dots.
fn nothing_landed(s: &Scratch) {
    let bytes = std::fs::read(s.root().join("f")).unwrap();
    assert_eq!(
        &bytes[10..30],
        &[b'.'; 20][..],
        "nothing landed in the lock"
    );
}

/// nfsshim is the stopped frontend; an smbl/1 client locks; the nfsl/1
/// WRITE inside the lock is refused and nothing lands.
#[test]
fn a_stopped_nfsshim_learns_of_a_lock_granted_while_filterd_restarted() {
    let (s, mut d, nfs, smb) = setup("restart-locks-nfs");
    let mut n = Nfs::connect(&nfs.addr, "host-n", "1212121212121212");
    let sid = ok(n.open("p", "f", "both", "none", json!({})))["stateid"].clone();
    // Unlocked: nfsl/1 writes go straight to the file.
    ok(n.call(json!({"op": "WRITE", "stateid": sid, "offset": 0, "data": b64(b"n")})));

    nfs.signal(Signal::SIGSTOP);
    d.kill9();
    let _d2 = start_filterd(&s, BREAK_MS);
    let (mut m, msid) = smb_session(&smb.addr);
    let fid = smb_open(&mut m, msid, "f", false);
    let r = smb_patiently(
        &mut m,
        json!({"cmd": "LOCK", "session_id": msid, "file_id": fid,
               "locks": [{"offset": 10, "length": 20, "exclusive": true, "unlock": false}]}),
    );
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    nfs.signal(Signal::SIGCONT);

    // At once and until nfsshim has re-learned the lock: never NFS4_OK.
    nfs_write_refused(&mut n, &sid);
    let r = n.call_patiently(json!({"op": "READ", "stateid": sid, "offset": 10, "count": 5}));
    assert_eq!(r["status"], "NFS4ERR_LOCKED", "a READ inside the lock: {r}");
    nothing_landed(&s);
    // Outside the lock nfsl/1 I/O still works.
    ok(n.call_patiently(json!({"op": "WRITE", "stateid": sid, "offset": 50, "data": b64(b"ok")})));
    // Unlocked again: nfsshim hears it and writes there once more.
    let r = m.call(json!({"cmd": "LOCK", "session_id": msid, "file_id": fid,
               "locks": [{"offset": 10, "length": 20, "exclusive": true, "unlock": true}]}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    ok(n.call_patiently(json!({"op": "WRITE", "stateid": sid, "offset": 12, "data": b64(b"YY")})));
    let bytes = std::fs::read(s.root().join("f")).unwrap();
    assert_eq!(&bytes[12..14], b"YY");
}

/// The other way round: smbshim (with a persistent handle) is the stopped
/// frontend, an nfsl/1 client locks, the smbl/1 WRITE inside it is refused.
#[test]
fn a_stopped_smbshim_learns_of_a_lock_granted_while_filterd_restarted() {
    let (s, mut d, nfs, smb) = setup("restart-locks-smb");
    let (mut m, msid) = smb_session(&smb.addr);
    let fid = smb_open(&mut m, msid, "f", true);
    let write = |m: &mut LineClient, off: u64, data: &[u8]| {
        smb_patiently(
            m,
            json!({"cmd": "WRITE", "session_id": msid, "file_id": fid, "offset": off, "data": b64(data)}),
        )
    };
    assert_eq!(write(&mut m, 0, b"s")["status"], "STATUS_SUCCESS");
    let mut n = Nfs::connect(&nfs.addr, "host-n2", "3434343434343434");

    smb.signal(Signal::SIGSTOP);
    d.kill9();
    let _d2 = start_filterd(&s, BREAK_MS);
    let sid = ok(n.call_patiently(
        json!({"op": "OPEN", "owner": "p", "path": "f", "access": "both", "deny": "none"}),
    ))["stateid"]
        .clone();
    ok(n.call_patiently(
        json!({"op": "LOCK", "stateid": sid, "owner": "lo", "type": "write",
                                "offset": 10, "length": 20}),
    ));
    smb.signal(Signal::SIGCONT);

    let r = write(&mut m, 12, b"XXXX");
    assert_eq!(
        r["status"], "STATUS_FILE_LOCK_CONFLICT",
        "a WRITE inside the lock: {r}"
    );
    nothing_landed(&s);
    assert_eq!(write(&mut m, 50, b"ok")["status"], "STATUS_SUCCESS");
}

/// The first lock after the restart waits for the stopped frontend (it has
/// a handle of the file and is not attached) — here far less than the
/// 20 s break timeout, because the frontend resumes its handle as soon as
/// it continues, and that resume tells it of the waiting lock. Old code:
/// the lock did not wait at all.
#[test]
fn a_first_lock_waits_for_a_stopped_frontend_until_it_resumes() {
    let (s, mut d, nfs, smb) = setup("restart-locks-wait");
    let mut n = Nfs::connect(&nfs.addr, "host-n3", "5656565656565656");
    let sid = ok(n.open("p", "f", "both", "none", json!({})))["stateid"].clone();
    nfs.signal(Signal::SIGSTOP);
    d.kill9();
    let d2 = start_filterd(&s, "20000");
    let (mut m, msid) = smb_session(&smb.addr);
    let fid = smb_open(&mut m, msid, "f", false);
    let t0 = std::time::Instant::now();
    let id = m.send_only(
        "mid",
        json!({"cmd": "LOCK", "session_id": msid, "file_id": fid,
               "locks": [{"offset": 10, "length": 20, "exclusive": true, "unlock": false}]}),
    );
    d2.wait_log(
        "first lock waits for frontends to hear of it",
        Duration::from_secs(10),
    );
    nfs.signal(Signal::SIGCONT);
    let (r, _) = m.reply_to("mid", id).expect("the LOCK's reply");
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "the resume ended the wait, not the 20 s timeout: {:?}",
        t0.elapsed()
    );
    nfs_write_refused(&mut n, &sid);
    nothing_landed(&s);
}
