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
    /// A fitted model (PCA, peer groups) is inconsistent: `field` is the artifact's field at fault.
    #[error("invalid model: {field}: {detail}")]
    InvalidModel {
        /// Field of the model artifact (e.g. `scales`, `components[2]`).
        field: &'static str,
        /// What is wrong, including the bad value and, where there is one, the feature's name.
        detail: String,
    },
    /// Training data cannot give a model (too few usable rows, wrong shape, nothing varies).
    #[error("training data: {detail}")]
    InvalidData {
        /// What is wrong with the data, with the numbers that show it.
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

    /// Shorthand for [`ModelError::InvalidModel`].
    pub fn model(field: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidModel {
            field,
            detail: detail.into(),
        }
    }

    /// Shorthand for [`ModelError::InvalidData`].
    pub fn data(detail: impl Into<String>) -> Self {
        Self::InvalidData {
            detail: detail.into(),
        }
    }
}
