//! The surrogate training task: least squares through a low-rank adapter.
//!
//! The "model" is one linear layer `y = W x` with a frozen base `W0 = 0` and a LoRA adapter,
//! `W = s·B·A` (`B` is `dim_out x r`, `A` is `r x dim_in`, `s = alpha / r`). The data asks for
//! a known change `T` of rank `true_rank`: a clean shard's rows are `y = (T + E_j) x + noise`,
//! with a small per-shard deviation `E_j`. Other shard kinds: a duplicate copies another shard's
//! rows (near-duplicate: a little jitter), a noisy shard has heavy label noise, a harmful one
//! asks for `-T`.
//!
//! Workers train honestly: SGD on `(B, A)` from the round's start adapter over their shards'
//! rows, in batches drawn from their training seed, with a commitment (hash of `(B, A)`) every
//! K steps, so a spot check really replays K steps and compares hashes. Validation loss is the
//! exact quadratic `L(M) = (tr(M G Mᵀ) - 2 tr(M Cᵀ) + c) / dim_out` over a held-out set, so
//! merges, losses and Shapley values are exact and cheap: the coalition game
//! `v(S) = L(M0) - L(M0 + Σ_{i∈S} u_i)` is quadratic in the updates, and its Shapley value has
//! the closed form `φ_i = -⟨∇L(M0), u_i⟩ - ⟨u_i, D G⟩ / dim_out` with `D = Σ_i u_i`.
//!
//! Nothing here knows about rounds, messages or time.

// Matrix arithmetic reads best with explicit indices.
#![allow(clippy::needless_range_loop)]

use cohort_protocol::hash::ContentHash;
use cohort_protocol::rng::SplitMix64;
use rand::Rng as _;

use super::config::RunConfig;
use super::linalg::{Mat, truncate};
use crate::seed::{derive_seed, rng_for};

const SHARD_STREAM: u64 = 0x5301;
const TARGET_STREAM: u64 = 0x5302;
const TRUTH_STREAM: u64 = 0x5303;
const VAL_STREAM: u64 = 0x5304;
const INIT_STREAM: u64 = 0x5305;
const BATCH_STREAM: u64 = 0x5306;
const FAKE_STREAM: u64 = 0x5307;

/// What a shard holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardKind {
    /// Rows of the task with light noise.
    Clean,
    /// A near-copy of shard `of`'s rows.
    Duplicate {
        /// The shard it copies.
        of: usize,
    },
    /// Heavy label noise.
    Noisy,
    /// Labels that ask for the opposite change.
    Harmful,
}

impl ShardKind {
    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Duplicate { .. } => "duplicate",
            Self::Noisy => "noisy",
            Self::Harmful => "harmful",
        }
    }
}

/// A LoRA adapter of the surrogate layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// `dim_out x r`.
    pub b: Mat,
    /// `r x dim_in`.
    pub a: Mat,
}

impl Adapter {
    /// The hash of its bytes: the blob hash and the state commitment.
    pub fn hash(&self) -> ContentHash {
        let mut bytes = self.b.le_bytes();
        bytes.extend(self.a.le_bytes());
        ContentHash::of(&bytes)
    }

    /// Whether every entry is finite.
    pub fn is_finite(&self) -> bool {
        self.b.is_finite() && self.a.is_finite()
    }
}

/// The validation set as a quadratic form.
#[derive(Clone, Debug)]
struct Quadratic {
    /// `XᵀX / n`, `dim_in x dim_in`.
    g: Mat,
    /// `YᵀX / n`, `dim_out x dim_in`.
    c: Mat,
    /// `tr(YᵀY) / n`.
    yy: f64,
}

/// One worker's honest training of a round.
#[derive(Clone, Debug)]
pub struct Training {
    /// The adapter after the last step.
    pub adapter: Adapter,
    /// Per segment: its end step, its state and the hash of its batch indices.
    pub segments: Vec<(u32, Adapter, ContentHash)>,
    /// Steps taken.
    pub steps: u32,
    /// Rows processed (the "tokens" of the commit).
    pub rows: u64,
    /// Batch loss per step.
    pub losses: Vec<f32>,
}

/// The task: ground truth, shards and validation set, all derived from the run's seed.
#[derive(Clone, Debug)]
pub struct Task {
    seed: u64,
    dim_in: usize,
    dim_out: usize,
    rank: usize,
    scale: f64,
    rows: usize,
    batch: usize,
    epochs: u32,
    lr: f64,
    noise: f64,
    hetero: f64,
    segment_steps: u32,
    truth: Mat,
    kinds: Vec<ShardKind>,
    val: Quadratic,
    a0: Mat,
}

/// A standard normal draw (Box–Muller; one of the pair is dropped for simplicity).
fn normal(rng: &mut impl rand::Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn random_mat(rng: &mut impl rand::Rng, rows: usize, cols: usize, sd: f64) -> Mat {
    Mat::from_fn(rows, cols, |_, _| sd * normal(rng))
}

impl Task {
    /// Builds the task of `config`: the truth, the shard kinds (seeded) and the validation set.
    pub fn new(config: &RunConfig, scale: f64) -> Self {
        let (m, k) = (config.dim_out, config.dim_in);
        let mut rng = rng_for(config.seed, TRUTH_STREAM, 0);
        // T = U·Vᵀ with ‖T‖_F about sqrt(dim_out): each output has unit-size signal.
        let u = random_mat(&mut rng, m, config.true_rank, 1.0);
        let v = random_mat(&mut rng, config.true_rank, k, 1.0);
        let raw = u.mul(&v);
        let truth = raw.scaled((m as f64).sqrt() / raw.frob().max(1e-12));

        let n = config.shard_count();
        let mut kinds = vec![ShardKind::Clean; n];
        let mut order: Vec<usize> = (0..n).collect();
        let mut krng = rng_for(config.seed, SHARD_STREAM, u64::MAX);
        for i in (1..n).rev() {
            let j = krng.random_range(0..=i);
            order.swap(i, j);
        }
        let dup = (config.duplicate_fraction * n as f64).round() as usize;
        let noisy = (config.noisy_fraction * n as f64).round() as usize;
        let harmful = (config.harmful_fraction * n as f64).round() as usize;
        let mut it = order.iter().copied();
        let dups: Vec<usize> = it.by_ref().take(dup).collect();
        for s in it.by_ref().take(noisy) {
            kinds[s] = ShardKind::Noisy;
        }
        for s in it.by_ref().take(harmful) {
            kinds[s] = ShardKind::Harmful;
        }
        let clean: Vec<usize> = it.collect();
        for (i, s) in dups.into_iter().enumerate() {
            kinds[s] = match clean.get(i % clean.len().max(1)) {
                Some(&of) => ShardKind::Duplicate { of },
                None => ShardKind::Clean,
            };
        }

        let mut vrng = rng_for(config.seed, VAL_STREAM, 0);
        let mut g = Mat::zeros(k, k);
        let mut c = Mat::zeros(m, k);
        let mut yy = 0.0;
        for _ in 0..config.val_rows {
            let x: Vec<f64> = (0..k).map(|_| normal(&mut vrng)).collect();
            let y: Vec<f64> = (0..m)
                .map(|i| {
                    (0..k).map(|j| truth.get(i, j) * x[j]).sum::<f64>()
                        + config.noise * normal(&mut vrng)
                })
                .collect();
            for a in 0..k {
                for b in 0..k {
                    g.data_mut()[a * k + b] += x[a] * x[b];
                }
            }
            for a in 0..m {
                for b in 0..k {
                    c.data_mut()[a * k + b] += y[a] * x[b];
                }
                yy += y[a] * y[a];
            }
        }
        let nv = config.val_rows as f64;
        let r = config.rank as usize;
        let mut irng = rng_for(config.seed, INIT_STREAM, 0);
        // PEFT's initialisation: A random (Kaiming-like), B zero.
        let a0 = random_mat(&mut irng, r, k, 1.0 / (k as f64).sqrt());
        Self {
            seed: config.seed,
            dim_in: k,
            dim_out: m,
            rank: r,
            scale,
            rows: config.rows_per_shard,
            batch: config.batch,
            epochs: config.epochs,
            lr: config.lr,
            noise: config.noise,
            hetero: config.hetero,
            segment_steps: config.segment_steps,
            truth,
            kinds,
            val: Quadratic {
                g: g.scaled(1.0 / nv),
                c: c.scaled(1.0 / nv),
                yy: yy / nv,
            },
            a0,
        }
    }

    /// Makes `shards` label-flipped (harmful: they ask for `-T`): a data poisoner's shards.
    pub fn flip(&mut self, shards: &[usize]) {
        for &j in shards {
            if let Some(k) = self.kinds.get_mut(j) {
                *k = ShardKind::Harmful;
            }
        }
    }

    /// The shards' kinds.
    pub fn kinds(&self) -> &[ShardKind] {
        &self.kinds
    }

    /// The adapter's scaling factor.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The fresh adapter of round 0 (`B = 0`, `A` from the job seed).
    pub fn initial(&self) -> Adapter {
        Adapter {
            b: Mat::zeros(self.dim_out, self.rank),
            a: self.a0.clone(),
        }
    }

    /// The frozen A of FFA-LoRA.
    pub fn frozen_a(&self) -> &Mat {
        &self.a0
    }

    /// `s·B·A`.
    pub fn dense(&self, a: &Adapter) -> Mat {
        a.b.mul(&a.a).scaled(self.scale)
    }

    /// Validation loss of the layer `W = M`.
    pub fn loss_of(&self, m: &Mat) -> f64 {
        let mg = m.mul(&self.val.g);
        (mg.dot(m) - 2.0 * m.dot(&self.val.c) + self.val.yy) / self.dim_out as f64
    }

    /// Validation loss of an adapter.
    pub fn loss(&self, a: &Adapter) -> f64 {
        self.loss_of(&self.dense(a))
    }

    /// The validation loss of the truth itself (the noise floor).
    pub fn optimum_loss(&self) -> f64 {
        self.loss_of(&self.truth)
    }

    /// Shard `j`'s rows `(x, y)`, generated from the seed (never stored).
    fn shard_rows(&self, j: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let (m, k) = (self.dim_out, self.dim_in);
        let kind = self.kinds[j];
        let source = match kind {
            ShardKind::Duplicate { of } => of,
            _ => j,
        };
        let mut trng = rng_for(self.seed, TARGET_STREAM, source as u64);
        let e = random_mat(&mut trng, m, k, 1.0);
        let e = e.scaled(self.hetero * self.truth.frob() / e.frob().max(1e-12));
        let mut target = self.truth.clone();
        target.add_scaled(1.0, &e);
        let (target, noise) = match kind {
            ShardKind::Clean | ShardKind::Duplicate { .. } => (target, self.noise),
            ShardKind::Noisy => (target, 2.0),
            ShardKind::Harmful => (target.scaled(-1.0), self.noise),
        };
        let mut rng = rng_for(self.seed, SHARD_STREAM, source as u64);
        let mut jitter = rng_for(self.seed, SHARD_STREAM ^ 1, j as u64);
        let mut xs = Vec::with_capacity(self.rows);
        let mut ys = Vec::with_capacity(self.rows);
        for _ in 0..self.rows {
            let x: Vec<f64> = (0..k).map(|_| normal(&mut rng)).collect();
            let y: Vec<f64> = (0..m)
                .map(|i| {
                    let clean: f64 = (0..k).map(|l| target.get(i, l) * x[l]).sum();
                    let n = noise * normal(&mut rng);
                    let jit = if matches!(kind, ShardKind::Duplicate { .. }) {
                        0.01 * normal(&mut jitter)
                    } else {
                        0.0
                    };
                    clean + n + jit
                })
                .collect();
            xs.push(x);
            ys.push(y);
        }
        (xs, ys)
    }

    fn rows_of(&self, shards: &[usize]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for &s in shards {
            let (x, y) = self.shard_rows(s);
            xs.extend(x);
            ys.extend(y);
        }
        (xs, ys)
    }

    /// Steps a worker with `shards` takes in a round.
    pub fn steps_for(&self, shards: usize) -> u32 {
        let rows = shards * self.rows;
        (self.epochs as usize * rows.div_ceil(self.batch)) as u32
    }

    /// The batch of step `step` under training seed `seed`, over `rows` rows.
    fn batch_indices(&self, seed: u64, step: u32, rows: usize) -> Vec<usize> {
        let mut rng = SplitMix64::new(derive_seed(seed, BATCH_STREAM, u64::from(step)));
        (0..self.batch)
            .map(|_| ((u128::from(rng.next_u64()) * rows as u128) >> 64) as usize)
            .collect()
    }

    /// Runs SGD steps `from..to` on `adapter` over the rows; returns the batch losses and the
    /// hash of the batch indices used.
    fn run_steps(
        &self,
        adapter: &mut Adapter,
        data: &(Vec<Vec<f64>>, Vec<Vec<f64>>),
        seed: u64,
        from: u32,
        to: u32,
        frozen_a: bool,
    ) -> (Vec<f32>, ContentHash) {
        let (xs, ys) = data;
        let (m, k) = (self.dim_out, self.dim_in);
        let mut losses = Vec::new();
        let mut indices = Vec::new();
        for step in from..to {
            let batch = self.batch_indices(seed, step, xs.len());
            let w = self.dense(adapter);
            // Gradient of the batch's mean of ‖W x - y‖² / m with respect to W.
            let mut grad = Mat::zeros(m, k);
            let mut loss = 0.0;
            for &r in &batch {
                indices.extend((r as u32).to_le_bytes());
                let x = &xs[r];
                for i in 0..m {
                    let pred: f64 = (0..k).map(|l| w.get(i, l) * x[l]).sum();
                    let err = pred - ys[r][i];
                    loss += err * err;
                    let g = 2.0 * err / (m * batch.len()) as f64;
                    let row = &mut grad.data_mut()[i * k..(i + 1) * k];
                    for (d, xl) in row.iter_mut().zip(x) {
                        *d += g * xl;
                    }
                }
            }
            losses.push((loss / (m * batch.len()) as f64) as f32);
            let gb = grad.mul(&adapter.a.t()).scaled(self.scale);
            let ga = adapter.b.t().mul(&grad).scaled(self.scale);
            adapter.b.add_scaled(-self.lr, &gb);
            if !frozen_a {
                adapter.a.add_scaled(-self.lr, &ga);
            }
        }
        (losses, ContentHash::of(&indices))
    }

    /// A worker's honest training on `shards` from `start` with training seed `seed`.
    pub fn train(&self, start: &Adapter, shards: &[usize], seed: u64, frozen_a: bool) -> Training {
        let data = self.rows_of(shards);
        let steps = self.steps_for(shards.len());
        let mut adapter = start.clone();
        let mut segments = Vec::new();
        let mut losses = Vec::new();
        let mut at = 0;
        while at < steps {
            let end = (at + self.segment_steps).min(steps);
            let (l, batches) = self.run_steps(&mut adapter, &data, seed, at, end, frozen_a);
            losses.extend(l);
            segments.push((end, adapter.clone(), batches));
            at = end;
        }
        Training {
            adapter,
            segments,
            steps,
            rows: u64::from(steps) * self.batch as u64,
            losses,
        }
    }

    /// Replays the steps `from..to` from `state` (a spot check): the adapter it reaches.
    pub fn replay(
        &self,
        state: &Adapter,
        shards: &[usize],
        seed: u64,
        from: u32,
        to: u32,
        frozen_a: bool,
    ) -> Adapter {
        let data = self.rows_of(shards);
        let mut adapter = state.clone();
        self.run_steps(&mut adapter, &data, seed, from, to, frozen_a);
        adapter
    }

    /// An adapter whose product is `m` (rank `r` by truncated SVD), with the truncation error.
    pub fn factor(&self, m: &Mat) -> (Adapter, f64) {
        let (b, a, err) = truncate(&m.scaled(1.0 / self.scale), self.rank);
        (Adapter { b, a }, err)
    }

    /// A random adapter with about the norm of `like` (a made-up update).
    pub fn random_like(&self, like: &Adapter, seed: u64) -> Adapter {
        let mut rng = rng_for(seed, FAKE_STREAM, 0);
        let sd_b = like.b.frob() / ((like.b.rows() * like.b.cols()) as f64).sqrt();
        let sd_a = like.a.frob() / ((like.a.rows() * like.a.cols()) as f64).sqrt();
        Adapter {
            b: random_mat(&mut rng, like.b.rows(), like.b.cols(), sd_b.max(1e-3)),
            a: random_mat(&mut rng, like.a.rows(), like.a.cols(), sd_a.max(1e-3)),
        }
    }

    /// The gradient of the validation loss at `m0`.
    fn gradient(&self, m0: &Mat) -> Mat {
        let mut g = m0.mul(&self.val.g);
        g.add_scaled(-1.0, &self.val.c);
        g.scaled(2.0 / self.dim_out as f64)
    }

    /// Exact Shapley values of the game `v(S) = L(m0) - L(m0 + Σ_{i∈S} u_i)` (closed form).
    pub fn shapley(&self, m0: &Mat, u: &[Mat]) -> Vec<f64> {
        let g = self.gradient(m0);
        let mut d = Mat::zeros(self.dim_out, self.dim_in);
        for x in u {
            d.add_scaled(1.0, x);
        }
        let dg = d.mul(&self.val.g);
        u.iter()
            .map(|x| -g.dot(x) - x.dot(&dg) / self.dim_out as f64)
            .collect()
    }
}

/// `v(S) = L(m0) - L(m0 + Σ_{i∈S} u_i)` for coalitions given as sorted member lists, kept as a
/// running sum that moves by the difference from the previous coalition (permutation sampling
/// asks for coalitions that differ by one member).
#[derive(Debug)]
pub struct Coalitions<'a> {
    task: &'a Task,
    m0: Mat,
    u: &'a [Mat],
    base: f64,
    sum: Mat,
    members: Vec<usize>,
    /// Coalitions evaluated.
    pub evaluations: usize,
}

impl<'a> Coalitions<'a> {
    /// The game of updates `u` on top of `m0`.
    pub fn new(task: &'a Task, m0: Mat, u: &'a [Mat]) -> Self {
        let base = task.loss_of(&m0);
        let sum = Mat::zeros(m0.rows(), m0.cols());
        Self {
            task,
            m0,
            u,
            base,
            sum,
            members: Vec::new(),
            evaluations: 0,
        }
    }

    /// `v(members)`.
    pub fn value(&mut self, members: &[usize]) -> f64 {
        self.evaluations += 1;
        let (mut i, mut j) = (0, 0);
        let old = std::mem::take(&mut self.members);
        while i < old.len() || j < members.len() {
            match (old.get(i), members.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a < b => {
                    self.sum.add_scaled(-1.0, &self.u[*a]);
                    i += 1;
                }
                (Some(a), None) => {
                    self.sum.add_scaled(-1.0, &self.u[*a]);
                    i += 1;
                }
                (_, Some(b)) => {
                    self.sum.add_scaled(1.0, &self.u[*b]);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        self.members = members.to_vec();
        let mut m = self.m0.clone();
        m.add_scaled(1.0, &self.sum);
        self.base - self.task.loss_of(&m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        let c = RunConfig {
            volunteers: 8,
            ..RunConfig::default()
        };
        Task::new(&c, 2.0)
    }

    #[test]
    fn training_lowers_the_loss_and_replays_bit_for_bit() {
        let t = task();
        let start = t.initial();
        let tr = t.train(&start, &[0, 1], 7, false);
        assert!(t.loss(&tr.adapter) < t.loss(&start));
        // Segment 1 replayed from segment 0's state reaches segment 1's state exactly.
        let (e0, s0, _) = &tr.segments[0];
        let (e1, s1, _) = &tr.segments[1];
        let again = t.replay(s0, &[0, 1], 7, *e0, *e1, false);
        assert_eq!(again.hash(), s1.hash());
        let other = t.replay(s0, &[0, 1], 8, *e0, *e1, false);
        assert_ne!(other.hash(), s1.hash());
    }

    #[test]
    fn closed_form_shapley_matches_the_protocols_exact_shapley() {
        let t = task();
        let start = t.initial();
        let m0 = t.dense(&start);
        let u: Vec<Mat> = (0..6)
            .map(|i| {
                let tr = t.train(&start, &[i], i as u64, false);
                t.dense(&tr.adapter).sub(&m0).scaled(1.0 / 6.0)
            })
            .collect();
        let closed = t.shapley(&m0, &u);
        let mut game = Coalitions::new(&t, m0.clone(), &u);
        let exact =
            cohort_protocol::attribution::shapley_exact(6, |s| game.value(s)).expect("exact");
        for (a, b) in closed.iter().zip(&exact) {
            assert!((a - b).abs() < 1e-10, "{closed:?} vs {exact:?}");
        }
    }
}
