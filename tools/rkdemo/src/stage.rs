//! Everything the demo must clean up: child processes, the tmpfs it
//! mounted, its temporary directory — on success, failure and Ctrl-C.

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
}

impl Stage {
    /// Starts a process the teardown will stop.
    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<u32> {
        let c = cmd.spawn()?;
        let pid = c.id();
        if let Ok(mut v) = self.children.lock() {
            v.push(c);
        }
        Ok(pid)
    }

    /// Starts a process with piped stdout, which is handed back.
    pub fn spawn_piped(&self, cmd: &mut Command) -> anyhow::Result<(u32, ChildStdout)> {
        let mut c = cmd.spawn()?;
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
        let mut c = cmd.spawn()?;
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
                eprintln!(
                    "rkdemo: cannot mount a tmpfs on {} ({e}); going on without fanotify",
                    at.display()
                );
                false
            }
        }
    }

    /// Stops every process (SIGTERM, then SIGKILL after 5 s), unmounts,
    /// removes the temporary directory unless kept.
    pub fn teardown(&self) {
        if let Ok(mut v) = self.children.lock() {
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
                if let Err(e) = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH) {
                    eprintln!("rkdemo: unmounting {}: {e}", at.display());
                }
            }
        }
        if !self.keep.load(Ordering::Relaxed) {
            if let Ok(mut d) = self.dir.lock() {
                if let Some(d) = d.take() {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
        }
    }
}
