//! TLS on every MQTT link, against Debian's mosquitto with a TLS listener and certificates the test
//! makes (rcgen): the simulator, the agent (source and uplink) and the aggregator connect with the
//! CA, a password and a client certificate, and readings flow end to end; a wrong password, an
//! untrusted CA and a wrong `server_name` fail with errors naming the broker and the reason.

use crate::common::*;
use crate::wait::SubscriptionLog;
use edgewatch_agent::{Agent, AgentConfig};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_link::{self as link, MqttLink, TlsSettings};
use edgewatch_simulators::SimulatorConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, TlsConfiguration,
    Transport,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const USER: &str = "edge";
const PASSWORD: &str = "correct-horse";

/// A CA and the PEM files it signed, written to the broker's directory.
struct Pki {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A second CA that signed nothing the broker presents.
    other_ca: PathBuf,
    /// The server's certificate (for 127.0.0.1 and localhost) and key.
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Pki {
    /// A test CA, a server and a client certificate signed by it, and an unrelated CA, written
    /// to `d`.
    fn write(d: &Path) -> Self {
        let root = ca("edgewatch test CA");
        let ca_pem = d.join("ca.pem");
        std::fs::write(&ca_pem, root.0.pem()).unwrap();
        let (server_cert, server_key) = leaf(
            d,
            "server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &root,
        );
        let (client_cert, client_key) = leaf(
            d,
            "client",
            &["edgewatch-client"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &root,
        );
        let other_ca = d.join("other-ca.pem");
        std::fs::write(&other_ca, ca("unrelated CA").0.pem()).unwrap();
        Self {
            ca: ca_pem,
            client_cert,
            client_key,
            other_ca,
            server_cert,
            server_key,
        }
    }
}

/// A certificate authority: its certificate and key.
fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (p.self_signed(&key).unwrap(), key)
}

/// A leaf certificate signed by `issuer`, written as `{stem}.pem` and `{stem}.key` in `dir`.
fn leaf(
    dir: &Path,
    stem: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &(rcgen::Certificate, KeyPair),
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, stem);
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, &issuer.0, &issuer.1).unwrap();
    let (c, k) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// A mosquitto with only a TLS listener (server certificate for 127.0.0.1 and localhost), a
/// password file with [`USER`]/[`PASSWORD`], no anonymous access; client certificates required
/// when `require_certificate`.
fn tls_broker(require_certificate: bool) -> (Mosquitto, Pki) {
    tls_broker_with(require_certificate, "")
}

/// [`tls_broker`] with `extra` config lines.
fn tls_broker_with(require_certificate: bool, extra: &str) -> (Mosquitto, Pki) {
    let passwd_bin = require("mosquitto_passwd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::write(d);
    let passwd = d.join("passwd");
    let out = Command::new(passwd_bin)
        .arg("-b")
        .arg("-c")
        .arg(&passwd)
        .args([USER, PASSWORD])
        .output()
        .unwrap();
    assert!(out.status.success(), "mosquitto_passwd failed: {out:?}");
    // mosquitto may drop root privileges before reading these: let its user in.
    for p in [d, &passwd, &pki.server_key] {
        make_world_readable(p);
    }
    let settings = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_certificate}\n\
         password_file {}\nallow_anonymous false\nmax_queued_messages 0\npersistence false\n{extra}",
        pki.ca.display(),
        pki.server_cert.display(),
        pki.server_key.display(),
        passwd.display()
    );
    let port = free_port();
    let broker = Mosquitto::start_with(dir, port, &settings);
    (broker, pki)
}

fn make_world_readable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if p.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A link to the TLS broker on `port` with the given TLS settings and password.
fn tls_link(port: u16, tls: TlsSettings, password: &str) -> MqttLink {
    MqttLink {
        port,
        username: Some(USER.into()),
        password: Some(password.into()),
        tls: Some(tls),
        ..MqttLink::default()
    }
}

fn with_client_cert(pki: &Pki) -> TlsSettings {
    TlsSettings {
        client_cert_file: Some(pki.client_cert.clone()),
        client_key_file: Some(pki.client_key.clone()),
        ..TlsSettings::with_ca(&pki.ca)
    }
}

/// Connects a plain rumqttc client, TLS from the shared builder, as [`USER`] with `password`:
/// `Ok` at the ConnAck, else the first connection error.
async fn probe(port: u16, tls: &TlsSettings, password: &str) -> Result<(), ConnectionError> {
    let mut o = MqttOptions::new("edgewatch-tls-probe", "127.0.0.1", port);
    o.set_credentials(USER, password);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls.client_config().expect("TLS files load"),
    )));
    let (_client, mut eventloop) = AsyncClient::new(o, 10);
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
            .await
            .expect("the broker answers within 10 s")?;
        if let Event::Incoming(Packet::ConnAck(_)) = event {
            return Ok(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_agent_and_aggregator_work_over_tls_with_password_and_client_certificate() {
    let subscriptions = SubscriptionLog::new();
    let (broker, pki) = tls_broker_with(true, &subscriptions.settings());
    let link = tls_link(broker.port, with_client_cert(&pki), PASSWORD);

    let mut agg_cfg = AggregatorConfig::with_id("agg-tls");
    agg_cfg.mqtt = link.clone();
    agg_cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(agg_cfg).await.unwrap();
    let http = agg.local_addr();
    let agg_metrics = agg.metrics();
    let stop = CancellationToken::new();
    let agg_task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };

    // The uplink defaults to the source link: both go through TLS.
    let mut cfg = AgentConfig::with_id("gw-tls");
    cfg.source.mqtt = link.clone();
    cfg.window.size_ms = 10_000;
    let agent = Agent::new(cfg).unwrap();
    let agent_metrics = agent.metrics();
    let agent_task = {
        let t = stop.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    // The subscriptions land before the simulator publishes.
    for client in ["edgewatch-agg-tls", "edgewatch-gw-tls-src"] {
        subscriptions
            .wait_subscribed(client, Duration::from_secs(10))
            .await;
    }

    let sim = SimulatorConfig {
        mqtt: link,
        devices: 2,
        seed: 7,
        interval_ms: 1000,
        start_ms: Some(1_767_225_600_000),
        duration_ms: Some(120_000),
        speedup: 1_000.0,
        ..SimulatorConfig::default()
    };
    let series = (sim.devices * sim.metrics.len()) as u64;
    let report = edgewatch_simulators::run(sim, std::future::pending())
        .await
        .unwrap();
    assert_eq!(report.published, series * 120, "{report:?}");

    wait_until(
        "every reading at the agent",
        Duration::from_secs(20),
        || agent_metrics.readings_total.load(Relaxed) >= report.published,
    )
    .await;
    wait_until(
        "windows applied at the aggregator",
        Duration::from_secs(20),
        || {
            get_json(http, "/api/status")["summaries_applied"]
                .as_u64()
                .unwrap_or(0)
                >= series
        },
    )
    .await;
    assert_eq!(agent_metrics.connection_errors_total.load(Relaxed), 0);
    assert_eq!(agg_metrics.connection_errors_total.load(Relaxed), 0);

    stop.cancel();
    agent_task.await.unwrap().unwrap();
    agg_task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_and_the_error_names_the_broker() {
    let (broker, pki) = tls_broker(false);
    let tls = TlsSettings::with_ca(&pki.ca);
    let addr = format!("127.0.0.1:{}", broker.port);

    // TLS itself works: the right password gets through without a client certificate.
    probe(broker.port, &tls, PASSWORD).await.unwrap();

    let e = probe(broker.port, &tls, "wrong-password")
        .await
        .unwrap_err();
    let ConnectionError::ConnectionRefused(code) = e else {
        panic!("expected a refusal, got {e}");
    };
    // MQTT 3.1.1 brokers answer a bad password with 4 (mosquitto) or 5 (not authorized).
    assert!(
        matches!(
            code,
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
        ),
        "{code:?}"
    );
    let msg = link::refusal_message(&addr, code as u8);
    assert!(
        msg.starts_with(&format!("broker {addr} refused the connection: ")),
        "{msg}"
    );

    // The agent keeps retrying with backoff and counts every failure.
    let mut cfg = AgentConfig::with_id("gw-tls-badpw");
    cfg.source.mqtt = tls_link(broker.port, tls, "wrong-password");
    let agent = Agent::new(cfg).unwrap();
    let metrics = agent.metrics();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    wait_until("connection errors counted", Duration::from_secs(20), || {
        metrics.connection_errors_total.load(Relaxed) >= 2
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_ca_fails_the_handshake_with_the_certificate_problem_and_the_broker() {
    let (broker, pki) = tls_broker(false);
    let addr = format!("127.0.0.1:{}", broker.port);
    let untrusted = TlsSettings::with_ca(&pki.other_ca);

    let e = probe(broker.port, &untrusted, PASSWORD).await.unwrap_err();
    assert!(matches!(e, ConnectionError::Tls(_)), "{e:?}");
    assert_eq!(
        link::failure_message(&addr, &e),
        format!("TLS handshake with {addr} failed: invalid peer certificate: UnknownIssuer")
    );

    // The aggregator retries and counts, like the agent.
    let mut cfg = AggregatorConfig::with_id("agg-tls-untrusted");
    cfg.mqtt = tls_link(broker.port, untrusted, PASSWORD);
    cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(cfg).await.unwrap();
    let metrics = agg.metrics();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    wait_until("connection errors counted", Duration::from_secs(20), || {
        metrics.connection_errors_total.load(Relaxed) >= 2
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_sets_the_name_the_broker_certificate_must_carry() {
    let (broker, pki) = tls_broker(false);
    let addr = format!("127.0.0.1:{}", broker.port);

    // Reached by IP address, checked against the certificate's DNS name.
    let mut tls = TlsSettings::with_ca(&pki.ca);
    tls.server_name = Some("localhost".into());
    probe(broker.port, &tls, PASSWORD).await.unwrap();

    tls.server_name = Some("broker.elsewhere.example".into());
    let e = probe(broker.port, &tls, PASSWORD).await.unwrap_err();
    let msg = link::failure_message(&addr, &e);
    assert!(
        msg.starts_with(&format!("TLS handshake with {addr} failed: "))
            && msg.contains("not valid for name \"broker.elsewhere.example\""),
        "{msg}"
    );
}

#[tokio::test]
async fn a_missing_tls_file_stops_the_agent_with_the_field_and_the_path() {
    let mut cfg = AgentConfig::with_id("gw-tls-missing");
    cfg.source.mqtt.port = free_port();
    cfg.source.mqtt.tls = Some(TlsSettings::with_ca("/nonexistent/edgewatch/ca.pem"));
    let e = Agent::new(cfg)
        .unwrap()
        .run(std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tls.ca_file: cannot read /nonexistent/edgewatch/ca.pem"),
        "{e}"
    );
}

/// A single nats-server with JetStream that accepts only TLS clients with a certificate of the
/// test CA (server certificate for 127.0.0.1); returns it, its client URL and the PKI.
fn tls_nats() -> (std::process::Child, String, Pki, tempfile::TempDir) {
    let bin = require("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::write(d);
    let port = free_port();
    let conf = d.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "server_name: tls1\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n\
             tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n",
            d.join("js").display().to_string(),
            pki.server_cert.display().to_string(),
            pki.server_key.display().to_string(),
            pki.ca.display().to_string()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("nats.log")).unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, format!("tls://127.0.0.1:{port}"), pki, dir)
}

/// Cluster mode over TLS: with the right CA and a client certificate an aggregator's buckets open
/// and work; with an untrusted CA the error names the servers; a missing file names the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_connects_to_nats_over_tls_and_names_what_fails() {
    use edgewatch_aggregator::cluster::{node::Buckets, ClusterConfig};
    let (mut nats, url, pki, _dir) = tls_nats();
    let mut cfg = ClusterConfig::nats(vec![url.clone()]);
    cfg.replicas = 1;
    let mut tls = TlsSettings::with_ca(&pki.ca);
    tls.client_cert_file = Some(pki.client_cert.clone());
    tls.client_key_file = Some(pki.client_key.clone());
    cfg.tls = Some(tls.clone());
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    let buckets = Buckets::open(&cfg, "tls-test", "agg-tls", false).await;
    let buckets = match buckets {
        Ok(b) => b,
        Err(e) => panic!("TLS connect failed: {e}"),
    };
    let lease = buckets.leases.try_acquire(3).await.unwrap();
    assert!(lease.is_some(), "a lease over TLS");

    let mut wrong = cfg.clone();
    let mut untrusted = tls.clone();
    untrusted.ca_file = pki.other_ca.clone();
    wrong.tls = Some(untrusted);
    let e = Buckets::open(&wrong, "tls-test", "agg-tls", false)
        .await
        .unwrap_err()
        .to_string();
    eprintln!("untrusted CA: {e}");
    assert!(e.contains(&url) && e.contains("cannot connect"), "{e}");

    let mut missing = cfg.clone();
    missing.tls = Some(TlsSettings::with_ca("/nonexistent/edgewatch/ca.pem"));
    let e = Buckets::open(&missing, "tls-test", "agg-tls", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cluster.tls") && e.contains("/nonexistent/edgewatch/ca.pem"),
        "{e}"
    );
    let _ = nats.kill();
    let _ = nats.wait();
}
