//! Tests of the LoRA linear layer against references written here in plain Rust (f64 loops over
//! `Vec<f32>`), never against burn's own code paths.

use super::*;
use proptest::prelude::*;

fn flex() -> Device {
    Device::flex()
}

/// Test data: xorshift64* (a different generator from the crate's SplitMix64), uniform on
/// `[-1, 1)`.
fn test_values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2).wrapping_add(0x2545_f491_4f6c_dd1d) | 1;
    (0..count)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            (bits as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn tensor<const D: usize>(values: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn values_of<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().try_into_vec::<f32>().unwrap()
}

/// `a·bᵀ` for `a` `[rows, inner]` and `b` `[cols, inner]`, row-major, in f64.
fn matmul_nt(a: &[f32], rows: usize, inner: usize, b: &[f32], cols: usize) -> Vec<f64> {
    assert_eq!(a.len(), rows * inner);
    assert_eq!(b.len(), cols * inner);
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let mut sum = 0.0f64;
            for k in 0..inner {
                sum += f64::from(a[i * inner + k]) * f64::from(b[j * inner + k]);
            }
            out[i * cols + j] = sum;
        }
    }
    out
}

/// `aᵀ·b` for `a` `[inner, rows]` and `b` `[inner, cols]`, in f64.
fn matmul_tn(a: &[f64], inner: usize, rows: usize, b: &[f64], cols: usize) -> Vec<f64> {
    assert_eq!(a.len(), inner * rows);
    assert_eq!(b.len(), inner * cols);
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let mut sum = 0.0;
            for k in 0..inner {
                sum += a[k * rows + i] * b[k * cols + j];
            }
            out[i * cols + j] = sum;
        }
    }
    out
}

/// `a·b` for `a` `[rows, inner]` and `b` `[inner, cols]`, in f64.
fn matmul_nn(a: &[f64], rows: usize, inner: usize, b: &[f64], cols: usize) -> Vec<f64> {
    assert_eq!(a.len(), rows * inner);
    assert_eq!(b.len(), inner * cols);
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let mut sum = 0.0;
            for k in 0..inner {
                sum += a[i * inner + k] * b[k * cols + j];
            }
            out[i * cols + j] = sum;
        }
    }
    out
}

fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

/// The scaling, computed independently of the crate.
fn reference_scaling(alpha: f32, rank: usize, rslora: bool) -> f64 {
    if rslora {
        f64::from(alpha) / (rank as f64).sqrt()
    } else {
        f64::from(alpha) / rank as f64
    }
}

/// One layer's numbers: `x` `[rows, d_input]` (the leading axes flattened), `W`, bias, `A`, `B`.
struct Case {
    rows: usize,
    d_input: usize,
    d_output: usize,
    rank: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    a: Vec<f32>,
    b: Vec<f32>,
    scaling: f64,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rows: usize,
        d_input: usize,
        d_output: usize,
        rank: usize,
        alpha: f32,
        rslora: bool,
        bias: bool,
        seed: u64,
    ) -> Self {
        Self {
            rows,
            d_input,
            d_output,
            rank,
            x: test_values(rows * d_input, seed),
            w: test_values(d_output * d_input, seed + 1),
            bias: bias.then(|| test_values(d_output, seed + 2)),
            a: test_values(rank * d_input, seed + 3),
            b: test_values(d_output * rank, seed + 4),
            scaling: reference_scaling(alpha, rank, rslora),
        }
    }

    /// `x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` `[rows, d_output]`.
    fn forward(&self) -> Vec<f64> {
        let mut y = matmul_nt(&self.x, self.rows, self.d_input, &self.w, self.d_output);
        let h = matmul_nt(&self.x, self.rows, self.d_input, &self.a, self.rank);
        for i in 0..self.rows {
            for o in 0..self.d_output {
                let mut update = 0.0;
                for r in 0..self.rank {
                    update += h[i * self.rank + r] * f64::from(self.b[o * self.rank + r]);
                }
                y[i * self.d_output + o] += self.scaling * update;
                if let Some(bias) = &self.bias {
                    y[i * self.d_output + o] += f64::from(bias[o]);
                }
            }
        }
        y
    }

    /// `W + s·B·A` `[d_output, d_input]`.
    fn merged(&self) -> Vec<f64> {
        let mut merged = widen(&self.w);
        for o in 0..self.d_output {
            for k in 0..self.d_input {
                let mut sum = 0.0;
                for r in 0..self.rank {
                    sum += f64::from(self.b[o * self.rank + r])
                        * f64::from(self.a[r * self.d_input + k]);
                }
                merged[o * self.d_input + k] += self.scaling * sum;
            }
        }
        merged
    }

    /// The layer built through the public API: base from `W` (and bias), factors set to `A`, `B`.
    fn layer(&self, alpha: f32, rslora: bool, device: &Device) -> LoraLinear {
        LoraLinearConfig::new(self.d_input, self.d_output, self.rank, 7)
            .with_alpha(alpha)
            .with_rslora(rslora)
            .init_with_base(
                tensor(&self.w, [self.d_output, self.d_input], device),
                self.bias
                    .as_ref()
                    .map(|bias| tensor(bias, [self.d_output], device)),
            )
            .unwrap()
            .with_factors(
                tensor(&self.a, [self.rank, self.d_input], device),
                tensor(&self.b, [self.d_output, self.rank], device),
            )
            .unwrap()
    }
}

/// `|actual - expected| <= rtol · max(|expected|, 1)` element-wise.
fn assert_close(what: &str, actual: &[f32], expected: &[f64], rtol: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let tolerance = rtol * e.abs().max(1.0);
        assert!(
            (f64::from(a) - e).abs() <= tolerance,
            "{what}[{i}]: got {a}, expected {e} (tolerance {tolerance:e})"
        );
    }
}

// (1) Forward.

#[test]
fn forward_3d_matches_plain_rust_reference() {
    let device = flex();
    let (batch, seq) = (2, 3);
    let case = Case::new(batch * seq, 5, 4, 2, 16.0, false, true, 11);
    let layer = case.layer(16.0, false, &device);
    assert_eq!(layer.scaling(), 8.0);

    let x = tensor(&case.x, [batch, seq, case.d_input], &device);
    let y = layer.forward(x);

    assert_eq!(y.dims(), [batch, seq, case.d_output]);
    assert_close("y", &values_of(y), &case.forward(), 1e-5);
}

#[test]
fn forward_2d_without_bias_matches_plain_rust_reference() {
    let device = flex();
    let case = Case::new(7, 6, 3, 4, 8.0, false, false, 21);
    let layer = case.layer(8.0, false, &device);

    let y = layer.forward(tensor(&case.x, [7, 6], &device));

    assert_close("y", &values_of(y), &case.forward(), 1e-5);
}

#[test]
#[should_panic(expected = "assert_shape!")]
fn forward_rejects_wrong_input_width() {
    let device = flex();
    let layer = LoraLinearConfig::new(4, 3, 2, 0).init(&device);
    let _ = layer.forward(Tensor::<2>::zeros([2, 5], &device));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn forward_matches_reference_for_any_shape(
        batch in 1usize..4,
        seq in 1usize..5,
        d_input in 1usize..10,
        d_output in 1usize..10,
        rank in 1usize..6,
        alpha in 0.25f32..64.0,
        rslora: bool,
        bias: bool,
        three_d: bool,
        seed in 0u64..1_000_000,
    ) {
        let device = flex();
        let case = Case::new(batch * seq, d_input, d_output, rank, alpha, rslora, bias, seed);
        let layer = case.layer(alpha, rslora, &device);
        let y = if three_d {
            values_of(layer.forward(tensor(&case.x, [batch, seq, d_input], &device)))
        } else {
            values_of(layer.forward(tensor(&case.x, [batch * seq, d_input], &device)))
        };
        assert_close("y", &y, &case.forward(), 1e-5);
    }
}

// (2) Initialisation.

#[test]
fn init_has_zero_b_and_a_within_the_kaiming_bound() {
    let (d_input, d_output, rank) = (64, 48, 8);
    let layer = LoraLinearConfig::new(d_input, d_output, rank, 3).init(&flex());

    assert_eq!(layer.lora_b().dims(), [d_output, rank]);
    assert!(values_of(layer.lora_b().val()).iter().all(|&v| v == 0.0));

    assert_eq!(layer.lora_a().dims(), [rank, d_input]);
    let a = values_of(layer.lora_a().val());
    let bound = (1.0 / (d_input as f64).sqrt()) as f32;
    assert!(
        a.iter().all(|v| v.abs() <= bound),
        "A leaves [-{bound}, {bound}]"
    );
    // Not squeezed into a smaller interval, and not one-sided: 512 draws reach the edges.
    let max = a.iter().cloned().fold(f32::MIN, f32::max);
    let min = a.iter().cloned().fold(f32::MAX, f32::min);
    assert!(
        max > 0.95 * bound && min < -0.95 * bound,
        "A spans [{min}, {max}]"
    );
}

#[test]
fn same_seed_gives_bit_identical_a_and_another_seed_does_not() {
    let device = flex();
    let config = LoraLinearConfig::new(16, 8, 4, 1234);
    let bits = |layer: LoraLinear| -> Vec<u32> {
        values_of(layer.lora_a().val())
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };

    let first = bits(config.init(&device));
    // burn's own RNG state does not enter A.
    device.seed(99);
    let _ = Tensor::<2>::random([8, 8], burn::tensor::Distribution::Default, &device);
    let second = bits(config.init(&device));
    // init_with_base draws the same A as init.
    let weight = Tensor::<2>::zeros([8, 16], &device);
    let third = bits(config.init_with_base(weight, None).unwrap());
    let other = bits(
        LoraLinearConfig {
            seed: 1235,
            ..config.clone()
        }
        .init(&device),
    );

    assert_eq!(first, second);
    assert_eq!(first, third);
    assert_ne!(first, other);
    assert!(first.iter().zip(&other).filter(|(a, b)| a == b).count() < 4);
}

#[test]
fn lora_a_init_values_are_pinned() {
    // Computed outside Rust (Python: the reference splitmix64, u = (z >> 11) / 2**53,
    // (2u - 1) / sqrt(4) rounded to f32 by struct.pack). Peers must agree on these bits.
    let expected: [u32; 8] = [
        0x3ec4_4150,
        0xbd8c_3b0d,
        0xbef2_7746,
        0x3ef1_1771,
        0xbec9_8ced,
        0xbe30_d184,
        0xbea6_facb,
        0x3e8b_0826,
    ];
    let values = LoraLinearConfig::new(4, 3, 2, 0).lora_a_init_values();
    let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits, expected);
}

#[test]
fn forward_at_init_equals_the_base_layer() {
    let device = flex();
    let (rows, d_input, d_output) = (6, 5, 4);
    let w = test_values(d_output * d_input, 31);
    let bias = test_values(d_output, 32);
    let x = test_values(rows * d_input, 33);
    let layer = LoraLinearConfig::new(d_input, d_output, 3, 5)
        .init_with_base(
            tensor(&w, [d_output, d_input], &device),
            Some(tensor(&bias, [d_output], &device)),
        )
        .unwrap();

    let y = values_of(layer.forward(tensor(&x, [2, 3, d_input], &device)));

    let mut expected = matmul_nt(&x, rows, d_input, &w, d_output);
    for (i, value) in expected.iter_mut().enumerate() {
        *value += f64::from(bias[i % d_output]);
    }
    assert_close("y", &y, &expected, 1e-5);
    // B = 0 adds exactly zero: the bits equal the base product's.
    let base = linear(
        tensor(&x, [2, 3, d_input], &device),
        tensor(&w, [d_output, d_input], &device).transpose(),
        Some(tensor(&bias, [d_output], &device)),
    );
    assert_eq!(y, values_of(base));
}

// (3) Gradients.

#[test]
fn gradients_match_hand_derived_formulas_and_skip_the_base() {
    let device = flex().autodiff();
    let (batch, seq) = (2, 3);
    let rows = batch * seq;
    let case = Case::new(rows, 5, 4, 3, 12.0, false, true, 41);
    let (d_input, d_output, rank, s) = (case.d_input, case.d_output, case.rank, case.scaling);
    let g = test_values(rows * d_output, 45);
    let layer = case.layer(12.0, false, &device);
    assert!(layer.lora_a().is_require_grad() && layer.lora_b().is_require_grad());
    assert!(!layer.weight().is_require_grad());

    let x = tensor(&case.x, [batch, seq, d_input], &device).require_grad();
    let y = layer.forward(x.clone());
    let loss = (y * tensor(&g, [batch, seq, d_output], &device)).sum();
    let grads = loss.backward();

    // H = x·Aᵀ [rows, rank]; dL/dB = s·Gᵀ·H [d_output, rank].
    let h = matmul_nt(&case.x, rows, d_input, &case.a, rank);
    let grad_b: Vec<f64> = matmul_tn(&widen(&g), rows, d_output, &h, rank)
        .iter()
        .map(|v| s * v)
        .collect();
    // dL/dA = s·Bᵀ·Gᵀ·x = s·(G·B)ᵀ·x [rank, d_input].
    let g_b = matmul_nn(&widen(&g), rows, d_output, &widen(&case.b), rank);
    let grad_a: Vec<f64> = matmul_tn(&g_b, rows, rank, &widen(&case.x), d_input)
        .iter()
        .map(|v| s * v)
        .collect();
    // dL/dx = G·W + s·G·B·A [rows, d_input]: the base path is in the graph.
    let g_w = matmul_nn(&widen(&g), rows, d_output, &widen(&case.w), d_input);
    let g_b_a = matmul_nn(&g_b, rows, rank, &widen(&case.a), d_input);
    let grad_x: Vec<f64> = g_w.iter().zip(&g_b_a).map(|(u, v)| u + s * v).collect();

    let got_b = layer.lora_b().grad(&grads).expect("B has a gradient");
    assert_eq!(got_b.dims(), [d_output, rank]);
    assert_close("dL/dB", &values_of(got_b), &grad_b, 1e-5);
    let got_a = layer.lora_a().grad(&grads).expect("A has a gradient");
    assert_eq!(got_a.dims(), [rank, d_input]);
    assert_close("dL/dA", &values_of(got_a), &grad_a, 1e-5);
    let got_x = x.grad(&grads).expect("x has a gradient");
    assert_close("dL/dx", &values_of(got_x), &grad_x, 1e-5);

    assert!(
        layer.weight().grad(&grads).is_none(),
        "the base weight got a gradient"
    );
    let bias = layer.bias().expect("the layer has a bias");
    assert!(bias.grad(&grads).is_none(), "the base bias got a gradient");
}

#[test]
fn gradient_of_a_is_zero_at_init() {
    let device = flex().autodiff();
    let layer = LoraLinearConfig::new(5, 4, 2, 9).init(&device);
    let x = tensor(&test_values(15, 51), [3, 5], &device);
    let grads = layer.forward(x).sum().backward();

    let grad_a = values_of(layer.lora_a().grad(&grads).expect("A has a gradient"));
    assert!(grad_a.iter().all(|&v| v == 0.0));
    let grad_b = values_of(layer.lora_b().grad(&grads).expect("B has a gradient"));
    assert!(grad_b.iter().any(|&v| v != 0.0));
}

#[test]
fn a_layer_built_on_the_plain_device_trains_only_its_factors_after_fork() {
    let layer = LoraLinearConfig::new(5, 4, 2, 9)
        .with_bias(true)
        .init(&flex())
        .fork(&flex().autodiff());
    // A validation round trip must not thaw the base either.
    let layer = layer.valid().train();
    let x = tensor(&test_values(15, 61), [3, 5], &flex().autodiff());
    let grads = layer.forward(x).sum().backward();

    assert!(layer.lora_a().grad(&grads).is_some());
    assert!(layer.lora_b().grad(&grads).is_some());
    assert!(layer.weight().grad(&grads).is_none());
    assert!(layer.bias().expect("bias").grad(&grads).is_none());
}

// (4) Merging.

#[test]
fn merged_weight_matches_reference_and_reproduces_the_forward() {
    let device = flex();
    let (batch, seq) = (3, 2);
    let case = Case::new(batch * seq, 6, 5, 3, 16.0, false, true, 71);
    let layer = case.layer(16.0, false, &device);

    let merged = values_of(layer.merged_weight());
    let expected = case.merged();
    assert_close("merged", &merged, &expected, 1e-5);
    let delta = values_of(layer.delta_weight());
    let expected_delta: Vec<f64> = expected
        .iter()
        .zip(&case.w)
        .map(|(m, &w)| m - f64::from(w))
        .collect();
    assert_close("delta", &delta, &expected_delta, 1e-5);

    // A plain linear layer with the merged weight computes what the LoRA layer computes.
    let mut merged_forward = matmul_nt(&case.x, case.rows, case.d_input, &merged, case.d_output);
    let bias = case.bias.as_ref().expect("bias");
    for (i, value) in merged_forward.iter_mut().enumerate() {
        *value += f64::from(bias[i % case.d_output]);
    }
    let y = values_of(layer.forward(tensor(&case.x, [batch, seq, case.d_input], &device)));
    assert_close("y", &y, &merged_forward, 1e-5);
}

// (5) Scaling.

#[test]
fn rslora_scales_by_alpha_over_sqrt_rank() {
    let plain = LoraLinearConfig::new(8, 8, 4, 0).with_alpha(16.0);
    assert_eq!(plain.scaling(), 4.0);
    assert_eq!(plain.clone().with_rslora(true).scaling(), 8.0);
    let rank8 = LoraLinearConfig::new(8, 8, 8, 0).with_alpha(16.0);
    assert_eq!(rank8.scaling(), 2.0);
    assert_eq!(
        rank8.clone().with_rslora(true).scaling(),
        (16.0 / 8f64.sqrt()) as f32
    );
    // The defaults are PEFT-like: alpha 16, plain LoRA, no bias.
    let default = LoraLinearConfig::new(8, 8, 8, 0);
    assert_eq!(
        (default.alpha, default.rslora, default.bias),
        (16.0, false, false)
    );

    // The layer uses the rsLoRA scaling in its forward.
    let device = flex();
    let case = Case::new(4, 8, 8, 8, 16.0, true, false, 81);
    let layer = case.layer(16.0, true, &device);
    assert_eq!(layer.scaling(), (16.0 / 8f64.sqrt()) as f32);
    let y = values_of(layer.forward(tensor(&case.x, [4, 8], &device)));
    assert_close("y", &y, &case.forward(), 1e-5);
}

// Errors.

#[test]
fn invalid_configurations_and_inputs_are_rejected() {
    let device = flex();
    let weight = || Tensor::<2>::zeros([3, 4], &device);

    let zero_rank = LoraLinearConfig::new(4, 3, 0, 0).init_with_base(weight(), None);
    assert!(matches!(zero_rank, Err(LoraError::ZeroRank)));
    let nan_alpha = LoraLinearConfig::new(4, 3, 2, 0)
        .with_alpha(f32::NAN)
        .init_with_base(weight(), None);
    assert!(matches!(nan_alpha, Err(LoraError::NonFiniteAlpha { .. })));

    let config = LoraLinearConfig::new(4, 3, 2, 0);
    // [d_input, d_output] (burn's own Linear layout) is the wrong way round here.
    let transposed = config.init_with_base(Tensor::<2>::zeros([4, 3], &device), None);
    assert!(matches!(
        transposed,
        Err(LoraError::ShapeMismatch {
            what: "base weight",
            ..
        })
    ));
    let bad_bias = config.init_with_base(weight(), Some(Tensor::<1>::zeros([4], &device)));
    assert!(matches!(
        bad_bias,
        Err(LoraError::ShapeMismatch {
            what: "base bias",
            ..
        })
    ));
    let f64_weight = Tensor::<2>::zeros([3, 4], (&device, DType::F64));
    assert!(matches!(
        config.init_with_base(f64_weight, None),
        Err(LoraError::UnsupportedDtype {
            what: "base weight",
            ..
        })
    ));

    let layer = config.init_with_base(weight(), None).unwrap();
    let swapped = layer.with_factors(
        Tensor::<2>::zeros([3, 2], &device),
        Tensor::<2>::zeros([2, 4], &device),
    );
    assert!(matches!(
        swapped,
        Err(LoraError::ShapeMismatch { what: "lora_a", .. })
    ));
}

#[test]
#[should_panic(expected = "invalid LoraLinearConfig")]
fn init_panics_on_an_invalid_configuration() {
    let _ = LoraLinearConfig::new(0, 3, 2, 0).init(&flex());
}

#[test]
fn with_factors_keeps_parameter_ids() {
    let device = flex();
    let layer = LoraLinearConfig::new(4, 3, 2, 0).init(&device);
    let (id_a, id_b) = (layer.lora_a().id, layer.lora_b().id);
    let layer = layer
        .with_factors(
            Tensor::<2>::ones([2, 4], &device),
            Tensor::<2>::ones([3, 2], &device),
        )
        .unwrap();
    assert_eq!((layer.lora_a().id, layer.lora_b().id), (id_a, id_b));
    assert_eq!(values_of(layer.lora_b().val()), vec![1.0; 6]);
}
