//! Jobs: a signed description of one federated fine-tuning run.
//!
//! The job's owner signs a [`JobSpec`] and coordinates its rounds. A job is named by its
//! [`JobId`], the hash of the signed spec, so every volunteer trains exactly what was signed.

use std::fmt;

use bincode::{Decode, Encode};

use super::datanet::DatanetId;
use super::{Check, InvalidMessage, Timestamp};
use crate::hash::ContentHash;
use crate::signed::{Signed, SignedPayload};

/// Longest job name, in bytes.
pub const MAX_JOB_NAME_BYTES: usize = 128;
/// Most datanets in one job.
pub const MAX_JOB_DATANETS: usize = 64;
/// Highest LoRA rank a job may ask for.
pub const MAX_RANK: u32 = 1024;

/// A job's identity: the hash of its signed [`JobSpec`] envelope.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct JobId(pub ContentHash);

impl JobId {
    /// The id of a signed job spec.
    pub fn of(spec: &Signed<JobSpec>) -> Self {
        Self(spec.hash())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0.short())
    }
}

/// A projection of the Llama block that can carry an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub enum TargetModule {
    /// Attention query projection (`q_proj`).
    Q,
    /// Attention key projection (`k_proj`).
    K,
    /// Attention value projection (`v_proj`).
    V,
    /// Attention output projection (`o_proj`).
    O,
    /// MLP gate projection (`gate_proj`).
    Gate,
    /// MLP up projection (`up_proj`).
    Up,
    /// MLP down projection (`down_proj`).
    Down,
}

impl TargetModule {
    /// All targets, in order.
    pub const ALL: [TargetModule; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The module's name in Hugging Face Llama checkpoints and PEFT configs.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }
}

/// How the frozen base is held during QLoRA training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum BaseQuant {
    /// The base model file's own 4-bit blocks (e.g. GGUF Q4_0 / Q4_1), never re-quantized.
    GgufBlocks,
    /// NF4 with double quantization of the scales, as in the QLoRA paper.
    Nf4DoubleQuant,
}

/// LoRA or QLoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum AdapterKind {
    /// Full-precision frozen base.
    Lora,
    /// 4-bit frozen base.
    Qlora {
        /// The 4-bit format.
        quant: BaseQuant,
    },
}

/// The adapter to train.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct AdapterConfig {
    /// LoRA or QLoRA.
    pub kind: AdapterKind,
    /// Rank r.
    pub rank: u32,
    /// Alpha; the update is scaled by alpha / r (or alpha / sqrt(r) with `rslora`).
    pub alpha: f32,
    /// Dropout on the adapter's input, in [0, 1).
    pub dropout: f32,
    /// Where adapters go: strictly increasing, at least one.
    pub targets: Vec<TargetModule>,
    /// Rank-stabilised scaling alpha / sqrt(r).
    pub rslora: bool,
}

/// Learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum LrSchedule {
    /// Constant.
    Constant,
    /// Linear decay to zero.
    Linear,
    /// Cosine decay to zero.
    Cosine,
}

/// Optimiser and data settings of each volunteer's local training.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Hyperparameters {
    /// Peak AdamW learning rate.
    pub learning_rate: f32,
    /// Schedule after warmup.
    pub schedule: LrSchedule,
    /// Linear warmup steps.
    pub warmup_steps: u32,
    /// Epochs over the assigned shards per round.
    pub epochs: u32,
    /// Sequences per micro-batch.
    pub batch_size: u32,
    /// Micro-batches per optimiser step.
    pub grad_accumulation: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Gradient clipping by global norm; 0 disables it.
    pub max_grad_norm: f32,
    /// Base seed; every other seed (assignment, dropout, data order) derives from it.
    pub seed: u64,
}

/// One datanet version a job trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct DatanetRef {
    /// The datanet.
    pub datanet: DatanetId,
    /// Its version.
    pub version: u64,
    /// The hash of that version's signed manifest.
    pub manifest: ContentHash,
}

/// The held-out validation set: records taken from the datanets by a seeded split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ValidationSpec {
    /// Parts per million of records held out.
    pub fraction_ppm: u32,
    /// The split's seed.
    pub seed: u64,
    /// The hash of the published validation-set blob.
    pub set: ContentHash,
}

/// When a round may close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Quorum {
    /// Verified updates needed to merge.
    pub min_updates: u32,
    /// Workers assigned per round (at most).
    pub max_workers: u32,
}

/// Phase lengths of every round, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Deadlines {
    /// From open until assignments are made.
    pub enroll_ms: u64,
    /// From assignment until update commits are due.
    pub train_ms: u64,
    /// From the commit deadline until validation and merge must end.
    pub validate_ms: u64,
}

/// How verified updates are merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum MergeMethod {
    /// The weighted sum of the products B_i·A_i, re-factored to the job's rank by truncated SVD
    /// (reporting the truncation error).
    ExactTruncated,
    /// The weighted sum kept exactly at rank k·r.
    ExactFullRank,
    /// Frozen shared A from the job seed (FFA-LoRA); B averaged exactly.
    Ffa,
}

/// Stop early when validation loss stops improving.
#[derive(Clone, Copy, Debug, PartialEq, Encode, Decode)]
pub struct EarlyStopping {
    /// Rounds without improvement before stopping.
    pub patience: u32,
    /// The least improvement that counts, in nats.
    pub min_delta: f32,
}

/// Byzantine-robust filtering of a round's updates, after verification and the norm bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum RobustAggregation {
    /// Every update that passed its checks and the norm bound is merged.
    None,
    /// Multi-Krum (Blanchard et al., 2017) with up to `f` Byzantine updates per round: each of
    /// the `m` remaining updates is scored by the sum of its `m − f − 2` smallest squared
    /// distances `‖ΔW_i − ΔW_j‖²_F` to the others, and the `f` highest-scoring ones are refused
    /// as [`crate::types::RejectReason::Outlier`]; updates of the round already refused for
    /// misbehaviour (a failed spot check, malformed or non-finite values, ...) count against
    /// the `f` ([`crate::rounds::coordinator::filter_budget`]). Scoring needs `m ≥ f + 3`: a
    /// round with fewer updates filters with `f` lowered to `m − 3` (no filter at all for
    /// `m ≤ 3`). The round's quorum counts the updates left after the filter.
    MultiKrum {
        /// Byzantine updates tolerated per round, at least 1 (no filter is
        /// [`RobustAggregation::None`]); `2f + 3 ≤ max_workers` (Krum's `n > 2f + 2` in a full
        /// round) and `min_updates + f ≤ max_workers` (a full round still has its quorum after
        /// the filter).
        f: u32,
    },
}

impl RobustAggregation {
    /// The Byzantine budget `f`; 0 without a filter.
    pub fn byzantine(self) -> u32 {
        match self {
            Self::None => 0,
            Self::MultiKrum { f } => f,
        }
    }
}

/// How updates are verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct VerificationSpec {
    /// Optimiser steps per committed segment (K).
    pub segment_steps: u32,
    /// Probability, in parts per million, that a segment is re-executed.
    pub audit_ppm: u32,
    /// Bound on the Frobenius norm of an update's delta B·A, in parts per million of the
    /// round's median (e.g. 3_000_000 = 3x the median).
    pub norm_bound_ppm: u32,
    /// Byzantine-robust filtering of the updates that pass the norm bound.
    pub robust: RobustAggregation,
}

/// A federated fine-tuning job, signed by its owner (the coordinator).
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct JobSpec {
    /// Human-readable name.
    pub name: String,
    /// The BLAKE3 hash of the base model file.
    pub base_model: ContentHash,
    /// The adapter to train.
    pub adapter: AdapterConfig,
    /// Local training settings.
    pub hyper: Hyperparameters,
    /// The training data, strictly increasing by datanet id.
    pub datanets: Vec<DatanetRef>,
    /// The validation set.
    pub validation: ValidationSpec,
    /// Number of rounds.
    pub rounds: u32,
    /// Quorum per round.
    pub quorum: Quorum,
    /// Phase deadlines.
    pub deadlines: Deadlines,
    /// Merge method.
    pub merge: MergeMethod,
    /// Early stopping, if any.
    pub early_stopping: Option<EarlyStopping>,
    /// Verification settings.
    pub verification: VerificationSpec,
    /// When the job was created.
    pub created_at: Timestamp,
}

impl SignedPayload for JobSpec {
    const DOMAIN: &'static str = "cohort/job/v2";
}

impl JobSpec {
    /// Checks the spec's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("job");
        c.non_empty_text("name", &self.name, MAX_JOB_NAME_BYTES)?;
        let a = &self.adapter;
        c.range("adapter.rank", a.rank, 1, MAX_RANK)?;
        c.finite("adapter.alpha", a.alpha)?;
        if a.alpha <= 0.0 {
            return Err(c.fail("adapter.alpha", "must be positive"));
        }
        c.finite("adapter.dropout", a.dropout)?;
        if !(0.0..1.0).contains(&a.dropout) {
            return Err(c.fail(
                "adapter.dropout",
                format!("{} is outside [0, 1)", a.dropout),
            ));
        }
        if a.targets.is_empty() {
            return Err(c.fail("adapter.targets", "at least one target module"));
        }
        c.strictly_sorted("adapter.targets", &a.targets, |t| *t)?;
        let h = &self.hyper;
        c.finite("hyper.learning_rate", h.learning_rate)?;
        if h.learning_rate <= 0.0 || h.learning_rate > 1.0 {
            return Err(c.fail(
                "hyper.learning_rate",
                format!("{} is outside (0, 1]", h.learning_rate),
            ));
        }
        c.range("hyper.epochs", h.epochs, 1, 1000)?;
        c.range("hyper.batch_size", h.batch_size, 1, 4096)?;
        c.range("hyper.grad_accumulation", h.grad_accumulation, 1, 4096)?;
        c.range("hyper.seq_len", h.seq_len, 8, 1 << 20)?;
        c.finite("hyper.weight_decay", h.weight_decay)?;
        c.finite("hyper.max_grad_norm", h.max_grad_norm)?;
        if h.weight_decay < 0.0 || h.max_grad_norm < 0.0 {
            return Err(c.fail(
                "hyper",
                "weight_decay and max_grad_norm must not be negative",
            ));
        }
        if self.datanets.is_empty() {
            return Err(c.fail("datanets", "at least one datanet"));
        }
        c.len("datanets", &self.datanets, MAX_JOB_DATANETS)?;
        c.strictly_sorted("datanets", &self.datanets, |d| d.datanet)?;
        c.range(
            "validation.fraction_ppm",
            self.validation.fraction_ppm,
            1,
            500_000,
        )?;
        c.range("rounds", self.rounds, 1, 100_000)?;
        c.range(
            "quorum.min_updates",
            self.quorum.min_updates,
            1,
            self.quorum.max_workers.max(1),
        )?;
        let d = &self.deadlines;
        if d.enroll_ms == 0 || d.train_ms == 0 || d.validate_ms == 0 {
            return Err(c.fail("deadlines", "every phase needs a positive length"));
        }
        if let Some(es) = &self.early_stopping {
            c.finite("early_stopping.min_delta", es.min_delta)?;
            c.range("early_stopping.patience", es.patience, 1, self.rounds)?;
        }
        let v = &self.verification;
        c.range("verification.segment_steps", v.segment_steps, 1, 1_000_000)?;
        c.range("verification.audit_ppm", v.audit_ppm, 0, 1_000_000)?;
        if v.norm_bound_ppm < 1_000_000 {
            return Err(c.fail(
                "verification.norm_bound_ppm",
                "a bound below the median rejects honest updates",
            ));
        }
        if let RobustAggregation::MultiKrum { f } = v.robust {
            let (f, min, max) = (
                u64::from(f),
                u64::from(self.quorum.min_updates),
                u64::from(self.quorum.max_workers),
            );
            if f == 0 {
                return Err(c.fail(
                    "verification.robust",
                    "Multi-Krum tolerates at least one Byzantine update (no filter is None)",
                ));
            }
            if 2 * f + 3 > max {
                return Err(c.fail(
                    "verification.robust",
                    format!(
                        "Multi-Krum with f = {f} needs max_workers >= 2f + 3 = {}",
                        2 * f + 3
                    ),
                ));
            }
            if min + f > max {
                return Err(c.fail(
                    "verification.robust",
                    format!(
                        "Multi-Krum with f = {f} refuses f updates: max_workers must be at least \
                         min_updates + f = {}",
                        min + f
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The adapter's scaling factor: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f32 {
        let r = self.adapter.rank as f32;
        if self.adapter.rslora {
            self.adapter.alpha / r.sqrt()
        } else {
            self.adapter.alpha / r
        }
    }
}
