//! The `edgewatch` command line: parses arguments, loads configuration, runs one component.
//! Exit codes (the README's table): 0 ok, 1 invalid configuration or usage (clap's usage errors
//! included), 2 runtime failure; `verify` exits 1 on mismatches and 2 on any other error.

use clap::{Parser, Subcommand, ValueEnum};
use edgewatch::config::{self, ConfigError};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "edgewatch",
    version,
    about = "IoT edge-to-cloud stream analytics: gateway agents, sharded aggregators, live anomaly feed"
)]
struct Cli {
    /// Log filter (e.g. info, debug, edgewatch_agent=trace); RUST_LOG overrides it.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log line format on stderr: text (coloured only on a terminal) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: edgewatch::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway agent: MQTT ingest, windowed detection, uplink.
    Agent {
        /// Agent configuration (YAML).
        #[arg(short, long)]
        config: PathBuf,
    },
    #[cfg(feature = "cloud")]
    /// Run one aggregator instance: partition state, live feed, HTTP API.
    Aggregator {
        /// Aggregator configuration (YAML).
        #[arg(short, long)]
        config: PathBuf,
    },
    #[cfg(feature = "cloud")]
    /// Publish a simulated fleet with labelled anomalies over MQTT.
    Simulate {
        /// Simulator configuration (YAML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run everything in one process: embedded broker, simulator, agent, two aggregators, feed.
    #[cfg(feature = "embedded-broker")]
    Demo {
        /// Demo configuration (YAML); built-in defaults when omitted.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Stop after this many seconds (default: run until Ctrl-C or SIGTERM).
        #[arg(long)]
        duration: Option<u64>,
        /// Port of the embedded MQTT broker (default 1883; 0 picks a free one).
        #[arg(long)]
        broker_port: Option<u16>,
        /// HTTP port of the first aggregator; the others use the next ports (default 8080; 0 picks free ones).
        #[arg(long)]
        http_port: Option<u16>,
    },
    /// Print the live anomaly feed.
    Tail(edgewatch::tail::TailArgs),
    /// Measure pipeline throughput, end-to-end throughput and publish-to-feed latency.
    #[cfg(feature = "embedded-broker")]
    Bench(edgewatch::bench::BenchArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    #[cfg(feature = "cloud")]
    /// Cluster mode tools (NATS JetStream).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    #[cfg(feature = "cloud")]
    /// Evaluate detectors on a dataset.
    #[command(subcommand)]
    Eval(EvalCommand),
    #[cfg(feature = "cloud")]
    /// Multivariate device models: push one to the agents, clear one, show a model file, list an aggregator's.
    #[command(subcommand)]
    Models(edgewatch::models::ModelsCommand),
    #[cfg(feature = "cloud")]
    /// List the fleet's agents as any aggregator knows them (their retained status messages):
    /// online or offline, age, version, configuration digest, rates, outbox, last error.
    Agents(edgewatch::agents::AgentsArgs),
    #[cfg(feature = "cloud")]
    /// Reconcile a simulator readings log with the windows the aggregators hold.
    /// Exits 0 when every reading is counted exactly once, 1 on mismatches, 2 on errors.
    Verify(edgewatch::verify::VerifyArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate configuration files; exits 1 with every problem (file, key, line, column) if any is invalid.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Component the files configure; guessed from each file name when omitted.
        #[arg(long, value_enum)]
        kind: Option<Kind>,
    },
}

#[cfg(feature = "cloud")]
#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Print the members (suspect when their heartbeat is late), the owner and lease age of every
    /// partition (at risk when its owner is suspect), checkpoint lag and per-partition throughput,
    /// read from the cluster's KV without creating anything. Exits 2 when the cluster cannot be
    /// read within --wait.
    Status {
        /// Configuration of any aggregator of the deployment (its `cluster:`, `prefix` and
        /// `partitions` are used).
        #[arg(long)]
        config: PathBuf,
        /// Print JSON (the same document as `GET /api/cluster`) instead of a table.
        #[arg(long)]
        json: bool,
        /// Keep trying this long (seconds) while the cluster does not answer, e.g. during a
        /// JetStream leader election, before exiting 2.
        #[arg(long, default_value_t = 20)]
        wait: u64,
    },
}

#[cfg(feature = "cloud")]
#[derive(Debug, Subcommand)]
enum EvalCommand {
    /// Score a detector on the Numenta Anomaly Benchmark.
    Nab(edgewatch::eval::EvalNabArgs),
    /// Score a detector on the fleet simulator's labelled anomalies (precision, recall, F1, delay per kind).
    Sim(edgewatch::eval::sim::EvalSimArgs),
    /// Replay labelled multi-sensor CSV files (one per device run): univariate and multivariate scores.
    Csv(edgewatch::eval::EvalCsvArgs),
}

/// Which component a configuration file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    Agent,
    Aggregator,
    Simulator,
    Demo,
}

impl Kind {
    fn guess(path: &Path) -> Option<Kind> {
        let name = path.file_name()?.to_string_lossy().to_lowercase();
        [
            ("aggregator", Kind::Aggregator),
            ("agent", Kind::Agent),
            ("simulat", Kind::Simulator),
            ("demo", Kind::Demo),
        ]
        .into_iter()
        .find(|(k, _)| name.contains(k))
        .map(|(_, kind)| kind)
    }
}

enum Failure {
    Usage(anyhow::Error),
    Runtime(anyhow::Error),
    /// `verify` found mismatches and has printed them: exit 1, nothing more to say.
    #[cfg_attr(not(feature = "cloud"), allow(dead_code))]
    Mismatch,
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Usage(e.into())
    }
}

fn runtime(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Runtime(e.into())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; a usage error is exit code 1,
            // except for `verify`, whose 1 means "mismatches found" to scripts: 2 there.
            let _ = e.print();
            let verify = std::env::args_os().skip(1).any(|a| a == "verify");
            return match (e.use_stderr(), verify) {
                (false, _) => ExitCode::SUCCESS,
                (true, false) => ExitCode::from(1),
                (true, true) => ExitCode::from(2),
            };
        }
    };
    let default_level = if is_daemon(&cli.command) {
        "info"
    } else {
        "warn"
    };
    // A daemon's `log.level` may set the filter (at start and on reloads) unless the command line did.
    let reloadable = cli.log_level.is_none() && has_log_level(&cli.command);
    edgewatch::logging::init_full(
        cli.log_level.as_deref().unwrap_or(default_level),
        cli.log_format,
        reloadable,
    );
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("error: {}", edgewatch::logging::chain(&e));
            ExitCode::from(1)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("error: {}", edgewatch::logging::chain(&e));
            ExitCode::from(2)
        }
        Err(Failure::Mismatch) => ExitCode::from(1),
    }
}

/// Commands whose file has a `log.level` (the agent and the aggregator).
fn has_log_level(command: &Command) -> bool {
    match command {
        Command::Agent { .. } => true,
        #[cfg(feature = "cloud")]
        Command::Aggregator { .. } => true,
        _ => false,
    }
}

/// Daemons log at info; interactive commands keep stderr for warnings.
fn is_daemon(command: &Command) -> bool {
    match command {
        Command::Agent { .. } => true,
        #[cfg(feature = "cloud")]
        Command::Aggregator { .. } | Command::Simulate { .. } => true,
        _ => false,
    }
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(runtime)
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Agent { config } => {
            let cfg: edgewatch_agent::AgentConfig = config::load(&config)?;
            check_log_level(&cfg, &config).map_err(|e| Failure::Usage(anyhow::anyhow!(e.error)))?;
            let text = std::fs::read_to_string(&config).map_err(|e| {
                Failure::Usage(anyhow::anyhow!(
                    "{}: cannot read the file: {e}",
                    config.display()
                ))
            })?;
            let parser = agent_parser(config.clone());
            let (cfg, overlay) = edgewatch_agent::control::effective_at_start(cfg, &text, &parser);
            if let Some(level) = &cfg.log.level {
                edgewatch::logging::set_level(level);
            }
            let agent = edgewatch_agent::Agent::new(cfg)
                .map_err(runtime)?
                .with_log_level(std::sync::Arc::new(|l: &str| {
                    edgewatch::logging::set_level(l)
                }));
            tokio_runtime()?.block_on(async {
                let stop = edgewatch::shutdown::on_signal_or_deadline(None);
                let agent = agent.with_reload(parser, text, overlay);
                let reloader = agent.reloader();
                edgewatch::shutdown::on_hangup(move || {
                    let text = std::fs::read_to_string(&config)
                        .map_err(|e| format!("{}: cannot read the file: {e}", config.display()));
                    if !reloader.reload_file(text) {
                        tracing::warn!("reload not queued: earlier reloads are still waiting");
                    }
                });
                edgewatch::systemd::notify("READY=1");
                edgewatch::systemd::spawn_watchdog();
                let result = agent.run(async move { stop.cancelled().await }).await;
                edgewatch::systemd::notify("STOPPING=1");
                result.map_err(runtime)
            })
        }
        #[cfg(feature = "cloud")]
        Command::Aggregator { config } => {
            let cfg: edgewatch_aggregator::AggregatorConfig = config::load(&config)?;
            if let Some(level) = &cfg.log.level {
                edgewatch::logging::check_level(level).map_err(|e| {
                    Failure::Usage(anyhow::anyhow!("{}: log.level: {e}", config.display()))
                })?;
                edgewatch::logging::set_level(level);
            }
            tokio_runtime()?.block_on(async {
                let stop = edgewatch::shutdown::on_signal_or_deadline(None);
                // Caught from before the bind: the HTTP API answers from there on, and a SIGHUP
                // sent once it does must reload, not end the process.
                let hangups = edgewatch::shutdown::hangups();
                let agg = edgewatch_aggregator::Aggregator::bind(cfg)
                    .await
                    .map_err(runtime)?;
                hangups.serve(aggregator_reload(config.clone(), agg.reloader()));
                println!("{}", agg.feed_url());
                edgewatch::systemd::notify("READY=1");
                edgewatch::systemd::spawn_watchdog();
                let result = agg.run(async move { stop.cancelled().await }).await;
                edgewatch::systemd::notify("STOPPING=1");
                result.map_err(runtime)
            })
        }
        #[cfg(feature = "cloud")]
        Command::Simulate { config } => {
            let cfg: edgewatch_simulators::SimulatorConfig = config::load(&config)?;
            tokio_runtime()?.block_on(async {
                let stop = edgewatch::shutdown::on_signal_or_deadline(None);
                let report = edgewatch_simulators::run(cfg, async move { stop.cancelled().await })
                    .await
                    .map_err(Failure::Runtime)?;
                println!(
                    "published {} readings in {} steps, {} labelled anomalies",
                    report.published,
                    report.steps,
                    report.labels.len()
                );
                Ok(())
            })
        }
        #[cfg(feature = "embedded-broker")]
        Command::Demo {
            config,
            duration,
            broker_port,
            http_port,
        } => {
            let cfg: edgewatch::demo::DemoConfig = match config {
                Some(path) => config::load(&path)?,
                None => edgewatch::demo::DemoConfig::default(),
            };
            let overrides = edgewatch::demo::DemoOverrides {
                duration: duration.map(std::time::Duration::from_secs),
                broker_port,
                http_port,
            };
            tokio_runtime()?
                .block_on(edgewatch::demo::run(
                    cfg,
                    overrides,
                    edgewatch::shutdown::on_signal_or_deadline,
                ))
                .map_err(Failure::Runtime)
        }
        Command::Tail(args) => tokio_runtime()?
            .block_on(async {
                let stop = edgewatch::shutdown::on_signal_or_deadline(None);
                edgewatch::tail::run(args, stop).await
            })
            .map_err(Failure::Runtime),
        #[cfg(feature = "embedded-broker")]
        Command::Bench(args) => edgewatch::bench::run(args).map_err(Failure::Runtime),
        Command::Config(ConfigCommand::Check { files, kind }) => check(&files, kind),
        #[cfg(feature = "cloud")]
        Command::Cluster(ClusterCommand::Status { config, json, wait }) => {
            let cfg: edgewatch_aggregator::AggregatorConfig = config::load(&config)?;
            let Some(cluster) = &cfg.cluster else {
                return Err(Failure::Usage(anyhow::anyhow!(
                    "{}: has no cluster: section; give the configuration of an aggregator in cluster mode",
                    config.display()
                )));
            };
            let wait = std::time::Duration::from_secs(wait);
            let status = tokio_runtime()?
                .block_on(edgewatch_aggregator::cluster::status::read(
                    cluster,
                    &cfg.prefix,
                    cfg.partitions,
                    wait,
                    std::time::Duration::from_secs(5),
                    |error| {
                        eprintln!("cluster status: the cluster did not answer ({error}): a JetStream leader election in progress, or a server down? retrying for up to {}s", wait.as_secs());
                    },
                ))
                .map_err(|u| {
                    Failure::Runtime(anyhow::anyhow!(
                        "cannot read the cluster after {:.0}s: {} (are the nats servers up, and has an aggregator of prefix {} started once?)",
                        u.tried.as_secs_f64(),
                        u.error,
                        cfg.prefix
                    ))
                })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).map_err(runtime)?
                );
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        #[cfg(feature = "cloud")]
        Command::Eval(EvalCommand::Nab(args)) => {
            // An unknown detector name is a usage error (exit 1), not a runtime failure.
            edgewatch::eval::ScoreSource::from_name(args.detector.as_deref())
                .map_err(Failure::Usage)?;
            edgewatch::eval::run_nab(args).map_err(Failure::Runtime)
        }
        #[cfg(feature = "cloud")]
        Command::Models(cmd) => models(cmd),
        #[cfg(feature = "cloud")]
        Command::Agents(args) => {
            let token =
                edgewatch::models::token(args.token, args.token_env).map_err(Failure::Usage)?;
            let doc = tokio_runtime()?
                .block_on(edgewatch::agents::fetch_all(
                    &args.aggregator,
                    token.as_deref(),
                ))
                .map_err(Failure::Runtime)?;
            if args.json {
                println!("{doc:#}");
            } else {
                print!("{}", edgewatch::agents::table(&doc));
            }
            Ok(())
        }
        #[cfg(feature = "cloud")]
        Command::Eval(EvalCommand::Sim(args)) => {
            edgewatch::eval::sim::run_sim(args).map_err(Failure::Runtime)
        }
        #[cfg(feature = "cloud")]
        Command::Eval(EvalCommand::Csv(args)) => {
            edgewatch::eval::csv::detector_config(args.detector.as_deref())
                .map_err(Failure::Usage)?;
            edgewatch::eval::run_csv(args).map_err(Failure::Runtime)
        }
        #[cfg(feature = "cloud")]
        // Bad arguments and unreadable inputs exit 2 here (like clap's own usage errors), because
        // 1 means "mismatches found" to scripts checking delivery.
        Command::Verify(args) => match tokio_runtime()?.block_on(edgewatch::verify::run(args)) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Failure::Mismatch),
            Err(e) => Err(Failure::Runtime(e)),
        },
    }
}

/// The agent's loader of reloads and remote configuration: the same checks as `config check`
/// (file, key path, line and column), the remote overlay laid over the file's text.
fn agent_parser(file: PathBuf) -> edgewatch_agent::ConfigParser {
    use edgewatch_models::agent_status::ConfigRefusal;
    std::sync::Arc::new(move |base: &str, overlay: Option<&str>| {
        let parsed = match overlay {
            None => config::parse::<edgewatch_agent::AgentConfig>(base, &file),
            Some(o) => config::parse_overlay(base, &file, o, Path::new("remote config")),
        };
        let cfg = parsed.map_err(|e| ConfigRefusal {
            error: e.to_string(),
            line: e.problems.iter().find_map(|p| p.location).map(|l| l.0),
        })?;
        check_log_level(&cfg, &file)?;
        Ok(cfg)
    })
}

/// `log.level` must be a filter `tracing` understands (the agent's own checks cannot tell).
fn check_log_level(
    cfg: &edgewatch_agent::AgentConfig,
    file: &Path,
) -> Result<(), edgewatch_models::agent_status::ConfigRefusal> {
    match &cfg.log.level {
        Some(level) => edgewatch::logging::check_level(level).map_err(|e| {
            edgewatch_models::agent_status::ConfigRefusal {
                error: format!("{}: log.level: {e}", file.display()),
                line: None,
            }
        }),
        None => Ok(()),
    }
}

#[cfg(feature = "cloud")]
/// What SIGHUP does to an aggregator: re-read and validate the file; an invalid one is logged
/// (file, key, line) and the one in force stays; the live keys are applied (see
/// `edgewatch_aggregator::reload`) and those needing a restart are named (the feed's clients,
/// state and partitions are untouched).
fn aggregator_reload(
    path: PathBuf,
    reloader: edgewatch_aggregator::reload::Reloader,
) -> impl FnMut() + Send + 'static {
    move || {
        let new = match config::load::<edgewatch_aggregator::AggregatorConfig>(&path) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, "configuration refused; keeping the one in force");
                return;
            }
        };
        if let Some(level) = &new.log.level {
            if let Err(e) = edgewatch::logging::check_level(level) {
                tracing::error!(file = %path.display(), error = %format!("log.level: {e}"), "configuration refused; keeping the one in force");
                return;
            }
        }
        match reloader.apply(&new) {
            Err(problems) => {
                tracing::error!(file = %path.display(), problems = ?problems, "configuration refused; keeping the one in force")
            }
            Ok(applied) => {
                if applied.live.iter().any(|k| k == "log.level") {
                    edgewatch::logging::set_level(new.log.level.as_deref().unwrap_or("info"));
                }
                if applied.live.is_empty() && applied.restart.is_empty() {
                    tracing::info!(file = %path.display(), "configuration unchanged");
                } else {
                    tracing::info!(file = %path.display(), live = ?applied.live, "configuration applied");
                }
                if !applied.restart.is_empty() {
                    tracing::warn!(file = %path.display(), keys = ?applied.restart, "changed keys take effect only after a restart of the aggregator");
                }
            }
        }
    }
}

fn check(files: &[PathBuf], kind: Option<Kind>) -> Result<(), Failure> {
    let mut failed = 0;
    // Static aggregators checked together: their partitions must be covered exactly once.
    #[cfg(feature = "cloud")]
    let mut aggregators: Vec<(PathBuf, edgewatch_aggregator::AggregatorConfig)> = Vec::new();
    for file in files {
        let Some(kind) = kind.or_else(|| Kind::guess(file)) else {
            eprintln!(
                "{}: cannot tell which component this file configures; pass --kind agent|aggregator|simulator|demo",
                file.display()
            );
            failed += 1;
            continue;
        };
        let result = match kind {
            Kind::Agent => config::load::<edgewatch_agent::AgentConfig>(file).map(|_| ()),
            #[cfg(feature = "cloud")]
            Kind::Aggregator => config::load::<edgewatch_aggregator::AggregatorConfig>(file)
                .map(|c| aggregators.push((file.clone(), c))),
            #[cfg(feature = "cloud")]
            Kind::Simulator => {
                config::load::<edgewatch_simulators::SimulatorConfig>(file).map(|_| ())
            }
            #[cfg(not(feature = "cloud"))]
            Kind::Aggregator | Kind::Simulator => {
                eprintln!(
                    "{}: {kind:?} files need the full build (this is the gateway build: agent, tail and config check of agent files)",
                    file.display()
                );
                failed += 1;
                continue;
            }
            #[cfg(feature = "embedded-broker")]
            Kind::Demo => config::load::<edgewatch::demo::DemoConfig>(file).map(|_| ()),
            #[cfg(not(feature = "embedded-broker"))]
            Kind::Demo => {
                eprintln!(
                    "{}: demo files need the embedded-broker feature",
                    file.display()
                );
                failed += 1;
                continue;
            }
        };
        match result {
            Ok(()) => println!("{}: ok ({kind:?})", file.display()),
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
            }
        }
    }
    #[cfg(feature = "cloud")]
    let coverage_problems = check_coverage(&aggregators);
    #[cfg(not(feature = "cloud"))]
    let coverage_problems: Vec<String> = Vec::new();
    for p in &coverage_problems {
        eprintln!("{p}");
    }
    if !coverage_problems.is_empty() {
        return Err(Failure::Usage(anyhow::anyhow!(
            "the aggregators' partitions are not covered exactly once ({} problems)",
            coverage_problems.len()
        )));
    }
    if failed > 0 {
        return Err(Failure::Usage(anyhow::anyhow!(
            "{failed} of {} files invalid",
            files.len()
        )));
    }
    Ok(())
}

#[cfg(feature = "cloud")]
/// Partition coverage of the static aggregators among the checked files, per uplink prefix: with
/// two or more files of one deployment, a partition nobody owns or two files own is a problem
/// (returned); one file alone owning only some partitions gets a note on stdout (another file may
/// own the rest). Cluster-mode files win partitions by lease and are left out.
fn check_coverage(
    aggregators: &[(PathBuf, edgewatch_aggregator::AggregatorConfig)],
) -> Vec<String> {
    use edgewatch_aggregator::ownership::{ranges, Coverage};
    use std::collections::{BTreeMap, BTreeSet};
    let mut by_prefix: BTreeMap<&str, Vec<(&PathBuf, &edgewatch_aggregator::AggregatorConfig)>> =
        BTreeMap::new();
    for (file, cfg) in aggregators.iter().filter(|(_, c)| c.cluster.is_none()) {
        by_prefix.entry(&cfg.prefix).or_default().push((file, cfg));
    }
    let mut problems = Vec::new();
    for (prefix, group) in by_prefix {
        let partitions = group[0].1.partitions;
        if let Some((file, cfg)) = group.iter().find(|(_, c)| c.partitions != partitions) {
            problems.push(format!(
                "{}: partitions: {} here but {} in {} (prefix {prefix}): every aggregator and agent of a deployment needs the same count",
                file.display(),
                cfg.partitions,
                partitions,
                group[0].0.display()
            ));
            continue;
        }
        let owned: Vec<(String, BTreeSet<u32>)> = group
            .iter()
            .map(|(f, c)| (format!("{} ({})", c.id, f.display()), c.owned_set()))
            .collect();
        let coverage = Coverage::of(partitions, owned.iter().map(|(id, o)| (id.as_str(), o)));
        if group.len() == 1 {
            if !coverage.uncovered.is_empty() {
                println!(
                    "{}: note: partitions {} of 0..{partitions} are owned by another aggregator or by nobody; check the deployment's files together to know",
                    group[0].0.display(),
                    ranges(&coverage.uncovered)
                );
            }
            continue;
        }
        if !coverage.uncovered.is_empty() {
            problems.push(format!(
                "prefix {prefix}: partitions {} (of 0..{partitions}) are owned by none of {}: their devices' summaries are never applied or acknowledged",
                ranges(&coverage.uncovered),
                group.iter().map(|(f, _)| f.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        }
        let mut overlaps: BTreeMap<Vec<String>, Vec<u32>> = BTreeMap::new();
        for (p, ids) in coverage.overlapping {
            overlaps.entry(ids).or_default().push(p);
        }
        for (ids, ps) in overlaps {
            problems.push(format!(
                "prefix {prefix}: partitions {} are owned by {}: each partition needs exactly one owner",
                ranges(&ps),
                ids.join(" and ")
            ));
        }
    }
    problems
}

#[cfg(feature = "cloud")]
/// `edgewatch models ...`: a bad file or configuration exits 1, a broker failure 2.
fn models(cmd: edgewatch::models::ModelsCommand) -> Result<(), Failure> {
    use edgewatch::models::{self as m, ModelsCommand};
    match cmd {
        ModelsCommand::Push {
            file,
            config,
            agent,
        } => {
            let model = m::read(&file).map_err(Failure::Usage)?;
            let target = m::Target::load(&config).map_err(Failure::Usage)?;
            m::check_agent(&agent).map_err(Failure::Usage)?;
            let topic = tokio_runtime()?
                .block_on(m::push(&target, &agent, &model))
                .map_err(Failure::Runtime)?;
            println!(
                "pushed model of {:?} v{} to {topic} (retained)",
                model.key, model.version
            );
        }
        ModelsCommand::Clear {
            device,
            config,
            agent,
        } => {
            let target = m::Target::load(&config).map_err(Failure::Usage)?;
            m::check_agent(&agent).map_err(Failure::Usage)?;
            let topic = tokio_runtime()?
                .block_on(m::clear(&target, &agent, &device))
                .map_err(Failure::Runtime)?;
            println!("cleared the retained model on {topic}");
        }
        ModelsCommand::Show { file } => {
            let model = m::read_unchecked(&file).map_err(Failure::Usage)?;
            print!("{}", m::summary(&model));
        }
        ModelsCommand::List {
            aggregator,
            token,
            token_env,
            json,
        } => {
            let token = m::token(token, token_env).map_err(Failure::Usage)?;
            let doc = tokio_runtime()?
                .block_on(m::fetch_list(&aggregator, token.as_deref()))
                .map_err(Failure::Runtime)?;
            if json {
                println!("{doc:#}");
            } else {
                print!("{}", m::list_table(&doc));
            }
        }
    }
    Ok(())
}
