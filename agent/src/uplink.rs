//! Shipping pipeline outputs to the cloud broker: anomaly events at once, summaries batched per
//! partition lane, every record numbered with its lane's seq.
//!
//! Durability (outbox, acks, resend) is not here yet: a record handed to the MQTT client is
//! considered sent. The lane seqs are already on the wire so aggregators can spot gaps.

use crate::pipeline::Output;
use crate::telemetry::AgentMetrics;
use edgewatch_models::wire::{AnomalyEvent, Batch, Sequenced, Topics, WindowSummary};
use rumqttc::{AsyncClient, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Batching and numbering state of the uplink.
pub(crate) struct Uplink {
    agent: String,
    topics: Topics,
    qos: QoS,
    batch_max: usize,
    max_delay: Duration,
    next_seq: HashMap<u32, u64>,
    pending: HashMap<u32, (Instant, Vec<Sequenced<WindowSummary>>)>,
    metrics: Arc<AgentMetrics>,
    /// Publishes handed to the client (QoS 1: each one will be acknowledged).
    sent: Arc<AtomicU64>,
}

impl Uplink {
    pub(crate) fn new(
        cfg: &crate::AgentConfig,
        metrics: Arc<AgentMetrics>,
        sent: Arc<AtomicU64>,
    ) -> Self {
        Self {
            agent: cfg.id.clone(),
            topics: Topics::new(&cfg.uplink.prefix),
            qos: if cfg.uplink.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            batch_max: cfg.uplink.batch_max_records,
            max_delay: Duration::from_millis(cfg.uplink.batch_max_delay_ms),
            next_seq: HashMap::new(),
            pending: HashMap::new(),
            metrics,
            sent,
        }
    }

    fn seq(&mut self, partition: u32) -> u64 {
        let s = self.next_seq.entry(partition).or_insert(1);
        let seq = *s;
        *s += 1;
        seq
    }

    /// Runs until `rx` closes, then flushes every pending batch.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Vec<Output>>, client: AsyncClient) {
        let mut tick = tokio::time::interval(self.max_delay.max(Duration::from_millis(10)) / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = rx.recv() => match batch {
                    Some(outputs) => {
                        for o in outputs {
                            self.accept(o, &client).await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.flush_due(&client, false).await,
            }
        }
        self.flush_due(&client, true).await;
    }

    async fn accept(&mut self, output: Output, client: &AsyncClient) {
        match output {
            Output::Anomaly { partition, event } => {
                let seq = self.seq(partition);
                let batch: Batch<AnomalyEvent> = Batch {
                    agent: self.agent.clone(),
                    partition,
                    records: vec![Sequenced { seq, item: event }],
                };
                let topic = self.topics.anomalies(partition, &self.agent);
                if self.publish(client, topic, &batch).await {
                    self.metrics.anomalies_published_total.fetch_add(1, Relaxed);
                }
            }
            Output::Summary { partition, summary } => {
                let seq = self.seq(partition);
                let full = {
                    let (_, records) = self
                        .pending
                        .entry(partition)
                        .or_insert_with(|| (Instant::now(), Vec::new()));
                    records.push(Sequenced { seq, item: summary });
                    records.len() >= self.batch_max
                };
                if full {
                    self.send_lane(client, partition).await;
                }
            }
        }
    }

    async fn flush_due(&mut self, client: &AsyncClient, all: bool) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, (since, r))| {
                !r.is_empty() && (all || now.duration_since(*since) >= self.max_delay)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            self.send_lane(client, p).await;
        }
    }

    async fn send_lane(&mut self, client: &AsyncClient, partition: u32) {
        let Some((_, records)) = self.pending.remove(&partition) else {
            return;
        };
        let n = records.len() as u64;
        let batch = Batch {
            agent: self.agent.clone(),
            partition,
            records,
        };
        let topic = self.topics.summaries(partition, &self.agent);
        if self.publish(client, topic, &batch).await {
            self.metrics.summaries_published_total.fetch_add(n, Relaxed);
        }
    }

    async fn publish<T: serde::Serialize>(
        &self,
        client: &AsyncClient,
        topic: String,
        body: &T,
    ) -> bool {
        let payload = match serde_json::to_vec(body) {
            Ok(p) => p,
            Err(e) => {
                // Only non-finite floats could fail here, and the pipeline never produces them.
                tracing::error!(%topic, error = %e, "could not encode uplink record");
                self.metrics.publish_errors_total.fetch_add(1, Relaxed);
                return false;
            }
        };
        match client
            .publish(topic.clone(), self.qos, false, payload)
            .await
        {
            Ok(()) => {
                self.sent.fetch_add(1, Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(%topic, error = %e, "uplink publish failed");
                self.metrics.publish_errors_total.fetch_add(1, Relaxed);
                false
            }
        }
    }
}
