//! nfsl/1 through the real nfsshim and filterd (and smbshim for the
//! cross-protocol paragraphs): client identity and reboot, leases, the
//! exactly-once slot table across nfsshim and filterd restarts, stateids,
//! share reservations, create modes, locks, delegations, REMOVE/RENAME
//! against smbl/1 opens, framing and malformed input.

use std::time::Duration;

use base64::Engine as _;
use rkfilter_tests::{wait_for, Filterd, LineClient, Nfs, Scratch, Shim};
use serde_json::{json, Value};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn ok(r: Value) -> Value {
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    r
}

fn create() -> Value {
    json!({"create": {"mode": "unchecked"}})
}

/// `r` is NFS4ERR_DENIED with `denied` naming this lock.
fn assert_denied(r: &Value, offset: u64, length: u64, kind: &str, owner: &str) {
    assert_eq!(r["status"], "NFS4ERR_DENIED", "{r}");
    let d = &r["denied"];
    assert_eq!(
        (
            d["offset"].as_u64(),
            d["length"].as_u64(),
            d["type"].as_str(),
            d["owner"].as_str()
        ),
        (Some(offset), Some(length), Some(kind), Some(owner)),
        "{r}"
    );
}

/// filterd and nfsshim (instance nfs-a) in a new scratch dir `name`, and
/// client host-a's session there.
fn host_a(name: &str) -> (Scratch, Filterd, Shim, Nfs) {
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("nfsshim", &s.socket(), "nfs-a");
    let a = Nfs::connect(&shim.addr, "host-a", "0123456789abcdef");
    (s, d, shim, a)
}

/// A failed mutating request's reply is kept on its slot, in nfsshim and
/// as filterd's record: its `error` quoted the client's path whole, so a
/// REMOVE of a 2,600-byte path of control characters (six bytes each in
/// JSON) stored a 16 KiB record per slot — a peer's clients could fill
/// filterd's store (review rv-shims 4). The text is cut short now; the
/// re-send gets the same short reply.
#[test]
fn a_failed_request_s_recorded_reply_does_not_quote_its_input_whole() {
    let (_s, _d, _shim, mut a) = host_a("nfs-long-error");
    let path = "\u{1}".repeat(2600);
    let r = a.call(json!({"op": "REMOVE", "path": path}));
    assert_ne!(r["status"], "NFS4_OK", "{r}");
    let line = r.to_string();
    assert!(line.len() < 2048, "{} bytes: {}", line.len(), &line[..100]);
    let again = a.send(json!({"op": "REMOVE", "path": path}));
    assert_eq!(
        (&again["status"], &again["error"]),
        (&r["status"], &r["error"]),
        "the slot's reply"
    );
}

#[test]
fn identity_sessions_slots_and_stateids() {
    let (s, _d, _shim, mut a) = host_a("nfs-basic");
    // The same owner and verifier: the same clientid, confirmed.
    let r = a.c.call_with(
        "xid",
        json!({"op": "EXCHANGE_ID", "owner": "host-a", "verifier": "0123456789abcdef"}),
    );
    assert_eq!(
        (r["clientid"].as_str(), r["confirmed"].as_bool()),
        (Some(a.clientid.as_str()), Some(true))
    );
    let o = ok(a.open("p1", "f", "both", "none", create()));
    assert_eq!(o["created"], true);
    let sid = o["stateid"].clone();
    let w = ok(a.call(json!({"op": "WRITE", "stateid": sid, "offset": 0, "data": b64("hello")})));
    assert_eq!(w["count"], 5);
    // Re-sent on its slot: the cached reply, not a second write.
    std::fs::write(s.root().join("f"), b"HELLO").unwrap();
    let again = a.send(json!({"op": "WRITE", "stateid": sid, "offset": 0, "data": b64("hello")}));
    assert_eq!(again["count"], 5);
    assert_eq!(
        std::fs::read(s.root().join("f")).unwrap(),
        b"HELLO",
        "not executed again"
    );
    let r = ok(a.call(json!({"op": "READ", "stateid": sid, "offset": 0, "count": 100})));
    assert_eq!(
        (r["data"].as_str(), r["eof"].as_bool()),
        (Some(b64("HELLO").as_str()), Some(true))
    );
    // eof: the read reached the end of the file — also a read that ends
    // exactly there (RFC 8881 18.22.3), and not one that bytes follow.
    for (offset, count, eof) in [(0, 5, true), (2, 3, true), (0, 4, false), (5, 1, true)] {
        let r = ok(a.call(json!({"op": "READ", "stateid": sid, "offset": offset, "count": count})));
        assert_eq!(r["eof"], eof, "READ {offset} {count}: {r}");
    }
    // The slot table's refusals.
    let mut bad = json!({"op": "READ", "stateid": sid, "offset": 0, "count": 1});
    bad["seq"] = json!({"sessionid": a.sessionid, "slot": 0, "seqid": a.seqid + 5});
    assert_eq!(
        a.c.call_with("xid", bad.clone())["status"],
        "NFS4ERR_SEQ_MISORDERED"
    );
    bad["seq"] = json!({"sessionid": a.sessionid, "slot": 999, "seqid": 1});
    assert_eq!(
        a.c.call_with("xid", bad.clone())["status"],
        "NFS4ERR_BADSLOT"
    );
    bad["seq"] = json!({"sessionid": "nope", "slot": 0, "seqid": 1});
    assert_eq!(a.c.call_with("xid", bad)["status"], "NFS4ERR_BADSESSION");
    // Another slot has its own seqids.
    let mut other_slot = json!({"op": "READ", "stateid": sid, "offset": 0, "count": 1});
    other_slot["seq"] = json!({"sessionid": a.sessionid, "slot": 3, "seqid": 1});
    ok(a.c.call_with("xid", other_slot));
    // Stateids: an older seqid, an unknown other, seqid 0 = current.
    let up = ok(a.open("p1", "f", "read", "none", json!({})));
    assert_eq!(
        up["stateid"]["other"], sid["other"],
        "one open state per owner and file"
    );
    assert_eq!(up["stateid"]["seqid"], 2, "upgraded: {up}");
    let old = a.call(json!({"op": "READ", "stateid": sid, "offset": 0, "count": 1}));
    assert_eq!(old["status"], "NFS4ERR_OLD_STATEID");
    let unknown = a.call(
        json!({"op": "READ", "stateid": {"other": "Oxyz", "seqid": 0}, "offset": 0, "count": 1}),
    );
    assert_eq!(unknown["status"], "NFS4ERR_BAD_STATEID");
    let cur = json!({"other": sid["other"], "seqid": 0});
    ok(a.call(json!({"op": "READ", "stateid": cur, "offset": 0, "count": 1})));
    ok(a.call(json!({"op": "RECLAIM_COMPLETE"})));
    ok(a.call(json!({"op": "CLOSE", "stateid": cur})));
    let closed = a.call(json!({"op": "READ", "stateid": cur, "offset": 0, "count": 1}));
    assert_eq!(closed["status"], "NFS4ERR_BAD_STATEID");
    // Malformed input: errors, the connection stays usable.
    let r = a.c.raw(b"{nope\n").unwrap();
    assert_eq!(
        (r["status"].as_str(), r["xid"].is_null()),
        (Some("NFS4ERR_INVAL"), true)
    );
    let r =
        a.call(json!({"op": "OPEN", "owner": 5, "path": "g", "access": "read", "deny": "none"}));
    assert_eq!(r["status"], "NFS4ERR_INVAL");
    let r = a.call(
        json!({"op": "OPEN", "owner": "p", "path": "../g", "access": "read", "deny": "none"}),
    );
    assert_eq!(r["status"], "NFS4ERR_INVAL");
    let r =
        a.call(json!({"op": "OPEN", "owner": "p", "path": "g", "access": "all", "deny": "none"}));
    assert_eq!(r["status"], "NFS4ERR_INVAL");
    let r = a.c.call_with(
        "xid",
        json!({"op": "EXCHANGE_ID", "owner": "x", "verifier": "short"}),
    );
    assert_eq!(r["status"], "NFS4ERR_INVAL");
    let r = a.call(json!({"op": "FROB"}));
    assert_eq!(r["status"], "NFS4ERR_NOTSUPP");
    let r = a.call(
        json!({"op": "OPEN", "owner": "p", "path": "missing", "access": "read", "deny": "none"}),
    );
    assert_eq!(r["status"], "NFS4ERR_NOENT");
    let mut long = vec![b'x'; (4 << 20) + 10];
    long.push(b'\n');
    let r = a.c.raw(&long).unwrap();
    assert_eq!(
        (r["status"].as_str(), r["xid"].is_null()),
        (Some("NFS4ERR_INVAL"), true)
    );
    assert!(
        a.c.raw(b"{\"op\":\"RECLAIM_COMPLETE\",\"xid\":1}\n")
            .is_none(),
        "closed"
    );
}

#[test]
fn slots_and_stateids_survive_nfsshim_and_filterd_restarts() {
    let s = Scratch::new("nfs-failover");
    std::fs::write(s.root().join("victim"), b"x").unwrap();
    let mut d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("nfsshim", &s.socket(), "nfs-f");
    let mut a = Nfs::connect(&shim.addr, "host-a", "00000000000000aa");
    let o = ok(a.open("p", "data", "both", "write", create()));
    let sid = o["stateid"].clone();
    ok(a.call(json!({"op": "WRITE", "stateid": sid, "offset": 0, "data": b64("kept")})));
    let rm = json!({"op": "REMOVE", "path": "victim"});
    ok(a.call(rm.clone()));
    assert!(!s.root().join("victim").exists());

    // filterd is SIGKILLed and restarted; nfsshim rides it out.
    d.kill9();
    let d2 = Filterd::start(&s, &[], &[]);
    // The REMOVE re-sent on its slot: the cached NFS4_OK, not NOENT.
    let r = wait_for("nfsshim to reattach", Duration::from_secs(10), || {
        let r = a.send(rm.clone());
        (r["status"] != "NFS4ERR_DELAY").then_some(r)
    });
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    // I/O waits (DELAY) until nfsshim has re-learned which files have locks.
    let r = ok(a.call_patiently(json!({"op": "READ", "stateid": sid, "offset": 0, "count": 10})));
    assert_eq!(r["data"], b64("kept"));
    std::fs::write(s.root().join("victim"), b"again").unwrap();
    let rm = json!({"op": "REMOVE", "path": "victim"});
    ok(a.call_patiently(rm.clone()));

    // nfsshim is SIGKILLed; a replacement with the same instance carries on
    // with the same clientid, sessionid and stateid.
    shim.kill9();
    let shim = Shim::start("nfsshim", &s.socket(), "nfs-f");
    a.c = LineClient::connect(&shim.addr);
    let r = a.send(rm);
    assert_eq!(
        r["status"], "NFS4_OK",
        "the slot's cached reply after the replacement: {r}"
    );
    // A slot never used is at seqid 0 after the restore too: seqid 0 there
    // is neither a replay nor the next request, and runs nothing (review
    // C-3: it ran).
    std::fs::write(s.root().join("spared"), b"x").unwrap();
    let mut zero = json!({"op": "REMOVE", "path": "spared"});
    zero["seq"] = json!({"sessionid": a.sessionid, "slot": 5, "seqid": 0});
    assert_eq!(
        a.c.call_with("xid", zero)["status"],
        "NFS4ERR_SEQ_MISORDERED"
    );
    assert!(s.root().join("spared").exists(), "a misordered REMOVE ran");
    let r = ok(a.call(json!({"op": "READ", "stateid": sid, "offset": 0, "count": 10})));
    assert_eq!(r["data"], b64("kept"));
    let r = a.c.call_with(
        "xid",
        json!({"op": "EXCHANGE_ID", "owner": "host-a", "verifier": "00000000000000aa"}),
    );
    assert_eq!(r["clientid"].as_str(), Some(a.clientid.as_str()));
    // Its share reservation (deny write) still holds.
    let mut b = Nfs::connect(&shim.addr, "host-b", "00000000000000bb");
    let r = b.open("q", "data", "write", "none", json!({}));
    assert_eq!(r["status"], "NFS4ERR_SHARE_DENIED", "{r}");
    // filterctl shows the clients, live and post-mortem.
    let sock = s.socket().display().to_string();
    let live = rkfilter_tests::filterctl(&["--socket", &sock, "clients", "--json"]).json();
    let owners = |v: &Value| -> Vec<String> {
        let mut o: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["owner"].as_str().unwrap().to_owned())
            .collect();
        o.sort();
        o
    };
    assert_eq!(owners(&live), ["host-a", "host-b"]);
    let mut d2 = d2;
    d2.kill9();
    let state = s.state().display().to_string();
    let dead = rkfilter_tests::filterctl(&["--state", &state, "clients", "--json"]).json();
    assert_eq!(owners(&dead), ["host-a", "host-b"]);
    let table = rkfilter_tests::filterctl(&["--state", &state, "clients"]);
    assert!(
        table.stdout.contains("host-a") && table.stdout.contains("2 client(s)"),
        "{}",
        table.stdout
    );
}

#[test]
fn reboot_and_lease_expiry_release_state() {
    let s = Scratch::new("nfs-lease");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start_with("nfsshim", &s.socket(), "nfs-l", &["--lease-ms", "1500"]);
    let mut a = Nfs::connect(&shim.addr, "host-a", "1111111111111111");
    ok(a.open("p", "f", "both", "both", create()));
    let mut b = Nfs::connect(&shim.addr, "host-b", "2222222222222222");
    assert_eq!(
        b.open("q", "f", "read", "none", json!({}))["status"],
        "NFS4ERR_SHARE_DENIED"
    );
    // A reboots (new verifier): its old incarnation's reservation goes.
    let old = a.clientid.clone();
    let a2 = Nfs::connect(&shim.addr, "host-a", "3333333333333333");
    assert_ne!(a2.clientid, old);
    let o = ok(b.open("q", "f", "read", "none", json!({})));
    let r =
        a.c.call_with("xid", json!({"op": "CREATE_SESSION", "clientid": old}));
    assert_eq!(r["status"], "NFS4ERR_STALE_CLIENTID");
    // B stops renewing: after its lease its state is released.
    let bsid = o["stateid"].clone();
    let mut c = Nfs::connect(&shim.addr, "host-c", "4444444444444444");
    let r = wait_for("B's lease to lapse", Duration::from_secs(10), || {
        // C keeps its own lease alive meanwhile.
        let r = c.open("r", "f", "both", "both", create());
        (r["status"] == "NFS4_OK").then_some(r)
    });
    assert_eq!(r["created"], false);
    let r = b.c.call_with(
        "xid",
        json!({"op": "CREATE_SESSION", "clientid": b.clientid}),
    );
    assert_eq!(r["status"], "NFS4ERR_STALE_CLIENTID");
    // B comes back as a new client; its old stateid is expired.
    let mut b2 = Nfs::connect(&shim.addr, "host-b", "2222222222222222");
    let r = b2.call(json!({"op": "READ", "stateid": bsid, "offset": 0, "count": 1}));
    assert_eq!(r["status"], "NFS4ERR_EXPIRED", "{r}");
}

#[test]
fn create_modes_locks_and_close_with_locks() {
    let s = Scratch::new("nfs-locks");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("nfsshim", &s.socket(), "nfs-k");
    let mut a = Nfs::connect(&shim.addr, "host-a", "aaaaaaaaaaaaaaaa");
    let excl = json!({"create": {"mode": "exclusive", "verifier": "0000000000000001"}});
    let o = ok(a.open("p", "x", "both", "none", excl.clone()));
    assert_eq!(o["created"], true);
    // Re-sent as a new request with the same verifier: as if it created it.
    let o2 = ok(a.open("p", "x", "both", "none", excl));
    assert_eq!(o2["created"], true, "{o2}");
    let other = json!({"create": {"mode": "exclusive", "verifier": "0000000000000002"}});
    assert_eq!(
        a.open("p2", "x", "both", "none", other)["status"],
        "NFS4ERR_EXIST"
    );
    let guarded = json!({"create": {"mode": "guarded"}});
    assert_eq!(
        a.open("p2", "x", "both", "none", guarded)["status"],
        "NFS4ERR_EXIST"
    );
    let sid = o2["stateid"].clone();
    let l = ok(a.call(json!({"op": "LOCK", "stateid": sid, "owner": "lo-a", "type": "write", "offset": 0, "length": 10})));
    let lsid = l["lock_stateid"].clone();
    // Another client's conflicting lock: DENIED with the holder.
    let mut b = Nfs::connect(&shim.addr, "host-b", "bbbbbbbbbbbbbbbb");
    let ob = ok(b.open("q", "x", "both", "none", json!({})));
    let r = b.call(
        json!({"op": "LOCK", "stateid": ob["stateid"], "owner": "lo-b", "type": "read",
                          "offset": 5, "length": 18446744073709551615u64}),
    );
    assert_denied(&r, 0, 10, "write", "lo-a");
    // Another lock-owner under the same open conflicts with the first.
    let r = a.call(json!({"op": "LOCK", "stateid": sid, "owner": "lo-a2", "type": "read", "offset": 5, "length": 1}));
    assert_eq!(
        (r["status"].as_str(), r["denied"]["owner"].as_str()),
        (Some("NFS4ERR_DENIED"), Some("lo-a")),
        "{r}"
    );
    let l2 = ok(a.call(json!({"op": "LOCK", "stateid": sid, "owner": "lo-a2", "type": "write", "offset": 20, "length": 5})));
    assert_ne!(
        l2["lock_stateid"]["other"], lsid["other"],
        "a lock state per lock-owner"
    );
    // Among nfsl/1 clients locks are advisory: B's WRITE over A's lock works.
    ok(b.call(json!({"op": "WRITE", "stateid": ob["stateid"], "offset": 0, "data": b64("zz")})));
    // CLOSE with locks held (lo-a2's too); LOCKU both; then CLOSE.
    ok(a.call(
        json!({"op": "LOCKU", "lock_stateid": l2["lock_stateid"], "offset": 20, "length": 5}),
    ));
    assert_eq!(
        a.call(json!({"op": "CLOSE", "stateid": sid}))["status"],
        "NFS4ERR_LOCKS_HELD"
    );
    let u = ok(a.call(json!({"op": "LOCKU", "lock_stateid": lsid, "offset": 0, "length": 10})));
    assert_eq!(u["lock_stateid"]["seqid"], 2);
    ok(b.call(json!({"op": "LOCK", "stateid": ob["stateid"], "owner": "lo-b", "type": "read", "offset": 5, "length": 1})));
    ok(a.call(json!({"op": "CLOSE", "stateid": {"other": sid["other"], "seqid": 0}})));
}

#[test]
fn cross_protocol_locks_delegations_and_namespace() {
    let s = Scratch::new("nfs-cross");
    std::fs::write(s.root().join("shared"), b"0123456789").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-x");
    let smb = Shim::start("smbshim", &s.socket(), "smb-x");
    let mut n = Nfs::connect(&nfs.addr, "host-n", "cccccccccccccccc");
    let mut m = LineClient::connect(&smb.addr);
    let r = m.call(json!({"cmd": "SESSION_SETUP", "client_guid": uuid::Uuid::new_v4().to_string(), "user": "bob"}));
    let msid = r["session_id"].as_u64().unwrap();
    let all = ["read", "write", "delete"];
    // An smbl/1 exclusive lock: nfsl/1 READ is LOCKED, LOCK is DENIED.
    let f = m.call(
        json!({"cmd": "CREATE", "session_id": msid, "path": "shared", "access": ["read", "write"],
                          "share": all, "disposition": "open"}),
    );
    let mfid = f["file_id"].clone();
    let o = ok(n.open("p", "shared", "both", "none", json!({})));
    let nsid = o["stateid"].clone();
    let r = m.call(json!({"cmd": "LOCK", "session_id": msid, "file_id": mfid,
                          "locks": [{"offset": 0, "length": 4, "exclusive": true, "unlock": false}]}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let r = n.call(json!({"op": "READ", "stateid": nsid, "offset": 0, "count": 4}));
    assert_eq!(r["status"], "NFS4ERR_LOCKED", "{r}");
    let r = n.call(json!({"op": "LOCK", "stateid": nsid, "owner": "lo", "type": "read", "offset": 2, "length": 1}));
    assert_eq!(r["status"], "NFS4ERR_DENIED", "{r}");
    assert_eq!(r["denied"]["type"], "write");
    ok(n.call(json!({"op": "READ", "stateid": nsid, "offset": 4, "count": 4})));
    ok(n.call(json!({"op": "CLOSE", "stateid": {"other": nsid["other"], "seqid": 0}})));
    // REMOVE / RENAME of a file an smbl/1 open holds without delete share.
    let g = m.call(
        json!({"cmd": "CREATE", "session_id": msid, "path": "held", "access": ["read", "write"],
                          "share": ["read", "write"], "disposition": "create"}),
    );
    assert_eq!(g["status"], "STATUS_SUCCESS");
    assert_eq!(
        n.call(json!({"op": "REMOVE", "path": "held"}))["status"],
        "NFS4ERR_FILE_OPEN"
    );
    assert_eq!(
        n.call(json!({"op": "RENAME", "from": "held", "to": "moved"}))["status"],
        "NFS4ERR_FILE_OPEN"
    );
    ok(n.call(json!({"op": "RENAME", "from": "shared", "to": "renamed"})));
    assert!(s.root().join("renamed").exists());
    // A read delegation recalled by an smbl/1 write open.
    std::fs::write(s.root().join("deleg"), b"d").unwrap();
    let o = ok(n.open(
        "p",
        "deleg",
        "read",
        "none",
        json!({"want_delegation": "read"}),
    ));
    let dsid = o["delegation"]["stateid"].clone();
    assert_eq!(o["delegation"]["type"], "read", "{o}");
    let addr = smb.addr.clone();
    let opener = std::thread::spawn(move || {
        let mut w = LineClient::connect(&addr);
        let r = w.call(json!({"cmd": "SESSION_SETUP", "client_guid": uuid::Uuid::new_v4().to_string(), "user": "carol"}));
        let sid = r["session_id"].as_u64().unwrap();
        w.call(
            json!({"cmd": "CREATE", "session_id": sid, "path": "deleg", "access": ["write"],
                      "share": ["read", "write", "delete"], "disposition": "open"}),
        )
    });
    let cb = n.c.next_line().expect("CB_RECALL");
    assert_eq!(cb["op"], "CB_RECALL", "{cb}");
    assert_eq!(cb["stateid"]["other"], dsid["other"]);
    // An nfsl/1 conflicting open meanwhile gets DELAY.
    let mut n2 = Nfs::connect(&nfs.addr, "host-n2", "dddddddddddddddd");
    assert_eq!(
        n2.open("p", "deleg", "write", "none", json!({}))["status"],
        "NFS4ERR_DELAY"
    );
    ok(n.call(json!({"op": "DELEGRETURN", "stateid": dsid})));
    let r = opener.join().unwrap();
    assert_eq!(
        r["status"], "STATUS_SUCCESS",
        "the smbl/1 open proceeds after DELEGRETURN: {r}"
    );
}

/// Review rv-cross (1): a read delegation was granted while another
/// client held the file open for writing (an smbl/1 open, or another
/// nfsl/1 client's), whose WRITEs recall nothing: the delegation's client
/// served stale cached data. RFC 8881 §10.4 grants one only where no
/// conflicting open exists: none is granted then, and once the writer
/// closed, one is.
#[test]
fn no_read_delegation_beside_another_clients_write_open() {
    let s = Scratch::new("nfs-deleg-writer");
    std::fs::write(s.root().join("f"), b"f").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-w");
    let smb = Shim::start("smbshim", &s.socket(), "smb-w");
    let (mut m, msid) = rkfilter_tests::smb_session(&smb.addr);
    let w = m.call(
        json!({"cmd": "CREATE", "session_id": msid, "path": "f", "access": ["write"],
               "share": ["read", "write", "delete"], "disposition": "open"}),
    );
    assert_eq!(w["status"], "STATUS_SUCCESS", "{w}");
    let want = json!({"want_delegation": "read"});
    let mut n = Nfs::connect(&nfs.addr, "host-n", "0000000000000e01");
    let o = ok(n.open("p", "f", "read", "none", want.clone()));
    assert_eq!(o["delegation"], Value::Null, "beside an smbl/1 writer: {o}");
    ok(n.call(json!({"op": "CLOSE", "stateid": o["stateid"]})));
    let r = m.call(json!({"cmd": "CLOSE", "session_id": msid, "file_id": w["file_id"]}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    // Another nfsl/1 client's open for writing likewise.
    let mut b = Nfs::connect(&nfs.addr, "host-b", "0000000000000e02");
    let ob = ok(b.open("q", "f", "write", "none", json!({})));
    let o = ok(n.open("p", "f", "read", "none", want.clone()));
    assert_eq!(o["delegation"], Value::Null, "beside an nfsl/1 writer: {o}");
    ok(n.call(json!({"op": "CLOSE", "stateid": o["stateid"]})));
    ok(b.call(json!({"op": "CLOSE", "stateid": ob["stateid"]})));
    // No writer left: granted.
    let o = ok(n.open("p", "f", "read", "none", want));
    assert_eq!(o["delegation"]["type"], "read", "{o}");
}

/// Review deleg2 (3): a client's own open for write recalled its own read
/// delegation — its OPEN got NFS4ERR_DELAY until it returned the
/// delegation to itself. spec/nfs-like.md recalls for a conflicting open
/// "from anyone else" (RFC 8881 §10.4: a client resolves conflicts among
/// its own opens). Another client's open for write still recalls it.
#[test]
fn a_clients_own_write_open_does_not_recall_its_delegation() {
    let s = Scratch::new("nfs-deleg-own-writer");
    std::fs::write(s.root().join("f"), b"f").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-ow");
    let mut a = Nfs::connect(&nfs.addr, "host-a", "0000000000000e11");
    let o = ok(a.open("p", "f", "read", "none", json!({"want_delegation": "read"})));
    assert_eq!(o["delegation"]["type"], "read", "{o}");
    // Another open-owner of the same client, for writing.
    let r = a.open("q", "f", "write", "none", json!({}));
    assert_eq!(r["status"], "NFS4_OK", "its own write open: {r}");
    // A WRITE and a LOCK through that other open-owner do not recall it
    // either (`break_read_caching_of`): a recall would come as a line
    // before the next reply, or on its own.
    let q = r["stateid"].clone();
    ok(a.call(json!({"op": "WRITE", "stateid": q, "offset": 0, "data": b64("g")})));
    ok(a.call(
        json!({"op": "LOCK", "stateid": q, "owner": "lo-q", "type": "write", "offset": 0, "length": 1}),
    ));
    a.c.set_read_timeout(Duration::from_millis(300));
    assert_eq!(a.c.next_line(), None, "no recall of its own delegation");
    a.c.set_read_timeout(Duration::from_secs(60));
    let mut b = Nfs::connect(&nfs.addr, "host-b", "0000000000000e12");
    let r = b.open("q", "f", "write", "none", json!({}));
    assert_eq!(r["status"], "NFS4ERR_DELAY", "another client's: {r}");
    let cb = a.c.next_line().expect("CB_RECALL");
    assert_eq!(cb["op"], "CB_RECALL", "{cb}");
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": o["delegation"]["stateid"]})));
}

/// Review rvnfsnode 2: a CB_RECALL issued while the holder had no
/// connection (its connection dropped, or none yet since a restore) was
/// sent nowhere and never again: the holder came back and renewed, heard
/// of no recall, and its write delegation was revoked at the break
/// timeout, its writes under it refused (NFS4ERR_EXPIRED). The recall
/// goes again when the holder's requests come on a new connection: it
/// writes back, returns the delegation, and the conflicting open is
/// granted long before the break timeout, the holder's data kept.
#[test]
fn a_recall_issued_while_the_holder_is_away_reaches_it_on_its_new_connection() {
    let s = Scratch::new("nfs-recall-reconnect");
    let _d = Filterd::start(&s, &["--break-timeout-ms", "20000"], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-rr");
    let mut a = Nfs::connect(&nfs.addr, "host-a", "0000000000000e21");
    let o = ok(a.open("p", "f", "both", "none", {
        let mut c = create();
        c["want_delegation"] = json!("write");
        c
    }));
    assert_eq!(o["delegation"]["type"], "write", "{o}");
    let dsid = o["delegation"]["stateid"].clone();
    ok(a.call(json!({"op": "WRITE", "stateid": dsid, "offset": 0, "data": b64("cached")})));
    // Alice's connection drops; Bob's open recalls her delegation.
    a.c = LineClient::connect(&nfs.addr);
    let mut b = Nfs::connect(&nfs.addr, "host-b", "0000000000000e22");
    let bo = json!({"op": "OPEN", "owner": "q", "path": "f", "access": "read", "deny": "none"});
    let began = std::time::Instant::now();
    let r = b.call(bo.clone());
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{r}");
    // Alice is back (on the new connection) and writes under the
    // delegation: the recall comes behind the reply.
    a.seqid += 1;
    let mut w = json!({"op": "WRITE", "stateid": dsid, "offset": 6, "data": b64(" data")});
    w["seq"] = json!({"sessionid": a.sessionid, "slot": 0, "seqid": a.seqid});
    write_then_its_recall(&mut a, w, &dsid);
    returned_then_granted_with_the_writes((&mut a, &dsid), (&mut b, &bo), began);
}

/// `w`, a WRITE on `a`'s new connection, answered, and behind its reply
/// the recall of delegation `dsid`, once.
fn write_then_its_recall(a: &mut Nfs, w: Value, dsid: &Value) {
    let id = a.c.send_only("xid", w);
    let (r, mut seen) = a.c.reply_to("xid", id).expect("the WRITE's reply");
    ok(r);
    if seen.is_empty() {
        a.c.set_read_timeout(Duration::from_secs(5));
        seen.extend(a.c.next_line());
    }
    assert_eq!(
        (seen.len(), &seen.first().map(|v| v["op"].clone())),
        (1, &Some(json!("CB_RECALL"))),
        "the recall, once, on the new connection: {seen:?}"
    );
    assert_eq!(seen[0]["stateid"]["other"], dsid["other"], "{seen:?}");
}

/// `a` returns delegation `dsid`; `b`'s OPEN `bo`, refused DELAY at
/// `began`, is granted well before the break timeout, and reads what `a`
/// wrote under the delegation ("cached data").
fn returned_then_granted_with_the_writes(
    (a, dsid): (&mut Nfs, &Value),
    (b, bo): (&mut Nfs, &Value),
    began: std::time::Instant,
) {
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": dsid})));
    let r = ok(b.resend_patiently(bo, Duration::from_secs(10)));
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "granted after {:?}, not at the break timeout",
        began.elapsed()
    );
    let r = ok(b.call(json!({"op": "READ", "stateid": r["stateid"], "offset": 0, "count": 100})));
    assert_eq!(r["data"], b64("cached data"), "alice's writes kept: {r}");
}

/// Re-review rr41c F1: a holder back on a new connection first re-sends
/// the request whose reply it lost with the old one (the usual reconnect)
/// — a replay, answered from the slot cache before the client's
/// connection was updated, so the recall outstanding was not sent again:
/// the holder idled past the break timeout and its next WRITE was
/// NFS4ERR_EXPIRED. The replay too brings the recall.
#[test]
fn a_recall_reaches_a_holder_whose_first_request_back_is_a_replay() {
    let s = Scratch::new("nfs-recall-replay");
    let _d = Filterd::start(&s, &["--break-timeout-ms", "20000"], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-rp");
    let mut a = Nfs::connect(&nfs.addr, "host-a", "0000000000000e31");
    let o = ok(a.open("p", "f", "both", "none", {
        let mut c = create();
        c["want_delegation"] = json!("write");
        c
    }));
    assert_eq!(o["delegation"]["type"], "write", "{o}");
    let dsid = o["delegation"]["stateid"].clone();
    // Alice writes; the reply goes with her connection.
    let w = json!({"op": "WRITE", "stateid": dsid, "offset": 0, "data": b64("cached data")});
    ok(a.call(w.clone()));
    a.c = LineClient::connect(&nfs.addr);
    let mut b = Nfs::connect(&nfs.addr, "host-b", "0000000000000e32");
    let bo = json!({"op": "OPEN", "owner": "q", "path": "f", "access": "read", "deny": "none"});
    let began = std::time::Instant::now();
    let r = b.call(bo.clone());
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{r}");
    // Back, she first re-sends the WRITE whose reply she lost: its
    // cached reply, and the recall with it.
    let mut w = w;
    w["seq"] = json!({"sessionid": a.sessionid, "slot": 0, "seqid": a.seqid});
    write_then_its_recall(&mut a, w, &dsid);
    returned_then_granted_with_the_writes((&mut a, &dsid), (&mut b, &bo), began);
}

/// Re-review rr41c F2, F3: any switch of connection sent every
/// outstanding recall again, also between two connections the client uses
/// at once (allowed); and a DELEGRETURN on a new connection got the recall
/// of what it returns before its answer. Now a recall goes on each
/// connection once, and not before its own DELEGRETURN's answer.
#[test]
fn a_recall_goes_once_per_connection_and_not_before_its_own_delegreturn() {
    let s = Scratch::new("nfs-recall-conns");
    let _d = Filterd::start(&s, &["--break-timeout-ms", "20000"], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-rc");
    let mut a = Nfs::connect(&nfs.addr, "host-a", "0000000000000e34");
    let o = ok(a.open("p", "f", "both", "none", {
        let mut c = create();
        c["want_delegation"] = json!("write");
        c
    }));
    assert_eq!(o["delegation"]["type"], "write", "{o}");
    let dsid = o["delegation"]["stateid"].clone();
    let mut b = Nfs::connect(&nfs.addr, "host-b", "0000000000000e35");
    let bo = json!({"op": "OPEN", "owner": "q", "path": "f", "access": "read", "deny": "none"});
    let r = b.call(bo.clone());
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{r}");
    a.c.set_read_timeout(Duration::from_secs(5));
    let cb = a.c.next_line().expect("the recall");
    assert_eq!(cb["op"], "CB_RECALL", "{cb}");
    let w = json!({"op": "WRITE", "stateid": dsid, "offset": 0, "data": b64("x")});
    let recalls = |seen: &[Value]| seen.iter().filter(|v| v["op"] == "CB_RECALL").count();
    // A second connection: the recall there, once.
    let mut first = std::mem::replace(&mut a.c, LineClient::connect(&nfs.addr));
    a.seqid += 1;
    let (r, seen) = a.send_seeing(&w);
    ok(r);
    assert_eq!(recalls(&seen), 1, "on the second connection: {seen:?}");
    a.seqid += 1;
    let (_, seen) = a.send_seeing(&w);
    assert!(seen.is_empty(), "{seen:?}");
    // Back on the first, which it reached: not again; nor on the second.
    for _ in 0..2 {
        std::mem::swap(&mut a.c, &mut first);
        for _ in 0..2 {
            a.seqid += 1;
            let (r, seen) = a.send_seeing(&w);
            ok(r);
            assert!(seen.is_empty(), "not again: {seen:?}");
        }
    }
    // The DELEGRETURN first on a third connection: no recall before its
    // answer (nor after).
    a.c = LineClient::connect(&nfs.addr);
    a.seqid += 1;
    let (r, seen) = a.send_seeing(&json!({"op": "DELEGRETURN", "stateid": dsid}));
    ok(r);
    assert!(seen.is_empty(), "no recall of what is returned: {seen:?}");
    ok(b.resend_patiently(&bo, Duration::from_secs(10)));
    a.seqid += 1;
    let (_, seen) =
        a.send_seeing(&json!({"op": "READ", "stateid": o["stateid"], "offset": 0, "count": 1}));
    assert!(seen.is_empty(), "{seen:?}");
}

/// Alice (client `owner`) holds a write delegation of `f`, recalled by
/// Bob's OPEN (`bo`, answered DELAY) on her first connection, which then
/// drops: the recall is outstanding and reached no connection she has.
/// Her OPEN request, its answer, and Bob.
fn recalled_and_away(addr: &str, verifier: &str) -> (Nfs, Value, Value, Nfs, Value) {
    let mut a = Nfs::connect(addr, "host-a", verifier);
    let mut open = json!({"op": "OPEN", "owner": "p", "path": "f", "access": "both",
                          "deny": "none", "want_delegation": "write"});
    open["create"] = create()["create"].clone();
    let o = ok(a.call(open.clone()));
    assert_eq!(o["delegation"]["type"], "write", "{o}");
    let mut b = Nfs::connect(addr, "host-b", &format!("1{}", &verifier[1..]));
    let bo = json!({"op": "OPEN", "owner": "q", "path": "f", "access": "read", "deny": "none"});
    let r = b.call(bo.clone());
    assert_eq!(r["status"], "NFS4ERR_DELAY", "{r}");
    a.c.set_read_timeout(Duration::from_secs(10));
    let cb = a.c.next_line().expect("the recall");
    assert_eq!(cb["op"], "CB_RECALL", "{cb}");
    a.c = LineClient::connect(addr);
    (a, open, o, b, bo)
}

/// Whether `seen` holds a CB_RECALL of delegation stateid `dsid`, how many.
fn recalls_of(seen: &[Value], dsid: &Value) -> usize {
    seen.iter()
        .filter(|v| v["op"] == "CB_RECALL" && v["stateid"]["other"] == dsid["other"])
        .count()
}

/// Re-review rr41g 2: the recalls outstanding went on a new connection
/// before the answer of the request that came on it — a replayed OPEN's
/// too, whose answer tells the client of the very delegation recalled: a
/// client ignoring a recall of a stateid it does not know then held it,
/// never told again on that connection, and lost it at the break
/// timeout. They go behind the answer.
#[test]
fn a_replayed_open_is_answered_before_the_recall_of_its_delegation() {
    let s = Scratch::new("nfs-recall-behind");
    let _d = Filterd::start(&s, &["--break-timeout-ms", "20000"], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-rb");
    let (mut a, open, o, mut b, bo) = recalled_and_away(&nfs.addr, "0000000000000e36");
    let dsid = o["delegation"]["stateid"].clone();
    // Back, she re-sends the OPEN whose answer she lost.
    let (before, r, behind) = a.send_around(&open);
    assert!(before.is_empty(), "nothing before the answer: {before:?}");
    let r = ok(r);
    assert_eq!(r["delegation"]["stateid"], dsid, "the cached answer: {r}");
    assert_eq!(
        recalls_of(&behind, &dsid),
        1,
        "the recall behind it: {behind:?}"
    );
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": dsid})));
    ok(b.resend_patiently(&bo, Duration::from_secs(10)));
}

/// Re-review rr41g 3: a DELEGRETURN first on a new connection leaves out
/// the recall of what it returns; when it failed for good (a stateid of
/// the wrong seqid) nothing sent that recall on the connection later, and
/// the delegation was revoked at the break timeout. It goes behind the
/// failure's answer, and only once.
#[test]
fn a_failed_delegreturn_on_a_new_connection_gets_its_recall_behind_it() {
    let s = Scratch::new("nfs-recall-badreturn");
    let _d = Filterd::start(&s, &["--break-timeout-ms", "20000"], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-rbr");
    let (mut a, _, o, mut b, bo) = recalled_and_away(&nfs.addr, "0000000000000e37");
    let dsid = o["delegation"]["stateid"].clone();
    let mut stale = dsid.clone();
    stale["seqid"] = json!(7);
    a.seqid += 1;
    let (before, r, behind) = a.send_around(&json!({"op": "DELEGRETURN", "stateid": stale}));
    assert!(
        r["status"] != "NFS4_OK" && r["status"] != "NFS4ERR_DELAY",
        "refused for good: {r}"
    );
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(
        recalls_of(&behind, &dsid),
        1,
        "the recall behind it: {behind:?}"
    );
    a.seqid += 1;
    let (r, seen) = a.send_seeing(&json!({"op": "DELEGRETURN", "stateid": stale}));
    assert_ne!(r["status"], "NFS4_OK", "{r}");
    assert!(seen.is_empty(), "not twice on a connection: {seen:?}");
    a.seqid += 1;
    let (r, seen) = a.send_seeing(&json!({"op": "DELEGRETURN", "stateid": dsid}));
    ok(r);
    assert!(seen.is_empty(), "{seen:?}");
    ok(b.resend_patiently(&bo, Duration::from_secs(10)));
}

/// Re-review rr41g 1: a recall remembered the last four connections it
/// went out on, so a client rotating over five was sent every outstanding
/// recall with every request. It goes once on each live connection,
/// however many.
#[test]
fn a_recall_goes_once_on_each_of_many_connections() {
    let s = Scratch::new("nfs-recall-many");
    let _d = Filterd::start(&s, &["--break-timeout-ms", "20000"], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-rm");
    let (mut a, _, o, mut b, bo) = recalled_and_away(&nfs.addr, "0000000000000e38");
    let dsid = o["delegation"]["stateid"].clone();
    let w = json!({"op": "WRITE", "stateid": dsid, "offset": 0, "data": b64("x")});
    let mut conns: Vec<LineClient> = (0..5).map(|_| LineClient::connect(&nfs.addr)).collect();
    for round in 0..3 {
        for c in conns.iter_mut() {
            std::mem::swap(&mut a.c, c);
            a.seqid += 1;
            let (r, seen) = a.send_seeing(&w);
            ok(r);
            let want = usize::from(round == 0);
            assert_eq!(recalls_of(&seen, &dsid), want, "round {round}: {seen:?}");
            std::mem::swap(&mut a.c, c);
        }
    }
    ok(a.call(json!({"op": "DELEGRETURN", "stateid": dsid})));
    ok(b.resend_patiently(&bo, Duration::from_secs(10)));
}

/// Re-review rr41c F1 (the spec: a lease "is renewed by every request
/// with a valid `seq`"): a replay, answered from the slot cache, renewed
/// nothing — a client re-sending a request whose reply it keeps losing
/// lost its state at the lease.
#[test]
fn a_replay_renews_the_lease() {
    let s = Scratch::new("nfs-replay-renews");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start_with("nfsshim", &s.socket(), "nfs-rr", &["--lease-ms", "3000"]);
    let mut a = Nfs::connect(&shim.addr, "host-a", "0000000000000e33");
    let o = ok(a.open("p", "f", "both", "none", create()));
    let w = json!({"op": "WRITE", "stateid": o["stateid"], "offset": 0, "data": b64("x")});
    ok(a.call(w.clone()));
    // Only the replay, for twice the lease.
    let until = std::time::Instant::now() + Duration::from_millis(6000);
    while std::time::Instant::now() < until {
        ok(a.send(w.clone()));
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = a.call(json!({"op": "READ", "stateid": o["stateid"], "offset": 0, "count": 10}));
    assert_eq!(r["status"], "NFS4_OK", "the state kept: {r}");
    assert_eq!(r["data"], b64("x"), "{r}");
}

#[test]
fn time_down_does_not_count_against_a_lease() {
    let s = Scratch::new("nfs-downtime");
    let _d = Filterd::start(&s, &[], &[]);
    let lease = ["--lease-ms", "1500"];
    let shim = Shim::start_with("nfsshim", &s.socket(), "nfs-t", &lease);
    let mut a = Nfs::connect(&shim.addr, "host-a", "5555555555555555");
    let o = ok(a.open("p", "f", "both", "both", create()));
    shim.kill9();
    // nfsshim stays down for longer than the lease.
    std::thread::sleep(Duration::from_millis(2_500));
    let shim = Shim::start_with("nfsshim", &s.socket(), "nfs-t", &lease);
    a.c = LineClient::connect(&shim.addr);
    let r = ok(a.call(json!({"op": "READ", "stateid": o["stateid"], "offset": 0, "count": 1})));
    assert_eq!(r["eof"], true);
    let mut b = Nfs::connect(&shim.addr, "host-b", "6666666666666666");
    assert_eq!(
        b.open("q", "f", "read", "none", json!({}))["status"],
        "NFS4ERR_SHARE_DENIED"
    );
}

#[test]
fn share_reservations_across_protocols_and_delegation_revocation() {
    let s = Scratch::new("nfs-share");
    std::fs::write(s.root().join("a"), b"a").unwrap();
    std::fs::write(s.root().join("b"), b"b").unwrap();
    let _d = Filterd::start(&s, &["--break-timeout-ms", "500"], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-s");
    let smb = Shim::start("smbshim", &s.socket(), "smb-s");
    let mut n = Nfs::connect(&nfs.addr, "host-n", "7777777777777777");
    let mut m = LineClient::connect(&smb.addr);
    let r = m.call(json!({"cmd": "SESSION_SETUP", "client_guid": uuid::Uuid::new_v4().to_string(), "user": "bob"}));
    let msid = r["session_id"].as_u64().unwrap();
    // smbl/1 shares nothing: nfsl/1 is denied.
    let r = m.call(
        json!({"cmd": "CREATE", "session_id": msid, "path": "a", "access": ["read"],
                          "share": [], "disposition": "open"}),
    );
    assert_eq!(r["status"], "STATUS_SUCCESS");
    assert_eq!(
        n.open("p", "a", "read", "none", json!({}))["status"],
        "NFS4ERR_SHARE_DENIED"
    );
    // nfsl/1 denies write: smbl/1 writers get a sharing violation.
    ok(n.open("p", "b", "read", "write", json!({})));
    let r = m.call(
        json!({"cmd": "CREATE", "session_id": msid, "path": "b", "access": ["write"],
                          "share": ["read", "write", "delete"], "disposition": "open"}),
    );
    assert_eq!(r["status"], "STATUS_SHARING_VIOLATION");
    // A recall nobody answers: the delegation is revoked after the recall
    // timeout and the conflicting open proceeds.
    std::fs::write(s.root().join("d"), b"d").unwrap();
    let o = ok(n.open("p", "d", "read", "none", json!({"want_delegation": "read"})));
    let dsid = o["delegation"]["stateid"].clone();
    let r = m.call(
        json!({"cmd": "CREATE", "session_id": msid, "path": "d", "access": ["write"],
                          "share": ["read", "write", "delete"], "disposition": "open"}),
    );
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let cb = n.c.next_line().expect("CB_RECALL");
    assert_eq!(cb["op"], "CB_RECALL");
    // nfsshim learns of the revocation from filterd's event: the delegation
    // stateid stops working.
    let r = wait_for("the revocation", Duration::from_secs(5), || {
        let r = n.call(json!({"op": "READ", "stateid": dsid, "offset": 0, "count": 1}));
        (r["status"] != "NFS4_OK").then_some(r)
    });
    assert_eq!(r["status"], "NFS4ERR_EXPIRED", "a revoked delegation: {r}");
    let r = n.call(json!({"op": "DELEGRETURN", "stateid": dsid}));
    assert_eq!(r["status"], "NFS4ERR_EXPIRED", "{r}");
}

/// filterd armed to die at the `n`-th reach of `point`, nfsshim, and a
/// client with a session.
fn crashing(point: &str, n: u32) -> (Scratch, String, Filterd, Shim, Nfs) {
    let s = Scratch::new(&format!("nfs-crash-{point}-{n}"));
    let fp = format!("{point}:{n}");
    let d = Filterd::spawn(&s, &[], &[("RKFILTER_FAILPOINTS", fp.as_str())]);
    d.wait_ready();
    let shim = Shim::start("nfsshim", &s.socket(), "nfs-c");
    let a = Nfs::connect(&shim.addr, "host-a", "abababababababab");
    (s, fp, d, shim, a)
}

/// filterd `d` dies of its failpoint `fp`: a new one is started on the scratch
/// dir and `req` re-sent on slot 0 at its current seqid until the answer is
/// not DELAY (nfsshim reattaching).
fn restart_and_resend(
    s: &Scratch,
    d: &mut Filterd,
    fp: &str,
    a: &mut Nfs,
    req: &Value,
) -> (Filterd, Value) {
    d.wait_killed_at(fp, Duration::from_secs(10));
    let d2 = Filterd::start(s, &[], &[]);
    (d2, a.resend_patiently(req, Duration::from_secs(10)))
}

/// An OPEN whose filterd dies before or after its commit (the handle, the
/// open state and the slot reply together), re-sent on its slot once
/// filterd is back: one open, created once, one open state.
#[test]
fn open_is_exactly_once_across_a_filterd_crash_at_every_commit() {
    for point in ["commit.before", "commit.after"] {
        // Commits 1 and 2 are EXCHANGE_ID's and CREATE_SESSION's records;
        // the OPEN commits its handle, its open state and its slot reply
        // together (3).
        for n in 3..=3 {
            let (s, fp, mut d, _shim, mut a) = crashing(point, n);
            let open = json!({"op": "OPEN", "owner": "p", "path": "new", "access": "both",
                              "deny": "none", "create": {"mode": "guarded"}});
            a.seqid += 1;
            let first = a.send(open.clone());
            assert_eq!(
                first["status"], "NFS4ERR_DELAY",
                "{fp}: the crash shows as DELAY: {first}"
            );
            let (_d2, r) = restart_and_resend(&s, &mut d, &fp, &mut a, &open);
            assert_eq!(r["status"], "NFS4_OK", "{fp}: {r}");
            assert_eq!(
                r["created"], true,
                "{fp}: created by this request, once: {r}"
            );
            assert_eq!(
                r["stateid"]["seqid"], 1,
                "{fp}: one open, not upgraded: {r}"
            );
            let ctl = libfilter::client::FilterClient::connect_control(&s.socket()).unwrap();
            let handles: Vec<_> = ctl
                .handles()
                .unwrap()
                .into_iter()
                .filter(|h| h.record.path.as_str() == "new")
                .collect();
            assert_eq!(handles.len(), 1, "{fp}: exactly one handle: {handles:?}");
            // nfsshim answers WRITE NFS4ERR_DELAY until it has applied its
            // reattach, which under load can come after the OPEN's answer
            // (nfs-like.md, "Restarts"): re-sent as a client does.
            ok(a.call_patiently(
                json!({"op": "WRITE", "stateid": r["stateid"], "offset": 0, "data": b64("once")}),
            ));
        }
    }
}

/// A CLOSE whose filterd dies before or after its commit (the handle's
/// deletion, the open state's deletion and the slot reply together),
/// re-sent once filterd is back: NFS4_OK, and no handle left.
#[test]
fn close_is_exactly_once_across_a_filterd_crash_at_every_commit() {
    for point in ["commit.before", "commit.after"] {
        // 1-2: client and session; 3: the OPEN; 4: the WRITE's slot reply;
        // 5: the CLOSE.
        for n in 5..=5 {
            let (s, fp, mut d, _shim, mut a) = crashing(point, n);
            let o = ok(a.open("p", "f", "both", "none", create()));
            ok(a.call(
                json!({"op": "WRITE", "stateid": o["stateid"], "offset": 0, "data": b64("x")}),
            ));
            let close = json!({"op": "CLOSE", "stateid": o["stateid"]});
            a.seqid += 1;
            let first = a.send(close.clone());
            assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
            let (_d2, r) = restart_and_resend(&s, &mut d, &fp, &mut a, &close);
            assert_eq!(r["status"], "NFS4_OK", "{fp}: {r}");
            let ctl = libfilter::client::FilterClient::connect_control(&s.socket()).unwrap();
            let left: Vec<_> = ctl.handles().unwrap();
            assert!(left.is_empty(), "{fp}: the handle is closed: {left:?}");
            // The state is gone: BAD_STATEID, or EXPIRED when nfsshim only
            // learnt from filterd that the handle is gone.
            let r = a.call(json!({"op": "READ", "stateid": o["stateid"], "offset": 0, "count": 1}));
            let st = r["status"].as_str().unwrap_or("");
            assert!(
                st == "NFS4ERR_BAD_STATEID" || st == "NFS4ERR_EXPIRED",
                "{fp}: {r}"
            );
        }
    }
}

/// A LOCK whose filterd dies right after committing the lock (the client
/// saw DELAY) while nfsshim survives: the same LOCK re-sent on the same
/// slot and seqid finds its own lock in filterd and succeeds, exactly once
/// — it used to be DENIED by the lock nfsshim had forgotten.
#[test]
fn lock_is_exactly_once_when_filterd_dies_and_nfsshim_survives() {
    // 1-2: client and session; 3: the OPEN; 4: the LOCK's lock.
    let (s, fp, mut d, _shim, mut a) = crashing("commit.after", 4);
    let o = ok(a.open("p", "f", "both", "none", create()));
    let lock = json!({"op": "LOCK", "owner": "lo", "stateid": o["stateid"], "type": "write",
                      "offset": 0, "length": 10});
    a.seqid += 1;
    let first = a.send(lock.clone());
    assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
    d.wait_killed_at(&fp, Duration::from_secs(10));
    let _d2 = Filterd::start(&s, &[], &[]);
    let ctl = libfilter::client::FilterClient::connect_control(&s.socket()).unwrap();
    assert_eq!(
        ctl.locks().unwrap().len(),
        1,
        "{fp}: the lock committed before the crash"
    );
    let r = a.resend_patiently(&lock, Duration::from_secs(10));
    assert_eq!(r["status"], "NFS4_OK", "{fp}: the re-sent LOCK: {r}");
    let locks = ctl.locks().unwrap();
    assert_eq!(locks.len(), 1, "{fp}: one lock, taken once: {locks:?}");
}

/// filterd dies right after committing an OPEN of `a` (the client saw
/// DELAY, the slot did not advance) while nfsshim survives; the client then
/// sends a *different* request at that seqid, as the slot rules let it.
/// That request runs (review N1): it is not taken for the OPEN's re-send.
/// `upgrade`: the owner has an open already, so the OPEN of `a` commits
/// its handle alone (commit 4) and its records apart; else it commits its
/// handle, open state and slot record together (commit 3), and the
/// abandoned OPEN's handle is closed before the second request's answer.
fn a_different_request_after_a_delayed_open(
    upgrade: bool,
    second: Value,
    check: impl Fn(&Scratch, &mut Nfs, &Value),
) {
    after_a_delayed_open(Before::Upgrade(upgrade), false, |_| second.clone(), check);
}

/// What the client holds before the delayed OPEN of `a`.
enum Before {
    /// Owner `p`'s open of `c` (the OPEN of `a` an upgrade of owner `p`),
    /// or nothing.
    Upgrade(bool),
    /// Another owner's open of `c` (whose stateid the `second` request may
    /// use): the OPEN of `a` is still owner `p`'s first.
    OtherOwner,
    /// Owner `p`'s open of `c`, and the OPEN of `a` (a new open state of
    /// that owner) commits its handle (commit 4) and then its records
    /// (commit 5) before filterd dies.
    SecondRecorded,
}

/// [`a_different_request_after_a_delayed_open`], also with nfsshim killed
/// -9 and restarted with filterd (`shim_too`) before the second request,
/// which `second` makes from the open of `c` (`Before::OtherOwner`).
fn after_a_delayed_open(
    before: Before,
    shim_too: bool,
    second: impl Fn(&Value) -> Value,
    check: impl Fn(&Scratch, &mut Nfs, &Value),
) {
    // 1-2: client and session; 3: the OPEN of `a`, or of `c` before it.
    let upgrade = matches!(before, Before::Upgrade(true));
    let n = match before {
        Before::Upgrade(false) => 3,
        Before::Upgrade(true) | Before::OtherOwner => 4,
        Before::SecondRecorded => 5,
    };
    let (s, fp, mut d, shim, mut a) = crashing("commit.after", n);
    std::fs::write(s.root().join("y"), b"y").unwrap();
    let c = match before {
        Before::Upgrade(true) | Before::SecondRecorded => {
            ok(a.open("p", "c", "read", "none", create()))
        }
        Before::OtherOwner => ok(a.open("q", "c", "both", "none", create())),
        Before::Upgrade(false) => Value::Null,
    };
    let second = second(&c);
    a.seqid += 1;
    let first = a.send(
        json!({"op": "OPEN", "owner": "p", "path": "a", "access": "both",
                              "deny": "both", "create": {"mode": "unchecked"}}),
    );
    assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
    let live;
    let (_d2, r) = if shim_too {
        shim.kill9();
        d.wait_killed_at(&fp, Duration::from_secs(10));
        let d2 = Filterd::start(&s, &[], &[]);
        live = Shim::start("nfsshim", &s.socket(), "nfs-c");
        a.c = LineClient::connect(&live.addr);
        (d2, a.resend_patiently(&second, Duration::from_secs(10)))
    } else {
        live = shim;
        restart_and_resend(&s, &mut d, &fp, &mut a, &second)
    };
    assert_eq!(r["status"], "NFS4_OK", "{fp}: the second request: {r}");
    check(&s, &mut a, &r);
    if !upgrade {
        assert!(
            rkfilter_tests::handles_on(&s, "a").is_empty(),
            "{fp}: the abandoned OPEN's handle is closed"
        );
        // Its deny-both reservation is gone with it.
        let mut b = Nfs::connect(&live.addr, "host-b", "bcbcbcbcbcbcbcbc");
        ok(
            b.call_patiently(json!({"op": "OPEN", "owner": "q", "path": "a",
                                   "access": "both", "deny": "both"})),
        );
    }
}

/// Review F1: the same, with nfsshim killed -9 and restarted too before
/// the different request. The restored slot's reply (the OPEN of `a`'s)
/// was the cached answer to whatever came at its seqid — `b`'s OPEN got
/// `a`'s stateid — and the restored open of `a` held its deny-both
/// reservation until the client went.
#[test]
fn a_different_open_at_a_delayed_opens_seqid_opens_its_own_file_across_an_nfsshim_restart() {
    after_a_delayed_open(Before::Upgrade(false), true, |_| open_b(), b_is_opened);
}

/// An OPEN of an owner with opens already (its records written apart from
/// its handle, its slot record naming no open state) committed all before
/// filterd died: a different OPEN at its seqid left its handle and
/// deny-both reservation, restored live after an nfsshim restart. Now its
/// slot record names the open state it made, which is undone.
#[test]
fn a_different_open_at_a_delayed_second_opens_seqid_abandons_it() {
    for shim_too in [false, true] {
        after_a_delayed_open(Before::SecondRecorded, shim_too, |_| open_b(), b_is_opened);
    }
}

/// Review F2: a WRITE (any op but OPEN, REMOVE or RENAME) at the seqid of
/// an OPEN answered DELAY left that OPEN's handle and deny-both
/// reservation in filterd (and restored live after an nfsshim restart).
#[test]
fn a_write_at_a_delayed_opens_seqid_abandons_the_open() {
    for shim_too in [false, true] {
        after_a_delayed_open(
            Before::OtherOwner,
            shim_too,
            |c| json!({"op": "WRITE", "stateid": c["stateid"], "offset": 0, "data": b64("to-c")}),
            |s, _a, _r| assert_eq!(std::fs::read(s.root().join("c")).unwrap(), b"to-c"),
        );
    }
}

/// Review F2: a LOCK of 0-10 that filterd took (commit 4) but whose
/// records did not commit (filterd died before commit 5; the client saw
/// DELAY), then a LOCK of 20-30 at that seqid: filterd held both, nfsshim
/// only 20-30 — a phantom lock on 0-10 nobody could unlock. Now the first
/// one's range is set back before the second runs.
#[test]
fn a_different_lock_at_a_delayed_locks_seqid_sets_its_range_back() {
    // 1-2: client and session; 3: the OPEN; 4: the LOCK's lock; 5: its
    // records.
    let (s, fp, mut d, shim, mut a) = crashing("commit.before", 5);
    let o = ok(a.open("p", "f", "both", "none", create()));
    let lock = |offset: u64| {
        json!({"op": "LOCK", "owner": "lo", "stateid": o["stateid"], "type": "write",
               "offset": offset, "length": 10})
    };
    a.seqid += 1;
    let first = a.send(lock(0));
    assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
    let (_d2, r) = restart_and_resend(&s, &mut d, &fp, &mut a, &lock(20));
    assert_eq!(r["status"], "NFS4_OK", "{fp}: the second LOCK: {r}");
    let ctl = libfilter::client::FilterClient::connect_control(&s.socket()).unwrap();
    let locks = ctl.locks().unwrap();
    assert_eq!(locks.len(), 1, "{fp}: only 20-30 is locked: {locks:?}");
    another_client_locks_0_10(&shim);
}

/// Another client opens `f` and locks 0-10 of it.
fn another_client_locks_0_10(shim: &Shim) {
    let mut b = Nfs::connect(&shim.addr, "host-b", "bcbcbcbcbcbcbcbc");
    let ob = ok(
        b.call_patiently(json!({"op": "OPEN", "owner": "q", "path": "f",
                                "access": "both", "deny": "none"})),
    );
    ok(b.call(
        json!({"op": "LOCK", "owner": "lb", "stateid": ob["stateid"], "type": "write",
               "offset": 0, "length": 10}),
    ));
}

fn open_b() -> Value {
    json!({"op": "OPEN", "owner": "p", "path": "b", "access": "both",
           "deny": "none", "create": {"mode": "unchecked"}})
}

/// The OPEN of `b` opens `b`, and its writes go there.
fn b_is_opened(s: &Scratch, a: &mut Nfs, r: &Value) {
    assert_eq!(r["created"], true, "b is created by this OPEN: {r}");
    ok(a.call_patiently(
        json!({"op": "WRITE", "stateid": r["stateid"], "offset": 0, "data": b64("to-b")}),
    ));
    assert_eq!(std::fs::read(s.root().join("b")).unwrap(), b"to-b");
    assert_eq!(
        std::fs::read(s.root().join("a")).unwrap(),
        b"",
        "nothing went to a"
    );
    ok(a.call(json!({"op": "CLOSE", "stateid": r["stateid"]})));
}

#[test]
fn a_different_open_at_a_delayed_opens_seqid_opens_its_own_file() {
    a_different_request_after_a_delayed_open(false, open_b(), b_is_opened);
}

#[test]
fn a_different_open_at_a_delayed_upgrades_seqid_opens_its_own_file() {
    a_different_request_after_a_delayed_open(true, open_b(), b_is_opened);
}

#[test]
fn a_remove_at_a_delayed_opens_seqid_removes() {
    let remove = json!({"op": "REMOVE", "path": "y"});
    a_different_request_after_a_delayed_open(false, remove, |s, _a, _r| {
        assert!(!s.root().join("y").exists(), "REMOVE removed y");
    });
}

/// A DELEGRETURN whose lease was given up in filterd but whose records
/// were not (filterd died between the two commits, the client saw DELAY),
/// re-sent after nfsshim was killed -9 and restarted: NFS4_OK, the answer
/// it would have had (review N3; it was NFS4ERR_EXPIRED). Nobody else's
/// DELEGRETURN, nor a CLOSE, of that stateid is answered NFS4_OK (and a
/// delegation revoked while nfsshim was down is still NFS4ERR_EXPIRED:
/// nfs_state.rs `a_stalled_recall_holder_across_an_nfsshim_restart`).
#[test]
fn a_delegreturn_resent_after_both_daemons_restart_is_ok() {
    // 1-2: client and session; 3: the OPEN; 4: the DELEGRETURN's mark in
    // the open state's record; 5: the lease given up; 6: its open state
    // and slot reply.
    let (s, fp, mut d, shim, mut a) = crashing("commit.before", 6);
    let o = ok(a.open(
        "p",
        "f",
        "read",
        "none",
        json!({"create": {"mode": "unchecked"}, "want_delegation": "read"}),
    ));
    let deleg = o["delegation"]["stateid"].clone();
    assert!(deleg.is_object(), "a delegation: {o}");
    let ret = json!({"op": "DELEGRETURN", "stateid": deleg});
    a.seqid += 1;
    let first = a.send(ret.clone());
    assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
    shim.kill9();
    d.wait_killed_at(&fp, Duration::from_secs(10));
    let _d2 = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("nfsshim", &s.socket(), "nfs-c");
    a.c = LineClient::connect(&shim.addr);
    let r = a.resend_patiently(&ret, Duration::from_secs(10));
    assert_eq!(r["status"], "NFS4_OK", "{fp}: the re-sent DELEGRETURN: {r}");
    let r = a.call(json!({"op": "CLOSE", "stateid": deleg}));
    assert_ne!(r["status"], "NFS4_OK", "a CLOSE of the delegation: {r}");
    let mut b = Nfs::connect(&shim.addr, "host-b", "bcbcbcbcbcbcbcbc");
    let r = b.call(ret);
    assert_ne!(r["status"], "NFS4_OK", "another client's DELEGRETURN: {r}");
    ok(a.call(json!({"op": "CLOSE", "stateid": o["stateid"]})));
}

/// Review N2: a client released while filterd is away. DESTROY_CLIENTID
/// was answered NFS4_OK with nothing done in filterd, and the lease reaper
/// dropped a lapsed client the same way: its open stayed in filterd,
/// attached to nfsshim and named by no state, and kept other clients out.
/// Now DESTROY_CLIENTID is NFS4ERR_DELAY until filterd is back and the
/// release done; the reaper waits for filterd.
#[test]
fn destroy_clientid_while_filterd_is_away_is_delayed_then_releases() {
    let s = Scratch::new("nfs-destroy-away");
    let mut d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("nfsshim", &s.socket(), "nfs-da");
    let mut a = Nfs::connect(&shim.addr, "host-a", "abababababababab");
    ok(a.open("p", "f", "both", "both", create()));
    d.kill9();
    let destroy = json!({"op": "DESTROY_CLIENTID", "clientid": a.clientid});
    let r = a.c.call_with("xid", destroy.clone());
    assert_eq!(r["status"], "NFS4ERR_DELAY", "filterd is away: {r}");
    let _d = Filterd::start(&s, &[], &[]);
    let r = wait_for("DESTROY_CLIENTID done", Duration::from_secs(10), || {
        let r = a.c.call_with("xid", destroy.clone());
        (r["status"] != "NFS4ERR_DELAY").then_some(r)
    });
    ok(r);
    assert!(rkfilter_tests::handles_on(&s, "f").is_empty());
    let mut b = Nfs::connect(&shim.addr, "host-b", "bcbcbcbcbcbcbcbc");
    ok(b.call_patiently(
        json!({"op": "OPEN", "owner": "q", "path": "f", "access": "both",
                               "deny": "both"}),
    ));
}

#[test]
fn a_lease_lapsing_while_filterd_is_away_is_released_once_it_is_back() {
    let s = Scratch::new("nfs-reap-away");
    let mut d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start_with("nfsshim", &s.socket(), "nfs-ra", &["--lease-ms", "1000"]);
    let mut a = Nfs::connect(&shim.addr, "host-a", "abababababababab");
    ok(a.open("p", "f", "both", "both", create()));
    d.kill9();
    // Longer than the lease, with nobody renewing it.
    let t0 = std::time::Instant::now();
    wait_for("the lease to lapse", Duration::from_secs(10), || {
        (t0.elapsed() > Duration::from_millis(2500)).then_some(())
    });
    let _d = Filterd::start(&s, &[], &[]);
    wait_for(
        "the lapsed client's open closed",
        Duration::from_secs(10),
        || rkfilter_tests::handles_on(&s, "f").is_empty().then_some(()),
    );
    let r = a.c.call_with(
        "xid",
        json!({"op": "CREATE_SESSION", "clientid": a.clientid}),
    );
    assert_eq!(r["status"], "NFS4ERR_STALE_CLIENTID", "{r}");
}

/// Review N1, for LOCK: a further lock-owner's handle, made in filterd
/// before it died (the client saw DELAY), was named by the slot and seqid
/// only, so a different LOCK sent at that seqid by another lock-owner
/// needing a handle of its own was handed that one — refused
/// NFS4ERR_ACCESS (another owner's), or, by the same lock-owner name on
/// another file, answered DELAY once. Now it gets a handle of its own.
#[test]
fn a_different_lock_at_a_delayed_locks_seqid_locks_its_own_file() {
    // 1-2: client and session; 3, 4: OPENs of f and g; 5-8: their first
    // lock-owners' locks, each with its records; 9: the handle of f's
    // second lock-owner.
    let (s, fp, mut d, _shim, mut a) = crashing("commit.after", 9);
    let f = ok(a.open("p", "f", "both", "none", create()));
    let g = ok(a.open("q", "g", "both", "none", create()));
    let lock = |stateid: &Value, owner: &str| {
        json!({"op": "LOCK", "owner": owner, "stateid": stateid, "type": "write",
               "offset": 0, "length": 1})
    };
    ok(a.call(lock(&g["stateid"], "l0")));
    ok(a.call(lock(&f["stateid"], "l1")));
    a.seqid += 1;
    let first = a.send(json!({"op": "LOCK", "owner": "l2", "stateid": f["stateid"],
                              "type": "write", "offset": 5, "length": 1}));
    assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
    let second = json!({"op": "LOCK", "owner": "l3", "stateid": g["stateid"], "type": "write",
                        "offset": 5, "length": 1});
    let (_d2, r) = restart_and_resend(&s, &mut d, &fp, &mut a, &second);
    assert_eq!(r["status"], "NFS4_OK", "{fp}: the second LOCK: {r}");
}

/// A LOCKU that unlocked in filterd (commit 6) but whose records did not
/// commit (filterd died before commit 7; the client saw DELAY), then
/// another client locks that range, then a different request at the
/// LOCKU's seqid: undoing the LOCKU (locking again) can never succeed now.
/// It is given up and the request runs — before, every request at that
/// seqid would have been answered by the undo's NFS4ERR_DENIED, the slot
/// stuck there for good.
#[test]
fn an_abandoned_locku_whose_range_was_taken_does_not_hold_the_slot() {
    // 1-2: client and session; 3: the OPEN; 4, 5: the LOCK's lock and
    // records; 6: the LOCKU's unlock; 7: its records.
    let (s, fp, mut d, shim, mut a) = crashing("commit.before", 7);
    let o = ok(a.open("p", "f", "both", "none", create()));
    let l = ok(
        a.call(json!({"op": "LOCK", "owner": "lo", "stateid": o["stateid"],
                             "type": "write", "offset": 0, "length": 10})),
    );
    a.seqid += 1;
    let first = a.send(json!({"op": "LOCKU", "lock_stateid": l["lock_stateid"],
                              "offset": 0, "length": 10}));
    assert_eq!(first["status"], "NFS4ERR_DELAY", "{fp}: {first}");
    d.wait_killed_at(&fp, Duration::from_secs(10));
    let _d2 = Filterd::start(&s, &[], &[]);
    another_client_locks_0_10(&shim);
    let write = json!({"op": "WRITE", "stateid": o["stateid"], "offset": 100, "data": b64("w")});
    let r = a.resend_patiently(&write, Duration::from_secs(10));
    assert_eq!(
        r["status"], "NFS4_OK",
        "{fp}: the WRITE at the LOCKU's seqid: {r}"
    );
    ok(a.call(json!({"op": "RECLAIM_COMPLETE"})));
}

/// The spec gives NFS4ERR_DENIED a `denied: {offset, length, type, owner}`
/// also when the conflicting lock is a local process's fcntl lock, of
/// which filterd names nothing: nfsshim sent the status without `denied`.
/// It names the range asked for and a placeholder owner.
#[test]
fn a_lock_refused_by_a_local_fcntl_lock_carries_denied() {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::AsFd;
    let (s, _d, _shim, mut a) = host_a("nfs-denied-local");
    let o = ok(a.open("p", "f", "both", "none", create()));
    let local = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.root().join("f"))
        .unwrap();
    let fl = libc::flock {
        l_type: i16::try_from(libc::F_WRLCK).unwrap(),
        l_whence: i16::try_from(libc::SEEK_SET).unwrap(),
        l_start: 0,
        l_len: 10,
        l_pid: 0,
    };
    fcntl(local.as_fd(), FcntlArg::F_OFD_SETLK(&fl)).unwrap();
    let r = a.call(json!({"op": "LOCK", "stateid": o["stateid"], "owner": "lo",
                          "type": "read", "offset": 5, "length": 20}));
    assert_denied(&r, 5, 20, "write", "local process");
}

/// A lock-owner's lock recovered not mirrored: host A's open of "f"
/// (`open`) by lock-owner "lo" holds bytes 0..100 (`lock`); filterd was
/// killed, a local process (`local`) locked bytes 70..80 before filterd
/// was back, so the recovered lock is not mirrored — as after a takeover,
/// where a frozen old owner's OFD locks are met.
struct RecoveredUnmirrored {
    s: Scratch,
    _filterd: (Filterd, Filterd),
    _shim: Shim,
    a: Nfs,
    open: Value,
    lock: Value,
    local: std::fs::File,
    ctl: libfilter::client::FilterClient,
}

fn recovered_unmirrored(name: &str) -> RecoveredUnmirrored {
    let (s, mut d, shim, mut a) = host_a(name);
    let open = ok(a.open("p", "f", "both", "none", create()));
    let lock = ok(a.call(
        json!({"op": "LOCK", "stateid": open["stateid"], "owner": "lo",
                             "type": "write", "offset": 0, "length": 100}),
    ));
    // filterd dies (its OFD locks with it); a local process locks bytes
    // 70..80 before it is back.
    d.kill9();
    let local = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.root().join("f"))
        .unwrap();
    local_write_lock(&local, 70, 10);
    let d2 = Filterd::start(&s, &[], &[]);
    let ctl = libfilter::client::FilterClient::connect_control(&s.socket()).unwrap();
    assert_eq!(
        held_locks(&ctl),
        [(0, 100, true)],
        "recovered, not mirrored"
    );
    RecoveredUnmirrored {
        s,
        _filterd: (d, d2),
        _shim: shim,
        a,
        open,
        lock,
        local,
        ctl,
    }
}

/// A local process's exclusive OFD lock of `length` bytes at `start`.
fn local_write_lock(local: &std::fs::File, start: i64, length: i64) {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::AsFd;
    let fl = libc::flock {
        l_type: i16::try_from(libc::F_WRLCK).unwrap(),
        l_whence: i16::try_from(libc::SEEK_SET).unwrap(),
        l_start: start,
        l_len: length,
        l_pid: 0,
    };
    fcntl(local.as_fd(), FcntlArg::F_OFD_SETLK(&fl)).unwrap();
}

/// filterd's locks (`filterctl locks`): offset, length, not mirrored.
fn held_locks(ctl: &libfilter::client::FilterClient) -> Vec<(u64, u64, bool)> {
    let mut v: Vec<_> = ctl
        .locks()
        .unwrap()
        .iter()
        .map(|l| (l.range.offset, l.range.length, l.unmirrored))
        .collect();
    v.sort_unstable();
    v
}

/// Review rvping 3: a frozen old owner's OFD locks outlive its lease, so
/// after a takeover the new owner's recovered locks are not mirrored
/// where they meet them. A LOCKU of the middle of such a range re-locks
/// the two pieces left; that mirror met the kernel lock and the LOCKU was
/// answered NFS4ERR_DENIED (owner "local process") — a LOCKU is never
/// DENIED — and the client's CLOSE then NFS4ERR_LOCKS_HELD. Here the
/// kernel lock is a local process's ([`recovered_unmirrored`]). The LOCKU
/// splits the lock in the table and the handle stays unmirrored for the
/// retry.
#[test]
fn a_locku_splitting_a_range_whose_mirror_conflicts_is_ok() {
    let mut r = recovered_unmirrored("nfs-locku-unmirrored");
    let u = r.a.call_patiently(
        json!({"op": "LOCKU", "lock_stateid": r.lock["lock_stateid"],
                                    "offset": 40, "length": 20}),
    );
    assert_eq!(u["status"], "NFS4_OK", "a LOCKU is never DENIED: {u}");
    assert_eq!(
        held_locks(&r.ctl),
        [(0, 40, true), (60, 40, true)],
        "split in the table, still not mirrored"
    );
    let u = ok(r
        .a
        .call(json!({"op": "LOCKU", "lock_stateid": u["lock_stateid"],
                             "offset": 0, "length": 100})));
    assert_eq!(held_locks(&r.ctl), [], "{u}");
    ok(r.a.call(json!({"op": "CLOSE", "stateid": r.open["stateid"]})));
    drop(r.local);
}

/// Review rr41d: while a lock-owner's recovered lock was not mirrored (a
/// local process holds part of it; after a takeover, a frozen old
/// owner's OFD locks), every LOCK of the owner was NFS4ERR_DENIED, owner
/// "local process", the range asked for free: the mirror's failure of the
/// kept range refused it. A free range is granted now — one next to the
/// kept range too (nfsshim merges it into one) — and a range a local
/// process holds is still DENIED.
#[test]
fn a_lock_of_a_free_range_by_an_owner_with_an_unmirrored_lock_is_granted() {
    let mut r = recovered_unmirrored("nfs-lock-unmirrored");
    local_write_lock(&r.local, 400, 10);
    let lock = |a: &mut Nfs, open: &Value, offset: u64, length: u64| {
        a.call_patiently(
            json!({"op": "LOCK", "stateid": open["stateid"], "owner": "lo",
                                "type": "write", "offset": offset, "length": length}),
        )
    };
    ok(lock(&mut r.a, &r.open, 200, 100));
    ok(lock(&mut r.a, &r.open, 100, 50));
    assert_eq!(
        held_locks(&r.ctl),
        [(0, 150, true), (200, 100, true)],
        "granted, the handle still not mirrored"
    );
    let denied = lock(&mut r.a, &r.open, 395, 10);
    assert_denied(&denied, 395, 10, "write", "local process");
    assert_eq!(held_locks(&r.ctl), [(0, 150, true), (200, 100, true)]);
    // The new bytes are mirrored: a local process cannot take them.
    let other = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(r.s.root().join("f"))
        .unwrap();
    for at in [120, 250] {
        let fl = libc::flock {
            l_type: i16::try_from(libc::F_WRLCK).unwrap(),
            l_whence: i16::try_from(libc::SEEK_SET).unwrap(),
            l_start: at,
            l_len: 1,
            l_pid: 0,
        };
        use std::os::fd::AsFd;
        let taken = nix::fcntl::fcntl(other.as_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&fl));
        assert!(taken.is_err(), "byte {at} is not mirrored");
    }
    drop(r.local);
}

/// Review rr41d: filterd's per-client lock cap counted a batch's locks but
/// not its unlocks, so a LOCKU of the middle of a range by a client at 63
/// locks on a file (its unlock and two re-locks, 64 after it) was
/// NFS4ERR_RESOURCE. It is granted; past the cap a split is
/// NFS4ERR_LOCK_RANGE, RFC 8881's LOCKU status for a sub-range unlock the
/// server does not support, and changes nothing.
#[test]
fn a_locku_split_is_counted_net_against_the_lock_cap() {
    let (s, _d, _shim, mut a) = host_a("nfs-locku-cap");
    let o = ok(a.open("p", "f", "both", "none", create()));
    let mut lock = Value::Null;
    for i in 0..63u64 {
        lock = ok(
            a.call(json!({"op": "LOCK", "stateid": o["stateid"], "owner": "lo",
                                "type": "write", "offset": i * 10, "length": 5})),
        );
    }
    let locku = |a: &mut Nfs, lock: &Value, offset: u64| {
        a.call(json!({"op": "LOCKU", "lock_stateid": lock["lock_stateid"],
                      "offset": offset, "length": 1}))
    };
    let lock = ok(locku(&mut a, &lock, 2));
    let r = locku(&mut a, &lock, 12);
    assert_eq!(r["status"], "NFS4ERR_LOCK_RANGE", "{r}");
    // Nothing changed: 64 locks, the range whole.
    let ctl = libfilter::client::FilterClient::connect_control(&s.socket()).unwrap();
    let held = held_locks(&ctl);
    assert_eq!(held.len(), 64);
    assert!(held.contains(&(10, 5, false)), "{held:?}");
    assert!(held.contains(&(3, 2, false)), "{held:?}");
}

/// A READ or WRITE past the largest file offset is the client's mistake
/// (review r4 #2): NFS4ERR_INVAL, never NFS4ERR_SERVERFAULT, and nothing
/// is written; I/O the open's access does not allow is NFS4ERR_ACCESS.
#[test]
fn io_past_the_largest_file_offset_is_invalid_not_a_server_fault() {
    let s = Scratch::new("nfs-io-range");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("nfsshim", &s.socket(), "nfs-a");
    let mut a = Nfs::connect(&shim.addr, "host-a", "0123456789abcdef");
    let ro = ok(a.open("p1", "f", "read", "none", create()))["stateid"].clone();
    let rw = ok(a.open("p2", "f", "both", "none", json!({})))["stateid"].clone();
    let top = u64::try_from(i64::MAX).unwrap();
    for (req, status) in [
        (
            json!({"op": "WRITE", "stateid": ro, "offset": 0, "data": b64("x")}),
            "NFS4ERR_ACCESS",
        ),
        (
            json!({"op": "READ", "stateid": rw, "offset": top + 1, "count": 1}),
            "NFS4ERR_INVAL",
        ),
        (
            json!({"op": "READ", "stateid": rw, "offset": u64::MAX, "count": 1}),
            "NFS4ERR_INVAL",
        ),
        (
            json!({"op": "READ", "stateid": rw, "offset": top, "count": 1}),
            "NFS4ERR_INVAL",
        ),
        (
            json!({"op": "WRITE", "stateid": rw, "offset": u64::MAX - 1, "data": b64("abc")}),
            "NFS4ERR_INVAL",
        ),
        (
            json!({"op": "WRITE", "stateid": rw, "offset": top - 1, "data": b64("abc")}),
            "NFS4ERR_INVAL",
        ),
        (
            json!({"op": "READ", "stateid": rw, "offset": top - 1, "count": 1}),
            "NFS4_OK",
        ),
    ] {
        let r = a.call(req.clone());
        assert_eq!(r["status"], status, "{req}: {r}");
    }
    assert_eq!(std::fs::read(s.root().join("f")).unwrap(), b"");
}

/// filterd's `replays_detected` (`filterctl stats`).
fn replays_detected(s: &Scratch) -> u64 {
    let sock = s.socket().display().to_string();
    let out = rkfilter_tests::filterctl(&["--socket", &sock, "stats", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.json()["replays_detected"]
        .as_u64()
        .expect("replays_detected")
}

/// Waits for `replays_detected` to reach `n` (nfsshim's report is one
/// way), then checks it went no further.
fn replays_reach(s: &Scratch, n: u64) {
    let seen = wait_for("replays_detected to count", Duration::from_secs(10), || {
        let c = replays_detected(s);
        (c >= n).then_some(c)
    });
    assert_eq!(seen, n, "one count per re-send");
}

/// An exclusive create re-sent as a new request (the same verifier) is a
/// replay nfsshim recognises from its verifier record: counted once. One
/// with another verifier is no replay. Review of 7d60aee: filterd no
/// longer counted nfsshim's lookups and nfsshim did not report this one.
#[test]
fn replays_detected_counts_a_resent_exclusive_create() {
    let (s, _d, _shim, mut a) = host_a("nfs-replay-excl");
    let excl = json!({"create": {"mode": "exclusive", "verifier": "0000000000000001"}});
    assert_eq!(
        ok(a.open("p", "x", "both", "none", excl.clone()))["created"],
        true
    );
    let start = replays_detected(&s);
    let o2 = ok(a.open("p", "x", "both", "none", excl));
    assert_eq!(o2["created"], true, "{o2}");
    replays_reach(&s, start + 1);
    let other = json!({"create": {"mode": "exclusive", "verifier": "0000000000000002"}});
    let r = a.open("p2", "x", "both", "none", other);
    assert_eq!(r["status"], "NFS4ERR_EXIST");
    // A re-sent READ after it: counted with anything counted before it,
    // so one more and no other.
    let read = json!({"op": "READ", "stateid": o2["stateid"], "offset": 0, "count": 1});
    ok(a.call(read.clone()));
    ok(a.send(read));
    replays_reach(&s, start + 2);
}

/// A re-send nfsshim answers from its slot cache never waits for
/// filterd. Review of 7d60aee: each one sent filterd a notice, under the
/// client's lock, waiting for room; with filterd stopped the 279th waited
/// the whole call timeout, and then nfsshim gave its connection up
/// ("frontend lost", every handle disconnected). Now they are counted
/// in nfsshim and told without waiting; what filterd could not take yet
/// is told once it reads again.
#[test]
fn cached_resends_never_wait_for_a_stopped_filterd() {
    let s = Scratch::new("nfs-replay-stopped");
    let d = Filterd::start(&s, &[], &[]);
    let timeout = [("RKFILTER_CALL_TIMEOUT_MS", "3000")];
    let shim = Shim::start_with_env("nfsshim", &s.socket(), "nfs-a", &timeout);
    let mut a = Nfs::connect(&shim.addr, "host-a", "0123456789abcdef");
    let open = json!({"op": "OPEN", "owner": "o", "path": "f", "access": "both",
                      "deny": "none", "create": {"mode": "unchecked"}});
    let sid = ok(a.call(open))["stateid"].clone();
    let read = json!({"op": "READ", "stateid": sid, "offset": 0, "count": 1});
    ok(a.call(read.clone()));
    let start = replays_detected(&s);
    d.stop();
    const RESENDS: u64 = 1000;
    let mut slowest = Duration::ZERO;
    for _ in 0..RESENDS {
        let t0 = std::time::Instant::now();
        ok(a.send(read.clone()));
        slowest = slowest.max(t0.elapsed());
    }
    d.signal(nix::sys::signal::Signal::SIGCONT);
    // (Well under the 3 s call timeout the notice used to wait for.)
    assert!(
        slowest < Duration::from_secs(1),
        "a re-send took {slowest:?}"
    );
    replays_reach(&s, start + RESENDS);
    assert!(
        !d.log_text().contains("frontend lost"),
        "nfsshim kept its connection"
    );
    ok(a.call(read));
}

/// `replays_detected` counts each re-send nfsshim answers from its slot
/// cache once, before and after an nfsshim restart, and nothing else.
/// Before, filterd counted every record lookup that found one: a re-sent
/// OPEN or WRITE (answered from the cache, filterd never asked) counted
/// nothing, and every nfsshim attach (its registry check) counted one
/// (review).
#[test]
fn replays_detected_counts_each_resend_once_and_no_nfsshim_attach() {
    let (s, _d, mut shim, mut a) = host_a("nfs-replay-count");
    let start = replays_detected(&s);
    let open = json!({"op": "OPEN", "owner": "o", "path": "f", "access": "both",
                      "deny": "none", "create": {"mode": "unchecked"}});
    let sid = ok(a.call(open.clone()))["stateid"].clone();
    assert_eq!(ok(a.send(open))["stateid"], sid, "the cached reply");
    replays_reach(&s, start + 1);
    let write = json!({"op": "WRITE", "stateid": sid, "offset": 0, "data": b64("x")});
    ok(a.call(write.clone()));
    ok(a.send(write));
    replays_reach(&s, start + 2);
    let read = json!({"op": "READ", "stateid": sid, "offset": 0, "count": 1});
    for round in 0..3 {
        let before = replays_detected(&s);
        shim.kill9();
        shim = Shim::start("nfsshim", &s.socket(), "nfs-a");
        a.c = LineClient::connect(&shim.addr);
        // A new request is served: this nfsshim attached and restored.
        assert_eq!(ok(a.call_patiently(read.clone()))["data"], b64("x"));
        assert_eq!(replays_detected(&s), before, "round {round}: no replay");
        ok(a.send(read.clone()));
        replays_reach(&s, before + 1);
    }
}

/// nfsshim's name for an exclusive create's verifier record: FNV-1a of
/// the path (`state::fnv64`).
fn fnv64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An exclusive create with the verifier `v`.
fn excl(v: usize) -> Value {
    json!({"create": {"mode": "exclusive", "verifier": format!("{v:016x}")}})
}

/// filterd keeps 4096 records of a scope and drops the lowest op ids
/// beyond that; an exclusive create's verifier record is named by its
/// path's hash, so once the table was full a new verifier with a smaller
/// hash than every stored one was dropped in its own commit, and its
/// client's re-send (a new request with the same verifier) was
/// NFS4ERR_EXIST for its own create (review rv-shims 2). nfsshim keeps
/// the table within the cap itself, deleting the oldest records before a
/// create writes: with eight clients creating at once (re-review
/// rr-shimfix 1: deletes queued to one thread let them pass the cap, and
/// 1,744 of the last 3,000 verifiers went), the newest 1,000 are all
/// kept, the new smallest-hash one too, and the oldest (`f0`) is gone.
#[test]
fn a_full_exclusive_create_table_drops_its_oldest_verifiers() {
    let (_s, _d, shim, mut a) = host_a("nfs-excl-full");
    const N: usize = 5600;
    ok(a.open("p", "f0", "both", "none", excl(0)));
    std::thread::scope(|t| {
        for c in 0..8 {
            let addr = shim.addr.clone();
            t.spawn(move || {
                let mut b = Nfs::connect(&addr, &format!("host-{c}"), "0123456789abcdef");
                for i in (1 + c..N).step_by(8) {
                    ok(b.open("p", &format!("f{i}"), "both", "none", excl(i)));
                }
            });
        }
    });
    let least = (0..N).map(|i| fnv64(&format!("f{i}"))).min().unwrap_or(0);
    let name = (0..)
        .map(|k| format!("n{k}"))
        .find(|n| fnv64(n) < least)
        .expect("a name");
    let o = ok(a.open("p", &name, "both", "none", excl(99_999)));
    assert_eq!(o["created"], true, "{o}");
    ok(a.call(json!({"op": "CLOSE", "stateid": o["stateid"]})));
    let again = ok(a.open("p", &name, "both", "none", excl(99_999)));
    assert_eq!(again["created"], true, "the verifier is kept: {again}");
    let oldest = a.open("p", "f0", "both", "none", excl(0));
    assert_eq!(
        oldest["status"], "NFS4ERR_EXIST",
        "the oldest went: {oldest}"
    );
    let mut z = Nfs::connect(&shim.addr, "host-z", "0123456789abcdef");
    let lost: Vec<usize> = (N - 1000..N)
        .filter(|i| z.open("p", &format!("f{i}"), "both", "none", excl(*i))["status"] != "NFS4_OK")
        .collect();
    assert!(
        lost.is_empty(),
        "{} of the newest 1000 lost: {lost:?}",
        lost.len()
    );
}

/// A refused exclusive create writes no verifier record and takes no
/// room: before (re-review rr-shimfix 2), each counted as written and
/// 4,200 of them (no such directory) pushed a real verifier out.
#[test]
fn refused_exclusive_creates_push_no_verifier_out() {
    let (_s, _d, shim, mut a) = host_a("nfs-excl-refused");
    let o = ok(a.open("p", "mine", "both", "none", excl(7)));
    ok(a.call(json!({"op": "CLOSE", "stateid": o["stateid"]})));
    std::thread::scope(|t| {
        for c in 0..4 {
            let addr = shim.addr.clone();
            t.spawn(move || {
                let mut b = Nfs::connect(&addr, &format!("host-{c}"), "0123456789abcdef");
                for i in (c..4200).step_by(4) {
                    let r = b.open("p", &format!("nodir/x{i}"), "both", "none", excl(i));
                    assert_eq!(r["status"], "NFS4ERR_NOENT", "{r}");
                }
            });
        }
    });
    let again = ok(a.open("p", "mine", "both", "none", excl(7)));
    assert_eq!(again["created"], true, "the verifier is kept: {again}");
}

/// A REMOVE's delete of the name's verifier ran after the change, so it
/// could take the verifier of another client's exclusive create of the
/// name made just after the remove: that client's re-send of its own
/// create was NFS4ERR_EXIST (re-review rr-share 1: 11 of 400 races).
/// The name is held from before the REMOVE is sent until its verifier is
/// deleted; a create of it meanwhile is NFS4ERR_DELAY and re-sent.
#[test]
fn a_remove_takes_no_verifier_of_a_create_made_after_it() {
    let (_s, _d, shim, mut a) = host_a("nfs-excl-remove-race");
    let mut b = Nfs::connect(&shim.addr, "host-b", "0123456789abcdef");
    for r in 0..300 {
        let o = ok(a.open("p", "P", "both", "none", excl(1)));
        ok(a.call(json!({"op": "CLOSE", "stateid": o["stateid"]})));
        let mut create = excl(1000 + r);
        for (k, v) in [
            ("op", "OPEN"),
            ("owner", "p"),
            ("path", "P"),
            ("access", "both"),
            ("deny", "none"),
        ] {
            create[k] = json!(v);
        }
        let o = std::thread::scope(|t| {
            let remover = t.spawn(|| ok(a.call(json!({"op": "REMOVE", "path": "P"}))));
            let since = std::time::Instant::now();
            let o = loop {
                // A DELAY is re-sent on its seqid, as a client does.
                b.seqid += 1;
                let o = b.resend_patiently(&create, Duration::from_secs(10));
                match o["status"].as_str() {
                    Some("NFS4_OK") => break o,
                    // The REMOVE not made yet (or failed: its thread's
                    // panic is passed on rather than waited for).
                    Some("NFS4ERR_EXIST") if since.elapsed() < Duration::from_secs(20) => {}
                    _ => panic!("round {r}: {o}"),
                }
            };
            remover.join().expect("remover");
            o
        });
        ok(b.call(json!({"op": "CLOSE", "stateid": o["stateid"]})));
        let again = b.open("p", "P", "both", "none", excl(1000 + r));
        assert_eq!(
            again["status"], "NFS4_OK",
            "round {r}: its verifier went: {again}"
        );
        ok(b.call(json!({"op": "CLOSE", "stateid": again["stateid"]})));
        ok(b.call(json!({"op": "REMOVE", "path": "P"})));
    }
}

/// Forms the spec refuses (rvspec 7): an exclusive create's verifier
/// that is not hex ("zz" made the file), and a lock range past
/// 2^64 that is not "to end of file" (RFC 8881 18.10.4: NFS4ERR_INVAL;
/// it was granted). Refused, nothing made or locked; a one-byte lock at
/// 2^64-1 and one to end of file are fine. The spec's create verifier is
/// any `hex` (rr38e 3: "0123" was refused), and an unchecked or guarded
/// create's, ignored, is not checked.
#[test]
fn a_bad_create_verifier_and_a_lock_range_past_2_64_are_invalid() {
    let (s, _d, _shim, mut a) = host_a("nfs-forms");
    let long = "a".repeat(65);
    for v in ["zz", "", "0123456789abcdeg", long.as_str()] {
        let excl = json!({"create": {"mode": "exclusive", "verifier": v}});
        let r = a.open("x", "made", "both", "none", excl);
        assert_eq!(r["status"], "NFS4ERR_INVAL", "verifier {v}: {r}");
    }
    assert!(!s.root().join("made").exists(), "a refused create made it");
    for (owner, v) in [("x1", "0123"), ("x2", "0123abcd")] {
        let excl = json!({"create": {"mode": "exclusive", "verifier": v}});
        ok(a.open(owner, &format!("made-{v}"), "both", "none", excl));
    }
    let unchecked = json!({"create": {"mode": "unchecked", "verifier": "zz"}});
    ok(a.open("x3", "made-unchecked", "both", "none", unchecked));
    let excl = json!({"create": {"mode": "exclusive", "verifier": "0123456789ABCDEF"}});
    let sid = ok(a.open("x", "made", "both", "none", excl))["stateid"].clone();
    let lock = |a: &mut Nfs, owner: &str, offset: u64, length: u64| {
        a.call(
            json!({"op": "LOCK", "stateid": sid, "owner": owner, "type": "write",
                      "offset": offset, "length": length}),
        )
    };
    for (offset, length) in [(u64::MAX, 2), (100, u64::MAX - 1), (3, u64::MAX - 1)] {
        let r = lock(&mut a, "lo", offset, length);
        assert_eq!(r["status"], "NFS4ERR_INVAL", "{offset}+{length}: {r}");
    }
    // Nothing was locked: another owner takes the bytes the refused
    // ranges named.
    let lsid = ok(lock(&mut a, "lo2", 100, 10))["lock_stateid"].clone();
    ok(lock(&mut a, "lo", u64::MAX, 1));
    ok(lock(&mut a, "lo3", 1 << 40, u64::MAX));
    // A LOCKU past 2^64 is not refused so (rr38e 4): a lock granted so
    // before the check, kept in the open's record, must come off.
    ok(a.call(json!({"op": "LOCKU", "lock_stateid": lsid, "offset": 100, "length": u64::MAX - 1})));
    ok(lock(&mut a, "lo4", 100, 10));
}

/// filterd, nfsshim and smbshim in a new scratch dir `name` whose file
/// `f` holds ten bytes; client host-n's nfsl/1 session and an smbl/1
/// session.
fn nfs_and_smb_on_f(name: &str) -> (Scratch, Filterd, [Shim; 2], Nfs, (LineClient, u64)) {
    let s = Scratch::new(name);
    std::fs::write(s.root().join("f"), b"0123456789").unwrap();
    let d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-n");
    let smb = Shim::start("smbshim", &s.socket(), "smb-m");
    let n = Nfs::connect(&nfs.addr, "host-n", "5555555555555555");
    let m = rkfilter_tests::smb_session(&smb.addr);
    (s, d, [nfs, smb], n, m)
}

/// Attack44 F1: an smbl/1 CREATE that overwrites the file asking only to
/// read empties it all the same, so it recalls another client's read
/// delegation first (RFC 8881 §10.4: a delegation is recalled before
/// another client changes the file) and is answered once the delegation
/// is returned. Before, it was answered at once, nothing recalled, and
/// the holder went on serving the old bytes.
#[test]
fn a_read_only_smb_overwrite_recalls_a_read_delegation() {
    let (s, _d, _shims, mut n, (mut m, msid)) = nfs_and_smb_on_f("nfs-ro-overwrite");
    let o = ok(n.open("p", "f", "read", "none", json!({"want_delegation": "read"})));
    assert_eq!(o["delegation"]["type"], "read", "{o}");
    let deleg = o["delegation"]["stateid"].clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = m.call(json!({"cmd": "CREATE", "session_id": msid, "path": "f",
                              "access": ["read"], "share": ["read", "write", "delete"],
                              "disposition": "overwrite"}));
        let _ = tx.send(r);
    });
    // Bounded: without the recall, none comes.
    n.c.set_read_timeout(Duration::from_secs(10));
    let cb = n.c.next_line().expect("a CB_RECALL before the overwrite");
    assert_eq!(cb["op"], "CB_RECALL", "{cb}");
    assert_eq!(
        std::fs::read(s.root().join("f")).unwrap(),
        b"0123456789",
        "emptied before the recall was answered"
    );
    ok(n.call(json!({"op": "DELEGRETURN", "stateid": deleg})));
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the CREATE's answer");
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(std::fs::metadata(s.root().join("f")).unwrap().len(), 0);
}

/// Re-review rr44e R1: an nfsl/1 deny=write reservation keeps a read-only
/// smbl/1 overwrite out (`STATUS_SHARING_VIOLATION`: the overwrite writes,
/// and share modes are checked with that access added), and the file
/// keeps its bytes. Before, the overwrite was granted as a reader and
/// emptied it.
#[test]
fn an_nfs_deny_write_keeps_a_read_only_smb_overwrite_out() {
    let (s, _d, _shims, mut n, (mut m, msid)) = nfs_and_smb_on_f("nfs-deny-overwrite");
    ok(n.open("p", "f", "read", "write", json!({})));
    for disposition in ["overwrite", "overwrite_if", "supersede"] {
        let r = m.call(json!({"cmd": "CREATE", "session_id": msid, "path": "f",
                              "access": ["read"], "share": ["read", "write", "delete"],
                              "disposition": disposition}));
        assert_eq!(
            r["status"], "STATUS_SHARING_VIOLATION",
            "{disposition}: {r}"
        );
    }
    assert_eq!(std::fs::read(s.root().join("f")).unwrap(), b"0123456789");
    let r = m.call(json!({"cmd": "CREATE", "session_id": msid, "path": "f",
                          "access": ["read"], "share": ["read", "write", "delete"],
                          "disposition": "open"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "a reader is shared: {r}");
}

/// Re-review rr45a F1: an smbl/1 read-only overwrite that is done holds
/// the file with the access it asked for, reading, as Windows records it
/// (the writing it implied counted for its share check only): an nfsl/1
/// OPEN denying `write` is granted after it, and then an smbl/1 CREATE
/// sharing only `read`. Before, the overwrite held the file as a writer
/// for its life: `NFS4ERR_SHARE_DENIED`.
#[test]
fn a_done_read_only_smb_overwrite_leaves_room_for_an_nfs_deny_write() {
    let (s, _d, _shims, mut n, (mut m, msid)) = nfs_and_smb_on_f("nfs-overwrite-done");
    let r = m.call(json!({"cmd": "CREATE", "session_id": msid, "path": "f",
                          "access": ["read"], "share": ["read", "write", "delete"],
                          "disposition": "overwrite"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(std::fs::metadata(s.root().join("f")).unwrap().len(), 0);
    ok(n.open("p", "f", "read", "write", json!({})));
    let r = m.call(json!({"cmd": "CREATE", "session_id": msid, "path": "f",
                          "access": ["read"], "share": ["read"], "disposition": "open"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
}

/// Attack44 F4: a path with a component over 255 bytes (NAME_MAX) is an
/// invalid name — smbl/1 `STATUS_OBJECT_NAME_INVALID`, nfsl/1
/// `NFS4ERR_INVAL` — refused before filterd opens anything, and no frame
/// counts as bad. Before, it reached `openat2`, whose ENAMETOOLONG was
/// answered `BadFrame` (STATUS_INVALID_PARAMETER). A 255-byte name is
/// fine.
#[test]
fn a_name_over_255_bytes_is_an_invalid_name() {
    let s = Scratch::new("nfs-long-name");
    std::fs::create_dir(s.root().join("d")).unwrap();
    let d = Filterd::start(&s, &[], &[]);
    let nfs = Shim::start("nfsshim", &s.socket(), "nfs-ln");
    let smb = Shim::start("smbshim", &s.socket(), "smb-ln");
    let mut n = Nfs::connect(&nfs.addr, "host-n", "6666666666666666");
    let (mut m, msid) = rkfilter_tests::smb_session(&smb.addr);
    let long = "x".repeat(256);
    for path in [long.clone(), format!("d/{long}")] {
        let r = m.call(json!({"cmd": "CREATE", "session_id": msid, "path": path,
                              "access": ["read", "write"], "share": [], "disposition": "open_if"}));
        assert_eq!(r["status"], "STATUS_OBJECT_NAME_INVALID", "{r}");
        let r = n.open("p", &path, "both", "none", create());
        assert_eq!(r["status"], "NFS4ERR_INVAL", "{r}");
        assert!(!r.to_string().contains("BadFrame"), "{r}");
    }
    let fine = "x".repeat(255);
    let r = m.call(json!({"cmd": "CREATE", "session_id": msid, "path": fine,
                          "access": ["read", "write"], "share": [], "disposition": "create"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(s.root().join(&fine).exists());
    assert_eq!(
        std::fs::read_dir(s.root().join("d")).unwrap().count(),
        0,
        "nothing made"
    );
    let st = d.control().stats().expect("stats");
    assert_eq!(st.bad_frames, 0, "{st:?}");
}
