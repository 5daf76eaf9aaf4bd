//! Training samples on the agent, without I/O: per device, the device's readings aligned into
//! vectors over every metric it has shown (sorted by name) and a reservoir of them per training
//! period ([`DeviceSampler`]); a finished period becomes a [`TrainingSample`] for the partition's
//! training lane. A device with one metric has nothing to align and sends nothing. A new metric
//! restarts the device's period (with the new feature set); the state is not checkpointed, so a
//! restart loses at most the period in progress.

use super::table::{DeviceTable, Link};
use edgewatch_models::multi::{AlignConfig, Aligner, DeviceSampler, SamplerConfig};
use edgewatch_models::wire::{TrainingSample, MAX_TRAINING_FEATURES};

/// One device's aligner and sampler.
struct Sampled {
    partition: u32,
    aligner: Aligner,
    sampler: DeviceSampler,
}

impl Sampled {
    /// Pushes a reading into the aligner; offers the vector when it completes a round.
    #[inline]
    fn push(&mut self, slot: usize, ts_ms: i64, value: f64) -> Option<(u32, TrainingSample)> {
        if self.aligner.features().len() < 2 || !self.aligner.push(slot, ts_ms, value) {
            return None;
        }
        let sample = self.sampler.offer(ts_ms, self.aligner.vector())?;
        Some((self.partition, sample))
    }
}

/// Every sampled device.
pub(crate) struct Sampling {
    cfg: SamplerConfig,
    align: AlignConfig,
    max_devices: usize,
    devices: DeviceTable<Sampled>,
}

impl Sampling {
    /// Sampling with validated settings.
    pub(crate) fn new(cfg: SamplerConfig, align: AlignConfig, max_devices: usize) -> Self {
        Self {
            cfg,
            align,
            max_devices,
            devices: DeviceTable::new(),
        }
    }

    /// Devices sampled.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.devices.len()
    }

    fn build(&self, device: &str, partition: u32, features: Vec<String>) -> Option<Sampled> {
        let aligner = Aligner::new(&features, &self.align).ok()?;
        Some(Sampled {
            partition,
            aligner,
            sampler: DeviceSampler::new(device, features, &self.cfg),
        })
    }

    /// Feeds one reading of a series (`link`: its cached place in the device table); returns
    /// `(partition, sample)` when it closes a period. No hashing once the link is resolved.
    #[inline]
    pub(crate) fn observe(
        &mut self,
        link: &mut Link,
        device: &str,
        metric: &str,
        partition: u32,
        ts_ms: i64,
        value: f64,
    ) -> Option<(u32, TrainingSample)> {
        let (ix, slot) = match self.devices.link(link, device, |d| d.aligner.slot(metric)) {
            Some(found) => found,
            None => self.add(link, device, metric, partition)?,
        };
        self.devices.get_mut(ix).push(slot, ts_ms, value)
    }

    /// A device or metric not sampled yet: a new device starts with this metric (nothing to
    /// align), a known one is rebuilt with it added (features stay sorted). `None` at the limits
    /// ([`MAX_TRAINING_FEATURES`], `max_devices`).
    #[cold]
    fn add(
        &mut self,
        link: &mut Link,
        device: &str,
        metric: &str,
        partition: u32,
    ) -> Option<(usize, usize)> {
        let Some(ix) = self.devices.find(device) else {
            if self.devices.len() < self.max_devices {
                if let Some(d) = self.build(device, partition, vec![metric.to_string()]) {
                    self.devices.insert(device, d);
                }
            }
            return None;
        };
        let d = self.devices.get(ix);
        let mut features = d.aligner.features().to_vec();
        if features.len() >= MAX_TRAINING_FEATURES || features.iter().any(|f| f == metric) {
            return None;
        }
        features.push(metric.to_string());
        features.sort_unstable();
        let rebuilt = self.build(device, d.partition, features)?;
        self.devices.replace(ix, rebuilt);
        self.devices.link(link, device, |d| d.aligner.slot(metric))
    }

    /// An anomaly event of `device` at `ts_ms`: its period is left out of training.
    pub(crate) fn note_anomaly(&mut self, link: &Link, device: &str, ts_ms: i64) {
        if let Some(ix) = self.devices.index_of(link, device) {
            self.devices.get_mut(ix).sampler.note_anomaly(ts_ms);
        }
    }

    /// Closes the periods that ended at least a whole period before `now_ms` (devices that went
    /// quiet still send their last period), pushing `(partition, sample)` into `out`.
    pub(crate) fn expire(&mut self, now_ms: i64, out: &mut Vec<(u32, TrainingSample)>) {
        let grace = self.cfg.period_ms;
        for d in self.devices.values_mut() {
            if let Some(s) = d.sampler.expire(now_ms, grace) {
                out.push((d.partition, s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sampling with the series links a pipeline would keep.
    struct Fed {
        s: Sampling,
        links: std::collections::HashMap<(String, String), Link>,
    }

    impl Fed {
        fn observe(
            &mut self,
            device: &str,
            metric: &str,
            partition: u32,
            ts_ms: i64,
            value: f64,
        ) -> Option<(u32, TrainingSample)> {
            let link = self
                .links
                .entry((device.into(), metric.into()))
                .or_default();
            self.s
                .observe(link, device, metric, partition, ts_ms, value)
        }

        fn note_anomaly(&mut self, device: &str, ts_ms: i64) {
            self.s.note_anomaly(&Link::default(), device, ts_ms);
        }

        fn expire(&mut self, now_ms: i64, out: &mut Vec<(u32, TrainingSample)>) {
            self.s.expire(now_ms, out);
        }

        fn len(&self) -> usize {
            self.s.len()
        }
    }

    fn sampling() -> Fed {
        Fed {
            s: sampling_only(),
            links: Default::default(),
        }
    }

    fn sampling_only() -> Sampling {
        Sampling::new(
            SamplerConfig {
                period_ms: 60_000,
                capacity: 16,
                min_rows: 4,
            },
            AlignConfig::default(),
            3,
        )
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
