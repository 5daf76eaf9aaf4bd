//! The `edgewatch` binary's library half: configuration loading, the demo, the feed client, benchmarks,
//! evaluation commands and delivery verification. `main.rs` only parses the command line and calls into here.

#[cfg(feature = "embedded-broker")]
pub mod bench;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod config;
#[cfg(feature = "embedded-broker")]
pub mod demo;
pub mod eval;
pub mod logging;
pub mod shutdown;
pub mod tail;
pub mod verify;
