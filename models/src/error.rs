//! Errors of the models crate: invalid parameters, reported with the bad value.

use thiserror::Error;

/// What went wrong building or feeding a model.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ModelError {
    /// A parameter is outside its allowed range; `name` is the parameter, `detail` shows the bad value.
    #[error("{name}: {detail}")]
    InvalidParameter {
        /// Parameter name as it appears in configuration (e.g. `alpha`).
        name: &'static str,
        /// What is wrong, including the value that was given.
        detail: String,
    },
}

impl ModelError {
    /// Shorthand for [`ModelError::InvalidParameter`].
    pub fn invalid(name: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidParameter {
            name,
            detail: detail.into(),
        }
    }
}
