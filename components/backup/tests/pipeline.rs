//! The snapshot pipeline against real processes: a 3-member etcd 3.5.1
//! (with TLS), the file store and the moto S3 server.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_backup::engine::Engine;
use bulwark_backup::error::BackupError;
use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::pipeline::hashing::{Sha256, hex};
use bulwark_backup::snapshot::manifest::{Compression, Encryption, MismatchKind, Trigger};
use bulwark_backup::snapshot::{SnapshotEvent, SnapshotOptions};
use bulwark_testkit::{Etcd, Pki, S3Server};
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;

use common::faults::{Faults, UnreliableStore};
use common::{ok, try_snapshot as snapshot};

async fn stored_bytes(engine: &Engine, object_key: &str) -> bytes::Bytes {
    let path = bulwark_backup::store::layout::object_path(engine.store.prefix(), object_key);
    engine
        .store
        .inner()
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
}

#[tokio::test]
async fn heavy_backup_to_file_store_verifies_and_drills() {
    let pki = Pki::new().unwrap();
    let etcd = Etcd::builder().members(3).tls(&pki).start().await.unwrap();
    common::put_small(&etcd, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let drills = tempfile::tempdir().unwrap();
    let mut engine =
        (*common::engine(&etcd, common::file_store(dir.path()), Keyring::none())).clone();
    engine.drill.work_dir = Some(drills.path().to_owned());

    let m = snapshot(&engine).await.unwrap();

    // Manifest fields against what etcd and the store say.
    let status = etcd.client().await.unwrap().status().await.unwrap();
    let header = status.header().unwrap();
    assert_eq!(m.etcd.cluster_id, format!("{:016x}", header.cluster_id()));
    assert_eq!(m.etcd.etcd_version, "3.5.1");
    assert_eq!(m.trigger, Trigger::Manual);
    assert_eq!(m.note, "test");
    assert_eq!(m.taken_by, "test-node");
    assert_eq!(m.compression, Compression::Zstd { level: 3 });
    assert_eq!(m.encryption, Encryption::None);
    // Nothing wrote during the snapshot: the revision is exact, and so is
    // the key count (200 keys of ours).
    assert_eq!(m.revision, m.revision_max);
    assert_eq!(m.revision, header.revision());
    assert_eq!(m.key_count, Some(200));
    assert!(
        m.object_key.starts_with("testcluster/full/"),
        "{}",
        m.object_key
    );
    assert!(
        m.object_key.ends_with("/snapshot.db.zst"),
        "{}",
        m.object_key
    );

    // Hashes: recompute both from the stored object independently.
    let stored = stored_bytes(&engine, &m.object_key).await;
    assert_eq!(stored.len() as u64, m.stored_size_bytes);
    let mut h = Sha256::new();
    h.update(&stored);
    assert_eq!(h.finish_hex().0, m.stored_sha256);
    assert_eq!(&stored[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(&stored[..])
        .unwrap()
        .read_to_end(&mut raw)
        .unwrap();
    assert_eq!(raw.len() as u64, m.raw_size_bytes);
    let (data, trailer) = raw.split_at(raw.len() - 32);
    let mut h = Sha256::new();
    h.update(data);
    assert_eq!(
        h.finish_hex().0,
        hex(trailer),
        "etcd's trailer covers the data"
    );
    assert_eq!(m.etcd_sha256, hex(trailer));

    // The manifest is in the store, listed, and readable back.
    let listed = engine.list_snapshots().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].manifest, m);

    // A drill restores it into a throwaway etcd: same revision and keys.
    let record = engine
        .verify_snapshot(&m.id, true, &(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(record.passed, "{:?}", record.mismatches);
    assert_eq!(record.restored_revision, Some(m.revision));
    assert_eq!(record.restored_key_count, Some(200));
    // The record is kept next to the manifest and shows in listings.
    let listed = engine.list_snapshots().await.unwrap();
    let last = listed[0].last_verification.as_ref().unwrap();
    assert!(last.passed && last.drill);
    // The throwaway directory is gone.
    let left: Vec<_> = std::fs::read_dir(drills.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn heavy_encrypted_backup_to_s3() {
    let etcd = Etcd::cluster(3).await.unwrap();
    common::put_small(&etcd, 50).await;
    let mut c = etcd.client().await.unwrap();
    c.put("secret/plain", "PLAINTEXT-MARKER-0123456789", None)
        .await
        .unwrap();
    let s3 = S3Server::start().await.unwrap();
    let keys_dir = tempfile::tempdir().unwrap();
    let key = common::write_identity(keys_dir.path(), "key.txt");
    let keys = Keyring::load(Some(&key), &[]).unwrap();
    let engine = common::engine(&etcd, common::s3_store(&s3, "backups"), keys.clone());

    let m = snapshot(&engine).await.unwrap();
    let key_id = keys.recipient().unwrap().0.as_str().to_owned();
    assert_eq!(
        m.encryption,
        Encryption::AgeX25519 {
            key_id: key_id.clone()
        }
    );
    assert!(
        m.object_key.ends_with("snapshot.db.zst.age"),
        "{}",
        m.object_key
    );

    // Stored bytes are age, neither a zstd frame nor etcd's plaintext.
    let stored = stored_bytes(&engine, &m.object_key).await;
    assert!(stored.starts_with(b"age-encryption.org/v1\n"));
    assert!(!stored.windows(4).any(|w| w == [0x28, 0xb5, 0x2f, 0xfd]));
    assert!(!stored.windows(16).any(|w| w == b"PLAINTEXT-MARKER"));
    // bbolt's magic (0xED0CDAED, little-endian in the meta pages).
    assert!(!stored.windows(4).any(|w| w == [0xed, 0xda, 0x0c, 0xed]));

    // The right key verifies, with a drill.
    let record = engine
        .verify_snapshot(&m.id, true, &(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(record.passed, "{:?}", record.mismatches);
    assert_eq!(record.restored_key_count, m.key_count);

    // A wrong key fails clearly: the key the snapshot needs is named.
    let other = common::write_identity(keys_dir.path(), "other.txt");
    let wrong = Engine {
        keys: Keyring::load(None, &[other]).unwrap(),
        ..(*engine).clone()
    };
    let record = wrong
        .verify_snapshot(&m.id, false, &(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(!record.passed);
    let mm = &record.mismatches[0];
    assert_eq!(mm.kind, MismatchKind::KeyUnavailable);
    assert_eq!(mm.expected, key_id);
    assert!(mm.detail.contains("identityFiles"), "{}", mm.detail);
    // The stored bytes themselves were fine.
    assert_eq!(record.mismatches.len(), 1, "{:?}", record.mismatches);
}

#[tokio::test]
async fn heavy_corruption_is_named() {
    let etcd = Etcd::cluster(3).await.unwrap();
    common::put_small(&etcd, 100).await;
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = tempfile::tempdir().unwrap();
    let key = common::write_identity(keys_dir.path(), "key.txt");
    let plain = common::engine(&etcd, common::file_store(dir.path()), Keyring::none());
    let sealed = Engine {
        keys: Keyring::load(Some(&key), &[]).unwrap(),
        ..(*plain).clone()
    };
    let a = snapshot(&plain).await.unwrap();
    let b = snapshot(&sealed).await.unwrap();
    let c = snapshot(&plain).await.unwrap();
    let file = |m: &bulwark_backup::snapshot::manifest::Manifest| dir.path().join(&m.object_key);
    let verify = |id: String| {
        let plain = plain.clone();
        async move {
            plain
                .verify_snapshot(&id, false, &(), &CancellationToken::new())
                .await
                .unwrap()
        }
    };

    // One flipped byte in a plain snapshot: stored hash, then zstd or
    // etcd's hash trips over it.
    let mut bytes = std::fs::read(file(&a)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(file(&a), &bytes).unwrap();
    let r = verify(a.id.clone()).await;
    let kinds: Vec<_> = r.mismatches.iter().map(|m| m.kind).collect();
    assert!(!r.passed);
    assert_eq!(kinds[0], MismatchKind::StoredHash, "{kinds:?}");
    assert_eq!(r.mismatches[0].expected, a.stored_sha256);
    assert!(
        kinds[1..]
            .iter()
            .all(|k| matches!(k, MismatchKind::Decompress | MismatchKind::EtcdHash)),
        "{kinds:?}"
    );
    assert!(kinds.len() >= 2, "{kinds:?}");

    // One flipped byte in an encrypted snapshot: stored hash and decryption.
    let mut bytes = std::fs::read(file(&b)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x80;
    std::fs::write(file(&b), &bytes).unwrap();
    let r = sealed
        .verify_snapshot(&b.id, false, &(), &CancellationToken::new())
        .await
        .unwrap();
    let kinds: Vec<_> = r.mismatches.iter().map(|m| m.kind).collect();
    assert_eq!(kinds, vec![MismatchKind::StoredHash, MismatchKind::Decrypt]);

    // A truncated object: size, hash, and the layer that ran out of data.
    let bytes = std::fs::read(file(&c)).unwrap();
    std::fs::write(file(&c), &bytes[..bytes.len() - 100]).unwrap();
    let r = verify(c.id.clone()).await;
    let kinds: Vec<_> = r.mismatches.iter().map(|m| m.kind).collect();
    assert_eq!(
        kinds[..2],
        [MismatchKind::StoredSize, MismatchKind::StoredHash],
        "{kinds:?}"
    );
    assert_eq!(r.mismatches[0].actual, (bytes.len() - 100).to_string());
    assert!(
        matches!(kinds[2], MismatchKind::Decompress | MismatchKind::EtcdHash),
        "{kinds:?}"
    );

    // A missing object.
    std::fs::remove_file(file(&c)).unwrap();
    let r = verify(c.id.clone()).await;
    assert_eq!(r.mismatches[0].kind, MismatchKind::ObjectMissing);
}

#[tokio::test]
async fn heavy_upload_faults_leave_nothing_behind() {
    let etcd = Etcd::cluster(3).await.unwrap();
    // ~16 MiB of random data: several 5 MiB parts.
    common::put_random_mib(&etcd, 16).await;
    let s3 = S3Server::start().await.unwrap();
    let base = common::s3_store(&s3, "faults");
    let faults = Faults::new();
    let store = base.wrapped(|inner| Arc::new(UnreliableStore::new(inner, faults.clone())));
    let engine = common::engine(&etcd, store, Keyring::none());

    // A part fails mid-upload, a completion fails, the manifest write fails:
    // each a clean failure with no manifest, no object and no open upload.
    for fault in ["part", "complete", "manifest"] {
        let before = faults.injected();
        match fault {
            "part" => faults.fail_parts(1, 1),
            "complete" => faults.fail_completes(1),
            _ => faults.fail_manifest_puts(1),
        }
        let err = snapshot(&engine).await.unwrap_err();
        assert_eq!(faults.injected(), before + 1);
        assert!(
            err.to_string().contains("injected failure"),
            "{fault}: {err}"
        );
        assert!(engine.list_snapshots().await.unwrap().is_empty());
        assert_eq!(common::all_keys(&engine.store).await, Vec::<String>::new());
        assert_eq!(common::open_multipart_uploads(&s3).await, 0);
    }

    // Scheduled snapshots retry: one failed part, then success, one manifest.
    let (_tx, rx) = tokio::sync::watch::channel(bulwark_backup::schedule::election::LeaderState {
        is_leader: true,
        term: 0,
    });
    let service = bulwark_backup::schedule::service::Service::new(
        engine.clone(),
        bulwark_backup::schedule::service::ServiceSettings {
            schedule: None,
            retries: 2,
            retry_backoff: Duration::ZERO,
            retention: Default::default(),
            retention_interval: Duration::from_secs(3600),
            drill_interval: None,
            election_name: "unused".into(),
            deltas: None,
        },
        rx,
    );
    faults.fail_parts(2, 1);
    let tick = chrono::Utc::now();
    service
        .scheduled_snapshot(tick, &CancellationToken::new())
        .await;
    let listed = engine.list_snapshots().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].manifest.scheduled_for, Some(tick));
    assert_eq!(common::open_multipart_uploads(&s3).await, 0);
    let record = engine
        .verify_snapshot(
            &listed[0].manifest.id,
            false,
            &(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(record.passed, "{:?}", record.mismatches);
}

#[tokio::test]
async fn heavy_member_killed_mid_stream_fails_cleanly_then_recovers() {
    let mut etcd = Etcd::cluster(3).await.unwrap();
    common::put_random_mib(&etcd, 48).await;
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    // A slow store: backpressure holds etcd's stream open mid-way.
    faults.delay_parts(Duration::from_millis(1500));
    let store = common::file_store(dir.path())
        .wrapped(|inner| Arc::new(UnreliableStore::new(inner, faults.clone())));
    let engine = common::engine(&etcd, store, Keyring::none());

    let member = Arc::new(Mutex::new(String::new()));
    let streaming = Arc::new(tokio::sync::Notify::new());
    let progress = {
        let member = member.clone();
        let streaming = streaming.clone();
        move |e: SnapshotEvent| match e {
            SnapshotEvent::Connecting { member_name, .. } => *member.lock().unwrap() = member_name,
            SnapshotEvent::Streaming { raw_bytes, .. } if raw_bytes > 0 => streaming.notify_one(),
            _ => {}
        }
    };
    let run = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .take_snapshot(
                    SnapshotOptions::manual(""),
                    &progress,
                    &CancellationToken::new(),
                    &ok,
                )
                .await
        })
    };
    streaming.notified().await;
    let name = member.lock().unwrap().clone();
    let idx = etcd
        .members()
        .iter()
        .position(|m| m.name() == name)
        .unwrap();
    etcd.member_mut(idx).kill().unwrap();

    let err = run.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            BackupError::EtcdUnavailable { .. } | BackupError::Corrupt { .. }
        ),
        "{err}"
    );
    assert!(engine.list_snapshots().await.unwrap().is_empty());
    assert!(common::all_keys(&engine.store).await.is_empty());

    // The next run succeeds against the remaining quorum.
    faults.delay_parts(Duration::ZERO);
    etcd.wait_healthy(Duration::from_secs(30)).await.unwrap();
    let m = snapshot(&engine).await.unwrap();
    assert_ne!(m.etcd.member_name, name);
    let r = engine
        .verify_snapshot(&m.id, false, &(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(r.passed, "{:?}", r.mismatches);
}

#[tokio::test]
async fn heavy_retention_and_garbage_collection_on_a_real_store() {
    let etcd = Etcd::start().await.unwrap();
    common::put_small(&etcd, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let mut engine =
        (*common::engine(&etcd, common::file_store(dir.path()), Keyring::none())).clone();
    let policy = bulwark_backup::snapshot::retention::RetentionPolicy {
        keep_last: Some(2),
        exponential: None,
    };
    engine.gc_grace_period = Duration::ZERO;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(snapshot(&engine).await.unwrap().id);
    }
    // An interrupted upload: an object without a manifest, and a staging
    // file of the file store's multipart upload.
    let leftover = engine.layout.data("20200101T000000Z-r1-dead", true, false);
    engine
        .store
        .inner()
        .put(&leftover, bytes::Bytes::from_static(b"partial").into())
        .await
        .unwrap();
    let staging = dir
        .path()
        .join(
            engine
                .layout
                .snapshot_dir("20200101T000001Z-r1-beef")
                .as_ref(),
        )
        .join("snapshot.db.zst#1");
    std::fs::create_dir_all(staging.parent().unwrap()).unwrap();
    std::fs::write(&staging, b"part").unwrap();
    // Not listed: only committed snapshots are.
    assert_eq!(engine.list_snapshots().await.unwrap().len(), 4);

    let outcome = engine
        .apply_retention(&policy, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(outcome.deleted, vec![ids[1].clone(), ids[0].clone()]);
    assert_eq!(
        outcome.collected,
        vec!["20200101T000000Z-r1-dead".to_owned()]
    );
    let left: Vec<String> = engine
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.manifest.id)
        .collect();
    assert_eq!(left, vec![ids[3].clone(), ids[2].clone()]);
    assert!(!staging.exists());
    // Only the two kept snapshots' objects remain, and the record of the
    // etcd cluster they are of (never deleted: it numbers the timelines).
    let cluster = engine.get_snapshot(&ids[3]).await.unwrap().manifest;
    let record = engine
        .layout
        .cluster_record(cluster.cluster_id())
        .to_string();
    let keys = common::all_keys(&engine.store).await;
    assert_eq!(keys.len(), 5, "{keys:#?}");
    assert!(
        keys.iter()
            .all(|k| k.contains(&ids[3]) || k.contains(&ids[2]) || *k == record),
        "{keys:#?}"
    );

    // Deleting the newest needs force; deleting removes manifest and data.
    let e = engine.delete_snapshot(&ids[3], false).await.unwrap_err();
    assert!(e.to_string().contains("pass force"), "{e}");
    let d = engine.delete_snapshot(&ids[2], false).await.unwrap();
    assert!(d.freed_bytes > 0);
    assert!(matches!(
        engine.get_snapshot(&ids[2]).await,
        Err(BackupError::NotFound { .. })
    ));
}

#[tokio::test]
async fn heavy_bad_inputs_get_clear_errors() {
    let pki = Pki::new().unwrap();
    let etcd = Etcd::builder().members(1).tls(&pki).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    // etcd unreachable.
    let mut config = bulwark_backup::config::EtcdConfig {
        endpoints: vec!["https://127.0.0.1:1".into()],
        tls: etcd.client_tls().map(|c| c.tls_files()),
        dial_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let unreachable = Engine {
        etcd: bulwark_backup::etcd::EtcdConnector::new(&config).unwrap(),
        ..(*common::engine(&etcd, common::file_store(dir.path()), Keyring::none())).clone()
    };
    let err = snapshot(&unreachable).await.unwrap_err();
    assert!(matches!(err, BackupError::EtcdUnavailable { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("etcd unreachable at https://127.0.0.1:1"),
        "{err}"
    );

    // Wrong credentials: a client certificate from another CA.
    let other = Pki::new().unwrap();
    let stranger = other.client("root", &[]).unwrap();
    config.endpoints = etcd.endpoints();
    config.tls = Some(bulwark_common::tls::TlsFiles {
        ca_file: etcd.client_tls().unwrap().ca.clone(),
        ..stranger.tls_files()
    });
    let refused = Engine {
        etcd: bulwark_backup::etcd::EtcdConnector::new(&config).unwrap(),
        ..unreachable.clone()
    };
    let err = snapshot(&refused).await.unwrap_err();
    assert!(matches!(err, BackupError::EtcdAuth { .. }), "{err}");

    // A missing bucket.
    let s3 = S3Server::start().await.unwrap();
    let mut options: std::collections::BTreeMap<String, String> =
        s3.options().into_iter().collect();
    options.remove("aws_bucket");
    let nobucket = bulwark_backup::store::StoreSpec::parse("s3://no-such-bucket/x", &options)
        .unwrap()
        .build()
        .unwrap();
    let engine = common::engine(&etcd, nobucket, Keyring::none());
    let err = snapshot(&engine).await.unwrap_err();
    assert!(matches!(err, BackupError::StoreUnavailable { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(err.to_string().contains("no-such-bucket"), "{err}");

    // A missing key file.
    let err = Keyring::load(Some(&dir.path().join("gone.txt")), &[]).unwrap_err();
    assert!(err.to_string().contains("gone.txt"), "{err}");
}

#[tokio::test]
async fn heavy_shutdown_mid_upload_aborts_cleanly() {
    let etcd = Etcd::start().await.unwrap();
    common::put_random_mib(&etcd, 24).await;
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    faults.delay_parts(Duration::from_millis(1000));
    let store = common::file_store(dir.path())
        .wrapped(|inner| Arc::new(UnreliableStore::new(inner, faults.clone())));
    let engine = common::engine(&etcd, store, Keyring::none());
    // What SIGTERM does to the daemon: the root token is cancelled.
    let shutdown = CancellationToken::new();
    let progress = {
        let shutdown = shutdown.clone();
        move |e: SnapshotEvent| {
            if let SnapshotEvent::Streaming { raw_bytes, .. } = e
                && raw_bytes > 0
            {
                shutdown.cancel();
            }
        }
    };
    let err = engine
        .take_snapshot(SnapshotOptions::manual(""), &progress, &shutdown, &ok)
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::Cancelled(_)), "{err}");
    assert!(engine.list_snapshots().await.unwrap().is_empty());
    assert!(common::all_keys(&engine.store).await.is_empty());
    // Not even the file store's staging files of the aborted upload remain.
    let mut files = Vec::new();
    let mut stack = vec![dir.path().to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    assert!(files.is_empty(), "{files:?}");
}

/// The etcd leader changes twice while a snapshot streams from it: first
/// `MoveLeader` hands leadership to another member, then that new leader
/// is SIGKILLed and the rest elect again. The member we stream from keeps
/// streaming (a snapshot is one bbolt read transaction on that member, and
/// every read the pipeline makes is serializable), so the outcome is
/// deterministic: the backup commits, and it verifies and drills.
#[tokio::test]
async fn heavy_leader_change_mid_snapshot_commits_a_verified_backup() {
    let mut etcd = Etcd::cluster(3).await.unwrap();
    // Incompressible, and more than the pipeline buffers (channels, parts
    // in flight): the slow store below holds etcd's stream open for
    // seconds, so the faults land while etcd is still sending.
    common::put_random_mib(&etcd, 48).await;
    let dir = tempfile::tempdir().unwrap();
    let drills = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    faults.delay_parts(Duration::from_millis(1500));
    let store = common::file_store(dir.path())
        .wrapped(|inner| Arc::new(UnreliableStore::new(inner, faults.clone())));
    let mut engine = (*common::engine(&etcd, store, Keyring::none())).clone();
    engine.drill.work_dir = Some(drills.path().to_owned());
    let engine = Arc::new(engine);

    let member = Arc::new(Mutex::new(String::new()));
    // Every Streaming event: (raw bytes received from etcd, etcd's DB size).
    let streamed = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let streaming = Arc::new(tokio::sync::Notify::new());
    let progress = {
        let (member, streamed, streaming) = (member.clone(), streamed.clone(), streaming.clone());
        move |e: SnapshotEvent| match e {
            SnapshotEvent::Connecting { member_name, .. } => *member.lock().unwrap() = member_name,
            SnapshotEvent::Streaming {
                raw_bytes,
                raw_expected,
                ..
            } if raw_bytes > 0 => {
                streamed.lock().unwrap().push((raw_bytes, raw_expected));
                streaming.notify_one();
            }
            _ => {}
        }
    };
    let run = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .take_snapshot(
                    SnapshotOptions::manual("leader change"),
                    &progress,
                    &CancellationToken::new(),
                    &ok,
                )
                .await
        })
    };
    streaming.notified().await;
    let name = member.lock().unwrap().clone();
    let source = etcd
        .members()
        .iter()
        .position(|m| m.name() == name)
        .unwrap();
    let mut on_source = etcd.member(source).client().await.unwrap();
    let status = on_source.status().await.unwrap();
    let source_id = status.header().unwrap().member_id();
    assert_eq!(
        status.leader(),
        source_id,
        "the snapshot streams from the leader"
    );

    // 1. MoveLeader: the member we stream from hands leadership over.
    let heir = (source + 1) % 3;
    let heir_id = etcd.member(heir).id().unwrap();
    on_source.move_leader(heir_id).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while on_source.status().await.map(|s| s.leader()).ok() != Some(heir_id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "leadership never moved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 2. The new leader dies; the remaining two (ours among them) elect.
    etcd.member_mut(heir).kill().unwrap();
    let seen = streamed.lock().unwrap().len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        if let Some(&last) = streamed.lock().unwrap().get(seen) {
            break last;
        }
        assert!(
            !run.is_finished(),
            "the snapshot ended before the faults were over"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress after the faults"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        after.0 < after.1,
        "etcd was still streaming after both leader changes: {} of {} bytes",
        after.0,
        after.1
    );

    let m = run.await.unwrap().unwrap();
    println!(
        "after MoveLeader and the SIGKILL, {} of {} bytes had come from etcd; \
         the snapshot took {} ms",
        after.0,
        after.1,
        (m.finished_at - m.started_at).num_milliseconds()
    );
    assert_eq!(m.etcd.member_name, name);
    assert_eq!(m.key_count, Some(48));
    let listed = engine.list_snapshots().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].manifest, m);
    faults.delay_parts(Duration::ZERO);
    let record = engine
        .verify_snapshot(&m.id, true, &(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(record.passed, "{:?}", record.mismatches);
    assert_eq!(record.restored_revision, Some(m.revision));
    assert_eq!(record.restored_key_count, Some(48));

    // The next run, from whoever leads now, commits and verifies too.
    etcd.member_mut(heir).restart().await.unwrap();
    etcd.wait_healthy(Duration::from_secs(30)).await.unwrap();
    let next = snapshot(&engine).await.unwrap();
    let r = engine
        .verify_snapshot(&next.id, false, &(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(r.passed, "{:?}", r.mismatches);
    assert_eq!(engine.list_snapshots().await.unwrap().len(), 2);
}

/// The fault-injecting store itself: each fault fires as often as armed,
/// on the operations it names, and no others.
#[tokio::test]
async fn faults_fire_as_often_as_armed() {
    use futures::StreamExt as _;
    use object_store::PutPayload;
    use object_store::memory::InMemory;
    use object_store::path::Path;

    let faults = Faults::new();
    let store = UnreliableStore::new(Arc::new(InMemory::new()), faults.clone());
    faults.fail_manifest_puts(1);
    let m = Path::from("x/manifest.json");
    assert!(store.put(&m, PutPayload::from_static(b"{}")).await.is_err());
    assert!(store.put(&m, PutPayload::from_static(b"{}")).await.is_ok());
    // Other objects are never affected by the manifest fault.
    faults.fail_manifest_puts(1);
    assert!(
        store
            .put(&Path::from("x/data"), PutPayload::from_static(b"d"))
            .await
            .is_ok()
    );

    faults.fail_parts(1, 1);
    let mut up = store.put_multipart(&Path::from("x/big")).await.unwrap();
    assert!(up.put_part(PutPayload::from_static(b"a")).await.is_ok());
    assert!(up.put_part(PutPayload::from_static(b"b")).await.is_err());
    assert!(up.put_part(PutPayload::from_static(b"c")).await.is_ok());
    faults.fail_completes(1);
    assert!(up.complete().await.is_err());
    assert_eq!(faults.injected(), 3);
    assert_eq!(faults.parts_seen(), 3);

    // A download breaks off half-way, once; manifests are not affected.
    let data = Path::from("x/snapshot.db.zst");
    store
        .put(&data, PutPayload::from(vec![7u8; 1000]))
        .await
        .unwrap();
    faults.fail_downloads(1);
    assert!(store.get(&m).await.unwrap().bytes().await.is_ok());
    let mut body = store.get(&data).await.unwrap().into_stream();
    let mut got = 0;
    let err = loop {
        match body.next().await {
            Some(Ok(c)) => got += c.len(),
            Some(Err(e)) => break e,
            None => panic!("the download did not break off"),
        }
    };
    assert_eq!(got, 500);
    assert!(
        err.to_string().contains("injected failure: download"),
        "{err}"
    );
    assert!(body.next().await.is_none());
    assert_eq!(
        store.get(&data).await.unwrap().bytes().await.unwrap().len(),
        1000
    );
    assert_eq!(faults.injected(), 4);
}
