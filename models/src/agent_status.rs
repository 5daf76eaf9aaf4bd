//! The status an agent publishes, retained, on `{prefix}/status/{agent}` (and, as its MQTT last will,
//! `{"agent": ..., "online": false}`): the one wire type of remote node management, shared by the
//! agent that writes it and the aggregators that keep the fleet's agents. Checking a received record
//! ([`AgentStatus::parse`]) is here too, so every reader refuses the same forgeries.

use crate::wire::is_valid_node_id;
use serde::{Deserialize, Serialize};

/// Largest status message accepted, bytes. A real one is a few hundred bytes.
pub const MAX_STATUS_BYTES: usize = 8 * 1024;
/// Longest `last_error` or refusal message kept, characters (longer ones are cut).
pub const MAX_ERROR_CHARS: usize = 512;

/// One agent's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent id; must equal the topic's.
    pub agent: String,
    /// `false` in the last will and in the message of a clean stop.
    pub online: bool,
    /// edgewatch version of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Digest of the configuration in force (16 hex digits of XXH3-64 of its canonical JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Seconds since the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    /// (device, metric) series tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<u64>,
    /// Readings per second since the previous status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readings_per_s: Option<f64>,
    /// Bytes held in the outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_bytes: Option<u64>,
    /// Age of the oldest record not yet acknowledged by its owner, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unacked_age_ms: Option<u64>,
    /// The latest error worth an operator's attention, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Outcome of the latest configuration change (reload or remote configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigReport>,
    /// How often the agent publishes its status, ms (a reader flags a record older than a few
    /// intervals as stale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// The agent's clock when it published this, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_ms: Option<i64>,
}

/// What became of the latest configuration change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigReport {
    /// Where the configuration in force comes from: `file`, or `remote` (the file with the
    /// configuration pushed on `{prefix}/config/{agent}` over it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Digest of the configuration applied by the latest change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<String>,
    /// Why the latest change was refused (the configuration in force did not change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<ConfigRefusal>,
    /// Keys changed in the configuration that take effect only at the next start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<String>,
}

/// A configuration that was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRefusal {
    /// Every problem, as `config check` prints them.
    pub error: String,
    /// Line of the first problem, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

/// Why a status message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusRefusal {
    /// Over [`MAX_STATUS_BYTES`].
    TooLarge,
    /// Not the JSON of an [`AgentStatus`].
    Malformed,
    /// The topic's agent id is not `[A-Za-z0-9_-]{1,64}`.
    BadId,
    /// The body names another agent than the topic.
    IdMismatch,
}

impl StatusRefusal {
    /// Label value of the refusal counter.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::BadId => "bad_id",
            Self::IdMismatch => "id_mismatch",
        }
    }
}

impl AgentStatus {
    /// An offline record: the last will, or the message of a clean stop.
    pub fn offline(agent: &str) -> Self {
        Self {
            agent: agent.into(),
            online: false,
            version: None,
            config_digest: None,
            uptime_s: None,
            series: None,
            readings_per_s: None,
            outbox_bytes: None,
            oldest_unacked_age_ms: None,
            last_error: None,
            config: None,
            interval_ms: None,
            updated_ms: None,
        }
    }

    /// Checks a message received on the status topic of `topic_agent`: size, JSON, id in the topic
    /// and in the body. Over-long texts are cut to [`MAX_ERROR_CHARS`] and a non-finite rate dropped,
    /// so what is kept is bounded whatever the sender wrote.
    pub fn parse(topic_agent: &str, payload: &[u8]) -> Result<Self, StatusRefusal> {
        if !is_valid_node_id(topic_agent) {
            return Err(StatusRefusal::BadId);
        }
        if payload.len() > MAX_STATUS_BYTES {
            return Err(StatusRefusal::TooLarge);
        }
        let mut s: Self = serde_json::from_slice(payload).map_err(|_| StatusRefusal::Malformed)?;
        if s.agent != topic_agent {
            return Err(StatusRefusal::IdMismatch);
        }
        for text in [&mut s.version, &mut s.config_digest, &mut s.last_error]
            .into_iter()
            .flatten()
        {
            clip(text);
        }
        if let Some(c) = &mut s.config {
            if let Some(r) = &mut c.refused {
                clip(&mut r.error);
            }
            c.restart_needed.truncate(64);
            c.restart_needed.iter_mut().for_each(clip);
        }
        s.readings_per_s = s.readings_per_s.filter(|r| r.is_finite());
        Ok(s)
    }
}

/// Cuts `text` to [`MAX_ERROR_CHARS`] characters.
pub fn clip(text: &mut String) {
    if let Some((at, _)) = text.char_indices().nth(MAX_ERROR_CHARS) {
        text.truncate(at);
        text.push('…');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offline_record_is_just_the_id_and_the_flag() {
        let json = serde_json::to_string(&AgentStatus::offline("gw-1")).unwrap();
        assert_eq!(json, r#"{"agent":"gw-1","online":false}"#);
        assert_eq!(
            AgentStatus::parse("gw-1", json.as_bytes()).unwrap(),
            AgentStatus::offline("gw-1")
        );
    }

    #[test]
    fn forged_and_malformed_records_are_refused_by_reason() {
        let body = br#"{"agent":"gw-1","online":true}"#;
        assert_eq!(
            AgentStatus::parse("gw-2", body),
            Err(StatusRefusal::IdMismatch)
        );
        assert_eq!(AgentStatus::parse("gw 1", body), Err(StatusRefusal::BadId));
        assert_eq!(
            AgentStatus::parse("gw-1", b"not json"),
            Err(StatusRefusal::Malformed)
        );
        assert_eq!(
            AgentStatus::parse("gw-1", br#"{"agent":"gw-1","online":"yes"}"#),
            Err(StatusRefusal::Malformed)
        );
        let big = format!(
            r#"{{"agent":"gw-1","online":true,"last_error":"{}"}}"#,
            "x".repeat(MAX_STATUS_BYTES)
        );
        assert_eq!(
            AgentStatus::parse("gw-1", big.as_bytes()),
            Err(StatusRefusal::TooLarge)
        );
    }

    #[test]
    fn long_texts_are_cut_and_unknown_fields_ignored() {
        let body = format!(
            r#"{{"agent":"gw-1","online":true,"future_field":1,"last_error":"{}","readings_per_s":1.5}}"#,
            "é".repeat(2_000)
        );
        let s = AgentStatus::parse("gw-1", body.as_bytes()).unwrap();
        assert_eq!(
            s.last_error.as_ref().unwrap().chars().count(),
            MAX_ERROR_CHARS + 1
        );
        assert_eq!(s.readings_per_s, Some(1.5));
    }

    #[test]
    fn a_config_report_serialises_as_documented() {
        let r = ConfigReport {
            source: Some("remote".into()),
            applied: None,
            refused: Some(ConfigRefusal {
                error:
                    "remote config: anomaly.threshold (line 2, col 14): must be in (0, 1], got 7"
                        .into(),
                line: Some(2),
            }),
            restart_needed: vec![],
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"source": "remote", "refused": {"error": "remote config: anomaly.threshold (line 2, col 14): must be in (0, 1], got 7", "line": 2}})
        );
    }
}
