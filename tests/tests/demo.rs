//! `make demo` runs the story end to end and leaves nothing behind.

use rkfilter_tests::bin;

#[test]
fn demo_completes_and_cleans_up() {
    let out = std::process::Command::new(bin("rkdemo"))
        .output()
        .expect("run rkdemo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rkdemo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("replay recognised"), "{stdout}");
    // Its temporary export is gone and none of its processes survive.
    let tag = format!("rkdemo-{}", out_pid(&stdout));
    assert!(
        !std::env::temp_dir().join(&tag).exists(),
        "{tag} left behind"
    );
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&cmd).contains(&tag),
                "a process of the demo survived: {}",
                String::from_utf8_lossy(&cmd)
            );
        }
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
