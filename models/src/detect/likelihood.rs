//! Anomaly likelihood: turns any raw score stream into a calibrated tail probability, as Numenta's
//! HTM detector does, and a detector wrapper applying it to another detector.
//!
//! The short-term mean of the last `short_window` raw scores is compared with the long-term
//! distribution of such means (exponentially weighted mean and variance over ~`long_window`
//! readings): a Gaussian upper-tail probability `p` says how unusual the recent scores are *for
//! this series*. The output is `log(p + 1e-10) / log(1e-10)`, i.e. `-log10(p) / 10`, so 0.5 means
//! p = 1e-5. The effect is that a series which always scores noisily stops alarming, and a quiet one
//! alarms at its first sustained rise. It does not look at the readings themselves.

use super::{unit, AnyDetector, Detector, DetectorConfig, EwmaConfig};
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Parameters of a [`LikelihoodStage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LikelihoodStageConfig {
    /// Raw scores averaged into the short-term mean, in [1, 64].
    #[serde(default = "default_short_window")]
    pub short_window: usize,
    /// Effective length (readings) of the long-term distribution, ≥ short_window.
    #[serde(default = "default_long_window")]
    pub long_window: usize,
    /// Readings before the output leaves 0 (≥ 1).
    #[serde(default = "default_warmup")]
    pub warmup: usize,
    /// Floor on the long-term standard deviation of short-term means (> 0), so a series that has
    /// scored exactly 0 so far does not alarm on the first tiny raw score.
    #[serde(default = "default_min_std")]
    pub min_std: f64,
}

fn default_short_window() -> usize {
    10
}
fn default_long_window() -> usize {
    2000
}
fn default_warmup() -> usize {
    150
}
fn default_min_std() -> f64 {
    0.02
}

impl Default for LikelihoodStageConfig {
    fn default() -> Self {
        Self {
            short_window: default_short_window(),
            long_window: default_long_window(),
            warmup: default_warmup(),
            min_std: default_min_std(),
        }
    }
}

/// Coefficients of Numerical Recipes' `erfcc`: erfc(x) = t·exp(poly(t) − x²), t = 1/(1 + x/2), x ≥ 0,
/// relative error < 1.2e-7 everywhere.
fn erfc_log_poly(a: f64, t: f64) -> f64 {
    -a * a - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))))
}

/// Gaussian upper-tail probability Q(z) = P(Z > z).
pub(crate) fn normal_tail(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let erfc = t * erfc_log_poly(a, t).exp();
    0.5 * if x >= 0.0 { erfc } else { 2.0 - erfc }
}

/// −log10 Q(z), computed in log space so it keeps growing (≈ z²/4.6) where Q itself underflows.
pub(crate) fn neg_log10_tail(z: f64) -> f64 {
    if z.is_nan() {
        return 0.0;
    }
    if z <= 0.0 {
        return -normal_tail(z).max(f64::MIN_POSITIVE).log10();
    }
    let a = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * a);
    -((0.5 * t).ln() + erfc_log_poly(a, t)) / std::f64::consts::LN_10
}

/// Score of a z against a two-sided Gaussian tail on the surprise scale: 0.5 at |z| ≈ 4.42
/// (p = 1e-5), ≈ 0.7 at |z| = 8, still rising far beyond — the output of every z-type detector.
#[inline]
pub(crate) fn two_sided_score(z: f64) -> f64 {
    surprise_score(neg_log10_tail(z.abs()) - std::f64::consts::LOG10_2)
}

/// Maps a surprise `L = −log10 p` ≥ 0 onto [0, 1) as `L / (L + 5)`: 0.5 is p = 1e-5, 0.667 is
/// p = 1e-10. It never saturates below p ≈ 1e-300, so the highest scores keep their order — what a
/// threshold sweep such as NAB's needs to separate the very surprising from the merely surprising.
#[inline]
pub(crate) fn surprise_score(l: f64) -> f64 {
    if l.is_nan() || l <= 0.0 {
        0.0
    } else if l.is_infinite() {
        1.0
    } else {
        l / (l + 5.0)
    }
}

/// Short-term mean of raw scores against their long-term distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LikelihoodStage {
    cfg: LikelihoodStageConfig,
    s: StageState,
}

/// What a likelihood stage learns (its parameters live apart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StageState {
    /// The last `short_window` raw scores, a ring.
    recent: Box<[f64]>,
    n: u64,
    mean: f64,
    var: f64,
    /// Next slot of `recent` (< 64).
    next: u8,
}

impl LikelihoodStageConfig {
    /// Rejects every parameter outside its documented range, naming it.
    pub(crate) fn check(&self) -> Result<(), ModelError> {
        if !(1..=64).contains(&self.short_window) {
            return Err(ModelError::invalid(
                "short_window",
                format!("must be in [1, 64], got {}", self.short_window),
            ));
        }
        if self.long_window < self.short_window {
            return Err(ModelError::invalid(
                "long_window",
                format!(
                    "must be >= short_window={}, got {}",
                    self.short_window, self.long_window
                ),
            ));
        }
        if self.warmup == 0 {
            return Err(ModelError::invalid("warmup", "must be >= 1, got 0"));
        }
        if !(self.min_std.is_finite() && self.min_std > 0.0) {
            return Err(ModelError::invalid(
                "min_std",
                format!("must be a finite number > 0, got {}", self.min_std),
            ));
        }
        Ok(())
    }
}

impl StageState {
    /// A fresh state for `cfg` (checked).
    pub(crate) fn new(cfg: &LikelihoodStageConfig) -> Self {
        Self {
            recent: vec![0.0; cfg.short_window].into_boxed_slice(),
            n: 0,
            mean: 0.0,
            var: 0.0,
            next: 0,
        }
    }

    /// Surprise `−log10 p` (≥ 0, may be +inf) of the short-term mean of raw scores including `raw`
    /// against their long-term distribution, then learns from it.
    #[inline]
    pub(crate) fn surprise(&mut self, cfg: &LikelihoodStageConfig, raw: f64) -> f64 {
        let next = usize::from(self.next);
        self.recent[next] = unit(raw);
        // short_window ≤ 64 (checked), so the slot fits in a u8.
        self.next = ((next + 1) % self.recent.len()) as u8;
        self.n += 1;
        let filled = (self.n as usize).min(self.recent.len());
        let short = self.recent.iter().sum::<f64>() / filled as f64;
        let sd = self.var.sqrt().max(cfg.min_std);
        let z = (short - self.mean) / sd;
        let out = if self.n > cfg.warmup as u64 && z > 0.0 {
            neg_log10_tail(z)
        } else {
            0.0
        };
        let alpha = (1.0 / cfg.long_window as f64).max(1.0 / self.n as f64);
        let diff = short - self.mean;
        let incr = alpha * diff;
        self.mean += incr;
        self.var = (1.0 - alpha) * (self.var + diff * incr);
        out
    }

    /// Heap bytes owned (the ring).
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.recent)
    }
}

impl LikelihoodStage {
    /// Validates the parameters (each error names the bad value).
    pub fn new(cfg: LikelihoodStageConfig) -> Result<Self, ModelError> {
        cfg.check()?;
        Ok(Self {
            s: StageState::new(&cfg),
            cfg,
        })
    }

    /// Feeds one raw score in [0, 1] (anything else counts as 0) and returns the likelihood score.
    #[inline]
    pub fn update(&mut self, raw: f64) -> f64 {
        surprise_score(self.surprise(raw))
    }

    /// As [`LikelihoodStage::update`] but returns the surprise `−log10 p` itself (≥ 0, may be +inf).
    #[inline]
    pub(crate) fn surprise(&mut self, raw: f64) -> f64 {
        self.s.surprise(&self.cfg, raw)
    }

    /// Heap bytes owned (the ring).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.s.heap_bytes()
    }
}

fn default_inner() -> Box<DetectorConfig> {
    Box::new(DetectorConfig::Ewma(EwmaConfig::default()))
}

/// Parameters of [`Likelihood`]: the wrapped detector and the stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LikelihoodConfig {
    /// The detector whose raw scores are calibrated (an EWMA chart by default).
    #[serde(default = "default_inner")]
    pub inner: Box<DetectorConfig>,
    /// Short- and long-term windows of the stage.
    #[serde(default)]
    pub stage: LikelihoodStageConfig,
}

impl Default for LikelihoodConfig {
    fn default() -> Self {
        Self {
            inner: default_inner(),
            stage: LikelihoodStageConfig::default(),
        }
    }
}

/// Any detector followed by a [`LikelihoodStage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Likelihood {
    inner: Box<AnyDetector>,
    stage: LikelihoodStage,
}

impl Likelihood {
    /// Builds the inner detector and the stage.
    pub fn new(cfg: LikelihoodConfig) -> Result<Self, ModelError> {
        Ok(Self {
            inner: Box::new(cfg.inner.build()?),
            stage: LikelihoodStage::new(cfg.stage)?,
        })
    }

    /// Heap bytes owned (the boxed inner detector and the stage's ring).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.inner.state_bytes() + self.stage.heap_bytes()
    }
}

impl Detector for Likelihood {
    #[inline]
    fn update(&mut self, ts_ms: i64, value: f64) -> f64 {
        let raw = self.inner.update(ts_ms, value);
        self.stage.update(raw)
    }

    fn name(&self) -> &'static str {
        "likelihood"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_tail_matches_known_values() {
        for (z, q) in [
            (0.0, 0.5),
            (1.0, 0.158_655_253_9),
            (3.0, 1.349_898_032e-3),
            (5.0, 2.866_515_719e-7),
            (-2.0, 0.977_249_868_1),
        ] {
            assert!(
                ((normal_tail(z) - q) / q).abs() < 1e-6,
                "{z}: {}",
                normal_tail(z)
            );
        }
        for z in [0.5, 2.0, 5.0, 8.0] {
            let l = -normal_tail(z).log10();
            assert!((neg_log10_tail(z) - l).abs() < 1e-6 * l.max(1.0), "{z}");
        }
        assert!(neg_log10_tail(50.0) > neg_log10_tail(40.0));
        assert!((surprise_score(5.0) - 0.5).abs() < 1e-12);
        assert_eq!(surprise_score(f64::INFINITY), 1.0);
        assert_eq!(surprise_score(f64::NAN), 0.0);
        assert_eq!(surprise_score(-7.0), 0.0);
        assert_eq!(two_sided_score(f64::NAN), 0.0);
    }

    #[test]
    fn sustained_rise_in_raw_scores_is_unlikely_and_steady_scores_are_not() {
        let mut s = LikelihoodStage::new(LikelihoodStageConfig::default()).unwrap();
        let mut max_steady: f64 = 0.0;
        for i in 0..3000 {
            let raw = 0.1 + 0.05 * ((i * 37 % 11) as f64 / 10.0);
            let out = s.update(raw);
            if i > 200 {
                max_steady = max_steady.max(out);
            }
        }
        assert!(max_steady < 0.2, "steady {max_steady}");
        let peak = (0..10).map(|_| s.update(0.9)).fold(0.0, f64::max);
        assert!(peak > 0.9, "peak {peak}");
    }

    #[test]
    fn wrapper_builds_its_inner_detector_and_rejects_bad_stage() {
        let mut d = Likelihood::new(LikelihoodConfig::default()).unwrap();
        assert_eq!(d.update(0, 1.0), 0.0);
        let e = Likelihood::new(LikelihoodConfig {
            stage: LikelihoodStageConfig {
                short_window: 0,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "short_window: must be in [1, 64], got 0");
    }
}
