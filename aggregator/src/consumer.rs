//! The MQTT side of the aggregator: subscribes to its partitions' summaries and to every anomaly
//! topic, decodes batches, and applies them to the state and the feed.
//!
//! The link's shared poll loop ([`edgewatch_link::poll_loop`]: backoff, alternates, refused
//! SUBACKs) only hands messages off; decoding and applying run in their own task behind a bounded
//! queue. Every ConnAck resubscribes.
//!
//! **What is refused.** Anyone who may publish on the uplink topics could forge a batch, so before a
//! record is applied it must fit: its device's partition is its batch's, a summary passes
//! [`WindowSummary::check`] and an event [`AnomalyEvent::check`], and on an owned partition its seq
//! (and its batch's `acked` floor) lies within `state.max_seq_jump` of its lane's progress
//! ([`crate::state::FleetState::check_seq`]). A refused record is counted by reason
//! (`edgewatch_aggregator_records_refused_total`, see [`Refusal`]), logged at most every 5 s per
//! reason, and otherwise ignored: not applied, not published to the feed, not noted in its lane —
//! so the lane is never acknowledged past it, and the sender keeps it.

use crate::state::{Applied, FleetState, LaneId};
use crate::store::StateStore;
use crate::telemetry::Refusal;
use crate::Shared;
use edgewatch_link::{Flow, LinkEvent, LinkHandler};
use edgewatch_models::partition::partition_of;
use edgewatch_models::wire::{
    lane_id, split_lane, Ack, AckBatch, AnomalyEvent, Batch, LaneKind, Topics, TrainingSample,
    UplinkTopic, WindowSummary,
};
use rumqttc::{AsyncClient, EventLoop, QoS, SubscribeFilter, SubscribeReasonCode};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the apply loop receives: messages from the poll loop and, in cluster mode, ownership
/// changes from the coordinator, in one queue so they apply in order.
#[derive(Debug)]
pub(crate) enum Input {
    /// A message from the broker.
    Publish(rumqttc::Publish),
    /// An ownership change (cluster mode only).
    Control(crate::cluster::node::Control),
    /// A device model fitted by the training task: stored, then published (static ownership).
    Fitted(Box<crate::training::StoredModel>),
}

/// Runs the shared MQTT poll loop ([`edgewatch_link::poll_loop`]) until `cancel`; hands publishes
/// to the apply loop through `tx`. At every ConnAck it subscribes to the summaries of every
/// partition owned at that moment and to every anomaly topic.
pub(crate) async fn poll_loop(
    eventloop: EventLoop,
    addresses: Vec<rumqttc::MqttOptions>,
    client: AsyncClient,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Input>,
    cancel: CancellationToken,
) {
    let metrics = shared.metrics.clone();
    let name = format!("aggregator {}", shared.cfg.id);
    let handler = Consumer {
        topics: Topics::new(&shared.cfg.prefix),
        client: client.clone(),
        shared,
        tx,
        subscribed: Vec::new(),
        owner_warnings: Warnings::default(),
    };
    edgewatch_link::poll_loop(eventloop, addresses, &name, &metrics, cancel, handler).await;
    let _ = client.try_disconnect();
}

/// The aggregator's side of its link: subscribes on every connection, forwards publishes.
struct Consumer {
    topics: Topics,
    client: AsyncClient,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Input>,
    /// The filters of the last SUBSCRIBE of the whole set, to name refused ones (partition
    /// changes in cluster mode subscribe one filter at a time).
    subscribed: Vec<SubscribeFilter>,
    /// Rate limit of the warnings about refused owners records.
    owner_warnings: Warnings,
}

impl LinkHandler for Consumer {
    async fn on_event(&mut self, event: LinkEvent) -> Flow {
        match event {
            LinkEvent::Connected => {
                self.subscribed = filters(
                    &self.topics,
                    &self.shared.owned.list(),
                    self.shared.cfg.partitions,
                    self.shared.cluster.is_some(),
                );
                match &self.shared.training {
                    // Cluster mode: the trainer alone takes every training lane.
                    Some(t) if self.shared.cluster.is_some() && t.is_active() => {
                        self.subscribed.push(SubscribeFilter::new(
                            self.topics.all_samples_filter(),
                            crate::cluster::node::PARTITION_QOS,
                        ));
                    }
                    Some(_) if self.shared.cluster.is_some() => {}
                    Some(_) => self.subscribed.extend(training_filters(
                        &self.topics,
                        &self.shared.owned.list(),
                        self.shared.cfg.partitions,
                    )),
                    None => {}
                }
                // Every aggregator's owners record (retained), for the directory.
                self.subscribed.push(SubscribeFilter::new(
                    crate::directory::publish::filter(&self.topics),
                    QoS::AtLeastOnce,
                ));
                // Every agent's status, last (tests count filters in order).
                self.subscribed.push(SubscribeFilter::new(
                    self.topics.status_filter(),
                    QoS::AtLeastOnce,
                ));
                if let Err(e) = self.client.try_subscribe_many(self.subscribed.clone()) {
                    tracing::error!(error = %e, "subscribe request failed");
                }
                Flow::Continue
            }
            // Owners records update the directory here: cheap, and never behind the apply queue.
            LinkEvent::Publish(p)
                if crate::directory::publish::owner_id(&self.topics, &p.topic).is_some() =>
            {
                crate::directory::publish::on_record(
                    &self.shared,
                    &self.topics,
                    &p,
                    &mut self.owner_warnings,
                );
                Flow::Continue
            }
            // Agent status: recorded here, it never waits (see agents.rs).
            LinkEvent::Publish(p) if self.topics.status_agent(&p.topic).is_some() => {
                let agent = self.topics.status_agent(&p.topic).unwrap_or_default();
                self.shared
                    .agents
                    .record(&self.shared.cfg.id, &p.topic, agent, &p.payload);
                Flow::Continue
            }
            LinkEvent::Publish(p) => match self.tx.send(Input::Publish(p)).await {
                Ok(()) => Flow::Continue,
                // The apply loop is gone: the aggregator is stopping.
                Err(_) => Flow::Stop,
            },
            // Nothing here waits for PubAcks; a failed connection is the loop's to retry.
            LinkEvent::PubAck | LinkEvent::Disconnected => Flow::Continue,
        }
    }

    fn refused_filters(&self, codes: &[SubscribeReasonCode]) -> Vec<String> {
        if codes.len() == self.subscribed.len() {
            refused(&self.subscribed, codes)
        } else {
            Vec::new()
        }
    }

    fn backoff_seed(&self) -> u64 {
        u64::from(std::process::id()) ^ 0xA66
    }
}

/// The filters of one SUBSCRIBE that its SUBACK refused (return code 0x80), in order.
fn refused(filters: &[SubscribeFilter], codes: &[SubscribeReasonCode]) -> Vec<String> {
    filters
        .iter()
        .zip(codes)
        .filter(|(_, c)| matches!(c, SubscribeReasonCode::Failure))
        .map(|(f, _)| f.path.clone())
        .collect()
}

/// The subscription filters of an aggregator owning `owned` (each below `partitions`): one per
/// owned partition, or a single wildcard when it owns every partition, then the anomalies.
///
/// One filter for all partitions matters on NATS: each QoS 1 subscription is a JetStream consumer
/// (about half a second each to create on 2.9, while the connection's reads wait), and a session's
/// subscriptions may reserve at most 65,535 unacknowledged messages, 1,024 each by default — so a
/// session holds at most 63 of them and the rest are refused. Summaries of partitions not owned
/// are still counted as misrouted and never applied, whatever the filter lets through.
///
/// In cluster mode (`cluster`) partitions come and go, so each has its own filter at QoS 0 (see
/// [`crate::cluster::node::PARTITION_QOS`]).
pub(crate) fn filters(
    topics: &Topics,
    owned: &[u32],
    partitions: u32,
    cluster: bool,
) -> Vec<SubscribeFilter> {
    let mut f: Vec<SubscribeFilter> = if cluster {
        owned
            .iter()
            .map(|&p| {
                SubscribeFilter::new(
                    topics.summaries_filter(p),
                    crate::cluster::node::PARTITION_QOS,
                )
            })
            .collect()
    } else if owned.len() == partitions as usize {
        vec![SubscribeFilter::new(
            topics.all_summaries_filter(),
            QoS::AtLeastOnce,
        )]
    } else {
        owned
            .iter()
            .map(|&p| SubscribeFilter::new(topics.summaries_filter(p), QoS::AtLeastOnce))
            .collect()
    };
    f.push(SubscribeFilter::new(
        topics.anomalies_filter(),
        QoS::AtLeastOnce,
    ));
    f
}

/// The training lanes' filters of an owner of `owned` (static ownership): one wildcard for all
/// partitions, or one per owned partition.
pub(crate) fn training_filters(
    topics: &Topics,
    owned: &[u32],
    partitions: u32,
) -> Vec<SubscribeFilter> {
    if owned.len() == partitions as usize {
        vec![SubscribeFilter::new(
            topics.all_samples_filter(),
            QoS::AtLeastOnce,
        )]
    } else {
        owned
            .iter()
            .map(|&p| SubscribeFilter::new(topics.samples_filter(p), QoS::AtLeastOnce))
            .collect()
    }
}

/// Lanes applied since the last flush: (agent, lane id, epoch) → highest seq applied. The lane id
/// is the partition, with [`edgewatch_models::wire::LaneKind::TRAINING_BIT`] for a training lane.
pub(crate) type Touched = BTreeMap<(String, u32, u64), u64>;

/// At most one warning per kind every 5 s, counting the ones suppressed in between, so a flood of
/// bad or forged messages cannot flood the log (everything is counted in the metrics regardless).
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    last: HashMap<&'static str, (Instant, u64)>,
}

impl Warnings {
    /// `Some(warnings of this kind suppressed since the last one)` when one may be logged now.
    pub(crate) fn ready(&mut self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        match self.last.get_mut(kind) {
            Some((last, suppressed)) if now.duration_since(*last) < Duration::from_secs(5) => {
                *suppressed += 1;
                None
            }
            Some(entry) => {
                let suppressed = entry.1;
                *entry = (now, 0);
                Some(suppressed)
            }
            None => {
                self.last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

/// Decodes and applies messages until the queue closes. Runs on a blocking thread: the store's
/// writes and flushes block. After each drained batch the store is flushed, and only then — when
/// the store is durable — the touched lanes are acknowledged on `{prefix}/acks/{agent}`.
pub(crate) fn apply_loop(
    mut rx: mpsc::Receiver<Input>,
    shared: Arc<Shared>,
    mut store: Box<dyn StateStore>,
    acks: Option<AsyncClient>,
) {
    let topics = Topics::new(&shared.cfg.prefix);
    let mut warnings = Warnings::default();
    let mut touched = Touched::new();
    let mut batch = Vec::with_capacity(256);
    let fitted = |store: &mut Box<dyn StateStore>, m: Box<crate::training::StoredModel>| {
        if let Some(t) = &shared.training {
            t.fitted(&shared, store.as_mut(), acks.as_ref(), &topics, *m);
        }
    };
    while let Some(first) = rx.blocking_recv() {
        // Static ownership: no coordinator sends controls.
        match first {
            Input::Publish(first) => batch.push(first),
            Input::Fitted(m) => {
                fitted(&mut store, m);
                continue;
            }
            Input::Control(_) => continue,
        }
        // Small rounds: every round ends with a flush and acks, so senders see steady progress.
        while batch.len() < ROUND {
            match rx.try_recv() {
                Ok(Input::Publish(p)) => batch.push(p),
                Ok(Input::Fitted(m)) => fitted(&mut store, m),
                Ok(Input::Control(_)) => {}
                Err(_) => break,
            }
        }
        for p in batch.drain(..) {
            apply_logged(
                &shared,
                &topics,
                &p,
                store.as_mut(),
                &mut touched,
                &mut warnings,
            );
        }
        if touched.is_empty() {
            continue;
        }
        match store.flush() {
            Ok(()) => {
                if let Some(client) = &acks {
                    send_acks(&shared, &topics, client, &touched);
                }
            }
            Err(e) => {
                // Not acknowledged, so the agents resend; nothing is lost by skipping the ack.
                shared.metrics.store_errors_total.fetch_add(1, Relaxed);
                tracing::error!(aggregator = %shared.cfg.id, error = %e, "state store flush failed; not acknowledging");
            }
        }
        touched.clear();
    }
}

/// Messages per apply round: every round ends with a flush (or checkpoint) and acks.
pub(crate) const ROUND: usize = 32;

/// [`apply`], counting and logging (at most every 5 s) a rejected message.
pub(crate) fn apply_logged(
    shared: &Shared,
    topics: &Topics,
    p: &rumqttc::Publish,
    store: &mut dyn StateStore,
    touched: &mut Touched,
    warnings: &mut Warnings,
) {
    if let Err(e) = apply(shared, topics, p, store, touched, warnings) {
        shared.metrics.bad_messages_total.fetch_add(1, Relaxed);
        if let Some(suppressed) = warnings.ready("rejected") {
            tracing::warn!(aggregator = %shared.cfg.id, topic = %p.topic.escape_debug(), error = %e, suppressed, "rejected uplink message");
        }
    }
}

/// Counts `n` records of `lane` refused for `why` and logs it (at most every 5 s per reason).
fn refuse(
    shared: &Shared,
    warnings: &mut Warnings,
    why: Refusal,
    n: u64,
    lane: LaneId<'_>,
    seq: u64,
    detail: &str,
) {
    shared.metrics.refuse(why, n);
    if let Some(suppressed) = warnings.ready(why.label()) {
        tracing::warn!(aggregator = %shared.cfg.id, agent = lane.agent, partition = lane.partition, epoch = lane.epoch,
            seq, records = n, reason = why.label(), detail = %detail.escape_debug(), suppressed,
            "uplink records refused: not applied and not acknowledged (forged, corrupt or misconfigured sender; logged at most every 5 s per reason)");
    }
}

/// Why a record of `lane` with `seq`, for `device`, has no place here: its seq jumps too far
/// above the lane's applied seq, or its device belongs to another partition than the lane's.
fn misplaced(
    state: &FleetState,
    lane: LaneId<'_>,
    seq: u64,
    device: &str,
    partition: u32,
    partitions: u32,
) -> Option<(Refusal, String)> {
    if let Err(why) = state.check_seq(lane, seq) {
        let applied_seq = state.lane_seq(lane).unwrap_or(0);
        return Some((
            why,
            format!("seq too far above the lane's applied seq {applied_seq}"),
        ));
    }
    let owner = partition_of(device, partitions);
    (owner != partition).then(|| {
        (
            Refusal::Partition,
            format!("device {device:?} belongs to partition {owner} of {partitions}"),
        )
    })
}

/// Drops the lanes `state` evicted (see [`FleetState::take_evicted`]) from `store`, counted.
fn drop_evicted(
    shared: &Shared,
    state: &mut FleetState,
    store: &mut dyn StateStore,
) -> Result<(), String> {
    for (agent, partition, epoch) in state.take_evicted() {
        shared.metrics.lanes_evicted_total.fetch_add(1, Relaxed);
        store
            .drop_lane(LaneId::new(&agent, partition, epoch))
            .map_err(|e| {
                shared.metrics.store_errors_total.fetch_add(1, Relaxed);
                format!("state store: {e}")
            })?;
    }
    Ok(())
}

/// Publishes one cumulative [`AckBatch`] per agent for the lanes in `touched`, at QoS 0.
///
/// QoS 1 would buy nothing: the acks are cumulative (the next one covers a lost one), the agent
/// resends a lane whose ack does not come within `uplink.ack_timeout_ms` (the owner re-applies
/// idempotently and acks again), and rumqttc drops unacknowledged publishes on a clean-session
/// reconnect anyway. It would cost latency: the broker's PubAck is a small packet this client
/// never answers, so the kernel delays its TCP ACK (up to 40 ms, longer once inflated), and a
/// broker that leaves Nagle on (rumqttd always, mosquitto by default) holds the next message to
/// this aggregator — an anomaly event on its way to the feed — until that ACK: publish → feed
/// latency was spread evenly over 0–45 ms because of it (`bench --section latency`).
pub(crate) fn send_acks(shared: &Shared, topics: &Topics, client: &AsyncClient, touched: &Touched) {
    let mut by_agent: BTreeMap<&str, Vec<Ack>> = BTreeMap::new();
    for ((agent, lane, epoch), upto_seq) in touched {
        let (partition, lane) = split_lane(*lane);
        by_agent.entry(agent).or_default().push(Ack {
            partition,
            upto_seq: *upto_seq,
            epoch: *epoch,
            lane,
        });
    }
    for (agent, acks) in by_agent {
        let body = AckBatch {
            owner: shared.cfg.id.clone(),
            acks,
        };
        let payload = match serde_json::to_vec(&body) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "could not encode acks");
                continue;
            }
        };
        // A full request queue only delays the ack: the next one is cumulative. QoS 0 (see the
        // function's doc): no PubAck comes back for it, which would hold the next message to this
        // aggregator behind brokers' Nagle delay.
        match client.try_publish(topics.acks(agent), QoS::AtMostOnce, false, payload) {
            Ok(()) => {
                shared.metrics.acks_sent_total.fetch_add(1, Relaxed);
            }
            Err(e) => {
                tracing::warn!(aggregator = %shared.cfg.id, agent, error = %e, "ack not sent; the next one covers it");
            }
        }
    }
}

fn apply(
    shared: &Shared,
    topics: &Topics,
    p: &rumqttc::Publish,
    store: &mut dyn StateStore,
    touched: &mut Touched,
    warnings: &mut Warnings,
) -> Result<(), String> {
    let partitions = shared.cfg.partitions;
    match topics.parse(&p.topic) {
        Some(UplinkTopic::Summaries { partition, agent }) => {
            let batch: Batch<WindowSummary> = serde_json::from_slice(&p.payload)
                .map_err(|e| format!("bad summary batch: {e}"))?;
            if batch.partition != partition || batch.agent != agent {
                return Err(format!(
                    "batch says agent {:?} partition {} but the topic says agent {agent:?} partition {partition}",
                    batch.agent, batch.partition
                ));
            }
            let m = &shared.metrics;
            let n = batch.records.len() as u64;
            m.summaries_received_total.fetch_add(n, Relaxed);
            if !shared.owned.contains(partition) {
                m.misrouted_total.fetch_add(n, Relaxed);
                return Ok(());
            }
            let lane = LaneId::new(agent, partition, batch.epoch);
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(why) = state.note_floor(lane, batch.acked) {
                let detail = format!(
                    "batch floor (acked) {} is too far above the lane's applied seq {}",
                    batch.acked,
                    state.lane_seq(lane).unwrap_or(0)
                );
                refuse(shared, warnings, why, n, lane, batch.acked, &detail);
                return Ok(());
            }
            let mut applied = 0u64;
            let mut fleet_events = Vec::new();
            for r in &batch.records {
                if state.lane_seq(lane).is_some_and(|c| r.seq <= c) {
                    // Already applied and covered by the lane's progress: a resend. Skipping the
                    // store keeps a flood of resends cheap.
                    m.summaries_duplicate_total.fetch_add(1, Relaxed);
                    continue;
                }
                let refused = misplaced(&state, lane, r.seq, &r.item.device, partition, partitions)
                    .or_else(|| r.item.check().err().map(|e| (Refusal::InvalidSummary, e)));
                if let Some((why, detail)) = refused {
                    refuse(shared, warnings, why, 1, lane, r.seq, &detail);
                    continue;
                }
                // The durable copy first: a store error leaves the lane unacknowledged.
                applied += 1;
                store.put_window(partition, &r.item).map_err(|e| {
                    m.store_errors_total.fetch_add(1, Relaxed);
                    format!("state store: {e}")
                })?;
                state.note_seq(lane, r.seq, r.prev_seq());
                let applied_now = state.apply_window(partition, &r.item);
                state.note_agent(&r.item.device, agent);
                match applied_now {
                    Applied::New => {
                        // Only new windows move a profile (a revision cannot be taken back out
                        // of an EWMA).
                        if let Some(f) = &shared.fleet {
                            fleet_events.extend(f.observe(partition, &r.item));
                        }
                        m.summaries_applied_total.fetch_add(1, Relaxed)
                    }
                    Applied::Revised => m.summaries_revised_total.fetch_add(1, Relaxed),
                    Applied::Duplicate | Applied::Expired => {
                        m.summaries_duplicate_total.fetch_add(1, Relaxed)
                    }
                };
            }
            if let Some(f) = &shared.fleet {
                f.publish(shared, fleet_events, |p, e| state.record_anomaly(p, e));
            }
            // Once per batch, not per record: a throughput figure for the heartbeats.
            shared.owned.count_applied(partition, applied);
            drop_evicted(shared, &mut state, store)?;
            if let Some(seq) = state.lane_seq(lane) {
                store.put_lane_seq(lane, seq).map_err(|e| {
                    m.store_errors_total.fetch_add(1, Relaxed);
                    format!("state store: {e}")
                })?;
                touched.insert((agent.to_string(), partition, batch.epoch), seq);
            }
            Ok(())
        }
        Some(UplinkTopic::Anomalies { partition, agent }) => {
            let batch: Batch<AnomalyEvent> = serde_json::from_slice(&p.payload)
                .map_err(|e| format!("bad anomaly batch: {e}"))?;
            if batch.partition != partition || batch.agent != agent {
                return Err(format!(
                    "batch says agent {:?} partition {} but the topic says agent {agent:?} partition {partition}",
                    batch.agent, batch.partition
                ));
            }
            let m = &shared.metrics;
            let lane = LaneId::new(agent, partition, batch.epoch);
            // Every aggregator serves every event on its feed; only the owner keeps the lane.
            let owned = shared.owned.contains(partition);
            if owned {
                let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(why) = state.note_floor(lane, batch.acked) {
                    let n = batch.records.len() as u64;
                    m.anomalies_received_total.fetch_add(n, Relaxed);
                    let detail = format!(
                        "batch floor (acked) {} is too far above the lane's applied seq {}",
                        batch.acked,
                        state.lane_seq(lane).unwrap_or(0)
                    );
                    refuse(shared, warnings, why, n, lane, batch.acked, &detail);
                    return Ok(());
                }
                drop_evicted(shared, &mut state, store)?;
            }
            for r in batch.records {
                m.anomalies_received_total.fetch_add(1, Relaxed);
                let (seq, prev) = (r.seq, r.prev_seq());
                let event = r.item;
                let refused = if let Err(e) = event.check() {
                    Some((Refusal::InvalidEvent, format!("event {}: {e}", event.id)))
                } else if partition_of(&event.device, partitions) != partition {
                    Some((
                        Refusal::Partition,
                        format!(
                            "event {}: device {:?} belongs to partition {} of {partitions}",
                            event.id,
                            event.device,
                            partition_of(&event.device, partitions)
                        ),
                    ))
                } else if owned {
                    let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.check_seq(lane, seq).err().map(|why| {
                        let applied_seq = state.lane_seq(lane).unwrap_or(0);
                        (
                            why,
                            format!("seq too far above the lane's applied seq {applied_seq}"),
                        )
                    })
                } else {
                    None
                };
                if let Some((why, detail)) = refused {
                    refuse(shared, warnings, why, 1, lane, seq, &detail);
                    continue;
                }
                if owned {
                    // Events share the lane's seqs with summaries: the owner's acks must cover both.
                    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.note_seq(lane, seq, prev);
                    if let Some(seq) = state.lane_seq(lane) {
                        store.put_lane_seq(lane, seq).map_err(|e| {
                            m.store_errors_total.fetch_add(1, Relaxed);
                            format!("state store: {e}")
                        })?;
                        touched.insert((agent.to_string(), partition, batch.epoch), seq);
                    }
                }
                let recorded = owned.then(|| event.clone());
                if shared.feed.publish(event) {
                    if let Some(e) = recorded {
                        shared
                            .state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record_anomaly(partition, &e);
                    }
                } else {
                    m.anomalies_duplicate_total.fetch_add(1, Relaxed);
                }
            }
            Ok(())
        }
        Some(UplinkTopic::Samples { partition, agent }) => {
            apply_training(shared, p, partition, agent, store, touched, warnings)
        }
        Some(UplinkTopic::Acks { .. }) | None => Err("not a summaries or anomalies topic".into()),
    }
}

/// A training lane's batch: checked and noted like summaries (seq, floor, the device's partition,
/// [`TrainingSample::check`]), then added to the device's training set and stored. Only on an owner
/// with `training.enabled`; anything else is counted as misrouted and never acknowledged.
fn apply_training(
    shared: &Shared,
    p: &rumqttc::Publish,
    partition: u32,
    agent: &str,
    store: &mut dyn StateStore,
    touched: &mut Touched,
    warnings: &mut Warnings,
) -> Result<(), String> {
    let partitions = shared.cfg.partitions;
    let batch: Batch<TrainingSample> =
        serde_json::from_slice(&p.payload).map_err(|e| format!("bad training batch: {e}"))?;
    if batch.partition != partition || batch.agent != agent {
        return Err(format!(
            "batch says agent {:?} partition {} but the topic says agent {agent:?} partition {partition}",
            batch.agent, batch.partition
        ));
    }
    let m = &shared.metrics;
    let n = batch.records.len() as u64;
    let (Some(training), Some(id)) = (&shared.training, lane_id(partition, LaneKind::Training))
    else {
        m.misrouted_total.fetch_add(n, Relaxed);
        return Ok(());
    };
    // Static ownership: the partition's owner trains its devices. Cluster mode: the trainer
    // (the member holding the trainer lease) trains every device.
    let applies = if shared.cluster.is_some() {
        training.is_active()
    } else {
        shared.owned.contains(partition)
    };
    if !applies {
        m.misrouted_total.fetch_add(n, Relaxed);
        return Ok(());
    }
    let lane = LaneId::new(agent, id, batch.epoch);
    // The state's lock is never held across the store's writes: in cluster mode they wait on the
    // runtime (the KV), whose workers may be waiting for this lock (HTTP handlers).
    let lock = || shared.state.lock().unwrap_or_else(|e| e.into_inner());
    {
        let mut state = lock();
        if let Err(why) = state.note_floor(lane, batch.acked) {
            let detail = format!(
                "batch floor (acked) {} is too far above the lane's applied seq {}",
                batch.acked,
                state.lane_seq(lane).unwrap_or(0)
            );
            drop(state);
            refuse(shared, warnings, why, n, lane, batch.acked, &detail);
            return Ok(());
        }
    }
    for r in batch.records {
        let refused = {
            let state = lock();
            if state.lane_seq(lane).is_some_and(|c| r.seq <= c) {
                continue;
            }
            misplaced(&state, lane, r.seq, &r.item.device, partition, partitions).or_else(|| {
                r.item
                    .check()
                    .err()
                    .map(|e| (Refusal::InvalidSample, format!("training sample: {e}")))
            })
        };
        if let Some((why, detail)) = refused {
            refuse(shared, warnings, why, 1, lane, r.seq, &detail);
            continue;
        }
        let (seq, prev) = (r.seq, r.prev_seq());
        let added = training.add(store, agent, r.item).map_err(|e| {
            m.store_errors_total.fetch_add(1, Relaxed);
            format!("state store: {e}")
        })?;
        if let edgewatch_models::multi::Added::Refused(why) = added {
            // Real but not kept (bounds, another agent's device): acknowledged, never resent.
            if let Some(suppressed) = warnings.ready("training_refused") {
                tracing::warn!(aggregator = %shared.cfg.id, agent = lane.agent, seq, reason = %why.escape_debug(), suppressed,
                    "training sample not kept (counted in edgewatch_training_samples_refused_total; logged at most every 5 s)");
            }
        }
        lock().note_seq(lane, seq, prev);
    }
    let mut state = lock();
    drop_evicted(shared, &mut state, store)?;
    if let Some(seq) = state.lane_seq(lane) {
        store.put_lane_seq(lane, seq).map_err(|e| {
            m.store_errors_total.fetch_add(1, Relaxed);
            format!("state store: {e}")
        })?;
        touched.insert((agent.to_string(), id, batch.epoch), seq);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use edgewatch_models::wire::Sequenced;

    fn paths(f: &[SubscribeFilter]) -> Vec<&str> {
        f.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn an_owner_of_every_partition_subscribes_once_for_all_summaries() {
        let topics = Topics::new("edgewatch/v1");
        let all: Vec<u32> = (0..64).collect();
        let f = filters(&topics, &all, 64, false);
        assert_eq!(
            paths(&f),
            ["edgewatch/v1/summaries/+/+", "edgewatch/v1/anomalies/+/+"]
        );
        assert!(f.iter().all(|f| f.qos == QoS::AtLeastOnce));
        assert_eq!(
            paths(&filters(&topics, &[3, 5], 64, false)),
            [
                "edgewatch/v1/summaries/3/+",
                "edgewatch/v1/summaries/5/+",
                "edgewatch/v1/anomalies/+/+"
            ]
        );
        // 63 of 64 is not all: one filter each.
        let most: Vec<u32> = (1..64).collect();
        assert_eq!(filters(&topics, &most, 64, false).len(), 64);
    }

    #[test]
    fn cluster_members_subscribe_per_partition_at_qos_0_and_anomalies_at_qos_1() {
        let topics = Topics::new("p");
        let all: Vec<u32> = (0..4).collect();
        let f = filters(&topics, &all, 4, true);
        assert_eq!(
            paths(&f),
            [
                "p/summaries/0/+",
                "p/summaries/1/+",
                "p/summaries/2/+",
                "p/summaries/3/+",
                "p/anomalies/+/+"
            ]
        );
        assert!(f[..4].iter().all(|f| f.qos == QoS::AtMostOnce));
        assert_eq!(f[4].qos, QoS::AtLeastOnce);
        assert_eq!(paths(&filters(&topics, &[], 4, true)), ["p/anomalies/+/+"]);
    }

    #[test]
    fn refused_filters_are_named_in_subscribe_order() {
        let topics = Topics::new("p");
        let f = filters(&topics, &[1, 2], 8, false);
        let codes = [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
        ];
        assert_eq!(refused(&f, &codes), ["p/summaries/2/+", "p/anomalies/+/+"]);
        assert!(refused(&f, &codes[..1]).is_empty());
        assert_eq!(edgewatch_link::reconnect::refused(&codes), 2);
        let why = edgewatch_link::reconnect::subscription_refusal_message(
            "127.0.0.1:1885",
            2,
            &refused(&f, &codes),
        );
        assert!(
            why.starts_with("broker 127.0.0.1:1885 refused 2 subscription(s) [\"p/summaries/2/+\""),
            "{why}"
        );
    }

    fn shared() -> Shared {
        let cfg = crate::AggregatorConfig::with_id("agg-t");
        Shared {
            owned: crate::ownership::Ownership::fixed(cfg.partitions, cfg.owned_set()),
            cluster: None,
            state: std::sync::Mutex::new(
                crate::state::FleetState::new(100).with_max_seq_jump(1_000),
            ),
            feed: crate::feed::FeedHub::new(100, 10),
            metrics: Arc::new(crate::AggregatorMetrics::default()),
            started: Instant::now(),
            token: None,
            fleet: None,
            training: Some(crate::training::Training::new(&cfg.training, &[], true)),
            directory: std::sync::Mutex::new(crate::directory::Directory::new(
                &cfg.id,
                cfg.partitions,
                crate::directory::Timing {
                    stale_after_ms: 15_000,
                    startup_grace_ms: 10_000,
                },
                0,
            )),
            advertise: "http://127.0.0.1:1".into(),
            agents: Default::default(),
            cfg,
        }
    }

    fn sample(device: &str, from_ms: i64) -> TrainingSample {
        TrainingSample {
            device: device.into(),
            features: vec!["a".into(), "b".into()],
            from_ms,
            to_ms: from_ms + 60_000,
            seen: 10,
            anomalies: 0,
            rows: (0..10).map(|i| vec![i as f64, 2.0 * i as f64]).collect(),
        }
    }

    /// Training samples are a lane of their own: noted and acknowledged under the training lane
    /// (never the partition's main lane), refused when they cannot be real or belong elsewhere,
    /// and kept in the device's training set.
    #[test]
    fn training_samples_apply_to_their_own_lane_and_bad_ones_are_refused() {
        let shared = shared();
        let topics = Topics::new(&shared.cfg.prefix);
        let mut store = MemoryStore::new(100);
        let mut touched = Touched::new();
        let mut warnings = Warnings::default();
        let device = "pump-7";
        let p = partition_of(device, 64);
        let other = (0..)
            .map(|i| format!("dev-{i}"))
            .find(|d| partition_of(d, 64) != p)
            .unwrap();
        let mut ragged = sample(device, 120_000);
        ragged.rows[4].pop();
        let samples = batch(
            p,
            9,
            0,
            vec![
                (1, sample(device, 0)),
                (2, sample(device, 60_000)),
                (3, sample(&other, 0)),
                (4, ragged),
            ],
        );
        apply(
            &shared,
            &topics,
            &publish(topics.samples(p, "gw"), &samples),
            &mut store,
            &mut touched,
            &mut warnings,
        )
        .unwrap();
        let m = &shared.metrics;
        assert_eq!(m.refused(Refusal::Partition), 1);
        assert_eq!(m.refused(Refusal::InvalidSample), 1);
        let id = lane_id(p, LaneKind::Training).unwrap();
        assert_eq!(touched.get(&("gw".to_string(), id, 9)), Some(&2));
        assert!(!touched.contains_key(&("gw".to_string(), p, 9)));
        let t = shared.training.as_ref().unwrap();
        let doc = t.waiting();
        assert_eq!(doc.len(), 1, "{doc:?}");
        assert_eq!(doc[0]["rows"], 20);
        // The batch on another partition's topic is a mismatch, not applied.
        let err = apply(
            &shared,
            &topics,
            &publish(topics.samples(p + 1, "gw"), &samples),
            &mut store,
            &mut touched,
            &mut warnings,
        )
        .unwrap_err();
        assert!(err.contains("topic says"), "{err}");
    }

    fn window(device: &str, i: i64) -> WindowSummary {
        WindowSummary {
            device: device.into(),
            metric: "m".into(),
            start_ms: i * 1_000,
            end_ms: i * 1_000 + 1_000,
            count: 4,
            min: 1.0,
            max: 2.0,
            mean: 1.5,
            std: 0.5,
            first_ts_ms: i * 1_000,
            last_ts_ms: i * 1_000 + 999,
            max_score: 0.2,
            revision: 0,
        }
    }

    fn publish<T: serde::Serialize>(topic: String, batch: &Batch<T>) -> rumqttc::Publish {
        rumqttc::Publish::new(topic, QoS::AtLeastOnce, serde_json::to_vec(batch).unwrap())
    }

    fn batch<T>(partition: u32, epoch: u64, acked: u64, records: Vec<(u64, T)>) -> Batch<T> {
        Batch {
            agent: "gw".into(),
            partition,
            records: records
                .into_iter()
                .map(|(seq, item)| Sequenced {
                    seq,
                    prev: None,
                    item,
                })
                .collect(),
            acked,
            epoch,
        }
    }

    #[test]
    fn records_that_cannot_be_real_are_refused_counted_and_never_acknowledged() {
        let shared = shared();
        let topics = Topics::new(&shared.cfg.prefix);
        let mut store = MemoryStore::new(100);
        let mut touched = Touched::new();
        let mut warnings = Warnings::default();
        let device = "pump-7";
        let p = partition_of(device, 64);
        let other = (0..)
            .map(|i| format!("dev-{i}"))
            .find(|d| partition_of(d, 64) != p)
            .unwrap();
        let mut empty = window(device, 3);
        empty.count = 0;
        let mut huge = window(device, 4);
        huge.count = u64::MAX;
        let mut run = |publish: rumqttc::Publish| {
            apply(
                &shared,
                &topics,
                &publish,
                &mut store,
                &mut touched,
                &mut warnings,
            )
        };
        let summaries = batch(
            p,
            77,
            0,
            vec![
                (1, window(device, 0)),
                (2, window(&other, 1)),
                (3, empty),
                (4, huge),
                (5, window(device, 5)),
                (u64::MAX, window(device, 6)),
            ],
        );
        run(publish(topics.summaries(p, "gw"), &summaries)).unwrap();
        // A floor that would complete the lane at once: the whole batch is refused.
        let floor = batch(p, 77, u64::MAX - 1, vec![(u64::MAX, window(device, 7))]);
        run(publish(topics.summaries(p, "gw"), &floor)).unwrap();
        let mut event = AnomalyEvent {
            phase: edgewatch_models::wire::EventPhase::Onset,
            model_version: None,
            id: "e1".into(),
            device: device.into(),
            metric: "m".into(),
            ts_ms: 10,
            value: 1.0,
            // JSON cannot carry a NaN (the whole batch would not decode): a score out of range.
            score: 1.5,
            detector: "z".into(),
            window_start_ms: 0,
            agent: "gw".into(),
        };
        let mut misfiled = event.clone();
        misfiled.id = "e2".into();
        misfiled.score = 0.9;
        misfiled.device = other.clone();
        let events = batch(p, 77, 0, vec![(6, event.clone()), (7, misfiled)]);
        run(publish(topics.anomalies(p, "gw"), &events)).unwrap();
        event.id = "e3".into();
        event.score = 0.9;
        let good = batch(p, 77, 0, vec![(2, event)]);
        run(publish(topics.anomalies(p, "gw"), &good)).unwrap();

        let m = &shared.metrics;
        assert_eq!(m.refused(Refusal::Partition), 2);
        assert_eq!(m.refused(Refusal::InvalidSummary), 2);
        assert_eq!(m.refused(Refusal::SeqJump), 2);
        assert_eq!(m.refused(Refusal::InvalidEvent), 1);
        assert_eq!(m.summaries_applied_total.load(Relaxed), 2);
        assert_eq!(m.bad_messages_total.load(Relaxed), 0);
        assert_eq!(
            shared.feed.history_len(),
            1,
            "only the good event reached the feed"
        );
        let state = shared.state.lock().unwrap();
        assert_eq!(state.readings(), 8, "the two good windows only");
        assert!(state.device(&other).is_none());
        // Seqs 1 and 2 (the good event) are in; 3 was refused, so the lane waits there.
        let lane = LaneId::new("gw", p, 77);
        assert_eq!(state.lane_seq(lane), Some(2));
        assert_eq!(touched.get(&("gw".to_string(), p, 77)), Some(&2));
        assert_eq!(
            store.lane_seqs().unwrap(),
            vec![("gw".to_string(), p, 77, 2)]
        );
    }
}
