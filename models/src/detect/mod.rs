//! Streaming anomaly detectors over one series: feed `(timestamp, value)`, get a score in [0, 1].
//!
//! Every detector is a plain state machine — O(1) or O(log w) per reading, bounded memory, `Clone` and
//! serde so its state can be checkpointed. [`DetectorConfig`] is the YAML face (`type:` tag);
//! [`AnyDetector`] is the built, validated detector the agent runs per series. One file per detector;
//! the default is the [`Ensemble`] (`ensemble.rs` says which components it combines and why).

mod gate;
mod silence;

pub use gate::{EventGate, GateConfig, GateQuestion};
/// The shared surprise scale, also used by the multivariate models (`crate::multi`).
pub(crate) use likelihood::{neg_log10_tail, surprise_score};
pub use likelihood::{LikelihoodStage, LikelihoodStageConfig};
pub use silence::{Silence, SilenceChange, SilenceConfig};

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

/// The stored type of a detector: itself, or boxed (`in Box`) when much larger than the others.
macro_rules! detector_ty {
    ($det:ident) => { $det };
    ($det:ident, $wrap:ident) => { $wrap<$det> };
}

/// Wraps a built detector like its stored type.
macro_rules! detector_wrap {
    ($e:expr) => {
        $e
    };
    ($e:expr, $wrap:ident) => {
        $wrap::new($e)
    };
}

/// Heap bytes of a stored detector, counting the box's contents.
macro_rules! detector_heap {
    ($d:expr, $det:ident) => {
        $d.heap_bytes()
    };
    ($d:expr, $det:ident, $wrap:ident) => {
        std::mem::size_of::<$det>() + $d.heap_bytes()
    };
}

/// Generates, from the registry's lines: the detector modules and their re-exports,
/// [`DetectorConfig`] (its serde face is the `type:`-tagged enum), [`DetectorConfig::PRESETS`],
/// `preset`, `recommended_threshold` and `build`, [`AnyDetector`] with its serde faces, and the
/// enum dispatch of `update`, `name` and `state_bytes`.
macro_rules! detectors {
    ($(
        $variant:ident($module:ident :: $det:ident $(in $wrap:ident)?, $cfg:ident)
        $name:literal, $doc:literal, |$c:pat_param| $threshold:expr;
    )*) => {
        $(
            mod $module;
            pub use $module::{$det, $cfg};
        )*

        /// Detector parameters as written in configuration.
        // Built once per series from configuration, never held in bulk, so the size spread does not matter.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
        pub enum DetectorConfig {
            $(
                #[doc = $doc]
                $variant($cfg),
            )*
        }

        impl DetectorConfig {
            /// Names accepted by [`DetectorConfig::preset`].
            pub const PRESETS: &'static [&'static str] = &[$($name),*];

            /// The default parameters of the detector called `name` (one of [`DetectorConfig::PRESETS`]).
            pub fn preset(name: &str) -> Option<Self> {
                match name {
                    $($name => Some(Self::$variant($cfg::default())),)*
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
                    $(Self::$variant($c) => $threshold,)*
                }
            }

            /// Validates the parameters and builds a fresh detector.
            pub fn build(&self) -> Result<AnyDetector, ModelError> {
                Ok(match self {
                    $(Self::$variant(c) => AnyDetector::$variant(
                        detector_wrap!($det::new(c.clone())? $(, $wrap)?)
                    ),)*
                })
            }
        }

        /// A built detector of any kind; cheap to clone, serde for checkpoints.
        ///
        /// Self-describing formats (JSON) see it internally tagged, `{"type": "ewma", ...}`, like the
        /// configuration. Binary formats such as postcard cannot read that form (it needs
        /// `deserialize_any`), so for them (`is_human_readable() == false`) it is externally tagged: the
        /// variant index, then the state. That binary form changes if variants are reordered. Detectors
        /// much larger than the others (the [`Ensemble`]) are boxed.
        #[derive(Debug, Clone, PartialEq)]
        pub enum AnyDetector {
            $(
                #[doc = concat!("See [`", stringify!($det), "`].")]
                $variant(detector_ty!($det $(, $wrap)?)),
            )*
        }

        detector_repr!($($variant(detector_ty!($det $(, $wrap)?))),*);

        impl AnyDetector {
            /// Makes this detector share the parameters of `prototype` (a detector built from the
            /// same configuration) where they are equal, so a restored series does not keep its own
            /// copy. Detectors of another kind, or with other parameters, are left as they are.
            pub fn share_params(&mut self, prototype: &AnyDetector) {
                if let (Self::Ensemble(d), Self::Ensemble(p)) = (self, prototype) {
                    d.share_params(p);
                }
            }

            /// Bytes of state this detector holds per series: its inline size plus everything it
            /// owns on the heap (parameters shared by every series are not counted).
            pub fn state_bytes(&self) -> usize {
                std::mem::size_of::<Self>()
                    + match self {
                        $(Self::$variant(d) => detector_heap!(d, $det $(, $wrap)?),)*
                    }
            }
        }

        impl Detector for AnyDetector {
            #[inline]
            fn update(&mut self, ts_ms: i64, value: f64) -> f64 {
                let s = match self {
                    $(Self::$variant(d) => d.update(ts_ms, value),)*
                };
                // Every detector already returns [0, 1]; this keeps the contract even if one regresses.
                unit(s)
            }

            fn name(&self) -> &'static str {
                match self {
                    $(Self::$variant(d) => d.name(),)*
                }
            }
        }
    };
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

// The registry: every detector, once. Adding one means its own file and one line here (at the end:
// the binary checkpoint form numbers the variants in this order). Each line reads
// `Variant(module::Detector [in Box], Config) "name", "config doc", |config| recommended threshold;`
// where `name` is the `type:` tag (the variant in snake_case) and the detector's `name()`.
detectors! {
    Zscore(zscore::ZScore, ZScoreConfig) "zscore", "Rolling mean/variance z-score.", |c| (5.0 / c.z_max).min(1.0);
    Ewma(ewma::Ewma, EwmaConfig) "ewma", "EWMA mean/variance control chart.", |_| 0.5;
    Mad(mad::Mad, MadConfig) "mad", "Sliding median / MAD robust z-score.", |_| 0.5;
    Cusum(cusum::Cusum in Box, CusumConfig) "cusum", "Two-sided CUSUM for level shifts.", |_| 0.5;
    Seasonal(seasonal::Seasonal in Box, SeasonalConfig) "seasonal", "Level + time-of-day profile baseline.", |_| 0.5;
    Hst(hst::Hst in Box, HstConfig) "hst", "Half-Space Trees over shingles.", |_| 0.9;
    Stuck(stuck::Stuck in Box, StuckConfig) "stuck", "Improbable runs of identical readings.", |_| 0.5;
    Likelihood(likelihood::Likelihood in Box, LikelihoodConfig) "likelihood", "Anomaly likelihood around another detector.", |_| 0.5;
    Ensemble(ensemble::Ensemble in Box, EnsembleConfig) "ensemble", "The default combination of all of the above.", |c| c.threshold;
}

/// The default detector: the [`Ensemble`].
impl Default for DetectorConfig {
    fn default() -> Self {
        Self::Ensemble(EnsembleConfig::default())
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
    fn every_registered_detector_round_trips_its_config_name_and_snapshot() {
        assert_eq!(DetectorConfig::PRESETS.len(), 9);
        for (i, (name, cfg)) in every_preset().enumerate() {
            // The config: tagged with its name, and read back as itself.
            let json = serde_json::to_value(&cfg).unwrap();
            assert_eq!(json["type"], name, "{name}");
            assert_eq!(serde_json::from_value::<DetectorConfig>(json).unwrap(), cfg);
            // The snapshot: tagged with the same name in JSON; in the binary form, the variant
            // index is the registry position (checkpoints on disk depend on it).
            let mut d = cfg.build().unwrap();
            for t in 0..50 {
                d.update(t * 1000, (t % 7) as f64);
            }
            let json = serde_json::to_value(&d).unwrap();
            assert_eq!(json["type"], name, "{name}");
            assert_eq!(serde_json::from_value::<AnyDetector>(json).unwrap(), d);
            let bytes = postcard::to_stdvec(&d).unwrap();
            assert_eq!(usize::from(bytes[0]), i, "{name}");
            assert_eq!(postcard::from_bytes::<AnyDetector>(&bytes).unwrap(), d);
        }
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
    fn ensemble_state_fits_in_1_kib_per_series() {
        let mut d = DetectorConfig::default().build().unwrap();
        for i in 0..5000 {
            d.update(i * 1000, (i % 13) as f64);
        }
        for (name, cfg) in every_preset() {
            println!("{name}: {} state bytes", cfg.build().unwrap().state_bytes());
        }
        let bytes = d.state_bytes();
        println!("ensemble after 5000 readings: {bytes} state bytes");
        assert!(bytes <= 1024, "ensemble state is {bytes} bytes");
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
    fn every_preset_rarely_raises_an_event_on_gaussian_noise() {
        let noise = gaussian(40_000, 11);
        for (name, cfg) in every_preset() {
            let thr = cfg.recommended_threshold();
            let mut d = cfg.build().unwrap();
            let mut gate = EventGate::new(thr, &GateConfig::default()).unwrap();
            let (mut events, mut rows) = (0, 0);
            for (i, &v) in noise.iter().enumerate() {
                let s = d.update(i as i64 * 1000, 10.0 + v);
                let event = gate.update(s);
                if i >= 2_000 {
                    events += usize::from(event);
                    rows += usize::from(s >= thr);
                }
            }
            println!("{name}: {events} events ({rows} rows at or above {thr}) in 38000 readings");
            assert!(events <= 3, "{name}: {events} events at threshold {thr}");
            assert!(rows <= 12, "{name}: {rows} rows at threshold {thr}");
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
