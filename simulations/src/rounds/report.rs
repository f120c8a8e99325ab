//! A scenario's results: the runs, the extra analyses, a text summary, CSV files and SVG charts
//! (written by hand: bars and lines are all the figures need).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use cohort_protocol::attribution::{GtgConfig, gtg_shapley, shapley_exact};

use super::config::{RunConfig, Scenario};
use super::driver::{RunError, RunReport, run};
use super::linalg::Mat;
use super::surrogate::{Coalitions, Task};

/// One small attribution case: GTG-Shapley at a permutation budget against exact Shapley.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapleyRow {
    /// Players (updates).
    pub players: usize,
    /// Seed of the case.
    pub seed: u64,
    /// Permutation budget.
    pub permutations: usize,
    /// Distinct coalitions GTG evaluated.
    pub evaluations: usize,
    /// `Σ|φ̂ - φ| / Σ|φ|`.
    pub relative_l1: f64,
    /// Largest `|closed form - protocol exact|`, nats (checks the closed form).
    pub closed_form_gap: f64,
}

/// Everything a scenario produced.
#[derive(Debug)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub name: String,
    /// What it measures.
    pub description: String,
    /// One report per run.
    pub runs: Vec<RunReport>,
    /// Small attribution cases, if asked for.
    pub shapley: Vec<ShapleyRow>,
    /// Columns of the runs table to chart.
    pub charts: Vec<String>,
    /// Whether [`ScenarioReport::write`] writes `shards.csv`.
    pub write_shards: bool,
}

/// Runs every run of `scenario` and its analyses.
pub fn run_scenario(scenario: &Scenario) -> Result<ScenarioReport, RunError> {
    let mut runs = Vec::new();
    for c in &scenario.runs {
        runs.push(run(c.clone())?);
    }
    let mut shapley = Vec::new();
    let a = &scenario.analyses;
    let base = scenario.runs.first().cloned().unwrap_or_default();
    for &n in &a.shapley_players {
        for seed in 0..a.shapley_seeds.max(1) {
            shapley.extend(shapley_case(&base, n, seed, &a.gtg_permutations));
        }
    }
    Ok(ScenarioReport {
        name: scenario.name.clone(),
        description: scenario.description.clone(),
        runs,
        shapley,
        charts: a.charts.clone(),
        write_shards: a.shards_csv,
    })
}

/// `n` honest updates of one round, each on one shard, equally weighted; GTG at each budget
/// against the protocol's exact Shapley.
fn shapley_case(base: &RunConfig, n: usize, seed: u64, budgets: &[usize]) -> Vec<ShapleyRow> {
    let config = RunConfig {
        volunteers: n,
        shards: n,
        seed: base.seed.wrapping_add(1_000 * seed + n as u64),
        ..base.clone()
    };
    let task = Task::new(&config, 2.0);
    let start = task.initial();
    let m0 = task.dense(&start);
    let u: Vec<Mat> = (0..n)
        .map(|i| {
            let t = task.train(&start, &[i], i as u64 + 17 * seed, false);
            task.dense(&t.adapter).sub(&m0).scaled(1.0 / n as f64)
        })
        .collect();
    let closed = task.shapley(&m0, &u);
    let mut game = Coalitions::new(&task, m0.clone(), &u);
    let Ok(exact) = shapley_exact(n, |s| game.value(s)) else {
        return Vec::new();
    };
    let gap = closed
        .iter()
        .zip(&exact)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let norm: f64 = exact.iter().map(|x| x.abs()).sum();
    budgets
        .iter()
        .filter_map(|&p| {
            let mut game = Coalitions::new(&task, m0.clone(), &u);
            let config = GtgConfig {
                max_permutations: p,
                convergence_tol: 0.0,
                ..GtgConfig::default()
            };
            let g = gtg_shapley(n, |s| game.value(s), &config, seed).ok()?;
            let l1: f64 = g
                .values
                .iter()
                .zip(&exact)
                .map(|(a, b)| (a - b).abs())
                .sum();
            Some(ShapleyRow {
                players: n,
                seed,
                permutations: p,
                evaluations: g.evaluations,
                relative_l1: l1 / norm.max(1e-300),
                closed_form_gap: gap,
            })
        })
        .collect()
}

/// A cell of the runs table.
#[derive(Clone, Debug, PartialEq)]
enum Cell {
    Num(f64),
    Text(String),
}

impl Cell {
    fn render(&self) -> String {
        match self {
            Cell::Num(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
            Cell::Num(x) if x.abs() >= 1e-3 || *x == 0.0 => format!("{x:.4}"),
            Cell::Num(x) => format!("{x:.3e}"),
            Cell::Text(s) => s.clone(),
        }
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// Columns that depend on this machine's speed (left out of determinism checks).
pub const TIMING_COLUMNS: &[&str] = &[
    "coordinator_cpu_ms_round",
    "driver_cpu_ms_round",
    "worker_cpu_ms_round",
    "peak_rss_mib",
    "setup_s",
    "wall_s",
    "events_per_s",
];

/// Per kind of shard: count, mean value, fraction negative, fraction flagged harmful, mean
/// credit; and the probability that a clean shard outranks a harmful one.
fn kind_stats(r: &RunReport) -> Vec<(&'static str, usize, f64, f64, f64, f64)> {
    let mut out = Vec::new();
    for kind in ["clean", "duplicate", "noisy", "harmful"] {
        let rows: Vec<_> = r.shards.iter().filter(|s| s.kind == kind).collect();
        if rows.is_empty() {
            continue;
        }
        let n = rows.len() as f64;
        out.push((
            kind,
            rows.len(),
            mean(rows.iter().map(|s| s.value)),
            rows.iter().filter(|s| s.value < 0.0).count() as f64 / n,
            rows.iter().filter(|s| s.flag == "harmful").count() as f64 / n,
            mean(rows.iter().map(|s| s.credit as f64)),
        ));
    }
    out
}

/// P(value of a random clean shard > value of a random harmful shard), over the last round.
fn clean_over_harmful(r: &RunReport) -> Option<f64> {
    let last = r.shards.iter().map(|s| s.round).max()?;
    let clean: Vec<f64> = r
        .shards
        .iter()
        .filter(|s| s.round == last && s.kind == "clean")
        .map(|s| s.value)
        .collect();
    let mut harmful: Vec<f64> = r
        .shards
        .iter()
        .filter(|s| s.round == last && s.kind == "harmful")
        .map(|s| s.value)
        .collect();
    if clean.is_empty() || harmful.is_empty() {
        return None;
    }
    harmful.sort_by(f64::total_cmp);
    let wins: usize = clean
        .iter()
        .map(|c| harmful.partition_point(|h| h < c))
        .sum();
    Some(wins as f64 / (clean.len() * harmful.len()) as f64)
}

fn run_cells(r: &RunReport) -> Vec<(&'static str, Cell)> {
    let c = &r.config;
    let closed: Vec<_> = r.rounds.iter().filter(|x| x.outcome != "open").collect();
    let n_rounds = closed.len().max(1) as f64;
    let sum = |f: &dyn Fn(&super::driver::RoundRow) -> usize| -> usize {
        closed.iter().map(|x| f(x)).sum()
    };
    let adv = sum(&|x| x.adversary_commits);
    let adv_rej = sum(&|x| x.adversary_rejected);
    let honest = sum(&|x| x.committed) - adv;
    let honest_rej = sum(&|x| x.honest_rejected);
    let per_round_ms = |f: &dyn Fn(&super::driver::RoundTiming) -> std::time::Duration| {
        mean(r.timings.iter().map(|t| f(t).as_secs_f64() * 1e3))
    };
    let faked = if c.faked_segments == 0 {
        "all".to_string()
    } else {
        c.faked_segments.to_string()
    };
    vec![
        ("label", Cell::Text(c.label.clone())),
        ("volunteers", Cell::Num(c.volunteers as f64)),
        ("shards", Cell::Num(c.shard_count() as f64)),
        ("churn", Cell::Num(c.churn)),
        ("adversaries", Cell::Num(c.adversaries)),
        (
            "adversary",
            Cell::Text(format!("{:?}", c.adversary).to_lowercase()),
        ),
        ("faked_segments", Cell::Text(faked)),
        ("defences", Cell::Text(c.defences.to_string())),
        ("audit_rate", Cell::Num(c.audit_rate)),
        ("norm_bound", Cell::Num(c.norm_bound)),
        ("multi_krum_f", Cell::Num(f64::from(c.multi_krum_f))),
        ("merge", Cell::Text(format!("{:?}", c.merge).to_lowercase())),
        (
            "attribution",
            Cell::Text(format!("{:?}", c.attribution).to_lowercase()),
        ),
        ("rounds_closed", Cell::Num(closed.len() as f64)),
        (
            "rounds_merged",
            Cell::Num(closed.iter().filter(|x| x.outcome == "merged").count() as f64),
        ),
        (
            "finished",
            Cell::Text(r.finished.clone().unwrap_or_else(|| "stalled".into())),
        ),
        (
            "mean_round_s",
            Cell::Num(mean(closed.iter().map(|x| x.closed_s - x.opened_s))),
        ),
        (
            "bytes_per_peer_round",
            Cell::Num(r.bytes_per_peer_round.round()),
        ),
        (
            "max_bytes_per_peer_round",
            Cell::Num(r.max_bytes_per_peer_round.round()),
        ),
        (
            "coordinator_bytes_round",
            Cell::Num(r.coordinator_bytes_round.round()),
        ),
        (
            "coordinator_cpu_ms_round",
            Cell::Num(per_round_ms(&|t| t.coordinator_cpu)),
        ),
        (
            "driver_cpu_ms_round",
            Cell::Num(per_round_ms(&|t| t.driver_cpu)),
        ),
        (
            "worker_cpu_ms_round",
            Cell::Num(per_round_ms(&|t| t.worker_cpu)),
        ),
        (
            "state_bytes",
            Cell::Num(closed.iter().map(|x| x.state_bytes).max().unwrap_or(0) as f64),
        ),
        ("initial_loss", Cell::Num(r.initial_loss)),
        ("final_loss", Cell::Num(r.final_loss)),
        ("optimum_loss", Cell::Num(r.optimum_loss)),
        (
            "merged_per_round",
            Cell::Num(sum(&|x| x.merged) as f64 / n_rounds),
        ),
        ("left", Cell::Num(sum(&|x| x.left) as f64)),
        (
            "lost_work",
            Cell::Num(mean(closed.iter().map(|x| x.lost_work))),
        ),
        ("adversary_commits", Cell::Num(adv as f64)),
        (
            "detection_rate",
            Cell::Num(if adv == 0 {
                0.0
            } else {
                adv_rej as f64 / adv as f64
            }),
        ),
        (
            "false_positive_rate",
            Cell::Num(if honest == 0 {
                0.0
            } else {
                honest_rej as f64 / honest as f64
            }),
        ),
        ("rejected_spot", Cell::Num(sum(&|x| x.rejected_spot) as f64)),
        ("rejected_norm", Cell::Num(sum(&|x| x.rejected_norm) as f64)),
        (
            "rejected_outlier",
            Cell::Num(sum(&|x| x.rejected_outlier) as f64),
        ),
        (
            "honest_outliers",
            Cell::Num(sum(&|x| x.honest_outliers) as f64),
        ),
        (
            "rejected_other",
            Cell::Num(sum(&|x| x.rejected_other) as f64),
        ),
        (
            "merge_error",
            Cell::Num(mean(
                closed
                    .iter()
                    .filter(|x| x.merged > 0)
                    .map(|x| x.merge_error),
            )),
        ),
        (
            "truncation_error",
            Cell::Num(mean(
                closed
                    .iter()
                    .filter(|x| x.merged > 0)
                    .map(|x| x.truncation_error),
            )),
        ),
        (
            "clean_over_harmful",
            Cell::Num(clean_over_harmful(r).unwrap_or(f64::NAN)),
        ),
        ("refusals", Cell::Num(r.refusals as f64)),
        ("events", Cell::Num(r.events as f64)),
        ("virtual_s", Cell::Num(r.end_s)),
        ("setup_s", Cell::Num(r.setup_wall.as_secs_f64())),
        ("wall_s", Cell::Num(r.run_wall.as_secs_f64())),
        (
            "peak_rss_mib",
            Cell::Num(
                r.peak_rss
                    .map_or(f64::NAN, |b| (b as f64 / 1048576.0 * 10.0).round() / 10.0),
            ),
        ),
        (
            "events_per_s",
            Cell::Num((r.events as f64 / r.run_wall.as_secs_f64().max(1e-9)).round()),
        ),
    ]
}

fn csv_line(cells: impl IntoIterator<Item = String>) -> String {
    let mut line: Vec<String> = cells
        .into_iter()
        .map(|c| {
            if c.contains(',') || c.contains('"') {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c
            }
        })
        .collect();
    line.push(String::new());
    let mut s = line.join(",");
    s.pop();
    s.push('\n');
    s
}

impl ScenarioReport {
    /// The runs table as CSV; `with_timings: false` leaves out the machine-dependent columns.
    pub fn runs_csv(&self, with_timings: bool) -> String {
        let mut out = String::new();
        for (k, r) in self.runs.iter().enumerate() {
            let cells: Vec<_> = run_cells(r)
                .into_iter()
                .filter(|(name, _)| with_timings || !TIMING_COLUMNS.contains(name))
                .collect();
            if k == 0 {
                out += &csv_line(cells.iter().map(|(n, _)| (*n).to_string()));
            }
            out += &csv_line(cells.iter().map(|(_, c)| c.render()));
        }
        out
    }

    /// Per run per round, as CSV (with the wall-clock columns when `with_timings`).
    pub fn rounds_csv(&self, with_timings: bool) -> String {
        let mut out = String::from(
            "label,round,outcome,opened_s,closed_s,enrolled,assigned,committed,merged,\
             rejected_spot,rejected_norm,rejected_outlier,rejected_other,adversary_commits,\
             adversary_rejected,honest_rejected,honest_outliers,left,lost_work,loss_before,loss_after,merge_error,\
             truncation_error,state_bytes,shapley_sum,attribution_evaluations",
        );
        if with_timings {
            out += ",coordinator_cpu_ms,driver_cpu_ms,worker_cpu_ms";
        }
        out.push('\n');
        for r in &self.runs {
            for (x, t) in r.rounds.iter().zip(&r.timings) {
                let mut cells = vec![
                    r.config.label.clone(),
                    x.round.to_string(),
                    x.outcome.clone(),
                    format!("{:.3}", x.opened_s),
                    format!("{:.3}", x.closed_s),
                    x.enrolled.to_string(),
                    x.assigned.to_string(),
                    x.committed.to_string(),
                    x.merged.to_string(),
                    x.rejected_spot.to_string(),
                    x.rejected_norm.to_string(),
                    x.rejected_outlier.to_string(),
                    x.rejected_other.to_string(),
                    x.adversary_commits.to_string(),
                    x.adversary_rejected.to_string(),
                    x.honest_rejected.to_string(),
                    x.honest_outliers.to_string(),
                    x.left.to_string(),
                    format!("{:.6}", x.lost_work),
                    format!("{:.8}", x.loss_before),
                    format!("{:.8}", x.loss_after),
                    format!("{:.6e}", x.merge_error),
                    format!("{:.6e}", x.truncation_error),
                    x.state_bytes.to_string(),
                    format!("{:.8}", x.shapley_sum),
                    x.attribution_evaluations.to_string(),
                ];
                if with_timings {
                    cells.push(format!("{:.3}", t.coordinator_cpu.as_secs_f64() * 1e3));
                    cells.push(format!("{:.3}", t.driver_cpu.as_secs_f64() * 1e3));
                    cells.push(format!("{:.3}", t.worker_cpu.as_secs_f64() * 1e3));
                }
                out += &csv_line(cells);
            }
        }
        out
    }

    /// Per shard per merged round, as CSV.
    pub fn shards_csv(&self) -> String {
        let mut out = String::from("label,round,shard,kind,group,value,credit,flag\n");
        for r in &self.runs {
            for s in &r.shards {
                out += &csv_line([
                    r.config.label.clone(),
                    s.round.to_string(),
                    s.shard.to_string(),
                    s.kind.to_string(),
                    s.group.to_string(),
                    format!("{:.6e}", s.value),
                    s.credit.to_string(),
                    s.flag.to_string(),
                ]);
            }
        }
        out
    }

    /// The small attribution cases, as CSV.
    pub fn shapley_csv(&self) -> String {
        let mut out =
            String::from("players,seed,permutations,evaluations,relative_l1,closed_form_gap\n");
        for s in &self.shapley {
            out += &csv_line([
                s.players.to_string(),
                s.seed.to_string(),
                s.permutations.to_string(),
                s.evaluations.to_string(),
                format!("{:.6e}", s.relative_l1),
                format!("{:.3e}", s.closed_form_gap),
            ]);
        }
        out
    }

    /// A text summary: the scenario, a table of the main figures per run, shard kinds and the
    /// attribution cases.
    pub fn summary(&self) -> String {
        let mut s = format!("scenario {}: {}\n", self.name, self.description);
        let cols = [
            "label",
            "volunteers",
            "rounds_merged",
            "finished",
            "mean_round_s",
            "bytes_per_peer_round",
            "coordinator_cpu_ms_round",
            "state_bytes",
            "final_loss",
            "lost_work",
            "detection_rate",
            "false_positive_rate",
            "honest_outliers",
            "merge_error",
            "events_per_s",
            "wall_s",
        ];
        let table: Vec<Vec<String>> = self
            .runs
            .iter()
            .map(|r| {
                let cells = run_cells(r);
                cols.iter()
                    .map(|c| {
                        cells
                            .iter()
                            .find(|(n, _)| n == c)
                            .map(|(_, v)| v.render())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                table
                    .iter()
                    .map(|r| r[i].len())
                    .max()
                    .unwrap_or(0)
                    .max(c.len())
            })
            .collect();
        for (i, c) in cols.iter().enumerate() {
            let _ = write!(s, "{c:>w$} ", w = widths[i]);
        }
        s.push('\n');
        for row in &table {
            for (i, c) in row.iter().enumerate() {
                let _ = write!(s, "{c:>w$} ", w = widths[i]);
            }
            s.push('\n');
        }
        for r in &self.runs {
            let stats = kind_stats(r);
            if stats.len() > 1 {
                let _ = writeln!(
                    s,
                    "{}: per shard kind (count, mean Shapley value, share negative, share flagged harmful, mean credit)",
                    r.config.label
                );
                for (k, n, v, neg, harm, credit) in stats {
                    let _ = writeln!(
                        s,
                        "  {k:>9} {n:>6} {v:>12.3e} {neg:>6.3} {harm:>6.3} {credit:>12.0}"
                    );
                }
                if let Some(p) = clean_over_harmful(r) {
                    let _ = writeln!(s, "  P(clean outranks harmful) = {p:.4}");
                }
            }
        }
        if !self.shapley.is_empty() {
            s += "GTG-Shapley vs exact (mean over seeds): players permutations evaluations relative_l1\n";
            let mut keys: Vec<(usize, usize)> = self
                .shapley
                .iter()
                .map(|x| (x.players, x.permutations))
                .collect();
            keys.dedup();
            keys.sort();
            keys.dedup();
            for (n, p) in keys {
                let rows: Vec<_> = self
                    .shapley
                    .iter()
                    .filter(|x| x.players == n && x.permutations == p)
                    .collect();
                let _ = writeln!(
                    s,
                    "  {n:>3} {p:>5} {:>8.0} {:.4}",
                    mean(rows.iter().map(|x| x.evaluations as f64)),
                    mean(rows.iter().map(|x| x.relative_l1))
                );
            }
            let gap = self
                .shapley
                .iter()
                .map(|x| x.closed_form_gap)
                .fold(0.0, f64::max);
            let _ = writeln!(
                s,
                "  closed form vs protocol exact: largest gap {gap:.2e} nats"
            );
        }
        s
    }

    /// Writes `runs.csv`, `rounds.csv`, `shards.csv` (unless turned off), `shapley.csv` (when
    /// there are cases), `summary.txt` and the charts into `dir`, and removes a `shards.csv` or
    /// `shapley.csv` an earlier run left there; returns the files written.
    pub fn write(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let mut files = Vec::new();
        let mut put = |name: &str, text: String| -> std::io::Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            files.push(p);
            Ok(())
        };
        put("runs.csv", self.runs_csv(true))?;
        put("rounds.csv", self.rounds_csv(true))?;
        if self.write_shards && self.runs.iter().any(|r| !r.shards.is_empty()) {
            put("shards.csv", self.shards_csv())?;
        } else {
            remove_stale(&dir.join("shards.csv"))?;
        }
        if !self.shapley.is_empty() {
            put("shapley.csv", self.shapley_csv())?;
        } else {
            remove_stale(&dir.join("shapley.csv"))?;
        }
        put("summary.txt", self.summary())?;
        let labels: Vec<String> = self.runs.iter().map(|r| r.config.label.clone()).collect();
        for col in &self.charts {
            let values: Vec<f64> = self
                .runs
                .iter()
                .map(|r| {
                    run_cells(r)
                        .into_iter()
                        .find(|(n, _)| n == col)
                        .and_then(|(_, c)| match c {
                            Cell::Num(x) => Some(x),
                            Cell::Text(_) => None,
                        })
                        .unwrap_or(f64::NAN)
                })
                .collect();
            put(
                &format!("{col}.svg"),
                bar_chart(&format!("{}: {col}", self.name), &labels, &values),
            )?;
        }
        // Validation loss per round, one line per run.
        let series: Vec<(String, Vec<(f64, f64)>)> = self
            .runs
            .iter()
            .map(|r| {
                let mut pts = vec![(0.0, r.initial_loss)];
                pts.extend(
                    r.rounds
                        .iter()
                        .filter(|x| x.outcome != "open")
                        .map(|x| (f64::from(x.round) + 1.0, x.loss_after)),
                );
                (r.config.label.clone(), pts)
            })
            .collect();
        put(
            "loss.svg",
            line_chart(
                &format!("{}: validation loss after each round", self.name),
                "round",
                &series,
                false,
            ),
        )?;
        if !self.shapley.is_empty() {
            let mut players: Vec<usize> = self.shapley.iter().map(|x| x.players).collect();
            players.sort();
            players.dedup();
            let series: Vec<(String, Vec<(f64, f64)>)> = players
                .iter()
                .map(|&n| {
                    let mut perms: Vec<usize> = self
                        .shapley
                        .iter()
                        .filter(|x| x.players == n)
                        .map(|x| x.permutations)
                        .collect();
                    perms.sort();
                    perms.dedup();
                    let pts = perms
                        .iter()
                        .map(|&p| {
                            let e = mean(
                                self.shapley
                                    .iter()
                                    .filter(|x| x.players == n && x.permutations == p)
                                    .map(|x| x.relative_l1),
                            );
                            (p as f64, e)
                        })
                        .collect();
                    (format!("{n} players"), pts)
                })
                .collect();
            put(
                "gtg_error.svg",
                line_chart(
                    &format!(
                        "{}: GTG-Shapley relative L1 error vs permutations",
                        self.name
                    ),
                    "permutations (log)",
                    &series,
                    true,
                ),
            )?;
        }
        for r in &self.runs {
            let stats = kind_stats(r);
            if stats.len() > 1 {
                let labels: Vec<String> = stats.iter().map(|s| s.0.to_string()).collect();
                let values: Vec<f64> = stats.iter().map(|s| s.2).collect();
                put(
                    &format!("value_by_kind_{}.svg", r.config.label),
                    bar_chart(
                        &format!(
                            "{}: mean Shapley value per shard kind (nats)",
                            r.config.label
                        ),
                        &labels,
                        &values,
                    ),
                )?;
            }
        }
        Ok(files)
    }
}

/// Removes an output file an earlier run of the scenario left that this one does not write.
fn remove_stale(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

const W: f64 = 720.0;
const H: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 90.0;
const COLOURS: &[&str] = &[
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn fmt_tick(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{x:.2e}")
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}

fn svg_open(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" \
         fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        W / 2.0,
        esc(title)
    )
}

/// The y range and ticks for `values` (always including 0).
fn y_axis(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (0.0f64, 0.0f64);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi - lo <= 0.0 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    (if lo < 0.0 { lo - pad } else { lo }, hi + pad)
}

fn y_of(lo: f64, hi: f64) -> impl Fn(f64) -> f64 {
    let plot_h = H - TOP - BOTTOM;
    move |v: f64| TOP + plot_h * (1.0 - (v - lo) / (hi - lo))
}

fn axes(s: &mut String, lo: f64, hi: f64) {
    let y = y_of(lo, hi);
    for k in 0..=5 {
        let v = lo + (hi - lo) * f64::from(k) / 5.0;
        let py = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            fmt_tick(v)
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"black\"/>",
        H - BOTTOM
    );
}

/// A bar chart of one value per label.
pub fn bar_chart(title: &str, labels: &[String], values: &[f64]) -> String {
    let mut s = svg_open(title);
    let (lo, hi) = y_axis(values.iter().copied());
    axes(&mut s, lo, hi);
    let y = y_of(lo, hi);
    let n = labels.len().max(1) as f64;
    let slot = (W - LEFT - RIGHT) / n;
    for (i, (l, v)) in labels.iter().zip(values).enumerate() {
        let x = LEFT + slot * i as f64 + slot * 0.15;
        if v.is_finite() {
            let (y0, y1) = (y(0.0_f64.max(lo)), y(*v));
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                y0.min(y1),
                slot * 0.7,
                (y0 - y1).abs(),
                COLOURS[0],
                x + slot * 0.35,
                y0.min(y1) - 3.0,
                fmt_tick(*v)
            );
        }
        let lx = x + slot * 0.35;
        let ly = H - BOTTOM + 14.0;
        let _ = writeln!(
            s,
            "<text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"end\" transform=\"rotate(-30 {lx:.1} {ly:.1})\">{}</text>",
            esc(l)
        );
    }
    s + "</svg>\n"
}

/// A line chart of several series of `(x, y)` points.
pub fn line_chart(
    title: &str,
    x_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> String {
    let mut s = svg_open(title);
    let (lo, hi) = y_axis(series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    axes(&mut s, lo, hi);
    let y = y_of(lo, hi);
    let tx = |x: f64| if log_x { x.max(1e-9).ln() } else { x };
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| tx(q.0)))
        .collect();
    let (xlo, mut xhi) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    if xhi.partial_cmp(&xlo) != Some(std::cmp::Ordering::Greater) {
        xhi = xlo + 1.0;
    }
    let plot_w = W - LEFT - RIGHT - 120.0;
    let x = |v: f64| LEFT + plot_w * (tx(v) - xlo) / (xhi - xlo);
    let mut ticks: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for t in ticks.iter().take(20) {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x(*t),
            H - BOTTOM + 16.0,
            fmt_tick(*t)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        LEFT + plot_w / 2.0,
        H - BOTTOM + 36.0,
        esc(x_label)
    );
    for (k, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        let ly = TOP + 14.0 * k as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            W - RIGHT - 110.0,
            ly,
            W - RIGHT - 96.0,
            ly + 9.0,
            esc(name)
        );
    }
    s + "</svg>\n"
}
