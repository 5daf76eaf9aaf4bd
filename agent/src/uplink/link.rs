//! The uplink link task: polls the uplink broker, counts the broker's PubAcks (shutdown waits for
//! them), resubscribes to the acks topic on every connect, and passes link state and decoded
//! owner acks to the uplink thread as [`LinkNote`]s. With `models.enabled` it also subscribes to
//! `{prefix}/models/#` and hands each model message to the pipeline worker ([`ModelMessage`]).

use super::LinkNote;
use crate::mqtt::{self, LinkEvent};
use crate::telemetry::ModelRefusal;
use crate::telemetry::{AgentMetrics, LogLimit};
use edgewatch_models::wire::{AckBatch, Topics};
use rumqttc::{AsyncClient, EventLoop, MqttOptions, QoS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A message received on a models topic, for the pipeline worker.
#[derive(Debug)]
pub(crate) struct ModelMessage {
    /// The topic's key (`{prefix}/models/{key}`).
    pub key: String,
    /// The model JSON.
    pub payload: bytes::Bytes,
}

/// Where model messages come from and go to.
pub(crate) struct ModelsFeed {
    pub topics: Topics,
    /// To the worker. Bounded: models are rare; when it is full the message is counted
    /// (`busy`) and dropped, and the broker delivers the retained model again on the next connect.
    pub tx: mpsc::Sender<ModelMessage>,
}

/// What the uplink link task needs.
pub(crate) struct UplinkLink {
    pub agent: String,
    pub eventloop: EventLoop,
    /// The broker addresses, primary first (tried in turn on failure).
    pub addresses: Vec<MqttOptions>,
    pub client: AsyncClient,
    /// `{prefix}/acks/{agent}`.
    pub acks_topic: String,
    /// To the uplink thread. Unbounded on purpose: the poll loop must never wait for the uplink
    /// thread (which blocks on sled flushes), or the broker's PubAcks and the owners' acks would
    /// stop being read; and an Up/Down note may not be dropped. Each note is one MQTT message
    /// the poll loop already read, so it grows only as fast as the link delivers.
    pub notes: mpsc::UnboundedSender<LinkNote>,
    /// Models to subscribe to (`models.enabled`).
    pub models: Option<ModelsFeed>,
    /// QoS 1 publishes handed to the client (by the uplink) and acknowledged by the broker (here).
    pub sent: Arc<AtomicU64>,
    pub acked: Arc<AtomicU64>,
    pub metrics: Arc<AgentMetrics>,
    /// The status board: told to publish at once on every connect, and of lost connections.
    pub board: Arc<crate::beacon::Board>,
    /// `{prefix}/config/{agent}` and where its messages go, when remote configuration is taken.
    pub config: Option<(String, mpsc::Sender<crate::control::Request>)>,
    pub cancel: CancellationToken,
}

impl UplinkLink {
    /// Runs the poll loop until it is cancelled or the client disconnects.
    pub(crate) async fn run(self) {
        let UplinkLink {
            agent,
            eventloop,
            addresses,
            client,
            acks_topic,
            notes,
            models,
            sent,
            acked,
            metrics,
            board,
            config,
            cancel,
        } = self;
        // Anyone may publish on the acks topic: a flood of garbage is counted, not logged.
        let mut bad_acks = LogLimit::every(Duration::from_secs(10));
        let mut busy = LogLimit::every(Duration::from_secs(10));
        mqtt::poll_loop(eventloop, addresses, "uplink", &metrics, cancel, |ev| {
            match ev {
                LinkEvent::PubAck => {
                    acked.fetch_add(1, Relaxed);
                }
                LinkEvent::Connected => {
                    // Publishes of the previous connection will never be acknowledged
                    // (rumqttc drops them with a clean session); the outbox resends them.
                    acked.store(sent.load(Relaxed), Relaxed);
                    if let Err(e) = client.try_subscribe(acks_topic.clone(), QoS::AtLeastOnce) {
                        tracing::error!(topic = %acks_topic, error = %e, "subscribe request failed");
                    }
                    if let Some(m) = &models {
                        for filter in m.topics.models_filters(&agent) {
                            if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                                tracing::error!(topic = %filter, error = %e, "subscribe request failed");
                            }
                        }
                    }
                    if let Some((topic, _)) = &config {
                        if let Err(e) = client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                            tracing::error!(topic = %topic, error = %e, "subscribe request failed");
                        }
                    }
                    // The status says online again at once (the last will may have said otherwise).
                    board.now.notify_one();
                    let _ = notes.send(LinkNote::Up);
                }
                LinkEvent::Disconnected => {
                    board.error("uplink connection lost (reconnecting)");
                    let _ = notes.send(LinkNote::Down);
                }
                LinkEvent::Publish(p) if config.as_ref().is_some_and(|(t, _)| *t == p.topic) => {
                    if let Some((_, tx)) = &config {
                        if tx.try_send(crate::control::Request::Remote(p.payload)).is_err() {
                            tracing::warn!(agent = %agent, topic = %p.topic, "remote configuration dropped: earlier changes are still being applied; it is applied at the next connect (retained)");
                        }
                    }
                }
                LinkEvent::Publish(p) if models.as_ref().is_some_and(|m| m.topics.models_key(&p.topic).is_some()) => {
                    if let Some(m) = &models {
                        let key = m.topics.models_key(&p.topic).unwrap_or_default().to_string();
                        if p.payload.is_empty() {
                            // A retained model being cleared: nothing to run.
                            tracing::debug!(agent = %agent, topic = %p.topic, "empty model message ignored");
                        } else if m.tx.try_send(ModelMessage { key, payload: p.payload }).is_err() {
                            metrics.refuse_model(ModelRefusal::Busy);
                            if let Some(suppressed) = busy.ready() {
                                tracing::warn!(agent = %agent, topic = %p.topic, suppressed, "model message dropped: the pipeline has not taken the previous ones (counted in edgewatch_agent_models_refused_total, reason busy)");
                            }
                        }
                    }
                }
                LinkEvent::Publish(p) => match serde_json::from_slice::<AckBatch>(&p.payload) {
                    Ok(batch) => {
                        let _ = notes.send(LinkNote::Acks(batch));
                    }
                    Err(e) => {
                        metrics.bad_acks_total.fetch_add(1, Relaxed);
                        if let Some(suppressed) = bad_acks.ready() {
                            tracing::warn!(agent = %agent, topic = %p.topic, error = %e, suppressed, "malformed ack message ignored (logged at most every 10 s; all counted in edgewatch_agent_bad_acks_total)");
                        }
                    }
                },
            }
            async {}
        })
        .await;
    }
}
