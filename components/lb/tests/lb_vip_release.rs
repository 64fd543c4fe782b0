//! A node that loses the VIP resets the client connections it was proxying
//! for it at once, so their clients reconnect (to the new holder) instead
//! of waiting for their own timeouts: first on the proxy alone
//! (`proxy::serve_vip`), then through a 3-node cluster whose bind-mode VIP
//! moves by a leadership transfer while the old holder stays up.
//!
//! arp mode keeps its front listener for good and gates it instead
//! (`proxy::serve_front`): on the proxy alone, then on the network-namespace
//! lab (root only; skipped without it), where the leader loses the VIP
//! first to a partition from its peers (its lease runs out) and then by a
//! leadership transfer, and the client holding a connection through the
//! VIP gets a reset each time, sent before the address was deleted.

// Helpers outside #[test] fns fail the test loudly too.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bulwark_api::lb::v1 as lb;
use bulwark_lb::backends::{Backends, RoutingPolicy};
use bulwark_lb::proxy::{self, FrontGate, ProxyConfig};
use bulwark_testkit::cluster::lab::{LbLab, echo};
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

/// arp mode's front: connections are proxied only while the gate is open,
/// closing it resets those of the holding at once (before the actuator
/// deletes the address), and a client arriving while it is closed waits
/// in the accept queue for the next holding instead of being served by a
/// node that does not hold the VIP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_front_gate_resets_the_holdings_connections() {
    bulwark_common::telemetry::metrics_handle();
    let b = TestBackend::start("b", Mode::Echo).await;
    let backends = Backends::new(RoutingPolicy::default());
    backends.publish(vec![b.spec("z")], 1).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let gate = FrontGate::new();
    let shutdown = CancellationToken::new();
    let config = ProxyConfig {
        shutdown_grace: Duration::from_millis(500),
        ..Default::default()
    };
    let task = tokio::spawn(proxy::serve_front(
        listener,
        backends,
        Arc::new(config),
        shutdown.clone(),
        gate.clone(),
    ));

    gate.open();
    let mut conns = Vec::new();
    for i in 0..3u64 {
        let mut c = tokio::io::BufReader::new(TcpStream::connect(address).await.unwrap());
        let mut id = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut c, &mut id)
            .await
            .unwrap();
        assert_eq!(id, "b\n");
        roundtrip(&mut c, &support::random_bytes(100, i))
            .await
            .unwrap();
        conns.push(c.into_inner());
    }
    let closed = gate.close(Duration::from_secs(2)).await;
    assert_eq!(closed, proxy::Closed { reset: 3, left: 0 });
    for c in &mut conns {
        // Already sent: the close waited for them.
        let e = end_of(c, Duration::from_millis(500)).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }

    // Closed: the kernel completes the handshake, nobody proxies it.
    let mut waiting = TcpStream::connect(address).await.unwrap();
    let mut byte = [0u8; 1];
    let silent = tokio::time::timeout(Duration::from_millis(300), waiting.read(&mut byte)).await;
    assert!(silent.is_err(), "served while closed: {silent:?}");
    assert_eq!(b.accepted(), 3);
    // The next holding serves it.
    gate.open();
    let mut c = tokio::io::BufReader::new(waiting);
    let mut id = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncBufReadExt::read_line(&mut c, &mut id),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(id, "b\n");

    // Shutdown with a holding open: the grace, then closed.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve_front returns after the grace")
        .unwrap()
        .unwrap();
    let mut c = c.into_inner();
    let e = end_of(&mut c, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

/// Reads from a connection that should see no data until it is reset, and
/// returns how long after `since` the reset came.
async fn reset_after(s: &mut TcpStream, since: std::time::Instant, within: Duration) -> Duration {
    let e = end_of(s, within).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    since.elapsed()
}

/// A connection through the VIP from the lab's client host, proven open by
/// an echo.
async fn connect_through(l: &LbLab) -> TcpStream {
    let mut s = l.client().tcp_connect(l.vip).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
    s
}

/// arp mode: the leader loses the VIP while it and its client stay up,
/// first because a partition from its peers ends its lease, then by a
/// leadership transfer. Each time the client, silent on a connection
/// through the VIP (as a watch is between events), gets a reset within a
/// moment of the release: the old holder sent it before deleting the
/// address. Without it the client would wait for its own timeouts (the
/// old holder can no longer send from the VIP, the new one never heard of
/// the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_netns_arp_mode_release_resets_the_old_holders_clients() {
    let Some(l) = LbLab::start(3).await else {
        return;
    };
    let hosts = l.lb_hosts();
    let leader = l.wait_for_holder(None, Duration::from_secs(20)).await;
    let mut old = connect_through(&l).await;

    // A partition from its peers: the lease runs out, it releases.
    let cut = std::time::Instant::now();
    for (i, h) in hosts.iter().enumerate() {
        if i != leader {
            l.lab.partition(&hosts[leader], h).unwrap();
        }
    }
    let reset = reset_after(&mut old, cut, Duration::from_secs(3)).await;
    // Logged once the resets are out, so maybe just after the client saw it.
    l.nodes[leader]
        .wait_for_log(
            "reset its client connections before deleting the address",
            Duration::from_secs(2),
        )
        .await
        .expect("the reset is logged");
    let new = l
        .wait_for_holder(Some(leader), Duration::from_secs(10))
        .await;
    eprintln!(
        "partitioned leader h{}: its client reset {reset:?} after the cut (lease 150 ms); VIP now on h{}",
        leader + 1,
        new + 1
    );
    l.lab.heal_all().unwrap();

    // A leadership transfer: the holder releases before handing over.
    let mut old = connect_through(&l).await;
    let asked = std::time::Instant::now();
    l.api(new)
        .transfer_leadership(lb::TransferLeadershipRequest { to_node_id: None })
        .await
        .unwrap();
    let reset = reset_after(&mut old, asked, Duration::from_secs(3)).await;
    let next = l.wait_for_holder(Some(new), Duration::from_secs(10)).await;
    eprintln!(
        "transfer from h{}: its client reset {reset:?} after the request; VIP now on h{}",
        new + 1,
        next + 1
    );
    assert!(
        echo(&l.client(), l.vip, Duration::from_secs(2)).await,
        "a new connection goes through h{}",
        next + 1
    );
}

/// Whether `ip` is on `interface`, asked with `ip addr` from the calling
/// thread's network namespace.
fn on_interface(interface: &str, ip: std::net::Ipv4Addr) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show", "dev", interface])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip addr: {out:?}");
    String::from_utf8_lossy(&out.stdout).contains(&format!("inet {ip}/"))
}

/// The lease watchdog releases without the runtime. A holder whose VIP
/// task cannot run (its runtime's only thread is blocked, as a starved or
/// stuck runtime would be) has its address deleted once the lease it last
/// recorded and one check interval have passed, never before, and its
/// front gate closed (its clients reset), long before the address's 30 s
/// kernel lifetime would have removed it. A lease moved on in time is left
/// alone, and after the task's own release nothing more happens.
#[test]
fn heavy_netns_the_lease_watchdog_deletes_a_stalled_holders_vip() {
    use bulwark_lb::vip::arp::{ArpVip, Renewal, VipAddress};
    use bulwark_testkit::Lab;
    use std::time::Instant as StdInstant;
    use tokio::time::Instant;

    let Some(lab) = Lab::start_or_skip(1).unwrap() else {
        return;
    };
    let host = lab.host(0);
    let (interface, vip) = (host.interface().to_owned(), lab.spare_addr(7));
    let grace = Duration::from_millis(10);
    host.in_netns(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let address = VipAddress {
                ip: vip.into(),
                prefix: 32,
            };
            let mut arp = ArpVip::new(
                interface.clone(),
                vec![address],
                0,
                Duration::from_millis(100),
                Duration::from_secs(30),
                grace,
            )
            .unwrap();
            let gate = FrontGate::new();
            arp.gate_front(gate.clone(), Duration::from_millis(25));

            // Held with a 300 ms lease, then the task stalls: this thread
            // blocks, so nothing on the runtime runs until it is done.
            let lease = Duration::from_millis(300);
            let until = Instant::now() + lease;
            arp.hold_until(until, true);
            arp.claim().await.unwrap();
            assert!(on_interface(&interface, vip), "claimed");
            assert!(gate.is_open());
            let deadline = until.into_std() + grace;
            let mut gone_at = None;
            while StdInstant::now() < deadline + Duration::from_secs(3) {
                let present = on_interface(&interface, vip);
                // A check that ended before the deadline saw the address.
                let checked = StdInstant::now();
                if !present {
                    gone_at = Some(checked);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let gone_at = gone_at.expect("the watchdog deleted the stalled holder's VIP");
            assert!(
                gone_at >= deadline,
                "deleted at least {:?} before the lease and its grace ran out",
                deadline - gone_at
            );
            assert_eq!(arp.watchdog_releases(), 1);
            assert!(!gate.is_open(), "the holding's clients were reset");

            // The task catches up and its lease is fresh again: its next
            // renewal adds the address back and opens the gate again (the
            // front would otherwise refuse every client while "holding").
            let lease = Duration::from_secs(1);
            arp.hold_until(Instant::now() + lease, true);
            let renewed = arp.renew(Instant::now() + lease).await.unwrap();
            assert!(matches!(renewed, Renewal::Readded), "{renewed:?}");
            assert!(on_interface(&interface, vip), "added back");
            assert!(gate.is_open(), "the front accepts again");

            // The task (here: this thread) moves the 1 s lease on every
            // 20 ms for 1 s: the watchdog leaves it alone.
            let started = StdInstant::now();
            while started.elapsed() < Duration::from_secs(1) {
                arp.hold_until(Instant::now() + lease, true);
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                on_interface(&interface, vip),
                "kept while the lease moves on"
            );
            assert_eq!(arp.watchdog_releases(), 1);

            // The task releases on time itself: disarmed, no second release.
            arp.release().await.unwrap();
            assert!(!on_interface(&interface, vip));
            std::thread::sleep(lease + Duration::from_millis(200));
            assert_eq!(arp.watchdog_releases(), 1);
        });
    })
    .unwrap();
}
