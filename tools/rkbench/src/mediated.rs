//! Mediated open+close through a real filterd process.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::OpenRequest;

use crate::report::Figure;

/// The durabilities measured.
pub const KINDS: &[(&str, Durability)] = &[
    ("none", Durability::None),
    ("durable", Durability::Durable { timeout_ms: 60_000 }),
    ("persistent", Durability::Persistent { timeout_ms: 60_000 }),
];

/// A filterd process, stopped on drop.
pub struct Daemon {
    child: Child,
    /// Its socket.
    pub socket: std::path::PathBuf,
}

impl Daemon {
    /// Starts filterd on fresh dirs under `dir` and waits until it answers.
    pub fn start(filterd: &Path, dir: &Path, tag: &str) -> anyhow::Result<Daemon> {
        let root = dir.join(format!("{tag}/root"));
        let state = dir.join(format!("{tag}/state"));
        let _ = std::fs::remove_dir_all(dir.join(tag));
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&state)?;
        for i in 0..64 {
            std::fs::write(root.join(format!("f{i}")), b"bench")?;
        }
        Self::start_on(
            filterd,
            &root,
            &state,
            &dir.join(format!("{tag}/filterd.log")),
            false,
        )
    }

    /// Starts filterd on the given root and state dir (with fanotify when
    /// `mediated`) and waits until it answers.
    pub fn start_on(
        filterd: &Path,
        root: &Path,
        state: &Path,
        log: &Path,
        mediated: bool,
    ) -> anyhow::Result<Daemon> {
        let log = std::fs::File::create(log)?;
        let mut cmd = Command::new(filterd);
        cmd.arg("--root").arg(root).arg("--state").arg(state);
        if !mediated {
            cmd.arg("--no-fanotify");
        }
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting filterd")?;
        let mut d = Daemon {
            child,
            socket: state.join("filterd.sock"),
        };
        let t0 = Instant::now();
        while FilterClient::connect_control(&d.socket).is_err() {
            if let Ok(Some(st)) = d.child.try_wait() {
                bail!("filterd exited: {st}");
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("filterd not ready after 20 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
    }
}

/// Open+close pairs through filterd.
pub struct Mediated {
    /// Requests per second (an open and a close are two).
    pub requests_per_s: f64,
    /// Mean µs per open+close pair.
    pub mean_us: f64,
    /// p99 µs per pair.
    pub p99_us: f64,
    /// Store operations per LMDB commit (group-commit batch size).
    pub ops_per_commit: f64,
}

/// `conns` connections (one thread each) open and close files in a loop.
pub fn open_close(
    filterd: &Path,
    dir: &Path,
    durability: Durability,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<Mediated> {
    let d = Daemon::start(filterd, dir, &format!("med-{}-{conns}", durability.word()))?;
    let barrier = Arc::new(Barrier::new(conns + 1));
    let mut threads = Vec::new();
    for i in 0..conns {
        let client = FilterClient::connect_frontend(
            &d.socket,
            Protocol::new("bench")?,
            InstanceName::new(format!("bench-{i}"))?,
        )?;
        let barrier = barrier.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("bench-{i}"))
                .spawn(move || -> anyhow::Result<Vec<u64>> {
                    let req = OpenRequest {
                        client: ClientId::new(format!("bench-client-{i}"))?,
                        path: RelPath::new(format!("f{}", i % 64))?,
                        access: Access::new(Rights::READ.union(Rights::WRITE))?,
                        share: Rights::ALL,
                        disposition: Disposition::Open,
                        durability,
                        create_guid: None,
                        owner: None,
                        lease: None,
                    };
                    let mut ns = Vec::with_capacity(1 << 14);
                    // Warm up (daemon caches, CPU frequency) before the clock.
                    for _ in 0..200 {
                        let h = client.open(req.clone())?;
                        client.close(h.info.key)?;
                    }
                    barrier.wait();
                    let t0 = Instant::now();
                    while t0.elapsed() < dur {
                        let t = Instant::now();
                        let h = client.open(req.clone())?;
                        client.close(h.info.key)?;
                        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                    }
                    Ok(ns)
                })?,
        );
    }
    barrier.wait();
    let t0 = Instant::now();
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("bench thread panicked"))??,
        );
    }
    let wall = t0.elapsed();
    let pairs = all.len() as u64;
    let f = Figure::from_samples(all, pairs, wall);
    let ops_per_commit = match FilterClient::connect_control(&d.socket)?
        .call(libfilter::proto::Request::Stats)?
        .0
    {
        libfilter::proto::Reply::Stats(s) if s.commits > 0 => {
            s.committed_ops as f64 / s.commits as f64
        }
        _ => 0.0,
    };
    Ok(Mediated {
        requests_per_s: 2.0 * f.ops_per_s,
        mean_us: f.mean_us,
        p99_us: f.p99_us,
        ops_per_commit,
    })
}

/// The cost of a mandatory-lock check (`CheckIo`) round trip, on a file
/// that has one lock of another handle (so the check does real work).
pub fn check_io(filterd: &Path, dir: &Path, dur: Duration) -> anyhow::Result<Figure> {
    let d = Daemon::start(filterd, dir, "checkio")?;
    let fe = FilterClient::connect_frontend(
        &d.socket,
        Protocol::new("bench")?,
        InstanceName::new("bench-io")?,
    )?;
    let req = |client: &str| -> anyhow::Result<OpenRequest> {
        Ok(OpenRequest {
            client: ClientId::new(client)?,
            path: RelPath::new("f0")?,
            access: Access::new(Rights::READ.union(Rights::WRITE))?,
            share: Rights::ALL,
            disposition: Disposition::Open,
            durability: Durability::None,
            create_guid: None,
            owner: None,
            lease: None,
        })
    };
    let holder = fe.open(req("holder")?)?;
    fe.lock(
        holder.info.key,
        vec![libfilter::locks::LockOp {
            range: libfilter::locks::LockRange {
                offset: 1 << 20,
                length: 4096,
            },
            exclusive: true,
            unlock: false,
        }],
        None,
    )?;
    let me = fe.open(req("reader")?)?;
    let range = libfilter::locks::LockRange {
        offset: 0,
        length: 65536,
    };
    crate::raw::timed(dur, || {
        fe.check_io(me.info.key, range, true)?;
        Ok(())
    })
}
