//! The access-control matrix of bulwark-lb, table-driven from the
//! generated `METHOD_ACCESS`: every rpc of LoadBalancer, BackendWatch and
//! ProbeReports on the API port and of Raft on the Raft port, called by an
//! operator, a prober, an LB peer, another identity of the same CA, an
//! operator identity of another CA and a client without a certificate.
//! Only the identities an rpc's access level names get past
//! authorization: destructive calls only operators, the Raft port's rpcs
//! only LB peers, report streams only probers. A new rpc is checked the
//! moment it is added to the protos.

#![allow(clippy::unwrap_used)]

use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::access::{Callers, methods_of};
use bulwark_testkit::{Pki, TestDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_matrix_covers_every_lb_rpc() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let dir = TestDir::new("lb-access").unwrap();
    let raft = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (raft_addr, api_addr) = (raft.local_addr().unwrap(), api.local_addr().unwrap());
    let cert = pki
        .peer("lb-1", &["bulwark:lb"], &["127.0.0.1", "localhost"])
        .unwrap();
    let text = format!(
        "apiVersion: bulwark.dev/v1alpha1
kind: LoadBalancerConfiguration
nodeId: 1
dataDir: {data}
raft:
  address: '{raft_addr}'
api:
  address: '{api_addr}'
tls:
  certFile: {cert}
  keyFile: {key}
  caFile: {ca}
access:
  operators: {{organizations: [system:masters]}}
  probers: {{organizations: ['bulwark:prober']}}
  peers: {{organizations: ['bulwark:lb']}}
initialMembers:
- {{id: 1, name: lb-1, raftAddress: '{raft_addr}', apiAddress: '{api_addr}'}}
",
        data = dir.join("data").display(),
        cert = cert.cert.display(),
        key = cert.key.display(),
        ca = cert.ca.display(),
    );
    let config: bulwark_lb::config::LbConfig = bulwark_common::config::from_str_with(
        Some(&text),
        None,
        &bulwark_common::config::Overrides::new(),
    )
    .unwrap();
    let shutdown = Shutdown::new();
    let _node = bulwark_lb::run(
        config,
        bulwark_lb::Listeners {
            raft,
            api,
            admin: None,
            local: None,
            front: None,
        },
        &shutdown,
    )
    .await
    .unwrap();

    let on_api = Callers::new(&pki, &api_addr.to_string(), "bulwark:lb").unwrap();
    let on_raft = Callers::new(&pki, &raft_addr.to_string(), "bulwark:lb").unwrap();
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
    shutdown.trigger();
}
