//! The async shell: paces a [`Fleet`], publishes its readings over MQTT, writes its ground truth
//! and, when configured, the readings log (every reading handed to the MQTT client).
//!
//! One task drives rumqttc's event loop through the shared poll loop of `edgewatch-link`
//! (reconnecting with capped, jittered backoff over every broker of the link, counting what was
//! written and acknowledged); the caller's task generates, paces and publishes. All
//! signal and anomaly logic lives in the fleet; this file only moves bytes.

use crate::anomaly::GroundTruth;
use crate::config::SimulatorConfig;
use crate::fleet::{Fleet, SimReading};
use crate::pace::Pacer;
use crate::readings_log::ReadingsLog;
use crate::topic::TopicTemplate;
use anyhow::Context as _;
use edgewatch_link::{Flow, LinkCounters, LinkEvent, LinkHandler};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde::Serialize;
use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// After the last publish, `run` waits for the event loop to write (QoS 0) or get acknowledged
/// (QoS 1) everything published: at most this long in all ...
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// ... and at most this long without progress (a dead broker must not hold up a shutdown).
const FLUSH_STALL: Duration = Duration::from_secs(3);
/// How long `run` waits for the disconnect to go out before stopping the event loop.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Readings that reached the broker: written to the socket (QoS 0) or acknowledged by it
    /// (QoS 1). Fewer than generated only when the broker was unreachable at the end (warned).
    pub published: u64,
    /// Steps generated (simulated time advanced by `steps × interval_ms`).
    pub steps: u64,
    /// Every ground-truth label, including anomalies cut short by the end of the run (ended at
    /// the last step).
    pub labels: Vec<GroundTruth>,
    /// Timestamp of the first step (Unix ms).
    pub first_ts_ms: i64,
    /// Timestamp of the last step taken (Unix ms); `first_ts_ms - interval_ms` when no step ran.
    pub last_ts_ms: i64,
}

/// Serialises one reading as the MQTT payload the agent's default mapping expects:
/// `{"ts":<ms>,"value":<f64>}`, appended to `buf`.
pub fn payload(reading: &SimReading, buf: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Payload {
        ts: i64,
        value: f64,
    }
    let p = Payload {
        ts: reading.ts_ms,
        value: reading.value,
    };
    // Cannot fail: writing to a Vec never errors and the struct has no map keys. (A non-finite
    // value would become `null`; a valid config never produces one.)
    let _ = serde_json::to_writer(buf, &p);
}

/// Counters shared between the publisher and the event-loop task.
#[derive(Debug, Default)]
struct Progress {
    /// `Outgoing::Publish` events: publishes written and flushed to the socket.
    written: AtomicU64,
    /// PubAcks received.
    acked: AtomicU64,
    /// Connection failures seen by the event loop.
    connection_errors: AtomicU64,
}

/// Ground-truth JSON lines, flushed whenever labels are added.
struct TruthFile {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TruthFile {
    fn create(path: PathBuf) -> anyhow::Result<Self> {
        let f = File::create(&path)
            .with_context(|| format!("ground_truth_path: cannot create {}", path.display()))?;
        Ok(Self {
            path,
            out: BufWriter::new(f),
        })
    }

    /// Blocking, but labels are rare (a few per series-hour) and small, so it is not worth a
    /// blocking-pool hop.
    fn append(&mut self, labels: &[GroundTruth]) -> anyhow::Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let mut write = || -> std::io::Result<()> {
            for g in labels {
                serde_json::to_writer(&mut self.out, g)?;
                self.out.write_all(b"\n")?;
            }
            self.out.flush()
        };
        write().with_context(|| format!("writing ground truth to {}", self.path.display()))
    }
}

/// The state of one run that outlives a cancelled publishing loop.
struct Producer {
    fleet: Fleet,
    topic: TopicTemplate,
    qos: QoS,
    end_ms: Option<i64>,
    published: u64,
    steps: u64,
    last_ts_ms: i64,
    labels_written: usize,
    truth: Option<TruthFile>,
    readings_log: Option<ReadingsLog>,
}

impl Producer {
    /// Generates, paces and publishes until the configured duration is reached.
    async fn publish_all(&mut self, client: &AsyncClient, pacer: &mut Pacer) -> anyhow::Result<()> {
        let mut readings = Vec::with_capacity(self.fleet.series());
        while self.end_ms.is_none_or(|end| self.fleet.now_ms() < end) {
            readings.clear();
            self.last_ts_ms = self.fleet.now_ms();
            self.fleet.step(&mut readings);
            self.steps += 1;
            for r in &readings {
                let mut body = Vec::with_capacity(48);
                payload(r, &mut body);
                client
                    .publish(
                        self.topic.render(&r.device, &r.metric),
                        self.qos,
                        false,
                        body,
                    )
                    .await
                    .context("mqtt event loop stopped")?;
                // Logged only once the client has the publish, and before the next await, so a
                // cancelled loop never leaves a handed-over reading out of the log.
                if let Some(log) = &mut self.readings_log {
                    log.append(r)?;
                }
                self.published += 1;
                pacer.tick().await;
            }
            self.write_new_labels()?;
        }
        Ok(())
    }

    fn write_new_labels(&mut self) -> anyhow::Result<()> {
        let new = &self.fleet.ground_truth()[self.labels_written..];
        if let Some(t) = &mut self.truth {
            t.append(new)?;
        }
        self.labels_written += new.len();
        Ok(())
    }
}

fn wall_now_ms_rounded() -> i64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    i64::try_from(ms / 1000 * 1000).unwrap_or(i64::MAX)
}

/// The rumqttc options of every broker of the simulator's link (primary first, then the
/// alternates), built by the shared link crate; the simulator's `max_inflight` is the in-flight
/// window unless the link sets its own.
fn mqtt_options(cfg: &SimulatorConfig) -> anyhow::Result<Vec<MqttOptions>> {
    let mut link = cfg.mqtt.clone();
    link.max_inflight = link.max_inflight.or(Some(cfg.max_inflight));
    let id = link
        .client_id
        .clone()
        .unwrap_or_else(|| "edgewatch-simulator".to_string());
    let mut options = edgewatch_link::options(&link, id)?;
    for o in &mut options {
        o.set_clean_session(true);
    }
    Ok(options)
}

/// The simulator's side of the shared poll loop ([`edgewatch_link::poll_loop`], which reconnects
/// with capped exponential backoff and jitter over every broker of the link): counts writes and
/// acks.
struct Driver {
    progress: Arc<Progress>,
    seed: u64,
}

impl LinkHandler for Driver {
    async fn on_event(&mut self, event: LinkEvent) -> Flow {
        match event {
            LinkEvent::PubAck => {
                self.progress.acked.fetch_add(1, Ordering::Relaxed);
            }
            LinkEvent::Connected => info!("simulator connected to broker"),
            // The simulator subscribes to nothing; a failure is counted by the loop.
            LinkEvent::Publish(_) | LinkEvent::Disconnected => {}
        }
        Flow::Continue
    }

    fn on_written(&mut self) {
        self.progress.written.fetch_add(1, Ordering::Relaxed);
    }

    fn backoff_seed(&self) -> u64 {
        self.seed ^ 0x6a69_7474_6572
    }
}

impl LinkCounters for Progress {
    fn connection_error(&self) {
        self.connection_errors.fetch_add(1, Ordering::Relaxed);
    }
    fn oversized_packet(&self) {}
}

/// Publishes the fleet over MQTT until cfg.duration is reached or `shutdown` resolves; writes ground truth JSON lines as labels become final.
pub async fn run(
    cfg: SimulatorConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<SimReport> {
    let start_ms = cfg.start_ms.unwrap_or_else(wall_now_ms_rounded);
    let fleet = Fleet::new(&cfg, start_ms)?;
    let topic = TopicTemplate::parse(&cfg.topic).map_err(|e| anyhow::anyhow!("topic: {e}"))?;
    let series = fleet.series();
    let wanted_per_sec = series as f64 * 1000.0 / cfg.interval_ms as f64 * cfg.speedup;
    let per_sec = wanted_per_sec.min(cfg.max_rate_per_sec as f64);
    if wanted_per_sec > per_sec {
        warn!(
            wanted_per_sec,
            max_rate_per_sec = cfg.max_rate_per_sec,
            "speedup capped by max_rate_per_sec: simulated time runs slower than configured"
        );
    }
    let truth = cfg
        .ground_truth_path
        .clone()
        .map(TruthFile::create)
        .transpose()?;
    let readings_log = cfg
        .readings_log_path
        .as_deref()
        .map(ReadingsLog::create)
        .transpose()
        .context("readings_log_path")?;
    let options = mqtt_options(&cfg)?;
    let (client, eventloop) = edgewatch_link::client(&options, cfg.mqtt.request_channel);
    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();
    let driver = {
        let (progress, stop) = (progress.clone(), stop.clone());
        let handler = Driver {
            progress: progress.clone(),
            seed: cfg.seed,
        };
        tokio::spawn(async move {
            edgewatch_link::poll_loop(eventloop, options, "simulator", &progress, stop, handler)
                .await;
        })
    };

    info!(
        series,
        start_ms,
        duration_ms = ?cfg.duration_ms,
        per_sec,
        broker = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
        topic = %cfg.topic,
        "simulator started"
    );
    let mut p = Producer {
        fleet,
        topic,
        qos: if cfg.qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        },
        end_ms: cfg
            .duration_ms
            .map(|d| start_ms.saturating_add(i64::try_from(d).unwrap_or(i64::MAX))),
        published: 0,
        steps: 0,
        last_ts_ms: start_ms.saturating_sub(i64::try_from(cfg.interval_ms).unwrap_or(0)),
        labels_written: 0,
        truth,
        readings_log,
    };
    let mut pacer = Pacer::new(per_sec);
    let outcome = tokio::select! {
        r = p.publish_all(&client, &mut pacer) => r,
        () = shutdown => {
            info!("simulator shutdown requested");
            Ok(())
        }
    };

    // Final labels and the readings log first: they are worth keeping even when publishing failed.
    if let Some(log) = &mut p.readings_log {
        log.finish().context("readings_log_path")?;
    }
    p.write_new_labels()?;
    let open = p.fleet.in_progress();
    if let Some(t) = &mut p.truth {
        t.append(&open)?;
    }
    let mut labels = p.fleet.ground_truth().to_vec();
    labels.extend(open);

    let confirmed = |pr: &Progress| match cfg.qos {
        1 => pr.acked.load(Ordering::Relaxed),
        _ => pr.written.load(Ordering::Relaxed),
    };
    let mut flushed = false;
    let mut reached = 0;
    if outcome.is_ok() {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let (mut seen, mut moved_at) = (confirmed(&progress), Instant::now());
        while seen < p.published && Instant::now() < deadline && moved_at.elapsed() < FLUSH_STALL {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now_seen = confirmed(&progress);
            if now_seen != seen {
                (seen, moved_at) = (now_seen, Instant::now());
            }
        }
        flushed = seen >= p.published;
        reached = seen.min(p.published);
        if !flushed {
            warn!(
                published = p.published,
                confirmed = seen,
                qos = cfg.qos,
                "not every publish reached the broker before the deadline"
            );
        }
    }
    // The disconnect queues behind every publish, so it goes out last; after a failed flush the
    // queue is stuck, so the event loop is simply stopped.
    let disconnected = flushed
        && tokio::time::timeout(DISCONNECT_TIMEOUT, client.disconnect())
            .await
            .is_ok_and(|r| r.is_ok());
    drop(client);
    let mut driver = driver;
    let joined = if disconnected {
        tokio::time::timeout(DISCONNECT_TIMEOUT, &mut driver)
            .await
            .ok()
    } else {
        None
    };
    let joined = match joined {
        Some(j) => j,
        None => {
            stop.cancel();
            driver.await
        }
    };
    if let Err(e) = joined {
        warn!(error = %e, "mqtt event loop task failed");
    }
    outcome?;
    info!(
        published = reached,
        generated = p.published,
        steps = p.steps,
        labels = labels.len(),
        connection_errors = progress.connection_errors.load(Ordering::Relaxed),
        "simulator finished"
    );
    Ok(SimReport {
        published: reached,
        steps: p.steps,
        labels,
        first_ts_ms: start_ms,
        last_ts_ms: p.last_ts_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_the_agents_default_json() {
        let r = SimReading {
            device: "dev-0001".into(),
            metric: "temperature".into(),
            ts_ms: 1_764_000_000_000,
            value: 21.5,
        };
        let mut buf = b"x".to_vec();
        payload(&r, &mut buf);
        assert_eq!(buf, br#"x{"ts":1764000000000,"value":21.5}"#);
        let v: serde_json::Value = serde_json::from_slice(&buf[1..]).unwrap();
        assert_eq!(v["value"].as_f64(), Some(21.5));
    }

    #[test]
    fn mqtt_options_carry_the_link_settings() {
        let mut cfg = SimulatorConfig::default();
        cfg.mqtt.username = Some("sim".into());
        cfg.mqtt.password = Some("pw".into());
        cfg.mqtt.client_id = Some("sim-1".into());
        cfg.max_inflight = 77;
        let o = &mqtt_options(&cfg).unwrap()[0];
        assert_eq!(o.client_id(), "sim-1");
        assert_eq!(o.inflight(), 77);
        assert_eq!(o.request_channel_capacity(), 1000);
        assert_eq!(o.max_packet_size(), 4 * 1024 * 1024);
        assert!(o.credentials().is_some());
    }

    #[test]
    fn every_broker_of_the_link_gets_options_and_the_link_inflight_wins() {
        let mut cfg = SimulatorConfig::default();
        cfg.mqtt.alternates = vec!["127.0.0.1:1884".into()];
        cfg.mqtt.max_inflight = Some(9);
        cfg.max_inflight = 77;
        let opts = mqtt_options(&cfg).unwrap();
        let ports: Vec<u16> = opts.iter().map(|o| o.broker_address().1).collect();
        assert_eq!(ports, vec![1883, 1884]);
        assert!(opts.iter().all(|o| o.inflight() == 9 && o.clean_session()));
    }

    #[test]
    fn a_missing_tls_file_is_named_with_the_broker() {
        let mut cfg = SimulatorConfig::default();
        cfg.mqtt.tls = Some(edgewatch_link::TlsSettings::with_ca(
            "/nonexistent/sim-ca.pem",
        ));
        let e = format!("{:#}", mqtt_options(&cfg).unwrap_err());
        assert!(
            e.starts_with(
                "mqtt link to 127.0.0.1:1883: tls.ca_file: cannot read /nonexistent/sim-ca.pem"
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn invalid_config_fails_before_connecting() {
        let cfg = SimulatorConfig {
            devices: 0,
            ..Default::default()
        };
        let e = run(cfg, std::future::pending()).await.unwrap_err();
        assert!(format!("{e:#}").contains("devices"), "{e:#}");
    }
}
