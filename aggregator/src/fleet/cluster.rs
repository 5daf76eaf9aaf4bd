//! Fleet peer groups in cluster mode, the thin KV shell around the pure [`super::Profiles`] and
//! [`super::pool::Pool`]: every member writes its devices' profiles to `{prefix}_profiles` (TTL two
//! profile windows); the member holding the `trainer` lease reads them all, fits the class peer
//! models and writes them to `{prefix}_peers` by compare-and-set under its lease revision (epoch);
//! every member reads that bucket and scores its own devices against them.
//!
//! Keys: `{prefix}_profiles` holds one [`super::pool::ProfileRecord`] per device under the device id
//! hex-encoded; `{prefix}_peers` one [`PeerRecord`] per class under `m.` + the class name
//! hex-encoded. A record whose epoch is newer than the trainer's own fences it: it writes nothing
//! more under that epoch, so a deposed trainer never publishes a competing model.

use super::pool::{Pool, Refused};
use super::{ClassKey, ClassModel, TrainingSet};
use crate::cluster::kv::{ensure_bucket, list_keys, live_entry, KvError};
use crate::cluster::node::bucket_name;
use crate::cluster::trainer::{hex, unhex};
use crate::config::FleetConfig;
use crate::consumer::Warnings;
use crate::Shared;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use edgewatch_models::multi::PeerModel;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The bucket of device profiles (`{prefix}_profiles`).
pub(crate) const PROFILES_BUCKET: &str = "profiles";
/// The bucket of class peer models (`{prefix}_peers`).
pub(crate) const PEERS_BUCKET: &str = "peers";
/// KV requests in flight at once (see the shared NATS notes: one at a time costs a round trip each).
const IN_FLIGHT: usize = 16;
/// Most class records read from the peers bucket; further keys are ignored (and logged).
pub(crate) const MAX_CLASSES: usize = 1024;
/// Largest peer record accepted (bytes).
const MAX_PEER_RECORD_BYTES: usize = 1024 * 1024;

/// A class's peer model as the trainer writes it to the peers bucket (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PeerRecord {
    /// The trainer lease's revision it was written under.
    pub epoch: u64,
    /// The member that fitted it.
    pub trainer: String,
    /// Wall-clock time of the fit on the trainer (ms).
    pub fitted_at_ms: i64,
    /// The class.
    pub class: ClassKey,
    /// The model; its `version` counts the class's fits across trainers.
    pub model: PeerModel,
    /// Devices fitted on.
    pub trained: usize,
    /// Complete profiles of the class left out (outside their group, or trimmed).
    pub excluded: usize,
    /// Per-metric median of the training profiles.
    pub medians: Vec<f64>,
    /// Per-metric median of the whole class's profiles now (rewritten every tick by the
    /// trainer): minus `medians`, the class's movement since the fit, taken out before scoring.
    pub now_medians: Vec<f64>,
    /// Event time of the newest profile behind `now_medians` (ms).
    pub now_at_ms: i64,
}

/// The key of `class` in the peers bucket.
pub(crate) fn class_key(class: &ClassKey) -> String {
    format!("m.{}", hex(&class.name()))
}

impl PeerRecord {
    /// Checks a record read under `key`: its class's key, a valid model over the class's metrics.
    pub(crate) fn parse(key: &str, bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MAX_PEER_RECORD_BYTES {
            return Err(format!(
                "{} bytes (at most {MAX_PEER_RECORD_BYTES})",
                bytes.len()
            ));
        }
        let r: PeerRecord =
            serde_json::from_slice(bytes).map_err(|e| format!("bad peer record json: {e}"))?;
        if class_key(&r.class) != key {
            return Err(format!("holds class {:?}, not its key's", r.class.name()));
        }
        r.model
            .validate()
            .map_err(|e| format!("invalid model: {e}"))?;
        if r.model.features != r.class.metrics {
            return Err(format!(
                "model features {:?} are not the class's metrics {:?}",
                r.model.features, r.class.metrics
            ));
        }
        let n = r.class.metrics.len();
        for (what, v) in [("medians", &r.medians), ("now_medians", &r.now_medians)] {
            if v.len() != n || v.iter().any(|x| !x.is_finite()) {
                return Err(format!("{what}: need {n} finite values, got {v:?}"));
            }
        }
        Ok(r)
    }

    fn into_class_model(self) -> (ClassKey, ClassModel) {
        let shift = self
            .now_medians
            .iter()
            .zip(&self.medians)
            .map(|(a, b)| a - b)
            .collect();
        (
            self.class,
            ClassModel {
                model: self.model,
                fitted_at_ms: self.fitted_at_ms,
                trained: self.trained,
                excluded: self.excluded,
                medians: self.medians,
                trainer: Some((self.trainer, self.epoch)),
                shift: Some((shift, self.now_at_ms)),
            },
        )
    }
}

/// The two buckets of cluster-mode peer groups.
#[derive(Debug, Clone)]
pub(crate) struct PeerBuckets {
    profiles: kv::Store,
    peers: kv::Store,
}

impl PeerBuckets {
    /// Opens (creating if needed) `{prefix}_profiles`, whose TTL is two `profile_window_ms` (every
    /// member must run the same value: a bucket with another TTL is refused), and `{prefix}_peers`.
    pub(crate) async fn open(
        js: &jetstream::Context,
        prefix: &str,
        cfg: &FleetConfig,
        replicas: usize,
    ) -> Result<Self, KvError> {
        let ttl = Duration::from_millis(cfg.profile_window_ms.saturating_mul(2).max(100));
        Ok(Self {
            profiles: ensure_bucket(
                js,
                &bucket_name(prefix, PROFILES_BUCKET),
                Some(ttl),
                replicas,
            )
            .await?,
            peers: ensure_bucket(js, &bucket_name(prefix, PEERS_BUCKET), None, replicas).await?,
        })
    }
}

/// `f`, failed when it takes longer than `timeout`.
async fn timed<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// What the trainer writes to a class record.
enum Update<'a> {
    /// A new fit: the next version, with where the whole class stands (medians, window end).
    Fit(&'a TrainingSet, PeerModel, Option<(Vec<f64>, i64)>),
    /// Where the class stands now (the record's model kept); skipped when there is no record.
    Medians(Vec<f64>, i64),
}

/// What became of one compare-and-set write of a class record.
enum Written {
    Ok(u64),
    /// A newer trainer wrote the key: this member no longer trains.
    Fenced(u64),
}

/// The member's side of peer groups in cluster mode.
struct Sync {
    shared: Arc<Shared>,
    kv: PeerBuckets,
    timeout: Duration,
    warnings: Warnings,
    /// Peer keys → the revision adopted (or refused) last.
    seen: HashMap<String, u64>,
    /// The epoch of the last fit and when it ran.
    fitted: Option<(u64, Instant)>,
    /// An epoch found fenced: no more fits under it.
    fenced: Option<u64>,
    pruned: Instant,
    /// The trainer's view of every member's profiles, under its epoch: read in full at each
    /// fit, kept current in between by a watch of the profiles bucket.
    pool: Option<(u64, Pool)>,
    watch: Option<kv::Watch>,
    /// The class medians last written, so unchanged ones are not rewritten.
    written: HashMap<ClassKey, (Vec<f64>, i64)>,
}

/// Runs the member's side until `cancel`, every `tick`: writes the profiles changed since the last
/// tick, fits and writes the class models while `role` says this member trains (at once on
/// winning the role, then every `fleet.refit_interval_ms`), and adopts new class models.
pub(crate) async fn sync_loop(
    shared: Arc<Shared>,
    kv: PeerBuckets,
    role: watch::Receiver<Option<u64>>,
    tick: Duration,
    timeout: Duration,
    cancel: CancellationToken,
) {
    if shared.fleet.is_none() {
        return;
    }
    let mut s = Sync {
        shared,
        kv,
        timeout,
        warnings: Warnings::default(),
        seen: HashMap::new(),
        fitted: None,
        fenced: None,
        pruned: Instant::now(),
        pool: None,
        watch: None,
        written: HashMap::new(),
    };
    let mut timer = tokio::time::interval(tick);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = timer.tick() => {}
        }
        s.upload().await;
        let epoch = *role.borrow();
        // A fenced epoch is not training any more, whatever the lease renewals say so far.
        let training = epoch.filter(|e| s.fenced != Some(*e));
        s.fleet().set_trainer_epoch(training.unwrap_or(0));
        match epoch {
            Some(e) if s.fenced != Some(e) => {
                let refit = Duration::from_millis(s.shared.cfg.fleet.refit_interval_ms);
                let due = match s.fitted {
                    Some((fe, at)) => fe != e || at.elapsed() >= refit,
                    None => true,
                };
                if due {
                    s.fitted = Some((e, Instant::now()));
                    s.train(e).await;
                } else {
                    s.follow(e).await;
                }
            }
            _ => {
                s.pool = None;
                s.watch = None;
            }
        }
        s.adopt().await;
        if s.pruned.elapsed() >= Duration::from_millis(s.shared.cfg.fleet.refit_interval_ms) {
            s.pruned = Instant::now();
            s.fleet().prune();
        }
    }
}

impl Sync {
    fn fleet(&self) -> &super::run::Fleet {
        self.shared.fleet.as_ref().expect("checked at start")
    }

    fn id(&self) -> &str {
        &self.shared.cfg.id
    }

    fn warn(&mut self, kind: &'static str, error: &str, what: &str) {
        if let Some(suppressed) = self.warnings.ready(kind) {
            tracing::warn!(aggregator = %self.shared.cfg.id, error = %error.escape_debug(), suppressed, "{what}");
        }
    }

    /// Writes the profiles that changed; a failed write is retried at the next tick.
    async fn upload(&mut self) {
        let records = self.fleet().export(&self.shared.cfg.id);
        if records.is_empty() {
            return;
        }
        let store = self.kv.profiles.clone();
        let timeout = self.timeout;
        let failed: Vec<(String, String)> = futures_util::stream::iter(records)
            .map(|r| {
                let store = store.clone();
                async move {
                    let key = hex(&r.device);
                    let put = async {
                        let v = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
                        store
                            .put(&key, Bytes::from(v))
                            .await
                            .map_err(|e| e.to_string())
                    };
                    match tokio::time::timeout(timeout, put).await {
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => Some((r.device, e)),
                        Err(_) => Some((r.device, format!("no answer within {timeout:?}"))),
                    }
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        if let Some((_, e)) = failed.first() {
            let e = e.clone();
            self.fleet().count_store_errors(failed.len() as u64);
            self.fleet()
                .unexport(failed.into_iter().map(|(d, _)| d).collect());
            self.warn(
                "profile_write",
                &e,
                "fleet profile writes failed; retrying at the next tick",
            );
        }
    }

    /// Fits every ready class from the whole fleet's profiles and writes the models under `epoch`.
    async fn train(&mut self, epoch: u64) {
        let started = Instant::now();
        let (pool, refused) = match self.gather().await {
            Ok(x) => x,
            Err(e) => {
                self.fleet().count_store_errors(1);
                self.warn(
                    "profile_read",
                    &e,
                    "cannot read the fleet's profiles; the next tick retries",
                );
                self.fitted = None;
                return;
            }
        };
        let sets = pool.training_sets();
        let mut now = pool.class_medians();
        let read = pool.len();
        self.pool = Some((epoch, pool));
        // A fit rewrites the records' medians: the next tick writes where each class stands.
        self.written.clear();
        self.start_watch().await;
        let opts = self.fleet().peer_options();
        if sets.is_empty() {
            tracing::debug!(aggregator = %self.id(), profiles = read, refused, "no class ready for a peer model fit");
            return;
        }
        let Some(fitted) = TrainingSet::fit_all(sets, opts).await else {
            self.fleet().count_fit_error();
            tracing::error!(aggregator = %self.id(), "peer model fit panicked");
            return;
        };
        for (set, r) in fitted {
            let model = match r {
                Ok(m) => m,
                Err(e) => {
                    self.fleet().count_fit_error();
                    tracing::warn!(aggregator = %self.id(), class = %set.class.name().escape_debug(), error = %e, "peer model fit failed");
                    continue;
                }
            };
            match write_record(
                self.kv.peers.clone(),
                self.shared.cfg.id.clone(),
                self.timeout,
                epoch,
                &set.class,
                Update::Fit(&set, model, now.remove(&set.class)),
            )
            .await
            {
                Ok(Written::Ok(version)) => {
                    self.fleet().count_fit();
                    tracing::info!(aggregator = %self.id(), epoch, class = %set.class.name().escape_debug(), version,
                        devices = set.devices(), excluded = set.excluded, profiles = read, refused,
                        fit_ms = started.elapsed().as_millis() as u64, "peer model fitted from the fleet's profiles");
                }
                Ok(Written::Fenced(theirs)) => {
                    self.fenced(epoch, theirs, &set.class);
                    return;
                }
                Err(e) => {
                    self.fleet().count_store_errors(1);
                    self.warn(
                        "peer_write",
                        &e,
                        "peer model write failed; the next fit retries",
                    );
                }
            }
        }
    }

    /// Reads every profile of the bucket (at most `fleet.max_devices`): the pool, and the records
    /// refused (counted and logged at a bounded rate).
    async fn gather(&mut self) -> Result<(Pool, u64), String> {
        let store = self.kv.profiles.clone();
        let mut keys = timed(self.timeout, async {
            list_keys(&store).await.map_err(|e| e.to_string())
        })
        .await?;
        // The live configuration: reloads of min_devices, min_windows and peers apply here too.
        let cfg = self.fleet().config();
        let mut refused = 0u64;
        if keys.len() > cfg.max_devices {
            // The rest are not even read: a million forged keys cannot make a fit unbounded.
            refused += (keys.len() - cfg.max_devices) as u64;
            keys.truncate(cfg.max_devices);
            let e = format!(
                "{} profiles beyond fleet.max_devices ({}) left out",
                refused, cfg.max_devices
            );
            self.warn(
                "profiles_full",
                &e,
                "the profiles bucket holds more devices than fleet.max_devices",
            );
        }
        let mut pool = Pool::new(&cfg);
        let timeout = self.timeout;
        let mut entries = futures_util::stream::iter(keys)
            .map(|key| {
                let store = store.clone();
                async move {
                    let e = tokio::time::timeout(timeout, live_entry(&store, &key)).await;
                    (key, e)
                }
            })
            .buffered(IN_FLIGHT);
        let mut bad: Option<String> = None;
        while let Some((key, entry)) = entries.next().await {
            let entry = match entry {
                Ok(Ok(Some(e))) => e,
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("read {key}: no answer within {timeout:?}")),
            };
            let result = match unhex(&key) {
                Some(device) => pool.insert(&device, &entry.value),
                None => Err((
                    Refused::Invalid,
                    "key is not a hex-encoded device id".into(),
                )),
            };
            if let Err((_, why)) = result {
                refused += 1;
                bad.get_or_insert_with(|| format!("profile key {key}: {why}"));
            }
        }
        drop(entries);
        if refused > 0 {
            self.fleet().count_profiles_refused(refused);
        }
        if let Some(e) = bad {
            self.warn("profile_refused", &e, "fleet profile records refused");
        }
        Ok((pool, refused))
    }

    fn fenced(&mut self, epoch: u64, theirs: u64, class: &ClassKey) {
        self.fenced = Some(epoch);
        self.pool = None;
        self.watch = None;
        tracing::warn!(aggregator = %self.id(), epoch, theirs, class = %class.name().escape_debug(),
            "a newer trainer wrote the class's peer model: this member writes no more peer models under its epoch");
    }

    /// Starts watching the profiles bucket (its current values first, then every write).
    async fn start_watch(&mut self) {
        let store = self.kv.profiles.clone();
        match timed(self.timeout, async {
            store
                .watch_with_history(">")
                .await
                .map_err(|e| e.to_string())
        })
        .await
        {
            Ok(w) => self.watch = Some(w),
            Err(e) => {
                self.watch = None;
                self.fleet().count_store_errors(1);
                self.warn(
                    "profile_watch",
                    &e,
                    "cannot watch the fleet's profiles; the next tick retries",
                );
            }
        }
    }

    /// Between fits: takes the profiles written since the last tick into the pool and writes
    /// where each class stands now.
    async fn follow(&mut self, epoch: u64) {
        if self.pool.as_ref().is_none_or(|(e, _)| *e != epoch) {
            // Not gathered under this epoch (the last fit's read failed): the next fit reads.
            return;
        }
        if self.watch.is_none() {
            self.start_watch().await;
        }
        let mut refused = 0u64;
        let mut bad = None;
        if let (Some(w), Some((_, pool))) = (self.watch.as_mut(), self.pool.as_mut()) {
            // Bounded per tick: a flood of writes is taken over several ticks.
            for _ in 0..self.shared.cfg.fleet.max_devices.max(1) {
                let Some(item) = futures_util::FutureExt::now_or_never(w.next()) else {
                    break;
                };
                let entry = match item {
                    Some(Ok(e)) => e,
                    // Ended or failed (a NATS node went away): watched again next tick.
                    Some(Err(_)) | None => {
                        self.watch = None;
                        break;
                    }
                };
                if entry.operation != kv::Operation::Put {
                    pool.remove(&entry.key);
                    continue;
                }
                let result = match unhex(&entry.key) {
                    Some(device) => pool.insert(&device, &entry.value),
                    None => Err((
                        Refused::Invalid,
                        "key is not a hex-encoded device id".into(),
                    )),
                };
                if let Err((_, why)) = result {
                    refused += 1;
                    bad.get_or_insert_with(|| format!("profile key {}: {why}", entry.key));
                }
            }
        }
        if refused > 0 {
            self.fleet().count_profiles_refused(refused);
        }
        if let Some(e) = bad {
            self.warn("profile_refused", &e, "fleet profile records refused");
        }
        let Some((_, pool)) = self.pool.as_ref() else {
            return;
        };
        let now = pool.class_medians();
        for (class, (medians, at_ms)) in now {
            if self
                .written
                .get(&class)
                .is_some_and(|(m, t)| *m == medians && *t == at_ms)
            {
                continue;
            }
            match write_record(
                self.kv.peers.clone(),
                self.shared.cfg.id.clone(),
                self.timeout,
                epoch,
                &class,
                Update::Medians(medians.clone(), at_ms),
            )
            .await
            {
                Ok(Written::Ok(_)) => {
                    self.written.insert(class, (medians, at_ms));
                }
                Ok(Written::Fenced(theirs)) => {
                    self.fenced(epoch, theirs, &class);
                    return;
                }
                Err(e) => {
                    self.fleet().count_store_errors(1);
                    self.warn(
                        "peer_write",
                        &e,
                        "class medians write failed; the next tick retries",
                    );
                }
            }
        }
    }

    /// Adopts every class record of the peers bucket written since the last look.
    async fn adopt(&mut self) {
        let store = self.kv.peers.clone();
        let keys = match timed(self.timeout, async {
            list_keys(&store).await.map_err(|e| e.to_string())
        })
        .await
        {
            Ok(k) => k,
            Err(e) => {
                self.fleet().count_store_errors(1);
                self.warn(
                    "peer_read",
                    &e,
                    "cannot read the peer models; the next tick retries",
                );
                return;
            }
        };
        let keys: Vec<String> = keys.into_iter().filter(|k| k.starts_with("m.")).collect();
        if keys.len() > MAX_CLASSES {
            let e = format!("{} class keys, reading the first {MAX_CLASSES}", keys.len());
            self.warn("peers_full", &e, "too many peer model keys");
        }
        let mut events = Vec::new();
        for key in keys.into_iter().take(MAX_CLASSES) {
            let entry = match timed(self.timeout, async {
                live_entry(&store, &key).await.map_err(|e| e.to_string())
            })
            .await
            {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => {
                    self.fleet().count_store_errors(1);
                    self.warn(
                        "peer_read",
                        &e,
                        "cannot read a peer model; the next tick retries",
                    );
                    return;
                }
            };
            if self.seen.get(&key) == Some(&entry.revision) {
                continue;
            }
            self.seen.insert(key.clone(), entry.revision);
            match PeerRecord::parse(&key, &entry.value) {
                Ok(r) => {
                    let (class, cm) = r.into_class_model();
                    tracing::info!(aggregator = %self.id(), class = %class.name().escape_debug(), version = cm.model.version,
                        trainer = ?cm.trainer, devices = cm.trained + cm.excluded, "peer model adopted");
                    events.extend(self.fleet().adopt(&class, cm));
                }
                Err(why) => {
                    self.fleet().count_peers_refused(1);
                    let e = format!("peer key {key}: {why}");
                    self.warn("peer_refused", &e, "peer model record refused");
                }
            }
        }
        if !events.is_empty() {
            let shared = self.shared.clone();
            self.fleet().publish(&shared, events, |partition, e| {
                shared
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record_anomaly(partition, e);
            });
        }
    }
}

/// Writes a class record to `store` by compare-and-set under `epoch`: a fit as the next version,
/// or the class's medians now into the stored record. `Fenced` when a newer trainer wrote it.
async fn write_record(
    store: kv::Store,
    trainer: String,
    timeout: Duration,
    epoch: u64,
    class: &ClassKey,
    update: Update<'_>,
) -> Result<Written, String> {
    let key = class_key(class);
    {
        timed(timeout, async move {
            for _ in 0..3 {
                let current = live_entry(&store, &key).await.map_err(|e| e.to_string())?;
                let stored = current
                    .as_ref()
                    .and_then(|c| serde_json::from_slice::<PeerRecord>(&c.value).ok());
                let theirs = stored.as_ref().map_or(0, |r| r.epoch);
                if theirs > epoch {
                    return Ok(Written::Fenced(theirs));
                }
                let record = match (&update, stored) {
                    (Update::Fit(set, model, now), stored) => {
                        let n = set.class.metrics.len();
                        let medians: Vec<f64> = (0..n)
                            .map(|j| {
                                let mut col: Vec<f64> =
                                    set.rows.chunks_exact(n).map(|r| r[j]).collect();
                                super::robust::median(&mut col)
                            })
                            .collect();
                        let mut model = model.clone();
                        model.version = stored.map_or(0, |r| r.model.version).saturating_add(1);
                        // Where the whole class stands (the left-out devices included, as in
                        // static mode), and the window that describes.
                        let (now_medians, now_at_ms) = now
                            .clone()
                            .filter(|(m, _)| m.len() == n && m.iter().all(|v| v.is_finite()))
                            .unwrap_or_else(|| (medians.clone(), set.to_ms));
                        PeerRecord {
                            epoch,
                            trainer: trainer.clone(),
                            fitted_at_ms: super::run::now_ms(),
                            class: set.class.clone(),
                            model,
                            trained: set.devices(),
                            excluded: set.excluded,
                            medians,
                            now_medians,
                            now_at_ms,
                        }
                    }
                    (Update::Medians(..), None) => return Ok(Written::Ok(0)),
                    (Update::Medians(now, at_ms), Some(mut r)) => {
                        if now.len() != r.medians.len() || now.iter().any(|v| !v.is_finite()) {
                            return Ok(Written::Ok(r.model.version));
                        }
                        r.epoch = epoch;
                        r.now_medians = now.clone();
                        r.now_at_ms = *at_ms;
                        r
                    }
                };
                let version = record.model.version;
                let v = Bytes::from(serde_json::to_vec(&record).map_err(|e| e.to_string())?);
                let written = match &current {
                    Some(c) => store.update(&key, v, c.revision).await.map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                    None => store.create(&key, v).await.map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists,
                            e.to_string(),
                        )
                    }),
                };
                match written {
                    Ok(_) => return Ok(Written::Ok(version)),
                    Err((true, _)) => continue, // written in between: look again
                    Err((false, e)) => return Err(format!("write {key}: {e}")),
                }
            }
            Err(format!("write {key}: conflicted 3 times"))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> (String, PeerRecord) {
        let class = ClassKey {
            label: None,
            metrics: vec!["current".into(), "flow".into()],
        };
        let rows: Vec<f64> = (0..6)
            .flat_map(|i| [5.0 + i as f64 * 0.01, 20.0 - i as f64 * 0.01])
            .collect();
        let model = PeerModel::fit(class.metrics.clone(), &rows, 0, &Default::default()).unwrap();
        let r = PeerRecord {
            epoch: 7,
            trainer: "agg-2".into(),
            fitted_at_ms: 1,
            class: class.clone(),
            model,
            trained: 6,
            excluded: 0,
            medians: vec![5.0, 20.0],
            now_medians: vec![5.5, 20.0],
            now_at_ms: 0,
        };
        (class_key(&class), r)
    }

    #[test]
    fn a_peer_record_round_trips_and_forged_ones_are_refused() {
        let (key, r) = record();
        let bytes = serde_json::to_vec(&r).unwrap();
        let back = PeerRecord::parse(&key, &bytes).unwrap();
        assert_eq!((back.epoch, back.model.version), (7, r.model.version));
        // Under another class's key.
        let other = class_key(&ClassKey {
            label: Some("x".into()),
            metrics: r.class.metrics.clone(),
        });
        assert!(PeerRecord::parse(&other, &bytes)
            .unwrap_err()
            .contains("class"));
        // A model over other features, a broken model, wrong medians, junk.
        let mut bad = r.clone();
        bad.model.features = vec!["a".into(), "b".into()];
        let e = PeerRecord::parse(&key, &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.contains("features"), "{e}");
        let mut bad = r.clone();
        bad.model.spreads = vec![0.0; bad.model.spreads.len()];
        let e = PeerRecord::parse(&key, &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.contains("invalid model"), "{e}");
        let mut bad = r.clone();
        bad.medians.pop();
        let e = PeerRecord::parse(&key, &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.contains("medians"), "{e}");
        let mut bad = r.clone();
        bad.now_medians.push(1.0);
        let e = PeerRecord::parse(&key, &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.contains("now_medians"), "{e}");
        // The class's movement since the fit is what members take out.
        let (_, cm) = back.into_class_model();
        assert_eq!(cm.shift, Some((vec![0.5, 0.0], 0)));
        assert_eq!(cm.trainer, Some(("agg-2".into(), 7)));
        assert!(PeerRecord::parse(&key, b"{").is_err());
        assert!(PeerRecord::parse(&key, &vec![b' '; MAX_PEER_RECORD_BYTES + 1]).is_err());
    }

    #[test]
    fn class_keys_are_valid_kv_keys_for_any_label() {
        let k = class_key(&ClassKey {
            label: Some("hall 3/ü.*>".into()),
            metrics: vec!["a.b".into()],
        });
        assert!(
            k.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'),
            "{k}"
        );
    }
}
