//! Review vU (round 10): attacks on the fanotify reader's plain files
//! (docs/ARCHITECTURE.md, "Local opens the reader decides"), against the
//! real filterd on a tmpfs export (root only). Counts, not timings: each
//! attack prints what it saw; only an invariant break fails it. They spawn
//! many looping openers (up to 320 processes), so they are `#[ignore]`d in
//! `make test`; run them on release binaries with
//! `VU_ROUNDS=50 VU_OPENERS=1 cargo test --release -p rkfilter-tests
//! --test local_plain_attacks -- --ignored --nocapture --test-threads 1`
//! (VU_OPENERS: 1–5 shell loops, 6 adds a 4-thread Python opener).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::lease::LeaseKey;
use libfilter::model::*;
use libfilter::proto::{ErrorCode, OpenRequest, Reply, Request};
use rkfilter_tests::{wait_for, Filterd, Scratch};

fn frontend(s: &Scratch) -> FilterClient {
    rkfilter_tests::attach(&s.socket(), "smb", "smb-1")
}

fn req(path: &str, share: Rights, lease: Option<(LeaseKey, &str)>) -> OpenRequest {
    rkfilter_tests::rw_open_if(path, share, lease)
}

fn allowed(s: &Scratch) -> u64 {
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    match ctl.call(Request::Stats).unwrap().0 {
        Reply::Stats(st) => st.local_opens_allowed,
        other => panic!("{other:?}"),
    }
}

fn holds(pid: u32, t: &std::path::Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
        d.flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == t))
    })
}

/// Openers of every kind, each looping until an open of `t` is refused.
fn openers(t: &std::path::Path) -> Vec<Child> {
    let scripts = [
        r#"while exec 3< "$0"; do exec 3<&-; done"#,
        r#"while exec 3>> "$0"; do exec 3>&-; done"#,
        r#"while exec 3<> "$0"; do exec 3>&-; done"#,
        r#"while exec 3< "$0"; do exec 3<&-; done"#,
        r#"while "$0"; do :; done"#,
    ];
    let mut v: Vec<Child> = scripts
        .iter()
        .map(|s| {
            Command::new("sh")
                .arg("-c")
                .arg(s)
                .arg(t)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let n: usize = std::env::var("VU_OPENERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    if n < 6 {
        v.truncate(n);
        return v;
    }
    v.push(
        Command::new("python3")
            .arg("-c")
            .arg(
                r#"
import sys, threading, os
def run(flags):
    while True:
        try:
            fd = os.open(sys.argv[1], flags)
        except OSError:
            os._exit(0)
        os.close(fd)
ts = [threading.Thread(target=run, args=(f,)) for f in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDONLY)]
[t.start() for t in ts]
[t.join() for t in ts]
"#,
            )
            .arg(t)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    v
}

fn setup(name: &str, file: &str) -> Option<(Scratch, Filterd, FilterClient, std::path::PathBuf)> {
    let s = Scratch::with_tmpfs(name)?;
    let d = Filterd::start_mediated(&s, &[]);
    let t = s.root().join(file);
    std::fs::write(&t, b"#!/bin/sh\n:\n").unwrap();
    std::fs::set_permissions(&t, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fe = frontend(&s);
    Some((s, d, fe, t))
}

fn rounds() -> usize {
    std::env::var("VU_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Share none racing many local openers: a granted open with a local
/// opener holding the file is a share-mode break.
#[test]
#[ignore = "stress: run by hand on release binaries (module doc)"]
fn vu_share_none_against_many_openers() {
    let Some((s, _d, fe, t)) = setup("vu-sn", "a.sh") else {
        return;
    };
    let mut writer = req("a.sh", Rights::ALL, None);
    writer.access = Access::new(Rights::WRITE).unwrap();
    let first = fe.open(writer).unwrap();
    let (mut granted, mut refused, mut broken) = (0, 0, 0);
    for _ in 0..rounds() {
        let before = allowed(&s);
        let mut kids = openers(&t);
        wait_for("openers", Duration::from_secs(20), || {
            (allowed(&s) > before + 20).then_some(())
        });
        match fe.open(req("a.sh", Rights::WRITE, None)) {
            Ok(h) => {
                granted += 1;
                let held: Vec<u32> = kids
                    .iter()
                    .map(|k| k.id())
                    .filter(|p| holds(*p, &t))
                    .collect();
                if !held.is_empty() {
                    broken += 1;
                    eprintln!("granted share none while {held:?} hold the file");
                }
                fe.close(h.info.key).unwrap();
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::SharingViolation), "{e}");
                refused += 1;
            }
        }
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        let _ = std::fs::File::open(&t);
    }
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let by_reader = match ctl.call(Request::Stats).map(|r| r.0) {
        Ok(Reply::Stats(st)) => st.local_opens_allowed_by_reader,
        _ => 0,
    };
    eprintln!("VU share-none: granted {granted}, refused {refused}, broken {broken}; allowed {} (by reader {by_reader})", allowed(&s));
    fe.close(first.info.key).unwrap();
    assert_eq!(broken, 0);
}

/// An RWH lease requested while local openers run: write caching granted
/// while a local opener holds the file is counted.
#[test]
#[ignore = "stress: run by hand on release binaries (module doc)"]
fn vu_lease_against_many_openers() {
    let Some((s, _d, fe, t)) = setup("vu-lease", "b.sh") else {
        return;
    };
    let mut writer = req("b.sh", Rights::ALL, None);
    writer.access = Access::new(Rights::WRITE).unwrap();
    let first = fe.open(writer).unwrap();
    let (mut w, mut nw, mut broken) = (0, 0, 0);
    for _ in 0..rounds() {
        let before = allowed(&s);
        let mut kids = openers(&t);
        wait_for("openers", Duration::from_secs(20), || {
            (allowed(&s) > before + 20).then_some(())
        });
        let key = LeaseKey(uuid::Uuid::new_v4());
        let h = fe
            .open(req("b.sh", Rights::ALL, Some((key, "RWH"))))
            .unwrap();
        let st = h
            .info
            .lease
            .map(|l| l.state.to_string())
            .unwrap_or_default();
        let held = kids.iter().any(|k| holds(k.id(), &t));
        if st.contains('W') {
            w += 1;
            if held {
                broken += 1;
                eprintln!("write caching {st} granted while a local opener holds the file");
            }
        } else {
            nw += 1;
        }
        fe.close(h.info.key).unwrap();
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
    eprintln!("VU lease: with W {w}, without W {nw}, W while held {broken}");
    fe.close(first.info.key).unwrap();
}

/// kill -9 of filterd while the reader allows openers' opens itself: no
/// opener hangs (every permission event is answered by the kernel once
/// the group is gone).
#[test]
#[ignore = "stress: run by hand on release binaries (module doc)"]
fn vu_kill9_while_reader_allows() {
    let Some((s, mut d, fe, t)) = setup("vu-k9", "c.sh") else {
        return;
    };
    let mut writer = req("c.sh", Rights::ALL, None);
    writer.access = Access::new(Rights::WRITE).unwrap();
    let _first = fe.open(writer).unwrap();
    for _ in 0..rounds().min(5) {
        let before = allowed(&s);
        let mut kids = openers(&t);
        wait_for("openers", Duration::from_secs(20), || {
            (allowed(&s) > before + 20).then_some(())
        });
        d.kill9();
        // Opens go on: each within the bound.
        for _ in 0..3 {
            let st = Command::new("timeout")
                .args(["5", "cat"])
                .arg(&t)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "a local open hung or failed after kill -9");
        }
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        d = Filterd::start_mediated(&s, &[]);
        let fe2 = frontend(&s);
        let mut writer = req("c.sh", Rights::ALL, None);
        writer.access = Access::new(Rights::WRITE).unwrap();
        let h = fe2.open(writer).unwrap();
        let _ = std::fs::File::open(&t);
        std::mem::forget(h);
        std::mem::forget(fe2);
    }
    eprintln!("VU kill9: no opener hung");
}

/// More files than the reader's table (64) and more openers than its
/// record (256) between wake-ups: every share-none open of a file a live
/// opener holds is refused, and granted once the openers are gone.
#[test]
#[ignore = "stress: run by hand on release binaries (module doc)"]
fn vu_many_files_many_openers() {
    let Some(s) = Scratch::with_tmpfs("vu-many") else {
        return;
    };
    let _d = Filterd::start_mediated(&s, &[]);
    let fe = frontend(&s);
    let names: Vec<String> = (0..80).map(|i| format!("m{i}.txt")).collect();
    let mut firsts = Vec::new();
    for n in &names {
        std::fs::write(s.root().join(n), b"x").unwrap();
        let mut writer = req(n, Rights::ALL, None);
        writer.access = Access::new(Rights::WRITE).unwrap();
        firsts.push(fe.open(writer).unwrap());
    }
    // 80 files x 4 openers: each loops opening its file.
    let mut kids = Vec::new();
    for n in &names {
        for _ in 0..4 {
            kids.push(
                Command::new("sh")
                    .arg("-c")
                    .arg(r#"while exec 3< "$0"; do exec 3<&-; done"#)
                    .arg(s.root().join(n))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
    }
    let before = allowed(&s);
    wait_for("openers", Duration::from_secs(30), || {
        (allowed(&s) > before + 5000).then_some(())
    });
    let (mut granted, mut broken) = (0, 0);
    for (i, n) in names.iter().enumerate() {
        if let Ok(h) = fe.open(req(n, Rights::WRITE, None)) {
            granted += 1;
            let t = s.root().join(n);
            if kids[i * 4..i * 4 + 4].iter().any(|k| holds(k.id(), &t)) {
                broken += 1;
            }
            fe.close(h.info.key).unwrap();
        }
    }
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let by_reader = match ctl.call(Request::Stats).map(|r| r.0) {
        Ok(Reply::Stats(st)) => st.local_opens_allowed_by_reader,
        _ => 0,
    };
    eprintln!(
        "VU many: granted {granted}/80, broken {broken}; allowed {} (by reader {by_reader})",
        allowed(&s)
    );
    for k in &mut kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    // Openers gone: share none is granted on every file.
    for n in &names {
        let h = fe.open(req(n, Rights::WRITE, None)).unwrap();
        fe.close(h.info.key).unwrap();
    }
    assert_eq!(broken, 0);
}

/// filterd's commits slowed (every fdatasync delayed 100 ms, strace):
/// persistent opens sharing write but not read race a local opener while
/// earlier commits are still on their way; no grant while it holds.
#[test]
#[ignore = "stress: run by hand on release binaries (module doc)"]
fn vu_slow_commits_against_openers() {
    let Some((s, d, fe, t)) = setup("vu-slow", "e.sh") else {
        return;
    };
    let mut writer = req("e.sh", Rights::ALL, None);
    writer.access = Access::new(Rights::WRITE).unwrap();
    let first = fe.open(writer).unwrap();
    let _st = rkfilter_tests::Strace::attach(
        d.pid(),
        &s.root().with_extension("strace"),
        &["fdatasync"],
        &["fdatasync:delay_enter=100000"],
    );
    let (mut granted, mut refused, mut broken) = (0, 0, 0);
    for _ in 0..rounds() {
        let before = allowed(&s);
        let mut kids = openers(&t);
        wait_for("openers", Duration::from_secs(20), || {
            (allowed(&s) > before + 20).then_some(())
        });
        let mut p = req("e.sh", Rights::WRITE, None);
        p.durability = Durability::Persistent { timeout_ms: 60_000 };
        match fe.open(p) {
            Ok(h) => {
                granted += 1;
                if kids.iter().any(|k| holds(k.id(), &t)) {
                    broken += 1;
                }
                fe.close(h.info.key).unwrap();
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::SharingViolation), "{e}");
                refused += 1;
            }
        }
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        let _ = std::fs::File::open(&t);
    }
    eprintln!("VU slow commits: granted {granted}, refused {refused}, broken {broken}");
    fe.close(first.info.key).unwrap();
    assert_eq!(broken, 0);
}
