//! `edgewatch eval sim`: runs the fleet simulator offline (no broker, no clock), streams every series
//! through its own detector, and scores the detections against the simulator's ground-truth labels
//! per anomaly kind with `edgewatch_models::eval::truth`.
//!
//! A reading is a detection when its score reaches the threshold (default: the detector's
//! recommended threshold). Simulated time starts at the config's `start_ms`, else 2026-01-01 UTC,
//! so a run is reproducible from the seed.

use anyhow::{bail, Context};
use clap::Args;
use edgewatch_models::detect::{AnyDetector, Detector, DetectorConfig};
use edgewatch_models::eval::truth::{self, Detection, LabelledEvent, TruthReport};
use edgewatch_simulators::{Fleet, SimulatorConfig};
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// 2026-01-01 00:00:00 UTC: the simulated start when the config names none.
const DEFAULT_START_MS: i64 = 1_767_225_600_000;
/// Simulated time replayed when neither the flag nor the config says.
const DEFAULT_DURATION_MS: u64 = 6 * 3_600_000;

/// Arguments of `edgewatch eval sim`.
#[derive(Debug, Args)]
pub struct EvalSimArgs {
    /// Simulator YAML (devices, metrics, anomalies, seed); default: the built-in defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Simulated time to replay (default: the config's duration_ms, else 6 h).
    #[arg(long, value_name = "MS")]
    pub duration_ms: Option<u64>,
    /// Detector preset (default: the default detector).
    #[arg(long, value_name = "NAME")]
    pub detector: Option<String>,
    /// Score at or above which a reading is a detection (default: the detector's recommended one).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// A detection up to this long after a label's end still counts (default: 10 × interval_ms).
    #[arg(long, value_name = "MS")]
    pub tolerance_ms: Option<i64>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one `eval sim` run.
#[derive(Debug, Clone)]
pub struct SimRun {
    /// Detector name.
    pub detector: String,
    /// Detection threshold used.
    pub threshold: f64,
    /// Matching tolerance used, ms.
    pub tolerance_ms: i64,
    /// Readings replayed.
    pub readings: usize,
    /// Series (device × metric).
    pub series: usize,
    /// Wall time of simulation, detection and scoring.
    pub elapsed: Duration,
    /// Scores per kind.
    pub report: TruthReport,
}

/// Runs `edgewatch eval sim`.
pub fn run_sim(args: EvalSimArgs) -> anyhow::Result<()> {
    let run = evaluate_sim(&args)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&run.to_json())?)?;
    } else {
        write!(out, "{}", run.render())?;
    }
    Ok(())
}

/// Simulates, detects and scores as `args` say, without printing.
pub fn evaluate_sim(args: &EvalSimArgs) -> anyhow::Result<SimRun> {
    let cfg: SimulatorConfig = match &args.config {
        Some(path) => crate::config::load(path)?,
        None => SimulatorConfig::default(),
    };
    let (name, detector) = match args.detector.as_deref() {
        None => {
            let c = DetectorConfig::default();
            (c.build().context("default detector")?.name().to_string(), c)
        }
        Some(n) => match DetectorConfig::preset(n) {
            Some(c) => (n.to_string(), c),
            None => bail!(
                "unknown detector {n:?}; valid: {}",
                DetectorConfig::PRESETS.join(", ")
            ),
        },
    };
    let threshold = args
        .threshold
        .unwrap_or_else(|| detector.recommended_threshold());
    if !(0.0..=1.0).contains(&threshold) {
        bail!("--threshold must be in [0, 1], got {threshold}");
    }
    let interval = i64::try_from(cfg.interval_ms).unwrap_or(i64::MAX);
    let tolerance_ms = args
        .tolerance_ms
        .unwrap_or_else(|| interval.saturating_mul(10));
    let duration = args
        .duration_ms
        .or(cfg.duration_ms)
        .unwrap_or(DEFAULT_DURATION_MS);
    let duration = i64::try_from(duration).unwrap_or(i64::MAX);

    let started = Instant::now();
    let start_ms = cfg.start_ms.unwrap_or(DEFAULT_START_MS);
    let mut fleet = Fleet::new(&cfg, start_ms).context("simulator")?;
    let end_ms = start_ms.saturating_add(duration);
    let mut detectors: HashMap<(Arc<str>, Arc<str>), AnyDetector> = HashMap::new();
    let mut detections = Vec::new();
    let mut batch = Vec::new();
    let mut readings = 0usize;
    while fleet.now_ms() < end_ms {
        batch.clear();
        fleet.step(&mut batch);
        readings += batch.len();
        for r in &batch {
            let key = (r.device.clone(), r.metric.clone());
            let d = match detectors.get_mut(&key) {
                Some(d) => d,
                None => detectors.entry(key).or_insert(detector.build()?),
            };
            if d.update(r.ts_ms, r.value) >= threshold {
                detections.push(Detection {
                    device: r.device.to_string(),
                    metric: r.metric.to_string(),
                    ts_ms: r.ts_ms,
                });
            }
        }
    }
    let labels: Vec<LabelledEvent> = fleet
        .ground_truth()
        .iter()
        .cloned()
        .chain(fleet.in_progress())
        .map(|g| LabelledEvent {
            device: g.device,
            metric: g.metric,
            kind: g.kind.as_str().to_string(),
            start_ms: g.start_ms,
            end_ms: g.end_ms,
        })
        .collect();
    let report = truth::score_truth(&labels, &detections, tolerance_ms)?;
    Ok(SimRun {
        detector: name,
        threshold,
        tolerance_ms,
        readings,
        series: fleet.series(),
        elapsed: started.elapsed(),
        report,
    })
}

fn opt(x: Option<f64>, scale: f64, digits: usize) -> String {
    x.map_or_else(
        || "n/a".to_string(),
        |v| format!("{:.*}", digits, v * scale),
    )
}

impl SimRun {
    /// Readings per second of wall time.
    pub fn readings_per_second(&self) -> f64 {
        self.readings as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `--json` object.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "detector": self.detector,
            "threshold": self.threshold,
            "tolerance_ms": self.tolerance_ms,
            "readings": self.readings,
            "series": self.series,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "readings_per_second": self.readings_per_second(),
            "kinds": self.report.kinds,
            "overall": self.report.overall,
            "total_false_positives": self.report.total_false_positives,
            "false_positives": self.report.false_positives,
        })
    }

    /// A table: one row per kind, then all kinds.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            s,
            "simulated fleet: detector {} at threshold {:.3}, tolerance {} ms — {} series, {} readings, \
             {:.0} readings/s\n",
            self.detector,
            self.threshold,
            self.tolerance_ms,
            self.series,
            self.readings,
            self.readings_per_second()
        );
        let _ = writeln!(
            s,
            "{:<16} {:>6} {:>5} {:>5} {:>9} {:>7} {:>6} {:>14}",
            "kind", "labels", "TP", "FN", "precision", "recall", "F1", "median delay s"
        );
        for k in self.report.kinds.iter().chain([&self.report.overall]) {
            let _ = writeln!(
                s,
                "{:<16} {:>6} {:>5} {:>5} {:>9} {:>7} {:>6} {:>14}",
                k.kind,
                k.labels,
                k.true_positives,
                k.false_negatives,
                opt(k.precision, 1.0, 3),
                opt(k.recall, 1.0, 3),
                opt(k.f1, 1.0, 3),
                opt(k.median_delay_ms, 1e-3, 1)
            );
        }
        let _ = writeln!(
            s,
            "\nfalse positives: {} detections on {} series",
            self.report.total_false_positives,
            self.report.false_positives.len()
        );
        s
    }
}
