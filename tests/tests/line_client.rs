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
