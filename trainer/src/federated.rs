//! What a peer calls to take part in a federated round: blocking functions over files, paths and
//! JSONL text, meant to run on `tokio::task::spawn_blocking`.
//!
//! - A worker trains its update with [`train_update`]: from the round's start adapter (or a fresh
//!   LoRA from the job seed), on its records, committing to a [`Segment`] every
//!   `segment_steps` optimizer steps and keeping a snapshot at every boundary for auditors.
//! - The coordinator checks each update with [`check_update`] (layout, finite values, the norm
//!   of its delta in product space, for the round's norm bound), audits segments with [`replay`],
//!   and merges with [`merge_round`], which also evaluates the validation loss before and after
//!   and the Shapley value of each update ([`cohort_protocol::attribution`]).
//! - Adapters and snapshots travel as one blob each: [`pack_dir`] / [`unpack_dir`].
//!
//! [`JobSetup::from_spec`] turns a signed job's [`JobSpec`] into the trainer's settings once; every
//! function takes it. Each call opens the base model itself (the GGUF is memory-mapped), so the
//! setup is plain data that can be cloned into a blocking task.
//!
//! Everything runs on the CPU backend (`Device::flex()`), where a run's bits depend only on the
//! inputs, the gemm kernel class and the thread count ([`kernel_class`]); an audit reproduces a
//! segment only on the same kernel class. [`spot_check`] compares bit for bit there, and across
//! kernel classes compares the replay with the worker's own end snapshot within a tolerance
//! ([`Verifier`], [`crate::verify::state_distance`]).
//!
//! This module drives [`crate::train`] and [`crate::verify`]; it never changes how a run trains.
//! [`train_update`] commits exactly as [`crate::verify::train_segmented`] does (the tests compare
//! them), through the training loop's own boundary hook, so that it can also stop between steps.

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;
use cohort_protocol::ContentHash;
use cohort_protocol::attribution::{
    AttributionConfig, AttributionError, GtgConfig, Method, attribute,
};
use cohort_protocol::types::job::{
    AdapterKind, BaseQuant, JobSpec, LrSchedule, MergeMethod as JobMergeMethod,
};
use cohort_protocol::types::round::KernelClass;

use crate::adapter::{AdapterError, AdapterWeights, Factors, LoraSpec, MergeMethod, attach};
use crate::data::{Batch, Example, Schema, parse_record, tokenize};
use crate::gguf::GgufFile;
use crate::merge::{LowRank, MergeError, delta_dist_sq, delta_inner, delta_norm_sq};
use crate::model::weights::Proj;
use crate::model::{BaseWeights, Llama, LlamaConfig, Weights};
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::{Boundary, Hooks, Schedule, TrainConfig, TrainError, masked_loss, run};
use crate::verify::{
    SPOT_CHECK_TOLERANCE, SPOT_CHECK_TOLERANCE_FIRST, Segment, StateDistance, TrainState,
    VerifyError, batch_leaf, merkle_root, replay_from, snapshot_path, state_distance, state_hash,
};

/// Shapley values are exact (all `2^n` coalitions) up to this many updates, GTG-Shapley
/// sampling above.
pub const EXACT_SHAPLEY_MAX: usize = 8;

/// The first bytes of a bundle ([`pack_dir`]).
pub const BUNDLE_MAGIC: &[u8; 16] = b"cohort-bundle/v1";

/// The largest bundle [`pack_dir`] writes and [`unpack_dir`] reads: 4 GiB.
pub const MAX_BUNDLE_BYTES: u64 = 4 << 30;

/// The longest file name in a bundle, in bytes.
pub const MAX_BUNDLE_NAME_BYTES: usize = 4096;

/// The trainer's settings for one job, from its [`JobSpec`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobSetup {
    /// The base model's GGUF file (the bytes the job's `base_model` hash names).
    pub base: PathBuf,
    /// What adapters written here give as PEFT's `base_model_name_or_path`: the job's base
    /// model hash in hex, the same on every peer, so that every peer writes the same bytes.
    pub base_name: String,
    /// The adapter: rank, alpha, targets (Hugging Face names), dropout; `seed` is the job seed,
    /// from which a fresh adapter's `A` is drawn.
    pub lora: LoraSpec,
    /// Local training; its `seed` is the job seed, replaced by each call's own seed (the data
    /// order and dropout masks of one worker's run).
    pub train: TrainConfig,
    /// Tokens per example: the job's sequence length, cut to the base model's context.
    pub seq_len: usize,
    /// QLoRA: the frozen base stays in the GGUF's own quantized blocks
    /// ([`BaseWeights::Packed`]); otherwise it is dequantized to f32.
    pub qlora: bool,
    /// Optimizer steps per committed segment (`K`).
    pub segment_steps: usize,
    /// How the round's updates are merged.
    pub merge: MergeMethod,
    /// The records' schema; `None` takes each record's from its fields (`messages`: chat,
    /// otherwise alpaca).
    pub schema: Option<Schema>,
}

/// What can go wrong in this module's functions. Each variant names the input at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FederatedError {
    /// The job asks for something this trainer cannot do.
    #[error("unsupported job: {0}")]
    Unsupported(String),
    /// The job spec or a setting derived from it is invalid.
    #[error("bad job setting {field}: {reason}")]
    BadSetting {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The base model file cannot be used.
    #[error("base model {}: {problem}", path.display())]
    Base {
        /// The GGUF file.
        path: PathBuf,
        /// Why.
        problem: String,
    },
    /// A record is not valid in the job's schema, or cannot be tokenized.
    #[error("record {index}: {problem}")]
    Record {
        /// Its position in the records given (0-based).
        index: usize,
        /// Why.
        problem: String,
    },
    /// The round's start adapter does not fit the job.
    #[error("start adapter {}: {defect}", path.display())]
    BadStart {
        /// Its directory.
        path: PathBuf,
        /// What is wrong with it.
        defect: UpdateDefect,
    },
    /// An adapter given to [`evaluate`] does not fit the job.
    #[error("adapter {}: {defect}", path.display())]
    BadAdapter {
        /// Its directory.
        path: PathBuf,
        /// What is wrong with it.
        defect: UpdateDefect,
    },
    /// An update given to [`merge_round`] or [`update_distances`] does not fit the round.
    #[error("update {index} ({}): {defect}", path.display())]
    BadUpdate {
        /// Its position in the list given.
        index: usize,
        /// Its directory.
        path: PathBuf,
        /// What is wrong with it.
        defect: UpdateDefect,
    },
    /// A merge weight is not positive and finite.
    #[error("update {index} has merge weight {weight}: weights must be positive and finite")]
    BadWeight {
        /// The update's position.
        index: usize,
        /// The weight.
        weight: f64,
    },
    /// No record has a target token to evaluate.
    #[error("no record has a token to evaluate")]
    NothingToEvaluate,
    /// A model's validation loss is not finite.
    #[error("the validation loss is {0}")]
    NonFiniteLoss(f32),
    /// [`train_update`] saw its stop flag.
    #[error("stopped")]
    Stopped,
    /// Training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// Committing to or replaying a run failed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Merging or writing an adapter failed.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// Product-space arithmetic on factors failed.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// Shapley values could not be computed.
    #[error(transparent)]
    Attribution(#[from] AttributionError),
    /// A bundle is malformed, or a directory cannot be bundled.
    #[error("bundle: {0}")]
    Bundle(String),
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Why an adapter (a worker's update, or a round's start) is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateDefect {
    /// Its layout differs from the job's: targets, layers, rank, scaling or a factor's shape.
    #[error("wrong shape: {0}")]
    Shape(String),
    /// A factor holds NaN or an infinity (the message names it), or the delta's norm overflows.
    #[error("non-finite values: {0}")]
    NonFinite(String),
    /// It is not a readable PEFT LoRA directory.
    #[error("unreadable: {0}")]
    Unreadable(String),
}

impl JobSetup {
    /// The trainer's settings for `spec` on the base model file `base` (which is opened to read
    /// its shape, tokenizer and chat template).
    ///
    /// Mapping: targets to their Hugging Face names; the job seed seeds the LoRA `A`
    /// initialisation and is the default training seed; learning rate and gradient clipping
    /// are taken as the decimal numbers the job shows (`2e-4`, not `f64::from(2e-4f32)`), and
    /// `max_grad_norm = 0` (no clipping) becomes `f64::MAX`; every epoch runs (no step cap);
    /// QLoRA keeps the GGUF's own 4-bit blocks (NF4 is refused); the sequence length is cut to
    /// the model's context.
    pub fn from_spec(spec: &JobSpec, base: &Path) -> Result<JobSetup, FederatedError> {
        spec.validate().map_err(|e| FederatedError::BadSetting {
            field: "job",
            reason: e.to_string(),
        })?;
        let a = &spec.adapter;
        let h = &spec.hyper;
        let qlora = match a.kind {
            AdapterKind::Lora => false,
            AdapterKind::Qlora {
                quant: BaseQuant::GgufBlocks,
            } => true,
            AdapterKind::Qlora {
                quant: BaseQuant::Nf4DoubleQuant,
            } => {
                return Err(FederatedError::Unsupported(
                    "QLoRA with NF4: this trainer keeps the GGUF's own 4-bit blocks (GgufBlocks)"
                        .into(),
                ));
            }
        };
        let lora = LoraSpec {
            rank: a.rank as usize,
            alpha: a.alpha,
            rslora: a.rslora,
            dropout: a.dropout,
            targets: a.targets.iter().map(|t| t.hf_name().to_string()).collect(),
            seed: h.seed,
        };
        lora.validate()?;
        let train = TrainConfig {
            learning_rate: decimal(h.learning_rate),
            epochs: h.epochs as usize,
            batch_size: h.batch_size as usize,
            grad_accum: h.grad_accumulation as usize,
            warmup_steps: h.warmup_steps as usize,
            schedule: match h.schedule {
                LrSchedule::Constant => Schedule::Constant,
                LrSchedule::Linear => Schedule::Linear,
                LrSchedule::Cosine => Schedule::Cosine,
            },
            // Checkpoints keep the configuration as JSON, which has no infinity.
            max_grad_norm: if h.max_grad_norm == 0.0 {
                f64::MAX
            } else {
                decimal(h.max_grad_norm)
            },
            weight_decay: h.weight_decay,
            seed: h.seed,
            max_steps: None,
            lora_dropout: a.dropout,
        };
        train.validate()?;
        let merge = match spec.merge {
            JobMergeMethod::ExactTruncated => MergeMethod::ExactTruncated,
            JobMergeMethod::ExactFullRank => MergeMethod::ExactFullRank,
            JobMergeMethod::Ffa => MergeMethod::Ffa,
        };
        let mut setup = JobSetup {
            base: base.to_path_buf(),
            base_name: spec.base_model.to_string(),
            lora,
            train,
            seq_len: h.seq_len as usize,
            qlora,
            segment_steps: spec.verification.segment_steps as usize,
            merge,
            schema: None,
        };
        let opened = Base::open(&setup)?;
        setup.seq_len = setup.seq_len.min(opened.config.max_seq_len);
        Ok(setup)
    }

    /// The training configuration of a run with `seed`.
    pub fn train_config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            seed,
            ..self.train.clone()
        }
    }
}

/// The f64 that prints as `x` does: the decimal number a job shows, not `f64::from(x)`'s
/// binary expansion.
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// The base model, opened: the file, its shape, tokenizer and chat template.
struct Base {
    file: GgufFile,
    config: LlamaConfig,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    pad: u32,
}

impl Base {
    fn open(setup: &JobSetup) -> Result<Base, FederatedError> {
        let bad = |problem: String| FederatedError::Base {
            path: setup.base.clone(),
            problem,
        };
        let file = GgufFile::open(&setup.base).map_err(|e| bad(e.to_string()))?;
        let config = Weights::gguf(&file)
            .map_err(|e| bad(e.to_string()))?
            .config()
            .clone();
        let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| bad(e.to_string()))?;
        let template = ChatTemplate::from_gguf(&file).map_err(|e| bad(e.to_string()))?;
        let pad = tokenizer.pad().or(tokenizer.eos()).unwrap_or(0);
        Ok(Base {
            file,
            config,
            tokenizer,
            template,
            pad,
        })
    }

    fn examples(
        &self,
        setup: &JobSetup,
        records: &[String],
    ) -> Result<Vec<Example>, FederatedError> {
        records
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let bad = |problem: String| FederatedError::Record { index, problem };
                let schema = setup.schema.unwrap_or_else(|| detect_schema(text));
                let record = parse_record(schema, text, index + 1).map_err(bad)?;
                tokenize(&record, &self.tokenizer, &self.template, setup.seq_len)
                    .map_err(|e| bad(e.to_string()))
            })
            .collect()
    }

    /// The base model on `device` with fresh adapters (the job's spec) attached.
    fn model(&self, setup: &JobSetup, device: &Device) -> Result<Llama, FederatedError> {
        let bad = |problem: String| FederatedError::Base {
            path: setup.base.clone(),
            problem,
        };
        let weights = Weights::gguf(&self.file).map_err(|e| bad(e.to_string()))?;
        let kind = if setup.qlora {
            BaseWeights::Packed
        } else {
            BaseWeights::F32
        };
        let mut model = Llama::load(&weights, device, kind).map_err(|e| bad(e.to_string()))?;
        attach(&mut model, &setup.lora)?;
        Ok(model)
    }
}

/// A chat record has `messages`; anything else is read as alpaca.
fn detect_schema(text: &str) -> Schema {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) if v.get("messages").is_none() => Schema::Alpaca,
        _ => Schema::Chat,
    }
}

/// Tokenizes JSONL records (one JSON object each) for the job: validated in the job's schema,
/// rendered with the base model's chat template, cut to [`JobSetup::seq_len`]. One example per
/// record, in order (a run's batch commitments index into this list); an error names the first
/// bad record's position.
pub fn examples(setup: &JobSetup, records: &[String]) -> Result<Vec<Example>, FederatedError> {
    Base::open(setup)?.examples(setup, records)
}

/// The gemm kernel class, the backend and the thread count this process trains with: what must
/// be equal for a replay to reproduce a run bit for bit.
///
/// The kernel is the one gemm 0.19 picks at run time: `x86-v4` (AVX-512F; the workspace builds
/// burn-flex with its `x86-v4` feature), `x86-v3` (FMA, i.e. AVX2), `neon`, or `scalar`. The
/// threads are rayon's in the calling context (gemm parallelises through rayon).
pub fn kernel_class() -> KernelClass {
    KernelClass {
        backend: "flex".into(),
        kernel: cpu_kernel().into(),
        threads: u16::try_from(rayon::current_num_threads()).unwrap_or(u16::MAX),
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn cpu_kernel() -> &'static str {
    if std::arch::is_x86_feature_detected!("avx512f") {
        "x86-v4"
    } else if std::arch::is_x86_feature_detected!("fma") {
        "x86-v3"
    } else {
        "scalar"
    }
}

#[cfg(target_arch = "aarch64")]
fn cpu_kernel() -> &'static str {
    if std::arch::is_aarch64_feature_detected!("neon") {
        "neon"
    } else {
        "scalar"
    }
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_kernel() -> &'static str {
    "scalar"
}

/// A snapshot of the training state that [`train_update`] kept for auditors.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Optimizer steps done (0: the state before the first step).
    pub step: usize,
    /// Its [`state_hash`]: the run's start, or the commitment of the segment ending here.
    pub state: ContentHash,
    /// The snapshot directory (the checkpoint layout of [`crate::train`]); [`pack_dir`] makes
    /// it one blob, which [`replay`] takes back after [`unpack_dir`].
    pub dir: PathBuf,
}

/// What [`train_update`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalUpdate {
    /// The trained adapter, in PEFT's format (`out/adapter`).
    pub adapter_dir: PathBuf,
    /// Tokens processed: the input tokens (each example's length less one) of every example of
    /// every step.
    pub tokens: u64,
    /// Optimizer steps taken.
    pub steps: u32,
    /// The training loss of each step (mean over its micro-batches, nats per target token).
    pub losses: Vec<f32>,
    /// The commitments, one per segment, by increasing end step (the last at the last step).
    pub segments: Vec<Segment>,
    /// The snapshots at step 0 and at every segment's end, in step order (`out/snapshots`).
    pub snapshots: Vec<Snapshot>,
    /// Where it ran: an audit replays on the same kernel class.
    pub kernel: KernelClass,
}

/// The pieces of a run: the examples, the model with its starting adapter, its settings.
struct Prepared {
    base: Base,
    examples: Vec<Example>,
    model: Llama,
    spec: LoraSpec,
    cfg: TrainConfig,
}

/// [`prepare_on`] flex, where workers train.
fn prepare(
    setup: &JobSetup,
    start: Option<&Path>,
    records: &[String],
    seed: u64,
) -> Result<Prepared, FederatedError> {
    prepare_on(setup, start, records, seed, &Device::flex())
}

/// The pieces of a run, the model on `device` (made an autodiff device here).
fn prepare_on(
    setup: &JobSetup,
    start: Option<&Path>,
    records: &[String],
    seed: u64,
    device: &Device,
) -> Result<Prepared, FederatedError> {
    let base = Base::open(setup)?;
    let examples = base.examples(setup, records)?;
    let mut model = base.model(setup, &device.clone().autodiff())?;
    let spec = match start {
        Some(path) => {
            let w = load_start(setup, &base.config, path)?;
            w.apply(&mut model)?;
            w.spec
        }
        None => setup.lora.clone(),
    };
    Ok(Prepared {
        base,
        examples,
        model,
        spec,
        cfg: setup.train_config(seed),
    })
}

/// Trains one worker's update for a round.
///
/// Starts from `start` (the PEFT directory of the round's start adapter) or, without one, from
/// a fresh LoRA drawn from the job seed (`B = 0`); trains on `records` with the job's settings
/// and the training seed `seed`; commits to a [`Segment`] every [`JobSetup::segment_steps`]
/// optimizer steps and at the last step, exactly as [`crate::verify::train_segmented`] does.
/// Writes into `out` (created if needed): the adapter in `out/adapter` and the snapshots in
/// `out/snapshots/step-XXXXXXXX`.
///
/// `stop` is read before every optimizer step; once it is set the run ends with
/// [`FederatedError::Stopped`] (what it wrote under `out` is left for the caller to remove).
/// FFA jobs are refused: the training loop cannot freeze `A` yet.
pub fn train_update(
    setup: &JobSetup,
    start: Option<&Path>,
    records: &[String],
    seed: u64,
    out: &Path,
    stop: &AtomicBool,
) -> Result<LocalUpdate, FederatedError> {
    if setup.merge == MergeMethod::Ffa {
        return Err(FederatedError::Unsupported(
            "FFA training needs A frozen, which the training loop does not do yet".into(),
        ));
    }
    if setup.segment_steps == 0 {
        return Err(FederatedError::BadSetting {
            field: "segment_steps",
            reason: "must be at least 1".into(),
        });
    }
    let p = prepare(setup, start, records, seed)?;
    let snapshots_dir = out.join("snapshots");
    std::fs::create_dir_all(&snapshots_dir).map_err(|source| FederatedError::Io {
        path: snapshots_dir.clone(),
        source,
    })?;
    let every = setup.segment_steps;
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    let mut leaves = Vec::new();
    let mut tokens = 0u64;
    let mut failed: Option<VerifyError> = None;
    let mut stopped = false;
    let mut losses = Vec::new();
    let examples = &p.examples;
    let spec = &p.spec;
    let mut hook = |b: &Boundary<'_>| -> ControlFlow<()> {
        if stop.load(Ordering::Relaxed) {
            stopped = true;
            return ControlFlow::Break(());
        }
        let mut commit = || -> Result<(), VerifyError> {
            let first = b.batch.is_empty();
            if !first {
                leaves.push(batch_leaf(b.step, b.batch));
                tokens += b
                    .batch
                    .iter()
                    .map(|i| examples[*i].tokens.len().saturating_sub(1) as u64)
                    .sum::<u64>();
            }
            if first || b.step.is_multiple_of(every) || b.step == b.total {
                let state = state_hash(b.step, b.model, b.optim)?;
                let dir = snapshot_path(&snapshots_dir, b.step);
                b.save(&dir, spec)?;
                snapshots.push(Snapshot {
                    step: b.step,
                    state,
                    dir,
                });
                if !first {
                    segments.push(Segment {
                        end_step: b.step,
                        state,
                        batches: merkle_root(&leaves),
                    });
                    leaves.clear();
                }
            }
            Ok(())
        };
        match commit() {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    };
    let hooks = Hooks {
        start: None,
        stop_after: None,
        boundary: Some(&mut hook),
    };
    let model = run(p.model, examples, &p.cfg, p.base.pad, None, hooks, |e| {
        losses.push(e.loss as f32)
    })?;
    if stopped {
        return Err(FederatedError::Stopped);
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    let steps = segments.last().map_or(0, |s| s.end_step);
    let steps = u32::try_from(steps).map_err(|_| FederatedError::BadSetting {
        field: "hyper.epochs",
        reason: format!("{steps} optimizer steps do not fit a u32"),
    })?;
    let adapter_dir = out.join("adapter");
    AdapterWeights::from_model(&model, spec).save_peft(&adapter_dir, &setup.base_name)?;
    Ok(LocalUpdate {
        adapter_dir,
        tokens,
        steps,
        losses,
        segments,
        snapshots,
        kernel: kernel_class(),
    })
}

/// What [`replay`] recomputed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    /// The [`state_hash`] of the state the replay started from: must equal the previous
    /// segment's commitment (or the run's step-0 snapshot's).
    pub start: ContentHash,
    /// The recomputed commitment of the replayed steps: compare it with the committed one.
    pub segment: Segment,
}

/// Re-executes part of a worker's run for a spot check and returns what it recomputed.
///
/// `setup`, `start`, `records` and `seed` must be those of the run. With `snapshot` (a snapshot
/// directory of the run, at the step where the audited segment starts) the run continues from
/// it; without one it starts from the state [`train_update`] starts from (step 0). Either way it
/// stops after `end_step` optimizer steps. The segment's `batches` root covers the replayed
/// steps, so it equals a commitment when the replay spans exactly that segment.
pub fn replay(
    setup: &JobSetup,
    start: Option<&Path>,
    records: &[String],
    seed: u64,
    snapshot: Option<&Path>,
    end_step: u32,
) -> Result<Replay, FederatedError> {
    let p = prepare(setup, start, records, seed)?;
    let r = replay_from(
        p.model,
        &p.examples,
        &p.cfg,
        p.base.pad,
        snapshot,
        end_step as usize,
    )?;
    Ok(Replay {
        start: r.start,
        segment: r.segment,
    })
}

/// Where a spot check replays: a device, its kernel class, and the tolerance for segments
/// trained on another kernel class.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// The device the replay runs on (without autodiff; [`spot_check`] adds it).
    pub device: Device,
    /// Its kernel class: a worker of exactly this class is checked bit for bit.
    pub kernel: KernelClass,
    /// The largest [`StateDistance`] accepted from a worker of another class, for a segment
    /// that starts from a snapshot.
    pub tolerance: f64,
    /// The same for a run's first segment (from step 0, a fresh optimizer): looser
    /// ([`crate::verify::SPOT_CHECK_TOLERANCE_FIRST`]).
    pub first_tolerance: f64,
}

impl Verifier {
    /// This process on flex, where workers train: [`kernel_class`], the measured tolerances
    /// ([`crate::verify::spot_check_tolerance`]).
    pub fn local() -> Verifier {
        Verifier {
            device: Device::flex(),
            kernel: kernel_class(),
            tolerance: SPOT_CHECK_TOLERANCE,
            first_tolerance: SPOT_CHECK_TOLERANCE_FIRST,
        }
    }

    /// burn's ndarray backend (matrixmultiply's kernels): another CPU kernel class, for the
    /// tolerance path's measurements and tests.
    #[cfg(feature = "verify-ndarray")]
    #[allow(deprecated)] // burn 0.22 deprecates ndarray; it is kept here as a second class
    pub fn ndarray() -> Verifier {
        Verifier {
            device: Device::ndarray(),
            kernel: KernelClass {
                backend: "ndarray".into(),
                kernel: "matrixmultiply".into(),
                threads: u16::try_from(rayon::current_num_threads()).unwrap_or(u16::MAX),
            },
            tolerance: SPOT_CHECK_TOLERANCE,
            first_tolerance: SPOT_CHECK_TOLERANCE_FIRST,
        }
    }

    /// Whether a segment of a worker of class `worker` is checked bit for bit (the same kernel
    /// class, thread count included) rather than within the tolerance (which needs the
    /// worker's snapshot at the segment's end: [`Audit::end_snapshot`]).
    pub fn exact_for(&self, worker: &KernelClass) -> bool {
        *worker == self.kernel
    }
}

/// One audited segment of a worker's run, as its commit states it, with the snapshots the
/// worker gave for it.
#[derive(Debug, Clone, Copy)]
pub struct Audit<'a> {
    /// The committed segment: its end step, state hash and batch root.
    pub segment: Segment,
    /// The commitment the segment starts from: the previous segment's state (`None` for the
    /// first segment, which starts from the run's own start, rebuilt from the start adapter
    /// and the seed).
    pub start_state: Option<ContentHash>,
    /// The worker's snapshot at the segment's start (`None` for the first segment).
    pub start_snapshot: Option<&'a Path>,
    /// The worker's snapshot at the segment's end (the one whose hash is
    /// `segment.state`): needed when the worker's kernel class is not the verifier's.
    pub end_snapshot: Option<&'a Path>,
    /// The kernel class the worker's commit reports.
    pub worker: &'a KernelClass,
}

/// A segment that passed a spot check.
#[derive(Debug, Clone, PartialEq)]
pub enum SpotPass {
    /// The replay reproduced the committed state hash bit for bit.
    Reproduced,
    /// Another kernel class: the replay is this close to the worker's end state, within the
    /// tolerance.
    Within(StateDistance),
}

/// Why a segment failed a spot check: the worker's fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SpotMismatch {
    /// The start snapshot is not the state the previous commitment names.
    #[error("the start snapshot is not the committed state")]
    Start,
    /// The replayed steps used other examples than the committed batch root names.
    #[error("the replay used other batches than the commitment")]
    Batches,
    /// Same kernel class: the replay does not end on the committed state hash.
    #[error("the replay does not reproduce the committed state")]
    State,
    /// The end snapshot is not the state the segment's commitment names.
    #[error("the end snapshot is not the committed state")]
    EndSnapshot,
    /// Another kernel class: the replay is further from the worker's end state than the
    /// tolerance.
    #[error(
        "the replay is {:.3e} from the worker's end state (at {}), over the tolerance {tolerance:.1e}",
        distance.relative,
        distance.worst
    )]
    Distance {
        /// How far.
        distance: StateDistance,
        /// The tolerance it was held to.
        tolerance: f64,
    },
    /// A snapshot of the worker's cannot be used (unreadable, or made with other settings or
    /// data), or the replay from it failed.
    #[error("replay: {0}")]
    Replay(String),
}

/// Spot-checks one segment of a worker's run on `verifier`.
///
/// `setup`, `start`, `records` and `seed` are those of the run (as for [`replay`]). The segment
/// is re-run from its start snapshot (checked against `audit.start_state`) on the verifier's
/// device, and must use the committed batches. Then:
///
/// - when the worker's kernel class is the verifier's ([`Verifier::exact_for`]), the replay
///   must end on the committed state hash, bit for bit;
/// - otherwise the worker's end snapshot must hash to the committed state (so it is the state
///   the worker committed to), and the replayed state must be within the verifier's tolerance
///   of it by [`state_distance`], an error relative to the segment's update from the start
///   snapshot (`first_tolerance` for the run's first segment, from step 0; `tolerance`
///   otherwise). A replay that happens to reproduce the hash passes too.
///
/// The outer error means this peer could not check (its base model, the start adapter, the
/// records; or no end snapshot was given where one is needed): not the worker's fault. The
/// inner one is the verdict on the segment.
pub fn spot_check(
    setup: &JobSetup,
    start: Option<&Path>,
    records: &[String],
    seed: u64,
    audit: &Audit<'_>,
    verifier: &Verifier,
) -> Result<Result<SpotPass, SpotMismatch>, FederatedError> {
    let exact = verifier.exact_for(audit.worker);
    let end_snapshot = match (exact, audit.end_snapshot) {
        (true, _) => None,
        (false, Some(end)) => Some(end),
        (false, None) => {
            return Err(FederatedError::BadSetting {
                field: "end_snapshot",
                reason: format!(
                    "a worker of kernel class {:?} is checked on {:?} within a tolerance, \
                     which needs its snapshot at the segment's end",
                    audit.worker, verifier.kernel
                ),
            });
        }
    };
    let p = prepare_on(setup, start, records, seed, &verifier.device)?;
    let fresh = end_snapshot.map(|_| p.model.clone());
    let seg = audit.segment;
    let r = match replay_from(
        p.model,
        &p.examples,
        &p.cfg,
        p.base.pad,
        audit.start_snapshot,
        seg.end_step,
    ) {
        Ok(r) => r,
        Err(e) => return Ok(Err(SpotMismatch::Replay(e.to_string()))),
    };
    if audit.start_state.is_some_and(|s| r.start != s) {
        return Ok(Err(SpotMismatch::Start));
    }
    if r.segment.batches != seg.batches {
        return Ok(Err(SpotMismatch::Batches));
    }
    if r.segment.state == seg.state {
        return Ok(Ok(SpotPass::Reproduced));
    }
    let (Some(end), Some(model)) = (end_snapshot, fresh) else {
        return Ok(Err(SpotMismatch::State));
    };
    let claimed = match TrainState::load(model, &p.examples, &p.cfg, end) {
        Ok(s) => s,
        Err(e) => return Ok(Err(SpotMismatch::Replay(format!("end snapshot: {e}")))),
    };
    if claimed.hash() != seg.state {
        return Ok(Err(SpotMismatch::EndSnapshot));
    }
    let distance = state_distance(&r.start_state, &r.state, &claimed);
    let tolerance = if audit.start_snapshot.is_none() {
        verifier.first_tolerance
    } else {
        verifier.tolerance
    };
    Ok(if distance.within(tolerance) {
        Ok(SpotPass::Within(distance))
    } else {
        Err(SpotMismatch::Distance {
            distance,
            tolerance,
        })
    })
}

/// Reads a PEFT adapter directory and checks it against the job: the job's targets on every
/// layer and nothing else, rank `rank` (or, with `None`, any positive multiple of the job's
/// rank, as exact full-rank merges make), the job's scaling, every factor's shape, every value
/// finite. The returned spec carries the job's targets (in the job's order), seed and dropout.
fn load_checked(
    setup: &JobSetup,
    config: &LlamaConfig,
    dir: &Path,
    rank: Option<usize>,
) -> Result<AdapterWeights, UpdateDefect> {
    let mut w =
        AdapterWeights::load_peft(dir).map_err(|e| UpdateDefect::Unreadable(e.to_string()))?;
    let shape = |s: String| Err(UpdateDefect::Shape(s));
    let job = &setup.lora;
    let r = w.spec.rank;
    match rank {
        Some(want) if r != want => return shape(format!("rank {r}, the round's is {want}")),
        None if !r.is_multiple_of(job.rank) => {
            return shape(format!(
                "rank {r} is not a multiple of the job's {}",
                job.rank
            ));
        }
        _ => {}
    }
    if w.spec.rslora != job.rslora {
        return shape(format!(
            "use_rslora is {}, the job's {}",
            w.spec.rslora, job.rslora
        ));
    }
    let want_scaling = f64::from(job.scaling());
    let scaling = f64::from(w.spec.scaling());
    let same_scaling = if r == job.rank {
        w.spec.alpha == job.alpha
    } else {
        (scaling - want_scaling).abs() <= 1e-6 * want_scaling
    };
    if !same_scaling {
        return shape(format!(
            "lora_alpha {} at rank {r} scales by {scaling}, the job by {want_scaling}",
            w.spec.alpha
        ));
    }
    let targets = |spec: &LoraSpec| -> Result<BTreeSet<usize>, UpdateDefect> {
        Ok(spec
            .projections()
            .map_err(|e| UpdateDefect::Shape(e.to_string()))?
            .into_iter()
            .map(proj_index)
            .collect())
    };
    let (have, want) = (targets(&w.spec)?, targets(job)?);
    if have != want {
        return shape(format!(
            "target_modules {:?}, the job's {:?}",
            w.spec.targets, job.targets
        ));
    }
    let expected: BTreeSet<(usize, usize)> = (0..config.num_layers)
        .flat_map(|l| want.iter().map(move |p| (l, *p)))
        .collect();
    let name = |(l, p): (usize, usize)| format!("layer {l} {}", Proj::ALL[p].hf_name());
    if let Some(missing) = expected.iter().find(|k| !w.factors.contains_key(k)) {
        return shape(format!("{} has no factors", name(*missing)));
    }
    if let Some(extra) = w.factors.keys().find(|k| !expected.contains(k)) {
        return shape(format!("{} is not adapted by the job", name(*extra)));
    }
    for (&key, f) in &w.factors {
        let (d_out, d_in) = Proj::ALL[key.1].shape(config);
        if (f.d_out, f.d_in) != (d_out, d_in) || f.a.len() != r * d_in || f.b.len() != d_out * r {
            return shape(format!(
                "{}: A [{r}, {}] and B [{}, {r}] on a [{d_out}, {d_in}] weight",
                name(key),
                f.d_in,
                f.d_out
            ));
        }
        for (which, values) in [('A', &f.a), ('B', &f.b)] {
            if let Some(i) = values.iter().position(|x| !x.is_finite()) {
                return Err(UpdateDefect::NonFinite(format!(
                    "{} lora_{which} element {i} is {}",
                    name(key),
                    values[i]
                )));
            }
        }
    }
    w.spec.targets = job.targets.clone();
    w.spec.seed = job.seed;
    w.spec.dropout = job.dropout;
    Ok(w)
}

/// The round's start adapter, checked against the job.
fn load_start(
    setup: &JobSetup,
    config: &LlamaConfig,
    path: &Path,
) -> Result<AdapterWeights, FederatedError> {
    load_checked(setup, config, path, None).map_err(|defect| FederatedError::BadStart {
        path: path.to_path_buf(),
        defect,
    })
}

fn proj_index(p: Proj) -> usize {
    Proj::ALL.iter().position(|q| *q == p).unwrap_or(0)
}

/// One projection's factors as a [`LowRank`] in f64, `B` multiplied by `scale` (the LoRA
/// scaling, or a merge weight times it).
fn low_rank(f: &Factors, scale: f64) -> Result<LowRank, FederatedError> {
    let rank = f.a.len().checked_div(f.d_in).unwrap_or(0);
    Ok(LowRank::new(
        f.d_out,
        f.d_in,
        rank,
        f.b.iter().map(|x| scale * f64::from(*x)).collect(),
        f.a.iter().map(|x| f64::from(*x)).collect(),
    )?)
}

/// `‖Σ_t B_t A_t‖_F²` from the terms' (cross-)Gram matrices ([`crate::merge::delta_inner`]),
/// clamped at 0 against cancellation.
fn combination_sq(terms: &[LowRank]) -> Result<f64, FederatedError> {
    let mut sq = 0f64;
    for (t, x) in terms.iter().enumerate() {
        sq += delta_norm_sq(x);
        for y in &terms[t + 1..] {
            sq += 2.0 * delta_inner(x, y)?;
        }
    }
    Ok(if sq < 0.0 { 0.0 } else { sq })
}

/// `‖s(B·A) − s0(B0·A0)‖_F` over all projections: how far `update` moved from `start` in
/// product space, LoRA scalings included (`start = None`: a fresh adapter, `B0 = 0`).
fn delta_norm(
    update: &AdapterWeights,
    start: Option<&AdapterWeights>,
) -> Result<f64, FederatedError> {
    let s = f64::from(update.spec.scaling());
    let mut sq = 0f64;
    for (key, f) in &update.factors {
        let u = low_rank(f, s)?;
        sq += match start.and_then(|w| Some((w.factors.get(key)?, w.spec.scaling()))) {
            Some((f0, s0)) => delta_dist_sq(&u, &low_rank(f0, f64::from(s0))?)?,
            None => delta_norm_sq(&u),
        };
    }
    Ok(sq.sqrt())
}

/// Checks a worker's update (a PEFT directory) against the job and the round's start adapter,
/// and returns `‖ΔW‖_F`: the Frobenius norm over all projections of `s·(B·A − B0·A0)`, the
/// update's product less the start's, LoRA scaling `s` included, computed from `r x r` Gram
/// matrices (never a `d x n` product). This is what the round's norm bound compares.
///
/// The outer error means this peer could not check (its base model or the start adapter is
/// unusable): not the worker's fault. The inner one is the verdict on the update: its layout
/// must be the start adapter's (the job's targets on every layer and nothing more, the start's
/// rank, or the job's without a start, the job's scaling, every factor's shape), and every value
/// finite.
pub fn check_update(
    setup: &JobSetup,
    start: Option<&Path>,
    update: &Path,
) -> Result<Result<f64, UpdateDefect>, FederatedError> {
    let base = Base::open(setup)?;
    let start = start
        .map(|p| load_start(setup, &base.config, p))
        .transpose()?;
    let rank = start.as_ref().map_or(setup.lora.rank, |w| w.spec.rank);
    let w = match load_checked(setup, &base.config, update, Some(rank)) {
        Ok(w) => w,
        Err(defect) => return Ok(Err(defect)),
    };
    let norm = delta_norm(&w, start.as_ref())?;
    if !norm.is_finite() {
        return Ok(Err(UpdateDefect::NonFinite(format!(
            "the delta's norm is {norm}"
        ))));
    }
    Ok(Ok(norm))
}

/// The pairwise squared distances of updates' deltas, for a round's Byzantine-robust filter
/// (Multi-Krum): entry `(i, j)` of the row-major `m x m` result is
/// `‖s_i B_i A_i − s_j B_j A_j‖²_F` summed over every projection, each adapter's LoRA scaling
/// `s` included. The round's start cancels out of a difference of deltas
/// (`(U_i − S) − (U_j − S) = U_i − U_j`), so it is not needed. Computed from `r x r`
/// (cross-)Gram matrices ([`crate::merge::delta_inner`]), never a `d x n` product; the ranks may
/// differ. The matrix is exactly symmetric with a zero diagonal.
///
/// Every update must adapt the same projections with the same shapes.
pub fn delta_distances(updates: &[&AdapterWeights]) -> Result<Vec<f64>, FederatedError> {
    let m = updates.len();
    let Some(first) = updates.first() else {
        return Ok(Vec::new());
    };
    let keys: Vec<(usize, usize)> = first.factors.keys().copied().collect();
    // Each update's projections as scaled low-rank products, in the order of `keys`.
    let mut terms: Vec<Vec<LowRank>> = Vec::with_capacity(m);
    for (index, u) in updates.iter().enumerate() {
        if u.factors.len() != keys.len() {
            return Err(MergeError::Shape(format!(
                "update {index} adapts {} projections, update 0 {}",
                u.factors.len(),
                keys.len()
            ))
            .into());
        }
        let s = f64::from(u.spec.scaling());
        let mut row = Vec::with_capacity(keys.len());
        for key in &keys {
            let f = u.factors.get(key).ok_or_else(|| {
                MergeError::Shape(format!(
                    "update {index} has no layer {} {}",
                    key.0,
                    Proj::ALL[key.1].hf_name()
                ))
            })?;
            row.push(low_rank(f, s)?);
        }
        terms.push(row);
    }
    let norms: Vec<Vec<f64>> = terms
        .iter()
        .map(|row| row.iter().map(delta_norm_sq).collect())
        .collect();
    let mut dist = vec![0f64; m * m];
    for i in 0..m {
        for j in i + 1..m {
            let mut sq = 0f64;
            for (t, (x, y)) in terms[i].iter().zip(&terms[j]).enumerate() {
                let d = norms[i][t] + norms[j][t] - 2.0 * delta_inner(x, y)?;
                // Rounding can take a squared distance a hair below zero.
                sq += if d < 0.0 { 0.0 } else { d };
            }
            dist[i * m + j] = sq;
            dist[j * m + i] = sq;
        }
    }
    Ok(dist)
}

/// [`delta_distances`] of PEFT adapter directories (a round's verified updates), each checked
/// against the job as [`merge_round`] checks its updates (its rank may be any multiple of the
/// job's).
pub fn update_distances(setup: &JobSetup, updates: &[PathBuf]) -> Result<Vec<f64>, FederatedError> {
    let base = Base::open(setup)?;
    let loaded: Vec<AdapterWeights> = updates
        .iter()
        .enumerate()
        .map(|(index, path)| {
            load_checked(setup, &base.config, path, None).map_err(|defect| {
                FederatedError::BadUpdate {
                    index,
                    path: path.clone(),
                    defect,
                }
            })
        })
        .collect::<Result<_, _>>()?;
    delta_distances(&loaded.iter().collect::<Vec<_>>())
}

/// The relative product-space error of `merged` against the exact weighted sum of `parts`:
/// `‖Σ p_i s_i B_i A_i − s B A‖_F / ‖Σ p_i s_i B_i A_i‖_F` over all projections (weights
/// normalised to sum 1, each adapter's LoRA scaling `s` included), from Gram matrices. Zero for
/// an exact merge; the relative Eckart–Young truncation error for a truncated one.
pub fn merge_error(
    parts: &[(f64, &AdapterWeights)],
    merged: &AdapterWeights,
) -> Result<f64, FederatedError> {
    let total: f64 = parts.iter().map(|(w, _)| *w).sum();
    for (index, (weight, _)) in parts.iter().enumerate() {
        if !(weight.is_finite() && *weight > 0.0) {
            return Err(FederatedError::BadWeight {
                index,
                weight: *weight,
            });
        }
    }
    let (mut err, mut norm) = (0f64, 0f64);
    for (key, m) in &merged.factors {
        let mut terms = Vec::with_capacity(parts.len() + 1);
        for (index, (w, a)) in parts.iter().enumerate() {
            let f = a.factors.get(key).ok_or_else(|| {
                MergeError::Shape(format!(
                    "part {index} has no layer {} {}",
                    key.0,
                    Proj::ALL[key.1].hf_name()
                ))
            })?;
            terms.push(low_rank(f, w / total * f64::from(a.spec.scaling()))?);
        }
        norm += combination_sq(&terms)?;
        terms.push(low_rank(m, -f64::from(merged.spec.scaling()))?);
        err += combination_sq(&terms)?;
    }
    Ok(if norm > 0.0 { (err / norm).sqrt() } else { 0.0 })
}

/// Mean loss per target token of `model` over `examples`, in batches of `batch` (in order).
fn mean_loss(
    model: &Llama,
    examples: &[Example],
    batch: usize,
    pad: u32,
    device: &Device,
) -> Result<f32, FederatedError> {
    let usable: Vec<&Example> = examples.iter().filter(|e| e.target_count() > 0).collect();
    if usable.is_empty() {
        return Err(FederatedError::NothingToEvaluate);
    }
    let (mut nll, mut count) = (0f64, 0f64);
    for chunk in usable.chunks(batch.max(1)) {
        let b = Batch::pad(chunk, pad);
        let n = b.target_tokens() as f64;
        let loss = masked_loss(model, &b, device).into_scalar::<f32>();
        nll += f64::from(loss) * n;
        count += n;
    }
    let loss = (nll / count) as f32;
    if !loss.is_finite() {
        return Err(FederatedError::NonFiniteLoss(loss));
    }
    Ok(loss)
}

/// Evaluates adapters on one set of examples with one base model (adapters swapped in place).
struct Evaluator {
    model: Llama,
    examples: Vec<Example>,
    batch: usize,
    pad: u32,
    device: Device,
    count: usize,
}

impl Evaluator {
    fn new(setup: &JobSetup, base: &Base, records: &[String]) -> Result<Evaluator, FederatedError> {
        let device = Device::flex();
        Ok(Evaluator {
            model: base.model(setup, &device)?,
            examples: base.examples(setup, records)?,
            batch: setup.train.batch_size,
            pad: base.pad,
            device,
            count: 0,
        })
    }

    fn loss(&mut self, adapter: &AdapterWeights) -> Result<f32, FederatedError> {
        adapter.apply(&mut self.model)?;
        self.count += 1;
        mean_loss(
            &self.model,
            &self.examples,
            self.batch,
            self.pad,
            &self.device,
        )
    }
}

/// The mean loss per target token (nats) of the base model with `adapter` (a PEFT directory
/// with the job's layout; `None`: the base alone, which is also a fresh adapter's loss) on the
/// assistant tokens of `records`, in batches of the job's batch size.
pub fn evaluate(
    setup: &JobSetup,
    adapter: Option<&Path>,
    records: &[String],
) -> Result<f32, FederatedError> {
    let base = Base::open(setup)?;
    let mut eval = Evaluator::new(setup, &base, records)?;
    match adapter {
        Some(path) => {
            let w = load_checked(setup, &base.config, path, None).map_err(|defect| {
                FederatedError::BadAdapter {
                    path: path.to_path_buf(),
                    defect,
                }
            })?;
            eval.loss(&w)
        }
        None => {
            let fresh = AdapterWeights::from_model(&eval.model, &setup.lora);
            eval.loss(&fresh)
        }
    }
}

/// What [`merge_round`] produced and measured.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundMerge {
    /// The merged adapter, in PEFT's format (`out`); the start adapter when there was no update.
    pub adapter_dir: PathBuf,
    /// Relative product-space error of the written merge against the exact weighted sum
    /// ([`merge_error`]): the Eckart–Young truncation error; 0 when kept exact.
    pub truncation_error: f32,
    /// Validation loss of the start adapter.
    pub loss_before: f32,
    /// Validation loss of the merged adapter.
    pub loss_after: f32,
    /// The Shapley value of each update, in the order given, in nats of validation-loss
    /// improvement; they sum to `loss_before - loss_after` (GTG sampling gives all zeros when
    /// that gain is under a micro-nat).
    pub values: Vec<f64>,
    /// Models evaluated on the validation set, the start and the merge included.
    pub evaluations: usize,
    /// Whether the values are exact (all coalitions) rather than GTG-sampled.
    pub exact_shapley: bool,
}

/// Merges a round's verified updates and values each one.
///
/// `updates` are PEFT directories with their merge weights (normalised here to sum 1; each
/// must be positive). The merge is `start + Σ w_i (U_i − start)` in product space per
/// projection, which with `Σ w_i = 1` is `Σ w_i B_i A_i`, re-factored by the job's method:
/// truncated to the job's rank by SVD ([`crate::merge::exact`]), kept exactly at rank `k·r`
/// (PEFT holds any rank; the adapter's alpha is raised to keep the scaling, and the next round
/// trains at that rank), or FFA ([`crate::merge::ffa`], which needs every update to share `A`).
/// It is written as a PEFT directory into `out`.
///
/// Shapley values over the updates: a coalition `S`'s model is the same merge of its members
/// alone, each weighted `w_i / Σ_{j∈S} w_j` (the empty coalition's is the start), and
/// `v(S) = loss(start) − loss(S)` on `validation`. Exact for up to [`EXACT_SHAPLEY_MAX`]
/// updates, otherwise GTG-Shapley seeded by `seed`; every coalition's model is evaluated once.
pub fn merge_round(
    setup: &JobSetup,
    start: Option<&Path>,
    updates: &[(f64, PathBuf)],
    validation: &[String],
    seed: u64,
    out: &Path,
) -> Result<RoundMerge, FederatedError> {
    let base = Base::open(setup)?;
    let mut eval = Evaluator::new(setup, &base, validation)?;
    let start_w = match start {
        Some(path) => load_start(setup, &base.config, path)?,
        None => AdapterWeights::from_model(&eval.model, &setup.lora),
    };
    let total: f64 = updates.iter().map(|(w, _)| *w).sum();
    for (index, (weight, _)) in updates.iter().enumerate() {
        if !(weight.is_finite() && *weight > 0.0) {
            return Err(FederatedError::BadWeight {
                index,
                weight: *weight,
            });
        }
    }
    let weights: Vec<f64> = updates.iter().map(|(w, _)| w / total).collect();
    let loaded: Vec<AdapterWeights> = updates
        .iter()
        .enumerate()
        .map(|(index, (_, path))| {
            load_checked(setup, &base.config, path, Some(start_w.spec.rank)).map_err(|defect| {
                FederatedError::BadUpdate {
                    index,
                    path: path.clone(),
                    defect,
                }
            })
        })
        .collect::<Result<_, _>>()?;
    let loss_before = eval.loss(&start_w)?;
    if updates.is_empty() {
        start_w.save_peft(out, &setup.base_name)?;
        return Ok(RoundMerge {
            adapter_dir: out.to_path_buf(),
            truncation_error: 0.0,
            loss_before,
            loss_after: loss_before,
            values: Vec::new(),
            evaluations: eval.count,
            exact_shapley: true,
        });
    }
    let merge_of = |members: &[usize]| -> Result<AdapterWeights, FederatedError> {
        let parts: Vec<(f64, &AdapterWeights)> =
            members.iter().map(|i| (weights[*i], &loaded[*i])).collect();
        Ok(crate::adapter::merge_adapters(&parts, setup.merge)?.0)
    };
    let all: Vec<usize> = (0..updates.len()).collect();
    let merged = merge_of(&all)?;
    let parts: Vec<(f64, &AdapterWeights)> = weights.iter().copied().zip(&loaded).collect();
    let truncation_error = merge_error(&parts, &merged)? as f32;
    merged.save_peft(out, &setup.base_name)?;
    let loss_after = eval.loss(&merged)?;

    let before = f64::from(loss_before);
    let mut memo: HashMap<Vec<usize>, f64> = HashMap::new();
    memo.insert(Vec::new(), 0.0);
    memo.insert(all, before - f64::from(loss_after));
    let mut failed: Option<FederatedError> = None;
    let value = |members: &[usize]| -> f64 {
        if let Some(v) = memo.get(members) {
            return *v;
        }
        if failed.is_some() {
            return f64::NAN;
        }
        match merge_of(members).and_then(|w| eval.loss(&w)) {
            Ok(loss) => {
                let v = before - f64::from(loss);
                memo.insert(members.to_vec(), v);
                v
            }
            Err(e) => {
                failed = Some(e);
                f64::NAN
            }
        }
    };
    let config = AttributionConfig {
        exact_max_players: EXACT_SHAPLEY_MAX,
        gtg: GtgConfig::default(),
    };
    let attribution = attribute(updates.len(), value, &config, seed);
    if let Some(e) = failed {
        return Err(e);
    }
    let attribution = attribution?;
    Ok(RoundMerge {
        adapter_dir: out.to_path_buf(),
        truncation_error,
        loss_before,
        loss_after,
        values: attribution.values,
        evaluations: eval.count,
        exact_shapley: attribution.method == Method::Exact,
    })
}

// ---------------------------------------------------------------------------------------------
// Bundles
// ---------------------------------------------------------------------------------------------

/// Checks a bundle entry's name: relative, `/`-separated, no empty, `.` or `..` component, no
/// backslash or NUL, at most [`MAX_BUNDLE_NAME_BYTES`].
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_BUNDLE_NAME_BYTES {
        return Err(format!("file name of {} bytes", name.len()));
    }
    if name.contains('\\') || name.contains('\0') {
        return Err(format!("file name {name:?} holds a backslash or NUL"));
    }
    if name.starts_with('/') {
        return Err(format!("file name {name:?} is absolute"));
    }
    if name
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "file name {name:?} has an empty, . or .. component"
        ));
    }
    Ok(())
}

/// Every regular file under `dir`, by its relative `/`-separated name.
fn collect_files(
    dir: &Path,
    prefix: &str,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), FederatedError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FederatedError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        let name = entry.file_name().into_string().map_err(|n| {
            FederatedError::Bundle(format!("file name {n:?} in {} is not UTF-8", dir.display()))
        })?;
        let name = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if kind.is_dir() {
            collect_files(&path, &name, out)?;
        } else if kind.is_file() {
            out.push((name, path));
        } else {
            return Err(FederatedError::Bundle(format!(
                "{} is neither a file nor a directory",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Packs the regular files under `dir` (recursively) into one bundle, so that a PEFT or a
/// snapshot directory travels as one blob whose BLAKE3 is its hash. The same files give the
/// same bytes.
///
/// Format `cohort-bundle/v1`, integers `u64` little-endian:
///
/// 1. the 16 bytes [`BUNDLE_MAGIC`] (`cohort-bundle/v1`);
/// 2. the number of files;
/// 3. per file, by name in ascending byte order (names unique): the name's length, the name
///    (UTF-8, relative to `dir`, components joined by `/`), the contents' length, the contents.
///
/// Nothing follows the last file. Empty directories are not kept; symbolic links and other
/// special files are refused, and so is a bundle over [`MAX_BUNDLE_BYTES`].
pub fn pack_dir(dir: &Path) -> Result<Vec<u8>, FederatedError> {
    let mut files = Vec::new();
    collect_files(dir, "", &mut files)?;
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut size = (BUNDLE_MAGIC.len() + 8) as u64;
    for (name, path) in &files {
        check_name(name).map_err(FederatedError::Bundle)?;
        let len = std::fs::metadata(path)
            .map_err(|source| FederatedError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        size += 16 + name.len() as u64 + len;
    }
    if size > MAX_BUNDLE_BYTES {
        return Err(FederatedError::Bundle(format!(
            "{} would make a bundle of {size} bytes, over {MAX_BUNDLE_BYTES}",
            dir.display()
        )));
    }
    let mut out = Vec::with_capacity(size as usize);
    out.extend_from_slice(BUNDLE_MAGIC);
    out.extend_from_slice(&(files.len() as u64).to_le_bytes());
    for (name, path) in &files {
        let bytes = std::fs::read(path).map_err(|source| FederatedError::Io {
            path: path.clone(),
            source,
        })?;
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    if out.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(FederatedError::Bundle(format!(
            "{} grew past {MAX_BUNDLE_BYTES} bytes while it was read",
            dir.display()
        )));
    }
    Ok(out)
}

/// Reads a bundle's entries, checking all of it before anything is written.
fn parse_bundle(bytes: &[u8]) -> Result<Vec<(&str, &[u8])>, String> {
    if bytes.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(format!("{} bytes, over {MAX_BUNDLE_BYTES}", bytes.len()));
    }
    let rest = bytes
        .strip_prefix(BUNDLE_MAGIC.as_slice())
        .ok_or("it does not start with cohort-bundle/v1")?;
    let mut at = 0usize;
    let mut take = |n: u64, what: &str| -> Result<&[u8], String> {
        let left = rest.len() - at;
        if n > left as u64 {
            return Err(format!(
                "{what} of {n} bytes at offset {} runs past the end",
                at + BUNDLE_MAGIC.len()
            ));
        }
        let out = &rest[at..at + n as usize];
        at += n as usize;
        Ok(out)
    };
    let u64_at = |b: &[u8]| -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(b);
        u64::from_le_bytes(word)
    };
    let count = u64_at(take(8, "the file count")?);
    let mut entries: Vec<(&str, &[u8])> = Vec::new();
    for i in 0..count {
        let name_len = u64_at(take(8, "a name length")?);
        if name_len > MAX_BUNDLE_NAME_BYTES as u64 {
            return Err(format!("file {i}: a name of {name_len} bytes"));
        }
        let name = std::str::from_utf8(take(name_len, "a name")?)
            .map_err(|_| format!("file {i}: the name is not UTF-8"))?;
        check_name(name).map_err(|e| format!("file {i}: {e}"))?;
        if let Some((previous, _)) = entries.last()
            && *previous >= name
        {
            return Err(format!(
                "file {i}: {name:?} after {previous:?}: names must be unique and ascending"
            ));
        }
        let len = u64_at(take(8, "a content length")?);
        let contents = take(len, "file contents")?;
        entries.push((name, contents));
    }
    let end = at;
    if end != rest.len() {
        return Err(format!("{} bytes follow the last file", rest.len() - end));
    }
    Ok(entries)
}

/// Unpacks a bundle made by [`pack_dir`] into `dest` (created; if it exists it must be an empty
/// directory). The whole bundle is checked first: the magic, names (relative, no `..`, no
/// absolute path, unique and ascending, which makes the encoding of a directory unique), lengths
/// within the bytes, no trailing bytes, at most [`MAX_BUNDLE_BYTES`]. Nothing is written unless
/// it all holds.
pub fn unpack_dir(bytes: &[u8], dest: &Path) -> Result<(), FederatedError> {
    let entries = parse_bundle(bytes).map_err(FederatedError::Bundle)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FederatedError::Io { path, source }
    };
    if dest.exists() {
        let mut listing = std::fs::read_dir(dest).map_err(io(dest))?;
        if listing.next().is_some() {
            return Err(FederatedError::Bundle(format!(
                "{} is not empty",
                dest.display()
            )));
        }
    }
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    for (name, contents) in entries {
        let path = name.split('/').fold(dest.to_path_buf(), |p, c| p.join(c));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(&path))?;
        std::io::Write::write_all(&mut file, contents).map_err(io(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A small deterministic generator of values in [-1, 1).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Two projections: (layer 0, q) `[6, 5]` and (layer 1, v) `[4, 5]`.
    const SHAPES: [((usize, usize), usize, usize); 2] = [((0, 0), 6, 5), ((1, 2), 4, 5)];

    fn adapter(seed: u64, rank: usize, alpha: f32) -> AdapterWeights {
        let mut g = Lcg(seed);
        let factors = SHAPES
            .iter()
            .map(|&(key, d_out, d_in)| {
                let a = (0..rank * d_in).map(|_| g.next()).collect();
                let b = (0..d_out * rank).map(|_| g.next()).collect();
                (key, Factors { a, b, d_in, d_out })
            })
            .collect::<BTreeMap<_, _>>();
        AdapterWeights {
            spec: LoraSpec {
                rank,
                alpha,
                ..LoraSpec::default()
            },
            factors,
        }
    }

    /// `s·B·A` of every projection, formed densely with plain loops, concatenated.
    fn dense(w: &AdapterWeights) -> Vec<f64> {
        let s = f64::from(w.spec.scaling());
        let r = w.spec.rank;
        let mut out = Vec::new();
        for f in w.factors.values() {
            for i in 0..f.d_out {
                for j in 0..f.d_in {
                    let mut x = 0f64;
                    for t in 0..r {
                        x += f64::from(f.b[i * r + t]) * f64::from(f.a[t * f.d_in + j]);
                    }
                    out.push(s * x);
                }
            }
        }
        out
    }

    #[test]
    fn delta_distances_match_dense_frobenius_distances() {
        // Ranks and scalings differ (a full-rank merge has twice the job's rank), one update is
        // another scaled, and one is a copy: distances 0 and exact.
        let mut ws = vec![
            adapter(1, 2, 4.0),
            adapter(2, 2, 4.0),
            adapter(3, 4, 8.0),
            adapter(4, 2, 1.0),
        ];
        ws.push(ws[1].clone());
        let mut scaled = ws[0].clone();
        scaled.spec.alpha *= 3.0;
        ws.push(scaled);
        let refs: Vec<&AdapterWeights> = ws.iter().collect();
        let m = refs.len();
        let dist = delta_distances(&refs).unwrap();
        assert_eq!(dist.len(), m * m);
        let dense: Vec<Vec<f64>> = ws.iter().map(dense).collect();
        for i in 0..m {
            assert_eq!(dist[i * m + i], 0.0);
            for j in 0..m {
                assert_eq!(dist[i * m + j], dist[j * m + i]);
                let want: f64 = dense[i]
                    .iter()
                    .zip(&dense[j])
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum();
                let scale: f64 = dense[i].iter().chain(&dense[j]).map(|x| x * x).sum();
                let got = dist[i * m + j];
                assert!(
                    (got - want).abs() <= 1e-12 * scale,
                    "({i}, {j}): {got} vs dense {want}"
                );
            }
        }
        assert!(dist[m + 4] <= 1e-12 * dense[1].iter().map(|x| x * x).sum::<f64>());
        // The scaled copy is 2x update 0 away from it: ‖3U − U‖² = 4‖U‖².
        let norm0: f64 = dense[0].iter().map(|x| x * x).sum();
        assert!((dist[5] - 4.0 * norm0).abs() <= 1e-12 * norm0);
        assert!(delta_distances(&[]).unwrap().is_empty());
    }

    #[test]
    fn delta_distances_refuse_updates_of_other_projections() {
        let a = adapter(1, 2, 4.0);
        let mut b = adapter(2, 2, 4.0);
        let f = b.factors.remove(&(1, 2)).unwrap();
        b.factors.insert((1, 3), f);
        assert!(matches!(
            delta_distances(&[&a, &b]),
            Err(FederatedError::Merge(MergeError::Shape(_)))
        ));
        b.factors.remove(&(1, 3));
        assert!(delta_distances(&[&a, &b]).is_err());
    }
}
