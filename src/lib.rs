//! The `edgewatch` binary's library half: process-level logging, shutdown and the systemd protocol. The tools behind the
//! subcommands live in `edgewatch-tools`; they are re-exported here under their old paths.

#[cfg(feature = "cloud")]
pub use edgewatch_tools::agents;
pub use edgewatch_tools::tail;
#[cfg(feature = "embedded-broker")]
pub use edgewatch_tools::{bench, broker, demo};
#[cfg(feature = "cloud")]
pub use edgewatch_tools::{eval, models, verify};
pub mod config;
pub mod logging;
pub mod shutdown;
pub mod systemd;
