//! The backup daemon's lifecycle, in process over a real etcd: its workers
//! (the leader election, the scheduler, the delta recorder) are listed by
//! `/debug/workers` with their state, last success and last error, and a
//! scheduler that panics stops the daemon with a log line naming it (the
//! panic is injected through bulwark-common's `faults` feature, which
//! only test builds enable).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use bulwark_backup::{BackupConfig, Listeners};
use bulwark_common::config::Overrides;
use bulwark_common::shutdown::{EXIT_TASK_FAILED, Shutdown};
use bulwark_common::workers::TaskState;
use bulwark_testkit::admin::{CapturedLogs, http_get, worker};
use bulwark_testkit::{Etcd, Pki};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// A daemon that leads at once (it is alone), snapshots once a day (so
/// once at start: the last tick has no snapshot yet) and records deltas.
async fn start(pki: &Pki, etcd: &Etcd, store: &Path) -> (Shutdown, SocketAddr) {
    bulwark_common::tls::install_crypto_provider();
    let server = pki.server("backup", &["127.0.0.1", "localhost"]).unwrap();
    let mut o = Overrides::new();
    o.set("nodeName", "node-1")
        .set("clusterName", "lab")
        .set(
            "grpc.tls",
            json!({ "certFile": server.cert, "keyFile": server.key, "caFile": server.ca }),
        )
        .set(
            "grpc.access.operators",
            json!({ "organizations": ["system:masters"] }),
        )
        .set("etcd.endpoints", etcd.endpoints())
        .set("etcd.tls", Value::Null)
        .set("store.url", format!("file://{}", store.display()))
        .set("schedule.interval", "24h")
        .set("schedule.leaseTtl", "3s")
        .set("deltas.enabled", true);
    let config: BackupConfig = bulwark_common::config::from_str_with(None, None, &o).unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = Shutdown::new();
    bulwark_backup::run(config, Listeners { grpc, admin }, &shutdown)
        .await
        .unwrap();
    (shutdown, admin_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_debug_workers_lists_election_scheduler_and_recorder() {
    let pki = Pki::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let store = tempfile::tempdir().unwrap();
    let (shutdown, admin) = start(&pki, &etcd, store.path()).await;

    let deadline = tokio::time::Instant::now() + WAIT;
    let list = loop {
        let (code, body) = http_get(admin, "/debug/workers").await;
        assert_eq!(code, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        let state = |name| worker(&list, name).map(|w| w["state"].clone());
        let done = state("leader election") == Some(json!("leading"))
            && state("scheduler") == Some(json!("leading"))
            && state("delta recorder") == Some(json!("running"))
            && worker(&list, "scheduler").is_some_and(|s| s["lastSuccess"].is_string());
        if done {
            break list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leading, the start-up snapshot taken and deltas recorded: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for name in ["leader election", "scheduler"] {
        let w = worker(&list, name).unwrap();
        assert_eq!(w["critical"], true, "{list}");
        assert_eq!(w["task"], "running", "{list}");
        assert!(w["lastSuccess"].is_string(), "{list}");
    }
    // The recorder runs inside the scheduler's task.
    assert!(worker(&list, "delta recorder").is_some(), "{list}");

    shutdown.trigger();
    let code = tokio::time::timeout(WAIT, shutdown.clone().wait(WAIT))
        .await
        .unwrap();
    assert_eq!(code, ExitCode::SUCCESS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_a_panicking_scheduler_stops_the_daemon() {
    let log = CapturedLogs::install();
    let pki = Pki::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let store = tempfile::tempdir().unwrap();
    let (shutdown, _) = start(&pki, &etcd, store.path()).await;

    shutdown.workers().inject_panic("scheduler");
    let code = tokio::time::timeout(WAIT, shutdown.clone().wait(WAIT))
        .await
        .expect("the daemon did not stop");
    assert_eq!(code, ExitCode::from(EXIT_TASK_FAILED));
    let log = log.text();
    assert!(
        log.contains(
            "critical task scheduler panicked: fault injected into scheduler; shutting down"
        ),
        "{log}"
    );
    assert_eq!(
        shutdown.workers().get("scheduler").unwrap().task,
        TaskState::Failed
    );
    // The others wound down with it: the election resigned.
    assert_eq!(
        shutdown.workers().get("leader election").unwrap().task,
        TaskState::Finished
    );
}
