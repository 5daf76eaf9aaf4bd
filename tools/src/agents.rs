//! `edgewatch agents`: the fleet's agents as any aggregator knows them from their status messages
//! (`GET /api/agents`, read page by page), printed as a table or as JSON.

use anyhow::{anyhow, Context as _};
use serde_json::Value;
use std::fmt::Write as _;

/// Arguments of `edgewatch agents`.
#[derive(Debug, clap::Args)]
pub struct AgentsArgs {
    /// Base URL of any aggregator's HTTP API, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    pub aggregator: String,
    /// Bearer token, when the aggregator requires one.
    #[arg(long, conflicts_with = "token_env")]
    pub token: Option<String>,
    /// Name of an environment variable holding the bearer token (keeps it out of `ps`).
    #[arg(long, value_name = "VAR")]
    pub token_env: Option<String>,
    /// Print one JSON document (`{"total", "agents": [...]}`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Page size used to read the whole list.
const PAGE: usize = 1_000;

/// Every agent the aggregator at `url` knows: `{"total": n, "agents": [...]}`.
pub async fn fetch_all(url: &str, token: Option<&str>) -> anyhow::Result<Value> {
    let base = crate::verify::fetch::Base::parse(url).map_err(|e| anyhow!("{e}"))?;
    let mut agents = Vec::new();
    loop {
        let path = format!("/api/agents?offset={}&limit={PAGE}", agents.len());
        let body = base.get(&path, token).await.map_err(|e| anyhow!("{e}"))?;
        let doc: Value = serde_json::from_slice(&body)
            .with_context(|| format!("{}: not a JSON document", base.url(&path)))?;
        let page = doc["agents"]
            .as_array()
            .ok_or_else(|| anyhow!("{}: no \"agents\" list", base.url(&path)))?;
        let total = doc["total"].as_u64().unwrap_or(0) as usize;
        let n = page.len();
        agents.extend(page.iter().cloned());
        // Agents come and go between pages: stop at an empty or short page.
        if n < PAGE || agents.len() >= total {
            return Ok(serde_json::json!({"total": agents.len(), "agents": agents}));
        }
    }
}

/// The table `edgewatch agents` prints.
pub fn table(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<8} {:>8} {:<10} {:<16} {:>8} {:>10} {:>12} {:>10}  LAST ERROR / CONFIG",
        "AGENT", "STATE", "AGE", "VERSION", "CONFIG", "SERIES", "READINGS/S", "OUTBOX", "UNACKED",
    );
    let none = Vec::new();
    for a in doc["agents"].as_array().unwrap_or(&none) {
        let s = |k: &str| a[k].as_str().unwrap_or("-").to_string();
        let n = |k: &str| a[k].as_u64().map_or("-".into(), |v| v.to_string());
        let state = if a["online"] != Value::Bool(true) {
            "offline"
        } else if a["stale"] == Value::Bool(true) {
            "stale"
        } else {
            "online"
        };
        let rate = a["readings_per_s"]
            .as_f64()
            .map_or("-".into(), |r| format!("{r:.1}"));
        let unacked = a["oldest_unacked_age_ms"]
            .as_u64()
            .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let mut note = s("last_error");
        if let Some(r) = a["config"]["refused"]["error"].as_str() {
            note = format!("config refused: {r}");
        } else if let Some(keys) = a["config"]["restart_needed"].as_array() {
            if !keys.is_empty() {
                let keys: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
                note = format!("restart needed for {}", keys.join(", "));
            }
        }
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:>8} {:<10} {:<16} {:>8} {:>10} {:>12} {:>10}  {}",
            s("agent"),
            state,
            age(a["age_ms"].as_u64()),
            s("version"),
            s("config_digest"),
            n("series"),
            rate,
            n("outbox_bytes"),
            unacked,
            // One line per agent, whatever the agent wrote.
            note.replace(['\n', '\r'], " ")
        );
    }
    let _ = writeln!(out, "{} agents", doc["total"].as_u64().unwrap_or(0));
    out
}

fn age(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 60_000 => format!("{}s", ms / 1000),
        Some(ms) if ms < 3_600_000 => format!("{}m", ms / 60_000),
        Some(ms) => format!("{}h", ms / 3_600_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_shows_state_age_rates_and_why_a_config_was_refused() {
        let doc = json!({"total": 2, "agents": [
            {"agent": "gw-1", "online": true, "stale": false, "age_ms": 2_500, "version": "0.1.0",
             "config_digest": "00000000000000ab", "series": 12, "readings_per_s": 40.04,
             "outbox_bytes": 2048, "oldest_unacked_age_ms": 1500,
             "config": {"refused": {"error": "remote config: anomaly.threshold (line 2, col 3): bad\nx", "line": 2}}},
            {"agent": "gw-2", "online": false, "age_ms": 7_200_000},
        ]});
        let t = table(&doc);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].starts_with("gw-1"), "{t}");
        assert!(lines[1].contains(" online "), "{t}");
        assert!(lines[1].contains("40.0"), "{t}");
        assert!(lines[1].contains("1.5s"), "{t}");
        assert!(
            lines[1].contains(
                "config refused: remote config: anomaly.threshold (line 2, col 3): bad x"
            ),
            "{t}"
        );
        assert!(
            lines[2].contains(" offline ") && lines[2].contains(" 2h "),
            "{t}"
        );
        assert_eq!(lines[3], "2 agents");
    }
}
