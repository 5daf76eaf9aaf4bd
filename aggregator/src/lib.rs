//! The edgewatch aggregator: consumes the window summaries of the partitions it owns and every
//! anomaly event, keeps per-device state, and serves the live anomaly feed, an HTTP API and a
//! dashboard. Several instances split the partitions between them; each serves the whole feed.

mod agents;
pub mod cluster;
pub mod config;
mod consumer;
pub mod directory;
pub mod error;
pub mod feed;
mod fleet;
mod http;
pub mod ownership;
pub mod reload;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod training;

pub use config::AggregatorConfig;
pub use error::AggregatorError;
pub use telemetry::AggregatorMetrics;

use edgewatch_models::wire::Topics;
use feed::FeedHub;
use state::FleetState;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// State shared by the consumer, the HTTP server and every feed client.
pub(crate) struct Shared {
    cfg: AggregatorConfig,
    /// Partitions owned right now (fixed from `owned:`, or won in the cluster).
    owned: ownership::Ownership,
    /// The cluster's buckets, in cluster mode.
    cluster: Option<cluster::node::Buckets>,
    state: Mutex<FleetState>,
    feed: FeedHub,
    metrics: Arc<AggregatorMetrics>,
    started: Instant,
    /// Bearer token required by the feed and the API, when configured.
    token: Option<String>,
    /// Fleet peer groups, when `fleet.enabled`.
    fleet: Option<fleet::run::Fleet>,
    /// Device model training, when `training.enabled`.
    training: Option<training::Training>,
    /// Who owns which partition, from every aggregator's owners record.
    directory: Mutex<directory::Directory>,
    /// The URL other instances reach this one at (`http.advertise` or derived from the listener).
    advertise: String,
    /// The fleet's agents, from their status messages (`GET /api/agents`).
    agents: agents::Agents,
}

/// A configured aggregator with its HTTP listener bound.
pub struct Aggregator {
    shared: Arc<Shared>,
    /// The state store of static ownership (cluster mode checkpoints to the KV instead).
    store: Option<Box<dyn store::StateStore>>,
    listener: TcpListener,
    addr: SocketAddr,
    /// Cluster mode with `fleet.enabled`: the profiles and peer models buckets.
    peer_buckets: Option<fleet::cluster::PeerBuckets>,
}

impl Aggregator {
    /// Validates `cfg` and binds the HTTP listener (so a taken port fails here, clearly).
    pub async fn bind(cfg: AggregatorConfig) -> Result<Self, AggregatorError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(AggregatorError::Config(problems));
        }
        let listener = TcpListener::bind(&cfg.http.listen)
            .await
            .map_err(|source| AggregatorError::Bind {
                addr: cfg.http.listen.clone(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| AggregatorError::Bind {
                addr: cfg.http.listen.clone(),
                source,
            })?;
        let token = match &cfg.http.auth_token_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                AggregatorError::Secret(format!(
                    "http.auth_token_env: environment variable {var} is not set (or not UTF-8)"
                ))
            })?),
            None => None,
        };
        let wps = cfg.state.windows_per_series;
        let (store, state, cluster, owned) = if let Some(c) = &cfg.cluster {
            // State lives in the cluster's KV; partitions are owned as their leases are won.
            let buckets =
                // The trainer role (and its bucket) also fits the fleet peer models.
                cluster::node::Buckets::join(
                    c,
                    &cfg.prefix,
                    &cfg.id,
                    cfg.training.enabled || cfg.fleet.enabled,
                )
                .await
                .map_err(AggregatorError::Cluster)?;
            tracing::info!(aggregator = %cfg.id, servers = %c.servers.join(","), "joined the nats cluster");
            (
                None,
                FleetState::new(wps),
                Some(buckets),
                ownership::Ownership::new(cfg.partitions),
            )
        } else {
            let (store, state) = Self::open_store(&cfg)?;
            let owned = ownership::Ownership::fixed(cfg.partitions, cfg.owned_set());
            (Some(store), state, None, owned)
        };
        let peer_buckets = match (&cluster, &cfg.cluster) {
            (Some(b), Some(c)) if cfg.fleet.enabled => Some(
                fleet::cluster::PeerBuckets::open(&b.js, &cfg.prefix, &cfg.fleet, c.replicas)
                    .await
                    .map_err(AggregatorError::Cluster)?,
            ),
            _ => None,
        };
        let fleet = if cfg.fleet.enabled {
            let f = fleet::run::Fleet::new(&cfg.fleet, &cfg.id)
                .map_err(|e| AggregatorError::Config(vec![format!("fleet: {e}")]))?;
            let seeded = f.seed(&state);
            tracing::info!(aggregator = %cfg.id, windows = seeded, "fleet profiles seeded from the state");
            Some(f)
        } else {
            None
        };
        let training = if cfg.training.enabled {
            // In cluster mode only the member holding the trainer lease trains.
            let t =
                training::Training::new(&cfg.training, &cfg.fleet.groups, cfg.cluster.is_none());
            if let Some(s) = &store {
                let (sets, models) = s.load_training()?;
                tracing::info!(aggregator = %cfg.id, devices = sets.len(), models = models.len(), "training sets and device models loaded from the store");
                t.restore(sets, models);
            }
            Some(t)
        } else {
            None
        };
        let advertise = cfg.http.advertise_url(addr);
        if cfg.http.advertise.is_none() && addr.ip().is_unspecified() {
            tracing::info!(aggregator = %cfg.id, advertise = %advertise, "http.advertise not set: other instances are told to use loopback; set it when aggregators run on different hosts");
        }
        let directory = directory::Directory::new(
            &cfg.id,
            cfg.partitions,
            directory::Timing {
                stale_after_ms: cfg.owners.stale_after_ms,
                startup_grace_ms: cfg.owners.startup_grace_ms,
            },
            fleet::run::now_ms(),
        );
        let shared = Arc::new(Shared {
            directory: Mutex::new(directory),
            advertise,
            token,
            fleet,
            training,
            agents: agents::Agents::default(),
            owned,
            cluster,
            state: Mutex::new(state.with_max_seq_jump(cfg.state.max_seq_jump)),
            feed: FeedHub::new(cfg.feed.history, cfg.feed.client_queue),
            metrics: Arc::new(AggregatorMetrics::default()),
            started: Instant::now(),
            cfg,
        });
        Ok(Self {
            shared,
            store,
            listener,
            addr,
            peer_buckets,
        })
    }

    /// The store and state of static ownership: sled under `state.dir`, or memory.
    fn open_store(
        cfg: &AggregatorConfig,
    ) -> Result<(Box<dyn store::StateStore>, FleetState), AggregatorError> {
        let wps = cfg.state.windows_per_series;
        Ok(match &cfg.state.dir {
            Some(dir) => {
                let s = store::SledStore::open(dir, wps)?;
                let state = store::rebuild(store::StateStore::load(&s)?, wps);
                tracing::info!(aggregator = %cfg.id, dir = %dir.display(), devices = state.devices().len(), "state loaded from the store");
                (Box::new(s), state)
            }
            None => (Box::new(store::MemoryStore::new(wps)), FleetState::new(wps)),
        })
    }

    /// The bound HTTP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies reloads to this aggregator while it runs (SIGHUP; see [`reload`]).
    pub fn reloader(&self) -> reload::Reloader {
        reload::Reloader::new(self.shared.clone())
    }

    /// The feed's WebSocket URL.
    pub fn feed_url(&self) -> String {
        format!("ws://{}/feed", self.addr)
    }

    /// Live metrics.
    pub fn metrics(&self) -> Arc<AggregatorMetrics> {
        self.shared.metrics.clone()
    }

    /// Runs until `shutdown` resolves; then closes feed clients with a "going away" frame and
    /// disconnects from the broker.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AggregatorError> {
        let shared = self.shared;
        let cfg = &shared.cfg;
        let client_id = cfg
            .mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgewatch-{}", cfg.id));
        // Every broker address, primary first; the poll loop moves to the next one on failure.
        let mut addresses = edgewatch_link::options(&cfg.mqtt, client_id)?;
        // Retained `online: false` on our owners topic if the connection dies uncleanly.
        let will = directory::publish::last_will(&Topics::new(&cfg.prefix), &cfg.id);
        for a in &mut addresses {
            a.set_last_will(will.clone());
        }
        let (client, eventloop) = edgewatch_link::client(&addresses, cfg.mqtt.request_channel);
        let owners_client = client.clone();
        tracing::info!(aggregator = %cfg.id, http = %self.addr, owned = shared.owned.list().len(), cluster = shared.cluster.is_some(), broker = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port), "aggregator starting");

        let cancel = CancellationToken::new();
        let (tx, rx) = mpsc::channel(4096);
        let mut poll = tokio::spawn(consumer::poll_loop(
            eventloop,
            addresses,
            client.clone(),
            shared.clone(),
            tx.clone(),
            cancel.clone(),
        ));
        let apply_shared = shared.clone();
        // The coordinator stops first, so partitions are given back (final checkpoints, acks)
        // while the MQTT link is still up.
        let leaving = CancellationToken::new();
        if let Some(t) = &shared.training {
            let n = t.republish(&client, &Topics::new(&cfg.prefix));
            if n > 0 {
                tracing::info!(aggregator = %cfg.id, models = n, "stored device models published again (retained)");
            }
        }
        let fit = tokio::spawn(training::fit_loop(
            shared.clone(),
            tx.clone(),
            cancel.clone(),
        ));
        let (apply, coordinator) = match (self.store, &shared.cluster) {
            (Some(store), _) => {
                // Acks release the agents' outbox records. With a store they follow its flush;
                // without one the state lives in memory and acks follow the apply.
                if shared.cfg.state.dir.is_none() {
                    tracing::warn!(aggregator = %shared.cfg.id, "no state.dir: state is kept in memory only and acknowledged on apply; a restart loses it (set state.dir for durable state)");
                }
                drop(tx);
                let acks = Some(client);
                let apply = tokio::task::spawn_blocking(move || {
                    consumer::apply_loop(rx, apply_shared, store, acks)
                });
                (apply, None)
            }
            (None, Some(buckets)) => {
                let c = cfg
                    .cluster
                    .as_ref()
                    .expect("cluster mode has a cluster config");
                let handle = tokio::runtime::Handle::current();
                // Unbounded on purpose: the blocking apply loop must never wait on the coordinator,
                // which may itself be waiting for the apply loop (Own/Disown); and it holds at most
                // one entry per partition (a fenced partition is dropped until taken again).
                let (lost_tx, lost_rx) = mpsc::unbounded_channel();
                let (fenced_tx, fenced_rx) = mpsc::unbounded_channel();
                let kv = cluster::store::KvStore::new(
                    buckets.checkpoints.clone(),
                    handle.clone(),
                    cfg.state.windows_per_series,
                    Duration::from_millis(c.lease_ttl_ms / 2),
                )
                .with_mode(c.checkpoint);
                let interval = Duration::from_millis(c.checkpoint_interval_ms);
                let acks = client.clone();
                let apply = tokio::task::spawn_blocking(move || {
                    cluster::node::apply_loop(
                        rx,
                        apply_shared,
                        kv,
                        acks,
                        cluster::node::Fenced {
                            partitions: lost_tx,
                            trainer: fenced_tx,
                        },
                        handle,
                        interval,
                    )
                });
                let coordinator = cluster::node::Coordinator {
                    shared: shared.clone(),
                    buckets: buckets.clone(),
                    cluster: c.clone(),
                    http: self.addr.to_string(),
                    ctl: tx.clone(),
                    client: client.clone(),
                    lost: lost_rx,
                    plan: cluster::plan::Plan::new(
                        &shared.cfg.id,
                        shared.cfg.partitions,
                        c.lease_timing(),
                        Duration::from_millis(c.heartbeat_ms),
                    ),
                    started_ms: cluster::lease::now_ms(),
                    last_applied: (Instant::now(), shared.owned.applied()),
                };
                // The fleet trainer role runs beside the coordinator (its take-over may be slow);
                // the fleet peer models are fitted under its lease (`fleet::cluster`).
                let (role_tx, role_rx) = tokio::sync::watch::channel(None);
                if let Some(kv) = self.peer_buckets.clone() {
                    tokio::spawn(fleet::cluster::sync_loop(
                        shared.clone(),
                        kv,
                        role_rx,
                        Duration::from_millis(c.heartbeat_ms),
                        Duration::from_millis(c.lease_ttl_ms / 2),
                        leaving.clone(),
                    ));
                }
                let trainer = buckets.training.clone().map(|bucket| {
                    cluster::trainer::TrainerRole {
                        shared: shared.clone(),
                        leases: buckets.leases.clone(),
                        bucket,
                        cluster: c.clone(),
                        ctl: tx.clone(),
                        client: client.clone(),
                        fenced: fenced_rx,
                        lease: None,
                        role: role_tx,
                    }
                    .run(leaving.clone())
                });
                // The apply loop ends once every sender is gone: the coordinator's and the role's
                // end with them.
                drop(tx);
                let coordinator = coordinator.run(leaving.clone());
                let both = async move {
                    match trainer {
                        Some(t) => {
                            tokio::join!(coordinator, t);
                        }
                        None => coordinator.await,
                    }
                };
                (apply, Some(tokio::spawn(both)))
            }
            (None, None) => unreachable!("bind makes a store or joins a cluster"),
        };
        let http = tokio::spawn(http::serve(self.listener, shared.clone(), cancel.clone()));
        let owners_stop = CancellationToken::new();
        let owners = tokio::spawn(directory::publish::run(
            shared.clone(),
            owners_client.clone(),
            owners_stop.clone(),
        ));
        let refit = tokio::spawn(fleet::run::refit_loop(shared.clone(), cancel.clone()));

        shutdown.await;
        tracing::info!(aggregator = %shared.cfg.id, "aggregator stopping");
        leaving.cancel();
        if let Some(c) = coordinator {
            let _ = c.await;
        }
        // A clean stop says so on the owners topic (a broker only sends the will on a dropped
        // connection), then disconnects: the poll loop ends once both are written.
        owners_stop.cancel();
        let _ = owners.await;
        directory::publish::offline(&shared, &owners_client);
        let _ = owners_client.try_disconnect();
        let polled = tokio::time::timeout(Duration::from_secs(1), &mut poll)
            .await
            .is_ok();
        if !polled {
            tracing::debug!(aggregator = %shared.cfg.id, "broker unreachable at stop: the offline owners record is left to the last will");
        }
        cancel.cancel();
        if !polled {
            let _ = poll.await;
        }
        let _ = apply.await;
        let _ = http.await;
        let _ = refit.await;
        let _ = fit.await;
        // Give feed clients a moment to receive their close frames.
        tokio::time::sleep(Duration::from_millis(50)).await;
        tracing::info!(aggregator = %shared.cfg.id, "aggregator stopped");
        Ok(())
    }
}

/// Binds and runs an aggregator until `shutdown` resolves.
pub async fn run(
    cfg: AggregatorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AggregatorError> {
    Aggregator::bind(cfg).await?.run(shutdown).await
}
