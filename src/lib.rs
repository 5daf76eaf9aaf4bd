//! The `edgewatch` binary's library half: process-level logging and shutdown. The tools behind the
//! subcommands live in `edgewatch-tools`; they are re-exported here under their old paths.

pub use edgewatch_tools::{agents, eval, models, tail, verify};
#[cfg(feature = "embedded-broker")]
pub use edgewatch_tools::{bench, broker, demo};
pub mod config;
pub mod logging;
pub mod shutdown;
