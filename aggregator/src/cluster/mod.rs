//! Cluster mode on NATS JetStream: aggregators coordinate through the KV of a NATS cluster — a
//! heartbeat per member ([`members`]), a lease per partition taken by compare-and-set with a bucket
//! TTL and fenced by its revision ([`lease`]), and checkpoints of partition state written by
//! compare-and-set under that revision ([`checkpoint`], [`store`]; incremental ones, a base and the
//! deltas after it, decided in [`incremental`]); see `DESIGN.md`, "Partition ownership", and the
//! shared NATS notes.
//!
//! [`node`] runs a member: the coordinator that takes, renews and gives back partitions, and the
//! apply loop that checkpoints them and acknowledges after each checkpoint; [`plan`] holds the
//! coordinator's decisions, free of I/O. [`status`] reads the
//! cluster for `edgewatch cluster status` and `GET /api/cluster`; [`kv`] connects (TLS included)
//! and opens buckets on nats-server 2.9; [`config`] is the `cluster:` key.

pub mod checkpoint;
pub mod config;
pub mod incremental;
pub mod kv;
pub mod lease;
pub mod members;
pub mod node;
pub(crate) mod plan;
pub mod status;
pub mod store;
pub mod trainer;

pub use checkpoint::{
    Chain, Checkpoint, CheckpointError, CheckpointFence, KvCheckpoints, TakeOverWrite,
};
pub use config::{ClusterConfig, ClusterKind, NatsCredentials};
pub use kv::{connect, ensure_bucket, KvError};
pub use lease::{wanted, Lease, LeaseError, LeaseTiming, Leases};
