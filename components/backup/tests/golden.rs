//! Every released store layout stays readable: `tests/golden/<version>/`
//! holds a `file://` store that this version of bulwark-backup wrote — an
//! age-encrypted snapshot with its manifest and verification record, and
//! the delta segments recorded after it — with the age identity that opens
//! it and the etcd state it holds (`expected.json`). This build must list
//! that snapshot as complete and verified, check its hashes again, find its
//! deltas contiguous, and rebuild both the snapshot's state and the latest
//! covered state exactly. An upgraded bulwark-backup restores what the old
//! one stored; a bucket outlives every binary that wrote to it.
//!
//! The golden store of the current version is written by
//! `BULWARK_WRITE_GOLDEN=1 cargo nextest run -p bulwark-backup --test golden`
//! (a real etcd, a snapshot, writes recorded as deltas, then the files are
//! kept); a release commits it and never changes it again. docs/UPGRADES.md
//! says what this covers.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_backup::Engine;
use bulwark_backup::delta::{DeltaSettings, DeltaStatus, Recorder, check_continuity};
use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::restore::pitr::Target;
use bulwark_backup::snapshot::SnapshotOptions;
use bulwark_backup::snapshot::manifest::Manifest;
use bulwark_testkit::Etcd;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WRITE_ENV: &str = "BULWARK_WRITE_GOLDEN";
/// The cluster directory the golden store was written under.
const CLUSTER: &str = "golden";

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn state_json(kvs: &[(String, String)], revision: i64) -> Value {
    json!({
        "revision": revision,
        "keys": kvs.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
    })
}

/// The golden versions in the tree, oldest first.
fn golden_versions() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(golden_root()) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Builds `target` from the store and returns the state a scratch etcd
/// started on it holds.
async fn rebuilt(engine: &Engine, id: &str, target: Target) -> Value {
    let (kvs, revision) = common::restored_state(engine, Some(id), target).await;
    state_json(&kvs, revision)
}

#[tokio::test]
async fn heavy_every_golden_store_lists_verifies_and_restores() {
    if std::env::var_os(WRITE_ENV).is_some() {
        write_golden().await;
    }
    let versions = golden_versions();
    assert!(
        !versions.is_empty(),
        "no golden store under {}",
        golden_root().display()
    );
    for dir in versions {
        eprintln!("golden store {}", dir.display());
        check_golden(&dir).await;
    }
}

async fn check_golden(dir: &Path) {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let id = expected["snapshot"].as_str().unwrap();
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&dir.join("store"), copy.path());
    // An engine whose etcd is never dialled: listing, checking and
    // building a target read only the store.
    let engine = common::offline_engine(
        common::file_store(copy.path()),
        Keyring::load(None, &[dir.join("identity.txt")]).unwrap(),
        CLUSTER,
    );

    // Listed, complete, and carrying its verification record.
    let list = engine.list_snapshots().await.unwrap();
    assert_eq!(list.len(), 1, "{list:#?}");
    let entry = &list[0];
    assert!(entry.is_valid(), "{entry:#?}");
    assert_eq!(entry.manifest.id, id);
    assert_eq!(entry.manifest.revision, expected["snapshotRevision"]);
    let record = entry
        .last_verification
        .as_ref()
        .expect("verification record");
    assert!(record.passed && record.drill, "{record:#?}");

    // Its bytes still decrypt, decompress and hash to the manifest's sums.
    let check = engine
        .verify_snapshot(id, false, &(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(check.passed, "{check:#?}");

    // The deltas read back contiguous up to the recorded revision.
    let segments = engine.list_segments(Some(id)).await.unwrap();
    let covered = check_continuity(entry.manifest.revision, &segments).unwrap();
    assert_eq!(covered, expected["coveredRevision"]);

    // Both states rebuild exactly.
    assert_eq!(
        rebuilt(&engine, id, Target::Snapshot).await,
        expected["atSnapshot"]
    );
    assert_eq!(
        rebuilt(&engine, id, Target::Latest).await,
        expected["atLatest"]
    );
}

/// Runs the scenario against a real etcd and keeps the store as this
/// version's golden files.
async fn write_golden() {
    let etcd = Etcd::start().await.unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let keys_dir = tempfile::tempdir().unwrap();
    let identity = common::write_identity(keys_dir.path(), "identity.txt");
    let engine = common::engine_in(
        &etcd,
        common::file_store(store_dir.path()),
        Keyring::load(Some(&identity), &[]).unwrap(),
        CLUSTER,
    );
    let mut c = etcd.client().await.unwrap();
    for i in 0..20 {
        c.put(format!("registry/pods/p{i:02}"), format!("pod-{i}"), None)
            .await
            .unwrap();
    }
    let (at_snapshot, _) = common::state(&mut c, 0).await;
    let manifest = engine
        .take_snapshot(
            SnapshotOptions::manual("golden"),
            &(),
            &CancellationToken::new(),
            &common::ok,
        )
        .await
        .unwrap();
    let record = engine
        .verify_snapshot(&manifest.id, true, &(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(record.passed, "{record:#?}");

    let covered = record_deltas(&engine, &mut c, &manifest).await;
    let (at_latest, latest) = common::state(&mut c, 0).await;
    assert_eq!(covered, latest);

    let out = golden_root().join(env!("CARGO_PKG_VERSION"));
    assert!(
        !out.exists(),
        "{} exists: a released golden store never changes",
        out.display()
    );
    copy_dir(store_dir.path(), &out.join("store"));
    std::fs::copy(&identity, out.join("identity.txt")).unwrap();
    let expected = json!({
        "snapshot": manifest.id,
        "snapshotRevision": manifest.revision,
        "coveredRevision": covered,
        "atSnapshot": state_json(&at_snapshot, manifest.revision),
        "atLatest": state_json(&at_latest, latest),
    });
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_string_pretty(&expected).unwrap() + "\n",
    )
    .unwrap();
    eprintln!("wrote {}", out.display());
}

/// Writes puts, an overwrite, a delete and a transaction while a recorder
/// runs; returns the revision the committed segments cover.
async fn record_deltas(engine: &Arc<Engine>, c: &mut etcd_client::Client, base: &Manifest) -> i64 {
    let cancel = CancellationToken::new();
    let recorder = Recorder::new(
        engine.clone(),
        DeltaSettings {
            flush_interval: Duration::from_millis(200),
            max_segment_bytes: 1 << 20,
            rpo_target: Duration::from_secs(1),
        },
        Arc::new(Mutex::new(DeltaStatus::default())),
    );
    let run_cancel = cancel.clone();
    let task = tokio::spawn(async move {
        recorder
            .run(&run_cancel, &|| {
                Box::pin(async { panic!("the recorder asked for a new snapshot") })
            })
            .await;
    });
    for i in 0..10 {
        c.put(format!("registry/services/s{i}"), format!("svc-{i}"), None)
            .await
            .unwrap();
    }
    c.put("registry/pods/p00", "pod-0-updated", None)
        .await
        .unwrap();
    c.delete("registry/pods/p01", None).await.unwrap();
    c.txn(etcd_client::Txn::new().and_then(vec![
        etcd_client::TxnOp::put("registry/leases/l1", "x", None),
        etcd_client::TxnOp::delete("registry/pods/p02", None),
    ]))
    .await
    .unwrap();
    let target = common::state(c, 0).await.1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let covered = loop {
        let segs = engine.list_segments(Some(&base.id)).await.unwrap();
        if let Ok(r) = check_continuity(base.revision, &segs)
            && r >= target
        {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deltas never reached revision {target}: {segs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cancel.cancel();
    task.await.unwrap();
    covered
}
