//! A bulwark-lb node's lifecycle, in process: its workers (the VIP task,
//! the health aggregator, the servers) are listed by `/debug/workers` with
//! their state, last success and last error, and a VIP task that panics
//! stops the node with a log line naming it (the panic is injected through
//! bulwark-common's `faults` feature, which only test builds enable). And
//! the BackendWatch stream, which runs as its connection's stream rather
//! than a task of its own, still sends the set and then each change.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bulwark_common::config::Overrides;
use bulwark_common::shutdown::{EXIT_TASK_FAILED, Shutdown};
use bulwark_common::workers::TaskState;
use bulwark_lb::config::LbConfig;
use bulwark_testkit::admin::{CapturedLogs, http_get, worker};
use bulwark_testkit::{Pki, TestDir, ports};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// One node of its own cluster, with a bind-mode VIP on loopback; runs
/// until its `shutdown` is triggered.
struct OneNode {
    shutdown: Shutdown,
    admin: SocketAddr,
    api: SocketAddr,
    pki: Pki,
    _node: bulwark_lb::Node,
    _dir: TestDir,
}

async fn one_node() -> OneNode {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let dir = TestDir::new("lb-lifecycle").unwrap();
    let raft = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (raft_addr, api_addr) = (raft.local_addr().unwrap(), api.local_addr().unwrap());
    let admin_addr = admin.local_addr().unwrap();
    let cert = pki
        .peer("lb-1", &["bulwark:lb"], &["127.0.0.1", "localhost"])
        .unwrap();
    let mut o = Overrides::new();
    o.set("nodeId", 1)
        .set("dataDir", dir.join("data"))
        .set("raft.address", raft_addr.to_string())
        .set("api.address", api_addr.to_string())
        .set("admin.address", admin_addr.to_string())
        .set(
            "tls",
            json!({ "certFile": cert.cert, "keyFile": cert.key, "caFile": cert.ca }),
        )
        .set("access.peers", json!({ "organizations": ["bulwark:lb"] }))
        .set(
            "initialMembers",
            json!([{ "id": 1, "name": "lb-1", "raftAddress": raft_addr.to_string(), "apiAddress": api_addr.to_string() }]),
        )
        .set(
            "vip",
            json!({ "mode": "bind", "address": "127.0.0.1", "port": ports::loopback_port().unwrap() }),
        )
        .set(
            "backends",
            json!([{ "id": "cp-1", "address": "127.0.0.1:6443", "zone": "zone-a" }]),
        );
    let config: LbConfig = bulwark_common::config::from_str_with(None, None, &o).unwrap();
    let shutdown = Shutdown::new();
    let listeners = bulwark_lb::Listeners {
        raft,
        api,
        admin: Some(admin),
        local: None,
        front: Vec::new(),
    };
    let node = bulwark_lb::run(config, listeners, &shutdown).await.unwrap();
    OneNode {
        shutdown,
        admin: admin_addr,
        api: api_addr,
        pki,
        _node: node,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_workers_lists_the_vip_task_and_the_health_aggregator() {
    let n = one_node().await;
    // The lone voter leads, takes the VIP and aggregates health.
    let deadline = tokio::time::Instant::now() + WAIT;
    let list = loop {
        let (code, body) = http_get(n.admin, "/debug/workers").await;
        assert_eq!(code, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        let done = worker(&list, "vip").is_some_and(|v| v["state"] == "holding")
            && worker(&list, "health").is_some_and(|h| h["state"] == "leading");
        if done {
            break list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the VIP held and health leading: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let vip = worker(&list, "vip").unwrap();
    assert_eq!(vip["critical"], true, "{list}");
    assert_eq!(vip["task"], "running", "{list}");
    assert!(vip["lastSuccess"].is_string(), "{list}");
    assert!(vip["lastError"].is_null(), "{list}");
    // Every task the node spawned by name is listed, servers included.
    for name in ["raft-grpc", "api-grpc", "admin", "publisher", "lifecycle"] {
        assert!(worker(&list, name).is_some(), "{name} missing: {list}");
    }

    n.shutdown.trigger();
    let code = tokio::time::timeout(WAIT, n.shutdown.clone().wait(WAIT))
        .await
        .unwrap();
    assert_eq!(code, ExitCode::SUCCESS);
}

/// BackendWatch streams without a task of its own (the response stream
/// does the work): the current set, then each change; with
/// `since_version` current, nothing but a newer version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_watch_streams_the_seeded_set_then_waits_for_a_change() {
    use bulwark_api::lb::v1::WatchBackendsRequest;
    use bulwark_api::lb::v1::backend_watch_client::BackendWatchClient;

    let n = one_node().await;
    let tls = n
        .pki
        .peer("lb-2", &["bulwark:lb"], &["127.0.0.1"])
        .unwrap()
        .tls_files()
        .load()
        .unwrap();
    let channel = bulwark_common::grpc::channel(&n.api.to_string(), &tls, None).unwrap();
    let mut client = BackendWatchClient::new(channel);
    let watch = |since| WatchBackendsRequest {
        node_name: "lb-2".into(),
        since_version: since,
    };
    let mut stream = client.watch(watch(None)).await.unwrap().into_inner();
    // The leader seeds the configured backend: a set holding it arrives.
    let seeded = tokio::time::timeout(WAIT, async {
        loop {
            let set = stream.message().await.unwrap().unwrap();
            if set.backends.iter().any(|b| b.id == "cp-1") {
                return set;
            }
        }
    })
    .await
    .expect("the seeded set");
    assert_eq!(seeded.backends[0].address, "127.0.0.1:6443");

    let mut stream = client
        .watch(watch(Some(seeded.version)))
        .await
        .unwrap()
        .into_inner();
    // Nothing the client already has is sent again: the next message, if
    // one comes at all, is a newer version (the new leader may still be
    // writing its own records right after start).
    let next = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    if let Ok(message) = next {
        let set = message.unwrap().unwrap();
        assert!(
            set.version > seeded.version,
            "re-sent a set the client has: {set:?}"
        );
    }
    n.shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_vip_task_stops_the_node() {
    let log = CapturedLogs::install();
    let n = one_node().await;
    n.shutdown.workers().inject_panic("vip");
    let code = tokio::time::timeout(WAIT, n.shutdown.clone().wait(WAIT))
        .await
        .expect("the node did not stop");
    assert_eq!(code, ExitCode::from(EXIT_TASK_FAILED));
    let log = log.text();
    assert!(
        log.contains("critical task vip panicked: fault injected into vip; shutting down"),
        "{log}"
    );
    assert_eq!(
        n.shutdown.workers().get("vip").unwrap().task,
        TaskState::Failed
    );
}
