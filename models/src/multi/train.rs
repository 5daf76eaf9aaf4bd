//! The aggregator side of training: each device's bounded training set, built from the
//! [`TrainingSample`]s its agent sends, and the schedule of fits (a device's own model once it has
//! enough rows, a model of its class until then). Pure: the caller persists the sets, passes its
//! clock in and runs the [`FitJob`]s.

use super::pca::{FitOptions, PcaModel};
use crate::wire::TrainingSample;
use crate::ModelError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Parameters of a [`Trainer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Most rows kept per device (its oldest samples are dropped first), ≥ `min_rows`.
    pub max_rows: usize,
    /// Rows a device's own model needs, ≥ 2.
    pub min_rows: usize,
    /// Samples (periods) those rows must come from, ≥ 1.
    pub min_samples: usize,
    /// A device is refitted when this long (ms, > 0) has passed since its last fit and new rows came.
    pub refit_interval_ms: i64,
    /// Devices with rows a class model needs, ≥ 1.
    pub class_min_devices: usize,
    /// Most devices with a training set (≥ 1); samples of further devices are refused.
    pub max_devices: usize,
    /// Most values (rows × features, 8 bytes each) in all sets together (≥ `max_rows`): the
    /// memory bound. A sample that would pass it is refused (its device keeps what it has).
    pub max_values: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_rows: 20_000,
            min_rows: 1_000,
            min_samples: 3,
            refit_interval_ms: 21_600_000,
            class_min_devices: 2,
            max_devices: 100_000,
            max_values: 50_000_000,
        }
    }
}

impl TrainConfig {
    /// Whether the parameters are usable; `Err` names the first field that is not, with its value.
    pub fn check(&self) -> Result<(), String> {
        let fail = |field: &str, rule: String, got: &dyn std::fmt::Display| {
            Err(format!("{field} must be {rule}, got {got}"))
        };
        if self.min_rows < 2 {
            return fail("min_rows", ">= 2".into(), &self.min_rows);
        }
        if self.max_rows < self.min_rows {
            let rule = format!(">= min_rows ({})", self.min_rows);
            return fail("max_rows", rule, &self.max_rows);
        }
        if self.max_values < self.max_rows {
            let rule = format!(">= max_rows ({})", self.max_rows);
            return fail("max_values", rule, &self.max_values);
        }
        if self.refit_interval_ms <= 0 {
            return fail("refit_interval_ms", "> 0".into(), &self.refit_interval_ms);
        }
        for (field, v) in [
            ("min_samples", self.min_samples),
            ("class_min_devices", self.class_min_devices),
            ("max_devices", self.max_devices),
        ] {
            if v == 0 {
                return fail(field, ">= 1".into(), &v);
            }
        }
        Ok(())
    }
}

/// One device's training set (persisted by the aggregator).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceSet {
    /// The device.
    pub device: String,
    /// The agent that sent the latest sample (models are published to it).
    pub agent: String,
    /// Class key given by the caller (devices of a class share a fallback model).
    pub class: String,
    /// Metric names, in the order of every row's values.
    pub features: Vec<String>,
    /// The kept samples, oldest period first.
    pub samples: VecDeque<KeptSample>,
    /// Total rows in `samples`.
    pub rows: usize,
    /// Rows added since the last fit started.
    pub rows_since_fit: usize,
    /// Samples left out because they held anomalies.
    pub excluded: u64,
    /// Aggregator clock when the last fit started (`None`: never, or the features changed since).
    pub last_fit_ms: Option<i64>,
    /// Version of the last model fitted for this device (0: none).
    pub version: u64,
    /// The last fit was a class model (the device was short of its own data): it gets its own
    /// model as soon as it has enough, without waiting for the refit interval.
    #[serde(default)]
    pub class_fit: bool,
}

/// One kept training sample: its period and its rows, flat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptSample {
    /// Start of the sample's period (event time, ms).
    pub from_ms: i64,
    /// End of the period (exclusive).
    pub to_ms: i64,
    /// Vectors the agent saw in the period.
    pub seen: u64,
    /// Rows, row-major (`rows × features.len()` values).
    pub values: Vec<f64>,
}

/// What [`Trainer::add`] did with a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    /// Kept, in period order; the oldest periods are dropped while the set holds over `max_rows`
    /// rows (a late sample older than every kept one then goes at once).
    Kept,
    /// It replaced the kept sample of the same period (an idempotent resend).
    Replaced,
    /// Left out: it holds anomalies (any kept sample of the same period is dropped too). It is
    /// counted in the device's `excluded`, creating an empty set for a new device.
    Excluded,
    /// The feature set changed: the old samples were dropped and this one kept.
    Reset,
    /// Refused: the sample fails its check, or `max_devices` sets exist already.
    Refused(String),
}

/// Every device's training set and the fit schedule. See [`Trainer::due`].
#[derive(Debug, Clone)]
pub struct Trainer {
    cfg: TrainConfig,
    sets: BTreeMap<String, DeviceSet>,
    /// Values (rows × features) in all sets.
    values: usize,
}

/// Devices of each class (class key and features) in [`Trainer::due`]: those with rows, and their rows.
type Classes<'a> = HashMap<(&'a str, &'a [String]), (Vec<&'a DeviceSet>, usize)>;

/// A fit to run: the data and identity of one device's next model.
#[derive(Debug, Clone, PartialEq)]
pub struct FitJob {
    /// The device (the model's key).
    pub device: String,
    /// The agent to publish the model to.
    pub agent: String,
    /// Metric names, in the order of every row's values.
    pub features: Vec<String>,
    /// Training rows, row-major.
    pub rows: Vec<f64>,
    /// Start of the training data's event time.
    pub from_ms: i64,
    /// End of the training data's event time.
    pub to_ms: i64,
    /// Version of the model to fit: the device's last version + 1.
    pub version: u64,
    /// `Some(class)` for a model fitted on the device's class rather than its own data.
    pub class: Option<String>,
}

impl FitJob {
    /// Fits the model: key = device, version = `self.version`, [`FitOptions::default`].
    pub fn fit(&self) -> Result<PcaModel, ModelError> {
        let mut model = PcaModel::fit(
            &self.device,
            self.features.clone(),
            &self.rows,
            self.from_ms,
            self.to_ms,
            &FitOptions::default(),
        )?;
        model.version = self.version;
        Ok(model)
    }
}

impl Trainer {
    /// Replaces the bounds and pace (a reload); the sets held are kept, and shrink to lowered
    /// bounds as their next samples arrive. `cfg` should pass [`TrainConfig::check`].
    pub fn set_config(&mut self, cfg: TrainConfig) {
        self.cfg = cfg;
    }

    /// The bounds and pace in force.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// A trainer without sets; `cfg` should pass [`TrainConfig::check`].
    pub fn new(cfg: TrainConfig) -> Self {
        Self {
            cfg,
            sets: BTreeMap::new(),
            values: 0,
        }
    }

    /// Puts back a set read from the store at start (replacing any set of the same device); restored
    /// sets are never refused, even beyond `max_devices`.
    pub fn restore(&mut self, set: DeviceSet) {
        self.values += set.rows * set.features.len();
        if let Some(old) = self.sets.insert(set.device.clone(), set) {
            self.values -= old.rows * old.features.len();
        }
    }

    /// Values (rows × features) held in all sets: what [`TrainConfig::max_values`] bounds.
    pub fn values(&self) -> usize {
        self.values
    }

    /// Adds `sample` from `agent` to its device's set; `class` is the device's class key, computed
    /// by the caller, stored as given (the latest sample's class wins). A device's set belongs to
    /// the agent whose sample started it: samples of it from any other agent are refused.
    pub fn add(&mut self, agent: &str, class: &str, sample: TrainingSample) -> Added {
        if let Err(e) = sample.check() {
            return Added::Refused(e);
        }
        if !self.sets.contains_key(&sample.device) && self.sets.len() >= self.cfg.max_devices {
            return Added::Refused(format!(
                "max_devices ({}) reached, device {:?} refused",
                self.cfg.max_devices, sample.device
            ));
        }
        if let Some(set) = self.sets.get(&sample.device) {
            if !set.agent.is_empty() && set.agent != agent {
                // An agent may forge samples of any device id; it must not mix them into
                // another gateway's set, nor take the device's model away from it.
                return Added::Refused(format!(
                    "device {:?} is trained from agent {:?}'s samples; agent {agent:?}'s are refused",
                    sample.device, set.agent
                ));
            }
        }
        let incoming = sample.rows.len() * sample.features.len();
        if sample.anomalies == 0 && self.values + incoming > self.cfg.max_values {
            return Added::Refused(format!(
                "max_values ({}) reached: {} values held, the sample of device {:?} brings {incoming}",
                self.cfg.max_values, self.values, sample.device
            ));
        }
        let device = sample.device.clone();
        let held = |t: &Self| t.sets.get(&device).map_or(0, |s| s.rows * s.features.len());
        let before = held(self);
        let added = self.insert(agent, class, sample);
        self.values = self.values - before + held(self);
        added
    }

    /// [`Trainer::add`] once the sample passed its checks and bounds.
    fn insert(&mut self, agent: &str, class: &str, sample: TrainingSample) -> Added {
        let set = self
            .sets
            .entry(sample.device.clone())
            .or_insert_with(|| DeviceSet {
                device: sample.device.clone(),
                features: sample.features.clone(),
                ..DeviceSet::default()
            });
        agent.clone_into(&mut set.agent);
        class.clone_into(&mut set.class);
        let same_period = set.samples.iter().position(|s| s.from_ms == sample.from_ms);
        if sample.anomalies > 0 {
            set.excluded += 1;
            if let Some(i) = same_period.filter(|_| set.features == sample.features) {
                let gone = set.samples.remove(i).map_or(0, |s| s.values.len());
                set.rows -= gone / set.features.len();
            }
            return Added::Excluded;
        }
        let (n, from_ms) = (sample.features.len(), sample.from_ms);
        let mut values: Vec<f64> = sample.rows.into_iter().flatten().collect();
        values.truncate(self.cfg.max_rows * n);
        let kept = KeptSample {
            from_ms: sample.from_ms,
            to_ms: sample.to_ms,
            seen: sample.seen,
            values,
        };
        let new_rows = kept.values.len() / n;
        let (added, fresh) = if set.features != sample.features {
            set.features = sample.features;
            set.samples.clear();
            set.rows = 0;
            set.rows_since_fit = 0;
            // No model fits the new features: fit again as soon as there is data.
            set.last_fit_ms = None;
            set.samples.push_back(kept);
            (Added::Reset, true)
        } else if let Some(i) = same_period {
            let old = std::mem::replace(&mut set.samples[i], kept);
            set.rows -= old.values.len() / n;
            // An identical resend brings nothing new to fit on.
            (Added::Replaced, old != set.samples[i])
        } else {
            // Kept in period order, so trimming drops the oldest period even after a late resend.
            let at = set.samples.partition_point(|s| s.from_ms < kept.from_ms);
            set.samples.insert(at, kept);
            (Added::Kept, true)
        };
        set.rows += new_rows;
        while set.rows > self.cfg.max_rows && set.samples.len() > 1 {
            let old = set.samples.pop_front().map_or(0, |s| s.values.len());
            set.rows -= old / n;
        }
        // Unless the sample was the oldest of a full set, and so dropped at once.
        if fresh && set.samples.front().is_some_and(|f| f.from_ms <= from_ms) {
            set.rows_since_fit += new_rows;
        }
        added
    }

    /// The set of `device`, if it has one.
    pub fn get(&self, device: &str) -> Option<&DeviceSet> {
        self.sets.get(device)
    }

    /// Every set, by device name.
    pub fn sets(&self) -> impl Iterator<Item = &DeviceSet> {
        self.sets.values()
    }

    /// Number of devices with a set.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    /// Whether no device has a set.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// The fits due at aggregator time `now_ms`, marking each job's device as fitting
    /// (`last_fit_ms = now_ms`, `rows_since_fit = 0`) so no job is handed out twice.
    ///
    /// A device is *due* when it never had a fit (for its current features), or when
    /// `refit_interval_ms` has passed since its last one and new rows came since. A due device
    /// with at least `min_rows` rows from at least `min_samples` samples gets a job on its own rows.
    /// A due device with less gets a class job when its class (same class key and features) holds
    /// rows of at least `class_min_devices` devices and `min_rows` rows in total: the rows of all
    /// those devices (device name order, oldest sample first), thinned to every k-th row to stay
    /// within `max_rows`. Other devices wait for data. At most `max_jobs` jobs are handed out
    /// (each holds a copy of its rows): call again for the rest.
    pub fn due(&mut self, now_ms: i64, max_jobs: usize) -> Vec<FitJob> {
        let cfg = &self.cfg;
        let own_data = |s: &DeviceSet| s.rows >= cfg.min_rows && s.samples.len() >= cfg.min_samples;
        let is_due = |s: &DeviceSet| match s.last_fit_ms {
            None => true,
            Some(_) if s.class_fit && own_data(s) => true,
            Some(t) => now_ms.saturating_sub(t) >= cfg.refit_interval_ms && s.rows_since_fit > 0,
        };
        // Each class's devices with rows, by device name.
        let mut classes: Classes = HashMap::new();
        for s in self.sets.values().filter(|s| s.rows > 0) {
            let c = classes.entry((&s.class, &s.features)).or_default();
            c.0.push(s);
            c.1 += s.rows;
        }
        let mut jobs = Vec::new();
        for s in self.sets.values().filter(|s| is_due(s)) {
            if jobs.len() >= max_jobs {
                break;
            }
            let own = own_data(s);
            let members: &[&DeviceSet] = match classes.get(&(&s.class, &s.features)) {
                _ if own => &[s],
                Some((c, rows)) if c.len() >= cfg.class_min_devices && *rows >= cfg.min_rows => c,
                _ => continue,
            };
            let total: usize = members.iter().map(|m| m.rows).sum();
            let step = total.div_ceil(cfg.max_rows).max(1);
            let n = s.features.len();
            let mut rows = Vec::with_capacity(total.div_ceil(step) * n);
            let (mut from_ms, mut to_ms) = (i64::MAX, i64::MIN);
            let mut i = 0;
            for k in members.iter().flat_map(|m| &m.samples) {
                from_ms = from_ms.min(k.from_ms);
                to_ms = to_ms.max(k.to_ms);
                for row in k.values.chunks_exact(n) {
                    if i % step == 0 {
                        rows.extend_from_slice(row);
                    }
                    i += 1;
                }
            }
            jobs.push(FitJob {
                device: s.device.clone(),
                agent: s.agent.clone(),
                features: s.features.clone(),
                rows,
                from_ms,
                to_ms,
                version: s.version + 1,
                class: (!own).then(|| s.class.clone()),
            });
        }
        for job in &jobs {
            if let Some(s) = self.sets.get_mut(&job.device) {
                s.last_fit_ms = Some(now_ms);
                s.rows_since_fit = 0;
                s.class_fit = job.class.is_some();
            }
        }
        jobs
    }

    /// The fit of `device` succeeded with model `version`: records it (the version never goes back).
    pub fn fitted(&mut self, device: &str, version: u64) {
        if let Some(s) = self.sets.get_mut(device) {
            s.version = s.version.max(version);
        }
    }

    /// The fit of `device` failed at `now_ms`: it is due again once `refit_interval_ms` has passed,
    /// even without new rows (never in a tight retry loop).
    pub fn failed(&mut self, device: &str, now_ms: i64) {
        if let Some(s) = self.sets.get_mut(device) {
            s.last_fit_ms = Some(now_ms);
            s.rows_since_fit = s.rows_since_fit.max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn trainer(max_rows: usize, min_rows: usize, max_devices: usize) -> Trainer {
        let (min_samples, refit_interval_ms, class_min_devices) = (3, 6 * HOUR, 2);
        let cfg = TrainConfig {
            max_rows,
            min_rows,
            min_samples,
            refit_interval_ms,
            class_min_devices,
            max_devices,
            max_values: usize::MAX,
        };
        cfg.check().unwrap();
        Trainer::new(cfg)
    }

    /// A clean sample of `device` for hour `p`: `rows` correlated vectors of 3 features.
    fn sample(device: &str, p: i64, rows: usize) -> TrainingSample {
        let rows = (0..rows)
            .map(|i| {
                let x = ((p * 7 + i as i64) as f64 * 0.37).sin();
                let w = ((i as f64 + 0.5) * 1.618).sin() * 0.05;
                vec![2.0 * x + w, x - w, 40.0 + x * 0.5 + w * w]
            })
            .collect();
        let features = ["current", "flow", "temp"].map(String::from).into();
        let (device, from_ms, to_ms) = (device.into(), p * HOUR, (p + 1) * HOUR);
        TrainingSample {
            device,
            features,
            from_ms,
            to_ms,
            seen: 1000,
            anomalies: 0,
            rows,
        }
    }

    #[test]
    fn config_check_names_the_field() {
        TrainConfig::default().check().unwrap();
        let bad = |f: fn(&mut TrainConfig)| {
            let mut c = TrainConfig::default();
            f(&mut c);
            c.check().unwrap_err()
        };
        assert_eq!(bad(|c| c.min_rows = 1), "min_rows must be >= 2, got 1");
        assert_eq!(
            bad(|c| c.max_rows = 999),
            "max_rows must be >= min_rows (1000), got 999"
        );
        assert_eq!(
            bad(|c| c.min_samples = 0),
            "min_samples must be >= 1, got 0"
        );
        assert!(bad(|c| c.refit_interval_ms = 0).starts_with("refit_interval_ms"));
        assert!(bad(|c| c.class_min_devices = 0).starts_with("class_min_devices"));
        assert!(bad(|c| c.max_devices = 0).starts_with("max_devices"));
    }

    /// (rows, samples, rows since fit, excluded) of `device`.
    fn state(t: &Trainer, device: &str) -> (usize, usize, usize, u64) {
        let s = t.get(device).unwrap();
        assert_eq!(
            s.rows * 3,
            s.samples.iter().map(|k| k.values.len()).sum::<usize>()
        );
        (s.rows, s.samples.len(), s.rows_since_fit, s.excluded)
    }

    #[test]
    fn sets_are_bounded_resends_replace_anomalies_are_excluded() {
        let mut t = trainer(100, 60, 3);
        for p in 0..3 {
            assert_eq!(t.add("a1", "c", sample("pump", p, 40)), Added::Kept);
        }
        // 120 rows > max_rows 100: the oldest sample went.
        assert_eq!(state(&t, "pump"), (80, 2, 120, 0));
        assert_eq!(t.get("pump").unwrap().samples[0].from_ms, HOUR);
        // A late sample of the dropped period is older than all: it goes again, bringing nothing.
        assert_eq!(t.add("a1", "c", sample("pump", 0, 40)), Added::Kept);
        assert_eq!(state(&t, "pump"), (80, 2, 120, 0));
        assert_eq!(t.get("pump").unwrap().samples[0].from_ms, HOUR);
        // A resend of a kept period replaces it; identical, it brings no new rows to fit on.
        assert_eq!(t.add("a1", "c", sample("pump", 2, 40)), Added::Replaced);
        assert_eq!(state(&t, "pump"), (80, 2, 120, 0));
        assert_eq!(t.get("pump").unwrap().agent, "a1");
        assert_eq!(t.add("a1", "c", sample("pump", 2, 10)), Added::Replaced);
        assert_eq!(state(&t, "pump"), (50, 2, 130, 0));
        // A sample with anomalies is left out, and takes a kept sample of its period with it.
        for (p, anomalies) in [(3, 1), (2, 2)] {
            let bad = TrainingSample {
                anomalies,
                ..sample("pump", p, 10)
            };
            assert_eq!(t.add("a1", "c", bad), Added::Excluded);
        }
        assert_eq!(state(&t, "pump"), (40, 1, 130, 2));
    }

    #[test]
    fn feature_change_resets_and_bad_samples_or_devices_are_refused() {
        let mut t = trainer(100, 60, 3);
        t.add("a", "c", sample("pump", 0, 40));
        t.add("a", "c", sample("pump", 1, 40));
        t.fitted("pump", 4);
        let mut other = sample("pump", 2, 30);
        other.features[2] = "vibration".into();
        assert_eq!(t.add("a", "c2", other), Added::Reset);
        assert_eq!(state(&t, "pump"), (30, 1, 30, 0));
        let s = t.get("pump").unwrap();
        assert_eq!(
            (s.features[2].as_str(), s.class.as_str()),
            ("vibration", "c2")
        );
        assert_eq!((s.version, s.last_fit_ms), (4, None));
        // check() failures and devices beyond max_devices are refused, naming why.
        let mut broken = sample("fan", 0, 5);
        broken.rows[1][0] = f64::NAN;
        let refused = t.add("a", "c", broken);
        assert!(matches!(refused, Added::Refused(e) if e.contains("rows[1][0]")));
        assert!(t.get("fan").is_none());
        t.add("a", "c", sample("fan", 0, 5));
        t.add("a", "c", sample("valve", 0, 5));
        let refused = t.add("a", "c", sample("motor", 0, 5));
        assert!(matches!(refused, Added::Refused(e) if e.contains("max_devices (3)")));
        assert_eq!(t.len(), 3);
        assert_eq!(t.add("a", "c", sample("fan", 1, 5)), Added::Kept);
    }

    #[test]
    fn device_job_once_then_after_interval_and_new_rows_and_it_fits() {
        let mut t = trainer(100, 60, 3);
        t.add("a1", "c", sample("pump", 0, 30));
        t.add("a1", "c", sample("pump", 1, 30));
        assert!(
            t.due(0, usize::MAX).is_empty(),
            "2 samples < min_samples, no class"
        );
        t.add("a1", "c", sample("pump", 2, 30));
        let mut jobs = t.due(10 * HOUR, usize::MAX);
        assert_eq!(jobs.len(), 1);
        let job = jobs.pop().unwrap();
        assert_eq!(
            (&*job.device, &*job.agent, job.class.as_deref()),
            ("pump", "a1", None)
        );
        assert_eq!((job.rows.len(), job.from_ms, job.to_ms), (270, 0, 3 * HOUR));
        let model = job.fit().unwrap();
        model.validate().unwrap();
        model.check_compatible(&job.features).unwrap();
        assert_eq!((&*model.key, model.version, model.samples), ("pump", 1, 90));
        assert_eq!((model.trained_from_ms, model.trained_to_ms), (0, 3 * HOUR));
        assert!(t.due(10 * HOUR, usize::MAX).is_empty(), "handed out once");
        t.fitted("pump", job.version);
        assert!(t.due(30 * HOUR, usize::MAX).is_empty(), "no new rows");
        t.add("a1", "c", sample("pump", 3, 10));
        assert!(
            t.due(16 * HOUR - 1, usize::MAX).is_empty(),
            "interval not over"
        );
        let again = t.due(16 * HOUR, usize::MAX);
        assert_eq!((again.len(), again[0].rows.len()), (1, 300));
        assert_eq!(again[0].fit().unwrap().version, 2);
        // A failed fit is retried after the interval, not before, even without new rows.
        t.failed("pump", 16 * HOUR);
        assert!(t.due(22 * HOUR - 1, usize::MAX).is_empty());
        assert_eq!(t.due(22 * HOUR, usize::MAX)[0].version, 2);
        let empty = FitJob {
            rows: vec![],
            ..job
        };
        assert!(matches!(empty.fit(), Err(ModelError::InvalidData { .. })));
    }

    #[test]
    fn class_job_for_a_device_with_little_data() {
        let mut t = trainer(150, 80, 10);
        for p in 0..3 {
            t.add("a1", "pumps", sample("pump-1", p, 30));
            t.add("a2", "pumps", sample("pump-2", p, 30));
        }
        t.add("a3", "pumps", sample("pump-3", 0, 10));
        t.add("a3", "fans", sample("fan", 0, 10));
        // Jobs hold copies of their rows: handed out at most `max_jobs` at a time.
        let mut jobs = t.due(0, 2);
        assert_eq!(jobs.len(), 2);
        jobs.extend(t.due(0, usize::MAX));
        // pump-1 and -2 have their own data; pump-3 borrows its class's; the fan has neither.
        let who: Vec<_> = jobs
            .iter()
            .map(|j| (&*j.device, j.class.as_deref()))
            .collect();
        let pumps = Some("pumps");
        assert_eq!(who, [("pump-1", None), ("pump-2", None), ("pump-3", pumps)]);
        // 190 class rows thinned to every 2nd: 95 rows, within max_rows, from pump-1's first.
        let class = &jobs[2];
        assert_eq!((class.rows.len(), &*class.agent), (95 * 3, "a3"));
        let first = &t.get("pump-1").unwrap().samples[0].values;
        assert_eq!(class.rows[..3], first[..3]);
        let model = class.fit().unwrap();
        model.validate().unwrap();
        assert_eq!((&*model.key, model.version), ("pump-3", 1));
        assert!(t.due(0, usize::MAX).is_empty());
        t.fitted("pump-3", 1);
        // Once pump-3 has data of its own it gets its own model at once, not a refit interval later.
        for p in 1..3 {
            t.add("a3", "pumps", sample("pump-3", p, 40));
        }
        let jobs = t.due(1, usize::MAX);
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert_eq!(
            (&*jobs[0].device, jobs[0].class.as_deref(), jobs[0].version),
            ("pump-3", None, 2)
        );
        assert!(t.due(2, usize::MAX).is_empty());
    }

    /// The memory bound holds over all devices, counts what restores bring, and a refused
    /// sample leaves its device's set as it was.
    #[test]
    fn the_values_of_all_sets_stay_within_max_values() {
        let mut t = trainer(100, 60, 10);
        t.cfg.max_values = 3 * 30 * 3 + 10;
        for p in 0..3 {
            assert_eq!(t.add("a", "c", sample("d1", p, 30)), Added::Kept);
        }
        assert_eq!(t.values(), 270);
        assert!(
            matches!(t.add("a", "c", sample("d2", 0, 30)), Added::Refused(e) if e.contains("max_values"))
        );
        assert!(t.get("d2").is_none());
        assert_eq!(t.values(), 270);
        // Trimming to max_rows frees values: d1's oldest sample goes, so a new one fits.
        t.cfg.max_rows = 60;
        assert_eq!(t.add("a", "c", sample("d1", 3, 3)), Added::Kept);
        assert_eq!(t.values(), t.get("d1").unwrap().rows * 3);
        let mut other = trainer(100, 60, 10);
        other.restore(t.get("d1").unwrap().clone());
        assert_eq!(other.values(), t.values());
        // Another agent's samples of d1 are refused: they could be forged.
        assert!(
            matches!(t.add("b", "c", sample("d1", 9, 3)), Added::Refused(e) if e.contains("agent \"b\""))
        );
        // Forged magnitudes no agent would send are refused like any bad sample.
        let mut huge = sample("d3", 0, 5);
        huge.rows[2][1] = 1e200;
        assert!(matches!(t.add("a", "c", huge), Added::Refused(e) if e.contains("rows[2][1]")));
    }

    #[test]
    fn device_set_serde_round_trips() {
        let mut t = trainer(100, 60, 3);
        t.add("agent", "c", sample("pump", 1, 5));
        t.add("agent", "c", sample("pump", 0, 7));
        let periods: Vec<i64> = t
            .sets()
            .flat_map(|s| &s.samples)
            .map(|k| k.from_ms)
            .collect();
        assert_eq!(periods, [0, HOUR], "kept in period order");
        t.fitted("pump", 3);
        t.failed("pump", 42);
        let set = t.get("pump").unwrap().clone();
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(serde_json::from_str::<DeviceSet>(&json).unwrap(), set);
        let mut restored = trainer(100, 60, 3);
        restored.restore(serde_json::from_str(&json).unwrap());
        assert_eq!(restored.get("pump"), Some(&set));
        assert_eq!((restored.len(), restored.sets().count()), (1, 1));
    }
}
