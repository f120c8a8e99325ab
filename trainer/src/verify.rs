//! Training that can be checked by re-execution: state hashes, segment commitments and replay.
//!
//! A volunteer trains with [`train_segmented`]: every `K` optimizer steps (and at the last step)
//! it commits to a [`Segment`]: the [`state_hash`] of the whole training state, and a Merkle root
//! ([`merkle_root`] over [`batch_leaf`]s) of the example indices each step of the segment used.
//! At every boundary, step 0 included, it also writes a snapshot of the state
//! ([`snapshot_path`]: the checkpoint layout of [`crate::train`], i.e. the adapter in PEFT's
//! format, the optimizer's burnpack record and `state.json`). An auditor picks a segment, gets
//! the snapshot at the segment's start from the volunteer, checks it against the previous
//! commitment ([`snapshot_hash`]), runs the segment's steps again ([`replay_segment`]) and
//! compares the result with the committed [`Segment`] bit for bit.
//!
//! Bit-for-bit replay holds on one backend and kernel class with one thread count; the
//! protocol's `KernelClass` records them. Across kernel classes (another SIMD level, another
//! backend, a GPU) the replayed floats differ slightly, and comparing hashes would accuse honest
//! workers; there the auditor also gets the worker's snapshot at the segment's END (authentic:
//! its hash is the committed one), and compares its replay with it numerically
//! ([`state_distance`]: over the factors and the optimizer moments, the largest disagreement
//! relative to the segment's update of that tensor) under a tolerance ([`spot_check_tolerance`],
//! set from measurements across kernel classes; BENCHMARKS.md, "Spot checks across kernel
//! classes"). (On flex the thread count has not mattered so far:
//! gemm splits a product's output, not its inner sum, and rayon's thread-dependent float sums only
//! start at 4M elements; `tests/verify.rs` measures it.) The replay is [`crate::train`]'s own loop started from
//! the snapshot (the path by which a checkpointed run resumes), not a second implementation.
//!
//! This module only reads the training state; it never changes how a run trains.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::store::burn_pack::{Reader, Scalar};
use burn::tensor::{DType, TensorData};
use cohort_protocol::ContentHash;
use cohort_protocol::hash::ContentHasher;
use cohort_protocol::types::round::SegmentCommit;

use crate::adapter::LoraSpec;
use crate::data::Example;
use crate::model::Llama;
use crate::model::weights::Proj;
use crate::train::{Boundary, Hooks, StepEvent, TrainConfig, TrainError, load_snapshot, run};

/// The tolerance of a spot check across kernel classes, for a segment that starts from a
/// snapshot (step > 0): a replay on other kernels passes when [`state_distance`] from the
/// worker's end state is at most this: a disagreement of at most 3% of the segment's update,
/// tensor by tensor. See [`spot_check_tolerance`].
///
/// Set from measurement (BENCHMARKS.md, "Spot checks across kernel classes"), flex (gemm,
/// AVX-512) against burn's ndarray backend (matrixmultiply), 4-step segments. On the default
/// model (30 layers) the largest honest distance of 28 segments was 4.8e-3 (6x under this); on
/// a 2-layer tiny model, 2.4e-4 of 960. A skipped optimizer step (>= 0.31) and one changed
/// example (>= 0.16) were refused on both (5x and more over this), as was noise of 10% of the
/// update on `B`; noise of 1% passes. The deeper model drifts further: the tolerance is set for
/// it, not for the tiny one.
pub const SPOT_CHECK_TOLERANCE: f64 = 3e-2;

/// [`SPOT_CHECK_TOLERANCE`] for a run's first segment (from step 0, a fresh optimizer). Looser:
/// AdamW's first updates are `±lr` per element whatever the gradient's size
/// (`m̂ / √v̂ = g / |g|`), so an element whose gradient is within rounding of zero can take the
/// opposite sign on other kernels, a whole `2·lr` apart; with a history of steps behind it the
/// update is damped and the kernels stay close. `A` suffers most: its gradient is zero at the
/// first step (`B` starts at zero) and tiny after, so its first-segment update is small and
/// rounding-sensitive. Measured: the largest honest first-segment distance was 6.9e-2 on the
/// default model (of 14; 2.9x under this) and 2.4e-2 on the tiny one (of 480); a skipped step
/// (>= 0.43) and a changed example (>= 0.44) were refused, noise of 10% of the update on `B`
/// is not.
pub const SPOT_CHECK_TOLERANCE_FIRST: f64 = 2e-1;

/// The tolerance for a segment across kernel classes: [`SPOT_CHECK_TOLERANCE_FIRST`] for a
/// run's first segment, [`SPOT_CHECK_TOLERANCE`] otherwise.
pub fn spot_check_tolerance(first_segment: bool) -> f64 {
    if first_segment {
        SPOT_CHECK_TOLERANCE_FIRST
    } else {
        SPOT_CHECK_TOLERANCE
    }
}

/// The first bytes hashed by [`state_hash`]: names the layout and its version.
pub const STATE_DOMAIN: &[u8] = b"cohort/train-state/v1";

/// A commitment to the training state at the end of a segment of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Optimizer steps done at the end of the segment.
    pub end_step: usize,
    /// [`state_hash`] of the state after `end_step` steps.
    pub state: ContentHash,
    /// [`merkle_root`] of the [`batch_leaf`]s of the segment's steps, in order.
    pub batches: ContentHash,
}

impl Segment {
    /// The protocol's form of this commitment (`None` past `u32::MAX` steps).
    pub fn to_commit(&self) -> Option<SegmentCommit> {
        Some(SegmentCommit {
            end_step: u32::try_from(self.end_step).ok()?,
            state: self.state,
            batches: self.batches,
        })
    }
}

/// How [`train_segmented`] commits: the segment length and where snapshots go.
#[derive(Debug, Clone)]
pub struct Segmenting {
    /// Optimizer steps per segment (`K`): a boundary after every multiple of it, and at the end.
    pub every: usize,
    /// Snapshots are written to [`snapshot_path`]`(dir, step)` at every boundary.
    pub dir: PathBuf,
    /// The adapter layout (saved with the factors).
    pub spec: LoraSpec,
}

/// What [`train_segmented`] returns.
#[derive(Debug)]
pub struct SegmentedRun {
    /// The trained model.
    pub model: Llama,
    /// [`state_hash`] of the state before the first step.
    pub start: ContentHash,
    /// One commitment per segment, by increasing `end_step`; the last ends at the last step.
    pub segments: Vec<Segment>,
    /// The indices into `examples` each optimizer step used, in order (step `s` at `s − 1`):
    /// the leaves' contents, for answering an auditor.
    pub batches: Vec<Vec<usize>>,
}

/// What [`replay_segment_model`] returns.
#[derive(Debug)]
pub struct Replayed {
    /// The model after the replayed steps.
    pub model: Llama,
    /// [`state_hash`] of the snapshot the replay started from.
    pub start: ContentHash,
    /// The state the replay started from (its [`TrainState::hash`] is `start`): the segment's
    /// start, against which the tolerance path measures the segment's update.
    pub start_state: TrainState,
    /// The recomputed commitment of the replayed steps.
    pub segment: Segment,
    /// The state after the replayed steps (its [`TrainState::hash`] is `segment.state`): what
    /// the tolerance path of a spot check compares with the worker's own end state
    /// ([`state_distance`]).
    pub state: TrainState,
}

/// What can go wrong while committing to or replaying a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Training itself failed (bad settings, a bad snapshot, divergence).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The optimizer's record holds something the state layout does not cover.
    #[error("optimizer state: {0}")]
    OptimizerState(String),
    /// An adapter factor is not stored as f32.
    #[error("layer {layer} {proj}: factor {which} is {dtype:?}, not f32")]
    NotF32 {
        /// The block.
        layer: usize,
        /// The projection's Hugging Face name.
        proj: &'static str,
        /// `A` or `B`.
        which: char,
        /// What it is.
        dtype: DType,
    },
    /// The segment asked for does not fit the run.
    #[error("bad segment: {0}")]
    BadSegment(String),
    /// The snapshot directory could not be made.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One adapter parameter's AdamW state, as read from the optimizer's record.
#[derive(Default)]
struct Moments {
    time: Option<u64>,
    moment_1: Option<TensorData>,
    moment_2: Option<TensorData>,
    max_moment_2: Option<TensorData>,
}

/// The AdamW states in `optim`, by parameter id.
///
/// burn 0.22 keeps them private to the [`ModuleOptimizer`]; its public view is the burnpack
/// record, where AdamW's `AdamWState { momentum: AdaptiveMomentumState { time, moment_1,
/// moment_2, max_moment_2 } }` of parameter `id` is flattened into tensors named
/// `{id}.momentum.moment_1` (and `moment_2`, `max_moment_2`) and scalars `{id}.momentum.time`
/// and `{id}.__rank`. Anything else in the record is an error, so that no state escapes the hash.
fn optimizer_moments(optim: &ModuleOptimizer) -> Result<BTreeMap<u64, Moments>, VerifyError> {
    let bad = |what: String| VerifyError::OptimizerState(what);
    let bytes = optim
        .into_bytes()
        .map_err(|e| bad(format!("writing the record: {e:?}")))?;
    let reader = Reader::from_bytes(bytes).map_err(|e| bad(format!("reading the record: {e}")))?;
    let scalars = reader.scalars().clone();
    let tensors = reader
        .into_tensors()
        .map_err(|e| bad(format!("reading the record: {e}")))?;
    let split = |name: &str| -> Result<(u64, String), VerifyError> {
        name.split_once('.')
            .and_then(|(id, field)| Some((id.parse().ok()?, field.to_string())))
            .ok_or_else(|| bad(format!("unexpected entry {name:?}")))
    };
    let mut out: BTreeMap<u64, Moments> = BTreeMap::new();
    for (name, value) in &scalars {
        let (id, field) = split(name)?;
        let entry = out.entry(id).or_default();
        match (field.as_str(), value) {
            ("__rank", Scalar::UInt(2) | Scalar::Int(2)) => {}
            ("momentum.time", Scalar::UInt(t)) => entry.time = Some(*t),
            ("momentum.time", Scalar::Int(t)) if *t >= 0 => entry.time = Some(*t as u64),
            _ => return Err(bad(format!("unexpected scalar {name:?} = {value:?}"))),
        }
    }
    for tensor in tensors {
        let (name, dtype, shape, _, bytes) = tensor
            .into_parts()
            .map_err(|e| bad(format!("reading the record: {e}")))?;
        let (id, field) = split(&name)?;
        let data = TensorData::from_bytes(bytes, shape, dtype);
        let entry = out.entry(id).or_default();
        let slot = match field.as_str() {
            "momentum.moment_1" => &mut entry.moment_1,
            "momentum.moment_2" => &mut entry.moment_2,
            "momentum.max_moment_2" => &mut entry.max_moment_2,
            _ => return Err(bad(format!("unexpected tensor {name:?}"))),
        };
        *slot = Some(data);
    }
    Ok(out)
}

/// Appends `values` as f32 little-endian to `h`.
fn put_f32s(h: &mut ContentHasher, values: &[f32]) {
    let mut buf = Vec::with_capacity(values.len() * 4);
    for v in values {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    h.update(&buf);
}

fn put_u64(h: &mut ContentHasher, v: u64) {
    h.update(&v.to_le_bytes());
}

/// An optimizer moment tensor (f32, shaped `dims`) as values.
fn moment_values(data: &TensorData, dims: [usize; 2], what: &str) -> Result<Vec<f32>, VerifyError> {
    if data.shape().as_slice() != dims {
        return Err(VerifyError::OptimizerState(format!(
            "{what} is {:?}, its parameter {dims:?}",
            data.shape().as_slice()
        )));
    }
    let values = data.as_slice::<f32>().map_err(|e| {
        VerifyError::OptimizerState(format!("{what} is {:?}, not f32: {e:?}", data.dtype()))
    })?;
    Ok(values.to_vec())
}

/// AdamW's state of one adapter factor.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    /// The parameter's own time step `t`.
    pub time: u64,
    /// The first moment `m`, shaped like the parameter (row-major).
    pub moment_1: Vec<f32>,
    /// The second moment `v`.
    pub moment_2: Vec<f32>,
    /// AMSGrad's running maximum of `v` (`None` without AMSGrad).
    pub max_moment_2: Option<Vec<f32>>,
}

/// One adapter factor (`A` or `B`) with its optimizer state.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamState {
    /// `[rows, cols]`: `[r, d_in]` for `A`, `[d_out, r]` for `B`.
    pub dims: [usize; 2],
    /// The values, row-major, as trained (the LoRA scaling not applied).
    pub value: Vec<f32>,
    /// AdamW's state (`None` before the parameter's first step).
    pub adam: Option<AdamState>,
}

/// One adapted projection's factors.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorState {
    /// The block index.
    pub layer: usize,
    /// The projection.
    pub proj: Proj,
    /// `A`, `r x d_in`.
    pub a: ParamState,
    /// `B`, `d_out x r`.
    pub b: ParamState,
}

/// The whole training state that determines the rest of a run (given the configuration and the
/// data), as numbers: what [`state_hash`] hashes and [`state_distance`] compares.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Every adapted projection, by block index and then in [`Proj::ALL`]'s order.
    pub factors: Vec<FactorState>,
}

impl TrainState {
    /// Reads the state out of a model (with adapters attached) and its optimizer after `step`
    /// optimizer steps. Anything in the optimizer's record that the layout does not cover is an
    /// error, so that no state escapes the hash.
    pub fn capture(
        step: usize,
        model: &Llama,
        optim: &ModuleOptimizer,
    ) -> Result<TrainState, VerifyError> {
        let mut moments = optimizer_moments(optim)?;
        let mut factors = Vec::new();
        for (layer, block) in model.layers().iter().enumerate() {
            for p in Proj::ALL {
                let Some(ad) = block.projection(p).adapter() else {
                    continue;
                };
                let mut params = Vec::with_capacity(2);
                for (which, param) in [('A', &ad.a), ('B', &ad.b)] {
                    let t = param.val();
                    let dims = t.dims();
                    let data = t.into_data();
                    let value = data
                        .as_slice::<f32>()
                        .map_err(|_| VerifyError::NotF32 {
                            layer,
                            proj: p.hf_name(),
                            which,
                            dtype: data.dtype(),
                        })?
                        .to_vec();
                    let what =
                        |field: &str| format!("layer {layer} {} {which}.{field}", p.hf_name());
                    let adam = match moments.remove(&param.id.val()) {
                        None => None,
                        Some(m) => {
                            let missing = |field: &str| {
                                VerifyError::OptimizerState(format!("{} is missing", what(field)))
                            };
                            let time = m.time.ok_or_else(|| missing("time"))?;
                            let m1 = m.moment_1.as_ref().ok_or_else(|| missing("moment_1"))?;
                            let m2 = m.moment_2.as_ref().ok_or_else(|| missing("moment_2"))?;
                            Some(AdamState {
                                time,
                                moment_1: moment_values(m1, dims, &what("moment_1"))?,
                                moment_2: moment_values(m2, dims, &what("moment_2"))?,
                                max_moment_2: m
                                    .max_moment_2
                                    .as_ref()
                                    .map(|max| moment_values(max, dims, &what("max_moment_2")))
                                    .transpose()?,
                            })
                        }
                    };
                    params.push(ParamState { dims, value, adam });
                }
                let (Some(b), Some(a)) = (params.pop(), params.pop()) else {
                    continue;
                };
                factors.push(FactorState {
                    layer,
                    proj: p,
                    a,
                    b,
                });
            }
        }
        if let Some(id) = moments.keys().next() {
            return Err(VerifyError::OptimizerState(format!(
                "parameter {id:#x} has optimizer state but is not an adapter factor"
            )));
        }
        Ok(TrainState { step, factors })
    }

    /// Loads a snapshot (the layout [`train_segmented`] writes) into `model` (the base with
    /// adapters attached), checked against the run's `examples` and `cfg`, and reads its state.
    /// Loading moves bits only: the result is the same on every backend.
    pub fn load(
        mut model: Llama,
        examples: &[Example],
        cfg: &TrainConfig,
        snapshot: &Path,
    ) -> Result<TrainState, VerifyError> {
        let (optim, step) = load_snapshot(snapshot, cfg, examples, &mut model)?;
        TrainState::capture(step, &model, &optim)
    }

    /// The state's [`state_hash`] (its documented byte layout).
    pub fn hash(&self) -> ContentHash {
        let mut h = ContentHasher::new();
        h.update(STATE_DOMAIN);
        put_u64(&mut h, self.step as u64);
        put_u64(&mut h, self.factors.len() as u64);
        for f in &self.factors {
            let pi = Proj::ALL.iter().position(|q| *q == f.proj).unwrap_or(0);
            let ([r, d_in], [d_out, _]) = (f.a.dims, f.b.dims);
            for v in [f.layer, pi, r, d_in, d_out] {
                put_u64(&mut h, v as u64);
            }
            put_f32s(&mut h, &f.a.value);
            put_f32s(&mut h, &f.b.value);
            for param in [&f.a, &f.b] {
                match &param.adam {
                    None => {
                        h.update(&[0]);
                    }
                    Some(m) => {
                        h.update(&[1]);
                        put_u64(&mut h, m.time);
                        put_f32s(&mut h, &m.moment_1);
                        put_f32s(&mut h, &m.moment_2);
                        match &m.max_moment_2 {
                            None => {
                                h.update(&[0]);
                            }
                            Some(max) => {
                                h.update(&[1]);
                                put_f32s(&mut h, max);
                            }
                        }
                    }
                }
            }
        }
        h.finalize()
    }
}

/// The BLAKE3 hash of the whole training state that determines the rest of a run, given the
/// training configuration and the data: the step count, every adapter factor and AdamW's state
/// for each factor ([`TrainState::capture`], then [`TrainState::hash`]).
///
/// The hashed bytes, in order (integers `u64` little-endian, floats `f32` little-endian,
/// matrices row-major):
///
/// 1. [`STATE_DOMAIN`] (`cohort/train-state/v1`, 21 bytes);
/// 2. `step`, the optimizer steps done;
/// 3. the number of adapted projections `P`;
/// 4. for each adapted projection, by block index and then in [`Proj::ALL`]'s order (q, k, v, o,
///    gate, up, down):
///    - the block index, the projection's index in [`Proj::ALL`], the rank `r`, `d_in`, `d_out`;
///    - `A` (`r x d_in`) and then `B` (`d_out x r`), as trained (the LoRA scaling not applied);
///    - for `A` and then `B`, AdamW's state: one byte `0` if the parameter has none yet (before
///      its first step), or one byte `1`, the parameter's own time step `t`, the first moment
///      `m` and the second moment `v` (each shaped like the parameter), then one byte `0` or, with
///      AMSGrad, `1` and the running maximum of `v`.
///
/// The learning rate schedule, the data order and dropout masks follow from the configuration,
/// the step count and the seed, and AdamW's hyperparameters from the configuration, so none of
/// them is hashed: a commitment is checked against the job's configuration and data.
pub fn state_hash(
    step: usize,
    model: &Llama,
    optim: &ModuleOptimizer,
) -> Result<ContentHash, VerifyError> {
    Ok(TrainState::capture(step, model, optim)?.hash())
}

/// How far one training state is from another, relative to a segment's update:
/// [`state_distance`]'s answer.
#[derive(Debug, Clone, PartialEq)]
pub struct StateDistance {
    /// The largest [`update_error`] over the states' tensors: the disagreement relative to how
    /// far the segment moved that tensor. `+∞` when the states differ in structure (step,
    /// projections, shapes, optimizer time steps) or hold a non-finite value.
    pub relative: f64,
    /// The tensor where it was reached (e.g. `layer 3 v_proj B.moment_2`), or what differs in
    /// structure.
    pub worst: String,
    /// Tensors compared.
    pub tensors: usize,
}

impl StateDistance {
    /// The tolerance path's verdict: the states agree within `tau` (an error relative to the
    /// segment's update).
    pub fn within(&self, tau: f64) -> bool {
        self.relative <= tau
    }

    fn structural(what: String) -> StateDistance {
        StateDistance {
            relative: f64::INFINITY,
            worst: what,
            tensors: 0,
        }
    }
}

/// The error of `x` against `y` relative to the update that led to them from `start`, in f64:
/// `‖x − y‖_F / max(‖x − s‖_F, ‖y − s‖_F)`, with `s = start` (zeros when `None`: a tensor that
/// did not exist before the segment, such as a fresh optimizer's moments). 0 when `x = y`, `+∞`
/// when a value is not finite; otherwise at most 2 (the triangle inequality), symmetric in `x`
/// and `y`, and unchanged by scaling all three. With a zero start it is the plain relative
/// error `‖x − y‖ / max(‖x‖, ‖y‖)`. A `start` shorter than `x` counts its missing values as
/// zeros ([`state_distance`] checks lengths first).
pub fn update_error(start: Option<&[f32]>, x: &[f32], y: &[f32]) -> f64 {
    let (mut diff, mut dx, mut dy) = (0f64, 0f64, 0f64);
    let start = start.unwrap_or(&[]);
    for (i, (a, b)) in x.iter().zip(y).enumerate() {
        let (a, b) = (f64::from(*a), f64::from(*b));
        let s = start.get(i).map_or(0.0, |s| f64::from(*s));
        diff += (a - b) * (a - b);
        dx += (a - s) * (a - s);
        dy += (b - s) * (b - s);
    }
    let e = if diff == 0.0 {
        0.0
    } else {
        diff.sqrt() / dx.max(dy).sqrt()
    };
    if e.is_finite() && dx.is_finite() && dy.is_finite() {
        e
    } else {
        f64::INFINITY
    }
}

/// The distance between two training states at the end of a segment, relative to the segment's
/// update, for a spot check across kernel classes: the segment replayed on the verifier's
/// kernels (`replayed`) against the worker's own state at the segment's end (`claimed`,
/// authentic because its [`TrainState::hash`] is the committed one), both reached from the
/// segment's start (`start`, authentic because it hashes to the previous commitment, or rebuilt
/// from the job for a run's first segment).
///
/// The states must have the same structure: `replayed` and `claimed` the same step, the same
/// adapted projections with the same shapes, AdamW state for the same factors with the same
/// time steps (AMSGrad's maximum on both or neither); `start` the same projections and shapes,
/// an earlier step, and optimizer state where the end states have it or none (a fresh
/// optimizer: zero moments). Otherwise the distance is `+∞`. Then every tensor is compared by
/// its [`update_error`] (each factor's `A` and `B`, and each one's first and second moment and
/// AMSGrad maximum), and the distance is the largest of them.
///
/// Relative to the update, not to the tensor, because the update is what a worker could fake: a
/// segment that moves `B` by 1% of its size and is off by 1e-4 of `B` is off by 1% of its work,
/// which a tensor-relative error would call agreement. Per tensor, so that a small tensor is
/// not drowned by a large one (a forged `B` of one projection counts as much as all of them).
/// Kernel rounding enters a state only through the segment's own arithmetic, so it is small
/// against the update whatever the scale of the tensor.
pub fn state_distance(
    start: &TrainState,
    replayed: &TrainState,
    claimed: &TrainState,
) -> StateDistance {
    if replayed.step != claimed.step {
        return StateDistance::structural(format!(
            "step {} against {}",
            replayed.step, claimed.step
        ));
    }
    if start.step >= claimed.step {
        return StateDistance::structural(format!(
            "the segment starts at step {}, not before its end {}",
            start.step, claimed.step
        ));
    }
    if replayed.factors.len() != claimed.factors.len()
        || start.factors.len() != claimed.factors.len()
    {
        return StateDistance::structural(format!(
            "{} adapted projections against {} (start {})",
            replayed.factors.len(),
            claimed.factors.len(),
            start.factors.len()
        ));
    }
    let mut worst = StateDistance {
        relative: 0.0,
        worst: String::new(),
        tensors: 0,
    };
    let mut compare = |name: String, s: Option<&[f32]>, x: &[f32], y: &[f32]| {
        let e = update_error(s, x, y);
        worst.tensors += 1;
        if e > worst.relative || worst.worst.is_empty() {
            worst.relative = e;
            worst.worst = name;
        }
    };
    for ((f, g), h) in replayed
        .factors
        .iter()
        .zip(&claimed.factors)
        .zip(&start.factors)
    {
        let name = format!("layer {} {}", f.layer, f.proj.hf_name());
        if (f.layer, f.proj) != (g.layer, g.proj) || (h.layer, h.proj) != (g.layer, g.proj) {
            return StateDistance::structural(format!(
                "{name} against layer {} {} (start layer {} {})",
                g.layer,
                g.proj.hf_name(),
                h.layer,
                h.proj.hf_name()
            ));
        }
        for (which, p, q, o) in [('A', &f.a, &g.a, &h.a), ('B', &f.b, &g.b, &h.b)] {
            let name = format!("{name} {which}");
            let n = q.value.len();
            if p.dims != q.dims || o.dims != q.dims || p.value.len() != n || o.value.len() != n {
                return StateDistance::structural(format!(
                    "{name} is {:?} against {:?} (start {:?})",
                    p.dims, q.dims, o.dims
                ));
            }
            compare(name.clone(), Some(&o.value), &p.value, &q.value);
            match (&p.adam, &q.adam) {
                (None, None) => {}
                (Some(m), Some(n_)) => {
                    let fits = |v: &[f32]| v.len() == n;
                    if m.time != n_.time
                        || m.max_moment_2.is_some() != n_.max_moment_2.is_some()
                        || ![&m.moment_1, &m.moment_2, &n_.moment_1, &n_.moment_2]
                            .iter()
                            .all(|v| fits(v))
                        || m.max_moment_2.as_ref().is_some_and(|v| !fits(v))
                        || n_.max_moment_2.as_ref().is_some_and(|v| !fits(v))
                    {
                        return StateDistance::structural(format!(
                            "{name}'s optimizer state differs in structure (time {} against {})",
                            m.time, n_.time
                        ));
                    }
                    let before = o.adam.as_ref();
                    if before.is_some_and(|b| {
                        b.time >= m.time
                            || !fits(&b.moment_1)
                            || !fits(&b.moment_2)
                            || b.max_moment_2.as_ref().is_some_and(|v| !fits(v))
                    }) {
                        return StateDistance::structural(format!(
                            "{name}'s optimizer state at the start does not lead to the end's"
                        ));
                    }
                    compare(
                        format!("{name}.moment_1"),
                        before.map(|b| b.moment_1.as_slice()),
                        &m.moment_1,
                        &n_.moment_1,
                    );
                    compare(
                        format!("{name}.moment_2"),
                        before.map(|b| b.moment_2.as_slice()),
                        &m.moment_2,
                        &n_.moment_2,
                    );
                    if let (Some(x), Some(y)) = (&m.max_moment_2, &n_.max_moment_2) {
                        compare(
                            format!("{name}.max_moment_2"),
                            before.and_then(|b| b.max_moment_2.as_deref()),
                            x,
                            y,
                        );
                    }
                }
                _ => {
                    return StateDistance::structural(format!(
                        "{name} has optimizer state on one side only"
                    ));
                }
            }
        }
    }
    worst
}

/// A leaf of a segment's batch tree: BLAKE3 of the byte `0x00`, the optimizer step (1-based:
/// the step that consumed the batch), the number of examples, and each example's index into the
/// run's `examples` in the order the step used them, all `u64` little-endian.
pub fn batch_leaf(step: usize, indices: &[usize]) -> ContentHash {
    let mut h = ContentHasher::new();
    h.update(&[0x00]);
    put_u64(&mut h, step as u64);
    put_u64(&mut h, indices.len() as u64);
    let mut buf = Vec::with_capacity(indices.len() * 8);
    for i in indices {
        buf.extend_from_slice(&(*i as u64).to_le_bytes());
    }
    h.update(&buf);
    h.finalize()
}

/// The Merkle root of `leaves`: each level pairs neighbours into BLAKE3 of the byte `0x01`, the
/// left and the right hash; an odd last node moves up a level unchanged; the root of one leaf is
/// that leaf. The leading byte keeps leaves (`0x00`, [`batch_leaf`]) and inner nodes apart. No
/// leaves give BLAKE3 of the single byte `0x02`.
pub fn merkle_root(leaves: &[ContentHash]) -> ContentHash {
    if leaves.is_empty() {
        return ContentHash::of(&[0x02]);
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| {
                let mut h = ContentHasher::new();
                h.update(&[0x01]);
                for child in pair {
                    h.update(child.as_bytes());
                }
                if pair.len() == 2 {
                    h.finalize()
                } else {
                    pair[0]
                }
            })
            .collect();
    }
    level[0]
}

/// Where [`train_segmented`] keeps the snapshot of the state after `step` steps:
/// `dir/step-{step:08}`.
pub fn snapshot_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step:08}"))
}

/// [`crate::train::train`], committing to a [`Segment`] every `seg.every` optimizer steps and at
/// the last step, and writing a snapshot at every boundary (step 0 included) for auditors.
/// `on_segment` sees each commitment as it is made.
pub fn train_segmented(
    model: Llama,
    examples: &[Example],
    cfg: &TrainConfig,
    pad: u32,
    seg: &Segmenting,
    on_step: impl FnMut(&StepEvent),
    mut on_segment: impl FnMut(&Segment),
) -> Result<SegmentedRun, VerifyError> {
    if seg.every == 0 {
        return Err(VerifyError::BadSegment(
            "the segment length must be at least 1".into(),
        ));
    }
    std::fs::create_dir_all(&seg.dir).map_err(|source| VerifyError::Io {
        path: seg.dir.clone(),
        source,
    })?;
    let mut start = None;
    let mut segments = Vec::new();
    let mut leaves = Vec::new();
    let mut batches = Vec::new();
    let mut failed = None;
    let mut hook = |b: &Boundary<'_>| -> ControlFlow<()> {
        let mut commit = || -> Result<(), VerifyError> {
            let first = b.batch.is_empty();
            if !first {
                leaves.push(batch_leaf(b.step, b.batch));
                batches.push(b.batch.to_vec());
            }
            if first || b.step.is_multiple_of(seg.every) || b.step == b.total {
                let state = state_hash(b.step, b.model, b.optim)?;
                b.save(&snapshot_path(&seg.dir, b.step), &seg.spec)?;
                if first {
                    start = Some(state);
                } else {
                    let s = Segment {
                        end_step: b.step,
                        state,
                        batches: merkle_root(&leaves),
                    };
                    leaves.clear();
                    on_segment(&s);
                    segments.push(s);
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
    let model = run(model, examples, cfg, pad, None, hooks, on_step)?;
    if let Some(e) = failed {
        return Err(e);
    }
    let start = start.ok_or_else(|| VerifyError::BadSegment("the run never started".into()))?;
    Ok(SegmentedRun {
        model,
        start,
        segments,
        batches,
    })
}

/// Re-runs the steps of one segment: loads the snapshot `snapshot` (written by
/// [`train_segmented`] at the segment's start) into `model` (the base with adapters attached, on
/// an autodiff device), trains with the run's `examples`, `cfg` and `pad` until `end_step` steps
/// are done, and returns the recomputed commitment, to be compared with the committed one.
pub fn replay_segment(
    model: Llama,
    examples: &[Example],
    cfg: &TrainConfig,
    pad: u32,
    snapshot: &Path,
    end_step: usize,
) -> Result<Segment, VerifyError> {
    Ok(replay_segment_model(model, examples, cfg, pad, snapshot, end_step)?.segment)
}

/// [`replay_segment`], also returning the model after the segment and the snapshot's own
/// [`state_hash`] (which must equal the commitment of the previous segment, or the job's start).
pub fn replay_segment_model(
    model: Llama,
    examples: &[Example],
    cfg: &TrainConfig,
    pad: u32,
    snapshot: &Path,
    end_step: usize,
) -> Result<Replayed, VerifyError> {
    replay_from(model, examples, cfg, pad, Some(snapshot), end_step)
}

/// [`replay_segment_model`] from `snapshot`, or without one from the run's own start (step 0:
/// `model` as given, a fresh optimizer), until `end_step` steps are done.
pub fn replay_from(
    model: Llama,
    examples: &[Example],
    cfg: &TrainConfig,
    pad: u32,
    snapshot: Option<&Path>,
    end_step: usize,
) -> Result<Replayed, VerifyError> {
    if snapshot.is_none() && end_step == 0 {
        return Err(VerifyError::BadSegment(
            "the end step must be at least 1".into(),
        ));
    }
    let mut start = None;
    let mut end: Option<TrainState> = None;
    let mut total = 0;
    let mut leaves = Vec::new();
    let mut failed = None;
    let mut hook = |b: &Boundary<'_>| -> ControlFlow<()> {
        total = b.total;
        let result = if b.batch.is_empty() {
            if b.step >= end_step {
                Err(VerifyError::BadSegment(format!(
                    "the snapshot is at step {}, not before end step {end_step}",
                    b.step
                )))
            } else {
                TrainState::capture(b.step, b.model, b.optim).map(|s| start = Some(s))
            }
        } else {
            leaves.push(batch_leaf(b.step, b.batch));
            if b.step == end_step {
                TrainState::capture(b.step, b.model, b.optim).map(|s| end = Some(s))
            } else {
                Ok(())
            }
        };
        match result {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    };
    let hooks = Hooks {
        start: snapshot,
        stop_after: Some(end_step),
        boundary: Some(&mut hook),
    };
    let model = run(model, examples, cfg, pad, None, hooks, |_| {})?;
    if let Some(e) = failed {
        return Err(e);
    }
    let (Some(start), Some(state)) = (start, end) else {
        return Err(VerifyError::BadSegment(format!(
            "the run has {total} steps, fewer than end step {end_step}"
        )));
    };
    Ok(Replayed {
        model,
        start: start.hash(),
        start_state: start,
        segment: Segment {
            end_step,
            state: state.hash(),
            batches: merkle_root(&leaves),
        },
        state,
    })
}

/// The [`state_hash`] of a snapshot, loaded into `model` (the base with adapters attached) and
/// checked against the run's `examples` and `cfg`: what an auditor compares with the commitment
/// the snapshot claims to be.
pub fn snapshot_hash(
    model: Llama,
    examples: &[Example],
    cfg: &TrainConfig,
    snapshot: &Path,
) -> Result<ContentHash, VerifyError> {
    Ok(TrainState::load(model, examples, cfg, snapshot)?.hash())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> ContentHash {
        ContentHash::of(&[i])
    }

    fn node(l: ContentHash, r: ContentHash) -> ContentHash {
        let mut bytes = vec![0x01];
        bytes.extend_from_slice(l.as_bytes());
        bytes.extend_from_slice(r.as_bytes());
        ContentHash::of(&bytes)
    }

    #[test]
    fn merkle_root_pairs_neighbours_and_promotes_an_odd_one() {
        assert_eq!(merkle_root(&[h(1)]), h(1));
        assert_eq!(merkle_root(&[h(1), h(2)]), node(h(1), h(2)));
        assert_eq!(
            merkle_root(&[h(1), h(2), h(3)]),
            node(node(h(1), h(2)), h(3))
        );
        assert_eq!(
            merkle_root(&[h(1), h(2), h(3), h(4), h(5)]),
            node(node(node(h(1), h(2)), node(h(3), h(4))), h(5))
        );
        assert_ne!(merkle_root(&[h(1), h(2)]), merkle_root(&[h(2), h(1)]));
        assert_eq!(merkle_root(&[]), ContentHash::of(&[0x02]));
    }

    #[test]
    fn batch_leaves_bind_the_step_and_the_order() {
        let mut bytes = vec![0x00];
        for v in [3u64, 2, 7, 1] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(batch_leaf(3, &[7, 1]), ContentHash::of(&bytes));
        assert_ne!(batch_leaf(3, &[7, 1]), batch_leaf(3, &[1, 7]));
        assert_ne!(batch_leaf(3, &[7, 1]), batch_leaf(4, &[7, 1]));
        // A leaf is never an inner node: they differ in their first byte.
        assert_ne!(batch_leaf(0, &[]), merkle_root(&[h(0), h(1)]));
    }
}
