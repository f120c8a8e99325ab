//! Adapter merging against dense arithmetic written in the test: the exact merge reproduces the
//! weighted sum of products, the truncated one loses exactly its dropped singular values and is
//! no worse than other rank-t candidates, FFA is exact with a shared A, and the naive baseline's
//! error is the covariance term.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_protocol::rng::SplitMix64;
use cohort_trainer::merge::{LowRank, exact, ffa, naive};

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
