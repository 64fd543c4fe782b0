//! The proxy's byte path over real sockets: integrity, half-close,
//! concurrency, connect retries, limits, idle timeout and shutdown. Both the
//! buffered copy and the splice path run the integrity tests.

// Helpers outside #[test] functions fail the test on a broken socket too.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bulwark_lb::backends::RoutingPolicy;
use bulwark_lb::proxy::ProxyConfig;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(splice: bool) -> ProxyConfig {
    ProxyConfig {
        splice,
        ..ProxyConfig::default()
    }
}

async fn large_payloads_both_ways(splice: bool) {
    let b = TestBackend::start("b", Mode::Echo).await;
    let p = TestProxy::start(config(splice), RoutingPolicy::default(), vec![b.spec("z")]).await;
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let (id, conn) = p.connect().await.unwrap();
        assert_eq!(id, "b");
        tasks.push(tokio::spawn(async move {
            let data = random_bytes(8 * 1024 * 1024 + 12_345 * i as usize, i + 1);
            let (mut rd, mut wr) = conn.into_inner().into_split();
            let sent = data.clone();
            // Write and read at once: the echo must flow while we send.
            let writer = tokio::spawn(async move {
                wr.write_all(&sent).await.unwrap();
                wr.shutdown().await.unwrap();
            });
            let mut back = Vec::with_capacity(data.len());
            rd.read_to_end(&mut back).await.unwrap();
            writer.await.unwrap();
            assert_eq!(back.len(), data.len());
            assert_eq!(checksum(&back), checksum(&data));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = &p.backends.stats()[0].stats;
    assert!(stats.bytes_in >= 4 * 8 * 1024 * 1024, "{stats:?}");
    // The backend's id lines count too.
    assert_eq!(stats.bytes_out, stats.bytes_in + 4 * 2);
    assert!(
        eventually(Duration::from_secs(5), || p.backends.stats()[0]
            .stats
            .active_connections
            == 0)
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_random_payloads_arrive_intact_both_ways() {
    large_payloads_both_ways(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_random_payloads_arrive_intact_both_ways_spliced() {
    large_payloads_both_ways(true).await;
}

async fn client_half_close(splice: bool) {
    let b = TestBackend::start("b", Mode::Echo).await;
    let p = TestProxy::start(config(splice), RoutingPolicy::default(), vec![b.spec("z")]).await;
    let (_, conn) = p.connect().await.unwrap();
    let mut s = conn.into_inner();
    s.write_all(b"request").await.unwrap();
    // Client FIN: the backend sees EOF, still answers, then closes.
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"request");
}

#[tokio::test]
async fn client_half_close_still_gets_the_response() {
    client_half_close(false).await;
    client_half_close(true).await;
}

async fn backend_half_close(splice: bool) {
    let b = TestBackend::start("b", Mode::CloseFirst).await;
    let p = TestProxy::start(config(splice), RoutingPolicy::default(), vec![b.spec("z")]).await;
    // Read through the BufReader: it may already hold `hello`.
    let (_, mut s) = p.connect().await.unwrap();
    let mut hello = Vec::new();
    // The backend's FIN reaches the client…
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut hello))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hello, b"hello");
    // …while the client can still send.
    let data = random_bytes(1024 * 1024, 7);
    s.get_mut().write_all(&data).await.unwrap();
    s.get_mut().shutdown().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || b
            .received_after_fin
            .load(std::sync::atomic::Ordering::SeqCst)
            == data.len())
        .await
    );
}

#[tokio::test]
async fn backend_half_close_still_takes_client_bytes() {
    backend_half_close(false).await;
    backend_half_close(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_concurrent_connections() {
    let b1 = TestBackend::start("b1", Mode::Echo).await;
    let b2 = TestBackend::start("b2", Mode::Echo).await;
    let p = TestProxy::start(
        ProxyConfig::default(),
        RoutingPolicy::default(),
        vec![b1.spec("z"), b2.spec("z")],
    )
    .await;
    let mut conns = Vec::new();
    // Open all first, so they are truly concurrent.
    for _ in 0..600 {
        conns.push(p.connect().await.unwrap().1);
    }
    assert_eq!(
        p.backends
            .stats()
            .iter()
            .map(|s| s.stats.active_connections)
            .sum::<u64>(),
        600
    );
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                roundtrip(&mut c, &random_bytes(16 * 1024, i as u64))
                    .await
                    .unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Both backends took a fair part (P2C on open connections).
    assert!(
        b1.accepted() > 200 && b2.accepted() > 200,
        "{} {}",
        b1.accepted(),
        b2.accepted()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_backend_costs_no_client_connection() {
    let good = TestBackend::start("good", Mode::Echo).await;
    let closed = ClosedBackend::new("closed-port-retry-test");
    let p = TestProxy::start(
        ProxyConfig::default(),
        RoutingPolicy::default(),
        vec![closed.spec(""), good.spec("z")],
    )
    .await;
    for _ in 0..50 {
        let (id, mut c) = p.connect().await.unwrap();
        assert_eq!(id, "good");
        roundtrip(&mut c, b"ping").await.unwrap();
    }
    let stats = p.backends.stats();
    assert!(stats[0].stats.connect_errors > 0, "{stats:?}");
    assert_eq!(stats[0].stats.connect_errors, stats[1].stats.retries);
    let metrics = bulwark_common::telemetry::metrics_handle().render();
    assert!(
        metrics.contains(
            r#"bulwark_lb_connect_errors_total{backend="closed-port-retry-test",reason="refused"}"#
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_under_load_costs_no_new_connection() {
    let mut backends = [
        TestBackend::start("k1", Mode::Echo).await,
        TestBackend::start("k2", Mode::Echo).await,
        TestBackend::start("k3", Mode::Echo).await,
    ];
    let p = TestProxy::start(
        ProxyConfig::default(),
        RoutingPolicy::default(),
        backends.iter().map(|b| b.spec("z")).collect(),
    )
    .await;
    let p = std::sync::Arc::new(p);
    let load = |n: usize| {
        let p = p.clone();
        tokio::spawn(async move {
            for i in 0..n {
                let (_, mut c) = p.connect().await.expect("client connection failed");
                roundtrip(&mut c, &random_bytes(4096, i as u64))
                    .await
                    .expect("echo failed");
            }
        })
    };
    let before: Vec<_> = (0..8).map(|_| load(20)).collect();
    for t in before {
        t.await.unwrap();
    }
    backends[0].kill().await;
    // Nothing tells the proxy: no prober, no publish. The connect retry
    // alone must hide the dead backend from every new client.
    let after: Vec<_> = (0..8).map(|_| load(40)).collect();
    for t in after {
        t.await.unwrap();
    }
    let stats = p.backends.stats();
    assert!(stats[0].stats.connect_errors > 0, "{stats:?}");
}

#[tokio::test]
async fn max_connections_holds_new_clients_in_the_queue() {
    let b = TestBackend::start("b", Mode::Echo).await;
    let p = TestProxy::start(
        ProxyConfig {
            max_connections: 2,
            ..ProxyConfig::default()
        },
        RoutingPolicy::default(),
        vec![b.spec("z")],
    )
    .await;
    let (_, c1) = p.connect().await.unwrap();
    let (_, mut c2) = p.connect().await.unwrap();
    // The third is accepted by the kernel but not served.
    let third = tokio::spawn({
        let addr = p.address;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            b
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "a third connection was served");
    roundtrip(&mut c2, b"still fine").await.unwrap();
    drop(c1);
    let got = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"b\n");
}

#[tokio::test]
async fn idle_timeout_is_off_by_default_and_cuts_when_set() {
    let b = TestBackend::start("b", Mode::Echo).await;
    let off = TestProxy::start(
        ProxyConfig::default(),
        RoutingPolicy::default(),
        vec![b.spec("z")],
    )
    .await;
    let on = TestProxy::start(
        ProxyConfig {
            idle_timeout: Some(Duration::from_secs(1)),
            ..ProxyConfig::default()
        },
        RoutingPolicy::default(),
        vec![b.spec("z")],
    )
    .await;
    let (_, mut silent) = off.connect().await.unwrap();
    let (_, mut cut) = on.connect().await.unwrap();
    let (_, mut busy) = on.connect().await.unwrap();
    // Longer than the connect timeout and than the idle timeout below; the
    // busy connection talks more often than the timeout.
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        roundtrip(&mut busy, b"tick").await.unwrap();
    }
    roundtrip(&mut silent, b"still open").await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), cut.read(&mut buf))
        .await
        .expect("idle connection not closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_closes_after_the_grace() {
    let b = TestBackend::start("b", Mode::Echo).await;
    let p = TestProxy::start(
        ProxyConfig {
            shutdown_grace: Duration::from_millis(800),
            ..ProxyConfig::default()
        },
        RoutingPolicy::default(),
        vec![b.spec("z")],
    )
    .await;
    let (_, mut old) = p.connect().await.unwrap();
    p.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(p.address).await.is_err(),
        "still accepting"
    );
    // Inside the grace: the open connection still works.
    roundtrip(&mut old, b"in grace").await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(5), p.task).await;
    assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
    let mut buf = [0u8; 1];
    let n = old.read(&mut buf).await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test]
async fn shutdown_returns_at_once_when_connections_finish() {
    let b = TestBackend::start("b", Mode::Echo).await;
    let p = TestProxy::start(
        ProxyConfig {
            shutdown_grace: Duration::from_secs(60),
            ..ProxyConfig::default()
        },
        RoutingPolicy::default(),
        vec![b.spec("z")],
    )
    .await;
    let (_, mut c) = p.connect().await.unwrap();
    roundtrip(&mut c, b"x").await.unwrap();
    p.shutdown.cancel();
    drop(c);
    let done = tokio::time::timeout(Duration::from_secs(5), p.task).await;
    assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
}
