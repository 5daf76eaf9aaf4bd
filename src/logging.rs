//! Structured logging to stderr with `tracing`; `RUST_LOG` overrides the level given on the command
//! line. Two formats: `text` (human, coloured only when stderr is a terminal) and `json` (one object
//! per line, for log shippers).

use std::io::IsTerminal as _;
use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event; ANSI colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per event: `timestamp`, `level`, `fields` (with `message`).
    Json,
}

/// Installs the global text subscriber (once; later calls are ignored).
pub fn init(default_filter: &str) {
    init_with(default_filter, LogFormat::Text);
}

/// Installs the global subscriber in `format` (once; later calls are ignored).
pub fn init_with(default_filter: &str, format: LogFormat) {
    // The embedded broker (rumqttd) logs every probe and every client disconnect as an error; its
    // messages are noise for edgewatch users unless they ask for them explicitly via RUST_LOG.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_filter},rumqttd=off")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// `e`'s cause chain as one line, `outer: inner: ...`, leaving out a cause whose text the line
/// already ends with (a wrapper that repeats its source, as `Connection refused: Connection
/// refused` did).
pub fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_repeating_its_wrapper_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let e = anyhow::Error::new(io).context("Connection refused");
        assert_eq!(chain(&e), "Connection refused");
        let e = anyhow::anyhow!("inner")
            .context("outer: inner")
            .context("top");
        assert_eq!(chain(&e), "top: outer: inner");
        let e = anyhow::anyhow!("root cause").context("cannot connect to 127.0.0.1:1");
        assert_eq!(chain(&e), "cannot connect to 127.0.0.1:1: root cause");
    }
}
