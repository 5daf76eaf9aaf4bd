//! The fleet trainer of cluster mode: one member, elected by the `trainer` key of the leases
//! bucket, applies every agent's training lane and fits the device models; its training sets,
//! models and training-lane seqs live in the `{prefix}_training` KV bucket, so the member that
//! takes the lease over after a crash resumes from them.
//!
//! Keys of the training bucket (device ids hex-encoded, so any id makes a valid key):
//! - `trainer`: the training lanes' seqs, a checkpoint fenced like a partition's
//!   ([`super::checkpoint`]) under the trainer lease's revision: a deposed trainer's next write
//!   fails, and it then stops acknowledging;
//! - `s.{device}`: a device's set without its samples (JSON), `x.{device}.{from_ms}` one kept
//!   sample each (JSON; one period's rows, far below `max_payload`);
//! - `m.{device}`: the device's model with the epoch it was written under (JSON). A model is
//!   written by compare-and-set on the key's revision, refused when the stored epoch is newer, and
//!   published only after that write succeeded: two members never publish competing versions.
//!
//! Samples and set headers are plain puts: a deposed trainer's late write of a sample is the same
//! sample the agent sends (and resends to the new trainer) anyway. Writes block on the runtime
//! handle: the apply loop calls them from its blocking thread.

use super::checkpoint::{CheckpointError, CheckpointFence, KvCheckpoints};
use super::lease::TRAINER;
use crate::store::StoreError;
use crate::training::StoredModel;
use async_nats::jetstream::kv;
use bytes::Bytes;
use edgewatch_models::multi::{DeviceSet, KeptSample};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// The bucket of training sets, models and the trainer's lane seqs.
pub const TRAINING_BUCKET: &str = "training";

/// Keys read at once when taking training over.
const READS_IN_FLIGHT: usize = 16;

/// A training lane's applied seq: (agent, lane id with the training bit, lane epoch) → seq.
pub type TrainingLanes = BTreeMap<(String, u32, u64), u64>;

/// Everything the trainer resumes from, as the bucket holds it.
#[derive(Debug, Default)]
pub struct TrainerState {
    /// The training lanes' seqs.
    pub lanes: TrainingLanes,
    /// The devices' sets, with their samples (oldest first).
    pub sets: Vec<DeviceSet>,
    /// The fitted models.
    pub models: Vec<StoredModel>,
}

/// What a model key holds.
#[derive(Serialize, Deserialize)]
struct ModelValue {
    epoch: u64,
    stored: StoredModel,
}

/// `s`'s bytes in lower-case hex: any id makes a valid KV key.
pub(crate) fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The inverse of [`hex`]; `None` for anything else.
pub(crate) fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn set_key(device: &str) -> String {
    format!("s.{}", hex(device))
}

fn sample_key(device: &str, from_ms: i64) -> String {
    // Flipping the sign bit makes the hex sort like the numbers.
    format!("x.{}.{:016x}", hex(device), (from_ms as u64) ^ (1 << 63))
}

fn model_key(device: &str) -> String {
    format!("m.{}", hex(device))
}

/// The training bucket, read at a take-over and written by the trainer.
#[derive(Debug, Clone)]
pub struct TrainingBucket {
    store: kv::Store,
}

impl TrainingBucket {
    /// The bucket `store` (no TTL).
    pub fn new(store: kv::Store) -> Self {
        Self { store }
    }

    fn checkpoints(&self) -> KvCheckpoints {
        KvCheckpoints::new(self.store.clone())
    }

    /// Takes training over under `epoch` (the trainer lease's revision): fences every previous
    /// trainer's lane writes, then reads the lanes, sets, samples and models.
    pub async fn take_over(
        &self,
        epoch: u64,
    ) -> Result<(CheckpointFence, TrainerState), CheckpointError> {
        let (lanes, fence) = self.checkpoints().take_over(TRAINER, epoch).await?;
        let corrupt = |key: &str, reason: String| CheckpointError::Corrupt {
            partition: TRAINER,
            revision: 0,
            reason: format!("training bucket key {key}: {reason}"),
        };
        let mut state = TrainerState::default();
        if let Some(bytes) = lanes.filter(|b| !b.is_empty()) {
            let list: Vec<(String, u32, u64, u64)> =
                postcard::from_bytes(&bytes).map_err(|e| corrupt("trainer", e.to_string()))?;
            state.lanes = list
                .into_iter()
                .map(|(a, id, e, s)| ((a, id, e), s))
                .collect();
        }
        // From the stream's subjects, not a KV key listing (see `kv::list_keys`).
        let names = super::kv::list_keys(&self.store).await?;
        // Reads in flight at once: one at a time costs a round trip per key (see NATS.md).
        let store = &self.store;
        let mut entries = futures_util::stream::iter(names)
            .map(|name| async move {
                let entry = super::kv::live_entry(store, &name).await;
                (name, entry)
            })
            .buffered(READS_IN_FLIGHT);
        let mut sets: BTreeMap<String, DeviceSet> = BTreeMap::new();
        let mut samples: HashMap<String, Vec<KeptSample>> = HashMap::new();
        while let Some((name, entry)) = entries.next().await {
            let Some(entry) = entry? else {
                continue;
            };
            let mut parts = name.splitn(3, '.');
            let (kind, device) = (parts.next(), parts.next().and_then(unhex));
            match (kind, device) {
                (Some("s"), Some(device)) => {
                    let set: DeviceSet = serde_json::from_slice(&entry.value)
                        .map_err(|e| corrupt(&name, format!("bad set json: {e}")))?;
                    if set.device != device {
                        return Err(corrupt(&name, format!("holds the set of {:?}", set.device)));
                    }
                    sets.insert(device, set);
                }
                (Some("x"), Some(device)) => {
                    let s: KeptSample = serde_json::from_slice(&entry.value)
                        .map_err(|e| corrupt(&name, format!("bad sample json: {e}")))?;
                    samples.entry(device).or_default().push(s);
                }
                (Some("m"), Some(_)) => {
                    let v: ModelValue = serde_json::from_slice(&entry.value)
                        .map_err(|e| corrupt(&name, format!("bad model json: {e}")))?;
                    v.stored
                        .model
                        .validate()
                        .map_err(|e| corrupt(&name, format!("invalid model: {e}")))?;
                    state.models.push(v.stored);
                }
                _ if name == "trainer" => {}
                _ => tracing::warn!(key = %name, "unknown key in the training bucket; ignored"),
            }
        }
        for (device, mut set) in sets {
            let mut kept = samples.remove(&device).unwrap_or_default();
            kept.sort_by_key(|s| s.from_ms);
            set.rows = 0;
            for s in kept {
                if set.features.is_empty() || s.values.len() % set.features.len() != 0 {
                    continue;
                }
                set.rows += s.values.len() / set.features.len();
                set.samples.push_back(s);
            }
            state.sets.push(set);
        }
        Ok((fence, state))
    }
}

/// The trainer's writes, from the apply loop: sets and samples, models, and the lanes checkpoint.
pub struct KvTraining {
    bucket: TrainingBucket,
    fence: CheckpointFence,
    lanes: TrainingLanes,
    dirty: bool,
    /// The sample periods stored per device, so a changed set writes and deletes only its changes.
    stored: HashMap<String, BTreeSet<i64>>,
    handle: tokio::runtime::Handle,
    timeout: Duration,
}

impl std::fmt::Debug for KvTraining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvTraining")
            .field("epoch", &self.fence.epoch)
            .field("lanes", &self.lanes.len())
            .finish()
    }
}

impl KvTraining {
    /// The trainer's store after a take-over under `fence`, holding `state`.
    pub fn new(
        bucket: TrainingBucket,
        fence: CheckpointFence,
        state: &TrainerState,
        handle: tokio::runtime::Handle,
        timeout: Duration,
    ) -> Self {
        let stored = state
            .sets
            .iter()
            .map(|s| {
                (
                    s.device.clone(),
                    s.samples.iter().map(|k| k.from_ms).collect(),
                )
            })
            .collect();
        Self {
            bucket,
            fence,
            lanes: state.lanes.clone(),
            dirty: false,
            stored,
            handle,
            timeout,
        }
    }

    /// The trainer lease's revision this trainer writes under.
    pub fn epoch(&self) -> u64 {
        self.fence.epoch
    }

    /// Whether lane seqs wait for their checkpoint.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    fn err(&self, op: &'static str, key: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Training {
            retryable: true,
            reason: format!("{op} {key}: {e}"),
        }
    }

    fn block<T>(
        &self,
        op: &'static str,
        key: &str,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self
            .handle
            .block_on(async { tokio::time::timeout(self.timeout, f).await })
        {
            Ok(r) => r,
            Err(_) => Err(self.err(op, key, format!("no answer within {:?}", self.timeout))),
        }
    }

    /// Notes a training lane's applied seq (written with the next checkpoint).
    pub fn put_lane(&mut self, agent: &str, id: u32, epoch: u64, seq: u64) {
        let slot = self
            .lanes
            .entry((agent.to_string(), id, epoch))
            .or_insert(0);
        if *slot < seq {
            *slot = seq;
            self.dirty = true;
        }
    }

    /// Forgets a training lane (evicted by a newer epoch of its agent).
    pub fn drop_lane(&mut self, agent: &str, id: u32, epoch: u64) {
        if self.lanes.remove(&(agent.to_string(), id, epoch)).is_some() {
            self.dirty = true;
        }
    }

    /// Stores `set`: its header, the samples not stored yet and the one starting at `changed`, and
    /// deletes the stored samples it no longer holds.
    pub fn put_set(&mut self, set: &DeviceSet, changed: Option<i64>) -> Result<(), StoreError> {
        let store = self.bucket.store.clone();
        let before = self.stored.get(&set.device).cloned().unwrap_or_default();
        let now: BTreeSet<i64> = set.samples.iter().map(|s| s.from_ms).collect();
        let mut puts = Vec::new();
        for s in &set.samples {
            if !before.contains(&s.from_ms) || changed == Some(s.from_ms) {
                let v = serde_json::to_vec(s).map_err(|e| self.err("encode", "sample", e))?;
                puts.push((sample_key(&set.device, s.from_ms), Bytes::from(v)));
            }
        }
        let deletes: Vec<String> = before
            .difference(&now)
            .map(|&from| sample_key(&set.device, from))
            .collect();
        let header = DeviceSet {
            samples: Default::default(),
            ..set.clone()
        };
        let v = serde_json::to_vec(&header).map_err(|e| self.err("encode", "set", e))?;
        puts.push((set_key(&set.device), Bytes::from(v)));
        let key = set_key(&set.device);
        self.block("put", &key, async move {
            for (k, v) in puts {
                store
                    .put(&k, v)
                    .await
                    .map_err(|e| op_store_err(&k, "put", e))?;
            }
            for k in deletes {
                store
                    .purge(&k)
                    .await
                    .map_err(|e| op_store_err(&k, "purge", e))?;
            }
            Ok(())
        })?;
        self.stored.insert(set.device.clone(), now);
        Ok(())
    }

    /// Writes a model by compare-and-set under this trainer's epoch; refused when a newer trainer
    /// wrote the key (then this one must not publish it).
    pub fn put_model(&mut self, stored: &StoredModel) -> Result<(), StoreError> {
        let store = self.bucket.store.clone();
        let key = model_key(&stored.model.key);
        let epoch = self.fence.epoch;
        let value = serde_json::to_vec(&ModelValue {
            epoch,
            stored: stored.clone(),
        })
        .map_err(|e| self.err("encode", &key, e))?;
        let k = key.clone();
        self.block("write", &key, async move {
            for _ in 0..3 {
                let current = super::kv::live_entry(&store, &k)
                    .await
                    .map_err(|e| op_store_err(&k, "read", e))?;
                if let Some(c) = &current {
                    let theirs = serde_json::from_slice::<ModelValue>(&c.value)
                        .map(|v| v.epoch)
                        .unwrap_or(0);
                    if theirs > epoch {
                        return Err(StoreError::Training {
                            retryable: false,
                            reason: format!("model {k}: written by a newer trainer (epoch {theirs} > {epoch}): this member is no longer the trainer"),
                        });
                    }
                }
                let written = match &current {
                    Some(c) => store
                        .update(&k, Bytes::from(value.clone()), c.revision)
                        .await
                        .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
                    None => store
                        .create(&k, Bytes::from(value.clone()))
                        .await
                        .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
                };
                match written {
                    Ok(_) => return Ok(()),
                    Err((true, _)) => continue, // written in between: look again
                    Err((false, e)) => return Err(op_store_err(&k, "write", e)),
                }
            }
            Err(op_store_err(&k, "write", "conflicted 3 times"))
        })
    }

    /// Writes the lane seqs if they changed, fenced under the trainer's epoch.
    pub fn checkpoint(&mut self) -> Result<(), CheckpointError> {
        if !self.dirty {
            return Ok(());
        }
        let list: Vec<(&String, &u32, &u64, &u64)> = self
            .lanes
            .iter()
            .map(|((a, id, e), s)| (a, id, e, s))
            .collect();
        let bytes = postcard::to_allocvec(&list).unwrap_or_default();
        let cps = self.bucket.checkpoints();
        let mut fence = self.fence.clone();
        let timeout = self.timeout;
        let result = self.handle.block_on(async {
            match tokio::time::timeout(timeout, cps.write(&mut fence, &bytes)).await {
                Ok(r) => r.map(|_| fence),
                Err(_) => Err(CheckpointError::Timeout {
                    partition: TRAINER,
                    after: timeout,
                }),
            }
        });
        let fence = result?;
        self.fence = fence;
        self.dirty = false;
        Ok(())
    }
}

fn op_store_err(key: &str, op: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Training {
        retryable: true,
        reason: format!("{op} {key}: {e}"),
    }
}

/// The fleet trainer role of one member (with `training.enabled`): its own task, so a slow take-over
/// (reading the whole training bucket) never delays the partition leases' renewals. Holding the
/// `trainer` lease: renew it every heartbeat; otherwise try for it every heartbeat. Winning it: take
/// the training bucket over under the lease's revision (fencing the previous trainer), load the
/// sets, models and lane seqs into the apply loop, and only then subscribe to every training lane.
pub(crate) struct TrainerRole {
    pub(crate) shared: std::sync::Arc<crate::Shared>,
    pub(crate) leases: super::lease::Leases,
    pub(crate) bucket: TrainingBucket,
    pub(crate) cluster: super::config::ClusterConfig,
    pub(crate) ctl: tokio::sync::mpsc::Sender<crate::consumer::Input>,
    pub(crate) client: rumqttc::AsyncClient,
    /// A training write was fenced in the apply loop: another member trains.
    pub(crate) fenced: tokio::sync::mpsc::UnboundedReceiver<()>,
    pub(crate) lease: Option<super::lease::Lease>,
    /// The lease's revision while this member trains, else `None`: the fleet peer models are
    /// fitted under it (`fleet::cluster`).
    pub(crate) role: tokio::sync::watch::Sender<Option<u64>>,
}

impl TrainerRole {
    fn id(&self) -> &str {
        &self.shared.cfg.id
    }

    /// Runs until `cancel`, then gives the role back (a last lanes checkpoint, acks, release).
    pub(crate) async fn run(mut self, cancel: tokio_util::sync::CancellationToken) {
        let period = Duration::from_millis(self.cluster.heartbeat_ms);
        let mut next_try = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(()) = self.fenced.recv() => {
                    self.untrain(false, "a training write was fenced: another member trains").await;
                }
                _ = tokio::time::sleep((period / 4).max(Duration::from_millis(50))) => {
                    if self.lease.is_some() {
                        self.renew(period).await;
                    } else if std::time::Instant::now() >= next_try {
                        next_try = std::time::Instant::now() + period;
                        self.try_take().await;
                    }
                }
            }
        }
        self.untrain(true, "stopping").await;
    }

    /// Renews the lease when a heartbeat period old; drops the role when it is lost or could not
    /// be renewed within its local validity.
    async fn renew(&mut self, period: Duration) {
        let Some(lease) = self.lease.clone() else {
            return;
        };
        if lease.acquired_at.elapsed() < period {
            return;
        }
        match self.leases.renew(&lease).await {
            Ok(l) => self.lease = Some(l),
            Err(super::lease::LeaseError::Lost { .. }) => {
                self.untrain(false, "the trainer lease was lost").await;
            }
            Err(e)
                if !self
                    .leases
                    .is_valid_locally(&lease, std::time::Instant::now()) =>
            {
                tracing::warn!(aggregator = %self.id(), error = %e, "trainer lease renewal failed");
                self.untrain(false, "the trainer lease could not be renewed in time")
                    .await;
            }
            Err(e) => {
                tracing::warn!(aggregator = %self.id(), error = %e, "trainer lease renewal failed; retrying");
            }
        }
    }

    /// Tries to win the role: the lease, the take-over, the load, then the subscription.
    async fn try_take(&mut self) {
        use crate::cluster::node::Control;
        let lease = match self.leases.try_acquire(TRAINER).await {
            Ok(Some(l)) => l,
            Ok(None) => match self.leases.adopt(TRAINER).await {
                Ok(Some(l)) => l,
                Ok(None) => return, // another member trains
                Err(e) => {
                    tracing::warn!(aggregator = %self.id(), error = %e, "cannot adopt the trainer lease");
                    return;
                }
            },
            Err(e) => {
                tracing::warn!(aggregator = %self.id(), error = %e, "cannot take the trainer lease");
                return;
            }
        };
        let started = std::time::Instant::now();
        let (fence, state) = match self.bucket.take_over(lease.revision).await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(aggregator = %self.id(), error = %e, "cannot take training over; giving the trainer lease back");
                let _ = self.leases.release(lease).await;
                return;
            }
        };
        // Reading a large bucket may take a while: renew before acting on the lease.
        let lease = match self.leases.renew(&lease).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(aggregator = %self.id(), error = %e, "trainer lease lost while loading the training bucket");
                return;
            }
        };
        let (devices, models) = (state.sets.len(), state.models.len());
        let training = KvTraining::new(
            self.bucket.clone(),
            fence,
            &state,
            tokio::runtime::Handle::current(),
            Duration::from_millis(self.cluster.lease_ttl_ms / 2),
        );
        let (done, wait) = tokio::sync::oneshot::channel();
        let train = Control::Train {
            training: Box::new(training),
            state: Box::new(state),
            done,
        };
        if self
            .ctl
            .send(crate::consumer::Input::Control(train))
            .await
            .is_err()
            || wait.await.is_err()
        {
            return; // shutting down
        }
        let epoch = lease.revision;
        self.lease = Some(lease);
        self.role.send_replace(Some(epoch));
        let topics = edgewatch_models::wire::Topics::new(&self.shared.cfg.prefix);
        // Without training the role fits only the fleet peer models: no training lanes.
        if self.shared.training.is_some() {
            if let Err(e) = self
                .client
                .subscribe(topics.all_samples_filter(), super::node::PARTITION_QOS)
                .await
            {
                tracing::warn!(aggregator = %self.id(), error = %e, "subscribe request failed; the next reconnect subscribes");
            }
        }
        tracing::info!(aggregator = %self.id(), epoch, devices, models, load_ms = started.elapsed().as_millis() as u64,
            "this member is the fleet trainer: it applies the training lanes and fits the device models");
    }

    /// Stops training: unsubscribes the training lanes, then (with `checkpoint`, a clean give-back)
    /// writes and acknowledges their seqs and releases the lease; otherwise drops everything at
    /// once (the lease is lost).
    async fn untrain(&mut self, checkpoint: bool, why: &str) {
        use crate::cluster::node::Control;
        let Some(lease) = self.lease.take() else {
            return;
        };
        self.role.send_replace(None);
        let topics = edgewatch_models::wire::Topics::new(&self.shared.cfg.prefix);
        if self.shared.training.is_some() {
            let _ = self.client.unsubscribe(topics.all_samples_filter()).await;
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        let _ = self
            .ctl
            .send(crate::consumer::Input::Control(Control::Untrain {
                checkpoint,
                done: Some(done),
            }))
            .await;
        // Without training there are no lanes to write: the lease is given back at once.
        let written = wait.await.unwrap_or(false) || self.shared.training.is_none();
        if checkpoint && written {
            if let Err(e) = self.leases.release(lease).await {
                tracing::warn!(aggregator = %self.id(), error = %e, "trainer lease release failed; it expires by itself");
            }
        }
        if checkpoint {
            tracing::info!(aggregator = %self.id(), why, "fleet trainer role given back");
        } else {
            tracing::warn!(aggregator = %self.id(), why, "no longer the fleet trainer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_any_device_id_and_sample_keys_sort_by_period() {
        for id in ["pump-1", "d/1 ü", "a.b*c>", ""] {
            let k = set_key(id);
            assert!(
                k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-'),
                "{k}"
            );
            assert_eq!(unhex(&k[2..]).as_deref(), Some(id));
        }
        let (a, b, c) = (
            sample_key("d", -5),
            sample_key("d", 0),
            sample_key("d", 3_600_000),
        );
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
