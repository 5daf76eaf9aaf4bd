//! One aggregator as a cluster member: the coordinator task that heartbeats, wins, renews and gives
//! back partition leases, and the apply loop that owns partition state and checkpoints it.
//!
//! Ownership changes reach the apply loop as [`Control`] messages in the same queue as the MQTT
//! messages, so they apply in order. Taking a partition: win its lease, take its checkpoint over
//! under the lease revision (fencing any previous owner), load it, and only then subscribe. Giving
//! it back: unsubscribe, write a final checkpoint, acknowledge, drop it, release the lease. Losing
//! it (renewal refused, local validity run out, or a checkpoint write fenced): drop it without
//! acknowledging anything more. Acks for a partition go out only once its state is checkpointed.

use super::checkpoint::{CheckpointError, CheckpointFence, KvCheckpoints, TakeOverWrite};
use super::config::{CheckpointMode, ClusterConfig};
use super::incremental::Compaction;
use super::lease::{Lease, LeaseError, Leases};
use super::members::{MemberInfo, Members, OwnedPartition};
use super::plan::{Action, Plan, Renewal, Verdict};
use super::store::{KvStore, PartitionState};
use super::trainer::{KvTraining, TrainerState, TrainingBucket};
use crate::consumer::{self, Input, Touched, Warnings};
use crate::state::LaneId;
use crate::Shared;
use edgewatch_models::wire::{LaneKind, Topics};

/// Whether a lane id is a training lane's (held by the trainer, not a partition).
fn is_training(id: u32) -> bool {
    id & LaneKind::TRAINING_BIT != 0
}
use rumqttc::{AsyncClient, QoS};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// QoS of the per-partition summaries subscriptions in cluster mode: 0. Delivery rests on the
/// agents' outboxes and the owner's acks after checkpoint (a message lost on the way is resent
/// after the agent's ack timeout), not on MQTT QoS. And on NATS's MQTT listener a QoS 1
/// subscription is a JetStream consumer: about half a second to create on 2.9, and a session
/// holds at most 63 of them, while QoS 0 subscriptions are plain NATS subscriptions that come and
/// go at once as partitions move.
pub(crate) const PARTITION_QOS: QoS = QoS::AtMostOnce;

/// An ownership change for the apply loop.
#[derive(Debug)]
pub enum Control {
    /// Start owning a partition taken over under `fence`, from `state`.
    Own {
        /// The fence of the take-over.
        fence: CheckpointFence,
        /// The state it resumes from.
        state: PartitionState,
        /// Where the partition's chain of checkpoint records stands after the take-over.
        compaction: Compaction,
        /// Answered once the partition is owned.
        done: oneshot::Sender<()>,
    },
    /// Give a partition back: a final checkpoint, its acks, then drop it. Answers whether the
    /// final checkpoint was written.
    Disown {
        /// The partition.
        partition: u32,
        /// Answered once dropped.
        done: oneshot::Sender<bool>,
    },
    /// The lease is lost: drop the partition without writing or acknowledging anything more.
    Lost {
        /// The partition.
        partition: u32,
    },
    /// Start training (the trainer lease was won) from `state`, writing through `training`.
    Train {
        /// The trainer's writes, fenced under the lease's revision.
        training: Box<KvTraining>,
        /// The sets, models and lane seqs read from the training bucket.
        state: Box<TrainerState>,
        /// Answered once training.
        done: oneshot::Sender<()>,
    },
    /// Stop training; with `checkpoint`, write the training lanes' seqs and acknowledge them first
    /// (giving the lease back), answering whether that write succeeded.
    Untrain {
        /// Write and acknowledge first (a clean give-back), or drop at once (lease lost).
        checkpoint: bool,
        /// Answered once stopped.
        done: Option<oneshot::Sender<bool>>,
    },
}

/// The KV side of a member: its buckets.
#[derive(Debug, Clone)]
pub struct Buckets {
    /// Heartbeats.
    pub members: Members,
    /// Partition leases.
    pub leases: Leases,
    /// Partition checkpoints.
    pub checkpoints: KvCheckpoints,
    /// Training sets, models and the trainer's lane seqs (opened only with `training.enabled`,
    /// or `fleet.enabled`, whose peer models the trainer fits).
    pub training: Option<TrainingBucket>,
    /// The JetStream context the buckets were opened with (more buckets: `fleet::cluster`).
    pub(crate) js: async_nats::jetstream::Context,
}

impl Buckets {
    /// Connects to the cluster as `id` and opens (creating if needed) the three buckets of the
    /// deployment with uplink prefix `prefix` (see [`bucket_name`]), and the training bucket when
    /// `training`.
    pub async fn open(
        cfg: &ClusterConfig,
        prefix: &str,
        id: &str,
        training: bool,
    ) -> Result<Self, super::KvError> {
        let client = super::kv::connect(cfg, &format!("edgewatch-aggregator-{id}")).await?;
        let js = async_nats::jetstream::new(client);
        let ttl = Duration::from_millis(cfg.lease_ttl_ms);
        let members = Members::open(
            &js,
            &bucket_name(prefix, super::members::MEMBERS_BUCKET),
            ttl,
            cfg.replicas,
        )
        .await?;
        let leases = Leases::new(
            super::kv::ensure_bucket(
                &js,
                &bucket_name(prefix, super::lease::LEASES_BUCKET),
                Some(ttl),
                cfg.replicas,
            )
            .await?,
            cfg.lease_timing(),
            id,
        );
        // Incremental checkpoints keep a chain of records per key; full ones take the bucket as
        // it is (history 1 when created by them, as every version before incremental checkpoints).
        let history = match cfg.checkpoint {
            CheckpointMode::Incremental => {
                super::kv::History::AtLeast(super::checkpoint::CHAIN_HISTORY)
            }
            CheckpointMode::Full => super::kv::History::Any,
        };
        let checkpoints = KvCheckpoints::new(
            super::kv::ensure_bucket_history(
                &js,
                &bucket_name(prefix, super::checkpoint::CHECKPOINTS_BUCKET),
                None,
                cfg.replicas,
                history,
            )
            .await?,
        );
        let training = if training {
            Some(TrainingBucket::new(
                super::kv::ensure_bucket(
                    &js,
                    &bucket_name(prefix, super::trainer::TRAINING_BUCKET),
                    None,
                    cfg.replicas,
                )
                .await?,
            ))
        } else {
            None
        };
        Ok(Self {
            members,
            leases,
            checkpoints,
            training,
            js,
        })
    }
}

impl Buckets {
    /// The deployment's existing buckets, for reading only (`cluster status`): nothing is created,
    /// so a reader never competes with the members for a stream or its leader; the training bucket
    /// is not opened.
    pub async fn read_only(
        cfg: &ClusterConfig,
        prefix: &str,
        reader: &str,
    ) -> Result<Self, super::KvError> {
        let client = super::kv::connect(cfg, reader).await?;
        let js = async_nats::jetstream::new(client);
        let existing = |what: &str| bucket_name(prefix, what);
        let members =
            Members::open_existing(&js, &existing(super::members::MEMBERS_BUCKET)).await?;
        let leases = Leases::new(
            super::kv::open_existing(&js, &existing(super::lease::LEASES_BUCKET)).await?,
            cfg.lease_timing(),
            reader,
        );
        let checkpoints = KvCheckpoints::new(
            super::kv::open_existing(&js, &existing(super::checkpoint::CHECKPOINTS_BUCKET)).await?,
        );
        Ok(Self {
            members,
            leases,
            checkpoints,
            training: None,
            js,
        })
    }

    /// [`Buckets::open`] as a member joining: each attempt bounded by [`JOIN_ATTEMPT`], retried
    /// with backoff up to [`JOIN_ATTEMPTS`] times while the cause may pass (a server down, an
    /// election, a request that never returns); a wrong password, address or bucket setting fails
    /// at once.
    pub async fn join(
        cfg: &ClusterConfig,
        prefix: &str,
        id: &str,
        training: bool,
    ) -> Result<Self, super::KvError> {
        let mut backoff =
            edgewatch_link::backoff::Backoff::new(500, 5_000, u64::from(std::process::id()));
        let mut attempt = 1;
        loop {
            let why =
                match tokio::time::timeout(JOIN_ATTEMPT, Self::open(cfg, prefix, id, training))
                    .await
                {
                    Ok(Ok(b)) => return Ok(b),
                    Ok(Err(e)) if !e.is_retryable() || attempt >= JOIN_ATTEMPTS => return Err(e),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) if attempt >= JOIN_ATTEMPTS => {
                        return Err(super::KvError::Timeout {
                            servers: cfg.servers.join(","),
                            attempts: attempt,
                            each: JOIN_ATTEMPT,
                        })
                    }
                    Err(_) => format!("no answer within {JOIN_ATTEMPT:?}"),
                };
            let delay = backoff.next_delay_ms();
            tracing::warn!(aggregator = id, attempt, error = %why, retry_in_ms = delay, "cannot join the nats cluster yet; retrying");
            tokio::time::sleep(Duration::from_millis(delay)).await;
            attempt += 1;
        }
    }
}

/// How long one attempt to join the cluster (connect, open the buckets) may take.
const JOIN_ATTEMPT: Duration = Duration::from_secs(15);
/// Attempts to join before the aggregator gives up (about two minutes in all).
const JOIN_ATTEMPTS: u32 = 6;

/// The KV bucket `what` (members, leases, checkpoints) of the deployment whose uplink prefix is
/// `prefix`: `{prefix}_{what}`, with every character a bucket name cannot hold replaced by `_`, so
/// deployments with different prefixes share a NATS cluster without meeting.
pub fn bucket_name(prefix: &str, what: &str) -> String {
    let p: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{p}_{what}")
}

/// The coordinator of one member: the I/O shell around its [`Plan`].
pub(crate) struct Coordinator {
    pub(crate) shared: Arc<Shared>,
    pub(crate) buckets: Buckets,
    pub(crate) cluster: ClusterConfig,
    pub(crate) http: String,
    pub(crate) ctl: mpsc::Sender<Input>,
    pub(crate) client: AsyncClient,
    /// Partitions whose checkpoint write was fenced. Unbounded: the apply loop must never wait on
    /// the coordinator (which waits on it), and it holds at most one entry per partition.
    pub(crate) lost: mpsc::UnboundedReceiver<u32>,
    pub(crate) plan: Plan,
    pub(crate) started_ms: i64,
    pub(crate) last_applied: (Instant, Vec<u64>),
}

impl Coordinator {
    fn id(&self) -> &str {
        &self.shared.cfg.id
    }

    /// Runs rounds until `cancel`, then gives every partition back and leaves.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let period = Duration::from_millis(self.cluster.heartbeat_ms);
        // Wanted partitions held by others are retried more often than the heartbeat, so a
        // partition given back is taken within a fraction of it.
        let retry = (period / 4).max(Duration::from_millis(50));
        // Heartbeat first and wait one retry period before taking anything, so members started
        // together see each other instead of taking everything and giving most of it back.
        let info = self.info();
        if let Err(e) = self.buckets.members.heartbeat(&info).await {
            tracing::warn!(aggregator = %self.id(), error = %e, "first heartbeat failed");
        }
        tokio::select! {
            _ = cancel.cancelled() => return self.leave().await,
            _ = tokio::time::sleep(retry) => {}
        }
        // Starts the heartbeat schedule: the next one is due a period from now.
        let _ = self.plan.round(Instant::now());
        loop {
            self.tick().await;
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(p) = self.lost.recv() => self.forget(p, "a checkpoint write was fenced").await,
                _ = tokio::time::sleep(retry) => {}
            }
        }
        self.leave().await;
    }

    /// One round: heartbeat and renewals (when due), then give back and take partitions.
    async fn tick(&mut self) {
        let mut renewals = Vec::new();
        for action in self.plan.round(Instant::now()) {
            match action {
                Action::Heartbeat => {
                    let info = self.info();
                    if let Err(e) = self.buckets.members.heartbeat(&info).await {
                        tracing::warn!(aggregator = %self.id(), error = %e, "heartbeat failed");
                    }
                }
                Action::Renew(lease) => renewals.push(lease),
                other => self.execute(other).await,
            }
        }
        if !renewals.is_empty() {
            self.renew_all(renewals).await;
        }
        // Bounded: a listing that hangs must not hold up the next heartbeat and renewals.
        let period = Duration::from_millis(self.cluster.heartbeat_ms);
        let members = match tokio::time::timeout(period, self.buckets.members.ids()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::warn!(aggregator = %self.id(), error = %e, "cannot list members; ownership unchanged this round");
                return;
            }
            Err(_) => {
                tracing::warn!(aggregator = %self.id(), after = ?period, "listing members timed out; ownership unchanged this round");
                return;
            }
        };
        for action in self.plan.members(&members) {
            self.execute(action).await;
        }
    }

    /// Executes one ownership action of the plan.
    async fn execute(&mut self, action: Action) {
        match action {
            Action::Heartbeat | Action::Renew(_) => {} // batched by `tick`
            Action::GiveBack(lease) => self.give_back(lease).await,
            Action::Take(p) => self.take(p).await,
        }
    }

    /// Renews `held` at once; drops those lost or past their local validity.
    async fn renew_all(&mut self, held: Vec<Lease>) {
        let leases = self.buckets.leases.clone();
        let renewals = held.into_iter().map(|lease| {
            let leases = leases.clone();
            async move {
                let r = leases.renew(&lease).await;
                (lease, r)
            }
        });
        let results = futures_util::future::join_all(renewals).await;
        for (old, r) in results {
            let (outcome, error) = match r {
                Ok(lease) => (Renewal::Renewed(lease), None),
                Err(LeaseError::Lost { .. }) => (Renewal::Lost, None),
                Err(e) => (Renewal::Failed, Some(e)),
            };
            match self.plan.renewed(Instant::now(), &old, outcome) {
                Verdict::Keep => {
                    if let Some(e) = error {
                        tracing::warn!(aggregator = %self.id(), partition = old.partition, error = %e, "lease renewal failed; retrying at the next heartbeat");
                    }
                }
                Verdict::Drop(why) => self.dropped(old.partition, why).await,
            }
        }
    }

    /// Drops partition `p` at once: it is no longer ours.
    async fn forget(&mut self, p: u32, why: &str) {
        if !self.plan.lost(p) && !self.shared.owned.contains(p) {
            return;
        }
        self.dropped(p, why).await;
    }

    /// Tells the apply loop partition `p` (already out of the plan) is lost.
    async fn dropped(&mut self, p: u32, why: &str) {
        tracing::warn!(aggregator = %self.id(), partition = p, why, "partition lost; dropping it");
        self.shared
            .metrics
            .partitions_lost_total
            .fetch_add(1, Relaxed);
        let _ = self.unsubscribe(p).await;
        let _ = self
            .ctl
            .send(Input::Control(Control::Lost { partition: p }))
            .await;
    }

    /// Tries to win `p`: the lease, then the checkpoint, then the state, then the subscription.
    async fn take(&mut self, p: u32) {
        let lease = match self.buckets.leases.try_acquire(p).await {
            Ok(Some(l)) => l,
            Ok(None) => match self.buckets.leases.adopt(p).await {
                // Held under this id by a previous run of this member (killed before its lease
                // expired): renewing that revision fences the previous run like any takeover.
                Ok(Some(l)) => {
                    tracing::info!(aggregator = %self.id(), partition = p, "lease of a previous run adopted");
                    l
                }
                Ok(None) => return, // held by another member: retried next round
                Err(e) => {
                    tracing::warn!(aggregator = %self.id(), partition = p, error = %e, "cannot adopt lease");
                    return;
                }
            },
            Err(e) => {
                tracing::warn!(aggregator = %self.id(), partition = p, error = %e, "cannot take lease");
                return;
            }
        };
        let wps = self.shared.cfg.state.windows_per_series;
        let write = match self.cluster.checkpoint {
            CheckpointMode::Incremental => TakeOverWrite::Marker,
            CheckpointMode::Full => TakeOverWrite::Base,
        };
        let taken = self
            .buckets
            .checkpoints
            .take_over_chain(p, lease.revision, write, |chain| {
                PartitionState::from_chain(chain, wps).map(|s| s.encode())
            })
            .await;
        let state = match taken {
            Ok((chain, fence)) => match PartitionState::from_chain(&chain, wps) {
                Ok(state) => {
                    let delta_bytes = chain.bytes.saturating_sub(chain.base.len());
                    let compaction =
                        Compaction::new(chain.base.len(), chain.deltas.len(), delta_bytes);
                    Some((fence, state, compaction))
                }
                Err(e) => {
                    tracing::error!(aggregator = %self.id(), partition = p, error = %e, "checkpoint cannot be decoded; not taking the partition (repair or delete key p{p} of the checkpoints bucket)");
                    None
                }
            },
            Err(e @ CheckpointError::Corrupt { .. }) => {
                tracing::error!(aggregator = %self.id(), partition = p, error = %e, "checkpoint cannot be decoded; not taking the partition (repair or delete key p{p} of the checkpoints bucket)");
                None
            }
            Err(e) => {
                tracing::warn!(aggregator = %self.id(), partition = p, error = %e, "take-over failed");
                None
            }
        };
        let Some((fence, state, compaction)) = state else {
            let _ = self.buckets.leases.release(lease).await;
            return;
        };
        let (done, wait) = oneshot::channel();
        let windows = state.windows.len();
        if self
            .ctl
            .send(Input::Control(Control::Own {
                fence,
                state,
                compaction,
                done,
            }))
            .await
            .is_err()
            || wait.await.is_err()
        {
            return; // shutting down
        }
        self.plan.taken(lease.clone());
        self.shared
            .metrics
            .partitions_acquired_total
            .fetch_add(1, Relaxed);
        if let Err(e) = self.subscribe(p).await {
            tracing::warn!(aggregator = %self.id(), partition = p, error = %e, "subscribe request failed; the next reconnect subscribes");
        }
        tracing::info!(aggregator = %self.id(), partition = p, epoch = lease.revision, windows, "partition taken");
    }

    /// Gives `lease`'s partition back (the plan no longer holds it): unsubscribe, final
    /// checkpoint and acks, release.
    async fn give_back(&mut self, lease: Lease) {
        let p = lease.partition;
        let _ = self.unsubscribe(p).await;
        let (done, wait) = oneshot::channel();
        let _ = self
            .ctl
            .send(Input::Control(Control::Disown { partition: p, done }))
            .await;
        let checkpointed = wait.await.unwrap_or(false);
        if checkpointed {
            if let Err(e) = self.buckets.leases.release(lease).await {
                tracing::warn!(aggregator = %self.id(), partition = p, error = %e, "lease release failed; it expires by itself");
            }
        }
        // Without a final checkpoint the lease is left to expire: the next owner then resumes
        // from the last checkpoint and the agents resend the rest.
        self.shared
            .metrics
            .partitions_released_total
            .fetch_add(1, Relaxed);
        tracing::info!(aggregator = %self.id(), partition = p, checkpointed, "partition given back");
    }

    async fn subscribe(&self, p: u32) -> Result<(), rumqttc::ClientError> {
        let topics = Topics::new(&self.shared.cfg.prefix);
        self.client
            .subscribe(topics.summaries_filter(p), PARTITION_QOS)
            .await
    }

    async fn unsubscribe(&self, p: u32) -> Result<(), rumqttc::ClientError> {
        let topics = Topics::new(&self.shared.cfg.prefix);
        self.client.unsubscribe(topics.summaries_filter(p)).await
    }

    /// This member's heartbeat, with per-partition throughput since the last one.
    fn info(&mut self) -> MemberInfo {
        let now = Instant::now();
        let applied = self.shared.owned.applied();
        let secs = now
            .duration_since(self.last_applied.0)
            .as_secs_f64()
            .max(1e-3);
        let owned = self
            .plan
            .held()
            .map(|l| {
                let i = l.partition as usize;
                let before = self.last_applied.1.get(i).copied().unwrap_or(0);
                OwnedPartition {
                    partition: l.partition,
                    epoch: l.revision,
                    since_ms: l.since_ms,
                    checkpoint_lag_ms: self.shared.owned.lag_ms(l.partition),
                    records_per_sec: applied.get(i).copied().unwrap_or(0).saturating_sub(before)
                        as f64
                        / secs,
                }
            })
            .collect();
        self.last_applied = (now, applied);
        MemberInfo {
            id: self.id().to_string(),
            http: self.http.clone(),
            started_ms: self.started_ms,
            at_ms: super::lease::now_ms(),
            owned,
        }
    }

    /// Gives every partition back (final checkpoints) and leaves the member list.
    async fn leave(&mut self) {
        for action in self.plan.leave() {
            self.execute(action).await;
        }
        if let Err(e) = self.buckets.members.leave(self.id()).await {
            tracing::warn!(aggregator = %self.id(), error = %e, "could not leave the member list; the heartbeat expires by itself");
        }
    }
}

/// Where the apply loop reports fenced writes: a partition's checkpoint (the coordinator drops the
/// partition) or the trainer's (the trainer role stops). Unbounded on purpose: the blocking apply
/// loop must never wait on them, and each holds at most one entry per partition or role.
pub(crate) struct Fenced {
    /// A partition's checkpoint was fenced.
    pub(crate) partitions: mpsc::UnboundedSender<u32>,
    /// A training write was fenced.
    pub(crate) trainer: mpsc::UnboundedSender<()>,
}

/// The apply loop of a cluster member: applies messages of owned partitions to the state and the
/// [`KvStore`], checkpoints dirty partitions every `interval`, and acknowledges lanes whose
/// partition is checkpointed. Runs on a blocking thread; ends when the queue closes (after a
/// final checkpoint of whatever is still owned).
pub(crate) fn apply_loop(
    mut rx: mpsc::Receiver<Input>,
    shared: Arc<Shared>,
    mut store: KvStore,
    client: AsyncClient,
    fenced: Fenced,
    handle: tokio::runtime::Handle,
    interval: Duration,
) {
    let Fenced {
        partitions: lost,
        trainer: trainer_fenced,
    } = fenced;
    let mut l = Loop {
        shared,
        topics: Topics::new(""),
        touched: Touched::new(),
        warnings: Warnings::default(),
        client,
        lost,
        trainer_fenced,
    };
    l.topics = Topics::new(&l.shared.cfg.prefix);
    let mut next = Instant::now() + interval;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        let first = handle.block_on(async { tokio::time::timeout(wait, rx.recv()).await });
        match first {
            Ok(None) => break,
            Ok(Some(input)) => {
                l.handle(input, &mut store);
                for _ in 1..consumer::ROUND {
                    match rx.try_recv() {
                        Ok(input) => l.handle(input, &mut store),
                        Err(_) => break,
                    }
                }
            }
            Err(_) => {}
        }
        if Instant::now() >= next {
            l.checkpoint(&mut store, None);
            next = Instant::now() + interval;
        }
    }
    l.checkpoint(&mut store, None);
}

struct Loop {
    shared: Arc<Shared>,
    topics: Topics,
    touched: Touched,
    warnings: Warnings,
    client: AsyncClient,
    lost: mpsc::UnboundedSender<u32>,
    /// Tells the trainer role that a training write was fenced (another member trains).
    trainer_fenced: mpsc::UnboundedSender<()>,
}

impl Loop {
    fn handle(&mut self, input: Input, store: &mut KvStore) {
        match input {
            Input::Publish(p) => consumer::apply_logged(
                &self.shared,
                &self.topics,
                &p,
                store,
                &mut self.touched,
                &mut self.warnings,
            ),
            Input::Control(Control::Own {
                fence,
                state,
                compaction,
                done,
            }) => {
                let p = fence.partition;
                let epoch = fence.epoch;
                self.lock().load_partition(p, &state.windows, &state.lanes);
                store.own(fence, &state, compaction);
                self.shared.owned.set(p, epoch);
                let _ = done.send(());
            }
            Input::Control(Control::Disown { partition, done }) => {
                let ok = self.checkpoint(store, Some(&[partition]));
                self.drop_partition(partition, store);
                let _ = done.send(ok);
            }
            Input::Control(Control::Lost { partition }) => self.drop_partition(partition, store),
            Input::Control(Control::Train {
                training,
                state,
                done,
            }) => {
                let state = *state;
                if let Some(t) = &self.shared.training {
                    {
                        let mut fleet = self.lock();
                        for ((agent, id, epoch), seq) in &state.lanes {
                            fleet.restore_lane(LaneId::new(agent, *id, *epoch), *seq);
                        }
                    }
                    store.train(*training);
                    t.activate(state.sets, state.models);
                    let n = t.republish(&self.client, &self.topics);
                    tracing::info!(aggregator = %self.shared.cfg.id, models = n, "device models published again (retained) by the new trainer");
                }
                let _ = done.send(());
            }
            Input::Control(Control::Untrain { checkpoint, done }) => {
                let written = checkpoint && self.checkpoint_training(store);
                self.stop_training(store);
                if let Some(done) = done {
                    let _ = done.send(written);
                }
            }
            Input::Fitted(m) => {
                // A fit that finishes after the role was lost is dropped: the new trainer fits.
                if let Some(t) = self.shared.training.as_ref().filter(|_| store.trains()) {
                    t.fitted(&self.shared, store, Some(&self.client), &self.topics, *m);
                }
            }
        }
    }

    /// Writes the training lanes' seqs and acknowledges them; `false` when the write failed.
    fn checkpoint_training(&mut self, store: &mut KvStore) -> bool {
        match store.checkpoint_training() {
            None => false,
            Some(Ok(())) => {
                let mut ready = Touched::new();
                self.touched.retain(|(agent, id, epoch), seq| {
                    if is_training(*id) {
                        ready.insert((agent.clone(), *id, *epoch), *seq);
                        false
                    } else {
                        true
                    }
                });
                if !ready.is_empty() {
                    consumer::send_acks(&self.shared, &self.topics, &self.client, &ready);
                }
                true
            }
            Some(Err(e @ CheckpointError::Fenced { .. })) => {
                tracing::warn!(aggregator = %self.shared.cfg.id, error = %e, "training lanes fenced: another member is the trainer; stopping training");
                self.stop_training(store);
                let _ = self.trainer_fenced.send(());
                false
            }
            Some(Err(e)) => {
                self.shared
                    .metrics
                    .checkpoint_errors_total
                    .fetch_add(1, Relaxed);
                if let Some(suppressed) = self.warnings.ready("training_checkpoint") {
                    tracing::warn!(aggregator = %self.shared.cfg.id, error = %e, suppressed, "training lanes checkpoint failed; not acknowledging them, retrying with the next checkpoint");
                }
                false
            }
        }
    }

    /// Stops training here: the store's training part, the sets and models, the lane seqs.
    fn stop_training(&mut self, store: &mut KvStore) {
        store.untrain();
        if let Some(t) = &self.shared.training {
            t.deactivate();
        }
        self.lock().drop_training_lanes();
        self.touched.retain(|(_, id, _), _| !is_training(*id));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, crate::state::FleetState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn drop_partition(&mut self, p: u32, store: &mut KvStore) {
        self.shared.owned.clear(p);
        store.disown(p);
        self.lock().drop_partition(p);
        self.touched.retain(|(_, partition, _), _| *partition != p);
    }

    /// Checkpoints the dirty partitions (of `only`, or all), then acknowledges every touched lane
    /// whose partition is owned and clean. Returns whether every partition written succeeded.
    fn checkpoint(&mut self, store: &mut KvStore, only: Option<&[u32]>) -> bool {
        let shared = self.shared.clone();
        let m = &shared.metrics;
        let mut all_ok = true;
        for w in store.checkpoint(only) {
            match w.result {
                Ok(()) => {
                    m.checkpoints_total.fetch_add(1, Relaxed);
                    m.checkpoint_bytes_total.fetch_add(w.bytes as u64, Relaxed);
                }
                Err(CheckpointError::Fenced { .. }) => {
                    all_ok = false;
                    tracing::warn!(aggregator = %self.shared.cfg.id, partition = w.partition, "checkpoint fenced: another aggregator owns the partition; dropping it");
                    self.drop_partition(w.partition, store);
                    let _ = self.lost.send(w.partition);
                }
                Err(e) => {
                    all_ok = false;
                    m.checkpoint_errors_total.fetch_add(1, Relaxed);
                    if let Some(suppressed) = self.warnings.ready("checkpoint") {
                        tracing::warn!(aggregator = %self.shared.cfg.id, partition = w.partition, error = %e, bytes = w.bytes, suppressed, "checkpoint failed; not acknowledging, retrying with the next one (failures so far: edgewatch_aggregator_checkpoint_errors_total)");
                    }
                }
            }
        }
        if store.trains() && only.is_none() {
            self.checkpoint_training(store);
        }
        for p in store.partitions() {
            let lag = store.lag(p).unwrap_or_default();
            self.shared.owned.set_lag(p, lag.as_millis() as u64);
        }
        let mut ready = Touched::new();
        self.touched.retain(|(agent, p, epoch), seq| {
            if store.owns(*p) && !store.is_dirty(*p) {
                ready.insert((agent.clone(), *p, *epoch), *seq);
                false
            } else {
                store.owns(*p)
            }
        });
        if !ready.is_empty() {
            consumer::send_acks(&self.shared, &self.topics, &self.client, &ready);
        }
        all_ok
    }
}
