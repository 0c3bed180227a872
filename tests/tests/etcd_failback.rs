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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use libfilter::proto::HandleView;
use rkfilter_tests::etcd::{etcd_available, node_filterd, owner_and_standby, Cluster};
use rkfilter_tests::smb3::Dialogue;
use rkfilter_tests::{Filterd, LineClient, RkSmbd, Scratch, Shim};
use serde_json::{json, Value};

const TTL: &str = "2";
const USERS: &[(&str, &str)] = &[("alice", "pw")];
const FILE_CLOSED: &str = "0xc0000128";

/// Two nodes on one etcd table over a shared export
/// ([`owner_and_standby`]): filterd A owning it, filterd B standby, both
/// run with lease TTL [`TTL`] and `flags`.
struct TwoNodes {
    /// The one-member etcd cluster holding the table (dropped first, as
    /// the tests ended before: `drop(cluster)`).
    _cluster: Cluster,
    /// filterd A, the owner.
    a: Filterd,
    /// filterd B, standby.
    b: Filterd,
    /// Node A's scratch dir (its socket, its state dir).
    sa: Scratch,
    /// Node B's.
    sb: Scratch,
    /// The export both nodes serve.
    export: PathBuf,
    url: String,
    flags: Vec<&'static str>,
    _shared: Scratch,
}

impl TwoNodes {
    /// The two nodes of test `name` on an empty export (None, with a
    /// note, when etcd is not installed).
    fn start(name: &str, flags: &[&'static str]) -> Option<TwoNodes> {
        TwoNodes::start_with_files(name, &[], flags)
    }

    /// [`TwoNodes::start`], the export holding `files` (name, contents)
    /// before anything starts.
    fn start_with_files(
        name: &str,
        files: &[(&str, &[u8])],
        flags: &[&'static str],
    ) -> Option<TwoNodes> {
        if !etcd_available(name) {
            return None;
        }
        let shared = Scratch::new(&format!("{name}-export"));
        let export = shared.root();
        for (file, data) in files {
            std::fs::write(export.join(file), data).unwrap();
        }
        let cluster = Cluster::start(&shared, 1);
        let url = cluster.url(&format!("rk/{name}"));
        let (sa, a, sb, b) = owner_and_standby(name, &export, &url, TTL, flags);
        Some(TwoNodes {
            _cluster: cluster,
            a,
            b,
            sa,
            sb,
            export,
            url,
            flags: flags.to_vec(),
            _shared: shared,
        })
    }

    /// A filterd started again on node A, standby; not waited for.
    fn a_again(&self) -> Filterd {
        node_filterd(&self.sa, &self.url, TTL, true, &self.flags)
    }

    /// The fail-back: filterd A again (standby, waiting for the owner),
    /// then node B dies whole — `frontend_b` (its frontend, if any), then
    /// filterd B — and A owns the table: the new filterd A, ready.
    fn fail_back(&mut self, frontend_b: Option<Shim>) -> Filterd {
        let a2 = self.a_again();
        a2.wait_log("standby: waiting for the owner", Duration::from_secs(20));
        if let Some(shim) = frontend_b {
            shim.kill9();
        }
        self.b.kill9();
        a2.wait_ready();
        a2
    }

    /// filterd A, stopped past its lease, is continued: it steps down and
    /// exits 75.
    fn a_steps_down(&mut self) {
        self.a.signal(nix::sys::signal::Signal::SIGCONT);
        assert_eq!(self.a.wait_exit(Duration::from_secs(30)).code(), Some(75));
    }
}

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
    let Some(mut n) = TwoNodes::start_with_files(name, &[("f", &[b'.'; 100])], &[]) else {
        return;
    };
    let rksmbd_a = RkSmbd::start(&n.sa, "rksmbd", "data", USERS);

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
    n.a.stop();
    if let Some(bob) = bob.as_mut() {
        assert_eq!(ask(bob, "drop", "dropped"), "dropped");
    }
    n.b.wait_ready();
    let rksmbd_b = RkSmbd::start(&n.sb, "rksmbd", "data", USERS);
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
    n.a.kill9();
    let a2 = n.fail_back(Some(rksmbd_b.shim));

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
    let data = std::fs::read(n.export.join("f")).unwrap();
    assert!(
        !data.windows(5).any(|w| w == b"STALE"),
        "the stale connection wrote"
    );
    for c in bob.iter_mut().chain([&mut alice]) {
        c.say("done");
        c.finish();
    }
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
        let r = self.next(req.clone(), slot);
        assert_eq!(r["status"], "NFS4_OK", "{req}: {r}");
        r
    }

    /// `req` as the next request on `slot`, whatever its status.
    fn next(&mut self, req: Value, slot: usize) -> Value {
        self.last[slot] += 1;
        self.at(req, slot)
    }

    /// `req` at `slot`'s last seqid (a re-send, after [`Nfs::ok`]).
    fn at(&mut self, req: Value, slot: usize) -> Value {
        let req = self.sequenced(req, slot);
        self.ask(req)
    }

    /// `req` as the next request on `slot`, sent once, not asked again
    /// ([`Nfs::once`]).
    fn once_next(&mut self, req: Value, slot: usize) -> Option<Value> {
        self.last[slot] += 1;
        let req = self.sequenced(req, slot);
        self.once(&req)
    }

    /// `req` at `slot`'s last seqid.
    fn sequenced(&self, mut req: Value, slot: usize) -> Value {
        req["seq"] = json!({"sessionid": self.sessionid, "slot": slot, "seqid": self.last[slot]});
        req
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

/// A write LOCK of [0,10) under open `stateid`, lock owner `al`.
fn lock_req(stateid: &Value) -> Value {
    json!({"op": "LOCK", "stateid": stateid, "owner": "al", "type": "write",
           "offset": 0, "length": 10})
}

/// The LOCKU of [0,10) under `lock_stateid`.
fn unlock_req(lock_stateid: &Value) -> Value {
    json!({"op": "LOCKU", "lock_stateid": lock_stateid, "offset": 0, "length": 10})
}

/// Dave opens `d` wanting a write delegation, and gets one: the OPEN's
/// answer.
fn open_d_with_write_delegation(dave: &mut Nfs) -> Value {
    let mut want = open_req("do", "d", "none", "unchecked");
    want["want_delegation"] = json!("write");
    let o = dave.ok(want, 0);
    assert_eq!(o["delegation"]["type"], "write", "{o}");
    o
}

/// Every handle filterd `d` lists is connected (none left disconnected
/// holding its modes and locks): the handles.
fn assert_every_handle_connected(d: &Filterd) -> Vec<HandleView> {
    let handles = d.control().handles().unwrap();
    for h in &handles {
        assert_eq!(
            h.record.conn,
            libfilter::model::ConnState::Connected,
            "{} left {:?}",
            h.record.path,
            h.record.conn
        );
    }
    handles
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
    let files: &[(&str, &[u8])] = &[("victim", b"victim"), ("ren", b"ren")];
    let Some(mut n) = TwoNodes::start_with_files(name, files, &[]) else {
        return;
    };
    let held = loss != Loss::KillNothingHeld;
    let nfs_a = Shim::start("nfsshim", n.a.socket(), "nfs-1");

    // On A: alice opens f (denying writes) and locks [0,10); dave, who
    // never talks to B, opens dfile denying both.
    let mut alice = Nfs::new(&nfs_a.addr, "alice@h1", "00000000000000aa");
    let f_sid = alice.ok(open_req("ao", "f", "write", "unchecked"), 0)["stateid"].clone();
    let mut lock_sid = Value::Null;
    let mut dave = None;
    if held {
        lock_sid = alice.ok(lock_req(&f_sid), 0)["lock_stateid"].clone();
        let mut d = Nfs::new(&nfs_a.addr, "dave@h4", "00000000000000dd");
        let od = d.ok(open_req("do", "dfile", "both", "unchecked"), 0);
        dave = Some((d, od["stateid"].clone()));
    }

    // filterd A is lost, nfsshim A stays; B takes over, nfsshim B
    // restores, alice works on B, carol is made there.
    if loss == Loss::Stop {
        n.a.stop();
    } else {
        n.a.kill9();
    }
    n.b.wait_ready();
    if loss == Loss::Stop {
        n.a_steps_down();
    }
    let nfs_b = Shim::start("nfsshim", n.b.socket(), "nfs-1");
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
    let a2 = n.fail_back(Some(nfs_b));

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
    let handles = assert_every_handle_connected(&a2);
    assert_eq!(handles.len(), if held { 4 } else { 2 }, "{handles:?}");
    if held {
        alice.ok(unlock_req(&lock_sid), 0);
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
    let data = std::fs::read_to_string(n.export.join("f")).unwrap();
    assert_eq!(data, if held { "CCCC" } else { "BBBB" });
    assert!(n.export.join("ren2").exists() && !n.export.join("victim").exists());
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
    let flags = &["--break-timeout-ms", "1500"];
    let Some(mut n) = TwoNodes::start("failback-lowered", flags) else {
        return;
    };
    let (rksmbd_a, log) = RkSmbd::start_logged(&n.sa, "rksmbd", "data", USERS, &[]);
    let mut alice = Dialogue::start(
        &rksmbd_a,
        "lowered_while_detached.py",
        Duration::from_secs(120),
    );
    alice.expect("ready");
    // A dies without a word; B takes over; bob opens and writes there.
    n.a.kill9();
    n.b.wait_ready();
    rkfilter_tests::write_as_another_frontend(n.b.socket(), "lowered.txt", b"BOB-WROTE");
    // A comes back as standby; B dies; A owns again and rksmbd A
    // reattaches.
    let _a2 = n.fail_back(None);
    rkfilter_tests::wait_for("rksmbd A to reattach", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("reattached to filterd"))
    });
    alice.say("go");
    alice.finish();
}

/// The same with smbshim (review rvping 2): alice's RWH lease is lowered
/// to H at once on B (its holder disconnected), and after the fail-back
/// smbshim A sends her a LEASE_BREAK RWH to H, no acknowledgment asked,
/// before her READ is answered (before: nothing, and she read bob's data).
#[test]
fn an_smbshim_lease_lowered_on_the_other_node_is_told_after_the_fail_back() {
    let flags = &["--break-timeout-ms", "1500"];
    let Some(mut n) = TwoNodes::start("failback-lowered-smb", flags) else {
        return;
    };
    let shim_a = Shim::start("smbshim", &n.sa.socket(), "smb-a");
    let mut alice = rkfilter_tests::LeasedOpen::start(&shim_a.addr, "f");
    n.a.kill9();
    n.b.wait_ready();
    rkfilter_tests::write_as_another_frontend(n.b.socket(), "f", b"BOB-WROTE");
    let _a2 = n.fail_back(None);
    alice.assert_told_before_its_read("H", "BOB-WROTE");
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
    let Some(mut n) = TwoNodes::start(name, &[]) else {
        return;
    };
    let logs = Scratch::new(&format!("{name}-log"));
    let log = logs.root().join("nfs-a.log");
    let nfs_a = Shim::start_logged("nfsshim", n.a.socket(), "nfs-1", &[], &log);
    let mut alice = Nfs::new(&nfs_a.addr, "alice@h1", "00000000000000aa");
    let mut sids = Vec::new();
    for i in 0..40 {
        let path = format!("f{i}");
        sids.push(alice.ok(open_req("ao", &path, "write", "unchecked"), 0)["stateid"].clone());
    }
    let f_sid = sids[0].clone();
    let lock_sid = alice.ok(lock_req(&f_sid), 0)["lock_stateid"].clone();
    let rename = json!({"op": "RENAME", "from": "f1", "to": "f1b"});
    let rn = alice.ok(rename.clone(), 2);
    // Stopped past its lease (B's filterd takes the table: no nfsshim
    // there, so nobody serves the tables; it is killed at once): A steps
    // down at SIGCONT and exits 75, and A's node claims the table again.
    n.a.stop();
    n.b.wait_ready();
    n.b.kill9();
    n.a_steps_down();
    let a2 = n.a_again();
    a2.wait_ready();
    assert_eq!(alice.at(rename, 2), rn, "the RENAME re-sent");
    alice.ok(write_req(&f_sid, "CCCC"), 0);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("stepped down"), "{text}");
    assert!(text.contains("keeping them"), "{text}");
    assert!(!text.contains("tables read again"), "{text}");
    assert_every_handle_connected(&a2);
    let mut bob = Nfs::new(&nfs_a.addr, "bob@h2", "00000000000000bb");
    let ob = bob.next(
        json!({"op": "OPEN", "owner": "bo", "path": "f0", "access": "write",
        "deny": "none", "create": {"mode": "unchecked"}}),
        0,
    );
    assert_ne!(
        ob["status"], "NFS4_OK",
        "alice's open denies bob's write: {ob}"
    );
    alice.ok(unlock_req(&lock_sid), 0);
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
    let Some(mut n) = TwoNodes::start("failback-early", &[]) else {
        return;
    };
    let nfs_a = Shim::start("nfsshim", n.a.socket(), "nfs-1");
    let mut alice = Nfs::new(&nfs_a.addr, "alice@h1", "00000000000000aa");
    let f_sid = alice.ok(open_req("ao", "f", "write", "unchecked"), 0)["stateid"].clone();
    n.a.kill9();
    n.b.wait_ready();
    let nfs_b = Shim::start("nfsshim", n.b.socket(), "nfs-1");
    alice.move_to(&nfs_b.addr);
    alice.ok(write_req(&f_sid, "BBBB"), 0);
    let mut carol = Nfs::new(&nfs_b.addr, "carol@h3", "00000000000000cc");
    let k_sid = carol.ok(open_req("co", "k", "both", "unchecked"), 0)["stateid"].clone();
    let _a2 = n.fail_back(Some(nfs_b));
    carol.move_to(&nfs_a.addr);
    alice.move_to(&nfs_a.addr);
    // Right away, once each: not yet served on stale memory.
    let r1 = carol
        .once_next(write_req(&k_sid, "k"), 0)
        .map(|r| r["status"].clone());
    let r2 = alice
        .once_next(write_req(&f_sid, "CCCC"), 0)
        .map(|r| r["status"].clone());
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
    let flags = &["--break-timeout-ms", "30000"];
    let Some(mut n) = TwoNodes::start("failback-recall-conn", flags) else {
        return;
    };
    let nfs_a = Shim::start("nfsshim", n.a.socket(), "nfs-1");
    let mut dave = Nfs::new(&nfs_a.addr, "dave@h4", "00000000000000dd");
    let o = open_d_with_write_delegation(&mut dave);
    n.a.kill9();
    n.b.wait_ready();
    // nfsshim B restores the tables (dave's handle taken), serves no one.
    let nfs_b = Shim::start("nfsshim", n.b.socket(), "nfs-1");
    let _a2 = n.fail_back(Some(nfs_b));
    // Bob (once nfsshim A has read its tables again) opens d for write.
    let mut bob = Nfs::new(&nfs_a.addr, "bob@h2", "00000000000000bb");
    let open = json!({"op": "OPEN", "owner": "bo", "path": "d", "access": "write",
        "deny": "none"});
    let r = bob.once_next(open, 0).expect("bob's OPEN answered");
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
    let Some(mut n) = TwoNodes::start(name, &["--break-timeout-ms", "1500"]) else {
        return;
    };
    let logs = Scratch::new(&format!("{name}-log"));
    let log = logs.root().join("nfs-a.log");
    let nfs_a = Shim::start_logged("nfsshim", n.a.socket(), "nfs-1", &[], &log);
    let mut dave = Nfs::new(&nfs_a.addr, "dave@h4", "00000000000000dd");
    let o = open_d_with_write_delegation(&mut dave);
    let deleg = o["delegation"]["stateid"].clone();
    dave.ok(write_req(&deleg, "DAVE"), 1);
    n.a.stop();
    n.b.wait_ready();
    rkfilter_tests::write_as_another_frontend(n.b.socket(), "d", b"BOB-WROTE");
    n.b.kill9();
    n.a_steps_down();
    let a2 = n.a_again();
    a2.wait_ready();
    // Re-sent until nfsshim A serves again (the step-down closed dave's
    // connection): his WRITE under the delegation is refused, not cached.
    let r = dave.next(write_req(&deleg, "LATE"), 1);
    assert_ne!(r["status"], "NFS4_OK", "the delegation is revoked: {r}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("a delegation's lease was lowered"), "{text}");
}

/// nfsshim on node A with a hold hook (`$NFSSHIM_TEST_HOLD`): the step
/// named `hook` waits while the file `held` exists; its log in `log`.
struct HookedNfsA {
    shim: Shim,
    log: PathBuf,
    held: PathBuf,
    _logs: Scratch,
}

impl HookedNfsA {
    fn start(n: &TwoNodes, name: &str, flags: &[&str], hook: &str) -> HookedNfsA {
        let logs = Scratch::new(&format!("{name}-log"));
        let log = logs.root().join("nfs-a.log");
        let hold = logs.root().join("hold");
        let held = logs.root().join(format!("hold.{hook}"));
        let shim = Shim::start_logged_with(
            "nfsshim",
            n.a.socket(),
            "nfs-1",
            flags,
            &[("NFSSHIM_TEST_HOLD", hold.to_str().unwrap())],
            &log,
        );
        HookedNfsA {
            shim,
            log,
            held,
            _logs: logs,
        }
    }

    /// A poll for [`rkfilter_tests::wait_for`]: the log says `what`.
    fn log_has(&self, what: &str) -> impl Fn() -> Option<()> {
        let (what, log) = (what.to_owned(), self.log.clone());
        move || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains(&what))
                .map(|_| ())
        }
    }
}

/// A lease reaper tick of nfsshim A that found filterd ready, then
/// alice's lease lapsed (she is idle on A), is held (test hook) while
/// filterd A is killed, B takes over, nfsshim B serves alice — her
/// RECLAIM_COMPLETE renews her there — and A owns the table again, until
/// nfsshim A's supervisor has stored its new connection. Before, the
/// release went on that connection, on the stale memory: alice's client,
/// session and slot records were deleted from the tables B had served,
/// and after the reload she was unknown (`NFS4ERR_BADSESSION`). Now the
/// tick is pinned to the connection it checked (`Attachment::pin`): its
/// release fails with it, and the reload brings alice back.
#[test]
fn a_release_of_a_lease_lapsed_on_stale_memory_fails_across_the_fail_back() {
    let name = "failback-reaper";
    let Some(mut n) = TwoNodes::start(name, &[]) else {
        return;
    };
    let h = HookedNfsA::start(&n, name, &["--lease-ms", "3000"], "release");
    let mut alice = Nfs::new(&h.shim.addr, "alice@h1", "00000000000000aa");
    alice.ok(json!({"op": "RECLAIM_COMPLETE"}), 0);
    // Alice idle on A: her lease lapses, and the reaper's release of her
    // waits, its tick past the readiness check.
    std::fs::write(&h.held, b"").unwrap();
    rkfilter_tests::wait_for(
        "the reaper to hold alice's release",
        Duration::from_secs(30),
        h.log_has("a lapsed client's release waits"),
    );
    // filterd A dies; B takes over; nfsshim B serves alice, who renews.
    n.a.kill9();
    n.b.wait_ready();
    let nfs_b = Shim::start("nfsshim", n.b.socket(), "nfs-1");
    alice.move_to(&nfs_b.addr);
    alice.ok(json!({"op": "RECLAIM_COMPLETE"}), 0);
    // Fail-back: A owns again; nfsshim A stores its new connection.
    let _a2 = n.fail_back(Some(nfs_b));
    rkfilter_tests::wait_for(
        "nfsshim A to store its new connection",
        Duration::from_secs(30),
        h.log_has("a reattach is stored"),
    );
    // The held release goes on; the reload follows it.
    std::fs::remove_file(&h.held).unwrap();
    alice.move_to(&h.shim.addr);
    alice.last[0] += 1;
    let r = alice.at(json!({"op": "RECLAIM_COMPLETE"}), 0);
    assert_eq!(
        r["status"],
        "NFS4_OK",
        "alice, who renewed on B, is known on A: {r}\nnfsshim A:\n{}",
        std::fs::read_to_string(&h.log).unwrap_or_default()
    );
}

/// Re-review rrpin2 A: nfsshim A's reload at the fail-back (alice's
/// handle taken by nfsshim B) is held (test hook) at its restore's
/// resume while filterd A dies again. The events thread pinned that
/// connection: the resume fails on it, and the reload gives up at once
/// and waits for the next reattach, the clients let go. Before, the
/// error (no code) was taken for one that may pass and the resume tried
/// again on the dead connection for 30 s, holding `serving` (write) and
/// exclusive I/O: every request blocked meanwhile without a DELAY answer.
#[test]
fn a_reload_whose_filterd_goes_away_again_gives_up_at_once() {
    let name = "failback-reload-lost";
    let Some(mut n) = TwoNodes::start(name, &[]) else {
        return;
    };
    let h = HookedNfsA::start(&n, name, &[], "resume");
    let mut alice = Nfs::new(&h.shim.addr, "alice@h1", "00000000000000aa");
    let f_sid = alice.ok(open_req("ao", "f", "write", "unchecked"), 0)["stateid"].clone();
    // filterd A dies; B takes over; nfsshim B takes alice's handle.
    n.a.kill9();
    n.b.wait_ready();
    let nfs_b = Shim::start("nfsshim", n.b.socket(), "nfs-1");
    alice.move_to(&nfs_b.addr);
    alice.ok(write_req(&f_sid, "BBBB"), 0);
    // Fail-back: nfsshim A's reattach finds the handle taken and reads
    // its tables again; its restore's resume waits.
    std::fs::write(&h.held, b"").unwrap();
    let mut a2 = n.fail_back(Some(nfs_b));
    rkfilter_tests::wait_for(
        "nfsshim A's reload to hold its resume",
        Duration::from_secs(30),
        h.log_has("a restore's resume waits"),
    );
    // filterd A dies again under the reload.
    a2.kill9();
    std::fs::remove_file(&h.held).unwrap();
    rkfilter_tests::wait_for(
        "nfsshim A's reload to fail",
        Duration::from_secs(60),
        h.log_has("filterd went away again"),
    );
    let text = std::fs::read_to_string(&h.log).unwrap_or_default();
    assert!(
        text.contains("the connection it is pinned to is lost"),
        "{text}"
    );
    assert!(
        !text.contains("refused for now"),
        "the resume was tried again on the lost connection:\n{text}"
    );
}
