//! The `edgewatch` binary's library half: configuration loading, the demo, the feed client, benchmarks
//! and evaluation commands. `main.rs` only parses the command line and calls into here.

pub mod eval;
