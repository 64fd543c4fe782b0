//! arp mode on a network-namespace lab (root only; skipped without it,
//! failed instead with BULWARK_REQUIRE_PRIVILEGED=1): three LB hosts and a
//! client host on a bridge. The VIP moves when the leader's link is cut,
//! a leader partitioned from its peers releases it, and two witnesses
//! (`ip addr` on every host, ARP answers seen from the client) never see
//! two holders.

mod netns_lab;

use std::time::{Duration, Instant};

use netns_lab::{LbLab, Sampler, echo, measure_gap};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_netns_cut_leader_link_moves_the_vip() {
    let Some(l) = LbLab::start(3, "").await else {
        return;
    };
    let sampler = Sampler::start(&l);
    let leader = l.wait_for_holder(None, Duration::from_secs(20)).await;
    let hosts = l.lb_hosts();

    let gap = measure_gap(
        &l.client(),
        l.vip,
        || l.lab.cut_link(&hosts[leader]).unwrap(),
        Duration::from_secs(10),
    )
    .await
    .expect("the client reconnected through the VIP");
    let new = l
        .wait_for_holder(Some(leader), Duration::from_secs(10))
        .await;
    eprintln!(
        "link of h{} cut: VIP moved to h{}; client-visible gap {gap:?}",
        leader + 1,
        new + 1
    );
    assert!(gap < Duration::from_secs(5), "generous bound: {gap:?}");

    // The old leader comes back as a follower; still one holder.
    l.lab.restore_link(&hosts[leader]).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(l.holders(), vec![new]);
    assert!(echo(&l.client(), l.vip, Duration::from_secs(1)).await);

    // The new holder commits its record right after claiming.
    let deadline = Instant::now() + Duration::from_secs(10);
    let f = loop {
        if let Some(f) = l
            .status(new)
            .await
            .and_then(|s| s.recent_failovers.into_iter().next())
            .filter(|f| f.to_node_id == new as u64 + 1)
        {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no failover record on the new holder"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(f.from_node_id, Some(leader as u64 + 1));
    eprintln!("failover record: {f:?}");

    let w = sampler.finish();
    eprintln!(
        "witnesses: {} ip-addr sweeps, {} ARP windows, MACs seen {}",
        w.addr_samples,
        w.arp_windows,
        w.macs.len()
    );
    assert!(w.addr_samples > 20 && w.arp_windows > 20, "{w:?}");
    assert!(
        w.addr_violations.is_empty(),
        "two holders by ip addr: {:?}",
        w.addr_violations
    );
    assert!(
        w.arp_violations.is_empty(),
        "two MACs answered ARP: {:?}",
        w.arp_violations
    );
    assert!(
        w.macs.len() >= 2,
        "the VIP was seen answering from both holders"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_netns_partitioned_leader_releases_within_its_lease() {
    let Some(l) = LbLab::start(3, "").await else {
        return;
    };
    let sampler = Sampler::start(&l);
    let leader = l.wait_for_holder(None, Duration::from_secs(20)).await;
    let hosts = l.lb_hosts();

    // Cut the leader off from both peers; the client still reaches it.
    let cut = Instant::now();
    for (i, h) in hosts.iter().enumerate() {
        if i != leader {
            l.lab.partition(&hosts[leader], h).unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while l.holders().contains(&leader) {
        assert!(
            Instant::now() < deadline,
            "the partitioned leader kept the VIP"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let released = cut.elapsed();
    eprintln!(
        "partitioned leader h{} released the VIP {released:?} after the cut (lease 180ms + last ack age)",
        leader + 1
    );
    let new = l
        .wait_for_holder(Some(leader), Duration::from_secs(10))
        .await;

    l.lab.heal_all().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        l.holders(),
        vec![new],
        "after healing, pre-vote keeps the new leader"
    );

    let w = sampler.finish();
    assert!(
        w.addr_violations.is_empty(),
        "two holders by ip addr: {:?}",
        w.addr_violations
    );
    assert!(
        w.arp_violations.is_empty(),
        "two MACs answered ARP: {:?}",
        w.arp_violations
    );
}
