//! Streaming Half-Space Trees (Tan, Ting & Liu 2011) over shingles of the last few readings.
//!
//! Each reading is standardised against a slow EWMA (`ewma.rs`) and squashed into (0, 1); the last
//! `shingle` of them form a point. Every tree cuts the unit cube `depth` times, each node along a
//! random dimension at a random point of the middle half of its range; a point's score in a tree is the reference mass of the deepest well-populated node it
//! reaches, times 2^depth. Masses are counted over tumbling windows of `window` readings: the
//! finished window is the reference, the filling one becomes the next. Low mass means isolated: the
//! anomaly score is `1 / (1 + 4 ρ)` with ρ the mass-density summed over trees relative to the window.
//!
//! The trees are drawn once from `seed` with a splitmix64 generator (no `rand` in models), so runs are
//! reproducible. A node's range follows from its ancestors' cuts, so only the split dimension and
//! position (a byte each) and the two masses (a byte each, hence `window` ≤ 255) are stored:
//! about 2^(depth+2) bytes per tree.

use super::{unit, Detector, Ewma, EwmaConfig};
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Largest shingle; the point lives on the stack.
const MAX_SHINGLE: usize = 8;

/// Parameters of [`Hst`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HstConfig {
    /// Number of trees, in [1, 64].
    #[serde(default = "default_trees")]
    pub trees: usize,
    /// Depth of every tree, in [1, 10].
    #[serde(default = "default_depth")]
    pub depth: u32,
    /// Readings per mass window, in [16, 255].
    #[serde(default = "default_window")]
    pub window: u16,
    /// Consecutive readings per point, in [1, 8].
    #[serde(default = "default_shingle")]
    pub shingle: usize,
    /// Weight of the newest reading in the standardising mean and variance, in (0, 1].
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Seed of the random trees.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_trees() -> usize {
    8
}
fn default_depth() -> u32 {
    6
}
fn default_window() -> u16 {
    250
}
fn default_shingle() -> usize {
    4
}
fn default_alpha() -> f64 {
    0.01
}
fn default_seed() -> u64 {
    0x5EED_1234_ABCD_0001
}

impl Default for HstConfig {
    fn default() -> Self {
        Self {
            trees: default_trees(),
            depth: default_depth(),
            window: default_window(),
            shingle: default_shingle(),
            alpha: default_alpha(),
            seed: default_seed(),
        }
    }
}

/// splitmix64: a tiny, good-quality generator for drawing the trees.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Half-Space Trees detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hst {
    trees: usize,
    depth: u32,
    window: u16,
    shingle: usize,
    norm: Ewma,
    /// Last `shingle` squashed readings, newest at `head`.
    recent: [f64; MAX_SHINGLE],
    head: usize,
    filled: usize,
    /// Split dimension of each internal node, tree-major.
    dims: Vec<u8>,
    /// Split position of each internal node within its range, in 1/1024ths above one quarter.
    cuts: Vec<u8>,
    /// Reference mass of each node, tree-major, heap order.
    reference: Vec<u8>,
    /// Mass of the window being filled.
    latest: Vec<u8>,
    seen: u16,
    has_reference: bool,
}

impl Hst {
    /// Builds the trees from `seed`, rejecting out-of-range sizes and an alpha outside (0, 1].
    pub fn new(cfg: HstConfig) -> Result<Self, ModelError> {
        if !(1..=64).contains(&cfg.trees) {
            return Err(ModelError::invalid(
                "trees",
                format!("must be in [1, 64], got {}", cfg.trees),
            ));
        }
        if !(1..=10).contains(&cfg.depth) {
            return Err(ModelError::invalid(
                "depth",
                format!("must be in [1, 10], got {}", cfg.depth),
            ));
        }
        if !(16..=255).contains(&cfg.window) {
            return Err(ModelError::invalid(
                "window",
                format!("must be in [16, 255], got {}", cfg.window),
            ));
        }
        if !(1..=MAX_SHINGLE).contains(&cfg.shingle) {
            return Err(ModelError::invalid(
                "shingle",
                format!("must be in [1, {MAX_SHINGLE}], got {}", cfg.shingle),
            ));
        }
        let norm = Ewma::new(EwmaConfig {
            alpha: cfg.alpha,
            alpha_var: None,
            warmup: 10,
            clip_z: 4.0,
        })?;
        let internal = (1usize << cfg.depth) - 1;
        let nodes = (1usize << (cfg.depth + 1)) - 1;
        let mut rng = cfg.seed;
        let dims = (0..cfg.trees * internal)
            // shingle ≤ 8, so the remainder fits a byte.
            .map(|_| (splitmix64(&mut rng) % cfg.shingle as u64) as u8)
            .collect();
        let cuts = (0..cfg.trees * internal)
            .map(|_| (splitmix64(&mut rng) >> 56) as u8)
            .collect();
        Ok(Self {
            trees: cfg.trees,
            depth: cfg.depth,
            window: cfg.window,
            shingle: cfg.shingle,
            norm,
            recent: [0.0; MAX_SHINGLE],
            head: 0,
            filled: 0,
            dims,
            cuts,
            reference: vec![0; cfg.trees * nodes],
            latest: vec![0; cfg.trees * nodes],
            seen: 0,
            has_reference: false,
        })
    }

    /// Heap bytes owned (tree shapes and masses).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.dims.capacity()
            + self.cuts.capacity()
            + self.reference.capacity()
            + self.latest.capacity()
    }

    /// Scores the current point in every tree and counts it into the filling window.
    fn score_and_count(&mut self) -> f64 {
        let k = self.shingle;
        let mut x = [0.0f64; MAX_SHINGLE];
        for (q, xq) in x.iter_mut().enumerate().take(k) {
            *xq = self.recent[(self.head + MAX_SHINGLE - q) % MAX_SHINGLE];
        }
        let internal = (1usize << self.depth) - 1;
        let nodes = 2 * internal + 1;
        let size_limit = (self.window / 10) as u8;
        let mut density = 0.0;
        for t in 0..self.trees {
            let mut lo = [0.0f64; MAX_SHINGLE];
            let mut hi = [1.0f64; MAX_SHINGLE];
            let base = t * nodes;
            let mut node = 0usize;
            let mut found = None;
            for d in 0..=self.depth {
                let r = self.reference[base + node];
                let l = &mut self.latest[base + node];
                *l = l.saturating_add(1);
                if found.is_none() && (r <= size_limit || d == self.depth) {
                    found = Some(f64::from(r) * f64::from(1u32 << d));
                }
                if d == self.depth {
                    break;
                }
                let q = usize::from(self.dims[t * internal + node]);
                let f = 0.25 + f64::from(self.cuts[t * internal + node]) / 512.0;
                let mid = lo[q] + f * (hi[q] - lo[q]);
                if x[q] < mid {
                    hi[q] = mid;
                    node = 2 * node + 1;
                } else {
                    lo[q] = mid;
                    node = 2 * node + 2;
                }
            }
            density += found.unwrap_or(0.0);
        }
        self.seen += 1;
        if self.seen >= self.window {
            std::mem::swap(&mut self.reference, &mut self.latest);
            self.latest.iter_mut().for_each(|m| *m = 0);
            self.seen = 0;
            self.has_reference = true;
        }
        density / (self.trees as f64 * f64::from(self.window))
    }
}

impl Detector for Hst {
    #[inline]
    fn update(&mut self, _ts_ms: i64, value: f64) -> f64 {
        let Some(z) = self.norm.z_update(value) else {
            return 0.0;
        };
        self.head = (self.head + 1) % MAX_SHINGLE;
        self.recent[self.head] = 0.5 + 0.5 * (z / 3.0).tanh();
        self.filled = (self.filled + 1).min(self.shingle);
        if self.filled < self.shingle {
            return 0.0;
        }
        let scored = self.has_reference;
        let rho = self.score_and_count();
        if scored {
            unit(1.0 / (1.0 + 4.0 * rho))
        } else {
            0.0
        }
    }

    fn name(&self) -> &'static str {
        "hst"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(i: i64) -> f64 {
        (i as f64 * 0.3).sin() * 10.0 + 50.0
    }

    #[test]
    fn same_seed_same_scores_and_different_seed_different_trees() {
        let mut a = Hst::new(HstConfig::default()).unwrap();
        let mut b = a.clone();
        for i in 0..1000 {
            assert_eq!(a.update(i, wave(i)), b.update(i, wave(i)));
        }
        let c = Hst::new(HstConfig {
            seed: 7,
            ..Default::default()
        })
        .unwrap();
        assert_ne!(a.dims, c.dims);
    }

    #[test]
    fn a_broken_pattern_scores_higher_than_the_learnt_one() {
        let mut d = Hst::new(HstConfig::default()).unwrap();
        let mut max_normal: f64 = 0.0;
        for i in 0..3000 {
            let s = d.update(i, wave(i));
            if i > 1000 {
                max_normal = max_normal.max(s);
            }
        }
        // A jump to a level never seen: once the shingle is full of it, no tree has mass there.
        let jumped = (3000..3004).map(|i| d.update(i, 120.0)).fold(0.0, f64::max);
        assert!(jumped > 0.9, "jump {jumped}");
        assert!(max_normal < 0.6, "normal {max_normal}");
    }

    #[test]
    fn bad_parameters_name_the_value() {
        let e = Hst::new(HstConfig {
            window: 300,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "window: must be in [16, 255], got 300");
    }
}
