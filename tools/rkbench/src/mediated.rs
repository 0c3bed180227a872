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
use std::time::Duration;

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
    start_export_with(filterd, dir, tag, &[])
}

/// As [`start_export`], with `extra` filterd flags.
fn start_export_with(
    filterd: &Path,
    dir: &Path,
    tag: &str,
    extra: &[String],
) -> anyhow::Result<Daemon> {
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
        extra,
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
    let req = OpenRequest::new(
        ClientId::new(format!("bench-client-{i}"))?,
        RelPath::new(format!("f{}", i % FILES))?,
        Access::new(Rights::READ.union(Rights::WRITE))?,
        Rights::ALL,
        Disposition::Open,
        durability,
    );
    for _ in 0..WARM_UP_PAIRS {
        let h = client.open(req.clone())?;
        client.close(h.info.key)?;
    }
    Ok(req)
}

/// One connection's open+close loop.
struct Opener {
    client: FilterClient,
    i: usize,
    durability: Durability,
    req: Option<OpenRequest>,
}

impl crate::gate::Worker for Opener {
    fn warm_up(&mut self) -> anyhow::Result<()> {
        self.req = Some(warm_up(&self.client, self.i, self.durability)?);
        Ok(())
    }
    fn op(&mut self) -> anyhow::Result<()> {
        let req = self
            .req
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no warm-up"))?;
        let h = self.client.open(req)?;
        self.client.close(h.info.key)?;
        Ok(())
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
    open_close_with(filterd, dir, durability, conns, dur, &[])
}

/// As [`open_close`], with `extra` filterd flags (another `--store`).
pub fn open_close_with(
    filterd: &Path,
    dir: &Path,
    durability: Durability,
    conns: usize,
    dur: Duration,
    extra: &[String],
) -> anyhow::Result<Mediated> {
    let tag = format!("med-{}-{conns}-{}", durability.word(), extra.len());
    let d = start_export_with(filterd, dir, &tag, extra)?;
    drive(&d, durability, conns, dur)
}

/// Persistent open+close at `conns` connections as [`open_close`] does, on
/// a daemon that already holds `held` persistent handles (of other files,
/// written into its store before it starts, the way a restart finds them):
/// what a commit costs when the handle table is large, so that where a new
/// key lands in it matters.
pub fn open_close_held(
    filterd: &Path,
    dir: &Path,
    conns: usize,
    held: usize,
    dur: Duration,
) -> anyhow::Result<Mediated> {
    let tag = format!("med-held-{held}-{conns}");
    let _ = std::fs::remove_dir_all(dir.join(&tag));
    let root = dir.join(format!("{tag}/root"));
    let state = dir.join(format!("{tag}/state"));
    crate::restart::prepare(&root, &state, held)?;
    for i in 0..FILES {
        std::fs::write(root.join(format!("f{i}")), b"bench")?;
    }
    let d = Daemon::start_on(
        filterd,
        &root,
        &state,
        &dir.join(format!("{tag}/filterd.log")),
        false,
        &[],
    )?;
    let m = drive(
        &d,
        Durability::Persistent { timeout_ms: 60_000 },
        conns,
        dur,
    );
    drop(d);
    let _ = std::fs::remove_dir_all(dir.join(&tag));
    m
}

/// `conns` connections to `d`, one thread each, open and close their files
/// until `dur` has passed.
fn drive(
    d: &Daemon,
    durability: Durability,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<Mediated> {
    // Connect every client first, so the clock starts with all of them
    // attached. Each asks for time-ordered keys, as the frontends do.
    let mut clients = Vec::with_capacity(conns);
    for i in 0..conns {
        clients.push(FilterClient::connect_frontend_with(
            &d.socket,
            Protocol::new("bench")?,
            InstanceName::new(format!("bench-{i}"))?,
            libfilter::proto::FEATURE_TIME_ORDERED_KEYS,
        )?);
    }
    let workers: Vec<Opener> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| Opener {
            client,
            i,
            durability,
            req: None,
        })
        .collect();
    let (all, wall) = crate::gate::run("bench", workers, dur)?;
    let pairs = all.len() as u64;
    let f = Figure::from_samples(all, pairs, wall);
    let ops_per_commit = ops_per_commit(&d.socket)?;
    Ok(Mediated {
        requests_per_s: 2.0 * f.ops_per_s,
        mean_us: f.mean_us,
        p99_us: f.p99_us,
        ops_per_commit,
    })
}

/// filterd's store operations per commit so far (its `Stats`); 0 before
/// any commit.
pub(crate) fn ops_per_commit(socket: &Path) -> anyhow::Result<f64> {
    Ok(
        match FilterClient::connect_control(socket)?
            .call(libfilter::proto::Request::Stats)?
            .0
        {
            libfilter::proto::Reply::Stats(s) if s.commits > 0 => {
                s.committed_ops as f64 / s.commits as f64
            }
            _ => 0.0,
        },
    )
}

/// The cost of a mandatory-lock check (`CheckIo`) round trip and its
/// one-way `IoDone`, on a file that has one lock of another handle (so the
/// check does real work).
pub fn check_io(filterd: &Path, dir: &Path, dur: Duration) -> anyhow::Result<Figure> {
    let d = start_export(filterd, dir, "checkio")?;
    let fe = FilterClient::connect_frontend(
        &d.socket,
        Protocol::new("bench")?,
        InstanceName::new("bench-io")?,
    )?;
    let req = |client: &str| -> anyhow::Result<OpenRequest> {
        Ok(OpenRequest::new(
            ClientId::new(client)?,
            RelPath::new("f0")?,
            Access::new(Rights::READ.union(Rights::WRITE))?,
            Rights::ALL,
            Disposition::Open,
            Durability::None,
        ))
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
        // The pass goes at once: its `IoDone` (one way) is part of the cost.
        drop(fe.check_io(me.info.key, range, true)?);
        Ok(())
    })
}
