//! object_store against moto: put, get, list, delete, multipart, and the
//! option pairs services build their store from.

use bulwark_testkit::S3Server;
use futures::TryStreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore as _, ObjectStoreExt as _, PutPayload};

#[tokio::test]
async fn put_get_list_delete_and_multipart() {
    let s3 = S3Server::start().await.unwrap();
    assert!(s3.endpoint().starts_with("http://127.0.0.1:"));
    assert_eq!(s3.url(), "s3://bulwark-backups");
    let store = s3.store().unwrap();

    let small = Path::from("snapshots/a.db");
    store
        .put(&small, PutPayload::from_static(b"hello etcd"))
        .await
        .unwrap();
    let body = store.get(&small).await.unwrap().bytes().await.unwrap();
    assert_eq!(&body[..], b"hello etcd");

    // Multipart: S3 wants parts of at least 5 MiB except the last.
    let big = Path::from("snapshots/big.db");
    let part = 5 * 1024 * 1024;
    let mut upload = store.put_multipart(&big).await.unwrap();
    let mut expected = Vec::new();
    for (i, len) in [part, part, 1234].into_iter().enumerate() {
        let chunk = vec![b'a' + i as u8; len];
        expected.extend_from_slice(&chunk);
        upload.put_part(PutPayload::from(chunk)).await.unwrap();
    }
    upload.complete().await.unwrap();
    let got = store.get(&big).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got[..] == expected[..], "multipart object differs");

    let mut listed: Vec<String> = store
        .list(Some(&Path::from("snapshots")))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    listed.sort();
    assert_eq!(listed, ["snapshots/a.db", "snapshots/big.db"]);

    store.delete(&small).await.unwrap();
    let err = store.get(&small).await.unwrap_err();
    assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn option_pairs_build_a_working_store() {
    let s3 = S3Server::start_with_bucket("from-config").await.unwrap();
    let mut builder = AmazonS3Builder::new();
    for (key, value) in s3.options() {
        builder = builder.with_config(key.parse().unwrap(), value);
    }
    let store = builder.build().unwrap();
    let path = Path::from("x");
    store
        .put(&path, PutPayload::from_static(b"1"))
        .await
        .unwrap();
    // The same object through the harness's own store on that bucket.
    let body = s3
        .store_for("from-config")
        .unwrap()
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], b"1");

    s3.create_bucket("second").await.unwrap();
    s3.store_for("second")
        .unwrap()
        .put(&path, PutPayload::from_static(b"2"))
        .await
        .unwrap();
}
