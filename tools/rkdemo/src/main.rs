//! rkdemo — the story `make demo` tells, on a temporary export.
//!
//! Starts the real filterd, attaches frontends through libfilter (one of them
//! a separate process, so it can be SIGKILLed), and walks through failover:
//! a frontend crash with its handle protecting the file meanwhile, then a
//! daemon crash in the middle of a burst with recovery, resume and a replay
//! recognised. Every step prints what it does, its result and its duration;
//! teardown (processes, temporary files) happens on every path, Ctrl-C too.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::{ErrorCode, OpenRequest};

/// Plays rkfilter's failover story on a temporary export.
#[derive(Parser, Debug)]
#[command(name = "rkdemo", version, about, long_about = None)]
struct Args {
    /// Keep the temporary directory (logs, state) afterwards.
    #[arg(long)]
    keep: bool,
    /// Where filterd and filterctl are [default: next to rkdemo].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Internal: run as the crashing frontend process.
    #[arg(long, hide = true, num_args = 2, value_names = ["SOCKET", "GUID"])]
    frontend_child: Option<Vec<String>>,
}

const DATA: &[u8] = b"quarterly numbers: 42";

fn main() {
    let args = Args::parse();
    if let Some(v) = &args.frontend_child {
        if let Err(e) = frontend_child(v) {
            eprintln!("frontend: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    // Ctrl-C and SIGTERM are taken by a thread that tears down and exits.
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
                    eprintln!("\ninterrupted: tearing down");
                    stage.teardown();
                    std::process::exit(130);
                }
            });
    }
    let code = match run(&args, &stage) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("\nrkdemo: step failed: {e:#}");
            1
        }
    };
    stage.teardown();
    if args.keep {
        if let Ok(d) = stage.dir.lock() {
            if let Some(d) = d.as_ref() {
                println!("kept {}", d.display());
            }
        }
    }
    std::process::exit(code);
}

/// Everything to clean up.
#[derive(Default)]
struct Stage {
    children: Mutex<Vec<Child>>,
    dir: Mutex<Option<PathBuf>>,
    keep: AtomicBool,
}

impl Stage {
    fn spawn(&self, cmd: &mut Command) -> anyhow::Result<u32> {
        let c = cmd.spawn()?;
        let pid = c.id();
        if let Ok(mut v) = self.children.lock() {
            v.push(c);
        }
        Ok(pid)
    }
    fn kill9(&self, pid: u32) {
        if let Ok(mut v) = self.children.lock() {
            if let Some(i) = v.iter().position(|c| c.id() == pid) {
                let mut c = v.remove(i);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    fn teardown(&self) {
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
        if !self.keep.load(Ordering::Relaxed) {
            if let Ok(mut d) = self.dir.lock() {
                if let Some(d) = d.take() {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
        }
    }
}

/// The crashing frontend: opens a persistent handle, writes, reports, waits.
fn frontend_child(v: &[String]) -> anyhow::Result<()> {
    let [sock, guid] = v else {
        bail!("need SOCKET GUID")
    };
    let c = FilterClient::connect_frontend(
        Path::new(sock),
        Protocol::new("smb")?,
        InstanceName::new("smb-a")?,
    )?;
    let h = c.open(OpenRequest {
        client: ClientId::new("alice@laptop")?,
        path: RelPath::new("report.txt")?,
        access: Access::new(Rights::READ.union(Rights::WRITE))?,
        share: Rights::READ,
        disposition: Disposition::Create,
        durability: Durability::Persistent {
            timeout_ms: 120_000,
        },
        create_guid: Some(CreateGuid(guid.parse()?)),
        owner: None,
        lease: None,
        no_wait: false,
    })?;
    std::fs::File::from(h.fd).write_all_at(DATA, 0)?;
    println!("{}", h.info.key);
    std::io::stdout().flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

struct Story {
    bin: PathBuf,
    root: PathBuf,
    state: PathBuf,
    dir: PathBuf,
    step: usize,
    times: Vec<(String, Duration)>,
}

impl Story {
    fn socket(&self) -> PathBuf {
        self.state.join("filterd.sock")
    }
    fn heading(&mut self, title: &str) -> Instant {
        self.step += 1;
        println!("\n── {}. {title}", self.step);
        Instant::now()
    }
    fn done(&mut self, label: &str, t0: Instant) {
        let d = t0.elapsed();
        println!("   ({:.1} ms)", d.as_secs_f64() * 1e3);
        self.times.push((label.into(), d));
    }
    fn filterctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("filterctl"))
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "filterctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }
    fn show(&self, args: &[&str]) -> anyhow::Result<()> {
        println!("   $ filterctl {}", args.join(" "));
        for line in self.filterctl(args)?.lines() {
            println!("     {line}");
        }
        Ok(())
    }
    fn start_filterd(&self, stage: &Stage) -> anyhow::Result<(u32, Duration)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("filterd.log"))?;
        let t0 = Instant::now();
        let pid = stage.spawn(
            Command::new(self.bin.join("filterd"))
                .arg("--root")
                .arg(&self.root)
                .arg("--state")
                .arg(&self.state)
                .arg("--no-fanotify")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        while FilterClient::connect_control(&self.socket()).is_err() {
            if t0.elapsed() > Duration::from_secs(15) {
                let log = std::fs::read_to_string(self.dir.join("filterd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!(
                    "filterd not ready after 15 s; log tail:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((pid, t0.elapsed()))
    }
}

fn open_req(
    client: &str,
    path: &str,
    access: Rights,
    share: Rights,
    disp: Disposition,
    dur: Durability,
) -> anyhow::Result<OpenRequest> {
    Ok(OpenRequest {
        client: ClientId::new(client)?,
        path: RelPath::new(path)?,
        access: Access::new(access)?,
        share,
        disposition: disp,
        durability: dur,
        create_guid: None,
        owner: None,
        lease: None,
        no_wait: false,
    })
}

fn run(args: &Args, stage: &Stage) -> anyhow::Result<()> {
    let bin = match &args.bin_dir {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .to_owned(),
    };
    for b in ["filterd", "filterctl"] {
        if !bin.join(b).exists() {
            bail!(
                "{} not found in {} (run `make demo`, which builds it)",
                b,
                bin.display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("rkdemo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("root"))?;
    std::fs::create_dir_all(dir.join("state"))?;
    if let Ok(mut d) = stage.dir.lock() {
        *d = Some(dir.clone());
    }
    stage.keep.store(args.keep, Ordering::Relaxed);
    let mut s = Story {
        bin,
        root: dir.join("root"),
        state: dir.join("state"),
        dir: dir.clone(),
        step: 0,
        times: vec![],
    };
    println!(
        "rkfilter demo — export {} (a plain directory: filterd runs with --no-fanotify;",
        s.root.display()
    );
    println!("local-access mediation arrives with fanotify support)");

    let t = s.heading("start filterd");
    let (mut filterd_pid, startup) = s.start_filterd(stage)?;
    println!(
        "   filterd pid {filterd_pid} serving on {} after {:.1} ms",
        s.socket().display(),
        startup.as_secs_f64() * 1e3
    );
    s.done("start filterd", t);

    let t =
        s.heading("an SMB-like frontend process opens report.txt: persistent, share read; writes");
    let guid = uuid::Uuid::new_v4();
    let mut child = Command::new(std::env::current_exe()?);
    child
        .arg("--frontend-child")
        .arg(s.socket())
        .arg(guid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut c = child.spawn()?;
    let out = c.stdout.take().context("frontend stdout")?;
    let front_pid = c.id();
    if let Ok(mut v) = stage.children.lock() {
        v.push(c);
    }
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let key: ResumeKey = line
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("frontend said {line:?}: {e}"))?;
    println!(
        "   handle {key} (client alice@laptop, create GUID {guid}); wrote {:?}",
        String::from_utf8_lossy(DATA)
    );
    s.done("persistent open + write", t);

    let t = s.heading("an NFS-like frontend asks to write the same file");
    let nfs = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("nfs")?,
        InstanceName::new("nfs-b")?,
    )?;
    let w = open_req(
        "bob@desktop",
        "report.txt",
        Rights::READ.union(Rights::WRITE),
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    )?;
    match nfs.open(w.clone()) {
        Err(e) if e.code() == Some(ErrorCode::SharingViolation) => {
            println!("   refused: sharing violation (the SMB-like open shares read only)")
        }
        other => bail!("expected a sharing violation, got {other:?}"),
    }
    s.done("cross-protocol sharing violation", t);

    let t = s.heading("the SMB-like frontend is killed (SIGKILL)");
    stage.kill9(front_pid);
    let t_kill = Instant::now();
    let ctl = FilterClient::connect_control(&s.socket())?;
    let t0 = Instant::now();
    loop {
        let hs = ctl.handles()?;
        if hs
            .iter()
            .any(|h| h.record.key == key && matches!(h.record.conn, ConnState::Disconnected { .. }))
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("handle did not become disconnected");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    s.show(&["--socket", &s.socket().display().to_string(), "handles"])?;
    match nfs.open(w.clone()) {
        Err(e) if e.code() == Some(ErrorCode::FileNotAvailable) => {
            println!("   the disconnected handle still protects the file: NFS-like open gets 'file not available'")
        }
        other => bail!("expected file-not-available, got {other:?}"),
    }
    s.done("frontend crash detected", t);

    let t = s.heading(
        "a replacement frontend (same instance name smb-a) resumes by create GUID and reads",
    );
    let t_replace = Instant::now();
    let smb2 = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb")?,
        InstanceName::new("smb-a")?,
    )?;
    let h = smb2.resume_by_guid(ClientId::new("alice@laptop")?, CreateGuid(guid))?;
    let mut buf = vec![0u8; 64];
    let n = std::fs::File::from(h.fd).read_at(&mut buf, 0)?;
    let frontend_failover = t_replace.elapsed();
    println!(
        "   resumed {} and read {:?}; replacement attach→resume {:.2} ms (kill→resume {:.1} ms)",
        h.info.key,
        String::from_utf8_lossy(buf.get(..n).unwrap_or_default()),
        frontend_failover.as_secs_f64() * 1e3,
        t_kill.elapsed().as_secs_f64() * 1e3
    );
    s.done("frontend failover", t);

    let t = s.heading("filterd is killed (SIGKILL) in the middle of a burst of opens");
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let burst = {
        let (nfs, acked, failed, stop) = (nfs.clone(), acked.clone(), failed.clone(), stop.clone());
        std::thread::Builder::new()
            .name("burst".into())
            .spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let r = open_req(
                        "bob@desktop",
                        &format!("burst-{}.txt", i % 16),
                        Rights::READ.union(Rights::WRITE),
                        Rights::ALL,
                        Disposition::OpenIf,
                        Durability::Persistent { timeout_ms: 60_000 },
                    );
                    match r.map(|r| nfs.open(r)) {
                        Ok(Ok(h)) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                            let _ = nfs.close(h.info.key);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    i += 1;
                }
            })?
    };
    let t0 = Instant::now();
    while acked.load(Ordering::Relaxed) < 50 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    stage.kill9(filterd_pid);
    stop.store(true, Ordering::Relaxed);
    let _ = burst.join();
    println!(
        "   burst: {} opens acknowledged before the crash, {} in flight failed (never acknowledged)",
        acked.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    println!("   post-mortem, straight from LMDB while filterd is down:");
    s.show(&["--state", &s.state.display().to_string(), "status"])?;
    s.done("daemon crash", t);

    let t = s.heading("filterd restarts: persistent handles are reopened by kernel file handle");
    let (pid, restart) = s.start_filterd(stage)?;
    filterd_pid = pid;
    println!(
        "   filterd pid {filterd_pid} serving again after {:.1} ms",
        restart.as_secs_f64() * 1e3
    );
    s.show(&["--socket", &s.socket().display().to_string(), "handles"])?;
    s.done("daemon restart", t);

    let t = s.heading(
        "the SMB-like client replays its create (same GUID): the original open comes back",
    );
    let smb3 = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb")?,
        InstanceName::new("smb-a")?,
    )?;
    let mut replay = open_req(
        "alice@laptop",
        "report.txt",
        Rights::READ.union(Rights::WRITE),
        Rights::READ,
        Disposition::Create,
        Durability::Persistent {
            timeout_ms: 120_000,
        },
    )?;
    replay.create_guid = Some(CreateGuid(guid));
    let h = smb3.replay_open(replay)?;
    let n = std::fs::File::from(h.fd).read_at(&mut buf, 0)?;
    println!(
        "   replay recognised: same handle {} (create action '{}', not a collision), data {:?}",
        h.info.key,
        h.info.create_action,
        String::from_utf8_lossy(buf.get(..n).unwrap_or_default())
    );
    if h.info.key != key {
        bail!("replay returned another handle");
    }
    match nfs.open(w) {
        Err(_) => {
            // The NFS-like frontend's old connection died with the daemon.
            let nfs2 = FilterClient::connect_frontend(
                &s.socket(),
                Protocol::new("nfs")?,
                InstanceName::new("nfs-b")?,
            )?;
            let r = open_req(
                "bob@desktop",
                "report.txt",
                Rights::READ.union(Rights::WRITE),
                Rights::ALL,
                Disposition::Open,
                Durability::None,
            )?;
            match nfs2.open(r) {
                Err(e) if e.code() == Some(ErrorCode::SharingViolation) => {
                    println!("   and its share mode holds across the restart: NFS-like write open refused again")
                }
                other => bail!("expected a sharing violation after restart, got {other:?}"),
            }
        }
        Ok(_) => bail!("the old NFS-like connection should be gone"),
    }
    s.done("replay after restart", t);

    let stats = ctl_stats(&s)?;
    println!("\n── summary");
    for (label, d) in &s.times {
        println!("   {label:<36} {:>9.1} ms", d.as_secs_f64() * 1e3);
    }
    println!(
        "   {:<36} {:>9.2} ms",
        "frontend failover (attach→resume)",
        frontend_failover.as_secs_f64() * 1e3
    );
    println!(
        "   {:<36} {:>9.1} ms",
        "filterd restart→serving",
        restart.as_secs_f64() * 1e3
    );
    for k in [
        "recoveries",
        "replays_detected",
        "resumes",
        "sharing_violations",
        "not_available",
    ] {
        println!(
            "   {:<36} {:>9}",
            k,
            stats.get(k).and_then(|v| v.as_u64()).unwrap_or(0)
        );
    }
    println!("\n(teardown: processes stopped, temporary export removed)");
    Ok(())
}

fn ctl_stats(s: &Story) -> anyhow::Result<serde_json::Value> {
    let text = s.filterctl(&[
        "--socket",
        &s.socket().display().to_string(),
        "stats",
        "--json",
    ])?;
    Ok(serde_json::from_str(&text)?)
}
