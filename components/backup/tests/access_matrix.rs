//! The access-control matrix of bulwark-backup, table-driven from the
//! generated `METHOD_ACCESS`: every rpc of the services the daemon serves
//! (Backup, and RestoreAgent), called by an operator, a prober, a backup
//! peer, another identity of the same CA, an operator identity of another
//! CA and a client without a certificate. Only operators get past
//! authorization for snapshot creation, deletion, verification and
//! restore; only peers for the restore agent; a new rpc is checked the
//! moment it is added to the protos.

#![allow(clippy::unwrap_used)]

mod common;

use bulwark_backup::Listeners;
use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::access::{Callers, methods_of};
use bulwark_testkit::{Etcd, Pki};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_access_matrix_covers_every_backup_rpc() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    common::put_small(&etcd, 5).await;
    let store = tempfile::tempdir().unwrap();
    let server = pki.server("backup", &["127.0.0.1", "localhost"]).unwrap();
    let endpoints = etcd
        .endpoints()
        .iter()
        .map(|e| format!("'{e}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "apiVersion: bulwark.dev/v1alpha1
kind: BackupConfiguration
nodeName: access-node
clusterName: lab
grpc:
  address: 127.0.0.1:0
  tls:
    certFile: {cert}
    keyFile: {key}
    caFile: {ca}
  access:
    operators: {{organizations: [system:masters]}}
    probers: {{organizations: ['bulwark:prober']}}
    peers: {{organizations: ['bulwark:backup']}}
etcd:
  endpoints: [{endpoints}]
  tls: null
store:
  url: file://{store}
schedule:
  interval: null
",
        cert = server.cert.display(),
        key = server.key.display(),
        ca = server.ca.display(),
        store = store.path().display(),
    );
    let config: bulwark_backup::BackupConfig = bulwark_common::config::from_str_with(
        Some(&text),
        None,
        &bulwark_common::config::Overrides::new(),
    )
    .unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap().to_string();
    let shutdown = Shutdown::new();
    bulwark_backup::run(config, Listeners { grpc, admin }, shutdown.clone())
        .await
        .unwrap();

    let callers = Callers::new(&pki, &addr, "bulwark:backup").unwrap();
    let mut wrong = Vec::new();
    let methods = methods_of(bulwark_api::BACKUP_SERVICES);
    for &(path, access) in &methods {
        wrong.extend(callers.check(path, access).await);
    }
    wrong.extend(
        callers
            .check("/grpc.health.v1.Health/Check", bulwark_api::Access::Read)
            .await,
    );
    assert!(
        methods.len() >= 10,
        "only {} rpcs in the table",
        methods.len()
    );
    assert!(
        wrong.is_empty(),
        "{} mismatches:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    shutdown.trigger();
}
