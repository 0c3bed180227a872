//! Named crash points, compiled in and armed by an environment variable.
//!
//! `RKFILTER_FAILPOINTS=name[:n][:action][,...]` acts the n-th time (default:
//! first) execution reaches `hit(name)`, so tests can prove exactly-once and
//! crash consistency at every step of a mutating path. Actions:
//! - `kill` (the default): SIGKILL the daemon, like `kill -9`;
//! - `panic`: panic on the thread that got there (filterd's panic hook
//!   aborts, so the whole process ends rather than staying half alive);
//! - `sleepMS`: stall that thread for MS milliseconds — a slow fsync, to
//!   widen a window that a test then attacks;
//! - `fail`: make the step at that point fail (`hit` returns true; only
//!   points whose callers act on it, see `fails`).
//!
//! Unarmed, a hit costs one relaxed atomic load.
//!
//! Points (see docs/ARCHITECTURE.md): `commit.before`, `commit.after`
//! (durable, reply not yet sent), `reply.before_send`, `lock.granted` (a
//! reply granting a byte-range lock, its commit durable, about to be
//! sent), `open.after_fs`
//! (file created/opened, nothing recorded), `intent.after_commit`,
//! `intent.after_fs`, `fs.before_change` (a rename, remove, size change or
//! create prepared, its system call not yet made: right before the owner fence,
//! `engine::fs::HostFs::fence`), `engine.request` (the engine thread, per request),
//! `local.unignore` (removing a file's ignore mark; `fail` makes it fail),
//! `local.probe` (the write-lease probe, its lease held), `local.scan`
//! (a `/proc` scan for a file's local openers begins), `fs.prove_beneath`
//! (a file opened by kernel handle: its name read, not yet resolved
//! beneath the root; `sleepMS` lets a test rename it there),
//! `request.NAME` (the engine begins a request of that kind, `NAME` as
//! `proto::Request::name` has it: `request.set_delete_on_close`),
//! `shutdown.after_engine` (stopping: the engine thread has returned),
//! `open.records_batched` / `close.records_batched` (an open or close
//! that carries records: the handle change and the records are in the
//! batch, not yet committed); with `--store etcd://…`, `etcd.txn.sent`
//! (a commit Txn was sent and answered, the answer not yet handled; `fail`
//! drops the answer, so the attempt counts as unanswered and the
//! generation moves on) and `etcd.gen.moved` (the commit generation was
//! moved past an unanswered Txn, its retry not yet sent; `fail` stops the
//! daemon as owner there), and `etcd.claim.before_txn` (a claim Txn
//! about to be sent under the lease it names; `sleepMS` there lets the
//! lease run out first, as behind a stalled member), and
//! `etcd.claim.before_read` (claimed, the table not read yet), and
//! `etcd.owner_watch` (claimed, the watch of the owner key about to be
//! made; `fail` makes none, as a watch on a member cut off from the
//! leader never tells).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The environment variable that arms failpoints.
pub const ENV: &str = "RKFILTER_FAILPOINTS";

/// What an armed point does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kill,
    Panic,
    Sleep(u64),
    Fail,
}

fn parse_action(s: &str) -> Option<Action> {
    match s {
        "" | "kill" => Some(Action::Kill),
        "panic" => Some(Action::Panic),
        "fail" => Some(Action::Fail),
        _ => s.strip_prefix("sleep")?.parse().ok().map(Action::Sleep),
    }
}

/// Every point a `hit`/`fails` (or the etcd store's hook) names, besides
/// `request.NAME` for each [`libfilter::proto::Request::NAMES`]: [`init`]
/// refuses any other name, so a misspelled or renamed point cannot be
/// armed and then never fire (a test reads the sources to keep this list
/// and the call sites equal).
pub const POINTS: &[&str] = &[
    "open.after_fs",
    "open.records_batched",
    "close.records_batched",
    "close.refuse",
    "commit.before",
    "commit.after",
    "reply.before_send",
    "lock.granted",
    "intent.after_commit",
    "intent.after_fs",
    "fs.before_change",
    "fs.prove_beneath",
    "engine.request",
    "local.unignore",
    "local.probe",
    "local.scan",
    "shutdown.after_engine",
    "etcd.txn.sent",
    "etcd.gen.moved",
    "etcd.claim.before_txn",
    "etcd.claim.before_read",
    "etcd.owner_watch",
];

/// Whether `name` is a point filterd has.
fn known(name: &str) -> bool {
    POINTS.contains(&name)
        || name
            .strip_prefix("request.")
            .is_some_and(|r| libfilter::proto::Request::NAMES.contains(&r))
}

/// Parses [`ENV`]'s value: each armed point with its count and action, or
/// why the spec is refused (an unknown point or action).
fn parse(spec: &str) -> Result<HashMap<String, (u64, Action)>, String> {
    let mut map = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // name[:n][:action]: each part after the name is a count or an action.
        let mut parts = item.split(':');
        let name = parts.next().unwrap_or_default();
        if !known(name) {
            return Err(format!(
                "{ENV}: unknown failpoint {name:?} in {item:?} (docs/ARCHITECTURE.md, Failpoints)"
            ));
        }
        let (mut n, mut action) = (1, Action::Kill);
        for p in parts {
            if let Ok(count) = p.parse() {
                n = count;
            } else if let Some(a) = parse_action(p) {
                action = a;
            } else {
                return Err(format!(
                    "{ENV}: unknown failpoint action {p:?} in {item:?} (kill, panic, sleepMS, fail)"
                ));
            }
        }
        map.insert(name.to_owned(), (n, action));
    }
    Ok(map)
}

static ANY_ARMED: AtomicBool = AtomicBool::new(false);
static ARMED: OnceLock<Mutex<HashMap<String, (u64, Action)>>> = OnceLock::new();

/// Reads the environment once at start; an unknown point or action is an
/// error (filterd then refuses to start), never a point that silently
/// does not fire.
pub fn init() -> Result<(), String> {
    let spec = std::env::var(ENV).unwrap_or_default();
    let map = parse(&spec)?;
    if !map.is_empty() {
        tracing::warn!(failpoints = %spec, "failpoints armed: this daemon will kill, stall or panic itself on purpose");
        ANY_ARMED.store(true, Ordering::Release);
    }
    let _ = ARMED.set(Mutex::new(map));
    Ok(())
}

/// The environment variable naming feature bits (`proto::FEATURE_*`, a
/// decimal or `0x` mask) this daemon grants no frontend, as a filterd
/// built before them would: for tests of a frontend in front of an older
/// daemon (a rolling upgrade).
pub const WITHHOLD_ENV: &str = "RKFILTER_WITHHOLD_FEATURES";

/// The feature bits [`WITHHOLD_ENV`] names (0 unset; read once).
pub fn withheld_features() -> u64 {
    static WITHHELD: OnceLock<u64> = OnceLock::new();
    *WITHHELD.get_or_init(|| {
        let Ok(v) = std::env::var(WITHHOLD_ENV) else {
            return 0;
        };
        let v = v.trim();
        let mask = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        match mask {
            Ok(m) => {
                tracing::warn!(
                    withheld = m,
                    "{WITHHOLD_ENV}: these feature bits are granted to no frontend"
                );
                m
            }
            Err(_) => {
                tracing::error!(value = v, "{WITHHOLD_ENV}: not a number; ignored");
                0
            }
        }
    })
}

/// [`hit`] of `request.NAME` for a frontend's or controller's request
/// named `name` (`proto::Request::name`: `request.set_delete_on_close`),
/// as the engine begins it. The name is made only while something is
/// armed.
pub fn hit_request(name: &str) {
    if ANY_ARMED.load(Ordering::Relaxed) {
        hit(&format!("request.{name}"));
    }
}

/// Acts if `name` is armed and this is its n-th hit.
pub fn hit(name: &str) {
    let _ = fails(name);
}

/// [`hit`], and whether the step at `name` is to fail now (armed with
/// `fail`): the caller then takes its failure path.
pub fn fails(name: &str) -> bool {
    if !ANY_ARMED.load(Ordering::Relaxed) {
        return false;
    }
    let fire = ARMED
        .get()
        .and_then(|m| m.lock().ok())
        .and_then(|mut m| match m.get_mut(name) {
            Some((n, a)) if *n <= 1 => {
                let a = *a;
                // Fired once; a sleep point stays quiet afterwards.
                m.remove(name);
                Some(a)
            }
            Some((n, _)) => {
                *n -= 1;
                None
            }
            None => None,
        });
    match fire {
        None => false,
        Some(Action::Fail) => {
            eprintln!("failpoint {name}: failing");
            true
        }
        Some(Action::Sleep(ms)) => {
            eprintln!("failpoint {name}: stalling {ms} ms");
            std::thread::sleep(Duration::from_millis(ms));
            false
        }
        Some(Action::Panic) => panic!("failpoint {name}: panicking on purpose"),
        Some(Action::Kill) => {
            eprintln!("failpoint {name}: killing filterd");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_points_and_actions_are_refused() {
        let m = parse("commit.before:2:sleep300, request.set_delete_on_close:fail").expect("known");
        assert_eq!(m.get("commit.before"), Some(&(2, Action::Sleep(300))));
        assert_eq!(
            m.get("request.set_delete_on_close"),
            Some(&(1, Action::Fail))
        );
        assert!(parse("").expect("empty").is_empty());
        for bad in [
            "commit.befor",
            "commit.before,lock.grant",
            "request.nonesuch",
            "request.",
            "commit.before:sleepy",
            "open.after_fs:2:explode",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    /// The source files of filterd and libfilter (where the etcd store's
    /// points are).
    fn sources() -> Vec<(std::path::PathBuf, String)> {
        fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
            for e in std::fs::read_dir(dir).expect("source dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).expect("source file");
                    out.push((p, text));
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut out = Vec::new();
        walk(&root.join("src"), &mut out);
        walk(&root.join("../libfilter/src"), &mut out);
        assert!(out.len() > 10, "sources not found");
        out
    }

    /// Every literal point a call site names is in [`POINTS`], and every
    /// entry of [`POINTS`] is named by some call site and documented: the
    /// list cannot drift from the code.
    #[test]
    fn points_are_the_call_sites() {
        const CALLS: [&str; 4] = [
            "failpoint::hit(\"",
            "failpoint::fails(\"",
            "self.failpoint(\"",
            "reply_point = Some(\"",
        ];
        let mut named = std::collections::BTreeSet::new();
        for (path, text) in sources() {
            if path.ends_with("failpoint.rs") {
                continue;
            }
            for call in CALLS {
                for (at, _) in text.match_indices(call) {
                    let rest = &text[at + call.len()..];
                    let end = rest.find('"').expect("closing quote");
                    named.insert(rest[..end].to_owned());
                }
            }
            // A point passed on in a variable (`p`: a reply's point, set
            // by `reply_point = Some("…")` above) is one of those literals;
            // any other call naming its point at run time is a new form.
            for call in ["failpoint::hit(", "failpoint::fails(", "self.failpoint("] {
                for (at, _) in text.match_indices(call) {
                    let rest = &text[at + call.len()..];
                    assert!(
                        rest.starts_with('"') || rest.starts_with("p)"),
                        "{}: a point named at run time: {call}{}; add its names to POINTS and this test",
                        path.display(),
                        rest.lines().next().unwrap_or_default()
                    );
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            POINTS.iter().map(|p| (*p).to_owned()).collect();
        assert_eq!(named, listed, "call sites vs failpoint::POINTS");
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ARCHITECTURE.md"),
        )
        .expect("docs");
        for p in POINTS {
            assert!(
                docs.contains(&format!("| `{p}` |")),
                "{p} not in the docs' table"
            );
        }
    }
}
