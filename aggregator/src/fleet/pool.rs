//! Cluster mode's fleet-wide profile pool: the records every member writes to the `{prefix}_profiles`
//! bucket (one per device it owns), checked and gathered by the trainer into the training sets of
//! the class peer models. Pure: the bytes come in, the sets go out; the KV shell is in [`super::cluster`].

use super::robust::label_of;
use super::{training_sets_of, Candidate, ClassKey, TrainingSet, MAX_METRICS};
use crate::config::FleetConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Longest device id or metric name a record may carry (bytes).
pub(crate) const MAX_NAME: usize = 256;
/// Largest record accepted (bytes): 64 metrics of 256-byte names and their values fit.
pub(crate) const MAX_RECORD_BYTES: usize = 64 * 1024;

/// One device's profile as a member writes it to the profiles bucket (JSON, key = the device id
/// hex-encoded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProfileRecord {
    /// The device.
    pub device: String,
    /// Its metrics, sorted and distinct.
    pub metrics: Vec<String>,
    /// Its profile value per metric.
    pub values: Vec<f64>,
    /// Fewest windows behind any metric's value.
    pub windows: u32,
    /// Event time of its latest window (ms).
    pub end_ms: i64,
    /// Outside its peer group at its owner's last scoring.
    pub outside: bool,
    /// The member that owns the device and wrote the record.
    pub member: String,
}

impl ProfileRecord {
    /// Checks a record read under `key` (the device id, decoded): shapes, names, finite values.
    pub(crate) fn check(&self, key: &str) -> Result<(), String> {
        if self.device != key {
            return Err(format!(
                "holds the profile of {:?}, not of its key's device {key:?}",
                self.device
            ));
        }
        if self.device.len() > MAX_NAME || self.member.len() > MAX_NAME {
            return Err(format!("device or member id longer than {MAX_NAME} bytes"));
        }
        if self.metrics.is_empty() || self.metrics.len() > MAX_METRICS {
            return Err(format!(
                "{} metrics (want 1 to {MAX_METRICS})",
                self.metrics.len()
            ));
        }
        if self.values.len() != self.metrics.len() {
            return Err(format!(
                "{} values for {} metrics",
                self.values.len(),
                self.metrics.len()
            ));
        }
        if self
            .metrics
            .iter()
            .any(|m| m.is_empty() || m.len() > MAX_NAME)
        {
            return Err(format!(
                "a metric name empty or longer than {MAX_NAME} bytes"
            ));
        }
        if !self.metrics.windows(2).all(|w| w[0] < w[1]) {
            return Err("metrics not sorted and distinct".into());
        }
        if let Some(j) = self.values.iter().position(|v| !v.is_finite()) {
            return Err(format!("value of {:?} is not finite", self.metrics[j]));
        }
        Ok(())
    }
}

/// Why a record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not a valid record (bad JSON, shapes, names, numbers, or another device's).
    Invalid,
    /// `fleet.max_devices` profiles were already gathered.
    Full,
}

/// The profiles gathered for one fit, at most `fleet.max_devices` of them.
#[derive(Debug)]
pub(crate) struct Pool {
    cfg: FleetConfig,
    records: HashMap<String, ProfileRecord>,
}

impl Pool {
    /// An empty pool under `cfg` (its `max_devices`, `min_windows`, `min_devices`, `groups`).
    pub(crate) fn new(cfg: &FleetConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            records: HashMap::new(),
        }
    }

    /// Records gathered.
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// Takes the record `bytes` read under the key of device `key`: refused when malformed, not
    /// that device's, or the pool is full. A record of a device already held replaces it.
    pub(crate) fn insert(&mut self, key: &str, bytes: &[u8]) -> Result<(), (Refused, String)> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err((
                Refused::Invalid,
                format!("{} bytes (at most {MAX_RECORD_BYTES})", bytes.len()),
            ));
        }
        let r: ProfileRecord = serde_json::from_slice(bytes)
            .map_err(|e| (Refused::Invalid, format!("bad profile json: {e}")))?;
        r.check(key).map_err(|e| (Refused::Invalid, e))?;
        if !self.records.contains_key(key) && self.records.len() >= self.cfg.max_devices {
            return Err((
                Refused::Full,
                format!(
                    "fleet.max_devices ({}) profiles gathered",
                    self.cfg.max_devices
                ),
            ));
        }
        self.records.insert(key.to_string(), r);
        Ok(())
    }

    /// Forgets a device's record (deleted or purged from the bucket).
    pub(crate) fn remove(&mut self, key: &str) {
        self.records.remove(key);
    }

    /// Every class's per-metric median over its complete, not silent profiles (those outside
    /// their group included, as in static mode): where the class stands now, and the window end
    /// it describes (the median of the profiles' latest window ends: one clock far ahead cannot
    /// move it). The members take the class's movement since the fit out of their devices'
    /// profiles with it.
    pub(crate) fn class_medians(&self) -> BTreeMap<ClassKey, (Vec<f64>, i64)> {
        self.classes()
            .into_iter()
            .map(|(class, members)| {
                let n = class.metrics.len();
                let medians = (0..n)
                    .map(|j| {
                        let mut col: Vec<f64> = members.iter().map(|c| c.values[j]).collect();
                        super::robust::median(&mut col)
                    })
                    .collect();
                let mut ends: Vec<i64> = members.iter().map(|c| c.end_ms).collect();
                let at = super::robust::median_i64(&mut ends);
                (class, (medians, at))
            })
            .collect()
    }

    /// The complete, not silent profiles by class.
    fn classes(&self) -> BTreeMap<ClassKey, Vec<Candidate>> {
        let mut ends: Vec<i64> = self.records.values().map(|r| r.end_ms).collect();
        let stale = super::stale_before(&mut ends, self.cfg.profile_window_ms);
        let mut classes: BTreeMap<ClassKey, Vec<Candidate>> = BTreeMap::new();
        for r in self.records.values() {
            if r.end_ms < stale || r.windows < self.cfg.min_windows {
                continue;
            }
            let class = ClassKey {
                label: label_of(&self.cfg.groups, &r.device),
                metrics: r.metrics.clone(),
            };
            classes.entry(class).or_default().push(Candidate {
                values: r.values.clone(),
                outside: r.outside,
                end_ms: r.end_ms,
            });
        }
        classes
    }

    /// The classes ready for a fit, as in static mode: complete profiles (`min_windows`) not
    /// silent for two profile windows of event time behind the median device, grouped by metric
    /// set and the trainer's own `fleet.groups` label of the device (a record cannot choose it).
    pub(crate) fn training_sets(&self) -> Vec<TrainingSet> {
        training_sets_of(self.classes(), self.cfg.min_devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(device: &str, flow: f64, end_ms: i64) -> ProfileRecord {
        ProfileRecord {
            device: device.into(),
            metrics: vec!["current".into(), "flow".into()],
            values: vec![5.0, flow],
            windows: 5,
            end_ms,
            outside: false,
            member: "agg-1".into(),
        }
    }

    fn bytes(r: &ProfileRecord) -> Vec<u8> {
        serde_json::to_vec(r).unwrap()
    }

    fn cfg() -> FleetConfig {
        FleetConfig {
            enabled: true,
            min_devices: 3,
            max_devices: 10,
            min_windows: 3,
            profile_window_ms: 60_000,
            ..FleetConfig::default()
        }
    }

    #[test]
    fn profiles_of_every_member_make_one_training_set_per_class() {
        let mut pool = Pool::new(&cfg());
        for d in 0..6 {
            let mut r = record(&format!("pump-{d}"), 20.0 + d as f64 * 0.01, 1_000_000);
            r.member = format!("agg-{}", d % 3);
            pool.insert(&r.device.clone(), &bytes(&r)).unwrap();
        }
        // Another metric set: another class, too small to fit.
        let mut other = record("fan-1", 1.0, 1_000_000);
        other.metrics = vec!["rpm".into()];
        other.values = vec![900.0];
        pool.insert("fan-1", &bytes(&other)).unwrap();
        let sets = pool.training_sets();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].devices(), 6);
        assert_eq!(sets[0].class.metrics, ["current", "flow"]);
        assert_eq!(sets[0].to_ms, 1_000_000);
    }

    #[test]
    fn forged_and_malformed_records_are_refused() {
        let mut pool = Pool::new(&cfg());
        let good = record("pump-1", 20.0, 1);
        // Another device's record under this key.
        let e = pool.insert("pump-2", &bytes(&good)).unwrap_err();
        assert_eq!(e.0, Refused::Invalid);
        assert!(e.1.contains("pump-1"), "{}", e.1);
        for (what, r) in [
            ("values", {
                let mut r = good.clone();
                r.values.pop();
                r
            }),
            ("sorted", {
                let mut r = good.clone();
                r.metrics.reverse();
                r
            }),
            ("metrics", {
                let mut r = good.clone();
                r.metrics = (0..65).map(|i| format!("m{i:03}")).collect();
                r.values = vec![1.0; 65];
                r
            }),
            ("longer", {
                let mut r = good.clone();
                r.metrics[0] = "x".repeat(MAX_NAME + 1);
                r
            }),
        ] {
            let e = pool.insert("pump-1", &bytes(&r)).unwrap_err();
            assert!(e.1.contains(what), "{what}: {}", e.1);
        }
        // JSON has no infinity (serde writes null, refused), but a record built in-process is checked.
        let mut inf = good.clone();
        inf.values[0] = f64::INFINITY;
        assert!(inf.check("pump-1").unwrap_err().contains("finite"));
        assert!(pool.insert("pump-1", &bytes(&inf)).is_err());
        // Not JSON, NaN spelled as a string, unknown fields, huge.
        assert!(pool.insert("pump-1", b"\xff{").is_err());
        assert!(pool
            .insert("pump-1", br#"{"device":"pump-1","metrics":["a"],"values":["NaN"],"windows":1,"end_ms":0,"outside":false,"member":"m"}"#)
            .is_err());
        let mut v: serde_json::Value = serde_json::to_value(&good).unwrap();
        v["label"] = "forged".into();
        assert!(pool
            .insert("pump-1", &serde_json::to_vec(&v).unwrap())
            .is_err());
        assert!(pool
            .insert("pump-1", &vec![b' '; MAX_RECORD_BYTES + 1])
            .is_err());
        assert_eq!(pool.len(), 0);
        pool.insert("pump-1", &bytes(&good)).unwrap();
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn the_pool_holds_at_most_max_devices_and_replaces_a_device_s_record() {
        let mut pool = Pool::new(&cfg());
        for d in 0..10 {
            pool.insert(&format!("d{d}"), &bytes(&record(&format!("d{d}"), 1.0, 0)))
                .unwrap();
        }
        let e = pool
            .insert("d10", &bytes(&record("d10", 1.0, 0)))
            .unwrap_err();
        assert_eq!(e.0, Refused::Full);
        // A device already held is updated, not refused.
        pool.insert("d3", &bytes(&record("d3", 2.0, 5))).unwrap();
        assert_eq!(pool.len(), 10);
    }

    #[test]
    fn silent_and_incomplete_profiles_and_drifting_ones_stay_out_of_the_fit() {
        let mut pool = Pool::new(&FleetConfig {
            max_devices: 100,
            ..cfg()
        });
        for d in 0..8 {
            pool.insert(
                &format!("p{d}"),
                &bytes(&record(
                    &format!("p{d}"),
                    20.0 + d as f64 * 0.01,
                    10_000_000,
                )),
            )
            .unwrap();
        }
        // Silent for longer than two profile windows behind the median: left out.
        pool.insert("old", &bytes(&record("old", 20.0, 10_000_000 - 130_000)))
            .unwrap();
        // Too few windows yet.
        let mut young = record("young", 20.0, 10_000_000);
        young.windows = 2;
        pool.insert("young", &bytes(&young)).unwrap();
        // Outside its group at its owner: excluded (counted).
        let mut out = record("drifter", 30.0, 10_000_000);
        out.outside = true;
        pool.insert("drifter", &bytes(&out)).unwrap();
        let sets = pool.training_sets();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].devices(), 8);
        assert_eq!(sets[0].excluded, 1);
        // A clock far ahead on one device does not age the others out.
        pool.insert("ahead", &bytes(&record("ahead", 20.0, i64::MAX / 2)))
            .unwrap();
        assert_eq!(pool.training_sets()[0].devices(), 9);
    }
}
