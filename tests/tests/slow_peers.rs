//! A slow, stalled or flooding peer hurts only itself (issue 13): through
//! the real filterd and frontends, a client that stops reading is dropped
//! without stalling anyone else's lease breaks, a flood of connections or
//! sessions is refused with a named limit, and a lease-break ack is served
//! while a CREATE on the same connection waits for it.

use std::time::{Duration, Instant};

use rkfilter_tests::{connect_from, wait_for, Filterd, LineClient, Scratch, Shim};
use serde_json::{json, Value};

fn session(c: &mut LineClient, user: &str) -> u64 {
    let r = c.call(json!({"cmd": "SESSION_SETUP", "client_guid": uuid::Uuid::new_v4().to_string(), "user": user}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    r["session_id"].as_u64().expect("session_id")
}

fn create_req(sid: u64, path: &str, access: &[&str], lease: Option<(&str, &str)>) -> Value {
    let mut req = json!({"cmd": "CREATE", "session_id": sid, "path": path, "access": access,
                         "share": ["read", "write", "delete"], "disposition": "open_if"});
    if let Some((key, state)) = lease {
        req["lease"] = json!({"key": key, "state": state});
    }
    req
}

fn create(
    c: &mut LineClient,
    sid: u64,
    path: &str,
    access: &[&str],
    lease: Option<(&str, &str)>,
) -> Value {
    let r = c.call(create_req(sid, path, access, lease));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    r
}

fn handles_of(d: &Filterd, path: &str) -> usize {
    d.control()
        .handles()
        .expect("handles")
        .iter()
        .filter(|h| h.record.path.as_str() == path)
        .count()
}

/// Old code: smbshim's reader for the stalled client blocked in a socket
/// write holding the connection's writer lock, and the lease-break thread
/// blocked behind it; the conflicting CREATE waited out the whole break
/// timeout and the other client's LEASE_BREAK never came.
#[test]
fn a_client_that_stops_reading_is_dropped_and_others_still_get_their_breaks() {
    let s = Scratch::new("slow-reader");
    std::fs::write(s.root().join("big"), vec![b'x'; 1 << 20]).unwrap();
    std::fs::write(s.root().join("y"), b"y").unwrap();
    let d = Filterd::start(&s, &["--break-timeout-ms", "30000"], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-slow");

    let ks = uuid::Uuid::new_v4().to_string();
    let kb = uuid::Uuid::new_v4().to_string();
    let mut stalled = LineClient::connect(&shim.addr);
    let ss = session(&mut stalled, "stalled");
    let big = create(&mut stalled, ss, "big", &["read"], Some((&ks, "RWH")));
    let mut b = LineClient::connect(&shim.addr);
    let sb = session(&mut b, "b");
    create(&mut b, sb, "y", &["read"], Some((&kb, "RWH")));

    // The stalled client asks for ~90 MiB of READs and reads none of it.
    for _ in 0..64 {
        stalled.send_only(
            "mid",
            json!({"cmd": "READ", "session_id": ss, "file_id": big["file_id"], "offset": 0, "length": 1 << 20}),
        );
    }
    // smbshim drops it: its session ends and its open goes.
    wait_for(
        "the stalled client's open to go",
        Duration::from_secs(20),
        || (handles_of(&d, "big") == 0).then_some(()),
    );

    // A conflicting open of its file proceeds without waiting for a break.
    let mut c = LineClient::connect(&shim.addr);
    let sc = session(&mut c, "c");
    let t0 = Instant::now();
    create(&mut c, sc, "big", &["read", "write"], None);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "waited {:?} for a client that is gone",
        t0.elapsed()
    );

    // Another client's break is delivered promptly.
    let addr = shim.addr.clone();
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut c2 = LineClient::connect(&addr);
        let s2 = session(&mut c2, "c2");
        create(&mut c2, s2, "y", &["read", "write"], None);
    });
    b.set_read_timeout(Duration::from_secs(10));
    let n = b.next_line().expect("a LEASE_BREAK for b within 10 s");
    assert_eq!(n["cmd"], "LEASE_BREAK", "{n}");
    assert_eq!(n["lease_key"], json!(kb));
    let ack = b.call(
        json!({"cmd": "LEASE_BREAK_ACK", "session_id": sb, "lease_key": kb,
                            "state": n["new_state"]}),
    );
    assert_eq!(ack["status"], "STATUS_SUCCESS", "{ack}");
    writer.join().expect("conflicting open");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    // The stalled client's connection was closed by the server.
    stalled.set_read_timeout(Duration::from_secs(20));
    while stalled.next_line().is_some() {}
    assert!(
        stalled.raw(b"{\"cmd\":\"ECHO\",\"mid\":999}\n").is_none(),
        "dropped"
    );
}

/// Old code (issue 17 #10): the connection's reader was busy with the
/// CREATE, so the LEASE_BREAK_ACK behind it was read only after the break
/// timed out (30 s here).
#[test]
fn a_break_ack_is_served_while_a_create_on_the_same_connection_waits() {
    let s = Scratch::new("ack-same-conn");
    let _d = Filterd::start(&s, &["--break-timeout-ms", "30000"], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-ack");
    let mut a = LineClient::connect(&shim.addr);
    let sid = session(&mut a, "a");
    let k1 = uuid::Uuid::new_v4().to_string();
    let k2 = uuid::Uuid::new_v4().to_string();
    create(&mut a, sid, "f", &["read", "write"], Some((&k1, "RWH")));
    let t0 = Instant::now();
    let open2 = a.send_only("mid", create_req(sid, "f", &["read"], Some((&k2, "RH"))));
    a.set_read_timeout(Duration::from_secs(10));
    let n = a
        .next_line()
        .expect("a LEASE_BREAK before the CREATE's reply");
    assert_eq!(
        (n["cmd"].as_str(), n["lease_key"].as_str()),
        (Some("LEASE_BREAK"), Some(k1.as_str())),
        "{n}"
    );
    let ack = a.send_only(
        "mid",
        json!({"cmd": "LEASE_BREAK_ACK", "session_id": sid, "lease_key": k1, "state": n["new_state"]}),
    );
    let mut replies = std::collections::HashMap::new();
    while replies.len() < 2 {
        let v = a
            .next_line()
            .expect("the ack's and the CREATE's replies within 10 s");
        if let Some(mid) = v["mid"].as_u64() {
            replies.insert(mid, v);
        }
    }
    assert_eq!(
        replies[&ack]["status"], "STATUS_SUCCESS",
        "{:?}",
        replies[&ack]
    );
    assert_eq!(
        replies[&open2]["status"], "STATUS_SUCCESS",
        "{:?}",
        replies[&open2]
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

/// Old code (issue 17 #10): SET_INFO with end_of_file and delete_on_close
/// applied one of them and answered success.
#[test]
fn set_info_with_several_changes_is_refused_and_changes_nothing() {
    let s = Scratch::new("setinfo-two");
    std::fs::write(s.root().join("f"), b"0123456789").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-si");
    let mut a = LineClient::connect(&shim.addr);
    let sid = session(&mut a, "a");
    let f = create(&mut a, sid, "f", &["read", "write", "delete"], None);
    let r = a.call(
        json!({"cmd": "SET_INFO", "session_id": sid, "file_id": f["file_id"],
                          "end_of_file": 3, "delete_on_close": true}),
    );
    assert_eq!(r["status"], "STATUS_INVALID_PARAMETER", "{r}");
    assert!(
        r["error"].as_str().unwrap_or("").contains("one of"),
        "says why: {r}"
    );
    let r = a.call(json!({"cmd": "CLOSE", "session_id": sid, "file_id": f["file_id"]}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(
        std::fs::read(s.root().join("f")).unwrap(),
        b"0123456789",
        "neither applied"
    );
}

/// Item 6 of issue 13: one connection cannot set up more than
/// --max-sessions-per-connection sessions, and connections past
/// --max-connections are refused; others keep working.
#[test]
fn sessions_and_connections_are_capped_per_flooder() {
    let s = Scratch::new("smb-flood");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start_with(
        "smbshim",
        &s.socket(),
        "smb-flood",
        &[
            "--max-connections",
            "4",
            "--max-sessions-per-connection",
            "3",
        ],
    );
    let mut flooder = LineClient::connect(&shim.addr);
    for _ in 0..3 {
        session(&mut flooder, "f");
    }
    let r = flooder.call(json!({"cmd": "SESSION_SETUP", "client_guid": uuid::Uuid::new_v4().to_string(), "user": "f"}));
    assert_eq!(r["status"], "STATUS_INSUFFICIENT_RESOURCES", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("--max-sessions-per-connection"),
        "{r}"
    );
    // Another connection still sets up sessions.
    let mut other = LineClient::connect(&shim.addr);
    session(&mut other, "o");
    let _more: Vec<LineClient> = (0..2).map(|_| LineClient::connect(&shim.addr)).collect();
    // A fifth connection gets one refusal line and is closed.
    let mut fifth = LineClient::connect(&shim.addr);
    let r = fifth.next_line().expect("a refusal");
    assert_eq!(r["status"], "STATUS_INSUFFICIENT_RESOURCES", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("--max-connections 4"),
        "{r}"
    );
    assert!(fifth.next_line().is_none(), "closed");
    // Those served carry on; when one goes, its slot frees.
    session(&mut other, "o");
    drop(flooder);
    wait_for("a connection slot to free", Duration::from_secs(10), || {
        let mut c = LineClient::connect(&shim.addr);
        c.set_read_timeout(Duration::from_secs(2));
        let id = c.send_only("mid", json!({"cmd": "ECHO"}));
        c.reply_to("mid", id)
            .filter(|(r, _)| r["status"] == "STATUS_SUCCESS")
            .map(|_| ())
    });
}

/// Issue 13 #6: a flood of connections from one host fills only that
/// host's share (--max-connections-per-peer); another host still gets in.
/// Old code: no cap at all, a thread per connection without bound.
#[test]
fn one_hosts_connection_flood_leaves_room_for_other_hosts() {
    use std::io::{BufRead, BufReader, Write};
    let s = Scratch::new("peer-flood");
    let _d = Filterd::start(&s, &[], &[]);
    for (shim_bin, id, busy, echo) in [
        (
            "smbshim",
            "mid",
            "STATUS_INSUFFICIENT_RESOURCES",
            json!({"cmd": "ECHO", "mid": 1}),
        ),
        (
            "nfsshim",
            "xid",
            "NFS4ERR_RESOURCE",
            json!({"op": "EXCHANGE_ID", "xid": 1, "owner": "o", "verifier": "0000000000000001"}),
        ),
    ] {
        let shim = Shim::start_with(
            shim_bin,
            &s.socket(),
            &format!("{shim_bin}-pf"),
            &["--max-connections-per-peer", "3"],
        );
        let flooder = std::net::Ipv4Addr::new(127, 0, 0, 1);
        let _held: Vec<_> = (0..3).map(|_| connect_from(flooder, &shim.addr)).collect();
        let mut over = BufReader::new(connect_from(flooder, &shim.addr));
        let mut l = String::new();
        over.read_line(&mut l).expect("a refusal line");
        let r: Value = serde_json::from_str(&l).expect("JSON");
        assert_eq!(
            (r["status"].as_str(), r[id].is_null()),
            (Some(busy), true),
            "{r}"
        );
        assert!(
            r["error"]
                .as_str()
                .unwrap_or("")
                .contains("--max-connections-per-peer 3"),
            "{r}"
        );
        // Another host is served.
        let mut other = connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), &shim.addr);
        other.write_all(format!("{echo}\n").as_bytes()).unwrap();
        let mut l = String::new();
        BufReader::new(other).read_line(&mut l).expect("a reply");
        let r: Value = serde_json::from_str(&l).expect("JSON");
        assert_eq!(r[id], 1, "{shim_bin}: served: {r}");
    }
}

/// Requests read before the client half-closes its connection are all
/// answered: the connection's writer closes only when the worker that
/// runs them is done.
#[test]
fn requests_before_a_half_close_are_all_answered() {
    use std::io::{BufRead, BufReader, Write};
    let s = Scratch::new("half-close");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-hc");
    let mut c = std::net::TcpStream::connect(&shim.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut replies = BufReader::new(c.try_clone().unwrap()).lines();
    let guid = uuid::Uuid::new_v4().to_string();
    let setup = json!({"cmd": "SESSION_SETUP", "mid": 1, "client_guid": guid, "user": "h"});
    c.write_all(format!("{setup}\n").as_bytes()).unwrap();
    let first: Value = serde_json::from_str(&replies.next().unwrap().unwrap()).unwrap();
    // Session ids are random (not guessable): the one it was given.
    let sid = first["session_id"].as_u64().expect("a session");
    let lines = [
        json!({"cmd": "CREATE", "mid": 2, "session_id": sid, "path": "hc", "access": ["read", "write"],
               "share": ["read"], "disposition": "open_if"}),
        json!({"cmd": "ECHO", "mid": 3}),
    ];
    for l in &lines {
        c.write_all(format!("{l}\n").as_bytes()).unwrap();
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let rest: Vec<Value> = replies
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .collect();
    let created = rest.iter().find(|v| v["mid"] == 2);
    assert_eq!(
        created.map(|v| &v["status"]),
        Some(&json!("STATUS_SUCCESS")),
        "{rest:?}"
    );
    let mut mids: Vec<u64> = std::iter::once(&first)
        .chain(&rest)
        .filter_map(|v| v["mid"].as_u64())
        .collect();
    mids.sort_unstable();
    assert_eq!(mids, [1, 2, 3], "every reply, then the end of the stream");
}
