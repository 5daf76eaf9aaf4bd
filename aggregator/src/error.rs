//! Errors of the aggregator.

use thiserror::Error;

/// Why the aggregator could not start or run.
#[derive(Debug, Error)]
pub enum AggregatorError {
    /// The configuration is invalid; each entry is `key.path: problem`.
    #[error("invalid aggregator configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// The HTTP listener could not bind (port taken, no permission). Retrying will not help until
    /// the address is freed or changed.
    #[error("cannot listen on {addr}: {source} (is another process using this port? change http.listen)")]
    Bind {
        /// The configured address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The durable state store could not be opened or loaded.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A required secret could not be resolved.
    #[error("{0}")]
    Secret(String),
    /// The TLS files of the MQTT link could not be loaded; retrying will not help until they are
    /// fixed.
    #[error("mqtt link to {broker}: {source}")]
    Tls {
        /// The link's primary broker, `host:port`.
        broker: String,
        /// Which file or setting, and why.
        source: edgewatch_link::TlsError,
    },
    /// The NATS cluster could not be joined (unreachable, login refused, buckets not creatable).
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::KvError),
}

impl From<edgewatch_link::LinkError> for AggregatorError {
    fn from(e: edgewatch_link::LinkError) -> Self {
        match e {
            edgewatch_link::LinkError::Secret(why) => AggregatorError::Secret(why),
            edgewatch_link::LinkError::Tls { broker, source } => {
                AggregatorError::Tls { broker, source }
            }
        }
    }
}
