//! `rkdemo --cluster` (`make demo-cluster`): the two-machine story. A
//! 3-member etcd cluster on loopback holds the resume-key table; node A
//! (filterd + smbshim, its own runtime dir) owns it, node B (the same,
//! `--standby`) waits. Alice opens a persistent handle on A and writes;
//! all of node A is SIGKILLed; B takes over within the lease, and alice
//! reconnects to B's smbshim and gets her handle and her recorded reply.
//! Both nodes share one export directory (on real machines: a cluster or
//! network filesystem); filterd runs with --no-fanotify on it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use uuid::Uuid;

use crate::stage::Stage;
use crate::{alice_session, ms, need, report_create, Story, DATA};

/// The lease: node B may take over this long after A stops renewing.
const TTL_SECS: u64 = 2;

/// Starts three etcd members under `dir`; returns their client ports.
fn start_etcd(stage: &Stage, dir: &Path) -> anyhow::Result<Vec<u16>> {
    let ports: Vec<(String, u16, u16)> = libfilter::etcd::spare_loopback_ports(6)?
        .chunks(2)
        .zip(1..)
        .filter_map(|(p, i)| Some((format!("e{i}"), *p.first()?, *p.get(1)?)))
        .collect();
    let initial = ports
        .iter()
        .map(|(n, _, p)| format!("{n}=http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    for (name, client, peer) in &ports {
        let log = std::fs::File::create(dir.join(format!("etcd-{name}.log")))?;
        let client = format!("http://127.0.0.1:{client}");
        let peer = format!("http://127.0.0.1:{peer}");
        stage.spawn(
            Command::new("etcd")
                .args(["--name", name, "--data-dir"])
                .arg(dir.join(format!("etcd-{name}")))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )?;
    }
    let ports: Vec<u16> = ports.iter().map(|(_, c, _)| *c).collect();
    for p in &ports {
        crate::wait_until(Duration::from_secs(30), || {
            libfilter::etcd::member_healthy(*p)
        })
        .with_context(|| format!("etcd on port {p} did not become healthy"))?;
    }
    Ok(ports)
}

/// One machine: its runtime dir and filterd.
struct Node {
    story: Story,
}

impl Node {
    fn new(bin: &Path, root: &Path, dir: &Path, name: &str) -> anyhow::Result<Node> {
        let state = dir.join(name);
        std::fs::create_dir_all(&state)?;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750))?;
        Ok(Node {
            story: Story {
                bin: bin.to_owned(),
                root: root.to_owned(),
                state: state.clone(),
                dir: state,
                fanotify: false,
                step: 0,
                times: vec![],
            },
        })
    }

    fn spawn_filterd(&self, stage: &Stage, url: &str, standby: bool) -> anyhow::Result<u32> {
        let s = &self.story;
        let mut cmd = Command::new(s.bin.join("filterd"));
        cmd.arg("--root")
            .arg(&s.root)
            .arg("--state")
            .arg(&s.state)
            .args(["--no-fanotify", "--store", url])
            .args(["--lease-ttl-secs", &TTL_SECS.to_string()])
            .args(standby.then_some("--standby"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(s.log("filterd")?);
        stage.spawn(&mut cmd)
    }

    /// Waits until this node's filterd answers `filterctl status`.
    fn wait_serving(&self, stage: &Stage, pid: u32, limit: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            if self.story.serving() {
                return Ok(());
            }
            if t0.elapsed() > limit || !stage.alive(pid) {
                bail!(
                    "filterd did not serve; see {}",
                    self.story.dir.join("filterd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `filterctl status`, the lines that name the store.
    fn show_store(&self) -> anyhow::Result<()> {
        let sock = self.story.socket().display().to_string();
        say!("   $ filterctl --socket {sock} status");
        for line in self
            .story
            .filterctl(&["--socket", &sock, "status"])?
            .lines()
        {
            let l = line.to_lowercase();
            if l.contains("store") || l.contains("owner") || l.contains("handles") {
                say!("     {line}");
            }
        }
        Ok(())
    }
}

/// Plays the story; `bin` holds the programs, `dir` is the demo's
/// temporary directory.
pub fn run(bin: &Path, dir: &Path, stage: &Stage) -> anyhow::Result<()> {
    let installed = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()))
        .unwrap_or(false);
    if !installed {
        bail!("no etcd binary: install Debian's etcd-server (`make demo-cluster` does)");
    }
    let root: PathBuf = dir.join("export");
    std::fs::create_dir_all(&root)?;
    say!(
        "rkfilter two-machine demo — shared export {}; etcd holds the table",
        root.display()
    );
    let mut step = 0;
    let mut heading = |title: &str| -> Result<Instant, crate::StdoutGone> {
        step += 1;
        say!("\n── {step}. {title}");
        Ok(Instant::now())
    };

    let t = heading("a 3-member etcd cluster on loopback")?;
    let ports = start_etcd(stage, dir)?;
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let url = format!("etcd://{}/rk/demo", hosts.join(","));
    say!("   members on ports {ports:?}; the table is {url}");
    say!("   ({:.1} ms)", ms(t.elapsed()));

    let t = heading("node A: filterd owns the table, smbshim; node B: filterd --standby")?;
    let a = Node::new(bin, &root, dir, "node-a")?;
    let b = Node::new(bin, &root, dir, "node-b")?;
    let a_pid = a.spawn_filterd(stage, &url, false)?;
    a.wait_serving(stage, a_pid, Duration::from_secs(20))?;
    let b_pid = b.spawn_filterd(stage, &url, true)?;
    let (a_smb, a_addr) = a.story.start_shim(stage, "smbshim", "smb-demo")?;
    a.show_store()?;
    say!("   node B's filterd (pid {b_pid}) waits: its runtime dir is its own");
    say!("   ({:.1} ms)", ms(t.elapsed()));

    let t = heading("alice opens report.txt on node A: persistent; writes (op_id 1)")?;
    let alice = Uuid::new_v4();
    let create_guid = Uuid::new_v4();
    let smb = smbl::Client::connect(a_addr.as_str())?;
    let sid = alice_session(&smb, alice)?;
    let r = need(smb.create(&report_create(sid, create_guid))?, "CREATE")?;
    let file_id = r.file_id().context("no file_id")?.to_owned();
    let w = need(smb.write(sid, &file_id, 0, DATA, Some(1), false)?, "WRITE")?;
    say!(
        "   file_id {file_id}; wrote {} bytes; the handle is in etcd",
        w.get("count").cloned().unwrap_or_default()
    );
    say!("   ({:.1} ms)", ms(t.elapsed()));

    let t = heading("node A dies: SIGKILL its filterd and smbshim")?;
    stage.kill9(a_smb);
    stage.kill9(a_pid);
    drop(smb);
    let t_kill = Instant::now();
    b.wait_serving(stage, b_pid, Duration::from_secs(TTL_SECS + 10))?;
    let took = t_kill.elapsed();
    say!(
        "   node B took over and serves {:.0} ms after the kill (lease {TTL_SECS} s)",
        ms(took)
    );
    b.show_store()?;
    say!("   ({:.1} ms)", ms(t.elapsed()));

    let t = heading("smbshim on node B (same instance); alice reconnects there")?;
    let (_b_smb, b_addr) = b.story.start_shim(stage, "smbshim", "smb-demo")?;
    let smb = smbl::Client::connect(b_addr.as_str())?;
    let sid = alice_session(&smb, alice)?;
    need(
        smb.reconnect(sid, &file_id, create_guid, None)?,
        "RECONNECT",
    )?;
    let again = need(
        smb.write(sid, &file_id, 0, b"XXXX", Some(1), true)?,
        "WRITE replay",
    )?;
    let data = need(smb.read(sid, &file_id, 0, 64)?, "READ")?
        .data()
        .unwrap_or_default();
    say!(
        "   RECONNECT ok; the replayed WRITE op_id 1 gets its recorded reply (count {}), not a second write",
        again.get("count").cloned().unwrap_or_default()
    );
    say!("   read {:?}", String::from_utf8_lossy(&data));
    if data != DATA {
        bail!("node B read {:?}", String::from_utf8_lossy(&data));
    }
    say!(
        "   kill → alice reading on node B: {:.0} ms",
        ms(t_kill.elapsed())
    );
    say!("   ({:.1} ms)", ms(t.elapsed()));
    say!(
        "\nthe two-machine story is done: the handle moved to another node with the table in etcd"
    );
    Ok(())
}
