//! The [`StateStore`] of cluster mode: the state of every owned partition, checkpointed to the
//! `checkpoints` KV bucket by compare-and-set under the partition's lease epoch.
//!
//! Each owned partition keeps its kept windows and lane seqs in a [`MemoryStore`]; a put marks the
//! partition dirty, and [`KvStore::checkpoint`] writes every dirty partition's whole state as one
//! value, concurrently, and reports per partition. Acks for a partition may go out only after its
//! write succeeded; a fenced write means another aggregator took the partition over, so the
//! caller drops it. Writes block on the tokio runtime the store was made on, so call them from a
//! blocking thread (the apply loop runs on one).
//!
//! Value: a format byte, then postcard of the partition's windows and lanes: format `2` with
//! (agent, lane epoch, seq) lanes, format `1` (what versions before lane epochs wrote and read) with
//! (agent, seq) lanes, all of epoch 0. A state whose lanes are all of epoch 0 is still written in
//! format 1, so members of an older version keep taking partitions over until epochs appear. A value
//! is one NATS message, bounded by the servers' `max_payload` (1 MiB by default); partitions whose
//! state outgrows it need more partitions or a higher `max_payload`.
//!
//! Incremental mode (`cluster.checkpoint: incremental`, the default) writes that value only as a
//! *base*: a checkpoint appends a [`PartitionDelta`] of the windows and lanes changed since the
//! last one ([`super::incremental`] tracks them and decides when to compact into a new base), and
//! a take-over folds base and deltas back into the same state ([`PartitionState::from_chain`]).
//! Delta value: format byte `1`, then postcard of [`PartitionDelta`]; an empty value is an empty
//! delta (the marker a take-over appends).
//!
//! (The lease *epoch* of [`super::checkpoint`] fences owners; a *lane* epoch names an agent's outbox.)

use super::checkpoint::{Chain, CheckpointError, CheckpointFence, Kind, KvCheckpoints};
use super::config::CheckpointMode;
use super::incremental::{Changes, Compaction};
use crate::state::{Applied, LaneId};
use crate::store::{MemoryStore, Snapshot, StateStore, StoreError, StoredLane};
use edgewatch_models::wire::{LaneKind, WindowSummary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Lanes with epochs.
const FORMAT: u8 = 2;
/// Before lane epochs: (agent, seq) lanes.
const FORMAT_V1: u8 = 1;

/// The state of one partition as its checkpoint holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionState {
    /// Kept windows, by (device, metric, start).
    pub windows: Vec<WindowSummary>,
    /// (agent, lane epoch, last applied seq) of every lane of the partition.
    pub lanes: Vec<(String, u64, u64)>,
}

/// [`PartitionState`] in format 1.
#[derive(Serialize, Deserialize)]
struct PartitionStateV1 {
    windows: Vec<WindowSummary>,
    lanes: Vec<(String, u64)>,
}

impl PartitionState {
    /// The checkpoint value.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain structs into a Vec cannot fail.
        if self.lanes.iter().all(|(_, epoch, _)| *epoch == 0) {
            let v1 = PartitionStateV1 {
                windows: self.windows.clone(),
                lanes: self.lanes.iter().map(|(a, _, s)| (a.clone(), *s)).collect(),
            };
            let mut out = vec![FORMAT_V1];
            out.extend(postcard::to_allocvec(&v1).unwrap_or_default());
            return out;
        }
        let mut out = vec![FORMAT];
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes a checkpoint value (an empty value is an empty state: a partition taken over
    /// before anything was checkpointed).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let undecodable = |e: postcard::Error| format!("undecodable state: {e}");
        match bytes.split_first() {
            None => Ok(Self::default()),
            Some((&FORMAT, rest)) => postcard::from_bytes(rest).map_err(undecodable),
            Some((&FORMAT_V1, rest)) => {
                let v1: PartitionStateV1 = postcard::from_bytes(rest).map_err(undecodable)?;
                Ok(Self {
                    windows: v1.windows,
                    lanes: v1.lanes.into_iter().map(|(a, s)| (a, 0, s)).collect(),
                })
            }
            Some((v, _)) => Err(format!("unknown state format {v}")),
        }
    }
}

/// Format of a [`PartitionDelta`] value.
const DELTA_FORMAT: u8 = 1;

/// What changed in a partition between two checkpoints: windows added or revised (as they are
/// now), lanes moved (their seq now) and lanes dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionDelta {
    /// Windows added or revised.
    pub windows: Vec<WindowSummary>,
    /// (agent, lane epoch, last applied seq) of the lanes that moved.
    pub lanes: Vec<(String, u64, u64)>,
    /// (agent, lane epoch) of the lanes dropped.
    pub dropped: Vec<(String, u64)>,
}

impl PartitionDelta {
    /// The delta value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![DELTA_FORMAT];
        // Serialising plain structs into a Vec cannot fail.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes a delta value (an empty value is an empty delta).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        match bytes.split_first() {
            None => Ok(Self::default()),
            Some((&DELTA_FORMAT, rest)) => {
                postcard::from_bytes(rest).map_err(|e| format!("undecodable delta: {e}"))
            }
            Some((v, _)) => Err(format!("unknown delta format {v}")),
        }
    }
}

impl PartitionState {
    /// The state a chain of checkpoint records folds to: the base, then each delta in order,
    /// windows kept as a partition's store keeps them (`windows_per_series` newest per series, a
    /// higher revision replacing a window), lanes set or dropped. Memory: the state itself, plus
    /// one decoded record at a time.
    pub fn from_chain(chain: &Chain, windows_per_series: usize) -> Result<Self, String> {
        let base = Self::decode(&chain.base).map_err(|e| format!("base: {e}"))?;
        if chain.deltas.iter().all(|d| d.is_empty()) {
            return Ok(base);
        }
        let mut model = MemoryStore::new(windows_per_series);
        let mut windows = base.windows;
        windows.sort_by(crate::store::window_order);
        for w in windows {
            // Stored windows were validated when first put.
            let _ = model.put_window(0, &w);
        }
        let mut lanes: BTreeMap<(String, u64), u64> = base
            .lanes
            .into_iter()
            .map(|(a, e, s)| ((a, e), s))
            .collect();
        for (i, bytes) in chain.deltas.iter().enumerate() {
            let d = PartitionDelta::decode(bytes).map_err(|e| format!("delta {}: {e}", i + 1))?;
            for w in &d.windows {
                let _ = model.put_window(0, w);
            }
            for (a, e, s) in d.lanes {
                lanes.insert((a, e), s);
            }
            for key in d.dropped {
                lanes.remove(&key);
            }
        }
        Ok(Self {
            windows: model
                .load()
                .unwrap_or_default()
                .windows
                .into_iter()
                .map(|(_, w)| w)
                .collect(),
            lanes: lanes.into_iter().map(|((a, e), s)| (a, e, s)).collect(),
        })
    }
}

/// One owned partition.
#[derive(Debug)]
struct Owned {
    /// The kept windows.
    model: MemoryStore,
    /// Last applied seq by agent, then lane epoch.
    lanes: BTreeMap<String, BTreeMap<u64, u64>>,
    fence: CheckpointFence,
    dirty: bool,
    /// When the oldest change not yet checkpointed was made.
    dirty_since: Option<Instant>,
    /// What changed since the last checkpoint (incremental mode).
    changes: Changes,
    /// Where the partition's chain of records stands.
    compaction: Compaction,
}

impl Owned {
    fn new(
        fence: CheckpointFence,
        state: &PartitionState,
        windows_per_series: usize,
        compaction: Compaction,
    ) -> Self {
        let mut model = MemoryStore::new(windows_per_series);
        let mut windows: Vec<&WindowSummary> = state.windows.iter().collect();
        windows.sort_by(|a, b| crate::store::window_order(a, b));
        for w in windows {
            // Stored windows were validated when first put.
            let _ = model.put_window(fence.partition, w);
        }
        let mut lanes = BTreeMap::new();
        for (agent, epoch, seq) in &state.lanes {
            lanes
                .entry(agent.clone())
                .or_insert_with(BTreeMap::new)
                .insert(*epoch, *seq);
        }
        Self {
            model,
            lanes,
            fence,
            dirty: false,
            dirty_since: None,
            changes: Changes::default(),
            compaction,
        }
    }

    fn mark_dirty(&mut self) {
        self.dirty = true;
        self.dirty_since.get_or_insert_with(Instant::now);
    }

    fn put_window(
        &mut self,
        partition: u32,
        summary: &WindowSummary,
    ) -> Result<Applied, StoreError> {
        let applied = self.model.put_window(partition, summary)?;
        if applied != Applied::Duplicate {
            self.mark_dirty();
        }
        if matches!(applied, Applied::New | Applied::Revised) {
            let limit = self.compaction.max_changes();
            self.changes
                .window(&summary.device, &summary.metric, summary.start_ms, limit);
        }
        Ok(applied)
    }

    fn put_lane_seq(&mut self, agent: &str, epoch: u64, seq: u64) {
        // Looked up by &str: this runs for every batch, and resends must not mark it dirty.
        match self.lanes.get_mut(agent) {
            Some(epochs) => match epochs.get_mut(&epoch) {
                Some(s) if *s >= seq => return,
                Some(s) => *s = seq,
                None => {
                    epochs.insert(epoch, seq);
                }
            },
            None => {
                self.lanes
                    .insert(agent.to_string(), BTreeMap::from([(epoch, seq)]));
            }
        }
        self.mark_dirty();
        let limit = self.compaction.max_changes();
        self.changes.lane(agent, epoch, limit);
    }

    fn drop_lane(&mut self, agent: &str, epoch: u64) {
        let Some(epochs) = self.lanes.get_mut(agent) else {
            return;
        };
        if epochs.remove(&epoch).is_some() {
            if epochs.is_empty() {
                self.lanes.remove(agent);
            }
            self.mark_dirty();
            let limit = self.compaction.max_changes();
            self.changes.lane(agent, epoch, limit);
        }
    }

    /// The delta of the changes listed (incremental mode, not everything changed).
    fn delta(&self) -> PartitionDelta {
        let mut d = PartitionDelta::default();
        for (device, metric, start) in self.changes.windows() {
            // A window evicted since it changed is gone from the reader's fold too.
            if let Some(w) = self.model.window(device, metric, *start) {
                d.windows.push(w.clone());
            }
        }
        for (agent, epoch) in self.changes.lanes() {
            match self.lanes.get(agent).and_then(|e| e.get(epoch)) {
                Some(seq) => d.lanes.push((agent.clone(), *epoch, *seq)),
                None => d.dropped.push((agent.clone(), *epoch)),
            }
        }
        d
    }

    /// Notes how a write of [`Owned::next_write`] (`kind`, `bytes`) ended, with the fence it
    /// left: `ok`, everything changed is checkpointed; otherwise the changes stay for the next
    /// write (which may have to carry them on top of this one, had it landed after all).
    fn write_done(&mut self, kind: Kind, bytes: usize, fence: CheckpointFence, ok: bool) {
        if ok {
            self.dirty = false;
            self.dirty_since = None;
            self.changes.clear();
            self.compaction.written(kind, bytes);
        } else {
            self.compaction.failed(kind, bytes);
        }
        // A timed-out write keeps the old revision; `write` re-reads on the conflict.
        if fence.revision > self.fence.revision {
            self.fence = fence;
        }
    }

    /// What the next checkpoint writes in `mode`: the kind and the value.
    fn next_write(&self, mode: CheckpointMode) -> (Kind, Vec<u8>) {
        if mode == CheckpointMode::Incremental && !self.changes.all() {
            let delta = self.delta().encode();
            if self.compaction.next(delta.len()) == Kind::Delta {
                return (Kind::Delta, delta);
            }
        }
        (Kind::Base, self.state().encode())
    }
}

impl Owned {
    fn state(&self) -> PartitionState {
        let snap = self.model.load().unwrap_or_default();
        PartitionState {
            windows: snap.windows.into_iter().map(|(_, w)| w).collect(),
            lanes: self
                .lanes
                .iter()
                .flat_map(|(a, epochs)| epochs.iter().map(|(e, s)| (a.clone(), *e, *s)))
                .collect(),
        }
    }
}

/// What one checkpoint write did.
#[derive(Debug)]
pub struct Written {
    /// The partition.
    pub partition: u32,
    /// Ok, or why not (fenced means the partition was taken over: drop it).
    pub result: Result<(), CheckpointError>,
    /// Bytes written.
    pub bytes: usize,
    /// Whether it was a base (the whole partition) or a delta.
    pub kind: Kind,
}

/// Owned partitions' state, checkpointed to the KV.
pub struct KvStore {
    checkpoints: KvCheckpoints,
    handle: tokio::runtime::Handle,
    windows_per_series: usize,
    owned: BTreeMap<u32, Owned>,
    write_timeout: Duration,
    /// What each checkpoint writes.
    mode: CheckpointMode,
    /// The training bucket, while this member is the fleet trainer.
    training: Option<super::trainer::KvTraining>,
}

/// Whether a lane id is a training lane's (the trainer's, not a partition's).
fn is_training(id: u32) -> bool {
    id & LaneKind::TRAINING_BIT != 0
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("owned", &self.owned.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KvStore {
    /// A store writing to `checkpoints` on the runtime of `handle`; a write not answered within
    /// `write_timeout` counts as failed (and is retried with the next checkpoint).
    pub fn new(
        checkpoints: KvCheckpoints,
        handle: tokio::runtime::Handle,
        windows_per_series: usize,
        write_timeout: Duration,
    ) -> Self {
        Self {
            checkpoints,
            handle,
            windows_per_series,
            owned: BTreeMap::new(),
            write_timeout,
            mode: CheckpointMode::Incremental,
            training: None,
        }
    }

    /// Checkpoints in `mode` from now on (incremental by default).
    pub fn with_mode(mut self, mode: CheckpointMode) -> Self {
        self.mode = mode;
        self
    }

    /// The write timeout of checkpoints (the trainer's writes use it too).
    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// Starts acting as the fleet trainer, writing to `training`.
    pub fn train(&mut self, training: super::trainer::KvTraining) {
        self.training = Some(training);
    }

    /// Stops acting as the fleet trainer, without writing anything.
    pub fn untrain(&mut self) {
        self.training = None;
    }

    /// Whether this member is the trainer.
    pub fn trains(&self) -> bool {
        self.training.is_some()
    }

    /// Writes the training lanes' seqs if they changed (`None` when not the trainer).
    pub fn checkpoint_training(&mut self) -> Option<Result<(), CheckpointError>> {
        self.training.as_mut().map(|t| t.checkpoint())
    }

    fn trainer_mut(&mut self) -> Result<&mut super::trainer::KvTraining, StoreError> {
        self.training.as_mut().ok_or(StoreError::Training {
            reason: "this member is not the fleet trainer".into(),
            retryable: false,
        })
    }

    /// Starts owning `fence.partition` from `state` (what the take-over read, whose chain of
    /// records stands at `compaction`).
    pub fn own(&mut self, fence: CheckpointFence, state: &PartitionState, compaction: Compaction) {
        let partition = fence.partition;
        let owned = Owned::new(fence, state, self.windows_per_series, compaction);
        self.owned.insert(partition, owned);
    }

    /// Stops owning `partition`, without writing anything.
    pub fn disown(&mut self, partition: u32) {
        self.owned.remove(&partition);
    }

    /// Whether `partition` is owned (a training lane id: whether this member is the trainer).
    pub fn owns(&self, partition: u32) -> bool {
        if is_training(partition) {
            return self.training.is_some();
        }
        self.owned.contains_key(&partition)
    }

    /// Whether `partition` has changes not yet checkpointed (a training lane id: the trainer's
    /// lane seqs).
    pub fn is_dirty(&self, partition: u32) -> bool {
        if is_training(partition) {
            return self.training.as_ref().is_some_and(|t| t.is_dirty());
        }
        self.owned.get(&partition).is_some_and(|o| o.dirty)
    }

    /// How long the oldest change of `partition` not yet checkpointed has waited (zero when
    /// everything is checkpointed): its checkpoint lag.
    pub fn lag(&self, partition: u32) -> Option<Duration> {
        self.owned
            .get(&partition)
            .map(|o| o.dirty_since.map_or(Duration::ZERO, |t| t.elapsed()))
    }

    /// The owned partitions.
    pub fn partitions(&self) -> Vec<u32> {
        self.owned.keys().copied().collect()
    }

    /// Writes the state of every dirty partition in `only` (every dirty partition when `None`),
    /// all at once, and waits for the answers. A partition stays dirty until its write succeeds.
    pub fn checkpoint(&mut self, only: Option<&[u32]>) -> Vec<Written> {
        let mut tasks = Vec::new();
        for (&partition, o) in &self.owned {
            if !o.dirty || only.is_some_and(|ps| !ps.contains(&partition)) {
                continue;
            }
            let (kind, bytes) = o.next_write(self.mode);
            let mut fence = o.fence.clone();
            let cps = self.checkpoints.clone();
            let timeout = self.write_timeout;
            tasks.push(self.handle.spawn(async move {
                let len = bytes.len();
                let write = async {
                    match kind {
                        Kind::Base => cps.write(&mut fence, &bytes).await,
                        Kind::Delta => cps.write_delta(&mut fence, &bytes).await,
                    }
                };
                let result = match tokio::time::timeout(timeout, write).await {
                    Ok(r) => r.map(|_| ()),
                    Err(_) => Err(CheckpointError::Timeout {
                        partition: fence.partition,
                        after: timeout,
                    }),
                };
                (fence, result, len, kind)
            }));
        }
        let done = self.handle.block_on(async {
            let mut done = Vec::with_capacity(tasks.len());
            for t in tasks {
                if let Ok(r) = t.await {
                    done.push(r);
                }
            }
            done
        });
        let mut out = Vec::with_capacity(done.len());
        for (fence, result, bytes, kind) in done {
            let partition = fence.partition;
            if let Some(o) = self.owned.get_mut(&partition) {
                o.write_done(kind, bytes, fence, result.is_ok());
            }
            out.push(Written {
                partition,
                result,
                bytes,
                kind,
            });
        }
        out
    }

    fn owned_mut(&mut self, partition: u32) -> Result<&mut Owned, StoreError> {
        self.owned
            .get_mut(&partition)
            .ok_or(StoreError::NotOwned { partition })
    }
}

impl StateStore for KvStore {
    fn put_window(
        &mut self,
        partition: u32,
        summary: &WindowSummary,
    ) -> Result<Applied, StoreError> {
        self.owned_mut(partition)?.put_window(partition, summary)
    }

    fn put_lane_seq(&mut self, lane: LaneId<'_>, seq: u64) -> Result<(), StoreError> {
        if is_training(lane.partition) {
            self.trainer_mut()?
                .put_lane(lane.agent, lane.partition, lane.epoch, seq);
            return Ok(());
        }
        self.owned_mut(lane.partition)?
            .put_lane_seq(lane.agent, lane.epoch, seq);
        Ok(())
    }

    fn drop_lane(&mut self, lane: LaneId<'_>) -> Result<(), StoreError> {
        if is_training(lane.partition) {
            if let Some(t) = &mut self.training {
                t.drop_lane(lane.agent, lane.partition, lane.epoch);
            }
            return Ok(());
        }
        if let Some(o) = self.owned.get_mut(&lane.partition) {
            o.drop_lane(lane.agent, lane.epoch);
        } // nothing stored for a partition not owned
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        for w in self.checkpoint(None) {
            if let Err(e) = w.result {
                return Err(StoreError::Checkpoint {
                    partition: w.partition,
                    retryable: !matches!(e, CheckpointError::Fenced { .. }),
                    reason: e.to_string(),
                });
            }
        }
        if let Some(Err(e)) = self.checkpoint_training() {
            return Err(StoreError::Training {
                retryable: !matches!(e, CheckpointError::Fenced { .. }),
                reason: format!("lane seqs: {e}"),
            });
        }
        Ok(())
    }

    fn put_training(
        &mut self,
        set: &edgewatch_models::multi::DeviceSet,
        changed: Option<i64>,
    ) -> Result<(), StoreError> {
        self.trainer_mut()?.put_set(set, changed)
    }

    fn put_model(&mut self, model: &crate::training::StoredModel) -> Result<(), StoreError> {
        self.trainer_mut()?.put_model(model)
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut s = Snapshot::default();
        for (&partition, o) in &self.owned {
            s.windows.extend(o.model.load()?.windows);
            s.lanes.extend(o.lanes.iter().flat_map(|(a, epochs)| {
                epochs
                    .iter()
                    .map(move |(e, seq)| (a.clone(), partition, *e, *seq))
            }));
        }
        crate::store::sort_snapshot(&mut s);
        Ok(s)
    }

    fn lane_seqs(&self) -> Result<Vec<StoredLane>, StoreError> {
        Ok(self.load()?.lanes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn window(device: &str, start: i64) -> WindowSummary {
        WindowSummary {
            device: device.into(),
            metric: "temp".into(),
            start_ms: start,
            end_ms: start + 1000,
            count: 10,
            min: 1.0,
            max: 2.0,
            mean: 1.5,
            std: 0.1,
            first_ts_ms: start,
            last_ts_ms: start + 900,
            max_score: 0.2,
            revision: 0,
        }
    }

    #[test]
    fn a_partition_state_round_trips_and_bad_values_are_named() {
        let st = PartitionState {
            windows: vec![window("d/1 ü", 0), window("d2", 1000)],
            lanes: vec![("agent-1".into(), 0, 42)],
        };
        assert_eq!(PartitionState::decode(&st.encode()).unwrap(), st);
        assert_eq!(
            st.encode()[0],
            FORMAT_V1,
            "no epochs yet: older members can read it"
        );
        let with_epochs = PartitionState {
            windows: st.windows.clone(),
            lanes: vec![("agent-1".into(), 0, 42), ("agent-1".into(), 0xfeed, 7)],
        };
        assert_eq!(with_epochs.encode()[0], FORMAT);
        assert_eq!(
            PartitionState::decode(&with_epochs.encode()).unwrap(),
            with_epochs
        );
        assert_eq!(
            PartitionState::decode(&[]).unwrap(),
            PartitionState::default()
        );
        assert!(PartitionState::decode(&[7, 1])
            .unwrap_err()
            .contains("format 7"));
        assert!(PartitionState::decode(&[FORMAT, 200, 200, 200])
            .unwrap_err()
            .contains("undecodable"));
    }

    #[test]
    fn a_checkpoint_from_before_lane_epochs_loads_its_lanes_as_epoch_zero() {
        let old = PartitionStateV1 {
            windows: vec![window("d", 0)],
            lanes: vec![("gw-1".into(), 9), ("gw-2".into(), 3)],
        };
        let mut bytes = vec![FORMAT_V1];
        bytes.extend(postcard::to_allocvec(&old).unwrap());
        let st = PartitionState::decode(&bytes).unwrap();
        assert_eq!(st.windows, old.windows);
        assert_eq!(
            st.lanes,
            vec![("gw-1".to_string(), 0, 9), ("gw-2".to_string(), 0, 3)]
        );
    }

    fn fence() -> CheckpointFence {
        CheckpointFence {
            partition: 3,
            epoch: 1,
            revision: 1,
        }
    }

    /// Writes the next checkpoint of `o` into `chain` as the KV would hold it (a base replaces
    /// the chain), as `KvStore::checkpoint` does on success; returns its kind.
    fn checkpoint_into(o: &mut Owned, chain: &mut Chain, mode: CheckpointMode) -> Kind {
        let (kind, bytes) = o.next_write(mode);
        match kind {
            Kind::Base => {
                *chain = Chain {
                    base: bytes.clone().into(),
                    deltas: Vec::new(),
                    bytes: bytes.len(),
                }
            }
            Kind::Delta => {
                chain.bytes += bytes.len();
                chain.deltas.push(bytes.clone().into());
            }
        }
        o.changes.clear();
        o.dirty = false;
        o.compaction.written(kind, bytes.len());
        kind
    }

    fn revised(mut w: WindowSummary, revision: u32, count: u64) -> WindowSummary {
        w.revision = revision;
        w.count = count;
        w
    }

    #[test]
    fn base_and_deltas_fold_back_to_the_writer_s_state() {
        let wps = 3;
        let mut o = Owned::new(
            fence(),
            &PartitionState::default(),
            wps,
            Compaction::default(),
        );
        let mut chain = Chain::default();
        let mut kinds = Vec::new();
        let mut t = 0;
        for round in 0..40 {
            for d in 0..20 {
                // New windows (evicting old ones past 3 per series), a revision, a late window.
                o.put_window(3, &window(&format!("dev-{d}"), t)).unwrap();
                if round % 3 == 0 {
                    o.put_window(3, &revised(window(&format!("dev-{d}"), t), 2, 99))
                        .unwrap();
                }
            }
            o.put_window(3, &window("late", -1000 * round)).unwrap();
            o.put_lane_seq("gw-1", 0, round as u64 + 1);
            o.put_lane_seq(&format!("gw-{round}"), 7, 5);
            if round > 2 {
                o.drop_lane(&format!("gw-{}", round - 2), 7);
            }
            t += 1000;
            kinds.push(checkpoint_into(
                &mut o,
                &mut chain,
                CheckpointMode::Incremental,
            ));
            assert_eq!(
                PartitionState::from_chain(&chain, wps).unwrap(),
                o.state(),
                "round {round}: the reader folds what the writer holds"
            );
        }
        assert!(
            kinds.iter().filter(|k| **k == Kind::Delta).count() > 20,
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&Kind::Base),
            "compacted now and then: {kinds:?}"
        );
        assert!(
            chain.bytes
                <= 2 * chain
                    .base
                    .len()
                    .max(super::super::incremental::MIN_BASE_BYTES)
                    + 64
        );
        // Full mode writes the whole partition every time, in the format older members read.
        o.put_window(3, &window("dev-0", t)).unwrap();
        assert_eq!(
            checkpoint_into(&mut o, &mut chain, CheckpointMode::Full),
            Kind::Base
        );
        assert_eq!(
            chain.base,
            o.state().encode(),
            "the value versions before wrote"
        );
        assert_eq!(PartitionState::from_chain(&chain, wps).unwrap(), o.state());
    }

    #[test]
    fn a_delta_holds_only_what_changed() {
        let mut state = PartitionState::default();
        for d in 0..1000 {
            state.windows.push(window(&format!("dev-{d}"), 0));
        }
        let base = state.encode();
        let mut o = Owned::new(fence(), &state, 60, Compaction::new(base.len(), 0, 0));
        o.put_window(3, &window("dev-7", 1000)).unwrap();
        o.put_window(3, &window("dev-7", 0)).unwrap(); // a duplicate: not a change
        o.put_lane_seq("gw", 0, 9);
        let (kind, delta) = o.next_write(CheckpointMode::Incremental);
        assert_eq!(kind, Kind::Delta);
        let d = PartitionDelta::decode(&delta).unwrap();
        assert_eq!(d.windows, vec![window("dev-7", 1000)]);
        assert_eq!(d.lanes, vec![("gw".to_string(), 0, 9)]);
        assert!(
            delta.len() * 100 < base.len(),
            "{} vs {}",
            delta.len(),
            base.len()
        );
    }

    #[test]
    fn deltas_and_chains_with_bad_bytes_are_named_not_panicked_on() {
        assert_eq!(
            PartitionDelta::decode(&[]).unwrap(),
            PartitionDelta::default()
        );
        assert!(PartitionDelta::decode(&[9])
            .unwrap_err()
            .contains("delta format 9"));
        assert!(PartitionDelta::decode(&[DELTA_FORMAT, 0xff, 0xff])
            .unwrap_err()
            .contains("undecodable"));
        let chain = Chain {
            base: PartitionState::default().encode().into(),
            deltas: vec![Bytes::new(), Bytes::from_static(&[DELTA_FORMAT, 0xff])],
            bytes: 0,
        };
        let e = PartitionState::from_chain(&chain, 3).unwrap_err();
        assert!(e.contains("delta 2"), "{e}");
    }
}

#[cfg(test)]
#[path = "store_model.rs"]
mod model;
