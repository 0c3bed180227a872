//! rksoak — the fault soak (`make soak`; a short profile runs in `make test`).
//!
//! SMB-like and NFS-like clients work on their own files through the real
//! smbshim and nfsshim — persistent opens, WRITEs with op ids, byte-range
//! locks, deliberate replays — while a chaos loop SIGKILLs smbshim, nfsshim
//! or filterd at random and restarts it. Clients ride every failure out the
//! way the protocols say (re-sending with replay, RECONNECT, the same slot
//! seqid). A checker keeps every acknowledged write and lock and, after each
//! recovery, verifies: no acknowledged write lost, no replay applied twice,
//! every persistent open and lock still in filterd, share modes still
//! refusing an intruder, filterd's descriptors and memory within a bound.
//! Each time filterd is killed, filterctl's post-mortem view of the state
//! dir is compared with what the restarted daemon shows (started first on a
//! side socket no frontend knows, so nothing has changed it yet).
//! One chaos step in four instead restarts filterd while smbshim or nfsshim
//! is stopped (SIGSTOP) and, meanwhile, a client of the other protocol takes
//! an exclusive lock on a shared file: once the stopped frontend continues,
//! its client's WRITE inside that lock must be refused and nothing may land
//! (issue 13 #1).
//! Two hostile peers run beside them all along: an smbl/1 client that
//! asks for megabytes of READs and stops reading (smbshim must drop it, and
//! the other clients must carry on), and an nfsl/1 client that opens
//! session after session (nfsshim must refuse every one past its limit).
//! Prints a summary; exits 1 if any check failed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rkfilter_tests::{wait_for, Filterd, Scratch, Shim};
use serde_json::Value;
use uuid::Uuid;

/// Fault soak: clients of both protocols under SIGKILL chaos.
#[derive(Parser, Debug)]
#[command(
    name = "rksoak",
    version,
    about = "Fault soak: SMB-like and NFS-like clients under SIGKILL chaos; exits 1 on any violation"
)]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// SMB-like clients (and as many NFS-like ones).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seed of the chaos loop's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the table in a one-member etcd on loopback (`--store
    /// etcd://…`) instead of LMDB. filterd starts as `--standby` with a
    /// 2 s lease, so a restarted one takes over once the killed one's
    /// lease has run out; post-mortems read the table with
    /// `filterctl --store`.
    #[arg(long)]
    etcd: bool,
}

/// How filterd is started and its table read offline (LMDB or etcd).
struct Daemon {
    flags: Vec<String>,
    offline: Vec<String>,
}

impl Daemon {
    fn flags(&self) -> Vec<&str> {
        self.flags.iter().map(String::as_str).collect()
    }
    fn start(&self, s: &Scratch) -> Filterd {
        Filterd::start(s, &self.flags(), &[])
    }
}

/// Counters for the summary.
#[derive(Default)]
struct Tally {
    /// Clients hold it (shared) for each operation and its bookkeeping;
    /// the checker holds it alone, so what it compares is at rest.
    gate: RwLock<()>,
    ops: AtomicU64,
    replays: AtomicU64,
    retries: AtomicU64,
    failovers: AtomicU64,
    checks: AtomicU64,
    /// filterctl post-mortem views compared with the restarted daemon's.
    post_mortems: AtomicU64,
    /// Short-lived opens, renames, removes and closes done on the side
    /// (not checked: they may fail across a failover).
    side_ops: AtomicU64,
    side_failed: AtomicU64,
    /// Stalled-reader connections smbshim dropped.
    stalled_dropped: AtomicU64,
    /// CREATE_SESSIONs refused past the limit (NFS4ERR_RESOURCE).
    sessions_refused: AtomicU64,
    /// filterd restarts while a frontend was stopped (SIGSTOP).
    stopped_restarts: AtomicU64,
    /// WRITEs inside another client's lock refused after such a restart.
    lock_writes_refused: AtomicU64,
    violations: Mutex<Vec<String>>,
}

impl Tally {
    fn side(&self, ok: bool) {
        let n = if ok {
            &self.side_ops
        } else {
            &self.side_failed
        };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

impl Tally {
    fn violation(&self, v: String) {
        eprintln!("rksoak: VIOLATION: {v}");
        if let Ok(mut vs) = self.violations.lock() {
            vs.push(v);
        }
    }
}

/// What a client had acknowledged: its file, writes by offset, locks.
#[derive(Default, Clone)]
struct Acked {
    path: String,
    writes: BTreeMap<u64, Vec<u8>>,
    /// Locked (offset, length).
    locks: Vec<(u64, u64)>,
}

/// Where the frontends listen now (they move when replaced).
struct Addrs {
    smb: RwLock<String>,
    nfs: RwLock<String>,
}

fn read_addr(l: &RwLock<String>) -> String {
    l.read().map(|a| a.clone()).unwrap_or_default()
}

const RECORD: usize = 16;

fn record(client: usize, n: u64) -> Vec<u8> {
    let mut r = format!("c{client:02}-op{n:08}").into_bytes();
    r.resize(RECORD - 1, b'.');
    r.push(b'\n');
    r
}

/// An SMB-like client: a persistent open with a lease; WRITEs with op ids,
/// a lock per 8 writes, a deliberate replay per 16.
fn smb_client(
    i: usize,
    addrs: Arc<Addrs>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    acked: Arc<Mutex<Acked>>,
) -> anyhow::Result<()> {
    let guid = Uuid::new_v4();
    let create_guid = Uuid::new_v4();
    let lease = Uuid::new_v4();
    let path = format!("smb-{i}");
    let connect = |first: bool, file_id: &str| -> anyhow::Result<(smbl::Client, u64, String)> {
        let t0 = Instant::now();
        loop {
            let attempt = (|| -> anyhow::Result<(smbl::Client, u64, String)> {
                let c = smbl::Client::connect(read_addr(&addrs.smb).as_str())?;
                c.set_timeout(Duration::from_secs(20));
                let r = c.session_setup(guid, "soak", None)?;
                let sid = r.session_id().context("no session")?;
                if first {
                    let mut a = smbl::CreateArgs::new(sid, path.clone());
                    a.access = vec!["read".into(), "write".into()];
                    a.share = vec!["read".into()];
                    a.disposition = "overwrite_if".into();
                    a.durable = Some(smbl::Durable::persistent(create_guid));
                    a.lease = Some((lease, "RWH".into()));
                    let r = c.create(&a)?;
                    if !r.is_success() {
                        bail!("CREATE: {}", r.value());
                    }
                    return Ok((c, sid, r.file_id().context("file_id")?.to_owned()));
                }
                let r = c.reconnect(sid, file_id, create_guid, Some(lease))?;
                if !r.is_success() {
                    bail!("RECONNECT: {}", r.value());
                }
                Ok((c, sid, file_id.to_owned()))
            })();
            match attempt {
                Ok(x) => return Ok(x),
                Err(e) if t0.elapsed() > Duration::from_secs(30) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    let (mut c, mut sid, file_id) = connect(true, "")?;
    if let Ok(mut a) = acked.lock() {
        a.path = path.clone();
    }
    // Runs `op` until its status is one of `done`, re-sending (replay) and
    // reconnecting (RECONNECT on a new session) after failures.
    let mut retry =
        |what: &str,
         done: &[&str],
         op: &mut dyn FnMut(&smbl::Client, u64, bool) -> Result<smbl::Reply, smbl::Error>|
         -> anyhow::Result<smbl::Reply> {
            let t0 = Instant::now();
            let mut again = false;
            loop {
                match op(&c, sid, again) {
                    Ok(r) if done.contains(&r.status()) => return Ok(r),
                    Ok(r)
                        if r.status() == "STATUS_FILE_CLOSED"
                            || r.status() == "STATUS_USER_SESSION_DELETED" =>
                    {
                        // The session was lost with its smbshim: RECONNECT.
                        (c, sid, _) = connect(false, &file_id)?;
                    }
                    Ok(r) if r.status() == "STATUS_LOCK_NOT_GRANTED" => {
                        bail!("smb client {i}: {what} refused: {}", r.value())
                    }
                    Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                    Err(_) => (c, sid, _) = connect(false, &file_id)?,
                }
                again = true;
                tally.retries.fetch_add(1, Ordering::Relaxed);
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!("smb client {i}: {what} never acknowledged");
                }
            }
        };
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let _op = tally.gate.read();
        n += 1;
        let off = (n - 1) * RECORD as u64;
        let data = record(i, n);
        retry("WRITE", &["STATUS_SUCCESS"], &mut |c, sid, replay| {
            c.write(sid, &file_id, off, &data, Some(n), replay)
        })?;
        tally.ops.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut a) = acked.lock() {
            a.writes.insert(off, data.clone());
        }
        if n.is_multiple_of(16) {
            // A deliberate replay with other bytes: the recorded reply, and
            // the file keeps the first bytes (checked by the checker).
            let r = retry("replayed WRITE", &["STATUS_SUCCESS"], &mut |c, sid, _| {
                c.write(sid, &file_id, off, b"REPLAYED-TWICE!\n", Some(n), true)
            })?;
            if r.is_success() {
                tally.replays.fetch_add(1, Ordering::Relaxed);
            }
        }
        if n.is_multiple_of(32) {
            // On the side: a non-durable open with a lease, a write, a
            // rename, a close — the churn a real client adds. Not checked:
            // it may be lost to a failover.
            let tmp = format!("tmp-{i}-{n}");
            let r = retry(
                "side ops",
                &["SIDE_DONE", "SIDE_FAILED"],
                &mut |c, sid, _| {
                    let mut a = smbl::CreateArgs::new(sid, tmp.clone());
                    a.access = vec!["read".into(), "write".into(), "delete".into()];
                    a.share = vec!["read".into(), "write".into(), "delete".into()];
                    a.disposition = "overwrite_if".into();
                    a.lease = Some((Uuid::new_v4(), "RWH".into()));
                    let r = c.create(&a)?;
                    let fid = r.file_id().unwrap_or_default().to_owned();
                    let ok = r.is_success()
                        && c.write(sid, &fid, 0, b"side", None, false)?.is_success()
                        && c.set_info_rename(sid, &fid, &format!("{tmp}.done"), true, None, false)?
                            .is_success()
                        && c.close(sid, &fid)?.is_success();
                    Ok(smbl::Reply::new(
                        serde_json::json!({"status": if ok { "SIDE_DONE" } else { "SIDE_FAILED" }}),
                    ))
                },
            )?;
            tally.side(r.status() == "SIDE_DONE");
        }
        if n.is_multiple_of(8) {
            // MS-SMB2 lock sequence: index 1..=64 in turn, its number
            // bumped each time the index comes round again.
            let k = n / 8;
            let seq = (
                u8::try_from(k / 64 % 16).unwrap_or(0),
                u8::try_from(k % 64 + 1).unwrap_or(1),
            );
            let lock = smbl::LockSpec {
                offset: off,
                length: RECORD as u64,
                exclusive: true,
                unlock: false,
            };
            retry("LOCK", &["STATUS_SUCCESS"], &mut |c, sid, _| {
                c.lock(sid, &file_id, std::slice::from_ref(&lock), Some(seq), true)
            })?;
            if let Ok(mut a) = acked.lock() {
                a.locks.push((off, RECORD as u64));
            }
            // Keep at most 8 locks: unlock the oldest (filterd caps a
            // file's locks). Forgotten by the checker before it is sent.
            let oldest = acked
                .lock()
                .ok()
                .and_then(|mut a| (a.locks.len() > 8).then(|| a.locks.remove(0)));
            if let Some((off, len)) = oldest {
                let unlock = smbl::LockSpec {
                    offset: off,
                    length: len,
                    exclusive: true,
                    unlock: true,
                };
                // Unlocked, or already (a retry after a lost reply).
                retry(
                    "unlock",
                    &["STATUS_SUCCESS", "STATUS_RANGE_NOT_LOCKED"],
                    &mut |c, sid, _| {
                        c.lock(sid, &file_id, std::slice::from_ref(&unlock), None, false)
                    },
                )?;
            }
        }
    }
    Ok(())
}

/// An NFS-like client: an open denying writers; WRITEs on slot 0, re-sent
/// with the same seqid after any failure.
fn nfs_client(
    i: usize,
    addrs: Arc<Addrs>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    acked: Arc<Mutex<Acked>>,
) -> anyhow::Result<()> {
    let connect = || -> anyhow::Result<Arc<nfsl::Client>> {
        let t0 = Instant::now();
        loop {
            match nfsl::Client::connect(read_addr(&addrs.nfs).as_str()) {
                Ok(c) => {
                    c.set_timeout(Duration::from_secs(20));
                    return Ok(Arc::new(c));
                }
                Err(e) if t0.elapsed() > Duration::from_secs(30) => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    let mut s = nfs_session(connect()?, &format!("soak-{i}"))?;
    let path = format!("nfs-{i}");
    // Sends on slot 0; after a lost connection re-sends on a new one. A
    // DELAY leaves the server's slot where it was and `call` takes its
    // seqid back, so after a DELAY the request goes the same way again: a
    // `resend` there would get the previous request's cached reply.
    let call = |s: &mut nfsl::Session, req: Value| -> anyhow::Result<nfsl::Reply> {
        let t0 = Instant::now();
        let mut first = true;
        loop {
            let r = if first {
                s.call(0, req.clone())
            } else {
                s.resend(0, req.clone())
            };
            match r {
                Ok(r) if r.status() != "NFS4ERR_DELAY" => return Ok(r),
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => {
                    first = false;
                    *s = s.with_client(connect()?);
                }
            }
            tally.retries.fetch_add(1, Ordering::Relaxed);
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("nfs client {i}: no answer to {req}");
            }
        }
    };
    let mut oa = nfsl::OpenArgs::new(format!("soak-{i}-open"), path.clone());
    oa.access = nfsl::Access::Both;
    oa.deny = nfsl::Deny::Write;
    oa.create = Some((nfsl::CreateMode::Unchecked, None));
    let o = call(&mut s, nfsl::ops::open(&oa))?.require_ok()?;
    let st = o.stateid().context("stateid")?.current();
    if let Ok(mut a) = acked.lock() {
        a.path = path.clone();
    }
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let _op = tally.gate.read();
        n += 1;
        let off = (n - 1) * RECORD as u64;
        let data = record(100 + i, n);
        let r = call(&mut s, nfsl::ops::write(&st, off, &data))?;
        if !r.is_ok() {
            bail!("nfs client {i}: WRITE {n}: {}", r.value());
        }
        tally.ops.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut a) = acked.lock() {
            a.writes.insert(off, data);
        }
        if n.is_multiple_of(32) {
            // On the side: open a second file, close it, remove it.
            let mut oa = nfsl::OpenArgs::new(format!("soak-{i}-side"), format!("side-{i}-{n}"));
            oa.access = nfsl::Access::Both;
            oa.create = Some((nfsl::CreateMode::Unchecked, None));
            let ok = call(&mut s, nfsl::ops::open(&oa)).ok().and_then(|o| {
                let sid = o.stateid()?.current();
                let c = call(&mut s, nfsl::ops::close(&sid)).ok()?;
                let r = call(&mut s, nfsl::ops::remove(&format!("side-{i}-{n}"))).ok()?;
                Some(o.is_ok() && c.is_ok() && r.is_ok())
            });
            tally.side(ok == Some(true));
        }
        if n.is_multiple_of(16) {
            // The same request re-sent on its slot: the cached reply.
            if let Ok(r) = s.resend(0, nfsl::ops::write(&st, off, &record(100 + i, n))) {
                if r.is_ok() {
                    tally.replays.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(())
}

/// EXCHANGE_ID as `owner` (a new verifier) and CREATE_SESSION on `c`.
fn nfs_session(c: Arc<nfsl::Client>, owner: &str) -> anyhow::Result<nfsl::Session> {
    let verifier = format!("{:016x}", Uuid::new_v4().as_u64_pair().0);
    let id = c.exchange_id(owner, &verifier)?.require_ok()?;
    let cs = c
        .create_session(id.clientid().context("clientid")?)?
        .require_ok()?;
    nfsl::Session::from_reply(c, &cs).context("session")
}

/// Bytes of the file the stalled reader asks to READ.
const STALL_FILE: usize = 1 << 20;

/// An smbl/1 client that pipelines megabytes of READs and never reads a
/// reply: smbshim must drop its connection (it counts each drop), and
/// nobody else may wait for it. Starts over until `stop`.
fn stalled_reader(addrs: Arc<Addrs>, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    use std::io::{BufRead, BufReader, Write};
    let line = |v: Value| format!("{v}\n").into_bytes();
    while !stop.load(Ordering::Relaxed) {
        let attempt = || -> anyhow::Result<bool> {
            let mut s = std::net::TcpStream::connect(read_addr(&addrs.smb).as_str())?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(30)))?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut reply = |s: &mut std::net::TcpStream, v: Value| -> anyhow::Result<Value> {
                s.write_all(&line(v))?;
                let mut l = String::new();
                r.read_line(&mut l)?;
                Ok(serde_json::from_str(&l)?)
            };
            let guid = Uuid::new_v4().to_string();
            let sid = reply(&mut s, serde_json::json!({"cmd": "SESSION_SETUP", "mid": 1, "client_guid": guid, "user": "stall"}))?["session_id"]
                .as_u64()
                .context("no session")?;
            let f = reply(
                &mut s,
                serde_json::json!({"cmd": "CREATE", "mid": 2, "session_id": sid, "path": "stall",
                "access": ["read"], "share": ["read", "write", "delete"], "disposition": "open"}),
            )?;
            let fid = f["file_id"].clone();
            if fid.is_null() {
                bail!("CREATE: {f}");
            }
            // ~90 MiB of replies asked for, none read.
            for mid in 3..67u64 {
                let req = serde_json::json!({"cmd": "READ", "mid": mid, "session_id": sid,
                    "file_id": fid, "offset": 0, "length": STALL_FILE});
                if s.write_all(&line(req)).is_err() {
                    return Ok(true);
                }
            }
            // Still not reading: probe with small writes until they fail
            // (smbshim shut the connection down).
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(100));
                let echo = serde_json::json!({"cmd": "ECHO", "mid": 99});
                if s.write_all(&line(echo)).is_err() {
                    return Ok(true);
                }
            }
            // Kept. Fine only if the READs got no data (the open went away
            // in a failover: small error replies fill no queue).
            for _ in 3..67 {
                let mut l = String::new();
                r.read_line(&mut l)?;
                let v: Value = serde_json::from_str(&l)?;
                if v["status"] != "STATUS_SUCCESS" {
                    bail!("READ answered {}", v["status"]);
                }
            }
            Ok(false)
        };
        // Its open comes and goes at any time (the checker leaves the
        // `stall` file out), so it does not take the gate.
        match attempt() {
            Ok(true) => {
                tally.stalled_dropped.fetch_add(1, Ordering::Relaxed);
                // A stall now and then; the checker needs the gate too.
                std::thread::sleep(Duration::from_secs(2));
            }
            // Not dropped within the read timeout while smbshim lived:
            // a stalled client is being carried.
            Ok(false) => tally.violation("smbshim kept a client that stopped reading".into()),
            // smbshim or filterd away (chaos): try again.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// nfsshim's sessions per client (its default --max-sessions-per-client).
const SESSIONS_PER_CLIENT: u64 = 16;

/// An nfsl/1 client that opens session after session: past the limit each
/// is NFS4ERR_RESOURCE, and the client never holds more than the limit.
fn session_flooder(addrs: Arc<Addrs>, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let verifier = format!("{:016x}", Uuid::new_v4().as_u64_pair().0);
    let mut granted = 0u64;
    let mut clientid: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let Ok(c) = nfsl::Client::connect(read_addr(&addrs.nfs).as_str()) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        c.set_timeout(Duration::from_secs(20));
        while !stop.load(Ordering::Relaxed) {
            let cid = match &clientid {
                Some(cid) => cid.clone(),
                None => match c.exchange_id("soak-session-flooder", &verifier) {
                    Ok(r) if r.is_ok() => match r.clientid() {
                        Some(cid) => {
                            clientid = Some(cid.to_owned());
                            cid.to_owned()
                        }
                        None => break,
                    },
                    _ => break,
                },
            };
            match c.create_session(&cid) {
                Ok(r) if r.is_ok() => {
                    granted += 1;
                    if granted > SESSIONS_PER_CLIENT {
                        tally.violation(format!(
                            "nfsshim granted session {granted} to one client (limit {SESSIONS_PER_CLIENT})"
                        ));
                    }
                }
                Ok(r) if r.status() == "NFS4ERR_RESOURCE" => {
                    tally.sessions_refused.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
                // The incarnation went (its lease lapsed while nfsshim was
                // down long): a new one starts from none.
                Ok(r) if r.status() == "NFS4ERR_STALE_CLIENTID" => {
                    clientid = None;
                    granted = 0;
                }
                _ => break,
            }
        }
    }
}

/// filterd's open descriptors and resident memory (kB).
fn usage(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0);
    (fds, rss)
}

/// Everything acknowledged is there; intruders are refused; resources bounded.
fn check(
    root: &Path,
    socket: &Path,
    smb_addr: &str,
    acked: &[Arc<Mutex<Acked>>],
    tally: &Tally,
) -> anyhow::Result<()> {
    tally.checks.fetch_add(1, Ordering::Relaxed);
    let _quiet = tally.gate.write();
    let snapshot: Vec<Acked> = acked
        .iter()
        .filter_map(|a| a.lock().ok().map(|a| a.clone()))
        .collect();
    for a in &snapshot {
        if a.path.is_empty() {
            continue;
        }
        let bytes = std::fs::read(root.join(&a.path)).unwrap_or_default();
        for (off, data) in &a.writes {
            let at = usize::try_from(*off)?;
            let got = bytes.get(at..at + data.len());
            if got != Some(data.as_slice()) {
                tally.violation(format!(
                    "{}: acknowledged write at {off} lost or overwritten: {:?}",
                    a.path,
                    got.map(String::from_utf8_lossy)
                ));
            }
        }
    }
    let ctl = libfilter::client::FilterClient::connect_control(socket)?;
    let handles = ctl.handles()?;
    let locks = ctl.locks()?;
    // What an operator sees: filterctl's view matches the daemon's.
    // The stalled reader's open comes and goes at any time.
    let mut seen: Vec<String> = ctl_handles(&["--socket", &socket.display().to_string()])?
        .into_iter()
        .filter(|(_, (_, path))| path != "stall")
        .map(|(k, _)| k)
        .collect();
    let mut have: Vec<String> = handles
        .iter()
        .filter(|h| h.record.path.as_str() != "stall")
        .map(|h| h.record.key.to_string())
        .collect();
    seen.sort();
    have.sort();
    if seen != have {
        tally.violation(format!(
            "filterctl shows {} handles, the daemon {}",
            seen.len(),
            have.len()
        ));
    }
    for a in &snapshot {
        if a.path.is_empty() {
            continue;
        }
        let Some(h) = handles.iter().find(|h| h.record.path.as_str() == a.path) else {
            tally.violation(format!("{}: its persistent open is gone", a.path));
            continue;
        };
        for (off, len) in &a.locks {
            if !locks
                .iter()
                .any(|l| l.key == h.record.key && l.range.offset == *off && l.range.length == *len)
            {
                tally.violation(format!("{}: acknowledged lock at {off} is gone", a.path));
            }
        }
    }
    // Share modes hold: a writer is refused on every client's file.
    let c = smbl::Client::connect(smb_addr)?;
    let sid = c
        .session_setup(Uuid::new_v4(), "intruder", None)?
        .session_id()
        .context("session")?;
    for a in &snapshot {
        if a.path.is_empty() {
            continue;
        }
        let mut args = smbl::CreateArgs::new(sid, a.path.clone());
        args.access = vec!["write".into()];
        args.share = vec!["read".into(), "write".into(), "delete".into()];
        args.disposition = "open".into();
        let r = c.create(&args)?;
        if r.is_success() {
            tally.violation(format!("{}: an intruder opened it for writing", a.path));
        }
    }
    Ok(())
}

/// Sends SIGCONT to a stopped frontend when dropped (on every path out).
struct Thaw<'a>(&'a Shim);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.signal(nix::sys::signal::Signal::SIGCONT);
    }
}

/// A filterd restart while one frontend is stopped (nfsshim for even `k`,
/// smbshim for odd): meanwhile a client of the other protocol takes an
/// exclusive lock on a file both have open; once the stopped frontend
/// continues, its client's WRITE inside the lock must be refused and the
/// bytes must not land (issue 13 #1).
fn restart_while_stopped(
    k: u64,
    s: &Scratch,
    daemon: &Daemon,
    filterd: &mut Filterd,
    smb: &Shim,
    nfs: &Shim,
    tally: &Tally,
) -> anyhow::Result<()> {
    const DOTS: [u8; 64] = [b'.'; 64];
    let (off, len) = (16u64, 16u64);
    let stop_nfs = k.is_multiple_of(2);
    let path = format!("contested-{k}");
    std::fs::write(s.root().join(&path), DOTS)?;
    let patiently = |what: &str, f: &mut dyn FnMut() -> anyhow::Result<(String, Value)>| {
        let t0 = Instant::now();
        loop {
            let (status, v) = f()?;
            if status != "NFS4ERR_DELAY" && status != "STATUS_FILE_NOT_AVAILABLE" {
                return Ok::<_, anyhow::Error>((status, v));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("{what}: still {status} after 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Both protocols open the file (persistent handles, sharing all).
    let sc = smbl::Client::connect(smb.addr.as_str())?;
    sc.set_timeout(Duration::from_secs(30));
    let sid = sc
        .session_setup(Uuid::new_v4(), "contender", None)?
        .session_id()
        .context("session")?;
    let mut a = smbl::CreateArgs::new(sid, path.clone());
    a.access = vec!["read".into(), "write".into()];
    a.share = vec!["read".into(), "write".into(), "delete".into()];
    a.disposition = "open".into();
    a.durable = Some(smbl::Durable::persistent(Uuid::new_v4()));
    let r = sc.create(&a)?;
    if !r.is_success() {
        bail!("smbl/1 CREATE {path}: {}", r.value());
    }
    let fid = r.file_id().context("file_id")?.to_owned();
    let nc = nfsl::Client::connect(nfs.addr.as_str())?;
    nc.set_timeout(Duration::from_secs(30));
    let ns = nfs_session(Arc::new(nc), &format!("contender-{k}"))?;
    let mut oa = nfsl::OpenArgs::new("contender", path.clone());
    oa.access = nfsl::Access::Both;
    oa.deny = nfsl::Deny::None;
    let o = ns.call(0, nfsl::ops::open(&oa))?.require_ok()?;
    let st = o.stateid().context("stateid")?.current();
    // A DELAY takes the seqid back: `call` again re-sends it.
    let nfs_call = |req: Value| -> anyhow::Result<(String, Value)> {
        let r = ns.call(0, req)?;
        Ok((r.status().to_owned(), r.value().clone()))
    };
    let smb_reply = |r: smbl::Reply| -> anyhow::Result<(String, Value)> {
        Ok((r.status().to_owned(), r.value().clone()))
    };
    let range = smbl::LockSpec {
        offset: off,
        length: len,
        exclusive: true,
        unlock: false,
    };

    let (stopped, thaw) = if stop_nfs {
        ("nfsshim", Thaw(nfs))
    } else {
        ("smbshim", Thaw(smb))
    };
    thaw.0.signal(nix::sys::signal::Signal::SIGSTOP);
    filterd.kill9();
    *filterd = daemon.start(s);
    // The other protocol locks while the stopped frontend knows nothing.
    let (status, v) = if stop_nfs {
        patiently("smbl/1 LOCK", &mut || {
            smb_reply(sc.lock(sid, &fid, std::slice::from_ref(&range), None, false)?)
        })?
    } else {
        patiently("nfsl/1 LOCK", &mut || {
            nfs_call(nfsl::ops::lock(
                &st,
                "contender",
                nfsl::LockType::Write,
                off,
                len,
            ))
        })?
    };
    if status != "STATUS_SUCCESS" && status != "NFS4_OK" {
        bail!("the lock was not granted: {v}");
    }
    let lock_stateid: Option<nfsl::StateId> =
        serde_json::from_value(v["lock_stateid"].clone()).ok();
    drop(thaw);
    // The thawed frontend's client writes inside the lock.
    let (status, v) = if stop_nfs {
        patiently("nfsl/1 WRITE", &mut || {
            nfs_call(nfsl::ops::write(&st, off + 4, b"INTRUDER"))
        })?
    } else {
        patiently("smbl/1 WRITE", &mut || {
            smb_reply(sc.write(sid, &fid, off + 4, b"INTRUDER", None, false)?)
        })?
    };
    if status == "NFS4ERR_LOCKED" || status == "STATUS_FILE_LOCK_CONFLICT" {
        tally.lock_writes_refused.fetch_add(1, Ordering::Relaxed);
    } else {
        tally.violation(format!(
            "{path}: a WRITE inside another client's lock after filterd restarted while {stopped} was stopped: {v}"
        ));
    }
    let bytes = std::fs::read(s.root().join(&path))?;
    if bytes.get(16..32) != DOTS.get(16..32) {
        tally.violation(format!("{path}: bytes landed inside another client's lock"));
    }
    // Clean up (best effort: the checker does not look at this file).
    if let Some(l) = lock_stateid {
        let _ = nfs_call(nfsl::ops::locku(&l, off, len));
    } else {
        let unlock = smbl::LockSpec {
            unlock: true,
            ..range
        };
        let _ = sc.lock(sid, &fid, std::slice::from_ref(&unlock), None, false);
    }
    let _ = nfs_call(nfsl::ops::close(&st));
    let _ = sc.close(sid, &fid);
    Ok(())
}

/// SIGINT or SIGTERM (a timeout, Ctrl-C): stop every process of the soak —
/// they are the ones whose command line names its scratch dir — remove the
/// dir, exit 130. The signals are blocked in every thread and taken here.
fn stop_on_signals(dir: std::path::PathBuf) {
    use nix::sys::signal::{SigSet, Signal};
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    let _ = sigs.thread_block();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if sigs.wait().is_err() {
                return;
            }
            eprintln!("rksoak: interrupted; stopping its processes");
            let tag = dir.display().to_string();
            for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let pid = p.file_name().to_string_lossy().parse::<i32>().ok();
                let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                if let (Some(pid), true) = (pid, String::from_utf8_lossy(&cmd).contains(&tag)) {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            std::process::exit(130);
        });
}

/// key → (state, path) of every handle `filterctl ARGS --complete handles --json` shows.
fn ctl_handles(args: &[&str]) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    let out = std::process::Command::new(rkfilter_tests::bin("filterctl"))
        .args(args)
        // The complete list, not a durable-only one past filterctl's
        // bound: compared with the library's (re-review rr43a F3).
        .args(["--complete", "handles", "--json"])
        .output()?;
    let shown: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "filterctl handles: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let field = |h: &Value, f: &str| h[f].as_str().unwrap_or("?").to_owned();
    Ok(shown
        .as_array()
        .map(|a| {
            a.iter()
                .map(|h| {
                    let state = h["conn"]["state"].as_str().unwrap_or("?").to_owned();
                    (field(h, "key"), (state, field(h, "path")))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// With filterd dead: filterctl's post-mortem view of the state dir must be
/// what the restarted daemon shows. The daemon is started on a side socket
/// (no frontend reattaches and changes anything), read, and stopped. The
/// one allowed difference: a handle whose file was removed shows as
/// disconnected offline and lost after the restart (only a reopen can tell).
fn post_mortem_matches_restart(s: &Scratch, daemon: &Daemon, tally: &Tally) {
    let compare = || -> anyhow::Result<()> {
        let offline: Vec<&str> = daemon.offline.iter().map(String::as_str).collect();
        let offline = ctl_handles(&offline)?;
        let side = s.dir.join("side.sock");
        let mut probe = Filterd::spawn_on(s, Some(&side), &[], &daemon.flags(), &[]);
        probe.wait_ready();
        let restarted = ctl_handles(&["--socket", &side.display().to_string()])?;
        if !probe.terminate().success() {
            bail!("the side daemon did not stop cleanly");
        }
        let differ = |k: &String| match (offline.get(k), restarted.get(k)) {
            (Some((o, p)), Some((r, q))) => {
                p != q || (o != r && !(o == "disconnected" && r == "lost"))
            }
            _ => true,
        };
        let keys: std::collections::BTreeSet<&String> =
            offline.keys().chain(restarted.keys()).collect();
        if let Some(k) = keys.into_iter().find(|k| differ(k)) {
            bail!(
                "filterctl's post-mortem view differs from the restarted daemon's at {k}: {:?} vs {:?}",
                offline.get(k),
                restarted.get(k)
            );
        }
        Ok(())
    };
    tally.post_mortems.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = compare() {
        tally.violation(format!("{e:#}"));
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s = Scratch::new("soak");
    stop_on_signals(s.dir.clone());
    std::fs::write(s.root().join("stall"), vec![b's'; STALL_FILE]).context("the stall file")?;
    let mut daemon = Daemon {
        flags: vec!["--break-timeout-ms".into(), "1000".into()],
        offline: vec!["--state".into(), s.state().display().to_string()],
    };
    let mut cluster = None;
    if args.etcd {
        if !rkfilter_tests::etcd::etcd_available("rksoak --etcd") {
            bail!("--etcd needs the etcd binary (Debian etcd-server)");
        }
        let c = rkfilter_tests::etcd::Cluster::start(&s, 1);
        let url = c.url("rksoak");
        daemon
            .flags
            .extend(["--store", &url, "--lease-ttl-secs", "2", "--standby"].map(str::to_owned));
        daemon.offline = vec!["--store".into(), url];
        cluster = Some(c);
    }
    let mut filterd = daemon.start(&s);
    let mut smb = Shim::start("smbshim", &s.socket(), "smb-soak");
    let mut nfs = Shim::start("nfsshim", &s.socket(), "nfs-soak");
    let addrs = Arc::new(Addrs {
        smb: RwLock::new(smb.addr.clone()),
        nfs: RwLock::new(nfs.addr.clone()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut acked = Vec::new();
    let mut workers = Vec::new();
    for i in 0..args.clients {
        for kind in ["smb", "nfs"] {
            let a = Arc::new(Mutex::new(Acked::default()));
            acked.push(a.clone());
            let (addrs, stop, tally) = (addrs.clone(), stop.clone(), tally.clone());
            workers.push(std::thread::spawn(move || {
                let r = if kind == "smb" {
                    smb_client(i, addrs, stop, tally.clone(), a)
                } else {
                    nfs_client(i, addrs, stop, tally.clone(), a)
                };
                if let Err(e) = &r {
                    tally.violation(format!("{kind} client {i} gave up: {e:#}"));
                }
            }));
        }
    }
    for hostile in [stalled_reader, session_flooder] {
        let (addrs, stop, tally) = (addrs.clone(), stop.clone(), tally.clone());
        workers.push(std::thread::spawn(move || hostile(addrs, stop, tally)));
    }
    // Let every client get going, then take the baseline.
    wait_for("clients to start", Duration::from_secs(30), || {
        (tally.ops.load(Ordering::Relaxed) >= 4 * args.clients as u64).then_some(())
    });
    let (fd0, rss0) = usage(filterd.pid());
    let t0 = Instant::now();
    let mut rng = args.seed.max(1);
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut max_fd, mut max_rss) = (fd0, rss0);
    while t0.elapsed() < Duration::from_secs(args.seconds) {
        std::thread::sleep(Duration::from_millis(300 + next() % 900));
        let victim = next() % 4;
        let before = tally.ops.load(Ordering::Relaxed);
        match victim {
            0 => {
                smb.kill9_in_place();
                smb = Shim::start("smbshim", &s.socket(), "smb-soak");
                if let Ok(mut a) = addrs.smb.write() {
                    *a = smb.addr.clone();
                }
            }
            1 => {
                nfs.kill9_in_place();
                nfs = Shim::start("nfsshim", &s.socket(), "nfs-soak");
                if let Ok(mut a) = addrs.nfs.write() {
                    *a = nfs.addr.clone();
                }
            }
            2 => {
                filterd.kill9();
                post_mortem_matches_restart(&s, &daemon, &tally);
                filterd = daemon.start(&s);
            }
            _ => {
                let k = tally.stopped_restarts.fetch_add(1, Ordering::Relaxed);
                if let Err(e) =
                    restart_while_stopped(k, &s, &daemon, &mut filterd, &smb, &nfs, &tally)
                {
                    tally.violation(format!("restart while a frontend was stopped: {e:#}"));
                }
            }
        }
        tally.failovers.fetch_add(1, Ordering::Relaxed);
        // Recovered once every client made progress again.
        wait_for("the clients to carry on", Duration::from_secs(60), || {
            (tally.ops.load(Ordering::Relaxed) >= before + 2 * args.clients as u64).then_some(())
        });
        let check_now = || {
            check(
                &s.root(),
                &s.socket(),
                &read_addr(&addrs.smb),
                &acked,
                &tally,
            )
        };
        if let Err(e) = check_now() {
            tally.violation(format!("check failed: {e:#}"));
        }
        let (fd, rss) = usage(filterd.pid());
        max_fd = max_fd.max(fd);
        max_rss = max_rss.max(rss);
        if fd > fd0 + 256 {
            tally.violation(format!("filterd descriptors grew from {fd0} to {fd}"));
        }
        if rss > 2 * rss0 + 131_072 {
            tally.violation(format!("filterd memory grew from {rss0} kB to {rss} kB"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    if let Err(e) = check(
        &s.root(),
        &s.socket(),
        &read_addr(&addrs.smb),
        &acked,
        &tally,
    ) {
        tally.violation(format!("final check failed: {e:#}"));
    }
    let violations = tally
        .violations
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    println!(
        "rksoak summary ({} s, {} SMB-like + {} NFS-like clients, seed {}, {})",
        args.seconds,
        args.clients,
        args.clients,
        args.seed,
        if args.etcd {
            "etcd store"
        } else {
            "LMDB store"
        }
    );
    for (label, n) in [
        ("operations acknowledged", &tally.ops),
        ("failovers (SIGKILL)", &tally.failovers),
        ("replays answered", &tally.replays),
        ("retries after failures", &tally.retries),
        ("checks", &tally.checks),
        ("post-mortems compared", &tally.post_mortems),
        ("side opens/renames done", &tally.side_ops),
        ("side ops lost to failover", &tally.side_failed),
        ("stalled readers dropped", &tally.stalled_dropped),
        ("sessions refused (limit)", &tally.sessions_refused),
        ("restarts while stopped", &tally.stopped_restarts),
        ("writes in a lock refused", &tally.lock_writes_refused),
    ] {
        println!("  {label:<24} {:>8}", n.load(Ordering::Relaxed));
    }
    println!("  filterd fds  (start/max) {fd0:>8} / {max_fd}");
    println!("  filterd RSS kB (start/max) {rss0:>6} / {max_rss}");
    println!("  violations               {:>8}", violations.len());
    if !violations.is_empty() {
        for v in &violations {
            println!("    {v}");
        }
        // Returning (not process::exit) runs the destructors that stop
        // filterd and the shims and remove the scratch dir; exit status 1.
        bail!("{} violation(s)", violations.len());
    }
    drop(cluster);
    Ok(())
}
