//! Packages and services: the `.deb` built by cargo-deb from the binary under test is installed with
//! `dpkg -i` on this machine, its binary checks its packaged configurations, `systemd-analyze verify`
//! accepts its units, and `dpkg --purge` removes everything; the daemons speak sd_notify.

use crate::common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `program args` as root: directly when this is root, else through `sudo -n` (which must work).
fn as_root(program: &str) -> Command {
    // SAFETY-free check of the effective user: `id -u` is always there.
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

#[test]
fn the_deb_installs_checks_its_configs_verifies_its_units_and_purges_cleanly() {
    let cargo_deb = require("cargo-deb");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = tempfile::tempdir().unwrap();
    // The binary under test, as built by `cargo test` (cargo-deb strips it into the package).
    run(Command::new(&cargo_deb)
        .current_dir(root)
        .args([
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--deb-revision",
            "test",
            "-o",
        ])
        .arg(out_dir.path())
        .env(
            "CARGO_TARGET_DIR",
            Path::new(env!("CARGO_BIN_EXE_edgewatch"))
                .parent()
                .unwrap()
                .parent()
                .unwrap(),
        ));
    let deb = out_dir.path().join(format!(
        "edgewatch_{}-test_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(deb.is_file(), "no package at {}", deb.display());

    let listing =
        String::from_utf8(run(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout).unwrap();
    for path in [
        "./usr/bin/edgewatch",
        "./lib/systemd/system/edgewatch-agent.service",
        "./lib/systemd/system/edgewatch-aggregator.service",
        "./etc/edgewatch/agent.yaml",
        "./etc/edgewatch/aggregator.yaml",
        "./usr/share/doc/edgewatch/copyright",
    ] {
        assert!(
            listing.contains(path),
            "{path} is not in the package:\n{listing}"
        );
    }

    if installed("edgewatch") {
        run(as_root("dpkg").args(["--purge", "edgewatch"]));
    }
    run(as_root("dpkg").arg("-i").arg(&deb));
    assert!(installed("edgewatch"));

    // The installed binary is ours and accepts the configurations it ships with.
    let version = run(Command::new("/usr/bin/edgewatch").arg("--version")).stdout;
    assert_eq!(
        String::from_utf8_lossy(&version).trim(),
        format!("edgewatch {}", env!("CARGO_PKG_VERSION"))
    );
    let check = run(Command::new("/usr/bin/edgewatch").args([
        "config",
        "check",
        "/etc/edgewatch/agent.yaml",
        "/etc/edgewatch/aggregator.yaml",
    ]));
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("agent.yaml: ok (Agent)")
            && text.contains("aggregator.yaml: ok (Aggregator)"),
        "{text}"
    );
    assert!(
        !text.contains("note:"),
        "the packaged aggregator owns every partition: {text}"
    );
    run(Command::new("getent").args(["passwd", "edgewatch"]));

    // The units as installed: systemd's own checker finds nothing to say about them.
    let verify = Command::new(require("systemd-analyze"))
        .args([
            "verify",
            "/lib/systemd/system/edgewatch-agent.service",
            "/lib/systemd/system/edgewatch-aggregator.service",
        ])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success(),
        "systemd-analyze verify failed:\n{said}"
    );
    assert!(
        !said.contains("edgewatch"),
        "systemd-analyze verify complains about the units:\n{said}"
    );

    // Remove keeps the edited configuration (conffiles), purge removes it, the state and the user.
    run(as_root("dpkg").args(["-r", "edgewatch"]));
    assert!(!Path::new("/usr/bin/edgewatch").exists());
    assert!(!Path::new("/lib/systemd/system/edgewatch-agent.service").exists());
    assert!(
        Path::new("/etc/edgewatch/agent.yaml").exists(),
        "remove keeps conffiles"
    );
    run(as_root("dpkg").args(["--purge", "edgewatch"]));
    assert!(!installed("edgewatch"));
    assert!(
        !Path::new("/etc/edgewatch").exists(),
        "purge removes /etc/edgewatch"
    );
    assert!(
        !Command::new("getent")
            .args(["passwd", "edgewatch"])
            .status()
            .unwrap()
            .success(),
        "purge removes the user"
    );
}

#[test]
fn the_gateway_variant_carries_only_the_agent() {
    let cargo_deb = require("cargo-deb");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = tempfile::tempdir().unwrap();
    run(Command::new(&cargo_deb)
        .current_dir(root)
        .args([
            "deb",
            "--variant",
            "gateway",
            "--no-build",
            "--profile",
            "dev",
            "--deb-revision",
            "test",
            "-o",
        ])
        .arg(out_dir.path())
        .env(
            "CARGO_TARGET_DIR",
            Path::new(env!("CARGO_BIN_EXE_edgewatch"))
                .parent()
                .unwrap()
                .parent()
                .unwrap(),
        ));
    let deb = out_dir.path().join(format!(
        "edgewatch-gateway_{}-test_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ));
    let listing =
        String::from_utf8(run(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout).unwrap();
    assert!(
        listing.contains("./lib/systemd/system/edgewatch-agent.service"),
        "{listing}"
    );
    assert!(!listing.contains("aggregator"), "{listing}");
    let info = String::from_utf8(
        run(Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Conflicts"))
        .stdout,
    )
    .unwrap();
    assert_eq!(info.trim(), "edgewatch");
}

/// The agent under a (fake) service manager: READY=1 once started, WATCHDOG=1 pings at half the
/// interval systemd asks for, STOPPING=1 on SIGTERM, on the socket named by NOTIFY_SOCKET.
#[test]
fn the_agent_speaks_sd_notify() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let cfg = dir.path().join("agent.yaml");
    // A source broker that is not there: the agent keeps retrying, and is alive meanwhile.
    let port = free_port();
    std::fs::write(
        &cfg,
        format!("id: gw-notify\nsource:\n  mqtt: {{ host: 127.0.0.1, port: {port} }}\n  subscriptions:\n    - topic: \"s/{{device}}/{{metric}}\"\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "200000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = listener.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    for _ in 0..3 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let mut seen = next();
    while seen == "WATCHDOG=1" {
        seen = next();
    }
    assert_eq!(seen, "STOPPING=1");
    assert!(child.wait().unwrap().success());
}
