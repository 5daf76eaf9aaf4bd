//! The fleet generator: devices × metrics, each series a realistic signal with injected,
//! labelled anomalies; with `load.enabled`, a device's metrics are driven by its hidden load
//! ([`crate::load`]) and move together.
//!
//! Pure state machine: no I/O, no clock, no async. Time is a value that advances by
//! `interval_ms` per [`Fleet::step`], so the same seed gives the same readings and labels whatever
//! the publisher's pacing. Every series owns three seeded generators (parameters, noise, anomaly
//! schedule) derived from the seed, the device id and the metric name, and every device one for its
//! load, so the noise of a series does not change when anomaly settings or other series change.
//! (`SmallRng` is reproducible on one platform and `rand` version, not across them.)

use crate::anomaly::{Active, AnomalyKind, GroundTruth};
use crate::config::{AnomalyConfig, SimulatorConfig};
use crate::load::{Load, LoadConfig, LOAD_PEAK_MS};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::f64::consts::TAU;
use std::sync::Arc;

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: f64 = 3_600_000.0;
/// The daily sine peaks at 15:00 UTC (afternoon heat, peak load), give or take a per-device hour
/// (exactly, on correlated devices).
const DAILY_PEAK_MS: i64 = LOAD_PEAK_MS;

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
    /// Metric units per unit of (lagged, powered) load; 0 when the load is off.
    load_gain: f64,
    load_power: f64,
    /// Per-step weight of the new load in the lag's moving average (1 = no lag).
    lag_alpha: f64,
    /// The lagged load this metric follows; NaN before the first step.
    lagged: f64,
    /// Whether a correlation break can be injected here (load on, gain != 0).
    can_break: bool,
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
    /// One load per device when `load.enabled`, else empty.
    loads: Vec<Load>,
    load_cfg: LoadConfig,
    metrics_per_device: usize,
    /// Kinds with their cumulative weights, for series that can and cannot break a correlation.
    draw_all: Vec<(AnomalyKind, f64)>,
    draw_unbreakable: Vec<(AnomalyKind, f64)>,
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
pub(crate) fn standard_normal(rng: &mut SmallRng) -> f64 {
    // 1 - [0, 1) is (0, 1]: ln never sees 0.
    let u1 = 1.0 - rng.gen::<f64>();
    let u2 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// The kind whose cumulative weight first exceeds `u` (in [0, 1)) times the total. Only called for
/// a series with kinds to draw (its rate is 0 otherwise); an empty list would give `Spike`.
fn draw(kinds: &[(AnomalyKind, f64)], u: f64) -> AnomalyKind {
    let total = kinds.last().map_or(0.0, |k| k.1);
    let x = u * total;
    kinds
        .iter()
        .find(|(_, c)| x < *c)
        .or(kinds.last())
        .map_or(AnomalyKind::Spike, |k| k.0)
}

/// Steps an anomaly of `duration_ms` covers: at least one.
fn steps_for(duration_ms: u64, interval_ms: i64) -> i64 {
    let d = i64::try_from(duration_ms).unwrap_or(i64::MAX);
    (d.saturating_add(interval_ms - 1) / interval_ms).max(1)
}

/// What one series did in one step, for callers that need more than the readings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeriesStep {
    /// Index of the series (device-major: `device * metrics + metric`).
    pub(crate) index: usize,
    /// The anomaly-free signal without noise (the tests check readings against it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) clean: f64,
    /// The reading emitted; `None` during a dropout.
    pub(crate) value: Option<f64>,
    /// Whether a labelled anomaly covers this step.
    pub(crate) labelled: bool,
}

impl Series {
    /// The noise-free signal at `ts_ms` when the metric sees `load` (already lagged).
    fn clean_with(&self, ts_ms: i64, start_ms: i64, load: f64) -> f64 {
        let tod = (ts_ms - self.peak_ms).rem_euclid(DAY_MS) as f64;
        let driven = if self.load_gain == 0.0 {
            0.0
        } else if self.load_power == 1.0 {
            self.load_gain * load.max(0.0)
        } else {
            self.load_gain * load.max(0.0).powf(self.load_power)
        };
        self.base
            + self.amplitude * (TAU * tod / DAY_MS as f64).cos()
            + self.drift_per_ms * ts_ms.saturating_sub(start_ms) as f64
            + driven
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
        let load_on = cfg.load.enabled;
        let cumulative = |keep: &dyn Fn(AnomalyKind) -> bool| {
            let mut sum = 0.0;
            a.kinds
                .iter()
                .filter(|k| keep(**k))
                .map(|k| {
                    sum += a.weight(*k);
                    (*k, sum)
                })
                .collect::<Vec<_>>()
        };
        let draw_all = cumulative(&|_| true);
        let draw_unbreakable = cumulative(&|k| k != AnomalyKind::CorrelationBreak);
        let mut loads = Vec::new();
        let width = (cfg.devices.saturating_sub(1)).to_string().len().max(4);
        let metrics: Vec<Arc<str>> = cfg
            .metrics
            .iter()
            .map(|m| Arc::from(m.name.as_str()))
            .collect();

        let mut series = Vec::with_capacity(cfg.series());
        for d in 0..cfg.devices {
            let device: Arc<str> = Arc::from(format!("{}{d:0width$}", cfg.device_prefix));
            if load_on {
                // Metric names are never empty, so stream 3 of metric "" is the device's own.
                let seed = series_seed(cfg.seed, &device, "", 3);
                loads.push(Load::new(&cfg.load, interval_ms, seed));
            }
            for (spec, metric) in cfg.metrics.iter().zip(&metrics) {
                let mut params = SmallRng::seed_from_u64(series_seed(cfg.seed, &device, metric, 0));
                let sign = if params.gen::<bool>() { 1.0 } else { -1.0 };
                // The same draws either way; on correlated devices peers stay nearly identical.
                let offset = params.gen_range(-1.0..=1.0);
                let amplitude = params.gen_range(0.8..=1.2);
                let peak = params.gen_range(-3_600_000..=3_600_000);
                let (offset, amplitude, peak) = if load_on {
                    (offset * cfg.load.peer_offset_sigma, 1.0, 0)
                } else {
                    (offset * 2.0, amplitude, peak)
                };
                let lag_alpha = if spec.load_lag_ms == 0 {
                    1.0
                } else {
                    1.0 - (-(interval_ms as f64) / spec.load_lag_ms as f64).exp()
                };
                let load_gain = if load_on { spec.load_gain } else { 0.0 };
                let mut s = Series {
                    device: device.clone(),
                    metric: metric.clone(),
                    base: spec.base + offset * spec.noise_std,
                    amplitude: spec.daily_amplitude * amplitude,
                    peak_ms: DAILY_PEAK_MS + peak,
                    noise_std: spec.noise_std,
                    drift_per_ms: sign * spec.drift_per_hour * params.gen_range(0.5..=1.5)
                        / HOUR_MS,
                    load_gain,
                    load_power: spec.load_power,
                    lag_alpha,
                    lagged: f64::NAN,
                    can_break: load_gain != 0.0,
                    noise_rng: SmallRng::seed_from_u64(series_seed(cfg.seed, &device, metric, 1)),
                    anomaly_rng: SmallRng::seed_from_u64(series_seed(cfg.seed, &device, metric, 2)),
                    last_value: None,
                    active: None,
                    next_anomaly_ms: i64::MAX,
                };
                let kinds_here = if s.can_break {
                    draw_all.len()
                } else {
                    draw_unbreakable.len()
                };
                let rate = if kinds_here == 0 { 0.0 } else { rate_per_ms };
                s.next_anomaly_ms = Self::schedule(&mut s.anomaly_rng, rate, warmup_end);
                series.push(s);
            }
        }
        Ok(Fleet {
            series,
            loads,
            load_cfg: cfg.load.clone(),
            metrics_per_device: cfg.metrics.len(),
            draw_all,
            draw_unbreakable,
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
        self.step_with(out, |_| {});
    }

    /// [`Fleet::step`], also telling `each` what every series did (for the CSV writer and tests).
    pub(crate) fn step_with(
        &mut self,
        out: &mut Vec<SimReading>,
        mut each: impl FnMut(SeriesStep),
    ) {
        let ts = self.now_ms;
        let per_device = self.metrics_per_device.max(1);
        let (usual_lo, usual_hi) = self.load_cfg.usual_range();
        let mut load = 0.0;
        for (index, s) in self.series.iter_mut().enumerate() {
            if index % per_device == 0 {
                if let Some(l) = self.loads.get_mut(index / per_device) {
                    load = l.step(ts);
                }
            }
            // Drawn every step, anomaly or not, so the noise stream never depends on anomalies.
            let noise = standard_normal(&mut s.noise_rng) * s.noise_std;
            // The lag runs through dropouts and anomalies: it is the physics, not the sensor.
            s.lagged = if s.lagged.is_nan() {
                load
            } else {
                s.lagged + s.lag_alpha * (load - s.lagged)
            };
            let clean = s.clean_with(ts, self.start_ms, s.lagged);
            if s.active.is_none() && ts >= s.next_anomaly_ms {
                let a = &self.anomalies;
                let kinds = if s.can_break {
                    &self.draw_all
                } else {
                    &self.draw_unbreakable
                };
                let rng = &mut s.anomaly_rng;
                let kind = draw(kinds, rng.gen::<f64>());
                let sigma = |rng: &mut SmallRng, [lo, hi]: [f64; 2]| rng.gen_range(lo..=hi);
                let sign = |rng: &mut SmallRng| if rng.gen::<bool>() { 1.0 } else { -1.0 };
                let mut ramp_ms = 0;
                let (steps, param) = match kind {
                    AnomalyKind::Spike => (1, sigma(rng, a.spike_sigma) * s.noise_std),
                    AnomalyKind::Dip => (1, -sigma(rng, a.spike_sigma) * s.noise_std),
                    AnomalyKind::LevelShift => {
                        let sign = sign(rng);
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
                    AnomalyKind::CorrelationBreak => {
                        // Metric units per unit of load near the mean load: turns sigmas into load.
                        let mean = self.load_cfg.mean;
                        let slope = (s.load_gain * s.load_power * mean.powf(s.load_power - 1.0))
                            .abs()
                            .max(f64::MIN_POSITIVE);
                        let shift = sigma(rng, a.correlation_break_sigma) * s.noise_std / slope;
                        // Towards the middle of the usual range, so the metric stays inside its own.
                        let toward = if s.lagged < mean { 1.0 } else { -1.0 };
                        ramp_ms = i64::try_from(a.correlation_break_ramp_ms).unwrap_or(i64::MAX);
                        let target = (s.lagged + toward * shift).clamp(usual_lo, usual_hi);
                        (
                            steps_for(a.correlation_break_duration_ms, self.interval_ms),
                            target,
                        )
                    }
                    AnomalyKind::PeerDrift => {
                        ramp_ms = i64::try_from(a.peer_drift_return_ms).unwrap_or(i64::MAX);
                        let sign = sign(rng);
                        (
                            steps_for(a.peer_drift_duration_ms, self.interval_ms),
                            sign * a.peer_drift_sigma * s.noise_std,
                        )
                    }
                };
                s.active = Some(Active {
                    kind,
                    start_ms: ts,
                    end_ms: ts.saturating_add((steps - 1).saturating_mul(self.interval_ms)),
                    param,
                    ramp_ms,
                });
            }
            let value = match &s.active {
                Some(a) if a.kind == AnomalyKind::CorrelationBreak => {
                    let broken = s.clean_with(ts, self.start_ms, a.break_load(ts, s.lagged));
                    a.apply(broken, noise, ts)
                }
                Some(a) => a.apply(clean, noise, ts),
                None => Some(clean + noise),
            };
            each(SeriesStep {
                index,
                clean,
                value,
                labelled: s.active.is_some(),
            });
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

    /// Device ids, in series order.
    pub fn devices(&self) -> Vec<Arc<str>> {
        self.series
            .iter()
            .step_by(self.metrics_per_device.max(1))
            .map(|s| s.device.clone())
            .collect()
    }

    /// Metric names, in the config's order.
    pub fn metrics(&self) -> Vec<Arc<str>> {
        self.series
            .iter()
            .take(self.metrics_per_device)
            .map(|s| s.metric.clone())
            .collect()
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
        a.correlation_break_duration_ms = 30_000;
        a.correlation_break_ramp_ms = 5_000;
        a.peer_drift_duration_ms = 30_000;
        a.peer_drift_return_ms = 5_000;
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

    /// Like `run`, also returning the clean signal of every series keyed by (series index, ts).
    fn run_traced(
        cfg: &SimulatorConfig,
        steps: usize,
    ) -> (Fleet, Vec<SimReading>, HashMap<(usize, i64), f64>) {
        let mut fleet = Fleet::new(cfg, START).unwrap();
        let mut out = Vec::new();
        let mut clean = HashMap::new();
        for _ in 0..steps {
            let ts = fleet.now_ms();
            fleet.step_with(&mut out, |s| {
                clean.insert((s.index, ts), s.clean);
            });
        }
        (fleet, out, clean)
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
        let (fleet, readings, clean) = run_traced(&cfg, steps);
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
                    let dev = (by[&(i, g.start_ms)] - clean[&(i, g.start_ms)]) / std;
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
                AnomalyKind::LevelShift
                | AnomalyKind::CorrelationBreak
                | AnomalyKind::PeerDrift => assert_eq!(len, 30),
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
                let dev = (v - clean[&(*i, *t)]) / fleet.series[*i].noise_std;
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

    fn pearson(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        let n = a.len() as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
        for (x, y) in a.iter().zip(b) {
            sab += (x - ma) * (y - mb);
            saa += (x - ma) * (x - ma);
            sbb += (y - mb) * (y - mb);
        }
        sab / (saa * sbb).sqrt()
    }

    fn quiet(cfg: SimulatorConfig) -> SimulatorConfig {
        SimulatorConfig {
            anomalies: AnomalyConfig {
                rate_per_series_hour: 0.0,
                ..cfg.anomalies.clone()
            },
            ..cfg
        }
    }

    /// Values of one series (device index, metric index) by step; NaN where there was no reading.
    fn column(
        fleet: &Fleet,
        readings: &[SimReading],
        d: usize,
        m: usize,
        steps: usize,
    ) -> Vec<f64> {
        let device = fleet.devices()[d].clone();
        let metric = fleet.metrics()[m].clone();
        let mut out = vec![f64::NAN; steps];
        for r in readings {
            if r.device == device && r.metric == metric {
                out[((r.ts_ms - START) / 1000) as usize] = r.value;
            }
        }
        out
    }

    #[test]
    fn a_devices_metrics_move_together_over_a_day_at_the_default_config() {
        let cfg = quiet(SimulatorConfig {
            devices: 2,
            ..Default::default()
        });
        let steps = 86_400;
        let (fleet, readings) = run(&cfg, steps);
        for d in 0..2 {
            let cols: Vec<Vec<f64>> = (0..4)
                .map(|m| column(&fleet, &readings, d, m, steps))
                .collect();
            for i in 0..4 {
                for j in i + 1..4 {
                    let r = pearson(&cols[i], &cols[j]);
                    assert!(r >= 0.8, "device {d}: metrics {i} and {j}: r = {r}");
                }
            }
        }
        // The same fleet without the load: independent series.
        let mut off = cfg.clone();
        off.load.enabled = false;
        off.anomalies.kinds.retain(|k| !k.needs_load());
        let (fleet, readings) = run(&off, 7200);
        let a = column(&fleet, &readings, 0, 1, 7200);
        let b = column(&fleet, &readings, 0, 3, 7200);
        assert!(pearson(&a, &b).abs() < 0.5, "{}", pearson(&a, &b));
    }

    #[test]
    fn peers_are_identical_apart_from_noise_walk_and_small_offsets() {
        let cfg = quiet(SimulatorConfig {
            devices: 2,
            ..Default::default()
        });
        let steps = 86_400;
        let (fleet, _, clean) = run_traced(&cfg, steps);
        for m in 0..4 {
            let sigma = fleet.series[m].noise_std;
            let mean_gap = (0..steps as i64)
                .map(|k| {
                    let t = START + k * 1000;
                    (clean[&(m, t)] - clean[&(4 + m, t)]).abs()
                })
                .sum::<f64>()
                / steps as f64
                / sigma;
            // Well below the default peer drift (6 sigma).
            assert!(mean_gap < 2.5, "metric {m}: peers {mean_gap} sigma apart");
        }
    }

    /// START is 16:00 UTC: after 7 h of warmup the breaks run from 23:00 to 03:00, while the load
    /// falls towards its nightly trough.
    fn break_config() -> SimulatorConfig {
        let mut cfg = SimulatorConfig {
            devices: 1,
            seed: 5,
            ..Default::default()
        };
        let a = &mut cfg.anomalies;
        a.kinds = vec![AnomalyKind::CorrelationBreak];
        a.rate_per_series_hour = 120.0;
        a.warmup_ms = 7 * 3_600_000;
        a.correlation_break_duration_ms = 4 * 3_600_000;
        cfg
    }

    #[test]
    fn a_correlation_break_stays_in_range_while_the_correlation_collapses() {
        let cfg = break_config();
        let day = 86_400;
        let (ref_fleet, ref_readings) = run(&quiet(cfg.clone()), day);
        let (fleet, readings) = run(&cfg, 12 * 3600);
        let labels = fleet.ground_truth();
        assert_eq!(labels.len(), 4, "every metric broke once: {labels:?}");
        for g in labels {
            assert_eq!(g.kind, AnomalyKind::CorrelationBreak);
            assert!(g.start_ms < START + 7 * 3_600_000 + 300_000, "{g:?}");
            let m = fleet
                .metrics()
                .iter()
                .position(|m| **m == *g.metric)
                .unwrap();
            let sigma = fleet.series[m].noise_std;
            let normal = column(&ref_fleet, &ref_readings, 0, m, day);
            let broken = column(&fleet, &readings, 0, m, 12 * 3600);
            let mut sorted = normal.clone();
            sorted.sort_by(f64::total_cmp);
            let (p1, p99) = (sorted[day / 100], sorted[day * 99 / 100]);
            let (a, b) = (
                ((g.start_ms - START) / 1000) as usize,
                ((g.end_ms - START) / 1000) as usize,
            );
            assert_eq!(b - a + 1, 4 * 3600);
            // Between the ramps (which blend the normal signal with this) the metric follows its
            // frozen load and stays inside its own usual range.
            let ramp = (cfg.anomalies.correlation_break_ramp_ms / 1000) as usize;
            for (k, v) in broken.iter().enumerate().take(b - ramp + 1).skip(a + ramp) {
                assert!(
                    (p1..=p99).contains(v),
                    "{g:?}: {v} outside [{p1}, {p99}] at step {k}"
                );
            }
            // Before the break the series is exactly the normal one; after the ramp it departs.
            assert!(
                broken[..a] == normal[..a],
                "{g:?}: changed before its start"
            );
            let departure = (a + ramp..=b - ramp)
                .map(|k| (broken[k] - normal[k]).abs())
                .sum::<f64>()
                / (b - a - 2 * ramp + 1) as f64
                / sigma;
            // Continuous at both ends: no step a univariate detector would take for a level shift.
            for k in [a, a + 1, b - 1, b] {
                assert!(
                    (broken[k] - normal[k]).abs() < sigma,
                    "{g:?}: jumps at step {k}"
                );
            }
            assert!(departure >= 3.0, "{g:?}: departs by {departure} sigma");
            // Against every other metric of the device (as it would have been: anomalies change
            // neither noise nor load), the correlation collapses during the break.
            for o in (0..4).filter(|&o| o != m) {
                let other = column(&ref_fleet, &ref_readings, 0, o, day);
                let before = pearson(&normal[a..=b], &other[a..=b]);
                let during = pearson(&broken[a..=b], &other[a..=b]);
                assert!(before >= 0.8, "{g:?} vs metric {o}: normal r = {before}");
                assert!(
                    during.abs() < 0.3,
                    "{g:?} vs metric {o}: broken r = {during}"
                );
            }
            // After the break, back to normal.
            assert!(
                broken[b + 1..b + 60] == normal[b + 1..b + 60],
                "{g:?}: not back to normal"
            );
        }
    }

    #[test]
    fn a_peer_drift_reaches_its_size_and_returns() {
        let mut cfg = SimulatorConfig {
            devices: 3,
            seed: 3,
            ..Default::default()
        };
        let a = &mut cfg.anomalies;
        a.kinds = vec![AnomalyKind::PeerDrift];
        a.rate_per_series_hour = 2.0;
        a.warmup_ms = 1_800_000;
        a.peer_drift_duration_ms = 3_600_000;
        let steps = 4 * 3600;
        let (ref_fleet, ref_readings) = run(&quiet(cfg.clone()), steps);
        let (fleet, readings) = run(&cfg, steps);
        let labels = fleet.ground_truth();
        let open = fleet.in_progress();
        assert!(labels.len() >= 3, "{labels:?}");
        let devices = fleet.devices();
        for g in labels {
            assert_eq!(g.kind, AnomalyKind::PeerDrift);
            let d = devices.iter().position(|d| **d == *g.device).unwrap();
            let m = fleet
                .metrics()
                .iter()
                .position(|m| **m == *g.metric)
                .unwrap();
            let sigma = fleet.series[d * 4 + m].noise_std;
            let normal = column(&ref_fleet, &ref_readings, d, m, steps);
            let drifted = column(&fleet, &readings, d, m, steps);
            let (a, b) = (
                ((g.start_ms - START) / 1000) as usize,
                ((g.end_ms - START) / 1000) as usize,
            );
            assert_eq!(b - a + 1, 3600);
            let offset = |k: usize| (drifted[k] - normal[k]) / sigma;
            // Full size when the return starts (default: 10 min before the end), 0 at the end.
            let top = b - 600;
            assert!(offset(a).abs() < 1e-6, "{g:?}: starts at {}", offset(a));
            assert!(
                (offset(top).abs() - 6.0).abs() < 1e-6,
                "{g:?}: peaks at {}",
                offset(top)
            );
            let mid = offset((a + top) / 2);
            assert!((mid.abs() - 3.0).abs() < 0.01 && mid.signum() == offset(top).signum());
            let back = offset(b - 300);
            assert!(
                (back.abs() - 3.0).abs() < 0.01,
                "{g:?}: half way back at {back}"
            );
            assert!(offset(b).abs() < 1e-6, "{g:?}: ends at {}", offset(b));
            // Back to normal the step after (the next anomaly is at least min_gap_ms away).
            if b + 1 < steps {
                assert_eq!(offset(b + 1), 0.0, "{g:?}");
            }
            // The other metrics of the drifting device are untouched unless they drift too.
            for o in (0..4).filter(|&o| o != m) {
                let drifting = labels.iter().chain(&open).any(|h| {
                    h.device == g.device
                        && *h.metric == *fleet.metrics()[o]
                        && h.start_ms <= g.end_ms
                        && g.start_ms <= h.end_ms
                });
                if !drifting {
                    let a_o = column(&fleet, &readings, d, o, steps);
                    let n_o = column(&ref_fleet, &ref_readings, d, o, steps);
                    assert!(a_o[a..=b] == n_o[a..=b], "{g:?}: metric {o} changed");
                }
            }
        }
    }

    #[test]
    fn load_kinds_go_only_where_they_make_sense() {
        // A metric not driven by the load never gets a correlation break.
        let mut cfg = busy();
        cfg.metrics[1].load_gain = 0.0;
        let (fleet, _) = run(&cfg, 3600);
        let breaks: Vec<_> = fleet
            .ground_truth()
            .iter()
            .filter(|g| g.kind == AnomalyKind::CorrelationBreak)
            .collect();
        assert!(!breaks.is_empty());
        assert!(breaks.iter().all(|g| g.metric != "flow"));
        assert!(fleet
            .ground_truth()
            .iter()
            .any(|g| g.metric == "flow" && g.kind == AnomalyKind::PeerDrift));
        // ... and with only that kind asked for, that metric gets nothing at all.
        cfg.anomalies.kinds = vec![AnomalyKind::CorrelationBreak];
        let (fleet, _) = run(&cfg, 3600);
        assert!(!fleet.ground_truth().is_empty());
        assert!(fleet.ground_truth().iter().all(|g| g.metric != "flow"));
    }

    /// The label counts of a default 24 h run of 20 devices (printed; `--nocapture` shows them).
    #[test]
    fn a_default_day_of_twenty_devices_has_tens_of_each_new_kind() {
        let cfg = SimulatorConfig::default();
        assert_eq!(cfg.devices, 20);
        let mut fleet = Fleet::new(&cfg, START).unwrap();
        let (mut batch, mut readings) = (Vec::new(), 0);
        for _ in 0..86_400 {
            batch.clear();
            fleet.step(&mut batch);
            readings += batch.len();
        }
        let mut labels = fleet.ground_truth().to_vec();
        labels.extend(fleet.in_progress());
        let mut line = String::new();
        for k in AnomalyKind::ALL {
            let n = labels.iter().filter(|g| g.kind == k).count();
            line.push_str(&format!(" {}={n}", k.as_str()));
            if k.needs_load() {
                assert!((20..=200).contains(&n), "{k:?}: {n}");
            }
        }
        let drifting: std::collections::HashSet<&str> = labels
            .iter()
            .filter(|g| g.kind == AnomalyKind::PeerDrift)
            .map(|g| g.device.as_str())
            .collect();
        eprintln!(
            "default 24 h, 20 devices: {readings} readings, {} labels:{line}; {} devices drift at some point",
            labels.len(),
            drifting.len()
        );
    }

    #[test]
    fn kinds_are_drawn_in_proportion_to_their_weights() {
        let kinds = [
            (AnomalyKind::Spike, 1.0),
            (AnomalyKind::Dip, 3.0),
            (AnomalyKind::PeerDrift, 3.5),
        ];
        assert_eq!(draw(&kinds, 0.0), AnomalyKind::Spike);
        assert_eq!(draw(&kinds, 0.28), AnomalyKind::Spike);
        assert_eq!(draw(&kinds, 0.3), AnomalyKind::Dip);
        assert_eq!(draw(&kinds, 0.85), AnomalyKind::Dip);
        assert_eq!(draw(&kinds, 0.86), AnomalyKind::PeerDrift);
        assert_eq!(draw(&kinds, 0.999_999_999), AnomalyKind::PeerDrift);
        let mut cfg = busy();
        cfg.anomalies.kind_weights = [(AnomalyKind::Stuck, 20.0)].into();
        let (fleet, _) = run(&cfg, 3600);
        let stuck = fleet
            .ground_truth()
            .iter()
            .filter(|g| g.kind == AnomalyKind::Stuck)
            .count();
        // 20 / 27 of the draws.
        assert!(
            stuck * 2 > fleet.ground_truth().len(),
            "{stuck} of {}",
            fleet.ground_truth().len()
        );
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
