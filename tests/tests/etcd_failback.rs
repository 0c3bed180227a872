//! A fail-back between two nodes on the etcd table, with the first
//! node's rksmbd alive throughout (rvnode finding 3). Node A (filterd +
//! rksmbd, instance `rksmbd`) owns the table; node B waits as standby.
//! Bob holds a byte-range lock on `f`, alice's blocking LOCK of the same
//! range waits on rksmbd A. filterd A is frozen (SIGSTOP) past its lease;
//! B takes over, alice and bob reconnect (DH2C) to rksmbd B, bob unlocks.
//! filterd A is killed (a filterd continued would step down and tell
//! rksmbd A, which then lets go of its clients; a killed one says
//! nothing), started again as standby, and node B dies: A owns the table again, and rksmbd A — whose clients'
//! old connections are still open and silent — reattaches to it.
//!
//! Its reattach must not take back alice's handle, which rksmbd B
//! attached since: before, the stale LOCK pending on alice's old
//! connection was granted through it (bob's lock then refused, and
//! alice's DH2C from a new connection STATUS_OBJECT_NAME_NOT_FOUND, the
//! handle attached to the stale connection). Now the reattach finds the
//! handle lost, rksmbd forgets the open and ends the LOCK
//! STATUS_FILE_CLOSED, bob locks, and alice reconnects.
//!
//! The same fail-back with nfsshim (review rvnfsnode finding 1): nfsshim
//! A stays up while filterd A is lost (killed, or stopped past its lease
//! and stepping down when continued), nfsshim B serves alice — who
//! writes, opens, renames, removes, closes on B — and carol, a client
//! made on B; then A owns the table again. nfsshim A must read its tables
//! again before it serves: before, it answered from stale memory (the
//! re-sent RENAME and REMOVE `NFS4ERR_NOENT`, the guarded OPEN run
//! again, B's stateids `NFS4ERR_BAD_STATEID`, carol unknown) and deleted
//! every open state's record — of dave too, who never used B — leaving
//! the handles disconnected with their share modes and locks.
//!
//! And a lease lowered on B while alice's holder was disconnected there
//! (rvping finding 2) is told to her at rksmbd A's (or smbshim A's)
//! reattach, which resumes her handle onto her untouched connection: a
//! break without an acknowledgment before her READ is answered.
//!
//! Skips (with a note) when the `etcd` binary is missing, except under
//! `CI=true`.

use std::time::{Duration, Instant};

use rkfilter_tests::etcd::{etcd_available, node_filterd, owner_and_standby, Cluster};
use rkfilter_tests::smb3::Dialogue;
use rkfilter_tests::{LineClient, RkSmbd, Scratch, Shim};
use serde_json::{json, Value};

const TTL: &str = "2";
const USERS: &[(&str, &str)] = &[("alice", "pw")];
const FILE_CLOSED: &str = "0xc0000128";

/// `lock_failover.py` against `srv` with `f` open on a persistent handle
/// (its own client GUID).
fn client_of_f(srv: &RkSmbd) -> Dialogue {
    let mut script = Dialogue::start(srv, "lock_failover.py", Duration::from_secs(120));
    script.say("open f");
    script.expect("opened");
    script
}

/// Sends `cmd`; the last word of the answer line starting with `word`.
fn ask(script: &mut Dialogue, cmd: &str, word: &str) -> String {
    script.say(cmd);
    let line = script.expect(word);
    line.rsplit(' ').next().unwrap_or_default().to_owned()
}

/// Reconnects (DH2C) the script's handle over a new connection to `srv`:
/// the answer line.
fn reconnect(script: &mut Dialogue, srv: &RkSmbd) -> String {
    script.say(&format!("reconnect {}", srv.port()));
    loop {
        let line = script.expect("re");
        if line.starts_with("reconnected") || line.starts_with("refused") {
            return line;
        }
    }
}

/// The fail-back, with bob's lock and alice's blocking LOCK pending on
/// her old connection when `pending_lock`, else alice alone (her old
/// connection open and silent, holding the open).
fn fail_back(name: &str, pending_lock: bool) {
    if !etcd_available(name) {
        return;
    }
    let shared = Scratch::new(&format!("{name}-export"));
    let export = shared.root();
    std::fs::write(export.join("f"), vec![b'.'; 100]).unwrap();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url(&format!("rk/{name}"));
    let (sa, mut a, sb, mut b) = owner_and_standby(name, &export, &url, TTL, &[]);
    let rksmbd_a = RkSmbd::start(&sa, "rksmbd", "data", USERS);

    // Bob locks [0,10); alice's blocking LOCK of it waits on rksmbd A.
    let mut bob = pending_lock.then(|| client_of_f(&rksmbd_a));
    if let Some(bob) = bob.as_mut() {
        assert_eq!(ask(bob, "lock 0 10 excl 1 1", "lock "), "0x0");
    }
    let mut alice = client_of_f(&rksmbd_a);
    if pending_lock {
        assert_eq!(ask(&mut alice, "blocking 0 10 1 1", "blocking "), "0x103");
    }

    // A freezes past its lease; B takes over; the clients move to B
    // (alice keeps her old connection to rksmbd A open), bob unlocks.
    a.stop();
    if let Some(bob) = bob.as_mut() {
        assert_eq!(ask(bob, "drop", "dropped"), "dropped");
    }
    b.wait_ready();
    let rksmbd_b = RkSmbd::start(&sb, "rksmbd", "data", USERS);
    let r = reconnect(&mut alice, &rksmbd_b);
    assert!(
        r.starts_with("reconnected"),
        "alice on B: {r}\n{}",
        alice.log
    );
    if let Some(bob) = bob.as_mut() {
        let r = reconnect(bob, &rksmbd_b);
        assert!(r.starts_with("reconnected"), "bob on B: {r}\n{}", bob.log);
        assert_eq!(ask(bob, "unlock 0 10 0 0", "unlock "), "0x0");
    }

    // A is killed while frozen (were it continued, it would step down
    // and tell rksmbd A, which would then close its clients' connections:
    // `Event::SteppingDown`; a killed filterd says nothing), comes back
    // as standby; B dies; A owns again, and rksmbd A (alive all along)
    // reattaches.
    a.kill9();
    let a2 = node_filterd(&sa, &url, TTL, true, &[]);
    a2.wait_log("standby: waiting for the owner", Duration::from_secs(20));
    rksmbd_b.shim.kill9();
    b.kill9();
    a2.wait_ready();

    if let Some(bob) = bob.as_mut() {
        // The LOCK that waited on alice's old connection is not granted
        // through the handle she reconnected on B: it ends.
        let st = ask(&mut alice, "final", "final ");
        assert_eq!(
            st,
            FILE_CLOSED,
            "alice's stale pending LOCK after the fail-back:\n{}\nfilterd A:\n{}",
            alice.log,
            a2.log_text()
        );
        // Bob reconnects to rksmbd A and locks the range.
        let r = reconnect(bob, &rksmbd_a);
        assert!(
            r.starts_with("reconnected"),
            "bob back on A: {r}\n{}",
            bob.log
        );
        assert_eq!(ask(bob, "lock 0 10 excl 2 1", "lock "), "0x0");
    }
    // Alice reconnects to rksmbd A from a new connection.
    let r = reconnect(&mut alice, &rksmbd_a);
    assert!(
        r.starts_with("reconnected"),
        "alice back on A: {r}\n{}",
        alice.log
    );
    // Her old connection, still open, no longer reaches the handle: a
    // WRITE through its open is refused, nothing lands.
    assert_eq!(
        ask(&mut alice, "firstwrite 50 STALE", "firstwrite "),
        FILE_CLOSED,
        "{}",
        alice.log
    );
    let data = std::fs::read(export.join("f")).unwrap();
    assert!(
        !data.windows(5).any(|w| w == b"STALE"),
        "the stale connection wrote"
    );
    for c in bob.iter_mut().chain([&mut alice]) {
        c.say("done");
        c.finish();
    }
    drop(cluster);
}

/// With a blocking LOCK pending on the old connection: it ends, bob
/// locks, alice reconnects.
#[test]
fn a_fail_back_ends_a_lock_pending_on_a_handle_reconnected_elsewhere() {
    fail_back("failback-lock", true);
}

/// Without: the old connection's open is forgotten (its WRITE refused),
/// and alice reconnects from a new one.
#[test]
fn a_fail_back_does_not_give_rksmbd_a_handle_its_client_reconnected_elsewhere() {
    fail_back("failback-open", false);
}

/// An nfsl/1 client with a session and a client-side slot table, at
/// nfsshim `addr`; it reconnects when a connection is closed (nfsshim
/// let go of its clients).
struct Nfs {
    addr: String,
    c: Option<LineClient>,
    xid: u64,
    sessionid: String,
    /// Each slot's last seqid.
    last: [u64; 4],
}

impl Nfs {
    fn new(addr: &str, owner: &str, verifier: &str) -> Nfs {
        let mut n = Nfs {
            addr: addr.to_owned(),
            c: None,
            xid: 0,
            sessionid: String::new(),
            last: [0; 4],
        };
        let r = n.ask(json!({"op": "EXCHANGE_ID", "owner": owner, "verifier": verifier}));
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        let r = n.ask(json!({"op": "CREATE_SESSION", "clientid": r["clientid"]}));
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        n.sessionid = r["sessionid"].as_str().unwrap().to_owned();
        n
    }

    /// Talks to the nfsshim at `addr` from now on.
    fn move_to(&mut self, addr: &str) {
        addr.clone_into(&mut self.addr);
        self.c = None;
    }

    /// One request's reply (None: the connection was closed).
    fn once(&mut self, req: &Value) -> Option<Value> {
        self.xid += 1;
        let mut req = req.clone();
        req["xid"] = json!(self.xid);
        let c = self
            .c
            .get_or_insert_with(|| LineClient::connect(&self.addr));
        let r = c.raw(format!("{req}\n").as_bytes());
        if r.is_none() {
            self.c = None;
        }
        r
    }

    /// The reply to `req`, asked again while it is `NFS4ERR_DELAY` or
    /// the connection is closed (for up to 90 s), without its `xid`.
    fn ask(&mut self, req: Value) -> Value {
        let t0 = Instant::now();
        loop {
            let r = self.once(&req);
            match r {
                Some(r) if r["status"] != "NFS4ERR_DELAY" => {
                    let mut r = r;
                    if let Some(m) = r.as_object_mut() {
                        m.remove("xid");
                    }
                    return r;
                }
                _ => {}
            }
            assert!(t0.elapsed() < Duration::from_secs(90), "{req}: still {r:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `req` as the next request on `slot`, which must be `NFS4_OK`.
    fn ok(&mut self, req: Value, slot: usize) -> Value {
        self.last[slot] += 1;
        let r = self.at(req.clone(), slot);
        assert_eq!(r["status"], "NFS4_OK", "{req}: {r}");
        r
    }

    /// `req` at `slot`'s last seqid (a re-send, after [`Nfs::ok`]).
    fn at(&mut self, mut req: Value, slot: usize) -> Value {
        req["seq"] = json!({"sessionid": self.sessionid, "slot": slot, "seqid": self.last[slot]});
        self.ask(req)
    }
}

fn open_req(owner: &str, path: &str, deny: &str, create: &str) -> Value {
    json!({"op": "OPEN", "owner": owner, "path": path, "access": "both",
           "deny": deny, "create": {"mode": create}})
}

fn write_req(stateid: &Value, data: &str) -> Value {
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(data);
    json!({"op": "WRITE", "stateid": stateid, "offset": 0, "data": data})
}

fn close_req(stateid: &Value) -> Value {
    json!({"op": "CLOSE", "stateid": stateid})
}

/// How the fail-back goes.
#[derive(Clone, Copy, PartialEq)]
enum Loss {
    /// filterd A SIGKILLed; alice keeps f open and locked, dave (never on
    /// B) has dfile open: their handles are taken by nfsshim B's restore.
    Kill,
    /// As `Kill`, filterd A SIGSTOPped past its lease and continued: it
    /// steps down (nfsshim A lets go of its clients) and exits 75.
    Stop,
    /// filterd A SIGKILLed; alice CLOSEs f on B: nfsshim A holds no
    /// handle at the fail-back (none taken, f gone), only the tables tell.
    KillNothingHeld,
}

/// The fail-back with nfsshim A alive throughout.
fn nfs_fail_back(name: &str, loss: Loss) {
    if !etcd_available(name) {
        return;
    }
    let held = loss != Loss::KillNothingHeld;
    let shared = Scratch::new(&format!("{name}-export"));
    let export = shared.root();
    for f in ["victim", "ren"] {
        std::fs::write(export.join(f), f).unwrap();
    }
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url(&format!("rk/{name}"));
    let (sa, mut a, _sb, mut b) = owner_and_standby(name, &export, &url, TTL, &[]);
    let nfs_a = Shim::start("nfsshim", a.socket(), "nfs-1");

    // On A: alice opens f (denying writes) and locks [0,10); dave, who
    // never talks to B, opens dfile denying both.
    let mut alice = Nfs::new(&nfs_a.addr, "alice@h1", "00000000000000aa");
    let f_sid = alice.ok(open_req("ao", "f", "write", "unchecked"), 0)["stateid"].clone();
    let mut lock_sid = Value::Null;
    let mut dave = None;
    if held {
        let lock = json!({"op": "LOCK", "stateid": f_sid, "owner": "al", "type": "write",
                          "offset": 0, "length": 10});
        lock_sid = alice.ok(lock, 0)["lock_stateid"].clone();
        let mut d = Nfs::new(&nfs_a.addr, "dave@h4", "00000000000000dd");
        let od = d.ok(open_req("do", "dfile", "both", "unchecked"), 0);
        dave = Some((d, od["stateid"].clone()));
    }

    // filterd A is lost, nfsshim A stays; B takes over, nfsshim B
    // restores, alice works on B, carol is made there.
    if loss == Loss::Stop {
        a.stop();
    } else {
        a.kill9();
    }
    b.wait_ready();
    if loss == Loss::Stop {
        a.signal(nix::sys::signal::Signal::SIGCONT);
        assert_eq!(a.wait_exit(Duration::from_secs(30)).code(), Some(75));
    }
    let nfs_b = Shim::start("nfsshim", b.socket(), "nfs-1");
    alice.move_to(&nfs_b.addr);
    alice.ok(write_req(&f_sid, "BBBB"), 0);
    if !held {
        alice.ok(close_req(&f_sid), 0);
    }
    let guarded = open_req("ao2", "g", "both", "guarded");
    let g = alice.ok(guarded.clone(), 1);
    let rename = json!({"op": "RENAME", "from": "ren", "to": "ren2"});
    let rn = alice.ok(rename.clone(), 2);
    let remove = json!({"op": "REMOVE", "path": "victim"});
    let rm = alice.ok(remove.clone(), 3);
    let mut carol = Nfs::new(&nfs_b.addr, "carol@h3", "00000000000000cc");
    let k_sid = carol.ok(open_req("co", "k", "both", "unchecked"), 0)["stateid"].clone();

    // Fail-back: A again (standby first), node B dies whole, A owns.
    let a2 = node_filterd(&sa, &url, TTL, true, &[]);
    a2.wait_log("standby: waiting for the owner", Duration::from_secs(20));
    nfs_b.kill9();
    b.kill9();
    a2.wait_ready();

    // On A: alice's re-sends are answered from their records.
    alice.move_to(&nfs_a.addr);
    assert_eq!(
        alice.at(guarded, 1),
        g,
        "the guarded OPEN re-sent\nfilterd A:\n{}",
        a2.log_text()
    );
    assert_eq!(alice.at(rename, 2), rn, "the RENAME re-sent");
    assert_eq!(alice.at(remove, 3), rm, "the REMOVE re-sent");
    // Slot 0 goes on where B left it; B's stateid works on A.
    if held {
        alice.ok(write_req(&f_sid, "CCCC"), 0);
    } else {
        let r = alice.at(close_req(&f_sid), 0);
        assert_eq!(r["status"], "NFS4_OK", "the CLOSE re-sent: {r}");
    }
    alice.ok(write_req(&g["stateid"], "gggg"), 1);
    // Carol, made on B, is known; dave's open (never on B) kept.
    carol.move_to(&nfs_a.addr);
    carol.ok(write_req(&k_sid, "k"), 0);
    if let Some((d, od)) = dave.as_mut() {
        d.move_to(&nfs_a.addr);
        d.ok(write_req(od, "dave"), 0);
    }

    // Every handle attached (none left disconnected holding its modes
    // and locks), and each releasable by its client.
    let handles = a2.control().handles().unwrap();
    assert_eq!(handles.len(), if held { 4 } else { 2 }, "{handles:?}");
    for h in &handles {
        assert_eq!(
            h.record.conn,
            libfilter::model::ConnState::Connected,
            "{} left {:?}",
            h.record.path,
            h.record.conn
        );
    }
    if held {
        let unlock = json!({"op": "LOCKU", "lock_stateid": lock_sid, "offset": 0, "length": 10});
        alice.ok(unlock, 0);
        alice.ok(close_req(&f_sid), 0);
    }
    alice.ok(close_req(&g["stateid"]), 1);
    carol.ok(close_req(&k_sid), 0);
    if let Some((d, od)) = dave.as_mut() {
        d.ok(close_req(od), 0);
    }
    let mut bob = Nfs::new(&nfs_a.addr, "bob@h2", "00000000000000bb");
    for path in ["f", "g", "k", "dfile"] {
        bob.ok(open_req("bo", path, "both", "unchecked"), 0);
    }
    let data = std::fs::read_to_string(export.join("f")).unwrap();
    assert_eq!(data, if held { "CCCC" } else { "BBBB" });
    assert!(export.join("ren2").exists() && !export.join("victim").exists());
    drop(cluster);
}

/// filterd A SIGKILLed: nfsshim A hears nothing until it reattaches.
#[test]
fn an_nfsshim_kept_across_a_fail_back_reads_its_tables_again() {
    nfs_fail_back("failback-nfs-kill", Loss::Kill);
}

/// filterd A stopped past its lease: continued, it steps down (nfsshim A
/// lets go of its clients) and exits.
#[test]
fn an_nfsshim_whose_filterd_stepped_down_reads_its_tables_again_at_the_fail_back() {
    nfs_fail_back("failback-nfs-stop", Loss::Stop);
}

/// No handle of nfsshim A is taken (alice's only one was closed on B):
/// its tables' record of the process that read them last tells.
#[test]
fn an_nfsshim_holding_no_handle_at_a_fail_back_reads_its_tables_again() {
    nfs_fail_back("failback-nfs-none", Loss::KillNothingHeld);
}

/// Review rvping 2: alice holds RWH on a persistent handle through
/// rksmbd A; filterd A is killed (rksmbd A and alice's connection stay
/// up, no step-down is said); B takes over, and another frontend's
/// client on B opens and writes the file — alice's lease is broken and,
/// nobody acknowledging, lowered to none at B's break timeout. A owns
/// again and rksmbd A's reattach resumes her handle (nobody else attached
/// it) onto her untouched connection. Before, she was sent no break and
/// read bob's data still holding RW caching; now she is sent a break RWH
/// to none, no acknowledgment asked, before her READ is answered
/// (`tests/smb3/lowered_while_detached.py`).
#[test]
fn a_lease_lowered_on_the_other_node_is_told_after_the_fail_back() {
    let name = "failback-lowered";
    if !etcd_available(name) {
        return;
    }
    let shared = Scratch::new(&format!("{name}-export"));
    let export = shared.root();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url(&format!("rk/{name}"));
    let flags = ["--break-timeout-ms", "1500"];
    let (sa, mut a, _sb, mut b) = owner_and_standby(name, &export, &url, TTL, &flags);
    let (rksmbd_a, log) = RkSmbd::start_logged(&sa, "rksmbd", "data", USERS, &[]);
    let mut alice = Dialogue::start(
        &rksmbd_a,
        "lowered_while_detached.py",
        Duration::from_secs(120),
    );
    alice.expect("ready");
    // A dies without a word; B takes over; bob opens and writes there.
    a.kill9();
    b.wait_ready();
    rkfilter_tests::write_as_another_frontend(b.socket(), "lowered.txt", b"BOB-WROTE");
    // A comes back as standby; B dies; A owns again and rksmbd A
    // reattaches.
    let a2 = node_filterd(&sa, &url, TTL, true, &flags);
    a2.wait_log("standby: waiting for the owner", Duration::from_secs(20));
    b.kill9();
    a2.wait_ready();
    rkfilter_tests::wait_for("rksmbd A to reattach", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("reattached to filterd"))
    });
    alice.say("go");
    alice.finish();
    drop(cluster);
}

/// The same with smbshim (review rvping 2): alice's RWH lease is lowered
/// to H at once on B (its holder disconnected), and after the fail-back
/// smbshim A sends her a LEASE_BREAK RWH to H, no acknowledgment asked,
/// before her READ is answered (before: nothing, and she read bob's data).
#[test]
fn an_smbshim_lease_lowered_on_the_other_node_is_told_after_the_fail_back() {
    let name = "failback-lowered-smb";
    if !etcd_available(name) {
        return;
    }
    let shared = Scratch::new(&format!("{name}-export"));
    let export = shared.root();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url(&format!("rk/{name}"));
    let flags = ["--break-timeout-ms", "1500"];
    let (sa, mut a, _sb, mut b) = owner_and_standby(name, &export, &url, TTL, &flags);
    let shim_a = Shim::start("smbshim", &sa.socket(), "smb-a");
    let mut alice = rkfilter_tests::LeasedOpen::start(&shim_a.addr, "f");
    a.kill9();
    b.wait_ready();
    rkfilter_tests::write_as_another_frontend(b.socket(), "f", b"BOB-WROTE");
    let a2 = node_filterd(&sa, &url, TTL, true, &flags);
    a2.wait_log("standby: waiting for the owner", Duration::from_secs(20));
    b.kill9();
    a2.wait_ready();
    alice.assert_told_before_its_read("H", "BOB-WROTE");
    drop(cluster);
}

/// Re-review rr41e 3a: filterd A is stopped past its lease: it steps
/// down (nfsshim A lets go of its clients) and exits, and a filterd
/// restarted on the same node claims the table again (B's filterd held it
/// meanwhile, with no nfsshim). Nobody else served the tables, so nfsshim A keeps them (it
/// reloaded them for the step-down notice alone before): alice's forty
/// opens, lock and RENAME come through — the re-sent RENAME answered from
/// the slot, every handle connected again, bob's write open still denied
/// by alice's, her LOCKU accepted.
#[test]
fn a_step_down_then_the_same_node_again_keeps_nfsshims_tables() {
    let name = "failback-same-node";
    if !etcd_available(name) {
        return;
    }
    let shared = Scratch::new(&format!("{name}-export"));
    let export = shared.root();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url(&format!("rk/{name}"));
    let (sa, mut a, _sb, mut b) = owner_and_standby(name, &export, &url, TTL, &[]);
    let logs = Scratch::new(&format!("{name}-log"));
    let log = logs.root().join("nfs-a.log");
    let nfs_a = Shim::start_logged("nfsshim", a.socket(), "nfs-1", &[], &log);
    let mut alice = Nfs::new(&nfs_a.addr, "alice@h1", "00000000000000aa");
    let mut sids = Vec::new();
    for i in 0..40 {
        let path = format!("f{i}");
        sids.push(alice.ok(open_req("ao", &path, "write", "unchecked"), 0)["stateid"].clone());
    }
    let f_sid = sids[0].clone();
    let lock = json!({"op": "LOCK", "stateid": f_sid, "owner": "al", "type": "write",
                      "offset": 0, "length": 10});
    let lock_sid = alice.ok(lock, 0)["lock_stateid"].clone();
    let rename = json!({"op": "RENAME", "from": "f1", "to": "f1b"});
    let rn = alice.ok(rename.clone(), 2);
    // Stopped past its lease (B's filterd takes the table: no nfsshim
    // there, so nobody serves the tables; it is killed at once): A steps
    // down at SIGCONT and exits 75, and A's node claims the table again.
    a.stop();
    b.wait_ready();
    b.kill9();
    a.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(a.wait_exit(Duration::from_secs(30)).code(), Some(75));
    let a2 = node_filterd(&sa, &url, TTL, true, &[]);
    a2.wait_ready();
    assert_eq!(alice.at(rename, 2), rn, "the RENAME re-sent");
    alice.ok(write_req(&f_sid, "CCCC"), 0);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("stepped down"), "{text}");
    assert!(text.contains("keeping them"), "{text}");
    assert!(!text.contains("tables read again"), "{text}");
    for h in &a2.control().handles().unwrap() {
        assert_eq!(
            h.record.conn,
            libfilter::model::ConnState::Connected,
            "{} {:?}",
            h.record.path,
            h.record.conn
        );
    }
    let mut bob = Nfs::new(&nfs_a.addr, "bob@h2", "00000000000000bb");
    let ob = bob.ask(
        json!({"op": "OPEN", "owner": "bo", "path": "f0", "access": "write",
        "deny": "none", "create": {"mode": "unchecked"},
        "seq": {"sessionid": bob.sessionid, "slot": 0, "seqid": 1}}),
    );
    assert_ne!(
        ob["status"], "NFS4_OK",
        "alice's open denies bob's write: {ob}"
    );
    let unlock = json!({"op": "LOCKU", "lock_stateid": lock_sid, "offset": 0, "length": 10});
    alice.ok(unlock, 0);
    drop(cluster);
}

/// Re-review rr41e 1: after a fail-back (filterd A killed, B serving
/// alice and carol — carol made there — then B killed and A owning
/// again), carol and alice reach nfsshim A the moment filterd A is
/// ready, before nfsshim A's supervisor has reattached. Before, the
/// requests ran on A's stale memory: carol got NFS4ERR_BADSESSION and
/// alice NFS4ERR_SEQ_MISORDERED, and a real client recovering with a new
/// session loses its replay cache. Now they are NFS4ERR_DELAY until the
/// tables are read again, then served on their sessions.
#[test]
fn a_request_before_the_reattach_at_a_fail_back_waits() {
    let name = "failback-early";
    if !etcd_available(name) {
        return;
    }
    let shared = Scratch::new(&format!("{name}-export"));
    let export = shared.root();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url(&format!("rk/{name}"));
    let (sa, mut a, _sb, mut b) = owner_and_standby(name, &export, &url, TTL, &[]);
    let nfs_a = Shim::start("nfsshim", a.socket(), "nfs-1");
    let mut alice = Nfs::new(&nfs_a.addr, "alice@h1", "00000000000000aa");
    let f_sid = alice.ok(open_req("ao", "f", "write", "unchecked"), 0)["stateid"].clone();
    a.kill9();
    b.wait_ready();
    let nfs_b = Shim::start("nfsshim", b.socket(), "nfs-1");
    alice.move_to(&nfs_b.addr);
    alice.ok(write_req(&f_sid, "BBBB"), 0);
    let mut carol = Nfs::new(&nfs_b.addr, "carol@h3", "00000000000000cc");
    let k_sid = carol.ok(open_req("co", "k", "both", "unchecked"), 0)["stateid"].clone();
    let a2 = node_filterd(&sa, &url, TTL, true, &[]);
    a2.wait_log("standby: waiting for the owner", Duration::from_secs(20));
    nfs_b.kill9();
    b.kill9();
    a2.wait_ready();
    carol.move_to(&nfs_a.addr);
    alice.move_to(&nfs_a.addr);
    // Right away, once each: not yet served on stale memory.
    carol.last[0] += 1;
    let mut req = write_req(&k_sid, "k");
    req["seq"] = json!({"sessionid": carol.sessionid, "slot": 0, "seqid": carol.last[0]});
    let r1 = carol.once(&req).map(|r| r["status"].clone());
    alice.last[0] += 1;
    let mut req2 = write_req(&f_sid, "CCCC");
    req2["seq"] = json!({"sessionid": alice.sessionid, "slot": 0, "seqid": alice.last[0]});
    let r2 = alice.once(&req2).map(|r| r["status"].clone());
    for r in [&r1, &r2] {
        assert!(
            matches!(
                r.as_ref().and_then(Value::as_str),
                None | Some("NFS4ERR_DELAY" | "NFS4_OK")
            ),
            "carol {r1:?}, alice {r2:?}"
        );
    }
    // And served on their sessions, at the same seqids, once nfsshim A
    // has caught up.
    assert_eq!(carol.at(write_req(&k_sid, "k"), 0)["status"], "NFS4_OK");
    assert_eq!(alice.at(write_req(&f_sid, "CCCC"), 0)["status"], "NFS4_OK");
    drop(cluster);
}

/// Re-review rr41e 3b: dave holds a write delegation through nfsshim A
/// and his TCP connection to it stays up through a kill fail-back
/// (nfsshim B restored the tables and took his handle meanwhile, so A
/// reads its tables again). Bob's conflicting open on A afterwards
/// recalls dave's delegation on that connection at once, dave sending
/// nothing. Before, the reload dropped every client's connection, and
/// the recall went nowhere until dave's next request.
#[test]
fn a_recall_after_a_fail_back_reaches_a_holder_whose_connection_stayed() {
    let name = "failback-recall-conn";
    if !etcd_available(name) {
        return;
    }
    let shared = Scratch::new(&format!("{name}-export"));
    let export = shared.root();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url(&format!("rk/{name}"));
    let flags = ["--break-timeout-ms", "30000"];
    let (sa, mut a, _sb, mut b) = owner_and_standby(name, &export, &url, TTL, &flags);
    let nfs_a = Shim::start("nfsshim", a.socket(), "nfs-1");
    let mut dave = Nfs::new(&nfs_a.addr, "dave@h4", "00000000000000dd");
    let mut want = open_req("do", "d", "none", "unchecked");
    want["want_delegation"] = json!("write");
    let o = dave.ok(want, 0);
    assert_eq!(o["delegation"]["type"], "write", "{o}");
    a.kill9();
    b.wait_ready();
    // nfsshim B restores the tables (dave's handle taken), serves no one.
    let nfs_b = Shim::start("nfsshim", b.socket(), "nfs-1");
    let a2 = node_filterd(&sa, &url, TTL, true, &flags);
    a2.wait_log("standby: waiting for the owner", Duration::from_secs(20));
    nfs_b.kill9();
    b.kill9();
    a2.wait_ready();
    // Bob (once nfsshim A has read its tables again) opens d for write.
    let mut bob = Nfs::new(&nfs_a.addr, "bob@h2", "00000000000000bb");
    bob.last[0] += 1;
    let open = json!({"op": "OPEN", "owner": "bo", "path": "d", "access": "write",
        "deny": "none", "seq": {"sessionid": bob.sessionid, "slot": 0, "seqid": bob.last[0]}});
    let r = bob.once(&open).expect("bob's OPEN answered");
    assert_eq!(
        r["status"], "NFS4ERR_DELAY",
        "the delegation is recalled: {r}"
    );
    let c = dave.c.as_mut().expect("dave's connection");
    c.set_read_timeout(Duration::from_secs(10));
    let cb = c.next_line().expect("a CB_RECALL on dave's connection");
    assert_eq!(cb["op"], "CB_RECALL", "{cb}");
    assert_eq!(
        cb["stateid"]["other"], o["delegation"]["stateid"]["other"],
        "{cb}"
    );
    drop(cluster);
}

/// Re-review rr41m 1: dave holds a write delegation through nfsshim A;
/// filterd A is stopped past its lease and B's filterd takes the table
/// (no nfsshim there), where another frontend opens and writes dave's
/// file — his disconnected holder's lease is lowered, untold. B dies, A
/// steps down at SIGCONT and A's node claims the table again. Nobody else
/// served nfsshim's tables, so nothing forced a reload, and nfsshim A
/// kept dave's delegation: his client would cache writes over the other
/// frontend's data, and no later open would recall it. Now the reattach
/// sees the lease lowered below what the delegation promises and reads
/// the tables again, which revokes it.
#[test]
fn a_delegation_lowered_while_nfsshim_was_away_is_revoked_at_the_reattach() {
    let name = "failback-deleg-lowered";
    if !etcd_available(name) {
        return;
    }
    let shared = Scratch::new(&format!("{name}-export"));
    let export = shared.root();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url(&format!("rk/{name}"));
    let flags = ["--break-timeout-ms", "1500"];
    let (sa, mut a, _sb, mut b) = owner_and_standby(name, &export, &url, TTL, &flags);
    let logs = Scratch::new(&format!("{name}-log"));
    let log = logs.root().join("nfs-a.log");
    let nfs_a = Shim::start_logged("nfsshim", a.socket(), "nfs-1", &[], &log);
    let mut dave = Nfs::new(&nfs_a.addr, "dave@h4", "00000000000000dd");
    let mut want = open_req("do", "d", "none", "unchecked");
    want["want_delegation"] = json!("write");
    let o = dave.ok(want, 0);
    assert_eq!(o["delegation"]["type"], "write", "{o}");
    let deleg = o["delegation"]["stateid"].clone();
    dave.ok(write_req(&deleg, "DAVE"), 1);
    a.stop();
    b.wait_ready();
    rkfilter_tests::write_as_another_frontend(b.socket(), "d", b"BOB-WROTE");
    b.kill9();
    a.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(a.wait_exit(Duration::from_secs(30)).code(), Some(75));
    let a2 = node_filterd(&sa, &url, TTL, true, &flags);
    a2.wait_ready();
    // Re-sent until nfsshim A serves again (the step-down closed dave's
    // connection): his WRITE under the delegation is refused, not cached.
    dave.last[1] += 1;
    let r = dave.at(write_req(&deleg, "LATE"), 1);
    assert_ne!(r["status"], "NFS4_OK", "the delegation is revoked: {r}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("a delegation's lease was lowered"), "{text}");
    drop(cluster);
}
