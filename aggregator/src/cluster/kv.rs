//! The NATS side of cluster mode: connecting to the cluster and opening JetStream KV buckets, with
//! errors that name the servers, the bucket and the key.
//!
//! Buckets are opened through [`ensure_bucket`], never `create_key_value`: async-nats 0.51 cannot
//! create a bucket on nats-server 2.9 (it requires an account-info field that appears only in
//! 2.10.8), so the bucket's backing stream `KV_<bucket>` is created here with the settings a KV
//! bucket has, and then opened with `get_key_value` (see shared NATS.md). Every bucket has history
//! 1 and `allow_direct: false`, so reads go to the stream leader and see this client's own writes.
//!
//! Not owned here: what the buckets hold ([`super::lease`], [`super::checkpoint`]).

use super::config::ClusterConfig;
use async_nats::jetstream::{self, kv, stream};
use async_nats::ServerAddr;
use std::time::Duration;

/// Errors talking to the NATS cluster's KV.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// `cluster.credentials.password_env` names a variable that is not set; retrying will not help.
    #[error("{0}")]
    Password(String),
    /// The TLS files of `cluster.tls` could not be loaded; retrying will not help until they are
    /// fixed.
    #[error("nats cluster {servers}: cluster.tls: {source}")]
    Tls {
        /// The configured servers, comma-separated.
        servers: String,
        /// Which file or setting, and why.
        source: edgewatch_link::TlsError,
    },
    /// Joining the cluster did not finish in time, attempt after attempt.
    #[error("nats cluster {servers}: no answer after {attempts} attempts of {each:?} each (are the servers up and JetStream enabled?)")]
    Timeout {
        /// The configured servers, comma-separated.
        servers: String,
        /// Attempts made.
        attempts: u32,
        /// How long each one could take.
        each: Duration,
    },
    /// A server address could not be parsed; retrying will not help until the config is fixed.
    #[error("nats server {server:?}: invalid address: {source}")]
    Address {
        /// The configured address.
        server: String,
        /// The parse error.
        source: std::io::Error,
    },
    /// No server of the cluster accepted the connection (down, unreachable, or login refused).
    #[error("nats cluster {servers}: cannot connect: {source} (retry with backoff; check cluster.credentials if login was refused)")]
    Connect {
        /// The configured servers, comma-separated.
        servers: String,
        /// The client's error.
        source: async_nats::ConnectError,
    },
    /// The bucket's backing stream could not be looked up or created (no JetStream, no quorum,
    /// timeout); retry with backoff.
    #[error("kv bucket {bucket}: cannot create stream KV_{bucket}: {source} (retry with backoff)")]
    CreateBucket {
        /// The bucket.
        bucket: String,
        /// The client's error.
        source: jetstream::context::CreateStreamError,
    },
    /// The bucket's stream exists but could not be opened as a bucket; retry with backoff.
    #[error("kv bucket {bucket}: cannot open: {source} (retry with backoff)")]
    OpenBucket {
        /// The bucket.
        bucket: String,
        /// The client's error.
        source: jetstream::context::KeyValueError,
    },
    /// The bucket exists with settings that break its use (another TTL, history, replica count or
    /// direct gets); retrying will not help until the stream `KV_<bucket>` is fixed or removed.
    #[error("kv bucket {bucket}: exists with other settings: {what} (fix or delete stream KV_{bucket}; never retried)")]
    Mismatch {
        /// The bucket.
        bucket: String,
        /// Which settings differ, expected and found.
        what: String,
    },
    /// A read or write of one key failed for another reason than a revision conflict (timeout,
    /// leader election, connection lost); retry with backoff.
    #[error("kv bucket {bucket}: {op} {key} failed: {source} (retry with backoff)")]
    Op {
        /// The bucket.
        bucket: String,
        /// What was being done (`create`, `update`, `delete`, `read`).
        op: &'static str,
        /// The key.
        key: String,
        /// The client's error.
        source: async_nats::Error,
    },
}

impl KvError {
    /// Whether trying again later may succeed: an unreachable server, an election, a timeout; not
    /// a wrong password, address, TLS file or bucket setting.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            KvError::Connect { .. }
                | KvError::CreateBucket { .. }
                | KvError::OpenBucket { .. }
                | KvError::Op { .. }
                | KvError::Timeout { .. }
        )
    }

    /// An [`KvError::Op`] for `key` of `store`.
    pub(crate) fn op(
        store: &kv::Store,
        op: &'static str,
        key: &str,
        source: impl Into<async_nats::Error>,
    ) -> Self {
        Self::Op {
            bucket: store.name.clone(),
            op,
            key: key.to_string(),
            source: source.into(),
        }
    }
}

/// The current value of `key` in `store`, read from the stream leader: `None` when the key was
/// never written, deleted or purged (its last entry is a marker).
pub(crate) async fn live_entry(store: &kv::Store, key: &str) -> Result<Option<kv::Entry>, KvError> {
    let entry = store
        .entry(key)
        .await
        .map_err(|e| KvError::op(store, "read", key, e))?;
    Ok(entry.filter(|e| e.operation == kv::Operation::Put))
}

/// Every key of `store` that has a subject in its stream (deleted and purged keys included: read
/// them with [`live_entry`]), sorted. Listed from the stream's subjects by stream info requests,
/// with no consumer: a KV key listing creates an ordered consumer per call, and on nats-server 2.9
/// one created under CPU contention can end before its last key (a take-over once missed the last
/// written training sample this way) or never see it.
pub(crate) async fn list_keys(store: &kv::Store) -> Result<Vec<String>, KvError> {
    let prefix = format!("$KV.{}.", store.name);
    let mut subjects = store
        .stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| KvError::op(store, "list", "*", e))?;
    let mut keys = Vec::new();
    while let Some(item) = futures_util::StreamExt::next(&mut subjects).await {
        let (subject, _) = item.map_err(|e| KvError::op(store, "list", "*", e))?;
        if let Some(k) = subject.strip_prefix(&prefix) {
            keys.push(k.to_string());
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// How long ago (ms, this host's clock against the server's stamp) `entry` was written.
pub(crate) fn age_ms(entry: &kv::Entry) -> i64 {
    super::lease::now_ms() - (entry.created.unix_timestamp_nanos() / 1_000_000) as i64
}

/// How long a connection attempt to one server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the cluster, as client `name` (shown in the servers' connection lists), trying every
/// configured server once. The client then follows the cluster by itself: it reconnects to any
/// server, including ones it learns from the cluster, and buffers requests meanwhile.
pub async fn connect(cfg: &ClusterConfig, name: &str) -> Result<async_nats::Client, KvError> {
    let addrs = cfg
        .servers
        .iter()
        .map(|s| {
            s.parse::<ServerAddr>().map_err(|source| KvError::Address {
                server: s.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT);
    if let Some(c) = &cfg.credentials {
        let password = c.resolve_password().map_err(KvError::Password)?;
        opts = opts.user_and_password(c.user.clone(), password);
    }
    if let Some(t) = &cfg.tls {
        let client = t.client_config().map_err(|source| KvError::Tls {
            servers: cfg.servers.join(","),
            source,
        })?;
        opts = opts
            .require_tls(true)
            .tls_client_config(client.as_ref().clone());
    }
    opts.connect(addrs)
        .await
        .map_err(|source| KvError::Connect {
            servers: cfg.servers.join(","),
            source,
        })
}

/// The stream settings of bucket `name`: what `create_key_value` would send, with history 1,
/// `max_age` = `ttl` (none: keys never expire) and `allow_direct: false`.
#[cfg(test)]
fn stream_config(name: &str, ttl: Option<Duration>, replicas: usize) -> stream::Config {
    history_config(name, ttl, replicas, 1)
}

/// [`stream_config`] keeping the last `history` values of each key.
fn history_config(
    name: &str,
    ttl: Option<Duration>,
    replicas: usize,
    history: i64,
) -> stream::Config {
    stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: history,
        max_messages: -1,
        max_bytes: -1,
        max_message_size: -1,
        max_age: ttl.unwrap_or_default(),
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: false,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Opens KV bucket `name`, creating it first when it does not exist: `ttl` is the lifetime of every
/// key after its last write (JetStream's minimum is 100 ms), `replicas` its replication (3 in a
/// 3-node cluster; at most the number of nodes).
///
/// An existing bucket whose TTL, history, replicas or direct-get setting differ is refused
/// ([`KvError::Mismatch`]) rather than silently used: a lease bucket with another TTL would break
/// every owner's self-fencing. Creating concurrently from several aggregators is safe: JetStream
/// accepts the same stream definition twice.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    name: &str,
    ttl: Option<Duration>,
    replicas: usize,
) -> Result<kv::Store, KvError> {
    ensure_bucket_history(js, name, ttl, replicas, History::Exactly(1)).await
}

/// How many values of each key a bucket keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// Exactly this many; another setting is refused.
    Exactly(i64),
    /// Created with 1; any existing setting is accepted as it is.
    Any,
    /// At least this many: created so, and an existing bucket keeping fewer is raised to it (a
    /// stream update: older members that want history 1 then refuse the bucket).
    AtLeast(i64),
}

/// [`ensure_bucket`] with the history `history` (the checkpoints bucket keeps a chain of records
/// per partition in incremental mode).
pub async fn ensure_bucket_history(
    js: &jetstream::Context,
    name: &str,
    ttl: Option<Duration>,
    replicas: usize,
    history: History,
) -> Result<kv::Store, KvError> {
    let want_history = match history {
        History::Exactly(n) | History::AtLeast(n) => n,
        History::Any => 1,
    };
    let want = history_config(name, ttl, replicas, want_history);
    let mut stream = js
        .get_or_create_stream(want.clone())
        .await
        .map_err(|source| KvError::CreateBucket {
            bucket: name.to_string(),
            source,
        })?;
    if let History::AtLeast(n) = history {
        let got = &stream.cached_info().config;
        if got.max_messages_per_subject < n {
            let mut raised = got.clone();
            raised.max_messages_per_subject = n;
            js.update_stream(raised)
                .await
                .map_err(|e| KvError::Mismatch {
                    bucket: name.to_string(),
                    what: format!(
                        "history {} cannot be raised to {n}: {e}",
                        got.max_messages_per_subject
                    ),
                })?;
            stream = js
                .get_stream(format!("KV_{name}"))
                .await
                .map_err(|e| KvError::Mismatch {
                    bucket: name.to_string(),
                    what: format!("stream KV_{name} not found after raising its history: {e}"),
                })?;
        }
    }
    let got = &stream.cached_info().config;
    let mut diffs = Vec::new();
    if got.max_age != want.max_age {
        diffs.push(format!(
            "max_age {:?} (want {:?})",
            got.max_age, want.max_age
        ));
    }
    let history_ok = match history {
        History::Exactly(n) => got.max_messages_per_subject == n,
        History::Any => got.max_messages_per_subject >= 1,
        History::AtLeast(n) => got.max_messages_per_subject >= n,
    };
    if !history_ok {
        diffs.push(format!(
            "history {} (want {want_history})",
            got.max_messages_per_subject
        ));
    }
    if got.num_replicas != replicas {
        diffs.push(format!("replicas {} (want {replicas})", got.num_replicas));
    }
    if got.allow_direct {
        diffs.push("allow_direct true (want false: reads must see our own writes)".into());
    }
    if !diffs.is_empty() {
        return Err(KvError::Mismatch {
            bucket: name.to_string(),
            what: diffs.join(", "),
        });
    }
    js.get_key_value(name)
        .await
        .map_err(|source| KvError::OpenBucket {
            bucket: name.to_string(),
            source,
        })
}

/// Opens KV bucket `name` only if it exists: what a reader uses (`cluster status`), which must
/// never create anything, so a bucket missing or a stream without a leader is an error here.
pub async fn open_existing(js: &jetstream::Context, name: &str) -> Result<kv::Store, KvError> {
    js.get_key_value(name)
        .await
        .map_err(|source| KvError::OpenBucket {
            bucket: name.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_has_the_settings_of_a_kv_bucket() {
        let c = stream_config("leases", Some(Duration::from_secs(20)), 3);
        assert_eq!(c.name, "KV_leases");
        assert_eq!(c.subjects, vec!["$KV.leases.>".to_string()]);
        assert_eq!(c.max_messages_per_subject, 1);
        assert!(c.allow_rollup && c.deny_delete && !c.allow_direct);
        assert_eq!(c.discard, stream::DiscardPolicy::New);
        assert_eq!(c.max_age, Duration::from_secs(20));
        assert_eq!(c.num_replicas, 3);
        assert_eq!(stream_config("c", None, 1).max_age, Duration::ZERO);
    }

    #[test]
    fn only_causes_that_may_pass_are_retried_when_joining() {
        let timeout = KvError::Timeout {
            servers: "nats://n1:4222".into(),
            attempts: 6,
            each: Duration::from_secs(15),
        };
        assert!(timeout.is_retryable());
        assert!(
            timeout.to_string().contains("nats://n1:4222")
                && timeout.to_string().contains("6 attempts")
        );
        assert!(
            !KvError::Password("cluster.credentials.password_env: X is not set".into())
                .is_retryable()
        );
        let mismatch = KvError::Mismatch {
            bucket: "leases".into(),
            what: "max_age".into(),
        };
        assert!(!mismatch.is_retryable());
    }
}
