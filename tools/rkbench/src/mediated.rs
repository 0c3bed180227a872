//! Mediated open+close through a real filterd process.
//!
//! For one durability and N connections: a fresh daemon (`--no-fanotify`) on
//! an export of `f0..f63`; N frontend connections, all attached before the
//! clock starts, each driven by its own thread that opens `f{i % 64}` (share
//! all, so connections never conflict) and closes it in a loop until the
//! deadline. A pair's latency is open+close; the rate is reported in
//! requests (an open and a close are two). Also the cost of one
//! mandatory-lock check round trip.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::OpenRequest;

use crate::daemon::Daemon;
use crate::report::Figure;

/// Files in the export; connection `i` opens `f{i % FILES}`.
const FILES: usize = 64;
/// Untimed open+close pairs per connection before the clock starts.
const WARM_UP_PAIRS: usize = 200;

/// The durabilities measured.
pub const KINDS: &[(&str, Durability)] = &[
    ("none", Durability::None),
    ("durable", Durability::Durable { timeout_ms: 60_000 }),
    ("persistent", Durability::Persistent { timeout_ms: 60_000 }),
];

/// Starts filterd on a fresh export `dir/tag/root` holding `f0..f63` and a
/// fresh state dir `dir/tag/state`, and waits until it serves.
pub(crate) fn start_export(filterd: &Path, dir: &Path, tag: &str) -> anyhow::Result<Daemon> {
    let root = dir.join(format!("{tag}/root"));
    let state = dir.join(format!("{tag}/state"));
    let _ = std::fs::remove_dir_all(dir.join(tag));
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&state)?;
    for i in 0..FILES {
        std::fs::write(root.join(format!("f{i}")), b"bench")?;
    }
    Daemon::start_on(
        filterd,
        &root,
        &state,
        &dir.join(format!("{tag}/filterd.log")),
        false,
    )
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

/// The open request of connection `i`, after [`WARM_UP_PAIRS`] untimed
/// open+close pairs with it.
fn warm_up(client: &FilterClient, i: usize, durability: Durability) -> anyhow::Result<OpenRequest> {
    let req = OpenRequest {
        client: ClientId::new(format!("bench-client-{i}"))?,
        path: RelPath::new(format!("f{}", i % FILES))?,
        access: Access::new(Rights::READ.union(Rights::WRITE))?,
        share: Rights::ALL,
        disposition: Disposition::Open,
        durability,
        create_guid: None,
        owner: None,
        lease: None,
        no_wait: false,
    };
    for _ in 0..WARM_UP_PAIRS {
        let h = client.open(req.clone())?;
        client.close(h.info.key)?;
    }
    Ok(req)
}

/// Reports a bench thread ready when dropped, so a thread whose warm-up
/// failed or panicked still counts and the others are not kept waiting.
pub(crate) struct Ready(pub(crate) crossbeam_channel::Sender<()>);

impl Drop for Ready {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

/// Joins the bench threads: all their samples, or the first failure.
pub(crate) fn collect(
    threads: Vec<std::thread::JoinHandle<anyhow::Result<Vec<u64>>>>,
) -> anyhow::Result<Vec<u64>> {
    let mut all = Vec::new();
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(ns)) => all.extend(ns),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow::anyhow!("a bench thread panicked"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(all),
    }
}

/// `conns` connections (one thread each) open and close files in a loop.
pub fn open_close(
    filterd: &Path,
    dir: &Path,
    durability: Durability,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<Mediated> {
    let d = start_export(filterd, dir, &format!("med-{}-{conns}", durability.word()))?;
    // Connect every client first, so the clock starts with all of them
    // attached.
    let mut clients = Vec::with_capacity(conns);
    for i in 0..conns {
        clients.push(FilterClient::connect_frontend(
            &d.socket,
            Protocol::new("bench")?,
            InstanceName::new(format!("bench-{i}"))?,
        )?);
    }
    // The start gate: each thread reports ready after its warm-up (its
    // `Ready` guard sends even if the warm-up fails or panics), then waits
    // for `go` to close; dropping `go_tx` starts every clock at once.
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<()>(conns);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
    let abort = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(conns);
    for (i, client) in clients.into_iter().enumerate() {
        let ready = Ready(ready_tx.clone());
        let (go, aborted) = (go_rx.clone(), abort.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("bench-{i}"))
            .spawn(move || -> anyhow::Result<Vec<u64>> {
                // Warm up (daemon caches, CPU frequency) before the clock.
                let warm = warm_up(&client, i, durability);
                drop(ready);
                let _ = go.recv(); // returns when `go_tx` is dropped
                let req = warm?;
                let mut ns = Vec::with_capacity(1 << 14);
                if aborted.load(Ordering::Relaxed) {
                    return Ok(ns);
                }
                let t0 = Instant::now();
                while t0.elapsed() < dur {
                    let t = Instant::now();
                    let h = client.open(req.clone())?;
                    client.close(h.info.key)?;
                    ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                }
                Ok(ns)
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                abort.store(true, Ordering::Relaxed);
                drop(go_tx);
                drop(collect(threads));
                return Err(e).context("spawning a bench thread");
            }
        }
    }
    drop(ready_tx);
    for _ in 0..conns {
        ready_rx
            .recv()
            .context("a bench thread went away before its warm-up ended")?;
    }
    drop(go_tx);
    let t0 = Instant::now();
    let all = collect(threads)?;
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
    let d = start_export(filterd, dir, "checkio")?;
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
            no_wait: false,
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
