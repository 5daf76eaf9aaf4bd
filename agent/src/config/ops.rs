//! Settings for operating the agent: its HTTP endpoint (`http:`) and the lines it logs on its own
//! (`log:`). `uplink.ack_warn_ms`, the threshold of the no-ack warning and of `/readyz`, lives with
//! the other uplink settings.

use serde::{Deserialize, Serialize};

/// The agent's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
///
/// Off unless `listen` is given: several agents may share a gateway (a fixed default port would
/// make the second one fail to start), and an agent embedded as a library must not open a port
/// nobody asked for. The shipped `configs/agent.yaml` turns it on, on loopback.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on, e.g. `127.0.0.1:9187`; port 0 picks a free port. Off when absent.
    /// Only an address given here opens the port beyond loopback (`0.0.0.0:9187`).
    #[serde(default)]
    pub listen: Option<String>,
    /// Name of an environment variable holding a bearer token. When set, `/metrics` and `/readyz`
    /// answer 401 unless the request carries `Authorization: Bearer <token>` (`/healthz` stays
    /// open, as on the aggregator).
    #[serde(default)]
    pub auth_token_env: Option<String>,
}

impl HttpConfig {
    /// Every invalid value, as `key: message` (keys relative to `http.`).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(listen) = &self.listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                out.push(format!(
                    "listen: expected an address such as 127.0.0.1:9187, got {listen:?}"
                ));
            }
        }
        if let Some(var) = &self.auth_token_env {
            if var.is_empty() || var.contains(['=', '\0']) {
                out.push(format!(
                    "auth_token_env: must name an environment variable, got {var:?}"
                ));
            }
        }
        out
    }

    /// The listen address, when the endpoint is on and the address valid.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.as_deref().and_then(|l| l.parse().ok())
    }
}

/// What the agent logs on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Period of the one-line INFO status (readings/s, series, windows, outbox, oldest unacked
    /// record, lag), ms; 0 turns it off.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// Log filter of `edgewatch agent` (`info`, `debug`, `warn,edgewatch_agent=debug`), applied at
    /// start and by every reload; `--log-level` and `RUST_LOG` win over it. Default: `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            status_interval_ms: default_status_interval_ms(),
            level: None,
        }
    }
}

fn default_status_interval_ms() -> u64 {
    60_000
}

/// The retained status the agent publishes on `{prefix}/status/{agent}` over its uplink (remote node
/// management: every aggregator lists the fleet's agents at `GET /api/agents`), with an MQTT last
/// will marking it offline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Period of the status message, ms; 0 publishes none (and sets no last will).
    #[serde(default = "default_status_publish_ms")]
    pub interval_ms: u64,
    /// Take configuration pushed (retained) on `{prefix}/config/{agent}`: validated like the file,
    /// applied like a reload, outcome in the status. Needs broker ACLs that let only operators and
    /// aggregators write that topic (`configs/security/`).
    #[serde(default = "default_remote_config")]
    pub remote_config: bool,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            interval_ms: default_status_publish_ms(),
            remote_config: default_remote_config(),
        }
    }
}

fn default_status_publish_ms() -> u64 {
    5_000
}
fn default_remote_config() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_off_by_default_and_its_keys_are_checked() {
        let h = HttpConfig::default();
        assert!(h.listen.is_none() && h.addr().is_none());
        let bad = HttpConfig {
            listen: Some("localhost".into()),
            auth_token_env: Some(String::new()),
        };
        let p = bad.problems();
        assert!(
            p.iter()
                .any(|m| m.starts_with("listen:") && m.contains("\"localhost\"")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.starts_with("auth_token_env:")), "{p:?}");
        let ok = HttpConfig {
            listen: Some("0.0.0.0:9187".into()),
            auth_token_env: Some("EDGEWATCH_AGENT_TOKEN".into()),
        };
        assert!(ok.problems().is_empty());
        assert_eq!(ok.addr().unwrap().port(), 9187);
    }

    #[test]
    fn the_status_message_defaults_to_five_seconds_with_remote_config() {
        let s = StatusConfig::default();
        assert_eq!((s.interval_ms, s.remote_config), (5_000, true));
    }

    #[test]
    fn the_status_line_defaults_to_a_minute() {
        assert_eq!(LogConfig::default().status_interval_ms, 60_000);
    }
}
