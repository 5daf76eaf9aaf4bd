//! The source link task: polls the sensor broker and hands each raw publish to the worker over a
//! bounded queue. It decodes nothing: the poll loop must never wait on slow work.
//! [`Subscriptions`] holds the filters it subscribes to at every (re)connect; a live reload
//! changes them through the worker, which swaps the topic mappings first.

use crate::config::WhenFull;
use crate::mqtt::{self, LinkEvent};
use crate::telemetry::AgentMetrics;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, QoS};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
        let m = metrics.clone();
        mqtt::poll_loop(eventloop, addresses, "source", &m, cancel, |ev| {
            let client = client.clone();
            let subscriptions = subscriptions.clone();
            let msg_tx = msg_tx.clone();
            let metrics = metrics.clone();
            let accepting = accepting.clone();
            async move {
                match ev {
                    LinkEvent::Connected => {
                        metrics.source_connected.store(1, Relaxed);
                        subscriptions.on_connect(&client);
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
