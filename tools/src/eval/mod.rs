//! `edgewatch eval`: replays datasets through detectors and scores them.
//!
//! - `eval nab` ([`run_nab`], logic in [`nab`]): the Numenta Anomaly Benchmark, scored by
//!   `edgewatch_models::eval::nab`.
//! - `eval csv` ([`run_csv`], in [`csv`]): labelled multi-sensor CSV runs, univariate and
//!   multivariate, scored by `edgewatch_models::eval::csv`.
//! - `eval sim` ([`run_sim`], in [`sim`]): the fleet simulator's labelled anomalies, scored per kind
//!   by `edgewatch_models::eval::truth`.
//!
//! This module owns the command-line face — arguments, files, progress, printing. Parsing and scoring
//! live in `edgewatch_models::eval`.

pub mod csv;
pub mod nab;
pub mod sim;

use clap::Args;
use std::io::Write;
use std::path::PathBuf;

pub use csv::{evaluate_csv, run_csv, CsvRun, EvalCsvArgs};
pub use nab::{evaluate_nab, NabRun, ScoreSource};
pub use sim::{evaluate_sim, run_sim, EvalSimArgs, SimRun};

/// Arguments of `edgewatch eval nab`.
#[derive(Debug, Args)]
pub struct EvalNabArgs {
    /// Folder in NAB layout (data/<category>/*.csv, labels/combined_windows.json).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Also write NAB result files: OUT/<detector>/<category>/<detector>_<file>.csv.
    #[arg(long, value_name = "OUT")]
    pub results: Option<PathBuf>,
    /// Detector preset to score (default: the default detector); `null` and `oracle` score the two
    /// baselines (never fire; fire at each window's first row).
    #[arg(long, value_name = "NAME")]
    pub detector: Option<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs `edgewatch eval nab`: scores, thresholds and a per-category table on stdout (or JSON with
/// `--json`), progress on stderr when it is a terminal.
pub fn run_nab(args: EvalNabArgs) -> anyhow::Result<()> {
    let source = ScoreSource::from_name(args.detector.as_deref())?;
    let progress = nab::Progress::stderr();
    let run = evaluate_nab(&args.data, &source, args.results.as_deref(), &progress)?;
    progress.finish();
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&run.to_json())?)?;
    } else {
        write!(out, "{}", run.render())?;
    }
    Ok(())
}
