//! The source link task: polls the sensor broker and hands raw publishes to the worker over a
//! bounded queue. It decodes nothing: the poll loop must never wait on slow work.
//!
//! Publishes are handed on in batches: those rumqttc decoded from one socket read are gathered
//! ([`Batch`]) and queued together once the event loop has none left (or [`MAX_BATCH`] are
//! waiting), one queue reservation and one wake-up of the worker per batch instead of per message.
//! The queue still holds single publishes, so `pipeline.queue_capacity` counts messages as before.
//! [`Subscriptions`] holds the filters it subscribes to at every (re)connect; a live reload
//! changes them through the worker, which swaps the topic mappings first.

use crate::config::WhenFull;
use crate::mqtt::{self, Flow, LinkEvent, LinkHandler};
use crate::telemetry::AgentMetrics;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, QoS};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most publishes gathered before they are queued (rumqttc decodes at most 10 per socket read).
pub(crate) const MAX_BATCH: usize = 64;

/// What the source task needs.
pub(crate) struct Source {
    pub eventloop: EventLoop,
    /// The broker addresses, primary first (tried in turn on failure).
    pub addresses: Vec<MqttOptions>,
    pub client: AsyncClient,
    pub subscriptions: Arc<Subscriptions>,
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
            subscriptions,
            msg_tx,
            when_full,
            accepting,
            metrics,
            cancel,
        } = self;
        let max = MAX_BATCH.min(msg_tx.max_capacity()).max(1);
        let handler = Handler {
            client: client.clone(),
            subscriptions,
            msg_tx,
            when_full,
            accepting,
            metrics: metrics.clone(),
            batch: Batch::new(max),
        };
        mqtt::poll_loop(eventloop, addresses, "source", &metrics, cancel, handler).await;
        let _ = client.try_disconnect();
    }
}

/// Publishes gathered from the event loop, in arrival order, until they are handed on.
#[derive(Debug)]
pub(crate) struct Batch {
    items: Vec<rumqttc::Publish>,
    max: usize,
}

impl Batch {
    /// An empty batch handed on at `max` publishes (at least 1).
    pub(crate) fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            items: Vec::with_capacity(max),
            max,
        }
    }

    /// Adds a publish; `true` when the batch is full and must be handed on now.
    pub(crate) fn push(&mut self, p: rumqttc::Publish) -> bool {
        self.items.push(p);
        self.items.len() >= self.max
    }

    /// Publishes waiting.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Takes every waiting publish, in arrival order.
    pub(crate) fn take(&mut self) -> std::vec::Drain<'_, rumqttc::Publish> {
        self.items.drain(..)
    }
}

/// The source's side of the poll loop.
struct Handler {
    client: AsyncClient,
    subscriptions: Arc<Subscriptions>,
    msg_tx: mpsc::Sender<rumqttc::Publish>,
    when_full: WhenFull,
    accepting: Arc<AtomicBool>,
    metrics: Arc<AgentMetrics>,
    batch: Batch,
}

impl Handler {
    /// Queues the batch for the worker under the `when_full` policy; `Flow::Stop` once the worker
    /// is gone (shutdown: the messages are then moot, and unacknowledged ones are redelivered).
    async fn flush(&mut self) -> Flow {
        let n = self.batch.len();
        if n == 0 {
            return Flow::Continue;
        }
        match self.when_full {
            WhenFull::Block => match self.msg_tx.reserve_many(n).await {
                Ok(permits) => {
                    for (permit, p) in permits.zip(self.batch.take()) {
                        permit.send(p);
                    }
                    Flow::Continue
                }
                Err(_) => {
                    self.batch.take();
                    Flow::Stop
                }
            },
            WhenFull::DropNewest => {
                let mut dropped = 0u64;
                for p in self.batch.take() {
                    match self.msg_tx.try_send(p) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                        Err(mpsc::error::TrySendError::Closed(_)) => return Flow::Stop,
                    }
                }
                if dropped > 0 {
                    self.metrics.queue_dropped_total.fetch_add(dropped, Relaxed);
                }
                Flow::Continue
            }
        }
    }
}

impl LinkHandler for Handler {
    async fn on_event(&mut self, event: LinkEvent) -> Flow {
        match event {
            LinkEvent::Connected => {
                self.metrics.source_connected.store(1, Relaxed);
                self.subscriptions.on_connect(&self.client);
                Flow::Continue
            }
            // Stopping in after_checkpoint mode: leave it unacknowledged for the broker to
            // redeliver after the restart.
            LinkEvent::Publish(_) if !self.accepting.load(Relaxed) => Flow::Continue,
            LinkEvent::Publish(p) => {
                if self.batch.push(p) {
                    self.flush().await
                } else {
                    Flow::Continue
                }
            }
            LinkEvent::Disconnected => {
                self.metrics.source_connected.store(0, Relaxed);
                // What arrived before the failure is the worker's, as if queued one by one.
                self.flush().await
            }
            LinkEvent::PubAck => Flow::Continue,
        }
    }

    fn on_drained(&mut self) -> impl Future<Output = Flow> {
        self.flush()
    }

    async fn on_stop(&mut self) {
        self.flush().await;
    }
}

/// The source link's subscription filters: subscribed to at every (re)connect, replaced by a live
/// reload. With a persistent session (`state.dir`) the broker keeps a client's subscriptions across
/// restarts, so the set is also kept in `state.dir/subscriptions.json`: filters a restart with an
/// edited file no longer has are unsubscribed at the first connect.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    qos: QoS,
    /// Where the set is kept (`None`: clean sessions, nothing outlives the process).
    file: Option<PathBuf>,
    inner: Mutex<Filters>,
}

#[derive(Debug, Default)]
struct Filters {
    current: Vec<String>,
    /// Filters of an earlier run's session to unsubscribe from at the next connect.
    stale: Vec<String>,
}

impl Subscriptions {
    /// The set `filters`; with `state_dir`, stale filters of an earlier run are read from there.
    pub(crate) fn new(filters: Vec<String>, qos: QoS, state_dir: Option<&std::path::Path>) -> Self {
        let file = state_dir.map(|d| d.join("subscriptions.json"));
        let earlier: Vec<String> = file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let (_, stale) = diff_filters(&earlier, &filters);
        let s = Self {
            qos,
            file,
            inner: Mutex::new(Filters {
                current: filters,
                stale,
            }),
        };
        s.store();
        s
    }

    /// The filters subscribed to now.
    pub(crate) fn current(&self) -> Vec<String> {
        self.lock().current.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Filters> {
        // The guarded data is two lists replaced whole: a panic cannot leave them half-written.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to the current filters and unsubscribes from an earlier run's stale ones (once).
    fn on_connect(&self, client: &AsyncClient) {
        let (current, stale) = {
            let mut f = self.lock();
            (f.current.clone(), std::mem::take(&mut f.stale))
        };
        for f in &current {
            if let Err(e) = client.try_subscribe(f.clone(), self.qos) {
                tracing::error!(filter = %f, error = %e, "subscribe request failed");
            }
        }
        for f in &stale {
            tracing::info!(filter = %f, "unsubscribing from a filter an earlier run subscribed to (no longer in source.subscriptions)");
            if let Err(e) = client.try_unsubscribe(f.clone()) {
                tracing::error!(filter = %f, error = %e, "unsubscribe request failed");
            }
        }
    }

    /// Replaces the set with `filters`: subscribes to the added ones, then unsubscribes from the
    /// removed ones (the caller has already switched the topic mappings, and keeps the removed
    /// ones' for what is still in flight). Returns (added, removed).
    pub(crate) fn replace(
        &self,
        client: &AsyncClient,
        filters: Vec<String>,
    ) -> (Vec<String>, Vec<String>) {
        let (added, removed) = {
            let mut f = self.lock();
            let d = diff_filters(&f.current, &filters);
            f.current = filters;
            d
        };
        for f in &added {
            if let Err(e) = client.try_subscribe(f.clone(), self.qos) {
                tracing::error!(filter = %f, error = %e, "subscribe request failed");
            }
        }
        for f in &removed {
            if let Err(e) = client.try_unsubscribe(f.clone()) {
                tracing::error!(filter = %f, error = %e, "unsubscribe request failed");
            }
        }
        if !added.is_empty() || !removed.is_empty() {
            self.store();
        }
        (added, removed)
    }

    /// Writes the current set to `state.dir` (a small file, replaced atomically).
    fn store(&self) {
        let Some(file) = &self.file else { return };
        let current = self.current();
        let tmp = file.with_extension("json.tmp");
        let result = serde_json::to_vec(&current)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = result {
            tracing::warn!(file = %file.display(), error = %e, "could not keep the subscription list; a restart with fewer subscriptions may still receive the removed ones until the session expires");
        }
    }
}

/// (added, removed): the filters of `new` not in `old`, and those of `old` not in `new`, each in
/// its list's order.
pub(crate) fn diff_filters(old: &[String], new: &[String]) -> (Vec<String>, Vec<String>) {
    let added = new.iter().filter(|f| !old.contains(f)).cloned().collect();
    let removed = old.iter().filter(|f| !new.contains(f)).cloned().collect();
    (added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(i: u16) -> rumqttc::Publish {
        let mut p = rumqttc::Publish::new(format!("sensors/d{i}/t"), QoS::AtLeastOnce, "1");
        p.pkid = i;
        p
    }

    #[test]
    fn a_batch_keeps_arrival_order_and_says_when_it_is_full() {
        let mut b = Batch::new(3);
        assert!(!b.push(publish(1)));
        assert!(!b.push(publish(2)));
        assert!(b.push(publish(3)), "full at 3");
        let ids: Vec<u16> = b.take().map(|p| p.pkid).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(b.len(), 0);
        // A zero maximum still hands on every publish at once.
        let mut one = Batch::new(0);
        assert!(one.push(publish(4)));
    }

    fn handler(cap: usize, when_full: WhenFull) -> (Handler, mpsc::Receiver<rumqttc::Publish>) {
        let (client, _el) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 10);
        let (tx, rx) = mpsc::channel(cap);
        let h = Handler {
            client,
            subscriptions: Arc::new(Subscriptions::new(
                vec!["sensors/+/+".into()],
                QoS::AtLeastOnce,
                None,
            )),
            msg_tx: tx,
            when_full,
            accepting: Arc::new(AtomicBool::new(true)),
            metrics: Arc::new(AgentMetrics::default()),
            batch: Batch::new(MAX_BATCH.min(cap)),
        };
        (h, rx)
    }

    /// Nothing reaches the worker until the event loop is drained (or the batch is full), then
    /// everything does, in order; a batch never exceeds the queue's capacity.
    #[tokio::test]
    async fn publishes_wait_for_the_drained_loop_then_reach_the_worker_in_order() {
        let (mut h, mut rx) = handler(100, WhenFull::Block);
        for i in 1..=5 {
            assert_eq!(
                h.on_event(LinkEvent::Publish(publish(i))).await,
                Flow::Continue
            );
        }
        assert!(rx.try_recv().is_err(), "queued before the loop was drained");
        assert_eq!(h.on_drained().await, Flow::Continue);
        let got: Vec<u16> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|p| p.pkid)
            .collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        // A full batch goes at once; with a queue of 4, batches hold at most 4.
        let (mut h, mut rx) = handler(4, WhenFull::Block);
        for i in 1..=4 {
            h.on_event(LinkEvent::Publish(publish(i))).await;
        }
        assert_eq!(
            rx.len(),
            4,
            "a full batch is queued without waiting for the drain"
        );
        rx.close();
        // The worker is gone: the loop stops.
        h.on_event(LinkEvent::Publish(publish(9))).await;
        assert_eq!(h.on_drained().await, Flow::Stop);
    }

    /// drop_newest keeps what fits, drops and counts the rest.
    #[tokio::test]
    async fn drop_newest_keeps_what_fits_and_counts_the_rest() {
        let (mut h, mut rx) = handler(3, WhenFull::DropNewest);
        // Two already waiting in the queue.
        h.on_event(LinkEvent::Publish(publish(1))).await;
        h.on_event(LinkEvent::Publish(publish(2))).await;
        h.on_drained().await;
        for i in 3..=5 {
            h.on_event(LinkEvent::Publish(publish(i))).await;
        }
        h.on_drained().await;
        let got: Vec<u16> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|p| p.pkid)
            .collect();
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(h.metrics.queue_dropped_total.load(Relaxed), 2);
    }

    /// A disconnect and the end of the loop hand on what was gathered; after_checkpoint's stop
    /// leaves new publishes out.
    #[tokio::test]
    async fn a_disconnect_or_the_end_hands_on_the_batch_and_a_stop_refuses_new_ones() {
        let (mut h, mut rx) = handler(100, WhenFull::Block);
        h.on_event(LinkEvent::Publish(publish(1))).await;
        h.on_event(LinkEvent::Disconnected).await;
        assert_eq!(rx.try_recv().map(|p| p.pkid).ok(), Some(1));
        h.on_event(LinkEvent::Publish(publish(2))).await;
        h.on_stop().await;
        assert_eq!(rx.try_recv().map(|p| p.pkid).ok(), Some(2));
        h.accepting.store(false, Relaxed);
        h.on_event(LinkEvent::Publish(publish(3))).await;
        h.on_stop().await;
        assert!(rx.try_recv().is_err(), "taken after the stop");
    }

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_diff_names_added_and_removed_filters_in_order() {
        let (a, r) = diff_filters(&v(&["a/+", "b/+", "c/+"]), &v(&["c/+", "d/+", "a/+"]));
        assert_eq!(a, v(&["d/+"]));
        assert_eq!(r, v(&["b/+"]));
        assert_eq!(diff_filters(&v(&["x"]), &v(&["x"])), (vec![], vec![]));
    }

    #[test]
    fn an_earlier_runs_filters_not_subscribed_any_more_are_stale_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = Subscriptions::new(v(&["a/+", "b/+"]), QoS::AtLeastOnce, Some(dir.path()));
        assert!(first.lock().stale.is_empty());
        drop(first);
        // The next run's file drops b/+ and adds c/+: b/+ is stale.
        let second = Subscriptions::new(v(&["a/+", "c/+"]), QoS::AtLeastOnce, Some(dir.path()));
        assert_eq!(second.lock().stale, v(&["b/+"]));
        // The list on disk is the new one, so a third run finds nothing stale.
        let third = Subscriptions::new(v(&["a/+", "c/+"]), QoS::AtLeastOnce, Some(dir.path()));
        assert!(third.lock().stale.is_empty());
        // A corrupt file is ignored (nothing stale), and replaced.
        std::fs::write(dir.path().join("subscriptions.json"), b"{not json").unwrap();
        let fourth = Subscriptions::new(v(&["a/+"]), QoS::AtLeastOnce, Some(dir.path()));
        assert!(fourth.lock().stale.is_empty());
        let kept: Vec<String> =
            serde_json::from_slice(&std::fs::read(dir.path().join("subscriptions.json")).unwrap())
                .unwrap();
        assert_eq!(kept, v(&["a/+"]));
    }

    #[test]
    fn without_a_state_dir_nothing_is_stale_or_written() {
        let s = Subscriptions::new(v(&["a/+"]), QoS::AtMostOnce, None);
        assert!(s.lock().stale.is_empty());
        assert_eq!(s.current(), v(&["a/+"]));
    }
}
