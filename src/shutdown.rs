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
