//! `PcaModel`: the multivariate device model of `edgewatch_models::multi` from Python.
//!
//! Fitting goes through [`FitJob::fit`] — the call the aggregator's fit task makes — whenever the
//! options are the defaults (they always are at the aggregator), and through [`PcaModel::fit`] with
//! the given [`FitOptions`] otherwise. The JSON of `to_json()` is `serde_json` of the model, the bytes
//! the aggregator publishes to agents and serves on `GET /api/models/{device}`; `from_json()` runs
//! the model's own `validate()`. Scoring runs a [`PcaScorer`] with the GIL released.
//!
//! Training data the aggregator would refuse (NaN, infinities, magnitudes above the agent's
//! `MAX_ABS_VALUE`) is refused here too, naming the cell, instead of `PcaModel::fit`'s silent
//! skipping: a notebook fit and the aggregator's fit of the same rows are then the same model.

use crate::{as_array, value_error};
use edgewatch_models::multi::{FitJob, FitOptions, PcaModel, PcaScorer};
use edgewatch_models::stats::in_range;
use numpy::{PyArray1, PyArray2, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// Whether `obj` looks like a pandas DataFrame (checked by attributes: pandas is never imported).
fn is_frame(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(obj.hasattr("select_dtypes")? && obj.hasattr("columns")? && obj.hasattr("to_numpy")?)
}

/// A DataFrame's column names, as `str()` gives them.
fn frame_columns(frame: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    frame
        .getattr("columns")?
        .try_iter()?
        .map(|c| c.and_then(|c| c.str().map(|s| s.to_string())))
        .collect()
}

/// A DataFrame's columns as float64 (`pd.NA` as NaN) and their names.
fn frame_matrix<'py>(
    py: Python<'py>,
    frame: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Vec<String>)> {
    let names = frame_columns(frame)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", "float64")?;
    kwargs.set_item("na_value", f64::NAN)?;
    let arr = frame.call_method("to_numpy", (), Some(&kwargs))?;
    Ok((arr, names))
}

/// `obj` as a C-contiguous float64 matrix of `what`.
fn as_matrix<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<PyReadonlyArray2<'py, f64>> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,))?;
    let ndim: usize = arr.getattr("ndim")?.extract()?;
    if ndim != 2 {
        return Err(value_error(format!(
            "{what}: must be two-dimensional (rows x features), got {ndim} dimensions \
             (one vector x: pass x[None, :])"
        )));
    }
    // `as_array` only takes one-dimensional arrays: flatten, convert, reshape.
    let shape = arr.getattr("shape")?;
    let flat = arr.call_method1("reshape", (-1,))?;
    let flat = as_array(py, &flat, "float64", what)?;
    flat.call_method1("reshape", (shape,))?.extract()
}

/// `score()`'s result: per row, the score and the index of the top feature.
type Scores<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<i64>>);

/// A fitted multivariate device model: standardisation, a PCA subspace, and limits of Hotelling's
/// T² and of the squared prediction error learned from the training rows.
#[pyclass(module = "edgewatch._edgewatch", name = "PcaModel", frozen)]
pub(crate) struct PyPcaModel {
    model: PcaModel,
}

impl PyPcaModel {
    /// Scores rows of `n` values (NaN slots are imputed by the mean, as the agent does).
    fn score_rows(&self, rows: &[f64]) -> (Vec<f64>, Vec<i64>) {
        let n = self.model.features.len();
        let mut scorer: PcaScorer = self.model.scorer();
        let m = rows.len() / n.max(1);
        let (mut scores, mut top) = (Vec::with_capacity(m), Vec::with_capacity(m));
        for row in rows.chunks_exact(n) {
            let s = scorer.score(&self.model, row);
            scores.push(s.score);
            top.push(s.top as i64);
        }
        (scores, top)
    }

    /// `matrix` as rows in the model's feature order: a DataFrame's columns are picked by name,
    /// an array must have one column per feature.
    fn rows<'py>(&self, py: Python<'py>, matrix: &Bound<'py, PyAny>) -> PyResult<Vec<f64>> {
        let features = &self.model.features;
        let arr = if is_frame(matrix)? {
            let names = frame_columns(matrix)?;
            let missing: Vec<&String> = features.iter().filter(|f| !names.contains(f)).collect();
            if !missing.is_empty() {
                return Err(value_error(format!(
                    "features: model {:?} v{} expects {:?}; the frame has no column {:?}",
                    self.model.key, self.model.version, features, missing
                )));
            }
            let picked = matrix.get_item(PyList::new(py, features)?)?;
            frame_matrix(py, &picked)?.0
        } else {
            matrix.clone()
        };
        let arr = as_matrix(py, &arr, "matrix")?;
        let cols = arr.shape()[1];
        if cols != features.len() {
            return Err(value_error(format!(
                "features: model {:?} v{} expects {} columns {:?}, the matrix has {cols}",
                self.model.key,
                self.model.version,
                features.len(),
                features
            )));
        }
        Ok(arr.as_slice()?.to_vec())
    }
}

#[pymethods]
impl PyPcaModel {
    /// Fits a model on `data` (rows x features): a 2-D float array with `features` naming its
    /// columns, or a DataFrame (its numeric columns, or those `features` names).
    #[staticmethod]
    #[pyo3(signature = (data, features = None, *, key = "model", from_ms = 0, to_ms = 0,
                        version = 1, variance = 0.9, max_components = 8))]
    #[allow(clippy::too_many_arguments)] // reason: one Python keyword argument each.
    fn fit(
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        features: Option<Vec<String>>,
        key: &str,
        from_ms: i64,
        to_ms: i64,
        version: u64,
        variance: f64,
        max_components: usize,
    ) -> PyResult<Self> {
        let (arr, features) = if is_frame(data)? {
            let frame = match &features {
                Some(f) => data.get_item(PyList::new(py, f)?)?,
                None => {
                    let kwargs = PyDict::new(py);
                    kwargs.set_item("include", "number")?;
                    data.call_method("select_dtypes", (), Some(&kwargs))?
                }
            };
            frame_matrix(py, &frame)?
        } else {
            let Some(f) = features else {
                return Err(value_error(
                    "features: name every column of the array (features=[...]), as the agent \
                     names its metrics; only a DataFrame's columns name themselves",
                ));
            };
            (data.clone(), f)
        };
        let arr = as_matrix(py, &arr, "data")?;
        let cols = arr.shape()[1];
        if cols != features.len() {
            return Err(value_error(format!(
                "features: {} names for {cols} columns: {features:?}",
                features.len()
            )));
        }
        let rows = arr.as_slice()?.to_vec();
        // The aggregator only ever fits rows that passed TrainingSample::check.
        if let Some(i) = rows.iter().position(|v| !v.is_finite() || !in_range(*v)) {
            let (r, c) = (i / cols, i % cols);
            return Err(value_error(format!(
                "data[{r}][{c}] ({:?}): must be finite and within +/-1e100, got {} \
                 (drop such rows first: the aggregator never trains on them)",
                features[c], rows[i]
            )));
        }
        let opts = FitOptions {
            variance,
            max_components,
        };
        let job = FitJob {
            device: key.to_string(),
            agent: String::new(),
            features,
            rows,
            from_ms,
            to_ms,
            version,
            class: None,
        };
        let model = py
            .detach(move || {
                if opts == FitOptions::default() {
                    job.fit()
                } else {
                    let mut m = PcaModel::fit(
                        &job.device,
                        job.features,
                        &job.rows,
                        job.from_ms,
                        job.to_ms,
                        &opts,
                    )?;
                    m.version = job.version;
                    Ok(m)
                }
            })
            .map_err(|e| value_error(e.to_string()))?;
        Ok(Self { model })
    }

    /// A model from its JSON artifact (as `to_json`, the aggregator and `edgewatch models show`
    /// have it), validated.
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        let model: PcaModel = serde_json::from_str(text)
            .map_err(|e| value_error(format!("not a model artifact: {e}")))?;
        model
            .validate()
            .map_err(|e| value_error(format!("model {:?} v{}: {e}", model.key, model.version)))?;
        Ok(Self { model })
    }

    /// The JSON artifact: the bytes the aggregator publishes to agents.
    fn to_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.model).map_err(|e| value_error(format!("cannot encode: {e}")))
    }

    /// Scores every row of `matrix`; returns (scores in [0, 1], index of the top feature).
    fn score<'py>(&self, py: Python<'py>, matrix: &Bound<'py, PyAny>) -> PyResult<Scores<'py>> {
        let rows = self.rows(py, matrix)?;
        let (scores, top) = py.detach(|| self.score_rows(&rows));
        Ok((PyArray1::from_vec(py, scores), PyArray1::from_vec(py, top)))
    }

    /// Feature (metric) names, in column order.
    #[getter]
    fn features(&self) -> Vec<String> {
        self.model.features.clone()
    }

    /// The model's version.
    #[getter]
    fn version(&self) -> u64 {
        self.model.version
    }

    /// The device (or class) the model is for.
    #[getter]
    fn key(&self) -> &str {
        &self.model.key
    }

    /// Always `"pca"`.
    #[getter]
    fn kind(&self) -> &str {
        &self.model.kind
    }

    /// Training rows used.
    #[getter]
    fn samples(&self) -> u64 {
        self.model.samples
    }

    /// Event time of the first training reading, ms.
    #[getter]
    fn trained_from_ms(&self) -> i64 {
        self.model.trained_from_ms
    }

    /// Event time of the last training reading, ms.
    #[getter]
    fn trained_to_ms(&self) -> i64 {
        self.model.trained_to_ms
    }

    /// Per-feature training means.
    #[getter]
    fn means<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, &self.model.means)
    }

    /// Per-feature training standard deviations (1 for a constant feature).
    #[getter]
    fn scales<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, &self.model.scales)
    }

    /// The k principal axes (k x features), orthonormal rows.
    #[getter]
    fn components<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        PyArray2::from_vec2(py, &self.model.components)
            .map_err(|e| value_error(format!("components: {e}")))
    }

    /// The k eigenvalues (variance of the standardised data along each axis).
    #[getter]
    fn eigenvalues<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, &self.model.eigenvalues)
    }

    /// Fit quality as a dict (explained_variance_ratio, median_score, p99_score, alarm_rate,
    /// skipped_rows, constant_features, solver).
    #[getter]
    fn quality<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = serde_json::to_string(&self.model.quality)
            .map_err(|e| value_error(format!("cannot encode: {e}")))?;
        py.import("json")?.call_method1("loads", (json,))
    }

    /// linfa version the model was fitted with.
    #[getter]
    fn linfa_version(&self) -> &str {
        &self.model.linfa_version
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Self>()
            .is_ok_and(|o| o.get().model == self.model)
    }

    fn __repr__(&self) -> String {
        format!(
            "PcaModel(key={:?}, version={}, features={:?}, components={}, samples={})",
            self.model.key,
            self.model.version,
            self.model.features,
            self.model.components.len(),
            self.model.samples
        )
    }
}
