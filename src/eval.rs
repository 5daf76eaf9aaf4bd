//! `edgewatch eval`: replays datasets through detectors and scores them.

use clap::Args;

/// Arguments of `edgewatch eval nab`.
#[derive(Debug, Args)]
pub struct EvalNabArgs {
    /// Folder in NAB layout (data/, labels/combined_windows.json).
    #[arg(long)]
    pub data: std::path::PathBuf,
}

/// Runs `edgewatch eval nab`.
pub fn run_nab(args: EvalNabArgs) -> anyhow::Result<()> {
    anyhow::bail!("eval nab is not built yet (data: {})", args.data.display())
}
