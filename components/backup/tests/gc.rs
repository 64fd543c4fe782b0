//! Garbage collection against a `file://` store: the three kinds of
//! unreferenced objects a crash leaves are listed by a dry run, kept while
//! younger than the grace period, and then deleted, while every committed
//! record and what it names stays.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::snapshot::gc::Reason;
use object_store::ObjectStoreExt as _;

/// Writes `body` at `key` (relative to the store) in `engine`'s store.
async fn put(engine: &bulwark_backup::Engine, key: &str) {
    let path = key
        .split('/')
        .fold(engine.store.prefix().clone(), |p, part| p.join(part));
    engine
        .store
        .inner()
        .put(&path, bytes::Bytes::from_static(b"0123456789").into())
        .await
        .unwrap();
}

#[tokio::test]
async fn unreferenced_objects_are_listed_kept_while_young_then_collected() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = common::offline_engine(common::file_store(dir.path()), Keyring::none(), "c");
    // What must stay: a committed segment (record and data), a restore
    // record, and a snapshot directory with a manifest.
    let kept = [
        "c/delta/20200101T000000Z-r5-aaaa/00000000000000000006-00000000000000000009.json",
        "c/delta/20200101T000000Z-r5-aaaa/00000000000000000006-00000000000000000009.seg.zst",
        "c/restores/20200101T000000Z-r9-bbbb.json",
    ];
    // What a crash leaves.
    let garbage = [
        (
            "c/full/20200101T000000Z-r1-dead/snapshot.db.zst",
            Reason::UploadWithoutManifest,
        ),
        (
            "c/delta/20200101T000000Z-r5-aaaa/00000000000000000010-00000000000000000012.seg.zst",
            Reason::SegmentWithoutRecord,
        ),
        (
            "c/restore/20200101T000000Z-r9-bbbb/target.db",
            Reason::RestoreTarget,
        ),
    ];
    for key in kept.iter().chain(garbage.iter().map(|(k, _)| k)) {
        put(&engine, key).await;
    }
    let all_keys = || common::all_keys(&engine.store);
    let before = all_keys().await;

    // Within the grace period: found, kept.
    engine.gc_grace_period = Duration::from_secs(3600);
    let young = engine
        .collect_garbage(chrono::Utc::now(), false)
        .await
        .unwrap();
    assert!(young.collected.is_empty(), "{young:#?}");
    assert_eq!(young.young.len(), 3, "{young:#?}");
    assert_eq!(all_keys().await, before);

    // Past it, a dry run lists exactly the three and deletes nothing.
    let later = chrono::Utc::now() + chrono::TimeDelta::hours(2);
    let dry = engine.collect_garbage(later, true).await.unwrap();
    let mut listed: Vec<(String, Reason)> = dry
        .collected
        .iter()
        .map(|g| (g.path.clone(), g.reason))
        .collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected: Vec<(String, Reason)> =
        garbage.iter().map(|(k, r)| (k.to_string(), *r)).collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed, expected);
    assert_eq!(dry.collected_bytes(), 30);
    assert!(dry.dry_run);
    assert_eq!(all_keys().await, before);

    // For real: they go, everything committed stays.
    let done = engine.collect_garbage(later, false).await.unwrap();
    assert_eq!(done.collected.len(), 3, "{done:#?}");
    assert!(done.failed.is_empty(), "{done:#?}");
    assert_eq!(
        done.collected_uploads(),
        vec!["20200101T000000Z-r1-dead".to_owned()]
    );
    let after = all_keys().await;
    let mut want: Vec<String> = kept.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(after, want);
    // Nothing left to collect.
    let again = engine.collect_garbage(later, true).await.unwrap();
    assert!(
        again.collected.is_empty() && again.young.is_empty(),
        "{again:#?}"
    );
}
