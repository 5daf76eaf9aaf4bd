//! Why an outbox operation failed, and whether retrying makes sense.

use super::*;

/// What can go wrong in the outbox. Each message says whether retrying makes sense.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The configuration is unusable.
    #[error("outbox config: {0} (not retryable: fix the configuration)")]
    InvalidConfig(String),
    /// sled could not open the database directory (locked by another process, permissions, I/O).
    #[error("outbox {}: cannot open: {source} ({})", path.display(), retry_hint(source))]
    Open {
        /// Database directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: sled::Error,
    },
    /// A read, write, delete or flush failed in sled.
    #[error("outbox {}: {op} failed: {source} ({})", path.display(), retry_hint(source))]
    Storage {
        /// Database directory.
        path: PathBuf,
        /// The operation, e.g. `append partition 3` or `flush`.
        op: String,
        /// Cause.
        #[source]
        source: sled::Error,
    },
    /// The checkpoint file could not be read or written.
    #[error("outbox {}: checkpoint file {}: {op} failed: {source} (retryable if the disk has room and is writable)", path.display(), file.display())]
    CheckpointIo {
        /// Database directory.
        path: PathBuf,
        /// The checkpoint file.
        file: PathBuf,
        /// The operation, e.g. `write` or `rename`.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint file is not one this agent wrote whole (damaged, cut short, or of another
    /// format).
    #[error("outbox {}: checkpoint file {}: {problem} (not retryable: the agent starts from empty state and deletes it)", path.display(), file.display())]
    CheckpointDamaged {
        /// Database directory.
        path: PathBuf,
        /// The checkpoint file.
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A stored record does not decode.
    #[error("outbox {}: record at key {key} (partition {partition}, seq {seq}) is corrupt: {source} (not retryable: the stored value is damaged)", path.display())]
    Corrupt {
        /// Database directory.
        path: PathBuf,
        /// The key, hex.
        key: String,
        /// Lane of the record.
        partition: u32,
        /// Seq of the record.
        seq: u64,
        /// Decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A key or meta value has the wrong shape (not written by this module).
    #[error("outbox {}: tree {tree} key {key}: {problem} (not retryable: the stored data is damaged)", path.display())]
    Malformed {
        /// Database directory.
        path: PathBuf,
        /// `records` or `meta`.
        tree: &'static str,
        /// The key, hex.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// A record holds a NaN or infinite number, which JSON cannot carry.
    #[error("outbox: record for partition {partition} not stored: field {field} is {value} (not retryable: JSON cannot carry non-finite numbers)")]
    NotFinite {
        /// Lane the record was for.
        partition: u32,
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// A record could not be serialised.
    #[error("outbox: record for partition {partition} not stored: cannot encode: {source} (not retryable)")]
    Encode {
        /// Lane the record was for.
        partition: u32,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// An ack above the highest seq of the lane ever handed to the network: nobody can have received
    /// those records, so the ack is forged or confused. Refused; nothing was deleted.
    #[error("outbox: ack of partition {partition} up to seq {upto_seq} refused: only seqs up to {exposed} were ever sent (not retryable: nothing was deleted)")]
    AckAhead {
        /// Lane of the ack.
        partition: u32,
        /// Seq the ack claimed.
        upto_seq: u64,
        /// Highest seq of the lane handed to the network.
        exposed: u64,
    },
}

impl OutboxError {
    /// Whether trying the same operation again (with backoff) can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            OutboxError::Open { source, .. } | OutboxError::Storage { source, .. } => {
                matches!(source, sled::Error::Io(_))
            }
            _ => false,
        }
    }
}

pub(super) fn retry_hint(e: &sled::Error) -> &'static str {
    if matches!(e, sled::Error::Io(_)) {
        "retry with backoff: an I/O error may be transient"
    } else {
        "not retryable: the database is damaged or unsupported"
    }
}
