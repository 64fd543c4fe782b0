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
use bulwark_testkit::{Etcd, config};
use common::faults::{Faults, UnreliableStore};
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
            // The committed snapshot itself, decoded by the agent (as a
            // snapshot-only restore asks): the prepare restores a member
            // from it, which needs a real database.
            snapshot: Some(pb::SnapshotSource {
                object_key: m.object_key.clone(),
                sha256: m.stored_sha256.clone(),
                size_bytes: m.stored_size_bytes,
                snapshot_id: m.id.clone(),
                raw_size_bytes: m.raw_size_bytes,
                served_by: String::new(),
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
    let prebuilt = node.path().join("etcd-data.bulwark-r1-prebuilt");
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
    assert!(!prebuilt.exists(), "no member restored from it");
    assert!(matches!(
        agent.state("r1").await,
        Err(BackupError::NotFound { .. })
    ));

    // The store behaves again: the same prepare stages the whole decoded
    // snapshot and restores the member beside the running one; aborting
    // leaves the node as it was.
    agent.prepare(request.clone()).await.unwrap();
    assert_eq!(std::fs::metadata(&staged).unwrap().len(), m.raw_size_bytes);
    assert!(prebuilt.join("member/wal").is_dir(), "the prebuilt member");
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), pod);
    agent.abort("r1", "test over", &|_| {}).await.unwrap();
    assert!(!staged.exists());
    assert!(!prebuilt.exists());

    // Something at the prebuilt member's path that this restore did not
    // make (the pre-flight refuses it; a direct prepare must too): refused
    // after the fetch, left as it was, the node released.
    std::fs::create_dir_all(prebuilt.join("member")).unwrap();
    std::fs::write(prebuilt.join("member/theirs"), b"not ours").unwrap();
    let err = agent.prepare(request).await.unwrap_err();
    assert!(matches!(err, BackupError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("not touching it"), "{err}");
    assert_eq!(
        std::fs::read(prebuilt.join("member/theirs")).unwrap(),
        b"not ours"
    );
    assert!(!staged.exists());
    assert!(matches!(
        agent.state("r1").await,
        Err(BackupError::NotFound { .. })
    ));
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), pod);
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), pod);
    assert!(data_dir.join("member/sentinel").exists());
}

/// A snapshot-only restore's node fetches the committed snapshot itself:
/// the encrypted, compressed object streams through the decoder straight
/// into the staging file (etcd's own snapshot, trailer and size checked,
/// no other copy kept). A node without the snapshot's age identity is
/// named by the pre-flight and refused before anything is fetched; a
/// flipped byte in the stored object is refused naming the snapshot and
/// both failed checks, nothing staged, no lock held.
#[tokio::test]
async fn heavy_an_agent_decodes_the_stored_snapshot_straight_into_its_staging_file() {
    let etcd = Etcd::start().await.unwrap();
    common::put_random_mib(&etcd, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = tempfile::tempdir().unwrap();
    let key = common::write_identity(keys_dir.path(), "key.txt");
    let keys = Keyring::load(Some(&key), &[]).unwrap();
    let engine = common::engine(&etcd, common::file_store(dir.path()), keys);
    let m = engine
        .take_snapshot(
            SnapshotOptions::manual(""),
            &(),
            &CancellationToken::new(),
            &|| Ok(()),
        )
        .await
        .unwrap();
    let key_id = m.encryption.key_id().unwrap().to_owned();
    assert!(m.stored_size_bytes < m.raw_size_bytes, "compressed: {m:?}");
    let request = |rid: &str| pb::PrepareRestoreRequest {
        restore_id: rid.into(),
        coordinator: "test".into(),
        spec: Some(pb::MemberRestoreSpec {
            snapshot: Some(pb::SnapshotSource {
                object_key: m.object_key.clone(),
                sha256: m.stored_sha256.clone(),
                size_bytes: m.stored_size_bytes,
                snapshot_id: m.id.clone(),
                raw_size_bytes: m.raw_size_bytes,
                served_by: String::new(),
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
    let check = pb::CheckRestoreRequest {
        restore_id: "r3".into(),
        target_size_bytes: m.raw_size_bytes,
        key_id: key_id.clone(),
        ..Default::default()
    };
    let no_identity = format!("no age identity for key {key_id} here");

    // A node without the identity: named by the pre-flight, refused.
    let keyless = Arc::new(bulwark_backup::Engine {
        keys: Keyring::none(),
        ..(*engine).clone()
    });
    let other = tempfile::tempdir().unwrap();
    let other_data = other.path().join("etcd-data");
    let (agent, _, _, state_dir) = node_agent(&keyless, other.path(), &other_data);
    let problems = agent.check(check.clone()).await.unwrap().problems;
    assert!(
        problems.iter().any(|p| p.contains(&no_identity)),
        "{problems:?}"
    );
    let err = agent.prepare(request("r3")).await.unwrap_err();
    assert!(matches!(err, BackupError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains(&no_identity), "{err}");
    assert!(!state_dir.join("r3/snapshot.db").exists());

    // A node with it: the decoded snapshot is staged, and only it.
    let node = tempfile::tempdir().unwrap();
    let data_dir = node.path().join("etcd-data");
    let (agent, manifest, pod, state_dir) = node_agent(&engine, node.path(), &data_dir);
    let problems = agent.check(check).await.unwrap().problems;
    assert!(
        !problems.iter().any(|p| p.contains("age identity")),
        "{problems:?}"
    );
    agent.prepare(request("r3")).await.unwrap();
    let staged = state_dir.join("r3/snapshot.db");
    let bytes = std::fs::read(&staged).unwrap();
    assert_eq!(bytes.len() as u64, m.raw_size_bytes);
    // etcd's trailer: the SHA-256 of everything before it.
    let (body, trailer) = bytes.split_at(bytes.len() - 32);
    let trailer: String = trailer.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(trailer, m.etcd_sha256);
    let mut h = bulwark_backup::pipeline::hashing::Sha256::new();
    h.update(body);
    assert_eq!(h.finish_hex().0, m.etcd_sha256);
    let kept: Vec<_> = std::fs::read_dir(state_dir.join("r3"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept, ["snapshot.db"], "no stored copy kept beside it");
    agent.abort("r3", "test over", &|_| {}).await.unwrap();
    assert!(!staged.exists());

    // One byte of the stored object flipped: refused naming the snapshot
    // and the stored hash, nothing staged, no lock held.
    let path = bulwark_backup::store::layout::object_path(engine.store.prefix(), &m.object_key);
    let mut bad = engine
        .store
        .inner()
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    engine
        .store
        .inner()
        .put(&path, PutPayload::from(bad))
        .await
        .unwrap();
    let err = agent.prepare(request("r4")).await.unwrap_err();
    assert!(matches!(err, BackupError::Corrupt { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&m.id), "{text}");
    assert!(text.contains("stored_hash"), "{text}");
    assert!(text.contains("decrypt"), "the layer that tripped: {text}");
    assert!(!state_dir.join("r4/snapshot.db").exists());
    assert!(matches!(
        agent.state("r4").await,
        Err(BackupError::NotFound { .. })
    ));
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), pod);
}

/// A node whose data dir's file system has no room for the restored member
/// is refused before anything is fetched or moved. Where the restore
/// tool's complete output cannot be renamed into place (the data dir's
/// path is taken by a dangling symlink, which a directory cannot replace),
/// the restore fails naming both paths and the rollback removes that
/// `-prebuilt` output, and only it.
#[tokio::test]
async fn heavy_space_check_refuses_up_front_and_the_rollback_removes_an_unrenamed_prebuilt_member()
{
    let etcd = Etcd::start().await.unwrap();
    common::put_small(&etcd, 50).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = common::engine(&etcd, common::file_store(dir.path()), Keyring::none());
    // The target as the coordinator uploads it: plain, for the agent.
    let key = "testcluster/restore/r2/target.db";
    let (built, _work) = uploaded_target(&engine, key).await;

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
            ..Default::default()
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

    // The real size: prepared, the member restored beside the running
    // one into its -prebuilt dir, which cannot take the data dir's place.
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
    let partial = node.path().join("etcd-data.bulwark-r2-prebuilt");
    assert!(
        err.to_string().contains(&format!(
            "moving {} to {}",
            partial.display(),
            data_dir.display()
        )),
        "{err}"
    );
    assert!(
        !node.path().join("etcd-data.bulwark-r2-partial").exists(),
        "the prebuilt member is moved, not restored again"
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

/// One node's files for [`start_node`]: its manifest, data dir and state dir.
struct NodeFiles {
    manifest: std::path::PathBuf,
    data_dir: std::path::PathBuf,
    state_dir: std::path::PathBuf,
    pod: String,
}

fn node_files(root: &std::path::Path, i: usize) -> NodeFiles {
    let dir = root.join(format!("node-{i}"));
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let data_dir = dir.join("etcd-data");
    // Nothing listens on these URLs: the member is not running, which a
    // pre-flight and a dry run do not need.
    let pod = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: etcd-m{i}, namespace: kube-system}}
spec:
  containers:
  - name: etcd
    command:
    - etcd
    - --name=m{i}
    - --data-dir={}
    - --advertise-client-urls=http://127.0.0.1:1
    - --initial-advertise-peer-urls=http://127.0.{i}.1:2380
",
        data_dir.display()
    );
    NodeFiles {
        manifest: dir.join("manifests/etcd.yaml"),
        data_dir,
        state_dir: dir.join("state"),
        pod,
    }
}

/// Starts node `i`'s bulwark-backup (its restore agent, and a coordinator
/// for every node's agent at `peers`) on `grpc`.
#[allow(clippy::too_many_arguments)]
async fn start_node(
    i: usize,
    files: &NodeFiles,
    grpc: tokio::net::TcpListener,
    peers: &[String],
    cert: &bulwark_testkit::CertFiles,
    etcd: &Etcd,
    store: &std::path::Path,
) -> bulwark_common::shutdown::Shutdown {
    let tools = common::drill_tools();
    let mut c = config::backup();
    c.node_name = format!("node-{i}");
    c.cluster_name = "lab".into();
    c.admin.address = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    c.grpc.tls = config::tls(cert);
    c.grpc.access.operators = config::orgs(&["system:masters"]);
    c.grpc.access.peers = Some(config::orgs(&["bulwark:backup"]));
    c.etcd.endpoints = etcd.endpoints();
    c.etcd.tls = None;
    c.store.url = format!("file://{}", store.display());
    c.schedule.interval = None;
    c.deltas.enabled = false;
    c.drill.etcdutl = tools.etcdutl;
    c.drill.etcd = tools.etcd;
    c.restore.etcd_manifest.clone_from(&files.manifest);
    c.restore.state_dir.clone_from(&files.state_dir);
    // The member's facts are configured, so the agent answers
    // GetNodeInfo even while its manifest is missing.
    c.restore.member_name = Some(format!("m{i}"));
    c.restore.data_dir = Some(files.data_dir.clone());
    c.restore.peer_urls = vec![format!("http://127.0.{i}.1:2380")];
    c.restore.client_urls = vec!["http://127.0.0.1:1".into()];
    c.restore.peers = peers.to_vec();
    let config = config::validated(&c).unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = bulwark_common::shutdown::Shutdown::new();
    bulwark_backup::run(config, bulwark_backup::Listeners { grpc, admin }, &shutdown)
        .await
        .unwrap();
    shutdown
}

/// Every event of one `Backup.Restore` call, and its restore id.
async fn restore_events(
    client: &mut bulwark_api::backup::v1::backup_client::BackupClient<tonic::transport::Channel>,
    dry_run: bool,
) -> (String, Vec<pb::restore_progress::Event>) {
    use futures::StreamExt as _;
    let mut stream = client
        .restore(pb::RestoreRequest {
            dry_run,
            confirm: !dry_run,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut id = String::new();
    let mut events = Vec::new();
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        id = msg.restore_id;
        events.extend(msg.event);
    }
    (id, events)
}

/// The pre-flight asks every node before anything is fetched: node-0's
/// manifest is not in place, node-1's data dir path is a file, node-2's
/// agent does not answer. One refusal (FAILED_PRECONDITION, which
/// bulwarkctl exits 6 for) names all three; nothing was fetched, staged,
/// uploaded or moved on any node, and the failed restore's record says so
/// (`Backup.GetRestore`). Once the three are fixed, a dry run passes
/// pre-flight and prepare on every node, and its record has every phase's
/// time and each node's last step; `ListRestores` lists both, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_preflight_names_every_problem_on_every_node_and_fetches_nothing() {
    use bulwark_api::backup::v1::backup_client::BackupClient;
    bulwark_common::tls::install_crypto_provider();
    let etcd = Etcd::start().await.unwrap();
    common::put_small(&etcd, 20).await;
    let root = tempfile::tempdir().unwrap();
    let store_dir = root.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let engine = common::engine_in(
        &etcd,
        common::file_store(&store_dir),
        Keyring::none(),
        "lab",
    );
    let snapshot = engine
        .take_snapshot(
            SnapshotOptions::manual(""),
            &(),
            &CancellationToken::new(),
            &|| Ok(()),
        )
        .await
        .unwrap();
    let objects_before = common::all_keys(&engine.store).await;

    let pki = bulwark_testkit::Pki::new().unwrap();
    let cert = pki
        .peer("backup", &["bulwark:backup"], &["127.0.0.1", "localhost"])
        .unwrap();
    let files: Vec<NodeFiles> = (0..3).map(|i| node_files(root.path(), i)).collect();
    // node-0: no manifest. node-1: a file where the data dir should be.
    // node-2: a data dir, and its manifest, but no agent yet.
    std::fs::write(&files[1].manifest, &files[1].pod).unwrap();
    std::fs::write(&files[1].data_dir, b"not a directory").unwrap();
    std::fs::write(&files[2].manifest, &files[2].pod).unwrap();
    std::fs::create_dir_all(files[2].data_dir.join("member")).unwrap();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let down = listeners.pop().unwrap();
    drop(down);
    let mut shutdowns = Vec::new();
    for (i, grpc) in listeners.into_iter().enumerate() {
        shutdowns.push(start_node(i, &files[i], grpc, &peers, &cert, &etcd, &store_dir).await);
    }
    let operator = pki
        .client("alice", &["system:masters"])
        .unwrap()
        .tls_files()
        .load()
        .unwrap();
    let mut client =
        BackupClient::new(bulwark_common::grpc::channel(&peers[0], &operator, None).unwrap());

    let (refused_id, events) = restore_events(&mut client, false).await;
    let Some(pb::restore_progress::Event::Failed(f)) = events.last() else {
        panic!("the restore must fail: {events:?}");
    };
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, pb::restore_progress::Event::Plan(_))),
        "no plan is announced for a refused restore: {events:?}"
    );
    assert_eq!(f.phase, pb::RestorePhase::Preflight as i32, "{f:?}");
    assert_eq!(f.code, tonic::Code::FailedPrecondition as i32, "{f:?}");
    let m = &f.message;
    assert!(
        m.starts_with("pre-flight found 3 problem(s) on 3 node(s)"),
        "{m}"
    );
    assert!(m.contains("nothing was fetched or changed"), "{m}");
    assert!(
        m.contains(&format!(
            "node node-0: etcd's manifest {} is not in place",
            files[0].manifest.display()
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "node node-1: the data dir {} exists but is not a directory",
            files[1].data_dir.display()
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "node at {}: its restore agent is unreachable",
            peers[2]
        )),
        "{m}"
    );
    assert_eq!(f.rollback_instructions, "nothing was changed on any node");
    assert!(f.rolled_back && f.nodes.is_empty(), "{f:?}");
    // Nothing fetched, staged, uploaded or moved.
    assert_eq!(
        common::all_keys(&engine.store).await.len(),
        objects_before.len() + 1
    );
    for (i, n) in files.iter().enumerate() {
        assert!(!n.state_dir.exists(), "node-{i} staged something");
    }
    assert!(!files[0].manifest.exists());
    assert_eq!(
        std::fs::read(&files[1].data_dir).unwrap(),
        b"not a directory"
    );
    assert!(files[2].data_dir.join("member").is_dir());
    // The one new object is the refused restore's record.
    let record = client
        .get_restore(pb::GetRestoreRequest {
            restore_id: refused_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state, pb::RestoreState::Failed as i32, "{record:?}");
    assert_eq!(record.phase, pb::RestorePhase::Preflight as i32);
    assert_eq!(record.error, *m);
    assert!(record.rolled_back);
    assert!(record.finished_at.is_some() && record.started_at.is_some());
    let timed: Vec<&str> = record.timings.iter().map(|t| t.name.as_str()).collect();
    assert!(timed.starts_with(&["plan", "preflight"]), "{timed:?}");

    // The operator fixes every node; a dry run gets through.
    std::fs::write(&files[0].manifest, &files[0].pod).unwrap();
    std::fs::remove_file(&files[1].data_dir).unwrap();
    std::fs::create_dir_all(files[1].data_dir.join("member")).unwrap();
    let grpc = tokio::net::TcpListener::bind(&peers[2]).await.unwrap();
    shutdowns.push(start_node(2, &files[2], grpc, &peers, &cert, &etcd, &store_dir).await);
    let (dry_id, events) = restore_events(&mut client, true).await;
    let Some(pb::restore_progress::Event::Done(summary)) = events.last() else {
        panic!("the dry run must pass: {events:?}");
    };
    assert!(summary.dry_run);
    let record = client
        .get_restore(pb::GetRestoreRequest {
            restore_id: dry_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state, pb::RestoreState::DryRun as i32, "{record:?}");
    assert_eq!(record.snapshot_id, summary.snapshot_id);
    let timed: Vec<(&str, &str)> = record
        .timings
        .iter()
        .map(|t| (t.name.as_str(), t.node_name.as_str()))
        .collect();
    for phase in ["plan", "preflight", "prepare"] {
        assert!(timed.contains(&(phase, "")), "{phase}: {timed:?}");
    }
    // A snapshot-only restore downloads, builds and uploads nothing on the
    // coordinator: every node fetches and decodes the stored snapshot.
    for phase in ["download", "upload"] {
        assert!(
            !timed.iter().any(|(p, _)| *p == phase),
            "{phase}: {timed:?}"
        );
    }
    for node in ["node-0", "node-1", "node-2"] {
        assert!(
            timed.contains(&("fetch_snapshot", node)),
            "{node}: {timed:?}"
        );
    }
    let mut nodes: Vec<&str> = record.nodes.iter().map(|n| n.node_name.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["node-0", "node-1", "node-2"], "{record:?}");
    // The dry run's last step on each node: the release of its lock.
    assert!(
        record
            .nodes
            .iter()
            .all(|n| n.step == pb::NodeStep::Rollback as i32
                && n.status == pb::StepStatus::Done as i32),
        "{record:?}"
    );
    // Nothing moved: every manifest in place, node-1's and node-2's data
    // dirs where they were (node-0 never had one).
    for n in &files {
        assert!(n.manifest.exists(), "{}", n.manifest.display());
    }
    assert!(files[1].data_dir.join("member").is_dir() && files[2].data_dir.join("member").is_dir());
    assert!(!files[0].data_dir.exists());
    let list = client
        .list_restores(pb::ListRestoresRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = list
        .restores
        .iter()
        .map(|r| r.restore_id.as_str())
        .collect();
    assert_eq!(ids, [dry_id.as_str(), refused_id.as_str()]);
    let unknown = client
        .get_restore(pb::GetRestoreRequest {
            restore_id: "20990101T000000Z-none".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    // A coordinator that died after PREPARE: every node holds restore r7,
    // no member is restored. Resuming it rolls every node back; a dry run
    // cannot be resumed.
    let peer = cert.tls_files().load().unwrap();
    for (i, address) in peers.iter().enumerate() {
        let mut agent = bulwark_api::backup::v1::restore_agent_client::RestoreAgentClient::new(
            bulwark_common::grpc::channel(address, &peer, None).unwrap(),
        );
        agent
            .prepare_restore(pb::PrepareRestoreRequest {
                restore_id: "r7".into(),
                coordinator: "node-9".into(),
                spec: Some(pb::MemberRestoreSpec {
                    // The snapshot itself, decoded by each agent: the
                    // prepare restores each member from it beside the old.
                    snapshot: Some(pb::SnapshotSource {
                        object_key: snapshot.object_key.clone(),
                        sha256: snapshot.stored_sha256.clone(),
                        size_bytes: snapshot.stored_size_bytes,
                        snapshot_id: snapshot.id.clone(),
                        raw_size_bytes: snapshot.raw_size_bytes,
                        served_by: String::new(),
                    }),
                    member_name: format!("m{i}"),
                    peer_urls: vec![format!("http://127.0.{i}.1:2380")],
                    initial_cluster:
                        "m0=http://127.0.0.1:2380,m1=http://127.0.1.1:2380,m2=http://127.0.2.1:2380"
                            .into(),
                    cluster_token: "t".into(),
                    bump_revision: 0,
                    mark_compacted: false,
                }),
                lock_ttl: None,
                skip_space_check: false,
            })
            .await
            .unwrap();
    }
    let mut died =
        bulwark_backup::restore::record::RestoreRecord::started("r7", "node-9", chrono::Utc::now());
    died.phase = "prepare".into();
    engine.record_restore(&died).await.unwrap();
    let resumed = client
        .resume_restore(pb::ResumeRestoreRequest {
            restore_id: "r7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let events = collect(resumed).await;
    let Some(pb::restore_progress::Event::Failed(f)) = events.last() else {
        panic!("not resumable: {events:?}");
    };
    assert!(f.rolled_back, "{f:?}");
    assert_eq!(f.phase, pb::RestorePhase::Prepare as i32, "{f:?}");
    for i in 0..3 {
        assert!(
            f.message
                .contains(&format!("node node-{i} (its member is not restored)")),
            "{}",
            f.message
        );
    }
    for (i, n) in files.iter().enumerate() {
        assert!(
            !n.state_dir.join("r7/snapshot.db").exists(),
            "node-{i} released its staged snapshot"
        );
        assert!(
            !n.data_dir
                .with_file_name("etcd-data.bulwark-r7.journal")
                .exists()
        );
        assert!(
            !n.data_dir
                .with_file_name("etcd-data.bulwark-r7-prebuilt")
                .exists(),
            "node-{i}'s prebuilt member removed by the rollback"
        );
    }
    let record = client
        .get_restore(pb::GetRestoreRequest {
            restore_id: "r7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state, pb::RestoreState::Failed as i32, "{record:?}");
    assert!(
        record.rolled_back && record.coordinator == "node-0",
        "{record:?}"
    );
    // A dry run is not resumable: refused in the stream.
    let refused = client
        .resume_restore(pb::ResumeRestoreRequest {
            restore_id: dry_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let err = collect_err(refused).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("was a dry run"), "{err:?}");
    for s in shutdowns {
        s.trigger();
    }
}

async fn collect(
    mut stream: tonic::Streaming<pb::RestoreProgress>,
) -> Vec<pb::restore_progress::Event> {
    let mut events = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        events.extend(msg.event);
    }
    events
}

async fn collect_err(mut stream: tonic::Streaming<pb::RestoreProgress>) -> tonic::Status {
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without an error"),
            Err(s) => return s,
        }
    }
}

/// An agent killed mid-restore loses its memory, not its journal
/// (`<dataDir>.bulwark-<id>.journal`). Killed after its member was
/// restored, the restarted agent holds the node for the coordinator (the
/// node's state shows the restored member; AbortRestore then puts the
/// original back). Killed after the manifest and the data dir were moved
/// but before a member was restored (here the restore tool failed on a
/// damaged staged file), the restarted agent rolls the node back on its
/// own. No data dir is deleted either way.
#[tokio::test]
async fn heavy_a_restarted_agent_holds_a_restored_node_and_rolls_back_a_half_done_one() {
    let etcd = Etcd::start().await.unwrap();
    common::put_small(&etcd, 30).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = common::engine(&etcd, common::file_store(dir.path()), Keyring::none());
    let key = "testcluster/restore/crash/target.db";
    let (built, _work) = uploaded_target(&engine, key).await;
    let spec = pb::MemberRestoreSpec {
        snapshot: Some(pb::SnapshotSource {
            object_key: key.into(),
            sha256: built.sha256.clone(),
            size_bytes: built.size,
            ..Default::default()
        }),
        member_name: "m1".into(),
        peer_urls: vec!["http://127.0.0.1:2".into()],
        initial_cluster: "m1=http://127.0.0.1:2".into(),
        cluster_token: "t".into(),
        bump_revision: 0,
        mark_compacted: false,
    };
    let prepare = |rid: &str| pb::PrepareRestoreRequest {
        restore_id: rid.into(),
        coordinator: "test".into(),
        spec: Some(spec.clone()),
        lock_ttl: None,
        skip_space_check: false,
    };
    let restore = |rid: &str| pb::RestoreMemberRequest {
        restore_id: rid.into(),
        spec: Some(spec.clone()),
        dry_run: false,
    };
    let node = tempfile::tempdir().unwrap();
    let data_dir = node.path().join("etcd-data");
    std::fs::create_dir_all(data_dir.join("member")).unwrap();
    std::fs::write(data_dir.join("member/sentinel"), b"old data").unwrap();
    let (agent, manifest, pod, state_dir) = node_agent(&engine, node.path(), &data_dir);
    let journal = |rid: &str| node.path().join(format!("etcd-data.bulwark-{rid}.journal"));
    // The same node's agent after a restart: the same config, nothing
    // rewritten on disk.
    let restart = || {
        Agent::new(
            engine.clone(),
            RestoreConfig {
                etcd_manifest: manifest.clone(),
                state_dir: state_dir.clone(),
                ..Default::default()
            },
            "127.0.0.1:1".into(),
        )
    };

    // Killed after its member was restored: held for the coordinator.
    agent.prepare(prepare("r5")).await.unwrap();
    assert!(journal("r5").exists(), "prepared: journaled");
    agent.restore_member(restore("r5"), &|_| {}).await.unwrap();
    drop(agent);
    let agent = restart();
    assert_eq!(agent.recover().await.unwrap().as_deref(), Some("r5"));
    let state = agent.state("r5").await.unwrap();
    assert!(
        state.restored && !state.manifest_in_place && state.data_dir_moved,
        "{state:?}"
    );
    assert!(
        data_dir.join("member/snap/db").exists(),
        "the restored member"
    );
    assert!(journal("r5").exists());
    agent
        .abort("r5", "the coordinator rolls back", &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), pod);
    assert_eq!(
        std::fs::read(data_dir.join("member/sentinel")).unwrap(),
        b"old data"
    );
    assert!(
        node.path()
            .join("etcd-data.bulwark-r5-restored/member")
            .is_dir()
    );
    assert!(!journal("r5").exists(), "released: no journal");
    // Nothing left to recover.
    drop(agent);
    let agent = restart();
    assert_eq!(agent.recover().await.unwrap(), None);

    // Killed after the manifest and the data dir were moved, no member
    // restored (the member prepare built beside the old one is gone when
    // it should take the data dir's place, and the coordinator never got
    // to roll back): rolled back on restart.
    agent.prepare(prepare("r6")).await.unwrap();
    std::fs::remove_dir_all(node.path().join("etcd-data.bulwark-r6-prebuilt")).unwrap();
    agent
        .restore_member(restore("r6"), &|_| {})
        .await
        .unwrap_err();
    assert!(!manifest.exists() && !data_dir.exists());
    assert!(
        node.path()
            .join("etcd-data.bulwark-r6/member/sentinel")
            .exists()
    );
    drop(agent);
    let agent = restart();
    assert_eq!(agent.recover().await.unwrap().as_deref(), Some("r6"));
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), pod);
    assert_eq!(
        std::fs::read(data_dir.join("member/sentinel")).unwrap(),
        b"old data"
    );
    assert!(!node.path().join("etcd-data.bulwark-r6").exists());
    assert!(!journal("r6").exists());
    assert!(matches!(
        agent.state("r6").await,
        Err(BackupError::NotFound { .. })
    ));
}

/// Snapshots etcd, builds the snapshot as a restore target and uploads it
/// at `key` as the coordinator does (plain, for the agents). Returns the
/// built target and the directory it lives in (deleted when dropped).
async fn uploaded_target(
    engine: &bulwark_backup::Engine,
    key: &str,
) -> (
    bulwark_backup::restore::pitr::BuiltTarget,
    tempfile::TempDir,
) {
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
    (built, work)
}
