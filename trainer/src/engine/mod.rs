//! The CPU inference engine: the Llama of [`crate::model`] computed straight from the GGUF's
//! quantized blocks, for fast generation and perplexity on the CPU.
//!
//! The burn [`Llama`](crate::model::Llama) is the model that trains and runs on any device; it
//! holds f32 weights (~540 MB for SmolLM2-135M). Decoding reads every weight once per token, so
//! the engine keeps the weights as the file's blocks (~98 MB of Q4_1 / Q8_0 for SmolLM2-135M) and
//! multiplies them with [`kernels`] that decode blocks on the fly. Prefill decodes each weight row
//! once per call and reuses it for every prompt token. Activations, the KV cache and the
//! attention are f32; tests check the engine against the same independent f64 reference as the
//! burn model.

pub mod kernels;

use rayon::prelude::*;

use crate::gguf::GgufFile;
use crate::model::weights::{Proj, RawMatrix};
use crate::model::{ContextLengthError, LlamaConfig, LoadError, Weights};

/// One block's weights, as encoded in the file (rows in HF order).
#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    q: RawMatrix,
    k: RawMatrix,
    v: RawMatrix,
    o: RawMatrix,
    gate: RawMatrix,
    up: RawMatrix,
    down: RawMatrix,
}

/// A loaded model, ready to generate.
#[derive(Debug)]
pub struct Engine {
    config: LlamaConfig,
    embed: RawMatrix,
    output: Option<RawMatrix>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    /// `inv_freq[i] = theta^(-2i/head_dim)`.
    inv_freq: Vec<f64>,
    /// A LoRA adapter applied on the fly (never merged into the blocks).
    adapter: Option<crate::adapter::AdapterWeights>,
}

/// Keys and values seen so far: per layer `[len, kv_heads·head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct EngineCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl EngineCache {
    pub fn new() -> EngineCache {
        EngineCache::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions from `len` on (to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize, kv_dim: usize) {
        if len < self.len {
            for k in self.keys.iter_mut().chain(self.values.iter_mut()) {
                k.truncate(len * kv_dim);
            }
            self.len = len;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|v| v.capacity() * 4)
            .sum()
    }
}

/// `Σ a·b` with 16 independent partial sums, a shape the compiler turns into vector code on any
/// CPU (the adapter's products are small next to the base's, but a scalar loop made an adapter
/// cost a third of the decoding speed).
fn lora_dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let n = a.len().min(b.len()) / L * L;
    let mut acc = [0f32; L];
    for (x, y) in a[..n].chunks_exact(L).zip(b[..n].chunks_exact(L)) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in a[n..].iter().zip(&b[n..]) {
        s += x * y;
    }
    s
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's (generation).
    Last,
    /// Every position's (perplexity).
    All,
}

impl Engine {
    /// Loads a `llama` GGUF, keeping its blocks as they are.
    pub fn from_gguf(file: &GgufFile) -> Result<Engine, LoadError> {
        Engine::from_weights(&Weights::gguf(file)?)
    }

    /// Loads a model from a GGUF file or a Hugging Face checkpoint (its F32/F16/BF16 tensors
    /// are multiplied as they are).
    pub fn from_weights(w: &Weights<'_>) -> Result<Engine, LoadError> {
        let c = w.config().clone();
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = |proj| w.projection(l, proj);
            layers.push(Layer {
                attn_norm: w.attn_norm(l)?,
                ffn_norm: w.ffn_norm(l)?,
                q: p(Proj::Q)?,
                k: p(Proj::K)?,
                v: p(Proj::V)?,
                o: p(Proj::O)?,
                gate: p(Proj::Gate)?,
                up: p(Proj::Up)?,
                down: p(Proj::Down)?,
            });
        }
        let half = c.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| c.rope_theta.powf(-2.0 * i as f64 / c.head_dim as f64))
            .collect();
        Ok(Engine {
            embed: w.embed()?,
            output: w.output()?,
            norm: w.final_norm()?,
            layers,
            inv_freq,
            config: c,
            adapter: None,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Applies a LoRA adapter from now on (`None` removes it). The base blocks are untouched:
    /// each adapted projection adds `s·B·(A·x)` to its output.
    pub fn set_adapter(
        &mut self,
        adapter: Option<crate::adapter::AdapterWeights>,
    ) -> Result<(), crate::adapter::AdapterError> {
        if let Some(a) = &adapter {
            self.check_adapter(a)?;
        }
        self.adapter = adapter;
        Ok(())
    }

    /// Checks that `a` fits this model (its factors' shapes and layers), so that it can be
    /// passed to [`Engine::forward_with`].
    pub fn check_adapter(
        &self,
        a: &crate::adapter::AdapterWeights,
    ) -> Result<(), crate::adapter::AdapterError> {
        {
            for l in 0..self.layers.len() {
                for p in Proj::ALL {
                    if let Some(f) = a.get(l, p) {
                        let (rows, cols) = p.shape(&self.config);
                        if (f.d_out, f.d_in) != (rows, cols) {
                            return Err(crate::adapter::AdapterError::BadSpec {
                                field: "factors",
                                reason: format!(
                                    "layer {l} {}: [{}, {}] factors on a [{rows}, {cols}] weight",
                                    p.hf_name(),
                                    f.d_out,
                                    f.d_in
                                ),
                            });
                        }
                    }
                }
            }
            if a.factors.keys().any(|(l, _)| *l >= self.layers.len()) {
                return Err(crate::adapter::AdapterError::BadSpec {
                    field: "factors",
                    reason: format!(
                        "the adapter has layers beyond the model's {}",
                        self.layers.len()
                    ),
                });
            }
        }
        Ok(())
    }

    /// `y[t] += s·B·(A·x[t])` for every token, when `adapter` adapts `proj` of `layer`.
    fn add_lora(
        adapter: Option<&crate::adapter::AdapterWeights>,
        layer: usize,
        proj: Proj,
        x: &[f32],
        y: &mut [f32],
    ) {
        let Some(ad) = adapter else { return };
        let Some(f) = ad.get(layer, proj) else { return };
        let r = ad.spec.rank;
        let s = ad.spec.scaling();
        let mut down = vec![0f32; r];
        for (xt, yt) in x.chunks_exact(f.d_in).zip(y.chunks_exact_mut(f.d_out)) {
            for (k, d) in down.iter_mut().enumerate() {
                *d = lora_dot(&f.a[k * f.d_in..(k + 1) * f.d_in], xt) * s;
            }
            for (o, yo) in yt.iter_mut().enumerate() {
                *yo += lora_dot(&f.b[o * r..(o + 1) * r], &down);
            }
        }
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let m = |w: &RawMatrix| w.bytes.len();
        m(&self.embed)
            + self.output.as_ref().map_or(0, m)
            + self
                .layers
                .iter()
                .map(|l| m(&l.q) + m(&l.k) + m(&l.v) + m(&l.o) + m(&l.gate) + m(&l.up) + m(&l.down))
                .sum::<usize>()
    }

    /// Runs `tokens` after the positions in `cache` (appending to it) and returns the logits of
    /// the last position (`[vocab]`) or of every position (`[tokens, vocab]`).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut EngineCache,
        which: Logits,
    ) -> Result<Vec<f32>, EngineError> {
        self.forward_with(tokens, cache, which, self.adapter.as_ref())
    }

    /// [`Engine::forward`] with `adapter` applied on the fly instead of the engine's own (one
    /// base serves many adapters at once; check each with [`Engine::check_adapter`] first).
    pub fn forward_with(
        &self,
        tokens: &[u32],
        cache: &mut EngineCache,
        which: Logits,
        adapter: Option<&crate::adapter::AdapterWeights>,
    ) -> Result<Vec<f32>, EngineError> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let kv_dim = c.num_kv_heads * hd;
        let n = tokens.len();
        let past = cache.len;
        if past + n > c.max_seq_len {
            return Err(EngineError::Context(ContextLengthError {
                tokens: past + n,
                max: c.max_seq_len,
            }));
        }
        if let Some(&bad) = tokens.iter().find(|t| **t as usize >= c.vocab_size) {
            return Err(EngineError::BadToken {
                token: bad,
                vocab: c.vocab_size,
            });
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        if cache.keys.len() != self.layers.len() {
            cache.keys = vec![Vec::new(); self.layers.len()];
            cache.values = vec![Vec::new(); self.layers.len()];
        }
        // Embedding rows.
        let mut x = vec![0f32; n * h];
        let rb = self.embed.row_bytes();
        for (t, tok) in tokens.iter().enumerate() {
            let r = *tok as usize;
            crate::gguf::quant::dequantize(
                self.embed.ty,
                &self.embed.bytes[r * rb..(r + 1) * rb],
                &mut x[t * h..(t + 1) * h],
            );
        }
        let eps = c.rms_norm_eps as f32;
        let mut normed = vec![0f32; n * h];
        let mut q = vec![0f32; n * c.num_heads * hd];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * c.num_heads * hd];
        let mut o = vec![0f32; n * h];
        let mut gate = vec![0f32; n * c.intermediate_size];
        let mut up = vec![0f32; n * c.intermediate_size];
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm_rows(&x, &layer.attn_norm, eps, &mut normed);
            if n == 1 {
                kernels::matvec_many(&mut [
                    (&layer.q, &normed, &mut q),
                    (&layer.k, &normed, &mut k),
                    (&layer.v, &normed, &mut v),
                ]);
            } else {
                kernels::matmul(&layer.q, &normed, &mut q);
                kernels::matmul(&layer.k, &normed, &mut k);
                kernels::matmul(&layer.v, &normed, &mut v);
            }
            Self::add_lora(adapter, li, Proj::Q, &normed, &mut q);
            Self::add_lora(adapter, li, Proj::K, &normed, &mut k);
            Self::add_lora(adapter, li, Proj::V, &normed, &mut v);
            for t in 0..n {
                self.rope(
                    &mut q[t * c.num_heads * hd..(t + 1) * c.num_heads * hd],
                    past + t,
                );
                self.rope(&mut k[t * kv_dim..(t + 1) * kv_dim], past + t);
            }
            cache.keys[li].extend_from_slice(&k);
            cache.values[li].extend_from_slice(&v);
            self.attention(&q, &cache.keys[li], &cache.values[li], past, &mut attn);
            kernels::matmul(&layer.o, &attn, &mut o);
            Self::add_lora(adapter, li, Proj::O, &attn, &mut o);
            add(&mut x, &o);
            rms_norm_rows(&x, &layer.ffn_norm, eps, &mut normed);
            if n == 1 {
                kernels::matvec_many(&mut [
                    (&layer.gate, &normed, &mut gate),
                    (&layer.up, &normed, &mut up),
                ]);
            } else {
                kernels::matmul(&layer.gate, &normed, &mut gate);
                kernels::matmul(&layer.up, &normed, &mut up);
            }
            Self::add_lora(adapter, li, Proj::Gate, &normed, &mut gate);
            Self::add_lora(adapter, li, Proj::Up, &normed, &mut up);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            kernels::matmul(&layer.down, &gate, &mut o);
            Self::add_lora(adapter, li, Proj::Down, &gate, &mut o);
            add(&mut x, &o);
        }
        cache.len = past + n;
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let rows = match which {
            Logits::Last => &x[(n - 1) * h..],
            Logits::All => &x[..],
        };
        let m = rows.len() / h;
        let mut final_norm = vec![0f32; m * h];
        rms_norm_rows(rows, &self.norm, eps, &mut final_norm);
        let mut logits = vec![0f32; m * c.vocab_size];
        kernels::matmul(head, &final_norm, &mut logits);
        Ok(logits)
    }

    /// NeoX-style rotary embedding of every head in `v` at position `pos`.
    fn rope(&self, v: &mut [f32], pos: usize) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        for head in v.chunks_exact_mut(hd) {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = (pos as f64 * f).sin_cos();
                let (a, b) = (head[i] as f64, head[i + half] as f64);
                head[i] = (a * cos - b * sin) as f32;
                head[i + half] = (b * cos + a * sin) as f32;
            }
        }
    }

    /// Causal attention of the `n` new queries over all `past + n` cached positions.
    fn attention(&self, q: &[f32], keys: &[f32], values: &[f32], past: usize, out: &mut [f32]) {
        let c = &self.config;
        let (hd, nh) = (c.head_dim, c.num_heads);
        let kv_dim = c.num_kv_heads * hd;
        let group = nh / c.num_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let one = |(idx, o): (usize, &mut [f32])| {
            let (t, head) = (idx / nh, idx % nh);
            let kvh = head / group;
            let qv = &q[idx * hd..(idx + 1) * hd];
            kernels::attend_dispatch(qv, keys, values, kv_dim, kvh * hd, past + t + 1, scale, o);
        };
        // Few queries over a short context: a fork-join costs more than the work. Beyond that,
        // even one decoded token's heads run in parallel (measured: decode 105 -> 125 tokens/s
        // with a 128-token prompt, where attention on one thread had left the other idle).
        if out.len() / hd * (past + out.len() / hd / nh) < 1024 {
            out.chunks_mut(hd).enumerate().for_each(one);
        } else {
            out.par_chunks_mut(hd).enumerate().for_each(one);
        }
    }
}

/// What can go wrong in a forward pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Context(#[from] ContextLengthError),
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    BadToken { token: u32, vocab: usize },
    #[error("device: {0}")]
    Device(String),
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
            *o = v * inv * g;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
