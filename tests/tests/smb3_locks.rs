//! Byte-range locks a real SMB 3 client (smbprotocol) takes through
//! rksmbd on a persistent handle hold against nfsl/1 and smbl/1 clients
//! across failures — rksmbd SIGKILLed (and filterd with it) while the
//! client is away — and the other way round, locks of those clients hold
//! against rksmbd's client, also after a filterd restart that rksmbd
//! slept through. Lock sequences (MS-SMB2 3.3.5.14) replayed after the
//! failover are recognised: a replayed LOCK never locks twice, a replayed
//! unlock never unlocks a range locked again since.

use std::time::Duration;

use base64::Engine as _;
use nix::sys::signal::Signal;
use rkfilter_tests::smb3::Dialogue;
use rkfilter_tests::{
    in_pwrite, nothing_landed, slow_syscalls, smb_patiently, smb_session, wait_for, Filterd, Nfs,
    RkSmbd, Scratch, Shim,
};
use serde_json::{json, Value};

/// filterd's break timeout: how long a lock waits for a frontend.
const BREAK_MS: &str = "15000";
const SUCCESS: &str = "0x0";
const LOCK_NOT_GRANTED: &str = "0xc0000055";
const FILE_LOCK_CONFLICT: &str = "0xc0000054";
const RANGE_NOT_LOCKED: &str = "0xc000007e";
const FILE_NOT_AVAILABLE: &str = "0xc0000467";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A file `f` of 100 dots, filterd, rksmbd, nfsshim and smbshim.
fn setup(name: &str) -> (Scratch, Filterd, RkSmbd, Shim, Shim) {
    let s = Scratch::new(name);
    std::fs::write(s.root().join("f"), vec![b'.'; 100]).unwrap();
    let d = Filterd::start(&s, &["--break-timeout-ms", BREAK_MS], &[]);
    let srv = RkSmbd::start(&s, "rksmbd", "data", &[("alice", "pw")]);
    let nfs = Shim::start("nfsshim", &s.socket(), &format!("nfs-{name}"));
    let smb = Shim::start("smbshim", &s.socket(), &format!("smb-{name}"));
    (s, d, srv, nfs, smb)
}

/// `lock_failover.py` against `srv`, with `f` open on a persistent
/// handle.
fn smb3_client_of_f(srv: &RkSmbd) -> Dialogue {
    smb3_client_opening(srv, "open f")
}

/// `lock_failover.py` against `srv`, told `open`.
fn smb3_client_opening(srv: &RkSmbd, open: &str) -> Dialogue {
    let mut script = Dialogue::start(srv, "lock_failover.py", Duration::from_secs(120));
    script.say(open);
    script.expect("opened");
    script
}

/// Sends `cmd` to the script and returns the status its answer line
/// (`WORD STATUS`) carries.
fn ask(script: &mut Dialogue, cmd: &str) -> String {
    script.say(cmd);
    let word = cmd.split(' ').next().unwrap_or_default();
    let line = script.expect(&format!("{word} "));
    line.rsplit(' ').next().unwrap_or_default().to_owned()
}

/// [`ask`], asserting the status is `want`.
fn said(script: &mut Dialogue, cmd: &str, want: &str) {
    let st = ask(script, cmd);
    assert_eq!(st, want, "{cmd}:\n{}", script.log);
}

/// [`ask`], again while rksmbd answers STATUS_FILE_NOT_AVAILABLE (it is
/// reattaching, or re-learning which files have locks).
fn ask_patiently(script: &mut Dialogue, cmd: &str) -> String {
    wait_for(
        "an answer other than FILE_NOT_AVAILABLE",
        Duration::from_secs(20),
        || {
            let st = ask(script, cmd);
            (st != FILE_NOT_AVAILABLE).then_some(st)
        },
    )
}

/// An nfsl/1 client of `nfsshim` as `owner` with `f` open for reading
/// and writing, and its stateid.
fn nfs_client_of_f(nfsshim: &Shim, owner: &str, verifier: &str) -> (Nfs, Value) {
    let mut n = Nfs::connect(&nfsshim.addr, owner, verifier);
    let sid = nfs_open(&mut n);
    (n, sid)
}

/// An nfsl/1 client with `f` open for reading and writing: its stateid.
fn nfs_open(n: &mut Nfs) -> Value {
    let r = n.call_patiently(
        json!({"op": "OPEN", "owner": "p", "path": "f", "access": "both", "deny": "none"}),
    );
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    r["stateid"].clone()
}

/// An nfsl/1 write LOCK of `offset`..+`length`: its status.
fn nfs_lock(n: &mut Nfs, sid: &Value, offset: u64, length: u64) -> Value {
    n.call_patiently(
        json!({"op": "LOCK", "stateid": sid, "owner": "lo", "type": "write",
                            "offset": offset, "length": length}),
    )
}

/// The SMB 3 client locks 10..30 (exclusive, sequence 1/1) and 50..60
/// (shared, 2/1) on a persistent handle and goes away; rksmbd is
/// SIGKILLed (and filterd too, when `filterd_too`). Meanwhile nfsl/1 and
/// smbl/1 clients can neither lock nor write inside; once rksmbd is back
/// the client resumes with DH2C and finds its locks kept.
fn smb3_locks_hold_while_rksmbd_is_down(name: &str, filterd_too: bool) {
    let (s, mut d, mut srv, nfsshim, smbshim) = setup(name);
    // Connected before the failure (a session survives it; DELAY while
    // nfsshim reattaches).
    let mut n = Nfs::connect(&nfsshim.addr, "host-n", "1212121212121212");
    let (mut m, msid) = smb_session(&smbshim.addr);
    let mut script = smb3_client_of_f(&srv);
    said(&mut script, "lock 10 20 excl 1 1", SUCCESS);
    said(&mut script, "lock 50 10 shared 2 1", SUCCESS);
    script.say("drop");
    script.expect("dropped");
    srv.shim.kill9_in_place();
    if filterd_too {
        d.kill9();
        d = Filterd::start(&s, &["--break-timeout-ms", BREAK_MS], &[]);
    }

    // rksmbd is down: the disconnected persistent handle's locks hold.
    let sid = nfs_open(&mut n);
    let r = nfs_lock(&mut n, &sid, 15, 5);
    assert_eq!(r["status"], "NFS4ERR_DENIED", "{r}");
    let r = n
        .call_patiently(json!({"op": "WRITE", "stateid": sid, "offset": 12, "data": b64(b"XXXX")}));
    assert_eq!(r["status"], "NFS4ERR_LOCKED", "{r}");
    let r = smb_patiently(
        &mut m,
        json!({"cmd": "CREATE", "session_id": msid, "path": "f", "access": ["read", "write"],
               "share": ["read", "write", "delete"], "disposition": "open"}),
    );
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let r = m.call(json!({"cmd": "LOCK", "session_id": msid, "file_id": fid,
        "locks": [{"offset": 12, "length": 4, "exclusive": true, "unlock": false}]}));
    assert_eq!(r["status"], "STATUS_LOCK_NOT_GRANTED", "{r}");
    let r = m.call(json!({"cmd": "WRITE", "session_id": msid, "file_id": fid,
        "offset": 12, "data": b64(b"YYYY")}));
    assert_eq!(r["status"], "STATUS_FILE_LOCK_CONFLICT", "{r}");
    nothing_landed(&s);

    // rksmbd is back; the client resumes its handle.
    srv = RkSmbd::start(&s, "rksmbd", "data", &[("alice", "pw")]);
    script.say(&format!("reconnect {}", srv.port()));
    script.expect("reconnected");
    // Replays of both LOCKs: recognised, nothing applied (a second
    // exclusive lock of the same range would be refused, a second shared
    // one would stay after one unlock).
    said(&mut script, "lock 10 20 excl 1 1", SUCCESS);
    said(&mut script, "lock 50 10 shared 2 1", SUCCESS);
    let r = nfs_lock(&mut n, &sid, 15, 5);
    assert_eq!(r["status"], "NFS4ERR_DENIED", "still locked: {r}");
    // Its own unlocks work, once.
    said(&mut script, "unlock 50 10 3 1", SUCCESS);
    said(&mut script, "unlock 50 10 4 1", RANGE_NOT_LOCKED);
    let r = nfs_lock(&mut n, &sid, 50, 10);
    assert_eq!(r["status"], "NFS4_OK", "one shared lock, one unlock: {r}");
    said(&mut script, "unlock 10 20 5 1", SUCCESS);
    // Locked again; a replay of the unlock changes nothing.
    said(&mut script, "lock 10 20 excl 6 1", SUCCESS);
    said(&mut script, "unlock 10 20 5 1", SUCCESS);
    let r = nfs_lock(&mut n, &sid, 15, 5);
    assert_eq!(r["status"], "NFS4ERR_DENIED", "the re-lock holds: {r}");
    said(&mut script, "write 12 SMB3", SUCCESS);
    nothing_landed_but(&s, b"SMB3");
    said(&mut script, "unlock 10 20 7 1", SUCCESS);
    let r = nfs_lock(&mut n, &sid, 15, 5);
    assert_eq!(r["status"], "NFS4_OK", "unlocked: {r}");
    script.say("done");
    script.finish();
    drop(d);
}

/// Only the SMB 3 client's own bytes landed at 12.
fn nothing_landed_but(s: &Scratch, own: &[u8]) {
    let bytes = std::fs::read(s.root().join("f")).unwrap();
    assert_eq!(&bytes[12..16], own);
    assert_eq!(&bytes[16..30], &[b'.'; 14][..], "nothing else landed");
}

#[test]
fn smb3_locks_hold_while_rksmbd_is_killed() {
    smb3_locks_hold_while_rksmbd_is_down("smb3-locks-rksmbd", false);
}

#[test]
fn smb3_locks_hold_while_rksmbd_and_filterd_are_killed() {
    smb3_locks_hold_while_rksmbd_is_down("smb3-locks-both", true);
}

/// The other way round: an nfsl/1 client's lock keeps rksmbd's client
/// out (STATUS_FILE_LOCK_CONFLICT) — also a lock asked for while filterd
/// was restarted and rksmbd was stopped (SIGSTOP), so that rksmbd was not
/// attached to hear of it; that lock waits for rksmbd's hello.
#[test]
fn nfs_locks_hold_against_rksmbd_across_a_filterd_restart() {
    let (s, mut d, srv, nfsshim, _smbshim) = setup("smb3-locks-reverse");
    let mut script = smb3_client_of_f(&srv);
    let (mut n, sid) = nfs_client_of_f(&nfsshim, "host-r", "3434343434343434");
    let r = nfs_lock(&mut n, &sid, 10, 5);
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    said(&mut script, "write 11 XX", FILE_LOCK_CONFLICT);
    said(&mut script, "lock 11 2 shared 1 1", LOCK_NOT_GRANTED);

    // rksmbd sleeps through a filterd restart; a new lock asked for
    // meanwhile waits for rksmbd (it checked I/O before the restart, and
    // may have some in flight) until rksmbd is back and says hello.
    srv.shim.signal(Signal::SIGSTOP);
    d.kill9();
    d = Filterd::start(&s, &["--break-timeout-ms", BREAK_MS], &[]);
    let t0 = std::time::Instant::now();
    let locker = std::thread::spawn(move || nfs_lock(&mut n, &sid, 20, 10));
    d.wait_log(
        "lock waits for the frontends seen before the restart",
        Duration::from_secs(10),
    );
    srv.shim.signal(Signal::SIGCONT);
    let r = locker.join().expect("the LOCK's thread");
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    assert!(
        t0.elapsed() < Duration::from_secs(12),
        "rksmbd's hello ended the wait, not the 15 s break timeout: {:?}",
        t0.elapsed()
    );
    // Never a write inside either lock, at once or later.
    for off in ["11", "22"] {
        let st = ask_patiently(&mut script, &format!("write {off} XX"));
        assert_eq!(st, FILE_LOCK_CONFLICT, "a write at {off}: {}", script.log);
    }
    nothing_landed(&s);
    let st = ask_patiently(&mut script, "write 40 ok");
    assert_eq!(st, SUCCESS, "{}", script.log);
    script.say("done");
    script.finish();
    drop(d);
}

/// A WRITE through rksmbd that the old filterd checked and let through is
/// still in its pwrite (strace holds it 3 s, and rksmbd's connect to the
/// new daemon 1.5 s) when filterd is SIGKILLed and restarted; an nfsl/1
/// LOCK over it is granted only after it landed (invariant 9: no frontend
/// writes a locked range unchecked, also across a restart).
#[test]
fn a_checked_rksmbd_write_in_flight_across_a_restart_lands_before_a_later_lock() {
    checked_write_in_flight_across_a_restart("smb3-locks-inflight", "open f");
}

/// The same through a plain open, which the restart forgets: the lock
/// waits for rksmbd because filterd remembered (`frontends.seen`) that it
/// checks I/O. Without that, the LOCK was granted at once and the WRITE
/// landed inside it.
#[test]
fn a_checked_rksmbd_write_through_a_plain_open_in_flight_across_a_restart_lands_first() {
    checked_write_in_flight_across_a_restart("smb3-locks-inflight-plain", "open f plain");
}

fn checked_write_in_flight_across_a_restart(name: &str, open: &str) {
    let (s, mut d, srv, nfsshim, _smbshim) = setup(name);
    let mut script = smb3_client_opening(&srv, open);
    let (mut n, sid) = nfs_client_of_f(&nfsshim, "host-i", "5656565656565656");
    let pid = srv.shim.pid();
    let _slow = slow_syscalls(
        pid,
        &s.dir.join("trace"),
        &[("pwrite64", 3_000_000), ("connect", 1_500_000)],
    );
    script.say("write 12 XXXX");
    wait_for(
        "the WRITE to reach its pwrite",
        Duration::from_secs(10),
        || in_pwrite(pid).then_some(()),
    );
    d.kill9();
    d = Filterd::start(&s, &["--break-timeout-ms", BREAK_MS], &[]);
    let r = nfs_lock(&mut n, &sid, 10, 20);
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    let at_grant = std::fs::read(s.root().join("f")).unwrap();
    assert_eq!(
        at_grant.get(12..16),
        Some(&b"XXXX"[..]),
        "the LOCK was granted before the checked WRITE landed"
    );
    assert_eq!(script.expect("write "), format!("write {SUCCESS}"));
    assert_eq!(std::fs::read(s.root().join("f")).unwrap(), at_grant);
    script.say("done");
    script.finish();
    drop(d);
}
