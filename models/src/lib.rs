//! Pure, I/O-free analytics for edgewatch: the wire types agent and aggregator share, partitioning,
//! event-time windows, streaming anomaly detectors and their evaluation.
//!
//! Nothing here touches a socket, a disk or a clock: time is always a value (the reading's timestamp),
//! so everything is a plain state machine a test — or a data scientist — can drive directly. How to
//! reach a broker (settings, TLS, reconnects) lives in `edgewatch-link`.

pub mod agent_status;
pub mod detect;
pub mod error;
pub mod eval;
pub mod glob;
pub mod multi;
pub mod partition;
pub mod reload;
pub mod stats;
pub mod window;
pub mod wire;
pub mod yaml_limits;

pub use error::ModelError;
