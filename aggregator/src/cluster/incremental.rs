//! Incremental checkpoints, free of I/O: which windows and lanes of a partition changed since its
//! last successful checkpoint ([`Changes`]), and whether the next checkpoint appends a delta or
//! compacts into a new base ([`Compaction`]). [`super::store`] drives both; nothing here waits.
//!
//! Bounds: the changes held never outgrow what a base would carry (past that they collapse into
//! "everything changed", and the next checkpoint is a base), and the deltas after a base never
//! outgrow the base itself nor number more than [`MAX_DELTAS`], so a take-over reads at most about
//! twice a partition's state.

use super::checkpoint::{Kind, MAX_DELTAS};
use std::collections::BTreeSet;

/// A window of a partition: (device, metric, start).
pub type WindowKey = (String, String, i64);
/// A lane of a partition: (agent, lane epoch).
pub type LaneKey = (String, u64);

/// Deltas may add up to this many bytes after a base however small it is, so a partition that
/// starts empty does not rewrite its base at every checkpoint.
pub const MIN_BASE_BYTES: usize = 4096;

/// Changes of a partition not yet checkpointed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    windows: BTreeSet<WindowKey>,
    lanes: BTreeSet<LaneKey>,
    /// More changed than is worth listing: the next checkpoint writes everything.
    all: bool,
}

impl Changes {
    /// Records that window (`device`, `metric`, `start`) was added or revised; past `limit`
    /// changes held, everything is marked changed instead (and the list dropped).
    pub fn window(&mut self, device: &str, metric: &str, start: i64, limit: usize) {
        if self.all {
            return;
        }
        self.windows
            .insert((device.to_string(), metric.to_string(), start));
        self.check(limit);
    }

    /// Records that lane (`agent`, `epoch`) moved or was dropped (see [`Changes::window`]).
    pub fn lane(&mut self, agent: &str, epoch: u64, limit: usize) {
        if self.all {
            return;
        }
        if !self.lanes.contains(&(agent.to_string(), epoch)) {
            self.lanes.insert((agent.to_string(), epoch));
        }
        self.check(limit);
    }

    fn check(&mut self, limit: usize) {
        if self.windows.len() + self.lanes.len() > limit {
            self.saturate();
        }
    }

    /// Marks everything changed: the next checkpoint is a base.
    pub fn saturate(&mut self) {
        self.all = true;
        self.windows = BTreeSet::new();
        self.lanes = BTreeSet::new();
    }

    /// Whether everything is to be written (a base).
    pub fn all(&self) -> bool {
        self.all
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.all && self.windows.is_empty() && self.lanes.is_empty()
    }

    /// The windows changed, in (device, metric, start) order.
    pub fn windows(&self) -> impl Iterator<Item = &WindowKey> {
        self.windows.iter()
    }

    /// The lanes changed.
    pub fn lanes(&self) -> impl Iterator<Item = &LaneKey> {
        self.lanes.iter()
    }

    /// Forgets every change (they are checkpointed).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Where a partition's chain stands: the size of its base and of the deltas after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compaction {
    base_bytes: usize,
    delta_bytes: usize,
    deltas: usize,
}

impl Compaction {
    /// A chain whose base holds `base_bytes`, followed by `deltas` deltas of `delta_bytes` in all
    /// (what a take-over read).
    pub fn new(base_bytes: usize, deltas: usize, delta_bytes: usize) -> Self {
        Self {
            base_bytes,
            delta_bytes,
            deltas,
        }
    }

    /// What the next checkpoint writes, given a delta of `delta_bytes`: a base when the deltas
    /// after the base would outgrow it (or [`MIN_BASE_BYTES`]) or reach [`MAX_DELTAS`], else the
    /// delta.
    pub fn next(&self, delta_bytes: usize) -> Kind {
        let budget = self.base_bytes.max(MIN_BASE_BYTES);
        if self.deltas + 1 > MAX_DELTAS || self.delta_bytes + delta_bytes > budget {
            Kind::Base
        } else {
            Kind::Delta
        }
    }

    /// How many changes are worth listing before writing everything is cheaper: about one per
    /// 64 bytes of base (a changed window encodes to about 80).
    pub fn max_changes(&self) -> usize {
        (self.base_bytes.max(MIN_BASE_BYTES) / 64).max(64)
    }

    /// A write of `kind` and `bytes` succeeded.
    pub fn written(&mut self, kind: Kind, bytes: usize) {
        match kind {
            Kind::Base => *self = Self::new(bytes, 0, 0),
            Kind::Delta => {
                self.deltas += 1;
                self.delta_bytes += bytes;
            }
        }
    }

    /// A write of `kind` and `bytes` failed, but may have landed (a timeout): counted as a delta
    /// either way, so the chain is never believed shorter than it is.
    pub fn failed(&mut self, _kind: Kind, bytes: usize) {
        self.deltas += 1;
        self.delta_bytes += bytes;
    }

    /// Deltas after the base.
    pub fn deltas(&self) -> usize {
        self.deltas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_listed_once_and_cleared() {
        let mut c = Changes::default();
        assert!(c.is_empty());
        c.window("d1", "temp", 0, 100);
        c.window("d1", "temp", 0, 100);
        c.window("d1", "temp", 1000, 100);
        c.lane("gw", 0, 100);
        c.lane("gw", 0, 100);
        assert_eq!(c.windows().count(), 2);
        assert_eq!(c.lanes().count(), 1);
        assert!(!c.is_empty() && !c.all());
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn a_million_changes_collapse_into_everything_changed() {
        let mut c = Changes::default();
        for i in 0..1_000_000 {
            c.window(&format!("dev-{i}"), "temp", 0, 1000);
        }
        assert!(c.all(), "past the limit everything is written");
        assert_eq!(c.windows().count(), 0, "and the list is not kept");
        assert!(!c.is_empty());
        c.lane("gw", 1, 1000);
        assert_eq!(c.lanes().count(), 0);
        c.clear();
        assert!(c.is_empty() && !c.all());
    }

    #[test]
    fn deltas_follow_a_base_until_they_outgrow_it() {
        let mut k = Compaction::new(100_000, 0, 0);
        assert_eq!(k.next(10_000), Kind::Delta);
        for _ in 0..9 {
            k.written(Kind::Delta, 10_000);
        }
        assert_eq!(
            k.next(10_000),
            Kind::Delta,
            "90 KB of deltas + 10 = the base"
        );
        k.written(Kind::Delta, 10_000);
        assert_eq!(k.next(1), Kind::Base, "one byte more than the base");
        k.written(Kind::Base, 120_000);
        assert_eq!(k.deltas(), 0);
        assert_eq!(k.next(100_000), Kind::Delta);
        assert_eq!(k.next(120_001), Kind::Base, "a delta larger than the base");
    }

    #[test]
    fn at_most_max_deltas_follow_a_base() {
        let mut k = Compaction::new(10_000_000, 0, 0);
        for _ in 0..MAX_DELTAS {
            assert_eq!(k.next(10), Kind::Delta);
            k.written(Kind::Delta, 10);
        }
        assert_eq!(k.next(10), Kind::Base);
        // A take-over that found MAX_DELTAS - 1 deltas and appended its marker.
        assert_eq!(Compaction::new(1 << 20, MAX_DELTAS, 0).next(1), Kind::Base);
    }

    #[test]
    fn a_small_or_empty_base_still_takes_some_deltas() {
        let k = Compaction::new(2, 1, 9);
        assert_eq!(k.next(1000), Kind::Delta);
        assert_eq!(k.next(MIN_BASE_BYTES), Kind::Base);
        assert_eq!(k.max_changes(), MIN_BASE_BYTES / 64);
        assert_eq!(Compaction::new(6_400_000, 0, 0).max_changes(), 100_000);
    }

    #[test]
    fn a_failed_write_counts_as_a_delta_whatever_it_was() {
        let mut k = Compaction::new(100_000, 0, 0);
        k.failed(Kind::Base, 100_000);
        assert_eq!(k.deltas(), 1);
        assert_eq!(
            k.next(1),
            Kind::Base,
            "it may have landed: the chain is longer"
        );
    }
}
