//! The edgewatch gateway agent: subscribes to sensor readings over MQTT, runs windowed anomaly
//! detection per (device, metric), and forwards window summaries and anomaly events upstream.
//!
//! The per-reading work is a plain state machine ([`pipeline::Pipeline`]); this module wires it to two
//! MQTT links (source and uplink) with bounded queues between one task per concern.

pub mod config;
pub mod error;
pub mod ingest;
mod mqtt;
pub mod outbox;
pub mod pipeline;
pub mod telemetry;
mod uplink;

pub use config::AgentConfig;
pub use error::{AgentError, IngestError, SnapshotError};
pub use telemetry::AgentMetrics;

use mqtt::LinkEvent;
use pipeline::Pipeline;
use rumqttc::{AsyncClient, QoS};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A configured agent, ready to run.
pub struct Agent {
    cfg: AgentConfig,
    metrics: Arc<AgentMetrics>,
}

impl Agent {
    /// Validates the configuration (every problem is reported at once).
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(AgentError::Config(problems));
        }
        Ok(Self {
            cfg,
            metrics: Arc::new(AgentMetrics::default()),
        })
    }

    /// Live metrics of this agent.
    pub fn metrics(&self) -> Arc<AgentMetrics> {
        self.metrics.clone()
    }

    /// Runs until `shutdown` resolves, then drains: closes open windows, publishes what is pending
    /// and disconnects cleanly.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let Agent { cfg, metrics } = self;
        let mut pipeline = Pipeline::new(&cfg, metrics.clone())?;
        let filters = pipeline.filters();
        let source_qos = qos(cfg.source.qos);

        let src_opts = mqtt::options(
            &cfg.source.mqtt,
            client_id(&cfg.source.mqtt, &cfg.id, "src"),
        )?;
        let up_link = cfg.uplink_link();
        let up_opts = mqtt::options(up_link, client_id(up_link, &cfg.id, "up"))?;
        // `options` yields at least the primary address; the others are tried in turn on failure.
        let (src_client, mut src_loop) =
            AsyncClient::new(src_opts[0].clone(), cfg.source.mqtt.request_channel);
        let (up_client, mut up_loop) =
            AsyncClient::new(up_opts[0].clone(), up_link.request_channel);
        // Small messages, latency matters: no Nagle delay on either link.
        src_loop.network_options.set_tcp_nodelay(true);
        up_loop.network_options.set_tcp_nodelay(true);

        let (msg_tx, mut msg_rx) = mpsc::channel::<rumqttc::Publish>(cfg.pipeline.queue_capacity);
        let (out_tx, out_rx) = mpsc::channel::<Vec<pipeline::Output>>(64);
        let stop_source = CancellationToken::new();
        let stop_uplink = CancellationToken::new();
        let when_full = cfg.pipeline.when_full;

        tracing::info!(agent = %cfg.id, filters = ?filters, broker = %format!("{}:{}", cfg.source.mqtt.host, cfg.source.mqtt.port), "agent starting");

        // Source link: decode nothing here, only hand off (the poll loop must never wait on slow work).
        let source = {
            let metrics = metrics.clone();
            let cancel = stop_source.clone();
            let client = src_client.clone();
            tokio::spawn(async move {
                mqtt::poll_loop(src_loop, src_opts, "source", &metrics.clone(), cancel, |ev| {
                    let client = client.clone();
                    let filters = filters.clone();
                    let msg_tx = msg_tx.clone();
                    let metrics = metrics.clone();
                    async move {
                        match ev {
                            LinkEvent::Connected => {
                                for f in &filters {
                                    if let Err(e) = client.try_subscribe(f.clone(), source_qos) {
                                        tracing::error!(filter = %f, error = %e, "subscribe request failed");
                                    }
                                }
                            }
                            LinkEvent::Publish(p) => match when_full {
                                config::WhenFull::Block => {
                                    // Closed only during shutdown; the message is then moot.
                                    let _ = msg_tx.send(p).await;
                                }
                                config::WhenFull::DropNewest => {
                                    if msg_tx.try_send(p).is_err() {
                                        metrics.queue_dropped_total.fetch_add(1, Relaxed);
                                    }
                                }
                            },
                            LinkEvent::PubAck => {}
                        }
                    }
                })
                .await;
                let _ = client.try_disconnect();
            })
        };

        // Pipeline: the CPU work, in batches.
        let worker = {
            let agent = cfg.id.clone();
            let metrics_w = metrics.clone();
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(512);
                let mut log = RejectLog::default();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        n = msg_rx.recv_many(&mut batch, 512) => {
                            if n == 0 {
                                break;
                            }
                            metrics_w.queue_depth.store(msg_rx.len() as u64, Relaxed);
                            let now = now_ms();
                            for p in batch.drain(..) {
                                if let Err(e) = pipeline.handle_topic(&p.topic, &p.payload, now) {
                                    log.record(&agent, &p.topic, &e);
                                }
                            }
                        }
                        _ = tick.tick() => pipeline.tick(),
                    }
                    let out = pipeline.take_outputs();
                    if !out.is_empty() && out_tx.send(out).await.is_err() {
                        break;
                    }
                }
                pipeline.flush();
                let out = pipeline.take_outputs();
                if !out.is_empty() {
                    let _ = out_tx.send(out).await;
                }
            })
        };

        // QoS 1 publishes handed to the client vs. acknowledged by the broker: shutdown waits for the
        // two to meet, because closing a socket with unread PubAcks resets it, and a reset connection
        // loses whatever the broker had not read yet.
        let sent = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let uplink_loop = {
            let metrics = metrics.clone();
            let cancel = stop_uplink.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                mqtt::poll_loop(up_loop, up_opts, "uplink", &metrics, cancel, |ev| {
                    if matches!(ev, LinkEvent::PubAck) {
                        acked.fetch_add(1, Relaxed);
                    }
                    async {}
                })
                .await;
            })
        };
        let uplink = tokio::spawn(
            uplink::Uplink::new(&cfg, metrics.clone(), sent.clone()).run(out_rx, up_client.clone()),
        );

        shutdown.await;
        tracing::info!(agent = %cfg.id, "agent stopping: draining open windows and pending publishes");
        stop_source.cancel();
        let _ = source.await;
        let _ = worker.await;
        let _ = uplink.await;
        if cfg.uplink.qos > 0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while acked.load(Relaxed) < sent.load(Relaxed) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let missing = sent.load(Relaxed).saturating_sub(acked.load(Relaxed));
            if missing > 0 {
                tracing::warn!(agent = %cfg.id, missing, "uplink publishes not acknowledged within 10 s of shutdown");
            }
        }
        // Everything is queued in the client; a Disconnect behind it ends the poll loop once written.
        if up_client.disconnect().await.is_err() {
            stop_uplink.cancel();
        }
        if tokio::time::timeout(Duration::from_secs(5), uplink_loop)
            .await
            .is_err()
        {
            tracing::warn!(agent = %cfg.id, "uplink did not flush within 5 s; pending records dropped");
            stop_uplink.cancel();
        }
        tracing::info!(agent = %cfg.id, "agent stopped");
        Ok(())
    }
}

/// Runs an agent with `cfg` until `shutdown` resolves.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    Agent::new(cfg)?.run(shutdown).await
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn client_id(link: &edgewatch_models::link::MqttLink, agent: &str, role: &str) -> String {
    link.client_id.as_ref().map_or_else(
        || format!("edgewatch-{agent}-{role}"),
        |c| format!("{c}-{role}"),
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Logs rejected messages with their topic, at most once per reason every 5 s (plus a count of the
/// suppressed ones), so a misbehaving sensor cannot flood the log. Everything is counted regardless.
#[derive(Default)]
struct RejectLog {
    last: HashMap<&'static str, (Instant, u64)>,
}

impl RejectLog {
    fn record(&mut self, agent: &str, topic: &str, e: &IngestError) {
        let now = Instant::now();
        let entry = self
            .last
            .entry(e.reason())
            .or_insert((now - Duration::from_secs(60), 0));
        if now.duration_since(entry.0) >= Duration::from_secs(5) {
            tracing::warn!(agent, topic = %topic.escape_debug(), reason = e.reason(), error = %e, suppressed = entry.1, "rejected sensor message");
            *entry = (now, 0);
        } else {
            entry.1 += 1;
        }
    }
}
