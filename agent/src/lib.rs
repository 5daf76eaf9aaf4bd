//! The edgewatch gateway agent: subscribes to sensor readings over MQTT, runs windowed anomaly
//! detection per (device, metric), and forwards window summaries and anomaly events upstream.
//!
//! The per-reading work is a plain state machine ([`pipeline::Pipeline`]); this module wires it to two
//! MQTT links (source and uplink) with bounded queues between one task per concern: `source.rs`
//! (source link), `worker.rs` (pipeline, checkpoints), `uplink/` (outbox owner and its link),
//! supervised by `tasks.rs`; `checkpoint.rs` stores and restores the pipeline.

mod beacon;
mod checkpoint;
pub mod config;
pub mod control;
pub mod error;
mod http;
pub mod ingest;
pub mod multivariate;
pub mod outbox;
pub mod pipeline;
pub mod readiness;
pub mod reload;
mod replay;
mod source;
mod status;
mod tasks;
pub mod telemetry;
pub mod uplink;
mod worker;

pub use config::AgentConfig;
pub use control::{ConfigParser, Reloader};
pub use error::{AgentError, IngestError, SnapshotError};
pub use telemetry::AgentMetrics;

/// The MQTT link (options, TLS, the reconnecting poll loop), under the name the tasks use.
pub(crate) use edgewatch_link as mqtt;
use edgewatch_models::wire::Topics;
use outbox::{Outbox, OutboxConfig};
use rumqttc::{AsyncClient, QoS};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A configured agent, ready to run.
pub struct Agent {
    cfg: AgentConfig,
    metrics: Arc<AgentMetrics>,
    /// The HTTP endpoint's listener (bound by [`Agent::new`]) and bearer token, when `http.listen` is set.
    http: Option<(std::net::TcpListener, Option<String>)>,
    /// Configuration changes: reloads ([`Reloader`]) and remote configuration queue here.
    control_tx: mpsc::Sender<control::Request>,
    control_rx: mpsc::Receiver<control::Request>,
    /// The loader of reloads and remote configuration, the file's text and the overlay in force
    /// ([`Agent::with_reload`]); without it neither is possible.
    reload: Option<(ConfigParser, String, Option<String>)>,
    /// Applies `log.level` on reloads ([`Agent::with_log_level`]).
    log_level: Option<control::LogLevelHook>,
    /// Test hook: the task of this name panics as it starts.
    #[cfg(test)]
    panic_in: Option<&'static str>,
}

impl Agent {
    /// Validates the configuration (every problem is reported at once).
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(AgentError::Config(problems));
        }
        let http = match cfg.http.addr() {
            Some(addr) => Some((bind_http(addr)?, http_token(&cfg)?)),
            None => None,
        };
        // Reloads are rare; a few waiting is plenty (a SIGHUP storm is not queued).
        let (control_tx, control_rx) = mpsc::channel(4);
        Ok(Self {
            cfg,
            http,
            control_tx,
            control_rx,
            reload: None,
            log_level: None,
            metrics: Arc::new(AgentMetrics::default()),
            #[cfg(test)]
            panic_in: None,
        })
    }

    /// Enables reloads and remote configuration: `parser` validates new text like the file at
    /// start, `base_text` is the file's text the configuration came from and `overlay` the remote
    /// configuration laid over it, if any (see [`control::effective_at_start`]).
    pub fn with_reload(
        mut self,
        parser: ConfigParser,
        base_text: String,
        overlay: Option<String>,
    ) -> Self {
        self.reload = Some((parser, base_text, overlay));
        self
    }

    /// Lets reloads apply `log.level` through `hook` (the process's logging is the caller's).
    pub fn with_log_level(mut self, hook: control::LogLevelHook) -> Self {
        self.log_level = Some(hook);
        self
    }

    /// A handle to reload this agent's configuration file while it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            tx: self.control_tx.clone(),
        }
    }

    /// Live metrics of this agent.
    pub fn metrics(&self) -> Arc<AgentMetrics> {
        self.metrics.clone()
    }

    /// The bound address of the HTTP endpoint, when `http.listen` is set.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Runs until `shutdown` resolves, then drains: closes open windows, publishes what is pending
    /// and disconnects cleanly. The source, worker, uplink and uplink-link tasks run under one
    /// tracker ([`tasks::Tasks`]): should one of them panic, the agent logs it, stops the others
    /// in the same order and returns [`AgentError::TaskFailed`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        #[cfg(test)]
        let panic_in = self.panic_in;
        #[cfg(not(test))]
        let panic_in = None;
        let Agent {
            cfg,
            metrics,
            http,
            control_tx,
            control_rx,
            reload,
            log_level,
            ..
        } = self;
        let started = Arc::new(cfg.clone());
        let digest = reload::digest(&cfg);
        let (parser, base_text, overlay) = match reload {
            Some((p, t, o)) => (Some(p), Some(t), o),
            None => (None, None, None),
        };
        let board = Arc::new(beacon::Board::new(
            digest.clone(),
            edgewatch_models::agent_status::ConfigReport {
                source: Some(if overlay.is_some() { "remote" } else { "file" }.into()),
                applied: Some(digest),
                ..Default::default()
            },
        ));
        let (cfg_tx, cfg_rx) = tokio::sync::watch::channel(started.clone());
        let remote = cfg.status.remote_config && parser.is_some();
        // The endpoint and the status line run from the start: /healthz answers while the outbox
        // opens, /readyz says what is not up yet.
        let stop_ops = CancellationToken::new();
        let mut ops = Vec::new();
        if let Some((listener, token)) = http {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| AgentError::Io(format!("http.listen: {e}")))?;
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(agent = %cfg.id, %addr, token = token.is_some(), "http endpoint: /metrics, /healthz, /readyz");
                if !addr.ip().is_loopback() && token.is_none() {
                    tracing::warn!(agent = %cfg.id, %addr, "the http endpoint listens beyond loopback without http.auth_token_env: anyone who reaches this port reads the metrics");
                }
            }
            let ep = http::Endpoint {
                agent: cfg.id.clone(),
                metrics: metrics.clone(),
                token,
                ack_warn: Duration::from_millis(cfg.uplink.ack_warn_ms),
                max_outbox_bytes: cfg.uplink.max_outbox_bytes,
            };
            ops.push(tokio::spawn(http::serve(
                listener,
                Arc::new(ep),
                stop_ops.clone(),
            )));
        }
        ops.push(tokio::spawn(status::run(
            cfg.id.clone(),
            metrics.clone(),
            cfg_rx.clone(),
            stop_ops.clone(),
        )));
        ops.push(tokio::spawn(
            control::Control {
                agent: cfg.id.clone(),
                parser,
                base_text,
                overlay,
                remote,
                started: started.clone(),
                running: started,
                cfg_tx,
                board: board.clone(),
                persist_dir: cfg.state.dir.clone(),
                pending: Vec::new(),
                log_level,
            }
            .run(control_rx, stop_ops.clone()),
        ));
        let ctl = Ctl {
            board,
            cfg: cfg_rx,
            remote: remote.then_some(control_tx),
        };
        let result = Self::run_tasks(cfg, metrics, ctl, shutdown, panic_in).await;
        stop_ops.cancel();
        for task in ops {
            let _ = task.await;
        }
        result
    }

    async fn run_tasks(
        cfg: AgentConfig,
        metrics: Arc<AgentMetrics>,
        ctl: Ctl,
        shutdown: impl Future<Output = ()>,
        // Test hook: the task of this name panics as it starts (always `None` outside tests).
        #[cfg_attr(not(test), allow(unused_variables))] panic_in: Option<&'static str>,
    ) -> Result<(), AgentError> {
        let mut outbox = open_outbox(&cfg).await?;
        let (mut pipeline, covered) = checkpoint::restore(&cfg, &metrics, &mut outbox)?;
        // Models accepted before the restart run from the first reading on.
        let models_dir = match (&cfg.state.dir, cfg.models.enabled) {
            (Some(dir), true) => Some(multivariate::store::dir(dir)),
            _ => None,
        };
        if let Some(dir) = &models_dir {
            load_models(&cfg.id, dir, &mut pipeline);
        }
        let filters = pipeline.filters();
        let after_checkpoint = cfg.state.ack_mode == config::AckMode::AfterCheckpoint;

        let mut src_opts = mqtt::options(
            &cfg.source.mqtt,
            client_id(&cfg.source.mqtt, &cfg.id, "src"),
        )?;
        if cfg.state.dir.is_some() {
            // A durable agent has a persistent session: the broker queues readings while it
            // restarts. In after_checkpoint mode it also keeps the unacknowledged ones and
            // redelivers them; we acknowledge a reading only once a checkpoint covers it.
            for o in &mut src_opts {
                o.set_clean_session(false).set_manual_acks(after_checkpoint);
            }
        }
        let up_link = cfg.uplink_link();
        let mut up_opts = mqtt::options(up_link, client_id(up_link, &cfg.id, "up"))?;
        let topics = Topics::new(&cfg.uplink.prefix);
        let beacon_on = cfg.status.interval_ms > 0;
        if beacon_on {
            // The broker publishes the offline record if this connection dies without a DISCONNECT.
            for o in &mut up_opts {
                o.set_last_will(beacon::last_will(&topics, &cfg.id));
            }
        }
        // `options` yields at least the primary address; the others are tried in turn on failure.
        let (src_client, mut src_loop) =
            AsyncClient::new(src_opts[0].clone(), cfg.source.mqtt.request_channel);
        let (up_client, mut up_loop) =
            AsyncClient::new(up_opts[0].clone(), up_link.request_channel);
        // Small messages, latency matters: no Nagle delay on either link.
        src_loop.network_options.set_tcp_nodelay(true);
        up_loop.network_options.set_tcp_nodelay(true);

        let (msg_tx, msg_rx) = mpsc::channel::<rumqttc::Publish>(cfg.pipeline.queue_capacity);
        let (out_tx, out_rx) = mpsc::channel::<uplink::ToUplink>(64);
        // Unbounded on purpose; see `UplinkLink::notes`.
        let (note_tx, note_rx) = mpsc::unbounded_channel::<uplink::LinkNote>();
        let (model_tx, model_rx) = mpsc::channel::<uplink::link::ModelMessage>(16);
        let stop_source = CancellationToken::new();
        let stop_worker = CancellationToken::new();
        let stop_uplink = CancellationToken::new();
        let accepting = Arc::new(AtomicBool::new(true));
        // A persistent session keeps subscriptions across restarts: the list is kept beside it.
        let subscriptions = Arc::new(source::Subscriptions::new(
            filters.clone(),
            qos(cfg.source.qos),
            cfg.state.dir.as_deref(),
        ));

        tracing::info!(agent = %cfg.id, filters = ?filters, broker = %format!("{}:{}", cfg.source.mqtt.host, cfg.source.mqtt.port), "agent starting");

        #[cfg_attr(not(test), allow(unused_mut))]
        let mut tasks = tasks::Tasks::new();
        #[cfg(test)]
        if let Some(name) = panic_in {
            tasks.inject_panic(name);
        }
        let source = tasks.spawn(
            "source",
            source::Source {
                eventloop: src_loop,
                addresses: src_opts,
                client: src_client.clone(),
                subscriptions: subscriptions.clone(),
                msg_tx,
                when_full: cfg.pipeline.when_full,
                accepting: accepting.clone(),
                metrics: metrics.clone(),
                cancel: stop_source.clone(),
            }
            .run(),
        );
        let worker = tasks.spawn(
            "worker",
            worker::Worker {
                agent: cfg.id.clone(),
                pipeline,
                covered,
                msg_rx,
                model_rx,
                models_dir,
                out_tx,
                src_client: src_client.clone(),
                subscriptions,
                metrics: metrics.clone(),
                checkpoint_interval: Duration::from_millis(cfg.state.checkpoint_interval_ms),
                after_checkpoint,
                flush_on_exit: cfg.state.dir.is_none() || cfg.state.flush_on_exit,
                durable: cfg.state.dir.is_some(),
                cfg: ctl.cfg.clone(),
                stop: stop_worker.clone(),
            }
            .run(),
        );
        // QoS 1 publishes handed to the client vs. acknowledged by the broker: shutdown waits for the
        // two to meet, because closing a socket with unread PubAcks resets it, and a reset connection
        // loses whatever the broker had not read yet.
        let sent = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let mut uplink_link = tasks.spawn(
            "uplink link",
            uplink::link::UplinkLink {
                agent: cfg.id.clone(),
                eventloop: up_loop,
                addresses: up_opts,
                client: up_client.clone(),
                acks_topic: Topics::new(&cfg.uplink.prefix).acks(&cfg.id),
                notes: note_tx,
                models: cfg.models.enabled.then(|| uplink::link::ModelsFeed {
                    topics: Topics::new(&cfg.uplink.prefix),
                    tx: model_tx,
                }),
                sent: sent.clone(),
                acked: acked.clone(),
                metrics: metrics.clone(),
                board: ctl.board.clone(),
                config: ctl.remote.clone().map(|tx| (topics.config(&cfg.id), tx)),
                cancel: stop_uplink.clone(),
            }
            .run(),
        );
        let stop_beacon = CancellationToken::new();
        let beacon = beacon_on.then(|| {
            tokio::spawn(
                beacon::Beacon {
                    agent: cfg.id.clone(),
                    topics: topics.clone(),
                    client: up_client.clone(),
                    metrics: metrics.clone(),
                    board: ctl.board.clone(),
                    cfg: ctl.cfg.clone(),
                    sent: sent.clone(),
                    cancel: stop_beacon.clone(),
                }
                .run(),
            )
        });
        let uplink = {
            let up =
                uplink::Uplink::new(uplink_settings(&cfg), outbox, metrics.clone(), sent.clone());
            let client = up_client.clone();
            // sled calls block: the uplink owns the outbox on a thread of its own. The oneshot
            // tells the tracker when it is done; dropped unsent, the thread panicked.
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("uplink-{}", cfg.id))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                    {
                        Ok(rt) => rt.block_on(up.run(out_rx, note_rx, client)),
                        Err(e) => tracing::error!(error = %e, "could not start the uplink runtime"),
                    }
                    let _ = done_tx.send(());
                })
                .map_err(|e| AgentError::Io(format!("could not start the uplink thread: {e}")))?;
            tasks.supervise("uplink", async move {
                done_rx
                    .await
                    .map_err(|_| "the uplink thread ended without finishing".to_string())
            })
        };

        let failed = tasks.failed();
        tokio::select! {
            () = shutdown => {}
            () = failed.cancelled() => {}
        }
        tracing::info!(agent = %cfg.id, "agent stopping: draining open windows and pending publishes");
        let mut result = Ok(());
        if after_checkpoint {
            // Keep the source connection up until the final checkpoint's readings are
            // acknowledged; whatever arrives meanwhile stays unacknowledged for redelivery.
            accepting.store(false, Relaxed);
            stop_worker.cancel();
            tasks::first_failure(&mut result, worker.join().await);
            if src_client.disconnect().await.is_err() {
                stop_source.cancel();
            }
            let mut source = source;
            match source.join_within(Duration::from_secs(5)).await {
                Some(r) => tasks::first_failure(&mut result, r),
                None => {
                    tracing::warn!(agent = %cfg.id, "source link did not close within 5 s");
                    stop_source.cancel();
                }
            }
        } else {
            stop_source.cancel();
            tasks::first_failure(&mut result, source.join().await);
            tasks::first_failure(&mut result, worker.join().await);
        }
        tasks::first_failure(&mut result, uplink.join().await);
        stop_beacon.cancel();
        if let Some(b) = beacon {
            let _ = b.await;
            // A DISCONNECT discards the last will: say it ourselves.
            let connected = metrics.uplink_connected.load(Relaxed) == 1;
            beacon::publish_offline(&up_client, &topics, &cfg.id, &sent, connected);
        }
        if cfg.uplink.qos > 0 || beacon_on {
            let deadline = Instant::now() + Duration::from_secs(10);
            while acked.load(Relaxed) < sent.load(Relaxed) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let missing = sent.load(Relaxed).saturating_sub(acked.load(Relaxed));
            if missing > 0 {
                tracing::warn!(agent = %cfg.id, missing, "uplink publishes not acknowledged by the broker within 10 s of shutdown");
            }
        }
        // Everything is queued in the client; a Disconnect behind it ends the poll loop once written.
        if up_client.disconnect().await.is_err() {
            stop_uplink.cancel();
        }
        match uplink_link.join_within(Duration::from_secs(5)).await {
            Some(r) => tasks::first_failure(&mut result, r),
            None => {
                tracing::warn!(agent = %cfg.id, "uplink did not flush within 5 s");
                stop_uplink.cancel();
            }
        }
        // Whatever was cancelled above ends promptly; nothing is left running behind the agent.
        if tokio::time::timeout(Duration::from_secs(5), tasks.close())
            .await
            .is_err()
        {
            tracing::warn!(agent = %cfg.id, "agent tasks did not end within 5 s of being stopped");
        }
        let m = &metrics;
        tracing::info!(
            agent = %cfg.id,
            messages = m.messages_total.load(Relaxed),
            readings = m.readings_total.load(Relaxed),
            rejected = %m.rejected_summary(),
            late_readings = m.late_readings_total.load(Relaxed),
            windows = m.windows_total.load(Relaxed),
            anomalies = m.anomalies_total.load(Relaxed),
            series = m.series.load(Relaxed),
            oversized_packets = m.oversized_packets_total.load(Relaxed),
            "agent stopped"
        );
        result
    }
}

/// The configuration control's ends that the tasks of [`Agent::run_tasks`] hold.
struct Ctl {
    board: Arc<beacon::Board>,
    /// The configuration in force, as reloads change it.
    cfg: tokio::sync::watch::Receiver<Arc<AgentConfig>>,
    /// Where remote configuration goes, when it is taken.
    remote: Option<mpsc::Sender<control::Request>>,
}

/// Offers every model stored in `dir` to the pipeline (at start, before the first reading). A file
/// that cannot be read or is refused is logged and skipped: the device keeps univariate detection.
fn load_models(agent: &str, dir: &std::path::Path, pipeline: &mut pipeline::Pipeline) {
    let files = match multivariate::store::load_all(dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::error!(agent, dir = %dir.display(), error = %e, "could not list stored models; running without them");
            return;
        }
    };
    for (key, bytes) in files {
        let result = bytes
            .map_err(|e| e.to_string())
            .and_then(|b| pipeline.offer_model(&key, &b).map_err(|e| e.to_string()));
        match result {
            Ok(offer) => {
                tracing::info!(agent, key = %key, offer = ?offer, "model loaded from disk")
            }
            Err(e) => {
                tracing::warn!(agent, key = %key.escape_debug(), error = %e, "stored model ignored")
            }
        }
    }
}

fn uplink_settings(cfg: &AgentConfig) -> uplink::UplinkSettings {
    let u = &cfg.uplink;
    uplink::UplinkSettings {
        agent: cfg.id.clone(),
        topics: Topics::new(&u.prefix),
        qos: qos(u.qos),
        batch_max: u.batch_max_records,
        max_delay: Duration::from_millis(u.batch_max_delay_ms),
        ack_timeout: Duration::from_millis(u.ack_timeout_ms),
        max_unacked: u.max_unacked_records,
        drain_rate: u.drain_records_per_sec as f64,
        shutdown_wait: Duration::from_millis(u.shutdown_wait_ms),
        ack_warn: Duration::from_millis(u.ack_warn_ms),
    }
}

/// Binds the HTTP endpoint's listener (so a taken port fails at start, naming the key).
fn bind_http(addr: std::net::SocketAddr) -> Result<std::net::TcpListener, AgentError> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| AgentError::Io(format!("http.listen: cannot listen on {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| AgentError::Io(format!("http.listen: {addr}: {e}")))?;
    Ok(listener)
}

/// The bearer token named by `http.auth_token_env`, read from the environment.
fn http_token(cfg: &AgentConfig) -> Result<Option<String>, AgentError> {
    match &cfg.http.auth_token_env {
        None => Ok(None),
        Some(var) => match std::env::var(var) {
            Ok(t) if !t.is_empty() => Ok(Some(t)),
            _ => Err(AgentError::Secret(format!(
                "http.auth_token_env: environment variable {var} is not set, empty or not UTF-8"
            ))),
        },
    }
}

/// Opens the outbox in `state.dir`, or a temporary one (logged) when there is none.
async fn open_outbox(cfg: &AgentConfig) -> Result<Outbox, AgentError> {
    let ocfg = OutboxConfig {
        max_outbox_bytes: cfg.uplink.max_outbox_bytes,
        normal_score_below: cfg
            .uplink
            .coarsen_below_score
            .unwrap_or_else(|| cfg.threshold()),
    };
    let dir = cfg.state.dir.clone();
    let agent = cfg.id.clone();
    let cache = cfg.state.cache_bytes;
    let opened = tokio::task::spawn_blocking(move || match &dir {
        Some(dir) => Outbox::open_with_cache(dir, ocfg, cache),
        None => {
            tracing::warn!(agent = %agent, "no state.dir: the outbox is temporary, so a restart loses what was not yet acknowledged");
            Outbox::open_temporary(ocfg)
        }
    })
    .await
    .map_err(|e| AgentError::Io(format!("outbox open task failed: {e}")))?;
    let outbox = opened.map_err(AgentError::Outbox)?;
    let pending = outbox.records();
    if pending > 0 {
        tracing::info!(agent = %cfg.id, records = pending, bytes = outbox.bytes(), "outbox holds records from before the restart; resending them");
    }
    Ok(outbox)
}

/// Runs an agent with `cfg` until `shutdown` resolves.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    Agent::new(cfg)?.run(shutdown).await
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn client_id(link: &mqtt::MqttLink, agent: &str, role: &str) -> String {
    link.client_id.as_ref().map_or_else(
        || format!("edgewatch-{agent}-{role}"),
        |c| format!("{c}-{role}"),
    )
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panicking task is reported by name and the agent stops the others (the brokers are
    /// unreachable here: the links keep retrying until they are stopped).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_task_stops_the_agent_and_is_returned() {
        let mut cfg = AgentConfig::with_id("gw-panic");
        cfg.source.mqtt.host = "127.0.0.1".into();
        cfg.source.mqtt.port = 1;
        cfg.state.ack_mode = config::AckMode::OnReceipt;
        let mut agent = Agent::new(cfg).unwrap();
        agent.panic_in = Some("worker");
        // Never asked to stop: only the failure can end the run.
        let run = agent.run(std::future::pending());
        let result = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the agent stops by itself once a task failed");
        match result {
            Err(AgentError::TaskFailed { task, detail }) => {
                assert_eq!(task, "worker");
                assert!(detail.contains("injected panic"), "{detail}");
            }
            other => panic!("expected TaskFailed, got {other:?}"),
        }
    }
}
