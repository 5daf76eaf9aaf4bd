//! Fleet peer groups in cluster mode, every aggregator a real process on a real 3-node NATS cluster:
//! nine identical devices spread over the three members' partitions publish window summaries (as
//! agents do, through the embedded broker); the member holding the trainer lease fits the class
//! peer model from every member's profiles (the model's device count is the whole fleet); a
//! drifting device owned by another member raises its `detector: fleet` event at that member; a
//! forged profile record and a forged peer model record are refused and counted; the trainer killed with SIGKILL hands the fits
//! to another member, which resumes the version count from the bucket and refits.

use crate::cluster_crash::try_json;
use crate::common::*;
use crate::crash::{wait_http, Proc};
use crate::nats::NatsCluster;
use edgewatch_models::partition::partition_of;
use edgewatch_models::wire::{Sequenced, WindowSummary};
use rumqttc::{AsyncClient, MqttOptions};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const PARTITIONS: u32 = 16;
const METRICS: [&str; 3] = ["current", "flow", "temp"];
const BASE: [f64; 3] = [5.0, 20.0, 40.0];
const WINDOW_MS: i64 = 60_000;
const T0: i64 = 1_767_225_600_000;
const PER_MEMBER: usize = 3;
const IDS: [&str; 3] = ["agg-1", "agg-2", "agg-3"];

struct Member {
    addr: SocketAddr,
    proc: Option<Proc>,
}

fn start(dir: &std::path::Path, id: &str, nats: &NatsCluster, broker: u16) -> Member {
    let http = free_port();
    let conf: PathBuf = dir.join(format!("{id}.yaml"));
    std::fs::write(
        &conf,
        format!(
            "id: {id}\nmqtt: {{ host: 127.0.0.1, port: {broker} }}\npartitions: {PARTITIONS}\n\
             http: {{ listen: \"127.0.0.1:{http}\" }}\n\
             cluster: {{ type: nats, servers: [{}], lease_ttl_ms: 4000, heartbeat_ms: 1000, checkpoint_interval_ms: 200 }}\n\
             fleet: {{ enabled: true, refit_interval_ms: 1500, min_devices: 3, min_windows: 2, profile_window_ms: 600000 }}\n",
            nats.urls.join(", ")
        ),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let proc = Proc::spawn(
        id,
        &["aggregator", "--config", conf.to_str().unwrap()],
        &dir.join(format!("{id}.log")),
    );
    wait_http(addr);
    Member {
        addr,
        proc: Some(proc),
    }
}

/// Partition → owning member, once every partition has exactly one owner among `live`.
/// Each partition's owner when every partition has exactly one (`Some(None)` when not), or `None`
/// when a member did not answer (a slow answer on a loaded machine says nothing about the split).
fn owners(members: &BTreeMap<&str, Member>) -> Option<Option<BTreeMap<u32, String>>> {
    let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (id, m) in members.iter().filter(|(_, m)| m.proc.is_some()) {
        for p in try_json(m.addr, "/api/status")?["owned"].as_array()? {
            out.entry(p.as_u64()? as u32)
                .or_default()
                .push(id.to_string());
        }
    }
    Some(
        (out.len() == PARTITIONS as usize && out.values().all(|o| o.len() == 1))
            .then(|| out.into_iter().map(|(p, o)| (p, o[0].clone())).collect()),
    )
}

/// One window of one device's metric: a slow load shared by the fleet, 1 % noise per device and
/// window, and `extra` on top.
fn summary(device: &str, d: usize, j: usize, i: i64, extra: f64) -> WindowSummary {
    let noise = (((d * 131 + j * 17) as f64 + i as f64 * 7.31).sin() * 43_758.545).fract();
    let load = 5.0 * (i as f64 * 0.01).sin();
    let mean = BASE[j] * (1.0 + 0.01 * (load + noise)) + extra;
    let start_ms = T0 + i * WINDOW_MS;
    WindowSummary {
        device: device.into(),
        metric: METRICS[j].into(),
        start_ms,
        end_ms: start_ms + WINDOW_MS,
        count: 60,
        min: mean - 1.0,
        max: mean + 1.0,
        mean,
        std: 0.5,
        first_ts_ms: start_ms,
        last_ts_ms: start_ms + WINDOW_MS - 1_000,
        max_score: 0.0,
        revision: 0,
    }
}

/// Publishes windows `from..to` of `devices` as agent `gw-fleet`: one batch per partition and
/// window, seqs `window * devices-per-partition`-stable so a republished window is a duplicate.
async fn publish(client: &AsyncClient, devices: &[String], from: i64, to: i64, drifter: &str) {
    for i in from..to {
        let mut by_partition: BTreeMap<u32, Vec<WindowSummary>> = BTreeMap::new();
        for (d, name) in devices.iter().enumerate() {
            for j in 0..METRICS.len() {
                let extra = if name == drifter && j == 1 && i >= 10 {
                    0.2 * (i - 9) as f64
                } else {
                    0.0
                };
                by_partition
                    .entry(partition_of(name, PARTITIONS))
                    .or_default()
                    .push(summary(name, d, j, i, extra));
            }
        }
        for (partition, items) in by_partition {
            // Stable seqs: the same window republished is the same records.
            let per = items.len() as u64;
            let records = items
                .into_iter()
                .enumerate()
                .map(|(k, item)| Sequenced {
                    seq: i as u64 * per + k as u64 + 1,
                    prev: None,
                    item,
                })
                .collect();
            publish_summaries(client, "gw-fleet", partition, records).await;
        }
    }
}

fn applied(members: &BTreeMap<&str, Member>) -> u64 {
    members
        .values()
        .filter(|m| m.proc.is_some())
        .filter_map(|m| try_json(m.addr, "/api/status")?["summaries_applied"].as_u64())
        .sum()
}

/// The class model as member `m` uses it (`/api/fleet`).
fn model(m: &Member) -> Option<Value> {
    let f = try_json(m.addr, "/api/fleet")?;
    let c = f["classes"].as_array()?.first()?.clone();
    (!c["model"].is_null()).then(|| c["model"].clone())
}

fn trainer(members: &BTreeMap<&str, Member>) -> Vec<String> {
    members
        .iter()
        .filter(|(_, m)| m.proc.is_some())
        .filter(|(_, m)| try_json(m.addr, "/api/fleet").is_some_and(|f| f["trainer"] == true))
        .map(|(id, _)| id.to_string())
        .collect()
}

fn metric(m: &Member, name: &str) -> u64 {
    let addr = m.addr.to_string();
    let Ok(r) = edgewatch_tools::http::Get::new(&addr, "/metrics").send_blocking() else {
        return 0;
    };
    r.text()
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_cluster_peer_models_come_from_every_member_and_survive_a_killed_trainer() {
    let nats = NatsCluster::start();
    let broker = embedded_broker();
    let port = broker.addr().port();
    let dir = tempfile::tempdir().unwrap();
    let mut members: BTreeMap<&str, Member> = BTreeMap::new();
    for id in IDS {
        members.insert(id, start(dir.path(), id, &nats, port));
    }
    let logs = |members: &BTreeMap<&str, Member>| -> String {
        members
            .keys()
            .map(|id| {
                let log = std::fs::read_to_string(dir.path().join(format!("{id}.log")))
                    .unwrap_or_default();
                format!("--- {id}\n{log}")
            })
            .collect()
    };
    // Every member owns some partitions and the split holds for two heartbeats.
    let mut owner: Option<BTreeMap<u32, String>> = None;
    let mut since = std::time::Instant::now();
    let seen = std::cell::RefCell::new(Vec::new());
    wait_until_or(
        "each partition owned once, by all three members, stably",
        Duration::from_secs(90),
        || {
            let Some(now) = owners(&members) else {
                return false;
            };
            let mut seen = seen.borrow_mut();
            if seen.last() != Some(&now) {
                seen.push(now.clone());
            }
            let now = now.filter(|o| o.values().collect::<BTreeSet<_>>().len() == IDS.len());
            if now != owner || now.is_none() {
                owner = now;
                since = std::time::Instant::now();
            }
            owner.is_some() && since.elapsed() > Duration::from_secs(2)
        },
        || format!("splits seen: {:?}\n{}", seen.borrow(), logs(&members)),
    )
    .await;
    let owner = owner.unwrap();
    // Three devices on each member's partitions.
    let mut devices: Vec<String> = Vec::new();
    let mut by_member: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in 0..100_000 {
        let name = format!("pump-{n}");
        let o = &owner[&partition_of(&name, PARTITIONS)];
        let mine = by_member.entry(o.clone()).or_default();
        if mine.len() < PER_MEMBER {
            mine.push(name.clone());
            devices.push(name);
        }
        if devices.len() == PER_MEMBER * IDS.len() {
            break;
        }
    }
    assert_eq!(devices.len(), PER_MEMBER * IDS.len(), "{by_member:?}");
    let fleet = devices.len() as u64;

    let (client, mut el) = AsyncClient::new(MqttOptions::new("fleet-pub", "127.0.0.1", port), 100);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    // Identical devices: windows 0..10 until every member applied them (republishing is
    // harmless: the same seqs are duplicates), then a model over the whole fleet.
    let want = fleet * METRICS.len() as u64 * 10;
    for _ in 0..20 {
        publish(&client, &devices, 0, 10, "").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if applied(&members) >= want {
            break;
        }
    }
    assert_eq!(applied(&members), want, "{}", logs(&members));
    wait_until(
        "every member uses a model fitted on the whole fleet",
        Duration::from_secs(30),
        || {
            members
                .values()
                .all(|m| model(m).is_some_and(|md| md["devices"] == fleet))
        },
    )
    .await;
    let first = trainer(&members);
    assert_eq!(first.len(), 1, "one trainer: {first:?}");
    let first = first[0].clone();
    for (id, m) in &members {
        let md = model(m).unwrap();
        assert_eq!(md["trainer"], first.as_str(), "{id}: {md}");
        assert!(md["version"].as_u64().unwrap() >= 1);
        // This member's devices and their distances, not the others'.
        let f = try_json(m.addr, "/api/fleet").unwrap();
        let listed: BTreeSet<&str> = f["classes"][0]["distances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device"].as_str().unwrap())
            .collect();
        let mine: BTreeSet<&str> = by_member[*id].iter().map(String::as_str).collect();
        assert_eq!(listed, mine, "{id}: {f}");
        assert_eq!(f["mode"], "cluster");
    }

    // A forged profile record in the bucket is refused and counted by the trainer.
    let js = nats.js(0).await;
    let profiles = js.get_key_value("edgewatch_v1_profiles").await.unwrap();
    let forged_key: String = "pump-x".bytes().map(|b| format!("{b:02x}")).collect();
    profiles
        .put(
            &forged_key,
            br#"{"device":"pump-0","metrics":["flow"],"values":[1e308],"windows":9,"end_ms":0,"outside":false,"member":"x"}"#
                .to_vec()
                .into(),
        )
        .await
        .unwrap();
    wait_until(
        "the forged profile refused",
        Duration::from_secs(20),
        || {
            metric(
                &members[first.as_str()],
                "edgewatch_fleet_profiles_refused_total",
            ) >= 1
        },
    )
    .await;

    // A forged peer model record (not even JSON) is refused and counted by every member, which
    // keeps the model it uses.
    let peers = js.get_key_value("edgewatch_v1_peers").await.unwrap();
    peers
        .put("m.7a7a", b"{\"epoch\": 99999".to_vec().into())
        .await
        .unwrap();
    wait_until(
        "the forged peer record refused everywhere",
        Duration::from_secs(20),
        || {
            members
                .values()
                .all(|m| metric(m, "edgewatch_fleet_peer_models_refused_total") >= 1)
        },
    )
    .await;
    assert!(members
        .values()
        .all(|m| model(m).is_some_and(|md| md["devices"] == fleet)));

    // A device of another member than the trainer drifts: its owner raises the event.
    let (drift_owner, drifter) = by_member
        .iter()
        .find(|(o, _)| **o != first)
        .map(|(o, d)| (o.clone(), d[0].clone()))
        .unwrap();
    publish(&client, &devices, 10, 40, &drifter).await;
    let m = &members[drift_owner.as_str()];
    wait_until(
        &format!("{drift_owner} raises a fleet event for {drifter}"),
        Duration::from_secs(30),
        || metric(m, "edgewatch_fleet_events_total") >= 1,
    )
    .await;
    let dev = try_json(m.addr, &format!("/api/devices/{drifter}")).unwrap();
    let e = &dev["state"]["metrics"]["flow"]["last_anomaly"];
    assert_eq!(e["detector"], "fleet", "{dev}");
    assert_eq!(e["agent"], drift_owner.as_str());
    assert!(e["score"].as_f64().unwrap() >= 0.5);
    for (id, other) in &members {
        let n = metric(other, "edgewatch_fleet_events_total");
        assert_eq!(n, u64::from(*id == drift_owner), "{id}: {}", logs(&members));
    }
    let v1 = model(&members[first.as_str()]).unwrap()["version"]
        .as_u64()
        .unwrap();

    // The trainer killed: another member takes the role over and refits from the bucket.
    members
        .get_mut(first.as_str())
        .unwrap()
        .proc
        .take()
        .unwrap()
        .kill9();
    let mut next = Vec::new();
    wait_until("another member trains", Duration::from_secs(40), || {
        next = trainer(&members);
        next.len() == 1
    })
    .await;
    let next = next[0].clone();
    assert_ne!(next, first);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !members.values().filter(|m| m.proc.is_some()).all(|m| {
        model(m).is_some_and(|md| {
            md["trainer"] == next.as_str()
                && md["version"].as_u64().unwrap() > v1
                && md["devices"] == fleet
        })
    }) {
        let models: Vec<Option<Value>> = members.values().map(model).collect();
        assert!(
            std::time::Instant::now() < deadline,
            "no model refitted by {next} over the whole fleet (v{v1} before): {models:?}\n{}",
            logs(&members)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(dir.path().join(format!("{next}.log"))).unwrap();
    assert!(
        log.contains("peer model fitted from the fleet's profiles"),
        "{log}"
    );
    for m in members.values_mut() {
        if let Some(p) = m.proc.take() {
            p.terminate();
        }
    }
}
