//! The aggregator's YAML configuration: its broker, the partitions it owns (or the NATS cluster it
//! wins them through), its HTTP listener and the feed's limits. Unknown fields are
//! rejected; [`AggregatorConfig::problems`] reports every invalid value at once.

use crate::cluster::ClusterConfig;
use edgewatch_link::MqttLink;
use edgewatch_models::wire::{is_valid_node_id, DEFAULT_PREFIX};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Top-level aggregator configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Aggregator id, `[A-Za-z0-9_-]{1,64}`.
    pub id: String,
    /// The cloud broker agents publish to.
    #[serde(default)]
    pub mqtt: MqttLink,
    /// Uplink topic prefix (must match the agents').
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Partitions in the deployment (must match the agents').
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Partitions this instance owns: numbers or inclusive ranges such as `"0-31"`. Ignored in
    /// cluster mode, where partitions are won by lease.
    #[serde(default = "default_owned")]
    pub owned: Vec<PartitionSpec>,
    /// HTTP API, dashboard and WebSocket feed.
    #[serde(default)]
    pub http: HttpConfig,
    /// Live feed limits.
    #[serde(default)]
    pub feed: FeedConfig,
    /// Per-device state limits.
    #[serde(default)]
    pub state: StateConfig,
    /// Cluster mode on NATS JetStream: partitions are won by lease among the live members and
    /// their state is checkpointed to the cluster's KV (then `state.dir` must be absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Fleet peer groups: device profiles clustered per class, `detector: "fleet"` events.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// Device models trained here from the agents' training samples and pushed to them.
    #[serde(default)]
    pub training: TrainingConfig,
    /// The owners directory: this instance's retained record on `{prefix}/owners/{id}` and how
    /// everyone else's are judged (see the `directory` module).
    #[serde(default)]
    pub owners: OwnersConfig,
    /// Logging.
    #[serde(default)]
    pub log: AggregatorLog,
}

/// The aggregator's logging.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorLog {
    /// Log filter of `edgewatch aggregator` (`info`, `debug`, `warn,edgewatch_aggregator=debug`),
    /// applied at start and by every reload; `--log-level` and `RUST_LOG` win over it. Default:
    /// `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

/// Timing of the owners directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnersConfig {
    /// How often this instance publishes its owners record (also at once when what it owns
    /// changes), ms.
    #[serde(default = "default_owners_publish_ms")]
    pub publish_interval_ms: u64,
    /// A record not refreshed for this long is stale: its aggregator counts as gone and its
    /// partitions as uncovered. At least twice `publish_interval_ms`.
    #[serde(default = "default_owners_stale_ms")]
    pub stale_after_ms: u64,
    /// Uncovered and overlapping partitions are reported only this long after start, once the
    /// retained records have arrived.
    #[serde(default = "default_owners_grace_ms")]
    pub startup_grace_ms: u64,
}

impl Default for OwnersConfig {
    fn default() -> Self {
        Self {
            publish_interval_ms: default_owners_publish_ms(),
            stale_after_ms: default_owners_stale_ms(),
            startup_grace_ms: default_owners_grace_ms(),
        }
    }
}

impl OwnersConfig {
    /// Every invalid value, as `key: message` (without the `owners.` prefix).
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(100..=MAX_HTTP_TIMEOUT_MS).contains(&self.publish_interval_ms) {
            out.push(format!(
                "publish_interval_ms: must be in 100..={MAX_HTTP_TIMEOUT_MS} (one day), got {}",
                self.publish_interval_ms
            ));
        }
        if self.stale_after_ms < self.publish_interval_ms.saturating_mul(2)
            || self.stale_after_ms > MAX_HTTP_TIMEOUT_MS
        {
            out.push(format!(
                "stale_after_ms: must be at least twice publish_interval_ms ({}) and at most {MAX_HTTP_TIMEOUT_MS}, got {}",
                self.publish_interval_ms, self.stale_after_ms
            ));
        }
        if self.startup_grace_ms > MAX_HTTP_TIMEOUT_MS {
            out.push(format!(
                "startup_grace_ms: must be at most {MAX_HTTP_TIMEOUT_MS} (one day), got {}",
                self.startup_grace_ms
            ));
        }
        out
    }
}

fn default_owners_publish_ms() -> u64 {
    5_000
}
fn default_owners_stale_ms() -> u64 {
    15_000
}
fn default_owners_grace_ms() -> u64 {
    10_000
}

/// The `host:port` (or `host`) of an `http://host[:port][/]` URL, or what is wrong with it. Plain
/// HTTP only: the aggregators' requests to each other do not speak TLS.
pub fn http_authority(url: &str) -> Result<&str, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "expected http://HOST:PORT (plain HTTP, which instances use to reach each other), got {:?}",
            url.chars().take(100).collect::<String>()
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let bad = authority.is_empty()
        || url.len() > 256
        || authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '@'));
    let port_ok = match authority.rsplit_once(':') {
        // An IPv6 literal without a port: "[::1]".
        Some((host, _)) if authority.ends_with(']') => host.starts_with('['),
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => true,
    };
    if bad || !port_ok {
        return Err(format!(
            "expected http://HOST:PORT with nothing after the port, got {:?}",
            url.chars().take(100).collect::<String>()
        ));
    }
    Ok(authority)
}

/// Training device (PCA) models from the agents' training lanes (see the `training` module): off
/// unless `enabled`. The rest are [`TrainConfig`]'s settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Subscribe to the owned partitions' training lanes, keep training sets, fit and publish
    /// models. In cluster mode only the member holding the `trainer` lease does (see
    /// `cluster::trainer`).
    #[serde(default)]
    pub enabled: bool,
    /// How often the fit task looks for devices due a fit, ms.
    #[serde(default = "default_training_check_ms")]
    pub check_interval_ms: u64,
    /// Rows kept per device (oldest samples dropped first).
    #[serde(default = "default_training_max_rows")]
    pub max_rows: usize,
    /// Rows a device's own model needs.
    #[serde(default = "default_training_min_rows")]
    pub min_rows: usize,
    /// ... from at least this many samples (training periods).
    #[serde(default = "default_training_min_samples")]
    pub min_samples: usize,
    /// A model is refitted when this long has passed since its fit and new rows came, ms.
    #[serde(default = "default_training_refit_ms")]
    pub refit_interval_ms: i64,
    /// Devices of a class with data a class model (for devices short of their own) needs.
    #[serde(default = "default_training_class_devices")]
    pub class_min_devices: usize,
    /// Devices with a training set; samples of further devices are refused (counted).
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
    /// Values (rows × metrics, 8 bytes each) in all training sets together: the memory bound
    /// (50 M: 400 MB). Samples beyond it are refused (counted) and acknowledged.
    #[serde(default = "default_training_max_values")]
    pub max_values: usize,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            check_interval_ms: default_training_check_ms(),
            max_rows: default_training_max_rows(),
            min_rows: default_training_min_rows(),
            min_samples: default_training_min_samples(),
            refit_interval_ms: default_training_refit_ms(),
            class_min_devices: default_training_class_devices(),
            max_devices: default_max_devices(),
            max_values: default_training_max_values(),
        }
    }
}

fn default_training_max_values() -> usize {
    50_000_000
}

impl TrainingConfig {
    /// The trainer's settings.
    pub fn train(&self) -> edgewatch_models::multi::TrainConfig {
        edgewatch_models::multi::TrainConfig {
            max_rows: self.max_rows,
            min_rows: self.min_rows,
            min_samples: self.min_samples,
            refit_interval_ms: self.refit_interval_ms,
            class_min_devices: self.class_min_devices,
            max_devices: self.max_devices,
            max_values: self.max_values,
        }
    }

    /// Every invalid value, as `key: message` (without the `training.` prefix).
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(1..=MAX_FLEET_MS).contains(&self.check_interval_ms) {
            out.push(format!(
                "check_interval_ms: must be in 1..={MAX_FLEET_MS} (30 days), got {}",
                self.check_interval_ms
            ));
        }
        if let Err(e) = self.train().check() {
            out.push(e);
        }
        out
    }
}

fn default_training_check_ms() -> u64 {
    10_000
}
fn default_training_max_rows() -> usize {
    20_000
}
fn default_training_min_rows() -> usize {
    1_000
}
fn default_training_min_samples() -> usize {
    3
}
fn default_training_refit_ms() -> i64 {
    21_600_000
}
fn default_training_class_devices() -> usize {
    2
}

/// Fleet peer groups (see the `fleet` module): off unless `enabled`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Profile devices, fit peer groups and raise `detector: "fleet"` events. In cluster mode the
    /// member holding the trainer lease fits the peer models from every member's profiles.
    #[serde(default)]
    pub enabled: bool,
    /// Time constant of the per-metric EWMA of window means that makes a device's profile.
    #[serde(default = "default_profile_window_ms")]
    pub profile_window_ms: u64,
    /// How often each class's peer model is refitted.
    #[serde(default = "default_refit_interval_ms")]
    pub refit_interval_ms: u64,
    /// Complete device profiles a class needs before a model is fitted (at least 3).
    #[serde(default = "default_min_devices")]
    pub min_devices: usize,
    /// Most devices profiled; windows of further devices are not profiled (counted).
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
    /// Windows every metric of a device needs before its profile is complete.
    #[serde(default = "default_min_windows")]
    pub min_windows: u32,
    /// Group labels by device id glob (`*`, `?`); the first match labels a device, and devices
    /// are only peers of devices with the same label (and the same metric set).
    #[serde(default)]
    pub groups: Vec<FleetGroup>,
    /// Peer model options: `max_clusters`, `limit` (distance / spread ratio scoring 0.5), `seed`.
    #[serde(default)]
    pub peers: edgewatch_models::multi::PeerOptions,
    /// How scores become events (one per episode): `rearm_ratio`, `min_gap_readings` (here: scores,
    /// i.e. windows or refits).
    #[serde(default = "default_fleet_gate")]
    pub gate: edgewatch_models::detect::GateConfig,
}

/// A configured group label: devices whose id matches `devices` (a glob) carry `label`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetGroup {
    /// The label, non-empty.
    pub label: String,
    /// Device id glob: `*` any run of characters, `?` one character, e.g. `pump-*`.
    pub devices: String,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            profile_window_ms: default_profile_window_ms(),
            refit_interval_ms: default_refit_interval_ms(),
            min_devices: default_min_devices(),
            max_devices: default_max_devices(),
            min_windows: default_min_windows(),
            groups: Vec::new(),
            peers: edgewatch_models::multi::PeerOptions::default(),
            gate: default_fleet_gate(),
        }
    }
}

impl FleetConfig {
    /// Every invalid value, as `key: message` (without the `fleet.` prefix).
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, ms) in [
            ("profile_window_ms", self.profile_window_ms),
            ("refit_interval_ms", self.refit_interval_ms),
        ] {
            if !(1..=MAX_FLEET_MS).contains(&ms) {
                out.push(format!(
                    "{key}: must be in 1..={MAX_FLEET_MS} (30 days), got {ms}"
                ));
            }
        }
        if self.min_devices < 3 {
            out.push(format!(
                "min_devices: must be >= 3 (a peer group needs peers), got {}",
                self.min_devices
            ));
        }
        if self.max_devices == 0 {
            out.push("max_devices: must be > 0, got 0".into());
        }
        if self.min_windows == 0 {
            out.push("min_windows: must be > 0, got 0".into());
        }
        for (i, g) in self.groups.iter().enumerate() {
            if g.label.is_empty() || g.devices.is_empty() {
                out.push(format!(
                    "groups[{i}]: label and devices must be non-empty, got {:?} / {:?}",
                    g.label, g.devices
                ));
            }
        }
        if self.peers.max_clusters == 0 {
            out.push("peers.max_clusters: must be >= 1, got 0".into());
        }
        if !(self.peers.limit.is_finite() && self.peers.limit > 0.0) {
            out.push(format!(
                "peers.limit: must be finite and > 0, got {}",
                self.peers.limit
            ));
        }
        if let Err(e) =
            edgewatch_models::detect::EventGate::new(crate::fleet::THRESHOLD, &self.gate)
        {
            out.push(format!("gate: {e}"));
        }
        out
    }
}

/// The longest fleet interval accepted: 30 days.
const MAX_FLEET_MS: u64 = 30 * 86_400_000;

/// A partition number or an inclusive range `"a-b"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PartitionSpec {
    /// One partition.
    One(u32),
    /// `"a-b"`, inclusive.
    Range(String),
}

impl PartitionSpec {
    /// The partitions named, or why the spec is invalid.
    pub fn expand(&self) -> Result<std::ops::RangeInclusive<u32>, String> {
        match self {
            Self::One(p) => Ok(*p..=*p),
            Self::Range(s) => {
                let (a, b) = s.split_once('-').ok_or_else(|| {
                    format!("expected a number or a range like \"0-31\", got {s:?}")
                })?;
                let a: u32 = a
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad range start in {s:?}"))?;
                let b: u32 = b
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad range end in {s:?}"))?;
                if a > b {
                    return Err(format!("range {s:?} is empty (start > end)"));
                }
                Ok(a..=b)
            }
        }
    }
}

/// HTTP listener settings: the limits and timeouts that keep one port usable under idle, slow and
/// abusive clients (see the `http` module's docs for how they work together).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on; port 0 picks a free port.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Most concurrent connections, plain HTTP and WebSocket feed clients together. When full, the
    /// connection waiting longest for a request is closed to admit a new one; with none waiting,
    /// the new connection is refused (503).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections of `max_connections` that feed clients may not take, so the API, metrics and
    /// dashboard stay reachable when the feed is full. Default: `max_connections / 32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_connections: Option<usize>,
    /// Most time a client may take to send a request's head: from connecting, or from the first
    /// byte of a request on a kept-alive connection. Slow or silent clients are closed.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// How long a kept-alive connection may wait for its next request before it is closed.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Most time one write may stall on a client that does not read (a response, a feed event, a
    /// ping); then the connection is closed (a feed client counts as evicted).
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Interval of WebSocket pings to feed clients; a client that sends nothing (not even a pong)
    /// for two intervals is closed as dead. Also accepted as `feed_ping_ms`.
    #[serde(default = "default_ws_ping_interval_ms", alias = "feed_ping_ms")]
    pub ws_ping_interval_ms: u64,
    /// Lifetime of a feed ticket (`POST /api/feed/ticket`, redeemed once by `/feed?ticket=`).
    #[serde(default = "default_ticket_ttl_ms")]
    pub ticket_ttl_ms: u64,
    /// Name of an environment variable holding a bearer token. When set, the feed and the API answer
    /// 401 unless the request carries `Authorization: Bearer <token>`; a browser's WebSocket, which
    /// cannot send that header, uses a ticket (`/feed?ticket=`). `/` and `/healthz` stay open.
    #[serde(default)]
    pub auth_token_env: Option<String>,
    /// The URL other aggregators use to reach this one (`http://HOST:PORT`), published in its
    /// owners record. Default: `http://` plus `listen` with the bound port, an unspecified address
    /// (`0.0.0.0`, `::`) read as loopback — so set it whenever instances run on different hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Most time a request to another instance may take (the fleet-wide `/api/devices` and a
    /// device fetched from its owner), ms.
    #[serde(default = "default_fleet_timeout_ms")]
    pub fleet_timeout_ms: u64,
    /// Most requests to other instances in flight at once for one fleet-wide answer.
    #[serde(default = "default_fleet_concurrency")]
    pub fleet_concurrency: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_connections: default_max_connections(),
            reserved_connections: None,
            header_read_timeout_ms: default_header_read_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            write_timeout_ms: default_write_timeout_ms(),
            ws_ping_interval_ms: default_ws_ping_interval_ms(),
            ticket_ttl_ms: default_ticket_ttl_ms(),
            auth_token_env: None,
            advertise: None,
            fleet_timeout_ms: default_fleet_timeout_ms(),
            fleet_concurrency: default_fleet_concurrency(),
        }
    }
}

impl HttpConfig {
    /// The URL published for other instances: `advertise`, or `http://` plus the bound address
    /// with an unspecified IP read as loopback.
    pub fn advertise_url(&self, bound: std::net::SocketAddr) -> String {
        if let Some(url) = &self.advertise {
            return url.trim_end_matches('/').to_string();
        }
        let ip = match bound.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        format!("http://{}", std::net::SocketAddr::new(ip, bound.port()))
    }

    /// Connections feed clients may not take: `reserved_connections`, or `max_connections / 32`.
    pub fn reserved(&self) -> usize {
        self.reserved_connections
            .unwrap_or(self.max_connections / 32)
    }

    /// Every invalid value, as `key: message` (without the `http.` prefix).
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            out.push(format!(
                "listen: expected an address such as 127.0.0.1:8080, got {:?}",
                self.listen
            ));
        }
        if self
            .auth_token_env
            .as_deref()
            .is_some_and(|v| v.is_empty() || v.contains(['=', '\0']))
        {
            out.push(format!(
                "auth_token_env: must name an environment variable, got {:?}",
                self.auth_token_env.as_deref().unwrap_or_default()
            ));
        }
        if self.max_connections == 0 {
            out.push("max_connections: must be > 0, got 0".into());
        }
        if let Some(url) = &self.advertise {
            if let Err(e) = http_authority(url) {
                out.push(format!("advertise: {e}"));
            }
        }
        if !(1..=1024).contains(&self.fleet_concurrency) {
            out.push(format!(
                "fleet_concurrency: must be in 1..=1024, got {}",
                self.fleet_concurrency
            ));
        }
        if let Some(r) = self.reserved_connections {
            if r >= self.max_connections.max(1) {
                out.push(format!(
                    "reserved_connections: must be < max_connections ({}), got {r}",
                    self.max_connections
                ));
            }
        }
        for (key, ms) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
            ("ws_ping_interval_ms", self.ws_ping_interval_ms),
            ("ticket_ttl_ms", self.ticket_ttl_ms),
            ("fleet_timeout_ms", self.fleet_timeout_ms),
        ] {
            // Zero would close every connection at once; past a day is a typo, not a policy.
            if !(1..=MAX_HTTP_TIMEOUT_MS).contains(&ms) {
                out.push(format!(
                    "{key}: must be in 1..={MAX_HTTP_TIMEOUT_MS} (one day), got {ms}"
                ));
            }
        }
        out
    }
}

/// The longest HTTP timeout or interval accepted: one day.
const MAX_HTTP_TIMEOUT_MS: u64 = 86_400_000;

/// Feed settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Recent events kept for `?since=<event id>` resumption.
    #[serde(default = "default_history")]
    pub history: usize,
    /// Events queued per client before it is disconnected as too slow.
    #[serde(default = "default_client_queue")]
    pub client_queue: usize,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            history: default_history(),
            client_queue: default_client_queue(),
        }
    }
}

/// State settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Recent windows kept per (device, metric).
    #[serde(default = "default_windows_per_series")]
    pub windows_per_series: usize,
    /// Directory of the durable state store (sled). With it, state survives restarts and applied
    /// lanes are acknowledged to the agents once flushed; without it, state lives in memory only and
    /// nothing is acknowledged.
    #[serde(default)]
    pub dir: Option<std::path::PathBuf>,
    /// How far above a lane's contiguous progress a record's seq (or a batch's `acked` floor) may
    /// lie; beyond it the record is refused as forged or corrupt. Raise it only if an agent's outbox
    /// can evict more records of one lane than this (a lane then stops being acknowledged, and
    /// `edgewatch_aggregator_records_refused_total{reason="seq_jump"}` counts it).
    #[serde(default = "default_max_seq_jump")]
    pub max_seq_jump: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            windows_per_series: default_windows_per_series(),
            dir: None,
            max_seq_jump: default_max_seq_jump(),
        }
    }
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.into()
}
fn default_partitions() -> u32 {
    edgewatch_models::partition::DEFAULT_PARTITIONS
}
fn default_owned() -> Vec<PartitionSpec> {
    vec![PartitionSpec::Range(format!(
        "0-{}",
        default_partitions() - 1
    ))]
}
fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_connections() -> usize {
    1024
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_write_timeout_ms() -> u64 {
    10_000
}
fn default_ws_ping_interval_ms() -> u64 {
    15_000
}
fn default_fleet_timeout_ms() -> u64 {
    2_000
}
fn default_fleet_concurrency() -> usize {
    8
}
fn default_ticket_ttl_ms() -> u64 {
    30_000
}
fn default_history() -> usize {
    10_000
}
fn default_client_queue() -> usize {
    1024
}
fn default_windows_per_series() -> usize {
    60
}
fn default_profile_window_ms() -> u64 {
    3_600_000
}
fn default_refit_interval_ms() -> u64 {
    600_000
}
fn default_min_devices() -> usize {
    5
}
fn default_max_devices() -> usize {
    100_000
}
fn default_min_windows() -> u32 {
    3
}
fn default_fleet_gate() -> edgewatch_models::detect::GateConfig {
    // A profile moves slowly: once it has left its group, ten scores (windows) back inside re-arm.
    edgewatch_models::detect::GateConfig {
        rearm_ratio: 0.8,
        min_gap_readings: 10,
    }
}
fn default_max_seq_jump() -> u64 {
    crate::state::DEFAULT_MAX_SEQ_JUMP
}

impl AggregatorConfig {
    /// Every default, with the given id.
    pub fn with_id(id: &str) -> Self {
        Self {
            id: id.into(),
            mqtt: MqttLink::default(),
            prefix: default_prefix(),
            partitions: default_partitions(),
            owned: default_owned(),
            http: HttpConfig::default(),
            feed: FeedConfig::default(),
            state: StateConfig::default(),
            cluster: None,
            fleet: FleetConfig::default(),
            training: TrainingConfig::default(),
            owners: OwnersConfig::default(),
            log: AggregatorLog::default(),
        }
    }

    /// The owned partitions as a set (invalid specs are skipped; see [`AggregatorConfig::problems`]).
    pub fn owned_set(&self) -> BTreeSet<u32> {
        self.owned
            .iter()
            .filter_map(|s| s.expand().ok())
            .flatten()
            .filter(|p| *p < self.partitions)
            .collect()
    }

    /// Every invalid value, as `key.path: message`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !is_valid_node_id(&self.id) {
            out.push(format!(
                "id: must match [A-Za-z0-9_-]{{1,64}} (it appears in topic names), got {:?}",
                self.id
            ));
        }
        out.extend(
            self.mqtt
                .problems()
                .into_iter()
                .map(|p| format!("mqtt.{p}")),
        );
        if self.prefix.is_empty()
            || self
                .prefix
                .chars()
                .any(|c| matches!(c, '.' | ' ' | '+' | '#'))
        {
            out.push(format!(
                "prefix: must be non-empty without '.', spaces, '+' or '#', got {:?}",
                self.prefix
            ));
        }
        if self.partitions == 0 {
            out.push("partitions: must be > 0, got 0".into());
        }
        // In cluster mode partitions are won by lease and `owned:` is ignored.
        let static_owned = if self.cluster.is_some() {
            &[][..]
        } else {
            &self.owned[..]
        };
        for (i, spec) in static_owned.iter().enumerate() {
            match spec.expand() {
                Err(e) => out.push(format!("owned[{i}]: {e}")),
                Ok(r) if *r.end() >= self.partitions => out.push(format!(
                    "owned[{i}]: partition {} is out of range 0..{}",
                    r.end(),
                    self.partitions
                )),
                Ok(_) => {}
            }
        }
        out.extend(
            self.http
                .problems()
                .into_iter()
                .map(|p| format!("http.{p}")),
        );
        out.extend(
            self.owners
                .problems()
                .into_iter()
                .map(|p| format!("owners.{p}")),
        );
        if self.feed.client_queue == 0 {
            out.push("feed.client_queue: must be > 0, got 0".into());
        }
        if self.state.windows_per_series == 0 {
            out.push("state.windows_per_series: must be > 0, got 0".into());
        }
        if self.state.max_seq_jump == 0 {
            out.push("state.max_seq_jump: must be > 0, got 0".into());
        }
        out.extend(
            self.fleet
                .problems()
                .into_iter()
                .map(|p| format!("fleet.{p}")),
        );
        out.extend(
            self.training
                .problems()
                .into_iter()
                .map(|p| format!("training.{p}")),
        );
        if let Some(c) = &self.cluster {
            out.extend(c.problems().into_iter().map(|p| format!("cluster.{p}")));
            if let Some(dir) = &self.state.dir {
                out.push(format!(
                    "state.dir: not used in cluster mode (partition state is checkpointed to the cluster's KV); remove it, got {}",
                    dir.display()
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_urls_are_plain_http_host_and_port() {
        assert_eq!(http_authority("http://10.0.0.5:8080"), Ok("10.0.0.5:8080"));
        assert_eq!(
            http_authority("http://agg-1.local:80/"),
            Ok("agg-1.local:80")
        );
        assert_eq!(http_authority("http://[::1]:9000"), Ok("[::1]:9000"));
        assert_eq!(http_authority("http://agg"), Ok("agg"));
        for bad in [
            "https://h:1",
            "h:1",
            "http://",
            "http://h:1/api",
            "http://u@h:1",
            "http://h:0",
            "http://h:99999",
            "http://h :1",
            "http://:80",
        ] {
            assert!(http_authority(bad).is_err(), "{bad} accepted");
        }
        let mut h = HttpConfig::default();
        let bound: std::net::SocketAddr = "0.0.0.0:4242".parse().unwrap();
        assert_eq!(h.advertise_url(bound), "http://127.0.0.1:4242");
        assert_eq!(h.advertise_url("[::]:1".parse().unwrap()), "http://[::1]:1");
        h.advertise = Some("http://agg-1:8080/".into());
        assert_eq!(h.advertise_url(bound), "http://agg-1:8080");
        h.advertise = Some("https://agg-1".into());
        assert!(
            h.problems()[0].starts_with("advertise: expected http://"),
            "{:?}",
            h.problems()
        );
        let o = OwnersConfig {
            publish_interval_ms: 5_000,
            stale_after_ms: 9_000,
            startup_grace_ms: 0,
        };
        assert!(o.problems()[0].starts_with("stale_after_ms: must be at least twice"));
    }

    #[test]
    fn ranges_and_numbers_expand() {
        let mut c = AggregatorConfig::with_id("a");
        c.partitions = 8;
        c.owned = vec![PartitionSpec::Range("0-2".into()), PartitionSpec::One(5)];
        assert_eq!(
            c.owned_set().into_iter().collect::<Vec<_>>(),
            vec![0, 1, 2, 5]
        );
        assert!(c.problems().is_empty(), "{:?}", c.problems());
    }

    #[test]
    fn bad_ranges_are_reported_with_their_index() {
        let mut c = AggregatorConfig::with_id("a");
        c.partitions = 8;
        c.owned = vec![
            PartitionSpec::Range("3-1".into()),
            PartitionSpec::Range("x".into()),
            PartitionSpec::One(9),
        ];
        let p = c.problems();
        assert!(p[0].starts_with("owned[0]: range"), "{p:?}");
        assert!(p[1].starts_with("owned[1]:"), "{p:?}");
        assert!(p[2].contains("out of range"), "{p:?}");
    }

    #[test]
    fn http_limits_default_sensibly_and_bad_values_are_all_reported() {
        let mut c = AggregatorConfig::with_id("a");
        assert_eq!(c.http.header_read_timeout_ms, 10_000);
        assert_eq!(c.http.idle_timeout_ms, 60_000);
        assert_eq!(c.http.reserved(), 32, "max_connections / 32");
        c.http.max_connections = 8;
        c.http.reserved_connections = Some(8);
        c.http.header_read_timeout_ms = 0;
        c.http.write_timeout_ms = 0;
        let p = c.problems();
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(
            p[0],
            "http.reserved_connections: must be < max_connections (8), got 8"
        );
        assert!(
            p[1].starts_with("http.header_read_timeout_ms: must be in 1..="),
            "{p:?}"
        );
        assert!(p[2].starts_with("http.write_timeout_ms: "), "{p:?}");
    }

    #[test]
    fn unknown_http_keys_are_rejected() {
        let err = serde_json::from_str::<HttpConfig>(r#"{"header_timeout_ms": 5}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("header_timeout_ms"), "{err}");
    }

    #[test]
    fn cluster_mode_refuses_a_state_dir() {
        let mut c = AggregatorConfig::with_id("a1");
        c.cluster = Some(ClusterConfig::nats(vec!["nats://n1:4222".into()]));
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        c.state.dir = Some("/var/lib/x".into());
        let p = c.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("state.dir: not used in cluster mode"),
            "{p:?}"
        );
    }

    #[test]
    fn fleet_is_off_by_default_and_bad_values_are_all_reported() {
        let mut c = AggregatorConfig::with_id("a");
        assert!(!c.fleet.enabled);
        assert_eq!(c.fleet.profile_window_ms, 3_600_000);
        assert_eq!(c.fleet.refit_interval_ms, 600_000);
        assert_eq!((c.fleet.min_devices, c.fleet.max_devices), (5, 100_000));
        c.fleet.enabled = true;
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        c.fleet.refit_interval_ms = 0;
        c.fleet.min_devices = 2;
        c.fleet.max_devices = 0;
        c.fleet.peers.limit = f64::NAN;
        c.fleet.gate.rearm_ratio = 1.5;
        c.fleet.groups.push(FleetGroup {
            label: String::new(),
            devices: "x*".into(),
        });
        let p = c.problems();
        assert_eq!(p.len(), 6, "{p:?}");
        for (got, want) in p.iter().zip([
            "fleet.refit_interval_ms: must be in 1..=",
            "fleet.min_devices: must be >= 3",
            "fleet.max_devices: must be > 0",
            "fleet.groups[0]: label and devices must be non-empty",
            "fleet.peers.limit: must be finite and > 0, got NaN",
            "fleet.gate: ",
        ]) {
            assert!(got.starts_with(want), "{got} / {want}");
        }
    }

    #[test]
    fn fleet_yaml_keys_parse_and_unknown_ones_are_rejected() {
        let c: FleetConfig = serde_json::from_str(
            r#"{"enabled": true, "groups": [{"label": "north", "devices": "n-*"}],
                "peers": {"max_clusters": 2, "limit": 4.0}, "gate": {"min_gap_readings": 3}}"#,
        )
        .unwrap();
        assert_eq!(c.groups[0].label, "north");
        assert_eq!((c.peers.max_clusters, c.gate.min_gap_readings), (2, 3));
        let err = serde_json::from_str::<FleetConfig>(r#"{"refit_ms": 5}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("refit_ms"), "{err}");
    }

    #[test]
    fn fleet_runs_in_cluster_mode() {
        let mut c = AggregatorConfig::with_id("a1");
        c.cluster = Some(ClusterConfig::nats(vec!["nats://n1:4222".into()]));
        c.fleet.enabled = true;
        let p = c.problems();
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn cluster_problems_are_reported_under_the_cluster_key() {
        let mut c = AggregatorConfig::with_id("a");
        let mut cluster = ClusterConfig::nats(vec!["nats://n1:4222".into()]);
        assert!(c.problems().is_empty());
        cluster.heartbeat_ms = 0;
        c.cluster = Some(cluster);
        let p = c.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("cluster.heartbeat_ms: "), "{p:?}");
    }
}
