//! CPU kernels over GGUF blocks: matrix-vector and matrix-matrix products that read the
//! quantized rows themselves, never a dequantized copy of the weights.
//!
//! Decoding one token is memory-bound: it must stream every weight once. Reading Q4_1 blocks
//! (5 bits per weight) instead of f32 (32 bits) is what makes decode fast. The dot products keep
//! the activations in f32 (no activation quantization), so results equal an f32 product with the
//! dequantized weights up to summation order.
//!
//! On AVX-512 CPUs the Q4_1, Q4_0 and Q8_0 dot products and the f32 micro-kernel of the
//! matrix-matrix product are written with intrinsics (module `avx512`): nibbles are unpacked and
//! widened to f32 in registers and multiplied with fused multiply-adds. Elsewhere the same
//! arithmetic is plain Rust with 16 independent accumulator lanes, compiled for AVX2+FMA and for
//! the baseline; the level is picked at run time from the CPU's features, once per process
//! ([`level`]). Each level always sums in the same order, so results are bit-for-bit repeatable
//! on one machine (they differ between levels in the last bits).
//!
//! [`matvec_batch`] multiplies several vectors (a decode step of several sequences) with one
//! pass over the weights, each result bit for bit what [`matvec`] gives for that vector alone.

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
            // Exactly the features the kernels are compiled with (see `versions!` and `avx512`).
            let avx2 = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl");
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
        #[allow(clippy::too_many_arguments)]
        fn $avx512($($arg: $ty),*) {
            $generic($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        fn $avx2($($arg: $ty),*) {
            $generic($($arg),*)
        }
    };
}

versions!(matvec_rows, matvec_rows_avx512, matvec_rows_avx2, (w: &RawMatrix, first: usize, x: &[f32], xsum: &[f32], y: &mut [f32]));
versions!(matmul_rows, matmul_rows_avx512, matmul_rows_avx2, (w: &RawMatrix, first: usize, n: usize, xs: &[f32], ys: &mut [f32]));

/// One query head attending over `visible` cached positions: `o = softmax(q·Kᵀ·scale)·V`, where
/// position `j`'s key is `keys[j·stride + offset ..][..q.len()]` (values likewise).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    visible: usize,
    scale: f32,
    o: &mut [f32],
) {
    let hd = q.len();
    // Plain loops, no closures: a closure is not compiled with its caller's target features, and
    // `mul_add` outside them is a library call.
    let mut scores = vec![0f32; visible];
    let mut max = f32::NEG_INFINITY;
    for j in 0..visible {
        let s = dot_f32(q, &keys[j * stride + offset..j * stride + offset + hd]) * scale;
        scores[j] = s;
        max = max.max(s);
    }
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    o.fill(0.0);
    let inv = 1.0 / total;
    for (j, s) in scores.iter().enumerate() {
        let p = s * inv;
        let v = &values[j * stride + offset..j * stride + offset + hd];
        for (acc, val) in o.iter_mut().zip(v) {
            *acc = p.mul_add(*val, *acc);
        }
    }
}

versions!(attend, attend_avx512, attend_avx2, (q: &[f32], keys: &[f32], values: &[f32], stride: usize, offset: usize, visible: usize, scale: f32, o: &mut [f32]));

/// One query head's attention (`softmax(q·Kᵀ·scale)·V`) at the CPU's best level.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub fn attend_dispatch(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    visible: usize,
    scale: f32,
    o: &mut [f32],
) {
    match level() {
        // SAFETY: `level()` returns Avx512 / Avx2 only after the CPU reported those features.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe {
            attend_avx512(q, keys, values, stride, offset, visible, scale, o)
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { attend_avx2(q, keys, values, stride, offset, visible, scale, o) },
        _ => attend(q, keys, values, stride, offset, visible, scale, o),
    }
}

#[allow(unsafe_code)]
fn matvec_rows_dispatch(w: &RawMatrix, first: usize, x: &[f32], xsum: &[f32], y: &mut [f32]) {
    match level() {
        // SAFETY: `level()` returns Avx512 / Avx2 only after the CPU reported those features.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if avx512::supports(w.ty) => unsafe {
            avx512::matvec_rows(w, first, x, xsum, y)
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { matvec_rows_avx512(w, first, x, xsum, y) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if avx2::supports(w.ty) => unsafe { avx2::matvec_rows(w, first, x, xsum, y) },
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
        Level::Avx512 if w.cols.is_multiple_of(16) => unsafe {
            avx512::matmul_rows(w, first, n, xs, ys)
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { matmul_rows_avx512(w, first, n, xs, ys) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if w.cols.is_multiple_of(8) => unsafe {
            avx2::matmul_rows(w, first, n, xs, ys)
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { matmul_rows_avx2(w, first, n, xs, ys) },
        _ => matmul_rows(w, first, n, xs, ys),
    }
}

/// `Σ a·b` with 16 independent partial sums (plain multiplies and adds: the same result at
/// every instruction-set level), then their sum in order, then the tail one product at a time.
#[inline(always)]
pub(crate) fn lora_dot(a: &[f32], b: &[f32]) -> f32 {
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

/// `down[k] = lora_dot(A_k, x)·scale` for the `r` rows of `a` (`A`, `[r, x.len()]`): the first
/// half of a LoRA adapter's update `y += scale·B·(A·x)` of one projection.
pub fn lora_down(a: &[f32], r: usize, scale: f32, x: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), r * x.len(), "lora shapes");
    let d_in = x.len();
    (0..r)
        .map(|k| lora_dot(&a[k * d_in..(k + 1) * d_in], x) * scale)
        .collect()
}

/// [`lora_up`], compiled for each level by `versions!`.
#[inline(always)]
fn lora_up_impl(
    b: &[f32],
    transposed: bool,
    d_out: usize,
    first: usize,
    down: &[f32],
    y: &mut [f32],
) {
    let r = down.len();
    if transposed && r < 16 {
        for (c, yc) in y.chunks_mut(16).enumerate() {
            let o = first + c * 16;
            let mut acc = [0f32; 16];
            for k in 0..r {
                let col = &b[k * d_out + o..k * d_out + o + yc.len()];
                for l in 0..col.len() {
                    acc[l] += col[l] * down[k];
                }
            }
            for l in 0..yc.len() {
                yc[l] += acc[l];
            }
        }
    } else if r < 16 {
        for (i, yo) in y.iter_mut().enumerate() {
            let row = &b[(first + i) * r..(first + i + 1) * r];
            let mut s = 0f32;
            for k in 0..r {
                s += row[k] * down[k];
            }
            *yo += s;
        }
    } else {
        for (i, yo) in y.iter_mut().enumerate() {
            *yo += lora_dot(&b[(first + i) * r..(first + i + 1) * r], down);
        }
    }
}

versions!(lora_up_impl, lora_up_avx512, lora_up_avx2, (b: &[f32], transposed: bool, d_out: usize, first: usize, down: &[f32], y: &mut [f32]));

/// The second half of a LoRA update: `y[o] += Σ_k B[o,k]·down[k]` for outputs
/// `first..first + y.len()` of `d_out`, where `b` is `B` (`[d_out, r]`) or, when `transposed`,
/// `Bᵀ` (`[r, d_out]`). Each output sums as `lora_dot` sums a row of `B`: a row shorter than 16
/// from zero, one product at a time, in order (which `Bᵀ` lets 16 outputs do at once). Plain
/// multiplies and adds: the same results at every instruction-set level.
#[allow(unsafe_code)]
pub fn lora_up(
    b: &[f32],
    transposed: bool,
    d_out: usize,
    first: usize,
    down: &[f32],
    y: &mut [f32],
) {
    assert!(
        b.len() == down.len() * d_out && first + y.len() <= d_out,
        "lora shapes"
    );
    match level() {
        // SAFETY: `level()` returns Avx512 / Avx2 only after the CPU reported those features.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { lora_up_avx512(b, transposed, d_out, first, down, y) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { lora_up_avx2(b, transposed, d_out, first, down, y) },
        _ => lora_up_impl(b, transposed, d_out, first, down, y),
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

/// Several matrix-vector products in one parallel pass (`ys[i] = ws[i]·xs[i]`): the projections
/// that read the same input (query, key and value; gate and up) cost one fork-join instead of
/// three, which matters when decoding one token at a time.
pub fn matvec_many(jobs: &mut [(&RawMatrix, &[f32], &mut [f32])]) {
    let sums: Vec<Vec<f32>> = jobs.iter().map(|(_, x, _)| block_sums(x)).collect();
    let mut tasks = Vec::new();
    for ((w, x, y), xsum) in jobs.iter_mut().zip(&sums) {
        assert_eq!((x.len(), y.len()), (w.cols, w.rows), "matvec shapes");
        for (c, out) in y.chunks_mut(MATVEC_CHUNK).enumerate() {
            tasks.push((*w, *x, xsum.as_slice(), c * MATVEC_CHUNK, out));
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(w, x, xsum, first, out)| matvec_rows_dispatch(w, first, x, xsum, out));
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

/// Rows per parallel task in a batched matrix-vector product ([`matvec_batch_many`]) of at
/// least [`BATCH_MIN`] vectors.
const BATCH_CHUNK: usize = 16;
/// Vectors from which a batched product decodes each row once into f32 and reuses it for all of
/// them; below, each vector runs [`matvec`]'s dot product over the rows (cheaper for one or two,
/// the rows read from memory once all the same).
const BATCH_MIN: usize = 3;

/// `ys[t] = W·xs[t]` for each of the `n` vectors of `xs` (`[n, cols]` gives `[n, rows]`), each
/// result bit for bit what [`matvec`] gives for that vector alone, with the weights read from
/// memory once for all the vectors (the decode step of several sequences at once).
pub fn matvec_batch(w: &RawMatrix, xs: &[f32], ys: &mut [f32]) {
    matvec_batch_many(&mut [(w, xs, ys)]);
}

/// Several batched matrix-vector products ([`matvec_batch`]) in one parallel pass, as
/// [`matvec_many`] does for single vectors.
pub fn matvec_batch_many(jobs: &mut [(&RawMatrix, &[f32], &mut [f32])]) {
    for (w, xs, ys) in jobs.iter() {
        let n = xs.len() / w.cols.max(1);
        assert_eq!(
            (xs.len(), ys.len()),
            (n * w.cols, n * w.rows),
            "matvec_batch shapes"
        );
    }
    if jobs.iter().all(|(w, xs, _)| xs.len() == w.cols) {
        return matvec_many(jobs);
    }
    // Each vector's block sums, per job.
    let sums: Vec<Vec<Vec<f32>>> = jobs
        .iter()
        .map(|(w, xs, _)| xs.chunks_exact(w.cols).map(block_sums).collect())
        .collect();
    // Each task: a chunk of rows, with each vector's outputs for those rows.
    let mut tasks = Vec::new();
    for ((w, xs, ys), sums) in jobs.iter_mut().zip(&sums) {
        let chunk = if sums.len() >= BATCH_MIN {
            BATCH_CHUNK
        } else {
            MATVEC_CHUNK
        };
        let mut outs: Vec<_> = ys.chunks_mut(w.rows).map(|y| y.chunks_mut(chunk)).collect();
        for c in 0..w.rows.div_ceil(chunk) {
            let ys: Vec<&mut [f32]> = outs.iter_mut().filter_map(Iterator::next).collect();
            tasks.push((*w, *xs, sums.as_slice(), c * chunk, ys));
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(w, xs, sums, first, mut ys)| batch_rows_dispatch(w, first, xs, sums, &mut ys));
}

/// Rows `first..` times each vector of `xs` into `ys[t]` (the rows' outputs for vector `t`),
/// each product bit for bit [`matvec_rows_dispatch`]'s.
#[allow(unsafe_code)]
fn batch_rows_dispatch(
    w: &RawMatrix,
    first: usize,
    xs: &[f32],
    sums: &[Vec<f32>],
    ys: &mut [&mut [f32]],
) {
    #[cfg(target_arch = "x86_64")]
    if ys.len() >= BATCH_MIN
        && level() == Level::Avx512
        && avx512::supports_batch(w.ty)
        && ys[0].len() <= avx512::BATCH_ROWS
    {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|s| {
            // SAFETY: `level()` returns Avx512 only after the CPU reported its features.
            unsafe { avx512::batch_rows(w, first, xs, sums, ys, &mut s.borrow_mut()) }
        });
        return;
    }
    // Elsewhere, vector by vector over the block's rows (which stay in the cache from one
    // vector to the next).
    for (t, (y, xsum)) in ys.iter_mut().zip(sums).enumerate() {
        matvec_rows_dispatch(w, first, &xs[t * w.cols..(t + 1) * w.cols], xsum, y);
    }
}

/// AVX-512 kernels with intrinsics. Every function checks the lengths it relies on before any
/// pointer read, so the unaligned loads stay inside the slices.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use core::arch::x86_64::*;

    use super::{RawMatrix, dequantize};
    use crate::gguf::GgmlType;

    /// Types with a hand-written dot product here.
    pub(super) fn supports(ty: GgmlType) -> bool {
        matches!(
            ty,
            GgmlType::Q4_1 | GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::F16 | GgmlType::F32
        )
    }

    /// A row of f16 (`F16`) or f32 (`F32`) values times `x`, 16 lanes at a time, two accumulators.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn dot_float<const HALF: bool>(row: &[u8], x: &[f32]) -> f32 {
        let size = if HALF { 2 } else { 4 };
        let n = row.len() / size;
        assert!(row.len() == n * size && x.len() >= n);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        macro_rules! load {
            ($at:expr) => {
                // SAFETY: $at + 16 <= n: the 16 values lie inside `row` and inside `x`.
                unsafe {
                    let w = if HALF {
                        _mm512_cvtph_ps(_mm256_loadu_si256(rp.add($at * 2).cast()))
                    } else {
                        _mm512_loadu_ps(rp.add($at * 4).cast())
                    };
                    (w, _mm512_loadu_ps(xp.add($at)))
                }
            };
        }
        while i + 32 <= n {
            let (w0, x0) = load!(i);
            let (w1, x1) = load!(i + 16);
            acc0 = _mm512_fmadd_ps(w0, x0, acc0);
            acc1 = _mm512_fmadd_ps(w1, x1, acc1);
            i += 32;
        }
        while i + 16 <= n {
            let (w0, x0) = load!(i);
            acc0 = _mm512_fmadd_ps(w0, x0, acc0);
            i += 16;
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        while i < n {
            let w = if HALF {
                half::f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32()
            } else {
                f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]])
            };
            sum = w.mul_add(x[i], sum);
            i += 1;
        }
        sum
    }

    /// The value of each 4-bit code 0..=15 plus `bias` (0 for Q4_1, −8 for Q4_0), lane `k`
    /// holding code `k`: the lookup table of the Q4 kernels.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn nibble_values(bias: f32) -> __m512 {
        _mm512_add_ps(
            _mm512_set_ps(
                15.0, 14.0, 13.0, 12.0, 11.0, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0,
                0.0,
            ),
            _mm512_set1_ps(bias),
        )
    }

    /// Σ over blocks of a Q4_1 (`MIN`) or Q4_0 row times `x` (f32). Two blocks per step into
    /// two accumulators, so consecutive fused multiply-adds do not wait on each other.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn dot_q4<const MIN: bool>(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let bb = if MIN { 20 } else { 18 };
        let blocks = row.len() / bb;
        assert!(row.len() == blocks * bb && x.len() >= blocks * 32 && xsum.len() >= blocks);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let table = nibble_values(if MIN { 0.0 } else { -8.0 });
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (mut off0, mut off1) = (0f32, 0f32);
        macro_rules! block {
            ($b:expr, $acc:ident, $off:ident) => {{
                let b = $b;
                // SAFETY: block b < blocks: its bb bytes lie inside `row` and its 32 floats
                // inside `x` (asserted above).
                let (bits, q, x0, x1) = unsafe {
                    let p = rp.add(b * bb);
                    (
                        (p as *const i32).read_unaligned(),
                        _mm_loadu_si128(p.add(bb - 16).cast()),
                        _mm512_loadu_ps(xp.add(b * 32)),
                        _mm512_loadu_ps(xp.add(b * 32 + 16)),
                    )
                };
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
                // The 16 bytes widened to 16 lanes; a lane's low 4 bits pick its element's
                // value d·q (or d·(q - 8)) from a 16-entry table, and shifting by 4 brings the
                // high nibble down for the second half of the block.
                let idx = _mm512_cvtepu8_epi32(q);
                let td = _mm512_mul_ps(table, _mm512_broadcastss_ps(dm));
                $acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, td), x0, $acc);
                $acc = _mm512_fmadd_ps(
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(idx), td),
                    x1,
                    $acc,
                );
                if MIN {
                    $off = _mm_cvtss_f32(_mm_movehdup_ps(dm)).mul_add(xsum[b], $off);
                }
            }};
        }
        let mut b = 0;
        while b + 2 <= blocks {
            block!(b, acc0, off0);
            block!(b + 1, acc1, off1);
            b += 2;
        }
        if b < blocks {
            block!(b, acc0, off0);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (off0 + off1)
    }

    /// Σ over blocks of a Q8_0 row times `x` (f32), two blocks per step.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let blocks = row.len() / 34;
        assert!(row.len() == blocks * 34 && x.len() >= blocks * 32);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        macro_rules! block {
            ($b:expr, $acc:ident) => {{
                let b = $b;
                // SAFETY: block b < blocks: its 34 bytes lie inside `row`, its 32 floats inside `x`.
                let (bits, q, x0, x1) = unsafe {
                    let p = rp.add(b * 34);
                    (
                        (p as *const u16).read_unaligned() as i32,
                        _mm256_loadu_si256(p.add(2).cast()),
                        _mm512_loadu_ps(xp.add(b * 32)),
                        _mm512_loadu_ps(xp.add(b * 32 + 16)),
                    )
                };
                let d = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(q)));
                let s = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
                $acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(d), s, $acc);
            }};
        }
        let mut b = 0;
        while b + 2 <= blocks {
            block!(b, acc0);
            block!(b + 1, acc1);
            b += 2;
        }
        if b < blocks {
            block!(b, acc0);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }

    /// `y[i] = row(first + i) · x`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) fn matvec_rows(w: &RawMatrix, first: usize, x: &[f32], xsum: &[f32], y: &mut [f32]) {
        let rb = w.row_bytes();
        for (i, out) in y.iter_mut().enumerate() {
            let row = &w.bytes[(first + i) * rb..(first + i + 1) * rb];
            *out = match w.ty {
                GgmlType::Q4_1 => dot_q4::<true>(row, x, xsum),
                GgmlType::Q4_0 => dot_q4::<false>(row, x, xsum),
                GgmlType::F16 => dot_float::<true>(row, x),
                GgmlType::F32 => dot_float::<false>(row, x),
                _ => dot_q8_0(row, x),
            };
        }
    }

    /// Types [`batch_rows`] multiplies.
    pub(super) fn supports_batch(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q4_1 | GgmlType::Q4_0 | GgmlType::Q8_0)
    }

    /// Rows per call of [`batch_rows`] at most (one lane each in the Q4_1 offsets).
    pub(super) const BATCH_ROWS: usize = 16;

    /// Rows `first..first + rows` times every vector of `xs` (`[n, cols]`), into `ys[t][r]`,
    /// each product bit for bit what [`matvec_rows`] gives for that row and vector. The rows are
    /// decoded once into f32 (the values `d·q` that `dot_q4` and `dot_q8_0` form in registers),
    /// then multiplied with four rows by four vectors at a time, every (row, vector) pair summed
    /// in exactly those functions' order: the even blocks into one sum and the odd blocks into
    /// another, the Q4_1 offsets `m·Σx` likewise (in one lane per row), Q8_0's scale applied to
    /// each block's sum.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) fn batch_rows(
        w: &RawMatrix,
        first: usize,
        xs: &[f32],
        xsums: &[Vec<f32>],
        ys: &mut [&mut [f32]],
        scratch: &mut Vec<f32>,
    ) {
        let cols = w.cols;
        let blocks = cols / 32;
        let n = xsums.len();
        let rows = ys.first().map_or(0, |y| y.len());
        assert!(
            supports_batch(w.ty)
                && rows <= BATCH_ROWS
                && cols == blocks * 32
                && first + rows <= w.rows
                && xs.len() == n * cols
                && ys.len() == n
                && ys.iter().all(|y| y.len() == rows)
                && xsums.iter().all(|s| s.len() >= blocks)
        );
        // Decoded rows `[rows, cols]`, then the per-block scales: Q4 `m` as `[blocks, 16]`
        // (a lane per row), Q8_0 `d` as `[rows, blocks]`.
        let rb = w.row_bytes();
        // Every value read below is written first: no need to clear.
        if scratch.len() < rows * cols + blocks * BATCH_ROWS {
            scratch.resize(rows * cols + blocks * BATCH_ROWS, 0.0);
        }
        let (wbuf, sbuf) = scratch.split_at_mut(rows * cols);
        for r in 0..rows {
            let row = &w.bytes[(first + r) * rb..(first + r + 1) * rb];
            let out = &mut wbuf[r * cols..(r + 1) * cols];
            match w.ty {
                GgmlType::Q4_1 => decode_q4::<true>(row, out, &mut sbuf[r..], BATCH_ROWS),
                GgmlType::Q4_0 => decode_q4::<false>(row, out, &mut sbuf[r..], BATCH_ROWS),
                _ => decode_q8_0(row, out, &mut sbuf[r * blocks..(r + 1) * blocks]),
            }
        }
        let (wbuf, sbuf) = (&*wbuf, &*sbuf);
        let q8 = w.ty == GgmlType::Q8_0;
        macro_rules! tile {
            ($rr:literal, $tt:literal, $r:expr, $t:expr) => {
                if q8 {
                    tile::<true, $rr, $tt>(wbuf, sbuf, blocks, xs, $r, $t, ys)
                } else {
                    tile::<false, $rr, $tt>(wbuf, sbuf, blocks, xs, $r, $t, ys)
                }
            };
        }
        macro_rules! rows {
            ($tt:literal, $t:expr) => {{
                let mut r = 0;
                while r + 4 <= rows {
                    tile!(4, $tt, r, $t);
                    r += 4;
                }
                if r + 2 <= rows {
                    tile!(2, $tt, r, $t);
                    r += 2;
                }
                if r < rows {
                    tile!(1, $tt, r, $t);
                }
            }};
        }
        // Vectors outer: four vectors' activations stay in the L1 cache while every row block
        // passes by.
        let mut t = 0;
        while t + 4 <= n {
            rows!(4, t);
            t += 4;
        }
        if t + 2 <= n {
            rows!(2, t);
            t += 2;
        }
        if t < n {
            rows!(1, t);
        }
        if !q8 {
            // Add the offsets (zero for Q4_0, as in `dot_q4`): per vector, one lane per row.
            let min = w.ty == GgmlType::Q4_1;
            let mut lanes = [0f32; BATCH_ROWS];
            for (y, xsum) in ys.iter_mut().zip(xsums) {
                let (mut off0, mut off1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                if min {
                    let mp = sbuf.as_ptr();
                    let mut b = 0;
                    while b + 2 <= blocks {
                        // SAFETY: b + 1 < blocks: 16 floats at (b + 1)·16 lie inside `sbuf`
                        // ([blocks, 16]).
                        let (m0, m1) = unsafe {
                            (
                                _mm512_loadu_ps(mp.add(b * BATCH_ROWS)),
                                _mm512_loadu_ps(mp.add((b + 1) * BATCH_ROWS)),
                            )
                        };
                        off0 = _mm512_fmadd_ps(m0, _mm512_set1_ps(xsum[b]), off0);
                        off1 = _mm512_fmadd_ps(m1, _mm512_set1_ps(xsum[b + 1]), off1);
                        b += 2;
                    }
                    if b < blocks {
                        // SAFETY: b < blocks, as above.
                        let m0 = unsafe { _mm512_loadu_ps(mp.add(b * BATCH_ROWS)) };
                        off0 = _mm512_fmadd_ps(m0, _mm512_set1_ps(xsum[b]), off0);
                    }
                }
                // SAFETY: `lanes` holds 16 floats.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_add_ps(off0, off1)) };
                for (y, off) in y.iter_mut().zip(lanes) {
                    *y += off;
                }
            }
        }
    }

    /// A Q4_1 (`MIN`) or Q4_0 row decoded as `dot_q4` decodes it: `out[32b + j]` is the value
    /// its block `b` multiplies with `x[32b + j]`; Q4_1's `m` of block `b` goes to
    /// `mins[b·stride]`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn decode_q4<const MIN: bool>(row: &[u8], out: &mut [f32], mins: &mut [f32], stride: usize) {
        let bb = if MIN { 20 } else { 18 };
        let blocks = row.len() / bb;
        assert!(
            row.len() == blocks * bb
                && out.len() >= blocks * 32
                && (!MIN || blocks == 0 || mins.len() > (blocks - 1) * stride)
        );
        let (rp, op) = (row.as_ptr(), out.as_mut_ptr());
        let table = nibble_values(if MIN { 0.0 } else { -8.0 });
        for b in 0..blocks {
            // SAFETY: block b < blocks: its bb bytes lie inside `row`, its 32 floats inside
            // `out` (asserted above).
            let (bits, q) = unsafe {
                let p = rp.add(b * bb);
                (
                    (p as *const i32).read_unaligned(),
                    _mm_loadu_si128(p.add(bb - 16).cast()),
                )
            };
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
            let idx = _mm512_cvtepu8_epi32(q);
            let td = _mm512_mul_ps(table, _mm512_broadcastss_ps(dm));
            // SAFETY: as above.
            unsafe {
                _mm512_storeu_ps(op.add(b * 32), _mm512_permutexvar_ps(idx, td));
                _mm512_storeu_ps(
                    op.add(b * 32 + 16),
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(idx), td),
                );
            }
            if MIN {
                mins[b * stride] = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            }
        }
    }

    /// A Q8_0 row decoded as `dot_q8_0` decodes it: the quants as f32 in `out`, each block's
    /// scale `d` in `scales`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn decode_q8_0(row: &[u8], out: &mut [f32], scales: &mut [f32]) {
        let blocks = row.len() / 34;
        assert!(row.len() == blocks * 34 && out.len() >= blocks * 32 && scales.len() >= blocks);
        let (rp, op) = (row.as_ptr(), out.as_mut_ptr());
        for (b, scale) in scales.iter_mut().enumerate().take(blocks) {
            // SAFETY: block b < blocks: its 34 bytes lie inside `row`, its 32 floats inside `out`.
            unsafe {
                let p = rp.add(b * 34);
                let bits = (p as *const u16).read_unaligned() as i32;
                let q = _mm256_loadu_si256(p.add(2).cast());
                *scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(q)));
                _mm512_storeu_ps(op.add(b * 32), q0);
                _mm512_storeu_ps(op.add(b * 32 + 16), q1);
            }
        }
    }

    /// Rows `r..r + RR` of the decoded rows `w` (`[_, blocks·32]`; Q8_0's scales `d`
    /// `[_, blocks]`) times vectors `t..t + T` of `xs`, into `ys[t'][r']`: `dot_q8_0`'s sums
    /// (`Q8`), or `dot_q4`'s without the offsets. The even blocks are summed first, then the
    /// odd ones, so that only `RR·T` accumulators are live at a time.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    fn tile<const Q8: bool, const RR: usize, const T: usize>(
        w: &[f32],
        d: &[f32],
        blocks: usize,
        xs: &[f32],
        r: usize,
        t: usize,
        ys: &mut [&mut [f32]],
    ) {
        let cols = blocks * 32;
        assert!(w.len() >= (r + RR) * cols && xs.len() >= (t + T) * cols);
        assert!(!Q8 || d.len() >= (r + RR) * blocks);
        assert!(ys.len() >= t + T && ys[t..t + T].iter().all(|y| y.len() >= r + RR));
        let (wp, xp) = (w.as_ptr(), xs.as_ptr());
        let mut sums = [[[_mm512_setzero_ps(); T]; RR]; 2];
        for (parity, sum) in sums.iter_mut().enumerate() {
            let mut acc = [[_mm512_setzero_ps(); T]; RR];
            let mut b = parity;
            while b < blocks {
                let c = b * 32;
                let mut x0 = [_mm512_setzero_ps(); T];
                let mut x1 = [_mm512_setzero_ps(); T];
                for k in 0..T {
                    // SAFETY: token t + k < t + T and c + 32 <= cols (asserted above).
                    unsafe {
                        x0[k] = _mm512_loadu_ps(xp.add((t + k) * cols + c));
                        x1[k] = _mm512_loadu_ps(xp.add((t + k) * cols + c + 16));
                    }
                }
                for i in 0..RR {
                    // SAFETY: row r + i < r + RR and c + 32 <= cols (asserted above).
                    let (w0, w1) = unsafe {
                        (
                            _mm512_loadu_ps(wp.add((r + i) * cols + c)),
                            _mm512_loadu_ps(wp.add((r + i) * cols + c + 16)),
                        )
                    };
                    if Q8 {
                        let scale = _mm512_set1_ps(d[(r + i) * blocks + b]);
                        for k in 0..T {
                            let s = _mm512_fmadd_ps(w1, x1[k], _mm512_mul_ps(w0, x0[k]));
                            acc[i][k] = _mm512_fmadd_ps(scale, s, acc[i][k]);
                        }
                    } else {
                        for k in 0..T {
                            acc[i][k] = _mm512_fmadd_ps(w0, x0[k], acc[i][k]);
                            acc[i][k] = _mm512_fmadd_ps(w1, x1[k], acc[i][k]);
                        }
                    }
                }
                b += 2;
            }
            *sum = acc;
        }
        for i in 0..RR {
            for k in 0..T {
                ys[t + k][r + i] =
                    _mm512_reduce_add_ps(_mm512_add_ps(sums[0][i][k], sums[1][i][k]));
            }
        }
    }

    /// Rows `first..first + n` decoded once, then a 4-row by 2-token register-blocked f32
    /// product with every token of `xs`; `ys` is `[tokens, n]`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) fn matmul_rows(w: &RawMatrix, first: usize, n: usize, xs: &[f32], ys: &mut [f32]) {
        let cols = w.cols;
        assert!(cols.is_multiple_of(16) && xs.len().is_multiple_of(cols));
        let tokens = xs.len() / cols;
        assert!(ys.len() == tokens * n);
        let rb = w.row_bytes();
        let mut rows = vec![0f32; n * cols];
        for i in 0..n {
            dequantize(
                w.ty,
                &w.bytes[(first + i) * rb..(first + i + 1) * rb],
                &mut rows[i * cols..(i + 1) * cols],
            );
        }
        let (rp, xp) = (rows.as_ptr(), xs.as_ptr());
        let mut t = 0;
        while t < tokens {
            let tt = (tokens - t).min(2);
            // The second token of an odd tail reads the first token's row again; its sums are
            // dropped.
            let t1 = if tt == 2 { t + 1 } else { t };
            let mut r = 0;
            while r < n {
                let rr = (n - r).min(4);
                // Rows beyond n repeat the last row; their sums are dropped.
                let ri = [
                    r,
                    (r + 1).min(n - 1),
                    (r + 2).min(n - 1),
                    (r + 3).min(n - 1),
                ];
                let mut acc = [_mm512_setzero_ps(); 8];
                let mut c = 0;
                while c < cols {
                    // SAFETY: every row index is < n and every token index < tokens, and
                    // c + 16 <= cols (cols is a multiple of 16), so each 16-float load lies
                    // inside `rows` ([n, cols]) or `xs` ([tokens, cols]).
                    unsafe {
                        let x0 = _mm512_loadu_ps(xp.add(t * cols + c));
                        let x1 = _mm512_loadu_ps(xp.add(t1 * cols + c));
                        let w0 = _mm512_loadu_ps(rp.add(ri[0] * cols + c));
                        let w1 = _mm512_loadu_ps(rp.add(ri[1] * cols + c));
                        let w2 = _mm512_loadu_ps(rp.add(ri[2] * cols + c));
                        let w3 = _mm512_loadu_ps(rp.add(ri[3] * cols + c));
                        acc[0] = _mm512_fmadd_ps(w0, x0, acc[0]);
                        acc[1] = _mm512_fmadd_ps(w1, x0, acc[1]);
                        acc[2] = _mm512_fmadd_ps(w2, x0, acc[2]);
                        acc[3] = _mm512_fmadd_ps(w3, x0, acc[3]);
                        acc[4] = _mm512_fmadd_ps(w0, x1, acc[4]);
                        acc[5] = _mm512_fmadd_ps(w1, x1, acc[5]);
                        acc[6] = _mm512_fmadd_ps(w2, x1, acc[6]);
                        acc[7] = _mm512_fmadd_ps(w3, x1, acc[7]);
                    }
                    c += 16;
                }
                for k in 0..rr {
                    ys[t * n + r + k] = _mm512_reduce_add_ps(acc[k]);
                    if tt == 2 {
                        ys[(t + 1) * n + r + k] = _mm512_reduce_add_ps(acc[4 + k]);
                    }
                }
                r += rr;
            }
            t += tt;
        }
    }
}

/// AVX2 + FMA kernels with intrinsics, for CPUs without AVX-512: the same arithmetic as
/// [`avx512`](mod@avx512) on 8 lanes. Every function checks the lengths it relies on before any
/// pointer read.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use core::arch::x86_64::*;

    use super::{RawMatrix, dequantize};
    use crate::gguf::GgmlType;

    pub(super) fn supports(ty: GgmlType) -> bool {
        matches!(
            ty,
            GgmlType::Q4_1 | GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::F16 | GgmlType::F32
        )
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 8 bytes (as the low half of an xmm) widened to 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn u8x8(q: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn i8x8(q: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    }

    /// Σ over blocks of a Q4_1 (`MIN`) or Q4_0 row times `x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // `b` indexes the raw block pointers too
    fn dot_q4<const MIN: bool>(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let bb = if MIN { 20 } else { 18 };
        let blocks = row.len() / bb;
        assert!(row.len() == blocks * bb && x.len() >= blocks * 32 && xsum.len() >= blocks);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let mask = _mm_set1_epi8(0x0f);
        let eight = _mm_set1_epi8(8);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut off = 0f32;
        for b in 0..blocks {
            // SAFETY: block b < blocks: its bytes lie inside `row`, its 32 floats inside `x`.
            let (bits, q, xs) = unsafe {
                let p = rp.add(b * bb);
                let xb = xp.add(b * 32);
                (
                    (p as *const i32).read_unaligned(),
                    _mm_loadu_si128(p.add(bb - 16).cast()),
                    [
                        _mm256_loadu_ps(xb),
                        _mm256_loadu_ps(xb.add(8)),
                        _mm256_loadu_ps(xb.add(16)),
                        _mm256_loadu_ps(xb.add(24)),
                    ],
                )
            };
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
            let mut lo = _mm_and_si128(q, mask);
            let mut hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            let (w0, w1, w2, w3) = if MIN {
                (
                    u8x8(lo),
                    u8x8(_mm_srli_si128::<8>(lo)),
                    u8x8(hi),
                    u8x8(_mm_srli_si128::<8>(hi)),
                )
            } else {
                lo = _mm_sub_epi8(lo, eight);
                hi = _mm_sub_epi8(hi, eight);
                (
                    i8x8(lo),
                    i8x8(_mm_srli_si128::<8>(lo)),
                    i8x8(hi),
                    i8x8(_mm_srli_si128::<8>(hi)),
                )
            };
            let s = _mm256_fmadd_ps(w1, xs[1], _mm256_mul_ps(w0, xs[0]));
            let t = _mm256_fmadd_ps(w3, xs[3], _mm256_mul_ps(w2, xs[2]));
            let d = _mm256_broadcastss_ps(dm);
            acc0 = _mm256_fmadd_ps(d, s, acc0);
            acc1 = _mm256_fmadd_ps(d, t, acc1);
            if MIN {
                off = _mm_cvtss_f32(_mm_movehdup_ps(dm)).mul_add(xsum[b], off);
            }
        }
        hsum(_mm256_add_ps(acc0, acc1)) + off
    }

    /// Σ over blocks of a Q8_0 row times `x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let blocks = row.len() / 34;
        assert!(row.len() == blocks * 34 && x.len() >= blocks * 32);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..blocks {
            // SAFETY: block b < blocks: its 34 bytes lie inside `row`, its 32 floats inside `x`.
            let (bits, q0, q1, xs) = unsafe {
                let p = rp.add(b * 34);
                let xb = xp.add(b * 32);
                (
                    (p as *const u16).read_unaligned() as i32,
                    _mm_loadu_si128(p.add(2).cast()),
                    _mm_loadu_si128(p.add(18).cast()),
                    [
                        _mm256_loadu_ps(xb),
                        _mm256_loadu_ps(xb.add(8)),
                        _mm256_loadu_ps(xb.add(16)),
                        _mm256_loadu_ps(xb.add(24)),
                    ],
                )
            };
            let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
            let s = _mm256_fmadd_ps(
                i8x8(_mm_srli_si128::<8>(q0)),
                xs[1],
                _mm256_mul_ps(i8x8(q0), xs[0]),
            );
            let t = _mm256_fmadd_ps(
                i8x8(_mm_srli_si128::<8>(q1)),
                xs[3],
                _mm256_mul_ps(i8x8(q1), xs[2]),
            );
            acc0 = _mm256_fmadd_ps(d, s, acc0);
            acc1 = _mm256_fmadd_ps(d, t, acc1);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// A row of f16 (`HALF`) or f32 values times `x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_float<const HALF: bool>(row: &[u8], x: &[f32]) -> f32 {
        let size = if HALF { 2 } else { 4 };
        let n = row.len() / size;
        assert!(row.len() == n * size && x.len() >= n);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n: the 8 values lie inside `row` and inside `x`.
            let (w, xv) = unsafe {
                let w = if HALF {
                    _mm256_cvtph_ps(_mm_loadu_si128(rp.add(i * 2).cast()))
                } else {
                    _mm256_loadu_ps(rp.add(i * 4).cast())
                };
                (w, _mm256_loadu_ps(xp.add(i)))
            };
            acc = _mm256_fmadd_ps(w, xv, acc);
            i += 8;
        }
        let mut sum = hsum(acc);
        while i < n {
            let w = if HALF {
                half::f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32()
            } else {
                f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]])
            };
            sum = w.mul_add(x[i], sum);
            i += 1;
        }
        sum
    }

    /// `y[i] = row(first + i) · x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn matvec_rows(w: &RawMatrix, first: usize, x: &[f32], xsum: &[f32], y: &mut [f32]) {
        let rb = w.row_bytes();
        for (i, out) in y.iter_mut().enumerate() {
            let row = &w.bytes[(first + i) * rb..(first + i + 1) * rb];
            *out = match w.ty {
                GgmlType::Q4_1 => dot_q4::<true>(row, x, xsum),
                GgmlType::Q4_0 => dot_q4::<false>(row, x, xsum),
                GgmlType::F16 => dot_float::<true>(row, x),
                GgmlType::F32 => dot_float::<false>(row, x),
                _ => dot_q8_0(row, x),
            };
        }
    }

    /// Rows `first..first + n` decoded once, then a 4-row by 2-token register-blocked product
    /// with every token of `xs`; `ys` is `[tokens, n]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn matmul_rows(w: &RawMatrix, first: usize, n: usize, xs: &[f32], ys: &mut [f32]) {
        let cols = w.cols;
        assert!(cols.is_multiple_of(8) && xs.len().is_multiple_of(cols));
        let tokens = xs.len() / cols;
        assert!(ys.len() == tokens * n);
        let rb = w.row_bytes();
        let mut rows = vec![0f32; n * cols];
        for i in 0..n {
            dequantize(
                w.ty,
                &w.bytes[(first + i) * rb..(first + i + 1) * rb],
                &mut rows[i * cols..(i + 1) * cols],
            );
        }
        let (rp, xp) = (rows.as_ptr(), xs.as_ptr());
        let mut t = 0;
        while t < tokens {
            let tt = (tokens - t).min(2);
            let t1 = if tt == 2 { t + 1 } else { t };
            let mut r = 0;
            while r < n {
                let rr = (n - r).min(4);
                let ri = [
                    r,
                    (r + 1).min(n - 1),
                    (r + 2).min(n - 1),
                    (r + 3).min(n - 1),
                ];
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < cols {
                    // SAFETY: row indices < n, token indices < tokens, c + 8 <= cols: every
                    // 8-float load lies inside `rows` or `xs`.
                    unsafe {
                        let x0 = _mm256_loadu_ps(xp.add(t * cols + c));
                        let x1 = _mm256_loadu_ps(xp.add(t1 * cols + c));
                        for k in 0..4 {
                            let wv = _mm256_loadu_ps(rp.add(ri[k] * cols + c));
                            acc[k] = _mm256_fmadd_ps(wv, x0, acc[k]);
                            acc[4 + k] = _mm256_fmadd_ps(wv, x1, acc[4 + k]);
                        }
                    }
                    c += 8;
                }
                for k in 0..rr {
                    ys[t * n + r + k] = hsum(acc[k]);
                    if tt == 2 {
                        ys[(t + 1) * n + r + k] = hsum(acc[4 + k]);
                    }
                }
                r += rr;
            }
            t += tt;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every kernel level against a scalar f64 product of the decoded rows.
    use super::*;
    use crate::gguf::quant::quantize;

    fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (RawMatrix, Vec<f32>) {
        let mut rng = cohort_protocol::rng::SplitMix64::new(seed);
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect();
        let mut bytes = Vec::new();
        quantize(ty, &values, &mut bytes);
        let m = RawMatrix {
            ty,
            rows,
            cols,
            bytes,
        };
        let decoded = m.to_f32();
        (m, decoded)
    }

    fn reference(decoded: &[f32], cols: usize, xs: &[f32]) -> Vec<f64> {
        let rows = decoded.len() / cols;
        let tokens = xs.len() / cols;
        let mut out = Vec::new();
        for t in 0..tokens {
            for r in 0..rows {
                out.push(
                    (0..cols)
                        .map(|c| decoded[r * cols + c] as f64 * xs[t * cols + c] as f64)
                        .sum(),
                );
            }
        }
        out
    }

    #[test]
    #[allow(unsafe_code)]
    fn every_level_matches_the_scalar_reference() {
        let (rows, cols, tokens) = (12, 256, 3);
        let mut rng = cohort_protocol::rng::SplitMix64::new(99);
        let xs: Vec<f32> = (0..tokens * cols)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect();
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::F16,
            GgmlType::F32,
            GgmlType::Q4K,
            GgmlType::Q6K,
        ] {
            let (m, decoded) = matrix(ty, rows, cols, 5);
            let want = reference(&decoded, cols, &xs);
            let x0 = &xs[..cols];
            let xsum = block_sums(x0);
            let check = |name: &str, got: &[f32], want: &[f64]| {
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-3 * (1.0 + w.abs()),
                        "{ty} {name}: {g} vs {w}"
                    );
                }
            };
            let mut y = vec![0f32; rows];
            matvec_rows(&m, 0, x0, &xsum, &mut y);
            check("baseline matvec", &y, &want[..rows]);
            let mut ys = vec![0f32; rows * tokens];
            matmul_rows(&m, 0, rows, &xs, &mut ys);
            let by_token: Vec<f32> = ys.clone();
            check("baseline matmul", &by_token, &want);
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
                {
                    let mut y = vec![0f32; rows];
                    // SAFETY: the CPU has the features (checked above).
                    if avx2::supports(ty) {
                        unsafe { avx2::matvec_rows(&m, 0, x0, &xsum, &mut y) };
                        check("avx2 matvec", &y, &want[..rows]);
                    }
                    let mut ys = vec![0f32; rows * tokens];
                    unsafe { avx2::matmul_rows(&m, 0, rows, &xs, &mut ys) };
                    check("avx2 matmul", &ys, &want);
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    let mut y = vec![0f32; rows];
                    // SAFETY: the CPU has the features (checked above).
                    if avx512::supports(ty) {
                        unsafe { avx512::matvec_rows(&m, 0, x0, &xsum, &mut y) };
                        check("avx512 matvec", &y, &want[..rows]);
                    }
                    let mut ys = vec![0f32; rows * tokens];
                    unsafe { avx512::matmul_rows(&m, 0, rows, &xs, &mut ys) };
                    check("avx512 matmul", &ys, &want);
                }
            }
        }
    }

    #[test]
    fn a_batched_product_equals_one_product_per_vector_bit_for_bit() {
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::F16,
            GgmlType::Q6K,
        ] {
            // 256 columns for the K types' blocks; 37 rows: two full chunks and a tail of 5.
            let (rows, cols) = (37, if matches!(ty, GgmlType::Q6K) { 256 } else { 96 });
            let (m, _) = matrix(ty, rows, cols, 8);
            for n in 1..=7 {
                let mut rng = cohort_protocol::rng::SplitMix64::new(n as u64);
                let xs: Vec<f32> = (0..n * cols)
                    .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                    .collect();
                let mut got = vec![0f32; n * rows];
                matvec_batch(&m, &xs, &mut got);
                for (t, g) in got.chunks_exact(rows).enumerate() {
                    let mut want = vec![0f32; rows];
                    matvec(&m, &xs[t * cols..(t + 1) * cols], &mut want);
                    let same = want.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{ty}, {n} vectors, vector {t}: {g:?} vs {want:?}");
                }
            }
        }
    }
}
