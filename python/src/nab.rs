//! `nab_score`: the NAB scorer of `edgewatch_models::eval::nab` (the one `edgewatch eval nab` runs)
//! over scores computed in Python.

use crate::{as_array, value_error};
use edgewatch_models::eval::nab::{self, FileSweep, NabCorpus};
use numpy::PyReadonlyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

/// Reads the labels: JSON text, a path to `combined_windows.json`, or a dict of the same shape.
fn labels(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<nab::Labels> {
    let text: String = if obj.is_instance_of::<PyDict>() {
        py.import("json")?
            .call_method1("dumps", (obj,))?
            .extract()?
    } else if obj.is_instance_of::<PyString>()
        && obj.extract::<String>()?.trim_start().starts_with('{')
    {
        obj.extract()?
    } else {
        let path = py.import("os")?.call_method1("fspath", (obj,))?;
        let path: String = path.extract()?;
        std::fs::read_to_string(&path).map_err(|e| value_error(format!("labels: {path}: {e}")))?
    };
    nab::parse_labels(&text).map_err(|e| value_error(format!("labels: {e}")))
}

/// Scores `files` (name → (timestamps in ms, scores)) against NAB `labels` under the three
/// profiles; returns a dict as `edgewatch eval nab --json` reports it.
#[pyfunction]
#[pyo3(signature = (files, labels))]
pub(crate) fn nab_score<'py>(
    py: Python<'py>,
    files: &Bound<'py, PyDict>,
    labels: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let labels = self::labels(py, labels)?;
    let mut names: Vec<(String, Bound<'py, PyAny>)> = files
        .iter()
        .map(|(k, v)| Ok((k.extract::<String>()?, v)))
        .collect::<PyResult<_>>()?;
    // File order as `eval nab` adds them (sorted by name), so the sums are the same to the bit.
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let mut corpus = NabCorpus::new();
    for (name, pair) in names {
        let (ts, scores): (Bound<'py, PyAny>, Bound<'py, PyAny>) = pair
            .extract()
            .map_err(|_| value_error(format!("{name}: expected a (timestamps, scores) pair")))?;
        let ts: PyReadonlyArray1<'py, i64> =
            as_array(py, &ts, "int64", &format!("{name}: timestamps"))?.extract()?;
        let scores: PyReadonlyArray1<'py, f64> =
            as_array(py, &scores, "float64", &format!("{name}: scores"))?.extract()?;
        let windows = labels
            .get(&name)
            .ok_or_else(|| value_error(format!("{name}: not in the labels")))?;
        let sweep = FileSweep::new(&name, ts.as_slice()?, scores.as_slice()?, windows)
            .map_err(|e| value_error(format!("{name}: {e}")))?;
        corpus.add(sweep);
    }
    if corpus.is_empty() {
        return Err(value_error("files: no file to score"));
    }
    let report = py.detach(|| corpus.score());
    let out = PyDict::new(py);
    out.set_item("files", PyList::new(py, &report.files)?)?;
    out.set_item("scorable_rows", report.scorable_rows)?;
    for p in &report.profiles {
        let d = PyDict::new(py);
        d.set_item("normalized", p.normalized)?;
        d.set_item("threshold", p.threshold)?;
        d.set_item("raw", p.raw)?;
        d.set_item("null", p.null)?;
        d.set_item("perfect", p.perfect)?;
        d.set_item("windows", p.counts.windows)?;
        d.set_item("windows_in_labels", p.counts.windows_in_labels)?;
        d.set_item("detected", p.counts.detected)?;
        d.set_item("false_positives", p.counts.false_positives)?;
        out.set_item(p.profile.name, d)?;
    }
    Ok(out)
}
