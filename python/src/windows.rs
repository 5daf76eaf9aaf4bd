//! `windows`: tumbling-window summaries of one series, by the agent's own
//! [`TumblingWindows`] and [`WindowAggregate::to_summary`] (so every field is the wire
//! `WindowSummary`'s, computed the same way).
//!
//! The readings go through in the order given, as the agent's windows see them arrive: readings a
//! closed window would refuse are late (`late="raise"` names the first, `late="drop"` leaves them
//! out as the agent does), and values the agent's ingest refuses (NaN, infinities, magnitudes above
//! `MAX_ABS_VALUE`) are skipped without moving the watermark. A window corrected by a late reading
//! within `allowed_lateness_ms` appears once, as its last emission (the one a receiver keeps).

use crate::{as_array, value_error};
use edgewatch_models::stats::in_range;
use edgewatch_models::window::{Admit, TumblingWindows, WindowAggregate};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::BTreeMap;

/// The columns of the result, in the order of the wire summary's fields.
struct Columns {
    start_ms: Vec<i64>,
    end_ms: Vec<i64>,
    count: Vec<u64>,
    min: Vec<f64>,
    max: Vec<f64>,
    mean: Vec<f64>,
    std: Vec<f64>,
    first_ts_ms: Vec<i64>,
    last_ts_ms: Vec<i64>,
    max_score: Vec<f64>,
    revision: Vec<u32>,
}

/// A late reading: its index and timestamp, and the watermark that closed its window.
struct Late {
    index: usize,
    ts_ms: i64,
    watermark_ms: i64,
}

/// Runs the readings through the agent's windows; `Err` at the first late reading when `drop_late`
/// is false.
fn summarise(
    ts: &[i64],
    values: &[f64],
    scores: Option<&[f64]>,
    mut windows: TumblingWindows,
    drop_late: bool,
) -> Result<Columns, Late> {
    let mut last: BTreeMap<i64, WindowAggregate> = BTreeMap::new();
    let mut keep = |w: WindowAggregate| {
        // Emissions of one window come in increasing revision: the last one is the one kept.
        last.insert(w.start_ms, w);
    };
    for (i, (&t, &v)) in ts.iter().zip(values).enumerate() {
        if !v.is_finite() || !in_range(v) {
            continue;
        }
        // As the agent's pipeline: a non-finite score counts as 0, others are clamped to [0, 1].
        let score = scores.map_or(0.0, |s| {
            if s[i].is_finite() {
                s[i].clamp(0.0, 1.0)
            } else {
                0.0
            }
        });
        let watermark_ms = windows.watermark_ms();
        if let Admit::Late = windows.push(t, v, score, &mut keep) {
            if !drop_late {
                return Err(Late {
                    index: i,
                    ts_ms: t,
                    watermark_ms,
                });
            }
        }
    }
    windows.flush(&mut keep);
    let n = last.len();
    let mut c = Columns {
        start_ms: Vec::with_capacity(n),
        end_ms: Vec::with_capacity(n),
        count: Vec::with_capacity(n),
        min: Vec::with_capacity(n),
        max: Vec::with_capacity(n),
        mean: Vec::with_capacity(n),
        std: Vec::with_capacity(n),
        first_ts_ms: Vec::with_capacity(n),
        last_ts_ms: Vec::with_capacity(n),
        max_score: Vec::with_capacity(n),
        revision: Vec::with_capacity(n),
    };
    for w in last.values() {
        let s = w.to_summary("", "");
        c.start_ms.push(s.start_ms);
        c.end_ms.push(s.end_ms);
        c.count.push(s.count);
        c.min.push(s.min);
        c.max.push(s.max);
        c.mean.push(s.mean);
        c.std.push(s.std);
        c.first_ts_ms.push(s.first_ts_ms);
        c.last_ts_ms.push(s.last_ts_ms);
        c.max_score.push(s.max_score);
        c.revision.push(s.revision);
    }
    Ok(c)
}

/// Tumbling-window summaries of a series: a dict of numpy arrays, one entry per window in start
/// order, with the agent's summary fields.
#[pyfunction]
#[pyo3(signature = (ts_ms, values, window_ms, *, scores = None, allowed_lateness_ms = 0, late = "raise"))]
pub(crate) fn windows<'py>(
    py: Python<'py>,
    ts_ms: &Bound<'py, PyAny>,
    values: &Bound<'py, PyAny>,
    window_ms: i64,
    scores: Option<&Bound<'py, PyAny>>,
    allowed_lateness_ms: i64,
    late: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let drop_late = match late {
        "raise" => false,
        "drop" => true,
        other => {
            return Err(value_error(format!(
                "late: must be \"raise\" or \"drop\", got {other:?}"
            )))
        }
    };
    let windows = TumblingWindows::new(window_ms, allowed_lateness_ms).map_err(|e| {
        let e = e.to_string();
        // The crate names its own parameter (`size_ms`); the caller passed `window_ms`.
        match e.strip_prefix("size_ms") {
            Some(rest) => value_error(format!("window_ms{rest}")),
            None => value_error(e),
        }
    })?;
    let ts: PyReadonlyArray1<'py, i64> = as_array(py, ts_ms, "int64", "ts_ms")?.extract()?;
    let values: PyReadonlyArray1<'py, f64> =
        as_array(py, values, "float64", "values")?.extract()?;
    let scores: Option<PyReadonlyArray1<'py, f64>> = match scores {
        Some(s) if !s.is_none() => Some(as_array(py, s, "float64", "scores")?.extract()?),
        _ => None,
    };
    let (ts, values) = (ts.as_slice()?, values.as_slice()?);
    let scores = scores.as_ref().map(|s| s.as_slice()).transpose()?;
    if ts.len() != values.len() || scores.is_some_and(|s| s.len() != ts.len()) {
        return Err(value_error(format!(
            "ts_ms, values (and scores) differ in length: {}, {}{}",
            ts.len(),
            values.len(),
            scores.map_or(String::new(), |s| format!(", {}", s.len()))
        )));
    }
    let columns = py
        .detach(|| summarise(ts, values, scores, windows, drop_late))
        .map_err(|l| {
            value_error(format!(
                "ts_ms[{}] = {} is late: its window closed when the watermark reached {} \
                 (allowed_lateness_ms {allowed_lateness_ms}); sort the readings, raise \
                 allowed_lateness_ms, or pass late=\"drop\" to leave late readings out as the agent does",
                l.index, l.ts_ms, l.watermark_ms
            ))
        })?;
    let out = PyDict::new(py);
    out.set_item("start_ms", PyArray1::from_vec(py, columns.start_ms))?;
    out.set_item("end_ms", PyArray1::from_vec(py, columns.end_ms))?;
    out.set_item("count", PyArray1::from_vec(py, columns.count))?;
    out.set_item("min", PyArray1::from_vec(py, columns.min))?;
    out.set_item("max", PyArray1::from_vec(py, columns.max))?;
    out.set_item("mean", PyArray1::from_vec(py, columns.mean))?;
    out.set_item("std", PyArray1::from_vec(py, columns.std))?;
    out.set_item("first_ts_ms", PyArray1::from_vec(py, columns.first_ts_ms))?;
    out.set_item("last_ts_ms", PyArray1::from_vec(py, columns.last_ts_ms))?;
    out.set_item("max_score", PyArray1::from_vec(py, columns.max_score))?;
    out.set_item("revision", PyArray1::from_vec(py, columns.revision))?;
    Ok(out)
}
