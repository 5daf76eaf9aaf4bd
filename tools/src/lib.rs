//! edgewatch's tools behind the command line: configuration loading, the demo and its embedded broker,
//! the feed client (`tail`), benchmarks, detector evaluation and delivery verification, model push/show, and the one
//! small HTTP client they share. The `edgewatch` binary parses arguments and dispatches into here.

#[cfg(feature = "cloud")]
pub mod agents;
#[cfg(feature = "embedded-broker")]
pub mod bench;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod config;
#[cfg(feature = "embedded-broker")]
pub mod demo;
#[cfg(feature = "cloud")]
pub mod eval;
pub mod http;
#[cfg(feature = "cloud")]
pub mod models;
pub mod tail;
#[cfg(feature = "cloud")]
pub mod verify;
