//! Errors of evaluation: malformed dataset text, labels that do not fit their data, invalid scores.

use crate::ModelError;
use thiserror::Error;

/// What went wrong parsing or scoring an evaluation dataset.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EvalError {
    /// A line of a data CSV could not be used; `line` is 1-based, the header is line 1.
    /// Callers prefix the file name, giving `path:line: detail`.
    #[error("line {line}: {detail}")]
    Csv {
        /// 1-based line number in the CSV text.
        line: usize,
        /// What is wrong, quoting the bad text.
        detail: String,
    },
    /// A cell of a data CSV could not be used: `line` is 1-based (the header is line 1), `column`
    /// the header's name of the cell. Callers prefix the file name: `path:line: column "x": detail`.
    #[error("line {line}: column {column:?}: {detail}")]
    CsvColumn {
        /// 1-based line number in the CSV text.
        line: usize,
        /// The column's name in the header.
        column: String,
        /// What is wrong, quoting the bad text.
        detail: String,
    },
    /// A CSV file cannot be evaluated as a whole (no data rows, a model that cannot be fitted).
    #[error("{0}")]
    Dataset(String),
    /// The labels file (`combined_windows.json`) is malformed.
    #[error("labels: {0}")]
    Labels(String),
    /// A labelled window does not fit the rows of its file.
    #[error("{file}: window {index}: {detail}")]
    Window {
        /// The data file, as named in the labels (`category/file.csv`).
        file: String,
        /// 0-based index of the window in the file's list.
        index: usize,
        /// What is wrong, with the window's bounds.
        detail: String,
    },
    /// A data file has no entry in the labels.
    #[error("{0}: no entry in the labels file")]
    Unlabelled(String),
    /// The number of scores differs from the number of rows.
    #[error("{file}: {scores} scores for {rows} rows")]
    LengthMismatch {
        /// The data file.
        file: String,
        /// Rows in the file.
        rows: usize,
        /// Scores handed in.
        scores: usize,
    },
    /// A score is NaN (detectors must return finite scores in [0, 1]).
    #[error("{file}: row {row}: score is {score}, expected a number")]
    BadScore {
        /// The data file.
        file: String,
        /// 0-based data row.
        row: usize,
        /// The offending score.
        score: f64,
    },
    /// Ground-truth labels or the matching tolerance are invalid (`ground truth: label 3: ...`).
    #[error("ground truth: {0}")]
    Truth(String),
    /// The detector could not be built.
    #[error("detector: {0}")]
    Detector(#[from] ModelError),
}
