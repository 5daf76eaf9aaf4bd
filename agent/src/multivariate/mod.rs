//! Multivariate device models on the agent, without I/O: which model runs for which device, the
//! checks an incoming model must pass before it is swapped in, and per-reading scoring (the device's
//! `Aligner` → `PcaScorer` → `EventGate`), together with the device's training sampler
//! (`training.rs`), which shares the model's aligner when their features agree (`device.rs`).
//! Models arrive from the uplink broker or from disk (`store.rs`); the pipeline calls
//! [`DeviceModels::observe`] for every reading.

mod device;
pub(crate) mod store;
mod table;
pub(crate) mod training;

use device::Device;
use table::{DeviceTable, Link, Slots};

use crate::config::ModelsConfig;
use crate::telemetry::ModelRefusal;
use edgewatch_models::detect::{EventGate, GateConfig};
use edgewatch_models::multi::{Aligner, PcaModel};
use edgewatch_models::wire::{model_key, TrainingSample};
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

/// What one reading gave: a `pca` onset, and a training sample whose period it closed (boxed:
/// rare, and the result of every reading stays small).
#[derive(Debug, Default)]
pub(crate) struct Observed<'a> {
    pub hit: Option<Hit<'a>>,
    pub sample: Option<Box<(u32, TrainingSample)>>,
}

/// A series' cached place in the device table (model and sampling): not checkpointed, resolved
/// again (one hash lookup) after a restore or when its device's entry changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeviceLink(Link);

/// Every device's model and training sampler. Empty until a model is accepted or (with
/// sampling) a reading arrives; a device without a model keeps univariate detection only.
pub(crate) struct DeviceModels {
    align: edgewatch_models::multi::AlignConfig,
    /// A fresh gate at `models.threshold` with the `anomaly:` re-arm rules.
    gate: EventGate,
    devices: DeviceTable<Device>,
    /// Devices with a model.
    models: usize,
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
        let sampling =
            (cfg.enabled && t.enabled).then(|| training::Sampling::new(t.sampler(), t.max_devices));
        Ok(Self {
            align,
            gate,
            devices: DeviceTable::new(),
            models: 0,
            sampling,
        })
    }

    /// An anomaly event of `device` (any detector): its training period is left out.
    pub(crate) fn note_anomaly(&mut self, link: &DeviceLink, device: &str, ts_ms: i64) {
        if self.sampling.is_none() {
            return;
        }
        if let Some(ix) = self.devices.index_of(&link.0, device) {
            if let Some(s) = &mut self.devices.get_mut(ix).sampled {
                s.sampler.note_anomaly(ts_ms);
            }
        }
    }

    /// Training periods that ended a whole period before `now_ms` (see [`training::Sampling::expire`]).
    pub(crate) fn expire_samples(&mut self, now_ms: i64, out: &mut Vec<(u32, TrainingSample)>) {
        if let Some(s) = &self.sampling {
            s.expire(self.devices.values_mut(), now_ms, out);
        }
    }

    /// Models running.
    pub(crate) fn len(&self) -> usize {
        self.models
    }

    /// Version of the model running for `device`.
    pub(crate) fn version(&self, device: &str) -> Option<u64> {
        let ix = self.devices.find(device)?;
        Some(self.devices.get(ix).model.as_ref()?.model.version)
    }

    /// Checks a model received under `key` (the topic's or file's key) and swaps it in. `metrics`
    /// are the metric names the agent has seen for the model's device (empty: none yet, and then
    /// any features are accepted). Refused: a payload that is not a model, an invalid one, a key
    /// that is not [`model_key`] of its device, a version not newer than the running one, or a
    /// feature the device does not have. On a swap the device's aligner is kept when the features
    /// are the same, and so is the one the device's sampler shares with a model of its features
    /// (otherwise the model gets a fresh one: it refills within one reading interval); its event
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
        let found = self.devices.find(model.key.as_str());
        let running = found.and_then(|ix| self.devices.get(ix).model.as_ref());
        if let Some(r) = running {
            if *r.model == model {
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
        let invalid = |e: ModelError| refused(ModelRefusal::Invalid, format!("{name}: {e}"));
        // Aligners are built before the swap: an error leaves the running model as it was.
        match found {
            Some(ix) => {
                self.devices
                    .get_mut(ix)
                    .set_model(model, &self.gate, &self.align)
                    .map_err(invalid)?;
                // The features (and so the slots) may have moved.
                self.devices.touch(ix);
            }
            None => {
                let d = Device::modelled(model, self.gate.clone(), &self.align).map_err(invalid)?;
                self.devices.insert(device.as_str(), d);
            }
        }
        if previous.is_none() {
            self.models += 1;
        }
        Ok(ModelOffer::Loaded {
            device,
            version,
            previous,
        })
    }

    /// Feeds one reading to its device: once into the aligner the model and the sampler share
    /// (or into each one's when their features differ), then the model scores the vector it
    /// completes and the sampler takes it. Returns what to report when the vector starts an
    /// episode, and the training sample of a period it closes. Allocates nothing unless it closes
    /// a period or the device or metric is new to sampling.
    #[inline]
    pub(crate) fn observe(
        &mut self,
        link: &mut DeviceLink,
        device: &str,
        metric: &str,
        partition: u32,
        ts_ms: i64,
        value: f64,
    ) -> Observed<'_> {
        let found = self.devices.link(&mut link.0, device, |d| d.slots(metric));
        let (ix, slots) = match (found, &self.sampling) {
            (Some((ix, slots)), None) => (ix, slots),
            (Some((ix, slots)), Some(_)) if slots.first().is_some() && slots.sampled() => {
                (ix, slots)
            }
            (found, Some(_)) => {
                match self.add(&mut link.0, device, metric, partition, found.map(|f| f.0)) {
                    Some(found) => found,
                    None => return Observed::default(),
                }
            }
            (None, None) => return Observed::default(),
        };
        let d = self.devices.get_mut(ix);
        let released = d.push(slots, ts_ms, value);
        if released == device::Released::default() {
            // Inside a round: nothing more to do (most readings).
            return Observed::default();
        }
        Self::round(d, released, ts_ms)
    }

    /// The rest of [`DeviceModels::observe`] for a reading that completed a vector: once a round,
    /// out of line so the code every reading runs stays small.
    #[inline(never)]
    fn round(d: &mut Device, released: device::Released, ts_ms: i64) -> Observed<'_> {
        let mut onset = None;
        if released.model {
            if let Some(s) = d.score() {
                if !s.armed {
                    // The whole episode, not only its onset, is left out of training.
                    if let Some(sampled) = &mut d.sampled {
                        sampled.sampler.note_anomaly(ts_ms);
                    }
                }
                onset = s.onset;
            }
        }
        let sample = if released.shared {
            d.offer_sample(ts_ms)
        } else {
            None
        };
        let d = &*d;
        let hit = onset.and_then(|(score, top)| {
            let r = d.model.as_ref()?;
            Some(Hit {
                metric: r.model.features.get(top)?,
                value: d.model_vector().get(top).copied()?,
                score: if score.is_finite() {
                    score.clamp(0.0, 1.0)
                } else {
                    0.0
                },
                version: r.model.version,
            })
        });
        Observed {
            hit,
            sample: sample.map(Box::new),
        }
    }

    /// A device or metric not sampled yet (`ix`: the device's entry, if it has one): a new device
    /// starts with this metric (nothing to align), a known one is sampled with it added (features
    /// stay sorted). Returns the reading's place when it has a slot to go to. Nothing changes at
    /// the limits ([`edgewatch_models::wire::MAX_TRAINING_FEATURES`], `max_devices`).
    #[cold]
    fn add(
        &mut self,
        link: &mut Link,
        device: &str,
        metric: &str,
        partition: u32,
        ix: Option<usize>,
    ) -> Option<(usize, Slots)> {
        let sampling = self.sampling.as_mut()?;
        let Some(ix) = ix else {
            if sampling.has_room() {
                let features = vec![metric.to_string()];
                if let Ok(d) = sampling.device(device, partition, features, &self.align) {
                    self.devices.insert(device, d);
                    sampling.added();
                }
            }
            return None;
        };
        let d = self.devices.get_mut(ix);
        let newly = d.sampled.is_none();
        if newly && !sampling.has_room() {
            // Not sampled: the model alone.
            return self.devices.link(link, device, |d| d.slots(metric));
        }
        if let Some(features) = training::with_metric(d.sampled_features(), metric) {
            if sampling
                .resample(d, device, partition, features, &self.align)
                .is_ok()
            {
                if newly {
                    sampling.added();
                }
                self.devices.touch(ix);
            }
        }
        let (ix, slots) = self.devices.link(link, device, |d| d.slots(metric))?;
        (slots.first().is_some() || slots.second().is_some()).then_some((ix, slots))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use edgewatch_models::multi::FitOptions;
    use edgewatch_models::wire::TrainingSample;

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
        fitted_over(device, version, &FEATURES)
    }

    /// [`fitted`] over `features` (some of [`FEATURES`], in any order).
    pub(crate) fn fitted_over(device: &str, version: u64, features: &[&str]) -> PcaModel {
        let features: Vec<String> = features.iter().map(|f| f.to_string()).collect();
        let mut aligner = Aligner::new(&features, &Default::default()).unwrap();
        let mut rows = Vec::new();
        for i in 0..2000 {
            for (j, f) in FEATURES.iter().enumerate() {
                let Some(slot) = aligner.slot(f) else {
                    continue;
                };
                if aligner.push(slot, i * 1000 + j as i64, reading(i, j, false)) {
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

    /// The aligner the model of `device` scores.
    fn aligner<'a>(m: &'a DeviceModels, device: &str) -> &'a Aligner {
        let d = m.devices.get(m.devices.find(device).unwrap());
        d.model_aligner().unwrap()
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
                let seen = m.observe(&mut links[j], device, f, 0, i * 1000 + j as i64, v);
                if let Some(h) = seen.hit {
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
        let before = aligner(&m, "pump").clone();
        assert_eq!(
            m.offer(&key, &payload(&fitted("pump", 2)), none),
            Ok(ModelOffer::Loaded {
                device: "pump".into(),
                version: 2,
                previous: Some(1)
            })
        );
        assert_eq!(aligner(&m, "pump"), &before);
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
        let a = aligner(&m, "pump");
        assert_eq!(a.features(), two.features.as_slice());
        assert!(a.vector().iter().all(|v| v.is_nan()));
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
                let seen = m.observe(&mut DeviceLink::default(), "pump", f, 0, 5_000_000, v);
                if let Some(h) = seen.hit {
                    assert!((0.0..=1.0).contains(&h.score), "{h:?}");
                    assert!(h.value.is_finite(), "{h:?}");
                }
            }
        }
        let mut link = DeviceLink::default();
        let seen = m.observe(&mut link, "pump", "unknown", 0, 6_000_000, 1.0);
        assert!(seen.hit.is_none() && seen.sample.is_none());
        // The link remembers that the metric has no slot: no lookup on the next reading.
        assert_ne!(link, DeviceLink::default());
    }

    /// (step, metric, version, score) of events.
    type Events = Vec<(i64, String, u64, f64)>;

    /// Steps `from..to` of `device` through a sampling `Fed`: (step, metric, version, score) of
    /// every event, and the samples.
    fn run_sampled(
        f: &mut training::tests::Fed,
        device: &str,
        from: i64,
        to: i64,
        broken: impl Fn(i64) -> bool,
    ) -> (Events, Vec<TrainingSample>) {
        let (mut hits, mut samples) = (Vec::new(), Vec::new());
        for i in from..to {
            for (j, metric) in FEATURES.iter().enumerate() {
                let v = reading(i, j, broken(i));
                let mut link = *f.link(device, metric);
                let seen =
                    f.m.observe(&mut link, device, metric, 0, i * 1000 + j as i64, v);
                if let Some(h) = seen.hit {
                    hits.push((i, h.metric.to_string(), h.version, h.score));
                }
                samples.extend(seen.sample.map(|b| b.1));
                *f.link(device, metric) = link;
            }
        }
        (hits, samples)
    }

    fn breaks(i: i64) -> bool {
        (2400..2500).contains(&i) || (2700..2800).contains(&i)
    }

    /// A model over the sampled features (the device's metrics, sorted) scores the aligner the
    /// sampler takes its vectors from: one aligner, and the same events as without sampling.
    #[test]
    fn a_model_of_the_sampled_features_shares_the_samplers_aligner() {
        let mut sorted = FEATURES;
        sorted.sort_unstable();
        let model = payload(&fitted_over("pump", 1, &sorted));
        let key = model_key("pump");
        let mut alone = models();
        alone.offer(&key, &model, none).unwrap();
        let want = run(&mut alone, "pump", 2000, 3000, breaks);
        assert_eq!(want.len(), 2, "{want:?}");
        // Offered before the first reading, as at a start with stored models: while the
        // device's metrics appear the model keeps its own aligner, then the sampler takes it.
        let mut f = training::tests::sampling();
        f.m.offer(&key, &model, none).unwrap();
        let (hits, samples) = run_sampled(&mut f, "pump", 2000, 3000, breaks);
        assert_eq!(hits, want);
        let d = f.m.devices.get(f.m.devices.find("pump").unwrap());
        assert!(d.shares(), "one aligner for the model and the sampler");
        assert_eq!(d.sampled_features(), sorted.map(String::from));
        // A sample a minute, breaks counted; every row a whole round of one step.
        assert!(samples.len() >= 15, "{}", samples.len());
        for s in &samples {
            s.check().unwrap();
            assert_eq!(s.features, sorted.map(String::from));
        }
        assert!(samples.iter().any(|s| s.anomalies > 0));
        // Offered mid-stream to a sampled device: it shares the sampler's aligner at once.
        let mut f = training::tests::sampling();
        run_sampled(&mut f, "pump", 2000, 2200, |_| false);
        f.m.offer(&key, &model, none).unwrap();
        let d = f.m.devices.get(f.m.devices.find("pump").unwrap());
        assert!(d.shares());
        assert!(
            d.model_vector().iter().all(|v| v.is_finite()),
            "nothing to refill"
        );
        let (hits, _) = run_sampled(&mut f, "pump", 2200, 3000, breaks);
        assert_eq!(hits, want);
    }

    /// A model over a subset of the sampled metrics, or in another order, keeps an aligner of
    /// its own: its events are those without sampling, and the sampler still sends all metrics.
    #[test]
    fn a_model_of_other_features_keeps_its_own_aligner_beside_the_samplers() {
        let key = model_key("pump");
        for features in [&FEATURES[..], &["pressure", "flow"][..]] {
            let model = payload(&fitted_over("pump", 1, features));
            let mut alone = models();
            alone.offer(&key, &model, none).unwrap();
            let want = run(&mut alone, "pump", 2000, 3000, breaks);
            let mut f = training::tests::sampling();
            run_sampled(&mut f, "pump", 1990, 2000, |_| false);
            f.m.offer(&key, &model, none).unwrap();
            let (hits, samples) = run_sampled(&mut f, "pump", 2000, 3000, breaks);
            // Offered 10 s into the stream against a fresh aligner in both runs.
            assert_eq!(hits, want, "{features:?}");
            assert!(!want.is_empty() || features.len() == 2, "{features:?}");
            let d = f.m.devices.get(f.m.devices.find("pump").unwrap());
            assert!(!d.shares(), "{features:?}");
            assert_eq!(d.sampled_features().len(), 3);
            assert!(samples.iter().all(|s| s.features.len() == 3));
            assert!(!samples.is_empty());
        }
    }

    /// A device beyond the sampling limit is not sampled; its model still scores it.
    #[test]
    fn a_model_runs_on_a_device_beyond_the_sampling_limit() {
        let mut f = training::tests::sampling();
        for d in ["a", "b", "c"] {
            f.observe(d, "x", 0, 0, 1.0);
        }
        let key = model_key("pump");
        f.m.offer(&key, &payload(&fitted("pump", 1)), none).unwrap();
        let (hits, samples) = run_sampled(&mut f, "pump", 2000, 3000, breaks);
        assert_eq!(hits.len(), 2, "{hits:?}");
        assert!(samples.is_empty());
        let d = f.m.devices.get(f.m.devices.find("pump").unwrap());
        assert!(d.sampled.is_none() && d.shares());
        assert_eq!(f.m.len(), 1);
    }
}
