//! Process-level shutdown: SIGINT (Ctrl-C) or SIGTERM, or an optional deadline, cancel one token that
//! every component's `shutdown` future watches.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A token cancelled on SIGINT, SIGTERM or after `deadline`, whichever comes first.
pub fn on_signal_or_deadline(deadline: Option<Duration>) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signal() => tracing::info!("signal received; shutting down"),
            _ = deadline => tracing::info!("duration reached; shutting down"),
            _ = t.cancelled() => {}
        }
        t.cancel();
    });
    token
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop this process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Calls `on_hangup` for every SIGHUP until the process ends (reload). The handler is installed
/// before this returns, so from then on SIGHUP no longer terminates the process (its default
/// action); SIGINT and SIGTERM stay a clean stop. Must be called inside a Tokio runtime. On other
/// platforms, or if the handler cannot be installed (logged), nothing happens.
pub fn on_hangup(mut on_hangup: impl FnMut() + Send + 'static) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP received; reloading the configuration");
                        on_hangup();
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reloads need a restart")
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = &mut on_hangup;
    }
}
