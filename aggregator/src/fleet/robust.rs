//! Small robust helpers of the fleet module: trimming outlying profiles out of a training set,
//! medians, and the device-id globs of configured group labels.

use super::TRIM_Z;
use crate::config::FleetGroup;
use edgewatch_models::glob::glob_match;

/// `rows` (row-major, `n` columns) without its robust outliers: rows further than [`TRIM_Z`]
/// robust standard deviations from the column median on some column, most extreme first, at
/// most `most` rows.
pub(super) fn trim_outliers(rows: &[f64], n: usize, most: usize) -> Vec<f64> {
    if n == 0 || rows.len() < n {
        return rows.to_vec();
    }
    let count = rows.len() / n;
    let mut worst = vec![0.0f64; count];
    let mut col = Vec::with_capacity(count);
    for j in 0..n {
        col.clear();
        col.extend(rows.chunks_exact(n).map(|r| r[j]));
        let med = median(&mut col);
        for v in col.iter_mut() {
            *v = (*v - med).abs();
        }
        // A column of identical values has MAD 0: any departure from it is extreme.
        let scale = (1.4826 * median(&mut col))
            .max(1e-9 * med.abs())
            .max(1e-300);
        for (w, r) in worst.iter_mut().zip(rows.chunks_exact(n)) {
            let z = (r[j] - med).abs() / scale;
            *w = w.max(if z.is_nan() { f64::INFINITY } else { z });
        }
    }
    let mut order: Vec<usize> = (0..count).filter(|&i| worst[i] > TRIM_Z).collect();
    order.sort_by(|&a, &b| worst[b].total_cmp(&worst[a]));
    order.truncate(most);
    rows.chunks_exact(n)
        .enumerate()
        .filter(|(i, _)| !order.contains(i))
        .flat_map(|(_, r)| r.iter().copied())
        .collect()
}

/// Median of `v` (reordered); NaN for an empty slice.
pub(super) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The lower median of `v` (reordered); 0 for an empty slice.
pub(super) fn median_i64(v: &mut [i64]) -> i64 {
    if v.is_empty() {
        return 0;
    }
    let mid = (v.len() - 1) / 2;
    *v.select_nth_unstable(mid).1
}

/// The label of the first group whose glob matches `device`.
pub(super) fn label_of(groups: &[FleetGroup], device: &str) -> Option<String> {
    groups
        .iter()
        .find(|g| glob_match(&g.devices, device))
        .map(|g| g.label.clone())
}
