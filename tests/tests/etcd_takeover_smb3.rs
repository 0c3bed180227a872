//! The main success path of a takeover by another node, end to end with
//! a real SMB 3 client (review rvnode s1.py and s2.py): node A (filterd
//! owning the etcd table, and rksmbd) and node B (filterd `--standby` on
//! the same export, and its own rksmbd, same instance) on a one-member
//! etcd, lease TTL 2 s. On A alice holds `p` persistent (written, locked
//! [0,10) with lock sequence 1/1, then appended to) and `l` persistent
//! under an RWH lease whose break bob's open on A has started. Node A
//! is SIGKILLed whole, filterd and rksmbd, while the break is in
//! progress.
//!
//! B must serve within the TTL and a bound; bob's exclusive open of `p`
//! there is refused while alice is away (`STATUS_FILE_NOT_AVAILABLE`,
//! docs/smb3.md: a disconnected handle keeps its share modes) and after
//! she is back (`STATUS_SHARING_VIOLATION`), and her lock refuses his.
//! Bob's open of `l` on B breaks alice's recovered lease anew and waits
//! (docs/ARCHITECTURE.md: after a restart, and so after a takeover, a
//! break is gone with filterd's memory and a new open breaks the
//! recovered holder by the same rule); alice's DH2C on rksmbd B resumes
//! both handles with their FileIds and her RWH lease, is sent that
//! break, and her acknowledgment lets bob in. Her LOCK replayed with the
//! same lock sequence is recognised (answered, no second lock: one
//! unlock lets bob lock), and her append replayed on B lands once (the
//! append record committed with the persistent handle).
//!
//! Skips (with a note) when the `etcd` binary is missing, except under
//! `CI=true`.

use std::time::{Duration, Instant};

use rkfilter_tests::etcd::{etcd_available, owner_and_standby, Cluster};
use rkfilter_tests::smb3::Dialogue;
use rkfilter_tests::{RkSmbd, Scratch};

const TTL_SECS: u64 = 2;
/// How long past the TTL node B may take to serve (a loaded 2-core CI
/// machine: etcd's lease expiry, the standby's poll, recovery).
const TAKEOVER_BOUND: Duration = Duration::from_secs(10);
const USERS: &[(&str, &str)] = &[("alice", "pw"), ("bob", "pw")];
const SUCCESS: &str = "0x0";
const PENDING: &str = "0x103";
const FILE_NOT_AVAILABLE: &str = "0xc0000467";
const SHARING_VIOLATION: &str = "0xc0000043";
const LOCK_NOT_GRANTED: &str = "0xc0000055";
const RWH: &str = "0x7";
const RH: &str = "0x3";
/// What alice wrote to `p` on A, then appended.
const DATA: &[u8] = b"persistent-A-data";
const TAIL: &[u8] = b"APPEND";

/// Sends `cmd`; the answer line starting with `word`, less `word`.
fn ask(script: &mut Dialogue, cmd: &str, word: &str) -> String {
    script.say(cmd);
    let line = script.expect(word);
    line[word.len()..].trim().to_owned()
}

#[test]
fn alices_handles_lock_lease_break_and_replays_come_through_a_takeover_by_node_b() {
    let name = "takeover-smb3";
    if !etcd_available(name) {
        return;
    }
    let shared = Scratch::new(&format!("{name}-export"));
    let export = shared.root();
    let cluster = Cluster::start(&shared, 1);
    let url = cluster.url(&format!("rk/{name}"));
    // A break timeout far past the test's steps: bob's open on B must wait
    // for alice's acknowledgment, not for the timeout.
    let ttl = TTL_SECS.to_string();
    let (sa, mut a, sb, b) =
        owner_and_standby(name, &export, &url, &ttl, &["--break-timeout-ms", "30000"]);
    let rksmbd_a = RkSmbd::start(&sa, "rksmbd", "data", USERS);

    let mut alice = Dialogue::start(&rksmbd_a, "node_takeover.py", Duration::from_secs(180));
    assert_eq!(ask(&mut alice, "open", "opened"), "");
    let written = [DATA, TAIL].concat();
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(export.join("p")).unwrap()),
        String::from_utf8_lossy(&written)
    );
    // Bob's open on A starts the break of alice's RWH lease (to RH).
    assert_eq!(
        ask(&mut alice, "breakon", "break "),
        format!("{RWH} {RH}"),
        "{}",
        alice.log
    );

    // Node A dies whole while the break is in progress.
    rksmbd_a.shim.kill9();
    a.kill9();
    let killed = Instant::now();
    assert_eq!(ask(&mut alice, "drop", "dropped"), "");
    b.wait_ready();
    let rksmbd_b = RkSmbd::start(&sb, "rksmbd", "data", USERS);
    let port_b = rksmbd_b.port();
    let serving = killed.elapsed();
    assert!(
        serving < Duration::from_secs(TTL_SECS) + TAKEOVER_BOUND,
        "B served {serving:?} after A's kill"
    );
    eprintln!("B served {serving:?} after A's kill");

    // While alice is away: bob's exclusive open is refused, and so is his
    // lock of her range; his open of `l` breaks her lease anew and waits.
    assert_eq!(
        ask(&mut alice, &format!("exclusive {port_b}"), "exclusive "),
        FILE_NOT_AVAILABLE,
        "{}",
        alice.log
    );
    assert_eq!(
        ask(&mut alice, &format!("boblock {port_b}"), "boblock "),
        format!("{SUCCESS} {LOCK_NOT_GRANTED}"),
        "{}",
        alice.log
    );
    assert_eq!(
        ask(&mut alice, &format!("bobwait {port_b}"), "bobwait "),
        PENDING,
        "{}",
        alice.log
    );

    // Alice reconnects to rksmbd B: both handles, the same FileIds, her
    // lease still RWH, and the break sent on her new connection.
    let r = ask(&mut alice, &format!("reconnect {port_b}"), "reconnect ");
    let words: Vec<&str> = r.split(' ').collect();
    assert_eq!(
        words.get(..3),
        Some(&["same", "same", RWH][..]),
        "alice's DH2C on B: {r}\n{}\nfilterd B:\n{}",
        alice.log,
        b.log_text()
    );
    assert_eq!(
        ask(&mut alice, "break 10", "break "),
        format!("{RWH} {RH}"),
        "the break in progress at the kill, on alice's connection to B\n{}",
        alice.log
    );
    assert_eq!(ask(&mut alice, "bobpeek", "bobpeek "), "pending");

    // Her replays: the LOCK (same lock sequence) recognised, the append
    // answered without landing again.
    assert_eq!(
        ask(&mut alice, "replaylock", "replaylock "),
        SUCCESS,
        "{}",
        alice.log
    );
    assert_eq!(
        ask(&mut alice, "replayappend", "replayappend "),
        SUCCESS,
        "{}",
        alice.log
    );
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(export.join("p")).unwrap()),
        String::from_utf8_lossy(&written),
        "the replayed append landed once"
    );
    assert_eq!(ask(&mut alice, "read", "read "), hex(&written));

    // Bob: still refused, now a plain sharing violation, and his lock.
    assert_eq!(
        ask(&mut alice, &format!("exclusive {port_b}"), "exclusive "),
        SHARING_VIOLATION
    );
    assert_eq!(
        ask(&mut alice, &format!("boblock {port_b}"), "boblock "),
        format!("{SUCCESS} {LOCK_NOT_GRANTED}")
    );

    // Her acknowledgment lets bob's open of `l` in.
    assert_eq!(ask(&mut alice, &format!("ack {RH}"), "ack "), SUCCESS);
    assert_eq!(ask(&mut alice, "bobfinal", "bobfinal "), SUCCESS);

    // One unlock releases her lock: the replayed LOCK took no second one.
    assert_eq!(ask(&mut alice, "unlock", "unlock "), SUCCESS);
    assert_eq!(
        ask(&mut alice, &format!("boblock {port_b}"), "boblock "),
        format!("{SUCCESS} {SUCCESS}"),
        "bob's lock after alice's one unlock\n{}",
        alice.log
    );
    alice.say("done");
    alice.finish();
    eprintln!("alice's dialogue:\n{}", alice.log);
    drop(rksmbd_b);
    drop(cluster);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
