//! `edgewatch._edgewatch`: the native half of the `edgewatch` Python package.
//!
//! A thin face over `edgewatch_models::detect`: the same [`DetectorConfig`] parsing (serde, unknown
//! keys rejected, then `build()`'s validation), the same [`AnyDetector`] the agent runs per series,
//! and its postcard encoding — the bytes a detector has inside an agent checkpoint row — as `state()`.
//! Whole-array scoring releases the GIL. Beside it: the multivariate `PcaModel` (`pca.rs`),
//! tumbling-window summaries (`windows.rs`) and the NAB scorer (`nab.rs`). The Python-facing docs
//! are in `edgewatch/__init__.pyi`.

mod nab;
mod pca;
mod windows;

use edgewatch_models::detect::{
    self, AnyDetector, Detector as _, DetectorConfig, EventGate, GateConfig,
};
use edgewatch_models::yaml_limits::{self, YamlLimitError, YamlLimits};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

/// Prefix of every configuration error: the key path as `edgewatch config check` prints it for an
/// agent file, where these keys sit under `detector:`.
const ROOT: &str = "detector";

fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// `detector.<path>` for a serde path (`.` is the block itself).
fn key_path(path: &str) -> String {
    if path == "." || path.is_empty() {
        ROOT.to_string()
    } else if path.starts_with('[') {
        format!("{ROOT}{path}")
    } else {
        format!("{ROOT}.{path}")
    }
}

/// Where a configuration error is: the key path under `detector` and, for YAML text, its position.
struct Problem {
    key: String,
    location: Option<(usize, usize)>,
    message: String,
}

impl Problem {
    fn new(path: &str, message: String) -> Self {
        let mut message = message;
        if let Some(at) = message.find(" at line ") {
            message.truncate(at);
        }
        Self {
            key: key_path(path),
            location: None,
            message,
        }
    }

    /// Locates the key's last segment in YAML text (the first line holding `segment:`), unless the
    /// parser already gave a position.
    fn locate(mut self, yaml: Option<&str>) -> Self {
        if self.location.is_none() {
            if let (Some(text), Some(leaf)) = (yaml, self.key.rsplit('.').next()) {
                if self.key != ROOT {
                    self.location = text.lines().enumerate().find_map(|(i, l)| {
                        let col = l.len() - l.trim_start().len();
                        let rest = l.trim_start().trim_start_matches("- ");
                        let rest = rest.strip_prefix(leaf)?;
                        rest.trim_start()
                            .starts_with(':')
                            .then_some((i + 1, col + 1))
                    });
                }
            }
        }
        self
    }

    fn into_err(self) -> PyErr {
        match self.location {
            Some((line, col)) => value_error(format!(
                "{} (line {line}, col {col}): {}",
                self.key, self.message
            )),
            None => value_error(format!("{}: {}", self.key, self.message)),
        }
    }
}

/// Deserialises `value` as a `T`, the error carrying serde's key path.
fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        Problem::new(&path, e.into_inner().to_string())
    })
}

/// The detector block from a parsed value. `DetectorConfig` is internally tagged (`type:`), and serde
/// buffers such a map, which loses the key of a type error (`detector: invalid type: ...`); so a
/// known `type` is read as that variant's own parameters, whose errors keep their key
/// (`detector.alpha: invalid type: ...`). Anything else goes through `DetectorConfig` itself.
fn config_from_value(value: serde_json::Value) -> Result<DetectorConfig, Problem> {
    macro_rules! variants {
        ($kind:expr, $rest:expr; $($name:literal => $variant:ident($cfg:ty)),* $(,)?) => {
            match $kind {
                $($name => return typed::<$cfg>($rest).map(DetectorConfig::$variant),)*
                _ => {}
            }
        };
    }
    if let serde_json::Value::Object(map) = &value {
        if let Some(kind) = map.get("type").and_then(|t| t.as_str()) {
            let mut rest = map.clone();
            rest.remove("type");
            let rest = serde_json::Value::Object(rest);
            variants!(kind, rest;
                "zscore" => Zscore(detect::ZScoreConfig),
                "ewma" => Ewma(detect::EwmaConfig),
                "mad" => Mad(detect::MadConfig),
                "cusum" => Cusum(detect::CusumConfig),
                "seasonal" => Seasonal(detect::SeasonalConfig),
                "hst" => Hst(detect::HstConfig),
                "stuck" => Stuck(detect::StuckConfig),
                "likelihood" => Likelihood(detect::LikelihoodConfig),
                "ensemble" => Ensemble(detect::EnsembleConfig),
            );
        }
    }
    typed::<DetectorConfig>(value)
}

/// Parses the detector block from YAML text; errors read `detector.key (line L, col C): message`.
fn config_from_yaml(text: &str) -> PyResult<DetectorConfig> {
    yaml_limits::check(text.as_bytes(), YamlLimits::default()).map_err(|e| match e {
        YamlLimitError::TooDeep { line, col, max } => value_error(format!(
            "{ROOT} (line {line}, col {col}): nested deeper than {max} levels: refused before parsing"
        )),
        other => value_error(format!("{ROOT}: {other}")),
    })?;
    let value: serde_json::Value = serde_norway::from_str(text).map_err(|e| {
        let mut p = Problem::new(".", e.to_string());
        p.location = e.location().map(|l| (l.line(), l.column()));
        p.into_err()
    })?;
    let config = config_from_value(value).map_err(|p| p.locate(Some(text)).into_err())?;
    validate(&config, Some(text))?;
    Ok(config)
}

/// Parses the detector block from JSON text (a dict dumped by Python's `json`).
fn config_from_json(text: &str) -> PyResult<DetectorConfig> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Problem::new(".", e.to_string()).into_err())?;
    let config = config_from_value(value).map_err(Problem::into_err)?;
    validate(&config, None)?;
    Ok(config)
}

/// `build()`'s validation, as `detector.<name>: <detail>`, located in YAML text.
fn validate(config: &DetectorConfig, yaml: Option<&str>) -> PyResult<()> {
    match config.build() {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            let problem = match text.split_once(": ") {
                Some((name, detail)) if !name.contains(' ') => {
                    Problem::new(name, detail.to_string())
                }
                _ => Problem::new(".", text),
            };
            Err(problem.locate(yaml).into_err())
        }
    }
}

/// `obj` as a contiguous one-dimensional numpy array of `dtype`, converting only where numpy's
/// `same_kind` casting allows (int32 → int64 yes; float → int64 or datetime64 → int64 no).
fn as_array<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    dtype: &str,
    what: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,))?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("casting", "same_kind")?;
    kwargs.set_item("copy", false)?;
    let arr = arr
        .call_method("astype", (dtype,), Some(&kwargs))
        .map_err(|e| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "{what}: must be {dtype}-compatible ({e})"
            ))
        })?;
    let arr = np.call_method1("ascontiguousarray", (arr,))?;
    let ndim: usize = arr.getattr("ndim")?.extract()?;
    if ndim != 1 {
        return Err(value_error(format!(
            "{what}: must be one-dimensional, got {ndim} dimensions"
        )));
    }
    Ok(arr)
}

/// One streaming detector over one series, exactly as the agent runs it.
///
/// `Detector(config=None)`: `config` is the agent's `detector:` block, as a dict
/// (`{"type": "ewma", "alpha": 0.05}`) or YAML text; None is the default (the ensemble). A bad
/// block raises ValueError starting with its key path (`detector.alpha: must be in (0, 1], got 2`).
/// `update(ts_ms, value)` feeds one reading, `score(ts, values)` whole numpy arrays (GIL released);
/// `state()` / `Detector.from_state(bytes)` save and resume it bit for bit.
#[pyclass(module = "edgewatch._edgewatch", name = "Detector")]
struct PyDetector {
    detector: AnyDetector,
    /// The configuration's recommended threshold; unknown for a detector restored from state.
    threshold: Option<f64>,
}

impl PyDetector {
    fn from_config(config: &DetectorConfig) -> PyResult<Self> {
        let detector = config
            .build()
            .map_err(|e| value_error(format!("{ROOT}.{e}")))?;
        Ok(Self {
            detector,
            threshold: Some(config.recommended_threshold()),
        })
    }
}

#[pymethods]
impl PyDetector {
    #[new]
    #[pyo3(signature = (config = None))]
    fn new(py: Python<'_>, config: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let config = match config {
            None => DetectorConfig::default(),
            Some(c) if c.is_none() => DetectorConfig::default(),
            Some(c) if c.is_instance_of::<PyString>() => config_from_yaml(&c.extract::<String>()?)?,
            Some(c) if c.is_instance_of::<PyDict>() => {
                let json = py.import("json")?.call_method1("dumps", (c,))?;
                config_from_json(&json.extract::<String>()?)?
            }
            Some(c) => {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "config must be a dict, a YAML string or None, not {}",
                    c.get_type().name()?
                )))
            }
        };
        Self::from_config(&config)
    }

    /// The detector called `name`, with its default parameters.
    #[staticmethod]
    fn preset(name: &str) -> PyResult<Self> {
        let config = DetectorConfig::preset(name).ok_or_else(|| {
            value_error(format!(
                "{ROOT}.type: unknown preset {name:?}; valid: {}",
                DetectorConfig::PRESETS.join(", ")
            ))
        })?;
        Self::from_config(&config)
    }

    /// Names accepted by `Detector.preset`.
    #[staticmethod]
    fn presets() -> Vec<&'static str> {
        DetectorConfig::PRESETS.to_vec()
    }

    /// Restores a detector from `state()`'s bytes.
    #[staticmethod]
    fn from_state(state: &[u8]) -> PyResult<Self> {
        let (detector, rest) = postcard::take_from_bytes::<AnyDetector>(state)
            .map_err(|e| value_error(format!("state: not a detector state ({e})")))?;
        if !rest.is_empty() {
            return Err(value_error(format!(
                "state: {} trailing bytes after the detector",
                rest.len()
            )));
        }
        Ok(Self {
            detector,
            threshold: None,
        })
    }

    /// The detector's state (postcard, as in the agent's checkpoint rows).
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = postcard::to_stdvec(&self.detector)
            .map_err(|e| value_error(format!("state: cannot encode ({e})")))?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Feeds one reading; returns its score in [0, 1].
    fn update(&mut self, ts_ms: i64, value: f64) -> f64 {
        self.detector.update(ts_ms, value)
    }

    /// Feeds whole arrays (int64 milliseconds, float64 values) in order; returns the scores.
    fn score<'py>(
        mut slf: PyRefMut<'_, Self>,
        py: Python<'py>,
        ts: &Bound<'py, PyAny>,
        values: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let ts: PyReadonlyArray1<'py, i64> = as_array(py, ts, "int64", "ts")?.extract()?;
        let values: PyReadonlyArray1<'py, f64> =
            as_array(py, values, "float64", "values")?.extract()?;
        let ts = ts.as_slice()?;
        let values = values.as_slice()?;
        if ts.len() != values.len() {
            return Err(value_error(format!(
                "ts and values differ in length: {} vs {}",
                ts.len(),
                values.len()
            )));
        }
        let detector = &mut slf.detector;
        let scores = py.detach(move || {
            ts.iter()
                .zip(values)
                .map(|(&t, &v)| detector.update(t, v))
                .collect::<Vec<f64>>()
        });
        Ok(PyArray1::from_vec(py, scores))
    }

    /// The detector's name (`ensemble`, `ewma`, ...).
    #[getter]
    fn name(&self) -> &'static str {
        self.detector.name()
    }

    /// The recommended event threshold of the configuration, or None after `from_state`.
    #[getter]
    fn threshold(&self) -> Option<f64> {
        self.threshold
    }

    /// Bytes of state held (inline size plus heap).
    #[getter]
    fn state_bytes(&self) -> usize {
        self.detector.state_bytes()
    }

    fn __repr__(&self) -> String {
        format!("Detector(name={:?})", self.detector.name())
    }
}

/// The alarm view of a score array through the agent's event gate: the score while armed, 0 while an
/// episode lasts (re-armed below `threshold * rearm_ratio` after `min_gap_readings` readings), as
/// `edgewatch eval nab` scores it with the detector's recommended threshold.
#[pyfunction]
#[pyo3(signature = (scores, threshold, rearm_ratio = 0.8, min_gap_readings = 100))]
fn alarm_scores<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    threshold: f64,
    rearm_ratio: f64,
    min_gap_readings: u32,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let gate_config = GateConfig {
        rearm_ratio,
        min_gap_readings,
    };
    let mut gate =
        EventGate::new(threshold, &gate_config).map_err(|e| value_error(format!("anomaly.{e}")))?;
    let scores: PyReadonlyArray1<'py, f64> =
        as_array(py, scores, "float64", "scores")?.extract()?;
    let scores = scores.as_slice()?;
    let out = py.detach(move || {
        scores
            .iter()
            .map(|&s| gate.alarm_score(s))
            .collect::<Vec<f64>>()
    });
    Ok(PyArray1::from_vec(py, out))
}

/// The native module.
#[pymodule]
fn _edgewatch(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDetector>()?;
    m.add_function(wrap_pyfunction!(alarm_scores, m)?)?;
    m.add_function(wrap_pyfunction!(nab::nab_score, m)?)?;
    m.add_class::<pca::PyPcaModel>()?;
    m.add_function(wrap_pyfunction!(windows::windows, m)?)?;
    m.add("PRESETS", DetectorConfig::PRESETS.to_vec())?;
    Ok(())
}
