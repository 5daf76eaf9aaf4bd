//! The operator's dashboard: three pages (`/` the fleet, `/live` the feed, `/device?id=` one
//! device), their scripts and style under `/assets/`, all built into the binary (no CDN, no build
//! step, no third-party script), and `GET /api/anomalies/rate`, the fleet page's anomaly-rate
//! chart, counted from the feed's recent history.
//!
//! Pages and assets hold no data, so they need no token: the scripts call the API with the
//! token the operator types (kept in the tab's `sessionStorage`, never in a URL). Every answer
//! carries an `ETag` and `Cache-Control: no-cache`, so a browser revalidates (a `304`) and picks
//! up a new binary's pages at once. Deliberately not here: the API the pages read (`http.rs`).

use super::{json_response, query_param, text, Server};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use std::sync::atomic::Ordering::Relaxed;

/// One file served from the binary.
struct Asset {
    path: &'static str,
    body: &'static str,
    content_type: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Everything the pages need. A page's scripts and style are same-origin files, which lets the
/// pages forbid inline script entirely (`Content-Security-Policy` below).
const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        body: include_str!("../dashboard/fleet.html"),
        content_type: HTML,
    },
    Asset {
        path: "/live",
        body: include_str!("../dashboard/live.html"),
        content_type: HTML,
    },
    Asset {
        path: "/device",
        body: include_str!("../dashboard/device.html"),
        content_type: HTML,
    },
    Asset {
        path: "/assets/style.css",
        body: include_str!("../dashboard/style.css"),
        content_type: CSS,
    },
    Asset {
        path: "/assets/common.js",
        body: include_str!("../dashboard/common.js"),
        content_type: JS,
    },
    Asset {
        path: "/assets/chart.js",
        body: include_str!("../dashboard/chart.js"),
        content_type: JS,
    },
    Asset {
        path: "/assets/fleet.js",
        body: include_str!("../dashboard/fleet.js"),
        content_type: JS,
    },
    Asset {
        path: "/assets/live.js",
        body: include_str!("../dashboard/live.js"),
        content_type: JS,
    },
    Asset {
        path: "/assets/device.js",
        body: include_str!("../dashboard/device.js"),
        content_type: JS,
    },
];

/// Own scripts and styles only; the feed's WebSocket is same-origin (`'self'` covers `ws:`).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Path of the anomaly-rate API.
const RATE_PATH: &str = "/api/anomalies/rate";

/// The answer for `path` if it is a page, an asset or the rate API; `None` lets `http.rs` route it.
pub(super) fn route(
    server: &Server,
    req: &Request<Incoming>,
    path: &str,
) -> Option<Response<Full<Bytes>>> {
    if path == RATE_PATH {
        if let Err(refusal) = server.authorize(req, path) {
            server
                .shared
                .metrics
                .http_unauthorized_total
                .fetch_add(1, Relaxed);
            let mut resp = text(StatusCode::UNAUTHORIZED, &refusal);
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return Some(resp);
        }
        return Some(rate_response(server, req.uri().query()));
    }
    let asset = ASSETS.iter().find(|a| a.path == path)?;
    let etag = format!(
        "\"{:016x}\"",
        xxhash_rust::xxh3::xxh3_64(asset.body.as_bytes())
    );
    let fresh = req
        .headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let builder = Response::builder()
        .header(CACHE_CONTROL, "no-cache")
        .header(ETAG, &etag)
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer");
    let resp = if fresh {
        builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Full::new(Bytes::new()))
    } else {
        let builder = builder.header(CONTENT_TYPE, asset.content_type);
        let builder = if asset.content_type == HTML {
            builder.header("content-security-policy", CSP)
        } else {
            builder
        };
        builder.body(Full::new(Bytes::from_static(asset.body.as_bytes())))
    };
    Some(resp.unwrap_or_default())
}

/// `GET /api/anomalies/rate?bucket_ms=&buckets=`: the feed history's events per time bucket.
fn rate_response(server: &Server, query: Option<&str>) -> Response<Full<Bytes>> {
    let params = match RateParams::parse(query) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{RATE_PATH}: {e}\n")),
    };
    // The hub's whole history (shared events, no copies); the receiver that comes with it is
    // dropped at once.
    let (held, _, _) = server.shared.feed.subscribe(None, Some(usize::MAX));
    let now = crate::fleet::run::now_ms();
    let rate = Rate::count(
        held.iter().map(|i| (i.event.ts_ms, i.event.score)),
        now,
        &params,
    );
    let mut v = serde_json::to_value(&rate).unwrap_or_default();
    v["aggregator"] = server.shared.cfg.id.clone().into();
    json_response(StatusCode::OK, &v)
}

/// The rate query, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RateParams {
    bucket_ms: i64,
    buckets: usize,
}

/// Bounds of the rate query: a bucket of 1 s to 1 day, up to 1440 buckets.
const BUCKET_MS: std::ops::RangeInclusive<i64> = 1_000..=86_400_000;
const BUCKETS: std::ops::RangeInclusive<usize> = 1..=1_440;

/// Events stamped further ahead of this aggregator's clock do not move the chart's end (a
/// forged or badly clocked event cannot push the chart into the next century).
const MAX_AHEAD_MS: i64 = 86_400_000;

impl RateParams {
    fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut p = Self {
            bucket_ms: 60_000,
            buckets: 60,
        };
        for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            let value = query_param(Some(pair), key)?.unwrap_or_default();
            match key {
                "bucket_ms" => {
                    p.bucket_ms = value
                        .parse()
                        .ok()
                        .filter(|v| BUCKET_MS.contains(v))
                        .ok_or_else(|| {
                            format!(
                                "bucket_ms must be a whole number of ms in {}..={}, got {value:?}",
                                BUCKET_MS.start(),
                                BUCKET_MS.end()
                            )
                        })?;
                }
                "buckets" => {
                    p.buckets = value
                        .parse()
                        .ok()
                        .filter(|v| BUCKETS.contains(v))
                        .ok_or_else(|| {
                            format!(
                                "buckets must be a count in {}..={}, got {value:?}",
                                BUCKETS.start(),
                                BUCKETS.end()
                            )
                        })?;
                }
                other => {
                    return Err(format!(
                        "unknown query parameter {other:?} (bucket_ms, buckets)"
                    ))
                }
            }
        }
        Ok(p)
    }
}

/// Anomaly events per bucket of event time, over the events the feed still holds.
#[derive(Debug, Serialize, PartialEq)]
struct Rate {
    bucket_ms: i64,
    /// Start of the first bucket, ms since the epoch.
    start_ms: i64,
    /// End of the last bucket (exclusive): the later of now and the newest event, rounded up to
    /// a whole bucket, so consecutive answers line up.
    end_ms: i64,
    /// Events per bucket, oldest first.
    counts: Vec<u64>,
    /// Highest score per bucket (0 when empty).
    max_score: Vec<f64>,
    /// Events held in the feed's history (its size is `feed.history`): the chart covers no more.
    held: usize,
    /// The oldest held event's time: earlier buckets are not known to be empty.
    oldest_held_ms: Option<i64>,
    /// Held events outside the chart's span.
    outside: usize,
}

impl Rate {
    /// Counts `events` (time, score) into `p.buckets` buckets ending at or after `now_ms`.
    fn count(events: impl Iterator<Item = (i64, f64)>, now_ms: i64, p: &RateParams) -> Self {
        let events: Vec<(i64, f64)> = events.collect();
        let newest = events
            .iter()
            .map(|e| e.0)
            .filter(|t| *t <= now_ms.saturating_add(MAX_AHEAD_MS))
            .max()
            .unwrap_or(now_ms);
        let anchor = now_ms.max(newest);
        let end_ms = (anchor.div_euclid(p.bucket_ms) + 1).saturating_mul(p.bucket_ms);
        let span = p.bucket_ms.saturating_mul(p.buckets as i64);
        let start_ms = end_ms.saturating_sub(span);
        let mut counts = vec![0u64; p.buckets];
        let mut max_score = vec![0f64; p.buckets];
        let mut outside = 0;
        for &(t, score) in &events {
            if t < start_ms || t >= end_ms {
                outside += 1;
                continue;
            }
            let i = ((t - start_ms) / p.bucket_ms) as usize;
            counts[i] += 1;
            if score.is_finite() && score > max_score[i] {
                max_score[i] = score;
            }
        }
        Self {
            bucket_ms: p.bucket_ms,
            start_ms,
            end_ms,
            counts,
            max_score,
            held: events.len(),
            oldest_held_ms: events.iter().map(|e| e.0).min(),
            outside,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RateParams = RateParams {
        bucket_ms: 1_000,
        buckets: 4,
    };

    #[test]
    fn events_land_in_their_bucket_and_the_chart_ends_after_now() {
        let r = Rate::count(
            [(10_100, 0.9), (10_900, 0.95), (12_000, 0.7), (5_000, 1.0)].into_iter(),
            12_500,
            &P,
        );
        assert_eq!((r.start_ms, r.end_ms), (9_000, 13_000));
        assert_eq!(r.counts, vec![0, 2, 0, 1]);
        assert_eq!(r.max_score, vec![0.0, 0.95, 0.0, 0.7]);
        assert_eq!((r.held, r.outside, r.oldest_held_ms), (4, 1, Some(5_000)));
    }

    #[test]
    fn an_event_clock_ahead_of_ours_moves_the_end_but_a_forged_one_does_not() {
        // The demo's simulated clock runs ahead of the wall clock: its newest event ends the chart.
        let r = Rate::count([(60_500, 0.9)].into_iter(), 10_000, &P);
        assert_eq!((r.end_ms, r.counts[3]), (61_000, 1));
        let r = Rate::count([(i64::MAX, 0.9), (9_999, f64::NAN)].into_iter(), 10_000, &P);
        assert_eq!(
            r.end_ms, 11_000,
            "a far-future stamp is ignored for the end"
        );
        assert_eq!((r.outside, r.counts[2], r.max_score[2]), (1, 1, 0.0));
    }

    #[test]
    fn an_empty_history_gives_empty_buckets_ending_now() {
        let r = Rate::count(std::iter::empty(), 0, &P);
        assert_eq!((r.start_ms, r.end_ms, r.held), (-3_000, 1_000, 0));
        assert_eq!(r.counts, vec![0; 4]);
        assert_eq!(r.oldest_held_ms, None);
    }

    #[test]
    fn rate_parameters_are_checked_and_named() {
        assert_eq!(
            RateParams::parse(Some("bucket_ms=5000&buckets=12")),
            Ok(RateParams {
                bucket_ms: 5_000,
                buckets: 12
            })
        );
        assert_eq!(RateParams::parse(None).unwrap().buckets, 60);
        for (q, says) in [
            ("bucket_ms=0", "bucket_ms"),
            ("bucket_ms=99999999999999999999", "bucket_ms"),
            ("buckets=0", "buckets"),
            ("buckets=100000", "1..=1440"),
            ("buckets=-1", "buckets"),
            ("bucket=5", "unknown query parameter \"bucket\""),
            ("bucket_ms=%zz", "percent-encoding"),
        ] {
            let e = RateParams::parse(Some(q)).unwrap_err();
            assert!(e.contains(says), "{q}: {e}");
        }
    }

    #[test]
    fn every_asset_has_a_content_type_by_its_kind() {
        for a in ASSETS {
            let want = if a.path.ends_with(".js") {
                JS
            } else if a.path.ends_with(".css") {
                CSS
            } else {
                HTML
            };
            assert_eq!(a.content_type, want, "{}", a.path);
            assert!(!a.body.is_empty(), "{}", a.path);
        }
        // No page or script reaches outside the binary, nor runs inline script (the CSP forbids it).
        for a in ASSETS {
            let body = a.body.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !body.contains("http://") && !body.contains("https://") && !body.contains("//cdn"),
                "{} links outside the aggregator",
                a.path
            );
            if a.content_type == HTML {
                let handlers = [
                    " onclick=",
                    " onload=",
                    " onsubmit=",
                    " onerror=",
                    " oninput=",
                ];
                assert!(
                    !a.body.contains("<script>") && !handlers.iter().any(|h| a.body.contains(h)),
                    "{}: inline script",
                    a.path
                );
            }
        }
    }
}
