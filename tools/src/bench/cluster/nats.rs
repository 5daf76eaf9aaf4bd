//! The NATS side of the bench: three `nats-server` nodes with JetStream, clustered on loopback in
//! the scratch directory, started and health-checked here and killed on drop.

use super::logs::tail;
use super::metrics::http_get;
use super::process::Proc;
use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `nats-server` from `PATH`, `/usr/sbin` or `/sbin`.
pub(in crate::bench) fn find_nats_server() -> Option<PathBuf> {
    crate::bench::find_program("nats-server")
}

/// Three nats-server nodes with JetStream, clustered on loopback.
pub(super) struct NatsCluster {
    pub(super) nodes: Vec<Proc>,
    pub(super) urls: Vec<String>,
    pub(super) version: String,
}

impl NatsCluster {
    /// Starts the three nodes in `dir` and waits until each is healthy. Ports are picked free just
    /// before the nodes bind them, so another program may take one in between: a node that exits
    /// on "address already in use" starts the whole cluster again on fresh ports, in a fresh
    /// subdirectory (up to three attempts).
    pub(super) async fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            let here = dir.join(format!("nats-{attempt}"));
            std::fs::create_dir_all(&here)
                .with_context(|| format!("creating {}", here.display()))?;
            match Self::try_start(bin, &here).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    tracing::warn!(attempt, "nats-server: a port was taken meanwhile; starting the cluster again on fresh ports");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn try_start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let version = Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let version = if version.is_empty() {
            "nats-server".to_string()
        } else {
            version.replace(": v", " v")
        };
        struct Ports {
            client: u16,
            route: u16,
            monitor: u16,
            mqtt: u16,
        }
        let ports = (0..3)
            .map(|_| {
                Ok(Ports {
                    client: free_port()?,
                    route: free_port()?,
                    monitor: free_port()?,
                    mqtt: free_port()?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let routes = ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{}", p.route))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        let mut logs = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: {:?}, max_memory_store: 256MB, max_file_store: 2GB }}\n\
                     cluster {{\n  name: edgewatch-bench\n  listen: 127.0.0.1:{}\n  routes: [ {routes} ]\n}}\n\
                     mqtt {{ listen: 127.0.0.1:{} }}\n",
                    p.client,
                    p.monitor,
                    dir.join(&name).display().to_string(),
                    p.route,
                    p.mqtt
                ),
            )?;
            let log = dir.join(format!("{name}.log"));
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            nodes.push(Proc { child });
            logs.push(log);
        }
        let mut cluster = Self {
            nodes,
            urls: ports
                .iter()
                .map(|p| format!("nats://127.0.0.1:{}", p.client))
                .collect(),
            version,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, p) in ports.iter().enumerate() {
            let addr = SocketAddr::from(([127, 0, 0, 1], p.monitor));
            loop {
                if let Ok(Some(status)) = cluster.nodes[i].child.try_wait() {
                    bail!(
                        "nats-server n{} exited ({status}):\n{}",
                        i + 1,
                        tail(&logs[i], 30)
                    );
                }
                if matches!(http_get(addr, "/healthz").await, Ok((200, _))) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "nats-server n{} not healthy on {addr} within 30 s:\n{}",
                        i + 1,
                        tail(&logs[i], 30)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(cluster)
    }
}

/// A free loopback port (reserved, then released: the caller binds it soon after).
pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
