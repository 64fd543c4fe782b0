//! `bulwarkctl backup …` end to end: the real binary against an in-process
//! bulwark-backup over mTLS, with a real etcd behind it.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

use bulwark_backup::Listeners;
use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::bulwarkctl::backup as ctl;
use bulwark_testkit::{Etcd, Pki, config};

#[tokio::test]
async fn heavy_bulwarkctl_backup_commands() {
    bulwark_common::tls::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let mut c = etcd.client().await.unwrap();
    for i in 0..25 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    let store = tempfile::tempdir().unwrap();
    let server = pki.server("backup", &["127.0.0.1"]).unwrap();
    let mut cfg = config::backup();
    cfg.node_name = "ctl-node".into();
    cfg.admin.address = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.grpc.tls = config::tls(&server);
    cfg.grpc.access.operators = config::orgs(&["system:masters"]);
    cfg.etcd.endpoints = vec![etcd.endpoints()[0].clone()];
    cfg.etcd.tls = None;
    cfg.store.url = format!("file://{}", store.path().display());
    cfg.schedule.interval = None;
    cfg.deltas.enabled = false;
    cfg.drill.etcdutl = bulwark_testkit::tools::etcdutl().unwrap();
    cfg.drill.etcd = bulwark_testkit::tools::etcd(bulwark_testkit::EtcdVersion::V3_5).unwrap();
    let config = config::validated(&cfg).unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap().to_string();
    let shutdown = Shutdown::new();
    bulwark_backup::run(config, Listeners { grpc, admin }, &shutdown)
        .await
        .unwrap();
    let operator = pki.client("alice", &["system:masters"]).unwrap();
    let viewer = pki.client("bob", &[]).unwrap();

    let out = ctl(
        &["backup", "create", "--note", "from ctl", "-o", "json"],
        &addr,
        &operator,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["note"], "from ctl");
    assert_eq!(created["key_count"], 25);

    // A viewer may list but not create: exit 4 with a hint.
    let out = ctl(&["backup", "create"], &addr, &viewer).await;
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator"));
    let out = ctl(&["backup", "list"], &addr, &viewer).await;
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains(&id) && table.contains("never"), "{table}");

    let out = ctl(&["backup", "verify", "latest", "--drill"], &addr, &operator).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("passed"));
    let out = ctl(&["backup", "show", &id, "-o", "yaml"], &addr, &viewer).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("passed: true"));
    let out = ctl(&["backup", "status"], &addr, &viewer).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("ctl-node"));
    // `backup deltas` names the newest snapshot's timeline: 1, the only
    // etcd cluster this store has seen.
    let out = ctl(&["backup", "deltas", "-o", "json"], &addr, &viewer).await;
    let deltas: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "backup deltas -o json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(deltas["timeline"], 1, "{deltas}");
    assert_eq!(deltas["base_snapshot"], id.as_str(), "{deltas}");

    // The newest snapshot needs --force (exit 6), then it is gone (exit 5).
    let out = ctl(&["backup", "delete", &id], &addr, &operator).await;
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["backup", "delete", &id, "--force"], &addr, &operator).await;
    assert!(out.status.success());
    let out = ctl(&["backup", "show", &id], &addr, &viewer).await;
    assert_eq!(out.status.code(), Some(5));

    // `latest` is accepted by delete as by show and verify: it is resolved
    // to one id, which is printed, and as the newest it needs --force.
    let out = ctl(&["backup", "create", "-o", "json"], &addr, &operator).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let newest = created["id"].as_str().unwrap().to_owned();
    let out = ctl(&["backup", "delete", "latest"], &addr, &operator).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains(&format!("latest is {newest}")), "{stderr}");
    let out = ctl(
        &["backup", "delete", "latest", "--force", "-o", "json"],
        &addr,
        &operator,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deleted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(deleted["id"], newest.as_str());
    let out = ctl(&["backup", "show", &newest], &addr, &viewer).await;
    assert_eq!(out.status.code(), Some(5));

    gc_lists_then_deletes_what_a_crash_left(&addr, store.path(), &operator, &viewer).await;
    shutdown.trigger();
}

/// `backup gc`: a restore target a crashed coordinator left is kept while
/// young, listed by `--dry-run` once older than the grace period, then
/// deleted; viewers may not run it.
async fn gc_lists_then_deletes_what_a_crash_left(
    addr: &str,
    store: &std::path::Path,
    operator: &bulwark_testkit::CertFiles,
    viewer: &bulwark_testkit::CertFiles,
) {
    // The config names no cluster: the default directory.
    let target = store.join("kubernetes/restore/20200101T000000Z-r9-beef/target.db");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, vec![0u8; 4096]).unwrap();

    let out = ctl(&["backup", "gc", "--dry-run", "-o", "json"], addr, operator).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["collected"], serde_json::json!([]), "{v}");
    assert_eq!(v["young"][0]["reason"], "restore_target", "{v}");
    assert_eq!(v["grace_period_seconds"], 6.0 * 3600.0, "{v}");

    // Seven hours old: past the default grace period of six.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&target)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let out = ctl(&["backup", "gc", "--dry-run"], addr, operator).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("would delete 1 object(s), 4.0 KiB") && text.contains("restore_target"),
        "{text}"
    );
    assert!(target.exists());
    let out = ctl(&["backup", "gc"], addr, viewer).await;
    assert_eq!(out.status.code(), Some(4));
    assert!(target.exists());
    let out = ctl(&["backup", "gc", "-o", "json"], addr, operator).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["collected_bytes"], 4096, "{v}");
    assert!(!target.exists());
}
