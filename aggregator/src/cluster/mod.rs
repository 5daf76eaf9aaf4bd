//! Cluster mode on NATS JetStream (in progress): aggregators coordinate through the KV of a NATS
//! cluster — a lease per partition taken by compare-and-set with a bucket TTL, fenced by the
//! lease revision, and checkpoints of partition state written by compare-and-set under that
//! revision (see `DESIGN.md`, "Partition ownership", and the shared NATS notes).
//!
//! What exists: the `cluster:` configuration ([`config`]), connecting and opening buckets on
//! nats-server 2.9 ([`kv`]), leases and rendezvous hashing ([`lease`]), fenced checkpoints
//! ([`checkpoint`]). What does not yet: membership heartbeats, the timers that renew leases and
//! retry orphaned partitions, a KV-backed `StateStore`, and wiring any of it into
//! [`crate::Aggregator`], which still owns the static `owned:` partitions.

pub mod checkpoint;
pub mod config;
pub mod kv;
pub mod lease;
pub mod members;
pub mod node;
pub mod status;
pub mod store;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointFence, KvCheckpoints};
pub use config::{ClusterConfig, ClusterKind, NatsCredentials};
pub use kv::{connect, ensure_bucket, KvError};
pub use lease::{wanted, Lease, LeaseError, LeaseTiming, Leases};
