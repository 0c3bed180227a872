//! smbl/1 through a real smbshim over a real filterd: CREATE+CLOSE rates
//! and the failover figure, beside a raw TCP line round trip.
//!
//! CREATE+CLOSE: a fresh daemon (`--no-fanotify`) and one smbshim; N
//! client connections (the `smbl` crate), each with its own session and its
//! own file `smb-{i}`, all set up and warmed up before the clock starts;
//! each connection's thread then CREATEs (`open_if`, a fresh create GUID
//! each time) and CLOSEs in a loop until the deadline. Two kinds: durable
//! non-persistent opens with an RWH lease (one lease key per connection, as
//! a client keeps one per file; such an open is granted only with H) and
//! persistent opens. A CREATE answered with `durable: null` still counts:
//! the figure is the round trip, and the row notes how many were granted.
//!
//! Persistent WRITEs: N connections, each with a persistent open of a
//! file of its own, WRITE 4 KiB in a loop; smbshim syncs each before its
//! reply (`shimline::datasync`), so the baseline is raw pwrite+fdatasync
//! at as many threads, a file each (`raw::pwrite_fdatasync`).
//!
//! Failover: a client holds a persistent open; smbshim is SIGKILLed; a
//! replacement with the same `--instance` starts; the clock runs from the
//! replacement printing `listening on` to the client's RECONNECT (new TCP
//! connection, SESSION_SETUP, RECONNECT) answered `STATUS_SUCCESS`.
//! Repeated; the median is reported.
//!
//! The baseline is a TCP line echo round trip to a thread of this process
//! (same loopback stack, same line sizes, no daemon).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use smbl::{Client, CreateArgs, Durable};
use uuid::Uuid;

use crate::daemon::{POLL, READY_LIMIT};
use crate::mediated::start_export;
use crate::report::Figure;

/// How long a smbshim may take to print `listening on`.
const LISTEN_LIMIT: Duration = READY_LIMIT;
/// How long the failover client keeps retrying RECONNECT.
const RECONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Untimed CREATE+CLOSE pairs per connection before the clock starts.
const WARM_UP_PAIRS: usize = 50;
/// Lines of the smbshim log quoted in an error.
const LOG_TAIL_LINES: usize = 20;

/// What kind of open the CREATE+CLOSE loop asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `durable {persistent: false}` with an RWH lease.
    DurableLeased,
    /// `durable {persistent: true}`.
    Persistent,
}

impl Kind {
    /// Both kinds, in report order.
    pub const ALL: [Kind; 2] = [Kind::DurableLeased, Kind::Persistent];

    /// The words used in row names.
    pub fn label(self) -> &'static str {
        match self {
            Kind::DurableLeased => "durable + RWH lease",
            Kind::Persistent => "persistent",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Kind::DurableLeased => "durable",
            Kind::Persistent => "persistent",
        }
    }
}

/// A running protocol frontend (smbshim, or nfsshim for `nfs`, which takes
/// the same flags), SIGKILLed on drop.
pub struct Shim {
    child: Child,
    /// The address from its `listening on` line.
    pub addr: String,
    /// When that line was read.
    pub listening_at: Instant,
}

impl Shim {
    /// Starts the frontend binary `smbshim` (the path of smbshim or
    /// nfsshim) on filterd's `socket` as `instance`, stderr to `log`, and
    /// waits (without a fixed sleep) for its `listening on` line.
    pub fn start(
        smbshim: &Path,
        socket: &Path,
        instance: &str,
        log: &Path,
    ) -> anyhow::Result<Shim> {
        Shim::start_with(smbshim, socket, instance, log, &[])
    }

    /// As [`Shim::start`], with flags of the frontend's own (rksmbd's
    /// `--share` and `--users`).
    pub fn start_with(
        smbshim: &Path,
        socket: &Path,
        instance: &str,
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Shim> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(smbshim)
            .arg("--filter")
            .arg(socket)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--instance")
            .arg(instance)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", smbshim.display()))?;
        let name = smbshim
            .file_name()
            .map_or_else(|| "the frontend".into(), |n| n.to_string_lossy());
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}'s stdout was not captured"))?;
        // The first line goes over a channel so the wait has a limit; the
        // thread then drains stdout until the frontend exits.
        let (tx, rx) = crossbeam_channel::bounded::<std::io::Result<String>>(1);
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let first = lines
                    .next()
                    .unwrap_or_else(|| Ok(String::from("(EOF before any line)")));
                let _ = tx.send(first);
                for _ in lines {}
            })
            .with_context(|| format!("starting the {name} stdout thread"))?;
        let mut shim = Shim {
            child,
            addr: String::new(),
            listening_at: Instant::now(),
        };
        let line = match rx.recv_timeout(LISTEN_LIMIT) {
            Ok(l) => l.with_context(|| format!("reading {name}'s stdout"))?,
            Err(_) => bail!(
                "{name} printed no line within {:.0} s; log:\n{}",
                LISTEN_LIMIT.as_secs_f64(),
                log_tail(log)
            ),
        };
        shim.listening_at = Instant::now();
        shim.addr = line
            .strip_prefix("listening on ")
            .ok_or_else(|| {
                anyhow!(
                    "{name}'s first line is {line:?}, not `listening on HOST:PORT`; log:\n{}",
                    log_tail(log)
                )
            })?
            .trim()
            .to_owned();
        Ok(shim)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL: what failover is about
        let _ = self.child.wait();
    }
}

fn log_tail(log: &Path) -> String {
    match std::fs::read_to_string(log) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            lines.get(from..).unwrap_or_default().join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

/// A new connection with its own session.
fn session(addr: &str, client_guid: Uuid) -> anyhow::Result<(Client, u64)> {
    let c = Client::connect(addr)?;
    let s = c
        .session_setup(client_guid, "bench", None)?
        .require_success()?;
    let id = s
        .session_id()
        .ok_or_else(|| anyhow!("SESSION_SETUP reply without session_id: {s}"))?;
    Ok((c, id))
}

/// A fresh filterd on export `tag` and an smbshim attached to it.
fn start_smb(
    filterd: &Path,
    smbshim: &Path,
    dir: &Path,
    tag: &str,
) -> anyhow::Result<(crate::daemon::Daemon, Shim)> {
    let d = start_export(filterd, dir, tag)?;
    let shim = Shim::start(
        smbshim,
        &d.socket,
        "bench",
        &dir.join(format!("{tag}/smbshim.log")),
    )?;
    Ok((d, shim))
}

/// One connection's CREATE+CLOSE loop state.
struct Creator {
    client: Client,
    args: CreateArgs,
    granted: Arc<AtomicU64>,
}

impl Creator {
    fn new(addr: &str, i: usize, kind: Kind, granted: Arc<AtomicU64>) -> anyhow::Result<Creator> {
        let (client, sid) = session(addr, Uuid::new_v4())?;
        let mut args = CreateArgs::new(sid, format!("smb-{i}"));
        args.durable = Some(Durable {
            create_guid: Uuid::nil(),
            persistent: kind == Kind::Persistent,
            timeout_ms: 0,
        });
        if kind == Kind::DurableLeased {
            args.lease = Some((Uuid::new_v4(), "RWH".into()));
        }
        Ok(Creator {
            client,
            args,
            granted,
        })
    }

    /// One CREATE (fresh create GUID) and its CLOSE, both successful.
    fn pair(&mut self) -> anyhow::Result<()> {
        if let Some(d) = &mut self.args.durable {
            d.create_guid = Uuid::new_v4();
        }
        // The typed calls: the same lines as `create`/`close`, without
        // building and parsing `Value`s (the client's CPU shares the cores).
        let r = self.client.create_outcome(&self.args)?.require_success()?;
        if r.durable_granted() {
            self.granted.fetch_add(1, Ordering::Relaxed);
        }
        let file_id = r
            .file_id()
            .ok_or_else(|| anyhow!("CREATE reply without file_id: {r}"))?;
        self.client
            .close_outcome(self.args.session_id, file_id)?
            .require_success()?;
        Ok(())
    }
}

/// A creator in the gated loop: its timed CREATEs count into `granted`.
struct Timed {
    c: Creator,
    granted: Arc<AtomicU64>,
}

impl crate::gate::Worker for Timed {
    fn warm_up(&mut self) -> anyhow::Result<()> {
        (0..WARM_UP_PAIRS).try_for_each(|_| self.c.pair())
    }
    fn go(&mut self) {
        self.c.granted = self.granted.clone();
    }
    fn op(&mut self) -> anyhow::Result<()> {
        self.c.pair()
    }
}

/// CREATE+CLOSE pairs through smbshim.
pub struct CreateClose {
    /// Pairs per second, all connections together.
    pub pairs_per_s: f64,
    /// Mean µs per pair.
    pub mean_us: f64,
    /// p99 µs per pair.
    pub p99_us: f64,
    /// Timed CREATEs.
    pub creates: u64,
    /// Of those, how many were granted a durable handle (`durable` not null).
    pub durable_granted: u64,
    /// filterd's store operations per commit over the whole row (warm-up
    /// included), as the mediated rows report it; 0 without commits.
    pub ops_per_commit: f64,
}

/// `conns` connections (one thread each) CREATE and CLOSE in a loop.
pub fn create_close(
    filterd: &Path,
    smbshim: &Path,
    dir: &Path,
    kind: Kind,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<CreateClose> {
    let (d, shim) = start_smb(
        filterd,
        smbshim,
        dir,
        &format!("smb-{}-{conns}", kind.tag()),
    )?;
    let warm_granted = Arc::new(AtomicU64::new(0));
    let mut creators = Vec::with_capacity(conns);
    for i in 0..conns {
        creators.push(Creator::new(&shim.addr, i, kind, warm_granted.clone())?);
    }
    let granted = Arc::new(AtomicU64::new(0));
    // Warm-up CREATEs count into `warm_granted`; timed ones into `granted`.
    let workers: Vec<Timed> = creators
        .into_iter()
        .map(|c| Timed {
            c,
            granted: granted.clone(),
        })
        .collect();
    let (all, wall) = crate::gate::run("smb-bench", workers, dur).with_context(|| {
        format!(
            "smbl/1 {} CREATE+CLOSE at {conns} connections",
            kind.label()
        )
    })?;
    let pairs = all.len() as u64;
    let f = Figure::from_samples(all, pairs, wall);
    let ops_per_commit = crate::mediated::ops_per_commit(&d.socket)?;
    drop(shim);
    drop(d);
    Ok(CreateClose {
        pairs_per_s: f.ops_per_s,
        mean_us: f.mean_us,
        p99_us: f.p99_us,
        creates: pairs,
        durable_granted: granted.load(Ordering::Relaxed),
        ops_per_commit,
    })
}

/// The failover figure's samples.
pub struct Failover {
    /// Replacement `listening on` → RECONNECT success, ms, one per repeat.
    pub ms: Vec<f64>,
    /// RECONNECT attempts in all (more than one per repeat when the first
    /// came too early and was retried).
    pub attempts: u64,
}

impl Failover {
    /// The median sample, ms.
    pub fn median_ms(&self) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }
    /// The largest sample, ms.
    pub fn max_ms(&self) -> f64 {
        self.ms.iter().copied().fold(0.0, f64::max)
    }
}

/// A client with a persistent open survives `repeats` SIGKILLs of smbshim.
pub fn failover(
    filterd: &Path,
    smbshim: &Path,
    dir: &Path,
    repeats: usize,
) -> anyhow::Result<Failover> {
    let d = start_export(filterd, dir, "smb-failover")?;
    let log = |n: usize| -> PathBuf { dir.join(format!("smb-failover/smbshim-{n}.log")) };
    let instance = "bench-failover";
    let mut shim = Shim::start(smbshim, &d.socket, instance, &log(0))?;
    let client_guid = Uuid::new_v4();
    let create_guid = Uuid::new_v4();
    let (mut client, sid) = session(&shim.addr, client_guid)?;
    let mut args = CreateArgs::new(sid, "failover");
    args.durable = Some(Durable::persistent(create_guid));
    let r = client.create(&args)?.require_success()?;
    let file_id = r
        .file_id()
        .ok_or_else(|| anyhow!("CREATE reply without file_id: {r}"))?
        .to_owned();
    let mut out = Failover {
        ms: Vec::with_capacity(repeats),
        attempts: 0,
    };
    for n in 1..=repeats {
        drop(shim); // SIGKILL, reaped
        drop(client); // its connection died with the process
        shim = Shim::start(smbshim, &d.socket, instance, &log(n))?;
        let t0 = shim.listening_at;
        let (c, sid) = session(&shim.addr, client_guid)?;
        loop {
            out.attempts += 1;
            let r = c.reconnect(sid, &file_id, create_guid, None)?;
            if r.is_success() {
                break;
            }
            if t0.elapsed() > RECONNECT_LIMIT {
                bail!(
                    "RECONNECT after failover {n} still fails after {:.0} s: {r}",
                    RECONNECT_LIMIT.as_secs_f64()
                );
            }
            std::thread::sleep(POLL / 10);
        }
        out.ms.push(t0.elapsed().as_secs_f64() * 1e3);
        client = c;
    }
    drop(client);
    drop(shim);
    drop(d);
    Ok(out)
}

/// A TCP round trip of one ~200-byte line to an echo thread of this
/// process: the floor under every smbl/1 request.
pub fn tcp_line_rtt(dur: Duration) -> anyhow::Result<Figure> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding the echo listener")?;
    let addr = l.local_addr()?;
    let echo = std::thread::Builder::new()
        .name("tcp-echo".into())
        .spawn(move || -> std::io::Result<()> {
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            let mut w = s.try_clone()?;
            let mut r = BufReader::new(s);
            let mut line = Vec::new();
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line)? == 0 {
                    return Ok(());
                }
                w.write_all(&line)?;
            }
        })
        .context("starting the echo thread")?;
    let s = TcpStream::connect(addr).context("connecting to the echo thread")?;
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut msg = format!(
        "{{\"cmd\":\"CREATE\",\"mid\":1,\"session_id\":1,\"path\":\"smb-0\",\"pad\":\"{}\"}}",
        "x".repeat(120)
    );
    msg.push('\n');
    let mut back = Vec::with_capacity(msg.len());
    let fig = crate::raw::timed(dur, || {
        w.write_all(msg.as_bytes())?;
        back.clear();
        if r.read_until(b'\n', &mut back)? == 0 {
            bail!("the echo thread went away");
        }
        Ok(())
    });
    drop(w);
    drop(r); // the echo thread sees EOF
    match echo.join() {
        Ok(res) => res.context("the echo thread")?,
        Err(_) => bail!("the echo thread panicked"),
    }
    fig
}

/// One connection's WRITE loop on its own persistent open.
struct Writer {
    client: Client,
    session: u64,
    file_id: String,
    data: Vec<u8>,
    off: u64,
}

impl crate::gate::Worker for Writer {
    fn warm_up(&mut self) -> anyhow::Result<()> {
        (0..5).try_for_each(|_| self.op())
    }
    fn op(&mut self) -> anyhow::Result<()> {
        self.client
            .write(
                self.session,
                &self.file_id,
                self.off,
                &self.data,
                None,
                false,
            )?
            .require_success()?;
        self.off = (self.off + crate::raw::WRITE_SIZE as u64) % crate::raw::WRITE_SPAN;
        Ok(())
    }
}

/// `conns` connections (one thread each), each with a persistent open of a
/// file of its own, WRITE [`crate::raw::WRITE_SIZE`] bytes in a loop (no op
/// id, so no reply is recorded: the figure is the data sync smbshim does
/// before every reply on a persistent handle). Writes/s of all together.
pub fn persistent_writes(
    filterd: &Path,
    smbshim: &Path,
    dir: &Path,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<Figure> {
    let (d, shim) = start_smb(filterd, smbshim, dir, &format!("smb-writes-{conns}"))?;
    let mut workers = Vec::with_capacity(conns);
    for i in 0..conns {
        let (client, sid) = session(&shim.addr, Uuid::new_v4())?;
        let mut args = CreateArgs::new(sid, format!("w-{i}"));
        args.access = vec!["read".into(), "write".into()];
        args.disposition = "overwrite_if".into();
        args.durable = Some(Durable::persistent(Uuid::new_v4()));
        let r = client.create(&args)?.require_success()?;
        if r.get("durable").is_none_or(|d| d.is_null()) {
            bail!("persistent CREATE of w-{i} was not granted a persistent handle: {r}");
        }
        let file_id = r
            .file_id()
            .ok_or_else(|| anyhow!("CREATE reply without file_id: {r}"))?
            .to_owned();
        workers.push(Writer {
            client,
            session: sid,
            file_id,
            data: vec![b'w'; crate::raw::WRITE_SIZE],
            off: 0,
        });
    }
    let (all, wall) = crate::gate::run("smb-writes", workers, dur)
        .with_context(|| format!("smbl/1 persistent WRITEs at {conns} connections"))?;
    let n = all.len() as u64;
    drop(shim);
    drop(d);
    Ok(Figure::from_samples(all, n, wall))
}
