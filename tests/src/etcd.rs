//! A real etcd cluster on loopback for the etcd store's tests: each member
//! in its own data dir under the scratch dir, on free ports, healthy by
//! polling its `/health`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{wait_for, Scratch};

/// Whether the etcd binary is installed; when it is not, a note (skip)
/// outside CI and a failure under `CI=true`.
pub fn etcd_available(test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()))
        .unwrap_or(false);
    if !found {
        assert!(
            !crate::in_ci(),
            "etcd is not installed (Debian etcd-server); .ci/run installs it"
        );
        eprintln!(
            "skipping {test}: the etcd binary is not installed (apt-get install etcd-server)"
        );
    }
    found
}

/// A "machine" of a two-node test: its own scratch dir (runtime and state
/// dir), its export root a symlink to the shared `export`.
pub fn node(name: &str, export: &std::path::Path) -> Scratch {
    let s = Scratch::new(name);
    std::fs::remove_dir(s.root()).expect("rmdir root");
    std::os::unix::fs::symlink(export, s.root()).expect("symlink the shared export");
    s
}

/// filterd on node scratch `s` with the table in etcd at `url`, lease TTL
/// `ttl` seconds, `--standby` when `standby`, and `flags` besides; not
/// waited for.
pub fn node_filterd(
    s: &Scratch,
    url: &str,
    ttl: &str,
    standby: bool,
    flags: &[&str],
) -> crate::Filterd {
    let mut all = vec!["--store", url, "--lease-ttl-secs", ttl];
    all.extend_from_slice(flags);
    if standby {
        all.push("--standby");
    }
    crate::Filterd::spawn(s, &all, &[])
}

/// Two nodes `NAME-a` and `NAME-b` on `export` and the table at `url`
/// ([`node_filterd`] with `ttl` and `flags`): A owning it (ready), B
/// `--standby` (waiting for the owner). (A's scratch, A, B's, B).
pub fn owner_and_standby(
    name: &str,
    export: &std::path::Path,
    url: &str,
    ttl: &str,
    flags: &[&str],
) -> (Scratch, crate::Filterd, Scratch, crate::Filterd) {
    let sa = node(&format!("{name}-a"), export);
    let sb = node(&format!("{name}-b"), export);
    let a = node_filterd(&sa, url, ttl, false, flags);
    a.wait_ready();
    let b = node_filterd(&sb, url, ttl, true, flags);
    b.wait_log("standby: waiting for the owner", Duration::from_secs(20));
    (sa, a, sb, b)
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A 3-member etcd cluster on loopback.
pub struct Cluster {
    dir: std::path::PathBuf,
    members: Vec<Member>,
    initial: String,
    /// More flags for every member (`--quota-backend-bytes N`, say).
    extra: Vec<String>,
}

impl Cluster {
    /// Starts an `n`-member cluster and waits until every member is healthy.
    pub fn start(s: &Scratch, n: usize) -> Cluster {
        Cluster::start_with(s, n, &[])
    }

    /// [`Cluster::start`] with more flags for every member.
    pub fn start_with(s: &Scratch, n: usize, extra: &[&str]) -> Cluster {
        let c = Cluster::spawn_all(s, n, extra);
        for i in 0..n {
            c.wait_healthy(i);
        }
        c.wait_agreed_leader();
        c
    }

    /// Starts an `n`-member cluster and returns at once, waiting for
    /// nothing: its members may still be electing their first leader, and
    /// may change leaders again, while the test's first requests arrive.
    pub fn start_unsettled(s: &Scratch, n: usize) -> Cluster {
        Cluster::spawn_all(s, n, &[])
    }

    fn spawn_all(s: &Scratch, n: usize, extra: &[&str]) -> Cluster {
        let dir = s.dir.join("etcd");
        let ports = libfilter::etcd::spare_loopback_ports(2 * n).expect("free loopback ports");
        let members: Vec<Member> = ports
            .chunks(2)
            .zip(1..)
            .map(|(p, i)| Member {
                name: format!("e{i}"),
                client: p[0],
                peer: p[1],
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            members,
            initial,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    /// Polls until every member names the same leader: a cluster just
    /// started may still change leaders, and a test's first claim and
    /// commits would meet that election (a CI run's owner met "leader
    /// changed" 20 ms after its claim and stepped down).
    /// On a timeout it panics with what each member said and the end of
    /// each member's log.
    fn wait_agreed_leader(&self) {
        let t0 = std::time::Instant::now();
        loop {
            let said: Vec<Option<(u64, u64)>> =
                (0..self.members.len()).map(|i| self.status(i)).collect();
            let leaders: Option<Vec<u64>> = said.iter().map(|s| s.map(|(_, l)| l)).collect();
            if let Some(leaders) = leaders {
                if leaders
                    .first()
                    .is_some_and(|first| *first != 0 && leaders.iter().all(|l| l == first))
                {
                    return;
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                panic!(
                    "timed out after 30s waiting for the etcd members to agree on a leader; \
                     (own id, leader id) per member: {said:?}\n{}",
                    self.log_tails(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines of every member's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name)))
                .unwrap_or_default();
            let all: Vec<&str> = log.lines().collect();
            out.push_str(&format!(
                "--- {} (client {}, peer {}):\n",
                m.name, m.client, m.peer
            ));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// (Re)starts member `i` on its data dir.
    pub fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        std::fs::create_dir_all(&data).expect("etcd data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))
            .expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-cluster",
                &self.initial,
                "--initial-cluster-state",
                "new",
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// Polls the member's /health until it reports a healthy cluster.
    pub fn wait_healthy(&self, i: usize) {
        let port = self.members[i].client;
        wait_for(
            &format!("etcd member {i} healthy"),
            Duration::from_secs(30),
            || libfilter::etcd::member_healthy(port).then_some(()),
        );
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The client port of member `i`.
    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client
    }

    /// `etcd://` URL of every member, with `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        format!("etcd://{}/{prefix}", hosts.join(","))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

impl Cluster {
    /// Sends member `i` `sig` (SIGSTOP/SIGCONT to stall it).
    pub fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.members[i].child {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
            nix::sys::signal::kill(pid, sig).expect("signal etcd");
        }
    }

    /// Stalls member `i` for `how_long` (SIGSTOP, then SIGCONT) and waits
    /// until it is healthy again.
    pub fn stall(&self, i: usize, how_long: Duration) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
        // The stall itself (the scenario), not a wait for readiness.
        std::thread::sleep(how_long);
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
        self.wait_healthy(i);
    }

    /// Makes sure member `i` is a follower: if it leads, hands the
    /// leadership to another member and waits until one leads.
    pub fn make_follower(&self, i: usize) {
        if self.leader() != i {
            return;
        }
        raw_etcd(self.members[i].client, async |c| {
            let me = c.status().await?.header().map(|h| h.member_id());
            let list = c.member_list().await?;
            match list
                .members()
                .iter()
                .map(|m| m.id())
                .find(|id| Some(*id) != me)
            {
                Some(other) => c.move_leader(other).await.map(drop),
                None => Ok(()),
            }
        });
        wait_for("another leader", Duration::from_secs(30), || {
            (self.leader() != i).then_some(())
        });
    }

    /// The member that is the raft leader now (polled until one says so).
    pub fn leader(&self) -> usize {
        wait_for("an etcd leader", Duration::from_secs(30), || {
            (0..self.members.len()).find(|&i| {
                member_status(self.members[i].client).is_some_and(|(me, leader)| me == leader)
            })
        })
    }
}

impl Cluster {
    /// Member `i`'s own id and the id of the leader it knows (0: none),
    /// or `None` when it does not answer within a second.
    pub fn status(&self, i: usize) -> Option<(u64, u64)> {
        member_status(self.members.get(i)?.client)
    }
}

/// Member `port`'s own id and the leader's id it knows.
fn member_status(port: u16) -> Option<(u64, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(1));
        let mut c = etcd_client::Client::connect([format!("http://127.0.0.1:{port}")], Some(opts))
            .await
            .ok()?;
        let s = c.status().await.ok()?;
        Some((s.header()?.member_id(), s.leader()))
    })
}

/// Raw etcd client calls (ballast, compaction, defragmentation, alarms,
/// leadership) on member `port`, on a runtime of their own.
pub fn raw_etcd<T>(
    port: u16,
    f: impl AsyncFnOnce(&mut etcd_client::Client) -> Result<T, etcd_client::Error>,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([format!("http://127.0.0.1:{port}")], None)
            .await
            .expect("connect to etcd");
        f(&mut c).await.expect("etcd call")
    })
}

/// A TCP proxy on loopback that forwards each byte to `target` after a
/// settable one-way delay (each direction): a slow link between filterd
/// and etcd (this CI's kernels have no `tc netem`). Every connection gets
/// a reader and a writer thread per direction; the writer holds each
/// chunk until its arrival time plus the delay. Stops accepting when
/// dropped (connections made end with their peers).
pub struct DelayProxy {
    /// The port to connect to instead of the target's.
    pub port: u16,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DelayProxy {
    /// Forwards to `127.0.0.1:target`, with no delay until
    /// [`DelayProxy::set_delay`].
    pub fn start(target: u16) -> DelayProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the delay proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, st) = (delay_ms.clone(), stop.clone());
        std::thread::spawn(move || {
            for c in listener.incoming() {
                if st.load(Ordering::Acquire) {
                    return;
                }
                let Ok(c) = c else { continue };
                let Ok(u) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                for (a, b) in [(&c, &u), (&u, &c)] {
                    let (Ok(a), Ok(b)) = (a.try_clone(), b.try_clone()) else {
                        continue;
                    };
                    let _ = (a.set_nodelay(true), b.set_nodelay(true));
                    delayed_pump(a, b, d.clone());
                }
            }
        });
        DelayProxy {
            port,
            delay_ms,
            stop,
        }
    }

    /// Sets the one-way delay (each direction) for bytes read from now on.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms
            .store(ms, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        // Wake the accept loop so it sees `stop`.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` to `to`, each chunk sent no sooner than the delay after
/// it was read (the delay read as the chunk arrives).
fn delayed_pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let due = std::time::Instant::now()
                + Duration::from_millis(delay_ms.load(std::sync::atomic::Ordering::Acquire));
            if tx
                .send((due, buf.get(..n).unwrap_or_default().to_vec()))
                .is_err()
                || n == 0
            {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            // The link's delay itself, not a wait for readiness.
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            if chunk.is_empty() {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
    });
}
