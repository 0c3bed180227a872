//! The frontend instances that have attached with lock hints or with
//! `FEATURE_RESYNCED`, or asked for a CheckIo (`STATE/frontends.seen`: a
//! line per instance, `NAME PID START` — the process that attached last
//! under that name, and its start time).
//!
//! Opens wait for them too after a restart: a live one may have clients
//! caching under leases of handles the restart forgot, and an open is
//! granted only once it has resynced (told them) or been given up
//! (`engine::restart_gate`).
//!
//! A frontend decides "this file has no locks" and does that read or write
//! without asking filterd. When filterd dies, such a write may still be in
//! flight, and the restarted filterd — which has no record of the
//! frontend's non-durable handles — could grant a first lock before it
//! lands; and a read or write the old filterd checked (`CheckIo`) on a
//! file that kept its locks is unknown to the new one too. So a restarted
//! filterd makes a lock (a first one or not) wait until every
//! instance named here whose process is still alive (same pid, same start
//! time: a dead process has nothing in flight) has said hello again (a
//! frontend drains its unchecked and checked I/O before it says hello; see
//! `libfilter::attach`), or until the break timeout, when the instance is
//! given up and struck off.
//!
//! The file is written (to a temporary name, then renamed) when an
//! instance attaches that it does not name yet, and when one is struck off.
//! It is not fsync'd: it matters only while frontend processes outlive
//! filterd, that is when the machine stayed up and the page cache holds
//! the rename; after a power loss no frontend has I/O in flight. A line
//! that does not parse is skipped with a warning.

use std::path::{Path, PathBuf};

use libfilter::model::InstanceName;
use tracing::warn;

/// The file's name in the state dir.
pub const FILE: &str = "frontends.seen";

/// Most names kept; when full, the oldest not attached now is dropped.
pub const MAX_SEEN: usize = 1024;

/// One instance, and the process that attached last under its name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    name: InstanceName,
    /// 0: not known (another pid namespace).
    pid: i32,
    start: Option<u64>,
}

impl Seen {
    fn parse(line: &str) -> Option<Seen> {
        let mut f = line.split(' ');
        let name = InstanceName::new(f.next()?).ok()?;
        let pid = f.next()?.parse().ok()?;
        let start = match f.next()? {
            "-" => None,
            t => Some(t.parse().ok()?),
        };
        f.next().is_none().then_some(Seen { name, pid, start })
    }

    /// Whether that process may still be running.
    fn alive(&self) -> bool {
        if self.pid <= 0 {
            return true;
        }
        if crate::local_opens::is_zombie(self.pid) {
            // Exited (its parent has not reaped it yet): nothing in
            // flight any more (review, session 27: a replacement waited
            // the whole break timeout for an old process already gone).
            return false;
        }
        match (crate::local_opens::start_time(self.pid), self.start) {
            (None, _) => false,
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
        }
    }
}

/// The instances seen, oldest first.
#[derive(Default)]
pub struct FrontendsSeen {
    /// None: nothing is written (unit tests).
    path: Option<PathBuf>,
    seen: Vec<Seen>,
}

impl FrontendsSeen {
    /// Reads `STATE/frontends.seen` (missing: none seen yet).
    pub fn load(state: &Path) -> Self {
        let path = state.join(FILE);
        let seen = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.is_empty())
                .filter_map(|l| {
                    let s = Seen::parse(l);
                    if s.is_none() {
                        warn!(file = %path.display(), line = l, "not NAME PID START: skipped");
                    }
                    s
                })
                .take(MAX_SEEN)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the frontends seen before: a first lock after this restart does not wait for them");
                Vec::new()
            }
        };
        FrontendsSeen {
            path: Some(path),
            seen,
        }
    }

    /// The list as it is now, never written (what the engine compares
    /// later hellos with).
    pub fn snapshot(&self) -> FrontendsSeen {
        FrontendsSeen {
            path: None,
            seen: self.seen.clone(),
        }
    }

    /// The instances seen whose process may still be running.
    pub fn alive(&self) -> impl Iterator<Item = &InstanceName> {
        self.seen.iter().filter(|s| s.alive()).map(|s| &s.name)
    }

    /// Whether the process recorded for `name` is another one than `pid`
    /// and may still be running: a replacement that took over the name
    /// says nothing of the I/O the old process may have in flight.
    pub fn another_alive(&self, name: &InstanceName, pid: i32) -> bool {
        self.seen
            .iter()
            .any(|s| s.name == *name && s.pid != pid && s.pid > 0 && s.alive())
    }

    /// Whether `name` is recorded as attached by process `pid` (then
    /// [`FrontendsSeen::insert`] has nothing to do).
    pub fn has(&self, name: &InstanceName, pid: i32) -> bool {
        self.seen.iter().any(|s| s.name == *name && s.pid == pid)
    }

    /// Records `name`, attached now by process `pid`; `attached` says
    /// which others are, so that a full list drops one that is not.
    pub fn insert(
        &mut self,
        name: &InstanceName,
        pid: i32,
        attached: impl Fn(&InstanceName) -> bool,
    ) {
        let new = Seen {
            name: name.clone(),
            pid,
            start: if pid > 0 {
                crate::local_opens::start_time(pid)
            } else {
                None
            },
        };
        if let Some(old) = self.seen.iter_mut().find(|s| s.name == *name) {
            if *old == new {
                return;
            }
            *old = new;
        } else {
            if self.seen.len() >= MAX_SEEN {
                let victim = self
                    .seen
                    .iter()
                    .position(|s| !attached(&s.name))
                    .unwrap_or(0);
                self.seen.remove(victim);
            }
            self.seen.push(new);
        }
        self.save();
    }

    /// Strikes `name` off (it did not come back in time).
    pub fn remove(&mut self, name: &InstanceName) {
        let before = self.seen.len();
        self.seen.retain(|s| s.name != *name);
        if self.seen.len() != before {
            self.save();
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else {
            return;
        };
        let mut text = String::new();
        for s in &self.seen {
            let start = s.start.map_or_else(|| "-".to_owned(), |t| t.to_string());
            text.push_str(&format!("{} {} {start}\n", s.name.as_str(), s.pid));
        }
        let tmp = path.with_extension("seen.tmp");
        let r = libfilter::runtime::replace_file(path, &tmp, text.as_bytes(), 0o600);
        if let Err(e) = r {
            warn!(file = %path.display(), error = %e, "cannot record the frontends seen: a lock after a restart may not wait for them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &FrontendsSeen) -> Vec<InstanceName> {
        s.alive().cloned().collect()
    }

    #[test]
    fn live_instances_survive_a_reload_dead_ones_and_bad_lines_do_not() {
        let dir = std::env::temp_dir().join(format!("rkf-seen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut s = FrontendsSeen::load(&dir);
        assert!(names(&s).is_empty());
        let me = i32::try_from(std::process::id()).expect("pid");
        let a = InstanceName::new("smb-a").expect("name");
        let b = InstanceName::new("nfs-b").expect("name");
        let gone = InstanceName::new("gone").expect("name");
        s.insert(&a, me, |_| true);
        s.insert(&b, 0, |_| true);
        s.insert(&gone, i32::MAX, |_| true);
        s.insert(&a, me, |_| true);
        assert_eq!(names(&FrontendsSeen::load(&dir)), [a.clone(), b.clone()]);
        let mode = std::fs::metadata(dir.join(FILE))
            .expect("saved")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(!s.another_alive(&a, me), "the same process");
        assert!(
            s.another_alive(&a, me + 1),
            "a replacement, the old one alive"
        );
        assert!(!s.another_alive(&gone, 1), "the old one is gone");
        s.remove(&a);
        assert_eq!(names(&FrontendsSeen::load(&dir)), std::slice::from_ref(&b));
        std::fs::write(dir.join(FILE), "nfs-b 0 -\n\u{0}bad 1 2\nx\nsmb-a 1 2 3\n").expect("write");
        assert_eq!(names(&FrontendsSeen::load(&dir)), [b]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
