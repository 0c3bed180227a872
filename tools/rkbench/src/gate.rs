//! The start gate every multi-connection bench runs through (mediated
//! open+close, smbl/1 CREATE+CLOSE, nfsl/1 OPEN+CLOSE): one thread per
//! connection warms up untimed, reports ready (a [`Ready`] guard sends even
//! if the warm-up fails or panics), and waits for the gate; dropping the
//! gate's sender starts every clock at once. The samples are per-operation
//! latencies in ns, all threads together.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

/// One connection's part in a gated bench.
pub trait Worker: Send + 'static {
    /// Untimed work before the gate (caches, CPU frequency). Its error is
    /// reported once the gate opens, so the other threads are not held up.
    fn warm_up(&mut self) -> anyhow::Result<()>;
    /// Called when the gate opens, before the clock starts.
    fn go(&mut self) {}
    /// One timed operation.
    fn op(&mut self) -> anyhow::Result<()>;
}

/// Reports a bench thread ready when dropped, so a thread whose warm-up
/// failed or panicked still counts and the others are not kept waiting.
struct Ready(crossbeam_channel::Sender<()>);

impl Drop for Ready {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

/// Runs every worker on a thread of its own (`{name}-N`) for `dur` after
/// the gate: all samples, and the wall time from the gate to the last
/// thread's end.
pub fn run<W: Worker>(
    name: &str,
    workers: Vec<W>,
    dur: Duration,
) -> anyhow::Result<(Vec<u64>, Duration)> {
    let conns = workers.len();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<()>(conns);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
    let abort = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(conns);
    for (i, mut w) in workers.into_iter().enumerate() {
        let ready = Ready(ready_tx.clone());
        let (go, aborted) = (go_rx.clone(), abort.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || -> anyhow::Result<Vec<u64>> {
                let warm = w.warm_up();
                drop(ready);
                let _ = go.recv(); // returns when `go_tx` is dropped
                warm?;
                w.go();
                let mut ns = Vec::with_capacity(1 << 12);
                if aborted.load(Ordering::Relaxed) {
                    return Ok(ns);
                }
                let t0 = Instant::now();
                while t0.elapsed() < dur {
                    let t = Instant::now();
                    w.op()?;
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
    Ok((all, t0.elapsed()))
}

/// Joins the bench threads: all their samples, or the first failure.
fn collect(
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
