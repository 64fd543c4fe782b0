//! Tickle ACKs on the network-namespace lab (root only; skipped without
//! it): the VIP holder's link is cut while a client sits silent on a
//! connection through the VIP (as a watch does between events). The old
//! holder cannot reset that connection any more, and the new holder never
//! accepted it; without help the client would wait for its own timeout
//! (this one has none: it would wait forever).
//!
//! With `vip.tickleClients` (the default) the old holder had shared its
//! client table with its peers, and the new holder tickles the client
//! right after its claim: the client's connection is reset within moments
//! of the VIP moving, over IPv4 and over IPv6. With it off, no reset comes.

// Helpers outside #[test] fns fail the test loudly too.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bulwark_testkit::cluster::lab::{LbLab, Stack, echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Well past the holder's table push (every 250 ms while it changes).
const SHARED_WITHIN: Duration = Duration::from_secs(1);

/// From the VIP moving (as the test sees it) to the client's reset: the
/// tickles go out within 100 ms of the claim; the rest is margin for a
/// loaded machine. Far below any client's timeout (client-go notices a
/// dead HTTP/2 connection after 30 s + 15 s).
const RESET_BOUND: Duration = Duration::from_millis(1500);

/// A connection through the VIP from the lab's client host, proven open by
/// an echo.
async fn connect_through(l: &LbLab) -> TcpStream {
    let mut s = l.client().tcp_connect(l.vip).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("the echo came back in time")
        .unwrap();
    assert_eq!(&back, b"ping");
    s
}

/// Reads until the connection ends, then says how (and when).
async fn end_of(mut s: TcpStream) -> (std::io::Result<usize>, Instant) {
    let mut buf = [0u8; 1024];
    let r = loop {
        match s.read(&mut buf).await {
            Ok(0) => break Ok(0),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    (r, Instant::now())
}

/// Starts the lab, connects through the VIP, lets the holder share its
/// table, cuts the holder's link and waits for the VIP to move. Returns
/// the new holder, when the link was cut and when the test saw the VIP
/// move, and the client's read of its old connection (running).
async fn cut_the_holder(
    l: &LbLab,
) -> (
    usize,
    (Instant, Instant),
    tokio::task::JoinHandle<(std::io::Result<usize>, Instant)>,
) {
    let hosts = l.lb_hosts();
    let leader = l.wait_for_holder(None, Duration::from_secs(20)).await;
    let conn = connect_through(l).await;
    tokio::time::sleep(SHARED_WITHIN).await;
    let reading = tokio::spawn(end_of(conn));
    let cut = Instant::now();
    l.lab.cut_link(&hosts[leader]).unwrap();
    let new = l
        .wait_for_holder(Some(leader), Duration::from_secs(10))
        .await;
    let moved = Instant::now();
    eprintln!(
        "cut h{}'s link; the VIP moved to h{} {:?} after the cut",
        leader + 1,
        new + 1,
        moved - cut
    );
    (new, (cut, moved), reading)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_netns_the_new_holder_resets_a_cut_off_holders_clients() {
    let Some(l) = LbLab::start(3).await else {
        return;
    };
    a_cut_off_holders_client_is_reset(&l).await;
}

/// The same over IPv6: the tickle's IPv6 header and checksum are right,
/// or the client's kernel would drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_netns_the_new_holder_resets_a_cut_off_holders_clients_over_ipv6() {
    let Some(l) = LbLab::start_stack(3, Stack::V6).await else {
        return;
    };
    a_cut_off_holders_client_is_reset(&l).await;
}

/// Cuts the holder under a silent client and checks that the new holder's
/// tickle resets the client's connection in time.
async fn a_cut_off_holders_client_is_reset(l: &LbLab) {
    let (new, (cut, moved), reading) = cut_the_holder(l).await;
    let (result, at) = tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .expect("the client's connection ended")
        .unwrap();
    let e = result.expect_err("the connection was reset, not closed");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    let after = at.saturating_duration_since(moved);
    eprintln!(
        "the client's connection was reset {:?} after the cut, {after:?} after the test saw the VIP move",
        at - cut
    );
    assert!(
        after < RESET_BOUND,
        "reset {after:?} after the VIP moved (bound {RESET_BOUND:?})"
    );
    l.nodes[new]
        .wait_for_log(
            "tickled the previous holder's clients",
            Duration::from_secs(3),
        )
        .await
        .expect("the new holder logs its tickles");
    assert!(
        echo(&l.client(), l.vip, Duration::from_secs(2)).await,
        "the client reconnects through h{}",
        new + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_netns_without_tickles_a_cut_off_holders_clients_hear_nothing() {
    let Some(l) = LbLab::start_edited(3, |c| c.vip.tickle_clients = false).await else {
        return;
    };
    let (new, _, reading) = cut_the_holder(&l).await;
    // Twice the bound the tickle meets: nothing comes.
    let waited = tokio::time::timeout(RESET_BOUND * 2, reading).await;
    assert!(
        waited.is_err(),
        "the connection ended without tickles: {:?}",
        waited.map(|r| r.map(|(res, _)| res))
    );
    assert!(
        echo(&l.client(), l.vip, Duration::from_secs(2)).await,
        "a new connection goes through h{}",
        new + 1
    );
}
