//! Where new connections go, observed through the backend that answers:
//! drain (with and without a deadline), zone preference and spill-over,
//! per-listener routing modes, fail-open, and the race of a second connect
//! beside one that hangs.

// Helpers outside #[test] functions fail the test on a broken socket too.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use bulwark_lb::backends::{
    AdminState, BackendSpec, Backends, RoutingMode, RoutingPolicy, Verdict,
};
use bulwark_lb::proxy::ProxyConfig;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;

async fn answering(p: &TestProxy, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (id, _c) = p.connect().await.unwrap();
        seen.insert(id);
    }
    seen
}

fn set(ids: &[&str]) -> HashSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn drained_backend_takes_no_new_connections_but_keeps_old_ones() {
    let a = TestBackend::start("a", Mode::Echo).await;
    let b = TestBackend::start("b", Mode::Echo).await;
    let p = TestProxy::start(
        ProxyConfig::default(),
        RoutingPolicy::default(),
        vec![a.spec("z")],
    )
    .await;
    let (id, mut old) = p.connect().await.unwrap();
    assert_eq!(id, "a");

    let mut drained = a.spec("z");
    drained.admin = AdminState::Drain { deadline: None };
    p.publish(vec![drained, b.spec("z")]);
    assert_eq!(answering(&p, 30).await, set(&["b"]));
    // The old connection keeps transferring, in volume.
    for i in 0..20 {
        roundtrip(&mut old, &random_bytes(256 * 1024, i))
            .await
            .unwrap();
    }
    assert_eq!(a.accepted(), 1);
}

#[tokio::test]
async fn drain_deadline_closes_old_connections() {
    let a = TestBackend::start("a", Mode::Echo).await;
    let b = TestBackend::start("b", Mode::Echo).await;
    let p = TestProxy::start(
        ProxyConfig::default(),
        RoutingPolicy::default(),
        vec![a.spec("z")],
    )
    .await;
    let (_, mut old) = p.connect().await.unwrap();

    let mut drained = a.spec("z");
    drained.admin = AdminState::Drain {
        deadline: Some(SystemTime::now() + Duration::from_secs(2)),
    };
    p.publish(vec![drained, b.spec("z")]);
    roundtrip(&mut old, b"before the deadline").await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), old.read(&mut buf))
        .await
        .expect("connection outlived its drain deadline");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        eventually(Duration::from_secs(5), || p.backends.stats()[0]
            .stats
            .active_connections
            == 0)
        .await
    );
    // New connections were going to b all along.
    assert_eq!(answering(&p, 5).await, set(&["b"]));
}

#[tokio::test]
async fn local_zone_is_preferred_and_spills_over_when_short() {
    let a1 = TestBackend::start("a1", Mode::Echo).await;
    let a2 = TestBackend::start("a2", Mode::Echo).await;
    let b1 = TestBackend::start("b1", Mode::Echo).await;
    let policy = RoutingPolicy {
        local_zone: Some("zone-a".into()),
        min_local_healthy_share: 0.6,
    };
    let p = TestProxy::start_mode(
        ProxyConfig::default(),
        policy,
        RoutingMode::ZonePreferred,
        vec![a1.spec("zone-a"), a2.spec("zone-a"), b1.spec("zone-b")],
    )
    .await;
    assert_eq!(answering(&p, 40).await, set(&["a1", "a2"]));

    // Half of zone a is down: 0.5 < 0.6, spread over every routable backend.
    let mut down = a2.spec("zone-a");
    down.verdict = Verdict::Down;
    p.publish(vec![a1.spec("zone-a"), down.clone(), b1.spec("zone-b")]);
    assert!(p.backends.load().spilled_over());
    assert_eq!(answering(&p, 60).await, set(&["a1", "b1"]));

    // The whole local zone is down: everything goes to zone b.
    let mut down1 = a1.spec("zone-a");
    down1.verdict = Verdict::Down;
    p.publish(vec![down1, down, b1.spec("zone-b")]);
    assert_eq!(answering(&p, 20).await, set(&["b1"]));

    // Recovery: back to the local zone.
    p.publish(vec![
        a1.spec("zone-a"),
        a2.spec("zone-a"),
        b1.spec("zone-b"),
    ]);
    assert!(!p.backends.load().spilled_over());
    assert_eq!(answering(&p, 40).await, set(&["a1", "a2"]));
}

#[tokio::test]
async fn a_failed_local_connect_retries_in_another_zone() {
    let b1 = TestBackend::start("b1", Mode::Echo).await;
    let dead_local = ClosedBackend::new("dead-local");
    let p = TestProxy::start_mode(
        ProxyConfig::default(),
        RoutingPolicy {
            local_zone: Some("zone-a".into()),
            min_local_healthy_share: 0.5,
        },
        RoutingMode::ZonePreferred,
        vec![dead_local.spec("zone-a"), b1.spec("zone-b")],
    )
    .await;
    // The verdict still says healthy (no prober yet): the retry leaves the
    // zone rather than failing the client.
    assert_eq!(answering(&p, 10).await, set(&["b1"]));
}

/// Connects `n` times and keeps every connection open (watches), so the
/// load the balancer sees builds up. Returns connections per backend.
async fn held(p: &TestProxy, n: usize) -> (BTreeMap<String, usize>, Vec<BufReader<TcpStream>>) {
    let mut by = BTreeMap::new();
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let (id, c) = p.connect().await.unwrap();
        *by.entry(id).or_insert(0) += 1;
        open.push(c);
    }
    (by, open)
}

#[tokio::test]
async fn vip_balances_and_local_prefers_its_zone_on_one_node() {
    // The standard layout: one apiserver per zone, this node in zone a.
    let a = TestBackend::start("a", Mode::Echo).await;
    let b = TestBackend::start("b", Mode::Echo).await;
    let c = TestBackend::start("c", Mode::Echo).await;
    let registry = Backends::new(RoutingPolicy {
        local_zone: Some("zone-a".into()),
        min_local_healthy_share: 0.5,
    });
    let specs = |a_verdict: Verdict| {
        let mut sa = a.spec("zone-a");
        sa.verdict = a_verdict;
        vec![sa, b.spec("zone-b"), c.spec("zone-c")]
    };
    registry.publish(specs(Verdict::Healthy), 1).unwrap();
    let vip = TestProxy::serve(
        ProxyConfig::default(),
        registry.with_mode(RoutingMode::Balanced),
    )
    .await;
    let local = TestProxy::serve(
        ProxyConfig::default(),
        registry.with_mode(RoutingMode::ZonePreferred),
    )
    .await;

    // Through the VIP: every apiserver carries its share of the open
    // connections.
    let (spread, open_vip) = held(&vip, 90).await;
    assert_eq!(spread.len(), 3, "{spread:?}");
    let max = *spread.values().max().unwrap() as f64;
    let min = *spread.values().min().unwrap() as f64;
    assert!(max / min <= 1.15, "{spread:?}");

    // Through the local listener: zone a only, although zone a's apiserver
    // is now the most loaded (the modes share the counters, not the rule).
    let (kept, open_local) = held(&local, 30).await;
    assert_eq!(kept.into_iter().collect::<Vec<_>>(), [("a".to_owned(), 30)]);

    // Zone a goes down: the local listener spills over, the VIP listener
    // just loses one candidate.
    let v = registry.load().version() + 1;
    registry.publish(specs(Verdict::Down), v).unwrap();
    assert!(registry.load().spilled_over());
    // Held open, so that the picks see their own load: with connections
    // closed at once, the lighter of b and c would take every one.
    let zones = |spread: BTreeMap<String, usize>| spread.into_keys().collect::<HashSet<_>>();
    let (spilled, open_spilled) = held(&local, 30).await;
    assert_eq!(zones(spilled), set(&["b", "c"]));
    let (rest, open_rest) = held(&vip, 30).await;
    assert_eq!(zones(rest), set(&["b", "c"]));
    drop((open_vip, open_local, open_spilled, open_rest));
}

#[tokio::test]
async fn fail_open_when_nothing_is_routable() {
    let a = TestBackend::start("a", Mode::Echo).await;
    let b = TestBackend::start("b", Mode::Echo).await;
    let c = TestBackend::start("c", Mode::Echo).await;
    let mut sa = a.spec("z");
    sa.verdict = Verdict::Down;
    let mut sb = b.spec("z");
    sb.verdict = Verdict::Draining;
    let mut sc = c.spec("z");
    sc.verdict = Verdict::Down;
    sc.admin = AdminState::Drain { deadline: None };
    let p = TestProxy::start(
        ProxyConfig::default(),
        RoutingPolicy::default(),
        vec![sa, sb, sc],
    )
    .await;
    assert!(p.backends.load().fail_open());
    // Every admin-active backend serves, whatever its verdict; the drained
    // one never does.
    assert_eq!(answering(&p, 40).await, set(&["a", "b"]));

    p.publish(vec![a.spec("z"), b.spec("z"), c.spec("z")]);
    assert!(!p.backends.load().fail_open());
}

#[tokio::test]
async fn no_backend_at_all_resets_the_client() {
    let p = TestProxy::start(ProxyConfig::default(), RoutingPolicy::default(), vec![]).await;
    let r = p.connect().await;
    assert!(r.is_err(), "{r:?}");
}

/// A client that arrives while the node has no backend at all (a new
/// cluster before the leader's seeding is committed) waits for the first
/// one instead of being reset at once; one that waits a whole connect
/// timeout in vain is reset then, not earlier.
#[tokio::test]
async fn a_client_that_arrives_before_any_backend_waits_for_the_first_one() {
    let a = TestBackend::start("a", Mode::Echo).await;
    let config = ProxyConfig {
        connect_timeout: Duration::from_secs(2),
        ..ProxyConfig::default()
    };
    let p = TestProxy::start(config, RoutingPolicy::default(), vec![]).await;
    let waiting = tokio::spawn({
        let address = p.address;
        async move {
            let s = TcpStream::connect(address).await.unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.map(|_| line)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "reset before the wait was over");
    p.publish(vec![a.spec("z")]);
    let line = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("still waiting after the first backend came")
        .unwrap()
        .unwrap();
    assert_eq!(line.trim_end(), "a");

    // Nothing comes: reset after the connect timeout.
    p.publish(vec![]);
    let start = std::time::Instant::now();
    let r = p.connect().await;
    assert!(r.is_err(), "{r:?}");
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "reset after {:?}, before the connect timeout",
        start.elapsed()
    );
}

/// A proxy whose every first pick is `local` (zone-preferred, the local
/// zone first), with `remote` reachable by a retry or a raced connect.
async fn local_first(
    config: ProxyConfig,
    local: Vec<BackendSpec>,
    remote: BackendSpec,
) -> TestProxy {
    let mut specs = local;
    specs.push(remote);
    TestProxy::start_mode(
        config,
        RoutingPolicy {
            local_zone: Some("zone-a".into()),
            min_local_healthy_share: 0.5,
        },
        RoutingMode::ZonePreferred,
        specs,
    )
    .await
}

fn connect_errors(p: &TestProxy, id: &str) -> u64 {
    p.backends
        .load()
        .by_id(id)
        .unwrap()
        .stats()
        .snapshot()
        .connect_errors
}

/// Connects once, returning who answered and how long it took.
async fn timed_connect(p: &TestProxy) -> (String, Duration) {
    let start = std::time::Instant::now();
    let (id, _c) = p.connect().await.unwrap();
    (id, start.elapsed())
}

#[tokio::test]
async fn a_connect_that_hangs_is_overtaken_by_one_raced_to_another_backend() {
    let hung = HungBackend::start("hung").await;
    let b1 = TestBackend::start("b1", Mode::Echo).await;
    // A connect timeout far above the race's 100 ms, so a client that
    // waited for it could not pass for one that was raced.
    let config = ProxyConfig {
        connect_timeout: Duration::from_secs(5),
        ..ProxyConfig::default()
    };
    let p = local_first(config, vec![hung.spec("zone-a")], b1.spec("zone-b")).await;

    let (id, took) = timed_connect(&p).await;
    assert_eq!(id, "b1");
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(2500),
        "the first client drew the hung backend and was raced after 100 ms, not after the 5 s connect timeout: {took:?}"
    );
    assert_eq!(connect_errors(&p, "hung"), 1, "counted as overtaken");
    // Overtaken means avoided: the next clients go straight to b1, apart
    // from one trial a second.
    for _ in 0..10 {
        let (id, took) = timed_connect(&p).await;
        assert_eq!(id, "b1");
        assert!(took < Duration::from_millis(2500), "{took:?}");
    }
    assert_eq!(b1.accepted(), 11);
}

#[tokio::test]
async fn with_the_race_off_a_hung_connect_waits_the_connect_timeout() {
    let hung = HungBackend::start("hung").await;
    let b1 = TestBackend::start("b1", Mode::Echo).await;
    let config = ProxyConfig {
        connect_timeout: Duration::from_millis(300),
        connect_hedge_after: Duration::ZERO,
        ..ProxyConfig::default()
    };
    let p = local_first(config, vec![hung.spec("zone-a")], b1.spec("zone-b")).await;
    let (id, took) = timed_connect(&p).await;
    assert_eq!(id, "b1");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert_eq!(connect_errors(&p, "hung"), 1, "counted as timed out");
}

#[tokio::test]
async fn at_most_two_connects_race_and_a_third_starts_when_one_times_out() {
    let hung1 = HungBackend::start("hung1").await;
    let hung2 = HungBackend::start("hung2").await;
    let b1 = TestBackend::start("b1", Mode::Echo).await;
    let config = ProxyConfig {
        connect_timeout: Duration::from_secs(1),
        ..ProxyConfig::default()
    };
    let p = local_first(
        config,
        vec![hung1.spec("zone-a"), hung2.spec("zone-a")],
        b1.spec("zone-b"),
    )
    .await;
    // One hung local backend, then the other raced 100 ms later; b1 only
    // when the first times out, 1 s after the client came.
    let (id, took) = timed_connect(&p).await;
    assert_eq!(id, "b1");
    assert!(
        took >= Duration::from_secs(1),
        "a third connect ran before one of two timed out: {took:?}"
    );
    // One timed out; the other was still pending when b1 connected.
    assert_eq!(connect_errors(&p, "hung1") + connect_errors(&p, "hung2"), 2);
}

#[tokio::test]
async fn a_single_connect_attempt_is_never_raced() {
    let hung = HungBackend::start("hung").await;
    let b1 = TestBackend::start("b1", Mode::Echo).await;
    let config = ProxyConfig {
        connect_timeout: Duration::from_millis(300),
        connect_attempts: 1,
        ..ProxyConfig::default()
    };
    let p = local_first(config, vec![hung.spec("zone-a")], b1.spec("zone-b")).await;
    let start = std::time::Instant::now();
    let r = p.connect().await;
    assert!(r.is_err(), "{r:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(b1.accepted(), 0);
}
