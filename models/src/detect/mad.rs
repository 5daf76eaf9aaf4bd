//! Robust z-score over a sliding window: distance from the window median in units of the scaled
//! median absolute deviation (MAD × 1.4826, which equals σ on Gaussian data), scored like `ewma.rs`
//! by its two-sided Gaussian tail (0.5 ⇔ |z| ≈ 4.42).
//!
//! The window is kept twice: a ring in arrival order (to know what leaves) and a sorted array (the
//! order statistics). A reading costs two binary searches, one `memmove` of at most `window` floats
//! (cache-resident; faster than a tree up to the 4096-reading cap) and an O(log w) selection of the
//! MAD as the k-th smallest of two sorted deviation sequences — never a re-sort. When more than half
//! the window is one repeated value (quantised or stuck sensors) the MAD is 0; the spread then falls
//! back to the 10–90 % inter-quantile range, then to a tiny floor relative to the level.

use super::likelihood::two_sided_score;
use super::Detector;
use crate::ModelError;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Largest accepted window: beyond it the `memmove` would dominate and a tree would be the better choice.
const MAX_WINDOW: usize = 4096;

/// Parameters of [`Mad`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MadConfig {
    /// Readings in the sliding window, in [3, 4096].
    #[serde(default = "default_window")]
    pub window: usize,
    /// Readings needed before any score above 0, in [3, window].
    #[serde(default = "default_warmup")]
    pub warmup: usize,
}

fn default_window() -> usize {
    128
}
fn default_warmup() -> usize {
    30
}

impl Default for MadConfig {
    fn default() -> Self {
        Self {
            window: default_window(),
            warmup: default_warmup(),
        }
    }
}

/// Sliding median / MAD detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mad {
    cfg: MadConfig,
    ring: VecDeque<f64>,
    sorted: Vec<f64>,
}

impl Mad {
    /// Builds a detector, rejecting a window outside [3, 4096] or a warmup outside [3, window].
    pub fn new(cfg: MadConfig) -> Result<Self, ModelError> {
        if !(3..=MAX_WINDOW).contains(&cfg.window) {
            return Err(ModelError::invalid(
                "window",
                format!("must be in [3, {MAX_WINDOW}], got {}", cfg.window),
            ));
        }
        if cfg.warmup < 3 || cfg.warmup > cfg.window {
            return Err(ModelError::invalid(
                "warmup",
                format!("must be in [3, window={}], got {}", cfg.window, cfg.warmup),
            ));
        }
        Ok(Self {
            ring: VecDeque::with_capacity(cfg.window),
            sorted: Vec::with_capacity(cfg.window),
            cfg,
        })
    }

    /// Median of the window (0 when empty).
    pub(crate) fn median(&self) -> f64 {
        let s = &self.sorted;
        let n = s.len();
        match n {
            0 => 0.0,
            _ if n % 2 == 1 => s[n / 2],
            // Halves first: the sum of two values near f64::MAX would overflow.
            _ => 0.5 * s[n / 2 - 1] + 0.5 * s[n / 2],
        }
    }

    /// Robust spread (σ-equivalent) of the window, never 0.
    pub(crate) fn spread(&self, median: f64) -> f64 {
        let s = &self.sorted;
        let n = s.len();
        let floor = 1e-9 * (1.0 + median.abs());
        if n < 2 {
            return floor;
        }
        let mad = 1.4826 * kth_deviation(s, median, n / 2);
        if mad > floor {
            return mad;
        }
        // 10-90 % range / 2.563 is σ on Gaussian data.
        let q = |p: f64| s[((n - 1) as f64 * p).round() as usize];
        ((q(0.9) - q(0.1)) / 2.563).max(floor)
    }

    /// Signed robust z of `value` against the window, then slides the window. `None` during warm-up
    /// or for a non-finite value (which is ignored).
    #[inline]
    pub(crate) fn z_update(&mut self, value: f64) -> Option<f64> {
        if !value.is_finite() {
            return None;
        }
        let z = (self.ring.len() >= self.cfg.warmup).then(|| {
            let med = self.median();
            (value - med) / self.spread(med)
        });
        let old = if self.ring.len() == self.cfg.window {
            self.ring.pop_front()
        } else {
            None
        };
        let s = &mut self.sorted;
        let j = lower_bound(s, value);
        match old {
            Some(old) => {
                // Replace `old` by `value` with one shift of the values between their two positions.
                // `old` is in `sorted` (both hold the same finite values), so `i` is in bounds.
                let i = lower_bound(s, old).min(s.len() - 1);
                if j > i {
                    s.copy_within(i + 1..j, i);
                    s[j - 1] = value;
                } else {
                    s.copy_within(j..i, j + 1);
                    s[j] = value;
                }
            }
            None => s.insert(j, value),
        }
        self.ring.push_back(value);
        z
    }

    /// Heap bytes owned (ring and sorted copy of the window).
    pub(crate) fn heap_bytes(&self) -> usize {
        (self.ring.capacity() + self.sorted.capacity()) * std::mem::size_of::<f64>()
    }
}

/// First index whose value is not below `x` (`s.len()` if none): a binary search whose steps compile
/// to conditional moves, because the comparisons on noisy data are unpredictable branches.
#[inline]
fn lower_bound(s: &[f64], x: f64) -> usize {
    let (mut base, mut size) = (0usize, s.len());
    if size == 0 {
        return 0;
    }
    while size > 1 {
        let half = size / 2;
        // Arithmetic rather than `if`, which the compiler would turn back into a branch.
        base += usize::from(s[base + half] < x) * half;
        size -= half;
    }
    base + usize::from(s[base] < x)
}

/// The k-th smallest (0-based) of |s[i] − m| over a sorted slice, in O(log n).
///
/// Values below `m` give deviations ascending leftwards, the others ascending rightwards: two sorted
/// sequences, and the k-th of their union is found by binary search on how many come from the left.
fn kth_deviation(s: &[f64], m: f64, k: usize) -> f64 {
    let half = s.len() / 2;
    // With `m` the median, the values below it are exactly the lower half unless it is tied.
    let h = if half > 0 && s[half - 1] < m && s[half] >= m {
        half
    } else {
        lower_bound(s, m)
    };
    let (na, nb) = (h, s.len() - h);
    let a = |i: usize| m - s[h - 1 - i];
    let b = |j: usize| s[h + j] - m;
    let take = (k + 1).min(s.len());
    let (mut lo, mut hi) = (take.saturating_sub(nb), take.min(na));
    while lo < hi {
        let i = (lo + hi) / 2;
        // i < hi <= na and take - i >= 1, take - i <= nb: both indices are in bounds.
        // Arithmetic rather than branches, as in `lower_bound`.
        let more_from_a = usize::from(a(i) < b(take - i - 1));
        lo += more_from_a * (i + 1 - lo);
        hi -= (1 - more_from_a) * (hi - i);
    }
    let j = take - lo;
    let from_a = if lo > 0 { a(lo - 1) } else { f64::NEG_INFINITY };
    let from_b = if j > 0 { b(j - 1) } else { f64::NEG_INFINITY };
    from_a.max(from_b)
}

impl Detector for Mad {
    #[inline]
    fn update(&mut self, _ts_ms: i64, value: f64) -> f64 {
        match self.z_update(value) {
            Some(z) => two_sided_score(z),
            None => 0.0,
        }
    }

    fn name(&self) -> &'static str {
        "mad"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_mad(v: &[f64]) -> (f64, f64) {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let med = if n % 2 == 1 {
            s[n / 2]
        } else {
            0.5 * s[n / 2 - 1] + 0.5 * s[n / 2]
        };
        let mut d: Vec<f64> = s.iter().map(|x| (x - med).abs()).collect();
        d.sort_by(|a, b| a.total_cmp(b));
        (med, d[n / 2])
    }

    #[test]
    fn known_series_has_known_median_and_mad() {
        let mut d = Mad::new(MadConfig {
            window: 7,
            warmup: 3,
        })
        .unwrap();
        for (i, v) in [1.0, 1.0, 2.0, 2.0, 4.0, 6.0, 9.0].into_iter().enumerate() {
            d.update(i as i64, v);
        }
        assert_eq!(d.median(), 2.0);
        // Deviations 1,1,0,0,2,4,7 → median 1.
        assert!((d.spread(2.0) - 1.4826).abs() < 1e-12);
        // (2 + 3·1.4826 − 2) / 1.4826 = 3 robust sigmas.
        let s = d.update(7, 2.0 + 3.0 * 1.4826);
        assert!((s - two_sided_score(3.0)).abs() < 1e-9, "{s}");
    }

    #[test]
    fn outliers_in_the_window_do_not_widen_the_band() {
        let mut d = Mad::new(MadConfig::default()).unwrap();
        for i in 0..400 {
            let v = if i % 10 == 0 { 1000.0 } else { (i % 7) as f64 };
            d.update(i, v);
        }
        assert!(d.update(400, 60.0) > 0.9);
        assert!(d.update(401, 3.0) < 0.2);
    }

    #[test]
    fn mostly_constant_window_falls_back_to_quantile_range() {
        let mut d = Mad::new(MadConfig::default()).unwrap();
        for i in 0..400 {
            d.update(i, if i % 5 == 0 { 11.0 } else { 10.0 });
        }
        assert!(d.update(400, 11.0) < 0.5);
        assert!(d.update(401, 1000.0) > 0.99);
    }

    proptest! {
        #[test]
        fn median_and_mad_match_a_full_sort(v in prop::collection::vec(-1e3f64..1e3, 3..80),
                                            window in 3usize..20) {
            let mut d = Mad::new(MadConfig { window, warmup: 3 }).unwrap();
            for (i, &x) in v.iter().enumerate() {
                d.update(i as i64, x);
            }
            let tail = &v[v.len().saturating_sub(window)..];
            let (med, mad) = naive_mad(tail);
            prop_assert_eq!(d.median(), med);
            prop_assert_eq!(kth_deviation(&d.sorted, med, tail.len() / 2), mad);
        }
    }

    #[test]
    fn bad_parameters_name_the_value() {
        let e = Mad::new(MadConfig {
            window: 2,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "window: must be in [3, 4096], got 2");
    }
}
