//! The aggregator's metrics, defined once. Every family's `# HELP` text is in [`HELP`] (the fleet's
//! and training's families included), added to the exposition by [`with_help`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters (and the HTTP connection gauges) of one aggregator instance.
#[derive(Debug, Default)]
pub struct AggregatorMetrics {
    /// Summary records received on owned partitions.
    pub summaries_received_total: AtomicU64,
    /// Distinct windows applied.
    pub summaries_applied_total: AtomicU64,
    /// Replays and stale revisions ignored by idempotent apply.
    pub summaries_duplicate_total: AtomicU64,
    /// Higher revisions that replaced a window.
    pub summaries_revised_total: AtomicU64,
    /// Anomaly events received (all partitions).
    pub anomalies_received_total: AtomicU64,
    /// Anomaly events dropped as duplicates by id.
    pub anomalies_duplicate_total: AtomicU64,
    /// Summaries for partitions this instance does not own (a misconfigured agent or subscription).
    pub misrouted_total: AtomicU64,
    /// Uplink messages that could not be decoded.
    pub bad_messages_total: AtomicU64,
    /// MQTT connection errors.
    pub connection_errors_total: AtomicU64,
    /// Feed clients disconnected for falling too far behind.
    pub feed_lagged_total: AtomicU64,
    /// Feed connections accepted.
    pub feed_connections_total: AtomicU64,
    /// HTTP requests served.
    pub http_requests_total: AtomicU64,
    /// State store writes or flushes that failed (the lanes concerned were not acknowledged).
    pub store_errors_total: AtomicU64,
    /// Ack batches published to agents.
    pub acks_sent_total: AtomicU64,
    /// Requests refused for a missing or wrong bearer token.
    pub http_unauthorized_total: AtomicU64,
    /// Partition checkpoints written to the cluster's KV (cluster mode).
    pub checkpoints_total: AtomicU64,
    /// Bytes of partition checkpoints written.
    pub checkpoint_bytes_total: AtomicU64,
    /// Checkpoint writes that failed and were retried later (timeouts, unreachable KV).
    pub checkpoint_errors_total: AtomicU64,
    /// Partitions whose lease was won (taken over from their last checkpoint).
    pub partitions_acquired_total: AtomicU64,
    /// Partitions given back to a member that wants them (after a final checkpoint).
    pub partitions_released_total: AtomicU64,
    /// Partitions lost: the lease expired or another owner fenced a checkpoint write.
    pub partitions_lost_total: AtomicU64,
    /// TCP connections accepted by the HTTP listener (admitted or refused).
    pub http_connections_total: AtomicU64,
    /// Connections refused because `http.max_connections` were open and none was waiting for a
    /// request (so none could be closed to make room).
    pub http_refused_total: AtomicU64,
    /// Connections waiting for a request that were closed to admit a new one at the limit.
    pub http_idle_evicted_total: AtomicU64,
    /// Connections closed by the header read, idle (keep-alive) or write timeout.
    pub http_timeouts_total: AtomicU64,
    /// Feed upgrades refused because the feed's share of the connections was taken (503).
    pub feed_refused_total: AtomicU64,
    /// Feed clients closed for not reading: a write stalled past `http.write_timeout_ms`, or no
    /// pong for two ping intervals.
    pub ws_evicted_total: AtomicU64,
    /// MQTT packets larger than `mqtt.max_packet_bytes`, read once on the next connection instead
    /// of wedging a persistent session.
    pub oversized_packets_total: AtomicU64,
    /// Gauge: open HTTP connections, WebSocket feed clients included.
    pub http_connections: AtomicU64,
    /// Gauge: the most HTTP connections ever open at once.
    pub http_connections_peak: AtomicU64,
    /// Records refused (not applied, not acknowledged), by [`Refusal`]:
    /// `edgewatch_aggregator_records_refused_total{reason}`.
    pub records_refused: [AtomicU64; Refusal::ALL.len()],
    /// Lanes forgotten because their (agent, partition) had [`crate::state::MAX_EPOCHS`] more
    /// recently seen epochs.
    pub lanes_evicted_total: AtomicU64,
    /// Owners records refused (see `directory::RecordError`).
    pub owners_refused_total: AtomicU64,
    /// Requests to other aggregators that failed or timed out.
    pub fleet_requests_failed_total: AtomicU64,
    /// Gauge: whether the MQTT link is connected (1) or not (0).
    pub broker_connected: AtomicU64,
}

/// The `# HELP` text of every family the aggregator's `/metrics` serves.
pub const HELP: &[(&str, &str)] = &[
    (
        "edgewatch_aggregator_summaries_received_total",
        "Summary records received on owned partitions.",
    ),
    (
        "edgewatch_aggregator_summaries_applied_total",
        "Summary records applied to the fleet state.",
    ),
    (
        "edgewatch_aggregator_summaries_duplicate_total",
        "Summary records already applied (replays, resends), ignored.",
    ),
    (
        "edgewatch_aggregator_summaries_revised_total",
        "Summaries that replaced an earlier revision of their window.",
    ),
    (
        "edgewatch_aggregator_anomalies_received_total",
        "Anomaly events received.",
    ),
    (
        "edgewatch_aggregator_anomalies_duplicate_total",
        "Anomaly events already seen, not fanned out again.",
    ),
    (
        "edgewatch_aggregator_misrouted_total",
        "Records for partitions this aggregator does not own (left to their owner).",
    ),
    (
        "edgewatch_aggregator_bad_messages_total",
        "Messages that could not be decoded.",
    ),
    (
        "edgewatch_aggregator_connection_errors_total",
        "MQTT connection errors (each followed by a backoff and a reconnect).",
    ),
    (
        "edgewatch_aggregator_feed_lagged_total",
        "Feed clients disconnected for falling too far behind.",
    ),
    (
        "edgewatch_aggregator_feed_connections_total",
        "Feed (WebSocket) connections accepted.",
    ),
    (
        "edgewatch_aggregator_http_requests_total",
        "HTTP requests received.",
    ),
    (
        "edgewatch_aggregator_store_errors_total",
        "State store operations that failed.",
    ),
    (
        "edgewatch_aggregator_acks_sent_total",
        "Ack messages published to agents.",
    ),
    (
        "edgewatch_aggregator_http_unauthorized_total",
        "HTTP requests refused for a missing or wrong bearer token.",
    ),
    (
        "edgewatch_aggregator_checkpoints_total",
        "Cluster checkpoints written.",
    ),
    (
        "edgewatch_aggregator_checkpoint_bytes_total",
        "Bytes of the cluster checkpoints written.",
    ),
    (
        "edgewatch_aggregator_checkpoint_errors_total",
        "Cluster checkpoints that failed.",
    ),
    (
        "edgewatch_aggregator_partitions_acquired_total",
        "Partition leases won (cluster mode).",
    ),
    (
        "edgewatch_aggregator_partitions_released_total",
        "Partition leases given back (cluster mode).",
    ),
    (
        "edgewatch_aggregator_partitions_lost_total",
        "Partition leases lost to another member (cluster mode).",
    ),
    (
        "edgewatch_aggregator_http_connections_total",
        "HTTP connections accepted.",
    ),
    (
        "edgewatch_aggregator_http_refused_total",
        "HTTP connections refused at the connection limit (503).",
    ),
    (
        "edgewatch_aggregator_http_idle_evicted_total",
        "Idle HTTP connections closed to admit a new one at the limit.",
    ),
    (
        "edgewatch_aggregator_http_timeouts_total",
        "HTTP connections closed by a header, idle or write timeout.",
    ),
    (
        "edgewatch_aggregator_feed_refused_total",
        "Feed upgrades refused because the feed's share of the connections was taken (503).",
    ),
    (
        "edgewatch_aggregator_ws_evicted_total",
        "Feed clients closed for not reading (stalled write, or no pong).",
    ),
    (
        "edgewatch_aggregator_oversized_packets_total",
        "MQTT packets larger than mqtt.max_packet_bytes, read once and dropped.",
    ),
    (
        "edgewatch_aggregator_lanes_evicted_total",
        "Lanes forgotten because their (agent, partition) had newer epochs.",
    ),
    (
        "edgewatch_aggregator_records_refused_total",
        "Records refused (not applied, not acknowledged), by reason.",
    ),
    (
        "edgewatch_aggregator_feed_clients",
        "Feed clients connected now.",
    ),
    (
        "edgewatch_aggregator_http_connections",
        "Open HTTP connections, feed clients included.",
    ),
    (
        "edgewatch_aggregator_http_connections_peak",
        "The most HTTP connections ever open at once.",
    ),
    (
        "edgewatch_aggregator_devices",
        "Devices in the fleet state of this aggregator.",
    ),
    (
        "edgewatch_aggregator_broker_connected",
        "Whether the MQTT link is connected (1) or not (0).",
    ),
    (
        "edgewatch_aggregator_partitions_owned",
        "Partitions owned now.",
    ),
    (
        "edgewatch_aggregator_partitions_uncovered",
        "Partitions no live aggregator claims in the owners directory (0 during the start-up grace period).",
    ),
    (
        "edgewatch_aggregator_partitions_overlapping",
        "Partitions two or more live aggregators claim in the owners directory.",
    ),
    (
        "edgewatch_aggregator_owners_refused_total",
        "Owners records refused: malformed, forged (topic id differs from the body) or out of range.",
    ),
    (
        "edgewatch_aggregator_fleet_requests_failed_total",
        "Requests to other aggregators (fleet-wide devices, a device fetched from its owner) that failed or timed out.",
    ),
    (
        "edgewatch_aggregator_build_info",
        "Always 1; the version of the running aggregator in its label.",
    ),
    (
        "edgewatch_fleet_events_total",
        "Fleet peer-group events raised.",
    ),
    ("edgewatch_fleet_fits_total", "Fleet peer-group model fits."),
    (
        "edgewatch_fleet_fit_errors_total",
        "Fleet peer-group model fits that failed.",
    ),
    (
        "edgewatch_fleet_windows_refused_total",
        "Windows the fleet profiles refused.",
    ),
    ("edgewatch_fleet_devices", "Devices with a fleet profile."),
    ("edgewatch_fleet_models", "Fleet peer-group models held."),
    (
        "edgewatch_training_samples_total",
        "Training samples received.",
    ),
    (
        "edgewatch_training_samples_excluded_total",
        "Training samples excluded from training.",
    ),
    (
        "edgewatch_training_samples_refused_total",
        "Training samples refused.",
    ),
    ("edgewatch_training_fits_total", "Device model fits."),
    (
        "edgewatch_training_fit_errors_total",
        "Device model fits that failed.",
    ),
    (
        "edgewatch_training_models_published_total",
        "Device models published (retained) to agents.",
    ),
    ("edgewatch_training_devices", "Devices with a training set."),
    (
        "edgewatch_training_values",
        "Values held in the training sets.",
    ),
    ("edgewatch_training_models", "Device models held."),
    (
        "edgewatch_training_trainer",
        "1 while this aggregator trains device models (always with static ownership and training on; in cluster mode only the member holding the trainer lease).",
    ),
];

/// Help text of a family not in [`HELP`] (a test keeps it from ever being served).
pub const UNDOCUMENTED: &str = "(undocumented)";

/// `text` with a `# HELP` line from [`HELP`] before every `# TYPE` line that has none.
pub fn with_help(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 2);
    let mut prev = "";
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !prev.starts_with(&format!("# HELP {name} ")) {
                let help = HELP
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(UNDOCUMENTED, |(_, h)| h);
                let _ = writeln!(out, "# HELP {name} {help}");
            }
        }
        out.push_str(line);
        out.push('\n');
        prev = line;
    }
    out
}

/// Why a record was refused. A refused record is neither applied nor counted as received in its
/// lane, so it is never acknowledged: the sender keeps it (a forger's record simply goes nowhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its seq (or its batch's `acked` floor) lies more than `state.max_seq_jump` above what its
    /// lane has applied contiguously.
    SeqJump,
    /// Its device belongs to another partition than its batch's.
    Partition,
    /// A summary that cannot describe a real window ([`WindowSummary::check`]).
    ///
    /// [`WindowSummary::check`]: edgewatch_models::wire::WindowSummary::check
    InvalidSummary,
    /// An anomaly event with a non-finite value or a score outside [0, 1].
    InvalidEvent,
    /// A training sample that cannot be real (`TrainingSample::check`: shapes, non-finite values).
    InvalidSample,
}

impl Refusal {
    /// Every reason, in metric order.
    pub const ALL: [Refusal; 5] = [
        Refusal::SeqJump,
        Refusal::Partition,
        Refusal::InvalidSummary,
        Refusal::InvalidEvent,
        Refusal::InvalidSample,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::SeqJump => "seq_jump",
            Refusal::Partition => "partition",
            Refusal::InvalidSummary => "invalid_summary",
            Refusal::InvalidEvent => "invalid_event",
            Refusal::InvalidSample => "invalid_sample",
        }
    }
}

impl AggregatorMetrics {
    /// Counts `n` records refused for `why`.
    pub fn refuse(&self, why: Refusal, n: u64) {
        self.records_refused[why as usize].fetch_add(n, Relaxed);
    }

    /// Records refused for `why` so far.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.records_refused[why as usize].load(Relaxed)
    }

    /// Prometheus text exposition, labelled with the aggregator id.
    pub fn render(&self, id: &str, feed_clients: usize, devices: usize, out: &mut String) {
        let counters = [
            (
                "edgewatch_aggregator_summaries_received_total",
                &self.summaries_received_total,
            ),
            (
                "edgewatch_aggregator_summaries_applied_total",
                &self.summaries_applied_total,
            ),
            (
                "edgewatch_aggregator_summaries_duplicate_total",
                &self.summaries_duplicate_total,
            ),
            (
                "edgewatch_aggregator_summaries_revised_total",
                &self.summaries_revised_total,
            ),
            (
                "edgewatch_aggregator_anomalies_received_total",
                &self.anomalies_received_total,
            ),
            (
                "edgewatch_aggregator_anomalies_duplicate_total",
                &self.anomalies_duplicate_total,
            ),
            (
                "edgewatch_aggregator_misrouted_total",
                &self.misrouted_total,
            ),
            (
                "edgewatch_aggregator_bad_messages_total",
                &self.bad_messages_total,
            ),
            (
                "edgewatch_aggregator_connection_errors_total",
                &self.connection_errors_total,
            ),
            (
                "edgewatch_aggregator_feed_lagged_total",
                &self.feed_lagged_total,
            ),
            (
                "edgewatch_aggregator_feed_connections_total",
                &self.feed_connections_total,
            ),
            (
                "edgewatch_aggregator_http_requests_total",
                &self.http_requests_total,
            ),
            (
                "edgewatch_aggregator_store_errors_total",
                &self.store_errors_total,
            ),
            (
                "edgewatch_aggregator_acks_sent_total",
                &self.acks_sent_total,
            ),
            (
                "edgewatch_aggregator_http_unauthorized_total",
                &self.http_unauthorized_total,
            ),
            (
                "edgewatch_aggregator_checkpoints_total",
                &self.checkpoints_total,
            ),
            (
                "edgewatch_aggregator_checkpoint_bytes_total",
                &self.checkpoint_bytes_total,
            ),
            (
                "edgewatch_aggregator_checkpoint_errors_total",
                &self.checkpoint_errors_total,
            ),
            (
                "edgewatch_aggregator_partitions_acquired_total",
                &self.partitions_acquired_total,
            ),
            (
                "edgewatch_aggregator_partitions_released_total",
                &self.partitions_released_total,
            ),
            (
                "edgewatch_aggregator_partitions_lost_total",
                &self.partitions_lost_total,
            ),
            (
                "edgewatch_aggregator_http_connections_total",
                &self.http_connections_total,
            ),
            (
                "edgewatch_aggregator_http_refused_total",
                &self.http_refused_total,
            ),
            (
                "edgewatch_aggregator_http_idle_evicted_total",
                &self.http_idle_evicted_total,
            ),
            (
                "edgewatch_aggregator_http_timeouts_total",
                &self.http_timeouts_total,
            ),
            (
                "edgewatch_aggregator_feed_refused_total",
                &self.feed_refused_total,
            ),
            (
                "edgewatch_aggregator_ws_evicted_total",
                &self.ws_evicted_total,
            ),
            (
                "edgewatch_aggregator_oversized_packets_total",
                &self.oversized_packets_total,
            ),
            (
                "edgewatch_aggregator_lanes_evicted_total",
                &self.lanes_evicted_total,
            ),
            (
                "edgewatch_aggregator_owners_refused_total",
                &self.owners_refused_total,
            ),
            (
                "edgewatch_aggregator_fleet_requests_failed_total",
                &self.fleet_requests_failed_total,
            ),
        ];
        for (name, c) in counters {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name}{{aggregator=\"{id}\"}} {}",
                c.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE edgewatch_aggregator_records_refused_total counter"
        );
        for why in Refusal::ALL {
            let _ = writeln!(
                out,
                "edgewatch_aggregator_records_refused_total{{aggregator=\"{id}\",reason=\"{}\"}} {}",
                why.label(),
                self.refused(why)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE edgewatch_aggregator_feed_clients gauge\nedgewatch_aggregator_feed_clients{{aggregator=\"{id}\"}} {feed_clients}"
        );
        for (name, g) in [
            (
                "edgewatch_aggregator_http_connections",
                &self.http_connections,
            ),
            (
                "edgewatch_aggregator_http_connections_peak",
                &self.http_connections_peak,
            ),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} gauge\n{name}{{aggregator=\"{id}\"}} {}",
                g.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE edgewatch_aggregator_devices gauge\nedgewatch_aggregator_devices{{aggregator=\"{id}\"}} {devices}"
        );
        let _ = writeln!(
            out,
            "# TYPE edgewatch_aggregator_broker_connected gauge\nedgewatch_aggregator_broker_connected{{aggregator=\"{id}\"}} {}",
            self.broker_connected.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE edgewatch_aggregator_build_info gauge\nedgewatch_aggregator_build_info{{aggregator=\"{id}\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
    }
}

/// The MQTT links count their failures here.
impl edgewatch_link::LinkCounters for AggregatorMetrics {
    fn connection_error(&self) {
        self.connection_errors_total.fetch_add(1, Relaxed);
    }
    fn oversized_packet(&self) {
        self.oversized_packets_total.fetch_add(1, Relaxed);
    }
    fn link_state(&self, up: bool) {
        self.broker_connected.store(u64::from(up), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_records_are_counted_by_reason_and_rendered() {
        let m = AggregatorMetrics::default();
        m.refuse(Refusal::SeqJump, 2);
        m.refuse(Refusal::Partition, 1);
        assert_eq!(m.refused(Refusal::SeqJump), 2);
        let mut text = String::new();
        m.render("agg", 0, 0, &mut text);
        for (reason, n) in [
            ("seq_jump", 2),
            ("partition", 1),
            ("invalid_summary", 0),
            ("invalid_event", 0),
        ] {
            let line = format!(
                "edgewatch_aggregator_records_refused_total{{aggregator=\"agg\",reason=\"{reason}\"}} {n}\n"
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
    }

    #[test]
    fn every_family_of_the_aggregator_gets_its_help_line() {
        let m = AggregatorMetrics::default();
        let mut raw = String::new();
        m.render("agg", 2, 3, &mut raw);
        raw.push_str("# TYPE edgewatch_aggregator_partitions_owned gauge\nedgewatch_aggregator_partitions_owned{aggregator=\"agg\"} 4\n");
        raw.push_str("# TYPE edgewatch_aggregator_partitions_uncovered gauge\nedgewatch_aggregator_partitions_uncovered{aggregator=\"agg\"} 0\n");
        raw.push_str("# TYPE edgewatch_aggregator_partitions_overlapping gauge\nedgewatch_aggregator_partitions_overlapping{aggregator=\"agg\"} 0\n");
        let text = with_help(&raw);
        assert!(!text.contains(UNDOCUMENTED), "{text}");
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
        assert!(types >= 36, "{types}");
        for (i, line) in text.lines().enumerate() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                let prev = text.lines().nth(i - 1).unwrap();
                assert!(
                    prev.starts_with(&format!("# HELP {name} ")),
                    "{prev} / {line}"
                );
            }
        }
        // Already documented families are left alone; unknown ones are marked, not dropped.
        assert_eq!(
            with_help("# HELP a b\n# TYPE a gauge\na 1\n"),
            "# HELP a b\n# TYPE a gauge\na 1\n"
        );
        assert!(with_help("# TYPE zz gauge\nzz 1\n").starts_with("# HELP zz (undocumented)\n"));
        // Every HELP entry is unique.
        let mut names: Vec<&str> = HELP.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), HELP.len());
    }
}
