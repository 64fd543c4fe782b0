//! A SIGKILLed holder on the network-namespace lab (root only; skipped
//! without it): its address stays on its interface for a moment, and the
//! client's neighbour cache points at it until the new holder announces
//! the VIP. A client connecting all the while must never be refused.
//!
//! With `vip.dropRefusals` (the default) the dead holder's kernel still
//! answers those SYNs with resets, but the nftables rule the holder
//! installed drops them; the client's SYN is sent again a second later and
//! reaches the new holder, so every connect succeeds, some a second late.
//! With it off the same run sees "connection refused": that half shows the
//! test can see refusals at all.

// Helpers outside #[test] fns fail the test loudly too.
#![allow(clippy::unwrap_used)]

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use bulwark_testkit::cluster::lab::{LbLab, echo};
use bulwark_testkit::netns::Host;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How each connect started around the kill ended.
#[derive(Debug, Default)]
struct Outcome {
    ok: usize,
    refused: usize,
    other: Vec<String>,
    slowest: Duration,
}

/// A fresh connection through the VIP and an echo round trip; a client's
/// connect timeout well above one SYN retransmission (1 s).
async fn connect_once(client: &Host, vip: SocketAddr) -> Result<(), ErrorKind> {
    let attempt = async {
        let mut s = client.tcp_connect(vip).await.map_err(|e| {
            e.chain()
                .find_map(|c| c.downcast_ref::<std::io::Error>())
                .map_or(ErrorKind::Other, std::io::Error::kind)
        })?;
        s.write_all(b"ping").await.map_err(|e| e.kind())?;
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.map_err(|e| e.kind())?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(4), attempt)
        .await
        .unwrap_or(Err(ErrorKind::TimedOut))
}

/// Starts a connect every 10 ms from just before the holder's SIGKILL
/// until the new holder has had the VIP for a while, and tallies them.
async fn connects_across_a_holder_kill(drop_refusals: bool) -> Option<(Outcome, LbLab, usize)> {
    let mut l = if drop_refusals {
        LbLab::start(3).await?
    } else {
        LbLab::start_edited(3, |c| c.vip.drop_refusals = false).await?
    };
    let old = l.wait_for_holder(None, Duration::from_secs(20)).await;
    assert!(echo(&l.client(), l.vip, Duration::from_secs(2)).await);
    let (client, vip) = (l.client(), l.vip);
    let mut attempts = tokio::task::JoinSet::new();
    let start = Instant::now();
    let mut killed = false;
    while start.elapsed() < Duration::from_millis(1500) {
        if !killed && start.elapsed() >= Duration::from_millis(100) {
            l.nodes[old].kill().unwrap();
            killed = true;
        }
        let client = client.clone();
        attempts.spawn(async move {
            let began = Instant::now();
            (connect_once(&client, vip).await, began.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut o = Outcome::default();
    while let Some(done) = attempts.join_next().await {
        let (result, took) = done.unwrap();
        o.slowest = o.slowest.max(took);
        match result {
            Ok(()) => o.ok += 1,
            Err(ErrorKind::ConnectionRefused) => o.refused += 1,
            Err(kind) => o.other.push(format!("{kind:?}")),
        }
    }
    let new = l.wait_for_holder(Some(old), Duration::from_secs(10)).await;
    eprintln!(
        "dropRefusals {drop_refusals}: h{} killed, VIP on h{}: {o:?}",
        old + 1,
        new + 1
    );
    Some((o, l, old))
}

/// `nft list table inet bulwark_lb` on LB host `i`: the table, or `None`
/// when there is none.
fn refusal_table(l: &LbLab, i: usize) -> Option<String> {
    l.lb_hosts()[i]
        .exec_ok("nft", ["list", "table", "inet", "bulwark_lb"])
        .ok()
}

/// The packets the rule's counter saw, from `nft list` output.
fn dropped(table: &str) -> u64 {
    let after = table
        .split("counter packets ")
        .nth(1)
        .expect("the rule has a counter");
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a packet count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_netns_a_killed_holder_refuses_no_connect() {
    let Some((o, mut l, old)) = connects_across_a_holder_kill(true).await else {
        return;
    };
    assert_eq!(o.refused, 0, "connects refused by the dead holder: {o:?}");
    assert!(o.other.is_empty(), "connects that failed otherwise: {o:?}");
    assert!(o.ok > 100, "connects through the VIP: {o:?}");
    // The rule outlived the killed process, and it is what kept the
    // refusals from the clients.
    let table = refusal_table(&l, old).expect("the killed holder's table is still there");
    assert!(dropped(&table) > 0, "the rule dropped nothing:\n{table}");
    // A clean stop removes its table.
    let other = (old + 1) % 3;
    assert!(refusal_table(&l, other).is_some(), "every node installs it");
    l.nodes[other].stop().await.unwrap();
    assert_eq!(refusal_table(&l, other), None, "left after a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_netns_without_the_rule_a_killed_holder_refuses_connects() {
    let Some((o, l, old)) = connects_across_a_holder_kill(false).await else {
        return;
    };
    assert!(o.refused > 0, "no connect was refused: {o:?}");
    assert_eq!(refusal_table(&l, old), None, "installed although off");
}
