//! Training sets and device models in the aggregator's sled database: three trees beside the
//! state's. `training_sets` holds each device's set without its samples (JSON), `training_samples`
//! each kept sample under `len(device) (u32 BE) ++ device ++ from_ms (i64 BE, sign flipped)`, so a
//! new sample writes only itself and the set's header, and `models` each fitted model (JSON).

use super::StoredModel;
use crate::store::StoreError;
use edgewatch_models::multi::{DeviceSet, KeptSample};
use std::path::Path;

const SETS: &str = "training_sets";
const SAMPLES: &str = "training_samples";
const MODELS: &str = "models";

fn device_prefix(device: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + device.len() + 8);
    k.extend_from_slice(&(device.len() as u32).to_be_bytes());
    k.extend_from_slice(device.as_bytes());
    k
}

fn sample_key(device: &str, from_ms: i64) -> Vec<u8> {
    let mut k = device_prefix(device);
    // Flipping the sign bit makes the big-endian bytes sort like the numbers.
    k.extend_from_slice(&((from_ms as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// The trees, opened on a database.
pub(crate) struct TrainingTrees {
    sets: sled::Tree,
    samples: sled::Tree,
    models: sled::Tree,
}

fn sled_err(path: &Path, op: &'static str, key: String) -> impl FnOnce(sled::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Sled {
        path,
        op,
        key,
        source,
    }
}

fn corrupt(path: &Path, key: String, reason: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        key,
        reason,
    }
}

impl TrainingTrees {
    pub(crate) fn open(db: &sled::Db) -> sled::Result<Self> {
        Ok(Self {
            sets: db.open_tree(SETS)?,
            samples: db.open_tree(SAMPLES)?,
            models: db.open_tree(MODELS)?,
        })
    }

    /// Stores `set`: its header, its samples not stored yet and the one starting at `changed` (a
    /// resend may have replaced it), and deletes the stored samples it no longer holds (dropped as
    /// the oldest, or by a reset).
    pub(crate) fn put_set(
        &self,
        path: &Path,
        set: &DeviceSet,
        changed: Option<i64>,
    ) -> Result<(), StoreError> {
        let name = || format!("{SETS}/{:?}", set.device);
        let prefix = device_prefix(&set.device);
        let mut batch = sled::Batch::default();
        let mut stored = std::collections::BTreeSet::new();
        for item in self.samples.scan_prefix(&prefix).keys() {
            stored.insert(item.map_err(sled_err(path, "scan", name()))?.to_vec());
        }
        for s in &set.samples {
            let k = sample_key(&set.device, s.from_ms);
            if !stored.remove(&k) || changed == Some(s.from_ms) {
                let v = serde_json::to_vec(s)
                    .map_err(|e| corrupt(path, name(), format!("sample not encodable: {e}")))?;
                batch.insert(k, v);
            }
        }
        for k in stored {
            batch.remove(k);
        }
        self.samples
            .apply_batch(batch)
            .map_err(sled_err(path, "write", name()))?;
        let header = DeviceSet {
            samples: Default::default(),
            ..set.clone()
        };
        let v = serde_json::to_vec(&header)
            .map_err(|e| corrupt(path, name(), format!("set not encodable: {e}")))?;
        self.sets
            .insert(set.device.as_bytes(), v)
            .map_err(sled_err(path, "write", name()))?;
        Ok(())
    }

    pub(crate) fn put_model(&self, path: &Path, m: &StoredModel) -> Result<(), StoreError> {
        let name = format!("{MODELS}/{:?}", m.model.key);
        let v = serde_json::to_vec(m)
            .map_err(|e| corrupt(path, name.clone(), format!("model not encodable: {e}")))?;
        self.models
            .insert(m.model.key.as_bytes(), v)
            .map_err(sled_err(path, "write", name))?;
        Ok(())
    }

    /// Every stored set (with its samples, oldest first) and model.
    pub(crate) fn load(
        &self,
        path: &Path,
    ) -> Result<(Vec<DeviceSet>, Vec<StoredModel>), StoreError> {
        let mut sets = Vec::new();
        for item in self.sets.iter() {
            let (k, v) = item.map_err(sled_err(path, "scan", SETS.into()))?;
            let name = format!("{SETS}/{:?}", String::from_utf8_lossy(&k));
            let mut set: DeviceSet = serde_json::from_slice(&v)
                .map_err(|e| corrupt(path, name.clone(), format!("bad set json: {e}")))?;
            if set.device.as_bytes() != k.as_ref() {
                return Err(corrupt(
                    path,
                    name,
                    format!("value is the set of {:?}", set.device),
                ));
            }
            for item in self.samples.scan_prefix(device_prefix(&set.device)) {
                let (_, v) = item.map_err(sled_err(path, "scan", name.clone()))?;
                let s: KeptSample = serde_json::from_slice(&v)
                    .map_err(|e| corrupt(path, name.clone(), format!("bad sample json: {e}")))?;
                set.samples.push_back(s);
            }
            sets.push(set);
        }
        let mut models = Vec::new();
        for item in self.models.iter() {
            let (k, v) = item.map_err(sled_err(path, "scan", MODELS.into()))?;
            let name = format!("{MODELS}/{:?}", String::from_utf8_lossy(&k));
            let m: StoredModel = serde_json::from_slice(&v)
                .map_err(|e| corrupt(path, name.clone(), format!("bad model json: {e}")))?;
            m.model
                .validate()
                .map_err(|e| corrupt(path, name, format!("invalid model: {e}")))?;
            models.push(m);
        }
        Ok((sets, models))
    }
}
