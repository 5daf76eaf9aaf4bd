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
pub fn on_hangup(on_hangup: impl FnMut() + Send + 'static) {
    hangups().serve(on_hangup);
}

/// SIGHUPs caught from now on, to be served later by [`Hangups::serve`]: for a daemon whose
/// reload target exists only once it is up, while its health endpoint may answer (and a
/// supervisor send SIGHUP) before. A SIGHUP in between is kept and served then, instead of
/// terminating the process. Must be called inside a Tokio runtime.
pub fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(hup) => Hangups(Some(hup)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reloads need a restart");
                Hangups(None)
            }
        }
    }
    #[cfg(not(unix))]
    {
        Hangups(None)
    }
}

/// SIGHUP caught since [`hangups`]; see [`Hangups::serve`].
pub struct Hangups(
    #[cfg(unix)] Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] Option<()>,
);

impl Hangups {
    /// Calls `on_hangup` for every SIGHUP caught, the ones before this call included, until the
    /// process ends.
    pub fn serve(self, mut on_hangup: impl FnMut() + Send + 'static) {
        #[cfg(unix)]
        if let Some(mut hup) = self.0 {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP received; reloading the configuration");
                    on_hangup();
                }
            });
        }
        #[cfg(not(unix))]
        {
            let _ = (&mut on_hangup, self.0);
        }
    }
}
