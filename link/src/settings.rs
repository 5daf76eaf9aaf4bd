//! How to reach an MQTT broker: the connection settings every component's YAML shares.
//!
//! Plain data and validation; [`crate::options`] maps it onto rumqttc (TLS through [`crate::tls`]).
//! Secrets never appear in `Debug` output, and the password may come from an environment variable
//! (`password_env`).

use crate::tls::TlsSettings;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Connection settings for one MQTT link.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttLink {
    /// Broker host name or address.
    #[serde(default = "default_host")]
    pub host: String,
    /// Broker TCP port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Client id; defaults to the component's id plus a role suffix.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name, when the broker requires one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password given inline (prefer `password_env`).
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// MQTT keep-alive interval.
    #[serde(default = "default_keepalive_secs")]
    pub keepalive_secs: u64,
    /// Largest MQTT packet accepted or sent, in bytes; larger incoming packets break the connection,
    /// so keep this above anything a sensor might send.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// Capacity of the client's request channel (publishes queued towards the socket).
    #[serde(default = "default_request_channel")]
    pub request_channel: usize,
    /// QoS 1 publishes awaiting their PubAck at once (rumqttc's in-flight window); when absent,
    /// `request_channel` capped at 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<u16>,
    /// Further brokers (`host:port`), tried in turn after `host:port` whenever the current one fails.
    #[serde(default)]
    pub alternates: Vec<String>,
    /// TLS towards every broker of the link; plain TCP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
}

fn default_host() -> String {
    "127.0.0.1".to_string()
}
fn default_port() -> u16 {
    1883
}
fn default_keepalive_secs() -> u64 {
    30
}
fn default_max_packet_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_request_channel() -> usize {
    1000
}

impl Default for MqttLink {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_port(),
            client_id: None,
            username: None,
            password: None,
            password_env: None,
            keepalive_secs: default_keepalive_secs(),
            max_packet_bytes: default_max_packet_bytes(),
            request_channel: default_request_channel(),
            max_inflight: None,
            alternates: Vec::new(),
            tls: None,
        }
    }
}

impl fmt::Debug for MqttLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttLink")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_env", &self.password_env)
            .field("keepalive_secs", &self.keepalive_secs)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .field("request_channel", &self.request_channel)
            .field("max_inflight", &self.max_inflight)
            .field("alternates", &self.alternates)
            .field("tls", &self.tls)
            .finish()
    }
}

impl MqttLink {
    /// Problems with these settings, each as `field: message` (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.host.trim().is_empty() {
            out.push("host: must not be empty".to_string());
        }
        if self.port == 0 {
            out.push("port: must be in 1..=65535, got 0".to_string());
        }
        if self.keepalive_secs < 5 {
            out.push(format!(
                "keepalive_secs: must be >= 5, got {}",
                self.keepalive_secs
            ));
        }
        if self.max_packet_bytes < 1024 {
            out.push(format!(
                "max_packet_bytes: must be >= 1024, got {}",
                self.max_packet_bytes
            ));
        }
        for (i, a) in self.alternates.iter().enumerate() {
            if parse_address(a).is_none() {
                out.push(format!(
                    "alternates[{i}]: expected host:port with a port in 1..=65535, got {a:?}"
                ));
            }
        }
        if self.request_channel == 0 {
            out.push("request_channel: must be > 0, got 0".to_string());
        }
        if self.max_inflight == Some(0) {
            out.push("max_inflight: must be > 0, got 0".to_string());
        }
        if self.password.is_some() && self.password_env.is_some() {
            out.push("password: set either password or password_env, not both".to_string());
        }
        if (self.password.is_some() || self.password_env.is_some()) && self.username.is_none() {
            out.push("username: required when a password is set".to_string());
        }
        if let Some(tls) = &self.tls {
            out.extend(tls.problems().into_iter().map(|p| format!("tls.{p}")));
        }
        out
    }

    /// Every broker address in the order they are tried: `host:port`, then the alternates.
    pub fn addresses(&self) -> Vec<(String, u16)> {
        std::iter::once((self.host.clone(), self.port))
            .chain(self.alternates.iter().filter_map(|a| parse_address(a)))
            .collect()
    }

    /// The in-flight window: `max_inflight`, else `request_channel` capped at 1000 (at least 1).
    pub fn inflight(&self) -> u16 {
        self.max_inflight.unwrap_or_else(|| {
            // Cannot fail: clamped into 1..=1000.
            u16::try_from(self.request_channel.clamp(1, 1000)).unwrap_or(1000)
        })
    }

    /// `host:port` of the primary broker, as errors and logs name it.
    pub fn primary(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The password, read from `password_env` when set. Errors name the variable, never its value.
    pub fn resolve_password(&self) -> Result<Option<String>, String> {
        match (&self.password, &self.password_env) {
            (Some(p), _) => Ok(Some(p.clone())),
            (None, Some(var)) => std::env::var(var).map(Some).map_err(|_| {
                format!("password_env: environment variable {var} is not set (or not UTF-8)")
            }),
            (None, None) => Ok(None),
        }
    }
}

/// `host:port` (IPv6 hosts in brackets) with a port in 1..=65535.
fn parse_address(a: &str) -> Option<(String, u16)> {
    let (host, port) = a.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    (!host.is_empty()).then(|| (host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternates_follow_the_primary_and_bad_ones_are_named() {
        let link = MqttLink {
            alternates: vec!["10.0.0.2:1884".into(), "[::1]:1885".into()],
            ..Default::default()
        };
        assert_eq!(
            link.addresses(),
            vec![
                ("127.0.0.1".to_string(), 1883),
                ("10.0.0.2".to_string(), 1884),
                ("::1".to_string(), 1885)
            ]
        );
        let bad = MqttLink {
            alternates: vec!["nohost".into(), "h:0".into()],
            ..Default::default()
        };
        let p = bad.problems();
        assert!(
            p[0].starts_with("alternates[0]:") && p[1].starts_with("alternates[1]:"),
            "{p:?}"
        );
    }

    #[test]
    fn debug_output_hides_the_password() {
        let link = MqttLink {
            username: Some("u".into()),
            password: Some("hunter2".into()),
            ..Default::default()
        };
        let shown = format!("{link:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(!serde_json::to_string(&link).unwrap().contains("hunter2"));
    }

    #[test]
    fn problems_name_field_and_value() {
        let link = MqttLink {
            port: 0,
            keepalive_secs: 1,
            password: Some("x".into()),
            ..Default::default()
        };
        let p = link.problems();
        assert!(p.iter().any(|m| m.starts_with("port:")));
        assert!(p.iter().any(|m| m.contains("got 1")));
        assert!(p.iter().any(|m| m.starts_with("username:")));
        assert!(MqttLink::default().problems().is_empty());
        let zero = MqttLink {
            max_inflight: Some(0),
            ..Default::default()
        };
        assert_eq!(zero.problems(), vec!["max_inflight: must be > 0, got 0"]);
    }

    #[test]
    fn inflight_defaults_to_the_request_channel_capped_at_1000() {
        let mut link = MqttLink::default();
        assert_eq!(link.inflight(), 1000);
        link.request_channel = 10;
        assert_eq!(link.inflight(), 10);
        link.max_inflight = Some(77);
        assert_eq!(link.inflight(), 77);
    }

    #[test]
    fn tls_problems_are_prefixed_with_the_tls_key() {
        let link = MqttLink {
            tls: Some(TlsSettings {
                client_cert_file: Some("client.pem".into()),
                ..TlsSettings::with_ca("")
            }),
            ..Default::default()
        };
        let p = link.problems();
        assert!(
            p.contains(&"tls.ca_file: must not be empty".to_string()),
            "{p:?}"
        );
        assert!(
            p.contains(&"tls.client_key_file: required when client_cert_file is set".to_string()),
            "{p:?}"
        );
    }

    #[test]
    fn tls_block_parses_and_shows_paths_but_no_secrets_in_debug() {
        let link: MqttLink = serde_json::from_str(
            r#"{"host":"b","port":8883,"username":"u","password":"hunter2",
                "tls":{"ca_file":"/etc/ca.pem","client_cert_file":"c.pem","client_key_file":"k.pem"}}"#,
        )
        .unwrap();
        assert!(link.problems().is_empty(), "{:?}", link.problems());
        let shown = format!("{link:?}");
        assert!(
            shown.contains("/etc/ca.pem") && !shown.contains("hunter2"),
            "{shown}"
        );
        let e = serde_json::from_str::<MqttLink>(r#"{"tls":{"ca_file":"a","key":"k"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `key`"), "{e}");
    }

    #[test]
    fn missing_password_variable_is_named() {
        let link = MqttLink {
            username: Some("u".into()),
            password_env: Some("EDGEWATCH_TEST_SURELY_UNSET_VAR".into()),
            ..Default::default()
        };
        let e = link.resolve_password().unwrap_err();
        assert!(e.contains("EDGEWATCH_TEST_SURELY_UNSET_VAR"));
    }
}
