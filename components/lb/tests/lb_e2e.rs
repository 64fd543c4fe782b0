//! The front end to end through the `bulwark-lb` binary: fixture
//! apiservers (the kube-apiserver test double) behind a 3-node cluster's
//! bind-mode VIP, driven by kubectl and by an HTTPS client.

// Helpers outside #[test] fns fail the test loudly too.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bulwark_api::lb::v1 as lb;
use bulwark_testkit::Pki;
use bulwark_testkit::cluster::{LbCluster, Options, new_vip};
use bulwark_testkit::fixture::{ApiServerProcess, HttpsClient};

async fn apiservers(pki: &Pki, vip: std::net::SocketAddr, n: usize) -> Vec<ApiServerProcess> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(
            ApiServerProcess::builder(format!("api-{i}"))
                .san(vip.ip().to_string())
                .start(pki)
                .await
                .unwrap(),
        );
    }
    out
}

async fn cluster_with(apis: &[ApiServerProcess], pki: Pki, vip: std::net::SocketAddr) -> LbCluster {
    LbCluster::start_with_pki(
        pki,
        Options {
            nodes: 3,
            backends: apis
                .iter()
                .map(|a| (a.name().to_owned(), a.addr()))
                .collect(),
            vip: Some(vip),
            snapshot_every: None,
            // These tests count failed client requests and measure no
            // failover: with the default timers a CI machine busy with
            // other tests can lapse the holder's lease (a stall of 150 ms
            // did, once), and the release resets the client's connection.
            relaxed_timers: true,
            ..Default::default()
        },
    )
    .await
}

/// `kubectl get --raw /readyz` against `server`, trusting `pki`'s CA.
async fn kubectl_readyz(pki: &Pki, server: &str) -> std::process::Output {
    // An empty kubeconfig and a token: without credentials kubectl would
    // prompt for a user name.
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    tokio::process::Command::new(bulwark_testkit::tools::kubectl().unwrap())
        .arg(format!("--server={server}"))
        .arg(format!(
            "--certificate-authority={}",
            pki.ca_path().display()
        ))
        .args([
            "--token=bulwark-test",
            "--request-timeout=10s",
            "get",
            "--raw",
            "/readyz",
        ])
        .env("KUBECONFIG", kubeconfig.path())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap()
}

/// The GUIDE points each node's kubelet at its node-local listener
/// (https://127.0.0.1:7445, KubePrism-style). The apiservers here have the
/// certificate kubeadm issues from the shipped kubeadm config (kubeadm's
/// own SANs, not 127.0.0.1, plus its `certSANs`), so this fails unless the
/// shipped config covers the listener's address; the real kubectl then
/// verifies the apiserver through every node's listener, leader or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_kubectl_through_every_nodes_local_listener_with_kubeadms_certificate() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let cert_sans = bulwark_testkit::tools::kubeadm_cert_sans().unwrap();
    let mut apis = Vec::new();
    for i in 1..=2u8 {
        // Not on 127.0.0.1: kubeadm puts the advertise address in the
        // certificate, and it must not be the listener's address.
        let listen = std::net::SocketAddr::from(([127, 0, 0, 20 + i], 0));
        apis.push(
            ApiServerProcess::builder(format!("cp-{i}"))
                .listen(listen)
                .kubeadm_sans(&cert_sans)
                .start(&pki)
                .await
                .unwrap(),
        );
    }
    let c = LbCluster::start_with_pki(
        pki.clone(),
        Options {
            nodes: 3,
            backends: apis
                .iter()
                .map(|a| (a.name().to_owned(), a.addr()))
                .collect(),
            snapshot_every: None,
            local_listeners: true,
            ..Default::default()
        },
    )
    .await;
    for n in &c.nodes {
        c.wait_for_backends(n.id, 2).await;
        let local = n.local.unwrap();
        let out = kubectl_readyz(&pki, &format!("https://{local}")).await;
        assert!(
            out.status.success(),
            "kubectl through lb-{}'s node-local listener {local}: {}",
            n.id,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_kubectl_through_the_vip_sees_the_apiserver_certificate() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let vip = new_vip();
    let apis = apiservers(&pki, vip, 2).await;
    let c = cluster_with(&apis, pki.clone(), vip).await;
    let holder = c.wait_for_holder(None, Duration::from_secs(10)).await;
    c.wait_for_backends(holder, 2).await;

    let out = kubectl_readyz(&pki, &format!("https://{vip}")).await;
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    // Passthrough: the certificate the client sees is an apiserver's own.
    let tcp = tokio::net::TcpStream::connect(vip).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(pki.ca_path()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::from(vip.ip());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let seen = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let theirs: Vec<_> = apis
        .iter()
        .map(|a| rustls_pki_types::CertificateDer::from_pem_file(&a.cert().cert).unwrap())
        .collect();
    assert!(
        theirs.contains(&seen),
        "the client saw a certificate no apiserver has"
    );
}

use rustls_pki_types::pem::PemObject as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_a_killed_backend_costs_no_client_connect_and_drain_spares_old_connections() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let vip = new_vip();
    let mut apis = apiservers(&pki, vip, 3).await;
    let c = cluster_with(&apis, pki.clone(), vip).await;
    let holder = c.wait_for_holder(None, Duration::from_secs(10)).await;
    c.wait_for_backends(holder, 3).await;
    let https = HttpsClient::new(pki.ca_pem())
        .unwrap()
        .timeout(Duration::from_secs(5));

    // SIGKILL one apiserver while new connections keep coming: the proxy's
    // connect retry moves each to a live one before the client sees a thing.
    let mut failures = Vec::new();
    let mut served_by = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..120 {
        if i == 20 {
            apis[0].kill().unwrap();
        }
        match https.get(vip, "/readyz").await {
            Ok(r) if r.status == 200 => {
                *served_by
                    .entry(r.backend().unwrap_or("?").to_owned())
                    .or_default() += 1;
            }
            Ok(r) => failures.push(format!("HTTP {}", r.status)),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    assert!(failures.is_empty(), "failed client requests: {failures:?}");
    eprintln!("served by: {served_by:?}");

    // Drain: a connection already on the drained backend keeps working,
    // new ones never reach it.
    let mut old = https.connect(vip).await.unwrap();
    let first = old.get("/readyz").await.unwrap();
    let drained = first.backend().unwrap().to_owned();
    c.client(holder)
        .drain_backend(lb::DrainBackendRequest {
            id: drained.clone(),
            max_drain_duration: None,
        })
        .await
        .unwrap();
    // Every node applies the drain; the holder's data path has it once the
    // call returns (it answers after applying).
    for _ in 0..40 {
        let r = https.get(vip, "/readyz").await.unwrap();
        assert_ne!(
            r.backend(),
            Some(drained.as_str()),
            "a new connection reached the drained backend"
        );
    }
    let again = old.get("/readyz").await.unwrap();
    assert_eq!(
        again.backend(),
        Some(drained.as_str()),
        "the old connection still works"
    );
}
