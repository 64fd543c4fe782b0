//! A node that loses the VIP resets the client connections it was proxying
//! for it at once, so their clients reconnect (to the new holder) instead
//! of waiting for their own timeouts: first on the proxy alone
//! (`proxy::serve_vip`), then through a 3-node cluster whose bind-mode VIP
//! moves by a leadership transfer while the old holder stays up.

// Helpers outside #[test] fns fail the test loudly too.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bulwark_api::lb::v1 as lb;
use bulwark_lb::backends::{Backends, RoutingPolicy};
use bulwark_lb::proxy::{self, ProxyConfig};
use bulwark_testkit::cluster::{LbCluster, Options, echo_backend};
use support::{Mode, TestBackend, roundtrip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Reads until the connection ends; how it ended.
async fn end_of(s: &mut TcpStream, within: Duration) -> std::io::Result<usize> {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await? {
                0 => return Ok(0),
                _ => continue,
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::other(format!("still open after {within:?}")))?
}

/// Released: open connections are reset at once, although the shutdown
/// grace (10 s by default, which `serve` would give them) is far off, and
/// the listener refuses new connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_vip_front_resets_its_connections_at_once() {
    bulwark_common::telemetry::metrics_handle();
    let b = TestBackend::start("b", Mode::Echo).await;
    let backends = Backends::new(RoutingPolicy::default());
    backends.publish(vec![b.spec("z")], 1).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let released = CancellationToken::new();
    let config = Arc::new(ProxyConfig::default());
    assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    let task = tokio::spawn(proxy::serve_vip(
        listener,
        backends,
        config,
        released.clone(),
    ));
    let mut conns = Vec::new();
    for i in 0..4u64 {
        let mut c = tokio::io::BufReader::new(TcpStream::connect(address).await.unwrap());
        let mut id = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut c, &mut id)
            .await
            .unwrap();
        assert_eq!(id, "b\n");
        roundtrip(&mut c, &support::random_bytes(1000, i))
            .await
            .unwrap();
        conns.push(c.into_inner());
    }
    released.cancel();
    for c in &mut conns {
        let e = end_of(c, Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("serve_vip returns at once")
        .unwrap()
        .unwrap();
    let e = TcpStream::connect(address).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    // The backend's side was closed too: nothing is left open there.
    assert!(
        support::eventually(Duration::from_secs(5), || b.accepted() == 4).await,
        "{}",
        b.accepted()
    );
}

/// The VIP moves by a leadership transfer while the old holder stays up:
/// a client that was connected through it learns at once, by a reset (the
/// old holder would otherwise keep the connection for the test cluster's
/// 1 s `proxy.shutdownGrace` and then close it with a FIN), and reconnects
/// through the new holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_a_moved_bind_mode_vip_resets_the_old_holders_clients() {
    let (backend, _b) = echo_backend().await;
    let c = LbCluster::start(Options {
        nodes: 3,
        backends: vec![("api-1".into(), backend)],
        ..Default::default()
    })
    .await;
    let holder = c.wait_for_holder(None, Duration::from_secs(10)).await;
    c.wait_for_backends(holder, 1).await;
    let mut old = TcpStream::connect(c.vip).await.unwrap();
    old.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), old.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");

    c.client(holder)
        .transfer_leadership(lb::TransferLeadershipRequest { to_node_id: None })
        .await
        .unwrap();
    let new = c
        .wait_for_holder(Some(holder), Duration::from_secs(10))
        .await;
    // The transfer returns once the new holder recorded the failover, so
    // the old holder released the VIP before that: its clients' resets are
    // already on their way.
    let ended = end_of(&mut old, Duration::from_secs(2)).await;
    let e = ended.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert_eq!(
        bulwark_testkit::cluster::echo_through(c.vip, b"pong")
            .await
            .unwrap(),
        b"pong",
        "a new connection goes through node {new}"
    );
}
