//! An etcd member stalls (SIGSTOP, then SIGCONT) while writers do
//! persistent CREATE then CLOSE through smbshim, and filterd survives:
//! no handle whose CLOSE was acknowledged is in filterd's handle list,
//! and every acknowledged create that was not closed is. (A closed
//! handle's record back in etcd's table only is the late-Txn defect
//! described in docs/ARCHITECTURE.md, counted and printed, not asserted.)
//!
//! `etcd_stall_hunt` is the hunt (ignored: ~1 min a run); its shape comes
//! from the environment: `RK_STALL_TTL` (lease TTL, default 15),
//! `RK_STALL_MS` (stall lengths, comma separated, default
//! "1200,1600,2200,3000"), `RK_STALL_WHO` (`leader`, `follower`, `both`
//! alternating, or `two`: the leader and a follower at once; default
//! `both`), `RK_STALL_WRITERS` (default 4; 200 fills Txns, so commits
//! overlap).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rkfilter_tests::etcd::{etcd_available, Cluster, DelayProxy};
use rkfilter_tests::{listed_paths, smb_persistent_create, smb_session, Filterd, Scratch, Shim};
use serde_json::{json, Value};

#[derive(Default)]
struct Seen {
    created: BTreeSet<String>,
    create_failed: BTreeMap<String, String>,
    closed: BTreeSet<String>,
    close_failed: BTreeMap<String, String>,
}

impl Seen {
    /// Acknowledged creates whose close was not attempted or not answered.
    fn left_open(&self) -> BTreeSet<String> {
        self.created
            .iter()
            .filter(|p| !self.closed.contains(*p) && !self.close_failed.contains_key(*p))
            .cloned()
            .collect()
    }
}

fn writer(addr: String, w: usize, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let (mut c, sid) = smb_session(&addr);
    let mut i = 0u32;
    while !stop.load(Ordering::Acquire) {
        i += 1;
        let path = format!("w{w}-{i:05}");
        let r = smb_persistent_create(&mut c, sid, &path);
        if r["status"] != "STATUS_SUCCESS" {
            let lost = r.to_string().contains("connection to filterd lost");
            seen.lock()
                .unwrap()
                .create_failed
                .insert(path, r.to_string());
            if lost {
                return;
            }
            continue;
        }
        seen.lock().unwrap().created.insert(path.clone());
        // No reply (smbshim went away with filterd, the close in flight):
        // the close may still commit once the members resume, so it is
        // neither acknowledged nor known to have failed — "failed" here
        // means only that the table may or may not hold the handle.
        let r = c
            .try_call(json!({"cmd": "CLOSE", "session_id": sid, "file_id": r["file_id"]}))
            .unwrap_or_else(|| json!({"status": "no reply: the connection ended"}));
        let lost = r["status"] == "no reply: the connection ended";
        if r["status"] == "STATUS_SUCCESS" {
            seen.lock().unwrap().closed.insert(path);
        } else {
            seen.lock()
                .unwrap()
                .close_failed
                .insert(path, r.to_string());
        }
        if lost {
            return;
        }
    }
}

fn paths_of(v: &Value) -> BTreeSet<String> {
    listed_paths(v).into_iter().collect()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[test]
#[ignore = "a hunt: ~1 min a run, shaped by RK_STALL_* (see the module docs)"]
fn etcd_stall_hunt() {
    if !etcd_available("etcd_stall_hunt") {
        return;
    }
    let ttl = env_or("RK_STALL_TTL", "15");
    let stalls: Vec<u64> = env_or("RK_STALL_MS", "1200,1600,2200,3000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let who = env_or("RK_STALL_WHO", "both");
    let n_writers: usize = env_or("RK_STALL_WRITERS", "4").parse().unwrap_or(4);
    let s = Scratch::new("etcd-stall");
    let cluster = Cluster::start(&s, 3);
    let url = cluster.url("rk/stall");
    let mut f = Filterd::spawn(&s, &["--store", &url, "--lease-ttl-secs", &ttl], &[]);
    f.wait_ready();
    let smb = Shim::start("smbshim", f.socket(), "smb-stall");
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let writers: Vec<_> = (0..n_writers)
        .map(|w| {
            let (addr, stop, seen) = (smb.addr.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || writer(addr, w, stop, seen))
        })
        .collect();
    // Until 50 more closes are acknowledged, or filterd has exited (then
    // its status); panics with filterd's log after 60 s.
    let progress = |f: &mut Filterd| {
        let base = seen.lock().unwrap().closed.len();
        let t0 = Instant::now();
        loop {
            if seen.lock().unwrap().closed.len() >= base + 50 {
                return None;
            }
            if let Some(st) = f.exited() {
                return Some(st);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no progress in 60 s; filterd's log:\n{}",
                f.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    assert_eq!(progress(&mut f), None, "{}", f.log_text());
    let mut exit = None;
    for (round, ms) in stalls.iter().enumerate() {
        let leader = cluster.leader();
        let targets = match who.as_str() {
            "leader" => vec![leader],
            "follower" => vec![(leader + 1) % 3],
            "two" => vec![leader, (leader + 1) % 3],
            _ if round % 2 == 0 => vec![leader],
            _ => vec![(leader + 1) % 3],
        };
        let t0 = Instant::now();
        for t in &targets {
            cluster.signal(*t, Signal::SIGSTOP);
        }
        std::thread::sleep(Duration::from_millis(*ms));
        for t in &targets {
            cluster.signal(*t, Signal::SIGCONT);
        }
        eprintln!(
            "round {round}: members {targets:?} (leader {leader}) stalled {:?}",
            t0.elapsed()
        );
        for i in 0..3 {
            cluster.wait_healthy(i);
        }
        if let Some(st) = f.exited().or_else(|| progress(&mut f)) {
            eprintln!("filterd exited {st:?} during round {round}");
            exit = Some(st);
            break;
        }
    }
    stop.store(true, Ordering::Release);
    for w in writers {
        let _ = w.join();
    }
    let alive = exit.is_none() && f.exited().is_none();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "filterd alive: {alive}; created {} (failed {}), closed {} (failed {})",
        seen.created.len(),
        seen.create_failed.len(),
        seen.closed.len(),
        seen.close_failed.len()
    );
    for (p, e) in seen
        .create_failed
        .iter()
        .chain(seen.close_failed.iter())
        .take(10)
    {
        eprintln!("  failed {p}: {e}");
    }
    let open = seen.left_open();
    let mut bad = Vec::new();
    if alive {
        let sock = f.socket().display().to_string();
        let listed =
            paths_of(&rkfilter_tests::filterctl(&["--socket", &sock, "handles", "--json"]).json());
        let closed_listed: Vec<_> = listed.intersection(&seen.closed).collect();
        let lost: Vec<_> = open.difference(&listed).collect();
        let unknown: Vec<_> = listed
            .iter()
            .filter(|p| !seen.created.contains(*p))
            .collect();
        eprintln!(
            "daemon lists {}: acknowledged-closed {closed_listed:?}, acknowledged-open lost {lost:?}, never acknowledged {unknown:?}",
            listed.len()
        );
        if !closed_listed.is_empty() || !lost.is_empty() {
            bad.push(format!(
                "daemon: closed yet listed {closed_listed:?}, open yet missing {lost:?}"
            ));
        }
        drop(smb);
        let _ = f.terminate();
    } else {
        drop(smb);
    }
    let table =
        paths_of(&rkfilter_tests::filterctl(&["--store", &url, "handles", "--json"]).json());
    let closed_in_table: Vec<_> = table.intersection(&seen.closed).collect();
    let open_not_in_table: Vec<_> = open.difference(&table).collect();
    eprintln!(
        "etcd table holds {}: acknowledged-closed {closed_in_table:?} (the late-Txn defect), acknowledged-open missing {open_not_in_table:?}",
        table.len()
    );
    if !open_not_in_table.is_empty() {
        bad.push(format!("etcd: open yet missing {open_not_in_table:?}"));
    }
    let log = f.log_text();
    for l in log
        .lines()
        .filter(|l| {
            l.contains("WARN")
                || l.contains("ERROR")
                || l.contains("rolled back")
                || l.contains("undone")
        })
        .take(40)
    {
        eprintln!("  log: {l}");
    }
    drop(cluster);
    assert!(bad.is_empty(), "{bad:?}");
}

/// Until `n` more closes are acknowledged and `at_least` has passed
/// (`None`), or filterd has exited (its status); panics after `within`.
fn closes_go_on(
    f: &mut Filterd,
    seen: &Mutex<Seen>,
    n: usize,
    within: Duration,
    at_least: Duration,
) -> Option<std::process::ExitStatus> {
    let base = seen.lock().unwrap().closed.len();
    let t0 = Instant::now();
    rkfilter_tests::wait_for("closes go on", within, || {
        if let Some(st) = f.exited() {
            return Some(Some(st));
        }
        (seen.lock().unwrap().closed.len() >= base + n && t0.elapsed() >= at_least).then_some(None)
    })
}

/// A 3-member cluster, filterd on it at the default lease (no
/// `--lease-ttl-secs`), smbshim, and four [`writer`]s that have had 40
/// pairs acknowledged. Fields drop in order: processes before the
/// cluster, the cluster before the dirs.
struct Loaded {
    writers: Vec<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    smb: Shim,
    f: Filterd,
    url: String,
    cluster: Cluster,
    s: Scratch,
}

/// Four [`writer`]s through the smbshim at `addr`: their stop flag, what
/// they were told, and their threads.
#[allow(clippy::type_complexity)]
fn start_writers(
    addr: &str,
) -> (
    Arc<AtomicBool>,
    Arc<Mutex<Seen>>,
    Vec<std::thread::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let writers = (0..4)
        .map(|w| {
            let (addr, stop, seen) = (addr.to_owned(), stop.clone(), seen.clone());
            std::thread::spawn(move || writer(addr, w, stop, seen))
        })
        .collect();
    (stop, seen, writers)
}

fn under_load(name: &str) -> Loaded {
    let s = Scratch::new(&format!("etcd-{name}-stall"));
    let cluster = Cluster::start(&s, 3);
    let url = cluster.url(&format!("rk/{name}"));
    let mut f = Filterd::spawn(&s, &["--store", &url], &[]);
    f.wait_ready();
    let smb = Shim::start("smbshim", f.socket(), &format!("smb-{name}"));
    let (stop, seen, writers) = start_writers(&smb.addr);
    let started = closes_go_on(&mut f, &seen, 40, Duration::from_secs(30), Duration::ZERO);
    assert_eq!(started, None, "{}", f.log_text());
    Loaded {
        writers,
        stop,
        seen,
        smb,
        f,
        url,
        cluster,
        s,
    }
}

/// The etcd *leader* stalls (SIGSTOP 3 s, then SIGCONT) under four
/// persistent CREATE/CLOSE writers at the default lease (4 s, margin 1 s).
/// The other two members elect a new leader within about a second (two
/// when their first votes split) and etcd extends every lease when a
/// leader takes over, so a healthy owner must keep serving: no step-down
/// through the stall and a lease's length after it, every reply a
/// success, and filterd's handle list holding every acknowledged open not
/// closed and no acknowledged-closed handle. Before the keepalive's
/// renewals overlapped, one stuck on the stopped leader (or on a follower
/// that forwarded it there) cost a whole TTL/4 round and the owner
/// stepped down (exit 75) in about half the runs; and commits went
/// through the shared, balanced client, whose first attempts kept going
/// to the stopped member (each a 1.5 s timeout). The stall is no longer
/// than TTL − TTL/4: etcd 3.4.23 lets a leader that resumes after its
/// own view of a lease ran out revoke it although the new leader renewed
/// it (etcd-io/etcd#15247, fixed upstream in 2024 by #16822), and no
/// owner survives that (docs/ARCHITECTURE.md, "The lease clock").
///
/// A run whose live members elected no leader in time proves nothing
/// (below): it is run again, up to 3 runs; under `CI=true` the test fails
/// if no run was conclusive (before, one inconclusive run passed).
#[test]
fn a_stalled_etcd_leader_does_not_make_the_owner_step_down() {
    if !etcd_available("a_stalled_etcd_leader_does_not_make_the_owner_step_down") {
        return;
    }
    for run in 1..=3 {
        if leader_stall_run() {
            return;
        }
        eprintln!("run {run} inconclusive");
    }
    assert!(
        !rkfilter_tests::in_ci(),
        "3 runs, none conclusive: the live members never had a new leader in time"
    );
    eprintln!("3 runs, none conclusive (a failure under CI=true)");
}

/// One run of [`a_stalled_etcd_leader_does_not_make_the_owner_step_down`]:
/// false if inconclusive (no new leader in time, filterd stepped down).
fn leader_stall_run() -> bool {
    let Loaded {
        s,
        cluster,
        url: _,
        mut f,
        smb,
        stop,
        seen,
        writers,
    } = under_load("leader");
    let long = Duration::from_secs(30);
    let leader = cluster.leader();
    let old_id = cluster.status(leader).map(|(me, _)| me);
    cluster.signal(leader, Signal::SIGSTOP);
    let stopped = Instant::now();
    // The stall itself (the scenario): past the election timeout. Meanwhile
    // the live members are asked who leads, to tell a run whose cluster
    // had no leader in time (below) from one the owner should ride out.
    let mut elected = None;
    while stopped.elapsed() < Duration::from_secs(3) {
        if elected.is_none()
            && (0..3).filter(|&i| i != leader).any(|i| {
                cluster
                    .status(i)
                    .is_some_and(|(_, l)| l != 0 && Some(l) != old_id)
            })
        {
            elected = Some(stopped.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.signal(leader, Signal::SIGCONT);
    let resumed = Instant::now();
    // Service goes on, and for a whole lease after the stall: an owner
    // whose renewals all failed would have stopped by then.
    let after = closes_go_on(&mut f, &seen, 40, long, Duration::from_secs(4));
    let took = resumed.elapsed();
    stop.store(true, Ordering::Release);
    for w in writers {
        let _ = w.join();
    }
    if after.is_some() && std::env::var_os("RK_STALL_LOG").is_some() {
        for i in 1..=3 {
            let log = std::fs::read_to_string(s.dir.join(format!("etcd/e{i}.log")));
            eprintln!("etcd member e{i}:\n{}", log.unwrap_or_default());
        }
    }
    // The owner's last answered renewal may be up to TTL/8 (0.5 s) old
    // when the leader stops, so it must be renewed again by TTL − margin −
    // TTL/8 = 2.5 s after the stop. Past about 2.2 s with no leader (the
    // live members split their votes, or the machine is so loaded that
    // they voted late), no client could renew in time, and stepping down
    // is right: the run says so and proves nothing either way.
    let in_time = elected.is_some_and(|t| t < Duration::from_millis(2200));
    if after.is_some() && !in_time {
        eprintln!(
            "inconclusive: the live members had no new leader in time ({elected:?} after the stop); filterd stepped down"
        );
        return false;
    }
    assert_eq!(
        after,
        None,
        "filterd stepped down with the leader (member {leader}) stalled, a new leader {elected:?} after the stop:\n{}",
        f.log_text()
    );
    eprintln!(
        "40 pairs acknowledged and {took:?} passed after the leader (member {leader}) resumed"
    );
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        seen.create_failed.is_empty() && seen.close_failed.is_empty(),
        "failed: {:?} {:?}",
        seen.create_failed,
        seen.close_failed
    );
    let open: BTreeSet<String> = seen.created.difference(&seen.closed).cloned().collect();
    let sock = f.socket().display().to_string();
    let listed =
        paths_of(&rkfilter_tests::filterctl(&["--socket", &sock, "handles", "--json"]).json());
    assert_eq!(
        listed, open,
        "filterd's handles against the acknowledged opens"
    );
    drop(smb);
    assert!(f.exited().is_none(), "{}", f.log_text());
    if std::env::var_os("RK_STALL_LOG").is_some() {
        eprintln!("{}", f.log_text());
    }
    true
}

/// The other side of the overlapping renewals: with two of three members
/// stalled (SIGSTOP: the leader and a follower, so no quorum and no
/// renewal can be answered; the live one says "no leader"), the owner
/// still stops on its own clock before its lease could run out — exit 75
/// within TTL of the stall, since no renewal sent after it was answered —
/// and once the members resume, etcd's table holds every acknowledged
/// open not closed and no acknowledged-closed handle. A guard: it passed
/// before the keepalive's change too.
#[test]
fn with_quorum_stalled_the_owner_still_steps_down_in_time() {
    if !etcd_available("with_quorum_stalled_the_owner_still_steps_down_in_time") {
        return;
    }
    let Loaded {
        s: _s,
        cluster,
        url,
        mut f,
        smb,
        stop,
        seen,
        writers,
    } = under_load("quorum");
    let leader = cluster.leader();
    let stalled = [leader, (leader + 1) % 3];
    for m in stalled {
        cluster.signal(m, Signal::SIGSTOP);
    }
    let t0 = Instant::now();
    let st = f.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    for m in stalled {
        cluster.signal(m, Signal::SIGCONT);
    }
    assert_eq!(st.code(), Some(75), "{}", f.log_text());
    assert!(
        took < Duration::from_secs(4),
        "stepped down {took:?} after quorum stalled (lease 4 s):\n{}",
        f.log_text()
    );
    eprintln!("quorum stalled: filterd stepped down {took:?} later");
    drop(smb);
    stop.store(true, Ordering::Release);
    for w in writers {
        let _ = w.join();
    }
    for i in 0..3 {
        cluster.wait_healthy(i);
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let open = seen.left_open();
    let table =
        paths_of(&rkfilter_tests::filterctl(&["--store", &url, "handles", "--json"]).json());
    let missing: Vec<_> = open.difference(&table).collect();
    let closed_back: Vec<_> = table.intersection(&seen.closed).collect();
    assert!(
        missing.is_empty() && closed_back.is_empty(),
        "etcd: acknowledged opens missing {missing:?}, acknowledged-closed back {closed_back:?}"
    );
}

/// Hunt (ignored): filterd claims while a fresh 3-member cluster is still
/// electing, then four writers run for 3 s; the owner must not step down.
/// `RK_ELECTION_ROUNDS` rounds (default 10); `RK_ELECTION_HEALTHY=1` waits
/// for every member's /health first (as the CI run did).
#[test]
#[ignore]
fn election_hunt() {
    let rounds: usize = env_or("RK_ELECTION_ROUNDS", "10").parse().unwrap();
    let healthy = env_or("RK_ELECTION_HEALTHY", "0") == "1";
    let mut bad = Vec::new();
    for round in 0..rounds {
        let s = Scratch::new("etcd-election-hunt");
        let cluster = Cluster::start_unsettled(&s, 3);
        if healthy {
            for i in 0..3 {
                cluster.wait_healthy(i);
            }
        }
        let url = cluster.url("rk/hunt");
        let mut f = Filterd::spawn(
            &s,
            &["--store", &url],
            &[("RUST_LOG", "info,libfilter::etcd=debug")],
        );
        f.wait_ready();
        let smb = Shim::start("smbshim", f.socket(), "smb-hunt");
        let (stop, seen, writers) = start_writers(&smb.addr);
        let st = closes_go_on(
            &mut f,
            &seen,
            1,
            Duration::from_secs(10),
            Duration::from_secs(3),
        );
        stop.store(true, Ordering::Release);
        for w in writers {
            let _ = w.join();
        }
        drop(smb);
        let closed = seen.lock().unwrap().closed.len();
        eprintln!("round {round}: exit {st:?}, {closed} closes");
        if st.is_some() {
            let log = f.log_text();
            let interesting: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains("WARN") || l.contains("ERROR") || l.contains("owner of the etcd")
                })
                .collect();
            eprintln!("{}", interesting.join("\n"));
            bad.push(round);
        }
    }
    assert!(bad.is_empty(), "stepped down in rounds {bad:?} of {rounds}");
}

/// [`stalled_etcd`] with a second persistent CREATE sent, whose commit
/// stays pending. (scratch, cluster, filterd, shim, the pending CREATE.)
fn stalled_with_a_commit_pending(
    name: &str,
) -> Option<(Scratch, Cluster, Filterd, Shim, rkfilter_tests::InFlight)> {
    let (s, cluster, f, smb, (c, sid)) = stalled_etcd(name)?;
    let pending = pending_create(c, sid, &f);
    Some((s, cluster, f, smb, pending))
}

/// A persistent CREATE of `pending` sent on `c` (session `sid`) to a
/// filterd whose store does not answer, once its commit waits.
fn pending_create(
    c: rkfilter_tests::LineClient,
    sid: u64,
    f: &Filterd,
) -> rkfilter_tests::InFlight {
    let pending = rkfilter_tests::InFlight::send(
        c,
        json!({"cmd": "CREATE", "session_id": sid, "path": "pending", "access": ["read", "write"],
               "share": ["read"], "disposition": "create",
               "durable": {"create_guid": uuid::Uuid::new_v4().to_string(), "persistent": true, "timeout_ms": 60000}}),
    );
    let sock = f.socket().to_string_lossy().into_owned();
    rkfilter_tests::wait_for(
        "a commit to wait on the stalled store",
        Duration::from_secs(10),
        || {
            let v = rkfilter_tests::filterctl(&["--socket", &sock, "stats", "--json"]).json();
            (v["replies_awaiting_commit"].as_u64().unwrap_or(0) > 0).then_some(())
        },
    );
    pending
}

/// filterd (TTL 30, fanotify on a tmpfs export) owning a 1-member etcd
/// table, a persistent CREATE acknowledged (`held`: a file with protocol
/// state), then the member stopped (SIGSTOP) with nothing pending.
/// (scratch, cluster, filterd, shim, the client's line and session.)
#[allow(clippy::type_complexity)]
fn stalled_etcd(
    name: &str,
) -> Option<(
    Scratch,
    Cluster,
    Filterd,
    Shim,
    (rkfilter_tests::LineClient, u64),
)> {
    let s = Scratch::with_tmpfs(&format!("etcd-{name}"))?;
    let cluster = Cluster::start(&s, 1);
    let url = cluster.url(&format!("rk/{name}"));
    let f = Filterd::start_mediated(&s, &["--store", &url, "--lease-ttl-secs", "30"]);
    let smb = Shim::start("smbshim", f.socket(), &format!("smb-{name}"));
    let (mut c, sid) = smb_session(&smb.addr);
    let r = smb_persistent_create(&mut c, sid, "held");
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let sock = f.socket().to_string_lossy().into_owned();
    // Nothing pending: answered at once, one handle.
    let v = rkfilter_tests::filterctl(&["--socket", &sock, "status", "--json"]).json();
    assert_eq!(v["handles_connected"], 1, "{v}");
    assert!(v.get("commit_wait").is_none(), "{v}");
    cluster.signal(0, Signal::SIGSTOP);
    Some((s, cluster, f, smb, (c, sid)))
}

/// SIGTERM while every etcd member is stopped and a commit waits
/// (review rvslowetcd finding 2): filterd gives the unresolved commit a
/// short grace, then stops as after a crash — exit 75 within a few
/// seconds, not after TTL − margin (19.5 s with TTL 30 before) — and a
/// local open of a file with protocol state meanwhile is answered (never
/// left waiting).
#[test]
fn sigterm_while_etcd_stalls_stops_within_a_grace() {
    if !etcd_available("sigterm_while_etcd_stalls_stops_within_a_grace") {
        return;
    }
    let Some((s, cluster, f, _smb, pending)) = stalled_with_a_commit_pending("term") else {
        return;
    };
    let why = "a commit is still unresolved";
    sigterm_stops_within_a_grace(&s, &cluster, f, (why, Duration::from_secs(6)));
    drop(pending);
}

/// As [`sigterm_while_etcd_stalls_stops_within_a_grace`], nothing pending:
/// the clean shutdown's own mark is the commit that waits (re-review
/// rr42d A1: 20.8 s with TTL 30 before, the committer being done).
#[test]
fn sigterm_while_etcd_stalls_with_nothing_pending_stops_within_a_grace() {
    if !etcd_available("sigterm_while_etcd_stalls_with_nothing_pending_stops_within_a_grace") {
        return;
    }
    let Some((s, cluster, f, _smb, _client)) = stalled_etcd("term-idle") else {
        return;
    };
    // Twice the grace: the mark's commit, then the lease's revoke.
    let why = "the clean shutdown mark is still unresolved";
    sigterm_stops_within_a_grace(&s, &cluster, f, (why, Duration::from_secs(8)));
}

/// SIGTERM to `f` (its etcd member stopped): a local open of `held` is
/// answered within 10 s, filterd exits 75 `within`, having logged
/// `why`, and the member is continued.
fn sigterm_stops_within_a_grace(
    s: &Scratch,
    cluster: &Cluster,
    mut f: Filterd,
    (why, within): (&str, Duration),
) {
    f.signal(Signal::SIGTERM);
    let t0 = Instant::now();
    let held = s.root().join("held");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(
            std::fs::File::open(held)
                .map(drop)
                .map_err(|e| e.raw_os_error()),
        );
    });
    let opened = rx.recv_timeout(Duration::from_secs(10));
    assert!(
        opened.is_ok(),
        "a local open during the shutdown was not answered within 10 s"
    );
    let st = f.wait_exit(Duration::from_secs(40));
    let took = t0.elapsed();
    cluster.signal(0, Signal::SIGCONT);
    assert_eq!(st.code(), Some(75), "{}", f.log_text());
    assert!(
        took < within,
        "filterd took {took:?} to stop after SIGTERM with etcd stalled:\n{}",
        f.log_text()
    );
    assert!(f.log_text().contains(why), "{}", f.log_text());
}

/// `filterctl status` while every etcd member is stopped and a commit
/// waits (review rvslowetcd finding 3): answered after filterd's 1 s
/// bound instead of timing out behind the commit — with the durable
/// counts (the acknowledged handle; not the one whose CREATE waits) and
/// `commit_wait` saying what is pending. Once etcd resumes, status waits
/// for its commits again and shows both handles without `commit_wait`.
#[test]
fn status_answers_while_a_commit_waits_on_a_stalled_etcd() {
    if !etcd_available("status_answers_while_a_commit_waits_on_a_stalled_etcd") {
        return;
    }
    let Some((_s, cluster, f, _smb, pending)) = stalled_with_a_commit_pending("status") else {
        return;
    };
    let sock = f.socket().to_string_lossy().into_owned();
    let t0 = Instant::now();
    let out = rkfilter_tests::filterctl(&[
        "--socket",
        &sock,
        "--timeout-ms",
        "8000",
        "status",
        "--json",
    ]);
    let took = t0.elapsed();
    let text = rkfilter_tests::filterctl(&["--socket", &sock, "--timeout-ms", "8000", "status"]);
    cluster.signal(0, Signal::SIGCONT);
    assert_eq!(out.code, 0, "status during the stall: {}", out.stderr);
    assert!(took < Duration::from_secs(4), "status took {took:?}");
    let v = out.json();
    assert_eq!(v["handles_connected"], 1, "{v}");
    assert!(
        v["commit_wait"]["replies_awaiting_commit"].as_u64() >= Some(1),
        "{v}"
    );
    assert!(v["commit_wait"]["waited_ms"].as_u64() >= Some(1000), "{v}");
    assert!(v["commit_wait"]["counts_age_ms"].is_u64(), "{v}");
    assert!(
        v["store_detail"]
            .as_str()
            .is_some_and(|d| d.contains("lease")),
        "{v}"
    );
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.contains("commits pending:"), "{}", text.stdout);
    let r = pending.outcome("the CREATE after etcd resumed", Duration::from_secs(30));
    assert_eq!(
        r.as_ref().map(|r| r["status"].clone()),
        Some(json!("STATUS_SUCCESS")),
        "{r:?}"
    );
    // Both (the client of the second has gone: disconnected, persistent),
    // and nothing pending once the detach of the gone client's handle,
    // a commit of its own made as the client went, is in too.
    rkfilter_tests::wait_for(
        "status with both handles and no commit waiting",
        Duration::from_secs(10),
        || {
            let v = rkfilter_tests::filterctl(&["--socket", &sock, "status", "--json"]).json();
            (v["handles"] == 2 && v.get("commit_wait").is_none()).then_some(())
        },
    );
}

/// A one-member etcd behind a link of `delay` each way ([`DelayProxy`],
/// no delay until the owner is ready), filterd owning `rk/NAME` with
/// lease `ttl` s, and smbshim with a session (made before the delay):
/// [`slow_link`] returns it with the session's line and id.
struct SlowLink {
    _s: Scratch,
    cluster: Cluster,
    proxy: DelayProxy,
    f: Filterd,
    _smb: Shim,
    name: String,
}

impl SlowLink {
    /// The handles' paths etcd itself holds (read past the slow link).
    fn etcd_paths(&self) -> BTreeSet<String> {
        let url = self.cluster.url(&format!("rk/{}", self.name));
        paths_of(&rkfilter_tests::filterctl(&["--store", &url, "handles", "--json"]).json())
    }

    /// A persistent CREATE of `path` acknowledged within `within`
    /// ([`create_within`]; panics with filterd's log if not): how long it
    /// took, and the client back.
    fn create_ok(
        &self,
        client: rkfilter_tests::LineClient,
        sid: u64,
        path: &str,
        within: Duration,
    ) -> (Duration, rkfilter_tests::LineClient) {
        let Some((r, took, client)) = create_within(client, sid, path, within) else {
            panic!(
                "a persistent CREATE of {path} over the slow link had no reply in {within:?}:\n{}",
                self.f.log_text()
            );
        };
        assert_eq!(r["status"], "STATUS_SUCCESS", "{r}\n{}", self.f.log_text());
        (took, client)
    }

    /// Asserts that filterd owns the table (its `status` shows the lease
    /// standing, polled without pause) for 10 s from when it first does,
    /// then that a persistent CREATE is acknowledged and in etcd.
    fn owner_throughout(&mut self, client: rkfilter_tests::LineClient, sid: u64, link: &str) {
        let sock = self.f.socket().to_string_lossy().into_owned();
        let lease_left = || {
            let out = rkfilter_tests::filterctl_as_is(&["--socket", &sock, "status", "--json"]);
            (out.code == 0).then(|| out.json()["lease_left_ms"].as_u64().unwrap_or(0))
        };
        let started = Instant::now();
        rkfilter_tests::wait_for("filterd the owner", Duration::from_secs(20), || {
            (self.f.exited().is_some() || lease_left().is_some_and(|l| l > 0)).then_some(())
        });
        let t0 = Instant::now();
        let mut polls = 0u32;
        let mut least = u64::MAX;
        while t0.elapsed() < Duration::from_secs(10) {
            assert!(
                self.f.exited().is_none(),
                "filterd exited {:?} into a {link}:\n{}",
                t0.elapsed(),
                self.f.log_text()
            );
            let left = lease_left().unwrap_or_else(|| {
                panic!(
                    "no status {:?} into the delay (filterd stepped down?)\n{}",
                    t0.elapsed(),
                    self.f.log_text()
                )
            });
            assert!(
                left > 0,
                "no lease left {:?} into the delay\n{}",
                t0.elapsed(),
                self.f.log_text()
            );
            least = least.min(left);
            polls += 1;
        }
        let (took, _client) = self.create_ok(client, sid, "piped", Duration::from_secs(10));
        assert!(self.f.exited().is_none(), "{}", self.f.log_text());
        eprintln!(
            "{link}: seen owning {:?} into the wait, then for {:?} ({polls} status polls, least lease left {least} ms), CREATE in {took:?}",
            t0.duration_since(started),
            t0.elapsed()
        );
        assert!(self.etcd_paths().contains("piped"), "etcd holds the CREATE");
    }
}

fn slow_link(
    name: &str,
    ttl: &str,
    delay: Duration,
) -> (SlowLink, rkfilter_tests::LineClient, u64) {
    slow_link_from(name, ttl, delay, false)
}

/// [`slow_link`], the delay switched on before filterd starts if
/// `from_start` (it claims, and opens its keepalive stream, over it).
fn slow_link_from(
    name: &str,
    ttl: &str,
    delay: Duration,
    from_start: bool,
) -> (SlowLink, rkfilter_tests::LineClient, u64) {
    let s = Scratch::new(&format!("etcd-{name}"));
    let cluster = Cluster::start(&s, 1);
    let proxy = DelayProxy::start(cluster.client_port(0));
    if from_start {
        proxy.set_delay(delay);
    }
    let url = format!("etcd://127.0.0.1:{}/rk/{name}", proxy.port);
    let f = Filterd::spawn(&s, &["--store", &url, "--lease-ttl-secs", ttl], &[]);
    f.wait_ready();
    let smb = Shim::start("smbshim", f.socket(), &format!("smb-{name}"));
    let (client, sid) = smb_session(&smb.addr);
    proxy.set_delay(delay);
    let name = name.to_owned();
    let link = SlowLink {
        _s: s,
        cluster,
        proxy,
        f,
        _smb: smb,
        name,
    };
    (link, client, sid)
}

/// A persistent CREATE of `path` from another thread; its reply and how
/// long it took, or `None` if none came within `within`.
fn create_within(
    client: rkfilter_tests::LineClient,
    sid: u64,
    path: &str,
    within: Duration,
) -> Option<(Value, Duration, rkfilter_tests::LineClient)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let mut client = client;
        let t = Instant::now();
        let r = smb_persistent_create(&mut client, sid, &path);
        let _ = tx.send((r, t.elapsed(), client));
    });
    rx.recv_timeout(within).ok()
}

/// etcd answers slower than the first attempt's 1.5 s (0.9 s each way,
/// a 1.8 s round trip) with a lease long enough (16 s): a persistent
/// CREATE is acknowledged, and durable in etcd, within seconds. Before,
/// every commit attempt was cut at 1.5 s (each copy applied in etcd, its
/// answer never read), the generation moved on and the commit sent
/// again, for as long as the delay lasted: the CREATE had no reply and
/// filterd kept its lease, with no error (review rvslowetcd, finding 1,
/// scenario A).
#[test]
fn a_commit_over_a_slow_link_is_answered() {
    if !etcd_available("a_commit_over_a_slow_link_is_answered") {
        return;
    }
    let (mut l, client, sid) = slow_link("slowcommit", "16", Duration::from_millis(900));
    let (took, client) = l.create_ok(client, sid, "slow-1", Duration::from_secs(25));
    // A second one: the first attempt's bound has learnt the link.
    let (r2, took2, _client) = create_within(client, sid, "slow-2", Duration::from_secs(25))
        .unwrap_or_else(|| panic!("the second CREATE had no reply:\n{}", l.f.log_text()));
    assert_eq!(r2["status"], "STATUS_SUCCESS", "{r2}\n{}", l.f.log_text());
    eprintln!("persistent CREATE over a 1.8 s round trip: {took:?}, then {took2:?}");
    assert!(l.f.exited().is_none(), "{}", l.f.log_text());
    // Durable: etcd itself (not through the slow link) holds both.
    let table = l.etcd_paths();
    assert!(
        table.contains("slow-1") && table.contains("slow-2"),
        "etcd holds {table:?}"
    );
}

/// A round trip (1.1 s) above a renewal round (TTL/4 = 1 s at a 4 s
/// lease) but well under TTL − margin (3 s): every renewal's answer still
/// proves the lease from its send time, so the owner keeps it and serves
/// (persistent CREATEs acknowledged throughout three lease lengths).
/// Before, each renewal not answered within TTL/4 was thrown away and the
/// owner stepped down (exit 75) about 3 s into the delay (review
/// rvslowetcd, finding 1, scenario B).
#[test]
fn an_owner_behind_a_link_slower_than_a_renewal_round_keeps_its_lease() {
    if !etcd_available("an_owner_behind_a_link_slower_than_a_renewal_round_keeps_its_lease") {
        return;
    }
    let (mut l, mut client, sid) = slow_link("slowrenew", "4", Duration::from_millis(550));
    let t0 = Instant::now();
    let mut created = Vec::new();
    while t0.elapsed() < Duration::from_secs(12) {
        let path = format!("renew-{}", created.len());
        let Some((r, _, c)) = create_within(client, sid, &path, Duration::from_secs(10)) else {
            panic!(
                "a CREATE had no reply {:?} into the delay:\n{}",
                t0.elapsed(),
                l.f.log_text()
            );
        };
        client = c;
        assert_eq!(
            r["status"],
            "STATUS_SUCCESS",
            "{r} {:?} into the delay\n{}",
            t0.elapsed(),
            l.f.log_text()
        );
        assert!(
            l.f.exited().is_none(),
            "filterd exited {:?} into the delay:\n{}",
            t0.elapsed(),
            l.f.log_text()
        );
        created.push(path);
    }
    eprintln!(
        "{} CREATEs acknowledged in {:?} over a 1.1 s round trip at a 4 s lease",
        created.len(),
        t0.elapsed()
    );
    let table = l.etcd_paths();
    let missing: Vec<_> = created.iter().filter(|p| !table.contains(*p)).collect();
    assert!(missing.is_empty(), "etcd lacks acknowledged {missing:?}");
}

/// A round trip (0.8 s, 0.4 s each way) at the minimum lease (2 s:
/// margin 0.5 s, renewals every 0.25 s) longer than half of TTL − margin
/// (0.75 s) but well under TTL − margin − the interval (1.25 s): renewals
/// pipelined on the kept stream, one every interval whatever is still
/// outstanding, each answer proving the lease from its own send time,
/// keep it. The owner still owns (`status` shows its lease standing) and
/// serves (a persistent CREATE, durable in etcd) through five lease
/// lengths. Before, a stream carried one renewal at a time, the next sent
/// only once the last was answered: 1.6 s between the send times of two
/// answers against the 1.5 s each proves, so the owner stepped down
/// (exit 75) about 1.5 s into the delay, though every answer came.
#[test]
fn pipelined_renewals_keep_the_lease_over_a_round_trip_above_half_of_it() {
    if !etcd_available("pipelined_renewals_keep_the_lease_over_a_round_trip_above_half_of_it") {
        return;
    }
    let (mut l, client, sid) = slow_link("pipelined", "2", Duration::from_millis(400));
    l.owner_throughout(client, sid, "0.8 s round trip at a 2 s lease");
}

/// The keepalive's stream opened over the slow link (the delay on before
/// filterd starts: it claims, and opens its stream, over it): a 2 s
/// round trip r (1 s each way) at a 10 s lease (TTL − margin 7.5 s).
/// The claim's own renewal (`renew_now`) counts from its send time; the
/// keepalive's stream opens once it is answered, its opening request its
/// first renewal, its answer counted: 2r = 4 s after that send time,
/// inside the 7.5 s. This shows the margin only: it caught etcd-client's
/// `lease_keep_alive` (which reads the opening answer itself, so the
/// first answer that counted came a round trip later: 4r = 8 s, and the
/// new owner stepped down; re-review rr44d, finding 3) while `renew_now`
/// took 2r, but since `renew_now` takes r that keepalive's first counted
/// answer comes at 3r = 6 s, inside 7.5 s too (re-review rr45d F3). The
/// store-level tests in `etcd.rs`,
/// `a_claims_renewal_over_a_slow_link_counts_its_opening_answer` and
/// `a_claim_answered_with_half_the_lease_but_not_a_round_trip_more_renews_it`,
/// catch it.
#[test]
fn a_keepalive_stream_opened_over_a_slow_link_counts_its_opening_answer() {
    if !etcd_available("a_keepalive_stream_opened_over_a_slow_link_counts_its_opening_answer") {
        return;
    }
    let (mut l, client, sid) = slow_link_from("openslow", "10", Duration::from_millis(1000), true);
    l.owner_throughout(client, sid, "2 s round trip from the start at a 10 s lease");
}

/// `filterctl handles` while etcd does not answer (a link delayed 30 s,
/// [`DelayProxy`]) and a persistent CREATE's commit waits: answered
/// within filterd's 1 s bound, not after the commit, with the durable
/// handle only (not the one whose CREATE waits), and saying so — on
/// stderr as `commit_wait` JSON with `--json` (the array keeps its
/// shape), in a `durable state only` line otherwise; `frontends`, asked
/// first during the stall (filterd took no durable copy of its rows), is
/// refused with a reason, exit 1, not left hanging. `status` shows the
/// lease's time left running down (the keepalive's renewals wait behind
/// the link too). Before, each listing waited for the commit until
/// filterctl timed out.
#[test]
fn listings_answer_with_what_is_durable_while_etcd_stalls() {
    if !etcd_available("listings_answer_with_what_is_durable_while_etcd_stalls") {
        return;
    }
    let (mut l, mut c, sid) = slow_link("stall-listings", "30", Duration::ZERO);
    let r = smb_persistent_create(&mut c, sid, "held");
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let sock = l.f.socket().to_string_lossy().into_owned();
    let ctl = |args: &[&str]| {
        let mut all = vec!["--socket", sock.as_str(), "--timeout-ms", "8000"];
        all.extend_from_slice(args);
        rkfilter_tests::filterctl_as_is(&all)
    };
    let lease_left = || {
        let v = ctl(&["status", "--json"]).json();
        v["lease_left_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("status on etcd shows the lease left: {v}"))
    };
    assert!(lease_left() > 0);
    l.proxy.set_delay(Duration::from_secs(30));
    let _pending = pending_create(c, sid, &l.f);
    let t0 = Instant::now();
    let out = ctl(&["handles", "--json"]);
    let took = t0.elapsed();
    assert_eq!(out.code, 0, "handles during the stall: {}", out.stderr);
    eprintln!("filterctl handles during the stall: {took:?}");
    assert!(took < Duration::from_secs(4), "handles took {took:?}");
    assert_eq!(
        paths_of(&out.json()),
        BTreeSet::from(["held".to_owned()]),
        "the durable handle only: {}",
        out.stdout
    );
    let wait: Value = out
        .stderr
        .split_once("commit_wait ")
        .and_then(|(_, w)| serde_json::from_str(w.trim()).ok())
        .unwrap_or_else(|| panic!("flags the wait on stderr: {}", out.stderr));
    // The bound counts from when commits stopped resolving (re-review
    // rr43a F4), a little before this listing came.
    assert!(wait["pending_for_ms"].as_u64() >= Some(1000), "{wait}");
    assert!(
        wait["waited_ms"].as_u64() <= wait["pending_for_ms"].as_u64(),
        "{wait}"
    );
    assert!(wait["handles_left_out"].as_u64() >= Some(1), "{wait}");
    assert!(
        wait["replies_awaiting_commit"].as_u64() >= Some(1),
        "{wait}"
    );
    let text = ctl(&["handles"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout.contains("held") && text.stdout.contains("durable state only"),
        "{}",
        text.stdout
    );
    let fronts = ctl(&["frontends"]);
    assert_eq!(fronts.code, 1, "{}{}", fronts.stdout, fronts.stderr);
    assert!(fronts.stderr.contains("durable state"), "{}", fronts.stderr);
    // The lease runs down: no renewal gets through the link.
    let first = lease_left();
    rkfilter_tests::wait_for("the lease left to go down", Duration::from_secs(5), || {
        (lease_left() < first).then_some(())
    });
    assert!(l.f.exited().is_none(), "{}", l.f.log_text());
}
