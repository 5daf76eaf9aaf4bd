//! `edgewatch eval csv`: replays a folder of labelled multi-sensor CSV files (one file = one device
//! run) through the univariate detectors and the multivariate PCA model, and reports point-wise,
//! event-wise and NAB figures per file and overall. Files, progress, result files and printing live
//! here; parsing, replay and metrics are `edgewatch_models::eval::csv`.

use anyhow::{anyhow, bail, Context};
use clap::{Args, ValueEnum};
use edgewatch_models::detect::{Detector, DetectorConfig, GateConfig};
use edgewatch_models::eval::csv::{
    CsvCorpus, CsvOptions, CsvReport, DeviceReplay, FileScores, Layout, ReplayConfig, Row,
    RowParser,
};
use edgewatch_models::eval::nab::format_timestamp;
use edgewatch_models::eval::EvalError;
use edgewatch_models::glob::glob_match;
use edgewatch_models::multi::{AlignConfig, Aligner, FitOptions, PcaModel};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Default training rows: this share of each file's rows ...
const TRAIN_SHARE: f64 = 0.2;
/// ... capped at this many.
const TRAIN_CAP: usize = 10_000;
/// Most vectors `--train-files` fits on; beyond it every k-th vector is kept (k fixed up front).
const TRAIN_FILES_CAP: usize = 200_000;

/// Arguments of `edgewatch eval csv`.
#[derive(Debug, Args)]
pub struct EvalCsvArgs {
    /// A CSV file, or a folder searched recursively for `*.csv` (one file = one device run).
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// Timestamp column (default: timestamp/time/datetime/date, any case, else the first column).
    #[arg(long, value_name = "NAME")]
    pub time_column: Option<String>,
    /// 0/1 label column (default: label/anomaly/is_anomaly, any case, else unlabelled).
    #[arg(long, value_name = "NAME")]
    pub label_column: Option<String>,
    /// Sensor columns to use (default: all but the timestamp and the label).
    #[arg(long, value_name = "A,B,..", value_delimiter = ',')]
    pub columns: Option<Vec<String>>,
    /// Columns to leave out of the default sensor set, e.g. `changepoint`.
    #[arg(long, value_name = "X,Y,..", value_delimiter = ',')]
    pub ignore: Vec<String>,
    /// Cell separator (default: `;` or `,`, whichever the header has more of).
    #[arg(long, value_name = "CHAR")]
    pub separator: Option<char>,
    /// Univariate detector preset, one per sensor column (default: the default ensemble).
    #[arg(long, value_name = "NAME")]
    pub detector: Option<String>,
    /// Event threshold of every view (default: the detector's recommended one; 0.5 for the model).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Multivariate model (default: pca when a file has at least 2 sensor columns).
    #[arg(long, value_enum)]
    pub model: Option<ModelChoice>,
    /// Rows at the start of each file assumed normal: the model is fitted on them; they are replayed
    /// but not scored (default: 20 % of the file's rows, at most 10,000).
    #[arg(long, value_name = "N", conflicts_with = "train_files")]
    pub train_rows: Option<usize>,
    /// Files whose relative path or name matches (`*` any text, `?` one character) train one model
    /// for all others; they are not scored.
    #[arg(long, value_name = "GLOB")]
    pub train_files: Option<String>,
    /// An event up to this long after a labelled interval's end still catches it.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub tolerance_ms: i64,
    /// How long a sensor's last reading fills a missing cell in the model's vector.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub staleness_ms: i64,
    /// Write NAB-format result files (`timestamp,value,anomaly_score,label`) under this folder.
    #[arg(long, value_name = "DIR")]
    pub results: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// The multivariate model of `--model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelChoice {
    /// The PCA device model (T² and SPE).
    Pca,
    /// Univariate only.
    None,
}

/// The outcome of one `eval csv` run.
#[derive(Debug, Clone)]
pub struct CsvRun {
    /// Detector name.
    pub detector: String,
    /// Whether the multivariate model ran.
    pub multivariate: bool,
    /// Thresholds of the univariate and multivariate views.
    pub thresholds: (f64, f64),
    /// Files scored and the files that trained the shared model (`--train-files`).
    pub train_files: Vec<String>,
    /// Per file: the model's summary, if any (components, explained variance, samples).
    pub models: Vec<Option<serde_json::Value>>,
    /// Sensor readings replayed (training rows included; missing cells excluded).
    pub readings: u64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// The scores.
    pub report: CsvReport,
}

/// Runs `edgewatch eval csv`.
pub fn run_csv(args: EvalCsvArgs) -> anyhow::Result<()> {
    let progress = std::io::stderr().is_terminal();
    let run = evaluate_csv(&args, progress)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&run.to_json())?)?;
    } else {
        write!(out, "{}", run.render())?;
    }
    Ok(())
}

/// The detector preset named `name` (default: the default detector) and its display name.
pub fn detector_config(name: Option<&str>) -> anyhow::Result<(String, DetectorConfig)> {
    match name {
        None => {
            let c = DetectorConfig::default();
            Ok((c.build().context("default detector")?.name().to_string(), c))
        }
        Some(n) => DetectorConfig::preset(n)
            .map(|c| (n.to_string(), c))
            .ok_or_else(|| {
                anyhow!(
                    "unknown detector {n:?}; valid: {}",
                    DetectorConfig::PRESETS.join(", ")
                )
            }),
    }
}

/// Streams one CSV file: header first, then rows, with errors as `path:line: ...`.
struct CsvReader {
    path: PathBuf,
    reader: BufReader<File>,
    parser: RowParser,
    line: usize,
    buf: String,
}

fn located(path: &Path, e: EvalError) -> anyhow::Error {
    match e {
        EvalError::Csv { line, detail } => anyhow!("{}:{line}: {detail}", path.display()),
        EvalError::CsvColumn {
            line,
            column,
            detail,
        } => anyhow!("{}:{line}: column {column:?}: {detail}", path.display()),
        other => anyhow!("{}: {other}", path.display()),
    }
}

impl CsvReader {
    fn open(path: &Path, opts: &CsvOptions) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let mut buf = String::new();
        reader
            .read_line(&mut buf)
            .with_context(|| format!("{}:1: cannot read the header", path.display()))?;
        let layout =
            Layout::from_header(buf.trim_end_matches('\n'), opts).map_err(|e| located(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            parser: RowParser::new(layout),
            line: 1,
            buf,
        })
    }

    fn layout(&self) -> &Layout {
        self.parser.layout()
    }

    /// The next data row into `row`; false at the end of the file.
    fn next(&mut self, row: &mut Row) -> anyhow::Result<bool> {
        loop {
            self.buf.clear();
            self.line += 1;
            let n = self.reader.read_line(&mut self.buf).with_context(|| {
                format!(
                    "{}:{}: cannot read (not UTF-8?)",
                    self.path.display(),
                    self.line
                )
            })?;
            if n == 0 {
                return Ok(false);
            }
            let text = self.buf.trim_end_matches('\n');
            if self
                .parser
                .parse(self.line, text, row)
                .map_err(|e| located(&self.path, e))?
            {
                return Ok(true);
            }
        }
    }
}

/// Data rows (non-blank lines after the header) of a file, by a byte scan.
fn count_rows(path: &Path) -> anyhow::Result<usize> {
    let mut r = BufReader::with_capacity(
        1 << 16,
        File::open(path).with_context(|| format!("{}: cannot open", path.display()))?,
    );
    let (mut rows, mut line) = (0usize, Vec::new());
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)
            .with_context(|| format!("{}: cannot read", path.display()))?
            == 0
        {
            break;
        }
        rows += usize::from(line.iter().any(|b| !b.is_ascii_whitespace()));
    }
    Ok(rows.saturating_sub(1))
}

/// `(relative name, path)` of the file, or of every `*.csv` below the folder (recursively), sorted.
fn list_files(data: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    if data.is_file() {
        let name = data
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{}: name is not UTF-8", data.display()))?;
        return Ok(vec![(name.to_string(), data.to_path_buf())]);
    }
    let mut out = Vec::new();
    let mut stack = vec![data.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .with_context(|| format!("{}: cannot list the folder", dir.display()))?;
        for e in entries {
            let p = e.with_context(|| dir.display().to_string())?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| x.eq_ignore_ascii_case("csv"))
            {
                let rel = p.strip_prefix(data).unwrap_or(&p);
                let name = rel
                    .to_str()
                    .ok_or_else(|| anyhow!("{}: name is not UTF-8", p.display()))?
                    .replace('\\', "/");
                out.push((name, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn matches_glob(pattern: &str, name: &str) -> bool {
    glob_match(pattern, name) || glob_match(pattern, name.rsplit('/').next().unwrap_or(name))
}

/// The NAB-format result files of one data file: `device/<name>` and `sensors/<name w/o .csv>/<column>.csv`.
struct ResultFiles {
    device: (PathBuf, BufWriter<File>),
    sensors: Vec<(PathBuf, BufWriter<File>)>,
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn create(path: PathBuf) -> anyhow::Result<(PathBuf, BufWriter<File>)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the folder", dir.display()))?;
    }
    let mut w = BufWriter::new(
        File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?,
    );
    writeln!(w, "timestamp,value,anomaly_score,label")
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok((path, w))
}

impl ResultFiles {
    fn create(dir: &Path, name: &str, features: &[String]) -> anyhow::Result<Self> {
        let stem = name.strip_suffix(".csv").unwrap_or(name);
        let stem = stem.strip_suffix(".CSV").unwrap_or(stem);
        let device = create(dir.join("device").join(format!("{stem}.csv")))?;
        let sensors = features
            .iter()
            .map(|f| {
                create(
                    dir.join("sensors")
                        .join(stem)
                        .join(format!("{}.csv", safe_name(f))),
                )
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { device, sensors })
    }

    /// Device file: the widest view's state as `value`, its alarm view as `anomaly_score`; sensor
    /// files: the reading (NaN when missing) and its detector's alarm view.
    fn write(
        &mut self,
        row: &Row,
        out: &edgewatch_models::eval::csv::RowScores,
        multi: bool,
    ) -> anyhow::Result<()> {
        let ts = format_timestamp(row.ts_ms);
        let label = u8::from(row.label);
        let view = if multi { &out.combined } else { &out.uni };
        let (p, w) = &mut self.device;
        writeln!(w, "{ts},{},{},{label}", view.state, view.alarm)
            .with_context(|| format!("{}: cannot write", p.display()))?;
        for (j, (p, w)) in self.sensors.iter_mut().enumerate() {
            writeln!(w, "{ts},{},{},{label}", row.values[j], out.column_alarms[j])
                .with_context(|| format!("{}: cannot write", p.display()))?;
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        for (p, w) in std::iter::once(self.device).chain(self.sensors) {
            w.into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| format!("{}: cannot write", p.display()))?;
        }
        Ok(())
    }
}

fn model_summary(m: &PcaModel) -> serde_json::Value {
    serde_json::json!({
        "key": m.key,
        "features": m.features,
        "samples": m.samples,
        "components": m.components.len(),
        "explained_variance_ratio": m.quality.explained_variance_ratio,
        "training_alarm_rate": m.quality.alarm_rate,
        "t2_at_half": m.t2.value_at_half,
        "spe_at_half": m.spe.value_at_half,
        "trained_from": format_timestamp(m.trained_from_ms),
        "trained_to": format_timestamp(m.trained_to_ms),
    })
}

/// Fits one model on the aligned vectors of the `--train-files` (at most [`TRAIN_FILES_CAP`], every
/// k-th kept beyond that).
fn fit_on_files(
    files: &[(String, PathBuf)],
    opts: &CsvOptions,
    align: &AlignConfig,
) -> anyhow::Result<PcaModel> {
    let total: usize = files
        .iter()
        .map(|(_, p)| count_rows(p))
        .sum::<anyhow::Result<usize>>()?;
    let stride = total.div_ceil(TRAIN_FILES_CAP).max(1);
    let mut features: Option<Vec<String>> = None;
    let (mut rows, mut from, mut to, mut seen) = (Vec::new(), i64::MAX, i64::MIN, 0usize);
    for (_, path) in files {
        let mut reader = CsvReader::open(path, opts)?;
        let names = reader.layout().sensor_names();
        match &features {
            None => features = Some(names.clone()),
            Some(f) if *f != names => bail!(
                "{}: sensor columns {names:?} differ from the first training file's {f:?}",
                path.display()
            ),
            Some(_) => {}
        }
        let mut aligner = Aligner::new(&names, align).map_err(|e| anyhow!("{e}"))?;
        let mut row = Row::default();
        while reader.next(&mut row)? {
            let mut ready = false;
            for (j, &v) in row.values.iter().enumerate() {
                if !v.is_nan() {
                    ready = aligner.push(j, row.ts_ms, v);
                }
            }
            if ready {
                if seen % stride == 0 {
                    rows.extend_from_slice(aligner.vector());
                    from = from.min(row.ts_ms);
                    to = to.max(row.ts_ms);
                }
                seen += 1;
            }
        }
    }
    let features = features.ok_or_else(|| anyhow!("no training file"))?;
    PcaModel::fit(
        "train-files",
        features,
        &rows,
        from.min(to),
        to,
        &FitOptions::default(),
    )
    .map_err(|e| anyhow!("--train-files: multivariate model: {e}"))
}

/// Everything one file's replay needs besides the file.
struct Replayer<'a> {
    args: &'a EvalCsvArgs,
    opts: CsvOptions,
    cfg: ReplayConfig,
    multivariate: bool,
    shared: Option<PcaModel>,
    progress: bool,
}

/// A file's scores, its model's summary and the readings replayed.
type Replayed = (FileScores, Option<serde_json::Value>, u64);

impl Replayer<'_> {
    fn replay(&self, name: &str, path: &Path, index: (usize, usize)) -> anyhow::Result<Replayed> {
        let train_rows = match (self.args.train_files.is_some(), self.args.train_rows) {
            (true, _) => 0,
            (false, Some(n)) => n,
            // Whole rows: 20 % rounded down, at most 10,000.
            (false, None) => ((count_rows(path)? as f64 * TRAIN_SHARE) as usize).min(TRAIN_CAP),
        };
        let mut reader = CsvReader::open(path, &self.opts)?;
        let features = reader.layout().sensor_names();
        if self.multivariate && features.len() < 2 {
            bail!(
                "{}: the multivariate model needs at least 2 sensor columns, found {features:?} (use --model none)",
                path.display()
            );
        }
        let at = |e: EvalError| located(path, e);
        let mut replay = DeviceReplay::new(&features, &self.cfg).map_err(at)?;
        if let Some(m) = &self.shared {
            replay.set_model(m.clone()).map_err(at)?;
        }
        let mut results = match &self.args.results {
            Some(dir) => Some(ResultFiles::create(dir, name, &features)?),
            None => None,
        };
        let mut scores = FileScores::new(name);
        let (mut train, mut from, mut to) = (Vec::new(), None, 0i64);
        let (mut row, mut n, mut readings) = (Row::default(), 0usize, 0u64);
        while reader.next(&mut row)? {
            if n == train_rows && self.multivariate && replay.model().is_none() {
                let model = PcaModel::fit(
                    name,
                    features.clone(),
                    &train,
                    from.unwrap_or(to),
                    to,
                    &FitOptions::default(),
                )
                .map_err(|e| {
                    anyhow!(
                        "{}: multivariate model on the first {train_rows} rows: {e}",
                        path.display()
                    )
                })?;
                replay.set_model(model).map_err(at)?;
                train = Vec::new();
            }
            readings += row.values.iter().filter(|v| !v.is_nan()).count() as u64;
            let out = replay.step(&row).map_err(at)?;
            if n < train_rows {
                scores.training_row(&row);
                if let (true, Some(v)) = (self.multivariate, replay.aligned()) {
                    train.extend_from_slice(v);
                    from.get_or_insert(row.ts_ms);
                    to = row.ts_ms;
                }
            } else {
                if let Some(w) = results.as_mut() {
                    w.write(&row, out, self.multivariate)?;
                }
                scores.push(&row, out);
            }
            n += 1;
            if self.progress && n % 65_536 == 0 {
                eprint!("\r[{}/{}] {name}: {n} rows", index.0 + 1, index.1);
            }
        }
        if n == 0 {
            bail!("{}: no data rows", path.display());
        }
        if scores.rows() == 0 {
            bail!(
                "{}: all {n} rows are training rows ({train_rows}); none left to score",
                path.display()
            );
        }
        if let Some(w) = results {
            w.finish()?;
        }
        Ok((scores, replay.model().map(model_summary), readings))
    }
}

/// Replays every file under `args.data` and scores them; `progress` draws a line on stderr.
pub fn evaluate_csv(args: &EvalCsvArgs, progress: bool) -> anyhow::Result<CsvRun> {
    let started = Instant::now();
    let (detector, config) = detector_config(args.detector.as_deref())?;
    if let Some(t) = args.threshold {
        if !(t > 0.0 && t <= 1.0) {
            bail!("--threshold must be in (0, 1], got {t}");
        }
    }
    let opts = CsvOptions {
        time_column: args.time_column.clone(),
        label_column: args.label_column.clone(),
        columns: args.columns.clone(),
        ignore: args.ignore.clone(),
        separator: args.separator,
    };
    let cfg = ReplayConfig {
        detector: config,
        threshold: args.threshold,
        gate: GateConfig::default(),
        align: AlignConfig {
            staleness_ms: args.staleness_ms,
            min_fill: 1.0,
        },
    };
    let files = list_files(&args.data)?;
    let (train, scored): (Vec<_>, Vec<_>) = files.into_iter().partition(|(name, _)| {
        args.train_files
            .as_deref()
            .is_some_and(|g| matches_glob(g, name))
    });
    if scored.is_empty() {
        bail!("{}: no *.csv file to score", args.data.display());
    }
    if args.train_files.is_some() && train.is_empty() {
        bail!(
            "--train-files {:?} matches no file under {}",
            args.train_files.as_deref().unwrap_or(""),
            args.data.display()
        );
    }
    let first_width = CsvReader::open(&scored[0].1, &opts)?.layout().sensors.len();
    let multivariate = match args.model {
        Some(ModelChoice::Pca) => true,
        Some(ModelChoice::None) => false,
        None => first_width >= 2,
    };
    let shared = match (multivariate, train.is_empty()) {
        (true, false) => Some(fit_on_files(&train, &opts, &cfg.align)?),
        _ => None,
    };
    let mut corpus = CsvCorpus::new(
        multivariate,
        cfg.uni_threshold(),
        cfg.multi_threshold(),
        args.tolerance_ms,
    )
    .map_err(|e| anyhow!("--tolerance-ms: {e}"))?;
    let thresholds = (cfg.uni_threshold(), cfg.multi_threshold());
    let replayer = Replayer {
        args,
        opts,
        cfg,
        multivariate,
        shared,
        progress,
    };
    let (mut models, mut readings) = (Vec::new(), 0u64);
    for (i, (name, path)) in scored.iter().enumerate() {
        let (scores, model, r) = replayer.replay(name, path, (i, scored.len()))?;
        corpus.add(scores).map_err(|e| located(path, e))?;
        models.push(model);
        readings += r;
        if progress {
            eprint!(
                "\r[{}/{}] {name} done{}",
                i + 1,
                scored.len(),
                " ".repeat(20)
            );
        }
    }
    if progress {
        eprint!("\r{}\r", " ".repeat(79));
    }
    Ok(CsvRun {
        detector,
        multivariate,
        thresholds,
        train_files: train.into_iter().map(|(n, _)| n).collect(),
        models,
        readings,
        elapsed: started.elapsed(),
        report: corpus.finish(),
    })
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

impl CsvRun {
    /// Sensor readings replayed per second of wall time (whole run).
    pub fn readings_per_second(&self) -> f64 {
        self.readings as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Rows replayed (scored and training) per second of wall time (whole run).
    pub fn rows_per_second(&self) -> f64 {
        let r = &self.report;
        let rows = r.rows + r.files.iter().map(|f| f.training_rows).sum::<usize>();
        rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `--json` object: run facts, `overall` per view, `per_file` with each file's model.
    pub fn to_json(&self) -> serde_json::Value {
        let r = &self.report;
        let per_file: Vec<serde_json::Value> = r
            .files
            .iter()
            .zip(&self.models)
            .map(|(f, m)| {
                let mut v = f.to_json();
                v["model"] = m.clone().unwrap_or(serde_json::Value::Null);
                v
            })
            .collect();
        serde_json::json!({
            "detector": self.detector,
            "model": if self.multivariate { "pca" } else { "none" },
            "thresholds": { "univariate": self.thresholds.0,
                "multivariate": self.multivariate.then_some(self.thresholds.1) },
            "files": r.files.len(),
            "train_files": self.train_files,
            "rows": r.rows,
            "training_rows": r.files.iter().map(|f| f.training_rows).sum::<usize>(),
            "readings": self.readings,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "rows_per_second": self.rows_per_second(),
            "readings_per_second": self.readings_per_second(),
            "overall": r.overall_json(),
            "per_file": per_file,
        })
    }

    /// The human-readable report: one row per view overall, then per file.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let r = &self.report;
        let mut s = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            s,
            "eval csv: detector {}, model {} — {} files, {} rows scored ({} training), {} readings, {:.2} s wall clock: {:.0} rows/s, {:.0} readings/s",
            self.detector,
            if self.multivariate { "pca" } else { "none" },
            r.files.len(),
            r.rows,
            r.files.iter().map(|f| f.training_rows).sum::<usize>(),
            self.readings,
            self.elapsed.as_secs_f64(),
            self.rows_per_second(),
            self.readings_per_second()
        );
        let _ = if self.multivariate {
            writeln!(
                s,
                "thresholds: univariate {}, multivariate {}\n",
                self.thresholds.0, self.thresholds.1
            )
        } else {
            writeln!(s, "threshold: {}\n", self.thresholds.0)
        };
        let _ = writeln!(
            s,
            "{:<13} {:>6} {:>6} {:>6} | {:>7} {:>6} {:>6} {:>6} | {:>7} {:>6} {:>7} | {:>8} {:>8}",
            "overall",
            "P",
            "R",
            "F1",
            "best t",
            "P",
            "R",
            "F1",
            "caught",
            "recall",
            "FA/h",
            "NAB std",
            "NAB best"
        );
        for v in &r.overall {
            row(&mut s, v.view.name(), v);
        }
        let _ = writeln!(
            s,
            "\nper file (F1 at the fixed threshold / event recall / false alarms per hour)"
        );
        let names: Vec<&str> = r.overall.iter().map(|v| v.view.name()).collect();
        let _ = writeln!(
            s,
            "{:<32} {:>8} {:>5}  {}",
            "file",
            "rows",
            "ivals",
            names.join(" | ")
        );
        for f in &r.files {
            let cells: Vec<String> = f
                .views
                .iter()
                .map(|v| {
                    format!(
                        "{}/{}/{}",
                        opt(v.point.f1(), 2),
                        opt(v.events.recall(), 2),
                        opt(v.events.false_alarms_per_hour(), 2)
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "{:<32} {:>8} {:>5}  {}",
                f.name,
                f.rows,
                f.intervals,
                cells.join(" | ")
            );
            if f.labelled_training_rows > 0 {
                let _ = writeln!(
                    s,
                    "  warning: {} of its {} training rows are labelled anomalous",
                    f.labelled_training_rows, f.training_rows
                );
            }
        }
        s
    }
}

fn row(s: &mut String, name: &str, v: &edgewatch_models::eval::csv::ViewReport) {
    use std::fmt::Write as _;
    let b = v.best.unwrap_or_default();
    let _ = writeln!(
        s,
        "{:<13} {:>6} {:>6} {:>6} | {:>7} {:>6} {:>6} {:>6} | {:>7} {:>6} {:>7} | {:>8} {:>8}",
        name,
        opt(v.point.precision(), 3),
        opt(v.point.recall(), 3),
        opt(v.point.f1(), 3),
        opt(v.best.and_then(|b| b.threshold), 4),
        opt(v.best.and(b.precision()), 3),
        opt(v.best.and(b.recall()), 3),
        opt(v.best.and(b.f1()), 3),
        format!("{}/{}", v.events.caught, v.events.intervals),
        opt(v.events.recall(), 3),
        opt(v.events.false_alarms_per_hour(), 3),
        opt(v.nab_fixed.first().copied().flatten(), 1),
        opt(v.nab_best.first().and_then(|b| b.1), 1),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_paths_and_names() {
        assert!(matches_glob(
            "anomaly-free*",
            "data/anomaly-free/anomaly-free.csv"
        ));
        assert!(!matches_glob(
            "valve*",
            "data/anomaly-free/anomaly-free.csv"
        ));
    }

    #[test]
    fn rows_are_counted_without_blank_lines_and_names_are_made_safe() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        std::fs::write(&p, "t,a\n1,2\n\n2,3\n   \n").unwrap();
        assert_eq!(count_rows(&p).unwrap(), 2);
        std::fs::write(&p, "").unwrap();
        assert_eq!(count_rows(&p).unwrap(), 0);
        assert_eq!(safe_name("Pressure (bar)/x"), "Pressure__bar__x");
    }
}
