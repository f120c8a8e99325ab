//! CPU kernels over GGUF blocks: matrix-vector and matrix-matrix products that read the
//! quantized rows themselves, never a dequantized copy of the weights.
//!
//! Decoding one token is memory-bound: it must stream every weight once. Reading Q4_1 blocks
//! (5 bits per weight) instead of f32 (32 bits) is what makes decode fast. The dot products keep
//! the activations in f32 (no activation quantization), so results equal an f32 product with the
//! dequantized weights up to summation order.
//!
//! The kernels are plain Rust written with 16 independent accumulator lanes, which the compiler
//! turns into AVX-512 (or AVX2) fused multiply-adds when the function is compiled for those
//! features. Each kernel is compiled three times (AVX-512, AVX2+FMA, baseline) and picked at run
//! time from the CPU's features, once per process ([`level`]).

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

use crate::gguf::GgmlType;
use crate::gguf::quant::dequantize;
use crate::model::weights::RawMatrix;

const LANES: usize = 16;

/// The instruction-set level the kernels run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Baseline,
}

/// The level picked for this CPU (`COHORT_KERNELS=baseline|avx2` lowers it, for comparisons).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let wanted = std::env::var("COHORT_KERNELS").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            let avx512 = avx2
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw");
            match wanted.as_str() {
                "baseline" => Level::Baseline,
                "avx2" if avx2 => Level::Avx2,
                _ if avx512 => Level::Avx512,
                _ if avx2 => Level::Avx2,
                _ => Level::Baseline,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = wanted;
            Level::Baseline
        }
    })
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[inline(always)]
fn hsum(acc: &[f32; LANES]) -> f32 {
    // A fixed tree, so the result does not depend on the instruction set.
    let mut v = *acc;
    let mut n = LANES / 2;
    while n > 0 {
        for i in 0..n {
            v[i] += v[i + n];
        }
        n /= 2;
    }
    v[0]
}

/// `Σ a·b` over f32 slices of equal length (a multiple of 16).
#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = hsum(&acc);
    let tail = a.len() / LANES * LANES;
    for i in tail..a.len() {
        s = a[i].mul_add(b[i], s);
    }
    s
}

/// One row (encoded as `ty`) dotted with `x`; `xsum` holds the sum of `x` over each 32-element
/// block (for the Q4_1 offset term).
#[inline(always)]
fn dot_row(ty: GgmlType, row: &[u8], x: &[f32], xsum: &[f32], scratch: &mut [f32]) -> f32 {
    match ty {
        GgmlType::Q4_1 => {
            let mut acc = [0f32; LANES];
            let mut offset = 0f32;
            for ((b, xb), s) in row.chunks_exact(20).zip(x.chunks_exact(32)).zip(xsum) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let q = &b[4..20];
                for l in 0..LANES {
                    acc[l] = (d * (q[l] & 15) as f32).mul_add(xb[l], acc[l]);
                }
                for l in 0..LANES {
                    acc[l] = (d * (q[l] >> 4) as f32).mul_add(xb[l + 16], acc[l]);
                }
                offset = m.mul_add(*s, offset);
            }
            hsum(&acc) + offset
        }
        GgmlType::Q4_0 => {
            let mut acc = [0f32; LANES];
            for (b, xb) in row.chunks_exact(18).zip(x.chunks_exact(32)) {
                let d = f16_at(b, 0);
                let q = &b[2..18];
                for l in 0..LANES {
                    acc[l] = (d * ((q[l] & 15) as i32 - 8) as f32).mul_add(xb[l], acc[l]);
                }
                for l in 0..LANES {
                    acc[l] = (d * ((q[l] >> 4) as i32 - 8) as f32).mul_add(xb[l + 16], acc[l]);
                }
            }
            hsum(&acc)
        }
        GgmlType::Q8_0 => {
            let mut acc = [0f32; LANES];
            for (b, xb) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
                let d = f16_at(b, 0);
                let q = &b[2..34];
                for l in 0..LANES {
                    acc[l] = (d * (q[l] as i8) as f32).mul_add(xb[l], acc[l]);
                }
                for l in 0..LANES {
                    acc[l] = (d * (q[l + 16] as i8) as f32).mul_add(xb[l + 16], acc[l]);
                }
            }
            hsum(&acc)
        }
        _ => {
            // Other types: decode the row into scratch, then an f32 dot product.
            dequantize(ty, row, scratch);
            dot_f32(scratch, x)
        }
    }
}

#[inline(always)]
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks(32).map(|c| c.iter().sum()).collect()
}

/// `y[r] = row_r · x` for rows `first..first + y.len()`.
#[inline(always)]
fn matvec_rows(w: &RawMatrix, first: usize, x: &[f32], xsum: &[f32], y: &mut [f32]) {
    let rb = w.row_bytes();
    let mut scratch = vec![0f32; if needs_scratch(w.ty) { w.cols } else { 0 }];
    for (i, out) in y.iter_mut().enumerate() {
        let r = first + i;
        *out = dot_row(w.ty, &w.bytes[r * rb..(r + 1) * rb], x, xsum, &mut scratch);
    }
}

/// `ys[t][r] = row_r · xs[t]` for rows `first..first + n` and every token `t`; each row is
/// decoded once into f32 and reused for all tokens. `ys` is `[tokens, w.rows]`.
#[inline(always)]
fn matmul_rows(w: &RawMatrix, first: usize, n: usize, xs: &[f32], ys_block: &mut [f32]) {
    let rb = w.row_bytes();
    let tokens = xs.len() / w.cols;
    let mut rows = vec![0f32; n * w.cols];
    for i in 0..n {
        let r = first + i;
        dequantize(
            w.ty,
            &w.bytes[r * rb..(r + 1) * rb],
            &mut rows[i * w.cols..(i + 1) * w.cols],
        );
    }
    // ys_block is [tokens, n] for this row block.
    for t in 0..tokens {
        let x = &xs[t * w.cols..(t + 1) * w.cols];
        for i in 0..n {
            ys_block[t * n + i] = dot_f32(&rows[i * w.cols..(i + 1) * w.cols], x);
        }
    }
}

fn needs_scratch(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q4_1 | GgmlType::Q4_0 | GgmlType::Q8_0)
}

macro_rules! versions {
    ($generic:ident, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        fn $avx512($($arg: $ty),*) {
            $generic($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $avx2($($arg: $ty),*) {
            $generic($($arg),*)
        }
    };
}

versions!(matvec_rows, matvec_rows_avx512, matvec_rows_avx2, (w: &RawMatrix, first: usize, x: &[f32], xsum: &[f32], y: &mut [f32]));
versions!(matmul_rows, matmul_rows_avx512, matmul_rows_avx2, (w: &RawMatrix, first: usize, n: usize, xs: &[f32], ys: &mut [f32]));

#[allow(unsafe_code)]
fn matvec_rows_dispatch(w: &RawMatrix, first: usize, x: &[f32], xsum: &[f32], y: &mut [f32]) {
    match level() {
        // SAFETY: `level()` returns Avx512 / Avx2 only after the CPU reported those features.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { matvec_rows_avx512(w, first, x, xsum, y) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { matvec_rows_avx2(w, first, x, xsum, y) },
        _ => matvec_rows(w, first, x, xsum, y),
    }
}

#[allow(unsafe_code)]
fn matmul_rows_dispatch(w: &RawMatrix, first: usize, n: usize, xs: &[f32], ys: &mut [f32]) {
    match level() {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { matmul_rows_avx512(w, first, n, xs, ys) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { matmul_rows_avx2(w, first, n, xs, ys) },
        _ => matmul_rows(w, first, n, xs, ys),
    }
}

/// Rows per parallel task in a matrix-vector product.
const MATVEC_CHUNK: usize = 32;
/// Rows per parallel task in a matrix-matrix product.
const MATMUL_CHUNK: usize = 16;

/// `y = W·x` (`x` `[cols]`, `y` `[rows]`).
pub fn matvec(w: &RawMatrix, x: &[f32], y: &mut [f32]) {
    assert_eq!((x.len(), y.len()), (w.cols, w.rows), "matvec shapes");
    let xsum = block_sums(x);
    y.par_chunks_mut(MATVEC_CHUNK)
        .enumerate()
        .for_each(|(c, out)| {
            matvec_rows_dispatch(w, c * MATVEC_CHUNK, x, &xsum, out);
        });
}

/// `Y = X·Wᵀ` for `X` `[tokens, cols]`, giving `Y` `[tokens, rows]`.
pub fn matmul(w: &RawMatrix, xs: &[f32], ys: &mut [f32]) {
    let tokens = xs.len() / w.cols;
    assert_eq!(
        (xs.len(), ys.len()),
        (tokens * w.cols, tokens * w.rows),
        "matmul shapes"
    );
    if tokens == 1 {
        return matvec(w, xs, ys);
    }
    let blocks: Vec<Vec<f32>> = (0..w.rows.div_ceil(MATMUL_CHUNK))
        .into_par_iter()
        .map(|c| {
            let first = c * MATMUL_CHUNK;
            let n = MATMUL_CHUNK.min(w.rows - first);
            let mut block = vec![0f32; tokens * n];
            matmul_rows_dispatch(w, first, n, xs, &mut block);
            block
        })
        .collect();
    for (c, block) in blocks.iter().enumerate() {
        let first = c * MATMUL_CHUNK;
        let n = block.len() / tokens;
        for t in 0..tokens {
            ys[t * w.rows + first..t * w.rows + first + n]
                .copy_from_slice(&block[t * n..(t + 1) * n]);
        }
    }
}
