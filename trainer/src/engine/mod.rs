//! The CPU inference engine: the Llama of [`crate::model`] computed straight from the GGUF's
//! quantized blocks, for fast generation and perplexity on the CPU.
//!
//! The burn [`Llama`](crate::model::Llama) is the model that trains and runs on any device; it
//! holds f32 weights (~540 MB for SmolLM2-135M). Decoding reads every weight once per token, so
//! the engine keeps the weights as the file's blocks (~98 MB of Q4_1 / Q8_0 for SmolLM2-135M) and
//! multiplies them with [`kernels`] that decode blocks on the fly. Prefill decodes each weight row
//! once per call and reuses it for every prompt token; [`Engine::decode_batch`] decodes one token
//! of several sequences (a server's concurrent streams) with one pass over the weights, each
//! sequence's logits bit for bit those of its own forward pass. Activations, the KV cache and the
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

/// One projection's adapter factors, ready to add `s·B·(A·x)` to a token's outputs.
struct Lora<'a> {
    f: &'a crate::adapter::Factors,
    rank: usize,
    scale: f32,
    /// `B` transposed (`[rank, d_out]`) when its rows are shorter than 16 (the usual ranks) and
    /// several tokens use it ([`kernels::lora_up`]).
    bt: Option<Vec<f32>>,
}

impl<'a> Lora<'a> {
    /// The factors of `proj` of `layer`, for `tokens` tokens (below 4, transposing `B` costs
    /// more than it saves).
    fn new(
        adapter: Option<&'a crate::adapter::AdapterWeights>,
        layer: usize,
        proj: Proj,
        tokens: usize,
    ) -> Option<Lora<'a>> {
        let ad = adapter?;
        let f = ad.get(layer, proj)?;
        let rank = ad.spec.rank;
        let bt = (rank < 16 && tokens >= 4).then(|| {
            let mut bt = vec![0f32; rank * f.d_out];
            for (o, row) in f.b.chunks_exact(rank).enumerate() {
                for (k, b) in row.iter().enumerate() {
                    bt[k * f.d_out + o] = *b;
                }
            }
            bt
        });
        Some(Lora {
            f,
            rank,
            scale: ad.spec.scaling(),
            bt,
        })
    }

    /// `y += s·B·(A·x)` for one token.
    fn apply(&self, x: &[f32], y: &mut [f32]) {
        let (b, transposed) = match &self.bt {
            Some(bt) => (bt.as_slice(), true),
            None => (self.f.b.as_slice(), false),
        };
        let down = kernels::lora_down(&self.f.a, self.rank, self.scale, x);
        kernels::lora_up(b, transposed, y.len(), 0, &down, y);
    }
}

/// One sequence of a batched decode step ([`Engine::decode_batch`]).
#[derive(Debug)]
pub struct DecodeItem<'a> {
    /// The token to run.
    pub token: u32,
    /// The sequence's keys and values so far (the token's are appended).
    pub cache: &'a mut EngineCache,
    /// The sequence's adapter (checked with [`Engine::check_adapter`]), if any.
    pub adapter: Option<&'a crate::adapter::AdapterWeights>,
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
        let Some(lora) = adapter
            .and_then(|a| a.get(layer, proj))
            .and_then(|f| Lora::new(adapter, layer, proj, x.len() / f.d_in))
        else {
            return;
        };
        for (xt, yt) in x
            .chunks_exact(lora.f.d_in)
            .zip(y.chunks_exact_mut(lora.f.d_out))
        {
            lora.apply(xt, yt);
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
        // The whole pass runs on a worker of the thread pool: its parallel products then split
        // without each one waking the pool from outside and waiting on it (measured: decoding
        // one token 7.6 -> 6.0 ms, and an adapter's serial products no longer cost a third).
        rayon::scope(|_| self.forward_in_pool(tokens, cache, which, adapter))
    }

    fn forward_in_pool(
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

    /// One decode step of several sequences at once: each item's token runs after the positions
    /// of its own cache (and is appended to it), under its own adapter. Returns the logits
    /// `[items, vocab]`, each item's bit for bit those of
    /// `forward_with(&[token], cache, Logits::Last, adapter)`.
    ///
    /// Every linear layer of the base is one batched product over the items' activations
    /// ([`kernels::matvec_batch_many`]: the weights are read once per step for all the items,
    /// where separate forward passes read them once per item); attention and the adapters'
    /// products are per item. Nothing is changed when an item is invalid (a full context, a
    /// token outside the vocabulary): the error names the first.
    pub fn decode_batch(&self, items: &mut [DecodeItem<'_>]) -> Result<Vec<f32>, EngineError> {
        // On a worker of the thread pool, as `forward_with`.
        rayon::scope(|_| self.decode_batch_in_pool(items))
    }

    fn decode_batch_in_pool(&self, items: &mut [DecodeItem<'_>]) -> Result<Vec<f32>, EngineError> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let kv_dim = c.num_kv_heads * hd;
        let q_dim = c.num_heads * hd;
        let n = items.len();
        for it in items.iter() {
            if it.cache.len + 1 > c.max_seq_len {
                return Err(EngineError::Context(ContextLengthError {
                    tokens: it.cache.len + 1,
                    max: c.max_seq_len,
                }));
            }
            if it.token as usize >= c.vocab_size {
                return Err(EngineError::BadToken {
                    token: it.token,
                    vocab: c.vocab_size,
                });
            }
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        for it in items.iter_mut() {
            if it.cache.keys.len() != self.layers.len() {
                it.cache.keys = vec![Vec::new(); self.layers.len()];
                it.cache.values = vec![Vec::new(); self.layers.len()];
            }
        }
        let mut x = vec![0f32; n * h];
        let rb = self.embed.row_bytes();
        for (it, xt) in items.iter().zip(x.chunks_exact_mut(h)) {
            let r = it.token as usize;
            crate::gguf::quant::dequantize(
                self.embed.ty,
                &self.embed.bytes[r * rb..(r + 1) * rb],
                xt,
            );
        }
        let adapters: Vec<Option<&crate::adapter::AdapterWeights>> =
            items.iter().map(|it| it.adapter).collect();
        // Each item's rotary angles, once for all the layers.
        let angles: Vec<Vec<(f64, f64)>> =
            items.iter().map(|it| self.angles(it.cache.len)).collect();
        let eps = c.rms_norm_eps as f32;
        let mut normed = vec![0f32; n * h];
        let mut q = vec![0f32; n * q_dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * q_dim];
        let mut o = vec![0f32; n * h];
        let mut gate = vec![0f32; n * c.intermediate_size];
        let mut up = vec![0f32; n * c.intermediate_size];
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm_rows(&x, &layer.attn_norm, eps, &mut normed);
            kernels::matvec_batch_many(&mut [
                (&layer.q, &normed, &mut q),
                (&layer.k, &normed, &mut k),
                (&layer.v, &normed, &mut v),
            ]);
            Self::add_lora_each(&adapters, li, Proj::Q, &normed, &mut q);
            Self::add_lora_each(&adapters, li, Proj::K, &normed, &mut k);
            Self::add_lora_each(&adapters, li, Proj::V, &normed, &mut v);
            for (i, it) in items.iter_mut().enumerate() {
                rotate(&mut q[i * q_dim..(i + 1) * q_dim], &angles[i]);
                rotate(&mut k[i * kv_dim..(i + 1) * kv_dim], &angles[i]);
                it.cache.keys[li].extend_from_slice(&k[i * kv_dim..(i + 1) * kv_dim]);
                it.cache.values[li].extend_from_slice(&v[i * kv_dim..(i + 1) * kv_dim]);
            }
            self.attention_each(items, li, &q, &mut attn);
            kernels::matvec_batch(&layer.o, &attn, &mut o);
            Self::add_lora_each(&adapters, li, Proj::O, &attn, &mut o);
            add(&mut x, &o);
            rms_norm_rows(&x, &layer.ffn_norm, eps, &mut normed);
            kernels::matvec_batch_many(&mut [
                (&layer.gate, &normed, &mut gate),
                (&layer.up, &normed, &mut up),
            ]);
            Self::add_lora_each(&adapters, li, Proj::Gate, &normed, &mut gate);
            Self::add_lora_each(&adapters, li, Proj::Up, &normed, &mut up);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            kernels::matvec_batch(&layer.down, &gate, &mut o);
            Self::add_lora_each(&adapters, li, Proj::Down, &gate, &mut o);
            add(&mut x, &o);
        }
        for it in items.iter_mut() {
            it.cache.len += 1;
        }
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let mut final_norm = vec![0f32; n * h];
        rms_norm_rows(&x, &self.norm, eps, &mut final_norm);
        let mut logits = vec![0f32; n * c.vocab_size];
        kernels::matvec_batch(head, &final_norm, &mut logits);
        Ok(logits)
    }

    /// [`Engine::add_lora`] for each item of a batch (`x` and `y` hold one row per item), with
    /// its own adapter; items that share an adapter share its prepared factors.
    fn add_lora_each(
        adapters: &[Option<&crate::adapter::AdapterWeights>],
        layer: usize,
        proj: Proj,
        x: &[f32],
        y: &mut [f32],
    ) {
        let n = adapters.len();
        if adapters.iter().all(Option::is_none) {
            return;
        }
        let (d_in, d_out) = (x.len() / n, y.len() / n);
        // One prepared projection per distinct adapter (by address).
        let mut prepared: Vec<(&crate::adapter::AdapterWeights, Option<Lora<'_>>)> = Vec::new();
        for a in adapters.iter().flatten() {
            if !prepared.iter().any(|(b, _)| std::ptr::eq(*a, *b)) {
                let sharing = adapters
                    .iter()
                    .flatten()
                    .filter(|b| std::ptr::eq(*a, **b))
                    .count();
                prepared.push((a, Lora::new(Some(a), layer, proj, sharing)));
            }
        }
        let lora_of = |a: &Option<&crate::adapter::AdapterWeights>| -> Option<&Lora<'_>> {
            let a = (*a)?;
            prepared
                .iter()
                .find(|(b, _)| std::ptr::eq(a, *b))
                .and_then(|(_, l)| l.as_ref())
        };
        let one = |((a, xt), yt): (
            (&Option<&crate::adapter::AdapterWeights>, &[f32]),
            &mut [f32],
        )| {
            if let Some(lora) = lora_of(a) {
                lora.apply(xt, yt);
            }
        };
        if n < 4 {
            adapters
                .iter()
                .zip(x.chunks_exact(d_in))
                .zip(y.chunks_exact_mut(d_out))
                .for_each(one);
        } else {
            adapters
                .par_iter()
                .zip(x.par_chunks_exact(d_in))
                .zip(y.par_chunks_exact_mut(d_out))
                .for_each(one);
        }
    }

    /// The attention of each item's new query (`q`, one row per item) over its cache at layer
    /// `li` (the new position included), into `out`.
    fn attention_each(&self, items: &[DecodeItem<'_>], li: usize, q: &[f32], out: &mut [f32]) {
        let c = &self.config;
        let (hd, nh) = (c.head_dim, c.num_heads);
        let kv_dim = c.num_kv_heads * hd;
        let group = nh / c.num_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let one = |(idx, o): (usize, &mut [f32])| {
            let (i, head) = (idx / nh, idx % nh);
            let cache = &*items[i].cache;
            let kvh = head / group;
            kernels::attend_dispatch(
                &q[idx * hd..(idx + 1) * hd],
                &cache.keys[li],
                &cache.values[li],
                kv_dim,
                kvh * hd,
                cache.len + 1,
                scale,
                o,
            );
        };
        // As in `attention`: a fork-join only when there is enough work.
        let work: usize = items.iter().map(|it| nh * (it.cache.len + 1)).sum();
        if work < 1024 {
            out.chunks_mut(hd).enumerate().for_each(one);
        } else {
            out.par_chunks_mut(hd).enumerate().for_each(one);
        }
    }

    /// NeoX-style rotary embedding of every head in `v` at position `pos`.
    fn rope(&self, v: &mut [f32], pos: usize) {
        rotate(v, &self.angles(pos));
    }

    /// `(sin, cos)` of position `pos`'s rotary angle at each frequency.
    fn angles(&self, pos: usize) -> Vec<(f64, f64)> {
        self.inv_freq
            .iter()
            .map(|f| (pos as f64 * f).sin_cos())
            .collect()
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

/// NeoX-style rotation of every head in `v` (heads of `2·angles.len()` values) by `angles`.
fn rotate(v: &mut [f32], angles: &[(f64, f64)]) {
    let half = angles.len();
    for head in v.chunks_exact_mut(2 * half) {
        for (i, &(sin, cos)) in angles.iter().enumerate() {
            let (a, b) = (head[i] as f64, head[i + half] as f64);
            head[i] = (a * cos - b * sin) as f32;
            head[i + half] = (b * cos + a * sin) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The batched decode step against separate forward passes.
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::adapter::{AdapterWeights, Factors, LoraSpec};
    use crate::gguf::write::GgufWriter;
    use crate::gguf::{GgmlType, Value};
    use cohort_protocol::rng::SplitMix64;

    const VOCAB: usize = 163;

    /// A random Llama (2 layers, hidden 96, 4 heads over 2 key/value heads) with its
    /// projections in `proj` and its (tied) embedding in `embed`. Odd numbers of 32-element
    /// blocks per row (3 and 5) and of rows (163) reach the kernels' tails.
    fn model(proj: GgmlType, embed: GgmlType, seed: u64) -> Engine {
        let (h, inter, heads, kv_heads, layers) = (96usize, 160usize, 4usize, 2usize, 2usize);
        let kv = kv_heads * h / heads;
        let mut rng = SplitMix64::new(seed);
        let mut random = |n: usize, scale: f64, offset: f64| -> Vec<f32> {
            (0..n)
                .map(|_| ((2.0 * rng.next_f64() - 1.0) * scale + offset) as f32)
                .collect()
        };
        let mut w = GgufWriter::new();
        let u = |v: usize| Value::U32(v as u32);
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.block_count", u(layers))
            .metadata("llama.context_length", u(64))
            .metadata("llama.embedding_length", u(h))
            .metadata("llama.feed_forward_length", u(inter))
            .metadata("llama.attention.head_count", u(heads))
            .metadata("llama.attention.head_count_kv", u(kv_heads))
            .metadata("llama.vocab_size", u(VOCAB));
        w.tensor_f32(
            "token_embd.weight",
            &[h as u64, VOCAB as u64],
            embed,
            &random(VOCAB * h, 0.5, 0.0),
        );
        for l in 0..layers {
            for (name, rows, cols) in [
                ("attn_q", h, h),
                ("attn_k", kv, h),
                ("attn_v", kv, h),
                ("attn_output", h, h),
                ("ffn_gate", inter, h),
                ("ffn_up", inter, h),
                ("ffn_down", h, inter),
            ] {
                let values = random(rows * cols, 0.3, 0.0);
                w.tensor_f32(
                    format!("blk.{l}.{name}.weight"),
                    &[cols as u64, rows as u64],
                    proj,
                    &values,
                );
            }
            for name in ["attn_norm", "ffn_norm"] {
                let values = random(h, 0.2, 1.0);
                w.tensor_f32(
                    format!("blk.{l}.{name}.weight"),
                    &[h as u64],
                    GgmlType::F32,
                    &values,
                );
            }
        }
        let values = random(h, 0.2, 1.0);
        w.tensor_f32("output_norm.weight", &[h as u64], GgmlType::F32, &values);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        w.write(&path).unwrap();
        Engine::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
    }

    /// Random factors on every projection of every layer.
    fn adapter(engine: &Engine, seed: u64) -> AdapterWeights {
        let rank = 4;
        let mut rng = SplitMix64::new(seed);
        let mut factors = std::collections::BTreeMap::new();
        for l in 0..engine.config().num_layers {
            for (i, p) in Proj::ALL.iter().enumerate() {
                let (d_out, d_in) = p.shape(engine.config());
                let mut values = |n: usize| -> Vec<f32> {
                    (0..n)
                        .map(|_| (rng.next_f64() as f32 - 0.5) * 0.4)
                        .collect()
                };
                factors.insert(
                    (l, i),
                    Factors {
                        a: values(rank * d_in),
                        b: values(d_out * rank),
                        d_in,
                        d_out,
                    },
                );
            }
        }
        let a = AdapterWeights {
            spec: LoraSpec {
                rank,
                ..LoraSpec::default()
            },
            factors,
        };
        engine.check_adapter(&a).unwrap();
        a
    }

    /// Sequences of different lengths and adapters decoded together step by step give, at every
    /// step, exactly the logits of their own forward passes.
    fn check(proj: GgmlType, embed: GgmlType) {
        let engine = model(proj, embed, 7);
        let (a1, a2) = (adapter(&engine, 1), adapter(&engine, 2));
        // Five sequences share `a1` (its `B` transposed once for them all), one has `a2`.
        let adapters = [
            None,
            Some(&a1),
            Some(&a2),
            Some(&a1),
            Some(&a1),
            None,
            Some(&a1),
            Some(&a1),
        ];
        let mut rng = SplitMix64::new(3);
        let prompts: Vec<Vec<u32>> = (0..adapters.len())
            .map(|i| {
                (0..3 + 4 * i)
                    .map(|_| (rng.next_u64() % VOCAB as u64) as u32)
                    .collect()
            })
            .collect();
        let mut alone: Vec<EngineCache> = Vec::new();
        let mut batched: Vec<EngineCache> = Vec::new();
        let mut next: Vec<u32> = Vec::new();
        for (p, a) in prompts.iter().zip(adapters) {
            let mut cache = EngineCache::new();
            let logits = engine.forward_with(p, &mut cache, Logits::Last, a).unwrap();
            next.push(crate::bench::argmax(&logits));
            batched.push(cache.clone());
            alone.push(cache);
        }
        for step in 0..6 {
            // Every step but the first, one sequence sits out (continuous batching: the set of
            // sequences changes between steps).
            let out = (step > 0).then_some(step % adapters.len());
            let mut want = Vec::new();
            for (i, cache) in alone.iter_mut().enumerate() {
                if Some(i) != out {
                    want.push(
                        engine
                            .forward_with(&[next[i]], cache, Logits::Last, adapters[i])
                            .unwrap(),
                    );
                }
            }
            let mut items: Vec<DecodeItem<'_>> = batched
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| Some(*i) != out)
                .map(|(i, cache)| DecodeItem {
                    token: next[i],
                    cache,
                    adapter: adapters[i],
                })
                .collect();
            let got = engine.decode_batch(&mut items).unwrap();
            let ids: Vec<usize> = (0..adapters.len()).filter(|i| Some(*i) != out).collect();
            for ((i, w), g) in ids.iter().zip(&want).zip(got.chunks_exact(VOCAB)) {
                let same = w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{proj}/{embed}: step {step}, sequence {i} differs");
                next[*i] = crate::bench::argmax(g);
            }
        }
        for (a, b) in alone.iter().zip(&batched) {
            assert_eq!(a.len(), b.len());
            assert!(a.keys == b.keys && a.values == b.values);
        }
    }

    #[test]
    fn a_batched_decode_step_equals_separate_forward_passes_bit_for_bit() {
        check(GgmlType::Q4_1, GgmlType::Q8_0);
        check(GgmlType::Q4_0, GgmlType::Q4_1);
        check(GgmlType::Q8_0, GgmlType::F16);
        check(GgmlType::F32, GgmlType::F32);
        check(GgmlType::BF16, GgmlType::Q4_0);
    }

    #[test]
    fn the_adapter_products_sum_as_the_dot_product_does() {
        let engine = model(GgmlType::Q8_0, GgmlType::Q8_0, 1);
        for rank in [1, 4, 8, 15, 16, 24] {
            let mut a = adapter(&engine, 9);
            let mut rng = SplitMix64::new(rank as u64);
            for f in a.factors.values_mut() {
                f.a = (0..rank * f.d_in)
                    .map(|_| rng.next_f64() as f32 - 0.5)
                    .collect();
                f.b = (0..f.d_out * rank)
                    .map(|_| rng.next_f64() as f32 - 0.5)
                    .collect();
            }
            a.spec.rank = rank;
            let lora = Lora::new(Some(&a), 1, Proj::Gate, 4).unwrap();
            assert_eq!(lora.bt.is_some(), rank < 16);
            let alone = Lora::new(Some(&a), 1, Proj::Gate, 1).unwrap();
            assert!(alone.bt.is_none());
            let f = lora.f;
            let x: Vec<f32> = (0..f.d_in).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let mut got: Vec<f32> = (0..f.d_out).map(|_| rng.next_f64() as f32).collect();
            let mut want = got.clone();
            let mut got_alone = got.clone();
            lora.apply(&x, &mut got);
            alone.apply(&x, &mut got_alone);
            let down: Vec<f32> = (0..rank)
                .map(|k| {
                    kernels::lora_dot(&f.a[k * f.d_in..(k + 1) * f.d_in], &x) * a.spec.scaling()
                })
                .collect();
            for (o, w) in want.iter_mut().enumerate() {
                *w += kernels::lora_dot(&f.b[o * rank..(o + 1) * rank], &down);
            }
            for g in [&got, &got_alone] {
                let same = g.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "rank {rank}");
            }
        }
    }

    #[test]
    fn a_batched_step_refuses_a_full_context_and_changes_nothing() {
        let engine = model(GgmlType::Q4_1, GgmlType::Q8_0, 7);
        let mut full = EngineCache::new();
        let prompt: Vec<u32> = (0..64).map(|i| i % VOCAB as u32).collect();
        engine.forward(&prompt, &mut full, Logits::Last).unwrap();
        let mut other = EngineCache::new();
        engine
            .forward(&[1, 2, 3], &mut other, Logits::Last)
            .unwrap();
        let mut items = [
            DecodeItem {
                token: 4,
                cache: &mut other,
                adapter: None,
            },
            DecodeItem {
                token: 5,
                cache: &mut full,
                adapter: None,
            },
        ];
        assert!(matches!(
            engine.decode_batch(&mut items),
            Err(EngineError::Context(_))
        ));
        assert_eq!(other.len(), 3);
        let mut items = [DecodeItem {
            token: VOCAB as u32,
            cache: &mut other,
            adapter: None,
        }];
        assert!(matches!(
            engine.decode_batch(&mut items),
            Err(EngineError::BadToken { .. })
        ));
        assert_eq!(other.len(), 3);
    }
}

#[cfg(test)]
mod speed {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Decode speed on the default model: a batched step of n sequences against n forward
    /// passes of one token each, in the same run (prints only). `COHORT_BENCH_SEQUENCES=16` measures one n.
    #[test]
    #[ignore = "a measurement on the default model"]
    fn batched_decode_speed_on_the_default_model() {
        let path = crate::models::default_model_path();
        if !path.exists() {
            return;
        }
        let engine = Engine::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        // `COHORT_BENCH_ADAPTER=DIR`: every sequence with that PEFT adapter.
        let adapter = std::env::var("COHORT_BENCH_ADAPTER")
            .ok()
            .map(|d| crate::adapter::AdapterWeights::load_peft(std::path::Path::new(&d)).unwrap());
        let adapter = adapter.as_ref();
        let prompt: Vec<u32> = (0..40).map(|i| 100 + i).collect();
        let ns: Vec<usize> = std::env::var("COHORT_BENCH_SEQUENCES")
            .map_or(vec![1, 2, 4, 8, 16], |v| vec![v.parse().unwrap()]);
        for n in ns {
            let mut caches: Vec<EngineCache> = (0..n)
                .map(|_| {
                    let mut c = EngineCache::new();
                    engine
                        .forward_with(&prompt, &mut c, Logits::Last, adapter)
                        .unwrap();
                    c
                })
                .collect();
            let steps = 32;
            let start = std::time::Instant::now();
            for s in 0..steps {
                let mut items: Vec<DecodeItem<'_>> = caches
                    .iter_mut()
                    .map(|cache| DecodeItem {
                        token: 200 + s,
                        cache,
                        adapter,
                    })
                    .collect();
                engine.decode_batch(&mut items).unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            let start = std::time::Instant::now();
            for s in 0..steps {
                for cache in caches.iter_mut() {
                    engine
                        .forward_with(&[300 + s], cache, Logits::Last, adapter)
                        .unwrap();
                }
            }
            let one_by_one = start.elapsed().as_secs_f64();
            println!(
                "{n} sequences: {:.1} tokens/s in all ({:.1} ms a step); one forward pass each: {:.1} tokens/s",
                (n * steps as usize) as f64 / secs,
                secs * 1000.0 / steps as f64,
                (n * steps as usize) as f64 / one_by_one,
            );
        }
    }
}
