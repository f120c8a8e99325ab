//! The LoRA training loop: masked next-token loss, AdamW with warmup and cosine or linear decay,
//! global gradient-norm clipping, gradient accumulation, epochs over seeded shuffles.
//!
//! The model is the burn [`Llama`] built on an autodiff device with adapters attached
//! ([`crate::adapter::attach`]); only the adapters have gradients. Each optimizer step consumes
//! `grad_accum` micro-batches of `batch_size` examples (padded, loss masked to assistant tokens),
//! averages their gradients, clips their global L2 norm to `max_grad_norm`, and steps AdamW at the
//! scheduled learning rate. The order of examples comes from SplitMix64 seeded by the
//! configuration's seed, so the same seed, data and thread count give the same adapter bits on
//! the CPU.
//!
//! [`crate::verify`] drives this same loop through crate-private hooks: start from a snapshot (the
//! checkpoint layout), stop after a given step, and look at the model and optimizer between steps.

use std::ops::ControlFlow;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use cohort_protocol::rng::SplitMix64;

use crate::adapter::LoraSpec;
use crate::data::{Batch, Example};
use crate::model::weights::Proj;
use crate::model::{Llama, LoraDropout};

/// How the learning rate moves after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Training settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub max_grad_norm: f64,
    pub weight_decay: f32,
    pub seed: u64,
    /// Stop after this many optimizer steps (all epochs when `None`).
    pub max_steps: Option<usize>,
    /// LoRA dropout probability on the adapters' inputs (PEFT's `lora_dropout`).
    #[serde(default)]
    pub lora_dropout: f32,
}

/// Where and how often [`train_with`] saves a checkpoint, and whether it starts from one.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    /// The checkpoint lives in `dir/checkpoint` (replaced atomically each time).
    pub dir: std::path::PathBuf,
    /// Save after every this many optimizer steps.
    pub every: usize,
    /// Continue from `dir/checkpoint` if it exists.
    pub resume: bool,
    /// The adapter layout (saved with the factors).
    pub spec: crate::adapter::LoraSpec,
}

/// What a checkpoint records besides the adapter and the optimizer state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct CheckpointState {
    step: usize,
    epoch: usize,
    /// Optimizer-step groups of `epoch` already done.
    group: usize,
    config: TrainConfig,
    examples: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            learning_rate: 2e-4,
            epochs: 1,
            batch_size: 4,
            grad_accum: 1,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            seed: 0,
            max_steps: None,
            lora_dropout: 0.0,
        }
    }
}

/// Progress, reported after every optimizer step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepEvent {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    /// Mean masked loss over the step's micro-batches (nats per target token).
    pub loss: f64,
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens in this step.
    pub target_tokens: usize,
    /// All tokens (inputs, padding excluded) per second over this step.
    pub tokens_per_s: f64,
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error("bad training setting {field}: {reason}")]
    BadConfig { field: &'static str, reason: String },
    #[error("no example has a token to learn")]
    NothingToLearn,
    #[error("the loss became {0} at step {1}: lower the learning rate")]
    Diverged(f64, usize),
    #[error("checkpoint {}: {problem}", path.display())]
    Checkpoint {
        path: std::path::PathBuf,
        problem: String,
    },
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field, reason: String| Err(TrainError::BadConfig { field, reason });
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("{} is not a positive number", self.learning_rate),
            );
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("{} is not in [0, 1)", self.lora_dropout),
            );
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            return bad(
                "max_grad_norm",
                format!("{} is not positive", self.max_grad_norm),
            );
        }
        Ok(())
    }

    /// Optimizer steps for `examples` examples.
    pub fn total_steps(&self, examples: usize) -> usize {
        let per_epoch = examples.div_ceil(self.batch_size * self.grad_accum).max(1);
        let all = per_epoch * self.epochs;
        self.max_steps.map_or(all, |m| m.min(all))
    }

    /// The learning rate at optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.learning_rate,
            Schedule::Linear => self.learning_rate * (1.0 - t),
            Schedule::Cosine => self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}

/// Mean negative log-likelihood of `batch`'s weighted targets under `model` (a scalar tensor).
pub fn masked_loss(model: &Llama, batch: &Batch, device: &Device) -> Tensor<1> {
    masked_loss_with(model, batch, device, None)
}

/// [`masked_loss`] with LoRA dropout (training).
pub fn masked_loss_with(
    model: &Llama,
    batch: &Batch,
    device: &Device,
    drop: Option<&mut LoraDropout>,
) -> Tensor<1> {
    let inputs: Vec<i64> = batch.inputs.iter().map(|t| i64::from(*t)).collect();
    let targets: Vec<i64> = batch.targets.iter().map(|t| i64::from(*t)).collect();
    let (b, t) = (batch.batch, batch.len);
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(inputs, [b, t]), device);
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, t, 1]), device);
    let weights = Tensor::<2>::from_data(
        TensorData::new(batch.weights.clone(), [b, t]),
        (device, DType::F32),
    );
    let count = batch.weights.iter().sum::<f32>().max(1.0);
    // A sequence longer than the context is a caller error; the batcher cuts to the context.
    let logits = match model.forward_train(inputs, None, drop) {
        Ok(l) => l,
        Err(e) => panic!("masked_loss: {e}"),
    };
    let logp = log_softmax(logits, 2).gather(2, targets).reshape([b, t]);
    (logp * weights).sum().neg().div_scalar(count)
}

/// Trains the adapters of `model` (on an autodiff device) on `examples`; `on_step` sees every
/// optimizer step. Returns the trained model.
pub fn train(
    model: Llama,
    examples: &[Example],
    cfg: &TrainConfig,
    pad: u32,
    on_step: impl FnMut(&StepEvent),
) -> Result<Llama, TrainError> {
    train_with(model, examples, cfg, pad, None, on_step)
}

/// [`train`] with checkpoints: every `ck.every` steps the adapter, the optimizer state and the
/// position in the data are saved; with `ck.resume` a run continues from the saved checkpoint and
/// ends with the same adapter bits as an uninterrupted run.
pub fn train_with(
    model: Llama,
    examples: &[Example],
    cfg: &TrainConfig,
    pad: u32,
    ck: Option<&Checkpointing>,
    on_step: impl FnMut(&StepEvent),
) -> Result<Llama, TrainError> {
    run(model, examples, cfg, pad, ck, Hooks::none(), on_step)
}

/// What [`crate::verify`] adds to a run: where it starts and stops, and a look at the whole state
/// at every step boundary.
pub(crate) struct Hooks<'a> {
    /// Start from this snapshot (a checkpoint directory) rather than from the beginning.
    pub start: Option<&'a std::path::Path>,
    /// Stop once this many optimizer steps are done.
    pub stop_after: Option<usize>,
    /// Called once before the first step (with no batch) and after every step; the run ends
    /// (returning the model as it is) when it breaks.
    pub boundary: Option<&'a mut BoundaryHook<'a>>,
}

impl Hooks<'_> {
    fn none() -> Self {
        Hooks {
            start: None,
            stop_after: None,
            boundary: None,
        }
    }
}

/// What [`Hooks::boundary`] calls.
pub(crate) type BoundaryHook<'a> = dyn FnMut(&Boundary<'_>) -> ControlFlow<()> + 'a;

/// The whole training state between two optimizer steps, as the boundary hook sees it.
pub(crate) struct Boundary<'a> {
    pub model: &'a Llama,
    pub optim: &'a ModuleOptimizer,
    /// Optimizer steps done.
    pub step: usize,
    /// Steps the run would take in all.
    pub total: usize,
    /// Indices into the caller's `examples` of the step just taken, in the order they were used
    /// (empty before the first step).
    pub batch: &'a [usize],
    state: CheckpointState,
}

impl Boundary<'_> {
    /// Saves this state in the checkpoint layout (adapter in PEFT format, `optimizer.bpk`,
    /// `state.json`) into `dest`, replacing it atomically.
    pub fn save(&self, dest: &std::path::Path, spec: &LoraSpec) -> Result<(), TrainError> {
        write_checkpoint(dest, spec, self.model, self.optim, &self.state)
    }
}

/// Loads a checkpoint directory into `model` and `optim`; returns the saved state.
fn load_checkpoint(
    path: &std::path::Path,
    cfg: &TrainConfig,
    usable: usize,
    model: &mut Llama,
    optim: ModuleOptimizer,
) -> Result<(ModuleOptimizer, CheckpointState), TrainError> {
    let bad = |problem: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        problem,
    };
    let text = std::fs::read_to_string(path.join("state.json"))
        .map_err(|e| bad(format!("state.json: {e}")))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    if state.config != *cfg || state.examples != usable {
        return Err(bad(
            "it was made with other settings or other data; start a new run".into(),
        ));
    }
    let weights =
        crate::adapter::AdapterWeights::load_peft(path).map_err(|e| bad(e.to_string()))?;
    weights.apply(model).map_err(|e| bad(e.to_string()))?;
    let optim = optim
        .load(path.join("optimizer"))
        .map_err(|e| bad(format!("optimizer state: {e:?}")))?;
    Ok((optim, state))
}

/// The AdamW optimizer every run uses.
fn new_optimizer(cfg: &TrainConfig) -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay)
        .with_epsilon(1e-8)
        .init()
}

/// Loads a checkpoint directory (the layout [`Boundary::save`] writes) into `model`; returns the
/// optimizer with its saved state and the number of optimizer steps done.
pub(crate) fn load_snapshot(
    path: &std::path::Path,
    cfg: &TrainConfig,
    examples: &[Example],
    model: &mut Llama,
) -> Result<(ModuleOptimizer, usize), TrainError> {
    let usable = examples.iter().filter(|e| e.target_count() > 0).count();
    let (optim, state) = load_checkpoint(path, cfg, usable, model, new_optimizer(cfg))?;
    Ok((optim, state.step))
}

/// The training loop behind [`train_with`] and [`crate::verify`].
pub(crate) fn run(
    mut model: Llama,
    examples: &[Example],
    cfg: &TrainConfig,
    pad: u32,
    ck: Option<&Checkpointing>,
    mut hooks: Hooks<'_>,
    mut on_step: impl FnMut(&StepEvent),
) -> Result<Llama, TrainError> {
    cfg.validate()?;
    // Positions in `examples` of the examples with something to learn.
    let original: Vec<usize> = (0..examples.len())
        .filter(|i| examples[*i].target_count() > 0)
        .collect();
    let usable: Vec<&Example> = original.iter().map(|i| &examples[*i]).collect();
    if usable.is_empty() {
        return Err(TrainError::NothingToLearn);
    }
    let device = model.device();
    let total = cfg.total_steps(usable.len());
    let mut optim = new_optimizer(cfg);
    let mut rng = SplitMix64::new(cfg.seed);
    let mut step = 0;
    let mut resume_at: Option<(usize, usize)> = None;
    let start = match (hooks.start, ck.filter(|c| c.resume)) {
        (Some(path), _) => Some(path.to_path_buf()),
        (None, Some(ck)) => {
            Some(ck.dir.join("checkpoint")).filter(|p| p.join("state.json").is_file())
        }
        (None, None) => None,
    };
    let mut state = CheckpointState {
        step: 0,
        epoch: 0,
        group: 0,
        config: cfg.clone(),
        examples: usable.len(),
    };
    if let Some(path) = start {
        let (loaded, saved) = load_checkpoint(&path, cfg, usable.len(), &mut model, optim)?;
        optim = loaded;
        step = saved.step;
        resume_at = Some((saved.epoch, saved.group));
        state = saved;
    }
    if let Some(hook) = hooks.boundary.as_mut()
        && hook(&Boundary {
            model: &model,
            optim: &optim,
            step,
            total,
            batch: &[],
            state: state.clone(),
        })
        .is_break()
    {
        return Ok(model);
    }
    let stop = hooks.stop_after.map_or(total, |s| s.min(total));
    'epochs: for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..usable.len()).collect();
        for i in (1..order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        for (gi, group) in order.chunks(cfg.batch_size * cfg.grad_accum).enumerate() {
            if let Some((e, g)) = resume_at
                && (epoch < e || (epoch == e && gi < g))
            {
                continue;
            }
            if step >= stop {
                break 'epochs;
            }
            let started = Instant::now();
            let micro: Vec<&[usize]> = group.chunks(cfg.batch_size).collect();
            let mut summed: Option<GradientsParams> = None;
            let (mut loss_sum, mut targets, mut tokens) = (0f64, 0usize, 0usize);
            for (mi, m) in micro.iter().enumerate() {
                let exs: Vec<&Example> = m.iter().map(|i| usable[*i]).collect();
                let batch = Batch::pad(&exs, pad);
                targets += batch.target_tokens();
                tokens += exs
                    .iter()
                    .map(|e| e.tokens.len().saturating_sub(1))
                    .sum::<usize>();
                // Dropout masks are seeded by (seed, step, micro-batch): the same on every peer,
                // and the same after a resume.
                let mut drop = (cfg.lora_dropout > 0.0).then(|| {
                    LoraDropout::new(
                        cfg.lora_dropout,
                        cfg.seed
                            ^ 0xD4_0B0E
                            ^ ((step as u64) << 16 | mi as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    )
                });
                let loss = masked_loss_with(&model, &batch, &device, drop.as_mut())
                    .div_scalar(micro.len() as f64);
                loss_sum += loss.clone().into_scalar::<f32>() as f64;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                summed = Some(match summed {
                    None => grads,
                    Some(acc) => add_grads(acc, grads, &model),
                });
            }
            if !loss_sum.is_finite() {
                return Err(TrainError::Diverged(loss_sum, step));
            }
            let mut grads = summed.unwrap_or_default();
            let norm = clip_global_norm(&mut grads, &model, cfg.max_grad_norm);
            let lr = cfg.lr_at(step, total);
            model = optim.step(lr, model, grads);
            step += 1;
            on_step(&StepEvent {
                step,
                total_steps: total,
                epoch,
                loss: loss_sum,
                learning_rate: lr,
                grad_norm: norm,
                target_tokens: targets,
                tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64(),
            });
            let state = CheckpointState {
                step,
                epoch,
                group: gi + 1,
                config: cfg.clone(),
                examples: usable.len(),
            };
            if let Some(hook) = hooks.boundary.as_mut() {
                let batch: Vec<usize> = group.iter().map(|i| original[*i]).collect();
                if hook(&Boundary {
                    model: &model,
                    optim: &optim,
                    step,
                    total,
                    batch: &batch,
                    state: state.clone(),
                })
                .is_break()
                {
                    return Ok(model);
                }
            }
            if let Some(ck) = ck
                && ck.every > 0
                && step % ck.every == 0
            {
                write_checkpoint(&ck.dir.join("checkpoint"), &ck.spec, &model, &optim, &state)?;
            }
        }
    }
    Ok(model)
}

/// Writes a checkpoint into `dest` (through `dest.partial`, so a crash leaves the old one whole).
fn write_checkpoint(
    dest: &std::path::Path,
    spec: &LoraSpec,
    model: &Llama,
    optim: &ModuleOptimizer,
    state: &CheckpointState,
) -> Result<(), TrainError> {
    let sibling = |suffix: &str| {
        let mut name = dest.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        dest.with_file_name(name)
    };
    let tmp = sibling(".partial");
    let bad = |problem: String| TrainError::Checkpoint {
        path: tmp.clone(),
        problem,
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| bad(e.to_string()))?;
    }
    crate::adapter::AdapterWeights::from_model(model, spec)
        .save_peft(&tmp, "checkpoint")
        .map_err(|e| bad(e.to_string()))?;
    optim
        .save(tmp.join("optimizer"))
        .map_err(|e| bad(format!("optimizer state: {e:?}")))?;
    let text = serde_json::to_string_pretty(state).map_err(|e| bad(e.to_string()))?;
    std::fs::write(tmp.join("state.json"), text).map_err(|e| bad(e.to_string()))?;
    let old = sibling(".old");
    if dest.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dest, &old).map_err(|e| bad(e.to_string()))?;
    }
    std::fs::rename(&tmp, dest).map_err(|e| bad(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The trainable parameters' ids (every adapter's `A` and `B`).
fn adapter_params(model: &Llama) -> Vec<(burn::module::ParamId, [usize; 2])> {
    let mut ids = Vec::new();
    for block in model.layers() {
        for p in Proj::ALL {
            if let Some(ad) = block.projection(p).adapter() {
                ids.push((ad.a.id, ad.a.val().dims()));
                ids.push((ad.b.id, ad.b.val().dims()));
            }
        }
    }
    ids
}

fn add_grads(
    mut acc: GradientsParams,
    mut more: GradientsParams,
    model: &Llama,
) -> GradientsParams {
    for (id, _) in adapter_params(model) {
        match (acc.remove::<2>(id), more.remove::<2>(id)) {
            (Some(a), Some(b)) => acc.register(id, a + b),
            (Some(a), None) | (None, Some(a)) => acc.register(id, a),
            (None, None) => {}
        }
    }
    acc
}

/// Scales all gradients so that their global L2 norm is at most `max`; returns the norm before.
fn clip_global_norm(grads: &mut GradientsParams, model: &Llama, max: f64) -> f64 {
    let params = adapter_params(model);
    let mut sq = 0f64;
    for (id, _) in &params {
        if let Some(g) = grads.get::<2>(*id) {
            sq += (g.clone() * g).sum().into_scalar::<f32>() as f64;
        }
    }
    let norm = sq.sqrt();
    if norm > max && norm.is_finite() {
        let scale = max / (norm + 1e-6);
        for (id, _) in &params {
            if let Some(g) = grads.remove::<2>(*id) {
                grads.register(*id, g.mul_scalar(scale));
            }
        }
    }
    norm
}
