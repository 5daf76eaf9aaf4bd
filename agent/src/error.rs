//! Errors of the agent: why a message was rejected, and why the daemon could not start.

use thiserror::Error;

/// Why an incoming sensor message produced no reading. Never fatal: counted, logged with its topic,
/// and the next message is processed as usual.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum IngestError {
    /// The topic is not valid UTF-8.
    #[error("topic is not valid UTF-8")]
    NonUtf8Topic,
    /// No configured pattern matches the topic.
    #[error("topic matches no subscription pattern")]
    TopicMismatch,
    /// Some part of the message is not UTF-8 text where text was expected.
    #[error("{what} is not valid UTF-8")]
    NotUtf8 {
        /// Which part.
        what: &'static str,
    },
    /// The payload is empty.
    #[error("empty payload")]
    EmptyPayload,
    /// The payload exceeds `pipeline.max_payload_bytes`.
    #[error("payload of {size} bytes exceeds max_payload_bytes = {max}")]
    PayloadTooLarge {
        /// Payload size.
        size: usize,
        /// Configured limit.
        max: usize,
    },
    /// The payload is not the JSON the mapping expects.
    #[error("bad json: {detail}")]
    BadJson {
        /// serde_json's description, with line and column.
        detail: String,
    },
    /// A bare-number payload does not parse as a number.
    #[error("not a number: {text:?}")]
    BadNumber {
        /// The start of the text.
        text: String,
    },
    /// A required field is absent.
    #[error("missing field {field:?}")]
    MissingField {
        /// Field name.
        field: String,
    },
    /// A value is NaN or infinite.
    #[error("field {field:?} is not a finite number")]
    NonFinite {
        /// Field name.
        field: String,
    },
    /// The timestamp is outside [1970, 2200).
    #[error("timestamp {value} is out of range (check timestamp_unit)")]
    TimestampOutOfRange {
        /// The raw timestamp.
        value: f64,
    },
    /// The timestamp is further ahead of the agent's clock than `window.max_future_ms`: a sensor
    /// clock that is wrong (or a forged reading). Accepting it would move the series' event time
    /// ahead and make its next readings late.
    #[error("timestamp {ts_ms} is {ahead_ms} ms ahead of the agent's clock (window.max_future_ms = {max_ms}); check the sensor's clock, or the gateway's")]
    TimestampInFuture {
        /// The reading's timestamp, ms.
        ts_ms: i64,
        /// How far ahead of the agent's clock it is, ms.
        ahead_ms: i64,
        /// The configured bound.
        max_ms: i64,
    },
    /// A finite value too large in magnitude to summarise exactly
    /// (see [`edgewatch_models::stats::MAX_ABS_VALUE`]).
    #[error("field {field:?} = {value:e} is outside the supported range ±1e100")]
    ValueOutOfRange {
        /// Field name.
        field: String,
        /// The value.
        value: f64,
    },
    /// A device id or metric name is empty or too long.
    #[error("{what} of {len} bytes is empty or longer than {max} bytes")]
    BadName {
        /// `device id` or `metric`.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Neither the topic nor the configuration names the metric.
    #[error("no metric: the topic has no {{metric}} level and the subscription names none")]
    NoMetric,
    /// `pipeline.max_series` series are already tracked.
    #[error("series limit reached (pipeline.max_series = {max}); reading dropped")]
    TooManySeries {
        /// The limit.
        max: usize,
    },
}

impl IngestError {
    /// A short stable label for metrics (`reason` label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NonUtf8Topic => "non_utf8_topic",
            Self::TopicMismatch => "topic_mismatch",
            Self::NotUtf8 { .. } => "not_utf8",
            Self::EmptyPayload => "empty_payload",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::BadJson { .. } => "bad_json",
            Self::BadNumber { .. } => "bad_number",
            Self::MissingField { .. } => "missing_field",
            Self::NonFinite { .. } => "non_finite",
            Self::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            Self::TimestampInFuture { .. } => "timestamp_in_future",
            Self::ValueOutOfRange { .. } => "value_out_of_range",
            Self::BadName { .. } => "bad_name",
            Self::NoMetric => "no_metric",
            Self::TooManySeries { .. } => "too_many_series",
        }
    }

    /// Every reason label, for metric exposition.
    pub const REASONS: [&'static str; 15] = [
        "non_utf8_topic",
        "topic_mismatch",
        "not_utf8",
        "empty_payload",
        "payload_too_large",
        "bad_json",
        "bad_number",
        "missing_field",
        "non_finite",
        "timestamp_out_of_range",
        "timestamp_in_future",
        "value_out_of_range",
        "bad_name",
        "no_metric",
        "too_many_series",
    ];
}

/// Why the agent could not start or had to stop.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The configuration is invalid; each entry is `key.path: problem`.
    #[error("invalid agent configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// A required secret could not be resolved.
    #[error("{0}")]
    Secret(String),
    /// The outbox (state.dir) could not be opened or read.
    #[error("outbox: {0}")]
    Outbox(#[from] crate::outbox::OutboxError),
    /// A thread or task of the agent could not be started.
    #[error("{0}")]
    Io(String),
    /// The TLS files of a link could not be loaded; retrying will not help until they are fixed.
    #[error("mqtt link to {broker}: {source}")]
    Tls {
        /// The link's primary broker, `host:port`.
        broker: String,
        /// Which file or setting, and why.
        source: edgewatch_link::TlsError,
    },
    /// A pipeline snapshot could not be restored; the caller starts with empty state.
    #[error("cannot restore pipeline snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// One of the agent's tasks (source, worker, uplink, uplink link) panicked or ended
    /// unexpectedly; the agent stopped the others in order. A bug: retrying may not help.
    #[error("agent task {task} failed: {detail}")]
    TaskFailed {
        /// The task's name.
        task: &'static str,
        /// The panic message, or how it ended.
        detail: String,
    },
}

impl From<edgewatch_link::LinkError> for AgentError {
    fn from(e: edgewatch_link::LinkError) -> Self {
        match e {
            edgewatch_link::LinkError::Secret(why) => AgentError::Secret(why),
            edgewatch_link::LinkError::Tls { broker, source } => AgentError::Tls { broker, source },
        }
    }
}

/// Why a pipeline snapshot could not be written or read back. Never a panic: a snapshot comes from
/// disk, so anything may be in it. Whatever the cause, restoring is safe to give up on: the agent
/// starts with empty state (retrying the same bytes gives the same answer).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SnapshotError {
    /// Shorter than the version byte, fingerprint and checksum alone.
    #[error("snapshot of {len} bytes is truncated")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// Written in another format version.
    #[error("snapshot format version {found} is not the supported version {expected}")]
    Version {
        /// Version byte found.
        found: u8,
        /// The version this agent writes and reads.
        expected: u8,
    },
    /// The checksum does not match: the bytes were damaged or cut short.
    #[error("snapshot is corrupt: checksum {found:016x}, computed {expected:016x}")]
    Checksum {
        /// Checksum stored in the snapshot.
        found: u64,
        /// Checksum of the bytes read.
        expected: u64,
    },
    /// Taken under another window size or lateness, detector configuration or partition count (or
    /// by an agent whose detector or window types differ).
    #[error(
        "snapshot was taken with another window, detector or partitions configuration, or by an \
         edgewatch version with another state layout (fingerprint {found:016x}, expected \
         {expected:016x})"
    )]
    Incompatible {
        /// Fingerprint stored in the snapshot.
        found: u64,
        /// Fingerprint of the current configuration.
        expected: u64,
    },
    /// The checksum matched but the body does not decode into consistent state.
    #[error("snapshot is corrupt: {detail}")]
    Invalid {
        /// What is wrong.
        detail: String,
    },
    /// The state could not be encoded.
    #[error("cannot encode snapshot: {detail}")]
    Encode {
        /// The encoder's message.
        detail: String,
    },
}
