//! The MQTT side of the aggregator: subscribes to its partitions' summaries and to every anomaly
//! topic, decodes batches, and applies them to the state and the feed.
//!
//! The poll loop only hands messages off; decoding and applying run in their own task behind a
//! bounded queue. Reconnects back off exponentially with jitter and resubscribe on every ConnAck.

use crate::state::Applied;
use crate::Shared;
use edgewatch_models::backoff::Backoff;
use edgewatch_models::wire::{AnomalyEvent, Batch, Topics, UplinkTopic, WindowSummary};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeFilter};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Runs the MQTT poll loop until `cancel`; hands publishes to [`apply_loop`] through `tx`.
pub(crate) async fn poll_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<SubscribeFilter>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<rumqttc::Publish>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(100, 10_000, u64::from(std::process::id()) ^ 0xA66);
    let broker = format!("{}:{}", shared.cfg.mqtt.host, shared.cfg.mqtt.port);
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if backoff.attempts() > 0 {
                    tracing::info!(aggregator = %shared.cfg.id, %broker, "reconnected");
                }
                backoff.reset();
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(error = %e, "subscribe request failed");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                shared.metrics.connection_errors_total.fetch_add(1, Relaxed);
                let delay = backoff.next_delay_ms();
                tracing::warn!(aggregator = %shared.cfg.id, %broker, error = %e, retry_in_ms = delay, "mqtt connection error; will reconnect");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
}

/// The subscription filters of an aggregator owning `owned`.
pub(crate) fn filters(
    topics: &Topics,
    owned: impl IntoIterator<Item = u32>,
) -> Vec<SubscribeFilter> {
    let mut f: Vec<SubscribeFilter> = owned
        .into_iter()
        .map(|p| SubscribeFilter::new(topics.summaries_filter(p), QoS::AtLeastOnce))
        .collect();
    f.push(SubscribeFilter::new(
        topics.anomalies_filter(),
        QoS::AtLeastOnce,
    ));
    f
}

/// Decodes and applies messages until the queue closes.
pub(crate) async fn apply_loop(mut rx: mpsc::Receiver<rumqttc::Publish>, shared: Arc<Shared>) {
    let topics = Topics::new(&shared.cfg.prefix);
    let mut last_warn = Instant::now() - Duration::from_secs(60);
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        for p in batch.drain(..) {
            if let Err(e) = apply(&shared, &topics, &p) {
                shared.metrics.bad_messages_total.fetch_add(1, Relaxed);
                if last_warn.elapsed() >= Duration::from_secs(5) {
                    last_warn = Instant::now();
                    tracing::warn!(aggregator = %shared.cfg.id, topic = %p.topic, error = %e, "rejected uplink message");
                }
            }
        }
    }
}

fn apply(shared: &Shared, topics: &Topics, p: &rumqttc::Publish) -> Result<(), String> {
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
            m.summaries_received_total
                .fetch_add(batch.records.len() as u64, Relaxed);
            if !shared.owned.contains(&partition) {
                m.misrouted_total
                    .fetch_add(batch.records.len() as u64, Relaxed);
                return Ok(());
            }
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            for r in &batch.records {
                match state.apply_summary(agent, partition, r.seq, &r.item) {
                    Applied::New => m.summaries_applied_total.fetch_add(1, Relaxed),
                    Applied::Revised => m.summaries_revised_total.fetch_add(1, Relaxed),
                    Applied::Duplicate | Applied::Expired => {
                        m.summaries_duplicate_total.fetch_add(1, Relaxed)
                    }
                };
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
            for r in batch.records {
                shared
                    .metrics
                    .anomalies_received_total
                    .fetch_add(1, Relaxed);
                let event = r.item;
                if !event.score.is_finite() {
                    return Err(format!("event {} has a non-finite score", event.id));
                }
                let owned = shared.owned.contains(&partition);
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
                    shared
                        .metrics
                        .anomalies_duplicate_total
                        .fetch_add(1, Relaxed);
                }
            }
            Ok(())
        }
        Some(UplinkTopic::Acks { .. }) | None => Err("not a summaries or anomalies topic".into()),
    }
}
