//! The live anomaly feed hub: dedupes events by id, keeps a bounded recent history for
//! `?since=<event id>` resumption, and fans out to every client through a bounded broadcast.
//!
//! History and broadcast are updated under one lock, and subscribers snapshot the history under the
//! same lock, so a client resuming sees every event exactly once: no gap, no double.

use edgewatch_models::wire::AnomalyEvent;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// One feed event, pre-serialised once for every client.
#[derive(Debug)]
pub struct FeedItem {
    /// The event.
    pub event: AnomalyEvent,
    /// Its JSON text, as sent on the socket.
    pub json: String,
}

/// Per-client filters from the query string.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeedFilter {
    /// Only this device.
    pub device: Option<String>,
    /// Only this metric.
    pub metric: Option<String>,
    /// Only events scoring at least this.
    pub min_score: Option<f64>,
    /// Resume after this event id.
    pub since: Option<String>,
    /// Without `since`: start with up to this many of the most recent events.
    pub last: Option<usize>,
}

impl FeedFilter {
    /// Parses `device=..&metric=..&min_score=..&since=..` (percent-decoded); unknown keys are errors.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut f = Self::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| format!("{k}: bad percent-encoding"))?;
            match k {
                "device" => f.device = Some(v),
                "metric" => f.metric = Some(v),
                "min_score" => {
                    let s: f64 = v
                        .parse()
                        .map_err(|_| format!("min_score: not a number: {v:?}"))?;
                    if !(0.0..=1.0).contains(&s) {
                        return Err(format!("min_score: must be in [0, 1], got {s}"));
                    }
                    f.min_score = Some(s);
                }
                "since" => f.since = Some(v),
                "last" => {
                    f.last = Some(v.parse().map_err(|_| format!("last: not a count: {v:?}"))?);
                }
                // Credentials, checked (and a ticket redeemed) before the filter is parsed.
                "ticket" | "token" => {}
                other => {
                    return Err(format!(
                        "unknown query parameter {other:?} (device, metric, min_score, since, last)"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// Whether `e` passes the filter.
    pub fn matches(&self, e: &AnomalyEvent) -> bool {
        self.device.as_deref().is_none_or(|d| d == e.device)
            && self.metric.as_deref().is_none_or(|m| m == e.metric)
            && self.min_score.is_none_or(|s| e.score >= s)
    }
}

/// Decodes `%XX` and `+` in a query value; `None` on malformed escapes or non-UTF-8 results.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

struct Inner {
    history: VecDeque<Arc<FeedItem>>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
}

/// The hub shared by the consumer (publisher) and every WebSocket client.
pub struct FeedHub {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<FeedItem>>,
    history: usize,
    dedupe: usize,
}

impl FeedHub {
    /// A hub keeping `history` events for resumption; each client may fall `client_queue` behind.
    pub fn new(history: usize, client_queue: usize) -> Self {
        let (tx, _) = broadcast::channel(client_queue.max(1));
        Self {
            inner: Mutex::new(Inner {
                history: VecDeque::new(),
                seen: HashSet::new(),
                seen_order: VecDeque::new(),
            }),
            tx,
            history,
            // Remember more ids than we keep events, so replays long after still dedupe.
            dedupe: (history * 4).max(10_000),
        }
    }

    /// Publishes `e` unless its id was seen recently; returns whether it was new.
    pub fn publish(&self, e: AnomalyEvent) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.seen.contains(&e.id) {
            return false;
        }
        inner.seen.insert(e.id.clone());
        inner.seen_order.push_back(e.id.clone());
        while inner.seen_order.len() > self.dedupe {
            if let Some(old) = inner.seen_order.pop_front() {
                inner.seen.remove(&old);
            }
        }
        let json = serde_json::to_string(&e).unwrap_or_default();
        let item = Arc::new(FeedItem { event: e, json });
        if self.history > 0 {
            inner.history.push_back(item.clone());
            while inner.history.len() > self.history {
                inner.history.pop_front();
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(item);
        true
    }

    /// Subscribes: the backlog after `since` (or nothing when `since` is absent or unknown, flagged in
    /// the returned bool) and a live receiver starting right after it.
    pub fn subscribe(
        &self,
        since: Option<&str>,
        last: Option<usize>,
    ) -> (Vec<Arc<FeedItem>>, bool, broadcast::Receiver<Arc<FeedItem>>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let (backlog, found) = match since {
            None => {
                let n = last.unwrap_or(0).min(inner.history.len());
                let skip = inner.history.len() - n;
                (inner.history.iter().skip(skip).cloned().collect(), true)
            }
            Some(id) => match inner.history.iter().position(|i| i.event.id == id) {
                Some(pos) => (inner.history.iter().skip(pos + 1).cloned().collect(), true),
                None => (inner.history.iter().cloned().collect(), false),
            },
        };
        (backlog, found, rx)
    }

    /// Up to `n` most recent events of `device` in the history, oldest first.
    pub fn recent_of(&self, device: &str, n: usize) -> Vec<AnomalyEvent> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<AnomalyEvent> = inner
            .history
            .iter()
            .rev()
            .filter(|i| i.event.device == device)
            .take(n)
            .map(|i| i.event.clone())
            .collect();
        out.reverse();
        out
    }

    /// The id of the oldest event held, if any.
    pub fn oldest_id(&self) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.history.front().map(|i| i.event.id.clone())
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Events in the history buffer.
    pub fn history_len(&self) -> usize {
        self.inner.lock().map(|i| i.history.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, device: &str, score: f64) -> AnomalyEvent {
        AnomalyEvent {
            phase: edgewatch_models::wire::EventPhase::Onset,
            model_version: None,
            id: id.into(),
            device: device.into(),
            metric: "t".into(),
            ts_ms: 1,
            value: 1.0,
            score,
            detector: "z".into(),
            window_start_ms: 0,
            agent: "a".into(),
        }
    }

    #[test]
    fn duplicate_ids_are_published_once() {
        let hub = FeedHub::new(10, 10);
        let (_, _, mut rx) = hub.subscribe(None, None);
        assert!(hub.publish(event("1", "d", 0.9)));
        assert!(!hub.publish(event("1", "d", 0.9)));
        assert_eq!(rx.try_recv().unwrap().event.id, "1");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn since_resumes_right_after_the_given_event() {
        let hub = FeedHub::new(10, 10);
        for i in 0..5 {
            hub.publish(event(&i.to_string(), "d", 0.9));
        }
        let (backlog, found, _) = hub.subscribe(Some("2"), None);
        assert!(found);
        assert_eq!(
            backlog
                .iter()
                .map(|i| i.event.id.as_str())
                .collect::<Vec<_>>(),
            vec!["3", "4"]
        );
        let (backlog, found, _) = hub.subscribe(Some("unknown"), None);
        assert!(!found);
        assert_eq!(backlog.len(), 5);
        let (backlog, _, _) = hub.subscribe(None, Some(2));
        assert_eq!(
            backlog
                .iter()
                .map(|i| i.event.id.as_str())
                .collect::<Vec<_>>(),
            vec!["3", "4"]
        );
        assert!(
            hub.subscribe(None, None).0.is_empty(),
            "a plain client starts live"
        );
    }

    #[test]
    fn a_devices_recent_events_come_newest_last_and_bounded() {
        let hub = FeedHub::new(100, 10);
        for i in 0..10 {
            hub.publish(event(
                &i.to_string(),
                if i % 2 == 0 { "a" } else { "b" },
                0.9,
            ));
        }
        let ids: Vec<String> = hub.recent_of("a", 3).into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["4", "6", "8"]);
        assert!(hub.recent_of("nobody", 3).is_empty());
        assert_eq!(hub.oldest_id().as_deref(), Some("0"));
    }

    #[test]
    fn filters_parse_and_match() {
        let f = FeedFilter::parse(Some("device=pump%2F7&min_score=0.5")).unwrap();
        assert_eq!(f.device.as_deref(), Some("pump/7"));
        assert!(f.matches(&event("1", "pump/7", 0.6)));
        assert!(!f.matches(&event("1", "pump/7", 0.4)));
        assert!(!f.matches(&event("1", "other", 0.9)));
        assert!(FeedFilter::parse(Some("min_score=2"))
            .unwrap_err()
            .contains("[0, 1]"));
        assert!(FeedFilter::parse(Some("colour=red"))
            .unwrap_err()
            .contains("colour"));
        assert!(FeedFilter::parse(Some("device=%zz")).is_err());
        assert_eq!(
            FeedFilter::parse(Some("ticket=abc&last=5")).unwrap().last,
            Some(5),
            "a ticket is not a filter"
        );
    }
}
