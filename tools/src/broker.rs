//! The demo's embedded MQTT broker: rumqttd on loopback, in-process, with explicit small buffers.
//!
//! rumqttd has no shutdown API and reports neither the bound port nor a port already in use
//! (see BROKERS.md). So we check the port ourselves first, run its server on a runtime we own, and
//! shut that runtime down to close the listener and every connection.

use anyhow::{bail, Context};
use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Settings of the embedded broker.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Loopback address to listen on; port 0 picks a free one.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Most client connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest publish payload accepted.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Size of one segment of a subscription's ring buffer (≥ 1024).
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: usize,
    /// Segments per subscription. A subscriber more than `segment_bytes × segment_count` behind loses
    /// messages (rumqttd drops instead of applying backpressure).
    #[serde(default = "default_segment_count")]
    pub segment_count: usize,
}

fn default_listen() -> String {
    "127.0.0.1:1883".into()
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_payload_bytes() -> usize {
    2 * 1024 * 1024
}
fn default_segment_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_segment_count() -> usize {
    8
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_connections: default_max_connections(),
            max_payload_bytes: default_max_payload_bytes(),
            segment_bytes: default_segment_bytes(),
            segment_count: default_segment_count(),
        }
    }
}

impl BrokerConfig {
    /// Every invalid value, as `key: message`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.listen.parse::<SocketAddr>().is_err() {
            out.push(format!(
                "listen: expected an address such as 127.0.0.1:1883, got {:?}",
                self.listen
            ));
        }
        if self.max_connections == 0 {
            out.push(
                "max_connections: must be > 0, got 0 (rumqttd would refuse every client)".into(),
            );
        }
        if self.segment_bytes < 1024 {
            out.push(format!(
                "segment_bytes: must be >= 1024 (smaller kills rumqttd's router), got {}",
                self.segment_bytes
            ));
        }
        if self.segment_count == 0 {
            out.push("segment_count: must be > 0, got 0".into());
        }
        if self.max_payload_bytes < 1024 {
            out.push(format!(
                "max_payload_bytes: must be >= 1024, got {}",
                self.max_payload_bytes
            ));
        }
        out
    }
}

/// A running embedded broker; dropping it closes the listener and every connection.
pub struct EmbeddedBroker {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl EmbeddedBroker {
    /// Starts the broker and waits until it accepts connections.
    pub fn start(cfg: &BrokerConfig) -> anyhow::Result<Self> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            bail!("invalid broker configuration: {}", problems.join("; "));
        }
        let wanted: SocketAddr = cfg.listen.parse().context("broker listen address")?;
        // rumqttd reports success even when the port is taken: find out ourselves, and learn the
        // port when 0 was asked for.
        let addr = {
            let probe = TcpListener::bind(wanted).with_context(|| {
                format!("cannot start the embedded MQTT broker on {wanted}: port in use or not permitted (choose another with --broker-port)")
            })?;
            probe
                .local_addr()
                .context("reading the reserved broker port")?
        };
        let router_cfg = RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 1000,
            max_segment_size: cfg.segment_bytes,
            max_segment_count: cfg.segment_count,
            ..RouterConfig::default()
        };
        let router_tx = Router::new(0, router_cfg).spawn();
        let server = ServerSettings {
            name: "edgewatch-embedded".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: cfg.max_payload_bytes,
                max_inflight_count: 1000,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("embedded-broker")
            .enable_all()
            .build()
            .context("starting the embedded broker's runtime")?;
        runtime.spawn(async move {
            let mut server = Server::new(server, router_tx, V4);
            if let Err(e) = server.start(LinkType::Remote).await {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                bail!("the embedded MQTT broker did not start listening on {addr} within 5 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::info!(%addr, "embedded MQTT broker listening");
        Ok(Self {
            addr,
            runtime: Some(runtime),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Safe in async contexts too, unlike dropping the runtime.
            rt.shutdown_background();
        }
    }
}
