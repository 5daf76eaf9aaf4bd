//! The agent side of training: a bounded, uniform random sample (reservoir, Algorithm R) of one
//! device's aligned vectors per event-time period, closed into a [`TrainingSample`] when the period
//! ends. Deterministic: the generator is seeded from the device and the period, so the same stream
//! always gives the same sample.

use crate::wire::{TrainingSample, MAX_TRAINING_ROWS};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Parameters of a [`DeviceSampler`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// Length of a training period in event time (ms), > 0. Periods are `[k·period_ms, (k+1)·period_ms)`.
    pub period_ms: i64,
    /// Most rows kept per period, 1 to [`MAX_TRAINING_ROWS`].
    pub capacity: usize,
    /// Fewest rows a period needs to be sent, 1 to `capacity`; a period with fewer is dropped.
    pub min_rows: usize,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            period_ms: 3_600_000,
            capacity: 256,
            min_rows: 32,
        }
    }
}

impl SamplerConfig {
    /// Whether the parameters are usable; `Err` names the first field that is not, with its value.
    pub fn check(&self) -> Result<(), String> {
        if self.period_ms <= 0 {
            return Err(format!("period_ms must be > 0, got {}", self.period_ms));
        }
        if self.capacity == 0 || self.capacity > MAX_TRAINING_ROWS {
            return Err(format!(
                "capacity must be 1 to {MAX_TRAINING_ROWS}, got {}",
                self.capacity
            ));
        }
        if self.min_rows == 0 || self.min_rows > self.capacity {
            return Err(format!(
                "min_rows must be 1 to capacity ({}), got {}",
                self.capacity, self.min_rows
            ));
        }
        Ok(())
    }
}

/// The open period's event times when none is open (an empty range).
const NO_PERIOD: (i64, i64) = (1, 0);

/// One device's reservoir of aligned vectors for the current period. See [`DeviceSampler::offer`].
#[derive(Debug, Clone)]
pub struct DeviceSampler {
    device: String,
    features: Vec<String>,
    period_ms: i64,
    capacity: usize,
    min_rows: usize,
    /// XXH3-64 of the device name; the period's generator starts from it.
    device_hash: u64,
    /// Index of the open period, if any.
    period: Option<i64>,
    /// Event times of the open period, `[from, to)` (empty when none is open or its bounds
    /// overflow): an offer inside them needs no division to find its period.
    open_ms: (i64, i64),
    /// Index of the last closed period: vectors of it or earlier are ignored.
    closed: Option<i64>,
    /// Finite vectors of the right length offered in the open period.
    seen: u64,
    /// Anomalies noted in the open period.
    anomalies: u32,
    /// Anomalies noted for a period after the open one: (period index, count).
    pending: Option<(i64, u32)>,
    /// xorshift64* state of the open period.
    rng: u64,
    /// Rows held, `filled × features.len()` values of `buf`.
    filled: usize,
    /// The reservoir, row-major; its allocation is kept from period to period.
    buf: Vec<f64>,
}

impl DeviceSampler {
    /// A sampler for `device`'s vectors of `features`. `cfg` should pass [`SamplerConfig::check`];
    /// out-of-range values are clamped into range so the sampler never panics.
    pub fn new(device: &str, features: Vec<String>, cfg: &SamplerConfig) -> Self {
        let capacity = cfg.capacity.clamp(1, MAX_TRAINING_ROWS);
        Self {
            device: device.to_owned(),
            features,
            period_ms: cfg.period_ms.max(1),
            capacity,
            min_rows: cfg.min_rows.clamp(1, capacity),
            device_hash: xxh3_64(device.as_bytes()),
            period: None,
            open_ms: NO_PERIOD,
            closed: None,
            seen: 0,
            anomalies: 0,
            pending: None,
            rng: 0,
            filled: 0,
            buf: Vec::new(),
        }
    }

    /// The metric names, in the order of every vector's values.
    pub fn features(&self) -> &[String] {
        &self.features
    }

    /// Offers one aligned vector (`vector.len() == features.len()`, the caller guarantees it) at
    /// event time `ts_ms`.
    ///
    /// A vector of a later period than the open one closes it and returns its sample (if it holds
    /// at least `min_rows` rows; otherwise `None` and the period is dropped), then opens the new
    /// period with this vector. A vector of an earlier period than the open one, or of a period
    /// already closed (see [`DeviceSampler::expire`]), is ignored and returns `None`. A vector with a
    /// NaN or infinite value (an aligner slot not fresh) or of the wrong length moves time on like
    /// any other but is neither sampled nor counted in `seen`, so every sample passes
    /// [`TrainingSample::check`].
    ///
    /// Sampling is Algorithm R over the period's vectors with a xorshift64* generator seeded from
    /// XXH3-64(device) XOR the period index (through a splitmix64 finaliser); once the reservoir
    /// buffer exists an offer does not allocate (only closing a period does, to build the sample).
    pub fn offer(&mut self, ts_ms: i64, vector: &[f64]) -> Option<TrainingSample> {
        let k = self.period_of(ts_ms);
        let mut out = None;
        match self.period {
            Some(open) if k < open => return None,
            Some(open) if k > open => {
                out = self.close();
                self.open(k);
            }
            Some(_) => {}
            None if self.closed.is_some_and(|c| k <= c) => return None,
            None => self.open(k),
        }
        let n = self.features.len();
        if n == 0 || vector.len() != n || vector.iter().any(|v| !v.is_finite()) {
            return out;
        }
        let i = self.seen;
        self.seen += 1;
        if self.filled < self.capacity {
            self.buf.extend_from_slice(vector);
            self.filled += 1;
        } else {
            // A uniform index in 0..=i (multiply-high: no modulo bias worth the name).
            let j = ((u128::from(self.next_u64()) * u128::from(i + 1)) >> 64) as usize;
            if j < self.capacity {
                self.buf[j * n..(j + 1) * n].copy_from_slice(vector);
            }
        }
        out
    }

    /// Counts an anomaly event of the device at event time `ts_ms`. An event of the open period is
    /// counted into it. An event of a later period (or any period while none is open) is remembered
    /// as pending for that period and counted into it when a vector opens it; only the latest such
    /// future period is remembered (a later one replaces an earlier one, which would open first only
    /// if vectors ran behind events by more than a period). Events of an earlier or already
    /// closed period are ignored: its sample is gone.
    pub fn note_anomaly(&mut self, ts_ms: i64) {
        let k = ts_ms.div_euclid(self.period_ms);
        if self.period == Some(k) {
            self.anomalies = self.anomalies.saturating_add(1);
        } else if self.period.is_none_or(|open| k > open) && self.closed.is_none_or(|c| k > c) {
            match &mut self.pending {
                Some((p, count)) if *p == k => *count = count.saturating_add(1),
                Some((p, _)) if *p > k => {}
                pending => *pending = Some((k, 1)),
            }
        }
    }

    /// Closes the open period if `now_ms` (the agent's clock, comparable with event time) is at or
    /// past its end plus `grace_ms`, returning its sample if it holds at least `min_rows` rows — so a
    /// device that stops still sends its last period. Vectors of that period arriving later are ignored.
    pub fn expire(&mut self, now_ms: i64, grace_ms: i64) -> Option<TrainingSample> {
        let open = self.period?;
        let (_, to_ms) = self.bounds(open);
        if now_ms >= to_ms.saturating_add(grace_ms) {
            self.close()
        } else {
            None
        }
    }

    /// Approximate heap bytes held (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.device.capacity()
            + self.features.capacity() * std::mem::size_of::<String>()
            + self.features.iter().map(String::capacity).sum::<usize>()
            + self.buf.capacity() * std::mem::size_of::<f64>()
    }

    /// `[from_ms, to_ms)` of period `k` (saturating at the ends of time).
    fn bounds(&self, k: i64) -> (i64, i64) {
        let from = k.saturating_mul(self.period_ms);
        (from, from.saturating_add(self.period_ms))
    }

    /// The index of the period holding `ts_ms`: `ts_ms.div_euclid(period_ms)`, without the
    /// division for a time inside the open period.
    #[inline]
    fn period_of(&self, ts_ms: i64) -> i64 {
        match self.period {
            Some(open) if ts_ms >= self.open_ms.0 && ts_ms < self.open_ms.1 => open,
            _ => ts_ms.div_euclid(self.period_ms),
        }
    }

    /// Opens period `k`: an empty reservoir, its generator and any anomalies pending for it.
    #[cold]
    #[inline(never)]
    fn open(&mut self, k: i64) {
        self.period = Some(k);
        self.open_ms = k
            .checked_mul(self.period_ms)
            .and_then(|from| Some((from, from.checked_add(self.period_ms)?)))
            .unwrap_or(NO_PERIOD);
        self.seen = 0;
        self.filled = 0;
        self.buf.clear();
        if self.buf.capacity() == 0 {
            // Once, at the first period: kept from period to period.
            self.buf.reserve_exact(self.capacity * self.features.len());
        }
        self.anomalies = match self.pending {
            Some((p, count)) if p == k => count,
            _ => 0,
        };
        if self.pending.is_some_and(|(p, _)| p <= k) {
            self.pending = None;
        }
        // splitmix64's finaliser spreads neighbouring periods' seeds; xorshift needs a non-zero state.
        let mut z = (self.device_hash ^ k as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        self.rng = if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z };
    }

    /// Closes the open period: its sample if it has `min_rows` rows (and passes its check).
    #[cold]
    #[inline(never)]
    fn close(&mut self) -> Option<TrainingSample> {
        let k = self.period.take()?;
        self.open_ms = NO_PERIOD;
        self.closed = Some(k);
        let (from_ms, to_ms) = self.bounds(k);
        let n = self.features.len();
        let sample = (self.filled >= self.min_rows && n > 0).then(|| TrainingSample {
            device: self.device.clone(),
            features: self.features.clone(),
            from_ms,
            to_ms,
            seen: self.seen,
            anomalies: self.anomalies,
            rows: self.buf.chunks_exact(n).map(<[f64]>::to_vec).collect(),
        });
        self.seen = 0;
        self.anomalies = 0;
        self.filled = 0;
        self.buf.clear();
        sample.filter(|s| s.check().is_ok())
    }

    /// xorshift64*.
    fn next_u64(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn sampler(device: &str, capacity: usize, min_rows: usize) -> DeviceSampler {
        let cfg = SamplerConfig {
            period_ms: HOUR,
            capacity,
            min_rows,
        };
        cfg.check().unwrap();
        DeviceSampler::new(device, vec!["a".into(), "b".into()], &cfg)
    }

    /// Offers vectors `[i, -i]` for `i` in `range`, one per 100 ms from `start`; returns the samples.
    fn feed(
        s: &mut DeviceSampler,
        start: i64,
        range: std::ops::Range<usize>,
    ) -> Vec<TrainingSample> {
        range
            .filter_map(|i| s.offer(start + i as i64 * 100, &[i as f64, -(i as f64)]))
            .collect()
    }

    #[test]
    fn config_check_names_the_field() {
        SamplerConfig::default().check().unwrap();
        let bad = |f: fn(&mut SamplerConfig)| {
            let mut c = SamplerConfig::default();
            f(&mut c);
            c.check().unwrap_err()
        };
        assert_eq!(bad(|c| c.period_ms = 0), "period_ms must be > 0, got 0");
        assert!(bad(|c| c.capacity = 0).starts_with("capacity"));
        assert!(bad(|c| c.capacity = MAX_TRAINING_ROWS + 1).starts_with("capacity"));
        assert!(bad(|c| c.min_rows = 0).starts_with("min_rows"));
        assert!(bad(|c| c.min_rows = 257).starts_with("min_rows"));
    }

    #[test]
    fn reservoir_is_uniform_and_deterministic() {
        let (mut sum, mut count) = (0.0, 0usize);
        for d in 0..50 {
            let device = format!("pump-{d}");
            let mut s = sampler(&device, 100, 10);
            assert!(feed(&mut s, 0, 0..10_000).is_empty());
            let sample = s.expire(HOUR, 0).unwrap();
            sample.check().unwrap();
            assert_eq!((sample.seen, sample.rows.len()), (10_000, 100));
            let mut idx: Vec<f64> = sample.rows.iter().map(|r| r[0]).collect();
            for r in &sample.rows {
                assert_eq!(r[1], -r[0], "rows are whole vectors");
            }
            let mean = idx.iter().sum::<f64>() / 100.0;
            // One sample's mean: sd ≈ 2887 / √100 ≈ 289.
            assert!((mean - 5000.0).abs() < 1200.0, "{device}: mean {mean}");
            idx.sort_by(f64::total_cmp);
            idx.dedup();
            assert_eq!(idx.len(), 100, "no vector sampled twice");
            sum += mean * 100.0;
            count += 100;
            // Same stream, same sample.
            let mut again = sampler(&device, 100, 10);
            feed(&mut again, 0, 0..10_000);
            assert_eq!(again.expire(HOUR, 0).unwrap(), sample);
        }
        // 5000 sampled indices over 50 devices: sd of the mean ≈ 41.
        let mean = sum / count as f64;
        assert!((mean - 5000.0).abs() < 200.0, "overall mean {mean}");
        // Different devices draw different samples.
        let mut a = sampler("a", 100, 10);
        let mut b = sampler("b", 100, 10);
        feed(&mut a, 0, 0..10_000);
        feed(&mut b, 0, 0..10_000);
        assert_ne!(
            a.expire(HOUR, 0).unwrap().rows,
            b.expire(HOUR, 0).unwrap().rows
        );
    }

    #[test]
    fn a_later_period_closes_the_open_one() {
        let mut s = sampler("pump", 8, 4);
        assert!(feed(&mut s, 0, 0..20).is_empty());
        // The first vector of the next period returns the previous period's sample.
        let sample = s.offer(HOUR + 5, &[100.0, -100.0]).unwrap();
        sample.check().unwrap();
        assert_eq!(
            (sample.device.as_str(), sample.from_ms, sample.to_ms),
            ("pump", 0, HOUR)
        );
        assert_eq!((sample.seen, sample.rows.len()), (20, 8));
        assert!(sample.rows.iter().all(|r| r[0] < 20.0));
        assert_eq!(sample.features, s.features());
        // The new period started with that vector; skipping a period is fine too.
        let next = s.offer(3 * HOUR, &[1.0, 2.0]);
        assert_eq!(next, None, "one vector < min_rows: the period is dropped");
        feed(&mut s, 3 * HOUR, 0..4);
        let last = s.expire(4 * HOUR, 0).unwrap();
        assert_eq!((last.from_ms, last.seen, last.rows.len()), (3 * HOUR, 5, 5));
    }

    #[test]
    fn too_few_rows_drop_the_period() {
        let mut s = sampler("pump", 8, 4);
        feed(&mut s, 0, 0..3);
        assert_eq!(s.offer(HOUR, &[0.0, 0.0]), None);
        // Nothing of the dropped period leaks into the next one.
        feed(&mut s, HOUR, 1..4);
        let sample = s.expire(2 * HOUR, 0).unwrap();
        assert_eq!((sample.from_ms, sample.seen), (HOUR, 4));
    }

    #[test]
    fn old_and_invalid_vectors_are_ignored() {
        let mut s = sampler("pump", 8, 2);
        feed(&mut s, HOUR, 0..4);
        assert_eq!(s.offer(HOUR - 1, &[9.0, 9.0]), None, "earlier period");
        assert_eq!(s.offer(HOUR + 1, &[f64::NAN, 1.0]), None);
        assert_eq!(s.offer(HOUR + 1, &[f64::INFINITY, 1.0]), None);
        assert_eq!(s.offer(HOUR + 1, &[1.0]), None, "wrong length");
        let sample = s.expire(2 * HOUR, 0).unwrap();
        assert_eq!(sample.seen, 4);
        assert!(sample.rows.iter().all(|r| r[0] < 4.0));
        // After the period closed, its stragglers (and earlier periods) are ignored too.
        assert_eq!(s.offer(HOUR + 2, &[1.0, 1.0]), None);
        assert_eq!(s.expire(10 * HOUR, 0), None);
        // A NaN vector of a later period still opens it (time moves on).
        assert_eq!(s.offer(5 * HOUR, &[f64::NAN, 0.0]), None);
        feed(&mut s, 5 * HOUR, 0..2);
        assert_eq!(s.expire(6 * HOUR, 0).unwrap().seen, 2);
    }

    #[test]
    fn expire_waits_for_the_grace() {
        let mut s = sampler("pump", 8, 2);
        assert_eq!(s.expire(10 * HOUR, 0), None, "nothing open");
        feed(&mut s, 0, 0..5);
        assert_eq!(s.expire(HOUR - 1, 0), None);
        assert_eq!(s.expire(HOUR + 59_999, 60_000), None);
        let sample = s.expire(HOUR + 60_000, 60_000).unwrap();
        assert_eq!((sample.from_ms, sample.to_ms, sample.seen), (0, HOUR, 5));
        assert_eq!(s.expire(HOUR + 60_000, 60_000), None, "closed once");
        // A period with too few rows expires to nothing.
        feed(&mut s, HOUR, 0..1);
        assert_eq!(s.expire(2 * HOUR, 0), None);
    }

    #[test]
    fn anomalies_are_counted_into_their_period() {
        let mut s = sampler("pump", 8, 2);
        s.note_anomaly(10); // before any vector: pending for period 0
        feed(&mut s, 0, 0..5);
        s.note_anomaly(20);
        s.note_anomaly(HOUR + 1); // next period, before its first vector
        s.note_anomaly(HOUR + 2);
        let first = s.offer(HOUR + 3, &[0.0, 1.0]).unwrap();
        assert_eq!(first.anomalies, 2);
        s.note_anomaly(5); // closed period: ignored
        s.offer(HOUR + 4, &[1.0, 0.0]);
        let second = s.expire(2 * HOUR, 0).unwrap();
        assert_eq!(second.anomalies, 2);
        // A clean period reports none, and pending counts do not leak into other periods.
        s.note_anomaly(9 * HOUR);
        feed(&mut s, 3 * HOUR, 0..3);
        assert_eq!(s.expire(4 * HOUR, 0).unwrap().anomalies, 0);
        feed(&mut s, 9 * HOUR, 0..3);
        assert_eq!(s.expire(10 * HOUR, 0).unwrap().anomalies, 1);
    }

    #[test]
    fn samples_pass_check_and_memory_is_bounded() {
        let mut s = sampler("pump", 64, 1);
        let before = s.heap_bytes();
        feed(&mut s, 0, 0..1000);
        let held = s.heap_bytes();
        assert_eq!(held - before, 64 * 2 * 8);
        // Many periods later the buffer has not grown.
        for p in 1..20 {
            let out = feed(&mut s, p * HOUR, 0..100);
            assert_eq!(out.len(), 1);
            out[0].check().unwrap();
            assert_eq!(out[0].rows.len(), 64);
        }
        assert_eq!(s.heap_bytes(), held);
        // Negative event times fall in their own (floor) period.
        let mut neg = sampler("pump", 8, 1);
        neg.offer(-1, &[1.0, 2.0]);
        let sample = neg.expire(0, 0).unwrap();
        assert_eq!((sample.from_ms, sample.to_ms), (-HOUR, 0));
        sample.check().unwrap();
    }

    proptest::proptest! {
        /// The open period's bounds find the same period as dividing, near 0 and at both ends of
        /// the i64 range (where a period's bounds overflow), for periods of 1 ms to a day.
        #[test]
        fn the_open_period_is_found_as_dividing_would(
            period_ms in proptest::prop_oneof![proptest::strategy::Just(1i64), 1i64..86_400_000],
            open in proptest::prop_oneof![
                proptest::num::i64::ANY,
                -3i64..3,
                proptest::strategy::Just(i64::MIN),
                proptest::strategy::Just(i64::MAX),
            ],
            offsets in proptest::collection::vec(-200_000_000i64..200_000_000, 1..20),
        ) {
            let cfg = SamplerConfig { period_ms, capacity: 4, min_rows: 1 };
            let mut s = DeviceSampler::new("d", vec!["a".into(), "b".into()], &cfg);
            s.open(open.div_euclid(period_ms));
            for off in offsets {
                for ts in [open.saturating_add(off), i64::MIN.saturating_add(off.abs()), i64::MAX.saturating_sub(off.abs())] {
                    proptest::prop_assert_eq!(s.period_of(ts), ts.div_euclid(period_ms), "ts {}", ts);
                }
            }
        }
    }
}
