//! Merging LoRA updates from many volunteers into one, exactly.
//!
//! Each update `i` is a low-rank product `B_i·A_i` (`B_i` `[d, r]`, `A_i` `[r, n]`, the LoRA
//! scaling folded in by the caller) with a weight `p_i` (tokens trained, or given). The merged
//! delta `ΔW = Σ p_i B_i A_i` has rank at most `k·r`. Three methods, and a baseline:
//!
//! - [`exact`] with `rank = None`: `ΔW` kept at rank `k·r`, exactly (up to f64 rounding).
//! - [`exact`] with `rank = Some(t)`: the best rank-`t` approximation of `ΔW` (Eckart–Young),
//!   computed without ever forming the `d x n` matrix: stack `B' = [p_1 B_1 | ... | p_k B_k]`
//!   (`[d, k·r]`) and `A' = [A_1; ...; A_k]` (`[k·r, n]`), so `ΔW = B'·A'`; QR-factor `B' = Q_B R_B`
//!   and `A'ᵀ = Q_A R_A`; then `ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ` and only the small `k·r x k·r` core
//!   `R_B R_Aᵀ` is decomposed by SVD. The reported truncation error is the Frobenius norm of the
//!   dropped singular values, which is exactly `‖ΔW − B_new A_new‖_F`.
//! - [`ffa`]: FFA-LoRA, where every volunteer keeps `A` frozen at the job's seeded value: then
//!   `Σ p_i B_i A = (Σ p_i B_i) A` and averaging the `B`s is exact by construction.
//! - [`naive`]: averaging `A`s and `B`s separately, only as a baseline; its error is
//!   `Σ p_i B_i A_i − B̄ Ā = Σ p_i (B_i − B̄)(A_i − Ā)` (with `Σ p_i = 1`).
//!
//! All arithmetic is f64 on row-major `Vec`s; the factors are small (`k·r` is at most a few
//! hundred), the `d`- and `n`-sized products are the cost.
//!
//! Robust aggregation compares deltas, never raw factors (`B·A = (B R⁻¹)(R A)` for any invertible
//! `r x r` `R`): [`delta_norm_sq`], [`delta_inner`] and [`delta_dist_sq`] work on `r x r` Gram
//! matrices (`O((d + n)·r²)`, never a `d x n` matrix), and [`multi_krum_scores`] builds on them.

/// A low-rank product `B·A`: `b` `[d, r]`, `a` `[r, n]`, both row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    pub d: usize,
    pub n: usize,
    pub r: usize,
    pub b: Vec<f64>,
    pub a: Vec<f64>,
}

impl LowRank {
    /// Checks the buffer sizes.
    pub fn new(
        d: usize,
        n: usize,
        r: usize,
        b: Vec<f64>,
        a: Vec<f64>,
    ) -> Result<LowRank, MergeError> {
        if b.len() != d * r || a.len() != r * n {
            return Err(MergeError::Shape(format!(
                "B has {} values for [{d}, {r}], A {} for [{r}, {n}]",
                b.len(),
                a.len()
            )));
        }
        Ok(LowRank { d, n, r, b, a })
    }

    /// The dense `[d, n]` product (for tests and for small matrices).
    pub fn dense(&self) -> Vec<f64> {
        matmul(&self.b, &self.a, self.d, self.r, self.n)
    }
}

/// What a merge reports besides the result.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// Rank of the result.
    pub rank: usize,
    /// Singular values of the exact merged delta, largest first.
    pub singular_values: Vec<f64>,
    /// `‖ΔW − B_new A_new‖_F`: zero for a full-rank merge, the dropped singular values' norm
    /// for a truncated one.
    pub truncation_error: f64,
    /// `truncation_error / ‖ΔW‖_F`.
    pub relative_error: f64,
}

/// Bad inputs to a merge.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    #[error("nothing to merge")]
    Empty,
    #[error("bad shape: {0}")]
    Shape(String),
    #[error("weights must be finite and not all zero")]
    BadWeights,
    #[error("FFA needs every update to share A; update {0} has another A")]
    DifferentA(usize),
    /// Multi-Krum needs `m ≥ f + 3` updates to score with `m − f − 2` neighbours.
    #[error("Multi-Krum with {f} faulty updates needs at least {} updates, got {m}", f + 3)]
    TooFewForKrum {
        /// Updates given.
        m: usize,
        /// Faulty updates tolerated.
        f: usize,
    },
}

fn check(parts: &[(f64, &LowRank)]) -> Result<(usize, usize), MergeError> {
    let (_, first) = parts.first().ok_or(MergeError::Empty)?;
    let (d, n) = (first.d, first.n);
    for (i, (w, p)) in parts.iter().enumerate() {
        if (p.d, p.n) != (d, n) {
            return Err(MergeError::Shape(format!(
                "update {i} is [{}, {}], update 0 [{d}, {n}]",
                p.d, p.n
            )));
        }
        if !w.is_finite() {
            return Err(MergeError::BadWeights);
        }
    }
    if parts.iter().all(|(w, _)| *w == 0.0) {
        return Err(MergeError::BadWeights);
    }
    Ok((d, n))
}

/// The exact weighted merge, at full rank `k·r` (`rank = None`) or truncated to `rank`.
pub fn exact(
    parts: &[(f64, &LowRank)],
    rank: Option<usize>,
) -> Result<(LowRank, MergeReport), MergeError> {
    let (d, n) = check(parts)?;
    let kr: usize = parts.iter().map(|(_, p)| p.r).sum();
    // B' = [p_i B_i] as columns, A' = [A_i] as rows.
    let mut bs = vec![0f64; d * kr];
    let mut at = vec![0f64; n * kr]; // A'ᵀ, [n, kr]
    let mut col = 0;
    for (w, p) in parts {
        for i in 0..d {
            for j in 0..p.r {
                bs[i * kr + col + j] = w * p.b[i * p.r + j];
            }
        }
        for j in 0..p.r {
            for c in 0..n {
                at[c * kr + col + j] = p.a[j * n + c];
            }
        }
        col += p.r;
    }
    let (qb, rb, k1) = householder_qr(&bs, d, kr);
    let (qa, ra, k2) = householder_qr(&at, n, kr);
    // Core C = R_B R_Aᵀ, [k1, k2].
    let mut core = vec![0f64; k1 * k2];
    for i in 0..k1 {
        for j in 0..k2 {
            core[i * k2 + j] = (0..kr).map(|t| rb[i * kr + t] * ra[j * kr + t]).sum();
        }
    }
    let (u, s, v) = svd(&core, k1, k2);
    let m = s.len();
    let keep = rank.unwrap_or(kr).min(m);
    let total: f64 = s.iter().map(|x| x * x).sum::<f64>();
    let dropped: f64 = s[keep..].iter().map(|x| x * x).sum::<f64>();
    // B_new = Q_B U_t S_t^½ [d, t]; A_new = S_t^½ V_tᵀ Q_Aᵀ [t, n].
    let mut b = vec![0f64; d * keep];
    let mut a = vec![0f64; keep * n];
    for t in 0..keep {
        let root = s[t].sqrt();
        for i in 0..d {
            b[i * keep + t] = root * (0..k1).map(|c| qb[i * k1 + c] * u[c * m + t]).sum::<f64>();
        }
        for c in 0..n {
            a[t * n + c] = root * (0..k2).map(|j| v[j * m + t] * qa[c * k2 + j]).sum::<f64>();
        }
    }
    let report = MergeReport {
        rank: keep,
        singular_values: s.clone(),
        truncation_error: dropped.sqrt(),
        relative_error: if total > 0.0 {
            (dropped / total).sqrt()
        } else {
            0.0
        },
    };
    Ok((
        LowRank {
            d,
            n,
            r: keep,
            b,
            a,
        },
        report,
    ))
}

/// FFA merge: every update shares `A`; the result is `(Σ p_i B_i)·A`, with the weights used as
/// given (normalise them first for an average).
pub fn ffa(parts: &[(f64, &LowRank)]) -> Result<LowRank, MergeError> {
    let (d, n) = check(parts)?;
    let first = parts[0].1;
    for (i, (_, p)) in parts.iter().enumerate() {
        if p.r != first.r || p.a != first.a {
            return Err(MergeError::DifferentA(i));
        }
    }
    let mut b = vec![0f64; d * first.r];
    for (w, p) in parts {
        for (x, y) in b.iter_mut().zip(&p.b) {
            *x += w * y;
        }
    }
    Ok(LowRank {
        d,
        n,
        r: first.r,
        b,
        a: first.a.clone(),
    })
}

/// The naive baseline: `B̄ = Σ p_i B_i`, `Ā = Σ p_i A_i` (weights normalised to sum 1 first).
pub fn naive(parts: &[(f64, &LowRank)]) -> Result<LowRank, MergeError> {
    let (d, n) = check(parts)?;
    let r = parts[0].1.r;
    if parts.iter().any(|(_, p)| p.r != r) {
        return Err(MergeError::Shape(
            "naive averaging needs equal ranks".into(),
        ));
    }
    let total: f64 = parts.iter().map(|(w, _)| w).sum();
    if total == 0.0 {
        return Err(MergeError::BadWeights);
    }
    let (mut b, mut a) = (vec![0f64; d * r], vec![0f64; r * n]);
    for (w, p) in parts {
        let w = w / total;
        b.iter_mut().zip(&p.b).for_each(|(x, y)| *x += w * y);
        a.iter_mut().zip(&p.a).for_each(|(x, y)| *x += w * y);
    }
    Ok(LowRank { d, n, r, b, a })
}

/// `⟨B₁A₁, B₂A₂⟩_F = tr(A₁ᵀB₁ᵀB₂A₂) = Σ_ij (B₁ᵀB₂)_ij (A₁A₂ᵀ)_ij`, from the `r₁ x r₂`
/// cross-Gram matrices of the factors: `O((d + n)·r₁·r₂)`. The ranks may differ.
pub fn delta_inner(x: &LowRank, y: &LowRank) -> Result<f64, MergeError> {
    if (x.d, x.n) != (y.d, y.n) {
        return Err(MergeError::Shape(format!(
            "deltas [{}, {}] and [{}, {}]",
            x.d, x.n, y.d, y.n
        )));
    }
    Ok(inner(x, y))
}

/// [`delta_inner`] for factors of one shape.
fn inner(x: &LowRank, y: &LowRank) -> f64 {
    let (r1, r2) = (x.r, y.r);
    // G_B = B₁ᵀB₂ [r1, r2]: rows of B are length r.
    let mut gb = vec![0f64; r1 * r2];
    for (row1, row2) in x.b.chunks_exact(r1.max(1)).zip(y.b.chunks_exact(r2.max(1))) {
        for (i, u) in row1.iter().enumerate() {
            for (j, v) in row2.iter().enumerate() {
                gb[i * r2 + j] += u * v;
            }
        }
    }
    // G_A = A₁A₂ᵀ [r1, r2]: rows of A are length n.
    let mut total = 0f64;
    for (i, a1) in x.a.chunks_exact(x.n.max(1)).take(r1).enumerate() {
        for (j, a2) in y.a.chunks_exact(y.n.max(1)).take(r2).enumerate() {
            let ga: f64 = a1.iter().zip(a2).map(|(u, v)| u * v).sum();
            total += gb[i * r2 + j] * ga;
        }
    }
    total
}

/// Rounding can take a squared norm a hair below zero; NaN stays NaN (`f64::max` would hide it).
fn non_negative(v: f64) -> f64 {
    if v < 0.0 { 0.0 } else { v }
}

/// `‖B·A‖²_F = tr((BᵀB)(AAᵀ))`, from the two `r x r` Gram matrices (`O((d + n)·r²)`). The same
/// for every factorisation of one delta: `(B R⁻¹, R A)` gives the same value.
pub fn delta_norm_sq(x: &LowRank) -> f64 {
    non_negative(inner(x, x))
}

/// `‖B₁A₁ − B₂A₂‖²_F = ‖B₁A₁‖² + ‖B₂A₂‖² − 2⟨B₁A₁, B₂A₂⟩`, from Gram and cross-Gram matrices
/// ([`delta_inner`]); never forms a `d x n` matrix.
///
/// The expansion subtracts: for two nearly equal deltas the absolute error is about
/// `1e-16·(‖B₁A₁‖² + ‖B₂A₂‖²)`, so a distance far below that is noise (the result is clamped at
/// zero). Distances between independently trained updates are many orders above it. Non-finite
/// factors give NaN (reject them before, as round validation does).
pub fn delta_dist_sq(x: &LowRank, y: &LowRank) -> Result<f64, MergeError> {
    let cross = delta_inner(x, y)?;
    Ok(non_negative(
        delta_norm_sq(x) + delta_norm_sq(y) - 2.0 * cross,
    ))
}

/// Multi-Krum's scores (Blanchard et al., 2017) of `m` updates with up to `f` Byzantine ones:
/// each update's score is the sum of its `m − f − 2` smallest squared distances
/// ([`delta_dist_sq`]) to the other updates. Lower is more central; Multi-Krum keeps the updates
/// with the lowest scores. Needs `m ≥ f + 3`; the pairwise distances cost `m(m−1)/2` cross-Grams.
pub fn multi_krum_scores(updates: &[&LowRank], f: usize) -> Result<Vec<f64>, MergeError> {
    let m = updates.len();
    if m < f + 3 {
        return Err(MergeError::TooFewForKrum { m, f });
    }
    let norms: Vec<f64> = updates.iter().map(|u| delta_norm_sq(u)).collect();
    let mut dist = vec![0f64; m * m];
    for i in 0..m {
        for j in i + 1..m {
            let cross = delta_inner(updates[i], updates[j])?;
            let d = non_negative(norms[i] + norms[j] - 2.0 * cross);
            dist[i * m + j] = d;
            dist[j * m + i] = d;
        }
    }
    // The scoring is the coordinator's own (`m ≥ f + 3` was checked above).
    cohort_protocol::rounds::multi_krum_scores(&dist, m, f)
        .ok_or(MergeError::TooFewForKrum { m, f })
}

/// `[m, k]·[k, n]`, row-major.
pub fn matmul(x: &[f64], y: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for t in 0..k {
            let xv = x[i * k + t];
            if xv != 0.0 {
                for j in 0..n {
                    out[i * n + j] += xv * y[t * n + j];
                }
            }
        }
    }
    out
}

/// Thin Householder QR of `x` `[m, c]`: `Q` `[m, k]`, `R` `[k, c]` with `k = min(m, c)`.
fn householder_qr(x: &[f64], m: usize, c: usize) -> (Vec<f64>, Vec<f64>, usize) {
    let k = m.min(c);
    let mut r = x.to_vec();
    let mut vs: Vec<Vec<f64>> = Vec::with_capacity(k);
    for j in 0..k {
        let norm: f64 = (j..m)
            .map(|i| r[i * c + j] * r[i * c + j])
            .sum::<f64>()
            .sqrt();
        let mut v: Vec<f64> = (j..m).map(|i| r[i * c + j]).collect();
        if norm == 0.0 {
            vs.push(vec![0.0; m - j]);
            continue;
        }
        let alpha = if v[0] > 0.0 { -norm } else { norm };
        v[0] -= alpha;
        let vn: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if vn > 0.0 {
            v.iter_mut().for_each(|x| *x /= vn);
            for col in j..c {
                let dot: f64 = (j..m).map(|i| v[i - j] * r[i * c + col]).sum();
                for i in j..m {
                    r[i * c + col] -= 2.0 * v[i - j] * dot;
                }
            }
        }
        vs.push(v);
    }
    // Q = H_0 H_1 ... H_{k-1} applied to the first k columns of the identity.
    let mut q = vec![0f64; m * k];
    for i in 0..k {
        q[i * k + i] = 1.0;
    }
    for j in (0..k).rev() {
        let v = &vs[j];
        for col in 0..k {
            let dot: f64 = (j..m).map(|i| v[i - j] * q[i * k + col]).sum();
            if dot != 0.0 {
                for i in j..m {
                    q[i * k + col] -= 2.0 * v[i - j] * dot;
                }
            }
        }
    }
    let mut rr = vec![0f64; k * c];
    for i in 0..k {
        for col in i..c {
            rr[i * c + col] = r[i * c + col];
        }
    }
    (q, rr, k)
}

/// SVD of `x` `[m, n]` by one-sided Jacobi rotations: `U` `[m, p]`, `S` `[p]` (descending),
/// `V` `[n, p]`, `p = min(m, n)`, with `x = U diag(S) Vᵀ`.
fn svd(x: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    if m < n {
        // x = U S Vᵀ  <=>  xᵀ = V S Uᵀ.
        let mut xt = vec![0f64; n * m];
        for i in 0..m {
            for j in 0..n {
                xt[j * m + i] = x[i * n + j];
            }
        }
        let (u, s, v) = svd(&xt, n, m);
        return (v, s, u);
    }
    let mut w = x.to_vec(); // [m, n], columns rotated until orthogonal
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
                for i in 0..m {
                    let (a, b) = (w[i * n + p], w[i * n + q]);
                    alpha += a * a;
                    beta += b * b;
                    gamma += a * b;
                }
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..m {
                    let (a, b) = (w[i * n + p], w[i * n + q]);
                    w[i * n + p] = c * a - s * b;
                    w[i * n + q] = s * a + c * b;
                }
                for i in 0..n {
                    let (a, b) = (v[i * n + p], v[i * n + q]);
                    v[i * n + p] = c * a - s * b;
                    v[i * n + q] = s * a + c * b;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = (0..n)
        .map(|j| {
            (0..m)
                .map(|i| w[i * n + j] * w[i * n + j])
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| norms[*b].total_cmp(&norms[*a]));
    let p = n;
    let mut u = vec![0f64; m * p];
    let mut vv = vec![0f64; n * p];
    let mut s = vec![0f64; p];
    for (k, &j) in order.iter().enumerate() {
        s[k] = norms[j];
        for i in 0..m {
            u[i * p + k] = if norms[j] > 0.0 {
                w[i * n + j] / norms[j]
            } else {
                0.0
            };
        }
        for i in 0..n {
            vv[i * p + k] = v[i * n + j];
        }
    }
    (u, s, vv)
}
