//! The agent's metrics, defined once: lock-free counters read by the status line and `/metrics`.

use crate::error::IngestError;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Counters and gauges of one agent.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Messages received from the source broker.
    pub messages_total: AtomicU64,
    /// Readings decoded and processed.
    pub readings_total: AtomicU64,
    /// Messages rejected, by [`IngestError::REASONS`] index.
    pub rejected: [AtomicU64; IngestError::REASONS.len()],
    /// Readings whose window had already closed (not merged).
    pub late_readings_total: AtomicU64,
    /// Readings merged into a window already sent (late, but within `allowed_lateness_ms`); the
    /// window is sent again, at revision 1, when it closes.
    pub corrections_total: AtomicU64,
    /// Messages dropped because the pipeline queue was full (`when_full: drop_newest`).
    pub queue_dropped_total: AtomicU64,
    /// Window summaries handed to the uplink, corrected revisions included.
    pub windows_total: AtomicU64,
    /// Anomaly events raised (onsets, silences included).
    pub anomalies_total: AtomicU64,
    /// Series that went silent (`silence` events).
    pub silences_total: AtomicU64,
    /// Summary records published.
    pub summaries_published_total: AtomicU64,
    /// Anomaly events published.
    pub anomalies_published_total: AtomicU64,
    /// Publishes the MQTT client could not queue (request queue full, link down): sent again from the outbox.
    pub publish_errors_total: AtomicU64,
    /// Connection errors on either link (each followed by a backoff and reconnect).
    pub connection_errors_total: AtomicU64,
    /// Series currently tracked.
    pub series: AtomicU64,
    /// Arrival time minus event time of the latest reading, ms.
    pub event_lag_ms: AtomicI64,
    /// Messages waiting in the queue between the MQTT poll loop and the pipeline.
    pub queue_depth: AtomicU64,
    /// Whether the uplink is connected (1) or not (0).
    pub uplink_connected: AtomicU64,
    /// Records stored in the outbox, waiting for their owner's ack.
    pub outbox_records: AtomicU64,
    /// Bytes stored in the outbox.
    pub outbox_bytes: AtomicU64,
    /// Outbox records acknowledged by their owners (and removed).
    pub outbox_acked_total: AtomicU64,
    /// Summaries merged into coarser ones to fit the disk budget.
    pub outbox_coarsened_total: AtomicU64,
    /// Summaries evicted to fit the disk budget.
    pub outbox_evicted_total: AtomicU64,
    /// Readings covered by the evicted summaries.
    pub outbox_evicted_readings_total: AtomicU64,
    /// Appends after which anomaly events alone kept the outbox over its budget.
    pub outbox_over_budget_total: AtomicU64,
    /// Outbox flushes (one per round, never per record).
    pub outbox_flushes_total: AtomicU64,
    /// Outbox operations that failed (disk errors); logged.
    pub outbox_errors_total: AtomicU64,
    /// Ack messages received from owners.
    pub acks_received_total: AtomicU64,
    /// Go-back-N resends of a lane (after an ack timeout, or a reconnect with records in flight).
    pub resends_total: AtomicU64,
    /// Backlog records published by the paced drain.
    pub drained_records_total: AtomicU64,
    /// Pipeline checkpoints stored.
    pub checkpoints_total: AtomicU64,
    /// Series rows written by checkpoints (only series that changed since the previous one).
    pub checkpoint_rows_total: AtomicU64,
    /// Bytes of the stored checkpoint (counted in the outbox's disk budget).
    pub checkpoint_bytes: AtomicU64,
    /// MQTT packets larger than `max_packet_bytes`, read once and dropped instead of wedging the
    /// session (the broker would redeliver them forever).
    pub oversized_packets_total: AtomicU64,
    /// Messages on the acks topic that could not be decoded (ignored).
    pub bad_acks_total: AtomicU64,
    /// Pipeline snapshots that failed (the previous checkpoint stays).
    pub checkpoint_errors_total: AtomicU64,
    /// After a crash in `on_receipt` mode: estimated readings lost since the last checkpoint.
    pub restart_loss_estimate: AtomicU64,
    /// after_checkpoint: redelivered readings the restored checkpoint already held (skipped).
    pub replays_skipped_total: AtomicU64,
    /// Acks refused (nothing deleted for them), by [`AckRefusal`]:
    /// `edgewatch_agent_acks_refused_total{reason}`.
    pub acks_refused: [AtomicU64; AckRefusal::ALL.len()],
    /// Multivariate models accepted and swapped in (from the uplink broker or from disk at start).
    pub models_loaded_total: AtomicU64,
    /// Multivariate models refused, by [`ModelRefusal`]: `edgewatch_agent_models_refused_total{reason}`.
    pub models_refused: [AtomicU64; ModelRefusal::ALL.len()],
    /// Multivariate models running now (one per device at most).
    pub models: AtomicU64,
    /// Training samples (one device, one period) handed to the outbox's training lanes.
    pub training_samples_total: AtomicU64,
    /// Training sample messages published.
    pub training_samples_published_total: AtomicU64,
    /// Training samples deleted from the outbox unsent (over their share of the budget, or to make room).
    pub outbox_training_evicted_total: AtomicU64,
}

/// Why the agent refused a multivariate model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRefusal {
    /// Not a model: not JSON, or not the shape of a `PcaModel`.
    Payload,
    /// A model whose numbers or shapes are wrong (`PcaModel::validate`: NaN, lengths, limits).
    Invalid,
    /// The topic's key is not the key of the device the model names.
    Key,
    /// Not newer than the version running for that device.
    Version,
    /// A feature that is not one of the device's metrics.
    Features,
    /// Too many models arrived at once for the pipeline to take (sent again by the broker on the
    /// next connect, since models are retained).
    Busy,
}

impl ModelRefusal {
    /// Every reason, in metric order.
    pub const ALL: [ModelRefusal; 6] = [
        ModelRefusal::Payload,
        ModelRefusal::Invalid,
        ModelRefusal::Key,
        ModelRefusal::Version,
        ModelRefusal::Features,
        ModelRefusal::Busy,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            ModelRefusal::Payload => "payload",
            ModelRefusal::Invalid => "invalid",
            ModelRefusal::Key => "key",
            ModelRefusal::Version => "version",
            ModelRefusal::Features => "features",
            ModelRefusal::Busy => "busy",
        }
    }

    /// Refused models of this reason so far.
    pub fn count(self, m: &AgentMetrics) -> u64 {
        m.models_refused[self as usize].load(Relaxed)
    }
}

/// Why the uplink refused an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckRefusal {
    /// For another lane epoch than this outbox's (a previous run without `state.dir`, or forged).
    Epoch,
    /// Above the highest seq of the lane ever sent: nobody can have received those records.
    Unsent,
}

impl AckRefusal {
    /// Every reason, in metric order.
    pub const ALL: [AckRefusal; 2] = [AckRefusal::Epoch, AckRefusal::Unsent];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            AckRefusal::Epoch => "epoch",
            AckRefusal::Unsent => "unsent",
        }
    }

    /// Refused acks of this reason so far.
    pub fn count(self, m: &AgentMetrics) -> u64 {
        m.acks_refused[self as usize].load(Relaxed)
    }
}

impl AgentMetrics {
    /// Counts one refused ack.
    pub fn refuse_ack(&self, why: AckRefusal) {
        self.acks_refused[why as usize].fetch_add(1, Relaxed);
    }

    /// Counts one refused model.
    pub fn refuse_model(&self, why: ModelRefusal) {
        self.models_refused[why as usize].fetch_add(1, Relaxed);
    }

    fn render_models(&self, agent: &str, out: &mut String) {
        let _ = writeln!(
            out,
            "# TYPE edgewatch_agent_models_loaded_total counter\nedgewatch_agent_models_loaded_total{{agent=\"{agent}\"}} {}",
            self.models_loaded_total.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE edgewatch_agent_models gauge\nedgewatch_agent_models{{agent=\"{agent}\"}} {}",
            self.models.load(Relaxed)
        );
        let _ = writeln!(out, "# TYPE edgewatch_agent_models_refused_total counter");
        for why in ModelRefusal::ALL {
            let _ = writeln!(
                out,
                "edgewatch_agent_models_refused_total{{agent=\"{agent}\",reason=\"{}\"}} {}",
                why.label(),
                why.count(self)
            );
        }
    }

    fn render_ack_refusals(&self, agent: &str, out: &mut String) {
        let _ = writeln!(out, "# TYPE edgewatch_agent_acks_refused_total counter");
        for why in AckRefusal::ALL {
            let _ = writeln!(
                out,
                "edgewatch_agent_acks_refused_total{{agent=\"{agent}\",reason=\"{}\"}} {}",
                why.label(),
                why.count(self)
            );
        }
    }
}

impl AgentMetrics {
    /// Counts one rejected message.
    pub fn reject(&self, e: &IngestError) {
        if let Some(i) = IngestError::REASONS.iter().position(|r| *r == e.reason()) {
            self.rejected[i].fetch_add(1, Relaxed);
        }
    }

    /// Rejected messages of one reason.
    pub fn rejected(&self, reason: &str) -> u64 {
        IngestError::REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.rejected[i].load(Relaxed))
    }

    /// Rejected messages by reason, `reason=count` for each reason seen, comma-separated (for the
    /// stop log line); `none` when nothing was rejected.
    pub fn rejected_summary(&self) -> String {
        let parts: Vec<String> = IngestError::REASONS
            .iter()
            .zip(&self.rejected)
            .filter_map(|(r, c)| {
                let n = c.load(Relaxed);
                (n > 0).then(|| format!("{r}={n}"))
            })
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(",")
        }
    }

    /// All rejected messages.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Prometheus text exposition, every series labelled with `agent`.
    pub fn render(&self, agent: &str, out: &mut String) {
        let counters = [
            ("edgewatch_agent_messages_total", &self.messages_total),
            ("edgewatch_agent_readings_total", &self.readings_total),
            (
                "edgewatch_agent_late_readings_total",
                &self.late_readings_total,
            ),
            ("edgewatch_agent_corrections_total", &self.corrections_total),
            (
                "edgewatch_agent_queue_dropped_total",
                &self.queue_dropped_total,
            ),
            ("edgewatch_agent_windows_total", &self.windows_total),
            ("edgewatch_agent_anomalies_total", &self.anomalies_total),
            ("edgewatch_agent_silences_total", &self.silences_total),
            (
                "edgewatch_agent_summaries_published_total",
                &self.summaries_published_total,
            ),
            (
                "edgewatch_agent_anomalies_published_total",
                &self.anomalies_published_total,
            ),
            (
                "edgewatch_agent_publish_errors_total",
                &self.publish_errors_total,
            ),
            (
                "edgewatch_agent_connection_errors_total",
                &self.connection_errors_total,
            ),
            (
                "edgewatch_agent_outbox_acked_total",
                &self.outbox_acked_total,
            ),
            (
                "edgewatch_agent_outbox_coarsened_total",
                &self.outbox_coarsened_total,
            ),
            (
                "edgewatch_agent_training_samples_total",
                &self.training_samples_total,
            ),
            (
                "edgewatch_agent_training_samples_published_total",
                &self.training_samples_published_total,
            ),
            (
                "edgewatch_agent_outbox_training_evicted_total",
                &self.outbox_training_evicted_total,
            ),
            (
                "edgewatch_agent_outbox_evicted_total",
                &self.outbox_evicted_total,
            ),
            (
                "edgewatch_agent_outbox_evicted_readings_total",
                &self.outbox_evicted_readings_total,
            ),
            (
                "edgewatch_agent_outbox_over_budget_total",
                &self.outbox_over_budget_total,
            ),
            (
                "edgewatch_agent_outbox_flushes_total",
                &self.outbox_flushes_total,
            ),
            (
                "edgewatch_agent_outbox_errors_total",
                &self.outbox_errors_total,
            ),
            (
                "edgewatch_agent_acks_received_total",
                &self.acks_received_total,
            ),
            ("edgewatch_agent_resends_total", &self.resends_total),
            (
                "edgewatch_agent_drained_records_total",
                &self.drained_records_total,
            ),
            ("edgewatch_agent_checkpoints_total", &self.checkpoints_total),
            (
                "edgewatch_agent_checkpoint_rows_total",
                &self.checkpoint_rows_total,
            ),
            (
                "edgewatch_agent_oversized_packets_total",
                &self.oversized_packets_total,
            ),
            ("edgewatch_agent_bad_acks_total", &self.bad_acks_total),
            (
                "edgewatch_agent_replays_skipped_total",
                &self.replays_skipped_total,
            ),
            (
                "edgewatch_agent_checkpoint_errors_total",
                &self.checkpoint_errors_total,
            ),
        ];
        for (name, c) in counters {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name}{{agent=\"{agent}\"}} {}",
                c.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE edgewatch_agent_rejected_total counter");
        for (i, reason) in IngestError::REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "edgewatch_agent_rejected_total{{agent=\"{agent}\",reason=\"{reason}\"}} {}",
                self.rejected[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE edgewatch_agent_series gauge\nedgewatch_agent_series{{agent=\"{agent}\"}} {}",
            self.series.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE edgewatch_agent_queue_depth gauge\nedgewatch_agent_queue_depth{{agent=\"{agent}\"}} {}",
            self.queue_depth.load(Relaxed)
        );
        for (name, g) in [
            ("edgewatch_agent_uplink_connected", &self.uplink_connected),
            ("edgewatch_agent_outbox_records", &self.outbox_records),
            ("edgewatch_agent_outbox_bytes", &self.outbox_bytes),
            ("edgewatch_agent_checkpoint_bytes", &self.checkpoint_bytes),
            (
                "edgewatch_agent_restart_loss_estimate",
                &self.restart_loss_estimate,
            ),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} gauge\n{name}{{agent=\"{agent}\"}} {}",
                g.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE edgewatch_agent_event_lag_ms gauge\nedgewatch_agent_event_lag_ms{{agent=\"{agent}\"}} {}",
            self.event_lag_ms.load(Relaxed)
        );
        self.render_ack_refusals(agent, out);
        self.render_models(agent, out);
    }
}

/// At most one log line per period, counting the ones suppressed in between: a flood of bad input
/// must not flood the log (everything is counted regardless).
pub(crate) struct LogLimit {
    period: Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub(crate) fn every(period: Duration) -> Self {
        Self {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(events suppressed since the last line)` when a line may be logged now, else `None`
    /// (and the event is counted as suppressed).
    pub(crate) fn ready(&mut self) -> Option<u64> {
        self.ready_for(1)
    }

    /// [`LogLimit::ready`] for a line that stands for `events` events.
    pub(crate) fn ready_for(&mut self, events: u64) -> Option<u64> {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.period)
        {
            self.suppressed += events;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The MQTT links count their failures here.
impl edgewatch_link::LinkCounters for AgentMetrics {
    fn connection_error(&self) {
        self.connection_errors_total.fetch_add(1, Relaxed);
    }
    fn oversized_packet(&self) {
        self.oversized_packets_total.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn the_log_limit_lets_one_line_through_per_period_and_counts_the_rest() {
        let mut limit = super::LogLimit::every(Duration::from_secs(3600));
        assert_eq!(limit.ready(), Some(0));
        assert_eq!(limit.ready(), None);
        assert_eq!(limit.ready_for(5), None);
        limit.last = Some(std::time::Instant::now() - Duration::from_secs(3601));
        assert_eq!(
            limit.ready(),
            Some(6),
            "one suppressed line, then one standing for five"
        );
    }

    use super::*;

    #[test]
    fn rejections_are_counted_by_reason_and_rendered() {
        let m = AgentMetrics::default();
        m.reject(&IngestError::EmptyPayload);
        m.reject(&IngestError::EmptyPayload);
        m.reject(&IngestError::TopicMismatch);
        assert_eq!(m.rejected("empty_payload"), 2);
        assert_eq!(m.rejected_total(), 3);
        let mut text = String::new();
        m.render("gw", &mut text);
        assert!(
            text.contains(r#"edgewatch_agent_rejected_total{agent="gw",reason="empty_payload"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn refused_acks_are_counted_by_reason_and_rendered() {
        let m = AgentMetrics::default();
        m.refuse_ack(AckRefusal::Unsent);
        m.refuse_ack(AckRefusal::Unsent);
        m.refuse_ack(AckRefusal::Epoch);
        assert_eq!(AckRefusal::Unsent.count(&m), 2);
        let mut text = String::new();
        m.render("gw", &mut text);
        assert!(
            text.contains(r#"edgewatch_agent_acks_refused_total{agent="gw",reason="unsent"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"edgewatch_agent_acks_refused_total{agent="gw",reason="epoch"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn model_counters_are_rendered() {
        let m = AgentMetrics::default();
        m.refuse_model(ModelRefusal::Version);
        m.refuse_model(ModelRefusal::Version);
        m.refuse_model(ModelRefusal::Features);
        m.models_loaded_total.fetch_add(3, Relaxed);
        m.models.store(2, Relaxed);
        assert_eq!(ModelRefusal::Version.count(&m), 2);
        let mut text = String::new();
        m.render("gw", &mut text);
        for line in [
            r#"edgewatch_agent_models_refused_total{agent="gw",reason="version"} 2"#,
            r#"edgewatch_agent_models_refused_total{agent="gw",reason="features"} 1"#,
            r#"edgewatch_agent_models_refused_total{agent="gw",reason="payload"} 0"#,
            r#"edgewatch_agent_models_loaded_total{agent="gw"} 3"#,
            "# TYPE edgewatch_agent_models gauge\nedgewatch_agent_models{agent=\"gw\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }

    #[test]
    fn corrections_are_rendered() {
        let m = AgentMetrics::default();
        m.corrections_total.fetch_add(3, Relaxed);
        let mut text = String::new();
        m.render("gw", &mut text);
        assert!(
            text.contains(
                "# TYPE edgewatch_agent_corrections_total counter\nedgewatch_agent_corrections_total{agent=\"gw\"} 3\n"
            ),
            "{text}"
        );
    }
}
