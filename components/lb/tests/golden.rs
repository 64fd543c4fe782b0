//! Every released Raft store stays readable: `tests/golden/<version>/` holds
//! the data dir (`raft.redb`: log entries, vote, committed index, state
//! machine and snapshot, each a `bulwark.raft.v1` protobuf inside redb's
//! file format) that a one-node cluster of that version wrote, with the
//! state it held (`expected.json`). This build must start a node on a copy
//! of each, with the same backends, admin states and VIP record, and keep
//! writing to it. A rolling upgrade depends on this: the new binary opens
//! the old binary's data dir.
//!
//! The golden data dir of the current version is written by
//! `BULWARK_WRITE_GOLDEN=1 cargo nextest run -p bulwark-lb --test golden`
//! (the same scenario, then the files are kept); a release commits it and
//! never changes it again. docs/UPGRADES.md says what this covers.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::{Pki, TestDir, config};
use serde_json::{Value, json};

const WRITE_ENV: &str = "BULWARK_WRITE_GOLDEN";

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// A one-node cluster in this process; stops when dropped.
struct OneNode {
    api: SocketAddr,
    pki: Pki,
    shutdown: Shutdown,
    _node: bulwark_lb::Node,
}

impl Drop for OneNode {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

impl OneNode {
    /// Starts node 1 on `data`; `first` forms the cluster (a new data dir),
    /// otherwise the node resumes from what `data` holds.
    async fn start(pki: &Pki, data: &Path, first: bool) -> Self {
        bulwark_testkit::install_crypto_provider();
        let raft = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (raft_addr, api_addr) = (raft.local_addr().unwrap(), api.local_addr().unwrap());
        let cert = pki
            .peer("lb-1", &["bulwark:lb"], &["127.0.0.1", "localhost"])
            .unwrap();
        let members = [config::lb_member(1, "lb-1", "a", raft_addr, api_addr)];
        let mut c = config::lb_node(&members, 1, &cert, data).unwrap();
        c.name = None;
        c.raft.snapshot_every_entries = 10;
        if first {
            c.backends = vec![config::lb_backend(
                "seeded",
                SocketAddr::from(([10, 0, 0, 1], 6443)),
                "a",
            )];
        } else {
            c.initial_members.clear();
        }
        let config = config::validated(&c).unwrap();
        let shutdown = Shutdown::new();
        let node = bulwark_lb::run(
            config,
            bulwark_lb::Listeners {
                raft,
                api,
                admin: None,
                local: None,
                front: Vec::new(),
            },
            &shutdown,
        )
        .await
        .unwrap();
        let n = Self {
            api: api_addr,
            pki: pki.clone(),
            shutdown,
            _node: node,
        };
        n.wait_for_leader().await;
        n
    }

    fn client(&self) -> LoadBalancerClient<tonic::transport::Channel> {
        let admin = self.pki.admin().unwrap();
        let tls = bulwark_common::tls::TlsFiles {
            cert_file: admin.cert.clone(),
            key_file: admin.key.clone(),
            ca_file: admin.ca.clone(),
        }
        .load()
        .unwrap();
        LoadBalancerClient::new(
            bulwark_common::grpc::channel(&self.api.to_string(), &tls, None).unwrap(),
        )
    }

    async fn wait_for_leader(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let status = self
                .client()
                .get_status(lb::GetStatusRequest::default())
                .await;
            if status.is_ok_and(|s| s.into_inner().leader.is_some_and(|l| l.id == 1)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node 1 did not lead within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the golden file records: each backend's id, address, zone,
    /// weight and admin state, and the member list.
    async fn state(&self) -> Value {
        let mut c = self.client();
        let backends = c
            .list_backends(lb::ListBackendsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .backends;
        let members = c
            .list_members(lb::ListMembersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .members;
        json!({
            "backends": backends.iter().map(|b| json!({
                "id": b.id,
                "address": b.address,
                "zone": b.zone,
                "weight": b.weight,
                "admin_state": lb::AdminState::try_from(b.admin_state).map(|s| s.as_str_name()).unwrap_or("?"),
            })).collect::<Vec<_>>(),
            "members": members.iter().map(|m| {
                let n = m.node.clone().unwrap_or_default();
                json!({"id": n.id, "name": n.name, "zone": n.zone})
            }).collect::<Vec<_>>(),
        })
    }
}

/// Every kind of registry change an operator makes, enough of them that
/// the store holds a snapshot and log entries after it.
async fn write_history(n: &OneNode) {
    let mut c = n.client();
    for (i, (id, zone)) in [("cp-1", "a"), ("cp-2", "b"), ("cp-3", "c"), ("gone", "c")]
        .into_iter()
        .enumerate()
    {
        c.add_backend(lb::AddBackendRequest {
            id: id.into(),
            address: format!("10.0.1.{}:6443", i + 1),
            zone: zone.into(),
            weight: None,
            drained: false,
        })
        .await
        .unwrap();
    }
    // Past the snapshot threshold (10 entries), so the store holds a
    // snapshot and entries after it.
    for weight in [150, 200, 250] {
        c.update_backend(lb::UpdateBackendRequest {
            id: "cp-2".into(),
            weight: Some(weight),
            zone: None,
        })
        .await
        .unwrap();
    }
    c.update_backend(lb::UpdateBackendRequest {
        id: "cp-1".into(),
        weight: None,
        zone: Some("a2".into()),
    })
    .await
    .unwrap();
    c.drain_backend(lb::DrainBackendRequest {
        id: "cp-3".into(),
        max_drain_duration: None,
    })
    .await
    .unwrap();
    c.remove_backend(lb::RemoveBackendRequest { id: "gone".into() })
        .await
        .unwrap();
}

/// The data dir each released version wrote is read by this build, and
/// the node keeps committing on top of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_golden_raft_store_is_read_by_this_build() {
    if std::env::var(WRITE_ENV).is_ok_and(|v| v == "1") {
        write_golden().await;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir(golden_root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    versions.sort();
    assert!(
        !versions.is_empty(),
        "no golden data dir in {}",
        golden_root().display()
    );
    for version in versions {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(version.join("expected.json")).unwrap())
                .unwrap();
        let dir = TestDir::new("lb-golden").unwrap();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::copy(
            version.join(bulwark_lb::raft::store::DB_FILE),
            data.join(bulwark_lb::raft::store::DB_FILE),
        )
        .unwrap();
        assert_snapshot_and_log_after(&data, &version).await;
        let n = OneNode::start(&Pki::new().unwrap(), &data, false).await;
        assert_eq!(n.state().await, expected, "{}", version.display());
        // Still writable: a new entry commits on top of the old log.
        n.client()
            .add_backend(lb::AddBackendRequest {
                id: "after-upgrade".into(),
                address: "10.0.2.1:6443".into(),
                zone: "a".into(),
                weight: None,
                drained: false,
            })
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", version.display()));
    }
}

/// The golden store exercises both read paths of a restart: a snapshot
/// to install and log entries after it to replay.
async fn assert_snapshot_and_log_after(data: &Path, version: &Path) {
    use openraft::storage::{RaftLogStorage as _, RaftStateMachine as _};
    let store = bulwark_lb::raft::store::Store::open(data).unwrap();
    let snapshot = store
        .state_machine()
        .await
        .unwrap()
        .get_current_snapshot()
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{}: no snapshot in the golden store", version.display()));
    let snapshot_index = snapshot.meta.last_log_id.map_or(0, |l| l.index);
    let last = store.log_store().get_log_state().await.unwrap().last_log_id;
    assert!(
        last.is_some_and(|l| l.index > snapshot_index) && snapshot_index > 0,
        "{}: want log entries after the snapshot (at {snapshot_index}), last is {last:?}",
        version.display()
    );
}

/// Runs the scenario on a new data dir and keeps the result as this
/// version's golden files.
async fn write_golden() {
    let out = golden_root().join(env!("CARGO_PKG_VERSION"));
    let dir = TestDir::new("lb-golden-write").unwrap();
    let data = dir.join("data");
    let pki = Pki::new().unwrap();
    let state = {
        let n = OneNode::start(&pki, &data, true).await;
        write_history(&n).await;
        n.state().await
    };
    // Let the node close its store before the file is copied.
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(
        data.join(bulwark_lb::raft::store::DB_FILE),
        out.join(bulwark_lb::raft::store::DB_FILE),
    )
    .unwrap();
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_string_pretty(&state).unwrap() + "\n",
    )
    .unwrap();
}
