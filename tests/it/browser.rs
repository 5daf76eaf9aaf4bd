//! A headless browser for the dashboard tests: Debian's chromium, driven over the DevTools
//! protocol on its WebSocket (no WebDriver, no new dependency): navigate, evaluate, type, wait
//! for a condition, answer the page's API requests with fakes, and take PNG screenshots.

use crate::common::require;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Where screenshots go: `target/it-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/it-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

type CdpSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Debian's headless chromium with one tab, driven over the DevTools protocol; killed on drop.
pub struct Browser {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
    ws: CdpSocket,
    next_id: u64,
    /// The tab's DevTools session, once attached.
    session: Option<String>,
    /// Requests answered by the test instead of the server: (URL part, JSON), first match wins.
    fakes: Vec<(String, Value)>,
}

impl Browser {
    pub async fn start() -> Self {
        let chromium = require("chromium");
        let profile = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        // Chromium writes its port and its browser endpoint's path once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint = loop {
            let lines: Vec<String> = std::fs::read_to_string(&port_file)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect();
            if let [port, path, ..] = lines.as_slice() {
                break format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
            }
            assert!(
                Instant::now() < deadline,
                "chromium wrote no {}",
                port_file.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .unwrap_or_else(|e| panic!("DevTools at {endpoint}: {e}"));
        let mut b = Self {
            _child: child,
            _profile: profile,
            ws,
            next_id: 0,
            session: None,
            fakes: Vec::new(),
        };
        // A tab of our own, its commands sent in its session over the browser's socket.
        let target = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        b.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        b
    }

    /// One DevTools command; its result (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// One DevTools command; its result, or the protocol's error.
    async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            msg["sessionId"] = session.clone().into();
        }
        let msg = msg.to_string();
        self.ws.send(Message::text(msg)).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer from chromium in 30 s"))
                .unwrap_or_else(|| panic!("{method}: chromium closed the DevTools socket"))
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["method"] == "Fetch.requestPaused" {
                self.answer_paused(&v["params"]).await;
                continue;
            }
            if v["id"] == id {
                return match v.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(v["result"].clone()),
                };
            }
        }
    }

    /// Answers the page's requests whose URL contains a fake's key with its JSON, from now on;
    /// the others go to the server.
    pub async fn fake(&mut self, fakes: Vec<(&str, Value)>) {
        self.fakes = fakes.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        self.call(
            "Fetch.enable",
            json!({"patterns": [{"urlPattern": "*/api/*", "requestStage": "Request"}]}),
        )
        .await;
    }

    /// A request held by `Fetch.enable`: faked or let through. The command's own answer is
    /// skipped by `try_call` like any other.
    async fn answer_paused(&mut self, params: &Value) {
        let url = params["request"]["url"].as_str().unwrap_or_default();
        let fake = self.fakes.iter().find(|(k, _)| url.contains(k.as_str()));
        self.next_id += 1;
        let mut msg = match fake {
            Some((_, body)) => {
                json!({"id": self.next_id, "method": "Fetch.fulfillRequest", "params": {
                    "requestId": params["requestId"], "responseCode": 200,
                    "responseHeaders": [{"name": "content-type", "value": "application/json"}],
                    "body": base64_encode(body.to_string().as_bytes()),
                }})
            }
            None => json!({"id": self.next_id, "method": "Fetch.continueRequest",
                           "params": {"requestId": params["requestId"]}}),
        };
        if let Some(session) = &self.session {
            msg["sessionId"] = session.clone().into();
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
    }

    /// Evaluates `expr` in the page (awaiting a promise); its JSON value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .await
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    /// Evaluates `expr`; its value, or the error (e.g. the page was navigating).
    pub async fn try_eval(&mut self, expr: &str) -> Result<Value, Value> {
        let r = self
            .try_call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    pub async fn text(&mut self, selector: &str) -> String {
        let v = self
            .eval(&format!("document.querySelector({selector:?}).textContent"))
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Polls `expr` every 50 ms until it is `true` (an error, as while a page loads, is not);
    /// on timeout, panics with the page's text.
    pub async fn wait_for(&mut self, what: &str, expr: &str, timeout: Duration) {
        if !self.wait_a_while(expr, timeout).await {
            let page = self
                .try_eval("document.body ? document.body.innerText : ''")
                .await;
            panic!(
                "timed out after {timeout:?} waiting for {what} ({expr}); the page says:\n{page:?}"
            );
        }
    }

    /// Whether `expr` became `true` within `timeout`.
    pub async fn wait_a_while(&mut self, expr: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.try_eval(expr).await.is_ok_and(|v| v == true) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens `url` in the tab and waits for the new document to have loaded.
    pub async fn navigate(&mut self, url: &str) {
        let before = self.eval("performance.timeOrigin").await;
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for(
            &format!("{url} to load"),
            &format!("performance.timeOrigin !== {before} && document.readyState === 'complete'"),
            Duration::from_secs(10),
        )
        .await;
    }

    /// A PNG of what a 1280 x 900 window shows, at `path` (the README's pictures: small files).
    pub async fn screenshot_viewport(&mut self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64_decode(shot["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    /// A PNG of the whole page (up to 2400 px tall) at `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let height = self
            .eval("Math.min(2400, Math.ceil(document.documentElement.scrollHeight))")
            .await;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        let png = base64_decode(shot["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 (the DevTools protocol's binary encoding), without a dependency for it.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|c| *c != b'=').collect();
        let n = data
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, c)| acc | val(*c) << (18 - 6 * i));
        for i in 0..data.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}
