//! Baselines: what the mediated figures are judged against, measured in
//! the same run on the same filesystem as the daemon's export and state:
//! raw `openat+close` and `openat2(RESOLVE_BENEATH)+close` (the call the
//! daemon makes), a SEQPACKET round trip to another process (this binary
//! re-executed as a hidden echo server), and fsync'd LMDB commits of 1 and
//! 64 puts (the ceiling group commit works against).

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use libfilter::sys::{self, Packet};
use nix::sys::socket::{
    bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

use crate::report::Figure;

/// Runs `op` repeatedly for `dur`, sampling each call's latency, after an
/// untimed warm-up of a tenth of `dur` (first-touch costs — dentry and
/// inode caches, page faults, CPU frequency — would otherwise sit in the
/// mean of a short run).
pub fn timed(dur: Duration, mut op: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Figure> {
    let warm = Instant::now();
    while warm.elapsed() < dur / 10 {
        op()?;
    }
    let mut ns = Vec::with_capacity(1 << 16);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < dur {
        let t = Instant::now();
        op()?;
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        n += 1;
    }
    Ok(Figure::from_samples(ns, n, t0.elapsed()))
}

fn bench_file(dir: &Path) -> anyhow::Result<std::fs::File> {
    let d = dir.join("raw");
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("f"), b"x")?;
    Ok(std::fs::File::open(&d)?)
}

/// Raw `openat(dir, "f") + close`.
pub fn openat_close(dir: &Path, dur: Duration) -> anyhow::Result<Figure> {
    let d = bench_file(dir)?;
    timed(dur, || {
        let fd = nix::fcntl::openat(
            d.as_fd(),
            "f",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        drop(fd);
        Ok(())
    })
}

/// Raw `openat2(RESOLVE_BENEATH) + close`, the call the daemon makes.
pub fn openat2_close(dir: &Path, dur: Duration) -> anyhow::Result<Figure> {
    let d = bench_file(dir)?;
    timed(dur, || {
        drop(sys::openat2_beneath(d.as_fd(), "f", libc::O_RDWR, 0)?);
        Ok(())
    })
}

/// The echo side of the round-trip baseline (a separate process).
pub fn echo_server(path: &Path) -> anyhow::Result<()> {
    let l = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(l.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&l, Backlog::new(4)?)?;
    let c = sys::accept(l.as_fd(), SockFlag::SOCK_CLOEXEC)?;
    let mut buf = vec![0u8; 70_000];
    loop {
        match sys::recv_packet(c.as_fd(), &mut buf)? {
            Packet::Data { len, .. } => {
                sys::send_packet(c.as_fd(), buf.get(..len).unwrap_or_default(), None)?
            }
            _ => return Ok(()),
        }
    }
}

/// Raw SEQPACKET round trip of a 200-byte packet to another process.
pub fn socket_rtt(dir: &Path, dur: Duration) -> anyhow::Result<Figure> {
    let path = dir.join("echo.sock");
    let _ = std::fs::remove_file(&path);
    let mut echo = EchoProcess(
        Command::new(std::env::current_exe()?)
            .arg("--echo-server")
            .arg(&path)
            .stdin(Stdio::null())
            .spawn()
            .context("starting the echo process")?,
    );
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(&path)?;
    // Ready when it accepts a connection; polled, never a fixed sleep.
    let t0 = Instant::now();
    while connect(fd.as_raw_fd(), &addr).is_err() {
        if let Ok(Some(st)) = echo.0.try_wait() {
            bail!("the echo process exited before listening: {st}");
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the echo process did not listen within 10 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let msg = [7u8; 200];
    let mut buf = vec![0u8; 1024];
    let fig = timed(dur, || {
        sys::send_packet(fd.as_fd(), &msg, None)?;
        match sys::recv_packet(fd.as_fd(), &mut buf)? {
            Packet::Data { .. } => Ok(()),
            _ => bail!("echo process went away"),
        }
    });
    drop(fd); // the echo process sees EOF and exits
    let _ = echo.0.wait();
    fig
}

/// The echo process, killed on drop unless it has already exited.
struct EchoProcess(std::process::Child);

impl Drop for EchoProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// How the raw LMDB loop draws its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrder {
    /// Random (UUID v4): each put lands on a leaf anywhere in the table.
    Random,
    /// Time-ordered (UUID v7, as filterd names new handles): a commit's
    /// puts land on the last few leaves.
    TimeOrdered,
}

impl KeyOrder {
    fn key(self) -> uuid::Uuid {
        match self {
            KeyOrder::Random => uuid::Uuid::new_v4(),
            KeyOrder::TimeOrdered => uuid::Uuid::now_v7(),
        }
    }
}

/// Raw LMDB: fsync'd commits of `per_commit` puts of a 16-byte key drawn
/// as `order` says and a 300-byte value (a handle record's size), into a
/// table that grows by every put. `ops_per_s` counts puts.
pub fn lmdb_commits(
    dir: &Path,
    per_commit: usize,
    order: KeyOrder,
    dur: Duration,
) -> anyhow::Result<Figure> {
    let d = dir.join(format!("lmdb-{per_commit}-{order:?}"));
    // A fresh table each time (`--keys-only --repeat` measures again).
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    let env = sys::open_lmdb(&d, 2, 1 << 30, heed::EnvFlags::empty())?;
    let mut txn = env.write_txn()?;
    let db: heed::Database<heed::types::Bytes, heed::types::Bytes> =
        env.create_database(&mut txn, Some("t"))?;
    txn.commit()?;
    let value = [42u8; 300];
    let mut commits = Vec::new();
    let t0 = Instant::now();
    let mut puts = 0u64;
    while t0.elapsed() < dur {
        let t = Instant::now();
        let mut txn = env.write_txn()?;
        for _ in 0..per_commit {
            db.put(&mut txn, order.key().as_bytes(), &value)?;
        }
        txn.commit()?;
        commits.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        puts += per_commit as u64;
    }
    let wall = t0.elapsed();
    let mut f = Figure::from_samples(commits, puts, wall);
    f.ops_per_s = puts as f64 / wall.as_secs_f64();
    Ok(f)
}

/// Bytes per WRITE in the durable-write rows.
pub const WRITE_SIZE: usize = 4096;
/// The writes cycle over this many bytes of each file.
pub const WRITE_SPAN: u64 = 1 << 20;

/// One thread's raw `pwrite` + `fdatasync` loop on a file of its own.
struct RawWriter {
    file: std::fs::File,
    buf: Vec<u8>,
    off: u64,
}

impl crate::gate::Worker for RawWriter {
    fn warm_up(&mut self) -> anyhow::Result<()> {
        (0..5).try_for_each(|_| self.op())
    }
    fn op(&mut self) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(&self.buf, self.off)?;
        self.file.sync_data()?;
        self.off = (self.off + WRITE_SIZE as u64) % WRITE_SPAN;
        Ok(())
    }
}

/// Raw `pwrite` of [`WRITE_SIZE`] bytes + `fdatasync`, `threads` threads
/// each on a file of its own (what a durable WRITE costs without any
/// frontend); writes/s of all threads together.
pub fn pwrite_fdatasync(dir: &Path, threads: usize, dur: Duration) -> anyhow::Result<Figure> {
    let d = dir.join(format!("raw-writes-{threads}"));
    std::fs::create_dir_all(&d)?;
    let mut workers = Vec::with_capacity(threads);
    for i in 0..threads {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.join(format!("w-{i}")))?;
        workers.push(RawWriter {
            file,
            buf: vec![b'w'; WRITE_SIZE],
            off: 0,
        });
    }
    let (all, wall) = crate::gate::run("raw-writes", workers, dur)
        .with_context(|| format!("raw pwrite+fdatasync at {threads} threads"))?;
    let n = all.len() as u64;
    Ok(Figure::from_samples(all, n, wall))
}
