//! Pure, I/O-free analytics for edgewatch: the wire types agent and aggregator share, partitioning,
//! event-time windows, streaming anomaly detectors and their evaluation.
//!
//! Nothing here touches a socket, a disk or a clock: time is always a value (the reading's timestamp),
//! so everything is a plain state machine a test — or a data scientist — can drive directly. The one
//! exception is opt-in: the `tls` feature reads the PEM files a link's `tls:` block names.

pub mod backoff;
pub mod detect;
pub mod error;
pub mod eval;
pub mod link;
pub mod partition;
pub mod stats;
pub mod tls;
pub mod window;
pub mod wire;
pub mod yaml_limits;

pub use error::{ModelError, TlsError};
