//! Configuration changes of a running agent: a reload of its file (SIGHUP, through [`Reloader`]) and
//! configuration pushed on `{prefix}/config/{agent}` take one path. The new text is parsed and
//! validated by the same code as the file at start ([`ConfigParser`], errors with line and column);
//! a refused configuration never replaces the one in force; an accepted one is applied live where
//! `reload.rs` says it can be (through a `watch` of the configuration that the worker and the status
//! tasks follow) and the keys that need a restart are named. Every outcome goes to the status.
//!
//! **Remote configuration** is an overlay: a YAML mapping laid over the file (mappings merge key by
//! key, anything else replaces), so the local file stays the base and an empty message removes the
//! overlay. It cannot change `id`. With `state.dir` it is kept in `state.dir/remote-config.yaml`, so a
//! restart runs it again ([`effective_at_start`]); the retained message itself is delivered again at
//! every connect, and an identical one changes nothing.

use crate::beacon::Board;
use crate::config::AgentConfig;
use crate::reload;
use edgewatch_models::agent_status::{ConfigRefusal, ConfigReport};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Parses and validates a configuration: the file's text and, when given, a remote overlay's text.
/// The binary passes the same loader `config check` uses.
pub type ConfigParser =
    Arc<dyn Fn(&str, Option<&str>) -> Result<AgentConfig, ConfigRefusal> + Send + Sync>;

/// Applies a log filter (`log.level`); false when it was not applied (the binary's logging says why).
pub type LogLevelHook = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// File name of the persisted remote configuration, under `state.dir`.
pub const REMOTE_CONFIG_FILE: &str = "remote-config.yaml";

/// What asks for a configuration change.
#[derive(Debug)]
pub(crate) enum Request {
    /// A reload: the file's text as just read, or why it could not be read.
    File(Result<String, String>),
    /// A message on `{prefix}/config/{agent}` (empty: the remote configuration is cleared).
    Remote(bytes::Bytes),
}

/// Asks a running agent to reload its configuration file (what SIGHUP does in `edgewatch agent`).
#[derive(Debug, Clone)]
pub struct Reloader {
    pub(crate) tx: mpsc::Sender<Request>,
}

impl Reloader {
    /// Hands the file's new text (or why it could not be read) to the agent. False when the agent
    /// has stopped or already has reloads waiting (the caller logs it; the next SIGHUP retries).
    pub fn reload_file(&self, text: Result<String, String>) -> bool {
        self.tx.try_send(Request::File(text)).is_ok()
    }
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Nothing to do (the same remote configuration delivered again).
    Unchanged,
    /// Accepted: `live` keys applied now, `restart` keys waiting for a restart.
    Applied {
        digest: String,
        live: Vec<String>,
        restart: Vec<String>,
    },
    /// Refused; the configuration in force stays.
    Refused(ConfigRefusal),
}

/// The configuration control: the state of the file and the overlay, and what runs.
pub(crate) struct Control {
    pub agent: String,
    pub parser: Option<ConfigParser>,
    /// The file's text as last accepted.
    pub base_text: Option<String>,
    /// The remote overlay in force.
    pub overlay: Option<String>,
    /// Take remote configuration (`status.remote_config`).
    pub remote: bool,
    /// The configuration the agent started with (what keys needing a restart still run on).
    pub started: Arc<AgentConfig>,
    /// The configuration the components run now.
    pub running: Arc<AgentConfig>,
    pub cfg_tx: watch::Sender<Arc<AgentConfig>>,
    pub board: Arc<Board>,
    /// Where the overlay is persisted (`state.dir`).
    pub persist_dir: Option<PathBuf>,
    /// Keys of the accepted configuration that wait for a restart.
    pub pending: Vec<String>,
    /// Applies `log.level` (the process's logging belongs to the binary).
    pub log_level: Option<LogLevelHook>,
}

impl Control {
    /// Serves requests until `cancel` or until every [`Reloader`] and the link are gone.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Request>, cancel: CancellationToken) {
        loop {
            let req = tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
            };
            let kind = match &req {
                Request::File(_) => "file",
                Request::Remote(_) => "remote",
            };
            match self.handle(req) {
                Outcome::Unchanged => {
                    tracing::debug!(agent = %self.agent, kind, "configuration unchanged")
                }
                Outcome::Applied {
                    digest,
                    live,
                    restart,
                } => {
                    tracing::info!(agent = %self.agent, kind, digest = %digest, live = ?live, "configuration applied");
                    if !restart.is_empty() {
                        tracing::warn!(agent = %self.agent, kind, keys = ?restart, "changed keys take effect only after a restart; until then the agent runs their previous values");
                    }
                }
                Outcome::Refused(r) => {
                    tracing::error!(agent = %self.agent, kind, error = %r.error, "configuration refused; keeping the one in force");
                }
            }
        }
    }

    /// Decides and applies one request (the only I/O: the overlay file under `state.dir`).
    pub(crate) fn handle(&mut self, req: Request) -> Outcome {
        let outcome = match req {
            Request::File(Err(e)) => refused(e, None),
            Request::File(Ok(text)) => match self.parse(&text, self.overlay.as_deref()) {
                Ok(new) => {
                    self.base_text = Some(text);
                    self.apply(new)
                }
                Err(r) => Outcome::Refused(r),
            },
            Request::Remote(_) if !self.remote => Outcome::Unchanged,
            Request::Remote(payload) => self.remote(&payload),
        };
        match &outcome {
            Outcome::Unchanged => {}
            Outcome::Applied {
                digest, restart, ..
            } => self.board.set_config(
                digest.clone(),
                ConfigReport {
                    source: Some(self.source().into()),
                    applied: Some(digest.clone()),
                    refused: None,
                    restart_needed: restart.clone(),
                },
            ),
            Outcome::Refused(r) => {
                self.board
                    .error(format!("configuration refused: {}", r.error));
                let pending = self.pending.clone();
                self.board.set_config(
                    self.board.digest(),
                    ConfigReport {
                        source: Some(self.source().into()),
                        applied: None,
                        refused: Some(r.clone()),
                        restart_needed: pending,
                    },
                );
            }
        }
        outcome
    }

    fn source(&self) -> &'static str {
        if self.overlay.is_some() {
            "remote"
        } else {
            "file"
        }
    }

    fn parse(&self, base: &str, overlay: Option<&str>) -> Result<AgentConfig, ConfigRefusal> {
        match &self.parser {
            Some(p) => p(base, overlay),
            None => Err(ConfigRefusal {
                error: "this agent was started without a configuration loader: reloads are not possible".into(),
                line: None,
            }),
        }
    }

    fn remote(&mut self, payload: &[u8]) -> Outcome {
        let Ok(text) = std::str::from_utf8(payload) else {
            return refused("remote config: not UTF-8 text".into(), None);
        };
        let Some(base) = self.base_text.clone() else {
            return refused(
                "remote config: the agent has no base configuration text to lay it over".into(),
                None,
            );
        };
        let overlay = (!text.trim().is_empty()).then(|| text.to_string());
        if overlay == self.overlay {
            if self.board.refused() {
                // The configuration in force pushed again after a refused one: report it applied.
                return Outcome::Applied {
                    digest: self.board.digest(),
                    live: Vec::new(),
                    restart: self.pending.clone(),
                };
            }
            return Outcome::Unchanged;
        }
        let new = match self.parse(&base, overlay.as_deref()) {
            Ok(new) => new,
            Err(r) => return Outcome::Refused(r),
        };
        if new.id != self.started.id {
            return refused(
                format!(
                    "remote config: id: cannot change the agent id (is {:?}, got {:?})",
                    self.started.id, new.id
                ),
                None,
            );
        }
        if new.state.dir != self.started.state.dir {
            return refused(
                "remote config: state.dir: cannot be changed remotely (the remote configuration is kept there)".into(),
                None,
            );
        }
        if let Some(dir) = &self.persist_dir {
            if let Err(e) = persist(dir, overlay.as_deref()) {
                return refused(
                    format!(
                        "remote config: could not be stored in {}: {e}",
                        dir.display()
                    ),
                    None,
                );
            }
        }
        self.overlay = overlay;
        self.apply(new)
    }

    fn apply(&mut self, new: AgentConfig) -> Outcome {
        let plan = reload::diff(&self.running, &new);
        let restart = reload::diff(&self.started, &new).restart;
        self.pending = restart.clone();
        let digest = reload::digest(&new);
        if !plan.live.is_empty() {
            self.running = Arc::new(reload::merge_live(&self.running, &new));
            self.cfg_tx.send_replace(self.running.clone());
        }
        if plan.live.iter().any(|k| k == "log.level") {
            if let Some(hook) = &self.log_level {
                hook(new.log.level.as_deref().unwrap_or("info"));
            }
        }
        Outcome::Applied {
            digest,
            live: plan.live,
            restart,
        }
    }
}

fn refused(error: String, line: Option<usize>) -> Outcome {
    Outcome::Refused(ConfigRefusal { error, line })
}

/// Writes (or, with `None`, removes) the persisted overlay, atomically: a restart finds either the
/// old or the new one, never half of one.
fn persist(dir: &Path, overlay: Option<&str>) -> std::io::Result<()> {
    let path = dir.join(REMOTE_CONFIG_FILE);
    match overlay {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(text) => {
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!("{REMOTE_CONFIG_FILE}.tmp"));
            {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(text.as_bytes())?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)
        }
    }
}

/// The configuration to start with: `base` (the file), with the remote overlay persisted under
/// `state.dir` laid over it when there is one and it is still valid (otherwise logged, and the file
/// alone runs). Returns the configuration and the overlay in force.
pub fn effective_at_start(
    base: AgentConfig,
    base_text: &str,
    parser: &ConfigParser,
) -> (AgentConfig, Option<String>) {
    let Some(dir) = base.state.dir.clone().filter(|_| base.status.remote_config) else {
        return (base, None);
    };
    let path = dir.join(REMOTE_CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (base, None),
        Err(e) => {
            tracing::warn!(agent = %base.id, file = %path.display(), error = %e, "the stored remote configuration cannot be read; running the file alone");
            return (base, None);
        }
    };
    match parser(base_text, Some(&text)) {
        Ok(cfg) if cfg.id == base.id && cfg.state.dir == base.state.dir => {
            tracing::info!(agent = %base.id, file = %path.display(), "running the file with the stored remote configuration over it");
            (cfg, Some(text))
        }
        Ok(_) => {
            tracing::warn!(agent = %base.id, file = %path.display(), "the stored remote configuration changes id or state.dir; running the file alone");
            (base, None)
        }
        Err(r) => {
            tracing::warn!(agent = %base.id, file = %path.display(), error = %r.error, "the stored remote configuration is no longer valid over the file; running the file alone");
            (base, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parser for tests: the overlay (when given) replaces the file's text entirely, and the
    /// agent's own validation runs on the result.
    fn parser() -> ConfigParser {
        Arc::new(|base: &str, overlay: Option<&str>| {
            let text = overlay.unwrap_or(base);
            let cfg: AgentConfig = serde_norway::from_str(text).map_err(|e| ConfigRefusal {
                error: e.to_string(),
                line: e.location().map(|l| l.line()),
            })?;
            let problems = cfg.problems();
            if problems.is_empty() {
                Ok(cfg)
            } else {
                Err(ConfigRefusal {
                    error: problems.join("; "),
                    line: None,
                })
            }
        })
    }

    fn control(base: &str) -> (Control, watch::Receiver<Arc<AgentConfig>>) {
        let cfg: Arc<AgentConfig> = Arc::new(serde_norway::from_str(base).unwrap());
        let (cfg_tx, cfg_rx) = watch::channel(cfg.clone());
        let c = Control {
            agent: cfg.id.clone(),
            parser: Some(parser()),
            base_text: Some(base.into()),
            overlay: None,
            remote: true,
            started: cfg.clone(),
            running: cfg,
            cfg_tx,
            board: Arc::new(Board::new("d0".into(), ConfigReport::default())),
            persist_dir: None,
            pending: Vec::new(),
            log_level: None,
        };
        (c, cfg_rx)
    }

    #[test]
    fn a_reload_applies_live_keys_and_names_those_needing_a_restart() {
        let (mut c, rx) = control("id: gw\n");
        let out = c.handle(Request::File(Ok(
            "id: gw\nanomaly: { threshold: 0.9 }\nwindow: { size_ms: 1000 }\n".into(),
        )));
        let Outcome::Applied { live, restart, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(live, vec!["anomaly.threshold"]);
        assert_eq!(restart, vec!["window.size_ms"]);
        let running = rx.borrow().clone();
        assert_eq!(running.anomaly.threshold, Some(0.9));
        assert_eq!(running.window.size_ms, 60_000, "restart keys keep running");
    }

    #[test]
    fn an_invalid_file_is_refused_and_nothing_changes() {
        let (mut c, rx) = control("id: gw\n");
        let out = c.handle(Request::File(Ok(
            "id: gw\nanomaly: { threshold: 7 }\n".into()
        )));
        assert!(
            matches!(&out, Outcome::Refused(r) if r.error.contains("anomaly.threshold")),
            "{out:?}"
        );
        assert!(!rx.has_changed().unwrap());
        assert_eq!(c.running.anomaly.threshold, None);
        let out = c.handle(Request::File(Err("cannot read a.yaml: gone".into())));
        assert!(matches!(out, Outcome::Refused(_)));
    }

    #[test]
    fn remote_config_is_applied_once_and_cleared_by_an_empty_message() {
        let (mut c, rx) = control("id: gw\n");
        let push = bytes::Bytes::from_static(b"id: gw\nanomaly: { threshold: 0.8 }\n");
        assert!(matches!(
            c.handle(Request::Remote(push.clone())),
            Outcome::Applied { .. }
        ));
        assert_eq!(rx.borrow().anomaly.threshold, Some(0.8));
        assert_eq!(c.source(), "remote");
        // The retained message again at the next connect: nothing to do.
        assert_eq!(c.handle(Request::Remote(push)), Outcome::Unchanged);
        assert!(matches!(
            c.handle(Request::Remote(bytes::Bytes::new())),
            Outcome::Applied { .. }
        ));
        assert_eq!(rx.borrow().anomaly.threshold, None);
        assert_eq!(c.source(), "file");
    }

    #[test]
    fn remote_config_cannot_change_the_id_and_a_bad_one_keeps_the_old() {
        let (mut c, _rx) = control("id: gw\n");
        let out = c.handle(Request::Remote(bytes::Bytes::from_static(b"id: other\n")));
        assert!(
            matches!(&out, Outcome::Refused(r) if r.error.contains("id")),
            "{out:?}"
        );
        let out = c.handle(Request::Remote(bytes::Bytes::from_static(
            b"id: gw\nanomaly:\n  threshold: [\n",
        )));
        assert!(
            matches!(&out, Outcome::Refused(r) if r.line.is_some()),
            "{out:?}"
        );
        assert!(c.overlay.is_none());
        assert_eq!(c.running.anomaly.threshold, None);
    }

    #[test]
    fn the_overlay_is_persisted_and_found_again_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let base = format!("id: gw\nstate: {{ dir: {} }}\n", dir.path().display());
        let (mut c, _rx) = control(&base);
        c.persist_dir = Some(dir.path().to_path_buf());
        let overlay = format!("{base}anomaly: {{ threshold: 0.85 }}\n");
        assert!(matches!(
            c.handle(Request::Remote(bytes::Bytes::from(overlay.clone()))),
            Outcome::Applied { .. }
        ));
        let cfg: AgentConfig = serde_norway::from_str(&base).unwrap();
        let (start, kept) = effective_at_start(cfg.clone(), &base, &parser());
        assert_eq!(start.anomaly.threshold, Some(0.85));
        assert_eq!(kept.as_deref(), Some(overlay.as_str()));
        c.handle(Request::Remote(bytes::Bytes::new()));
        let (start, kept) = effective_at_start(cfg, &base, &parser());
        assert_eq!((start.anomaly.threshold, kept), (None, None));
    }
}
