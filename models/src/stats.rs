//! Exact running summary statistics (count, min, max, mean, variance) that merge without loss.
//!
//! Welford's update per value and Chan et al.'s pairwise merge, so two window summaries combine into
//! exactly the summary of their union — the property the outbox relies on when it coarsens windows.

use serde::{Deserialize, Serialize};

/// Largest magnitude a value may have to enter a summary. Welford's update squares differences of
/// values, so magnitudes beyond ~1.3e154 would overflow to infinity and spoil a whole window; at
/// 1e100 a squared difference is at most 4e200 and no realistic count of readings can overflow the
/// sum. Sensors never come near it: callers reject larger values (counted) instead of summarising
/// them.
pub const MAX_ABS_VALUE: f64 = 1e100;

/// Whether `x` can enter a [`RunningStats`]: finite and at most [`MAX_ABS_VALUE`] in magnitude.
#[inline]
pub fn in_range(x: f64) -> bool {
    x.abs() <= MAX_ABS_VALUE
}

/// Count, min, max, mean and sum of squared deviations of a set of finite values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunningStats {
    /// Number of values.
    pub count: u64,
    /// Smallest value (`+inf` when empty).
    pub min: f64,
    /// Largest value (`-inf` when empty).
    pub max: f64,
    /// Arithmetic mean (0 when empty).
    pub mean: f64,
    /// Sum of squared deviations from the mean (Welford's M2).
    pub m2: f64,
}

impl Default for RunningStats {
    fn default() -> Self {
        Self {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            mean: 0.0,
            m2: 0.0,
        }
    }
}

impl RunningStats {
    /// Adds one value (callers filter out non-finite values first).
    #[inline]
    pub fn push(&mut self, x: f64) {
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// Merges `other` into `self`, exactly as if all of its values had been pushed.
    pub fn merge(&mut self, other: &RunningStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let n = (self.count + other.count) as f64;
        let delta = other.mean - self.mean;
        self.mean += delta * other.count as f64 / n;
        self.m2 += other.m2 + delta * delta * self.count as f64 * other.count as f64 / n;
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Population standard deviation (0 for fewer than two values).
    pub fn std(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            (self.m2 / self.count as f64).max(0.0).sqrt()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn welford_matches_two_pass_on_known_series() {
        let mut s = RunningStats::default();
        for x in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0] {
            s.push(x);
        }
        assert_eq!(s.count, 8);
        assert_eq!(s.mean, 5.0);
        assert!((s.std() - 2.0).abs() < 1e-12);
        assert_eq!((s.min, s.max), (2.0, 9.0));
    }

    #[test]
    fn welford_is_stable_with_a_large_offset() {
        let mut s = RunningStats::default();
        for x in [1e9 + 4.0, 1e9 + 7.0, 1e9 + 13.0, 1e9 + 16.0] {
            s.push(x);
        }
        assert!((s.m2 / 4.0 - 22.5).abs() < 1e-6, "variance {}", s.m2 / 4.0);
    }

    #[test]
    fn values_at_the_range_limit_keep_every_figure_finite() {
        let mut s = RunningStats::default();
        for i in 0..10_000 {
            s.push(if i % 2 == 0 {
                MAX_ABS_VALUE
            } else {
                -MAX_ABS_VALUE
            });
        }
        let mut other = s;
        other.push(MAX_ABS_VALUE);
        s.merge(&other);
        assert!(
            s.mean.is_finite() && s.m2.is_finite() && s.std().is_finite(),
            "{s:?}"
        );
        assert!(in_range(MAX_ABS_VALUE) && in_range(-MAX_ABS_VALUE) && in_range(0.0));
        assert!(!in_range(1.3e154) && !in_range(f64::NAN) && !in_range(f64::INFINITY));
    }

    proptest! {
        #[test]
        fn merge_equals_pushing_everything(a in prop::collection::vec(-1e6f64..1e6, 0..50),
                                           b in prop::collection::vec(-1e6f64..1e6, 0..50)) {
            let mut left = RunningStats::default();
            a.iter().for_each(|&x| left.push(x));
            let mut right = RunningStats::default();
            b.iter().for_each(|&x| right.push(x));
            let mut all = RunningStats::default();
            a.iter().chain(&b).for_each(|&x| all.push(x));
            left.merge(&right);
            prop_assert_eq!(left.count, all.count);
            prop_assert_eq!(left.min, all.min);
            prop_assert_eq!(left.max, all.max);
            prop_assert!((left.mean - all.mean).abs() <= 1e-6 * (1.0 + all.mean.abs()));
            prop_assert!((left.m2 - all.m2).abs() <= 1e-6 * (1.0 + all.m2.abs()));
        }
    }
}
