//! Shared preparation of training data for the multivariate models: shape and name checks, the
//! finite rows of a row-major matrix, and per-feature standardisation (mean, sample standard
//! deviation; a constant column gets scale 1 so nothing is ever divided by zero).

use crate::ModelError;

/// Largest |z| a scorer lets through: squares of 8 such values stay far below `f64::MAX`, so a
/// huge reading scores 1 instead of turning into inf − inf = NaN.
pub(crate) const Z_CLAMP: f64 = 1e150;

/// Feature names must be non-empty and unique; `what` prefixes the message.
pub(crate) fn check_names(features: &[String]) -> Result<(), ModelError> {
    if features.is_empty() {
        return Err(ModelError::data("no features given"));
    }
    for (i, f) in features.iter().enumerate() {
        if f.is_empty() {
            return Err(ModelError::data(format!("feature {i} has an empty name")));
        }
        if features[..i].contains(f) {
            return Err(ModelError::data(format!("feature {f:?} appears twice")));
        }
    }
    Ok(())
}

/// The finite rows of `rows` (row-major, `n` columns) copied out, and how many rows were skipped
/// because one of their values was NaN or infinite.
pub(crate) fn finite_rows(rows: &[f64], n: usize) -> Result<(Vec<f64>, u64), ModelError> {
    if n == 0 {
        return Err(ModelError::data("no features given"));
    }
    if !rows.len().is_multiple_of(n) {
        return Err(ModelError::data(format!(
            "{} values are not a whole number of rows of {n} features",
            rows.len()
        )));
    }
    let mut kept = Vec::with_capacity(rows.len());
    let mut skipped = 0u64;
    for row in rows.chunks_exact(n) {
        if row.iter().all(|v| v.is_finite()) {
            kept.extend_from_slice(row);
        } else {
            skipped += 1;
        }
    }
    Ok((kept, skipped))
}

/// Per-column location and scale of a finite row-major matrix.
pub(crate) struct Standardiser {
    /// Column means.
    pub means: Vec<f64>,
    /// Column sample standard deviations; 1 for a constant column.
    pub scales: Vec<f64>,
    /// Indices of the constant columns (scale forced to 1).
    pub constant: Vec<usize>,
}

impl Standardiser {
    /// Welford's mean and variance per column (no overflow of a running sum); at least 2 rows.
    pub fn fit(data: &[f64], n: usize, features: &[String]) -> Result<Self, ModelError> {
        let rows = data.len() / n;
        let mut means = vec![0.0; n];
        let mut m2 = vec![0.0; n];
        for (i, row) in data.chunks_exact(n).enumerate() {
            let k = (i + 1) as f64;
            for j in 0..n {
                let d = row[j] - means[j];
                means[j] += d / k;
                m2[j] += d * (row[j] - means[j]);
            }
        }
        let mut scales = Vec::with_capacity(n);
        let mut constant = Vec::new();
        for j in 0..n {
            let sd = (m2[j] / (rows as f64 - 1.0)).sqrt();
            if !sd.is_finite() || !means[j].is_finite() {
                return Err(ModelError::data(format!(
                    "feature {:?}: values too large to standardise (standard deviation {sd})",
                    features[j]
                )));
            }
            if sd <= 1e-10 * means[j].abs() || sd < 1e-300 {
                constant.push(j);
                scales.push(1.0);
            } else {
                scales.push(sd);
            }
        }
        Ok(Self {
            means,
            scales,
            constant,
        })
    }

    /// The standardised copy of `data` (same layout).
    pub fn apply(&self, data: &[f64]) -> Vec<f64> {
        let n = self.means.len();
        let mut z = Vec::with_capacity(data.len());
        for row in data.chunks_exact(n) {
            z.extend(
                row.iter()
                    .zip(self.means.iter().zip(&self.scales))
                    .map(|(v, (m, s))| (v - m) / s),
            );
        }
        z
    }
}

/// Checks a vector field of a model: length `n`, every value finite (and > 0 when `positive`).
pub(crate) fn check_values(
    field: &'static str,
    values: &[f64],
    n: usize,
    positive: bool,
    features: &[String],
) -> Result<(), ModelError> {
    if values.len() != n {
        return Err(ModelError::model(
            field,
            format!("{} values for {n} features", values.len()),
        ));
    }
    for (j, v) in values.iter().enumerate() {
        let name = features.get(j).map(String::as_str).unwrap_or("?");
        if !v.is_finite() {
            return Err(ModelError::model(
                field,
                format!("feature {name:?}: not finite ({v})"),
            ));
        }
        if positive && *v <= 0.0 {
            return Err(ModelError::model(
                field,
                format!("feature {name:?}: must be > 0, got {v}"),
            ));
        }
    }
    Ok(())
}

/// Median of a non-empty slice (reorders it).
pub(crate) fn median(values: &mut [f64]) -> f64 {
    quantile(values, 0.5)
}

/// The `q`-quantile (nearest rank) of a non-empty slice (reorders it); 0 for an empty one.
pub(crate) fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    let (_, v, _) = values.select_nth_unstable_by(i.min(values.len() - 1), f64::total_cmp);
    *v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("f{i}")).collect()
    }

    #[test]
    fn names_must_be_unique_and_non_empty() {
        assert!(check_names(&[]).is_err());
        assert!(check_names(&["a".into(), "".into()]).is_err());
        let e = check_names(&["a".into(), "a".into()]).unwrap_err();
        assert!(e.to_string().contains("\"a\" appears twice"), "{e}");
        assert!(check_names(&names(3)).is_ok());
    }

    #[test]
    fn finite_rows_skips_and_counts_bad_rows() {
        let rows = [1.0, 2.0, f64::NAN, 3.0, 4.0, 5.0, 6.0, f64::INFINITY];
        let (kept, skipped) = finite_rows(&rows, 2).unwrap();
        assert_eq!(kept, vec![1.0, 2.0, 4.0, 5.0]);
        assert_eq!(skipped, 2);
        assert!(finite_rows(&rows[..3], 2).is_err());
        assert!(finite_rows(&rows, 0).is_err());
    }

    #[test]
    fn standardiser_matches_sample_moments_and_handles_constant_columns() {
        let data = [1.0, 7.0, 2.0, 7.0, 3.0, 7.0, 4.0, 7.0];
        let s = Standardiser::fit(&data, 2, &names(2)).unwrap();
        assert!((s.means[0] - 2.5).abs() < 1e-12);
        assert!((s.scales[0] - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(s.scales[1], 1.0);
        assert_eq!(s.constant, vec![1]);
        let z = s.apply(&data);
        assert_eq!(z[1], 0.0);
        let huge = [1e300, 0.0, -1e300, 1.0];
        let e = Standardiser::fit(&huge, 2, &names(2)).err().unwrap();
        assert!(e.to_string().contains("\"f0\""), "{e}");
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&mut v), 3.0);
        assert_eq!(quantile(&mut v, 1.0), 5.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }
}
