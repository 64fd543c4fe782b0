//! Unit and property tests of publishing and selection.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::*;

fn spec(id: &str, zone: &str, verdict: Verdict, admin: AdminState) -> BackendSpec {
    BackendSpec {
        id: id.into(),
        address: "127.0.0.1:6443".parse().unwrap(),
        zone: zone.into(),
        weight: 1,
        admin,
        verdict,
    }
}

fn healthy(id: &str, zone: &str) -> BackendSpec {
    spec(id, zone, Verdict::Healthy, AdminState::Active)
}

/// The mode the tests written before per-listener routing assume.
const ZP: RoutingMode = RoutingMode::ZonePreferred;
const MODES: [RoutingMode; 2] = [RoutingMode::Balanced, RoutingMode::ZonePreferred];

fn policy(zone: Option<&str>, share: f64) -> RoutingPolicy {
    RoutingPolicy {
        local_zone: zone.map(Into::into),
        min_local_healthy_share: share,
    }
}

fn picks(b: &Backends, n: usize) -> HashSet<String> {
    let set = b.load();
    (0..n)
        .filter_map(|_| set.pick(b.mode(), &[]).map(|b| b.id().to_owned()))
        .collect()
}

#[test]
fn publish_rejects_bad_lists_without_applying() {
    let b = Backends::default();
    b.publish(vec![healthy("a", "z")], 1).unwrap();
    let e = b
        .publish(vec![healthy("x", "z"), healthy("x", "z")], 2)
        .unwrap_err();
    assert_eq!(e.to_string(), "backends[1].id: duplicate id \"x\"");
    let mut zero = healthy("y", "z");
    zero.weight = 0;
    assert!(matches!(
        b.publish(vec![zero], 2),
        Err(BackendsError::ZeroWeight { index: 0, .. })
    ));
    assert!(matches!(
        b.publish(vec![healthy("", "z")], 2),
        Err(BackendsError::EmptyId { index: 0 })
    ));
    assert_eq!(
        b.publish(vec![healthy("b", "z")], 0),
        Err(BackendsError::StaleVersion {
            current: 1,
            offered: 0
        })
    );
    let set = b.load();
    assert_eq!(set.version(), 1);
    assert_eq!(set.iter().map(Backend::id).collect::<Vec<_>>(), ["a"]);
}

#[test]
fn stats_survive_publishes_by_id() {
    let b = Backends::default();
    b.publish(vec![healthy("a", "z"), healthy("b", "z")], 1)
        .unwrap();
    let a = b.load().by_id("a").unwrap().stats().clone();
    a.reserve();
    a.confirm();
    a.add_bytes_in(10);
    a.add_bytes_out(20);
    let before = std::time::SystemTime::now();
    a.connect_failed(ConnectErrorKind::Refused);
    let after = std::time::SystemTime::now();
    b.publish(vec![healthy("b", "z"), healthy("a", "y")], 2)
        .unwrap();
    let stats = b.stats();
    assert_eq!(stats[1].spec.id, "a");
    assert_eq!(stats[1].spec.zone, "y");
    let failed_at = stats[1].stats.last_connect_error_at.unwrap();
    // Kept in whole milliseconds.
    assert!(
        failed_at + std::time::Duration::from_millis(1) > before && failed_at <= after,
        "{failed_at:?} not within {before:?}..{after:?}"
    );
    assert_eq!(
        stats[1].stats,
        StatsSnapshot {
            active_connections: 1,
            total_connections: 1,
            bytes_in: 10,
            bytes_out: 20,
            connect_errors: 1,
            retries: 0,
            last_connect_error_at: Some(failed_at),
            avoided: true,
        }
    );
    assert_eq!(stats[0].stats, StatsSnapshot::default());
}

#[test]
fn least_loaded_of_two_wins() {
    let b = Backends::default();
    b.publish(vec![healthy("a", "z"), healthy("b", "z")], 1)
        .unwrap();
    let set = b.load();
    for _ in 0..3 {
        set.by_id("a").unwrap().stats().reserve();
    }
    for _ in 0..50 {
        assert_eq!(set.pick(RoutingMode::Balanced, &[]).unwrap().id(), "b");
    }
}

/// Long-lived connections one apart (201/200/201) do not pull every new
/// connection onto the backend with one fewer: within the tie band the
/// draw stays random, so new connections spread evenly. A backend with
/// none (just restarted) still wins every draw it is in.
#[test]
fn near_equal_loads_share_new_connections_and_an_empty_backend_wins() {
    let b = Backends::default();
    b.publish(
        vec![healthy("a", "z"), healthy("b", "z"), healthy("c", "z")],
        1,
    )
    .unwrap();
    let set = b.load();
    for (id, n) in [("a", 201), ("b", 200), ("c", 201)] {
        for _ in 0..n {
            set.by_id(id).unwrap().stats().reserve();
        }
    }
    let mut counts = std::collections::HashMap::new();
    for _ in 0..3000 {
        *counts
            .entry(
                set.pick(RoutingMode::Balanced, &[])
                    .unwrap()
                    .id()
                    .to_owned(),
            )
            .or_insert(0u32) += 1;
    }
    for id in ["a", "b", "c"] {
        let share = f64::from(counts[id]) / 3000.0;
        assert!((0.28..0.39).contains(&share), "{id}: {share} of {counts:?}");
    }

    let restarted = Backends::default();
    restarted
        .publish(
            vec![healthy("a", "z"), healthy("b", "z"), healthy("c", "z")],
            1,
        )
        .unwrap();
    let set = restarted.load();
    for id in ["b", "c"] {
        for _ in 0..200 {
            set.by_id(id).unwrap().stats().reserve();
        }
    }
    let to_a = (0..3000)
        .filter(|_| set.pick(RoutingMode::Balanced, &[]).unwrap().id() == "a")
        .count();
    // a is in two of every three draws and wins each of them.
    assert!((1800..2200).contains(&to_a), "{to_a} of 3000");
}

#[test]
fn weights_steer_the_load() {
    let b = Backends::default();
    let mut heavy = healthy("heavy", "z");
    heavy.weight = 3;
    b.publish(vec![heavy, healthy("light", "z")], 1).unwrap();
    let set = b.load();
    // Simulate long-lived connections: each pick keeps its slot.
    for _ in 0..400 {
        set.pick(RoutingMode::Balanced, &[])
            .unwrap()
            .stats()
            .reserve();
    }
    let h = set.by_id("heavy").unwrap().stats().active() as f64;
    let l = set.by_id("light").unwrap().stats().active() as f64;
    assert!((h / l - 3.0).abs() < 0.2, "heavy {h} light {l}");
}

#[test]
fn exclusion_leaves_the_zone_before_giving_up() {
    let b = Backends::new(policy(Some("a"), 0.5));
    b.publish(vec![healthy("a1", "a"), healthy("b1", "b")], 1)
        .unwrap();
    let set = b.load();
    let first = set.pick(ZP, &[]).unwrap();
    assert_eq!(first.id(), "a1");
    let second = set.pick(ZP, &[first.index()]).unwrap();
    assert_eq!(second.id(), "b1");
    assert!(set.pick(ZP, &[0, 1]).is_none());
}

#[test]
fn a_backend_whose_connect_failed_is_avoided_until_one_to_it_succeeds() {
    let b = Backends::default();
    b.publish(
        vec![healthy("a", "z"), healthy("b", "z"), healthy("c", "z")],
        1,
    )
    .unwrap();
    let set = b.load();
    let a = set.by_id("a").unwrap().stats().clone();
    // The lightest by far, and still never picked while avoided.
    for id in ["b", "c"] {
        for _ in 0..50 {
            set.by_id(id).unwrap().stats().reserve();
        }
    }
    assert!(a.connect_failed(ConnectErrorKind::Timeout), "starts");
    assert!(!a.connect_failed(ConnectErrorKind::Timeout), "extends");
    assert_eq!(picks(&b, 300), HashSet::from(["b".into(), "c".into()]));
    // With the others excluded it is the last resort, not gone.
    let (bi, ci) = (
        set.by_id("b").unwrap().index(),
        set.by_id("c").unwrap().index(),
    );
    assert_eq!(set.pick(b.mode(), &[bi, ci]).unwrap().id(), "a");

    assert!(a.snapshot().avoided, "the API shows it");

    // A connect to it that succeeds (one that raced the failure) ends it.
    a.reserve();
    a.confirm();
    assert!(!a.avoided());
    assert!(!a.snapshot().avoided);
    assert!(a.snapshot().last_connect_error_at.is_some(), "still when");
    assert!(picks(&b, 100).contains("a"));
}

#[test]
fn an_avoidance_runs_out_into_one_trial_at_a_time() {
    let b = Backends::default();
    b.publish(vec![healthy("a", "z"), healthy("b", "z")], 1)
        .unwrap();
    let set = b.load();
    let a = set.by_id("a").unwrap().stats().clone();
    assert!(a.connect_failed(ConnectErrorKind::Refused));
    assert_eq!(picks(&b, 50), HashSet::from(["b".into()]));
    std::thread::sleep(AVOID_AFTER_FAILURE + Duration::from_millis(20));
    assert!(!a.avoided());
    // The first pick that takes it is its trial; the others avoid it
    // while the trial connects.
    let picked: Vec<String> = (0..100)
        .map(|_| set.pick(b.mode(), &[]).unwrap().id().to_owned())
        .collect();
    assert_eq!(
        picked.iter().filter(|id| *id == "a").count(),
        1,
        "{picked:?}"
    );
    assert!(a.avoided());
    // A failed trial goes on with the same avoidance; a success ends it,
    // and the next failure starts a new one.
    assert!(!a.connect_failed(ConnectErrorKind::Refused));
    a.reserve();
    a.confirm();
    assert!(!a.avoided());
    assert!(a.connect_failed(ConnectErrorKind::Refused));
}

#[test]
fn an_avoided_local_backend_sends_zone_preferred_picks_to_other_zones() {
    let b = Backends::new(policy(Some("a"), 0.5));
    b.publish(
        vec![healthy("a1", "a"), healthy("b1", "b"), healthy("c1", "c")],
        1,
    )
    .unwrap();
    let set = b.load();
    assert_eq!(set.pick(ZP, &[]).unwrap().id(), "a1");
    set.by_id("a1")
        .unwrap()
        .stats()
        .connect_failed(ConnectErrorKind::Timeout);
    let ids: HashSet<String> = (0..100)
        .map(|_| set.pick(ZP, &[]).unwrap().id().to_owned())
        .collect();
    assert_eq!(ids, HashSet::from(["b1".into(), "c1".into()]));
    // Every backend avoided: picks go on, among all of them.
    for id in ["b1", "c1"] {
        set.by_id(id)
            .unwrap()
            .stats()
            .connect_failed(ConnectErrorKind::Timeout);
    }
    assert_eq!(set.pick(ZP, &[]).unwrap().id(), "a1");
    assert!(set.pick(RoutingMode::Balanced, &[]).is_some());
}

/// Long-lived connections through `mode`: each pick keeps its slot.
/// Returns the open connections per backend id.
fn hold(set: &BackendSet, mode: RoutingMode, n: usize) -> std::collections::BTreeMap<String, u64> {
    for _ in 0..n {
        set.pick(mode, &[]).unwrap().stats().reserve();
    }
    set.iter()
        .map(|b| (b.id().to_owned(), b.stats().active()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[test]
fn balanced_spreads_over_every_zone_and_zone_preferred_stays_local() {
    // The standard layout: one apiserver per zone, this node in zone a.
    let b = Backends::new(policy(Some("a"), 0.5));
    let three = vec![healthy("a1", "a"), healthy("b1", "b"), healthy("c1", "c")];
    b.publish(three.clone(), 1).unwrap();
    let set = b.load();
    assert_eq!(set.first_tier(RoutingMode::Balanced), &[0, 1, 2]);
    assert_eq!(set.first_tier(ZP), &[0]);
    assert!(!set.spilled_over());

    let spread = hold(&set, RoutingMode::Balanced, 300);
    assert_eq!(spread.len(), 3, "{spread:?}");
    let (max, min) = (
        *spread.values().max().unwrap() as f64,
        *spread.values().min().unwrap() as f64,
    );
    assert!(max / min <= 1.15, "{spread:?}");

    // A fresh snapshot (new counters) for the zone-preferred listener.
    b.publish(Vec::new(), 2).unwrap();
    b.publish(three, 3).unwrap();
    let local = hold(&b.load(), ZP, 100);
    assert_eq!(
        local.into_iter().collect::<Vec<_>>(),
        [("a1".to_owned(), 100)]
    );
}

#[test]
fn zone_preferred_spills_below_the_share_and_balanced_is_unaffected() {
    let specs = |a2: Verdict| {
        vec![
            healthy("a1", "a"),
            spec("a2", "a", a2, AdminState::Active),
            healthy("b1", "b"),
            healthy("c1", "c"),
        ]
    };
    // Half of zone a routable, 0.5 >= 0.5: stays local.
    let b = Backends::new(policy(Some("a"), 0.5));
    b.publish(specs(Verdict::Down), 1).unwrap();
    let set = b.load();
    assert!(!set.spilled_over());
    assert_eq!(set.local_share(), Some(0.5));
    assert_eq!(set.first_tier(ZP), &[0]);
    assert_eq!(set.first_tier(RoutingMode::Balanced), &[0, 2, 3]);

    // The same list with a stricter share: spills over to every routable
    // backend; the balanced list is the same either way.
    b.set_policy(policy(Some("a"), 0.6));
    let set = b.load();
    assert!(set.spilled_over());
    assert_eq!(set.first_tier(ZP), &[0, 2, 3]);
    assert_eq!(set.first_tier(RoutingMode::Balanced), &[0, 2, 3]);
    let spread = hold(&set, ZP, 90);
    assert_eq!(
        spread.len(),
        3,
        "spilled picks reach every zone: {spread:?}"
    );

    // Zone a whole again: back to local.
    b.publish(specs(Verdict::Healthy), 2).unwrap();
    let set = b.load();
    assert!(!set.spilled_over());
    assert_eq!(set.first_tier(ZP), &[0, 1]);
    assert_eq!(set.first_tier(RoutingMode::Balanced), &[0, 1, 2, 3]);
}

#[test]
fn handles_with_different_modes_share_one_registry() {
    let vip = Backends::new(policy(Some("a"), 0.5));
    assert_eq!(vip.mode(), RoutingMode::Balanced);
    let local = vip.with_mode(ZP);
    assert_eq!(local.mode(), ZP);
    vip.publish(vec![healthy("a1", "a"), healthy("b1", "b")], 7)
        .unwrap();
    // One publish, seen by both.
    assert_eq!(local.load().version(), 7);
    assert_eq!(
        picks(&local, 50),
        HashSet::from(["a1".to_owned()]),
        "the local handle prefers zone a"
    );
    assert_eq!(
        picks(&vip, 200),
        HashSet::from(["a1".to_owned(), "b1".to_owned()]),
        "the VIP handle balances"
    );
    // The live counters are shared: a connection through the local
    // listener makes the VIP listener steer away from its backend.
    local.load().pick(ZP, &[]).unwrap().stats().reserve();
    assert_eq!(vip.load().by_id("a1").unwrap().stats().active(), 1);
    assert_eq!(picks(&vip, 50), HashSet::from(["b1".to_owned()]));
}

#[test]
fn routing_modes_parse_by_their_config_names() {
    for mode in MODES {
        let json = serde_json::to_string(&mode).unwrap();
        assert_eq!(json, format!("\"{}\"", mode.as_str()));
        assert_eq!(serde_json::from_str::<RoutingMode>(&json).unwrap(), mode);
    }
    assert_eq!(RoutingMode::default(), RoutingMode::Balanced);
}

#[test]
fn fail_open_routes_to_active_backends_only() {
    let b = Backends::default();
    b.publish(
        vec![
            spec("down", "z", Verdict::Down, AdminState::Active),
            spec("draining", "z", Verdict::Draining, AdminState::Active),
            spec(
                "drained",
                "z",
                Verdict::Down,
                AdminState::Drain { deadline: None },
            ),
        ],
        1,
    )
    .unwrap();
    let set = b.load();
    assert!(set.fail_open());
    assert_eq!(
        picks(&b, 200),
        HashSet::from(["down".to_owned(), "draining".to_owned()])
    );
    b.publish(vec![healthy("ok", "z")], 2).unwrap();
    assert!(!b.load().fail_open());
}

#[test]
fn policy_validation_names_the_field() {
    let errs = bulwark_common::config::validate_at("routing", &policy(Some(""), 1.5));
    let errs: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].starts_with("routing.minLocalHealthyShare: 1.5 is out of range"));
    assert!(errs[1].starts_with("routing.localZone: must not be empty"));
}

#[test]
fn spec_round_trips_through_json() {
    let s = spec(
        "a",
        "z",
        Verdict::Draining,
        AdminState::Drain {
            deadline: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(5)),
        },
    );
    let json = serde_json::to_string(&s).unwrap();
    let back: BackendSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    let minimal: BackendSpec =
        serde_json::from_str(r#"{"id":"x","address":"10.0.0.1:6443"}"#).unwrap();
    assert_eq!(minimal.weight, 1);
    assert_eq!(minimal.admin, AdminState::Active);
    assert_eq!(minimal.verdict, Verdict::Unknown);
}

#[tokio::test(start_paused = true)]
async fn drain_deadline_cancels_the_close_token() {
    let b = Backends::default();
    b.publish(vec![healthy("a", "z")], 1).unwrap();
    let token = b.load().by_id("a").unwrap().close_token().clone();
    let deadline = SystemTime::now() + Duration::from_secs(30);
    b.publish(
        vec![spec(
            "a",
            "z",
            Verdict::Healthy,
            AdminState::Drain {
                deadline: Some(deadline),
            },
        )],
        2,
    )
    .unwrap();
    for mode in MODES {
        assert!(
            b.load().pick(mode, &[]).is_none(),
            "a drained backend is chosen"
        );
    }
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert!(!token.is_cancelled());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(token.is_cancelled());

    // Undrained: new connections get a fresh token.
    b.publish(vec![healthy("a", "z")], 3).unwrap();
    assert!(!b.load().by_id("a").unwrap().close_token().is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn undrain_disarms_the_deadline_and_the_cap_applies() {
    let b = Backends::default();
    let drained = |d: Option<SystemTime>| {
        vec![spec(
            "a",
            "z",
            Verdict::Healthy,
            AdminState::Drain { deadline: d },
        )]
    };
    b.publish(
        drained(Some(SystemTime::now() + Duration::from_secs(10))),
        1,
    )
    .unwrap();
    let token = b.load().by_id("a").unwrap().close_token().clone();
    b.publish(vec![healthy("a", "z")], 2).unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!token.is_cancelled(), "an undrained backend was closed");

    // No deadline of its own, but this node caps drains at 5 s.
    b.set_drain_max_duration(Some(Duration::from_secs(5)));
    b.publish(drained(None), 3).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!token.is_cancelled());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(token.is_cancelled());
}

// ---- property tests -------------------------------------------------------

const ZONES: [&str; 3] = ["a", "b", "c"];

fn arb_spec() -> impl Strategy<Value = (usize, u8, u8, u32, u8)> {
    // zone, verdict, admin, weight, pre-existing load
    (0..ZONES.len(), 0u8..4, 0u8..4, 1u32..5, 0u8..5)
}

fn build(
    raw: &[(usize, u8, u8, u32, u8)],
    local: Option<usize>,
    share: f64,
) -> (Backends, Vec<BackendSpec>) {
    let specs: Vec<BackendSpec> = raw
        .iter()
        .enumerate()
        .map(|(i, &(zone, verdict, admin, weight, _))| BackendSpec {
            id: format!("b{i}"),
            address: "127.0.0.1:1".parse().unwrap(),
            zone: ZONES[zone].into(),
            weight,
            // Drained one time in four.
            admin: if admin == 0 {
                AdminState::Drain { deadline: None }
            } else {
                AdminState::Active
            },
            verdict: [
                Verdict::Healthy,
                Verdict::Down,
                Verdict::Draining,
                Verdict::Unknown,
            ][verdict as usize],
        })
        .collect();
    let b = Backends::new(policy(local.map(|z| ZONES[z]), share));
    b.publish(specs.clone(), 1).unwrap();
    let set = b.load();
    for (i, &(.., load)) in raw.iter().enumerate() {
        for _ in 0..load {
            set.get(i).unwrap().stats().reserve();
        }
    }
    (b, specs)
}

fn routable(s: &BackendSpec) -> bool {
    !s.admin.is_drain() && s.verdict.is_routable()
}

proptest! {
    #[test]
    fn never_drained_and_never_outside_routable_unless_fail_open(
        raw in prop::collection::vec(arb_spec(), 0..10),
        local in prop::option::of(0..ZONES.len()),
        share in 0.0f64..=1.0,
    ) {
        let (b, specs) = build(&raw, local, share);
        let set = b.load();
        let any_routable = specs.iter().any(routable);
        prop_assert_eq!(set.fail_open(), !any_routable && specs.iter().any(|s| !s.admin.is_drain()));
        for mode in MODES.into_iter().cycle().take(64) {
            match set.pick(mode, &[]) {
                Some(p) => {
                    let s = &specs[p.index()];
                    prop_assert!(!s.admin.is_drain(), "picked drained {}", s.id);
                    if !set.fail_open() {
                        prop_assert!(routable(s), "picked unroutable {}", s.id);
                    }
                }
                None => prop_assert!(specs.iter().all(|s| s.admin.is_drain())),
            }
        }
    }

    #[test]
    fn local_zone_preferred_at_or_above_the_threshold_and_spills_below(
        raw in prop::collection::vec(arb_spec(), 1..10),
        local in 0..ZONES.len(),
        share in 0.0f64..=1.0,
    ) {
        let (b, specs) = build(&raw, Some(local), share);
        let set = b.load();
        let zone = ZONES[local];
        let local_total = specs.iter().filter(|s| s.zone == zone).count();
        let local_ok = specs.iter().filter(|s| s.zone == zone && routable(s)).count();
        let prefer_local = local_ok > 0 && (local_ok as f64 / local_total as f64) >= share;
        prop_assert_eq!(set.spilled_over(), !prefer_local && specs.iter().any(routable));
        // The balanced list ignores zones whatever the policy.
        prop_assert_eq!(
            set.first_tier(RoutingMode::Balanced).len(),
            specs.iter().filter(|s| routable(s)).count()
        );
        let mut seen = HashSet::new();
        for _ in 0..64 {
            if let Some(p) = set.pick(ZP, &[]) {
                seen.insert(p.index());
                if prefer_local {
                    prop_assert_eq!(&specs[p.index()].zone, zone);
                }
            }
        }
        // Spilled over: with enough draws, every routable backend can
        // answer, whatever its zone (P2C never starves the least loaded).
        if !prefer_local && !set.fail_open() {
            for (i, s) in specs.iter().enumerate() {
                if routable(s) && s.zone != zone && specs.iter().filter(|t| routable(t)).count() == 1 {
                    prop_assert!(seen.contains(&i));
                }
            }
        }
    }

    #[test]
    fn pick_with_exclude_never_returns_an_excluded_backend(
        raw in prop::collection::vec(arb_spec(), 0..10),
        local in prop::option::of(0..ZONES.len()),
        share in 0.0f64..=1.0,
        exclude in prop::collection::vec(0usize..10, 0..6),
    ) {
        let (b, specs) = build(&raw, local, share);
        let set = b.load();
        for mode in MODES.into_iter().cycle().take(64) {
            match set.pick(mode, &exclude) {
                Some(p) => {
                    prop_assert!(!exclude.contains(&p.index()));
                    prop_assert!(!specs[p.index()].admin.is_drain());
                }
                None => {
                    // Nothing left means every eligible backend is excluded.
                    for x in set.iter() {
                        prop_assert!(!x.is_eligible() || exclude.contains(&x.index()));
                    }
                }
            }
        }
    }

    #[test]
    fn fail_open_only_when_nothing_is_routable(
        raw in prop::collection::vec(arb_spec(), 0..10),
    ) {
        let (b, specs) = build(&raw, None, 0.5);
        let set = b.load();
        if specs.iter().any(routable) {
            prop_assert!(!set.fail_open());
            for x in set.iter() {
                prop_assert_eq!(x.is_eligible(), routable(&specs[x.index()]));
            }
        }
    }
}
