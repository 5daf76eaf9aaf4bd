//! Every file in `configs/` (subdirectories included) loads and validates — YAML with edgewatch,
//! nats-server configs with `nats-server -t`; broken files fail with file, key, line and column.

use crate::common::require;
use edgewatch::config::{self, ConfigError};
use std::path::{Path, PathBuf};

/// Every file under `configs/` whose extension is one of `exts`, subdirectories included, sorted.
fn config_files(exts: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, exts, out);
            } else if path
                .extension()
                .is_some_and(|e| exts.iter().any(|x| e == *x))
            {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("configs"),
        exts,
        &mut out,
    );
    out.sort();
    out
}

fn load_any(path: &Path) -> Result<&'static str, ConfigError> {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    Ok(if name.contains("aggregator") {
        config::load::<edgewatch_aggregator::AggregatorConfig>(path)?;
        "aggregator"
    } else if name.contains("agent") {
        config::load::<edgewatch_agent::AgentConfig>(path)?;
        "agent"
    } else if name.contains("simulat") {
        config::load::<edgewatch_simulators::SimulatorConfig>(path)?;
        "simulator"
    } else if name.contains("demo") {
        config::load::<edgewatch::demo::DemoConfig>(path)?;
        "demo"
    } else {
        panic!(
            "{}: file name does not say which component it configures",
            path.display()
        )
    })
}

#[test]
fn every_file_in_configs_loads() {
    let mut seen = Vec::new();
    for path in config_files(&["yaml", "yml"]) {
        let kind = load_any(&path).unwrap_or_else(|e| panic!("{e}"));
        seen.push((kind, path));
    }
    for kind in ["agent", "aggregator", "simulator", "demo"] {
        assert!(
            seen.iter().any(|(k, _)| *k == kind),
            "configs/ has no {kind} example (saw {seen:?})"
        );
    }
    // The cluster examples are among them, and every aggregator there names the NATS cluster.
    let cluster: Vec<_> = seen
        .iter()
        .filter(|(_, p)| p.parent().is_some_and(|d| d.ends_with("configs/cluster")))
        .collect();
    assert_eq!(cluster.len(), 5, "configs/cluster/*.yaml: {cluster:?}");
    for (kind, path) in cluster {
        if *kind == "aggregator" {
            let cfg: edgewatch_aggregator::AggregatorConfig = config::load(path).unwrap();
            let c = cfg.cluster.expect("a cluster: block");
            assert_eq!(c.servers.len(), 3, "{}", path.display());
            assert_eq!(cfg.mqtt.addresses().len(), 3, "{}", path.display());
        }
    }
}

#[test]
fn every_nats_server_config_in_configs_is_valid() {
    let bin = require("nats-server");
    let confs = config_files(&["conf"]);
    assert_eq!(confs.len(), 3, "configs/cluster/n1..n3.conf: {confs:?}");
    for conf in confs {
        let out = std::process::Command::new(&bin)
            .arg("-t")
            .arg("-c")
            .arg(&conf)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("is valid"),
            "nats-server -t -c {}: {text}",
            conf.display()
        );
    }
}

#[test]
fn a_broken_file_reports_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    std::fs::write(
        &path,
        "id: gw-1\nwindow:\n  size_ms: 60000\n  allowed_lateness_ms: [1\n",
    )
    .unwrap();
    let e = load_any(&path).unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with(&format!("{}:", path.display())), "{text}");
    assert!(e.problems[0].location.is_some(), "{text}");

    std::fs::write(&path, "id: gw-1\nuplink:\n  partitions: 0\n  qos: 2\n").unwrap();
    let e = load_any(&path).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("uplink.partitions (line 3, col 3): must be > 0, got 0"),
        "{text}"
    );
    assert!(
        text.contains("uplink.qos (line 4, col 3): must be 0 or 1, got 2"),
        "{text}"
    );
}

#[test]
fn config_check_command_exits_1_and_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my-aggregator.yaml");
    std::fs::write(&path, "id: agg.1\nhttp:\n  listen: nowhere\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("id (line 1, col 1): must match"), "{err}");
    assert!(err.contains("http.listen (line 3, col 3)"), "{err}");

    let ok = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/agent.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["config", "check"])
        .arg(&ok)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `config check` on a deployment's aggregator files: the shipped pair covers 0..64 exactly once;
/// a gap and an overlap exit 1 naming the partitions and the files; one file alone gets a note.
#[test]
fn config_check_names_partitions_nobody_or_two_aggregators_own() {
    let bin = env!("CARGO_BIN_EXE_edgewatch");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let check = |files: &[PathBuf]| {
        let out = std::process::Command::new(bin)
            .args(["config", "check"])
            .args(files)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let shipped = [
        root.join("configs/aggregator-1.yaml"),
        root.join("configs/aggregator-2.yaml"),
    ];
    let (code, text) = check(&shipped);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("owned by"), "{text}");

    let (code, text) = check(&shipped[..1]);
    assert_eq!(code, Some(0), "one file alone is not an error: {text}");
    assert!(text.contains("note: partitions 32-63 of 0..64"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, id: &str, owned: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("id: {id}\npartitions: 64\nowned: {owned}\n")).unwrap();
        p
    };
    let a = write("aggregator-a.yaml", "agg-a", "[\"0-29\"]");
    let b = write("aggregator-b.yaml", "agg-b", "[\"28-40\", 50]");
    let (code, text) = check(&[a.clone(), b]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("partitions 41-49, 51-63 (of 0..64) are owned by none of"),
        "{text}"
    );
    assert!(
        text.contains("partitions 28-29 are owned by agg-a") && text.contains("and agg-b"),
        "{text}"
    );

    let c = dir.path().join("aggregator-c.yaml");
    std::fs::write(&c, "id: agg-c\npartitions: 32\nowned: [\"30-31\"]\n").unwrap();
    let (code, text) = check(&[a, c]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("partitions: 32 here but 64 in"), "{text}");
}

#[test]
fn secrets_never_appear_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    std::fs::write(&path, "id: gw-1\nsource:\n  mqtt:\n    password: hunter2\n").unwrap();
    let e = load_any(&path).unwrap_err().to_string();
    assert!(
        e.contains("source.mqtt.username (line 3, col 3): required when a password is set"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn tls_blocks_are_validated_and_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    std::fs::write(
        &path,
        "id: gw-1\nsource:\n  mqtt:\n    port: 8883\n    tls:\n      ca_file: \"\"\n      client_cert_file: gw.pem\n",
    )
    .unwrap();
    let text = load_any(&path).unwrap_err().to_string();
    assert!(
        text.contains("source.mqtt.tls.ca_file (line 6, col 7): must not be empty"),
        "{text}"
    );
    assert!(
        text.contains("source.mqtt.tls.client_key_file (line 5, col 5): required when client_cert_file is set"),
        "{text}"
    );

    std::fs::write(
        &path,
        "id: gw-1\nuplink:\n  mqtt:\n    tls:\n      ca_file: ca.pem\n      keyfile: k.pem\n",
    )
    .unwrap();
    let e = load_any(&path).unwrap_err();
    let p = &e.problems[0];
    assert_eq!(p.key, "uplink.mqtt.tls.keyfile", "{e}");
    assert!(p.message.contains("unknown field `keyfile`"), "{e}");

    std::fs::write(
        &path,
        "id: gw-1\nsource:\n  mqtt:\n    tls:\n      ca_file: ca.pem\n      client_cert_file: gw.pem\n      client_key_file: gw.key\n      server_name: broker.example\n",
    )
    .unwrap();
    assert_eq!(load_any(&path).unwrap(), "agent");
}
