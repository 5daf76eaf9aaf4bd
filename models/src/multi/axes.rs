//! Principal axes of standardised training rows for the PCA model: linfa-reduction's `Pca`,
//! checked against the covariance matrix, with linfa-linalg's exact symmetric eigendecomposition
//! where Pca's iterative solver stops short.

use crate::ModelError;
use linfa::traits::Fit;
use linfa::DatasetBase;
use linfa_linalg::eigh::EighInto;
use linfa_reduction::Pca;
use ndarray::Array2;

/// (eigenvalue, unit loadings) pairs, in decreasing order of eigenvalue.
pub(crate) type Axes = Vec<(f64, Vec<f64>)>;

/// The principal axes of the standardised rows `z` (n_rows × n), as (eigenvalue, unit loadings),
/// in decreasing order of eigenvalue; at most `k_max`, each explaining > 1e-9 of `total`, and the
/// solver that gave them.
///
/// First linfa-reduction's `Pca` (a truncated SVD by LOBPCG, no BLAS). Its loadings are checked
/// against the covariance matrix C = ZᵀZ/(n_rows − 1): each must satisfy ‖C p − λ p‖ ≤ 1e-6·trace(C)
/// with λ = pᵀ C p. LOBPCG is built for a few components of a large matrix; with few features and
/// k close to n (its [X, R, P] block is wider than the space) it stops early and returns loadings
/// that are off (seen: 0.31 instead of 0.5 on four equally correlated sensors). Then the axes are
/// the exact symmetric eigendecomposition of C by linfa-linalg's `eigh` (tridiagonal QR; C is only
/// n × n); so are they when Pca returns an error. Either way λ is the variance of the data along the axis (linfa's
/// `explained_variance()` divides by the number of components, not of samples, so it is not used).
pub(crate) fn principal_axes(
    z: &[f64],
    n: usize,
    n_rows: usize,
    k_max: usize,
    total: f64,
) -> Result<(Axes, &'static str), ModelError> {
    let x = Array2::from_shape_vec((n_rows, n), z.to_vec())
        .map_err(|e| ModelError::data(format!("training matrix: {e}")))?;
    let cov = x.t().dot(&x) / (n_rows - 1) as f64;
    // A Pca error (LOBPCG breaking down on degenerate data) also leads to the eigh path below.
    let mut axes = match Pca::params(k_max).fit(&DatasetBase::from(x)) {
        Ok(pca) => orthonormal(pca.components().rows().into_iter().map(|r| r.to_vec())),
        Err(_) => Vec::new(),
    };
    let tol = 1e-6 * total;
    let mut solver = SOLVER_PCA;
    if axes.len() < k_max || axes.iter().any(|v| eigen_residual(&cov, v) > tol) {
        let (values, vectors) = cov
            .clone()
            .eigh_into()
            .map_err(|e| ModelError::data(format!("linfa-linalg eigh: {e}")))?;
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        axes = orthonormal(
            order
                .iter()
                .take(k_max)
                .map(|&i| vectors.column(i).to_vec()),
        );
        solver = SOLVER_EIGH;
    }
    let mut out: Vec<(f64, Vec<f64>)> = axes
        .into_iter()
        .map(|v| (quadratic(&cov, &v), v))
        .filter(|(l, _)| *l > 1e-9 * total)
        .collect();
    out.sort_by(|a, b| b.0.total_cmp(&a.0));
    if out.is_empty() {
        return Err(ModelError::data(
            "found no component with non-zero variance",
        ));
    }
    Ok((out, solver))
}

/// `quality.solver` when linfa-reduction's `Pca` gave the axes.
const SOLVER_PCA: &str = "linfa-reduction pca";
/// `quality.solver` when they came from linfa-linalg's `eigh` (see [`principal_axes`]).
const SOLVER_EIGH: &str = "linfa-linalg eigh";

/// Gram–Schmidt in the given order, dropping (near-)dependent vectors; each result has its largest
/// loading positive, so the sign is deterministic.
fn orthonormal(vectors: impl Iterator<Item = Vec<f64>>) -> Vec<Vec<f64>> {
    let mut axes: Vec<Vec<f64>> = Vec::new();
    for mut v in vectors {
        for u in &axes {
            let d: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= d * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if !(norm > 1e-6 && norm.is_finite()) {
            continue;
        }
        let big = v
            .iter()
            .copied()
            .fold(0.0f64, |m, a| if a.abs() > m.abs() { a } else { m });
        let s = if big < 0.0 { -1.0 / norm } else { 1.0 / norm };
        v.iter_mut().for_each(|a| *a *= s);
        axes.push(v);
    }
    axes
}

/// vᵀ C v.
fn quadratic(c: &Array2<f64>, v: &[f64]) -> f64 {
    c.rows()
        .into_iter()
        .zip(v)
        .map(|(row, vi)| vi * row.iter().zip(v).map(|(a, b)| a * b).sum::<f64>())
        .sum()
}

/// ‖C v − (vᵀ C v) v‖ for a unit vector v: 0 for an eigenvector.
fn eigen_residual(c: &Array2<f64>, v: &[f64]) -> f64 {
    let l = quadratic(c, v);
    c.rows()
        .into_iter()
        .zip(v)
        .map(|(row, vi)| {
            let cv: f64 = row.iter().zip(v).map(|(a, b)| a * b).sum();
            (cv - l * vi).powi(2)
        })
        .sum::<f64>()
        .sqrt()
}
