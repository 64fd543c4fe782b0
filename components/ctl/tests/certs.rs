//! `bulwarkctl certs issue` end to end, with the real binary: from a CA
//! made the way kubeadm makes one (openssl, a PKCS#1 RSA key) and an LB
//! config, it issues the node's certificate and an operator's; `certs
//! check` passes them; the LB starts with them (its own start-up checks
//! included) and the operator certificate is an operator there: `lb
//! add-backend` succeeds, where a certificate of the same CA without the
//! group is refused with exit 4. Then `certs renew` extends the node's
//! certificate in place and the running LB serves the renewed one.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::config;
use bulwark_testkit::tools::bin_path;
use rustls_pki_types::pem::PemObject;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn ctl(home: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(bin_path("bulwarkctl").unwrap())
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("BULWARKCTL_CONFIG")
        .env_remove("BULWARKCTL_CONTEXT")
        .args(args)
        .output()
        .await
        .unwrap()
}

fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (Debian's openssl package) runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// kubeadm's cluster CA as kubeadm writes it: RSA 2048, PKCS#1 key.
fn kubeadm_ca(dir: &Path) {
    let (key, cert) = (dir.join("ca.key"), dir.join("ca.crt"));
    openssl(&[
        "genrsa",
        "-traditional",
        "-out",
        key.to_str().unwrap(),
        "2048",
    ]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        "/CN=kubernetes",
        "-days",
        "3650",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment",
        "-out",
        cert.to_str().unwrap(),
    ]);
}

fn served_cert_matches(file: &Path, served: &[u8]) -> bool {
    let pem = std::fs::read(file).unwrap();
    rustls_pki_types::CertificateDer::from_pem_slice(&pem)
        .unwrap()
        .as_ref()
        == served
}

async fn served_cert(api: &str, operator: &bulwark_common::tls::TlsMaterial) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(operator.client_h2().unwrap())
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_certificates_pass_check_and_the_lb_starts_and_admits_the_operator() {
    bulwark_common::tls::install_crypto_provider();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    kubeadm_ca(d);
    let raft = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (raft_addr, api_addr) = (raft.local_addr().unwrap(), api.local_addr().unwrap());
    let etc = d.join("etc");
    std::fs::create_dir(&etc).unwrap();
    // The node's config names certificate files that do not exist yet:
    // `certs issue` writes them.
    let me = config::lb_member(1, "cp-1", "", raft_addr, api_addr);
    let mut c = config::lb(1);
    c.name = Some("cp-1".into());
    c.data_dir = d.join("data");
    c.raft.address = raft_addr;
    c.api.address = api_addr;
    c.tls = bulwark_common::tls::TlsFiles {
        cert_file: d.join("pki/bulwark-lb.crt"),
        key_file: d.join("pki/bulwark-lb.key"),
        ca_file: d.join("ca.crt"),
    };
    c.initial_members = vec![me];
    config::write(etc.join("lb.yaml"), &c).unwrap();
    let (ca_cert, ca_key) = (d.join("ca.crt"), d.join("ca.key"));
    let ca_args = [
        "--ca-cert",
        ca_cert.to_str().unwrap(),
        "--ca-key",
        ca_key.to_str().unwrap(),
    ];
    let etc_s = etc.to_str().unwrap();

    // The node's certificate, from its config; then the operator's.
    let mut args = vec!["certs", "issue", "--dir", etc_s];
    args.extend(ca_args);
    let out = ctl(home.path(), &args).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("CN=bulwark-lb-cp-1,O=bulwark:lb") && stdout.contains("issued"),
        "{stdout}"
    );
    let mut args = vec!["certs", "issue", "--operator", "alice", "--out-dir"];
    args.push(d.to_str().unwrap());
    args.extend(ca_args);
    let out = ctl(home.path(), &args).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Issuing again without --force writes nothing: exit 2.
    let mut args = vec!["certs", "issue", "--dir", etc_s];
    args.extend(ca_args);
    let out = ctl(home.path(), &args).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("pass --force"),
        "{}",
        text(&out.stderr)
    );

    let out = ctl(home.path(), &["certs", "check", "--dir", etc_s]).await;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // The LB starts with them (its start-up checks are the ones `check`
    // ran) and the operator is an operator.
    let config: bulwark_lb::config::LbConfig = bulwark_common::config::load(
        Some(&etc.join("lb.yaml")),
        &bulwark_common::config::Overrides::new(),
    )
    .unwrap();
    let shutdown = Shutdown::new();
    let listeners = bulwark_lb::Listeners {
        raft,
        api,
        admin: None,
        local: None,
        front: Vec::new(),
    };
    let _node = bulwark_lb::run(config, listeners, &shutdown).await.unwrap();
    let api_s = api_addr.to_string();
    let (alice_crt, alice_key) = (d.join("alice.crt"), d.join("alice.key"));
    let as_alice = |cmd: &'static [&'static str]| {
        let mut a: Vec<String> = [
            "--lb-endpoint",
            &api_s,
            "--ca",
            ca_cert.to_str().unwrap(),
            "--cert",
            alice_crt.to_str().unwrap(),
            "--key",
            alice_key.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(cmd.iter().map(|s| s.to_string()));
        a
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let add = &["lb", "add-backend", "cp-1", "--address", "127.0.0.1:6443"];
    loop {
        let args = as_alice(add);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ctl(home.path(), &args).await;
        if out.status.success() {
            break;
        }
        // 3: no leader yet, right after start.
        assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
        assert!(Instant::now() < deadline, "{}", text(&out.stderr));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A certificate of the same CA without the operator group (what any
    // kubelet or user certificate of the cluster CA looks like to
    // bulwark): read-only, so a change is refused with exit 4.
    let (bob_key, bob_csr, bob_crt, ext) = (
        d.join("bob.key"),
        d.join("bob.csr"),
        d.join("bob.crt"),
        d.join("bob.ext"),
    );
    std::fs::write(&ext, "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        bob_key.to_str().unwrap(),
        "-subj",
        "/O=system:nodes/CN=bob",
        "-out",
        bob_csr.to_str().unwrap(),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        bob_csr.to_str().unwrap(),
        "-CA",
        ca_cert.to_str().unwrap(),
        "-CAkey",
        ca_key.to_str().unwrap(),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        ext.to_str().unwrap(),
        "-out",
        bob_crt.to_str().unwrap(),
    ]);
    let out = ctl(
        home.path(),
        &[
            "--lb-endpoint",
            &api_s,
            "--ca",
            ca_cert.to_str().unwrap(),
            "--cert",
            bob_crt.to_str().unwrap(),
            "--key",
            bob_key.to_str().unwrap(),
            "lb",
            "add-backend",
            "cp-2",
            "--address",
            "127.0.0.1:6444",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));

    // `certs renew` in place; the running LB serves the renewed one.
    let operator = bulwark_common::tls::TlsFiles {
        cert_file: alice_crt.clone(),
        key_file: alice_key.clone(),
        ca_file: ca_cert.clone(),
    }
    .load()
    .unwrap();
    let node_crt = d.join("pki/bulwark-lb.crt");
    assert!(served_cert_matches(
        &node_crt,
        &served_cert(&api_s, &operator).await
    ));
    let before = std::fs::read(&node_crt).unwrap();
    let mut args = vec!["certs", "renew", "--dir", etc_s];
    args.extend(ca_args);
    let out = ctl(home.path(), &args).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("renewed"),
        "{}",
        text(&out.stdout)
    );
    assert_ne!(std::fs::read(&node_crt).unwrap(), before);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !served_cert_matches(&node_crt, &served_cert(&api_s, &operator).await) {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = ctl(home.path(), &["certs", "check", "--dir", etc_s]).await;
    assert!(out.status.success(), "{}", text(&out.stdout));
    shutdown.trigger();
}
