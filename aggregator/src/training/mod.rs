//! Device models trained at the aggregator from the agents' training lanes: the bounded training
//! sets ([`Trainer`], pure, in the models crate) behind a mutex, the fit task (fits on a blocking
//! thread when a device is due), and what happens to a fitted model: stored with the state (sled),
//! then published retained on `{prefix}/models/{agent}/{key}` for the agent that runs the device.
//!
//! A training sample is applied like a summary: its lane's seq is checked and noted, the sample is
//! stored, and the lane is acknowledged only after the store's flush. A fitted model goes through
//! the apply loop too ([`crate::consumer::Input::Fitted`]), so the store has one writer.

use crate::config::{FleetGroup, TrainingConfig};
use crate::consumer::Input;
use crate::store::{StateStore, StoreError};
use crate::Shared;
pub(crate) mod store;

use edgewatch_models::multi::{Added, DeviceSet, PcaModel, TrainConfig, Trainer};
use edgewatch_models::wire::{model_key, Topics, TrainingSample};
use rumqttc::{AsyncClient, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A model the aggregator fitted, as stored and listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredModel {
    /// The agent running the device (the model is published to it).
    pub agent: String,
    /// The class whose rows it was fitted on, for a device short of its own; `None`: its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Aggregator clock when it was fitted, ms since the Unix epoch.
    pub fitted_ms: i64,
    /// The model.
    pub model: PcaModel,
}

/// Training state shared by the consumer, the fit task and the HTTP server.
pub(crate) struct Training {
    check_interval: Duration,
    /// Whether this aggregator trains: always with static ownership; in cluster mode only while
    /// it holds the trainer lease (the sets and models are loaded from the KV when it wins it).
    active: AtomicBool,
    train_cfg: Mutex<TrainConfig>,
    groups: Vec<FleetGroup>,
    trainer: Mutex<Trainer>,
    models: Mutex<BTreeMap<String, StoredModel>>,
    samples_total: AtomicU64,
    excluded_total: AtomicU64,
    refused_total: AtomicU64,
    fits_total: AtomicU64,
    fit_errors_total: AtomicU64,
    published_total: AtomicU64,
}

impl Training {
    /// Empty training state; `groups` label classes as in `fleet.groups`. `active`: whether it
    /// trains from the start (static ownership) or only once elected (cluster mode).
    pub(crate) fn new(cfg: &TrainingConfig, groups: &[FleetGroup], active: bool) -> Self {
        Self {
            check_interval: Duration::from_millis(cfg.check_interval_ms),
            active: AtomicBool::new(active),
            train_cfg: Mutex::new(cfg.train()),
            groups: groups.to_vec(),
            trainer: Mutex::new(Trainer::new(cfg.train())),
            models: Mutex::new(BTreeMap::new()),
            samples_total: AtomicU64::new(0),
            excluded_total: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            fits_total: AtomicU64::new(0),
            fit_errors_total: AtomicU64::new(0),
            published_total: AtomicU64::new(0),
        }
    }

    fn trainer(&self) -> std::sync::MutexGuard<'_, Trainer> {
        self.trainer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn models(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StoredModel>> {
        self.models.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this aggregator trains now (see [`Training::activate`]).
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Relaxed)
    }

    /// Starts training from `sets` and `models` (cluster mode: the trainer lease was won and the
    /// training bucket read), replacing whatever was held.
    pub(crate) fn activate(&self, sets: Vec<DeviceSet>, models: Vec<StoredModel>) {
        *self.trainer() = Trainer::new(self.train_cfg());
        self.models().clear();
        self.restore(sets, models);
        self.active.store(true, Relaxed);
    }

    /// Stops training (cluster mode: the trainer lease was lost or given back) and forgets the sets
    /// and models: the next trainer holds them.
    pub(crate) fn deactivate(&self) {
        self.active.store(false, Relaxed);
        *self.trainer() = Trainer::new(self.train_cfg());
        self.models().clear();
    }

    fn train_cfg(&self) -> TrainConfig {
        self.train_cfg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes the live part of a reload: the trainer's bounds and pace, for the sets held and for
    /// those of a later activation. Sets above a lowered bound shrink as their next samples arrive.
    pub(crate) fn retune(&self, cfg: &TrainingConfig) {
        let new = cfg.train();
        *self.train_cfg.lock().unwrap_or_else(|e| e.into_inner()) = new.clone();
        self.trainer().set_config(new);
    }

    /// Loads what the store holds (at start).
    pub(crate) fn restore(&self, sets: Vec<DeviceSet>, models: Vec<StoredModel>) {
        let mut t = self.trainer();
        for s in sets {
            t.restore(s);
        }
        let mut m = self.models();
        for s in models {
            m.insert(s.model.key.clone(), s);
        }
    }

    /// The class of a device: its sorted features, and the label of the first `fleet.groups`
    /// entry whose glob matches it.
    pub(crate) fn class_of(&self, device: &str, features: &[String]) -> String {
        let mut class = features.join(",");
        if let Some(g) = self
            .groups
            .iter()
            .find(|g| edgewatch_models::glob::glob_match(&g.devices, device))
        {
            class.push('@');
            class.push_str(&g.label);
        }
        class
    }

    /// Adds a checked sample of `agent` and stores the device's set. `Err` only for a store error
    /// (the lane is then not acknowledged); a refused sample is counted and returned as `Ok`.
    pub(crate) fn add(
        &self,
        store: &mut dyn StateStore,
        agent: &str,
        sample: TrainingSample,
    ) -> Result<Added, StoreError> {
        let class = self.class_of(&sample.device, &sample.features);
        let device = sample.device.clone();
        let from_ms = sample.from_ms;
        let mut t = self.trainer();
        let added = t.add(agent, &class, sample);
        match &added {
            Added::Refused(_) => {
                self.refused_total.fetch_add(1, Relaxed);
                return Ok(added);
            }
            Added::Excluded => {
                self.excluded_total.fetch_add(1, Relaxed);
            }
            Added::Kept | Added::Replaced | Added::Reset => {
                self.samples_total.fetch_add(1, Relaxed);
            }
        }
        // Stored after the lock is released: a store may wait on the runtime (the cluster's KV),
        // whose workers may be waiting for this lock (HTTP, the fit task).
        let set = t.get(&device).cloned();
        drop(t);
        if let Some(set) = set {
            store.put_training(&set, Some(from_ms))?;
        }
        Ok(added)
    }

    /// A fitted model, in the apply loop: stored with the device's set (one flush), then
    /// published retained to its agent. Returns whether it was published.
    pub(crate) fn fitted(
        &self,
        shared: &Shared,
        store: &mut dyn StateStore,
        client: Option<&AsyncClient>,
        topics: &Topics,
        stored: StoredModel,
    ) -> bool {
        let device = stored.model.key.clone();
        let version = stored.model.version;
        let set = {
            let mut t = self.trainer();
            t.fitted(&device, version);
            t.get(&device).cloned()
        };
        let durable = store
            .put_model(&stored)
            .and_then(|()| set.as_ref().map_or(Ok(()), |s| store.put_training(s, None)))
            .and_then(|()| store.flush());
        if let Err(e) = durable {
            shared.metrics.store_errors_total.fetch_add(1, Relaxed);
            self.fit_errors_total.fetch_add(1, Relaxed);
            tracing::error!(aggregator = %shared.cfg.id, device = %device.escape_debug(), version, error = %e, "model not stored; not published (the device is fitted again after the refit interval)");
            return false;
        }
        self.fits_total.fetch_add(1, Relaxed);
        let published = match (client, serde_json::to_vec(&stored.model)) {
            (Some(client), Ok(payload)) => {
                let topic = topics.models(&stored.agent, &model_key(&device));
                match client.try_publish(topic, QoS::AtLeastOnce, true, payload) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(aggregator = %shared.cfg.id, device = %device.escape_debug(), error = %e, "model stored but not published now; it is published again at the next start");
                        false
                    }
                }
            }
            (_, Err(e)) => {
                tracing::error!(aggregator = %shared.cfg.id, device = %device.escape_debug(), error = %e, "model could not be encoded");
                false
            }
            (None, _) => false,
        };
        if published {
            self.published_total.fetch_add(1, Relaxed);
        }
        tracing::info!(aggregator = %shared.cfg.id, device = %device.escape_debug(), agent = %stored.agent, version,
            samples = stored.model.samples, class = ?stored.class, explained = stored.model.quality.explained_variance_ratio,
            published, "device model fitted");
        self.models().insert(device, stored);
        published
    }

    /// Publishes every stored model again (retained; at start, so a broker that lost its
    /// retained messages has them back; agents ignore a model they already run).
    pub(crate) fn republish(&self, client: &AsyncClient, topics: &Topics) -> usize {
        let models = self.models();
        let mut n = 0;
        for s in models.values() {
            let Ok(payload) = serde_json::to_vec(&s.model) else {
                continue;
            };
            let topic = topics.models(&s.agent, &model_key(&s.model.key));
            if client
                .try_publish(topic, QoS::AtLeastOnce, true, payload)
                .is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// The entries of `GET /api/models` for device models.
    pub(crate) fn list(&self, now_ms: i64) -> Vec<Value> {
        let t = self.trainer();
        self.models()
            .values()
            .map(|s| {
                let m = &s.model;
                let set = t.get(&m.key);
                json!({
                    "key": model_key(&m.key),
                    "kind": "pca",
                    "device": m.key,
                    "agent": s.agent,
                    "version": m.version,
                    "features": m.features,
                    "samples": m.samples,
                    "trained_from_ms": m.trained_from_ms,
                    "trained_to_ms": m.trained_to_ms,
                    "age_s": (now_ms.saturating_sub(s.fitted_ms)).max(0) as f64 / 1000.0,
                    "class": s.class,
                    "quality": {
                        "explained_variance_ratio": m.quality.explained_variance_ratio,
                        "median_score": m.quality.median_score,
                        "alarm_rate": m.quality.alarm_rate,
                        "solver": m.quality.solver,
                        "components": m.components.len(),
                    },
                    "training": set.map(|s| json!({
                        "rows": s.rows,
                        "samples": s.samples.len(),
                        "excluded": s.excluded,
                        "rows_since_fit": s.rows_since_fit,
                    })),
                })
            })
            .collect()
    }

    /// The stored model of `device` (its own or its class's), as published to its agent.
    pub(crate) fn model(&self, device: &str) -> Option<PcaModel> {
        self.models().get(device).map(|s| s.model.clone())
    }

    /// Devices with a training set and no model yet: `(device, rows, samples)`.
    pub(crate) fn waiting(&self) -> Vec<Value> {
        let models = self.models();
        self.trainer()
            .sets()
            .filter(|s| !models.contains_key(&s.device))
            .map(|s| {
                json!({"device": s.device, "agent": s.agent, "rows": s.rows,
                       "samples": s.samples.len(), "excluded": s.excluded})
            })
            .collect()
    }

    /// Prometheus lines of the training counters and gauges.
    pub(crate) fn render(&self, id: &str, out: &mut String) {
        let (sets, values) = {
            let t = self.trainer();
            (t.len() as u64, t.values() as u64)
        };
        let models = self.models().len() as u64;
        for (name, kind, v) in [
            (
                "edgewatch_training_samples_total",
                "counter",
                self.samples_total.load(Relaxed),
            ),
            (
                "edgewatch_training_samples_excluded_total",
                "counter",
                self.excluded_total.load(Relaxed),
            ),
            (
                "edgewatch_training_samples_refused_total",
                "counter",
                self.refused_total.load(Relaxed),
            ),
            (
                "edgewatch_training_fits_total",
                "counter",
                self.fits_total.load(Relaxed),
            ),
            (
                "edgewatch_training_fit_errors_total",
                "counter",
                self.fit_errors_total.load(Relaxed),
            ),
            (
                "edgewatch_training_models_published_total",
                "counter",
                self.published_total.load(Relaxed),
            ),
            ("edgewatch_training_devices", "gauge", sets),
            ("edgewatch_training_values", "gauge", values),
            ("edgewatch_training_models", "gauge", models),
            (
                "edgewatch_training_trainer",
                "gauge",
                u64::from(self.is_active()),
            ),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} {kind}\n{name}{{aggregator=\"{id}\"}} {v}"
            );
        }
    }
}

/// Every `training.check_interval_ms` until `cancel`: fits the devices due, one at a time on a
/// blocking thread, and hands each model to the apply loop (which stores and publishes it).
pub(crate) async fn fit_loop(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Input>,
    cancel: CancellationToken,
) {
    let Some(training) = &shared.training else {
        return;
    };
    let mut tick = tokio::time::interval(training.check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !training.is_active() {
            continue;
        }
        let now = crate::fleet::run::now_ms();
        // A few at a time: every job holds a copy of its rows.
        loop {
            let jobs = training.trainer().due(now, JOBS_AT_ONCE);
            if jobs.is_empty() {
                break;
            }
            for job in jobs {
                if cancel.is_cancelled() {
                    return;
                }
                if !fit_one(&shared, training, &tx, job, now).await {
                    return;
                }
            }
        }
    }
}

/// Jobs taken from the trainer at once (each holds up to `max_rows` rows).
const JOBS_AT_ONCE: usize = 4;

/// Fits one job on a blocking thread and hands the model to the apply loop; `false` once the
/// apply loop is gone.
async fn fit_one(
    shared: &Shared,
    training: &Training,
    tx: &mpsc::Sender<Input>,
    mut job: edgewatch_models::multi::FitJob,
    now: i64,
) -> bool {
    // Versions are the fit time (ms), or one above the previous: newer than anything an
    // agent runs even after this aggregator's store was wiped.
    job.version = job.version.max(u64::try_from(now).unwrap_or(0));
    let (device, agent, class) = (job.device.clone(), job.agent.clone(), job.class.clone());
    let fit = tokio::task::spawn_blocking(move || job.fit()).await;
    match fit {
        Ok(Ok(model)) => {
            let stored = StoredModel {
                agent,
                class,
                fitted_ms: crate::fleet::run::now_ms(),
                model,
            };
            return tx.send(Input::Fitted(Box::new(stored))).await.is_ok();
        }
        Ok(Err(e)) => {
            training.fit_errors_total.fetch_add(1, Relaxed);
            training.trainer().failed(&device, now);
            tracing::warn!(aggregator = %shared.cfg.id, device = %device.escape_debug(), error = %e, "device model fit failed; tried again after the refit interval");
        }
        Err(e) => {
            training.fit_errors_total.fetch_add(1, Relaxed);
            training.trainer().failed(&device, now);
            tracing::error!(aggregator = %shared.cfg.id, device = %device.escape_debug(), error = %e, "device model fit panicked; tried again after the refit interval");
        }
    }
    true
}
