//! Restore downloads under object-store faults: the snapshot download
//! breaks off mid-object, once where the coordinator builds the target and
//! once where a node's agent stages it. Each fails with an error naming the
//! object, and no node is touched (etcd's manifest and data dir stay as
//! they were, nothing half-downloaded is kept). A node without room for
//! the restored member is refused before anything is fetched, and the
//! restore tool's output whose final rename fails is removed by the
//! rollback. The node's part of a
//! whole-cluster restore with real processes is in
//! `components/ctl/tests/restore.rs`.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bulwark_api::backup::v1 as pb;
use bulwark_backup::config::RestoreConfig;
use bulwark_backup::error::BackupError;
use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::restore::agent::Agent;
use bulwark_backup::restore::pitr::Target;
use bulwark_backup::snapshot::SnapshotOptions;
use bulwark_backup::store::faults::{Faults, UnreliableStore};
use bulwark_testkit::Etcd;
use object_store::{ObjectStoreExt as _, PutPayload};
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
    let (agent, manifest, pod, state_dir) = node_agent(&engine, node.path(), &data_dir);
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
        skip_space_check: false,
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

/// A node whose data dir's file system has no room for the restored member
/// is refused before anything is fetched or moved. Where the restore
/// tool's complete output cannot be renamed into place (the data dir's
/// path is taken by a dangling symlink, which a directory cannot replace),
/// the restore fails naming both paths and the rollback removes that
/// `-partial` output, and only it.
#[tokio::test]
async fn heavy_space_check_refuses_up_front_and_the_rollback_removes_an_unrenamed_partial() {
    let etcd = Etcd::start().await.unwrap();
    common::put_small(&etcd, 50).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = common::engine(&etcd, common::file_store(dir.path()), Keyring::none());
    let m = engine
        .take_snapshot(
            SnapshotOptions::manual(""),
            &(),
            &CancellationToken::new(),
            &|| Ok(()),
        )
        .await
        .unwrap();
    let plan = engine
        .plan_restore(Some(&m.id), Target::Snapshot)
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let built = engine
        .build_target(&plan, work.path(), &|_| {}, &CancellationToken::new())
        .await
        .unwrap();
    // The target as the coordinator uploads it: plain, for the agent.
    let key = "testcluster/restore/r2/target.db";
    let object = bulwark_backup::store::layout::object_path(engine.store.prefix(), key);
    engine
        .store
        .inner()
        .put(
            &object,
            PutPayload::from(std::fs::read(&built.path).unwrap()),
        )
        .await
        .unwrap();

    // A node whose data dir's path is a dangling symlink.
    let node = tempfile::tempdir().unwrap();
    let data_dir = node.path().join("etcd-data");
    std::os::unix::fs::symlink(node.path().join("nowhere"), &data_dir).unwrap();
    let (agent, manifest, pod, state_dir) = node_agent(&engine, node.path(), &data_dir);
    let spec = |size_bytes| pb::MemberRestoreSpec {
        snapshot: Some(pb::SnapshotSource {
            object_key: key.into(),
            sha256: built.sha256.clone(),
            size_bytes,
        }),
        member_name: "m1".into(),
        peer_urls: vec!["http://127.0.0.1:2".into()],
        initial_cluster: "m1=http://127.0.0.1:2".into(),
        cluster_token: "t".into(),
        bump_revision: 0,
        mark_compacted: false,
    };
    let prepare = |size_bytes, skip_space_check| pb::PrepareRestoreRequest {
        restore_id: "r2".into(),
        coordinator: "test".into(),
        spec: Some(spec(size_bytes)),
        lock_ttl: None,
        skip_space_check,
    };

    // A snapshot no disk here holds (1 EiB): refused up front, by name.
    let err = agent.prepare(prepare(1 << 60, false)).await.unwrap_err();
    assert!(matches!(err, BackupError::Refused(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("not enough free space on node test-node"),
        "{text}"
    );
    assert!(text.contains("bytes free"), "{text}");
    assert!(text.contains(&data_dir.display().to_string()), "{text}");
    assert!(!state_dir.exists(), "nothing fetched: {text}");
    assert!(matches!(
        agent.state("r2").await,
        Err(BackupError::NotFound { .. })
    ));
    // Skipping the check, the same request gets as far as the download,
    // which finds the object smaller than the spec says.
    let err = agent.prepare(prepare(1 << 60, true)).await.unwrap_err();
    assert!(matches!(err, BackupError::Corrupt { .. }), "{err:?}");

    // The real size: prepared; the member is restored into its -partial
    // dir, which cannot take the data dir's place.
    agent.prepare(prepare(built.size, false)).await.unwrap();
    let err = agent
        .restore_member(
            pb::RestoreMemberRequest {
                restore_id: "r2".into(),
                spec: Some(spec(built.size)),
                dry_run: false,
            },
            &|_| {},
        )
        .await
        .unwrap_err();
    let partial = node.path().join("etcd-data.bulwark-r2-partial");
    assert!(
        err.to_string().contains(&format!(
            "moving {} to {}",
            partial.display(),
            data_dir.display()
        )),
        "{err}"
    );
    assert!(partial.join("member/wal").is_dir(), "the tool's output");
    let state = agent.state("r2").await.unwrap();
    assert!(
        state
            .manual_rollback
            .contains(&format!("rm -rf {}", partial.display())),
        "{state:?}"
    );
    let events = std::sync::Mutex::new(Vec::new());
    agent
        .abort("r2", "test", &|e| events.lock().unwrap().push(e))
        .await
        .unwrap();
    assert!(!partial.exists(), "the rollback removed the partial output");
    assert!(
        std::fs::symlink_metadata(&data_dir).is_ok_and(|m| m.is_symlink()),
        "what is at the data dir's path is left alone"
    );
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), pod);
    let events = events.into_inner().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.path == partial.display().to_string()),
        "the removal is reported: {events:?}"
    );
    let kept: Vec<_> = std::fs::read_dir(node.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".bulwark-"))
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
}

/// A node's agent over a tempdir: etcd's static pod manifest naming
/// `data_dir`, and a state dir. Returns the agent, the manifest's path and
/// text (to check it is untouched) and the state dir.
fn node_agent(
    engine: &Arc<bulwark_backup::Engine>,
    node: &std::path::Path,
    data_dir: &std::path::Path,
) -> (Agent, std::path::PathBuf, String, std::path::PathBuf) {
    let manifest = node.join("manifests/etcd.yaml");
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
    let state_dir = node.join("state");
    let agent = Agent::new(
        engine.clone(),
        RestoreConfig {
            etcd_manifest: manifest.clone(),
            state_dir: state_dir.clone(),
            ..Default::default()
        },
        "127.0.0.1:1".into(),
    );
    (agent, manifest, pod, state_dir)
}
