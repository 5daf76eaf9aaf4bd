//! Streaming anomaly detectors over one series: feed `(timestamp, value)`, get a score in [0, 1].
//!
//! Every detector is a plain state machine — O(1) or O(log w) per reading, bounded memory, `Clone` and
//! serde so its state can be checkpointed. [`DetectorConfig`] is the YAML face (`type:` tag);
//! [`AnyDetector`] is the built, validated detector the agent runs per series. One file per detector;
//! the default is the [`Ensemble`] (`ensemble.rs` says which components it combines and why).

mod cusum;
mod ensemble;
mod ewma;
mod hst;
mod likelihood;
mod mad;
mod seasonal;
mod stuck;
mod zscore;

pub use cusum::{Cusum, CusumConfig};
pub use ensemble::{Ensemble, EnsembleConfig};
pub use ewma::{Ewma, EwmaConfig};
pub use hst::{Hst, HstConfig};
pub use likelihood::{Likelihood, LikelihoodConfig, LikelihoodStage, LikelihoodStageConfig};
pub use mad::{Mad, MadConfig};
pub use seasonal::{Seasonal, SeasonalConfig};
pub use stuck::{Stuck, StuckConfig};
pub use zscore::{ZScore, ZScoreConfig};

use crate::ModelError;
use serde::{Deserialize, Serialize};

/// A streaming detector over one series.
pub trait Detector {
    /// Feeds one reading and returns its anomaly score in [0, 1] (finite, whatever the input).
    fn update(&mut self, ts_ms: i64, value: f64) -> f64;

    /// Short name used in anomaly events (`zscore`, `ensemble`, ...).
    fn name(&self) -> &'static str;
}

/// Clamps a score into [0, 1]; NaN becomes 0. The last step of every detector's output.
#[inline]
pub(crate) fn unit(x: f64) -> f64 {
    if x >= 1.0 {
        1.0
    } else if x > 0.0 {
        x
    } else {
        0.0
    }
}

/// Detector parameters as written in configuration.
// Built once per series from configuration, never held in bulk, so the size spread does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DetectorConfig {
    /// Rolling mean/variance z-score.
    Zscore(ZScoreConfig),
    /// EWMA mean/variance control chart.
    Ewma(EwmaConfig),
    /// Sliding median / MAD robust z-score.
    Mad(MadConfig),
    /// Two-sided CUSUM for level shifts.
    Cusum(CusumConfig),
    /// Level + time-of-day profile baseline.
    Seasonal(SeasonalConfig),
    /// Half-Space Trees over shingles.
    Hst(HstConfig),
    /// Improbable runs of identical readings.
    Stuck(StuckConfig),
    /// Anomaly likelihood around another detector.
    Likelihood(LikelihoodConfig),
    /// The default combination of all of the above.
    Ensemble(EnsembleConfig),
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self::Ensemble(EnsembleConfig::default())
    }
}

impl DetectorConfig {
    /// Names accepted by [`DetectorConfig::preset`].
    pub const PRESETS: &'static [&'static str] = &[
        "zscore",
        "ewma",
        "mad",
        "cusum",
        "seasonal",
        "hst",
        "stuck",
        "likelihood",
        "ensemble",
    ];

    /// The default parameters of the detector called `name` (one of [`DetectorConfig::PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "zscore" => Some(Self::Zscore(ZScoreConfig::default())),
            "ewma" => Some(Self::Ewma(EwmaConfig::default())),
            "mad" => Some(Self::Mad(MadConfig::default())),
            "cusum" => Some(Self::Cusum(CusumConfig::default())),
            "seasonal" => Some(Self::Seasonal(SeasonalConfig::default())),
            "hst" => Some(Self::Hst(HstConfig::default())),
            "stuck" => Some(Self::Stuck(StuckConfig::default())),
            "likelihood" => Some(Self::Likelihood(LikelihoodConfig::default())),
            "ensemble" => Some(Self::Ensemble(EnsembleConfig::default())),
            _ => None,
        }
    }

    /// The score threshold at which this detector's output should be treated as an anomaly.
    ///
    /// 0.5 for every detector on the shared surprise scale — EWMA, MAD and seasonal (two-sided
    /// Gaussian tail 1e-5, |z| ≈ 4.42), likelihood, stuck and the ensemble (probability 1e-5) — and
    /// for CUSUM (a sum reaching `h`). The rolling z-score keeps its linear scale (|z| = 5), and Half-
    /// Space Trees use 0.9: a point in a region the previous window left (nearly) empty.
    pub fn recommended_threshold(&self) -> f64 {
        match self {
            Self::Zscore(c) => (5.0 / c.z_max).min(1.0),
            Self::Ewma(_) | Self::Mad(_) | Self::Seasonal(_) => 0.5,
            Self::Cusum(_) => 0.5,
            Self::Hst(_) => 0.9,
            Self::Stuck(_) => 0.5,
            Self::Likelihood(_) => 0.5,
            Self::Ensemble(c) => c.threshold,
        }
    }

    /// Validates the parameters and builds a fresh detector.
    pub fn build(&self) -> Result<AnyDetector, ModelError> {
        Ok(match self {
            Self::Zscore(c) => AnyDetector::Zscore(ZScore::new(c.clone())?),
            Self::Ewma(c) => AnyDetector::Ewma(Ewma::new(c.clone())?),
            Self::Mad(c) => AnyDetector::Mad(Mad::new(c.clone())?),
            Self::Cusum(c) => AnyDetector::Cusum(Cusum::new(c.clone())?),
            Self::Seasonal(c) => AnyDetector::Seasonal(Seasonal::new(c.clone())?),
            Self::Hst(c) => AnyDetector::Hst(Hst::new(c.clone())?),
            Self::Stuck(c) => AnyDetector::Stuck(Stuck::new(c.clone())?),
            Self::Likelihood(c) => AnyDetector::Likelihood(Likelihood::new(c.clone())?),
            Self::Ensemble(c) => AnyDetector::Ensemble(Box::new(Ensemble::new(c.clone())?)),
        })
    }
}

/// A built detector of any kind; cheap to clone, serde for checkpoints.
///
/// Self-describing formats (JSON) see it internally tagged, `{"type": "ewma", ...}`, like the
/// configuration. Binary formats such as postcard cannot read that form (it needs
/// `deserialize_any`), so for them (`is_human_readable() == false`) it is externally tagged: the
/// variant index, then the state. That binary form changes if variants are reordered.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyDetector {
    /// See [`ZScore`].
    Zscore(ZScore),
    /// See [`Ewma`].
    Ewma(Ewma),
    /// See [`Mad`].
    Mad(Mad),
    /// See [`Cusum`].
    Cusum(Cusum),
    /// See [`Seasonal`].
    Seasonal(Seasonal),
    /// See [`Hst`].
    Hst(Hst),
    /// See [`Stuck`].
    Stuck(Stuck),
    /// See [`Likelihood`].
    Likelihood(Likelihood),
    /// See [`Ensemble`] (boxed: it is much larger than the others).
    Ensemble(Box<Ensemble>),
}

/// The serde faces of [`AnyDetector`]: one list of variants, four mirrors (tagged or indexed, to
/// write by reference or to read owned).
macro_rules! detector_repr {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        #[derive(Serialize)]
        #[serde(rename = "AnyDetector", tag = "type", rename_all = "snake_case")]
        enum TaggedRef<'a> { $($variant(&'a $ty)),* }

        #[derive(Serialize)]
        #[serde(rename = "AnyDetector", rename_all = "snake_case")]
        enum IndexedRef<'a> { $($variant(&'a $ty)),* }

        #[derive(Deserialize)]
        #[serde(rename = "AnyDetector", tag = "type", rename_all = "snake_case")]
        enum Tagged { $($variant($ty)),* }

        #[derive(Deserialize)]
        #[serde(rename = "AnyDetector", rename_all = "snake_case")]
        enum Indexed { $($variant($ty)),* }

        impl Serialize for AnyDetector {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    match self { $(Self::$variant(d) => TaggedRef::$variant(d).serialize(s)),* }
                } else {
                    match self { $(Self::$variant(d) => IndexedRef::$variant(d).serialize(s)),* }
                }
            }
        }

        impl<'de> Deserialize<'de> for AnyDetector {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(if d.is_human_readable() {
                    match Tagged::deserialize(d)? { $(Tagged::$variant(x) => Self::$variant(x)),* }
                } else {
                    match Indexed::deserialize(d)? { $(Indexed::$variant(x) => Self::$variant(x)),* }
                })
            }
        }
    };
}

detector_repr!(
    Zscore(ZScore),
    Ewma(Ewma),
    Mad(Mad),
    Cusum(Cusum),
    Seasonal(Seasonal),
    Hst(Hst),
    Stuck(Stuck),
    Likelihood(Likelihood),
    Ensemble(Box<Ensemble>),
);

impl AnyDetector {
    /// Bytes of state this detector holds per series: its inline size plus everything it owns on the heap.
    pub fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + match self {
                Self::Zscore(d) => d.heap_bytes(),
                Self::Ewma(d) => d.heap_bytes(),
                Self::Mad(d) => d.heap_bytes(),
                Self::Cusum(d) => d.heap_bytes(),
                Self::Seasonal(d) => d.heap_bytes(),
                Self::Hst(d) => d.heap_bytes(),
                Self::Stuck(d) => d.heap_bytes(),
                Self::Likelihood(d) => d.heap_bytes(),
                Self::Ensemble(d) => std::mem::size_of::<Ensemble>() + d.heap_bytes(),
            }
    }
}

impl Detector for AnyDetector {
    #[inline]
    fn update(&mut self, ts_ms: i64, value: f64) -> f64 {
        let s = match self {
            Self::Zscore(d) => d.update(ts_ms, value),
            Self::Ewma(d) => d.update(ts_ms, value),
            Self::Mad(d) => d.update(ts_ms, value),
            Self::Cusum(d) => d.update(ts_ms, value),
            Self::Seasonal(d) => d.update(ts_ms, value),
            Self::Hst(d) => d.update(ts_ms, value),
            Self::Stuck(d) => d.update(ts_ms, value),
            Self::Likelihood(d) => d.update(ts_ms, value),
            Self::Ensemble(d) => d.update(ts_ms, value),
        };
        // Every detector already returns [0, 1]; this keeps the contract even if one regresses.
        unit(s)
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Zscore(d) => d.name(),
            Self::Ewma(d) => d.name(),
            Self::Mad(d) => d.name(),
            Self::Cusum(d) => d.name(),
            Self::Seasonal(d) => d.name(),
            Self::Hst(d) => d.name(),
            Self::Stuck(d) => d.name(),
            Self::Likelihood(d) => d.name(),
            Self::Ensemble(d) => d.name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn every_preset() -> impl Iterator<Item = (&'static str, DetectorConfig)> {
        DetectorConfig::PRESETS
            .iter()
            .map(|&n| (n, DetectorConfig::preset(n).unwrap()))
    }

    #[test]
    fn every_preset_builds_and_is_named_after_itself() {
        for (name, cfg) in every_preset() {
            let d = cfg.build().unwrap();
            assert_eq!(d.name(), name);
            let t = cfg.recommended_threshold();
            assert!(t > 0.0 && t <= 1.0, "{name}: {t}");
        }
        assert!(DetectorConfig::preset("nope").is_none());
        assert_eq!(
            DetectorConfig::default(),
            DetectorConfig::preset("ensemble").unwrap()
        );
    }

    #[test]
    fn config_parses_from_a_type_tag_with_defaults_and_rejects_unknown_keys() {
        let c: DetectorConfig = serde_json::from_str(r#"{"type": "ewma", "alpha": 0.1}"#).unwrap();
        assert_eq!(
            c,
            DetectorConfig::Ewma(EwmaConfig {
                alpha: 0.1,
                ..Default::default()
            })
        );
        let c: DetectorConfig =
            serde_json::from_str(r#"{"type": "likelihood", "inner": {"type": "mad"}}"#).unwrap();
        assert!(matches!(c.build().unwrap(), AnyDetector::Likelihood(_)));
        assert!(
            serde_json::from_str::<DetectorConfig>(r#"{"type": "ewma", "alpah": 0.1}"#).is_err()
        );
        let bad: DetectorConfig = serde_json::from_str(r#"{"type": "ewma", "alpha": 2}"#).unwrap();
        assert_eq!(
            bad.build().unwrap_err().to_string(),
            "alpha: must be in (0, 1], got 2"
        );
    }

    #[test]
    fn fresh_and_nan_fed_state_survives_a_json_checkpoint() {
        for (name, cfg) in every_preset() {
            let mut d = cfg.build().unwrap();
            for _ in 0..2 {
                let json = serde_json::to_string(&d).unwrap();
                let back: Result<AnyDetector, _> = serde_json::from_str(&json);
                assert!(back.is_ok(), "{name}: {json}");
                d.update(0, f64::NAN);
            }
        }
    }

    #[test]
    fn checkpoint_restored_mid_stream_gives_identical_scores() {
        for (name, cfg) in every_preset() {
            let mut d = cfg.build().unwrap();
            let series = |i: i64| {
                (
                    i * 300_000,
                    ((i * 7919) % 101) as f64 + (i % 97 == 0) as i64 as f64 * 500.0,
                )
            };
            for i in 0..700 {
                let (t, v) = series(i);
                d.update(t, v);
            }
            let json = serde_json::to_string(&d).unwrap();
            let mut restored: AnyDetector = serde_json::from_str(&json).unwrap();
            // serde_json without `float_roundtrip` may parse a float one ulp off, hence the tolerance.
            for i in 700..1000 {
                let (t, v) = series(i);
                let (a, b) = (d.update(t, v), restored.update(t, v));
                assert!((a - b).abs() < 1e-9, "{name} at {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn json_checkpoints_keep_the_type_tag() {
        let d = DetectorConfig::preset("likelihood")
            .unwrap()
            .build()
            .unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert!(
            json.starts_with(r#"{"type":"likelihood","inner":{"type":"ewma","#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<AnyDetector>(&json).unwrap(), d);
    }

    #[test]
    fn binary_checkpoint_restored_mid_stream_gives_bit_identical_scores() {
        for (name, cfg) in every_preset() {
            let mut d = cfg.build().unwrap();
            let series = |i: i64| {
                (
                    i * 60_000,
                    ((i * 7919) % 101) as f64 + (i % 97 == 0) as i64 as f64 * 500.0,
                )
            };
            for i in 0..700 {
                let (t, v) = series(i);
                d.update(t, v);
            }
            let bytes = postcard::to_stdvec(&d).unwrap();
            let mut restored: AnyDetector = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(restored, d, "{name}");
            for i in 700..1000 {
                let (t, v) = series(i);
                let (a, b) = (d.update(t, v), restored.update(t, v));
                assert_eq!(a.to_bits(), b.to_bits(), "{name} at {i}");
            }
        }
    }

    #[test]
    fn ensemble_state_fits_in_4_kib_per_series() {
        let mut d = DetectorConfig::default().build().unwrap();
        for i in 0..5000 {
            d.update(i * 1000, (i % 13) as f64);
        }
        for (name, cfg) in every_preset() {
            println!("{name}: {} state bytes", cfg.build().unwrap().state_bytes());
        }
        let bytes = d.state_bytes();
        assert!(bytes <= 4096, "ensemble state is {bytes} bytes");
    }

    /// Seeded standard normal samples (xorshift64* + Box-Muller).
    fn gaussian(n: usize, mut state: u64) -> Vec<f64> {
        let mut u = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (a, b) = (u(), u());
                (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
            })
            .collect()
    }

    #[test]
    fn every_preset_rarely_reaches_its_recommended_threshold_on_gaussian_noise() {
        let noise = gaussian(40_000, 11);
        for (name, cfg) in every_preset() {
            let thr = cfg.recommended_threshold();
            let mut d = cfg.build().unwrap();
            let alarms = noise
                .iter()
                .enumerate()
                .map(|(i, &v)| (i, d.update(i as i64 * 1000, 10.0 + v)))
                .filter(|&(i, s)| i >= 2_000 && s >= thr)
                .count();
            println!("{name}: {alarms} alarms in 38000 readings at {thr}");
            assert!(alarms <= 3, "{name}: {alarms} alarms at threshold {thr}");
        }
    }

    fn reading() -> impl Strategy<Value = (i64, f64)> {
        let ts = prop_oneof![3 => 0i64..10_000_000_000, 1 => any::<i64>()];
        let value = prop_oneof![
            6 => -100.0f64..100.0,
            1 => Just(f64::NAN),
            1 => Just(f64::INFINITY),
            1 => Just(f64::NEG_INFINITY),
            1 => prop::num::f64::ANY,
            1 => prop_oneof![Just(f64::MAX), Just(f64::MIN), Just(1e300), Just(-1e300), Just(0.0)],
        ];
        (ts, value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn detectors_never_panic_on_nan_or_infinities_and_return_finite_scores_in_0_1(
            readings in prop::collection::vec(reading(), 0..400)
        ) {
            for (name, cfg) in every_preset() {
                let mut d = cfg.build().unwrap();
                for &(t, v) in &readings {
                    let s = d.update(t, v);
                    prop_assert!(s.is_finite() && (0.0..=1.0).contains(&s), "{} gave {} for {}", name, s, v);
                }
                // No NaN or infinity may reach the state: JSON would write it as null and the
                // checkpoint could not be read back.
                let json = serde_json::to_string(&d).unwrap();
                prop_assert!(serde_json::from_str::<AnyDetector>(&json).is_ok(), "{}: {}", name, json);
            }
        }
    }
}
