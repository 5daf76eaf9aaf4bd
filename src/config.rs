//! Configuration loading, re-exported from `edgewatch_tools::config` (file, key path, line and column
//! in every error).

pub use edgewatch_tools::config::*;
