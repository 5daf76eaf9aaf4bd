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
//! (The lease *epoch* of [`super::checkpoint`] fences owners; a *lane* epoch names an agent's outbox.)

use super::checkpoint::{CheckpointError, CheckpointFence, KvCheckpoints};
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
}

impl Owned {
    fn mark_dirty(&mut self) {
        self.dirty = true;
        self.dirty_since.get_or_insert_with(Instant::now);
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
}

/// Owned partitions' state, checkpointed to the KV.
pub struct KvStore {
    checkpoints: KvCheckpoints,
    handle: tokio::runtime::Handle,
    windows_per_series: usize,
    owned: BTreeMap<u32, Owned>,
    write_timeout: Duration,
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
            training: None,
        }
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

    /// Starts owning `fence.partition` from `state` (what the take-over read).
    pub fn own(&mut self, fence: CheckpointFence, state: &PartitionState) {
        let partition = fence.partition;
        let mut model = MemoryStore::new(self.windows_per_series);
        let mut windows: Vec<&WindowSummary> = state.windows.iter().collect();
        windows.sort_by(|a, b| crate::store::window_order(a, b));
        for w in windows {
            // Stored windows were validated when first put.
            let _ = model.put_window(partition, w);
        }
        self.owned.insert(
            partition,
            Owned {
                model,
                lanes: state.lanes.iter().fold(
                    BTreeMap::new(),
                    |mut lanes, (agent, epoch, seq)| {
                        lanes
                            .entry(agent.clone())
                            .or_insert_with(BTreeMap::new)
                            .insert(*epoch, *seq);
                        lanes
                    },
                ),
                fence,
                dirty: false,
                dirty_since: None,
            },
        );
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
            let bytes = o.state().encode();
            let mut fence = o.fence.clone();
            let cps = self.checkpoints.clone();
            let timeout = self.write_timeout;
            tasks.push(self.handle.spawn(async move {
                let len = bytes.len();
                let result =
                    match tokio::time::timeout(timeout, cps.write(&mut fence, &bytes)).await {
                        Ok(r) => r.map(|_| ()),
                        Err(_) => Err(CheckpointError::Timeout {
                            partition: fence.partition,
                            after: timeout,
                        }),
                    };
                (fence, result, len)
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
        for (fence, result, bytes) in done {
            let partition = fence.partition;
            if let Some(o) = self.owned.get_mut(&partition) {
                if result.is_ok() {
                    o.dirty = false;
                    o.dirty_since = None;
                }
                // A timed-out write keeps the old revision; `write` re-reads on the conflict.
                if fence.revision > o.fence.revision {
                    o.fence = fence;
                }
            }
            out.push(Written {
                partition,
                result,
                bytes,
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
        let o = self.owned_mut(partition)?;
        let applied = o.model.put_window(partition, summary)?;
        if applied != Applied::Duplicate {
            o.mark_dirty();
        }
        Ok(applied)
    }

    fn put_lane_seq(&mut self, lane: LaneId<'_>, seq: u64) -> Result<(), StoreError> {
        if is_training(lane.partition) {
            self.trainer_mut()?
                .put_lane(lane.agent, lane.partition, lane.epoch, seq);
            return Ok(());
        }
        let o = self.owned_mut(lane.partition)?;
        // Looked up by &str: this runs for every batch, and resends must not mark it dirty.
        match o.lanes.get_mut(lane.agent) {
            Some(epochs) => match epochs.get_mut(&lane.epoch) {
                Some(s) if *s >= seq => return Ok(()),
                Some(s) => *s = seq,
                None => {
                    epochs.insert(lane.epoch, seq);
                }
            },
            None => {
                o.lanes
                    .insert(lane.agent.to_string(), BTreeMap::from([(lane.epoch, seq)]));
            }
        }
        o.mark_dirty();
        Ok(())
    }

    fn drop_lane(&mut self, lane: LaneId<'_>) -> Result<(), StoreError> {
        if is_training(lane.partition) {
            if let Some(t) = &mut self.training {
                t.drop_lane(lane.agent, lane.partition, lane.epoch);
            }
            return Ok(());
        }
        let Some(o) = self.owned.get_mut(&lane.partition) else {
            return Ok(()); // nothing stored for a partition not owned
        };
        let Some(epochs) = o.lanes.get_mut(lane.agent) else {
            return Ok(());
        };
        if epochs.remove(&lane.epoch).is_some() {
            if epochs.is_empty() {
                o.lanes.remove(lane.agent);
            }
            o.mark_dirty();
        }
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
}
