//! The real `bulwarkctl` binary where it meets the operator's shell and
//! certificates: a closed pipe, a missing context file, and the TLS
//! failures (a client certificate from another CA, a CA bundle that did not
//! issue the server's certificate, a key of another certificate), each with
//! the documented exit code and a message naming the cause. The server is
//! bulwark's own mTLS gRPC server, in process.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::process::{Output, Stdio};

use bulwark_common::authz::AccessPolicy;
use bulwark_common::grpc::GrpcServer;
use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::tools::bin_path;
use bulwark_testkit::{CertFiles, Pki};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `bulwarkctl` with HOME in a fresh directory (no context file there).
fn ctl() -> (tokio::process::Command, tempfile::TempDir) {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(bin_path("bulwarkctl").unwrap());
    cmd.env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("BULWARKCTL_CONFIG")
        .env_remove("BULWARKCTL_CONTEXT");
    (cmd, home)
}

async fn lb_status(addr: &str, ca: &std::path::Path, cert: &CertFiles) -> Output {
    let (mut cmd, _home) = ctl();
    cmd.args(["--lb-endpoint", addr, "--timeout", "5s", "--ca"])
        .arg(ca)
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .args(["lb", "status"])
        .output()
        .await
        .unwrap()
}

/// An mTLS gRPC server trusting `pki`'s CA (health and reflection only).
async fn server(pki: &Pki, shutdown: &Shutdown) -> String {
    let tls = pki.server("lb", &["127.0.0.1"]).unwrap().tls_files();
    let material = tls.load().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let token = shutdown.token();
    tokio::spawn(async move {
        GrpcServer::new()
            .serve(listener, &material, AccessPolicy::default(), token)
            .await
    });
    addr
}

#[tokio::test]
async fn tls_failures_exit_with_the_documented_code_and_name_the_cause() {
    bulwark_common::tls::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let shutdown = Shutdown::new();
    let addr = server(&pki, &shutdown).await;
    let good = pki.client("alice", &[]).unwrap();

    // The control: the handshake passes and the call reaches the server
    // (which serves no LoadBalancer here, so it is not a TLS error).
    let out = lb_status(&addr, &good.ca, &good).await;
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Unimplemented") || stderr.contains("unimplemented"),
        "{stderr}"
    );

    // A client certificate from another CA: the server refuses it. Exit 4
    // (SECURITY.md), saying so, with no /readyz hint.
    let other = Pki::new().unwrap();
    let stranger = other.client("mallory", &["system:masters"]).unwrap();
    let out = lb_status(&addr, &good.ca, &stranger).await;
    let stderr = text(&out.stderr);
    eprintln!("another CA's client certificate:\n{stderr}");
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("refused this client certificate"),
        "{stderr}"
    );
    assert!(!stderr.contains("readyz"), "{stderr}");

    // --ca that did not issue the server's certificate: we refuse the
    // server. Exit 4, naming the CA bundle, with no /readyz hint.
    let out = lb_status(&addr, other.ca_path(), &good).await;
    let stderr = text(&out.stderr);
    eprintln!("a CA bundle that did not issue the server's certificate:\n{stderr}");
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("server certificate"), "{stderr}");
    assert!(
        stderr.contains(&other.ca_path().display().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("readyz"), "{stderr}");

    // A key of another certificate: a usage error before any connection,
    // naming both files, not "bad endpoint".
    let mut mismatched = good.clone();
    mismatched.key = stranger.key.clone();
    let out = lb_status(&addr, &good.ca, &mismatched).await;
    let stderr = text(&out.stderr);
    eprintln!("a key of another certificate:\n{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("do not match"), "{stderr}");
    assert!(
        stderr.contains(&good.cert.display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains(&stranger.key.display().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("bad endpoint"), "{stderr}");

    shutdown.trigger();
}

/// `bulwarkctl completion bash | head -1`: the reader is gone before the
/// script is written. No panic, no message, success.
#[test]
fn a_closed_pipe_ends_quietly() {
    let home = tempfile::tempdir().unwrap();
    for args in [
        &["completion", "bash"][..],
        &["config", "get-contexts", "-o", "json"][..],
    ] {
        let mut child = std::process::Command::new(bin_path("bulwarkctl").unwrap())
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{args:?}: {status}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
    }
}

/// No context file and no flags: the message says the file is missing and
/// where it was looked for, and the hint how to create one or which flags
/// replace it.
#[tokio::test]
async fn a_missing_context_file_is_named() {
    let (mut cmd, home) = ctl();
    let out = cmd.args(["lb", "status"]).output().await.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let expected = home.path().join(".config/bulwark/bulwarkctl.yaml");
    assert!(
        stderr.contains(&format!(
            "no context file: {} does not exist",
            expected.display()
        )),
        "{stderr}"
    );
    for flag in ["--config", "--ca", "--cert", "--key", "--lb-endpoint"] {
        assert!(stderr.contains(flag), "{flag} not in {stderr}");
    }
}
