//! A `filterd` process under test: started on a given export root and state
//! dir, waited for by polling its socket, and stopped on drop (SIGTERM, then
//! SIGKILL if it does not exit), so no error path leaves a daemon behind.
//!
//! Every section that needs a daemon (mediated, local, restart) starts it
//! through here; readiness failures carry the tail of the daemon's log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use libfilter::client::FilterClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How often readiness is polled by default.
pub const POLL: Duration = Duration::from_millis(10);
/// How long a daemon on a fresh state dir may take to serve.
pub const READY_LIMIT: Duration = Duration::from_secs(10);
/// How long a stopped daemon may take to exit before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// Lines of the daemon log quoted in an error.
const LOG_TAIL_LINES: usize = 20;

/// The log level filterd runs with: `warn`, or `$RKBENCH_FILTERD_LOG`
/// (`info` shows, among others, recovery's time per phase — the restart
/// rows then print that line).
pub fn filterd_log_level() -> String {
    std::env::var("RKBENCH_FILTERD_LOG").unwrap_or_else(|_| "warn".to_owned())
}

/// A running filterd, stopped on drop.
pub struct Daemon {
    child: Child,
    /// Its socket (`STATE/filterd.sock`).
    pub socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Spawns filterd on `root` and `state` (with fanotify when `fanotify`),
    /// its stderr to `log`, without waiting for it.
    /// Spawns filterd on `root` and `state` (with fanotify when `fanotify`,
    /// and `extra` flags such as `--store`), its stderr to `log`, without
    /// waiting for it.
    pub fn spawn(
        filterd: &Path,
        root: &Path,
        state: &Path,
        log: &Path,
        fanotify: bool,
        extra: &[String],
    ) -> anyhow::Result<Daemon> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(filterd);
        cmd.arg("--root").arg(root).arg("--state").arg(state);
        if !fanotify {
            cmd.arg("--no-fanotify");
        }
        cmd.args(extra);
        let child = cmd
            .env("RUST_LOG", filterd_log_level())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", filterd.display()))?;
        Ok(Daemon {
            child,
            socket: state.join("filterd.sock"),
            log: log.to_owned(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Spawns filterd and waits until it serves (see [`Daemon::wait_serving`]).
    pub fn start_on(
        filterd: &Path,
        root: &Path,
        state: &Path,
        log: &Path,
        fanotify: bool,
        extra: &[String],
    ) -> anyhow::Result<Daemon> {
        let mut d = Self::spawn(filterd, root, state, log, fanotify, extra)?;
        d.wait_serving(POLL, READY_LIMIT)?;
        Ok(d)
    }

    /// Polls every `poll` until a control connection gets its hello answered,
    /// and returns that connection. Fails, quoting the log's tail, when the
    /// daemon exits or `limit` passes first.
    pub fn wait_serving(
        &mut self,
        poll: Duration,
        limit: Duration,
    ) -> anyhow::Result<FilterClient> {
        let t0 = Instant::now();
        loop {
            if let Ok(c) = FilterClient::connect_control(&self.socket) {
                return Ok(c);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!(
                    "filterd exited before serving ({st}); log:\n{}",
                    self.log_tail()
                );
            }
            if t0.elapsed() > limit {
                bail!(
                    "filterd not serving on {} after {:.1} s; log:\n{}",
                    self.socket.display(),
                    limit.as_secs_f64(),
                    self.log_tail()
                );
            }
            std::thread::sleep(poll);
        }
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        match std::fs::read_to_string(&self.log) {
            Ok(s) => {
                let lines: Vec<&str> = s.lines().collect();
                let from = lines.len().saturating_sub(LOG_TAIL_LINES);
                lines.get(from..).unwrap_or_default().join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < STOP_LIMIT {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(POLL),
                _ => return,
            }
        }
        eprintln!("rkbench: filterd ignored SIGTERM for 10 s; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
