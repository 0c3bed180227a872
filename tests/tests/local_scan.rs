//! The `/proc` scan for existing local opens (issue 18 #5) is bounded on
//! filterd's engine thread: with hundreds of thousands of descriptors open
//! on the machine, a protocol open that must scan decides within the scan
//! budget — conservatively, as if a local opener existed — and counts it
//! in `filterctl stats`. Its own test binary: the descriptors it opens
//! would slow every other mediated test's scans.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rkfilter_tests::{wait_for, Filterd, LineClient, Scratch, Shim};
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
    // 16 processes holding 18,000 descriptors each (inherited: dup'd
    // without close-on-exec), none of them a frontend.
    let null = std::fs::File::open("/dev/null").unwrap();
    let fds: Vec<OwnedFd> = (0..18_000)
        .map(|_| nix::unistd::dup(&null))
        .collect::<Result<_, _>>()
        .unwrap();
    let crowd: Vec<Sleeper> = (0..16)
        .map(|_| Sleeper(Command::new("sleep").arg("60").spawn().unwrap()))
        .collect();
    drop(fds);
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
    let started = Instant::now();
    let r = c.call(
        json!({"cmd": "CREATE", "session_id": sid, "path": "f", "access": ["write"],
                          "share": ["write"], "disposition": "open"}),
    );
    let took = started.elapsed();
    // Decided as if a local reader exists (one does).
    assert_eq!(r["status"], "STATUS_SHARING_VIOLATION", "{r}");
    assert!(took < Duration::from_secs(1), "the CREATE took {took:?}");
    let st = d.control().stats().unwrap();
    assert!(st.local_scans_cut_short >= 1, "{st:?}");
    let _ = holder.kill();
    let _ = holder.wait();
    drop(crowd);
}

/// A child killed (and reaped) on drop.
struct Sleeper(std::process::Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
