//! The disk budget: coarsening runs of normal summaries, then evicting the oldest summaries,
//! until the outbox is back under its target.

use super::*;

/// What the budget needs to know about a stored record without reading it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub(super) bytes: u64,
    pub(super) kind: SlotKind,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum SlotKind {
    Anomaly,
    Training,
    Summary {
        series: u64,
        start_ms: i64,
        end_ms: i64,
        count: u64,
        mergeable: bool,
    },
}

pub(super) fn series_hash(device: &str, metric: &str) -> u64 {
    let mut h = Xxh3::new();
    h.update(&(device.len() as u64).to_le_bytes());
    h.update(device.as_bytes());
    h.update(metric.as_bytes());
    h.digest()
}

/// Combines a run of adjacent summaries of one series into one (see the module doc).
pub(super) fn merge_summaries(acc: &mut WindowSummary, next: &WindowSummary) {
    let stats = |s: &WindowSummary| RunningStats {
        count: s.count,
        min: s.min,
        max: s.max,
        mean: s.mean,
        m2: s.std * s.std * s.count as f64,
    };
    let mut merged = stats(acc);
    merged.merge(&stats(next));
    acc.end_ms = next.end_ms;
    acc.count = merged.count;
    acc.min = merged.min;
    acc.max = merged.max;
    acc.mean = merged.mean;
    acc.std = merged.std();
    acc.first_ts_ms = acc.first_ts_ms.min(next.first_ts_ms);
    acc.last_ts_ms = acc.last_ts_ms.max(next.last_ts_ms);
    acc.max_score = acc.max_score.max(next.max_score);
}

impl Outbox {
    /// What the records may take: the budget less the checkpoint.
    pub(super) fn records_budget(&self) -> u64 {
        self.cfg
            .max_outbox_bytes
            .saturating_sub(self.checkpoint_bytes)
    }

    pub(super) fn target(&self) -> u64 {
        let budget = self.records_budget();
        budget / 100 * RECLAIM_TARGET_PERCENT + budget % 100 * RECLAIM_TARGET_PERCENT / 100
    }

    /// What training samples may take (see [`TRAINING_SHARE_PERCENT`]).
    pub(super) fn training_budget(&self) -> u64 {
        self.records_budget() / 100 * TRAINING_SHARE_PERCENT
    }

    /// Deletes training samples, oldest first (by seq, then lane), until they take at most `keep`
    /// bytes.
    pub(super) fn evict_training(&mut self, keep: u64) -> Result<(), OutboxError> {
        let mut candidates: Vec<(u64, u32, u64)> = Vec::new();
        for (&lane, l) in &self.lanes {
            for (&seq, slot) in &l.slots {
                if matches!(slot.kind, SlotKind::Training) {
                    candidates.push((seq, lane, slot.bytes));
                }
            }
        }
        candidates.sort_unstable();
        let mut freed = 0;
        let mut chosen = Vec::new();
        for (seq, lane, bytes) in candidates {
            if self.training_bytes.saturating_sub(freed) <= keep {
                break;
            }
            freed += bytes;
            chosen.push((lane, seq));
        }
        self.delete_slots(&chosen, "evict training samples")?;
        for (lane, seq) in chosen {
            if self.unindex(lane, seq).is_some() {
                self.stats.training_evicted += 1;
            }
        }
        Ok(())
    }

    /// Deletes records (persisting the touched lanes' next seqs first, so none is reused).
    fn delete_slots(&mut self, chosen: &[(u32, u64)], op: &str) -> Result<(), OutboxError> {
        let mut touched: Vec<u32> = chosen.iter().map(|&(p, _)| p).collect();
        touched.sort_unstable();
        touched.dedup();
        for &p in &touched {
            self.put_meta(p)?;
        }
        let mut batch = sled::Batch::default();
        for &(p, s) in chosen {
            batch.remove(&key(p, s));
        }
        self.records.apply_batch(batch).map_err(self.storage(op))
    }

    pub(super) fn reclaim(&mut self) -> Result<(), OutboxError> {
        let target = self.target();
        if self.training > 0 {
            // Samples go first: a summary is data, a sample only a sample of it.
            let keep = self
                .training_bytes
                .saturating_sub(self.bytes.saturating_sub(target));
            self.evict_training(keep)?;
        }
        if self.summaries > 0 && self.bytes > target {
            self.coarsen(target)?;
        }
        if self.bytes > target && self.summaries > 0 {
            self.evict(target)?;
        }
        let over = self.bytes > self.records_budget();
        if over {
            self.stats.over_budget += 1;
            if !self.over_budget_now {
                tracing::warn!(path = %self.path.display(), bytes = self.bytes, max_outbox_bytes = self.cfg.max_outbox_bytes,
                    "outbox over budget with anomaly events alone; keeping them all");
            }
        }
        self.over_budget_now = over;
        Ok(())
    }

    /// Runs of mergeable summaries (see the module doc), oldest first: (first seq, partition, seqs).
    pub(super) fn runs(&self) -> Vec<(u64, u32, Vec<u64>)> {
        let mut runs = Vec::new();
        for (&partition, lane) in &self.lanes {
            let mut open: HashMap<u64, (i64, Vec<u64>)> = HashMap::new();
            let never_sent = lane.exposed.saturating_add(1);
            for (&seq, slot) in lane.slots.range(never_sent..) {
                let SlotKind::Summary {
                    series,
                    start_ms,
                    end_ms,
                    mergeable,
                    ..
                } = slot.kind
                else {
                    continue;
                };
                let extends = mergeable
                    && open
                        .get(&series)
                        .is_some_and(|(open_end, _)| *open_end == start_ms);
                if extends {
                    if let Some(run) = open.get_mut(&series) {
                        run.0 = end_ms;
                        run.1.push(seq);
                    }
                    continue;
                }
                let done = if mergeable {
                    open.insert(series, (end_ms, vec![seq]))
                } else {
                    open.remove(&series)
                };
                if let Some((_, seqs)) = done.filter(|(_, s)| s.len() > 1) {
                    runs.push((seqs[0], partition, seqs));
                }
            }
            runs.extend(
                open.into_values()
                    .filter(|(_, s)| s.len() > 1)
                    .map(|(_, s)| (s[0], partition, s)),
            );
        }
        runs.sort_unstable_by_key(|(first, partition, _)| (*first, *partition));
        runs
    }

    pub(super) fn coarsen(&mut self, target: u64) -> Result<(), OutboxError> {
        for (_, partition, seqs) in self.runs() {
            if self.bytes <= target {
                break;
            }
            self.merge_run(partition, &seqs)?;
        }
        Ok(())
    }

    /// Reads the run back and merges each stretch that really is adjacent (the index matched series by
    /// hash; a collision just splits the run).
    pub(super) fn merge_run(&mut self, partition: u32, seqs: &[u64]) -> Result<(), OutboxError> {
        let mut groups: Vec<(u64, WindowSummary, Vec<u64>)> = Vec::new();
        for &seq in seqs {
            let k = key(partition, seq);
            let v = self
                .records
                .get(k)
                .map_err(self.storage(format!("read partition {partition} for coarsening")))?;
            let Some(v) = v else { continue };
            let Record::Summary(s) = self.decode(&k, partition, seq, &v)? else {
                continue;
            };
            match groups.last_mut() {
                Some((_, acc, merged))
                    if acc.device == s.device
                        && acc.metric == s.metric
                        && acc.end_ms == s.start_ms =>
                {
                    merge_summaries(acc, &s);
                    merged.push(seq);
                }
                _ => groups.push((seq, s, Vec::new())),
            }
        }
        groups.retain(|(_, _, merged)| !merged.is_empty());
        if groups.is_empty() {
            return Ok(());
        }
        // The deleted seqs may include the lane's highest: persist next seq so it is never reused.
        self.put_meta(partition)?;
        let mut batch = sled::Batch::default();
        let mut values = Vec::with_capacity(groups.len());
        for (first, summary, merged) in &groups {
            let record = Record::Summary(summary.clone());
            let value = serde_json::to_vec(&record)
                .map_err(|source| OutboxError::Encode { partition, source })?;
            batch.insert(&key(partition, *first), value.as_slice());
            for &s in merged {
                batch.remove(&key(partition, s));
            }
            values.push((record, value.len()));
        }
        self.records
            .apply_batch(batch)
            .map_err(self.storage(format!("coarsen partition {partition}")))?;
        for ((first, _, merged), (record, len)) in groups.iter().zip(values) {
            self.unindex(partition, *first);
            for &s in merged {
                self.unindex(partition, s);
            }
            self.index(partition, *first, &record, (12 + len) as u64);
            self.stats.coarsened += merged.len() as u64;
        }
        Ok(())
    }

    pub(super) fn evict(&mut self, target: u64) -> Result<(), OutboxError> {
        let mut candidates: Vec<(u64, u32, u64)> = Vec::new();
        for (&partition, lane) in &self.lanes {
            for (&seq, slot) in &lane.slots {
                if matches!(slot.kind, SlotKind::Summary { .. }) {
                    candidates.push((seq, partition, slot.bytes));
                }
            }
        }
        candidates.sort_unstable();
        let mut freed = 0;
        let mut chosen = Vec::new();
        for (seq, partition, bytes) in candidates {
            if self.bytes.saturating_sub(freed) <= target {
                break;
            }
            freed += bytes;
            chosen.push((partition, seq));
        }
        self.delete_slots(&chosen, "evict summaries")?;
        for (p, s) in chosen {
            if let Some(Slot {
                kind: SlotKind::Summary { count, .. },
                ..
            }) = self.unindex(p, s)
            {
                self.stats.evicted += 1;
                self.stats.evicted_readings += count;
            }
        }
        let now = std::time::Instant::now();
        if self
            .last_evict_log
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(10))
        {
            self.last_evict_log = Some(now);
            tracing::warn!(path = %self.path.display(), evicted_total = self.stats.evicted, evicted_readings_total = self.stats.evicted_readings,
                "outbox full: evicting the oldest summaries (logged at most every 10 s)");
        }
        Ok(())
    }
}
