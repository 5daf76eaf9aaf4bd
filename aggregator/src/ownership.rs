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

/// How a set of aggregators covers the partitions: the ones nobody owns and the ones two or more
/// claim. Pure: `config check` computes it from files, a running instance from published owners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Partitions no aggregator owns, ascending.
    pub uncovered: Vec<u32>,
    /// Partitions claimed by more than one aggregator, ascending, with the claimants.
    pub overlapping: Vec<(u32, Vec<String>)>,
}

impl Coverage {
    /// The coverage of `0..partitions` by `owners` (aggregator id, owned partitions); partitions
    /// out of range are ignored (configuration checks refuse them separately).
    pub fn of<'a>(
        partitions: u32,
        owners: impl IntoIterator<Item = (&'a str, &'a std::collections::BTreeSet<u32>)>,
    ) -> Self {
        let mut claims: Vec<Vec<String>> = vec![Vec::new(); partitions as usize];
        for (id, owned) in owners {
            for &p in owned {
                if let Some(c) = claims.get_mut(p as usize) {
                    c.push(id.to_string());
                }
            }
        }
        let mut out = Self::default();
        for (p, c) in claims.into_iter().enumerate() {
            match c.len() {
                0 => out.uncovered.push(p as u32),
                1 => {}
                _ => out.overlapping.push((p as u32, c)),
            }
        }
        out
    }

    /// Whether every partition has exactly one owner.
    pub fn is_complete(&self) -> bool {
        self.uncovered.is_empty() && self.overlapping.is_empty()
    }
}

/// `0-3, 7, 9-10`: ascending partitions as compact ranges, for messages.
pub fn ranges(partitions: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < partitions.len() {
        let start = partitions[i];
        let mut end = start;
        while i + 1 < partitions.len() && partitions[i + 1] == end + 1 {
            i += 1;
            end = partitions[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_names_the_gaps_and_the_overlaps() {
        use std::collections::BTreeSet;
        let a: BTreeSet<u32> = (0..4).collect();
        let b: BTreeSet<u32> = (3..6).collect();
        let c = Coverage::of(8, [("a", &a), ("b", &b)]);
        assert_eq!(c.uncovered, vec![6, 7]);
        assert_eq!(
            c.overlapping,
            vec![(3, vec!["a".to_string(), "b".to_string()])]
        );
        assert!(!c.is_complete());
        let b: BTreeSet<u32> = (4..8).chain([99]).collect();
        assert!(Coverage::of(8, [("a", &a), ("b", &b)]).is_complete());
        assert_eq!(Coverage::of(3, []).uncovered, vec![0, 1, 2]);
    }

    #[test]
    fn ranges_are_compact() {
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(ranges(&[5]), "5");
        assert_eq!(ranges(&[]), "");
    }

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
