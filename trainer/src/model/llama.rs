//! The Llama decoder in burn: token embedding, `num_layers` pre-norm blocks (RMSNorm, grouped-
//! query attention with rotary position embeddings, SwiGLU feed-forward), a final RMSNorm and the
//! output projection (tied to the embedding or not).
//!
//! Weights are in Hugging Face's layout (see [`super::weights`]), so the rotary embedding rotates
//! the two halves of each head (`rotate_half`). This module runs on any burn device; it is the
//! model that trains. The CPU inference engine ([`crate::engine`]) computes the same function over
//! the GGUF's quantized blocks for fast generation.

use burn::module::{Module, Param, ParamId};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::linear;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use super::packed::PackedWeight;
use super::weights::{Proj, RawMatrix};
use super::{LoadError, Weights};
use crate::gguf::GgufFile;

/// A frozen `[out_features, in_features]` projection, optionally with a trainable LoRA update
/// (`y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, PEFT's `lora.Linear`; see [`crate::lora`]).
#[derive(Module, Debug)]
pub struct Projection {
    weight: Frozen,
    lora: Option<Adapter>,
}

/// A frozen weight matrix: f32 on the device (LoRA), or quantized blocks in host memory that
/// each product dequantizes on the fly (QLoRA; see [`super::packed`]).
#[derive(Module, Debug)]
pub enum Frozen {
    Dense(Param<Tensor<2>>),
    Packed(PackedWeight),
}

impl Frozen {
    /// `[rows, cols]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Frozen::Dense(w) => w.val().dims(),
            Frozen::Packed(p) => [p.rows(), p.cols()],
        }
    }

    /// `x·Wᵀ` (as one matrix product over every leading position).
    pub fn linear<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Frozen::Dense(w) => {
                let dims = x.dims();
                let n = dims[..D - 1].iter().product::<usize>();
                let y = x.reshape([n, dims[D - 1]]).matmul(w.val().transpose());
                let mut out = dims;
                out[D - 1] = y.dims()[1];
                y.reshape(out)
            }
            Frozen::Packed(p) => p.linear(x),
        }
    }

    /// The weight in f32 on `device` (a copy when packed).
    pub fn to_dense(&self, device: &Device) -> Tensor<2> {
        match self {
            Frozen::Dense(w) => w.val(),
            Frozen::Packed(p) => Tensor::<2>::from_data(
                TensorData::new(p.to_f32(), [p.rows(), p.cols()]),
                (device, DType::F32),
            ),
        }
    }

    /// Bytes of host or device memory the weight holds.
    pub fn bytes(&self) -> usize {
        match self {
            Frozen::Dense(w) => w.val().dims().iter().product::<usize>() * 4,
            Frozen::Packed(p) => p.bytes(),
        }
    }
}

/// How [`Llama::load`] keeps the frozen weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseWeights {
    /// Dequantized to f32 on the device (LoRA).
    #[default]
    F32,
    /// In their quantized blocks, dequantized one product at a time (QLoRA).
    Packed,
}

/// The LoRA factors of one projection: `A` `[rank, in]`, `B` `[out, rank]`, and the scaling.
#[derive(Module, Debug)]
pub struct Adapter {
    pub a: Param<Tensor<2>>,
    pub b: Param<Tensor<2>>,
    pub scaling: f32,
}

impl Projection {
    fn new(weight: Frozen) -> Projection {
        Projection { weight, lora: None }
    }

    /// `x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ)`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_train(x, None)
    }

    /// [`forward`](Self::forward) with LoRA dropout on the adapter's input (training only):
    /// `x·Wᵀ + s·((x ⊙ mask)·Aᵀ)·Bᵀ`, PEFT's `lora_dropout`.
    ///
    /// The products run on `x` flattened to `[tokens, in]`: one large matrix product packs `W`
    /// once, where a batched `[batch, seq, in]` product packed it once per sequence.
    pub fn forward_train<const D: usize>(
        &self,
        x: Tensor<D>,
        drop: Option<&mut LoraDropout>,
    ) -> Tensor<D> {
        let dims = x.dims();
        let n = dims[..D - 1].iter().product::<usize>();
        let x = x.reshape([n, dims[D - 1]]);
        let base = self.weight.linear(x.clone());
        let y = match (&self.lora, drop) {
            (None, _) => base,
            (Some(l), drop) => {
                let x = match drop {
                    Some(d) if d.p > 0.0 => {
                        let mask = d.mask([1, n, dims[D - 1]], &x.device());
                        x * mask.reshape([n, dims[D - 1]])
                    }
                    _ => x,
                };
                let down = linear(x, l.a.val().transpose(), None).mul_scalar(l.scaling);
                base + linear(down, l.b.val().transpose(), None)
            }
        };
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }

    /// The frozen weight, `[out_features, in_features]`.
    pub fn weight(&self) -> &Frozen {
        &self.weight
    }

    /// The LoRA update, when the projection has one.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.lora.as_ref()
    }

    /// Attaches (or replaces) a LoRA update with factors `a` `[rank, in]` and `b` `[out, rank]`,
    /// as trainable parameters on the weight's device, with the given parameter ids (stable ids
    /// let an optimizer's saved state find its parameters again after a restart).
    pub fn set_adapter(&mut self, a: Tensor<2>, b: Tensor<2>, scaling: f32, ids: (u64, u64)) {
        let (mut a, mut b) = (Param::from_tensor(a), Param::from_tensor(b));
        a.id = ParamId::from(ids.0);
        b.id = ParamId::from(ids.1);
        self.lora = Some(Adapter { a, b, scaling });
    }

    /// Removes the LoRA update.
    pub fn clear_adapter(&mut self) {
        self.lora = None;
    }
}

/// LoRA dropout for training (PEFT's `lora_dropout`): each adapted projection's input to `A` is
/// multiplied by a fresh mask of zeros (probability `p`) and `1/(1-p)`. Masks come from
/// SplitMix64, not burn's device RNG, so that the same seed gives the same masks on every peer.
#[derive(Debug)]
pub struct LoraDropout {
    pub p: f32,
    rng: cohort_protocol::rng::SplitMix64,
}

impl LoraDropout {
    pub fn new(p: f32, seed: u64) -> LoraDropout {
        LoraDropout {
            p,
            rng: cohort_protocol::rng::SplitMix64::new(seed),
        }
    }

    fn mask(&mut self, dims: [usize; 3], device: &Device) -> Tensor<3> {
        let keep = 1.0 / (1.0 - self.p);
        let p = f64::from(self.p);
        let n = dims.iter().product::<usize>();
        let values: Vec<f32> = (0..n)
            .map(|_| if self.rng.next_f64() < p { 0.0 } else { keep })
            .collect();
        Tensor::<3>::from_data(TensorData::new(values, dims), (device, DType::F32))
    }
}

/// One transformer block.
#[derive(Module, Debug)]
pub struct Block {
    attn_norm: Param<Tensor<1>>,
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    ffn_norm: Param<Tensor<1>>,
    gate: Projection,
    up: Projection,
    down: Projection,
}

impl Block {
    /// The block's projection of that kind.
    pub fn projection(&self, proj: Proj) -> &Projection {
        match proj {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }

    /// The block's projection of that kind, mutably.
    pub fn projection_mut(&mut self, proj: Proj) -> &mut Projection {
        match proj {
            Proj::Q => &mut self.q,
            Proj::K => &mut self.k,
            Proj::V => &mut self.v,
            Proj::O => &mut self.o,
            Proj::Gate => &mut self.gate,
            Proj::Up => &mut self.up,
            Proj::Down => &mut self.down,
        }
    }
}

/// The Llama model; build it with [`Llama::from_gguf`].
#[derive(Module, Debug)]
pub struct Llama {
    embed: Frozen,
    layers: Vec<Block>,
    norm: Param<Tensor<1>>,
    lm_head: Option<Projection>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rope_theta: f64,
    rms_norm_eps: f64,
    max_seq_len: usize,
}

/// Keys and values of the positions seen so far, per layer: `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The input is longer than the model's context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{tokens} tokens do not fit the model's context of {max} tokens")]
pub struct ContextLengthError {
    pub tokens: usize,
    pub max: usize,
}

impl Llama {
    /// Loads a `llama` GGUF onto `device`, every weight dequantized to f32.
    pub fn from_gguf(file: &GgufFile, device: &Device) -> Result<Llama, LoadError> {
        Llama::from_weights(&Weights::gguf(file)?, device)
    }

    /// Loads a model from a GGUF file or a Hugging Face checkpoint onto `device` (f32 weights).
    pub fn from_weights(w: &Weights<'_>, device: &Device) -> Result<Llama, LoadError> {
        Llama::load(w, device, BaseWeights::F32)
    }

    /// Loads a model, its weight matrices kept as `base` says (norms are always f32).
    pub fn load(w: &Weights<'_>, device: &Device, base: BaseWeights) -> Result<Llama, LoadError> {
        let c = w.config().clone();
        let tensor = |m: RawMatrix| match base {
            BaseWeights::F32 => {
                let (rows, cols) = (m.rows, m.cols);
                Frozen::Dense(frozen(Tensor::<2>::from_data(
                    TensorData::new(m.to_f32(), [rows, cols]),
                    (device, DType::F32),
                )))
            }
            BaseWeights::Packed => Frozen::Packed(PackedWeight::new(m)),
        };
        let vector = |values: Vec<f32>| {
            let len = values.len();
            Tensor::<1>::from_data(TensorData::new(values, [len]), (device, DType::F32))
        };
        let embed = tensor(w.embed()?);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let proj = |p: Proj| -> Result<Projection, LoadError> {
                Ok(Projection::new(tensor(w.projection(l, p)?)))
            };
            layers.push(Block {
                attn_norm: frozen(vector(w.attn_norm(l)?)),
                q: proj(Proj::Q)?,
                k: proj(Proj::K)?,
                v: proj(Proj::V)?,
                o: proj(Proj::O)?,
                ffn_norm: frozen(vector(w.ffn_norm(l)?)),
                gate: proj(Proj::Gate)?,
                up: proj(Proj::Up)?,
                down: proj(Proj::Down)?,
            });
        }
        let norm = frozen(vector(w.final_norm()?));
        let lm_head = w.output()?.map(|m| Projection::new(tensor(m)));
        Ok(Llama {
            embed,
            layers,
            norm,
            lm_head,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            rope_theta: c.rope_theta,
            rms_norm_eps: c.rms_norm_eps,
            max_seq_len: c.max_seq_len,
        })
    }

    /// The blocks.
    pub fn layers(&self) -> &[Block] {
        &self.layers
    }

    /// The blocks, mutably (to attach adapters).
    pub fn layers_mut(&mut self) -> &mut [Block] {
        &mut self.layers
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.norm.val().device()
    }

    /// Bytes held by the frozen weight matrices (f32 or packed).
    pub fn base_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .flat_map(|b| Proj::ALL.map(|p| b.projection(p).weight.bytes()))
            .sum();
        layers + self.embed.bytes() + self.lm_head.as_ref().map_or(0, |p| p.weight.bytes())
    }

    /// The context length.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Logits `[batch, seq, vocab]` for `tokens` `[batch, seq]`, continuing from `cache` when
    /// given (and appending this call's keys and values to it).
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>, ContextLengthError> {
        self.forward_train(tokens, cache, None)
    }

    /// [`forward`](Self::forward) with LoRA dropout (training).
    pub fn forward_train(
        &self,
        tokens: Tensor<2, Int>,
        cache: Option<&mut KvCache>,
        drop: Option<&mut LoraDropout>,
    ) -> Result<Tensor<3>, ContextLengthError> {
        let hidden = self.hidden_train(tokens, cache, drop)?;
        let head = match &self.lm_head {
            Some(p) => &p.weight,
            None => &self.embed,
        };
        Ok(head.linear(hidden))
    }

    /// The final normalised hidden states `[batch, seq, hidden]` (before the output projection).
    pub fn hidden(
        &self,
        tokens: Tensor<2, Int>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>, ContextLengthError> {
        self.hidden_train(tokens, cache, None)
    }

    fn hidden_train(
        &self,
        tokens: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        mut drop: Option<&mut LoraDropout>,
    ) -> Result<Tensor<3>, ContextLengthError> {
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        let past = cache.as_ref().map_or(0, |c| c.len);
        if past + seq > self.max_seq_len {
            return Err(ContextLengthError {
                tokens: past + seq,
                max: self.max_seq_len,
            });
        }
        let hidden_size = self.embed.dims()[1];
        let mut x = match &self.embed {
            Frozen::Dense(embed) => embed
                .val()
                .select(0, tokens.reshape([batch * seq]))
                .reshape([batch, seq, hidden_size]),
            Frozen::Packed(p) => p.embed(tokens, &device),
        };
        let (cos, sin) = self.rope_tables(past, seq, &device);
        let mask = causal_mask(past, seq, &device);
        if let Some(c) = cache.as_deref_mut()
            && c.layers.len() != self.layers.len()
        {
            c.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        for (i, block) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.block(block, x, &cos, &sin, &mask, slot, drop.as_deref_mut());
        }
        if let Some(c) = cache {
            c.len = past + seq;
        }
        Ok(rms_norm(x, &self.norm, self.rms_norm_eps))
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        b: &Block,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Tensor<2, Bool>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
        mut drop: Option<&mut LoraDropout>,
    ) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let h = rms_norm(x.clone(), &b.attn_norm, self.rms_norm_eps);
        let heads = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, hd]).swap_dims(1, 2);
        let q = rope(
            heads(b.q.forward_train(h.clone(), drop.as_deref_mut()), nh),
            cos,
            sin,
        );
        let mut k = rope(
            heads(b.k.forward_train(h.clone(), drop.as_deref_mut()), nkv),
            cos,
            sin,
        );
        let mut v = heads(b.v.forward_train(h, drop.as_deref_mut()), nkv);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let total = k.dims()[2];
        let group = nh / nkv;
        let expand = |t: Tensor<4>| {
            if group == 1 {
                t
            } else {
                t.unsqueeze_dim::<5>(2)
                    .repeat_dim(2, group)
                    .reshape([batch, nh, total, hd])
            }
        };
        let (k, v) = (expand(k), expand(v));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt());
        let mask = mask
            .clone()
            .unsqueeze::<4>()
            .expand([batch, nh, seq, total]);
        let probs = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3);
        let attn = probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, nh * hd]);
        let x = x + b.o.forward_train(attn, drop.as_deref_mut());
        let h = rms_norm(x.clone(), &b.ffn_norm, self.rms_norm_eps);
        let gated = silu(b.gate.forward_train(h.clone(), drop.as_deref_mut()))
            * b.up.forward_train(h, drop.as_deref_mut());
        let ff = b.down.forward_train(gated, drop);
        debug_assert_eq!(ff.dims(), [batch, seq, hidden]);
        x + ff
    }

    /// `cos` and `sin` `[1, 1, seq, head_dim]` for positions `past..past + seq`, each frequency
    /// repeated for both halves of the head.
    fn rope_tables(&self, past: usize, seq: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
        let hd = self.head_dim;
        let half = hd / 2;
        let mut cos = Vec::with_capacity(seq * hd);
        let mut sin = Vec::with_capacity(seq * hd);
        for p in past..past + seq {
            for j in 0..hd {
                let i = j % half;
                let inv_freq = self.rope_theta.powf(-2.0 * i as f64 / hd as f64);
                let angle = p as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let t = |v: Vec<f32>| {
            Tensor::<4>::from_data(TensorData::new(v, [1, 1, seq, hd]), (device, DType::F32))
        };
        (t(cos), t(sin))
    }
}

/// `true` where a query at `past + i` must not see key `j` (j > past + i): `[seq, past + seq]`.
fn causal_mask(past: usize, seq: usize, device: &Device) -> Tensor<2, Bool> {
    let total = past + seq;
    let values: Vec<bool> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| j > past + i))
        .collect();
    Tensor::<2, Bool>::from_data(TensorData::new(values, [seq, total]), device)
}

/// NeoX-style rotary embedding on `[batch, heads, seq, head_dim]`.
fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let hd = x.dims()[3];
    let half = hd / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// `x / sqrt(mean(x²) + eps) · w` over the last axis.
fn rms_norm(x: Tensor<3>, weight: &Param<Tensor<1>>, eps: f64) -> Tensor<3> {
    let ms = (x.clone() * x.clone()).mean_dim(2);
    let w = weight.val().unsqueeze::<3>();
    x * ms.add_scalar(eps).sqrt().recip() * w
}

fn frozen<const D: usize>(tensor: Tensor<D>) -> Param<Tensor<D>> {
    Param::initialized(ParamId::new(), tensor).set_require_grad(false)
}
