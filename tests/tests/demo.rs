//! `make demo` runs the story end to end and leaves nothing behind — as root
//! (a tmpfs export, fanotify on) and as an unprivileged user (a plain
//! directory, --no-fanotify) — with a real SMB 3 client's act (smbprotocol
//! through rksmbd, which is SIGKILLed and replaced) — and `make
//! demo-cluster` tells the two-machine story with a real 3-member etcd.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rkfilter_tests::bin;

/// Runs rkdemo (through `wrap` when given) and checks its story and that no
/// temporary directory, mount or process of it survives.
fn demo_completes_and_cleans_up(wrap: &[&str]) -> String {
    let stdout = run_demo(wrap, &[]);
    assert!(stdout.contains("replay recognised"), "{stdout}");
    stdout
}

/// Runs rkdemo with `args` and checks that it succeeds and that no
/// temporary directory, mount or process of it survives.
fn run_demo(wrap: &[&str], args: &[&str]) -> String {
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin("rkdemo"));
            c
        }
        None => Command::new(bin("rkdemo")),
    };
    let out = cmd.args(args).output().expect("run rkdemo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rkdemo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("(teardown: "),
        "the teardown line is the last: {stdout}"
    );
    assert_nothing_left(&format!("rkdemo-{}", out_pid(&stdout)));
    stdout
}

/// The demo's temporary export (`…/tag`) is gone, nothing of it is
/// mounted and none of its processes survive.
fn assert_nothing_left(tag: &str) {
    assert!(
        !std::env::temp_dir().join(tag).exists(),
        "{tag} left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains(tag), "a mount of the demo survived");
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&cmd).contains(tag),
                "a process of the demo survived: {}",
                String::from_utf8_lossy(&cmd)
            );
        }
    }
}

/// `rkdemo | head -4`: stdout closes once filterd and the shims run. The
/// demo stops its story (no panic), stops its children — which take the
/// teardown's SIGTERM although rkdemo blocks it for its signal thread —
/// unmounts and removes its export, and exits promptly (before: a panic
/// that left filterd, smbshim and nfsshim running with SIGTERM blocked
/// and the tmpfs mounted; and a teardown of 5 s per shim).
#[test]
fn demo_with_stdout_closed_early_leaves_nothing() {
    let mut child = Command::new(bin("rkdemo"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rkdemo");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).expect("read rkdemo's stdout");
        assert!(n > 0, "rkdemo ended before its processes ran: {seen}");
        seen.push_str(&line);
        if line.contains("nfsshim on") {
            break;
        }
    }
    drop(out);
    let closed = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for rkdemo") {
            break st;
        }
        assert!(
            closed.elapsed() < Duration::from_secs(4),
            "rkdemo still runs {:?} after its stdout closed",
            closed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("story stopped, torn down"), "{err}");
    assert_nothing_left(&format!("rkdemo-{}", out_pid(&seen)));
}

#[test]
fn demo_as_this_user() {
    let python = rkfilter_tests::smb3::smbprotocol_python();
    let python = python.to_string_lossy();
    let stdout = run_demo(&[], &["--smb-python", &python]);
    assert!(stdout.contains("replay recognised"), "{stdout}");
    // The real SMB 3 client's act: its persistent handle outlives rksmbd.
    for step in [
        "ok: granted persistent",
        "SIGKILLed rksmbd pid",
        "ok: conflicting open refused",
        "ok: data read back through the resumed handle",
        "the client reconnected through the replacement",
    ] {
        assert!(stdout.contains(step), "{step}: {stdout}");
    }
    if nix::unistd::geteuid().is_root() {
        assert!(stdout.contains("mediated by fanotify"), "{stdout}");
        assert!(
            stdout.contains("LEASE_BREAK"),
            "the local cat breaks the lease: {stdout}"
        );
    }
}

#[test]
fn demo_as_an_unprivileged_user() {
    if !nix::unistd::geteuid().is_root() {
        // This user is unprivileged already: `demo_as_this_user` covers it.
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let null = std::fs::metadata("/dev/null").map(|m| m.permissions().mode() & 0o777);
    assert_eq!(
        null.ok(),
        Some(0o666),
        "/dev/null must be open to every user for the demo to start its \
         programs as nobody (.ci/run restores it)"
    );
    let stdout = demo_completes_and_cleans_up(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ]);
    assert!(stdout.contains("--no-fanotify"), "{stdout}");
}

#[test]
fn demo_cluster_moves_a_handle_to_another_node() {
    if !rkfilter_tests::etcd::etcd_available("demo_cluster_moves_a_handle_to_another_node") {
        return;
    }
    let stdout = run_demo(&[], &["--cluster"]);
    for step in [
        "fencing revision",
        "node B took over and serves",
        "RECONNECT ok",
        "read \"quarterly numbers: 42\"",
    ] {
        assert!(stdout.contains(step), "{step}: {stdout}");
    }
}

/// The demo names its export `…/rkdemo-PID/root` on its first line.
fn out_pid(stdout: &str) -> String {
    stdout
        .split("rkdemo-")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or("?")
        .to_owned()
}
