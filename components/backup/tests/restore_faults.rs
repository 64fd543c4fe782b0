//! Restore downloads under object-store faults: the snapshot download
//! breaks off mid-object, once where the coordinator builds the target and
//! once where a node's agent stages it. Each fails with an error naming the
//! object, and no node is touched (etcd's manifest and data dir stay as
//! they were, nothing half-downloaded is kept). The node's part of a
//! whole-cluster restore with real processes is in
//! `components/ctl/tests/restore.rs`.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bulwark_api::backup::v1 as pb;
use bulwark_backup::agent::Agent;
use bulwark_backup::config::RestoreConfig;
use bulwark_backup::encryption::Keyring;
use bulwark_backup::error::BackupError;
use bulwark_backup::faults::{Faults, UnreliableStore};
use bulwark_backup::pitr::Target;
use bulwark_backup::snapshot::SnapshotOptions;
use bulwark_testkit::Etcd;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn heavy_download_breaking_off_mid_object_touches_no_node() {
    let etcd = Etcd::start().await.unwrap();
    // Several MiB, so the object arrives in many chunks and breaks off
    // half-way through them.
    common::put_random_mib(&etcd, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let store = common::file_store(dir.path())
        .wrapped(|inner| Arc::new(UnreliableStore::new(inner, faults.clone())));
    let engine = common::engine(&etcd, store, Keyring::none());
    let m = engine
        .take_snapshot(
            SnapshotOptions::manual(""),
            &(),
            &CancellationToken::new(),
            &|| Ok(()),
        )
        .await
        .unwrap();

    // The coordinator's build of the target.
    let plan = engine
        .plan_restore(Some(&m.id), Target::Snapshot)
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    faults.fail_downloads(1);
    let err = engine
        .build_target(&plan, work.path(), &|_| {}, &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(faults.injected(), 1);
    assert!(
        matches!(err, BackupError::StoreUnavailable { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("injected failure: download"),
        "{err}"
    );
    assert!(err.to_string().contains(&m.object_key), "{err}");
    // Nothing is listed or changed by a failed build.
    assert_eq!(engine.list_snapshots().await.unwrap().len(), 1);

    // A node's agent staging the target: etcd's manifest and data dir.
    let node = tempfile::tempdir().unwrap();
    let data_dir = node.path().join("etcd-data");
    std::fs::create_dir_all(data_dir.join("member")).unwrap();
    std::fs::write(data_dir.join("member/sentinel"), b"old data").unwrap();
    let manifest = node.path().join("manifests/etcd.yaml");
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    let pod = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: etcd-m1, namespace: kube-system}}
spec:
  containers:
  - name: etcd
    command:
    - etcd
    - --name=m1
    - --data-dir={}
    - --advertise-client-urls=http://127.0.0.1:1
    - --initial-advertise-peer-urls=http://127.0.0.1:2
",
        data_dir.display()
    );
    std::fs::write(&manifest, &pod).unwrap();
    let state_dir = node.path().join("state");
    let agent = Agent::new(
        engine.clone(),
        RestoreConfig {
            etcd_manifest: manifest.clone(),
            state_dir: state_dir.clone(),
            ..Default::default()
        },
        "127.0.0.1:1".into(),
    );
    let request = pb::PrepareRestoreRequest {
        restore_id: "r1".into(),
        coordinator: "test".into(),
        spec: Some(pb::MemberRestoreSpec {
            snapshot: Some(pb::SnapshotSource {
                object_key: m.object_key.clone(),
                sha256: m.stored_sha256.clone(),
                size_bytes: m.stored_size_bytes,
            }),
            member_name: "m1".into(),
            peer_urls: vec!["http://127.0.0.1:2".into()],
            initial_cluster: "m1=http://127.0.0.1:2".into(),
            cluster_token: "t".into(),
            bump_revision: 0,
            mark_compacted: false,
        }),
        lock_ttl: None,
    };
    let staged = state_dir.join("r1/snapshot.db");
    faults.fail_downloads(1);
    let err = agent.prepare(request.clone()).await.unwrap_err();
    assert_eq!(faults.injected(), 2);
    assert!(
        err.to_string().contains("injected failure: download"),
        "{err}"
    );
    assert!(err.to_string().contains(&m.object_key), "{err}");
    // No node touched: manifest and data dir as they were, nothing staged,
    // no lock held.
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), pod);
    assert_eq!(
        std::fs::read(data_dir.join("member/sentinel")).unwrap(),
        b"old data"
    );
    assert!(!staged.exists(), "a half-downloaded {}", staged.display());
    assert!(matches!(
        agent.state("r1").await,
        Err(BackupError::NotFound { .. })
    ));

    // The store behaves again: the same prepare stages the whole object,
    // and aborting it leaves the node as it was.
    agent.prepare(request).await.unwrap();
    assert_eq!(
        std::fs::metadata(&staged).unwrap().len(),
        m.stored_size_bytes
    );
    agent.abort("r1", "test over", &|_| {}).await.unwrap();
    assert!(!staged.exists());
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), pod);
    assert!(data_dir.join("member/sentinel").exists());
}
