//! One plain-HTTP GET of an aggregator's `/api/windows` through the tools' client ([`crate::http`]):
//! the `--aggregator` URL, the bearer token, and what each status means to the user. No TLS:
//! aggregators serve plain HTTP, put behind a TLS proxy the check runs from inside.

use super::VerifyError;
use crate::http::Get;
use std::time::Duration;

/// Longest a whole request may take (connect, send, read everything).
const TIMEOUT: Duration = Duration::from_secs(60);

/// Where an aggregator base URL points.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Base {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header.
    authority: String,
    /// Path prefix without a trailing slash (empty for the root).
    prefix: String,
}

impl Base {
    /// Parses `http://host[:port][/prefix]`.
    pub(crate) fn parse(url: &str) -> Result<Self, VerifyError> {
        let bad = |why: &str| VerifyError::Usage(format!("--aggregator {url:?}: {why}"));
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            bad(if url.starts_with("https://") {
                "https is not supported; use the aggregator's plain http:// address"
            } else {
                "must start with http://"
            })
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains(['@', '?', '#']) || prefix.contains(['?', '#']) {
            return Err(bad("give only http://host:port[/path]"));
        }
        let has_port = match authority.rfind(']') {
            Some(i) => authority[i..].contains(':'),
            None => authority.contains(':'),
        };
        let addr = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            addr,
            authority: authority.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The full URL of `path`, for messages.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.prefix)
    }

    /// GETs `path` (starting with `/`); returns the body of a 200 answer.
    pub(crate) async fn get(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Result<Vec<u8>, VerifyError> {
        let url = self.url(path);
        let fail = |message: String| VerifyError::Fetch {
            url: url.clone(),
            message,
        };
        let target = format!("{}{path}", self.prefix);
        let response = Get::new(&self.addr, &target)
            .host(&self.authority)
            .accept("application/json")
            .bearer(token)
            .timeout(TIMEOUT)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        match response.status {
            200 => Ok(response.body),
            401 => Err(fail(
                "401 unauthorized: the aggregator wants a bearer token (--token or --token-env)"
                    .into(),
            )),
            404 => Err(fail(format!(
                "404 not found: is this an edgewatch aggregator recent enough to serve {path}?"
            ))),
            s => {
                let text = response.text();
                let snippet: String = text.chars().take(200).collect();
                Err(fail(format!("HTTP {s}: {}", snippet.trim())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse_with_or_without_port_and_prefix() {
        let b = Base::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((b.addr.as_str(), b.prefix.as_str()), ("127.0.0.1:8080", ""));
        assert_eq!(b.url("/api/windows"), "http://127.0.0.1:8080/api/windows");
        let b = Base::parse("http://agg.example/edgewatch/").unwrap();
        assert_eq!(
            (b.addr.as_str(), b.prefix.as_str()),
            ("agg.example:80", "/edgewatch")
        );
        assert_eq!(Base::parse("http://[::1]:9000").unwrap().addr, "[::1]:9000");
        assert_eq!(Base::parse("http://[::1]").unwrap().addr, "[::1]:80");
        for bad in [
            "127.0.0.1:8080",
            "https://h",
            "http://",
            "http://u@h",
            "http://h/?x",
        ] {
            let e = Base::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
