//! Fleet intelligence models, pure and I/O-free: aligning a device's readings into vectors, the
//! multivariate PCA device model (T² and SPE against learned limits) and fleet peer groups
//! (k-means over device profiles). Fitting uses linfa; scoring is plain arithmetic.

mod align;
mod axes;
mod limit;
mod pca;
mod peers;
mod standard;

pub use align::{AlignConfig, Aligner};
pub use limit::Limit;
pub use pca::{FitOptions, FitQuality, MultiScore, PcaModel, PcaScorer};
pub use peers::{PeerModel, PeerOptions, PeerScore};

/// linfa version the models are fitted with, recorded in every artifact. Bump it together with the
/// `linfa`, `linfa-reduction` and `linfa-clustering` lines of the root `Cargo.toml`
/// (`[workspace.dependencies]`).
pub const LINFA_VERSION: &str = "0.8.1";
