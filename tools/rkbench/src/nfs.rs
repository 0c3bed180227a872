//! nfsl/1 through a real nfsshim over a real filterd: OPEN+CLOSE rates and
//! the slot-replay lookup cost, beside a raw TCP line round trip.
//!
//! OPEN+CLOSE: a fresh daemon (`--no-fanotify`) and one nfsshim; N client
//! connections (the `nfsl` crate), each its own client owner
//! (EXCHANGE_ID) with its own session and its own file `nfs-{i}`, all set
//! up and warmed up before the clock starts; each connection's thread then
//! OPENs (create `unchecked`, read and write, deny none) and CLOSEs in a
//! loop on slot 0 until the deadline. Both are mutating requests, so each
//! reply is recorded in filterd's slot cache before it is sent.
//!
//! Slot replay: one connection with an open; a fresh WRITE (5 bytes at
//! offset 0, next seqid) is timed, then the last WRITE is re-sent on its
//! slot with the same seqid again and again, each answered from the slot
//! cache without executing. Both beside the raw TCP line round trip: the
//! replay's excess over it is the lookup cost.
//!
//! The baseline ([`crate::smb::tcp_line_rtt`]) is measured once per run by
//! `main` and passed in.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use nfsl::{Client, CreateMode, OpenArgs, Session, StateId};

use crate::mediated::start_export;
use crate::report::Figure;
use crate::smb::Shim;

/// Untimed OPEN+CLOSE pairs per connection before the clock starts.
const WARM_UP_PAIRS: usize = 50;
/// The slot every request of this section goes on.
const SLOT: u32 = 0;
/// What the slot-replay WRITE writes.
const DATA: &[u8] = b"hello";

/// A new connection with its own client owner and session.
fn session(addr: &str, owner: &str) -> anyhow::Result<Session> {
    let c = Arc::new(Client::connect(addr)?);
    let verifier = uuid::Uuid::new_v4().simple().to_string();
    let id = c
        .exchange_id(owner, verifier.get(..16).unwrap_or(&verifier))?
        .require_ok()?;
    let clientid = id
        .clientid()
        .ok_or_else(|| anyhow!("EXCHANGE_ID reply without clientid: {id}"))?;
    let created = c.create_session(clientid)?.require_ok()?;
    Session::from_reply(c, &created)
        .ok_or_else(|| anyhow!("CREATE_SESSION reply without sessionid or slots: {created}"))
}

/// One connection's OPEN+CLOSE loop state.
struct Opener {
    session: Session,
    args: OpenArgs,
}

impl Opener {
    fn new(addr: &str, i: usize) -> anyhow::Result<Opener> {
        let tag = uuid::Uuid::new_v4().simple();
        let session = session(addr, &format!("bench-{i}-{tag}"))?;
        let mut args = OpenArgs::new(format!("bench-{i}-open"), format!("nfs-{i}"));
        args.create = Some((CreateMode::Unchecked, None));
        Ok(Opener { session, args })
    }

    /// One OPEN and its CLOSE, both `NFS4_OK`.
    fn pair(&self) -> anyhow::Result<()> {
        // The typed calls: the same lines as `open`/`close`, without
        // building and parsing `Value`s (the client's CPU shares the cores).
        let r = self.session.open_outcome(SLOT, &self.args)?.require_ok()?;
        let stateid = r
            .stateid()
            .ok_or_else(|| anyhow!("OPEN reply without stateid: {r}"))?;
        self.session.close_outcome(SLOT, stateid)?.require_ok()?;
        Ok(())
    }
}

impl crate::gate::Worker for Opener {
    fn warm_up(&mut self) -> anyhow::Result<()> {
        (0..WARM_UP_PAIRS).try_for_each(|_| self.pair())
    }
    fn op(&mut self) -> anyhow::Result<()> {
        self.pair()
    }
}

/// OPEN+CLOSE pairs through nfsshim.
pub struct OpenClose {
    /// Pairs per second, all connections together.
    pub pairs_per_s: f64,
    /// Mean µs per pair.
    pub mean_us: f64,
    /// p99 µs per pair.
    pub p99_us: f64,
    /// Timed pairs.
    pub pairs: u64,
    /// filterd's store operations per commit over the whole run (warm-up
    /// included): how many requests share a group commit.
    pub ops_per_commit: f64,
}

/// `conns` connections (one thread each) OPEN and CLOSE in a loop.
pub fn open_close(
    filterd: &Path,
    nfsshim: &Path,
    dir: &Path,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<OpenClose> {
    let tag = format!("nfs-open-{conns}");
    let d = start_export(filterd, dir, &tag)?;
    let shim = Shim::start(
        nfsshim,
        &d.socket,
        "bench",
        &dir.join(format!("{tag}/nfsshim.log")),
    )?;
    let mut openers = Vec::with_capacity(conns);
    for i in 0..conns {
        openers.push(Opener::new(&shim.addr, i)?);
    }
    let (all, wall) = crate::gate::run("nfs-bench", openers, dur)
        .with_context(|| format!("nfsl/1 OPEN+CLOSE at {conns} connections"))?;
    let pairs = all.len() as u64;
    let f = Figure::from_samples(all, pairs, wall);
    let ops_per_commit = crate::mediated::ops_per_commit(&d.socket)?;
    drop(shim);
    drop(d);
    Ok(OpenClose {
        pairs_per_s: f.ops_per_s,
        mean_us: f.mean_us,
        p99_us: f.p99_us,
        pairs,
        ops_per_commit,
    })
}

/// The slot-replay figures, same connection and slot.
pub struct SlotReplay {
    /// A fresh WRITE (executed, its reply recorded in filterd).
    pub fresh_write: Figure,
    /// The last WRITE re-sent with its seqid, answered from the slot cache.
    pub replay: Figure,
}

/// A fresh WRITE, then its re-send from the slot cache, timed each.
pub fn slot_replay(
    filterd: &Path,
    nfsshim: &Path,
    dir: &Path,
    dur: Duration,
) -> anyhow::Result<SlotReplay> {
    let tag = "nfs-replay";
    let d = start_export(filterd, dir, tag)?;
    let shim = Shim::start(
        nfsshim,
        &d.socket,
        "bench-replay",
        &dir.join(format!("{tag}/nfsshim.log")),
    )?;
    let s = session(
        &shim.addr,
        &format!("bench-replay-{}", uuid::Uuid::new_v4()),
    )?;
    let mut args = OpenArgs::new("bench-replay-open", "nfs-replay");
    args.create = Some((CreateMode::Unchecked, None));
    let open = s.open(SLOT, &args)?.require_ok()?;
    let stateid: StateId = open
        .stateid()
        .ok_or_else(|| anyhow!("OPEN reply without stateid: {open}"))?;
    let write_ok = |r: nfsl::Reply| -> anyhow::Result<nfsl::Reply> {
        let r = r.require_ok()?;
        if r.count() != Some(DATA.len() as u64) {
            bail!("WRITE reply without count {}: {r}", DATA.len());
        }
        Ok(r)
    };
    let fresh_write = crate::raw::timed(dur, || {
        write_ok(s.write(SLOT, &stateid, 0, DATA)?)?;
        Ok(())
    })
    .context("fresh nfsl/1 WRITEs")?;
    let last = s.last_seq(SLOT)?;
    let replay = crate::raw::timed(dur, || {
        write_ok(s.resend(SLOT, nfsl::ops::write(&stateid, 0, DATA))?)?;
        Ok(())
    })
    .context("re-sent nfsl/1 WRITEs")?;
    if s.last_seq(SLOT)? != last {
        bail!("re-sends moved the slot table");
    }
    s.close(SLOT, &stateid)?.require_ok()?;
    drop(s);
    drop(shim);
    drop(d);
    Ok(SlotReplay {
        fresh_write,
        replay,
    })
}
