//! Shared set-up of the real-process tests: engines over a testkit etcd and
//! a file or moto S3 store, and ways to fill etcd.

#![allow(dead_code)] // each test binary uses a different subset

pub mod faults;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_backup::config::{EtcdConfig, MemberChoice};
use bulwark_backup::delta::{DeltaSettings, DeltaStatus, Recorder};
use bulwark_backup::engine::{DrillSettings, Engine, PipelineSettings};
use bulwark_backup::etcd::EtcdConnector;
use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::restore::pitr::Target;
use bulwark_backup::snapshot::SnapshotOptions;
use bulwark_backup::snapshot::manifest::Manifest;
use bulwark_backup::store::{Store, StoreSpec};
use bulwark_backup::verify::scratch::ScratchEtcd;
use bulwark_testkit::{Etcd, EtcdVersion, S3Server, tools};
use ring::rand::SecureRandom;
use tokio_util::sync::CancellationToken;

/// The etcd connector for a testkit cluster (TLS when it has TLS).
pub fn connector(etcd: &Etcd) -> EtcdConnector {
    EtcdConnector::new(&EtcdConfig {
        endpoints: etcd.endpoints(),
        tls: etcd.client_tls().map(|c| c.tls_files()),
        dial_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(30),
        snapshot_from: MemberChoice::Leader,
    })
    .expect("etcd connector")
}

/// A `file://` store in `dir`.
pub fn file_store(dir: &Path) -> Store {
    StoreSpec::parse(&format!("file://{}", dir.display()), &BTreeMap::new())
        .unwrap()
        .build()
        .unwrap()
}

/// An `s3://` store on the moto server, under `prefix`.
pub fn s3_store(s3: &S3Server, prefix: &str) -> Store {
    let options: BTreeMap<String, String> = s3
        .options()
        .into_iter()
        .filter(|(k, _)| k != "aws_bucket")
        .collect();
    StoreSpec::parse(&format!("s3://{}/{prefix}", s3.bucket()), &options)
        .unwrap()
        .build()
        .unwrap()
}

/// Small parts so that a few MiB make a multipart upload of several parts.
pub fn pipeline() -> PipelineSettings {
    PipelineSettings {
        level: 3,
        workers: 0,
        part_size: 5 << 20,
        upload_concurrency: 2,
        stall_timeout: Duration::from_secs(30),
        member_choice: MemberChoice::Leader,
    }
}

/// etcd 3.5's tools from the tools dir.
pub fn drill_tools() -> DrillSettings {
    DrillSettings {
        etcdutl: tools::etcdutl().expect("etcdutl"),
        etcd: tools::etcd(EtcdVersion::V3_5).expect("etcd"),
        work_dir: None,
        start_timeout: Duration::from_secs(60),
    }
}

/// An engine over `etcd` and `store`.
pub fn engine(etcd: &Etcd, store: Store, keys: Keyring) -> Arc<Engine> {
    engine_in(etcd, store, keys, "testcluster")
}

/// An engine over `etcd` and `store` for the cluster directory `cluster`.
pub fn engine_in(etcd: &Etcd, store: Store, keys: Keyring, cluster: &str) -> Arc<Engine> {
    Arc::new(Engine::new(
        "test-node".into(),
        cluster.into(),
        connector(etcd),
        store,
        keys,
        pipeline(),
        drill_tools(),
        Duration::from_secs(3600),
    ))
}

/// An engine over `store` for the cluster directory `cluster` whose etcd is
/// never dialled: for what reads and writes only the store (listing,
/// checking, building a target, garbage collection).
pub fn offline_engine(store: Store, keys: Keyring, cluster: &str) -> Engine {
    let connector = EtcdConnector::new(&EtcdConfig {
        endpoints: vec!["127.0.0.1:9".into()],
        tls: None,
        dial_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        stall_timeout: Duration::from_secs(5),
        snapshot_from: MemberChoice::Leader,
    })
    .expect("etcd connector");
    Engine::new(
        "offline".into(),
        cluster.into(),
        connector,
        store,
        keys,
        pipeline(),
        drill_tools(),
        Duration::from_secs(3600),
    )
}

/// The pause check of a snapshot nothing pauses.
pub fn ok() -> bulwark_backup::error::Result<()> {
    Ok(())
}

/// Takes and commits a manual snapshot, or says why it failed.
pub async fn try_snapshot(engine: &Engine) -> bulwark_backup::error::Result<Manifest> {
    engine
        .take_snapshot(
            SnapshotOptions::manual("test"),
            &(),
            &CancellationToken::new(),
            &ok,
        )
        .await
}

/// Takes and commits a manual snapshot.
pub async fn snapshot(engine: &Engine) -> Manifest {
    try_snapshot(engine).await.expect("snapshot")
}

/// Starts a delta recorder that takes real snapshots after a gap.
pub fn start_recorder(
    engine: &Arc<Engine>,
    cancel: &CancellationToken,
) -> (Arc<Mutex<DeltaStatus>>, tokio::task::JoinHandle<()>) {
    let status = Arc::new(Mutex::new(DeltaStatus::default()));
    let recorder = Recorder::new(
        engine.clone(),
        DeltaSettings {
            flush_interval: Duration::from_millis(200),
            max_segment_bytes: 1 << 20,
            rpo_target: Duration::from_secs(1),
        },
        status.clone(),
    );
    let engine = engine.clone();
    let cancel = cancel.clone();
    let task = tokio::spawn(async move {
        let e = engine.clone();
        recorder
            .run(&cancel, &|| {
                let e = e.clone();
                Box::pin(async move {
                    snapshot(&e).await;
                    Ok(())
                })
            })
            .await;
    });
    (status, task)
}

/// Polls until committed segments of `base` reach `revision`.
pub async fn wait_covered(engine: &Engine, base: &str, revision: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let segs = engine.list_segments(Some(base)).await.expect("segments");
        if segs.last().is_some_and(|s| s.last_revision >= revision) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deltas never reached revision {revision}: {segs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `n` keys `k/<i>` with small text values.
pub async fn put_small(etcd: &Etcd, n: usize) {
    let mut c = etcd.client().await.unwrap();
    for i in 0..n {
        c.put(format!("k/{i:05}"), format!("value-{i}"), None)
            .await
            .unwrap();
    }
}

/// Writes `n` keys `big/<i>` with 1 MiB of random bytes each (incompressible).
pub async fn put_random_mib(etcd: &Etcd, n: usize) {
    let mut c = etcd.client().await.unwrap();
    let rng = ring::rand::SystemRandom::new();
    for i in 0..n {
        let mut v = vec![0u8; 1 << 20];
        rng.fill(&mut v).unwrap();
        c.put(format!("big/{i:04}"), v, None).await.unwrap();
    }
}

/// Every key and value at `revision` (0: now), and the revision read.
pub async fn state(
    client: &mut etcd_client::Client,
    revision: i64,
) -> (Vec<(String, String)>, i64) {
    let mut opts = etcd_client::GetOptions::new().with_all_keys();
    if revision > 0 {
        opts = opts.with_revision(revision);
    }
    let r = client.get("", Some(opts)).await.unwrap();
    let kvs = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect();
    (kvs, r.header().unwrap().revision())
}

/// Builds `target` from `snapshot` (None: the newest) and returns the key
/// state of a scratch etcd started from it, and its revision (which must
/// be the one the build reported).
pub async fn restored_state(
    engine: &Engine,
    snapshot: Option<&str>,
    target: Target,
) -> (Vec<(String, String)>, i64) {
    restored_state_on(engine, snapshot, target, None).await
}

/// [`restored_state`] resolved in timeline `timeline` (None: the current
/// one).
pub async fn restored_state_on(
    engine: &Engine,
    snapshot: Option<&str>,
    target: Target,
    timeline: Option<u32>,
) -> (Vec<(String, String)>, i64) {
    let plan = engine
        .plan_restore_on(snapshot, target, timeline)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let built = engine
        .build_target(&plan, dir.path(), &|_| {}, &CancellationToken::new())
        .await
        .unwrap();
    let check = tempfile::tempdir().unwrap();
    let scratch = ScratchEtcd::from_snapshot(
        &engine.drill,
        check.path(),
        &built.path,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut c = scratch.client().await.unwrap();
    let s = state(&mut c, 0).await;
    if let Some(r) = built.revision {
        assert_eq!(r, s.1, "the built target's revision");
    }
    scratch.stop().await;
    s
}

/// Multipart uploads the moto server still has open in its bucket.
pub async fn open_multipart_uploads(s3: &S3Server) -> usize {
    let url = format!("{}/{}?uploads", s3.endpoint(), s3.bucket());
    let body = reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.matches("<Upload>").count()
}

/// Every object key in the store under its prefix.
pub async fn all_keys(store: &Store) -> Vec<String> {
    use futures::TryStreamExt;
    let mut keys: Vec<String> = store
        .inner()
        .list(Some(store.prefix()))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Writes an age identity file into `dir`, as `age-keygen` would.
pub fn write_identity(dir: &Path, name: &str) -> std::path::PathBuf {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "# public key: {}\n{}\n",
            id.to_public(),
            id.to_string().expose_secret()
        ),
    )
    .unwrap();
    path
}
