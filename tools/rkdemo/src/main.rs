//! rkdemo — the story `make demo` tells, on a temporary export.
//!
//! Starts the real filterd, smbshim and nfsshim and plays the failover story
//! with the workspace's own client libraries (smbl, nfsl): an SMB-like client
//! with a persistent handle and an RWH lease, an NFS-like client refused, a
//! local `cat` breaking the lease (when fanotify is on), smbshim killed and
//! replaced, filterd killed mid-burst and restarted, replays recognised —
//! then a real SMB 3 client (smbprotocol) through rksmbd keeps its
//! persistent handle across rksmbd's SIGKILL and replacement.
//! Every step prints what it does, its result and how long it took;
//! teardown (processes, the tmpfs mount, temporary files) happens on every
//! path, Ctrl-C too.
#![deny(unsafe_code)] // allowed back in stage.rs alone: the child's signal mask

/// `println!` for the story: a line that cannot be written (stdout closed,
/// as in `rkdemo | head -5`) stops the story with a [`StdoutGone`] error,
/// so the teardown still runs, instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say_line(format_args!($($arg)*))?
    };
}

mod cluster;
mod smb3;
mod stage;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use nfsl::{Access, CreateMode, Deny, OpenArgs};
use serde_json::Value;
use uuid::Uuid;

use stage::Stage;

/// Plays rkfilter's failover story on a temporary export.
#[derive(Parser, Debug)]
#[command(name = "rkdemo", version, about, long_about = None)]
struct Args {
    /// Keep the temporary directory (logs, state) afterwards.
    #[arg(long)]
    keep: bool,
    /// Where filterd, filterctl, smbshim and nfsshim are [default: next to
    /// rkdemo].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Do not mount a tmpfs and run filterd with --no-fanotify even as root.
    #[arg(long)]
    no_fanotify: bool,
    /// The python with smbprotocol (PyPI) that plays the real SMB 3
    /// client [default: target/smbvenv/bin/python beside the binaries,
    /// which `make demo` makes]; without it that act is skipped.
    #[arg(long, value_name = "PYTHON")]
    smb_python: Option<PathBuf>,
    /// Play the two-machine story instead: a 3-member etcd on loopback,
    /// node A and a standby node B, node A killed (needs etcd, Debian's
    /// etcd-server; `make demo-cluster`).
    #[arg(long)]
    cluster: bool,
}

const DATA: &[u8] = b"quarterly numbers: 42";

/// The story's stdout is gone; the story stops there.
#[derive(Debug)]
struct StdoutGone(std::io::Error);

impl std::fmt::Display for StdoutGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "writing to stdout: {}", self.0)
    }
}

impl std::error::Error for StdoutGone {}

/// Writes one line of the story to stdout (what `say!` expands to).
fn say_line(args: std::fmt::Arguments<'_>) -> Result<(), StdoutGone> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(StdoutGone)
}

/// Tears the stage down when dropped: after the story, and on a panic too
/// (the children, the tmpfs and the temporary directory never outlive
/// rkdemo).
struct TeardownOnDrop(Arc<Stage>);

impl Drop for TeardownOnDrop {
    fn drop(&mut self) {
        self.0.teardown();
    }
}

fn main() {
    let args = Args::parse();
    // Ctrl-C and SIGTERM are taken by a thread that tears down and exits.
    // Blocked here, so in every thread; the children get a clean mask
    // (Stage::spawn), or they would ignore the teardown's SIGTERM.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    let _ = sigs.thread_block();
    let stage = Arc::new(Stage::default());
    {
        let stage = stage.clone();
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if sigs.wait().is_ok() {
                    let _ = writeln!(std::io::stderr(), "\ninterrupted: tearing down");
                    stage.teardown();
                    std::process::exit(130);
                }
            });
    }
    stage.keep.store(args.keep, Ordering::Relaxed);
    let guard = TeardownOnDrop(stage.clone());
    let result = run(&args, &stage);
    drop(guard);
    let code = match result {
        Ok(()) => {
            // Said once it is true, not before.
            let _ = writeln!(std::io::stdout(), "\n(teardown: {})", stage.torn_down());
            0
        }
        Err(e) if e.downcast_ref::<StdoutGone>().is_some() => {
            let _ = writeln!(std::io::stderr(), "rkdemo: {e:#}; story stopped, torn down");
            1
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "\nrkdemo: step failed: {e:#}");
            1
        }
    };
    if args.keep {
        if let Some(d) = stage.dir() {
            let _ = writeln!(std::io::stdout(), "kept {}", d.display());
        }
    }
    std::process::exit(code);
}

/// The story's places, processes and timings.
struct Story {
    bin: PathBuf,
    root: PathBuf,
    state: PathBuf,
    dir: PathBuf,
    fanotify: bool,
    step: usize,
    times: Vec<(String, String)>,
}

impl Story {
    fn socket(&self) -> PathBuf {
        self.state.join("filterd.sock")
    }

    fn heading(&mut self, title: &str) -> Result<Instant, StdoutGone> {
        self.step += 1;
        say!("\n── {}. {title}", self.step);
        Ok(Instant::now())
    }

    fn done(&mut self, t0: Instant) -> Result<(), StdoutGone> {
        say!("   ({:.1} ms)", ms(t0.elapsed()));
        Ok(())
    }

    fn record(&mut self, label: &str, value: String) {
        self.times.push((label.into(), value));
    }

    fn filterctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("filterctl"))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "filterctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs filterctl against the live daemon and prints what it says.
    fn show(&self, cmd: &str) -> anyhow::Result<()> {
        let sock = self.socket().display().to_string();
        say!("   $ filterctl --socket {sock} {cmd}");
        for line in self.filterctl(&["--socket", &sock, cmd])?.lines() {
            say!("     {line}");
        }
        Ok(())
    }

    fn stats(&self) -> anyhow::Result<Value> {
        let sock = self.socket().display().to_string();
        Ok(serde_json::from_str(
            &self.filterctl(&["--socket", &sock, "stats", "--json"])?,
        )?)
    }

    /// Whether filterd answers `filterctl status` on this story's socket.
    fn serving(&self) -> bool {
        Command::new(self.bin.join("filterctl"))
            .arg("--socket")
            .arg(self.socket())
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn start_filterd(&self, stage: &Stage) -> anyhow::Result<(u32, Duration)> {
        let log = self.log("filterd")?;
        let t0 = Instant::now();
        let mut cmd = Command::new(self.bin.join("filterd"));
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--state")
            .arg(&self.state)
            .args((!self.fanotify).then_some("--no-fanotify"))
            // The SMB 3 act's conflicting open waits for the break of the
            // disconnected persistent holder's lease (MS-SMB2 3.3.4.7)
            // until the break timeout: 5 s, not the default 35 s.
            .args(["--break-timeout-ms", "5000"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let pid = stage.spawn(&mut cmd)?;
        loop {
            if self.serving() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(15) || !stage.alive(pid) {
                bail!(
                    "filterd did not come up; see {}",
                    self.dir.join("filterd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((pid, t0.elapsed()))
    }

    /// Starts a frontend and waits for its `listening on` line.
    fn start_shim(
        &self,
        stage: &Stage,
        name: &str,
        instance: &str,
    ) -> anyhow::Result<(u32, String)> {
        self.start_frontend(stage, name, instance, &[])
    }

    /// As `start_shim`, with flags of its own (rksmbd's share and users).
    fn start_frontend(
        &self,
        stage: &Stage,
        name: &str,
        instance: &str,
        extra: &[&str],
    ) -> anyhow::Result<(u32, String)> {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.arg("--filter")
            .arg(self.socket())
            .args(["--listen", "127.0.0.1:0", "--instance", instance])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log(name)?);
        let (pid, out) = stage.spawn_piped(&mut cmd)?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("{name} said {line:?}"))?
            .to_owned();
        Ok((pid, addr))
    }

    fn log(&self, name: &str) -> anyhow::Result<std::fs::File> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn need(r: smbl::Reply, what: &str) -> anyhow::Result<smbl::Reply> {
    if !r.is_success() {
        bail!("{what}: {}", r.value());
    }
    Ok(r)
}

/// Alice's session (client GUID `guid`) on `smb`.
fn alice_session(smb: &smbl::Client, guid: Uuid) -> anyhow::Result<u64> {
    need(smb.session_setup(guid, "alice", None)?, "SESSION_SETUP")?
        .session_id()
        .context("no session_id")
}

/// Alice's persistent open of report.txt: read and write, sharing read.
fn report_create(sid: u64, create_guid: Uuid) -> smbl::CreateArgs {
    let mut ca = smbl::CreateArgs::new(sid, "report.txt");
    ca.access = vec!["read".into(), "write".into()];
    ca.share = vec!["read".into()];
    ca.disposition = "overwrite_if".into();
    ca.durable = Some(smbl::Durable::persistent(create_guid));
    ca
}

fn need_ok(r: nfsl::Reply, what: &str) -> anyhow::Result<nfsl::Reply> {
    if !r.is_ok() {
        bail!("{what}: {}", r.value());
    }
    Ok(r)
}

/// Sends on `slot` until the answer is not NFS4ERR_DELAY (the slot stays
/// where it was on a DELAY, so each try re-sends the same seqid).
fn nfs_patiently(s: &nfsl::Session, slot: u32, req: &Value) -> anyhow::Result<nfsl::Reply> {
    let t0 = Instant::now();
    loop {
        let r = s.call(slot, req.clone())?;
        if r.status() != "NFS4ERR_DELAY" || t0.elapsed() > Duration::from_secs(20) {
            return Ok(r);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run(args: &Args, stage: &Stage) -> anyhow::Result<()> {
    let bin = match &args.bin_dir {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .to_owned(),
    };
    for b in ["filterd", "filterctl", "smbshim", "nfsshim"] {
        if !bin.join(b).exists() {
            bail!(
                "{b} not found in {} (run `make demo`, which builds it)",
                bin.display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("rkdemo-{}", std::process::id()));
    // 0700 whatever the umask (002 gives 0775): it is the state dirs'
    // parent, which filterd refuses when a group other than its user's
    // own, or other users, may write it.
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    if args.cluster {
        stage.set_dir(dir.clone());
        return cluster::run(&bin, &dir, stage);
    }
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir(dir.join("state"))?;
    std::fs::set_permissions(dir.join("state"), std::fs::Permissions::from_mode(0o750))?;
    stage.set_dir(dir.clone());
    let fanotify = !args.no_fanotify && stage.mount_tmpfs(&root);
    let mut s = Story {
        bin,
        root: root.clone(),
        state: dir.join("state"),
        dir: dir.clone(),
        fanotify,
        step: 0,
        times: vec![],
    };
    if fanotify {
        say!(
            "rkfilter demo — export {} (a tmpfs mounted for the demo; local access is mediated by fanotify)",
            root.display()
        );
    } else {
        say!(
            "rkfilter demo — export {} (a plain directory: filterd runs with --no-fanotify{})",
            root.display(),
            if args.no_fanotify {
                ""
            } else {
                "; run as root to see local access mediated"
            }
        );
    }

    // 1. The processes.
    let t = s.heading("start filterd, smbshim and nfsshim")?;
    let (mut filterd_pid, startup) = s.start_filterd(stage)?;
    let (smb_pid, smb_addr) = s.start_shim(stage, "smbshim", "smb-demo")?;
    let (_nfs_pid, nfs_addr) = s.start_shim(stage, "nfsshim", "nfs-demo")?;
    say!(
        "   filterd pid {filterd_pid} ready in {:.1} ms; smbshim on {smb_addr}; nfsshim on {nfs_addr}",
        ms(startup)
    );
    s.done(t)?;

    // 2. SMB-like: persistent handle, RWH lease, a write.
    let t =
        s.heading("alice (SMB-like) opens report.txt: persistent, RWH lease, shares read; writes")?;
    let alice_guid = Uuid::new_v4();
    let create_guid = Uuid::new_v4();
    let lease_key = Uuid::new_v4();
    let smb = smbl::Client::connect(smb_addr.as_str())?;
    let sid = alice_session(&smb, alice_guid)?;
    let mut ca = report_create(sid, create_guid);
    ca.lease = Some((lease_key, "RWH".into()));
    let r = need(smb.create(&ca)?, "CREATE")?;
    let file_id = r.file_id().context("no file_id")?.to_owned();
    let w = need(smb.write(sid, &file_id, 0, DATA, Some(1), false)?, "WRITE")?;
    say!(
        "   file_id {file_id}, lease {}, durable {}; wrote {} bytes (op_id 1)",
        r.get("lease")
            .map(|l| l["state"].clone())
            .unwrap_or(Value::Null),
        r.get("durable")
            .map(|d| d["persistent"].clone())
            .unwrap_or(Value::Null),
        w.get("count").cloned().unwrap_or(Value::Null)
    );
    s.done(t)?;

    // 3. A local reader breaks the lease's write caching.
    if s.fanotify {
        let t = s.heading("a local `cat report.txt` on the server: the lease breaks first")?;
        let breaks = smb.notifications().clone();
        let path = root.join("report.txt");
        let cat = std::thread::spawn(move || Command::new("cat").arg(path).output());
        let n = breaks
            .recv_timeout(Duration::from_secs(10))
            .context("no LEASE_BREAK")?;
        say!(
            "   alice gets LEASE_BREAK {} → {} (ack required: {})",
            n["current_state"],
            n["new_state"],
            n["ack_required"]
        );
        let new_state = n["new_state"].as_str().unwrap_or("").to_owned();
        let ack = need(
            smb.lease_break_ack(sid, lease_key, &new_state)?,
            "LEASE_BREAK_ACK",
        )?;
        say!(
            "   she acknowledges: lease now {}",
            ack.get("lease")
                .map(|l| l["state"].clone())
                .unwrap_or(Value::Null)
        );
        let out = cat.join().map_err(|_| anyhow::anyhow!("cat thread"))??;
        say!(
            "   cat prints {:?} once the break is acknowledged",
            String::from_utf8_lossy(&out.stdout)
        );
        s.done(t)?;
    }

    // 4. NFS-like: refused (after alice's handle caching is broken).
    let t = s.heading("bob (NFS-like) asks to write report.txt")?;
    let nfs = Arc::new(nfsl::Client::connect(nfs_addr.as_str())?);
    let verifier = format!("{:016x}", rand_u64());
    let id = need_ok(nfs.exchange_id("bob@desktop", &verifier)?, "EXCHANGE_ID")?;
    let clientid = id.clientid().context("no clientid")?.to_owned();
    let cs = need_ok(nfs.create_session(&clientid)?, "CREATE_SESSION")?;
    let ns = Arc::new(nfsl::Session::from_reply(nfs.clone(), &cs).context("no session")?);
    let mut oa = OpenArgs::new("bob-open", "report.txt");
    oa.access = Access::Write;
    oa.deny = Deny::None;
    let mut r = ns.open(0, &oa)?;
    if r.status() == "NFS4ERR_DELAY" {
        // The open would otherwise fail with a sharing violation: alice's
        // handle caching (H) is broken first, so she could close a cached
        // handle; bob is told to retry meanwhile.
        say!(
            "   {} — alice's lease must give up handle caching first",
            r.status()
        );
        let n = smb
            .notifications()
            .recv_timeout(Duration::from_secs(10))
            .context("no LEASE_BREAK")?;
        say!(
            "   alice gets LEASE_BREAK {} → {}; she keeps her open and acknowledges",
            n["current_state"],
            n["new_state"]
        );
        let new_state = n["new_state"].as_str().unwrap_or("").to_owned();
        need(
            smb.lease_break_ack(sid, lease_key, &new_state)?,
            "LEASE_BREAK_ACK",
        )?;
        r = ns.open(0, &oa)?;
    }
    say!("   bob: {} — alice's open shares read only", r.status());
    if r.status() != "NFS4ERR_SHARE_DENIED" {
        bail!("expected NFS4ERR_SHARE_DENIED, got {}", r.value());
    }
    s.done(t)?;
    // 4. smbshim dies; the handle keeps protecting the file; a replacement.
    let t = s.heading("smbshim is killed (SIGKILL)")?;
    let t_kill = Instant::now();
    stage.kill9(smb_pid);
    drop(smb);
    let ctl_sock = s.socket();
    wait_until(Duration::from_secs(10), || {
        libfilter::client::FilterClient::connect_control(&ctl_sock)
            .and_then(|c| c.handles())
            .is_ok_and(|hs| {
                hs.iter().any(|h| {
                    h.record.key.to_string() == file_id
                        && matches!(
                            h.record.conn,
                            libfilter::model::ConnState::Disconnected { .. }
                        )
                })
            })
    })?;
    s.show("handles")?;
    let r = ns.open(0, &oa)?;
    say!(
        "   bob again: {} — the disconnected persistent handle still protects the file",
        r.status()
    );
    s.done(t)?;

    let t = s.heading("a replacement smbshim (same instance); alice reconnects and reads")?;
    let t_start = Instant::now();
    let (_smb_pid2, smb_addr2) = s.start_shim(stage, "smbshim", "smb-demo")?;
    let t_listening = Instant::now();
    let smb = smbl::Client::connect(smb_addr2.as_str())?;
    let sid = alice_session(&smb, alice_guid)?;
    let rc = need(
        smb.reconnect(sid, &file_id, create_guid, Some(lease_key))?,
        "RECONNECT",
    )?;
    let reconnect = t_listening.elapsed();
    let data = need(smb.read(sid, &file_id, 0, 64)?, "READ")?
        .data()
        .unwrap_or_default();
    say!(
        "   RECONNECT ok (lease {}); read {:?}",
        rc.get("lease")
            .map(|l| l["state"].clone())
            .unwrap_or(Value::Null),
        String::from_utf8_lossy(&data)
    );
    say!(
        "   replacement started → listening {:.1} ms; listening → RECONNECT done {:.2} ms; kill → reading again {:.1} ms",
        ms(t_listening - t_start),
        ms(reconnect),
        ms(t_kill.elapsed())
    );
    s.record(
        "smbshim: listening → RECONNECT done",
        format!("{:.2} ms", ms(reconnect)),
    );
    s.record(
        "smbshim: kill → client reading again",
        format!("{:.1} ms", ms(t_kill.elapsed())),
    );
    s.done(t)?;

    // 5. filterd dies in the middle of a burst.
    let t = s.heading("filterd is killed (SIGKILL) in the middle of a burst from both clients")?;
    let stop = Arc::new(AtomicBool::new(false));
    let smb_acked = Arc::new(AtomicU64::new(0));
    let nfs_acked = Arc::new(AtomicU64::new(0));
    let smb = Arc::new(smb);
    let smb_burst = {
        let (smb, stop, acked, fid) = (
            smb.clone(),
            stop.clone(),
            smb_acked.clone(),
            file_id.clone(),
        );
        std::thread::spawn(move || -> anyhow::Result<(u64, Duration)> {
            // WRITEs with op ids; a failed one is re-sent with replay.
            let mut op = 100u64;
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let data = format!("line {op}\n");
                let off = 64 + (op - 100) * 16;
                let t0 = Instant::now();
                let mut r = smb.write(sid, &fid, off, data.as_bytes(), Some(op), false)?;
                while !r.is_success() {
                    std::thread::sleep(Duration::from_millis(5));
                    r = smb.write(sid, &fid, off, data.as_bytes(), Some(op), true)?;
                    if t0.elapsed() > Duration::from_secs(20) {
                        bail!("WRITE op {op}: {}", r.value());
                    }
                }
                worst = worst.max(t0.elapsed());
                acked.fetch_add(1, Ordering::Relaxed);
                op += 1;
            }
            Ok((op, worst))
        })
    };
    let nfs_burst = {
        let (ns, stop, acked) = (ns.clone(), stop.clone(), nfs_acked.clone());
        std::thread::spawn(move || -> anyhow::Result<Duration> {
            let mut i = 0u64;
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let mut oa = OpenArgs::new("bob-burst", format!("burst-{}.txt", i % 8));
                oa.access = Access::Both;
                oa.create = Some((CreateMode::Unchecked, None));
                let o = need_ok(nfs_patiently(&ns, 1, &nfsl::ops::open(&oa))?, "burst OPEN")?;
                let st = o.stateid().context("no stateid")?;
                need_ok(
                    nfs_patiently(
                        &ns,
                        1,
                        &nfsl::ops::write(&st, 0, format!("{i}\n").as_bytes()),
                    )?,
                    "burst WRITE",
                )?;
                need_ok(
                    nfs_patiently(&ns, 1, &nfsl::ops::close(&st))?,
                    "burst CLOSE",
                )?;
                worst = worst.max(t0.elapsed());
                acked.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok(worst)
        })
    };
    wait_until(Duration::from_secs(10), || {
        smb_acked.load(Ordering::Relaxed) >= 20 && nfs_acked.load(Ordering::Relaxed) >= 10
    })?;
    stage.kill9(filterd_pid);
    let t_crash = Instant::now();
    say!(
        "   killed filterd after {} SMB-like WRITEs and {} NFS-like OPEN+WRITE+CLOSE were acknowledged",
        smb_acked.load(Ordering::Relaxed),
        nfs_acked.load(Ordering::Relaxed)
    );
    say!("   post-mortem, straight from LMDB while filterd is down:");
    let state = s.state.display().to_string();
    say!("   $ filterctl --state {state} status");
    for line in s.filterctl(&["--state", &state, "status"])?.lines() {
        say!("     {line}");
    }
    s.done(t)?;

    let t =
        s.heading("filterd restarts; both frontends reattach and resume; the clients carry on")?;
    let (pid, restart) = s.start_filterd(stage)?;
    filterd_pid = pid;
    let before = (
        smb_acked.load(Ordering::Relaxed),
        nfs_acked.load(Ordering::Relaxed),
    );
    wait_until(Duration::from_secs(20), || {
        smb_acked.load(Ordering::Relaxed) >= before.0 + 20
            && nfs_acked.load(Ordering::Relaxed) >= before.1 + 10
    })?;
    stop.store(true, Ordering::Relaxed);
    let (last_op, smb_worst) = smb_burst
        .join()
        .map_err(|_| anyhow::anyhow!("smb burst thread"))??;
    let nfs_worst = nfs_burst
        .join()
        .map_err(|_| anyhow::anyhow!("nfs burst thread"))??;
    say!(
        "   filterd pid {filterd_pid} serving again {:.1} ms after its start ({:.1} ms after the kill)",
        ms(restart),
        ms(t_crash.elapsed())
    );
    say!(
        "   the clients never reconnected: {} SMB-like WRITEs and {} NFS-like opens acknowledged in all; longest wait {:.0} ms / {:.0} ms",
        smb_acked.load(Ordering::Relaxed),
        nfs_acked.load(Ordering::Relaxed),
        ms(smb_worst),
        ms(nfs_worst)
    );
    s.show("status")?;
    s.record(
        "filterd: start → serving (restart)",
        format!("{:.1} ms", ms(restart)),
    );
    s.record(
        "clients' longest wait across the crash",
        format!("{:.0} ms", ms(smb_worst.max(nfs_worst))),
    );
    s.done(t)?;

    // 6. Replays, shown.
    let t = s.heading("replayed requests return their recorded results")?;
    let op = last_op - 1;
    let data = format!("line {op}\n");
    let off = 64 + (op - 100) * 16;
    let before = std::fs::metadata(root.join("report.txt"))?.len();
    let r = need(
        smb.write(sid, &file_id, off, b"XXXXXXXX", Some(op), true)?,
        "replayed WRITE",
    )?;
    let on_disk = std::fs::read(root.join("report.txt"))?;
    let intact = on_disk
        .get(usize::try_from(off)?..usize::try_from(off)? + data.len())
        .is_some_and(|b| b == data.as_bytes());
    say!(
        "   SMB-like WRITE op_id {op} re-sent with replay (different bytes): reply {} — the recorded one; file unchanged: {}",
        r.value(),
        intact && std::fs::metadata(root.join("report.txt"))?.len() == before
    );
    if !intact {
        bail!("the replayed WRITE was executed again");
    }
    let mut oa = OpenArgs::new("bob-replay", "replayed.txt");
    oa.access = Access::Both;
    oa.create = Some((CreateMode::Guarded, None));
    let first = need_ok(
        nfs_patiently(&ns, 0, &nfsl::ops::open(&oa))?,
        "guarded OPEN",
    )?;
    let again = ns.resend(0, nfsl::ops::open(&oa))?;
    say!(
        "   NFS-like guarded OPEN re-sent on its slot: {} created={} — the cached reply, not NFS4ERR_EXIST",
        again.status(),
        again.get("created").cloned().unwrap_or(Value::Null)
    );
    if again.value().get("stateid") != first.value().get("stateid") {
        bail!("the re-sent OPEN was not answered from the slot");
    }
    say!("   replay recognised");
    s.done(t)?;

    // 7. A real SMB 3 client.
    smb3::act(&mut s, stage, args.smb_python.as_deref())?;

    // 8. Summary.
    let stats = s.stats()?;
    say!("\n── summary");
    for (label, v) in &s.times {
        say!("   {label:<44} {v:>12}");
    }
    say!("   filterd's counters since its restart:");
    for (label, key) in [
        ("  handles recovered", "recoveries"),
        ("  handles resumed by the frontends", "resumes"),
        ("  replays detected", "replays_detected"),
    ] {
        say!(
            "   {label:<44} {:>12}",
            stats.get(key).and_then(Value::as_u64).unwrap_or(0)
        );
    }
    Ok(())
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > limit {
            bail!("gave up waiting after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn rand_u64() -> u64 {
    let (a, _) = Uuid::new_v4().as_u64_pair();
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic in the story still tears the stage down: no child outlives
    /// it.
    #[test]
    fn a_panic_tears_the_stage_down() {
        let stage = Arc::new(Stage::default());
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let pid = stage.spawn(&mut cmd).expect("spawn sleep");
        let s = stage.clone();
        let r = std::panic::catch_unwind(move || {
            let _guard = TeardownOnDrop(s);
            panic!("a step panics");
        });
        assert!(r.is_err());
        assert_eq!(stage.torn_down().stopped, 1);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "sleep {pid} survived the panic"
        );
    }
}
