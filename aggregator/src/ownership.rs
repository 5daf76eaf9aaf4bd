//! Which partitions this instance owns right now, readable from every task without a lock.
//!
//! Static deployments set it once from `owned:`; in cluster mode the apply loop sets and clears
//! partitions as leases are won, given back or lost, and the poll loop resubscribes to whatever
//! is owned at each reconnect. Also counts the records applied per partition (for throughput).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Per-partition ownership (the lease epoch, 0 when not owned) and applied-record counters.
#[derive(Debug)]
pub struct Ownership {
    epochs: Vec<AtomicU64>,
    applied: Vec<AtomicU64>,
    lag_ms: Vec<AtomicU64>,
}

impl Ownership {
    /// Nothing owned, out of `partitions`.
    pub fn new(partitions: u32) -> Self {
        Self {
            epochs: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            applied: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            lag_ms: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Owns every partition of `owned` under epoch 1 (static ownership).
    pub fn fixed(partitions: u32, owned: impl IntoIterator<Item = u32>) -> Self {
        let o = Self::new(partitions);
        for p in owned {
            o.set(p, 1);
        }
        o
    }

    /// Whether `partition` is owned.
    pub fn contains(&self, partition: u32) -> bool {
        self.epoch(partition).is_some()
    }

    /// The epoch `partition` is owned under.
    pub fn epoch(&self, partition: u32) -> Option<u64> {
        self.epochs
            .get(partition as usize)
            .map(|e| e.load(Relaxed))
            .filter(|&e| e > 0)
    }

    /// Marks `partition` owned under `epoch` (> 0).
    pub fn set(&self, partition: u32, epoch: u64) {
        if let Some(e) = self.epochs.get(partition as usize) {
            e.store(epoch.max(1), Relaxed);
        }
    }

    /// Marks `partition` not owned.
    pub fn clear(&self, partition: u32) {
        if let Some(e) = self.epochs.get(partition as usize) {
            e.store(0, Relaxed);
        }
    }

    /// The owned partitions, ascending.
    pub fn list(&self) -> Vec<u32> {
        (0..self.epochs.len() as u32)
            .filter(|&p| self.contains(p))
            .collect()
    }

    /// Counts `n` records applied to `partition`.
    pub fn count_applied(&self, partition: u32, n: u64) {
        if let Some(a) = self.applied.get(partition as usize) {
            a.fetch_add(n, Relaxed);
        }
    }

    /// Sets the checkpoint lag of `partition` (cluster mode; see `KvStore::lag`).
    pub fn set_lag(&self, partition: u32, lag_ms: u64) {
        if let Some(l) = self.lag_ms.get(partition as usize) {
            l.store(lag_ms, Relaxed);
        }
    }

    /// The checkpoint lag of `partition` as last set, in ms.
    pub fn lag_ms(&self, partition: u32) -> u64 {
        self.lag_ms
            .get(partition as usize)
            .map_or(0, |l| l.load(Relaxed))
    }

    /// Records applied to each partition since start.
    pub fn applied(&self) -> Vec<u64> {
        self.applied.iter().map(|a| a.load(Relaxed)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_and_list_track_ownership_and_ignore_out_of_range() {
        let o = Ownership::fixed(8, [1, 5, 99]);
        assert_eq!(o.list(), vec![1, 5]);
        o.set(3, 42);
        assert_eq!(o.epoch(3), Some(42));
        o.clear(5);
        assert_eq!(o.list(), vec![1, 3]);
        assert!(!o.contains(99));
        o.count_applied(3, 4);
        o.count_applied(99, 4);
        assert_eq!(o.applied()[3], 4);
    }
}
