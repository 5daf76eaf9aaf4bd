//! The agent's retained status on `{prefix}/status/{agent}` (remote node management): published on
//! the uplink connection every `status.interval_ms` and at once after every (re)connect, with an
//! MQTT last will that marks the agent offline when its connection dies, and an offline message on
//! a clean stop. [`Board`] holds what the status reports besides the counters (configuration
//! outcome, latest error); [`compose`] builds a message from two samples, without I/O.

use crate::config::AgentConfig;
use crate::status::{Sample, StatusLine};
use crate::telemetry::AgentMetrics;
use edgewatch_models::agent_status::{clip, AgentStatus, ConfigReport};
use edgewatch_models::wire::Topics;
use rumqttc::{AsyncClient, LastWill, QoS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// What the status says besides the counters; written by the configuration control and by the
/// tasks that meet errors, read by the publisher. A `std` mutex: never held across an `.await`.
#[derive(Debug, Default)]
pub(crate) struct Board {
    inner: Mutex<BoardState>,
    /// Publish now (a configuration change, a reconnect) instead of at the next tick.
    pub(crate) now: Notify,
}

#[derive(Debug, Default, Clone)]
struct BoardState {
    digest: String,
    config: ConfigReport,
    last_error: Option<String>,
}

impl Board {
    pub(crate) fn new(digest: String, config: ConfigReport) -> Self {
        Self {
            inner: Mutex::new(BoardState {
                digest,
                config,
                last_error: None,
            }),
            now: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BoardState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration in force changed (or a change was refused): report it at once.
    pub(crate) fn set_config(&self, digest: String, report: ConfigReport) {
        {
            let mut s = self.state();
            s.digest = digest;
            s.config = report;
        }
        self.now.notify_one();
    }

    /// Remembers the latest error worth an operator's attention.
    pub(crate) fn error(&self, what: impl Into<String>) {
        let mut text = what.into();
        clip(&mut text);
        self.state().last_error = Some(text);
    }

    pub(crate) fn digest(&self) -> String {
        self.state().digest.clone()
    }

    /// Whether the latest configuration change was refused.
    pub(crate) fn refused(&self) -> bool {
        self.state().config.refused.is_some()
    }
}

/// The MQTT last will of the uplink connection: the offline record, retained.
pub(crate) fn last_will(topics: &Topics, agent: &str) -> LastWill {
    LastWill::new(
        topics.status(agent),
        offline_payload(agent),
        QoS::AtLeastOnce,
        true,
    )
}

fn offline_payload(agent: &str) -> Vec<u8> {
    serde_json::to_vec(&AgentStatus::offline(agent)).unwrap_or_default()
}

/// The times a status message reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Times {
    /// Since the previous sample.
    pub elapsed: Duration,
    /// Since the agent started.
    pub uptime: Duration,
    /// `status.interval_ms` in force.
    pub interval_ms: u64,
    /// The agent's clock, ms since the Unix epoch.
    pub updated_ms: i64,
}

/// The status message for the period from `prev` to `now`.
pub(crate) fn compose(
    agent: &str,
    board: &Board,
    prev: &Sample,
    now: &Sample,
    t: Times,
) -> AgentStatus {
    let (uptime, interval_ms, updated_ms) = (t.uptime, t.interval_ms, t.updated_ms);
    let line = StatusLine::between(prev, now, t.elapsed);
    let s = board.state().clone();
    AgentStatus {
        agent: agent.into(),
        online: true,
        version: Some(env!("CARGO_PKG_VERSION").into()),
        config_digest: Some(s.digest),
        uptime_s: Some(uptime.as_secs()),
        series: Some(now.series),
        readings_per_s: Some((line.readings_per_sec * 10.0).round() / 10.0),
        outbox_bytes: Some(now.outbox_bytes),
        oldest_unacked_age_ms: Some(now.oldest_unacked.as_millis() as u64),
        last_error: s.last_error,
        config: Some(s.config),
        interval_ms: Some(interval_ms),
        updated_ms: Some(updated_ms),
    }
}

/// What the publisher needs.
pub(crate) struct Beacon {
    pub agent: String,
    pub topics: Topics,
    pub client: AsyncClient,
    pub metrics: Arc<AgentMetrics>,
    pub board: Arc<Board>,
    /// The configuration in force (for `status.interval_ms`).
    pub cfg: watch::Receiver<Arc<AgentConfig>>,
    /// QoS 1 publishes handed to the client: the agent's shutdown waits for their PubAcks.
    pub sent: Arc<AtomicU64>,
    pub cancel: CancellationToken,
}

impl Beacon {
    /// Publishes the status until cancelled (the offline message of a clean stop is the caller's,
    /// see [`publish_offline`]).
    pub(crate) async fn run(self) {
        let started = tokio::time::Instant::now();
        let mut prev = Sample::of(&self.metrics);
        let mut at = started;
        loop {
            let interval_ms = self.cfg.borrow().status.interval_ms;
            if interval_ms > 0 {
                let now = Sample::of(&self.metrics);
                let t = tokio::time::Instant::now();
                let status = compose(
                    &self.agent,
                    &self.board,
                    &prev,
                    &now,
                    Times {
                        elapsed: t.duration_since(at),
                        uptime: t.duration_since(started),
                        interval_ms,
                        updated_ms: crate::now_ms(),
                    },
                );
                self.publish(&status);
                prev = now;
                at = t;
            }
            // 0 turns the status off until a reload turns it on again.
            let wait = Duration::from_millis(if interval_ms == 0 { 1_000 } else { interval_ms });
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.board.now.notified() => {}
            }
        }
    }

    fn publish(&self, status: &AgentStatus) {
        // While the link is down nothing is queued: the reconnect publishes a fresh status at once.
        if self.metrics.uplink_connected.load(Relaxed) != 1 {
            return;
        }
        let Ok(payload) = serde_json::to_vec(status) else {
            return;
        };
        self.sent.fetch_add(1, Relaxed);
        if let Err(e) = self.client.try_publish(
            self.topics.status(&self.agent),
            QoS::AtLeastOnce,
            true,
            payload,
        ) {
            // The request channel is full (the link is down or slow): the next tick retries.
            self.sent.fetch_sub(1, Relaxed);
            tracing::debug!(agent = %self.agent, error = %e, "status not published");
        }
    }
}

/// Publishes the offline record (retained), for a clean stop: a DISCONNECT discards the last will.
/// Only while connected (else the shutdown would wait for its PubAck in vain; the broker then
/// publishes the will when it notices the connection gone).
pub(crate) fn publish_offline(
    client: &AsyncClient,
    topics: &Topics,
    agent: &str,
    sent: &AtomicU64,
    connected: bool,
) {
    if !connected {
        return;
    }
    sent.fetch_add(1, Relaxed);
    if client
        .try_publish(
            topics.status(agent),
            QoS::AtLeastOnce,
            true,
            offline_payload(agent),
        )
        .is_err()
    {
        sent.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewatch_models::agent_status::ConfigRefusal;

    #[test]
    fn a_status_carries_counters_rates_and_the_board() {
        let board = Board::new(
            "00000000000000ab".into(),
            ConfigReport {
                source: Some("file".into()),
                applied: Some("00000000000000ab".into()),
                ..ConfigReport::default()
            },
        );
        board.error("uplink connection lost");
        let prev = Sample {
            readings: 100,
            ..Sample::default()
        };
        let now = Sample {
            readings: 600,
            series: 12,
            outbox_bytes: 4096,
            oldest_unacked: Duration::from_millis(1500),
            ..Sample::default()
        };
        let s = compose(
            "gw-1",
            &board,
            &prev,
            &now,
            Times {
                elapsed: Duration::from_secs(5),
                uptime: Duration::from_secs(61),
                interval_ms: 5000,
                updated_ms: 1_700_000_000_000,
            },
        );
        assert!(s.online);
        assert_eq!(s.readings_per_s, Some(100.0));
        assert_eq!(s.series, Some(12));
        assert_eq!(s.outbox_bytes, Some(4096));
        assert_eq!(s.oldest_unacked_age_ms, Some(1500));
        assert_eq!(s.uptime_s, Some(61));
        assert_eq!(s.config_digest.as_deref(), Some("00000000000000ab"));
        assert_eq!(s.last_error.as_deref(), Some("uplink connection lost"));
        // What goes on the wire is what an aggregator accepts.
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(AgentStatus::parse("gw-1", &json).unwrap(), s);
    }

    #[test]
    fn a_refused_change_replaces_the_report_and_keeps_the_digest_given() {
        let board = Board::new("a".into(), ConfigReport::default());
        board.set_config(
            "a".into(),
            ConfigReport {
                refused: Some(ConfigRefusal {
                    error: "bad".into(),
                    line: Some(3),
                }),
                ..ConfigReport::default()
            },
        );
        assert_eq!(board.digest(), "a");
        let s = compose(
            "gw",
            &board,
            &Sample::default(),
            &Sample::default(),
            Times {
                elapsed: Duration::ZERO,
                uptime: Duration::ZERO,
                interval_ms: 1,
                updated_ms: 0,
            },
        );
        assert_eq!(s.config.unwrap().refused.unwrap().line, Some(3));
    }

    #[test]
    fn the_last_will_is_the_retained_offline_record() {
        let will = last_will(&Topics::new("edgewatch/v1"), "gw-1");
        assert_eq!(will.topic, "edgewatch/v1/status/gw-1");
        assert!(will.retain);
        assert_eq!(&will.message[..], br#"{"agent":"gw-1","online":false}"#);
    }
}
