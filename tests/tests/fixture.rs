//! The kube-apiserver test double: driven by a real kubectl, over HTTP/2,
//! its watch stream, its fault controls, its shutdown sequence, SIGKILL,
//! kube-apiserver's goaway chance.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use bulwark_testkit::fixture::{
    ApiServer, ApiServerConfig, ApiServerProcess, GIT_VERSION, HttpsClient, HttpsConnection,
    MAX_GOAWAY_CHANCE, Phase, server_tls_config, validate_goaway_chance,
};
use bulwark_testkit::{Pki, TestDir, tools};
use http::{StatusCode, Version};
use http_body_util::BodyExt as _;

/// Runs kubectl against `server` with an empty kubeconfig; returns stdout,
/// or stderr as the error. A token keeps kubectl from prompting for a
/// username (it does when it has no credentials at all).
async fn kubectl(server: &ApiServerProcess, args: &[&str]) -> Result<String, String> {
    let dir = TestDir::new("kubeconfig").expect("kubectl runs");
    let kubeconfig = dir.join("config");
    std::fs::write(&kubeconfig, "").expect("kubectl runs");
    let output = tokio::process::Command::new(tools::kubectl().expect("kubectl runs"))
        .env("KUBECONFIG", &kubeconfig)
        .arg(format!("--server={}", server.url()))
        .arg(format!(
            "--certificate-authority={}",
            server.ca_path().display()
        ))
        .arg("--token=bulwark-test")
        .arg("--request-timeout=10s")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("kubectl runs");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn client(server: &ApiServerProcess) -> HttpsClient {
    HttpsClient::from_ca_file(server.ca_path()).expect("kubectl runs")
}

#[tokio::test]
async fn kubectl_reads_readyz_and_version() {
    let pki = Pki::new().unwrap();
    let server = ApiServerProcess::start("api-1", &pki).await.unwrap();

    assert_eq!(
        kubectl(&server, &["get", "--raw", "/readyz"])
            .await
            .unwrap(),
        "ok"
    );
    let verbose = kubectl(&server, &["get", "--raw", "/readyz?verbose"])
        .await
        .unwrap();
    assert!(verbose.contains("[+]shutdown ok"), "{verbose}");
    assert!(verbose.ends_with("readyz check passed\n"), "{verbose}");

    let version = kubectl(&server, &["version", "-o", "json"]).await.unwrap();
    let version: serde_json::Value = serde_json::from_str(&version).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], GIT_VERSION);
    assert_eq!(version["serverVersion"]["major"], "1");

    let api = kubectl(&server, &["get", "--raw", "/api"]).await.unwrap();
    assert!(api.contains("\"APIVersions\""), "{api}");
}

#[tokio::test]
async fn http2_by_alpn_and_http1_when_asked() {
    let pki = Pki::new().unwrap();
    let server = ApiServerProcess::start("api-h2", &pki).await.unwrap();

    let mut h2 = client(&server).connect(server.addr()).await.unwrap();
    assert_eq!(h2.alpn(), Some(&b"h2"[..]));
    let response = h2.get("/livez").await.unwrap();
    assert_eq!(response.version, Version::HTTP_2);
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.backend(), Some("api-h2"));
    // Several requests on one HTTP/2 connection.
    for _ in 0..3 {
        assert_eq!(h2.get("/version").await.unwrap().status, StatusCode::OK);
    }

    let mut h1 = client(&server)
        .http1_only()
        .connect(server.addr())
        .await
        .unwrap();
    assert_eq!(h1.alpn(), Some(&b"http/1.1"[..]));
    let response = h1.get("/readyz").await.unwrap();
    assert_eq!(response.version, Version::HTTP_11);
    assert_eq!(response.text(), "ok");
    assert_eq!(response.backend(), Some("api-h2"));

    // Benchmark bodies: 64 KiB, 87 KB, and one larger than the fill buffer.
    for n in [65536usize, 89_000, 3_000_000] {
        let response = h2.get(&format!("/bytes/{n}")).await.unwrap();
        assert_eq!(response.body.len(), n);
    }
    assert_eq!(
        h1.get("/bytes/nope").await.unwrap().status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h1.get("/no/such/path").await.unwrap().status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn watch_stream_delivers_events_until_the_client_goes() {
    let pki = Pki::new().unwrap();
    let server = ApiServerProcess::builder("api-watch")
        .watch_interval(Duration::from_millis(50))
        .start(&pki)
        .await
        .unwrap();
    let mut conn = client(&server).connect(server.addr()).await.unwrap();
    let response = conn
        .get_streaming("/api/v1/namespaces/default/configmaps?watch=true")
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    while text.lines().count() < 4 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[1]["type"], "MODIFIED");
    assert_eq!(events[0]["object"]["kind"], "ConfigMap");
    assert_eq!(events[0]["object"]["data"]["backend"], "api-watch");
    assert_eq!(server.stats().await.unwrap().open_streams, 1);

    drop(body);
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.stats().await.unwrap().open_streams != 0 {
        assert!(Instant::now() < deadline, "the stream outlived its client");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn controls_switch_faults_on_and_off() {
    let pki = Pki::new().unwrap();
    let server = ApiServerProcess::start("api-faults", &pki).await.unwrap();
    let https = client(&server).timeout(Duration::from_secs(5));
    let get = |path: &'static str| {
        let https = https.clone();
        let addr = server.addr();
        async move { https.get(addr, path).await }
    };

    server.set_ready(false).await.unwrap();
    let readyz = get("/readyz").await.unwrap();
    assert_eq!(readyz.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        readyz
            .text()
            .contains("[-]etcd-readiness failed: reason withheld"),
        "{}",
        readyz.text()
    );
    assert!(readyz.text().contains("readyz check failed"));
    assert_eq!(get("/livez").await.unwrap().status, StatusCode::OK);
    assert!(!server.stats().await.unwrap().ready);
    server.set_ready(true).await.unwrap();
    assert_eq!(get("/readyz").await.unwrap().status, StatusCode::OK);

    server.slow(Duration::from_millis(300)).await.unwrap();
    let started = Instant::now();
    assert_eq!(get("/version").await.unwrap().status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    server.slow(Duration::ZERO).await.unwrap();

    server.error(503).await.unwrap();
    let version = get("/version").await.unwrap();
    assert_eq!(version.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(version.text().contains("\"kind\":\"Status\""));
    assert_eq!(
        get("/readyz").await.unwrap().status,
        StatusCode::OK,
        "health is not affected"
    );

    server.hang().await.unwrap();
    let short = HttpsClient::from_ca_file(server.ca_path())
        .unwrap()
        .timeout(Duration::from_millis(500));
    let mut conn = short.connect(server.addr()).await.unwrap();
    let err = conn.get("/readyz").await.unwrap_err();
    assert!(
        format!("{err:#}").contains("no complete response"),
        "{err:#}"
    );

    server.normal().await.unwrap();
    assert_eq!(get("/version").await.unwrap().status, StatusCode::OK);
    let stats = server.stats().await.unwrap();
    // The hung request is not counted: its client gave up and hyper dropped it.
    assert!(stats.requests >= 7, "{stats:?}");
    assert_eq!(stats.phase, Phase::Serving);
}

async fn refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::net::TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[tokio::test]
async fn shutdown_sequence_then_sigkill_and_restart() {
    let pki = Pki::new().unwrap();
    let delay = Duration::from_millis(2000);
    let mut server = ApiServerProcess::builder("api-shutdown")
        .shutdown_delay(delay)
        .shutdown_grace(Duration::from_millis(800))
        .watch_interval(Duration::from_millis(100))
        .start(&pki)
        .await
        .unwrap();
    let https = client(&server);
    let addr = server.addr();
    // A watch opened before the shutdown keeps streaming through the delay.
    let mut watch_conn = https.connect(addr).await.unwrap();
    let mut watch = watch_conn
        .get_streaming("/api/v1/namespaces/default/configmaps?watch=1")
        .await
        .unwrap()
        .into_body();

    let sent = Instant::now();
    server.terminate().await.unwrap();
    let readyz = https.get(addr, "/readyz").await.unwrap();
    assert_eq!(readyz.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        readyz
            .text()
            .contains("[-]shutdown failed: reason withheld"),
        "{}",
        readyz.text()
    );
    assert_eq!(
        https.get(addr, "/livez").await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        https.get(addr, "/version").await.unwrap().status,
        StatusCode::OK
    );
    assert!(
        sent.elapsed() < delay,
        "the checks above ran after the delay; the machine is too slow"
    );
    assert_eq!(server.stats().await.unwrap().phase, Phase::ShutdownDelay);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), watch.frame())
            .await
            .is_ok()
    );

    // After the delay the listener closes: connects are refused.
    let deadline = Instant::now() + delay + Duration::from_secs(3);
    while !refused(addr).await {
        assert!(
            Instant::now() < deadline,
            "still accepting after the shutdown delay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sent.elapsed() >= delay,
        "the listener closed before the delay ended"
    );
    // The grace period ends the watch, then the process exits cleanly.
    let status = server
        .process_mut()
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), watch.frame()).await {}
    assert!(server.process().log().contains("listener closed"));

    // Back on the same address, then killed hard.
    server.restart().await.unwrap();
    assert_eq!(server.addr(), addr);
    assert_eq!(https.get(addr, "/readyz").await.unwrap().text(), "ok");
    let pid = server.process().pid().unwrap();
    server.kill().unwrap();
    assert!(refused(addr).await, "connect after SIGKILL");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test]
async fn shutdown_through_the_control_socket() {
    let pki = Pki::new().unwrap();
    let mut server = ApiServerProcess::builder("api-ctl-shutdown")
        .shutdown_delay(Duration::from_millis(300))
        .start(&pki)
        .await
        .unwrap();
    server.shutdown().await.unwrap();
    let status = server
        .process_mut()
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn in_process_server() {
    let pki = Pki::new().unwrap();
    let cert = pki.server("inproc", &["127.0.0.1"]).unwrap();
    let config = ApiServerConfig::new(
        "inproc",
        server_tls_config(cert.cert_pem(), cert.key_pem()).unwrap(),
    )
    .shutdown_delay(Duration::from_millis(200))
    .shutdown_grace(Duration::from_millis(200));
    let server = ApiServer::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config)
        .await
        .unwrap();
    let https = HttpsClient::new(pki.ca_pem()).unwrap();
    let response = https
        .get(server.local_addr(), "/healthz?verbose")
        .await
        .unwrap();
    assert!(response.text().ends_with("healthz check passed\n"));
    assert_eq!(response.backend(), Some("inproc"));

    let controls = server.controls().clone();
    controls.set_error(Some(429));
    assert_eq!(
        https.get(server.local_addr(), "/api").await.unwrap().status,
        StatusCode::TOO_MANY_REQUESTS
    );
    controls.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), server.stopped())
        .await
        .unwrap();
    assert_eq!(controls.stats().phase, Phase::Stopped);
}

/// An in-process fixture on loopback with this goaway chance.
async fn goaway_server(pki: &Pki, chance: f64) -> ApiServer {
    let cert = pki
        .server("goaway", &["127.0.0.1"])
        .expect("a server certificate");
    let config = ApiServerConfig::new(
        "goaway",
        server_tls_config(cert.cert_pem(), cert.key_pem()).expect("a TLS config"),
    )
    .watch_interval(Duration::from_millis(50))
    .goaway_chance(chance)
    .expect("a valid goaway chance");
    ApiServer::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config)
        .await
        .expect("the fixture binds loopback")
}

/// Sends `n` GETs one after the other, opening a new connection whenever
/// the current one takes no more requests (a GOAWAY), as client-go does;
/// returns how many connections that took.
async fn connections_for_requests(https: &HttpsClient, addr: SocketAddr, n: usize) -> usize {
    let mut conn = https
        .connect(addr)
        .await
        .expect("connecting to the fixture");
    let mut opened = 1;
    let mut answered = 0;
    while answered < n {
        if conn.is_closed() {
            conn = https
                .connect(addr)
                .await
                .expect("connecting to the fixture");
            opened += 1;
        }
        match conn.get("/version").await {
            Ok(response) => {
                assert_eq!(response.status, StatusCode::OK);
                answered += 1;
            }
            // The GOAWAY crossed this request on the wire; client-go sends
            // it again on a new connection, and so does the next round.
            Err(err) => {
                let deadline = Instant::now() + Duration::from_secs(1);
                while !conn.is_closed() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                assert!(
                    conn.is_closed(),
                    "a request failed on a connection that stays open: {err:#}"
                );
            }
        }
    }
    opened
}

#[tokio::test]
async fn goaway_chance_makes_http2_clients_reconnect_at_that_rate() {
    let pki = Pki::new().unwrap();
    let server = goaway_server(&pki, 0.02).await;
    let https = HttpsClient::new(pki.ca_pem()).unwrap().http2_only();
    let n = 2000;
    let opened = connections_for_requests(&https, server.local_addr(), n).await;
    // 2,000 draws at 2 %: 40 GOAWAYs expected, standard deviation 6.3;
    // the bounds are 4 deviations below and more than 5 above.
    let reconnects = opened - 1;
    assert!(
        (15..=75).contains(&reconnects),
        "{reconnects} reconnections in {n} requests at goaway-chance 0.02"
    );
    let stats = server.controls().stats();
    // The last connection may have drawn a GOAWAY on the last request.
    assert!(
        stats.goaways == reconnects as u64 || stats.goaways == opened as u64,
        "{} GOAWAYs for {opened} connections",
        stats.goaways
    );
    assert_eq!(stats.connections, opened as u64);
}

#[tokio::test]
async fn no_goaway_at_chance_zero_nor_on_http1() {
    let pki = Pki::new().unwrap();
    let off = goaway_server(&pki, 0.0).await;
    let h2 = HttpsClient::new(pki.ca_pem()).unwrap().http2_only();
    assert_eq!(
        connections_for_requests(&h2, off.local_addr(), 1000).await,
        1
    );
    assert_eq!(off.controls().stats().goaways, 0);

    // kube-apiserver draws only for HTTP/2 requests: an HTTP/1.1 client at
    // the highest chance keeps its connection (500 draws at 2 % would
    // almost surely hit).
    let on = goaway_server(&pki, 0.02).await;
    let h1 = HttpsClient::new(pki.ca_pem()).unwrap().http1_only();
    assert_eq!(connections_for_requests(&h1, on.local_addr(), 500).await, 1);
    assert_eq!(on.controls().stats().goaways, 0);
}

#[tokio::test]
async fn a_goaway_leaves_the_watch_on_that_connection_running() {
    let pki = Pki::new().unwrap();
    let server = goaway_server(&pki, 0.02).await;
    let https = HttpsClient::new(pki.ca_pem()).unwrap().http2_only();
    let mut conn = https.connect(server.local_addr()).await.unwrap();
    let watch = conn
        .get_streaming("/api/v1/namespaces/default/configmaps?watch=true")
        .await
        .unwrap();
    assert_eq!(watch.status(), StatusCode::OK);
    let mut body = watch.into_body();
    // Short requests on the same connection until one draws the GOAWAY
    // (the watch's own request may have drawn it already).
    let mut sent = 0;
    while !conn.is_closed() {
        assert!(sent < 5000, "no GOAWAY in {sent} requests at 2 %");
        match conn.get("/version").await {
            Ok(_) => sent += 1,
            // Sent while the GOAWAY was being processed: never sent on.
            Err(e) => assert!(
                conn.is_closed() && HttpsConnection::not_sent(&e),
                "a request failed on an open connection, or was sent: {e:#}"
            ),
        }
    }
    assert_eq!(server.controls().stats().goaways, 1);
    // The watch goes on after the GOAWAY: more events arrive, and the
    // connection stays open for it.
    let mut events = 0;
    while events < 5 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("watch events after the GOAWAY")
            .expect("the watch stream is still open")
            .unwrap();
        if frame.is_data() {
            events += 1;
        }
    }
    let stats = server.controls().stats();
    assert_eq!((stats.active_connections, stats.open_streams), (1, 1));
    // Once the watch ends, the connection closes.
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.controls().stats().active_connections > 0 {
        assert!(
            Instant::now() < deadline,
            "the GOAWAY'd connection outlived its last stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn goaway_chance_is_checked_like_kube_apiservers() {
    for bad in [-0.1, 0.021, 1.0, f64::NAN] {
        let err = validate_goaway_chance(bad).unwrap_err().to_string();
        assert!(err.contains("goaway-chance"), "{err}");
    }
    assert_eq!(validate_goaway_chance(0.0).unwrap(), 0.0);
    assert_eq!(
        validate_goaway_chance(MAX_GOAWAY_CHANCE).unwrap(),
        MAX_GOAWAY_CHANCE
    );
    // The binary refuses it before reading anything else.
    let output = std::process::Command::new(tools::bin_path("bulwark-fixture-apiserver").unwrap())
        .args(["--cert", "/nonexistent", "--key", "/nonexistent"])
        .arg("--goaway-chance=0.5")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--goaway-chance") && stderr.contains("0.02"),
        "{stderr}"
    );
}
