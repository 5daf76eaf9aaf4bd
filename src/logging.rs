//! Structured logging to stderr with `tracing`; `RUST_LOG` overrides the level given on the command
//! line. Two formats: `text` (human, coloured only when stderr is a terminal) and `json` (one object
//! per line, for log shippers).

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

/// Replaces the filter of the installed subscriber.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Set by [`init_with`] when the filter may follow the configuration (neither `RUST_LOG` nor
/// `--log-level` fixed it).
static RELOAD: OnceLock<Reload> = OnceLock::new();

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
    init_full(default_filter, format, false);
}

/// Like [`init_with`]; with `reloadable` (the daemons, when no `--log-level` was given and
/// `RUST_LOG` is unset) the filter can later follow the configuration's `log.level` ([`set_level`]).
pub fn init_full(default_filter: &str, format: LogFormat, reloadable: bool) {
    // The embedded broker (rumqttd) logs every probe and every client disconnect as an error; its
    // messages are noise for edgewatch users unless they ask for them explicitly via RUST_LOG.
    let from_env = EnvFilter::try_from_default_env().ok();
    let reloadable = reloadable && from_env.is_none();
    let filter = from_env.unwrap_or_else(|| filter_of(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => {
            let builder = builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() && reloadable {
                let _ = RELOAD.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
        LogFormat::Json => {
            let builder = builder.json().with_ansi(false).with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() && reloadable {
                let _ = RELOAD.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
    }
}

fn filter_of(directives: &str) -> EnvFilter {
    EnvFilter::new(format!("{directives},rumqttd=off"))
}

/// Checks a filter such as `info` or `warn,edgewatch_agent=debug`; the error names what is wrong.
pub fn check_level(directives: &str) -> Result<(), String> {
    EnvFilter::try_new(directives).map(|_| ()).map_err(|e| {
        format!("not a log filter (e.g. info, debug, warn,edgewatch_agent=debug): {e}")
    })
}

/// Sets the log filter from the configuration's `log.level`. Returns false when the filter is
/// fixed (by `RUST_LOG` or `--log-level`, which win) or the directives are invalid (logged).
pub fn set_level(directives: &str) -> bool {
    let Some(reload) = RELOAD.get() else {
        return false;
    };
    if let Err(e) = check_level(directives) {
        tracing::error!(level = directives, error = %e, "log.level not applied");
        return false;
    }
    match reload(filter_of(directives)) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(level = directives, error = %e, "log.level not applied");
            false
        }
    }
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
    fn log_filters_are_checked() {
        assert!(check_level("info").is_ok());
        assert!(check_level("warn,edgewatch_agent=debug").is_ok());
        assert!(check_level("info,edgewatch_agent=loud").is_err());
    }

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
