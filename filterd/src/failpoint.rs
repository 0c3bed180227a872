//! Named crash points, compiled in and armed by an environment variable.
//!
//! `RKFILTER_FAILPOINTS=name[:n][:panic][,...]` makes the daemon SIGKILL
//! itself the n-th time (default: first) execution reaches `hit(name)`, so
//! tests can prove exactly-once and crash consistency at every step of a
//! mutating path. With `:panic` the thread panics there instead, which
//! proves that a panic anywhere ends the daemon (see `abort_on_panic` in
//! main) rather than leaving it half alive. Unarmed, a hit costs one relaxed
//! atomic load.
//!
//! Points (see docs/ARCHITECTURE.md): `commit.before`, `commit.after`
//! (durable, reply not yet sent), `reply.before_send`, `open.after_fs`
//! (file created/opened, nothing recorded), `intent.after_commit`,
//! `intent.after_fs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The environment variable that arms failpoints.
pub const ENV: &str = "RKFILTER_FAILPOINTS";

/// What an armed point does when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// SIGKILL the daemon, like `kill -9`.
    Kill,
    /// Panic on the thread that reached it.
    Panic,
}

static ANY_ARMED: AtomicBool = AtomicBool::new(false);
static ARMED: OnceLock<Mutex<HashMap<String, (u64, Action)>>> = OnceLock::new();

/// Parses one `name[:n][:panic]` item.
fn parse_item(item: &str) -> (String, u64, Action) {
    let mut parts = item.split(':');
    let name = parts.next().unwrap_or_default().to_owned();
    let (mut n, mut action) = (1, Action::Kill);
    for p in parts {
        match p {
            "panic" => action = Action::Panic,
            "kill" => action = Action::Kill,
            other => n = other.parse().unwrap_or(1),
        }
    }
    (name, n, action)
}

/// Reads the environment once at start.
pub fn init() {
    let spec = std::env::var(ENV).unwrap_or_default();
    let mut map = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, n, action) = parse_item(item);
        map.insert(name, (n, action));
    }
    if !map.is_empty() {
        tracing::warn!(failpoints = %spec, "failpoints armed: this daemon will kill itself on purpose");
        ANY_ARMED.store(true, Ordering::Release);
    }
    let _ = ARMED.set(Mutex::new(map));
}

/// Crashes the process (SIGKILL, like `kill -9`, or a panic) if `name` is
/// armed and this is its n-th hit.
pub fn hit(name: &str) {
    if !ANY_ARMED.load(Ordering::Relaxed) {
        return;
    }
    let fire = ARMED
        .get()
        .and_then(|m| m.lock().ok())
        .and_then(|mut m| match m.get_mut(name) {
            Some((n, a)) if *n <= 1 => Some(*a),
            Some((n, _)) => {
                *n -= 1;
                None
            }
            None => None,
        });
    match fire {
        Some(Action::Kill) => {
            eprintln!("failpoint {name}: killing filterd");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            std::process::abort();
        }
        Some(Action::Panic) => panic!("failpoint {name}: panicking on purpose"),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_parse() {
        assert_eq!(
            parse_item("commit.after"),
            ("commit.after".into(), 1, Action::Kill)
        );
        assert_eq!(
            parse_item("commit.after:3"),
            ("commit.after".into(), 3, Action::Kill)
        );
        assert_eq!(
            parse_item("commit.after:panic"),
            ("commit.after".into(), 1, Action::Panic)
        );
        assert_eq!(parse_item("x:2:panic"), ("x".into(), 2, Action::Panic));
    }
}
