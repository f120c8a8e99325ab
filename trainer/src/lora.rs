//! The LoRA linear layer: a frozen base projection plus a trainable low-rank update.
//!
//! `y = x·Wᵀ (+ b) + s · (x·Aᵀ)·Bᵀ`, with the base weight `W` `[d_output, d_input]` (PyTorch /
//! GGUF / HF layout), `A` `[rank, d_input]`, `B` `[d_output, rank]` and the scaling
//! `s = alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA). This is PEFT's `lora.Linear`, so
//! `A` and `B` export to PEFT's `lora_A.weight` / `lora_B.weight` as they are.
//!
//! What this module owns:
//!
//! - **Freezing.** `W` and the optional bias are parameters with gradients switched off
//!   (`Param::set_require_grad(false)`); only `A` and `B` receive gradients. burn's
//!   module-wide `set_require_grad(true)` / `unfreeze` would switch the base back on (that is burn's
//!   documented full-fine-tuning behaviour), so the model code must not call them on a LoRA model.
//! - **Initialisation.** PEFT's default: `B = 0` and `A` kaiming-uniform with `a = sqrt(5)`, which
//!   is uniform on `[-1/sqrt(d_input), 1/sqrt(d_input))`. The values of `A` come from a SplitMix64
//!   generator (`cohort_protocol::rng`, the workspace's portable seeded generator) seeded by [`LoraLinearConfig::seed`], not from burn's global RNG:
//!   the same seed gives the same bits of `A` on every peer, in every process, whatever else drew
//!   random numbers before (spot-check re-execution and FFA mode rely on it). At init the layer's
//!   output equals the base layer's, exactly.
//! - **The forward never forms `B·A`.** It runs two thin matrix products through the rank-`r`
//!   bottleneck; the scaling is applied to the `[.., rank]` intermediate, the smallest tensor on
//!   that path. [`LoraLinear::delta_weight`] and [`LoraLinear::merged_weight`] form the dense
//!   `d_output x d_input` matrices for merging and export only.
//!
//! What it must not touch: quantized bases (the QLoRA linear will be its own module that streams
//! GGUF blocks), dropout on the LoRA path (the model's projections apply it, see
//! [`crate::model::LoraDropout`]), and the optimizer (which finds `A` and `B` through burn's
//! module traversal).

use burn::config::Config;
use burn::module::{Content, DisplaySettings, Module, ModuleDisplay, Param, ParamId};
use burn::tensor::module::linear;
use burn::tensor::{DType, Device, Tensor, TensorData, assert_shape};
use cohort_protocol::rng::SplitMix64;

/// The stream the synthetic base weight and bias of [`LoraLinearConfig::init`] are drawn from:
/// the seed XOR this constant, so that they never share values with `A` (drawn from the seed
/// itself). The bytes spell `base_wei`.
const BASE_STREAM: u64 = 0x6261_7365_5f77_6569;

/// Errors from building or loading a [`LoraLinear`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    /// The rank is zero.
    #[error("LoRA rank must be at least 1, got 0")]
    ZeroRank,
    /// `d_input` or `d_output` is zero.
    #[error("LoRA layer dimensions must be nonzero, got d_input {d_input}, d_output {d_output}")]
    ZeroDimension {
        /// The configured input size.
        d_input: usize,
        /// The configured output size.
        d_output: usize,
    },
    /// `alpha` is NaN or infinite.
    #[error("LoRA alpha must be finite, got {alpha}")]
    NonFiniteAlpha {
        /// The configured alpha.
        alpha: f32,
    },
    /// A tensor handed in has the wrong shape.
    #[error("{what}: expected shape {expected:?}, got {actual:?}")]
    ShapeMismatch {
        /// Which tensor (`"base weight"`, `"base bias"`, `"lora_a"`, `"lora_b"`).
        what: &'static str,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape that came in.
        actual: Vec<usize>,
    },
    /// A tensor handed in is not f32.
    #[error("{what}: expected dtype F32, got {actual:?}")]
    UnsupportedDtype {
        /// Which tensor.
        what: &'static str,
        /// The dtype that came in.
        actual: DType,
    },
    /// The base bias is on another device than the base weight.
    #[error("{what} is on {actual}, the base weight on {expected}")]
    DeviceMismatch {
        /// Which tensor.
        what: &'static str,
        /// The base weight's device, as `Debug` prints it.
        expected: String,
        /// The tensor's device, as `Debug` prints it.
        actual: String,
    },
}

/// Configuration of a [`LoraLinear`], built with [`init`](LoraLinearConfig::init) (a synthetic
/// base, for tests and toy models) or [`init_with_base`](LoraLinearConfig::init_with_base) (a base
/// weight loaded from a model file).
#[derive(Config, Debug)]
pub struct LoraLinearConfig {
    /// Input features (the last axis of `x`).
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Rank `r` of the update `B·A`.
    pub rank: usize,
    /// Seed of `A`'s initial values (see [`LoraLinearConfig::lora_a_init_values`]). A model gives
    /// each adapted projection its own seed, derived from the job's seed.
    pub seed: u64,
    /// Numerator of the scaling (PEFT's `lora_alpha`).
    #[config(default = 16.0)]
    pub alpha: f32,
    /// rsLoRA: scale by `alpha / sqrt(rank)` instead of `alpha / rank` (PEFT's `use_rslora`).
    #[config(default = false)]
    pub rslora: bool,
    /// Whether [`init`](LoraLinearConfig::init) gives the synthetic base a bias.
    /// [`init_with_base`](LoraLinearConfig::init_with_base) takes the bias it is handed instead.
    #[config(default = false)]
    pub bias: bool,
}

impl LoraLinearConfig {
    /// Checks that the configuration describes a layer that can exist.
    ///
    /// # Errors
    ///
    /// [`LoraError::ZeroRank`], [`LoraError::ZeroDimension`] or [`LoraError::NonFiniteAlpha`].
    pub fn validate(&self) -> Result<(), LoraError> {
        if self.rank == 0 {
            return Err(LoraError::ZeroRank);
        }
        if self.d_input == 0 || self.d_output == 0 {
            return Err(LoraError::ZeroDimension {
                d_input: self.d_input,
                d_output: self.d_output,
            });
        }
        if !self.alpha.is_finite() {
            return Err(LoraError::NonFiniteAlpha { alpha: self.alpha });
        }
        Ok(())
    }

    /// The factor `s` of the update: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
    ///
    /// Computed in f64 and rounded once to f32, as PEFT computes it in Python floats before
    /// multiplying an f32 tensor by it.
    pub fn scaling(&self) -> f32 {
        let rank = self.rank as f64;
        let denominator = if self.rslora { rank.sqrt() } else { rank };
        (f64::from(self.alpha) / denominator) as f32
    }

    /// The initial values of `A`, row-major `[rank, d_input]`: PEFT's kaiming-uniform with
    /// `a = sqrt(5)`, i.e. uniform on `[-1/sqrt(d_input), 1/sqrt(d_input))`.
    ///
    /// Element `i` is `((2u - 1) / sqrt(d_input))` rounded to f32, where `u` is the top 53 bits
    /// of the `i`-th output of SplitMix64 seeded with [`seed`](Self::seed), as a fraction of
    /// `2^53`, and the arithmetic is f64. This is a format: changing it changes every adapter's
    /// starting point, so a golden test pins it.
    pub fn lora_a_init_values(&self) -> Vec<f32> {
        kaiming_uniform(
            &mut SplitMix64::new(self.seed),
            self.rank * self.d_input,
            self.d_input,
        )
    }

    /// Builds a layer around a synthetic base: `W` and the bias (when [`bias`](Self::bias) is set)
    /// uniform on `[-1/sqrt(d_input), 1/sqrt(d_input))` (what `torch.nn.Linear` draws) from the
    /// stream `seed ^ BASE_STREAM`; `A` and `B` as in [`init_with_base`](Self::init_with_base).
    ///
    /// For tests and toy models; a real model's base comes from its file through
    /// [`init_with_base`](Self::init_with_base). Build it on `device.autodiff()` to train it.
    ///
    /// # Panics
    ///
    /// If the configuration is invalid (see [`validate`](Self::validate)).
    pub fn init(&self, device: &Device) -> LoraLinear {
        if let Err(error) = self.validate() {
            panic!("invalid LoraLinearConfig: {error}");
        }
        let mut rng = SplitMix64::new(self.seed ^ BASE_STREAM);
        let weight = kaiming_uniform(&mut rng, self.d_output * self.d_input, self.d_input);
        let weight = f32_tensor(weight, [self.d_output, self.d_input], device);
        let bias = self.bias.then(|| {
            let bias = kaiming_uniform(&mut rng, self.d_output, self.d_input);
            f32_tensor(bias, [self.d_output], device)
        });
        self.build(weight, bias)
    }

    /// Builds a layer around an existing base weight `W` `[d_output, d_input]` and optional bias
    /// `[d_output]`, both f32, which become frozen parameters. `A` gets
    /// [`lora_a_init_values`](Self::lora_a_init_values) and `B` zeros, on the weight's device
    /// (with its autodiff setting: hand in a weight on `device.autodiff()` to train).
    ///
    /// # Errors
    ///
    /// An invalid configuration (see [`validate`](Self::validate)), a weight or bias whose shape
    /// disagrees with it, a dtype other than f32, or a bias on another device than the weight.
    pub fn init_with_base(
        &self,
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
    ) -> Result<LoraLinear, LoraError> {
        self.validate()?;
        check_tensor("base weight", &weight, &[self.d_output, self.d_input])?;
        if let Some(bias) = &bias {
            check_tensor("base bias", bias, &[self.d_output])?;
            let (expected, actual) = (weight.device(), bias.device());
            if expected != actual {
                return Err(LoraError::DeviceMismatch {
                    what: "base bias",
                    expected: format!("{expected:?}"),
                    actual: format!("{actual:?}"),
                });
            }
        }
        Ok(self.build(weight, bias))
    }

    /// Assembles the module from a checked base.
    fn build(&self, weight: Tensor<2>, bias: Option<Tensor<1>>) -> LoraLinear {
        let device = weight.device();
        let lora_a = f32_tensor(
            self.lora_a_init_values(),
            [self.rank, self.d_input],
            &device,
        );
        let lora_b = Tensor::<2>::zeros([self.d_output, self.rank], (&device, DType::F32));
        LoraLinear {
            weight: frozen(weight),
            bias: bias.map(frozen),
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            scaling: self.scaling(),
        }
    }
}

/// A linear layer with a frozen base and a trainable LoRA update; see the [module docs](self).
///
/// Build it with [`LoraLinearConfig`].
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct LoraLinear {
    /// The base weight `W` `[d_output, d_input]`, frozen.
    weight: Param<Tensor<2>>,
    /// The base bias `[d_output]`, frozen.
    bias: Option<Param<Tensor<1>>>,
    /// `A` `[rank, d_input]`, trainable.
    lora_a: Param<Tensor<2>>,
    /// `B` `[d_output, rank]`, trainable.
    lora_b: Param<Tensor<2>>,
    /// `s`, from the configuration (not part of a saved record).
    scaling: f32,
}

impl LoraLinear {
    /// `y = x·Wᵀ (+ b) + s · (x·Aᵀ)·Bᵀ` for `x` of shape `[..., d_input]` (any rank from 1 up;
    /// `[batch, seq, d_input]` in the model), giving `[..., d_output]`.
    ///
    /// # Panics
    ///
    /// If the last axis of `x` is not `d_input`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let d_input = self.d_input();
        assert_shape!(x, [.., d_input]);
        // The transposes are views: flex's matmul reads strided operands without copying.
        let base = linear(
            x.clone(),
            self.weight.val().transpose(),
            self.bias.as_ref().map(Param::val),
        );
        let down = linear(x, self.lora_a.val().transpose(), None).mul_scalar(self.scaling);
        base + linear(down, self.lora_b.val().transpose(), None)
    }

    /// `s · B·A` `[d_output, d_input]`, the update as a dense matrix (for merging and export).
    ///
    /// On an autodiff device the result stays connected to `A` and `B`; detach it or read it out
    /// with `into_data` when only the values are wanted.
    pub fn delta_weight(&self) -> Tensor<2> {
        self.lora_b
            .val()
            .matmul(self.lora_a.val())
            .mul_scalar(self.scaling)
    }

    /// `W + s · B·A` `[d_output, d_input]`: the weight of a plain linear layer that computes what
    /// this layer computes (with the same bias).
    pub fn merged_weight(&self) -> Tensor<2> {
        self.weight.val() + self.delta_weight()
    }

    /// Replaces `A` and `B` (for instance with a round's starting adapter), keeping their
    /// parameter ids. The values are copied onto this layer's device, with its autodiff setting,
    /// as new trainable leaves.
    ///
    /// # Errors
    ///
    /// [`LoraError::ShapeMismatch`] unless `lora_a` is `[rank, d_input]` and `lora_b`
    /// `[d_output, rank]`; [`LoraError::UnsupportedDtype`] unless both are f32.
    pub fn with_factors(self, lora_a: Tensor<2>, lora_b: Tensor<2>) -> Result<Self, LoraError> {
        let [rank, d_input] = self.lora_a.dims();
        let d_output = self.d_output();
        check_tensor("lora_a", &lora_a, &[rank, d_input])?;
        check_tensor("lora_b", &lora_b, &[d_output, rank])?;
        let device = self.lora_a.device();
        let a = Tensor::<2>::from_data(lora_a.into_data(), (&device, DType::F32));
        let b = Tensor::<2>::from_data(lora_b.into_data(), (&device, DType::F32));
        Ok(Self {
            lora_a: Param::initialized(self.lora_a.id, a).set_require_grad(true),
            lora_b: Param::initialized(self.lora_b.id, b).set_require_grad(true),
            ..self
        })
    }

    /// The frozen base weight `W` `[d_output, d_input]`.
    pub fn weight(&self) -> &Param<Tensor<2>> {
        &self.weight
    }

    /// The frozen base bias `[d_output]`, if any.
    pub fn bias(&self) -> Option<&Param<Tensor<1>>> {
        self.bias.as_ref()
    }

    /// `A` `[rank, d_input]`.
    pub fn lora_a(&self) -> &Param<Tensor<2>> {
        &self.lora_a
    }

    /// `B` `[d_output, rank]`.
    pub fn lora_b(&self) -> &Param<Tensor<2>> {
        &self.lora_b
    }

    /// The scaling `s`.
    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// Input features.
    pub fn d_input(&self) -> usize {
        self.lora_a.dims()[1]
    }

    /// Output features.
    pub fn d_output(&self) -> usize {
        self.lora_b.dims()[0]
    }

    /// Rank of the update.
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }
}

impl ModuleDisplay for LoraLinear {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        content
            .add("d_input", &self.d_input())
            .add("d_output", &self.d_output())
            .add("rank", &self.rank())
            .add("scaling", &self.scaling)
            .add("bias", &self.bias.is_some())
            .optional()
    }
}

/// A parameter that receives no gradient, even after `Module::train`.
fn frozen<const D: usize>(tensor: Tensor<D>) -> Param<Tensor<D>> {
    Param::initialized(ParamId::new(), tensor).set_require_grad(false)
}

/// An f32 tensor from row-major values.
fn f32_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), (device, DType::F32))
}

/// Checks a tensor handed in against the shape the configuration implies, and that it is f32.
fn check_tensor<const D: usize>(
    what: &'static str,
    tensor: &Tensor<D>,
    expected: &[usize],
) -> Result<(), LoraError> {
    let actual = tensor.dims();
    if actual.as_slice() != expected {
        return Err(LoraError::ShapeMismatch {
            what,
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    let dtype = tensor.dtype();
    if dtype != DType::F32 {
        return Err(LoraError::UnsupportedDtype {
            what,
            actual: dtype,
        });
    }
    Ok(())
}

/// `count` values uniform on `[-1/sqrt(fan_in), 1/sqrt(fan_in))`: kaiming-uniform with
/// `a = sqrt(5)` (gain `sqrt(1/3)`, bound `sqrt(3)·gain/sqrt(fan_in)`).
fn kaiming_uniform(rng: &mut SplitMix64, count: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..count)
        .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
        .collect()
}

#[cfg(test)]
mod tests;
