//! Structured logging to stderr with `tracing`; `RUST_LOG` overrides the level given on the command line.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once; later calls are ignored).
pub fn init(default_filter: &str) {
    // The embedded broker (rumqttd) logs every probe and every client disconnect as an error; its
    // messages are noise for edgewatch users unless they ask for them explicitly via RUST_LOG.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_filter},rumqttd=off")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
