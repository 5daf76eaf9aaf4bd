//! `edgewatch tail`: prints the live anomaly feed as readable lines (or raw JSON), reconnecting and
//! resuming with `?since=<last event id>` when the connection drops. Reconnections, the event they
//! resume after, and the server's `gap` markers (events may have been missed) go to stderr; stdout
//! carries events only. The protocol is in docs/feed.md.

use anyhow::{bail, Context};
use clap::Args;
use edgewatch_link::backoff::Backoff;
use edgewatch_models::wire::AnomalyEvent;
use futures_util::StreamExt;
use std::io::Write;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Arguments of `edgewatch tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Feed URL, e.g. ws://127.0.0.1:8080/feed
    pub url: String,
    /// Only events of this device.
    #[arg(long)]
    pub device: Option<String>,
    /// Only events of this metric.
    #[arg(long)]
    pub metric: Option<String>,
    /// Only events scoring at least this (0..1).
    #[arg(long)]
    pub min_score: Option<f64>,
    /// Print each event as its raw JSON object.
    #[arg(long)]
    pub json: bool,
    /// Resume after this event id.
    #[arg(long, conflicts_with = "last")]
    pub since: Option<String>,
    /// Start with up to this many of the most recent events the aggregator holds.
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Exit after printing this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Bearer token, when the aggregator requires one.
    #[arg(long, env = "EDGEWATCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Builds the feed URL with the filters in its query string.
/// `last` applies only while no event has been received (`since` is `None`).
pub fn feed_url(args: &TailArgs, since: Option<&str>) -> anyhow::Result<String> {
    if !(args.url.starts_with("ws://") || args.url.starts_with("wss://")) {
        bail!("feed URL must start with ws:// (got {:?})", args.url);
    }
    if let Some(s) = args.min_score {
        if !(0.0..=1.0).contains(&s) {
            bail!("--min-score must be in [0, 1], got {s}");
        }
    }
    let mut q = Vec::new();
    if let Some(d) = &args.device {
        q.push(format!("device={}", encode(d)));
    }
    if let Some(m) = &args.metric {
        q.push(format!("metric={}", encode(m)));
    }
    if let Some(s) = args.min_score {
        q.push(format!("min_score={s}"));
    }
    match (since, args.last) {
        (Some(s), _) => q.push(format!("since={}", encode(s))),
        (None, Some(n)) => q.push(format!("last={n}")),
        (None, None) => {}
    }
    let sep = if args.url.contains('?') { '&' } else { '?' };
    Ok(if q.is_empty() {
        args.url.clone()
    } else {
        format!("{}{sep}{}", args.url, q.join("&"))
    })
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The WebSocket handshake request, with the bearer token when one is given.
fn request(
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<tokio_tungstenite::tungstenite::handshake::client::Request> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url
        .into_client_request()
        .with_context(|| format!("bad feed URL {url}"))?;
    if let Some(t) = token {
        let value = format!("Bearer {t}")
            .parse()
            .context("the token contains characters not allowed in an HTTP header")?;
        req.headers_mut().insert("authorization", value);
    }
    Ok(req)
}

/// The stderr line for a control message (a JSON object with a `type`); `None` for an event.
pub fn control_note(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let kind = v.get("type")?.as_str()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    Some(match kind {
        "gap" => format!(
            "GAP: events may have been missed after {}: {} ({} events replayed)",
            s("since"),
            s("reason"),
            v.get("replayed").and_then(|x| x.as_u64()).unwrap_or(0)
        ),
        other => format!("feed control message {other:?}: {text}"),
    })
}

/// One readable line for an event.
pub fn format_event(e: &AnomalyEvent) -> String {
    format!(
        "{}  {:<16} {:<12} value={:<12.4} score={:.3}  {}  agent={}  id={}",
        format_ts(e.ts_ms),
        e.device,
        e.metric,
        e.value,
        e.score,
        e.detector,
        e.agent,
        e.id
    )
}

/// `YYYY-MM-DD HH:MM:SS.mmm` (UTC) for ms since the Unix epoch.
pub fn format_ts(ts_ms: i64) -> String {
    let days = ts_ms.div_euclid(86_400_000);
    let ms_of_day = ts_ms.rem_euclid(86_400_000);
    // Civil-from-days (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

/// Runs `edgewatch tail` until the count is reached, `stop` is cancelled (the binary cancels it on
/// Ctrl-C or SIGTERM), or the server is gone for good.
pub async fn run(args: TailArgs, stop: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    let mut since = args.since.clone();
    let mut printed = 0u64;
    let mut connected_once = false;
    let mut backoff = Backoff::new(200, 5_000, u64::from(std::process::id()));
    let stdout = std::io::stdout();
    loop {
        // `--last` once: a reconnection before any event must not replay those again.
        let url = if connected_once && args.last.is_some() {
            feed_url(
                &TailArgs {
                    last: None,
                    ..args.clone()
                },
                since.as_deref(),
            )?
        } else {
            feed_url(&args, since.as_deref())?
        };
        let ws = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = tokio_tungstenite::connect_async(request(&url, args.token.as_deref())?) => r,
        };
        let (ws, _) = match ws {
            Ok(c) => c,
            Err(e) if !connected_once => {
                return Err(e).with_context(|| format!("cannot connect to the feed at {url}"));
            }
            Err(e) => {
                let delay = backoff.next_delay_ms();
                eprintln!("feed connection failed ({e}); retrying in {delay} ms");
                tokio::time::sleep(Duration::from_millis(delay)).await;
                continue;
            }
        };
        if connected_once {
            match &since {
                Some(id) => eprintln!("feed reconnected: resuming after event {id}"),
                None => eprintln!(
                    "feed reconnected: no event received yet, so nothing to resume from; events published while disconnected are not replayed"
                ),
            }
        }
        connected_once = true;
        backoff.reset();
        let (_sink, mut stream) = ws.split();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                m = stream.next() => m,
            };
            match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Some(note) = control_note(&text) {
                        eprintln!("{note}");
                        continue;
                    }
                    let line = if args.json {
                        text.to_string()
                    } else {
                        match serde_json::from_str::<AnomalyEvent>(&text) {
                            Ok(e) => format_event(&e),
                            Err(e) => format!("(unreadable event: {e}) {text}"),
                        }
                    };
                    if let Ok(e) = serde_json::from_str::<serde_json::Value>(&text) {
                        if let Some(id) = e.get("id").and_then(|v| v.as_str()) {
                            since = Some(id.to_string());
                        }
                    }
                    let mut out = stdout.lock();
                    writeln!(out, "{line}")?;
                    out.flush()?;
                    printed += 1;
                    if args.count.is_some_and(|c| printed >= c) {
                        return Ok(());
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    eprintln!("feed closed by server: {reason}; reconnecting");
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    eprintln!("feed connection lost: {e}; reconnecting");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(backoff.next_delay_ms())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_utc() {
        assert_eq!(format_ts(0), "1970-01-01 00:00:00.000");
        assert_eq!(format_ts(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(format_ts(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn filters_go_into_the_query_string_encoded() {
        let args = TailArgs {
            url: "ws://h:1/feed".into(),
            device: Some("pump 7/a".into()),
            metric: None,
            min_score: Some(0.5),
            json: false,
            since: None,
            last: Some(5),
            count: None,
            token: None,
        };
        assert_eq!(
            feed_url(&args, None).unwrap(),
            "ws://h:1/feed?device=pump%207%2Fa&min_score=0.5&last=5",
            "last only until an event has been received"
        );
        assert_eq!(
            feed_url(&args, Some("ab")).unwrap(),
            "ws://h:1/feed?device=pump%207%2Fa&min_score=0.5&since=ab"
        );
        let bad = TailArgs {
            url: "http://h".into(),
            ..args
        };
        assert!(feed_url(&bad, None).is_err());
    }

    #[test]
    fn gap_markers_are_noted_and_events_are_not() {
        let note =
            control_note(r#"{"type":"gap","since":"ab","reason":"unknown event id","replayed":3}"#)
                .unwrap();
        assert_eq!(
            note,
            "GAP: events may have been missed after ab: unknown event id (3 events replayed)"
        );
        assert!(control_note(r#"{"id":"x","device":"d"}"#).is_none());
        assert!(control_note("not json").is_none());
        assert!(control_note(r#"{"type":"hello"}"#)
            .unwrap()
            .contains("hello"));
    }
}
