//! The fault soak's short profile: rksoak for 20 s with 2 clients of each
//! protocol under SIGKILL chaos (and filterd restarts while a frontend is
//! stopped), beside a client that stops reading and one that opens session
//! after session, must end with 0 violations
//! (`make soak` runs the long profile), and the same against an etcd
//! table (`make soak-etcd` runs its long profile).

use rkfilter_tests::bin;

#[test]
fn short_soak_has_no_violations() {
    let out = std::process::Command::new(bin("rksoak"))
        .args(["--seconds", "20", "--clients", "2", "--seed", "42"])
        .output()
        .expect("run rksoak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rksoak failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("violations                      0"),
        "{stdout}"
    );
    worked(&stdout);
    let failovers = count(&stdout, "failovers");
    assert!(failovers >= 5, "the chaos loop ran: {stdout}");
    let post_mortems = count(&stdout, "post-mortems compared");
    assert!(
        post_mortems >= 1,
        "filterctl's post-mortem view was compared with a restart: {stdout}"
    );
    // filterd restarted while a frontend was stopped, and the thawed
    // frontend's WRITE inside the other protocol's lock was refused.
    let stopped = count(&stdout, "restarts while stopped");
    assert!(stopped >= 1, "{stdout}");
    assert_eq!(
        count(&stdout, "writes in a lock refused"),
        stopped,
        "{stdout}"
    );
    // The hostile peers ran, and met their limits.
    assert!(count(&stdout, "stalled readers dropped") >= 1, "{stdout}");
    assert!(count(&stdout, "sessions refused") >= 1, "{stdout}");
}

/// The same short soak with the table in a one-member etcd (`rksoak
/// --etcd`): each filterd restart takes the prefix over once the killed
/// daemon's 2 s lease has run out, and the post-mortem view is read with
/// `filterctl --store`. About 35 s on a loaded 2-core machine.
#[test]
fn short_soak_against_etcd_has_no_violations() {
    if !rkfilter_tests::etcd::etcd_available("short_soak_against_etcd_has_no_violations") {
        return;
    }
    let out = std::process::Command::new(bin("rksoak"))
        .args([
            "--etcd",
            "--seconds",
            "15",
            "--clients",
            "2",
            "--seed",
            "42",
        ])
        .output()
        .expect("run rksoak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rksoak --etcd failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("etcd store"), "{stdout}");
    worked(&stdout);
    assert!(
        stdout.contains("violations                      0"),
        "{stdout}"
    );
    assert!(
        count(&stdout, "failovers") >= 2,
        "the chaos loop ran: {stdout}"
    );
    assert!(
        count(&stdout, "post-mortems compared") + count(&stdout, "restarts while stopped") >= 1,
        "filterd was killed and restarted on the etcd table: {stdout}"
    );
}

/// The clients' work was acknowledged and checked: 0 violations over no
/// operations would prove nothing.
fn worked(stdout: &str) {
    assert!(
        count(stdout, "operations acknowledged") > 0,
        "no operation acknowledged: {stdout}"
    );
    assert!(count(stdout, "  checks ") > 0, "nothing checked: {stdout}");
}

/// The figure on the summary line labelled `label` (0 if absent).
fn count(stdout: &str, label: &str) -> u64 {
    stdout
        .lines()
        .find(|l| l.contains(label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
