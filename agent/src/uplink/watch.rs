//! What the uplink knows about the health of each outbox lane, without I/O: the age of its oldest
//! unacknowledged record, the publish → ack latency of its records, and the no-ack warning's
//! decisions (once per lane and episode, then once when acks resume). The uplink passes the time
//! and the outbox's answers in; tests drive it directly.
//!
//! **Ages without a timestamp per record.** A lane remembers the append time of one record per
//! [`MARK_EVERY`] (at most [`MAX_MARKS`] of them): the oldest unacknowledged record is at most one
//! mark period younger than the newest mark at or before it, so the age reported is at most
//! [`MARK_EVERY`] too old (until marks are thinned, below), never too young. Records found in the
//! outbox at start count from the start (their append time is not stored): after a restart the age
//! is a lower bound for those.
//! At [`MAX_MARKS`] every other mark but the first is dropped (the period between marks doubles),
//! which can only make the age older, never younger.
//!
//! **Latency.** The first publish time of each record in flight (at most [`MAX_IN_FLIGHT`] per
//! lane; beyond that records are not timed) is kept until an ack covers it; every covered record
//! is one observation. A record resent after a timeout counts from its first publish: what the
//! owner's state waited for.

use edgewatch_models::wire::{split_lane, LaneKind};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// One append time is remembered per this period per lane.
pub(crate) const MARK_EVERY: Duration = Duration::from_secs(1);
/// Most append-time marks per lane (about 12 KB; 128 lanes: 1.5 MB at most).
pub(crate) const MAX_MARKS: usize = 512;
/// Most records per lane whose publish time is kept for the latency histogram (about 40 KB;
/// 128 lanes: 5 MB at most, reached only while an owner acknowledges nothing).
pub(crate) const MAX_IN_FLIGHT: usize = 1_000;

#[derive(Debug)]
struct Watched {
    /// (first seq appended in the period, append time), oldest first.
    marks: VecDeque<(u64, Instant)>,
    /// seq → first publish time, for records not yet acked.
    sent: BTreeMap<u64, Instant>,
    acked: u64,
    /// Last time the ack moved, or the lane started waiting for one.
    progress: Instant,
    /// Whether the lane held unacknowledged records at the last look.
    outstanding: bool,
    /// A warning was logged for the current episode.
    warned: bool,
    /// Acks resumed after a warning; reported by the next [`LaneWatch::tick`].
    resumed: bool,
}

impl Watched {
    fn new(acked: u64, now: Instant) -> Self {
        Self {
            marks: VecDeque::new(),
            sent: BTreeMap::new(),
            acked,
            progress: now,
            outstanding: false,
            warned: false,
            resumed: false,
        }
    }
}

/// A lane's figures for `/metrics`, `/readyz` and the status line.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneReport {
    /// The partition.
    pub partition: u32,
    /// `main` (summaries and events) or `training`.
    pub kind: &'static str,
    /// Records stored and not acknowledged.
    pub unacked: u64,
    /// Age of the oldest of them (see the module doc); zero when there are none.
    pub oldest_unacked: Duration,
    /// How long the lane has waited for its ack to move while holding records; zero when it
    /// holds none.
    pub no_ack_for: Duration,
}

/// A lane to warn about (its ack has not moved for `no_ack_for`), or that resumed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LaneAlert {
    pub partition: u32,
    pub kind: &'static str,
    pub unacked: u64,
    pub no_ack_for: Duration,
}

/// What [`LaneWatch::tick`] decided.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Alerts {
    /// Lanes that just crossed the threshold (each once per episode).
    pub stalled: Vec<LaneAlert>,
    /// Lanes warned about whose acks moved again.
    pub resumed: Vec<LaneAlert>,
}

/// Per-lane ages, latencies and warning state (module doc).
#[derive(Debug)]
pub(crate) struct LaneWatch {
    lanes: BTreeMap<u32, Watched>,
    warn_after: Duration,
}

fn kind_label(lane: u32) -> (u32, &'static str) {
    match split_lane(lane) {
        (p, LaneKind::Main) => (p, "main"),
        (p, LaneKind::Training) => (p, "training"),
    }
}

impl LaneWatch {
    /// A watch that warns about lanes whose ack has not moved for `warn_after`.
    pub(crate) fn new(warn_after: Duration) -> Self {
        Self {
            lanes: BTreeMap::new(),
            warn_after,
        }
    }

    fn lane(&mut self, lane: u32, now: Instant) -> &mut Watched {
        self.lanes
            .entry(lane)
            .or_insert_with(|| Watched::new(0, now))
    }

    /// At start: `lane` already holds records after `acked` (from before a restart); they count
    /// from `now`.
    pub(crate) fn restored(&mut self, lane: u32, acked: u64, now: Instant) {
        let w = self
            .lanes
            .entry(lane)
            .or_insert_with(|| Watched::new(acked, now));
        w.acked = acked;
        w.marks.push_back((acked + 1, now));
        w.outstanding = true;
        w.progress = now;
    }

    /// Record `seq` was appended to `lane` at `now`.
    pub(crate) fn appended(&mut self, lane: u32, seq: u64, now: Instant) {
        let w = self.lane(lane, now);
        if !w.outstanding {
            // The wait for an ack starts with the first record held.
            w.outstanding = true;
            w.progress = now;
        }
        let due = w
            .marks
            .back()
            .is_none_or(|&(_, t)| now.saturating_duration_since(t) >= MARK_EVERY);
        if due {
            if w.marks.len() >= MAX_MARKS {
                // Thin out: keep the first (the oldest held record's) and every other one after it.
                let mut i = 0;
                w.marks.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
            }
            w.marks.push_back((seq, now));
        }
    }

    /// Records `seqs` of `lane` were handed to the network at `now`.
    pub(crate) fn published(
        &mut self,
        lane: u32,
        seqs: impl IntoIterator<Item = u64>,
        now: Instant,
    ) {
        let w = self.lane(lane, now);
        for seq in seqs {
            if seq <= w.acked {
                continue;
            }
            if w.sent.len() >= MAX_IN_FLIGHT && !w.sent.contains_key(&seq) {
                break;
            }
            w.sent.entry(seq).or_insert(now);
        }
    }

    /// The owner acknowledged `lane` up to `upto` at `now` (the ack moved it); `observe` gets the
    /// publish → ack latency of every timed record it covers.
    pub(crate) fn acked(
        &mut self,
        lane: u32,
        upto: u64,
        now: Instant,
        mut observe: impl FnMut(Duration),
    ) {
        let w = self.lane(lane, now);
        if upto <= w.acked {
            return;
        }
        w.acked = upto;
        let rest = w.sent.split_off(&(upto + 1));
        for (_, t) in std::mem::replace(&mut w.sent, rest) {
            observe(now.saturating_duration_since(t));
        }
        // Keep the newest mark at or before the oldest record still held (acked + 1).
        while w.marks.len() > 1 && w.marks[1].0 <= upto + 1 {
            w.marks.pop_front();
        }
        w.progress = now;
        if w.warned {
            w.warned = false;
            w.resumed = true;
        }
    }

    /// Figures of every lane; `unacked(lane)` is how many records the outbox holds for it.
    pub(crate) fn report(&mut self, now: Instant, unacked: impl Fn(u32) -> u64) -> Vec<LaneReport> {
        let mut out = Vec::with_capacity(self.lanes.len());
        for (&lane, w) in &mut self.lanes {
            let n = unacked(lane);
            if n == 0 {
                // Nothing held (acked, or deleted by the budget): no age, no wait.
                w.outstanding = false;
                w.marks.clear();
                w.sent.clear();
            }
            let (partition, kind) = kind_label(lane);
            let oldest = match (n, w.marks.front()) {
                (0, _) | (_, None) => Duration::ZERO,
                (_, Some(&(_, t))) => now.saturating_duration_since(t),
            };
            let no_ack_for = if n > 0 {
                now.saturating_duration_since(w.progress)
            } else {
                Duration::ZERO
            };
            out.push(LaneReport {
                partition,
                kind,
                unacked: n,
                oldest_unacked: oldest,
                no_ack_for,
            });
        }
        out
    }

    /// The warnings due now: lanes holding records whose ack has not moved for the threshold
    /// (once per episode), and lanes warned about whose acks moved again (or that no longer hold
    /// anything).
    pub(crate) fn tick(&mut self, now: Instant, unacked: impl Fn(u32) -> u64) -> Alerts {
        let mut alerts = Alerts::default();
        for (&lane, w) in &mut self.lanes {
            let n = unacked(lane);
            if n == 0 {
                w.outstanding = false;
            }
            let (partition, kind) = kind_label(lane);
            let waited = now.saturating_duration_since(w.progress);
            let alert = LaneAlert {
                partition,
                kind,
                unacked: n,
                no_ack_for: waited,
            };
            if w.resumed || (w.warned && n == 0) {
                w.resumed = false;
                w.warned = false;
                alerts.resumed.push(alert);
            } else if n > 0 && !w.warned && waited >= self.warn_after {
                w.warned = true;
                alerts.stalled.push(alert);
            }
        }
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_oldest_unacked_age_follows_appends_and_acks_never_too_young() {
        let t0 = Instant::now();
        let mut w = LaneWatch::new(30 * S);
        for i in 0..10u64 {
            // Seqs 1..=10, one per 500 ms: marks at seqs 1, 3, 5, 7, 9.
            w.appended(4, i + 1, t0 + Duration::from_millis(500 * i));
        }
        let now = t0 + 10 * S;
        let r = w.report(now, |_| 10);
        assert_eq!(r[0].oldest_unacked, 10 * S);
        assert_eq!((r[0].partition, r[0].kind, r[0].unacked), (4, "main", 10));
        // Acked up to 4: the oldest held is seq 5, appended at 2 s.
        w.acked(4, 4, now, |_| {});
        let r = w.report(now, |_| 6);
        assert_eq!(r[0].oldest_unacked, 8 * S);
        // Up to 5: seq 6 was appended at 2.5 s; the mark before it says 2 s (at most 1 s too old).
        w.acked(4, 5, now, |_| {});
        let age = w.report(now, |_| 5)[0].oldest_unacked;
        assert!(
            age >= Duration::from_millis(7_500) && age <= Duration::from_millis(8_500),
            "{age:?}"
        );
        // Everything acked: no age.
        w.acked(4, 10, now, |_| {});
        assert_eq!(w.report(now, |_| 0)[0].oldest_unacked, Duration::ZERO);
    }

    #[test]
    fn latency_counts_every_covered_record_from_its_first_publish() {
        let t0 = Instant::now();
        let mut w = LaneWatch::new(30 * S);
        w.appended(1, 1, t0);
        w.appended(1, 2, t0);
        w.published(1, [1, 2], t0);
        // A resend after a timeout keeps the first publish time.
        w.published(1, [1, 2], t0 + 5 * S);
        w.appended(1, 3, t0 + 6 * S);
        w.published(1, [3], t0 + 6 * S);
        let mut seen = Vec::new();
        w.acked(1, 2, t0 + 7 * S, |d| seen.push(d));
        assert_eq!(seen, vec![7 * S, 7 * S]);
        seen.clear();
        // An old ack again observes nothing; the next covers seq 3 only.
        w.acked(1, 2, t0 + 8 * S, |d| seen.push(d));
        w.acked(1, 3, t0 + 8 * S, |d| seen.push(d));
        assert_eq!(seen, vec![2 * S]);
    }

    #[test]
    fn in_flight_timing_and_marks_are_bounded() {
        let t0 = Instant::now();
        let mut w = LaneWatch::new(30 * S);
        for seq in 1..=(MAX_IN_FLIGHT as u64 + 500) {
            w.appended(2, seq, t0 + Duration::from_secs(seq));
            w.published(2, [seq], t0);
        }
        let lane = &w.lanes[&2];
        assert_eq!(lane.sent.len(), MAX_IN_FLIGHT);
        assert!(lane.marks.len() <= MAX_MARKS);
        assert!(lane
            .marks
            .iter()
            .zip(lane.marks.iter().skip(1))
            .all(|(a, b)| a.0 < b.0 && a.1 < b.1));
        // The oldest mark stays: the age is exact for the first record.
        let now = t0 + Duration::from_secs(20_000);
        let r = w.report(now, |_| 1_500);
        assert_eq!(r[0].oldest_unacked, now - (t0 + S));
        // After acks, thinned marks make the age older, never younger: seq 1001 was appended at
        // 1001 s; the newest mark at or before it is no later.
        w.acked(2, 1_000, now, |_| {});
        let age = w.report(now, |_| 500)[0].oldest_unacked;
        assert!(age >= now - (t0 + Duration::from_secs(1_001)), "{age:?}");
        assert!(
            age <= now - (t0 + Duration::from_secs(1_001 - 64)),
            "{age:?}"
        );
    }

    #[test]
    fn a_lane_without_acks_warns_once_per_episode_and_says_when_acks_resume() {
        let t0 = Instant::now();
        let mut w = LaneWatch::new(30 * S);
        w.appended(7, 1, t0);
        assert_eq!(w.tick(t0 + 29 * S, |_| 1), Alerts::default());
        let a = w.tick(t0 + 30 * S, |_| 1);
        assert_eq!(a.stalled.len(), 1);
        assert_eq!(
            (a.stalled[0].partition, a.stalled[0].no_ack_for),
            (7, 30 * S)
        );
        // Once per episode, however long it lasts.
        for s in 31..100 {
            assert_eq!(w.tick(t0 + s * S, |_| 1), Alerts::default());
        }
        w.appended(7, 2, t0 + 100 * S);
        w.acked(7, 1, t0 + 101 * S, |_| {});
        let a = w.tick(t0 + 101 * S, |_| 1);
        assert_eq!(a.stalled, vec![]);
        assert_eq!(a.resumed.len(), 1);
        assert_eq!(a.resumed[0].partition, 7);
        // A new episode warns again, measured from the last ack.
        assert_eq!(w.tick(t0 + 130 * S, |_| 1), Alerts::default());
        assert_eq!(w.tick(t0 + 131 * S, |_| 1).stalled.len(), 1);
    }

    #[test]
    fn an_idle_lane_never_warns_and_a_warned_lane_emptied_by_the_budget_resumes() {
        let t0 = Instant::now();
        let mut w = LaneWatch::new(S);
        w.appended(3, 1, t0);
        w.acked(3, 1, t0, |_| {});
        // Nothing held: an hour without acks is fine.
        assert_eq!(w.tick(t0 + 3600 * S, |_| 0), Alerts::default());
        w.appended(3, 2, t0 + 3600 * S);
        assert_eq!(w.tick(t0 + 3601 * S, |_| 1).stalled.len(), 1);
        // The record was deleted without an ack (evicted): the episode ends.
        let a = w.tick(t0 + 3602 * S, |_| 0);
        assert_eq!(a.resumed.len(), 1);
        assert_eq!(w.report(t0 + 3602 * S, |_| 0)[0].no_ack_for, Duration::ZERO);
    }

    #[test]
    fn records_from_before_a_restart_count_from_the_start_and_a_clock_going_back_is_harmless() {
        let t0 = Instant::now() + 10 * S;
        let mut w = LaneWatch::new(30 * S);
        w.restored(5 | LaneKind::TRAINING_BIT, 40, t0);
        let r = w.report(t0 + 3 * S, |_| 12);
        assert_eq!((r[0].partition, r[0].kind), (5, "training"));
        assert_eq!(r[0].oldest_unacked, 3 * S);
        // `now` before the marks (not monotonic in a test): zero, not a panic.
        let r = w.report(t0 - 5 * S, |_| 12);
        assert_eq!(r[0].oldest_unacked, Duration::ZERO);
    }
}
