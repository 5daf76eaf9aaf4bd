//! Multivariate device models on the agent, without I/O: which model runs for which device, the
//! checks an incoming model must pass before it is swapped in, and per-reading scoring (the device's
//! `Aligner` → `PcaScorer` → `EventGate`). Models arrive from the uplink broker or from disk
//! (`store.rs`); the pipeline calls [`DeviceModels::observe`] for every reading.

pub(crate) mod store;
mod table;
pub(crate) mod training;

use table::{DeviceTable, Link};

use crate::config::ModelsConfig;
use crate::telemetry::ModelRefusal;
use edgewatch_models::detect::{EventGate, GateConfig};
use edgewatch_models::multi::{Aligner, PcaModel, PcaScorer};
use edgewatch_models::wire::model_key;
use edgewatch_models::ModelError;

/// Detector name of multivariate events.
pub(crate) const PCA: &str = "pca";

/// A model that was not swapped in, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRefused {
    /// The metric label.
    pub reason: ModelRefusal,
    /// What is wrong, naming the model, its version and the bad value.
    pub detail: String,
}

impl std::fmt::Display for ModelRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.label(), self.detail)
    }
}

fn refused(reason: ModelRefusal, detail: impl Into<String>) -> ModelRefused {
    ModelRefused {
        reason,
        detail: detail.into(),
    }
}

/// What became of a model offered to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelOffer {
    /// Swapped in for `device` (`previous`: the version it replaced).
    Loaded {
        /// The device the model is for.
        device: String,
        /// Its version.
        version: u64,
        /// The version running before, if any.
        previous: Option<u64>,
    },
    /// The very model already running (a retained message delivered again): nothing to do.
    Unchanged {
        /// The device the model is for.
        device: String,
        /// Its version.
        version: u64,
    },
}

/// A vector that started an episode: what the `pca` event reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Hit<'a> {
    /// The feature contributing most.
    pub metric: &'a str,
    /// Its value in the vector.
    pub value: f64,
    /// The model's score in [0, 1].
    pub score: f64,
    /// The model's version.
    pub version: u64,
}

/// The model running for one device and its scoring state.
struct Running {
    model: PcaModel,
    scorer: PcaScorer,
    aligner: Aligner,
    gate: EventGate,
}

/// A series' cached places in the device tables (models and sampling): not checkpointed, resolved
/// again (one hash lookup each) after a restore or when its device's entry changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeviceLink {
    model: Link,
    sample: Link,
}

/// Every device's model. Empty until a model is accepted; a device without one keeps univariate
/// detection only.
pub(crate) struct DeviceModels {
    align: edgewatch_models::multi::AlignConfig,
    /// A fresh gate at `models.threshold` with the `anomaly:` re-arm rules.
    gate: EventGate,
    by_device: DeviceTable<Running>,
    /// Training samples for the aggregator (`models.enabled` and `models.training.enabled`).
    sampling: Option<training::Sampling>,
}

impl DeviceModels {
    /// Validates `cfg` (threshold, staleness, min_fill) and the re-arm rules.
    pub(crate) fn new(cfg: &ModelsConfig, gate: &GateConfig) -> Result<Self, ModelError> {
        let gate = EventGate::new(cfg.threshold, gate)?;
        let align = cfg.align();
        // Checks staleness_ms and min_fill now rather than at the first model.
        Aligner::new(&["x".to_string()], &align)?;
        let t = &cfg.training;
        let sampling = (cfg.enabled && t.enabled)
            .then(|| training::Sampling::new(t.sampler(), align.clone(), t.max_devices));
        Ok(Self {
            align,
            gate,
            by_device: DeviceTable::new(),
            sampling,
        })
    }

    /// Feeds one reading to the device's training sampler; returns `(partition, sample)` when it
    /// closes a training period.
    #[inline]
    pub(crate) fn sample(
        &mut self,
        link: &mut DeviceLink,
        device: &str,
        metric: &str,
        partition: u32,
        ts_ms: i64,
        value: f64,
    ) -> Option<(u32, edgewatch_models::wire::TrainingSample)> {
        self.sampling
            .as_mut()?
            .observe(&mut link.sample, device, metric, partition, ts_ms, value)
    }

    /// An anomaly event of `device` (any detector): its training period is left out.
    pub(crate) fn note_anomaly(&mut self, link: &DeviceLink, device: &str, ts_ms: i64) {
        if let Some(s) = &mut self.sampling {
            s.note_anomaly(&link.sample, device, ts_ms);
        }
    }

    /// Training periods that ended a whole period before `now_ms` (see [`training::Sampling::expire`]).
    pub(crate) fn expire_samples(
        &mut self,
        now_ms: i64,
        out: &mut Vec<(u32, edgewatch_models::wire::TrainingSample)>,
    ) {
        if let Some(s) = &mut self.sampling {
            s.expire(now_ms, out);
        }
    }

    /// Models running.
    pub(crate) fn len(&self) -> usize {
        self.by_device.len()
    }

    /// Version of the model running for `device`.
    pub(crate) fn version(&self, device: &str) -> Option<u64> {
        let ix = self.by_device.find(device)?;
        Some(self.by_device.get(ix).model.version)
    }

    /// Checks a model received under `key` (the topic's or file's key) and swaps it in. `metrics`
    /// are the metric names the agent has seen for the model's device (empty: none yet, and then
    /// any features are accepted). Refused: a payload that is not a model, an invalid one, a key
    /// that is not [`model_key`] of its device, a version not newer than the running one, or a
    /// feature the device does not have. On a swap the device's aligner is kept when the features
    /// are the same (rebuilt empty otherwise: it refills within one reading interval) and its event
    /// gate carries over (an episode in progress raises no second event).
    pub(crate) fn offer<'m>(
        &mut self,
        key: &str,
        payload: &[u8],
        metrics: impl FnOnce(&str) -> Vec<&'m str>,
    ) -> Result<ModelOffer, ModelRefused> {
        let model: PcaModel = serde_json::from_slice(payload)
            .map_err(|e| refused(ModelRefusal::Payload, format!("model {key:?}: {e}")))?;
        let name = format!("model {:?} v{} (key {key:?})", model.key, model.version);
        model
            .validate()
            .map_err(|e| refused(ModelRefusal::Invalid, format!("{name}: {e}")))?;
        let want = model_key(&model.key);
        if key != want {
            return Err(refused(
                ModelRefusal::Key,
                format!("{name}: published under {key:?}, its device's key is {want:?}"),
            ));
        }
        let running = self
            .by_device
            .find(model.key.as_str())
            .map(|ix| self.by_device.get(ix));
        if let Some(r) = running {
            if r.model == model {
                return Ok(ModelOffer::Unchanged {
                    device: model.key,
                    version: r.model.version,
                });
            }
            if model.version <= r.model.version {
                return Err(refused(
                    ModelRefusal::Version,
                    format!("{name}: version {} runs already", r.model.version),
                ));
            }
        }
        let seen = metrics(&model.key);
        if !seen.is_empty() {
            if let Some(f) = model.features.iter().find(|f| !seen.contains(&f.as_str())) {
                return Err(refused(
                    ModelRefusal::Features,
                    format!("{name}: feature {f:?} is not one of the device's metrics {seen:?}"),
                ));
            }
        }
        let previous = running.map(|r| r.model.version);
        let device = model.key.clone();
        let version = model.version;
        let scorer = model.scorer();
        // Built before the swap: an error leaves the running model as it was.
        let fresh = Aligner::new(&model.features, &self.align)
            .map_err(|e| refused(ModelRefusal::Invalid, format!("{name}: {e}")))?;
        match self.by_device.find(device.as_str()) {
            Some(ix) => {
                let r = self.by_device.get_mut(ix);
                if r.aligner.features() != model.features.as_slice() {
                    r.aligner = fresh;
                }
                r.model = model;
                r.scorer = scorer;
                // The features (and so the slots) may have moved.
                self.by_device.touch(ix);
            }
            None => {
                let aligner = fresh;
                self.by_device.insert(
                    device.as_str(),
                    Running {
                        model,
                        scorer,
                        aligner,
                        gate: self.gate.clone(),
                    },
                );
            }
        }
        Ok(ModelOffer::Loaded {
            device,
            version,
            previous,
        })
    }

    /// Feeds one reading to its device's model, if the device has one and the metric is one of its
    /// features; returns what to report when the vector it completes starts an episode. Allocates
    /// nothing.
    #[inline]
    pub(crate) fn observe(
        &mut self,
        link: &mut DeviceLink,
        device: &str,
        metric: &str,
        ts_ms: i64,
        value: f64,
    ) -> Option<Hit<'_>> {
        if self.by_device.is_empty() {
            return None;
        }
        let (ix, slot) = self
            .by_device
            .link(&mut link.model, device, |r| r.aligner.slot(metric))?;
        let r = self.by_device.get_mut(ix);
        if !r.aligner.push(slot, ts_ms, value) {
            return None;
        }
        let s = r.scorer.score(&r.model, r.aligner.vector());
        let onset = r.gate.update(s.score);
        if !r.gate.armed() {
            // The whole episode, not only its onset, is left out of training.
            if let Some(sampling) = &mut self.sampling {
                sampling.note_anomaly(&link.sample, device, ts_ms);
            }
        }
        if !onset {
            return None;
        }
        Some(Hit {
            metric: r.model.features.get(s.top)?,
            value: r.aligner.vector().get(s.top).copied()?,
            score: if s.score.is_finite() {
                s.score.clamp(0.0, 1.0)
            } else {
                0.0
            },
            version: r.model.version,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use edgewatch_models::multi::FitOptions;

    pub(crate) const FEATURES: [&str; 3] = ["flow", "pressure", "current"];

    /// A reading of metric `j` at step `i`: a shared load drives all three; `broken` makes
    /// `current` read 0.3 of the load away from what the others imply, inside its own range.
    pub(crate) fn reading(i: i64, j: usize, broken: bool) -> f64 {
        let load = 0.5 + 0.4 * (i as f64 / 23.0).sin();
        let noise = 0.01 * ((i * 7 + j as i64 * 13) as f64 * 1.618).sin();
        let l = match (broken && j == 2, load < 0.5) {
            (false, _) => load,
            (true, true) => load + 0.3,
            (true, false) => load - 0.3,
        };
        [10.0, 3.0, 5.0][j] + [20.0, 2.0, 8.0][j] * (l + noise)
    }

    /// A model for `device` fitted on the vectors of 2000 normal steps, streamed through an
    /// aligner as the agent sees them (one reading per metric and second), at `version`.
    pub(crate) fn fitted(device: &str, version: u64) -> PcaModel {
        let features = FEATURES.map(String::from).to_vec();
        let mut aligner = Aligner::new(&features, &Default::default()).unwrap();
        let mut rows = Vec::new();
        for i in 0..2000 {
            for j in 0..3 {
                if aligner.push(j, i * 1000 + j as i64, reading(i, j, false)) {
                    rows.extend_from_slice(aligner.vector());
                }
            }
        }
        let mut m = PcaModel::fit(
            device,
            features,
            &rows,
            0,
            2_000_000,
            &FitOptions::default(),
        )
        .unwrap();
        m.version = version;
        m
    }

    pub(crate) fn payload(m: &PcaModel) -> Vec<u8> {
        serde_json::to_vec(m).unwrap()
    }

    fn models() -> DeviceModels {
        DeviceModels::new(&ModelsConfig::default(), &GateConfig::default()).unwrap()
    }

    fn none<'a>(_: &str) -> Vec<&'a str> {
        Vec::new()
    }

    /// Feeds steps `from..to` of `device`; returns (step, hit) of every event.
    fn run(
        m: &mut DeviceModels,
        device: &str,
        from: i64,
        to: i64,
        broken: impl Fn(i64) -> bool,
    ) -> Vec<(i64, String, u64, f64)> {
        let mut hits = Vec::new();
        let mut links = [DeviceLink::default(); 3];
        for i in from..to {
            for (j, f) in FEATURES.iter().enumerate() {
                let v = reading(i, j, broken(i));
                if let Some(h) = m.observe(&mut links[j], device, f, i * 1000 + j as i64, v) {
                    hits.push((i, h.metric.to_string(), h.version, h.score));
                }
            }
        }
        hits
    }

    #[test]
    fn a_model_scores_its_device_and_raises_one_event_per_episode() {
        let mut m = models();
        let offer = m.offer(&model_key("pump"), &payload(&fitted("pump", 1)), none);
        assert_eq!(
            offer,
            Ok(ModelOffer::Loaded {
                device: "pump".into(),
                version: 1,
                previous: None
            })
        );
        assert_eq!(m.len(), 1);
        assert!(run(&mut m, "pump", 2000, 2300, |_| false).is_empty());
        // Another device has no model: nothing, however broken.
        assert!(run(&mut m, "fan", 2000, 2300, |_| true).is_empty());
        // Two breaks, far enough apart for the gate to re-arm: one event each.
        let hits = run(&mut m, "pump", 2300, 3000, |i| {
            (2400..2500).contains(&i) || (2700..2800).contains(&i)
        });
        assert_eq!(hits.len(), 2, "{hits:?}");
        assert!((2400..2410).contains(&hits[0].0), "{hits:?}");
        assert!((2700..2710).contains(&hits[1].0), "{hits:?}");
        for (_, metric, version, score) in &hits {
            assert_eq!(metric, "current");
            assert_eq!(*version, 1);
            assert!(*score >= 0.5 && *score <= 1.0);
        }
    }

    #[test]
    fn bad_models_are_refused_with_the_reason() {
        let mut m = models();
        let key = model_key("pump");
        let reason = |r: Result<ModelOffer, ModelRefused>| r.unwrap_err().reason;
        assert_eq!(
            reason(m.offer(&key, b"{not json", none)),
            ModelRefusal::Payload
        );
        assert_eq!(reason(m.offer(&key, b"", none)), ModelRefusal::Payload);
        let mut nan = fitted("pump", 1);
        nan.means[1] = f64::NAN;
        // serde_json writes NaN as null: refused as a payload or as invalid, never taken.
        let r = m.offer(&key, &payload(&nan), none).unwrap_err();
        assert!(
            matches!(r.reason, ModelRefusal::Payload | ModelRefusal::Invalid),
            "{r}"
        );
        let mut huge = fitted("pump", 1);
        huge.scales[0] = -1.0;
        let r = m.offer(&key, &payload(&huge), none).unwrap_err();
        assert_eq!(r.reason, ModelRefusal::Invalid, "{r}");
        assert!(r.detail.contains("scales"), "{r}");
        // Published under another device's key.
        let r = m
            .offer(&model_key("fan"), &payload(&fitted("pump", 1)), none)
            .unwrap_err();
        assert_eq!(r.reason, ModelRefusal::Key, "{r}");
        // A feature the device does not have.
        let r = m
            .offer(&key, &payload(&fitted("pump", 1)), |d| {
                assert_eq!(d, "pump");
                vec!["flow", "pressure", "temp"]
            })
            .unwrap_err();
        assert_eq!(r.reason, ModelRefusal::Features, "{r}");
        assert!(r.detail.contains("\"current\""), "{r}");
        assert_eq!(m.len(), 0, "nothing refused runs");
        // Extra metrics on the device are fine.
        m.offer(&key, &payload(&fitted("pump", 2)), |_| {
            vec!["temp", "current", "pressure", "flow"]
        })
        .unwrap();
        // Older or equal (but different) versions are refused; the same model again is no change.
        let r = m
            .offer(&key, &payload(&fitted("pump", 1)), none)
            .unwrap_err();
        assert_eq!(r.reason, ModelRefusal::Version, "{r}");
        let mut same_version = fitted("pump", 2);
        same_version.samples += 1;
        let r = m.offer(&key, &payload(&same_version), none).unwrap_err();
        assert_eq!(r.reason, ModelRefusal::Version, "{r}");
        assert_eq!(
            m.offer(&key, &payload(&fitted("pump", 2)), none),
            Ok(ModelOffer::Unchanged {
                device: "pump".into(),
                version: 2
            })
        );
        assert_eq!(m.version("pump"), Some(2));
    }

    #[test]
    fn a_swap_mid_episode_keeps_the_gate_and_the_aligner() {
        let mut m = models();
        let key = model_key("pump");
        m.offer(&key, &payload(&fitted("pump", 1)), none).unwrap();
        run(&mut m, "pump", 2000, 2100, |_| false);
        let hits = run(&mut m, "pump", 2100, 2150, |_| true);
        assert_eq!(hits.len(), 1);
        let before = m
            .by_device
            .get(m.by_device.find("pump").unwrap())
            .aligner
            .clone();
        assert_eq!(
            m.offer(&key, &payload(&fitted("pump", 2)), none),
            Ok(ModelOffer::Loaded {
                device: "pump".into(),
                version: 2,
                previous: Some(1)
            })
        );
        assert_eq!(
            m.by_device.get(m.by_device.find("pump").unwrap()).aligner,
            before
        );
        // The episode goes on under v2: no second event until it ends and re-arms.
        assert!(run(&mut m, "pump", 2150, 2200, |_| true).is_empty());
        run(&mut m, "pump", 2200, 2400, |_| false);
        let hits = run(&mut m, "pump", 2400, 2450, |_| true);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].2, 2, "the next episode names v2");
    }

    #[test]
    fn a_model_with_other_features_gets_a_fresh_aligner() {
        let mut m = models();
        let key = model_key("pump");
        m.offer(&key, &payload(&fitted("pump", 1)), none).unwrap();
        run(&mut m, "pump", 2000, 2010, |_| false);
        let mut two = fitted("pump", 2);
        two.features.swap(0, 1);
        m.offer(&key, &payload(&two), none).unwrap();
        let r = m.by_device.get(m.by_device.find("pump").unwrap());
        assert_eq!(r.aligner.features(), two.features.as_slice());
        assert!(r.aligner.vector().iter().all(|v| v.is_nan()));
    }

    #[test]
    fn bad_settings_are_errors() {
        let gate = GateConfig::default();
        for cfg in [
            ModelsConfig {
                threshold: 0.0,
                ..Default::default()
            },
            ModelsConfig {
                staleness_ms: 0,
                ..Default::default()
            },
            ModelsConfig {
                min_fill: f64::NAN,
                ..Default::default()
            },
        ] {
            assert!(DeviceModels::new(&cfg, &gate).is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn readings_that_cannot_be_scored_are_ignored() {
        let mut m = models();
        m.offer(&model_key("pump"), &payload(&fitted("pump", 1)), none)
            .unwrap();
        for v in [f64::NAN, f64::INFINITY, f64::MAX, -f64::MAX] {
            for f in FEATURES {
                // Huge values score (the model says how abnormal); NaN/inf never reach a slot.
                let hit = m.observe(&mut DeviceLink::default(), "pump", f, 5_000_000, v);
                if let Some(h) = hit {
                    assert!((0.0..=1.0).contains(&h.score), "{h:?}");
                    assert!(h.value.is_finite(), "{h:?}");
                }
            }
        }
        let mut link = DeviceLink::default();
        assert!(m
            .observe(&mut link, "pump", "unknown", 6_000_000, 1.0)
            .is_none());
        // The link remembers that the metric has no slot: no lookup on the next reading.
        assert_ne!(link, DeviceLink::default());
    }
}
