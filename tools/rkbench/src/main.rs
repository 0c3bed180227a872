//! rkbench — rkfilter's benchmarks. Every figure is printed beside the raw
//! baseline it should be judged against, measured in the same run:
//! raw `openat+close`, a raw SEQPACKET round trip between two processes, a
//! raw fsync'd LMDB commit. Prints a table and writes JSON.
//!
//! Sections: `raw` (baselines), `mediated` (open+close through filterd for
//! none / durable / persistent at 1, 8, 64 connections, and a mandatory-lock
//! check round trip), `etcd` (persistent open+close at 64 connections with
//! the table in a one- and a three-member etcd, each beside a raw 64-put
//! etcd Txn loop on the same cluster; skipped without an etcd binary),
//! `local` (local opens under fanotify; root only), `restart` (start to
//! serving with 10k and 100k persistent handles beside raw
//! `open_by_handle_at`; and with the table in etcd, beside paging through
//! its keys plus `open_by_handle_at`; filterd's RSS per handle at the
//! largest size beside the LMDB bytes per record; `--restart-only` runs
//! just this and the baselines), `smb` (smbl/1 CREATE+CLOSE through smbshim
//! for durable-with-lease and persistent opens at 1 and 32 connections,
//! beside a raw TCP line round trip; 4 KiB WRITEs on persistent handles,
//! each synced before its reply, at 1 and 32 connections beside raw
//! pwrite+fdatasync at as many threads; and the smbshim failover time from a
//! replacement listening to a client's RECONNECT done; skipped without an
//! smbshim binary), `nfs` (nfsl/1 OPEN+CLOSE through nfsshim at 1 and 32
//! connections beside the same TCP round trip, and the slot-replay lookup
//! cost: a re-sent WRITE answered from the slot cache beside a fresh WRITE
//! and the round trip; skipped without an nfsshim binary), `smb3` (a real
//! SMB 3 client, smbprotocol, against rksmbd: CREATE+CLOSE, 64 KiB READ
//! and WRITE at 1 and 32 connections, beside Samba's smbd with the same
//! client when it is installed, and smbshim's CREATE+CLOSE of the same run;
//! skipped without rksmbd or a python with smbprotocol). `targets` holds
//! issue 16's target rows: each ratio measured three times inside the run
//! (the sections' own figures, then two more rounds of just those figures
//! beside fresh baselines; once with `--quick`) and reported as the median
//! (`--targets-only` runs just those rounds). `daemon` starts and stops filterd for them;
//! `report` holds the rows, the targets, the table and the JSON. Without a
//! filterd binary only the baselines run.
#![forbid(unsafe_code)]

mod daemon;
mod etcd;
mod gate;
mod local;
mod mediated;
mod nfs;
mod raw;
mod report;
mod restart;
mod smb;
mod smb3;
mod targets;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use report::{Report, Row};

/// Benchmarks for rkfilter, each figure beside its raw baseline.
#[derive(Parser, Debug)]
#[command(name = "rkbench", version, about, long_about = None)]
struct Args {
    /// The filterd binary [default: next to rkbench].
    #[arg(long, value_name = "PATH")]
    filterd: Option<PathBuf>,
    /// The smbshim binary [default: next to rkbench].
    #[arg(long, value_name = "PATH")]
    smbshim: Option<PathBuf>,
    /// The nfsshim binary [default: next to rkbench].
    #[arg(long, value_name = "PATH")]
    nfsshim: Option<PathBuf>,
    /// The rksmbd binary [default: next to rkbench].
    #[arg(long, value_name = "PATH")]
    rksmbd: Option<PathBuf>,
    /// The python with smbprotocol (PyPI) that plays the real SMB 3 client
    /// of the rksmbd rows [default: target/smbvenv/bin/python, which
    /// `make bench` makes]; without it those rows are skipped.
    #[arg(long, value_name = "PYTHON")]
    smb_python: Option<PathBuf>,
    /// Scratch directory (export roots, state dirs); must be new or empty,
    /// removed afterwards [default: a fresh dir under $TMPDIR].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seconds per timed measurement [default: 2, or 0.3 with `--quick`].
    #[arg(long)]
    seconds: Option<f64>,
    /// Where to write the JSON report.
    #[arg(long, value_name = "OUT", default_value = "target/bench/rkbench.json")]
    json: PathBuf,
    /// A short smoke run (0.3 s per figure unless `--seconds`, 10k handles
    /// for restart, the
    /// target rows measured once instead of three times).
    #[arg(long)]
    quick: bool,
    /// Only the baselines and the restart section (recovery time and
    /// memory per handle), for before/after comparisons of recovery.
    #[arg(long)]
    restart_only: bool,
    /// Also measure the restart with 1M persistent handles (a million files
    /// in the scratch directory: minutes to prepare, ~1 GiB of disk).
    #[arg(long)]
    large: bool,
    /// Only the etcd rows (persistent open+close at 64 connections beside
    /// the raw 64-put Txn loop, 1 and 3 nodes), for before/after
    /// comparisons of the etcd store.
    #[arg(long)]
    etcd_only: bool,
    /// Only the restart from a one-member etcd (100k persistent handles,
    /// 10k with `--quick`), measured three times (once with `--quick`)
    /// beside the raw page-through + `open_by_handle_at`, for before/after
    /// comparisons of the etcd store's read.
    #[arg(long)]
    etcd_restart_only: bool,
    /// With `--etcd-restart-only`: a second filterd binary (an older
    /// build, say) started on the same prepared table right after the
    /// first in every repetition, the order alternating; its rows are
    /// marked "(alt)", each with filterd's CPU to serving.
    #[arg(long, value_name = "PATH")]
    filterd_alt: Option<PathBuf>,
    /// Only the frontend rows (smbl/1 CREATE+CLOSE through smbshim, nfsl/1
    /// OPEN+CLOSE through nfsshim) beside the round trips and
    /// filterd-direct persistent open+close at 32 connections, each row's
    /// ratio printed, for before/after comparisons of the frontends.
    #[arg(long)]
    frontends_only: bool,
    /// Only issue 16's target rows that need no restart (mediated
    /// non-durable open+close, smbl/1, nfsl/1, each beside its baselines),
    /// each measured three times (once with `--quick`), for before/after
    /// comparisons of the request paths.
    #[arg(long)]
    targets_only: bool,
    /// Only the local-open rows under fanotify (no listener, an allow-all
    /// listener, filterd with files without and with protocol state; root
    /// only), measured three times (once with `--quick`), the targets the
    /// medians, for before/after comparisons of filterd's fanotify path.
    #[arg(long)]
    local_only: bool,
    /// Only the nfsl/1 32-connection target: smbl/1 persistent
    /// CREATE+CLOSE and nfsl/1 OPEN+CLOSE at 32 connections, one after the
    /// other, `--repeat` times (once with `--quick`), each repetition's
    /// ratio and ops/commit printed and the target the median, for
    /// before/after comparisons of nfsshim's request path.
    #[arg(long)]
    nfs32_only: bool,
    /// Only the key-locality rows: the raw LMDB 64-put commit with random
    /// and with time-ordered keys, and persistent open+close at 64
    /// connections on a daemon holding nothing and on one already holding
    /// 100k persistent handles (5k with `--quick`), `--repeat` times, for comparing two filterd
    /// builds' key schemes (docs/PERFORMANCE.md, round 17).
    #[arg(long)]
    keys_only: bool,
    /// Repetitions of `--nfs32-only` and `--keys-only`.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Internal: echo server for the socket round-trip baseline.
    #[arg(long, hide = true, value_name = "SOCKET")]
    echo_server: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(sock) = &args.echo_server {
        return raw::echo_server(sock);
    }
    let secs = args.seconds.unwrap_or(if args.quick { 0.3 } else { 2.0 });
    let dur = Duration::from_secs_f64(secs);
    // How often each target ratio is measured inside the run (its median
    // is reported).
    let reps = if args.quick { 1 } else { 3 };
    let filterd = match &args.filterd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("filterd"),
    };
    let smbshim = match &args.smbshim {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("smbshim"),
    };
    let nfsshim = match &args.nfsshim {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("nfsshim"),
    };
    let rksmbd = match &args.rksmbd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("rksmbd"),
    };
    let scratch = Scratch::create(args.dir.clone())?;
    let dir = scratch.0.clone();

    let mut rep = Report::default();
    if args.etcd_only {
        etcd_section(&mut rep, &filterd, &dir, dur)?;
        print!("{}", rep.table());
        return Ok(());
    }
    if args.etcd_restart_only {
        etcd_restart_section(
            &mut rep,
            &filterd,
            args.filterd_alt.as_deref(),
            &dir,
            args.quick,
            reps,
        )?;
        print!("{}", rep.table());
        return Ok(());
    }
    if args.frontends_only {
        frontends_section(&mut rep, &filterd, &smbshim, &nfsshim, &dir, dur)?;
        print!("{}", rep.table());
        rep.write_json(&args.json)?;
        return Ok(());
    }
    if args.nfs32_only {
        let reps = if args.quick { 1 } else { args.repeat.max(1) };
        let programs = (filterd.as_path(), smbshim.as_path(), nfsshim.as_path());
        nfs32_section(&mut rep, programs, &dir, dur, reps)?;
        print!("{}", rep.table());
        rep.write_json(&args.json)?;
        return Ok(());
    }
    if args.keys_only {
        let reps = if args.quick { 1 } else { args.repeat.max(1) };
        for _ in 0..reps {
            let random = raw::lmdb_commits(&dir, 64, raw::KeyOrder::Random, dur)?;
            // The same loop on an empty table, for the comparison.
            let durability = libfilter::model::Durability::Persistent { timeout_ms: 60_000 };
            let m = mediated::open_close(&filterd, &dir, durability, 64, dur)?;
            rep.rows.push(
                mediated_row(
                    "mediated open+close, persistent (requests/s, µs/pair)",
                    64,
                    &m,
                )
                .beside_rate("raw LMDB 64 puts/commit", random.ops_per_s),
            );
            keys_section(&mut rep, &filterd, &dir, dur, args.quick, &random)?;
        }
        print!("{}", rep.table());
        rep.write_json(&args.json)?;
        return Ok(());
    }
    if args.local_only {
        local_section(&mut rep, &filterd, &dir, dur, reps)?;
        print!("{}", rep.table());
        rep.write_json(&args.json)?;
        return Ok(());
    }
    if args.targets_only {
        let programs = targets::Programs {
            filterd: &filterd,
            smbshim: smbshim.exists().then_some(smbshim.as_path()),
            nfsshim: nfsshim.exists().then_some(nfsshim.as_path()),
        };
        let mut rounds = Vec::with_capacity(reps);
        for i in 0..reps {
            eprintln!("rkbench: the issue-16 target figures ({}/{reps})…", i + 1);
            let r = targets::measure_round(&programs, &dir, dur)?;
            eprintln!("rkbench: {r:?}");
            rounds.push(r);
        }
        targets::push_round_targets(&mut rep, &rounds);
        print!("{}", rep.table());
        return Ok(());
    }
    eprintln!("rkbench: baselines…");
    let openat = raw::openat_close(&dir, dur)?;
    let openat2 = raw::openat2_close(&dir, dur)?;
    let rtt = raw::socket_rtt(&dir, dur)?;
    let tcp = smb::tcp_line_rtt(dur)?;
    let lmdb1 = raw::lmdb_commits(&dir, 1, raw::KeyOrder::Random, dur)?;
    let lmdb64 = raw::lmdb_commits(&dir, 64, raw::KeyOrder::Random, dur)?;
    rep.rows.push(Row::new(
        "raw openat+close",
        1,
        openat.ops_per_s,
        openat.mean_us,
        openat.p99_us,
    ));
    rep.rows.push(Row::new(
        "raw openat2(beneath)+close",
        1,
        openat2.ops_per_s,
        openat2.mean_us,
        openat2.p99_us,
    ));
    rep.rows.push(Row::new(
        "raw SEQPACKET round trip",
        1,
        rtt.ops_per_s,
        rtt.mean_us,
        rtt.p99_us,
    ));
    rep.rows.push(Row::new(
        "raw TCP line round trip (loopback, echo thread)",
        1,
        tcp.ops_per_s,
        tcp.mean_us,
        tcp.p99_us,
    ));
    rep.rows.push(Row::new(
        "raw LMDB commit, 1 put (puts/s)",
        1,
        lmdb1.ops_per_s,
        lmdb1.mean_us,
        lmdb1.p99_us,
    ));
    rep.rows.push(Row::new(
        "raw LMDB commit, 64 puts (puts/s)",
        1,
        lmdb64.ops_per_s,
        lmdb64.mean_us,
        lmdb64.p99_us,
    ));

    let mut round1 = targets::Round {
        seqpacket_rtt_us: Some(rtt.mean_us),
        openat_us: Some(openat.mean_us),
        tcp_rtt_us: Some(tcp.mean_us),
        ..targets::Round::default()
    };

    if filterd.exists() {
        if !args.restart_only {
            eprintln!("rkbench: mediated open+close…");
            let mut persistent64 = None;
            for (name, dur_kind) in mediated::KINDS {
                // Persistent also at 32: the filterd-direct side of the
                // smbl/1 32-connection target.
                let conn_counts: &[usize] = if *name == "persistent" {
                    &[1, 8, 32, 64]
                } else {
                    &[1, 8, 64]
                };
                for &conns in conn_counts {
                    let m = mediated::open_close(&filterd, &dir, *dur_kind, conns, dur)?;
                    let label = format!("mediated open+close, {name} (requests/s, µs/pair)");
                    let mut row = Row::new(&label, conns, m.requests_per_s, m.mean_us, m.p99_us)
                        .with("pairs_per_s", m.requests_per_s / 2.0);
                    if m.ops_per_commit > 0.0 {
                        row = row
                            .note(format!("{:.1} ops/commit", m.ops_per_commit))
                            .with("store_ops_per_commit", m.ops_per_commit);
                    }
                    if *name == "none" && conns == 1 {
                        round1.mediated_none_1_us = Some(m.mean_us);
                        row = row.beside(
                            "2 × rtt + raw openat+close",
                            2.0 * rtt.mean_us + openat.mean_us,
                        );
                    }
                    if *name == "persistent" {
                        row = row.beside_rate("raw LMDB 64 puts/commit", lmdb64.ops_per_s);
                        if conns == 32 {
                            round1.mediated_persistent_32_pairs = Some(m.requests_per_s / 2.0);
                        }
                        if conns == 64 {
                            persistent64 = Some(m.requests_per_s);
                        }
                    }
                    rep.rows.push(row);
                }
            }
            keys_section(&mut rep, &filterd, &dir, dur, args.quick, &lmdb64)?;
            if let Some(p) = persistent64 {
                rep.target(
                    "persistent requests/s at 64 conns ≥ 0.7× raw LMDB puts/s (64/commit)",
                    p / lmdb64.ops_per_s,
                    0.7,
                    false,
                );
            }
            eprintln!("rkbench: the etcd store…");
            etcd_section(&mut rep, &filterd, &dir, dur)?;
            let io = mediated::check_io(&filterd, &dir, dur)?;
            rep.rows.push(
                Row::new(
                    "mandatory-lock check (CheckIo) round trip",
                    1,
                    io.ops_per_s,
                    io.mean_us,
                    io.p99_us,
                )
                .beside("raw SEQPACKET round trip", rtt.mean_us),
            );
            if smbshim.exists() {
                eprintln!("rkbench: smbl/1 through smbshim…");
                smb_section(
                    &mut rep,
                    &mut round1,
                    &filterd,
                    &smbshim,
                    &dir,
                    dur,
                    tcp,
                    args.quick,
                )?;
            } else {
                eprintln!(
                    "rkbench: skipped smbl/1 section: smbshim not built ({} does not exist)",
                    smbshim.display()
                );
            }
            match (rksmbd.exists(), smb3::python(args.smb_python.as_deref())) {
                (true, Some(python)) => {
                    eprintln!("rkbench: SMB 3 (smbprotocol) through rksmbd, and Samba's smbd…");
                    smb3_section(&mut rep, &filterd, &rksmbd, &python, &dir, dur)?;
                }
                (false, _) => eprintln!(
                    "rkbench: skipped SMB 3 section: rksmbd not built ({} does not exist)",
                    rksmbd.display()
                ),
                (true, None) => eprintln!(
                    "rkbench: skipped SMB 3 section: no python with smbprotocol \
                     (`make bench` makes target/smbvenv; or pass --smb-python)"
                ),
            }
            if nfsshim.exists() {
                eprintln!("rkbench: nfsl/1 through nfsshim…");
                nfs_section(&mut rep, &mut round1, &filterd, &nfsshim, &dir, dur, tcp)?;
            } else {
                eprintln!(
                    "rkbench: skipped nfsl/1 section: nfsshim not built ({} does not exist)",
                    nfsshim.display()
                );
            }
            let mut rounds = vec![round1];
            let programs = targets::Programs {
                filterd: &filterd,
                smbshim: smbshim.exists().then_some(smbshim.as_path()),
                nfsshim: nfsshim.exists().then_some(nfsshim.as_path()),
            };
            for i in 1..reps {
                eprintln!(
                    "rkbench: the issue-16 target figures again ({}/{reps})…",
                    i + 1
                );
                rounds.push(targets::measure_round(&programs, &dir, dur)?);
            }
            targets::push_round_targets(&mut rep, &rounds);
            local_section(&mut rep, &filterd, &dir, dur, reps)?;
        }
        restart_section(&mut rep, &filterd, &dir, args.quick, args.large, reps)?;
    } else {
        eprintln!(
            "rkbench: skipped: filterd not built ({} does not exist); \
             only the raw baselines were measured",
            filterd.display()
        );
    }
    print!("{}", rep.table());
    rep.write_json(&args.json)?;
    println!("JSON report: {}", args.json.display());
    Ok(())
}

/// The local-open rows under fanotify (root only: skipped otherwise). The
/// whole section is measured `reps` times (each time a raw, an allow-all
/// and a filterd figure side by side); the target ratios are the medians,
/// the rows show the first.
fn local_section(
    rep: &mut Report,
    filterd: &Path,
    dir: &Path,
    dur: Duration,
    reps: usize,
) -> anyhow::Result<()> {
    eprintln!("rkbench: local opens under fanotify…");
    let Some(l) = local::measure(filterd, dir, dur)? else {
        eprintln!(
            "rkbench: skipped local-open section: needs root (mounts a tmpfs, uses fanotify)"
        );
        return Ok(());
    };
    let mut stateless = vec![l.stateless.mean_us / l.raw.mean_us];
    let mut stateful = vec![l.stateful.mean_us / l.allow_all.mean_us];
    for i in 1..reps {
        eprintln!(
            "rkbench: local opens under fanotify again ({}/{reps})…",
            i + 1
        );
        if let Some(m) = local::measure(filterd, dir, dur)? {
            stateless.push(m.stateless.mean_us / m.raw.mean_us);
            stateful.push(m.stateful.mean_us / m.allow_all.mean_us);
        }
    }
    rep.rows.push(Row::new(
        "local open+close, no fanotify (raw)",
        1,
        l.raw.ops_per_s,
        l.raw.mean_us,
        l.raw.p99_us,
    ));
    rep.rows.push(
        Row::new(
            "local open+close, allow-all fanotify listener",
            1,
            l.allow_all.ops_per_s,
            l.allow_all.mean_us,
            l.allow_all.p99_us,
        )
        .beside("raw open+close", l.raw.mean_us),
    );
    rep.rows.push(
        Row::new(
            "local open+close via filterd, file without state",
            1,
            l.stateless.ops_per_s,
            l.stateless.mean_us,
            l.stateless.p99_us,
        )
        .beside("raw open+close", l.raw.mean_us),
    );
    rep.rows.push(
        Row::new(
            "local open+close via filterd, file with state",
            1,
            l.stateful.ops_per_s,
            l.stateful.mean_us,
            l.stateful.p99_us,
        )
        .beside("allow-all listener", l.allow_all.mean_us),
    );
    rep.target_median(
        "local open of a file without protocol state ≤ 1.2× raw",
        &stateless,
        1.2,
        true,
    );
    let n = local::OPENERS;
    rep.rows.push(
        Row::new(
            "local open+close, allow-all fanotify listener, concurrent openers",
            n,
            l.allow_all_many.ops_per_s,
            l.allow_all_many.mean_us,
            l.allow_all_many.p99_us,
        )
        .beside_rate("raw, same openers", l.raw_many.ops_per_s),
    );
    let (many, refused) = l.stateful_many;
    rep.rows.push(
        Row::new(
            "local open+close via filterd, file with state, concurrent openers",
            n,
            many.ops_per_s,
            many.mean_us,
            many.p99_us,
        )
        .beside_rate(
            "allow-all listener, same openers",
            l.allow_all_many.ops_per_s,
        )
        .with("refused", refused as f64)
        .with("raw_ops_per_s", l.raw_many.ops_per_s)
        .note(format!("{refused} refused")),
    );
    rep.target_median(
        "local open of a file with protocol state ≤ 1.5× allow-all listener",
        &stateful,
        1.5,
        true,
    );
    Ok(())
}

/// rksmbd rows (a real SMB 3 client: CREATE+CLOSE, 64 KiB READ and WRITE
/// at 1 and 32 connections), each beside Samba's smbd with the same client
/// when it runs here; CREATE+CLOSE also carries smbshim's smbl/1 rate of
/// this run (`smbshim_pairs_per_s`), and is beside it without Samba.
fn smb3_section(
    rep: &mut Report,
    filterd: &std::path::Path,
    rksmbd: &std::path::Path,
    python: &std::path::Path,
    dir: &std::path::Path,
    dur: Duration,
) -> anyhow::Result<()> {
    let ours = smb3::rksmbd(filterd, rksmbd, python, dir, dur)?;
    let samba = match smb3::samba(python, dir, dur)? {
        Ok(rows) => rows,
        Err(why) => {
            eprintln!("rkbench: no Samba column: {why}");
            vec![]
        }
    };
    let smbshim = |conns: usize| {
        rep.rows
            .iter()
            .find(|r| r.conns == conns && r.name.starts_with("smbl/1 CREATE+CLOSE, durable"))
            .map(|r| r.ops_per_s)
    };
    let mut rows = vec![];
    for m in &ours {
        let mut row = Row::new(
            &smb3::row_name("rksmbd", &m.op),
            m.conns,
            m.fig.ops_per_s,
            m.fig.mean_us,
            m.fig.p99_us,
        );
        let theirs = samba.iter().find(|s| s.op == m.op && s.conns == m.conns);
        let shim = (m.op == "create_close").then(|| smbshim(m.conns)).flatten();
        if let Some(shim) = shim {
            row = row.with("smbshim_pairs_per_s", shim);
        }
        match (theirs, shim) {
            (Some(t), _) => {
                row = row
                    .beside_rate("Samba smbd, same client", t.fig.ops_per_s)
                    .with("samba_ops_per_s", t.fig.ops_per_s);
            }
            (None, Some(shim)) => {
                row = row
                    .beside_rate("smbshim smbl/1 CREATE+CLOSE, same conns", shim)
                    .note("no Samba column".into());
            }
            (None, None) => row = row.note("no Samba column".into()),
        }
        rows.push(row);
    }
    for t in &samba {
        rows.push(Row::new(
            &smb3::row_name("Samba smbd", &t.op),
            t.conns,
            t.fig.ops_per_s,
            t.fig.mean_us,
            t.fig.p99_us,
        ));
    }
    rep.rows.extend(rows);
    Ok(())
}

/// Restart rows: start→serving with 10k and 100k persistent handles (LMDB,
/// and etcd when there is an etcd binary; 1M too with `--large`, LMDB only)
/// beside raw `open_by_handle_at`, and filterd's memory per handle at 100k
/// (10k with `--quick`) beside the stored bytes per record. The targets
/// size (100k, or 10k with `--quick`) is measured `reps` times and its
/// target ratios are the medians; its rows show the first.
fn restart_section(
    rep: &mut Report,
    filterd: &std::path::Path,
    dir: &std::path::Path,
    quick: bool,
    large: bool,
    reps: usize,
) -> anyhow::Result<()> {
    eprintln!("rkbench: restart recovery…");
    let sizes: &[usize] = match (quick, large) {
        (true, false) => &[10_000],
        (true, true) => &[10_000, 1_000_000],
        (false, false) => &[10_000, 100_000],
        (false, true) => &[10_000, 100_000, 1_000_000],
    };
    let target_size = if quick { 10_000 } else { 100_000 };
    let empty = restart::measure(filterd, dir, 0)?;
    for &n in sizes {
        let f = restart::measure(filterd, dir, n)?;
        let per_handle =
            |rss_kib: u64| (rss_kib.saturating_sub(empty.rss_kib) as f64 * 1024.0) / n as f64;
        if n == target_size {
            let mut again = vec![f.clone()];
            for i in 1..reps {
                eprintln!(
                    "rkbench: restart with {n} handles again ({}/{reps})…",
                    i + 1
                );
                again.push(restart::measure(filterd, dir, n)?);
            }
            let ratios: Vec<f64> = again
                .iter()
                .map(|g| g.start_to_serving_ms / g.raw_open_by_handle_ms)
                .collect();
            rep.target_median(
                &format!("restart with {n} persistent handles ≤ 2× raw open_by_handle_at+close"),
                &ratios,
                2.0,
                true,
            );
            let kib: Vec<f64> = again
                .iter()
                .map(|g| per_handle(g.rss_kib) / 1024.0)
                .collect();
            rep.target_median(
                &format!("filterd RSS per handle at {n} handles ≤ 1 KiB"),
                &kib,
                1.0,
                true,
            );
            let bytes = per_handle(f.rss_kib);
            rep.rows.push(
                Row::new(
                    &format!("filterd RSS per handle, {n} persistent handles (bytes)"),
                    1,
                    0.0,
                    bytes,
                    0.0,
                )
                .beside(
                    "LMDB data file bytes per handle",
                    f.stored_bytes as f64 / n as f64,
                )
                .with("rss_kib", f.rss_kib as f64)
                .with("rss_empty_kib", empty.rss_kib as f64)
                .with(
                    "anon_bytes_per_handle",
                    (f.rss_anon_kib.saturating_sub(empty.rss_anon_kib) as f64 * 1024.0) / n as f64,
                )
                .with(
                    "file_bytes_per_handle",
                    (f.rss_file_kib.saturating_sub(empty.rss_file_kib) as f64 * 1024.0) / n as f64,
                )
                .note("bytes, not µs".into()),
            );
        }
        rep.rows.push(
            Row::new(
                &format!("filterd start→serving, {n} persistent handles"),
                1,
                0.0,
                f.start_to_serving_ms * 1e3,
                0.0,
            )
            .beside(
                "raw open_by_handle_at+close of all",
                f.raw_open_by_handle_ms * 1e3,
            ),
        );
        rep.restart.push(f.clone());
        // 1M handles through etcd would take most of an hour here.
        let etcd = if n <= 100_000 {
            etcd::start(dir, 1)?
        } else {
            None
        };
        if let Some(e) = etcd {
            // The target size starts `reps` times on one prepared table
            // (its ratio is the median); the row shows the first start.
            let starts = if n == target_size { reps.max(1) } else { 1 };
            let bins = vec![filterd; starts];
            let (figures, page_ms) = restart::measure_etcd_each(&bins, dir, n, &e.hosts())?;
            let ratios: Vec<f64> = figures
                .iter()
                .map(|g| g.start_to_serving_ms / (page_ms + g.raw_open_by_handle_ms))
                .collect();
            let fe = figures
                .into_iter()
                .next()
                .context("an etcd restart figure")?;
            let raw = page_ms + fe.raw_open_by_handle_ms;
            rep.rows.push(
                Row::new(
                    &format!("filterd start→serving, {n} persistent handles, etcd store 1 node"),
                    1,
                    0.0,
                    fe.start_to_serving_ms * 1e3,
                    0.0,
                )
                .beside("raw page through etcd + open_by_handle_at", raw * 1e3)
                .with("rss_per_handle_bytes", per_handle(fe.rss_kib)),
            );
            if n == target_size {
                rep.target_median(
                        &format!("restart with {n} handles from etcd ≤ 2× raw page-through + open_by_handle_at"),
                        &ratios,
                        2.0,
                        true,
                    );
            }
        }
        if n == 100_000 {
            rep.target(
                "restart with 100k handles ≤ 1000 ms",
                f.start_to_serving_ms / 1000.0,
                1.0,
                true,
            );
        }
    }
    Ok(())
}

/// The restart from a one-member etcd alone, `reps` times: each run's row
/// and the median ratio to the raw page-through + `open_by_handle_at`.
fn etcd_restart_section(
    rep: &mut Report,
    filterd: &std::path::Path,
    alt: Option<&std::path::Path>,
    dir: &std::path::Path,
    quick: bool,
    reps: usize,
) -> anyhow::Result<()> {
    let n = if quick { 10_000 } else { 100_000 };
    let Some(e) = etcd::start(dir, 1)? else {
        eprintln!("rkbench: skipped the etcd restart: no etcd binary (Debian etcd-server)");
        return Ok(());
    };
    let mut ratios = Vec::with_capacity(reps);
    let mut alt_ratios = Vec::with_capacity(reps);
    for i in 0..reps {
        eprintln!(
            "rkbench: restart with {n} handles from etcd ({}/{reps})…",
            i + 1
        );
        // The alternative goes first in every other repetition.
        let mut order = vec![(filterd, false)];
        if let Some(alt) = alt {
            order.push((alt, true));
            if i % 2 == 1 {
                order.reverse();
            }
        }
        let bins: Vec<&std::path::Path> = order.iter().map(|(b, _)| *b).collect();
        let (figures, page_ms) = restart::measure_etcd_each(&bins, dir, n, &e.hosts())?;
        for ((_, is_alt), fe) in order.iter().zip(figures) {
            let raw = page_ms + fe.raw_open_by_handle_ms;
            let which = if *is_alt { " (alt)" } else { "" };
            rep.rows.push(
                Row::new(
                    &format!(
                        "filterd start→serving, {n} persistent handles, etcd store 1 node{which}"
                    ),
                    1,
                    0.0,
                    fe.start_to_serving_ms * 1e3,
                    0.0,
                )
                .beside("raw page through etcd + open_by_handle_at", raw * 1e3)
                .with("raw_page_ms", page_ms)
                .with("filterd_cpu_ms", fe.cpu_ms),
            );
            eprintln!(
                "rkbench: {n} handles from etcd{which}: {:.0} ms to serving, filterd CPU {:.0} ms, raw page-through {page_ms:.0} ms + open_by_handle_at {:.0} ms",
                fe.start_to_serving_ms, fe.cpu_ms, fe.raw_open_by_handle_ms
            );
            if *is_alt {
                alt_ratios.push(fe.start_to_serving_ms / raw);
            } else {
                ratios.push(fe.start_to_serving_ms / raw);
            }
        }
    }
    rep.target_median(
        &format!("restart with {n} handles from etcd ≤ 2× raw page-through + open_by_handle_at"),
        &ratios,
        2.0,
        true,
    );
    if !alt_ratios.is_empty() {
        rep.target_median(
            &format!("(alt) restart with {n} handles from etcd ≤ 2× raw page-through + open_by_handle_at"),
            &alt_ratios,
            2.0,
            true,
        );
    }
    Ok(())
}

/// smbl/1 rows: CREATE+CLOSE per kind and connection count, and failover.
/// Persistent open+close at 64 connections with the table in a one- and a
/// three-member etcd, each beside a raw loop of 64-put etcd Txns on the
/// same cluster in the same run. Skipped
/// (with a note) without an etcd binary.
fn etcd_section(
    rep: &mut Report,
    filterd: &std::path::Path,
    dir: &std::path::Path,
    dur: Duration,
) -> anyhow::Result<()> {
    for (n, nodes) in [(1usize, "1 node"), (3, "3 nodes")] {
        let Some(e) = etcd::start(dir, n)? else {
            eprintln!("rkbench: skipped the etcd rows: no etcd binary (Debian etcd-server)");
            return Ok(());
        };
        let port = e.ports.first().copied().context("an etcd member")?;
        let raw = etcd::raw_txn_puts(port, 64, dur)?;
        rep.rows.push(Row::new(
            &format!("raw etcd Txn, 64 puts, {nodes} (puts/s)"),
            1,
            raw.ops_per_s,
            raw.mean_us,
            raw.p99_us,
        ));
        let extra = [
            "--store".to_owned(),
            format!(
                "etcd://{}/rkbench/{}",
                e.hosts(),
                uuid::Uuid::new_v4().simple()
            ),
        ];
        let m = mediated::open_close_with(
            filterd,
            dir,
            libfilter::model::Durability::Persistent { timeout_ms: 60_000 },
            64,
            dur,
            &extra,
        )?;
        rep.rows.push(
            mediated_row(
                &format!(
                    "mediated open+close, persistent, etcd store {nodes} (requests/s, µs/pair)"
                ),
                64,
                &m,
            )
            .beside_rate("raw etcd 64 puts/Txn", raw.ops_per_s),
        );
        rep.target(
            &format!(
                "persistent requests/s at 64 conns, etcd store {nodes} ≥ 0.7× raw etcd puts/s (64/Txn)"
            ),
            m.requests_per_s / raw.ops_per_s,
            0.7,
            false,
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn smb_section(
    rep: &mut Report,
    round: &mut targets::Round,
    filterd: &std::path::Path,
    smbshim: &std::path::Path,
    dir: &std::path::Path,
    dur: Duration,
    tcp: report::Figure,
    quick: bool,
) -> anyhow::Result<()> {
    for kind in smb::Kind::ALL {
        for conns in [1usize, 32] {
            let m = smb::create_close(filterd, smbshim, dir, kind, conns, dur)?;
            match (kind, conns) {
                (smb::Kind::DurableLeased, 1) => round.smb_durable_1_us = Some(m.mean_us),
                (smb::Kind::Persistent, 1) => round.smb_persistent_1_us = Some(m.mean_us),
                (smb::Kind::Persistent, 32) => round.smb_persistent_32_pairs = Some(m.pairs_per_s),
                _ => {}
            }
            let label = format!("smbl/1 CREATE+CLOSE, {} (pairs/s, µs/pair)", kind.label());
            let mut row = Row::new(&label, conns, m.pairs_per_s, m.mean_us, m.p99_us)
                .with("requests_per_s", 2.0 * m.pairs_per_s)
                .with("creates", m.creates as f64)
                .with("durable_granted", m.durable_granted as f64)
                .with("ops_per_commit", m.ops_per_commit)
                .beside("2 × raw TCP line round trip", 2.0 * tcp.mean_us);
            let mut notes = Vec::new();
            if m.durable_granted < m.creates {
                notes.push(format!(
                    "durable granted {} of {}",
                    m.durable_granted, m.creates
                ));
            }
            if kind == smb::Kind::Persistent {
                // Beside the mediated rows' figure: how full filterd's
                // group commits were through smbshim.
                notes.push(format!("{:.1} ops/commit", m.ops_per_commit));
            }
            if !notes.is_empty() {
                row = row.note(notes.join("; "));
            }
            rep.rows.push(row);
        }
    }
    // Durable writes: every WRITE on a persistent handle is fdatasync'd
    // before its reply; beside raw pwrite+fdatasync at as many threads,
    // measured just before and just after it (a flush's cost swings with
    // whatever else the disk is doing: the baseline is their mean).
    for conns in [1usize, 32] {
        let before = raw::pwrite_fdatasync(dir, conns, dur)?;
        let w = smb::persistent_writes(filterd, smbshim, dir, conns, dur)?;
        let after = raw::pwrite_fdatasync(dir, conns, dur)?;
        let mean = |f: fn(&report::Figure) -> f64| (f(&before) + f(&after)) / 2.0;
        let raw_rate = mean(|f| f.ops_per_s);
        rep.rows.push(
            Row::new(
                "raw pwrite+fdatasync, 4 KiB, a file per thread (writes/s; mean of before and after)",
                conns,
                raw_rate,
                mean(|f| f.mean_us),
                mean(|f| f.p99_us),
            )
            .note(format!(
                "{:.0} before, {:.0} after",
                before.ops_per_s, after.ops_per_s
            ))
            .with("before_per_s", before.ops_per_s)
            .with("after_per_s", after.ops_per_s),
        );
        rep.rows.push(
            Row::new(
                "smbl/1 WRITE 4 KiB on a persistent handle, synced before the reply (writes/s)",
                conns,
                w.ops_per_s,
                w.mean_us,
                w.p99_us,
            )
            .note("a file per connection, no op id".into())
            .beside_rate("raw pwrite+fdatasync, same threads", raw_rate),
        );
    }
    let repeats = if quick { 3 } else { 7 };
    let f = smb::failover(filterd, smbshim, dir, repeats)?;
    let median = f.median_ms();
    rep.rows.push(
        Row::new(
            "smbshim failover: listening → RECONNECT done (median; p99 col = max)",
            1,
            0.0,
            median * 1e3,
            f.max_ms() * 1e3,
        )
        .note(format!(
            "{} kills, {} RECONNECT attempts",
            f.ms.len(),
            f.attempts
        ))
        .with("median_ms", median)
        .with("max_ms", f.max_ms())
        .with("repeats", f.ms.len() as f64)
        .with("reconnect_attempts", f.attempts as f64)
        .beside("target 50 ms", 50_000.0),
    );
    rep.target(
        "smbshim failover, listening → RECONNECT done ≤ 50 ms",
        median / 50.0,
        1.0,
        true,
    );
    Ok(())
}

/// nfsl/1 rows: OPEN+CLOSE per connection count, and the slot-replay
/// lookup cost beside a fresh WRITE.
fn nfs_section(
    rep: &mut Report,
    round: &mut targets::Round,
    filterd: &std::path::Path,
    nfsshim: &std::path::Path,
    dir: &std::path::Path,
    dur: Duration,
    tcp: report::Figure,
) -> anyhow::Result<()> {
    for conns in [1usize, 32] {
        let m = nfs::open_close(filterd, nfsshim, dir, conns, dur)?;
        if conns == 1 {
            round.nfs_1_us = Some(m.mean_us);
        } else {
            round.nfs_32_pairs = Some(m.pairs_per_s);
        }
        rep.rows.push(
            Row::new(
                "nfsl/1 OPEN+CLOSE, create unchecked (pairs/s, µs/pair)",
                conns,
                m.pairs_per_s,
                m.mean_us,
                m.p99_us,
            )
            .with("requests_per_s", 2.0 * m.pairs_per_s)
            .with("pairs", m.pairs as f64)
            .with("ops_per_commit", m.ops_per_commit)
            .note(format!("{:.1} ops/commit", m.ops_per_commit))
            .beside("2 × raw TCP line round trip", 2.0 * tcp.mean_us),
        );
    }
    let r = nfs::slot_replay(filterd, nfsshim, dir, dur)?;
    rep.rows.push(
        Row::new(
            "nfsl/1 fresh WRITE (5 bytes; reply recorded in filterd)",
            1,
            r.fresh_write.ops_per_s,
            r.fresh_write.mean_us,
            r.fresh_write.p99_us,
        )
        .beside("raw TCP line round trip", tcp.mean_us),
    );
    rep.rows.push(
        Row::new(
            "nfsl/1 slot replay: re-sent WRITE answered from the slot cache",
            1,
            r.replay.ops_per_s,
            r.replay.mean_us,
            r.replay.p99_us,
        )
        .note(format!(
            "fresh WRITE {:.0} µs = {:.1}× the replay",
            r.fresh_write.mean_us,
            r.fresh_write.mean_us / r.replay.mean_us.max(1e-9)
        ))
        .with("fresh_write_mean_us", r.fresh_write.mean_us)
        // The lookup cost: what the replay adds to a bare round trip. On a
        // busy 2-core machine one run had the replay beat the echo
        // baseline; a negative value reads "below the baseline's noise".
        .with("replay_minus_tcp_rtt_us", r.replay.mean_us - tcp.mean_us)
        .beside("raw TCP line round trip", tcp.mean_us),
    );
    Ok(())
}

/// `--frontends-only`: the frontend CREATE/OPEN+CLOSE rows and the
/// baselines issue 16 judges them by, measured in this run: 2 × (TCP line
/// round trip + SEQPACKET round trip) for one connection, filterd-direct
/// persistent open+close at 32 connections for 32, and the smbl/1
/// persistent pair for nfsl/1. The ratios are printed as notes, not as
/// targets (the target rows are `make bench`'s).
fn frontends_section(
    rep: &mut Report,
    filterd: &std::path::Path,
    smbshim: &std::path::Path,
    nfsshim: &std::path::Path,
    dir: &std::path::Path,
    dur: Duration,
) -> anyhow::Result<()> {
    let rtt = raw::socket_rtt(dir, dur)?;
    let tcp = smb::tcp_line_rtt(dur)?;
    let two_trips = 2.0 * (tcp.mean_us + rtt.mean_us);
    for (name, f) in [
        ("raw SEQPACKET round trip", &rtt),
        ("raw TCP line round trip (loopback, echo thread)", &tcp),
    ] {
        rep.rows
            .push(Row::new(name, 1, f.ops_per_s, f.mean_us, f.p99_us));
    }
    let persistent = libfilter::model::Durability::Persistent { timeout_ms: 60_000 };
    let direct = mediated::open_close(filterd, dir, persistent, 32, dur)?;
    let direct_pairs = direct.requests_per_s / 2.0;
    rep.rows.push(
        Row::new(
            "mediated open+close, persistent (pairs/s, µs/pair)",
            32,
            direct_pairs,
            direct.mean_us,
            direct.p99_us,
        )
        .note(format!("{:.1} ops/commit", direct.ops_per_commit)),
    );
    let mut smb_persistent = [None; 2];
    for kind in smb::Kind::ALL {
        for (i, conns) in [1usize, 32].into_iter().enumerate() {
            let m = smb::create_close(filterd, smbshim, dir, kind, conns, dur)?;
            let label = format!("smbl/1 CREATE+CLOSE, {} (pairs/s, µs/pair)", kind.label());
            let row = Row::new(&label, conns, m.pairs_per_s, m.mean_us, m.p99_us);
            let mut note = if conns == 1 {
                format!("{:.2}× 2 × (TCP + SEQPACKET rtt)", m.mean_us / two_trips)
            } else {
                format!(
                    "{:.2}× filterd-direct persistent",
                    m.pairs_per_s / direct_pairs
                )
            };
            if kind == smb::Kind::Persistent {
                smb_persistent[i] = Some((m.mean_us, m.pairs_per_s));
                note.push_str(&format!("; {:.1} ops/commit", m.ops_per_commit));
            }
            let row = row.note(note).with("ops_per_commit", m.ops_per_commit);
            rep.rows.push(row);
        }
    }
    for (i, conns) in [1usize, 32].into_iter().enumerate() {
        let m = nfs::open_close(filterd, nfsshim, dir, conns, dur)?;
        let mut row = Row::new(
            "nfsl/1 OPEN+CLOSE, create unchecked (pairs/s, µs/pair)",
            conns,
            m.pairs_per_s,
            m.mean_us,
            m.p99_us,
        );
        if let Some(Some((us, rate))) = smb_persistent.get(i) {
            row = row.note(if conns == 1 {
                format!("{:.2}× the smbl/1 persistent pair", m.mean_us / us)
            } else {
                format!("{:.2}× the smbl/1 persistent rate", rate / m.pairs_per_s)
            });
        }
        rep.rows.push(row);
    }
    Ok(())
}

/// A row of mediated open+close pairs, with filterd's operations per commit.
fn mediated_row(name: &str, conns: usize, m: &mediated::Mediated) -> Row {
    Row::new(name, conns, m.requests_per_s, m.mean_us, m.p99_us)
        .note(format!("{:.1} ops/commit", m.ops_per_commit))
}

/// Handles the key-locality row's daemon holds before its clock starts.
const HELD: usize = 100_000;
/// The same with `--quick`.
const HELD_QUICK: usize = 5_000;

/// Where new keys land in a large table: the raw 64-put LMDB commit with
/// time-ordered keys beside `random` (the same loop with random keys,
/// measured by the caller), and persistent open+close at 64 connections
/// on a daemon holding [`HELD`] persistent handles, beside `random`.
fn keys_section(
    rep: &mut Report,
    filterd: &Path,
    dir: &Path,
    dur: Duration,
    quick: bool,
    random: &report::Figure,
) -> anyhow::Result<()> {
    let ordered = raw::lmdb_commits(dir, 64, raw::KeyOrder::TimeOrdered, dur)?;
    rep.rows.push(
        Row::new(
            "raw LMDB commit, 64 puts, time-ordered keys (puts/s)",
            1,
            ordered.ops_per_s,
            ordered.mean_us,
            ordered.p99_us,
        )
        .beside_rate("raw LMDB 64 puts/commit", random.ops_per_s),
    );
    let held = if quick { HELD_QUICK } else { HELD };
    eprintln!("rkbench: persistent open+close beside {held} held handles…");
    let m = mediated::open_close_held(filterd, dir, 64, held, dur)?;
    rep.rows.push(
        mediated_row(
            &format!("mediated open+close, persistent, {held} handles held (requests/s, µs/pair)"),
            64,
            &m,
        )
        .with("pairs_per_s", m.requests_per_s / 2.0)
        .with("store_ops_per_commit", m.ops_per_commit)
        .with("raw_time_ordered_puts_per_s", ordered.ops_per_s)
        .beside_rate("raw LMDB 64 puts/commit", random.ops_per_s),
    );
    Ok(())
}

/// `--nfs32-only`: the nfsl/1 32-connection target row alone, its
/// baseline (smbl/1 persistent at 32 connections) measured right before
/// it in every repetition.
fn nfs32_section(
    rep: &mut Report,
    (filterd, smbshim, nfsshim): (&std::path::Path, &std::path::Path, &std::path::Path),
    dir: &std::path::Path,
    dur: Duration,
    reps: usize,
) -> anyhow::Result<()> {
    let mut ratios = Vec::with_capacity(reps);
    for i in 0..reps {
        let s = smb::create_close(filterd, smbshim, dir, smb::Kind::Persistent, 32, dur)?;
        let n = nfs::open_close(filterd, nfsshim, dir, 32, dur)?;
        let ratio = s.pairs_per_s / n.pairs_per_s;
        eprintln!(
            "rkbench: nfsl/1 at 32 ({}/{reps}): smbl/1 {:.0} pairs/s ({:.1} ops/commit), \
             nfsl/1 {:.0} pairs/s ({:.1} ops/commit): {ratio:.2}×",
            i + 1,
            s.pairs_per_s,
            s.ops_per_commit,
            n.pairs_per_s,
            n.ops_per_commit,
        );
        for (label, pairs_per_s, mean_us, p99_us, opc) in [
            (
                "smbl/1 CREATE+CLOSE, persistent (pairs/s, µs/pair)",
                s.pairs_per_s,
                s.mean_us,
                s.p99_us,
                s.ops_per_commit,
            ),
            (
                "nfsl/1 OPEN+CLOSE, create unchecked (pairs/s, µs/pair)",
                n.pairs_per_s,
                n.mean_us,
                n.p99_us,
                n.ops_per_commit,
            ),
        ] {
            rep.rows.push(
                Row::new(label, 32, pairs_per_s, mean_us, p99_us)
                    .note(format!("{opc:.1} ops/commit"))
                    .with("ops_per_commit", opc),
            );
        }
        ratios.push(ratio);
    }
    rep.target_median(targets::NFS_32_TARGET, &ratios, 1.2, true);
    Ok(())
}

/// The scratch directory (export roots, state dirs, LMDB baselines), removed
/// when dropped. A `--dir` must be new or empty, since all of it goes.
struct Scratch(PathBuf);

impl Scratch {
    fn create(dir: Option<PathBuf>) -> anyhow::Result<Scratch> {
        let dir = match dir {
            Some(d) => {
                if d.exists()
                    && std::fs::read_dir(&d)
                        .with_context(|| format!("reading {}", d.display()))?
                        .next()
                        .is_some()
                {
                    bail!(
                        "--dir {} is not empty; rkbench removes its scratch dir afterwards, \
                         so give a new or empty one",
                        d.display()
                    );
                }
                d
            }
            None => std::env::temp_dir().join(format!("rkbench-{}", std::process::id())),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
