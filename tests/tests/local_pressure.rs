//! Local access under pressure (root only: a tmpfs export with fanotify):
//! the fanotify reader never waits on the engine, an open filterd cannot
//! decide in time is refused — never let through past a share mode — and
//! mediation survives running out of descriptors.

use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::OpenRequest;
use rkfilter_tests::{wait_for, Filterd, Scratch};

fn frontend(s: &Scratch) -> FilterClient {
    FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-1").unwrap(),
    )
    .unwrap()
}

fn req(path: &str, share: Rights) -> OpenRequest {
    OpenRequest {
        client: ClientId::new("alice").unwrap(),
        path: RelPath::new(path).unwrap(),
        access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        share,
        disposition: Disposition::OpenIf,
        durability: Durability::None,
        create_guid: None,
        owner: None,
        lease: None,
        no_wait: false,
        share_group: None,
    }
}

/// Waits until the engine thread stalls at its armed failpoint.
fn wait_stalled(d: &Filterd) {
    wait_for("the engine to stall", Duration::from_secs(10), || {
        d.log_text()
            .contains("failpoint engine.request: stalling")
            .then_some(())
    });
}

/// The watchdog answers an undecided local open by refusing it: a file held
/// with share none is never opened because filterd was slow to decide.
#[test]
fn an_undecided_local_open_is_refused_never_allowed() {
    let Some(s) = Scratch::with_tmpfs("fan-watchdog") else {
        return;
    };
    // Requests: 1 the open; 2 (a status) stalls the engine for 6 s, past
    // the watchdog's bound (break timeout + 2 s = 2.5 s).
    let d = Filterd::start_mediated_with(
        &s,
        &["--break-timeout-ms", "500"],
        &[("RKFILTER_FAILPOINTS", "engine.request:2:sleep6000")],
    );
    let fe = frontend(&s);
    let _h = fe.open(req("locked", Rights::NONE)).unwrap();
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    std::thread::spawn(move || {
        let _ = ctl.stats();
    });
    wait_stalled(&d);
    let r = std::fs::read(s.root().join("locked"));
    assert!(
        r.is_err(),
        "a share-none file was opened by the watchdog: {r:?}"
    );
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let st = ctl.stats().unwrap();
    assert!(st.local_opens_watchdog >= 1, "{st:?}");
}

/// The engine stalls while thousands of local opens queue (more than its
/// command queue holds) and a protocol open waits behind them: the engine's
/// own open of a file on the marked mount must not wait on its own group.
/// Before, the reader blocked on the full queue, the engine on its own
/// open: filterd hung for good.
#[test]
fn the_fanotify_reader_never_waits_on_the_engine() {
    let Some(s) = Scratch::with_tmpfs("fan-flood") else {
        return;
    };
    // A small engine queue, so a few hundred openers overflow it (with
    // thousands the kernel's wake-ups of every waiting opener per answer
    // make the test slow; the defect is the same).
    let d = Filterd::start_mediated_with(
        &s,
        &["--break-timeout-ms", "20000", "--command-queue", "64"],
        &[("RKFILTER_FAILPOINTS", "engine.request:2:sleep3000")],
    );
    let fe = std::sync::Arc::new(frontend(&s));
    let _h = fe.open(req("held", Rights::NONE)).unwrap();
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    std::thread::spawn(move || {
        let _ = ctl.stats();
    });
    wait_stalled(&d);
    // 600 local openers of the held file (ten times what the engine queue
    // holds).
    let (tx, rx) = mpsc::channel();
    for _ in 0..600 {
        let (tx, p) = (tx.clone(), s.root().join("held"));
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let _ = tx.send(std::fs::File::open(p).is_ok());
            })
            .unwrap();
    }
    // And a protocol open that the engine will perform on the marked mount.
    let (otx, orx) = mpsc::channel();
    {
        let fe = fe.clone();
        std::thread::spawn(move || {
            let _ = otx.send(fe.open(req("other", Rights::ALL)).is_ok());
        });
    }
    let t0 = std::time::Instant::now();
    assert_eq!(
        orx.recv_timeout(Duration::from_secs(30)),
        Ok(true),
        "the protocol open completes"
    );
    eprintln!("protocol open after {:?}", t0.elapsed());
    let mut opened = 0;
    for _ in 0..600 {
        opened += usize::from(
            rx.recv_timeout(Duration::from_secs(30))
                .expect("every local open is answered"),
        );
    }
    eprintln!("local opens answered after {:?}", t0.elapsed());
    assert_eq!(opened, 0, "no local open of a share-none file got through");
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let st = ctl.stats().unwrap();
    assert!(
        st.local_opens_overloaded > 0 || st.local_opens_denied > 0,
        "{st:?}"
    );
}

/// filterd out of descriptors: reading the fanotify group fails (EMFILE:
/// the kernel cannot make the event's descriptor, and refuses that open).
/// Mediation must not stop while the mark stays: the local open is
/// answered, not left hanging, and once descriptors are free again local
/// opens are decided again (before, the reader thread returned and every
/// local open of the export hung).
#[test]
fn mediation_survives_running_out_of_descriptors() {
    let Some(s) = Scratch::with_tmpfs("fan-emfile") else {
        return;
    };
    std::fs::write(s.root().join("plain"), b"x").unwrap();
    let d = Filterd::start_mediated(&s, &[]);
    // Lower filterd's descriptor limit under it, then take the rest with
    // non-durable opens (each holds a descriptor in filterd).
    let pid = d.pid().to_string();
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=120:120"])
        .status()
        .expect("prlimit (util-linux)");
    assert!(st.success());
    let fe = frontend(&s);
    let mut held = Vec::new();
    for i in 0..200 {
        match fe.open(req(&format!("f{i}"), Rights::ALL)) {
            Ok(h) => held.push(h),
            Err(_) => break,
        }
    }
    assert!(held.len() < 200, "the limit was reached");
    // A local open now makes the reader's read fail: answered all the same
    // (the kernel refuses an open whose event it cannot give a descriptor;
    // the reader goes on reading).
    let p = s.root().join("plain");
    let ino = std::fs::metadata(&p).unwrap().ino();
    let local_open = |p: std::path::PathBuf| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(std::fs::File::open(p).map(|f| f.metadata().map(|m| m.ino())));
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the local open is answered")
    };
    // Linux 6.18 refuses it (EPERM): the kernel denies a permission event
    // whose descriptor it could not make.
    let _refused = local_open(p.clone());
    // Free descriptors: close everything.
    for h in held.drain(..) {
        let _ = fe.close(h.info.key);
    }
    let r = local_open(p);
    assert_eq!(r.unwrap().unwrap(), ino);
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let st = ctl.stats().unwrap();
    assert!(st.fanotify_read_errors > 0, "{st:?}");
}
