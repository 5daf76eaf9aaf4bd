//! Per-partition lanes: seqs, the lane epoch, acks, the exposed seq, and the append/read/ack
//! operations on them.

use super::*;

/// In-memory index of one lane.
#[derive(Debug, Clone)]
pub(super) struct Lane {
    pub(super) acked: u64,
    pub(super) next: u64,
    /// Highest seq ever handed to the network (persisted): records up to it may have reached an
    /// owner, so they are never merged into coarser summaries (an owner would count them twice).
    pub(super) exposed: u64,
    pub(super) slots: BTreeMap<u64, Slot>,
}

impl Default for Lane {
    fn default() -> Self {
        Self {
            acked: 0,
            next: 1,
            exposed: 0,
            slots: BTreeMap::new(),
        }
    }
}

/// The epoch stored in `db`; if there is none, [`LEGACY_EPOCH`] for a database from before epochs
/// (it holds lanes or records) and a new random one otherwise. Either is stored and flushed at once.
pub(super) fn stored_epoch(
    db: &sled::Db,
    records: &sled::Tree,
    meta: &sled::Tree,
    path: &Path,
) -> Result<u64, OutboxError> {
    let storage = |op: &str| {
        let op = op.to_string();
        move |source| OutboxError::Storage {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let tree = db
        .open_tree(EPOCH_TREE)
        .map_err(storage("open epoch tree"))?;
    if let Some(v) = tree.get(EPOCH_KEY).map_err(storage("read epoch"))? {
        return <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| OutboxError::Malformed {
                path: path.to_path_buf(),
                tree: EPOCH_TREE,
                key: hex(EPOCH_KEY),
                problem: format!("value must be 8 bytes, got {}", v.len()),
            });
    }
    let existing = !records.is_empty() || !meta.is_empty();
    let epoch = if existing { LEGACY_EPOCH } else { new_epoch() };
    tree.insert(EPOCH_KEY, &epoch.to_be_bytes())
        .map_err(storage("write epoch"))?;
    db.flush().map_err(storage("flush epoch"))?;
    Ok(epoch)
}

/// A random non-zero epoch. Not from the configured seed (the style's rule for randomness) on
/// purpose: two starts must never share an epoch. `RandomState` keys come from the OS once per
/// process; the clock and the pid separate starts even if they did not.
pub(super) fn new_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// A tree of its own (not `meta`, whose keys are partitions): older versions still open the database.
pub(super) const EPOCH_TREE: &str = "epoch";

pub(super) const EPOCH_KEY: &[u8] = b"lane_epoch";

impl Outbox {
    pub(super) fn index(&mut self, partition: u32, seq: u64, record: &Record, bytes: u64) {
        let kind = match record {
            Record::Anomaly(_) => {
                self.stats.anomalies_kept += 1;
                SlotKind::Anomaly
            }
            Record::Training(_) => {
                self.training += 1;
                self.training_bytes += bytes;
                SlotKind::Training
            }
            Record::Summary(s) => {
                self.summaries += 1;
                SlotKind::Summary {
                    series: series_hash(&s.device, &s.metric),
                    start_ms: s.start_ms,
                    end_ms: s.end_ms,
                    count: s.count,
                    mergeable: s.max_score < self.cfg.normal_score_below && s.revision == 0,
                }
            }
        };
        self.bytes += bytes;
        let lane = self.lanes.entry(partition).or_default();
        lane.slots.insert(seq, Slot { bytes, kind });
    }

    /// Removes `seq` from the index (the caller deletes it from sled) and returns its slot.
    pub(super) fn unindex(&mut self, partition: u32, seq: u64) -> Option<Slot> {
        let slot = self.lanes.get_mut(&partition)?.slots.remove(&seq)?;
        self.bytes = self.bytes.saturating_sub(slot.bytes);
        match slot.kind {
            SlotKind::Anomaly => self.stats.anomalies_kept -= 1,
            SlotKind::Summary { .. } => self.summaries -= 1,
            SlotKind::Training => {
                self.training -= 1;
                self.training_bytes = self.training_bytes.saturating_sub(slot.bytes);
            }
        }
        Some(slot)
    }

    pub(super) fn put_meta(&self, partition: u32) -> Result<(), OutboxError> {
        match self.lanes.get(&partition) {
            Some(lane) => self.put_meta_values(partition, lane.acked, lane.next),
            None => Ok(()),
        }
    }

    pub(super) fn put_meta_values(
        &self,
        partition: u32,
        acked: u64,
        next: u64,
    ) -> Result<(), OutboxError> {
        let exposed = self.lanes.get(&partition).map_or(0, |l| l.exposed);
        let mut v = [0u8; 24];
        v[..8].copy_from_slice(&acked.to_be_bytes());
        v[8..16].copy_from_slice(&next.to_be_bytes());
        v[16..].copy_from_slice(&exposed.to_be_bytes());
        self.meta
            .insert(partition.to_be_bytes(), &v)
            .map_err(self.storage(format!("write meta of partition {partition}")))?;
        Ok(())
    }

    /// Appends `record` to lane `partition` and returns its seq (the lane's next, starting at 1).
    /// Written to sled but **not durable** until [`Outbox::flush`]. May coarsen or evict summaries
    /// (including this one) to respect the budget; publish what [`Outbox::pending`] returns.
    pub fn append(&mut self, partition: u32, record: Record) -> Result<u64, OutboxError> {
        check_finite(partition, &record)?;
        let value = serde_json::to_vec(&record)
            .map_err(|source| OutboxError::Encode { partition, source })?;
        let seq = self.lanes.get(&partition).map_or(1, |l| l.next);
        let k = key(partition, seq);
        self.records
            .insert(k, value.as_slice())
            .map_err(self.storage(format!("append to partition {partition}")))?;
        self.lanes.entry(partition).or_default().next = seq + 1;
        self.index(partition, seq, &record, (k.len() + value.len()) as u64);
        self.stats.appended += 1;
        if self.training_bytes > self.training_budget() {
            if let Err(e) = self.evict_training(self.training_budget()) {
                self.stats.reclaim_errors += 1;
                tracing::error!(error = %e, "outbox could not delete old training samples; retried on the next append");
            }
        }
        if self.bytes > self.records_budget() {
            // The record is stored: failing the append now would make the caller store it twice.
            // The budget is retried on the next append.
            if let Err(e) = self.reclaim() {
                self.stats.reclaim_errors += 1;
                tracing::error!(error = %e, "outbox could not reclaim space; the budget is exceeded until a later append succeeds");
            }
        }
        Ok(seq)
    }

    /// Cumulative ack of lane `partition` up to and including `upto_seq`: removes those records and
    /// returns how many. A stale ack (≤ the acked seq) is ignored and returns 0. An ack above
    /// [`Outbox::exposed_seq`] is refused with [`OutboxError::AckAhead`] and deletes nothing. Does not
    /// flush.
    pub fn ack(&mut self, partition: u32, upto_seq: u64) -> Result<usize, OutboxError> {
        if upto_seq <= self.acked_seq(partition) {
            return Ok(0);
        }
        let exposed = self.exposed_seq(partition);
        if upto_seq > exposed {
            return Err(OutboxError::AckAhead {
                partition,
                upto_seq,
                exposed,
            });
        }
        // exposed < next, so the next seq stays above the acked one.
        let next = self.next_seq(partition);
        let seqs: Vec<u64> = self.lanes.get(&partition).map_or_else(Vec::new, |l| {
            l.slots.range(..=upto_seq).map(|(&s, _)| s).collect()
        });
        // Meta first: if the deletes are lost in a crash, `open` finishes them. Memory changes only
        // once both writes succeeded, so a failed ack can simply be retried.
        self.put_meta_values(partition, upto_seq, next)?;
        let mut batch = sled::Batch::default();
        for &s in &seqs {
            batch.remove(&key(partition, s));
        }
        self.records
            .apply_batch(batch)
            .map_err(self.storage(format!("ack partition {partition} up to {upto_seq}")))?;
        let lane = self.lanes.entry(partition).or_default();
        lane.acked = upto_seq;
        lane.next = next;
        for &s in &seqs {
            self.unindex(partition, s);
        }
        self.stats.acked += seqs.len() as u64;
        Ok(seqs.len())
    }

    /// Up to `max` unacked records of lane `partition` with seq > `after_seq`, in seq order.
    pub fn pending(
        &self,
        partition: u32,
        after_seq: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, OutboxError> {
        let Some(from) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self
            .records
            .range(key(partition, from)..=key(partition, u64::MAX))
            .take(max)
        {
            let (k, v) = item.map_err(self.storage(format!("read partition {partition}")))?;
            let seq = split_key(&k).map_or(0, |(_, s)| s);
            out.push((seq, self.decode(&k, partition, seq, &v)?));
        }
        Ok(out)
    }

    /// Every lane the outbox knows (with records, or with an acked or next seq), ascending.
    pub fn lanes(&self) -> Vec<u32> {
        self.lanes.keys().copied().collect()
    }

    /// Highest acked seq of lane `partition`; 0 when nothing was acked.
    pub fn acked_seq(&self, partition: u32) -> u64 {
        self.lanes.get(&partition).map_or(0, |l| l.acked)
    }

    /// The seq the next append to lane `partition` gets.
    pub fn next_seq(&self, partition: u32) -> u64 {
        self.lanes.get(&partition).map_or(1, |l| l.next)
    }

    /// The seq before `seq` that lane `partition` still holds, or its acked seq when there is none:
    /// what a receiver must have before `seq` makes the lane contiguous (the wire's `prev`).
    pub fn prev_of(&self, partition: u32, seq: u64) -> u64 {
        let Some(lane) = self.lanes.get(&partition) else {
            return 0;
        };
        lane.slots
            .range(..seq)
            .next_back()
            .map_or(lane.acked, |(&s, _)| s.max(lane.acked))
    }

    /// Marks every record of lane `partition` up to `upto_seq` as handed to the network: from now on
    /// they are never coarsened. Written to sled, durable with the next [`Outbox::flush`] — which
    /// must come before the publish.
    pub fn expose(&mut self, partition: u32, upto_seq: u64) -> Result<(), OutboxError> {
        let lane = self.lanes.entry(partition).or_default();
        // Only appended seqs can be sent: an ack can then never pass the next seq.
        let upto_seq = upto_seq.min(lane.next - 1);
        if upto_seq <= lane.exposed {
            return Ok(());
        }
        lane.exposed = upto_seq;
        self.put_meta(partition)
    }

    /// Highest seq of lane `partition` handed to the network so far (see [`Outbox::expose`]): no
    /// ack may go beyond it.
    pub fn exposed_seq(&self, partition: u32) -> u64 {
        self.lanes.get(&partition).map_or(0, |l| l.exposed)
    }

    /// Number of records stored (not yet acknowledged) in lane `partition`.
    pub fn len(&self, partition: u32) -> usize {
        self.lanes.get(&partition).map_or(0, |l| l.slots.len())
    }

    /// Number of records stored (not yet acknowledged) in every lane.
    pub fn records(&self) -> usize {
        self.lanes.values().map(|l| l.slots.len()).sum()
    }

    /// Whether no lane holds a record.
    pub fn is_empty(&self) -> bool {
        self.lanes.values().all(|l| l.slots.is_empty())
    }
}
