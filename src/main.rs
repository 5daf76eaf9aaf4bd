//! The `edgewatch` command line: parses arguments, loads configuration, runs one component.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "edgewatch", version, about = "IoT edge-to-cloud stream analytics")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Evaluate detectors on a dataset.
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Debug, Subcommand)]
enum EvalCommand {
    /// Score a detector on the Numenta Anomaly Benchmark.
    Nab(edgewatch::eval::EvalNabArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(EvalCommand::Nab(args)) => edgewatch::eval::run_nab(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
