//! `bulwarkctl status` end to end: the real binary against three real
//! `bulwark-lb` processes (bind-mode VIP on loopback) and an in-process
//! bulwark-backup with a real etcd behind it; then with the backup service
//! gone, to see the partial report and its exit code.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Output;
use std::time::{Duration, Instant};

use bulwark_backup::Listeners;
use bulwark_common::shutdown::Shutdown;
use bulwark_lb::config::VipMode;
use bulwark_testkit::cluster::{LbSpec, lb_process};
use bulwark_testkit::tools::bin_path;
use bulwark_testkit::{CertFiles, Etcd, Pki, Process, TestDir, config, ports};

struct Endpoints {
    lb: String,
    backup: String,
}

async fn ctl(args: &[&str], ep: &Endpoints, cert: &CertFiles) -> Output {
    tokio::process::Command::new(bin_path("bulwarkctl").unwrap())
        .env("HOME", std::env::temp_dir())
        .args(["--lb-endpoint", &ep.lb, "--backup-endpoint", &ep.backup])
        .arg("--ca")
        .arg(&cert.ca)
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .args(args)
        .output()
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Three LB nodes on loopback, formed from `initialMembers`, one backend
/// seeded from the config, the VIP bound on a 127.79.0.0/16 address of this
/// test's own.
fn start_lb(pki: &Pki, dir: &TestDir, backend: SocketAddr) -> (Vec<Process>, Vec<SocketAddr>) {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let p = ports::free_ports(lo, 9).unwrap();
    let vip_ip = Ipv4Addr::new(127, 79, (std::process::id() % 250) as u8, 2);
    let vip_port = ports::free_port(IpAddr::V4(vip_ip)).unwrap();
    let addr = |i: usize| SocketAddr::new(lo, p[i]);
    let spec = LbSpec {
        pki,
        dir: dir.path(),
        members: (0..3)
            .map(|i| {
                let (id, z) = (i as u64 + 1, ["a", "b", "c"][i]);
                let zone = format!("zone-{z}");
                config::lb_member(id, &format!("lb-{id}"), &zone, addr(3 * i), addr(3 * i + 1))
            })
            .collect(),
    };
    let mut procs = Vec::new();
    let mut apis = Vec::new();
    for i in 0..3 {
        let id = i as u64 + 1;
        let (mut c, _) = spec.node(id, &["127.0.0.1"]).unwrap();
        c.admin.address = addr(3 * i + 2);
        c.vip.mode = VipMode::Bind;
        c.vip.address = Some(IpAddr::V4(vip_ip));
        c.vip.port = vip_port;
        c.backends = vec![config::lb_backend("api-a", backend, "zone-a")];
        c.shutdown_grace = Duration::from_secs(5);
        let config = spec.write(&c).unwrap();
        procs.push(
            lb_process(&format!("lb-{id}"), &config)
                .unwrap()
                .spawn()
                .unwrap(),
        );
        apis.push(addr(3 * i + 1));
    }
    (procs, apis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_status_shows_the_whole_control_plane_and_marks_what_is_missing() {
    bulwark_common::tls::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let dir = TestDir::new("ctl-status").unwrap();
    // A backend that accepts connections (the LB only needs its address).
    let backend_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = backend_listener.local_addr().unwrap();
    let (lbs, apis) = start_lb(&pki, &dir, backend);

    let etcd = Etcd::start().await.unwrap();
    let store = dir.join("store");
    let server = pki.server("backup", &["127.0.0.1"]).unwrap();
    let mut c = config::backup();
    c.node_name = "backup-1".into();
    c.admin.address = SocketAddr::from(([127, 0, 0, 1], 0));
    c.grpc.tls = config::tls(&server);
    c.grpc.access.operators = config::orgs(&["system:masters"]);
    c.etcd.endpoints = vec![etcd.endpoints()[0].clone()];
    c.etcd.tls = None;
    c.store.url = format!("file://{}", store.display());
    c.schedule.interval = None;
    c.drill.etcdutl = bulwark_testkit::tools::etcdutl().unwrap();
    c.drill.etcd = bulwark_testkit::tools::etcd(bulwark_testkit::EtcdVersion::V3_5).unwrap();
    let config = config::validated(&c).unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backup_addr = grpc.local_addr().unwrap().to_string();
    let shutdown = Shutdown::new();
    bulwark_backup::run(config, Listeners { grpc, admin }, &shutdown)
        .await
        .unwrap();

    let ep = Endpoints {
        lb: apis
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        backup: backup_addr,
    };
    let operator = pki.admin().unwrap();
    let viewer = pki.client("viewer", &[]).unwrap();

    // A backup and a drill, so the backup part has something to show.
    let out = ctl(&["backup", "create", "-o", "json"], &ep, &operator).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let snapshot = created["id"].as_str().unwrap().to_owned();
    let out = ctl(&["backup", "verify", "latest", "--drill"], &ep, &operator).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Status needs only read access. Wait until the cluster has a leader
    // holding the VIP and the seeded backend (the first leader seeds it).
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let out = ctl(&["status", "-o", "json"], &ep, &viewer).await;
        if out.status.success() {
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let lb = &r["lb"];
            if !lb["leader"].is_null()
                && lb["vip"]["holder"].is_u64()
                && lb["backends"].as_array().is_some_and(|b| b.len() == 1)
            {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no complete status within 60 s; last: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(report["complete"], true);
    let lb = &report["lb"];
    let leader: u64 = lb["leader"]
        .as_str()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The VIP is held by the leader, by name, since a real time.
    assert_eq!(lb["vip"]["holder"], leader);
    assert_eq!(lb["vip"]["mode"], "bind");
    assert_eq!(lb["vip"]["holder_name"], format!("lb-{leader}"));
    assert!(lb["vip"]["held_since"].is_string(), "{lb}");
    let members = lb["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{lb}");
    assert_eq!(
        members.iter().filter(|m| m["leader"] == true).count(),
        1,
        "{lb}"
    );
    assert!(members.iter().all(|m| m["role"] == "voter"), "{lb}");
    let b = &lb["backends"][0];
    assert_eq!(b["id"], "api-a");
    assert_eq!(b["zone"], "zone-a");
    assert_eq!(b["address"], backend.to_string());
    // No prober runs here: the leader counts none.
    assert_eq!(report["probers"], serde_json::json!([]));
    let bk = &report["backup"];
    assert_eq!(bk["answered_by"], "backup-1");
    assert_eq!(bk["last_backup"]["id"], snapshot.as_str());
    assert!(
        bk["last_backup"]["verified"]
            .as_str()
            .unwrap()
            .starts_with("passed"),
        "{bk}"
    );
    assert_eq!(bk["last_drill"]["snapshot"], snapshot.as_str());
    assert_eq!(bk["last_drill"]["passed"], true);

    // Given only a follower, status still shows the leader's view, with
    // each member's replication lag (only the leader knows it).
    let follower = (1..=3u64).find(|&i| i != leader).unwrap();
    let only_follower = Endpoints {
        lb: apis[follower as usize - 1].to_string(),
        backup: ep.backup.clone(),
    };
    let out = ctl(&["status", "-o", "json"], &only_follower, &viewer).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["lb"]["answered_by"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{leader} ")),
        "{r}"
    );
    assert!(
        r["lb"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["lag"].is_u64()),
        "{r}"
    );

    // A context without backup endpoints: the LB part is shown, the backup
    // part says it is not configured and how to, and that is no failure.
    let out = tokio::process::Command::new(bin_path("bulwarkctl").unwrap())
        .env("HOME", std::env::temp_dir())
        .args(["--lb-endpoint", &ep.lb, "status"])
        .arg("--ca")
        .arg(&viewer.ca)
        .arg("--cert")
        .arg(&viewer.cert)
        .arg("--key")
        .arg(&viewer.key)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("LOAD BALANCER, answered by node"), "{table}");
    assert!(
        table.contains("BACKUP not configured: no bulwark-backup endpoint; pass --backup-endpoint"),
        "{table}"
    );

    // The table names the same things.
    let out = ctl(&["status"], &ep, &viewer).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    eprintln!("TABLE\n{table}");
    for needle in [
        "LOAD BALANCER, answered by node",
        &format!("held by {leader} (lb-{leader}) since"),
        "api-a",
        "zone-a",
        "PROBER: none reporting to the leader",
        "last backup:",
        &snapshot,
        "last drill:",
    ] {
        assert!(table.contains(needle), "{needle:?} missing from:\n{table}");
    }

    // The backup service goes away: the LB part is still there, the backup
    // part says UNAVAILABLE, and the exit code is 3 (unreachable).
    shutdown.trigger();
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = ctl(&["status", "--timeout", "3s"], &ep, &viewer).await;
        if !out.status.success() {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "status still complete 30 s after the backup service stopped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    eprintln!("PARTIAL\n{table}\n{}", text(&out.stderr));
    assert!(table.contains("LOAD BALANCER, answered by node"), "{table}");
    assert!(
        table.contains("BACKUP UNAVAILABLE: bulwark-backup at"),
        "{table}"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("status is incomplete (backup unavailable)"),
        "{stderr}"
    );
    assert!(stderr.contains("hint:"), "{stderr}");
    let out = ctl(&["status", "-o", "yaml", "--timeout", "3s"], &ep, &viewer).await;
    assert_eq!(out.status.code(), Some(3));
    let yaml: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    assert_eq!(yaml["complete"], false, "{yaml}");
    assert!(yaml["lb"]["leader"].is_string(), "{yaml}");
    assert!(
        yaml["backup"]["unavailable"]
            .as_str()
            .unwrap()
            .starts_with("bulwark-backup at"),
        "{yaml}"
    );
    drop(lbs);
    drop(backend_listener);
}
