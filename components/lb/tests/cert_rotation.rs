//! Certificate rotation without a restart: a three-node bulwark-lb cluster
//! and a prober (in this process, each with its own certificate and a
//! follower on its files) under RPC load (reads on long-lived channels,
//! reads on a new connection each, writes through Raft to the leader, an
//! open watch stream, the prober's report stream) and client connections
//! through every node's node-local listener has every certificate
//! replaced, the nodes', the prober's and the operator's, with new keys.
//! No RPC and no proxied connection fails, new handshakes present the new
//! certificates, the open stream keeps delivering; then a corrupt
//! replacement is refused (log line and metric) and the node keeps
//! serving the certificate it had. And the real binary answers SIGHUP.
//!
//! The load starts once every node lists the configured backend. (Before,
//! in 4 of 14 runs on a loaded machine the first two connections through
//! every node were reset: the load began right after the election, before
//! the leader's seeding of the configured backends was committed, and a
//! node without any backend reset its clients at once. They now wait up to
//! a connect timeout for one: proxy_routing.rs,
//! `a_client_that_arrives_before_any_backend_waits_for_the_first_one`.)

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::backend_watch_client::BackendWatchClient;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use bulwark_common::grpc::channel;
use bulwark_common::shutdown::Shutdown;
use bulwark_common::tls::TlsMaterial;
use bulwark_common::tls::reload::{RELOADS, Reload};
use bulwark_prober::config::TcpTarget;
use bulwark_testkit::{CertFiles, Pki, TestDir, config};
use rustls_pki_types::pem::PemObject;

struct Cluster {
    pki: Pki,
    apis: Vec<SocketAddr>,
    /// Each node's node-local proxy listener, in front of `backend`.
    locals: Vec<SocketAddr>,
    /// The one backend: an echo server.
    backend: SocketAddr,
    certs: Vec<CertFiles>,
    shutdowns: Vec<Shutdown>,
    _nodes: Vec<bulwark_lb::Node>,
    _echo: tokio::task::JoinHandle<()>,
    _dir: TestDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdowns.iter().for_each(Shutdown::trigger);
    }
}

fn node_cert(pki: &Pki, i: usize) -> CertFiles {
    pki.peer(&format!("lb-{i}"), &["bulwark:lb"], &["127.0.0.1"])
        .unwrap()
}

async fn cluster() -> Cluster {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let dir = TestDir::new("lb-cert-rotation").unwrap();
    let (backend, echo) = bulwark_testkit::cluster::echo_backend().await;
    let mut listeners = Vec::new();
    let mut locals = Vec::new();
    for _ in 0..3 {
        let raft = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        locals.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        listeners.push((raft, api));
    }
    let local_addrs: Vec<SocketAddr> = locals.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut locals = locals.into_iter();
    let addrs: Vec<(SocketAddr, SocketAddr)> = listeners
        .iter()
        .map(|(r, a)| (r.local_addr().unwrap(), a.local_addr().unwrap()))
        .collect();
    let members: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(i, (r, a))| {
            let id = i as u64 + 1;
            config::lb_member(id, &format!("lb-{id}"), "", *r, *a)
        })
        .collect();
    let (mut nodes, mut shutdowns, mut certs) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (raft, api)) in listeners.into_iter().enumerate() {
        let cert = node_cert(&pki, i + 1);
        let id = i as u64 + 1;
        let mut c = config::lb_node(&members, id, &cert, &dir.join(format!("data-{id}"))).unwrap();
        // The daemon's default operators, as the config this test had
        // left them.
        c.access.operators = config::lb(id).access.operators;
        c.access.probers = Some(config::orgs(&["bulwark:probers"]));
        // Client connections through the node-local listener: the data
        // path is TCP, so a rotation must not cost one of them either.
        c.local_listener = Some(local_addrs[i]);
        c.backends = vec![config::lb_backend("api-1", backend, "")];
        let config = config::validated(&c).unwrap();
        let shutdown = Shutdown::new();
        let listeners = bulwark_lb::Listeners {
            raft,
            api,
            admin: None,
            local: locals.next(),
            front: Vec::new(),
        };
        nodes.push(bulwark_lb::run(config, listeners, &shutdown).await.unwrap());
        shutdowns.push(shutdown);
        certs.push(cert);
    }
    Cluster {
        pki,
        apis: addrs.iter().map(|(_, a)| *a).collect(),
        locals: local_addrs,
        backend,
        certs,
        shutdowns,
        _nodes: nodes,
        _echo: echo,
        _dir: dir,
    }
}

async fn leader(api: SocketAddr, tls: &TlsMaterial) -> SocketAddr {
    let mut client = LoadBalancerClient::new(channel(&api.to_string(), tls, None).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get_status(lb::GetStatusRequest::default()).await
            && let Some(l) = r.into_inner().leader
            && let Ok(a) = l.api_address.parse()
        {
            return a;
        }
        assert!(Instant::now() < deadline, "no leader within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `bulwark_certificate_reloads_total{file, result}` in this process.
fn reloads(file: &std::path::Path, result: &str) -> u64 {
    let text = bulwark_common::telemetry::metrics_handle().render();
    let (file, result) = (
        format!("file=\"{}\"", file.display()),
        format!("result=\"{result}\""),
    );
    text.lines()
        .find(|l| l.starts_with(RELOADS) && l.contains(&file) && l.contains(&result))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node lists the configured backend: the leader's
/// seeding of it is committed and applied everywhere.
async fn seeded(c: &Cluster, tls: &TlsMaterial) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for api in &c.apis {
        let mut client = LoadBalancerClient::new(channel(&api.to_string(), tls, None).unwrap());
        loop {
            let list = client
                .list_backends(lb::ListBackendsRequest::default())
                .await
                .unwrap()
                .into_inner();
            if list.backends.iter().any(|b| b.id == "api-1") {
                break;
            }
            assert!(Instant::now() < deadline, "{api}: not seeded within 15 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
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

/// A prober in this process reporting to every node, probing a TCP port.
async fn start_prober(c: &Cluster, shutdown: &Shutdown) -> CertFiles {
    let cert = c.pki.client("prober-1", &["bulwark:probers"]).unwrap();
    let mut p = config::prober();
    p.node_name = "p-1".into();
    p.tcp = vec![TcpTarget {
        id: "t1".into(),
        address: c.apis[0].to_string(),
        zone: String::new(),
    }];
    p.report.endpoints = c.apis.iter().map(ToString::to_string).collect();
    p.report.tls = config::tls(&cert);
    let config = config::validated(&p).unwrap();
    let listeners = bulwark_prober::Listeners { admin: None };
    bulwark_prober::run(config, listeners, shutdown)
        .await
        .unwrap();
    cert
}

/// One client connection through a node-local listener: 64 bytes out,
/// the same 64 back within 2 s.
async fn proxied_echo(local: SocketAddr, n: u64) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(local).await?;
        let sent = [(n % 251) as u8; 64];
        s.write_all(&sent).await?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back).await?;
        if back == sent {
            Ok(())
        } else {
            Err(std::io::Error::other("echoed bytes differ"))
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::other("no echo within 2 s"))?
}

/// The last report sequence the leader accepted from the prober, once it
/// is fresh.
async fn prober_sequence(lead: SocketAddr, tls: &TlsMaterial) -> u64 {
    let mut client = LoadBalancerClient::new(channel(&lead.to_string(), tls, None).unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let health = client
            .get_health(lb::GetHealthRequest::default())
            .await
            .unwrap()
            .into_inner();
        if let Some(p) = health.probers.iter().find(|p| p.node_name == "p-1")
            && !p.stale
            && p.last_sequence > 0
        {
            return p.last_sequence;
        }
        assert!(
            Instant::now() < deadline,
            "the prober does not report: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn der(pem: &str) -> Vec<u8> {
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Calls until `stop`: reads on one channel (one connection kept open),
/// reads on a new channel each time, or writes to the leader. Counts
/// successes and failures; a write redirected to a new leader follows the
/// hint, as bulwarkctl does, and counts only as its outcome there.
#[derive(Clone, Copy)]
enum Load {
    KeptReads,
    NewConnectionReads,
    /// Backends added through the leader (each pointing at `backend`, so
    /// proxied connections reach the echo server whichever they pick).
    Writes {
        backend: SocketAddr,
    },
    /// A new client connection through the node-local listener at `api`,
    /// echoing 64 bytes.
    Proxied,
}

async fn load(
    kind: Load,
    api: SocketAddr,
    tls: TlsMaterial,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let mut kept = LoadBalancerClient::new(channel(&api.to_string(), &tls, None).unwrap());
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let result = match kind {
            Load::KeptReads => kept
                .get_status(lb::GetStatusRequest::default())
                .await
                .map(drop),
            Load::NewConnectionReads => {
                LoadBalancerClient::new(channel(&api.to_string(), &tls, None).unwrap())
                    .list_backends(lb::ListBackendsRequest::default())
                    .await
                    .map(drop)
            }
            Load::Writes { backend } => {
                let target = leader(api, &tls).await;
                LoadBalancerClient::new(channel(&target.to_string(), &tls, None).unwrap())
                    .add_backend(lb::AddBackendRequest {
                        id: format!("b-{}-{n}", api.port()),
                        address: backend.to_string(),
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            }
            Load::Proxied => proxied_echo(api, n)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("proxied connection: {e}"))),
        };
        match result {
            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("failed RPC ({api}): {e}");
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_certificate_rotates_under_load_and_a_corrupt_one_is_refused() {
    let c = cluster().await;
    let operator_files = c.pki.admin().unwrap();
    let operator = operator_files.tls_files().load().unwrap();
    let lead = leader(c.apis[0], &operator).await;
    let prober_stop = Shutdown::new();
    let prober = start_prober(&c, &prober_stop).await;
    let reported = prober_sequence(lead, &operator).await;
    seeded(&c, &operator).await;

    // An open watch stream on a follower-or-leader, read to its first set.
    let mut watch =
        BackendWatchClient::new(channel(&c.apis[1].to_string(), &operator, None).unwrap())
            .watch(lb::WatchBackendsRequest::default())
            .await
            .unwrap()
            .into_inner();
    watch.message().await.unwrap().unwrap();

    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let (proxied_ok, proxied_failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for api in &c.apis {
        for kind in [Load::KeptReads, Load::NewConnectionReads] {
            tasks.push(tokio::spawn(load(
                kind,
                *api,
                operator.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
            )));
        }
    }
    for local in &c.locals {
        tasks.push(tokio::spawn(load(
            Load::Proxied,
            *local,
            operator.clone(),
            stop.clone(),
            proxied_ok.clone(),
            proxied_failed.clone(),
        )));
    }
    tasks.push(tokio::spawn(load(
        Load::Writes { backend: c.backend },
        lead,
        operator.clone(),
        stop.clone(),
        ok.clone(),
        failed.clone(),
    )));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Every node's certificate and key, and the operator's, replaced in
    // place (the same paths, new keys), as `bulwarkctl certs renew
    // --new-key` does.
    let new: Vec<CertFiles> = (1..=3).map(|i| node_cert(&c.pki, i)).collect();
    let new_operator = c.pki.admin().unwrap();
    let new_prober = c.pki.client("prober-1", &["bulwark:probers"]).unwrap();
    assert_ne!(new_prober.key_pem(), prober.key_pem());
    wait_for("the prober applies its new certificate", || {
        reloads(&new_prober.cert, "applied") >= 1
    })
    .await;
    assert_eq!(operator.reload(), Reload::Applied);
    for (old, new) in c.certs.iter().zip(&new) {
        assert_eq!(old.cert, new.cert);
        assert_ne!(old.key_pem(), new.key_pem());
        wait_for("the node applies its new certificate", || {
            reloads(&new.cert, "applied") >= 1
        })
        .await;
    }
    for (api, new) in c.apis.iter().zip(&new) {
        assert_eq!(served_cert(*api, &operator).await, der(new.cert_pem()));
    }
    assert_ne!(der(new_operator.cert_pem()), der(operator_files.cert_pem()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed, 0,
        "failed RPCs during the rotation ({ok} succeeded)"
    );
    assert!(ok > 50, "only {ok} RPCs ran");
    eprintln!("{ok} RPCs during the rotation, {failed} failed");
    let (p_ok, p_failed) = (
        proxied_ok.load(Ordering::Relaxed),
        proxied_failed.load(Ordering::Relaxed),
    );
    assert_eq!(
        p_failed, 0,
        "failed proxied connections during the rotation ({p_ok} succeeded)"
    );
    assert!(p_ok > 50, "only {p_ok} proxied connections ran");
    eprintln!("{p_ok} proxied connections during the rotation, {p_failed} failed");
    // The prober kept reporting through it.
    assert!(prober_sequence(lead, &operator).await > reported);

    // The stream opened before the rotation still delivers.
    let mut client = LoadBalancerClient::new(channel(&lead.to_string(), &operator, None).unwrap());
    client
        .add_backend(lb::AddBackendRequest {
            id: "after-rotation".into(),
            address: "127.0.0.1:9".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let set = watch.message().await.unwrap().unwrap();
            if set.backends.iter().any(|b| b.id == "after-rotation") {
                return;
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "the watch stream stopped delivering");

    // A corrupt replacement: refused, counted, and the node keeps serving
    // the certificate it had.
    let node1 = &new[0];
    std::fs::write(&node1.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    wait_for("the corrupt certificate is refused", || {
        reloads(&node1.cert, "refused") >= 1
    })
    .await;
    assert_eq!(
        served_cert(c.apis[0], &operator).await,
        der(node1.cert_pem())
    );
    LoadBalancerClient::new(channel(&c.apis[0].to_string(), &operator, None).unwrap())
        .get_status(lb::GetStatusRequest::default())
        .await
        .unwrap();
    assert_eq!(reloads(&node1.cert, "applied"), 1);
    prober_stop.trigger();
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
