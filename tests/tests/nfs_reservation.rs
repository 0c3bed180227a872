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

fn lock(a: &mut Nfs, sid: &Value, owner: &str, offset: u64) -> Value {
    a.call(
        json!({"op": "LOCK", "stateid": sid, "owner": owner, "type": "write",
                  "offset": offset, "length": 2}),
    )
}

/// Client host-a of nfsshim `nfs`.
fn host_a(nfs: &Shim) -> Nfs {
    Nfs::connect(&nfs.addr, "host-a", "00000000000000aa")
}

/// Client host-b of nfsshim `nfs`.
fn host_b(nfs: &Shim) -> Nfs {
    Nfs::connect(&nfs.addr, "host-b", "00000000000000bb")
}

/// A scratch dir `name` holding `f` (its contents `f`), and filterd on it
/// run with `flags` and environment `env`.
fn filterd_on_f(name: &str, flags: &[&str], env: &[(&str, &str)]) -> (Scratch, Filterd) {
    let s = Scratch::new(name);
    std::fs::write(s.root().join("f"), b"f").unwrap();
    let d = Filterd::start(&s, flags, env);
    (s, d)
}

/// Client `a`'s OPEN of `path` (owner `oo`, for reading, denying nothing)
/// wanting a read delegation, which must be NFS4_OK: its answer.
fn open_wanting_read_delegation(a: &mut Nfs, path: &str) -> Value {
    ok(a.open(
        "oo",
        path,
        "read",
        "none",
        json!({"want_delegation": "read"}),
    ))
}

/// As [`open_wanting_read_delegation`], for reading and writing, wanting
/// a write delegation.
fn open_wanting_write_delegation(a: &mut Nfs, path: &str) -> Value {
    ok(a.open(
        "oo",
        path,
        "both",
        "none",
        json!({"want_delegation": "write"}),
    ))
}

/// The delegation OPEN answer `o` granted, which must be of `kind`: its
/// stateid.
fn granted(o: &Value, kind: &str) -> Value {
    assert_eq!(o["delegation"]["type"], kind, "{o}");
    o["delegation"]["stateid"].clone()
}

/// `a`'s CLOSE of the open OPEN answer `o` made, which must be NFS4_OK.
fn close(a: &mut Nfs, o: &Value) -> Value {
    ok(a.call(json!({"op": "CLOSE", "stateid": o["stateid"]})))
}

fn read_req(stateid: &Value, count: u64) -> Value {
    json!({"op": "READ", "stateid": stateid, "offset": 0, "count": count})
}

/// `a`'s READ under delegation `deleg` is NFS4ERR_EXPIRED: it was revoked.
fn assert_revoked(a: &mut Nfs, deleg: &Value) {
    let r = a.call(read_req(deleg, 1));
    assert_eq!(r["status"], "NFS4ERR_EXPIRED", "revoked: {r}");
}

/// Another client's OPEN (owner `ob`) of `path` for `access`, denying
/// `deny`.
fn b_open(path: &str, access: &str, deny: &str) -> Value {
    json!({"op": "OPEN", "owner": "ob", "path": path, "access": access, "deny": deny})
}

/// `b`'s OPEN ([`b_open`]) is NFS4ERR_DELAY, `a`'s delegation recalled
/// first: the CB_RECALL `a` is sent.
fn recalled_by(a: &mut Nfs, b: &mut Nfs, path: &str, access: &str, deny: &str) -> Value {
    let r = b.call(b_open(path, access, deny));
    assert_eq!(r["status"], "NFS4ERR_DELAY", "recalled first: {r}");
    next_recall(a)
}

/// The next line sent to `a`, which must be a CB_RECALL.
fn next_recall(a: &mut Nfs) -> Value {
    let cb = a.c.next_line().expect("CB_RECALL");
    assert_eq!(cb["op"], "CB_RECALL", "{cb}");
    cb
}

/// filterd holds `n` handles of `f`.
fn assert_handles_of_f(s: &Scratch, n: usize) {
    assert_eq!(handles_on(s, "f").len(), n, "{:?}", handles_on(s, "f"));
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
        let mut a = host_a(&nfs);
        let sid = ok(a.open("oo", "f", "both", "none", json!({})))["stateid"].clone();
        ok(lock(&mut a, &sid, "l1", 0));
        let before: Vec<String> = handles_on(&s, "f").into_iter().map(|h| h.0).collect();
        ok(lock(&mut a, &sid, "l2", 5));
        let (l2, _) = handles_on(&s, "f")
            .into_iter()
            .find(|h| !before.contains(&h.0))
            .expect("l2's own handle");
        nfs.kill9_in_place();
        rkfilter_tests::expire_once_detached(&s, &l2);
        nfs = Shim::start("nfsshim", &s.socket(), "nfs-lo");
        a.c = LineClient::connect(&nfs.addr);
        rkfilter_tests::wait_for(
            "every handle of the open to go",
            Duration::from_secs(10),
            || handles_on(&s, "f").is_empty().then_some(()),
        );
        let r = a.call(read_req(&sid, 1));
        assert_ne!(r["status"], "NFS4_OK", "down={while_down}: {r}");
        let mut b = host_b(&nfs);
        let bs = ok(b.open("ob", "f", "both", "none", json!({})))["stateid"].clone();
        ok(lock(&mut b, &bs, "lb", 5));
    }
}

/// Old code: each OPEN granted a delegation (modes unchanged) added a
/// handle, and DELEGRETURN closed none: ten cycles, eleven handles.
#[test]
fn delegation_cycles_leave_one_handle() {
    let (s, _d) = filterd_on_f("nfs-deleg-cycles", &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dc");
    let mut a = host_a(&nfs);
    ok(a.open("oo", "f", "read", "none", json!({})));
    for _ in 0..5 {
        let o = open_wanting_read_delegation(&mut a, "f");
        assert_eq!(o["delegation"]["type"], "read", "{o}");
        ok(a.call(json!({"op": "DELEGRETURN", "stateid": o["delegation"]["stateid"]})));
    }
    assert_handles_of_f(&s, 1);
}

/// Old code: a handle of the instance that no table named (its OPEN's
/// filter commit made it, nfsshim died before the state record) stayed,
/// disconnected, denying others for its whole timeout after the client
/// had closed everything.
#[test]
fn a_handle_no_open_state_names_is_closed_at_restore() {
    let (s, _d) = filterd_on_f("nfs-orphan", &[], &[]);
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
    let mut b = host_b(&nfs);
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
        let mut a = host_a(&nfs);
        let o = open_wanting_read_delegation(&mut a, "f");
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
        let mut b = host_b(&nfs);
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
    let (s, _d) = filterd_on_f(
        "nfs-deleg-revoked-down",
        &["--break-timeout-ms", "1500"],
        &[],
    );
    let mut n1 = Shim::start("nfsshim", &s.socket(), "nfs-r1");
    let n2 = Shim::start("nfsshim", &s.socket(), "nfs-r2");
    let mut a = host_a(&n1);
    let o = open_wanting_read_delegation(&mut a, "f");
    let deleg = o["delegation"]["stateid"].clone();
    n1.kill9_in_place();
    let mut b = host_b(&n2);
    // DELAY while filterd has yet to see n1 gone (its detach of n1's
    // handles comes on filterd's own time) or the recall waits: re-sent
    // on the same seqid, as a client does (a new one would be misordered).
    ok(b.call_patiently(b_open("f", "write", "none")));
    let n1 = Shim::start("nfsshim", &s.socket(), "nfs-r1");
    a.c = LineClient::connect(&n1.addr);
    let r = a.call(read_req(&deleg, 1));
    assert_ne!(r["status"], "NFS4_OK", "{r}");
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Another client's `owner` OPEN of `path` for writing: NFS4ERR_DELAY while
/// `a`'s delegation `deleg` is recalled (its CB_RECALL checked), NFS4_OK
/// once `a` returned it.
fn recalled_then_opened(a: &mut Nfs, b: &mut Nfs, path: &str, deleg: &Value) {
    let cb = recalled_by(a, b, path, "write", "none");
    assert_eq!(cb["stateid"]["other"], deleg["other"], "{cb}");
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": deleg})));
    let again = b_open(path, "write", "none");
    ok(b.resend_patiently(&again, Duration::from_secs(10)));
}

/// Review rvspec n8/n11: CLOSE dropped the open's delegation with it — a
/// conflicting OPEN by another client was granted at once with no
/// CB_RECALL, and the holder's DELEGRETURN, READ or WRITE under the
/// delegation's stateid was NFS4ERR_BAD_STATEID (writes it deferred under
/// a write delegation were lost). RFC 8881 §10.4: the delegation outlives
/// the CLOSE; only the open's stateid is gone. Its one handle stays until
/// DELEGRETURN, and the same owner may open the file again meanwhile.
#[test]
fn a_delegation_outlives_the_close_of_its_open() {
    let s = Scratch::new("nfs-deleg-close");
    std::fs::write(s.root().join("f"), b"old").unwrap();
    std::fs::write(s.root().join("w"), b"").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcl");
    let mut a = host_a(&nfs);
    let mut b = host_b(&nfs);
    // A read delegation, its open closed.
    let o = open_wanting_read_delegation(&mut a, "f");
    let deleg = granted(&o, "read");
    close(&mut a, &o);
    let r = a.call(read_req(&o["stateid"], 3));
    assert_eq!(r["status"], "NFS4ERR_BAD_STATEID", "the open's: {r}");
    let r = a.call(json!({"op": "CLOSE", "stateid": o["stateid"]}));
    assert_eq!(r["status"], "NFS4ERR_BAD_STATEID", "a second CLOSE: {r}");
    let r = ok(a.call(read_req(&deleg, 3)));
    assert_eq!(r["data"], b64("old"), "{r}");
    assert_handles_of_f(&s, 1);
    // The same owner opens the file again beside it, and closes it.
    let again = ok(a.open("oo", "f", "read", "none", json!({})));
    close(&mut a, &again);
    assert_handles_of_f(&s, 1);
    recalled_then_opened(&mut a, &mut b, "f", &deleg);
    // The delegation's handle went with the DELEGRETURN: b's is the one.
    assert_handles_of_f(&s, 1);
    let r = a.call(json!({"op": "DELEGRETURN", "stateid": deleg}));
    assert_ne!(r["status"], "NFS4_OK", "returned already: {r}");

    // A write delegation: what the holder deferred, written back after
    // the CLOSE under the delegation's stateid, lands.
    let o = open_wanting_write_delegation(&mut a, "w");
    let deleg = granted(&o, "write");
    close(&mut a, &o);
    ok(a.call(json!({"op": "WRITE", "stateid": deleg, "offset": 0, "data": b64("deferred")})));
    ok(a.call(json!({"op": "COMMIT", "stateid": deleg})));
    recalled_then_opened(&mut a, &mut b, "w", &deleg);
    assert_eq!(std::fs::read(s.root().join("w")).unwrap(), b"deferred");
}

/// A delegation kept past its open's CLOSE is restored with it after
/// nfsshim restarts (its record says the open is closed), and goes at the
/// recall timeout when its client never returns it: its handle closed,
/// its stateid NFS4ERR_EXPIRED.
#[test]
fn a_delegation_kept_past_close_is_restored_and_revoked_at_the_recall_timeout() {
    let (s, _d) = filterd_on_f(
        "nfs-deleg-close-restart",
        &["--break-timeout-ms", "1500"],
        &[],
    );
    let mut nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcr");
    let mut a = host_a(&nfs);
    let o = open_wanting_read_delegation(&mut a, "f");
    let deleg = o["delegation"]["stateid"].clone();
    close(&mut a, &o);
    nfs.kill9_in_place();
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcr");
    a.c = LineClient::connect(&nfs.addr);
    let r = a.call(read_req(&o["stateid"], 1));
    assert_eq!(r["status"], "NFS4ERR_BAD_STATEID", "the open's: {r}");
    ok(a.call(read_req(&deleg, 1)));
    assert_handles_of_f(&s, 1);
    // Recalled, never returned: revoked at the recall timeout.
    let mut b = host_b(&nfs);
    recalled_by(&mut a, &mut b, "f", "write", "none");
    let again = b_open("f", "write", "none");
    ok(b.resend_patiently(&again, Duration::from_secs(10)));
    assert_revoked(&mut a, &deleg);
    rkfilter_tests::wait_for("a's handle closed", Duration::from_secs(10), || {
        (handles_on(&s, "f").len() == 1).then_some(())
    });
}

/// A CLOSE that keeps its open's delegation, and the DELEGRETURN that
/// ends it, are exactly once across a filterd crash at each of their
/// commits, before it is durable and after: 1-2 the client and session, 3
/// the OPEN, 4 the CLOSE's state and slot reply, 5 the DELEGRETURN: the
/// delegation's handle closed with the state's deletion and the slot
/// reply (no mark, no lease given up first: re-review rr39a A). Every
/// re-send is NFS4_OK, and nothing of the client's stays in the way of
/// another client's write OPEN.
#[test]
fn a_close_keeping_a_delegation_and_its_delegreturn_across_a_filterd_crash() {
    for (at, n) in [4, 5]
        .map(|n| ("after", n))
        .into_iter()
        .chain([4, 5].map(|n| ("before", n)))
    {
        let s = Scratch::new("nfs-deleg-close-crash");
        std::fs::write(s.root().join("f"), b"f").unwrap();
        let fp = format!("commit.{at}:{n}:kill");
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
        let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcc");
        let mut a = host_a(&nfs);
        let o = open_wanting_read_delegation(&mut a, "f");
        let deleg = o["delegation"]["stateid"].clone();
        let mut crashed = None;
        for req in [
            json!({"op": "CLOSE", "stateid": o["stateid"]}),
            json!({"op": "DELEGRETURN", "stateid": deleg}),
        ] {
            let first = a.call(req.clone());
            if first["status"] == "NFS4_OK" {
                continue;
            }
            assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {req}: {first}");
            assert!(crashed.is_none(), "{fp}: one crash");
            d.wait_killed_at(&fp, Duration::from_secs(10));
            crashed = Some(Filterd::start(&s, &[], &[]));
            let again =
                rkfilter_tests::wait_for("the re-send's answer", Duration::from_secs(10), || {
                    let r = a.send(req.clone());
                    (r["status"] != "NFS4ERR_DELAY").then_some(r)
                });
            assert_eq!(
                again["status"], "NFS4_OK",
                "{fp}: {req}: first {first}, again {again}"
            );
        }
        assert!(crashed.is_some(), "{fp}: the crash came");
        let mut b = host_b(&nfs);
        let t0 = Instant::now();
        ok(b.open("ob", "f", "write", "none", json!({})));
        assert!(t0.elapsed() < Duration::from_secs(5), "{fp}");
        assert_eq!(
            handles_on(&s, "f").len(),
            1,
            "{fp}: {:?}",
            handles_on(&s, "f")
        );
    }
}

/// Re-review D1: a CLOSE keeping its open's delegation marked the state
/// closed in memory before its commit; when that commit failed
/// (`commit.before:4:fail`: 1-2 the client and session, 3 the OPEN, 4 the
/// CLOSE) the answer was DELAY, but the re-send found the open closed and
/// answered NFS4_OK with nothing stored, so after a restart of nfsshim the
/// open was back. Now memory changes only after the commit (the failure
/// is the answer, NFS4ERR_SERVERFAULT, as a plain CLOSE's): the next CLOSE
/// closes the open for good, and after the restart the open's stateid is
/// NFS4ERR_BAD_STATEID while the delegation's still reads.
#[test]
fn a_close_keeping_a_delegation_whose_commit_failed_is_stored_by_its_resend() {
    let (s, _d) = filterd_on_f(
        "nfs-deleg-close-fail",
        &[],
        &[("RKFILTER_FAILPOINTS", "commit.before:4:fail")],
    );
    let mut nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcf");
    let mut a = host_a(&nfs);
    let o = open_wanting_read_delegation(&mut a, "f");
    let deleg = o["delegation"]["stateid"].clone();
    let close = json!({"op": "CLOSE", "stateid": o["stateid"]});
    let first = a.call(close.clone());
    assert_ne!(first["status"], "NFS4_OK", "the commit failed: {first}");
    // Re-sent (DELAY) or sent again (a final error): closed now.
    if first["status"] == "NFS4ERR_DELAY" {
        ok(a.resend_patiently(&close, Duration::from_secs(10)));
    } else {
        ok(a.call(close));
    }
    nfs.kill9_in_place();
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcf");
    a.c = LineClient::connect(&nfs.addr);
    let r = a.call(read_req(&o["stateid"], 1));
    assert_eq!(r["status"], "NFS4ERR_BAD_STATEID", "closed for good: {r}");
    ok(a.call(read_req(&deleg, 1)));
    assert_handles_of_f(&s, 1);
}

/// Re-review D4: when a delegation kept past its open's CLOSE was revoked
/// (recalled, never returned), the state's record was deleted whatever
/// the close of its handle did: a close that failed (`close.refuse:1:fail`,
/// the first close filterd is asked for) left a handle no record named,
/// holding the file until its timeout. Now the record goes in the commit
/// that closes the handle, and a failed close is tried again (by the
/// reaper, within its tick: re-review rr39a A).
#[test]
fn a_revoked_kept_delegation_whose_close_failed_is_closed_later() {
    let (s, _d) = filterd_on_f(
        "nfs-deleg-close-revoke-fail",
        &["--break-timeout-ms", "1500"],
        &[("RKFILTER_FAILPOINTS", "close.refuse:1:fail")],
    );
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcv");
    let mut a = host_a(&nfs);
    let deleg = keep_delegation(&mut a, "f");
    let mut b = host_b(&nfs);
    recalled_by(&mut a, &mut b, "f", "write", "none");
    let again = b_open("f", "write", "none");
    ok(b.resend_patiently(&again, Duration::from_secs(10)));
    // The revocation's close is refused: a's handle stays, named, and
    // its close is tried again.
    assert_revoked(&mut a, &deleg);
    rkfilter_tests::wait_for("a's handle closed", Duration::from_secs(10), || {
        (handles_on(&s, "f").len() == 1).then_some(())
    });
}

/// Re-review rr39a (restart): nfsshim restarting found a kept
/// delegation revoked while it was down and closed its handle whatever the
/// close did (`close.refuse:1:fail`), deleting the record anyway: the
/// handle stayed in filterd named by nothing. Now the state is kept, its
/// delegation gone, and closed in the commit that deletes its record,
/// again until that succeeds.
#[test]
fn a_kept_delegation_revoked_while_nfsshim_was_down_is_closed_after_a_failed_close() {
    let (s, _d) = filterd_on_f(
        "nfs-deleg-close-revoked-down",
        &["--break-timeout-ms", "1500"],
        &[("RKFILTER_FAILPOINTS", "close.refuse:1:fail")],
    );
    let mut n1 = Shim::start("nfsshim", &s.socket(), "nfs-dkr1");
    let n2 = Shim::start("nfsshim", &s.socket(), "nfs-dkr2");
    let mut a = host_a(&n1);
    let deleg = keep_delegation(&mut a, "f");
    n1.kill9_in_place();
    let mut b = host_b(&n2);
    // DELAY while filterd has yet to see n1 gone (its detach of n1's
    // handles comes on filterd's own time) or the recall waits: re-sent
    // on the same seqid, as a client does (a new one would be misordered).
    ok(b.call_patiently(b_open("f", "write", "none")));
    assert_handles_of_f(&s, 2);
    let n1 = Shim::start("nfsshim", &s.socket(), "nfs-dkr1");
    rkfilter_tests::wait_for("a's handle closed", Duration::from_secs(10), || {
        (handles_on(&s, "f").len() == 1).then_some(())
    });
    a.c = LineClient::connect(&n1.addr);
    assert_revoked(&mut a, &deleg);
}

/// Re-review rr39a A: DELEGRETURN of a kept delegation gave its lease up
/// first and closed its handle only after, and filterd ran the open that
/// waited for the recall in between: an SMB open denying read met the
/// handle, STATUS_SHARING_VIOLATION. Now the handle's close ends the
/// break, and the open is granted.
#[test]
fn a_returned_kept_delegation_lets_the_waiting_smb_open_in() {
    let (s, _d) = filterd_on_f("nfs-deleg-close-smb", &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dks");
    let smb = Shim::start("smbshim", &s.socket(), "smb-dks");
    let mut a = host_a(&nfs);
    let deleg = keep_delegation(&mut a, "f");
    // Read and write, sharing nothing.
    let answered = rkfilter_tests::smb_open_of_f(&smb.addr, json!([]));
    next_recall(&mut a);
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": deleg})));
    let (r, _) = answered
        .recv_timeout(Duration::from_secs(30))
        .expect("the SMB open's answer");
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
}

/// Re-review rr39a A: a kept delegation recalled and never returned was
/// revoked at the recall timeout, but its handle was closed only at its
/// holder's next request: another client's OPEN denying read was
/// NFS4ERR_SHARE_DENIED for as long as the holder stayed idle. Now the
/// handle goes within the reaper's tick (the OPEN meanwhile DELAY), and
/// the OPEN re-sent is granted. (An smbl/1 open waiting in filterd is
/// run again at the break timeout itself, before nfsshim hears of the
/// revocation: it still meets the handle — docs/nfs-like.md, "Left".)
#[test]
fn a_revoked_kept_delegations_handle_goes_while_its_holder_is_idle() {
    let (s, _d) = filterd_on_f("nfs-deleg-close-idle", &["--break-timeout-ms", "1000"], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dki");
    let mut a = host_a(&nfs);
    let deleg = keep_delegation(&mut a, "f");
    let mut b = host_b(&nfs);
    recalled_by(&mut a, &mut b, "f", "write", "read");
    let again = b_open("f", "write", "read");
    ok(b.resend_patiently(&again, Duration::from_secs(10)));
    assert_handles_of_f(&s, 1);
    assert_revoked(&mut a, &deleg);
}

/// Another client's OPEN denying what a kept delegation's handle may do
/// (read) recalls the delegation, as any conflicting open does, and is
/// granted once it is returned (docs/nfs-like.md said it was
/// NFS4ERR_SHARE_DENIED).
#[test]
fn another_clients_deny_read_open_recalls_a_kept_delegation() {
    let (s, _d) = filterd_on_f("nfs-deleg-close-deny", &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dkd");
    let mut a = host_a(&nfs);
    let deleg = keep_delegation(&mut a, "f");
    let mut b = host_b(&nfs);
    recalled_by(&mut a, &mut b, "f", "write", "read");
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": deleg})));
    let again = b_open("f", "write", "read");
    ok(b.resend_patiently(&again, Duration::from_secs(10)));
}

/// filterd and nfsshim (instance `instance`, one open per client, lease
/// `lease_ms`) in a new scratch dir `name` holding files f, g and h (each
/// its name), and client host-a's session.
fn at_one_open(name: &str, instance: &str, lease_ms: &str) -> (Scratch, Filterd, Shim, Nfs) {
    let s = Scratch::new(name);
    for f in ["f", "g", "h"] {
        std::fs::write(s.root().join(f), f).unwrap();
    }
    let d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start_with(
        "nfsshim",
        &s.socket(),
        instance,
        &["--max-opens-per-client", "1", "--lease-ms", lease_ms],
    );
    let a = host_a(&nfs);
    (s, d, nfs, a)
}

/// A read delegation of `path` kept past its open's CLOSE: its stateid.
fn keep_delegation(a: &mut Nfs, path: &str) -> Value {
    let o = open_wanting_read_delegation(a, path);
    close(a, &o);
    o["delegation"]["stateid"].clone()
}

/// `req` sent on `a`'s slot 0 at its current seqid: the answer, and the
/// lines (callbacks) sent on the same connection before and behind it.
fn answer_and_callbacks(a: &mut Nfs, req: &Value) -> (Value, Vec<Value>) {
    a.send_seeing(req)
}

/// Whether `seen` holds a CB_RECALL of delegation `deleg`.
fn recalls(seen: &[Value], deleg: &Value) -> bool {
    seen.iter()
        .any(|cb| cb["op"] == "CB_RECALL" && cb["stateid"]["other"] == deleg["other"])
}

/// Re-review D2: delegations kept past their opens' CLOSE counted against
/// the client's open limit (`--max-opens-per-client`) with nothing
/// reclaiming them, so every later OPEN of the client was
/// NFS4ERR_RESOURCE. Now an OPEN at the limit recalls a kept delegation
/// (CB_RECALL, the OPEN NFS4ERR_DELAY): returned, the OPEN re-sent is
/// granted; never returned, it is revoked a lease period later
/// (NFS4ERR_EXPIRED, its handle closed) and the OPEN re-sent is granted.
#[test]
fn kept_delegations_are_recalled_to_make_room_at_the_open_limit() {
    let (s, _d, _nfs, mut a) = at_one_open("nfs-deleg-close-limit", "nfs-dcm", "2000");
    // The OPEN's answer, and the CB_RECALL sent on the same connection
    // before it.
    let recalling = |a: &mut Nfs, req: &Value, deleg: &Value| {
        a.seqid += 1;
        let (r, seen) = answer_and_callbacks(a, req);
        assert_eq!(r["status"], "NFS4ERR_DELAY", "recalled first: {r}");
        assert!(recalls(&seen, deleg), "{seen:?}");
    };
    // Returned when recalled.
    let deleg = keep_delegation(&mut a, "f");
    let open_g = json!({"op": "OPEN", "owner": "oo", "path": "g", "access": "read",
                        "deny": "none"});
    recalling(&mut a, &open_g, &deleg);
    let r = a.send(open_g.clone());
    assert_eq!(r["status"], "NFS4ERR_DELAY", "until returned: {r}");
    // (On the slot the OPEN answered DELAY left where it was.)
    ok(a.send(json!({"op": "DELEGRETURN", "stateid": deleg})));
    let g = ok(a.call_patiently(open_g));
    close(&mut a, &g);
    // Never returned: revoked a lease period later.
    let deleg = keep_delegation(&mut a, "f");
    let open_h = json!({"op": "OPEN", "owner": "oo", "path": "h", "access": "read",
                        "deny": "none"});
    recalling(&mut a, &open_h, &deleg);
    ok(a.resend_patiently(&open_h, Duration::from_secs(10)));
    assert_revoked(&mut a, &deleg);
    assert!(handles_on(&s, "f").is_empty(), "{:?}", handles_on(&s, "f"));
}

/// Review rvnfsnode 2, the recall of a kept delegation to make room at
/// the open limit: sent on the connection the OPEN came on, and never
/// again, so a client whose connection dropped before the line reached it
/// heard of no recall, its OPEN re-sent on a new connection DELAY for a
/// lease period until the delegation was revoked. The recall goes again
/// on the new connection: returned, the OPEN re-sent is granted at once.
#[test]
fn a_recall_for_room_goes_again_on_the_clients_new_connection() {
    let (_s, _d, nfs, mut a) = at_one_open("nfs-deleg-room-reconnect", "nfs-drr", "60000");
    let deleg = keep_delegation(&mut a, "f");
    let open_g = json!({"op": "OPEN", "owner": "oo", "path": "g", "access": "read",
                        "deny": "none"});
    a.seqid += 1;
    let (r, seen) = answer_and_callbacks(&mut a, &open_g);
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{r}");
    assert!(recalls(&seen, &deleg), "{seen:?}");
    // The connection drops (the recall lost with it); the OPEN is re-sent
    // on a new one, the recall with its answer.
    a.c = LineClient::connect(&nfs.addr);
    let (r, seen) = answer_and_callbacks(&mut a, &open_g);
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{r}");
    assert!(
        recalls(&seen, &deleg),
        "the recall again on the new connection: {seen:?}"
    );
    // Only once per connection.
    let (_, seen) = answer_and_callbacks(&mut a, &open_g);
    assert!(seen.is_empty(), "{seen:?}");
    ok(a.send(json!({"op": "DELEGRETURN", "stateid": deleg})));
    ok(a.call_patiently(open_g));
}

/// Re-review rr41c F2, F3, F4, the recall to make room at the open
/// limit: it went again at every switch of connection, also between two
/// the client uses at once (allowed); it went before the answer of the
/// DELEGRETURN returning it; and its lease ran from the first send, so a
/// holder back late had what was left of it to write back. Now it goes on
/// each connection once, not before its own DELEGRETURN's answer, and its
/// first re-send gives it a lease from then (once).
#[test]
fn a_recall_for_room_goes_once_per_connection_and_its_lease_runs_from_the_resend() {
    let lease = Duration::from_millis(6000);
    let (_s, _d, nfs, mut a) = at_one_open("nfs-deleg-room-conns", "nfs-drc", "6000");
    let deleg = keep_delegation(&mut a, "f");
    let open_g = json!({"op": "OPEN", "owner": "oo", "path": "g", "access": "read",
                        "deny": "none"});
    // Renewing the client's lease (a busy machine's stall must not let
    // the reaper release it) on a connection the recall reached, until
    // `until`: READs under the delegation on slot 1 (slot 0 holds the
    // OPEN answered DELAY).
    let mut slot1 = 0;
    let mut renew_until = |a: &mut Nfs, until: Instant| {
        while Instant::now() < until {
            slot1 += 1;
            let mut read = read_req(&deleg, 1);
            read["seq"] = json!({"sessionid": a.sessionid, "slot": 1, "seqid": slot1});
            let id = a.c.send_only("xid", read);
            let (r, seen) = a.c.reply_to("xid", id).expect("the READ's answer");
            assert_eq!(r["status"], "NFS4_OK", "{r}");
            assert!(!recalls(&seen, &deleg), "not again: {seen:?}");
            let left = until.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(400)));
        }
    };
    a.seqid += 1;
    let (r, seen) = a.send_seeing(&open_g);
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{r}");
    assert!(recalls(&seen, &deleg), "{seen:?}");
    let sent = Instant::now();
    // A second connection of the client: the recall there, once.
    let mut first = std::mem::replace(&mut a.c, LineClient::connect(&nfs.addr));
    let (r, seen) = a.send_seeing(&open_g);
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{r}");
    assert!(recalls(&seen, &deleg), "on the second connection: {seen:?}");
    let (_, seen) = a.send_seeing(&open_g);
    assert!(seen.is_empty(), "{seen:?}");
    // Back on the first, which it reached: not again; nor on the second.
    std::mem::swap(&mut a.c, &mut first);
    for _ in 0..2 {
        let (_, seen) = a.send_seeing(&open_g);
        assert!(seen.is_empty(), "not again on the first: {seen:?}");
    }
    std::mem::swap(&mut a.c, &mut first);
    let (_, seen) = a.send_seeing(&open_g);
    assert!(seen.is_empty(), "not again on the second: {seen:?}");
    // Away from the OPEN until most of the lease went; back on a third
    // connection, the recall there has a lease from now: past the first
    // one's, the OPEN still waits for it, not revoking it.
    drop(first);
    renew_until(&mut a, sent + lease * 5 / 8);
    a.c = LineClient::connect(&nfs.addr);
    let third = Instant::now();
    let (r, seen) = a.send_seeing(&open_g);
    assert!(
        sent.elapsed() < lease,
        "too slow: back {:?} after the recall, past its lease",
        sent.elapsed()
    );
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{r}");
    assert!(recalls(&seen, &deleg), "on the third connection: {seen:?}");
    renew_until(&mut a, sent + lease * 9 / 8);
    let (r, _) = a.send_seeing(&open_g);
    assert!(
        third.elapsed() < lease,
        "too slow: {:?} after the re-send, past its lease",
        third.elapsed()
    );
    assert_eq!(
        r["status"], "NFS4ERR_DELAY",
        "a lease after the first send, still recalling: {r}"
    );
    // The DELEGRETURN first on a new connection: no recall with its
    // answer.
    a.c = LineClient::connect(&nfs.addr);
    let (r, seen) = a.send_seeing(&json!({"op": "DELEGRETURN", "stateid": deleg}));
    ok(r);
    assert!(seen.is_empty(), "no recall of what is returned: {seen:?}");
    ok(a.call_patiently(open_g));
}

/// Re-review D3: the handle kept to carry a delegation past its open's
/// CLOSE stayed in the closed open-owner's share group with that open's
/// access, so the same client's OPEN under another open-owner that denied
/// that access was NFS4ERR_SHARE_DENIED — a delegation denied its own
/// client's open. Now the OPEN is granted (the kept handle reopened in
/// the new owner's group, the lease kept), the delegation works on,
/// across a restart of nfsshim too, and its DELEGRETURN leaves only the
/// new open's handle.
#[test]
fn a_kept_delegation_does_not_deny_its_clients_other_owner() {
    let s = Scratch::new("nfs-deleg-close-own");
    std::fs::write(s.root().join("f"), b"old").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let mut nfs = Shim::start("nfsshim", &s.socket(), "nfs-dco");
    let mut a = host_a(&nfs);
    let o = open_wanting_write_delegation(&mut a, "f");
    let deleg = granted(&o, "write");
    close(&mut a, &o);
    let o2 = ok(a.open("o2", "f", "read", "write", json!({})));
    ok(a.call(read_req(&o2["stateid"], 3)));
    let r = ok(a.call(read_req(&deleg, 3)));
    assert_eq!(r["data"], b64("old"), "{r}");
    assert_handles_of_f(&s, 2);
    nfs.kill9_in_place();
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dco");
    a.c = LineClient::connect(&nfs.addr);
    let r = ok(a.call(read_req(&deleg, 3)));
    assert_eq!(r["data"], b64("old"), "{r}");
    // Another client's write open recalls the delegation, and is then
    // denied by o2's deny.
    let mut b = host_b(&nfs);
    let cb = recalled_by(&mut a, &mut b, "f", "write", "none");
    assert_eq!(cb["stateid"]["other"], deleg["other"], "{cb}");
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": deleg})));
    assert_handles_of_f(&s, 1);
    let again = b_open("f", "write", "none");
    let r = b.resend_patiently(&again, Duration::from_secs(10));
    assert_eq!(r["status"], "NFS4ERR_SHARE_DENIED", "o2 denies writes: {r}");
    close(&mut a, &o2);
    assert!(handles_on(&s, "f").is_empty(), "{:?}", handles_on(&s, "f"));
}

/// A delegation granted to an OPEN that joined an open state already
/// there (its handle a further one of the state's) outlives the CLOSE
/// too: the open's own handle is closed in the commit that records the
/// state closed, the delegation's handle becomes the state's, and it is
/// restored after a restart of nfsshim and recalled by another client.
#[test]
fn a_delegation_carried_by_a_further_handle_outlives_the_close() {
    let s = Scratch::new("nfs-deleg-close-further");
    std::fs::write(s.root().join("f"), b"old").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let mut nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcu");
    let mut a = host_a(&nfs);
    let first = ok(a.open("oo", "f", "read", "none", json!({})));
    assert!(first["delegation"].is_null(), "{first}");
    let o = open_wanting_read_delegation(&mut a, "f");
    let deleg = granted(&o, "read");
    assert_handles_of_f(&s, 2);
    close(&mut a, &o);
    assert_handles_of_f(&s, 1);
    nfs.kill9_in_place();
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcu");
    a.c = LineClient::connect(&nfs.addr);
    let r = a.call(read_req(&o["stateid"], 3));
    assert_eq!(r["status"], "NFS4ERR_BAD_STATEID", "the open's: {r}");
    let r = ok(a.call(read_req(&deleg, 3)));
    assert_eq!(r["data"], b64("old"), "{r}");
    let mut b = host_b(&nfs);
    recalled_then_opened(&mut a, &mut b, "f", &deleg);
    assert_handles_of_f(&s, 1);
}

/// Re-review rr39a C: the open limit was checked after filterd had made
/// the OPEN, which was then closed and answered NFS4ERR_DELAY (a kept
/// delegation recalled to make room): the file was already truncated, or
/// created, and the re-send, opening afresh, truncated again or found the
/// client's own guarded create NFS4ERR_EXIST. Now an OPEN that cannot
/// upgrade one of its owner's open states needs room first.
#[test]
fn an_open_at_the_limit_answered_delay_changed_nothing() {
    let s = Scratch::new("nfs-deleg-close-limit-delay");
    for f in ["f", "x"] {
        std::fs::write(s.root().join(f), f).unwrap();
    }
    std::fs::write(s.root().join("t"), b"precious").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start_with(
        "nfsshim",
        &s.socket(),
        "nfs-dcy",
        &["--max-opens-per-client", "2", "--lease-ms", "60000"],
    );
    let mut a = host_a(&nfs);
    // The owner has an open state (of another file) and a kept delegation.
    ok(a.open("oo", "x", "read", "none", json!({})));
    // Answered DELAY (the kept delegation recalled) with nothing done;
    // granted once the delegation is returned.
    let at_the_limit = |a: &mut Nfs, req: &Value, deleg: &Value, untouched: &dyn Fn()| {
        a.seqid += 1;
        let mut first = req.clone();
        first["seq"] = json!({"sessionid": a.sessionid, "slot": 0, "seqid": a.seqid});
        let id = a.c.send_only("xid", first);
        let (r, seen) = a.c.reply_to("xid", id).expect("the OPEN's answer");
        assert_eq!(r["status"], "NFS4ERR_DELAY", "recalled first: {r}");
        assert!(
            seen.iter()
                .any(|cb| cb["op"] == "CB_RECALL" && cb["stateid"]["other"] == deleg["other"]),
            "{seen:?}"
        );
        untouched();
        // (On the slot the OPEN answered DELAY left where it was.)
        ok(a.send(json!({"op": "DELEGRETURN", "stateid": deleg})));
        ok(a.call_patiently(req.clone()))
    };
    let deleg = keep_delegation(&mut a, "f");
    let truncate = json!({"op": "OPEN", "owner": "oo", "path": "t", "access": "write",
                          "deny": "none", "truncate": true});
    let t = at_the_limit(&mut a, &truncate, &deleg, &|| {
        assert_eq!(std::fs::read(s.root().join("t")).unwrap(), b"precious");
    });
    assert_eq!(std::fs::metadata(s.root().join("t")).unwrap().len(), 0);
    close(&mut a, &t);
    let deleg = keep_delegation(&mut a, "f");
    let create = json!({"op": "OPEN", "owner": "oo", "path": "new", "access": "both",
                        "deny": "none", "create": {"mode": "guarded"}});
    let c = at_the_limit(&mut a, &create, &deleg, &|| {
        assert!(!s.root().join("new").exists(), "created before the DELAY");
    });
    assert_eq!(c["created"], true, "{c}");
}

/// Re-review rr39a D: the reopen of a kept delegation's handle in
/// another open-owner's share group (re-review D3) closes the old handle
/// in the commit that records the new one; filterd killed after that
/// commit (`commit.after:6`: 1-2 the client and session, 3 the OPEN, 4 the
/// CLOSE, 5 the new handle, 6 the swap), its reattach reported the old
/// handle lost and nfsshim dropped the state, deleting the record that
/// named the new handle: the delegation NFS4ERR_EXPIRED, the new handle
/// named by nothing. Now the state takes the new handle.
#[test]
fn a_kept_delegations_reopen_survives_a_filterd_crash_at_its_commit() {
    for n in [5, 6] {
        let s = Scratch::new("nfs-deleg-close-recarry-crash");
        std::fs::write(s.root().join("f"), b"old").unwrap();
        let fp = format!("commit.after:{n}:kill");
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
        let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcx");
        let mut a = host_a(&nfs);
        let o = open_wanting_write_delegation(&mut a, "f");
        let deleg = o["delegation"]["stateid"].clone();
        close(&mut a, &o);
        let open2 = json!({"op": "OPEN", "owner": "o2", "path": "f", "access": "read",
                           "deny": "write"});
        a.seqid += 1;
        let first = a.send(open2.clone());
        assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
        d.wait_killed_at(&fp, Duration::from_secs(10));
        let _d2 = Filterd::start(&s, &[], &[]);
        let o2 = ok(a.resend_patiently(&open2, Duration::from_secs(20)));
        // (DELAY while nfsshim catches up with the reattach: re-sent.)
        let r = ok(a.call_patiently(read_req(&deleg, 3)));
        assert_eq!(r["data"], b64("old"), "{fp}: {r}");
        ok(a.call_patiently(json!({"op": "DELEGRETURN", "stateid": deleg})));
        assert_eq!(
            handles_on(&s, "f").len(),
            1,
            "{fp}: o2's alone: {:?}",
            handles_on(&s, "f")
        );
        close(&mut a, &o2);
        assert!(
            handles_on(&s, "f").is_empty(),
            "{fp}: {:?}",
            handles_on(&s, "f")
        );
    }
}

/// Re-review rr39a E: a CLOSE whose delegation is carried by a further
/// handle closes the open's own handle in the commit that records the
/// state closed; filterd killed after that commit (`commit.after:6`: 1-2
/// the client and session, 3-4 the OPENs, 6 the CLOSE's), its reattach
/// reported the own handle lost and nfsshim dropped the state, closing
/// the delegation's handle: the CLOSE re-sent was NFS4_OK but the
/// delegation NFS4ERR_EXPIRED. Now the state is what the commit recorded.
#[test]
fn a_close_moving_a_delegation_to_its_further_handle_survives_a_filterd_crash() {
    for at in ["after", "before"] {
        let s = Scratch::new("nfs-deleg-close-further-crash");
        std::fs::write(s.root().join("f"), b"old").unwrap();
        let fp = format!("commit.{at}:6:kill");
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
        let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dcz");
        let mut a = host_a(&nfs);
        ok(a.open("oo", "f", "read", "none", json!({})));
        let o = open_wanting_read_delegation(&mut a, "f");
        let deleg = o["delegation"]["stateid"].clone();
        let close = json!({"op": "CLOSE", "stateid": o["stateid"]});
        a.seqid += 1;
        let first = a.send(close.clone());
        assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
        d.wait_killed_at(&fp, Duration::from_secs(10));
        let _d2 = Filterd::start(&s, &[], &[]);
        ok(a.resend_patiently(&close, Duration::from_secs(20)));
        // (DELAY while nfsshim catches up with the reattach: re-sent.)
        let r = ok(a.call_patiently(read_req(&deleg, 3)));
        assert_eq!(r["data"], b64("old"), "{fp}: {r}");
        assert_eq!(
            handles_on(&s, "f").len(),
            1,
            "{fp}: {:?}",
            handles_on(&s, "f")
        );
        let mut b = host_b(&nfs);
        recalled_then_opened(&mut a, &mut b, "f", &deleg);
        assert_eq!(
            handles_on(&s, "f").len(),
            1,
            "{fp}: {:?}",
            handles_on(&s, "f")
        );
    }
}

/// Re-review rr39d F1: while any recall was outstanding on the nfsshim (or
/// any revocation unsettled), every sharing violation was answered
/// NFS4ERR_DELAY, whatever the file: a genuine SHARE_DENIED of another
/// file was DELAY for the whole break timeout (35 s here, the default).
/// Now only an OPEN of the recalled file is: the other file's denial is
/// SHARE_DENIED at once, the recalled one's still DELAY.
#[test]
fn an_unrelated_share_denied_stays_share_denied_while_a_recall_is_out() {
    let s = Scratch::new("nfs-deleg-mask");
    for f in ["f", "g"] {
        std::fs::write(s.root().join(f), f).unwrap();
    }
    let _d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dmk");
    let mut a = host_a(&nfs);
    let mut b = host_b(&nfs);
    let o = open_wanting_read_delegation(&mut a, "f");
    let deleg = o["delegation"]["stateid"].clone();
    ok(a.open("og", "g", "read", "write", json!({})));
    recalled_by(&mut a, &mut b, "f", "write", "none");
    // (A DELAY leaves the slot's seqid where it was.)
    let other = json!({"op": "OPEN", "owner": "og", "path": "g", "access": "write",
                       "deny": "none"});
    let r = b.send(other);
    assert_eq!(r["status"], "NFS4ERR_SHARE_DENIED", "another file: {r}");
    // The recalled file's own refusal (deny read against a's handle) is
    // still DELAY while the break is in progress.
    let r = b.open("od", "f", "read", "read", json!({}));
    assert_eq!(r["status"], "NFS4ERR_DELAY", "the recalled file: {r}");
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": deleg})));
}

/// Re-review rr39d F3: a revoked kept delegation whose handle's close
/// failed (`close.refuse:1:fail`, the first close filterd is asked for)
/// came off the revocation list anyway, so another client's OPEN refused
/// by that handle (deny read) was answered NFS4ERR_SHARE_DENIED until the
/// close was retried, though the handle was on its way out. Now the
/// revocation stays listed until the close is done: every answer is
/// DELAY until the OPEN is granted.
#[test]
fn an_open_refused_by_a_revoked_handle_whose_close_failed_is_delay() {
    let (s, _d) = filterd_on_f(
        "nfs-deleg-revoke-fail-delay",
        &["--break-timeout-ms", "1000"],
        &[("RKFILTER_FAILPOINTS", "close.refuse:1:fail")],
    );
    let log = s.dir.join("nfsshim.log");
    let nfs = Shim::start_logged("nfsshim", &s.socket(), "nfs-drd", &[], &log);
    let mut a = host_a(&nfs);
    let deleg = keep_delegation(&mut a, "f");
    let mut b = host_b(&nfs);
    let mut c = Nfs::connect(&nfs.addr, "host-c", "00000000000000cc");
    // b's OPEN shares with a's handle: granted at the recall timeout,
    // which revokes a's delegation; its handle's close then fails once.
    recalled_by(&mut a, &mut b, "f", "write", "none");
    let again = b_open("f", "write", "none");
    ok(b.resend_patiently(&again, Duration::from_secs(10)));
    // c's denies what a's handle does: DELAY while it is being closed
    // (the first try failed, the next one within the reaper's tick),
    // never SHARE_DENIED, then granted.
    rkfilter_tests::wait_for("the failed close", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("of a revoked delegation's closed open")
            .then_some(())
    });
    ok(c.call_patiently(
        json!({"op": "OPEN", "owner": "oc", "path": "f", "access": "read", "deny": "read"}),
    ));
    assert_revoked(&mut a, &deleg);
}

/// Re-review rr39d (the flake of
/// `a_delegation_kept_past_close_is_restored_and_revoked_at_the_recall_timeout`):
/// A read delegation of `f` (its OPEN `o`) for client `a`, with filterd's
/// break timeout at 1 s and nfsshim holding each revocation's event 3 s
/// (`NFSSHIM_TEST_REVOCATION_DELAY_MS`).
struct Held {
    // (Dropped in this order: the processes before their scratch dir.)
    a: Nfs,
    o: Value,
    /// nfsshim's standard error.
    log: std::path::PathBuf,
    nfs: Shim,
    _d: Filterd,
    _s: Scratch,
}

fn read_delegation_held(name: &str, instance: &str) -> Held {
    read_delegation_held_with(name, instance, &[])
}

/// As [`read_delegation_held`], filterd run with environment `env`.
fn read_delegation_held_with(name: &str, instance: &str, env: &[(&str, &str)]) -> Held {
    let (s, _d) = filterd_on_f(name, &["--break-timeout-ms", "1000"], env);
    let log = s.dir.join("nfsshim.log");
    let nfs = Shim::start_logged(
        "nfsshim",
        &s.socket(),
        instance,
        &[("NFSSHIM_TEST_REVOCATION_DELAY_MS", "3000")],
        &log,
    );
    let mut a = host_a(&nfs);
    let o = open_wanting_read_delegation(&mut a, "f");
    Held {
        _s: s,
        _d,
        nfs,
        a,
        o,
        log,
    }
}

/// filterd grants a conflicting OPEN once the recall timeout lowered the
/// delegation's lease, but nfsshim heard of the revocation on its events
/// thread, maybe after answering that OPEN, and meanwhile served the
/// holder's READ under the revoked delegation NFS4_OK. The events thread
/// held here (`NFSSHIM_TEST_REVOCATION_DELAY_MS`), the READ after the
/// OPEN's answer is NFS4ERR_EXPIRED all the same: nfsshim asks filterd
/// about the recalled lease before it answers the OPEN.
#[test]
fn a_read_after_a_granted_conflicting_open_is_expired_however_late_the_revocation_event() {
    let mut h = read_delegation_held("nfs-deleg-late-event", "nfs-dle");
    let deleg = h.o["delegation"]["stateid"].clone();
    close(&mut h.a, &h.o);
    let mut b = host_b(&h.nfs);
    recalled_by(&mut h.a, &mut b, "f", "write", "none");
    let again = b_open("f", "write", "none");
    let t0 = Instant::now();
    ok(b.resend_patiently(&again, Duration::from_secs(10)));
    assert_revoked(&mut h.a, &deleg);
    // (The revocation's event was still held then.)
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

/// Re-review rr39i 1: before its own RENAME, nfsshim acknowledged R for
/// every delegation on the name, so a write delegation's lease lost W as
/// well as H while nfsshim still took it for a write delegation: another
/// client's read OPEN of the new name was granted at once with no
/// CB_RECALL (the holder's cached writes unseen), a write OPEN revoked it
/// unrecalled. A namespace change breaks only H: the write delegation
/// keeps R and W, and another client's OPEN recalls it.
#[test]
fn a_write_delegation_renamed_by_its_client_is_still_recalled() {
    let s = Scratch::new("nfs-deleg-wrename");
    std::fs::write(s.root().join("f"), b"").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-dwr");
    let mut a = host_a(&nfs);
    let mut b = host_b(&nfs);
    let o = open_wanting_write_delegation(&mut a, "f");
    let deleg = granted(&o, "write");
    ok(a.call(json!({"op": "RENAME", "from": "f", "to": "f2"})));
    let cb = recalled_by(&mut a, &mut b, "f2", "read", "none");
    assert_eq!(cb["stateid"]["other"], deleg["other"], "{cb}");
    ok(a.call(json!({"op": "WRITE", "stateid": deleg, "offset": 0, "data": b64("cached")})));
    ok(a.call(json!({"op": "COMMIT", "stateid": deleg})));
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": deleg})));
    let again = b_open("f2", "read", "none");
    let r = ok(b.resend_patiently(&again, Duration::from_secs(10)));
    let r = ok(b.call(read_req(&r["stateid"], 6)));
    assert_eq!(r["data"], b64("cached"), "{r}");
}

/// Re-review rr39i 2: a kept read delegation's lease (RH) that another
/// client's deny-read OPEN recalls is broken to R only; at the break
/// timeout filterd lowers it to R, which still has R, so until the events
/// thread handled the revocation's event nfsshim took the delegation for
/// kept, and the OPEN re-sent, refused by the kept handle, was
/// NFS4ERR_SHARE_DENIED. Below the state its break began from, with no
/// break in progress, the lease counts as lowered: the OPEN revokes the
/// delegation itself (`open_refused`'s Lowered branch), is DELAY until the
/// handle is closed, then granted — before the held event is handled.
#[test]
fn a_deny_read_open_after_a_timed_out_h_break_is_granted_not_share_denied() {
    let mut h = read_delegation_held("nfs-deleg-hdeny", "nfs-dhd");
    let deleg = h.o["delegation"]["stateid"].clone();
    close(&mut h.a, &h.o);
    let mut b = host_b(&h.nfs);
    recalled_by(&mut h.a, &mut b, "f", "read", "read");
    let again = b_open("f", "read", "read");
    let t0 = Instant::now();
    ok(b.resend_patiently(&again, Duration::from_secs(10)));
    // (The revocation's event was still held then.)
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_revoked(&mut h.a, &deleg);
}

/// Re-review rr39i 5: a recall was forgotten a lease period (`--lease-ms`)
/// after its CB_RECALL; with filterd's break timeout longer than that,
/// another client's OPEN that the recalled delegation's handle refused
/// after that was NFS4ERR_SHARE_DENIED. The recall is kept while the
/// delegation is: the OPEN is DELAY until the timeout lowers the lease,
/// then revokes the delegation itself (however late the revocation's
/// event) and is granted.
#[test]
fn a_recall_outlasting_the_nfs_lease_still_delays_a_refused_open() {
    let (s, _d) = filterd_on_f("nfs-deleg-longbreak", &["--break-timeout-ms", "2500"], &[]);
    let nfs = Shim::start_with_env_args(
        "nfsshim",
        &s.socket(),
        "nfs-dlb",
        &["--lease-ms", "1000"],
        &[("NFSSHIM_TEST_REVOCATION_DELAY_MS", "4000")],
    );
    let mut a = host_a(&nfs);
    let deleg = keep_delegation(&mut a, "f");
    let mut b = host_b(&nfs);
    recalled_by(&mut a, &mut b, "f", "read", "read");
    let again = b_open("f", "read", "read");
    let t0 = Instant::now();
    let r = rkfilter_tests::wait_for(
        "an answer other than DELAY",
        Duration::from_secs(10),
        || {
            // Both clients keep their NFS leases; `a` never returns it.
            let _ = a.call(read_req(&deleg, 1));
            let r = b.send(again.clone());
            (r["status"] != "NFS4ERR_DELAY").then_some(r)
        },
    );
    ok(r);
    // Revoked by the OPEN (the revocation's event was still held then).
    let took = t0.elapsed();
    assert!(
        took > Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

/// Re-review rr39i 3: when an OPEN under another owner moved a kept
/// delegation to a new handle, the commit closed the old one before the
/// lease's holder was pointed at the new one; another client's OPEN of
/// the file granted (or refused) in between asked filterd about the
/// recalled lease by the old handle, found it gone, took the delegation
/// for lowered and revoked it while its client still held it. Held there (the test hook), the holder
/// still reads under it afterwards.
#[test]
fn a_recall_asked_while_a_kept_delegation_moves_handle_keeps_it() {
    let (s, _d) = filterd_on_f("nfs-deleg-swapask", &["--break-timeout-ms", "20000"], &[]);
    let log = s.dir.join("nfsshim.log");
    let nfs = Shim::start_logged(
        "nfsshim",
        &s.socket(),
        "nfs-dsa",
        &[("NFSSHIM_TEST_SWAP_DELAY_MS", "3000")],
        &log,
    );
    let mut a = host_a(&nfs);
    let mut b = host_b(&nfs);
    let deleg = keep_delegation(&mut a, "f");
    // Recalled; the holder's own RENAME gives up H, which ends the break
    // (the recall stays noted while the delegation is held).
    recalled_by(&mut a, &mut b, "f", "read", "read");
    ok(a.call(json!({"op": "RENAME", "from": "f", "to": "g"})));
    let (a, r) = std::thread::scope(|sc| {
        let t = sc.spawn(move || {
            let r = a.open("o2", "g", "read", "write", json!({}));
            (a, r)
        });
        wait_for_log(&log, "the move from handle");
        // Granted (it conflicts with nothing), with a recall of the file
        // noted: nfsshim asks filterd about the recalled lease. (Its slot
        // still at the DELAY's seqid.)
        ok(b.send(b_open("g", "read", "none")));
        t.join().unwrap()
    });
    let mut a = a;
    ok(r);
    let r = a.call(read_req(&deleg, 1));
    assert_eq!(r["status"], "NFS4_OK", "still held: {r}");
}

fn wait_for_log(log: &std::path::Path, what: &str) {
    rkfilter_tests::wait_for(what, Duration::from_secs(10), || {
        std::fs::read_to_string(log)
            .ok()
            .filter(|l| l.contains(what))
            .map(|_| ())
    });
}

/// Re-review rr39i 2, nfsshim's own acknowledgement: a recalled kept
/// delegation's holder RENAMEs the file, which gives up H (ending the
/// break) without waiting for the recall. Its lease is then below the
/// state the break began from, but by nfsshim's own doing: another
/// client's OPEN granted after does not take it for lowered at the break
/// timeout, and the delegation stays its holder's.
#[test]
fn a_recalled_delegation_whose_holder_renamed_the_file_is_not_taken_for_lowered() {
    let (s, _d) = filterd_on_f("nfs-deleg-ownack", &["--break-timeout-ms", "20000"], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-doa");
    let mut a = host_a(&nfs);
    let mut b = host_b(&nfs);
    let deleg = keep_delegation(&mut a, "f");
    recalled_by(&mut a, &mut b, "f", "read", "read");
    ok(a.call(json!({"op": "RENAME", "from": "f", "to": "g"})));
    // (Its slot still at the DELAY's seqid.)
    ok(b.send(b_open("g", "read", "none")));
    let r = a.call(read_req(&deleg, 1));
    assert_eq!(r["status"], "NFS4_OK", "still held: {r}");
}

/// Re-review rr39k B1: another client's RENAME breaks H of a read
/// delegation's lease (RH to R); its holder RENAMEs the file too,
/// acknowledging the break itself (to R) before the events thread handles
/// the break's event (held here, `NFSSHIM_TEST_RECALL_DELAY_MS`). The
/// recall then recorded began from RH; the own ack, made while no recall
/// was recorded, still counts: another client's OPEN granted after does
/// not take the R lease for lowered at the break timeout and revoke the
/// delegation (a write delegation's holder would lose its cached writes).
#[test]
fn a_delegation_renamed_by_its_client_before_the_break_event_is_kept() {
    let (s, _d) = filterd_on_f("nfs-deleg-lateack", &["--break-timeout-ms", "20000"], &[]);
    let log = s.dir.join("nfsshim.log");
    let nfs = Shim::start_logged(
        "nfsshim",
        &s.socket(),
        "nfs-dla",
        &[("NFSSHIM_TEST_RECALL_DELAY_MS", "3000")],
        &log,
    );
    let mut a = host_a(&nfs);
    let mut b = host_b(&nfs);
    let o = open_wanting_read_delegation(&mut a, "f");
    let deleg = granted(&o, "read");
    // Another client's RENAME breaks H, waiting for it; its event is held.
    b.seqid += 1;
    let seq = |c: &Nfs| json!({"sessionid": c.sessionid, "slot": 0, "seqid": c.seqid});
    let req = json!({"op": "RENAME", "from": "f", "to": "x", "seq": seq(&b)});
    let b_id = b.c.send_only("xid", req);
    wait_for_log(&log, "the recall of lease");
    // The holder's own RENAME acknowledges the break (whichever of the two
    // renames goes first); the held event's recall comes before or after
    // its answer.
    a.seqid += 1;
    let req = json!({"op": "RENAME", "from": "f", "to": "g", "seq": seq(&a)});
    let id = a.c.send_only("xid", req);
    let (_, mut seen) = a.c.reply_to("xid", id).expect("A's RENAME answered");
    if seen.is_empty() {
        seen.push(a.c.next_line().expect("CB_RECALL"));
    }
    assert_eq!(seen[0]["op"], "CB_RECALL", "{seen:?}");
    let (r, _) = b.c.reply_to("xid", b_id).expect("B's RENAME answered");
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    let now = if s.root().join("g").exists() {
        "g"
    } else {
        "x"
    };
    ok(b.call(b_open(now, "read", "none")));
    let r = a.call(read_req(&deleg, 1));
    assert_eq!(r["status"], "NFS4_OK", "still held: {r}");
}

/// Re-review rr39l: a read delegation's holder RENAMEs its file (its own
/// ack lowers the lease to R, marked as acknowledged), CLOSEs (the
/// delegation kept), and OPENs it again under another owner with a deny:
/// the kept handle is reopened under the same lease key, and filterd
/// raises the lease back to RH. Another client's RENAME then breaks H,
/// unanswered; at the timeout filterd lowers the lease to R. The old mark
/// made that recall begin from R, so until the events thread handled the
/// revocation's event (held here) the R lease looked kept and a deny-read
/// OPEN refused by the kept handle was NFS4ERR_SHARE_DENIED. The mark goes
/// once the lease is raised again: the OPEN is DELAY, then granted.
#[test]
fn a_deny_read_open_after_a_raised_then_timed_out_lease_is_granted() {
    let mut h = read_delegation_held("nfs-deleg-raised", "nfs-drs");
    let deleg = granted(&h.o, "read");
    ok(h.a.call(json!({"op": "RENAME", "from": "f", "to": "g"})));
    close(&mut h.a, &h.o);
    let o2 = ok(h.a.open("o2", "g", "read", "write", json!({})));
    close(&mut h.a, &o2);
    let mut b = host_b(&h.nfs);
    let r = b.call_patiently(json!({"op": "RENAME", "from": "g", "to": "h"}));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    next_recall(&mut h.a);
    let t0 = Instant::now();
    let r = b.call_patiently(json!({"op": "OPEN", "owner": "ob", "path": "h",
                                    "access": "read", "deny": "read"}));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    // (The revocation's event was still held then.)
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_revoked(&mut h.a, &deleg);
}

/// Re-review rr40a E1 (a): a recall kept the state its break began from
/// lowered by the own-acknowledgement mark as it was when the events
/// thread handled the break, and the mark's later removal never reached
/// it. A read delegation's holder RENAMEs its file (its own ack lowers the
/// lease to R, marked), CLOSEs (the delegation kept) and OPENs it again
/// under another owner with a deny: filterd raises the lease back to RH,
/// and the reopen is held there (`NFSSHIM_TEST_RAISE_DELAY_MS`), before
/// the mark goes. Another client's deny-read OPEN breaks H meanwhile; its
/// recall is recorded with the mark still there, and at the timeout
/// filterd lowers the lease to R (the revocation's event held). Taken as
/// begun from R, the R lease looked kept and the OPEN re-sent after the
/// reopen, refused by the kept handle, was NFS4ERR_SHARE_DENIED; worked
/// out when read, the mark gone, it began from RH: DELAY, then granted.
#[test]
fn a_recall_recorded_while_a_raised_lease_is_unmarked_is_lowered() {
    let (s, _d) = filterd_on_f("nfs-deleg-raise-race", &["--break-timeout-ms", "1000"], &[]);
    let log = s.dir.join("nfsshim.log");
    let nfs = Shim::start_logged(
        "nfsshim",
        &s.socket(),
        "nfs-drr",
        &[
            ("NFSSHIM_TEST_RAISE_DELAY_MS", "2000"),
            // Only to log when the recall is handled.
            ("NFSSHIM_TEST_RECALL_DELAY_MS", "1"),
            ("NFSSHIM_TEST_REVOCATION_DELAY_MS", "5000"),
        ],
        &log,
    );
    let mut a = host_a(&nfs);
    let mut b = host_b(&nfs);
    let o = open_wanting_read_delegation(&mut a, "f");
    let deleg = granted(&o, "read");
    ok(a.call(json!({"op": "RENAME", "from": "f", "to": "g"})));
    close(&mut a, &o);
    a.seqid += 1;
    let seq = |c: &Nfs| json!({"sessionid": c.sessionid, "slot": 0, "seqid": c.seqid});
    let req = json!({"op": "OPEN", "owner": "o2", "path": "g", "access": "read",
                     "deny": "write", "seq": seq(&a)});
    let id = a.c.send_only("xid", req);
    wait_for_log(&log, "the raise of lease");
    let open_b = b_open("g", "read", "read");
    let r = b.call(open_b.clone());
    assert_eq!(r["status"], "NFS4ERR_DELAY", "recalled first: {r}");
    wait_for_log(&log, "the recall of lease");
    let (o2, mut seen) = a.c.reply_to("xid", id).expect("A's OPEN answered");
    let o2 = ok(o2);
    // The break timed out (its event held).
    wait_for_log(&log, "the revocation of lease");
    if seen.is_empty() {
        seen.push(a.c.next_line().expect("CB_RECALL"));
    }
    assert_eq!(seen[0]["op"], "CB_RECALL", "{seen:?}");
    close(&mut a, &o2);
    let t0 = Instant::now();
    let r = b.resend_patiently(&open_b, Duration::from_secs(10));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    // (The revocation's event was still held then.)
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_revoked(&mut a, &deleg);
}

/// Re-review rr40a E1 (stale): a recall recorded while the
/// own-acknowledgement mark was there kept the mark's state after the
/// mark went. A deny-read OPEN recalls a kept read delegation; its holder
/// RENAMEs the file, acknowledging H itself (marked) before the recall is
/// handled (held, `NFSSHIM_TEST_RECALL_DELAY_MS`), so the recall counts
/// as begun from R. The holder's OPEN under another owner with a deny
/// raises the lease back to RH, and the mark goes. The OPEN again breaks
/// H, unanswered; at the timeout filterd lowers the lease to R, while the
/// events thread still holds the new recall. The old recall's R made the
/// R lease look kept and the OPEN re-sent, refused by the kept handle,
/// NFS4ERR_SHARE_DENIED; now it is DELAY, then granted.
#[test]
fn a_recall_recorded_before_the_mark_went_counts_from_the_raised_lease() {
    let (s, _d) = filterd_on_f(
        "nfs-deleg-stale-recall",
        &["--break-timeout-ms", "2000"],
        &[],
    );
    let nfs = Shim::start_logged(
        "nfsshim",
        &s.socket(),
        "nfs-dsr",
        &[("NFSSHIM_TEST_RECALL_DELAY_MS", "5000")],
        &s.dir.join("nfsshim.log"),
    );
    let mut a = host_a(&nfs);
    let mut b = host_b(&nfs);
    let o = open_wanting_read_delegation(&mut a, "f");
    let deleg = granted(&o, "read");
    close(&mut a, &o);
    let r = b.open("ob", "f", "read", "read", json!({}));
    assert_eq!(r["status"], "NFS4ERR_DELAY", "recalled first: {r}");
    ok(a.call(json!({"op": "RENAME", "from": "f", "to": "g"})));
    next_recall(&mut a);
    let o2 = ok(a.open("o2", "g", "read", "write", json!({})));
    close(&mut a, &o2);
    let open_b = b_open("g", "read", "read");
    let t0 = Instant::now();
    // (Its slot still at the DELAY's seqid.)
    let r = b.resend_patiently(&open_b, Duration::from_secs(10));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    // (The new recall's event was still held then.)
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_revoked(&mut a, &deleg);
}

/// The holder's own RENAME acknowledges H of its kept read
/// delegation's lease (to R) itself, but that acknowledgement's commit
/// fails (`commit.before:5:fail`: 1-2 the client and session, 3 the OPEN,
/// 4 the CLOSE, 5 the ack): filterd refuses it and the lease stays RH. The
/// RENAME then breaks H itself, unanswered; at the timeout filterd lowers
/// the lease to R. With the refused ack's mark left, the recall began from
/// R and the R lease looked kept: a deny-read OPEN refused by the kept
/// handle before the revocation's event was NFS4ERR_SHARE_DENIED.
#[test]
fn a_refused_own_ack_leaves_no_mark() {
    let mut h = read_delegation_held_with(
        "nfs-deleg-refused-ack",
        "nfs-rra",
        &[("RKFILTER_FAILPOINTS", "commit.before:5:fail")],
    );
    let deleg = granted(&h.o, "read");
    close(&mut h.a, &h.o);
    h.a.seqid += 1;
    let seq = |c: &Nfs| json!({"sessionid": c.sessionid, "slot": 0, "seqid": c.seqid});
    let req = json!({"op": "RENAME", "from": "f", "to": "g", "seq": seq(&h.a)});
    let r = loop {
        let id = h.a.c.send_only("xid", req.clone());
        let (r, seen) = h.a.c.reply_to("xid", id).expect("A's RENAME answered");
        eprintln!("A's RENAME {r}, seen {seen:?}");
        if r["status"] != "NFS4ERR_DELAY" {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    let text = std::fs::read_to_string(&h.log).unwrap_or_default();
    assert!(
        text.contains("before a namespace change"),
        "the own ack was refused: {text}"
    );
    let mut b = host_b(&h.nfs);
    let t0 = Instant::now();
    let r = b.call_patiently(json!({"op": "OPEN", "owner": "ob", "path": "g",
                                    "access": "read", "deny": "read"}));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    eprintln!("B's OPEN after {:?}", t0.elapsed());
    assert_revoked(&mut h.a, &deleg);
}

/// Attack44 F1/F2: a truncation writes, so an OPEN asking for it without
/// write access is NFS4ERR_INVAL, as Linux nfsd answers it
/// (`nfsd4_truncate`), and changes nothing: another owner's deny=write
/// reservation keeps its file, and a read delegation is not recalled by
/// it. With write access the same OPEN meets the reservation
/// (NFS4ERR_SHARE_DENIED) as any writer does. Before, the read-only
/// truncating OPEN was granted as a reader: it emptied the file under
/// the deny=write holder and recalled no read delegation.
#[test]
fn a_truncating_open_without_write_access_is_invalid() {
    let (s, _d) = filterd_on_f("nfs-trunc-read", &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-tr");
    let mut a = host_a(&nfs);
    ok(a.open("oa", "f", "read", "write", json!({})));
    let mut b = host_b(&nfs);
    for extra in [
        json!({"truncate": true}),
        json!({"truncate": true, "create": {"mode": "unchecked"}}),
    ] {
        let r = b.open("ob", "f", "read", "none", extra.clone());
        assert_eq!(r["status"], "NFS4ERR_INVAL", "{extra}: {r}");
        assert_eq!(std::fs::read(s.root().join("f")).unwrap(), b"f", "{extra}");
        let r = b.open("ob", "f", "both", "none", extra.clone());
        assert_eq!(r["status"], "NFS4ERR_SHARE_DENIED", "{extra}: {r}");
        assert_eq!(std::fs::read(s.root().join("f")).unwrap(), b"f", "{extra}");
    }
    // A read delegation of another file: kept, nothing recalled (the
    // next line a is sent answers its own request).
    std::fs::write(s.root().join("g"), b"g").unwrap();
    let o = open_wanting_read_delegation(&mut a, "g");
    granted(&o, "read");
    let r = b.open("ob", "g", "read", "none", json!({"truncate": true}));
    assert_eq!(r["status"], "NFS4ERR_INVAL", "{r}");
    assert_eq!(std::fs::read(s.root().join("g")).unwrap(), b"g");
    a.seqid += 1;
    let (r, seen) = a.send_seeing(&read_req(&o["stateid"], 1));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    assert!(seen.is_empty(), "recalled: {seen:?}");
    // Byte-range locks are checked by I/O, not by OPEN, for a truncating
    // one as for any writer's (and as Linux nfsd): over another owner's
    // locked range, the truncating OPEN with write access is granted.
    std::fs::write(s.root().join("h"), b"0123456789").unwrap();
    let oh = ok(a.open("oa", "h", "both", "none", json!({})));
    ok(lock(&mut a, &oh["stateid"], "la", 0));
    ok(b.open("ob", "h", "both", "none", json!({"truncate": true})));
    assert_eq!(std::fs::metadata(s.root().join("h")).unwrap().len(), 0);
}
