//! The report: one [`Row`] per measurement (beside the baseline it is judged
//! against), the issue's [`Target`] lines, a printed table and a JSON file.
//!
//! A section (a module of this crate) measures and returns figures; `main`
//! turns them into rows and targets. A new section adds rows, optionally
//! `extra` figures on them, and its own targets; the JSON keeps every
//! figure under stable names (`name`, `conns`, `ops_per_s`, `mean_us`,
//! `p99_us`, `extra`, and `targets`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

/// Latency samples → mean and p99, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Figure {
    /// Operations per second over the whole run.
    pub ops_per_s: f64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

impl Figure {
    /// From per-operation samples (ns) and the run's wall time.
    pub fn from_samples(mut ns: Vec<u64>, ops: u64, wall: std::time::Duration) -> Figure {
        ns.sort_unstable();
        let mean = if ns.is_empty() {
            0.0
        } else {
            ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1e3
        };
        let p99 = ns
            .get((ns.len().saturating_sub(1)) * 99 / 100)
            .copied()
            .unwrap_or(0) as f64
            / 1e3;
        Figure {
            ops_per_s: ops as f64 / wall.as_secs_f64().max(1e-9),
            mean_us: mean,
            p99_us: p99,
        }
    }
}

/// One measurement and what it is judged against.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Concurrent client connections.
    pub conns: usize,
    /// Throughput.
    pub ops_per_s: f64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// p99 latency, µs.
    pub p99_us: f64,
    /// The baseline's name.
    pub baseline: Option<String>,
    /// The baseline's value (µs, or a rate when `baseline_is_rate`).
    pub baseline_value: Option<f64>,
    /// Whether the baseline is a rate (ratio = ops/s ÷ baseline) or a
    /// latency (ratio = mean ÷ baseline).
    pub baseline_is_rate: bool,
    /// A run-dependent remark shown after the name in the table (the name
    /// itself stays stable for whoever reads the JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Further figures of this measurement, by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

impl Row {
    /// A row without a baseline.
    pub fn new(name: &str, conns: usize, ops_per_s: f64, mean_us: f64, p99_us: f64) -> Row {
        Row {
            name: name.into(),
            conns,
            ops_per_s,
            mean_us,
            p99_us,
            baseline: None,
            baseline_value: None,
            baseline_is_rate: false,
            note: None,
            extra: BTreeMap::new(),
        }
    }
    /// With a remark shown after the name in the table.
    pub fn note(mut self, note: String) -> Row {
        self.note = Some(note);
        self
    }
    /// With a further named figure (JSON only).
    pub fn with(mut self, name: &str, value: f64) -> Row {
        self.extra.insert(name.into(), value);
        self
    }
    /// Beside a latency baseline (µs).
    pub fn beside(mut self, name: &str, us: f64) -> Row {
        self.baseline = Some(name.into());
        self.baseline_value = Some(us);
        self
    }
    /// Beside a rate baseline (per second).
    pub fn beside_rate(mut self, name: &str, per_s: f64) -> Row {
        self.baseline = Some(name.into());
        self.baseline_value = Some(per_s);
        self.baseline_is_rate = true;
        self
    }
    fn ratio(&self) -> Option<f64> {
        let b = self.baseline_value?;
        if b <= 0.0 {
            return None;
        }
        Some(if self.baseline_is_rate {
            self.ops_per_s / b
        } else {
            self.mean_us / b
        })
    }
}

/// A target from an issue: a ratio and its bound.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What it says.
    pub name: String,
    /// The measured ratio.
    pub ratio: f64,
    /// The bound.
    pub bound: f64,
    /// Whether the ratio must stay at or below the bound (else at or above).
    pub at_most: bool,
    /// Whether it was met.
    pub met: bool,
    /// The ratio of each repetition inside the run, when it was repeated
    /// (`ratio` is then their median).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<f64>,
}

/// Everything measured in one run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Measurements.
    pub rows: Vec<Row>,
    /// Targets.
    pub targets: Vec<Target>,
    /// Restart figures.
    pub restart: Vec<crate::restart::RestartFigure>,
}

fn num(x: f64) -> String {
    if x == 0.0 {
        "-".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

impl Report {
    /// Adds a target line.
    pub fn target(&mut self, name: &str, ratio: f64, bound: f64, at_most: bool) {
        let met = if at_most {
            ratio <= bound
        } else {
            ratio >= bound
        };
        self.targets.push(Target {
            name: name.into(),
            ratio,
            bound,
            at_most,
            met,
            runs: Vec::new(),
        });
    }

    /// Adds a target line whose ratio is the median of `runs` (one ratio
    /// per repetition inside the run).
    pub fn target_median(&mut self, name: &str, runs: &[f64], bound: f64, at_most: bool) {
        let Some(m) = crate::targets::median(runs) else {
            return;
        };
        self.target(name, m, bound, at_most);
        if let Some(t) = self.targets.last_mut() {
            t.runs = runs.to_vec();
        }
    }

    /// The printed table.
    pub fn table(&self) -> String {
        let header = [
            "measurement",
            "conns",
            "ops/s",
            "mean µs",
            "p99 µs",
            "baseline",
            "baseline value",
            "ratio",
        ];
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    match &r.note {
                        Some(n) => format!("{}; {n}", r.name),
                        None => r.name.clone(),
                    },
                    r.conns.to_string(),
                    num(r.ops_per_s),
                    num(r.mean_us),
                    num(r.p99_us),
                    r.baseline.clone().unwrap_or_default(),
                    r.baseline_value.map(num).unwrap_or_default(),
                    r.ratio().map(|x| format!("{x:.2}×")).unwrap_or_default(),
                ]
            })
            .collect();
        let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(x) = w.get_mut(i) {
                    *x = (*x).max(c.chars().count());
                }
            }
        }
        let fmt = |cells: Vec<&str>| -> String {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let width = w.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(c.chars().count());
                if (1..=4).contains(&i) || i == 6 || i == 7 {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                }
                s.push_str("  ");
            }
            s.trim_end().to_owned() + "\n"
        };
        let mut out = fmt(header.to_vec());
        for r in &rows {
            out.push_str(&fmt(r.iter().map(String::as_str).collect()));
        }
        out.push('\n');
        for t in &self.targets {
            let runs = if t.runs.len() > 1 {
                let each: Vec<String> = t.runs.iter().map(|r| format!("{r:.2}")).collect();
                format!("  median of {}", each.join(", "))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "target: {:<84} {:>6.2} ({} {:.2})  {}{runs}\n",
                t.name,
                t.ratio,
                if t.at_most { "≤" } else { "≥" },
                t.bound,
                if t.met { "PASS" } else { "MISS" }
            ));
        }
        out
    }

    /// Writes the JSON report, creating parent directories.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }
}
