//! Named crash points, compiled in and armed by an environment variable.
//!
//! `RKFILTER_FAILPOINTS=name[:n][,name[:n]...]` makes the daemon SIGKILL
//! itself the n-th time (default: first) execution reaches `hit(name)`, so
//! tests can prove exactly-once and crash consistency at every step of a
//! mutating path. Unarmed, a hit costs one relaxed atomic load.
//!
//! Points (see docs/ARCHITECTURE.md): `commit.before`, `commit.after`
//! (durable, reply not yet sent), `reply.before_send`, `open.after_fs`
//! (file created/opened, nothing recorded).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The environment variable that arms failpoints.
pub const ENV: &str = "RKFILTER_FAILPOINTS";

static ANY_ARMED: AtomicBool = AtomicBool::new(false);
static ARMED: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();

/// Reads the environment once at start.
pub fn init() {
    let spec = std::env::var(ENV).unwrap_or_default();
    let mut map = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, n) = match item.split_once(':') {
            Some((name, n)) => (name, n.parse().unwrap_or(1)),
            None => (item, 1),
        };
        map.insert(name.to_owned(), n);
    }
    if !map.is_empty() {
        tracing::warn!(failpoints = %spec, "failpoints armed: this daemon will kill itself on purpose");
        ANY_ARMED.store(true, Ordering::Release);
    }
    let _ = ARMED.set(Mutex::new(map));
}

/// Crashes the process (SIGKILL, like `kill -9`) if `name` is armed and this
/// is its n-th hit.
pub fn hit(name: &str) {
    if !ANY_ARMED.load(Ordering::Relaxed) {
        return;
    }
    let fire = ARMED
        .get()
        .and_then(|m| m.lock().ok())
        .is_some_and(|mut m| match m.get_mut(name) {
            Some(n) if *n <= 1 => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        });
    if fire {
        eprintln!("failpoint {name}: killing filterd");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort();
    }
}
