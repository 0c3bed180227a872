//! The smbl/nfsl line client (`shimline::client::LineClient`) against a
//! real smbshim that stops: every call ends within its timeout, also when
//! the server stops reading its requests (review sG of the leader/follower
//! client).

use std::time::{Duration, Instant};

use rkfilter_tests::{Filterd, Scratch, Shim};
use serde_json::json;

/// Old code: a request was written with a blocking write and no limit, so
/// once smbshim (SIGSTOPped) no longer took bytes, the call — and every
/// other call and the client's drop, all behind the writer lock — hung
/// forever whatever the timeout; the timeout covered only the wait for the
/// reply.
#[test]
fn a_call_to_a_server_that_stops_reading_ends_within_its_timeout() {
    let s = Scratch::new("line-client-stalled-server");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("smbshim", &s.socket(), "line-client-stalled-server");
    let c = smbl::Client::connect(&shim.addr).expect("connect to smbshim");
    c.set_timeout(Duration::from_secs(2));
    c.echo().expect("smbshim answers before it stops");
    shim.signal(nix::sys::signal::Signal::SIGSTOP);
    // 3 MiB requests: the first few fill the socket buffers (and time out
    // waiting for their replies), then a write makes no progress.
    let pad = "p".repeat(3 << 20);
    let (done_tx, done) = crossbeam_channel::unbounded();
    let caller = std::thread::spawn(move || {
        for _ in 0..12 {
            let t0 = Instant::now();
            let r = c.call(json!({"cmd": "ECHO", "pad": pad}));
            let _ = done_tx.send((t0.elapsed(), r.is_err()));
        }
        drop(c);
    });
    for i in 0..12 {
        let (took, failed) = done
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                shim.signal(nix::sys::signal::Signal::SIGCONT);
                panic!("call {i} to a stopped server still runs after 30 s (its timeout is 2 s)")
            });
        assert!(failed, "call {i} to a stopped server succeeded");
        assert!(
            took < Duration::from_secs(20),
            "call {i} took {took:?} with a 2 s timeout"
        );
    }
    caller.join().expect("caller thread");
    shim.signal(nix::sys::signal::Signal::SIGCONT);
}

/// A fake smbl/1 server that answers every request line with `reply`
/// (`{mid}` replaced by the request's mid); its address.
fn fake_server(reply: &'static [u8]) -> String {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().expect("clone"));
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let req: serde_json::Value = serde_json::from_str(&line).expect("a request");
                    let mid = req["mid"].to_string();
                    let mut out = Vec::new();
                    for (i, part) in reply.split(|b| *b == b'#').enumerate() {
                        if i > 0 {
                            out.extend_from_slice(mid.as_bytes());
                        }
                        out.extend_from_slice(part);
                    }
                    if c.write_all(&out).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

/// Old code: the router skipped the fields it does not route by (all but
/// the id and `status`) without checking their strings, so a reply line
/// with bad UTF-8 or a lone surrogate escape in such a field reached
/// smbl's typed `create_outcome` as a success, while `create` (a `Value`
/// caller) was told the line was bad and the connection ended: the two
/// disagreed on what the server said. Now both refuse the line.
#[test]
fn typed_and_value_callers_refuse_the_same_bad_reply_lines() {
    let lines: [&'static [u8]; 2] = [
        b"{\"mid\":#,\"status\":\"STATUS_SUCCESS\",\"file_id\":\"F1\",\"junk\":\"\xff\xfe\"}\n",
        b"{\"mid\":#,\"status\":\"STATUS_SUCCESS\",\"file_id\":\"F1\",\"junk\":[\"\\ud800\"]}\n",
    ];
    for line in lines {
        let addr = fake_server(line);
        let shown = String::from_utf8_lossy(line);
        let args = smbl::CreateArgs::new(1, "x");
        let c = smbl::Client::connect(&addr).expect("connect");
        c.set_timeout(Duration::from_secs(10));
        let value = c.create(&args);
        assert!(value.is_err(), "{shown}: a Value caller took {value:?}");
        let c = smbl::Client::connect(&addr).expect("connect");
        c.set_timeout(Duration::from_secs(10));
        let typed = c.create_outcome(&args);
        assert!(typed.is_err(), "{shown}: a typed caller took {typed:?}");
    }
    // A good line is a reply to both.
    let addr = fake_server(
        b"{\"mid\":#,\"status\":\"STATUS_SUCCESS\",\"file_id\":\"F\\u0031\",\"x\":{\"mid\":0}}\n",
    );
    let c = smbl::Client::connect(&addr).expect("connect");
    let args = smbl::CreateArgs::new(1, "x");
    let typed = c.create_outcome(&args).expect("typed");
    assert_eq!(typed.file_id(), Some("F1"));
    let value = c.create(&args).expect("value").into_value();
    assert_eq!(value["file_id"], "F1");
}
