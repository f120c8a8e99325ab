//! QLoRA's frozen base: weight matrices kept in quantized blocks and dequantized one matrix at a
//! time, inside the forward and the backward pass, never held in f32 between them.
//!
//! Which blocks: the GGUF's own (Q4_1 for the default model's projections, Q8_0 for its
//! embedding), not NF4. The adapter then trains against exactly the base that `cohort chat`
//! and the serving engine multiply (their kernels read the same blocks), so training and
//! inference see one model, and nothing is re-quantized on the way. Weights that arrive as floats
//! (F32/F16/BF16, e.g. a Hugging Face checkpoint) are quantized to Q4_1 at load: 32-weight blocks
//! with a scale and a minimum, 5 bits per weight.
//!
//! burn's own quantized tensors cannot do this on the CPU: flex keeps each 4-bit value in a byte
//! and its quantized matmul dequantizes the whole weight first and keeps it for the backward pass.
//! Here the matrix product is a custom operation ([`PackedLinear`]) with a hand-written backward
//! pass: `y = x·Wᵀ` forward, `∂x = ∂y·W` backward, each dequantizing `W` into a temporary that
//! is freed as soon as the product is done. `W` is frozen, so no gradient for it exists; the
//! autodiff graph keeps only an `Arc` of the blocks.

// burn 0.22 deprecates its ndarray backend; the `verify-ndarray` feature keeps it as a second
// kernel class for spot checks (`crate::verify`), and the extension below routes to it.
#![cfg_attr(feature = "verify-ndarray", allow(deprecated))]

use std::sync::Arc;

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::{Device as BackendDevice, FloatTensor};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::weights::RawMatrix;
use crate::gguf::GgmlType;
use crate::gguf::quant::{dequantize, quantize};

/// A frozen `[rows, cols]` matrix in quantized blocks, rows in Hugging Face order. Cloning shares
/// the blocks.
#[derive(Debug, Clone)]
pub struct PackedWeight(Arc<RawMatrix>);

impl PackedWeight {
    /// Keeps `m`'s blocks as they are when it is quantized; quantizes float matrices to Q4_1
    /// (or keeps them as F16 when a row is not a whole number of 32-weight blocks).
    pub fn new(m: RawMatrix) -> PackedWeight {
        let m = match m.ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let ty = if m.cols.is_multiple_of(GgmlType::Q4_1.block_elems()) {
                    GgmlType::Q4_1
                } else {
                    GgmlType::F16
                };
                let values = m.to_f32();
                let mut bytes = Vec::new();
                quantize(ty, &values, &mut bytes);
                RawMatrix {
                    ty,
                    rows: m.rows,
                    cols: m.cols,
                    bytes,
                }
            }
            _ => m,
        };
        PackedWeight(Arc::new(m))
    }

    pub fn rows(&self) -> usize {
        self.0.rows
    }

    pub fn cols(&self) -> usize {
        self.0.cols
    }

    /// The block type.
    pub fn ty(&self) -> GgmlType {
        self.0.ty
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.bytes.len()
    }

    /// The whole matrix in f32, row-major, rows dequantized in parallel.
    pub fn to_f32(&self) -> Vec<f32> {
        let m = &*self.0;
        let mut out = vec![0f32; m.rows * m.cols];
        let row_bytes = m.row_bytes();
        out.par_chunks_mut(m.cols.max(1))
            .zip(m.bytes.par_chunks(row_bytes.max(1)))
            .for_each(|(dst, src)| dequantize(m.ty, src, dst));
        out
    }

    /// Rows `ids` in f32, `[ids.len(), cols]` (an embedding lookup).
    pub fn rows_f32(&self, ids: &[usize]) -> Vec<f32> {
        let m = &*self.0;
        let row_bytes = m.row_bytes();
        let mut out = vec![0f32; ids.len() * m.cols];
        for (dst, &r) in out.chunks_mut(m.cols.max(1)).zip(ids) {
            dequantize(m.ty, &m.bytes[r * row_bytes..(r + 1) * row_bytes], dst);
        }
        out
    }

    /// `x·Wᵀ` for `x` `[.., cols]`: `[.., rows]`. Differentiable in `x` on an autodiff device.
    pub fn linear<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let n = dims[..D - 1].iter().product::<usize>();
        let flat = x.reshape([n, dims[D - 1]]);
        let y = <Dispatch as PackedLinear>::packed_linear(flat.into_dispatch(), self.clone());
        let mut out = dims;
        out[D - 1] = self.rows();
        Tensor::<2>::from_dispatch(y).reshape(out)
    }

    /// The embedding rows of `tokens` `[batch, seq]`: `[batch, seq, cols]` on `device`.
    pub fn embed(&self, tokens: Tensor<2, Int>, device: &Device) -> Tensor<3> {
        let [batch, seq] = tokens.dims();
        let ids: Vec<usize> = tokens
            .into_data()
            .iter::<i64>()
            .map(|t| {
                usize::try_from(t)
                    .unwrap_or(0)
                    .min(self.rows().saturating_sub(1))
            })
            .collect();
        Tensor::<3>::from_data(
            TensorData::new(self.rows_f32(&ids), [batch, seq, self.cols()]),
            (device, burn::tensor::DType::F32),
        )
    }

    fn dense<B: Backend>(&self, device: &BackendDevice<B>) -> FloatTensor<B> {
        B::float_from_data(
            TensorData::new(self.to_f32(), [self.rows(), self.cols()]),
            device,
        )
    }
}

/// The matrix products with a packed weight, as a backend operation (so that autodiff can be
/// given its backward pass). Both have a default body for any backend: dequantize, multiply,
/// drop the dequantized matrix.
#[backend_extension(Flex, NdArray: cfg(feature = "verify-ndarray"), Autodiff)]
pub trait PackedLinear: Backend {
    /// `x·Wᵀ`: `x` `[n, cols]` to `[n, rows]`.
    fn packed_linear(x: FloatTensor<Self>, w: PackedWeight) -> FloatTensor<Self> {
        let w = w.dense::<Self>(&x.device());
        Self::float_matmul(x, Self::float_transpose(w))
    }

    /// `g·W`: `g` `[n, rows]` to `[n, cols]` (the backward pass of [`Self::packed_linear`]).
    fn packed_linear_transposed(g: FloatTensor<Self>, w: PackedWeight) -> FloatTensor<Self> {
        let w = w.dense::<Self>(&g.device());
        Self::float_matmul(g, w)
    }
}

impl PackedLinear for Flex {}

#[cfg(feature = "verify-ndarray")]
impl PackedLinear for burn::backend::NdArray {}

/// Backward of `x·Wᵀ`: `∂x = ∂y·W`.
#[derive(Debug)]
struct LinearBackward;

/// Backward of `g·W`: `∂g = ∂y·Wᵀ`.
#[derive(Debug)]
struct TransposedBackward;

impl<B: Backend + PackedLinear> Backward<B, 1> for LinearBackward {
    type State = PackedWeight;

    fn backward(self, ops: Ops<PackedWeight, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |g| {
            B::packed_linear_transposed(g, w)
        });
    }
}

impl<B: Backend + PackedLinear> Backward<B, 1> for TransposedBackward {
    type State = PackedWeight;

    fn backward(self, ops: Ops<PackedWeight, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |g| B::packed_linear(g, w));
    }
}

impl<B: Backend + PackedLinear, C: CheckpointStrategy> PackedLinear for Autodiff<B, C> {
    fn packed_linear(x: FloatTensor<Self>, w: PackedWeight) -> FloatTensor<Self> {
        match LinearBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::packed_linear(x.into_primitive(), w.clone());
                prep.finish(w, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::packed_linear(x.into_primitive(), w)),
        }
    }

    fn packed_linear_transposed(g: FloatTensor<Self>, w: PackedWeight) -> FloatTensor<Self> {
        match TransposedBackward
            .prepare::<C>([g.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::packed_linear_transposed(g.into_primitive(), w.clone());
                prep.finish(w, y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::packed_linear_transposed(g.into_primitive(), w))
            }
        }
    }
}

// A packed weight is a constant of the module tree: nothing to visit, map or move (the blocks
// stay in host memory; each product dequantizes onto the input's device).
impl Module for PackedWeight {
    fn visit<V: ModuleVisitor>(&self, _visitor: &mut V) {}

    fn map<M: ModuleMapper>(self, _mapper: &mut M) -> Self {
        self
    }

    fn to_device(self, _: &Device) -> Self {
        self
    }

    fn fork(self, _: &Device) -> Self {
        self
    }

    fn collect_devices(&self, devices: Devices) -> Devices {
        devices
    }

    fn materialize(self) -> Self {
        self
    }

    fn valid(&self) -> Self {
        self.clone()
    }

    fn train(self) -> Self {
        self
    }
}

impl ModuleDisplayDefault for PackedWeight {
    fn content(&self, content: Content) -> Option<Content> {
        content
            .add_formatted(&format!(
                "PackedWeight {{ {} [{}, {}] }}",
                self.ty(),
                self.rows(),
                self.cols()
            ))
            .optional()
    }
}

impl ModuleDisplay for PackedWeight {}
