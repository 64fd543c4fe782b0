//! Timelines across etcd clusters in one store: a cluster rebuilt outside
//! bulwark (here a second, fresh etcd backed up under the same clusterName,
//! as after `etcdutl snapshot restore` by hand or a new kubeadm cluster) is
//! a root timeline of its own. Its revisions overlap the first cluster's;
//! each resolves in its own history, the first one's stays reachable with
//! `--timeline 1`; a store without cluster records (an older version's)
//! numbers them the same from its snapshots and writes the records at the
//! next snapshot; and the numbers hold as retention and garbage collection
//! delete the first cluster's snapshots.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

mod common;

use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::restore::pitr::Target;
use bulwark_backup::snapshot::manifest::Manifest;
use bulwark_testkit::Etcd;
use object_store::ObjectStoreExt as _;
use tokio_util::sync::CancellationToken;

/// Writes `n` keys `<prefix>/<i>`, has the recorder capture them as deltas
/// of `base`, and returns the revision reached.
async fn write_and_record(
    etcd: &Etcd,
    engine: &std::sync::Arc<bulwark_backup::Engine>,
    base: &Manifest,
    prefix: &str,
    n: usize,
) -> i64 {
    let cancel = CancellationToken::new();
    let (_, task) = common::start_recorder(engine, &cancel);
    let mut c = etcd.client().await.expect("etcd client");
    for i in 0..n {
        c.put(format!("{prefix}/{i:03}"), format!("{prefix}-{i}"), None)
            .await
            .expect("put");
    }
    let (_, revision) = common::state(&mut c, 0).await;
    common::wait_covered(engine, &base.id, revision).await;
    cancel.cancel();
    task.await.expect("recorder task");
    revision
}

#[tokio::test]
async fn heavy_a_cluster_rebuilt_outside_bulwark_is_a_timeline_of_its_own() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = || common::file_store(store_dir.path());

    // Cluster A: a snapshot and 40 revisions of deltas after it.
    let a = Etcd::start().await.unwrap();
    let engine_a = common::engine(&a, store(), Keyring::none());
    common::put_small(&a, 5).await;
    let a_base = common::snapshot(&engine_a).await;
    let a_rev = write_and_record(&a, &engine_a, &a_base, "a", 40).await;
    let mid = a_base.revision + 10;
    let mut ca = a.client().await.unwrap();
    let (a_at_mid, _) = common::state(&mut ca, mid).await;
    let a_latest = common::snapshot(&engine_a).await;

    // Cluster B, rebuilt outside bulwark: a fresh etcd whose revisions
    // start again at 1, backed up into the same store and clusterName.
    let b = Etcd::start().await.unwrap();
    let engine_b = common::engine(&b, store(), Keyring::none());
    common::put_small(&b, 5).await;
    let b_base = common::snapshot(&engine_b).await;
    let b_rev = write_and_record(&b, &engine_b, &b_base, "b", 20).await;
    assert_ne!(a_base.cluster_id(), b_base.cluster_id());
    assert!(b_base.revision < mid && mid < b_rev && b_rev < a_rev);
    let mut cb = b.client().await.unwrap();
    let (b_at_mid, _) = common::state(&mut cb, mid).await;
    assert_ne!(a_at_mid, b_at_mid, "revision {mid} means two states");

    // One record per cluster, written at its first snapshot.
    let records = engine_b.cluster_records().await.unwrap();
    let firsts: Vec<(u64, &str, i64, bool)> = records
        .iter()
        .map(|r| {
            (
                r.cluster_id,
                r.first_snapshot_id.as_str(),
                r.first_revision,
                r.back_filled,
            )
        })
        .collect();
    assert_eq!(
        firsts,
        [
            (
                a_base.cluster_id(),
                a_base.id.as_str(),
                a_base.revision,
                false
            ),
            (
                b_base.cluster_id(),
                b_base.id.as_str(),
                b_base.revision,
                false
            ),
        ]
    );

    // B is timeline 2, a root of its own (no parent), and the current one.
    let timelines = engine_b.timelines().await.unwrap();
    let shape: Vec<(u32, Option<u64>, Option<u32>)> = timelines
        .all()
        .iter()
        .map(|t| (t.number, t.cluster_id, t.parent))
        .collect();
    assert_eq!(
        shape,
        [
            (1, Some(a_base.cluster_id()), None),
            (2, Some(b_base.cluster_id()), None),
        ]
    );
    assert_eq!(timelines.current(), 2);
    assert_eq!(timelines.of_manifest(&a_latest), 1);
    assert_eq!(timelines.of_manifest(&b_base), 2);

    // A plain --to-revision resolves in B's own history...
    let (got, rev) = common::restored_state(&engine_b, None, Target::Revision(mid)).await;
    assert_eq!((got, rev), (b_at_mid.clone(), mid));
    // ...and with --timeline 1 in A's.
    let (got, rev) =
        common::restored_state_on(&engine_b, None, Target::Revision(mid), Some(1)).await;
    assert_eq!((got, rev), (a_at_mid.clone(), mid));
    let plan = engine_b
        .plan_restore_on(None, Target::Revision(mid), Some(1))
        .await
        .unwrap();
    assert_eq!(plan.base.id, a_base.id);
    assert_eq!(plan.timeline, 1);
    // A revision only A reached is not B's: refused, never taken from A.
    let e = engine_b
        .plan_restore(None, Target::Revision(a_rev))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is not covered"), "{e}");

    // A store written before the records: the snapshots present stand in
    // (each cluster seen at its oldest), and the next snapshot writes
    // them down, marked back-filled.
    for r in &records {
        let path = engine_b.layout.cluster_record(r.cluster_id);
        engine_b.store.inner().delete(&path).await.unwrap();
    }
    assert!(engine_b.cluster_records().await.unwrap().is_empty());
    assert_eq!(engine_b.timelines().await.unwrap(), timelines);
    common::snapshot(&engine_b).await;
    let records = engine_b.cluster_records().await.unwrap();
    let filled: Vec<(u64, &str, bool)> = records
        .iter()
        .map(|r| (r.cluster_id, r.first_snapshot_id.as_str(), r.back_filled))
        .collect();
    assert_eq!(
        filled,
        [
            (a_base.cluster_id(), a_base.id.as_str(), true),
            (b_base.cluster_id(), b_base.id.as_str(), true),
        ]
    );

    // Retention deletes A's snapshots, oldest first; garbage collection
    // runs. The records stay and so do the numbers: B is still 2.
    for gone in [&a_base, &a_latest] {
        engine_b.delete_snapshot(&gone.id, true).await.unwrap();
        assert_eq!(engine_b.timelines().await.unwrap(), timelines);
    }
    let far = chrono::Utc::now() + chrono::Duration::days(365);
    let gc = engine_b.collect_garbage(far, false).await.unwrap();
    assert!(
        gc.collected.iter().all(|g| !g.path.contains("clusters/")),
        "{:?}",
        gc.collected
    );
    assert_eq!(engine_b.cluster_records().await.unwrap(), records);
    assert_eq!(engine_b.timelines().await.unwrap(), timelines);
    let (got, _) = common::restored_state(&engine_b, None, Target::Revision(mid)).await;
    assert_eq!(got, b_at_mid);
}

/// A cluster record is written once: on S3 (moto) the first write wins
/// and a second, different one leaves it as it was; the same on a file
/// store.
#[tokio::test]
async fn heavy_cluster_records_are_written_once_on_s3_and_file_stores() {
    use bulwark_backup::snapshot::clusters::ClusterRecord;
    let s3 = bulwark_testkit::S3Server::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for store in [
        common::s3_store(&s3, "backups"),
        common::file_store(dir.path()),
    ] {
        let engine = common::offline_engine(store, Keyring::none(), "prod");
        let first = ClusterRecord {
            cluster_id: 0xcdf8_1819_4e3a_8c32,
            first_seen_at: "2026-12-05T10:00:00Z".parse().unwrap(),
            first_revision: 42,
            first_snapshot_id: "20261205T100000Z-r42-abcd".into(),
            restore_id: String::new(),
            back_filled: false,
        };
        assert!(engine.record_cluster(&first).await.unwrap());
        let later = ClusterRecord {
            first_revision: 7,
            restore_id: "r-later".into(),
            ..first.clone()
        };
        assert!(!engine.record_cluster(&later).await.unwrap());
        assert_eq!(engine.cluster_records().await.unwrap(), [first]);
        let keys = common::all_keys(&engine.store).await;
        assert!(
            keys.iter()
                .any(|k| k.ends_with("prod/clusters/cdf818194e3a8c32.json")),
            "{keys:?}"
        );
    }
}
