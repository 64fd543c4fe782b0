//! First-flight replay over real sockets: a backend that accepts and then
//! closes or resets before its first byte (a dying apiserver's listener)
//! costs the client nothing, because the proxy sends the client's first
//! bytes to another backend; once a backend has answered, or once the
//! first flight outgrew the buffer, a failure reaches the client as before.
//!
//! The fake backends speak like a TLS server: they wait for the client's
//! whole message (a 4-byte length, then the payload) before saying a thing.
//! Zone preference makes the misbehaving backend the first pick every time.

// Helpers outside #[test] functions fail the test on a broken socket too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulwark_lb::backends::{
    AVOID_AFTER_FAILURE, AdminState, BackendSpec, RoutingMode, RoutingPolicy, Verdict,
};
use bulwark_lb::proxy::ProxyConfig;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What a fake backend does with each connection.
#[derive(Clone, Copy, Debug)]
enum Fake {
    /// Resets at once, before reading anything. On loopback the reset may
    /// come before the proxy's connect call has returned: then it is a
    /// failed connect, retried elsewhere without a replay.
    ResetAtOnce,
    /// Resets 20 ms after accepting, without reading: always after the
    /// proxy's connect returned and the client's bytes were forwarded.
    ResetSoon,
    /// Reads the client's whole message, then closes without a byte.
    ReadThenClose,
    /// Reads the whole message, sends one byte `x`, then resets.
    ByteThenReset,
    /// Reads the whole message, answers `<id>\n` and the payload, then
    /// waits for the client's FIN.
    Answer,
}

struct FakeBackend {
    id: String,
    address: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FakeBackend {
    async fn start(id: &str, fake: Fake) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (a, name) = (accepted.clone(), id.to_owned());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve(s, fake, name.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Self {
            id: id.to_owned(),
            address,
            accepted,
            task,
        }
    }

    fn spec(&self, zone: &str) -> BackendSpec {
        BackendSpec {
            id: self.id.clone(),
            address: self.address,
            zone: zone.into(),
            weight: 1,
            admin: AdminState::Active,
            verdict: Verdict::Healthy,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_message(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload).await?;
    Ok(payload)
}

async fn serve(mut s: TcpStream, fake: Fake, name: String) {
    match fake {
        Fake::ResetAtOnce => {
            s.set_zero_linger().unwrap();
        }
        Fake::ResetSoon => {
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.set_zero_linger().unwrap();
        }
        Fake::ReadThenClose => {
            let _ = read_message(&mut s).await;
        }
        Fake::ByteThenReset => {
            if read_message(&mut s).await.is_ok() {
                let _ = s.write_all(b"x").await;
                // Long enough for the byte to reach the client first.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            s.set_zero_linger().unwrap();
        }
        Fake::Answer => {
            let Ok(payload) = read_message(&mut s).await else {
                return;
            };
            let mut answer = format!("{name}\n").into_bytes();
            answer.extend_from_slice(&payload);
            if s.write_all(&answer).await.is_ok() {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            }
        }
    }
}

/// A proxy whose first pick is always `first` (the only backend of the
/// local zone), with `others` as the fallback zone.
async fn proxy(config: ProxyConfig, first: &FakeBackend, others: &[&FakeBackend]) -> TestProxy {
    let mut specs = vec![first.spec("zone-a")];
    specs.extend(others.iter().map(|b| b.spec("zone-b")));
    TestProxy::start_mode(
        config,
        RoutingPolicy {
            local_zone: Some("zone-a".into()),
            ..RoutingPolicy::default()
        },
        RoutingMode::ZonePreferred,
        specs,
    )
    .await
}

fn message(payload: &[u8]) -> Vec<u8> {
    let mut m = (payload.len() as u32).to_be_bytes().to_vec();
    m.extend_from_slice(payload);
    m
}

/// Sends one message and reads until the proxy closes: what the client got
/// and how its read ended.
async fn exchange(p: &TestProxy, payload: &[u8]) -> (Vec<u8>, std::io::Result<()>) {
    let mut s = TcpStream::connect(p.address).await.unwrap();
    s.write_all(&message(payload)).await.unwrap();
    read_answer(&mut s, payload.len()).await
}

/// Reads until the answer to a `len`-byte payload is complete, the peer
/// closes, or the read fails.
async fn read_answer(s: &mut TcpStream, len: usize) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            got.extend_from_slice(&buf[..n]);
            if let Some(at) = got.iter().position(|&b| b == b'\n')
                && got.len() == at + 1 + len
            {
                return Ok(());
            }
        }
    })
    .await
    .expect("the proxy neither answered nor closed within 10 s");
    (got, result)
}

fn expected(id: &str, payload: &[u8]) -> Vec<u8> {
    let mut e = format!("{id}\n").into_bytes();
    e.extend_from_slice(payload);
    e
}

/// This listener's replay counter.
fn replays(p: &TestProxy) -> u64 {
    let metrics = bulwark_common::telemetry::metrics_handle().render();
    let series = format!(
        "bulwark_lb_first_flight_replays_total{{listener=\"{}\"}} ",
        p.address
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn config(splice: bool) -> ProxyConfig {
    ProxyConfig {
        splice,
        ..ProxyConfig::default()
    }
}

/// (a) The backend accepts and resets, at once or a moment later with the
/// client's bytes unread: the next backend answers the same bytes, and the
/// client never notices. The node then avoids the bad backend, so the
/// following connections go straight to the good one, until after
/// [`AVOID_AFTER_FAILURE`] one trial connection meets it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_first_byte_is_replayed_elsewhere() {
    for (fake, splice) in [
        (Fake::ResetAtOnce, false),
        (Fake::ResetSoon, false),
        (Fake::ResetSoon, true),
    ] {
        let bad = FakeBackend::start("reset", fake).await;
        let good = FakeBackend::start("good", Fake::Answer).await;
        let p = proxy(config(splice), &bad, &[&good]).await;
        for i in 0..20u64 {
            if i == 10 {
                assert_eq!((bad.accepted(), good.accepted()), (1, 10), "{fake:?}");
                tokio::time::sleep(AVOID_AFTER_FAILURE + Duration::from_millis(100)).await;
            }
            // Up to the whole 16 KiB buffer, the bound of what is kept.
            let len = if i % 10 == 0 {
                16 * 1024 - 4
            } else {
                1000 + i as usize
            };
            let payload = random_bytes(len, i);
            let (got, end) = exchange(&p, &payload).await;
            end.unwrap();
            assert!(
                got == expected("good", &payload),
                "{fake:?} connection {i}: answer differs"
            );
        }
        assert_eq!((bad.accepted(), good.accepted()), (2, 20), "{fake:?}");
        // Both connections that met the bad backend failed there first, by
        // a failed connect or by a reset after it; both count as its errors.
        let stats = p.backends.stats();
        assert_eq!(stats[0].stats.connect_errors, 2, "{stats:?}");
        assert_eq!(stats[1].stats.retries, 2, "{stats:?}");
        match fake {
            Fake::ResetSoon => assert_eq!(replays(&p), 2),
            _ => assert!(replays(&p) <= 2),
        }
        assert!(
            eventually(Duration::from_secs(5), || p
                .backends
                .stats()
                .iter()
                .all(|s| s.stats.active_connections == 0))
            .await,
            "{:?}",
            p.backends.stats()
        );
    }
}

/// (b) The backend reads the client's bytes and closes without a byte: the
/// bytes it swallowed are replayed to the next backend.
#[tokio::test]
async fn b_a_close_after_reading_the_first_flight_is_replayed() {
    let bad = FakeBackend::start("read-then-close", Fake::ReadThenClose).await;
    let good = FakeBackend::start("good", Fake::Answer).await;
    let p = proxy(config(true), &bad, &[&good]).await;
    // The message is sent in two writes, apart, so the first flight is
    // kept across several reads.
    let payload = random_bytes(3000, 9);
    let m = message(&payload);
    let mut s = TcpStream::connect(p.address).await.unwrap();
    s.write_all(&m[..1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(&m[1000..]).await.unwrap();
    let (got, end) = read_answer(&mut s, payload.len()).await;
    end.unwrap();
    assert!(got == expected("good", &payload), "answer differs");
    assert_eq!((bad.accepted(), good.accepted()), (1, 1));
    assert_eq!(replays(&p), 1);
    // After the replay the connection is an ordinary one: the client's
    // FIN reaches the backend, whose FIN comes back.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
}

/// (c) Once the backend sent a byte, its reset reaches the client: nothing
/// is replayed.
#[tokio::test]
async fn c_a_reset_after_the_first_byte_reaches_the_client() {
    let bad = FakeBackend::start("byte-then-reset", Fake::ByteThenReset).await;
    let good = FakeBackend::start("good", Fake::Answer).await;
    let p = proxy(config(false), &bad, &[&good]).await;
    let (got, end) = exchange(&p, b"hello").await;
    assert_eq!(got, b"x");
    let e = end.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert_eq!((bad.accepted(), good.accepted()), (1, 0));
    assert_eq!(replays(&p), 0);
}

/// (d) A first flight larger than the buffer is not kept: the backend's
/// close before its first byte reaches the client as before (a FIN and
/// nothing else), and no other backend sees the request.
#[tokio::test]
async fn d_a_first_flight_beyond_the_buffer_is_not_replayed() {
    for splice in [false, true] {
        let bad = FakeBackend::start("read-then-close", Fake::ReadThenClose).await;
        let good = FakeBackend::start("good", Fake::Answer).await;
        let p = proxy(config(splice), &bad, &[&good]).await;
        let (got, end) = exchange(&p, &random_bytes(40 * 1024, 3)).await;
        end.unwrap();
        assert!(got.is_empty(), "{} bytes", got.len());
        assert_eq!((bad.accepted(), good.accepted()), (1, 0));
        assert_eq!(replays(&p), 0);
    }
}

/// (e) Every backend resets: each is tried once (`connectAttempts`, never
/// the same one twice), then the client's connection is reset, quickly.
#[tokio::test]
async fn e_when_every_backend_resets_the_client_is_closed_after_bounded_tries() {
    let r1 = FakeBackend::start("r1", Fake::ResetSoon).await;
    let r2 = FakeBackend::start("r2", Fake::ResetSoon).await;
    let r3 = FakeBackend::start("r3", Fake::ResetSoon).await;
    let r4 = FakeBackend::start("r4", Fake::ResetSoon).await;
    let p = proxy(config(false), &r1, &[&r2, &r3, &r4]).await;
    let started = tokio::time::Instant::now();
    let (got, end) = exchange(&p, b"hello").await;
    assert!(got.is_empty());
    let e = end.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The default connectAttempts (3) bounds the backends tried.
    let tried = [&r1, &r2, &r3, &r4].map(|b| b.accepted());
    assert_eq!(tried[0], 1);
    assert_eq!(tried.iter().sum::<usize>(), 3, "{tried:?}");
    assert!(tried.iter().all(|&n| n <= 1), "{tried:?}");
    // Two replays; the third reset leaves no backend to replay to.
    assert_eq!(replays(&p), 2);
    let failed = bulwark_common::telemetry::metrics_handle().render();
    let series = format!(
        "bulwark_lb_connections_failed_total{{listener=\"{}\",reason=\"connect_failed\"}} 1",
        p.address
    );
    assert!(failed.contains(&series), "{failed}");
}

/// The replay window closes after one connect timeout: a backend that
/// closes without a byte later than that fails the client as before.
#[tokio::test]
async fn a_close_after_the_replay_deadline_is_not_replayed() {
    let bad = FakeBackend::start("read-then-close", Fake::ReadThenClose).await;
    let good = FakeBackend::start("good", Fake::Answer).await;
    let p = proxy(
        ProxyConfig {
            connect_timeout: Duration::from_millis(200),
            ..ProxyConfig::default()
        },
        &bad,
        &[&good],
    )
    .await;
    let payload = b"late".to_vec();
    let m = message(&payload);
    let mut s = TcpStream::connect(p.address).await.unwrap();
    // The backend closes once the message is complete: past the deadline.
    s.write_all(&m[..2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(&m[2..]).await.unwrap();
    let (got, end) = read_answer(&mut s, payload.len()).await;
    end.unwrap();
    assert!(got.is_empty());
    assert_eq!((bad.accepted(), good.accepted()), (1, 0));
    assert_eq!(replays(&p), 0);
}

/// The real thing: TLS apiservers (the fixture, as processes) behind the
/// proxy, sixteen clients opening a new TLS connection per request, and a
/// SIGKILL of one apiserver in the middle. Connections it had accepted
/// (or that sat in its backlog) are reset mid-handshake; the proxy must
/// replay their ClientHello elsewhere, and new connects to the dead port
/// are retried, so not one TCP connect or TLS handshake fails. What runs
/// on a finished TLS session with the killed apiserver (the HTTP/2
/// preface, a request in flight) reached it and may fail, at most once per
/// client; that is not a connect. Nothing tells the proxy
/// about the death (no prober, no publish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_tls_apiserver_under_new_connections_costs_no_client_request() {
    bulwark_testkit::install_crypto_provider();
    let pki = bulwark_testkit::Pki::new().unwrap();
    let mut apis = Vec::new();
    for i in 1..=3 {
        apis.push(
            bulwark_testkit::fixture::ApiServerProcess::builder(format!("api-{i}"))
                .start(&pki)
                .await
                .unwrap(),
        );
    }
    let specs = apis
        .iter()
        .map(|a| BackendSpec {
            id: a.name().to_owned(),
            address: a.addr(),
            zone: "z".into(),
            weight: 1,
            admin: AdminState::Active,
            verdict: Verdict::Healthy,
        })
        .collect();
    let p = TestProxy::start(ProxyConfig::default(), RoutingPolicy::default(), specs).await;
    let https = bulwark_testkit::fixture::HttpsClient::new(pki.ca_pem())
        .unwrap()
        .timeout(Duration::from_secs(5));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let address = p.address;
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (https, stop) = (https.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut connects, mut requests) = (0usize, Vec::new(), Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let mut conn = match https.connect(address).await {
                        Ok(c) => c,
                        // TCP connect or TLS handshake: the apiserver had
                        // sent nothing, or the handshake would have ended.
                        Err(e) if !format!("{e:#}").starts_with("HTTP") => {
                            connects.push(format!("{e:#}"));
                            continue;
                        }
                        // The HTTP handshake runs on a finished TLS
                        // session: the apiserver had answered, as for a
                        // request in flight.
                        Err(e) => {
                            requests.push(format!("{e:#}"));
                            continue;
                        }
                    };
                    match conn.get("/readyz").await {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => requests.push(format!("HTTP {}", r.status)),
                        Err(e) => requests.push(format!("{e:#}")),
                    }
                }
                (ok, connects, requests)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    apis[0].kill().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut connects, mut requests) = (0, Vec::new(), Vec::new());
    for c in clients {
        let (o, c, r) = c.await.unwrap();
        ok += o;
        connects.extend(c);
        requests.extend(r);
    }
    let stats = p.backends.stats();
    eprintln!(
        "{ok} requests served, {} replays, {} errors on the killed backend, in-flight requests lost: {requests:?}",
        replays(&p),
        stats[0].stats.connect_errors
    );
    assert!(connects.is_empty(), "failed TLS connects: {connects:?}");
    assert!(requests.len() <= 16, "failed requests: {requests:?}");
    assert!(ok > 100, "only {ok} requests in 2 s");
}
