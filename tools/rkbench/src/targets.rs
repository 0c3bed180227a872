//! Issue 16's target rows: each ratio measured in several rounds of the
//! same run (three, one with `--quick`) and reported as the median.
//!
//! A [`Round`] holds one repetition of every figure the targets need, each
//! beside the baseline it is judged against. The first round is the run's
//! own sections (filled in as they measure); further rounds measure just
//! these figures again, baselines included, so every ratio compares figures
//! taken minutes apart at most. A figure whose section was skipped (no
//! smbshim, no nfsshim) leaves its target out.

use std::path::Path;
use std::time::Duration;

use libfilter::model::Durability;

use crate::report::Report;

/// One repetition of the figures the targets are computed from.
#[derive(Debug, Default, Clone, Copy)]
pub struct Round {
    /// Raw SEQPACKET round trip, µs.
    pub seqpacket_rtt_us: Option<f64>,
    /// Raw `openat+close`, µs.
    pub openat_us: Option<f64>,
    /// Raw TCP line round trip on loopback, µs.
    pub tcp_rtt_us: Option<f64>,
    /// Mediated non-durable open+close at 1 connection, µs per pair.
    pub mediated_none_1_us: Option<f64>,
    /// filterd-direct persistent open+close at 32 connections, pairs/s.
    pub mediated_persistent_32_pairs: Option<f64>,
    /// smbl/1 CREATE+CLOSE durable + RWH lease at 1 connection, µs per pair.
    pub smb_durable_1_us: Option<f64>,
    /// smbl/1 CREATE+CLOSE persistent at 1 connection, µs per pair.
    pub smb_persistent_1_us: Option<f64>,
    /// smbl/1 CREATE+CLOSE persistent at 32 connections, pairs/s.
    pub smb_persistent_32_pairs: Option<f64>,
    /// nfsl/1 OPEN+CLOSE at 1 connection, µs per pair.
    pub nfs_1_us: Option<f64>,
    /// nfsl/1 OPEN+CLOSE at 32 connections, pairs/s.
    pub nfs_32_pairs: Option<f64>,
}

/// The nfsl/1 32-connection target's name (also `rkbench --nfs32-only`'s
/// line).
pub const NFS_32_TARGET: &str = "nfsl/1 OPEN+CLOSE time/pair, 32 conns ≤ 1.2× smbl/1 persistent's";

/// A target computed from a round: its name, bound, direction, and the
/// ratio (None when a figure is missing).
type RatioOf = (&'static str, f64, bool, fn(&Round) -> Option<f64>);

/// The rows that come from rounds (restart and memory come from
/// the restart section's own repetitions).
const ROUND_TARGETS: &[RatioOf] = &[
    (
        "mediated non-durable open+close, 1 conn ≤ 1.3× (2 × SEQPACKET rtt + raw openat+close)",
        1.3,
        true,
        |r| Some(r.mediated_none_1_us? / (2.0 * r.seqpacket_rtt_us? + r.openat_us?)),
    ),
    (
        "smbl/1 CREATE+CLOSE durable+RWH, 1 conn ≤ 1.3× 2 × (TCP rtt + SEQPACKET rtt)",
        1.3,
        true,
        |r| Some(r.smb_durable_1_us? / (2.0 * (r.tcp_rtt_us? + r.seqpacket_rtt_us?))),
    ),
    (
        "smbl/1 persistent pairs/s at 32 conns ≥ 0.8× filterd-direct persistent at 32",
        0.8,
        false,
        |r| Some(r.smb_persistent_32_pairs? / r.mediated_persistent_32_pairs?),
    ),
    (
        "nfsl/1 OPEN+CLOSE µs/pair, 1 conn ≤ 1.2× smbl/1 persistent's",
        1.2,
        true,
        |r| Some(r.nfs_1_us? / r.smb_persistent_1_us?),
    ),
    (
        NFS_32_TARGET,
        1.2,
        true,
        // Time per pair at a fixed concurrency is the inverse rate.
        |r| Some(r.smb_persistent_32_pairs? / r.nfs_32_pairs?),
    ),
];

/// The median of `xs` (the mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => v.get(n / 2).copied(),
        _ => Some((v.get(n / 2 - 1)? + v.get(n / 2)?) / 2.0),
    }
}

/// Adds one target line per round target every round has figures for: the
/// median ratio, with each round's ratio beside it.
pub fn push_round_targets(rep: &mut Report, rounds: &[Round]) {
    for (name, bound, at_most, ratio) in ROUND_TARGETS {
        let ratios: Option<Vec<f64>> = rounds.iter().map(ratio).collect();
        match ratios {
            Some(rs) if !rs.is_empty() => rep.target_median(name, &rs, *bound, *at_most),
            _ => eprintln!("rkbench: no target line for {name:?}: a section was skipped"),
        }
    }
}

/// The binaries a further round drives.
pub struct Programs<'a> {
    /// filterd.
    pub filterd: &'a Path,
    /// smbshim, when built.
    pub smbshim: Option<&'a Path>,
    /// nfsshim, when built.
    pub nfsshim: Option<&'a Path>,
}

/// Measures one further round: every figure and baseline again.
pub fn measure_round(p: &Programs<'_>, dir: &Path, dur: Duration) -> anyhow::Result<Round> {
    let mut r = Round {
        seqpacket_rtt_us: Some(crate::raw::socket_rtt(dir, dur)?.mean_us),
        openat_us: Some(crate::raw::openat_close(dir, dur)?.mean_us),
        tcp_rtt_us: Some(crate::smb::tcp_line_rtt(dur)?.mean_us),
        ..Round::default()
    };
    let none = crate::mediated::open_close(p.filterd, dir, Durability::None, 1, dur)?;
    r.mediated_none_1_us = Some(none.mean_us);
    let persistent = Durability::Persistent { timeout_ms: 60_000 };
    let direct = crate::mediated::open_close(p.filterd, dir, persistent, 32, dur)?;
    r.mediated_persistent_32_pairs = Some(direct.requests_per_s / 2.0);
    if let Some(smbshim) = p.smbshim {
        use crate::smb::{create_close, Kind};
        let f = p.filterd;
        r.smb_durable_1_us =
            Some(create_close(f, smbshim, dir, Kind::DurableLeased, 1, dur)?.mean_us);
        r.smb_persistent_1_us =
            Some(create_close(f, smbshim, dir, Kind::Persistent, 1, dur)?.mean_us);
        r.smb_persistent_32_pairs =
            Some(create_close(f, smbshim, dir, Kind::Persistent, 32, dur)?.pairs_per_s);
    }
    if let Some(nfsshim) = p.nfsshim {
        r.nfs_1_us = Some(crate::nfs::open_close(p.filterd, nfsshim, dir, 1, dur)?.mean_us);
        r.nfs_32_pairs =
            Some(crate::nfs::open_close(p.filterd, nfsshim, dir, 32, dur)?.pairs_per_s);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn a_missing_figure_leaves_its_target_out() {
        let full = Round {
            seqpacket_rtt_us: Some(10.0),
            openat_us: Some(5.0),
            tcp_rtt_us: Some(20.0),
            mediated_none_1_us: Some(30.0),
            mediated_persistent_32_pairs: Some(1000.0),
            ..Round::default()
        };
        let mut rep = Report::default();
        push_round_targets(&mut rep, &[full, full, full]);
        // Only the mediated target: the smb and nfs figures are missing.
        assert_eq!(rep.targets.len(), 1);
        let t = &rep.targets[0];
        assert!((t.ratio - 30.0 / 25.0).abs() < 1e-9);
        assert_eq!(t.runs.len(), 3);
        assert!(t.met);
    }
}
