//! A filterd for the frontend fuzz targets: started once per fuzzing
//! process on a fresh temporary export, from `RKFILTER_BIN_DIR` (default:
//! the workspace's target/release). `make fuzz` builds it first and stops
//! leftovers (rkfuzz-*) afterwards.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn start(tag: &str) -> PathBuf {
    let bin = std::env::var_os("RKFILTER_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
    let dir = std::env::temp_dir().join(format!("rkfuzz-{tag}-{}", std::process::id()));
    let (root, state) = (dir.join("root"), dir.join("state"));
    std::fs::create_dir_all(&root).expect("temp export");
    std::fs::create_dir_all(&state).expect("temp state");
    Command::new(bin.join("filterd"))
        .arg("--root")
        .arg(&root)
        .arg("--state")
        .arg(&state)
        .args(["--no-fanotify", "--break-timeout-ms", "50"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("filterd (build it: make release)");
    let sock = state.join("filterd.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "filterd did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    sock
}
