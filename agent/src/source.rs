//! The source link task: polls the sensor broker and hands each raw publish to the worker over a
//! bounded queue. It decodes nothing: the poll loop must never wait on slow work.

use crate::config::WhenFull;
use crate::mqtt::{self, LinkEvent};
use crate::telemetry::AgentMetrics;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, QoS};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the source task needs.
pub(crate) struct Source {
    pub eventloop: EventLoop,
    /// The broker addresses, primary first (tried in turn on failure).
    pub addresses: Vec<MqttOptions>,
    pub client: AsyncClient,
    pub filters: Vec<String>,
    pub qos: QoS,
    /// The worker's queue.
    pub msg_tx: mpsc::Sender<rumqttc::Publish>,
    pub when_full: WhenFull,
    /// Cleared when stopping in after_checkpoint mode: what arrives then is left unacknowledged.
    pub accepting: Arc<AtomicBool>,
    pub metrics: Arc<AgentMetrics>,
    pub cancel: CancellationToken,
}

impl Source {
    /// Runs the poll loop until it is cancelled or disconnected, then disconnects the client.
    pub(crate) async fn run(self) {
        let Source {
            eventloop,
            addresses,
            client,
            filters,
            qos,
            msg_tx,
            when_full,
            accepting,
            metrics,
            cancel,
        } = self;
        let m = metrics.clone();
        mqtt::poll_loop(eventloop, addresses, "source", &m, cancel, |ev| {
            let client = client.clone();
            let filters = filters.clone();
            let msg_tx = msg_tx.clone();
            let metrics = metrics.clone();
            let accepting = accepting.clone();
            async move {
                match ev {
                    LinkEvent::Connected => {
                        metrics.source_connected.store(1, Relaxed);
                        for f in &filters {
                            if let Err(e) = client.try_subscribe(f.clone(), qos) {
                                tracing::error!(filter = %f, error = %e, "subscribe request failed");
                            }
                        }
                    }
                    // Stopping in after_checkpoint mode: leave it unacknowledged for the
                    // broker to redeliver after the restart.
                    LinkEvent::Publish(_) if !accepting.load(Relaxed) => {}
                    LinkEvent::Publish(p) => match when_full {
                        WhenFull::Block => {
                            // Closed only during shutdown; the message is then moot.
                            let _ = msg_tx.send(p).await;
                        }
                        WhenFull::DropNewest => {
                            if msg_tx.try_send(p).is_err() {
                                metrics.queue_dropped_total.fetch_add(1, Relaxed);
                            }
                        }
                    },
                    LinkEvent::Disconnected => metrics.source_connected.store(0, Relaxed),
                    LinkEvent::PubAck => {}
                }
            }
        })
        .await;
        let _ = client.try_disconnect();
    }
}
