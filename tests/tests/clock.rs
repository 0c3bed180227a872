//! Wall-clock steps change nothing filterd times (its timers run on the
//! monotonic clock): filterd runs under libfaketime (Debian `faketime`,
//! installed by `.ci/run`), and the test steps its wall clock.

use std::path::{Path, PathBuf};
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::model::*;
use libfilter::proto::OpenRequest;
use rkfilter_tests::{plain_open, Filterd, Scratch};

fn libfaketime() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libfaketime is not installed: `apt-get install faketime` (.ci/run installs it)")
}

/// filterd whose wall clock is `+0` until the test writes another offset
/// into `clock`.
fn start_with_clock(s: &Scratch, clock: &Path, extra: &[&str]) -> Filterd {
    std::fs::write(clock, "+0").unwrap();
    let lib = libfaketime();
    Filterd::start(
        s,
        extra,
        &[
            ("LD_PRELOAD", lib.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", clock.to_str().unwrap()),
            ("FAKETIME_NO_CACHE", "1"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    )
}

fn req(
    path: &str,
    client: &str,
    durability: Durability,
    lease: Option<(LeaseKey, &str)>,
) -> OpenRequest {
    OpenRequest {
        access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        disposition: Disposition::OpenIf,
        durability,
        create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
        lease: lease.map(|(key, st)| LeaseRequest {
            key,
            state: LeaseState::parse(st).unwrap(),
            epoch: 0,
        }),
        ..plain_open(client, path)
    }
}

/// The wall clock jumps two hours forward: a disconnected handle with five
/// minutes to go does not expire.
#[test]
fn a_clock_step_forward_expires_nothing() {
    let s = Scratch::new("clock-fwd");
    let clock = s.dir.join("clock");
    let d = start_with_clock(&s, &clock, &[]);
    {
        let fe = FilterClient::connect_frontend(
            &s.socket(),
            Protocol::new("smb").unwrap(),
            InstanceName::new("smb-c").unwrap(),
        )
        .unwrap();
        fe.open(req(
            "f",
            "alice",
            Durability::Persistent {
                timeout_ms: 300_000,
            },
            None,
        ))
        .unwrap();
    } // the frontend goes: the handle is disconnected with 300 s to go
    let ctl = d.control();
    rkfilter_tests::wait_for(
        "the handle to be disconnected",
        Duration::from_secs(5),
        || {
            let hs = ctl.handles().ok()?;
            matches!(hs.first()?.record.conn, ConnState::Disconnected { .. }).then_some(())
        },
    );
    std::fs::write(&clock, "+2h").unwrap();
    // The engine wakes at least every second; old timers expired at once.
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        assert_eq!(ctl.handles().unwrap().len(), 1, "expired by a clock step");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The wall clock jumps an hour back during a lease break: the waiting
/// open is still answered once the break timeout passes.
#[test]
fn a_clock_step_back_stalls_no_break() {
    let s = Scratch::new("clock-back");
    let clock = s.dir.join("clock");
    let _d = start_with_clock(&s, &clock, &["--break-timeout-ms", "1000"]);
    let holder = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-h").unwrap(),
    )
    .unwrap();
    let k = LeaseKey(uuid::Uuid::new_v4());
    holder
        .open(req("doc", "alice", Durability::None, Some((k, "RWH"))))
        .unwrap();
    let other = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-o").unwrap(),
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // A writer breaks the holder's W; the holder never acknowledges.
        let r = req("doc", "bob", Durability::None, None);
        let _ = tx.send(other.open(r).map(|_| ()));
    });
    // The break is under way: step the clock back.
    let ev = holder.events().recv_timeout(Duration::from_secs(5));
    assert!(ev.is_ok(), "the holder is asked to break");
    std::fs::write(&clock, "-1h").unwrap();
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiting open is answered after the break timeout");
    assert!(r.is_ok(), "{r:?}");
}

/// A wall clock before 1970 (libfaketime sets it): opens still get keys
/// and succeed (uuid's `now_v7` panics there; filterd's time-ordered keys
/// fall back to random ones — review of session 25), and the daemon keeps
/// serving.
#[test]
fn a_wall_clock_before_1970_still_opens() {
    let s = Scratch::new("clock-1969");
    let clock = s.dir.join("clock");
    let d = start_with_clock(&s, &clock, &[]);
    std::fs::write(&clock, "@1969-12-01 00:00:00").unwrap();
    let fe = FilterClient::connect_frontend_with(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-c").unwrap(),
        libfilter::proto::FEATURE_TIME_ORDERED_KEYS,
    )
    .unwrap();
    for (i, dur) in [
        Durability::None,
        Durability::Persistent { timeout_ms: 60_000 },
    ]
    .into_iter()
    .enumerate()
    {
        let h = fe.open(req(&format!("f{i}"), "alice", dur, None)).unwrap();
        fe.close(h.info.key).unwrap();
    }
    assert!(d.control().handles().is_ok(), "filterd still serves");
}
