//! Continuous deltas and point-in-time builds against a real etcd: capture,
//! continuity and gaps, and restoring to a revision, a time and the latest
//! state with the key contents compared to etcd's own history.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bulwark_backup::delta::{DeltaSettings, DeltaStatus};
use bulwark_backup::error::BackupError;
use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::restore::pitr::Target;
use bulwark_testkit::Etcd;
use object_store::{ObjectStoreExt, PutPayload};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn heavy_deltas_capture_writes_and_restore_to_revision_time_and_latest() {
    let etcd = Etcd::start().await.unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let engine = common::engine(&etcd, common::file_store(store_dir.path()), Keyring::none());
    common::put_small(&etcd, 20).await;
    let base = common::snapshot(&engine).await;
    let cancel = CancellationToken::new();
    let (status, task) = common::start_recorder(&engine, &cancel);
    let mut c = etcd.client().await.unwrap();

    // Batch 1, including a delete and an overwrite, then a transaction
    // with several events in one revision.
    for i in 0..30 {
        c.put(format!("a/{i:03}"), format!("one-{i}"), None)
            .await
            .unwrap();
    }
    c.delete("k/00003", None).await.unwrap();
    c.put("a/000", "overwritten", None).await.unwrap();
    c.txn(etcd_client::Txn::new().and_then(vec![
        etcd_client::TxnOp::put("t/1", "x", None),
        etcd_client::TxnOp::put("t/2", "y", None),
        etcd_client::TxnOp::delete("a/001", None),
    ]))
    .await
    .unwrap();
    let (at_one, r1) = common::state(&mut c, 0).await;
    let written = std::time::Instant::now();
    common::wait_covered(&engine, &base.id, r1).await;
    println!(
        "deltas covered revision {r1} {:?} after the last write",
        written.elapsed()
    );
    {
        let s = status.lock().unwrap();
        assert!(s.newest_revision >= r1, "{s:?}");
        assert_eq!(s.base_snapshot.as_deref(), Some(base.id.as_str()));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t1 = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Batch 2.
    for i in 0..30 {
        c.put(format!("b/{i:03}"), format!("two-{i}"), None)
            .await
            .unwrap();
    }
    c.delete("a/", Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let (at_two, r2) = common::state(&mut c, 0).await;
    common::wait_covered(&engine, &base.id, r2).await;

    // Segments are contiguous from the snapshot on.
    let segs = engine.list_segments(Some(&base.id)).await.unwrap();
    assert_eq!(
        bulwark_backup::delta::check_continuity(base.revision, &segs).unwrap(),
        r2
    );
    assert!(segs[0].first_revision <= base.revision_max + 1);

    // To a revision between: exactly etcd's own state at that revision.
    let mid = r1 - 5;
    let (want_mid, _) = common::state(&mut c, mid).await;
    let (got, rev) = common::restored_state(&engine, None, Target::Revision(mid)).await;
    assert_eq!(rev, mid);
    assert_eq!(got, want_mid);
    // To the time between the batches: batch 1 only.
    let (got, rev) = common::restored_state(&engine, None, Target::Time(t1)).await;
    assert_eq!(rev, r1);
    assert_eq!(got, at_one);
    // Latest: everything.
    let (got, rev) = common::restored_state(&engine, None, Target::Latest).await;
    assert_eq!(rev, r2);
    assert_eq!(got, at_two);

    // A revision past what is covered is refused up front.
    let e = engine
        .plan_restore(None, Target::Revision(r2 + 1000))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is not covered"), "{e}");

    // A corrupted segment is refused with a clear error before any replay.
    cancel.cancel();
    task.await.unwrap();
    let victim = &segs[segs.len() / 2];
    let path =
        bulwark_backup::store::layout::object_path(engine.store.prefix(), &victim.object_key);
    let mut bytes = engine
        .store
        .inner()
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x55;
    engine
        .store
        .inner()
        .put(&path, PutPayload::from(bytes))
        .await
        .unwrap();
    let plan = engine.plan_restore(None, Target::Latest).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = engine
        .build_target(&plan, dir.path(), &|_| {}, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Corrupt { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&format!("delta segment {}", victim.id))
            && text.contains("SHA-256 of the stored object"),
        "{text}"
    );
    assert!(
        !dir.path().join("base.db").exists(),
        "the snapshot must not be downloaded after a bad segment"
    );
}

#[tokio::test]
async fn heavy_compaction_gap_forces_a_new_full_snapshot() {
    let etcd = Etcd::start().await.unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let engine = common::engine(&etcd, common::file_store(store_dir.path()), Keyring::none());
    common::put_small(&etcd, 5).await;
    let base = common::snapshot(&engine).await;
    let mut c = etcd.client().await.unwrap();

    // Writes the recorder never saw, then compacted away: the history after
    // the snapshot is gone.
    for i in 0..10 {
        c.put(format!("lost/{i}"), "x", None).await.unwrap();
    }
    let (_, now) = common::state(&mut c, 0).await;
    c.compact(now, None).await.unwrap();

    let cancel = CancellationToken::new();
    let (status, task) = common::start_recorder(&engine, &cancel);
    // The recorder finds the gap and takes a new full snapshot, then
    // follows it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let newer = loop {
        let latest = engine.latest_snapshot().await.unwrap().manifest;
        if latest.id != base.id {
            break latest;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot after the gap: {:?}",
            status.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(newer.revision >= now);
    c.put("after/gap", "y", None).await.unwrap();
    let (_, r) = common::state(&mut c, 0).await;
    common::wait_covered(&engine, &newer.id, r).await;
    assert!(
        engine
            .list_segments(Some(&base.id))
            .await
            .unwrap()
            .is_empty(),
        "nothing may be recorded after the old base once its history is lost"
    );
    let (got, rev) = common::restored_state(&engine, None, Target::Latest).await;
    let (want, _) = common::state(&mut c, r).await;
    assert_eq!((got, rev), (want, r));
    cancel.cancel();
    task.await.unwrap();

    // Deleting the base deletes its deltas.
    let deleted = engine.delete_snapshot(&newer.id, true).await.unwrap();
    assert!(deleted.deleted_segments >= 1, "{deleted:?}");
    assert!(
        engine
            .list_segments(Some(&newer.id))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Polls the scheduler's delta status until `done`.
async fn wait_state(
    service: &bulwark_backup::schedule::service::Service,
    what: &str,
    done: impl Fn(&DeltaStatus) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(&service.delta_status()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}: {:?}",
            service.delta_status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// While a restore holds this node (agent PREPARE to START or rollback),
/// the leader's recorder stops: writes to the old cluster meanwhile (its
/// own election keys as members stop) must not join the timeline a
/// `--to-latest` restore lands on. Released, it records again from where
/// it stopped.
#[tokio::test]
async fn heavy_the_recorder_pauses_while_a_restore_holds_the_node() {
    use bulwark_backup::delta::RecorderState;
    use bulwark_backup::schedule::election::LeaderState;
    use bulwark_backup::schedule::service::{Service, ServiceSettings};

    let etcd = Etcd::start().await.unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let engine = common::engine(&etcd, common::file_store(store_dir.path()), Keyring::none());
    common::put_small(&etcd, 5).await;
    let base = common::snapshot(&engine).await;
    let (_leader, leading) = tokio::sync::watch::channel(LeaderState {
        is_leader: true,
        term: 1,
    });
    let settings = ServiceSettings {
        schedule: None,
        retries: 0,
        retry_backoff: Duration::from_secs(1),
        retention: Default::default(),
        retention_interval: Duration::from_secs(3600),
        drill_interval: None,
        election_name: "test/leader".into(),
        deltas: Some(DeltaSettings {
            flush_interval: Duration::from_millis(100),
            max_segment_bytes: 1 << 20,
            rpo_target: Duration::from_secs(1),
        }),
    };
    let service = Arc::new(Service::new(engine.clone(), settings, leading));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(service.clone().run_scheduler(cancel.clone()));
    let mut c = etcd.client().await.unwrap();
    let put = |c: &mut etcd_client::Client, k: &'static str| {
        let mut c = c.clone();
        async move {
            c.put(k, "v", None)
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision()
        }
    };
    let first = put(&mut c, "before").await;
    common::wait_covered(&engine, &base.id, first).await;

    service
        .recorder_pause()
        .hold("r1", std::time::Instant::now() + Duration::from_secs(60));
    wait_state(&service, "the recorder to stop", |s| {
        s.state == RecorderState::Stopped
    })
    .await;
    let during = put(&mut c, "during").await;
    // Several flush intervals: a running recorder would have committed it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let segs = engine.list_segments(Some(&base.id)).await.unwrap();
    assert!(
        segs.iter().all(|s| s.last_revision < during),
        "recorded during the pause: {segs:#?}"
    );

    service.recorder_pause().release("r1");
    common::wait_covered(&engine, &base.id, during).await;
    let segs = engine.list_segments(Some(&base.id)).await.unwrap();
    bulwark_backup::delta::check_continuity(base.revision, &segs).unwrap();
    cancel.cancel();
    task.await.unwrap();
}
