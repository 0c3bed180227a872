//! Review vU (round 10): attacks on the fanotify reader's plain files
//! (docs/ARCHITECTURE.md, "Local opens the reader decides"), against the
//! real filterd on a tmpfs export (root only). Counts, not timings: each
//! attack prints what it saw; only an invariant break fails it. They spawn
//! many looping openers (up to 320 processes), so they are `#[ignore]`d in
//! `make test`; run them on release binaries with
//! `VU_ROUNDS=50 VU_OPENERS=1 cargo test --release -p rkfilter-tests
//! --test local_plain_attacks -- --ignored --nocapture --test-threads 1`
//! (VU_OPENERS: 1–5 shell loops, 6 adds a 4-thread Python opener).
//!
//! Review wA (round 11) adds the `wa_` attacks (durable expiry, disconnect
//! and resume; files replaced under published ones, hard links,
//! `/proc/self/fd` reopens), run the same way with `WA_HOLD_MS` (0 by
//! default: how long, at most, each opener keeps the file open). The
//! inode-reuse defect it found has its regression test in `local.rs`
//! (`a_recovered_handle_does_not_decide_opens_of_a_file_reusing_its_inode`).

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

// Review wA (round 11): expiry, disconnect and resume of durable handles,
// files replaced under published ones, hard links and /proc/self/fd reopens,
// each racing openers that keep trying after a refusal. Same checks each:
// at every grant (or resume) of a handle whose share mode refuses local
// opens, no opener holds the file (`/proc/PID/fd`), and while that handle
// is live the reader allows nothing (`local_opens_allowed_by_reader` does
// not move) nor does anyone else (`local_opens_allowed`).

/// (allowed, by the reader, denied) local opens.
fn local_counts(s: &Scratch) -> (u64, u64, u64) {
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    match ctl.call(Request::Stats).unwrap().0 {
        Reply::Stats(st) => (
            st.local_opens_allowed,
            st.local_opens_allowed_by_reader,
            st.local_opens_denied,
        ),
        other => panic!("{other:?}"),
    }
}

/// Whether process `pid` (any of its threads: they share one table) has a
/// descriptor open on (dev, ino), `O_PATH` ones aside (they open nothing).
fn holds_inode(pid: u32, dev: u64, ino: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let o_path = |fd: &std::ffi::OsStr| {
        std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
            .ok()
            .and_then(|i| {
                i.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            })
            .is_some_and(|f| f & 0o10000000 != 0)
    };
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
        d.flatten().any(|e| {
            std::fs::metadata(e.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
                && !o_path(&e.file_name())
        })
    })
}

/// A Python opener of each path in `paths` (2 threads per path) that keeps
/// trying after a refusal: open (read-only or read-write, alternately),
/// hold it 0–`WA_HOLD_MS` ms (default 0), close, pause 0–2 ms. A path
/// `fd:NAME` is reopened through `/proc/self/fd` from an `O_PATH`
/// descriptor of NAME taken (and closed) each time.
fn stubborn_openers(paths: &[std::path::PathBuf]) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import sys, threading, os, random, time
def run(p, i):
    flags = os.O_RDONLY if i % 2 == 0 else os.O_RDWR
    while True:
        base = None
        try:
            if p.startswith("fd:"):
                base = os.open(p[3:], os.O_PATH)
                fd = os.open("/proc/self/fd/%d" % base, flags)
            else:
                fd = os.open(p, flags)
            if hold > 0:
                time.sleep(random.random() * hold)
            os.close(fd)
        except OSError:
            pass
        if base is not None:
            os.close(base)
        time.sleep(random.random() * 0.002)
hold = float(os.environ.get("WA_HOLD_MS", "0")) / 1000
ts = [threading.Thread(target=run, args=(p, i), daemon=True) for p in sys.argv[1:] for i in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
"#,
        )
        .args(paths)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// What a round of the wA attacks saw.
#[derive(Default, Debug)]
struct WaTally {
    granted: u64,
    refused: u64,
    resumed: u64,
    resume_failed: u64,
    /// Grants or resumes while an opener held the file.
    held_at_reply: u64,
    /// Holds during which an opener was seen holding the file.
    held_during_hold: u64,
    /// Local opens the reader allowed while a handle refusing them lived.
    reader_during_hold: u64,
    /// Local opens anyone allowed while a handle refusing them lived.
    allowed_during_hold: u64,
}

impl WaTally {
    /// `h` (a grant or resume of a handle refusing local opens) came back
    /// now: nobody may hold its file, then or while it is held until ten
    /// more local opens are refused (`/proc` looked at all along); with
    /// `counted` (no other file's opens allowed meanwhile), no local open
    /// may be allowed meanwhile, by the reader or anyone.
    fn check_hold(
        &mut self,
        s: &Scratch,
        h: &libfilter::client::OpenedHandle,
        kid: &Child,
        counted: bool,
        what: &str,
    ) {
        let (dev, ino) = (h.info.file.dev, h.info.file.ino);
        if holds_inode(kid.id(), dev, ino) {
            self.held_at_reply += 1;
            eprintln!("{what}: granted while an opener holds the file");
        }
        let (a0, r0, d0) = local_counts(s);
        let mut seen = false;
        wait_for("refusals while held", Duration::from_secs(20), || {
            seen |= holds_inode(kid.id(), dev, ino);
            (local_counts(s).2 >= d0 + 10).then_some(())
        });
        if seen {
            self.held_during_hold += 1;
            eprintln!("{what}: an opener held the file while a handle refusing it lived");
        }
        if !counted {
            return;
        }
        let (a1, r1, _) = local_counts(s);
        if r1 != r0 {
            self.reader_during_hold += r1 - r0;
            eprintln!(
                "{what}: the reader allowed {} local opens while a handle refusing them lived",
                r1 - r0
            );
        }
        if a1 != a0 {
            self.allowed_during_hold += a1 - a0;
            eprintln!(
                "{what}: {} local opens allowed while a handle refusing them lived",
                a1 - a0
            );
        }
    }

    /// Fails on any break, the reader's own told apart from the window
    /// docs/ARCHITECTURE.md ("Local opens the reader decides", "What stays
    /// as it was") leaves open to the engine's path too.
    fn assert_ok(&self) {
        assert_eq!(
            self.reader_during_hold, 0,
            "the reader allowed opens a live handle refuses: {self:?}"
        );
        assert!(
            self.held_at_reply == 0 && self.held_during_hold == 0 && self.allowed_during_hold == 0,
            "an open allowed before the grant, not yet in /proc when it was probed, held the file after it (the known window): {self:?}"
        );
    }
}

/// Opens `path` sharing write only (local opens, read access, conflict)
/// with `durability` through `fe`, retrying refusals (openers caught
/// holding the file) up to 500 times.
fn open_refusing_locals(
    fe: &FilterClient,
    path: &str,
    durability: Durability,
    tally: &mut WaTally,
) -> Option<libfilter::client::OpenedHandle> {
    let mut r = req(path, Rights::WRITE, None);
    r.durability = durability;
    for _ in 0..500 {
        match fe.open(r.clone()) {
            Ok(h) => {
                tally.granted += 1;
                return Some(h);
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::SharingViolation), "{e}");
                tally.refused += 1;
            }
        }
    }
    None
}

/// A durable handle refusing local opens, granted between openers' opens;
/// its frontend then disconnects (timeout 20, 100 or 400 ms) while the
/// openers go on, and a new frontend of the same instance resumes it at
/// once: a resume that succeeds must find no local open allowed since the
/// disconnect (an allowed one purges the handle), and no opener holding the
/// file. `keep_writer`: another handle sharing everything keeps the file
/// published throughout; without it the file goes stateless (lingering,
/// then ignored) when the durable handle goes.
fn durable_expiry_rounds(name: &str, keep_writer: bool) {
    let Some(s) = Scratch::with_tmpfs(name) else {
        return;
    };
    let _d = Filterd::start_mediated(&s, &[]);
    let t = s.root().join("f.txt");
    std::fs::write(&t, b"x").unwrap();
    let fe0 = frontend(&s);
    let first = keep_writer.then(|| {
        let mut w = req("f.txt", Rights::ALL, None);
        w.access = Access::new(Rights::WRITE).unwrap();
        fe0.open(w).unwrap()
    });
    let mut kid = stubborn_openers(std::slice::from_ref(&t));
    // Its threads running (a file without state is ignored: its opens
    // are not counted).
    wait_for("openers", Duration::from_secs(20), || {
        (std::fs::read_dir(format!("/proc/{}/task", kid.id())).map_or(0, |d| d.count()) > 2)
            .then_some(())
    });
    let mut tally = WaTally::default();
    let alice = ClientId::new("alice").unwrap();
    for round in 0..rounds() {
        let timeout_ms = [20, 100, 400][round % 3];
        let fe1 = rkfilter_tests::attach(&s.socket(), "smb", "smb-2");
        let Some(h) = open_refusing_locals(
            &fe1,
            "f.txt",
            Durability::Durable { timeout_ms },
            &mut tally,
        ) else {
            continue;
        };
        tally.check_hold(&s, &h, &kid, true, "durable open");
        let key = h.info.key;
        let (at_disconnect, ..) = local_counts(&s);
        drop(h);
        drop(fe1);
        // The same instance again: attached once filterd has read the
        // old connection's end.
        let fe2 = wait_for("re-attach", Duration::from_secs(10), || {
            FilterClient::connect_frontend(
                &s.socket(),
                Protocol::new("smb").unwrap(),
                InstanceName::new("smb-2").unwrap(),
            )
            .ok()
        });
        match fe2.resume(alice.clone(), key) {
            Ok(h) => {
                tally.resumed += 1;
                let (now, ..) = local_counts(&s);
                if now != at_disconnect {
                    tally.allowed_during_hold += now - at_disconnect;
                    eprintln!(
                        "resumed a handle refusing local opens after {} were allowed",
                        now - at_disconnect
                    );
                }
                tally.check_hold(&s, &h, &kid, true, "resume");
                fe2.close(key).unwrap();
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::NoSuchHandle), "{e}");
                tally.resume_failed += 1;
            }
        }
    }
    let (allowed, by_reader, denied) = local_counts(&s);
    eprintln!(
        "wA {name}: {tally:?}; local opens allowed {allowed} (by reader {by_reader}), denied {denied}"
    );
    let _ = kid.kill();
    let _ = kid.wait();
    if let Some(h) = first {
        fe0.close(h.info.key).unwrap();
    }
    tally.assert_ok();
}

#[test]
#[ignore = "stress: run by hand on release binaries (module doc)"]
fn wa_durable_expiry_and_resume_against_openers_published() {
    durable_expiry_rounds("wa-exp-pub", true);
}

#[test]
#[ignore = "stress: run by hand on release binaries (module doc)"]
fn wa_durable_expiry_and_resume_against_openers_stateless() {
    durable_expiry_rounds("wa-exp-bare", false);
}

/// A published file replaced under its openers (removed and created anew,
/// or another renamed over it) while its handle keeps the old inode, then
/// opened through a hard link and through `/proc/self/fd` reopens: each
/// round, handles refusing local opens are granted on the new file (whose
/// opens the old one's publication must not decide) and on the published
/// one by both its names.
#[test]
#[ignore = "stress: run by hand on release binaries (module doc)"]
fn wa_replaced_linked_and_proc_fd_against_openers() {
    let Some(s) = Scratch::with_tmpfs("wa-repl") else {
        return;
    };
    let _d = Filterd::start_mediated(&s, &[]);
    let (t, l, g) = (
        s.root().join("f.txt"),
        s.root().join("l.txt"),
        s.root().join("g.txt"),
    );
    std::fs::write(&t, b"x").unwrap();
    let fe = frontend(&s);
    let writer = || {
        let mut w = req("f.txt", Rights::ALL, None);
        w.access = Access::new(Rights::WRITE).unwrap();
        fe.open(w).unwrap()
    };
    let mut tally = WaTally::default();
    let mut h0 = writer();
    let _ = std::fs::hard_link(&t, &l);
    let openers_of = |t: &std::path::Path, l: &std::path::Path| {
        stubborn_openers(&[
            t.to_path_buf(),
            l.to_path_buf(),
            std::path::PathBuf::from(format!("fd:{}", t.display())),
        ])
    };
    let mut kid = openers_of(&t, &l);
    let (mut replaced, mut same_inode) = (0, 0);
    for round in 0..rounds() {
        let by_reader = local_counts(&s).1;
        wait_for("reader-allowed opens", Duration::from_secs(20), || {
            (local_counts(&s).1 > by_reader + 20).then_some(())
        });
        // The published file by its link, then its name.
        for p in ["l.txt", "f.txt"] {
            if let Some(h) = open_refusing_locals(&fe, p, Durability::None, &mut tally) {
                tally.check_hold(&s, &h, &kid, true, p);
                fe.close(h.info.key).unwrap();
            }
        }
        // Replaced while the openers go on (the link and the /proc/self/fd
        // reopens still reach the old inode, the name the new one).
        let old = h0.info.file;
        match round % 3 {
            0 => {
                std::fs::remove_file(&t).unwrap();
                std::fs::write(&t, b"y").unwrap();
            }
            1 => {
                std::fs::write(&g, b"z").unwrap();
                std::fs::rename(&g, &t).unwrap();
            }
            _ => continue,
        }
        replaced += 1;
        let new = {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&t).unwrap();
            (m.dev(), m.ino())
        };
        if new == (old.dev, old.ino) {
            same_inode += 1;
        }
        if let Some(h) = open_refusing_locals(&fe, "f.txt", Durability::None, &mut tally) {
            tally.check_hold(&s, &h, &kid, false, "replaced f.txt");
            fe.close(h.info.key).unwrap();
        }
        // Next round: the new file published, reached by all three routes.
        let _ = kid.kill();
        let _ = kid.wait();
        fe.close(h0.info.key).unwrap();
        h0 = writer();
        let _ = std::fs::remove_file(&l);
        std::fs::hard_link(&t, &l).unwrap();
        kid = openers_of(&t, &l);
    }
    let (allowed, by_reader, denied) = local_counts(&s);
    eprintln!(
        "wA replaced: {tally:?}; replaced {replaced} (same inode {same_inode}); local opens allowed {allowed} (by reader {by_reader}), denied {denied}"
    );
    let _ = kid.kill();
    let _ = kid.wait();
    fe.close(h0.info.key).unwrap();
    tally.assert_ok();
}
