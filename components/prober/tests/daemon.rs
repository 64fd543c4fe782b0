//! The `bulwark-prober` binary: `--check-config`, flags over the file, the
//! admin endpoints, and a graceful SIGTERM.

// Helpers outside #[test] functions panic on purpose too: a failed setup
// is a failed test (and prints the harness's process logs).
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulwark_prober::config::TcpTarget;
use bulwark_testkit::admin::http_get;
use bulwark_testkit::{Pki, ProcessBuilder, TestDir, config, ports};
use support::eventually;

const BIN: &str = env!("CARGO_BIN_EXE_bulwark-prober");
const WAIT: Duration = Duration::from_secs(15);

fn write(dir: &TestDir, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(path: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(path)
        .arg("--check-config")
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const HEADER: &str = "apiVersion: bulwark.dev/v1alpha1\nkind: ProberConfiguration\n";

#[test]
fn check_config_accepts_a_valid_file_and_names_every_bad_field() {
    let pki = Pki::new().unwrap();
    let dir = TestDir::new("prober-config").unwrap();
    let good = write(
        &dir,
        "good.yaml",
        &format!(
            "{HEADER}nodeName: cp-1\nzone: a\napiservers:\n  tls: {{caFile: '{}'}}\n  targets:\n  - {{id: cp-1, address: 10.0.0.1:6443, zone: a}}\n",
            pki.ca_path().display()
        ),
    );
    let (code, stdout, stderr) = check_config(&good, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("valid ProberConfiguration"), "{stdout}");

    let bad = write(
        &dir,
        "bad.yaml",
        &format!(
            "{HEADER}nodeName: cp-1\napiservers:\n  tls: {{caFile: /nonexistent/ca.crt}}\n  targets:\n  - {{id: cp-1, address: 10.0.0.1:6443}}\n  - {{id: cp-1, address: 10.0.0.2:6443}}\nprobing: {{timeout: 0ms}}\n"
        ),
    );
    let (code, _, stderr) = check_config(&bad, &[]);
    assert_eq!(code, 2);
    for needle in [
        "probing.timeout: 0s is out of range",
        "apiservers.tls.caFile: cannot read CA bundle /nonexistent/ca.crt",
        "apiservers.targets[1].id: duplicate \"cp-1\" (also targets[0])",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in\n{stderr}");
    }

    // A flag overrides the file, and is validated at the same path.
    let (code, _, stderr) = check_config(&good, &["--lb-endpoints", "lb-1:9443,nope"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("report.endpoints[1]: \"nope\" has no port"),
        "{stderr}"
    );

    let unknown = write(
        &dir,
        "unknown.yaml",
        &format!("{HEADER}nodeName: x\nprobes: []\n"),
    );
    let (code, _, stderr) = check_config(&unknown, &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("probes: unknown field"), "{stderr}");
}

/// Node cp-1 with its admin endpoints on `admin`, checking one TCP port.
fn probing_one_port(admin: SocketAddr, target: SocketAddr) -> bulwark_prober::config::ProberConfig {
    let mut c = config::prober();
    c.node_name = "cp-1".into();
    c.admin.address = admin;
    c.tcp = vec![TcpTarget {
        id: "cp-1".into(),
        address: target.to_string(),
        zone: String::new(),
    }];
    c
}

#[tokio::test]
async fn runs_serves_admin_and_stops_gracefully_on_sigterm() {
    let dir = TestDir::new("prober-daemon").unwrap();
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = ports::loopback_port().unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], port));
    let c = probing_one_port(admin, target.local_addr().unwrap());
    let config = config::write(dir.join("prober.yaml"), &c).unwrap();
    let mut process = ProcessBuilder::new("bulwark-prober", BIN)
        .arg("--config")
        .arg(&config)
        .args(["--log-format", "json"])
        .spawn()
        .unwrap();
    process.wait_for_port(admin, WAIT).await.unwrap();

    // Without report endpoints, ready as soon as the checks run.
    let (code, body) = http_get(admin, "/readyz?verbose").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("[+]probing ok"), "{body}");
    assert_eq!(http_get(admin, "/livez").await.0, 200);
    eventually(WAIT, "the TCP check to settle up", || async {
        let (_, metrics) = http_get(admin, "/metrics").await;
        metrics
            .contains("bulwark_prober_check_up{target=\"cp-1\",kind=\"tcp\"} 1")
            .then_some(())
    })
    .await;
    // Series registered at start reach the binary's /metrics (they are
    // lost when created before the recorder is installed).
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("bulwark_build_info{component=\"prober\"")
            && metrics.contains("bulwark_prober_resyncs_total 0"),
        "{metrics}"
    );

    process.terminate().unwrap();
    let status = process.wait_exit(WAIT).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", process.log());
    let log = process.log();
    assert!(log.contains("\"message\":\"prober stopped\""), "{log}");
    drop(target);
}

/// A port that an outgoing connection of the host holds (the kernel took
/// it from the ephemeral range) fails the start with the reason and the
/// fix, not only "address already in use".
#[tokio::test]
async fn a_port_held_by_an_outgoing_connection_fails_the_start_with_the_reason() {
    let dir = TestDir::new("prober-port-taken").unwrap();
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outgoing = tokio::net::TcpStream::connect(server.local_addr().unwrap())
        .await
        .unwrap();
    let taken = outgoing.local_addr().unwrap();
    let c = probing_one_port(taken, server.local_addr().unwrap());
    let config = config::write(dir.join("prober.yaml"), &c).unwrap();
    let mut process = ProcessBuilder::new("bulwark-prober", BIN)
        .arg("--config")
        .arg(&config)
        .spawn()
        .unwrap();
    let status = process.wait_exit(WAIT).await.unwrap();
    let log = process.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "binding the admin (admin.address) listener on {taken}: Address already in use (os error 98): "
        )),
        "{log}"
    );
    assert!(
        log.contains("inside net.ipv4.ip_local_port_range")
            && log.contains(&format!(
                "net.ipv4.ip_local_reserved_ports={}",
                taken.port()
            )),
        "{log}"
    );
    drop(outgoing);
}
