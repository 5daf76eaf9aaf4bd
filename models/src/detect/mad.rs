//! Robust z-score over a sliding window: distance from the window median in units of the scaled
//! median absolute deviation (MAD × 1.4826, which equals σ on Gaussian data), scored like `ewma.rs`
//! by its two-sided Gaussian tail (0.5 ⇔ |z| ≈ 4.42).
//!
//! The window is kept once, sorted (the order statistics), as `f32` offsets from the series' first
//! reading, each with a one- or two-byte arrival tag that says which one leaves next (about 5 bytes
//! per reading of window). A reading costs a binary search, a tag scan, one `memmove` of at most `window` floats
//! (cache-resident; faster than a tree up to the 4096-reading cap) and an O(log w) selection of the
//! MAD as the k-th smallest of two sorted deviation sequences — never a re-sort. When more than half
//! the window is one repeated value (quantised or stuck sensors) the MAD is 0; the spread then falls
//! back to the 10–90 % inter-quantile range, then to a tiny floor relative to the level.

use super::likelihood::two_sided_score;
use super::Detector;
use crate::ModelError;
use serde::{Deserialize, Serialize};

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
    s: MadState,
}

/// The window of a MAD detector (its parameters live apart), kept compact: the readings as `f32`
/// offsets from the series' first reading, sorted, and beside each one its arrival tag (the slot it
/// would have in a ring), so the oldest is found without keeping a second copy in arrival order.
/// Offsets keep 24 bits of mantissa relative to how far a reading is from the first one, not to
/// its magnitude, so a sensor at 1e6 ± 0.01 keeps its spread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct MadState {
    /// The first finite reading; every reading is kept as `reading − anchor`.
    anchor: f64,
    /// The window's offsets in ascending order (`len` of them in use).
    sorted: Box<[f32]>,
    /// Arrival tag of each entry of `sorted`: one byte each for windows up to 256, else two
    /// (little-endian).
    tags: Box<[u8]>,
    len: u16,
    /// Tag of the next reading; once the window is full, the tag of the oldest.
    head: u16,
}

impl MadConfig {
    /// Rejects a window outside [3, 4096] or a warmup outside [3, window].
    pub(crate) fn check(&self) -> Result<(), ModelError> {
        if !(3..=MAX_WINDOW).contains(&self.window) {
            return Err(ModelError::invalid(
                "window",
                format!("must be in [3, {MAX_WINDOW}], got {}", self.window),
            ));
        }
        if self.warmup < 3 || self.warmup > self.window {
            return Err(ModelError::invalid(
                "warmup",
                format!("must be in [3, window={}], got {}", self.window, self.warmup),
            ));
        }
        Ok(())
    }

    /// Bytes per arrival tag.
    fn tag_width(&self) -> usize {
        if self.window <= 256 {
            1
        } else {
            2
        }
    }
}

impl MadState {
    /// An empty window for `cfg` (checked).
    pub(crate) fn new(cfg: &MadConfig) -> Self {
        Self {
            anchor: 0.0,
            sorted: vec![0.0; cfg.window].into_boxed_slice(),
            tags: vec![0; cfg.window * cfg.tag_width()].into_boxed_slice(),
            len: 0,
            head: 0,
        }
    }

    /// The offsets in the window, ascending.
    fn offsets(&self) -> &[f32] {
        &self.sorted[..usize::from(self.len)]
    }

    /// Median of the window's offsets (0 when empty).
    fn median_offset(&self) -> f64 {
        let s = self.offsets();
        let n = s.len();
        match n {
            0 => 0.0,
            _ if n % 2 == 1 => f64::from(s[n / 2]),
            _ => 0.5 * f64::from(s[n / 2 - 1]) + 0.5 * f64::from(s[n / 2]),
        }
    }

    /// Median of the window (0 when empty).
    #[cfg(test)]
    fn median(&self) -> f64 {
        if self.len == 0 {
            return 0.0;
        }
        self.anchor + self.median_offset()
    }

    /// Robust spread (σ-equivalent) of the window around its median offset `m`, never 0.
    fn spread(&self, m: f64) -> f64 {
        let s = self.offsets();
        let n = s.len();
        let floor = 1e-9 * (1.0 + (self.anchor + m).abs());
        if n < 2 {
            return floor;
        }
        let mad = 1.4826 * kth_deviation(s, m, n / 2);
        if mad > floor {
            return mad;
        }
        // Over half the window is one value: fall back to the 10-90 % quantile range (a Gaussian's
        // is 2.563 σ), then to the floor.
        let q = |p: f64| f64::from(s[((n - 1) as f64 * p).round() as usize]);
        ((q(0.9) - q(0.1)) / 2.563).max(floor)
    }

    /// Whether the buffers agree with `cfg` and each other (a state read from disk might not).
    fn consistent(&self, cfg: &MadConfig) -> bool {
        self.sorted.len() == cfg.window
            && self.tags.len() == cfg.window * cfg.tag_width()
            && usize::from(self.len) <= cfg.window
            && usize::from(self.head) < cfg.window
    }

    /// Signed robust z of `value` against the window, then slides the window. `None` during warm-up
    /// or for a non-finite value (which is ignored).
    #[inline]
    pub(crate) fn z_update(&mut self, cfg: &MadConfig, value: f64) -> Option<f64> {
        if !value.is_finite() {
            return None;
        }
        if !self.consistent(cfg) {
            *self = Self::new(cfg);
        }
        let len = usize::from(self.len);
        if len == 0 {
            self.anchor = value;
        }
        let offset = value - self.anchor;
        let z = (len >= cfg.warmup).then(|| {
            let m = self.median_offset();
            (offset - m) / self.spread(m)
        });
        // Beyond f32's range the offset is clamped: only readings ~3e38 from the first one.
        let x = offset.clamp(f64::from(f32::MIN), f64::from(f32::MAX)) as f32;
        let w = cfg.tag_width();
        let head = self.head;
        let j = lower_bound(self.offsets(), f64::from(x));
        if len == cfg.window {
            // The oldest reading leaves: the entry tagged `head` (found by its tag, not its value).
            let i = find_tag(&self.tags[..len * w], w, head).unwrap_or(len - 1);
            let (s, t) = (&mut self.sorted, &mut self.tags);
            if j > i {
                s.copy_within(i + 1..j, i);
                t.copy_within((i + 1) * w..j * w, i * w);
                s[j - 1] = x;
                set_tag(t, w, j - 1, head);
            } else {
                s.copy_within(j..i, j + 1);
                t.copy_within(j * w..i * w, (j + 1) * w);
                s[j] = x;
                set_tag(t, w, j, head);
            }
        } else {
            let (s, t) = (&mut self.sorted, &mut self.tags);
            s.copy_within(j..len, j + 1);
            t.copy_within(j * w..len * w, (j + 1) * w);
            s[j] = x;
            set_tag(t, w, j, head);
            self.len += 1;
        }
        // window ≤ 4096 (checked), so tags fit in a u16.
        self.head = ((usize::from(head) + 1) % cfg.window) as u16;
        z
    }

    /// Heap bytes owned (the sorted offsets and their tags).
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.sorted) + self.tags.len()
    }
}

/// Position of the entry tagged `tag` in tags of `w` bytes each.
#[inline]
fn find_tag(tags: &[u8], w: usize, tag: u16) -> Option<usize> {
    if w == 1 {
        // Windows of up to 256 readings have tags below 256.
        tags.iter().position(|&t| t == tag as u8)
    } else {
        let tag = tag.to_le_bytes();
        tags.chunks_exact(2).position(|t| t == tag)
    }
}

/// Sets the tag of entry `i` (`w` bytes each).
#[inline]
fn set_tag(tags: &mut [u8], w: usize, i: usize, tag: u16) {
    if w == 1 {
        tags[i] = tag as u8;
    } else {
        tags[2 * i..2 * i + 2].copy_from_slice(&tag.to_le_bytes());
    }
}

impl Mad {
    /// Builds a detector, rejecting a window outside [3, 4096] or a warmup outside [3, window].
    pub fn new(cfg: MadConfig) -> Result<Self, ModelError> {
        cfg.check()?;
        Ok(Self {
            s: MadState::new(&cfg),
            cfg,
        })
    }

    /// Signed robust z (see [`MadState::z_update`]).
    #[inline]
    pub(crate) fn z_update(&mut self, value: f64) -> Option<f64> {
        self.s.z_update(&self.cfg, value)
    }

    /// Heap bytes owned (the window).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.s.heap_bytes()
    }
}

/// First index whose value is not below `x` (`s.len()` if none): a binary search whose steps compile
/// to conditional moves, because the comparisons on noisy data are unpredictable branches.
#[inline]
fn lower_bound(s: &[f32], x: f64) -> usize {
    let (mut base, mut size) = (0usize, s.len());
    if size == 0 {
        return 0;
    }
    while size > 1 {
        let half = size / 2;
        base += usize::from(f64::from(s[base + half]) < x) * half;
        size -= half;
    }
    base + usize::from(f64::from(s[base]) < x)
}

/// The k-th smallest (0-based) of |s[i] − m| over a sorted slice, in O(log n).
///
/// Values below `m` give deviations ascending leftwards, the others ascending rightwards: two sorted
/// sequences, and the k-th of their union is found by binary search on how many come from the left.
fn kth_deviation(s: &[f32], m: f64, k: usize) -> f64 {
    let v = |i: usize| f64::from(s[i]);
    let half = s.len() / 2;
    // With `m` the median, the values below it are exactly the lower half unless it is tied.
    let h = if half > 0 && v(half - 1) < m && v(half) >= m {
        half
    } else {
        lower_bound(s, m)
    };
    let (na, nb) = (h, s.len() - h);
    let a = |i: usize| m - v(h - 1 - i);
    let b = |j: usize| v(h + j) - m;
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
        assert_eq!(d.s.median(), 2.0);
        // Deviations 1,1,0,0,2,4,7 → median 1.
        // Offsets from the first reading (1.0): the median offset is 1.
        assert!((d.s.spread(1.0) - 1.4826).abs() < 1e-12);
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
            // Offsets from the first reading in f32: within 24 bits of the values' span (2e3).
            let tol = 2e3 * f64::from(f32::EPSILON);
            prop_assert!((d.s.median() - med).abs() <= tol, "{} vs {}", d.s.median(), med);
            let m = d.s.median_offset();
            let got = kth_deviation(d.s.offsets(), m, tail.len() / 2);
            prop_assert!((got - mad).abs() <= 2.0 * tol, "{} vs {}", got, mad);
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
