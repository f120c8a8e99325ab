//! GGML tensor types: block layouts, dequantization and (for tests and export) quantization.
//!
//! Layouts follow the GGUF specification and ggml's `ggml-common.h`. Every quantized type stores
//! blocks of consecutive elements along a row (the tensor's first, contiguous dimension):
//!
//! | type | elements | bytes | layout | value |
//! |---|---|---|---|---|
//! | Q4_0 | 32 | 18 | f16 d, 16 bytes of nibbles | d·(q − 8) |
//! | Q4_1 | 32 | 20 | f16 d, f16 m, 16 bytes of nibbles | d·q + m |
//! | Q8_0 | 32 | 34 | f16 d, 32 × i8 | d·q |
//! | Q4_K | 256 | 144 | f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles | d·sc·q − dmin·m |
//! | Q6_K | 256 | 210 | 128 bytes low nibbles, 64 bytes high 2 bits, 16 × i8 scales, f16 d | d·sc·(q − 32) |
//!
//! In Q4_0 / Q4_1 the low nibble of byte j is element j and the high nibble element j + 16.

use half::{bf16, f16};

/// A tensor element type of a GGUF file (ggml's `ggml_type` numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
    BF16,
}

impl GgmlType {
    /// All supported types.
    pub const ALL: [GgmlType; 8] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];

    /// The type with ggml's numeric id, if Cohort supports it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes that `elems` elements take, or `None` if `elems` is not a whole number of blocks.
    pub fn bytes_for(self, elems: u64) -> Option<u64> {
        let per = self.block_elems() as u64;
        if !elems.is_multiple_of(per) {
            return None;
        }
        (elems / per).checked_mul(self.block_bytes() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes `src` (whole blocks of type `ty`) into `dst`; `dst.len()` elements are produced
/// and `src` must hold exactly that many elements' bytes.
///
/// # Panics
///
/// If the lengths disagree; callers check shapes first (the reader does, naming the tensor).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        Some(src.len() as u64),
        ty.bytes_for(dst.len() as u64),
        "dequantize {ty}: {} bytes for {} elements",
        src.len(),
        dst.len()
    );
    let bb = ty.block_bytes();
    let be = ty.block_elems();
    match ty {
        GgmlType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (y, b) in dst.chunks_exact_mut(be).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    let q = b[2 + j];
                    y[j] = d * ((q & 0x0f) as i32 - 8) as f32;
                    y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (y, b) in dst.chunks_exact_mut(be).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for j in 0..16 {
                    let q = b[4 + j];
                    y[j] = d * (q & 0x0f) as f32 + m;
                    y[j + 16] = d * (q >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (y, b) in dst.chunks_exact_mut(be).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    y[j] = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        GgmlType::Q4K => {
            for (y, b) in dst.chunks_exact_mut(be).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for j in 0..4 {
                    let (sc1, m1) = k4_scale_min(2 * j, scales);
                    let (sc2, m2) = k4_scale_min(2 * j + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * j..32 * j + 32];
                    let y = &mut y[64 * j..64 * j + 64];
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                        y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (y, b) in dst.chunks_exact_mut(be).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let y = &mut y[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block's 12 scale bytes.
pub(crate) fn k4_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Quantizes `src` (a whole number of blocks) into type `ty`, appending to `out`.
///
/// Round-to-nearest with the block's absolute maximum (or range) as scale: simple and exact about
/// the format, not llama.cpp's error-minimising search. Used to write test models and merged
/// models; a model quantized here loads anywhere GGUF loads.
pub fn quantize(ty: GgmlType, src: &[f32], out: &mut Vec<u8>) {
    let be = ty.block_elems();
    assert_eq!(src.len() % be, 0, "quantize {ty}: {} elements", src.len());
    match ty {
        GgmlType::F32 => src
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgmlType::F16 => src
            .iter()
            .for_each(|x| out.extend_from_slice(&f16::from_f32(*x).to_le_bytes())),
        GgmlType::BF16 => src
            .iter()
            .for_each(|x| out.extend_from_slice(&bf16::from_f32(*x).to_le_bytes())),
        GgmlType::Q4_0 => {
            for x in src.chunks_exact(32) {
                // ggml's choice: the element of largest magnitude maps to -8.
                let max = x
                    .iter()
                    .fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
                let d = max / -8.0;
                let dh = f16::from_f32(d);
                let id = if dh.to_f32() != 0.0 {
                    1.0 / dh.to_f32()
                } else {
                    0.0
                };
                out.extend_from_slice(&dh.to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(x[j]) | (q(x[j + 16]) << 4));
                }
            }
        }
        GgmlType::Q4_1 => {
            for x in src.chunks_exact(32) {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let dh = f16::from_f32((max - min) / 15.0);
                let mh = f16::from_f32(min);
                let id = if dh.to_f32() != 0.0 {
                    1.0 / dh.to_f32()
                } else {
                    0.0
                };
                out.extend_from_slice(&dh.to_le_bytes());
                out.extend_from_slice(&mh.to_le_bytes());
                let q = |v: f32| (((v - mh.to_f32()) * id + 0.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(x[j]) | (q(x[j + 16]) << 4));
                }
            }
        }
        GgmlType::Q8_0 => {
            for x in src.chunks_exact(32) {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let dh = f16::from_f32(amax / 127.0);
                let id = if dh.to_f32() != 0.0 {
                    1.0 / dh.to_f32()
                } else {
                    0.0
                };
                out.extend_from_slice(&dh.to_le_bytes());
                for v in x {
                    out.push(((v * id).round() as i32).clamp(-127, 127) as i8 as u8);
                }
            }
        }
        GgmlType::Q4K => {
            for x in src.chunks_exact(256) {
                // Per sub-block of 32: scale (max - min) / 15 and min, themselves quantized to 6
                // bits against the block's d and dmin.
                let mut sub_scale = [0f32; 8];
                let mut sub_min = [0f32; 8];
                for (s, c) in x.chunks_exact(32).enumerate() {
                    let min = c.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
                    let max = c.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    sub_scale[s] = (max - min) / 15.0;
                    sub_min[s] = -min;
                }
                let max_scale = sub_scale.iter().copied().fold(0f32, f32::max);
                let max_min = sub_min.iter().copied().fold(0f32, f32::max);
                let d = f16::from_f32(max_scale / 63.0);
                let dmin = f16::from_f32(max_min / 63.0);
                let (df, dminf) = (d.to_f32(), dmin.to_f32());
                let mut ls = [0u8; 8];
                let mut lm = [0u8; 8];
                for s in 0..8 {
                    ls[s] = if df > 0.0 {
                        ((sub_scale[s] / df).round() as i32).clamp(0, 63) as u8
                    } else {
                        0
                    };
                    lm[s] = if dminf > 0.0 {
                        ((sub_min[s] / dminf).round() as i32).clamp(0, 63) as u8
                    } else {
                        0
                    };
                }
                let mut scales = [0u8; 12];
                for j in 0..8 {
                    if j < 4 {
                        scales[j] = ls[j];
                        scales[j + 4] = lm[j];
                    } else {
                        scales[j + 4] = (ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4);
                        scales[j - 4] |= (ls[j] >> 4) << 6;
                        scales[j] |= (lm[j] >> 4) << 6;
                    }
                }
                out.extend_from_slice(&d.to_le_bytes());
                out.extend_from_slice(&dmin.to_le_bytes());
                out.extend_from_slice(&scales);
                let mut q = [0u8; 256];
                for s in 0..8 {
                    let sc = df * ls[s] as f32;
                    let m = dminf * lm[s] as f32;
                    for l in 0..32 {
                        let v = x[32 * s + l];
                        q[32 * s + l] = if sc > 0.0 {
                            (((v + m) / sc).round() as i32).clamp(0, 15) as u8
                        } else {
                            0
                        };
                    }
                }
                for j in 0..4 {
                    for l in 0..32 {
                        out.push(q[64 * j + l] | (q[64 * j + 32 + l] << 4));
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for x in src.chunks_exact(256) {
                let mut sub_scale = [0f32; 16];
                for (s, c) in x.chunks_exact(16).enumerate() {
                    let max = c
                        .iter()
                        .fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
                    sub_scale[s] = max / -32.0;
                }
                let amax = sub_scale
                    .iter()
                    .fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
                let d = f16::from_f32(amax / -128.0);
                let df = d.to_f32();
                let mut sc = [0i8; 16];
                for s in 0..16 {
                    sc[s] = if df != 0.0 {
                        ((sub_scale[s] / df).round() as i32).clamp(-128, 127) as i8
                    } else {
                        0
                    };
                }
                let mut q = [0u8; 256];
                for s in 0..16 {
                    let step = df * sc[s] as f32;
                    for l in 0..16 {
                        let v = x[16 * s + l];
                        q[16 * s + l] = if step != 0.0 {
                            ((v / step).round() as i32 + 32).clamp(0, 63) as u8
                        } else {
                            32
                        };
                    }
                }
                let mut ql = [0u8; 128];
                let mut qh = [0u8; 64];
                for half in 0..2 {
                    for l in 0..32 {
                        let base = 128 * half;
                        let (q1, q2, q3, q4) = (
                            q[base + l],
                            q[base + l + 32],
                            q[base + l + 64],
                            q[base + l + 96],
                        );
                        ql[64 * half + l] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
                        ql[64 * half + l + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
                        qh[32 * half + l] =
                            (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
                    }
                }
                out.extend_from_slice(&ql);
                out.extend_from_slice(&qh);
                out.extend(sc.iter().map(|s| *s as u8));
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
    }
}
