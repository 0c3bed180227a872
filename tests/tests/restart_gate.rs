//! Attacks on the open gate after a filterd restart
//! (`filterd/src/engine/restart_gate.rs`): opens of existing files wait
//! until each frontend process seen before the restart that is still
//! alive has resynced (told its clients of the leases the restart forgot).
//! Real processes: filterd, smbshim as the frontend seen before the
//! restart, and in-process frontends of this test (another process).

use std::time::{Duration, Instant};

use libfilter::client::FilterClient;
use libfilter::model::{InstanceName, Protocol};
use libfilter::proto::{ErrorCode, OpenRequest, FEATURES};
use nix::sys::signal::Signal;
use rkfilter_tests::{plain_open, wait_for, Filterd, Scratch, Shim};

/// filterd's break timeout here: the gate's deadline (long, so that a
/// resync, not the deadline, is what lets an open in).
const BREAK_MS: &str = "15000";

/// A frontend of this test process attached as `instance` (asking for
/// every feature, `Resynced` included).
fn frontend(d: &Filterd, instance: &str) -> FilterClient {
    FilterClient::connect_frontend_with(
        d.socket(),
        Protocol::new("smb").expect("protocol"),
        InstanceName::new(instance).expect("instance"),
        FEATURES,
    )
    .unwrap_or_else(|e| panic!("{instance} attaches: {e}"))
}

/// Sends `Resynced` on `c` and waits until filterd has run it: `Resynced`
/// is one way, and filterd runs a connection's requests in order, so the
/// answer to an open sent after it says it was.
fn resync(c: &FilterClient) {
    c.resynced();
    let r = c.open(plain_open("mallory", "no-such-file"));
    assert!(r.is_err(), "an open of a missing file");
}

/// A `no_wait` open of the existing file `f` for reading and writing,
/// sharing nothing: `Busy` while the gate is closed.
fn open_f_now(c: &FilterClient) -> Result<(), Option<ErrorCode>> {
    let req = OpenRequest {
        no_wait: true,
        access: libfilter::model::Access::new(
            libfilter::model::Rights::READ.union(libfilter::model::Rights::WRITE),
        )
        .expect("access"),
        share: libfilter::model::Rights::NONE,
        ..plain_open("bob", "f")
    };
    c.open(req).map(drop).map_err(|e| e.code())
}

/// Another process taking the name of a frontend seen before the restart
/// — a hostile peer of the same uid, or a replacement started while the
/// old process still runs — says nothing of the old process's clients and
/// their leases: its `Resynced` does not open the gate, however often it
/// attaches. The old process's own resync does, at once.
///
/// Before review aV its hello recorded its pid in `frontends.seen` over
/// the old one's, after which its `Resynced` counted as the old process's:
/// the open below was granted while smbshim (stopped) had told its
/// clients nothing, and smbshim's own resync was then ignored (the
/// impostor "alive under the name") until the break timeout.
#[test]
fn a_process_taking_a_frontends_name_does_not_resync_for_it() {
    let s = Scratch::new("gate-impostor");
    std::fs::write(s.root().join("f"), b"0123456789").expect("write f");
    let mut d = Filterd::start(&s, &["--break-timeout-ms", BREAK_MS], &[]);
    let real = Shim::start("smbshim", &s.socket(), "smb-real");
    let seen = s.state().join("frontends.seen");
    wait_for(
        "smbshim to be recorded in frontends.seen",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&seen)
                .ok()
                .filter(|t| t.contains(&format!("smb-real {} ", real.pid())))
        },
    );
    real.signal(Signal::SIGSTOP);
    d.kill9();
    let d = Filterd::start(&s, &["--break-timeout-ms", BREAK_MS], &[]);
    let other = frontend(&d, "smb-other");
    resync(&other);
    let held = |why: &str| assert_eq!(open_f_now(&other), Err(Some(ErrorCode::Busy)), "{why}");
    held("held for smbshim, stopped");
    // The impostor attaches under smbshim's name and resyncs, twice.
    for _ in 0..2 {
        let impostor = frontend(&d, "smb-real");
        resync(&impostor);
        held("another process's Resynced opened the gate for smbshim's clients");
        drop(impostor);
        wait_for(
            "filterd to see the impostor go",
            Duration::from_secs(10),
            || {
                let st = d.control().stats().expect("stats");
                (st.frontends_lost + 1 >= st.frontends_attached).then_some(())
            },
        );
    }
    // smbshim itself reattaches and resyncs: the gate opens.
    real.signal(Signal::SIGCONT);
    let thawed = Instant::now();
    wait_for(
        "the open to be granted after smbshim resynced",
        Duration::from_secs(30),
        || open_f_now(&other).ok(),
    );
    let after = thawed.elapsed();
    assert!(
        after < Duration::from_secs(10),
        "granted {after:?} after smbshim was thawed: at the break timeout, not at its resync"
    );
    eprintln!("granted {after:?} after smbshim was thawed");
}
