//! An nfsl/1 open state is one share reservation held through one or more
//! filter handles (its own, an upgrade's, a further lock-owner's, one that
//! carries a delegation): issue 17's second review of that change. It is
//! kept or dropped whole, across nfsshim and filterd restarts, and nothing
//! of it outlives it.

use std::time::{Duration, Instant};

use rkfilter_tests::{handles_on, Filterd, LineClient, Nfs, Scratch, Shim, TestFront};
use serde_json::{json, Value};

fn ok(r: Value) -> Value {
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    r
}

fn expire(s: &Scratch, key: &str) {
    let sock = s.socket().display().to_string();
    let out = rkfilter_tests::filterctl(&["--socket", &sock, "expire", key]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

fn lock(a: &mut Nfs, sid: &Value, owner: &str, offset: u64) -> Value {
    a.call(
        json!({"op": "LOCK", "stateid": sid, "owner": owner, "type": "write",
                  "offset": offset, "length": 2}),
    )
}

/// Old code: a further lock-owner's handle that went (expired while
/// nfsshim was down) was ignored: its lock was gone from filterd while the
/// client still held it, so another client got the same range, and the
/// open could never be closed (LOCKS_HELD).
#[test]
fn a_lost_lock_owner_handle_drops_the_open_whole() {
    {
        let while_down = true;
        let s = Scratch::new("nfs-lost-lock-owner");
        std::fs::write(s.root().join("f"), b"0123456789").unwrap();
        let _d = Filterd::start(&s, &[], &[]);
        let mut nfs = Shim::start("nfsshim", &s.socket(), "nfs-lo");
        let mut a = Nfs::connect(&nfs.addr, "host-a", "00000000000000aa");
        let sid = ok(a.open("oo", "f", "both", "none", json!({})))["stateid"].clone();
        ok(lock(&mut a, &sid, "l1", 0));
        let before: Vec<String> = handles_on(&s, "f").into_iter().map(|h| h.0).collect();
        ok(lock(&mut a, &sid, "l2", 5));
        let (l2, _) = handles_on(&s, "f")
            .into_iter()
            .find(|h| !before.contains(&h.0))
            .expect("l2's own handle");
        nfs.kill9_in_place();
        expire(&s, &l2);
        nfs = Shim::start("nfsshim", &s.socket(), "nfs-lo");
        a.c = LineClient::connect(&nfs.addr);
        rkfilter_tests::wait_for(
            "every handle of the open to go",
            Duration::from_secs(10),
            || handles_on(&s, "f").is_empty().then_some(()),
        );
        let r = a.call(json!({"op": "READ", "stateid": sid, "offset": 0, "count": 1}));
        assert_ne!(r["status"], "NFS4_OK", "down={while_down}: {r}");
        let mut b = Nfs::connect(&nfs.addr, "host-b", "00000000000000bb");
        let bs = ok(b.open("ob", "f", "both", "none", json!({})))["stateid"].clone();
        ok(lock(&mut b, &bs, "lb", 5));
    }
}

/// Old code: each OPEN granted a delegation (modes unchanged) added a
/// handle, and DELEGRETURN closed none: ten cycles, eleven handles.
#[test]
fn delegation_cycles_leave_one_handle() {
    let s = Scratch::new("nfs-deleg-cycles");
    std::fs::write(s.root().join("f"), b"f").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dc");
    let mut a = Nfs::connect(&nfs.addr, "host-a", "00000000000000aa");
    ok(a.open("oo", "f", "read", "none", json!({})));
    for _ in 0..5 {
        let o = ok(a.open(
            "oo",
            "f",
            "read",
            "none",
            json!({"want_delegation": "read"}),
        ));
        assert_eq!(o["delegation"]["type"], "read", "{o}");
        ok(a.call(json!({"op": "DELEGRETURN", "stateid": o["delegation"]["stateid"]})));
    }
    assert_eq!(handles_on(&s, "f").len(), 1, "{:?}", handles_on(&s, "f"));
}

/// Old code: a handle of the instance that no table named (its OPEN's
/// filter commit made it, nfsshim died before the state record) stayed,
/// disconnected, denying others for its whole timeout after the client
/// had closed everything.
#[test]
fn a_handle_no_open_state_names_is_closed_at_restore() {
    let s = Scratch::new("nfs-orphan");
    std::fs::write(s.root().join("f"), b"f").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    {
        // What a dead nfsshim leaves: a persistent handle of its instance.
        let mut fe = TestFront::start(&s.socket(), "nfs", "nfs-or").unwrap();
        let r = fe.cmd(json!({"cmd": "open", "client": "c0ffee", "path": "f",
            "access": ["read"], "share": ["read"], "disposition": "open",
            "durability": {"kind": "persistent", "timeout_ms": 300000},
            "create_guid": uuid::Uuid::new_v4().to_string()}));
        assert_eq!(r["ok"], true, "{r}");
        fe.kill9();
    }
    assert_eq!(handles_on(&s, "f").len(), 1);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-or");
    assert!(handles_on(&s, "f").is_empty(), "{:?}", handles_on(&s, "f"));
    let mut b = Nfs::connect(&nfs.addr, "host-b", "00000000000000bb");
    ok(b.open("ob", "f", "write", "none", json!({})));
}

/// Old code: DELEGRETURN dropped the delegation in memory before its
/// record was written; filterd died at that commit, and the re-send on the
/// same slot and seqid got BAD_STATEID instead of NFS4_OK. Commits: 1-2
/// the client and session, 3 the OPEN (handle, open state and slot reply
/// in one), 4 the DELEGRETURN's mark in the open state's record
/// (`DelegRec::returning`), 5 the lease given up, 6 the DELEGRETURN's
/// state and slot reply.
#[test]
fn delegreturn_is_exactly_once_across_a_filterd_crash() {
    for n in [4, 5, 6] {
        let s = Scratch::new("nfs-delegreturn-crash");
        std::fs::write(s.root().join("f"), b"f").unwrap();
        let fp = format!("commit.after:{n}:kill");
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
        let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dr");
        let mut a = Nfs::connect(&nfs.addr, "host-a", "00000000000000aa");
        let o = ok(a.open(
            "oo",
            "f",
            "read",
            "none",
            json!({"want_delegation": "read"}),
        ));
        let deleg = o["delegation"]["stateid"].clone();
        let first = a.call(json!({"op": "DELEGRETURN", "stateid": deleg}));
        assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
        d.wait_killed_at(&fp, Duration::from_secs(10));
        let _d = Filterd::start(&s, &[], &[]);
        let again =
            rkfilter_tests::wait_for("the re-send's answer", Duration::from_secs(10), || {
                let r = a.send(json!({"op": "DELEGRETURN", "stateid": deleg}));
                (r["status"] != "NFS4ERR_DELAY").then_some(r)
            });
        assert_eq!(
            again["status"], "NFS4_OK",
            "{fp}: first {first}, again {again}"
        );
        // The delegation is gone: another client's write OPEN does not wait.
        let mut b = Nfs::connect(&nfs.addr, "host-b", "00000000000000bb");
        let t0 = Instant::now();
        ok(b.open("ob", "f", "write", "none", json!({})));
        assert!(t0.elapsed() < Duration::from_secs(5), "{fp}");
    }
}

/// Old code: a delegation broken (unanswered, so revoked) while its
/// nfsshim was down was restored as valid: the client kept caching while
/// another client wrote.
#[test]
fn a_delegation_revoked_while_nfsshim_was_down_is_revoked_after() {
    let s = Scratch::new("nfs-deleg-revoked-down");
    std::fs::write(s.root().join("f"), b"f").unwrap();
    let _d = Filterd::start(&s, &["--break-timeout-ms", "1500"], &[]);
    let mut n1 = Shim::start("nfsshim", &s.socket(), "nfs-r1");
    let n2 = Shim::start("nfsshim", &s.socket(), "nfs-r2");
    let mut a = Nfs::connect(&n1.addr, "host-a", "00000000000000aa");
    let o = ok(a.open(
        "oo",
        "f",
        "read",
        "none",
        json!({"want_delegation": "read"}),
    ));
    let deleg = o["delegation"]["stateid"].clone();
    n1.kill9_in_place();
    let mut b = Nfs::connect(&n2.addr, "host-b", "00000000000000bb");
    let r = rkfilter_tests::wait_for("b's write OPEN", Duration::from_secs(10), || {
        let r = b.open("ob", "f", "write", "none", json!({}));
        (r["status"] != "NFS4ERR_DELAY").then_some(r)
    });
    ok(r);
    let n1 = Shim::start("nfsshim", &s.socket(), "nfs-r1");
    a.c = LineClient::connect(&n1.addr);
    let r = a.call(json!({"op": "READ", "stateid": deleg, "offset": 0, "count": 1}));
    assert_ne!(r["status"], "NFS4_OK", "{r}");
}
