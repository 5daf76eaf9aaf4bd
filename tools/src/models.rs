//! `edgewatch models`: push a multivariate device model to the agents (published retained, QoS 1, on
//! `{prefix}/models/{key}` of the broker an agent or aggregator configuration names), clear one, and
//! print a model file's summary.

use anyhow::{anyhow, bail, Context as _};
use clap::Subcommand;
use edgewatch_link::MqttLink;
use edgewatch_models::multi::PcaModel;
use edgewatch_models::wire::{model_key, Topics};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet, QoS};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `models` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Publish a model (JSON file) retained on `{prefix}/models/{agent}/{key}`; agents running its
    /// device swap it in. The model is validated first. Exits 1 on a bad file or configuration, 2
    /// when the broker cannot be reached or does not acknowledge the publish.
    Push {
        /// The model, as JSON (a `PcaModel`).
        file: PathBuf,
        /// An aggregator or agent configuration: its broker (`mqtt:`, or the agent's uplink) and
        /// `prefix` are used.
        #[arg(long)]
        config: PathBuf,
        /// The agent (gateway) that runs the device: only it may read the model under the shipped
        /// ACLs. `all` (the default) publishes to every gateway, which then sees the device id.
        #[arg(long, default_value = edgewatch_models::wire::ALL_AGENTS)]
        agent: String,
    },
    /// Remove the retained model of a device from the broker (agents that run it keep it).
    Clear {
        /// The device id.
        device: String,
        /// An aggregator or agent configuration, as for `push`.
        #[arg(long)]
        config: PathBuf,
        /// The agent it was pushed to, as for `push`.
        #[arg(long, default_value = edgewatch_models::wire::ALL_AGENTS)]
        agent: String,
    },
    /// Print a model file's summary: device, key and topic, version, features, components,
    /// training period and size, fit quality, and whether it is valid.
    Show {
        /// The model, as JSON.
        file: PathBuf,
    },
    /// List the models an aggregator holds (`GET /api/models`): the device models it trained
    /// and the fleet's peer models, each with its version, training size, age and fit quality,
    /// then the devices still collecting training data. Exits 2 when the aggregator cannot be
    /// reached or refuses.
    List {
        /// Base URL of the aggregator's HTTP API, e.g. http://127.0.0.1:8080.
        #[arg(long, value_name = "URL")]
        aggregator: String,
        /// Bearer token, when the aggregator requires one.
        #[arg(long, conflicts_with = "token_env")]
        token: Option<String>,
        /// Name of an environment variable holding the bearer token (keeps it out of `ps`).
        #[arg(long, value_name = "VAR")]
        token_env: Option<String>,
        /// Print the aggregator's JSON document as it is.
        #[arg(long)]
        json: bool,
    },
}

/// `GET /api/models` of the aggregator at `url` (`http://host:port[/prefix]`): the JSON document.
pub async fn fetch_list(url: &str, token: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let base = crate::verify::fetch::Base::parse(url).map_err(|e| anyhow!("{e}"))?;
    let body = base
        .get("/api/models", token)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    serde_json::from_slice(&body)
        .with_context(|| format!("{}: not a JSON document", base.url("/api/models")))
}

/// The bearer token of `--token` or of the variable `--token-env` names.
pub fn token(token: Option<String>, token_env: Option<String>) -> anyhow::Result<Option<String>> {
    let t = match (token, token_env) {
        (Some(t), _) => Some(t),
        (None, Some(var)) => Some(std::env::var(&var).map_err(|_| {
            anyhow!("--token-env: environment variable {var} is not set (or not UTF-8)")
        })?),
        (None, None) => None,
    };
    if t.as_deref()
        .is_some_and(|t| t.chars().any(char::is_control))
    {
        bail!("the token contains control characters, which cannot go into an HTTP header");
    }
    Ok(t)
}

/// The table `models list` prints from an `/api/models` document.
pub fn list_table(doc: &serde_json::Value) -> String {
    let mut out = String::new();
    let str_of = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_string()
    };
    let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    let _ = writeln!(
        out,
        "{:<6} {:<24} {:<20} {:<12} {:>14} {:>8} {:>9}  quality",
        "kind", "device / class", "key", "agent", "version", "samples", "age"
    );
    let models = doc
        .get("models")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    for m in &models {
        let kind = str_of(m, "kind");
        let who = if kind == "pca" {
            str_of(m, "device")
        } else {
            str_of(m, "key").trim_start_matches("peer/").to_string()
        };
        let q = m.get("quality").cloned().unwrap_or_default();
        let quality = if kind == "pca" {
            format!(
                "explained {:.3}, alarm rate {:.5}, solver {}{}",
                num(&q, "explained_variance_ratio").unwrap_or(f64::NAN),
                num(&q, "alarm_rate").unwrap_or(f64::NAN),
                str_of(&q, "solver"),
                m.get("class")
                    .and_then(|c| c.as_str())
                    .map(|c| format!(", class model of {c}"))
                    .unwrap_or_default()
            )
        } else {
            format!(
                "{} clusters, {} excluded",
                q.get("clusters")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
                q.get("excluded")
                    .map_or(0, |e| e.as_array().map_or(0, Vec::len))
            )
        };
        let age = num(m, "age_s").map_or("-".into(), |a| format!("{a:.0} s"));
        let _ = writeln!(
            out,
            "{:<6} {:<24} {:<20} {:<12} {:>14} {:>8} {:>9}  {quality}",
            kind,
            who,
            str_of(m, "key"),
            str_of(m, "agent"),
            m.get("version")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            m.get("samples")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            age,
        );
    }
    if models.is_empty() {
        let _ = writeln!(out, "(no models yet)");
    }
    match doc.get("training") {
        Some(serde_json::Value::Array(waiting)) if !waiting.is_empty() => {
            let _ = writeln!(
                out,
                "\ncollecting training data ({} devices without a model):",
                waiting.len()
            );
            for w in waiting {
                let _ = writeln!(
                    out,
                    "  {:<24} agent {:<12} {} rows in {} samples, {} excluded",
                    str_of(w, "device"),
                    str_of(w, "agent"),
                    w.get("rows")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0),
                    w.get("samples")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0),
                    w.get("excluded")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0),
                );
            }
        }
        Some(serde_json::Value::Null) | None => {
            let _ = writeln!(
                out,
                "\n(training is off on this aggregator: training.enabled)"
            );
        }
        _ => {}
    }
    out
}

/// Where models are published: a broker and a topic prefix.
#[derive(Debug, Clone)]
pub struct Target {
    /// The broker.
    pub link: MqttLink,
    /// Uplink topic prefix.
    pub prefix: String,
}

impl Target {
    /// The broker and prefix of an aggregator or agent configuration. A file whose name contains
    /// `agent` is read as an agent's, one whose name contains `aggregator` as an aggregator's;
    /// otherwise an aggregator's, then an agent's.
    pub fn load(path: &Path) -> anyhow::Result<Target> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let as_aggregator = |path: &Path| -> anyhow::Result<Target> {
            let c: edgewatch_aggregator::AggregatorConfig = crate::config::load(path)?;
            Ok(Target {
                link: c.mqtt,
                prefix: c.prefix,
            })
        };
        let as_agent = |path: &Path| -> anyhow::Result<Target> {
            let c: edgewatch_agent::AgentConfig = crate::config::load(path)?;
            Ok(Target {
                link: c.uplink_link().clone(),
                prefix: c.uplink.prefix,
            })
        };
        if name.contains("aggregator") {
            as_aggregator(path)
        } else if name.contains("agent") {
            as_agent(path)
        } else {
            as_aggregator(path).or_else(|a| {
                as_agent(path).map_err(|b| {
                    anyhow!(
                        "{} is neither an aggregator configuration ({a:#}) nor an agent's ({b:#})",
                        path.display()
                    )
                })
            })
        }
    }
}

/// Reads a model file (JSON) and validates it; the error names the file.
pub fn read(path: &Path) -> anyhow::Result<PcaModel> {
    let text = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let model: PcaModel = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a model", path.display()))?;
    model.validate().with_context(|| {
        format!(
            "{}: model {:?} v{}",
            path.display(),
            model.key,
            model.version
        )
    })?;
    Ok(model)
}

/// Publishes `model` retained (QoS 1) on its topic and waits for the broker's PubAck; returns the topic.
pub async fn push(target: &Target, agent: &str, model: &PcaModel) -> anyhow::Result<String> {
    check_agent(agent)?;
    let payload = serde_json::to_vec(model)?;
    let topic = Topics::new(&target.prefix).models(agent, &model_key(&model.key));
    publish_retained(target, &topic, payload).await?;
    Ok(topic)
}

/// Clears the retained model of `device` (an empty retained publish); returns the topic.
pub async fn clear(target: &Target, agent: &str, device: &str) -> anyhow::Result<String> {
    check_agent(agent)?;
    let topic = Topics::new(&target.prefix).models(agent, &model_key(device));
    publish_retained(target, &topic, Vec::new()).await?;
    Ok(topic)
}

/// An agent id (or `all`) that can be a topic level; the error names the flag.
pub fn check_agent(agent: &str) -> anyhow::Result<()> {
    if edgewatch_models::wire::is_valid_node_id(agent) {
        Ok(())
    } else {
        anyhow::bail!("--agent: {agent:?} is not an agent id ([A-Za-z0-9_-]{{1,64}})")
    }
}

async fn publish_retained(target: &Target, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
    let broker = target.link.primary();
    let opts = edgewatch_link::options(
        &target.link,
        format!("edgewatch-models-{}", std::process::id()),
    )?;
    let first = opts
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no broker address in the configuration"))?;
    let (client, mut eventloop) = AsyncClient::new(first, 10);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .with_context(|| format!("publish on {topic}"))?;
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) if c.code != ConnectReturnCode::Success => {
                    bail!(edgewatch_link::refusal_message(&broker, c.code as u8))
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => bail!(edgewatch_link::describe(&broker, &e)),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("{broker} did not acknowledge the publish on {topic} within 10 s"))?;
    acked?;
    // Best effort: the publish is acknowledged, a lost Disconnect changes nothing.
    if client.disconnect().await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
    }
    Ok(())
}

/// A model's summary, several lines, for `models show`.
pub fn summary(model: &PcaModel) -> String {
    let mut out = String::new();
    let key = model_key(&model.key);
    let _ = writeln!(out, "device          {}", model.key);
    let _ = writeln!(
        out,
        "key             {key} (topic {{prefix}}/models/{{agent or all}}/{key})"
    );
    let _ = writeln!(out, "kind            {} v{}", model.kind, model.version);
    let _ = writeln!(out, "features        {}", model.features.join(", "));
    let _ = writeln!(
        out,
        "components      {} of {} (eigenvalues {})",
        model.components.len(),
        model.features.len(),
        model
            .eigenvalues
            .iter()
            .map(|l| format!("{l:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let span_s = (model.trained_to_ms - model.trained_from_ms) as f64 / 1000.0;
    let _ = writeln!(
        out,
        "trained on      {} vectors, event time {} .. {} ms ({span_s:.0} s)",
        model.samples, model.trained_from_ms, model.trained_to_ms
    );
    let q = &model.quality;
    let _ = writeln!(
        out,
        "fit quality     explained variance {:.3}, median score {:.3}, p99 score {:.3}, training alarm rate {:.5}, skipped rows {}, solver {}",
        q.explained_variance_ratio, q.median_score, q.p99_score, q.alarm_rate, q.skipped_rows, q.solver
    );
    if !q.constant_features.is_empty() {
        let _ = writeln!(out, "constant        {}", q.constant_features.join(", "));
    }
    let _ = writeln!(out, "linfa           {}", model.linfa_version);
    let _ = match model.validate() {
        Ok(()) => writeln!(out, "valid           yes"),
        Err(e) => writeln!(out, "valid           no: {e}"),
    };
    out
}

/// Reads a model file without validating it (`show` prints what is wrong instead of refusing).
pub fn read_unchecked(path: &Path) -> anyhow::Result<PcaModel> {
    let text = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{}: not a model", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewatch_models::multi::FitOptions;

    fn model() -> PcaModel {
        let rows: Vec<f64> = (0..200)
            .flat_map(|i| {
                let x = (i as f64 / 7.0).sin();
                [x, 2.0 * x + 0.01 * (i as f64 * 1.7).sin(), (i % 5) as f64]
            })
            .collect();
        let features = vec!["flow".into(), "current".into(), "temp".into()];
        PcaModel::fit(
            "pump-7",
            features,
            &rows,
            0,
            200_000,
            &FitOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn files_are_read_validated_and_summarised() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        let m = model();
        std::fs::write(&good, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        assert_eq!(read(&good).unwrap(), m);
        let text = summary(&m);
        for want in [
            "device          pump-7",
            &model_key("pump-7"),
            "pca v1",
            "flow, current, temp",
            "200 vectors",
            "valid           yes",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        let mut bad = m.clone();
        bad.eigenvalues[0] = -1.0;
        let bad_path = dir.path().join("bad.json");
        std::fs::write(&bad_path, serde_json::to_vec(&bad).unwrap()).unwrap();
        let e = format!("{:#}", read(&bad_path).unwrap_err());
        assert!(e.contains("bad.json") && e.contains("eigenvalues"), "{e}");
        assert!(summary(&read_unchecked(&bad_path).unwrap()).contains("valid           no"));
        let junk = dir.path().join("junk.json");
        std::fs::write(&junk, b"[1,2").unwrap();
        let e = format!("{:#}", read(&junk).unwrap_err());
        assert!(e.contains("junk.json: not a model"), "{e}");
        let e = format!("{:#}", read(&dir.path().join("none.json")).unwrap_err());
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn targets_come_from_aggregator_or_agent_configs() {
        let dir = tempfile::tempdir().unwrap();
        let agg = dir.path().join("aggregator-1.yaml");
        std::fs::write(
            &agg,
            "id: agg-1\nmqtt: { host: 10.0.0.1, port: 1884 }\nprefix: plant/v1\n",
        )
        .unwrap();
        let t = Target::load(&agg).unwrap();
        assert_eq!((t.link.host.as_str(), t.link.port), ("10.0.0.1", 1884));
        assert_eq!(t.prefix, "plant/v1");
        let agent = dir.path().join("gw.yaml");
        std::fs::write(
            &agent,
            "id: gw-1\nsource: { mqtt: { host: 10.0.0.2 } }\nuplink: { mqtt: { host: 10.0.0.3, port: 1885 } }\n",
        )
        .unwrap();
        let t = Target::load(&agent).unwrap();
        assert_eq!((t.link.host.as_str(), t.link.port), ("10.0.0.3", 1885));
        assert_eq!(t.prefix, "edgewatch/v1");
        let neither = dir.path().join("x.yaml");
        std::fs::write(&neither, "nonsense: 1\n").unwrap();
        let e = format!("{:#}", Target::load(&neither).unwrap_err());
        assert!(e.contains("neither"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_an_error_naming_it() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Target {
            link: MqttLink {
                host: "127.0.0.1".into(),
                port,
                ..MqttLink::default()
            },
            prefix: "edgewatch/v1".into(),
        };
        let e = format!("{:#}", push(&t, "gw-1", &model()).await.unwrap_err());
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}
