//! Training samples on the agent, without I/O: per device, the device's readings aligned into
//! vectors over every metric it has shown (sorted by name) and a reservoir of them per training
//! period (`DeviceSampler`); a finished period becomes a [`TrainingSample`] for the partition's
//! training lane. A device with one metric has nothing to align and sends nothing. A new metric
//! restarts the device's period (with the new feature set); the state is not checkpointed, so a
//! restart loses at most the period in progress. The aligner lives with the device's model
//! (`device.rs`), which shares it when its features are the sampled ones; this file holds the
//! sampling's settings and limits.

use super::device::Device;
use edgewatch_models::multi::{AlignConfig, SamplerConfig};
use edgewatch_models::wire::{TrainingSample, MAX_TRAINING_FEATURES};
use edgewatch_models::ModelError;

/// The sampling's settings and how many devices it holds.
pub(crate) struct Sampling {
    cfg: SamplerConfig,
    max_devices: usize,
    /// Devices sampled.
    sampled: usize,
}

impl Sampling {
    /// Sampling with validated settings.
    pub(crate) fn new(cfg: SamplerConfig, max_devices: usize) -> Self {
        Self {
            cfg,
            max_devices,
            sampled: 0,
        }
    }

    /// Devices sampled.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.sampled
    }

    /// Whether another device may be sampled (`max_devices`).
    pub(super) fn has_room(&self) -> bool {
        self.sampled < self.max_devices
    }

    /// Counts a device that started being sampled.
    pub(super) fn added(&mut self) {
        self.sampled += 1;
    }

    /// A new sampled device over `features`.
    pub(super) fn device(
        &self,
        device: &str,
        partition: u32,
        features: Vec<String>,
        align: &AlignConfig,
    ) -> Result<Device, ModelError> {
        Device::sampled(device, partition, features, align, &self.cfg)
    }

    /// Samples `d` over `features` from now on (see [`Device::resample`]).
    pub(super) fn resample(
        &self,
        d: &mut Device,
        device: &str,
        partition: u32,
        features: Vec<String>,
        align: &AlignConfig,
    ) -> Result<(), ModelError> {
        d.resample(device, partition, features, align, &self.cfg)
    }

    /// Closes the periods that ended at least a whole period before `now_ms` (devices that went
    /// quiet still send their last period), pushing `(partition, sample)` into `out`.
    pub(super) fn expire<'a>(
        &self,
        devices: impl Iterator<Item = &'a mut Device>,
        now_ms: i64,
        out: &mut Vec<(u32, TrainingSample)>,
    ) {
        let grace = self.cfg.period_ms;
        for s in devices.filter_map(|d| d.sampled.as_mut()) {
            if let Some(sample) = s.sampler.expire(now_ms, grace) {
                out.push((s.partition, sample));
            }
        }
    }
}

/// The sampled `features` with `metric` added, sorted; `None` when it is one of them already or
/// the device has [`MAX_TRAINING_FEATURES`].
pub(super) fn with_metric(features: &[String], metric: &str) -> Option<Vec<String>> {
    if features.len() >= MAX_TRAINING_FEATURES || features.iter().any(|f| f == metric) {
        return None;
    }
    let mut features = features.to_vec();
    features.push(metric.to_string());
    features.sort_unstable();
    Some(features)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    use crate::config::ModelsConfig;
    use crate::multivariate::{DeviceLink, DeviceModels};
    use edgewatch_models::detect::GateConfig;

    /// Sampling (in the agent's device models) with the series links a pipeline would keep.
    pub(in crate::multivariate) struct Fed {
        pub(in crate::multivariate) m: DeviceModels,
        links: std::collections::HashMap<(String, String), DeviceLink>,
    }

    impl Fed {
        pub(in crate::multivariate) fn link(
            &mut self,
            device: &str,
            metric: &str,
        ) -> &mut DeviceLink {
            self.links
                .entry((device.into(), metric.into()))
                .or_default()
        }

        pub(in crate::multivariate) fn observe(
            &mut self,
            device: &str,
            metric: &str,
            partition: u32,
            ts_ms: i64,
            value: f64,
        ) -> Option<(u32, TrainingSample)> {
            let mut link = *self.link(device, metric);
            let sample = self
                .m
                .observe(&mut link, device, metric, partition, ts_ms, value)
                .sample
                .map(|b| *b);
            *self.link(device, metric) = link;
            sample
        }

        fn note_anomaly(&mut self, device: &str, ts_ms: i64) {
            self.m.note_anomaly(&DeviceLink::default(), device, ts_ms);
        }

        fn expire(&mut self, now_ms: i64, out: &mut Vec<(u32, TrainingSample)>) {
            self.m.expire_samples(now_ms, out);
        }

        fn len(&self) -> usize {
            self.m.sampling.as_ref().map_or(0, Sampling::len)
        }
    }

    /// Sampling of at most 3 devices, 16 rows of a minute each (4 needed).
    pub(in crate::multivariate) fn sampling() -> Fed {
        let mut cfg = ModelsConfig {
            enabled: true,
            ..Default::default()
        };
        cfg.training.enabled = true;
        cfg.training.period_ms = 60_000;
        cfg.training.samples = 16;
        cfg.training.min_rows = 4;
        cfg.training.max_devices = 3;
        Fed {
            m: DeviceModels::new(&cfg, &GateConfig::default()).unwrap(),
            links: Default::default(),
        }
    }

    /// Two metrics, one reading each per second: a sample per minute of event time, with the
    /// features sorted and every row a vector of both.
    #[test]
    fn a_device_sends_one_sample_per_period_with_sorted_features() {
        let mut s = sampling();
        let mut out = Vec::new();
        for i in 0..150i64 {
            for (m, v) in [("temp", 20.0 + i as f64), ("flow", 3.0 * i as f64)] {
                if let Some(x) = s.observe("pump", m, 7, i * 1000, v) {
                    out.push(x);
                }
            }
        }
        assert_eq!(out.len(), 2, "minutes 0 and 1 closed, minute 2 open");
        let (p, first) = &out[0];
        assert_eq!(*p, 7);
        assert_eq!(first.features, ["flow", "temp"]);
        assert_eq!((first.from_ms, first.to_ms), (0, 60_000));
        assert_eq!(first.rows.len(), 16);
        first.check().unwrap();
        for r in &first.rows {
            // flow = 3 i and temp = 20 + i of the same (or the previous) second.
            let i = r[1] - 20.0;
            assert!((r[0] - 3.0 * i).abs() <= 3.0, "{r:?}");
        }
        // The open period is sent once the clock is a whole period past its end.
        let mut late = Vec::new();
        s.expire(240_000 - 1, &mut late);
        assert!(late.is_empty());
        s.expire(240_000, &mut late);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].1.from_ms, 120_000);
    }

    /// One metric aligns nothing; a device limit holds; an anomaly marks the period.
    #[test]
    fn single_metric_devices_send_nothing_and_the_device_limit_holds() {
        let mut s = sampling();
        for i in 0..200i64 {
            assert!(s.observe("lonely", "temp", 0, i * 1000, 1.0).is_none());
        }
        for d in ["a", "b", "c", "d"] {
            s.observe(d, "x", 0, 0, 1.0);
        }
        assert_eq!(s.len(), 3, "lonely, a and b; c and d over the limit");
        let mut s = sampling();
        let mut out = Vec::new();
        for i in 0..70i64 {
            if i == 10 {
                s.note_anomaly("pump", i * 1000);
            }
            for m in ["a", "b"] {
                out.extend(s.observe("pump", m, 0, i * 1000, i as f64));
            }
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1.anomalies, 1);
    }
}
