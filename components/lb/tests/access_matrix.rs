//! The access-control matrix of bulwark-lb, table-driven from the
//! generated `METHOD_ACCESS`: every rpc of LoadBalancer, BackendWatch and
//! ProbeReports on the API port and of Raft on the Raft port, called by an
//! operator, a prober, an LB peer, another identity of the same CA, an
//! operator identity of another CA and a client without a certificate.
//! Only the identities an rpc's access level names get past
//! authorization: destructive calls only operators, the Raft port's rpcs
//! only LB peers, report streams only probers. A new rpc is checked the
//! moment it is added to the protos. Also: malformed and hostile requests
//! to every rpc get errors, never a panic.

#![allow(clippy::unwrap_used)]

use bulwark_api::Access;
use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::access::{Caller, Callers, check_garbage, methods_of};
use bulwark_testkit::{Pki, TestDir, config};

/// A one-node cluster in this process, with operators, probers and peers
/// configured; the node runs until the returned guard drops.
struct OneNode {
    pki: Pki,
    api: std::net::SocketAddr,
    raft: std::net::SocketAddr,
    shutdown: Shutdown,
    _node: bulwark_lb::Node,
    _dir: TestDir,
}

impl Drop for OneNode {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn one_node() -> OneNode {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let dir = TestDir::new("lb-access").unwrap();
    let raft = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (raft_addr, api_addr) = (raft.local_addr().unwrap(), api.local_addr().unwrap());
    let cert = pki
        .peer("lb-1", &["bulwark:lb"], &["127.0.0.1", "localhost"])
        .unwrap();
    let members = [config::lb_member(1, "lb-1", "", raft_addr, api_addr)];
    let mut c = config::lb_node(&members, 1, &cert, &dir.join("data")).unwrap();
    c.name = None;
    c.access.probers = Some(config::orgs(&["bulwark:prober"]));
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

    OneNode {
        pki,
        api: api_addr,
        raft: raft_addr,
        shutdown,
        _node: node,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_matrix_covers_every_lb_rpc() {
    let n = one_node().await;
    let (pki, api_addr, raft_addr) = (&n.pki, n.api, n.raft);
    let on_api = Callers::new(pki, &api_addr.to_string(), "bulwark:lb").unwrap();
    let on_raft = Callers::new(pki, &raft_addr.to_string(), "bulwark:lb").unwrap();
    let mut wrong = Vec::new();
    let mut checked = 0;
    let api_services = [
        bulwark_api::LOAD_BALANCER_SERVICE,
        bulwark_api::BACKEND_WATCH_SERVICE,
        bulwark_api::PROBE_REPORTS_SERVICE,
    ];
    for (path, access) in methods_of(&api_services) {
        wrong.extend(on_api.check(path, access).await);
        checked += 1;
    }
    for (path, access) in methods_of(&[bulwark_api::RAFT_SERVICE]) {
        wrong.extend(on_raft.check(path, access).await);
        checked += 1;
    }
    // Health is read access on both ports: still no certificate, no answer.
    for callers in [&on_api, &on_raft] {
        wrong.extend(
            callers
                .check("/grpc.health.v1.Health/Check", bulwark_api::Access::Read)
                .await,
        );
    }
    // Every service the node serves was in the table.
    let served: Vec<&str> = bulwark_api::LB_SERVICES.to_vec();
    assert_eq!(
        methods_of(&served).len(),
        checked,
        "every LB rpc is in the matrix"
    );
    assert!(checked >= 20, "only {checked} rpcs in the table");
    assert!(
        wrong.is_empty(),
        "{} mismatches:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Malformed and hostile requests get errors, never a panic: garbage
/// bodies to every rpc (as an identity allowed to call it), then
/// well-formed messages with oversized or out-of-range fields; the node
/// still answers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_errors_not_panics() {
    let n = one_node().await;
    let on_api = Callers::new(&n.pki, &n.api.to_string(), "bulwark:lb").unwrap();
    let on_raft = Callers::new(&n.pki, &n.raft.to_string(), "bulwark:lb").unwrap();
    let mut wrong = Vec::new();
    for (path, access) in methods_of(bulwark_api::LB_SERVICES) {
        let (callers, caller) = match access {
            Access::Peer => (&on_raft, Caller::Peer),
            Access::Prober => (&on_api, Caller::Prober),
            _ => (&on_api, Caller::Operator),
        };
        wrong.extend(check_garbage(&callers.channel(caller), path).await);
    }

    let mut op = LoadBalancerClient::new(on_api.channel(Caller::Operator));
    let big = "a".repeat(1 << 20);
    let huge_duration = Some(prost_types::Duration {
        seconds: i64::MAX,
        nanos: -1,
    });
    let node = |id: u64, addr: &str| lb::NodeInfo {
        id,
        name: big.clone(),
        raft_address: addr.into(),
        api_address: addr.into(),
        ..Default::default()
    };
    let results: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "AddBackend 1 MiB id",
            op.add_backend(lb::AddBackendRequest {
                id: big.clone(),
                address: "127.0.0.1:1".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "AddBackend 1 MiB address",
            op.add_backend(lb::AddBackendRequest {
                id: "x".into(),
                address: big.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "AddBackend weight u32::MAX, zone with control characters",
            op.add_backend(lb::AddBackendRequest {
                id: "x".into(),
                address: "127.0.0.1:1".into(),
                weight: Some(u32::MAX),
                zone: "\u{0}\n".into(),
                drained: true,
            })
            .await
            .map(drop),
        ),
        (
            "UpdateBackend 1 MiB zone",
            op.update_backend(lb::UpdateBackendRequest {
                id: "x".into(),
                weight: Some(0),
                zone: Some(big.clone()),
            })
            .await
            .map(drop),
        ),
        (
            "DrainBackend duration overflow",
            op.drain_backend(lb::DrainBackendRequest {
                id: "x".into(),
                max_drain_duration: huge_duration,
            })
            .await
            .map(drop),
        ),
        (
            "AddMember id u64::MAX, 1 MiB name, bad addresses",
            op.add_member(lb::AddMemberRequest {
                node: Some(node(u64::MAX, "::::")),
                stay_learner: true,
                catch_up_timeout: huge_duration,
            })
            .await
            .map(drop),
        ),
        (
            "AddMember negative catch-up timeout",
            op.add_member(lb::AddMemberRequest {
                node: Some(node(7, "127.0.0.1:1")),
                stay_learner: true,
                catch_up_timeout: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
            })
            .await
            .map(drop),
        ),
        (
            "RemoveMember u64::MAX",
            op.remove_member(lb::RemoveMemberRequest {
                node_id: u64::MAX,
                force: true,
            })
            .await
            .map(drop),
        ),
        (
            "TransferLeadership to u64::MAX",
            op.transfer_leadership(lb::TransferLeadershipRequest {
                to_node_id: Some(u64::MAX),
            })
            .await
            .map(drop),
        ),
    ];
    for (what, r) in results {
        match r {
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::NotFound
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::OutOfRange
                ) =>
            {
                assert!(
                    s.message().len() < 4096,
                    "{what}: the error echoes the whole input ({} bytes)",
                    s.message().len()
                );
            }
            other => wrong.push(format!("{what}: {other:?}")),
        }
    }
    // Still serving, state untouched.
    let status = op
        .get_status(lb::GetStatusRequest {
            max_failovers: u32::MAX,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.backends_total, 0, "{status:?}");
    assert!(
        wrong.is_empty(),
        "{} problems:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
