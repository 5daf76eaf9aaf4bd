//! The `cluster:` key of the aggregator's configuration: which NATS cluster coordinates the fleet's
//! aggregators, how to log in to it, and the timings of leases, heartbeats and checkpoints.
//!
//! Not owned here: connecting ([`super::kv`]), leases ([`super::lease`]), running a member
//! ([`super::node`]).

use serde::{Deserialize, Serialize};

/// Cluster coordination settings (`cluster:` in the aggregator's YAML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The coordination backend; only `nats` (JetStream KV) exists.
    #[serde(rename = "type")]
    pub kind: ClusterKind,
    /// Servers of the NATS cluster, `nats://host:port`; any one of them is enough to connect, the
    /// others are tried when it is down.
    pub servers: Vec<String>,
    /// Login to the NATS servers; anonymous when absent.
    #[serde(default)]
    pub credentials: Option<NatsCredentials>,
    /// TLS to the NATS servers (required for every server when present): `ca_file`, optional
    /// `client_cert_file` + `client_key_file`, `server_name` — the same block as an MQTT link's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<edgewatch_link::TlsSettings>,
    /// Lifetime of a partition lease without renewal (the KV bucket's `max_age`). Leader elections
    /// on nats-server 2.9 stop writes for 4–9 s, so production values stay around 20 s.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// Period of the membership heartbeat and of lease renewals.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Period of the checkpoint of each owned partition's state.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// Replicas of the KV buckets (members, leases, checkpoints): 3 survives one node down; at
    /// most the number of NATS nodes.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// How partitions are checkpointed: `incremental` (only what changed since the last
    /// checkpoint, compacted into a whole base now and then; the default) or `full` (the whole
    /// partition every time: the format before incremental checkpoints, which members of older
    /// versions read).
    #[serde(default)]
    pub checkpoint: CheckpointMode,
}

/// `cluster.checkpoint`: what each checkpoint of a partition writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointMode {
    /// Only the windows and lanes changed since the last checkpoint, as a delta record after a
    /// base; a whole base again when the deltas since the last one outgrow it.
    #[default]
    Incremental,
    /// The whole partition every time (what versions before incremental checkpoints wrote).
    Full,
}

/// The coordination backend (`type:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterKind {
    /// A NATS cluster with JetStream: KV buckets hold members, leases and checkpoints.
    Nats,
}

/// A NATS user and the environment variable holding its password (never the password itself, so
/// neither the file nor a `Debug` print can leak it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsCredentials {
    /// NATS user name.
    pub user: String,
    /// Name of the environment variable holding the password.
    pub password_env: String,
}

impl NatsCredentials {
    /// The password from the environment, or why it is missing (naming the variable, never a value).
    pub fn resolve_password(&self) -> Result<String, String> {
        std::env::var(&self.password_env).map_err(|_| {
            format!(
                "cluster.credentials.password_env: environment variable {} is not set (or not UTF-8)",
                self.password_env
            )
        })
    }
}

fn default_lease_ttl_ms() -> u64 {
    20_000
}
fn default_heartbeat_ms() -> u64 {
    4_000
}
fn default_checkpoint_interval_ms() -> u64 {
    200
}
fn default_replicas() -> usize {
    3
}

/// The smallest `max_age` JetStream accepts for a bucket.
const MIN_LEASE_TTL_MS: u64 = 100;

impl ClusterConfig {
    /// A NATS cluster config with every default.
    pub fn nats(servers: Vec<String>) -> Self {
        Self {
            kind: ClusterKind::Nats,
            servers,
            credentials: None,
            tls: None,
            lease_ttl_ms: default_lease_ttl_ms(),
            heartbeat_ms: default_heartbeat_ms(),
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
            replicas: default_replicas(),
            checkpoint: CheckpointMode::default(),
        }
    }

    /// The lease timing: trusted locally until one heartbeat before the TTL (the margin covers
    /// clock-rate differences and a renewal's latency; validation keeps it below the TTL).
    pub fn lease_timing(&self) -> super::LeaseTiming {
        let ttl = std::time::Duration::from_millis(self.lease_ttl_ms.max(MIN_LEASE_TTL_MS));
        let margin = std::time::Duration::from_millis(self.heartbeat_ms).min(ttl / 2);
        super::LeaseTiming::new(ttl, margin).unwrap_or_else(|_| {
            super::LeaseTiming::new(ttl, std::time::Duration::ZERO).expect("zero margin is valid")
        })
    }

    /// Every invalid value, as `key.path: message` relative to this section (the caller adds
    /// `cluster.`).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.servers.is_empty() {
            out.push("servers: must list at least one nats://host:port".into());
        }
        for (i, s) in self.servers.iter().enumerate() {
            if let Err(e) = check_server(s) {
                // A URL with user info may hold a password: it is not echoed.
                if s.contains('@') {
                    out.push(format!("servers[{i}]: {e}"));
                } else {
                    out.push(format!("servers[{i}]: {e}, got {s:?}"));
                }
            }
        }
        if let Some(c) = &self.credentials {
            if c.user.is_empty() {
                out.push("credentials.user: must not be empty".into());
            }
            if c.password_env.is_empty() || c.password_env.contains(['=', '\0']) {
                out.push(format!(
                    "credentials.password_env: must name an environment variable, got {:?}",
                    c.password_env
                ));
            }
        }
        if let Some(t) = &self.tls {
            out.extend(t.problems().into_iter().map(|p| format!("tls.{p}")));
        }
        if self.lease_ttl_ms < MIN_LEASE_TTL_MS {
            out.push(format!(
                "lease_ttl_ms: must be >= {MIN_LEASE_TTL_MS} (the smallest bucket max_age), got {}",
                self.lease_ttl_ms
            ));
        }
        // Three renewals per lifetime: a lease survives two lost or slow renewals in a row.
        if self.heartbeat_ms == 0 || self.heartbeat_ms.saturating_mul(3) > self.lease_ttl_ms {
            out.push(format!(
                "heartbeat_ms: must be > 0 and at most lease_ttl_ms / 3 ({}), got {}",
                self.lease_ttl_ms / 3,
                self.heartbeat_ms
            ));
        }
        if self.checkpoint_interval_ms == 0 {
            out.push("checkpoint_interval_ms: must be > 0, got 0".into());
        }
        if !(1..=5).contains(&self.replicas) {
            out.push(format!(
                "replicas: must be 1 to 5 (JetStream's limit), got {}",
                self.replicas
            ));
        }
        out
    }
}

/// Checks `nats://host:port` or `tls://host:port` (TLS settings come from `cluster.tls`).
fn check_server(s: &str) -> Result<(), &'static str> {
    let rest = s
        .strip_prefix("nats://")
        .or_else(|| s.strip_prefix("tls://"))
        .ok_or("expected nats://host:port (or tls://host:port)")?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or("expected nats://host:port (the port is required)")?;
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err("expected nats://host:port with a host name or address (credentials go in cluster.credentials)");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("expected nats://host:port with a port in 1..=65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_lease_recipe() {
        let c = ClusterConfig::nats(vec!["nats://127.0.0.1:4222".into()]);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert_eq!((c.lease_ttl_ms, c.heartbeat_ms), (20_000, 4_000));
        assert_eq!(c.checkpoint_interval_ms, 200);
    }

    #[test]
    fn yaml_with_type_servers_and_credentials_parses() {
        let c: ClusterConfig = serde_json::from_value(serde_json::json!({
            "type": "nats",
            "servers": ["nats://n1:4222", "nats://[::1]:4223"],
            "credentials": {"user": "agg", "password_env": "NATS_PASSWORD"},
            "lease_ttl_ms": 15000
        }))
        .unwrap();
        assert_eq!(c.kind, ClusterKind::Nats);
        assert_eq!(c.lease_ttl_ms, 15_000);
        assert_eq!(c.heartbeat_ms, 4000);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
    }

    #[test]
    fn checkpoints_are_incremental_unless_full_is_asked_for() {
        let c = ClusterConfig::nats(vec!["nats://n1:4222".into()]);
        assert_eq!(c.checkpoint, CheckpointMode::Incremental);
        let full: ClusterConfig = serde_json::from_value(serde_json::json!({
            "type": "nats", "servers": ["nats://n1:4222"], "checkpoint": "full"
        }))
        .unwrap();
        assert_eq!(full.checkpoint, CheckpointMode::Full);
        let e = serde_json::from_value::<ClusterConfig>(serde_json::json!({
            "type": "nats", "servers": ["nats://n1:4222"], "checkpoint": "sometimes"
        }))
        .unwrap_err();
        assert!(e.to_string().contains("incremental"), "{e}");
    }

    #[test]
    fn unknown_types_and_fields_are_rejected() {
        let bad_type = serde_json::json!({"type": "etcd", "servers": []});
        assert!(serde_json::from_value::<ClusterConfig>(bad_type).is_err());
        let bad_field = serde_json::json!({"type": "nats", "servers": [], "password": "hunter2"});
        assert!(serde_json::from_value::<ClusterConfig>(bad_field).is_err());
    }

    #[test]
    fn every_bad_value_is_reported_with_its_key() {
        let mut c = ClusterConfig::nats(vec![
            "127.0.0.1:4222".into(),
            "nats://host".into(),
            "nats://user:pw@host:4222".into(),
            "nats://host:0".into(),
        ]);
        c.credentials = Some(NatsCredentials {
            user: String::new(),
            password_env: "A=B".into(),
        });
        c.lease_ttl_ms = 50;
        c.heartbeat_ms = 0;
        c.checkpoint_interval_ms = 0;
        let p = c.problems();
        for key in [
            "servers[0]:",
            "servers[1]:",
            "servers[2]:",
            "servers[3]:",
            "credentials.user:",
            "credentials.password_env:",
            "lease_ttl_ms:",
            "heartbeat_ms:",
            "checkpoint_interval_ms:",
        ] {
            assert!(p.iter().any(|m| m.starts_with(key)), "{key} in {p:?}");
        }
        assert!(!p.iter().any(|m| m.contains("pw")), "{p:?}");
    }

    #[test]
    fn heartbeat_must_leave_room_for_two_missed_renewals() {
        let mut c = ClusterConfig::nats(vec!["nats://h:4222".into()]);
        c.lease_ttl_ms = 9_000;
        c.heartbeat_ms = 3_000;
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        c.heartbeat_ms = 3_001;
        assert!(c.problems()[0].starts_with("heartbeat_ms:"));
    }

    #[test]
    fn a_missing_password_variable_is_named_not_a_value() {
        let c = NatsCredentials {
            user: "agg".into(),
            password_env: "EDGEWATCH_TEST_SURELY_UNSET_VAR".into(),
        };
        let e = c.resolve_password().unwrap_err();
        assert!(e.contains("EDGEWATCH_TEST_SURELY_UNSET_VAR"), "{e}");
    }
}
