//! The agent's YAML configuration: what it subscribes to, how payloads map to readings, windows,
//! detector and uplink. Deserialised with unknown fields rejected; [`AgentConfig::problems`] then
//! reports every invalid value, not only the first.

use edgewatch_link::MqttLink;
use edgewatch_models::detect::{DetectorConfig, GateConfig, SilenceConfig};
use edgewatch_models::wire::{is_valid_node_id, DEFAULT_PREFIX};
use serde::{Deserialize, Serialize};

mod ops;
pub use ops::{HttpConfig, LogConfig, StatusConfig};

/// Top-level agent configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent id, `[A-Za-z0-9_-]{1,64}`: it appears in uplink topic names.
    pub id: String,
    /// Where sensors publish readings.
    #[serde(default)]
    pub source: SourceConfig,
    /// Where summaries and anomaly events go.
    #[serde(default)]
    pub uplink: UplinkConfig,
    /// Event-time windows per (device, metric).
    #[serde(default)]
    pub window: WindowConfig,
    /// Streaming detector run on every series.
    #[serde(default)]
    pub detector: DetectorConfig,
    /// Anomaly raising policy.
    #[serde(default)]
    pub anomaly: AnomalyConfig,
    /// Internal queue sizes and overload policy.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Durable state on the gateway: outbox and checkpoints.
    #[serde(default)]
    pub state: StateConfig,
    /// Multivariate device models pushed by the aggregator (`{prefix}/models/#`).
    #[serde(default)]
    pub models: ModelsConfig,
    /// The HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); off unless `http.listen` is set.
    #[serde(default)]
    pub http: HttpConfig,
    /// Lines the agent logs on its own (the periodic status line).
    #[serde(default)]
    pub log: LogConfig,
    /// The retained status message and remote configuration (`{prefix}/status/{agent}`,
    /// `{prefix}/config/{agent}`).
    #[serde(default)]
    pub status: StatusConfig,
}

/// Multivariate device models: whether the agent takes them, and how it scores with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Subscribe to `{prefix}/models/#` on the uplink broker, run the models received there and
    /// (with `state.dir`) those stored before a restart. Off by default: the broker must let the
    /// agent read that filter, which the shipped ACLs (`configs/security/`) do not grant yet (with
    /// NATS a refused subscription would take the uplink connection down).
    #[serde(default = "default_models_enabled")]
    pub enabled: bool,
    /// Score at or above which a model raises a `pca` event, in (0, 1].
    #[serde(default = "default_models_threshold")]
    pub threshold: f64,
    /// How long (event time) a metric's latest value stays in the device's vector, ms; > 0.
    #[serde(default = "default_models_staleness_ms")]
    pub staleness_ms: i64,
    /// Share of the model's metrics that must be fresh for a vector to be scored, in (0, 1].
    #[serde(default = "default_models_min_fill")]
    pub min_fill: f64,
    /// Training samples sent to the aggregator (with `enabled` only).
    #[serde(default)]
    pub training: TrainingConfig,
}

/// What the agent samples for the aggregator's device models: per device, a reservoir of its
/// aligned vectors per `period_ms` of event time, sent in the partition's training lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Send samples (only with `models.enabled`).
    #[serde(default = "default_training_enabled")]
    pub enabled: bool,
    /// Event time covered by one sample, ms.
    #[serde(default = "default_training_period_ms")]
    pub period_ms: i64,
    /// Vectors kept per device and period (reservoir size).
    #[serde(default = "default_training_samples")]
    pub samples: usize,
    /// A period with fewer aligned vectors sends nothing.
    #[serde(default = "default_training_min_rows")]
    pub min_rows: usize,
    /// Devices sampled at once; further devices are not sampled.
    #[serde(default = "default_training_max_devices")]
    pub max_devices: usize,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            enabled: default_training_enabled(),
            period_ms: default_training_period_ms(),
            samples: default_training_samples(),
            min_rows: default_training_min_rows(),
            max_devices: default_training_max_devices(),
        }
    }
}

impl TrainingConfig {
    /// The sampler settings of the models crate.
    pub fn sampler(&self) -> edgewatch_models::multi::SamplerConfig {
        edgewatch_models::multi::SamplerConfig {
            period_ms: self.period_ms,
            capacity: self.samples,
            min_rows: self.min_rows,
        }
    }
}

fn default_training_enabled() -> bool {
    true
}
fn default_training_period_ms() -> i64 {
    3_600_000
}
fn default_training_samples() -> usize {
    128
}
fn default_training_min_rows() -> usize {
    32
}
fn default_training_max_devices() -> usize {
    10_000
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            enabled: default_models_enabled(),
            threshold: default_models_threshold(),
            staleness_ms: default_models_staleness_ms(),
            min_fill: default_models_min_fill(),
            training: TrainingConfig::default(),
        }
    }
}

impl ModelsConfig {
    /// The aligner settings of the models crate.
    pub fn align(&self) -> edgewatch_models::multi::AlignConfig {
        edgewatch_models::multi::AlignConfig {
            staleness_ms: self.staleness_ms,
            min_fill: self.min_fill,
        }
    }
}

fn default_models_enabled() -> bool {
    false
}
fn default_models_threshold() -> f64 {
    0.5
}
fn default_models_staleness_ms() -> i64 {
    60_000
}
fn default_models_min_fill() -> f64 {
    1.0
}

/// Where and how the agent keeps its durable state (the outbox's sled database and the pipeline
/// checkpoint file beside it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory of the sled database. Without it the outbox lives in a temporary database: nothing
    /// survives a restart.
    #[serde(default)]
    pub dir: Option<std::path::PathBuf>,
    /// How often open windows, watermarks and detector state are checkpointed.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// When sensor readings are acknowledged to the source broker.
    #[serde(default)]
    pub ack_mode: AckMode,
    /// Close every open window at shutdown and send it (decommissioning a gateway, or checking
    /// totals). By default, with `dir` set, open windows stay in the final checkpoint and carry on
    /// after the restart; without `dir` they are always closed at shutdown.
    #[serde(default)]
    pub flush_on_exit: bool,
    /// Bound of the sled page cache of the database in `dir`, bytes (sled itself uses about
    /// 10 MB more at 10 k series). Smaller saves memory; resends after an outage then read more
    /// from disk.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: None,
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
            ack_mode: AckMode::default(),
            flush_on_exit: false,
            cache_bytes: default_cache_bytes(),
        }
    }
}

fn default_cache_bytes() -> u64 {
    crate::outbox::SLED_CACHE_BYTES
}
fn default_checkpoint_interval_ms() -> u64 {
    1000
}

/// When the agent acknowledges sensor readings to the source broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// On receipt: a kill -9 loses the readings since the last checkpoint (estimated and reported
    /// on restart).
    #[default]
    OnReceipt,
    /// QoS 1 on a persistent session, acknowledged only once a checkpoint covers the reading: the
    /// broker redelivers what a crash lost, so nothing is lost. Needs `state.dir`, and a broker that
    /// allows as many unacknowledged messages in flight as arrive in one checkpoint interval.
    AfterCheckpoint,
}

/// The sensor-side MQTT link and subscriptions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Broker the sensors publish to.
    #[serde(default)]
    pub mqtt: MqttLink,
    /// QoS of the subscriptions (0 or 1). 1 by default: the broker then cannot silently drop readings
    /// for a busy agent, and the agent's PubAcks keep the broker's TCP stream from stalling on
    /// delayed ACKs (brokers rarely disable Nagle), which costs up to 40 ms per reading at QoS 0.
    #[serde(default = "default_source_qos")]
    pub qos: u8,
    /// Topic patterns and their payload mappings; the first matching pattern wins.
    #[serde(default = "default_subscriptions")]
    pub subscriptions: Vec<Subscription>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            mqtt: MqttLink::default(),
            qos: default_source_qos(),
            subscriptions: default_subscriptions(),
        }
    }
}

fn default_source_qos() -> u8 {
    1
}

fn default_subscriptions() -> Vec<Subscription> {
    vec![Subscription {
        topic: "sensors/{device}/{metric}".into(),
        filter: None,
        metric: None,
        payload: PayloadFormat::default(),
    }]
}

/// One topic pattern, e.g. `sensors/{device}/{metric}` or `plant/{device}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Levels are literals or the placeholders `{device}` (required) and `{metric}`.
    pub topic: String,
    /// MQTT filter to subscribe to; defaults to the pattern with placeholders as `+`. A wider filter
    /// (e.g. `sensors/#`) makes non-matching topics visible: they are counted as `topic_mismatch`.
    #[serde(default)]
    pub filter: Option<String>,
    /// Metric name when the topic has no `{metric}` level and the payload is a single value.
    #[serde(default)]
    pub metric: Option<String>,
    /// How the payload maps to readings.
    #[serde(default)]
    pub payload: PayloadFormat,
}

/// Payload mappings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PayloadFormat {
    /// A bare number as text (`21.5`); the reading's time is its arrival time.
    Number,
    /// A JSON object with a value field and an optional timestamp field.
    Json {
        /// Field holding the value.
        #[serde(default = "default_value_field")]
        value_field: String,
        /// Field holding the timestamp; arrival time is used when absent.
        #[serde(default = "default_timestamp_field")]
        timestamp_field: Option<String>,
        /// Unit of numeric timestamps.
        #[serde(default)]
        timestamp_unit: TimestampUnit,
    },
    /// A JSON object of metrics: every numeric field except the timestamp is one reading.
    JsonObject {
        /// Field holding the timestamp; arrival time is used when absent.
        #[serde(default = "default_timestamp_field")]
        timestamp_field: Option<String>,
        /// Unit of numeric timestamps.
        #[serde(default)]
        timestamp_unit: TimestampUnit,
    },
}

impl Default for PayloadFormat {
    fn default() -> Self {
        Self::Json {
            value_field: default_value_field(),
            timestamp_field: default_timestamp_field(),
            timestamp_unit: TimestampUnit::default(),
        }
    }
}

fn default_value_field() -> String {
    "value".into()
}
fn default_timestamp_field() -> Option<String> {
    Some("ts".into())
}

/// Unit of a numeric timestamp since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampUnit {
    /// Seconds (may be fractional).
    S,
    /// Milliseconds.
    #[default]
    Ms,
    /// Microseconds.
    Us,
    /// Nanoseconds.
    Ns,
}

impl TimestampUnit {
    /// Converts a timestamp in this unit to milliseconds.
    #[inline]
    pub fn to_ms(self, t: f64) -> f64 {
        match self {
            Self::S => t * 1e3,
            Self::Ms => t,
            Self::Us => t / 1e3,
            Self::Ns => t / 1e6,
        }
    }
}

/// The cloud-side link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Cloud broker; defaults to the source broker.
    #[serde(default)]
    pub mqtt: Option<MqttLink>,
    /// Topic prefix of the uplink namespace.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Number of partitions of the deployment (must match the aggregators').
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// QoS of uplink publishes (0 or 1).
    #[serde(default = "default_uplink_qos")]
    pub qos: u8,
    /// Most summaries in one published batch.
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// Longest a summary waits for its batch to fill.
    #[serde(default = "default_batch_max_delay_ms")]
    pub batch_max_delay_ms: u64,
    /// Disk budget of the outbox (key + value bytes of stored records). When full, normal summaries
    /// are first merged into coarser windows, then the oldest evicted; anomaly events never.
    #[serde(default = "default_max_outbox_bytes")]
    pub max_outbox_bytes: u64,
    /// A summary with a highest score below this may be merged when the outbox is full; by default
    /// the anomaly threshold (a window that raised no anomaly is normal).
    #[serde(default)]
    pub coarsen_below_score: Option<f64>,
    /// Resend a lane from its last ack when no ack came for this long (doubles per miss, capped).
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Most records of one lane published and not yet acknowledged.
    #[serde(default = "default_max_unacked_records")]
    pub max_unacked_records: u64,
    /// Pace of the backlog drain after an outage or restart, records per second (live records are
    /// published at once regardless).
    #[serde(default = "default_drain_records_per_sec")]
    pub drain_records_per_sec: u64,
    /// How long a shutdown waits for the owners' acks (stops early once they stall for 2 s).
    #[serde(default = "default_shutdown_wait_ms")]
    pub shutdown_wait_ms: u64,
    /// A lane holding records whose ack has not moved for this long is reported: one WARN per lane
    /// and episode (an INFO when acks resume), and `/readyz` fails, ms; > 0.
    #[serde(default = "default_ack_warn_ms")]
    pub ack_warn_ms: u64,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            mqtt: None,
            prefix: default_prefix(),
            partitions: default_partitions(),
            qos: default_uplink_qos(),
            batch_max_records: default_batch_max_records(),
            batch_max_delay_ms: default_batch_max_delay_ms(),
            max_outbox_bytes: default_max_outbox_bytes(),
            coarsen_below_score: None,
            ack_timeout_ms: default_ack_timeout_ms(),
            max_unacked_records: default_max_unacked_records(),
            drain_records_per_sec: default_drain_records_per_sec(),
            shutdown_wait_ms: default_shutdown_wait_ms(),
            ack_warn_ms: default_ack_warn_ms(),
        }
    }
}

fn default_ack_warn_ms() -> u64 {
    30_000
}
fn default_prefix() -> String {
    DEFAULT_PREFIX.into()
}
fn default_partitions() -> u32 {
    edgewatch_models::partition::DEFAULT_PARTITIONS
}
fn default_uplink_qos() -> u8 {
    1
}
fn default_batch_max_records() -> usize {
    200
}
fn default_batch_max_delay_ms() -> u64 {
    500
}
fn default_max_outbox_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_ack_timeout_ms() -> u64 {
    5_000
}
fn default_max_unacked_records() -> u64 {
    10_000
}
fn default_drain_records_per_sec() -> u64 {
    5_000
}
fn default_shutdown_wait_ms() -> u64 {
    10_000
}

/// Tumbling event-time windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Window length.
    #[serde(default = "default_size_ms")]
    pub size_ms: i64,
    /// How long after a window's end readings are still merged into it.
    #[serde(default = "default_allowed_lateness_ms")]
    pub allowed_lateness_ms: i64,
    /// A series that has received nothing for this long on the agent's clock is closed as if its
    /// own clock had kept running: a window is sent at the latest this long after its end.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: i64,
    /// Readings stamped further ahead of the agent's clock than this are rejected and counted
    /// (`timestamp_in_future`): a wrong sensor clock must not move its series' event time ahead.
    #[serde(default = "default_max_future_ms")]
    pub max_future_ms: i64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            size_ms: default_size_ms(),
            allowed_lateness_ms: default_allowed_lateness_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_future_ms: default_max_future_ms(),
        }
    }
}

fn default_size_ms() -> i64 {
    60_000
}
fn default_allowed_lateness_ms() -> i64 {
    5_000
}
fn default_idle_timeout_ms() -> i64 {
    120_000
}
fn default_max_future_ms() -> i64 {
    600_000
}

/// When a score becomes an anomaly event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Score at or above which an event is raised; defaults to the detector's recommended threshold.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// After an event, the series re-arms only once its score falls below `threshold × rearm_ratio`.
    #[serde(default = "default_rearm_ratio")]
    pub rearm_ratio: f64,
    /// ... and no sooner than this many of its readings after the event.
    #[serde(default = "default_min_gap_readings")]
    pub min_gap_readings: u32,
    /// Series whose readings stop (on the agent's clock) raise a `silence` event, and a recovery
    /// event when they come back.
    #[serde(default)]
    pub silence: SilenceConfig,
}

impl AnomalyConfig {
    /// The re-arm rules as the models crate's [`GateConfig`].
    pub fn gate(&self) -> GateConfig {
        GateConfig {
            rearm_ratio: self.rearm_ratio,
            min_gap_readings: self.min_gap_readings,
        }
    }
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        let gate = GateConfig::default();
        Self {
            threshold: None,
            rearm_ratio: gate.rearm_ratio,
            min_gap_readings: gate.min_gap_readings,
            silence: SilenceConfig::default(),
        }
    }
}

fn default_rearm_ratio() -> f64 {
    GateConfig::default().rearm_ratio
}
fn default_min_gap_readings() -> u32 {
    GateConfig::default().min_gap_readings
}

/// What the MQTT poll loop does when the pipeline queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Stop reading from the broker until there is room (the broker buffers or drops).
    #[default]
    Block,
    /// Drop the newest reading and count it.
    DropNewest,
}

/// Internal queues and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Capacity of the queue between the MQTT poll loop and the pipeline, in messages.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Overload policy of that queue.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Payloads larger than this are rejected and counted.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Most (device, metric) series tracked at once; readings of further series are rejected and
    /// counted. Bounds the agent's memory: [`memory_bound_bytes`].
    #[serde(default = "default_max_series")]
    pub max_series: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: default_queue_capacity(),
            when_full: WhenFull::default(),
            max_payload_bytes: default_max_payload_bytes(),
            max_series: default_max_series(),
        }
    }
}

fn default_queue_capacity() -> usize {
    8192
}
fn default_max_payload_bytes() -> usize {
    64 * 1024
}
fn default_max_series() -> usize {
    // About 224 MiB with the default detector (memory_bound_bytes): a gateway's budget.
    20_000
}

/// Resident memory one series may cost an agent with the default detector, bytes: its state
/// (about 4.1 KB measured by `edgewatch bench --section memory`, README *Limits*), its checkpoint
/// row while a checkpoint is written (about 2 KB), and allocator slack.
pub const BYTES_PER_SERIES: u64 = 8 * 1024;
/// Resident memory of an agent process apart from its series (runtime, MQTT clients and queues,
/// sled's bounded page cache, outbox index), bytes, with the default queue sizes.
pub const BASE_BYTES: u64 = 64 * 1024 * 1024;

/// The memory bound documented for an agent with the default detector and `max_series` series.
pub fn memory_bound_bytes(max_series: usize) -> u64 {
    BASE_BYTES + BYTES_PER_SERIES * max_series as u64
}

impl AgentConfig {
    /// A configuration with every default and the given id.
    pub fn with_id(id: &str) -> Self {
        Self {
            id: id.into(),
            source: SourceConfig::default(),
            uplink: UplinkConfig::default(),
            window: WindowConfig::default(),
            detector: DetectorConfig::default(),
            anomaly: AnomalyConfig::default(),
            pipeline: PipelineConfig::default(),
            state: StateConfig::default(),
            models: ModelsConfig::default(),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            status: StatusConfig::default(),
        }
    }

    /// The broker summaries and events go to.
    pub fn uplink_link(&self) -> &MqttLink {
        self.uplink.mqtt.as_ref().unwrap_or(&self.source.mqtt)
    }

    /// The score threshold in force.
    pub fn threshold(&self) -> f64 {
        self.anomaly
            .threshold
            .unwrap_or_else(|| self.detector.recommended_threshold())
    }

    /// Every invalid value, as `key.path: message`; empty when the configuration is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !is_valid_node_id(&self.id) {
            out.push(format!(
                "id: must match [A-Za-z0-9_-]{{1,64}} (it appears in topic names), got {:?}",
                self.id
            ));
        }
        out.extend(
            self.source
                .mqtt
                .problems()
                .into_iter()
                .map(|p| format!("source.mqtt.{p}")),
        );
        if let Some(link) = &self.uplink.mqtt {
            out.extend(
                link.problems()
                    .into_iter()
                    .map(|p| format!("uplink.mqtt.{p}")),
            );
        }
        if self.source.qos > 1 {
            out.push(format!(
                "source.qos: must be 0 or 1, got {}",
                self.source.qos
            ));
        }
        if self.uplink.qos > 1 {
            out.push(format!(
                "uplink.qos: must be 0 or 1, got {}",
                self.uplink.qos
            ));
        }
        if self.source.subscriptions.is_empty() {
            out.push("source.subscriptions: at least one topic pattern is required".into());
        }
        for (i, s) in self.source.subscriptions.iter().enumerate() {
            if s.filter
                .as_deref()
                .is_some_and(|f| f.is_empty() || f.contains(['{', '}']))
            {
                out.push(format!(
                    "source.subscriptions[{i}].filter: must be a non-empty MQTT filter without placeholders, got {:?}",
                    s.filter.as_deref().unwrap_or_default()
                ));
            }
            if let Err(e) = crate::ingest::TopicPattern::parse(&s.topic) {
                out.push(format!("source.subscriptions[{i}].topic: {e}"));
            } else if let Ok(p) = crate::ingest::TopicPattern::parse(&s.topic) {
                let single = !matches!(s.payload, PayloadFormat::JsonObject { .. });
                if single && !p.has_metric() && s.metric.is_none() {
                    out.push(format!(
                        "source.subscriptions[{i}].metric: the topic has no {{metric}} level, so give a metric name or use payload type json_object"
                    ));
                }
            }
        }
        let prefix = &self.uplink.prefix;
        if prefix.is_empty() || prefix.chars().any(|c| matches!(c, '.' | ' ' | '+' | '#')) {
            out.push(format!(
                "uplink.prefix: must be non-empty without '.', spaces, '+' or '#', got {prefix:?}"
            ));
        }
        if self.uplink.partitions == 0 {
            out.push("uplink.partitions: must be > 0, got 0".into());
        }
        if self.uplink.batch_max_records == 0 {
            out.push("uplink.batch_max_records: must be > 0, got 0".into());
        }
        for (field, v) in [
            ("max_outbox_bytes", self.uplink.max_outbox_bytes),
            ("ack_timeout_ms", self.uplink.ack_timeout_ms),
            ("max_unacked_records", self.uplink.max_unacked_records),
            ("drain_records_per_sec", self.uplink.drain_records_per_sec),
            ("ack_warn_ms", self.uplink.ack_warn_ms),
        ] {
            if v == 0 {
                out.push(format!("uplink.{field}: must be > 0, got 0"));
            }
        }
        if let Some(c) = self.uplink.coarsen_below_score {
            if !(0.0..=1.0).contains(&c) {
                out.push(format!(
                    "uplink.coarsen_below_score: must be in [0, 1], got {c}"
                ));
            }
        }
        if self.state.checkpoint_interval_ms == 0 {
            out.push("state.checkpoint_interval_ms: must be > 0, got 0".into());
        }
        if self.state.ack_mode == AckMode::AfterCheckpoint {
            if self.state.dir.is_none() {
                out.push("state.ack_mode: after_checkpoint needs state.dir (checkpoints must survive a crash)".into());
            }
            if self.source.qos != 1 {
                out.push(format!(
                    "state.ack_mode: after_checkpoint needs source.qos 1, got {}",
                    self.source.qos
                ));
            }
            if self.pipeline.when_full != WhenFull::Block {
                out.push("state.ack_mode: after_checkpoint needs pipeline.when_full: block (a dropped reading could never be acknowledged)".into());
            }
        }
        if let Err(e) = edgewatch_models::window::TumblingWindows::new(
            self.window.size_ms,
            self.window.allowed_lateness_ms,
        ) {
            out.push(format!("window.{e}"));
        }
        if self.window.idle_timeout_ms <= 0 {
            out.push(format!(
                "window.idle_timeout_ms: must be > 0, got {}",
                self.window.idle_timeout_ms
            ));
        }
        if self.window.max_future_ms < 0 {
            out.push(format!(
                "window.max_future_ms: must be >= 0, got {}",
                self.window.max_future_ms
            ));
        }
        if let Err(e) = self.detector.build() {
            out.push(format!("detector.{e}"));
        }
        let t = self.threshold();
        if !(t > 0.0 && t <= 1.0) {
            out.push(format!("anomaly.threshold: must be in (0, 1], got {t}"));
        }
        let r = self.anomaly.rearm_ratio;
        if !(r > 0.0 && r <= 1.0) {
            out.push(format!("anomaly.rearm_ratio: must be in (0, 1], got {r}"));
        }
        if let Err(e) = self.anomaly.silence.validate() {
            out.push(format!("anomaly.silence.{e}"));
        }
        let m = &self.models;
        if !(m.threshold > 0.0 && m.threshold <= 1.0) {
            out.push(format!(
                "models.threshold: must be in (0, 1], got {}",
                m.threshold
            ));
        }
        if m.staleness_ms <= 0 {
            out.push(format!(
                "models.staleness_ms: must be > 0, got {}",
                m.staleness_ms
            ));
        }
        if !(m.min_fill > 0.0 && m.min_fill <= 1.0) {
            out.push(format!(
                "models.min_fill: must be in (0, 1], got {}",
                m.min_fill
            ));
        }
        if let Err(e) = m.training.sampler().check() {
            out.push(format!(
                "models.training.{}",
                e.replace("capacity", "samples")
            ));
        }
        if m.training.max_devices == 0 {
            out.push("models.training.max_devices: must be > 0, got 0".into());
        }
        out.extend(
            self.http
                .problems()
                .into_iter()
                .map(|p| format!("http.{p}")),
        );
        if self.state.cache_bytes == 0 {
            out.push("state.cache_bytes: must be > 0, got 0".into());
        }
        if self.pipeline.queue_capacity == 0 {
            out.push("pipeline.queue_capacity: must be > 0, got 0".into());
        }
        if self.pipeline.max_payload_bytes == 0 {
            out.push("pipeline.max_payload_bytes: must be > 0, got 0".into());
        }
        if self.pipeline.max_series == 0 {
            out.push("pipeline.max_series: must be > 0, got 0".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let cfg: AgentConfig = serde_norway::from_str(yaml).expect("parses");
        cfg.problems()
    }

    #[test]
    fn after_checkpoint_needs_durable_state_qos_1_and_blocking_queues() {
        let p = problems("id: gw\nstate: { ack_mode: after_checkpoint }\nsource: { qos: 0 }\npipeline: { when_full: drop_newest }\n");
        assert!(
            p.iter()
                .any(|m| m.starts_with("state.ack_mode") && m.contains("state.dir")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("source.qos 1")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("when_full: block")), "{p:?}");
        let ok = problems("id: gw\nstate: { ack_mode: after_checkpoint, dir: /tmp/x }\n");
        assert!(ok.is_empty(), "{ok:?}");
    }

    #[test]
    fn outbox_settings_are_checked() {
        let p = problems("id: gw\nuplink: { max_outbox_bytes: 0, ack_timeout_ms: 0, drain_records_per_sec: 0, coarsen_below_score: 2.0 }\nstate: { checkpoint_interval_ms: 0 }\n");
        for key in [
            "uplink.max_outbox_bytes",
            "uplink.ack_timeout_ms",
            "uplink.drain_records_per_sec",
            "uplink.coarsen_below_score",
            "state.checkpoint_interval_ms",
        ] {
            assert!(
                p.iter().any(|m| m.starts_with(key)),
                "{key} not reported in {p:?}"
            );
        }
    }

    #[test]
    fn models_settings_have_defaults_and_are_checked() {
        let cfg: AgentConfig = serde_norway::from_str("id: gw\n").unwrap();
        assert_eq!(cfg.models, ModelsConfig::default());
        assert!(
            !cfg.models.enabled,
            "opt-in until the shipped ACLs grant models/#"
        );
        assert_eq!(cfg.models.threshold, 0.5);
        let p = problems("id: gw\nmodels: { threshold: 0, staleness_ms: -1, min_fill: 1.5 }\n");
        for key in ["models.threshold", "models.staleness_ms", "models.min_fill"] {
            assert!(
                p.iter().any(|m| m.starts_with(key)),
                "{key} not reported in {p:?}"
            );
        }
        let p = problems("id: gw\nmodels: { threshold: .nan }\n");
        assert!(p.iter().any(|m| m.starts_with("models.threshold")), "{p:?}");
        let ok = problems("id: gw\nmodels: { enabled: false, threshold: 0.7, staleness_ms: 5000, min_fill: 0.75 }\n");
        assert!(ok.is_empty(), "{ok:?}");
        assert!(serde_norway::from_str::<AgentConfig>("id: gw\nmodels: { thresh: 1 }\n").is_err());
    }
}
