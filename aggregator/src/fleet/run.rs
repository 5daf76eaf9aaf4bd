//! The live side of fleet peer groups: the shared [`Fleet`] (profiles behind a mutex and its
//! counters), the refit task (fits on a blocking thread every `fleet.refit_interval_ms`),
//! publishing `fleet` events to the feed, and the JSON of `/api/fleet` and `/api/models`.

use super::{FleetEvent, Profiles, TrainingSet};
use crate::config::FleetConfig;
use crate::Shared;
use edgewatch_models::ModelError;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Fleet state shared by the consumer, the refit task and the HTTP server.
#[derive(Debug)]
pub(crate) struct Fleet {
    profiles: Mutex<Profiles>,
    /// `fleet` events published (new to the feed).
    events_total: AtomicU64,
    /// Class models fitted.
    fits_total: AtomicU64,
    /// Fits that failed (logged).
    fit_errors_total: AtomicU64,
    /// Cluster mode: profile records refused by the trainer (malformed, forged, beyond `max_devices`).
    profiles_refused_total: AtomicU64,
    /// Cluster mode: peer model records refused (malformed or forged).
    peers_refused_total: AtomicU64,
    /// Cluster mode: profile and peer model reads and writes that failed (retried).
    store_errors_total: AtomicU64,
    /// Cluster mode: the trainer epoch while this member fits the peer models, else 0.
    trainer_epoch: AtomicU64,
}

impl Fleet {
    /// Empty fleet state for aggregator `agent`.
    pub(crate) fn new(cfg: &FleetConfig, agent: &str) -> Result<Self, ModelError> {
        Ok(Self {
            profiles: Mutex::new(Profiles::new(cfg, agent)?),
            events_total: AtomicU64::new(0),
            fits_total: AtomicU64::new(0),
            fit_errors_total: AtomicU64::new(0),
            profiles_refused_total: AtomicU64::new(0),
            peers_refused_total: AtomicU64::new(0),
            store_errors_total: AtomicU64::new(0),
            trainer_epoch: AtomicU64::new(0),
        })
    }

    /// See [`Profiles::export`].
    pub(crate) fn export(&self, member: &str) -> Vec<super::pool::ProfileRecord> {
        self.lock().export(member)
    }

    /// Marks `devices`' profiles not exported (their write failed: the next tick retries).
    pub(crate) fn unexport(&self, devices: Vec<String>) {
        self.lock().unexport(&devices);
    }

    /// See [`Profiles::adopt`].
    pub(crate) fn adopt(&self, class: &super::ClassKey, cm: super::ClassModel) -> Vec<FleetEvent> {
        self.lock().adopt(class, cm)
    }

    /// See [`Profiles::prune`].
    pub(crate) fn prune(&self) {
        self.lock().prune();
    }

    /// See [`Profiles::config`].
    pub(crate) fn config(&self) -> FleetConfig {
        self.lock().config().clone()
    }

    /// See [`Profiles::peer_options`].
    pub(crate) fn peer_options(&self) -> edgewatch_models::multi::PeerOptions {
        self.lock().peer_options()
    }

    /// Notes the trainer epoch this member fits under (0: it does not).
    pub(crate) fn set_trainer_epoch(&self, epoch: u64) {
        self.trainer_epoch.store(epoch, Relaxed);
    }

    /// Counts a class model fitted.
    pub(crate) fn count_fit(&self) {
        self.fits_total.fetch_add(1, Relaxed);
    }

    /// Counts a failed fit.
    pub(crate) fn count_fit_error(&self) {
        self.fit_errors_total.fetch_add(1, Relaxed);
    }

    /// Counts refused profile records.
    pub(crate) fn count_profiles_refused(&self, n: u64) {
        self.profiles_refused_total.fetch_add(n, Relaxed);
    }

    /// Counts refused peer model records.
    pub(crate) fn count_peers_refused(&self, n: u64) {
        self.peers_refused_total.fetch_add(n, Relaxed);
    }

    /// Counts failed KV reads or writes.
    pub(crate) fn count_store_errors(&self, n: u64) {
        self.store_errors_total.fetch_add(n, Relaxed);
    }

    /// See [`Profiles::retune`].
    pub(crate) fn retune(&self, cfg: &FleetConfig) -> Result<(), ModelError> {
        self.lock().retune(cfg)
    }

    /// See [`Profiles::seed`].
    pub(crate) fn seed(&self, state: &crate::state::FleetState) -> usize {
        self.lock().seed(state)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Profiles> {
        self.profiles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`Profiles::observe`].
    pub(crate) fn observe(
        &self,
        partition: u32,
        s: &edgewatch_models::wire::WindowSummary,
    ) -> Option<FleetEvent> {
        self.lock().observe(partition, s)
    }

    /// Publishes `events` to the feed; `record` keeps each new one in the device's state.
    pub(crate) fn publish(
        &self,
        shared: &Shared,
        events: Vec<FleetEvent>,
        mut record: impl FnMut(u32, &edgewatch_models::wire::AnomalyEvent),
    ) {
        for (partition, e) in events {
            tracing::info!(aggregator = %shared.cfg.id, device = %e.device.escape_debug(), metric = %e.metric.escape_debug(), score = e.score, version = ?e.model_version, "device left its peer group");
            if shared.feed.publish(e.clone()) {
                self.events_total.fetch_add(1, Relaxed);
                record(partition, &e);
            }
        }
    }

    /// Prometheus lines of the fleet counters and gauges.
    pub(crate) fn render(&self, id: &str, out: &mut String) {
        let (devices, models, refused) = {
            let p = self.lock();
            (p.len(), p.models().len(), p.refused_windows)
        };
        for (name, kind, v) in [
            (
                "edgewatch_fleet_events_total",
                "counter",
                self.events_total.load(Relaxed),
            ),
            (
                "edgewatch_fleet_fits_total",
                "counter",
                self.fits_total.load(Relaxed),
            ),
            (
                "edgewatch_fleet_fit_errors_total",
                "counter",
                self.fit_errors_total.load(Relaxed),
            ),
            ("edgewatch_fleet_windows_refused_total", "counter", refused),
            (
                "edgewatch_fleet_profiles_refused_total",
                "counter",
                self.profiles_refused_total.load(Relaxed),
            ),
            (
                "edgewatch_fleet_peer_models_refused_total",
                "counter",
                self.peers_refused_total.load(Relaxed),
            ),
            (
                "edgewatch_fleet_store_errors_total",
                "counter",
                self.store_errors_total.load(Relaxed),
            ),
            (
                "edgewatch_fleet_trainer",
                "gauge",
                u64::from(self.trainer_epoch.load(Relaxed) > 0),
            ),
            ("edgewatch_fleet_devices", "gauge", devices as u64),
            ("edgewatch_fleet_models", "gauge", models as u64),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} {kind}\n{name}{{aggregator=\"{id}\"}} {v}"
            );
        }
    }

    /// `GET /api/fleet`: every class, its model and the devices outside their group.
    /// `shared_cluster`: the aggregator runs in cluster mode (the models come from the trainer).
    pub(crate) fn report(&self, now_ms: i64, shared_cluster: bool) -> Value {
        let classes: Vec<Value> = self
            .lock()
            .classes()
            .into_iter()
            .map(|c| {
                let outside: Vec<Value> = c
                    .outside
                    .iter()
                    .map(|(device, s)| json!({"device": device, "standing": s}))
                    .collect();
                let distances: Vec<Value> = c
                    .standings
                    .iter()
                    .map(|(device, s)| json!({"device": device, "ratio": s.ratio, "score": s.score, "cluster": s.cluster, "model_version": s.model_version}))
                    .collect();
                json!({
                    "class": c.class,
                    "label": c.label,
                    "metrics": c.metrics,
                    "devices": c.devices,
                    "complete": c.complete,
                    "model": c.model.as_ref().map(|m| json!({
                        "version": m.model.version,
                        "k": m.model.centroids.len(),
                        "sizes": m.model.sizes,
                        "spreads": m.model.spreads,
                        "limit": m.model.limit,
                        "trained_to_ms": m.model.trained_to_ms,
                        "fitted_at_ms": m.fitted_at_ms,
                        "age_s": age_s(now_ms, m.fitted_at_ms),
                        "trained": m.trained,
                        "excluded": m.excluded,
                        "devices": m.trained + m.excluded,
                        "trainer": m.trainer.as_ref().map(|t| t.0.as_str()),
                        "epoch": m.trainer.as_ref().map(|t| t.1),
                        "linfa_version": m.model.linfa_version,
                    })),
                    "outside": outside,
                    "distances": distances,
                    "distances_truncated": c.standings_total > c.standings.len(),
                })
            })
            .collect();
        let epoch = self.trainer_epoch.load(Relaxed);
        json!({
            "classes": classes,
            "mode": if shared_cluster { "cluster" } else { "static" },
            "trainer": shared_cluster.then_some(epoch > 0),
            "trainer_epoch": (epoch > 0).then_some(epoch),
        })
    }

    /// The entries of `GET /api/models` (peer models today; PCA device models share the shape).
    pub(crate) fn models(&self, now_ms: i64) -> Vec<Value> {
        self.lock()
            .models()
            .iter()
            .map(|(class, m)| {
                json!({
                    "key": format!("peer/{}", class.name()),
                    "kind": "peer",
                    "version": m.model.version,
                    "features": m.model.features,
                    "samples": m.trained,
                    "trained_to_ms": m.model.trained_to_ms,
                    "age_s": age_s(now_ms, m.fitted_at_ms),
                    "quality": {
                        "clusters": m.model.centroids.len(),
                        "sizes": m.model.sizes,
                        "spreads": m.model.spreads,
                        "excluded": m.excluded,
                    },
                })
            })
            .collect()
    }
}

fn age_s(now_ms: i64, then_ms: i64) -> f64 {
    (now_ms.saturating_sub(then_ms)).max(0) as f64 / 1000.0
}

/// Wall-clock time in ms since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Refits every ready class every `fleet.refit_interval_ms` until `cancel`: profiles are copied
/// out under the lock, fitted on a blocking thread, installed and every device of the class
/// scored; the events go to the feed.
pub(crate) async fn refit_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let Some(fleet) = shared.fleet.as_ref() else {
        return;
    };
    if shared.cfg.cluster.is_some() {
        // The trainer fits from the whole fleet's profiles (see `cluster::sync_loop`).
        return;
    }
    let period = Duration::from_millis(shared.cfg.fleet.refit_interval_ms);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (sets, opts) = {
            let mut p = fleet.lock();
            (p.training_sets(), p.peer_options())
        };
        if sets.is_empty() {
            continue;
        }
        let Some(fitted) = TrainingSet::fit_all(sets, opts).await else {
            // Only a panic in linfa gets here; the next tick tries again.
            fleet.fit_errors_total.fetch_add(1, Relaxed);
            tracing::error!(aggregator = %shared.cfg.id, "peer model fit panicked");
            continue;
        };
        let now = now_ms();
        let mut events = Vec::new();
        {
            let mut p = fleet.lock();
            for (set, r) in fitted {
                match r {
                    Ok(model) => {
                        fleet.fits_total.fetch_add(1, Relaxed);
                        tracing::info!(aggregator = %shared.cfg.id, class = %set.class.name().escape_debug(), devices = set.devices(), excluded = set.excluded, k = model.centroids.len(), "peer model fitted");
                        events.extend(p.install(&set, model, now));
                    }
                    Err(e) => {
                        fleet.fit_errors_total.fetch_add(1, Relaxed);
                        tracing::warn!(aggregator = %shared.cfg.id, class = %set.class.name().escape_debug(), error = %e, "peer model fit failed");
                    }
                }
            }
        }
        fleet.publish(&shared, events, |partition, e| {
            shared
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record_anomaly(partition, e);
        });
    }
}
