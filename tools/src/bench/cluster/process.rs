//! The bench's child processes: aggregators started from this executable (`edgewatch aggregator
//! --config FILE`) with their logs in the scratch directory, killed on drop, and the CPU time of
//! every process of a run, read from `/proc`.

use super::logs::tail;
use super::{Cpu, Env, PARTITIONS};
use anyhow::{bail, Context};
use edgewatch_aggregator::cluster::ClusterConfig;
use edgewatch_aggregator::AggregatorConfig;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process, killed (SIGKILL) and reaped on drop.
pub(super) struct Proc {
    pub(super) child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An aggregator child process, killed on drop.
pub(super) struct AggProc {
    pub(super) id: String,
    pub(super) http: SocketAddr,
    pub(super) child: Child,
    pub(super) log: PathBuf,
}

impl AggProc {
    /// SIGKILL (`Child::kill` on Unix), then reap.
    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// An error with its log if it has exited.
    pub(super) fn alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => bail!(
                "aggregator {} exited ({status}); its log:\n{}",
                self.id,
                tail(&self.log, 30)
            ),
            _ => Ok(()),
        }
    }
}

impl Drop for AggProc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Env<'_> {
    pub(super) async fn spawn_aggregator(&self, prefix: &str, id: &str) -> anyhow::Result<AggProc> {
        let mut cfg = AggregatorConfig::with_id(id);
        cfg.mqtt.host = self.broker.ip().to_string();
        cfg.mqtt.port = self.broker.port();
        cfg.prefix = prefix.into();
        cfg.partitions = PARTITIONS;
        cfg.http.listen = "127.0.0.1:0".into();
        let mut c = ClusterConfig::nats(self.nats.urls.clone());
        c.lease_ttl_ms = self.b.lease_ttl_ms;
        c.heartbeat_ms = self.b.heartbeat_ms();
        c.checkpoint_interval_ms = self.b.checkpoint_ms;
        c.checkpoint = self.mode;
        cfg.cluster = Some(c);
        let yaml = self.dir.join(format!("{id}.yaml"));
        std::fs::write(
            &yaml,
            serde_norway::to_string(&cfg).context("writing an aggregator's YAML")?,
        )
        .with_context(|| format!("writing {}", yaml.display()))?;
        let log = self.dir.join(format!("{id}.log"));
        let mut child = Command::new(&self.exe)
            .arg("aggregator")
            .arg("--config")
            .arg(&yaml)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} aggregator", self.exe.display()))?;
        // The aggregator prints its feed URL (ws://ADDR/feed) once bound; the HTTP API is on ADDR.
        let stdout = child.stdout.take().context("aggregator stdout")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let mut proc = AggProc {
            id: id.to_string(),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            child,
            log,
        };
        let line = match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(line)) => line,
            _ => bail!(
                "aggregator {id} did not start ({}); its log:\n{}",
                proc.child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map_or("still running after 30 s".into(), |s| s.to_string()),
                tail(&proc.log, 30)
            ),
        };
        proc.http = line
            .trim()
            .strip_prefix("ws://")
            .and_then(|s| s.strip_suffix("/feed"))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("aggregator {id} printed {line:?}, not its feed URL"))?;
        Ok(proc)
    }

    pub(super) fn cpu(&self, aggs: &[AggProc]) -> Cpu {
        let sum = |pids: &mut dyn Iterator<Item = u32>| -> Option<f64> {
            pids.map(|p| cpu_secs(&p.to_string())).sum()
        };
        Cpu {
            aggregators: sum(&mut aggs.iter().map(|a| a.child.id())),
            nats: sum(&mut self.nats.nodes.iter().map(|n| n.child.id())),
            bench: cpu_secs("self"),
        }
    }
}

/// User + system CPU seconds of process `pid` (a number or `self`), from `/proc`.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture edgewatch builds for.
    Some(ticks as f64 / 100.0)
}
