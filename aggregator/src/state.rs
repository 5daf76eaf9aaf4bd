//! Per-device state held by a partition owner: recent windows per (device, metric), cumulative
//! counts, the latest anomaly, and the last applied seq of every lane (agent, partition, epoch).
//!
//! Applying is idempotent: a summary is keyed by (device, metric, window start), so a replay
//! overwrites itself and a late correction (higher revision) replaces the original.
//!
//! **Lanes and epochs.** A lane is (agent, partition, epoch): an agent's outbox draws a new epoch
//! whenever it starts over from seq 1 (see [`edgewatch_models::wire::Batch::epoch`]), so a new epoch
//! is a new lane, starting at its first batch's `acked` floor, and new records are never taken for
//! replays of an old lane. At most [`MAX_EPOCHS`] lanes are kept per (agent, partition): a new one
//! evicts the least recently seen (reported by [`FleetState::take_evicted`], so the store forgets it
//! too), so made-up epochs cannot grow memory. An evicted lane that comes back starts again at its
//! batch's floor: its replays are applied again, idempotently.
//!
//! **Bounds against forged or corrupt input.** A seq or floor more than `max_seq_jump` above a known
//! lane's contiguous progress is refused ([`FleetState::check_seq`], [`FleetState::note_floor`]):
//! one forged `seq = 2^64 - 1` must not mark a lane complete (its real records would then be
//! skipped as replays). The counters saturate instead of wrapping.

use crate::telemetry::Refusal;
use edgewatch_models::wire::{AnomalyEvent, WindowSummary, LEGACY_EPOCH};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};

/// Lanes kept per (agent, partition), across epochs; past it the least recently seen is evicted.
pub const MAX_EPOCHS: usize = 4;

/// Default of `state.max_seq_jump`: how far above a lane's contiguous progress a seq or floor may
/// be. Legitimate jumps come from an agent's outbox evicting records under its disk budget, or from
/// acks of another owner in between; a million records of one lane is far beyond either.
pub const DEFAULT_MAX_SEQ_JUMP: u64 = 1_000_000;

/// One lane: (agent, partition, epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneId<'a> {
    /// Sending agent.
    pub agent: &'a str,
    /// Partition.
    pub partition: u32,
    /// The sender's outbox epoch ([`LEGACY_EPOCH`] for senders from before epochs).
    pub epoch: u64,
}

impl<'a> LaneId<'a> {
    /// Lane (`agent`, `partition`, `epoch`).
    pub fn new(agent: &'a str, partition: u32, epoch: u64) -> Self {
        Self {
            agent,
            partition,
            epoch,
        }
    }
}

/// What applying a summary did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A window not seen before.
    New,
    /// Same window again, or an older revision: nothing changed.
    Duplicate,
    /// A higher revision replaced the stored window.
    Revised,
    /// Older than every kept window: too old to keep, but counted.
    Expired,
}

/// One (device, metric) series.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SeriesState {
    /// Most recent windows, sorted by start.
    pub windows: VecDeque<WindowSummary>,
    /// Distinct windows applied since start (replays excluded).
    pub windows_applied: u64,
    /// Readings covered by the distinct windows applied.
    pub readings: u64,
    /// Anomaly events recorded.
    pub anomalies: u64,
    /// The most recent anomaly event.
    pub last_anomaly: Option<AnomalyEvent>,
}

/// One device.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceState {
    /// Its partition.
    pub partition: u32,
    /// The agent that last sent its data; unknown (`None`) for a device rebuilt from a store until
    /// its next batch (stores keep windows, not senders, so old stores load unchanged).
    pub agent: Option<String>,
    /// Timestamp of its latest reading seen (a window's last reading or an event), ms since the
    /// Unix epoch, on the device's clock; `None` before any.
    pub last_seen_ms: Option<i64>,
    /// Series by metric name.
    pub metrics: BTreeMap<String, SeriesState>,
}

impl DeviceState {
    /// Moves `last_seen_ms` forward to `ts_ms`.
    fn seen(&mut self, ts_ms: i64) {
        self.last_seen_ms = Some(self.last_seen_ms.map_or(ts_ms, |t| t.max(ts_ms)));
    }

    /// Readings covered by its applied windows, every metric (saturating).
    pub fn readings(&self) -> u64 {
        self.metrics
            .values()
            .fold(0u64, |sum, s| sum.saturating_add(s.readings))
    }

    /// Anomaly events recorded, every metric (saturating).
    pub fn anomalies(&self) -> u64 {
        self.metrics
            .values()
            .fold(0u64, |sum, s| sum.saturating_add(s.anomalies))
    }

    /// Timestamp of its most recent anomaly event, any metric.
    pub fn last_anomaly_ms(&self) -> Option<i64> {
        self.metrics
            .values()
            .filter_map(|s| s.last_anomaly.as_ref().map(|e| e.ts_ms))
            .max()
    }
}

/// How far a lane (agent, partition, epoch) has been applied without a hole.
///
/// Senders may leave seqs out for good (merged into a coarser summary or evicted under disk
/// pressure), so every record names the seq before it that the sender still holds (`prev`): a record
/// whose `prev` is already covered extends the covered range to its own seq, whatever lies between.
#[derive(Debug, Default)]
struct LaneProgress {
    /// Every seq up to and including this one has been applied or will never come: what may be
    /// acknowledged.
    contiguous: u64,
    /// Records applied beyond a hole as (prev, seq), waiting for `contiguous` to reach their prev.
    ahead: std::collections::BTreeSet<(u64, u64)>,
}

impl LaneProgress {
    /// Whether `seq` is at most `max_jump` above the contiguous progress.
    fn within_reach(&self, seq: u64, max_jump: u64) -> bool {
        seq - self.contiguous.min(seq) <= max_jump
    }

    fn note(&mut self, seq: u64, prev: u64) {
        if seq <= self.contiguous {
            return;
        }
        if prev > self.contiguous {
            self.ahead.insert((prev, seq));
            if self.ahead.len() > MAX_AHEAD {
                // Forget the record furthest from the covered range: it was applied (idempotently)
                // and the sender resends it after its ack timeout.
                self.ahead.pop_last();
            }
            return;
        }
        self.contiguous = seq;
        self.absorb();
    }

    fn raise_to(&mut self, floor: u64) {
        if floor > self.contiguous {
            self.contiguous = floor;
            self.absorb();
        }
    }

    /// Takes in every waiting record whose prev is now covered (each one at most once).
    fn absorb(&mut self) {
        while let Some(&(prev, seq)) = self.ahead.first() {
            if prev > self.contiguous {
                break;
            }
            self.ahead.pop_first();
            self.contiguous = self.contiguous.max(seq);
        }
    }
}

/// How far one lane has been applied, for the status API.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LaneReport {
    /// Sending agent.
    pub agent: String,
    /// Partition.
    pub partition: u32,
    /// The sender's outbox epoch.
    pub epoch: u64,
    /// Everything up to this seq is applied (what acks cover).
    pub applied_seq: u64,
    /// Records applied beyond a hole.
    pub waiting: usize,
    /// The seq the first of them waits for.
    pub waiting_for: Option<u64>,
}

/// Records kept beyond a hole per lane; past this the furthest ones are forgotten (and resent by the
/// sender), so a lane whose hole never fills cannot grow without bound.
const MAX_AHEAD: usize = 100_000;

/// One epoch's lane of an (agent, partition).
#[derive(Debug)]
struct EpochLane {
    epoch: u64,
    progress: LaneProgress,
    /// [`FleetState::clock`] when last noted: the least recent is evicted first.
    seen: u64,
}

/// All devices of the partitions one aggregator owns.
#[derive(Debug)]
pub struct FleetState {
    devices: BTreeMap<String, DeviceState>,
    /// Lanes by agent, then partition, then epoch (at most [`MAX_EPOCHS`]): looked up by `&str` on
    /// the per-record path, no allocation.
    lanes: BTreeMap<String, BTreeMap<u32, Vec<EpochLane>>>,
    windows_per_series: usize,
    max_seq_jump: u64,
    /// Ticks once per lane update (for least-recently-seen eviction).
    clock: u64,
    /// Lanes evicted and not yet taken by [`FleetState::take_evicted`]: (agent, partition, epoch).
    evicted: Vec<(String, u32, u64)>,
}

impl Default for FleetState {
    fn default() -> Self {
        Self {
            devices: BTreeMap::new(),
            lanes: BTreeMap::new(),
            windows_per_series: 1,
            max_seq_jump: DEFAULT_MAX_SEQ_JUMP,
            clock: 0,
            evicted: Vec::new(),
        }
    }
}

impl FleetState {
    /// Empty state keeping `windows_per_series` recent windows per series.
    pub fn new(windows_per_series: usize) -> Self {
        Self {
            windows_per_series: windows_per_series.max(1),
            ..Self::default()
        }
    }

    /// The same, refusing seqs and floors more than `max_seq_jump` (at least 1) above a lane's
    /// contiguous progress (`state.max_seq_jump`).
    pub fn with_max_seq_jump(mut self, max_seq_jump: u64) -> Self {
        self.max_seq_jump = max_seq_jump.max(1);
        self
    }

    /// Applies one summary of lane (`agent`, `partition`) of the legacy epoch with its `seq`,
    /// taking the seq before it as its prev (a sender that skips nothing). No bound is checked.
    pub fn apply_summary(
        &mut self,
        agent: &str,
        partition: u32,
        seq: u64,
        s: &WindowSummary,
    ) -> Applied {
        let lane = LaneId::new(agent, partition, LEGACY_EPOCH);
        self.note_seq(lane, seq, seq.saturating_sub(1));
        self.apply_window(partition, s)
    }

    /// Applies one summary of a device of `partition` (lane progress is noted separately).
    pub fn apply_window(&mut self, partition: u32, s: &WindowSummary) -> Applied {
        let device = self.devices.entry(s.device.clone()).or_default();
        device.partition = partition;
        device.seen(s.last_ts_ms);
        let series = device.metrics.entry(s.metric.clone()).or_default();
        let pos = series.windows.partition_point(|w| w.start_ms < s.start_ms);
        if let Some(existing) = series
            .windows
            .get_mut(pos)
            .filter(|w| w.start_ms == s.start_ms)
        {
            if s.revision > existing.revision {
                series.readings = series
                    .readings
                    .saturating_sub(existing.count)
                    .saturating_add(s.count);
                *existing = s.clone();
                return Applied::Revised;
            }
            return Applied::Duplicate;
        }
        let full = series.windows.len() >= self.windows_per_series;
        if full && pos == 0 {
            // Older than everything kept: a replay of an evicted window or a very late one.
            return Applied::Expired;
        }
        series.windows.insert(pos, s.clone());
        if full {
            series.windows.pop_front();
        }
        series.windows_applied = series.windows_applied.saturating_add(1);
        series.readings = series.readings.saturating_add(s.count);
        Applied::New
    }

    /// Records an anomaly event of an owned device (the caller dedupes by event id).
    pub fn record_anomaly(&mut self, partition: u32, e: &AnomalyEvent) {
        let device = self.devices.entry(e.device.clone()).or_default();
        device.partition = partition;
        // Not the agent: fleet events carry the aggregator's id there; summaries name the sender.
        device.seen(e.ts_ms);
        let series = device.metrics.entry(e.metric.clone()).or_default();
        series.anomalies = series.anomalies.saturating_add(1);
        if series
            .last_anomaly
            .as_ref()
            .is_none_or(|l| l.ts_ms <= e.ts_ms)
        {
            series.last_anomaly = Some(e.clone());
        }
    }

    /// Notes `agent` as the sender of `device`'s data (no-op for a device not held).
    pub fn note_agent(&mut self, device: &str, agent: &str) {
        if let Some(d) = self.devices.get_mut(device) {
            if d.agent.as_deref() != Some(agent) {
                d.agent = Some(agent.to_string());
            }
        }
    }

    /// Records that `seq` of a lane was applied, `prev` being the seq before it that the sender
    /// still held (see [`Sequenced::prev_seq`]). Summaries and anomaly events share a lane's seqs.
    /// A seq beyond reach (see [`FleetState::check_seq`], which callers ask first) is ignored.
    ///
    /// [`Sequenced::prev_seq`]: edgewatch_models::wire::Sequenced::prev_seq
    pub fn note_seq(&mut self, lane: LaneId<'_>, seq: u64, prev: u64) {
        let max_jump = self.max_seq_jump;
        let progress = self.lane(lane);
        if progress.within_reach(seq, max_jump) {
            progress.note(seq, prev);
        }
    }

    /// Whether `seq` may be applied to `lane`: refused ([`Refusal::SeqJump`]) when it lies more than
    /// `max_seq_jump` above the lane's contiguous progress (0 for a lane not seen yet). Read-only.
    pub fn check_seq(&self, lane: LaneId<'_>, seq: u64) -> Result<(), Refusal> {
        let contiguous = self.lane_seq(lane).unwrap_or(0);
        if seq - contiguous.min(seq) > self.max_seq_jump {
            return Err(Refusal::SeqJump);
        }
        Ok(())
    }

    /// Records the sender's acknowledged seq of a lane (carried by every batch): nothing at or below
    /// it will be sent again, so an owner that has never seen the lane (or lost its store) does not
    /// wait for it. A new lane starts there, whatever it is; a known lane refuses
    /// ([`Refusal::SeqJump`], nothing changed) a floor more than `max_seq_jump` above its progress.
    pub fn note_floor(&mut self, lane: LaneId<'_>, floor: u64) -> Result<(), Refusal> {
        let known = self.lane_seq(lane).is_some();
        let max_jump = self.max_seq_jump;
        let progress = self.lane(lane);
        if known && !progress.within_reach(floor, max_jump) {
            return Err(Refusal::SeqJump);
        }
        progress.raise_to(floor);
        Ok(())
    }

    /// Restores a stored lane at its applied `seq` (after a restart or a take-over), unbounded.
    pub fn restore_lane(&mut self, lane: LaneId<'_>, seq: u64) {
        self.lane(lane).raise_to(seq);
    }

    /// The lane's progress, created (evicting the least recently seen epoch of its agent and
    /// partition beyond [`MAX_EPOCHS`]) if new; marks it seen.
    fn lane(&mut self, lane: LaneId<'_>) -> &mut LaneProgress {
        if !self.lanes.contains_key(lane.agent) {
            self.lanes.insert(lane.agent.to_string(), BTreeMap::new());
        }
        self.clock += 1;
        let clock = self.clock;
        let epochs = self
            .lanes
            .get_mut(lane.agent)
            .expect("inserted above")
            .entry(lane.partition)
            .or_default();
        let i = match epochs.iter().position(|l| l.epoch == lane.epoch) {
            Some(i) => i,
            None => {
                if epochs.len() >= MAX_EPOCHS {
                    if let Some(oldest) = (0..epochs.len()).min_by_key(|&i| epochs[i].seen) {
                        let gone = epochs.swap_remove(oldest);
                        self.evicted
                            .push((lane.agent.to_string(), lane.partition, gone.epoch));
                    }
                }
                epochs.push(EpochLane {
                    epoch: lane.epoch,
                    progress: LaneProgress::default(),
                    seen: clock,
                });
                epochs.len() - 1
            }
        };
        epochs[i].seen = clock;
        &mut epochs[i].progress
    }

    /// Lanes evicted since the last call, as (agent, partition, epoch): the caller drops them from
    /// its store, so that made-up epochs cannot grow it either.
    pub fn take_evicted(&mut self) -> Vec<(String, u32, u64)> {
        std::mem::take(&mut self.evicted)
    }

    /// Highest seq of a lane up to which everything has been applied (what an ack may cover);
    /// `None` for a lane not known.
    pub fn lane_seq(&self, lane: LaneId<'_>) -> Option<u64> {
        self.lanes
            .get(lane.agent)
            .and_then(|l| l.get(&lane.partition))
            .and_then(|epochs| epochs.iter().find(|l| l.epoch == lane.epoch))
            .map(|l| l.progress.contiguous)
    }

    /// Forgets every device and lane of `partition` (it moved to another owner).
    pub fn drop_partition(&mut self, partition: u32) {
        self.devices.retain(|_, d| d.partition != partition);
        for lanes in self.lanes.values_mut() {
            lanes.remove(&partition);
        }
        self.lanes.retain(|_, l| !l.is_empty());
    }

    /// Forgets every training lane (lane ids with the training bit): this member stopped being the
    /// fleet trainer.
    pub fn drop_training_lanes(&mut self) {
        for lanes in self.lanes.values_mut() {
            lanes.retain(|id, _| id & edgewatch_models::wire::LaneKind::TRAINING_BIT == 0);
        }
        self.lanes.retain(|_, l| !l.is_empty());
    }

    /// Takes in the stored state of `partition` (after taking it over): its kept windows, oldest
    /// first, and its lanes, as (agent, epoch, seq), at their stored seqs. Counters cover the kept
    /// windows only, as in [`crate::store::rebuild`].
    pub fn load_partition(
        &mut self,
        partition: u32,
        windows: &[WindowSummary],
        lanes: &[(String, u64, u64)],
    ) {
        self.drop_partition(partition);
        let mut order: Vec<&WindowSummary> = windows.iter().collect();
        order.sort_by(|a, b| crate::store::window_order(a, b));
        for w in order {
            self.apply_window(partition, w);
        }
        for (agent, epoch, seq) in lanes {
            self.restore_lane(LaneId::new(agent, partition, *epoch), *seq);
        }
    }

    /// Every device.
    pub fn devices(&self) -> &BTreeMap<String, DeviceState> {
        &self.devices
    }

    /// One device.
    pub fn device(&self, id: &str) -> Option<&DeviceState> {
        self.devices.get(id)
    }

    /// Total readings covered by applied windows (saturating).
    pub fn readings(&self) -> u64 {
        self.devices
            .values()
            .flat_map(|d| d.metrics.values())
            .fold(0u64, |sum, s| sum.saturating_add(s.readings))
    }

    /// Total anomaly events recorded on held devices (saturating).
    pub fn anomalies(&self) -> u64 {
        self.devices
            .values()
            .fold(0u64, |sum, d| sum.saturating_add(d.anomalies()))
    }

    /// Number of lanes kept (every epoch counts).
    pub fn lanes(&self) -> usize {
        self.lanes
            .values()
            .flat_map(BTreeMap::values)
            .map(Vec::len)
            .sum()
    }

    /// Progress of every lane, sorted by (agent, partition, epoch).
    pub fn lane_progress(&self) -> Vec<LaneReport> {
        let mut out: Vec<LaneReport> = self
            .lanes
            .iter()
            .flat_map(|(agent, lanes)| {
                lanes.iter().flat_map(move |(partition, epochs)| {
                    epochs.iter().map(move |l| LaneReport {
                        agent: agent.clone(),
                        partition: *partition,
                        epoch: l.epoch,
                        applied_seq: l.progress.contiguous,
                        waiting: l.progress.ahead.len(),
                        waiting_for: l.progress.ahead.first().map(|&(prev, _)| prev),
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.agent, a.partition, a.epoch).cmp(&(&b.agent, b.partition, b.epoch)));
        out
    }
}

/// One series as `GET /api/windows` reports it: what `edgewatch verify` reconciles.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct HeldSeries {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// The device's partition.
    pub partition: u32,
    /// Readings covered by the distinct windows applied (held or since evicted).
    pub readings: u64,
    /// Distinct windows applied (held or since evicted).
    pub windows_applied: u64,
    /// The windows held, sorted by start.
    pub windows: Vec<HeldWindow>,
}

/// One held window, reduced to what verification needs.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct HeldWindow {
    /// Start, inclusive (Unix ms).
    pub start_ms: i64,
    /// End, exclusive (Unix ms); a coarsened window spans several window lengths.
    pub end_ms: i64,
    /// Readings in the window.
    pub count: u64,
    /// Their mean (`None` when not finite, which JSON cannot carry).
    pub mean: Option<f64>,
    /// Revision of the window.
    pub revision: u32,
}

// Read-only views for verification; kept apart from the apply logic above.
impl FleetState {
    /// Every series held, by device then metric; only `device`'s when given.
    pub fn held_series(&self, device: Option<&str>) -> Vec<HeldSeries> {
        let devices: Box<dyn Iterator<Item = (&String, &DeviceState)>> = match device {
            Some(id) => Box::new(self.devices.get_key_value(id).into_iter()),
            None => Box::new(self.devices.iter()),
        };
        devices
            .flat_map(|(id, d)| {
                d.metrics.iter().map(move |(metric, s)| HeldSeries {
                    device: id.clone(),
                    metric: metric.clone(),
                    partition: d.partition,
                    readings: s.readings,
                    windows_applied: s.windows_applied,
                    windows: s
                        .windows
                        .iter()
                        .map(|w| HeldWindow {
                            start_ms: w.start_ms,
                            end_ms: w.end_ms,
                            count: w.count,
                            mean: w.mean.is_finite().then_some(w.mean),
                            revision: w.revision,
                        })
                        .collect(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lane(agent: &str, partition: u32) -> LaneId<'_> {
        LaneId::new(agent, partition, LEGACY_EPOCH)
    }

    fn summary(start: i64, count: u64, revision: u32) -> WindowSummary {
        WindowSummary {
            device: "d".into(),
            metric: "m".into(),
            start_ms: start,
            end_ms: start + 10,
            count,
            min: 0.0,
            max: 1.0,
            mean: 0.5,
            std: 0.1,
            first_ts_ms: start,
            last_ts_ms: start + 9,
            max_score: 0.0,
            revision,
        }
    }

    #[test]
    fn a_device_knows_its_agent_and_latest_reading_and_old_windows_do_not_move_it_back() {
        let mut st = FleetState::new(10);
        st.apply_window(1, &summary(100, 5, 0));
        assert_eq!(
            st.device("d").unwrap().agent,
            None,
            "not known from a window alone"
        );
        st.note_agent("d", "gw-1");
        st.note_agent("nobody", "gw-1");
        assert!(st.device("nobody").is_none());
        st.apply_window(1, &summary(0, 5, 0));
        let d = st.device("d").unwrap();
        assert_eq!(d.agent.as_deref(), Some("gw-1"));
        assert_eq!(d.last_seen_ms, Some(109));
        let json = serde_json::to_value(d).unwrap();
        assert_eq!(json["agent"], "gw-1");
        assert_eq!(json["last_seen_ms"], 109);
        assert_eq!(st.anomalies(), 0);
    }

    #[test]
    fn replay_is_a_duplicate_and_changes_nothing() {
        let mut st = FleetState::new(10);
        assert_eq!(st.apply_summary("a", 1, 1, &summary(0, 5, 0)), Applied::New);
        assert_eq!(
            st.apply_summary("a", 1, 1, &summary(0, 5, 0)),
            Applied::Duplicate
        );
        assert_eq!(st.readings(), 5);
        assert_eq!(st.lane_seq(lane("a", 1)), Some(1));
    }

    #[test]
    fn higher_revision_replaces_the_window() {
        let mut st = FleetState::new(10);
        st.apply_summary("a", 1, 1, &summary(0, 5, 0));
        assert_eq!(
            st.apply_summary("a", 1, 2, &summary(0, 6, 1)),
            Applied::Revised
        );
        assert_eq!(
            st.apply_summary("a", 1, 3, &summary(0, 5, 0)),
            Applied::Duplicate
        );
        assert_eq!(st.readings(), 6);
    }

    #[test]
    fn only_the_newest_windows_are_kept() {
        let mut st = FleetState::new(3);
        for i in 0..5 {
            st.apply_summary("a", 0, i + 1, &summary(i as i64 * 10, 1, 0));
        }
        let s = &st.device("d").unwrap().metrics["m"];
        assert_eq!(
            s.windows.iter().map(|w| w.start_ms).collect::<Vec<_>>(),
            vec![20, 30, 40]
        );
        assert_eq!(s.windows_applied, 5);
        assert_eq!(
            st.apply_summary("a", 0, 9, &summary(0, 1, 0)),
            Applied::Expired
        );
    }

    #[test]
    fn lane_progress_stops_at_a_hole_until_it_fills() {
        let mut st = FleetState::new(10);
        for seq in [1, 2, 4, 5] {
            st.note_seq(lane("a", 0), seq, seq - 1);
        }
        assert_eq!(st.lane_seq(lane("a", 0)), Some(2), "3 is missing");
        st.note_seq(lane("a", 0), 3, 2);
        assert_eq!(st.lane_seq(lane("a", 0)), Some(5));
        st.note_seq(lane("a", 0), 2, 1);
        assert_eq!(st.lane_seq(lane("a", 0)), Some(5), "replays change nothing");
    }

    #[test]
    fn a_new_lane_starts_at_the_senders_floor() {
        let mut st = FleetState::new(10);
        st.note_seq(lane("b", 3), 42, 41);
        assert_eq!(
            st.lane_seq(lane("b", 3)),
            Some(0),
            "41 and below may still come"
        );
        st.note_floor(lane("b", 3), 41).unwrap();
        assert_eq!(st.lane_seq(lane("b", 3)), Some(42));
        st.note_floor(lane("b", 3), 7).unwrap();
        assert_eq!(
            st.lane_seq(lane("b", 3)),
            Some(42),
            "a lower floor changes nothing"
        );
        assert_eq!(st.lane_seq(lane("b", 4)), None);
    }

    #[test]
    fn seqs_the_sender_skipped_do_not_hold_the_lane_back() {
        let mut st = FleetState::new(10);
        st.note_seq(lane("a", 0), 1, 0);
        // 2..=4 merged or evicted by the sender: 5 names 1 as its prev.
        st.note_seq(lane("a", 0), 5, 1);
        assert_eq!(st.lane_seq(lane("a", 0)), Some(5));
        // Out of order: 9 (prev 7) waits for 7, which comes with prev 5.
        st.note_seq(lane("a", 0), 9, 7);
        assert_eq!(st.lane_seq(lane("a", 0)), Some(5));
        st.note_seq(lane("a", 0), 7, 5);
        assert_eq!(st.lane_seq(lane("a", 0)), Some(9));
        // A record resent with a newer prev (its old prev was evicted meanwhile) unblocks the lane.
        st.note_seq(lane("a", 0), 12, 11);
        st.note_seq(lane("a", 0), 12, 9);
        assert_eq!(st.lane_seq(lane("a", 0)), Some(12));
    }

    #[test]
    fn the_wait_list_is_bounded_by_forgetting_the_furthest() {
        let mut lane = LaneProgress::default();
        for seq in 2..(MAX_AHEAD as u64 + 10) {
            lane.note(seq, seq - 1);
        }
        assert_eq!(lane.ahead.len(), MAX_AHEAD);
        lane.note(1, 0);
        assert_eq!(
            lane.contiguous,
            MAX_AHEAD as u64 + 1,
            "forgotten ones are resent later"
        );
    }

    proptest! {
        #[test]
        fn a_lane_with_skipped_seqs_completes_in_any_order_and_stops_at_a_real_hole(
            kept in prop::collection::vec(any::<bool>(), 1..60),
            order in Just((0..60usize).collect::<Vec<_>>()).prop_shuffle(),
            dups in prop::collection::vec(0..60usize, 0..20),
            lose in any::<prop::sample::Index>(),
        ) {
            // The sender still holds the seqs marked kept (the others were merged or evicted);
            // each names the kept one before it as its prev.
            let mut records = Vec::new();
            let mut prev = 0;
            for (i, k) in kept.iter().enumerate() {
                let seq = i as u64 + 1;
                if *k {
                    records.push((seq, prev));
                    prev = seq;
                }
            }
            prop_assume!(!records.is_empty());
            let deliveries: Vec<(u64, u64)> = order.iter().chain(dups.iter())
                .filter_map(|&i| records.get(i).copied())
                .collect();
            let mut all = LaneProgress::default();
            for &(seq, prev) in &deliveries {
                all.note(seq, prev);
            }
            prop_assert_eq!(all.contiguous, prev, "complete chain: up to the last seq");
            prop_assert!(all.ahead.is_empty());
            // Lose one record in transit: the lane stops right before it.
            let lost = records[lose.index(records.len())];
            let mut some = LaneProgress::default();
            for &(seq, prev) in deliveries.iter().filter(|r| **r != lost) {
                some.note(seq, prev);
            }
            prop_assert_eq!(some.contiguous, lost.1, "stops at the lost record's prev");
        }

        #[test]
        fn duplicated_and_reordered_deliveries_change_nothing(
            order in Just((0..20usize).collect::<Vec<_>>()).prop_shuffle(),
            dups in prop::collection::vec(0..20usize, 0..20),
        ) {
            let windows: Vec<_> = (0..20).map(|i| summary(i as i64 * 10, i as u64 + 1, 0)).collect();
            let mut reference = FleetState::new(100);
            for (i, w) in windows.iter().enumerate() {
                reference.apply_summary("a", 0, i as u64 + 1, w);
            }
            let mut st = FleetState::new(100);
            for &i in order.iter().chain(dups.iter()) {
                st.apply_summary("a", 0, i as u64 + 1, &windows[i]);
            }
            prop_assert_eq!(st.readings(), reference.readings());
            let a = &st.device("d").unwrap().metrics["m"];
            let b = &reference.device("d").unwrap().metrics["m"];
            prop_assert_eq!(&a.windows, &b.windows);
            prop_assert_eq!(a.windows_applied, b.windows_applied);
            prop_assert_eq!(st.lane_seq(lane("a", 0)), Some(20));
        }
    }

    #[test]
    fn a_new_epoch_is_a_new_lane_starting_at_its_floor() {
        let mut st = FleetState::new(10);
        let old = LaneId::new("a", 3, 11);
        for seq in 1..=100 {
            st.note_seq(old, seq, seq - 1);
        }
        // The agent restarted without its outbox: seqs from 1 again, in a new epoch.
        let new = LaneId::new("a", 3, 22);
        assert_eq!(st.lane_seq(new), None);
        st.note_floor(new, 0).unwrap();
        assert_eq!(st.check_seq(new, 1), Ok(()));
        st.note_seq(new, 1, 0);
        assert_eq!(
            st.lane_seq(new),
            Some(1),
            "not a replay of the old lane's seq 1"
        );
        assert_eq!(st.lane_seq(old), Some(100), "the old lane is untouched");
        // A lane seen for the first time trusts its floor, however high.
        let other = LaneId::new("a", 3, 33);
        st.note_floor(other, 5_000_000).unwrap();
        assert_eq!(st.lane_seq(other), Some(5_000_000));
        assert_eq!(st.lanes(), 3);
        let report = st.lane_progress();
        assert_eq!(
            report
                .iter()
                .map(|l| (l.epoch, l.applied_seq))
                .collect::<Vec<_>>(),
            vec![(11, 100), (22, 1), (33, 5_000_000)]
        );
    }

    #[test]
    fn epochs_per_agent_and_partition_are_bounded_least_recently_seen_first() {
        let mut st = FleetState::new(10);
        let real = LaneId::new("a", 0, 7);
        st.note_seq(real, 1, 0);
        // Made-up epochs, as a forger would send them; the real lane keeps being seen.
        for epoch in 100..110u64 {
            st.note_floor(LaneId::new("a", 0, epoch), 0).unwrap();
            st.note_seq(real, 1, 0);
        }
        assert_eq!(st.lanes(), MAX_EPOCHS);
        assert_eq!(
            st.lane_seq(real),
            Some(1),
            "the lane in use is never the one evicted"
        );
        let evicted = st.take_evicted();
        assert_eq!(evicted.len(), 10 + 1 - MAX_EPOCHS);
        assert!(evicted
            .iter()
            .all(|(a, p, e)| a == "a" && *p == 0 && *e >= 100));
        assert!(st.take_evicted().is_empty(), "taken once");
        // Other partitions and agents have their own bound.
        st.note_floor(LaneId::new("a", 1, 100), 0).unwrap();
        st.note_floor(LaneId::new("b", 0, 100), 0).unwrap();
        assert_eq!(st.lanes(), MAX_EPOCHS + 2);
        // Restored lanes are bounded the same way.
        let mut st = FleetState::new(10);
        let lanes: Vec<(String, u64, u64)> =
            (1..=6).map(|e| ("a".to_string(), e, e * 10)).collect();
        st.load_partition(0, &[], &lanes);
        assert_eq!(st.lanes(), MAX_EPOCHS);
        assert_eq!(st.take_evicted().len(), 2);
        assert_eq!(st.lane_seq(LaneId::new("a", 0, 6)), Some(60));
    }

    #[test]
    fn a_forged_seq_at_the_top_of_the_range_cannot_complete_a_lane() {
        let mut st = FleetState::new(10).with_max_seq_jump(1_000);
        let l = lane("a", 0);
        for seq in 1..=10 {
            st.note_seq(l, seq, seq - 1);
        }
        assert_eq!(st.check_seq(l, u64::MAX), Err(Refusal::SeqJump));
        assert_eq!(st.check_seq(l, 1_010), Ok(()));
        assert_eq!(st.check_seq(l, 1_011), Err(Refusal::SeqJump));
        // Even if noted anyway (directly, or as a prev the chain would later reach) it is ignored.
        st.note_seq(l, u64::MAX, 10);
        st.note_seq(l, u64::MAX, 11);
        st.note_seq(l, 11, 10);
        assert_eq!(st.lane_seq(l), Some(11));
        assert_eq!(
            st.lane_progress()[0].waiting,
            0,
            "nothing waits for the forged seq"
        );
        // A floor that far up is refused as well, and changes nothing.
        assert_eq!(st.note_floor(l, u64::MAX - 1), Err(Refusal::SeqJump));
        assert_eq!(st.lane_seq(l), Some(11));
        // A new lane's first seq is measured from 0.
        assert_eq!(st.check_seq(lane("b", 0), u64::MAX), Err(Refusal::SeqJump));
        // Real records keep coming.
        st.note_seq(l, 12, 11);
        assert_eq!(st.lane_seq(l), Some(12));
    }

    #[test]
    fn counters_saturate_instead_of_wrapping() {
        let mut st = FleetState::new(10);
        assert_eq!(st.apply_summary("a", 0, 1, &summary(0, 5, 0)), Applied::New);
        assert_eq!(
            st.apply_summary("a", 0, 2, &summary(10, u64::MAX, 0)),
            Applied::New
        );
        assert_eq!(st.readings(), u64::MAX);
        let mut other = summary(0, u64::MAX, 0);
        other.device = "e".into();
        st.apply_summary("a", 0, 3, &other);
        assert_eq!(
            st.readings(),
            u64::MAX,
            "the sum over devices saturates too"
        );
        assert_eq!(
            st.apply_summary("a", 0, 4, &summary(10, 3, 1)),
            Applied::Revised
        );
        // Saturated once, a total is no longer exact (the 5 is gone), but it never wraps or panics.
        assert_eq!(st.device("d").unwrap().metrics["m"].readings, 3);
    }

    #[test]
    fn held_series_lists_every_series_with_its_windows_and_totals() {
        let mut st = FleetState::new(2);
        for i in 0..3 {
            st.apply_summary("a", 7, i + 1, &summary(i as i64 * 10, 2, 0));
        }
        let mut other = summary(0, 4, 0);
        other.device = "e".into();
        other.mean = f64::NAN;
        st.apply_summary("a", 7, 4, &other);
        let all = st.held_series(None);
        assert_eq!(all.len(), 2);
        let d = &all[0];
        assert_eq!(
            (d.device.as_str(), d.metric.as_str(), d.partition),
            ("d", "m", 7)
        );
        assert_eq!(
            (d.readings, d.windows_applied),
            (6, 3),
            "cumulative, evicted included"
        );
        assert_eq!(
            d.windows
                .iter()
                .map(|w| (w.start_ms, w.end_ms, w.count))
                .collect::<Vec<_>>(),
            vec![(10, 20, 2), (20, 30, 2)]
        );
        assert_eq!(d.windows[0].mean, Some(0.5));
        assert_eq!(st.held_series(Some("e"))[0].windows[0].mean, None);
        assert!(st.held_series(Some("nobody")).is_empty());
    }
}
