//! What the bench reads from the aggregators' HTTP API through the tools' client
//! ([`crate::http`]): owned partitions, `/metrics` counters summed over a deployment, and a status
//! digest for error messages.

use super::process::AggProc;
use crate::http::Get;
use anyhow::{bail, Context};
use std::net::SocketAddr;

/// The partitions an aggregator owns, per its `/api/status`.
pub(super) async fn owned(http: SocketAddr) -> anyhow::Result<Vec<u32>> {
    let v = get_json(http, "/api/status").await?;
    v["owned"]
        .as_array()
        .context("/api/status has no owned list")?
        .iter()
        .map(|p| {
            p.as_u64()
                .map(|p| p as u32)
                .context("a partition is not a number")
        })
        .collect()
}

/// Counters scraped from every aggregator's `/metrics` (without the `edgewatch_aggregator_`
/// prefix), in the order of [`scrape_all`]'s result.
pub(super) const COUNTERS: [&str; 10] = [
    "checkpoints_total",
    "checkpoint_bytes_total",
    "summaries_applied_total",
    "summaries_received_total",
    "summaries_duplicate_total",
    "misrouted_total",
    "bad_messages_total",
    "checkpoint_errors_total",
    "partitions_lost_total",
    "connection_errors_total",
];

/// The [`COUNTERS`] of every aggregator, summed.
pub(super) async fn scrape_all(aggs: &[AggProc]) -> anyhow::Result<[u64; COUNTERS.len()]> {
    let mut out = [0u64; COUNTERS.len()];
    for a in aggs {
        let (status, body) = http_get(a.http, "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics of {}: HTTP {status}", a.id);
        }
        for (i, short) in COUNTERS.iter().enumerate() {
            let name = format!("edgewatch_aggregator_{short}");
            out[i] += body
                .lines()
                .find(|l| {
                    l.strip_prefix(name.as_str())
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("{name} not in /metrics of {}", a.id))?
                as u64;
        }
    }
    Ok(out)
}

/// What the aggregators say about ownership and lanes, for an error message.
pub(super) async fn diagnose(aggs: &[AggProc]) -> String {
    let mut out = Vec::new();
    for a in aggs {
        let line = match get_json(a.http, "/api/status").await {
            Ok(v) => {
                let behind: Vec<String> = v["lane_progress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|l| l["waiting"].as_u64().unwrap_or(0) > 0)
                    .take(5)
                    .map(|l| l.to_string())
                    .collect();
                format!(
                    "{}: owns {} partitions, applied {}, duplicates {}, bad messages {}, lanes waiting behind a hole (first 5): {behind:?}",
                    a.id,
                    v["owned"].as_array().map_or(0, Vec::len),
                    v["summaries_applied"],
                    v["summaries_duplicate"],
                    v["bad_messages"],
                )
            }
            Err(e) => format!("{}: /api/status failed: {e:#}", a.id),
        };
        out.push(line);
    }
    out.join("\n")
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub(super) async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let target = addr.to_string();
    let r = Get::new(&target, path)
        .send()
        .await
        .with_context(|| format!("GET http://{addr}{path}"))?;
    Ok((r.status, r.text()))
}

/// A GET whose 200 answer is JSON.
pub(super) async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http_get(addr, path).await?;
    if status != 200 {
        bail!("GET http://{addr}{path}: HTTP {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET http://{addr}{path}: not JSON"))
}
