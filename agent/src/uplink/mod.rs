//! Shipping pipeline outputs to the partition owners through the durable outbox.
//!
//! Every summary and anomaly event is appended to the [`Outbox`] (one lane per partition, seqs from
//! 1), flushed, and only then published; it stays in the outbox until its lane's owner acknowledges
//! it on `{prefix}/acks/{agent}`. The uplink runs on its own thread because sled calls block.
//!
//! **Flush policy.** Appends are flushed in rounds: at once when an anomaly event is appended (its
//! latency matters), otherwise when `batch_max_records` records are waiting or the oldest has waited
//! `batch_max_delay_ms`, and with every checkpoint. One sled flush per round, never per record.
//!
//! **Sending.** Per lane, a cursor says up to which seq everything was published on this connection.
//! Records appended while the lane is caught up are published at once and move the cursor. After a
//! reconnect, an ack timeout (go-back-N: the cursor returns to the acked seq, with the timeout
//! doubling per consecutive miss, capped, with jitter) or a restart, the lane has a backlog: it is
//! drained in seq order at `drain_records_per_sec` with at most `max_unacked_records` in flight,
//! while newly appended records are still published at once (live) — the owner applies them out of
//! order and acks the lane only when the prev chain is complete. Nothing is published while the link
//! is down: the pipeline keeps detecting and the outbox keeps buffering. These decisions are
//! [`sender::LaneSender`]'s, an I/O-free state machine given the time; this module is the shell that
//! owns the outbox, passes `Instant`s in and publishes what comes out. `link.rs` is the link task.
//!
//! **Acks are checked before they delete.** Anyone who may publish on `{prefix}/acks/{agent}` could
//! forge one, so an ack counts only for this outbox's lane epoch (every batch carries it) and only up
//! to the highest seq the lane ever handed to the network; any other ack is refused, counted by reason
//! (`edgewatch_agent_acks_refused_total`) and logged at most every 10 s.

pub(crate) mod link;
pub mod sender;
pub mod watch;

pub use sender::{LanePlan, LaneSender, LaneState, SenderSettings, MAX_ACK_TIMEOUT};

use crate::outbox::{Outbox, OutboxError, OutboxStats, Record};
use crate::pipeline::Output;
use crate::telemetry::{AckRefusal, AgentMetrics, LogLimit};
use edgewatch_models::wire::{
    lane_id, split_lane, AckBatch, AnomalyEvent, Batch, LaneKind, Sequenced, Topics,
    TrainingSample, WindowSummary,
};
use rumqttc::{AsyncClient, QoS};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// What the pipeline hands to the uplink.
pub(crate) enum ToUplink {
    /// Outputs of one pipeline batch, in order.
    Outputs(Vec<Output>),
    /// A pipeline checkpoint covering every output sent before it (with the last chunk of its
    /// rows): stored in the outbox's checkpoint file once those outputs are flushed, then `done`
    /// is signalled.
    Checkpoint {
        header: Vec<u8>,
        rows: Vec<(u32, Vec<u8>)>,
        done: Option<oneshot::Sender<()>>,
    },
    /// A chunk of the rows of the checkpoint being taken (ascending indexes), ahead of the
    /// [`ToUplink::Checkpoint`] that completes it: written to the checkpoint's temporary file.
    CheckpointRows(Vec<(u32, Vec<u8>)>),
    /// New batching settings from a reload (`uplink.batch_max_records`, `uplink.batch_max_delay_ms`),
    /// in force from the next round.
    Batching {
        batch_max: usize,
        max_delay: Duration,
    },
}

/// What the uplink's MQTT poll loop reports.
pub(crate) enum LinkNote {
    /// Connected (again).
    Up,
    /// The connection failed; reconnecting.
    Down,
    /// Acks from an owner.
    Acks(AckBatch),
}

/// Settings of the uplink, copied from the agent configuration.
pub(crate) struct UplinkSettings {
    pub agent: String,
    pub topics: Topics,
    pub qos: QoS,
    pub batch_max: usize,
    pub max_delay: Duration,
    pub ack_timeout: Duration,
    pub max_unacked: u64,
    pub drain_rate: f64,
    /// How long shutdown waits for outstanding acks (stopping early once they stall).
    pub shutdown_wait: Duration,
    /// A lane whose ack has not moved for this long is warned about (`uplink.ack_warn_ms`).
    pub ack_warn: Duration,
}

/// Shutdown stops waiting for acks when none came for this long.
const SHUTDOWN_STALL: Duration = Duration::from_secs(2);

/// The uplink: owner of the outbox.
pub(crate) struct Uplink {
    s: UplinkSettings,
    outbox: Outbox,
    sender: LaneSender,
    connected: bool,
    /// Records appended since the last round, by lane (published at once when the lane is caught up).
    fresh: BTreeMap<u32, Vec<(u64, Record)>>,
    /// Outbox counters when `fresh` started: if coarsening or eviction ran since, `fresh` is stale.
    fresh_stats: OutboxStats,
    unflushed: usize,
    /// Something other than appends needs the next round to flush (a checkpoint).
    must_flush: bool,
    oldest_unflushed: Option<Instant>,
    urgent: bool,
    last_ack: Instant,
    metrics: Arc<AgentMetrics>,
    /// Publishes handed to the client (QoS 1: each one will be acknowledged by the broker).
    sent: Arc<AtomicU64>,
    /// Rate limit of the refused-ack warnings.
    refusals_log: LogLimit,
    /// Rate limit of the records-not-stored errors.
    append_log: LogLimit,
    /// Per-lane ages, latencies and the no-ack warning's state.
    watch: watch::LaneWatch,
}

impl Uplink {
    pub(crate) fn new(
        s: UplinkSettings,
        outbox: Outbox,
        metrics: Arc<AgentMetrics>,
        sent: Arc<AtomicU64>,
    ) -> Self {
        let now = Instant::now();
        let sender = LaneSender::new(
            SenderSettings {
                ack_timeout: s.ack_timeout,
                max_unacked: s.max_unacked,
                drain_rate: s.drain_rate,
                jitter_seed: std::process::id(),
            },
            now,
        );
        let mut lanes = watch::LaneWatch::new(s.ack_warn);
        for p in outbox.lanes() {
            if outbox.len(p) > 0 {
                lanes.restored(p, outbox.acked_seq(p), now);
            }
        }
        let mut up = Self {
            watch: lanes,
            s,
            fresh_stats: outbox.stats(),
            outbox,
            sender,
            connected: false,
            fresh: BTreeMap::new(),
            unflushed: 0,
            must_flush: false,
            oldest_unflushed: None,
            urgent: false,
            last_ack: now,
            metrics,
            sent,
            refusals_log: LogLimit::every(Duration::from_secs(10)),
            append_log: LogLimit::every(Duration::from_secs(10)),
        };
        up.update_gauges();
        up
    }

    /// Runs until `rx` closes, then publishes what is left and waits (bounded) for its acks.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<ToUplink>,
        mut notes: mpsc::UnboundedReceiver<LinkNote>,
        client: AsyncClient,
    ) {
        let period =
            (self.s.max_delay / 2).clamp(Duration::from_millis(5), Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(ToUplink::Outputs(outputs)) => self.append(outputs),
                    Some(ToUplink::Batching { batch_max, max_delay }) => {
                        self.s.batch_max = batch_max;
                        self.s.max_delay = max_delay;
                    }
                    Some(ToUplink::CheckpointRows(rows)) => {
                        self.metrics.checkpoint_rows_total.fetch_add(rows.len() as u64, Relaxed);
                        self.outbox.stage_checkpoint_rows(&rows);
                        continue;
                    }
                    Some(ToUplink::Checkpoint { header, rows, done }) => {
                        self.metrics.checkpoint_rows_total.fetch_add(rows.len() as u64, Relaxed);
                        match self.outbox.put_checkpoint(&header, &rows) {
                            Ok(()) => {
                                self.must_flush = true;
                                if self.round(&client).await {
                                    self.metrics.checkpoints_total.fetch_add(1, Relaxed);
                                    if let Some(done) = done {
                                        let _ = done.send(());
                                    }
                                }
                            }
                            Err(e) => {
                                // `done` is dropped: the pipeline keeps the readings unacknowledged.
                                self.metrics.outbox_errors_total.fetch_add(1, Relaxed);
                                tracing::error!(agent = %self.s.agent, error = %e, "checkpoint not stored");
                            }
                        }
                    }
                    None => break,
                },
                Some(note) = notes.recv() => self.on_note(note),
                _ = tick.tick() => {
                    self.check_timeouts();
                    self.check_stalls();
                    self.round(&client).await;
                    continue;
                }
            }
            if self.due() {
                self.round(&client).await;
            }
        }
        self.round(&client).await;
        self.wait_for_acks(&mut notes, &client).await;
    }

    fn due(&self) -> bool {
        self.urgent
            || self.unflushed >= self.s.batch_max
            || self
                .oldest_unflushed
                .is_some_and(|t| t.elapsed() >= self.s.max_delay)
    }

    fn append(&mut self, outputs: Vec<Output>) {
        for o in outputs {
            let (partition, record) = match o {
                Output::Summary { partition, summary } => (partition, Record::Summary(summary)),
                Output::Anomaly { partition, event } => {
                    self.urgent = true;
                    (partition, Record::Anomaly(event))
                }
                Output::Training { partition, sample } => {
                    // Partitions are validated far below the bit at start.
                    let Some(lane) = lane_id(partition, LaneKind::Training) else {
                        continue;
                    };
                    (lane, Record::Training(sample))
                }
            };
            match self.outbox.append(partition, record.clone()) {
                Ok(seq) => {
                    self.watch.appended(partition, seq, Instant::now());
                    self.fresh.entry(partition).or_default().push((seq, record));
                    self.unflushed += 1;
                    self.oldest_unflushed.get_or_insert_with(Instant::now);
                }
                Err(e) => {
                    // Only a failing disk or a non-finite number (which the pipeline never makes)
                    // gets here; the record is lost and counted.
                    self.metrics.outbox_errors_total.fetch_add(1, Relaxed);
                    if let Some(suppressed) = self.append_log.ready() {
                        tracing::error!(agent = %self.s.agent, partition, error = %e, suppressed, "record not stored in the outbox; dropped (logged at most every 10 s; all counted in edgewatch_agent_outbox_errors_total)");
                    }
                }
            }
        }
    }

    fn on_note(&mut self, note: LinkNote) {
        match note {
            LinkNote::Up => {
                self.connected = true;
                self.metrics.uplink_connected.store(1, Relaxed);
                // Go back to the acked seq of every lane: whatever was in flight may be lost.
                let outbox = &self.outbox;
                let resends = self
                    .sender
                    .on_link_up(Instant::now(), |p| outbox.acked_seq(p));
                self.metrics.resends_total.fetch_add(resends, Relaxed);
            }
            LinkNote::Down => {
                self.connected = false;
                self.metrics.uplink_connected.store(0, Relaxed);
            }
            LinkNote::Acks(batch) => {
                self.metrics.acks_received_total.fetch_add(1, Relaxed);
                for ack in batch.acks {
                    if ack.epoch != self.outbox.epoch() {
                        // Another lane's: a previous run's (without state.dir), or forged.
                        let why = format!(
                            "lane epoch {} is not this outbox's ({})",
                            ack.epoch,
                            self.outbox.epoch()
                        );
                        self.refuse(AckRefusal::Epoch, &batch.owner, &ack, &why);
                        continue;
                    }
                    let Some(lane) = lane_id(ack.partition, ack.lane) else {
                        let why = format!("partition {} is out of range", ack.partition);
                        self.refuse(AckRefusal::Unsent, &batch.owner, &ack, &why);
                        continue;
                    };
                    let before = self.outbox.acked_seq(lane);
                    match self.outbox.ack(lane, ack.upto_seq) {
                        Ok(_) if ack.upto_seq > before => {
                            self.last_ack = Instant::now();
                            self.sender.on_ack(self.last_ack, lane, ack.upto_seq);
                            let latency = &self.metrics.ack_latency;
                            self.watch
                                .acked(lane, ack.upto_seq, self.last_ack, |d| latency.observe(d));
                        }
                        Ok(_) => {}
                        Err(e @ OutboxError::AckAhead { .. }) => {
                            self.refuse(AckRefusal::Unsent, &batch.owner, &ack, &e.to_string());
                        }
                        Err(e) => {
                            self.metrics.outbox_errors_total.fetch_add(1, Relaxed);
                            tracing::error!(agent = %self.s.agent, partition = ack.partition, error = %e, "ack not applied to the outbox; the records will be resent");
                        }
                    }
                }
                self.update_gauges();
            }
        }
    }

    /// Counts a refused ack and logs it (rate-limited). Nothing was deleted for it.
    fn refuse(
        &mut self,
        why: AckRefusal,
        owner: &str,
        ack: &edgewatch_models::wire::Ack,
        detail: &str,
    ) {
        self.metrics.refuse_ack(why);
        if let Some(suppressed) = self.refusals_log.ready() {
            tracing::warn!(agent = %self.s.agent, owner = %owner.escape_debug(), partition = ack.partition,
                upto_seq = ack.upto_seq, epoch = ack.epoch, reason = why.label(), detail, suppressed,
                "ack refused: nothing deleted (forged, or meant for another run of this agent); logged at most every 10 s");
        }
    }

    /// The no-ack warning: once per lane and episode, naming the partitions and what it likely
    /// means; and an INFO when acks resume.
    fn check_stalls(&mut self) {
        let outbox = &self.outbox;
        let mut alerts = self.watch.tick(Instant::now(), |p| outbox.len(p) as u64);
        // Training lanes wait for the aggregator that trains, if any: a hint of their own.
        let (training, stalled): (Vec<_>, Vec<_>) =
            alerts.stalled.drain(..).partition(|a| a.kind == "training");
        alerts.stalled = stalled;
        if !training.is_empty() {
            let partitions = alert_list(&training);
            let records: u64 = training.iter().map(|a| a.unacked).sum();
            tracing::warn!(agent = %self.s.agent, partitions = %partitions, records,
                "no ack for the training samples of partition(s) {partitions}: does an aggregator have training.enabled (in cluster mode: is a member the trainer, see cluster status)? samples are kept within a tenth of the outbox and dropped first; summaries are not affected");
        }
        if !alerts.stalled.is_empty() {
            let partitions = alert_list(&alerts.stalled);
            let records: u64 = alerts.stalled.iter().map(|a| a.unacked).sum();
            let waited_s = alerts
                .stalled
                .iter()
                .map(|a| a.no_ack_for)
                .max()
                .unwrap_or_default()
                .as_secs();
            if self.connected {
                tracing::warn!(agent = %self.s.agent, partitions = %partitions, records, no_ack_for_s = waited_s,
                    ack_warn_ms = self.s.ack_warn.as_millis() as u64,
                    "no ack from the owner of partition(s) {partitions} for {waited_s} s although the uplink is connected: no aggregator owns them? check the aggregators' owned: ranges (or cluster status); the records wait in the outbox");
            } else {
                tracing::warn!(agent = %self.s.agent, partitions = %partitions, records, no_ack_for_s = waited_s,
                    ack_warn_ms = self.s.ack_warn.as_millis() as u64,
                    "no ack for partition(s) {partitions} for {waited_s} s: the uplink broker is unreachable; the records wait in the outbox");
            }
        }
        if !alerts.resumed.is_empty() {
            let partitions = alert_list(&alerts.resumed);
            tracing::info!(agent = %self.s.agent, partitions = %partitions, "acks resumed for partition(s) {partitions}");
        }
    }

    /// Go-back-N for every lane whose ack is overdue.
    fn check_timeouts(&mut self) {
        let outbox = &self.outbox;
        let expired = self
            .sender
            .expired(Instant::now(), |p| (outbox.acked_seq(p), outbox.len(p) > 0));
        for (p, acked, misses) in expired {
            tracing::debug!(agent = %self.s.agent, partition = p, from_seq = acked + 1, misses, "ack timeout; resending the lane from its last ack");
            self.metrics.resends_total.fetch_add(1, Relaxed);
        }
    }

    /// Flushes what was appended and publishes what each lane may send now. Returns whether the
    /// flush (if one was needed) succeeded.
    async fn round(&mut self, client: &AsyncClient) -> bool {
        let fresh = std::mem::take(&mut self.fresh);
        let stats = self.outbox.stats();
        let fresh_valid = stats.coarsened == self.fresh_stats.coarsened
            && stats.evicted == self.fresh_stats.evicted;
        self.fresh_stats = stats;
        let plan = if self.connected {
            self.plan(fresh, fresh_valid)
        } else {
            BTreeMap::new()
        };
        for (&p, records) in &plan {
            if let Some((seq, _, _)) = records.last() {
                if let Err(e) = self.outbox.expose(p, *seq) {
                    self.metrics.outbox_errors_total.fetch_add(1, Relaxed);
                    tracing::error!(agent = %self.s.agent, error = %e, "outbox write failed; not publishing");
                    return false;
                }
            }
        }
        if self.unflushed > 0 || self.must_flush || !plan.is_empty() {
            if let Err(e) = self.outbox.flush() {
                // Nothing is published unflushed; the next round tries again.
                self.metrics.outbox_errors_total.fetch_add(1, Relaxed);
                tracing::error!(agent = %self.s.agent, error = %e, "outbox flush failed; not publishing until it succeeds");
                return false;
            }
            self.metrics.outbox_flushes_total.fetch_add(1, Relaxed);
        }
        self.unflushed = 0;
        self.must_flush = false;
        self.oldest_unflushed = None;
        self.urgent = false;
        for (p, records) in plan {
            self.publish_lane(client, p, records);
        }
        self.update_gauges();
        true
    }

    /// What to publish per lane now: (seq, prev, record) in seq order.
    fn plan(
        &mut self,
        fresh: BTreeMap<u32, Vec<(u64, Record)>>,
        fresh_valid: bool,
    ) -> BTreeMap<u32, Vec<(u64, u64, Record)>> {
        let now = Instant::now();
        self.sender.refill(now);
        let mut plan: BTreeMap<u32, Vec<(u64, u64, Record)>> = BTreeMap::new();
        let mut fresh = if fresh_valid { fresh } else { BTreeMap::new() };
        for p in self.outbox.lanes() {
            if self.outbox.len(p) == 0 {
                continue;
            }
            let state = LaneState {
                acked: self.outbox.acked_seq(p),
                next_seq: self.outbox.next_seq(p),
            };
            let outbox = &self.outbox;
            let (lane, failed) = self.sender.plan_lane(
                now,
                p,
                state,
                fresh.remove(&p),
                |seq| outbox.prev_of(p, seq),
                |after, want| outbox.pending(p, after, want),
            );
            if lane.drained > 0 {
                self.metrics
                    .drained_records_total
                    .fetch_add(lane.drained as u64, Relaxed);
            }
            if let Some(e) = failed {
                self.metrics.outbox_errors_total.fetch_add(1, Relaxed);
                tracing::error!(agent = %self.s.agent, partition = p, error = %e, "outbox read failed; the lane waits for the next round");
            }
            if lane.records.is_empty() {
                continue;
            }
            let with_prev = lane
                .records
                .into_iter()
                .map(|(seq, rec)| (seq, self.outbox.prev_of(p, seq), rec))
                .collect();
            plan.insert(p, with_prev);
        }
        plan
    }

    /// Publishes a lane's records of this round (events in one batch, summaries in batches of
    /// `batch_max_records`, training samples one per message: they are large). If the client
    /// refuses one (its request queue is full, e.g. the link just dropped), the lane's cursor goes
    /// back before this round's records, so a later round sends them again (replays are idempotent
    /// at the owner).
    fn publish_lane(&mut self, client: &AsyncClient, lane: u32, records: Vec<(u64, u64, Record)>) {
        let Some(lowest) = records.first().map(|r| r.0) else {
            return;
        };
        let acked = self.outbox.acked_seq(lane);
        let epoch = self.outbox.epoch();
        let (p, _) = split_lane(lane);
        let seqs: Vec<u64> = records.iter().map(|r| r.0).collect();
        let mut summaries: Vec<Sequenced<WindowSummary>> = Vec::new();
        let mut events: Vec<Sequenced<AnomalyEvent>> = Vec::new();
        let mut samples: Vec<Sequenced<TrainingSample>> = Vec::new();
        for (seq, prev, rec) in records {
            let prev = (prev + 1 != seq).then_some(prev);
            match rec {
                Record::Summary(item) => summaries.push(Sequenced { seq, prev, item }),
                Record::Anomaly(item) => events.push(Sequenced { seq, prev, item }),
                Record::Training(item) => samples.push(Sequenced { seq, prev, item }),
            }
        }
        let mut ok = true;
        for sample in samples {
            if !ok {
                break;
            }
            let batch = Batch {
                agent: self.s.agent.clone(),
                partition: p,
                records: vec![sample],
                acked,
                epoch,
            };
            let topic = self.s.topics.samples(p, &self.s.agent);
            ok = self.publish(client, topic, &batch);
            if ok {
                self.metrics
                    .training_samples_published_total
                    .fetch_add(1, Relaxed);
            }
        }
        if ok && !events.is_empty() {
            let n = events.len() as u64;
            let batch = Batch {
                agent: self.s.agent.clone(),
                partition: p,
                records: events,
                acked,
                epoch,
            };
            let topic = self.s.topics.anomalies(p, &self.s.agent);
            ok = self.publish(client, topic, &batch);
            if ok {
                self.metrics.anomalies_published_total.fetch_add(n, Relaxed);
            }
        }
        let mut rest = summaries;
        while ok && !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(self.s.batch_max.max(1)));
            let n = rest.len() as u64;
            let batch = Batch {
                agent: self.s.agent.clone(),
                partition: p,
                records: rest,
                acked,
                epoch,
            };
            let topic = self.s.topics.summaries(p, &self.s.agent);
            ok = self.publish(client, topic, &batch);
            if ok {
                self.metrics.summaries_published_total.fetch_add(n, Relaxed);
            }
            rest = tail;
        }
        if ok {
            self.watch.published(lane, seqs, Instant::now());
        } else {
            self.sender.rewind(lane, lowest, acked);
        }
    }

    fn publish<T: serde::Serialize>(&self, client: &AsyncClient, topic: String, body: &T) -> bool {
        let payload = match serde_json::to_vec(body) {
            Ok(p) => p,
            Err(e) => {
                // Only non-finite floats could fail here, and the outbox refuses them.
                tracing::error!(%topic, error = %e, "could not encode uplink record");
                self.metrics.publish_errors_total.fetch_add(1, Relaxed);
                return false;
            }
        };
        // Never wait on the client: a full request queue means the link is down or saturated,
        // and the records stay in the outbox for a later round.
        match client.try_publish(topic.clone(), self.s.qos, false, payload) {
            Ok(()) => {
                if self.s.qos != QoS::AtMostOnce {
                    self.sent.fetch_add(1, Relaxed);
                }
                true
            }
            Err(e) => {
                tracing::debug!(%topic, error = %e, "uplink publish not queued; the outbox sends it again");
                self.metrics.publish_errors_total.fetch_add(1, Relaxed);
                false
            }
        }
    }

    /// After the last round: waits for the owners' acks, up to `shutdown_wait`, stopping once none
    /// came for [`SHUTDOWN_STALL`]. Whatever stays unacknowledged stays in the outbox.
    async fn wait_for_acks(
        &mut self,
        notes: &mut mpsc::UnboundedReceiver<LinkNote>,
        client: &AsyncClient,
    ) {
        let deadline = Instant::now() + self.s.shutdown_wait;
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while !self.outbox.is_empty() && Instant::now() < deadline {
            let last = self.last_ack.max(started);
            if last.elapsed() >= SHUTDOWN_STALL {
                break;
            }
            tokio::select! {
                Some(note) = notes.recv() => self.on_note(note),
                _ = tick.tick() => {
                    self.check_timeouts();
                    self.round(client).await;
                }
            }
        }
        let left = self.outbox.records();
        if left > 0 && self.outbox.is_temporary() {
            // Nothing survives this run: the next start has an empty outbox in a new epoch.
            tracing::warn!(agent = %self.s.agent, records = left, readings = self.unacked_readings(),
                "records not yet acknowledged are lost: the outbox is temporary (no state.dir), so nothing is resent after a restart");
        } else if left > 0 {
            tracing::info!(agent = %self.s.agent, records = left, "records not yet acknowledged stay in the outbox and are resent on the next start");
        }
        if let Err(e) = self.outbox.flush() {
            tracing::error!(agent = %self.s.agent, error = %e, "final outbox flush failed");
        }
    }

    /// Readings covered by the summaries still in the outbox (for the shutdown log).
    fn unacked_readings(&self) -> u64 {
        let mut readings = 0u64;
        for p in self.outbox.lanes() {
            if let Ok(records) = self.outbox.pending(p, 0, usize::MAX) {
                for (_, r) in records {
                    if let Record::Summary(s) = r {
                        readings = readings.saturating_add(s.count);
                    }
                }
            }
        }
        readings
    }

    fn update_gauges(&mut self) {
        let outbox = &self.outbox;
        let lanes = self.watch.report(Instant::now(), |p| outbox.len(p) as u64);
        *self.metrics.lanes.lock().unwrap_or_else(|e| e.into_inner()) = lanes;
        let m = &self.metrics;
        let st = self.outbox.stats();
        m.outbox_bytes.store(self.outbox.bytes(), Relaxed);
        m.checkpoint_bytes
            .store(self.outbox.checkpoint_bytes(), Relaxed);
        let records = self.outbox.records();
        m.outbox_records.store(records as u64, Relaxed);
        m.outbox_coarsened_total.store(st.coarsened, Relaxed);
        m.outbox_evicted_total.store(st.evicted, Relaxed);
        m.outbox_evicted_readings_total
            .store(st.evicted_readings, Relaxed);
        m.outbox_over_budget_total.store(st.over_budget, Relaxed);
        m.outbox_acked_total.store(st.acked, Relaxed);
        m.outbox_training_evicted_total
            .store(st.training_evicted, Relaxed);
    }
}

/// `3, 7 (training)`: the partitions of `alerts`, naming training lanes.
fn alert_list(alerts: &[watch::LaneAlert]) -> String {
    alerts
        .iter()
        .map(|a| {
            if a.kind == "main" {
                a.partition.to_string()
            } else {
                format!("{} ({})", a.partition, a.kind)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxConfig;
    use edgewatch_models::wire::Ack;

    fn summary(start_ms: i64) -> Record {
        Record::Summary(WindowSummary {
            device: "d".into(),
            metric: "m".into(),
            start_ms,
            end_ms: start_ms + 10,
            count: 1,
            min: 1.0,
            max: 1.0,
            mean: 1.0,
            std: 0.0,
            first_ts_ms: start_ms,
            last_ts_ms: start_ms,
            max_score: 0.1,
            revision: 0,
        })
    }

    fn uplink() -> Uplink {
        let outbox = Outbox::open_temporary(OutboxConfig {
            max_outbox_bytes: u64::MAX,
            normal_score_below: 0.5,
        })
        .unwrap();
        let s = UplinkSettings {
            agent: "gw".into(),
            topics: Topics::new("p"),
            qos: QoS::AtLeastOnce,
            batch_max: 10,
            max_delay: Duration::from_millis(10),
            ack_timeout: Duration::from_secs(1),
            max_unacked: 100,
            drain_rate: 100.0,
            shutdown_wait: Duration::from_secs(1),
            ack_warn: Duration::from_secs(30),
        };
        Uplink::new(
            s,
            outbox,
            Arc::new(AgentMetrics::default()),
            Arc::new(AtomicU64::new(0)),
        )
    }

    fn acks(acks: &[(u32, u64, u64)]) -> LinkNote {
        LinkNote::Acks(AckBatch {
            owner: "someone".into(),
            acks: acks
                .iter()
                .map(|&(partition, upto_seq, epoch)| Ack {
                    partition,
                    upto_seq,
                    epoch,
                    lane: Default::default(),
                })
                .collect(),
        })
    }

    #[tokio::test]
    async fn acks_of_another_epoch_or_of_unsent_seqs_delete_nothing_and_are_counted() {
        let mut up = uplink();
        for i in 0..5 {
            up.outbox.append(3, summary(i * 10)).unwrap();
        }
        up.outbox.expose(3, 4).unwrap();
        let epoch = up.outbox.epoch();
        up.on_note(acks(&[
            (3, 4, epoch ^ 1),
            (3, 4, 0),
            (3, 5, epoch),
            (3, u64::MAX, epoch),
            (9, 1, epoch),
        ]));
        assert_eq!(up.outbox.len(3), 5, "nothing deleted");
        assert_eq!(AckRefusal::Epoch.count(&up.metrics), 2);
        assert_eq!(AckRefusal::Unsent.count(&up.metrics), 3);
        assert_eq!(up.metrics.outbox_errors_total.load(Relaxed), 0);
        // The real owner's ack still works.
        up.on_note(acks(&[(3, 4, epoch)]));
        assert_eq!(up.outbox.len(3), 1);
        assert_eq!(up.outbox.acked_seq(3), 4);
        assert_eq!(up.metrics.outbox_acked_total.load(Relaxed), 4);
    }

    /// A training sample goes into its partition's training lane, is published on the training
    /// topic, and only an ack naming that lane deletes it.
    #[tokio::test]
    async fn training_samples_have_their_own_lane_and_acks() {
        let mut up = uplink();
        let (client, _eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 100);
        up.on_note(LinkNote::Up);
        let sample = TrainingSample {
            device: "d".into(),
            features: vec!["a".into(), "b".into()],
            from_ms: 0,
            to_ms: 60_000,
            seen: 3,
            anomalies: 0,
            rows: vec![vec![1.0, 2.0], vec![3.0, 4.0]],
        };
        let Record::Summary(summary) = summary(0) else {
            unreachable!()
        };
        up.append(vec![
            Output::Summary {
                partition: 3,
                summary,
            },
            Output::Training {
                partition: 3,
                sample,
            },
        ]);
        assert!(up.round(&client).await);
        assert_eq!(up.metrics.training_samples_published_total.load(Relaxed), 1);
        assert_eq!(up.metrics.summaries_published_total.load(Relaxed), 1);
        let lane = lane_id(3, LaneKind::Training).unwrap();
        assert_eq!((up.outbox.len(3), up.outbox.len(lane)), (1, 1));
        let epoch = up.outbox.epoch();
        // The main lane's ack leaves the sample alone, and the other way round.
        up.on_note(acks(&[(3, 1, epoch)]));
        assert_eq!((up.outbox.len(3), up.outbox.len(lane)), (0, 1));
        let mut training_ack = AckBatch {
            owner: "o".into(),
            acks: vec![Ack {
                partition: 3,
                upto_seq: 1,
                epoch,
                lane: LaneKind::Training,
            }],
        };
        // A partition with the lane bit set is out of range, never an alias of a lane.
        training_ack.acks.push(Ack {
            partition: 3 | LaneKind::TRAINING_BIT,
            upto_seq: 1,
            epoch,
            lane: LaneKind::Main,
        });
        up.on_note(LinkNote::Acks(training_ack));
        assert_eq!(up.outbox.len(lane), 0);
        assert_eq!(AckRefusal::Unsent.count(&up.metrics), 1);
    }

    /// The shell under tokio's paused clock: what the sender decides reaches the client.
    #[tokio::test(start_paused = true)]
    async fn an_unacknowledged_lane_is_resent_from_its_ack_after_the_timeout() {
        let mut up = uplink();
        // Never polled: the client only queues requests, which is all the uplink needs.
        let (client, _eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 100);
        up.on_note(LinkNote::Up);
        let outputs = (0..5)
            .map(|i| match summary(i * 10) {
                Record::Summary(summary) => Output::Summary {
                    partition: 3,
                    summary,
                },
                _ => unreachable!(),
            })
            .collect();
        up.append(outputs);
        assert!(up.round(&client).await);
        let published = || up.metrics.summaries_published_total.load(Relaxed);
        assert_eq!(published(), 5, "live records go out at once");
        tokio::time::advance(Duration::from_millis(900)).await;
        up.check_timeouts();
        assert_eq!(up.metrics.resends_total.load(Relaxed), 0, "not yet due");
        // The 1 s timeout plus at most 25 % jitter has passed.
        tokio::time::advance(Duration::from_millis(400)).await;
        up.check_timeouts();
        assert_eq!(up.metrics.resends_total.load(Relaxed), 1);
        assert!(up.round(&client).await);
        assert_eq!(
            up.metrics.summaries_published_total.load(Relaxed),
            10,
            "the lane went back to its ack (0) and resent all five"
        );
        assert_eq!(up.metrics.drained_records_total.load(Relaxed), 5);
    }
}
