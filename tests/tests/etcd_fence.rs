//! A takeover while a filesystem change is in flight: node A (filterd +
//! smbshim) owns the etcd table and is frozen (SIGSTOP, every thread) in
//! the middle of a bracketed change — between its intent's commit and the
//! change, or between the change and the commit that ends it; its lease
//! lapses, node B (standby, same export) takes over and recovers the
//! intent, the client re-sends to B and goes on working there; then A is
//! continued. A must change nothing on disk after B took over (no
//! split-brain filesystem change) and acknowledge nothing; the client's
//! re-sent request is answered once, by B. Also: A not frozen but cut off
//! from etcd in the middle of a change, and B's recovery of a delete on
//! close whose file's inode number a new file took.
//!
//! Skips (with a note) when the `etcd` binary is missing, except under
//! `CI=true`.

use std::time::{Duration, Instant};

use base64::Engine as _;
use nix::sys::signal::Signal;
use rkfilter_tests::etcd::{etcd_available, node, Cluster};
use rkfilter_tests::{smb_patiently, wait_for, Filterd, LineClient, Scratch, Shim};
use serde_json::{json, Value};

const TTL: u64 = 2;

/// How long A's engine thread stalls at the armed point (`sleepMS`): the
/// test must freeze A within it, and continues A only after it, so that
/// A's engine thread is runnable the moment A runs again (the race the
/// fence decides) rather than still asleep while `lease-watch` exits.
const STALL: Duration = Duration::from_millis(3000);

/// The failpoint spec that stalls at `point`.
fn stall_at(point: &str) -> String {
    format!("{point}:sleep{}", STALL.as_millis())
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn start_node(
    s: &Scratch,
    url: &str,
    standby: bool,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Filterd {
    let ttl = TTL.to_string();
    let mut flags = vec!["--store", url, "--lease-ttl-secs", &ttl];
    if standby {
        flags.push("--standby");
    }
    flags.extend_from_slice(extra);
    Filterd::spawn(s, &flags, env)
}

fn session(c: &mut LineClient, client_guid: &str) -> u64 {
    let r = c.call(json!({"cmd": "SESSION_SETUP", "client_guid": client_guid, "user": "alice"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    r["session_id"].as_u64().expect("session id")
}

fn persistent_open(sid: u64, path: &str, disposition: &str, create_guid: &str) -> Value {
    json!({"cmd": "CREATE", "session_id": sid, "path": path,
           "access": ["read", "write", "delete"], "share": ["read", "write", "delete"],
           "disposition": disposition,
           "durable": {"create_guid": create_guid, "persistent": true, "timeout_ms": 60000}})
}

/// Two nodes on one export and an etcd; A owns the table, armed with
/// `failpoints`, B waits as standby.
struct TwoNodes {
    export: std::path::PathBuf,
    a: Filterd,
    b: Filterd,
    a_smb: Shim,
    _sa: Scratch,
    _sb: Scratch,
    cluster: Cluster,
    _shared: Scratch,
    /// When A's log showed it stalling ([`TwoNodes::freeze_a_then`]).
    stalled_at: Option<Instant>,
}

impl TwoNodes {
    fn start(name: &str, failpoints: &str) -> TwoNodes {
        TwoNodes::start_on(name, failpoints, 1)
    }

    /// [`TwoNodes::start`] on an etcd of `members` members; with more than
    /// one, A talks to member 0 only and B to the others (so stalling
    /// member 0 cuts A off while the cluster keeps its quorum).
    fn start_on(name: &str, failpoints: &str, members: usize) -> TwoNodes {
        TwoNodes::start_with(name, failpoints, members, &[])
    }

    /// [`TwoNodes::start_on`], B started with the extra flags `b_flags`.
    fn start_with(name: &str, failpoints: &str, members: usize, b_flags: &[&str]) -> TwoNodes {
        let shared = Scratch::new(&format!("{name}-export"));
        let export = shared.root();
        let cluster = Cluster::start(&shared, members);
        let prefix = format!("rk/{name}");
        let (a_url, b_url) = if members == 1 {
            (cluster.url(&prefix), cluster.url(&prefix))
        } else {
            let host = |i: usize| format!("127.0.0.1:{}", cluster.client_port(i));
            let rest: Vec<String> = (1..members).map(host).collect();
            (
                format!("etcd://{}/{prefix}", host(0)),
                format!("etcd://{}/{prefix}", rest.join(",")),
            )
        };
        let sa = node(&format!("{name}-a"), &export);
        let sb = node(&format!("{name}-b"), &export);
        let a = start_node(
            &sa,
            &a_url,
            false,
            &[],
            &[("RKFILTER_FAILPOINTS", failpoints)],
        );
        a.wait_ready();
        let b = start_node(&sb, &b_url, true, b_flags, &[]);
        b.wait_log("standby: waiting for the owner", Duration::from_secs(20));
        let a_smb = Shim::start("smbshim", a.socket(), "smb-1");
        TwoNodes {
            export,
            a,
            b,
            a_smb,
            _sa: sa,
            _sb: sb,
            cluster,
            _shared: shared,
            stalled_at: None,
        }
    }

    /// Waits until A's engine stalls at the armed failpoint `point`, then
    /// freezes all of A and waits for B to serve; B's smbshim.
    fn freeze_a_at(&mut self, point: &str) -> Shim {
        self.freeze_a_then(point, || ())
    }

    /// [`TwoNodes::freeze_a_at`], running `meanwhile` once A is frozen,
    /// before B takes over (B waits for A's lease to run out: seconds).
    fn freeze_a_then(&mut self, point: &str, meanwhile: impl FnOnce()) -> Shim {
        self.a.wait_log(
            &format!("failpoint {point}: stalling"),
            Duration::from_secs(10),
        );
        let stalled_at = Instant::now();
        self.stalled_at = Some(stalled_at);
        self.a.stop();
        assert!(
            stalled_at.elapsed() < STALL,
            "A was frozen only after its stall at {point} had ended (a loaded machine): \
             this run shows nothing"
        );
        meanwhile();
        self.b.wait_ready();
        Shim::start("smbshim", self.b.socket(), "smb-1")
    }

    /// Continues A; it must step down (75) having acknowledged nothing of
    /// request `mid` on `client`.
    fn thaw_a(&mut self, client: &mut LineClient, mid: u64) {
        // The stall is over (it began before its log line was read).
        if let Some(t) = self.stalled_at {
            wait_for("A's stall to have ended", STALL * 2, || {
                (t.elapsed() > STALL).then_some(())
            });
        }
        self.a.signal(Signal::SIGCONT);
        let st = self.a.wait_exit(Duration::from_secs(10));
        assert_eq!(
            st.code(),
            Some(75),
            "the stale owner steps down (exit 75); log:\n{}",
            self.a.log_text()
        );
        client.set_read_timeout(Duration::from_secs(2));
        if let Some((reply, _)) = client.reply_to("mid", mid) {
            assert_ne!(
                reply["status"], "STATUS_SUCCESS",
                "the stale owner acknowledged: {reply}"
            );
        }
        for (who, log) in [("A", self.a.log_text()), ("B", self.b.log_text())] {
            for l in log.lines().filter(|l| {
                ["failpoint", "interrupted", "owner", "stepping down"]
                    .iter()
                    .any(|w| l.contains(w))
            }) {
                eprintln!("{who}: {l}");
            }
        }
    }
}

/// A RENAME (SET_INFO rename, op id 5) of a persistent handle's file is in
/// flight on A when A is frozen at `point`. After B took over, the client
/// re-sends it to B (answered success, the file renamed once), then renames
/// the file back (op id 6). When A runs again, the file keeps the name B
/// gave it last: A did not rename it a second time.
fn rename_in_flight(name: &str, point: &str) {
    let mut n = TwoNodes::start(name, &stall_at(point));
    std::fs::write(n.export.join("r"), b"content").expect("write r");
    let client_guid = uuid::Uuid::new_v4().to_string();
    let create_guid = uuid::Uuid::new_v4().to_string();
    let mut c = LineClient::connect(&n.a_smb.addr);
    let sid = session(&mut c, &client_guid);
    let r = c.call(persistent_open(sid, "r", "open", &create_guid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let rename = |sid: u64, to: &str, op_id: u64| {
        json!({"cmd": "SET_INFO", "session_id": sid, "file_id": fid,
               "rename": {"to": to, "replace": false}, "op_id": op_id})
    };
    let mid = c.send_only("mid", rename(sid, "r2", 5));

    let b_smb = n.freeze_a_at(point);
    let mut c2 = LineClient::connect(&b_smb.addr);
    let sid2 = session(&mut c2, &client_guid);
    let r = smb_patiently(
        &mut c2,
        json!({"cmd": "RECONNECT", "session_id": sid2, "file_id": fid, "create_guid": create_guid}),
    );
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}\n{}", n.b.log_text());
    let mut again = rename(sid2, "r2", 5);
    again["replay"] = json!(true);
    let r = c2.call(again);
    assert_eq!(r["status"], "STATUS_SUCCESS", "the re-sent rename: {r}");
    assert!(n.export.join("r2").exists() && !n.export.join("r").exists());
    // Work acknowledged since the takeover: the file is renamed back.
    let r = c2.call(rename(sid2, "r", 6));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");

    n.thaw_a(&mut c, mid);
    assert!(
        n.export.join("r").exists() && !n.export.join("r2").exists(),
        "the stale owner renamed the file after node B took over; A's log:\n{}",
        n.a.log_text()
    );
    assert_eq!(std::fs::read(n.export.join("r")).expect("r"), b"content");
}

/// A truncating persistent open (`overwrite_if`) of a file is in flight on
/// A when A is frozen at `point`. After B took over (its recovery finishes
/// or drops the open), the client re-sends the CREATE to B and writes new
/// data through it. When A runs again, the new data is still there: A did
/// not truncate the file over work acknowledged by B.
fn truncating_open_in_flight(name: &str, point: &str) {
    let mut n = TwoNodes::start(name, &stall_at(point));
    std::fs::write(n.export.join("t"), b"old data").expect("write t");
    let client_guid = uuid::Uuid::new_v4().to_string();
    let create_guid = uuid::Uuid::new_v4().to_string();
    let mut c = LineClient::connect(&n.a_smb.addr);
    let sid = session(&mut c, &client_guid);
    let mid = c.send_only(
        "mid",
        persistent_open(sid, "t", "overwrite_if", &create_guid),
    );

    let b_smb = n.freeze_a_at(point);
    let mut c2 = LineClient::connect(&b_smb.addr);
    let sid2 = session(&mut c2, &client_guid);
    let mut again = persistent_open(sid2, "t", "overwrite_if", &create_guid);
    again["replay"] = json!(true);
    let r = smb_patiently(&mut c2, again);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}\n{}", n.b.log_text());
    let fid = r["file_id"].clone();
    let r = c2.call(
        json!({"cmd": "WRITE", "session_id": sid2, "file_id": fid, "offset": 0,
                           "data": b64(b"NEW"), "op_id": 2}),
    );
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = wait_for(
        "the write to reach the file",
        Duration::from_secs(5),
        || {
            let d = std::fs::read(n.export.join("t")).ok()?;
            (d == b"NEW").then_some(d)
        },
    );
    assert_eq!(r, b"NEW");

    n.thaw_a(&mut c, mid);
    assert_eq!(
        std::fs::read(n.export.join("t")).expect("t"),
        b"NEW",
        "the stale owner truncated the file after node B took over; A's log:\n{}",
        n.a.log_text()
    );
}

/// On A: file `d` (holding "old") opened persistent, marked delete on
/// close, and its CLOSE sent (the unlink is bracketed by an intent).
/// Returns the client, the CLOSE's mid and the file's inode number.
fn delete_on_close_sent(n: &TwoNodes) -> (LineClient, u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let d = n.export.join("d");
    std::fs::write(&d, b"old").expect("write d");
    let ino = std::fs::metadata(&d).expect("d").ino();
    let mut c = LineClient::connect(&n.a_smb.addr);
    let sid = session(&mut c, &uuid::Uuid::new_v4().to_string());
    let create_guid = uuid::Uuid::new_v4().to_string();
    let r = c.call(persistent_open(sid, "d", "open", &create_guid));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let r = c.call(json!({"cmd": "SET_INFO", "session_id": sid, "file_id": fid,
                          "delete_on_close": true, "op_id": 3}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let mid = c.send_only(
        "mid",
        json!({"cmd": "CLOSE", "session_id": sid, "file_id": fid}),
    );
    (c, mid, ino)
}

/// The delete on close of a persistent handle's file (its CLOSE) is in
/// flight on A when A is frozen at `point`. While A is frozen a local
/// process replaces the file by a new one of the same name (a new inode:
/// A's descriptors still hold the old one). B's recovery must not take
/// the new file for the old one, and A, when it runs again, must not
/// unlink it either (its own look at the name came before the freeze).
fn delete_on_close_in_flight(name: &str, point: &str) {
    let mut n = TwoNodes::start(name, &stall_at(point));
    let d = n.export.join("d");
    let (mut c, mid, _) = delete_on_close_sent(&n);
    let _b_smb = n.freeze_a_then(point, || {
        let _ = std::fs::remove_file(&d);
        std::fs::write(&d, b"LOCAL").expect("a local process writes a new d");
    });
    assert_eq!(
        std::fs::read(&d).ok().as_deref(),
        Some(&b"LOCAL"[..]),
        "node B's recovery removed the new file; B's log:\n{}",
        n.b.log_text()
    );

    n.thaw_a(&mut c, mid);
    assert_eq!(
        std::fs::read(&d).ok().as_deref(),
        Some(&b"LOCAL"[..]),
        "the stale owner removed the new file after node B took over; A's log:\n{}",
        n.a.log_text()
    );
}

/// Where A is frozen: after the intent's commit, before the step's
/// ownership check; after that check, right before the change itself
/// (where a frozen process once went on to make it); after the change,
/// before the commit that ends the intent.
const POINTS: [&str; 3] = ["intent.after_commit", "fs.before_change", "intent.after_fs"];

/// Runs `attack` (named `name`) with A frozen at each of [`POINTS`], or at
/// `RK_FENCE_POINT` alone when set; skipped without etcd.
fn at_every_point(name: &str, attack: fn(&str, &str)) {
    if !etcd_available(name) {
        return;
    }
    let points = match std::env::var("RK_FENCE_POINT") {
        Ok(p) => vec![p],
        Err(_) => POINTS.iter().map(|p| (*p).to_owned()).collect(),
    };
    for point in points {
        attack(name, &point);
    }
}

#[test]
fn a_delete_on_close_frozen_in_flight_is_not_made_after_a_takeover() {
    at_every_point("fence-doc", delete_on_close_in_flight);
}

/// The inode-reuse angle of a takeover: A dies (SIGKILL at
/// `intent.after_commit`) with a delete on close's intent committed and
/// the unlink not made, so its descriptors close; a local process removes
/// the file and the filesystem gives its inode number to a new file at the
/// same path before B takes over. B's recovery of the intent must take the
/// new file for another (its kernel handle's generation differs): the
/// remove counts as done, and the new file stays.
#[test]
fn a_delete_on_close_recovered_over_a_reused_inode_number_keeps_the_new_file() {
    use std::os::unix::fs::MetadataExt;
    if !etcd_available("fence-reuse") {
        return;
    }
    let mut n = TwoNodes::start("fence-reuse", "intent.after_commit:kill");
    let d = n.export.join("d");
    let (_c, _, old_ino) = delete_on_close_sent(&n);
    let st = n.a.wait_exit(Duration::from_secs(10));
    assert!(
        n.a.log_text()
            .contains("failpoint intent.after_commit: killing"),
        "{st:?}\n{}",
        n.a.log_text()
    );
    // Before B can claim (A's lease runs out first): the file goes and a
    // new one takes its inode number at the same path.
    std::fs::remove_file(&d).expect("remove d");
    let reused = (0..200).any(|i| {
        std::fs::write(&d, b"LOCAL").expect("write the new d");
        if std::fs::metadata(&d).expect("d").ino() == old_ino {
            return true;
        }
        std::fs::rename(&d, n.export.join(format!("other{i}"))).expect("rename");
        false
    });
    assert!(reused, "ext4 gave inode number {old_ino} to no new file");
    n.b.wait_ready();
    n.b.wait_log("recovery done", Duration::from_secs(5));
    assert_eq!(
        std::fs::read(&d).ok().as_deref(),
        Some(&b"LOCAL"[..]),
        "node B's recovery removed the file that reuses the inode number; B's log:\n{}",
        n.b.log_text()
    );
    assert!(
        n.b.log_text()
            .contains("recovery finished an interrupted remove"),
        "{}",
        n.b.log_text()
    );
}

/// A persistent create (`create`, marked: an `O_TMPFILE` linked under its
/// name) is in flight on A when A is frozen right before the link (after
/// the step's check). B takes over; nothing of the create is in the table.
/// When A runs again it must not link the file: after the takeover a
/// name appearing from nowhere would make a create through B collide.
#[test]
fn a_create_frozen_in_flight_is_not_made_after_a_takeover() {
    if !etcd_available("fence-create") {
        return;
    }
    let mut n = TwoNodes::start("fence-create", &stall_at("fs.before_change"));
    let mut c = LineClient::connect(&n.a_smb.addr);
    let sid = session(&mut c, &uuid::Uuid::new_v4().to_string());
    let create_guid = uuid::Uuid::new_v4().to_string();
    let mid = c.send_only("mid", persistent_open(sid, "n", "create", &create_guid));
    let _b_smb = n.freeze_a_at("fs.before_change");
    assert!(!n.export.join("n").exists());
    n.thaw_a(&mut c, mid);
    assert!(
        !n.export.join("n").exists(),
        "the stale owner created a file after node B took over; A's log:\n{}",
        n.a.log_text()
    );
}

/// Case 3 of the attack: A is not frozen but cut off from etcd (the one
/// member it talks to is stopped; the other two keep the quorum and B
/// talks to them) while its engine thread is in the middle of a truncating
/// open, past the step's check, stalled longer than the lease
/// ([`STALL`], lease 2 s). A's `lease-watch` ends the
/// process at its margin, before etcd can let B claim, and the stalled
/// thread dies with it: the file is untouched when A has exited, B serves
/// after A's exit and finishes the interrupted overwrite itself, and A
/// acknowledged nothing. (A guard: no fix was needed.)
#[test]
fn an_owner_cut_off_from_etcd_mid_change_stops_before_the_takeover() {
    if !etcd_available("fence-cut") {
        return;
    }
    let mut n = TwoNodes::start_on("fence-cut", &stall_at("fs.before_change"), 3);
    std::fs::write(n.export.join("t"), b"old data").expect("write t");
    let mut c = LineClient::connect(&n.a_smb.addr);
    let sid = session(&mut c, &uuid::Uuid::new_v4().to_string());
    let create_guid = uuid::Uuid::new_v4().to_string();
    let mid = c.send_only(
        "mid",
        persistent_open(sid, "t", "overwrite_if", &create_guid),
    );
    n.a.wait_log(
        "failpoint fs.before_change: stalling",
        Duration::from_secs(10),
    );
    let t0 = Instant::now();
    n.cluster.signal(0, Signal::SIGSTOP);
    let st = n.a.wait_exit(Duration::from_secs(15));
    let a_exit = t0.elapsed();
    let at_exit = std::fs::read(n.export.join("t")).expect("t");
    let b_claimed_first = n.b.log_text().contains("owner of the etcd table url");
    n.b.wait_ready();
    let b_ready = t0.elapsed();
    n.cluster.signal(0, Signal::SIGCONT);
    eprintln!("A cut off: exited at {a_exit:?}, B served at {b_ready:?}");
    assert_eq!(st.code(), Some(75), "{}", n.a.log_text());
    assert!(
        n.a.log_text().contains("stepping down"),
        "{}",
        n.a.log_text()
    );
    assert_eq!(at_exit, b"old data", "A truncated the file once cut off");
    assert!(!b_claimed_first, "B took over before A had stopped");
    c.set_read_timeout(Duration::from_secs(2));
    if let Some((reply, _)) = c.reply_to("mid", mid) {
        assert_ne!(reply["status"], "STATUS_SUCCESS", "{reply}");
    }
    assert!(
        n.b.log_text()
            .contains("recovery finished an interrupted overwrite"),
        "{}",
        n.b.log_text()
    );
}

#[test]
fn a_rename_frozen_in_flight_is_not_made_after_a_takeover() {
    at_every_point("fence-rename", rename_in_flight);
}

#[test]
fn a_truncating_open_frozen_in_flight_is_not_made_after_a_takeover() {
    at_every_point("fence-trunc", truncating_open_in_flight);
}

/// Review rvnode 1: node A's filterd is frozen past its lease while its
/// smbshim and nfsshim run on, each with a handle opened before the
/// freeze (alice: `f` through smbshim, `g` through nfsshim). B takes
/// over; bob opens both through B's smbshim, locks `f` exclusively and
/// writes both. Then alice writes each through A's frontends. Neither
/// write may land, nor be answered success: on an etcd store filterd
/// withholds lock hints ([`libfilter::proto::FEATURE_FENCED_IO`]), so the
/// frontends check each read and write with the frozen daemon, which
/// never answers and, continued, steps down without acting. (Before, a
/// file with no lock hint was written unchecked through the descriptor
/// filterd had passed: smbshim answered STATUS_SUCCESS with alice's
/// bytes inside bob's lock, over his acknowledged data.)
#[test]
fn a_frozen_owners_frontends_write_nothing_after_a_takeover() {
    if !etcd_available("fence-io") {
        return;
    }
    // B holds opens for A's frontends (alive, never attached to B) only
    // this long: alice writes soon after the takeover.
    let mut n = TwoNodes::start_with("fence-io", "", 1, &["--break-timeout-ms", "2000"]);
    let a_nfs = Shim::start("nfsshim", n.a.socket(), "nfs-1");
    std::fs::write(n.export.join("g"), b"nfs-1-nfs-1-nfs-").expect("write g");
    let mut c = LineClient::connect(&n.a_smb.addr);
    let sid = session(&mut c, &uuid::Uuid::new_v4().to_string());
    let r = c.call(persistent_open(
        sid,
        "f",
        "create",
        &uuid::Uuid::new_v4().to_string(),
    ));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let write = |data: &[u8]| json!({"cmd": "WRITE", "session_id": sid, "file_id": fid, "offset": 0, "data": b64(data)});
    let r = c.call(write(b"alice-1-alice-1-"));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let mut nfs = rkfilter_tests::Nfs::connect(&a_nfs.addr, "host-a", "00000000000000aa");
    let r = nfs.open("o1", "g", "both", "none", json!({}));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    let stateid = r["stateid"].clone();
    let nfs_write =
        |data: &[u8]| json!({"op": "WRITE", "stateid": stateid, "offset": 0, "data": b64(data)});
    let r = nfs.call(nfs_write(b"alice-nfs-alice-"));
    assert_eq!(r["status"], "NFS4_OK", "{r}");

    n.a.stop();
    let t0 = Instant::now();
    n.b.wait_ready();
    eprintln!("B serves at {:?}", t0.elapsed());
    let b_smb = Shim::start("smbshim", n.b.socket(), "smb-2");
    let mut bob = LineClient::connect(&b_smb.addr);
    let bsid = session(&mut bob, &uuid::Uuid::new_v4().to_string());
    let mut bob_writes = |path: &str, data: &[u8], lock: bool| {
        let r = bob.call(json!({"cmd": "CREATE", "session_id": bsid, "path": path,
                                "access": ["read", "write"], "share": ["read", "write", "delete"],
                                "disposition": "open"}));
        assert_eq!(r["status"], "STATUS_SUCCESS", "bob's open of {path}: {r}");
        let bfid = r["file_id"].clone();
        if lock {
            let r = bob.call(json!({"cmd": "LOCK", "session_id": bsid, "file_id": bfid,
                                    "locks": [{"offset": 0, "length": 100, "exclusive": true, "unlock": false}]}));
            assert_eq!(r["status"], "STATUS_SUCCESS", "bob's lock: {r}");
        }
        let r = bob.call(json!({"cmd": "WRITE", "session_id": bsid, "file_id": bfid,
                                "offset": 0, "data": b64(data)}));
        assert_eq!(r["status"], "STATUS_SUCCESS", "bob's write of {path}: {r}");
    };
    bob_writes("f", b"BOB-LOCKED-DATA!", true);
    bob_writes("g", b"BOB-WROTE-NFS-G!", false);
    eprintln!("bob wrote at {:?}", t0.elapsed());

    // alice writes through A's frontends; A is still frozen.
    let mid = c.send_only("mid", write(b"STALE-SMBSHIM-A!"));
    nfs.seqid += 1;
    let mut req = nfs_write(b"STALE-NFSSHIM-A!");
    req["seq"] = json!({"sessionid": nfs.sessionid, "slot": 0, "seqid": nfs.seqid});
    let xid = nfs.c.send_only("xid", req);
    // Nor is a read served (it would show data B may be changing).
    let read_mid = c.send_only(
        "mid",
        json!({"cmd": "READ", "session_id": sid, "file_id": fid, "offset": 0, "length": 16}),
    );
    n.a.signal(Signal::SIGCONT);
    let st = n.a.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(75), "{}", n.a.log_text());
    // A is gone: both frontends answer now (if not before) or, told
    // that filterd stepped down, close their clients' connections
    // (`Event::SteppingDown`) — never success, and neither wrote.
    let closed = || json!({"status": "connection closed"});
    c.set_read_timeout(Duration::from_secs(30));
    let smb = c.reply_to("mid", mid).map_or_else(closed, |(r, _)| r);
    let smb_read = c.reply_to("mid", read_mid).map_or_else(closed, |(r, _)| r);
    nfs.c.set_read_timeout(Duration::from_secs(30));
    let nfs_r = nfs.c.reply_to("xid", xid).map_or_else(closed, |(r, _)| r);
    eprintln!(
        "A's smbshim answered {smb} and {smb_read}, its nfsshim {nfs_r} ({:?})",
        t0.elapsed()
    );
    let read =
        |p: &str| String::from_utf8_lossy(&std::fs::read(n.export.join(p)).expect(p)).into_owned();
    let (f, g) = (read("f"), read("g"));
    assert!(
        smb["status"] != "STATUS_SUCCESS"
            && smb_read["status"] != "STATUS_SUCCESS"
            && nfs_r["status"] != "NFS4_OK"
            && f == "BOB-LOCKED-DATA!"
            && g == "BOB-WROTE-NFS-G!",
        "the stale node's frontends acknowledged or wrote after the takeover: \
         smbshim {smb}, read {smb_read}, f {f:?} (bob's lock holds [0, 100)); \
         nfsshim {nfs_r}, g {g:?}"
    );
}

/// Review rvnode, finding 3: rksmbd on node A kept its clients'
/// connections after A's filterd lost the ownership of the table (frozen
/// past its lease while B took over, then continued: exit 75) and
/// answered them STATUS_FILE_NOT_AVAILABLE for ever, which an SMB 3
/// client replays on the same connection — it never reached B. Now
/// filterd tells its frontends it steps down (`Event::SteppingDown`), and
/// rksmbd closes its client connections (saying so at warn level) and
/// closes new ones at once until its filterd serves again.
#[test]
fn rksmbd_lets_go_of_its_clients_when_its_filterd_steps_down() {
    use std::io::Read;
    if !etcd_available("fence-down") {
        return;
    }
    let shared = Scratch::new("fence-down-export");
    let export = shared.root();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url("rk/fence-down");
    let sa = node("fence-down-a", &export);
    let sb = node("fence-down-b", &export);
    let mut a = start_node(&sa, &url, false, &[], &[]);
    a.wait_ready();
    let b = start_node(&sb, &url, true, &[], &[]);
    b.wait_log("standby: waiting for the owner", Duration::from_secs(20));
    let (smb, log) = rkfilter_tests::RkSmbd::start_logged(
        &sa,
        "smb-1",
        "data",
        &[("alice", "pw")],
        &[("RUST_LOG", "warn")],
    );
    let mut client = std::net::TcpStream::connect(&smb.shim.addr).expect("connect to rksmbd A");
    // The shims let go of theirs too.
    let smbshim = Shim::start("smbshim", a.socket(), "smb-2");
    let nfsshim = Shim::start("nfsshim", a.socket(), "nfs-1");
    let mut shim_clients: Vec<_> = [&smbshim, &nfsshim]
        .iter()
        .map(|s| std::net::TcpStream::connect(&s.addr).expect("connect to a shim on A"))
        .collect();
    a.stop();
    b.wait_ready();
    a.signal(Signal::SIGCONT);
    let st = a.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(75), "A steps down; log:\n{}", a.log_text());
    // Closed by rksmbd, not left open: EOF (or a reset) within seconds.
    let closed = |c: &mut std::net::TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    assert!(
        closed(&mut client),
        "rksmbd A kept its client's connection after its filterd stepped down"
    );
    for (c, which) in shim_clients.iter_mut().zip(["smbshim", "nfsshim"]) {
        assert!(
            closed(c),
            "{which} on A kept its client's connection after its filterd stepped down"
        );
    }
    let mut late = std::net::TcpStream::connect(&smb.shim.addr).expect("connect to rksmbd A");
    assert!(
        closed(&mut late),
        "rksmbd A served a new client while its filterd is gone for good"
    );
    // Logged after the connections are closed, on rksmbd's own time.
    rkfilter_tests::wait_logged(&log, "filterd stepped down");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("WARN") && text.contains("filterd stepped down"),
        "rksmbd said nothing at warn level:\n{text}"
    );
}

/// Review rvnode, finding 5: a frontend started beside a `filterd
/// --standby` gave up after 30 s (exit 1), since the standby serves only
/// once it owns the table. With `--filterd-wait 0` it waits without
/// limit (saying so), and serves once the standby has taken over.
#[test]
fn a_frontend_beside_a_standby_waits_for_it_to_take_over() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    if !etcd_available("fence-wait") {
        return;
    }
    let shared = Scratch::new("fence-wait-export");
    let export = shared.root();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url("rk/fence-wait");
    let sa = node("fence-wait-a", &export);
    let sb = node("fence-wait-b", &export);
    let mut a = start_node(&sa, &url, false, &[], &[]);
    a.wait_ready();
    let b = start_node(&sb, &url, true, &[], &[]);
    b.wait_log("standby: waiting for the owner", Duration::from_secs(20));
    let err = sb.dir.join("smbshim-b.err");
    let mut shim = Command::new(rkfilter_tests::bin("smbshim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--instance",
            "smb-1",
            "--filterd-wait",
            "0",
        ])
        .arg("--filter")
        .arg(sb.socket())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("smbshim B");
    wait_for("smbshim B to say it waits", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&err).ok()?;
        text.contains("waiting without limit").then_some(())
    });
    a.kill9();
    b.wait_ready();
    let mut line = String::new();
    let mut out = std::io::BufReader::new(shim.stdout.take().expect("stdout"));
    let _ = out.read_line(&mut line);
    let _ = shim.kill();
    let _ = shim.wait();
    assert!(
        line.starts_with("listening on "),
        "smbshim B did not serve once B took over: {line:?}; stderr:\n{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
}
