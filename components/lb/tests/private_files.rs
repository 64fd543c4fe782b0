//! What a `bulwark-lb` process writes is private to its user, whatever
//! umask it was started with: the data directory is 0700 and the Raft log
//! in it 0600. Its log never holds its TLS private key.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use bulwark_api::lb::v1 as lb;
use bulwark_testkit::cluster::{LbCluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_data_dir_is_private_and_the_key_stays_out_of_the_log() {
    let mut c = LbCluster::start(Options {
        nodes: 1,
        backends: vec![],
        vip: None,
        snapshot_every: Some(10),
        ..Default::default()
    })
    .await;
    c.wait_for_holder(None, Duration::from_secs(30)).await;
    // Enough writes for a snapshot, so every kind of file exists.
    let mut op = c.client(1);
    for i in 0..14 {
        op.add_backend(lb::AddBackendRequest {
            id: format!("api-{i}"),
            address: format!("127.0.0.1:{}", 10_000 + i),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let node = c.node(1);
    let data_dir = node.data_dir.clone();
    let mut files = 0;
    let mut stack = vec![data_dir.clone()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
            files += 1;
        }
    }
    assert!(files >= 1, "nothing written under {}", data_dir.display());

    c.node_mut(1).process.stop().await.unwrap();
    let log = c.node(1).process.log();
    assert!(log.contains("store open"), "the node's own log: {log}");
    let key_path = node_key(&c.node(1).config);
    let key = std::fs::read_to_string(&key_path).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        !log.contains(&body[..40]),
        "the TLS key leaked into the log"
    );
}

/// The `tls.keyFile` of a node's config.
fn node_key(config: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("keyFile:"))
        .unwrap();
    line.trim_start()
        .trim_start_matches("keyFile:")
        .trim()
        .into()
}
