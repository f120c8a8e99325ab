//! Scenario files: one TOML file holds a `[base]` run configuration and `[[runs]]` that override
//! some of its fields, so one file sweeps one variable (volunteers, churn, adversaries...).
//!
//! ```toml
//! name = "scale"
//! description = "round time and coordinator cost against the number of volunteers"
//! [base]
//! rounds = 2
//! [[runs]]
//! label = "n100"
//! volunteers = 100
//! ```
//!
//! Every field of [`RunConfig`] has a default, and unknown fields are errors (naming the field),
//! so a typo never silently runs the default.

use serde::Deserialize;

/// How the accepted updates of a round are merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// `Σ w_i B_i A_i` re-factored to rank r by truncated SVD (the protocol's `ExactTruncated`).
    Exact,
    /// `Σ w_i B_i A_i` kept without truncation (the protocol's `ExactFullRank`; in the surrogate
    /// `k·r` exceeds the layer's dimensions, so this is the dense sum).
    Full,
    /// FFA-LoRA: A frozen from the job seed, B averaged (the protocol's `Ffa`).
    Ffa,
    /// Averages A and B separately (`B̄·Ā`): the mistake the exact merge avoids; the job spec
    /// says `ExactTruncated`, the driver merges naively.
    Naive,
}

/// What the adversarial volunteers do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdversaryKind {
    /// Trains honestly, then sends `start - poison_scale · (honest delta)`, faking the last
    /// `faked_segments` segment commitments (all if 0).
    Poison,
    /// Trains nothing: a random update and made-up segment commitments (free riding).
    MadeUp,
    /// Sends another worker's update as its own (with that worker's segment commitments).
    Copy,
    /// Each adversary draws one of poison, made-up and copy.
    Mixed,
    /// Data poisoning with honest compute: the shards the adversary contributed hold
    /// label-flipped rows (they ask for `-T`, like a harmful shard), and it trains honestly on
    /// whatever it is assigned. An update trained on such a shard, by anyone, passes every spot
    /// check and is counted as poisoned.
    Flip,
}

/// How the driver computes the Shapley values it reports with the merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttributionMode {
    /// The surrogate's closed form: the coalition game is quadratic, so exact Shapley values
    /// cost one pass over the updates at any size.
    Exact,
    /// `cohort_protocol::attribution::attribute` (exact up to 20 players, GTG-Shapley above)
    /// over the same coalition game; above `protocol_attribution_max` updates the closed form.
    Protocol,
}

/// One simulated job. Times are virtual seconds unless named otherwise.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// A name for the run in the output.
    pub label: String,
    /// The run's seed: every random choice derives from it.
    pub seed: u64,
    /// Volunteers that hear of the job.
    pub volunteers: usize,
    /// Training shards (0: one per volunteer).
    pub shards: usize,
    /// Rounds of the job.
    pub rounds: u32,
    /// Verified updates needed to merge, as a fraction of the volunteers (at least 1).
    pub quorum_fraction: f64,
    /// Workers per round at most (0: all volunteers).
    pub max_workers: usize,
    /// Enrolment phase length.
    pub enroll_s: f64,
    /// Training phase length (the commit deadline after assignment).
    pub train_s: f64,
    /// Validation phase length.
    pub validate_s: f64,

    /// Input dimension of the surrogate layer.
    pub dim_in: usize,
    /// Output dimension of the surrogate layer.
    pub dim_out: usize,
    /// The adapter's rank r.
    pub rank: u32,
    /// The rank of the true change the data asks for.
    pub true_rank: usize,
    /// Training rows per shard.
    pub rows_per_shard: usize,
    /// Validation rows.
    pub val_rows: usize,
    /// Rows per SGD step.
    pub batch: usize,
    /// Passes over a worker's rows per round.
    pub epochs: u32,
    /// SGD learning rate.
    pub lr: f64,
    /// Label noise (standard deviation) of clean shards.
    pub noise: f64,
    /// Per-shard deviation of its target from the shared one (relative Frobenius size).
    pub hetero: f64,
    /// Steps per segment commitment (K).
    pub segment_steps: u32,

    /// Fraction of shards that copy another shard's rows (same near-duplicate group).
    pub duplicate_fraction: f64,
    /// Fraction of shards whose labels are pure noise.
    pub noisy_fraction: f64,
    /// Fraction of shards whose labels point the wrong way (harmful data).
    pub harmful_fraction: f64,

    /// Median one-way latency in milliseconds (log-normal).
    pub latency_ms: f64,
    /// Sigma of the latency's logarithm.
    pub latency_sigma: f64,
    /// Volunteers' upload bandwidth, Mbit/s.
    pub upload_mbps: f64,
    /// The coordinator's upload bandwidth, Mbit/s.
    pub coordinator_upload_mbps: f64,
    /// The coordinator's download bandwidth, Mbit/s (update blobs queue on it).
    pub coordinator_download_mbps: f64,
    /// Fan-out of the relay tree that stands in for gossip and blob re-serving.
    pub fanout: usize,
    /// Size of one adapter blob on the wire, bytes (the real model's, not the surrogate's).
    pub update_bytes: usize,

    /// Median training time of one worker's round, seconds (log-normal over workers).
    pub train_time_s: f64,
    /// Sigma of the training time's logarithm.
    pub train_time_sigma: f64,
    /// Coordinator CPU time to replay one audited segment, seconds.
    pub replay_s: f64,
    /// Segments the coordinator replays in parallel.
    pub replay_slots: usize,

    /// Spot-check rate per segment (0..1).
    pub audit_rate: f64,
    /// Norm bound as a multiple of the round's median delta norm (0: no norm bound).
    pub norm_bound: f64,
    /// Multi-Krum's Byzantine budget `f` per round (the job's `verification.robust`): the
    /// coordinator refuses the `f` updates farthest from the others as outliers (0: no filter).
    pub multi_krum_f: u32,
    /// `false`: no spot checks, no norm bound and no Multi-Krum filter (to measure the damage
    /// they prevent).
    pub defences: bool,
    /// How updates are merged.
    pub merge: MergeMode,
    /// How Shapley values are computed.
    pub attribution: AttributionMode,
    /// Above this many updates [`AttributionMode::Protocol`] falls back to the closed form.
    pub protocol_attribution_max: usize,

    /// Fraction of volunteers that leave during each round's training (never to return).
    pub churn: f64,
    /// Fraction of volunteers that are adversaries.
    pub adversaries: f64,
    /// What they do.
    pub adversary: AdversaryKind,
    /// Poison strength: the update is `start - poison_scale · honest delta`.
    pub poison_scale: f64,
    /// Segments a poisoner or free rider fakes (0: all of them).
    pub faked_segments: u32,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            label: "run".into(),
            seed: 1,
            volunteers: 20,
            shards: 0,
            rounds: 3,
            quorum_fraction: 0.5,
            max_workers: 0,
            enroll_s: 30.0,
            train_s: 600.0,
            validate_s: 300.0,
            dim_in: 16,
            dim_out: 16,
            rank: 4,
            true_rank: 6,
            rows_per_shard: 48,
            val_rows: 512,
            batch: 8,
            epochs: 2,
            lr: 0.1,
            noise: 0.1,
            hetero: 0.2,
            segment_steps: 2,
            duplicate_fraction: 0.0,
            noisy_fraction: 0.0,
            harmful_fraction: 0.0,
            latency_ms: 40.0,
            latency_sigma: 0.6,
            upload_mbps: 10.0,
            coordinator_upload_mbps: 100.0,
            coordinator_download_mbps: 100.0,
            fanout: 8,
            update_bytes: 1 << 20,
            train_time_s: 120.0,
            train_time_sigma: 0.3,
            replay_s: 2.0,
            replay_slots: 8,
            audit_rate: 0.1,
            norm_bound: 4.0,
            multi_krum_f: 0,
            defences: true,
            merge: MergeMode::Exact,
            attribution: AttributionMode::Exact,
            protocol_attribution_max: 1_000,
            churn: 0.0,
            adversaries: 0.0,
            adversary: AdversaryKind::Poison,
            poison_scale: 3.0,
            faked_segments: 0,
        }
    }
}

/// Extra analyses a scenario asks for besides its runs.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Analyses {
    /// Small attribution cases: for each player count, exact Shapley (the protocol's
    /// `shapley_exact` and the closed form) against GTG-Shapley at each of `gtg_permutations`.
    pub shapley_players: Vec<usize>,
    /// Permutation budgets to try.
    pub gtg_permutations: Vec<usize>,
    /// Seeds per case.
    pub shapley_seeds: u64,
    /// Columns of the runs table to draw as bar charts (one SVG each).
    pub charts: Vec<String>,
    /// Whether to write `shards.csv` (per shard and round; large for many runs).
    pub shards_csv: bool,
}

impl Default for Analyses {
    fn default() -> Self {
        Self {
            shapley_players: Vec::new(),
            gtg_permutations: Vec::new(),
            shapley_seeds: 0,
            charts: Vec::new(),
            shards_csv: true,
        }
    }
}

/// A scenario file, parsed.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name (used for output file names).
    pub name: String,
    /// What it measures.
    pub description: String,
    /// The runs, with the base applied.
    pub runs: Vec<RunConfig>,
    /// Extra analyses.
    pub analyses: Analyses,
}

/// Why a scenario file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The TOML does not parse or a field is wrong.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// A run's configuration makes no sense.
    #[error("run {label:?}: {field}: {why}")]
    Invalid {
        /// The run.
        label: String,
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

impl Scenario {
    /// Parses a scenario file's text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let mut root: toml::Table = toml::from_str(text)?;
        let name = match root.remove("name") {
            Some(toml::Value::String(s)) => s,
            _ => "scenario".into(),
        };
        let description = match root.remove("description") {
            Some(toml::Value::String(s)) => s,
            _ => String::new(),
        };
        let base = match root.remove("base") {
            Some(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        let analyses: Analyses = match root.remove("analyses") {
            Some(v) => v.try_into()?,
            None => Analyses::default(),
        };
        let overrides = match root.remove("runs") {
            Some(toml::Value::Array(a)) => a,
            _ => vec![toml::Value::Table(toml::Table::new())],
        };
        if let Some(key) = root.keys().next() {
            return Err(ScenarioError::Invalid {
                label: name,
                field: "top level",
                why: format!(
                    "unknown key {key:?} (expected name, description, base, runs, analyses)"
                ),
            });
        }
        let mut runs = Vec::new();
        for o in overrides {
            let mut table = base.clone();
            if let toml::Value::Table(t) = o {
                for (k, v) in t {
                    table.insert(k, v);
                }
            }
            let run: RunConfig = toml::Value::Table(table).try_into()?;
            run.validate()?;
            runs.push(run);
        }
        Ok(Self {
            name,
            description,
            runs,
            analyses,
        })
    }
}

impl RunConfig {
    /// Checks the fields that would make a run meaningless or crash it.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |field: &'static str, why: &str| ScenarioError::Invalid {
            label: self.label.clone(),
            field,
            why: why.into(),
        };
        if self.volunteers == 0 || self.volunteers > cohort_protocol::types::round::MAX_WORKERS {
            return Err(bad(
                "volunteers",
                "must be 1..=16384 (the assignment's limit)",
            ));
        }
        if self.rounds == 0 {
            return Err(bad("rounds", "at least 1"));
        }
        if self.dim_in == 0 || self.dim_out == 0 || self.rank == 0 || self.true_rank == 0 {
            return Err(bad("dim_in/dim_out/rank/true_rank", "must be positive"));
        }
        if self.rows_per_shard == 0 || self.batch == 0 || self.val_rows == 0 {
            return Err(bad("rows_per_shard/batch/val_rows", "must be positive"));
        }
        if self.segment_steps == 0 || self.epochs == 0 {
            return Err(bad("segment_steps/epochs", "must be positive"));
        }
        for (field, x) in [
            ("quorum_fraction", self.quorum_fraction),
            ("duplicate_fraction", self.duplicate_fraction),
            ("noisy_fraction", self.noisy_fraction),
            ("harmful_fraction", self.harmful_fraction),
            ("audit_rate", self.audit_rate),
            ("churn", self.churn),
            ("adversaries", self.adversaries),
        ] {
            if !(0.0..=1.0).contains(&x) {
                return Err(bad(field, "must be within 0..=1"));
            }
        }
        if self.duplicate_fraction + self.noisy_fraction + self.harmful_fraction > 1.0 {
            return Err(bad("*_fraction", "shard kinds add up to more than 1"));
        }
        if self.norm_bound != 0.0 && (self.norm_bound.is_nan() || self.norm_bound < 1.0) {
            return Err(bad(
                "norm_bound",
                "0 (off) or at least 1 (below 1 rejects honest updates)",
            ));
        }
        for (field, x) in [
            ("enroll_s", self.enroll_s),
            ("train_s", self.train_s),
            ("validate_s", self.validate_s),
            ("upload_mbps", self.upload_mbps),
            ("coordinator_upload_mbps", self.coordinator_upload_mbps),
            ("coordinator_download_mbps", self.coordinator_download_mbps),
            ("train_time_s", self.train_time_s),
            ("latency_ms", self.latency_ms),
        ] {
            if !(x.is_finite() && x > 0.0) {
                return Err(bad(field, "must be positive"));
            }
        }
        if self.fanout == 0 || self.replay_slots == 0 {
            return Err(bad("fanout/replay_slots", "must be positive"));
        }
        Ok(())
    }

    /// Shards in the job.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            self.volunteers
        } else {
            self.shards
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_override_the_base_and_typos_are_named() {
        let s = Scenario::parse(
            "name = \"t\"\n[base]\nrounds = 5\nvolunteers = 10\n[[runs]]\nlabel = \"a\"\n\
             [[runs]]\nlabel = \"b\"\nvolunteers = 30\nmerge = \"ffa\"\n",
        )
        .expect("parses");
        assert_eq!(s.name, "t");
        assert_eq!(s.runs.len(), 2);
        assert_eq!((s.runs[0].rounds, s.runs[0].volunteers), (5, 10));
        assert_eq!(
            (s.runs[1].volunteers, s.runs[1].merge),
            (30, MergeMode::Ffa)
        );
        let err = Scenario::parse("[base]\nvolunters = 3\n").unwrap_err();
        assert!(err.to_string().contains("volunters"), "{err}");
        let err = Scenario::parse("[[runs]]\nchurn = 2.0\n").unwrap_err();
        assert!(err.to_string().contains("churn"), "{err}");
    }

    #[test]
    fn defences_map_onto_the_job_spec() {
        use crate::rounds::driver::job_spec;
        use cohort_protocol::types::RobustAggregation;
        let s = Scenario::parse(
            "[base]\nvolunteers = 20\n[[runs]]\nmulti_krum_f = 3\n[[runs]]\nnorm_bound = 0.0\n\
             [[runs]]\nmulti_krum_f = 3\ndefences = false\n[[runs]]\nadversary = \"flip\"\n",
        )
        .expect("parses");
        let specs: Vec<_> = s.runs.iter().map(job_spec).collect();
        assert_eq!(
            specs[0].verification.robust,
            RobustAggregation::MultiKrum { f: 3 }
        );
        assert_eq!(specs[0].verification.norm_bound_ppm, 4_000_000);
        assert_eq!(specs[1].verification.robust, RobustAggregation::None);
        assert_eq!(specs[1].verification.norm_bound_ppm, u32::MAX);
        assert!(specs[1].verification.audit_ppm > 0);
        assert_eq!(specs[2].verification.robust, RobustAggregation::None);
        assert_eq!(specs[2].verification.audit_ppm, 0);
        assert_eq!(s.runs[3].adversary, AdversaryKind::Flip);
        let err = Scenario::parse("[base]\nnorm_bound = 0.5\n").unwrap_err();
        assert!(err.to_string().contains("norm_bound"), "{err}");
    }
}
