//! Small dense matrices in `f64`: just what the surrogate task needs (products, norms and a
//! singular value decomposition of matrices a few dozen wide).
//!
//! Every operation is a fixed sequence of IEEE operations, so results are bit-identical from run
//! to run; nothing here is parallel.

/// A dense row-major matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Mat {
    /// The `rows x cols` zero matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// The `n x n` identity.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.set(i, i, 1.0);
        }
        m
    }

    /// A matrix whose entry `(i, j)` is `f(i, j)`.
    pub fn from_fn(rows: usize, cols: usize, mut f: impl FnMut(usize, usize) -> f64) -> Self {
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                data.push(f(i, j));
            }
        }
        Self { rows, cols, data }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Entry `(i, j)`.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// Sets entry `(i, j)`.
    pub fn set(&mut self, i: usize, j: usize, x: f64) {
        self.data[i * self.cols + j] = x;
    }

    /// The entries, row by row.
    pub fn data(&self) -> &[f64] {
        &self.data
    }

    /// The entries, row by row, mutably.
    pub fn data_mut(&mut self) -> &mut [f64] {
        &mut self.data
    }

    /// `self · other`.
    pub fn mul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "inner dimensions");
        let mut out = Mat::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for l in 0..self.cols {
                let a = self.get(i, l);
                if a == 0.0 {
                    continue;
                }
                let row = &other.data[l * other.cols..(l + 1) * other.cols];
                let dst = &mut out.data[i * other.cols..(i + 1) * other.cols];
                for (d, b) in dst.iter_mut().zip(row) {
                    *d += a * b;
                }
            }
        }
        out
    }

    /// The transpose.
    pub fn t(&self) -> Mat {
        Mat::from_fn(self.cols, self.rows, |i, j| self.get(j, i))
    }

    /// `self += k · other`.
    pub fn add_scaled(&mut self, k: f64, other: &Mat) {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols), "shapes");
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += k * b;
        }
    }

    /// `k · self`.
    pub fn scaled(&self, k: f64) -> Mat {
        Mat {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|x| k * x).collect(),
        }
    }

    /// `self - other`.
    pub fn sub(&self, other: &Mat) -> Mat {
        let mut out = self.clone();
        out.add_scaled(-1.0, other);
        out
    }

    /// `Σ self_ij · other_ij`.
    pub fn dot(&self, other: &Mat) -> f64 {
        self.data.iter().zip(&other.data).map(|(a, b)| a * b).sum()
    }

    /// The Frobenius norm.
    pub fn frob(&self) -> f64 {
        self.dot(self).sqrt()
    }

    /// Whether every entry is finite.
    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|x| x.is_finite())
    }

    /// The entries' little-endian bytes (what a state hash covers).
    pub fn le_bytes(&self) -> Vec<u8> {
        self.data.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

/// A thin singular value decomposition `M = U · diag(s) · Vᵀ`, singular values descending.
#[derive(Clone, Debug)]
pub struct Svd {
    /// Left singular vectors, `rows x n`.
    pub u: Mat,
    /// Singular values, descending, `n = min(rows, cols)` of them.
    pub s: Vec<f64>,
    /// Right singular vectors, `cols x n`.
    pub v: Mat,
}

/// The SVD of `m` by one-sided Jacobi rotations (Hestenes): accurate to working precision for
/// the small matrices here.
pub fn svd(m: &Mat) -> Svd {
    if m.rows < m.cols {
        let t = svd(&m.t());
        return Svd {
            u: t.v,
            s: t.s,
            v: t.u,
        };
    }
    let (rows, n) = (m.rows, m.cols);
    // Work on columns: a is rows x n, v accumulates the rotations.
    let mut a = m.clone();
    let mut v = Mat::identity(n);
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for i in 0..rows {
                    let (x, y) = (a.get(i, p), a.get(i, q));
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..rows {
                    let (x, y) = (a.get(i, p), a.get(i, q));
                    a.set(i, p, c * x - s * y);
                    a.set(i, q, s * x + c * y);
                }
                for i in 0..n {
                    let (x, y) = (v.get(i, p), v.get(i, q));
                    v.set(i, p, c * x - s * y);
                    v.set(i, q, s * x + c * y);
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = (0..n)
        .map(|j| (0..rows).map(|i| a.get(i, j).powi(2)).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]).then(x.cmp(&y)));
    let u = Mat::from_fn(rows, n, |i, j| {
        let c = order[j];
        if norms[c] > 0.0 {
            a.get(i, c) / norms[c]
        } else {
            0.0
        }
    });
    let vv = Mat::from_fn(n, n, |i, j| v.get(i, order[j]));
    Svd {
        u,
        s: order.iter().map(|&c| norms[c]).collect(),
        v: vv,
    }
}

/// The best rank-`r` approximation of `m` as factors `(B, A)` with `B·A = M_r` (the singular
/// values split evenly as square roots), and the relative Eckart–Young error
/// `‖M - M_r‖_F / ‖M‖_F` (0 for a zero matrix).
pub fn truncate(m: &Mat, r: usize) -> (Mat, Mat, f64) {
    let d = svd(m);
    let r = r.min(d.s.len());
    let b = Mat::from_fn(m.rows, r, |i, j| d.u.get(i, j) * d.s[j].sqrt());
    let a = Mat::from_fn(r, m.cols, |i, j| d.s[i].sqrt() * d.v.get(j, i));
    let total: f64 = d.s.iter().map(|x| x * x).sum();
    let dropped: f64 = d.s[r..].iter().map(|x| x * x).sum();
    let err = if total > 0.0 {
        (dropped / total).sqrt()
    } else {
        0.0
    };
    (b, a, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut x = seed;
        Mat::from_fn(rows, cols, |_, _| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        })
    }

    #[test]
    fn svd_reconstructs_and_orders() {
        for (r, c) in [(6, 4), (4, 6), (8, 8)] {
            let m = sample(r, c, 3);
            let d = svd(&m);
            let n = r.min(c);
            let sd = Mat::from_fn(n, n, |i, j| if i == j { d.s[i] } else { 0.0 });
            let back = d.u.mul(&sd).mul(&d.v.t());
            assert!(back.sub(&m).frob() < 1e-12, "{r}x{c}");
            assert!(d.s.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn truncation_error_is_eckart_young() {
        // A rank-2 matrix is kept exactly at rank 2, and rank 1 drops the second value.
        let u = sample(6, 2, 5);
        let v = sample(2, 5, 6);
        let m = u.mul(&v);
        let (b, a, err) = truncate(&m, 2);
        assert!(b.mul(&a).sub(&m).frob() < 1e-12 && err < 1e-7);
        let (b1, a1, err1) = truncate(&m, 1);
        let rel = b1.mul(&a1).sub(&m).frob() / m.frob();
        assert!((rel - err1).abs() < 1e-10);
    }
}
