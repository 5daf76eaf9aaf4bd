//! Fleet peer groups at the aggregator: each device's profile (a per-metric EWMA of its window
//! means), devices grouped into classes (same metric set and group label), one
//! [`PeerModel`] per class, and `detector: "fleet"` events when a device leaves its peer group.
//! Pure bookkeeping here (time is a value passed in); [`run`] holds the refit task and publishing.

pub(crate) mod cluster;
pub(crate) mod pool;
mod robust;
pub(crate) mod run;
mod score;

use robust::{label_of, median, trim_outliers};
use score::score_device;

use crate::config::FleetConfig;
use edgewatch_models::detect::EventGate;
use edgewatch_models::multi::{PeerModel, PeerOptions};
use edgewatch_models::wire::{AnomalyEvent, WindowSummary};
use edgewatch_models::ModelError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A peer score at or above this raises an event (the peer model scores 0.5 at its limit).
pub(crate) const THRESHOLD: f64 = 0.5;
/// Most metrics profiled per device; further metrics of a device are ignored (bounded memory).
pub(crate) const MAX_METRICS: usize = 64;
/// Training excludes devices further than this many robust standard deviations (1.4826 · MAD
/// across the class) from the class median on some metric...
const TRIM_Z: f64 = 6.0;
/// ...but never more than a quarter of the class, most extreme first.
const TRIM_SHARE: usize = 4;
/// Name of the detector in the events.
pub(crate) const DETECTOR: &str = "fleet";

/// Devices are peers when they share a group label (or none) and their metric set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) struct ClassKey {
    /// The configured group label of its devices, if any.
    pub label: Option<String>,
    /// Its metrics, sorted: the model's features.
    pub metrics: Vec<String>,
}

impl ClassKey {
    /// `label/metric+metric` (`*` without a label): the class's name in the API.
    pub(crate) fn name(&self) -> String {
        format!(
            "{}/{}",
            self.label.as_deref().unwrap_or("*"),
            self.metrics.join("+")
        )
    }
}

/// One metric of a profile.
#[derive(Debug, Clone, PartialEq)]
struct MetricProfile {
    value: f64,
    windows: u32,
    last_end_ms: i64,
    /// The value before the last window (NaN before the second window) and its window end.
    prev_value: f64,
    prev_end_ms: i64,
}

impl MetricProfile {
    /// The value as of event time `at_ms`: after the latest window ending at or before it.
    fn value_at(&self, at_ms: i64) -> Option<f64> {
        if self.last_end_ms <= at_ms {
            Some(self.value)
        } else if self.prev_end_ms <= at_ms && self.prev_value.is_finite() {
            Some(self.prev_value)
        } else {
            None
        }
    }
}

/// Where a device last stood against its class's model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Standing {
    /// Peer score in [0, 1].
    pub score: f64,
    /// Distance to the nearest group's centroid / that group's spread.
    pub ratio: f64,
    /// Index of the nearest group.
    pub cluster: usize,
    /// The metric furthest from that group's centroid.
    pub metric: String,
    /// That metric's profile value.
    pub value: f64,
    /// Version of the model that scored it.
    pub model_version: u64,
}

#[derive(Debug, Clone)]
struct DeviceProfile {
    partition: u32,
    label: Option<String>,
    metrics: BTreeMap<String, MetricProfile>,
    /// The latest window seen: (start, latest reading), for the events' timestamps.
    last_window: (i64, i64),
    last_end_ms: i64,
    scored_to_ms: i64,
    gate: EventGate,
    standing: Option<Standing>,
    /// Cluster mode: the window end of the profile last exported to the profiles bucket.
    exported_to_ms: i64,
}

impl DeviceProfile {
    fn class(&self) -> ClassKey {
        ClassKey {
            label: self.label.clone(),
            metrics: self.metrics.keys().cloned().collect(),
        }
    }

    fn complete(&self, min_windows: u32) -> bool {
        !self.metrics.is_empty() && self.metrics.values().all(|m| m.windows >= min_windows)
    }

    fn in_class(&self, k: &ClassKey) -> bool {
        self.label == k.label && self.metrics.keys().eq(k.metrics.iter())
    }

    fn outside(&self) -> bool {
        self.standing.as_ref().is_some_and(|s| s.score >= THRESHOLD)
    }
}

/// A class's fitted model.
#[derive(Debug, Clone)]
pub(crate) struct ClassModel {
    /// The model; its `version` counts this class's fits.
    pub model: PeerModel,
    /// Wall-clock time of the fit (ms).
    pub fitted_at_ms: i64,
    /// Devices the model was fitted on, and those left out (outside their group or trimmed).
    pub trained: usize,
    /// Complete profiles of the class left out of the fit.
    pub excluded: usize,
    /// Per-metric median of the training profiles: where the class stood at the fit.
    pub medians: Vec<f64>,
    /// Cluster mode: the member that fitted it and the trainer epoch it was last written under.
    pub trainer: Option<(String, u64)>,
    /// Cluster mode: how far the whole class's median profile has moved since the fit, as the
    /// trainer last measured it over every member's profiles (a member alone sees too few), and
    /// the window end (event time, ms) it describes.
    pub shift: Option<(Vec<f64>, i64)>,
}

/// The profiles of one class ready for a fit (see [`Profiles::training_sets`]).
#[derive(Debug, Clone)]
pub(crate) struct TrainingSet {
    /// The class.
    pub class: ClassKey,
    /// Row-major profiles of the devices kept, `class.metrics` columns.
    pub rows: Vec<f64>,
    /// Complete profiles left out (outside their group, or trimmed as robust outliers).
    pub excluded: usize,
    /// Event time of the newest profile (ms).
    pub to_ms: i64,
}

impl TrainingSet {
    /// Fits the class's peer model (runs on a blocking thread).
    pub(crate) fn fit(&self, opts: &PeerOptions) -> Result<PeerModel, ModelError> {
        PeerModel::fit(self.class.metrics.clone(), &self.rows, self.to_ms, opts)
    }

    /// Devices in the set.
    pub(crate) fn devices(&self) -> usize {
        self.rows.len() / self.class.metrics.len().max(1)
    }

    /// Fits every set's model on a blocking thread, each beside its result; `None` if a fit
    /// panicked (only linfa could).
    pub(crate) async fn fit_all(
        sets: Vec<TrainingSet>,
        opts: PeerOptions,
    ) -> Option<Vec<(TrainingSet, Result<PeerModel, ModelError>)>> {
        tokio::task::spawn_blocking(move || {
            sets.into_iter()
                .map(|s| {
                    let r = s.fit(&opts);
                    (s, r)
                })
                .collect()
        })
        .await
        .ok()
    }
}

/// A `fleet` event and its device's partition.
pub(crate) type FleetEvent = (u32, AnomalyEvent);

/// Every device profile and every class model of one aggregator.
#[derive(Debug)]
pub(crate) struct Profiles {
    cfg: FleetConfig,
    gate: EventGate,
    agent: String,
    devices: HashMap<String, DeviceProfile>,
    models: BTreeMap<ClassKey, ClassModel>,
    /// Per class: the window end its current medians were taken at, and the medians.
    medians: HashMap<ClassKey, (i64, Vec<f64>)>,
    /// Windows of devices not profiled because `max_devices` were.
    pub refused_windows: u64,
}

impl Profiles {
    /// Empty profiles; `agent` (the aggregator id) is named in the events.
    pub(crate) fn new(cfg: &FleetConfig, agent: &str) -> Result<Self, ModelError> {
        Ok(Self {
            gate: EventGate::new(THRESHOLD, &cfg.gate)?,
            cfg: cfg.clone(),
            agent: agent.into(),
            devices: HashMap::new(),
            models: BTreeMap::new(),
            medians: HashMap::new(),
            refused_windows: 0,
        })
    }

    /// Takes the live part of a reload (see `reload.rs`): the gate of every device (its episode
    /// state kept), the peer options of the next fit, and the class and completeness minimums.
    /// Fails, changing nothing, when the gate is invalid.
    pub(crate) fn retune(&mut self, cfg: &FleetConfig) -> Result<(), ModelError> {
        let gate = EventGate::new(THRESHOLD, &cfg.gate)?;
        for dev in self.devices.values_mut() {
            dev.gate = dev.gate.retuned(&gate);
        }
        self.gate = gate;
        self.cfg.gate = cfg.gate;
        self.cfg.peers = cfg.peers.clone();
        self.cfg.min_devices = cfg.min_devices;
        self.cfg.min_windows = cfg.min_windows;
        Ok(())
    }

    /// The configuration in force (the live part of reloads included).
    pub(crate) fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    /// The options the next peer model fit uses.
    pub(crate) fn peer_options(&self) -> PeerOptions {
        self.cfg.peers.clone()
    }

    /// Devices profiled.
    pub(crate) fn len(&self) -> usize {
        self.devices.len()
    }

    /// Feeds one newly applied window of a device of `partition`: its mean moves the metric's
    /// EWMA (time constant `profile_window_ms`, weight `1 - exp(-Δt / τ)` for the Δt since the
    /// metric's previous window end). Windows not newer than the metric's last one, and
    /// non-finite means, are ignored. Once every metric of the device has reached this window's
    /// end, the profile is scored against its class's model (once per window): an event when the
    /// device leaves its group.
    pub(crate) fn observe(&mut self, partition: u32, s: &WindowSummary) -> Option<FleetEvent> {
        if !s.mean.is_finite() {
            return None;
        }
        if !self.devices.contains_key(&s.device) {
            if self.devices.len() >= self.cfg.max_devices {
                self.refused_windows = self.refused_windows.saturating_add(1);
                return None;
            }
            let profile = DeviceProfile {
                partition,
                label: label_of(&self.cfg.groups, &s.device),
                metrics: BTreeMap::new(),
                last_window: (s.start_ms, s.last_ts_ms),
                last_end_ms: i64::MIN,
                scored_to_ms: i64::MIN,
                gate: self.gate.clone(),
                standing: None,
                exported_to_ms: i64::MIN,
            };
            self.devices.insert(s.device.clone(), profile);
        }
        let tau = self.cfg.profile_window_ms as f64;
        let dev = self.devices.get_mut(&s.device)?;
        dev.partition = partition;
        let full = dev.metrics.len() >= MAX_METRICS;
        match dev.metrics.get_mut(&s.metric) {
            Some(m) => {
                if s.end_ms <= m.last_end_ms {
                    return None;
                }
                let dt = (s.end_ms - m.last_end_ms) as f64;
                let alpha = 1.0 - (-dt / tau).exp();
                m.prev_value = m.value;
                m.prev_end_ms = m.last_end_ms;
                m.value += alpha * (s.mean - m.value);
                m.windows = m.windows.saturating_add(1);
                m.last_end_ms = s.end_ms;
            }
            None if full => return None,
            None => {
                // A new metric: another class; the episode state starts over.
                dev.metrics.insert(
                    s.metric.clone(),
                    MetricProfile {
                        value: s.mean,
                        windows: 1,
                        last_end_ms: s.end_ms,
                        prev_value: f64::NAN,
                        prev_end_ms: i64::MIN,
                    },
                );
                dev.gate = self.gate.clone();
                dev.standing = None;
            }
        }
        if s.end_ms >= dev.last_end_ms {
            dev.last_end_ms = s.end_ms;
            dev.last_window = (s.start_ms, s.last_ts_ms);
        }
        if self
            .models
            .get(&dev.class())
            .is_some_and(|m| m.shift.is_some())
        {
            // Cluster mode: scored when the trainer's class medians reach this window (`adopt`).
            return None;
        }
        let window_done = s.end_ms > dev.scored_to_ms
            && dev.metrics.values().all(|m| m.last_end_ms >= s.end_ms)
            && dev.complete(self.cfg.min_windows);
        if !window_done {
            return None;
        }
        dev.scored_to_ms = s.end_ms;
        // Scored as of its previous window end, against the class's medians as of then: by the
        // time a device completes a window its peers have (nearly) all completed the one before,
        // so the device and the medians describe the same moment even when the whole fleet moves.
        let at_ms = dev.metrics.values().map(|m| m.prev_end_ms).max()?;
        let profile: Vec<f64> = dev
            .metrics
            .values()
            .map(|m| m.value_at(at_ms))
            .collect::<Option<_>>()?;
        let class = dev.class();
        let fit_medians = self.models.get(&class)?.medians.clone();
        let shift = self.shift(&class, &fit_medians, at_ms);
        let model = self.models.get(&class)?;
        let dev = self.devices.get_mut(&s.device)?;
        score_device(&s.device, dev, &profile, model, &shift, &self.agent)
    }

    /// How far the class's median profile has moved since its model was fitted (`fit_medians`),
    /// per metric: a fleet-wide change (load, season) moves every device and is taken out before
    /// scoring, so only a device moving *against* its peers leaves its group. The current medians
    /// are taken once per class and window end (agents align windows to the epoch, so that is
    /// once per window).
    fn shift(&mut self, class: &ClassKey, fit_medians: &[f64], at_ms: i64) -> Vec<f64> {
        let cached = self.medians.get(class).filter(|(t, _)| *t == at_ms);
        let now = match cached {
            Some((_, m)) => m.clone(),
            None => {
                let m = self.medians_at(class, Some(at_ms));
                self.medians.insert(class.clone(), (at_ms, m.clone()));
                m
            }
        };
        now.iter()
            .zip(fit_medians)
            .map(|(a, b)| if (a - b).is_finite() { a - b } else { 0.0 })
            .collect()
    }

    /// Per-metric median over the complete profiles of `class`, as of event time `at_ms` (devices
    /// without a value then are left out), or as they are now (`None`).
    fn medians_at(&self, class: &ClassKey, at_ms: Option<i64>) -> Vec<f64> {
        let n = class.metrics.len();
        let mut cols: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut row = Vec::with_capacity(n);
        for d in self.devices.values() {
            if d.complete(self.cfg.min_windows) && d.in_class(class) {
                row.clear();
                row.extend(
                    d.metrics
                        .values()
                        .map(|m| at_ms.map_or(Some(m.value), |t| m.value_at(t))),
                );
                if row.iter().all(Option::is_some) {
                    for (c, v) in cols.iter_mut().zip(row.iter().flatten()) {
                        c.push(*v);
                    }
                }
            }
        }
        cols.iter_mut().map(|c| median(c)).collect()
    }

    /// Seeds the profiles from the windows the state holds (e.g. reloaded from the store at
    /// startup), oldest window end first, so a restart does not start every profile over.
    /// Returns the windows fed. No model exists yet, so no event comes of it.
    pub(crate) fn seed(&mut self, state: &crate::state::FleetState) -> usize {
        let mut windows: Vec<(u32, &WindowSummary)> = state
            .devices()
            .values()
            .flat_map(|d| {
                d.metrics
                    .values()
                    .flat_map(move |s| s.windows.iter().map(move |w| (d.partition, w)))
            })
            .collect();
        windows.sort_by_key(|(_, w)| w.end_ms);
        for (partition, w) in &windows {
            self.observe(*partition, w);
        }
        windows.len()
    }

    /// The classes ready for a fit: every class with at least `min_devices` complete profiles,
    /// less the devices outside their group and the robust outliers (at most a quarter), so a
    /// device drifting between refits cannot drag its group's model along. First drops devices
    /// silent for two `profile_window_ms` (event time, counted from the median device's latest
    /// window, so one sender's clock far ahead cannot age everybody else out) and the models of
    /// emptied classes.
    pub(crate) fn training_sets(&mut self) -> Vec<TrainingSet> {
        self.prune();
        let mut classes: BTreeMap<ClassKey, Vec<Candidate>> = BTreeMap::new();
        for d in self.devices.values() {
            if d.complete(self.cfg.min_windows) {
                classes.entry(d.class()).or_default().push(Candidate {
                    values: d.metrics.values().map(|m| m.value).collect(),
                    outside: d.outside(),
                    end_ms: d.last_end_ms,
                });
            }
        }
        self.models.retain(|k, _| classes.contains_key(k));
        training_sets_of(classes, self.cfg.min_devices)
    }

    /// Drops the devices silent for two `profile_window_ms` (event time, counted from the median
    /// device's latest window, so one sender's clock far ahead cannot age everybody else out).
    pub(crate) fn prune(&mut self) {
        let mut ends: Vec<i64> = self.devices.values().map(|d| d.last_end_ms).collect();
        let stale_before = stale_before(&mut ends, self.cfg.profile_window_ms);
        self.devices.retain(|_, d| d.last_end_ms >= stale_before);
    }

    /// Cluster mode: the complete profiles whose window end moved since their last export (each
    /// at most once per window), marked exported; `member` (this aggregator) is named in them.
    pub(crate) fn export(&mut self, member: &str) -> Vec<pool::ProfileRecord> {
        let min_windows = self.cfg.min_windows;
        let mut out = Vec::new();
        for (id, d) in self.devices.iter_mut() {
            if d.last_end_ms > d.exported_to_ms && d.complete(min_windows) {
                d.exported_to_ms = d.last_end_ms;
                out.push(pool::ProfileRecord {
                    device: id.clone(),
                    metrics: d.metrics.keys().cloned().collect(),
                    values: d.metrics.values().map(|m| m.value).collect(),
                    windows: d.metrics.values().map(|m| m.windows).min().unwrap_or(0),
                    end_ms: d.last_end_ms,
                    outside: d.outside(),
                    member: member.to_string(),
                });
            }
        }
        out
    }

    /// Cluster mode: adopts a class model the trainer fitted (its version kept) with where the
    /// class stands now (its `shift`), and scores this member's devices of the class whose latest
    /// window the trainer's medians have reached: all of them against a new model, against the
    /// same model those with a window not scored yet. A device is never scored against medians
    /// older than its profile, so a backlog replayed in a burst does not look like a departure.
    pub(crate) fn adopt(&mut self, class: &ClassKey, cm: ClassModel) -> Vec<FleetEvent> {
        let n = class.metrics.len();
        let (shift, at_ms) = cm.shift.clone().unwrap_or((vec![0.0; n], i64::MAX));
        let same = self.models.get(class).is_some_and(|m| m.model == cm.model);
        let mut events = Vec::new();
        for (id, dev) in self.devices.iter_mut() {
            if !(dev.complete(self.cfg.min_windows) && dev.in_class(class)) {
                continue;
            }
            if dev.last_end_ms > at_ms || (same && dev.scored_to_ms >= dev.last_end_ms) {
                continue;
            }
            dev.scored_to_ms = dev.last_end_ms;
            let profile: Vec<f64> = dev.metrics.values().map(|m| m.value).collect();
            events.extend(score_device(id, dev, &profile, &cm, &shift, &self.agent));
        }
        self.medians.remove(class);
        self.models.insert(class.clone(), cm);
        events
    }

    /// Installs a class's new model (its version one above the previous one) fitted at wall-clock
    /// `now_ms` on `set`, and scores every complete profile of the class against it.
    pub(crate) fn install(
        &mut self,
        set: &TrainingSet,
        mut model: PeerModel,
        now_ms: i64,
    ) -> Vec<FleetEvent> {
        let version = self
            .models
            .get(&set.class)
            .map_or(1, |m| m.model.version.saturating_add(1));
        model.version = version;
        let n = set.class.metrics.len();
        let medians = (0..n)
            .map(|j| {
                let mut col: Vec<f64> = set.rows.chunks_exact(n).map(|r| r[j]).collect();
                median(&mut col)
            })
            .collect();
        let cm = ClassModel {
            model,
            fitted_at_ms: now_ms,
            trained: set.devices(),
            excluded: set.excluded,
            medians,
            trainer: None,
            shift: None,
        };
        // Against the whole class's medians now (the excluded devices included).
        let now = self.medians_at(&set.class, None);
        let shift: Vec<f64> = now
            .iter()
            .zip(&cm.medians)
            .map(|(a, b)| if (a - b).is_finite() { a - b } else { 0.0 })
            .collect();
        let mut events = Vec::new();
        for (id, dev) in self.devices.iter_mut() {
            if dev.complete(self.cfg.min_windows) && dev.in_class(&set.class) {
                let profile: Vec<f64> = dev.metrics.values().map(|m| m.value).collect();
                events.extend(score_device(id, dev, &profile, &cm, &shift, &self.agent));
            }
        }
        self.medians.remove(&set.class);
        self.models.insert(set.class.clone(), cm);
        events
    }

    /// Marks `devices`' profiles not exported yet.
    pub(crate) fn unexport(&mut self, devices: &[String]) {
        for d in devices {
            if let Some(p) = self.devices.get_mut(d) {
                p.exported_to_ms = i64::MIN;
            }
        }
    }

    /// Every class with its devices, its model and the devices currently outside their group.
    pub(crate) fn classes(&self) -> Vec<ClassReport> {
        let mut classes: BTreeMap<ClassKey, ClassReport> = BTreeMap::new();
        for (id, d) in &self.devices {
            let key = d.class();
            let r = classes.entry(key.clone()).or_insert_with(|| ClassReport {
                class: key.name(),
                label: key.label.clone(),
                metrics: key.metrics.clone(),
                devices: 0,
                complete: 0,
                model: self.models.get(&key).cloned(),
                outside: Vec::new(),
                standings: Vec::new(),
                standings_total: 0,
            });
            r.devices += 1;
            if d.complete(self.cfg.min_windows) {
                r.complete += 1;
            }
            if let Some(s) = d.standing.as_ref().filter(|_| d.outside()) {
                r.outside.push((id.clone(), s.clone()));
            }
            if let Some(s) = &d.standing {
                r.standings_total += 1;
                r.standings.push((id.clone(), s.clone()));
                // Keep the furthest MAX_LISTED (amortised: trim when twice over).
                if r.standings.len() >= 2 * MAX_LISTED {
                    trim_standings(&mut r.standings);
                }
            }
        }
        let mut out: Vec<ClassReport> = classes.into_values().collect();
        for r in &mut out {
            r.outside.sort_by(|a, b| a.0.cmp(&b.0));
            trim_standings(&mut r.standings);
        }
        out
    }

    /// The fitted models, by class.
    pub(crate) fn models(&self) -> &BTreeMap<ClassKey, ClassModel> {
        &self.models
    }

    /// A device's profile (metric → value) and standing, if profiled.
    #[cfg(test)]
    fn profile(&self, device: &str) -> Option<(Vec<MetricValue>, Option<Standing>)> {
        self.devices.get(device).map(|d| {
            (
                d.metrics
                    .iter()
                    .map(|(k, m)| (k.clone(), m.value))
                    .collect(),
                d.standing.clone(),
            )
        })
    }
}

/// A metric's name and profile value.
#[cfg(test)]
type MetricValue = (String, f64);

/// One complete profile of a class offered for a fit.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    /// Its value per metric of the class.
    pub values: Vec<f64>,
    /// Outside its group at its last scoring.
    pub outside: bool,
    /// Event time of its latest window (ms).
    pub end_ms: i64,
}

/// Where devices count as silent: two `profile_window_ms` before the median of `ends` (the
/// devices' latest window ends, reordered); `i64::MIN` when there are none.
pub(crate) fn stale_before(ends: &mut [i64], profile_window_ms: u64) -> i64 {
    if ends.is_empty() {
        return i64::MIN;
    }
    let mid = ends.len() / 2;
    let now = *ends.select_nth_unstable(mid).1;
    now.saturating_sub(2 * profile_window_ms.min(i64::MAX as u64 / 4) as i64)
}

/// The classes of `classes` ready for a fit: at least `min_devices` complete profiles, less the
/// devices outside their group and the robust outliers (at most a quarter of the class), so a
/// device drifting between refits cannot drag its group's model along; at least 3 left.
pub(crate) fn training_sets_of(
    classes: BTreeMap<ClassKey, Vec<Candidate>>,
    min_devices: usize,
) -> Vec<TrainingSet> {
    let mut out = Vec::new();
    for (class, members) in classes {
        if members.len() < min_devices {
            continue;
        }
        let n = class.metrics.len();
        let cap = members.len() / TRIM_SHARE;
        let outside = members.iter().filter(|d| d.outside).count();
        // Most of the class outside says the model is stale, not the devices: keep them all.
        let skip_outside = outside <= cap;
        let mut rows: Vec<f64> = Vec::with_capacity(members.len() * n);
        for d in &members {
            if !(skip_outside && d.outside) && d.values.len() == n {
                rows.extend(d.values.iter().copied());
            }
        }
        let left = if skip_outside { cap - outside } else { cap };
        let rows = trim_outliers(&rows, n, left);
        let to_ms = members.iter().map(|d| d.end_ms).max().unwrap_or(0);
        let set = TrainingSet {
            excluded: members.len() - rows.len() / n.max(1),
            class,
            rows,
            to_ms,
        };
        if set.devices() >= 3 {
            out.push(set);
        }
    }
    out
}

/// One class in `GET /api/fleet`.
#[derive(Debug, Clone)]
pub(crate) struct ClassReport {
    pub class: String,
    pub label: Option<String>,
    pub metrics: Vec<String>,
    pub devices: usize,
    pub complete: usize,
    pub model: Option<ClassModel>,
    pub outside: Vec<(String, Standing)>,
    /// This aggregator's devices of the class and their distance to their group, furthest first,
    /// at most [`MAX_LISTED`].
    pub standings: Vec<(String, Standing)>,
    /// Devices of the class with a standing.
    pub standings_total: usize,
}

/// Most device distances listed per class in `GET /api/fleet`.
pub(crate) const MAX_LISTED: usize = 100;

fn trim_standings(v: &mut Vec<(String, Standing)>) {
    v.sort_by(|a, b| b.1.ratio.total_cmp(&a.1.ratio).then_with(|| a.0.cmp(&b.0)));
    v.truncate(MAX_LISTED);
}

#[cfg(test)]
mod tests;
