//! The `/proc` scan for existing local opens (issue 18 #5) is bounded on
//! filterd's engine thread: with hundreds of thousands of descriptors open
//! on the machine, a protocol open that must scan decides within the scan
//! budget — conservatively, as if a local opener existed — and counts it
//! in `filterctl stats`; a frontend's descriptor of a handle just closed
//! does not make it scan (nor count). Its own test binary: the descriptors it opens
//! would slow every other mediated test's scans.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rkfilter_tests::{plain_open, wait_for, Filterd, LineClient, Scratch, Shim};
use serde_json::json;

/// Old code: the scan statx'd every descriptor of every process on the
/// engine thread (seconds here), and every other client waited.
#[test]
fn a_scan_of_many_descriptors_stays_within_its_budget() {
    let Some(s) = Scratch::with_tmpfs("fan-scan-budget") else {
        return;
    };
    let d = Filterd::start_mediated(&s, &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-scan");
    let f = s.root().join("f");
    std::fs::write(&f, b"x").unwrap();
    // 16 processes holding 18,000 descriptors each.
    let crowd = crowd(16, 18_000);
    // A local reader of f.
    let mut holder = Command::new("sh")
        .arg("-c")
        .arg(r#"exec sleep 60 < "$0""#)
        .arg(&f)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let hfds = format!("/proc/{}/fd", holder.id());
    wait_for("the holder to open f", Duration::from_secs(10), || {
        std::fs::read_dir(&hfds)
            .ok()?
            .flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == f))
            .then_some(())
    });
    let mut c = LineClient::connect(&shim.addr);
    let sid = c.call(
        json!({"cmd": "SESSION_SETUP", "client_guid": uuid::Uuid::new_v4().to_string(),
                            "user": "u"}),
    )["session_id"]
        .as_u64()
        .expect("session");
    let (started, cpu) = (Instant::now(), cpu_time(d.pid()));
    let r = c.call(
        json!({"cmd": "CREATE", "session_id": sid, "path": "f", "access": ["write"],
                          "share": ["write"], "disposition": "open"}),
    );
    let (took, spent) = (started.elapsed(), cpu_time(d.pid()).saturating_sub(cpu));
    // Decided as if a local reader exists (one does).
    assert_eq!(r["status"], "STATUS_SHARING_VIOLATION", "{r}");
    // The budget is the engine thread's CPU time (50 ms; the whole scan
    // took 1.6 s of it here): asserted as filterd's CPU time, which a
    // loaded machine does not stretch. By the wall clock a scan may take
    // up to its 1 s cap when the engine thread gets little of a CPU (a
    // bound of 1 s on the whole CREATE failed 3 runs in 3 with twelve
    // busy loops on two cores: 1.0-1.3 s, 25 ms of CPU).
    assert!(
        spent < Duration::from_millis(500),
        "the CREATE cost filterd {spent:?} of CPU"
    );
    assert!(took < Duration::from_secs(5), "the CREATE took {took:?}");
    let st = d.control().stats().unwrap();
    assert!(st.local_scans_cut_short >= 1, "{st:?}");
    let _ = holder.kill();
    let _ = holder.wait();
    drop(crowd);
}

/// The CPU time all threads of process `pid` have run so far (from each
/// thread's `/proc/PID/task/TID/schedstat`).
fn cpu_time(pid: u32) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| {
            let st = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            st.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    Duration::from_nanos(ns)
}

/// `n` processes holding `each` descriptors each (inherited: dup'd
/// without close-on-exec), none of them a frontend. One crowd is made at
/// a time: the descriptors pass through this process's own table.
fn crowd(n: usize, each: usize) -> Vec<Sleeper> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let null = std::fs::File::open("/dev/null").unwrap();
    let fds: Vec<OwnedFd> = (0..each)
        .map(|_| nix::unistd::dup(&null))
        .collect::<Result<_, _>>()
        .unwrap();
    let crowd = (0..n)
        .map(|_| Sleeper(Command::new("sleep").arg("60").spawn().unwrap()))
        .collect();
    drop(fds);
    crowd
}

/// Old code (issue 18 final review): with more descriptors open on the
/// machine than one scan looks at, smbshim's descriptor of a handle just
/// closed made the next CREATE's probe see another open, the scan was
/// cut short before it could tell that only a frontend held the file, and
/// the CREATE got a sharing violation (15 in 3 s with 76,000 unrelated
/// descriptors). Now what filterd knew of the file's local openers is
/// kept for a while after its last close, and re-checked instead.
#[test]
fn a_frontends_lingering_descriptor_is_not_a_local_open_past_the_scan_budget() {
    let Some(s) = Scratch::with_tmpfs("fan-linger-crowd") else {
        return;
    };
    let d = Filterd::start_mediated(&s, &[]);
    let shim = Shim::start("smbshim", &s.socket(), "smb-linger-crowd");
    let _crowd = crowd(5, 16_000); // 80,000 descriptors
    let loops = rkfilter_tests::create_close_loops(&shim.addr, Duration::from_secs(3));
    eprintln!(
        "(opens, violations) per client: {loops:?}; scans cut short: {}",
        d.control().stats().unwrap().local_scans_cut_short
    );
    for (done, violations) in loops {
        assert_eq!(
            violations,
            0,
            "{violations} sharing violations in {done} opens; {:?}",
            d.control().stats().unwrap()
        );
        assert!(done > 20, "only {done} opens");
    }
}

/// The state behind the CI flake of the test above, made deterministic: a
/// frontend has closed the file's last handle, and the kernel still counts
/// that handle's open file description while no process's descriptor
/// table shows it (a frontend thread between `close` and the deferred
/// release, here: the descriptor parked in a socket's queue). The next
/// protocol open's probe sees another open; the `/proc` scan, cut short
/// by its budget, names nobody. Old code took that for a local opener and
/// refused the share-none open (a sharing violation); now a scan that
/// names nobody while a frontend just closed the file is not a local
/// opener.
#[test]
fn a_scan_cut_short_naming_nobody_just_after_a_frontend_closed_the_file_finds_no_local_open() {
    use libfilter::client::FilterClient;
    use libfilter::model::*;
    use std::os::fd::AsFd;
    let Some(s) = Scratch::with_tmpfs("fan-cut-closed") else {
        return;
    };
    let d = Filterd::start_mediated(&s, &[]);
    let _crowd = crowd(5, 16_000); // 80,000 descriptors: every scan is cut
    let fe = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-cut").unwrap(),
    )
    .unwrap();
    let req = |share| libfilter::proto::OpenRequest {
        access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        share,
        disposition: Disposition::OpenIf,
        ..plain_open("alice", "f")
    };
    let h = fe.open(req(Rights::ALL)).unwrap();
    // The handle's descriptor leaves every descriptor table but stays open.
    let (park, _peer) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    libfilter::sys::send_packet(park.as_fd(), b"parked", Some(h.fd.as_fd())).unwrap();
    drop(h.fd);
    fe.close(h.info.key).unwrap();
    let r = fe.open(req(Rights::NONE));
    let st = d.control().stats().unwrap();
    assert!(
        st.local_scans_cut_short >= 1,
        "the scan was cut short: {st:?}"
    );
    assert!(r.is_ok(), "{r:?}; {st:?}");
}

/// A child killed (and reaped) on drop.
struct Sleeper(std::process::Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
