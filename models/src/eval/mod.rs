//! Evaluation of detectors: the NAB-compatible scorer ([`nab`]) and scoring against the simulator's
//! labelled ground truth ([`truth`]).
//!
//! Everything here is pure: it parses text it is handed and scores vectors it is handed. Listing
//! folders, reading files, printing and timing belong to the one front end, `edgewatch eval`
//! (`tools/src/eval/`).

pub mod csv;
mod error;
pub mod nab;
pub mod truth;

pub use error::EvalError;
