//! Certificate reload in the real `bulwark-lb` binary: SIGHUP makes it
//! look at its files at once, a renewed certificate is served from then
//! on, and a corrupt replacement is refused with its log line while the
//! renewed one keeps serving.
//!
//! Rotation under load (every certificate of three LB nodes, probers and
//! backup instances, and a CA rotation, with no failed RPC or proxied
//! connection) is tests/tests/cert_rotation.rs, on real processes.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bulwark_common::tls::TlsMaterial;
use bulwark_testkit::{CertFiles, Pki, TestDir, config};
use rustls_pki_types::pem::PemObject;

fn node_cert(pki: &Pki, i: usize) -> CertFiles {
    pki.peer(&format!("lb-{i}"), &["bulwark:lb"], &["127.0.0.1"])
        .unwrap()
}

/// The certificate a fresh handshake with `api` presents.
async fn served_cert(api: SocketAddr, tls: &TlsMaterial) -> Vec<u8> {
    let config = tls.client_h2().unwrap();
    let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The real `bulwark-lb` binary: SIGHUP makes it look at its files at
/// once, a renewed certificate is served from then on, and a corrupt
/// replacement is refused with its log line while the renewed one keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_a_real_lb_process_reloads_on_sighup_and_logs_a_refusal() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let dir = TestDir::new("lb-sighup").unwrap();
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let p = bulwark_testkit::ports::free_ports(loopback, 3).unwrap();
    let (raft, api, admin) = (
        SocketAddr::new(loopback, p[0]),
        SocketAddr::new(loopback, p[1]),
        SocketAddr::new(loopback, p[2]),
    );
    let cert = node_cert(&pki, 1);
    let me = config::lb_member(1, "lb-1", "", raft, api);
    let mut c = config::lb_node(std::slice::from_ref(&me), 1, &cert, &dir.join("data")).unwrap();
    c.access.operators = config::lb(1).access.operators;
    c.admin.address = admin;
    let config = config::write(dir.join("lb.yaml"), &c).unwrap();
    let process = bulwark_testkit::ProcessBuilder::new(
        "lb-1",
        bulwark_testkit::tools::bin_path("bulwark-lb").unwrap(),
    )
    .arg("--config")
    .arg(&config)
    .spawn()
    .unwrap();
    process
        .wait_for_port(api, Duration::from_secs(20))
        .await
        .unwrap();
    let operator = operator_of(&pki);
    assert_eq!(served_cert(api, &operator).await, der(cert.cert_pem()));
    let wait = Duration::from_secs(5);

    process.signal(libc::SIGHUP).unwrap();
    process
        .wait_for_log("SIGHUP: certificate files unchanged", wait)
        .await
        .unwrap();

    let renewed = node_cert(&pki, 1);
    process.signal(libc::SIGHUP).unwrap();
    process
        .wait_for_log("certificate reloaded", wait)
        .await
        .unwrap();
    assert_eq!(served_cert(api, &operator).await, der(renewed.cert_pem()));

    std::fs::write(&renewed.key, "-----BEGIN PRIVATE KEY-----\ncorrupt\n").unwrap();
    process.signal(libc::SIGHUP).unwrap();
    let line = process
        .wait_for_log("certificate replacement refused", wait)
        .await
        .unwrap();
    assert!(line.contains("lb-1.key"), "{line}");
    assert_eq!(served_cert(api, &operator).await, der(renewed.cert_pem()));
    assert!(process.is_running());
}

/// The operator's material (`CN=admin`) from `pki`.
fn operator_of(pki: &Pki) -> TlsMaterial {
    pki.admin().unwrap().tls_files().load().unwrap()
}
