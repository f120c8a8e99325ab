//! Adapter merging against dense arithmetic written in the test: the exact merge reproduces the
//! weighted sum of products, the truncated one loses exactly its dropped singular values and is
//! no worse than other rank-t candidates, FFA is exact with a shared A, and the naive baseline's
//! error is the covariance term; Gram-matrix norms, distances and Multi-Krum scores equal the
//! dense ones and do not depend on how a delta is factored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_protocol::rng::SplitMix64;
use cohort_trainer::merge::{
    LowRank, MergeError, delta_dist_sq, delta_inner, delta_norm_sq, exact, ffa, matmul,
    multi_krum_scores, naive,
};

fn random(rng: &mut SplitMix64, n: usize) -> Vec<f64> {
    (0..n).map(|_| 2.0 * rng.next_f64() - 1.0).collect()
}

fn update(rng: &mut SplitMix64, d: usize, n: usize, r: usize) -> LowRank {
    LowRank::new(d, n, r, random(rng, d * r), random(rng, r * n)).unwrap()
}

/// Σ p_i B_i A_i, dense, the obvious way.
fn weighted_dense(parts: &[(f64, &LowRank)]) -> Vec<f64> {
    let (d, n) = (parts[0].1.d, parts[0].1.n);
    let mut out = vec![0f64; d * n];
    for (w, p) in parts {
        for i in 0..d {
            for j in 0..n {
                let mut s = 0.0;
                for t in 0..p.r {
                    s += p.b[i * p.r + t] * p.a[t * n + j];
                }
                out[i * n + j] += w * s;
            }
        }
    }
    out
}

fn frob(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn diff(x: &[f64], y: &[f64]) -> f64 {
    frob(&x.iter().zip(y).map(|(a, b)| a - b).collect::<Vec<_>>())
}

#[test]
fn the_full_rank_merge_reproduces_the_weighted_delta() {
    let mut rng = SplitMix64::new(1);
    let ups: Vec<LowRank> = (0..4).map(|_| update(&mut rng, 48, 40, 4)).collect();
    let weights = [0.1, 0.4, 0.3, 0.2];
    let parts: Vec<(f64, &LowRank)> = weights.iter().copied().zip(ups.iter()).collect();
    let want = weighted_dense(&parts);
    let (merged, report) = exact(&parts, None).unwrap();
    assert_eq!(merged.r, 16);
    let rel = diff(&merged.dense(), &want) / frob(&want);
    assert!(rel < 1e-10, "relative Frobenius error {rel:e}");
    assert!(report.truncation_error < 1e-9 * frob(&want));
    // The singular values' squares add up to ‖ΔW‖²_F.
    let ss: f64 = report.singular_values.iter().map(|s| s * s).sum();
    assert!((ss.sqrt() - frob(&want)).abs() < 1e-9 * frob(&want));
}

#[test]
fn truncation_loses_exactly_the_dropped_singular_values_and_beats_other_candidates() {
    let mut rng = SplitMix64::new(2);
    let ups: Vec<LowRank> = (0..3).map(|_| update(&mut rng, 36, 30, 4)).collect();
    let parts: Vec<(f64, &LowRank)> = ups.iter().map(|u| (1.0 / 3.0, u)).collect();
    let want = weighted_dense(&parts);
    for t in [1, 4, 8, 11] {
        let (merged, report) = exact(&parts, Some(t)).unwrap();
        assert_eq!(merged.r, t);
        let actual = diff(&merged.dense(), &want);
        let tail: f64 = report.singular_values[t..]
            .iter()
            .map(|s| s * s)
            .sum::<f64>()
            .sqrt();
        assert!(
            (actual - report.truncation_error).abs() < 1e-9 * frob(&want),
            "rank {t}: residual {actual} vs reported {}",
            report.truncation_error
        );
        assert!((tail - report.truncation_error).abs() < 1e-12 * frob(&want));
        // Eckart–Young: no other rank-t candidate does better, e.g. the best single update
        // scaled, or the naive average (rank 4 here).
        let naive_err = diff(&naive(&parts).unwrap().dense(), &want);
        if t >= 4 {
            assert!(
                actual <= naive_err + 1e-12,
                "rank {t}: exact {actual} vs naive {naive_err}"
            );
        }
    }
}

#[test]
fn ffa_is_exact_when_a_is_shared_and_refuses_otherwise() {
    let mut rng = SplitMix64::new(3);
    let a = random(&mut rng, 4 * 30);
    let ups: Vec<LowRank> = (0..5)
        .map(|_| LowRank::new(20, 30, 4, random(&mut rng, 80), a.clone()).unwrap())
        .collect();
    let parts: Vec<(f64, &LowRank)> = ups
        .iter()
        .enumerate()
        .map(|(i, u)| ((i + 1) as f64 / 15.0, u))
        .collect();
    let merged = ffa(&parts).unwrap();
    let want = weighted_dense(&parts);
    assert!(diff(&merged.dense(), &want) < 1e-12 * frob(&want));
    let other = update(&mut rng, 20, 30, 4);
    let mut bad = parts.clone();
    bad.push((0.1, &other));
    assert!(ffa(&bad).is_err());
}

#[test]
fn the_naive_baselines_error_is_the_covariance_term() {
    let mut rng = SplitMix64::new(4);
    let ups: Vec<LowRank> = (0..3).map(|_| update(&mut rng, 24, 20, 4)).collect();
    let weights = [0.5, 0.3, 0.2];
    let parts: Vec<(f64, &LowRank)> = weights.iter().copied().zip(ups.iter()).collect();
    let merged = naive(&parts).unwrap();
    let want = weighted_dense(&parts);
    let err: Vec<f64> = want
        .iter()
        .zip(merged.dense())
        .map(|(a, b)| a - b)
        .collect();
    // Σ p_i (B_i − B̄)(A_i − Ā), computed from the definition.
    let centred: Vec<LowRank> = ups
        .iter()
        .map(|u| {
            LowRank::new(
                u.d,
                u.n,
                u.r,
                u.b.iter().zip(&merged.b).map(|(x, m)| x - m).collect(),
                u.a.iter().zip(&merged.a).map(|(x, m)| x - m).collect(),
            )
            .unwrap()
        })
        .collect();
    let cov = weighted_dense(
        &weights
            .iter()
            .copied()
            .zip(centred.iter())
            .collect::<Vec<_>>(),
    );
    assert!(diff(&err, &cov) < 1e-12 * frob(&want));
    let rel = frob(&err) / frob(&want);
    eprintln!("naive averaging of 3 random rank-4 updates: relative error {rel:.3}");
    assert!(rel > 0.1, "random updates should not average well");
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

#[test]
fn gram_norms_inner_products_and_distances_match_dense_ones() {
    let mut rng = SplitMix64::new(5);
    let ups = [
        update(&mut rng, 37, 29, 4),
        update(&mut rng, 37, 29, 1),
        update(&mut rng, 37, 29, 7),
    ];
    for x in &ups {
        let dx = x.dense();
        let want = dot(&dx, &dx);
        assert!(
            (delta_norm_sq(x) - want).abs() < 1e-12 * want,
            "rank {}",
            x.r
        );
        for y in &ups {
            let dy = y.dense();
            let inner = delta_inner(x, y).unwrap();
            assert!((inner - dot(&dx, &dy)).abs() < 1e-12 * want.max(dot(&dy, &dy)));
            let dist = delta_dist_sq(x, y).unwrap();
            let want_dist = diff(&dx, &dy).powi(2);
            let scale = want + dot(&dy, &dy);
            assert!(
                (dist - want_dist).abs() < 1e-12 * scale,
                "ranks {} and {}: {dist} vs {want_dist}",
                x.r,
                y.r
            );
        }
    }
    let other = update(&mut rng, 37, 30, 4);
    assert!(matches!(
        delta_dist_sq(&ups[0], &other),
        Err(MergeError::Shape(_))
    ));
}

/// The inverse of the `r x r` matrix `m` by Gauss–Jordan elimination with partial pivoting.
fn inverse(m: &[f64], r: usize) -> Vec<f64> {
    let mut a = m.to_vec();
    let mut inv = vec![0f64; r * r];
    for i in 0..r {
        inv[i * r + i] = 1.0;
    }
    for c in 0..r {
        let p = (c..r)
            .max_by(|x, y| a[x * r + c].abs().total_cmp(&a[y * r + c].abs()))
            .unwrap();
        for k in 0..r {
            a.swap(c * r + k, p * r + k);
            inv.swap(c * r + k, p * r + k);
        }
        let pivot = a[c * r + c];
        for k in 0..r {
            a[c * r + k] /= pivot;
            inv[c * r + k] /= pivot;
        }
        for i in 0..r {
            if i != c {
                let f = a[i * r + c];
                for k in 0..r {
                    a[i * r + k] -= f * a[c * r + k];
                    inv[i * r + k] -= f * inv[c * r + k];
                }
            }
        }
    }
    inv
}

#[test]
fn the_delta_norm_does_not_depend_on_the_factorisation() {
    let mut rng = SplitMix64::new(6);
    let (d, n, r) = (41, 33, 5);
    let x = update(&mut rng, d, n, r);
    // A well-conditioned but far from orthogonal R: random plus 2·I.
    let mut rm = random(&mut rng, r * r);
    for i in 0..r {
        rm[i * r + i] += 2.0;
    }
    let ri = inverse(&rm, r);
    let eye = matmul(&rm, &ri, r, r, r);
    for i in 0..r {
        for j in 0..r {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((eye[i * r + j] - want).abs() < 1e-12);
        }
    }
    // B → B R⁻¹, A → R A.
    let y = LowRank::new(
        d,
        n,
        r,
        matmul(&x.b, &ri, d, r, r),
        matmul(&rm, &x.a, r, r, n),
    )
    .unwrap();
    let norm = delta_norm_sq(&x);
    assert!((delta_norm_sq(&y) - norm).abs() < 1e-12 * norm);
    assert!(
        delta_dist_sq(&x, &y).unwrap() < 1e-12 * norm,
        "the same delta"
    );
    // The raw factors, though, are far apart: comparing them would call one delta two.
    assert!(diff(&x.a, &y.a) > 0.1 * frob(&x.a));
    assert!(diff(&x.b, &y.b) > 0.1 * frob(&x.b));
}

#[test]
fn multi_krum_scores_match_dense_ones_and_single_out_the_outliers() {
    let mut rng = SplitMix64::new(7);
    let (d, n, r) = (30, 26, 3);
    let base = update(&mut rng, d, n, r);
    // Five honest updates: the shared delta, each factored its own way (B R⁻¹, R A with a
    // diagonal R), plus a small update of its own appended as more rank.
    let mut ups: Vec<LowRank> = (0..5)
        .map(|k| {
            let s = 1.0 + k as f64;
            let own = update(&mut rng, d, n, 1);
            let mut b = Vec::new();
            for i in 0..d {
                b.extend(base.b[i * r..(i + 1) * r].iter().map(|v| v / s));
                b.push(0.05 * own.b[i]);
            }
            let mut a: Vec<f64> = base.a.iter().map(|v| v * s).collect();
            a.extend_from_slice(&own.a);
            LowRank::new(d, n, r + 1, b, a).unwrap()
        })
        .collect();
    // Two Byzantine ones: an unrelated delta and the shared one scaled up.
    ups.push(update(&mut rng, d, n, r));
    ups.push(
        LowRank::new(
            d,
            n,
            r,
            base.b.iter().map(|v| 4.0 * v).collect(),
            base.a.clone(),
        )
        .unwrap(),
    );
    let refs: Vec<&LowRank> = ups.iter().collect();
    let f = 2;
    let scores = multi_krum_scores(&refs, f).unwrap();
    let dense: Vec<Vec<f64>> = ups.iter().map(LowRank::dense).collect();
    let m = ups.len();
    for i in 0..m {
        let mut ds: Vec<f64> = (0..m)
            .filter(|j| *j != i)
            .map(|j| diff(&dense[i], &dense[j]).powi(2))
            .collect();
        ds.sort_by(f64::total_cmp);
        let want: f64 = ds[..m - f - 2].iter().sum();
        assert!(
            (scores[i] - want).abs() < 1e-10 * want.max(1.0),
            "update {i}: {} vs {want}",
            scores[i]
        );
    }
    let honest_worst = scores[..5].iter().copied().fold(0.0, f64::max);
    assert!(
        scores[5] > 10.0 * honest_worst && scores[6] > 10.0 * honest_worst,
        "{scores:?}"
    );
    assert!(matches!(
        multi_krum_scores(&refs[..4], 2),
        Err(MergeError::TooFewForKrum { m: 4, f: 2 })
    ));
}
