//! `edgewatch eval sim`: runs the fleet simulator offline (no broker, no clock) and scores, per
//! anomaly kind, what the agent's detectors find against the simulator's ground-truth labels
//! (`edgewatch_models::eval::truth`), side by side for the univariate detector and the multivariate
//! device model.
//!
//! The run has two phases on one simulated timeline. *Commissioning* (`--train-ms`, default 24 h):
//! no anomaly is injected, every detector warms up, and each device's aligned vectors are sampled;
//! a PCA model per device is then fitted on them (as the aggregator does from agents' samples).
//! *Scoring* (`--duration-ms`): anomalies are injected and detections counted. Detections are
//! events, as the agent raises them: one per episode through an `EventGate` (univariate per series,
//! multivariate per device, device-wide), plus the `silence` events of series whose readings stop,
//! checked on every simulated step. Simulated time starts at the config's `start_ms`, else
//! 2026-01-01 UTC, so a run is reproducible from the seed.

use anyhow::{bail, Context};
use clap::Args;
use edgewatch_models::detect::{
    AnyDetector, Detector, DetectorConfig, EventGate, GateConfig, Silence, SilenceConfig,
};
use edgewatch_models::eval::truth::{self, Detection, LabelledEvent, TruthReport, DEVICE_WIDE};
use edgewatch_models::multi::{AlignConfig, Aligner, FitOptions, PcaModel, PcaScorer};
use edgewatch_simulators::{Fleet, SimReading, SimulatorConfig};
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// 2026-01-01 00:00:00 UTC: the simulated start when the config names none.
const DEFAULT_START_MS: i64 = 1_767_225_600_000;
/// Simulated time scored when neither the flag nor the config says.
const DEFAULT_DURATION_MS: u64 = 6 * 3_600_000;
/// Commissioning time before scoring when the flag does not say: a whole daily cycle.
const DEFAULT_TRAIN_MS: u64 = 24 * 3_600_000;
/// Training vectors kept per device (every k-th aligned vector of the commissioning period).
const MAX_TRAINING_VECTORS: usize = 20_000;

/// Arguments of `edgewatch eval sim`.
#[derive(Debug, Args)]
pub struct EvalSimArgs {
    /// Simulator YAML (devices, metrics, anomalies, seed); default: the built-in defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Simulated time to score (default: the config's duration_ms, else 6 h).
    #[arg(long, value_name = "MS")]
    pub duration_ms: Option<u64>,
    /// Commissioning time before it, anomaly-free, on which the device models are trained
    /// (default 24 h; 0 = no multivariate model, univariate only).
    #[arg(long, value_name = "MS")]
    pub train_ms: Option<u64>,
    /// Detector preset (default: the default detector).
    #[arg(long, value_name = "NAME")]
    pub detector: Option<String>,
    /// Score at or above which an event is raised (default: the detector's recommended one).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// A detection up to this long after a label's end still counts (default: 10 × interval_ms).
    #[arg(long, value_name = "MS")]
    pub tolerance_ms: Option<i64>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Score nothing: write the simulated fleet under this folder as CSV for `eval csv`, one file per
    /// device (`<device>.csv`: timestamp in ms, one column per metric, 0/1 label), over
    /// `--duration-ms` (default: the config's duration_ms, else 6 h) with the config's anomalies.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["train_ms", "detector", "threshold", "tolerance_ms", "json"])]
    pub write_csv: Option<PathBuf>,
}

/// One column of the side-by-side report.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// `univariate`, `multivariate` or `combined`.
    pub name: &'static str,
    /// Scores per kind.
    pub report: TruthReport,
    /// False-positive detections per device and simulated day of scoring.
    pub false_alarms_per_device_day: f64,
}

/// The outcome of one `eval sim` run.
#[derive(Debug, Clone)]
pub struct SimRun {
    /// Univariate detector name.
    pub detector: String,
    /// Event threshold used (univariate; the multivariate model uses its own, 0.5).
    pub threshold: f64,
    /// Matching tolerance used, ms.
    pub tolerance_ms: i64,
    /// Readings replayed (commissioning and scoring).
    pub readings: usize,
    /// Series (device × metric).
    pub series: usize,
    /// Devices.
    pub devices: usize,
    /// Commissioning time, ms (0: no model).
    pub train_ms: u64,
    /// Scored time, ms.
    pub scored_ms: u64,
    /// Wall time of simulation, training, detection and scoring.
    pub elapsed: Duration,
    /// The univariate detector with silences: `columns[0].report`, kept as a field for callers.
    pub report: TruthReport,
    /// univariate, then (with a model) multivariate and combined.
    pub columns: Vec<Column>,
    /// Explained variance of each device's model (with a model), for the record.
    pub explained_variance: Vec<f64>,
}

/// Runs `edgewatch eval sim`.
pub fn run_sim(args: EvalSimArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.write_csv {
        return write_csv(&args, dir);
    }
    let run = evaluate_sim(&args)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&run.to_json())?)?;
    } else {
        write!(out, "{}", run.render())?;
    }
    Ok(())
}

/// `--write-csv`: the simulated fleet as one CSV file per device under `dir`
/// (`edgewatch_simulators::write_fleet_csv`).
fn write_csv(args: &EvalSimArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let cfg: SimulatorConfig = match &args.config {
        Some(path) => crate::config::load(path)?,
        None => SimulatorConfig::default(),
    };
    let duration_ms = args
        .duration_ms
        .or(cfg.duration_ms)
        .unwrap_or(DEFAULT_DURATION_MS);
    let start_ms = cfg.start_ms.unwrap_or(DEFAULT_START_MS);
    let end_ms = start_ms.saturating_add(i64::try_from(duration_ms).unwrap_or(i64::MAX));
    let mut fleet = Fleet::new(&cfg, start_ms).context("simulator")?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut writers = fleet
        .devices()
        .iter()
        .map(|d| {
            let path = dir.join(format!("{d}.csv"));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("{}: cannot create", path.display()))?;
            Ok(std::io::BufWriter::with_capacity(1 << 16, file))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    edgewatch_simulators::write_fleet_csv(&mut fleet, end_ms, &mut writers)?;
    for w in writers {
        w.into_inner().map_err(|e| e.into_error())?;
    }
    let labels = fleet.ground_truth().len() + fleet.in_progress().len();
    println!(
        "wrote {} devices x {} metrics over {} s to {} ({labels} labelled anomalies)",
        fleet.devices().len(),
        fleet.metrics().len(),
        duration_ms / 1000,
        dir.display()
    );
    Ok(())
}

/// One device's multivariate state: its aligner, then (after commissioning) its model and gate.
struct Device {
    aligner: Aligner,
    /// Aligned vectors sampled during commissioning, row-major.
    training: Vec<f64>,
    seen: usize,
    model: Option<(PcaModel, PcaScorer, EventGate)>,
}

/// One series' univariate state.
struct Series {
    detector: AnyDetector,
    gate: EventGate,
    silence: Silence,
    last_arrival_ms: Option<i64>,
}

/// Simulates, detects and scores as `args` say, without printing.
pub fn evaluate_sim(args: &EvalSimArgs) -> anyhow::Result<SimRun> {
    let mut cfg: SimulatorConfig = match &args.config {
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
    if !(threshold > 0.0 && threshold <= 1.0) {
        bail!("--threshold must be in (0, 1], got {threshold}");
    }
    let gate = EventGate::new(threshold, &GateConfig::default())?;
    let silence_cfg = SilenceConfig::default();
    let interval = i64::try_from(cfg.interval_ms).unwrap_or(i64::MAX);
    let tolerance_ms = args
        .tolerance_ms
        .unwrap_or_else(|| interval.saturating_mul(10));
    let scored_ms = args
        .duration_ms
        .or(cfg.duration_ms)
        .unwrap_or(DEFAULT_DURATION_MS);
    let train_ms = args.train_ms.unwrap_or(DEFAULT_TRAIN_MS);
    // Anomalies start after commissioning and the config's own warm-up.
    cfg.anomalies.warmup_ms = cfg.anomalies.warmup_ms.saturating_add(train_ms);
    let as_ms = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);

    let started = Instant::now();
    let start_ms = cfg.start_ms.unwrap_or(DEFAULT_START_MS);
    let mut fleet = Fleet::new(&cfg, start_ms).context("simulator")?;
    let train_end = start_ms.saturating_add(as_ms(train_ms));
    let end_ms = train_end.saturating_add(as_ms(scored_ms));
    let features: Vec<String> = fleet.metrics().iter().map(|m| m.to_string()).collect();
    let with_model = train_ms > 0 && features.len() >= 2;
    // Every k-th aligned vector of commissioning: at most MAX_TRAINING_VECTORS per device.
    let vectors_per_device = (as_ms(train_ms) / interval.max(1)).max(1) as usize * features.len();
    let keep_every = vectors_per_device.div_ceil(MAX_TRAINING_VECTORS).max(1);
    let align = AlignConfig {
        staleness_ms: interval.saturating_mul(3),
        min_fill: 1.0,
    };
    let mut devices: HashMap<Arc<str>, Device> = HashMap::new();
    for d in fleet.devices() {
        let aligner = Aligner::new(&features, &align)?;
        devices.insert(
            d,
            Device {
                aligner,
                training: Vec::new(),
                seen: 0,
                model: None,
            },
        );
    }
    let mut series: HashMap<(Arc<str>, Arc<str>), Series> = HashMap::new();
    let mut uni = Vec::new();
    let mut multi = Vec::new();
    let mut silences = Vec::new();
    let mut batch: Vec<SimReading> = Vec::new();
    let mut readings = 0usize;
    let mut trained = false;
    let mut explained_variance = Vec::new();
    while fleet.now_ms() < end_ms {
        let now = fleet.now_ms();
        if with_model && !trained && now >= train_end {
            explained_variance = train(&mut devices, &features, start_ms, train_end)?;
            trained = true;
        }
        let scoring = now >= train_end;
        batch.clear();
        fleet.step(&mut batch);
        readings += batch.len();
        for r in &batch {
            let key = (r.device.clone(), r.metric.clone());
            let s = match series.get_mut(&key) {
                Some(s) => s,
                None => series.entry(key).or_insert(Series {
                    detector: detector.build()?,
                    gate: gate.clone(),
                    silence: Silence::default(),
                    last_arrival_ms: None,
                }),
            };
            s.silence.arrive(s.last_arrival_ms, r.ts_ms, &silence_cfg);
            s.last_arrival_ms = Some(r.ts_ms);
            let event = s.gate.update(s.detector.update(r.ts_ms, r.value));
            if event && scoring {
                uni.push(detection(&r.device, &r.metric, r.ts_ms));
            }
            if !with_model {
                continue;
            }
            let Some(d) = devices.get_mut(&r.device) else {
                continue;
            };
            let Some(slot) = d.aligner.slot(&r.metric) else {
                continue;
            };
            if !d.aligner.push(slot, r.ts_ms, r.value) {
                continue;
            }
            match &mut d.model {
                None if !trained => {
                    d.seen += 1;
                    if d.seen % keep_every == 0 {
                        d.training.extend_from_slice(d.aligner.vector());
                    }
                }
                None => {}
                Some((model, scorer, gate)) => {
                    let score = scorer.score(model, d.aligner.vector());
                    if gate.update(score.score) && scoring {
                        multi.push(detection(&r.device, DEVICE_WIDE, r.ts_ms));
                    }
                }
            }
        }
        // The agent's tick: series whose readings stopped, on the (simulated) clock.
        let now = fleet.now_ms();
        for ((device, metric), s) in &mut series {
            if let Some(last) = s.last_arrival_ms {
                if s.silence.check(last, now, &silence_cfg).is_some() && now >= train_end {
                    silences.push(detection(device, metric, now));
                }
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
    let device_days = devices.len().max(1) as f64 * scored_ms as f64 / 86_400_000.0;
    let column = |name, dets: Vec<Detection>| -> anyhow::Result<Column> {
        let report = truth::score_truth(&labels, &dets, tolerance_ms)?;
        Ok(Column {
            name,
            false_alarms_per_device_day: report.total_false_positives as f64 / device_days,
            report,
        })
    };
    let both = |a: &[Detection], b: &[Detection]| [a, b, &silences].concat();
    let mut columns = vec![column("univariate", both(&uni, &[]))?];
    if with_model {
        columns.push(column("multivariate", both(&multi, &[]))?);
        columns.push(column("combined", both(&uni, &multi))?);
    }
    Ok(SimRun {
        detector: name,
        threshold,
        tolerance_ms,
        readings,
        series: fleet.series(),
        devices: devices.len(),
        train_ms: if with_model { train_ms } else { 0 },
        scored_ms,
        elapsed: started.elapsed(),
        report: columns[0].report.clone(),
        columns,
        explained_variance,
    })
}

fn detection(device: &str, metric: &str, ts_ms: i64) -> Detection {
    Detection {
        device: device.to_string(),
        metric: metric.to_string(),
        ts_ms,
    }
}

/// Fits every device's model on its commissioning vectors; returns their explained variance.
fn train(
    devices: &mut HashMap<Arc<str>, Device>,
    features: &[String],
    from_ms: i64,
    to_ms: i64,
) -> anyhow::Result<Vec<f64>> {
    let mut explained = Vec::with_capacity(devices.len());
    let mut names: Vec<&Arc<str>> = devices.keys().collect();
    names.sort();
    let names: Vec<Arc<str>> = names.into_iter().cloned().collect();
    for name in names {
        let Some(d) = devices.get_mut(&name) else {
            continue;
        };
        let rows = std::mem::take(&mut d.training);
        let model = PcaModel::fit(
            &name,
            features.to_vec(),
            &rows,
            from_ms,
            to_ms,
            &FitOptions::default(),
        )
        .with_context(|| format!("fitting the model of device {name}"))?;
        explained.push(model.quality.explained_variance_ratio);
        let scorer = model.scorer();
        let gate = EventGate::new(0.5, &GateConfig::default())?;
        d.model = Some((model, scorer, gate));
    }
    Ok(explained)
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

    /// The `--json` object: the univariate report at the top level (as before models existed),
    /// and every column under `columns`.
    pub fn to_json(&self) -> serde_json::Value {
        let columns: Vec<serde_json::Value> = self
            .columns
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "kinds": c.report.kinds,
                    "overall": c.report.overall,
                    "total_false_positives": c.report.total_false_positives,
                    "false_alarms_per_device_day": c.false_alarms_per_device_day,
                })
            })
            .collect();
        json!({
            "detector": self.detector,
            "threshold": self.threshold,
            "tolerance_ms": self.tolerance_ms,
            "readings": self.readings,
            "series": self.series,
            "devices": self.devices,
            "train_ms": self.train_ms,
            "scored_ms": self.scored_ms,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "readings_per_second": self.readings_per_second(),
            "kinds": self.report.kinds,
            "overall": self.report.overall,
            "total_false_positives": self.report.total_false_positives,
            "false_positives": self.report.false_positives,
            "columns": columns,
            "explained_variance": self.explained_variance,
        })
    }

    /// A table: one row per kind (then all kinds), recall and median delay per column, then
    /// precision and false alarms per device-day.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            s,
            "simulated fleet: {} devices, {} series; {:.1} h commissioning{}, {:.1} h scored, {} readings, \
             {:.0} readings/s\nunivariate: {} at threshold {:.3}; multivariate: PCA per device at 0.5; \
             silences in every column; tolerance {} ms\n",
            self.devices,
            self.series,
            self.train_ms as f64 / 3.6e6,
            if self.train_ms > 0 { " (models trained on it)" } else { " (no model)" },
            self.scored_ms as f64 / 3.6e6,
            self.readings,
            self.readings_per_second(),
            self.detector,
            self.threshold,
            self.tolerance_ms,
        );
        let _ = write!(s, "{:<18} {:>6}", "kind", "labels");
        for c in &self.columns {
            let _ = write!(s, " {:>22}", format!("{} recall / delay s", short(c.name)));
        }
        let _ = writeln!(s);
        let first = &self.columns[0].report;
        for (i, k) in first.kinds.iter().chain([&first.overall]).enumerate() {
            let _ = write!(s, "{:<18} {:>6}", k.kind, k.labels);
            for c in &self.columns {
                let r = &c.report;
                let k = r.kinds.get(i).unwrap_or(&r.overall);
                let _ = write!(
                    s,
                    " {:>22}",
                    format!(
                        "{} / {}",
                        opt(k.recall, 1.0, 3),
                        opt(k.median_delay_ms, 1e-3, 1)
                    )
                );
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s);
        for c in &self.columns {
            let _ = writeln!(
                s,
                "{:<12} precision {} · F1 {} · {} false positives ({:.2} per device-day)",
                c.name,
                opt(c.report.overall.precision, 1.0, 3),
                opt(c.report.overall.f1, 1.0, 3),
                c.report.total_false_positives,
                c.false_alarms_per_device_day
            );
        }
        s
    }
}

fn short(name: &str) -> &str {
    match name {
        "univariate" => "uni",
        "multivariate" => "multi",
        "combined" => "both",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--write-csv` writes one labelled file per device that `eval csv` replays as it is.
    #[test]
    fn the_fleet_written_as_csv_is_read_by_eval_csv() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fleet");
        let args = EvalSimArgs {
            config: None,
            duration_ms: Some(300_000),
            train_ms: None,
            detector: None,
            threshold: None,
            tolerance_ms: None,
            json: false,
            write_csv: Some(out.clone()),
        };
        run_sim(args).unwrap();
        let text = std::fs::read_to_string(out.join("dev-0000.csv")).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("timestamp,temperature,flow,current,pressure,label")
        );
        assert_eq!(lines.count(), 300);
        let files = std::fs::read_dir(&out).unwrap().count();
        assert_eq!(files, SimulatorConfig::default().devices);
        let run = crate::eval::evaluate_csv(
            &crate::eval::EvalCsvArgs {
                data: out,
                time_column: None,
                label_column: None,
                columns: None,
                ignore: Vec::new(),
                separator: None,
                detector: None,
                threshold: None,
                model: None,
                train_rows: None,
                train_files: None,
                tolerance_ms: 0,
                staleness_ms: 60_000,
                results: None,
                json: false,
            },
            false,
        )
        .unwrap();
        assert!(run.multivariate);
        assert_eq!(run.report.files.len(), files);
        assert!(run.rows_per_second() > 0.0 && run.readings_per_second() > 0.0);
        assert!(run.render().contains(" rows/s, "));
    }
}
