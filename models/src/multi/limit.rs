//! Control limits of the multivariate statistics (T², SPE): a scaled chi-square `g·χ²_h` fitted to
//! the training values by moments (Box 1954), tail probabilities by the Wilson–Hilferty normal
//! approximation, on the detectors' shared surprise scale (`L = −log10 p`, 0.5 ⇔ p = 1e-5).

use crate::detect::neg_log10_tail;
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Surprise at which the combined score is 0.5: p = 1e-5 after the Bonferroni factor 2 (two tests).
pub(crate) const HALF_SURPRISE: f64 = 5.0 + std::f64::consts::LOG10_2;
/// Share of the largest training values left out of the moments, so a few anomalies in the training
/// period do not widen the limit (only applied from 100 values on).
const TRIM: f64 = 0.01;
/// Floor of the fitted mean: a statistic that is (numerically) always 0 — SPE when every dimension
/// is kept — still gets a finite, positive scale.
const MEAN_FLOOR: f64 = 1e-9;
/// Bounds of the fitted degrees of freedom (Wilson–Hilferty degrades below ~0.1; above 1e4 the
/// distribution is a narrow Gaussian anyway).
const H_MIN: f64 = 0.1;
const H_MAX: f64 = 1e4;

/// A statistic's reference distribution `g·χ²_h` and the value of it that scores 0.5.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Scale g = var / (2·mean) of the training values (trimmed).
    pub g: f64,
    /// Degrees of freedom h = 2·mean² / var of the training values (trimmed), in [0.1, 1e4].
    pub h: f64,
    /// The statistic's value at which the combined score is 0.5 (the control limit an operator reads).
    pub value_at_half: f64,
}

/// Wilson–Hilferty z at or below which a statistic is *quiet*: its normal tail probability is at
/// least 0.5 + 3.9e-4 (the tail approximation's error is below 1e-7), so its surprise after the
/// Bonferroni factor, `−log10 p − log10 2`, is negative and the detectors' surprise mapping gives
/// exactly 0. When both statistics are quiet the combined score is exactly 0 without evaluating
/// the tail (see `PcaScorer::score`; `quiet_statistics_score_exactly_what_the_full_path_does` in
/// `pca_tests.rs` checks it against the full computation).
pub(crate) const QUIET_Z: f64 = -1e-3;

/// Wilson–Hilferty constants of one limit, precomputed for scoring.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct WilsonHilferty {
    inv_gh: f64,
    centre: f64,
    inv_sd: f64,
    /// `s·inv_gh` at or below which `z(s) ≤ QUIET_Z` (the cube of the cube root's bound; NaN when
    /// no statistic is that small).
    quiet: f64,
}

impl WilsonHilferty {
    /// z-value of the statistic `s` (monotone in s; −centre/sd at s ≤ 0).
    #[inline]
    pub(crate) fn z(&self, s: f64) -> f64 {
        ((s * self.inv_gh).max(0.0).cbrt() - self.centre) * self.inv_sd
    }

    /// Whether `z(s) ≤ QUIET_Z`, without a cube root (up to the rounding of one cube, far inside
    /// the margin of [`QUIET_Z`]). False for NaN.
    #[inline]
    pub(crate) fn is_quiet(&self, s: f64) -> bool {
        s * self.inv_gh <= self.quiet
    }

    /// The largest quiet statistic, about (up to rounding at the bound).
    #[cfg(test)]
    pub(crate) fn quiet_bound(&self) -> f64 {
        self.quiet / self.inv_gh
    }

    /// Whether `z(s) ≥ z` — decided without a cube root (cubing the threshold instead), since
    /// z is monotone in s.
    #[inline]
    pub(crate) fn reaches(&self, s: f64, z: f64) -> bool {
        let base = self.centre + z / self.inv_sd;
        base <= 0.0 || s * self.inv_gh >= base * base * base
    }
}

impl Limit {
    /// Fits the limit to the training values of a statistic (finite, ≥ 0; reordered in place).
    ///
    /// Moments of the values trimmed of their top 1 % give g and h. When the tail is heavier than
    /// that fit (the training 99th percentile lies above the fitted one), the shape is refitted
    /// to the median and the 99th percentile instead (smaller h = heavier tail), both of which a
    /// contamination below 1 % cannot move much.
    pub(crate) fn fit(values: &mut [f64]) -> Limit {
        values.sort_unstable_by(f64::total_cmp);
        let keep = if values.len() >= 100 {
            values.len() - (values.len() as f64 * TRIM).floor() as usize
        } else {
            values.len()
        };
        let kept = &values[..keep];
        let n = kept.len().max(1) as f64;
        let mean = kept.iter().sum::<f64>() / n;
        let var = if kept.len() > 1 {
            kept.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        let mean = if mean.is_finite() {
            mean.max(MEAN_FLOOR)
        } else {
            MEAN_FLOOR
        };
        let mut h = if var > 0.0 && var.is_finite() {
            (2.0 * mean * mean / var).clamp(H_MIN, H_MAX)
        } else {
            H_MAX
        };
        let mut g = mean / h;
        if values.len() >= 100 {
            let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
            let (q50, q99) = (at(0.5), at(0.99));
            if q50 > MEAN_FLOOR && q99 > g * chi2_at_surprise(h, P99_SURPRISE) {
                h = dof_for_ratio(q99 / q50);
                g = q50 / chi2_at_surprise(h, MEDIAN_SURPRISE);
            }
        }
        Limit {
            g,
            h,
            value_at_half: g * chi2_at_surprise(h, HALF_SURPRISE),
        }
    }

    pub(crate) fn wilson_hilferty(&self) -> WilsonHilferty {
        let v = 2.0 / (9.0 * self.h);
        let (centre, inv_sd) = (1.0 - v, 1.0 / v.sqrt());
        // z(s) ≤ QUIET_Z ⇔ cbrt(s·inv_gh) ≤ base ⇔ s·inv_gh ≤ base³ (for base ≥ 0).
        let base = centre + QUIET_Z / inv_sd;
        WilsonHilferty {
            inv_gh: 1.0 / (self.g * self.h),
            centre,
            inv_sd,
            // NaN (no statistic compares ≤) when even 0 is not quiet.
            quiet: if base >= 0.0 {
                base * base * base
            } else {
                f64::NAN
            },
        }
    }

    /// Surprise `−log10 P(g·χ²_h > s)` of a value of the statistic.
    pub fn surprise(&self, s: f64) -> f64 {
        neg_log10_tail(self.wilson_hilferty().z(s))
    }

    /// Checks g, h and value_at_half: finite, positive, and value_at_half where g and h put it.
    pub(crate) fn validate(&self, field: &'static str) -> Result<(), ModelError> {
        for (name, v) in [
            ("g", self.g),
            ("h", self.h),
            ("value_at_half", self.value_at_half),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return Err(ModelError::model(
                    field,
                    format!("{name} must be finite and > 0, got {v}"),
                ));
            }
        }
        let expected = self.g * chi2_at_surprise(self.h, HALF_SURPRISE);
        if (self.value_at_half - expected).abs() > 1e-6 * expected {
            return Err(ModelError::model(
                field,
                format!(
                    "value_at_half {} disagrees with g and h (expected {expected})",
                    self.value_at_half
                ),
            ));
        }
        Ok(())
    }
}

/// The x with Wilson–Hilferty surprise `l` for χ²_h: inverts the normal tail by bisection, then
/// x = h·(1 − 2/(9h) + z·√(2/(9h)))³. `l` ≥ log10(2) (upper half of the distribution).
fn chi2_at_surprise(h: f64, l: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if neg_log10_tail(mid) < l {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let z = 0.5 * (lo + hi);
    let v = 2.0 / (9.0 * h);
    h * (1.0 - v + z * v.sqrt()).max(0.0).powi(3)
}

/// Surprise of the median and of the 99th percentile.
const MEDIAN_SURPRISE: f64 = std::f64::consts::LOG10_2;
const P99_SURPRISE: f64 = 2.0;

/// The h in [H_MIN, H_MAX] whose χ²_h has 99th percentile / median = `ratio` (the ratio falls as h
/// grows; bisection on log h).
fn dof_for_ratio(ratio: f64) -> f64 {
    let r = |h: f64| chi2_at_surprise(h, P99_SURPRISE) / chi2_at_surprise(h, MEDIAN_SURPRISE);
    let (mut lo, mut hi) = (H_MIN.ln(), H_MAX.ln());
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if r(mid.exp()) > ratio {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (0.5 * (lo + hi)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact chi-square(2) upper tail is exp(−x/2): Wilson–Hilferty must be close in the far tail.
    #[test]
    fn wilson_hilferty_tracks_exact_chi2_tails() {
        let lim = Limit {
            g: 1.0,
            h: 2.0,
            value_at_half: 0.0,
        };
        for x in [2.0f64, 10.0, 20.0, 30.0] {
            let exact = x / 2.0 / std::f64::consts::LN_10;
            let wh = lim.surprise(x);
            assert!(
                (wh - exact).abs() < 0.1 * exact + 0.05,
                "x {x}: {wh} vs {exact}"
            );
        }
        // χ²_2 at p = 5e-6 is 2·ln(2e5) = 24.41; Wilson–Hilferty puts it 8 % higher (26.3): on
        // the conservative side for few degrees of freedom.
        let v = chi2_at_surprise(2.0, HALF_SURPRISE);
        assert!(v > 24.41 && v < 24.41 * 1.1, "{v}");
        // For many degrees of freedom it is close: χ²_50 at p = 5e-6 is 107.02.
        let v = chi2_at_surprise(50.0, HALF_SURPRISE);
        assert!((v - 107.02).abs() < 0.5, "{v}");
    }

    #[test]
    fn moments_recover_scale_and_dof() {
        // Values of 3·χ²_4 approximated by a deterministic grid of its quantiles is overkill: use
        // a sample whose mean and variance are known exactly (two points).
        let mut v: Vec<f64> = (0..49).flat_map(|_| [2.0, 6.0]).collect();
        let lim = Limit::fit(&mut v);
        let var = 4.0 * 98.0 / 97.0;
        assert!((lim.g - var / 8.0).abs() < 1e-12);
        assert!((lim.h - 32.0 / var).abs() < 1e-12);
        assert!(lim.validate("t2").is_ok());
        assert!((lim.surprise(lim.value_at_half) - HALF_SURPRISE).abs() < 1e-9);
    }

    #[test]
    fn trimming_ignores_a_few_huge_training_values() {
        let mut clean: Vec<f64> = (0..1000).map(|i| 1.0 + (i % 10) as f64 * 0.2).collect();
        let mut dirty = clean.clone();
        for v in dirty.iter_mut().take(5) {
            *v = 1e6;
        }
        let (a, b) = (Limit::fit(&mut clean), Limit::fit(&mut dirty));
        assert!(
            (a.value_at_half / b.value_at_half - 1.0).abs() < 0.1,
            "{a:?} {b:?}"
        );
    }

    #[test]
    fn a_heavier_tail_than_the_moments_say_lowers_h() {
        // Exponential quantiles (χ²_2 / 2, h = 2) with a heavy upper tail grafted on.
        let mut v: Vec<f64> = (0..10_000)
            .map(|i| -(1.0 - (i as f64 + 0.5) / 10_000.0).ln())
            .map(|x| if x > 2.0 { x * x / 2.0 } else { x })
            .collect();
        let plain = Limit::fit(&mut v.iter().map(|x| x.min(2.0)).collect::<Vec<_>>());
        let heavy = Limit::fit(&mut v);
        assert!(
            heavy.h < 2.0 && heavy.value_at_half > plain.value_at_half,
            "{heavy:?}"
        );
        let above = v.iter().filter(|&&x| x >= heavy.value_at_half).count();
        assert!(above <= 10, "{above} of 10 000 above the limit");
        assert!(heavy.validate("t2").is_ok());
    }

    #[test]
    fn reaches_agrees_with_comparing_z_values() {
        let lim = Limit::fit(&mut (1..500).map(|i| (i % 37) as f64 * 0.3).collect::<Vec<_>>());
        let wh = lim.wilson_hilferty();
        for s in [0.0, 0.01, 0.5, 3.0, 11.0, 40.0, 1e6] {
            for z in [-30.0, -2.0, 0.0, 0.7, 3.0, 9.0] {
                let (a, b) = (wh.reaches(s, z), wh.z(s) >= z);
                // Equal up to rounding at the boundary itself.
                assert!(a == b || (wh.z(s) - z).abs() < 1e-9, "s {s} z {z}: {a} {b}");
            }
        }
    }

    #[test]
    fn degenerate_values_give_a_valid_limit() {
        for mut v in [vec![0.0; 10], vec![3.0], vec![0.0, 1e-300], vec![5.0; 200]] {
            let lim = Limit::fit(&mut v);
            assert!(lim.validate("spe").is_ok(), "{lim:?}");
            assert!(lim.surprise(0.0) < 1.0);
            assert!(lim.surprise(lim.value_at_half * 2.0) > HALF_SURPRISE);
            assert!(
                lim.surprise(f64::INFINITY).is_infinite() || lim.surprise(f64::INFINITY) > 100.0
            );
        }
    }

    #[test]
    fn validate_names_the_bad_part() {
        let mut lim = Limit::fit(&mut [1.0, 2.0, 3.0]);
        lim.g = f64::NAN;
        assert!(lim
            .validate("t2")
            .unwrap_err()
            .to_string()
            .contains("t2: g"));
        let mut lim = Limit::fit(&mut [1.0, 2.0, 3.0]);
        lim.value_at_half *= 2.0;
        assert!(lim
            .validate("spe")
            .unwrap_err()
            .to_string()
            .contains("value_at_half"));
    }
}
