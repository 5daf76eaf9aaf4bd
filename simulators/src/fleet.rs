//! The fleet generator: devices × metrics, each series a realistic signal with injected,
//! labelled anomalies.
//!
//! Pure state machine: no I/O, no clock, no async. Time is a value that advances by
//! `interval_ms` per [`Fleet::step`], so the same seed gives the same readings and labels whatever
//! the publisher's pacing. Every series owns three seeded generators (parameters, noise, anomaly
//! schedule) derived from the seed, the device id and the metric name, so the noise of a series
//! does not change when anomaly settings or other series change. (`SmallRng` is reproducible on one
//! platform and `rand` version, not across them.)

use crate::anomaly::{Active, AnomalyKind, GroundTruth};
use crate::config::{AnomalyConfig, SimulatorConfig};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::f64::consts::TAU;
use std::sync::Arc;

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: f64 = 3_600_000.0;
/// The daily sine peaks at 15:00 UTC (afternoon heat, peak load), give or take a per-device hour.
const DAILY_PEAK_MS: i64 = 15 * 3_600_000;

/// One simulated sensor reading.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReading {
    /// Device id (`dev-0042`).
    pub device: Arc<str>,
    /// Metric name.
    pub metric: Arc<str>,
    /// Simulated timestamp (Unix ms).
    pub ts_ms: i64,
    /// Value in the metric's unit; always finite for a valid config.
    pub value: f64,
}

/// One (device, metric) series and its generators.
#[derive(Debug)]
struct Series {
    device: Arc<str>,
    metric: Arc<str>,
    base: f64,
    amplitude: f64,
    peak_ms: i64,
    noise_std: f64,
    drift_per_ms: f64,
    noise_rng: SmallRng,
    anomaly_rng: SmallRng,
    last_value: Option<f64>,
    active: Option<Active>,
    /// Start of the next anomaly (first step at or after it); `i64::MAX` when injection is off.
    next_anomaly_ms: i64,
}

/// A simulated fleet. See the module docs.
#[derive(Debug)]
pub struct Fleet {
    series: Vec<Series>,
    anomalies: AnomalyConfig,
    /// Anomaly arrivals per simulated ms per series.
    rate_per_ms: f64,
    interval_ms: i64,
    start_ms: i64,
    now_ms: i64,
    labels: Vec<GroundTruth>,
}

/// SplitMix64's finaliser: spreads nearby inputs over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of one generator of one series; FNV-1a over the names so it is stable across runs,
/// platforms and fleet sizes (std's hasher is randomly keyed).
fn series_seed(seed: u64, device: &str, metric: &str, stream: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.bytes().chain([0xff]).chain(metric.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(mix(seed ^ h) ^ stream)
}

/// One standard normal draw (Box–Muller; the second value of the pair is discarded so every
/// step consumes exactly two uniforms).
fn standard_normal(rng: &mut SmallRng) -> f64 {
    // 1 - [0, 1) is (0, 1]: ln never sees 0.
    let u1 = 1.0 - rng.gen::<f64>();
    let u2 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// Steps an anomaly of `duration_ms` covers: at least one.
fn steps_for(duration_ms: u64, interval_ms: i64) -> i64 {
    let d = i64::try_from(duration_ms).unwrap_or(i64::MAX);
    (d.saturating_add(interval_ms - 1) / interval_ms).max(1)
}

impl Series {
    fn clean(&self, ts_ms: i64, start_ms: i64) -> f64 {
        let tod = (ts_ms - self.peak_ms).rem_euclid(DAY_MS) as f64;
        self.base
            + self.amplitude * (TAU * tod / DAY_MS as f64).cos()
            + self.drift_per_ms * ts_ms.saturating_sub(start_ms) as f64
    }

    fn label(&self, a: &Active, end_ms: i64) -> GroundTruth {
        GroundTruth {
            device: self.device.to_string(),
            metric: self.metric.to_string(),
            kind: a.kind,
            start_ms: a.start_ms,
            end_ms,
        }
    }
}

impl Fleet {
    /// Builds the fleet whose first step is at `start_ms` (the caller resolves `cfg.start_ms`);
    /// fails listing every config problem.
    pub fn new(cfg: &SimulatorConfig, start_ms: i64) -> anyhow::Result<Fleet> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            anyhow::bail!("invalid simulator config: {}", problems.join("; "));
        }
        let interval_ms = i64::try_from(cfg.interval_ms)
            .map_err(|_| anyhow::anyhow!("interval_ms: too large, got {}", cfg.interval_ms))?;
        let a = &cfg.anomalies;
        let rate_per_ms = if a.kinds.is_empty() {
            0.0
        } else {
            a.rate_per_series_hour / HOUR_MS
        };
        let warmup_end = start_ms.saturating_add(i64::try_from(a.warmup_ms).unwrap_or(i64::MAX));
        let width = (cfg.devices.saturating_sub(1)).to_string().len().max(4);
        let metrics: Vec<Arc<str>> = cfg
            .metrics
            .iter()
            .map(|m| Arc::from(m.name.as_str()))
            .collect();

        let mut series = Vec::with_capacity(cfg.series());
        for d in 0..cfg.devices {
            let device: Arc<str> = Arc::from(format!("{}{d:0width$}", cfg.device_prefix));
            for (spec, metric) in cfg.metrics.iter().zip(&metrics) {
                let mut params = SmallRng::seed_from_u64(series_seed(cfg.seed, &device, metric, 0));
                let sign = if params.gen::<bool>() { 1.0 } else { -1.0 };
                let mut s = Series {
                    device: device.clone(),
                    metric: metric.clone(),
                    base: spec.base + params.gen_range(-2.0..=2.0) * spec.noise_std,
                    amplitude: spec.daily_amplitude * params.gen_range(0.8..=1.2),
                    peak_ms: DAILY_PEAK_MS + params.gen_range(-3_600_000..=3_600_000),
                    noise_std: spec.noise_std,
                    drift_per_ms: sign * spec.drift_per_hour * params.gen_range(0.5..=1.5)
                        / HOUR_MS,
                    noise_rng: SmallRng::seed_from_u64(series_seed(cfg.seed, &device, metric, 1)),
                    anomaly_rng: SmallRng::seed_from_u64(series_seed(cfg.seed, &device, metric, 2)),
                    last_value: None,
                    active: None,
                    next_anomaly_ms: i64::MAX,
                };
                s.next_anomaly_ms = Self::schedule(&mut s.anomaly_rng, rate_per_ms, warmup_end);
                series.push(s);
            }
        }
        Ok(Fleet {
            series,
            anomalies: a.clone(),
            rate_per_ms,
            interval_ms,
            start_ms,
            now_ms: start_ms,
            labels: Vec::new(),
        })
    }

    /// Next anomaly start: `not_before` plus an exponential wait (Poisson arrivals).
    fn schedule(rng: &mut SmallRng, rate_per_ms: f64, not_before: i64) -> i64 {
        if rate_per_ms <= 0.0 {
            return i64::MAX;
        }
        let wait = -(1.0 - rng.gen::<f64>()).ln() / rate_per_ms;
        // `as` saturates for huge waits, which is what we want (never).
        not_before.saturating_add(wait as i64)
    }

    /// Advances simulated time by one step (cfg.interval_ms) and appends that step's readings (one per series, minus dropouts).
    pub fn step(&mut self, out: &mut Vec<SimReading>) {
        let ts = self.now_ms;
        for s in &mut self.series {
            // Drawn every step, anomaly or not, so the noise stream never depends on anomalies.
            let noise = standard_normal(&mut s.noise_rng) * s.noise_std;
            let clean = s.clean(ts, self.start_ms);
            if s.active.is_none() && ts >= s.next_anomaly_ms {
                let a = &self.anomalies;
                let rng = &mut s.anomaly_rng;
                // The schedule only runs when kinds is non-empty (rate_per_ms is 0 otherwise).
                let kind = a.kinds[rng.gen_range(0..a.kinds.len())];
                let sigma = |rng: &mut SmallRng, [lo, hi]: [f64; 2]| rng.gen_range(lo..=hi);
                let (steps, param) = match kind {
                    AnomalyKind::Spike => (1, sigma(rng, a.spike_sigma) * s.noise_std),
                    AnomalyKind::Dip => (1, -sigma(rng, a.spike_sigma) * s.noise_std),
                    AnomalyKind::LevelShift => {
                        let sign = if rng.gen::<bool>() { 1.0 } else { -1.0 };
                        let steps = steps_for(a.level_shift_duration_ms, self.interval_ms);
                        (steps, sign * sigma(rng, a.level_shift_sigma) * s.noise_std)
                    }
                    AnomalyKind::VarianceBurst => (
                        steps_for(a.burst_duration_ms, self.interval_ms),
                        a.burst_factor,
                    ),
                    AnomalyKind::Stuck => (
                        steps_for(a.stuck_duration_ms, self.interval_ms),
                        s.last_value.unwrap_or(clean + noise),
                    ),
                    AnomalyKind::Dropout => {
                        (steps_for(a.dropout_duration_ms, self.interval_ms), 0.0)
                    }
                };
                s.active = Some(Active {
                    kind,
                    start_ms: ts,
                    end_ms: ts.saturating_add((steps - 1).saturating_mul(self.interval_ms)),
                    param,
                });
            }
            let value = match &s.active {
                Some(a) => a.apply(clean, noise),
                None => Some(clean + noise),
            };
            if let Some(value) = value {
                s.last_value = Some(value);
                out.push(SimReading {
                    device: s.device.clone(),
                    metric: s.metric.clone(),
                    ts_ms: ts,
                    value,
                });
            }
            if let Some(a) = s.active.filter(|a| a.end_ms <= ts) {
                self.labels.push(s.label(&a, a.end_ms));
                s.active = None;
                let gap = i64::try_from(self.anomalies.min_gap_ms).unwrap_or(i64::MAX);
                s.next_anomaly_ms = Self::schedule(
                    &mut s.anomaly_rng,
                    self.rate_per_ms,
                    a.end_ms.saturating_add(gap),
                );
            }
        }
        self.now_ms = ts.saturating_add(self.interval_ms);
    }

    /// Simulated time of the next step.
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// Labels injected so far (complete up to now_ms): every anomaly that has ended, in the
    /// order they ended.
    pub fn ground_truth(&self) -> &[GroundTruth] {
        &self.labels
    }

    /// Anomalies still in progress, labelled as if they ended at the last step taken; what a run
    /// that stops now should add to [`Fleet::ground_truth`].
    pub fn in_progress(&self) -> Vec<GroundTruth> {
        let last = self.now_ms - self.interval_ms;
        self.series
            .iter()
            .filter_map(|s| s.active.as_ref().map(|a| s.label(a, last.min(a.end_ms))))
            .collect()
    }

    /// Number of series (devices × metrics).
    pub fn series(&self) -> usize {
        self.series.len()
    }

    /// The anomaly-free signal of series `i` at `ts_ms`, without noise (for tests).
    #[cfg(test)]
    fn clean_value(&self, i: usize, ts_ms: i64) -> f64 {
        self.series[i].clean(ts_ms, self.start_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const START: i64 = 1_764_000_000_000;

    /// Busy anomaly settings: many short anomalies in an hour of 5 devices × 4 metrics.
    fn busy() -> SimulatorConfig {
        let mut cfg = SimulatorConfig {
            devices: 5,
            seed: 7,
            ..Default::default()
        };
        let a = &mut cfg.anomalies;
        a.rate_per_series_hour = 30.0;
        a.warmup_ms = 120_000;
        a.min_gap_ms = 20_000;
        a.level_shift_duration_ms = 30_000;
        a.burst_duration_ms = 20_000;
        a.stuck_duration_ms = 15_000;
        a.dropout_duration_ms = 10_500;
        cfg
    }

    fn run(cfg: &SimulatorConfig, steps: usize) -> (Fleet, Vec<SimReading>) {
        let mut fleet = Fleet::new(cfg, START).unwrap();
        let mut out = Vec::new();
        for _ in 0..steps {
            fleet.step(&mut out);
        }
        (fleet, out)
    }

    /// Readings keyed by (series index, ts).
    fn index(fleet: &Fleet, readings: &[SimReading]) -> HashMap<(usize, i64), f64> {
        let ids: HashMap<(&str, &str), usize> = fleet
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| ((&*s.device, &*s.metric), i))
            .collect();
        readings
            .iter()
            .map(|r| ((ids[&(&*r.device, &*r.metric)], r.ts_ms), r.value))
            .collect()
    }

    fn series_of(fleet: &Fleet, g: &GroundTruth) -> usize {
        fleet
            .series
            .iter()
            .position(|s| *s.device == *g.device && *s.metric == *g.metric)
            .unwrap()
    }

    #[test]
    fn same_seed_gives_same_readings_and_labels() {
        let (f1, r1) = run(&busy(), 1200);
        let (f2, r2) = run(&busy(), 1200);
        assert_eq!(r1, r2);
        assert_eq!(f1.ground_truth(), f2.ground_truth());
        assert!(!f1.ground_truth().is_empty());

        let other = SimulatorConfig { seed: 8, ..busy() };
        let (f3, r3) = run(&other, 1200);
        assert_ne!(r1, r3);
        assert_ne!(f1.ground_truth(), f3.ground_truth());
    }

    #[test]
    fn a_series_noise_does_not_depend_on_anomaly_settings_or_fleet_size() {
        let quiet = SimulatorConfig {
            devices: 2,
            anomalies: AnomalyConfig {
                rate_per_series_hour: 0.0,
                ..Default::default()
            },
            ..busy()
        };
        let (_, busy_r) = run(&busy(), 100);
        let (_, quiet_r) = run(&quiet, 100);
        // Before warmup ends nothing is injected, so dev-0000's readings must match exactly.
        let first = |r: &[SimReading]| -> Vec<f64> {
            r.iter()
                .filter(|r| &*r.device == "dev-0000")
                .map(|r| r.value)
                .collect()
        };
        assert_eq!(first(&busy_r), first(&quiet_r));
    }

    #[test]
    fn ids_timestamps_and_counts_follow_the_config() {
        let cfg = SimulatorConfig {
            devices: 3,
            interval_ms: 250,
            anomalies: AnomalyConfig {
                rate_per_series_hour: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let (fleet, readings) = run(&cfg, 40);
        assert_eq!(fleet.series(), 12);
        assert_eq!(readings.len(), 12 * 40);
        assert_eq!(fleet.now_ms(), START + 40 * 250);
        assert_eq!(&*readings[0].device, "dev-0000");
        assert_eq!(&*readings[0].metric, "temperature");
        assert_eq!(&*readings[11].device, "dev-0002");
        let mut last: HashMap<(&str, &str), i64> = HashMap::new();
        for r in &readings {
            assert!(r.value.is_finite());
            if let Some(prev) = last.insert((&r.device, &r.metric), r.ts_ms) {
                assert!(r.ts_ms > prev, "timestamps must strictly increase");
            }
        }
        assert!(fleet.ground_truth().is_empty());
    }

    #[test]
    fn every_label_matches_what_was_injected() {
        let cfg = busy();
        let steps = 3600;
        let (fleet, readings) = run(&cfg, steps);
        let by = index(&fleet, &readings);
        let labels = fleet.ground_truth();
        for kind in AnomalyKind::ALL {
            assert!(
                labels.iter().filter(|g| g.kind == kind).count() >= 10,
                "{kind:?}"
            );
        }
        let warmup_end = START + cfg.anomalies.warmup_ms as i64;
        let mut expected_missing = 0;
        let mut labelled: HashMap<usize, Vec<(i64, i64)>> = HashMap::new();
        for g in labels {
            let i = series_of(&fleet, g);
            let std = fleet.series[i].noise_std;
            assert!(g.start_ms >= warmup_end, "anomaly during warmup: {g:?}");
            assert!((g.start_ms - START) % 1000 == 0 && g.end_ms >= g.start_ms);
            let len = (g.end_ms - g.start_ms) / 1000 + 1;
            labelled.entry(i).or_default().push((g.start_ms, g.end_ms));
            match g.kind {
                AnomalyKind::Spike | AnomalyKind::Dip => {
                    assert_eq!(g.start_ms, g.end_ms);
                    let dev = (by[&(i, g.start_ms)] - fleet.clean_value(i, g.start_ms)) / std;
                    let sign = if g.kind == AnomalyKind::Spike {
                        1.0
                    } else {
                        -1.0
                    };
                    assert!(
                        dev * sign >= 6.0 - 1e-9 && dev * sign <= 12.0 + 1e-9,
                        "{g:?}: {dev}"
                    );
                }
                AnomalyKind::LevelShift => assert_eq!(len, 30),
                AnomalyKind::VarianceBurst => assert_eq!(len, 20),
                AnomalyKind::Stuck => {
                    assert_eq!(len, 15);
                    let before = by[&(i, g.start_ms - 1000)];
                    for t in (g.start_ms..=g.end_ms).step_by(1000) {
                        assert_eq!(by[&(i, t)].to_bits(), before.to_bits(), "{g:?}");
                    }
                }
                AnomalyKind::Dropout => {
                    // 10.5 s rounds up to 11 readings.
                    assert_eq!(len, 11);
                    expected_missing += len as usize;
                    for t in (g.start_ms..=g.end_ms).step_by(1000) {
                        assert!(!by.contains_key(&(i, t)), "{g:?}");
                    }
                    assert!(by.contains_key(&(i, g.start_ms - 1000)));
                }
            }
        }
        // Dropouts still running when the test stops have no label yet; count them too.
        let open_missing: usize = fleet
            .in_progress()
            .iter()
            .filter(|g| g.kind == AnomalyKind::Dropout)
            .map(|g| ((g.end_ms - g.start_ms) / 1000 + 1) as usize)
            .sum();
        assert_eq!(
            readings.len(),
            fleet.series() * steps - expected_missing - open_missing,
            "readings go missing only inside dropout labels"
        );
        // Labels of one series never overlap and keep the minimum gap.
        for spans in labelled.values_mut() {
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[1].0 - w[0].1 >= 20_000, "{w:?}");
            }
        }
        // Outside labels no reading strays far from its clean signal: nothing unlabelled.
        for ((i, t), v) in &by {
            let inside = labelled
                .get(i)
                .is_some_and(|s| s.iter().any(|&(a, b)| a <= *t && *t <= b));
            let in_open = fleet
                .in_progress()
                .iter()
                .any(|g| series_of(&fleet, g) == *i && g.start_ms <= *t && *t <= g.end_ms);
            if !inside && !in_open {
                let dev = (v - fleet.clean_value(*i, *t)) / fleet.series[*i].noise_std;
                assert!(
                    dev.abs() < 6.0,
                    "unlabelled deviation {dev} at series {i}, ts {t}"
                );
            }
        }
    }

    #[test]
    fn no_anomaly_starts_during_warmup() {
        let mut cfg = busy();
        cfg.anomalies.rate_per_series_hour = 3600.0; // one per second once allowed
        cfg.anomalies.warmup_ms = 300_000;
        let (fleet, readings) = run(&cfg, 300);
        assert!(fleet.ground_truth().is_empty());
        assert!(fleet.in_progress().is_empty());
        assert_eq!(readings.len(), 300 * fleet.series());
        let mut fleet = fleet;
        let mut out = Vec::new();
        for _ in 0..5 {
            fleet.step(&mut out);
        }
        assert!(!fleet.in_progress().is_empty() || !fleet.ground_truth().is_empty());
        let first = fleet
            .ground_truth()
            .iter()
            .chain(&fleet.in_progress())
            .map(|g| g.start_ms)
            .min()
            .unwrap();
        assert!(first >= START + 300_000);
    }

    #[test]
    fn only_configured_kinds_are_injected() {
        let mut cfg = busy();
        cfg.anomalies.kinds = vec![AnomalyKind::Dropout, AnomalyKind::Stuck];
        let (fleet, _) = run(&cfg, 1800);
        assert!(!fleet.ground_truth().is_empty());
        assert!(fleet
            .ground_truth()
            .iter()
            .all(|g| matches!(g.kind, AnomalyKind::Dropout | AnomalyKind::Stuck)));
    }

    #[test]
    fn in_progress_labels_end_at_the_last_step() {
        let mut cfg = busy();
        cfg.anomalies.kinds = vec![AnomalyKind::LevelShift];
        cfg.anomalies.rate_per_series_hour = 360.0;
        cfg.anomalies.level_shift_duration_ms = 3_600_000;
        let (fleet, _) = run(&cfg, 600);
        let open = fleet.in_progress();
        assert_eq!(
            open.len(),
            fleet.series(),
            "an hour-long shift is running everywhere"
        );
        for g in open {
            assert_eq!(g.end_ms, fleet.now_ms() - 1000);
            assert!(g.start_ms <= g.end_ms);
        }
    }

    #[test]
    fn invalid_config_is_refused_with_every_problem() {
        let cfg = SimulatorConfig {
            devices: 0,
            interval_ms: 0,
            ..Default::default()
        };
        let e = Fleet::new(&cfg, START).unwrap_err().to_string();
        assert!(e.contains("devices") && e.contains("interval_ms"), "{e}");
    }
}
