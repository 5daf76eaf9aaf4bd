//! `edgewatch verify`: reconciles a simulator readings log with what the aggregators hold and says
//! whether every reading is counted exactly once.
//!
//! This module reads the log, fetches every instance's `/api/windows`, and prints the report (text
//! or JSON); the rules live in [`reconcile`], which is pure, and the HTTP GET in `fetch`. It does
//! not wait for the pipeline to settle: stop the simulator and the agent (which flushes its open
//! windows) and let the aggregators apply everything before running it.
//! Exit codes (set by `main`): 0 everything matched (or only loss within `--tolerate-loss`),
//! 1 mismatches, 2 usage or I/O errors.

pub(crate) mod fetch;
pub mod reconcile;

use clap::Args;
use edgewatch_aggregator::state::HeldSeries;
use reconcile::{Check, Instance, LogReadings, Report};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Findings listed per kind in the text report.
const LIST_LIMIT: usize = 20;

/// Arguments of `edgewatch verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The simulator's readings log (`readings_log_path`): CSV lines device,metric,ts_ms,value.
    #[arg(long, value_name = "LOG.csv")]
    pub readings: PathBuf,
    /// Base URL of an aggregator's HTTP API, e.g. http://127.0.0.1:8080; repeat for every instance.
    #[arg(long = "aggregator", value_name = "URL", required = true)]
    pub aggregators: Vec<String>,
    /// Bearer token, when the aggregators require one.
    #[arg(long, conflicts_with = "token_env")]
    pub token: Option<String>,
    /// Name of an environment variable holding the bearer token (keeps it out of `ps`).
    #[arg(long, value_name = "VAR")]
    pub token_env: Option<String>,
    /// The agent's window length (`window.size_ms`); coarsened windows span multiples of it.
    #[arg(long, value_name = "N")]
    pub window_ms: i64,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Accept up to N lost readings in total (the agent's checkpoint-interval loss mode).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub tolerate_loss: u64,
}

/// Why `verify` could not reach a verdict.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// The readings log could not be read (the OS error follows in the cause chain).
    #[error("cannot read {path}")]
    ReadLog {
        /// The log.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line of the readings log is malformed.
    #[error("{path}:{line}: {message}")]
    BadLog {
        /// The log.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// An aggregator could not be queried.
    #[error("{url}: {message}")]
    Fetch {
        /// The URL requested.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// Reads a readings log; blank lines are skipped.
pub fn load_log(path: &Path) -> Result<LogReadings, VerifyError> {
    let io = |source| VerifyError::ReadLog {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut log = LogReadings::default();
    for (i, line) in BufReader::with_capacity(1 << 16, file).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let r = edgewatch_simulators::parse_line(&line).map_err(|e| VerifyError::BadLog {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        log.push(r.device, r.metric, r.ts_ms, r.value);
    }
    Ok(log)
}

/// The bearer token from `--token` or the variable named by `--token-env`.
fn token(args: &VerifyArgs) -> Result<Option<String>, VerifyError> {
    let t = match (&args.token, &args.token_env) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
            VerifyError::Usage(format!(
                "--token-env: environment variable {var} is not set (or not UTF-8)"
            ))
        })?),
        (None, None) => None,
    };
    if t.as_deref()
        .is_some_and(|t| t.chars().any(char::is_control))
    {
        return Err(VerifyError::Usage(
            "the token contains control characters, which cannot go into an HTTP header".into(),
        ));
    }
    Ok(t)
}

/// Reads the log, fetches every instance and reconciles; prints nothing.
pub async fn verify(args: &VerifyArgs) -> Result<Report, VerifyError> {
    let check = Check::new(args.window_ms, args.tolerate_loss)?;
    let token = token(args)?;
    let bases = args
        .aggregators
        .iter()
        .map(|u| fetch::Base::parse(u))
        .collect::<Result<Vec<_>, _>>()?;
    let path = args.readings.clone();
    let log = tokio::task::spawn_blocking(move || load_log(&path))
        .await
        .map_err(|e| VerifyError::ReadLog {
            path: args.readings.clone(),
            source: std::io::Error::other(e),
        })??;
    let mut instances = Vec::with_capacity(bases.len());
    for base in &bases {
        let body = base.get("/api/windows", token.as_deref()).await?;
        let series: Vec<HeldSeries> =
            serde_json::from_slice(&body).map_err(|e| VerifyError::Fetch {
                url: base.url("/api/windows"),
                message: format!("unexpected JSON: {e}"),
            })?;
        instances.push(Instance {
            name: base.url(""),
            series,
        });
    }
    Ok(check.reconcile(&log, &instances))
}

/// Runs `edgewatch verify`: prints the report; `Ok(true)` when everything matched.
pub async fn run(args: VerifyArgs) -> anyhow::Result<bool> {
    let report = verify(&args).await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write_text(&report, &mut out)?;
    }
    out.flush()?;
    Ok(report.ok)
}

/// The human report: figures, then up to [`LIST_LIMIT`] findings of each kind, then the verdict.
pub fn write_text(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    use crate::tail::format_ts;
    writeln!(
        out,
        "checked {} series and {} windows on {} aggregator(s) (base window {} ms)",
        r.series_checked,
        r.windows_checked,
        r.instances.len(),
        r.window_ms
    )?;
    writeln!(
        out,
        "readings: {} expected (log), {} found (aggregator totals), {} in held windows, {} not retained (older than the oldest held window)",
        r.readings_expected, r.readings_found, r.readings_in_held_windows, r.not_retained
    )?;
    if r.series_on_several_instances > 0 {
        writeln!(
            out,
            "note: {} series are held by more than one aggregator",
            r.series_on_several_instances
        )?;
    }
    if r.misaligned_windows > 0 {
        writeln!(
            out,
            "warning: {} windows are not aligned to --window-ms {}: is it the agent's window.size_ms?",
            r.misaligned_windows, r.window_ms
        )?;
    }
    let more = |out: &mut dyn Write, n: usize| -> std::io::Result<()> {
        if n > LIST_LIMIT {
            writeln!(out, "  ... and {} more", n - LIST_LIMIT)?;
        }
        Ok(())
    };
    writeln!(
        out,
        "missing: {} windows, {} readings",
        r.missing.len(),
        r.missing_readings
    )?;
    for m in r.missing.iter().take(LIST_LIMIT) {
        writeln!(
            out,
            "  {} {} window {} ({}): expected {} readings, found none",
            m.device,
            m.metric,
            m.window_start_ms,
            format_ts(m.window_start_ms),
            m.expected
        )?;
    }
    more(out, r.missing.len())?;
    writeln!(out, "doubled: {}", r.doubled.len())?;
    for d in r.doubled.iter().take(LIST_LIMIT) {
        writeln!(
            out,
            "  {} {} window [{}, {}) on {} overlaps [{}, {}) on {}",
            d.device,
            d.metric,
            d.start_ms,
            d.end_ms,
            d.instance,
            d.other_start_ms,
            d.other_end_ms,
            d.other_instance
        )?;
    }
    more(out, r.doubled.len())?;
    writeln!(out, "wrong count: {}", r.wrong_count.len())?;
    for w in r.wrong_count.iter().take(LIST_LIMIT) {
        writeln!(
            out,
            "  {} {} window [{}, {}) ({}) on {}: expected {}, got {}",
            w.device,
            w.metric,
            w.start_ms,
            w.end_ms,
            format_ts(w.start_ms),
            w.instance,
            w.expected,
            w.got
        )?;
    }
    more(out, r.wrong_count.len())?;
    writeln!(out, "wrong mean: {}", r.wrong_mean.len())?;
    for w in r.wrong_mean.iter().take(LIST_LIMIT) {
        let f = |v: Option<f64>| v.map_or("none".to_string(), |v| v.to_string());
        writeln!(
            out,
            "  {} {} window [{}, {}) on {}: expected {}, got {}",
            w.device,
            w.metric,
            w.start_ms,
            w.end_ms,
            w.instance,
            f(w.expected),
            f(w.got)
        )?;
    }
    more(out, r.wrong_mean.len())?;
    writeln!(out, "unexpected: {}", r.unexpected.len())?;
    for w in r.unexpected.iter().take(LIST_LIMIT) {
        writeln!(
            out,
            "  {} {} window [{}, {}) on {}: {} readings, none in the log",
            w.device, w.metric, w.start_ms, w.end_ms, w.instance, w.got
        )?;
    }
    more(out, r.unexpected.len())?;
    writeln!(out, "wrong total: {}", r.wrong_total.len())?;
    for t in r.wrong_total.iter().take(LIST_LIMIT) {
        write!(
            out,
            "  {} {}: expected {} readings, aggregators counted {}",
            t.device, t.metric, t.expected, t.got
        )?;
        if t.not_retained > 0 {
            write!(
                out,
                " ({} of the log's are older than the oldest held window)",
                t.not_retained
            )?;
        }
        writeln!(out)?;
    }
    more(out, r.wrong_total.len())?;
    writeln!(
        out,
        "loss: {} readings (tolerated: up to {})",
        r.loss, r.tolerate_loss
    )?;
    writeln!(out, "{}", if r.ok { "OK" } else { "MISMATCH" })
}
