//! Restart recovery: time from `filterd` start to serving with N persistent
//! handles in the store, beside the raw time to `open_by_handle_at` the same
//! files (the work recovery cannot avoid).
//!
//! The state is prepared offline, the way a crashed daemon leaves it: N files
//! in the export root and N persistent handle records written straight into
//! the LMDB store through `libfilter::store`.
//!
//! Each start also gives filterd's memory once serving (`/proc/PID/status`)
//! and the LMDB data file's size: against a start with no handle, the
//! memory each handle costs, beside the bytes its record takes on disk.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use libfilter::model::*;
use libfilter::store::{Store, StoreOp};

use crate::daemon::Daemon;

/// One measured size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestartFigure {
    /// Persistent handles in the store.
    pub handles: usize,
    /// filterd start to its first hello answered, ms.
    pub start_to_serving_ms: f64,
    /// Raw `open_by_handle_at` + close of the same files, ms.
    pub raw_open_by_handle_ms: f64,
    /// Handles the daemon reported recovered.
    pub recovered: u64,
    /// filterd's resident set once serving, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Of which anonymous memory (heap: the engine's tables), KiB.
    pub rss_anon_kib: u64,
    /// Of which file pages (the LMDB map pages recovery read), KiB.
    pub rss_file_kib: u64,
    /// Disk blocks the LMDB data file holds, bytes (0 for etcd).
    pub stored_bytes: u64,
    /// CPU filterd used from its start to serving (user + system, all its
    /// threads; `/proc/PID/stat`, 10 ms ticks), ms.
    pub cpu_ms: f64,
}

/// User + system CPU of `pid` so far (all threads), ms.
fn cpu_of(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the line.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {i} of /proc/{pid}/stat"))
    };
    // USER_HZ: 100 on every Linux port (the ABI fixes it).
    Ok((ticks(11)? + ticks(12)?) as f64 * 10.0)
}

/// `VmRSS`, `RssAnon` and `RssFile` of `pid`, KiB.
fn rss_of(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?, field("RssFile:")?))
}

/// `n` files under `root` and a persistent handle record of each in a
/// fresh LMDB store in `state`; the files' kernel handles.
pub(crate) fn prepare(root: &Path, state: &Path, n: usize) -> anyhow::Result<Vec<KernelHandle>> {
    let store = Store::open(state, libfilter::store::DEFAULT_MAP_SIZE)?;
    let (handles, ops) = files_and_records(root, state, n)?;
    for batch in ops.chunks(10_000) {
        store.apply(batch)?;
    }
    Ok(handles)
}

/// `n` files under `root` and a persistent handle record for each.
fn files_and_records(
    root: &Path,
    state: &Path,
    n: usize,
) -> anyhow::Result<(Vec<KernelHandle>, Vec<StoreOp>)> {
    std::fs::create_dir_all(root)?;
    std::fs::create_dir_all(state)?;
    let rootfd = std::fs::File::open(root)?;
    let mut handles = Vec::with_capacity(n);
    let mut batch = Vec::with_capacity(n);
    let protocol = Protocol::new("bench")?;
    let frontend = InstanceName::new("bench-1")?;
    for i in 0..n {
        let name = format!("r{i}");
        let path = RelPath::new(name.clone())?;
        let fd = libfilter::sys::openat2_beneath(
            rootfd.as_fd(),
            &name,
            libc::O_RDWR | libc::O_CREAT,
            0o644,
        )?;
        let st = nix::sys::stat::fstat(fd.as_fd())?;
        let kh =
            libfilter::sys::file_handle_of(fd.as_fd()).context("file handles unsupported here")?;
        handles.push(kh.clone());
        batch.push(StoreOp::PutHandle(Box::new(HandleRecord {
            key: ResumeKey::new_random(),
            protocol: protocol.clone(),
            frontend: frontend.clone(),
            client: ClientId::new(format!("client-{}", i % 64))?,
            create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
            owner: None,
            path,
            file: FileId {
                dev: st.st_dev,
                ino: st.st_ino,
            },
            kernel_handle: Some(kh),
            access: Access::new(Rights::READ.union(Rights::WRITE))?,
            share: Rights::READ,
            durability: Durability::Persistent { timeout_ms: 60_000 },
            conn: ConnState::Connected,
            create_action: CreateAction::Created,
            opened_ms: now_ms(),
            locks: Vec::new(),
            lock_sequence: Vec::new(),
            lease: None,
            delete_on_close: false,
            share_group: None,
            lock_owner: None,
            stat: false,
            share_exempt: false,
            through_link: false,
            attached_by: 0,
        })));
    }
    Ok((handles, batch))
}

fn raw_open_by_handle(root: &Path, handles: &[KernelHandle]) -> anyhow::Result<Duration> {
    let rootfd = std::fs::File::open(root)?;
    let t0 = Instant::now();
    for h in handles {
        let fd = libfilter::sys::open_by_handle(rootfd.as_fd(), h, libc::O_RDWR)?;
        drop(fd);
    }
    Ok(t0.elapsed())
}

/// Measures one size in `dir` (created fresh, removed after).
pub fn measure(filterd: &Path, dir: &Path, n: usize) -> anyhow::Result<RestartFigure> {
    let root = dir.join(format!("restart-{n}/root"));
    let state = dir.join(format!("restart-{n}/state"));
    let handles = prepare(&root, &state, n)?;
    let f = start_to_serving(filterd, dir, n, &handles, &[])?;
    let _ = std::fs::remove_dir_all(dir.join(format!("restart-{n}")));
    Ok(f)
}

/// The same with the table in etcd (`hosts`: its members), for each of
/// `filterds` in turn on the same table: the handles are written there
/// once by an owner that then stops cleanly, and each start finds the
/// table the one before stopped cleanly with (old and new binaries
/// alternated in the same window, or one binary started again). Also
/// returns the raw time to page through the table's keys (ms).
pub fn measure_etcd_each(
    filterds: &[&Path],
    dir: &Path,
    n: usize,
    hosts: &str,
) -> anyhow::Result<(Vec<RestartFigure>, f64)> {
    use libfilter::etcd::{EtcdStore, EtcdUrl};
    use libfilter::store::StateStore;
    let root = dir.join(format!("restart-{n}/root"));
    let state = dir.join(format!("restart-{n}/state"));
    let prefix = format!("rkbench/restart-{}", uuid::Uuid::new_v4().simple());
    let url = format!("etcd://{hosts}/{prefix}");
    let (handles, ops) = files_and_records(&root, &state, n)?;
    let parsed = EtcdUrl::parse(&url).map_err(anyhow::Error::msg)?;
    {
        let store = EtcdStore::connect(&parsed, Duration::from_secs(4), Duration::ZERO)?;
        store.claim()?;
        let each: Vec<&[StoreOp]> = ops.iter().map(std::slice::from_ref).collect();
        for part in each.chunks(1024) {
            store.commit(part)?;
        }
        store.clean_shutdown()?;
    }
    let port = hosts
        .split(',')
        .next()
        .and_then(|h| h.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .context("an etcd port")?;
    // The store's keys: its prefix has the leading `/` (reading `prefix`
    // as given found no key at all, so the baseline was the file look
    // alone until round 8).
    let (page, keys) = crate::etcd::raw_page_through(port, &parsed.prefix)?;
    anyhow::ensure!(
        keys >= n,
        "the raw page-through read {keys} keys under {}, not the table's {n}",
        parsed.prefix
    );
    let page = page.min(crate::etcd::raw_page_through(port, &parsed.prefix)?.0);
    let mut figures = Vec::with_capacity(filterds.len());
    for filterd in filterds {
        let args = ["--store".to_owned(), url.clone()];
        figures.push(start_to_serving(filterd, dir, n, &handles, &args)?);
    }
    let _ = std::fs::remove_dir_all(dir.join(format!("restart-{n}")));
    Ok((figures, page.as_secs_f64() * 1e3))
}

fn start_to_serving(
    filterd: &Path,
    dir: &Path,
    n: usize,
    handles: &[KernelHandle],
    extra: &[String],
) -> anyhow::Result<RestartFigure> {
    let root = dir.join(format!("restart-{n}/root"));
    let state = dir.join(format!("restart-{n}/state"));
    // Warm the inode cache the same way for both: a crash leaves it warm.
    let raw = raw_open_by_handle(&root, handles)?;
    let raw = raw.min(raw_open_by_handle(&root, handles)?);
    let log = dir.join(format!("restart-{n}/filterd.log"));
    let t0 = Instant::now();
    let mut d = Daemon::spawn(filterd, &root, &state, &log, false, extra)?;
    let client = d.wait_serving(Duration::from_micros(500), Duration::from_secs(120))?;
    let serving = t0.elapsed();
    let cpu_ms = cpu_of(d.pid())?;
    let recovered = match client.call(libfilter::proto::Request::Stats)?.0 {
        libfilter::proto::Reply::Stats(s) => s.recoveries,
        _ => 0,
    };
    let (rss_kib, rss_anon_kib, rss_file_kib) = rss_of(d.pid())?;
    let stored_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(state.join("lmdb/data.mdb")).map_or(0, |m| m.blocks() * 512)
    };
    drop(client);
    drop(d);
    // A fast start that lost handles is no figure at all (the directory
    // and its log are kept to look at).
    anyhow::ensure!(
        recovered == u64::try_from(n)?,
        "filterd recovered {recovered} of {n} persistent handles (see {})",
        log.display()
    );
    if std::env::var_os("RKBENCH_FILTERD_LOG").is_some() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let phases = ["recovery done", "etcd claim", "etcd table read"];
        for line in text
            .lines()
            .filter(|l| phases.iter().any(|p| l.contains(p)))
        {
            eprintln!("rkbench: {n} handles: {line}");
        }
    }
    Ok(RestartFigure {
        handles: n,
        start_to_serving_ms: serving.as_secs_f64() * 1e3,
        raw_open_by_handle_ms: raw.as_secs_f64() * 1e3,
        recovered,
        rss_kib,
        rss_anon_kib,
        rss_file_kib,
        stored_bytes,
        cpu_ms,
    })
}
