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
//! Skips (with a note) when the `etcd` binary is missing, except under
//! `CI=true`.

use std::time::Duration;

use rkfilter_tests::etcd::{etcd_available, node_filterd, owner_and_standby, Cluster};
use rkfilter_tests::smb3::Dialogue;
use rkfilter_tests::{RkSmbd, Scratch};

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
