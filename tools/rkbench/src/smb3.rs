//! A real SMB 3 client (smbprotocol, PyPI) against rksmbd over a real
//! filterd, and against Samba's smbd on this machine when it is installed:
//! CREATE+CLOSE, 64 KiB READ and 64 KiB WRITE per second at 1 and 32
//! connections.
//!
//! The client is `smb3_bench.py` (beside this file, embedded): it sets up
//! every connection (session, tree, a 64 KiB file of its own) before the
//! clock starts and prints one JSON line per measurement. The same client
//! runs against both servers, so the columns compare the servers; at high
//! rates the Python client itself is part of what is measured.
//!
//! Samba: `smbd` started (as root) on a loopback port with a generated
//! smb.conf (a read-write share, leases and durable handles on, Samba's
//! state under the scratch dir) and a tdbsam user added with
//! `smbpasswd -a`; stopped on drop.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::daemon::{POLL, READY_LIMIT};
use crate::report::Figure;

/// The client script.
const SCRIPT: &str = include_str!("smb3_bench.py");
/// The connection counts measured.
pub const CONNS: [usize; 2] = [1, 32];
/// The share both servers export.
const SHARE: &str = "data";
const PASSWORD: &str = "rkbench-pw";
/// How long a client run may take beyond its timed part (session setups).
const CLIENT_SLACK: Duration = Duration::from_secs(120);

/// One measurement: `op` is `create_close`, `read` or `write`.
#[derive(Debug, Clone)]
pub struct Measured {
    /// What was measured.
    pub op: String,
    /// Connections.
    pub conns: usize,
    /// Ops per second (a CREATE+CLOSE pair is one), mean and p99.
    pub fig: Figure,
}

/// A row's name: `server`, the op, the client, the units.
pub fn row_name(server: &str, op: &str) -> String {
    let (what, units) = match op {
        "create_close" => ("CREATE+CLOSE", "pairs/s, µs/pair"),
        "read" => ("READ 64 KiB", "reads/s"),
        _ => ("WRITE 64 KiB", "writes/s"),
    };
    format!("{server} SMB 3 {what}, smbprotocol client ({units})")
}

/// The python to run the client with, if it has smbprotocol.
pub fn python(given: Option<&Path>) -> Option<PathBuf> {
    let p = match given {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .ok()?
            .parent()?
            .parent()?
            .join("smbvenv/bin/python"),
    };
    Command::new(&p)
        .args(["-c", "import smbprotocol"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        .then_some(p)
}

/// The user both servers know: this process's own (Samba maps it to a
/// Unix account).
fn user() -> anyhow::Result<String> {
    let out = Command::new("id").arg("-un").output()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if name.is_empty() {
        bail!("`id -un` named no user");
    }
    Ok(name)
}

/// Runs the client against `port` for `dur` per measurement.
fn run_client(
    python: &Path,
    dir: &Path,
    port: u16,
    user: &str,
    dur: Duration,
) -> anyhow::Result<Vec<Measured>> {
    let script = dir.join("smb3_bench.py");
    std::fs::write(&script, SCRIPT)?;
    let limit = CLIENT_SLACK + dur * 8;
    let out = Command::new("timeout")
        .arg(limit.as_secs().to_string())
        .arg(python)
        .arg(&script)
        .args(["127.0.0.1", &port.to_string(), SHARE, user, PASSWORD])
        .arg(dur.as_secs_f64().to_string())
        .args(CONNS.iter().map(usize::to_string))
        .stdin(Stdio::null())
        .output()
        .context("running the smbprotocol client")?;
    if !out.status.success() {
        bail!(
            "the smbprotocol client failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut rows = vec![];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("client said {line:?}"))?;
        let num = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        rows.push(Measured {
            op: v
                .get("op")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
            conns: v
                .get("conns")
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0),
            fig: Figure {
                ops_per_s: num("ops") / num("wall_s").max(1e-9),
                mean_us: num("mean_us"),
                p99_us: num("p99_us"),
            },
        });
    }
    Ok(rows)
}

/// rksmbd on a fresh filterd (`--no-fanotify`), its share the export.
pub fn rksmbd(
    filterd: &Path,
    rksmbd: &Path,
    python: &Path,
    dir: &Path,
    dur: Duration,
) -> anyhow::Result<Vec<Measured>> {
    let d = crate::mediated::start_export(filterd, dir, "smb3")?;
    let user = user()?;
    let mut hash = Command::new(rksmbd)
        .args(["hash-password", &user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("rksmbd hash-password")?;
    if let Some(mut i) = hash.stdin.take() {
        writeln!(i, "{PASSWORD}")?;
    }
    let out = hash.wait_with_output()?;
    if !out.status.success() {
        bail!("rksmbd hash-password failed");
    }
    let users = dir.join("smb3/smbpasswd");
    // 0600: rksmbd refuses a users file group or others may read.
    rksmbd::users::create_file(&users)?.write_all(&out.stdout)?;
    let users = users.to_string_lossy().into_owned();
    let srv = crate::smb::Shim::start_with(
        rksmbd,
        &d.socket,
        "bench",
        &dir.join("smb3/rksmbd.log"),
        &["--share", SHARE, "--users", &users],
    )?;
    let port = srv
        .addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("rksmbd listens on {:?}", srv.addr))?;
    let rows = run_client(python, &dir.join("smb3"), port, &user, dur)?;
    drop(srv);
    drop(d);
    Ok(rows)
}

/// A running smbd, stopped (SIGTERM, then SIGKILL) on drop.
struct Smbd(Child);

impl Drop for Smbd {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Samba's smbd with the same client: `Ok(Err(why))` when it cannot run
/// here (not installed, not root).
pub fn samba(
    python: &Path,
    dir: &Path,
    dur: Duration,
) -> anyhow::Result<Result<Vec<Measured>, String>> {
    let installed = Command::new("smbd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        return Ok(Err("smbd is not installed (Debian `samba`)".into()));
    }
    if !nix::unistd::geteuid().is_root() {
        return Ok(Err("Samba's smbd needs root".into()));
    }
    let s = dir.join("samba");
    for sub in [
        "private", "lock", "state", "cache", "run", "ncalrpc", "share",
    ] {
        std::fs::create_dir_all(s.join(sub))?;
    }
    // Samba binds its port only later: from below the ephemeral range
    // (see `spare_loopback_ports`), so no connection can have taken it.
    let port = *libfilter::etcd::spare_loopback_ports(1)?
        .first()
        .context("a loopback port for Samba")?;
    let d = s.display();
    let conf = s.join("smb.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\n  server role = standalone server\n  passdb backend = tdbsam:{d}/private/passdb.tdb\n  \
             private dir = {d}/private\n  lock directory = {d}/lock\n  state directory = {d}/state\n  \
             cache directory = {d}/cache\n  pid directory = {d}/run\n  ncalrpc dir = {d}/ncalrpc\n  \
             binddns dir = {d}/private\n  log file = {d}/log.%m\n  smb ports = {port}\n  \
             interfaces = lo\n  bind interfaces only = yes\n  disable netbios = yes\n  \
             server min protocol = SMB2_10\n  load printers = no\n  printcap name = /dev/null\n  \
             disable spoolss = yes\n  kernel oplocks = no\n  kernel share modes = no\n  \
             posix locking = no\n  smb2 leases = yes\n  durable handles = yes\n\
             [{SHARE}]\n  path = {d}/share\n  read only = no\n"
        ),
    )?;
    let user = user()?;
    let mut add = Command::new("smbpasswd")
        .arg("-c")
        .arg(&conf)
        .args(["-s", "-a", &user])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("smbpasswd -a")?;
    if let Some(mut i) = add.stdin.take() {
        write!(i, "{PASSWORD}\n{PASSWORD}\n")?;
    }
    let out = add.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "smbpasswd -a {user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = std::fs::File::create(s.join("smbd.out"))?;
    let smbd = Smbd(
        Command::new("smbd")
            // Its own process group (no --no-process-group): smbd
            // signals its whole group when it stops.
            .args(["--foreground", "-s"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting smbd")?,
    );
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > READY_LIMIT * 2 {
            bail!(
                "smbd did not listen on port {port}: {}",
                std::fs::read_to_string(s.join("smbd.out")).unwrap_or_default()
            );
        }
        std::thread::sleep(POLL);
    }
    let rows = run_client(python, &s, port, &user, dur)?;
    drop(smbd);
    Ok(Ok(rows))
}
