//! The etcd store beside raw etcd: a one- and a three-member etcd on loopback (skipped
//! when the `etcd` binary is missing), a raw loop of 64-put Txns from one
//! writer (filterd's committer is one writer too), and persistent
//! open+close through filterd `--store etcd://…` at 64 connections.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::report::Figure;

/// An etcd cluster on loopback (one or more members), killed on drop.
pub struct Etcd {
    children: Vec<Child>,
    /// The members' client ports on 127.0.0.1.
    pub ports: Vec<u16>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Etcd {
    /// `HOST:PORT,…` of every member, for an `etcd://` URL.
    pub fn hosts(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Starts an `n`-member etcd cluster in `dir/etcd-n`; `None` when no etcd
/// binary is installed.
pub fn start(dir: &Path, n: usize) -> anyhow::Result<Option<Etcd>> {
    let installed = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()))
        .unwrap_or(false);
    if !installed {
        return Ok(None);
    }
    let ports = libfilter::etcd::spare_loopback_ports(2 * n)?;
    let members: Vec<(String, u16, u16)> = ports
        .chunks(2)
        .zip(0..)
        .filter_map(|(p, i)| Some((format!("bench{i}"), *p.first()?, *p.get(1)?)))
        .collect();
    let initial = members
        .iter()
        .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let base = dir.join(format!("etcd-{n}"));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let mut e = Etcd {
        children: Vec::new(),
        ports: members.iter().map(|m| m.1).collect(),
    };
    for (name, port, peer) in &members {
        let client = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", name, "--data-dir"])
            .arg(base.join(name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(base.join(format!("{name}.log")))?)
            .spawn()
            .context("starting etcd")?;
        e.children.push(child);
    }
    let rt = runtime()?;
    let t0 = Instant::now();
    for port in e.ports.clone() {
        let client = format!("http://127.0.0.1:{port}");
        loop {
            let ready = rt.block_on(async {
                let mut c = etcd_client::Client::connect([client.as_str()], None).await?;
                c.put("rkbench/ready", "1", None).await
            });
            if ready.is_ok() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("etcd did not serve within 20 s (see {})", base.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(Some(e))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// One writer committing Txns of `per_txn` 300-byte puts (fresh keys) for
/// `dur`: puts per second, latency per Txn.
pub fn raw_txn_puts(port: u16, per_txn: usize, dur: Duration) -> anyhow::Result<Figure> {
    use etcd_client::{Txn, TxnOp};
    let rt = runtime()?;
    rt.block_on(async {
        let mut c =
            etcd_client::Client::connect([format!("http://127.0.0.1:{port}")], None).await?;
        let value = vec![42u8; 300];
        let mut samples = Vec::new();
        let mut puts = 0u64;
        let t0 = Instant::now();
        while t0.elapsed() < dur {
            let ops: Vec<TxnOp> = (0..per_txn)
                .map(|_| {
                    TxnOp::put(
                        format!("rkbench/raw/{}", uuid::Uuid::new_v4().simple()),
                        value.clone(),
                        None,
                    )
                })
                .collect();
            let t = Instant::now();
            c.txn(Txn::new().and_then(ops)).await?;
            samples.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
            puts += per_txn as u64;
        }
        let wall = t0.elapsed();
        let mut f = Figure::from_samples(samples, puts, wall);
        f.ops_per_s = puts as f64 / wall.as_secs_f64();
        Ok(f)
    })
}

/// The raw time to read every key under `prefix` (the store's, with its
/// leading `/`) the way filterd's claim reads its table: at one revision,
/// as 35 key ranges at once (`h/` and `r/` split by the first hex digit of
/// their keys, and what lies between), each range in pages of 4000 keys,
/// the requests run on a one-worker client runtime; and how many keys
/// that was. (A sequential read in pages of 1000 takes several times as
/// long here: it would flatter filterd.)
pub fn raw_page_through(port: u16, prefix: &str) -> anyhow::Result<(Duration, usize)> {
    use etcd_client::GetOptions;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = rt.block_on(etcd_client::Client::connect(
        [format!("http://127.0.0.1:{port}")],
        None,
    ))?;
    let key = |rest: &str| format!("{prefix}/{rest}").into_bytes();
    let mut bounds = vec![key("")];
    for t in ["h", "r"] {
        for d in "0123456789abcdef".chars() {
            bounds.push(key(&format!("{t}/{d}")));
        }
        bounds.push(key(&format!("{t}0")));
    }
    let mut end = prefix.as_bytes().to_vec();
    end.push(b'/' + 1);
    bounds.push(end);
    let t0 = Instant::now();
    let kv = client.kv_client().max_decoding_message_size(16 << 20);
    let rev = rt
        .block_on({
            let mut kv = kv.clone();
            let k = key("owner");
            async move { kv.get(k, None).await }
        })?
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);
    let tasks: Vec<_> = bounds
        .windows(2)
        .filter_map(|w| Some((w.first()?.clone(), w.get(1)?.clone())))
        .map(|(from, end)| {
            let mut kv = kv.clone();
            rt.spawn(async move {
                let mut from = from;
                let mut keys = 0usize;
                loop {
                    let opts = GetOptions::new()
                        .with_range(end.clone())
                        .with_limit(4000)
                        .with_revision(rev);
                    let r = kv.get(from.clone(), Some(opts)).await?;
                    keys += r.kvs().len();
                    match r.kvs().last() {
                        Some(last) if r.more() => {
                            from = last.key().to_vec();
                            from.push(0);
                        }
                        _ => return Ok::<usize, etcd_client::Error>(keys),
                    }
                }
            })
        })
        .collect();
    let mut keys = 0;
    for t in tasks {
        keys += rt.block_on(t)??;
    }
    Ok((t0.elapsed(), keys))
}
