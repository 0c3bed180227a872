//! Local access under pressure (root only: a tmpfs export with fanotify):
//! the fanotify reader never waits on the engine, an open filterd cannot
//! decide in time is refused — never let through past a share mode —,
//! mediation survives running out of descriptors, protocol opens keep a
//! descriptor reserve for it (resumes too), a resume out of descriptors
//! keeps its handle, and once the engine stops every local open is
//! refused at once.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::OpenRequest;
use rkfilter_tests::{plain_open, wait_for, Filterd, Scratch};

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
        access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        share,
        disposition: Disposition::OpenIf,
        ..plain_open("alice", path)
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

/// A local open in another thread: its outcome, or a panic if it is not
/// answered within 20 s.
fn local_open(p: std::path::PathBuf) -> std::io::Result<u64> {
    local_open_in_background(p)
        .recv_timeout(Duration::from_secs(20))
        .expect("the local open is answered")
}

/// The descriptor limit that leaves process `pid` exactly `free`
/// descriptors it can open (from its `/proc/PID/fd`): the number of its
/// `free`-th unused descriptor (counting from 0), so with 0 it can open
/// nothing. Not the lowest free number plus `free`: the process's table
/// has holes (descriptors closed below others still open; a restarted
/// filterd had 21 free below 22), and a limit past a hole leaves fewer
/// free than that — CI once saw a resume that should have found 4
/// descriptors free (and been refused for eating into the reserve) find
/// none.
fn fd_limit_leaving(pid: u32, free: usize) -> u32 {
    let used: std::collections::BTreeSet<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).filter(|n| !used.contains(n)).nth(free).unwrap()
}

/// Sets process `pid`'s soft descriptor limit (its hard limit stays).
fn set_fd_limit(pid: u32, n: u32) {
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
        .status()
        .expect("prlimit (util-linux)");
    assert!(st.success());
}

/// filterd out of descriptors (its limit lowered to what it holds): the
/// kernel could not make a fanotify event's descriptor, and would refuse
/// that open (EMFILE), so filterd leaves the event queued in the kernel:
/// the local open waits, and is decided (allowed) once a descriptor is
/// free again — and a share-none file is still refused. Only past the
/// verdict deadline (break timeout + 2 s) with no descriptor free is an
/// open refused, counted as a watchdog answer. Before, the reader read the
/// event anyway and the kernel refused the open at once (with one
/// descriptor free, the reader's duplicate of it failed and the reader
/// refused it).
#[test]
fn a_local_open_waits_for_a_free_descriptor_instead_of_being_refused() {
    let Some(s) = Scratch::with_tmpfs("fan-emfile") else {
        return;
    };
    std::fs::write(s.root().join("plain"), b"x").unwrap();
    std::fs::write(s.root().join("other"), b"x").unwrap();
    // Verdict deadline: 3 s + 2 s.
    let d = Filterd::start_mediated(&s, &["--break-timeout-ms", "3000"]);
    let fe = frontend(&s);
    let _held = fe.open(req("held", Rights::NONE)).unwrap();
    let p = s.root().join("plain");
    let ino = std::fs::metadata(&p).unwrap().ino();
    // No descriptor left at all.
    set_fd_limit(d.pid(), fd_limit_leaving(d.pid(), 0));
    let waiting = local_open_in_background(p);
    wait_for(
        "filterd to wait for a descriptor",
        Duration::from_secs(20),
        || {
            if let Ok(r) = waiting.try_recv() {
                panic!("the local open was answered with no descriptor free: {r:?}");
            }
            d.log_text()
                .contains("no descriptor free to read a fanotify event with")
                .then_some(())
        },
    );
    set_fd_limit(d.pid(), 4096);
    let opened = waiting
        .recv_timeout(Duration::from_secs(20))
        .expect("the local open is answered once descriptors are free");
    assert_eq!(opened.unwrap(), ino, "the waiting local open is allowed");
    assert!(
        local_open(s.root().join("held")).is_err(),
        "a share-none file is mediated as before"
    );
    // Starved past the verdict deadline: refused, as any undecided open —
    // every open queued meanwhile too, within about one deadline, not the
    // k-th after k deadlines (review, session 29).
    set_fd_limit(d.pid(), fd_limit_leaving(d.pid(), 0));
    let t0 = std::time::Instant::now();
    let queued: Vec<_> = (0..3)
        .map(|_| local_open_in_background(s.root().join("other")))
        .collect();
    for q in queued {
        let late = q
            .recv_timeout(Duration::from_secs(30))
            .expect("an answer within 30 s");
        assert_eq!(
            late.as_ref().map_err(std::io::Error::raw_os_error),
            Err(Some(libc::EPERM)),
            "{late:?}"
        );
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(4), "{took:?}");
    assert!(
        took < Duration::from_secs(9),
        "one deadline (5 s) for all: {took:?}"
    );
    // Still starved, but after a quiet moment (nothing queued, so no
    // starvation went on): the next open waits a deadline of its own.
    std::thread::sleep(Duration::from_millis(300));
    let t1 = std::time::Instant::now();
    let later = local_open(s.root().join("other"));
    assert!(later.is_err(), "{later:?}");
    assert!(
        t1.elapsed() >= Duration::from_secs(4),
        "refused at once after a quiet moment: {:?}",
        t1.elapsed()
    );
    set_fd_limit(d.pid(), 4096);
    let st = d.control().stats().unwrap();
    assert!(st.fanotify_waits_for_descriptors >= 2, "{st:?}");
    assert!(st.local_opens_watchdog >= 1, "{st:?}");
    assert_eq!(st.local_opens_overloaded, 0, "{st:?}");
}

/// A local open in another thread; its outcome arrives on the receiver.
fn local_open_in_background(p: std::path::PathBuf) -> mpsc::Receiver<std::io::Result<u64>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::File::open(p).and_then(|f| f.metadata().map(|m| m.ino())));
    });
    rx
}

/// Protocol opens stop short of filterd's descriptor limit, keeping a
/// reserve for reading fanotify events: the open that would eat into it is
/// refused with a clear error and counted, and local opens go on being
/// decided by share modes. Before, protocol opens took every descriptor:
/// the kernel then refused every local open of the export (a file without
/// state included), and a protocol open failed with a bare EMFILE.
#[test]
fn protocol_opens_leave_a_descriptor_reserve_for_local_opens() {
    let Some(s) = Scratch::with_tmpfs("fan-fd-reserve") else {
        return;
    };
    std::fs::write(s.root().join("plain"), b"x").unwrap();
    let d = Filterd::start_mediated(&s, &[]);
    let fe = frontend(&s);
    let _held = fe.open(req("held", Rights::NONE)).unwrap();
    set_fd_limit(d.pid(), 160);
    let mut handles = Vec::new();
    let refused = (0..300).find_map(|i| match fe.open(req(&format!("f{i}"), Rights::ALL)) {
        Ok(h) => {
            handles.push(h);
            None
        }
        Err(e) => Some(e),
    });
    let e = refused.expect("an open is refused before 300");
    eprintln!("{} opens granted; then: {e}", handles.len());
    assert!(
        matches!(&e, libfilter::client::ClientError::Refused(w)
            if w.code == libfilter::proto::ErrorCode::LimitReached
                && w.message.contains("descriptors")),
        "{e:?}"
    );
    // Local opens are still decided: the share-none file refused by its
    // share mode, a file without state opened.
    let plain = local_open(s.root().join("plain"));
    assert!(plain.is_ok(), "a file without state opens: {plain:?}");
    let held = local_open(s.root().join("held"));
    assert!(held.is_err(), "{held:?}");
    let st = d.control().stats().unwrap();
    assert!(st.opens_refused_descriptors >= 1, "{st:?}");
    assert!(st.local_opens_denied >= 1, "{st:?}");
    assert_eq!(st.fanotify_read_errors, 0, "{st:?}");
}

/// Once the engine has stopped (filterd shutting down), the fanotify
/// reader refuses every further local open at once: never allowed past a
/// share mode, never left waiting for a verdict nobody gives. Before, the
/// first such event was answered ALLOW (the guard's default, dropped when
/// the reader returned) and every later one hung until the process exited.
#[test]
fn after_the_engine_stops_every_local_open_is_refused_at_once() {
    let Some(s) = Scratch::with_tmpfs("fan-stopped") else {
        return;
    };
    std::fs::write(s.root().join("plain"), b"x").unwrap();
    // Stopping stalls 40 s once the engine thread has returned: far longer
    // than the answers below may take.
    let mut d = Filterd::start_mediated_with(
        &s,
        &[],
        &[("RKFILTER_FAILPOINTS", "shutdown.after_engine:sleep40000")],
    );
    let fe = frontend(&s);
    let _h = fe.open(req("locked", Rights::NONE)).unwrap();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_log(
        "failpoint shutdown.after_engine: stalling",
        Duration::from_secs(20),
    );
    for name in ["locked", "plain", "locked"] {
        let r = local_open(s.root().join(name));
        assert_eq!(
            r.as_ref().map_err(std::io::Error::raw_os_error),
            Err(Some(libc::EPERM)),
            "{name}: {r:?}"
        );
    }
    d.kill9();
}

/// Opens each of `paths` from its own thread, all released at once:
/// how many were refused, with their errors.
fn burst_of_local_opens(paths: Vec<std::path::PathBuf>) -> Vec<std::io::Error> {
    let gate = std::sync::Arc::new(std::sync::Barrier::new(paths.len()));
    let (tx, rx) = mpsc::channel();
    let n = paths.len();
    for p in paths {
        let (tx, gate) = (tx.clone(), gate.clone());
        std::thread::spawn(move || {
            gate.wait();
            let _ = tx.send(std::fs::File::open(p).map(drop));
        });
    }
    (0..n)
        .filter_map(|_| {
            rx.recv_timeout(Duration::from_secs(30))
                .expect("every local open is answered")
                .err()
        })
        .collect()
}

/// A burst of parallel local opens of files without protocol state while
/// the engine is busy (stalled 3 s), with filterd's descriptor limit low
/// (each waiting open holds two of its descriptors): every open succeeds
/// — they wait, at worst, for room. Before, the reader read as many events
/// as its buffer held, the kernel could not make their descriptors
/// (EMFILE) and refused those opens.
#[test]
fn a_burst_of_local_opens_of_files_without_state_is_never_refused() {
    let Some(s) = Scratch::with_tmpfs("fan-burst") else {
        return;
    };
    // Made before filterd starts: their first opens reach it.
    let rounds: Vec<Vec<_>> = (0..3)
        .map(|round| {
            (0..60)
                .map(|i| {
                    let p = s.root().join(format!("r{round}-{i}"));
                    std::fs::write(&p, b"x").unwrap();
                    p
                })
                .collect()
        })
        .collect();
    // Requests: 1 the open; 2 (a status) stalls the engine for 3 s.
    let d = Filterd::start_mediated_with(
        &s,
        &[],
        &[("RKFILTER_FAILPOINTS", "engine.request:2:sleep3000")],
    );
    let fe = frontend(&s);
    let _held = fe.open(req("held", Rights::NONE)).unwrap();
    // Room for about twenty waiting opens beyond what filterd holds.
    set_fd_limit(d.pid(), fd_limit_leaving(d.pid(), 40));
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    std::thread::spawn(move || {
        let _ = ctl.stats();
    });
    wait_stalled(&d);
    for (round, paths) in rounds.into_iter().enumerate() {
        let refused = burst_of_local_opens(paths);
        assert!(
            refused.is_empty(),
            "round {round}: {} of 60 opens of files without state refused: {:?}; {:?}",
            refused.len(),
            refused.first(),
            d.control().stats()
        );
    }
    assert!(
        local_open(s.root().join("held")).is_err(),
        "a share-none file is still refused"
    );
    let st = d.control().stats().unwrap();
    assert_eq!(st.local_opens_overloaded, 0, "{st:?}");
}

/// A local open racing filterd's write-lease probe (a protocol open of a
/// file filterd holds no descriptor of) waits for the probe, never refused:
/// the probe's lease is held 2 s (failpoint `local.probe`) while a local
/// process opens the file. Before, the reader read the event meanwhile, the
/// kernel's non-blocking open of its descriptor met the probe's lease, and
/// the kernel refused the local open (`EPERM`).
#[test]
fn a_local_open_racing_the_lease_probe_is_not_refused() {
    let Some(s) = Scratch::with_tmpfs("fan-probe") else {
        return;
    };
    std::fs::write(s.root().join("shared"), b"x").unwrap();
    let d =
        Filterd::start_mediated_with(&s, &[], &[("RKFILTER_FAILPOINTS", "local.probe:sleep2000")]);
    let fe = std::sync::Arc::new(frontend(&s));
    let (otx, orx) = mpsc::channel();
    {
        let fe = fe.clone();
        std::thread::spawn(move || {
            let _ = otx.send(fe.open(req("shared", Rights::ALL)).map(drop));
        });
    }
    d.wait_log("failpoint local.probe: stalling", Duration::from_secs(20));
    let local = local_open(s.root().join("shared"));
    let protocol = orx
        .recv_timeout(Duration::from_secs(20))
        .expect("the protocol open is answered");
    assert!(protocol.is_ok(), "{protocol:?}");
    assert!(
        local.is_ok(),
        "a local open racing the probe was refused: {local:?}"
    );
    let st = d.control().stats().unwrap();
    assert_eq!(st.local_opens_lease_refused, 0, "{st:?}");
}

/// Review xB (round 12): the first answer to a local open, written with a
/// single descriptor free (the event's), could not make the placeholder
/// that lets go of the event's file before the answer (a pipe: two
/// descriptors), and filterd kept that failure for the rest of its run:
/// every later answer let its opener go on with the file still open in
/// filterd, and a protocol open sharing nothing, made right after, was
/// refused as if a local process held the file (`local.rs`
/// `a_protocol_open_right_after_a_local_open_closed_is_not_refused`, which
/// 142 of 300 local opens returned with filterd's descriptor still open;
/// the write-lease rule its probe uses sees that at once, and one CPU
/// makes the preemption the rule).
#[test]
fn a_starved_first_answer_does_not_leave_later_local_files_open() {
    let Some(s) = Scratch::with_tmpfs("fan-placeholder") else {
        return;
    };
    // This thread, and filterd it spawns, on CPU 0.
    rkfilter_tests::pin_to_cpu0();
    let p = s.root().join("first");
    std::fs::write(&p, b"x").unwrap();
    let d = Filterd::start_mediated(&s, &[]);
    // One descriptor free: the first local open's event takes it.
    // The reader counts descriptors by number open (see `free_descriptors`):
    // two free by count, one read; a pipe then needs two.
    let open = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    set_fd_limit(d.pid(), u32::try_from(open).unwrap() + 2);
    let ino = std::fs::metadata(&p).unwrap().ino();
    assert_eq!(local_open(p).unwrap(), ino, "the local open is allowed");
    set_fd_limit(d.pid(), 4096);
    // Each local open, once it returns, is the file's only open: filterd
    // let go of the event's file before answering (the write-lease rule,
    // as filterd's own probe for a protocol open).
    let mut held = 0;
    for i in 0..300 {
        let f = std::fs::File::create(s.root().join(format!("f{i}.txt"))).unwrap();
        if !libfilter::sys::alone_on_inode(f.as_fd()).unwrap() {
            held += 1;
        }
    }
    assert_eq!(
        held, 0,
        "{held} of 300 local opens let go on with filterd's descriptor of the file open"
    );
}

/// The code `r` was refused with.
fn refusal<T: std::fmt::Debug>(
    r: Result<T, libfilter::client::ClientError>,
) -> libfilter::proto::WireError {
    match r {
        Err(libfilter::client::ClientError::Refused(w)) => w,
        other => panic!("not refused: {other:?}"),
    }
}

/// Review rvx: a recovered persistent handle takes its descriptor when it
/// is resumed. filterd out of descriptors then (its limit lowered to what
/// it holds) refuses the resume with `LimitReached` — a retry, not "no
/// such handle" — and so it does when the reopened descriptor would eat
/// into the reserve kept for reading local opens; the handle stays
/// disconnected, its share mode keeps another client's writer out
/// throughout, and once the limit is raised the same resume succeeds.
/// Before, the reopen's EMFILE lost the handle for good (recorded lost,
/// its locks and share mode gone: the writer got in), and a resume took
/// the reserve's last descriptors.
#[test]
fn a_resume_out_of_descriptors_is_refused_and_keeps_the_handle() {
    let Some(s) = Scratch::with_tmpfs("fan-resume-emfile") else {
        return;
    };
    std::fs::write(s.root().join("f"), b"x").unwrap();
    let mut d = Filterd::start_mediated(&s, &[]);
    let fe = frontend(&s);
    let alice = ClientId::new("alice").unwrap();
    // Alice's persistent open denies writers.
    let held = fe
        .open(OpenRequest {
            share: Rights::READ,
            durability: Durability::Persistent {
                timeout_ms: 600_000,
            },
            ..plain_open("alice", "f")
        })
        .unwrap();
    let key = held.info.key;
    drop(held);
    d.kill9();
    drop(fe);
    let d = Filterd::start_mediated(&s, &[]);
    let fe = frontend(&s);
    let writer = || {
        fe.open(OpenRequest {
            access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
            ..plain_open("bob", "f")
        })
    };
    let kept = |what: &str| {
        let hs = d.control().handles().unwrap();
        let h = hs
            .iter()
            .find(|h| h.record.key == key)
            .unwrap_or_else(|| panic!("{what}: the handle is gone"));
        assert!(
            matches!(h.record.conn, ConnState::Disconnected { .. }),
            "{what}: {:?}",
            h.record.conn
        );
    };
    assert_eq!(
        refusal(writer()).code,
        libfilter::proto::ErrorCode::FileNotAvailable
    );
    // No descriptor free: the reopen fails EMFILE.
    set_fd_limit(d.pid(), fd_limit_leaving(d.pid(), 0));
    let e = refusal(fe.resume(alice.clone(), key));
    assert_eq!(e.code, libfilter::proto::ErrorCode::LimitReached, "{e:?}");
    // A few free, fewer than the reserve: the reopened descriptor is
    // given back.
    set_fd_limit(d.pid(), fd_limit_leaving(d.pid(), 4));
    let e = refusal(fe.resume(alice.clone(), key));
    assert_eq!(e.code, libfilter::proto::ErrorCode::LimitReached, "{e:?}");
    assert!(e.message.contains("descriptors"), "{e:?}");
    set_fd_limit(d.pid(), 4096);
    kept("after the refused resumes");
    assert_eq!(
        refusal(writer()).code,
        libfilter::proto::ErrorCode::FileNotAvailable,
        "the share mode still holds"
    );
    let back = fe.resume(alice, key).unwrap();
    assert_eq!(back.info.key, key);
    assert_eq!(
        refusal(writer()).code,
        libfilter::proto::ErrorCode::SharingViolation
    );
}

/// Review rvx through smbshim, as found: a RECONNECT of a persistent open
/// after filterd restarted, while filterd is at its descriptor limit, is
/// answered `STATUS_INSUFFICIENT_RESOURCES` (the client may retry), not
/// `STATUS_OBJECT_NAME_NOT_FOUND`; another client's writer is kept out
/// throughout, and once the limit is raised the same RECONNECT succeeds.
#[test]
fn an_smb_reconnect_at_filterds_descriptor_limit_may_be_retried() {
    use rkfilter_tests::{LineClient, Shim};
    use serde_json::json;
    let Some(s) = Scratch::with_tmpfs("fan-reconnect-emfile") else {
        return;
    };
    let mut d = Filterd::start_mediated(&s, &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-a");
    let client_guid = uuid::Uuid::new_v4().to_string();
    let session = |c: &mut LineClient, guid: &str| {
        let r = c.call(json!({"cmd": "SESSION_SETUP", "client_guid": guid, "user": "m"}));
        assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
        r["session_id"].as_u64().unwrap()
    };
    let mut c = LineClient::connect(&shim.addr);
    let sid = session(&mut c, &client_guid);
    // Persistent, sharing read only: writers are denied.
    let r = rkfilter_tests::smb_persistent_create(&mut c, sid, "f");
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    let guid = r["durable"]["create_guid"].clone();
    assert!(guid.is_string(), "{r}");
    shim.kill9();
    drop(c);
    d.kill9();
    let d = Filterd::start_mediated(&s, &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-a");
    let mut bob = LineClient::connect(&shim.addr);
    let bsid = session(&mut bob, &uuid::Uuid::new_v4().to_string());
    let mut writer = || {
        let r = bob.call(json!({"cmd": "CREATE", "session_id": bsid, "path": "f",
            "access": ["read", "write"], "share": ["read", "write", "delete"], "disposition": "open"}));
        r["status"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(writer(), "STATUS_FILE_NOT_AVAILABLE");
    let mut c = LineClient::connect(&shim.addr);
    let sid = session(&mut c, &client_guid);
    let reconnect =
        json!({"cmd": "RECONNECT", "session_id": sid, "file_id": fid, "create_guid": guid});
    set_fd_limit(d.pid(), fd_limit_leaving(d.pid(), 0));
    let r = c.call(reconnect.clone());
    assert_eq!(r["status"], "STATUS_INSUFFICIENT_RESOURCES", "{r}");
    set_fd_limit(d.pid(), 4096);
    assert_eq!(
        writer(),
        "STATUS_FILE_NOT_AVAILABLE",
        "the share mode holds"
    );
    let r = c.call(reconnect);
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert_eq!(writer(), "STATUS_SHARING_VIOLATION");
}

/// nfsshim's restore while filterd is short of descriptors for the reopen
/// (after a filterd restart its handles hold none): a resume refused
/// `LimitReached` — the open's own handle's, then, with room for one
/// reopen only, its upgrade's — is tried again until filterd has room,
/// and the open its client was granted is kept whole: its stateid still
/// reads and writes, another client's writer stays out. Before, nfsshim
/// took every refusal but a cut descriptor for a gone handle: it closed
/// the open's handles and deleted its record (the client's stateid was
/// expired, the writer got in).
#[test]
fn an_nfs_open_restored_while_filterd_is_out_of_descriptors_is_kept() {
    use rkfilter_tests::{LineClient, Nfs, Shim};
    use serde_json::json;
    let Some(s) = Scratch::with_tmpfs("fan-nfs-restore-emfile") else {
        return;
    };
    std::fs::write(s.root().join("f"), b"x").unwrap();
    let mut d = Filterd::start_mediated(&s, &[]);
    let mut shim = Shim::start("nfsshim", &s.socket(), "nfs-a");
    let mut a = Nfs::connect(&shim.addr, "host-a", "00000000000000aa");
    // Read, denying writers; then upgraded to write (a second handle).
    let r = a.open("oa", "f", "read", "write", json!({}));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    let r = a.open("oa", "f", "write", "write", json!({}));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
    let sid = r["stateid"].clone();
    shim.kill9_in_place();
    d.kill9();
    let d = Filterd::start_mediated(&s, &[]);
    let fe = frontend(&s);
    let writer = || {
        fe.open(OpenRequest {
            access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
            ..plain_open("bob", "f")
        })
    };
    assert_eq!(
        refusal(writer()).code,
        libfilter::proto::ErrorCode::FileNotAvailable
    );
    // Room to accept nfsshim's connections, not for a reopen (fewer free
    // than filterd's reserve, 16 at this limit).
    set_fd_limit(d.pid(), fd_limit_leaving(d.pid(), 4));
    let log = s.dir.join("nfsshim.log");
    let starting = {
        let (sock, log) = (s.socket(), log.clone());
        std::thread::spawn(move || Shim::start_logged("nfsshim", &sock, "nfs-a", &[], &log))
    };
    // How many handles nfsshim said it tries the resume of again.
    let refused = || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!t.contains("dropping"), "{t}");
        t.lines()
            .filter(|l| l.contains("refused for now"))
            .filter_map(|l| l.split_whitespace().nth(4))
            .collect::<std::collections::BTreeSet<&str>>()
            .len()
    };
    wait_for(
        "nfsshim to try a resume again",
        Duration::from_secs(30),
        || (refused() >= 1).then_some(()),
    );
    assert!(writer().is_err(), "the share mode holds meanwhile");
    // Room for one reopen: the open's own handle's; its upgrade's waits.
    // filterd counts the descriptors it has open (and a reopen takes one
    // more for a moment): the limit is raised a step at a time until so.
    let open_now = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    let open_now = u32::try_from(open_now).unwrap();
    let upgrade_waits = (16..=24).any(|room| {
        set_fd_limit(d.pid(), open_now + room);
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if refused() >= 2 {
                return true;
            }
            assert!(!starting.is_finished(), "both reopened at {room} free");
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    assert!(upgrade_waits, "the upgrade's resume was tried again");
    set_fd_limit(d.pid(), 4096);
    let shim = starting.join().expect("nfsshim starts");
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!said.contains("dropping"), "{said}");
    a.c = LineClient::connect(&shim.addr);
    let r = a.call_patiently(json!({"op": "READ", "stateid": sid, "offset": 0, "count": 1}));
    assert_eq!(r["status"], "NFS4_OK", "the open is kept: {r}");
    let r = a.call(json!({"op": "WRITE", "stateid": sid, "offset": 0, "data": "eQ=="}));
    assert_eq!(r["status"], "NFS4_OK", "its upgrade too: {r}");
    assert_eq!(
        refusal(writer()).code,
        libfilter::proto::ErrorCode::SharingViolation
    );
    let mut b = Nfs::connect(&shim.addr, "host-b", "00000000000000bb");
    let r = b.open("ob", "f", "write", "none", json!({}));
    assert_ne!(r["status"], "NFS4_OK", "{r}");
    let r = a.call(json!({"op": "CLOSE", "stateid": sid}));
    assert_eq!(r["status"], "NFS4_OK", "{r}");
}
