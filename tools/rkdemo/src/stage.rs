//! Everything the demo must clean up: child processes, the tmpfs it
//! mounted, its temporary directory — on success, failure, a panic
//! (`TeardownOnDrop` in main.rs) and Ctrl-C.
//!
//! rkdemo blocks SIGINT and SIGTERM in every thread (its signal thread
//! takes them); a child would inherit that mask across exec and ignore the
//! teardown's SIGTERM, so every child starts with an empty mask.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The demo's resources.
#[derive(Default)]
pub struct Stage {
    children: Mutex<Vec<Child>>,
    dir: Mutex<Option<PathBuf>>,
    mounts: Mutex<Vec<PathBuf>>,
    /// Keep the temporary directory.
    pub keep: AtomicBool,
    /// What the last teardown did, for the story's last line.
    done: Mutex<TornDown>,
}

/// What a teardown did.
#[derive(Default, Clone, Copy)]
pub struct TornDown {
    pub stopped: usize,
    unmounted: usize,
    removed: bool,
}

impl std::fmt::Display for TornDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} processes stopped", self.stopped)?;
        if self.unmounted > 0 {
            write!(f, ", tmpfs unmounted")?;
        }
        if self.removed {
            write!(f, ", temporary export removed")?;
        }
        Ok(())
    }
}

/// Starts `cmd` with an empty signal mask (see the module doc).
fn spawn_unmasked(cmd: &mut Command) -> anyhow::Result<Child> {
    use anyhow::Context as _;
    let program = cmd.get_program().to_string_lossy().into_owned();
    spawn_unmasked_io(cmd).with_context(|| {
        format!("start {program} (its stdin, stdout and stderr: /dev/null or pipes)")
    })
}

fn spawn_unmasked_io(cmd: &mut Command) -> std::io::Result<Child> {
    #[allow(unsafe_code)]
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: sigprocmask is one, and
    // `SigSet::empty()` is sigemptyset on a stack value (no allocation,
    // no lock).
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            )
            .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
}

impl Stage {
    /// Starts a process the teardown will stop.
    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<u32> {
        let c = spawn_unmasked(cmd)?;
        let pid = c.id();
        if let Ok(mut v) = self.children.lock() {
            v.push(c);
        }
        Ok(pid)
    }

    /// Starts a process with piped stdout, which is handed back.
    pub fn spawn_piped(&self, cmd: &mut Command) -> anyhow::Result<(u32, ChildStdout)> {
        let mut c = spawn_unmasked(cmd)?;
        let out = c
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout pipe"))?;
        let pid = c.id();
        if let Ok(mut v) = self.children.lock() {
            v.push(c);
        }
        Ok((pid, out))
    }

    /// Starts a process with piped stdin and stdout, which are handed back.
    pub fn spawn_io(&self, cmd: &mut Command) -> anyhow::Result<(u32, ChildStdin, ChildStdout)> {
        let mut c = spawn_unmasked(cmd)?;
        let (Some(input), Some(out)) = (c.stdin.take(), c.stdout.take()) else {
            let _ = c.kill();
            let _ = c.wait();
            anyhow::bail!("no stdin or stdout pipe");
        };
        let pid = c.id();
        if let Ok(mut v) = self.children.lock() {
            v.push(c);
        }
        Ok((pid, input, out))
    }

    /// Waits for a process the stage started to exit; whether it succeeded.
    pub fn wait_success(&self, pid: u32) -> bool {
        let child = self.children.lock().ok().and_then(|mut v| {
            let i = v.iter().position(|c| c.id() == pid)?;
            Some(v.remove(i))
        });
        child.is_some_and(|mut c| c.wait().is_ok_and(|s| s.success()))
    }

    /// Whether a process the stage started is still running.
    pub fn alive(&self, pid: u32) -> bool {
        self.children.lock().is_ok_and(|mut v| {
            v.iter_mut()
                .find(|c| c.id() == pid)
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        })
    }

    /// SIGKILLs a process the stage started and reaps it.
    pub fn kill9(&self, pid: u32) {
        if let Ok(mut v) = self.children.lock() {
            if let Some(i) = v.iter().position(|c| c.id() == pid) {
                let mut c = v.remove(i);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// The temporary directory to remove.
    pub fn set_dir(&self, d: PathBuf) {
        if let Ok(mut g) = self.dir.lock() {
            *g = Some(d);
        }
    }

    /// The temporary directory.
    pub fn dir(&self) -> Option<PathBuf> {
        self.dir.lock().ok().and_then(|d| d.clone())
    }

    /// Mounts a small tmpfs on `at` (root only); false when that is not
    /// possible, and the demo runs on the plain directory instead.
    pub fn mount_tmpfs(&self, at: &Path) -> bool {
        if !nix::unistd::geteuid().is_root() {
            return false;
        }
        let r = nix::mount::mount(
            Some("rkdemo"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("size=64m,mode=0755"),
        );
        match r {
            Ok(()) => {
                if let Ok(mut m) = self.mounts.lock() {
                    m.push(at.to_owned());
                }
                true
            }
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "rkdemo: cannot mount a tmpfs on {} ({e}); going on without fanotify",
                    at.display()
                );
                false
            }
        }
    }

    /// What the last teardown did.
    pub fn torn_down(&self) -> TornDown {
        self.done.lock().map(|d| *d).unwrap_or_default()
    }

    /// Stops every process (SIGTERM, then SIGKILL after 5 s), unmounts,
    /// removes the temporary directory unless kept. Running it again does
    /// nothing more.
    pub fn teardown(&self) {
        let mut done = TornDown::default();
        if let Ok(mut v) = self.children.lock() {
            done.stopped = v.len();
            for c in v.iter_mut() {
                if let Ok(pid) = i32::try_from(c.id()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
            }
            for c in v.iter_mut() {
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(5) {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            v.clear();
        }
        if let Ok(mut m) = self.mounts.lock() {
            for at in m.drain(..) {
                done.unmounted += 1;
                if let Err(e) = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH) {
                    let _ = writeln!(
                        std::io::stderr(),
                        "rkdemo: unmounting {}: {e}",
                        at.display()
                    );
                }
            }
        }
        if !self.keep.load(Ordering::Relaxed) {
            if let Ok(mut d) = self.dir.lock() {
                if let Some(d) = d.take() {
                    done.removed = std::fs::remove_dir_all(d).is_ok();
                }
            }
        }
        if let Ok(mut d) = self.done.lock() {
            if done.stopped + done.unmounted > 0 || done.removed {
                *d = done;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child of a thread that blocks SIGTERM (as rkdemo's threads do)
    /// still stops on the teardown's SIGTERM, at once rather than after
    /// the 5 s grace and a SIGKILL.
    #[test]
    fn children_stop_on_sigterm_though_rkdemo_blocks_it() {
        let mut sigs = nix::sys::signal::SigSet::empty();
        sigs.add(nix::sys::signal::Signal::SIGTERM);
        sigs.thread_block().expect("block SIGTERM in this thread");
        let stage = Stage::default();
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let pid = stage.spawn(&mut cmd).expect("spawn sleep");
        // The child's mask is empty (read once it has exec'd sleep).
        let status = std::path::PathBuf::from(format!("/proc/{pid}/status"));
        let t0 = Instant::now();
        loop {
            let st = std::fs::read_to_string(&status).unwrap_or_default();
            if st.contains("Name:\tsleep") {
                assert!(st.contains("SigBlk:\t0000000000000000"), "{st}");
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "sleep never ran");
            std::thread::sleep(Duration::from_millis(2));
        }
        let t0 = Instant::now();
        stage.teardown();
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the child ignored SIGTERM: teardown took {:?}",
            t0.elapsed()
        );
        assert_eq!(stage.torn_down().stopped, 1);
    }
}
