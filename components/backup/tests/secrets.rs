//! Secrets stay secret: a real `bulwark-backup` process at debug log level
//! backs up an etcd holding a recognisable Secret value, encrypted to an
//! age key, and verifies the backup with a restore drill. Neither the
//! value nor the key appears in its log, the stored object does not hold
//! the value in the clear, and everything the daemon wrote (the `file://`
//! store it created) is private to its user: directories 0700, files 0600.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::backup_client::BackupClient;
use bulwark_testkit::tools::bin_path;
use bulwark_testkit::{Etcd, Pki, ProcessBuilder, TestDir, config, ports};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_no_secret_in_logs_and_private_files() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let canary = format!(
        "bulwark-canary-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut c = etcd.client().await.unwrap();
    c.put("/registry/secrets/default/token", canary.clone(), None)
        .await
        .unwrap();
    common::put_small(&etcd, 10).await;

    let dir = TestDir::new("backup-secrets").unwrap();
    let key = common::write_identity(dir.path(), "key.txt");
    let key_text = std::fs::read_to_string(&key).unwrap();
    let secret_key = key_text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .unwrap()
        .to_owned();
    // The daemon creates the store directory itself.
    let store = dir.join("store");
    let server = pki.server("backup", &["127.0.0.1", "localhost"]).unwrap();
    let addr = std::net::SocketAddr::new(
        [127, 0, 0, 1].into(),
        ports::free_port([127, 0, 0, 1].into()).unwrap(),
    );
    let tools = common::drill_tools();
    let mut c = config::backup();
    c.node_name = "secrets-node".into();
    c.cluster_name = "lab".into();
    c.admin.address = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    c.logging.level = "debug".into();
    c.grpc.address = addr;
    c.grpc.tls = config::tls(&server);
    c.grpc.access.operators = config::orgs(&["system:masters"]);
    c.etcd.endpoints = etcd.endpoints();
    c.etcd.tls = None;
    c.store.url = format!("file://{}", store.display());
    c.encryption.recipient_file = Some(key.clone());
    c.encryption.identity_files = vec![key.clone()];
    c.schedule.interval = None;
    c.drill.etcdutl = tools.etcdutl.clone();
    c.drill.etcd = tools.etcd.clone();
    let config = config::write(dir.join("backup.yaml"), &c).unwrap();
    let mut daemon = ProcessBuilder::new("bulwark-backup", bin_path("bulwark-backup").unwrap())
        .arg("--config")
        .arg(&config)
        .spawn()
        .unwrap();
    daemon
        .wait_for_port(addr, Duration::from_secs(30))
        .await
        .unwrap();

    let operator = pki.admin().unwrap().tls_files().load().unwrap();
    let op = BackupClient::new(
        bulwark_common::grpc::channel(&addr.to_string(), &operator, None).unwrap(),
    );
    let mut stream = op
        .clone()
        .create_snapshot(pb::CreateSnapshotRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut id = None;
    while let Some(msg) = stream.next().await {
        if let Some(pb::snapshot_progress::Event::Done(d)) = msg.unwrap().event {
            id = d.manifest.map(|m| m.id);
        }
    }
    let id = id.expect("the snapshot finished");
    let mut stream = op
        .clone()
        .verify_snapshot(pb::VerifySnapshotRequest {
            snapshot: Some(pb::SnapshotSelector {
                selector: Some(pb::snapshot_selector::Selector::Id(id.clone())),
            }),
            drill: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(msg) = stream.next().await {
        events.push(msg.unwrap());
    }
    let last = format!("{:?}", events.last());
    assert!(last.contains("passed: true"), "verification: {events:#?}");
    daemon.stop().await.unwrap();

    // Not in the log, whatever the level.
    let log = daemon.log();
    assert!(log.contains(&id), "the log is the daemon's: {log}");
    assert!(!log.contains(&canary), "the etcd value leaked into the log");
    assert!(
        !log.contains(&secret_key),
        "the age identity leaked into the log"
    );
    let tls_key = std::fs::read_to_string(&server.key).unwrap();
    let tls_key_body: String = tls_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(
        !log.contains(&tls_key_body[..40]),
        "the TLS key leaked into the log"
    );

    // Not in the store in the clear, and private on disk.
    let mut files = 0;
    walk(&store, &mut |path, mode, is_dir| {
        if is_dir {
            assert_eq!(mode, 0o700, "{} is {mode:o}", path.display());
        } else {
            files += 1;
            assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
            let bytes = std::fs::read(path).unwrap();
            assert!(
                !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "{} holds the etcd value in the clear",
                path.display()
            );
        }
    });
    assert!(
        files >= 2,
        "a snapshot object and its manifest: {files} files"
    );
}

/// Calls `f(path, permission bits, is_dir)` for `root` and everything under it.
fn walk(root: &Path, f: &mut dyn FnMut(&Path, u32, bool)) {
    let meta = std::fs::metadata(root).unwrap();
    f(root, meta.permissions().mode() & 0o777, meta.is_dir());
    if meta.is_dir() {
        for entry in std::fs::read_dir(root).unwrap() {
            walk(&entry.unwrap().path(), f);
        }
    }
}
