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
//! lease run out first, as behind a stalled member).

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

static ANY_ARMED: AtomicBool = AtomicBool::new(false);
static ARMED: OnceLock<Mutex<HashMap<String, (u64, Action)>>> = OnceLock::new();

/// Reads the environment once at start.
pub fn init() {
    let spec = std::env::var(ENV).unwrap_or_default();
    let mut map = HashMap::new();
    'items: for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // name[:n][:action]: each part after the name is a count or an action.
        let mut parts = item.split(':');
        let name = parts.next().unwrap_or_default();
        let (mut n, mut action) = (1, Action::Kill);
        for p in parts {
            if let Ok(count) = p.parse() {
                n = count;
            } else if let Some(a) = parse_action(p) {
                action = a;
            } else {
                tracing::error!(
                    failpoint = item,
                    "unknown failpoint action (kill, panic, sleepMS, fail): ignored"
                );
                continue 'items;
            }
        }
        map.insert(name.to_owned(), (n, action));
    }
    if !map.is_empty() {
        tracing::warn!(failpoints = %spec, "failpoints armed: this daemon will kill, stall or panic itself on purpose");
        ANY_ARMED.store(true, Ordering::Release);
    }
    let _ = ARMED.set(Mutex::new(map));
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
