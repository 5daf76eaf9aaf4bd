//! The agent's metrics, defined once: lock-free counters read by the status line and `/metrics`.
//! Every family is rendered with its `# HELP` and `# TYPE` ([`family`]).

mod histogram;

pub use histogram::Histogram;

use crate::error::IngestError;
use crate::uplink::watch::LaneReport;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Writes the `# HELP` and `# TYPE` lines of a family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

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
    /// Whether the source link is connected (1) or not (0).
    pub source_connected: AtomicU64,
    /// Agent clock when a window summary is handed to the uplink, minus the window's end (event
    /// time): allowed lateness, the watermark's wait for later readings, and the devices' clock
    /// offset.
    pub window_emit_delay: Histogram,
    /// Publish of an outbox record → its owner's ack (after the owner stored it), per record.
    pub ack_latency: Histogram,
    /// Per-lane figures of the outbox, refreshed by the uplink every round.
    pub lanes: Mutex<Vec<LaneReport>>,
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
        let l = format!("agent=\"{agent}\"");
        family(out, "edgewatch_agent_models_loaded_total", "counter",
            "Multivariate models accepted and swapped in (from the uplink broker or from disk at start).");
        let _ = writeln!(
            out,
            "edgewatch_agent_models_loaded_total{{{l}}} {}",
            self.models_loaded_total.load(Relaxed)
        );
        family(
            out,
            "edgewatch_agent_models",
            "gauge",
            "Multivariate models running now (one per device at most).",
        );
        let _ = writeln!(
            out,
            "edgewatch_agent_models{{{l}}} {}",
            self.models.load(Relaxed)
        );
        family(
            out,
            "edgewatch_agent_models_refused_total",
            "counter",
            "Multivariate models refused, by reason.",
        );
        for why in ModelRefusal::ALL {
            let _ = writeln!(
                out,
                "edgewatch_agent_models_refused_total{{{l},reason=\"{}\"}} {}",
                why.label(),
                why.count(self)
            );
        }
    }

    fn render_ack_refusals(&self, agent: &str, out: &mut String) {
        family(out, "edgewatch_agent_acks_refused_total", "counter",
            "Acks refused (nothing deleted for them), by reason: epoch (another run's or forged), unsent (beyond what was sent).");
        for why in AckRefusal::ALL {
            let _ = writeln!(
                out,
                "edgewatch_agent_acks_refused_total{{agent=\"{agent}\",reason=\"{}\"}} {}",
                why.label(),
                why.count(self)
            );
        }
    }

    /// The lanes' figures: unacknowledged records and the age of the oldest, per lane, and the
    /// oldest over all lanes.
    fn render_lanes(&self, agent: &str, out: &mut String) {
        let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        family(
            out,
            "edgewatch_agent_lane_unacked_records",
            "gauge",
            "Outbox records of a lane not yet acknowledged by the partition's owner.",
        );
        for r in &lanes {
            let _ = writeln!(out, "edgewatch_agent_lane_unacked_records{{agent=\"{agent}\",partition=\"{}\",lane=\"{}\"}} {}", r.partition, r.kind, r.unacked);
        }
        family(out, "edgewatch_agent_lane_oldest_unacked_seconds", "gauge",
            "Age of a lane's oldest unacknowledged record (never too young; at most 1 s too old while the backlog spans under 512 s of appends, coarser beyond; records from before a restart count from the start).");
        for r in &lanes {
            let _ = writeln!(out, "edgewatch_agent_lane_oldest_unacked_seconds{{agent=\"{agent}\",partition=\"{}\",lane=\"{}\"}} {}", r.partition, r.kind, r.oldest_unacked.as_secs_f64());
        }
        family(out, "edgewatch_agent_lane_no_ack_seconds", "gauge",
            "How long a lane holding records has waited for its ack to move (0 when it holds none).");
        for r in &lanes {
            let _ = writeln!(out, "edgewatch_agent_lane_no_ack_seconds{{agent=\"{agent}\",partition=\"{}\",lane=\"{}\"}} {}", r.partition, r.kind, r.no_ack_for.as_secs_f64());
        }
        let oldest = lanes
            .iter()
            .map(|r| r.oldest_unacked)
            .max()
            .unwrap_or_default();
        family(
            out,
            "edgewatch_agent_oldest_unacked_seconds",
            "gauge",
            "Age of the oldest unacknowledged outbox record over all lanes (0 when none).",
        );
        let _ = writeln!(
            out,
            "edgewatch_agent_oldest_unacked_seconds{{agent=\"{agent}\"}} {}",
            oldest.as_secs_f64()
        );
    }

    /// The lanes' figures as last refreshed by the uplink.
    pub fn lane_reports(&self) -> Vec<LaneReport> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner()).clone()
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

    /// Prometheus text exposition, every series labelled with `agent`, every family with its
    /// HELP and TYPE.
    pub fn render(&self, agent: &str, out: &mut String) {
        let counters: [(&str, &AtomicU64, &str); 31] = [
            ("edgewatch_agent_messages_total", &self.messages_total, "Messages received from the source broker."),
            ("edgewatch_agent_readings_total", &self.readings_total, "Readings decoded and processed."),
            ("edgewatch_agent_late_readings_total", &self.late_readings_total, "Readings whose window had already closed (not merged)."),
            ("edgewatch_agent_corrections_total", &self.corrections_total, "Late readings merged into a window already sent (sent again, corrected, when it closes)."),
            ("edgewatch_agent_queue_dropped_total", &self.queue_dropped_total, "Messages dropped because the pipeline queue was full (when_full: drop_newest)."),
            ("edgewatch_agent_windows_total", &self.windows_total, "Window summaries handed to the uplink, corrected revisions included."),
            ("edgewatch_agent_anomalies_total", &self.anomalies_total, "Anomaly events raised (silences included)."),
            ("edgewatch_agent_silences_total", &self.silences_total, "Series that went silent (silence events)."),
            ("edgewatch_agent_summaries_published_total", &self.summaries_published_total, "Summary records published to the uplink broker (resends included)."),
            ("edgewatch_agent_anomalies_published_total", &self.anomalies_published_total, "Anomaly events published to the uplink broker (resends included)."),
            ("edgewatch_agent_publish_errors_total", &self.publish_errors_total, "Publishes the MQTT client could not queue (sent again from the outbox)."),
            ("edgewatch_agent_connection_errors_total", &self.connection_errors_total, "Connection errors on either MQTT link (each followed by a backoff and a reconnect)."),
            ("edgewatch_agent_outbox_acked_total", &self.outbox_acked_total, "Outbox records acknowledged by their owners (and removed)."),
            ("edgewatch_agent_outbox_coarsened_total", &self.outbox_coarsened_total, "Summaries merged into coarser ones to fit the outbox budget."),
            ("edgewatch_agent_training_samples_total", &self.training_samples_total, "Training samples handed to the outbox's training lanes."),
            ("edgewatch_agent_training_samples_published_total", &self.training_samples_published_total, "Training sample messages published."),
            ("edgewatch_agent_outbox_training_evicted_total", &self.outbox_training_evicted_total, "Training samples deleted from the outbox unsent."),
            ("edgewatch_agent_outbox_evicted_total", &self.outbox_evicted_total, "Summaries evicted to fit the outbox budget."),
            ("edgewatch_agent_outbox_evicted_readings_total", &self.outbox_evicted_readings_total, "Readings covered by the evicted summaries."),
            ("edgewatch_agent_outbox_over_budget_total", &self.outbox_over_budget_total, "Appends after which anomaly events alone kept the outbox over its budget."),
            ("edgewatch_agent_outbox_flushes_total", &self.outbox_flushes_total, "Outbox flushes (one per round)."),
            ("edgewatch_agent_outbox_errors_total", &self.outbox_errors_total, "Outbox operations that failed (disk errors)."),
            ("edgewatch_agent_acks_received_total", &self.acks_received_total, "Ack messages received from partition owners."),
            ("edgewatch_agent_resends_total", &self.resends_total, "Go-back-N resends of a lane (ack timeout, or reconnect with records in flight)."),
            ("edgewatch_agent_drained_records_total", &self.drained_records_total, "Backlog records published by the paced drain."),
            ("edgewatch_agent_checkpoints_total", &self.checkpoints_total, "Pipeline checkpoints stored."),
            ("edgewatch_agent_checkpoint_rows_total", &self.checkpoint_rows_total, "Series rows written by checkpoints."),
            ("edgewatch_agent_oversized_packets_total", &self.oversized_packets_total, "MQTT packets larger than max_packet_bytes, read once and dropped."),
            ("edgewatch_agent_bad_acks_total", &self.bad_acks_total, "Messages on the acks topic that could not be decoded (ignored)."),
            ("edgewatch_agent_replays_skipped_total", &self.replays_skipped_total, "Redelivered readings already applied (skipped)."),
            ("edgewatch_agent_checkpoint_errors_total", &self.checkpoint_errors_total, "Pipeline snapshots that failed (the previous checkpoint stays)."),
        ];
        let l = format!("agent=\"{agent}\"");
        family(
            out,
            "edgewatch_agent_build_info",
            "gauge",
            "Always 1; the version of the running agent in its label.",
        );
        let _ = writeln!(
            out,
            "edgewatch_agent_build_info{{{l},version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        for (name, c, help) in counters {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name}{{{l}}} {}", c.load(Relaxed));
        }
        family(
            out,
            "edgewatch_agent_rejected_total",
            "counter",
            "Messages rejected, by reason.",
        );
        for (i, reason) in IngestError::REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "edgewatch_agent_rejected_total{{{l},reason=\"{reason}\"}} {}",
                self.rejected[i].load(Relaxed)
            );
        }
        let gauges: [(&str, &AtomicU64, &str); 8] = [
            ("edgewatch_agent_series", &self.series, "(device, metric) series tracked now."),
            ("edgewatch_agent_queue_depth", &self.queue_depth, "Messages waiting between the MQTT poll loop and the pipeline."),
            ("edgewatch_agent_source_connected", &self.source_connected, "Whether the source link is connected (1) or not (0)."),
            ("edgewatch_agent_uplink_connected", &self.uplink_connected, "Whether the uplink is connected (1) or not (0)."),
            ("edgewatch_agent_outbox_records", &self.outbox_records, "Records stored in the outbox, waiting for their owner's ack."),
            ("edgewatch_agent_outbox_bytes", &self.outbox_bytes, "Bytes of the records stored in the outbox."),
            ("edgewatch_agent_checkpoint_bytes", &self.checkpoint_bytes, "Bytes of the stored checkpoint (counted in the outbox budget)."),
            ("edgewatch_agent_restart_loss_estimate", &self.restart_loss_estimate, "After a crash in on_receipt mode: estimated readings lost since the last checkpoint."),
        ];
        for (name, g, help) in gauges {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name}{{{l}}} {}", g.load(Relaxed));
        }
        family(
            out,
            "edgewatch_agent_event_lag_ms",
            "gauge",
            "Arrival time minus event time of the latest reading, ms.",
        );
        let _ = writeln!(
            out,
            "edgewatch_agent_event_lag_ms{{{l}}} {}",
            self.event_lag_ms.load(Relaxed)
        );
        family(out, "edgewatch_agent_window_emit_delay_seconds", "histogram",
            "Agent clock when a window summary is first handed to the uplink minus the window's end (event time): allowed lateness, the watermark's wait and the devices' clock offset.");
        self.window_emit_delay
            .render("edgewatch_agent_window_emit_delay_seconds", &l, out);
        family(out, "edgewatch_agent_ack_latency_seconds", "histogram",
            "Publish of an outbox record to its owner's ack (sent once the owner stored it), per record, from the record's first publish.");
        self.ack_latency
            .render("edgewatch_agent_ack_latency_seconds", &l, out);
        self.render_lanes(agent, out);
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
            "edgewatch_agent_build_info{agent=\"gw\",version=\"",
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

    /// Every sample's family has one HELP and one TYPE line, in that order, before its samples.
    pub(crate) fn check_families(text: &str) -> Result<usize, String> {
        use std::collections::HashMap;
        let mut help: HashMap<&str, usize> = HashMap::new();
        let mut kind: HashMap<&str, (usize, &str)> = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, h) = rest
                    .split_once(' ')
                    .ok_or(format!("line {i}: empty HELP"))?;
                if h.trim().is_empty() || help.insert(name, i).is_some() {
                    return Err(format!("line {i}: empty or repeated HELP for {name}"));
                }
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, k) = rest.split_once(' ').ok_or(format!("line {i}: bad TYPE"))?;
                if help.get(name).is_none_or(|&h| h + 1 != i) || kind.insert(name, (i, k)).is_some()
                {
                    return Err(format!(
                        "line {i}: TYPE of {name} not right after its HELP, or repeated"
                    ));
                }
            } else if !line.is_empty() {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let family = kind.keys().copied().find(|f| {
                    name == *f
                        || (kind[f].1 == "histogram"
                            && ["_bucket", "_sum", "_count"]
                                .iter()
                                .any(|s| name == format!("{f}{s}")))
                });
                if family.is_none() {
                    return Err(format!(
                        "line {i}: sample {name} has no HELP/TYPE before it"
                    ));
                }
            }
        }
        Ok(kind.len())
    }

    #[test]
    fn every_family_has_help_and_type_and_the_lanes_and_histograms_render() {
        let m = AgentMetrics::default();
        m.ack_latency.observe(Duration::from_millis(40));
        m.window_emit_delay.observe(Duration::from_secs(3));
        *m.lanes.lock().unwrap() = vec![LaneReport {
            partition: 3,
            kind: "main",
            unacked: 12,
            oldest_unacked: Duration::from_millis(4_500),
            no_ack_for: Duration::from_secs(2),
        }];
        let mut text = String::new();
        m.render("gw", &mut text);
        let families = check_families(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(families > 45, "{families}");
        for line in [
            "edgewatch_agent_lane_unacked_records{agent=\"gw\",partition=\"3\",lane=\"main\"} 12\n",
            "edgewatch_agent_lane_oldest_unacked_seconds{agent=\"gw\",partition=\"3\",lane=\"main\"} 4.5\n",
            "edgewatch_agent_oldest_unacked_seconds{agent=\"gw\"} 4.5\n",
            "edgewatch_agent_ack_latency_seconds_bucket{agent=\"gw\",le=\"0.05\"} 1\n",
            "edgewatch_agent_window_emit_delay_seconds_count{agent=\"gw\"} 1\n",
            "# TYPE edgewatch_agent_ack_latency_seconds histogram\n",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
        // The checker itself catches a family without HELP.
        assert!(check_families("# TYPE x counter\nx 1\n").is_err());
        assert!(check_families("y 1\n").is_err());
    }
}
