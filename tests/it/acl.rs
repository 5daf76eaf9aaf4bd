//! The broker boundary of issue 13: the ACLs and permissions shipped in `configs/security/`, taken
//! from there as shipped (`include_str!`, never a copy kept here), enforced by real brokers
//! (Debian's mosquitto 2.0 and nats-server 2.9) against real MQTT clients. Forged acks, summaries,
//! events, models and configuration from identities that may not send them never reach the
//! subscriber entitled to read them, while the legitimate publishes of the same test do; one agent
//! and one aggregator run end to end through each secured broker under their own identities.
//!
//! Showing that something is *not* delivered, without sleeping: every forged publish is QoS 1 and
//! acknowledged before anything else happens (both brokers route a QoS 1 publish to the current
//! subscribers, or drop it, before they send its PUBACK), then a legitimate "sentinel" goes to the
//! same subscriber. Once the sentinel has arrived, anything the broker had let through would have
//! arrived before it: the subscriber's queue is in order.
//!
//! What the brokers do with a refused operation from an MQTT 3.1.1 client, as asserted here:
//! - PUBLISH: dropped and logged, yet acknowledged (PUBACK) by both, so the client cannot tell;
//! - SUBSCRIBE: mosquitto 2.0.11 grants every one (its acl_file checks reads only when it delivers,
//!   retained messages included); nats-server answers SUBACK 0x80 (failure).

use crate::common::*;
use edgewatch_agent::{Agent, AgentConfig};
use edgewatch_aggregator::cluster::node::Buckets;
use edgewatch_aggregator::cluster::{status, ClusterConfig, NatsCredentials};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_link::{MqttLink, TlsSettings};
use edgewatch_simulators::SimulatorConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The shipped files, as shipped.
const ACL: &str = include_str!("../../configs/security/mosquitto/acl");
const MOSQUITTO_CONF: &str =
    include_str!("../../configs/security/mosquitto/mosquitto.conf.example");
const MOSQUITTO_CERTS_CONF: &str =
    include_str!("../../configs/security/mosquitto/mosquitto-certs.conf.example");
const NATS_USERS: &str = include_str!("../../configs/security/nats/users.conf.example");

/// Where the shipped mosquitto configs expect their files.
const ETC: &str = "/etc/mosquitto/edgewatch";

/// Topic `rest` under the default uplink prefix, which the shipped files name.
fn t(rest: &str) -> String {
    format!("edgewatch/v1/{rest}")
}

/// A file under `configs/security/`.
fn shipped(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/security")
        .join(rel)
}

/// Identities made by the shipped `make-identities.sh` in a directory of their own.
struct Identities {
    dir: tempfile::TempDir,
    /// Name → password.
    passwords: BTreeMap<String, String>,
    /// `EDGEWATCH_PW_<NAME>` → password: the nats-server environment.
    env: Vec<(String, String)>,
}

impl Identities {
    fn make(names: &[&str]) -> Self {
        require("mosquitto_passwd");
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("sh")
            .arg(shipped("make-identities.sh"))
            .arg(dir.path())
            .args(names)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make-identities.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("passwords.env")).unwrap();
        let env: Vec<(String, String)> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let passwords = text
            .lines()
            .filter_map(|l| l.strip_prefix("# identity "))
            .map(|l| {
                let (name, var) = l.split_once(" is ").expect("# identity NAME is VAR");
                let pw = env.iter().find(|(k, _)| k == var).expect("VAR=password");
                (name.to_string(), pw.1.clone())
            })
            .collect::<BTreeMap<_, _>>();
        assert_eq!(passwords.len(), names.len(), "{text}");
        Self {
            dir,
            passwords,
            env,
        }
    }

    fn password(&self, name: &str) -> &str {
        &self.passwords[name]
    }
}

fn make_world_readable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if p.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// mosquitto on a free loopback port, configured by the shipped `conf` with its `/etc` paths
/// pointing into `dir`, where the shipped acl is written (mosquitto started as root reads its files
/// after dropping to its own user: they are made readable). `edits` are further exact
/// replacements; each must apply, so a changed shipped file fails here rather than being ignored.
fn mosquitto_with(dir: tempfile::TempDir, conf: &str, edits: &[(&str, &str)]) -> Mosquitto {
    let d = dir.path().to_path_buf();
    std::fs::write(d.join("acl"), ACL).unwrap();
    let mut text = conf.to_string();
    for (from, to) in edits {
        assert!(text.contains(from), "the shipped config lost {from:?}");
        text = text.replace(from, to);
    }
    assert!(text.contains(&format!("acl_file {ETC}/acl")), "{text}");
    text = text.replace(ETC, d.to_str().unwrap());
    for entry in std::fs::read_dir(&d).unwrap() {
        make_world_readable(&entry.unwrap().path());
    }
    make_world_readable(&d);
    Mosquitto::start_with(dir, free_port(), &text)
}

/// mosquitto with the shipped password config and acl, and a password file for `names`.
fn mosquitto_with_passwords(names: &[&str]) -> (Mosquitto, Identities) {
    let ids = Identities::make(names);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        ids.dir.path().join("passwords"),
        dir.path().join("passwords"),
    )
    .unwrap();
    (mosquitto_with(dir, MOSQUITTO_CONF, &[]), ids)
}

/// What a test client saw.
#[derive(Debug)]
enum Seen {
    Connected,
    SubAck(Vec<SubscribeReasonCode>),
    PubAck,
    Publish { topic: String, payload: String },
    Failed(ConnectionError),
}

/// An MQTT 3.1.1 client whose event loop runs in its own task and reports what it sees, in order.
struct Client {
    name: String,
    client: AsyncClient,
    seen: mpsc::Receiver<Seen>,
    /// Publishes received while waiting for something else.
    inbox: VecDeque<(String, String)>,
    task: tokio::task::JoinHandle<()>,
}

/// How long a client waits for any one answer of the broker.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

impl Client {
    /// Connects with `opts`; `Err` with the connection error when the broker refuses or the
    /// connection fails before the CONNACK.
    async fn try_connect(name: &str, opts: MqttOptions) -> Result<Self, ConnectionError> {
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, mut seen) = mpsc::channel(1024);
        let task = tokio::spawn(async move {
            loop {
                let s = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Seen::Connected,
                    Ok(Event::Incoming(Packet::SubAck(s))) => Seen::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(_))) => Seen::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish {
                        topic: p.topic.clone(),
                        payload: String::from_utf8_lossy(&p.payload).into_owned(),
                    },
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Seen::Failed(e)).await;
                        return;
                    }
                };
                if tx.send(s).await.is_err() {
                    return;
                }
            }
        });
        let first = tokio::time::timeout(ANSWER_WITHIN, seen.recv())
            .await
            .unwrap_or_else(|_| panic!("{name}: no CONNACK within {ANSWER_WITHIN:?}"));
        match first {
            Some(Seen::Connected) => Ok(Self {
                name: name.to_string(),
                client,
                seen,
                inbox: VecDeque::new(),
                task,
            }),
            Some(Seen::Failed(e)) => Err(e),
            other => panic!("{name}: unexpected before the CONNACK: {other:?}"),
        }
    }

    async fn connect(name: &str, opts: MqttOptions) -> Self {
        Self::try_connect(name, opts)
            .await
            .unwrap_or_else(|e| panic!("{name} cannot connect: {e}"))
    }

    /// The next event other than a publish (publishes go to the inbox).
    async fn next_answer(&mut self, what: &str) -> Seen {
        loop {
            let s = tokio::time::timeout(ANSWER_WITHIN, self.seen.recv())
                .await
                .unwrap_or_else(|_| panic!("{}: no {what} within {ANSWER_WITHIN:?}", self.name))
                .unwrap_or_else(|| panic!("{}: event loop ended waiting for {what}", self.name));
            match s {
                Seen::Publish { topic, payload } => self.inbox.push_back((topic, payload)),
                Seen::Failed(e) => {
                    panic!("{}: connection failed waiting for {what}: {e}", self.name)
                }
                other => return other,
            }
        }
    }

    /// Subscribes to `filter` at QoS 1 and returns the broker's answer.
    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        match self.next_answer("SUBACK").await {
            Seen::SubAck(codes) if codes.len() == 1 => codes[0],
            other => panic!("{}: SUBSCRIBE {filter}: {other:?}", self.name),
        }
    }

    /// Subscribes to `filter` at QoS 1, which must be granted at QoS 1.
    async fn subscribe_granted(&mut self, filter: &str) {
        let code = self.subscribe(filter).await;
        assert_eq!(
            code,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            "{}: SUBSCRIBE {filter}",
            self.name
        );
    }

    /// Publishes at QoS 1 and waits for the PUBACK, which both brokers send even when they drop
    /// the message.
    async fn publish(&mut self, topic: &str, payload: &str) {
        self.publish_with(topic, payload, false).await;
    }

    async fn publish_with(&mut self, topic: &str, payload: &str, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_string())
            .await
            .unwrap();
        match self.next_answer("PUBACK").await {
            Seen::PubAck => {}
            other => panic!("{}: PUBLISH {topic}: {other:?}", self.name),
        }
    }

    /// Every publish received until each of `sentinels` (payloads) has arrived.
    async fn until(&mut self, sentinels: &[&str]) -> Vec<(String, String)> {
        let mut got: Vec<(String, String)> = self.inbox.drain(..).collect();
        let deadline = Instant::now() + ANSWER_WITHIN;
        while !sentinels.iter().all(|s| got.iter().any(|(_, p)| p == s)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.seen.recv()).await {
                Ok(Some(Seen::Publish { topic, payload })) => got.push((topic, payload)),
                Ok(Some(Seen::Failed(e))) => panic!("{}: connection failed: {e}", self.name),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!(
                    "{}: sentinels {sentinels:?} not all received; got {got:?}",
                    self.name
                ),
            }
        }
        got
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Options for `user` with `password` on 127.0.0.1:`port`, client id `{user}-{role}`.
fn opts(port: u16, user: &str, password: &str, role: &str) -> MqttOptions {
    let mut o = MqttOptions::new(format!("acl-{user}-{role}"), "127.0.0.1", port);
    o.set_credentials(user, password);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

async fn login(port: u16, ids: &Identities, user: &str, role: &str) -> Client {
    Client::connect(
        &format!("{user}/{role}"),
        opts(port, user, ids.password(user), role),
    )
    .await
}

/// Asserts that nothing in `got` is one of the `forged` payloads.
fn assert_none_forged(who: &str, got: &[(String, String)], forged: &[(String, String)]) {
    let leaked: Vec<_> = got
        .iter()
        .filter(|(_, p)| forged.iter().any(|(_, f)| f == p))
        .collect();
    assert!(
        leaked.is_empty(),
        "{who} received forged messages {leaked:?} (everything it got: {got:?})"
    );
}

/// Publishes each (topic, payload) from `from`, each acknowledged.
async fn publish_all(from: &mut Client, msgs: &[(String, String)]) {
    for (topic, payload) in msgs {
        from.publish(topic, payload).await;
    }
}

fn forged(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(topic, payload)| (t(topic), format!("forged: {payload}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acl_drops_forged_uplink_traffic_and_delivers_the_real_one() {
    let (broker, ids) =
        mosquitto_with_passwords(&["gw-1", "gw-2", "aggregator-1", "sensors", "ops"]);
    let port = broker.port;
    let mut agg = login(port, &ids, "aggregator-1", "sub").await;
    for f in ["summaries/+/+", "anomalies/+/+", "samples/+/+", "status/+"] {
        agg.subscribe_granted(&t(f)).await;
    }
    let mut gw1 = login(port, &ids, "gw-1", "up").await;
    for f in ["acks/gw-1", "models/gw-1", "models/all", "config/gw-1"] {
        gw1.subscribe_granted(&t(f)).await;
    }
    let mut gw2 = login(port, &ids, "gw-2", "up").await;
    let mut sensors = login(port, &ids, "sensors", "pub").await;
    let mut ops = login(port, &ids, "ops", "cli").await;

    // Towards the aggregators: another agent, a sensor and an operator send in gw-1's name and in
    // their own; then the real ones, gw-2's own summary last on gw-2's connection.
    let by_gw2 = forged(&[
        ("summaries/3/gw-1", "summary by gw-2"),
        ("anomalies/3/gw-1", "event by gw-2"),
        ("samples/3/gw-1", "samples by gw-2"),
        ("status/gw-1", "status by gw-2"),
    ]);
    let by_sensors = forged(&[
        ("summaries/3/gw-1", "summary by sensors"),
        ("summaries/3/sensors", "summary by sensors in its own name"),
        ("anomalies/3/sensors", "event by sensors in its own name"),
        ("status/sensors", "status by sensors"),
    ]);
    let by_ops = forged(&[
        ("summaries/3/ops", "summary by ops"),
        ("anomalies/3/gw-1", "event by ops"),
    ]);
    publish_all(&mut gw2, &by_gw2).await;
    publish_all(&mut sensors, &by_sensors).await;
    publish_all(&mut ops, &by_ops).await;
    gw1.publish(&t("summaries/3/gw-1"), "real summary of gw-1")
        .await;
    gw1.publish(&t("anomalies/3/gw-1"), "real event of gw-1")
        .await;
    gw1.publish(&t("status/gw-1"), "real status of gw-1").await;
    gw2.publish(&t("summaries/3/gw-2"), "real summary of gw-2")
        .await;
    let got = agg
        .until(&[
            "real summary of gw-1",
            "real event of gw-1",
            "real status of gw-1",
            "real summary of gw-2",
        ])
        .await;
    let all: Vec<_> = [by_gw2, by_sensors, by_ops].concat();
    assert_none_forged("aggregator-1", &got, &all);

    // Towards agent gw-1: acks (which delete its outbox), models and configuration from another
    // agent, a sensor and gw-1 itself; then the real ones from the aggregator and the operator.
    let by_gw2 = forged(&[
        ("acks/gw-1", "ack by gw-2"),
        ("models/gw-1", "model by gw-2"),
        ("models/all", "fleet model by gw-2"),
        ("config/gw-1", "config by gw-2"),
    ]);
    let by_sensors = forged(&[
        ("acks/gw-1", "ack by sensors"),
        ("config/gw-1", "config by sensors"),
        ("models/all", "fleet model by sensors"),
    ]);
    let by_gw1 = forged(&[
        ("acks/gw-1", "ack by gw-1 itself"),
        ("models/gw-1", "model by gw-1 itself"),
    ]);
    publish_all(&mut gw2, &by_gw2).await;
    publish_all(&mut sensors, &by_sensors).await;
    publish_all(&mut gw1, &by_gw1).await;
    agg.publish(&t("acks/gw-1"), "real ack").await;
    agg.publish(&t("models/gw-1"), "real model").await;
    agg.publish(&t("models/all"), "real fleet model").await;
    agg.publish(&t("config/gw-1"), "real config by aggregator-1")
        .await;
    ops.publish(&t("config/gw-1"), "real config by ops").await;
    let got = gw1
        .until(&[
            "real ack",
            "real model",
            "real fleet model",
            "real config by aggregator-1",
            "real config by ops",
        ])
        .await;
    assert_none_forged("gw-1", &got, &[by_gw2, by_sensors, by_gw1].concat());

    // Sensors publish readings, and nobody but them: the agent reads them.
    let mut source = login(port, &ids, "gw-1", "src").await;
    source.subscribe_granted("sensors/+/+").await;
    let by_agents = vec![(
        "sensors/dev-1/temp".to_string(),
        "forged: reading by gw-2".to_string(),
    )];
    publish_all(&mut gw2, &by_agents).await;
    sensors.publish("sensors/dev-1/temp", "real reading").await;
    let got = source.until(&["real reading"]).await;
    assert_none_forged("gw-1's source", &got, &by_agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acl_grants_every_subscribe_but_delivers_only_what_the_identity_may_read() {
    let (broker, ids) = mosquitto_with_passwords(&["gw-1", "gw-2", "aggregator-1", "sensors"]);
    let port = broker.port;
    let mut agg = login(port, &ids, "aggregator-1", "pub").await;
    agg.publish_with(&t("models/gw-1"), "secret: retained model of gw-1", true)
        .await;
    agg.publish_with(&t("models/all"), "retained fleet model", true)
        .await;
    // Device models live one level deeper, under the agent that runs the device.
    agg.publish_with(
        &t("models/gw-1/pca-0123456789abcdef"),
        "secret: retained device model of gw-1",
        true,
    )
    .await;
    agg.publish_with(
        &t("models/all/pca-fedcba9876543210"),
        "retained fleet device model",
        true,
    )
    .await;

    // mosquitto 2.0.11 never refuses a SUBSCRIBE from its acl_file (src/security_default.c:
    // "FIXME - implement ACL subscription strings"): each of these is granted at QoS 1 ...
    let mut gw2 = login(port, &ids, "gw-2", "up").await;
    for f in [
        t("acks/gw-1"),
        t("acks/+"),
        t("models/+"),
        t("config/+"),
        t("summaries/+/+"),
        t("#"),
        "#".to_string(),
    ] {
        gw2.subscribe_granted(&f).await;
    }
    let mut sensors = login(port, &ids, "sensors", "sub").await;
    sensors.subscribe_granted("#").await;

    // ... but each delivery is checked against the reader: nothing of gw-1's reaches gw-2 or the
    // sensors, retained or not; gw-2's own ack and the fleet model do.
    let mut gw1 = login(port, &ids, "gw-1", "up").await;
    agg.publish(&t("acks/gw-1"), "secret: ack for gw-1").await;
    agg.publish(&t("config/gw-1"), "secret: config for gw-1")
        .await;
    gw1.publish(&t("summaries/3/gw-1"), "secret: summary of gw-1")
        .await;
    agg.publish(&t("acks/gw-2"), "ack for gw-2").await;
    sensors.publish("sensors/dev-1/temp", "reading").await;
    let got = gw2
        .until(&[
            "retained fleet model",
            "retained fleet device model",
            "ack for gw-2",
            "reading",
        ])
        .await;
    let secrets: Vec<_> = got
        .iter()
        .filter(|(_, p)| p.starts_with("secret"))
        .collect();
    assert!(secrets.is_empty(), "gw-2 read {secrets:?}");
    let got = sensors.until(&["reading"]).await;
    let secrets: Vec<_> = got
        .iter()
        .filter(|(_, p)| p.starts_with("secret"))
        .collect();
    assert!(secrets.is_empty(), "the sensors read {secrets:?}");

    // No identity, no connection; a wrong password neither.
    let anonymous = MqttOptions::new("acl-anonymous", "127.0.0.1", port);
    let e = Client::try_connect("anonymous", anonymous).await.err();
    assert!(
        matches!(
            e,
            Some(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized
            ))
        ),
        "anonymous: {e:?}"
    );
    let e = Client::try_connect("wrong password", opts(port, "gw-1", "guess", "x"))
        .await
        .err();
    assert!(
        matches!(e, Some(ConnectionError::ConnectionRefused(_))),
        "wrong password: {e:?}"
    );
}

/// A CA: its certificate and key.
fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (p.self_signed(&key).unwrap(), key)
}

/// A certificate with Common Name `cn` signed by `issuer`, written as `{file}.pem`/`.key` in `dir`.
fn leaf(
    dir: &Path,
    file: &str,
    cn: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &(rcgen::Certificate, KeyPair),
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, &issuer.0, &issuer.1).unwrap();
    let (c, k) = (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// TLS options for a client presenting the certificate of `cn` (written in `dir`).
fn cert_opts(
    port: u16,
    dir: &Path,
    ca_pem: &Path,
    cn: &str,
    issuer: &(rcgen::Certificate, KeyPair),
) -> MqttOptions {
    let (cert, key) = leaf(
        dir,
        &format!("client-{cn}"),
        cn,
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
        issuer,
    );
    let tls = TlsSettings {
        client_cert_file: Some(cert),
        client_key_file: Some(key),
        ..TlsSettings::with_ca(ca_pem)
    };
    let mut o = MqttOptions::new(format!("acl-cert-{cn}"), "127.0.0.1", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls.client_config().expect("test TLS files load"),
    )));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_client_certificates_are_the_identity_whatever_user_name_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let root = ca("edgewatch acl test CA");
    std::fs::write(d.join("ca.pem"), root.0.pem()).unwrap();
    leaf(
        &d,
        "server",
        "broker",
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
        &root,
    );
    // The shipped listener is port 8883; this test's own loopback listener replaces it.
    let broker = mosquitto_with(dir, MOSQUITTO_CERTS_CONF, &[("listener 8883\n", "")]);
    let port = broker.port;
    let clients = tempfile::tempdir().unwrap();
    let c = clients.path();
    let ca_pem = d.join("ca.pem");

    let mut gw1 = Client::connect("gw-1", cert_opts(port, c, &ca_pem, "gw-1", &root)).await;
    gw1.subscribe_granted(&t("acks/gw-1")).await;
    // gw-2's certificate, claiming to be an aggregator by user name: still gw-2.
    let mut claimed = cert_opts(port, c, &ca_pem, "gw-2", &root);
    claimed.set_credentials("aggregator-1", "anything");
    let mut gw2 = Client::connect("gw-2 as aggregator-1", claimed).await;
    let by_gw2 = forged(&[("acks/gw-1", "ack by gw-2 claiming aggregator-1")]);
    publish_all(&mut gw2, &by_gw2).await;
    let mut agg = Client::connect(
        "aggregator-1",
        cert_opts(port, c, &ca_pem, "aggregator-1", &root),
    )
    .await;
    agg.publish(&t("acks/gw-1"), "real ack").await;
    let got = gw1.until(&["real ack"]).await;
    assert_none_forged("gw-1", &got, &by_gw2);

    // Without a certificate there is no connection at all.
    let mut none = MqttOptions::new("acl-no-cert", "127.0.0.1", port);
    none.set_credentials("aggregator-1", "anything");
    none.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        TlsSettings::with_ca(&ca_pem).client_config().unwrap(),
    )));
    assert!(
        Client::try_connect("no certificate", none).await.is_err(),
        "a client without a certificate got in"
    );
}

/// The MQTT link of `user` to 127.0.0.1:`port`.
fn link(port: u16, user: &str, password: &str) -> MqttLink {
    MqttLink {
        port,
        username: Some(user.into()),
        password: Some(password.into()),
        ..MqttLink::default()
    }
}

/// A simulated fleet of 2 devices publishing as `sensors`: 120 s of readings, every second.
fn fleet(link: MqttLink) -> SimulatorConfig {
    SimulatorConfig {
        mqtt: link,
        qos: 1,
        devices: 2,
        seed: 13,
        interval_ms: 1000,
        start_ms: Some(START_MS),
        duration_ms: Some(120_000),
        speedup: 1_000.0,
        ..SimulatorConfig::default()
    }
}

const START_MS: i64 = 1_767_225_600_000;

/// Runs agent gw-1 (source and uplink on `port` as gw-1) against an aggregator already running,
/// feeds it a simulated fleet as `sensors`, and waits until the aggregator has applied a summary of
/// every series and the agent has had them acknowledged: the acks came back through the broker's
/// ACL.
async fn run_fleet_through(
    port: u16,
    ids: &Identities,
    agg_metrics: &edgewatch_aggregator::AggregatorMetrics,
) {
    let mut cfg = AgentConfig::with_id("gw-1");
    cfg.source.mqtt = link(port, "gw-1", ids.password("gw-1"));
    cfg.window.size_ms = 10_000;
    cfg.uplink.ack_timeout_ms = 1_000;
    let agent = Agent::new(cfg).unwrap();
    let metrics = agent.metrics();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    // The simulator starts once the agent reads: probe readings until one has reached it.
    let mut probe = login(port, ids, "sensors", "probe").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics.readings_total.load(Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "agent gw-1 read no probe reading in 30 s"
        );
        probe
            .publish(
                "sensors/probe/temp",
                &format!(r#"{{"ts":{START_MS},"value":1.0}}"#),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sim = fleet(link(port, "sensors", ids.password("sensors")));
    let series = (sim.devices * sim.metrics.len()) as u64;
    let report = edgewatch_simulators::run(sim, std::future::pending())
        .await
        .unwrap();
    assert_eq!(report.published, series * 120, "{report:?}");
    wait_until(
        "a summary of every series applied and acknowledged",
        Duration::from_secs(60),
        || {
            agg_metrics.summaries_applied_total.load(Relaxed) >= series
                && metrics.outbox_acked_total.load(Relaxed) >= series
        },
    )
    .await;
    assert!(metrics.acks_received_total.load(Relaxed) > 0);
    assert_eq!(metrics.bad_acks_total.load(Relaxed), 0);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acl_lets_an_agent_and_an_aggregator_run_end_to_end_under_their_identities() {
    let (broker, ids) = mosquitto_with_passwords(&["gw-1", "aggregator-1", "sensors"]);
    let port = broker.port;
    let mut cfg = AggregatorConfig::with_id("aggregator-1");
    cfg.mqtt = link(port, "aggregator-1", ids.password("aggregator-1"));
    cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(cfg).await.unwrap();
    let agg_metrics = agg.metrics();
    let stop = CancellationToken::new();
    let agg_task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    run_fleet_through(port, &ids, &agg_metrics).await;
    stop.cancel();
    agg_task.await.unwrap().unwrap();
}

/// One nats-server (JetStream and an MQTT listener, loopback ports picked at run time) whose users
/// and permissions are the shipped `users.conf.example`, with the passwords in its environment;
/// killed on drop.
struct NatsNode {
    child: Child,
    /// NATS clients.
    client: u16,
    /// MQTT clients.
    mqtt: u16,
    monitor: u16,
    dir: tempfile::TempDir,
}

impl NatsNode {
    /// Starts it and waits until `/healthz` answers 200; ports are picked free just before the
    /// server binds them, so one taken meanwhile means another attempt on fresh ports.
    fn start(env: &[(String, String)]) -> Self {
        for attempt in 1..=3 {
            match Self::try_start(env) {
                Ok(n) => return n,
                Err(log) if attempt < 3 && log.contains("address already in use") => {}
                Err(log) => panic!("nats-server did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn try_start(env: &[(String, String)]) -> Result<Self, String> {
        let bin = require("nats-server");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (client, monitor, mqtt) = (free_port(), free_port(), free_port());
        std::fs::write(d.join("users.conf"), NATS_USERS).unwrap();
        std::fs::write(
            d.join("node.conf"),
            format!(
                "server_name: acl\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
                 jetstream {{ store_dir: {:?}, max_memory_store: 64MB, max_file_store: 1GB }}\n\
                 mqtt {{ listen: 127.0.0.1:{mqtt} }}\ninclude \"users.conf\"\n",
                d.join("js").display().to_string()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("nats.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(d.join("node.conf"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        let mut node = Self {
            child,
            client,
            mqtt,
            monitor,
            dir,
        };
        let addr: std::net::SocketAddr = format!("127.0.0.1:{monitor}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = node.child.try_wait() {
                return Err(format!("exited with {status}:\n{}", node.log()));
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && http_get(addr, "/healthz").0 == 200
            {
                return Ok(node);
            }
            assert!(
                Instant::now() < deadline,
                "nats-server not healthy:\n{}",
                node.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// The names of the JetStream streams, from the monitoring port.
    fn streams(&self) -> Vec<String> {
        let addr = format!("127.0.0.1:{}", self.monitor);
        let r = edgewatch_tools::http::Get::new(&addr, "/jsz?streams=true")
            .timeout(ANSWER_WITHIN)
            .send_blocking()
            .unwrap_or_else(|e| panic!("GET http://{addr}/jsz: {e}"));
        let jsz: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .filter_map(|s| s["name"].as_str().map(String::from))
            .collect()
    }

    /// Logs in over MQTT as `user`. The server creates its MQTT streams on the first MQTT
    /// connection, which may take longer than a client waits: failed attempts are retried (a
    /// refusal is not).
    async fn login(&self, ids: &Identities, user: &str, role: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = opts(self.mqtt, user, ids.password(user), role);
            match Client::try_connect(&format!("{user}/{role}"), o).await {
                Ok(c) => return c,
                Err(e @ ConnectionError::ConnectionRefused(_)) => panic!("{user} refused: {e}"),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "{user}: no MQTT connection in 30 s: {e}\n{}",
                    self.log()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_permissions_drop_forged_uplink_traffic_and_refuse_foreign_subscriptions() {
    let ids = nats_identities();
    let node = NatsNode::start(&ids.env);
    // QoS 1 subscriptions: each works only through the "$MQTT.sub.>" grant.
    let mut agg = node.login(&ids, "aggregator-1", "sub").await;
    for f in ["summaries/+/+", "anomalies/+/+"] {
        agg.subscribe_granted(&t(f)).await;
    }
    let mut gw1 = node.login(&ids, "gw-1", "up").await;
    for f in [
        "acks/gw-1",
        "models/gw-1",
        "models/gw-1/#",
        "models/all",
        "models/all/#",
        "config/gw-1",
    ] {
        gw1.subscribe_granted(&t(f)).await;
    }

    // Unlike mosquitto, NATS refuses what an identity may not read, wildcards wider than its
    // grant included.
    let mut gw2 = node.login(&ids, "gw-2", "up").await;
    for f in [
        t("acks/gw-1"),
        t("acks/+"),
        t("models/gw-1"),
        t("models/gw-1/#"),
        t("config/+"),
        t("summaries/+/+"),
        t("#"),
        "#".to_string(),
    ] {
        assert_eq!(
            gw2.subscribe(&f).await,
            SubscribeReasonCode::Failure,
            "gw-2: SUBSCRIBE {f}"
        );
    }
    let mut sensors = node.login(&ids, "sensors", "pub").await;
    for f in ["sensors/#".to_string(), t("acks/gw-1")] {
        assert_eq!(
            sensors.subscribe(&f).await,
            SubscribeReasonCode::Failure,
            "sensors: SUBSCRIBE {f}"
        );
    }
    let mut ops = node.login(&ids, "ops", "cli").await;

    // Towards the aggregators.
    let by_gw2 = forged(&[
        ("summaries/3/gw-1", "summary by gw-2"),
        ("anomalies/3/gw-1", "event by gw-2"),
    ]);
    let by_sensors = forged(&[
        ("summaries/3/gw-1", "summary by sensors"),
        ("summaries/3/sensors", "summary by sensors in its own name"),
    ]);
    publish_all(&mut gw2, &by_gw2).await;
    publish_all(&mut sensors, &by_sensors).await;
    gw1.publish(&t("anomalies/3/gw-1"), "real event of gw-1")
        .await;
    gw2.publish(&t("summaries/3/gw-2"), "real summary of gw-2")
        .await;
    let got = agg
        .until(&["real event of gw-1", "real summary of gw-2"])
        .await;
    assert_none_forged("aggregator-1", &got, &[by_gw2, by_sensors].concat());

    // Towards agent gw-1.
    let by_gw2 = forged(&[
        ("acks/gw-1", "ack by gw-2"),
        ("models/gw-1", "model by gw-2"),
        ("config/gw-1", "config by gw-2"),
    ]);
    let by_sensors = forged(&[("acks/gw-1", "ack by sensors")]);
    let by_gw1 = forged(&[("acks/gw-1", "ack by gw-1 itself")]);
    publish_all(&mut gw2, &by_gw2).await;
    publish_all(&mut sensors, &by_sensors).await;
    publish_all(&mut gw1, &by_gw1).await;
    agg.publish(&t("acks/gw-1"), "real ack").await;
    agg.publish(&t("models/all"), "real fleet model").await;
    ops.publish(&t("config/gw-1"), "real config by ops").await;
    let got = gw1
        .until(&["real ack", "real fleet model", "real config by ops"])
        .await;
    assert_none_forged("gw-1", &got, &[by_gw2, by_sensors, by_gw1].concat());
    assert!(
        node.log().contains("Publish Violation"),
        "the refusals are logged:\n{}",
        node.log()
    );

    // Agents may not use NATS itself: with "$MQTT.sub.>" they would read every QoS 1 delivery.
    let native = async_nats::ConnectOptions::with_user_and_password(
        "gw-1".into(),
        ids.password("gw-1").into(),
    )
    .connect(format!("127.0.0.1:{}", node.client))
    .await;
    assert!(native.is_err(), "agent gw-1 connected natively");

    // Aggregators may, for their KV buckets only: deleting an MQTT stream is refused.
    let (tx, mut errors) = mpsc::channel(16);
    let nc = async_nats::ConnectOptions::with_user_and_password(
        "aggregator-1".into(),
        ids.password("aggregator-1").into(),
    )
    .event_callback(move |e| {
        let _ = tx.try_send(e.to_string());
        std::future::ready(())
    })
    .connect(format!("127.0.0.1:{}", node.client))
    .await
    .expect("aggregator-1 connects natively");
    assert!(node.streams().contains(&"$MQTT_msgs".to_string()));
    nc.publish("$JS.API.STREAM.DELETE.$MQTT_msgs", "".into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let deadline = Instant::now() + ANSWER_WITHIN;
    loop {
        let e = tokio::time::timeout_at(deadline.into(), errors.recv())
            .await
            .expect("a permissions error for the stream delete")
            .unwrap();
        if e.to_lowercase()
            .contains("permissions violation for publish")
            && e.contains("STREAM.DELETE")
        {
            break;
        }
    }
    assert!(node.streams().contains(&"$MQTT_msgs".to_string()));
}

/// The aggregator's NATS password, for `cluster.credentials.password_env` (a name only this
/// module uses).
const AGG_PASSWORD_VAR: &str = "EDGEWATCH_IT_ACL_AGGREGATOR_PASSWORD";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_permissions_let_a_cluster_mode_aggregator_and_an_agent_run_end_to_end() {
    let ids = nats_identities();
    let node = NatsNode::start(&ids.env);
    drop(node.login(&ids, "sensors", "warmup").await);
    std::env::set_var(AGG_PASSWORD_VAR, ids.password("aggregator-1"));
    let mut cfg = AggregatorConfig::with_id("aggregator-1");
    cfg.mqtt = link(node.mqtt, "aggregator-1", ids.password("aggregator-1"));
    cfg.http.listen = "127.0.0.1:0".into();
    let mut c = ClusterConfig::nats(vec![format!("nats://127.0.0.1:{}", node.client)]);
    c.credentials = Some(NatsCredentials {
        user: "aggregator-1".into(),
        password_env: AGG_PASSWORD_VAR.into(),
    });
    c.replicas = 1;
    c.lease_ttl_ms = 3_000;
    c.heartbeat_ms = 500;
    c.checkpoint_interval_ms = 100;
    cfg.cluster = Some(c.clone());
    let agg = Aggregator::bind(cfg)
        .await
        .unwrap_or_else(|e| panic!("aggregator joins: {e}\n{}", node.log()));
    let agg_metrics = agg.metrics();
    let stop = CancellationToken::new();
    let agg_task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    run_fleet_through(node.mqtt, &ids, &agg_metrics).await;
    // `edgewatch cluster status` under the same identity (it reads every lease).
    let buckets = Buckets::open(&c, "edgewatch/v1", "aggregator-1", false)
        .await
        .unwrap();
    let status = status::collect(&buckets, 64).await.unwrap();
    assert!(status.unowned.is_empty(), "{}", status.render());
    assert!(
        status
            .leases
            .iter()
            .all(|l| l.owner.as_deref() == Some("aggregator-1")),
        "{}",
        status.render()
    );
    stop.cancel();
    agg_task.await.unwrap().unwrap();
    // Everything the run needed was granted: not one permission was refused on the way.
    let log = node.log();
    assert!(!log.contains("Violation"), "{log}");
    for bucket in ["members", "leases", "checkpoints"] {
        let stream = format!("KV_edgewatch_v1_{bucket}");
        assert!(node.streams().contains(&stream), "{stream}");
    }
}

/// Passwords for every user of the shipped NATS users file: nats-server refuses to start while
/// one of their variables is missing.
fn nats_identities() -> Identities {
    let users = nats_users();
    Identities::make(&users.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The user names of the shipped NATS users file.
fn nats_users() -> Vec<String> {
    NATS_USERS
        .split("user: \"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(String::from)
        .collect()
}

#[test]
fn shipped_nats_files_agree_with_their_generator_and_nats_server_accepts_them() {
    let out = Command::new("sh")
        .arg(shipped("nats/gen-users.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        NATS_USERS,
        "users.conf.example differs from what gen-users.sh prints: regenerate it with \
         sh configs/security/nats/gen-users.sh > configs/security/nats/users.conf.example"
    );

    let ids = nats_identities();
    for name in ["gw-1", "gw-2", "aggregator-1", "sensors", "ops"] {
        assert!(ids.passwords.contains_key(name), "{name} is no NATS user");
    }
    let check = |env: &[(String, String)]| {
        let out = Command::new(require("nats-server"))
            .arg("-t")
            .arg("-c")
            .arg(shipped("nats/n1.conf.example"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = check(&ids.env);
    assert!(ok && text.contains("is valid"), "{text}");
    // Without the passwords in its environment the server does not start, and says which.
    let (ok, text) = check(&[]);
    assert!(!ok && text.contains("EDGEWATCH_PW_"), "{text}");
}

#[test]
fn secured_example_configs_log_in_under_their_own_identity() {
    let pw_var = |name: &str| format!("EDGEWATCH_PW_{}", name.to_uppercase().replace('-', "_"));
    let users = nats_users();
    for (broker, path) in [
        ("mosquitto", "mosquitto/agent.yaml"),
        ("nats", "nats/agent.yaml"),
    ] {
        let cfg: AgentConfig = edgewatch::config::load(&shipped(path)).unwrap();
        let up = cfg.uplink.mqtt.as_ref().expect("an uplink link of its own");
        // The ACL grants an agent its topics by user name: it must be the agent id.
        assert_eq!(up.username.as_deref(), Some(cfg.id.as_str()), "{path}");
        assert_eq!(up.password, None, "{path}: no password in the file");
        assert_eq!(up.password_env, Some(pw_var(&cfg.id)), "{path}");
        assert_eq!(
            cfg.uplink.prefix, "edgewatch/v1",
            "{path}: the prefix the ACLs name"
        );
        if broker == "nats" {
            assert!(
                users.contains(&cfg.id),
                "{path}: {} is no NATS user",
                cfg.id
            );
        } else {
            assert!(up.tls.is_some(), "{path}: passwords over TLS");
        }
    }
    for (broker, path) in [
        ("mosquitto", "mosquitto/aggregator-1.yaml"),
        ("nats", "nats/aggregator-1.yaml"),
    ] {
        let cfg: AggregatorConfig = edgewatch::config::load(&shipped(path)).unwrap();
        let user = cfg.mqtt.username.clone().expect("a user name");
        assert_eq!(cfg.mqtt.password, None, "{path}: no password in the file");
        assert_eq!(cfg.mqtt.password_env, Some(pw_var(&user)), "{path}");
        assert_eq!(cfg.prefix, "edgewatch/v1", "{path}");
        if broker == "nats" {
            assert!(users.contains(&user), "{path}: {user} is no NATS user");
            let creds = cfg
                .cluster
                .expect("cluster mode")
                .credentials
                .expect("credentials");
            assert_eq!(creds.user, user, "{path}: one identity for MQTT and NATS");
            assert_eq!(creds.password_env, pw_var(&user), "{path}");
        } else {
            assert!(
                ACL.lines().any(|l| l == format!("user {user}")),
                "{path}: {user} has no block in the acl file"
            );
            assert!(cfg.mqtt.tls.is_some(), "{path}: passwords over TLS");
        }
    }
}
