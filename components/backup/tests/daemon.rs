//! The daemon: configuration checks, the gRPC API with its access rules,
//! and leadership across three real `bulwark-backup` processes.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::backup_client::BackupClient;
use bulwark_backup::Listeners;
use bulwark_backup::config::{BackupConfig, ByteSize};
use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::snapshot::manifest::{Manifest, Trigger};
use bulwark_backup::snapshot::retention::RetentionPolicy;
use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::tools::bin_path;
use bulwark_testkit::{Etcd, Pki, ProcessBuilder, TestDir, config};
use futures::StreamExt;

/// The config every daemon test here starts from: node `node` of cluster
/// `lab`, admin and gRPC on ephemeral ports, etcd without TLS, a file
/// store, and every snapshot kept; `schedule` sets the rest.
fn test_config(
    node: &str,
    pki_files: &bulwark_testkit::CertFiles,
    etcd: &Etcd,
    store_dir: &Path,
    schedule: impl FnOnce(&mut BackupConfig),
) -> BackupConfig {
    let mut c = config::backup();
    c.node_name = node.to_owned();
    c.cluster_name = "lab".into();
    c.admin.address = SocketAddr::from(([127, 0, 0, 1], 0));
    c.logging.level = "info,bulwark_backup=debug".into();
    c.grpc.address = SocketAddr::from(([127, 0, 0, 1], 0));
    c.grpc.tls = config::tls(pki_files);
    c.grpc.access.operators = config::orgs(&["system:masters"]);
    c.etcd.endpoints = etcd.endpoints();
    c.etcd.tls = None;
    c.store.url = format!("file://{}", store_dir.display());
    c.store.part_size = ByteSize::mib(5);
    c.retention.policy = RetentionPolicy {
        keep_last: Some(1000),
        exponential: None,
    };
    schedule(&mut c);
    c
}

/// Polls the store until the scheduled snapshots satisfy `done`. The
/// deadline only bounds a hung test; nothing here measures time.
async fn wait_scheduled(
    engine: &bulwark_backup::Engine,
    what: &str,
    done: impl Fn(&[Manifest]) -> bool,
) -> Vec<Manifest> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let list: Vec<Manifest> = engine
            .list_snapshots()
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.manifest.trigger == Trigger::Scheduled)
            .map(|s| s.manifest)
            .collect();
        if done(&list) {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}: {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[test]
fn check_config_names_what_is_wrong() {
    let Ok(bin) = bin_path("bulwark-backup") else {
        panic!("bulwark-backup is not built; cargo builds it for this package's tests");
    };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: bulwark.dev/v1alpha1\nkind: BackupConfiguration\n\
         store:\n  url: s3://bucket/p\n  options: {aws_endpiont: 'http://x'}\n\
         compression:\n  level: 30\n\
         encryption:\n  recipientFile: /nonexistent/age.txt\n",
    )
    .unwrap();
    let out = std::process::Command::new(&bin)
        .args(["--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("store: unknown option \"aws_endpiont\""),
        "{err}"
    );
    assert!(
        err.contains("compression.level: 30 is out of range"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/age.txt"), "{err}");
    assert!(err.contains("grpc.tls.certFile"), "{err}");
}

#[tokio::test]
async fn heavy_grpc_api_enforces_access_and_streams_progress() {
    bulwark_common::tls::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    common::put_small(&etcd, 30).await;
    let store = tempfile::tempdir().unwrap();
    let server = pki.server("backup", &["127.0.0.1", "localhost"]).unwrap();
    let tools = common::drill_tools();
    let c = test_config("api-node", &server, &etcd, store.path(), |c| {
        // No scheduled work at all: no election key among the counted keys.
        c.schedule.interval = None;
        c.deltas.enabled = false;
        c.drill.etcdutl = tools.etcdutl.clone();
        c.drill.etcd = tools.etcd.clone();
    });
    let config = config::validated(&c).unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap().to_string();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = Shutdown::new();
    bulwark_backup::run(config, Listeners { grpc, admin }, &shutdown)
        .await
        .unwrap();

    let operator = pki
        .client("alice", &["system:masters"])
        .unwrap()
        .tls_files()
        .load()
        .unwrap();
    let viewer = pki
        .client("bob", &["system:nodes"])
        .unwrap()
        .tls_files()
        .load()
        .unwrap();
    let op = BackupClient::new(bulwark_common::grpc::channel(&addr, &operator, None).unwrap());
    let view = BackupClient::new(bulwark_common::grpc::channel(&addr, &viewer, None).unwrap());

    // Creating is for operators; the stream reports progress and ends with done.
    let denied = view
        .clone()
        .create_snapshot(pb::CreateSnapshotRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let mut stream = op
        .clone()
        .create_snapshot(pb::CreateSnapshotRequest {
            note: "before upgrade".into(),
            member_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(msg) = stream.next().await {
        events.push(msg.unwrap().event.unwrap());
    }
    assert!(
        matches!(events[0], pb::snapshot_progress::Event::Connecting(_)),
        "{events:?}"
    );
    let Some(pb::snapshot_progress::Event::Done(done)) = events.last() else {
        panic!("last event must be done: {events:?}");
    };
    let manifest = done.manifest.clone().unwrap();
    assert_eq!(manifest.note, "before upgrade");
    assert_eq!(manifest.key_count, Some(30));

    // Reading is for everyone with a certificate.
    let list = view
        .clone()
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.snapshots.len(), 1);
    assert_eq!(list.snapshots[0].id, manifest.id);
    let latest = view
        .clone()
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot: Some(pb::SnapshotSelector {
                selector: Some(pb::snapshot_selector::Selector::Latest(true)),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.stored_sha256, manifest.stored_sha256);

    // A drill through the API.
    let mut stream = op
        .clone()
        .verify_snapshot(pb::VerifySnapshotRequest {
            snapshot: Some(pb::SnapshotSelector {
                selector: Some(pb::snapshot_selector::Selector::Id(manifest.id.clone())),
            }),
            drill: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut result = None;
    while let Some(msg) = stream.next().await {
        if let Some(pb::verify_progress::Event::Result(r)) = msg.unwrap().event {
            result = Some(r);
        }
    }
    let result = result.unwrap();
    assert!(result.passed, "{result:?}");
    assert_eq!(result.restored_key_count, Some(30));

    let status = view
        .clone()
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.node_name, "api-node");
    assert!(
        status.store_url.starts_with("file://"),
        "{}",
        status.store_url
    );
    assert_eq!(status.last_success.unwrap().id, manifest.id);
    let drill = status.last_drill.unwrap();
    assert!(drill.passed && drill.drill, "{drill:?}");
    assert!(status.last_verify.is_none(), "{:?}", status.last_verify);

    // A plain verification is shown (and exported) apart: the drill stays.
    let mut stream = op
        .clone()
        .verify_snapshot(pb::VerifySnapshotRequest {
            snapshot: Some(pb::SnapshotSelector {
                selector: Some(pb::snapshot_selector::Selector::Id(manifest.id.clone())),
            }),
            drill: false,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(msg) = stream.next().await {
        msg.unwrap();
    }
    let status = view
        .clone()
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.last_drill.as_ref(), Some(&drill));
    let verify = status.last_verify.unwrap();
    assert!(verify.passed && !verify.drill, "{verify:?}");

    // Deleting: operators only, and the newest needs force.
    let req = |force| pb::DeleteSnapshotRequest {
        id: manifest.id.clone(),
        force,
    };
    let e = view.clone().delete_snapshot(req(true)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = op.clone().delete_snapshot(req(false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    op.clone().delete_snapshot(req(true)).await.unwrap();
    let e = view
        .clone()
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot: Some(pb::SnapshotSelector {
                selector: Some(pb::snapshot_selector::Selector::Id(manifest.id.clone())),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Restore needs an operator and a confirmation (or a dry run).
    let e = view
        .clone()
        .restore(pb::RestoreRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = op
        .clone()
        .restore(pb::RestoreRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("--yes"), "{e}");

    // Metrics carry the outcome.
    let body = reqwest::get(format!("http://{admin_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("bulwark_backup_last_success_timestamp_seconds"),
        "{body}"
    );
    assert!(
        body.contains("bulwark_backup_last_drill_success 1"),
        "{body}"
    );
    assert!(
        body.contains("bulwark_backup_last_verify_success 1"),
        "{body}"
    );

    shutdown.trigger();
    assert_eq!(
        shutdown.wait(Duration::from_secs(20)).await,
        std::process::ExitCode::SUCCESS
    );
}

#[tokio::test]
async fn heavy_one_leader_takes_one_backup_per_tick_and_another_takes_over() {
    let pki = Pki::new().unwrap();
    let etcd = Etcd::cluster(3).await.unwrap();
    common::put_small(&etcd, 20).await;
    let store = tempfile::tempdir().unwrap();
    let bin = bin_path("bulwark-backup").unwrap();
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let dir = TestDir::new(&format!("backup-{i}")).unwrap();
        let server = pki.server(&format!("backup-{i}"), &["127.0.0.1"]).unwrap();
        let c = test_config(&format!("node-{i}"), &server, &etcd, store.path(), |c| {
            c.schedule.interval = Some(Duration::from_secs(2));
            c.schedule.lease_ttl = Duration::from_secs(3);
            c.schedule.retries = 0;
        });
        let config = config::write(dir.join("config.yaml"), &c).unwrap();
        let process = ProcessBuilder::new(format!("backup-{i}"), &bin)
            .arg("--config")
            .arg(&config)
            .spawn_in(dir)
            .unwrap();
        nodes.push(process);
    }
    let engine = common::engine_in(
        &etcd,
        common::file_store(store.path()),
        Keyring::none(),
        "lab",
    );
    let unique_ticks = |list: &[Manifest]| {
        let ticks: BTreeSet<_> = list.iter().map(|m| m.scheduled_for).collect();
        assert_eq!(
            ticks.len(),
            list.len(),
            "two snapshots for one tick: {list:#?}"
        );
    };

    let first = wait_scheduled(&engine, "three scheduled snapshots", |l| l.len() >= 3).await;
    unique_ticks(&first);
    let leaders: BTreeSet<_> = first.iter().map(|m| m.taken_by.clone()).collect();
    assert_eq!(leaders.len(), 1, "one leader takes every tick: {leaders:?}");
    let leader = leaders.into_iter().next().unwrap();

    // Kill the leader: another instance takes over after the lease lapses.
    let idx: usize = leader.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
    nodes[idx].kill().unwrap();
    let after = wait_scheduled(&engine, "a snapshot by another instance", |l| {
        l.iter().any(|m| m.taken_by != leader)
    })
    .await;
    unique_ticks(&after);
    let successors: BTreeSet<_> = after
        .iter()
        .filter(|m| m.taken_by != leader)
        .map(|m| m.taken_by.clone())
        .collect();
    assert_eq!(successors.len(), 1, "{successors:?}");

    // The remaining instances shut down gracefully on SIGTERM.
    for (i, node) in nodes.iter_mut().enumerate() {
        if i != idx {
            let status = node.stop().await.unwrap();
            assert!(status.is_some_and(|s| s.success()), "{status:?}");
        }
    }
}

/// Only the schedule leader runs the delta recorder; every instance's
/// status must still show its state and lag (non-leaders ask the leader),
/// not "stopped".
#[tokio::test]
async fn heavy_every_instance_reports_the_recorders_state() {
    bulwark_common::tls::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    common::put_small(&etcd, 10).await;
    let store = tempfile::tempdir().unwrap();
    let operator = pki.admin().unwrap().tls_files().load().unwrap();
    let mut clients = Vec::new();
    let mut shutdowns = Vec::new();
    for i in 1..=3 {
        // Instances dial each other with their serving certificate.
        let cert = pki
            .peer(&format!("backup-{i}"), &["bulwark:backup"], &["127.0.0.1"])
            .unwrap();
        let c = test_config(&format!("node-{i}"), &cert, &etcd, store.path(), |c| {
            // Long: the one snapshot is the recorder's own base.
            c.schedule.interval = Some(Duration::from_secs(24 * 3600));
            c.schedule.lease_ttl = Duration::from_secs(3);
        });
        let config = config::validated(&c).unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap().to_string();
        let shutdown = Shutdown::new();
        bulwark_backup::run(config, Listeners { grpc, admin }, &shutdown)
            .await
            .unwrap();
        shutdowns.push(shutdown);
        clients.push(BackupClient::new(
            bulwark_common::grpc::channel(&addr, &operator, None).unwrap(),
        ));
    }

    // Wait until the leader records: a snapshot, then a segment with a
    // write made after it.
    let mut c = etcd.client().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (leader, revision) = loop {
        let written = c.put("after/x", "1", None).await.unwrap();
        let revision = written.header().unwrap().revision();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut found = None;
        for client in &clients {
            let s = client
                .clone()
                .get_status(pb::GetStatusRequest { local_only: true })
                .await
                .unwrap()
                .into_inner();
            let d = s.deltas.unwrap_or_default();
            if s.schedule.as_ref().is_some_and(|sc| sc.is_leader)
                && d.state() == pb::DeltaState::Running
                && d.newest_revision >= revision
                && d.segment_count > 0
            {
                found = Some(s.node_name);
            }
        }
        if let Some(leader) = found {
            break (leader, revision);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never recorded deltas"
        );
    };

    // Ask each of the three.
    for client in &clients {
        let s = client
            .clone()
            .get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        let d = s.deltas.unwrap_or_default();
        assert!(
            matches!(d.state(), pb::DeltaState::Running | pb::DeltaState::Lagging),
            "{} (leader {leader}): {s:#?}",
            s.node_name
        );
        assert!(d.rpo_lag.is_some(), "{}: {s:#?}", s.node_name);
        assert!(d.newest_revision >= revision, "{}: {s:#?}", s.node_name);
        assert!(d.segment_count > 0, "{}: {s:#?}", s.node_name);
        assert_eq!(s.schedule.unwrap().leader, leader);
    }

    for shutdown in shutdowns {
        shutdown.trigger();
        assert_eq!(
            shutdown.wait(Duration::from_secs(20)).await,
            std::process::ExitCode::SUCCESS
        );
    }
}
